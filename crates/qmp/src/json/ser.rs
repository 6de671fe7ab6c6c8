//! Serialization of server messages the way QEMU writes them: ASCII only, `", "` and `": "`
//! separators, upper-case `\uXXXX` escapes, one message per CRLF-terminated line.

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};
use serde_json::Value;
use std::io::{self, Write};

/// serde_json formatter producing QEMU's compact-with-spaces, ASCII-only style.
struct QmpFormatter;

fn write_u_escape<W: ?Sized + Write>(writer: &mut W, unit: u16) -> io::Result<()> {
    write!(writer, "\\u{unit:04X}")
}

impl Formatter for QmpFormatter {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut rest = fragment;
        while !rest.is_empty() {
            // Printable ASCII goes out as is; DEL and everything beyond ASCII as escapes.
            let run = rest
                .bytes()
                .position(|b| !(0x20..0x7F).contains(&b))
                .unwrap_or(rest.len());
            let (plain, tail) = rest.split_at(run);
            writer.write_all(plain.as_bytes())?;
            let mut chars = tail.chars();
            if let Some(c) = chars.next() {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write_u_escape(writer, *unit)?;
                }
            }
            rest = chars.as_str();
        }
        Ok(())
    }

    fn write_char_escape<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        let two = match escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"\\/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => return write_u_escape(writer, u16::from(byte)),
        };
        writer.write_all(two)
    }
}

/// Serializes `value` as QEMU would print it, without a line terminator.
pub fn to_ascii_string(value: &Value) -> String {
    let mut buf = Vec::new();
    let mut ser = Serializer::with_formatter(&mut buf, QmpFormatter);
    if value.serialize(&mut ser).is_err() {
        // Writing a Value into a Vec cannot fail; say so rather than send half a message.
        return r#"{"error": {"class": "GenericError", "desc": "cannot serialize reply"}}"#.into();
    }
    // The formatter writes only ASCII.
    String::from_utf8(buf).unwrap_or_default()
}

/// Serializes `value` as one QMP message: QEMU's ASCII text followed by CRLF.
pub fn to_line(value: &Value) -> Vec<u8> {
    let mut line = to_ascii_string(value).into_bytes();
    line.extend_from_slice(b"\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_qemu_layout_and_escapes() {
        let v = json!({"return": {}, "id": ["a/b\u{1}\u{7f}\t\"\\", "é😀", 1.5, -3, null, true]});
        assert_eq!(
            to_line(&v),
            b"{\"return\": {}, \"id\": [\"a/b\\u0001\\u007F\\t\\\"\\\\\", \"\\u00E9\\uD83D\\uDE00\", 1.5, -3, null, true]}\r\n"
        );
    }
}
