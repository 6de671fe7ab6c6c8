//! The streaming half of the parser: a byte-at-a-time lexer with QEMU's token grammar, and the
//! splitter that groups tokens into top-level messages, enforces the limits and recovers from
//! errors.
//!
//! Like QEMU's `json-streamer.c`, the splitter only counts brackets: tokens are collected until
//! the brackets balance (or a scalar stands alone), and only then is the message parsed. That
//! keeps the state carried between chunks down to the lexer state and a token list, which is why
//! feeding the same bytes in any chunking gives the same results.

use super::parse::{parse_tokens, Kind, Token};
use super::{JsonError, Limits};
use serde_json::Value;

/// Lexer states (QEMU's `json_lexer_state`, less interpolation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Start,
    /// After a lexical error: skip to a structural character or control byte.
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// Text bytes a parser keeps allocated between messages; a larger message's buffer is given
/// back once it is done.
const KEEP_TEXT_BYTES: usize = 64 << 10;
/// Tokens a parser keeps allocated between messages.
const KEEP_TOKENS: usize = 4096;

impl JsonStream {
    /// Bytes of buffers the parser holds now (its text and token buffers' capacities).
    pub fn held_bytes(&self) -> usize {
        self.text.capacity() + self.tokens.capacity() * std::mem::size_of::<Token>()
    }
}

/// An incremental QMP JSON parser: feed it bytes, get back complete values and errors.
///
/// See the [module documentation](super) for the grammar, limits and error recovery.
#[derive(Debug)]
pub struct JsonStream {
    limits: Limits,
    lex: Lex,
    /// Texts of the message's scalar tokens, followed by the token being lexed.
    text: Vec<u8>,
    /// Where the token being lexed starts in `text`.
    tok_start: usize,
    /// Stream offset of the first byte of the token being lexed (or of the last token).
    tok_pos: u64,
    /// The token being lexed is not stored: it broke the size limit, or it is being skipped.
    discard: bool,
    tokens: Vec<Token>,
    /// Structural tokens in the message: they count toward the size limit but have no text.
    structural: usize,
    /// Stream offset of the message's first token.
    msg_pos: u64,
    brace: i64,
    bracket: i64,
    /// The message already failed; its remaining tokens are dropped until its brackets close.
    skipping: bool,
    /// Stream offset of the next byte.
    pos: u64,
    out: Vec<Result<Value, JsonError>>,
}

impl Default for JsonStream {
    fn default() -> Self {
        JsonStream::new(Limits::default())
    }
}

impl JsonStream {
    /// A parser at the start of a stream, with the given limits.
    pub fn new(limits: Limits) -> JsonStream {
        let limits = Limits {
            max_message_bytes: limits.max_message_bytes.min(u32::MAX as usize),
            ..limits
        };
        JsonStream {
            limits,
            lex: Lex::Start,
            text: Vec::new(),
            tok_start: 0,
            tok_pos: 0,
            discard: false,
            tokens: Vec::new(),
            structural: 0,
            msg_pos: 0,
            brace: 0,
            bracket: 0,
            skipping: false,
            pos: 0,
            out: Vec::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Consumes `bytes` and returns every value or error they complete, in stream order.
    ///
    /// A value is returned as soon as its last token is complete; a number or keyword at top
    /// level needs the byte after it (whitespace will do) to be known complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, JsonError>> {
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            // String bodies are most of the bytes in practice; take plain runs in one go.
            if let Some(quote) = self.string_quote() {
                let run = rest
                    .iter()
                    .position(|&c| c == quote || c == b'\\' || !(0x20..=0xFD).contains(&c))
                    .unwrap_or(rest.len());
                if run > 0 {
                    let chunk = rest.get(..run).unwrap_or_default();
                    self.append(chunk);
                    self.pos += run as u64;
                    rest = rest.get(run..).unwrap_or_default();
                    continue;
                }
            }
            self.step(b);
            self.pos += 1;
            rest = tail;
        }
        std::mem::take(&mut self.out)
    }

