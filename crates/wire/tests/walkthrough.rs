//! The annotated 7.2 capture of stream-format.md §8, rebuilt byte for byte with the writer
//! API, checked against the published hex, then read back with the item reader and the
//! analyzer.

use wire::bitmap::{write_chunk, BitsData, Chunk, ChunkPayload};
use wire::config::{write_configuration, Configuration};
use wire::ram::{write_eos, write_mem_block, write_mem_size, write_zero, BlockTracker, MemBlock};
use wire::section::{
    read_file_header, read_footer, read_item, write_end, write_eof, write_file_header,
    write_footer, write_full, write_part, write_start, write_vmdesc,
};
use wire::vmstate::{vmdesc_json, DeviceDesc, FieldKind, VmsdDesc};
use wire::{Command, Item, SectionHeader, StreamReader, StreamWriter};

/// Parses xxd lines ("offset: hex hex ...  ascii") into (offset, bytes).
fn xxd(lines: &str) -> Vec<(usize, Vec<u8>)> {
    lines
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (off, rest) = l.trim().split_once(": ").unwrap();
            let hex: String = rest
                .split("  ")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            let bytes = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            (usize::from_str_radix(off, 16).unwrap(), bytes)
        })
        .collect()
}

const FIRST_160: &str = "
00000000: 5145 564d 0000 0003 0700 0000 046e 6f6e  QEVM.........non
00000010: 6508 0003 0000 0100 0000 0203 7261 6d00  e...........ram.
00000020: 0000 0000 0000 0400 0000 0002 0000 0403  ................
00000030: 7261 6d00 0000 0002 0000 0000 0000 0000  ram.............
00000040: 0000 107e 0000 0002 0100 0000 030c 6469  ...~..........di
00000050: 7274 792d 6269 746d 6170 0000 0000 0000  rty-bitmap......
00000060: 0001 1c03 7664 6107 6269 746d 6170 3000  ....vda.bitmap0.
00000070: 0100 0003 017e 0000 0003 0200 0000 0200  .....~..........
00000080: 0000 0000 0000 0203 7261 6d00 0000 0000  ........ram.....
00000090: 0000 1022 0000 0000 0000 0020 2200 0000  ...\"....... \"...
";

