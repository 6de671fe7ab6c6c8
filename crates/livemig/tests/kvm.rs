//! `livemig vm -accel kvm` as a user drives it: `-device help` lists virtio-blk as QEMU lists
//! it, `-accel kvm` is refused cleanly where `/dev/kvm` is missing, and a KVM guest writing to
//! a qcow2 disk through virtio-blk migrates livemig → livemig and back over QMP — RAM, disk
//! contents, the disk's dirty bitmap and the guest's progress verified at each end.

mod common;

use common::Lm;
use serde_json::{json, Value};
use std::process::Command;

fn kvm_ok(test: &str) -> bool {
    testkit::require(test, testkit::kvm())
}

#[test]
fn device_help_lists_virtio_blk_as_qemu_does() {
    let out = Command::new(common::livemig())
        .args(["vm", "-M", "none", "-device", "help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // What QEMU's iotests do (`_require_devices virtio-blk`).
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("name \""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert!(names.iter().any(|n| n.contains("virtio-blk")), "{text}");
}

#[test]
fn accel_kvm_without_dev_kvm_is_refused() {
    // A mount namespace whose /dev has no kvm node (needs root, as CI has).
    let probe = Command::new("unshare")
        .args(["--mount", "sh", "-c", "mount -t tmpfs none /dev && true"])
        .status();
    let usable = matches!(probe, Ok(s) if s.success());
    if !testkit::require(
        "accel_kvm_without_dev_kvm_is_refused",
        (!usable)
            .then(|| "cannot make a mount namespace without /dev/kvm (unshare --mount)".into()),
    ) {
        return;
    }
    let bin = common::livemig().display().to_string();
    let out = Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            &format!("mount -t tmpfs none /dev && exec {bin} vm -m 16M -accel kvm"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("Could not access KVM kernel module: No such file or directory"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

const RAM: &str = "32M";

fn kvm_vm(dir: &std::path::Path, name: &str, image: &std::path::Path, extra: &[&str]) -> Lm {
    let blockdev = format!(
        "{{\"driver\":\"qcow2\",\"node-name\":\"d0\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
        image.display()
    );
    let mut a = vec![
        "-accel",
        "kvm",
        "-m",
        RAM,
        "-smp",
        "2",
        "-blockdev",
        &blockdev,
        "-device",
        "virtio-blk,drive=d0",
    ];
    a.extend_from_slice(extra);
    Lm::start(dir, name, &a)
}

fn bitmap_sha(lm: &mut Lm) -> Value {
    lm.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "d0", "name": "b0"}),
    )["sha256"]
        .clone()
}

fn verify_disk(lm: &mut Lm) -> Value {
    let r = lm.ok("x-livemig-verify-disk", json!({}));
    assert_eq!(r["mismatched"], 0, "{}: {r}", lm.name);
    r
}

/// Migrates `src` (running) to `dst` (started with `-incoming unix:SOCK -S`) with dirty
/// bitmaps, and checks both ends agree at the stop point.
fn hop(src: &mut Lm, dst: &mut Lm, sock: &str) {
    for lm in [&mut *src, &mut *dst] {
        lm.caps_on(&["dirty-bitmaps", "events"]);
    }
    src.migrate(&format!("unix:{sock}"));
    src.wait_completed();
    dst.wait_completed();
    assert_eq!(dst.status(), "paused");
    assert_eq!(src.ram_checksum(), dst.ram_checksum(), "RAM differs");
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "{v}");
    assert_eq!(src.steps(), dst.steps());
    assert_eq!(bitmap_sha(src), bitmap_sha(dst), "bitmap differs");
    let d = verify_disk(dst);
    assert!(d["written"].as_u64().unwrap_or(0) > 0, "{d}");
}

/// An 8 MiB qcow2 image in `dir` for `test`'s guests, or `None` (the reason printed) where
/// `/dev/kvm` or `qemu-img` is missing.
fn kvm_and_image(test: &str, dir: &std::path::Path) -> Option<std::path::PathBuf> {
    if !kvm_ok(test) || !testkit::require(test, testkit::programs(&["qemu-img"])) {
        return None;
    }
    let image = dir.join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("8M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    Some(image)
}

/// The workload of these tests' KVM guests: RAM filled and rewritten, and a disk write every
/// 16 steps.
const WORKLOAD: &str = "fill=8M,hot=2M,dirty-rate=64M,disk-every=16";

#[test]
fn kvm_guest_with_virtio_blk_migrates_there_and_back() {
    let dir = testkit::tempdir();
    let Some(image) = kvm_and_image(
        "kvm_guest_with_virtio_blk_migrates_there_and_back",
        dir.path(),
    ) else {
        return;
    };
    let mut a = kvm_vm(dir.path(), "a", &image, &["-workload", WORKLOAD]);
    assert_eq!(
        a.ok("query-kvm", json!({})),
        json!({"enabled": true, "present": true})
    );
    a.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "b0", "granularity": 65536}),
    );
    a.wait_steps_beyond(&[2048, 2048]);
    let sock_ab = dir.path().join("ab.sock").display().to_string();
    let mut b = kvm_vm(
        dir.path(),
        "b",
        &image,
        &["-incoming", &format!("unix:{sock_ab}"), "-S"],
    );
    hop(&mut a, &mut b, &sock_ab);
    // The guest goes on where it stopped, still writing its disk.
    let before = b.steps();
    b.ok("cont", json!({}));
    b.wait_steps_beyond(&before.iter().map(|s| s + 5000).collect::<Vec<_>>());
    drop(a);
    let sock_ba = dir.path().join("ba.sock").display().to_string();
    let mut c = kvm_vm(
        dir.path(),
        "c",
        &image,
        &["-incoming", &format!("unix:{sock_ba}"), "-S"],
    );
    hop(&mut b, &mut c, &sock_ba);
    let before = c.steps();
    c.ok("cont", json!({}));
    c.wait_steps_beyond(&before);
    c.ok("stop", json!({}));
    let d = verify_disk(&mut c);
    let (s, done) = (d["submitted"].clone(), d["completed"].clone());
    for (s, done) in s.as_array().unwrap().iter().zip(done.as_array().unwrap()) {
        let (s, done) = (s.as_u64().unwrap(), done.as_u64().unwrap());
        assert!(done <= s && done + 1 >= s, "{d}");
    }
}

