//! Dirty-bitmap streams that QEMU 7.2 cannot survive, and what livemig does with them as a
//! destination (dirty-bitmaps.md §4.8, §5; seed 000).
//!
//! Each stream is either real — a live migration from QEMU, or a capture of one
//! (`migrate exec:cat > FILE`), possibly with bytes patched — or built with the `wire` crate's
//! writer ([`qemu_common::write_stream`]). livemig must, in every case:
//! - report a clear error naming the bitmap, the node and the reason (`x-livemig-warnings` for
//!   a dropped bitmap, `error-desc` for a failed migration);
//! - either complete the migration with RAM intact, dropping only the offending bitmap (the
//!   others arrive), keep serving QMP and exit with status 0 on `quit`; or — where QEMU fails
//!   the migration (duplicate name, reserved START flags, an oversized buffer) — fail it and
//!   exit with status 1, as QEMU 7.2 does, the error on stderr (never an abort).
//!
//! The same stream is then run into QEMU 7.2 as a destination, and the test records (and
//! checks) what QEMU does instead: an assertion failure (SIGABRT) or an exit with status 1.

mod qemu_common;

use qemu_common::*;
use serde_json::{json, Value};
use std::path::Path;
use testkit::{QmpClient, VmProcess};
use wire::bitmap::BitsData;

const SIGABRT: i32 = 6;

/// A QEMU 7.2 source with a 256 KiB RAM pattern at 0 and, on each node, one enabled bitmap
/// (64 KiB granules) with a few dirty granules.
struct Source {
    _p: VmProcess,
    q: QmpClient,
}

fn qemu_source(dir: &Path, nodes: &[(&str, u64)], bitmaps: &[(&str, &str)]) -> Source {
    let pat = dir.join("src-pattern.bin");
    pattern_file(&pat, 256 << 10, 21);
    let mut args = Vec::new();
    for (n, size) in nodes {
        args.extend(null_co(n, *size));
    }
    args.extend(loader(&pat, 0));
    let p = qemu(dir, "src", &args);
    let mut q = p.qmp();
    for (i, (node, bm)) in bitmaps.iter().enumerate() {
        add_bitmap(&mut q, node, bm, 65536);
        qemu_io(&mut q, node, "write 0 64k");
        qemu_io(&mut q, node, &format!("write {}M 128k", i + 2));
    }
    Source { _p: p, q }
}

impl Source {
    /// Captures the source's stream into `name`, then resumes the source so it can migrate
    /// again.
    fn capture(&mut self, dir: &Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        caps(&mut self.q, false);
        capture_from_qemu(&mut self.q, &path);
        self.q.ok("cont", json!({}));
        path
    }

    /// Migrates live, with a return path, into a new livemig destination with `disks`.
    fn migrate_to_livemig(
        &mut self,
        dir: &Path,
        disks: &[String],
        prepare: impl FnOnce(&mut QmpClient),
    ) -> (Value, Loaded) {
        let uri = Transport::Unix.uri(dir, "live");
        let mut args = disks.to_vec();
        args.extend(strings(&["-incoming", &uri]));
        let p = livemig(dir, "dst", &args);
        let mut q = p.qmp();
        caps(&mut q, true);
        prepare(&mut q);
        caps(&mut self.q, true);
        let mut p = p;
        let uri = connect_uri(&mut q, &uri);
        self.q.ok("migrate", json!({ "uri": uri }));
        let s = wait(&mut self.q, &["completed", "failed", "cancelled"]);
        let (status, exit) = incoming_end(&mut p, &mut q);
        (s, Loaded { p, q, status, exit })
    }
}

fn disks(nodes: &[(&str, u64)]) -> Vec<String> {
    nodes.iter().flat_map(|(n, s)| null_co(n, *s)).collect()
}

/// The destination completed, RAM equals the source's, and `arrived` bitmaps equal the
/// source's.
fn assert_completed_with(
    src: &mut QmpClient,
    d: &mut Loaded,
    dir: &Path,
    arrived: &[(&str, &str)],
) {
    assert_eq!(d.status["status"], "completed", "{}", d.status);
    assert_eq!(d.exit, None);
    assert_same_ram(&ram(src, dir, "src"), &ram(&mut d.q, dir, "dst"), "RAM");
    for (node, bm) in arrived {
        assert_eq!(sha(src, node, bm), sha(&mut d.q, node, bm), "{node}/{bm}");
    }
    assert_eq!(d.q.ok("query-status", json!({}))["status"], "running");
}

