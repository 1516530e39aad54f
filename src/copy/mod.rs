//! One JSON value to one `COPY ... FROM STDIN` text-format field, stored exactly as PostgreSQL
//! 15's `jsonb_populate_record(NULL::tbl, row)` would store it.
//!
//! This owns the public API ([`ColumnKind`], [`ElementKind`], [`ValueError`], [`encode_field`],
//! [`check_value`], [`escape_text`]), COPY text escaping, the per-kind field encoding, and array
//! literals. Canonical numeric text lives in `numeric.rs`; JSON parsing and canonical `jsonb`
//! text live in `jsonb.rs`.
//!
//! Mirrors, in PostgreSQL 15: `src/backend/utils/adt/jsonfuncs.c` (`populate_record_field`,
//! `populate_scalar`, `populate_array`, `populate_array_dim_jsonb`), `src/backend/commands/copyto.c`
//! (`CopyAttributeOutText`) and `src/backend/utils/adt/arrayfuncs.c` (`array_in` quoting rules).
//!
//! Text reaches the field through a chain of `Sink`s (COPY escaping, array element quoting, JSON
//! string escaping), so no intermediate strings are built. A top-level string, number, boolean or
//! `null`, and any value for a `jsonb` column, are encoded without allocating at all; arrays and
//! objects for the other kinds are parsed into a tree that borrows from `raw` (allocating its
//! vectors, and strings that hold escapes).

mod jsonb;
mod numeric;

use jsonb::Node;

/// How a column's values are written, derived from its PostgreSQL type by the catalog code.
///
/// These follow the type categories of `populate_record_field` in PostgreSQL 15's
/// `src/backend/utils/adt/jsonfuncs.c` (scalar, array; `json` and `jsonb` are scalars there with
/// special cases in `populate_scalar`). Domains and composite types are not covered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ColumnKind {
    /// Any type read through its text input function (text, int, numeric, float, bool,
    /// timestamptz, uuid, bytea, ...): a JSON string gives its content, a number its canonical
    /// numeric text, a boolean `true`/`false`, an object or array its canonical `jsonb` text
    /// (`populate_scalar`).
    Scalar,
    /// `jsonb`: the value's JSON text is handed to `jsonb_in` (a string stays a JSON string, with
    /// its quotes).
    Jsonb,
    /// `json`: the value's canonical `jsonb` text (`JsonbToCString`), as `jsonb_populate_record`
    /// stores it.
    Json,
    /// An array type; `element` says how elements are written, `delimiter` is the element type's
    /// `typdelim` (`b','` for all but `box`, whose delimiter is `b';'`).
    Array {
        /// How each element is written.
        element: ElementKind,
        /// The byte between elements (`pg_type.typdelim` of the element type). It is written
        /// as is, so it must be an ASCII character that `array_in` does not treat specially
        /// (not `"`, `\`, `{`, `}` or whitespace), as every built-in `typdelim` is.
        delimiter: u8,
    },
}

/// How the elements of an array column are written (see [`ColumnKind`] for each kind's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ElementKind {
    /// Elements read through the element type's input function, written like [`ColumnKind::Scalar`].
    Scalar,
    /// `jsonb[]`: each element's canonical `jsonb` text (a string keeps its JSON quotes).
    Jsonb,
    /// `json[]`: each element's canonical `jsonb` text (a string keeps its JSON quotes).
    Json,
}

