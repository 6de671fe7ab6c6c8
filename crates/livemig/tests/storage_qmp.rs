//! The NBD server and block job commands side by side with QEMU 7.2: the same sequence of
//! commands goes to `qemu-system-x86_64 -M none` and to `livemig vm -M none`, and every reply
//! (return value, or error class and text) and every job event must be the same.

mod common;

use common::{Lm, TIMEOUT};
use serde_json::{json, Value};
use std::path::Path;
use testkit::{QmpClient, VmProcess};

fn livemig(dir: &Path) -> (VmProcess, QmpClient) {
    let Lm { proc, qmp, .. } = Lm::start(dir, "lm", &["-M", "none", "-m", "16M"]);
    (proc, qmp)
}

/// QEMU 7.2 and livemig, both `-M none`, in one scratch directory: (the directory, the two
/// processes, which must outlive the test, QEMU's monitor, livemig's).
fn side_by_side() -> (
    tempfile::TempDir,
    (VmProcess, VmProcess),
    QmpClient,
    QmpClient,
) {
    let dir = testkit::tempdir();
    let qp = VmProcess::qemu_none(dir.path(), "qemu", &[]).unwrap();
    let q = qp.qmp();
    let (lp, l) = livemig(dir.path());
    (dir, (qp, lp), q, l)
}

/// The part of a reply that must match: the return value, or the error's class and text.
fn outcome(q: &mut QmpClient, cmd: &str, args: &Value) -> Value {
    let r = q.execute(cmd, args.clone()).unwrap();
    match r.get("error") {
        Some(e) => json!({"error": e["desc"], "class": e["class"]}),
        None => json!({"return": r["return"]}),
    }
}

fn both(q: &mut QmpClient, l: &mut QmpClient, cmd: &str, args: Value) -> Value {
    let a = outcome(q, cmd, &args);
    let b = outcome(l, cmd, &args);
    assert_eq!(b, a, "{cmd} {args}: livemig differs from QEMU");
    a
}

/// Job events (name and data) up to the job's `null` status.
fn job_events(q: &mut QmpClient, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let id = id.to_string();
    loop {
        let i = id.clone();
        let e = q
            .wait_event(TIMEOUT, move |e| {
                let ev = e["event"].as_str().unwrap_or_default();
                (ev.starts_with("BLOCK_JOB") || ev == "JOB_STATUS_CHANGE")
                    && (e["data"]["id"] == i.as_str() || e["data"]["device"] == i.as_str())
            })
            .unwrap_or_else(|| panic!("job {id} did not end; saw {out:?}"));
        let done = e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == "null";
        out.push(json!({"event": e["event"], "data": e["data"]}));
        if done {
            return out;
        }
    }
}

fn wait_ready(q: &mut QmpClient, id: &str) {
    let i = id.to_string();
    q.wait_event(TIMEOUT, move |e| {
        e["event"] == "BLOCK_JOB_READY" && e["data"]["device"] == i.as_str()
    })
    .unwrap_or_else(|| panic!("{id} never ready"));
}

#[test]
fn nbd_server_commands_match_qemu() {
    if !testkit::require("nbd_server_commands_match_qemu", testkit::qemu()) {
        return;
    }
    let (dir, _procs, mut q, mut l) = side_by_side();
    for (name, ro) in [("d0", false), ("ro", true)] {
        both(
            &mut q,
            &mut l,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": name, "size": 64 << 20,
                   "read-zeroes": true, "read-only": ro}),
        );
    }
    both(&mut q, &mut l, "nbd-server-add", json!({"device": "d0"}));
    both(&mut q, &mut l, "nbd-server-stop", json!({}));
    both(&mut q, &mut l, "nbd-server-remove", json!({"name": "x"}));
    both(&mut q, &mut l, "block-export-del", json!({"id": "x"}));
    both(
        &mut q,
        &mut l,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": "/nonexistent/x"}}),
    );
    for max in [json!(4294967296u64), json!(-1), json!("4")] {
        both(
            &mut q,
            &mut l,
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "/nonexistent/x"}},
                   "max-connections": max}),
        );
    }
    for (c, who) in [(&mut q, "q"), (&mut l, "l")] {
        let p = dir.path().join(format!("{who}-nbd.sock"));
        let r = c.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": p.to_str().unwrap()}}}),
        );
        assert!(r.unwrap().get("return").is_some());
    }
    both(
        &mut q,
        &mut l,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "/nonexistent/x"}}}),
    );
    both(&mut q, &mut l, "nbd-server-add", json!({"device": "nope"}));
    both(
        &mut q,
        &mut l,
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "b1"}),
    );
    both(
        &mut q,
        &mut l,
        "nbd-server-add",
        json!({"device": "d0", "bitmap": "b1"}),
    );
    both(
        &mut q,
        &mut l,
        "nbd-server-add",
        json!({"device": "d0", "bitmap": "nob"}),
    );
    both(
        &mut q,
        &mut l,
        "nbd-server-add",
        json!({"device": "ro", "writable": true}),
    );
    both(
        &mut q,
        &mut l,
        "nbd-server-add",
        json!({"device": "d0", "name": "1x"}),
    );
    both(
        &mut q,
        &mut l,
        "block-dirty-bitmap-disable",
        json!({"node": "d0", "name": "b1"}),
    );
    both(
        &mut q,
        &mut l,
        "nbd-server-add",
        json!({"device": "d0", "bitmap": "b1", "name": "e1"}),
    );
    both(
        &mut q,
        &mut l,
        "block-dirty-bitmap-remove",
        json!({"node": "d0", "name": "b1"}),
    );
    both(
        &mut q,
        &mut l,
        "nbd-server-add",
        json!({"device": "d0", "name": "e1"}),
    );
    both(
        &mut q,
        &mut l,
        "nbd-server-add",
        json!({"device": "d0", "name": "e2", "writable": true}),
    );
    both(
        &mut q,
        &mut l,
        "block-export-add",
        json!({"type": "nbd", "id": "e2", "node-name": "d0"}),
    );
    both(
        &mut q,
        &mut l,
        "block-export-add",
        json!({"type": "nbd", "id": "e3", "node-name": "d0", "name": "e1"}),
    );
    both(&mut q, &mut l, "query-block-exports", json!({}));
    // Argument types, checked by the same visitor as every other command.
    for args in [
        json!({"type": "nbd", "id": "e4", "node-name": "d0", "bitmaps": ["b1", 7]}),
        json!({"type": "nbd", "id": "e4", "node-name": "d0", "bitmaps": "b1"}),
        json!({"id": "e4", "node-name": "d0"}),
        json!({"type": "nbd", "id": "e4", "node-name": "d0", "writable": null}),
        json!({"type": "nbd", "id": "e4", "node-name": "d0", "bogus": 1}),
    ] {
        both(&mut q, &mut l, "block-export-add", args);
    }
    // The other form of a `bitmaps` element: {node, name}.
    both(
        &mut q,
        &mut l,
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "b2"}),
    );
    for bitmap in [
        json!({"node": "d0"}),
        json!({"node": "d0", "name": "b2", "x": 1}),
        json!({"node": "d0", "name": "b2"}),
    ] {
        both(
            &mut q,
            &mut l,
            "block-export-add",
            json!({"type": "nbd", "id": "e5", "node-name": "d0", "bitmaps": [bitmap]}),
        );
    }
    // ... which may name any node's bitmap, enabled or not, on a read-only export.
    both(
        &mut q,
        &mut l,
        "block-dirty-bitmap-add",
        json!({"node": "ro", "name": "b3"}),
    );
    both(
        &mut q,
        &mut l,
        "block-export-add",
        json!({"type": "nbd", "id": "e6", "node-name": "d0",
               "bitmaps": [{"node": "nope", "name": "b3"}]}),
    );
    for bitmap in [
        json!({"node": "nope", "name": "b3"}),
        json!({"node": "ro", "name": "zz"}),
        json!({"node": "ro", "name": "b3"}),
    ] {
        both(
            &mut q,
            &mut l,
            "block-export-add",
            json!({"type": "nbd", "id": "e6", "node-name": "d0", "name": "e6",
                   "bitmaps": [bitmap]}),
        );
    }
    // Exported, the bitmap is busy.
    both(
        &mut q,
        &mut l,
        "block-dirty-bitmap-remove",
        json!({"node": "ro", "name": "b3"}),
    );
    both(&mut q, &mut l, "query-block-exports", json!({}));
    both(&mut q, &mut l, "blockdev-del", json!({"node-name": "d0"}));
    both(
        &mut q,
        &mut l,
        "nbd-server-remove",
        json!({"name": "e1", "mode": "bogus"}),
    );
    both(&mut q, &mut l, "nbd-server-remove", json!({"name": "nope"}));
    both(&mut q, &mut l, "nbd-server-remove", json!({"name": "e1"}));
    both(
        &mut q,
        &mut l,
        "block-dirty-bitmap-remove",
        json!({"node": "d0", "name": "b1"}),
    );
    both(&mut q, &mut l, "query-block-exports", json!({}));
    both(&mut q, &mut l, "nbd-server-stop", json!({}));
    both(&mut q, &mut l, "query-block-exports", json!({}));
    both(&mut q, &mut l, "blockdev-del", json!({"node-name": "d0"}));
}