/// The migration failed with an error naming the bitmap, the node and `reason`, and the
/// destination exited with status 1, as QEMU 7.2's does (`process_incoming_migration_co`).
fn assert_failed_cleanly(d: &Loaded, bitmap: &str, node: &str, reason: &str) {
    assert_eq!(d.exit, Some(1), "{}\n{}", d.status, d.p.log());
    let e = d.load_error();
    assert!(
        e.contains(&format!("'{bitmap}'"))
            && e.contains(&format!("'{node}'"))
            && e.contains(reason),
        "the error should name bitmap '{bitmap}', node '{node}' and say '{reason}': {e}"
    );
}

/// QEMU 7.2, as the destination of `stream` (with `disks`, and `prepare` before the
/// incoming migration), ends as `how`, its log saying `says`.
fn qemu_ends(
    dir: &Path,
    stream: &Path,
    disks: &[String],
    prepare: impl FnOnce(&mut QmpClient),
    how: Ended,
    says: &str,
) {
    let (ended, log) = qemu_outcome(dir, "qemu-dst", stream, disks, prepare);
    assert_eq!(ended, how, "{log}");
    assert!(log.contains(says), "{log}");
}

/// QEMU's stream of `bm0` (node0) and `bm1` (node1) with `bm0`'s START granularity patched to
/// each of `values`: livemig completes, `bm1` arrives, `bm0` is dropped with
/// `reason(value)` and not created. QEMU 7.2, given the stream patched to `qemu.0`, ends as
/// `qemu.1`, its log saying `qemu.2`.
fn patched_granularity(
    test: &str,
    values: &[u32],
    reason: impl Fn(u32) -> String,
    qemu: (u32, Ended, &str),
) {
    let Some(tmp) = setup(test) else {
        return;
    };
    let dir = tmp.path();
    let nodes = [("node0", MIB64), ("node1", MIB64)];
    let mut src = qemu_source(dir, &nodes, &[("node0", "bm0"), ("node1", "bm1")]);
    let capture = std::fs::read(src.capture(dir, "good.mig")).unwrap();
    let at = start_chunk_granularity(&capture, "node0", "bm0");
    assert_eq!(capture[at..at + 4], 65536u32.to_be_bytes());
    let (qemu_value, qemu_how, qemu_says) = qemu;
    let mut qemu_how = Some(qemu_how);
    for &value in values {
        let mut patched = capture.clone();
        patched[at..at + 4].copy_from_slice(&value.to_be_bytes());
        let path = dir.join(format!("gran-{value}.mig"));
        std::fs::write(&path, &patched).unwrap();
        let name = format!("dst-{value}");
        let mut d = run_into_livemig(dir, &name, &path, &disks(&nodes), |_| {});
        assert_completed_with(&mut src.q, &mut d, dir, &[("node1", "bm1")]);
        assert_dropped(&d.status, "bm0", "node0", &reason(value));
        assert_eq!(bitmap_names(&mut d.q, "node0"), Vec::<String>::new());
        quit_cleanly(d.p, d.q);

        if value == qemu_value {
            let how = qemu_how.take().expect("one QEMU run");
            qemu_ends(dir, &path, &disks(&nodes), |_| {}, how, qemu_says);
        }
    }
    assert!(qemu_how.is_none(), "{qemu_value} is not among {values:?}");
}

#[test]
fn qemu_seed_000_destination_node_smaller() {
    let Some(tmp) = setup("qemu_seed_000_destination_node_smaller") else {
        return;
    };
    let dir = tmp.path();
    let nodes = [("node0", MIB64), ("node1", MIB64)];
    let mut src = qemu_source(dir, &nodes, &[("node0", "bm0"), ("node1", "bm1")]);
    let capture = src.capture(dir, "seed000.mig");
    // Seed 000: the destination's node of the same name is 16 MiB.
    let dst_disks = disks(&[("node0", 16 << 20), ("node1", MIB64)]);
    let (s, mut d) = src.migrate_to_livemig(dir, &dst_disks, |_| {});
    assert_eq!(s["status"], "completed", "{s}");
    assert_completed_with(&mut src.q, &mut d, dir, &[("node1", "bm1")]);
    let w = assert_dropped(&d.status, "bm0", "node0", "only 16777216 bytes");
    assert_eq!(bitmap_names(&mut d.q, "node0"), Vec::<String>::new());
    // Not only in `x-livemig-warnings` (issue 14): an event, and a line of `info migrate`.
    let ev =
        d.q.wait_event(std::time::Duration::from_secs(30), |e| {
            e["event"] == "X_LIVEMIG_BITMAP_DROPPED"
        })
        .expect("no X_LIVEMIG_BITMAP_DROPPED event");
    assert_eq!(ev["data"]["node"], "node0", "{ev}");
    assert_eq!(ev["data"]["name"], "bm0", "{ev}");
    assert!(
        w.ends_with(ev["data"]["reason"].as_str().unwrap_or("?")),
        "{ev} / {w}"
    );
    let hmp = d.q.ok(
        "human-monitor-command",
        json!({"command-line": "info migrate"}),
    );
    assert!(
        hmp.as_str()
            .unwrap_or_default()
            .contains(&format!("warning: {w}\r\n")),
        "{hmp}"
    );
    quit_cleanly(d.p, d.q);

    // QEMU 7.2 as the destination of the same stream aborts:
    // "util/hbitmap.c:647: serialization_chunk: Assertion `(last >> hb->granularity) <
    // hb->size' failed." (QEMU issue #2650).
    qemu_ends(
        dir,
        &capture,
        &dst_disks,
        |_| {},
        Ended::Signal(SIGABRT),
        "serialization_chunk: Assertion",
    );
}

