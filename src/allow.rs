//! `[tables]`: the tables, and optionally the columns, that clients may write (issue 7).
//!
//! Without the section every table is writable (but pgspool's own schema). With it, a
//! request for a table the list does not name, or a row with a column its entry does not
//! list, is refused whole with 403, before anything is stored and, for the table, before
//! any query to PostgreSQL. Entries name tables with their schema, as
//! [`TableName::parse`] reads them (`public.events`, `"My Schema"."odd""name"`), and a
//! request must name them the same way: an unqualified name would need PostgreSQL's search
//! path to be resolved, so it is refused with the entry it could mean.
//!
//! ```toml
//! [tables."public.events"]             # every column
//! [tables."audit.log"]
//! columns = ["at", "who", "what"]      # only these
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::rows::Parsed;
use crate::schema::OWN_SCHEMA;
use crate::table::{MAX_IDENTIFIER_BYTES, TableName};

/// One `[tables."schema.name"]` entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// The columns rows may name; absent for every column.
    columns: Option<Vec<String>>,
}

/// The `[tables]` allow-list, parsed: each table with the columns rows may name (`None`
/// for every column).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "BTreeMap<String, Entry>")]
pub struct AllowList {
    tables: BTreeMap<TableName, Option<Columns>>,
}

/// The columns an entry allows, shared by the requests that check them.
pub type Columns = Arc<HashSet<String>>;

/// Why a write is refused by the allow-list: HTTP 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The table is not listed.
    #[error(
        "table {table} is not in pgspool's [tables] allow-list{hint}; ask the operator to add \
         [tables.{key}] to the configuration"
    )]
    Table {
        /// The table as the request named it.
        table: String,
        /// Its `[tables]` key, quoted for TOML.
        key: String,
        /// A listed table the request may have meant, as `" (did you mean ...?)"`.
        hint: String,
    },
    /// A row names a column the table's entry does not list.
    #[error(
        "column {column:?} of table {table} is not in its [tables] entry's columns ({allowed}); \
         nothing of this request was stored"
    )]
    Column {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The columns allowed, sorted, comma-separated.
        allowed: String,
    },
}

impl TryFrom<BTreeMap<String, Entry>> for AllowList {
    type Error = String;

    fn try_from(entries: BTreeMap<String, Entry>) -> Result<AllowList, String> {
        if entries.is_empty() {
            return Err(
                "[tables] lists no table, so no write could be accepted: list the \
                        tables clients may write, or remove the section to allow every table"
                    .into(),
            );
        }
        let mut tables = BTreeMap::new();
        for (key, entry) in entries {
            let table = TableName::parse(&key).map_err(|e| format!("[tables.{key:?}]: {e}"))?;
            match table.schema.as_deref() {
                None => {
                    return Err(format!(
                        "[tables.{key:?}]: name the table with its schema, e.g. \"public.{key}\""
                    ));
                }
                Some(OWN_SCHEMA) => {
                    return Err(format!(
                        "[tables.{key:?}]: the {OWN_SCHEMA} schema holds pgspool's own tables, \
                         which clients never write"
                    ));
                }
                Some(_) => {}
            }
            let columns = match entry.columns {
                None => None,
                Some(columns) if columns.is_empty() => {
                    return Err(format!(
                        "[tables.{key:?}] columns is empty, so no row could be written: list \
                         the columns, or remove `columns` to allow every column"
                    ));
                }
                Some(columns) => {
                    if let Some(bad) = columns
                        .iter()
                        .find(|c| c.is_empty() || c.len() > MAX_IDENTIFIER_BYTES)
                    {
                        return Err(format!(
                            "[tables.{key:?}] columns: {bad:?} is not a column name (1 to \
                             {MAX_IDENTIFIER_BYTES} bytes)"
                        ));
                    }
                    let count = columns.len();
                    let set: HashSet<String> = columns.into_iter().collect();
                    if set.len() != count {
                        return Err(format!("[tables.{key:?}] columns names a column twice"));
                    }
                    Some(Arc::new(set))
                }
            };
            if tables.insert(table.clone(), columns).is_some() {
                return Err(format!("[tables]: {table} is listed twice"));
            }
        }
        Ok(AllowList { tables })
    }
}

/// As a list of `schema.name`, each with its columns if it lists some: what a reload logs.
impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.tables.iter().map(|(table, columns)| match columns {
                None => table.to_string(),
                Some(columns) => {
                    let mut names: Vec<&str> = columns.iter().map(String::as_str).collect();
                    names.sort_unstable();
                    format!("{table} ({})", names.join(", "))
                }
            }))
            .finish()
    }
}

impl AllowList {
    /// The columns rows for `table` may name (`None`: every column).
    ///
    /// # Errors
    /// [`Denied::Table`] when `table` is not listed (unqualified names never are).
    pub fn table(&self, table: &TableName) -> Result<Option<Columns>, Denied> {
        if let Some(columns) = self.tables.get(table) {
            return Ok(columns.clone());
        }
        let hint = self
            .tables
            .keys()
            .find(|listed| listed.name == table.name)
            .map(|listed| format!(" (did you mean {listed}?)"))
            .unwrap_or_default();
        Err(Denied::Table {
            table: table.to_string(),
            key: toml_key(table),
            hint,
        })
    }

