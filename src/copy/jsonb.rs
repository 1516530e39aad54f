//! JSON as PostgreSQL 15's `jsonb` sees it: a strict parser that accepts and refuses what
//! `jsonb_in` would, and the canonical text `JsonbToCString` prints.
//!
//! This owns JSON string unescaping (including surrogate pairs, and the refusal of `\u0000` that
//! `jsonb` cannot hold), the borrowed document tree ([`Node`]) with objects already in `jsonb`
//! order, a tree-less validator for values that are passed through verbatim, and the canonical
//! writer.
//!
//! Mirrors, in PostgreSQL 15: `src/common/jsonapi.c` (`json_lex_string`: escapes, surrogates,
//! "unsupported Unicode escape sequence" for `\u0000`), `src/backend/utils/adt/jsonb_util.c`
//! (`lengthCompareJsonbStringValue` and `uniqueifyJsonbObject`: keys ordered by byte length, then
//! bytewise, the last duplicate wins), `src/backend/utils/adt/jsonb.c` (`JsonbToCStringWorker`
//! without indentation: `": "` after keys, `", "` between items) and
//! `src/backend/utils/adt/json.c` (`escape_json`).

use std::borrow::Cow;

use super::numeric::{self, Numeric};
use super::{Discard, Sink, ValueError};

/// Deepest nesting of arrays and objects accepted (a top-level container is level 1).
///
/// PostgreSQL's own limit is its stack (`max_stack_depth`): 15.18 with the default 2 MB reads
/// 10000 nested arrays and fails at 20000. This parser, the canonical writer and the array walker
/// are recursive, so deeper documents are refused with [`ValueError::TooDeep`] rather than risk the
/// thread's stack. 128 is serde_json's default limit too, and keeps the stack used under about
/// 200 kB even in debug builds. Keep in step with the text of [`ValueError::TooDeep`].
pub(crate) const MAX_DEPTH: usize = 128;

