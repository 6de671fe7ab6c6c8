//! qcow2 against QEMU 7.2's own tools: images livemig writes pass `qemu-img check` with no error
//! and no leak and read back the same through `qemu-img convert`; images and bitmaps QEMU
//! writes read back the same here (contents, bitmap SHA-256 and count as QEMU reports them);
//! image locks keep livemig and QEMU from writing one image at the same time, both ways;
//! inactivation and activation hand an image over without losing a persistent bitmap; corrupt
//! images get QEMU's message, never a panic.
//!
//! Every test skips (or fails under CI) without QEMU 7.2; images are a few MiB.

use block::BlockLayer;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use testkit::rng::SplitMix;
use testkit::{QmpClient, VmProcess};

fn have_qemu(test: &str) -> bool {
    testkit::require(test, testkit::qemu())
}

fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"))
}

fn ok(prog: &str, args: &[&str]) -> String {
    let o = run(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn create(path: &Path, size: &str, opts: &[&str]) {
    let p = path.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    for o in opts {
        args.push("-o");
        args.push(o);
    }
    args.push(p);
    args.push(size);
    ok("qemu-img", &args);
}

/// `qemu-img check` must find nothing: exit code 0 and QEMU's clean line.
fn check_clean(path: &Path) {
    let o = run("qemu-img", &["check", path.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("No errors were found on the image."),
        "qemu-img check {}: exit {:?}\n{out}{}",
        path.display(),
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().unwrap());
    ok("qemu-io", &args);
}

/// The guest-visible contents as QEMU reads them.
fn qemu_contents(path: &Path) -> Vec<u8> {
    let out = path.with_extension("raw-out");
    ok(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

fn info(path: &Path) -> Value {
    let s = ok(
        "qemu-img",
        &["info", "-U", "--output=json", path.to_str().unwrap()],
    );
    serde_json::from_str(&s).unwrap()
}

/// `(name, granularity, flags)` of every bitmap `qemu-img info` lists.
fn info_bitmaps(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let v = info(path);
    let mut out: Vec<_> = v
        .pointer("/format-specific/data/bitmaps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    out.sort();
    out
}

fn qcow2_opts(path: &Path, node: &str) -> Value {
    json!({"driver": "qcow2", "node-name": node, "discard": "unmap",
           "file": {"driver": "file", "filename": path.to_str().unwrap()}})
}

fn open(l: &BlockLayer, path: &Path, node: &str) -> std::sync::Arc<block::BlockNode> {
    l.blockdev_add(&qcow2_opts(path, node))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Random writes, write-zeroes (with and without unmap) and discards on `node`, mirrored into
/// `model` (discarded ranges: whole clusters read as zeroes on a v3 image).
fn random_io(node: &block::BlockNode, model: &mut [u8], cs: u64, rng: &mut SplitMix, ops: usize) {
    let size = model.len() as u64;
    for i in 0..ops {
        let off = match rng.below(4) {
            0 => rng.below(size / cs) * cs,
            _ => rng.below(size),
        };
        let len = (rng.below(3 * cs) + 1).min(size - off);
        match rng.below(10) {
            0..=5 => {
                let fill = (i as u8).wrapping_mul(31).wrapping_add(7) | 1;
                let buf: Vec<u8> = (0..len).map(|k| fill.wrapping_add(k as u8)).collect();
                node.write_at(off, &buf).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            6 | 7 => {
                node.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                node.discard(off, len).unwrap();
                let first = off.div_ceil(cs) * cs;
                let end = (off + len) / cs * cs;
                if end > first {
                    model[first as usize..end as usize].fill(0);
                }
            }
        }
    }
}

fn read_all(node: &block::BlockNode, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    node.read_at(0, &mut v).unwrap();
    v
}

fn tmp() -> tempfile::TempDir {
    testkit::tempdir()
}

#[test]
fn our_writes_pass_qemu_img_check_and_read_back_in_qemu() {
    if !have_qemu("our_writes_pass_qemu_img_check_and_read_back_in_qemu") {
        return;
    }
    let dir = tmp();
    // 512-byte clusters make the image need many L2 tables and refcount blocks, and outgrow
    // its refcount table; 64 KiB clusters are QEMU's default.
    // Refcount widths from 1 to 64 bits, and a version 2 image (no zero flag).
    for (cs, size, extra) in [
        (512u64, 12u64 << 20, "refcount_bits=16"),
        (65536, 8 << 20, "refcount_bits=16"),
        (4096, 4 << 20, "refcount_bits=1"),
        (2048, 4 << 20, "refcount_bits=64"),
        (4096, 3 << 20, "compat=0.10"),
    ] {
        let img = dir.path().join(format!("w{cs}-{extra}.qcow2"));
        create(
            &img,
            &size.to_string(),
            &[&format!("cluster_size={cs}"), extra],
        );
        let v2 = extra == "compat=0.10";
        let l = BlockLayer::new();
        let node = l
            .blockdev_add(
                &json!({"driver": "qcow2", "node-name": "d0", "discard": "unmap",
                "file": {"driver": "file", "filename": img.to_str().unwrap()}}),
            )
            .unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = SplitMix(cs);
        if v2 {
            // Discarded clusters of a version 2 image fall through to the backing file (here:
            // zeroes), as the model says; only the zero flag differs, which v2 lacks.
            assert_eq!(
                l.block_dirty_bitmap_add("d0", "b", None, Some(true), None)
                    .unwrap_err()
                    .to_string(),
                "Can't make bitmap 'b' persistent in 'd0': Cannot store dirty bitmaps in qcow2 v2 \
                 files"
            );
        }
        random_io(&node, &mut model, cs, &mut rng, 400);
        // Fill most of the disk so the refcount structures grow.
        let big = vec![0x5au8; (size * 3 / 4) as usize];
        node.write_at(size / 8, &big).unwrap();
        model[(size / 8) as usize..(size / 8 + size * 3 / 4) as usize].fill(0x5a);
        random_io(&node, &mut model, cs, &mut rng, 200);
        assert!(
            read_all(&node, size as usize) == model,
            "cs {cs}: our reads"
        );
        node.flush().unwrap();
        drop(node);
        l.blockdev_del("d0").unwrap();
        check_clean(&img);
        assert!(
            qemu_contents(&img) == model,
            "cs {cs}: QEMU reads what we wrote"
        );
        if cs == 512 {
            // One 512-byte refcount table covers 8 MiB of image: it had to grow.
            let head = std::fs::read(&img).unwrap();
            let clusters = u32::from_be_bytes(head[56..60].try_into().unwrap());
            assert!(clusters > 1, "refcount table clusters {clusters}");
        }
    }
}

/// QEMU 7.2 (`-M none`) with `-blockdev` arguments.
fn start_qemu(dir: &Path, name: &str, blockdevs: &[String]) -> (VmProcess, QmpClient) {
    let mut extra = Vec::new();
    for b in blockdevs {
        extra.push("-blockdev".to_string());
        extra.push(b.clone());
    }
    let vm = VmProcess::qemu_none(dir, name, &extra).expect("spawn qemu");
    let qmp = vm.qmp();
    (vm, qmp)
}

fn qemu_blockdev(path: &Path, node: &str) -> String {
    format!(
        "driver=qcow2,node-name={node},file.driver=file,file.filename={}",
        path.display()
    )
}

fn quit(mut vm: VmProcess, mut qmp: QmpClient) {
    let _ = qmp.execute("quit", json!({}));
    assert!(
        vm.wait_exit(Duration::from_secs(30)).is_some(),
        "QEMU did not quit"
    );
}

/// What a bitmap looks like to a client: (name, sha256, count, granularity, recording,
/// persistent, inconsistent).
type BitmapView = (String, String, u64, u64, bool, bool, bool);

fn view_from_query(nodes: &Value, node: &str, sha: impl Fn(&str) -> String) -> Vec<BitmapView> {
    let n = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node}"));
    let mut v: Vec<BitmapView> = n["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            let name = b["name"].as_str().unwrap().to_string();
            (
                name.clone(),
                sha(&name),
                b["count"].as_u64().unwrap(),
                b["granularity"].as_u64().unwrap(),
                b["recording"].as_bool().unwrap(),
                b["persistent"].as_bool().unwrap(),
                b.get("inconsistent")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            )
        })
        .collect();
    v.sort();
    v
}

fn qemu_view(qmp: &mut QmpClient, node: &str) -> Vec<BitmapView> {
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let names: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    let mut shas = std::collections::HashMap::new();
    for name in names {
        let r = qmp.ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": node, "name": name}),
        );
        shas.insert(name, r["sha256"].as_str().unwrap().to_string());
    }
    view_from_query(&nodes, node, |n| shas[n].clone())
}

fn our_view(l: &BlockLayer, node: &str) -> Vec<BitmapView> {
    let nodes = l.query_named_block_nodes(false);
    view_from_query(&nodes, node, |n| {
        l.x_debug_block_dirty_bitmap_sha256(node, n).unwrap()
    })
}

#[test]
fn bitmaps_qemu_wrote_load_here_as_qemu_sees_them() {
    if !have_qemu("bitmaps_qemu_wrote_load_here_as_qemu_sees_them") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("q.qcow2");
    let p = img.to_str().unwrap();
    create(&img, "8M", &[]);
    ok("qemu-img", &["bitmap", "--add", p, "b0"]);
    ok("qemu-img", &["bitmap", "--add", "-g", "512", p, "b1"]);
    ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "1M", "--disable", p, "b2"],
    );
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 3M 5000",
            "write -P 0x33 8323072 65536",
        ],
    );
    ok("qemu-img", &["bitmap", "--add", "-g", "4096", p, "late"]);
    qemu_io(&img, &["write -z 1M 70000", "write -P 0x44 6000000 3"]);
    check_clean(&img);

    let (vm, mut qmp) = start_qemu(dir.path(), "q", &[qemu_blockdev(&img, "d0")]);
    let theirs = qemu_view(&mut qmp, "d0");
    quit(vm, qmp);
    assert_eq!(theirs.len(), 4);
    assert!(theirs.iter().any(|b| b.0 == "b2" && !b.4 && b.2 == 0));

    let l = BlockLayer::new();
    let node = open(&l, &img, "d0");
    assert_eq!(our_view(&l, "d0"), theirs);
    assert!(read_all(&node, 8 << 20) == qemu_contents(&img));
    // While we have it, the image marks the loaded bitmaps in use.
    let flags = info_bitmaps(&img);
    assert!(
        flags.iter().all(|b| b.2.contains(&"in-use".to_string())),
        "{flags:?}"
    );
    drop(node);
    l.blockdev_del("d0").unwrap();
    check_clean(&img);
    assert_eq!(
        info_bitmaps(&img),
        vec![
            ("b0".into(), 65536, vec!["auto".into()]),
            ("b1".into(), 512, vec!["auto".into()]),
            ("b2".into(), 1 << 20, vec![]),
            ("late".into(), 4096, vec!["auto".into()]),
        ]
    );
    // Read-only: the same bitmaps, readonly, and the image is not marked.
    let l = BlockLayer::new();
    let node = l
        .blockdev_add(
            &json!({"driver": "qcow2", "node-name": "d0", "read-only": true,
            "file": {"driver": "file", "filename": p}}),
        )
        .unwrap();
    assert_eq!(our_view(&l, "d0"), theirs);
    assert!(node.bitmaps().named().all(|b| b.readonly()));
    assert!(info_bitmaps(&img)
        .iter()
        .all(|b| !b.2.contains(&"in-use".to_string())));
    assert_eq!(
        l.block_dirty_bitmap_clear("d0", "b0")
            .unwrap_err()
            .to_string(),
        "Bitmap 'b0' is readonly and cannot be modified"
    );
    drop(node);
    l.close_all().unwrap();
    // And QEMU reads back what we stored.
    let (vm, mut qmp) = start_qemu(dir.path(), "q2", &[qemu_blockdev(&img, "d0")]);
    assert_eq!(qemu_view(&mut qmp, "d0"), theirs);
    quit(vm, qmp);
    check_clean(&img);
}

#[test]
fn bitmaps_we_wrote_load_in_qemu_as_we_see_them() {
    if !have_qemu("bitmaps_we_wrote_load_in_qemu_as_we_see_them") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("o.qcow2");
    create(&img, "6M", &["cluster_size=4096"]);
    let l = BlockLayer::new();
    let node = open(&l, &img, "d0");
    l.block_dirty_bitmap_add("d0", "b0", None, Some(true), None)
        .unwrap();
    l.block_dirty_bitmap_add("d0", "g512", Some(512), Some(true), None)
        .unwrap();
    l.block_dirty_bitmap_add("d0", "off", Some(65536), Some(true), Some(true))
        .unwrap();
    l.block_dirty_bitmap_add("d0", "transient", Some(65536), None, None)
        .unwrap();
    let mut model = vec![0u8; 6 << 20];
    random_io(&node, &mut model, 4096, &mut SplitMix(7), 150);
    l.block_dirty_bitmap_enable("d0", "off").unwrap();
    random_io(&node, &mut model, 4096, &mut SplitMix(8), 20);
    l.block_dirty_bitmap_disable("d0", "off").unwrap();
    let ours: Vec<BitmapView> = our_view(&l, "d0")
        .into_iter()
        .filter(|b| b.0 != "transient")
        .collect();
    assert!(ours.iter().all(|b| b.2 > 0), "{ours:?}");
    drop(node);
    l.blockdev_del("d0").unwrap();
    check_clean(&img);
    assert_eq!(
        info_bitmaps(&img),
        vec![
            ("b0".into(), 4096, vec!["auto".into()]),
            ("g512".into(), 512, vec!["auto".into()]),
            ("off".into(), 65536, vec![]),
        ]
    );
    assert!(qemu_contents(&img) == model);
    let (vm, mut qmp) = start_qemu(dir.path(), "o", &[qemu_blockdev(&img, "d0")]);
    assert_eq!(qemu_view(&mut qmp, "d0"), ours);
    quit(vm, qmp);
    check_clean(&img);
    // qemu-img removes one; we see the rest.
    ok(
        "qemu-img",
        &["bitmap", "--remove", img.to_str().unwrap(), "g512"],
    );
    let l = BlockLayer::new();
    let _node = open(&l, &img, "d0");
    let names: Vec<String> = our_view(&l, "d0").into_iter().map(|b| b.0).collect();
    assert_eq!(names, ["b0", "off"]);
    l.block_dirty_bitmap_remove("d0", "b0").unwrap();
    l.block_dirty_bitmap_remove("d0", "off").unwrap();
    drop(_node);
    l.close_all().unwrap();
    check_clean(&img);
    let v = info(&img);
    assert!(v.pointer("/format-specific/data/bitmaps").is_none(), "{v}");
    let head = std::fs::read(&img).unwrap();
    assert_eq!(
        &head[88..96],
        &[0u8; 8],
        "autoclear cleared with the last bitmap"
    );
}

/// The bytes of `path` some open file description holds a lock on, probed one by one with
/// `F_OFD_GETLK` from a fresh one (as QEMU's own lock check does). Unlike a parse of
/// `/proc/locks`, each probe is atomic: a seq_file read while other tests take and drop
/// locks can skip a line.
#[allow(unsafe_code)] // a raw fcntl: the lock probe has no safe wrapper in libc
fn ofd_lock_bytes(path: &Path) -> Vec<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    (0..400u64)
        .filter(|&b| {
            // SAFETY: flock is plain old data; all-zero is a valid value.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = b as libc::off_t;
            fl.l_len = 1;
            // SAFETY: a valid descriptor and a valid flock to fill in.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
            assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
            fl.l_type != libc::F_UNLCK as libc::c_short
        })
        .collect()
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn image_locks_keep_qemu_and_us_apart_both_ways() {
    if !have_qemu("image_locks_keep_qemu_and_us_apart_both_ways") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("l.qcow2");
    let p = img.to_str().unwrap();
    create(&img, "4M", &[]);

    // The same bytes as QEMU: 100, 101, 103 (consistent read, write, resize) and 201, 203.
    let (vm, qmp) = start_qemu(dir.path(), "l", &[qemu_blockdev(&img, "d0")]);
    // A CI run once saw [100, 101, 103, 201] here, with the bytes then read from /proc/locks
    // (which can skip a line while other tests lock files). The probe is exact now; the
    // short wait also covers a QEMU still settling its permissions after the greeting.
    let expected = [100, 101, 103, 201, 203];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut qemu_bytes = ofd_lock_bytes(&img);
    while qemu_bytes != expected && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        qemu_bytes = ofd_lock_bytes(&img);
    }
    assert_eq!(qemu_bytes, expected);

    // QEMU holds it: we cannot open it for writing, nor read-only without force-share.
    let l = BlockLayer::new();
    let e = l.blockdev_add(&qcow2_opts(&img, "d0")).unwrap_err();
    assert_eq!(e.to_string(), "Failed to get \"write\" lock");
    assert_eq!(
        e.hint().unwrap(),
        format!("Is another process using the image [{p}]?")
    );
    let ro = json!({"driver": "qcow2", "node-name": "r0", "read-only": true,
                    "file": {"driver": "file", "filename": p}});
    assert_eq!(
        l.blockdev_add(&ro).unwrap_err().to_string(),
        "Failed to get shared \"write\" lock"
    );
    let fs_rw = json!({"driver": "qcow2", "node-name": "r1", "force-share": true,
                       "file": {"driver": "file", "filename": p}});
    assert_eq!(
        l.blockdev_add(&fs_rw).unwrap_err().to_string(),
        "force-share=on can only be used with read-only images"
    );
    let fs_ro = json!({"driver": "qcow2", "node-name": "r2", "force-share": true,
                       "read-only": true, "file": {"driver": "file", "filename": p}});
    l.blockdev_add(&fs_ro).unwrap();
    l.blockdev_del("r2").unwrap();
    assert!(
        l.node("d0").is_none() && l.nodes().is_empty(),
        "failed opens leave nothing"
    );
    quit(vm, qmp);
    assert!(ofd_lock_bytes(&img).is_empty());

    // We hold it: QEMU's tools refuse, with their usual words.
    let node = open(&l, &img, "d0");
    assert_eq!(ofd_lock_bytes(&img), qemu_bytes);
    let o = run("qemu-io", &["-c", "write 0 512", p]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("Failed to get \"write\" lock")
            && stderr_of(&o).contains(&format!("Is another process using the image [{p}]?")),
        "{}",
        stderr_of(&o)
    );
    let o = run("qemu-img", &["info", p]);
    assert!(
        stderr_of(&o).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr_of(&o)
    );
    ok("qemu-img", &["info", "-U", p]);
    let (vm, mut qmp) = VmProcess::qemu_none(dir.path(), "l2", &[])
        .map(|vm| {
            let q = vm.qmp();
            (vm, q)
        })
        .unwrap();
    let desc = qmp.err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "x", "file": {"driver": "file", "filename": p}}),
    );
    assert_eq!(desc, "Failed to get \"write\" lock");

    // Inactivated (handed over): only byte 100 stays, and QEMU may take the image.
    l.inactivate_all().unwrap();
    assert_eq!(ofd_lock_bytes(&img), [100]);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "x", "file": {"driver": "file", "filename": p}}),
    );
    // While QEMU has it, we cannot take it back; nothing is left half-activated.
    let e = l.activate_all().unwrap_err();
    assert_eq!(e.to_string(), "Failed to get \"write\" lock");
    assert!(node.is_inactive());
    assert_eq!(
        node.write_at(0, &[1]),
        Err(block::BlockError::Io(nix::errno::Errno::EPERM))
    );
    qmp.ok("blockdev-del", json!({"node-name": "x"}));
    quit(vm, qmp);
    l.activate_all().unwrap();
    assert_eq!(ofd_lock_bytes(&img), qemu_bytes);
    node.write_at(0, &[1]).unwrap();

    // locking=off takes nothing, as in QEMU.
    let l2 = BlockLayer::new();
    l2.blockdev_add(
        &json!({"driver": "qcow2", "node-name": "u", "read-only": true,
        "file": {"driver": "file", "filename": p, "locking": "off"}}),
    )
    .unwrap();
    assert_eq!(ofd_lock_bytes(&img), qemu_bytes);
    l2.close_all().unwrap();
    drop(node);
    l.close_all().unwrap();
    assert!(ofd_lock_bytes(&img).is_empty());
    check_clean(&img);
}

