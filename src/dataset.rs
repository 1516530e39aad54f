//! The bundled nycflights13 data set (five gzipped NDJSON tables and their
//! DDL, embedded in the binary) and an exact, PostgreSQL-side way to load and
//! compare it: [`load_reference`] loads rows without pgspool's own encoder,
//! and [`compare`] checks two tables row for row, so pgspool's output can be
//! held against an independent reference.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use flate2::read::MultiGzDecoder;
use futures::{SinkExt, Stream, StreamExt};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::table::quote_ident;

/// Size of the buffer between the gzip decoder and the decompressed text.
const READ_BUFFER: usize = 64 * 1024;
/// Size of the chunks of NDJSON sent to COPY.
const COPY_CHUNK: usize = 256 * 1024;
/// Chunks in flight between the decompressing thread and COPY.
const COPY_QUEUE: usize = 4;
/// `work_mem` for the query of [`compare`].
const COMPARE_WORK_MEM: &str = "64MB";

/// One table of the bundled data set.
///
/// Each line of its data is one JSON object whose keys are the column names
/// of the table of the same name in [`NYCFLIGHTS13_SCHEMA`]; a missing value
/// is JSON `null`.
#[derive(Debug, Clone, Copy)]
pub struct DataTable {
    /// Table name, as in [`NYCFLIGHTS13_SCHEMA`].
    pub name: &'static str,
    /// Exact number of rows (lines).
    pub rows: usize,
    /// The gzipped NDJSON file, embedded.
    gz: &'static [u8],
}

/// `&'static [u8]` of an embedded file that lives in a named static.
///
/// A const that holds `include_bytes!` directly (or a static `&[u8]` set to
/// it) carries its own copy of the bytes into every crate that uses the
/// const: measured three copies of the 10 MB flights file in one binary.
/// A reference to a static array is a reference to one symbol instead.
macro_rules! embed {
    ($path:literal) => {{
        static BYTES: [u8; include_bytes!($path).len()] = *include_bytes!($path);
        &BYTES
    }};
}

/// The five tables of nycflights13 (every flight that departed New York City
/// in 2013, with its weather, planes, airports and airlines), smallest first.
pub const NYCFLIGHTS13: [DataTable; 5] = [
    DataTable {
        name: "airlines",
        rows: 16,
        gz: embed!("../data/nycflights13/airlines.ndjson.gz"),
    },
    DataTable {
        name: "airports",
        rows: 1_458,
        gz: embed!("../data/nycflights13/airports.ndjson.gz"),
    },
    DataTable {
        name: "planes",
        rows: 3_322,
        gz: embed!("../data/nycflights13/planes.ndjson.gz"),
    },
    DataTable {
        name: "weather",
        rows: 26_115,
        gz: embed!("../data/nycflights13/weather.ndjson.gz"),
    },
    DataTable {
        name: "flights",
        rows: 336_776,
        gz: embed!("../data/nycflights13/flights.ndjson.gz"),
    },
];

/// DDL creating the five tables, unqualified (see [`create_tables`]).
pub const NYCFLIGHTS13_SCHEMA: &str = include_str!("../data/nycflights13/schema.sql");

impl DataTable {
    /// The table's rows as NDJSON lines (without the newline), streamed from
    /// the embedded gzip with bounded memory (a 64 KiB buffer and one line at
    /// a time). Blocking CPU work (flights, 100 MB of text: about 0.45 s
    /// with flate2 optimized, 1 s in an unoptimized build), so async code
    /// should iterate it on a blocking thread for the big tables; the
    /// iterator is `Send + 'static` for that purpose. An `Err` means the
    /// embedded data is corrupt.
    pub fn lines(&self) -> impl Iterator<Item = io::Result<String>> + Send + 'static {
        self.reader().lines()
    }

    /// The decompressed NDJSON text as a stream of bytes (each line ends
    /// with `\n`), for callers that split it themselves. Same properties as
    /// [`lines`](Self::lines).
    pub fn reader(&self) -> impl BufRead + Send + 'static {
        BufReader::with_capacity(READ_BUFFER, MultiGzDecoder::new(self.gz))
    }
}

