//! The block layer as a monitor client and a guest see it: `blockdev-add` / `blockdev-del`
//! replies, bitmap command replies (QEMU 7.2's texts), query shapes, the data path through raw
//! and file nodes, the persistent-bitmap seam, and concurrent writers.

use block::driver::{BlockDriver, FilenameInfo, LoadedBitmap, PersistentBitmapStore, StoredBitmap};
use block::{BlockError, BlockLayer, MergeSource, NodeFlags};
use hbitmap::HBitmap;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Runs a block command as the monitor does; `None` for a command the block layer lacks.
fn dispatch(l: &BlockLayer, cmd: &str, args: &Value) -> Option<Result<Value, qmp::QmpError>> {
    let args = qmp::Args::new(args.as_object().cloned().unwrap_or_default());
    block::qmp::COMMANDS
        .contains(&cmd)
        .then(|| block::qmp::run(l, cmd, args))
}

fn ok(l: &BlockLayer, cmd: &str, args: Value) -> Value {
    match dispatch(l, cmd, &args) {
        Some(Ok(v)) => v,
        other => panic!("{cmd} {args}: {other:?}"),
    }
}

fn err(l: &BlockLayer, cmd: &str, args: Value) -> String {
    match dispatch(l, cmd, &args) {
        Some(Err(e)) => e.to_string(),
        other => panic!("{cmd} {args} was expected to fail: {other:?}"),
    }
}

fn null_layer() -> BlockLayer {
    let l = BlockLayer::new();
    ok(
        &l,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "node0", "size": 1000000}),
    );
    ok(
        &l,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n2", "size": 2000000}),
    );
    l
}

fn bitmaps_of(l: &BlockLayer, node: &str) -> Vec<Value> {
    let nodes = l.query_named_block_nodes(false);
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n.get("dirty-bitmaps"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// A sparse 1 MiB file `name` in `dir`.
fn raw_image(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    img
}

#[test]
fn blockdev_add_errors_are_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "img.raw");
    let img = img.to_str().unwrap();
    let l = null_layer();
    let cases = [
        (json!({"driver": "null-co", "node-name": "node0"}), "Duplicate nodes with node-name='node0'"),
        (json!({"driver": "raw", "node-name": "r0", "file": "nope"}), "Cannot find device='nope' nor node-name='nope'"),
        (json!({"driver": "null-co", "node-name": "1abc"}), "Invalid node-name: '1abc'"),
        (json!({"driver": "null-co", "node-name": "a b"}), "Invalid node-name: 'a b'"),
        (json!({"driver": "null-co", "node-name": ""}), "Invalid node-name: ''"),
        (json!({"driver": "null-co", "node-name": "abcdefghijabcdefghijabcdefghij12"}), "Node name too long"),
        (json!({"driver": "null-co"}), "'node-name' must be specified for the root node"),
        (json!({"driver": "nulx", "node-name": "q"}), "Parameter 'driver' does not accept value 'nulx'"),
        (json!({"node-name": "q"}), "Parameter 'driver' is missing"),
        (json!({"driver": "null-co", "node-name": "q", "size": "12"}), "Invalid parameter type for 'size', expected: integer"),
        (json!({"driver": "null-co", "node-name": "q", "bogus": 1}), "Parameter 'bogus' is unexpected"),
        (json!({"driver": "raw", "node-name": "q2"}), "Parameter 'file' is missing"),
        (json!({"driver": "raw", "node-name": "q3", "file": {"driver": "file", "filename": "/nonexistent/x"}}),
            "Could not open '/nonexistent/x': No such file or directory"),
        (json!({"driver": "raw", "node-name": "q8", "size": 1048577, "file": {"driver": "file", "filename": img}}),
            "The sum of offset (0) and size (1048577) has to be smaller or equal to the  actual size of the containing file (1048576)"),
        (json!({"driver": "raw", "node-name": "r6", "file": "node0", "size": 1000}), "Specified size is not multiple of 512"),
        (json!({"driver": "raw", "node-name": "r7", "file": "node0", "offset": 2000000}),
            "Offset (2000000) cannot be greater than size of the containing file (1000448)"),
        (json!({"driver": "raw", "node-name": "r3", "file": {"driver": "file", "filename": img, "node-name": "r3"}}),
            "Duplicate nodes with node-name='r3'"),
        (json!({"driver": "null-co", "node-name": "n8", "size": -5}), "Parameter 'size' expects a non-negative number below 2^64"),
    ];
    for (args, want) in cases {
        assert_eq!(err(&l, "blockdev-add", args.clone()), want, "{args}");
    }
    // Nothing half-made stayed behind.
    let names: Vec<String> = l.nodes().iter().map(|n| n.name().to_string()).collect();
    assert_eq!(names, ["node0", "n2"]);
    // The longest valid name.
    ok(
        &l,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "abcdefghijabcdefghijabcdefghij1"}),
    );
}

