//! The grammar half of the parser: turns one message's tokens into a `serde_json::Value`.
//!
//! It reports the first error QEMU's recursive-descent `json-parser.c` would report for the same
//! tokens, but walks them with an explicit stack, so no input can exhaust the thread's stack
//! whatever nesting limit is configured. Strings are decoded here rather than in the lexer, as
//! in QEMU: the lexer only knows where a string ends.

use super::{JsonError, SyntaxError};
use serde_json::{Map, Number, Value};

/// Token types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

/// One token of a message. Scalar tokens' text lives in the message's text buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Token {
    pub kind: Kind,
    /// Start of the token's text in the message's text buffer.
    pub start: u32,
    /// Length of the token's text (0 for structural tokens).
    pub len: u32,
    /// Offset of the token from the message's first token, for error reports.
    pub rel: u32,
}

/// A container being filled.
enum Frame {
    List(Vec<Value>),
    /// An object, and the key whose value is being parsed (`None` while parsing a key).
    Dict(Map<String, Value>, Option<String>),
}

/// Parses one complete message. `msg_pos` is the stream offset of its first token.
pub(crate) fn parse_tokens(
    tokens: &[Token],
    text: &[u8],
    msg_pos: u64,
) -> Result<Value, JsonError> {
    let mut parser = Parser {
        tokens,
        text,
        next: 0,
    };
    parser.value().map_err(|(kind, at)| {
        let at = at.min(tokens.len().saturating_sub(1));
        let rel = tokens.get(at).map(|t| t.rel).unwrap_or(0);
        JsonError::Syntax {
            kind,
            offset: msg_pos + u64::from(rel),
        }
    })
}

