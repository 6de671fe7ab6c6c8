//! `x-livemig-integrity` is livemig's own: towards QEMU 7.2 it fails clearly, as a
//! capability mismatch does, and QEMU streams are unchanged while it is off (the other
//! `qemu_*` tests).
//!
//! * livemig → QEMU with the capability on: the configuration section lists it, QEMU 7.2
//!   refuses the stream ("Received unknown capability x-livemig-integrity"), and the livemig
//!   source fails and resumes its guest.
//! * QEMU → livemig with the capability on at the destination: the stream lacks it, the
//!   destination fails ("Capability x-livemig-integrity is on, but received capability is
//!   off") and never runs the guest.

mod qemu_common;

use qemu_common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn qemu_integrity_is_refused_both_ways() {
    let Some(tmp) = setup("qemu_integrity_is_refused_both_ways") else {
        return;
    };
    let dir = tmp.path();

    let uri = format!("unix:{}", dir.join("q.sock").display());
    let mut qd = qemu(dir, "qemu-dst", &strings(&["-incoming", "defer"]));
    qd.qmp().ok("migrate-incoming", json!({ "uri": uri }));
    let src = livemig(dir, "lm-src", &[]);
    let mut s = src.qmp();
    s.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-livemig-integrity", "state": true}]}),
    );
    s.ok("migrate", json!({ "uri": uri }));
    let st = wait(&mut s, &["completed", "failed", "cancelled"]);
    assert_eq!(st["status"], "failed", "{st}");
    assert_eq!(s.ok("query-status", json!({}))["status"], "running");
    let how = ended(&mut qd, Duration::from_secs(15));
    assert_ne!(how, Ended::Running, "QEMU took the stream");
    assert!(
        qd.log()
            .contains("Received unknown capability x-livemig-integrity"),
        "{}",
        qd.log()
    );

    let lm_uri = format!("unix:{}", dir.join("lm.sock").display());
    let mut dst = livemig(dir, "lm-dst", &strings(&["-incoming", "defer"]));
    let mut d = dst.qmp();
    d.ok("migrate-incoming", json!({ "uri": lm_uri }));
    d.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-livemig-integrity", "state": true}]}),
    );
    let qs = qemu(dir, "qemu-src", &[]);
    let mut q = qs.qmp();
    q.ok("migrate", json!({ "uri": lm_uri }));
    // The destination's load fails: it exits with status 1, as QEMU's, never running the
    // guest, with its error on stderr.
    let (_, exit) = incoming_end(&mut dst, &mut d);
    assert_eq!(exit, Some(1), "{}", dst.log());
    assert!(
        dst.log().contains(
            "load of migration failed: Capability x-livemig-integrity is on, but received capability is off"
        ),
        "{}",
        dst.log()
    );
}
