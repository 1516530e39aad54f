//! Setup shared by the criterion benches (`mod common;` in each): the bundled flights
//! rows, the schema of their table, and criterion's settings.
//!
//! It lives in `common/mod.rs`, not `common.rs`, because Cargo takes every `.rs` file
//! directly in `benches/` for a bench target of its own.

use std::time::Duration;

use criterion::Criterion;
use pgspool::copy::ColumnKind;
use pgspool::dataset::NYCFLIGHTS13;
use pgspool::schema::{Column, TableSchema};
use pgspool::table::TableName;

/// `public.<name>`.
pub fn table(name: &str) -> TableName {
    TableName {
        schema: Some("public".into()),
        name: name.into(),
    }
}

/// A column that is not generated.
pub fn column(name: &str, kind: ColumnKind) -> Column {
    Column {
        name: name.into(),
        kind,
        generated: false,
    }
}

/// The `flights` table of `data/nycflights13/schema.sql` as the catalog would give it:
/// integers, text and a timestamptz, all scalars.
pub fn flights_schema() -> TableSchema {
    let columns = [
        "year",
        "month",
        "day",
        "dep_time",
        "sched_dep_time",
        "dep_delay",
        "arr_time",
        "sched_arr_time",
        "arr_delay",
        "carrier",
        "flight",
        "tailnum",
        "origin",
        "dest",
        "air_time",
        "distance",
        "hour",
        "minute",
        "time_hour",
    ];
    TableSchema::new(
        table("flights"),
        columns
            .iter()
            .map(|name| column(name, ColumnKind::Scalar))
            .collect(),
    )
}

/// The first `n` lines of the bundled flights data, without their newlines.
pub fn flights_lines(n: usize) -> Vec<String> {
    let flights = NYCFLIGHTS13
        .iter()
        .find(|t| t.name == "flights")
        .expect("the bundled data has flights");
    flights
        .lines()
        .take(n)
        .collect::<Result<_, _>>()
        .expect("the bundled data decompresses")
}

/// Criterion's settings for every bench: 0.5 s of warm-up and 2 s of measurement unless a
/// group sets its own.
pub fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}