const LAST_SECTIONS: &str = "
0012df3e: 0200 0000 0200 0000 0000 0000 107e 0000  .............~..
0012df4e: 0002 0300 0000 0200 0000 0000 0000 107e  ...............~
0012df5e: 0000 0002 0300 0000 0340 0000 0000 0000  .........@......
0012df6e: 0000 0002 0000 0000 0000 0000 0080 0300  ................
0012df7e: 0000 0000 0000 0000 0000 0000 0000 0000  ................
0012dfee: 0000 0000 0000 0000 0000 0000 0000 2001  .............. .
0012dffe: 7e00 0000 0304 0000 0000 0574 696d 6572  ~..........timer
0012e00e: 0000 0000 0000 0002 0000 0147 08f7 a57e  ...........G...~
0012e01e: 0000 0000 0000 0000 0000 008e 3073 aa89  ............0s..
0012e02e: 7e00 0000 0004 0000 0004 0b67 6c6f 6261  ~..........globa
0012e03e: 6c73 7461 7465 0000 0000 0000 0001 0000  lstate..........
0012e04e: 0008 7275 6e6e 696e 6700 0000 0000 0000  ..running.......
0012e05e: 0000 0000 0000 0000 0000 0000 0000 0000  ................
0012e0ae: 0000 0000 0000 7e00 0000 0400 0600 0001  ......~.........
0012e0be: e67b 2270 61                             .{\"pa
";

fn timer() -> VmsdDesc {
    VmsdDesc::new("timer", 2)
        .minimum(1)
        .field("cpu_ticks_offset", FieldKind::I64)
        .field("unused", FieldKind::Unused(8))
        .field_since("cpu_clock_offset", FieldKind::I64, 2)
}

fn globalstate() -> VmsdDesc {
    VmsdDesc::new("globalstate", 1)
        .field("size", FieldKind::U32)
        .field("runstate", FieldKind::Buffer(100))
}

/// Writes the §8 stream: `-M none -m 32M`, dirty bitmap `bitmap0` on `vda`.
fn build() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    write_file_header(&mut w).unwrap();
    write_configuration(&mut w, &Configuration::new("none")).unwrap();
    wire::command::write_command(&mut w, &Command::PostcopyAdvise(None)).unwrap();
    // START ram.
    write_start(&mut w, 2, "ram", 0, 4).unwrap();
    write_mem_size(&mut w, 0x2000000).unwrap();
    write_mem_block(
        &mut w,
        &MemBlock {
            name: "ram".into(),
            used_length: 0x2000000,
            page_size: None,
            addr: None,
        },
    )
    .unwrap();
    write_eos(&mut w).unwrap();
    write_footer(&mut w, 2).unwrap();
    // START dirty-bitmap.
    write_start(&mut w, 3, "dirty-bitmap", 0, 1).unwrap();
    let mut names = wire::bitmap::NameTracker::new();
    let (node, bitmap) = names.encode("vda", "bitmap0");
    write_chunk(
        &mut w,
        &Chunk::new(
            (node, bitmap),
            ChunkPayload::Start {
                granularity: 65536,
                flags: 3,
            },
        ),
    )
    .unwrap();
    write_chunk(&mut w, &Chunk::eos()).unwrap();
    write_footer(&mut w, 3).unwrap();
    // First PART: 8192 zero pages.
    write_part(&mut w, 2).unwrap();
    let mut blocks = BlockTracker::new();
    for page in 0..8192u64 {
        let name = blocks.encode("ram");
        write_zero(&mut w, name, page * 4096, 0).unwrap();
    }
    write_eos(&mut w).unwrap();
    write_footer(&mut w, 2).unwrap();
    // 64,608 empty PARTs.
    for _ in 0..64_608 {
        write_part(&mut w, 2).unwrap();
        write_eos(&mut w).unwrap();
        write_footer(&mut w, 2).unwrap();
    }
    // END ram, END dirty-bitmap.
    write_end(&mut w, 2).unwrap();
    write_eos(&mut w).unwrap();
    write_footer(&mut w, 2).unwrap();
    write_end(&mut w, 3).unwrap();
    let mut buf = vec![0u8; 128];
    buf[0] = 0x03;
    let (node, bitmap) = names.encode("vda", "bitmap0");
    let bits = ChunkPayload::Bits {
        start_sector: 0,
        nr_sectors: 131072,
        data: BitsData::Buffer(buf),
    };
    write_chunk(&mut w, &Chunk::new((node, bitmap), bits)).unwrap();
    write_chunk(&mut w, &Chunk::new((None, None), ChunkPayload::Complete)).unwrap();
    write_chunk(&mut w, &Chunk::eos()).unwrap();
    write_footer(&mut w, 3).unwrap();
    // FULL timer, FULL globalstate.
    write_full(&mut w, 0, "timer", 0, 2).unwrap();
    w.put_be64(0x14708F7A57E).unwrap();
    w.put_be64(0).unwrap();
    w.put_be64(0x8E3073AA89).unwrap();
    write_footer(&mut w, 0).unwrap();
    write_full(&mut w, 4, "globalstate", 0, 1).unwrap();
    w.put_be32(8).unwrap();
    let mut runstate = [0u8; 100];
    runstate[..7].copy_from_slice(b"running");
    w.put_bytes(&runstate).unwrap();
    write_footer(&mut w, 4).unwrap();
    write_eof(&mut w).unwrap();
    let devices = [
        DeviceDesc {
            idstr: "timer".into(),
            instance_id: 0,
            vmsd: timer(),
        },
        DeviceDesc {
            idstr: "globalstate".into(),
            instance_id: 0,
            vmsd: globalstate(),
        },
    ];
    write_vmdesc(&mut w, vmdesc_json(4096, &devices, None).as_bytes()).unwrap();
    assert_eq!(w.bytes_written(), 1_237_669);
    w.into_inner().unwrap()
}

