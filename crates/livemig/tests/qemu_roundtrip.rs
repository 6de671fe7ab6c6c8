//! QEMU 7.2 ⇄ livemig, both `-M none -m 32M`, with dirty bitmaps, over unix and TCP sockets,
//! with and without a return path.
//!
//! Each test runs one chain of three live migrations:
//! 1. QEMU "A" → livemig "L1". QEMU's RAM holds pattern A (from `-device loader`); bitmaps on
//!    a null-co node and on a raw-over-file node, dirtied with `qemu-io`, one of them disabled.
//! 2. L1 → QEMU "B". L1 dirties a bitmap and adds one with 512-byte granules first. B has
//!    loaders for pattern B, which QEMU does not apply while it waits for a migration, so B's
//!    RAM must come out exactly as L1's.
//! 3. B → livemig "L2", throttled to 1 MiB/s, and `system_reset` on B while it migrates: B's
//!    loaders rewrite two ranges with pattern B, QEMU dirty-tracks those writes and sends the
//!    pages again. L2 must end with the new contents.
//!
//! After each step both ends report `completed`, their RAM (`pmemsave`) is byte-identical and
//! every bitmap has the same `x-debug-block-dirty-bitmap-sha256` on both ends.

mod qemu_common;

use qemu_common::*;
use serde_json::json;
use std::path::Path;
use testkit::QmpClient;

/// Bytes of pattern A at guest address 0.
const A_LEN: usize = 2 << 20;
/// Bytes of each of B's two loader ranges.
const B_LEN: usize = 256 << 10;
/// Guest address of B's second loader range (RAM that A left zero).
const B_ADDR2: u64 = 16 << 20;

/// The disks every machine of the chain has: `node0` (null-co, 64 MiB) and `disk1` (raw over
/// its own 8 MiB file).
fn disks(dir: &Path, name: &str) -> Vec<String> {
    let mut v = null_co("node0", MIB64);
    v.extend(raw_file(
        "disk1",
        &dir.join(format!("{name}-disk1.img")),
        8 << 20,
    ));
    v
}

/// Asserts that `names` (node, bitmap) have the same sha256 on both ends.
fn same_bitmaps(a: &mut QmpClient, b: &mut QmpClient, names: &[(&str, &str)], step: &str) {
    for (node, bm) in names {
        let (x, y) = (sha(a, node, bm), sha(b, node, bm));
        assert_eq!(x, y, "{step}: bitmap {node}/{bm} differs");
    }
}

