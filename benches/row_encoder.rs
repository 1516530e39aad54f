//! The ingest hot path before the WAL: a request body parsed into rows and encoded as COPY
//! text, with the same calls as the ingest handler (`rows::parse_each`, then
//! `rows::encode_parsed` against the table's `TableSchema`, `?invalid=reject`).
//!
//! Inputs:
//! - `flights_1000`: 1000 rows of the bundled nycflights13 `flights` table as NDJSON (about
//!   290 KB; 19 columns, all read through their type's text input);
//! - `flights_1`: one flights row as a single JSON object (`application/json`);
//! - `edge_cases_1000`: 1000 NDJSON rows cycling through `tests/data/edge_cases/accept.ndjson`
//!   (escapes, non-ASCII, nested `jsonb`, big numbers, arrays; nearly every row names its own
//!   column set, so there are many row groups), without its one 100 kB string, which would
//!   make up nearly all the bytes (`encode_field/scalar/text_100k` covers it).
//!
//! Groups: `ingest` (parse and encode, what a request costs), `parse` and `encode` (each
//! alone), reported per body byte and per row; `encode_field` is `copy::encode_field` on one
//! typical value per column kind, reported per byte of JSON in.
//!
//! Run: `cargo bench --bench row_encoder` (a filter after `--` picks benches, e.g.
//! `cargo bench --bench row_encoder -- ingest/flights`). To compare a change, run
//! `cargo bench --bench row_encoder -- --save-baseline before` on the old code, then
//! `cargo bench --bench row_encoder -- --baseline before` on the new: criterion prints the
//! change of each figure and whether it is significant. To profile, run the bench binary
//! under `perf record -g` with `--bench --profile-time 10`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pgspool::copy::{self, ColumnKind, ElementKind};
use pgspool::rows::{self, BodyFormat, Invalid};
use pgspool::schema::TableSchema;

mod common;
use common::{column, flights_lines, flights_schema, table};

/// Rows in the big bodies: a typical `pgspool send` request.
const ROWS: usize = 1000;
/// The edge-case corpus, as accepted rows.
const EDGE_CASES: &str = include_str!("../tests/data/edge_cases/accept.ndjson");
/// Edge-case rows longer than this are left out of the body (the 100 kB string).
const EDGE_ROW_MAX: usize = 1024;

/// A request body, how it is laid out, and the schema of its table.
struct Input {
    name: &'static str,
    body: String,
    format: BodyFormat,
    rows: u64,
    schema: TableSchema,
}

/// The `edge_cases` table of `tests/data/edge_cases/schema.sql` as the catalog would give
/// it.
fn edge_cases_schema() -> TableSchema {
    let array = ColumnKind::Array {
        element: ElementKind::Scalar,
        delimiter: b',',
    };
    let kinds = [
        ("id", ColumnKind::Scalar),
        ("note", ColumnKind::Scalar),
        ("payload", ColumnKind::Jsonb),
        ("at", ColumnKind::Scalar),
        ("amount", ColumnKind::Scalar),
        ("big", ColumnKind::Scalar),
        ("ratio", ColumnKind::Scalar),
        ("flag", ColumnKind::Scalar),
        ("tags", array.clone()),
        ("ids", array),
        ("ref", ColumnKind::Scalar),
        ("raw", ColumnKind::Scalar),
        ("Mixed Case", ColumnKind::Scalar),
        ("select", ColumnKind::Scalar),
    ];
    TableSchema::new(
        table("edge_cases"),
        kinds
            .into_iter()
            .map(|(name, kind)| column(name, kind))
            .collect(),
    )
}

fn inputs() -> Vec<Input> {
    let flights = flights_lines(ROWS);
    let edge: Vec<&str> = EDGE_CASES
        .lines()
        .filter(|line| line.len() <= EDGE_ROW_MAX)
        .collect();
    let edge_body: String = edge
        .iter()
        .cycle()
        .take(ROWS)
        .flat_map(|line| [*line, "\n"])
        .collect();
    vec![
        Input {
            name: "flights_1000",
            body: flights.iter().flat_map(|l| [l.as_str(), "\n"]).collect(),
            format: BodyFormat::Ndjson,
            rows: ROWS as u64,
            schema: flights_schema(),
        },
        Input {
            name: "flights_1",
            body: flights[0].clone(),
            format: BodyFormat::Json,
            rows: 1,
            schema: flights_schema(),
        },
        Input {
            name: "edge_cases_1000",
            body: edge_body,
            format: BodyFormat::Ndjson,
            rows: ROWS as u64,
            schema: edge_cases_schema(),
        },
    ]
}

