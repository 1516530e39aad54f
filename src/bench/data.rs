//! The rows of `pgspool bench`: the bundled flights table with a unique `id bigint` first.
//!
//! Row `i` (from 1) is source line `(i - 1) % 336776` of flights with `"id": i` put first,
//! so any number of rows works and each has its own id. NDJSON request bodies are made
//! from the source lines while they are sent ([`Flights::ndjson`]). The COPY text of the
//! ceiling and the values of the INSERT scenarios come from the COPY text PostgreSQL
//! itself writes for the source rows (loaded once through `jsonb_populate_record`, as
//! [`crate::dataset::load_reference`] does), read before anything is timed and kept in
//! memory, with the id replaced per row. Only the source rows needed are read: memory is
//! at most about 100 MB of JSON and 45 MB of COPY text, whatever the number of rows.

use std::borrow::Cow;
use std::io::BufRead;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::StreamExt;
use tokio_postgres::Client;

use super::table::BenchTable;
use crate::dataset::{NYCFLIGHTS13, copy_into_staging};

/// Rows of the bundled flights table.
pub const SOURCE_ROWS: u64 = 336_776;
/// Size of the chunks of a COPY FROM STDIN, in bytes.
pub const COPY_CHUNK: usize = 256 * 1024;

/// Lines of one text, by their offsets.
#[derive(Debug, Default)]
struct Lines {
    text: String,
    /// Start of each line, then the end of the text.
    bounds: Vec<usize>,
}

impl Lines {
    fn new(text: String) -> Lines {
        let mut bounds = vec![0];
        bounds.extend(
            text.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        if bounds.last() != Some(&text.len()) {
            bounds.push(text.len());
        }
        Lines { text, bounds }
    }

    fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Line `k` (from 0), without its newline.
    fn get(&self, k: usize) -> &str {
        let line = &self.text[self.bounds[k]..self.bounds[k + 1]];
        line.strip_suffix('\n').unwrap_or(line)
    }
}

/// The source rows as JSON and as PostgreSQL's COPY text: the first
/// `min(rows needed, 336776)` lines of flights.
#[derive(Debug)]
pub struct Flights {
    json: Lines,
    copy: Lines,
}

impl Flights {
    /// Reads the bundled flights rows that `rows` rows need and gets their COPY text from
    /// PostgreSQL: the rows (with their ids) are staged as `jsonb` in a temporary table,
    /// and `COPY (SELECT r.* FROM staging, jsonb_populate_record(NULL::<table>, j) r
    /// ORDER BY r.id) TO STDOUT` writes them as the table would hold them.
    ///
    /// # Errors
    /// When PostgreSQL refuses, or the data is not what it should be.
    pub async fn load(client: &Client, table: &BenchTable, rows: u64) -> anyhow::Result<Flights> {
        let needed = rows.clamp(1, SOURCE_ROWS) as usize;
        let json = tokio::task::spawn_blocking(move || read_source(needed))
            .await
            .context("reading the flights data panicked")??;
        let staging = "pgspool_bench_staging";
        client
            .batch_execute(&format!("CREATE TEMPORARY TABLE {staging} (j jsonb)"))
            .await
            .context("creating the staging table")?;
        let copy = stage_and_copy_out(client, table, &json, staging).await;
        let dropped = client.batch_execute(&format!("DROP TABLE {staging}")).await;
        let copy = copy.context("getting PostgreSQL's COPY text of the flights rows")?;
        dropped.context("dropping the staging table")?;
        Ok(Flights { json, copy })
    }

    /// The NDJSON body of rows `first..=last` (ids from 1).
    pub fn ndjson(&self, first: u64, last: u64) -> Bytes {
        let mut body = String::with_capacity((last + 1 - first) as usize * 320);
        for id in first..=last {
            splice_id(id, self.json.get(self.source_index(id)), &mut body);
            body.push('\n');
        }
        Bytes::from(body)
    }

    /// Appends row `id`'s COPY text line, with its newline.
    pub fn push_copy_line(&self, id: u64, out: &mut Vec<u8>) {
        replace_id(self.copy.get(self.source_index(id)), id, out);
        out.push(b'\n');
    }

