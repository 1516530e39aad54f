//! Row groups: the payload of a WAL record, a group of rows for one table.
//!
//! Rows are stored the way the flusher needs them, so flushing copies bytes:
//!
//! ```text
//! u8   format       1 = COPY text, 2 = JSON (columns not known at ingest),
//!                   3 = refused rows (`?invalid=dead_letter`)
//! u16  schema_len   then the schema's UTF-8 bytes; 0 = unqualified
//! u16  name_len     then the table name's UTF-8 bytes
//! u16  columns      then per column: u16 len + UTF-8 bytes (COPY only; 0 otherwise)
//! body COPY:        rows as COPY text lines (tab-separated fields, `\N` for NULL), each
//!                   ending in '\n', for exactly the columns listed, in that order
//! body JSON:        rows as u32 length + one JSON object as the client sent it
//! body refused:     per row: u32 length + the row's text exactly as the client sent it
//!                   (not necessarily JSON), then u32 length + why pgspool refused it
//! ```
//! Integers are little-endian. A COPY group's table is the one the catalog resolved
//! (always schema-qualified); a JSON group keeps the name as the client wrote it and is
//! resolved and encoded by the flusher once PostgreSQL can be asked. A refused group names
//! the table as the request's other groups do (resolved when the columns were known, as
//! written otherwise); its rows go to `pgspool.dead_letters`, never to the table.

use crate::table::TableName;

/// Target size of one row group payload (1 MiB): requests are split into groups of about
/// this size so records stay small enough to batch flexibly.
pub const TARGET_GROUP_BYTES: usize = 1 << 20;

/// How the rows of a group are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// COPY text lines for a known column list.
    Copy,
    /// JSON objects whose columns were not known at ingest.
    Json,
    /// Rows pgspool's encoder refused, with the reason (`?invalid=dead_letter`): they are
    /// dead letters, never loaded into the table.
    Refused,
}

/// Builds one row group payload.
#[derive(Debug)]
pub struct RowGroupBuilder {
    buf: Vec<u8>,
    header_len: usize,
    rows: u32,
}

impl RowGroupBuilder {
    /// Starts a COPY group for `table` and `columns` (in the order each row's fields follow).
    #[must_use]
    pub fn copy(table: &TableName, columns: &[&str]) -> RowGroupBuilder {
        Self::start(RowFormat::Copy, table, columns)
    }

    /// Starts a JSON group for `table`.
    #[must_use]
    pub fn json(table: &TableName) -> RowGroupBuilder {
        Self::start(RowFormat::Json, table, &[])
    }

    /// Starts a group of refused rows for `table`.
    #[must_use]
    pub fn refused(table: &TableName) -> RowGroupBuilder {
        Self::start(RowFormat::Refused, table, &[])
    }

    fn start(format: RowFormat, table: &TableName, columns: &[&str]) -> RowGroupBuilder {
        let mut buf = Vec::with_capacity(256);
        buf.push(match format {
            RowFormat::Copy => 1,
            RowFormat::Json => 2,
            RowFormat::Refused => 3,
        });
        put_str(&mut buf, table.schema.as_deref().unwrap_or(""));
        put_str(&mut buf, &table.name);
        let count =
            u16::try_from(columns.len()).expect("PostgreSQL tables have at most 1600 columns");
        buf.extend_from_slice(&count.to_le_bytes());
        for column in columns {
            put_str(&mut buf, column);
        }
        let header_len = buf.len();
        RowGroupBuilder {
            buf,
            header_len,
            rows: 0,
        }
    }

    /// The buffer to append one COPY text row to (fields without the final newline); call
    /// [`end_copy_row`](Self::end_copy_row) after writing it, or
    /// [`abandon_row`](Self::abandon_row) to drop what was written.
    pub fn row_buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Ends the COPY row written into [`row_buf`](Self::row_buf).
    pub fn end_copy_row(&mut self) {
        self.buf.push(b'\n');
        self.rows += 1;
    }

    /// Appends one JSON object, as the client sent it.
    pub fn push_json_row(&mut self, object: &str) {
        put_json_row(&mut self.buf, object);
        self.rows += 1;
    }

    /// Appends one refused row: its text as the client sent it, and why it was refused.
    pub fn push_refused_row(&mut self, text: &str, reason: &str) {
        put_long_str(&mut self.buf, text);
        put_long_str(&mut self.buf, reason);
        self.rows += 1;
    }

    /// Drops bytes written after the last complete row.
    pub fn abandon_row(&mut self, row_start: usize) {
        self.buf.truncate(row_start);
    }

    /// Current payload length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the group holds no rows.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Takes the finished payload and starts an empty group with the same header.
    pub fn take(&mut self) -> (u32, Vec<u8>) {
        let header = self.buf[..self.header_len].to_vec();
        let rows = std::mem::take(&mut self.rows);
        (rows, std::mem::replace(&mut self.buf, header))
    }
}

