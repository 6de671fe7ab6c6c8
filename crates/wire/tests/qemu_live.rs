//! Interop with a real QEMU 7.2: a stream QEMU writes is analyzed, and a stream written with
//! this crate is loaded by QEMU. Skipped (per `testkit::require`) where QEMU is missing.

use serde_json::json;
use std::path::Path;
use std::time::Duration;
use testkit::VmProcess;
use wire::bitmap::{write_chunk, BitsData, Chunk, ChunkPayload, NameTracker};
use wire::config::{write_configuration, Configuration};
use wire::ram::{
    write_eos, write_mem_block, write_mem_size, write_page, write_zero, BlockTracker, MemBlock,
};
use wire::section::{
    write_end, write_eof, write_file_header, write_footer, write_full, write_part, write_start,
    write_vmdesc,
};
use wire::vmstate::{vmdesc_json, DeviceDesc, FieldKind, VmsdDesc};
use wire::StreamWriter;

/// `-M none -m 4M` with a 64 MiB null-co node `node0`. QEMU 7.2 from Debian rejects
/// `-accel qtest`, so TCG it is (no CPU runs on `-M none` anyway).
fn qemu_args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "-M",
        "none",
        "-m",
        "4M",
        "-nodefaults",
        "-display",
        "none",
        "-accel",
        "tcg",
        "-blockdev",
        "driver=null-co,node-name=node0,size=67108864",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn qemu_stream_with_dirty_bitmap_is_analyzed() {
    if !testkit::require("qemu_stream_with_dirty_bitmap_is_analyzed", testkit::qemu()) {
        return;
    }
    let dir = testkit::tempdir();
    let out = dir.path().join("stream.mig");
    let vm = VmProcess::spawn("qemu-system-x86_64", &qemu_args(&[]), dir.path(), "src").unwrap();
    let mut qmp = vm.qmp();
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "node0", "name": "bitmap0", "granularity": 65536}),
    );
    for w in ["write 0 64k", "write 320k 4k", "write 1M 64k"] {
        let text = qmp.hmp(&format!("qemu-io node0 \"{w}\""));
        assert!(!text.contains("rror"), "{text}");
    }
    qmp.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "dirty-bitmaps", "state": true}]}),
    );
    qmp.ok("migrate-set-parameters", json!({"max-bandwidth": 100000}));
    qmp.ok(
        "migrate",
        json!({"uri": format!("exec:cat > {}", out.display())}),
    );
    let st = qmp.wait_migration(&["completed", "failed"], Duration::from_secs(60));
    assert_eq!(st["status"], "completed", "{st}\n{}", vm.log());

    let a = wire::analyze(std::fs::File::open(&out).unwrap());
    assert!(a.error.is_none(), "{a}");
    let s = &a.summary;
    assert_eq!(s.configuration.as_ref().unwrap().machine, "none");
    let ram = &s.ram.blocks[0];
    assert_eq!((ram.name.as_str(), ram.size), ("ram", Some(4 << 20)));
    assert_eq!(ram.normal + ram.zero, 1024);
    assert_eq!(s.bitmaps.len(), 1);
    let b = &s.bitmaps[0];
    assert_eq!(
        (
            b.node.as_str(),
            b.bitmap.as_str(),
            b.granularity,
            b.complete
        ),
        ("node0", "bitmap0", Some(65536), true)
    );
    assert_eq!(b.chunks.len(), 1);
    assert_eq!(
        (
            b.chunks[0].nr_sectors,
            b.chunks[0].buf_size,
            b.chunks[0].set_bits
        ),
        (131072, 128, 3)
    );
    assert!(s
        .devices
        .iter()
        .any(|d| d.idstr == "timer" && d.fields.is_some()));
}

fn timer() -> VmsdDesc {
    VmsdDesc::new("timer", 2)
        .field("cpu_ticks_offset", FieldKind::I64)
        .field("unused", FieldKind::Unused(8))
        .field("cpu_clock_offset", FieldKind::I64)
}