#[test]
fn blockdev_del_refusals_and_implicit_children() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "img.raw");
    let l = null_layer();
    ok(
        &l,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r1",
        "file": {"driver": "file", "filename": img, "node-name": "f1"}}),
    );
    ok(
        &l,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r2", "file": "r1"}),
    );
    ok(
        &l,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r9", "file": {"driver": "file", "filename": img}}),
    );
    assert_eq!(
        err(&l, "blockdev-del", json!({"node-name": "nope"})),
        "Failed to find node with node-name='nope'"
    );
    assert_eq!(
        err(&l, "blockdev-del", json!({"node-name": "r1"})),
        "Block device r1 is in use"
    );
    assert_eq!(
        err(&l, "blockdev-del", json!({"node-name": "f1"})),
        "Node f1 is not owned by the monitor"
    );
    l.attach_device("node0", "", "/machine/peripheral/vd0/virtio-backend")
        .unwrap();
    assert_eq!(
        err(&l, "blockdev-del", json!({"node-name": "node0"})),
        "Node node0 is in use"
    );
    // The generated name of r9's child starts with '#'.
    let auto = l
        .nodes()
        .iter()
        .find(|n| n.auto_named())
        .map(|n| n.name().to_string())
        .unwrap();
    assert!(auto.starts_with("#block"), "{auto}");
    ok(&l, "blockdev-del", json!({"node-name": "r9"}));
    assert!(
        l.node(&auto).is_none(),
        "implicit child goes with its parent"
    );
    ok(&l, "blockdev-del", json!({"node-name": "r2"}));
    ok(&l, "blockdev-del", json!({"node-name": "r1"}));
    assert!(l.node("f1").is_none());
    assert!(l.detach_device("/machine/peripheral/vd0/virtio-backend"));
    ok(&l, "blockdev-del", json!({"node-name": "node0"}));
    // A node carrying a busy bitmap (a migration holds it) is in use.
    let n2 = l.node("n2").unwrap();
    let id = n2.create_bitmap(65536, Some("m")).unwrap();
    n2.bitmaps().get_mut(id).unwrap().set_busy(true);
    assert_eq!(
        err(&l, "blockdev-del", json!({"node-name": "n2"})),
        "Block device n2 is in use"
    );
}

#[test]
fn keyval_and_json_blockdev_arguments_open_the_same_node() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a,b.raw");
    std::fs::write(&img, vec![0x5a; 4096]).unwrap();
    let l = BlockLayer::new();
    let arg = format!(
        "driver=raw,node-name=d0,read-only=on,file.driver=file,file.filename={}",
        img.to_str().unwrap().replace(',', ",,")
    );
    let v = block::parse_blockdev_keyval(&arg).unwrap();
    l.blockdev_add(&v).unwrap();
    let j = block::parse_blockdev_keyval(
        r#"{"driver": "null-co", "node-name": "n1", "size": 8192, "read-zeroes": true}"#,
    )
    .unwrap();
    l.blockdev_add(&j).unwrap();
    let d0 = l.node("d0").unwrap();
    assert!(d0.read_only());
    assert!(
        d0.driver().children()[0].1.read_only(),
        "the inline child inherits read-only"
    );
    let mut buf = [0u8; 4];
    d0.read_at(100, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 4]);
    assert_eq!(l.node("n1").unwrap().size().unwrap(), 8192);
}