/// Appends one JSON object to `body`, in a JSON group's body format (what [`json_rows`]
/// reads back).
pub fn put_json_row(body: &mut Vec<u8>, object: &str) {
    put_long_str(body, object);
}

/// A u32-length-prefixed string: a row, or a reason.
fn put_long_str(buf: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).expect("rows are bounded by the body limit");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("identifiers are at most 63 bytes");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// A decoded row group, borrowing the record payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowGroup<'a> {
    /// How the rows are stored.
    pub format: RowFormat,
    /// The target table.
    pub table: TableName,
    /// The column list of a COPY group (empty otherwise).
    pub columns: Vec<&'a str>,
    /// The rows (see the module docs).
    pub body: &'a [u8],
}

/// A payload that is not a row group. Record checksums make this a bug or a version
/// mismatch rather than disk damage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed row group: {0}")]
pub struct MalformedGroup(&'static str);

impl<'a> RowGroup<'a> {
    /// Decodes a record payload.
    ///
    /// # Errors
    /// [`MalformedGroup`] when the payload does not follow the format.
    pub fn decode(payload: &'a [u8]) -> Result<RowGroup<'a>, MalformedGroup> {
        let mut rest = payload;
        let format = match take(&mut rest, 1)? {
            [1] => RowFormat::Copy,
            [2] => RowFormat::Json,
            [3] => RowFormat::Refused,
            _ => return Err(MalformedGroup("unknown row format")),
        };
        let schema = take_str(&mut rest)?;
        let name = take_str(&mut rest)?;
        let count = u16::from_le_bytes(take(&mut rest, 2)?.try_into().expect("2 bytes"));
        let columns = (0..count)
            .map(|_| take_str(&mut rest))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RowGroup {
            format,
            table: TableName {
                schema: (!schema.is_empty()).then(|| schema.to_string()),
                name: name.to_string(),
            },
            columns,
            body: rest,
        })
    }

    /// The JSON objects of a JSON group.
    pub fn json_rows(&self) -> impl Iterator<Item = Result<&'a str, MalformedGroup>> + 'a {
        json_rows(self.body)
    }

    /// The rows of a refused group: each row's text and the reason it was refused.
    pub fn refused_rows(
        &self,
    ) -> impl Iterator<Item = Result<(&'a str, &'a str), MalformedGroup>> + 'a {
        refused_rows(self.body)
    }
}

/// The JSON objects of a JSON group's `body` (also the concatenated bodies of several). A
/// length that runs past the body's end is the last item.
pub fn json_rows(body: &[u8]) -> impl Iterator<Item = Result<&str, MalformedGroup>> {
    let mut rest = body;
    std::iter::from_fn(move || {
        (!rest.is_empty()).then(|| take_long_str(&mut rest, "a JSON row is not UTF-8"))
    })
}

/// The rows of a refused group's `body` (also the concatenated bodies of several): each
/// row's text as the client sent it, and why pgspool refused it. A length that runs past
/// the body's end is the last item.
pub fn refused_rows(body: &[u8]) -> impl Iterator<Item = Result<(&str, &str), MalformedGroup>> {
    let mut rest = body;
    std::iter::from_fn(move || {
        (!rest.is_empty()).then(|| {
            let text = take_long_str(&mut rest, "a refused row is not UTF-8")?;
            let reason = take_long_str(&mut rest, "a refusal reason is not UTF-8")?;
            Ok((text, reason))
        })
    })
}

fn take_long_str<'a>(
    rest: &mut &'a [u8],
    not_utf8: &'static str,
) -> Result<&'a str, MalformedGroup> {
    let len = u32::from_le_bytes(take(rest, 4)?.try_into().expect("4 bytes")) as usize;
    std::str::from_utf8(take(rest, len)?).map_err(|_| MalformedGroup(not_utf8))
}

