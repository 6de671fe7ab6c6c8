//! `late-block-activate`, accepted and ignored before (issue 9, bug 5): a destination started
//! with `-S` keeps its disks inactive — the image unlocked — after the incoming migration,
//! until `cont` takes them (QEMU's `process_incoming_migration_bh`); without `-S`, or without
//! the capability, it activates them as usual.

mod common;
#[allow(dead_code)] // the fault matrix uses the rest
mod faults;

use common::*;
use faults::*;
use serde_json::json;

/// Migrates a source on its own qcow2 image (with a persistent bitmap `pb`) to a destination
/// on another image, `-S` or not, with `late-block-activate` or not; returns the destination
/// and its image once the migration completed.
fn migrate_to(
    dir: &std::path::Path,
    name: &str,
    late: bool,
    paused: bool,
) -> (Lm, std::path::PathBuf) {
    let src_img = dir.join(format!("{name}-src.qcow2"));
    create_qcow2(&src_img, 64 << 20, &[("pb", 65536)]);
    let dst_img = dir.join(format!("{name}-dst.qcow2"));
    create_qcow2(&dst_img, 64 << 20, &[]);
    let (sb, db) = (qcow2_blockdev(&src_img), qcow2_blockdev(&dst_img));
    let mut src = Lm::start(
        dir,
        &format!("{name}-src"),
        &["-M", "none", "-m", "16M", "-blockdev", &sb],
    );
    let out = src.qemu_io("write -P 0x5a 0 1M");
    assert!(out.starts_with("wrote"), "{out}");
    let uri = unix_uri(dir, &format!("{name}.sock"));
    let mut args = vec![
        "-M",
        "none",
        "-m",
        "16M",
        "-blockdev",
        &db,
        "-incoming",
        &uri,
    ];
    if paused {
        args.push("-S");
    }
    let mut dst = Lm::start(dir, &format!("{name}-dst"), &args);
    let mut caps = vec!["dirty-bitmaps"];
    if late {
        caps.push("late-block-activate");
    }
    dst.caps_on(&caps);
    src.caps_on(&["dirty-bitmaps"]);
    src.migrate(&uri);
    src.wait_completed();
    dst.wait_completed();
    assert_eq!(dst.bitmap_info("pb")["count"], 1 << 20);
    (dst, dst_img)
}

fn assert_image_unlocked(img: &std::path::Path) {
    let (ok, out) = qemu_img(&["info", img.to_str().unwrap()]);
    assert!(ok, "{} is locked: {out}", img.display());
}

#[test]
fn late_block_activate_keeps_a_paused_destinations_disks_inactive_until_cont() {
    let dir = tempdir();
    let (mut dst, img) = migrate_to(dir.path(), "late", true, true);
    assert_eq!(dst.status(), "paused");
    // Inactive: nobody holds the image, the guest cannot write it.
    assert_image_unlocked(&img);
    let out = dst.qemu_io("write -P 0x11 2M 64k");
    assert!(
        !out.starts_with("wrote"),
        "an inactive disk took a write: {out}"
    );
    // `cont` takes the disks, then runs the guest.
    dst.ok("cont", json!({}));
    assert_eq!(dst.status(), "running");
    assert_image_locked(&img);
    let out = dst.qemu_io("write -P 0x11 2M 64k");
    assert!(out.starts_with("wrote"), "{out}");
    let _ = dst.qmp.execute("quit", json!({}));
    assert_eq!(dst.proc.wait_exit(TIMEOUT), Some(0));
    assert_eq!(
        image_bitmaps(&img),
        vec![json!({"flags": ["auto"], "name": "pb", "granularity": 65536})]
    );
    assert_image_clean(&img);
}

#[test]
fn without_late_block_activate_or_without_s_the_disks_are_taken_at_once() {
    let dir = tempdir();
    // The capability off: a paused destination has its disks.
    let (mut dst, img) = migrate_to(dir.path(), "early", false, true);
    assert_eq!(dst.status(), "paused");
    assert_image_locked(&img);
    drop(dst);
    // The capability on, but the guest runs at once: it needs its disks.
    let (mut dst, img) = migrate_to(dir.path(), "running", true, false);
    assert_eq!(dst.status(), "running");
    assert_image_locked(&img);
    let out = dst.qemu_io("write -P 0x11 2M 64k");
    assert!(out.starts_with("wrote"), "{out}");
}
