//! JSON as QMP speaks it: a streaming parser for what clients send, and the serializer for what
//! the server sends back.
//!
//! # Input
//!
//! [`JsonStream`] takes bytes as they arrive from a socket, in chunks of any size, and hands back
//! every complete top-level value, or an error where the input was not JSON. It follows QEMU's
//! parser (`qobject/json-lexer.c`, `json-streamer.c`, `json-parser.c`), so a client sees the same
//! replies it would see from QEMU:
//!
//! * RFC 8259, plus QEMU's two extensions: `'single-quoted'` strings, and the escape `\'` in both
//!   quoting styles. Nothing else: no trailing commas, no `NaN`, no comments, duplicate keys are
//!   an error, strings must be valid (modified) UTF-8 without noncharacters.
//! * Numbers keep QEMU's integer/float distinction: an integer literal becomes an `i64` if it
//!   fits, else a `u64` if it fits, else an `f64`; a literal with a fraction or exponent is always
//!   an `f64`. Unlike QEMU, which accepts `1e400` as infinity (and then prints `inf`, which is not
//!   JSON), a number that does not fit a finite `f64` is an error. Also unlike QEMU's lexer,
//!   `0e5` is one number (RFC 8259 allows it; QEMU splits it into `0`, `e`, `5`).
//! * Error texts are QEMU's: `JSON parse error, stray '@'`, `JSON parse error, expecting value`,
//!   `JSON nesting depth limit exceeded`, and so on (see [`JsonError`] and [`SyntaxError`]).
//!
//! ## Limits
//!
//! Per message, as in QEMU's `json-streamer.c`: at most [`Limits::max_nesting`] open brackets
//! and braces (QEMU: 1024), at most [`Limits::max_tokens`] tokens (QEMU: 2 Mi), and at most
//! [`Limits::max_message_bytes`] bytes of tokens, whitespace not counted. QEMU allows 64 MiB;
//! our default is 16 MiB, which is far above any real QMP command and keeps a hostile client's
//! memory use per connection small. The size limit is enforced as bytes arrive, so an endless
//! string cannot grow the buffer past it.
//!
//! ## Recovery
//!
//! A client whose input was garbage gets an error and can carry on:
//!
//! * A syntax error is found once the top-level value is complete, and the whole value is
//!   dropped, so one bad command costs exactly one error reply.
//! * A lexical error (a byte that cannot start or continue a token, such as `@`) inside a
//!   value is reported once, and the rest of that top-level value is skipped, tracking brackets,
//!   until it closes. Exceeding a limit does the same.
//! * An ASCII control character other than `\t`, `\r`, `\n` (and the bytes `0xFE`, `0xFF`, which
//!   never occur in UTF-8) resets the parser at once, wherever it is, as `qmp-spec.rst`
//!   promises: it is reported as a stray character, and whatever was half-read is dropped. A
//!   client that lost track of its own output sends one to start afresh.
//!
//! # Output
//!
//! [`to_line`] serializes a reply or event as QEMU does: ASCII only (everything else, and DEL,
//! as `\uXXXX` escapes, with surrogate pairs beyond the BMP), `", "` and `": "` as separators,
//! terminated by CRLF.

mod parse;
mod ser;
mod stream;

pub use ser::{to_ascii_string, to_line};
pub use stream::JsonStream;

use serde_json::Value;

/// Limits on one top-level message, checked while it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of the message's tokens (whitespace between tokens is not counted).
    /// Values above `u32::MAX` are treated as `u32::MAX`.
    pub max_message_bytes: usize,
    /// Number of tokens (each bracket, comma, colon, string, number or keyword is one).
    pub max_tokens: usize,
    /// Brackets and braces open at once.
    pub max_nesting: usize,
}

impl Limits {
    /// QEMU's own limits: 64 MiB of tokens, 2 Mi tokens, nesting 1024.
    pub const QEMU: Limits = Limits {
        max_message_bytes: 64 << 20,
        max_tokens: 2 << 20,
        max_nesting: 1024,
    };
}

