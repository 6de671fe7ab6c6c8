//! The loader refuses streams QEMU 7.2 refuses, and streams that end before the state the
//! destination needs has arrived (issue 14, items 4 and 7). Each test takes a real livemig
//! stream (`fuzz/seeds/stream_loader/livemig-livemig-1m-bitmap.mig`), changes it as a broken
//! link or a newer source would, and loads it into a fresh `-M livemig` destination through
//! the fuzz harness (which also checks that the failed load left nothing behind).

use fuzz_harness::stream;
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use vm::MachineType;
use wire::ram::{read_mem_blocks, read_ram_record, MemBlockFields, RamRecord};
use wire::section::{read_file_header, read_footer};
use wire::{read_item, Item, SectionKind, StreamReader};

fn seed() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds/stream_loader/livemig-livemig-1m-bitmap.mig");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Where things are in a stream: the first byte of each item, by what it is.
#[derive(Debug, Default)]
struct Map {
    /// (offset, command number) of every command.
    commands: Vec<(u64, u16)>,
    /// Offset of the `ram` END section.
    ram_end: Option<u64>,
    /// Offset of the first FULL (device) section.
    first_full: Option<u64>,
}

/// Walks a precopy stream item by item (bodies skipped with the `wire` decoders).
fn map(data: &[u8]) -> Map {
    let mut r = StreamReader::new(Cursor::new(data));
    read_file_header(&mut r).unwrap();
    wire::config::read_configuration(&mut r).unwrap();
    let mut m = Map::default();
    let mut idstrs: HashMap<u32, String> = HashMap::new();
    loop {
        let at = r.offset();
        let h = match read_item(&mut r).unwrap() {
            Item::Eof => return m,
            Item::Command(c) => {
                m.commands.push((at, c.number()));
                continue;
            }
            Item::Section(h) => h,
        };
        if let Some(s) = h.start() {
            idstrs.insert(s.section_id, s.idstr.clone());
        }
        let id = h.section_id();
        let idstr = idstrs.get(&id).cloned().unwrap_or_default();
        match (idstr.as_str(), h.kind()) {
            ("ram", kind) => {
                if kind == SectionKind::End {
                    m.ram_end.get_or_insert(at);
                }
                loop {
                    match read_ram_record(&mut r).unwrap() {
                        RamRecord::Eos => break,
                        RamRecord::MemSize { total } => {
                            read_mem_blocks(&mut r, total, |_| MemBlockFields::default()).unwrap();
                        }
                        rec => r.skip(rec.payload_len()).unwrap(),
                    }
                }
            }
            ("dirty-bitmap", _) => while !wire::bitmap::read_chunk(&mut r).unwrap().eos {},
            (_, SectionKind::Full) => {
                // Devices come last in a precopy stream: nothing after needs mapping.
                m.first_full.get_or_insert(at);
                return m;
            }
            (other, kind) => panic!("unexpected {} section {other}", kind.name()),
        }
        read_footer(&mut r, id).unwrap();
    }
}

fn load(data: &[u8]) -> Result<(), String> {
    stream::run_on(MachineType::Livemig, data).result
}

#[test]
fn the_seed_loads_as_it_is() {
    assert_eq!(load(&seed()), Ok(()));
}

#[test]
fn eof_before_the_device_state_fails_naming_what_is_missing() {
    let data = seed();
    let at = map(&data).first_full.expect("a device section") as usize;
    // The stream ends (QEMU_VM_EOF) where the device state would begin; QEMU 7.2 completes
    // such a stream with "Expected vmdescription section" and runs vCPUs from step 0.
    let mut cut = data[..at].to_vec();
    cut.push(wire::section::QEMU_VM_EOF);
    let e = load(&cut).expect_err("a stream without device state");
    assert!(
        e.starts_with("the stream ended without the state of 'livemig-serial' (instance 0)")
            && e.contains("'livemig-vcpu' (instance 0)")
            && e.ends_with("the guest cannot run from it"),
        "{e}"
    );
    assert!(!e.contains("globalstate"), "globalstate may be absent: {e}");
}

#[test]
fn eof_before_the_ram_section_ends_fails() {
    let data = seed();
    let at = map(&data).ram_end.expect("ram END") as usize;
    let mut cut = data[..at].to_vec();
    cut.push(wire::section::QEMU_VM_EOF);
    assert_eq!(
        load(&cut),
        Err(
            "the stream ended (EOF) before section 'ram' (id 2) was complete: it was started but never ended"
                .into()
        )
    );
}

#[test]
fn ram_flag_0x200_is_refused_as_qemu_7_2_does() {
    let data = seed();
    let at = map(&data).ram_end.expect("ram END") as usize;
    // The END section's header is 5 bytes (type, be32 id); its first record becomes a
    // multifd flush, as a QEMU 8.1 source with multifd sends it.
    let mut bad = data[..at + 5].to_vec();
    bad.extend_from_slice(&0x200u64.to_be_bytes());
    bad.extend_from_slice(&data[at + 5..]);
    assert_eq!(
        load(&bad),
        Err("Unknown combination of migration flags: 0x200".into())
    );
}

#[test]
fn a_second_postcopy_advise_is_refused_as_qemu_does() {
    let data = seed();
    let (at, _) = *map(&data)
        .commands
        .iter()
        .find(|(_, n)| *n == wire::command::MIG_CMD_POSTCOPY_ADVISE)
        .expect("the 0-byte ADVISE dirty-bitmaps sends");
    // QEMU_VM_COMMAND, be16 cmd, be16 len 0: the same ADVISE twice.
    let advise = &data[at as usize..at as usize + 5];
    assert_eq!(advise, [0x08, 0, 3, 0, 0]);
    let mut bad = data[..at as usize + 5].to_vec();
    bad.extend_from_slice(advise);
    bad.extend_from_slice(&data[at as usize + 5..]);
    assert_eq!(
        load(&bad),
        Err("CMD_POSTCOPY_ADVISE in wrong postcopy state (1)".into())
    );
}