    /// Row `id`'s values as text, in column order (`None` for NULL), for INSERT.
    ///
    /// # Errors
    /// When its COPY text holds an escape other than those COPY writes.
    pub fn values(&self, id: u64) -> anyhow::Result<Vec<Option<Cow<'_, str>>>> {
        let line = self.copy.get(self.source_index(id));
        let mut values = vec![Some(Cow::Owned(id.to_string()))];
        for field in line.split('\t').skip(1) {
            values.push(decode_copy_field(field).map_err(|e| {
                anyhow::anyhow!("row {id}: {e} in the COPY text of its source row: {line:?}")
            })?);
        }
        Ok(values)
    }

    /// The index of row `id`'s source line: row `i` (from 1) is line `(i - 1) % 336776`
    /// (the lines read are the first ones, all of them when more rows are needed).
    fn source_index(&self, id: u64) -> usize {
        ((id - 1) % self.json.len() as u64) as usize
    }
}

/// The first `needed` lines of the flights NDJSON, each checked to be a JSON object's
/// text.
fn read_source(needed: usize) -> anyhow::Result<Lines> {
    let table = NYCFLIGHTS13
        .iter()
        .find(|t| t.name == "flights")
        .context("the bundled data has no flights table")?;
    let mut text = String::new();
    let mut reader = table.reader();
    for k in 0..needed {
        let start = text.len();
        let read = reader
            .read_line(&mut text)
            .context("decompressing the bundled flights data")?;
        ensure!(read > 0, "the bundled flights data ends after {k} lines");
        let line = text[start..].trim_end_matches('\n');
        ensure!(
            line.starts_with('{') && line.ends_with('}'),
            "line {} of the bundled flights data is not a JSON object",
            k + 1
        );
    }
    Ok(Lines::new(text))
}

async fn stage_and_copy_out(
    client: &Client,
    table: &BenchTable,
    json: &Lines,
    staging: &str,
) -> anyhow::Result<Lines> {
    let mut k = 0;
    let chunks = std::iter::from_fn(|| {
        if k == json.len() {
            return None;
        }
        let mut chunk = String::with_capacity(COPY_CHUNK + 4096);
        while k < json.len() && chunk.len() < COPY_CHUNK {
            splice_id(k as u64 + 1, json.get(k), &mut chunk);
            chunk.push('\n');
            k += 1;
        }
        Some(Ok(Bytes::from(chunk)))
    });
    copy_into_staging(client, staging, futures::stream::iter(chunks)).await?;

    let stream = client
        .copy_out(&format!(
            "COPY (SELECT r.* FROM {staging} AS s, \
             LATERAL jsonb_populate_record(NULL::{}, s.j) AS r ORDER BY r.id) TO STDOUT",
            table.sql_name
        ))
        .await
        .context("starting COPY TO STDOUT")?;
    futures::pin_mut!(stream);
    let mut bytes = Vec::new();
    while let Some(data) = stream.next().await {
        bytes.extend_from_slice(&data.context("reading COPY data")?);
    }
    let copy = Lines::new(String::from_utf8(bytes).context("COPY text is not UTF-8")?);
    ensure!(
        copy.len() == json.len(),
        "COPY TO wrote {} lines for {} rows",
        copy.len(),
        json.len()
    );
    for k in 0..copy.len() {
        let id = (k + 1).to_string();
        if copy.get(k).split('\t').next() != Some(id.as_str()) {
            bail!(
                "line {id} of the COPY text does not start with its id: {:?}",
                copy.get(k)
            );
        }
    }
    Ok(copy)
}

/// Appends `line` (a JSON object's text, starting with `{`) with `"id":id` as its first
/// member.
pub fn splice_id(id: u64, line: &str, out: &mut String) {
    let rest = line.strip_prefix('{').unwrap_or(line);
    out.push_str("{\"id\":");
    out.push_str(&id.to_string());
    if !rest.trim_start().starts_with('}') {
        out.push(',');
    }
    out.push_str(rest);
}

