//! `block-bitmap-mapping` with QEMU 7.2 on either side: aliases for node and bitmap names, the
//! `transform.persistent` flag, QEMU's validation messages, and what a destination does with
//! aliases its mapping does not know.

mod qemu_common;

use qemu_common::*;
use serde_json::{json, Value};
use std::path::Path;
use testkit::{QmpClient, VmProcess};

/// Sets `mapping` on both ends and asserts they reply the same way.
fn same_reply(qemu: &mut QmpClient, lm: &mut QmpClient, args: Value) -> Value {
    let a = qemu
        .execute("migrate-set-parameters", args.clone())
        .expect("QEMU reply");
    let b = lm
        .execute("migrate-set-parameters", args.clone())
        .expect("livemig reply");
    assert_eq!(
        a, b,
        "migrate-set-parameters {args}: QEMU and livemig differ"
    );
    a
}

fn mapping(m: Value) -> Value {
    json!({ "block-bitmap-mapping": m })
}

#[test]
fn qemu_mapping_validation_matches_qemu() {
    let Some(tmp) = setup("qemu_mapping_validation_matches_qemu") else {
        return;
    };
    let dir = tmp.path();
    let qp = qemu(dir, "q", &[]);
    let lp = livemig(dir, "l", &[]);
    let (mut q, mut l) = (qp.qmp(), lp.qmp());
    let long = |c: char, n: usize| std::iter::repeat_n(c, n).collect::<String>();
    let node = |name: &str, alias: &str, bitmaps: Value| json!({"node-name": name, "alias": alias, "bitmaps": bitmaps});
    let bad = [
        // Each of QEMU's checks (dirty-bitmaps.md §4.7) ...
        json!([node("n0", "1x", json!([]))]),
        json!([node("n0", "", json!([]))]),
        json!([node("n0", "a b", json!([]))]),
        json!([node("n0", &format!("a{}", long('x', 255)), json!([]))]),
        json!([node(&long('n', 32), "a", json!([]))]),
        json!([node("n0", "a", json!([])), node("n0", "b", json!([]))]),
        json!([node("n0", "a", json!([])), node("n1", "a", json!([]))]),
        json!([node(
            "n0",
            "a",
            json!([{"name": "b0", "alias": long('x', 256)}])
        )]),
        json!([node(
            "n0",
            "a",
            json!([{"name": long('b', 1024), "alias": "x"}])
        )]),
        json!([node(
            "n0",
            "a",
            json!([{"name": "b0", "alias": "x"}, {"name": "b0", "alias": "y"}])
        )]),
        json!([node(
            "n0",
            "a",
            json!([{"name": "b0", "alias": "x"}, {"name": "b1", "alias": "x"}])
        )]),
        // ... and the schema's.
        json!([{"node-name": "n0", "alias": "a"}]),
        json!([{"node-name": "n0", "bitmaps": []}]),
        json!([node("n0", "a", json!([{"name": "b0"}]))]),
        json!([node(
            "n0",
            "a",
            json!([{"name": "b0", "alias": "x", "transform": {"persistent": "yes"}}])
        )]),
        json!([node(
            "n0",
            "a",
            json!([{"name": "b0", "alias": "x", "transform": {"foo": true}}])
        )]),
        json!([{"node-name": "n0", "alias": "a", "bitmaps": [], "extra": 1}]),
        json!({"node-name": "n0"}),
        json!("n0"),
        json!([1]),
        json!([{"node-name": 5, "alias": "a", "bitmaps": []}]),
        json!([node("n0", "a", json!({}))]),
    ];
    for m in bad {
        // With a valid parameter alongside: a refused call must change nothing.
        let mut args = mapping(m);
        args["max-bandwidth"] = json!(12345);
        let r = same_reply(&mut q, &mut l, args.clone());
        assert!(r.get("error").is_some(), "{args} was accepted: {r}");
    }
    let params = |c: &mut QmpClient| c.ok("query-migrate-parameters", json!({}));
    assert_ne!(params(&mut q)["max-bandwidth"], 12345);
    assert_ne!(params(&mut l)["max-bandwidth"], 12345);
    assert!(params(&mut q).get("block-bitmap-mapping").is_none());
    assert!(params(&mut l).get("block-bitmap-mapping").is_none());

    // Accepted, and shown back the same way: odd but well-formed names, bitmap aliases that
    // are not identifiers, nodes that do not exist, the same bitmap alias on two nodes,
    // transforms, and the empty list.
    let good = [
        json!([node(
            "n0",
            "a-._9",
            json!([{"name": "b0", "alias": "1 2 3"}])
        )]),
        json!([
            node(
                "n0",
                "a",
                json!([{"name": "b0", "alias": "x", "transform": {"persistent": true}}])
            ),
            node(
                "n1",
                "b",
                json!([{"name": "b0", "alias": "x", "transform": {}}])
            ),
        ]),
        json!([]),
    ];
    for m in good {
        let r = same_reply(&mut q, &mut l, mapping(m.clone()));
        assert_eq!(r, json!({"return": {}}), "{m}");
        let (a, b) = (params(&mut q), params(&mut l));
        assert_eq!(a["block-bitmap-mapping"], b["block-bitmap-mapping"], "{m}");
        assert!(b["block-bitmap-mapping"].is_array(), "{b}");
    }
}

