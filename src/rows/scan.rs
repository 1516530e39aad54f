//! The fast path of row parsing: one pass over a flat JSON object (keys without escapes,
//! values that are strings, numbers, `true`, `false` or `null`), the shape of nearly every
//! row clients send.
//!
//! It finds each value's raw text exactly as serde_json's `RawValue` would, and checks
//! exactly what that parse checks. Anything else (an object or array value, an escape in
//! a key, a duplicate key, and every error) makes it give up, and the caller parses the
//! row with serde_json, which has the one set of error messages. So the fast path can
//! only be faster, never different: the property test below holds the two to that.

use std::borrow::Cow;

use crate::copy;

/// A row's fields as `(key, raw JSON text of the value)`, in the order given.
pub type Fields<'a> = Vec<(Cow<'a, str>, &'a str)>;

/// Scans `text`, one JSON object, into `fields` (cleared first). Returns whether its keys
/// are exactly `template`'s, or `None` when the row is not flat or not valid: then
/// `fields` holds nothing of use and the row must be parsed the slow way.
pub(super) fn scan_flat<'a>(
    text: &'a str,
    template: &[&'a str],
    fields: &mut Fields<'a>,
) -> Option<bool> {
    fields.clear();
    let bytes = text.as_bytes();
    let mut i = skip_ws(bytes, 0);
    if bytes.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(bytes, i + 1);
    let mut as_template = true;
    if bytes.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if bytes.get(i) != Some(&b'"') {
                return None;
            }
            let key_end = i + 1 + bytes[i + 1..].iter().position(|&b| b == b'"')?;
            let key = &text[i + 1..key_end];
            if key.bytes().any(|b| b == b'\\' || b < 0x20) {
                return None;
            }
            if as_template && template.get(fields.len()) != Some(&key) {
                as_template = false;
            }
            if !as_template && fields.iter().any(|(k, _)| k == key) {
                return None;
            }
            i = skip_ws(bytes, key_end + 1);
            if bytes.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(bytes, i + 1);
            let value_end = scalar_end(text, i)?;
            fields.push((Cow::Borrowed(key), &text[i..value_end]));
            i = skip_ws(bytes, value_end);
            match bytes.get(i) {
                Some(b',') => i = skip_ws(bytes, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    if skip_ws(bytes, i) != bytes.len() {
        return None;
    }
    Some(as_template && fields.len() == template.len())
}

/// JSON whitespace.
fn skip_ws(bytes: &[u8], mut i: usize) -> usize {
    while matches!(bytes.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The end of the string, number or literal starting at `text[i]`; `None` for anything
/// else or anything malformed.
fn scalar_end(text: &str, i: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    match *bytes.get(i)? {
        b'"' => {
            let mut j = i + 1;
            loop {
                match *bytes.get(j)? {
                    b'"' => return Some(j + 1),
                    b'\\' => match *bytes.get(j + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => j += 2,
                        b'u' if bytes.get(j + 2..j + 6)?.iter().all(u8::is_ascii_hexdigit) => {
                            j += 6;
                        }
                        _ => return None,
                    },
                    b if b < 0x20 => return None,
                    _ => j += 1,
                }
            }
        }
        b'-' | b'0'..=b'9' => {
            let len = bytes[i..]
                .iter()
                .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                .unwrap_or(bytes.len() - i);
            copy::is_json_number(&text[i..i + len]).then_some(i + len)
        }
        b't' | b'f' | b'n' => ["true", "false", "null"]
            .into_iter()
            .find(|literal| text[i..].starts_with(literal))
            .map(|literal| i + literal.len()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rows::{BodyFormat, parse_each};

    /// What the serde_json path makes of one row: its fields, or nothing for an error.
    fn slow(text: &str) -> Option<Vec<(String, String)>> {
        let mut shapes = crate::rows::Shapes::default();
        let row = crate::rows::parse_row_slow(text, crate::rows::RowPosition::Single, &mut shapes)
            .ok()?;
        Some(
            row.fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn fast(text: &str) -> Option<Vec<(String, String)>> {
        let mut fields = Vec::new();
        scan_flat(text, &[], &mut fields)?;
        Some(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn flat_rows_scan_like_serde_json() {
        for text in [
            r#"{}"#,
            r#" { "a" : 1 , "b":"x\"y\u00e9","c":null,"d":true,"e":false,"f":-0.5e+3 } "#,
            r#"{"a":"","b":0,"é":"ü"}"#,
            r#"{"a":"\ud800","b":"\uDC00x","c":"\ud83d\ude00","d":"\u0000"}"#,
        ] {
            assert_eq!(fast(text), slow(text), "{text}");
            assert!(fast(text).is_some(), "{text}");
        }
        // Whole bodies go through the fast path and agree with it.
        let rows = parse_each("{\"a\":1}\n{\"a\":2}\n", BodyFormat::Ndjson).expect("rows");
        assert_eq!(rows.len(), 2);
    }

    #[test]
    fn anything_else_is_left_to_serde_json() {
        for text in [
            r#"{"a":[1]}"#,
            r#"{"a":{"b":1}}"#,
            r#"{"a\u0062":1}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":tru}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12"}"#,
            "{\"a\":\"tab\tinside\"}",
            r#"{"a":1,}"#,
            r#"{"a":1} x"#,
            r#"{"a" 1}"#,
            r#"{"a":1"#,
            r#"[{"a":1}]"#,
            r#"{"a":nullx}"#,
        ] {
            assert_eq!(fast(text), None, "{text}");
        }
    }

    #[test]
    fn the_template_is_recognized_only_when_equal() {
        let mut fields = Vec::new();
        assert_eq!(
            scan_flat(r#"{"a":1,"b":2}"#, &["a", "b"], &mut fields),
            Some(true)
        );
        assert_eq!(
            scan_flat(r#"{"a":1}"#, &["a", "b"], &mut fields),
            Some(false)
        );
        assert_eq!(
            scan_flat(r#"{"b":1,"a":2}"#, &["a", "b"], &mut fields),
            Some(false)
        );
        assert_eq!(
            scan_flat(r#"{"a":1,"b":2,"c":3}"#, &["a", "b"], &mut fields),
            Some(false)
        );
        assert_eq!(
            scan_flat(r#"{"a":1,"a":2}"#, &["a", "b"], &mut fields),
            None
        );
    }

    proptest! {
        /// Whenever the fast path takes a row, it reads it as serde_json does.
        #[test]
        fn the_fast_path_agrees_with_serde_json(
            text in r#"[ {}\[\]":,a-c0-9.eE+\-\\u\t\n ]{0,40}|\{("[a-c\\]{0,3}" ?: ?(-?[0-9]{1,3}(\.[0-9])?([eE][+-]?[0-9])?|"[a-z\\"\t é]{0,6}"|true|false|null|\[\]) ?,? ?){0,4}\}"#
        ) {
            if let Some(fields) = fast(&text) {
                prop_assert_eq!(Some(fields), slow(&text));
            }
        }
    }
}
