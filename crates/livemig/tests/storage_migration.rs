//! Migration without shared storage, as with QEMU: the destination exports its empty disk
//! over NBD (`nbd-server-start`, `nbd-server-add writable`), the source mirrors its disk into
//! an `nbd` node connected to that export (`blockdev-add`, `blockdev-mirror sync=full`) while
//! a busy guest keeps writing to it, and the mirror is ended at the switchover
//! (`pause-before-switchover`, `block-job-cancel`, `migrate-continue`). Afterwards the
//! destination's image file equals the source's, byte for byte, and so does RAM.
//!
//! Without the pause, the mirror is still writing at the switchover: the source refuses to
//! hand its images over, the migration fails with that reason, the destination exits (status
//! 1, as QEMU's), and the source keeps running with its mirror intact.
//!
//! Self-contained: it uses only `testkit`, so it does not depend on other test files.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::{QmpClient, VmProcess};

const TIMEOUT: Duration = Duration::from_secs(20);
const DISK_SIZE: usize = 16 << 20;

struct Vm {
    proc: VmProcess,
    qmp: QmpClient,
    name: &'static str,
}

impl Vm {
    fn start(dir: &Path, name: &'static str, image: &Path, extra: &[&str]) -> Vm {
        let blockdev = json!({"driver": "raw", "node-name": "d0",
            "file": {"driver": "file", "filename": image.to_str().unwrap()}})
        .to_string();
        let mut args: Vec<String> = ["vm", "-name", name, "-m", "64M", "-smp", "2", "-blockdev"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(blockdev);
        args.extend(extra.iter().map(|s| s.to_string()));
        let bin = env!("CARGO_BIN_EXE_livemig");
        let mut proc = VmProcess::spawn(bin, &args, dir, name).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !proc.qmp_path.exists() {
            assert!(proc.alive(), "{name} exited: {}", proc.log());
            assert!(Instant::now() < deadline, "{name} made no QMP socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        let qmp = proc.qmp();
        Vm { proc, qmp, name }
    }

    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let r = self.qmp.execute(cmd, args.clone()).unwrap();
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!(
                "{}: {cmd} {args} failed: {r}\nlog:\n{}",
                self.name,
                self.proc.log()
            ),
        }
    }

    fn event(&mut self, name: &str) -> Value {
        let n = name.to_string();
        self.qmp
            .wait_event(TIMEOUT, move |e| e["event"] == n.as_str())
            .unwrap_or_else(|| {
                panic!(
                    "{}: no {name} event; other events: {:?}\nlog:\n{}",
                    self.name,
                    self.qmp.events,
                    self.proc.log()
                )
            })
    }

    fn wait_migration(&mut self, statuses: &[&str]) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let r = self.ok("query-migrate", json!({}));
            if statuses.contains(&r["status"].as_str().unwrap_or_default()) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{}: migration stuck: {r}\nlog:\n{}",
                self.name,
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn status(&mut self) -> String {
        self.ok("query-status", json!({}))["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// A source image with a recognisable pattern and an empty destination image.
fn images(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let src = dir.join("src.img");
    let dst = dir.join("dst.img");
    let mut x = 0x1234_5678u32;
    let data: Vec<u8> = (0..DISK_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::write(&dst, vec![0u8; DISK_SIZE]).unwrap();
    (src, dst, data)
}

/// Source (busy guest writing to its disk) and destination (incoming, paused), with the
/// destination's disk exported and the source mirroring into it, ready. The mirror is
/// started as libvirt starts it for a storage migration: `auto-finalize` on, `auto-dismiss`
/// off (libvirt reads the ended job's error, then dismisses it).
fn set_up(dir: &Path, src_img: &Path, dst_img: &Path) -> (Vm, Vm, String) {
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::start(dir, "dst", dst_img, &["-incoming", &mig, "-S"]);
    let src = mirroring_source(
        dir,
        src_img,
        &mut dst,
        json!({"auto-finalize": true, "auto-dismiss": false}),
    );
    (src, dst, mig)
}

/// A source (busy guest writing to its disk) mirroring into the disk `exporter` exports over
/// NBD, the mirror (`blockdev-mirror` with `extra` arguments) ready.
fn mirroring_source(dir: &Path, src_img: &Path, exporter: &mut Vm, extra: Value) -> Vm {
    let dst = exporter;
    let mut src = Vm::start(
        dir,
        "src",
        src_img,
        &[
            "-workload",
            "fill=8M,hot=2M,dirty-rate=32M,disk=d0,disk-every=8",
        ],
    );
    let nbd_sock = dir.join("nbd.sock");
    dst.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd_sock.to_str().unwrap()}}}),
    );
    dst.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    src.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "remote", "export": "d0",
               "server": {"type": "unix", "path": nbd_sock.to_str().unwrap()}}),
    );
    let mut mirror = json!({"job-id": "m0", "device": "d0", "target": "remote", "sync": "full"});
    for (k, v) in extra.as_object().unwrap() {
        mirror[k] = v.clone();
    }
    src.ok("blockdev-mirror", mirror);
    let ready = src.event("BLOCK_JOB_READY");
    assert_eq!(ready["data"]["device"], "m0");
    assert_eq!(ready["data"]["type"], "mirror");
    let jobs = src.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["ready"], true, "{jobs}");
    assert_eq!(jobs[0]["status"], "ready", "{jobs}");
    src
}