/// Two aliases maps: the source's (`node0` → `disk-a`, `bm0` → `bits-a` with `persistent`
/// forced on) and the destination's (`disk-a` → `vdb`, `bits-a` → `bm-copy`).
fn src_map() -> Value {
    json!([{"node-name": "node0", "alias": "disk-a", "bitmaps": [
        {"name": "bm0", "alias": "bits-a", "transform": {"persistent": true}}
    ]}])
}

fn dst_map() -> Value {
    json!([{"node-name": "vdb", "alias": "disk-a", "bitmaps": [
        {"name": "bm-copy", "alias": "bits-a"}
    ]}])
}

/// Source disks: the mapped node0 and node1, whose bitmap is not mapped.
fn src_disks() -> Vec<String> {
    let mut v = null_co("node0", MIB64);
    v.extend(null_co("node1", MIB64));
    v
}

/// Destination disks: a 16 MiB `node0` that must not receive anything (the seed-000 trap) and
/// `vdb`, where the mapping sends the bitmap.
fn dst_disks() -> Vec<String> {
    let mut v = null_co("node0", 16 << 20);
    v.extend(null_co("vdb", MIB64));
    v
}

fn dirty_source(q: &mut QmpClient) {
    add_bitmap(q, "node0", "bm0", 65536);
    add_bitmap(q, "node1", "bm-unmapped", 65536);
    for w in ["write 0 64k", "write 1M 64k", "write 63M 4k"] {
        qemu_io(q, "node0", w);
    }
    qemu_io(q, "node1", "write 0 1M");
}

/// The destination got `bm-copy` on `vdb` with the source's contents, persistent by the
/// source's transform, and nothing else.
fn check_mapped(src: &mut QmpClient, dst: &mut QmpClient) {
    assert_eq!(sha(src, "node0", "bm0"), sha(dst, "vdb", "bm-copy"));
    let b = bitmaps(dst);
    assert_eq!(b["vdb"].keys().collect::<Vec<_>>(), ["bm-copy"], "{b:?}");
    assert_eq!(b["vdb"]["bm-copy"]["persistent"], true, "{b:?}");
    assert_eq!(b["vdb"]["bm-copy"]["recording"], true, "{b:?}");
    assert!(b["node0"].is_empty(), "{b:?}");
    assert!(!b.values().any(|m| m.contains_key("bm-unmapped")), "{b:?}");
}

fn marker_ram(dir: &Path) -> (Loaded, Vec<(u64, Vec<u8>)>) {
    // A livemig source with RAM worth migrating: it loads a generated stream first.
    let pages = marker_pages();
    let stream = write_stream(
        &dir.join("ram.mig"),
        &StreamSpec {
            pages: pages.clone(),
            ..Default::default()
        },
    );
    let l = run_into_livemig(dir, "lsrc", &stream, &src_disks(), |_| {});
    assert_eq!(l.status["status"], "completed", "{}", l.status);
    (l, pages)
}

