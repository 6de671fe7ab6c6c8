//! The configuration section (stream-format.md §1.2): `0x07`, be32 length, the machine-type
//! name, then the optional subsections `configuration/target-page-bits`,
//! `configuration/capabilities` and `configuration/uuid`. No header fields and no footer.

use crate::error::{Result, WireErrorKind};
use crate::reader::StreamReader;
use crate::section::QEMU_VM_CONFIGURATION;
use crate::vmstate::{peek_subsection, write_subsection_header};
use crate::writer::StreamWriter;
use std::io::{Read, Write};

/// vmsd name of the configuration section.
pub const CONFIGURATION: &str = "configuration";
/// Subsection carrying the target page bits.
pub const SUB_TARGET_PAGE_BITS: &str = "configuration/target-page-bits";
/// Subsection carrying the validated capabilities.
pub const SUB_CAPABILITIES: &str = "configuration/capabilities";
/// Subsection carrying the VM UUID.
pub const SUB_UUID: &str = "configuration/uuid";

const KNOWN_SUBSECTIONS: [&str; 3] = [SUB_TARGET_PAGE_BITS, SUB_CAPABILITIES, SUB_UUID];

/// A decoded configuration section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configuration {
    /// Machine class name, e.g. `none` or `pc-i440fx-7.2`.
    pub machine: String,
    /// `configuration/target-page-bits`, when sent (variable-page-size targets only).
    pub target_page_bits: Option<u32>,
    /// `configuration/capabilities`: names of the validated capabilities that are on.
    pub capabilities: Option<Vec<String>>,
    /// `configuration/uuid`.
    pub uuid: Option<[u8; 16]>,
}

impl Configuration {
    /// A configuration with only a machine name, as x86 QEMU sends it.
    pub fn new(machine: impl Into<String>) -> Self {
        Configuration {
            machine: machine.into(),
            ..Default::default()
        }
    }
}

/// QEMU's machine-name rule (`configuration_post_load`): the received name only has to be a
/// prefix of the local class name (`strncmp` over the received length, so it also stops at a
/// NUL in the received name).
pub fn check_machine_name(received: &str, local: &str) -> std::result::Result<(), WireErrorKind> {
    let ok = match received.find('\0') {
        // strncmp stops at the NUL: both strings must end there.
        Some(k) => received.get(..k) == Some(local),
        None => local.starts_with(received),
    };
    if ok {
        Ok(())
    } else {
        Err(WireErrorKind::MachineMismatch {
            received: received.into(),
            local: local.into(),
        })
    }
}

/// QEMU's target-page-bits rule: an absent subsection means the legacy minimum, which the
/// caller passes as `legacy` (12 on x86).
pub fn check_target_page_bits(
    received: Option<u32>,
    local: u32,
    legacy: u32,
) -> std::result::Result<(), WireErrorKind> {
    let received = received.unwrap_or(legacy);
    if received == local {
        Ok(())
    } else {
        Err(WireErrorKind::TargetPageBitsMismatch { received, local })
    }
}

fn check_sub_version<R: Read>(
    r: &StreamReader<R>,
    at: u64,
    name: &str,
    version: u32,
) -> Result<()> {
    if version > 1 {
        return Err(r.error_at(
            at,
            WireErrorKind::VersionTooNew {
                name: name.into(),
                version,
                local: 1,
            },
        ));
    }
    if version < 1 {
        return Err(r.error_at(
            at,
            WireErrorKind::VersionTooOld {
                name: name.into(),
                version,
                minimum: 1,
            },
        ));
    }
    Ok(())
}

/// Reads the configuration section, type byte included ("Configuration section missing" if
/// the byte is not 0x07).
pub fn read_configuration<R: Read>(r: &mut StreamReader<R>) -> Result<Configuration> {
    let at = r.offset();
    let got = r.u8()?;
    if got != QEMU_VM_CONFIGURATION {
        return Err(r.error_at(at, WireErrorKind::ConfigurationMissing { got }));
    }
    read_configuration_body(r)
}

/// Reads the configuration body (after the 0x07 byte).
pub fn read_configuration_body<R: Read>(r: &mut StreamReader<R>) -> Result<Configuration> {
    let at = r.offset();
    let len = r.be32()?;
    let limit = r.options().max_machine_name;
    if len > limit {
        return Err(r.error_at(
            at,
            WireErrorKind::TooLarge {
                what: "machine name",
                len: u64::from(len),
                limit: u64::from(limit),
            },
        ));
    }
    let machine = r.string_of_len(at, len as usize, "machine name")?;
    let mut cfg = Configuration::new(machine);
    while let Some(sub) = peek_subsection(r, CONFIGURATION, |n| KNOWN_SUBSECTIONS.contains(&n))? {
        check_sub_version(r, sub.offset, &sub.name, sub.version_id)?;
        match sub.name.as_str() {
            SUB_TARGET_PAGE_BITS => cfg.target_page_bits = Some(r.be32()?),
            SUB_CAPABILITIES => {
                let c_at = r.offset();
                let count = r.be32()?;
                let limit = r.options().max_list_entries;
                if count > limit {
                    return Err(r.error_at(
                        c_at,
                        WireErrorKind::TooMany {
                            what: "capabilities",
                            limit: u64::from(limit),
                        },
                    ));
                }
                let mut caps = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    // QEMU's get_capability reads a plain u8-length string (0 allowed).
                    let s_at = r.offset();
                    let n = r.u8()?;
                    caps.push(r.string_of_len(s_at, usize::from(n), "capability name")?);
                }
                cfg.capabilities = Some(caps);
            }
            _ => cfg.uuid = Some(r.array::<16>()?),
        }
    }
    Ok(cfg)
}