/// Everything about the node's bitmaps a client or the migration engine can see, in list
/// order.
/// (name, sha256, count, granularity, enabled, persistent, inconsistent, skip_store).
type FullState = (String, String, u64, u32, bool, bool, bool, bool);

fn full_state(node: &block::BlockNode) -> Vec<FullState> {
    node.bitmaps()
        .named()
        .map(|b| {
            (
                b.name().unwrap().to_string(),
                b.sha256_hex(),
                b.count(),
                b.granularity(),
                b.enabled(),
                b.persistent(),
                b.inconsistent(),
                b.skip_store(),
            )
        })
        .collect()
}

#[test]
fn inactivation_and_activation_keep_bitmaps_in_memory_and_on_disk() {
    if !have_qemu("inactivation_and_activation_keep_bitmaps_in_memory_and_on_disk") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("c.qcow2");
    let p = img.to_str().unwrap();
    create(&img, "4M", &[]);
    ok("qemu-img", &["bitmap", "--add", p, "stored"]);
    ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "4096", "--disable", p, "cold"],
    );
    ok("qemu-img", &["bitmap", "--add", p, "doomed"]);
    qemu_io(&img, &["write 0 64k"]);
    let l = BlockLayer::new();
    let node = open(&l, &img, "d0");
    // A bitmap added while active, one removed while active, one a migration carries away.
    l.block_dirty_bitmap_add("d0", "added", Some(512), Some(true), None)
        .unwrap();
    l.block_dirty_bitmap_add("d0", "migrating", None, Some(true), None)
        .unwrap();
    l.block_dirty_bitmap_remove("d0", "doomed").unwrap();
    assert!(
        !info_bitmaps(&img).iter().any(|b| b.0 == "doomed"),
        "removed from the image at once"
    );
    node.write_at(1 << 20, &[7u8; 3000]).unwrap();
    node.write_zeroes(3 << 20, 70000, false).unwrap();
    node.bitmaps()
        .find_mut("migrating")
        .unwrap()
        .set_skip_store(true);
    let before = full_state(&node);
    let contents = read_all(&node, 4 << 20);

    l.inactivate_all().unwrap();
    assert!(node.is_inactive());
    // On disk: stored bitmaps are clean (not in use), the migrating one was not stored.
    assert_eq!(
        info_bitmaps(&img),
        vec![
            ("added".into(), 512, vec!["auto".into()]),
            ("cold".into(), 4096, vec![]),
            ("stored".into(), 65536, vec!["auto".into()]),
        ]
    );
    check_clean(&img);
    // QEMU sees the stored bitmaps with the bits we had.
    let (vm, mut qmp) = start_qemu(
        dir.path(),
        "c",
        &[format!(
            "{},read-only=on,force-share=on",
            qemu_blockdev(&img, "d0")
        )],
    );
    let theirs = qemu_view(&mut qmp, "d0");
    quit(vm, qmp);
    let ours_stored: Vec<(String, String, u64)> = before
        .iter()
        .filter(|b| b.0 != "migrating")
        .map(|b| (b.0.clone(), b.1.clone(), b.2))
        .collect();
    let mut theirs_stored: Vec<(String, String, u64)> = theirs
        .iter()
        .map(|b| (b.0.clone(), b.1.clone(), b.2))
        .collect();
    let mut sorted = ours_stored.clone();
    sorted.sort();
    theirs_stored.sort();
    assert_eq!(theirs_stored, sorted);

    // Reactivated (a cancelled migration): the same bitmaps, in the same order, skip_store
    // cleared; the image marks them in use again.
    l.activate_all().unwrap();
    let after = full_state(&node);
    let mut expect = before.clone();
    for b in &mut expect {
        b.7 = false;
    }
    assert_eq!(after, expect);
    assert!(read_all(&node, 4 << 20) == contents);
    assert!(info_bitmaps(&img)
        .iter()
        .all(|b| b.2.contains(&"in-use".to_string())));
    // A second cycle, then close: everything, the once-migrating bitmap included, is stored.
    l.inactivate_all().unwrap();
    l.activate_all().unwrap();
    assert_eq!(full_state(&node), expect);
    drop(node);
    l.close_all().unwrap();
    check_clean(&img);
    let names: Vec<String> = info_bitmaps(&img).into_iter().map(|b| b.0).collect();
    assert_eq!(names, ["added", "cold", "migrating", "stored"]);
}

