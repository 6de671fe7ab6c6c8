//! Image format probing, as QEMU 7.2 does it when a `-drive` or `drive-mirror` names no
//! format (`find_image_format` and `bdrv_probe_all`): the first 512 bytes of the image go to
//! every format driver's probe, the highest score wins, and `raw` (score 1) wins only when no
//! other format recognises the image. An empty image is raw without a read.
//!
//! livemig opens `qcow2` and `raw`; an image another of QEMU's drivers would claim (`qcow`,
//! `qed`, `vmdk`, `vdi`, `vpc`, `vhdx`, `luks`, `parallels`, `bochs`, `cloop`, `dmg`) is
//! refused by the caller with the format's name rather than opened as raw, which QEMU would
//! not do. A raw image found by probing keeps its first sector from being rewritten into
//! another format ([`still_raw`]: QEMU's `raw_co_pwritev` on a probed node).

/// QEMU's `BLOCK_PROBE_BUF_SIZE`: how much of the image the probes see.
pub const PROBE_BUF_SIZE: usize = 512;

/// The format QEMU 7.2's probes pick for an image whose first bytes are `head` (zero-padded
/// to [`PROBE_BUF_SIZE`] when shorter, as a read past the end returns zeroes) and whose name
/// is `filename` (`dmg` goes by the name).
pub fn probe(head: &[u8], filename: Option<&str>) -> &'static str {
    let mut buf = [0u8; PROBE_BUF_SIZE];
    let n = head.len().min(PROBE_BUF_SIZE);
    if let (Some(dst), Some(src)) = (buf.get_mut(..n), head.get(..n)) {
        dst.copy_from_slice(src);
    }
    let mut best = ("raw", 1);
    for (name, score) in [
        ("qcow2", qcow_version(&buf).is_some_and(|v| v >= 2)),
        ("qcow", qcow_version(&buf) == Some(1)),
        ("qed", buf.starts_with(b"QED\0")),
        ("vmdk", vmdk(&buf)),
        ("vdi", le32(&buf, 64) == Some(0xbeda_107f)),
        ("vpc", buf.starts_with(b"conectix")),
        ("vhdx", buf.starts_with(b"vhdxfile")),
        (
            "luks",
            buf.starts_with(b"LUKS\xba\xbe") && buf.get(6..8) == Some(&[0, 1]),
        ),
        ("parallels", parallels(&buf)),
        ("bochs", bochs(&buf)),
    ]
    .map(|(n, hit)| (n, if hit { 100 } else { 0 }))
    .into_iter()
    .chain([
        ("cloop", if cloop(&buf) { 2 } else { 0 }),
        (
            "dmg",
            if filename.is_some_and(|f| f.len() > 4 && f.ends_with(".dmg")) {
                2
            } else {
                0
            },
        ),
    ]) {
        if score > best.1 {
            best = (name, score);
        }
    }
    best.0
}

/// Whether a probed raw image whose first sector becomes `first_sector` still probes as raw
/// (QEMU refuses such a write with `EPERM` otherwise, so a guest cannot turn its disk into an
/// image format that would be opened differently next time).
pub fn still_raw(first_sector: &[u8]) -> bool {
    probe(first_sector, None) == "raw"
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(s))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

/// The version of a `QFI\xfb` header (`qcow` is 1, `qcow2` 2 or more).
fn qcow_version(b: &[u8]) -> Option<u32> {
    (be32(b, 0)? == 0x5146_49fb).then(|| be32(b, 4)).flatten()
}

