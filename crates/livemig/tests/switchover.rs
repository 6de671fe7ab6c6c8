//! The end of a migration under the user's control: `pause-before-switchover` with
//! `migrate-continue`, and `migrate_cancel` in `setup`, `active` and `pre-switchover`, after
//! which the source runs on with its RAM and dirty bitmaps as they were, the bitmaps free for
//! use, and a second migration succeeds.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const CAPS: &[&str] = &["events", "dirty-bitmaps", "return-path"];

/// QEMU's message for a bitmap a migration holds.
fn busy_message(name: &str) -> String {
    format!("Bitmap '{name}' is currently in use by another operation and cannot be used")
}

#[test]
fn pause_before_switchover_waits_for_migrate_continue() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    dst.caps_on(CAPS);
    let mut src = Lm::source(dir.path(), "src", BUSY);
    src.add_bitmap("b0");
    src.caps_on(CAPS);
    src.caps_on(&["pause-before-switchover"]);
    let default_bandwidth = src.ok("query-migrate-parameters", json!({}))["max-bandwidth"].clone();
    src.set_params(json!({"max-bandwidth": 1 << 20}));
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    // A continue naming the current state succeeds, but one that comes before the pause must
    // not skip it.
    src.ok("migrate-continue", json!({"state": "active"}));
    src.set_params(json!({ "max-bandwidth": default_bandwidth }));

    src.wait_migration(&["pre-switchover"]);
    assert_eq!(src.status(), "finish-migrate");
    let steps = src.steps();
    // The bitmap is still the migration's, and the disk still active.
    assert_eq!(src.bitmap_info("b0")["busy"], true);
    assert_eq!(
        src.err(
            "block-dirty-bitmap-clear",
            json!({"node": "d0", "name": "b0"})
        ),
        busy_message("b0")
    );
    assert_eq!(
        src.err("migrate-continue", json!({"state": "active"})),
        "Migration not in expected state: pre-switchover"
    );
    // Nothing moves while it waits.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(src.steps(), steps, "the guest ran in pre-switchover");
    assert_eq!(
        src.ok("query-migrate", json!({}))["status"],
        "pre-switchover"
    );

    src.ok("migrate-continue", json!({"state": "pre-switchover"}));
    check_stop_point(&mut src, &mut dst, &["b0"]);
    assert_eq!(src.steps(), steps);
    assert_eq!(
        src.migration_events_until("completed"),
        [
            "setup",
            "active",
            "STOP",
            "pre-switchover",
            "device",
            "completed"
        ]
    );
    check_carries_on(&mut dst);
}

/// What must be the same on the source after a cancel.
#[derive(Debug, PartialEq)]
struct Snapshot {
    ram: Value,
    b0: String,
    b1: String,
}

fn snapshot(src: &mut Lm) -> Snapshot {
    Snapshot {
        ram: src.ram_checksum(),
        b0: src.bitmap_sha("b0"),
        b1: src.bitmap_sha("b1"),
    }
}

/// An idle source (RAM changes only when the test says) with two bitmaps on `d0`, dirtied by
/// the test, and its snapshot.
fn idle_source(dir: &Path) -> (Lm, Snapshot) {
    let mut src = Lm::source(dir, "src", IDLE);
    src.add_bitmap("b0");
    src.add_bitmap("b1");
    src.qemu_io("write 0 1M");
    src.qemu_io("write 8M 64k");
    src.qemu_io("write -P 0x5a 40M 4k");
    src.caps_on(CAPS);
    src.wait_idle();
    let snap = snapshot(&mut src);
    (src, snap)
}

/// After a cancel: `cancelled` with the expected events, the guest running, RAM and bitmaps
/// unchanged and free for use.
fn check_put_back(src: &mut Lm, before: &Snapshot, events: &[&str]) {
    let q = src.wait_migration(&["cancelled", "failed", "completed"]);
    assert_eq!(q["status"], "cancelled", "{q}");
    assert_eq!(src.migration_events_until("cancelled"), events);
    assert_eq!(src.status(), "running");
    assert_eq!(
        &snapshot(src),
        before,
        "the cancelled migration changed the source"
    );
    for b in ["b0", "b1"] {
        let info = src.bitmap_info(b);
        assert_eq!(info["busy"], false, "{info}");
        assert_eq!(info["recording"], true, "{info}");
    }
    src.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "d0", "name": "b1"}),
    );
    src.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "d0", "name": "b1"}),
    );
}

/// A second migration from the cancelled source to a fresh destination completes, carrying
/// the RAM and bitmap the source had before the first one.
fn second_migration_succeeds(dir: &Path, src: &mut Lm, before: &Snapshot) {
    let uri = unix_uri(dir, "second.sock");
    let mut dst = Lm::destination(dir, "dst2", &uri);
    dst.caps_on(CAPS);
    src.migrate(&uri);
    check_stop_point(src, &mut dst, &["b0"]);
    assert_eq!(dst.ram_checksum(), before.ram);
    assert_eq!(dst.bitmap_sha("b0"), before.b0);
}

#[test]
fn cancel_in_setup_while_connect_hangs() {
    let dir = tempdir();
    let hang = dir.path().join("hang.sock");
    let _listener = hanging_listener(&hang);
    let (mut src, before) = idle_source(dir.path());
    src.migrate(&format!("unix:{}", hang.display()));
    assert_eq!(src.ok("query-migrate", json!({}))["status"], "setup");
    // Give the migration thread time to block in connect(), the case this test is about.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(src.ok("query-migrate", json!({}))["status"], "setup");
    src.ok("migrate_cancel", json!({}));
    check_put_back(&mut src, &before, &["setup", "cancelling", "cancelled"]);
    second_migration_succeeds(dir.path(), &mut src, &before);
}

#[test]
fn cancel_while_active() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    dst.caps_on(CAPS);
    let (mut src, before) = idle_source(dir.path());
    let default_bandwidth = src.ok("query-migrate-parameters", json!({}))["max-bandwidth"].clone();
    // 1 MiB/s for 32 MiB of data: it stays active.
    src.set_params(json!({"max-bandwidth": 1 << 20}));
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    assert_eq!(src.bitmap_info("b1")["busy"], true);
    assert_eq!(
        src.err(
            "block-dirty-bitmap-remove",
            json!({"node": "d0", "name": "b1"})
        ),
        busy_message("b1")
    );
    src.ok("migrate_cancel", json!({}));
    check_put_back(
        &mut src,
        &before,
        &["setup", "active", "cancelling", "cancelled"],
    );
    // The destination saw the stream break off; it failed and did not start the guest.
    // Its load failed: it exits with status 1, as QEMU's does.
    dst.wait_load_failed();
    src.set_params(json!({ "max-bandwidth": default_bandwidth }));
    second_migration_succeeds(dir.path(), &mut src, &before);
}

#[test]
fn cancel_in_pre_switchover() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    dst.caps_on(CAPS);
    let (mut src, before) = idle_source(dir.path());
    src.caps_on(&["pause-before-switchover"]);
    src.migrate(&uri);
    src.wait_migration(&["pre-switchover"]);
    assert_eq!(src.status(), "finish-migrate");
    src.ok("migrate_cancel", json!({}));
    check_put_back(
        &mut src,
        &before,
        &[
            "setup",
            "active",
            "STOP",
            "pre-switchover",
            "cancelling",
            "RESUME",
            "cancelled",
        ],
    );
    // Its load failed: it exits with status 1, as QEMU's does.
    dst.wait_load_failed();
    src.set_caps(&[("pause-before-switchover", false)]);
    second_migration_succeeds(dir.path(), &mut src, &before);
}
