//! Quitting a source in the middle of a migration keeps its persistent bitmaps (issue 9, bug 1).
//!
//! A migrating bitmap is `skip_store`: at switchover it stays in memory, because the
//! destination will own it. A source that quits (`quit`, or SIGTERM/SIGINT, which QEMU treats
//! as `quit`) while the migration still runs must first end the migration as a cancel does —
//! bitmaps released, `skip_store` cleared, disks reactivated — and only then close its images,
//! so the persistent bitmap is stored with its contents. QEMU's `migration_shutdown` does the
//! cancel; livemig stored nothing (or died on the signal).
//!
//! Every cell: a source on a qcow2 image with a persistent bitmap `pb` (made by `qemu-img
//! bitmap --add`, then dirtied by a write through the monitor), capabilities `events`,
//! `dirty-bitmaps`, `return-path` and `pause-before-switchover`; the migration is held in a
//! phase (`setup` — a connect that hangs; `active` — 1 MiB/s of bandwidth; `pre-switchover` —
//! the pause; `device` — a proxy that holds the stream's end, so the source has inactivated its
//! disks and waits for the destination's `SHUT`); then the source is told to quit. It exits
//! with status 0, and afterwards `qemu-img info` shows `pb` stored (not `in-use`), `qemu-img
//! check` is clean, the data reads back, and a fresh livemig on the image finds `pb` with the
//! same contents (sha256) as before the migration.

mod common;
#[allow(dead_code)] // the fault matrix uses the rest
mod faults;

use common::*;
use faults::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::time::Duration;

/// Where the migration is when the source is told to quit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Setup,
    Active,
    PreSwitchover,
    /// The whole stream went out; the source waits for the destination's `SHUT`.
    Device,
}

/// How the source is told to quit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// QMP `quit`.
    Quit,
    /// A signal to the process.
    Signal(Signal),
}

const CAPS: &[&str] = &[
    "events",
    "dirty-bitmaps",
    "return-path",
    "pause-before-switchover",
];

/// A guest whose RAM takes a while to send at 1 MiB/s, then stays unchanged.
const FILL: &str = "fill=16M,hot=0";
const FILL_PAGES16: u64 = (16 << 20) / 4096;
const DISK_SIZE: u64 = 64 << 20;
const READS: &[&str] = &["read -P 0x5a 0 1M"];

fn guest_args(blockdev: &str) -> Vec<&str> {
    vec!["-m", "32M", "-smp", "1", "-blockdev", blockdev]
}

/// The bitmap `pb` on `d0`: (sha256, `query-named-block-nodes` entry).
fn pb(lm: &mut Lm) -> (String, Value) {
    (lm.bitmap_sha("pb"), lm.bitmap_info("pb"))
}

