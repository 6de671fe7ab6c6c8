//! Faults at the edges of the link (issue 14): a relay between two `livemig vm` processes
//! stalls or cuts the migration where a network would, and each end must notice within a
//! bound and leave the guest where a user can find it.
//!
//! * A link that stalls mid-stream fails both ends within `x-livemig-stall-timeout`; the
//!   source resumes the guest (before, the source stayed `active` for good).
//! * A link that stalls after the whole stream went out leaves the source paused, `failed`,
//!   with `x-livemig-handover: unknown` and an `X_LIVEMIG_HANDOVER` event — the destination may
//!   hold the guest, so only management may `cont` it. Keepalive PINGs keep a long
//!   `pre-switchover` from tripping the bound.
//! * A cut in the last few hundred KB: the return path, open by default over sockets, makes
//!   the source fail and resume (before, it reported `completed` and both ends were stopped);
//!   with `x-livemig-auto-return-path` off it completes as QEMU's does, and says
//!   `x-livemig-handover: unconfirmed`.
//! * An `exec:` command that stops reading its stdin stalls the stream as a socket would,
//!   and fails the migration within the bound with the guest resumed (before, the source's
//!   write blocked for good).
//! * An `exec:` command that takes the whole stream and never exits: the source waits for it
//!   at most the stall bound (before, for good), kills it, and — with no return path to say
//!   where the guest went — stays paused, `failed`, `x-livemig-handover: unknown`.
//! * The return path over `exec:` works as QEMU 7.2's (the command's stdout), or fails the
//!   migration; over `file:` it is refused (before, it was silently unused).

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::relay::{Fault, Plan, Relay, Target};

/// The stall bound both ends use here.
const STALL_MS: u64 = 1500;

/// A destination listening on `DIR/dst.sock`, with the test's stall bound.
fn destination(dir: &Path, name: &str) -> Lm {
    let mut dst = Lm::destination(dir, name, &unix_uri(dir, &format!("{name}.sock")));
    dst.set_params(json!({"x-livemig-stall-timeout": STALL_MS}));
    dst
}

/// An idle source (its RAM checksum does not move), events on, with the test's stall bound.
fn source(dir: &Path) -> Lm {
    let mut src = Lm::source(dir, "src", IDLE);
    src.caps_on(&["events"]);
    src.set_params(json!({"x-livemig-stall-timeout": STALL_MS}));
    src.wait_idle();
    src
}

/// A relay in front of `DIR/NAME.sock`.
fn relay(dir: &Path, name: &str, plan: Plan) -> Relay {
    Relay::unix(
        &dir.join("relay.sock"),
        Target::Unix(dir.join(format!("{name}.sock"))),
        plan.bounded(Duration::from_secs(120)),
    )
}

fn desc(r: &Value) -> String {
    r["error-desc"].as_str().unwrap_or_default().to_string()
}

/// After a failed attempt the source is whole: a direct migration to a fresh destination
/// completes with the same RAM.
fn migrates_again(dir: &Path, src: &mut Lm, sum: &Value) {
    let mut dst = Lm::destination(dir, "dst2", &unix_uri(dir, "dst2.sock"));
    src.migrate(&unix_uri(dir, "dst2.sock"));
    src.wait_completed();
    dst.wait_completed();
    assert_eq!(&dst.ram_checksum(), sum, "RAM after the second attempt");
}

#[test]
fn a_link_stalled_mid_stream_fails_both_ends_in_time_and_the_source_resumes() {
    let dir = tempdir();
    let mut dst = destination(dir.path(), "dst");
    let relay = relay(dir.path(), "dst", Plan::one(Fault::Stall { at: 4 << 20 }));
    let mut src = source(dir.path());
    let sum = src.ram_checksum();
    src.migrate(&relay.uri);
    relay.wait(TIMEOUT, "the stall", |r| r.stalled_at.is_some());
    let stalled = Instant::now();
    let r = src.wait_migration(&["failed", "completed", "cancelled"]);
    let took = stalled.elapsed();
    assert_eq!(
        desc(&r),
        "the migration stream stalled: the destination took nothing for 1500 ms (x-livemig-stall-timeout)",
        "{r}"
    );
    // The bound, plus the socket buffers filling and a loaded machine.
    assert!(took < Duration::from_secs(15), "noticed after {took:?}");
    assert!(r.get("x-livemig-handover").is_none(), "{r}");
    assert_eq!(src.status(), "running", "the source must resume its guest");
    assert_eq!(src.ram_checksum(), sum);
    // The destination exits, as QEMU's does when its load fails.
    let d = dst.wait_load_failed();
    assert!(
        d.starts_with(
            "the migration stream stalled: nothing arrived for 1500 ms (x-livemig-stall-timeout); at byte "
        ),
        "{d}"
    );
    drop(relay);
    migrates_again(dir.path(), &mut src, &sum);
}

