//! Top-level framing (stream-format.md §1): the file header, section type bytes, section
//! headers and footers, the item loop and the VMDESCRIPTION trailer.

use crate::command::{read_command, Command};
use crate::error::{Result, SectionContext, WireErrorKind};
use crate::reader::StreamReader;
use crate::writer::StreamWriter;
use std::io::{Read, Write};

/// "QEVM": first four bytes of every stream.
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564D;
/// The only supported file version.
pub const QEMU_VM_FILE_VERSION: u32 = 3;
/// The obsolete file version QEMU names in its error.
pub const QEMU_VM_FILE_VERSION_COMPAT: u32 = 2;

/// End of the device-state stream.
pub const QEMU_VM_EOF: u8 = 0x00;
/// First chunk of an iterative handler.
pub const QEMU_VM_SECTION_START: u8 = 0x01;
/// Middle chunk of an iterative handler.
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
/// Last chunk of an iterative handler.
pub const QEMU_VM_SECTION_END: u8 = 0x03;
/// Complete state of a non-iterative handler.
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// Subsection, only inside a vmstate body.
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
/// JSON trailer after EOF.
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// Configuration section, right after the header only.
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
/// Command (§2).
pub const QEMU_VM_COMMAND: u8 = 0x08;
/// Section footer.
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7E;

/// The four section kinds that carry a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// 0x01.
    Start,
    /// 0x02.
    Part,
    /// 0x03.
    End,
    /// 0x04.
    Full,
}

impl SectionKind {
    /// The type byte.
    pub fn type_byte(self) -> u8 {
        match self {
            SectionKind::Start => QEMU_VM_SECTION_START,
            SectionKind::Part => QEMU_VM_SECTION_PART,
            SectionKind::End => QEMU_VM_SECTION_END,
            SectionKind::Full => QEMU_VM_SECTION_FULL,
        }
    }

    /// Upper-case name as in QEMU (`START`, `PART`, `END`, `FULL`).
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Start => "START",
            SectionKind::Part => "PART",
            SectionKind::End => "END",
            SectionKind::Full => "FULL",
        }
    }
}

/// The header of a START or FULL section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionStart {
    /// Section id (sender's registration counter; use unique non-zero ids for live sections).
    pub section_id: u32,
    /// Handler name, e.g. `ram`, `timer`, `0000:00:01.0/PIIX3`.
    pub idstr: String,
    /// Distinguishes identically named instances.
    pub instance_id: u32,
    /// Version of the handler's format.
    pub version_id: u32,
}

/// A section header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectionHeader {
    /// 0x01 with the full header.
    Start(SectionStart),
    /// 0x04 with the full header.
    Full(SectionStart),
    /// 0x02, id only.
    Part {
        /// Section id.
        section_id: u32,
    },
    /// 0x03, id only.
    End {
        /// Section id.
        section_id: u32,
    },
}

impl SectionHeader {
    /// The section id.
    pub fn section_id(&self) -> u32 {
        match self {
            SectionHeader::Start(s) | SectionHeader::Full(s) => s.section_id,
            SectionHeader::Part { section_id } | SectionHeader::End { section_id } => *section_id,
        }
    }

    /// Which kind of section.
    pub fn kind(&self) -> SectionKind {
        match self {
            SectionHeader::Start(_) => SectionKind::Start,
            SectionHeader::Full(_) => SectionKind::Full,
            SectionHeader::Part { .. } => SectionKind::Part,
            SectionHeader::End { .. } => SectionKind::End,
        }
    }

    /// The idstr/instance/version block of START and FULL headers.
    pub fn start(&self) -> Option<&SectionStart> {
        match self {
            SectionHeader::Start(s) | SectionHeader::Full(s) => Some(s),
            _ => None,
        }
    }
}

/// One step of the top-level loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A section header; its body follows, then its footer ([`read_footer`]).
    Section(SectionHeader),
    /// A command, fully read.
    Command(Command),
    /// `QEMU_VM_EOF`.
    Eof,
}

/// Reads and checks the file header: magic "QEVM" and version 3.
pub fn read_file_header<R: Read>(r: &mut StreamReader<R>) -> Result<()> {
    let magic = r.be32()?;
    if magic != QEMU_VM_FILE_MAGIC {
        return Err(r.error_at(0, WireErrorKind::NotAMigrationStream { magic }));
    }
    let at = r.offset();
    let version = r.be32()?;
    if version == QEMU_VM_FILE_VERSION_COMPAT {
        return Err(r.error_at(at, WireErrorKind::ObsoleteVersion));
    }
    if version != QEMU_VM_FILE_VERSION {
        return Err(r.error_at(at, WireErrorKind::UnsupportedVersion { version }));
    }
    Ok(())
}

