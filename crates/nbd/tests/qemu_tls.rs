//! Our NBD server with `tls-creds` against QEMU 7.2's client (`qemu-io` with a
//! `tls-creds-x509` object): data both ways inside TLS; a client without TLS is told TLS is
//! required; a client whose certificate the `tls-authz` list refuses gets nothing, and the
//! server names the refused distinguished name. Certificates are made by the test.

use nbd::NbdServer;
use std::path::Path;
use std::sync::Arc;
use testkit::pki::{Ca, Subject};

mod support;
use support::{any_port, tls_server, tool};

fn qemu_io(args: &[String]) -> (bool, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = tool("qemu-io", &args);
    (ok && !text.contains("failed"), text)
}

fn client_args(dir: &Path, sub: Option<&str>, port: u16, cmds: &[&str]) -> Vec<String> {
    let mut a = Vec::new();
    let mut opts =
        format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk");
    if let Some(sub) = sub {
        a.push("--object".to_string());
        a.push(format!(
            "tls-creds-x509,id=t0,endpoint=client,dir={}",
            dir.join(sub).display()
        ));
        opts.push_str(",tls-creds=t0");
    }
    a.push("--image-opts".into());
    a.push(opts);
    for c in cmds {
        a.push("-c".into());
        a.push(c.to_string());
    }
    a
}

#[test]
fn qemu_io_over_tls_and_its_refusals() {
    if !testkit::require(
        "qemu_io_over_tls_and_its_refusals",
        testkit::programs(&["qemu-io"]),
    ) {
        return;
    }
    let tmp = testkit::tempdir();
    let dir = tmp.path();
    let ca = Ca::new("nbd test CA");
    ca.write_server(
        &dir.join("srv"),
        &Subject::new("nbd.example.org", &["127.0.0.1"]),
    );
    ca.write_client(&dir.join("cli"), &Subject::new("client.example.org", &[]));
    ca.write_client(&dir.join("bad"), &Subject::new("intruder.example.org", &[]));

    let objects = Arc::new(tls::Objects::new());
    objects
        .object_add_cmdline(&format!(
            "tls-creds-x509,id=srv,endpoint=server,dir={}",
            dir.join("srv").display()
        ))
        .unwrap();
    objects
        .object_add_cmdline("authz-simple,id=auth0,identity=O=livemig test,,CN=client.example.org")
        .unwrap();

    // Credentials that do not exist, or are for the wrong end, are refused at start.
    let server = NbdServer::new();
    server.set_tls_objects(objects.clone());
    let e = server
        .start_with_tls(&any_port(), 0, Some("nope"), None)
        .unwrap_err();
    assert_eq!(e.to_string(), "No TLS credentials with id 'nope'");
    let img = dir.join("disk.img");
    let (server, port, _layer) = tls_server(&img, &objects, Some("srv"), Some("auth0"));

    // Inside TLS: a write, then a read of it.
    let (ok, text) = qemu_io(&client_args(
        dir,
        Some("cli"),
        port,
        &["write -P 0x5a 64k 8k", "read -P 0x5a 64k 8k"],
    ));
    assert!(ok, "{text}");
    let data = std::fs::read(&img).unwrap();
    assert!(data[64 << 10..72 << 10].iter().all(|&b| b == 0x5a));

    // Without TLS: QEMU's client is told TLS is required.
    let (ok, text) = qemu_io(&client_args(dir, None, port, &["read 0 4k"]));
    assert!(!ok, "{text}");
    assert!(
        text.contains("TLS negotiation required before option"),
        "{text}"
    );

    // A certificate outside the authz object: refused.
    let (ok, text) = qemu_io(&client_args(dir, Some("bad"), port, &["read 0 4k"]));
    assert!(!ok, "{text}");
    // Depending on when our alert and close reach GnuTLS: "TLS handshake failed: Error in
    // the push function." or "Cannot read from TLS channel: Input/output error".
    assert!(
        text.contains("TLS handshake failed") || text.contains("TLS channel"),
        "{text}"
    );
    server.stop().unwrap();
}
