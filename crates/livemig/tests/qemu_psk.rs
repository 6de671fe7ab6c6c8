//! Migration over TLS with pre-shared keys between QEMU 7.2 (GnuTLS) and livemig (OpenSSL),
//! both `-M none -m 32M`, with `keys.psk` files in QEMU's format (`username:hexkey`).
//!
//! * QEMU → livemig → QEMU over TCP with a return path, once on one channel and once with
//!   multifd (two channels, each a PSK session of its own): GnuTLS negotiates TLS 1.3 with
//!   the external key against livemig's OpenSSL on both hops. livemig's destination asks its
//!   `tls-authz` about the username QEMU sent (`qemu`, QEMU's default). RAM identical at every
//!   step. livemig's client credentials come by `object-add`, its server credentials by
//!   `-object`.
//! * The same chain with QEMU's `priority` taking TLS 1.3 away: TLS 1.2 with an `ECDHE-PSK`
//!   or `DHE-PSK` suite on both hops. livemig's log (`LIVEMIG_LOG=debug`) names the protocol of each
//!   session, so each test shows which one was negotiated.
//! * A wrong key, each way: the migration fails on both ends with a clear error and the source
//!   runs on.

mod qemu_common;

use qemu_common::secure::{
    self, destination_failed, livemig_destination, livemig_source, qemu_destination, qemu_source,
    source_failed_and_runs, wait_log, CHANNELS,
};
use qemu_common::*;
use serde_json::json;
use std::path::Path;

const KEY: &str = "00f1e2d3c4b5a697887968574a3b2c1d0e0f1a2b3c4d5e6f708192a3b4c5d6e7";
const WRONG: &str = "00f1e2d3c4b5a697887968574a3b2c1d0e0f1a2b3c4d5e6f708192a3b4c5d6e8";

/// `dir/sub/keys.psk` with `lines`.
fn keys(dir: &Path, sub: &str, lines: &str) {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("keys.psk"), lines).unwrap();
}

fn creds_arg(dir: &Path, id: &str, sub: &str, endpoint: &str) -> Vec<String> {
    secure::creds_arg("tls-creds-psk", dir, id, sub, endpoint)
}

/// GnuTLS's default without TLS 1.3.
const TLS12_ONLY: &str = "NORMAL:-VERS-TLS1.3";

/// The lines of livemig's log that say how a channel was secured.
fn sessions(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("channel secured with TLS"))
        .collect()
}

#[test]
fn psk_qemu_to_livemig_to_qemu() {
    chain("psk_qemu_to_livemig_to_qemu", false, None);
}

/// The same chain with multifd: every channel of every hop is a PSK session of its own.
#[test]
fn psk_multifd_qemu_to_livemig_to_qemu() {
    chain("psk_multifd_qemu_to_livemig_to_qemu", true, None);
}

/// The same chain with QEMU limited to TLS 1.2 on both hops.
#[test]
fn psk_tls12_qemu_to_livemig_to_qemu() {
    chain("psk_tls12_qemu_to_livemig_to_qemu", false, Some(TLS12_ONLY));
}

/// The chain with pre-shared keys (QEMU's credentials with a GnuTLS `priority` before its
/// own PSK additions, if given): livemig's destination asks its `authz-simple` about the
/// username QEMU sent (`qemu`, QEMU's default); livemig's log (`LIVEMIG_LOG=debug`) names the
/// protocol of each session.
fn chain(test: &str, with_multifd: bool, priority: Option<&str>) {
    let credentials = |dir: &Path| {
        keys(dir, "cli", &format!("qemu:{KEY}\n"));
        keys(dir, "srv", &format!("admin:0011223344556677\nqemu:{KEY}\n"));
    };
    let qemu_props = priority
        .map(|p| format!(",priority={p}"))
        .unwrap_or_default();
    let Some(end) = secure::chain(&secure::Chain {
        test,
        multifd: with_multifd,
        kind: "tls-creds-psk",
        credentials: &credentials,
        qemu_props: &qemu_props,
        livemig_env: &["LIVEMIG_LOG=debug"],
        livemig_authz: "authz-simple,id=auth0,identity=qemu",
        qemu_authz: None,
        seed: 23,
        over: "TLS-PSK",
    }) else {
        return;
    };

    // What GnuTLS and OpenSSL agreed on, channel by channel: TLS 1.3 with the external key
    // (AES-128-GCM, livemig's first choice) by default; TLS 1.2 (EC)DHE-PSK without 1.3.
    let log = end.l.log();
    let lines = sessions(&log);
    let channels = if with_multifd { 1 + CHANNELS } else { 1 } as usize;
    let incoming = lines.iter().filter(|l| l.contains("incoming")).count();
    assert_eq!(incoming, channels, "{lines:#?}");
    assert_eq!(lines.len(), 2 * channels, "{lines:#?}");
    let want = match priority {
        None => "(TLSv1.3 TLS_AES_128_GCM_SHA256 with a pre-shared key)",
        Some(_) => "(TLSv1.2 ",
    };
    for line in &lines {
        assert!(line.contains(want), "{line}");
        // In TLS 1.2, a PSK suite with a key exchange of its own (ECDHE-PSK or DHE-PSK).
        assert!(priority.is_none() || line.contains("HE-PSK-"), "{line}");
    }
}

#[test]
fn psk_wrong_key_fails_clearly_both_ways() {
    let Some(tmp) = setup("psk_wrong_key_fails_clearly_both_ways") else {
        return;
    };
    let dir = tmp.path();
    keys(dir, "srv", &format!("qemu:{KEY}\n"));
    keys(dir, "bad", &format!("qemu:{WRONG}\n"));

    // livemig source with the wrong key -> QEMU destination.
    let mut src = livemig_source(
        dir,
        "l-src",
        &creds_arg(dir, "tls0", "bad", "client"),
        json!({"tls-creds": "tls0"}),
    );
    let (dst, uri) = qemu_destination(
        dir,
        "q-dst",
        &creds_arg(dir, "tls0", "srv", "server"),
        json!({"tls-creds": "tls0"}),
        false,
    );
    src.q.ok("migrate", json!({"uri": uri}));
    let e = source_failed_and_runs(&mut src.q, "livemig source");
    assert!(
        e.starts_with("TLS handshake failed: the peer closed the connection during the handshake: it refused this side's pre-shared key"),
        "{e}"
    );
    wait_log(&dst.p, "TLS handshake failed");
    drop(dst);

    // QEMU source with the wrong key -> livemig destination.
    let mut qs = qemu_source(dir, "q-src", &creds_arg(dir, "tls0", "bad", "client"));
    let (mut ld, uri) = livemig_destination(
        dir,
        "l-dst",
        &creds_arg(dir, "tls0", "srv", "server"),
        json!({"tls-creds": "tls0"}),
    );
    qs.q.ok("migrate", json!({"uri": uri}));
    let e = destination_failed(&mut ld.q);
    assert!(
        e.starts_with("TLS handshake failed: the pre-shared key of username qemu does not match"),
        "{e}"
    );
    source_failed_and_runs(&mut qs.q, "QEMU source");
}