/// Writes the file header.
pub fn write_file_header<W: Write>(w: &mut StreamWriter<W>) -> Result<()> {
    w.put_be32(QEMU_VM_FILE_MAGIC)?;
    w.put_be32(QEMU_VM_FILE_VERSION)
}

/// Reads one top-level item: a section header, a whole command, or EOF.
///
/// The reader's section context is cleared first, then set to the new section for START and
/// FULL headers (whose idstr is known). For PART and END only the id is on the wire: the caller
/// maps it to its handler and sets the context itself with [`StreamReader::set_section`].
/// Type bytes other than 0x00–0x04 and 0x08 are errors; 0x07 gets its own message.
pub fn read_item<R: Read>(r: &mut StreamReader<R>) -> Result<Item> {
    r.set_section(None);
    let at = r.offset();
    let ty = r.u8()?;
    match ty {
        QEMU_VM_EOF => Ok(Item::Eof),
        QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
            let section_id = r.be32()?;
            let idstr = r.counted_string("ID string")?;
            let instance_id = r.be32()?;
            let version_id = r.be32()?;
            r.set_section(Some(SectionContext::new(idstr.clone(), section_id)));
            let s = SectionStart {
                section_id,
                idstr,
                instance_id,
                version_id,
            };
            Ok(Item::Section(if ty == QEMU_VM_SECTION_START {
                SectionHeader::Start(s)
            } else {
                SectionHeader::Full(s)
            }))
        }
        QEMU_VM_SECTION_PART => Ok(Item::Section(SectionHeader::Part {
            section_id: r.be32()?,
        })),
        QEMU_VM_SECTION_END => Ok(Item::Section(SectionHeader::End {
            section_id: r.be32()?,
        })),
        QEMU_VM_COMMAND => Ok(Item::Command(read_command(r)?)),
        QEMU_VM_CONFIGURATION => Err(r.error_at(at, WireErrorKind::ConfigurationMidStream)),
        _ => Err(r.error_at(at, WireErrorKind::UnknownSectionType { ty })),
    }
}

/// Writes a section header.
pub fn write_section_header<W: Write>(w: &mut StreamWriter<W>, h: &SectionHeader) -> Result<()> {
    w.put_u8(h.kind().type_byte())?;
    w.put_be32(h.section_id())?;
    if let Some(s) = h.start() {
        w.put_counted_string(&s.idstr, "ID string")?;
        w.put_be32(s.instance_id)?;
        w.put_be32(s.version_id)?;
    }
    Ok(())
}

/// Writes a START header.
pub fn write_start<W: Write>(
    w: &mut StreamWriter<W>,
    section_id: u32,
    idstr: &str,
    instance_id: u32,
    version_id: u32,
) -> Result<()> {
    write_section_header(
        w,
        &SectionHeader::Start(SectionStart {
            section_id,
            idstr: idstr.into(),
            instance_id,
            version_id,
        }),
    )
}

/// Writes a FULL header.
pub fn write_full<W: Write>(
    w: &mut StreamWriter<W>,
    section_id: u32,
    idstr: &str,
    instance_id: u32,
    version_id: u32,
) -> Result<()> {
    write_section_header(
        w,
        &SectionHeader::Full(SectionStart {
            section_id,
            idstr: idstr.into(),
            instance_id,
            version_id,
        }),
    )
}

/// Writes a PART header.
pub fn write_part<W: Write>(w: &mut StreamWriter<W>, section_id: u32) -> Result<()> {
    write_section_header(w, &SectionHeader::Part { section_id })
}

/// Writes an END header.
pub fn write_end<W: Write>(w: &mut StreamWriter<W>, section_id: u32) -> Result<()> {
    write_section_header(w, &SectionHeader::End { section_id })
}

/// Writes a section footer (`0x7E`, be32 id).
pub fn write_footer<W: Write>(w: &mut StreamWriter<W>, section_id: u32) -> Result<()> {
    w.put_u8(QEMU_VM_SECTION_FOOTER)?;
    w.put_be32(section_id)
}

/// Writes `QEMU_VM_EOF`.
pub fn write_eof<W: Write>(w: &mut StreamWriter<W>) -> Result<()> {
    w.put_u8(QEMU_VM_EOF)
}

