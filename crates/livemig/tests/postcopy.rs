//! Postcopy between two `livemig vm` processes (issue 10): `migrate-start-postcopy` during a
//! slow precopy, the destination running its guest on pages it pulls from the source, and what
//! a user sees of it — states and events on both ends, page requests in `query-migrate`, RAM
//! that verifies page by page, vCPUs that carry on.

mod common;
#[allow(dead_code)] // the fault matrix uses the rest
mod faults;

use common::postcopy::*;
use common::*;
use serde_json::json;

#[test]
fn postcopy_stop_point_matches_the_source() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    dst.caps_on(CAPS);
    let mut src = slow_source(dir.path());
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    // The destination is paused (-S): every page comes from the background push.
    let v = check_stop_point(&mut src, &mut dst, &[]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
    assert_eq!(
        src.migration_events_until("completed"),
        // As QEMU 7.2's `postcopy_start`: `postcopy-active` before the guest stops, and no
        // `device` state.
        ["setup", "active", "postcopy-active", "STOP", "completed"],
        "source events"
    );
    assert_eq!(
        dst.migration_events_until("completed"),
        ["active", "postcopy-active", "completed"],
        "destination events"
    );
    let q = src.ok("query-migrate", json!({}));
    assert!(q["ram"]["postcopy-bytes"].as_u64().unwrap_or(0) > 0, "{q}");
    assert!(q["downtime"].as_u64().is_some(), "{q}");
    check_carries_on(&mut dst);
}

/// With `pause-before-switchover`, postcopy waits in `pre-switchover` with the guest stopped
/// and goes straight to `postcopy-active` on `migrate-continue` — QEMU 7.2's
/// `migration_maybe_pause` in `postcopy_start`: no `device` state here either.
#[test]
fn postcopy_after_a_pause_before_switchover() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    dst.caps_on(CAPS);
    let mut src = slow_source(dir.path());
    src.caps_on(&["pause-before-switchover"]);
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_migration(&["pre-switchover"]);
    assert_eq!(src.status(), "finish-migrate");
    src.ok("migrate-continue", json!({"state": "pre-switchover"}));
    let v = check_stop_point(&mut src, &mut dst, &[]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
    assert_eq!(
        src.migration_events_until("completed"),
        [
            "setup",
            "active",
            "STOP",
            "pre-switchover",
            "postcopy-active",
            "completed"
        ],
        "source events"
    );
    check_carries_on(&mut dst);
}