/// Postcopy with a KVM guest (issue 10): the destination's KVM vCPUs run from the switch on and
/// pull the pages they touch — KVM's own accesses to guest RAM fault through the userfaultfd
/// like any thread's — while the background push is held to a trickle; the disk's dirty bitmap
/// moves after the switchover and keeps what the guest writes on the destination.
#[test]
fn kvm_guest_with_virtio_blk_moves_in_postcopy() {
    let test = "kvm_guest_with_virtio_blk_moves_in_postcopy";
    let dir = testkit::tempdir();
    let Some(image) = kvm_and_image(test, dir.path()) else {
        return;
    };
    let mut a = kvm_vm(dir.path(), "a", &image, &["-workload", WORKLOAD]);
    a.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "b0", "granularity": 65536}),
    );
    a.wait_steps_beyond(&[2048, 2048]);
    let sock = dir.path().join("pc.sock").display().to_string();
    let mut b = kvm_vm(
        dir.path(),
        "b",
        &image,
        &["-incoming", &format!("unix:{sock}")],
    );
    for lm in [&mut a, &mut b] {
        lm.caps_on(&["dirty-bitmaps", "events", "postcopy-ram"]);
    }
    b.caps_on(&["postcopy-blocktime"]);
    // Precopy held to 4 MiB/s, below what the hot set dirties: it stays `active` until the
    // switch is asked for. (Unthrottled, it converged and completed within ~200 ms, and a test
    // thread held off the CPU that long found no `active` to switch from.)
    a.set_params(json!({"max-bandwidth": 4 << 20, "max-postcopy-bandwidth": 4 << 20}));
    a.migrate(&format!("unix:{sock}"));
    a.wait_migration(&["active"]);
    a.ok("migrate-start-postcopy", json!({}));
    a.wait_migration(&["postcopy-active", "completed"]);
    let bitmap_at_switch = a.bitmap_info("b0")["count"]
        .as_u64()
        .expect("the source's bitmap");
    a.wait_completed();
    b.wait_completed();
    assert_eq!(b.status(), "running");
    let q = a.ok("query-migrate", json!({}));
    assert!(
        q["ram"]["postcopy-requests"].as_u64().unwrap_or(0) > 0,
        "the KVM vCPUs asked for no page: {q}"
    );
    let qb = b.ok("query-migrate", json!({}));
    assert!(
        qb["x-livemig-postcopy"]["latency-count"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "no fault was placed on the destination: {qb}"
    );
    // The guest goes on, disk writes included, on the pages it pulled.
    let before = b.steps();
    b.wait_steps_beyond(&before.iter().map(|s| s + 5000).collect::<Vec<_>>());
    b.ok("stop", json!({}));
    let v = b.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM: {v}");
    assert!(v["valid"].as_u64().unwrap_or(0) >= 2048, "{v}");
    let d = verify_disk(&mut b);
    assert!(d["written"].as_u64().unwrap_or(0) > 0, "{d}");
    // The bitmap arrived after the switch: everything the source had marked, and the
    // destination's own writes on top.
    let at_b = b.bitmap_info("b0")["count"]
        .as_u64()
        .expect("the destination's bitmap");
    assert!(
        at_b >= bitmap_at_switch && at_b > 0,
        "bitmap count {at_b} on the destination, {bitmap_at_switch} on the source"
    );
}
