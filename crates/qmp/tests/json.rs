//! The QMP JSON parser against QEMU 7.2's behaviour (expected texts were taken from a running
//! QEMU 7.2 fed the same bytes), plus property tests: round trips, chunking invariance, no
//! panics on arbitrary input.

use proptest::prelude::*;
use qmp::json::{parse_all, to_ascii_string, to_line, JsonError, JsonStream, Limits, SyntaxError};
use serde_json::{json, Value};

/// What a client would see for each result: the value, or the error text.
fn outcomes(input: &[u8]) -> Vec<Result<Value, String>> {
    parse_all(input)
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
}

fn err(s: &str) -> Result<Value, String> {
    Err(s.to_string())
}

#[test]
fn grammar_errors_read_like_qemu() {
    let cases: &[(&[u8], &[&str])] = &[
        (b"{,}", &["JSON parse error, expecting value"]),
        (b"{\"a\":}", &["JSON parse error, expecting value"]),
        (b"[,]", &["JSON parse error, expecting value"]),
        (
            b"{[1]:2}",
            &["JSON parse error, key is not a string in object"],
        ),
        (
            b"{\"a\" 1}",
            &["JSON parse error, missing : in object pair"],
        ),
        (
            b"{\"a\":1 \"b\":2}",
            &["JSON parse error, expected separator in dict"],
        ),
        (b"[1 2]", &["JSON parse error, expected separator in list"]),
        (b"[1,]", &["JSON parse error, expecting value"]),
        (b"{\"a\":1,}", &["JSON parse error, expecting value"]),
        (b"tru ", &["JSON parse error, invalid keyword 'tru'"]),
        (b"01", &["JSON parse error, stray '01'"]),
        (b"-}", &["JSON parse error, stray '-}'"]),
        (
            b"NaN,",
            &[
                "JSON parse error, stray 'N'",
                "JSON parse error, expecting value",
            ],
        ),
        (
            b"[\"a\":1]",
            &["JSON parse error, expected separator in list"],
        ),
        (
            b"{\"a\",1}",
            &["JSON parse error, missing : in object pair"],
        ),
        (b"{\"a\":1,\"a\":2}", &["JSON parse error, duplicate key"]),
        (b"\"abc\n", &["JSON parse error, stray '\"abc\n'"]),
        (
            b"{\"id\":\"\x01\"}",
            &[
                "JSON parse error, stray '\"\u{1}'",
                "JSON parse error, expecting value",
            ],
        ),
        (
            b"{\"id\":\"\xff\"}",
            &[
                "JSON parse error, stray '\"\u{fffd}'",
                "JSON parse error, expecting value",
            ],
        ),
        (
            b"{\"a\":[1 2]}",
            &["JSON parse error, expected separator in list"],
        ),
    ];
    for (input, want) in cases {
        let got = outcomes(input);
        let want: Vec<_> = want.iter().map(|s| err(s)).collect();
        assert_eq!(got, want, "input {:?}", String::from_utf8_lossy(input));
    }
}

