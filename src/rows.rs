//! Rows as clients send them: parsing request bodies, and encoding rows into row groups.
//!
//! A body is one JSON object, a JSON array of objects, or NDJSON (one object per line,
//! blank lines ignored). Each row is parsed once, keeping every value's raw JSON text;
//! [`encode`] then writes the rows as COPY text for the table's columns, grouped by column
//! set, or [`encode_unchecked`] keeps them as JSON when the table's columns are not known.
//! A request is all or nothing: the first bad row fails the whole request, and the error
//! says which row.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Deserializer;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::copy::{self, ValueError};
use crate::rowgroup::{RowGroupBuilder, TARGET_GROUP_BYTES};
use crate::schema::TableSchema;
use crate::table::TableName;

/// How a request body is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one object or an array of objects.
    Json,
    /// `application/x-ndjson`: one object per line.
    Ndjson,
}

/// Where a row sits in its request, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowPosition {
    /// The body's only object.
    Single,
    /// Index in a JSON array, from 0.
    Index(usize),
    /// Line of an NDJSON body, from 1.
    Line(usize),
}

impl fmt::Display for RowPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowPosition::Single => f.write_str("the row"),
            RowPosition::Index(i) => write!(f, "row at index {i}"),
            RowPosition::Line(n) => write!(f, "line {n}"),
        }
    }
}

/// One row: its fields in the order given, and its raw JSON text.
#[derive(Debug)]
pub struct Row<'a> {
    /// Where the row is in its request.
    pub position: RowPosition,
    /// The object's raw text.
    pub raw: &'a str,
    /// Column name and raw JSON value, in the order the client gave them.
    pub fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// Why a body was refused as a whole or at a row: HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON (with serde_json's line and column).
    #[error("{position}: malformed JSON: {message}")]
    Malformed {
        /// The row, or the whole body.
        position: RowPosition,
        /// What the parser says.
        message: String,
    },
    /// A row that is not a JSON object.
    #[error("{position}: a row must be a JSON object, found {found}")]
    NotAnObject {
        /// The row.
        position: RowPosition,
        /// What was found instead.
        found: &'static str,
    },
    /// The same key twice in one object.
    #[error("{position}: key {key:?} is given twice")]
    DuplicateKey {
        /// The row.
        position: RowPosition,
        /// The key.
        key: String,
    },
    /// The body holds no rows at all.
    #[error("the body holds no rows")]
    Empty,
}

/// Parses a body (already known to be UTF-8) into rows.
///
/// # Errors
/// The first [`BodyError`] met.
pub fn parse(body: &str, format: BodyFormat) -> Result<Vec<Row<'_>>, BodyError> {
    let rows = match format {
        BodyFormat::Ndjson => body
            .split('\n')
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| parse_row(line, RowPosition::Line(i + 1)))
            .collect::<Result<Vec<_>, _>>()?,
        BodyFormat::Json => {
            let trimmed = body.trim_start();
            if trimmed.starts_with('[') {
                let elements: Vec<&RawValue> =
                    serde_json::from_str(body).map_err(|e| BodyError::Malformed {
                        position: RowPosition::Single,
                        message: e.to_string(),
                    })?;
                elements
                    .into_iter()
                    .enumerate()
                    .map(|(i, raw)| parse_row(raw.get(), RowPosition::Index(i)))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                vec![parse_row(body, RowPosition::Single)?]
            }
        }
    };
    if rows.is_empty() {
        return Err(BodyError::Empty);
    }
    Ok(rows)
}

/// Parses one JSON object, keeping each value's raw text and refusing duplicate keys.
fn parse_row(text: &str, position: RowPosition) -> Result<Row<'_>, BodyError> {
    let malformed = |e: serde_json::Error| BodyError::Malformed {
        position,
        message: e.to_string(),
    };
    let found = match text.trim_start().as_bytes().first() {
        Some(b'{') => None,
        Some(b'[') => Some("an array"),
        Some(b'"') => Some("a string"),
        Some(b't' | b'f') => Some("a boolean"),
        Some(b'n') => Some("null"),
        _ => Some("a number"),
    };
    if let Some(found) = found {
        // Malformed JSON is reported as such before its shape.
        serde_json::from_str::<IgnoredAny>(text).map_err(malformed)?;
        return Err(BodyError::NotAnObject { position, found });
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de
        .deserialize_map(RowVisitor)
        .and_then(|fields| de.end().map(|()| fields))
        .map_err(malformed)?;
    match fields {
        Ok(fields) => Ok(Row {
            position,
            raw: text.trim(),
            fields,
        }),
        Err(key) => Err(BodyError::DuplicateKey { position, key }),
    }
}

