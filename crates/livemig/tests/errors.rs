//! The errors a user meets driving migrations of `livemig vm` over QMP, with QEMU 7.2's
//! wording wherever QEMU has the same condition (checked against QEMU 7.2 by hand), and the
//! source's guest running on after every failed attempt.

mod common;

use common::*;
use serde_json::json;

#[test]
fn migrate_while_a_migration_runs_is_refused() {
    let dir = tempdir();
    let hang = dir.path().join("hang.sock");
    let _listener = hanging_listener(&hang);
    let mut src = Lm::source(dir.path(), "src", IDLE);
    src.migrate(&format!("unix:{}", hang.display()));
    let other = unix_uri(dir.path(), "other.sock");
    assert_eq!(
        src.err("migrate", json!({ "uri": other })),
        "There's a migration process in progress"
    );
    assert_eq!(
        src.err(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]})
        ),
        "There's a migration process in progress"
    );
    assert_eq!(src.ok("query-migrate", json!({}))["status"], "setup");
    src.ok("migrate_cancel", json!({}));
    src.wait_migration(&["cancelled"]);
    assert_eq!(src.status(), "running");
}

#[test]
fn a_vm_waiting_for_an_incoming_migration_cannot_migrate() {
    let dir = tempdir();
    let mut deferred = Lm::destination(dir.path(), "deferred", "defer");
    let mut listening = Lm::destination(dir.path(), "listening", &unix_uri(dir.path(), "in.sock"));
    let out = unix_uri(dir.path(), "out.sock");
    for vm in [&mut deferred, &mut listening] {
        assert_eq!(vm.status(), "inmigrate");
        assert_eq!(
            vm.err("migrate", json!({ "uri": out })),
            "Guest is waiting for an incoming migration"
        );
        assert_eq!(vm.status(), "inmigrate");
    }
}

#[test]
fn migrate_incoming_needs_incoming_and_runs_once() {
    let dir = tempdir();
    let mut plain = Lm::source(dir.path(), "plain", IDLE);
    // QEMU checks the VM's state before the URI.
    for uri in [unix_uri(dir.path(), "p.sock"), "foo:bar".into()] {
        assert_eq!(
            plain.err("migrate-incoming", json!({ "uri": uri })),
            "'-incoming' was not specified on the command line"
        );
    }
    assert_eq!(plain.status(), "running");

    let mut deferred = Lm::destination(dir.path(), "deferred", "defer");
    assert_eq!(
        deferred.err("migrate-incoming", json!({"uri": "foo:bar"})),
        "unknown migration protocol: foo:bar"
    );
    // A refused URI does not use up the deferred incoming migration.
    deferred.ok(
        "migrate-incoming",
        json!({"uri": unix_uri(dir.path(), "d1.sock")}),
    );
    assert_eq!(
        deferred.err(
            "migrate-incoming",
            json!({"uri": unix_uri(dir.path(), "d2.sock")})
        ),
        "The incoming migration has already been started"
    );

    let mut listening = Lm::destination(dir.path(), "listening", &unix_uri(dir.path(), "l.sock"));
    assert_eq!(
        listening.err(
            "migrate-incoming",
            json!({"uri": unix_uri(dir.path(), "l2.sock")})
        ),
        "The incoming migration has already been started"
    );
}

#[test]
fn bad_uris_are_refused_with_qemus_messages() {
    let dir = tempdir();
    let mut src = Lm::source(dir.path(), "src", IDLE);
    for (uri, msg) in [
        (
            "foo:bar",
            "Parameter 'uri' expects a valid migration protocol",
        ),
        ("", "Parameter 'uri' expects a valid migration protocol"),
        ("tcp:127.0.0.1", "error parsing address '127.0.0.1'"),
        ("tcp:[::1]", "error parsing IPv6 address '[::1]'"),
    ] {
        assert_eq!(
            src.err("migrate", json!({ "uri": uri })),
            msg,
            "uri {uri:?}"
        );
    }
    // None of them started a migration.
    assert_eq!(src.ok("query-migrate", json!({})), json!({}));
    assert_eq!(src.status(), "running");
}

#[test]
fn migrate_to_nobody_fails_and_the_guest_runs_on() {
    let dir = tempdir();
    let mut src = Lm::source(dir.path(), "src", BUSY);
    src.add_bitmap("b0");
    src.caps_on(&["events", "dirty-bitmaps"]);
    let refused = testkit::RefusedPort::new();
    let port = refused.port();
    src.migrate(&format!("tcp:127.0.0.1:{port}"));
    let q = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert_eq!(q["status"], "failed", "{q}");
    assert_eq!(
        q["error-desc"],
        format!("Failed to connect to '127.0.0.1:{port}': Connection refused")
    );
    assert_eq!(src.migration_events_until("failed"), ["setup", "failed"]);

    let gone = dir.path().join("nobody.sock");
    src.migrate(&format!("unix:{}", gone.display()));
    let q = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert_eq!(
        q["error-desc"],
        format!(
            "Failed to connect to '{}': No such file or directory",
            gone.display()
        )
    );

    // A command that exits without reading the stream.
    src.migrate("exec:false");
    let q = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert_eq!(
        q["error-desc"], "Unable to write to command: Broken pipe",
        "{q}"
    );

    assert_eq!(src.status(), "running");
    let steps = src.steps();
    src.wait_steps_beyond(&steps);
    assert_eq!(src.bitmap_info("b0")["busy"], false);
}