    /// Ends the stream: completes a trailing number or keyword, reports an unterminated token or
    /// value (`premature EOI`), and resets the parser to its initial state (the byte offset
    /// carries on).
    pub fn finish(&mut self) -> Vec<Result<Value, JsonError>> {
        let mut unterminated = false;
        match self.lex {
            Lex::Zero | Lex::Digits => self.end_token(Kind::Integer),
            Lex::MantissaDigits | Lex::ExpDigits => self.end_token(Kind::Float),
            Lex::Keyword => self.end_token(Kind::Keyword),
            Lex::Start | Lex::Recovery => {}
            Lex::DqString
            | Lex::DqEscape
            | Lex::SqString
            | Lex::SqEscape
            | Lex::Sign
            | Lex::Mantissa
            | Lex::ExpE
            | Lex::ExpSign => unterminated = true,
        }
        if unterminated {
            if !self.skipping && !self.discard {
                let text = self.token_text(None);
                self.out.push(Err(JsonError::Stray {
                    text,
                    offset: self.pos,
                }));
            }
        } else if !self.skipping && !self.tokens.is_empty() {
            let result = parse_tokens(&self.tokens, &self.text, self.msg_pos);
            self.out.push(result);
        }
        self.lex = Lex::Start;
        self.discard = false;
        self.reset_message();
        std::mem::take(&mut self.out)
    }

    fn string_quote(&self) -> Option<u8> {
        match self.lex {
            Lex::DqString => Some(b'"'),
            Lex::SqString => Some(b'\''),
            _ => None,
        }
    }