fn run_cell(phase: Phase, how: How) {
    let cell = format!("{phase:?}/{how:?}");
    if !testkit::require(&cell, testkit::qemu()) {
        return;
    }
    let dir = tempdir();
    let dir = dir.path();
    let img = dir.join("src.qcow2");
    create_qcow2(&img, DISK_SIZE, &[("pb", 65536)]);
    let blockdev = qcow2_blockdev(&img);
    let mut args = guest_args(&blockdev);
    args.extend(["-workload", FILL]);
    let mut src = Lm::start(dir, "src", &args);
    src.wait_idle_after(FILL_PAGES16);
    let out = src.qemu_io("write -P 0x5a 0 1M");
    assert!(out.starts_with("wrote 1048576/1048576"), "{out}");
    let (sha, info) = pb(&mut src);
    assert_eq!(info["count"], 1 << 20, "{info}");
    assert_eq!(info["persistent"], true, "{info}");
    src.caps_on(CAPS);

    // Hold the migration in `phase`.
    let mut _hang = None;
    let mut dst = None;
    let mut proxy = None;
    if phase == Phase::Setup {
        let path = dir.join("hang.sock");
        _hang = Some(hanging_listener(&path));
        src.migrate(&format!("unix:{}", path.display()));
        // Let the migration thread block in connect().
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(src.ok("query-migrate", json!({}))["status"], "setup");
    } else {
        let dst_img = dir.join("dst.qcow2");
        create_qcow2(&dst_img, DISK_SIZE, &[]);
        let dst_blockdev = qcow2_blockdev(&dst_img);
        let target = dir.join("dst.sock");
        let target_uri = format!("unix:{}", target.display());
        let mut dargs = guest_args(&dst_blockdev);
        dargs.extend(["-incoming", &target_uri, "-S"]);
        let mut d = Lm::start(dir, "dst", &dargs);
        d.caps_on(&["events", "dirty-bitmaps", "return-path"]);
        dst = Some(d);
        let uri = if phase == Phase::Device {
            let listen = dir.join("proxy.sock");
            proxy = Some(Proxy::start(&listen, &target, Stall::Hold));
            format!("unix:{}", listen.display())
        } else {
            target_uri
        };
        if phase == Phase::Active {
            src.set_params(json!({"max-bandwidth": 1 << 20}));
        }
        src.migrate(&uri);
        match phase {
            Phase::Active => {
                src.wait_migration(&["active"]);
                assert_eq!(src.bitmap_info("pb")["busy"], true);
            }
            Phase::PreSwitchover => {
                src.wait_migration(&["pre-switchover"]);
            }
            Phase::Device => {
                src.wait_migration(&["pre-switchover"]);
                src.ok("migrate-continue", json!({"state": "pre-switchover"}));
                let p = proxy.as_ref().expect("proxy");
                p.wait_stalled(TIMEOUT);
                p.wait_source_done(TIMEOUT);
                src.wait_migration(&["device"]);
                // The disks were handed over: the image is unlocked, `pb` not stored (it
                // migrates), and still `in-use` in the image.
                let stored = image_bitmaps(&img);
                assert_eq!(
                    stored,
                    vec![json!({"flags": ["in-use", "auto"], "name": "pb", "granularity": 65536})],
                    "at switchover"
                );
            }
            Phase::Setup => unreachable!(),
        }
    }

    // Quit.
    match how {
        How::Quit => {
            let r = src.qmp.execute("quit", json!({}));
            assert!(
                r.as_ref().is_ok_and(|v| v.get("return").is_some()),
                "{cell}: quit: {r:?}"
            );
        }
        How::Signal(sig) => {
            let pid = Pid::from_raw(src.proc.child.id() as i32);
            kill(pid, sig).expect("kill");
        }
    }
    assert_eq!(
        src.proc.wait_exit(TIMEOUT),
        Some(0),
        "{cell}: the source did not exit cleanly: {}",
        src.proc.log()
    );
    drop(proxy);
    if let Some(mut d) = dst {
        // Its load failed: it exits with status 1, as QEMU's does.
        let e = d.wait_load_failed();
        assert!(!e.is_empty(), "{cell}");
    }

    // The image: `pb` stored, nothing wrong, the data there...
    assert_eq!(
        image_bitmaps(&img),
        vec![json!({"flags": ["auto"], "name": "pb", "granularity": 65536})],
        "{cell}: the image's bitmaps after the source quit"
    );
    assert_image_clean(&img);
    assert_image_reads(&img, READS);
    // ...and `pb` holds what it held before the migration.
    let mut reader = Lm::start(
        dir,
        "reader",
        &["-M", "none", "-m", "16M", "-blockdev", &blockdev],
    );
    let (sha_after, info_after) = pb(&mut reader);
    assert_eq!(sha_after, sha, "{cell}: pb's contents changed");
    assert_eq!(info_after["count"], info["count"], "{cell}: {info_after}");
    let _ = reader.qmp.execute("quit", json!({}));
    assert_eq!(reader.proc.wait_exit(TIMEOUT), Some(0));
}

#[test]
fn quit_in_setup() {
    run_cell(Phase::Setup, How::Quit);
}

#[test]
fn quit_in_active() {
    run_cell(Phase::Active, How::Quit);
}

#[test]
fn quit_in_pre_switchover() {
    run_cell(Phase::PreSwitchover, How::Quit);
}

#[test]
fn quit_in_device() {
    run_cell(Phase::Device, How::Quit);
}

#[test]
fn sigint_in_setup() {
    run_cell(Phase::Setup, How::Signal(Signal::SIGINT));
}

#[test]
fn sigterm_in_active() {
    run_cell(Phase::Active, How::Signal(Signal::SIGTERM));
}

#[test]
fn sigterm_in_pre_switchover() {
    run_cell(Phase::PreSwitchover, How::Signal(Signal::SIGTERM));
}

#[test]
fn sigterm_in_device() {
    run_cell(Phase::Device, How::Signal(Signal::SIGTERM));
}

#[test]
fn sigterm_without_a_migration_stores_bitmaps_too() {
    // The plain case: SIGTERM is a `quit`, not a crash.
    if !testkit::require("sigterm_without_a_migration", testkit::qemu()) {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("i.qcow2");
    create_qcow2(&img, DISK_SIZE, &[]);
    let blockdev = qcow2_blockdev(&img);
    let mut lm = Lm::start(
        dir.path(),
        "lm",
        &["-M", "none", "-m", "16M", "-blockdev", &blockdev],
    );
    lm.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "b", "persistent": true}),
    );
    let _ = lm.qemu_io("write -P 0x5a 0 1M");
    kill(Pid::from_raw(lm.proc.child.id() as i32), Signal::SIGTERM).expect("kill");
    assert_eq!(lm.proc.wait_exit(TIMEOUT), Some(0), "{}", lm.proc.log());
    assert!(
        lm.proc.log().contains("terminating on signal 15"),
        "{}",
        lm.proc.log()
    );
    assert_eq!(
        image_bitmaps(&img),
        vec![json!({"flags": ["auto"], "name": "b", "granularity": 65536})]
    );
    assert_image_clean(&img);
    assert_image_reads(&img, READS);
}