#[test]
fn the_destination_guest_runs_on_pages_it_pulls() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    // A destination that starts its guest as soon as postcopy runs.
    let mut a = GUEST.to_vec();
    a.extend(["-incoming", &uri]);
    let mut dst = Lm::start(dir.path(), "dst", &a);
    dst.caps_on(CAPS);
    dst.caps_on(&["postcopy-blocktime"]);
    let mut src = slow_source(dir.path());
    // Background pages trickle: the guest's own accesses must pull what it needs.
    src.set_params(json!({"max-postcopy-bandwidth": 8 << 20}));
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_migration(&["postcopy-active", "completed"]);
    let at_switch = src.steps();
    dst.wait_completed();
    src.wait_completed();
    assert_eq!(dst.status(), "running");
    dst.wait_steps_beyond(&at_switch);
    let q = src.ok("query-migrate", json!({}));
    assert!(
        q["ram"]["postcopy-requests"].as_u64().unwrap_or(0) > 0,
        "the running guest asked for pages: {q}"
    );
    // Pages are checked with the guest stopped (a page read while a vCPU rewrites it would
    // look torn).
    dst.ok("stop", json!({}));
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM: {v}");
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
    // Blocktime, per vCPU as QEMU reports it, and the fault -> placement latency.
    let q = dst.ok("query-migrate", json!({}));
    let per_vcpu = q["postcopy-vcpu-blocktime"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(per_vcpu.len(), 2, "{q}");
    assert!(q["postcopy-blocktime"].is_u64(), "{q}");
    let x = &q["x-livemig-postcopy"];
    let ns: u64 = x["vcpu-blocktime-ns"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    assert!(ns > 0, "the vCPUs waited for pages: {q}");
    let count = x["latency-count"].as_u64().unwrap_or(0);
    assert!(count > 0, "{q}");
    assert!(x["latency-median-us"].as_u64().unwrap_or(0) > 0, "{q}");
    // The latency's three stages: the requests that went out before their page came have one
    // sample in each, and asking for and placing a page both take time.
    let split = x["latency-asking-count"].as_u64().unwrap_or(0);
    assert!(split > 0 && split <= count, "{q}");
    for stage in ["asking", "answer", "placing"] {
        assert_eq!(x[format!("latency-{stage}-count")], split, "{stage}: {q}");
        let med = x[format!("latency-{stage}-median-us")]
            .as_u64()
            .unwrap_or(0);
        let p99 = x[format!("latency-{stage}-p99-us")].as_u64().unwrap_or(0);
        assert!(med > 0 && med <= p99, "{stage}: {q}");
    }
}

#[test]
fn postcopy_is_refused_where_qemu_refuses_it() {
    let dir = tempdir();
    let mut src = Lm::source(dir.path(), "src", IDLE);
    assert_eq!(
        src.err("migrate-start-postcopy", json!({})),
        "Enable postcopy with migrate_set_capability before the start of migration"
    );
    src.caps_on(&["postcopy-ram"]);
    assert_eq!(
        src.err("migrate-start-postcopy", json!({})),
        "Postcopy must be started after migration has been started"
    );
    // exec: has no return path to ask for pages on.
    src.migrate("exec:cat > /dev/null");
    let r = src.wait_migration(&["failed"]);
    assert_eq!(
        r["error-desc"], "Unable to open return-path for postcopy",
        "{r}"
    );
}

/// Starts a postcopy whose destination runs its guest and whose background push is slow, and
/// returns both ends once they are `postcopy-active`.
fn in_postcopy(dir: &std::path::Path, uri: &str) -> (Lm, Lm) {
    let mut a = GUEST.to_vec();
    a.extend(["-incoming", uri]);
    let mut dst = Lm::start(dir, "dst", &a);
    dst.caps_on(CAPS);
    let mut src = slow_source(dir);
    src.set_params(json!({"max-postcopy-bandwidth": 1 << 20}));
    src.migrate(uri);
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_migration(&["postcopy-active"]);
    dst.wait_migration(&["postcopy-active"]);
    (src, dst)
}

#[test]
fn a_destination_killed_in_postcopy_leaves_the_source_paused_and_serving() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let (mut src, mut dst) = in_postcopy(dir.path(), &uri);
    assert_eq!(
        src.err("migrate_cancel", json!({})),
        "Postcopy migration in progress, cannot cancel.",
    );
    let _ = dst.proc.child.kill();
    // The source keeps its half of the guest's RAM and says what a retry can do.
    let r = src.wait_migration(&["postcopy-paused", "failed", "completed"]);
    assert_eq!(r["status"], "postcopy-paused", "{r}");
    let desc = r["error-desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains("same destination process") && desc.contains("a new destination cannot"),
        "the error says what a retry can and cannot do: {r}"
    );
    // The guest ran on the destination: the source must not resume it (it stays in
    // finish-migrate, as QEMU's does during postcopy).
    assert_eq!(src.status(), "finish-migrate");
    // A resume towards nothing fails and leaves it paused, still serving.
    src.ok(
        "migrate",
        json!({"uri": unix_uri(dir.path(), "nobody.sock"), "resume": true}),
    );
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let r = src.ok("query-migrate", json!({}));
        assert_eq!(r["status"], "postcopy-paused", "{r}");
        if r["error-desc"]
            .as_str()
            .unwrap_or_default()
            .contains("resume failed")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(src.proc.alive());
}

#[test]
fn a_source_killed_in_postcopy_leaves_the_destination_paused_and_serving() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let (mut src, mut dst) = in_postcopy(dir.path(), &uri);
    let _ = src.proc.child.kill();
    let r = dst.wait_migration(&["postcopy-paused", "failed", "completed"]);
    assert_eq!(r["status"], "postcopy-paused", "{r}");
    assert!(
        r["error-desc"]
            .as_str()
            .unwrap_or_default()
            .contains("migrate-recover"),
        "{r}"
    );
    // No abort: the process answers, its guest is where the switch put it.
    assert_eq!(dst.status(), "running");
    assert!(dst.proc.alive());
}