/// One parsed JSON value, borrowing from the input where it can.
///
/// Objects hold their members in `jsonb` order (byte length, then bytewise) with duplicate keys
/// resolved (the last one wins), so that walking the tree in order prints canonical text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, already checked against `numeric`'s limits.
    Number(Numeric<'a>),
    /// A string, unescaped (borrowed when the JSON text held no escapes).
    String(Cow<'a, str>),
    /// An array, in document order.
    Array(Vec<Node<'a>>),
    /// An object, in `jsonb` key order, keys unique.
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

/// Parses one JSON document (surrounding JSON whitespace allowed) into a tree.
///
/// # Errors
/// [`ValueError::Nul`] for a `\u0000` escape in any string or key, [`ValueError::LoneSurrogate`]
/// for an unpaired UTF-16 surrogate escape, [`ValueError::NumberOutOfRange`] for a number
/// `numeric` cannot hold, [`ValueError::TooDeep`] past [`MAX_DEPTH`], and
/// [`ValueError::Malformed`] for anything that is not exactly one JSON value.
pub(crate) fn parse(raw: &str) -> Result<Node<'_>, ValueError> {
    let mut p = Parser::new(raw);
    p.skip_ws();
    let node = p.value(0)?;
    p.finish()?;
    Ok(node)
}

/// Checks one JSON document exactly as [`parse`] does, without building a tree or allocating.
///
/// # Errors
/// The same as [`parse`].
pub(crate) fn validate(raw: &str) -> Result<(), ValueError> {
    let mut p = Parser::new(raw);
    p.skip_ws();
    p.skip_value(0)?;
    p.finish()
}

/// Finds the end of a JSON string body: `bytes[start..]` follows the opening quote; returns the
/// index of the closing quote. Escapes are skipped, not checked (see [`decode_string`]).
///
/// # Errors
/// [`ValueError::Malformed`] when the string is not terminated.
pub(crate) fn string_end(bytes: &[u8], start: usize) -> Result<usize, ValueError> {
    let mut i = start;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => return Ok(i),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Err(ValueError::Malformed)
}

/// Unescapes a JSON string body (the text between the quotes) into `sink`, checking it as
/// PostgreSQL's JSON lexer does. Runs without escapes are pushed as slices of `body`.
///
/// # Errors
/// [`ValueError::Nul`] for `\u0000`; [`ValueError::LoneSurrogate`] for a high surrogate escape not
/// followed by a low one, or a low one alone; [`ValueError::Malformed`] for an unknown or
/// truncated escape, or a raw control character (below U+0020), which JSON does not allow.
pub(crate) fn decode_string<S: Sink + ?Sized>(body: &str, sink: &mut S) -> Result<(), ValueError> {
    let bytes = body.as_bytes();
    let mut run = 0;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b >= 0x20 && b != b'\\' {
            i += 1;
            continue;
        }
        if b != b'\\' {
            return Err(ValueError::Malformed);
        }
        sink.push(&body[run..i]);
        let escape = *bytes.get(i + 1).ok_or(ValueError::Malformed)?;
        i += 2;
        let simple = match escape {
            b'"' => "\"",
            b'\\' => "\\",
            b'/' => "/",
            b'b' => "\u{8}",
            b'f' => "\u{c}",
            b'n' => "\n",
            b'r' => "\r",
            b't' => "\t",
            b'u' => {
                let (c, used) = unicode_escape(bytes, i)?;
                i += used;
                let mut buf = [0u8; 4];
                sink.push(c.encode_utf8(&mut buf));
                run = i;
                continue;
            }
            _ => return Err(ValueError::Malformed),
        };
        sink.push(simple);
        run = i;
    }
    sink.push(&body[run..]);
    Ok(())
}

/// Decodes the escape that starts with the 4 hex digits at `bytes[i..]` (just after `\u`),
/// pairing surrogates; returns the character and how many bytes it used from `i`.
fn unicode_escape(bytes: &[u8], i: usize) -> Result<(char, usize), ValueError> {
    let hi = hex4(bytes, i)?;
    let (code, used) = match hi {
        0 => return Err(ValueError::Nul),
        0xD800..=0xDBFF => {
            if bytes.get(i + 4) != Some(&b'\\') || bytes.get(i + 5) != Some(&b'u') {
                return Err(ValueError::LoneSurrogate);
            }
            let lo = hex4(bytes, i + 6)?;
            if !(0xDC00..=0xDFFF).contains(&lo) {
                return Err(ValueError::LoneSurrogate);
            }
            (0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00), 10)
        }
        0xDC00..=0xDFFF => return Err(ValueError::LoneSurrogate),
        _ => (hi, 4),
    };
    let c = char::from_u32(code).ok_or(ValueError::LoneSurrogate)?;
    Ok((c, used))
}

/// Reads 4 hex digits (either case) at `bytes[i..]`.
fn hex4(bytes: &[u8], i: usize) -> Result<u32, ValueError> {
    let digits = bytes.get(i..i + 4).ok_or(ValueError::Malformed)?;
    digits.iter().try_fold(0u32, |acc, &d| {
        let v = char::from(d).to_digit(16).ok_or(ValueError::Malformed)?;
        Ok(acc << 4 | v)
    })
}

/// Writes the canonical `jsonb` text of `node` (`JsonbToCString` without indentation) to `sink`.
pub(crate) fn write_canonical<S: Sink + ?Sized>(node: &Node<'_>, sink: &mut S) {
    match node {
        Node::Null => sink.push("null"),
        Node::Bool(b) => sink.push(if *b { "true" } else { "false" }),
        Node::Number(n) => n.write_to(sink),
        Node::String(s) => write_json_string(s, sink),
        Node::Array(items) => {
            sink.push("[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    sink.push(", ");
                }
                write_canonical(item, sink);
            }
            sink.push("]");
        }
        Node::Object(members) => {
            sink.push("{");
            for (i, (key, value)) in members.iter().enumerate() {
                if i > 0 {
                    sink.push(", ");
                }
                write_json_string(key, sink);
                sink.push(": ");
                write_canonical(value, sink);
            }
            sink.push("}");
        }
    }
}

/// Writes `s` as a JSON string the way PostgreSQL's `escape_json` does: `\"`, `\\`, `\b`, `\f`,
/// `\n`, `\r`, `\t`, other characters below U+0020 as `\u00xx` (lowercase hex), everything else
/// (including `/`, DEL and non-ASCII) as is.
pub(crate) fn write_json_string<S: Sink + ?Sized>(s: &str, sink: &mut S) {
    sink.push("\"");
    write_json_string_body(s, sink);
    sink.push("\"");
}