#[test]
fn storage_migrates_over_nbd_with_mirror_ended_at_switchover() {
    let dir = testkit::tempdir();
    let (src_img, dst_img, initial) = images(dir.path());
    let (mut src, mut dst, mig) = set_up(dir.path(), &src_img, &dst_img);
    src.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    // The guest keeps writing while the mirror is ready: those writes must arrive too.
    std::thread::sleep(Duration::from_millis(200));
    src.ok("migrate", json!({"uri": mig}));
    src.wait_migration(&["pre-switchover"]);
    // The guest is stopped: end the mirror with a consistent copy (cancel after ready).
    src.ok("block-job-cancel", json!({"device": "m0"}));
    let done = src.event("BLOCK_JOB_COMPLETED");
    assert_eq!(done["data"]["device"], "m0");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"]);
    // Concluded, without an error, until dismissed.
    let jobs = src.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "concluded", "{jobs}");
    assert!(jobs[0].get("error").is_none(), "{jobs}");
    src.ok("job-dismiss", json!({"id": "m0"}));
    assert_eq!(src.ok("query-block-jobs", json!({})), json!([]));
    src.ok("migrate-continue", json!({"state": "pre-switchover"}));
    let r = src.wait_migration(&["completed", "failed"]);
    assert_eq!(
        r["status"],
        "completed",
        "{r}\nsrc log:\n{}",
        src.proc.log()
    );
    let r = dst.wait_migration(&["completed", "failed"]);
    assert_eq!(r["status"], "completed", "{r}");
    dst.ok("nbd-server-stop", json!({}));

    // Both sides are stopped at the same point: the images and RAM are equal.
    assert_eq!(src.status(), "postmigrate");
    let a = std::fs::read(&src_img).unwrap();
    let b = std::fs::read(&dst_img).unwrap();
    assert_ne!(a, initial, "the guest never wrote to its disk");
    let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(
        differing, 0,
        "destination image differs in {differing} bytes"
    );
    let ra = src.ok("x-livemig-ram-checksum", json!({}));
    let rb = dst.ok("x-livemig-ram-checksum", json!({}));
    assert_eq!(ra, rb);
    // The destination runs on with its disk.
    dst.ok("cont", json!({}));
    assert_eq!(dst.status(), "running");
}

