//! Against QEMU 7.2 itself: the same seeded sequence of qemu-io writes, write-zeroes and
//! discards, sent to QEMU through `human-monitor-command` and to our layer through
//! [`block::qemu_io::run`], must leave bitmaps with the same `x-debug-block-dirty-bitmap-sha256`
//! and the same `count`; qemu-io must print the same first lines; and bad requests must get the
//! same error texts.
//!
//! QEMU runs as `-M none -nodefaults -display none -accel tcg` (this QEMU build has no `qtest`
//! accelerator, so `testkit::VmProcess::qemu_none` cannot start it).

use block::BlockLayer;
use serde_json::{json, Value};
use std::time::Duration;
use testkit::rng::SplitMix;
use testkit::{QmpClient, VmProcess};

/// Runs a block command as the monitor does; `None` for a command the block layer lacks.
fn dispatch(
    l: &block::BlockLayer,
    cmd: &str,
    args: &Value,
) -> Option<Result<Value, qmp::QmpError>> {
    let args = qmp::Args::new(args.as_object().cloned().unwrap_or_default());
    block::qmp::COMMANDS
        .contains(&cmd)
        .then(|| block::qmp::run(l, cmd, args))
}

fn start_qemu(dir: &std::path::Path, name: &str, blockdevs: &[String]) -> (VmProcess, QmpClient) {
    let args: Vec<String> = blockdevs
        .iter()
        .flat_map(|b| ["-blockdev".to_string(), b.clone()])
        .collect();
    let vm = VmProcess::qemu_none(dir, name, &args).expect("spawn qemu");
    let qmp = vm.qmp();
    (vm, qmp)
}

fn bitmap_count(nodes: &Value, node: &str, bitmap: &str) -> u64 {
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .and_then(|n| n["dirty-bitmaps"].as_array())
        .and_then(|b| b.iter().find(|b| b["name"] == bitmap))
        .and_then(|b| b["count"].as_u64())
        .unwrap_or_else(|| panic!("no bitmap {node}/{bitmap} in {nodes}"))
}

/// One random qemu-io command within (and now and then just past) a node of `size` bytes:
/// every write-like request qemu-io can make (plain and patterned writes, FUA, write-zeroes with
/// and without unmap and no-fallback, discard).
fn random_op(rng: &mut SplitMix, size: u64, with_discard: bool) -> String {
    let off = match rng.below(6) {
        0 => 0,
        1 => size.saturating_sub(rng.below(4096) + 1),
        _ => rng.below(size),
    };
    let len = match rng.below(5) {
        0 => 0,
        1 => size - off,
        2 => rng.below(4096) + 1,
        _ => rng.below((size - off).min(3 << 20)) + 1,
    };
    // Now and then a request past the end, which fails the same way on both sides.
    let len = if rng.below(15) == 0 { len + 512 } else { len };
    match rng.below(if with_discard { 8 } else { 6 }) {
        0 => format!("write -z {off} {len}"),
        1 => format!("write -P 0x{:x} {off} {len}", rng.below(256)),
        2 => format!("write {off} {len}"),
        3 => format!("write -z -u {off} {len}"),
        4 => format!("write -f -P 0x{:x} {off} {len}", rng.below(256)),
        5 => format!("write -z -f {off} {len}"),
        _ => format!("discard {off} {len}"),
    }
}

