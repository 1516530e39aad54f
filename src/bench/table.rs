//! The table of `pgspool bench`: `<schema>.flights`, the flights columns of the bundled
//! DDL with a unique `id bigint` first, and the SQL the scenarios write it with.

use anyhow::Context;
use tokio_postgres::Client;

use crate::dataset::NYCFLIGHTS13_SCHEMA;
use crate::table::quote_ident;

/// The bench's table, `<schema>.flights (id bigint NOT NULL, <the flights columns>)`,
/// without any index or key, so that a row loaded twice stays visible.
#[derive(Debug, Clone)]
pub struct BenchTable {
    /// The name as it goes into SQL, quoted.
    pub sql_name: String,
    /// The name as it goes into the request path, `schema.flights`.
    pub api_name: String,
    /// Each column's name and type (as `format_type` writes it), `id` first.
    pub columns: Vec<(String, String)>,
}

impl BenchTable {
    /// Creates the table in `schema` (which exists) and reads its columns back.
    ///
    /// # Errors
    /// When PostgreSQL refuses, or the bundled DDL has no flights table.
    pub async fn create(client: &Client, schema: &str) -> anyhow::Result<BenchTable> {
        let sql_name = format!("{}.{}", quote_ident(schema), quote_ident("flights"));
        client
            .batch_execute(&format!(
                "CREATE TABLE {sql_name} (id bigint NOT NULL, {})",
                flights_columns_ddl()?
            ))
            .await
            .with_context(|| format!("creating {sql_name}"))?;
        let rows = client
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
                 ORDER BY attnum",
                &[&sql_name],
            )
            .await
            .with_context(|| format!("reading the columns of {sql_name}"))?;
        Ok(BenchTable {
            api_name: format!("{schema}.flights"),
            sql_name,
            columns: rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        })
    }

    /// The quoted column names, comma-separated, in table order.
    pub fn column_list(&self) -> String {
        let names: Vec<String> = self.columns.iter().map(|(n, _)| quote_ident(n)).collect();
        names.join(", ")
    }

    /// `INSERT INTO t (columns) VALUES ($1::bigint, $2::integer, ...), (...)` for `rows`
    /// rows: every parameter is text, cast by PostgreSQL to the column's type.
    pub fn insert_sql(&self, rows: usize) -> String {
        let width = self.columns.len();
        let mut sql = format!(
            "INSERT INTO {} ({}) VALUES ",
            self.sql_name,
            self.column_list()
        );
        for row in 0..rows {
            sql.push_str(if row == 0 { "(" } else { ", (" });
            for (i, (_, ty)) in self.columns.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${}::{ty}", row * width + i + 1));
            }
            sql.push(')');
        }
        sql
    }
}

/// The column definitions of the flights table in the bundled DDL (between the
/// parentheses of its CREATE TABLE).
fn flights_columns_ddl() -> anyhow::Result<&'static str> {
    const START: &str = "CREATE TABLE flights (";
    let start = NYCFLIGHTS13_SCHEMA
        .find(START)
        .context("the bundled DDL has no flights table")?
        + START.len();
    let length = NYCFLIGHTS13_SCHEMA[start..]
        .find(");")
        .context("the bundled DDL's flights table does not end")?;
    Ok(&NYCFLIGHTS13_SCHEMA[start..start + length])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ddl_holds_the_flights_columns() {
        let ddl = flights_columns_ddl().unwrap();
        assert!(ddl.trim_start().starts_with("year"), "{ddl}");
        assert!(ddl.trim_end().ends_with("timestamptz NOT NULL"), "{ddl}");
    }

    #[test]
    fn inserts_cast_text_parameters() {
        let table = BenchTable {
            sql_name: "s.t".to_string(),
            api_name: "s.t".to_string(),
            columns: vec![("id".into(), "bigint".into()), ("b".into(), "text".into())],
        };
        assert_eq!(
            table.insert_sql(2),
            "INSERT INTO s.t (\"id\", \"b\") VALUES ($1::bigint, $2::text), ($3::bigint, $4::text)"
        );
    }
}