#[test]
fn a_link_stalled_after_the_whole_stream_leaves_the_source_paused_and_says_so() {
    let dir = tempdir();
    let mut dst = destination(dir.path(), "dst");
    let relay = relay(dir.path(), "dst", Plan::none());
    let mut src = source(dir.path());
    src.caps_on(&["pause-before-switchover"]);
    let sum = src.ram_checksum();
    src.migrate(&relay.uri);
    src.wait_migration(&["pre-switchover"]);
    // Three bounds in pre-switchover: the keepalive PINGs (answered on the return path) keep
    // both ends from calling the link stalled while management takes its time.
    std::thread::sleep(Duration::from_millis(3 * STALL_MS));
    assert_eq!(
        src.ok("query-migrate", json!({}))["status"],
        "pre-switchover"
    );
    assert_eq!(dst.ok("query-migrate", json!({}))["status"], "active");
    assert!(relay.report().returned > 0, "no PONG came back");
    // The rest of an idle guest's stream fits in the socket buffers: the source writes it
    // all, then hears nothing back.
    relay.stall();
    src.ok("migrate-continue", json!({"state": "pre-switchover"}));
    let r = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert!(
        desc(&r).starts_with(
            "the destination sent no verdict for 1500 ms after the whole stream went out (x-livemig-stall-timeout); the guest stays stopped here"
        ),
        "{r}"
    );
    assert_eq!(r["x-livemig-handover"], "unknown", "{r}");
    assert_eq!(
        src.status(),
        "paused",
        "the guest may run on the destination"
    );
    let ev = src.events_until(|e| e["event"] == "X_LIVEMIG_HANDOVER");
    assert_eq!(
        ev.last().unwrap()["data"],
        json!({"handover": "unknown", "source-runstate": "paused"})
    );
    let d = dst.wait_load_failed();
    assert!(
        d.starts_with("the migration stream stalled: nothing arrived for 1500 ms"),
        "{d}"
    );
    // Management, having seen the destination fail, takes the guest back.
    src.ok("cont", json!({}));
    assert_eq!(src.status(), "running");
    assert_eq!(src.ram_checksum(), sum);
    drop(relay);
    src.set_caps(&[("pause-before-switchover", false)]);
    migrates_again(dir.path(), &mut src, &sum);
}

#[test]
fn a_cut_at_the_end_fails_cleanly_by_default_and_is_visible_without_a_return_path() {
    let dir = tempdir();
    // By default (no `return-path` capability) the source opens the return path over a
    // socket and learns that the destination never got the end.
    let mut dst = destination(dir.path(), "dst");
    let cut = Plan::one(Fault::CutBeforeEnd { window: 256 << 10 });
    let relay1 = relay(dir.path(), "dst", cut.clone());
    let mut src = source(dir.path());
    let sum = src.ram_checksum();
    src.migrate(&relay1.uri);
    let r = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        desc(&r).starts_with("the destination closed the return path before reporting success"),
        "{r}"
    );
    assert_eq!(src.status(), "running");
    dst.wait_load_failed();
    assert!(relay1.report().held > 0);
    drop(relay1);

    // QEMU's old behaviour, asked for: the source completes without a verdict, and says so.
    let _ = std::fs::remove_file(dir.path().join("relay.sock"));
    let mut dst = destination(dir.path(), "dst3");
    let relay2 = relay(dir.path(), "dst3", cut);
    src.set_params(json!({"x-livemig-auto-return-path": false}));
    src.migrate(&relay2.uri);
    let r = src.wait_completed();
    assert_eq!(r["x-livemig-handover"], "unconfirmed", "{r}");
    let ev = src.events_until(|e| e["event"] == "X_LIVEMIG_HANDOVER");
    assert_eq!(
        ev.last().unwrap()["data"],
        json!({"handover": "unconfirmed", "source-runstate": "paused"})
    );
    assert_eq!(src.status(), "postmigrate");
    dst.wait_load_failed();
    src.ok("cont", json!({}));
    assert_eq!(src.status(), "running");
    assert_eq!(src.ram_checksum(), sum);
}

#[test]
fn a_completed_migration_with_a_return_path_is_confirmed() {
    let dir = tempdir();
    let mut dst = destination(dir.path(), "dst");
    let mut src = source(dir.path());
    src.migrate(&unix_uri(dir.path(), "dst.sock"));
    let r = src.wait_completed();
    assert_eq!(r["x-livemig-handover"], "confirmed", "{r}");
    dst.wait_completed();
}

/// A command that carries the stream to a unix socket and the return path back, as `socat`
/// would.
const BRIDGE: &str = r#"
import os, socket, sys, threading
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def back():
    while True:
        b = s.recv(65536)
        if not b:
            break
        os.write(1, b)
    os.close(1)