#[test]
fn bitmap_command_errors_are_qemus() {
    let l = null_layer();
    ok(
        &l,
        "block-dirty-bitmap-add",
        json!({"node": "node0", "name": "b0", "granularity": 65536}),
    );
    let add = |args: Value| err(&l, "block-dirty-bitmap-add", args);
    assert_eq!(
        add(json!({"node": "node0", "name": "b0"})),
        "Bitmap already exists: b0"
    );
    assert_eq!(
        add(json!({"node": "node0", "name": ""})),
        "Bitmap name cannot be empty"
    );
    assert_eq!(
        add(json!({"node": "zz", "name": "x"})),
        "Cannot find device='zz' nor node-name='zz'"
    );
    for g in [0, 256, 1000, 3000] {
        assert_eq!(
            add(json!({"node": "node0", "name": "x", "granularity": g})),
            "Granularity must be power of 2 and at least 512"
        );
    }
    assert_eq!(
        add(json!({"node": "node0", "name": "x", "granularity": -1})),
        "Parameter 'granularity' expects uint32_t"
    );
    assert_eq!(
        add(json!({"node": "node0", "name": "x", "granularity": 4294967296u64})),
        "Parameter 'granularity' expects uint32_t"
    );
    assert_eq!(
        add(json!({"node": "node0", "name": "x", "granularity": "4096"})),
        "Parameter 'granularity' expects uint64"
    );
    assert_eq!(
        add(json!({"node": "node0", "name": "x", "persistent": true})),
        "Can't store persistent bitmaps to node0: Operation not supported"
    );
    assert_eq!(add(json!({"node": "node0"})), "Parameter 'name' is missing");
    assert_eq!(add(json!({"name": "q"})), "Parameter 'node' is missing");
    assert_eq!(
        add(json!({"node": "node0", "name": "q", "extra": 1})),
        "Parameter 'extra' is unexpected"
    );
    let long = "x".repeat(1024);
    assert_eq!(
        add(json!({"node": "node0", "name": long})),
        format!("Bitmap name too long: {long}")
    );
    ok(
        &l,
        "block-dirty-bitmap-add",
        json!({"node": "node0", "name": "g31", "granularity": 2147483648u64}),
    );

    assert_eq!(
        err(
            &l,
            "block-dirty-bitmap-remove",
            json!({"node": "node0", "name": "nope"})
        ),
        "Dirty bitmap 'nope' not found"
    );
    assert_eq!(
        err(
            &l,
            "block-dirty-bitmap-remove",
            json!({"node": "zz", "name": "nope"})
        ),
        "Node 'zz' not found"
    );
    let merge = |bitmaps: Value| {
        err(
            &l,
            "block-dirty-bitmap-merge",
            json!({"node": "node0", "target": "b0", "bitmaps": bitmaps}),
        )
    };
    assert_eq!(merge(json!(["nope"])), "Dirty bitmap 'nope' not found");
    assert_eq!(
        merge(json!([{"node": "zz", "name": "b1"}])),
        "Node 'zz' not found"
    );
    assert_eq!(
        merge(json!([{"node": "n2", "name": "c"}])),
        "Dirty bitmap 'c' not found"
    );
    assert_eq!(
        merge(json!([{"node": "n2"}])),
        "Parameter 'bitmaps[0].name' is missing"
    );
    assert_eq!(
        merge(json!(["b0", 5])),
        "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"
    );
    ok(
        &l,
        "block-dirty-bitmap-add",
        json!({"node": "n2", "name": "c"}),
    );
    assert_eq!(
        merge(json!([{"node": "n2", "name": "c"}])),
        "Bitmaps are of different sizes (destination size is 1000448, source size is 2000384) and can't be merged"
    );
    assert_eq!(
        err(
            &l,
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "node0"})
        ),
        "Parameter 'name' is missing"
    );
}

#[test]
fn busy_readonly_and_inconsistent_states() {
    let l = null_layer();
    ok(
        &l,
        "block-dirty-bitmap-add",
        json!({"node": "node0", "name": "b0"}),
    );
    ok(
        &l,
        "block-dirty-bitmap-add",
        json!({"node": "node0", "name": "b1"}),
    );
    let node = l.node("node0").unwrap();
    node.bitmaps().find_mut("b0").unwrap().set_busy(true);
    let busy = "Bitmap 'b0' is currently in use by another operation and cannot be used";
    let nb = json!({"node": "node0", "name": "b0"});
    for cmd in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        assert_eq!(err(&l, cmd, nb.clone()), busy, "{cmd}");
    }
    assert_eq!(
        err(
            &l,
            "block-dirty-bitmap-merge",
            json!({"node": "node0", "target": "b0", "bitmaps": ["b1"]})
        ),
        busy
    );
    assert_eq!(
        err(
            &l,
            "block-dirty-bitmap-merge",
            json!({"node": "node0", "target": "b1", "bitmaps": ["b0"]})
        ),
        busy
    );
    // sha256 makes no state check.
    ok(&l, "x-debug-block-dirty-bitmap-sha256", nb.clone());
    assert_eq!(bitmaps_of(&l, "node0")[1]["busy"], json!(true));
    node.bitmaps().find_mut("b0").unwrap().set_busy(false);

    // Readonly: enable/disable allowed, clear/remove refused, and writes to the node refused.
    node.bitmaps().find_mut("b1").unwrap().set_readonly(true);
    let nb1 = json!({"node": "node0", "name": "b1"});
    ok(&l, "block-dirty-bitmap-disable", nb1.clone());
    ok(&l, "block-dirty-bitmap-enable", nb1.clone());
    let ro = "Bitmap 'b1' is readonly and cannot be modified";
    assert_eq!(err(&l, "block-dirty-bitmap-clear", nb1.clone()), ro);
    assert_eq!(err(&l, "block-dirty-bitmap-remove", nb1.clone()), ro);
    assert_eq!(
        block::qemu_io::run(&l, "node0", "write 0 512")
            .unwrap()
            .text(),
        "write failed: Operation not permitted\n"
    );
    node.bitmaps().find_mut("b1").unwrap().set_readonly(false);

    // Inconsistent: everything refused but removal; recording false, flag shown.
    {
        let mut bm = node.bitmaps();
        let b = bm.find_mut("b1").unwrap();
        b.set_persistent(true);
        b.set_inconsistent().unwrap();
    }
    let inc = "Bitmap 'b1' is inconsistent and cannot be used";
    assert_eq!(err(&l, "block-dirty-bitmap-clear", nb1.clone()), inc);
    assert_eq!(err(&l, "block-dirty-bitmap-enable", nb1.clone()), inc);
    let info = &bitmaps_of(&l, "node0")[0];
    assert_eq!(
        (info["recording"].clone(), info["inconsistent"].clone()),
        (json!(false), json!(true))
    );
    ok(&l, "block-dirty-bitmap-remove", nb1);
    assert_eq!(bitmaps_of(&l, "node0").len(), 1);
}

