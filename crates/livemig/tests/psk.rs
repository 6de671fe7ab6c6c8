//! TLS with pre-shared keys (`tls-creds-psk`) between two `livemig vm` processes over TCP:
//! `keys.psk` files with QEMU's `username:hexkey` lines, the source's credentials by `-object`
//! or `object-add`, the destination's `tls-authz` asked about the username.
//!
//! * A busy guest migrates over one channel, and over three multifd channels (each a PSK
//!   session of its own): the stop point is exact, RAM and bitmaps identical.
//! * Refusals, each failing on both ends with a clear error while the source runs on: a wrong
//!   key, a username the destination's `tls-authz` denies, a plaintext destination, a
//!   destination with certificates (x509) instead of a key.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use testkit::pki::{Ca, Subject};

const CAPS: &[&str] = &["events", "dirty-bitmaps", "return-path", "multifd"];

const KEY: &str = testkit::pki::PSK_KEY;

/// `dir/sub/keys.psk` with `lines`.
fn keys(dir: &Path, sub: &str, lines: &str) -> String {
    testkit::pki::write_psk(&dir.join(sub), lines)
}

fn start(dir: &Path, name: &str, base: &[&str], extra: &[String]) -> Lm {
    let mut a: Vec<&str> = GUEST.to_vec();
    a.extend_from_slice(base);
    a.extend(extra.iter().map(String::as_str));
    Lm::start(dir, name, &a)
}

/// A destination listening on `tcp:127.0.0.1:0` with multifd (`channels`), the given
/// `-object`s and parameters; returns it and its `tcp:` address.
fn destination(
    dir: &Path,
    name: &str,
    objects: &[String],
    params: serde_json::Value,
    channels: u64,
) -> (Lm, String) {
    let mut extra = Vec::new();
    for o in objects {
        extra.push("-object".to_string());
        extra.push(o.clone());
    }
    let mut dst = start(dir, name, &["-incoming", "tcp:127.0.0.1:0", "-S"], &extra);
    dst.caps_on(CAPS);
    dst.set_params(json!({ "multifd-channels": channels }));
    dst.set_params(params);
    let port = dst.incoming_port();
    (dst, format!("tcp:127.0.0.1:{port}"))
}

/// A source running `workload` with client PSK credentials `tls0` from `dir/sub` (by
/// `-object`), multifd with `channels`.
fn source(dir: &Path, sub: &str, workload: &str, channels: u64) -> Lm {
    let obj = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={}",
        dir.join(sub).display()
    );
    let mut src = start(
        dir,
        "src",
        &["-workload", workload],
        &["-object".into(), obj],
    );
    src.add_bitmap("b0");
    src.caps_on(CAPS);
    src.set_params(json!({"multifd-channels": channels, "tls-creds": "tls0"}));
    src
}

fn server_psk(dir: &str) -> String {
    format!("tls-creds-psk,id=tls0,endpoint=server,dir={dir}")
}

