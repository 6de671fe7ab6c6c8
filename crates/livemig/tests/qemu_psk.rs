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

use qemu_common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::QmpClient;

const KEY: &str = "00f1e2d3c4b5a697887968574a3b2c1d0e0f1a2b3c4d5e6f708192a3b4c5d6e7";
const WRONG: &str = "00f1e2d3c4b5a697887968574a3b2c1d0e0f1a2b3c4d5e6f708192a3b4c5d6e8";

/// `dir/sub/keys.psk` with `lines`.
fn keys(dir: &Path, sub: &str, lines: &str) {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("keys.psk"), lines).unwrap();
}

fn creds_arg(dir: &Path, id: &str, sub: &str, endpoint: &str) -> Vec<String> {
    vec![
        "-object".into(),
        format!(
            "tls-creds-psk,id={id},dir={},endpoint={endpoint}",
            dir.join(sub).display()
        ),
    ]
}

/// QEMU's PSK credentials with a GnuTLS priority string before QEMU's own PSK additions.
fn qemu_creds_arg(dir: &Path, sub: &str, endpoint: &str, priority: Option<&str>) -> Vec<String> {
    let mut a = creds_arg(dir, "tls0", sub, endpoint);
    if let Some(p) = priority {
        a[1].push_str(&format!(",priority={p}"));
    }
    a
}

/// GnuTLS's default without TLS 1.3.
const TLS12_ONLY: &str = "NORMAL:-VERS-TLS1.3";

/// `livemig vm -M none -m 32M ARGS` with `LIVEMIG_LOG=debug`, so its log names each
/// session's protocol.
fn livemig_logged(dir: &Path, name: &str, args: &[String]) -> testkit::VmProcess {
    let mut v = vec![
        "LIVEMIG_LOG=debug".to_string(),
        env!("CARGO_BIN_EXE_livemig").to_string(),
    ];
    v.extend(strings(&["vm", "-M", "none", "-m", RAM_ARG]));
    v.extend_from_slice(args);
    testkit::VmProcess::spawn("env", &v, dir, name)
        .unwrap_or_else(|e| panic!("cannot start livemig: {e}"))
}

/// The lines of livemig's log that say how a channel was secured.
fn sessions(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("channel secured with TLS"))
        .collect()
}

fn return_path(q: &mut QmpClient) {
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "return-path", "state": true}]}),
    );
}

/// Multifd channels on every end of the multifd chain.
const CHANNELS: u64 = 2;

/// Capability `multifd` with [`CHANNELS`] channels, when `on`.
fn multifd(q: &mut QmpClient, on: bool) {
    if on {
        q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        );
        q.ok(
            "migrate-set-parameters",
            json!({ "multifd-channels": CHANNELS }),
        );
    }
}

/// A process and its QMP client.
struct VmProcessQ {
    p: testkit::VmProcess,
    q: QmpClient,
}