/// A stream as a livemig source would write it: RAM with two non-zero pages, a dirty bitmap
/// with granules 0 and 5 set, timer, globalstate, EOF and the trailer.
fn write_stream(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = StreamWriter::new(f);
    write_file_header(&mut w).unwrap();
    write_configuration(&mut w, &Configuration::new("none")).unwrap();
    wire::command::write_command(&mut w, &wire::Command::PostcopyAdvise(None)).unwrap();
    write_start(&mut w, 2, "ram", 0, 4).unwrap();
    write_mem_size(&mut w, 4 << 20).unwrap();
    write_mem_block(
        &mut w,
        &MemBlock {
            name: "ram".into(),
            used_length: 4 << 20,
            page_size: None,
            addr: None,
        },
    )
    .unwrap();
    write_eos(&mut w).unwrap();
    write_footer(&mut w, 2).unwrap();
    let mut names = NameTracker::new();
    write_start(&mut w, 3, "dirty-bitmap", 0, 1).unwrap();
    let (node, bitmap) = names.encode("node0", "bm");
    let start = ChunkPayload::Start {
        granularity: 65536,
        flags: 0,
    };
    write_chunk(&mut w, &Chunk::new((node, bitmap), start)).unwrap();
    write_chunk(&mut w, &Chunk::eos()).unwrap();
    write_footer(&mut w, 3).unwrap();
    write_part(&mut w, 2).unwrap();
    let mut blocks = BlockTracker::new();
    let mut page = vec![0u8; 4096];
    for i in 0..1024u64 {
        let name = blocks.encode("ram");
        match i {
            3 => {
                page.fill(0x5a);
                write_page(&mut w, name, i * 4096, &page).unwrap();
            }
            1000 => {
                page.iter_mut().enumerate().for_each(|(k, b)| *b = k as u8);
                write_page(&mut w, name, i * 4096, &page).unwrap();
            }
            _ => write_zero(&mut w, name, i * 4096, 0).unwrap(),
        }
    }
    write_eos(&mut w).unwrap();
    write_footer(&mut w, 2).unwrap();
    write_end(&mut w, 2).unwrap();
    write_eos(&mut w).unwrap();
    write_footer(&mut w, 2).unwrap();
    write_end(&mut w, 3).unwrap();
    let mut buf = vec![0x21u8];
    wire::bitmap::pad_buffer(&mut buf);
    buf.resize(128, 0);
    let (node, bitmap) = names.encode("node0", "bm");
    let bits = ChunkPayload::Bits {
        start_sector: 0,
        nr_sectors: 131072,
        data: BitsData::Buffer(buf),
    };
    write_chunk(&mut w, &Chunk::new((node, bitmap), bits)).unwrap();
    write_chunk(&mut w, &Chunk::new((None, None), ChunkPayload::Complete)).unwrap();
    write_chunk(&mut w, &Chunk::eos()).unwrap();
    write_footer(&mut w, 3).unwrap();
    write_full(&mut w, 5, "timer", 0, 2).unwrap();
    for v in [1_000_000u64, 0, 2_000_000] {
        w.put_be64(v).unwrap();
    }
    write_footer(&mut w, 5).unwrap();
    write_full(&mut w, 6, "globalstate", 0, 1).unwrap();
    w.put_be32(7).unwrap();
    let mut rs = [0u8; 100];
    rs[..6].copy_from_slice(b"paused");
    w.put_bytes(&rs).unwrap();
    write_footer(&mut w, 6).unwrap();
    write_eof(&mut w).unwrap();
    let gs = VmsdDesc::new("globalstate", 1)
        .field("size", FieldKind::U32)
        .field("runstate", FieldKind::Buffer(100));
    let devices = [
        DeviceDesc {
            idstr: "timer".into(),
            instance_id: 0,
            vmsd: timer(),
        },
        DeviceDesc {
            idstr: "globalstate".into(),
            instance_id: 0,
            vmsd: gs,
        },
    ];
    write_vmdesc(&mut w, vmdesc_json(4096, &devices, None).as_bytes()).unwrap();
    w.flush().unwrap();
}

#[test]
fn stream_written_here_loads_into_qemu() {
    if !testkit::require("stream_written_here_loads_into_qemu", testkit::qemu()) {
        return;
    }
    let dir = testkit::tempdir();
    let stream = dir.path().join("ours.mig");
    write_stream(&stream);
    // Our own analyzer agrees with what we meant to write.
    let a = wire::analyze(std::fs::File::open(&stream).unwrap());
    assert!(a.error.is_none(), "{a}");
    assert_eq!(
        (a.summary.ram.blocks[0].normal, a.summary.ram.blocks[0].zero),
        (2, 1022)
    );

    let vm = VmProcess::spawn(
        "qemu-system-x86_64",
        &qemu_args(&["-incoming", "defer"]),
        dir.path(),
        "dst",
    )
    .unwrap();
    let mut qmp = vm.qmp();
    qmp.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "dirty-bitmaps", "state": true}]}),
    );
    qmp.ok(
        "migrate-incoming",
        json!({"uri": format!("exec:cat {}", stream.display())}),
    );
    let st = qmp.wait_migration(&["completed", "failed"], Duration::from_secs(60));
    assert_eq!(st["status"], "completed", "{st}\n{}", vm.log());

    // Guest memory holds our pages.
    let dump = dir.path().join("mem.bin");
    qmp.ok(
        "pmemsave",
        json!({"val": 0, "size": 4 << 20, "filename": dump.display().to_string()}),
    );
    let mem = std::fs::read(&dump).unwrap();
    assert!(mem[0x3000..0x4000].iter().all(|&b| b == 0x5a));
    assert!(mem[1000 * 4096..1001 * 4096]
        .iter()
        .enumerate()
        .all(|(k, &b)| b == k as u8));
    assert_eq!(mem.iter().filter(|&&b| b != 0).count(), 4096 + 4096 - 16);
    // globalstate said "paused": QEMU applies it.
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "paused");
    // The bitmap arrived with granules 0 and 5: 2 × 64 KiB dirty.
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "node0")
        .unwrap();
    let bm = node["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "bm")
        .unwrap();
    assert_eq!(bm["count"], 2 * 65536, "{bm}");
    assert_eq!(bm["granularity"], 65536);
}