#[test]
fn a_mirror_still_writing_at_switchover_fails_the_migration_cleanly() {
    let dir = testkit::tempdir();
    let (src_img, dst_img, _) = images(dir.path());
    // The mirror's target is exported by a process of its own: the migration's destination,
    // whose load fails, exits (as QEMU's does), and the mirror must live on without it.
    let mut exporter = Vm::start(dir.path(), "nbd", &dst_img, &["-S"]);
    let mut src = mirroring_source(dir.path(), &src_img, &mut exporter, json!({}));
    let spare = dir.path().join("spare.img");
    std::fs::write(&spare, vec![0u8; DISK_SIZE]).unwrap();
    let mig = format!("unix:{}", dir.path().join("mig.sock").display());
    let mut dst = Vm::start(dir.path(), "dst", &spare, &["-incoming", &mig, "-S"]);
    src.ok("migrate", json!({"uri": mig}));
    let r = src.wait_migration(&["completed", "failed"]);
    assert_eq!(r["status"], "failed", "{r}");
    let why = r["error-desc"].as_str().unwrap_or_default();
    assert!(
        why.contains("block job 'm0'") && why.contains("inactivate"),
        "unclear error: {r}"
    );
    // The source runs on, with its mirror.
    let deadline = Instant::now() + TIMEOUT;
    while src.status() != "running" {
        assert!(Instant::now() < deadline, "source did not resume");
        std::thread::sleep(Duration::from_millis(10));
    }
    let jobs = src.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "ready", "{jobs}");
    // The destination never started the guest: its load failed, and it exited with status
    // 1 as QEMU 7.2's does.
    assert_eq!(dst.proc.wait_exit(TIMEOUT), Some(1), "{}", dst.proc.log());
    assert!(
        dst.proc.log().contains("load of migration failed: "),
        "{}",
        dst.proc.log()
    );
    // Nothing was corrupted: stop the guest, end the mirror, and the copy is exact.
    src.ok("stop", json!({}));
    src.ok("block-job-cancel", json!({"device": "m0"}));
    let done = src.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    let a = std::fs::read(&src_img).unwrap();
    let b = std::fs::read(&dst_img).unwrap();
    assert!(a == b, "images differ after the failed migration");
}

/// `drive-mirror`, the legacy form of `blockdev-mirror`: the command opens its target itself
/// from an NBD URI (here the export of a second VM), the job copies the whole disk, and the
/// target node goes away with the job (its NBD connection closes, so the exporter can remove
/// the export in `safe` mode). What livemig cannot honour is refused by name, and a refused
/// command starts no job.
#[test]
fn drive_mirror_opens_an_nbd_uri_target_and_drops_it_with_the_job() {
    let dir = testkit::tempdir();
    let (src_img, dst_img, data) = images(dir.path());
    let mut dst = Vm::start(dir.path(), "dst", &dst_img, &[]);
    let mut src = Vm::start(dir.path(), "src", &src_img, &[]);
    let nbd_sock = dir.path().join("nbd.sock");
    dst.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd_sock.to_str().unwrap()}}}),
    );
    dst.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    let uri = format!("nbd+unix:///d0?socket={}", nbd_sock.display());
    let args = |extra: Value| {
        let mut a = json!({"job-id": "m0", "device": "d0", "target": uri, "sync": "full",
                           "format": "raw", "mode": "existing"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    for (extra, refusal) in [
        (
            json!({"mode": "absolute-paths"}),
            "mode=absolute-paths is not supported",
        ),
        (json!({"node-name": "t"}), "node-name is not supported"),
        (json!({"unmap": true}), "unmap is not supported"),
        (
            json!({"format": "qcow2"}),
            "format 'qcow2' over an NBD target",
        ),
        (json!({"target": "http://h/x"}), "Unknown protocol 'http'"),
        (json!({"target": "nbd+unix:///d0"}), "Invalid URI"),
        (json!({"replaces": "d0"}), "replaces is not supported"),
    ] {
        let a = args(extra.clone());
        let r = src.qmp.execute("drive-mirror", a.clone()).unwrap();
        let desc = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains(refusal), "drive-mirror {a}: {r}");
    }
    let mut no_format = args(json!({}));
    no_format.as_object_mut().unwrap().remove("format");
    let r = src.qmp.execute("drive-mirror", no_format).unwrap();
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap_or_default()
            .contains("without 'format'"),
        "{r}"
    );
    assert_eq!(src.ok("query-block-jobs", json!({})), json!([]));

    src.ok(
        "drive-mirror",
        args(json!({"speed": 0, "granularity": 65536, "buf-size": 1 << 20})),
    );
    let ready = src.event("BLOCK_JOB_READY");
    assert_eq!(ready["data"]["device"], "m0");
    assert_eq!(ready["data"]["len"], DISK_SIZE as u64);
    // The target node is the job's, not the graph's.
    let nodes = src.ok("query-named-block-nodes", json!({}));
    assert!(
        !nodes.to_string().contains("nbd"),
        "the target shows up in the graph: {nodes}"
    );
    // Its connection is open while the job runs.
    let r = dst
        .qmp
        .execute("nbd-server-remove", json!({"name": "d0", "mode": "safe"}))
        .unwrap();
    assert!(
        r.get("error").is_some(),
        "export removed under a mirror: {r}"
    );

    src.ok("block-job-cancel", json!({"device": "m0"}));
    let done = src.event("BLOCK_JOB_COMPLETED");
    assert_eq!(done["data"]["offset"], DISK_SIZE as u64, "{done}");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(std::fs::read(&dst_img).unwrap(), data);
    // The job is gone, and with it the target's NBD connection.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = dst
            .qmp
            .execute("nbd-server-remove", json!({"name": "d0", "mode": "safe"}))
            .unwrap();
        if r.get("return").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target's connection outlived the job: {r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(src.ok("query-block-jobs", json!({})), json!([]));
}