/// The next `n` bytes of `rest`; when fewer remain, an error and nothing remains, so that
/// the row iterators end after it.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], MalformedGroup> {
    if rest.len() < n {
        *rest = &[];
        return Err(MalformedGroup("payload ends early"));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_str<'a>(rest: &mut &'a [u8]) -> Result<&'a str, MalformedGroup> {
    let len = u16::from_le_bytes(take(rest, 2)?.try_into().expect("2 bytes")) as usize;
    std::str::from_utf8(take(rest, len)?).map_err(|_| MalformedGroup("a name is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableName {
        TableName {
            schema: Some("public".into()),
            name: "t".into(),
        }
    }

    /// Found by the `wal_records` fuzz target: a row whose length runs past the end of
    /// the body gave "payload ends early" again at every call, so the rows never ended
    /// (a refused group's body under a JSON group's format byte, as the fuzzer wrote it).
    #[test]
    fn rows_end_after_a_length_past_the_end() {
        let payload: &[u8] =
            b"\x02\x00\x00\x0a\x00edge_cases\x00\x00$\x00\x00\x00{\"id\":1,\"note\":\
            \"tab\\there and\\ttwo\"},\x00\x00\x00{\"id:101,\"note\":\"nul \\u0000 byte\"}J\x00\
            \x00\x00line 1: column \"note\": text and jsonb cannot hold a NUL character \
            (\\u0000)\x13\x00\x00\x00{\"id\":107,\"nope\":1}?\x00\x00\x00line 7: column \"nope\" \
            does not exist in table public.edge_cases\x07\x00\x00\x00[1,2,3]3\x00\x00\x00line 8: a \
            row must be a JSON object";
        assert_eq!(payload.len(), 313);
        let group = RowGroup::decode(payload).expect("decode");
        assert_eq!(group.format, RowFormat::Json);
        let rows: Vec<_> = group.json_rows().take(100).collect();
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(rows[0], Ok(r#"{"id":1,"note":"tab\there and\ttwo"}"#));
        assert_eq!(rows[2], Err(MalformedGroup("payload ends early")));
        let refused: Vec<_> = group.refused_rows().take(100).collect();
        assert_eq!(
            refused.last(),
            Some(&Err(MalformedGroup("payload ends early")))
        );
        assert!(refused.len() < 100);
    }

    #[test]
    fn copy_group_round_trips_and_take_keeps_the_header() {
        let mut b = RowGroupBuilder::copy(&table(), &["a", "Mixed Case"]);
        b.row_buf().extend_from_slice(b"1\tx");
        b.end_copy_row();
        let start = b.len();
        b.row_buf().extend_from_slice(b"half a row");
        b.abandon_row(start);
        let (rows, payload) = b.take();
        assert_eq!(rows, 1);
        let g = RowGroup::decode(&payload).expect("decode");
        assert_eq!(g.format, RowFormat::Copy);
        assert_eq!(g.table, table());
        assert_eq!(g.columns, vec!["a", "Mixed Case"]);
        assert_eq!(g.body, b"1\tx\n");
        assert!(b.is_empty());
        let (_, next) = b.take();
        assert_eq!(RowGroup::decode(&next).expect("decode").body, b"");
    }

    #[test]
    fn json_group_round_trips() {
        let unqualified = TableName {
            schema: None,
            name: "t".into(),
        };
        let mut b = RowGroupBuilder::json(&unqualified);
        b.push_json_row(r#"{"a":1}"#);
        b.push_json_row("{\n\"b\": \"x\"}");
        let (rows, payload) = b.take();
        assert_eq!(rows, 2);
        let g = RowGroup::decode(&payload).expect("decode");
        assert_eq!(g.table, unqualified);
        let rows: Vec<_> = g.json_rows().collect::<Result<_, _>>().expect("rows");
        assert_eq!(rows, vec![r#"{"a":1}"#, "{\n\"b\": \"x\"}"]);
    }

    #[test]
    fn truncated_payloads_are_refused() {
        let mut b = RowGroupBuilder::json(&table());
        b.push_json_row("{}");
        let (_, payload) = b.take();
        for cut in 0..payload.len() {
            let ok = RowGroup::decode(&payload[..cut])
                .and_then(|g| g.json_rows().collect::<Result<Vec<_>, _>>());
            assert!(ok.is_err() || cut == payload.len() - 6, "cut at {cut}");
        }
    }

    #[test]
    fn refused_group_round_trips_text_and_reason() {
        let mut b = RowGroupBuilder::refused(&table());
        b.push_refused_row(
            "[1,2,3]",
            "line 2: a row must be a JSON object, found an array",
        );
        b.push_refused_row("{\"id\": ", "line 3: malformed JSON: EOF");
        b.push_refused_row("", "");
        let (rows, payload) = b.take();
        assert_eq!(rows, 3);
        let g = RowGroup::decode(&payload).expect("decode");
        assert_eq!(g.format, RowFormat::Refused);
        assert_eq!(g.table, table());
        assert!(g.columns.is_empty());
        let rows: Vec<_> = g.refused_rows().collect::<Result<_, _>>().expect("rows");
        assert_eq!(
            rows,
            vec![
                (
                    "[1,2,3]",
                    "line 2: a row must be a JSON object, found an array"
                ),
                ("{\"id\": ", "line 3: malformed JSON: EOF"),
                ("", ""),
            ]
        );
    }

    #[test]
    fn truncated_refused_groups_are_refused() {
        let mut b = RowGroupBuilder::refused(&table());
        b.push_refused_row("[1]", "why");
        let (_, payload) = b.take();
        let header = RowGroup::decode(&payload).expect("decode");
        let header_len = payload.len() - header.body.len();
        for cut in header_len..payload.len() {
            let rows: Result<Vec<_>, _> = refused_rows(&payload[header_len..cut]).collect();
            assert_eq!(
                rows.is_err(),
                cut > header_len,
                "cut at {cut} of {}",
                payload.len()
            );
        }
        let mut bad = payload.clone();
        let last = bad.len() - 1;
        bad[last] = 0xff;
        assert!(refused_rows(&bad[header_len..]).any(|r| r.is_err()));
    }
}
