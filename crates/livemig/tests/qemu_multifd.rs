//! Multifd with QEMU 7.2 at the other end, both `-M none -m 32M`, with dirty bitmaps, over
//! unix and TCP, uncompressed and with `multifd-compression` zlib and zstd.
//!
//! Each test runs one chain of three live migrations, every end with capability `multifd` and
//! the same `multifd-channels`:
//! 1. QEMU "A" → livemig "L1". QEMU's RAM holds pattern A (from `-device loader`), which
//!    QEMU 7.2 sends over its channels (zero pages as ZERO records on the main stream, the
//!    rest in packets, a SYNC per channel before every RAM EOS, data inside SYNC packets).
//! 2. L1 → QEMU "B". B has loaders for pattern B, which QEMU does not apply while it waits
//!    for a migration, so B's RAM must come out exactly as L1's.
//! 3. B → livemig "L2", throttled to 1 MiB/s, and `system_reset` on B while it migrates: B's
//!    loaders rewrite two ranges, QEMU sends those pages again in a later round, on whichever
//!    channel is free. L2 must end with the new contents: only the sync points keep an old
//!    copy of a page from landing after the new one.
//!
//! After each step both ends report `completed`, their RAM (`pmemsave`) is byte-identical and
//! the bitmap has the same hash on both ends.

mod qemu_common;

use qemu_common::*;
use serde_json::{json, Value};
use testkit::QmpClient;

/// Bytes of pattern A at guest address 0.
const A_LEN: usize = 4 << 20;
/// Bytes of each of B's two loader ranges.
const B_LEN: usize = 256 << 10;
/// Guest address of B's second loader range (RAM that A left zero).
const B_ADDR2: u64 = 16 << 20;
/// Channels on every end.
const CHANNELS: u64 = 3;

/// Capabilities `multifd`, `dirty-bitmaps` and the multifd parameters on one end.
fn multifd(q: &mut QmpClient, compression: &str) {
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "multifd", "state": true},
            {"capability": "dirty-bitmaps", "state": true},
        ]}),
    );
    q.ok(
        "migrate-set-parameters",
        json!({
            "multifd-channels": CHANNELS,
            "multifd-compression": compression,
            "multifd-zlib-level": 6,
            "multifd-zstd-level": 3,
        }),
    );
}

fn multifd_bytes(s: &Value) -> u64 {
    s["ram"]["multifd-bytes"].as_u64().unwrap_or(0)
}