/// Collects an object's fields, or the first key given twice.
struct RowVisitor;

impl<'de> Visitor<'de> for RowVisitor {
    type Value = Result<Vec<(Cow<'de, str>, &'de RawValue)>, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields: Vec<(Cow<'de, str>, &'de RawValue)> =
            Vec::with_capacity(map.size_hint().unwrap_or(16));
        let mut duplicate = None;
        // Keys seen, once there are too many to compare one by one.
        let mut seen: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let repeated = if fields.len() < 32 {
                fields.iter().any(|(k, _)| *k == key)
            } else {
                let seen =
                    seen.get_or_insert_with(|| fields.iter().map(|(k, _)| k.clone()).collect());
                !seen.insert(key.clone())
            };
            if duplicate.is_some() || repeated {
                duplicate.get_or_insert_with(|| key.into_owned());
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value: &'de RawValue = map.next_value()?;
            fields.push((key, value));
        }
        Ok(duplicate.map_or(Ok(fields), Err))
    }
}

/// Deserializes a key without copying it unless it holds escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

/// Why a row cannot be stored in its table: HTTP 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// A key that is not a column of the table.
    #[error("{position}: column {column:?} does not exist in table {table}")]
    UnknownColumn {
        /// The row.
        position: RowPosition,
        /// The key.
        column: String,
        /// The table.
        table: TableName,
    },
    /// A value for a generated column.
    #[error(
        "{position}: column {column:?} is GENERATED ALWAYS; PostgreSQL computes its values, \
         leave it out"
    )]
    GeneratedColumn {
        /// The row.
        position: RowPosition,
        /// The column.
        column: String,
    },
    /// A value that cannot be stored.
    #[error("{position}: column {column:?}: {error}")]
    Value {
        /// The row.
        position: RowPosition,
        /// The column (or key).
        column: String,
        /// What is wrong.
        error: ValueError,
    },
}

/// Row groups built from one request: `(rows, payload)` pairs, each payload a
/// [`crate::rowgroup`] of at most about [`TARGET_GROUP_BYTES`].
pub type Groups = Vec<(u32, Vec<u8>)>;

