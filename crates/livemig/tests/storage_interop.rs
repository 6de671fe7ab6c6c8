//! Storage copied over NBD between QEMU 7.2 and livemig, both ways: QEMU's mirror writes into
//! livemig's NBD export, and livemig's mirror writes into QEMU's NBD export. Each side opens
//! the other's export with its own `nbd` block driver (`blockdev-add`), mirrors a patterned
//! raw image with `sync=full`, ends the job after `BLOCK_JOB_READY`, and the target image must
//! equal the source image.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::{QmpClient, VmProcess};

const TIMEOUT: Duration = Duration::from_secs(30);
const SIZE: usize = 8 << 20;

fn images(dir: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("src.img");
    let dst = dir.join("dst.img");
    let data: Vec<u8> = (0..SIZE)
        .map(|i| ((i * 31) % 255) as u8 ^ (i >> 12) as u8)
        .collect();
    std::fs::write(&src, data).unwrap();
    std::fs::write(&dst, vec![0u8; SIZE]).unwrap();
    (src, dst)
}

fn raw_args(img: &Path) -> Vec<String> {
    vec![
        "-blockdev".into(),
        json!({"driver": "raw", "node-name": "d0",
               "file": {"driver": "file", "filename": img.to_str().unwrap()}})
        .to_string(),
    ]
}

fn livemig(dir: &Path, img: &Path) -> (VmProcess, QmpClient) {
    let mut args: Vec<String> = ["vm", "-M", "none", "-m", "16M"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(raw_args(img));
    let mut p = VmProcess::spawn(env!("CARGO_BIN_EXE_livemig"), &args, dir, "lm").unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !p.qmp_path.exists() {
        assert!(p.alive(), "livemig exited: {}", p.log());
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let q = p.qmp();
    (p, q)
}

fn export(q: &mut QmpClient, sock: &Path) {
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
    q.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
}

fn mirror_into(q: &mut QmpClient, sock: &Path, end_with: &str) {
    q.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "remote", "export": "d0",
               "server": {"type": "unix", "path": sock.to_str().unwrap()}}),
    );
    q.ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "d0", "target": "remote", "sync": "full"}),
    );
    let ready = q
        .wait_event(TIMEOUT, |e| e["event"] == "BLOCK_JOB_READY")
        .expect("no BLOCK_JOB_READY");
    assert_eq!(ready["data"]["len"], SIZE as u64);
    q.ok(end_with, json!({"device": "m0"}));
    let done = q
        .wait_event(TIMEOUT, |e| e["event"] == "BLOCK_JOB_COMPLETED")
        .expect("no BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], Value::from(SIZE as u64));
}

fn same_files(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    let differing = x.iter().zip(&y).filter(|(p, q)| p != q).count();
    assert_eq!(differing, 0, "{} and {} differ", a.display(), b.display());
}

#[test]
fn qemu_mirrors_into_a_livemig_export() {
    if !testkit::require("qemu_mirrors_into_a_livemig_export", testkit::qemu()) {
        return;
    }
    let dir = testkit::tempdir();
    let (src, dst) = images(dir.path());
    let (_lp, mut lm) = livemig(dir.path(), &dst);
    let sock = dir.path().join("lm-nbd.sock");
    export(&mut lm, &sock);
    let qp = VmProcess::qemu_none(dir.path(), "qemu", &raw_args(&src)).unwrap();
    let mut q = qp.qmp();
    mirror_into(&mut q, &sock, "block-job-cancel");
    same_files(&src, &dst);
    lm.ok("nbd-server-stop", json!({}));
}

#[test]
fn livemig_mirrors_into_a_qemu_export() {
    if !testkit::require("livemig_mirrors_into_a_qemu_export", testkit::qemu()) {
        return;
    }
    let dir = testkit::tempdir();
    let (src, dst) = images(dir.path());
    let qp = VmProcess::qemu_none(dir.path(), "qemu", &raw_args(&dst)).unwrap();
    let mut q = qp.qmp();
    let sock = dir.path().join("qemu-nbd.sock");
    export(&mut q, &sock);
    let (_lp, mut lm) = livemig(dir.path(), &src);
    mirror_into(&mut lm, &sock, "block-job-complete");
    same_files(&src, &dst);
    q.ok("nbd-server-stop", json!({}));
}