#[test]
fn qemu_source_size_not_a_multiple_of_64_granules() {
    let Some(tmp) = setup("qemu_source_size_not_a_multiple_of_64_granules") else {
        return;
    };
    let dir = tmp.path();
    // node0: 65 MiB (1040 granules of 64 KiB) into 128 MiB. node1: 64 MiB into 128 MiB (QEMU
    // accepts this one silently, and the bitmap ends up with a different sha256). node2
    // matches.
    let nodes = [("node0", 65 << 20), ("node1", MIB64), ("node2", MIB64)];
    let bms = [("node0", "bm0"), ("node1", "bm1"), ("node2", "bm2")];
    let mut src = qemu_source(dir, &nodes, &bms);
    let capture = src.capture(dir, "sizes.mig");
    let dst_disks = disks(&[("node0", 128 << 20), ("node1", 128 << 20), ("node2", MIB64)]);
    let (s, mut d) = src.migrate_to_livemig(dir, &dst_disks, |_| {});
    assert_eq!(s["status"], "completed", "{s}");
    assert_completed_with(&mut src.q, &mut d, dir, &[("node2", "bm2")]);
    assert_dropped(&d.status, "bm0", "node0", "differ in size");
    assert_dropped(&d.status, "bm1", "node1", "differ in size");
    quit_cleanly(d.p, d.q);

    // QEMU 7.2: "util/hbitmap.c:649: serialization_chunk: Assertion `(count & (gran - 1)) ==
    // 0' failed."
    qemu_ends(
        dir,
        &capture,
        &dst_disks,
        |_| {},
        Ended::Signal(SIGABRT),
        "(count & (gran - 1)) == 0",
    );
}

#[test]
fn qemu_bad_granularity_in_start() {
    // QEMU 7.2: "block/dirty-bitmap.c:105: bdrv_create_dirty_bitmap: Assertion
    // `is_power_of_2(granularity) && granularity >= BDRV_SECTOR_SIZE' failed."
    patched_granularity(
        "qemu_bad_granularity_in_start",
        &[65535, 256, 0],
        |bad| format!("granularity {bad}"),
        (65535, Ended::Signal(SIGABRT), "is_power_of_2(granularity)"),
    );
}

/// A START chunk that declares another power-of-two granularity than the bitmap whose bits
/// follow (issue 9, bug 2): 128 KiB declared for a 64 KiB bitmap read the 64 MiB node's 1024
/// granules as 512, and the destination had a bitmap with the wrong bits (its count
/// doubled). The BITS chunk's buffer does not fit the declared granularity, as QEMU 7.2
/// checks: the bitmap is dropped with QEMU's message, the others arrive. (A granularity
/// patch the buffer does fit is the migration crate's property test.)
#[test]
fn qemu_granularity_that_does_not_match_the_bits() {
    const SAYS: &str =
        "Migrated bitmap granularity doesn't match the destination bitmap 'bm0' granularity";
    // QEMU 7.2 reports the same words, drops every incoming bitmap (its "cancel"), and
    // carries on with the migration.
    patched_granularity(
        "qemu_granularity_that_does_not_match_the_bits",
        &[131072, 32768, 1 << 20],
        |_| SAYS.to_string(),
        (131072, Ended::Running, SAYS),
    );
}