    /// Runs one byte through the lexer. A byte that ends a number or keyword is looked at again
    /// in the start state (QEMU's lookahead).
    fn step(&mut self, b: u8) {
        loop {
            match self.lex {
                Lex::Start => {
                    match b {
                        b' ' | b'\t' | b'\r' | b'\n' => {}
                        b'{' => self.structural(Kind::LCurly),
                        b'}' => self.structural(Kind::RCurly),
                        b'[' => self.structural(Kind::LSquare),
                        b']' => self.structural(Kind::RSquare),
                        b',' => self.structural(Kind::Comma),
                        b':' => self.structural(Kind::Colon),
                        b'"' => self.begin_token(b, Lex::DqString),
                        b'\'' => self.begin_token(b, Lex::SqString),
                        b'0' => self.begin_token(b, Lex::Zero),
                        b'1'..=b'9' => self.begin_token(b, Lex::Digits),
                        b'-' => self.begin_token(b, Lex::Sign),
                        b'a'..=b'z' => self.begin_token(b, Lex::Keyword),
                        _ => {
                            self.begin_token(b, Lex::Start);
                            self.lex_error(b);
                        }
                    }
                    return;
                }
                Lex::Recovery => {
                    let resync = (b < 0x20 && b != b'\t')
                        || b >= 0xFE
                        || matches!(b, b'[' | b']' | b'{' | b'}' | b':' | b',');
                    if resync {
                        self.lex = Lex::Start;
                        continue;
                    }
                    return;
                }
                Lex::DqString | Lex::SqString => {
                    let quote = if self.lex == Lex::DqString {
                        b'"'
                    } else {
                        b'\''
                    };
                    self.push(b);
                    if b == quote {
                        self.end_token(Kind::String);
                    } else if b == b'\\' {
                        self.lex = if quote == b'"' {
                            Lex::DqEscape
                        } else {
                            Lex::SqEscape
                        };
                    } else if !(0x20..=0xFD).contains(&b) {
                        self.lex_error(b);
                    }
                    return;
                }
                Lex::DqEscape | Lex::SqEscape => {
                    self.push(b);
                    if (0x20..=0xFD).contains(&b) {
                        // Which escapes are valid is the parser's business, as in QEMU.
                        self.lex = if self.lex == Lex::DqEscape {
                            Lex::DqString
                        } else {
                            Lex::SqString
                        };
                    } else {
                        self.lex_error(b);
                    }
                    return;
                }
                Lex::Zero => match b {
                    b'.' => return self.shift(b, Lex::Mantissa),
                    b'e' | b'E' => return self.shift(b, Lex::ExpE),
                    b'0'..=b'9' => {
                        self.push(b);
                        return self.lex_error(b);
                    }
                    _ => self.end_token(Kind::Integer),
                },
                Lex::Sign => {
                    return match b {
                        b'0' => self.shift(b, Lex::Zero),
                        b'1'..=b'9' => self.shift(b, Lex::Digits),
                        _ => {
                            self.push(b);
                            self.lex_error(b)
                        }
                    }
                }
                Lex::Digits => match b {
                    b'0'..=b'9' => return self.push(b),
                    b'.' => return self.shift(b, Lex::Mantissa),
                    b'e' | b'E' => return self.shift(b, Lex::ExpE),
                    _ => self.end_token(Kind::Integer),
                },
                Lex::Mantissa => {
                    return match b {
                        b'0'..=b'9' => self.shift(b, Lex::MantissaDigits),
                        _ => {
                            self.push(b);
                            self.lex_error(b)
                        }
                    }
                }
                Lex::MantissaDigits => match b {
                    b'0'..=b'9' => return self.push(b),
                    b'e' | b'E' => return self.shift(b, Lex::ExpE),
                    _ => self.end_token(Kind::Float),
                },
                Lex::ExpE => {
                    return match b {
                        b'+' | b'-' => self.shift(b, Lex::ExpSign),
                        b'0'..=b'9' => self.shift(b, Lex::ExpDigits),
                        _ => {
                            self.push(b);
                            self.lex_error(b)
                        }
                    }
                }
                Lex::ExpSign => {
                    return match b {
                        b'0'..=b'9' => self.shift(b, Lex::ExpDigits),
                        _ => {
                            self.push(b);
                            self.lex_error(b)
                        }
                    }
                }
                Lex::ExpDigits => match b {
                    b'0'..=b'9' => return self.push(b),
                    _ => self.end_token(Kind::Float),
                },
                Lex::Keyword => match b {
                    b'a'..=b'z' => return self.push(b),
                    _ => self.end_token(Kind::Keyword),
                },
            }
            // The byte ended a token without being part of it: look at it again.
        }
    }

    fn shift(&mut self, b: u8, next: Lex) {
        self.push(b);
        self.lex = next;
    }

    fn begin_token(&mut self, b: u8, next: Lex) {
        self.tok_start = self.text.len();
        self.tok_pos = self.pos;
        self.discard = self.skipping;
        self.push(b);
        self.lex = next;
    }

    fn push(&mut self, b: u8) {
        self.append(&[b]);
    }

    /// Adds bytes to the token being lexed, unless that would break the size limit.
    fn append(&mut self, bytes: &[u8]) {
        if self.discard {
            return;
        }
        if self.text.len() + self.structural + bytes.len() > self.limits.max_message_bytes {
            self.fail(JsonError::TooLarge {
                limit: self.limits.max_message_bytes,
                offset: self.tok_pos,
            });
            // The rest of this token is lexed but not kept.
            self.discard = true;
            return;
        }
        self.text.extend_from_slice(bytes);
    }

    /// The token read so far, for a `stray` error: the stored bytes, or just the offending byte
    /// when the token was not being stored.
    fn token_text(&self, offending: Option<u8>) -> String {
        if self.discard {
            let b = offending.map(|b| vec![b]).unwrap_or_default();
            return String::from_utf8_lossy(&b).into_owned();
        }
        let raw = self.text.get(self.tok_start..).unwrap_or_default();
        String::from_utf8_lossy(raw).into_owned()
    }

