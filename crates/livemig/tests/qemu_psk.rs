//! Migration over TLS with pre-shared keys between QEMU 7.2 (GnuTLS) and livemig (OpenSSL),
//! both `-M none -m 32M`, with `keys.psk` files in QEMU's format (`username:hexkey`).
//!
//! * QEMU → livemig → QEMU over TCP with a return path, once on one channel and once with
//!   multifd (two channels, each a PSK session of its own): GnuTLS negotiates TLS 1.3 with
//!   the external key against livemig's OpenSSL on both hops. livemig's destination asks its
//!   `tls-authz` about the username QEMU sent (`qemu`, QEMU's default). RAM identical at every
//!   step. livemig's client credentials come by `object-add`, its server credentials by
//!   `-object`.
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

/// A QEMU destination with `-incoming defer`, PSK server credentials from `dir/sub`,
/// listening on TCP port 0.
fn qemu_destination(dir: &Path, name: &str, sub: &str, with_multifd: bool) -> (VmProcessQ, String) {
    let mut args = strings(&["-incoming", "defer"]);
    args.extend(creds_arg(dir, "tls0", sub, "server"));
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
    chain("psk_qemu_to_livemig_to_qemu", false);
}

/// The same chain with multifd: every channel of every hop is a PSK session of its own.
#[test]
fn psk_multifd_qemu_to_livemig_to_qemu() {
    chain("psk_multifd_qemu_to_livemig_to_qemu", true);
}

fn chain(test: &str, with_multifd: bool) {
    let Some(tmp) = setup(test) else {
        return;
    };
    let dir = tmp.path();
    keys(dir, "cli", &format!("qemu:{KEY}\n"));
    keys(dir, "srv", &format!("admin:0011223344556677\nqemu:{KEY}\n"));
    let a_file = dir.join("a.bin");
    let pat = pattern_file(&a_file, 2 << 20, 23);

    // 1. QEMU A (client key, username qemu by default) -> livemig L (server keys, authz).
    let mut args = creds_arg(dir, "tls0", "cli", "client");
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
    let l = livemig(dir, "l", &args);
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
    let (mut b, uri) = qemu_destination(dir, "qb", "srv", with_multifd);
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
    let (dst, uri) = qemu_destination(dir, "q-dst", "srv", false);
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
