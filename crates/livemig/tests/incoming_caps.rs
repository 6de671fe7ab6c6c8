//! A destination whose incoming side has started takes `migrate-set-capabilities`, as QEMU
//! 7.2 does (issue 9, bug 4): QEMU refuses capability changes only while an *outgoing*
//! migration runs — not while it listens, nor while it loads a stream, as QEMU's own iotests
//! rely on (they start destinations with `-incoming exec:...` and set capabilities after).

mod common;

use common::*;
use serde_json::json;

/// The capabilities `query-migrate-capabilities` reports on.
fn caps_on(lm: &mut Lm) -> Vec<String> {
    let r = lm.ok("query-migrate-capabilities", json!({}));
    r.as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == true)
        .filter_map(|c| c["capability"].as_str().map(String::from))
        .collect()
}

#[test]
fn an_exec_destination_loading_its_stream_takes_capabilities() {
    let dir = tempdir();
    // The command writes nothing yet: the destination waits for the stream's first byte
    // (in `setup`: as QEMU 7.2, an `exec:` destination goes `active` once data comes).
    let mut dst = Lm::start(
        dir.path(),
        "dst",
        &["-M", "none", "-m", "16M", "-incoming", "exec:sleep 60"],
    );
    dst.wait_migration(&["setup"]);
    dst.set_caps(&[("events", true), ("dirty-bitmaps", true)]);
    assert_eq!(caps_on(&mut dst), ["events", "dirty-bitmaps"]);
    dst.set_caps(&[("dirty-bitmaps", false)]);
    assert_eq!(caps_on(&mut dst), ["events"]);
}

#[test]
fn a_destination_takes_capabilities_while_listening_and_loading_and_they_act() {
    let dir = tempdir();
    let mut dst = Lm::destination(dir.path(), "dst", "tcp:127.0.0.1:0");
    // Listening, nothing connected yet.
    dst.set_caps(&[("dirty-bitmaps", true)]);
    let port = dst.incoming_port();
    let mut src = Lm::source(dir.path(), "src", IDLE);
    src.wait_idle();
    src.caps_on(&["pause-before-switchover"]);
    src.migrate(&format!("tcp:127.0.0.1:{port}"));
    src.wait_migration(&["pre-switchover"]);
    // The source, whose outgoing migration runs, refuses (QEMU's message)...
    assert_eq!(
        src.err(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]})
        ),
        "There's a migration process in progress"
    );
    // ...the destination, in the middle of loading the stream, takes them.
    assert_eq!(dst.ok("query-migrate", json!({}))["status"], "active");
    dst.set_caps(&[("events", true)]);
    assert_eq!(caps_on(&mut dst), ["events", "dirty-bitmaps"]);
    src.ok("migrate-continue", json!({"state": "pre-switchover"}));
    check_stop_point(&mut src, &mut dst, &[]);
    // `events`, turned on mid-load, acts: the destination reports its completion.
    assert_eq!(dst.migration_events_until("completed"), ["completed"]);
}