/// Creates the five tables of [`NYCFLIGHTS13_SCHEMA`] in `schema` (an
/// unquoted name; created if it does not exist).
///
/// The DDL runs in one implicit transaction with `schema` as its local
/// `search_path`, so either all tables are created or none, and the
/// session's `search_path` is unchanged afterwards (if the client is inside
/// an explicit transaction, until that transaction ends). Fails if a table
/// already exists.
pub async fn create_tables(client: &Client, schema: &str) -> anyhow::Result<()> {
    let schema_q = quote_ident(schema);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema_q};\n\
             SET LOCAL search_path TO {schema_q};\n\
             {NYCFLIGHTS13_SCHEMA}"
        ))
        .await
        .with_context(|| format!("creating the nycflights13 tables in schema {schema_q}"))
}

/// Loads `table`'s bundled rows into `target` straight through PostgreSQL,
/// independently of pgspool's own encoder, and returns the number of rows
/// loaded.
///
/// `target` is a table name as it goes into SQL (qualified and quoted as
/// needed, e.g. `"ref"."flights"`) whose columns are those of `table` in
/// [`NYCFLIGHTS13_SCHEMA`]. The NDJSON text is COPYed verbatim into a
/// temporary `(j jsonb)` staging table ([`copy_into_staging`]), then
/// `jsonb_populate_record` turns each object into a row of `target`: values
/// are converted by PostgreSQL's own input functions, missing keys become
/// NULL and keys that are not columns are ignored. The staging table is
/// dropped again, also on error. `target` gets all rows or none (one
/// `INSERT ... SELECT`).
///
/// Decompression runs on a `tokio::task::spawn_blocking` thread, so this
/// needs a Tokio runtime (which `tokio_postgres` needs anyway). Memory use
/// is bounded by a few 256 KiB chunks. The COPY occupies the connection, so
/// run concurrent work on another client.
pub async fn load_reference(
    client: &Client,
    table: &DataTable,
    target: &str,
) -> anyhow::Result<u64> {
    static NEXT_STAGING: AtomicU64 = AtomicU64::new(0);
    let staging = quote_ident(&format!(
        "pgspool_reference_{}_{}",
        table.name,
        NEXT_STAGING.fetch_add(1, Ordering::Relaxed)
    ));
    client
        .batch_execute(&format!("CREATE TEMPORARY TABLE {staging} (j jsonb)"))
        .await
        .context("creating the staging table")?;
    let loaded = stage_and_insert(client, table, target, &staging).await;
    let dropped = client
        .batch_execute(&format!("DROP TABLE IF EXISTS {staging}"))
        .await;
    let rows = loaded.with_context(|| format!("loading reference {} into {target}", table.name))?;
    dropped.context("dropping the staging table")?;
    Ok(rows)
}

async fn stage_and_insert(
    client: &Client,
    table: &DataTable,
    target: &str,
    staging: &str,
) -> anyhow::Result<u64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(COPY_QUEUE);
    let mut reader = table.reader();
    let decompress = tokio::task::spawn_blocking(move || {
        loop {
            match read_chunk(&mut reader, COPY_CHUNK) {
                Ok(chunk) if chunk.is_empty() => return,
                chunk => {
                    let failed = chunk.is_err();
                    // A send error means the COPY failed and the receiver is
                    // gone; a read error is reported by the receiver.
                    if tx.blocking_send(chunk).is_err() || failed {
                        return;
                    }
                }
            }
        }
    });

    let chunks = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|chunk| chunk.context("decompressing the embedded data"));
    // Takes `rx` along: once it returns (also on error) the thread's sends fail and it ends.
    let mut copied = copy_into_staging(client, staging, chunks).await;
    if let Err(e) = decompress.await {
        copied = copied.and(Err(e).context("decompression thread failed"));
    }
    let copied = copied?;

    let inserted = client
        .execute(
            &format!(
                "INSERT INTO {target} SELECT r.* FROM {staging} AS s, \
                 LATERAL jsonb_populate_record(NULL::{target}, s.j) AS r"
            ),
            &[],
        )
        .await
        .context("inserting from the staging table")?;
    anyhow::ensure!(
        copied == inserted,
        "staged {copied} rows but inserted {inserted}"
    );
    Ok(inserted)
}