t = threading.Thread(target=back)
t.start()
while True:
    b = os.read(0, 65536)
    if not b:
        break
    s.sendall(b)
s.shutdown(socket.SHUT_WR)
t.join()
"#;

#[test]
fn the_return_path_works_over_exec_or_fails_and_is_refused_over_file() {
    // python3 runs the bridge (it comes with the qemu.qmp client CI installs).
    if !testkit::require("return_path_over_exec", testkit::python_qmp()) {
        return;
    }
    let dir = tempdir();
    let mut src = source(dir.path());
    src.caps_on(&["return-path"]);
    // A command that carries nothing back: the source waits for a verdict that cannot come,
    // and says so (before, the capability was silently unused and this completed).
    src.migrate("exec:cat > /dev/null");
    let r = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        desc(&r).starts_with("the destination closed the return path before reporting success"),
        "{r}"
    );
    assert_eq!(src.status(), "running");
    // A file carries nothing back: refused.
    src.migrate(&format!("file:{}", dir.path().join("stream").display()));
    let r = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert_eq!(
        desc(&r),
        "Unable to open return-path: a file: migration carries nothing back (capability 'return-path')",
        "{r}"
    );
    assert_eq!(src.status(), "running");
    // A command that carries both ways: the destination's verdict comes back through it.
    let bridge = dir.path().join("bridge.py");
    std::fs::write(&bridge, BRIDGE).unwrap();
    let mut dst = destination(dir.path(), "dst");
    src.migrate(&format!(
        "exec:python3 {} {}",
        bridge.display(),
        dir.path().join("dst.sock").display()
    ));
    let r = src.wait_completed();
    assert_eq!(r["x-livemig-handover"], "confirmed", "{r}");
    dst.wait_completed();
}

#[test]
fn an_exec_command_that_never_exits_is_bounded_and_the_guest_stays_stopped() {
    let dir = tempdir();
    let mut src = source(dir.path());
    let sum = src.ram_checksum();
    let file = dir.path().join("stream");
    // `x-livemig-auto-return-path` opens none over exec: (only sockets), so nobody confirms.
    src.migrate(&format!("exec:cat > {}; exec sleep 600", file.display()));
    let r = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert!(
        desc(&r).starts_with(
            "the exec command did not exit within 1500 ms after the stream ended (x-livemig-stall-timeout); it was killed; the guest stays stopped here"
        ),
        "{r}"
    );
    assert_eq!(r["x-livemig-handover"], "unknown", "{r}");
    assert_eq!(src.status(), "paused", "the command had the whole stream");
    // The stream did go out whole: a destination loads it.
    let mut dst = Lm::destination(dir.path(), "dst", &format!("file:{}", file.display()));
    dst.wait_completed();
    assert_eq!(dst.ram_checksum(), sum);
    // Management, knowing that destination is not running it, takes the guest back.
    src.ok("cont", json!({}));
    assert_eq!(src.status(), "running");
}

#[test]
fn an_exec_command_that_stops_reading_fails_within_the_bound_and_the_source_resumes() {
    let dir = tempdir();
    let mut src = source(dir.path());
    let sum = src.ram_checksum();
    src.migrate("exec:exec sleep 600");
    let t0 = Instant::now();
    let r = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert_eq!(
        desc(&r),
        "the migration stream stalled: the destination took nothing for 1500 ms (x-livemig-stall-timeout)",
        "{r}"
    );
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert_eq!(src.status(), "running", "the source must resume its guest");
    assert_eq!(src.ram_checksum(), sum);
}

/// `migrate_cancel` of an `exec:` migration whose command forked a child that holds the pipe
/// and never reads (`sleep …; cat`): the whole command goes, at once. Before, only the shell
/// was killed, and the cancel waited for its child (here 10 minutes) or the stall bound.
#[test]
fn a_cancelled_exec_migration_ends_the_whole_command_at_once() {
    let dir = tempdir();
    let mut src = source(dir.path());
    src.set_params(json!({"x-livemig-stall-timeout": 600_000}));
    let marker = dir.path().join("marker");
    // `sleep` forks from the shell and inherits its stdin, the migration's pipe.
    src.migrate(&format!(
        "exec:sleep 600 > {} 2>&1; cat > /dev/null",
        marker.display()
    ));
    src.wait_migration(&["active"]);
    // The pipe fills and the migration thread blocks in write().
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    src.ok("migrate_cancel", json!({}));
    let r = src.wait_migration(&["cancelled", "failed", "completed"]);
    assert_eq!(r["status"], "cancelled", "{r}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the cancel took {:?}",
        t0.elapsed()
    );
    assert_eq!(src.status(), "running");
    // No `sleep` of that command is left (its stdout is the marker file).
    let left: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_link(e.path().join("fd/1")).is_ok_and(|p| p == marker))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "processes of the command left: {left:?}");
}
