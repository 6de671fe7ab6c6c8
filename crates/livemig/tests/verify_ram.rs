//! `x-livemig-verify-ram` is exact whether the guest runs or not (issue 9, bug 6): on a running
//! guest it used to read pages while vCPUs rewrote them and report torn pages as corrupt. The
//! walk now holds the vCPUs (the guest stays `running`, no STOP/RESUME), and while an incoming
//! migration is still loading RAM the command refuses instead of reading half-loaded pages.

mod common;

use common::*;
use serde_json::json;

/// Pages of [`GUEST`]'s 64 MiB.
const PAGES: u64 = (64 << 20) / 4096;

/// Walks `a`'s RAM 20 times while its guest rewrites its hot set, expecting every page whole;
/// then checks the guest was never stopped: still running, carrying on, and no STOP/RESUME.
fn walks_are_exact_while_running(a: &mut Lm) {
    a.wait_filled();
    // `pages-written` counts every vCPU's writes, so one vCPU rewriting its hot set can carry
    // it past the fill while another (a KVM vCPU paying nested first touches) still fills:
    // walk until the whole fill is seen, every walk exact.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = a.verify_ram();
        assert_eq!(v["corrupt"], 0, "while filling, on a running guest: {v}");
        if v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never filled: {v}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for pass in 0..20 {
        let v = a.verify_ram();
        assert_eq!(v["corrupt"], 0, "pass {pass} on a running guest: {v}");
        assert_eq!(
            v["valid"].as_u64().unwrap_or(0) + v["zero"].as_u64().unwrap_or(0),
            PAGES,
            "pass {pass}: {v}"
        );
        assert!(
            v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES,
            "pass {pass}: {v}"
        );
    }
    assert_eq!(a.status(), "running");
    let before = a.steps();
    a.wait_steps_beyond(&before);
    a.ok("stop", json!({}));
    let events = a.events_until(|e| e["event"] == "STOP");
    let run_state: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "STOP" || e["event"] == "RESUME")
        .collect();
    assert_eq!(run_state.len(), 1, "only the test's own stop: {events:?}");
}

#[test]
fn verify_ram_is_exact_while_the_guest_runs() {
    let dir = tempdir();
    // Two vCPUs rewriting an 8 MiB hot set as fast as they can (no dirty-rate cap): with the
    // old walk nearly every pass met a page in the middle of its rewrite.
    let mut a = Lm::source(dir.path(), "a", "fill=32M,hot=8M,dirty-rate=0");
    walks_are_exact_while_running(&mut a);
}

/// The same with KVM vCPUs, which write guest RAM from inside the guest.
#[test]
fn verify_ram_is_exact_while_a_kvm_guest_runs() {
    if !testkit::require("verify_ram_is_exact_while_a_kvm_guest_runs", testkit::kvm()) {
        return;
    }
    let dir = tempdir();
    let mut a = Lm::start(
        dir.path(),
        "a",
        &[
            "-accel",
            "kvm",
            "-m",
            "64M",
            "-smp",
            "2",
            "-workload",
            "fill=32M,hot=8M,dirty-rate=0",
        ],
    );
    walks_are_exact_while_running(&mut a);
}

#[test]
fn verify_ram_refuses_while_an_incoming_migration_loads_ram() {
    let dir = tempdir();
    let mut src = Lm::source(dir.path(), "src", IDLE);
    let uri = unix_uri(dir.path(), "mig");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    src.wait_idle();
    // 1 MiB/s: the 32 MiB fill keeps the migration active for the whole check.
    src.set_params(json!({"max-bandwidth": 1 << 20}));
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while dst.ok("query-migrate", json!({}))["status"] != "active" {
        assert!(
            std::time::Instant::now() < deadline,
            "destination not active"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        dst.err("x-livemig-verify-ram", json!({})),
        "x-livemig-verify-ram: an incoming migration is loading guest RAM (status active); \
         verify it once the migration has completed"
    );
    // Once the load completes the same command verifies.
    src.set_params(json!({"max-bandwidth": 134_217_728}));
    let v = check_stop_point(&mut src, &mut dst, &[]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
}