/// The message `qemu-img info` gives for an image it cannot open.
fn qemu_open_error(path: &Path) -> String {
    let o = run("qemu-img", &["info", path.to_str().unwrap()]);
    assert!(!o.status.success(), "QEMU opened {}", path.display());
    let e = stderr_of(&o);
    let prefix = format!("qemu-img: Could not open '{}': ", path.display());
    e.lines()
        .next()
        .and_then(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("unexpected qemu-img output: {e}"))
        .to_string()
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

#[test]
fn corrupt_images_get_qemus_messages() {
    if !have_qemu("corrupt_images_get_qemus_messages") {
        return;
    }
    use block::driver::qcow2::header::Header;
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    let bp = base.to_str().unwrap();
    create(&base, "4M", &[]);
    ok("qemu-img", &["bitmap", "--add", bp, "b0"]);
    qemu_io(&base, &["write 0 64k"]);
    let head = std::fs::read(&base).unwrap();
    let hdr = Header::parse(&head[..65536]).unwrap();
    let ext = hdr.bitmaps.unwrap();
    let dir_off = ext.dir_offset;
    let table_off = u64::from_be_bytes(
        head[dir_off as usize..dir_off as usize + 8]
            .try_into()
            .unwrap(),
    );
    // Where the extension's fields sit in the header.
    let ext_pos = head
        .windows(4)
        .position(|w| w == [0x23, 0x85, 0x28, 0x75])
        .unwrap() as u64;

    type Patches = Vec<(u64, Vec<u8>)>;
    let cases: Vec<(&str, Patches)> = vec![
        ("reserved-flag", vec![(dir_off + 15, vec![0x06])]),
        ("bad-type", vec![(dir_off + 16, vec![2])]),
        ("bad-granularity", vec![(dir_off + 17, vec![40])]),
        ("extra-data", vec![(dir_off + 23, vec![8])]),
        ("table-entry-reserved", vec![(table_off + 7, vec![0x02])]),
        ("table-entry-unaligned", vec![(table_off + 6, vec![0x02])]),
        ("more-bitmaps", vec![(ext_pos + 8 + 3, vec![2])]),
        ("ext-length", vec![(ext_pos + 4 + 3, vec![16])]),
        ("ext-reserved", vec![(ext_pos + 8 + 7, vec![1])]),
        ("dir-offset", vec![(ext_pos + 8 + 23, vec![8])]),
        ("dir-size-zero", vec![(ext_pos + 8 + 15, vec![0])]),
        ("incompatible-feature", vec![(79, vec![0x40])]),
        ("table-size", vec![(dir_off + 11, vec![2])]),
    ];
    for (name, patches) in cases {
        let img = dir.path().join(format!("{name}.qcow2"));
        std::fs::copy(&base, &img).unwrap();
        for (off, bytes) in &patches {
            patch(&img, *off, bytes);
        }
        let expected = qemu_open_error(&img);
        let l = BlockLayer::new();
        let e = l.blockdev_add(&qcow2_opts(&img, "d0")).unwrap_err();
        assert_eq!(e.to_string(), expected, "{name}");
        assert!(l.nodes().is_empty(), "{name}: nothing left open");
        assert!(ofd_lock_bytes(&img).is_empty(), "{name}: no lock left");
    }

    // An entry left in use (a crash): it opens, the bitmap is inconsistent and disabled on
    // both sides, and only removal is allowed.
    let img = dir.path().join("in-use.qcow2");
    std::fs::copy(&base, &img).unwrap();
    patch(&img, dir_off + 15, &[0x03]);
    let (vm, mut qmp) = start_qemu(
        dir.path(),
        "iu",
        &[format!("{},read-only=on", qemu_blockdev(&img, "d0"))],
    );
    let theirs = qemu_view(&mut qmp, "d0");
    quit(vm, qmp);
    let l = BlockLayer::new();
    let node = open(&l, &img, "d0");
    let ours = our_view(&l, "d0");
    assert_eq!(ours, theirs);
    assert!(
        ours[0].6 && !ours[0].4,
        "inconsistent and not recording: {ours:?}"
    );
    assert_eq!(
        l.block_dirty_bitmap_clear("d0", "b0")
            .unwrap_err()
            .to_string(),
        "Bitmap 'b0' is inconsistent and cannot be used"
    );
    node.write_at(0, &[1]).unwrap();
    // Closing keeps it in use; removing it frees its clusters.
    drop(node);
    l.close_all().unwrap();
    assert_eq!(
        info_bitmaps(&img)[0].2,
        vec!["in-use".to_string(), "auto".to_string()]
    );
    check_clean(&img);
    let l = BlockLayer::new();
    let _n = open(&l, &img, "d0");
    l.block_dirty_bitmap_remove("d0", "b0").unwrap();
    drop(_n);
    l.close_all().unwrap();
    assert!(info_bitmaps(&img).is_empty());
    check_clean(&img);
}

#[test]
fn backing_files_read_through_and_copy_on_write() {
    if !have_qemu("backing_files_read_through_and_copy_on_write") {
        return;
    }
    let dir = tmp();
    // qcow2 base (shorter than the overlay) with data; raw base for a second chain.
    let base = dir.path().join("base.qcow2");
    create(&base, "3M", &["cluster_size=4096"]);
    qemu_io(
        &base,
        &[
            "write -P 0xb1 0 1M",
            "write -P 0xb2 1536k 700000",
            "write -z 64k 8k",
        ],
    );
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, vec![0xc3u8; 2 << 20]).unwrap();
    for (b, fmt) in [(&base, "qcow2"), (&raw, "raw")] {
        let base_bytes = std::fs::read(b).unwrap();
        let top = dir.path().join(format!("top-{fmt}.qcow2"));
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=65536",
                "-b",
                b.file_name().unwrap().to_str().unwrap(),
                "-F",
                fmt,
                top.to_str().unwrap(),
                "4M",
            ],
        );
        qemu_io(&top, &["write -P 0xd4 2M 1000"]);
        let l = BlockLayer::new();
        let node = open(&l, &top, "top");
        let q = l.query_named_block_nodes(false);
        let topinfo = q
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "top")
            .unwrap();
        assert_eq!(topinfo["backing_file_depth"], 1, "{topinfo}");
        let mut model = qemu_contents(&top);
        assert!(
            read_all(&node, 4 << 20) == model,
            "{fmt}: reads through the backing file"
        );
        // Partial writes copy the rest of the cluster from the backing file; zeroes and
        // discards hide it.
        random_io(&node, &mut model, 65536, &mut SplitMix(11), 120);
        assert!(read_all(&node, 4 << 20) == model, "{fmt}: after writes");
        drop(node);
        l.close_all().unwrap();
        check_clean(&top);
        assert!(
            qemu_contents(&top) == model,
            "{fmt}: QEMU reads what we wrote"
        );
        assert!(
            std::fs::read(b).unwrap() == base_bytes,
            "{fmt}: the backing file is untouched"
        );
    }
    // `"backing": null` opens the overlay alone.
    let top = dir.path().join("top-qcow2.qcow2");
    let l = BlockLayer::new();
    let node = l
        .blockdev_add(
            &json!({"driver": "qcow2", "node-name": "alone", "backing": null,
            "file": {"driver": "file", "filename": top.to_str().unwrap()}}),
        )
        .unwrap();
    assert_eq!(l.nodes().len(), 2, "no backing node");
    let out = dir.path().join("alone.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            "--image-opts",
            &format!(
                "driver=qcow2,file.driver=file,file.filename={},backing=",
                top.display()
            ),
            out.to_str().unwrap(),
        ],
    );
    assert!(read_all(&node, 4 << 20) == std::fs::read(&out).unwrap());
    drop(node);
    l.close_all().unwrap();
    check_clean(&top);
}