#[test]
fn mirror_commands_and_events_match_qemu() {
    if !testkit::require("mirror_commands_and_events_match_qemu", testkit::qemu()) {
        return;
    }
    let (_dir, _procs, mut q, mut l) = side_by_side();
    for (name, size) in [("src", 64 << 20), ("tgt", 64 << 20), ("small", 32 << 20)] {
        both(
            &mut q,
            &mut l,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": name, "size": size, "read-zeroes": true}),
        );
    }
    let m = |extra: Value| {
        let mut a = json!({"job-id": "j0", "device": "src", "target": "tgt", "sync": "full"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    both(
        &mut q,
        &mut l,
        "block-job-cancel",
        json!({"device": "nope"}),
    );
    both(
        &mut q,
        &mut l,
        "block-job-complete",
        json!({"device": "nope"}),
    );
    both(
        &mut q,
        &mut l,
        "block-job-set-speed",
        json!({"device": "nope", "speed": 1}),
    );
    for args in [
        json!({"device": "nope"}),
        json!({"device": "nope", "speed": 18446744073709551615u64}),
        json!({"device": "nope", "speed": 1.5}),
        json!({"device": 3, "speed": 1}),
    ] {
        both(&mut q, &mut l, "block-job-set-speed", args);
    }
    both(
        &mut q,
        &mut l,
        "block-job-cancel",
        json!({"device": "nope", "force": "yes"}),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"sync": "incremental"})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"granularity": 18446744073709551615u64})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"sync": "bogus"})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"granularity": 1000})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"granularity": 256})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"buf-size": -1})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"target": "src"})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"job-id": "1j"})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"device": "nope"})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"target": "nope"})),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        json!({"device": "src", "target": "tgt", "sync": "full"}),
    );
    both(&mut q, &mut l, "blockdev-mirror", m(json!({"speed": -1})));
    // That job was created and destroyed inside the command (its `created` and `null` status
    // changes): take its events now, or the next job's wait would stop at this `null` and
    // every later wait would lag one job behind, racing the queries that follow it.
    assert_eq!(job_events(&mut l, "j0"), job_events(&mut q, "j0"));

    // A size mismatch starts the job, which fails at once.
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"target": "small"})),
    );
    assert_eq!(job_events(&mut l, "j0"), job_events(&mut q, "j0"));

    // Ready, then cancel: the job completes (the target holds a consistent copy).
    both(&mut q, &mut l, "blockdev-mirror", m(json!({})));
    wait_ready(&mut q, "j0");
    wait_ready(&mut l, "j0");
    both(&mut q, &mut l, "query-block-jobs", json!({}));
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"job-id": "j2"})),
    );
    both(&mut q, &mut l, "blockdev-del", json!({"node-name": "src"}));
    both(&mut q, &mut l, "blockdev-del", json!({"node-name": "tgt"}));
    both(
        &mut q,
        &mut l,
        "block-job-set-speed",
        json!({"device": "j0", "speed": -1}),
    );
    both(&mut q, &mut l, "block-job-cancel", json!({"device": "j0"}));
    let qe = job_events(&mut q, "j0");
    assert_eq!(job_events(&mut l, "j0"), qe);
    assert!(qe.iter().any(|e| e["event"] == "BLOCK_JOB_COMPLETED"));
    both(&mut q, &mut l, "query-block-jobs", json!({}));

    // Ready, then complete.
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"job-id": "j4"})),
    );
    wait_ready(&mut q, "j4");
    wait_ready(&mut l, "j4");
    both(
        &mut q,
        &mut l,
        "block-job-complete",
        json!({"device": "j4"}),
    );
    assert_eq!(job_events(&mut l, "j4"), job_events(&mut q, "j4"));

    // sync=none, ready at once; a forced cancel is a cancel.
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        m(json!({"job-id": "j5", "sync": "none"})),
    );
    wait_ready(&mut q, "j5");
    wait_ready(&mut l, "j5");
    both(
        &mut q,
        &mut l,
        "block-job-cancel",
        json!({"device": "j5", "force": true}),
    );
    let qe = job_events(&mut q, "j5");
    assert_eq!(job_events(&mut l, "j5"), qe);
    assert!(qe.iter().any(|e| e["event"] == "BLOCK_JOB_CANCELLED"));
    both(&mut q, &mut l, "query-jobs", json!({}));
}

/// Waits for `id`'s JOB_STATUS_CHANGE to `status`.
fn wait_status(q: &mut QmpClient, id: &str, status: &str) {
    let (i, st) = (id.to_string(), status.to_string());
    q.wait_event(TIMEOUT, move |e| {
        e["event"] == "JOB_STATUS_CHANGE"
            && e["data"]["id"] == i.as_str()
            && e["data"]["status"] == st.as_str()
    })
    .unwrap_or_else(|| panic!("{id} never {status}"));
}

/// A query's jobs without the fields that depend on how far each implementation copied.
fn jobs_without_progress(q: &mut QmpClient, l: &mut QmpClient, cmd: &str) -> Value {
    jobs_without(q, l, cmd, &[])
}

/// [`jobs_without_progress`], also without the fields `also` (a sample of a state that
/// changes while the job runs, such as `busy` in a retry loop).
fn jobs_without(q: &mut QmpClient, l: &mut QmpClient, cmd: &str, also: &[&str]) -> Value {
    let strip = |mut v: Value| {
        for j in v["return"].as_array_mut().into_iter().flatten() {
            for k in ["offset", "len", "current-progress", "total-progress"]
                .iter()
                .chain(also)
            {
                j.as_object_mut().unwrap().remove(*k);
            }
        }
        v
    };
    let a = strip(outcome(q, cmd, &json!({})));
    let b = strip(outcome(l, cmd, &json!({})));
    assert_eq!(b, a, "{cmd}: livemig differs from QEMU");
    a
}