/// Why a value cannot be stored. The message is shown to the client (HTTP 422).
///
/// Each variant is a case where PostgreSQL would refuse the row (or, for [`ValueError::TooDeep`],
/// where this encoder refuses to recurse further).
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ValueError {
    /// A string or object key, at any depth, holds U+0000 (the `\u0000` escape). PostgreSQL's
    /// `text` and `jsonb` cannot hold it ("unsupported Unicode escape sequence").
    #[error("text and jsonb cannot hold a NUL character (\\u0000)")]
    Nul,
    /// A `\u` escape holds a UTF-16 surrogate that is not part of a high-low pair, which is not a
    /// character and which PostgreSQL refuses ("Unicode low surrogate must follow a high
    /// surrogate").
    #[error(
        "a \\u escape holds an unpaired UTF-16 surrogate (\\uD800-\\uDFFF must come as a high-low pair)"
    )]
    LoneSurrogate,
    /// A value for an array column is neither `null`, a JSON array, nor a string holding a
    /// PostgreSQL array literal (PostgreSQL says "expected JSON array", or for a string "malformed
    /// array literal").
    #[error(
        "expected a JSON array (or a string holding a PostgreSQL array literal such as \"{{a,b}}\")"
    )]
    ExpectedArray,
    /// Nested arrays of different lengths, or arrays mixed with non-arrays where the first element
    /// made a level of sub-arrays ("malformed JSON array" / "expected JSON array").
    #[error(
        "multidimensional arrays must be rectangular: the sub-arrays at each level must all be \
         arrays of the same length"
    )]
    RaggedArray,
    /// An array column value nested deeper than PostgreSQL's 6 array dimensions (`MAXDIM`).
    #[error("arrays can have at most 6 dimensions")]
    TooManyDimensions,
    /// A number that PostgreSQL's `numeric` cannot hold ("value overflows numeric format").
    #[error(
        "number out of range: PostgreSQL numeric holds at most 131072 digits before the decimal \
         point and 16383 after it"
    )]
    NumberOutOfRange,
    /// Arrays and objects nested deeper than this encoder follows (128 levels, as serde_json).
    #[error("JSON value is nested too deeply (more than 128 levels of arrays and objects)")]
    TooDeep,
    /// The text is not exactly one valid JSON value (callers normally pass only valid JSON).
    #[error("malformed JSON value")]
    Malformed,
}

/// Appends the COPY text field for one JSON value to `out` (no trailing tab or newline).
///
/// `raw` is the raw JSON text of one value exactly as it appeared in the request (JSON whitespace
/// around it is ignored). JSON `null` writes `\N` (SQL NULL) for every kind. What the other values
/// write depends on `kind`; see [`ColumnKind`]. The field assumes COPY's default text format:
/// tab delimiter, `\N` for NULL, UTF-8 client encoding.
///
/// The result is what PostgreSQL 15's `jsonb_populate_record(NULL::tbl, row)` stores
/// (`populate_record_field` in `src/backend/utils/adt/jsonfuncs.c`), written through
/// `CopyAttributeOutText`'s escaping. Whether a scalar type's input function accepts the text
/// (say, `"abc"` for an `int` column) is left to PostgreSQL, as it is there.
///
/// # Errors
/// Nothing is appended to `out` on error.
/// - [`ValueError::Nul`]: a `\u0000` in any string or key, for every kind.
/// - [`ValueError::LoneSurrogate`]: an unpaired surrogate `\u` escape.
/// - [`ValueError::NumberOutOfRange`]: any number in the value that `numeric` cannot hold.
/// - [`ValueError::ExpectedArray`], [`ValueError::RaggedArray`],
///   [`ValueError::TooManyDimensions`]: array columns only.
/// - [`ValueError::TooDeep`], [`ValueError::Malformed`]: the JSON itself.
pub fn encode_field(kind: &ColumnKind, raw: &str, out: &mut Vec<u8>) -> Result<(), ValueError> {
    let start = out.len();
    let result = encode(kind, raw, &mut CopyText(out));
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Whether `text` is exactly one JSON number (whatever its size: the limits of `numeric`
/// are [`encode_field`]'s to check).
pub(crate) fn is_json_number(text: &str) -> bool {
    match text.strip_prefix('-').unwrap_or(text).as_bytes() {
        // An integer without leading zeros, the common case, needs no full parse.
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] if rest.iter().all(u8::is_ascii_digit) => true,
        _ => !matches!(numeric::parse(text), Err(ValueError::Malformed)),
    }
}

/// Checks a value whose column type is not known yet: refuses what no column could store.
///
/// These are the errors that PostgreSQL raises while reading the row as `jsonb`, before any column
/// type is looked at (`jsonb_in` in `src/backend/utils/adt/jsonb.c`).
///
/// # Errors
/// [`ValueError::Nul`] for a `\u0000` in any string or key at any depth,
/// [`ValueError::LoneSurrogate`], [`ValueError::NumberOutOfRange`], [`ValueError::TooDeep`] and
/// [`ValueError::Malformed`], as for [`encode_field`].
pub fn check_value(raw: &str) -> Result<(), ValueError> {
    jsonb::validate(raw)
}

/// Appends `s` to `out` escaped for COPY text format, as PostgreSQL 15's `CopyAttributeOutText`
/// does with the default tab delimiter: `\` becomes `\\`, and backspace, form feed, newline,
/// carriage return, tab and vertical tab become `\b`, `\f`, `\n`, `\r`, `\t`, `\v`. Every other
/// character, including other control characters and non-ASCII, is copied as is. The strings `\N`
/// and `\.` therefore come out as `\\N` and `\\.`, never as NULL or end-of-data.
///
/// `s` must not contain U+0000: COPY text cannot carry it and PostgreSQL would refuse the row.
pub fn escape_text(s: &str, out: &mut Vec<u8>) {
    escape_bytes(s.as_bytes(), out);
}

/// [`escape_text`] on bytes.
fn escape_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    // Most text has nothing to escape: one pass the compiler vectorizes, then one copy.
    if !bytes.iter().any(|&b| b == b'\\' || b <= 0x0d) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped = match b {
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            0x0b => b'v',
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(&[b'\\', escaped]);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}

/// The fields of one COPY text `line` (without its newline) as a JSON object of
/// `columns` to their text (`null` for `\N`): how a row stored as COPY text is shown in
/// `pgspool.dead_letters`. Undoes [`escape_text`], and the octal and hex escapes COPY also
/// reads; a line with more or fewer fields than columns keeps the extra fields under
/// numbered keys or leaves the missing columns out.
#[must_use]
pub fn line_to_json(line: &[u8], columns: &[String]) -> String {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut object = serde_json::Map::new();
    if columns.is_empty() {
        return "{}".to_string();
    }
    for (i, field) in line.split(|&b| b == b'\t').enumerate() {
        let key = columns
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("field {}", i + 1));
        let value = if field == b"\\N" {
            serde_json::Value::Null
        } else {
            serde_json::Value::String(String::from_utf8_lossy(&unescape(field)).into_owned())
        };
        object.insert(key, value);
    }
    serde_json::Value::Object(object).to_string()
}

