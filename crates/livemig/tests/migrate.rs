//! Whole migrations between two `livemig vm` processes over every transport (tcp:, unix:,
//! exec:, file:), with `-incoming defer` + `migrate-incoming`, and between `-M none` machines.
//! Each test checks the stop point the way a user would over QMP: RAM checksums and page
//! verification, dirty bitmap hashes, vCPU steps — and that the guest carries on after `cont`.

mod common;

use common::*;
use serde_json::json;

/// Capabilities on both ends of a socket migration.
const SOCKET_CAPS: &[&str] = &["events", "dirty-bitmaps", "return-path"];
/// Capabilities on both ends where the transport has no return path.
const ONE_WAY_CAPS: &[&str] = &["events", "dirty-bitmaps"];

/// A busy source with bitmap `b0` on `d0`, capabilities set.
fn busy_source(dir: &std::path::Path, caps: &[&str]) -> Lm {
    let mut src = Lm::source(dir, "src", BUSY);
    src.add_bitmap("b0");
    src.caps_on(caps);
    src
}

/// [`check_stop_point`] for a busy source: the destination's RAM holds the guest's pages
/// (all of its fill, if the source had finished it before the migration).
fn check_busy_stop_point(src: &mut Lm, dst: &mut Lm, filled: bool) {
    let v = check_stop_point(src, dst, &["b0"]);
    let min = if filled { FILL_PAGES } else { 1 };
    assert!(v["valid"].as_u64().unwrap_or(0) >= min, "{v}");
}

/// The source's `MIGRATION` events of a migration that went straight through: as QEMU 7.2's,
/// no `device` state without `pause-before-switchover` (switchover.rs has the sequence with).
fn check_source_events(src: &mut Lm) {
    let ev = src.migration_events_until("completed");
    assert_eq!(
        ev,
        ["setup", "active", "STOP", "completed"],
        "source events"
    );
}

#[test]
fn migrates_over_unix_socket() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    dst.caps_on(SOCKET_CAPS);
    let mut src = busy_source(dir.path(), SOCKET_CAPS);
    src.wait_filled();
    src.migrate(&uri);
    check_busy_stop_point(&mut src, &mut dst, true);
    check_source_events(&mut src);
    let ev = dst.migration_events_until("completed");
    // As QEMU 7.2's: `setup` went out at `-incoming` (before any client), the source's
    // connecting is silent.
    assert_eq!(ev, ["active", "completed"], "destination events");
    let q = src.ok("query-migrate", json!({}));
    assert!(
        q["ram"]["normal"].as_u64().unwrap_or(0) >= FILL_PAGES,
        "{q}"
    );
    assert!(q["downtime"].as_u64().is_some(), "{q}");
    // The source handed its guest over: it cannot be migrated again.
    assert_eq!(
        src.err("migrate", json!({ "uri": uri })),
        "Can't migrate the vm that was paused due to previous migration"
    );
    check_carries_on(&mut dst);
}

#[test]
fn migrates_over_tcp() {
    let dir = tempdir();
    let mut dst = Lm::destination(dir.path(), "dst", "tcp:127.0.0.1:0");
    dst.caps_on(SOCKET_CAPS);
    let port = dst.incoming_port();
    let mut src = busy_source(dir.path(), SOCKET_CAPS);
    src.wait_filled();
    src.migrate(&format!("tcp:127.0.0.1:{port}"));
    check_busy_stop_point(&mut src, &mut dst, true);
    check_source_events(&mut src);
    check_carries_on(&mut dst);
}