#[test]
fn merge_is_all_or_nothing_and_empty_list_is_a_no_op() {
    let l = null_layer();
    let node = l.node("node0").unwrap();
    for (name, g) in [("t", 65536u32), ("a", 512), ("b", 4096)] {
        l.block_dirty_bitmap_add("node0", name, Some(g), None, Some(true))
            .unwrap();
    }
    {
        let mut bm = node.bitmaps();
        bm.find_mut("t").unwrap().set_dirty(0, 1).unwrap();
        bm.find_mut("a").unwrap().set_dirty(70000, 1).unwrap();
        bm.find_mut("b").unwrap().set_dirty(500000, 1).unwrap();
    }
    let sha = |n: &str| l.x_debug_block_dirty_bitmap_sha256("node0", n).unwrap();
    let before = sha("t");
    l.block_dirty_bitmap_merge("node0", "t", &[]).unwrap();
    assert_eq!(sha("t"), before);
    // The second source fails: the first one's merge is undone.
    let e = l
        .block_dirty_bitmap_merge(
            "node0",
            "t",
            &[
                MergeSource::Local("a".into()),
                MergeSource::Local("nope".into()),
            ],
        )
        .unwrap_err();
    assert_eq!(e, BlockError::BitmapNotFound("nope".into()));
    assert_eq!(sha("t"), before);
    l.block_dirty_bitmap_merge(
        "node0",
        "t",
        &[
            MergeSource::Local("a".into()),
            MergeSource::External {
                node: "node0".into(),
                name: "b".into(),
            },
        ],
    )
    .unwrap();
    let bm = node.bitmaps();
    let t = bm.find("t").unwrap();
    // 64 KiB groups 0, 1 (70000) and 7 (500000).
    assert_eq!(t.count(), 3 * 65536);
    assert!(t.get(65536).unwrap() && t.get(7 * 65536).unwrap());
}

#[test]
fn cross_node_merge_locks_both_nodes() {
    let l = BlockLayer::new();
    l.blockdev_add(&json!({"driver": "null-co", "node-name": "x", "size": 1 << 20}))
        .unwrap();
    l.blockdev_add(&json!({"driver": "null-co", "node-name": "y", "size": 1 << 20}))
        .unwrap();
    l.block_dirty_bitmap_add("x", "bx", Some(65536), None, None)
        .unwrap();
    l.block_dirty_bitmap_add("y", "by", Some(4096), None, None)
        .unwrap();
    l.node("y").unwrap().write_at(8192, &[1]).unwrap();
    l.block_dirty_bitmap_merge(
        "x",
        "bx",
        &[MergeSource::External {
            node: "y".into(),
            name: "by".into(),
        }],
    )
    .unwrap();
    assert_eq!(
        l.node("x").unwrap().bitmaps().find("bx").unwrap().count(),
        65536
    );
    // And the other way round (the lock order is by node id, not by argument order).
    l.block_dirty_bitmap_merge(
        "y",
        "by",
        &[MergeSource::External {
            node: "x".into(),
            name: "bx".into(),
        }],
    )
    .unwrap();
    assert_eq!(
        l.node("y").unwrap().bitmaps().find("by").unwrap().count(),
        65536
    );
}

