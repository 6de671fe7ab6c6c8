//! Multifd between two `livemig vm` processes: a busy guest (it rewrites its hot set all the
//! time, so pages go again in later rounds, on whichever channel is free) migrated with
//! capability `multifd` over unix and TCP, with several channel counts, with
//! `multifd-compression` zlib and zstd, and with `zero-copy-send`. Each checks the stop point
//! as a user would (RAM checksums, page verification, bitmap hashes, vCPU steps), that the
//! pages went over the channels (`multifd-bytes`), and that the guest carries on. Then what is
//! refused, with QEMU's words.

mod common;

use common::*;
use serde_json::{json, Value};

const CAPS: &[&str] = &["events", "dirty-bitmaps", "return-path", "multifd"];

/// Migrates a busy guest `src` → `dst` over `uri` with multifd and `params` on both ends
/// (and `extra` capabilities); returns the source's final `query-migrate`.
fn migrate_busy(dir: &std::path::Path, incoming: &str, params: Value, extra: &[&str]) -> Value {
    let mut caps = CAPS.to_vec();
    caps.extend_from_slice(extra);
    let mut dst = Lm::destination(dir, "dst", incoming);
    dst.caps_on(&caps);
    dst.set_params(params.clone());
    let uri = match incoming.strip_suffix(":0") {
        Some(host) => format!("{host}:{}", dst.incoming_port()),
        None => incoming.to_string(),
    };
    let mut src = Lm::source(dir, "src", BUSY);
    src.add_bitmap("b0");
    src.caps_on(&caps);
    src.set_params(params);
    src.wait_filled();
    src.wait_bitmap_dirty("b0");
    src.migrate(&uri);
    let v = check_stop_point(&mut src, &mut dst, &["b0"]);
    assert!(
        v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES,
        "destination RAM: {v}"
    );
    let q = src.ok("query-migrate", json!({}));
    let ram = &q["ram"];
    let multifd = ram["multifd-bytes"].as_u64().unwrap_or(0);
    // Every non-zero page went over the channels: at least the fill, in packets.
    assert!(
        multifd > 0 && ram["normal"].as_u64().unwrap_or(0) >= FILL_PAGES,
        "{q}"
    );
    assert!(
        ram["transferred"].as_u64().unwrap_or(0) >= multifd,
        "transferred counts the channels: {q}"
    );
    check_carries_on(&mut dst);
    q
}

#[test]
fn multifd_over_unix_with_four_channels() {
    let dir = tempdir();
    let uri = unix_uri(dir.path(), "mig.sock");
    let q = migrate_busy(dir.path(), &uri, json!({"multifd-channels": 4}), &[]);
    // Uncompressed: at least a page's bytes per page sent.
    let ram = &q["ram"];
    assert!(
        ram["multifd-bytes"].as_u64().unwrap_or(0) >= FILL_PAGES * 4096,
        "{q}"
    );
}

#[test]
fn multifd_over_tcp_with_default_channels() {
    let dir = tempdir();
    migrate_busy(dir.path(), "tcp:127.0.0.1:0", json!({}), &[]);
}

#[test]
fn multifd_over_tcp_with_one_channel() {
    let dir = tempdir();
    migrate_busy(
        dir.path(),
        "tcp:127.0.0.1:0",
        json!({"multifd-channels": 1}),
        &[],
    );
}

/// With compression. The busy guest's pages are random (they do not shrink): what this shows
/// is that every page comes out of the channels' streams whole and in its place; that the
/// compression is QEMU's, on compressible RAM, is shown by `qemu_multifd`.
fn compressed(method: &str, level: &str) {
    let dir = tempdir();
    migrate_busy(
        dir.path(),
        "tcp:127.0.0.1:0",
        json!({"multifd-channels": 3, "multifd-compression": method, level: 1}),
        &[],
    );
}

#[test]
fn multifd_zlib_over_tcp() {
    compressed("zlib", "multifd-zlib-level");
}

#[test]
fn multifd_zstd_over_tcp() {
    compressed("zstd", "multifd-zstd-level");
}

