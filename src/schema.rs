//! Table schemas: what columns a table has and how each is written in COPY text.
//!
//! Columns are read from PostgreSQL's catalog once per table and cached. The cache is kept
//! in the WAL directory (`schema-cache.json`, written crash-atomically), so a daemon that
//! restarts while PostgreSQL is down still validates requests. Entries are refreshed when a
//! request names a column the cache does not know.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;
use tracing::{info, warn};

use crate::copy::{ColumnKind, ElementKind};
use crate::fsutil;
use crate::table::TableName;

const CACHE_FILE: &str = "schema-cache.json";
/// After a failed connection, how long the catalog answers "unreachable" without trying
/// again, so requests do not each wait on a server that is down.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(1);

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// The column's name, exactly.
    pub name: String,
    /// How values are written (from the column's type).
    pub kind: ColumnKind,
    /// A generated column (`GENERATED ALWAYS AS (...)` or `GENERATED ALWAYS AS IDENTITY`):
    /// PostgreSQL computes it and an INSERT may not give it a value. (COPY would take one for
    /// an identity column; pgspool refuses it as an INSERT would.)
    #[serde(default)]
    pub generated: bool,
}

/// A table's resolved name and columns, in table order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SchemaData", into = "SchemaData")]
pub struct TableSchema {
    table: TableName,
    columns: Vec<Column>,
    by_name: HashMap<String, usize>,
}

#[derive(Serialize, Deserialize)]
struct SchemaData {
    table: TableName,
    columns: Vec<Column>,
}

impl From<SchemaData> for TableSchema {
    fn from(d: SchemaData) -> Self {
        TableSchema::new(d.table, d.columns)
    }
}

impl From<TableSchema> for SchemaData {
    fn from(s: TableSchema) -> Self {
        SchemaData {
            table: s.table,
            columns: s.columns,
        }
    }
}

impl TableSchema {
    /// A schema for `table` (schema-qualified) with `columns` in table order.
    #[must_use]
    pub fn new(table: TableName, columns: Vec<Column>) -> TableSchema {
        let by_name = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        TableSchema {
            table,
            columns,
            by_name,
        }
    }

    /// The table, schema-qualified as the catalog resolved it.
    #[must_use]
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The columns in table order.
    #[must_use]
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The position of the column named exactly `name`.
    #[must_use]
    pub fn position(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
}

/// pgspool's own schema in PostgreSQL (the watermarks): never a target of rows.
pub const OWN_SCHEMA: &str = "pgspool";

/// What the catalog says of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A table (plain, partitioned or foreign): its schema.
    Table(TableSchema),
    /// No relation of that name.
    Missing,
    /// One of pgspool's own tables (schema [`OWN_SCHEMA`]): never written through the API.
    Own,
    /// A relation COPY cannot load, such as a view or a sequence (`a view`, ...).
    NotATable(&'static str),
}

/// Reads what the catalog says of `table`.
///
/// # Errors
/// When the query fails.
pub async fn fetch(
    client: &impl GenericClient,
    table: &TableName,
) -> Result<Found, tokio_postgres::Error> {
    // Domains are resolved to their base type; arrays are recognised by their element type.
    const COLUMNS: &str = "
        SELECT n.nspname::text, c.relname::text, a.attname::text,
               a.attgenerated <> '' OR a.attidentity = 'a' AS generated,
               bt.oid::int8 AS type_oid, bt.typcategory = 'A' AS is_array,
               et.oid::int8 AS elem_oid, et.typdelim::text AS delim, c.relkind::text
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        JOIN pg_type t ON t.oid = a.atttypid
        JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
        LEFT JOIN pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A'";
    const JSON: i64 = 114;
    const JSONB: i64 = 3802;
    // A qualified name is looked up by its parts: `to_regclass` raises 42501 for a schema
    // this role may not use, and the catalog can be read all the same (the flusher then
    // holds the table, see `flush::load::check_table`). The search path skips such schemas.
    let rows = match &table.schema {
        Some(schema) => {
            let query =
                format!("{COLUMNS} WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum");
            client.query(&query, &[schema, &table.name]).await?
        }
        None => {
            let query = format!("{COLUMNS} WHERE c.oid = to_regclass($1) ORDER BY a.attnum");
            client.query(&query, &[&table.quoted()]).await?
        }
    };
    let Some(first) = rows.first() else {
        return Ok(Found::Missing);
    };
    // PostgreSQL's own catalogs: a client could otherwise name one and have its rows held
    // (and the WAL kept) until an operator dead-letters them.
    let schema: String = first.get(0);
    if matches!(schema.as_str(), "pg_catalog" | "information_schema")
        || schema.starts_with("pg_toast")
    {
        return Ok(Found::NotATable("a system catalog"));
    }
    let kind = match first.get::<_, String>(8).as_str() {
        "r" | "p" | "f" => None,
        "v" => Some("a view"),
        "m" => Some("a materialized view"),
        "S" => Some("a sequence"),
        "i" | "I" => Some("an index"),
        "c" => Some("a composite type"),
        _ => Some("not a table"),
    };
    if let Some(kind) = kind {
        return Ok(Found::NotATable(kind));
    }
    if first.get::<_, String>(0) == OWN_SCHEMA {
        return Ok(Found::Own);
    }
    let resolved = TableName {
        schema: Some(first.get(0)),
        name: first.get(1),
    };
    let columns = rows
        .iter()
        .map(|row| {
            let type_oid: i64 = row.get(4);
            let is_array: bool = row.get(5);
            let elem_oid: Option<i64> = row.get(6);
            let delim: Option<String> = row.get(7);
            let kind = match (type_oid, is_array) {
                (JSON, _) => ColumnKind::Json,
                (JSONB, _) => ColumnKind::Jsonb,
                (_, true) => ColumnKind::Array {
                    element: match elem_oid {
                        Some(JSON) => ElementKind::Json,
                        Some(JSONB) => ElementKind::Jsonb,
                        _ => ElementKind::Scalar,
                    },
                    delimiter: delim.and_then(|d| d.bytes().next()).unwrap_or(b','),
                },
                _ => ColumnKind::Scalar,
            };
            Column {
                name: row.get(2),
                kind,
                generated: row.get(3),
            }
        })
        .collect();
    Ok(Found::Table(TableSchema::new(resolved, columns)))
}

/// The schema cache, keyed by the table name as requests give it.
#[derive(Debug)]
pub struct SchemaCache {
    dir: PathBuf,
    tables: RwLock<HashMap<TableName, Arc<TableSchema>>>,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    tables: Vec<(TableName, TableSchema)>,
}

impl SchemaCache {
    /// Loads the cache kept in `dir`; a missing or unreadable file gives an empty cache
    /// (it is only a cache: the catalog is asked again).
    #[must_use]
    pub fn load(dir: &Path) -> SchemaCache {
        let path = dir.join(CACHE_FILE);
        let tables = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<CacheFile>(&bytes) {
                Ok(file) if file.version == 1 => file
                    .tables
                    .into_iter()
                    .map(|(k, v)| (k, Arc::new(v)))
                    .collect(),
                Ok(_) | Err(_) => {
                    warn!(file = %path.display(), "ignoring an unreadable schema cache");
                    HashMap::new()
                }
            },
            Err(_) => HashMap::new(),
        };
        SchemaCache {
            dir: dir.to_path_buf(),
            tables: RwLock::new(tables),
        }
    }