/// COPYs NDJSON text into `staging`, a table with a `j jsonb` column: each
/// line of `chunks` (concatenated; a line may span chunks) becomes one row,
/// its text as it is. Returns the number of rows COPYed.
///
/// The format is CSV whose quote and delimiter are the bytes 0x01 and 0x02,
/// which never occur in JSON text, so no line needs escaping. `staging` goes
/// into SQL as it is (quote it as needed). The COPY occupies the connection
/// until this returns.
///
/// # Errors
/// The first error of `chunks` (the COPY is then aborted, so `staging` gets
/// no rows), or when PostgreSQL refuses the COPY, for instance a line that is
/// not JSON.
pub async fn copy_into_staging(
    client: &Client,
    staging: &str,
    chunks: impl Stream<Item = anyhow::Result<Bytes>>,
) -> anyhow::Result<u64> {
    let sink = client
        .copy_in::<_, Bytes>(&format!(
            "COPY {staging} (j) FROM STDIN WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
        ))
        .await
        .context("starting COPY into the staging table")?;
    futures::pin_mut!(sink);
    futures::pin_mut!(chunks);
    while let Some(chunk) = chunks.next().await {
        // Returning early drops the sink unfinished, which aborts the COPY.
        sink.send(chunk?).await.context("sending COPY data")?;
    }
    sink.finish()
        .await
        .context("finishing COPY into the staging table")
}

/// Reads up to `size` bytes; an empty chunk means end of data.
fn read_chunk(reader: &mut impl Read, size: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(size);
    let mut filled = 0;
    while filled < size {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf.freeze())
}

/// Result of [`compare`]: row counts of both sides and the rows each side
/// has that the other lacks, counted with multiplicity (`EXCEPT ALL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Comparison {
    /// Rows on the left.
    pub left_rows: i64,
    /// Rows on the right.
    pub right_rows: i64,
    /// Rows of left `EXCEPT ALL` right.
    pub only_left: i64,
    /// Rows of right `EXCEPT ALL` left.
    pub only_right: i64,
}

impl Comparison {
    /// Whether both sides hold the same multiset of rows.
    pub fn is_equal(&self) -> bool {
        self.only_left == 0 && self.only_right == 0 && self.left_rows == self.right_rows
    }
}

impl fmt::Display for Comparison {
    /// `equal (336776 rows each)` or `differ: left 16 rows, right 15 rows;
    /// 1 only in left, 0 only in right`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_equal() {
            write!(f, "equal ({} rows each)", self.left_rows)
        } else {
            write!(
                f,
                "differ: left {} rows, right {} rows; {} only in left, {} only in right",
                self.left_rows, self.right_rows, self.only_left, self.only_right
            )
        }
    }
}