#[test]
fn growing_an_image_keeps_data_and_bitmaps() {
    if !have_qemu("growing_an_image_keeps_data_and_bitmaps") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("g.qcow2");
    // 512-byte clusters: 64 entries per L2 table, so growing needs a bigger L1 table.
    create(&img, "1M", &["cluster_size=512"]);
    let l = BlockLayer::new();
    let node = open(&l, &img, "d0");
    l.block_dirty_bitmap_add("d0", "b", Some(4096), Some(true), None)
        .unwrap();
    node.write_at(1000, &[0xaa; 5000]).unwrap();
    node.truncate(40 << 20).unwrap();
    node.write_at((40 << 20) - 700, &[0xbb; 700]).unwrap();
    assert_eq!(node.size().unwrap(), 40 << 20);
    let view = our_view(&l, "d0");
    drop(node);
    l.close_all().unwrap();
    check_clean(&img);
    assert_eq!(info(&img)["virtual-size"], 40 << 20);
    let data = qemu_contents(&img);
    assert!(data[1000..6000].iter().all(|&b| b == 0xaa));
    assert!(data[(40 << 20) - 700..].iter().all(|&b| b == 0xbb));
    let (vm, mut qmp) = start_qemu(dir.path(), "g", &[qemu_blockdev(&img, "d0")]);
    assert_eq!(qemu_view(&mut qmp, "d0"), view);
    quit(vm, qmp);
}