/// `vmdk_probe`: a sparse extent's magic, or a descriptor whose first line that is neither a
/// comment nor blank is `version=1`, `2` or `3`.
fn vmdk(b: &[u8]) -> bool {
    if matches!(be32(b, 0), Some(0x434f_5744 | 0x4b44_4d56)) {
        return true;
    }
    let mut p = 0usize;
    let end = b.len();
    while p < end {
        match b.get(p) {
            Some(b'#') => {
                while p < end && b.get(p) != Some(&b'\n') {
                    p += 1;
                }
                p += 1;
            }
            Some(b' ') => {
                while p < end && b.get(p) == Some(&b' ') {
                    p += 1;
                }
                if p < end && b.get(p) == Some(&b'\r') {
                    p += 1;
                }
                if p == end || b.get(p) != Some(&b'\n') {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = b.get(p..).unwrap_or_default();
                return ["1", "2", "3"].iter().any(|v| {
                    rest.starts_with(format!("version={v}\n").as_bytes())
                        || rest.starts_with(format!("version={v}\r\n").as_bytes())
                });
            }
        }
    }
    false
}

fn parallels(b: &[u8]) -> bool {
    (b.starts_with(b"WithoutFreeSpace") || b.starts_with(b"WithouFreSpacExt"))
        && le32(b, 16) == Some(2)
}

/// A NUL-terminated string at `at` in a field of `len` bytes (C's `strcmp` on the field).
fn c_str_is(b: &[u8], at: usize, len: usize, s: &[u8]) -> bool {
    let field = b.get(at..at + len).unwrap_or_default();
    let n = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    field.get(..n) == Some(s)
}

fn bochs(b: &[u8]) -> bool {
    c_str_is(b, 0, 32, b"Bochs Virtual HD Image")
        && c_str_is(b, 32, 16, b"Redolog")
        && c_str_is(b, 48, 16, b"Growing")
        && matches!(le32(b, 64), Some(0x0002_0000 | 0x0001_0000))
}

fn cloop(b: &[u8]) -> bool {
    b.starts_with(
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_recognised_by_their_headers() {
        let with = |head: &[u8]| probe(head, None);
        assert_eq!(with(b""), "raw");
        assert_eq!(with(&[0u8; 512]), "raw");
        assert_eq!(with(b"QFI\xfb\0\0\0\x03"), "qcow2");
        assert_eq!(with(b"QFI\xfb\0\0\0\x02"), "qcow2");
        assert_eq!(with(b"QFI\xfb\0\0\0\x01"), "qcow");
        assert_eq!(with(b"QFI\xfb\0\0\0\x00"), "raw");
        assert_eq!(with(b"QED\0"), "qed");
        assert_eq!(with(b"KDMV"), "vmdk");
        assert_eq!(with(b"# Disk DescriptorFile\n\nversion=1\n"), "raw");
        assert_eq!(with(b"# Disk DescriptorFile\n   \nversion=1\n"), "vmdk");
        assert_eq!(with(b"# Disk DescriptorFile\r\nversion=3\r\n"), "vmdk");
        assert_eq!(with(b"conectix"), "vpc");
        assert_eq!(with(b"vhdxfile"), "vhdx");
        assert_eq!(with(b"LUKS\xba\xbe\0\x01"), "luks");
        assert_eq!(with(b"LUKS\xba\xbe\0\x02"), "raw");
        let mut vdi = [0u8; 72];
        vdi[64..68].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(with(&vdi), "vdi");
        assert_eq!(with(b"WithoutFreeSpace\x02\0\0\0"), "parallels");
        assert_eq!(with(b"WithoutFreeSpace\x03\0\0\0"), "raw");
        let mut bochs = [0u8; 72];
        bochs[..22].copy_from_slice(b"Bochs Virtual HD Image");
        bochs[32..39].copy_from_slice(b"Redolog");
        bochs[48..55].copy_from_slice(b"Growing");
        bochs[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
        assert_eq!(with(&bochs), "bochs");
        assert_eq!(probe(b"", Some("/x/disk.dmg")), "dmg");
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03", Some("/x/disk.dmg")), "qcow2");
    }

    #[test]
    fn a_first_sector_that_would_probe_as_a_format_is_not_raw() {
        assert!(still_raw(&[0u8; 512]));
        let mut s = [0x5au8; 512];
        assert!(still_raw(&s));
        s[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        assert!(!still_raw(&s));
    }
}