/// Compares two tables or queries with the same columns (same number, types
/// and order) exactly: row counts, and `EXCEPT ALL` in both directions.
///
/// `left` and `right` are anything that may follow `FROM`: a table name
/// (qualified and quoted as needed) or a parenthesized query, e.g.
/// `(SELECT carrier, name FROM ref.airlines)`. Equality is PostgreSQL's
/// (floats compared exactly, NULL equals NULL); column types need an
/// equality operator (`jsonb` does, `json` does not). One round trip, with
/// `work_mem` raised to 64 MB for that query only (`SET LOCAL`; inside an
/// explicit transaction, until it ends) so that `EXCEPT ALL` can hash in
/// memory.
pub async fn compare(client: &Client, left: &str, right: &str) -> anyhow::Result<Comparison> {
    // One implicit transaction (simple query protocol), so SET LOCAL applies
    // to the SELECT only. The default 4 MB work_mem makes each EXCEPT ALL
    // of flights an external sort; 64 MB lets it hash in memory, measured
    // 2.5 times faster.
    let sql = format!(
        "SET LOCAL work_mem = '{COMPARE_WORK_MEM}'; \
         SELECT \
           (SELECT count(*) FROM {left} AS l), \
           (SELECT count(*) FROM {right} AS r), \
           (SELECT count(*) FROM (SELECT * FROM {left} AS l EXCEPT ALL SELECT * FROM {right} AS r) AS d), \
           (SELECT count(*) FROM (SELECT * FROM {right} AS r EXCEPT ALL SELECT * FROM {left} AS l) AS d)"
    );
    let context = || format!("comparing {left} with {right}");
    let messages = client.simple_query(&sql).await.with_context(context)?;
    let row = messages
        .iter()
        .find_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .with_context(|| format!("{}: the query returned no row", context()))?;
    let count = |i: usize| -> anyhow::Result<i64> {
        let text = row.try_get(i)?.context("count(*) is NULL")?;
        text.parse()
            .with_context(|| format!("count(*) is {text:?}"))
    };
    Ok(Comparison {
        left_rows: count(0)?,
        right_rows: count(1)?,
        only_left: count(2)?,
        only_right: count(3)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_reads_well() {
        let same = Comparison {
            left_rows: 16,
            right_rows: 16,
            only_left: 0,
            only_right: 0,
        };
        assert!(same.is_equal());
        assert_eq!(same.to_string(), "equal (16 rows each)");
        let diff = Comparison {
            left_rows: 16,
            right_rows: 15,
            only_left: 1,
            only_right: 0,
        };
        assert!(!diff.is_equal());
        assert_eq!(
            diff.to_string(),
            "differ: left 16 rows, right 15 rows; 1 only in left, 0 only in right"
        );
    }

    /// A table of made-up data (the real ones cannot be built outside this
    /// module).
    fn made_up(name: &'static str, gz: Vec<u8>) -> DataTable {
        DataTable {
            name,
            rows: 0,
            gz: Box::leak(gz.into_boxed_slice()),
        }
    }

    fn gzip(text: &str) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap()
    }

    #[tokio::test]
    async fn bad_data_aborts_the_copy_cleanly() {
        let pg = crate::pgtemp::TempPostgres::start().expect("start");
        let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute("CREATE TABLE t (a int, b text)")
            .await
            .unwrap();

        // Lines arrive verbatim: JSON escapes (backslash, quote, tab), a comma,
        // non-ASCII; keys that are not columns are ignored.
        let good = made_up(
            "good",
            gzip("{\"a\":1,\"b\":\"x\\\\y \\\"q\\\" ,\\t é\"}\n{\"a\":null,\"c\":3}\n"),
        );
        assert_eq!(load_reference(&client, &good, "t").await.unwrap(), 2);
        let b: String = client
            .query_one("SELECT b FROM t WHERE a = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(b, "x\\y \"q\" ,\t é");

        let invalid_json = made_up("invalid_json", gzip("{\"a\":2}\n{\"a\":\n"));
        let err = load_reference(&client, &invalid_json, "t")
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("invalid input syntax for type json"),
            "{err:#}"
        );

        let mut truncated = gzip(&"{\"a\":3}\n".repeat(100_000));
        truncated.truncate(truncated.len() / 2);
        let corrupt = made_up("corrupt", truncated);
        let err = load_reference(&client, &corrupt, "t").await.unwrap_err();
        assert!(format!("{err:#}").contains("decompressing"), "{err:#}");

        // Nothing of the failed loads arrived, no staging table is left, and
        // the session still works.
        let rows: i64 = client
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 2);
        let staging: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_class WHERE relname LIKE 'pgspool_reference%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(staging, 0);
    }

    #[test]
    fn read_chunk_fills_and_ends() {
        let mut data: &[u8] = b"abcdefg";
        assert_eq!(
            read_chunk(&mut data, 4).unwrap(),
            Bytes::from_static(b"abcd")
        );
        assert_eq!(
            read_chunk(&mut data, 4).unwrap(),
            Bytes::from_static(b"efg")
        );
        assert!(read_chunk(&mut data, 4).unwrap().is_empty());
    }
}