/// A mapped migration: the source's and the destination's `block-bitmap-mapping`, the
/// destination's disks, and what makes the source's bitmaps.
struct Mapped {
    src_map: Value,
    dst_map: Value,
    dst_disks: Vec<String>,
    bitmaps: fn(&mut QmpClient),
}

/// The source `s` gets `m`'s bitmaps and source mapping; a destination started by `start`
/// (QEMU or livemig) on `m`'s disks, listening on `transport`, gets the destination mapping;
/// then `s` migrates to it (capability `return-path` on both ends when asked). Returns the
/// destination and both `query-migrate` replies.
fn migrate_mapped(
    dir: &Path,
    s: &mut QmpClient,
    m: Mapped,
    transport: Transport,
    return_path: bool,
    start: fn(&Path, &str, &[String]) -> VmProcess,
) -> (VmProcess, QmpClient, Value, Value) {
    (m.bitmaps)(s);
    caps(s, return_path);
    s.ok("migrate-set-parameters", mapping(m.src_map));
    let uri = transport.uri(dir, "mig");
    let mut args = m.dst_disks;
    args.extend(strings(&["-incoming", &uri]));
    let dp = start(dir, "dst", &args);
    let mut d = dp.qmp();
    caps(&mut d, return_path);
    d.ok("migrate-set-parameters", mapping(m.dst_map));
    let (ss, ds) = migrate(s, &mut d, &uri);
    (dp, d, ss, ds)
}

/// The mapping of [`src_map`] and [`dst_map`] over [`dirty_source`]'s bitmaps.
fn one_mapped() -> Mapped {
    Mapped {
        src_map: src_map(),
        dst_map: dst_map(),
        dst_disks: dst_disks(),
        bitmaps: dirty_source,
    }
}

#[test]
fn qemu_mapping_qemu_to_livemig() {
    let Some(tmp) = setup("qemu_mapping_qemu_to_livemig") else {
        return;
    };
    let dir = tmp.path();
    let pat = dir.join("pat.bin");
    pattern_file(&pat, 64 << 10, 3);
    let mut args = src_disks();
    args.extend(loader(&pat, 0));
    let sp = qemu(dir, "src", &args);
    let mut s = sp.qmp();
    let (dp, mut d, ss, ds) =
        migrate_mapped(dir, &mut s, one_mapped(), Transport::Unix, true, livemig);
    assert_eq!(ss["status"], "completed", "{ss}");
    assert_eq!(ds["status"], "completed", "{ds}");
    assert!(warnings(&ds).is_empty(), "{ds}");
    check_mapped(&mut s, &mut d);
    assert_same_ram(&ram(&mut s, dir, "s"), &ram(&mut d, dir, "d"), "RAM");
    quit_cleanly(dp, d);
}

#[test]
fn qemu_mapping_livemig_to_qemu() {
    let Some(tmp) = setup("qemu_mapping_livemig_to_qemu") else {
        return;
    };
    let dir = tmp.path();
    let (src, pages) = marker_ram(dir);
    let mut s = src.q;
    let (dp, mut d, ss, ds) = migrate_mapped(dir, &mut s, one_mapped(), Transport::Tcp, true, qemu);
    assert_eq!(ss["status"], "completed", "{ss}");
    assert_eq!(ds["status"], "completed", "{ds}\n{}", dp.log());
    check_mapped(&mut s, &mut d);
    let r = ram(&mut d, dir, "d");
    assert_ram_holds(&r, &pages);
    assert_same_ram(&ram(&mut s, dir, "s"), &r, "RAM");
}

/// The source maps three bitmaps; the destination's mapping knows `disk-a` but not the alias
/// of its bitmap `bm0`, does not know `disk-b` at all, and maps `disk-c`/`bits-c` correctly.
fn three_node_maps() -> (Value, Value, Vec<String>) {
    let src = json!([
        {"node-name": "node0", "alias": "disk-a", "bitmaps": [{"name": "bm0", "alias": "bits-a"}]},
        {"node-name": "node1", "alias": "disk-b", "bitmaps": [{"name": "bm1", "alias": "bits-b"}]},
        {"node-name": "node2", "alias": "disk-c", "bitmaps": [{"name": "bm2", "alias": "bits-c"}]},
    ]);
    let dst = json!([
        {"node-name": "node0", "alias": "disk-a", "bitmaps": [{"name": "bm0", "alias": "other"}]},
        {"node-name": "node2", "alias": "disk-c", "bitmaps": [{"name": "bm2", "alias": "bits-c"}]},
    ]);
    let mut disks = null_co("node0", MIB64);
    disks.extend(null_co("node1", MIB64));
    disks.extend(null_co("node2", MIB64));
    (src, dst, disks)
}