/// A QEMU destination with `-incoming defer`, PSK server credentials from `dir/sub` (with
/// `priority`, if given), listening on TCP port 0.
fn qemu_destination(
    dir: &Path,
    name: &str,
    sub: &str,
    with_multifd: bool,
    priority: Option<&str>,
) -> (VmProcessQ, String) {
    let mut args = strings(&["-incoming", "defer"]);
    args.extend(qemu_creds_arg(dir, sub, "server", priority));
    let p = qemu(dir, name, &args);
    let mut q = p.qmp();
    return_path(&mut q);
    multifd(&mut q, with_multifd);
    q.ok("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    q.ok("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
    let uri = connect_uri(&mut q, "tcp:127.0.0.1:0");
    (VmProcessQ { p, q }, uri)
}

/// Waits until the process's log holds `what` (QEMU reports incoming TLS failures there).
fn wait_log(p: &testkit::VmProcess, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = p.log();
        if log.contains(what) {
            return log;
        }
        assert!(Instant::now() < deadline, "no '{what}' in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With multifd, the pages went over the (encrypted) channels.
fn check_channels(s: &Value, on: bool, what: &str) {
    let bytes = s["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
    if on {
        assert!(bytes >= 2 << 20, "{what}: pages over the channels: {s}");
    }
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

fn chain(test: &str, with_multifd: bool, priority: Option<&str>) {
    let Some(tmp) = setup(test) else {
        return;
    };
    let dir = tmp.path();
    keys(dir, "cli", &format!("qemu:{KEY}\n"));
    keys(dir, "srv", &format!("admin:0011223344556677\nqemu:{KEY}\n"));
    let a_file = dir.join("a.bin");
    let pat = pattern_file(&a_file, 2 << 20, 23);

    // 1. QEMU A (client key, username qemu by default) -> livemig L (server keys, authz).
    let mut args = qemu_creds_arg(dir, "cli", "client", priority);
    args.extend(loader(&a_file, 0));
    let qa = qemu(dir, "qa", &args);
    let mut qa_q = qa.qmp();
    return_path(&mut qa_q);
    multifd(&mut qa_q, with_multifd);
    qa_q.ok("migrate-set-parameters", json!({"tls-creds": "tls0"}));

    let mut args = creds_arg(dir, "tls0", "srv", "server");
    args.extend(strings(&[
        "-object",
        "authz-simple,id=auth0,identity=qemu",
        "-incoming",
        "tcp:127.0.0.1:0",
    ]));
    let l = livemig_logged(dir, "l", &args);
    let mut l_q = l.qmp();
    return_path(&mut l_q);
    multifd(&mut l_q, with_multifd);
    l_q.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "tls0", "tls-authz": "auth0"}),
    );
    let (s, d) = migrate(&mut qa_q, &mut l_q, "tcp:127.0.0.1:0");
    check_channels(&s, with_multifd, "QEMU -> livemig");
    assert_eq!(s["status"], "completed", "QEMU source: {s}\n{}", qa.log());
    assert_eq!(
        d["status"],
        "completed",
        "livemig destination: {d}\n{}",
        l.log()
    );
    let ram_a = ram(&mut qa_q, dir, "qa");
    assert_eq!(&ram_a[..pat.len()], &pat[..]);
    let ram_l = ram(&mut l_q, dir, "l");
    assert_same_ram(&ram_a, &ram_l, "QEMU -> livemig over TLS-PSK");
    drop(qa);

    // 2. livemig L (client key by object-add) -> QEMU B (server keys).
    l_q.ok(
        "object-add",
        json!({"qom-type": "tls-creds-psk", "id": "tls1", "endpoint": "client",
               "dir": dir.join("cli").display().to_string()}),
    );
    l_q.ok("migrate-set-parameters", json!({"tls-creds": "tls1"}));
    let (mut b, uri) = qemu_destination(dir, "qb", "srv", with_multifd, priority);
    let (s, d) = migrate(&mut l_q, &mut b.q, &uri);
    check_channels(&s, with_multifd, "livemig -> QEMU");
    assert_eq!(s["status"], "completed", "livemig source: {s}\n{}", l.log());
    assert_eq!(
        d["status"],
        "completed",
        "QEMU destination: {d}\n{}",
        b.p.log()
    );
    let ram_b = ram(&mut b.q, dir, "qb");
    assert_same_ram(&ram_l, &ram_b, "livemig -> QEMU over TLS-PSK");

    // What GnuTLS and OpenSSL agreed on, channel by channel: TLS 1.3 with the external key
    // (AES-128-GCM, livemig's first choice) by default; TLS 1.2 (EC)DHE-PSK without 1.3.
    let log = l.log();
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
    let l = livemig(dir, "l-src", &creds_arg(dir, "tls0", "bad", "client"));
    let mut l_q = l.qmp();
    return_path(&mut l_q);
    l_q.ok("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    let (dst, uri) = qemu_destination(dir, "q-dst", "srv", false, None);
    l_q.ok("migrate", json!({"uri": uri}));
    let s = wait(&mut l_q, &["completed", "failed", "cancelled"]);
    assert_eq!(s["status"], "failed", "{s}");
    let e = s["error-desc"].as_str().unwrap_or_default();
    assert!(
        e.starts_with("TLS handshake failed: the peer closed the connection during the handshake: it refused this side's pre-shared key"),
        "{e}"
    );
    assert_eq!(l_q.ok("query-status", json!({}))["status"], "running");
    wait_log(&dst.p, "TLS handshake failed");
    drop(dst);

    // QEMU source with the wrong key -> livemig destination.
    let qs = qemu(dir, "q-src", &creds_arg(dir, "tls0", "bad", "client"));
    let mut qs_q = qs.qmp();
    return_path(&mut qs_q);
    qs_q.ok("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    let mut args = creds_arg(dir, "tls0", "srv", "server");
    args.extend(strings(&["-incoming", "tcp:127.0.0.1:0"]));
    let ld = livemig(dir, "l-dst", &args);
    let mut ld_q = ld.qmp();
    ld_q.ok("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    let uri = connect_uri(&mut ld_q, "tcp:127.0.0.1:0");
    qs_q.ok("migrate", json!({"uri": uri}));
    let d = wait(&mut ld_q, &["failed", "completed"]);
    assert_eq!(d["status"], "failed", "{d}");
    let e = d["error-desc"].as_str().unwrap_or_default();
    assert!(
        e.starts_with("TLS handshake failed: the pre-shared key of username qemu does not match"),
        "{e}"
    );
    let s = wait(&mut qs_q, &["completed", "failed", "cancelled"]);
    assert_eq!(s["status"], "failed", "QEMU source: {s}");
    assert_eq!(qs_q.ok("query-status", json!({}))["status"], "running");
}
