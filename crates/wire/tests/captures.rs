//! The analyzer against real QEMU 7.2 captures committed under tests/data (see its README).

use wire::analyze::TrailerSummary;

fn load(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Granules 0, 5 and 16 of a 64 MiB node at 64 KiB granularity, as written by the capture
/// script.
fn check_bitmap(sum: &wire::Summary) {
    assert_eq!(sum.bitmaps.len(), 1);
    let b = &sum.bitmaps[0];
    assert_eq!((b.node.as_str(), b.bitmap.as_str()), ("node0", "bitmap0"));
    assert_eq!(
        (b.granularity, b.start_flags, b.complete),
        (Some(65536), Some(1), true)
    );
    assert_eq!(b.chunks.len(), 1);
    let c = &b.chunks[0];
    assert_eq!(
        (
            c.start_sector,
            c.nr_sectors,
            c.zeroes,
            c.buf_size,
            c.set_bits
        ),
        (0, 131072, false, 128, 3)
    );
}

fn check_common(a: &wire::Analysis, len: usize) {
    assert!(a.error.is_none(), "{}", a);
    let sum = &a.summary;
    assert!(sum.eof);
    assert_eq!(sum.bytes as usize, len);
    assert_eq!(sum.configuration.as_ref().unwrap().machine, "none");
    assert_eq!(sum.ram.total, Some(4 << 20));
    assert_eq!(sum.ram.blocks.len(), 1);
    assert_eq!(sum.ram.blocks[0].name, "ram");
    assert_eq!(sum.ram.blocks[0].size, Some(4 << 20));
    assert_eq!(sum.ram.blocks[0].normal + sum.ram.blocks[0].zero, 1024);
    check_bitmap(sum);
    let names: Vec<&str> = sum.devices.iter().map(|d| d.idstr.as_str()).collect();
    assert_eq!(names, ["timer", "globalstate"]);
    let gs = sum.devices[1]
        .fields
        .as_ref()
        .expect("globalstate decoded with the trailer");
    assert_eq!(gs[0], ("size".to_string(), serde_json::json!(8)));
    assert!(
        gs[1].1.as_str().unwrap().starts_with("72756e6e696e6700"),
        "runstate 'running'"
    );
    assert!(matches!(
        &sum.trailer,
        TrailerSummary::Json { len: 486, .. }
    ));
    assert_eq!(sum.items.first().unwrap().name, "POSTCOPY_ADVISE");
    assert_eq!(sum.items.last().unwrap().kind, "EOF");
}

#[test]
fn zero_ram_capture() {
    let data = load("none-4m-zero-bitmap.mig");
    let a = wire::analyze(&data[..]);
    check_common(&a, data.len());
    assert_eq!(a.summary.ram.blocks[0].zero, 1024);
    // The empty PART sections collapse into one run.
    let empty: Vec<_> = a
        .summary
        .items
        .iter()
        .filter(|i| i.kind == "PART" && i.detail == "empty")
        .collect();
    assert_eq!(empty.len(), 1);
    assert!(empty[0].count > 1);
    assert_eq!(empty[0].bytes, empty[0].count * 18);
}

#[test]
fn pages_capture() {
    let data = load("none-4m-pages-bitmap.mig");
    let a = wire::analyze(&data[..]);
    check_common(&a, data.len());
    assert_eq!(
        (a.summary.ram.blocks[0].normal, a.summary.ram.blocks[0].zero),
        (3, 1021)
    );
    let text = a.to_string();
    assert!(
        text.contains("block 'ram' 0x400000 (1024 pages): 3 normal, 1021 zero"),
        "{text}"
    );
    assert!(
        text.contains(
            "node0/bitmap0: granularity 65536, flags 0x1 (enabled), 3 bits set, complete"
        ),
        "{text}"
    );
    let j = a.to_json();
    assert_eq!(j["ram"]["blocks"][0]["normal"], 3);
    assert_eq!(j["dirty_bitmaps"][0]["set_bits"], 3);
}

#[test]
fn page_contents_land_in_guest_memory() {
    // Reads the capture the way a destination does: pages go straight into a guest buffer.
    use wire::ram::{read_mem_blocks, read_ram_record, BlockTracker, RamRecord};
    use wire::section::{read_file_header, read_footer, read_item};
    let data = load("none-4m-pages-bitmap.mig");
    let mut guest = vec![0xEEu8; 4 << 20];
    let mut r = wire::StreamReader::new(&data[..]);
    read_file_header(&mut r).unwrap();
    wire::config::read_configuration(&mut r).unwrap();
    let mut blocks = BlockTracker::new();
    let mut ids = std::collections::HashMap::new();
    loop {
        match read_item(&mut r).unwrap() {
            wire::Item::Eof => break,
            wire::Item::Command(_) => {}
            wire::Item::Section(h) => {
                if let Some(s) = h.start() {
                    ids.insert(s.section_id, s.idstr.clone());
                }
                let idstr = ids[&h.section_id()].clone();
                r.set_section(Some(wire::SectionContext::new(
                    idstr.clone(),
                    h.section_id(),
                )));
                match idstr.as_str() {
                    "ram" => loop {
                        match read_ram_record(&mut r).unwrap() {
                            RamRecord::Eos => break,
                            RamRecord::MemSize { total } => {
                                read_mem_blocks(&mut r, total, |_| Default::default()).unwrap();
                            }
                            RamRecord::Zero {
                                block,
                                offset,
                                fill,
                            } => {
                                blocks.resolve(block.as_deref()).unwrap();
                                let o = offset as usize;
                                guest[o..o + 4096].fill(fill);
                            }
                            RamRecord::Page { block, offset } => {
                                blocks.resolve(block.as_deref()).unwrap();
                                let o = offset as usize;
                                r.read_into(&mut guest[o..o + 4096]).unwrap();
                            }
                            other => panic!("{other:?}"),
                        }
                    },
                    "dirty-bitmap" => while !wire::bitmap::read_chunk(&mut r).unwrap().eos {},
                    "timer" => r.skip(24).unwrap(),
                    _ => r.skip(104).unwrap(),
                }
                read_footer(&mut r, h.section_id()).unwrap();
            }
        }
    }
    assert_eq!(&guest[0x3000..0x3004], &[0x5a; 4]);
    assert_eq!(&guest[0x4000..0x4004], &[1, 2, 3, 4]);
    assert_eq!(&guest[0x3ff000..0x3ff004], &[0xff; 4]);
    assert_eq!(guest.iter().filter(|&&b| b != 0).count(), 12);
}

#[test]
fn analyzer_reads_from_a_child_process_pipe() {
    if !testkit::require(
        "analyzer_reads_from_a_child_process_pipe",
        testkit::programs(&["cat"]),
    ) {
        return;
    }
    let path = format!(
        "{}/tests/data/none-4m-pages-bitmap.mig",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut child = std::process::Command::new("cat")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let a = wire::analyze(child.stdout.take().unwrap());
    child.wait().unwrap();
    assert!(a.error.is_none(), "{a}");
    assert_eq!(a.summary.ram.blocks[0].normal, 3);
}

#[test]
fn pages_cross_a_unix_socket_with_vectored_io() {
    use std::os::unix::net::UnixStream;
    use wire::ram::{read_ram_record, write_eos, write_page, BlockTracker, RamRecord};
    let (tx, rx) = UnixStream::pair().unwrap();
    let pages: Vec<Vec<u8>> = (0..64u8)
        .map(|i| vec![i.wrapping_mul(7) | 1; 4096])
        .collect();
    let sent = pages.clone();
    let writer = std::thread::spawn(move || {
        let mut w = wire::StreamWriter::new(tx);
        let mut t = BlockTracker::new();
        for (i, p) in sent.iter().enumerate() {
            write_page(&mut w, t.encode("pc.ram"), i as u64 * 4096, p).unwrap();
        }
        write_eos(&mut w).unwrap();
        w.flush().unwrap();
        w.bytes_written()
    });
    let mut r = wire::StreamReader::with_capacity(rx, 512);
    let mut guest = vec![0u8; 64 * 4096];
    let mut n = 0;
    loop {
        match read_ram_record(&mut r).unwrap() {
            RamRecord::Page { offset, .. } => {
                let o = offset as usize;
                r.read_into(&mut guest[o..o + 4096]).unwrap();
                n += 1;
            }
            RamRecord::Eos => break,
            other => panic!("{other:?}"),
        }
    }
    let written = writer.join().unwrap();
    assert_eq!(n, 64);
    assert_eq!(r.offset(), written);
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(&guest[i * 4096..(i + 1) * 4096], &p[..]);
    }
    assert!(r.is_at_eof().unwrap());
}