/// A node both sides open the same way: `spec` is its `-blockdev` keyval with `@` standing
/// for the side's own copy of the image (if it has one).
struct Node {
    name: &'static str,
    spec: String,
    size: u64,
    /// Images to create for each side: (file name, how).
    images: Vec<(&'static str, Image)>,
}

enum Image {
    Raw(u64),
    Qcow2 { size: u64, opts: &'static str },
}

fn make_image(dir: &std::path::Path, name: &str, image: &Image) {
    let path = dir.join(name);
    match image {
        Image::Raw(size) => std::fs::File::create(&path)
            .unwrap()
            .set_len(*size)
            .unwrap(),
        Image::Qcow2 { size, opts } => {
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            let p = path.display().to_string();
            let s = size.to_string();
            args.extend([p.as_str(), s.as_str()]);
            let out = std::process::Command::new("qemu-img")
                .args(&args)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
        }
    }
}

struct Case {
    node: &'static str,
    bitmap: String,
    granularity: u32,
}

/// Every write-like request qemu-io makes, on every kind of node (`null-co`; `raw` over
/// `file` with and without `discard=unmap`; a bare `file` node; `qcow2` with 64 KiB and 4 KiB
/// clusters, with and without `discard=unmap`, with a backing file), marks the same bits as in
/// QEMU 7.2: same `x-debug-block-dirty-bitmap-sha256`, same `count`, same first line printed.
#[test]
fn same_ops_give_same_bitmaps_as_qemu() {
    if !testkit::require("same_ops_give_same_bitmaps_as_qemu", testkit::qemu()) {
        return;
    }
    let dir = testkit::tempdir();
    let fsize: u64 = (5 << 20) + 4608;
    let qsize: u64 = (6 << 20) + 3 * 512;
    let null = |name: &'static str, size: u64| Node {
        name,
        spec: format!("driver=null-co,node-name={name},size={size}"),
        size,
        images: vec![],
    };
    let nodes = vec![
        // Sizes: a multiple of every granularity, one that is not even a sector multiple, one a
        // little over a 2 MiB boundary.
        null("node0", 64 << 20),
        null("node1", 1_000_000),
        null("node2", (3 << 20) + 1234),
        // File-backed raw nodes with discard=unmap: there discards reach the driver and mark.
        Node {
            name: "fnode",
            spec: "driver=raw,node-name=fnode,discard=unmap,file.driver=file,file.filename=@f.raw"
                .into(),
            size: fsize,
            images: vec![("f.raw", Image::Raw(fsize))],
        },
        // Without discard=unmap a discard does nothing, and marks nothing.
        Node {
            name: "fignore",
            spec: "driver=raw,node-name=fignore,file.driver=file,file.filename=@fi.raw".into(),
            size: fsize,
            images: vec![("fi.raw", Image::Raw(fsize))],
        },
        Node {
            name: "bare",
            spec: "driver=file,node-name=bare,discard=unmap,filename=@bare.raw".into(),
            size: fsize,
            images: vec![("bare.raw", Image::Raw(fsize))],
        },
        Node {
            name: "qc",
            spec: "driver=qcow2,node-name=qc,discard=unmap,file.driver=file,file.filename=@qc.qcow2"
                .into(),
            size: qsize,
            images: vec![("qc.qcow2", Image::Qcow2 { size: qsize, opts: "" })],
        },
        Node {
            name: "qc4k",
            spec:
                "driver=qcow2,node-name=qc4k,discard=unmap,file.driver=file,file.filename=@qc4k.qcow2"
                    .into(),
            size: qsize,
            images: vec![(
                "qc4k.qcow2",
                Image::Qcow2 {
                    size: qsize,
                    opts: "cluster_size=4096",
                },
            )],
        },
        Node {
            name: "qcign",
            spec: "driver=qcow2,node-name=qcign,file.driver=file,file.filename=@qci.qcow2".into(),
            size: qsize,
            images: vec![("qci.qcow2", Image::Qcow2 { size: qsize, opts: "" })],
        },
        Node {
            name: "qctop",
            spec:
                "driver=qcow2,node-name=qctop,discard=unmap,file.driver=file,file.filename=@top.qcow2"
                    .into(),
            size: qsize,
            images: vec![
                ("base.raw", Image::Raw(qsize)),
                (
                    "top.qcow2",
                    Image::Qcow2 {
                        size: qsize,
                        opts: "backing_file=base.raw,backing_fmt=raw",
                    },
                ),
            ],
        },
    ];
    let sides = [dir.path().join("qemu"), dir.path().join("ours")];
    for side in &sides {
        std::fs::create_dir(side).unwrap();
        for n in &nodes {
            for (file, image) in &n.images {
                make_image(side, file, image);
            }
        }
    }
    let spec =
        |n: &Node, side: &std::path::Path| n.spec.replace('@', &format!("{}/", side.display()));
    let blockdevs: Vec<String> = nodes.iter().map(|n| spec(n, &sides[0])).collect();
    let (mut vm, mut qmp) = start_qemu(dir.path(), "interop", &blockdevs);