#[test]
fn job_verbs_match_qemu() {
    if !testkit::require("job_verbs_match_qemu", testkit::qemu()) {
        return;
    }
    let (_dir, _procs, mut q, mut l) = side_by_side();
    for name in ["src", "tgt"] {
        both(
            &mut q,
            &mut l,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": name, "size": 64 << 20, "read-zeroes": true}),
        );
    }
    for (cmd, args) in [
        ("block-job-pause", json!({"device": "nope"})),
        ("block-job-resume", json!({"device": "nope"})),
        ("block-job-finalize", json!({"id": "nope"})),
        ("block-job-dismiss", json!({"id": "nope"})),
        ("block-job-pause", json!({})),
        ("block-job-finalize", json!({"device": "nope"})),
        ("job-pause", json!({"id": "nope"})),
        ("job-resume", json!({"id": "nope"})),
        ("job-cancel", json!({"id": "nope"})),
        ("job-complete", json!({"id": "nope"})),
        ("job-finalize", json!({"id": "nope"})),
        ("job-dismiss", json!({"id": "nope"})),
        ("job-dismiss", json!({"id": 1})),
    ] {
        both(&mut q, &mut l, cmd, args);
    }
    // A slow job (1 B/s), left pending and concluded for the user.
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        json!({"job-id": "j0", "device": "src", "target": "tgt", "sync": "full", "speed": 1,
               "auto-finalize": false, "auto-dismiss": false}),
    );
    for (cmd, args) in [
        ("block-job-resume", json!({"device": "j0"})),
        ("block-job-complete", json!({"device": "j0"})),
        ("block-job-finalize", json!({"id": "j0"})),
        ("job-dismiss", json!({"id": "j0"})),
        ("block-job-pause", json!({"device": "j0"})),
    ] {
        both(&mut q, &mut l, cmd, args);
    }
    wait_status(&mut q, "j0", "paused");
    wait_status(&mut l, "j0", "paused");
    for (cmd, args) in [
        ("block-job-pause", json!({"device": "j0"})),
        ("job-pause", json!({"id": "j0"})),
        ("block-job-cancel", json!({"device": "j0"})),
        ("job-complete", json!({"id": "j0"})),
    ] {
        both(&mut q, &mut l, cmd, args);
    }
    jobs_without_progress(&mut q, &mut l, "query-jobs");
    let paused = jobs_without_progress(&mut q, &mut l, "query-block-jobs");
    assert_eq!(paused["return"][0]["status"], "paused");
    assert_eq!(paused["return"][0]["paused"], true);
    both(
        &mut q,
        &mut l,
        "block-job-set-speed",
        json!({"device": "j0", "speed": 0}),
    );
    both(&mut q, &mut l, "job-resume", json!({"id": "j0"}));
    wait_ready(&mut q, "j0");
    wait_ready(&mut l, "j0");
    // Paused while ready: standby, where complete is taken and waits for the resume.
    both(&mut q, &mut l, "job-pause", json!({"id": "j0"}));
    wait_status(&mut q, "j0", "standby");
    wait_status(&mut l, "j0", "standby");
    jobs_without_progress(&mut q, &mut l, "query-block-jobs");
    both(
        &mut q,
        &mut l,
        "block-job-complete",
        json!({"device": "j0"}),
    );
    both(&mut q, &mut l, "block-job-resume", json!({"device": "j0"}));
    for c in [&mut q, &mut l] {
        c.wait_event(TIMEOUT, |e| e["event"] == "BLOCK_JOB_PENDING")
            .expect("no BLOCK_JOB_PENDING");
    }
    let pending = jobs_without_progress(&mut q, &mut l, "query-jobs");
    assert_eq!(pending["return"][0]["status"], "pending");
    for (cmd, args) in [
        ("job-complete", json!({"id": "j0"})),
        ("job-pause", json!({"id": "j0"})),
        ("block-job-set-speed", json!({"device": "j0", "speed": 1})),
        ("job-dismiss", json!({"id": "j0"})),
        ("block-job-finalize", json!({"id": "j0"})),
    ] {
        both(&mut q, &mut l, cmd, args);
    }
    wait_status(&mut q, "j0", "concluded");
    wait_status(&mut l, "j0", "concluded");
    let concluded = jobs_without_progress(&mut q, &mut l, "query-block-jobs");
    assert_eq!(concluded["return"][0]["status"], "concluded");
    for (cmd, args) in [
        ("block-job-cancel", json!({"device": "j0"})),
        ("job-finalize", json!({"id": "j0"})),
        ("block-job-dismiss", json!({"id": "j0"})),
    ] {
        both(&mut q, &mut l, cmd, args);
    }
    assert_eq!(job_events(&mut l, "j0"), job_events(&mut q, "j0"));
    both(&mut q, &mut l, "query-jobs", json!({}));

    // job-cancel forces: a ready mirror is cancelled, and a concluded job keeps the error
    // until it is dismissed.
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        json!({"job-id": "j1", "device": "src", "target": "tgt", "sync": "full",
               "auto-dismiss": false}),
    );
    wait_ready(&mut q, "j1");
    wait_ready(&mut l, "j1");
    both(&mut q, &mut l, "job-cancel", json!({"id": "j1"}));
    wait_status(&mut q, "j1", "concluded");
    wait_status(&mut l, "j1", "concluded");
    let cancelled = jobs_without_progress(&mut q, &mut l, "query-jobs");
    assert_eq!(cancelled["return"][0]["error"], "Operation canceled");
    jobs_without_progress(&mut q, &mut l, "query-block-jobs");
    both(&mut q, &mut l, "job-dismiss", json!({"id": "j1"}));
    assert_eq!(job_events(&mut l, "j1"), job_events(&mut q, "j1"));
    both(&mut q, &mut l, "query-block-jobs", json!({}));
}