struct Parser<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    /// Index of the next token.
    next: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<Kind> {
        self.tokens.get(self.next).map(|t| t.kind)
    }

    fn pop(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.next).copied();
        if t.is_some() {
            self.next += 1;
        }
        t
    }

    fn token_text(&self, t: &Token) -> &[u8] {
        let start = t.start as usize;
        self.text
            .get(start..start + t.len as usize)
            .unwrap_or_default()
    }

    /// Parses the message; an error comes with the index of the token it was found at.
    fn value(&mut self) -> Result<Value, (SyntaxError, usize)> {
        let mut stack: Vec<Frame> = Vec::new();
        'value: loop {
            // Parse the value at the cursor; containers push a frame and loop for their first
            // element.
            let token = self.tokens.get(self.next).copied();
            let mut done = match token {
                None => return Err((SyntaxError::PrematureEoi, self.tokens.len())),
                Some(t) => match t.kind {
                    Kind::LCurly => {
                        self.next += 1;
                        match self.peek() {
                            None => return Err((SyntaxError::PrematureEoi, self.tokens.len())),
                            Some(Kind::RCurly) => {
                                self.next += 1;
                                Value::Object(Map::new())
                            }
                            Some(_) => {
                                stack.push(Frame::Dict(Map::new(), None));
                                continue 'value;
                            }
                        }
                    }
                    Kind::LSquare => {
                        self.next += 1;
                        match self.peek() {
                            None => return Err((SyntaxError::PrematureEoi, self.tokens.len())),
                            Some(Kind::RSquare) => {
                                self.next += 1;
                                Value::Array(Vec::new())
                            }
                            Some(_) => {
                                stack.push(Frame::List(Vec::new()));
                                continue 'value;
                            }
                        }
                    }
                    Kind::String => {
                        let s = decode_string(self.token_text(&t)).map_err(|e| (e, self.next))?;
                        self.next += 1;
                        Value::String(s)
                    }
                    Kind::Integer => {
                        let v = number(self.token_text(&t), true).map_err(|e| (e, self.next))?;
                        self.next += 1;
                        v
                    }
                    Kind::Float => {
                        let v = number(self.token_text(&t), false).map_err(|e| (e, self.next))?;
                        self.next += 1;
                        v
                    }
                    Kind::Keyword => {
                        let word = self.token_text(&t);
                        let v = match word {
                            b"true" => Value::Bool(true),
                            b"false" => Value::Bool(false),
                            b"null" => Value::Null,
                            _ => {
                                let w = String::from_utf8_lossy(word).into_owned();
                                return Err((SyntaxError::InvalidKeyword(w), self.next));
                            }
                        };
                        self.next += 1;
                        v
                    }
                    Kind::RCurly | Kind::RSquare | Kind::Colon | Kind::Comma => {
                        return Err((SyntaxError::ExpectingValue, self.next))
                    }
                },
            };
            // Fold the finished value into the enclosing containers, closing those it ends.
            loop {
                match stack.pop() {
                    None => return Ok(done),
                    Some(Frame::List(mut items)) => {
                        items.push(done);
                        match self.pop().map(|t| t.kind) {
                            None => return Err((SyntaxError::PrematureEoi, self.tokens.len())),
                            Some(Kind::RSquare) => done = Value::Array(items),
                            Some(Kind::Comma) => {
                                stack.push(Frame::List(items));
                                continue 'value;
                            }
                            Some(_) => {
                                return Err((
                                    SyntaxError::ExpectedListSeparator,
                                    self.next.saturating_sub(1),
                                ))
                            }
                        }
                    }
                    Some(Frame::Dict(map, None)) => {
                        let Value::String(key) = done else {
                            return Err((SyntaxError::KeyNotString, self.next.saturating_sub(1)));
                        };
                        match self.pop().map(|t| t.kind) {
                            None => return Err((SyntaxError::PrematureEoi, self.tokens.len())),
                            Some(Kind::Colon) => {}
                            Some(_) => {
                                return Err((
                                    SyntaxError::MissingColon,
                                    self.next.saturating_sub(1),
                                ))
                            }
                        }
                        stack.push(Frame::Dict(map, Some(key)));
                        continue 'value;
                    }
                    Some(Frame::Dict(mut map, Some(key))) => {
                        if map.contains_key(&key) {
                            return Err((SyntaxError::DuplicateKey, self.next.saturating_sub(1)));
                        }
                        map.insert(key, done);
                        match self.pop().map(|t| t.kind) {
                            None => return Err((SyntaxError::PrematureEoi, self.tokens.len())),
                            Some(Kind::RCurly) => done = Value::Object(map),
                            Some(Kind::Comma) => {
                                stack.push(Frame::Dict(map, None));
                                continue 'value;
                            }
                            Some(_) => {
                                return Err((
                                    SyntaxError::ExpectedDictSeparator,
                                    self.next.saturating_sub(1),
                                ))
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Converts a number token: integers to `i64`, else `u64`, else `f64`, as QEMU does.
fn number(raw: &[u8], integer: bool) -> Result<Value, SyntaxError> {
    // The lexer only lets ASCII digits, signs, '.', 'e' and 'E' into a number.
    let text = std::str::from_utf8(raw).map_err(|_| SyntaxError::NumberOutOfRange)?;
    if integer {
        if let Ok(v) = text.parse::<i64>() {
            return Ok(Value::from(v));
        }
        if !text.starts_with('-') {
            if let Ok(v) = text.parse::<u64>() {
                return Ok(Value::from(v));
            }
        }
    }
    let f: f64 = text.parse().map_err(|_| SyntaxError::NumberOutOfRange)?;
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or(SyntaxError::NumberOutOfRange)
}

/// The byte at `i`, or NUL past the end (QEMU's strings are NUL-terminated; the same sentinel
/// keeps the look-ahead below simple).
fn byte(raw: &[u8], i: usize) -> u8 {
    raw.get(i).copied().unwrap_or(0)
}

/// Four hex digits at `i` as a number, or `None`.
fn hex4(raw: &[u8], i: usize) -> Option<u32> {
    let mut cp = 0u32;
    for k in 0..4 {
        let d = char::from(byte(raw, i + k)).to_digit(16)?;
        cp = (cp << 4) | d;
    }
    Some(cp)
}

/// QEMU's `is_valid_codepoint`: a Unicode scalar value that is not a noncharacter.
fn valid_codepoint(cp: u32) -> bool {
    cp <= 0x10FFFF
        && !(0xFDD0..=0xFDEF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
        && !(0xD800..=0xDFFF).contains(&cp)
}

/// Decodes one modified-UTF-8 character at `i` (QEMU's `mod_utf8_codepoint`): like UTF-8, but
/// `C0 80` stands for U+0000, and noncharacters are refused. Returns the character and its
/// length.
fn utf8_char(raw: &[u8], i: usize) -> Result<(char, usize), SyntaxError> {
    const MIN: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let b0 = byte(raw, i);
    if b0 >= 0xFE || b0 & 0xC0 == 0x80 || b0 < 0x80 {
        // Impossible bytes and stray continuation bytes (ASCII never comes here).
        return Err(SyntaxError::InvalidUtf8);
    }
    let len = b0.leading_ones() as usize; // 2..=6 for 0xC0..=0xFD
    let mut cp = u32::from(b0) & (0x7F >> len);
    for k in 1..len {
        let c = byte(raw, i + k);
        if c & 0xC0 != 0x80 {
            return Err(SyntaxError::InvalidUtf8);
        }
        cp = (cp << 6) | u32::from(c & 0x3F);
    }
    let min = MIN.get(len - 2).copied().unwrap_or(0);
    if !valid_codepoint(cp) || (cp < min && !(cp == 0 && len == 2)) {
        return Err(SyntaxError::InvalidUtf8);
    }
    let c = char::from_u32(cp).ok_or(SyntaxError::InvalidUtf8)?;
    Ok((c, len))
}

/// Decodes a string token, quotes included, with QEMU's escapes and error messages.
pub(crate) fn decode_string(raw: &[u8]) -> Result<String, SyntaxError> {
    // The lexer guarantees an opening and a closing quote of the same kind.
    let end = raw.len().saturating_sub(1);
    let mut out = String::with_capacity(end);
    let mut i = 1;
    while i < end {
        let b = byte(raw, i);
        if b == b'\\' {
            let beg = i;
            let e = byte(raw, i + 1);
            i += 2;
            let c = match e {
                b'"' => '"',
                b'\'' => '\'',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let mut cp = hex4(raw, i);
                    i += 4;
                    if let Some(lead @ 0xD800..=0xDBFF) = cp {
                        if byte(raw, i) == b'\\' && byte(raw, i + 1) == b'u' {
                            cp = match hex4(raw, i + 2) {
                                Some(trail @ 0xDC00..=0xDFFF) => {
                                    i += 6;
                                    Some(0x10000 + ((lead & 0x3FF) << 10) + (trail & 0x3FF))
                                }
                                _ => None,
                            };
                        }
                    }
                    match cp.filter(|&c| valid_codepoint(c)).and_then(char::from_u32) {
                        Some(c) => c,
                        None => {
                            let shown = raw.get(beg..i.min(raw.len())).unwrap_or_default();
                            let shown = String::from_utf8_lossy(shown).into_owned();
                            return Err(SyntaxError::InvalidUnicodeEscape(shown));
                        }
                    }
                }
                _ => return Err(SyntaxError::InvalidEscape),
            };
            out.push(c);
        } else if b < 0x80 {
            // A run of plain ASCII up to the next escape or non-ASCII byte.
            let rest = raw.get(i..end).unwrap_or_default();
            let run = rest
                .iter()
                .position(|&c| c == b'\\' || c >= 0x80)
                .unwrap_or(rest.len());
            let chunk = rest.get(..run).unwrap_or_default();
            out.push_str(std::str::from_utf8(chunk).map_err(|_| SyntaxError::InvalidUtf8)?);
            i += run;
        } else {
            let (c, len) = utf8_char(raw, i)?;
            out.push(c);
            i += len;
        }
    }
    Ok(out)
}