    let ours = BlockLayer::new();
    for n in &nodes {
        ours.blockdev_add(&block::parse_blockdev_keyval(&spec(n, &sides[1])).unwrap())
            .unwrap();
    }

    let grans = [512u32, 4096, 65536, 1 << 21];
    let mut cases = Vec::new();
    for n in &nodes {
        for g in grans {
            cases.push(Case {
                node: n.name,
                bitmap: format!("g{g}"),
                granularity: g,
            });
        }
    }
    for c in &cases {
        let args = json!({"node": c.node, "name": c.bitmap, "granularity": c.granularity});
        qmp.ok("block-dirty-bitmap-add", args.clone());
        dispatch(&ours, "block-dirty-bitmap-add", &args)
            .unwrap()
            .unwrap();
    }

    let mut our_lines = Vec::new();
    // (seed, node): every node gets a sequence; node1 also one with discards, which do
    // nothing on null-co.
    let mut runs: Vec<(u64, &Node)> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u64 + 1, n))
        .collect();
    runs.push((100, &nodes[1]));
    for (seed, node) in runs {
        let mut rng = SplitMix(seed);
        let with_discard = !node.images.is_empty() || seed == 100;
        for i in 0..16 {
            // Toggle one bitmap now and then, so disabled bitmaps are exercised too.
            if i == 4 || i == 8 {
                let b = format!("g{}", grans[rng.below(4) as usize]);
                let cmd = if i == 4 {
                    "block-dirty-bitmap-disable"
                } else {
                    "block-dirty-bitmap-enable"
                };
                let args = json!({"node": node.name, "name": b});
                qmp.ok(cmd, args.clone());
                dispatch(&ours, cmd, &args).unwrap().unwrap();
            }
            let op = random_op(&mut rng, node.size, with_discard);
            let reply = qmp.hmp(&format!("qemu-io {} \"{op}\"", node.name));
            assert_eq!(reply, "", "QEMU's HMP reply to {op}");
            let out = block::qemu_io::run(&ours, node.name, &op).unwrap().text();
            our_lines.push(format!(
                "{} {op}: {}",
                node.name,
                out.lines().next().unwrap_or("")
            ));
        }
    }

    let qemu_nodes = qmp.ok("query-named-block-nodes", json!({}));
    let our_nodes = ours.query_named_block_nodes(false);
    let mut wrong = Vec::new();
    for c in &cases {
        let args = json!({"node": c.node, "name": c.bitmap});
        let theirs = qmp.ok("x-debug-block-dirty-bitmap-sha256", args.clone());
        let mine = dispatch(&ours, "x-debug-block-dirty-bitmap-sha256", &args)
            .unwrap()
            .unwrap();
        let (mc, tc) = (
            bitmap_count(&our_nodes, c.node, &c.bitmap),
            bitmap_count(&qemu_nodes, c.node, &c.bitmap),
        );
        if mine != theirs || mc != tc {
            wrong.push(format!("{}/{}: count {mc}, QEMU's {tc}", c.node, c.bitmap));
        }
    }
    assert!(
        wrong.is_empty(),
        "bitmaps that differ from QEMU's: {wrong:#?}"
    );
    // The sequences did dirty something, and discards on discard=unmap nodes marked.
    for n in ["fnode", "qc", "bare", "qctop"] {
        assert!(bitmap_count(&our_nodes, n, "g512") > 0, "{n}");
    }

    // qemu-io prints to QEMU's stdout, which reaches the log when QEMU exits.
    qmp.ok("quit", json!({}));
    vm.wait_exit(Duration::from_secs(10));
    let log = vm.log();
    let qemu_lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["wrote ", "discard ", "write failed", "discard failed"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    let ours_first: Vec<&str> = our_lines
        .iter()
        .map(|l| l.split_once(": ").map_or("", |(_, r)| r))
        .collect();
    for (i, (mine, theirs)) in ours_first.iter().zip(&qemu_lines).enumerate() {
        assert_eq!(mine, theirs, "qemu-io's first line for {}", our_lines[i]);
    }
    assert_eq!(ours_first.len(), qemu_lines.len(), "qemu-io's lines");
}