#[test]
fn shared_storage_hand_over_between_two_layers() {
    if !have_qemu("shared_storage_hand_over_between_two_layers") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("s.qcow2");
    create(&img, "4M", &[]);
    // Source.
    let src = BlockLayer::new();
    let s = open(&src, &img, "d0");
    src.block_dirty_bitmap_add("d0", "stays", None, Some(true), None)
        .unwrap();
    src.block_dirty_bitmap_add("d0", "moves", Some(4096), Some(true), None)
        .unwrap();
    s.write_at(0, &[1u8; 70000]).unwrap();
    // Destination: opened inactive (-incoming) while the source runs — no lock taken.
    let dst = BlockLayer::new();
    dst.set_incoming(true);
    let d = open(&dst, &img, "d0");
    assert!(d.is_inactive());
    assert!(
        d.bitmaps().named().next().is_none(),
        "nothing loaded while inactive"
    );
    // Switchover: "moves" travels in the stream (skip_store), "stays" through the image.
    let moved = {
        let mut l = s.bitmaps();
        let b = l.find_mut("moves").unwrap();
        b.set_skip_store(true);
        b.hbitmap().clone()
    };
    src.inactivate_all().unwrap();
    {
        let mut l = d.bitmaps();
        let id = l.create(4096, Some("moves")).unwrap();
        let b = l.get_mut(id).unwrap();
        b.set_persistent(true);
        *b.hbitmap_mut() = moved.clone();
    }
    dst.activate_all().unwrap();
    let names: Vec<String> = d
        .bitmaps()
        .named()
        .map(|b| b.name().unwrap().to_string())
        .collect();
    assert_eq!(names, ["stays", "moves"]);
    assert_eq!(d.bitmaps().find("moves").unwrap().hbitmap(), &moved);
    assert_eq!(d.bitmaps().find("stays").unwrap().count(), 131072);
    // The source cannot take it back now.
    assert_eq!(
        src.activate_all().unwrap_err().to_string(),
        "Failed to get \"write\" lock"
    );
    d.write_at(1 << 20, &[2u8; 10]).unwrap();
    drop((s, d));
    dst.close_all().unwrap();
    src.close_all().unwrap();
    check_clean(&img);
    assert_eq!(
        info_bitmaps(&img),
        vec![
            ("moves".into(), 4096, vec!["auto".into()]),
            ("stays".into(), 65536, vec!["auto".into()]),
        ]
    );
}

