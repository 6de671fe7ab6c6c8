//! Postcopy over TLS between two `livemig vm` processes: every channel a postcopy opens — the
//! main channel with its return path, the `postcopy-preempt` channel, and the new main
//! channel and preempt channel of a recovery after a cut — is a TLS session, with x509
//! certificates and with pre-shared keys alike. (QEMU 7.2 does the same: its preempt channel
//! is upgraded to TLS as the main one is, `postcopy_preempt_send_channel_new`, and a
//! recovery's channels come through the same connect and accept paths as a new migration's.)
//!
//! Every connection runs through testkit's relay, which keeps what it carried; the tests
//! walk each direction of each connection as TLS records (`testkit::tls_wire`) — a stream
//! header, a page or a return-path message in the clear would not parse as one — and look
//! for what the plaintext would carry: the stream's file header (`QEVM`, version 3) and the
//! header every guest page starts with.

mod common;

use common::postcopy::*;
use common::*;
use serde_json::json;
use std::path::Path;
use testkit::pki::Creds;
use testkit::relay::{Plan, Relay, Target};
use testkit::tls_wire;

/// The first bytes of every page the workload writes (its magic, little-endian).
const PAGE_MAGIC: [u8; 8] = vm::workload::PAGE_MAGIC.to_le_bytes();