#[test]
fn migrates_through_a_file_written_by_exec_and_loaded_by_file_and_exec() {
    let dir = tempdir();
    let file = dir.path().join("stream");
    let mut src = busy_source(dir.path(), ONE_WAY_CAPS);
    src.wait_filled();
    src.migrate(&format!("exec:cat > {}", file.display()));
    src.wait_completed();
    check_source_events(&mut src);
    let file_uri = format!("file:{}", file.display());
    let exec_uri = format!("exec:cat {}", file.display());
    // Started with `-incoming URI`: the stream is read at once, before any QMP command.
    for (name, incoming) in [("dst-file", &file_uri), ("dst-exec", &exec_uri)] {
        let mut dst = Lm::destination(dir.path(), name, incoming);
        check_busy_stop_point(&mut src, &mut dst, true);
        check_carries_on(&mut dst);
    }
    // Started with `-incoming defer`, capabilities set, then `migrate-incoming URI`.
    for (name, incoming) in [("dst-file-defer", &file_uri), ("dst-exec-defer", &exec_uri)] {
        let mut dst = Lm::destination(dir.path(), name, "defer");
        dst.caps_on(ONE_WAY_CAPS);
        dst.ok("migrate-incoming", json!({ "uri": incoming }));
        check_busy_stop_point(&mut src, &mut dst, true);
        assert_eq!(
            dst.migration_events_until("completed"),
            ["setup", "active", "completed"]
        );
        check_carries_on(&mut dst);
    }
}

#[test]
fn deferred_incoming_listens_after_migrate_incoming() {
    let dir = tempdir();
    let mut dst = Lm::destination(dir.path(), "dst", "defer");
    assert_eq!(dst.status(), "inmigrate");
    assert_eq!(dst.ok("query-migrate", json!({})), json!({}));
    dst.caps_on(SOCKET_CAPS);
    dst.ok("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
    let port = dst.incoming_port();
    let mut src = busy_source(dir.path(), SOCKET_CAPS);
    // Early, in the middle of the fill, which the destination then completes; but not before
    // the guest's first disk write, so the migrated bitmap has bits to compare (a loaded CI
    // machine once got the migration in before it).
    src.wait_bitmap_dirty("b0");
    src.migrate(&format!("tcp:127.0.0.1:{port}"));
    check_busy_stop_point(&mut src, &mut dst, false);
    check_carries_on(&mut dst);
}

#[test]
fn m_none_machines_migrate_ram_and_bitmaps() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let machine = ["-M", "none", "-m", "64M", "-blockdev", DISK];
    let mut dst_args = machine.to_vec();
    dst_args.extend(["-incoming", &uri, "-S"]);
    let mut dst = Lm::start(dir.path(), "dst", &dst_args);
    dst.caps_on(SOCKET_CAPS);
    let mut src = Lm::start(dir.path(), "src", &machine);
    src.add_bitmap("b0");
    src.add_bitmap("b1");
    src.qemu_io("write 0 64k");
    src.qemu_io("write 1M 4k");
    src.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "d0", "name": "b1"}),
    );
    src.qemu_io("write 32M 1M");
    src.caps_on(SOCKET_CAPS);
    src.migrate(&uri);
    check_stop_point(&mut src, &mut dst, &["b0", "b1"]);
    // 64 KiB + one 64 KiB granule for the 4 KiB write + 1 MiB, in bytes.
    assert_eq!(dst.bitmap_info("b0")["count"], (64 << 10) * 2 + (1 << 20));
    assert_eq!(dst.bitmap_info("b1")["count"], (64 << 10) * 2);
    assert_eq!(dst.bitmap_info("b0")["recording"], true);
    assert_eq!(dst.bitmap_info("b1")["recording"], false);
    dst.ok("cont", json!({}));
    assert_eq!(dst.status(), "running");
}

#[test]
fn a_vm_started_without_s_is_running_as_soon_as_its_monitor_answers() {
    let dir = tempdir();
    for i in 0..8 {
        let name = format!("vm{i}");
        let mut proc = testkit::VmProcess::spawn(
            &livemig().display().to_string(),
            &[
                "vm".into(),
                "-M".into(),
                "none".into(),
                "-m".into(),
                "16M".into(),
            ],
            dir.path(),
            &name,
        )
        .expect("start livemig vm");
        // Connect the moment the socket can take a connection, to ask before start-up could
        // possibly have finished if the monitor answered early.
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut qmp = loop {
            if let Ok(c) = testkit::QmpClient::connect(&proc.qmp_path, std::time::Duration::ZERO) {
                break c;
            }
            assert!(proc.alive(), "{}", proc.log());
            assert!(std::time::Instant::now() < deadline, "{}", proc.log());
            std::thread::yield_now();
        };
        let st = qmp.ok("query-status", json!({}));
        assert_eq!(st["status"], "running", "{name}: {st}");
    }
}