#[test]
fn damaged_images_never_panic() {
    if !have_qemu("damaged_images_never_panic") {
        return;
    }
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    let bp = base.to_str().unwrap();
    create(&base, "2M", &["cluster_size=4096"]);
    ok("qemu-img", &["bitmap", "--add", bp, "b0"]);
    ok("qemu-img", &["bitmap", "--add", "-g", "512", bp, "b1"]);
    qemu_io(&base, &["write -P 1 0 300k", "write -P 2 1M 5000"]);
    let good = std::fs::read(&base).unwrap();
    let img = dir.path().join("x.qcow2");
    let mut rng = SplitMix(99);
    let mut opened = 0;
    for iter in 0..80 {
        let mut bytes = good.clone();
        // Damage a few bytes of the metadata area (header, tables, directory).
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len().min(0x20000) as u64) as usize;
            bytes[at] = rng.next_u64() as u8;
        }
        std::fs::write(&img, &bytes).unwrap();
        let l = BlockLayer::new();
        if let Ok(node) = l.blockdev_add(&qcow2_opts(&img, "d0")) {
            opened += 1;
            let mut buf = vec![0u8; 2 << 20];
            let _ = node.read_at(0, &mut buf);
            let _ = node.write_at(4096 * rng.below(500), &[9u8; 6000]);
            let _ = node.discard(0, 65536);
            let _ = l.block_dirty_bitmap_add("d0", "new", None, Some(true), None);
            if iter % 4 == 0 {
                let _ = l.inactivate_all();
                let _ = l.activate_all();
            }
            drop(node);
        }
        let _ = l.close_all();
    }
    assert!(opened > 0, "some damage is harmless");
}