/// A destination with server credentials of kind `creds` (written under `dir`) in use when
/// `tls` (with `tls-authz` admitting the source), postcopy and preempt on, running its guest
/// as soon as postcopy starts, listening on a TCP port of its own; and a relay to it that
/// keeps what it carries.
fn destination(dir: &Path, creds: Creds, tls: bool) -> (Lm, Relay) {
    creds.write(dir);
    let mut a: Vec<String> = GUEST.iter().map(|s| s.to_string()).collect();
    a.extend(creds.server_objects(dir));
    a.extend(["-incoming".into(), "tcp:127.0.0.1:0".into()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut dst = Lm::start(dir, "dst", &a);
    dst.caps_on(CAPS);
    dst.caps_on(&["postcopy-preempt"]);
    if tls {
        dst.set_params(json!({"tls-creds": "tls0", "tls-authz": "authz0"}));
    }
    let relay = relay_to(&mut dst);
    (dst, relay)
}

/// A recording relay to the port `dst` listens on (its migration's, or its recovery's).
fn relay_to(dst: &mut Lm) -> Relay {
    let port = dst.incoming_port();
    Relay::tcp(
        Target::Tcp(([127, 0, 0, 1], port).into()),
        Plan::none().recording(),
    )
}

/// A source with client credentials of kind `creds` (in use when `tls`), preempt on, in
/// postcopy through `relay` with the background push held to 256 KiB/s, and its
/// destination's guest running on pages it asked for on the preempt channel.
fn in_postcopy(dir: &Path, creds: Creds, tls: bool, dst: &mut Lm, relay: &Relay) -> Lm {
    let mut src = slow_source_with(dir, &creds.client_objects(dir));
    src.caps_on(&["postcopy-preempt"]);
    src.set_params(json!({"max-postcopy-bandwidth": 256 << 10}));
    if tls {
        src.set_params(json!({"tls-creds": "tls0"}));
    }
    src.migrate(&relay.uri);
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_migration(&["postcopy-active"]);
    dst.wait_migration(&["postcopy-active"]);
    let at_switch = dst.steps();
    dst.wait_steps_beyond(&at_switch);
    wait_preempt_pages_beyond(&mut src, 0);
    src
}

/// Waits until the source has sent more than `n` pages on the preempt channel; returns how
/// many.
fn wait_preempt_pages_beyond(src: &mut Lm, n: u64) -> u64 {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let sent = preempt_pages(src);
        if sent > n {
            return sent;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no page went on the preempt channel beyond {n}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Lets the push go, waits for both ends to complete, and checks the destination's RAM page
/// by page (with its guest stopped).
fn complete_and_verify(src: &mut Lm, dst: &mut Lm) {
    src.set_params(json!({"max-postcopy-bandwidth": 0}));
    dst.wait_completed();
    src.wait_completed();
    dst.ok("stop", json!({}));
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM: {v}");
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
}

/// Checks that `relay` carried `connections` connections, both directions of each TLS
/// records only, with no guest page and no stream header in the clear
/// (`tls_wire::assert_all_tls`); returns what each carried towards the destination.
fn assert_all_tls(
    what: &str,
    relay: &Relay,
    connections: usize,
    cut: bool,
) -> Vec<tls_wire::Records> {
    let recorded = relay.recorded();
    assert_eq!(recorded.len(), connections, "{what}: connections");
    tls_wire::assert_all_tls(
        what,
        &recorded,
        cut,
        &[
            ("a guest page", &PAGE_MAGIC),
            ("a stream header", tls_wire::STREAM_HEADER),
        ],
    )
}

/// Postcopy with preempt over TLS: the guest pulls pages on the preempt channel, the
/// migration completes with RAM that verifies, and the main channel (with its return path)
/// and the preempt channel each carried TLS records only — the preempt channel at least
/// the pages sent on it.
fn preempt_over_tls(creds: Creds) {
    let dir = tempdir();
    let dir = dir.path();
    let (mut dst, relay) = destination(dir, creds, true);
    let mut src = in_postcopy(dir, creds, true, &mut dst, &relay);
    complete_and_verify(&mut src, &mut dst);
    let sent = preempt_pages(&mut src);
    assert!(sent > 0, "pages went on the preempt channel");
    assert_eq!(preempt_pages(&mut dst), sent, "and all were read there");
    let fwd = assert_all_tls("postcopy", &relay, 2, false);
    assert!(
        fwd[1].application_bytes >= sent * 4096,
        "the preempt channel carried its {sent} pages encrypted: {:?}",
        fwd[1]
    );
    assert!(
        fwd[0].application_bytes + fwd[1].application_bytes >= FILL_PAGES * 4096,
        "RAM went through the TLS sessions: {fwd:?}"
    );
}

#[test]
fn postcopy_preempt_over_x509_is_tls_on_every_channel() {
    preempt_over_tls(Creds::X509);
}

#[test]
fn postcopy_preempt_over_psk_is_tls_on_every_channel() {
    preempt_over_tls(Creds::Psk);
}

/// A link cut in `postcopy-active` over TLS pauses both ends; `migrate-recover` and
/// `migrate resume=true` recover over TLS: the recovery's main channel (RECV_BITMAP and the
/// received maps on its return path, RESUME, RESUME_ACK) and its new preempt channel are
/// TLS sessions, and the guest's reads after the recovery pull pages on the new preempt
/// channel. RAM verifies at the end.
fn cut_and_recover_over_tls(creds: Creds) {
    let dir = tempdir();
    let dir = dir.path();
    let (mut dst, relay) = destination(dir, creds, true);
    let mut src = in_postcopy(dir, creds, true, &mut dst, &relay);

    relay.cut();
    paused(&mut src);
    paused(&mut dst);
    assert_eq!(dst.status(), "running", "the destination's guest runs on");
    let before = preempt_pages(&mut src);
    dst.ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let relay2 = relay_to(&mut dst);
    resume(&mut src, &mut dst, &relay2.uri);
    // Reading all of RAM while the push trickles asks for every page still missing: they
    // come on the recovery's preempt channel.
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM during postcopy: {v}");
    let after = wait_preempt_pages_beyond(&mut src, before);
    complete_and_verify(&mut src, &mut dst);
    let events = src.migration_events_until("completed");
    assert_eq!(
        events.iter().filter(|e| *e == "postcopy-recover").count(),
        1,
        "{events:?}"
    );

    assert_all_tls("before the cut", &relay, 2, true);
    let fwd = assert_all_tls("after the recovery", &relay2, 2, false);
    // Each page record is at least its 8-byte address; most of the 32 MiB the guest filled
    // was still on the source (a 256 KiB/s push), and those pages are data, not zeros.
    assert!(
        fwd[1].application_bytes >= ((after - before) * 8).max(1 << 20),
        "the recovery's preempt channel carried its {} pages encrypted: {:?}",
        after - before,
        fwd[1]
    );
}

#[test]
fn postcopy_preempt_over_x509_recovers_from_a_cut_over_tls() {
    cut_and_recover_over_tls(Creds::X509);
}

#[test]
fn postcopy_preempt_over_psk_recovers_from_a_cut_over_tls() {
    cut_and_recover_over_tls(Creds::Psk);
}

/// TLS parameters set while postcopy is paused apply to the recovery's channels, as in QEMU
/// 7.2 (which reads `tls-creds` when `migrate ... resume=true` connects, and when
/// `migrate-recover`'s listener accepts): a migration that began in the clear is encrypted
/// from its recovery on. (The source used to keep the parameters it started with: it
/// resumed in the clear, and the destination, which asked for TLS, refused it.)
#[test]
fn tls_set_while_paused_secures_the_recovery() {
    let dir = tempdir();
    let dir = dir.path();
    let creds = Creds::X509;
    let (mut dst, relay) = destination(dir, creds, false);
    let mut src = in_postcopy(dir, creds, false, &mut dst, &relay);
    // In the clear so far: the guest's pages are there to be read.
    let clear = relay.recorded();
    assert!(
        tls_wire::find(&clear[0].forward, tls_wire::STREAM_HEADER) == Some(0),
        "the first migration is in the clear"
    );
    src.ok("migrate-pause", json!({}));
    paused(&mut src);
    paused(&mut dst);
    dst.set_params(json!({"tls-creds": "tls0", "tls-authz": "authz0"}));
    src.set_params(json!({"tls-creds": "tls0"}));
    let before = preempt_pages(&mut src);
    dst.ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let relay2 = relay_to(&mut dst);
    resume(&mut src, &mut dst, &relay2.uri);
    let q = src.ok("query-migrate", json!({}));
    assert_eq!(q["status"], "postcopy-active", "{q}");
    let v = dst.verify_ram();
    assert_eq!(v["corrupt"], 0, "destination RAM during postcopy: {v}");
    wait_preempt_pages_beyond(&mut src, before);
    complete_and_verify(&mut src, &mut dst);
    assert_all_tls("after the recovery", &relay2, 2, false);
}

/// A recovery whose two ends disagree about TLS is refused by both, clearly, and nothing
/// goes in the clear: a destination that asks for TLS refuses a source that resumes without
/// it (and the source says the destination speaks TLS), a source that resumes with TLS
/// refuses a destination without it. Each end stays `postcopy-paused`, and once both agree
/// the recovery completes.
#[test]
fn a_recovery_that_disagrees_about_tls_is_refused_by_both_ends() {
    let dir = tempdir();
    let dir = dir.path();
    let creds = Creds::X509;
    let (mut dst, relay) = destination(dir, creds, false);
    let mut src = in_postcopy(dir, creds, false, &mut dst, &relay);
    src.ok("migrate-pause", json!({}));
    paused(&mut src);
    paused(&mut dst);

    // 1. The destination asks for TLS, the source resumes in the clear.
    dst.set_params(json!({"tls-creds": "tls0"}));
    dst.ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let port = dst.incoming_port();
    src.ok(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{port}"), "resume": true}),
    );
    let q = paused_with(&mut src, "resume failed");
    let e = q["error-desc"].as_str().unwrap_or_default();
    assert!(
        e.contains("the destination speaks TLS"),
        "the source says why: {e}"
    );
    let q = paused_with(&mut dst, "recovery connection failed");
    let e = q["error-desc"].as_str().unwrap_or_default();
    assert!(
        e.contains("does not speak TLS"),
        "the destination says why: {e}"
    );

    // 2. The source resumes with TLS, the destination listens in the clear.
    dst.set_params(json!({"tls-creds": ""}));
    src.set_params(json!({"tls-creds": "tls0"}));
    dst.ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let port = dst.incoming_port();
    src.ok(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{port}"), "resume": true}),
    );
    paused_with(&mut src, "resume failed: TLS handshake failed");
    let e = loop {
        let q = paused_with(&mut dst, "recovery connection failed");
        let e = q["error-desc"].as_str().unwrap_or_default().to_string();
        if !e.contains("does not speak TLS") {
            break e;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(
        e.contains("the source speaks TLS"),
        "the destination says why: {e}"
    );

    // 3. Both with TLS: the recovery goes through, encrypted.
    dst.set_params(json!({"tls-creds": "tls0", "tls-authz": "authz0"}));
    dst.ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let relay2 = relay_to(&mut dst);
    resume(&mut src, &mut dst, &relay2.uri);
    complete_and_verify(&mut src, &mut dst);
    assert_all_tls("after the recovery", &relay2, 2, false);
}

/// Waits until `lm` is `postcopy-paused` with an `error-desc` containing `what`; returns its
/// `query-migrate`.
fn paused_with(lm: &mut Lm, what: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let q = paused(lm);
        if q["error-desc"].as_str().unwrap_or_default().contains(what) {
            return q;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: no '{what}' in {q}",
            lm.name
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// With preempt, a migration whose ends disagree about TLS fails on both, at once and with
/// what is wrong, and the source runs on: the destination waits for its second (preempt)
/// connection before it reads the stream, so a plaintext destination used to wait there while
/// the TLS source waited for an answer to its hello — both stuck until the stall bound
/// (30 s). Now the plaintext destination sees the hello on the main channel (and says so),
/// and a TLS one refuses the plaintext source's stream header.
#[test]
fn preempt_with_tls_on_one_end_only_fails_at_once_on_both() {
    let dir = tempdir();
    let dir = dir.path();
    let creds = Creds::X509;
    creds.write(dir);
    let mut src = slow_source_with(dir, &creds.client_objects(dir));
    src.caps_on(&["postcopy-preempt"]);
    let destination = |name: &str, tls: bool| {
        let mut a: Vec<String> = GUEST.iter().map(|s| s.to_string()).collect();
        a.extend(creds.server_objects(dir));
        a.extend(["-incoming".into(), "tcp:127.0.0.1:0".into()]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut dst = Lm::start(dir, name, &a);
        dst.caps_on(CAPS);
        dst.caps_on(&["postcopy-preempt"]);
        if tls {
            dst.set_params(json!({"tls-creds": "tls0"}));
        }
        let port = dst.incoming_port();
        (dst, format!("tcp:127.0.0.1:{port}"))
    };
    let quick = std::time::Duration::from_secs(10);

    // 1. A TLS source, a plaintext destination.
    src.set_params(json!({"tls-creds": "tls0"}));
    let (mut dst, uri) = destination("plain", false);
    let t0 = std::time::Instant::now();
    src.migrate(&uri);
    let q = src.wait_migration(&["failed", "completed"]);
    assert_eq!(q["status"], "failed", "{q}");
    let e = q["error-desc"].as_str().unwrap_or_default();
    assert!(e.contains("TLS handshake failed"), "source: {e}");
    let e = dst.wait_migration(&["failed"])["error-desc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(e.contains("the source speaks TLS"), "destination: {e}");
    assert!(t0.elapsed() < quick, "took {:?}", t0.elapsed());
    assert_eq!(src.status(), "running", "the source runs on");

    // 2. A plaintext source, a TLS destination.
    src.set_params(json!({"tls-creds": ""}));
    let (mut dst, uri) = destination("tls", true);
    let t0 = std::time::Instant::now();
    src.migrate(&uri);
    let q = src.wait_migration(&["failed", "completed"]);
    assert_eq!(q["status"], "failed", "{q}");
    let e = dst.wait_migration(&["failed"])["error-desc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(e.contains("does not speak TLS"), "destination: {e}");
    assert!(t0.elapsed() < quick, "took {:?}", t0.elapsed());
    assert_eq!(src.status(), "running", "the source runs on");
}

/// A TLS source whose peer accepts and never answers its hello (a destination without TLS
/// that waits for another channel, a stuck process) gives up after the stall bound
/// (`x-livemig-stall-timeout`) instead of waiting in `setup` for good — and so does a
/// `migrate ... resume=true` in the same spot, which stays `postcopy-paused`, ready for the
/// next attempt. (The handshake's reads were not bounded: both waited for good.)
#[test]
fn a_tls_handshake_without_an_answer_ends_at_the_stall_bound() {
    let dir = tempdir();
    let dir = dir.path();
    let creds = Creds::X509;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_uri = format!("tcp:{}", silent.local_addr().unwrap());
    // Accepts every connection and keeps it, saying nothing.
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < until {
            match silent.accept() {
                Ok((c, _)) => held.push(c),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
            if held.len() >= 2 {
                std::thread::sleep(std::time::Duration::from_secs(20));
                break;
            }
        }
    });
    let bound = std::time::Duration::from_millis(1500);

    // 1. A new migration.
    let (mut dst, relay) = destination(dir, creds, true);
    let mut src = slow_source_with(dir, &creds.client_objects(dir));
    src.caps_on(&["postcopy-preempt"]);
    src.set_params(
        json!({"tls-creds": "tls0", "x-livemig-stall-timeout": bound.as_millis() as u64}),
    );
    let t0 = std::time::Instant::now();
    src.migrate(&silent_uri);
    let q = src.wait_migration(&["failed", "completed"]);
    assert_eq!(q["status"], "failed", "{q}");
    let e = q["error-desc"].as_str().unwrap_or_default();
    assert!(
        e.contains("TLS handshake failed") && e.contains("no answer within 1500 ms"),
        "source: {e}"
    );
    assert!(t0.elapsed() < bound * 4, "took {:?}", t0.elapsed());
    assert_eq!(src.status(), "running", "the source runs on");

    // 2. A resume.
    src.set_params(json!({"max-postcopy-bandwidth": 256 << 10}));
    src.migrate(&relay.uri);
    src.wait_migration(&["active"]);
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_migration(&["postcopy-active"]);
    dst.wait_migration(&["postcopy-active"]);
    src.ok("migrate-pause", json!({}));
    paused(&mut src);
    paused(&mut dst);
    let t0 = std::time::Instant::now();
    src.ok("migrate", json!({"uri": silent_uri, "resume": true}));
    paused_with(&mut src, "TLS handshake failed");
    assert!(t0.elapsed() < bound * 4, "took {:?}", t0.elapsed());
    // And the real recovery goes through.
    dst.ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let relay2 = relay_to(&mut dst);
    resume(&mut src, &mut dst, &relay2.uri);
    complete_and_verify(&mut src, &mut dst);
    drop(held);
}