/// `postcopy-preempt` (QEMU 7.2's way: a second connection opened right after the main one):
/// with the background push nearly stopped, the destination's running guest gets every page
/// it touches on the preempt channel, answered by the source's return-path thread; then the
/// push is let go and both ends complete with RAM that verifies.
fn preempt(uri_of: impl Fn(&mut Lm) -> String, listen: &str) {
    let dir = tempdir();
    let listen = listen.replace("DIR", &dir.path().display().to_string());
    let mut a = GUEST.to_vec();
    a.extend(["-incoming", &listen]);
    let mut dst = Lm::start(dir.path(), "dst", &a);
    dst.caps_on(CAPS);
    dst.caps_on(&["postcopy-preempt"]);
    let uri = match uri_of(&mut dst) {
        u if u.starts_with("tcp:") => u,
        _ => listen.clone(),
    };
    let mut src = slow_source(dir.path());
    src.caps_on(&["postcopy-preempt"]);
    src.set_params(json!({"max-postcopy-bandwidth": 256 << 10}));
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_migration(&["postcopy-active"]);
    dst.wait_migration(&["postcopy-active"]);
    let at_switch = dst.steps();
    // The guest runs on pages it pulls over the preempt channel.
    dst.wait_steps_beyond(&at_switch);
    let q = src.ok("query-migrate", json!({}));
    assert_eq!(q["status"], "postcopy-active", "{q}");
    let sent = q["x-livemig-postcopy"]["preempt-pages"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        sent > 0,
        "requested pages went out on the preempt channel: {q}"
    );
    src.set_params(json!({"max-postcopy-bandwidth": 0}));
    dst.wait_completed();
    src.wait_completed();
    let d = dst.ok("query-migrate", json!({}));
    let got = d["x-livemig-postcopy"]["preempt-pages"]
        .as_u64()
        .unwrap_or(0);
    let sent = src.ok("query-migrate", json!({}))["x-livemig-postcopy"]["preempt-pages"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        got, sent,
        "every page sent on the preempt channel was read there: {d}"
    );
    dst.ok("stop", json!({}));
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM: {v}");
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
}

#[test]
fn preempt_over_unix() {
    preempt(|dst| dst.name.clone(), "unix:DIR/mig.sock");
}

#[test]
fn preempt_over_tcp() {
    preempt(
        |dst| format!("tcp:127.0.0.1:{}", dst.incoming_port()),
        "tcp:127.0.0.1:0",
    );
}

/// Recovery (issue 10): a cut link, `migrate-pause` on the source and on the destination —
/// each pauses both ends with everything kept, the destination's guest still runs, and each
/// recovers; RAM verifies at the end.
fn cuts_recover(preempt: bool) {
    let dir = tempdir();
    let target = dir.path().join("mig.sock");
    let relay_path = dir.path().join("relay.sock");
    let relay = faults::Relay::start(&relay_path, &target);
    let mut a = GUEST.to_vec();
    let incoming = format!("unix:{}", target.display());
    a.extend(["-incoming", &incoming]);
    let mut dst = Lm::start(dir.path(), "dst", &a);
    dst.caps_on(CAPS);
    let mut src = slow_source(dir.path());
    if preempt {
        src.caps_on(&["postcopy-preempt"]);
        dst.caps_on(&["postcopy-preempt"]);
    }
    src.set_params(json!({"max-postcopy-bandwidth": 1 << 20}));
    assert_eq!(
        dst.err("migrate-recover", json!({"uri": "unix:/nonexistent/x"})),
        "Migrate recover can only be run when postcopy is paused."
    );
    src.migrate(&format!("unix:{}", relay_path.display()));
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_migration(&["postcopy-active"]);
    dst.wait_migration(&["postcopy-active"]);
    assert_eq!(
        src.err(
            "migrate",
            json!({"uri": "unix:/nonexistent/x", "resume": true})
        ),
        "Cannot resume if there is no paused migration"
    );

    // 1. The network goes away.
    relay.cut();
    let q = paused(&mut src);
    assert!(
        q["error-desc"].as_str().unwrap_or("").contains("resume"),
        "the source says how to resume: {q}"
    );
    let q = paused(&mut dst);
    assert!(q["error-desc"].as_str().is_some(), "{q}");
    assert_eq!(
        dst.err("migrate-pause", json!({})),
        "migrate-pause is currently only supported during postcopy-active state"
    );
    assert_eq!(
        src.err("migrate_cancel", json!({})),
        "Postcopy migration in progress, cannot cancel."
    );
    // The destination's guest runs on the pages it has.
    assert_eq!(dst.status(), "running");
    let uri = |n: &str| format!("unix:{}", dir.path().join(n).display());
    recover(&mut src, &mut dst, &uri("rec1.sock"));
    let steps = dst.steps();
    dst.wait_steps_beyond(&steps);

    // 2. migrate-pause on the source.
    src.ok("migrate-pause", json!({}));
    paused(&mut src);
    paused(&mut dst);
    recover(&mut src, &mut dst, &uri("rec2.sock"));

    // 3. migrate-pause on the destination.
    dst.ok("migrate-pause", json!({}));
    paused(&mut dst);
    paused(&mut src);
    // A recovery URI that cannot be bound is refused, and a good one still works after it.
    assert!(!dst
        .err("migrate-recover", json!({"uri": "unix:/nonexistent/dir/x"}))
        .is_empty());
    recover(&mut src, &mut dst, &uri("rec3.sock"));

    src.set_params(json!({"max-postcopy-bandwidth": 0}));
    src.wait_completed();
    dst.wait_completed();
    let events = src.migration_events_until("completed");
    assert_eq!(
        events.iter().filter(|e| *e == "postcopy-recover").count(),
        3,
        "{events:?}"
    );
    dst.ok("stop", json!({}));
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM: {v}");
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
}