#[test]
fn max_bandwidth_caps_the_rate_and_can_be_raised_mid_migration() {
    const CAP: u64 = 1 << 20;
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    dst.caps_on(SOCKET_CAPS);
    let mut src = Lm::source(dir.path(), "src", IDLE);
    src.caps_on(SOCKET_CAPS);
    src.wait_idle();
    let default_bandwidth = src.ok("query-migrate-parameters", json!({}))["max-bandwidth"].clone();
    src.set_params(json!({ "max-bandwidth": CAP }));
    src.migrate(&uri);
    src.wait_migration(&["active"]);
    // The cap is enforced over 100 ms windows: by `total-time` ms, at most one window's share
    // per window begun, each overshooting by at most one page record.
    let limit = |ms: u64| (ms / 100 + 1) * (CAP / 10 + 4096 + 64) + 4096;
    loop {
        let q = src.ok("query-migrate", json!({}));
        assert_eq!(q["status"], "active", "{q}");
        let ms = q["total-time"].as_u64().unwrap_or(0);
        let sent = q["ram"]["transferred"].as_u64().unwrap_or(0);
        assert!(
            sent <= limit(ms),
            "{sent} bytes sent in {ms} ms at max-bandwidth {CAP}: {q}"
        );
        if ms >= 600 {
            assert!(sent > 0, "{q}");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    src.set_params(json!({ "max-bandwidth": default_bandwidth }));
    let v = check_stop_point(&mut src, &mut dst, &[]);
    assert_eq!(v["valid"], FILL_PAGES, "{v}");
}

/// As QEMU 7.2's destination: `migrate-incoming` announces `setup` at once, whatever the
/// `events` capability; the source's arrival is silent, and an `exec:` destination goes
/// `active` only once its command's output has data (iotest 234 turns `events` on in between).
#[test]
fn a_destination_announces_setup_and_goes_active_when_the_stream_flows() {
    let dir = tempdir();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let mut dst = Lm::destination(dir.path(), "dst", "defer");
    dst.ok(
        "migrate-incoming",
        json!({ "uri": format!("exec:cat {}", fifo.display()) }),
    );
    let ev = dst
        .qmp
        .wait_event(TIMEOUT, |e| e["event"] == "MIGRATION")
        .expect("a MIGRATION event");
    assert_eq!(ev["data"], json!({"status": "setup"}));
    // Nothing has come yet: turning `events` on now still shows everything that follows.
    std::thread::sleep(std::time::Duration::from_millis(100));
    dst.caps_on(ONE_WAY_CAPS);
    let mut src = busy_source(dir.path(), ONE_WAY_CAPS);
    src.migrate(&format!("exec:cat > {}", fifo.display()));
    check_stop_point(&mut src, &mut dst, &["b0"]);
    assert_eq!(
        dst.migration_events_until("completed"),
        ["active", "completed"]
    );
}

/// The downtime limit holds behind a link slower than the source writes (issue 12), on one
/// channel: what the socket buffers accepted and the link has not carried yet must go before
/// the destination can run the guest, so the source counts it before it stops the guest.
#[test]
fn downtime_limit_holds_behind_a_slow_link() {
    // 4 MiB/s: one connection's buffers hold about a second of it.
    let q = downtime_behind_a_slow_link(0, 4 << 20);
    let downtime = q["downtime"].as_u64().unwrap_or(u64::MAX);
    assert!(
        downtime <= SLOW_LINK_LIMIT_MS + 250,
        "downtime {downtime} ms, limit {SLOW_LINK_LIMIT_MS} ms: {q}"
    );
}