fn chain(test: &str, transport: Transport, return_path: bool) {
    let Some(tmp) = setup(test) else { return };
    let dir = tmp.path();
    let a_file = dir.join("a.bin");
    let b_file = dir.join("b.bin");
    let pat_a = pattern_file(&a_file, A_LEN, 7);
    let pat_b = pattern_file(&b_file, B_LEN, 40);

    // 1. QEMU A -> livemig L1.
    let mut args = disks(dir, "qa");
    args.extend(loader(&a_file, 0));
    let qa = qemu(dir, "qa", &args);
    let mut qa_q = qa.qmp();
    add_bitmap(&mut qa_q, "node0", "bm0", 65536);
    add_bitmap(&mut qa_q, "disk1", "bm1", 4096);
    qemu_io(&mut qa_q, "node0", "write 0 64k");
    qemu_io(&mut qa_q, "node0", "write 320k 4k");
    qemu_io(&mut qa_q, "disk1", "write 1M 12k");
    qa_q.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "disk1", "name": "bm1"}),
    );
    caps(&mut qa_q, return_path);

    let uri = transport.uri(dir, "mig1");
    let mut args = disks(dir, "l1");
    args.extend(strings(&["-incoming", &uri]));
    let l1 = livemig(dir, "l1", &args);
    let mut l1_q = l1.qmp();
    caps(&mut l1_q, return_path);
    let (s, d) = migrate(&mut qa_q, &mut l1_q, &uri);
    assert_completed("QEMU -> livemig", &s, &qa, &d, &l1);
    let ram_qa = ram(&mut qa_q, dir, "qa");
    let ram_l1 = ram(&mut l1_q, dir, "l1");
    assert_eq!(
        &ram_qa[..A_LEN],
        &pat_a[..],
        "loader A did not fill QEMU's RAM"
    );
    assert_same_ram(&ram_qa, &ram_l1, "QEMU -> livemig");
    same_bitmaps(
        &mut qa_q,
        &mut l1_q,
        &[("node0", "bm0"), ("disk1", "bm1")],
        "QEMU -> livemig",
    );
    // The enabled bitmap records on the destination, the disabled one does not.
    let l1_bitmaps = bitmaps(&mut l1_q);
    assert_eq!(l1_bitmaps["node0"]["bm0"]["recording"], true);
    assert_eq!(l1_bitmaps["disk1"]["bm1"]["recording"], false);
    assert_eq!(
        l1_q.ok("query-status", json!({}))["status"],
        "running",
        "L1 runs after the migration"
    );
    drop(qa);

    // 2. livemig L1 -> QEMU B.
    qemu_io(&mut l1_q, "node0", "write 4M 64k");
    add_bitmap(&mut l1_q, "node0", "bm2", 512);
    qemu_io(&mut l1_q, "node0", "write 3M 512");
    qemu_io(&mut l1_q, "node0", "write 60M 4k");
    let uri = transport.uri(dir, "mig2");
    let mut args = disks(dir, "qb");
    args.extend(loader(&b_file, 0));
    args.extend(loader(&b_file, B_ADDR2));
    args.extend(strings(&["-incoming", &uri]));
    let qb = qemu(dir, "qb", &args);
    let mut qb_q = qb.qmp();
    caps(&mut qb_q, return_path);
    let (s, d) = migrate(&mut l1_q, &mut qb_q, &uri);
    assert_completed("livemig -> QEMU", &s, &l1, &d, &qb);
    let ram_qb = ram(&mut qb_q, dir, "qb");
    assert_same_ram(&ram_l1, &ram_qb, "livemig -> QEMU");
    let all = [("node0", "bm0"), ("disk1", "bm1"), ("node0", "bm2")];
    same_bitmaps(&mut l1_q, &mut qb_q, &all, "livemig -> QEMU");
    assert_eq!(
        qb_q.ok("query-status", json!({}))["status"],
        "running",
        "QEMU B runs after the migration: {}",
        qb.log()
    );
    drop(l1);

    // 3. QEMU B -> livemig L2, with pages rewritten mid-migration by system_reset.
    qemu_io(&mut qb_q, "node0", "write 8M 64k");
    let uri = transport.uri(dir, "mig3");
    let mut args = disks(dir, "l2");
    args.extend(strings(&["-incoming", &uri]));
    let l2 = livemig(dir, "l2", &args);
    let mut l2_q = l2.qmp();
    caps(&mut l2_q, return_path);
    let (s, ram_qb2) = migrate_across_reset(
        dir,
        (&qb, &mut qb_q),
        (&l2, &mut l2_q),
        &uri,
        &pat_b,
        B_ADDR2,
    );
    // 512 pages of A, then both loader ranges (64 pages each) again: the 64 pages at 0 were
    // sent twice.
    let normal = s["ram"]["normal"].as_u64().unwrap_or(0);
    assert!(normal >= 512 + 64 + 64, "pages were not sent again: {s}");
    let ram_l2 = ram(&mut l2_q, dir, "l2");
    assert_eq!(
        &ram_qb2[B_LEN..A_LEN],
        &pat_a[B_LEN..],
        "pattern A outside the loader range"
    );
    assert_same_ram(&ram_qb2, &ram_l2, "QEMU -> livemig after system_reset");
    same_bitmaps(
        &mut qb_q,
        &mut l2_q,
        &all,
        "QEMU -> livemig after system_reset",
    );
    assert_eq!(l2_q.ok("query-status", json!({}))["status"], "running");
    assert_eq!(qb_q.ok("query-status", json!({}))["status"], "postmigrate");
    quit_cleanly(l2, l2_q);
}

#[test]
fn qemu_chain_over_unix() {
    chain("qemu_chain_over_unix", Transport::Unix, false);
}

#[test]
fn qemu_chain_over_tcp() {
    chain("qemu_chain_over_tcp", Transport::Tcp, false);
}

#[test]
fn qemu_chain_over_unix_with_return_path() {
    chain(
        "qemu_chain_over_unix_with_return_path",
        Transport::Unix,
        true,
    );
}

#[test]
fn qemu_chain_over_tcp_with_return_path() {
    chain("qemu_chain_over_tcp_with_return_path", Transport::Tcp, true);
}