    /// A byte that cannot continue the current token (it has already been pushed).
    fn lex_error(&mut self, b: u8) {
        let hard = !(0x20..0xFE).contains(&b);
        let report = hard || (!self.skipping && !self.discard);
        let err = JsonError::Stray {
            text: self.token_text(Some(b)),
            offset: self.pos,
        };
        self.text.truncate(self.tok_start);
        self.discard = false;
        self.lex = Lex::Recovery;
        if hard {
            // The client's way to say "forget everything": drop the message, brackets and all.
            self.out.push(Err(err));
            self.reset_message();
        } else if report {
            self.fail(err);
        }
    }

    /// A scalar token is complete.
    fn end_token(&mut self, kind: Kind) {
        self.lex = Lex::Start;
        if self.discard {
            // Too large (already reported) or part of a message being skipped.
            self.text.truncate(self.tok_start);
            self.discard = false;
            return;
        }
        let len = self.text.len().saturating_sub(self.tok_start);
        let token = Token {
            kind,
            start: self.tok_start as u32,
            len: len as u32,
            rel: 0,
        };
        self.accept(token);
    }

    fn structural(&mut self, kind: Kind) {
        self.tok_pos = self.pos;
        self.accept(Token {
            kind,
            start: 0,
            len: 0,
            rel: 0,
        });
    }

    /// Adds a complete token to the message; parses the message once its brackets balance.
    fn accept(&mut self, mut token: Token) {
        match token.kind {
            Kind::LCurly => self.brace += 1,
            Kind::RCurly => self.brace -= 1,
            Kind::LSquare => self.bracket += 1,
            Kind::RSquare => self.bracket -= 1,
            _ => {}
        }
        let open = self.brace > 0 || self.bracket > 0;
        let negative = self.brace < 0 || self.bracket < 0;
        if self.skipping {
            if !open || negative {
                self.reset_message();
            }
            return;
        }
        if self.tokens.is_empty() {
            self.msg_pos = self.tok_pos;
        }
        token.rel = u32::try_from(self.tok_pos.saturating_sub(self.msg_pos)).unwrap_or(u32::MAX);
        if token.len == 0 {
            if self.text.len() + self.structural + 1 > self.limits.max_message_bytes {
                return self.fail(JsonError::TooLarge {
                    limit: self.limits.max_message_bytes,
                    offset: self.tok_pos,
                });
            }
            self.structural += 1;
        }
        if self.tokens.len() >= self.limits.max_tokens {
            return self.fail(JsonError::TooManyTokens {
                limit: self.limits.max_tokens,
                offset: self.tok_pos,
            });
        }
        let depth = self.brace.max(0) + self.bracket.max(0);
        if depth as u64 > self.limits.max_nesting as u64 {
            return self.fail(JsonError::TooDeep {
                limit: self.limits.max_nesting,
                offset: self.tok_pos,
            });
        }
        self.tokens.push(token);
        if open && !negative {
            return;
        }
        let result = parse_tokens(&self.tokens, &self.text, self.msg_pos);
        self.out.push(result);
        self.reset_message();
    }

    /// Reports an error in the current message and drops it; if it is still open, skips the
    /// rest of it.
    fn fail(&mut self, err: JsonError) {
        self.out.push(Err(err));
        let (brace, bracket) = (self.brace, self.bracket);
        let still_open = (brace > 0 || bracket > 0) && brace >= 0 && bracket >= 0;
        self.reset_message();
        if still_open {
            self.brace = brace;
            self.bracket = bracket;
            self.skipping = true;
        }
    }

    fn reset_message(&mut self) {
        self.tokens.clear();
        self.text.clear();
        // One oversized message must not keep its memory for the rest of the connection.
        self.tokens.shrink_to(KEEP_TOKENS);
        self.text.shrink_to(KEEP_TEXT_BYTES);
        self.tok_start = 0;
        self.structural = 0;
        self.brace = 0;
        self.bracket = 0;
        self.skipping = false;
    }
}
