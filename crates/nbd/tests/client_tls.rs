//! The `nbd` block driver with `tls-creds`, as `blockdev-add` opens it: data both ways inside
//! TLS against our own server and against QEMU 7.2's `qemu-nbd`; and each way it can go wrong
//! — no credentials for a server that requires TLS, credentials for a server without TLS, a
//! wrong hostname, a wrong CA, credentials that do not exist or are for the server end — fails
//! `blockdev-add` with an error that says which. Certificates are made by the test.

use block::BlockLayer;
use nbd::NbdServer;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use testkit::pki::{Ca, Subject};

mod support;
use support::{against_qemu_nbd, nbd_node, tls_server, SIZE};

/// Client and server credentials from one CA, and a client's from another.
fn pki(dir: &Path) {
    let ca = Ca::new("nbd client test CA");
    ca.write_server(
        &dir.join("srv"),
        &Subject::new("nbd.example.org", &["127.0.0.1"]),
    );
    ca.write_client(&dir.join("cli"), &Subject::new("client.example.org", &[]));
    Ca::new("another CA")
        .write_client(&dir.join("other"), &Subject::new("client.example.org", &[]));
}

fn objects(dir: &Path) -> Arc<tls::Objects> {
    let o = Arc::new(tls::Objects::new());
    for (id, sub, end) in [
        ("srv", "srv", "server"),
        ("cli", "cli", "client"),
        ("other", "other", "client"),
    ] {
        o.object_add_cmdline(&format!(
            "tls-creds-x509,id={id},endpoint={end},dir={}",
            dir.join(sub).display()
        ))
        .unwrap();
    }
    o
}

/// Starts our server on an ephemeral port, with `tls` credentials or none, exporting a raw
/// image `disk`; returns it and the port.
fn our_server(dir: &Path, objects: &Arc<tls::Objects>, tls: Option<&str>) -> (NbdServer, u16) {
    let img = dir.join(format!("ours-{}.img", tls.unwrap_or("plain")));
    let (server, port, _layer) = tls_server(&img, objects, tls, None);
    (server, port)
}

#[test]
fn nbd_driver_over_tls_and_its_refusals() {
    let tmp = testkit::tempdir();
    let dir = tmp.path();
    pki(dir);
    let objects = objects(dir);
    nbd::register_driver(objects.clone());
    let layer = BlockLayer::new();

    let (tls_server, port) = our_server(dir, &objects, Some("srv"));
    // Inside TLS; tls-hostname defaults to the inet host, which the certificate carries.
    let n = nbd_node(&layer, "n0", port, json!({"tls-creds": "cli"})).unwrap();
    assert_eq!(n.size().unwrap(), SIZE);
    n.write_at(8192, b"inside TLS").unwrap();
    let mut got = [0u8; 10];
    n.read_at(8192, &mut got).unwrap();
    assert_eq!(&got, b"inside TLS");
    let img = std::fs::read(dir.join("ours-srv.img")).unwrap();
    assert_eq!(&img[8192..8202], b"inside TLS");
    // As QEMU names an nbd node, TLS or not.
    assert_eq!(n.filename(), format!("nbd://127.0.0.1:{port}/disk"));

    // Without credentials, the server says TLS is required, in QEMU's words.
    let e = nbd_node(&layer, "n1", port, json!({})).unwrap_err();
    assert!(
        e.contains("TLS negotiation required before option 7 (go)"),
        "{e}"
    );
    // A name the server's certificate does not carry.
    let e = nbd_node(
        &layer,
        "n2",
        port,
        json!({"tls-creds": "cli", "tls-hostname": "other.example.org"}),
    )
    .unwrap_err();
    assert!(
        e.contains("Certificate does not match the hostname other.example.org"),
        "{e}"
    );
    // A CA that did not sign the server's certificate.
    let e = nbd_node(&layer, "n3", port, json!({"tls-creds": "other"})).unwrap_err();
    assert!(
        e.contains("The certificate hasn't got a known issuer"),
        "{e}"
    );
    // Credentials that are not there, or are the server's.
    let e = nbd_node(&layer, "n4", port, json!({"tls-creds": "nope"})).unwrap_err();
    assert_eq!(e, "No TLS credentials with id 'nope'");
    let e = nbd_node(&layer, "n5", port, json!({"tls-creds": "srv"})).unwrap_err();
    assert_eq!(e, "Expected TLS credentials for a client endpoint");
    let e = nbd_node(&layer, "n6", port, json!({"tls-creds": 7})).unwrap_err();
    assert!(e.contains("tls-creds"), "{e}");
    // The server's connections after all this: the good node still works.
    n.read_at(8192, &mut got).unwrap();
    assert_eq!(&got, b"inside TLS");
    drop(n);
    layer.blockdev_del("n0").unwrap();
    tls_server.stop().unwrap();

    // A server without TLS refuses STARTTLS; nothing goes out in plaintext.
    let (plain, port) = our_server(dir, &objects, None);
    let e = nbd_node(&layer, "n7", port, json!({"tls-creds": "cli"})).unwrap_err();
    assert!(e.contains("starttls"), "{e}");
    assert!(e.contains("TLS not configured"), "{e}");
    plain.stop().unwrap();
}

#[test]
fn nbd_driver_over_tls_to_qemu_nbd() {
    if !testkit::require(
        "nbd_driver_over_tls_to_qemu_nbd",
        testkit::programs(&["qemu-nbd", "qemu-img", "qemu-io"]),
    ) {
        return;
    }
    let tmp = testkit::tempdir();
    let dir = tmp.path();
    pki(dir);
    let creds = format!(
        "tls-creds-x509,id=t0,endpoint=server,dir={}",
        dir.join("srv").display()
    );
    against_qemu_nbd(dir, "qcow2", &creds, objects(dir), 0xa5, |layer, port| {
        // QEMU's server without credentials on our side: it requires TLS.
        let e = nbd_node(layer, "q1", port, json!({})).unwrap_err();
        assert!(
            e.contains("TLS negotiation required before option 7 (go)"),
            "{e}"
        );
    });
}
