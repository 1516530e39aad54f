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
    let text = raw.trim_matches([' ', '\t', '\n', '\r']);
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
            n.write_to(sink);
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL_KINDS: [ColumnKind; 8] = [
        ColumnKind::Scalar,
        ColumnKind::Jsonb,
        ColumnKind::Json,
        ColumnKind::Array {
            element: ElementKind::Scalar,
            delimiter: b',',
        },
        ColumnKind::Array {
            element: ElementKind::Jsonb,
            delimiter: b',',
        },
        ColumnKind::Array {
            element: ElementKind::Json,
            delimiter: b',',
        },
        ColumnKind::Array {
            element: ElementKind::Scalar,
            delimiter: b';',
        },
        ColumnKind::Array {
            element: ElementKind::Json,
            delimiter: b';',
        },
    ];

    const TEXT_ARRAY: ColumnKind = ColumnKind::Array {
        element: ElementKind::Scalar,
        delimiter: b',',
    };

    /// The field bytes for `raw`, as a string (every field is UTF-8).
    fn enc(kind: &ColumnKind, raw: &str) -> Result<String, ValueError> {
        let mut out = b"prefix|".to_vec();
        let result = encode_field(kind, raw, &mut out);
        match result {
            Ok(()) => {
                let field = out.split_off(7);
                assert_eq!(out, b"prefix|", "existing bytes kept");
                Ok(String::from_utf8(field).expect("fields are UTF-8"))
            }
            Err(e) => {
                assert_eq!(out, b"prefix|", "nothing appended on error");
                Err(e)
            }
        }
    }

    fn ok(kind: &ColumnKind, raw: &str) -> String {
        enc(kind, raw).unwrap_or_else(|e| panic!("{kind:?} {raw}: {e}"))
    }

    /// Reverses COPY text escaping the way COPY FROM reads a field; `None` is SQL NULL.
    fn unescape_copy(field: &str) -> Option<String> {
        if field == "\\N" {
            return None;
        }
        let mut out = String::new();
        let mut chars = field.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                assert!(c != '\n' && c != '\r' && c != '\t', "raw {c:?} in field");
                out.push(c);
                continue;
            }
            match chars.next().expect("no lone trailing backslash") {
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'v' => out.push('\u{b}'),
                '\\' => out.push('\\'),
                other => panic!("unexpected escape \\{other} in {field:?}"),
            }
        }
        Some(out)
    }

    /// Reads a one-dimensional array literal whose elements are all quoted or `NULL`, as
    /// `array_in` would.
    fn parse_array_literal(lit: &str, delimiter: char) -> Vec<Option<String>> {
        let inner = lit
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .expect("braces");
        let mut items = Vec::new();
        let mut chars = inner.chars().peekable();
        while chars.peek().is_some() {
            if chars.peek() == Some(&'N') {
                let word: String = chars.by_ref().take(4).collect();
                assert_eq!(word, "NULL");
                items.push(None);
            } else {
                assert_eq!(chars.next(), Some('"'));
                let mut s = String::new();
                loop {
                    match chars.next().expect("closing quote") {
                        '"' => break,
                        '\\' => s.push(chars.next().expect("escaped char")),
                        c => s.push(c),
                    }
                }
                items.push(Some(s));
            }
            match chars.next() {
                None => break,
                Some(c) => assert_eq!(c, delimiter),
            }
        }
        items
    }

    #[test]
    fn null_is_sql_null_for_every_kind() {
        for kind in &ALL_KINDS {
            assert_eq!(ok(kind, "null"), "\\N");
            assert_eq!(ok(kind, " \n null\t"), "\\N");
        }
    }

    #[test]
    fn scalar_strings() {
        let s = ColumnKind::Scalar;
        assert_eq!(ok(&s, r#""hello""#), "hello");
        assert_eq!(ok(&s, r#""""#), "");
        assert_eq!(ok(&s, r#""\\N""#), r"\\N");
        assert_eq!(ok(&s, r#""\\.""#), r"\\.");
        assert_eq!(ok(&s, r#""\\""#), r"\\");
        assert_eq!(ok(&s, r#""a\tb\rc\nd\\e""#), r"a\tb\rc\nd\\e");
        assert_eq!(ok(&s, r#""\b\f\u000b""#), r"\b\f\v");
        assert_eq!(ok(&s, r#""\u0007\u001f""#), "\u{7}\u{1f}");
        assert_eq!(ok(&s, r#""\"quoted\" \/slash""#), "\"quoted\" /slash");
        assert_eq!(ok(&s, r#""héllo wörld ✓ 🚀""#), "héllo wörld ✓ 🚀");
        assert_eq!(ok(&s, r#""\u00e9""#), "é");
        assert_eq!(ok(&s, r#""\ud83d\ude80""#), "🚀");
        assert_eq!(ok(&s, r#""caf\u00E9 \uD83D\uDE80!""#), "café 🚀!");
        assert_eq!(ok(&s, r#""\\u0000""#), r"\\u0000");
        assert_eq!(ok(&s, "  \"padded\"\r\n"), "padded");
    }

    #[test]
    fn hundred_kilobyte_string() {
        let content = "abcdefghij\\".repeat(10_000);
        let raw = format!("\"{}\"", content.replace('\\', "\\\\"));
        let field = ok(&ColumnKind::Scalar, &raw);
        assert_eq!(field, "abcdefghij\\\\".repeat(10_000));
        assert_eq!(unescape_copy(&field).as_deref(), Some(content.as_str()));
        let plain = "x".repeat(100_000);
        assert_eq!(ok(&ColumnKind::Scalar, &format!("\"{plain}\"")), plain);
    }

    #[test]
    fn scalar_numbers_and_bools() {
        let s = ColumnKind::Scalar;
        assert_eq!(ok(&s, "42"), "42");
        assert_eq!(ok(&s, "-9223372036854775808"), "-9223372036854775808");
        assert_eq!(ok(&s, "0.1"), "0.1");
        assert_eq!(ok(&s, "0.10"), "0.10");
        assert_eq!(ok(&s, "-0"), "0");
        assert_eq!(ok(&s, "-0.0"), "0.0");
        assert_eq!(ok(&s, "1e3"), "1000");
        assert_eq!(ok(&s, "1.50e1"), "15.0");
        assert_eq!(ok(&s, "1.0E+2"), "100");
        assert_eq!(ok(&s, "-1.5e-07"), "-0.00000015");
        assert_eq!(ok(&s, "1e308"), format!("1{}", "0".repeat(308)));
        assert_eq!(ok(&s, "5e-324"), format!("0.{}5", "0".repeat(323)));
        assert_eq!(
            ok(&s, "123456789012345678901234567890.123456789"),
            "123456789012345678901234567890.123456789"
        );
        assert_eq!(ok(&s, "true"), "true");
        assert_eq!(ok(&s, "false"), "false");
        assert_eq!(enc(&s, "1e999999999"), Err(ValueError::NumberOutOfRange));
        assert_eq!(enc(&s, "1e131072"), Err(ValueError::NumberOutOfRange));
        assert_eq!(enc(&s, "1e-16384"), Err(ValueError::NumberOutOfRange));
        assert_eq!(
            enc(&s, "1e99999999999999999999999"),
            Err(ValueError::NumberOutOfRange)
        );
    }

    const NESTED: &str = r#"{"a":[1,{"b":"x\ty"}],"c":null,"d":"\\N","e":"line\nbreak"}"#;
    /// PostgreSQL 15.18's `COPY TO` output for NESTED stored in json, jsonb and text columns.
    const NESTED_CANONICAL_FIELD: &str =
        r#"{"a": [1, {"b": "x\\ty"}], "c": null, "d": "\\\\N", "e": "line\\nbreak"}"#;

    #[test]
    fn nested_object_into_each_kind() {
        assert_eq!(ok(&ColumnKind::Json, NESTED), NESTED_CANONICAL_FIELD);
        assert_eq!(ok(&ColumnKind::Scalar, NESTED), NESTED_CANONICAL_FIELD);
        // jsonb gets the raw text (jsonb_in normalizes it), COPY-escaped.
        assert_eq!(
            ok(&ColumnKind::Jsonb, NESTED),
            r#"{"a":[1,{"b":"x\\ty"}],"c":null,"d":"\\\\N","e":"line\\nbreak"}"#
        );
        assert_eq!(
            ok(&ColumnKind::Jsonb, &format!(" \n{NESTED}\t ")),
            ok(&ColumnKind::Jsonb, NESTED)
        );
        assert_eq!(enc(&TEXT_ARRAY, NESTED), Err(ValueError::ExpectedArray));
    }

    #[test]
    fn json_and_jsonb_scalars() {
        assert_eq!(ok(&ColumnKind::Jsonb, r#""x""#), r#""x""#);
        assert_eq!(
            ok(&ColumnKind::Jsonb, r#""just a string""#),
            r#""just a string""#
        );
        assert_eq!(ok(&ColumnKind::Json, r#""x""#), r#""x""#);
        // json gets canonical text: escapes normalized like escape_json.
        assert_eq!(
            ok(&ColumnKind::Json, r#""a\u0007\/\u00e9\ud83d\ude80""#),
            r#""a\\u0007/é🚀""#
        );
        assert_eq!(ok(&ColumnKind::Json, r#""tab\there""#), r#""tab\\there""#);
        assert_eq!(ok(&ColumnKind::Json, "1.50e1"), "15.0");
        assert_eq!(ok(&ColumnKind::Jsonb, "1.50e1"), "1.50e1");
        assert_eq!(ok(&ColumnKind::Json, "true"), "true");
        assert_eq!(ok(&ColumnKind::Jsonb, "false"), "false");
        assert_eq!(ok(&ColumnKind::Json, "[]"), "[]");
        assert_eq!(ok(&ColumnKind::Json, "{}"), "{}");
        assert_eq!(ok(&ColumnKind::Scalar, "[1,2]"), "[1, 2]");
        assert_eq!(
            ok(&ColumnKind::Json, r#"{"b":1,"aa":2,"a":3,"a":4}"#),
            r#"{"a": 4, "b": 1, "aa": 2}"#
        );
        assert_eq!(
            enc(&ColumnKind::Jsonb, "[1e131072]"),
            Err(ValueError::NumberOutOfRange)
        );
        assert_eq!(
            enc(&ColumnKind::Jsonb, "1e131072"),
            Err(ValueError::NumberOutOfRange)
        );
    }

    #[test]
    fn nul_is_refused_everywhere() {
        let cases = [
            r#""\u0000""#,
            r#""abc\u0000""#,
            r#"["a", ["b", "\u0000"]]"#,
            r#"{"k": {"n": "x\u0000"}}"#,
            r#"{"\u0000": 1}"#,
            r#"[{"a\u0000b": null}]"#,
        ];
        for raw in cases {
            assert_eq!(check_value(raw), Err(ValueError::Nul), "{raw}");
            for kind in &ALL_KINDS {
                assert_eq!(enc(kind, raw), Err(ValueError::Nul), "{kind:?} {raw}");
            }
        }
        // An escaped backslash followed by u0000 is six ordinary characters.
        for raw in [r#""\\u0000""#, r#"{"\\u0000": ["\\u0000"]}"#] {
            assert_eq!(check_value(raw), Ok(()));
            assert!(enc(&ColumnKind::Jsonb, raw).is_ok());
            assert!(enc(&ColumnKind::Json, raw).is_ok());
            assert!(enc(&ColumnKind::Scalar, raw).is_ok());
        }
        assert_eq!(ok(&TEXT_ARRAY, r#"["\\u0000"]"#), r#"{"\\\\u0000"}"#);
    }

    #[test]
    fn check_value_refuses_what_jsonb_in_refuses() {
        assert_eq!(check_value(r#"{"a": [1, "b", {"c": null}]}"#), Ok(()));
        assert_eq!(check_value(r#""plain""#), Ok(()));
        assert_eq!(check_value("42"), Ok(()));
        assert_eq!(check_value(r#"["\ud83d"]"#), Err(ValueError::LoneSurrogate));
        assert_eq!(
            check_value("[1e999999999]"),
            Err(ValueError::NumberOutOfRange)
        );
        assert_eq!(check_value("[1,"), Err(ValueError::Malformed));
        assert_eq!(check_value(""), Err(ValueError::Malformed));
    }

    #[test]
    fn lone_surrogates_and_malformed_input() {
        for kind in &ALL_KINDS {
            assert_eq!(enc(kind, r#""\ud83d""#), Err(ValueError::LoneSurrogate));
            assert_eq!(enc(kind, r#"["\ude80"]"#), Err(ValueError::LoneSurrogate));
            for bad in [
                "",
                "   ",
                "nul",
                "True",
                "[1,]",
                "\"abc",
                "\"a\"b\"",
                "01",
                "{\"a\" 1}",
                "1 2",
            ] {
                assert_eq!(
                    enc(kind, bad),
                    Err(ValueError::Malformed),
                    "{kind:?} {bad:?}"
                );
            }
        }
    }

    #[test]
    fn tags_array_keeps_every_element() {
        let raw = r#"["a","b,c","d\"e","",null,"NULL","back\\slash","{brace}"," spaced "]"#;
        let field = ok(&TEXT_ARRAY, raw);
        assert_eq!(
            field,
            r#"{"a","b,c","d\\"e","",NULL,"NULL","back\\\\slash","{brace}"," spaced "}"#
        );
        let literal = unescape_copy(&field).expect("not null");
        let items = parse_array_literal(&literal, ',');
        let want = [
            Some("a"),
            Some("b,c"),
            Some("d\"e"),
            Some(""),
            None,
            Some("NULL"),
            Some("back\\slash"),
            Some("{brace}"),
            Some(" spaced "),
        ];
        assert_eq!(items.len(), want.len());
        for (got, want) in items.iter().zip(want) {
            assert_eq!(got.as_deref(), want);
        }
    }

    #[test]
    fn arrays() {
        assert_eq!(ok(&TEXT_ARRAY, "[]"), "{}");
        assert_eq!(ok(&TEXT_ARRAY, "[[1,2],[3,4]]"), r#"{{"1","2"},{"3","4"}}"#);
        assert_eq!(ok(&TEXT_ARRAY, "[[]]"), "{}");
        assert_eq!(ok(&TEXT_ARRAY, "[[],[]]"), "{}");
        assert_eq!(ok(&TEXT_ARRAY, "[[[1]]]"), r#"{{{"1"}}}"#);
        assert_eq!(ok(&TEXT_ARRAY, "[[[[[[1]]]]]]"), r#"{{{{{{"1"}}}}}}"#);
        assert_eq!(ok(&TEXT_ARRAY, "[[null]]"), "{{NULL}}");
        assert_eq!(ok(&TEXT_ARRAY, "null"), "\\N");
        assert_eq!(
            ok(&TEXT_ARRAY, r#"["tab\there","new\nline"]"#),
            r#"{"tab\there","new\nline"}"#
        );
        assert_eq!(
            enc(&TEXT_ARRAY, "[[1],[2,3]]"),
            Err(ValueError::RaggedArray)
        );
        assert_eq!(
            enc(&TEXT_ARRAY, "[[1,2],[3]]"),
            Err(ValueError::RaggedArray)
        );
        assert_eq!(enc(&TEXT_ARRAY, "[[1],2]"), Err(ValueError::RaggedArray));
        assert_eq!(enc(&TEXT_ARRAY, "[[1],null]"), Err(ValueError::RaggedArray));
        assert_eq!(enc(&TEXT_ARRAY, "[[],[1]]"), Err(ValueError::RaggedArray));
        assert_eq!(enc(&TEXT_ARRAY, "[[1],[]]"), Err(ValueError::RaggedArray));
        assert_eq!(
            enc(&TEXT_ARRAY, "[[[1],[2]],[[3]]]"),
            Err(ValueError::RaggedArray)
        );
        assert_eq!(
            enc(&TEXT_ARRAY, "[[[[[[[1]]]]]]]"),
            Err(ValueError::TooManyDimensions)
        );
        assert_eq!(
            enc(&TEXT_ARRAY, "[[[[[[[]]]]]]]"),
            Err(ValueError::TooManyDimensions)
        );
        for raw in [r#""x""#, "5", "true", r#"{"a":1}"#, r#""a,b""#, r#""""#] {
            assert_eq!(
                enc(&TEXT_ARRAY, raw),
                Err(ValueError::ExpectedArray),
                "{raw}"
            );
        }
    }

    #[test]
    fn array_elements_after_the_first_level_follow_postgresql() {
        // PostgreSQL 15.18: the first element fixes the number of dimensions; later arrays at the
        // element level are elements (their jsonb text), not dimensions.
        assert_eq!(ok(&TEXT_ARRAY, "[1,[2]]"), r#"{"1","[2]"}"#);
        assert_eq!(ok(&TEXT_ARRAY, "[[1],[[2]]]"), r#"{{"1"},{"[2]"}}"#);
    }

    #[test]
    fn array_strings_go_to_array_in() {
        // PostgreSQL hands a JSON string for an array column to array_in.
        assert_eq!(ok(&TEXT_ARRAY, r#""{a,b}""#), "{a,b}");
        assert_eq!(ok(&TEXT_ARRAY, r#"" {a,\"b c\"}""#), r#" {a,"b c"}"#);
        assert_eq!(ok(&TEXT_ARRAY, r#""[0:1]={a,b}""#), "[0:1]={a,b}");
        assert_eq!(ok(&TEXT_ARRAY, r#""\n\t{x}""#), r"\n\t{x}");
        assert_eq!(ok(&TEXT_ARRAY, r#""{a\\b}""#), r"{a\\b}");
    }

    #[test]
    fn array_element_kinds() {
        let raw = r#"[{"b":1,"a":[1,"x"]},"s",1.50,true,null]"#;
        // PostgreSQL 15.18 stores {"{\"a\": [1, \"x\"], \"b\": 1}",s,1.50,true,NULL} for text[].
        assert_eq!(
            ok(&TEXT_ARRAY, raw),
            r#"{"{\\"a\\": [1, \\"x\\"], \\"b\\": 1}","s","1.50","true",NULL}"#
        );
        // ... and {"{\"a\": [1, \"x\"], \"b\": 1}","\"s\"",1.50,true,NULL} for json[] and jsonb[].
        let want_json = r#"{"{\\"a\\": [1, \\"x\\"], \\"b\\": 1}","\\"s\\"","1.50","true",NULL}"#;
        for element in [ElementKind::Json, ElementKind::Jsonb] {
            let kind = ColumnKind::Array {
                element,
                delimiter: b',',
            };
            assert_eq!(ok(&kind, raw), want_json);
        }
        let json_strings = ColumnKind::Array {
            element: ElementKind::Json,
            delimiter: b',',
        };
        assert_eq!(
            ok(&json_strings, r#"["a\"b\\c"]"#),
            r#"{"\\"a\\\\\\"b\\\\\\\\c\\""}"#
        );
    }

    #[test]
    fn box_delimiter() {
        let boxes = ColumnKind::Array {
            element: ElementKind::Scalar,
            delimiter: b';',
        };
        assert_eq!(
            ok(&boxes, r#"["(1,2),(3,4)","(5,6),(7,8)"]"#),
            r#"{"(1,2),(3,4)";"(5,6),(7,8)"}"#
        );
        assert_eq!(
            ok(&boxes, r#"[["(0,0),(1,1)"],[null]]"#),
            r#"{{"(0,0),(1,1)"};{NULL}}"#
        );
    }

    #[test]
    fn escape_text_escapes_what_copy_needs() {
        let mut out = Vec::new();
        escape_text("a\\b\nc\rd\te\u{8}f\u{c}g\u{b}h\u{1}\u{7f}é🚀", &mut out);
        assert_eq!(
            out,
            "a\\\\b\\nc\\rd\\te\\bf\\fg\\vh\u{1}\u{7f}é🚀".as_bytes()
        );
        for (s, want) in [
            ("\\N", "\\\\N"),
            ("\\.", "\\\\."),
            ("", ""),
            ("plain", "plain"),
        ] {
            let mut out = Vec::new();
            escape_text(s, &mut out);
            assert_eq!(out, want.as_bytes());
        }
    }

    #[test]
    fn column_kind_serde_shape_is_stable() {
        let kind = ColumnKind::Array {
            element: ElementKind::Jsonb,
            delimiter: b';',
        };
        let text = serde_json::to_string(&kind).expect("serialize");
        assert_eq!(text, r#"{"Array":{"element":"Jsonb","delimiter":59}}"#);
        assert_eq!(serde_json::from_str::<ColumnKind>(&text).ok(), Some(kind));
        assert_eq!(
            serde_json::to_string(&ColumnKind::Scalar).ok().as_deref(),
            Some(r#""Scalar""#)
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            ValueError::Nul.to_string(),
            "text and jsonb cannot hold a NUL character (\\u0000)"
        );
        assert!(ValueError::ExpectedArray.to_string().contains("\"{a,b}\""));
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowing() {
        let handle = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                // An array holding objects nested n - 1 deep: one dimension for array columns.
                let deep =
                    |n: usize| format!("[{}\"x\"{}]", r#"{"a":"#.repeat(n - 1), "}".repeat(n - 1));
                for kind in &ALL_KINDS {
                    assert!(enc(kind, &deep(jsonb::MAX_DEPTH)).is_ok(), "{kind:?}");
                    assert_eq!(
                        enc(kind, &deep(jsonb::MAX_DEPTH + 1)),
                        Err(ValueError::TooDeep),
                        "{kind:?}"
                    );
                }
                assert_eq!(check_value(&deep(jsonb::MAX_DEPTH)), Ok(()));
                assert_eq!(
                    check_value(&deep(jsonb::MAX_DEPTH + 1)),
                    Err(ValueError::TooDeep)
                );
                // Far deeper input costs no stack either: the limit stops it first.
                assert_eq!(check_value(&deep(100_000)), Err(ValueError::TooDeep));
            })
            .expect("spawn test thread");
        handle.join().expect("no stack overflow");
    }

    /// Arbitrary JSON values: strings with NUL, control characters, backslashes, quotes and
    /// non-ASCII; numbers as text (some beyond numeric's range); nested arrays and objects.
    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let number = prop_oneof![
            "-?(0|[1-9][0-9]{0,20})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?",
            "-?[1-9](\\.[0-9])?[eE][+-]?[0-9]{5,12}",
        ]
        .prop_map(|t| serde_json::from_str::<serde_json::Value>(&t).expect("number is JSON"));
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            number,
            any::<String>().prop_map(serde_json::Value::String),
            "[\\x00-\\x20\\\\\"{},;NUL. é🚀]{0,8}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                // Rectangular-ish nested arrays, to reach multidimensional encoding.
                (1usize..4, 0usize..4, inner.clone()).prop_map(|(rows, cols, v)| {
                    serde_json::Value::Array(vec![serde_json::Value::Array(vec![v; cols]); rows])
                }),
                prop::collection::vec(("[a-c\\x00\\n\"é]{0,3}", inner), 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Whether the value holds a NUL in a string or key, at any depth.
    fn has_nul(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().any(has_nul),
            serde_json::Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }

    /// JSON text for a string with every character written as `\u` escapes (surrogate pairs
    /// beyond the BMP).
    fn all_escaped(s: &str) -> String {
        let mut raw = String::from("\"");
        for c in s.chars() {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                raw.push_str(&format!("\\u{u:04X}"));
            }
        }
        raw.push('"');
        raw
    }

    proptest! {
        #[test]
        fn never_panics_and_errors_only_for_cause(value in arb_json(), pretty in any::<bool>()) {
            let raw = if pretty {
                serde_json::to_string_pretty(&value)
            } else {
                serde_json::to_string(&value)
            }
            .expect("serialize");
            let nul = has_nul(&value);
            let checked = check_value(&raw);
            if nul {
                // The first problem in document order is reported.
                prop_assert!(matches!(
                    checked,
                    Err(ValueError::Nul | ValueError::NumberOutOfRange)
                ));
            } else {
                prop_assert!(matches!(checked, Ok(()) | Err(ValueError::NumberOutOfRange)));
            }
            for kind in &ALL_KINDS {
                let result = enc(kind, &raw);
                match &result {
                    Ok(field) => {
                        prop_assert!(checked.is_ok());
                        // Every field is one COPY field: no raw tab, newline or CR.
                        prop_assert!(!field.contains(['\t', '\n', '\r']));
                        prop_assert!(unescape_copy(field).is_some() || value.is_null());
                    }
                    Err(ValueError::ExpectedArray
                        | ValueError::RaggedArray
                        | ValueError::TooManyDimensions) => {
                        let is_array = matches!(kind, ColumnKind::Array { .. });
                        prop_assert!(is_array, "array error for {:?}", kind);
                    }
                    Err(e) => prop_assert_eq!(Err(e.clone()), checked.clone()),
                }
            }
        }

        #[test]
        fn scalar_strings_round_trip(s in any::<String>(), escaped in any::<bool>()) {
            prop_assume!(!s.contains('\0'));
            let raw = if escaped {
                all_escaped(&s)
            } else {
                serde_json::to_string(&s).expect("serialize")
            };
            let field = ok(&ColumnKind::Scalar, &raw);
            prop_assert_eq!(unescape_copy(&field), Some(s.clone()));
            // json and jsonb fields hold JSON text for the same string.
            for kind in [ColumnKind::Json, ColumnKind::Jsonb] {
                let text = unescape_copy(&ok(&kind, &raw)).expect("not null");
                prop_assert_eq!(serde_json::from_str::<String>(&text).ok(), Some(s.clone()));
            }
        }

        #[test]
        fn text_arrays_round_trip(
            items in prop::collection::vec(proptest::option::of(any::<String>()), 0..8),
            box_style in any::<bool>(),
        ) {
            prop_assume!(items.iter().flatten().all(|s| !s.contains('\0')));
            let delimiter = if box_style { b';' } else { b',' };
            let kind = ColumnKind::Array { element: ElementKind::Scalar, delimiter };
            let raw = serde_json::to_string(&items).expect("serialize");
            let literal = unescape_copy(&ok(&kind, &raw)).expect("not null");
            prop_assert_eq!(parse_array_literal(&literal, char::from(delimiter)), items);
        }
    }
}