/// `blockdev-reopen` both ways, as QEMU 7.2's iotests 165 and remove-bitmap-from-backing use
/// it: a read-only image keeps its persistent bitmap readonly and takes no write lock; reopened
/// read-write it takes the lock, marks the bitmap in use in the image, records writes and lets
/// the bitmap be removed; reopened read-only again it stores the bitmap (not in use, as
/// `qemu-img` sees it), drops the write lock and refuses writes. Options that cannot change
/// get QEMU's messages, and a failed request changes nothing.
#[test]
fn reopen_read_only_and_back() {
    if !have_qemu("reopen_read_only_and_back") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("r.qcow2");
    let p = img.to_str().unwrap();
    create(&img, "4M", &[]);
    ok("qemu-img", &["bitmap", "--add", p, "b0"]);
    ok("qemu-img", &["bitmap", "--add", p, "b1"]);
    let l = BlockLayer::new();
    let opts = |ro: bool| {
        json!({"node-name": "n0", "driver": "qcow2", "read-only": ro,
               "file": {"driver": "file", "filename": p}})
    };
    let node = l.blockdev_add(&opts(true)).unwrap();
    let reopen = |v: Value| l.blockdev_reopen(&[v]).map_err(|e| e.to_string());
    let readonly = "Bitmap 'b0' is readonly and cannot be modified";
    assert_eq!(
        l.block_dirty_bitmap_remove("n0", "b0")
            .unwrap_err()
            .to_string(),
        readonly
    );
    assert!(node.write_at(0, &[1u8; 512]).is_err());
    assert!(!ofd_lock_bytes(&img).contains(&101), "no write lock");

    // Refusals, each changing nothing.
    assert_eq!(
        reopen(json!({"driver": "qcow2", "file": {"driver": "file", "filename": p}})),
        Err("node-name not specified".into())
    );
    assert_eq!(
        reopen(json!({"node-name": "nx", "driver": "qcow2", "file": "f"})),
        Err("Failed to find node with node-name='nx'".into())
    );
    let other = dir.path().join("other.qcow2");
    create(&other, "4M", &[]);
    assert_eq!(
        reopen(
            json!({"node-name": "n0", "driver": "qcow2", "read-only": false,
                      "file": {"driver": "file", "filename": other.to_str().unwrap()}})
        ),
        Err("Cannot change the option 'filename'".into())
    );
    assert_eq!(
        reopen(
            json!({"node-name": "n0", "driver": "raw", "file": {"driver": "file", "filename": p}})
        ),
        Err("Cannot change the option 'driver'".into())
    );
    assert!(node.read_only() && !node.writable());

    // Read-write.
    reopen(opts(false)).unwrap();
    assert!(!node.read_only() && node.writable());
    assert!(ofd_lock_bytes(&img).contains(&101), "the write lock");
    assert_eq!(
        info_bitmaps(&img),
        vec![
            ("b0".into(), 65536, vec!["in-use".into(), "auto".into()]),
            ("b1".into(), 65536, vec!["in-use".into(), "auto".into()]),
        ]
    );
    node.write_at(1 << 20, &[7u8; 4096]).unwrap();
    let sha = l.x_debug_block_dirty_bitmap_sha256("n0", "b0").unwrap();
    l.block_dirty_bitmap_remove("n0", "b1").unwrap();
    assert_eq!(info_bitmaps(&img).len(), 1, "b1 left the image at once");

    // Read-only again: b0 stored with what it recorded, the lock gone, writes refused.
    reopen(opts(true)).unwrap();
    assert!(node.read_only() && !node.writable());
    assert!(!ofd_lock_bytes(&img).contains(&101), "no write lock");
    assert_eq!(
        info_bitmaps(&img),
        vec![("b0".into(), 65536, vec!["auto".into()])]
    );
    check_clean(&img);
    assert!(node.write_at(0, &[1u8; 512]).is_err());
    assert_eq!(
        l.block_dirty_bitmap_remove("n0", "b0")
            .unwrap_err()
            .to_string(),
        readonly
    );
    assert_eq!(
        l.x_debug_block_dirty_bitmap_sha256("n0", "b0").unwrap(),
        sha
    );
    drop(node);
    l.close_all().unwrap();
    // QEMU reads the bits b0 recorded.
    let out = ok("qemu-img", &["info", "-U", "--output=json", p]);
    assert!(out.contains("\"b0\""), "{out}");

    // A node with a backing file must name it.
    let base = dir.path().join("base.qcow2");
    create(&base, "4M", &[]);
    let top = dir.path().join("top.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
            "4M",
        ],
    );
    let l = BlockLayer::new();
    l.blockdev_add(&json!({"node-name": "top", "driver": "qcow2",
        "file": {"driver": "file", "filename": top.to_str().unwrap()}}))
        .unwrap();
    assert_eq!(
        l.blockdev_reopen(&[
            json!({"node-name": "top", "driver": "qcow2", "read-only": true,
            "file": {"driver": "file", "filename": top.to_str().unwrap()}})
        ])
        .unwrap_err()
        .to_string(),
        "backing is missing for 'top'"
    );
}

/// `blockdev-snapshot-sync` and `blockdev-snapshot`, as QEMU 7.2's iotests
/// backing-file-invalidation and 234 use them: the overlay image is created backed by the
/// node's image (QEMU reads the chain back), reads fall through to the old image, writes stay
/// in the overlay, and a BlockBackend moves to the overlay; QEMU's refusals.
#[test]
fn snapshots_put_an_overlay_on_top() {
    if !have_qemu("snapshots_put_an_overlay_on_top") {
        return;
    }
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    let over = dir.path().join("over.qcow2");
    create(&base, "4M", &[]);
    qemu_io(&base, &["write -P 0x11 0 64k"]);
    let l = BlockLayer::new();
    l.blockdev_add(&qcow2_opts(&base, "n0")).unwrap();
    let drive = |id: &str, options: Value| block::DriveSpec {
        id: id.into(),
        interface: block::DriveInterface::None,
        options,
        backing_node_name: None,
    };
    l.drive_add(&drive(
        "disk9",
        json!({"driver": "null-co", "node-name": "spare"}),
    ))
    .unwrap();
    let sync = |file: &Path, name: &str| block::SnapshotSync {
        node_name: Some("n0".into()),
        snapshot_file: file.to_str().unwrap().into(),
        snapshot_node_name: Some(name.into()),
        ..Default::default()
    };
    assert_eq!(
        l.blockdev_snapshot_sync(&sync(&over, "n0"))
            .unwrap_err()
            .to_string(),
        "New overlay node-name already in use"
    );
    l.blockdev_snapshot_sync(&sync(&over, "ov")).unwrap();
    let chain: Vec<String> = serde_json::from_str::<Value>(&ok(
        "qemu-img",
        &[
            "info",
            "-U",
            "--backing-chain",
            "--output=json",
            over.to_str().unwrap(),
        ],
    ))
    .unwrap()
    .as_array()
    .unwrap()
    .iter()
    .map(|i| i["filename"].as_str().unwrap().to_string())
    .collect();
    assert_eq!(
        chain,
        [over.to_str().unwrap(), base.to_str().unwrap()],
        "the overlay's chain as QEMU reads it"
    );
    let ov = l.node("ov").unwrap();
    let mut buf = vec![0u8; 4096];
    ov.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11), "reads fall through");
    ov.write_at(0, &[0x22u8; 4096]).unwrap();
    let n0 = l.node("n0").unwrap();
    n0.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11), "the old image is untouched");
    assert_eq!(
        l.blockdev_snapshot("n0", "ov").unwrap_err().to_string(),
        "The overlay already has a backing image"
    );
    assert_eq!(
        l.blockdev_snapshot("n0", "spare").unwrap_err().to_string(),
        "The overlay is already in use"
    );
    assert_eq!(
        l.blockdev_snapshot("nope", "ov").unwrap_err().to_string(),
        "Cannot find device='nope' nor node-name='nope'"
    );
    drop((ov, n0));
    l.close_all().unwrap();
    check_clean(&over);

    // blockdev-snapshot: an overlay opened without a backing file gets one, and the
    // BlockBackend moves to it.
    let top = dir.path().join("top.qcow2");
    create(&top, "4M", &[]);
    let l = BlockLayer::new();
    l.drive_add(&drive("disk0", qcow2_opts(&base, "b0")))
        .unwrap();
    let mut t = qcow2_opts(&top, "t0");
    t["backing"] = Value::Null;
    l.blockdev_add(&t).unwrap();
    l.blockdev_snapshot("disk0", "t0").unwrap();
    let t0 = l.node("t0").unwrap();
    t0.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11), "reads fall through");
    let blk = l.query_block();
    assert_eq!(blk[0]["device"], "disk0", "{blk}");
    assert_eq!(blk[0]["inserted"]["node-name"], "t0", "{blk}");
}