/// Appends the COPY text `line` with its first field replaced by `id`.
pub fn replace_id(line: &str, id: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(id.to_string().as_bytes());
    if let Some(tab) = line.find('\t') {
        out.extend_from_slice(&line.as_bytes()[tab..]);
    }
}

/// One field of COPY text as its value: `\N` is NULL, and the escapes COPY TO writes
/// (`\\`, `\b`, `\f`, `\n`, `\r`, `\t`, `\v`) are decoded.
///
/// # Errors
/// On any other backslash sequence (octal, hex, a lone backslash): COPY TO never writes
/// them, so a field holding one is not COPY's output.
pub fn decode_copy_field(field: &str) -> Result<Option<Cow<'_, str>>, String> {
    if field == "\\N" {
        return Ok(None);
    }
    if !field.contains('\\') {
        return Ok(Some(Cow::Borrowed(field)));
    }
    let mut value = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            value.push(c);
            continue;
        }
        value.push(match chars.next() {
            Some('\\') => '\\',
            Some('b') => '\u{8}',
            Some('f') => '\u{c}',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some('v') => '\u{b}',
            Some(other) => return Err(format!("an escape COPY does not write, \\{other}")),
            None => return Err("a backslash at the end of a field".to_string()),
        });
    }
    Ok(Some(Cow::Owned(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_spliced_first() {
        let mut out = String::new();
        splice_id(42, r#"{"year":2013,"carrier":"UA"}"#, &mut out);
        assert_eq!(out, r#"{"id":42,"year":2013,"carrier":"UA"}"#);
        out.clear();
        splice_id(7, "{ }", &mut out);
        assert_eq!(out, r#"{"id":7 }"#);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["id"], 7);
    }

    #[test]
    fn copy_lines_get_their_id_replaced() {
        let mut out = Vec::new();
        replace_id("17\t2013\t\\N\tUA", 336_777, &mut out);
        assert_eq!(out, b"336777\t2013\t\\N\tUA");
        out.clear();
        replace_id("17", 5, &mut out);
        assert_eq!(out, b"5");
    }

    #[test]
    fn copy_fields_are_decoded_or_refused() {
        assert_eq!(decode_copy_field("\\N"), Ok(None));
        assert_eq!(decode_copy_field("UA"), Ok(Some(Cow::Borrowed("UA"))));
        assert_eq!(decode_copy_field(""), Ok(Some(Cow::Borrowed(""))));
        assert_eq!(
            decode_copy_field("a\\\\b\\tc\\nd\\re\\bf\\fg\\vh")
                .unwrap()
                .unwrap(),
            "a\\b\tc\nd\re\u{8}f\u{c}g\u{b}h"
        );
        assert_eq!(decode_copy_field("\\\\N").unwrap().unwrap(), "\\N");
        assert!(decode_copy_field("\\101").is_err());
        assert!(decode_copy_field("\\x41").is_err());
        assert!(decode_copy_field("end\\").is_err());
    }

    #[test]
    fn lines_are_split_with_or_without_a_final_newline() {
        let lines = Lines::new("a\nbc\n".to_string());
        assert_eq!((lines.len(), lines.get(0), lines.get(1)), (2, "a", "bc"));
        let lines = Lines::new("a\nbc".to_string());
        assert_eq!((lines.len(), lines.get(1)), (2, "bc"));
    }

    #[test]
    fn rows_repeat_the_source() {
        let flights = Flights {
            json: Lines::new("{\"a\":1}\n{\"a\":2}\n".to_string()),
            copy: Lines::new("1\t1\n2\t2\n".to_string()),
        };
        assert_eq!(
            flights.ndjson(2, 3),
            "{\"id\":2,\"a\":2}\n{\"id\":3,\"a\":1}\n"
        );
        let mut line = Vec::new();
        flights.push_copy_line(4, &mut line);
        assert_eq!(line, b"4\t2\n");
        let values = flights.values(3).unwrap();
        assert_eq!(values, [Some(Cow::Borrowed("3")), Some(Cow::Borrowed("1"))]);
    }
}
