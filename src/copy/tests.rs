//! Tests of the COPY field encoder: exact bytes for the cases PostgreSQL's
//! `jsonb_populate_record` was checked against, and properties over random JSON.

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

proptest! {
    /// The integer fast path of `is_json_number` says what the full parse says.
    #[test]
    fn is_json_number_agrees_with_the_parser(text in "-?[0-9+.eE-]{0,8}") {
        prop_assert_eq!(
            is_json_number(&text),
            !matches!(numeric::parse(&text), Err(ValueError::Malformed)),
            "{:?}", text
        );
    }

    /// A dead letter shows a COPY row's fields as the text PostgreSQL would have read.
    #[test]
    fn line_to_json_undoes_escape_text(a in "[^\u{0}]*", b in "[^\u{0}]*", null in any::<bool>()) {
        let mut line = Vec::new();
        escape_text(&a, &mut line);
        line.push(b'\t');
        if null {
            line.extend_from_slice(b"\\N");
        } else {
            escape_text(&b, &mut line);
        }
        line.push(b'\n');
        let columns = ["a".to_string(), "b".to_string()];
        let shown: serde_json::Value =
            serde_json::from_str(&line_to_json(&line, &columns)).expect("JSON");
        let b = if null { serde_json::Value::Null } else { b.into() };
        prop_assert_eq!(shown, serde_json::json!({ "a": a, "b": b }));
    }
}

#[test]
fn line_to_json_reads_octal_and_hex_escapes() {
    let columns = ["x".to_string()];
    assert_eq!(
        line_to_json(b"\\101\\x42\\\\N", &columns),
        r#"{"x":"AB\\N"}"#
    );
}
