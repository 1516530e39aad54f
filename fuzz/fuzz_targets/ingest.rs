//! The ingest path on arbitrary request bodies: `rows::parse_each` then
//! `rows::encode_parsed`, as `POST /v1/tables/...` runs them, for a table whose columns
//! cover every `ColumnKind` (the edge-case table plus json, jsonb[], json[], a `;`-delimited
//! array and a generated column), and for a table whose columns are not known yet.
//!
//! Input: byte 0 chooses the body format (bit 0: NDJSON, else JSON) and whether the columns
//! are known (bit 1: unknown); the rest is the body, which the handler takes only as UTF-8.
//!
//! Besides "no panic, no hang", it checks what the flusher relies on: with
//! `?invalid=dead_letter` encoding never fails and every row of the request is in exactly
//! one group (so takes exactly one LSN); a COPY group holds one line per row, each with one
//! field per column and no NUL byte; a JSON group holds each row's text, which parses again
//! as exactly one row; a refused group holds every refused row; and the default
//! `?invalid=reject` refuses a request exactly when dead-lettering would set a row aside,
//! and otherwise writes the same groups.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pgspool::copy::{ColumnKind, ElementKind};
use pgspool::rowgroup::{RowFormat, RowGroup};
use pgspool::rows::{self, BodyFormat, Invalid};
use pgspool::schema::{Column, TableSchema};
use pgspool::table::TableName;

fn schema() -> &'static TableSchema {
    static SCHEMA: OnceLock<TableSchema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let array = |element| ColumnKind::Array {
            element,
            delimiter: b',',
        };
        let columns = [
            ("id", ColumnKind::Scalar),
            ("note", ColumnKind::Scalar),
            ("payload", ColumnKind::Jsonb),
            ("at", ColumnKind::Scalar),
            ("amount", ColumnKind::Scalar),
            ("big", ColumnKind::Scalar),
            ("ratio", ColumnKind::Scalar),
            ("flag", ColumnKind::Scalar),
            ("tags", array(ElementKind::Scalar)),
            ("ids", array(ElementKind::Scalar)),
            ("ref", ColumnKind::Scalar),
            ("raw", ColumnKind::Scalar),
            ("Mixed Case", ColumnKind::Scalar),
            ("select", ColumnKind::Scalar),
            ("doc", ColumnKind::Json),
            ("docs", array(ElementKind::Jsonb)),
            ("jdocs", array(ElementKind::Json)),
            (
                "boxes",
                ColumnKind::Array {
                    element: ElementKind::Scalar,
                    delimiter: b';',
                },
            ),
            ("gen", ColumnKind::Scalar),
        ];
        TableSchema::new(
            TableName {
                schema: Some("public".into()),
                name: "edge_cases".into(),
            },
            columns
                .into_iter()
                .map(|(name, kind)| Column {
                    name: name.into(),
                    kind,
                    generated: name == "gen",
                })
                .collect(),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let Ok(body) = std::str::from_utf8(body) else {
        return;
    };
    let format = if flags & 1 == 1 {
        BodyFormat::Ndjson
    } else {
        BodyFormat::Json
    };
    let schema = (flags & 2 == 0).then(schema);
    let table = schema.map_or_else(
        || TableName {
            schema: None,
            name: "later".into(),
        },
        |s| s.table().clone(),
    );

    let parsed = match rows::parse_each(body, format) {
        Ok(parsed) => parsed,
        Err(e) => {
            assert!(
                rows::parse(body, format).is_err(),
                "parse and parse_each disagree"
            );
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let all_parsed = parsed.iter().all(Result::is_ok);
    assert_eq!(rows::parse(body, format).is_ok(), all_parsed);

    let kept = rows::encode_parsed(&table, schema, &parsed, Invalid::DeadLetter)
        .expect("with ?invalid=dead_letter encoding never fails");
    let refused = &kept.refused;
    assert!(
        refused.windows(2).all(|w| w[0].0 < w[1].0),
        "refused rows in order, once each"
    );
    assert!(refused.iter().all(|(i, _)| *i < parsed.len()));
    let mut rows_in_groups = 0u64;
    let mut refused_in_groups = 0usize;
    for (rows, payload) in &kept.groups {
        rows_in_groups += u64::from(*rows);
        let group = RowGroup::decode(payload).expect("the encoder writes row groups");
        assert_eq!(group.table, table);
        match group.format {
            RowFormat::Copy => check_copy(&group, *rows),
            RowFormat::Json => {
                assert!(schema.is_none(), "JSON groups only for unknown columns");
                let texts: Vec<&str> = group
                    .json_rows()
                    .collect::<Result<_, _>>()
                    .expect("JSON rows decode");
                assert_eq!(texts.len(), *rows as usize);
                for text in texts {
                    // The flusher parses each again once the columns are known.
                    let again = rows::parse(text, BodyFormat::Json).expect("stored row parses");
                    assert_eq!(again.len(), 1);
                }
            }
            RowFormat::Refused => {
                let stored: Vec<(&str, &str)> = group
                    .refused_rows()
                    .collect::<Result<_, _>>()
                    .expect("refused rows decode");
                assert_eq!(stored.len(), *rows as usize);
                assert!(stored.iter().all(|(text, _)| !text.contains('\0')));
                refused_in_groups += stored.len();
            }
        }
    }
    assert_eq!(rows_in_groups, parsed.len() as u64, "one LSN per row");
    assert_eq!(refused_in_groups, refused.len());

    if all_parsed {
        match rows::encode_parsed(&table, schema, &parsed, Invalid::Reject) {
            Ok(encoded) => {
                assert!(
                    refused.is_empty(),
                    "reject kept a row dead-lettering refused"
                );
                assert_eq!(encoded.groups, kept.groups);
            }
            Err(e) => {
                assert!(
                    !refused.is_empty(),
                    "reject refused {e}, dead-lettering did not"
                );
                assert_eq!(refused[0].1.to_string(), e.to_string());
            }
        }
    }
});

/// A COPY group: `rows` lines, each with one field per column (tabs and newlines inside
/// values are escaped), no NUL byte, and each line shown as JSON for dead letters.
fn check_copy(group: &RowGroup<'_>, rows: u32) {
    let body = group.body;
    assert!(!body.contains(&0), "a NUL byte in COPY text");
    assert!(body.ends_with(b"\n"));
    let lines: Vec<&[u8]> = body[..body.len() - 1].split(|&b| b == b'\n').collect();
    assert_eq!(lines.len(), rows as usize);
    let columns: Vec<String> = group.columns.iter().map(|c| (*c).to_string()).collect();
    for line in lines {
        if columns.is_empty() {
            assert!(line.is_empty());
            continue;
        }
        let fields = line.iter().filter(|&&b| b == b'\t').count() + 1;
        assert_eq!(
            fields,
            columns.len(),
            "fields of {:?}",
            String::from_utf8_lossy(line)
        );
        let shown = pgspool::copy::line_to_json(line, &columns);
        let value: serde_json::Value = serde_json::from_str(&shown).expect("JSON");
        assert_eq!(
            value.as_object().map(serde_json::Map::len),
            Some(columns.len())
        );
    }
}