#[test]
fn multifd_zero_copy_send_over_tcp() {
    let dir = tempdir();
    let q = migrate_busy(
        dir.path(),
        "tcp:127.0.0.1:0",
        json!({"multifd-channels": 2}),
        &["zero-copy-send"],
    );
    // Over loopback the kernel copies every page it was asked not to (the receiving socket
    // keeps the buffers), and says so: QEMU counts such syncs.
    assert!(
        q["ram"]["dirty-sync-missed-zero-copy"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{q}"
    );
}

#[test]
fn multifd_refusals_use_qemus_words() {
    let dir = tempdir();
    let mut src = Lm::source(dir.path(), "src", IDLE);
    // zero-copy-send needs multifd, and neither compression nor TLS.
    let caps = |c: &[(&str, bool)]| json!({"capabilities": c.iter().map(|(n, s)| json!({"capability": n, "state": s})).collect::<Vec<_>>()});
    let zc = "Zero copy only available for non-compressed non-TLS multifd migration";
    assert_eq!(
        src.err(
            "migrate-set-capabilities",
            caps(&[("zero-copy-send", true)])
        ),
        zc
    );
    src.set_params(json!({"multifd-compression": "zstd"}));
    assert_eq!(
        src.err(
            "migrate-set-capabilities",
            caps(&[("multifd", true), ("zero-copy-send", true)])
        ),
        zc
    );
    src.set_params(json!({"multifd-compression": "none"}));
    src.set_caps(&[("multifd", true), ("zero-copy-send", true)]);
    assert_eq!(
        src.err(
            "migrate-set-parameters",
            json!({"multifd-compression": "zlib"})
        ),
        zc
    );
    // Over unix sockets the kernel has no MSG_ZEROCOPY: the migration fails, the guest runs.
    let uri = unix_uri(dir.path(), "zc.sock");
    let mut dst = Lm::destination(dir.path(), "dst", &uri);
    dst.caps_on(&["multifd"]);
    src.migrate(&uri);
    let r = src.wait_migration(&["failed", "completed"]);
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(
        r["error-desc"], "Zero copy send feature not detected in host kernel",
        "{r}"
    );
    assert_eq!(src.status(), "running");
    drop(dst);
    src.set_caps(&[("zero-copy-send", false)]);
    // A transport with one channel.
    let file = dir.path().join("stream");
    src.migrate(&format!("exec:cat > {}", file.display()));
    let r = src.wait_migration(&["failed", "completed"]);
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(
        r["error-desc"], "multifd is not supported by current protocol",
        "{r}"
    );
    assert_eq!(src.status(), "running");
    // Postcopy over multifd is not built: refused rather than accepted and ignored.
    let e = src.err("migrate-set-capabilities", caps(&[("postcopy-ram", true)]));
    assert!(e.contains("multifd"), "{e}");
}

/// Waits until the source has sent more than `bytes` and is still `active`.
fn wait_sent(src: &mut Lm, bytes: u64) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let r = src.ok("query-migrate", json!({}));
        assert!(
            r["status"] == "active" || r["status"] == "setup",
            "{}: {r}",
            src.name
        );
        if r["ram"]["transferred"].as_u64().unwrap_or(0) > bytes {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {r}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A destination listening on `uri` with multifd and 4 channels.
fn multifd_destination(dir: &std::path::Path, name: &str, uri: &str) -> Lm {
    let mut dst = Lm::destination(dir, name, uri);
    dst.caps_on(CAPS);
    dst.set_params(json!({"multifd-channels": 4}));
    dst
}

#[test]
fn multifd_cancel_and_killed_destination_leave_the_source_running() {
    let dir = tempdir();
    let mut src = Lm::source(dir.path(), "src", BUSY);
    src.add_bitmap("b0");
    src.caps_on(CAPS);
    // Throttled below the guest's dirtying: the migration runs until it is stopped.
    src.set_params(json!({"multifd-channels": 4, "max-bandwidth": 8 << 20}));
    src.wait_filled();
    src.wait_bitmap_dirty("b0");

    // 1. migrate_cancel with four channels open.
    let uri = unix_uri(dir.path(), "m1.sock");
    let mut dst = multifd_destination(dir.path(), "dst1", &uri);
    src.migrate(&uri);
    wait_sent(&mut src, 1 << 20);
    src.ok("migrate_cancel", json!({}));
    let r = src.wait_migration(&["cancelled", "failed", "completed"]);
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(src.status(), "running");
    dst.wait_load_failed();
    drop(dst);

    // 2. The destination is killed mid-migration.
    let uri = unix_uri(dir.path(), "m2.sock");
    let mut dst = multifd_destination(dir.path(), "dst2", &uri);
    src.migrate(&uri);
    wait_sent(&mut src, 1 << 20);
    dst.proc.child.kill().expect("kill the destination");
    let r = src.wait_migration(&["cancelled", "failed", "completed"]);
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(src.status(), "running");
    drop(dst);

    // 3. And then it migrates, whole.
    src.set_params(json!({"max-bandwidth": 0}));
    let uri = unix_uri(dir.path(), "m3.sock");
    let mut dst = multifd_destination(dir.path(), "dst3", &uri);
    src.migrate(&uri);
    let v = check_stop_point(&mut src, &mut dst, &["b0"]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
    check_carries_on(&mut dst);
}

/// A source that has sent its whole stream and shut the main channel's sending side before
/// the destination came to accept its channels (a small or well-compressed guest, a busy
/// destination): that half-close must not read as a source that failed to open a channel.
/// The destination is stopped (SIGSTOP) while the source connects and sends everything (the
/// kernel queues the connections and the bytes), then resumed: it finds the main channel
/// already half-closed and every channel waiting. It failed that way 3 times in 4 over a veth
/// pair with a compressible guest, before the wait looked at the listener first.
#[test]
fn multifd_stream_done_before_the_channels_are_accepted() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let dir = tempdir();
    // 32 MiB of zero pages: ZERO records on the main stream, SYNC packets on the channels.
    let guest = ["-M", "none", "-m", "32M"];
    let mut a = guest.to_vec();
    a.extend(["-incoming", "tcp:127.0.0.1:0", "-S"]);
    let mut dst = Lm::start(dir.path(), "dst", &a);
    dst.caps_on(&["multifd", "return-path"]);
    dst.set_params(json!({"multifd-channels": 4}));
    let port = dst.incoming_port();
    let mut src = Lm::start(dir.path(), "src", &guest);
    src.caps_on(&["multifd", "return-path"]);
    src.set_params(json!({"multifd-channels": 4}));
    let pid = Pid::from_raw(dst.proc.child.id() as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    src.migrate(&format!("tcp:127.0.0.1:{port}"));
    // The source sends everything and waits for the destination's verdict.
    std::thread::sleep(std::time::Duration::from_secs(1));
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let d = dst.wait_migration(&["completed", "failed"]);
    assert_eq!(d["status"], "completed", "destination {d}");
    let s = src.wait_migration(&["completed", "failed", "cancelled"]);
    assert_eq!(s["status"], "completed", "source {s}");
}

/// The downtime limit holds behind a link slower than the source writes (issue 12): with four
/// channels, megabytes the sockets accepted wait in their buffers when the first pass ends —
/// more than a second of this 8 MiB/s link, which the source's own send rate does not show. The source must count
/// them and switch over only once they fit the limit. Measured as QEMU does (`downtime`), with
/// room for a loaded machine; before the source counted them the downtime was the backlog
/// (1.4 s here).
#[test]
fn multifd_downtime_limit_holds_behind_a_slow_link() {
    let q = downtime_behind_a_slow_link(4, 8 << 20);
    let downtime = q["downtime"].as_u64().unwrap_or(u64::MAX);
    assert!(
        downtime <= SLOW_LINK_LIMIT_MS + 250,
        "downtime {downtime} ms, limit {SLOW_LINK_LIMIT_MS} ms: {q}"
    );
    assert!(q["ram"]["multifd-bytes"].as_u64().unwrap_or(0) > 0, "{q}");
}