    /// The cached schema of `table`.
    #[must_use]
    pub fn get(&self, table: &TableName) -> Option<Arc<TableSchema>> {
        self.tables
            .read()
            .expect("schema cache lock poisoned")
            .get(table)
            .cloned()
    }

    /// Caches `schema` for `table` and saves the cache (failures to save are logged: the
    /// cache in memory stays right).
    pub async fn put(&self, table: &TableName, schema: TableSchema) -> Arc<TableSchema> {
        let schema = Arc::new(schema);
        let file = {
            let mut tables = self.tables.write().expect("schema cache lock poisoned");
            if tables.get(table) == Some(&schema) {
                return schema;
            }
            tables.insert(table.clone(), Arc::clone(&schema));
            let mut entries: Vec<_> = tables
                .iter()
                .map(|(k, v)| (k.clone(), TableSchema::clone(v)))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            CacheFile {
                version: 1,
                tables: entries,
            }
        };
        let dir = self.dir.clone();
        let saved = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec_pretty(&file).expect("the cache serializes");
            fsutil::write_atomic(&dir, CACHE_FILE, &bytes)
        })
        .await;
        match saved {
            Ok(Ok(())) => {
                info!(table = %table, columns = schema.columns().len(), "cached table columns")
            }
            Ok(Err(e)) => warn!(error = %e, "could not save the schema cache"),
            Err(e) => warn!(error = %e, "could not save the schema cache"),
        }
        schema
    }
}

/// Why the catalog could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("PostgreSQL cannot be reached: {0}")]
pub struct Unreachable(pub String);

/// Catalog look-ups for ingest, on a connection of its own made when first needed.
#[derive(Debug)]
pub struct Catalog {
    config: crate::pg::Target,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    down_until: std::sync::Mutex<Option<(Instant, String)>>,
}

impl Catalog {
    /// A catalog that connects to `config`.
    #[must_use]
    pub fn new(config: crate::pg::Target) -> Catalog {
        Catalog {
            config,
            client: tokio::sync::Mutex::new(None),
            down_until: std::sync::Mutex::new(None),
        }
    }

    /// Asks PostgreSQL's catalog about `table` (see [`fetch`]).
    ///
    /// # Errors
    /// [`Unreachable`] when PostgreSQL cannot be asked (also, for a second after a failed
    /// attempt, without trying again).
    pub async fn fetch(&self, table: &TableName) -> Result<Found, Unreachable> {
        if let Some((until, why)) = &*self.down_until.lock().expect("lock poisoned")
            && Instant::now() < *until
        {
            return Err(Unreachable(why.clone()));
        }
        let mut client = self.client.lock().await;
        let result = match client.as_ref().filter(|c| !c.is_closed()) {
            Some(c) => fetch(c, table).await,
            None => match crate::pg::connect(&self.config).await {
                Ok(c) => fetch(client.insert(c), table).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(schema) => Ok(schema),
            Err(e) => {
                let why = crate::pg::describe(&e);
                *client = None;
                *self.down_until.lock().expect("lock poisoned") =
                    Some((Instant::now() + UNREACHABLE_GRACE, why.clone()));
                Err(Unreachable(why))
            }
        }
    }
}