/// Writes the configuration section, type byte included, with the subsections that are set,
/// in QEMU's order.
pub fn write_configuration<W: Write>(w: &mut StreamWriter<W>, cfg: &Configuration) -> Result<()> {
    let len = u32::try_from(cfg.machine.len()).map_err(|_| {
        w.error(WireErrorKind::TooLarge {
            what: "machine name",
            len: cfg.machine.len() as u64,
            limit: u64::from(u32::MAX),
        })
    })?;
    w.put_u8(QEMU_VM_CONFIGURATION)?;
    w.put_be32(len)?;
    w.put_bytes(cfg.machine.as_bytes())?;
    if let Some(bits) = cfg.target_page_bits {
        write_subsection_header(w, SUB_TARGET_PAGE_BITS, 1)?;
        w.put_be32(bits)?;
    }
    if let Some(caps) = &cfg.capabilities {
        write_subsection_header(w, SUB_CAPABILITIES, 1)?;
        let n = u32::try_from(caps.len()).map_err(|_| {
            w.error(WireErrorKind::TooMany {
                what: "capabilities",
                limit: u64::from(u32::MAX),
            })
        })?;
        w.put_be32(n)?;
        for c in caps {
            if c.len() > 255 {
                return Err(w.error(WireErrorKind::BadStringLength {
                    what: "capability name",
                    len: c.len(),
                }));
            }
            w.put_u8(c.len() as u8)?;
            w.put_bytes(c.as_bytes())?;
        }
    }
    if let Some(uuid) = &cfg.uuid {
        write_subsection_header(w, SUB_UUID, 1)?;
        w.put_bytes(uuid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::read_file_header;

    const NONE: &[u8] = &[
        0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 7, 0, 0, 0, 4, b'n', b'o', b'n', b'e',
    ];

    fn encode(cfg: &Configuration) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new());
        crate::section::write_file_header(&mut w).unwrap();
        write_configuration(&mut w, cfg).unwrap();
        w.into_inner().unwrap()
    }

    fn decode(b: &[u8]) -> Result<Configuration> {
        let mut r = StreamReader::new(b);
        read_file_header(&mut r)?;
        read_configuration(&mut r)
    }

    #[test]
    fn machine_none_bytes() {
        assert_eq!(decode(NONE).unwrap(), Configuration::new("none"));
        assert_eq!(encode(&Configuration::new("none")), NONE);
    }

    #[test]
    fn machine_pc_bytes() {
        let mut b = b"QEVM\0\0\0\x03\x07\0\0\0\x0d".to_vec();
        b.extend(b"pc-i440fx-7.2");
        assert_eq!(decode(&b).unwrap(), Configuration::new("pc-i440fx-7.2"));
        assert_eq!(encode(&Configuration::new("pc-i440fx-7.2")), b);
    }

    #[test]
    fn subsections_round_trip() {
        let cfg = Configuration {
            machine: "virt-7.2".into(),
            target_page_bits: Some(16),
            capabilities: Some(vec!["x-ignore-shared".into()]),
            uuid: Some([0x11; 16]),
        };
        let b = encode(&cfg);
        assert_eq!(decode(&b).unwrap(), cfg);
        // 05, len 30, name, version 1, bits.
        let tpb = &b[8 + 1 + 4 + 8..];
        assert_eq!(tpb[0], 5);
        assert_eq!(usize::from(tpb[1]), SUB_TARGET_PAGE_BITS.len());
        assert_eq!(&tpb[2..32], SUB_TARGET_PAGE_BITS.as_bytes());
        assert_eq!(&tpb[32..40], &[0, 0, 0, 1, 0, 0, 0, 16]);
    }

    #[test]
    fn errors() {
        let e = decode(b"QEVM\0\0\0\x03\x01").unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x8: Configuration section missing, 1 != 7"
        );
        let mut b = NONE.to_vec();
        b.extend([5, 18]);
        b.extend(b"configuration/fooo");
        b.extend([0, 0, 0, 1]);
        let e = decode(&b).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("VM subsection 'configuration/fooo' in 'configuration' does not exist"),
            "{e}"
        );
        let mut b = NONE.to_vec();
        b.extend([5, 18]);
        b.extend(b"configuration/uuid");
        b.extend([0, 0, 0, 2]);
        let e = decode(&b).unwrap_err();
        assert!(
            e.to_string().ends_with(
                "configuration/uuid: incoming version_id 2 is too new for local version_id 1"
            ),
            "{e}"
        );
        let e = decode(b"QEVM\0\0\0\x03\x07\xff\xff\xff\xff").unwrap_err();
        assert!(
            e.to_string()
                .contains("machine name length 4294967295 exceeds limit 4096"),
            "{e}"
        );
    }

    #[test]
    fn foreign_subsection_is_left_unread() {
        // A subsection whose name does not start with "configuration" ends the body.
        let mut b = NONE.to_vec();
        b.extend([5, 5]);
        b.extend(b"timer");
        let mut r = StreamReader::new(&b[..]);
        read_file_header(&mut r).unwrap();
        read_configuration(&mut r).unwrap();
        assert_eq!(r.offset() as usize, NONE.len());
    }

    #[test]
    fn machine_prefix_rule() {
        assert!(check_machine_name("none", "none").is_ok());
        assert!(check_machine_name("no", "none").is_ok());
        let e = check_machine_name("pc", "none").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Machine type received is 'pc' and local is 'none'"
        );
        assert!(check_machine_name("nonexxx", "none").is_err());
        assert!(check_target_page_bits(None, 12, 12).is_ok());
        assert_eq!(
            check_target_page_bits(Some(16), 12, 12)
                .unwrap_err()
                .to_string(),
            "Received TARGET_PAGE_BITS is 16 but local is 12"
        );
    }
}