#[test]
fn qemu_duplicate_bitmap_name_fails_cleanly() {
    let Some(tmp) = setup("qemu_duplicate_bitmap_name_fails_cleanly") else {
        return;
    };
    let dir = tmp.path();
    let nodes = [("node0", MIB64), ("node1", MIB64)];
    let mut src = qemu_source(dir, &nodes, &[("node0", "bm0"), ("node1", "bm1")]);
    let capture = src.capture(dir, "dup.mig");
    // The destination already has a bitmap named bm1 on node1; bm0 (sent first) is created
    // before bm1's START arrives, and must be removed again.
    let existing = |q: &mut QmpClient| {
        add_bitmap(q, "node1", "bm1", 4096);
        qemu_io(q, "node1", "write 8M 4k");
    };
    let (s, d) = src.migrate_to_livemig(dir, &disks(&nodes), existing);
    assert_eq!(
        s["status"], "failed",
        "QEMU source must see the failure: {s}"
    );
    assert_failed_cleanly(&d, "bm1", "node1", "already exists");

    // QEMU 7.2 fails and exits the same way: "Bitmap with the same name ('bm1')
    // already exists on destination", "load of migration failed: Invalid argument", status 1.
    qemu_ends(
        dir,
        &capture,
        &disks(&nodes),
        existing,
        Ended::Exit(1),
        "already exists on destination",
    );
}

#[test]
fn qemu_unknown_node_drops_only_that_bitmap() {
    let Some(tmp) = setup("qemu_unknown_node_drops_only_that_bitmap") else {
        return;
    };
    let dir = tmp.path();
    let nodes = [("node0", MIB64), ("nodeX", MIB64), ("node2", MIB64)];
    let bms = [("node0", "bm0"), ("nodeX", "bmX"), ("node2", "bm2")];
    let mut src = qemu_source(dir, &nodes, &bms);
    let capture = src.capture(dir, "unknown.mig");
    let dst_disks = disks(&[("node0", MIB64), ("node2", MIB64)]);
    let (s, mut d) = src.migrate_to_livemig(dir, &dst_disks, |_| {});
    assert_eq!(s["status"], "completed", "{s}");
    assert_completed_with(
        &mut src.q,
        &mut d,
        dir,
        &[("node0", "bm0"), ("node2", "bm2")],
    );
    assert_dropped(
        &d.status,
        "bmX",
        "nodeX",
        "Cannot find device='nodeX' nor node-name='nodeX'",
    );
    assert_eq!(warnings(&d.status).len(), 1, "{}", d.status);
    quit_cleanly(d.p, d.q);

    // QEMU 7.2 completes the migration, but its "cancel" drops every incoming bitmap, those
    // of the nodes it has (bm0, bm2) included.
    let (qp, mut q) = qemu_incoming(dir, "qemu-dst", &capture, &dst_disks, |_| {});
    let st = wait(&mut q, &["completed", "failed"]);
    assert_eq!(st["status"], "completed", "{st}");
    assert!(
        qp.log()
            .contains("Cannot find device='nodeX' nor node-name='nodeX'"),
        "{}",
        qp.log()
    );
    assert!(bitmaps(&mut q).values().all(|m| m.is_empty()));
}

#[test]
fn qemu_reserved_start_flags_fail_cleanly() {
    let Some(tmp) = setup("qemu_reserved_start_flags_fail_cleanly") else {
        return;
    };
    let dir = tmp.path();
    let nodes = [("node0", MIB64), ("node1", MIB64)];
    let mut src = qemu_source(dir, &nodes, &[("node0", "bm0"), ("node1", "bm1")]);
    let mut stream = std::fs::read(src.capture(dir, "good.mig")).unwrap();
    // bm1's START flags: ENABLED, plus reserved bit 0x08. bm0's START comes first, so bm0
    // has been created when the bad chunk arrives.
    let at = start_chunk_granularity(&stream, "node1", "bm1") + 4;
    assert_eq!(stream[at], 0x01);
    stream[at] |= 0x08;
    let path = dir.join("reserved.mig");
    std::fs::write(&path, &stream).unwrap();
    let d = run_into_livemig(dir, "dst", &path, &disks(&nodes), |_| {});
    assert_failed_cleanly(
        &d,
        "bm1",
        "node1",
        "Unknown flags in migrated dirty bitmap header: 9",
    );

    // QEMU 7.2: "Unknown flags in migrated dirty bitmap header: 9", "error while loading
    // state for instance 0x0 of device 'dirty-bitmap'", exit status 1.
    qemu_ends(
        dir,
        &path,
        &disks(&nodes),
        |_| {},
        Ended::Exit(1),
        "Unknown flags in migrated dirty bitmap header: 9",
    );
}