    /// Checks that every parsed row of `rows` names only `allowed` columns.
    ///
    /// # Errors
    /// [`Denied::Column`] for the first column not allowed.
    pub fn check_columns(
        table: &TableName,
        allowed: &Columns,
        rows: &[Parsed<'_>],
    ) -> Result<(), Denied> {
        let found = rows
            .iter()
            .filter_map(|row| row.as_ref().ok())
            .flat_map(|row| row.fields.iter())
            .find(|(column, _)| !allowed.contains(column.as_ref()));
        match found {
            None => Ok(()),
            Some((column, _)) => {
                let mut names: Vec<&str> = allowed.iter().map(String::as_str).collect();
                names.sort_unstable();
                Err(Denied::Column {
                    table: table.to_string(),
                    column: column.to_string(),
                    allowed: names.join(", "),
                })
            }
        }
    }
}

/// `table` as a `[tables]` key in TOML: a basic string, or a literal one when the name holds
/// a double quote (`'"my.schema"."t"'`).
fn toml_key(table: &TableName) -> String {
    let name = table.to_string();
    if name.contains('"') && !name.contains('\'') {
        format!("'{name}'")
    } else {
        toml::Value::String(name).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::{BodyFormat, parse_each};

    fn list(toml_text: &str) -> Result<AllowList, String> {
        #[derive(Deserialize)]
        struct Wrapper {
            tables: AllowList,
        }
        toml::from_str::<Wrapper>(toml_text)
            .map(|w| w.tables)
            .map_err(|e| e.to_string())
    }

    fn name(text: &str) -> TableName {
        TableName::parse(text).expect("a table name")
    }

    #[test]
    fn listed_tables_are_allowed_exactly_as_named() {
        let allow = list(
            "[tables.\"public.events\"]\n\
             [tables.'\"My Schema\".\"odd\"\"name\"']\n\
             columns = [\"a\"]\n",
        )
        .expect("valid");
        assert_eq!(allow.table(&name("public.events")), Ok(None));
        assert_eq!(allow.table(&name("\"public\".\"events\"")), Ok(None));
        let columns = allow
            .table(&name("\"My Schema\".\"odd\"\"name\""))
            .expect("listed")
            .expect("columns");
        assert!(columns.contains("a"));
        assert_eq!(
            format!("{allow:?}"),
            r#"["My Schema.\"odd\"\"name\" (a)", "public.events"]"#
        );
        for refused in ["public.Events", "other.events", "public.other"] {
            assert!(allow.table(&name(refused)).is_err(), "{refused}");
        }
        let quoted = allow
            .table(&name("\"my.schema\".t"))
            .expect_err("not listed");
        assert!(
            quoted
                .to_string()
                .contains("add [tables.'\"my.schema\".t'] to the configuration"),
            "{quoted}"
        );
        let plain = allow.table(&name("public.other")).expect_err("not listed");
        assert!(
            plain.to_string().contains("add [tables.\"public.other\"]"),
            "{plain}"
        );
        let unqualified = allow.table(&name("events")).expect_err("unqualified");
        assert!(
            unqualified
                .to_string()
                .contains("did you mean public.events?"),
            "{unqualified}"
        );
    }

    #[test]
    fn entries_that_cannot_work_are_config_errors() {
        for (text, says) in [
            ("[tables]\n", "lists no table"),
            ("[tables.events]\n", "with its schema"),
            ("[tables.\"a.b.c\"]\n", "use name or schema.name"),
            ("[tables.\"pgspool.watermarks\"]\n", "pgspool's own tables"),
            ("[tables.\"public.t\"]\ncolumns = []\n", "columns is empty"),
            (
                "[tables.\"public.t\"]\ncolumns = [\"\"]\n",
                "is not a column name",
            ),
            (
                "[tables.\"public.t\"]\ncolumns = [\"a\", \"a\"]\n",
                "names a column twice",
            ),
            ("[tables.\"public.t\"]\ncolumn = [\"a\"]\n", "unknown field"),
            (
                "[tables.\"public.t\"]\n[tables.'\"public\".\"t\"']\n",
                "listed twice",
            ),
        ] {
            let error = list(text).expect_err(text);
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn a_row_with_a_column_not_listed_is_denied() {
        let allowed: Columns = Arc::new(["at".to_string(), "who".to_string()].into());
        let table = name("audit.log");
        let body = "{\"at\":1,\"who\":\"me\"}\n{\"who\":\"x\",\"what\":\"y\"}\n";
        let rows = parse_each(body, BodyFormat::Ndjson).expect("rows");
        let denied = AllowList::check_columns(&table, &allowed, &rows).expect_err("what");
        assert_eq!(
            denied.to_string(),
            "column \"what\" of table audit.log is not in its [tables] entry's columns (at, \
             who); nothing of this request was stored"
        );
        let rows = parse_each("{\"at\":1}\n", BodyFormat::Ndjson).expect("rows");
        assert_eq!(AllowList::check_columns(&table, &allowed, &rows), Ok(()));
    }
}