#[test]
fn strings_follow_qemu_rules() {
    let ok: &[(&[u8], &str)] = &[
        (b"'it\\'s'", "it's"),
        (b"\"it\\'s\"", "it's"),
        (b"'say \"hi\"'", "say \"hi\""),
        (b"\"a\\u00e9\\ud83d\\ude00\"", "a\u{e9}\u{1f600}"),
        (b"\"\xc3\xa9\xf0\x9f\x98\x80\"", "\u{e9}\u{1f600}"),
        (b"\"\\u0000\"", "\0"),
        (b"\"\xc0\x80\"", "\0"),
        (b"\"\\/\\b\\f\\n\\r\\t\\\\\\\"\"", "/\u{8}\u{c}\n\r\t\\\""),
    ];
    for (input, want) in ok {
        assert_eq!(
            outcomes(input),
            vec![Ok(json!(want))],
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
    let bad: &[(&[u8], &str)] = &[
        (
            b"\"\\ud800\"",
            "JSON parse error, \\ud800 is not a valid Unicode character",
        ),
        (
            b"\"\\uDE00\"",
            "JSON parse error, \\uDE00 is not a valid Unicode character",
        ),
        (
            b"\"\\uD83D\\u0041\"",
            "JSON parse error, \\uD83D is not a valid Unicode character",
        ),
        (
            b"\"\\u12g4\"",
            "JSON parse error, \\u12g4 is not a valid Unicode character",
        ),
        (
            b"\"\\u12\"",
            "JSON parse error, \\u12\" is not a valid Unicode character",
        ),
        (
            b"\"\\uffff\"",
            "JSON parse error, \\uffff is not a valid Unicode character",
        ),
        (
            b"\"\\ufdd0\"",
            "JSON parse error, \\ufdd0 is not a valid Unicode character",
        ),
        (
            b"\"\\x\"",
            "JSON parse error, invalid escape sequence in string",
        ),
        (
            b"\"\xc3\"",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
        (
            b"\"\xed\xa0\x80\"",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
        (
            b"\"\xef\xbf\xbf\"",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
        (
            b"\"\xf4\x90\x80\x80\"",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
        (
            b"\"\xe0\x80\xaf\"",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
        (
            b"\"\x80\"",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
    ];
    for (input, want) in bad {
        assert_eq!(
            outcomes(input),
            vec![err(want)],
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn numbers_keep_qemus_int_float_split() {
    let r = parse_all(b"[0, -0, 9223372036854775807, 9223372036854775808, 18446744073709551615, 18446744073709551616, -9223372036854775808, -9223372036854775809, 1.5, 1e3, 0e5, -0.25E-2]");
    let Ok(Value::Array(v)) = &r[0] else {
        panic!("{r:?}")
    };
    assert!(v[0].is_i64() && v[1].is_i64() && v[2].is_i64());
    assert_eq!(v[2].as_i64(), Some(i64::MAX));
    assert!(v[3].is_u64() && !v[3].is_i64());
    assert_eq!(v[4].as_u64(), Some(u64::MAX));
    assert!(v[5].is_f64());
    assert_eq!(v[6].as_i64(), Some(i64::MIN));
    assert!(v[7].is_f64());
    assert_eq!(v[8].as_f64(), Some(1.5));
    assert!(v[9].is_f64() && v[9].as_f64() == Some(1000.0));
    assert!(v[10].is_f64() && v[10].as_f64() == Some(0.0));
    assert_eq!(v[11].as_f64(), Some(-0.0025));
    assert_eq!(
        outcomes(b"1e400 "),
        vec![err("JSON parse error, number out of range")]
    );
    assert_eq!(outcomes(b"+1 "), vec![err("JSON parse error, stray '+'")]);
    assert_eq!(outcomes(b"1. "), vec![err("JSON parse error, stray '1. '")]);
    assert_eq!(outcomes(b".5 "), vec![err("JSON parse error, stray '.'")]);
}

#[test]
fn values_complete_as_soon_as_their_last_token_does() {
    let mut s = JsonStream::default();
    assert!(s.feed(b"{\"execute\": \"x\"").is_empty());
    assert_eq!(s.feed(b"}"), vec![Ok(json!({"execute": "x"}))]);
    // A top-level number needs the next byte to be known complete.
    assert!(s.feed(b"12").is_empty());
    assert_eq!(s.feed(b"3 "), vec![Ok(json!(123))]);
    assert!(s.feed(b"true").is_empty());
    assert_eq!(s.finish(), vec![Ok(json!(true))]);
    assert_eq!(s.position(), 24);
}

#[test]
fn end_of_input_reports_what_it_cuts_short() {
    assert_eq!(
        outcomes(b"{\"a\":"),
        vec![err("JSON parse error, premature EOI")]
    );
    assert_eq!(
        outcomes(b"[1,"),
        vec![err("JSON parse error, premature EOI")]
    );
    assert_eq!(
        outcomes(b"\"abc"),
        vec![err("JSON parse error, stray '\"abc'")]
    );
    assert_eq!(outcomes(b"-"), vec![err("JSON parse error, stray '-'")]);
    assert_eq!(outcomes(b"1"), vec![Ok(json!(1))]);
    assert_eq!(outcomes(b"  \n"), vec![]);
}

#[test]
fn control_characters_reset_the_parser() {
    // A client stuck in the middle of an object sends a control character and starts over.
    let got = outcomes(b"{\"execute\": [1, {\x04{\"execute\":\"x\"}");
    assert_eq!(
        got,
        vec![
            err("JSON parse error, stray '\u{4}'"),
            Ok(json!({"execute": "x"}))
        ]
    );
    let got = outcomes(b"[[[[[\xff{}");
    assert_eq!(
        got,
        vec![err("JSON parse error, stray '\u{fffd}'"), Ok(json!({}))]
    );
    // Newlines and tabs are whitespace, not resets.
    assert_eq!(outcomes(b"{\n\t\"a\"\r\n:1}"), vec![Ok(json!({"a": 1}))]);
}

#[test]
fn a_bad_value_costs_one_error_and_no_more() {
    // QEMU 7.2 answers this with two errors (it forgets the open brace after the stray '@');
    // we skip to the end of the value.
    let got = outcomes(b"{\"a\":1 @ \"b\"} {\"ok\":true}");
    assert_eq!(
        got,
        vec![err("JSON parse error, stray '@'"), Ok(json!({"ok": true}))]
    );
    let got = outcomes(b"{\"a\": [1, 2 3], \"b\": {}} {\"ok\":1}");
    assert_eq!(
        got,
        vec![
            err("JSON parse error, expected separator in list"),
            Ok(json!({"ok": 1}))
        ]
    );
    let got = outcomes(b"{\"a\": \"x\\qy\"}[2]");
    assert_eq!(
        got,
        vec![
            err("JSON parse error, invalid escape sequence in string"),
            Ok(json!([2]))
        ]
    );
}

#[test]
fn limits_are_enforced_and_recovered_from() {
    let deep = format!("{}{} [1]", "[".repeat(1025), "]".repeat(1025));
    let got = parse_all(deep.as_bytes());
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        matches!(
            got[0],
            Err(JsonError::TooDeep {
                limit: 1024,
                offset: 1024
            })
        ),
        "{got:?}"
    );
    assert_eq!(
        got[0].as_ref().unwrap_err().to_string(),
        "JSON nesting depth limit exceeded"
    );
    assert_eq!(got[1], Ok(json!([1])));
    let ok = format!("{}{}", "[".repeat(1024), "]".repeat(1024));
    assert!(parse_all(ok.as_bytes())[0].is_ok());

    let small = Limits {
        max_message_bytes: 64,
        max_tokens: 10,
        max_nesting: 4,
    };
    let mut s = JsonStream::new(small);
    let long = format!("[\"{}\"] [1]", "x".repeat(100));
    let got = s.feed(long.as_bytes());
    assert!(
        matches!(got[0], Err(JsonError::TooLarge { limit: 64, .. })),
        "{got:?}"
    );
    assert_eq!(
        got[0].as_ref().unwrap_err().to_string(),
        "JSON token size limit exceeded"
    );
    assert_eq!(got[1..], [Ok(json!([1]))]);
    // A huge top-level string is dropped without being stored.
    let got = s.feed(format!("\"{}\" 7 ", "y".repeat(10_000)).as_bytes());
    assert!(matches!(got[0], Err(JsonError::TooLarge { .. })), "{got:?}");
    assert_eq!(got[1..], [Ok(json!(7))]);
    let got = s.feed(b"[1,2,3,4,5,6] [1,2]");
    assert_eq!(
        got[0].as_ref().unwrap_err().to_string(),
        "JSON token count limit exceeded"
    );
    assert_eq!(got[1..], [Ok(json!([1, 2]))]);
}

#[test]
fn errors_say_where() {
    let got = parse_all(b"  {\"a\" 1}  @");
    assert!(
        matches!(
            got[0],
            Err(JsonError::Syntax {
                kind: SyntaxError::MissingColon,
                offset: 7
            })
        ),
        "{got:?}"
    );
    assert_eq!(got[1].as_ref().unwrap_err().offset(), 11);
}

#[test]
fn output_is_ascii_crlf_in_qemus_layout() {
    let v = json!({"event": "X", "data": {"s": "é\u{1f600}\u{7f}\u{1}\n/", "n": [1, -2, 2.5, null, false]}});
    assert_eq!(
        to_ascii_string(&v),
        r#"{"event": "X", "data": {"s": "\u00E9\uD83D\uDE00\u007F\u0001\n/", "n": [1, -2, 2.5, null, false]}}"#
    );
    assert!(to_line(&v).ends_with(b"}\r\n"));
}

/// Strings QEMU accepts: no noncharacters (which it refuses).
fn qmp_string() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| {
        s.chars()
            .map(|c| {
                let cp = c as u32;
                if (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE {
                    'x'
                } else {
                    c
                }
            })
            .collect()
    })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        qmp_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((qmp_string(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Fragments that reach every corner of the lexer and splitter.
fn soup() -> impl Strategy<Value = Vec<u8>> {
    let pieces: Vec<&'static [u8]> = vec![
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b" ",
        b"\n",
        b"\"a\"",
        b"'b'",
        b"\"\\u00e9\"",
        b"\"\\ud83d\\ude00\"",
        b"\"\\x\"",
        b"1",
        b"-2.5e3",
        b"0",
        b"01",
        b"true",
        b"tru",
        b"null",
        b"\x04",
        b"\xff",
        b"@",
        b"\"",
        b"\\",
        b"\xc3\xa9",
        b"\xc3",
        b"{\"execute\":\"x\"}",
        b"'",
    ];
    prop::collection::vec(prop::sample::select(pieces), 0..40).prop_map(|v| v.concat())
}

/// Feeds `input` cut at `cuts` (sorted offsets) and returns everything produced.
fn feed_in_pieces(input: &[u8], cuts: &[usize], limits: Limits) -> Vec<Result<Value, JsonError>> {
    let mut s = JsonStream::new(limits);
    let mut out = Vec::new();
    let mut last = 0;
    for &c in cuts {
        let c = c.min(input.len()).max(last);
        out.extend(s.feed(&input[last..c]));
        last = c;
    }
    out.extend(s.feed(&input[last..]));
    out.extend(s.finish());
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn serde_json_text_parses_back_equal(v in json_value()) {
        let text = serde_json::to_string(&v).unwrap();
        prop_assert_eq!(parse_all(text.as_bytes()), vec![Ok(v.clone())]);
        // And our own ASCII rendering, with every non-ASCII character escaped.
        let ascii = to_line(&v);
        prop_assert!(ascii.is_ascii());
        prop_assert_eq!(parse_all(&ascii), vec![Ok(v)]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_all(&bytes);
        let tiny = Limits { max_message_bytes: 8, max_tokens: 4, max_nesting: 2 };
        let mut s = JsonStream::new(tiny);
        let _ = s.feed(&bytes);
        let _ = s.finish();
    }

    #[test]
    fn chunking_does_not_matter(
        input in prop_oneof![soup(), prop::collection::vec(any::<u8>(), 0..256)],
        mut cuts in prop::collection::vec(0usize..300, 0..8),
    ) {
        cuts.sort_unstable();
        let whole = parse_all(&input);
        prop_assert_eq!(&feed_in_pieces(&input, &cuts, Limits::default()), &whole);
        let tiny = Limits { max_message_bytes: 16, max_tokens: 6, max_nesting: 3 };
        let mut one = JsonStream::new(tiny);
        let mut expect = one.feed(&input);
        expect.extend(one.finish());
        prop_assert_eq!(feed_in_pieces(&input, &cuts, tiny), expect);
    }

    #[test]
    fn a_message_split_anywhere_parses_the_same(v in json_value(), mut cuts in prop::collection::vec(0usize..400, 0..6)) {
        cuts.sort_unstable();
        let text = format!("{} ", serde_json::to_string(&v).unwrap());
        prop_assert_eq!(feed_in_pieces(text.as_bytes(), &cuts, Limits::default()), vec![Ok(v)]);
    }

    #[test]
    fn recovery_after_garbage(garbage in soup()) {
        // Whatever came before, a reset byte and a complete command get the command through.
        let mut input = garbage;
        input.extend_from_slice(b"\x04{\"execute\":\"query-version\",\"id\":7}");
        let got = parse_all(&input);
        prop_assert_eq!(got.last(), Some(&Ok(json!({"execute": "query-version", "id": 7}))));
    }
}

/// Issue 14: one oversized message must not keep its memory for the rest of the connection.
#[test]
fn memory_goes_back_after_an_oversized_message() {
    let mut p = JsonStream::new(Limits::default());
    let big = format!(
        "{{\"execute\": \"x\", \"arguments\": {{\"s\": \"{}\", \"l\": [{}]}}}}",
        "a".repeat(4 << 20),
        vec!["1"; 100_000].join(",")
    );
    let out = p.feed(big.as_bytes());
    assert_eq!(out.len(), 1);
    assert!(out[0].is_ok());
    assert!(
        p.held_bytes() <= 1 << 20,
        "the parser still holds {} bytes",
        p.held_bytes()
    );
    // And it still parses.
    assert_eq!(
        p.feed(b"{\"execute\": \"y\"}"),
        vec![Ok(json!({"execute": "y"}))]
    );
}