/// A generated stream with three bitmaps: `bm-beyond` on node0 sends one BITS chunk past the
/// node's end, `bm-misaligned` on node1 a chunk starting off a 64-granule boundary, and
/// `bm-good` on node2 is correct (granules 0, 100 and 1023 set).
fn out_of_range_stream(dir: &Path) -> std::path::PathBuf {
    let g = 65536;
    let mut spec = StreamSpec {
        pages: marker_pages(),
        ..Default::default()
    };
    for (node, bm) in [
        ("node0", "bm-beyond"),
        ("node1", "bm-misaligned"),
        ("node2", "bm-good"),
    ] {
        spec.setup.push(start(node, bm, g, 0));
    }
    spec.complete
        .extend(bits_for("node0", "bm-beyond", MIB64, g, &[3]));
    // 64 MiB is 131072 sectors: this chunk covers the next 64 granules.
    spec.complete.push(bits(
        "node0",
        "bm-beyond",
        131072,
        64 * 128,
        BitsData::Buffer(vec![0xff; 32]),
    ));
    // One granule (128 sectors) in: not on a 64-granule boundary.
    spec.complete.push(bits(
        "node1",
        "bm-misaligned",
        128,
        64 * 128,
        BitsData::Buffer(vec![0xff; 32]),
    ));
    spec.complete
        .extend(bits_for("node2", "bm-good", MIB64, g, &[0, 100, 1023]));
    for (node, bm) in [
        ("node0", "bm-beyond"),
        ("node1", "bm-misaligned"),
        ("node2", "bm-good"),
    ] {
        spec.complete.push(complete(node, bm));
    }
    write_stream(&dir.join("out-of-range.mig"), &spec)
}

#[test]
fn qemu_bits_outside_the_node_drop_the_bitmap() {
    let Some(tmp) = setup("qemu_bits_outside_the_node_drop_the_bitmap") else {
        return;
    };
    let dir = tmp.path();
    let stream = out_of_range_stream(dir);
    let nodes = disks(&[("node0", MIB64), ("node1", MIB64), ("node2", MIB64)]);
    let mut d = run_into_livemig(dir, "dst", &stream, &nodes, |_| {});
    assert_eq!(d.status["status"], "completed", "{}", d.status);
    assert_ram_holds(&ram(&mut d.q, dir, "dst"), &marker_pages());
    assert_dropped(&d.status, "bm-beyond", "node0", "only 67108864 bytes");
    assert_dropped(&d.status, "bm-misaligned", "node1", "not aligned");
    let b = bitmaps(&mut d.q);
    assert!(b["node0"].is_empty() && b["node1"].is_empty(), "{b:?}");
    let good = &b["node2"]["bm-good"];
    assert_eq!(good["count"], 3 * 65536, "{good}");
    assert_eq!(good["recording"], false, "{good}");
    quit_cleanly(d.p, d.q);

    // QEMU 7.2 aborts on the chunk past the end: "serialization_chunk: Assertion `(last >>
    // hb->granularity) < hb->size' failed."
    qemu_ends(
        dir,
        &stream,
        &nodes,
        |_| {},
        Ended::Signal(SIGABRT),
        "serialization_chunk: Assertion",
    );
}

#[test]
fn qemu_oversized_buffer_fails_cleanly() {
    let Some(tmp) = setup("qemu_oversized_buffer_fails_cleanly") else {
        return;
    };
    let dir = tmp.path();
    let g = 65536;
    let mut spec = StreamSpec {
        pages: marker_pages(),
        ..Default::default()
    };
    spec.setup.push(start("node0", "bm-ok", g, 1));
    spec.setup.push(start("node1", "bm-big", g, 1));
    spec.complete
        .extend(bits_for("node0", "bm-ok", MIB64, g, &[1]));
    // 16 KiB where QEMU accepts at most 10 KiB.
    spec.complete.push(bits(
        "node1",
        "bm-big",
        0,
        131072,
        BitsData::Buffer(vec![0; 16 << 10]),
    ));
    let stream = write_stream(&dir.join("big.mig"), &spec);
    let nodes = disks(&[("node0", MIB64), ("node1", MIB64)]);
    let d = run_into_livemig(dir, "dst", &stream, &nodes, |_| {});
    assert_failed_cleanly(&d, "bm-big", "node1", "too large");

    // QEMU 7.2: "Bitmap migration stream buffer allocation request is too large", exit 1.
    qemu_ends(
        dir,
        &stream,
        &nodes,
        |_| {},
        Ended::Exit(1),
        "buffer allocation request is too large",
    );
}