/// Undoes COPY text escaping in one field (PostgreSQL's `CopyReadAttributesText`).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' || i == field.len() {
            out.push(b);
            continue;
        }
        let c = field[i];
        i += 1;
        match c {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut value = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((value & 0xff) as u8);
            }
            b'x' if field.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut value = 0u8;
                for _ in 0..2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            value = value * 16 + d as u8;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(value);
            }
            other => out.push(other),
        }
    }
    out
}

/// Somewhere text is written to, possibly escaping it on the way.
pub(crate) trait Sink {
    /// Appends `s`.
    fn push(&mut self, s: &str);
}

impl Sink for String {
    fn push(&mut self, s: &str) {
        self.push_str(s);
    }
}

/// Writes into a COPY text field, escaping everything pushed ([`escape_text`]).
struct CopyText<'a>(&'a mut Vec<u8>);

impl Sink for CopyText<'_> {
    fn push(&mut self, s: &str) {
        escape_text(s, self.0);
    }
}

impl CopyText<'_> {
    /// Appends one byte, escaped (used for an array delimiter, which need not be ASCII).
    fn push_byte(&mut self, b: u8) {
        escape_bytes(&[b], self.0);
    }
}

/// Writes the inside of a double-quoted array element: `"` and `\` get a backslash (`array_in`
/// treats a backslash inside quotes as quoting the next character), then everything goes on to
/// the inner sink.
struct ArrayQuoted<'a, S: Sink + ?Sized>(&'a mut S);

impl<S: Sink + ?Sized> Sink for ArrayQuoted<'_, S> {
    fn push(&mut self, s: &str) {
        let mut run = 0;
        for (i, b) in s.bytes().enumerate() {
            if b == b'"' || b == b'\\' {
                self.0.push(&s[run..i]);
                self.0.push("\\");
                run = i;
            }
        }
        self.0.push(&s[run..]);
    }
}

/// Writes decoded text as the body of a JSON string, escaped like `escape_json`.
struct JsonStringBody<'a, S: Sink + ?Sized>(&'a mut S);

impl<S: Sink + ?Sized> Sink for JsonStringBody<'_, S> {
    fn push(&mut self, s: &str) {
        jsonb::write_json_string_body(s, self.0);
    }
}

