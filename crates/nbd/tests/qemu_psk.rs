//! NBD over TLS with pre-shared keys (`tls-creds-psk`) against QEMU 7.2's tools, both ways:
//!
//! * our server (`tls-creds` naming PSK server credentials, `tls-authz` on the username)
//!   with `qemu-io` as the client: data both ways inside TLS; a wrong key, and a username
//!   the authz object denies, get nothing;
//! * our `nbd` block driver with PSK client credentials against `qemu-nbd --tls-creds`: data
//!   both ways, as QEMU reads the image afterwards; a wrong key fails the open clearly.

use serde_json::json;
use std::path::Path;
use std::sync::Arc;

mod support;
use support::{against_qemu_nbd, nbd_node, tls_server, tool};

const KEY: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const WRONG: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f91";

/// `dir/sub/keys.psk` with `lines`; returns the directory.
fn keys(dir: &Path, sub: &str, lines: &str) -> String {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("keys.psk"), lines).unwrap();
    d.display().to_string()
}

/// `qemu-io` on our export with PSK client credentials from `dir` as `username`.
fn qemu_io(dir: &str, username: Option<&str>, port: u16, cmds: &[&str]) -> (bool, String) {
    let mut object = format!("tls-creds-psk,id=t0,endpoint=client,dir={dir}");
    if let Some(u) = username {
        object.push_str(&format!(",username={u}"));
    }
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,\
         tls-creds=t0"
    );
    let mut args = vec!["--object".to_string(), object, "--image-opts".into(), opts];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = tool("qemu-io", &args);
    (ok && !text.contains("failed"), text)
}

#[test]
fn qemu_io_over_psk_to_our_server() {
    if !testkit::require(
        "qemu_io_over_psk_to_our_server",
        testkit::programs(&["qemu-io"]),
    ) {
        return;
    }
    let tmp = testkit::tempdir();
    let dir = tmp.path();
    let srv = keys(dir, "srv", &format!("qemu:{KEY}\nguest:{KEY}\n"));
    let cli = keys(dir, "cli", &format!("qemu:{KEY}\nguest:{KEY}\n"));
    let bad = keys(dir, "bad", &format!("qemu:{WRONG}\n"));
    let objects = Arc::new(tls::Objects::new());
    objects
        .object_add_cmdline(&format!("tls-creds-psk,id=srv,endpoint=server,dir={srv}"))
        .unwrap();
    objects
        .object_add_cmdline("authz-simple,id=auth0,identity=qemu")
        .unwrap();
    let img = dir.join("disk.img");
    let (server, port, _layer) = tls_server(&img, &objects, Some("srv"), Some("auth0"));

    let (ok, text) = qemu_io(
        &cli,
        None,
        port,
        &["write -P 0x3c 64k 8k", "read -P 0x3c 64k 8k"],
    );
    assert!(ok, "{text}");
    let data = std::fs::read(&img).unwrap();
    assert!(data[64 << 10..72 << 10].iter().all(|&b| b == 0x3c));

    // A wrong key: the handshake fails, nothing is read.
    let (ok, text) = qemu_io(&bad, None, port, &["read -P 0x3c 64k 8k"]);
    assert!(!ok, "{text}");
    assert!(text.contains("TLS handshake failed"), "{text}");

    // The right key under a username the authz object does not allow.
    let (ok, text) = qemu_io(&cli, Some("guest"), port, &["read -P 0x3c 64k 8k"]);
    assert!(!ok, "{text}");
    assert!(text.contains("TLS handshake failed"), "{text}");
    server.stop().unwrap();
}

#[test]
fn nbd_driver_over_psk_to_qemu_nbd() {
    if !testkit::require(
        "nbd_driver_over_psk_to_qemu_nbd",
        testkit::programs(&["qemu-nbd", "qemu-img", "qemu-io"]),
    ) {
        return;
    }
    let tmp = testkit::tempdir();
    let dir = tmp.path();
    let srv = keys(dir, "srv", &format!("qemu:{KEY}\n"));
    let cli = keys(dir, "cli", &format!("qemu:{KEY}\n"));
    let bad = keys(dir, "bad", &format!("qemu:{WRONG}\n"));
    let objects = Arc::new(tls::Objects::new());
    objects
        .object_add_cmdline(&format!("tls-creds-psk,id=cli,endpoint=client,dir={cli}"))
        .unwrap();
    objects
        .object_add_cmdline(&format!("tls-creds-psk,id=bad,endpoint=client,dir={bad}"))
        .unwrap();
    let creds = format!("tls-creds-psk,id=t0,endpoint=server,dir={srv}");
    against_qemu_nbd(dir, "raw", &creds, objects, 0x96, |layer, port| {
        let e = nbd_node(layer, "q1", port, json!({"tls-creds": "bad"})).unwrap_err();
        assert!(
            e.contains("TLS handshake failed: the peer closed the connection during the handshake: it refused this side's pre-shared key"),
            "{e}"
        );
    });
}