#[test]
fn destination_killed_mid_migration_fails_the_source_cleanly() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    dst.caps_on(&["events", "dirty-bitmaps", "return-path"]);
    let mut src = Lm::source(dir.path(), "src", BUSY);
    src.add_bitmap("b0");
    src.caps_on(&["events", "dirty-bitmaps", "return-path"]);
    src.set_params(json!({"max-bandwidth": 1 << 20}));
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    dst.proc.child.kill().expect("kill the destination");
    let q = src.wait_migration(&["failed", "completed", "cancelled"]);
    assert_eq!(q["status"], "failed", "{q}");
    // QEMU 7.2's words for the same condition (which errno depends on timing).
    let desc = q["error-desc"].as_str().unwrap_or_default();
    assert!(
        [
            "Unable to write to socket: Broken pipe",
            "Unable to write to socket: Connection reset by peer"
        ]
        .contains(&desc),
        "{q}"
    );
    assert_eq!(
        src.migration_events_until("failed"),
        ["setup", "active", "failed"]
    );
    assert_eq!(src.status(), "running");
    let steps = src.steps();
    src.wait_steps_beyond(&steps);
    let info = src.bitmap_info("b0");
    assert_eq!(info["busy"], false, "{info}");
    src.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "d0", "name": "b0"}),
    );
    eprintln!("error-desc after the destination died: {desc}");
}

/// A bitmap whose name is too long for the stream fails the migration, and, as QEMU 7.2
/// `error_report`s it, the reason reaches the process's stderr in QEMU's words.
#[test]
fn a_bitmap_name_too_long_to_migrate_is_reported_on_stderr() {
    let dir = tempdir();
    let long = "b".repeat(256);
    let expected =
        format!("Cannot migrate bitmap '{long}' on node 'd0': Name is longer than 255 bytes");
    let mut vm = Lm::start(
        dir.path(),
        "src",
        &["-M", "none", "-m", "16M", "-blockdev", DISK],
    );
    vm.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": long}),
    );
    vm.caps_on(&["dirty-bitmaps"]);
    vm.migrate("exec:cat > /dev/null");
    let r = vm.wait_migration(&["completed", "failed", "cancelled"]);
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(vm.status(), "running", "the guest runs on");
    let log = vm.proc.log();
    assert!(
        log.lines().any(|l| l == format!("livemig: {expected}")),
        "stderr:\n{log}"
    );

    // QEMU 7.2 says the same on its stderr.
    if !testkit::require(
        "a_bitmap_name_too_long_to_migrate_is_reported_on_stderr (QEMU)",
        testkit::qemu(),
    ) {
        return;
    }
    let args: Vec<String> = ["-m", "16M", "-blockdev", DISK]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let qp = testkit::VmProcess::qemu_none(dir.path(), "qemu", &args).expect("spawn qemu");
    let mut q = qp.qmp();
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": long}),
    );
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "dirty-bitmaps", "state": true}]}),
    );
    q.ok("migrate", json!({"uri": "exec:cat > /dev/null"}));
    let r = q.wait_migration(&["completed", "failed", "cancelled"], TIMEOUT);
    assert_eq!(r["status"], "failed", "{r}");
    let log = qp.log();
    assert!(
        log.lines()
            .any(|l| l == format!("qemu-system-x86_64: {expected}")),
        "QEMU's stderr:\n{log}"
    );
}

/// A destination whose load fails exits with status 1, the error on its stderr, as QEMU 7.2's
/// does (`process_incoming_migration_co`), after telling its monitor (`MIGRATION` `failed`).
/// One told to `quit` while it loads ends as `quit` ends a VM: status 0.
#[test]
fn a_destination_whose_load_fails_exits_with_status_1() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = tempdir();
    let path = dir.path().join("in.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &format!("unix:{}", path.display()));
    dst.caps_on(&["events"]);
    let mut s = UnixStream::connect(&path).expect("connect");
    s.write_all(b"QEVN\0\0\0\x03").expect("write");
    drop(s);
    let e = dst.wait_load_failed();
    assert!(
        e.contains("Not a migration stream, magic: 5145564e != 5145564d"),
        "{e}"
    );
    assert_eq!(dst.migration_events_until("failed"), ["active", "failed"]);

    let path = dir.path().join("in2.sock");
    let mut dst = Lm::destination(dir.path(), "dst2", &format!("unix:{}", path.display()));
    let mut s = UnixStream::connect(&path).expect("connect");
    // A good header, then nothing: the load waits for the first section.
    s.write_all(b"QEVM\0\0\0\x03").expect("write");
    dst.wait_migration(&["active"]);
    let _ = dst.qmp.execute("quit", json!({}));
    assert_eq!(dst.proc.wait_exit(TIMEOUT), Some(0), "{}", dst.proc.log());
}

/// A stream that fails at once ends the process, but the client that started it with
/// `migrate-incoming` has its reply first: QEMU answers before its load runs. (The reply was
/// sometimes lost under load: the load failed and the process exited before the reply was
/// queued.)
#[test]
fn migrate_incoming_is_answered_before_a_failing_load_exits() {
    let dir = tempdir();
    let bad = dir.path().join("bad.mig");
    std::fs::write(&bad, b"QEVN\0\0\0\x03").unwrap();
    for i in 0..20 {
        let mut dst = Lm::start(
            dir.path(),
            &format!("dst{i}"),
            &["-M", "none", "-incoming", "defer"],
        );
        let r = dst
            .qmp
            .execute(
                "migrate-incoming",
                json!({"uri": format!("file:{}", bad.display())}),
            )
            .unwrap_or_else(|e| panic!("run {i}: no reply to migrate-incoming: {e}"));
        assert_eq!(r["return"], json!({}), "run {i}: {r}");
        assert_eq!(dst.proc.wait_exit(TIMEOUT), Some(1), "{}", dst.proc.log());
    }
}