fn wait_migration(q: &mut QmpClient, who: &str) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = q.ok("query-migrate", json!({}));
        let s = r["status"].as_str().unwrap_or_default().to_string();
        if ["completed", "failed", "cancelled"].contains(&s.as_str()) {
            return r;
        }
        assert!(Instant::now() < deadline, "{who}: migration stuck: {r}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A whole migration without shared storage between livemig and QEMU: the destination exports
/// its empty disk, the source mirrors into it, pauses before switchover, ends the mirror and
/// continues; the destination's image then equals the source's.
fn migrate_with_storage(qemu_is_source: bool) {
    let dir = testkit::tempdir();
    let (src, dst) = images(dir.path());
    let mig = format!("unix:{}", dir.path().join("mig.sock").display());
    let nbd_sock = dir.path().join("dst-nbd.sock");
    let mut dst_args = raw_args(&dst);
    dst_args.extend(["-m".into(), "16M".into(), "-incoming".into(), mig.clone()]);
    let (_dp, mut d, _sp, mut s);
    if qemu_is_source {
        let mut args: Vec<String> = ["vm", "-M", "none"].iter().map(|s| s.to_string()).collect();
        args.extend(dst_args);
        let mut p =
            VmProcess::spawn(env!("CARGO_BIN_EXE_livemig"), &args, dir.path(), "lm").unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !p.qmp_path.exists() {
            assert!(p.alive(), "livemig exited: {}", p.log());
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        d = p.qmp();
        _dp = p;
        let mut sa = raw_args(&src);
        sa.extend(["-m".into(), "16M".into()]);
        let p = VmProcess::qemu_none(dir.path(), "qemu", &sa).unwrap();
        s = p.qmp();
        _sp = p;
    } else {
        let p = VmProcess::qemu_none(dir.path(), "qemu", &dst_args).unwrap();
        d = p.qmp();
        _dp = p;
        let (p, q) = livemig(dir.path(), &src);
        s = q;
        _sp = p;
    }
    export(&mut d, &nbd_sock);
    s.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    s.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "remote", "export": "d0",
               "server": {"type": "unix", "path": nbd_sock.to_str().unwrap()}}),
    );
    s.ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "d0", "target": "remote", "sync": "full"}),
    );
    s.wait_event(TIMEOUT, |e| e["event"] == "BLOCK_JOB_READY")
        .expect("no BLOCK_JOB_READY");
    s.ok("migrate", json!({"uri": mig}));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = s.ok("query-migrate", json!({}));
        if r["status"] == "pre-switchover" {
            break;
        }
        assert!(Instant::now() < deadline, "no pre-switchover: {r}");
        std::thread::sleep(Duration::from_millis(10));
    }
    s.ok("block-job-cancel", json!({"device": "m0"}));
    let done = s
        .wait_event(TIMEOUT, |e| e["event"] == "BLOCK_JOB_COMPLETED")
        .expect("no BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    s.ok("migrate-continue", json!({"state": "pre-switchover"}));
    let r = wait_migration(&mut s, "source");
    assert_eq!(r["status"], "completed", "{r}");
    let r = wait_migration(&mut d, "destination");
    assert_eq!(r["status"], "completed", "{r}");
    d.ok("nbd-server-stop", json!({}));
    same_files(&src, &dst);
}

#[test]
fn qemu_migrates_its_storage_to_livemig() {
    if !testkit::require("qemu_migrates_its_storage_to_livemig", testkit::qemu()) {
        return;
    }
    migrate_with_storage(true);
}

#[test]
fn livemig_migrates_its_storage_to_qemu() {
    if !testkit::require("livemig_migrates_its_storage_to_qemu", testkit::qemu()) {
        return;
    }
    migrate_with_storage(false);
}

#[test]
fn a_blockdev_on_the_command_line_can_be_an_nbd_export() {
    let dir = testkit::tempdir();
    let (src, _dst) = images(dir.path());
    let (_ep, mut exporter) = livemig(dir.path(), &src);
    let sock = dir.path().join("lm-nbd.sock");
    export(&mut exporter, &sock);
    let blockdev = json!({"driver": "nbd", "node-name": "remote", "export": "d0",
                          "server": {"type": "unix", "path": sock.to_str().unwrap()}});
    let args: Vec<String> = vec![
        "vm".into(),
        "-M".into(),
        "none".into(),
        "-m".into(),
        "16M".into(),
        "-blockdev".into(),
        blockdev.to_string(),
    ];
    let mut p =
        VmProcess::spawn(env!("CARGO_BIN_EXE_livemig"), &args, dir.path(), "client").unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !p.qmp_path.exists() {
        assert!(p.alive(), "livemig exited: {}", p.log());
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = p.qmp();
    let nodes = c.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes[0]["drv"], "nbd");
    assert_eq!(
        nodes[0]["file"],
        format!("nbd+unix:///d0?socket={}", sock.display())
    );
    assert_eq!(nodes[0]["image"]["virtual-size"], SIZE as u64);
    let first = std::fs::read(&src).unwrap()[0];
    let before = p.log().len();
    let out = c.hmp(&format!("qemu-io remote \"read -P {first} 0 1\""));
    assert_eq!(out, "", "qemu-io prints on stdout, not in the reply");
    let log = p.log();
    let printed = log.get(before..).unwrap_or_default();
    assert!(
        printed.starts_with("read 1/1 bytes at offset 0"),
        "{printed}"
    );
}