/// `\u00xx` escapes for the bytes below 0x20, as `escape_json` prints them (`"\\u%04x"`).
const CONTROL_ESCAPES: [&str; 32] = [
    "\\u0000", "\\u0001", "\\u0002", "\\u0003", "\\u0004", "\\u0005", "\\u0006", "\\u0007",
    "\\u0008", "\\u0009", "\\u000a", "\\u000b", "\\u000c", "\\u000d", "\\u000e", "\\u000f",
    "\\u0010", "\\u0011", "\\u0012", "\\u0013", "\\u0014", "\\u0015", "\\u0016", "\\u0017",
    "\\u0018", "\\u0019", "\\u001a", "\\u001b", "\\u001c", "\\u001d", "\\u001e", "\\u001f",
];

/// [`write_json_string`] without the surrounding quotes.
pub(crate) fn write_json_string_body<S: Sink + ?Sized>(s: &str, sink: &mut S) {
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => CONTROL_ESCAPES[usize::from(b)],
            _ => continue,
        };
        sink.push(&s[run..i]);
        sink.push(escaped);
        run = i + 1;
    }
    sink.push(&s[run..]);
}

/// A recursive-descent JSON parser over one document.
struct Parser<'a> {
    /// The whole input.
    src: &'a str,
    /// Byte position of the next unread byte.
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser { src, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    /// Skips JSON whitespace (space, tab, LF, CR: the same set PostgreSQL's lexer skips).
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Requires that only whitespace is left.
    fn finish(&mut self) -> Result<(), ValueError> {
        self.skip_ws();
        if self.pos == self.src.len() {
            Ok(())
        } else {
            Err(ValueError::Malformed)
        }
    }

    /// Consumes `word` (a literal such as `true`).
    fn literal(&mut self, word: &str) -> Result<(), ValueError> {
        if self.src.as_bytes()[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(ValueError::Malformed)
        }
    }

    /// Consumes a number token (the bytes a JSON number can be made of) and checks it.
    fn number(&mut self) -> Result<Numeric<'a>, ValueError> {
        let start = self.pos;
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
        ) {
            self.pos += 1;
        }
        numeric::parse(&self.src[start..self.pos])
    }

    /// Consumes a string (at its opening quote) and returns its raw body.
    fn string_body(&mut self) -> Result<&'a str, ValueError> {
        let start = self.pos + 1;
        let end = string_end(self.src.as_bytes(), start)?;
        self.pos = end + 1;
        Ok(&self.src[start..end])
    }

    /// Consumes a string and returns its unescaped content, borrowed when it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, ValueError> {
        let body = self.string_body()?;
        if body.bytes().any(|b| b == b'\\') {
            let mut s = String::with_capacity(body.len());
            decode_string(body, &mut s)?;
            Ok(Cow::Owned(s))
        } else if body.bytes().any(|b| b < 0x20) {
            Err(ValueError::Malformed)
        } else {
            Ok(Cow::Borrowed(body))
        }
    }

    /// Consumes `,` (returning `true`) or the closing byte `close` (returning `false`).
    fn comma_or_close(&mut self, close: u8) -> Result<bool, ValueError> {
        self.skip_ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                self.skip_ws();
                Ok(true)
            }
            Some(b) if b == close => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(ValueError::Malformed),
        }
    }

    /// Consumes the `:` after an object key.
    fn colon(&mut self) -> Result<(), ValueError> {
        self.skip_ws();
        if self.peek() != Some(b':') {
            return Err(ValueError::Malformed);
        }
        self.pos += 1;
        self.skip_ws();
        Ok(())
    }

    /// Consumes the opening byte of a container; returns `true` if it is immediately closed.
    fn open(&mut self, close: u8, depth: usize) -> Result<bool, ValueError> {
        if depth >= MAX_DEPTH {
            return Err(ValueError::TooDeep);
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// Parses one value starting at the current (non-whitespace) position; `depth` counts the
    /// containers around it.
    fn value(&mut self, depth: usize) -> Result<Node<'a>, ValueError> {
        match self.peek() {
            Some(b'"') => Ok(Node::String(self.string()?)),
            Some(b'-' | b'0'..=b'9') => Ok(Node::Number(self.number()?)),
            Some(b't') => self.literal("true").map(|()| Node::Bool(true)),
            Some(b'f') => self.literal("false").map(|()| Node::Bool(false)),
            Some(b'n') => self.literal("null").map(|()| Node::Null),
            Some(b'[') => {
                let mut items = Vec::new();
                if !self.open(b']', depth)? {
                    loop {
                        items.push(self.value(depth + 1)?);
                        if !self.comma_or_close(b']')? {
                            break;
                        }
                    }
                }
                Ok(Node::Array(items))
            }
            Some(b'{') => {
                let mut members = Vec::new();
                if !self.open(b'}', depth)? {
                    loop {
                        if self.peek() != Some(b'"') {
                            return Err(ValueError::Malformed);
                        }
                        let key = self.string()?;
                        self.colon()?;
                        members.push((key, self.value(depth + 1)?));
                        if !self.comma_or_close(b'}')? {
                            break;
                        }
                    }
                }
                canonicalize_members(&mut members);
                Ok(Node::Object(members))
            }
            _ => Err(ValueError::Malformed),
        }
    }

    /// Checks one value like [`Parser::value`] without building anything.
    fn skip_value(&mut self, depth: usize) -> Result<(), ValueError> {
        match self.peek() {
            Some(b'"') => decode_string(self.string_body()?, &mut Discard),
            Some(b'-' | b'0'..=b'9') => self.number().map(|_| ()),
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            Some(b'[') => {
                if !self.open(b']', depth)? {
                    loop {
                        self.skip_value(depth + 1)?;
                        if !self.comma_or_close(b']')? {
                            break;
                        }
                    }
                }
                Ok(())
            }
            Some(b'{') => {
                if !self.open(b'}', depth)? {
                    loop {
                        if self.peek() != Some(b'"') {
                            return Err(ValueError::Malformed);
                        }
                        decode_string(self.string_body()?, &mut Discard)?;
                        self.colon()?;
                        self.skip_value(depth + 1)?;
                        if !self.comma_or_close(b'}')? {
                            break;
                        }
                    }
                }
                Ok(())
            }
            _ => Err(ValueError::Malformed),
        }
    }
}

