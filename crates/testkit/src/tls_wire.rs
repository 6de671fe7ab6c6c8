//! What a TLS connection looks like on the wire, for tests that must show a channel was
//! encrypted (and not, say, a migration stream in the clear): the bytes are one TLS record
//! after another — a five-byte header (content type 20–23, version 3.1–3.3, a length no
//! record may exceed) and that many bytes — from the first byte to the last, with no byte
//! outside a record. A connection cut on the way may end inside its last record; that tail
//! is reported, not refused.
//!
//! A walk proves the framing, not the encryption; a test pairs it with a search for what
//! the plaintext would contain ([`find`]: a stream's file header, a guest page's own
//! header). A needle is to be long enough that ciphertext does not contain it by chance: 4
//! bytes turn up about once in 4 GiB of random bytes — once in a hundred runs of a 40 MiB
//! migration — 8 bytes practically never. [`STREAM_HEADER`] is one.

/// Content types of the TLS record layer.
const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

/// Longest record body TLS 1.2 allows (2^14 + 2048); TLS 1.3's limit is lower.
const MAX_RECORD: usize = (1 << 14) + 2048;

/// A migration stream's file header: `QEVM` and version 3 (8 bytes), what a stream in the
/// clear begins with.
pub const STREAM_HEADER: &[u8] = b"QEVM\x00\x00\x00\x03";

/// What a walk over one direction of a connection found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    /// Whole records, by content type.
    pub change_cipher_spec: usize,
    /// Alert records (in TLS 1.3, encrypted alerts travel as application data).
    pub alert: usize,
    /// Handshake records in the clear (the hellos; TLS 1.3 encrypts the rest).
    pub handshake: usize,
    /// Application-data records.
    pub application_data: usize,
    /// Bytes in the bodies of application-data records.
    pub application_bytes: u64,
    /// Bytes of a last record the connection ended inside (0 when it ended on a record
    /// boundary).
    pub tail: usize,
    /// The content type of the first record, if there was one.
    pub first_type: Option<u8>,
}

impl Records {
    /// Whole records of any type.
    pub fn total(&self) -> usize {
        self.change_cipher_spec + self.alert + self.handshake + self.application_data
    }
}

/// Walks `bytes` as TLS records. Fails at the first byte that is not where a record header
/// should be, naming its offset and showing what is there.
pub fn walk(bytes: &[u8]) -> Result<Records, String> {
    let mut r = Records::default();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let bad = |why: &str| {
            let show: Vec<String> = rest.iter().take(16).map(|b| format!("{b:02x}")).collect();
            Err(format!(
                "offset {at}: not a TLS record ({why}): {}",
                show.join(" ")
            ))
        };
        let ty = rest[0];
        if !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&ty) {
            return bad("content type");
        }
        if rest.len() < 5 {
            if rest.len() >= 2 && rest[1] != 3 {
                return bad("version");
            }
            r.tail = rest.len();
            break;
        }
        if rest[1] != 3 || !(1..=3).contains(&rest[2]) {
            return bad("version");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > MAX_RECORD {
            return bad("length");
        }
        if rest.len() < 5 + len {
            r.tail = rest.len();
            break;
        }
        r.first_type.get_or_insert(ty);
        match ty {
            CHANGE_CIPHER_SPEC => r.change_cipher_spec += 1,
            ALERT => r.alert += 1,
            HANDSHAKE => r.handshake += 1,
            _ => {
                r.application_data += 1;
                r.application_bytes += len as u64;
            }
        }
        at += 5 + len;
    }
    Ok(r)
}

/// Where `needle` first occurs in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Checks that both directions of every connection in `recorded` (a recording relay's) are
/// TLS records and nothing else — each beginning with a handshake record and carrying
/// application data — and that none contains any of the `clear` byte strings (what the
/// plaintext would carry, by name). `cut`: the connections were cut, so each may end inside
/// a record. Panics naming the connection and direction; returns what each connection
/// carried towards the target.
pub fn assert_all_tls(
    what: &str,
    recorded: &[crate::relay::Recorded],
    cut: bool,
    clear: &[(&str, &[u8])],
) -> Vec<Records> {
    let mut forward = Vec::new();
    for (i, r) in recorded.iter().enumerate() {
        for (dir, bytes) in [("forward", &r.forward), ("back", &r.back)] {
            let w = walk(bytes).unwrap_or_else(|e| panic!("{what}, connection {i} {dir}: {e}"));
            assert_eq!(
                w.first_type,
                Some(HANDSHAKE),
                "{what}, connection {i} {dir}: begins with a handshake: {w:?}"
            );
            assert!(
                w.application_data > 0,
                "{what}, connection {i} {dir}: {w:?}"
            );
            if !cut {
                assert_eq!(w.tail, 0, "{what}, connection {i} {dir}: {w:?}");
            }
            for (name, needle) in clear {
                assert_eq!(
                    find(bytes, needle),
                    None,
                    "{what}, connection {i} {dir}: {name} in the clear"
                );
            }
            if dir == "forward" {
                forward.push(w);
            }
        }
    }
    forward
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![ty, 3, 3];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn records_walk_to_the_end() {
        let mut wire = record(HANDSHAKE, &[1; 300]);
        wire.extend(record(CHANGE_CIPHER_SPEC, &[1]));
        wire.extend(record(APPLICATION_DATA, &[7; 16384]));
        wire.extend(record(APPLICATION_DATA, &[9; 40]));
        let r = walk(&wire).unwrap();
        assert_eq!(r.handshake, 1);
        assert_eq!(r.change_cipher_spec, 1);
        assert_eq!(r.application_data, 2);
        assert_eq!(r.application_bytes, 16424);
        assert_eq!(r.first_type, Some(HANDSHAKE));
        assert_eq!(r.tail, 0);
        // Cut inside the last record: the whole ones are counted, the rest is the tail.
        let r = walk(&wire[..wire.len() - 10]).unwrap();
        assert_eq!((r.application_data, r.tail), (1, 35));
    }

    #[test]
    fn plaintext_is_not_records() {
        // A migration stream's file header ("QEVM", version 3).
        let e = walk(b"QEVM\0\0\0\x03\x07").unwrap_err();
        assert!(
            e.starts_with("offset 0: not a TLS record (content type)"),
            "{e}"
        );
        // Records, then something else.
        let mut wire = record(APPLICATION_DATA, &[1; 20]);
        wire.extend_from_slice(&[0x04, 0, 0, 0, 0, 0, 0x10, 0x08]);
        let e = walk(&wire).unwrap_err();
        assert!(e.starts_with("offset 25:"), "{e}");
        // A header with a bad version or an impossible length.
        assert!(walk(&[23, 1, 3, 0, 4, 0, 0, 0, 0]).is_err());
        assert!(walk(&[23, 3, 3, 0xff, 0xff]).is_err());
        assert!(walk(&[23, 3, 3, 0, 0]).is_err());
    }

    #[test]
    fn find_finds() {
        assert_eq!(find(b"abcQEVMd", b"QEVM"), Some(3));
        assert_eq!(find(b"abc", b"QEVM"), None);
    }
}