fn chain(test: &str, transport: Transport, compression: &str) {
    let Some(tmp) = setup(test) else { return };
    let dir = tmp.path();
    let a_file = dir.join("a.bin");
    let b_file = dir.join("b.bin");
    let pat_a = pattern_file(&a_file, A_LEN, 13);
    let pat_b = pattern_file(&b_file, B_LEN, 42);

    // 1. QEMU A -> livemig L1.
    let mut args = null_co("node0", MIB64);
    args.extend(loader(&a_file, 0));
    let qa = qemu(dir, "qa", &args);
    let mut qa_q = qa.qmp();
    add_bitmap(&mut qa_q, "node0", "bm0", 65536);
    qemu_io(&mut qa_q, "node0", "write 0 64k");
    qemu_io(&mut qa_q, "node0", "write 5M 4k");
    multifd(&mut qa_q, compression);
    let uri = transport.uri(dir, "mig1");
    let mut args = null_co("node0", MIB64);
    args.extend(strings(&["-incoming", &uri]));
    let l1 = livemig(dir, "l1", &args);
    let mut l1_q = l1.qmp();
    multifd(&mut l1_q, compression);
    let (s, d) = migrate(&mut qa_q, &mut l1_q, &uri);
    assert_completed("QEMU -> livemig", &s, &qa, &d, &l1);
    assert!(
        multifd_bytes(&s) > A_LEN as u64,
        "QEMU used its channels: {s}"
    );
    let ram_qa = ram(&mut qa_q, dir, "qa");
    assert_eq!(
        &ram_qa[..A_LEN],
        &pat_a[..],
        "loader A did not fill QEMU's RAM"
    );
    let ram_l1 = ram(&mut l1_q, dir, "l1");
    assert_same_ram(&ram_qa, &ram_l1, "QEMU -> livemig");
    assert_eq!(
        sha(&mut qa_q, "node0", "bm0"),
        sha(&mut l1_q, "node0", "bm0"),
        "QEMU -> livemig: bitmap"
    );
    assert_eq!(l1_q.ok("query-status", json!({}))["status"], "running");
    drop(qa);

    // 2. livemig L1 -> QEMU B.
    qemu_io(&mut l1_q, "node0", "write 8M 64k");
    let uri = transport.uri(dir, "mig2");
    let mut args = null_co("node0", MIB64);
    args.extend(loader(&b_file, 0));
    args.extend(loader(&b_file, B_ADDR2));
    args.extend(strings(&["-incoming", &uri]));
    let qb = qemu(dir, "qb", &args);
    let mut qb_q = qb.qmp();
    multifd(&mut qb_q, compression);
    let (s, d) = migrate(&mut l1_q, &mut qb_q, &uri);
    assert_completed("livemig -> QEMU", &s, &l1, &d, &qb);
    let pages = s["ram"]["normal"].as_u64().unwrap_or(0);
    assert!(pages >= (A_LEN / 4096) as u64, "{s}");
    if compression == "none" {
        assert!(
            multifd_bytes(&s) >= pages * 4096,
            "livemig used its channels: {s}"
        );
    } else {
        // Pattern A repeats every 256 bytes: compressed, it is a small fraction.
        assert!(
            multifd_bytes(&s) > 0 && multifd_bytes(&s) < pages * 4096 / 4,
            "livemig compressed ({compression}): {s}"
        );
    }
    let ram_qb = ram(&mut qb_q, dir, "qb");
    assert_same_ram(&ram_l1, &ram_qb, "livemig -> QEMU");
    assert_eq!(
        sha(&mut l1_q, "node0", "bm0"),
        sha(&mut qb_q, "node0", "bm0"),
        "livemig -> QEMU: bitmap"
    );
    assert_eq!(
        qb_q.ok("query-status", json!({}))["status"],
        "running",
        "QEMU B runs after the migration: {}",
        qb.log()
    );
    drop(l1);

    // 3. QEMU B -> livemig L2, with pages rewritten mid-migration by system_reset.
    let uri = transport.uri(dir, "mig3");
    let mut args = null_co("node0", MIB64);
    args.extend(strings(&["-incoming", &uri]));
    let l2 = livemig(dir, "l2", &args);
    let mut l2_q = l2.qmp();
    multifd(&mut l2_q, compression);
    let (s, ram_qb2) = migrate_across_reset(
        dir,
        (&qb, &mut qb_q),
        (&l2, &mut l2_q),
        &uri,
        &pat_b,
        B_ADDR2,
    );
    let normal = s["ram"]["normal"].as_u64().unwrap_or(0);
    assert!(
        normal >= (A_LEN / 4096) as u64 + 64,
        "pages were not sent again: {s}"
    );
    assert_same_ram(
        &ram_qb2,
        &ram(&mut l2_q, dir, "l2"),
        "QEMU -> livemig after system_reset",
    );
    assert_eq!(
        sha(&mut qb_q, "node0", "bm0"),
        sha(&mut l2_q, "node0", "bm0"),
        "QEMU -> livemig after system_reset: bitmap"
    );
    assert_eq!(l2_q.ok("query-status", json!({}))["status"], "running");
    quit_cleanly(l2, l2_q);
}

#[test]
fn qemu_multifd_chain_over_unix() {
    chain("qemu_multifd_chain_over_unix", Transport::Unix, "none");
}

#[test]
fn qemu_multifd_chain_over_tcp() {
    chain("qemu_multifd_chain_over_tcp", Transport::Tcp, "none");
}

#[test]
fn qemu_multifd_zlib_chain_over_tcp() {
    chain("qemu_multifd_zlib_chain_over_tcp", Transport::Tcp, "zlib");
}

#[test]
fn qemu_multifd_zstd_chain_over_unix() {
    chain("qemu_multifd_zstd_chain_over_unix", Transport::Unix, "zstd");
}