/// Puts object members in `jsonb` order and drops duplicate keys, keeping the last value
/// (`uniqueifyJsonbObject`: keys compare by byte length, then bytewise).
fn canonicalize_members(members: &mut Vec<(Cow<'_, str>, Node<'_>)>) {
    // Stable, so equal keys stay in document order and the last of a run is the last written.
    members.sort_by(|(a, _), (b, _)| {
        a.len()
            .cmp(&b.len())
            .then_with(|| a.as_bytes().cmp(b.as_bytes()))
    });
    // `dedup_by` keeps the earlier element of a pair it removes; move the later value into it.
    members.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            std::mem::swap(later, earlier);
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canonical(raw: &str) -> Result<String, ValueError> {
        let node = parse(raw)?;
        let mut s = String::new();
        write_canonical(&node, &mut s);
        Ok(s)
    }

    fn decoded(body: &str) -> Result<String, ValueError> {
        let mut s = String::new();
        decode_string(body, &mut s)?;
        Ok(s)
    }

    #[test]
    fn canonical_text_matches_postgresql() {
        // Each checked against PostgreSQL 15.18 (`select 'x'::jsonb`).
        let cases = [
            (
                r#"{"b":1,"aa":2,"a":3,"a":4, "ab":[1,{"x":"\u0001\u001f/é\t"}]}"#,
                r#"{"a": 4, "b": 1, "aa": 2, "ab": [1, {"x": "\u0001\u001f/é\t"}]}"#,
            ),
            (
                r#"{"a":[1,{"b":"x\ty"}],"c":null,"d":"\\N","e":"line\nbreak"}"#,
                r#"{"a": [1, {"b": "x\ty"}], "c": null, "d": "\\N", "e": "line\nbreak"}"#,
            ),
            (r#""x""#, r#""x""#),
            (r#" "a\u0007\/\u00e9\ud83d\ude80" "#, "\"a\\u0007/é🚀\""),
            ("1.50e1", "15.0"),
            ("[]", "[]"),
            ("{}", "{}"),
            (r#"[{}, [], {"":1}]"#, r#"[{}, [], {"": 1}]"#),
            (r#"{"\u00e9":1,"z":2,"é":3}"#, r#"{"z": 2, "é": 3}"#),
            ("[true,false,null,-0,0.10]", "[true, false, null, 0, 0.10]"),
            (" \t\r\n[ 1 , 2 ]\n", "[1, 2]"),
            (r#"{"k":{"b":[],"a":{}}}"#, r#"{"k": {"a": {}, "b": []}}"#),
            ("\"\u{7f}\"", "\"\u{7f}\""),
        ];
        for (input, want) in cases {
            assert_eq!(canonical(input).as_deref(), Ok(want), "input {input}");
        }
    }

    #[test]
    fn keys_order_by_length_then_bytes_and_last_duplicate_wins() {
        assert_eq!(
            canonical(r#"{"bb":1,"a":2,"ab":3,"b":4,"a":5,"é":6,"zz":7,"a":8}"#).as_deref(),
            Ok(r#"{"a": 8, "b": 4, "ab": 3, "bb": 1, "zz": 7, "é": 6}"#)
        );
        // Duplicates compare after unescaping.
        assert_eq!(
            canonical(r#"{"\u0061":1,"a":2}"#).as_deref(),
            Ok(r#"{"a": 2}"#)
        );
    }

    #[test]
    fn string_escapes() {
        assert_eq!(decoded(r"\u00e9").as_deref(), Ok("é"));
        assert_eq!(decoded(r"\u00E9").as_deref(), Ok("é"));
        assert_eq!(decoded(r"\ud83d\ude80").as_deref(), Ok("🚀"));
        assert_eq!(decoded(r"x\uD83D\uDE80y").as_deref(), Ok("x🚀y"));
        assert_eq!(
            decoded(r#"\"\\\/\b\f\n\r\t"#).as_deref(),
            Ok("\"\\/\u{8}\u{c}\n\r\t")
        );
        assert_eq!(decoded(r"\\u0000").as_deref(), Ok(r"\u0000"));
        assert_eq!(decoded(r"\u0000"), Err(ValueError::Nul));
        assert_eq!(decoded(r"abc\u0000def"), Err(ValueError::Nul));
        assert_eq!(decoded(r"\ud83d"), Err(ValueError::LoneSurrogate));
        assert_eq!(decoded(r"\ud83dx"), Err(ValueError::LoneSurrogate));
        assert_eq!(decoded(r"\ud83d\u0041"), Err(ValueError::LoneSurrogate));
        assert_eq!(decoded(r"\ud83d\ud83d"), Err(ValueError::LoneSurrogate));
        assert_eq!(decoded(r"\ude80"), Err(ValueError::LoneSurrogate));
        assert_eq!(decoded(r"\ud83d\u"), Err(ValueError::Malformed));
        for bad in [
            r"\",
            r"\x",
            r"\u12",
            r"\u12g4",
            r"\U0041",
            "tab\there",
            "\u{1}",
        ] {
            assert_eq!(decoded(bad), Err(ValueError::Malformed), "body {bad:?}");
        }
    }

    #[test]
    fn json_string_escaping_like_escape_json() {
        let mut s = String::new();
        write_json_string("a\"b\\c/\u{8}\u{c}\n\r\t\u{1}\u{1f}\u{7f}é🚀", &mut s);
        assert_eq!(s, "\"a\\\"b\\\\c/\\b\\f\\n\\r\\t\\u0001\\u001f\u{7f}é🚀\"");
    }

    #[test]
    fn nul_anywhere_is_refused() {
        for raw in [
            r#""\u0000""#,
            r#"["ok", "\u0000"]"#,
            r#"{"a": {"b": ["\u0000"]}}"#,
            r#"{"\u0000": 1}"#,
            r#"{"a": {"x\u0000y": 1}}"#,
        ] {
            assert_eq!(parse(raw), Err(ValueError::Nul), "{raw}");
            assert_eq!(validate(raw), Err(ValueError::Nul), "{raw}");
        }
        assert!(validate(r#"{"\\u0000": "\\u0000"}"#).is_ok());
    }

    #[test]
    fn malformed_documents() {
        for raw in [
            "",
            " ",
            "[",
            "]",
            "[1,]",
            "[,1]",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{a:1}",
            "{1:1}",
            "\"abc",
            "tru",
            "truex",
            "nul",
            "[1 2]",
            "1 2",
            "01",
            "[01]",
            "+1",
            "[.5]",
            "NaN",
            "'a'",
            "[\"\t\"]",
            "{\"a\":1}}",
            "\u{feff}1",
            "[1-2]",
            "{\"a\" 1}",
        ] {
            assert_eq!(parse(raw), Err(ValueError::Malformed), "{raw:?}");
            assert_eq!(validate(raw), Err(ValueError::Malformed), "{raw:?}");
        }
    }

    #[test]
    fn numbers_are_checked_everywhere() {
        for raw in ["[1e131072]", r#"{"a":{"b":1e-16384}}"#, "0e1073741823"] {
            assert_eq!(parse(raw), Err(ValueError::NumberOutOfRange), "{raw}");
            assert_eq!(validate(raw), Err(ValueError::NumberOutOfRange), "{raw}");
        }
    }

    #[test]
    fn depth_limit() {
        let run = |depth: usize| {
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    let raw = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                    let tree = canonical(&raw);
                    let flat = validate(&raw);
                    let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
                    (tree, flat, parse(&objects).map(|_| ()), raw)
                })
                .expect("spawn test thread")
                .join()
                .expect("no stack overflow")
        };
        let (tree, flat, objects, raw) = run(MAX_DEPTH);
        assert_eq!(tree, Ok(raw));
        assert_eq!(flat, Ok(()));
        assert_eq!(objects, Ok(()));
        let (tree, flat, objects, _) = run(MAX_DEPTH + 1);
        assert_eq!(tree, Err(ValueError::TooDeep));
        assert_eq!(flat, Err(ValueError::TooDeep));
        assert_eq!(objects, Err(ValueError::TooDeep));
    }

    /// JSON text from serde_json for arbitrary values, numbers kept as text.
    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let number = "-?(0|[1-9][0-9]{0,12})(\\.[0-9]{1,8})?([eE][+-]?[0-9]{1,3})?".prop_map(|t| {
            serde_json::from_str::<serde_json::Value>(&t).expect("generated number is JSON")
        });
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            number,
            "[a-c\\\\\"/\\t\\n\\x01-\\x1f\\x7fé😀\\u{10FFFF}]{0,6}"
                .prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                prop::collection::vec(("[a-c\\n\"é]{0,3}", inner), 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Compares two JSON values, numbers by their canonical numeric text.
    fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match (a, b) {
            (V::Number(x), V::Number(y)) => {
                let cx = numeric::parse(&x.to_string()).map(|n| {
                    let mut s = String::new();
                    n.write_to(&mut s);
                    s
                });
                let cy = numeric::parse(&y.to_string()).map(|n| {
                    let mut s = String::new();
                    n.write_to(&mut s);
                    s
                });
                cx.is_ok() && cx == cy
            }
            (V::Array(x), V::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
            }
            (V::Object(x), V::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
            }
            _ => a == b,
        }
    }

    proptest! {
        #[test]
        fn canonical_text_round_trips(value in arb_json()) {
            let raw = serde_json::to_string(&value).expect("serialize");
            let pretty = serde_json::to_string_pretty(&value).expect("serialize");
            prop_assert_eq!(validate(&raw), Ok(()));
            let text = canonical(&raw).expect("valid JSON without NUL");
            prop_assert_eq!(canonical(&pretty), Ok(text.clone()));
            // Canonical text is itself canonical, and means the same value.
            prop_assert_eq!(canonical(&text), Ok(text.clone()));
            let back: serde_json::Value = serde_json::from_str(&text).expect("canonical text is JSON");
            prop_assert!(same_json(&value, &back), "{} -> {}", raw, text);
        }

        #[test]
        fn agrees_with_serde_json_on_validity(text in "[\\[\\]{}\",:0-9a-z\\\\ .eE+-]{0,16}") {
            let ours = parse(&text);
            let theirs = serde_json::from_str::<serde_json::Value>(&text);
            // serde_json accepts some numbers numeric cannot hold; everything else must agree.
            if !matches!(ours, Err(ValueError::NumberOutOfRange)) {
                prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "{:?}: {:?}", text, ours);
            }
            prop_assert_eq!(validate(&text), ours.map(|_| ()));
        }
    }
}