/// What the first byte of a trimmed value says it is.
enum Top<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number token (checked).
    Number(numeric::Numeric<'a>),
    /// A string: its raw body between the quotes (escapes not yet checked).
    String(&'a str),
    /// An array (`[`) or object (`{`): needs the full parser.
    Container,
}

/// Trims JSON whitespace and classifies a top-level value, checking everything but containers and
/// string bodies.
fn classify(raw: &str) -> Result<(&str, Top<'_>), ValueError> {
    let text = raw.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    let top = match text.as_bytes().first() {
        Some(b'"') => {
            let end = jsonb::string_end(text.as_bytes(), 1)?;
            if end + 1 != text.len() {
                return Err(ValueError::Malformed);
            }
            Top::String(&text[1..end])
        }
        Some(b'-' | b'0'..=b'9') => Top::Number(numeric::parse(text)?),
        Some(b'[' | b'{') => Top::Container,
        _ => match text {
            "null" => Top::Null,
            "true" => Top::Bool(true),
            "false" => Top::Bool(false),
            _ => return Err(ValueError::Malformed),
        },
    };
    Ok((text, top))
}

/// Writes the field for `raw` to `sink`, which does the COPY escaping.
fn encode(kind: &ColumnKind, raw: &str, sink: &mut CopyText<'_>) -> Result<(), ValueError> {
    let (text, top) = classify(raw)?;
    match (kind, top) {
        (_, Top::Null) => {
            // Written unescaped: `\N` is COPY's NULL marker.
            sink.0.extend_from_slice(b"\\N");
            Ok(())
        }

        // Top-level strings: the hot path, decoded straight into the field.
        (ColumnKind::Scalar, Top::String(body)) => jsonb::decode_string(body, sink),
        (ColumnKind::Json, Top::String(body)) => {
            sink.push("\"");
            jsonb::decode_string(body, &mut JsonStringBody(sink))?;
            sink.push("\"");
            Ok(())
        }
        (ColumnKind::Jsonb, Top::String(body)) => {
            jsonb::decode_string(body, &mut Discard)?;
            sink.push(text);
            Ok(())
        }
        (ColumnKind::Array { .. }, Top::String(body)) => write_array_literal_string(body, sink),

        // Numbers and booleans (already checked by `classify`).
        (ColumnKind::Scalar | ColumnKind::Json, Top::Number(n)) => {
            if n.is_canonical(text) {
                // Digits (and a sign) only: nothing to escape.
                sink.0.extend_from_slice(text.as_bytes());
            } else {
                n.write_to(sink);
            }
            Ok(())
        }
        (ColumnKind::Scalar | ColumnKind::Json, Top::Bool(b)) => {
            sink.push(if b { "true" } else { "false" });
            Ok(())
        }
        (ColumnKind::Jsonb, Top::Number(_) | Top::Bool(_)) => {
            sink.push(text);
            Ok(())
        }
        (ColumnKind::Array { .. }, Top::Number(_) | Top::Bool(_)) => Err(ValueError::ExpectedArray),

        // Arrays and objects.
        (ColumnKind::Scalar | ColumnKind::Json, Top::Container) => {
            // Both print canonical jsonb text for a container.
            jsonb::write_canonical(&jsonb::parse(text)?, sink);
            Ok(())
        }
        (ColumnKind::Jsonb, Top::Container) => {
            // jsonb_in reads the text itself; it only has to be acceptable to it.
            jsonb::validate(text)?;
            sink.push(text);
            Ok(())
        }
        (ColumnKind::Array { element, delimiter }, Top::Container) => match jsonb::parse(text)? {
            node @ Node::Array(_) => write_array(&node, *element, *delimiter, sink),
            _ => Err(ValueError::ExpectedArray),
        },
    }
}

/// A sink that discards everything (decoding into it only checks a string).
pub(crate) struct Discard;

impl Sink for Discard {
    fn push(&mut self, _: &str) {}
}

/// Writes a value's text as a scalar type's input function receives it (`populate_scalar`):
/// string content, canonical number, `true`/`false`, canonical `jsonb` text of a container.
/// `null` is the caller's business (it is SQL NULL); written here it would be `null`.
fn write_scalar_text<S: Sink + ?Sized>(node: &Node<'_>, sink: &mut S) {
    match node {
        Node::String(s) => sink.push(s),
        other => jsonb::write_canonical(other, sink),
    }
}

/// A JSON string for an array column: PostgreSQL hands its content to `array_in`
/// (`populate_record_field` turns a string into a scalar for array types). Content that cannot
/// start an array literal (`{`, or `[` dimension decoration, after `array_in`'s whitespace) is
/// refused here; whether the rest parses is left to `array_in`, as for any scalar type.
fn write_array_literal_string(body: &str, sink: &mut CopyText<'_>) -> Result<(), ValueError> {
    // Decode once to check it (and to see its first character), then again into the field:
    // strings for array columns are rare, and this avoids allocating.
    let mut first = FirstNonSpace(None);
    jsonb::decode_string(body, &mut first)?;
    match first.0 {
        Some(b'{' | b'[') => jsonb::decode_string(body, sink),
        _ => Err(ValueError::ExpectedArray),
    }
}

/// Remembers the first byte pushed that is not whitespace as `array_in` skips it
/// (`scanner_isspace`: space, tab, LF, CR, vertical tab, form feed).
struct FirstNonSpace(Option<u8>);

impl Sink for FirstNonSpace {
    fn push(&mut self, s: &str) {
        if self.0.is_none() {
            self.0 = s
                .bytes()
                .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c));
        }
    }
}