#[test]
fn queries_have_qemu_72_shape() {
    let l = null_layer();
    l.block_dirty_bitmap_add("node0", "b0", None, None, None)
        .unwrap();
    l.block_dirty_bitmap_add("node0", "b1", Some(512), None, Some(true))
        .unwrap();
    let nodes = ok(&l, "query-named-block-nodes", json!({}));
    let names: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].clone())
        .collect();
    assert_eq!(names, [json!("n2"), json!("node0")], "newest first");
    let n0 = &nodes[1];
    assert_eq!(n0["drv"], "null-co");
    assert_eq!(n0["ro"], false);
    assert_eq!(n0["file"], r#"json:{"driver": "null-co", "size": 1000000}"#);
    assert_eq!(n0["image"]["virtual-size"], 1000448);
    assert_eq!(n0["image"]["format"], "null-co");
    assert_eq!(
        n0["dirty-bitmaps"],
        json!([
            {"name": "b1", "count": 0, "granularity": 512, "recording": false, "busy": false, "persistent": false},
            {"name": "b0", "count": 0, "granularity": 65536, "recording": true, "busy": false, "persistent": false}
        ])
    );
    assert!(
        nodes[0].get("dirty-bitmaps").is_none(),
        "absent when a node has none"
    );
    assert_eq!(ok(&l, "query-block", json!({})), json!([]));
    l.attach_device("node0", "", "/machine/peripheral/vd0/virtio-backend")
        .unwrap();
    let blk = ok(&l, "query-block", json!({}));
    assert_eq!(blk[0]["device"], "");
    assert_eq!(blk[0]["qdev"], "/machine/peripheral/vd0/virtio-backend");
    assert_eq!(blk[0]["inserted"]["node-name"], "node0");
    assert_eq!(blk[0]["inserted"]["dirty-bitmaps"][1]["name"], "b0");
    assert!(dispatch(&l, "query-status", &json!({})).is_none());
}

#[test]
fn raw_over_file_marks_both_nodes_and_discards_only_with_unmap() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.raw");
    std::fs::write(&img, vec![0x11u8; 1000000]).unwrap();
    let l = BlockLayer::new();
    l.blockdev_add(
        &json!({"driver": "file", "node-name": "f1", "filename": img, "discard": "unmap"}),
    )
    .unwrap();
    l.blockdev_add(&json!({"driver": "raw", "node-name": "r1", "file": "f1", "discard": "unmap"}))
        .unwrap();
    l.blockdev_add(
        &json!({"driver": "raw", "node-name": "keep", "file": {"driver": "file", "filename": img}}),
    )
    .unwrap();
    for n in ["f1", "r1", "keep"] {
        l.block_dirty_bitmap_add(n, "b0", Some(512), None, None)
            .unwrap();
    }
    let io = |n: &str, c: &str| block::qemu_io::run(&l, n, c).unwrap().text();
    let count = |n: &str| l.node(n).unwrap().bitmaps().find("b0").unwrap().count();
    io("r1", "discard 70000 1");
    assert_eq!((count("r1"), count("f1")), (512, 512));
    io("r1", "write 1000 1");
    assert_eq!((count("r1"), count("f1")), (1024, 1024));
    io("r1", "write 999999 449");
    assert_eq!((count("r1"), count("f1")), (1536, 1536));
    assert_eq!(
        io("r1", "write 999999 450"),
        "write failed: Input/output error\n"
    );
    assert!(io("r1", "read -P 0xcd 999999 449").starts_with("read 449/449"));
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        1000448,
        "the write grew the file"
    );
    // Without discard=unmap a discard does nothing and marks nothing.
    io("keep", "discard 4096 4096");
    assert_eq!(count("keep"), 0);
    assert!(io("keep", "read -P 0x11 4096 4096").starts_with("read 4096/4096"));
    // With it, the range is a hole that reads as zeroes.
    io("r1", "discard 0 4096");
    assert!(io("r1", "read -P 0 0 4096").starts_with("read 4096/4096"));
    assert_eq!(l.node("r1").unwrap().filename(), img.to_str().unwrap());
}