/// Reads and checks a section footer against `expected_id`. Does nothing when the reader's
/// options say footers are off. The idstr in the message comes from the reader's section
/// context.
pub fn read_footer<R: Read>(r: &mut StreamReader<R>, expected_id: u32) -> Result<()> {
    if !r.options().section_footer {
        return Ok(());
    }
    let idstr = r
        .section()
        .map(|s| s.idstr.clone())
        .unwrap_or_else(|| format!("section {expected_id}"));
    let at = r.offset();
    let got = r.u8()?;
    if got != QEMU_VM_SECTION_FOOTER {
        return Err(r.error_at(at, WireErrorKind::MissingFooter { idstr, got }));
    }
    let read = r.be32()?;
    if read != expected_id {
        return Err(r.error_at(
            at,
            WireErrorKind::FooterMismatch {
                idstr,
                read,
                expected: expected_id,
            },
        ));
    }
    Ok(())
}

/// What followed `QEMU_VM_EOF`, read with QEMU's lenient rules (§1.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trailer {
    /// `0x06`, be32 length, and the JSON bytes (not parsed, not checked).
    Vmdesc(Vec<u8>),
    /// The stream ended cleanly right after EOF. QEMU prints a warning and completes.
    Missing,
    /// Another byte followed EOF. QEMU prints "Expected vmdescription section, but got N" and
    /// completes; the byte has been consumed.
    Unexpected(u8),
}

impl Trailer {
    /// QEMU's warning for a missing or unexpected trailer, if any.
    pub fn warning(&self) -> Option<String> {
        match self {
            Trailer::Vmdesc(_) => None,
            // qemu_get_byte returns 0 at end of file.
            Trailer::Missing => Some("Expected vmdescription section, but got 0".into()),
            Trailer::Unexpected(b) => Some(format!("Expected vmdescription section, but got {b}")),
        }
    }
}

/// Reads what follows EOF: one byte; if it is 0x06, the be32 length and the JSON (within
/// `options().max_vmdesc`). A stream that ends inside the JSON is a truncation error, which a
/// destination may treat as a warning as QEMU does.
pub fn read_vmdesc<R: Read>(r: &mut StreamReader<R>) -> Result<Trailer> {
    let Some(b) = r.peek_u8()? else {
        return Ok(Trailer::Missing);
    };
    r.u8()?;
    if b != QEMU_VM_VMDESCRIPTION {
        return Ok(Trailer::Unexpected(b));
    }
    let len = r.be32()?;
    let limit = r.options().max_vmdesc;
    Ok(Trailer::Vmdesc(r.bytes(
        u64::from(len),
        u64::from(limit),
        "VMDESCRIPTION JSON",
    )?))
}