/// PostgreSQL's `MAXDIM`: the most dimensions an array can have.
const MAX_DIMENSIONS: usize = 6;

/// Writes a JSON array as a PostgreSQL array literal (`populate_array_dim_jsonb`).
///
/// The number of dimensions is fixed by following first elements down while they are arrays (an
/// empty array or a non-array first element ends the chain). Above that level every item must be
/// an array, and sibling sub-arrays must have equal lengths; at that level every item is an
/// element, arrays included (they are written as their `jsonb` text, as PostgreSQL does). An
/// array with no elements at all is `{}`, whatever its nesting.
fn write_array(
    node: &Node<'_>,
    element: ElementKind,
    delimiter: u8,
    sink: &mut CopyText<'_>,
) -> Result<(), ValueError> {
    let mut ndims = 1;
    let mut first = node;
    while let Node::Array(items) = first {
        match items.first() {
            Some(next @ Node::Array(_)) => {
                ndims += 1;
                first = next;
            }
            _ => break,
        }
    }
    if ndims > MAX_DIMENSIONS {
        return Err(ValueError::TooManyDimensions);
    }
    let mut dims = [None; MAX_DIMENSIONS];
    check_shape(node, 0, ndims, &mut dims)?;
    if dims[..ndims].contains(&Some(0)) {
        sink.push("{}");
        return Ok(());
    }
    write_array_level(node, 0, ndims, element, delimiter, sink)
}

/// Checks that `node` (an array at dimension `level`, 0-based) and everything below it is
/// rectangular, recording each dimension's length in `dims`.
fn check_shape(
    node: &Node<'_>,
    level: usize,
    ndims: usize,
    dims: &mut [Option<usize>; MAX_DIMENSIONS],
) -> Result<(), ValueError> {
    let Node::Array(items) = node else {
        return Err(ValueError::RaggedArray);
    };
    match dims[level] {
        None => dims[level] = Some(items.len()),
        Some(n) if n != items.len() => return Err(ValueError::RaggedArray),
        Some(_) => {}
    }
    if level + 1 < ndims {
        for item in items {
            check_shape(item, level + 1, ndims, dims)?;
        }
    }
    Ok(())
}

/// Writes one level of a (checked, rectangular, non-empty) array literal.
fn write_array_level(
    node: &Node<'_>,
    level: usize,
    ndims: usize,
    element: ElementKind,
    delimiter: u8,
    sink: &mut CopyText<'_>,
) -> Result<(), ValueError> {
    // `check_shape` has made sure this is an array; the error cannot happen.
    let Node::Array(items) = node else {
        return Err(ValueError::RaggedArray);
    };
    sink.push("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            sink.push_byte(delimiter);
        }
        if level + 1 < ndims {
            write_array_level(item, level + 1, ndims, element, delimiter, sink)?;
        } else {
            write_array_element(item, element, sink);
        }
    }
    sink.push("}");
    Ok(())
}

/// Writes one array element: unquoted `NULL` for JSON null, otherwise the element's text in
/// double quotes (always quoting sidesteps `array_in`'s rules for whitespace, `NULL`, braces and
/// delimiters).
fn write_array_element(item: &Node<'_>, element: ElementKind, sink: &mut CopyText<'_>) {
    if let Node::Null = item {
        sink.push("NULL");
        return;
    }
    sink.push("\"");
    let mut quoted = ArrayQuoted(sink);
    match element {
        ElementKind::Scalar => write_scalar_text(item, &mut quoted),
        ElementKind::Json | ElementKind::Jsonb => jsonb::write_canonical(item, &mut quoted),
    }
    sink.push("\"");
}

#[cfg(test)]
mod tests;