impl Default for Limits {
    /// QEMU's token count and nesting limits, with a 16 MiB size limit instead of 64 MiB.
    fn default() -> Self {
        Limits {
            max_message_bytes: 16 << 20,
            ..Limits::QEMU
        }
    }
}

/// Why some input is not a JSON value. The `Display` text is what QEMU puts in the `desc` of the
/// error reply, word for word; `offset` says where in the connection's byte stream (counting
/// from 0) the problem was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// A byte that cannot start or continue a token. `text` is the token read so far, ending
    /// with that byte (invalid UTF-8 shown as U+FFFD), as QEMU reports it.
    #[error("JSON parse error, stray '{text}'")]
    Stray {
        /// The partial token, ending with the offending byte.
        text: String,
        /// Offset of the offending byte.
        offset: u64,
    },
    /// The tokens do not form a value.
    #[error("JSON parse error, {kind}")]
    Syntax {
        /// What was wrong.
        kind: SyntaxError,
        /// Offset of the token where it was found.
        offset: u64,
    },
    /// The message grew past [`Limits::max_message_bytes`].
    #[error("JSON token size limit exceeded")]
    TooLarge {
        /// The limit in force.
        limit: usize,
        /// Offset of the token that crossed it.
        offset: u64,
    },
    /// The message has more than [`Limits::max_tokens`] tokens.
    #[error("JSON token count limit exceeded")]
    TooManyTokens {
        /// The limit in force.
        limit: usize,
        /// Offset of the token that crossed it.
        offset: u64,
    },
    /// The message nests deeper than [`Limits::max_nesting`].
    #[error("JSON nesting depth limit exceeded")]
    TooDeep {
        /// The limit in force.
        limit: usize,
        /// Offset of the bracket that crossed it.
        offset: u64,
    },
}

impl JsonError {
    /// Offset in the byte stream where the error was found.
    pub fn offset(&self) -> u64 {
        match self {
            JsonError::Stray { offset, .. }
            | JsonError::Syntax { offset, .. }
            | JsonError::TooLarge { offset, .. }
            | JsonError::TooManyTokens { offset, .. }
            | JsonError::TooDeep { offset, .. } => *offset,
        }
    }
}

/// A grammar error within a complete message, with QEMU's wording (after `JSON parse error, `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    /// A value was expected and something else (`,`, `:`, `}`, `]`) came.
    #[error("expecting value")]
    ExpectingValue,
    /// The input ended in the middle of a value (only at the end of the stream).
    #[error("premature EOI")]
    PrematureEoi,
    /// An object key that is not a string.
    #[error("key is not a string in object")]
    KeyNotString,
    /// An object key not followed by `:`.
    #[error("missing : in object pair")]
    MissingColon,
    /// An object member not followed by `,` or `}`.
    #[error("expected separator in dict")]
    ExpectedDictSeparator,
    /// An array element not followed by `,` or `]`.
    #[error("expected separator in list")]
    ExpectedListSeparator,
    /// The same key twice in one object.
    #[error("duplicate key")]
    DuplicateKey,
    /// A lower-case word other than `true`, `false`, `null`.
    #[error("invalid keyword '{0}'")]
    InvalidKeyword(String),
    /// A backslash followed by something that is not an escape.
    #[error("invalid escape sequence in string")]
    InvalidEscape,
    /// A `\uXXXX` escape (the text as written) that is not a Unicode scalar value (bad hex
    /// digits, a lone surrogate, or a noncharacter).
    #[error("{0} is not a valid Unicode character")]
    InvalidUnicodeEscape(String),
    /// Bytes in a string that are not (modified) UTF-8 of a valid character.
    #[error("invalid UTF-8 sequence in string")]
    InvalidUtf8,
    /// A number whose value is not a finite `f64` (QEMU would accept it as infinity).
    #[error("number out of range")]
    NumberOutOfRange,
}

/// Parses a whole byte string as a QMP stream would: every top-level value or error, in order,
/// including what the end of input completes or cuts short. The entry point for fuzzing.
pub fn parse_all(bytes: &[u8]) -> Vec<Result<Value, JsonError>> {
    let mut stream = JsonStream::new(Limits::default());
    let mut out = stream.feed(bytes);
    out.extend(stream.finish());
    out
}