/// Writes the trailer: `0x06`, be32 length, the JSON bytes.
pub fn write_vmdesc<W: Write>(w: &mut StreamWriter<W>, json: &[u8]) -> Result<()> {
    let len = u32::try_from(json.len()).map_err(|_| {
        w.error(WireErrorKind::TooLarge {
            what: "VMDESCRIPTION JSON",
            len: json.len() as u64,
            limit: u64::from(u32::MAX),
        })
    })?;
    w.put_u8(QEMU_VM_VMDESCRIPTION)?;
    w.put_be32(len)?;
    w.put_bytes(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::ReaderOptions;

    fn reader(b: &[u8]) -> StreamReader<&[u8]> {
        StreamReader::new(b)
    }

    #[test]
    fn header_errors_use_qemu_wording() {
        let e = read_file_header(&mut reader(&[0x51, 0x45, 0x56, 0x4e, 0, 0, 0, 3])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x0: Not a migration stream, magic: 5145564e != 5145564d"
        );
        let e = read_file_header(&mut reader(&[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 2])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x4: SaveVM v2 format is obsolete and don't work anymore"
        );
        let e = read_file_header(&mut reader(&[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 4])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x4: Unsupported migration stream version, file version 4 != 3"
        );
        read_file_header(&mut reader(&[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3])).unwrap();
        let mut w = StreamWriter::new(Vec::new());
        write_file_header(&mut w).unwrap();
        assert_eq!(w.into_inner().unwrap(), b"QEVM\0\0\0\x03");
    }

    #[test]
    fn start_section_from_the_walkthrough() {
        // §8.1 offset 0x16: START id 2 "ram" instance 0 version 4.
        let b = [1, 0, 0, 0, 2, 3, b'r', b'a', b'm', 0, 0, 0, 0, 0, 0, 0, 4];
        let mut r = reader(&b);
        let item = read_item(&mut r).unwrap();
        let h = SectionHeader::Start(SectionStart {
            section_id: 2,
            idstr: "ram".into(),
            instance_id: 0,
            version_id: 4,
        });
        assert_eq!(item, Item::Section(h.clone()));
        assert_eq!(r.section(), Some(&SectionContext::new("ram", 2)));
        let mut w = StreamWriter::new(Vec::new());
        write_section_header(&mut w, &h).unwrap();
        assert_eq!(w.into_inner().unwrap(), b);
    }

    #[test]
    fn part_end_footer_eof() {
        let b = [
            2, 0, 0, 0, 2, 0x7e, 0, 0, 0, 2, 3, 0, 0, 0, 3, 0x7e, 0, 0, 0, 3, 0,
        ];
        let mut r = reader(&b);
        assert_eq!(
            read_item(&mut r).unwrap(),
            Item::Section(SectionHeader::Part { section_id: 2 })
        );
        read_footer(&mut r, 2).unwrap();
        assert_eq!(
            read_item(&mut r).unwrap(),
            Item::Section(SectionHeader::End { section_id: 3 })
        );
        read_footer(&mut r, 3).unwrap();
        assert_eq!(read_item(&mut r).unwrap(), Item::Eof);
        assert_eq!(read_vmdesc(&mut r).unwrap(), Trailer::Missing);
        let mut w = StreamWriter::new(Vec::new());
        write_part(&mut w, 2).unwrap();
        write_footer(&mut w, 2).unwrap();
        write_end(&mut w, 3).unwrap();
        write_footer(&mut w, 3).unwrap();
        write_eof(&mut w).unwrap();
        assert_eq!(w.into_inner().unwrap(), b);
    }

    #[test]
    fn footer_errors() {
        let mut r = reader(&[0x00, 0, 0, 0, 2]);
        r.set_section(Some(SectionContext::new("ram", 2)));
        let e = read_footer(&mut r, 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x0 in section 'ram' (id 2): Missing section footer for ram (got byte 0x00)"
        );
        let mut r = reader(&[0x7e, 0, 0, 0, 3]);
        r.set_section(Some(SectionContext::new("ram", 2)));
        let e = read_footer(&mut r, 2).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("Mismatched section id in footer for ram - read 0x3 expected 0x2"),
            "{e}"
        );
        // Footers off: nothing is read.
        let mut r = reader(&[0x00]).with_options(ReaderOptions {
            section_footer: false,
            ..Default::default()
        });
        read_footer(&mut r, 2).unwrap();
        assert_eq!(r.offset(), 0);
    }

    #[test]
    fn bad_type_bytes() {
        for (b, msg) in [
            (5u8, "Unknown savevm section type 5"),
            (6, "Unknown savevm section type 6"),
            (0x7e, "Unknown savevm section type 126"),
            (0x09, "Unknown savevm section type 9"),
        ] {
            let e = read_item(&mut reader(&[b])).unwrap_err();
            assert_eq!(e.to_string(), format!("at byte 0x0: {msg}"));
        }
        let e = read_item(&mut reader(&[7, 0, 0, 0, 4])).unwrap_err();
        assert!(matches!(e.kind, WireErrorKind::ConfigurationMidStream));
        assert!(e.to_string().contains("Unknown savevm section type 7"));
        let e = read_item(&mut reader(&[1, 0, 0, 0, 1, 0])).unwrap_err();
        assert_eq!(e.to_string(), "at byte 0x5: Unable to read ID string");
    }

    #[test]
    fn vmdesc_lenient_rules() {
        let mut r = reader(&[6, 0, 0, 0, 2, b'{', b'}']);
        assert_eq!(
            read_vmdesc(&mut r).unwrap(),
            Trailer::Vmdesc(b"{}".to_vec())
        );
        let t = read_vmdesc(&mut reader(&[9])).unwrap();
        assert_eq!(t, Trailer::Unexpected(9));
        assert_eq!(
            t.warning().unwrap(),
            "Expected vmdescription section, but got 9"
        );
        assert_eq!(
            read_vmdesc(&mut reader(&[6, 0, 0, 0, 0])).unwrap(),
            Trailer::Vmdesc(vec![])
        );
        assert!(read_vmdesc(&mut reader(&[6, 0, 0, 0, 5, b'{']))
            .unwrap_err()
            .is_truncated());
        let mut w = StreamWriter::new(Vec::new());
        write_vmdesc(&mut w, b"{}").unwrap();
        assert_eq!(w.into_inner().unwrap(), [6, 0, 0, 0, 2, 0x7b, 0x7d]);
    }
}