fn three_bitmaps(q: &mut QmpClient) {
    for (i, node) in ["node0", "node1", "node2"].iter().enumerate() {
        add_bitmap(q, node, &format!("bm{i}"), 65536);
        qemu_io(q, node, &format!("write {}M 64k", i + 1));
    }
}

/// The mapping of [`three_node_maps`] over [`three_bitmaps`].
fn three_mapped() -> Mapped {
    let (src_map, dst_map, dst_disks) = three_node_maps();
    Mapped {
        src_map,
        dst_map,
        dst_disks,
        bitmaps: three_bitmaps,
    }
}

#[test]
fn qemu_mapping_unknown_aliases_qemu_to_livemig() {
    let Some(tmp) = setup("qemu_mapping_unknown_aliases_qemu_to_livemig") else {
        return;
    };
    let dir = tmp.path();
    let pat = dir.join("pat.bin");
    pattern_file(&pat, 128 << 10, 9);
    let mut args = three_node_maps().2;
    args.extend(loader(&pat, 4 << 20));
    let sp = qemu(dir, "src", &args);
    let mut s = sp.qmp();
    let (dp, mut d, ss, ds) =
        migrate_mapped(dir, &mut s, three_mapped(), Transport::Unix, false, livemig);
    assert_eq!(ss["status"], "completed", "{ss}");
    // RAM completes; the two bitmaps with unknown aliases are dropped, with the reason; the
    // third arrives. (QEMU as destination drops all three: its "cancel" ends the whole
    // incoming bitmap migration — see the next test.)
    assert_eq!(ds["status"], "completed", "{ds}");
    assert_same_ram(&ram(&mut s, dir, "s"), &ram(&mut d, dir, "d"), "RAM");
    assert_dropped(&ds, "bits-a", "disk-a", "Unknown bitmap alias");
    assert_dropped(&ds, "bits-b", "disk-b", "Unknown node alias");
    assert_eq!(warnings(&ds).len(), 2, "{ds}");
    let b = bitmaps(&mut d);
    assert!(b["node0"].is_empty() && b["node1"].is_empty(), "{b:?}");
    assert_eq!(sha(&mut s, "node2", "bm2"), sha(&mut d, "node2", "bm2"));
    quit_cleanly(dp, d);
}

#[test]
fn qemu_mapping_unknown_aliases_livemig_to_qemu() {
    let Some(tmp) = setup("qemu_mapping_unknown_aliases_livemig_to_qemu") else {
        return;
    };
    let dir = tmp.path();
    let disks = three_node_maps().2;
    let pages = marker_pages();
    let stream = write_stream(
        &dir.join("ram.mig"),
        &StreamSpec {
            pages: pages.clone(),
            ..Default::default()
        },
    );
    let src = run_into_livemig(dir, "src", &stream, &disks, |_| {});
    let mut s = src.q;
    let (dp, mut d, ss, ds) =
        migrate_mapped(dir, &mut s, three_mapped(), Transport::Tcp, true, qemu);
    // QEMU 7.2 reports "Unknown bitmap alias 'bits-a' on node 'node0' (alias 'disk-a')",
    // cancels the incoming bitmap migration (every bitmap, the well-mapped bm2 included) and
    // completes the migration.
    assert_eq!(ss["status"], "completed", "{ss}");
    assert_eq!(ds["status"], "completed", "{ds}");
    assert!(
        dp.log().contains("Unknown bitmap alias 'bits-a'"),
        "{}",
        dp.log()
    );
    let b = bitmaps(&mut d);
    assert!(b.values().all(|m| m.is_empty()), "{b:?}");
    assert_ram_holds(&ram(&mut d, dir, "d"), &pages);
}