#[test]
fn raw_window_maps_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.raw");
    std::fs::write(&img, vec![0u8; 8192]).unwrap();
    let l = BlockLayer::new();
    l.blockdev_add(
        &json!({"driver": "raw", "node-name": "w", "offset": 4096, "size": 1024,
        "file": {"driver": "file", "filename": img}}),
    )
    .unwrap();
    let w = l.node("w").unwrap();
    assert_eq!(w.size().unwrap(), 1024);
    w.write_at(0, b"abcd").unwrap();
    assert_eq!(&std::fs::read(&img).unwrap()[4096..4100], b"abcd");
    assert_eq!(
        w.write_at(1023, b"xy"),
        Err(BlockError::Io(nix::errno::Errno::EIO))
    );
    assert_eq!(w.truncate(2048), Err(BlockError::RawFixedSize));
    assert_eq!(
        w.filename(),
        format!(
            r#"json:{{"driver": "raw", "offset": 4096, "size": 1024, "file": {{"driver": "file", "filename": "{}"}}}}"#,
            img.display()
        )
    );
}

#[test]
fn read_write_raw_over_read_only_file_is_not_writable() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.raw");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let l = BlockLayer::new();
    l.blockdev_add(
        &json!({"driver": "raw", "node-name": "r4", "read-only": true,
        "file": {"driver": "file", "filename": img, "node-name": "f4"}}),
    )
    .unwrap();
    l.blockdev_add(&json!({"driver": "raw", "node-name": "r5", "file": "f4"}))
        .unwrap();
    assert_eq!(
        block::qemu_io::run(&l, "r5", "write 0 512").unwrap().text(),
        "Block node is read-only\n"
    );
    assert_eq!(ok(&l, "query-named-block-nodes", json!({}))[0]["ro"], false);
}

#[test]
fn truncate_resizes_bitmaps_unless_busy() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let l = BlockLayer::new();
    l.blockdev_add(
        &json!({"driver": "raw", "node-name": "t", "file": {"driver": "file", "filename": img}}),
    )
    .unwrap();
    let t = l.node("t").unwrap();
    let id = t.create_bitmap(65536, Some("b")).unwrap();
    t.write_at(0, &[1; 4096]).unwrap();
    t.bitmaps().get_mut(id).unwrap().set_busy(true);
    assert_eq!(
        t.truncate(2 << 20).unwrap_err().to_string(),
        "Bitmap 'b' is currently in use by another operation and cannot be used"
    );
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        1 << 20,
        "nothing changed"
    );
    t.bitmaps().get_mut(id).unwrap().set_busy(false);
    t.truncate(2 << 20).unwrap();
    let bm = t.bitmaps();
    let b = bm.get(id).unwrap();
    assert_eq!(
        (b.size(), b.count(), b.get(1 << 20).unwrap()),
        (2 << 20, 65536, false)
    );
}

/// A stored bitmap: name, granularity, enabled, bits.
type Stored = (String, u32, bool, HBitmap);

/// An in-memory image with a persistent bitmap store, standing in for qcow2.
struct MemImage {
    size: u64,
    stored: Arc<Mutex<Vec<Stored>>>,
}

impl BlockDriver for MemImage {
    fn format_name(&self) -> &'static str {
        "mem"
    }
    fn length(&self) -> Result<u64, BlockError> {
        Ok(self.size)
    }
    fn read_at(&self, _: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: u64, _: &[u8]) -> Result<(), BlockError> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
        Ok(())
    }
    fn supports_discard(&self) -> bool {
        false
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn truncate(&self, _: u64) -> Result<(), BlockError> {
        Err(BlockError::ResizeUnsupported)
    }
    fn info(&self) -> Option<block::driver::DriverInfo> {
        Some(block::driver::DriverInfo {
            cluster_size: 512,
            dirty: false,
        })
    }
    fn allocated_size(&self) -> u64 {
        0
    }
    fn children(&self) -> Vec<(&'static str, Arc<block::BlockNode>)> {
        Vec::new()
    }
    fn filename(&self) -> FilenameInfo {
        let mut options = Map::new();
        options.insert("driver".into(), json!("mem"));
        FilenameInfo {
            exact: Some("mem://".into()),
            options,
        }
    }
    fn bitmap_store(&self) -> Option<&dyn PersistentBitmapStore> {
        Some(self)
    }
}