#[test]
fn error_replies_match_qemu() {
    if !testkit::require("error_replies_match_qemu", testkit::qemu()) {
        return;
    }
    let dir = testkit::tempdir();
    let img = dir.path().join("img.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let blockdevs = [
        "driver=null-co,node-name=node0,size=1000000".to_string(),
        "driver=null-co,node-name=n2,size=2000000".to_string(),
    ];
    let (_vm, mut qmp) = start_qemu(dir.path(), "errors", &blockdevs);
    let ours = BlockLayer::new();
    for b in &blockdevs {
        ours.blockdev_add(&block::parse_blockdev_keyval(b).unwrap())
            .unwrap();
    }
    let long = "x".repeat(1024);
    let setup = [
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "b0"}),
        ),
        ("block-dirty-bitmap-add", json!({"node": "n2", "name": "c"})),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r1", "file": {"driver": "file", "filename": img, "node-name": "f1"}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r2", "file": "r1"}),
        ),
    ];
    for (cmd, args) in setup {
        qmp.ok(cmd, args.clone());
        dispatch(&ours, cmd, &args).unwrap().unwrap();
    }
    let bad = [
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "x", "granularity": 1000}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "x", "granularity": 0}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "x", "granularity": 256}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "x", "granularity": -1}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "x", "granularity": 4294967296u64}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "x", "granularity": "4096"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": ""}),
        ),
        ("block-dirty-bitmap-add", json!({"node": "zz", "name": "x"})),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "x", "persistent": true}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": long}),
        ),
        ("block-dirty-bitmap-add", json!({"node": "node0"})),
        (
            "block-dirty-bitmap-add",
            json!({"node": "node0", "name": "q", "extra": 1}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "node0", "name": "nope"}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "zz", "name": "nope"}),
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "node0", "name": "nope"}),
        ),
        (
            "block-dirty-bitmap-enable",
            json!({"node": "zz", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-disable",
            json!({"node": "node0", "name": "nope"}),
        ),
        (
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "node0", "name": "nope"}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "node0", "target": "b0", "bitmaps": ["nope"]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "node0", "target": "nope", "bitmaps": ["b0"]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "node0", "target": "b0", "bitmaps": [{"node": "zz", "name": "b1"}]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "node0", "target": "b0", "bitmaps": [{"node": "n2", "name": "c"}]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "node0", "target": "b0", "bitmaps": [{"node": "n2"}]}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "node0"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "1abc"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "abcdefghijabcdefghijabcdefghij12"}),
        ),
        ("blockdev-add", json!({"driver": "null-co"})),
        ("blockdev-add", json!({"node-name": "q"})),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "q", "bogus": 1}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "q", "file": "nope"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "q", "file": "node0", "size": 1000}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "q", "file": "node0", "offset": 2000000}),
        ),
        ("blockdev-del", json!({"node-name": "nope"})),
        ("blockdev-del", json!({"node-name": "r1"})),
        ("blockdev-del", json!({"node-name": "f1"})),
    ];
    for (cmd, args) in bad {
        let theirs = qmp.err(cmd, args.clone());
        let mine = match dispatch(&ours, cmd, &args) {
            Some(Err(e)) => e.to_string(),
            other => panic!("{cmd} {args}: expected an error, got {other:?}"),
        };
        assert_eq!(mine, theirs, "{cmd} {args}");
    }
    // qemu-io on a missing node: HMP shows "Error: <desc>".
    let theirs = qmp.hmp("qemu-io zz \"write 0 512\"");
    let mine = format!(
        "Error: {}\r\n",
        block::qemu_io::run(&ours, "zz", "write 0 512").unwrap_err()
    );
    assert_eq!(mine, theirs);
}