/// Encodes `rows` as COPY text for `schema`'s table, one group per distinct column set.
/// Columns are written in table order, so rows naming the same columns in another order
/// share a group.
///
/// # Errors
/// The first row that names an unknown or generated column or holds a value that cannot be
/// stored.
pub fn encode(schema: &TableSchema, rows: &[Row<'_>]) -> Result<Groups, RowError> {
    let mut builders: Vec<RowGroupBuilder> = Vec::new();
    let mut by_columns: HashMap<Vec<u16>, usize> = HashMap::new();
    let mut done: Groups = Vec::new();
    let mut fields: Vec<(u16, &RawValue)> = Vec::new();
    let mut key: Vec<u16> = Vec::new();
    for row in rows {
        fields.clear();
        for (name, value) in &row.fields {
            let Some(i) = schema.position(name) else {
                if name.contains('\0') {
                    return Err(RowError::Value {
                        position: row.position,
                        column: name.to_string(),
                        error: ValueError::Nul,
                    });
                }
                return Err(RowError::UnknownColumn {
                    position: row.position,
                    column: name.to_string(),
                    table: schema.table().clone(),
                });
            };
            let column = &schema.columns()[i];
            if column.generated {
                return Err(RowError::GeneratedColumn {
                    position: row.position,
                    column: column.name.clone(),
                });
            }
            fields.push((u16::try_from(i).expect("at most 1600 columns"), value));
        }
        if !fields.is_sorted_by_key(|f| f.0) {
            fields.sort_unstable_by_key(|f| f.0);
        }
        key.clear();
        key.extend(fields.iter().map(|f| f.0));
        let slot = match by_columns.get(&key) {
            Some(&slot) => slot,
            None => {
                let names: Vec<&str> = key
                    .iter()
                    .map(|&i| schema.columns()[usize::from(i)].name.as_str())
                    .collect();
                builders.push(RowGroupBuilder::copy(schema.table(), &names));
                by_columns.insert(key.clone(), builders.len() - 1);
                builders.len() - 1
            }
        };
        let builder = &mut builders[slot];
        let row_start = builder.len();
        for (n, (i, value)) in fields.iter().enumerate() {
            let column = &schema.columns()[usize::from(*i)];
            let out = builder.row_buf();
            if n > 0 {
                out.push(b'\t');
            }
            if let Err(error) = copy::encode_field(&column.kind, value.get(), out) {
                builder.abandon_row(row_start);
                return Err(RowError::Value {
                    position: row.position,
                    column: column.name.clone(),
                    error,
                });
            }
        }
        builder.end_copy_row();
        if builder.len() >= TARGET_GROUP_BYTES {
            done.push(builder.take());
        }
    }
    done.extend(
        builders
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(RowGroupBuilder::take),
    );
    Ok(done)
}

/// Keeps `rows` as JSON for `table`, whose columns are not known yet (PostgreSQL could not
/// be asked). Values are still checked for what no column type can hold.
///
/// # Errors
/// The first value holding a NUL character.
pub fn encode_unchecked(table: &TableName, rows: &[Row<'_>]) -> Result<Groups, RowError> {
    let mut builder = RowGroupBuilder::json(table);
    let mut done = Vec::new();
    for row in rows {
        for (name, value) in &row.fields {
            let nul = name.contains('\0').then_some(ValueError::Nul);
            if let Some(error) = nul.or_else(|| copy::check_value(value.get()).err()) {
                return Err(RowError::Value {
                    position: row.position,
                    column: name.to_string(),
                    error,
                });
            }
        }
        builder.push_json_row(row.raw);
        if builder.len() >= TARGET_GROUP_BYTES {
            done.push(builder.take());
        }
    }
    if !builder.is_empty() {
        done.push(builder.take());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::ColumnKind;
    use crate::rowgroup::RowGroup;
    use crate::schema::Column;

    fn schema() -> TableSchema {
        let col = |name: &str, kind| Column {
            name: name.into(),
            kind,
            generated: name == "gen",
        };
        TableSchema::new(
            TableName {
                schema: Some("public".into()),
                name: "t".into(),
            },
            vec![
                col("id", ColumnKind::Scalar),
                col("note", ColumnKind::Scalar),
                col("doc", ColumnKind::Jsonb),
                col("gen", ColumnKind::Scalar),
            ],
        )
    }

    fn bodies(groups: &Groups) -> Vec<(Vec<String>, String)> {
        groups
            .iter()
            .map(|(_, p)| {
                let g = RowGroup::decode(p).expect("decode");
                (
                    g.columns.iter().map(|c| c.to_string()).collect(),
                    String::from_utf8(g.body.to_vec()).expect("utf8"),
                )
            })
            .collect()
    }

    #[test]
    fn bodies_of_every_shape_parse_with_positions() {
        let one = parse(r#" {"id": 1} "#, BodyFormat::Json).expect("object");
        assert_eq!(one[0].position, RowPosition::Single);
        let arr = parse(r#"[{"id":1},{"id":2}]"#, BodyFormat::Json).expect("array");
        assert_eq!(arr[1].position, RowPosition::Index(1));
        assert_eq!(arr[1].raw, r#"{"id":2}"#);
        let nd = parse("{\"id\":1}\n\n  \r\n{\"id\":2}\r\n", BodyFormat::Ndjson).expect("ndjson");
        assert_eq!(nd.len(), 2);
        assert_eq!(nd[1].position, RowPosition::Line(4));
        assert_eq!(nd[1].raw, r#"{"id":2}"#);
    }

    #[test]
    fn bad_bodies_name_the_row() {
        let e = parse("{\"id\":1}\n[1,2]\n", BodyFormat::Ndjson).unwrap_err();
        assert_eq!(
            e,
            BodyError::NotAnObject {
                position: RowPosition::Line(2),
                found: "an array"
            }
        );
        let e = parse(r#"[{"id":1}, 7]"#, BodyFormat::Json).unwrap_err();
        assert_eq!(
            e.to_string(),
            "row at index 1: a row must be a JSON object, found a number"
        );
        let e = parse(r#"{"a":1,"b":2,"a":3}"#, BodyFormat::Json).unwrap_err();
        assert_eq!(
            e,
            BodyError::DuplicateKey {
                position: RowPosition::Single,
                key: "a".into()
            }
        );
        // An escaped key equal to another is the same key.
        assert!(matches!(
            parse(r#"{"a":1,"\u0061":2}"#, BodyFormat::Json),
            Err(BodyError::DuplicateKey { .. })
        ));
        let e = parse("{\"id\":1}\n{\"id\":\n", BodyFormat::Ndjson).unwrap_err();
        assert!(
            matches!(
                e,
                BodyError::Malformed {
                    position: RowPosition::Line(2),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            parse("{\"id\":1} {}", BodyFormat::Json),
            Err(BodyError::Malformed { .. })
        ));
        assert_eq!(
            parse("\n \n", BodyFormat::Ndjson).unwrap_err(),
            BodyError::Empty
        );
        assert_eq!(parse("[]", BodyFormat::Json).unwrap_err(), BodyError::Empty);
    }

    #[test]
    fn rows_group_by_column_set_in_table_order() {
        let rows = parse(
            "{\"note\":\"a\",\"id\":1}\n{\"id\":2}\n{\"id\":3,\"note\":null}\n",
            BodyFormat::Ndjson,
        )
        .expect("parse");
        let groups = encode(&schema(), &rows).expect("encode");
        assert_eq!(
            bodies(&groups),
            vec![
                (vec!["id".into(), "note".into()], "1\ta\n3\t\\N\n".into()),
                (vec!["id".into()], "2\n".into()),
            ]
        );
        assert_eq!(groups.iter().map(|g| g.0).sum::<u32>(), 3);
    }

    #[test]
    fn unknown_generated_and_bad_values_are_refused_with_their_row() {
        let rows = parse("{\"id\":1}\n{\"nope\":1}\n", BodyFormat::Ndjson).expect("parse");
        let e = encode(&schema(), &rows).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: column \"nope\" does not exist in table public.t"
        );
        let rows = parse(r#"[{"gen":1}]"#, BodyFormat::Json).expect("parse");
        assert!(matches!(
            encode(&schema(), &rows),
            Err(RowError::GeneratedColumn { .. })
        ));
        let rows = parse(r#"{"doc":{"k":"\u0000"}}"#, BodyFormat::Json).expect("parse");
        assert!(matches!(
            encode(&schema(), &rows),
            Err(RowError::Value {
                error: ValueError::Nul,
                ..
            })
        ));
    }

    #[test]
    fn unchecked_rows_keep_their_json_and_still_refuse_nul() {
        let table = TableName {
            schema: None,
            name: "later".into(),
        };
        let rows = parse("{\"a\": [1, 2]}\n{\"b\":\"x\"}\n", BodyFormat::Ndjson).expect("parse");
        let groups = encode_unchecked(&table, &rows).expect("encode");
        let g = RowGroup::decode(&groups[0].1).expect("decode");
        let stored: Vec<_> = g.json_rows().collect::<Result<_, _>>().expect("rows");
        assert_eq!(stored, vec!["{\"a\": [1, 2]}", "{\"b\":\"x\"}"]);
        let rows = parse(r#"{"a":"x\u0000"}"#, BodyFormat::Json).expect("parse");
        assert!(encode_unchecked(&table, &rows).is_err());
        let rows = parse(r#"{"a\u0000":1}"#, BodyFormat::Json).expect("parse");
        assert!(encode_unchecked(&table, &rows).is_err());
    }
}