impl PersistentBitmapStore for MemImage {
    fn can_store_new(
        &self,
        node: &str,
        name: &str,
        _g: u32,
        _persistent: &[&str],
    ) -> Result<(), BlockError> {
        if self.stored.lock().unwrap().iter().any(|s| s.0 == name) {
            return Err(BlockError::Driver(format!(
                "Can't make bitmap '{name}' persistent in '{node}': Bitmap with the same name is already stored"
            )));
        }
        Ok(())
    }
    fn remove(&self, _node: &str, name: &str) -> Result<(), BlockError> {
        self.stored.lock().unwrap().retain(|s| s.0 != name);
        Ok(())
    }
    fn load(&self, _size: u64, in_memory: &[&str]) -> Result<Vec<LoadedBitmap>, BlockError> {
        Ok(self
            .stored
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, ..)| !in_memory.contains(&name.as_str()))
            .map(|(name, g, enabled, bits)| LoadedBitmap {
                name: name.clone(),
                granularity: *g,
                enabled: *enabled,
                in_use: false,
                bitmap: bits.clone(),
            })
            .collect())
    }
    fn store(&self, bitmaps: &[StoredBitmap<'_>]) -> Result<(), BlockError> {
        let mut s = self.stored.lock().unwrap();
        for b in bitmaps {
            s.retain(|x| x.0 != b.name);
            s.push((
                b.name.to_string(),
                b.granularity,
                b.enabled,
                b.bitmap.clone(),
            ));
        }
        Ok(())
    }
}

#[test]
fn persistent_bitmaps_go_through_the_driver_seam() {
    let stored = Arc::new(Mutex::new(Vec::new()));
    let l = BlockLayer::new();
    let img = MemImage {
        size: 1 << 20,
        stored: stored.clone(),
    };
    let d = l
        .insert_node("d0", Box::new(img), NodeFlags::default())
        .unwrap();
    // Default granularity from the cluster size: max(4096, 512).
    l.block_dirty_bitmap_add("d0", "p", None, Some(true), None)
        .unwrap();
    l.block_dirty_bitmap_add("d0", "m", None, Some(true), None)
        .unwrap();
    l.block_dirty_bitmap_add("d0", "t", None, None, None)
        .unwrap();
    assert_eq!(bitmaps_of(&l, "d0")[0]["granularity"], 4096);
    d.write_at(8192, &[1]).unwrap();
    // "m" is being migrated: not stored, stays in memory.
    d.bitmaps().find_mut("m").unwrap().set_skip_store(true);
    l.inactivate_all().unwrap();
    assert!(d.is_inactive());
    {
        let s = stored.lock().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].0.as_str(), s[0].1, s[0].2, s[0].3.count()),
            ("p", 4096, true, 4096)
        );
    }
    let names: Vec<String> = d
        .bitmaps()
        .named()
        .map(|b| b.name().unwrap().to_string())
        .collect();
    assert_eq!(names, ["t", "m"], "the stored bitmap left memory");
    l.activate_all().unwrap();
    let bm = d.bitmaps();
    let p = bm.find("p").unwrap();
    assert!(
        p.persistent() && p.count() == 4096,
        "loaded back on activation"
    );
    assert!(
        !bm.find("m").unwrap().skip_store(),
        "activation resets skip_store"
    );
    drop(bm);
    assert_eq!(
        l.block_dirty_bitmap_add("d0", "p2", None, Some(true), None)
            .map(|_| ()),
        Ok(())
    );
    stored
        .lock()
        .unwrap()
        .push(("dup".into(), 4096, true, HBitmap::new(1 << 20, 12).unwrap()));
    assert_eq!(
        l.block_dirty_bitmap_add("d0", "dup", None, Some(true), None)
            .unwrap_err()
            .to_string(),
        "Can't make bitmap 'dup' persistent in 'd0': Bitmap with the same name is already stored"
    );
    l.block_dirty_bitmap_remove("d0", "p").unwrap();
    assert!(
        stored.lock().unwrap().iter().all(|s| s.0 != "p"),
        "removed from the image too"
    );
}