/// Runs `prog` with `args`, which must succeed.
fn run_ok(prog: &str, args: &[&str]) {
    let out = std::process::Command::new(prog)
        .args(args)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img create` of a 1 MiB qcow2 `overlay` over the qcow2 `backing`; `unchecked` is
/// `-u`, for a backing file that does not exist yet.
fn qcow2_over(backing: &str, overlay: &str, unchecked: bool) {
    let mut args = vec!["create", "-f", "qcow2"];
    if unchecked {
        args.push("-u");
    }
    args.extend(["-b", backing, "-F", "qcow2", overlay, "1M"]);
    run_ok("qemu-img", &args);
}

/// One side's images for the oVirt-like storage migration of QEMU's iotest 156: a chain
/// `t.qcow2.backing <- t.qcow2` with data in both, started as `-drive if=none,id=source`
/// without a format.
fn chain_156(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let p = |s: &str| dir.join(s).to_str().unwrap().to_string();
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", &p("t.qcow2.backing"), "1M"],
    );
    qcow2_over(&p("t.qcow2.backing"), &p("t.qcow2"), false);
    run_ok(
        "qemu-io",
        &["-c", "write -P 1 0 256k", &p("t.qcow2.backing")],
    );
    run_ok("qemu-io", &["-c", "write -P 2 64k 192k", &p("t.qcow2")]);
    format!("if=none,id=source,file={}", p("t.qcow2"))
}

/// The timing line of qemu-io is a measurement; the rest of what it prints must be QEMU's.
fn printed(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| !l.starts_with("livemig: ") && !l.starts_with("qemu-system-x86_64: "))
        .map(|l| match l.split_once(" ops; ") {
            Some((head, _)) => format!("{head} ops; TIMING"),
            None => l.to_string(),
        })
        .collect()
}

/// `drive-mirror sync=top mode=existing` onto an overlay whose backing chain is copied in
/// place only while the job runs (QEMU's iotest 156), side by side with QEMU 7.2: the target
/// is opened without its backing chain, only what the source's top image holds is copied
/// (`BLOCK_JOB_READY` counts 128 KiB, not the whole disk), `block-job-complete` opens the
/// target's chain and moves the drive onto the target (`query-block` names it), and the drive
/// then reads through the target's chain after the source images are gone; the target image
/// holds everything. Before, livemig opened the target's chain at once (the command failed:
/// the chain did not exist yet), copied the whole disk for `sync=top`, and left the drive on
/// the source after `block-job-complete`; and the job could report `ready` before the
/// command's reply.
#[test]
fn drive_mirror_top_pivots_onto_the_targets_chain_as_qemu() {
    if !testkit::require(
        "drive_mirror_top_pivots_onto_the_targets_chain_as_qemu",
        testkit::qemu(),
    ) {
        return;
    }
    let dir = testkit::tempdir();
    let (qd, ld) = (dir.path().join("q"), dir.path().join("l"));
    let (qdrive, ldrive) = (chain_156(&qd), chain_156(&ld));
    let mut qp = VmProcess::qemu_none(dir.path(), "qemu", &["-drive".into(), qdrive]).unwrap();
    let mut q = qp.qmp();
    let Lm {
        proc: mut lp,
        qmp: mut l,
        ..
    } = Lm::start(
        dir.path(),
        "lm",
        &["-M", "none", "-m", "16M", "-drive", &ldrive],
    );
    let sides = [(&qd, &mut q), (&ld, &mut l)];
    let mut events = Vec::new();
    let mut blocks = Vec::new();
    for (d, c) in sides {
        let p = |s: &str| d.join(s).to_str().unwrap().to_string();
        qcow2_over(&p("t.qcow2"), &p("t.qcow2.overlay"), true);
        c.ok(
            "blockdev-snapshot-sync",
            json!({"device": "source", "snapshot-file": p("t.qcow2.overlay"),
                   "format": "qcow2", "mode": "existing"}),
        );
        assert_eq!(c.hmp(r#"qemu-io source "write -P 3 128k 128k""#), "");
        qcow2_over(&p("t.qcow2.target"), &p("t.qcow2.target.overlay"), true);
        c.events.clear();
        c.ok(
            "drive-mirror",
            json!({"device": "source", "target": p("t.qcow2.target.overlay"),
                   "mode": "existing", "sync": "top"}),
        );
        // The job runs once the reply is out: before it, only its creation is reported.
        let before: Vec<&Value> = c.events.iter().map(|e| &e["data"]["status"]).collect();
        assert_eq!(before, [&json!("created"), &json!("running")]);
        let ready = c
            .wait_event(TIMEOUT, |e| e["event"] == "BLOCK_JOB_READY")
            .expect("ready");
        assert_eq!(ready["data"]["len"], 131072, "{ready}");
        assert_eq!(c.hmp(r#"qemu-io source "write -P 4 192k 64k""#), "");
        std::fs::copy(p("t.qcow2.backing"), p("t.qcow2.target.backing")).unwrap();
        std::fs::copy(p("t.qcow2"), p("t.qcow2.target")).unwrap();
        run_ok(
            "qemu-img",
            &[
                "rebase",
                "-u",
                "-b",
                &p("t.qcow2.target.backing"),
                "-F",
                "qcow2",
                &p("t.qcow2.target"),
            ],
        );
        c.ok("block-job-complete", json!({"device": "source"}));
        events.push(job_events(c, "source"));
        let b = c.ok("query-block", json!({}));
        let prefix = format!("{}/", d.display());
        blocks.push(json!({
            "file": b[0]["inserted"]["file"].as_str().unwrap().replace(&prefix, ""),
            "backing_file": b[0]["inserted"]["backing_file"].as_str().unwrap().replace(&prefix, ""),
        }));
        for f in ["t.qcow2", "t.qcow2.backing", "t.qcow2.overlay"] {
            std::fs::remove_file(p(f)).unwrap();
        }
        for r in [
            "read -P 1 0k 64k",
            "read -P 2 64k 64k",
            "read -P 3 128k 64k",
            "read -P 4 192k 64k",
        ] {
            assert_eq!(c.hmp(&format!("qemu-io source \"{r}\"")), "");
        }
        c.ok("quit", json!({}));
    }
    assert_eq!(events[1], events[0]);
    assert_eq!(blocks[1], blocks[0]);
    assert_eq!(
        blocks[0],
        json!({"file": "t.qcow2.target.overlay", "backing_file": "t.qcow2.target"})
    );
    assert_eq!(qp.wait_exit(TIMEOUT), Some(0));
    assert_eq!(lp.wait_exit(TIMEOUT), Some(0));
    let (theirs, ours) = (printed(&qp.log()), printed(&lp.log()));
    assert_eq!(ours, theirs);
    assert!(
        !ours
            .iter()
            .any(|l| l.contains("Pattern verification failed")),
        "{ours:?}"
    );
    assert_eq!(
        ours.iter()
            .filter(|l| l.starts_with("read 65536/65536"))
            .count(),
        4
    );
    // The target image alone holds what the drive had.
    for d in [&qd, &ld] {
        let img = d.join("t.qcow2.target.overlay");
        for r in [
            "read -P 1 0k 64k",
            "read -P 2 64k 64k",
            "read -P 3 128k 64k",
            "read -P 4 192k 64k",
        ] {
            let out = std::process::Command::new("qemu-io")
                .args(["-c", r, img.to_str().unwrap()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.starts_with("read 65536/65536"),
                "{}: {r}: {text}",
                img.display()
            );
        }
    }
}

/// A `tmpfs` of `size` mounted on `dir` for one test, unmounted (lazily: a process may still
/// hold a file there) when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// The mount, or why it could not be made (not root, no mount permission).
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let dir = self.0.to_str().unwrap();
        run_ok("mount", &["-o", &format!("remount,size={size}"), dir]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// `id`'s job events, stripped of how far each implementation had copied, up to and
/// including the first one `last` accepts.
fn job_events_until(q: &mut QmpClient, id: &str, last: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let i = id.to_string();
        let e = q
            .wait_event(TIMEOUT, move |e| {
                let ev = e["event"].as_str().unwrap_or_default();
                (ev.starts_with("BLOCK_JOB") || ev == "JOB_STATUS_CHANGE")
                    && (e["data"]["id"] == i.as_str() || e["data"]["device"] == i.as_str())
            })
            .unwrap_or_else(|| panic!("job {id}: no further event; saw {out:?}"));
        let mut data = e["data"].clone();
        for k in ["len", "offset"] {
            data.as_object_mut().unwrap().remove(k);
        }
        let ev = json!({"event": e["event"], "data": data});
        let done = last(&ev);
        out.push(ev);
        if done {
            return out;
        }
    }
}

fn status_is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == status
}

/// One `tmpfs` of `size` each for QEMU and livemig (`fs-qemu{suffix}`, `fs-lm{suffix}` in
/// `dir`); `None`, after printing why test `t` is skipped, where none can be mounted.
fn tmpfs_pair(dir: &Path, suffix: &str, size: &str, t: &str) -> Option<Vec<Tmpfs>> {
    let mut mounts = Vec::new();
    for who in ["qemu", "lm"] {
        match Tmpfs::mount(&dir.join(format!("fs-{who}{suffix}")), size) {
            Ok(m) => mounts.push(m),
            Err(why) => {
                println!("SKIP {t}: cannot mount a tmpfs ({why}); needs root");
                return None;
            }
        }
    }
    Some(mounts)
}

/// A raw image of `size` patterned bytes in `dir`, added as node `src` to both; returns its
/// path and bytes.
fn raw_source(
    dir: &Path,
    q: &mut QmpClient,
    l: &mut QmpClient,
    size: usize,
) -> (std::path::PathBuf, Vec<u8>) {
    let src = dir.join("src.raw");
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8 | 1).collect();
    std::fs::write(&src, &data).unwrap();
    both(
        q,
        l,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src",
               "file": {"driver": "file", "filename": src.to_str().unwrap()}}),
    );
    (src, data)
}

/// A mirror onto a raw image on a `tmpfs` too small for it, with `on-target-error=enospc`
/// and `stop`: the job pauses with `io-status` `nospace` once the file system is full;
/// after the `tmpfs` is grown, `block-job-resume` resumes it, it becomes ready, completes,
/// and the target holds the source's bytes. With `ignore` it retries until the `tmpfs` is
/// grown, then the same; with `report` it fails with the error. Every reply, every query
/// (but the progress) and every event as QEMU 7.2's in the same scenario.
#[test]
fn a_full_target_stops_the_mirror_until_resumed_as_qemu() {
    const T: &str = "a_full_target_stops_the_mirror_until_resumed_as_qemu";
    if !testkit::require(T, testkit::qemu()) {
        return;
    }
    let (dir, _procs, mut q, mut l) = side_by_side();
    let size = 8usize << 20;
    let (_, data) = raw_source(dir.path(), &mut q, &mut l, size);
    for (n, policy) in ["enospc", "stop", "ignore", "report"]
        .into_iter()
        .enumerate()
    {
        // One small tmpfs each: 3 MiB for an 8 MiB target.
        let Some(mounts) = tmpfs_pair(dir.path(), &format!("-{n}"), "3m", T) else {
            return;
        };
        let tgt = format!("t{n}");
        for (c, m) in [(&mut q, &mounts[0]), (&mut l, &mounts[1])] {
            let file = m.0.join("tgt.raw");
            std::fs::File::create(&file)
                .unwrap()
                .set_len(size as u64)
                .unwrap();
            c.ok(
                "blockdev-add",
                json!({"driver": "raw", "node-name": tgt,
                       "file": {"driver": "file", "filename": file.to_str().unwrap()}}),
            );
        }
        let id = format!("j{n}");
        // One buffer of one granule: QEMU has one request in flight, so one fails when the
        // file system is full (with more, each one that fails has its BLOCK_JOB_ERROR, as
        // many as were in flight).
        both(
            &mut q,
            &mut l,
            "blockdev-mirror",
            json!({"job-id": id, "device": "src", "target": tgt, "sync": "full",
                   "on-target-error": policy, "auto-dismiss": false,
                   "granularity": 65536, "buf-size": 65536}),
        );
        if policy == "report" {
            let lm = job_events_until(&mut l, &id, status_is("concluded"));
            let qemu = job_events_until(&mut q, &id, status_is("concluded"));
            assert_eq!(lm, qemu, "{policy}: livemig's events differ from QEMU's");
            let failed = jobs_without_progress(&mut q, &mut l, "query-block-jobs");
            assert_eq!(failed["return"][0]["error"], "No space left on device");
            assert_eq!(failed["return"][0]["io-status"], "ok");
            both(&mut q, &mut l, "job-dismiss", json!({"id": id}));
            continue;
        }
        if policy == "ignore" {
            // The job retries the area, announcing every failure, until the file system has
            // room: how many times depends on the speed of each, so repeats count once.
            let error = |e: &Value| e["event"] == "BLOCK_JOB_ERROR";
            let mut lm = job_events_until(&mut l, &id, error);
            let mut qemu = job_events_until(&mut q, &id, error);
            for m in &mounts {
                m.resize("16m");
            }
            let ready = |e: &Value| e["event"] == "BLOCK_JOB_READY";
            lm.extend(job_events_until(&mut l, &id, ready));
            qemu.extend(job_events_until(&mut q, &id, ready));
            lm.dedup();
            qemu.dedup();
            assert_eq!(lm, qemu, "{policy}: livemig's events differ from QEMU's");
            assert!(
                qemu.contains(&json!({"event": "BLOCK_JOB_ERROR",
                    "data": {"device": id, "operation": "write", "action": "ignore"}})),
                "{qemu:?}"
            );
        } else {
            let lm = job_events_until(&mut l, &id, status_is("paused"));
            let qemu = job_events_until(&mut q, &id, status_is("paused"));
            assert_eq!(lm, qemu, "{policy}: livemig's events differ from QEMU's");
            assert!(
                qemu.contains(&json!({"event": "BLOCK_JOB_ERROR",
                    "data": {"device": id, "operation": "write", "action": "stop"}})),
                "{qemu:?}"
            );
            let paused = jobs_without_progress(&mut q, &mut l, "query-block-jobs");
            assert_eq!(paused["return"][0]["io-status"], "nospace", "{paused}");
            jobs_without_progress(&mut q, &mut l, "query-jobs");
            // What the user may and may not do with a job an error paused.
            for (cmd, args) in [
                ("block-job-pause", json!({"device": id})),
                ("block-job-complete", json!({"device": id})),
                ("block-job-cancel", json!({"device": id})),
                ("block-job-set-speed", json!({"device": id, "speed": 0})),
            ] {
                both(&mut q, &mut l, cmd, args);
            }
            for m in &mounts {
                m.resize("16m");
            }
            both(&mut q, &mut l, "block-job-resume", json!({"device": id}));
            let lm = job_events_until(&mut l, &id, |e| e["event"] == "BLOCK_JOB_READY");
            let qemu = job_events_until(&mut q, &id, |e| e["event"] == "BLOCK_JOB_READY");
            assert_eq!(lm, qemu, "{policy}: livemig's events differ from QEMU's");
        }
        let ready = jobs_without_progress(&mut q, &mut l, "query-block-jobs");
        assert_eq!(ready["return"][0]["io-status"], "ok", "{ready}");
        both(&mut q, &mut l, "block-job-complete", json!({"device": id}));
        let lm = job_events_until(&mut l, &id, status_is("concluded"));
        let qemu = job_events_until(&mut q, &id, status_is("concluded"));
        assert_eq!(lm, qemu, "{policy}: livemig's events differ from QEMU's");
        both(&mut q, &mut l, "job-dismiss", json!({"id": id}));
        for m in &mounts {
            let got = std::fs::read(m.0.join("tgt.raw")).unwrap();
            assert!(
                got == data,
                "{policy}: {} differs from the source",
                m.0.display()
            );
        }
        // Completion pivoted nothing (the source has no device) but the target is ours.
        both(&mut q, &mut l, "blockdev-del", json!({"node-name": tgt}));
    }
}

/// A `qemu-nbd` serving export `src` on `sock`; killed when dropped, if it has not exited.
struct QemuNbd(std::process::Child);

impl QemuNbd {
    /// `qemu-nbd -k SOCK -x src ARGS`, once it listens.
    fn start(sock: &Path, args: &[&str]) -> QemuNbd {
        let child = std::process::Command::new("qemu-nbd")
            .arg("-k")
            .arg(sock)
            .args(["-x", "src"])
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cannot start qemu-nbd");
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-nbd never listened"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        QemuNbd(child)
    }

    /// Serves `image` with reads of the sector at 2 MiB failing (`blkdebug`): QEMU 7.2's server
    /// then drops the connection, so every later request of the client fails too (`EIO`).
    fn failing(image: &Path, sock: &Path) -> QemuNbd {
        let opts = format!(
            "driver=raw,file.driver=blkdebug,file.image.filename={},\
             file.inject-error.0.event=read_aio,file.inject-error.0.iotype=read,\
             file.inject-error.0.errno=5,file.inject-error.0.sector=4096",
            image.display()
        );
        QemuNbd::start(sock, &["--image-opts", &opts])
    }

    /// Serves the raw `image` to up to four clients at once, until killed.
    fn plain(image: &Path, sock: &Path) -> QemuNbd {
        let _ = std::fs::remove_file(sock);
        let image = image.to_str().unwrap();
        QemuNbd::start(sock, &["-t", "-e", "4", "-f", "raw", image])
    }

    /// The server is killed (`SIGKILL`: its clients' next requests find the socket closed).
    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mirror whose source (an NBD export) fails to read, side by side with QEMU 7.2: with
/// `on-source-error=stop` the job pauses (`operation: "read"`, `io-status` `failed`), a
/// resume retries and stops again (the server is gone), and `job-cancel` ends it; with
/// `ignore` it retries until cancelled; with `enospc` (not ENOSPC) and `report` it fails.
/// Same replies, queries and events (repeats of the same `ignore` event counted once).
#[test]
fn a_source_read_error_acts_on_the_policy_as_qemu() {
    const T: &str = "a_source_read_error_acts_on_the_policy_as_qemu";
    if !testkit::require(T, testkit::programs(&["qemu-system-x86_64", "qemu-nbd"])) {
        return;
    }
    let (dir, _procs, mut q, mut l) = side_by_side();
    let size = 4usize << 20;
    let image = dir.path().join("src.raw");
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8 | 1).collect();
    std::fs::write(&image, &data).unwrap();
    for (n, policy) in ["stop", "ignore", "enospc", "report"]
        .into_iter()
        .enumerate()
    {
        let (src, tgt, id) = (format!("s{n}"), format!("t{n}"), format!("j{n}"));
        let mut servers = Vec::new();
        for (c, who) in [(&mut q, "qemu"), (&mut l, "lm")] {
            let sock = dir.path().join(format!("nbd-{who}-{n}.sock"));
            servers.push(QemuNbd::failing(&image, &sock));
            c.ok(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": src, "export": "src",
                       "server": {"type": "unix", "path": sock.to_str().unwrap()}}),
            );
        }
        both(
            &mut q,
            &mut l,
            "blockdev-add",
            json!({"driver": "null-co", "node-name": tgt, "size": size, "read-zeroes": true}),
        );
        // One request in flight in QEMU too (one granule per buffer), so one fails.
        both(
            &mut q,
            &mut l,
            "blockdev-mirror",
            json!({"job-id": id, "device": src, "target": tgt, "sync": "full",
                   "on-source-error": policy, "on-target-error": "stop",
                   "auto-dismiss": false, "granularity": 65536, "buf-size": 65536}),
        );
        let error = |action: &str| {
            json!({"event": "BLOCK_JOB_ERROR",
                   "data": {"device": id, "operation": "read", "action": action}})
        };
        match policy {
            "stop" => {
                let lm = job_events_until(&mut l, &id, status_is("paused"));
                let qemu = job_events_until(&mut q, &id, status_is("paused"));
                assert_eq!(lm, qemu, "{policy}: livemig's events differ from QEMU's");
                assert!(qemu.contains(&error("stop")), "{qemu:?}");
                let paused = jobs_without_progress(&mut q, &mut l, "query-block-jobs");
                assert_eq!(paused["return"][0]["io-status"], "failed", "{paused}");
                both(&mut q, &mut l, "block-job-resume", json!({"device": id}));
                let lm = job_events_until(&mut l, &id, status_is("paused"));
                let qemu = job_events_until(&mut q, &id, status_is("paused"));
                assert_eq!(lm, qemu, "{policy}: livemig's events differ from QEMU's");
                assert_eq!(qemu[1], error("stop"), "{qemu:?}");
                jobs_without_progress(&mut q, &mut l, "query-block-jobs");
                both(&mut q, &mut l, "block-job-cancel", json!({"device": id}));
                both(&mut q, &mut l, "job-cancel", json!({"id": id}));
            }
            "ignore" => {
                let lm = job_events_until(&mut l, &id, |e| e["event"] == "BLOCK_JOB_ERROR");
                let qemu = job_events_until(&mut q, &id, |e| e["event"] == "BLOCK_JOB_ERROR");
                assert_eq!(lm, qemu, "{policy}: livemig's events differ from QEMU's");
                assert_eq!(qemu.last(), Some(&error("ignore")));
                // The job retries without end: whether it is busy when asked is a sample of
                // that loop, in either implementation.
                let running = jobs_without(&mut q, &mut l, "query-block-jobs", &["busy"]);
                assert_eq!(running["return"][0]["status"], "running", "{running}");
                assert_eq!(running["return"][0]["io-status"], "ok", "{running}");
                both(&mut q, &mut l, "job-cancel", json!({"id": id}));
            }
            _ => {}
        }
        let mut lm = job_events_until(&mut l, &id, status_is("concluded"));
        let mut qemu = job_events_until(&mut q, &id, status_is("concluded"));
        lm.dedup();
        qemu.dedup();
        assert_eq!(lm, qemu, "{policy}: livemig's events differ from QEMU's");
        let ended = jobs_without_progress(&mut q, &mut l, "query-block-jobs");
        let why = if matches!(policy, "stop" | "ignore") {
            "Operation canceled"
        } else {
            assert!(qemu.contains(&error("report")), "{qemu:?}");
            "Input/output error"
        };
        assert_eq!(ended["return"][0]["error"], why, "{ended}");
        both(&mut q, &mut l, "job-dismiss", json!({"id": id}));
        for node in [&src, &tgt] {
            both(&mut q, &mut l, "blockdev-del", json!({"node-name": node}));
        }
    }
}

/// A ready mirror whose target's file system fills up (`sync=none`, a guest write copied to
/// a sparse target on a full `tmpfs`), with `on-target-error=stop`: the job parks `standby`,
/// still ready, with `io-status` `nospace`; `block-job-complete` is taken there and acts once
/// the file system has room and the job is resumed. Side by side with QEMU 7.2: same
/// replies, queries and events, and both targets hold the write.
#[test]
fn a_ready_mirror_stopped_by_a_full_target_completes_after_resume_as_qemu() {
    const T: &str = "a_ready_mirror_stopped_by_a_full_target_completes_after_resume_as_qemu";
    if !testkit::require(T, testkit::qemu()) {
        return;
    }
    let (dir, _procs, mut q, mut l) = side_by_side();
    let size = 8usize << 20;
    let Some(mounts) = tmpfs_pair(dir.path(), "", "2m", T) else {
        return;
    };
    for (c, (m, who)) in [(&mut q, (&mounts[0], "qemu")), (&mut l, (&mounts[1], "lm"))] {
        let src = dir.path().join(format!("src-{who}.raw"));
        std::fs::write(&src, vec![1u8; size]).unwrap();
        c.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "src",
                   "file": {"driver": "file", "filename": src.to_str().unwrap()}}),
        );
        let tgt = m.0.join("tgt.raw");
        std::fs::File::create(&tgt)
            .unwrap()
            .set_len(size as u64)
            .unwrap();
        c.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "tgt",
                   "file": {"driver": "file", "filename": tgt.to_str().unwrap()}}),
        );
    }
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        json!({"job-id": "j0", "device": "src", "target": "tgt", "sync": "none",
               "on-target-error": "stop", "granularity": 65536, "buf-size": 65536}),
    );
    let ready = |e: &Value| e["event"] == "BLOCK_JOB_READY";
    let lm = job_events_until(&mut l, "j0", ready);
    let qemu = job_events_until(&mut q, "j0", ready);
    assert_eq!(lm, qemu, "livemig's events differ from QEMU's");
    // Fill each file system, then write to the source: the copy of the write finds no room.
    for m in &mounts {
        let _ = std::fs::write(m.0.join("filler"), vec![0xffu8; 2 << 20]);
    }
    // (QEMU prints qemu-io's report on its standard output, not in the reply.)
    both(
        &mut q,
        &mut l,
        "human-monitor-command",
        json!({"command-line": "qemu-io src \"write -P 0x55 1M 64k\""}),
    );
    // QEMU's qemu-io first drains the node, which parks the job for a moment (standby, then
    // ready again); livemig's qemu-io does not drain.
    let drained = |e: &Value| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == "ready";
    let drain = job_events_until(&mut q, "j0", drained);
    assert_eq!(
        drain,
        [
            json!({"event": "JOB_STATUS_CHANGE", "data": {"status": "standby", "id": "j0"}}),
            json!({"event": "JOB_STATUS_CHANGE", "data": {"status": "ready", "id": "j0"}}),
        ]
    );
    let lm = job_events_until(&mut l, "j0", status_is("standby"));
    let qemu = job_events_until(&mut q, "j0", status_is("standby"));
    assert_eq!(lm, qemu, "livemig's events differ from QEMU's");
    assert_eq!(
        qemu[0],
        json!({"event": "BLOCK_JOB_ERROR",
               "data": {"device": "j0", "operation": "write", "action": "stop"}})
    );
    let stopped = jobs_without_progress(&mut q, &mut l, "query-block-jobs");
    assert_eq!(
        (
            &stopped["return"][0]["io-status"],
            &stopped["return"][0]["ready"]
        ),
        (&json!("nospace"), &json!(true)),
        "{stopped}"
    );
    both(
        &mut q,
        &mut l,
        "block-job-complete",
        json!({"device": "j0"}),
    );
    both(&mut q, &mut l, "block-job-cancel", json!({"device": "j0"}));
    for m in &mounts {
        std::fs::remove_file(m.0.join("filler")).unwrap();
    }
    both(&mut q, &mut l, "block-job-resume", json!({"device": "j0"}));
    let lm = job_events_until(&mut l, "j0", status_is("null"));
    let qemu = job_events_until(&mut q, "j0", status_is("null"));
    assert_eq!(lm, qemu, "livemig's events differ from QEMU's");
    let mut want = vec![0u8; size];
    want[1 << 20..(1 << 20) + (64 << 10)].fill(0x55);
    for m in &mounts {
        let got = std::fs::read(m.0.join("tgt.raw")).unwrap();
        assert!(got == want, "{} does not hold the write", m.0.display());
    }
}

/// `qemu-img` `args`' exit code and output.
fn qemu_img(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("cannot run qemu-img");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The full-`tmpfs` scenario with a qcow2 target, whose clusters are allocated as the copy
/// goes: the write that finds no room fails (ENOSPC), the job stops as QEMU 7.2's does, and
/// once resumed after the `tmpfs` has grown it completes with a target that `qemu-img compare`
/// finds equal to the source and `qemu-img check` finds as QEMU's own target.
#[test]
fn a_full_qcow2_target_stops_the_mirror_until_resumed_as_qemu() {
    const T: &str = "a_full_qcow2_target_stops_the_mirror_until_resumed_as_qemu";
    if !testkit::require(T, testkit::qemu()) {
        return;
    }
    let (dir, _procs, mut q, mut l) = side_by_side();
    let size = 8usize << 20;
    let (src, _) = raw_source(dir.path(), &mut q, &mut l, size);
    let Some(mounts) = tmpfs_pair(dir.path(), "", "3m", T) else {
        return;
    };
    let images: Vec<String> = mounts
        .iter()
        .map(|m| m.0.join("tgt.qcow2").to_str().unwrap().to_string())
        .collect();
    for (c, img) in [(&mut q, &images[0]), (&mut l, &images[1])] {
        run_ok("qemu-img", &["create", "-q", "-f", "qcow2", img, "8M"]);
        c.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "tgt",
                   "file": {"driver": "file", "filename": img}}),
        );
    }
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        json!({"job-id": "j0", "device": "src", "target": "tgt", "sync": "full",
               "on-target-error": "stop", "granularity": 65536, "buf-size": 65536}),
    );
    let lm = job_events_until(&mut l, "j0", status_is("paused"));
    let qemu = job_events_until(&mut q, "j0", status_is("paused"));
    assert_eq!(lm, qemu, "livemig's events differ from QEMU's");
    assert!(
        qemu.contains(&json!({"event": "BLOCK_JOB_ERROR",
            "data": {"device": "j0", "operation": "write", "action": "stop"}})),
        "{qemu:?}"
    );
    let paused = jobs_without_progress(&mut q, &mut l, "query-block-jobs");
    assert_eq!(paused["return"][0]["io-status"], "nospace", "{paused}");
    for m in &mounts {
        m.resize("16m");
    }
    both(&mut q, &mut l, "block-job-resume", json!({"device": "j0"}));
    let ready = |e: &Value| e["event"] == "BLOCK_JOB_READY";
    let lm = job_events_until(&mut l, "j0", ready);
    let qemu = job_events_until(&mut q, "j0", ready);
    assert_eq!(lm, qemu, "livemig's events differ from QEMU's");
    both(
        &mut q,
        &mut l,
        "block-job-complete",
        json!({"device": "j0"}),
    );
    let lm = job_events_until(&mut l, "j0", status_is("null"));
    let qemu = job_events_until(&mut q, "j0", status_is("null"));
    assert_eq!(lm, qemu, "livemig's events differ from QEMU's");
    // Completion moved nothing (no device on the source); close the targets to check them.
    both(&mut q, &mut l, "blockdev-del", json!({"node-name": "tgt"}));
    let checks: Vec<(i32, String)> = images
        .iter()
        .map(|img| {
            let (code, out) = qemu_img(
                &["compare", "-f", "raw", "-F", "qcow2"]
                    .iter()
                    .copied()
                    .chain([src.to_str().unwrap(), img.as_str()])
                    .collect::<Vec<_>>(),
            );
            assert_eq!(code, 0, "{img} differs from the source: {out}");
            let (code, out) = qemu_img(&["check", "-f", "qcow2", img]);
            (code, out.replace(img.as_str(), "IMG"))
        })
        .collect();
    assert_eq!(
        checks[1], checks[0],
        "livemig's target checks unlike QEMU's"
    );
}

/// An `nbd` node whose server (`qemu-nbd`) is killed and started again on the same socket,
/// side by side with QEMU 7.2 (`qemu-io` reads through HMP; what they print is compared once
/// both processes quit, since QEMU's standard output is a file's, flushed at exit):
/// - `reconnect-delay` 0 (node `d0`): a read while the server is down fails (`EIO`), so does
///   the next (its reconnect attempt does not wait, it starts the connecting in the
///   background); a read after the server is back succeeds;
/// - `reconnect-delay` 2 (node `d1`): a read issued while the server is down waits and
///   succeeds once it is back half a second later; with the server down for good, a read
///   fails after the 2 s, the next fails at once, and once the server is back reads succeed.
///
/// Before, livemig's node failed every request after the first break, forever.
#[test]
fn an_nbd_node_reconnects_as_qemu() {
    const T: &str = "an_nbd_node_reconnects_as_qemu";
    if !testkit::require(T, testkit::programs(&["qemu-system-x86_64", "qemu-nbd"])) {
        return;
    }
    let (dir, (mut qp, mut lp), mut q, mut l) = side_by_side();
    let image = dir.path().join("src.raw");
    std::fs::write(&image, vec![1u8; 1 << 20]).unwrap();
    let socks = [dir.path().join("q.sock"), dir.path().join("l.sock")];
    let mut servers: Vec<QemuNbd> = socks.iter().map(|s| QemuNbd::plain(&image, s)).collect();
    for (c, sock) in [(&mut q, &socks[0]), (&mut l, &socks[1])] {
        for (node, delay) in [("d0", 0), ("d1", 2)] {
            c.ok(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": node, "export": "src",
                       "reconnect-delay": delay,
                       "server": {"type": "unix", "path": sock.to_str().unwrap()}}),
            );
        }
    }
    let read = |c: &mut QmpClient, node: &str| {
        let t = std::time::Instant::now();
        let r = c.hmp(&format!("qemu-io {node} \"read -P 1 0 4k\""));
        assert_eq!(r, "", "qemu-io {node}");
        t.elapsed()
    };
    let restart = |servers: &mut Vec<QemuNbd>| {
        for s in servers.drain(..) {
            s.kill();
        }
    };
    let both_read =
        |q: &mut QmpClient, l: &mut QmpClient, node: &str| (read(q, node), read(l, node));
    // reconnect-delay 0.
    both_read(&mut q, &mut l, "d0");
    restart(&mut servers);
    both_read(&mut q, &mut l, "d0");
    both_read(&mut q, &mut l, "d0");
    servers = socks.iter().map(|s| QemuNbd::plain(&image, s)).collect();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    both_read(&mut q, &mut l, "d0");
    // reconnect-delay 2: back within the delay, for each process in turn.
    restart(&mut servers);
    for (c, sock) in [(&mut q, &socks[0]), (&mut l, &socks[1])] {
        let (image, sock) = (image.clone(), sock.clone());
        let back = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(500));
            QemuNbd::plain(&image, &sock)
        });
        let took = read(c, "d1");
        servers.push(back.join().unwrap());
        assert!(took >= std::time::Duration::from_millis(400), "{took:?}");
    }
    // Down for longer than the delay.
    restart(&mut servers);
    let (a, b) = both_read(&mut q, &mut l, "d1");
    for t in [a, b] {
        assert!(t >= std::time::Duration::from_millis(1900), "{a:?} {b:?}");
    }
    let (a, b) = both_read(&mut q, &mut l, "d1");
    for t in [a, b] {
        assert!(t < std::time::Duration::from_millis(1000), "{a:?} {b:?}");
    }
    servers = socks.iter().map(|s| QemuNbd::plain(&image, s)).collect();
    std::thread::sleep(std::time::Duration::from_millis(3500));
    both_read(&mut q, &mut l, "d1");
    for (p, c) in [(&mut qp, &mut q), (&mut lp, &mut l)] {
        c.ok("quit", json!({}));
        assert_eq!(p.wait_exit(TIMEOUT), Some(0));
    }
    let (theirs, ours) = (printed(&qp.log()), printed(&lp.log()));
    let ok = |n: usize| {
        theirs
            .get(n)
            .is_some_and(|l| l.starts_with("read 4096/4096"))
    };
    let failed = |n: usize| {
        theirs
            .get(n)
            .is_some_and(|l| l == "read failed: Input/output error")
    };
    // d0: read, two failures, read; d1: read; failure, failure, read.
    assert!(
        ok(0) && failed(2) && failed(3) && ok(4) && ok(6) && failed(8) && failed(9) && ok(10),
        "{theirs:#?}"
    );
    assert_eq!(ours, theirs);
    drop(servers);
}

/// `open-timeout`, side by side with QEMU 7.2: a `blockdev-add` to a socket nobody listens
/// on yet succeeds when the server comes up within the timeout (the node then reads); past
/// the timeout it fails with the last attempt's error; without one, it fails at once. Values
/// out of range are refused with QEMU's messages. Before, livemig accepted the member and
/// made one attempt.
#[test]
fn an_nbd_open_waits_for_the_server_up_to_open_timeout_as_qemu() {
    const T: &str = "an_nbd_open_waits_for_the_server_up_to_open_timeout_as_qemu";
    if !testkit::require(T, testkit::programs(&["qemu-system-x86_64", "qemu-nbd"])) {
        return;
    }
    let (dir, (mut qp, mut lp), mut q, mut l) = side_by_side();
    let image = dir.path().join("src.raw");
    std::fs::write(&image, vec![1u8; 1 << 20]).unwrap();
    let mut servers = Vec::new();
    for (c, who) in [(&mut q, "q"), (&mut l, "l")] {
        let sock = dir.path().join(format!("{who}.sock"));
        let (im, so) = (image.clone(), sock.clone());
        let up = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            QemuNbd::plain(&im, &so)
        });
        let t = std::time::Instant::now();
        c.ok(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "d0", "export": "src", "open-timeout": 10,
                   "server": {"type": "unix", "path": sock.to_str().unwrap()}}),
        );
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(250),
            "{who}"
        );
        servers.push(up.join().unwrap());
        assert_eq!(c.hmp("qemu-io d0 \"read -P 1 0 4k\""), "");
    }
    let none = dir.path().join("none.sock");
    let server = json!({"type": "unix", "path": none.to_str().unwrap()});
    for timeout in [0, 1] {
        let mut took = Vec::new();
        for c in [&mut q, &mut l] {
            let t = std::time::Instant::now();
            let r = outcome(
                c,
                "blockdev-add",
                &json!({"driver": "nbd", "node-name": "d1", "export": "src",
                        "open-timeout": timeout, "server": server}),
            );
            took.push(t.elapsed());
            assert_eq!(
                r["error"],
                format!(
                    "Failed to connect to '{}': No such file or directory",
                    none.display()
                ),
            );
        }
        for t in &took {
            if timeout == 0 {
                assert!(*t < std::time::Duration::from_millis(900), "{took:?}");
            } else {
                assert!(*t >= std::time::Duration::from_millis(900), "{took:?}");
            }
        }
    }
    for (key, value) in [
        ("open-timeout", json!(-1)),
        ("open-timeout", json!(4294967296u64)),
        ("open-timeout", json!("x")),
        ("reconnect-delay", json!(1.5)),
        ("reconnect-delay", json!(true)),
        ("reconnect-delay", json!(-1)),
    ] {
        let mut args = json!({"driver": "nbd", "node-name": "d2", "export": "src",
                              "server": server});
        args[key] = value;
        both(&mut q, &mut l, "blockdev-add", args);
    }
    for (p, c) in [(&mut qp, &mut q), (&mut lp, &mut l)] {
        c.ok("quit", json!({}));
        assert_eq!(p.wait_exit(TIMEOUT), Some(0));
    }
    let (theirs, ours) = (printed(&qp.log()), printed(&lp.log()));
    assert!(theirs
        .iter()
        .all(|l| l.starts_with("read 4096/4096") || l.contains("ops;")));
    assert_eq!(theirs.len(), 2, "{theirs:?}");
    assert_eq!(ours, theirs);
    drop(servers);
}

/// `cmd` with `args`: QEMU 7.2 acts on it (and returns `{}`); livemig, which does not build
/// what it asks for, refuses it with `msg` rather than take it and do nothing.
fn refused_where_qemu_acts(
    q: &mut QmpClient,
    l: &mut QmpClient,
    cmd: &str,
    args: Value,
    msg: &str,
) {
    assert_eq!(
        outcome(q, cmd, &args),
        json!({"return": {}}),
        "QEMU {cmd} {args}"
    );
    assert_eq!(
        outcome(l, cmd, &args),
        json!({"error": msg, "class": "GenericError"}),
        "{cmd} {args}"
    );
}

/// `base` with the members of `extra` added.
fn with(base: Value, extra: Value) -> Value {
    let mut o = base;
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    o
}

/// The deprecated `loaded` member of the TLS credentials: QEMU 7.2's schema takes it, but the
/// property has no setter, so object-add fails with any value. livemig took it and dropped it.
#[test]
fn tls_creds_loaded_is_refused_as_qemu() {
    if !testkit::require("tls_creds_loaded_is_refused_as_qemu", testkit::qemu()) {
        return;
    }
    let (_dir, _procs, mut q, mut l) = side_by_side();
    for (qom_type, extra) in [
        ("tls-creds-psk", json!({"endpoint": "server"})),
        ("tls-creds-x509", json!({})),
    ] {
        for loaded in [true, false] {
            let args = with(
                json!({"qom-type": qom_type, "id": "t0", "dir": "/nonexistent",
                       "loaded": loaded}),
                extra.clone(),
            );
            let r = both(&mut q, &mut l, "object-add", args);
            assert_eq!(
                r["error"],
                format!("Property '{qom_type}.loaded' is not writable")
            );
        }
    }
    // The id is checked first.
    both(
        &mut q,
        &mut l,
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "0t", "loaded": true}),
    );
}

/// blockdev-add members livemig took and dropped: `pr-manager` (no such manager can exist
/// here, so the reply is QEMU's), and what QEMU's qcow2 and file drivers act on that livemig's
/// do not (refused by name; the values livemig acts like QEMU on are still taken).
#[test]
fn blockdev_add_refuses_what_the_block_layer_does_not_build() {
    if !testkit::require(
        "blockdev_add_refuses_what_the_block_layer_does_not_build",
        testkit::qemu(),
    ) {
        return;
    }
    let (dir, _procs, mut q, mut l) = side_by_side();
    let img = dir.path().join("a.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"],
    );
    let raw = dir.path().join("b.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let (img, raw) = (img.to_str().unwrap(), raw.to_str().unwrap());
    let r = both(
        &mut q,
        &mut l,
        "blockdev-add",
        json!({"driver": "file", "node-name": "f0", "filename": raw, "pr-manager": "pr0"}),
    );
    assert_eq!(
        r["error"],
        "No persistent reservation manager with id 'pr0'"
    );

    let mut n = 0;
    let mut node = |extra: Value| {
        n += 1;
        with(
            json!({"driver": "qcow2", "node-name": format!("q{n}"),
                   "file": {"driver": "file", "filename": img, "locking": "off"}}),
            extra,
        )
    };
    let refusals = [
        (json!({"pass-discard-request": true}), "pass-discard-request=on is not supported by this block layer (a discard frees qcow2 clusters, and is not passed to the image file)"),
        (json!({"pass-discard-other": true}), "pass-discard-other=on is not supported by this block layer (freed qcow2 clusters are not discarded in the image file)"),
        (json!({"overlap-check": "all"}), "overlap-check=all is not supported by this block layer (it makes no metadata overlap checks: overlap-check=none)"),
        (json!({"overlap-check": "cached"}), "overlap-check=cached is not supported by this block layer (it makes no metadata overlap checks: overlap-check=none)"),
        (json!({"file": {"driver": "file", "filename": img, "locking": "off", "x-check-cache-dropped": true}}), "x-check-cache-dropped=on is not supported by this block layer (it has no page-cache residency check)"),
    ];
    for (extra, msg) in refusals {
        refused_where_qemu_acts(&mut q, &mut l, "blockdev-add", node(extra), msg);
    }
    for extra in [
        json!({"pass-discard-request": false, "pass-discard-other": false,
               "pass-discard-snapshot": true, "overlap-check": "none"}),
        json!({"file": {"driver": "file", "filename": img, "locking": "off",
                        "x-check-cache-dropped": false}}),
    ] {
        both(&mut q, &mut l, "blockdev-add", node(extra));
    }
}

/// block-export-add members livemig took and dropped: `iothread` (livemig has none, so the
/// reply is QEMU's), `writethrough` and `allocation-depth` (refused by name when on).
#[test]
fn block_export_add_refuses_what_the_nbd_server_does_not_build() {
    if !testkit::require(
        "block_export_add_refuses_what_the_nbd_server_does_not_build",
        testkit::qemu(),
    ) {
        return;
    }
    let (dir, _procs, mut q, mut l) = side_by_side();
    both(
        &mut q,
        &mut l,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "d0", "size": 1 << 20}),
    );
    for (c, who) in [(&mut q, "q"), (&mut l, "l")] {
        let p = dir.path().join(format!("{who}-nbd.sock"));
        let r = c.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": p.to_str().unwrap()}}}),
        );
        assert!(r.unwrap().get("return").is_some());
    }
    let export = |extra: Value| with(json!({"type": "nbd", "id": "e0", "node-name": "d0"}), extra);
    for fixed in [false, true] {
        let r = both(
            &mut q,
            &mut l,
            "block-export-add",
            export(json!({"iothread": "io0", "fixed-iothread": fixed})),
        );
        assert_eq!(r["error"], "iothread \"io0\" not found");
    }
    for (extra, msg) in [
        (json!({"writethrough": true}), "block-export-add: 'writethrough' is not supported by livemig (its exports keep the node's write cache; flush or FUA requests make writes durable)"),
        (json!({"allocation-depth": true}), "block-export-add: 'allocation-depth' is not supported by livemig (its NBD server has no qemu:allocation-depth metadata context)"),
    ] {
        refused_where_qemu_acts(&mut q, &mut l, "block-export-add", export(extra), msg);
        // Only QEMU made the export.
        assert_eq!(
            outcome(&mut q, "block-export-del", &json!({"id": "e0"})),
            json!({"return": {}})
        );
        q.wait_event(TIMEOUT, |e| e["event"] == "BLOCK_EXPORT_DELETED")
            .expect("BLOCK_EXPORT_DELETED");
    }
    both(
        &mut q,
        &mut l,
        "block-export-add",
        export(json!({"writethrough": false, "allocation-depth": false,
                      "fixed-iothread": true})),
    );
}

/// A mirror onto an `nbd` target with `reconnect-delay` 60 whose server (`qemu-nbd`) is
/// killed mid-copy: livemig's copy waits for the server; `job-cancel` ends the job at once,
/// as QEMU 7.2's `mirror_cancel` does (it makes the target's requests stop waiting,
/// `bdrv_cancel_in_flight`). QEMU beside it ends at once too and gives the same replies, but
/// its events differ (see below), so only the ending is compared. Before, livemig's cancel
/// waited for the 60 s to run out (the test's 30 s wait for the job's end failed).
#[test]
fn a_mirror_waiting_for_its_nbd_target_to_reconnect_is_cancelled_at_once_as_qemu() {
    const T: &str = "a_mirror_waiting_for_its_nbd_target_to_reconnect_is_cancelled_at_once_as_qemu";
    if !testkit::require(T, testkit::programs(&["qemu-system-x86_64", "qemu-nbd"])) {
        return;
    }
    let (dir, _procs, mut q, mut l) = side_by_side();
    let size = 64u64 << 20;
    let mut servers = Vec::new();
    for (c, who) in [(&mut q, "q"), (&mut l, "l")] {
        let image = dir.path().join(format!("{who}.raw"));
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let sock = dir.path().join(format!("{who}.sock"));
        servers.push(QemuNbd::plain(&image, &sock));
        c.ok(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "t0", "export": "src", "reconnect-delay": 60,
                   "server": {"type": "unix", "path": sock.to_str().unwrap()}}),
        );
    }
    both(
        &mut q,
        &mut l,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "s0", "size": size}),
    );
    both(
        &mut q,
        &mut l,
        "blockdev-mirror",
        json!({"job-id": "j0", "device": "s0", "target": "t0", "sync": "full",
               "speed": 1 << 20, "granularity": 65536, "buf-size": 65536}),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    for s in servers.drain(..) {
        s.kill();
    }
    // Long enough for the next copy to meet the dead socket and wait.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    both(&mut q, &mut l, "job-cancel", json!({"id": "j0"}));
    let t = std::time::Instant::now();
    let qemu = job_events(&mut q, "j0");
    let lm = job_events(&mut l, "j0");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    // Both ended (job_events waits for the `null` status). The events differ: QEMU's copy
    // had not met the dead socket (its progress went on after the kill, not understood yet),
    // livemig's write failed when cancelled (BLOCK_JOB_ERROR, then an error).
    assert!(
        qemu.iter().any(|e| e["event"] == "BLOCK_JOB_CANCELLED"),
        "{qemu:?}"
    );
    assert_eq!(lm.last(), qemu.last());
}