fn migrates_whole(channels: u64) {
    let dir = tempdir();
    let dir = dir.path();
    // The destination knows two users; its tls-authz lets only the source's in.
    let srv = keys(dir, "srv", &format!("other:00112233\nqemu:{KEY}\n"));
    keys(dir, "cli", &format!("qemu:{KEY}\n"));
    let (mut dst, uri) = destination(
        dir,
        "dst",
        &[
            server_psk(&srv),
            "authz-simple,id=auth0,identity=qemu".into(),
        ],
        json!({"tls-creds": "tls0", "tls-authz": "auth0"}),
        channels,
    );
    let mut src = source(dir, "cli", BUSY, channels);
    if channels == 1 {
        src.set_caps(&[("multifd", false)]);
        dst.set_caps(&[("multifd", false)]);
    }
    src.wait_filled();
    src.wait_bitmap_dirty("b0");
    src.migrate(&uri);
    let v = check_stop_point(&mut src, &mut dst, &["b0"]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
    let q = src.ok("query-migrate", json!({}));
    if channels > 1 {
        assert!(
            q["ram"]["multifd-bytes"].as_u64().unwrap_or(0) >= FILL_PAGES * 4096,
            "the pages went over the encrypted channels: {q}"
        );
    }
    check_carries_on(&mut dst);
}

#[test]
fn psk_migration_on_one_channel() {
    migrates_whole(1);
}

#[test]
fn psk_migration_with_three_multifd_channels() {
    migrates_whole(3);
}

#[test]
fn psk_refusals_are_clear_on_both_ends() {
    let dir = tempdir();
    let dir = dir.path();
    let srv = keys(dir, "srv", &format!("qemu:{KEY}\n"));
    // The source's key differs in its last digit.
    let wrong = KEY.replace("2e1f", "2e10");
    keys(dir, "cli", &format!("qemu:{wrong}\n"));
    let mut src = source(dir, "cli", IDLE, 1);
    src.set_caps(&[("multifd", false)]);
    src.wait_filled();
    let single = |lm: &mut Lm| lm.set_caps(&[("multifd", false)]);

    // 1. A wrong key.
    let (mut dst, uri) = destination(
        dir,
        "d-key",
        &[server_psk(&srv)],
        json!({"tls-creds": "tls0"}),
        1,
    );
    single(&mut dst);
    src.migrate(&uri);
    src.failed_and_runs("the peer refused this side's pre-shared key");
    let e = dst.migration_failed();
    assert!(
        e.starts_with("TLS handshake failed: the pre-shared key of username qemu does not match"),
        "destination: {e}"
    );
    assert_ne!(dst.status(), "running");
    drop(dst);

    // 2. The right key (by object-add) under a username the destination's tls-authz denies.
    keys(dir, "cli2", &format!("admin:{KEY}\n"));
    let srv2 = keys(dir, "srv2", &format!("qemu:{KEY}\nadmin:{KEY}\n"));
    src.ok(
        "object-add",
        json!({"qom-type": "tls-creds-psk", "id": "tls1", "endpoint": "client",
               "username": "admin", "dir": dir.join("cli2").display().to_string()}),
    );
    src.set_params(json!({"tls-creds": "tls1"}));
    let (mut dst, uri) = destination(
        dir,
        "d-authz",
        &[
            server_psk(&srv2),
            "authz-list,id=auth0,policy=deny,rules.0.match=qemu,rules.0.policy=allow".into(),
        ],
        json!({"tls-creds": "tls0", "tls-authz": "auth0"}),
        1,
    );
    single(&mut dst);
    src.migrate(&uri);
    src.failed_and_runs("the peer refused the handshake");
    assert_eq!(
        dst.migration_failed(),
        "TLS PSK authz check for admin is denied"
    );
    drop(dst);

    // 3. A plaintext destination.
    let (mut dst, uri) = destination(dir, "d-plain", &[], json!({}), 1);
    single(&mut dst);
    src.migrate(&uri);
    src.failed_and_runs("TLS handshake failed");
    // It read a TLS ClientHello where a stream header should be.
    let e = dst.wait_load_failed();
    assert!(e.contains("Not a migration stream"), "destination: {e}");
    drop(dst);

    // 4. A destination with certificates instead of a key: the source does not take a
    //    certificate it cannot check in place of the key.
    Ca::new("livemig test CA").write_server(
        &dir.join("x509"),
        &Subject::new("dest.example.org", &["127.0.0.1"]),
    );
    let x509 = format!(
        "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={}",
        dir.join("x509").display()
    );
    let (mut dst, uri) = destination(dir, "d-x509", &[x509], json!({"tls-creds": "tls0"}), 1);
    single(&mut dst);
    src.migrate(&uri);
    src.failed_and_runs("The server presented a certificate instead of using the pre-shared key");
    let e = dst.migration_failed();
    assert!(!e.is_empty());
    assert_ne!(dst.status(), "running");
    drop(dst);

    // 5. And with the right key the same source migrates whole.
    keys(dir, "cli3", &format!("qemu:{KEY}\n"));
    src.ok(
        "object-add",
        json!({"qom-type": "tls-creds-psk", "id": "tls2", "endpoint": "client",
               "dir": dir.join("cli3").display().to_string()}),
    );
    src.set_params(json!({"tls-creds": "tls2"}));
    let (mut dst, uri) = destination(
        dir,
        "d-good",
        &[server_psk(&srv)],
        json!({"tls-creds": "tls0"}),
        1,
    );
    single(&mut dst);
    src.migrate(&uri);
    let v = check_stop_point(&mut src, &mut dst, &[]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
}

/// Over `unix:`, where x509 credentials need `tls-hostname` to check a certificate, a PSK
/// session needs none; a `tls-hostname` that names nobody is taken and checks nothing, as in
/// QEMU 7.2 (the key authenticates the destination).
#[test]
fn psk_over_unix_needs_no_hostname() {
    let dir = tempdir();
    let dir = dir.path();
    let srv = keys(dir, "srv", &format!("qemu:{KEY}\n"));
    keys(dir, "cli", &format!("qemu:{KEY}\n"));
    let uri = unix_uri(dir, "mig.sock");
    let mut extra = vec!["-object".to_string(), server_psk(&srv)];
    extra.extend(["-incoming".to_string(), uri.clone(), "-S".into()]);
    let mut dst = start(dir, "dst", &[], &extra);
    dst.caps_on(&["events", "return-path"]);
    dst.set_params(json!({"tls-creds": "tls0"}));
    let mut src = source(dir, "cli", IDLE, 1);
    src.set_caps(&[("multifd", false)]);
    src.wait_filled();
    src.migrate(&uri);
    let v = check_stop_point(&mut src, &mut dst, &[]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");

    let mut dst = start(
        dir,
        "dst2",
        &[],
        &[
            "-object".to_string(),
            server_psk(&srv),
            "-incoming".into(),
            unix_uri(dir, "mig2.sock"),
            "-S".into(),
        ],
    );
    dst.caps_on(&["events", "return-path"]);
    dst.set_params(json!({"tls-creds": "tls0"}));
    // The source goes on from the stop point: cont, then migrate again with a hostname.
    src.ok("cont", json!({}));
    src.set_params(json!({"tls-hostname": "nobody.example.org"}));
    src.migrate(&unix_uri(dir, "mig2.sock"));
    check_stop_point(&mut src, &mut dst, &[]);
}