#[test]
fn concurrent_writers_and_monitor() {
    let l = Arc::new(BlockLayer::new());
    l.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": 64 << 20}))
        .unwrap();
    l.block_dirty_bitmap_add("n", "b", Some(65536), None, None)
        .unwrap();
    let node = l.node("n").unwrap();
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let node = node.clone();
            std::thread::spawn(move || {
                for i in 0..256u64 {
                    node.write_at((t * 256 + i) * 65536, &[0u8; 512]).unwrap();
                }
            })
        })
        .collect();
    let monitor = {
        let l = l.clone();
        std::thread::spawn(move || {
            for i in 0..100 {
                let name = format!("tmp{i}");
                l.block_dirty_bitmap_add("n", &name, Some(4096), None, None)
                    .unwrap();
                l.query_named_block_nodes(false);
                l.block_dirty_bitmap_remove("n", &name).unwrap();
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    monitor.join().unwrap();
    assert_eq!(node.bitmaps().find("b").unwrap().count(), 1024 * 65536);
}

#[test]
fn migration_style_transfer_through_the_typed_api() {
    let l = BlockLayer::new();
    let src = l
        .blockdev_add(&json!({"driver": "null-co", "node-name": "src", "size": 65 << 20}))
        .unwrap();
    let dst = l
        .blockdev_add(&json!({"driver": "null-co", "node-name": "dst", "size": 65 << 20}))
        .unwrap();
    l.block_dirty_bitmap_add("src", "b", Some(65536), None, None)
        .unwrap();
    for off in [0u64, 320 << 10, 1 << 20, (65 << 20) - 1] {
        src.write_at(off, &[1]).unwrap();
    }
    // Source setup: check and mark busy.
    {
        let mut bm = src.bitmaps();
        let b = bm.find_mut("b").unwrap();
        b.check(block::BitmapCheck::DEFAULT).unwrap();
        b.set_busy(true);
        b.set_skip_store(true);
    }
    // Destination START: create with the received granularity, disable, successor.
    assert_eq!(
        dst.create_bitmap(65535, Some("b")),
        Err(BlockError::BadGranularity)
    );
    let id = dst.create_bitmap(65536, Some("b")).unwrap();
    {
        let mut bm = dst.bitmaps();
        bm.get_mut(id).unwrap().set_disabled(true);
        bm.create_successor(id).unwrap();
        bm.enable_successor(id).unwrap();
    }
    // A guest write on the destination while bits arrive lands in the successor.
    dst.write_at(2 << 20, &[1]).unwrap();
    // BITS: 1 KiB of bitmap per chunk, as QEMU sends it.
    let (align, size) = {
        let bm = src.bitmaps();
        let b = bm.find("b").unwrap();
        (b.serialization_align(), b.size())
    };
    let chunk = src
        .bitmaps()
        .find("b")
        .unwrap()
        .serialization_coverage(1024);
    assert_eq!(chunk % align, 0);
    let mut off = 0;
    while off < size {
        let len = chunk.min(size - off);
        let buf = {
            let bm = src.bitmaps();
            let b = bm.find("b").unwrap();
            let mut buf = vec![0u8; b.serialization_size(off, len).unwrap() as usize];
            b.serialize_part(&mut buf, off, len).unwrap();
            buf
        };
        dst.bitmaps()
            .get_mut(id)
            .unwrap()
            .deserialize_part(&buf, off, len, false)
            .unwrap();
        off += len;
    }
    // COMPLETE: finish, reclaim.
    {
        let mut bm = dst.bitmaps();
        bm.get_mut(id).unwrap().deserialize_finish();
        bm.reclaim(id).unwrap();
    }
    let bm = dst.bitmaps();
    let b = bm.get(id).unwrap();
    assert_eq!(b.count(), 5 * 65536);
    assert!(b.get(2 << 20).unwrap() && !b.busy() && b.enabled());
    src.bitmaps().find_mut("b").unwrap().set_busy(false);
    src.write_at(2 << 20, &[1]).unwrap();
    assert_eq!(
        src.bitmaps().find("b").unwrap().sha256_hex(),
        b.sha256_hex()
    );
}

/// Seed 002's hand-over with a raw image behind a guest device: once the source has
/// inactivated its nodes, the destination (here a second layer in this process, with its own
/// file descriptions) can take the image's write lock. The file node used to keep the
/// device's "write not shared" lock byte while inactive, so the destination failed with
/// `Failed to get "write" lock`.
#[test]
fn an_inactivated_raw_image_behind_a_device_can_be_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), "disk.raw");
    let spec = json!({
        "driver": "raw", "node-name": "d0",
        "file": {"driver": "file", "filename": path.display().to_string()}
    });
    let src = BlockLayer::new();
    src.blockdev_add(&spec).unwrap();
    src.attach_device("d0", "", "/machine/peripheral-anon/disk")
        .unwrap();
    let dst = BlockLayer::new();
    dst.set_incoming(true);
    dst.blockdev_add(&spec).unwrap();
    dst.attach_device("d0", "", "/machine/peripheral-anon/disk")
        .unwrap();
    // While the source is active, the destination cannot take the image.
    assert!(dst
        .activate_all()
        .unwrap_err()
        .to_string()
        .contains("Failed to get \"write\" lock"));
    dst.inactivate_all().unwrap();
    src.inactivate_all().unwrap();
    dst.activate_all().unwrap();
    dst.node("d0").unwrap().write_at(0, &[1; 512]).unwrap();
    // And back: the destination lets go, the source takes it again.
    dst.inactivate_all().unwrap();
    src.activate_all().unwrap();
}