/// What the ingest handler does with a body once it is read and known to be UTF-8.
fn ingest(input: &Input) -> rows::Encoded {
    let parsed = rows::parse_each(&input.body, input.format).expect("the body parses");
    assert!(parsed.iter().all(Result::is_ok), "every row parses");
    rows::encode_parsed(
        input.schema.table(),
        Some(&input.schema),
        &parsed,
        Invalid::Reject,
    )
    .expect("every row encodes")
}

fn throughput(input: &Input) -> Throughput {
    Throughput::ElementsAndBytes {
        elements: input.rows,
        bytes: input.body.len() as u64,
    }
}

fn bodies(c: &mut Criterion) {
    let inputs = inputs();
    for input in &inputs {
        let encoded = ingest(input);
        let rows: u64 = encoded.groups.iter().map(|g| u64::from(g.0)).sum();
        assert_eq!(rows, input.rows, "{}: every row is encoded", input.name);
    }

    let mut group = c.benchmark_group("ingest");
    for input in &inputs {
        group.throughput(throughput(input));
        group.bench_with_input(
            BenchmarkId::from_parameter(input.name),
            input,
            |b, input| {
                b.iter(|| ingest(black_box(input)));
            },
        );
    }
    group.finish();

    let mut group = c.benchmark_group("parse");
    for input in &inputs {
        group.throughput(throughput(input));
        group.bench_with_input(
            BenchmarkId::from_parameter(input.name),
            input,
            |b, input| {
                b.iter(|| rows::parse_each(black_box(&input.body), input.format));
            },
        );
    }
    group.finish();

    let mut group = c.benchmark_group("encode");
    for input in &inputs {
        let parsed = rows::parse_each(&input.body, input.format).expect("the body parses");
        group.throughput(throughput(input));
        group.bench_with_input(
            BenchmarkId::from_parameter(input.name),
            &parsed,
            |b, parsed| {
                b.iter(|| {
                    rows::encode_parsed(
                        input.schema.table(),
                        Some(&input.schema),
                        black_box(parsed),
                        Invalid::Reject,
                    )
                });
            },
        );
    }
    group.finish();
}

fn fields(c: &mut Criterion) {
    let text_array = ColumnKind::Array {
        element: ElementKind::Scalar,
        delimiter: b',',
    };
    let jsonb_array = ColumnKind::Array {
        element: ElementKind::Jsonb,
        delimiter: b',',
    };
    let object = r#"{"a":[1,{"b":"x\ty"}],"c":null,"d":"\\N","e":"line\nbreak","n":12.50}"#;
    let long_text = EDGE_CASES
        .lines()
        .find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            let note = value.get("note")?.as_str()?;
            (note.len() > EDGE_ROW_MAX).then(|| serde_json::to_string(note).expect("a string"))
        })
        .expect("the edge cases hold a long string");
    let cases: Vec<(&str, &ColumnKind, String)> = vec![
        ("scalar/null", &ColumnKind::Scalar, "null".into()),
        ("scalar/integer", &ColumnKind::Scalar, "1545".into()),
        ("scalar/decimal", &ColumnKind::Scalar, "-12.375".into()),
        ("scalar/exponent", &ColumnKind::Scalar, "1.5e-7".into()),
        ("scalar/boolean", &ColumnKind::Scalar, "true".into()),
        ("scalar/text", &ColumnKind::Scalar, r#""N14228""#.into()),
        (
            "scalar/timestamptz",
            &ColumnKind::Scalar,
            r#""2013-01-01T10:00:00Z""#.into(),
        ),
        (
            "scalar/text_escapes",
            &ColumnKind::Scalar,
            r#""tab\there, line\nbreak, C:\\path, caf\u00e9 東京""#.into(),
        ),
        ("scalar/text_100k", &ColumnKind::Scalar, long_text),
        ("scalar/object", &ColumnKind::Scalar, object.into()),
        ("jsonb/object", &ColumnKind::Jsonb, object.into()),
        ("json/object", &ColumnKind::Json, object.into()),
        (
            "array/text",
            &text_array,
            r#"["a","b,c","d\"e","",null,"NULL"," spaced "]"#.into(),
        ),
        ("array/integer", &text_array, "[1,2,3,4,5,6,7,8]".into()),
        (
            "array/jsonb",
            &jsonb_array,
            r#"[{"k":1},{"k":[true,null]},"s"]"#.into(),
        ),
    ];
    let mut group = c.benchmark_group("encode_field");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let mut out = Vec::with_capacity(256 << 10);
    for (name, kind, raw) in &cases {
        copy::encode_field(kind, raw, &mut out).unwrap_or_else(|e| panic!("{name}: {e}"));
        group.throughput(Throughput::Bytes(raw.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), raw, |b, raw| {
            b.iter(|| {
                out.clear();
                copy::encode_field(kind, black_box(raw), &mut out)
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bodies, fields
}
criterion_main!(benches);