/// `-drive` without `format=` probes the image as QEMU 7.2 does: a qcow2 image by its header
/// (its backing chain read through it), anything without a known header as raw — whose first
/// sector then cannot be rewritten into another format's header (`EPERM`, QEMU's
/// `raw_co_pwritev`) while any other write goes through; an image of a format livemig does not
/// open is refused by name, not opened as raw.
#[test]
fn drives_without_a_format_are_probed() {
    if !have_qemu("drives_without_a_format_are_probed") {
        return;
    }
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let raw = dir.path().join("disk.img");
    let qed = dir.path().join("disk.qed");
    create(&base, "1M", &[]);
    qemu_io(&base, &["write -P 0x11 0 64k"]);
    create(
        &top,
        "1M",
        &[&format!(
            "backing_file={},backing_fmt=qcow2",
            base.display()
        )],
    );
    ok(
        "qemu-img",
        &["create", "-f", "raw", raw.to_str().unwrap(), "1M"],
    );
    ok(
        "qemu-img",
        &["create", "-f", "qed", qed.to_str().unwrap(), "1M"],
    );
    let l = BlockLayer::new();
    let drive = |id: &str, file: &Path| {
        block::parse_drive(&format!("if=none,id={id},file={}", file.display()), 0).unwrap()
    };

    let q = l.drive_add(&drive("q", &top)).unwrap();
    assert_eq!(q.driver_name(), "qcow2");
    let mut buf = vec![0u8; 4096];
    q.read_at(0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x11),
        "read through the backing file"
    );

    let r = l.drive_add(&drive("r", &raw)).unwrap();
    assert_eq!(r.driver_name(), "raw");
    let mut header = vec![0u8; 512];
    header[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    assert_eq!(
        r.write_at(0, &header).unwrap_err().to_string(),
        "Operation not permitted"
    );
    // Four bytes into the first sector are enough when they complete a header.
    assert_eq!(
        r.write_at(0, b"QFI\xfb").map_err(|e| e.to_string()),
        Ok(()),
        "version 0 is no qcow2 header"
    );
    assert_eq!(
        r.write_at(4, b"\0\0\0\x02").unwrap_err().to_string(),
        "Operation not permitted"
    );
    r.write_at(0, &[0x5au8; 4096]).unwrap();
    r.write_at(512, &header).unwrap();
    let mut back = vec![0u8; 1024];
    r.read_at(0, &mut back).unwrap();
    assert!(back[..512].iter().all(|&b| b == 0x5a));
    assert_eq!(&back[512..520], b"QFI\xfb\0\0\0\x03");
    // A raw image named as raw has no such restriction.
    let named = l
        .drive_add(
            &block::parse_drive(
                &format!("if=none,id=n,format=raw,file={}", raw.display()),
                0,
            )
            .unwrap(),
        )
        .unwrap_err();
    assert!(
        named.to_string().contains("lock"),
        "the probed drive holds the image: {named}"
    );

    let e = l.drive_add(&drive("e", &qed)).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "Could not open '{}': its format was probed as 'qed', which livemig does not \
             open (it opens qcow2 and raw)",
            qed.display()
        )
    );
    assert!(l.lookup_bs(Some("e"), None).is_err());
}

/// A raw image named as `format=raw` may get any first sector (QEMU restricts only probed
/// images).
#[test]
fn a_named_raw_format_may_write_any_first_sector() {
    let dir = tmp();
    let raw = dir.path().join("disk.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let l = BlockLayer::new();
    let r = l
        .drive_add(
            &block::parse_drive(
                &format!("if=none,id=n,format=raw,file={}", raw.display()),
                0,
            )
            .unwrap(),
        )
        .unwrap();
    r.write_at(0, b"QFI\xfb\0\0\0\x03").unwrap();
}

/// A data write that fails (the file has no room: here a `raw` window over the image, which
/// refuses writes past its end with ENOSPC, as QEMU's does) gives back the cluster it had
/// allocated, as QEMU's `qcow2_alloc_cluster_abort`: the image has no leak afterwards, and
/// what was written before reads back. Before, each failed write leaked one cluster.
#[test]
fn a_failed_data_write_leaks_no_cluster() {
    if !have_qemu("a_failed_data_write_leaks_no_cluster") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("a.qcow2");
    create(&img, "4M", &[]);
    let cs = 64u64 << 10;
    // Room for one L2 table and one data cluster beyond the image as created. The file is
    // longer than the window: `qemu-img check` looks for leaks only within the file.
    let room = std::fs::metadata(&img).unwrap().len().next_multiple_of(cs) + 2 * cs;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(room + 4 * cs)
        .unwrap();
    let l = BlockLayer::new();
    let node = l
        .blockdev_add(&json!({"driver": "qcow2", "node-name": "q",
            "file": {"driver": "raw", "size": room,
                     "file": {"driver": "file", "filename": img.to_str().unwrap()}}}))
        .unwrap();
    node.write_at(0, &vec![0x11u8; cs as usize]).unwrap();
    for _ in 0..3 {
        assert_eq!(
            node.write_at(cs, &vec![0x22u8; cs as usize])
                .unwrap_err()
                .to_string(),
            "No space left on device"
        );
    }
    assert_eq!(read_all(&node, 2 * cs as usize), {
        let mut v = vec![0x11u8; cs as usize];
        v.resize(2 * cs as usize, 0);
        v
    });
    drop(node);
    l.blockdev_del("q").unwrap();
    check_clean(&img);
}