/// A bitmap-only postcopy (capabilities `dirty-bitmaps` and `events`, no `postcopy-ram`)
/// requested right after `migrate` is entered even when RAM is sent within the first pass,
/// as QEMU 7.2 does (iotest 194): the source reports `postcopy-active` before `completed`,
/// and the destination ends with the bitmap.
///
/// The request must reach the source during that first pass, which for this all-zero guest
/// lasts a few milliseconds: a test thread held off the CPU longer (30 ms is enough) asks after
/// the pass, and the migration then rightly completes in precopy. Such a run is told apart —
/// the pass had already ended when the request had been taken — and run again.
#[test]
fn a_bitmap_only_postcopy_requested_at_once_is_entered() {
    const ATTEMPTS: u32 = 5;
    for attempt in 1..=ATTEMPTS {
        if bitmap_only_postcopy_at_once() {
            return;
        }
        eprintln!("attempt {attempt}: the request came after the first pass; again");
    }
    panic!("in {ATTEMPTS} attempts the request never came during the first pass");
}

/// One run of [`a_bitmap_only_postcopy_requested_at_once_is_entered`]; `false` if the
/// request came too late to tell anything.
fn bitmap_only_postcopy_at_once() -> bool {
    let dir = testkit::tempdir();
    let (src_img, dst_img, _) = images(dir.path());
    let mig = format!("unix:{}", dir.path().join("mig.sock").display());
    let mut dst = Vm::start(dir.path(), "dst", &dst_img, &["-incoming", &mig]);
    let mut src = Vm::start(dir.path(), "src", &src_img, &[]);
    src.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "bitmap0"}),
    );
    let caps = json!({"capabilities": [{"capability": "events", "state": true},
                                       {"capability": "dirty-bitmaps", "state": true}]});
    src.ok("migrate-set-capabilities", caps.clone());
    dst.ok("migrate-set-capabilities", caps);
    src.ok("migrate", json!({"uri": mig}));
    src.ok("migrate-start-postcopy", json!({}));
    // Taken in time if, after it, the first pass had not ended: still in `setup`, or
    // `active` with only the setup's dirty-log sync done (the pass ends with the next).
    let q = src.ok("query-migrate", json!({}));
    let in_pass =
        q["status"] == "setup" || (q["status"] == "active" && q["ram"]["dirty-sync-count"] == 1);
    if !in_pass {
        eprintln!("taken after the first pass: {q}");
        return false;
    }
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("completed") {
        let e = src.event("MIGRATION");
        let st = e["data"]["status"].as_str().unwrap_or_default().to_string();
        assert_ne!(st, "failed", "{}", src.proc.log());
        seen.push(st);
    }
    assert_eq!(seen, ["setup", "active", "postcopy-active", "completed"]);
    dst.wait_migration(&["completed"]);
    let block = dst.ok("query-named-block-nodes", json!({}));
    assert!(block.to_string().contains("bitmap0"), "{block}");
    true
}