#[test]
fn cuts_in_postcopy_pause_and_recover_repeatedly() {
    cuts_recover(false);
}

#[test]
fn cuts_in_postcopy_with_preempt_pause_and_recover_repeatedly() {
    cuts_recover(true);
}

/// Issue 14 item 1: a connection to `migrate-recover`'s listener that says nothing (no
/// RECV_BITMAP) holds the destination at most `x-livemig-stall-timeout`; it then pauses
/// again, and a real recovery completes the migration (before, the destination waited on the
/// silent connection for good, and no recovery could follow).
#[test]
fn a_silent_recovery_connection_is_dropped_after_the_stall_bound() {
    let dir = tempdir();
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    let mut a = GUEST.to_vec();
    a.extend(["-incoming", &uri]);
    let mut dst = Lm::start(dir.path(), "dst", &a);
    dst.caps_on(CAPS);
    dst.set_params(json!({"x-livemig-stall-timeout": 1500}));
    let mut src = slow_source(dir.path());
    src.set_params(json!({"max-postcopy-bandwidth": 1 << 20}));
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_migration(&["postcopy-active"]);
    dst.wait_migration(&["postcopy-active"]);
    src.ok("migrate-pause", json!({}));
    paused(&mut src);
    paused(&mut dst);
    let rec1 = dir.path().join("rec1.sock");
    dst.ok(
        "migrate-recover",
        json!({ "uri": format!("unix:{}", rec1.display()) }),
    );
    let silent = std::os::unix::net::UnixStream::connect(&rec1).unwrap();
    dst.wait_migration(&["postcopy-recover"]);
    let t0 = std::time::Instant::now();
    let q = paused(&mut dst);
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        q["error-desc"]
            .as_str()
            .unwrap_or_default()
            .starts_with("postcopy paused:"),
        "{q}"
    );
    drop(silent);
    recover(
        &mut src,
        &mut dst,
        &format!("unix:{}", dir.path().join("rec2.sock").display()),
    );
    src.set_params(json!({"max-postcopy-bandwidth": 0}));
    src.wait_completed();
    dst.wait_completed();
    dst.ok("stop", json!({}));
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM: {v}");
}

/// Postcopy over a socketpair passed to both monitors (`getfd`, `fd:`), as libvirt passes its
/// tunnel: page requests travel back on the passed socket.
#[test]
fn postcopy_over_a_passed_socket() {
    use std::os::fd::AsFd;
    let dir = tempdir();
    let mut a = GUEST.to_vec();
    a.extend(["-incoming", "defer", "-S"]);
    let mut dst = Lm::start(dir.path(), "dst", &a);
    dst.caps_on(CAPS);
    let mut src = slow_source(dir.path());
    let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
    for (lm, end) in [(&mut src, &x), (&mut dst, &y)] {
        let r = lm
            .qmp
            .execute_with_fd("getfd", json!({"fdname": "tunnel"}), end.as_fd())
            .unwrap();
        assert_eq!(r["return"], json!({}), "{r}");
    }
    drop((x, y));
    dst.ok("migrate-incoming", json!({"uri": "fd:tunnel"}));
    src.migrate("fd:tunnel");
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    // The destination is paused (-S): the pages come from the background push, and the
    // source ends on the destination's SHUT, which comes back on the passed socket.
    let v = check_stop_point(&mut src, &mut dst, &[]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
    let q = src.ok("query-migrate", json!({}));
    assert!(q["ram"]["postcopy-bytes"].as_u64().unwrap_or(0) > 0, "{q}");
    check_carries_on(&mut dst);
}