#[test]
fn writer_reproduces_the_published_hex() {
    let s = build();
    assert_eq!(s.len(), 0x12E2A5);
    for (off, bytes) in xxd(FIRST_160).into_iter().chain(xxd(LAST_SECTIONS)) {
        assert_eq!(&s[off..off + bytes.len()], &bytes[..], "bytes at {off:#x}");
    }
    // The elided parts of §8.2 are zeros.
    assert!(s[0x12df7e..0x12dfee].iter().all(|&b| b == 0));
    assert!(s[0x12e05e..0x12e0ae].iter().all(|&b| b == 0));
    // §8.1: the zero-page run ends at 0x1207a, EOS at 0x12083, footer at 0x1208b.
    assert_eq!(&s[0x1207a..0x12083], &[0, 0, 0, 0, 1, 0xff, 0xf0, 0x22, 0]);
    assert_eq!(
        &s[0x12083..0x12090],
        &[0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 2]
    );
}

#[test]
fn item_reader_walks_the_stream() {
    let s = build();
    let mut r = StreamReader::new(&s[..]);
    read_file_header(&mut r).unwrap();
    let cfg = wire::config::read_configuration(&mut r).unwrap();
    assert_eq!(cfg.machine, "none");
    assert_eq!(
        read_item(&mut r).unwrap(),
        Item::Command(Command::PostcopyAdvise(None))
    );
    let mut counts = std::collections::BTreeMap::new();
    let mut ids = std::collections::HashMap::new();
    let mut blocks = BlockTracker::new();
    let mut zero_pages = 0;
    loop {
        match read_item(&mut r).unwrap() {
            Item::Eof => break,
            Item::Command(c) => panic!("unexpected {c:?}"),
            Item::Section(h) => {
                if let Some(st) = h.start() {
                    ids.insert(st.section_id, st.idstr.clone());
                } else {
                    r.set_section(Some(wire::SectionContext::new(
                        ids[&h.section_id()].clone(),
                        h.section_id(),
                    )));
                }
                let idstr = r.section().unwrap().idstr.clone();
                *counts
                    .entry((h.kind().name(), idstr.clone()))
                    .or_insert(0u32) += 1;
                match idstr.as_str() {
                    "ram" => loop {
                        match wire::ram::read_ram_record(&mut r).unwrap() {
                            wire::ram::RamRecord::Eos => break,
                            wire::ram::RamRecord::MemSize { total } => {
                                wire::ram::read_mem_blocks(&mut r, total, |_| Default::default())
                                    .unwrap();
                            }
                            wire::ram::RamRecord::Zero { block, .. } => {
                                assert_eq!(blocks.resolve(block.as_deref()).unwrap(), "ram");
                                zero_pages += 1;
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    },
                    "dirty-bitmap" => while !wire::bitmap::read_chunk(&mut r).unwrap().eos {},
                    "timer" => r.skip(24).unwrap(),
                    "globalstate" => r.skip(104).unwrap(),
                    other => panic!("unexpected section {other}"),
                }
                read_footer(&mut r, h.section_id()).unwrap();
                let _ = matches!(h, SectionHeader::Full(_));
            }
        }
    }
    assert_eq!(zero_pages, 8192);
    assert_eq!(counts[&("PART", "ram".to_string())], 64_609);
    assert_eq!(counts[&("FULL", "globalstate".to_string())], 1);
    assert!(
        matches!(wire::section::read_vmdesc(&mut r).unwrap(), wire::Trailer::Vmdesc(j) if j.len() == 486)
    );
    assert!(r.is_at_eof().unwrap());
}

#[test]
fn analyzer_collapses_the_empty_parts() {
    let s = build();
    let a = wire::analyze(&s[..]);
    assert!(a.error.is_none(), "{:?}", a.error);
    let sum = &a.summary;
    let parts: Vec<_> = sum.items.iter().filter(|i| i.kind == "PART").collect();
    assert_eq!(parts.len(), 2);
    assert_eq!(
        (parts[0].offset, parts[0].count, parts[0].detail.as_str()),
        (0x7a, 1, "8192 zero pages")
    );
    assert_eq!(
        (parts[1].offset, parts[1].count, parts[1].bytes),
        (0x12090, 64_608, 64_608 * 18)
    );
    assert_eq!(parts[1].detail, "empty");
    assert!(sum.items.len() < 15);
    let text = a.to_string();
    assert!(text.lines().count() < 40, "{text}");
    assert!(text.contains("PART ram (id 2) ×64608: empty"), "{text}");
    assert_eq!(sum.ram.blocks.len(), 1);
    assert_eq!(
        (sum.ram.blocks[0].size, sum.ram.blocks[0].zero),
        (Some(0x2000000), 8192)
    );
    let bm = &sum.bitmaps[0];
    assert_eq!(
        (
            bm.node.as_str(),
            bm.bitmap.as_str(),
            bm.granularity,
            bm.start_flags
        ),
        ("vda", "bitmap0", Some(65536), Some(3))
    );
    assert_eq!(
        (
            bm.chunks.len(),
            bm.chunks[0].nr_sectors,
            bm.chunks[0].buf_size,
            bm.set_bits()
        ),
        (1, 131072, 128, 2)
    );
    assert!(bm.complete);
    let timer = &sum.devices[0];
    // The timer body holds `7e 00000000 00`, which looks like its own footer followed by EOF:
    // the analyzer must not end the section there.
    assert_eq!(&s[0x12e01d..0x12e023], &[0x7e, 0, 0, 0, 0, 0]);
    assert_eq!(timer.size, 24);
    let f = timer.fields.as_ref().unwrap();
    assert_eq!(
        f[0],
        (
            "cpu_ticks_offset".into(),
            serde_json::json!(0x14708F7A57Ei64)
        )
    );
    assert_eq!(
        f[2],
        (
            "cpu_clock_offset".into(),
            serde_json::json!(0x8E3073AA89i64)
        )
    );
    assert!(
        text.contains("runstate = \"running\" (100 bytes, NUL-padded)"),
        "{text}"
    );
    let j = a.to_json();
    assert_eq!(j["items"].as_array().unwrap().len(), sum.items.len());
    assert_eq!(j["trailer"]["len"], 486);
    assert_eq!(j["devices"][1]["fields"]["size"], 8);
}

#[test]
fn damage_is_located() {
    let mut s = build();
    // Break the footer of the 100th empty PART.
    let off = 0x12090 + 99 * 18 + 13;
    s[off] = 0x7d;
    let a = wire::analyze(&s[..]);
    let e = a.error.as_ref().expect("damaged");
    assert_eq!(e.offset, off as u64);
    assert_eq!(
        e.to_string(),
        format!("at byte {off:#x} in section 'ram' (id 2): Missing section footer for ram (got byte 0x7d)")
    );
    // The partial summary still has what came before.
    assert_eq!(
        a.summary
            .items
            .iter()
            .find(|i| i.kind == "PART" && i.detail == "empty")
            .unwrap()
            .count,
        99
    );
    assert_eq!(a.summary.ram.blocks[0].zero, 8192);
    let j = a.to_json();
    assert_eq!(j["error"]["offset"], off);
    assert_eq!(j["error"]["section"]["idstr"], "ram");
    // Truncated inside the bitmap section.
    let cut = 0x12df80;
    let a = wire::analyze(&build()[..cut]);
    let e = a.error.unwrap();
    assert!(e.is_truncated());
    assert_eq!(e.section.unwrap().idstr, "dirty-bitmap");
}
