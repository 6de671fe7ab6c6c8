//! TLS on the multifd channels between two `livemig vm` processes over TCP: every channel is a
//! TLS session of its own, checked as the main one is (the destination's certificate against
//! the address, the source's against the destination's `tls-authz`).
//!
//! * A busy guest migrates with three encrypted channels: the stop point is exact and the
//!   pages went over the channels.
//! * A multifd channel that meets the wrong peer fails the migration on both ends with a
//!   clear error, and the source runs on — a relay sends the main channel to the right
//!   destination and the extra channels elsewhere: to a destination whose certificate comes
//!   from another CA, to a plaintext destination, and (the destination's side) through a
//!   plaintext impostor that connects to the TLS destination in the source's place. What the
//!   source sends first on a channel is a TLS handshake record, not the multifd magic. Then
//!   the same source migrates whole.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use testkit::pki::{source_dn_option, Ca, Creds, Subject};
use testkit::relay::{Plan, Relay, Target};

const CAPS: &[&str] = &["events", "dirty-bitmaps", "return-path", "multifd"];

/// `-object tls-creds-x509,id=tls0,...` for the credentials in `dir/sub`.
fn creds(dir: &Path, sub: &str, endpoint: &str) -> Vec<String> {
    vec![
        "-object".into(),
        Creds::X509.object("tls0", dir, sub, endpoint),
    ]
}

fn start(dir: &Path, name: &str, base: &[&str], extra: &[String]) -> Lm {
    let mut a: Vec<&str> = GUEST.to_vec();
    a.extend_from_slice(base);
    a.extend(extra.iter().map(String::as_str));
    Lm::start(dir, name, &a)
}

/// A TLS source (client credentials from `sub`) running `workload`, multifd with
/// `channels`.
fn source(dir: &Path, sub: &str, workload: &str, channels: u64) -> Lm {
    let mut src = start(
        dir,
        "src",
        &["-workload", workload],
        &creds(dir, sub, "client"),
    );
    src.add_bitmap("b0");
    src.caps_on(CAPS);
    src.set_params(json!({"multifd-channels": channels, "tls-creds": "tls0"}));
    src
}

/// A destination listening on `tcp:127.0.0.1:0` with multifd (`channels`) and, when `sub` is
/// given, server credentials from it and `tls-authz` on the source's name; returns it and its
/// address.
fn destination(dir: &Path, name: &str, sub: Option<&str>, channels: u64) -> (Lm, SocketAddr) {
    let mut extra = Vec::new();
    if let Some(sub) = sub {
        extra = creds(dir, sub, "server");
        extra.push("-object".into());
        extra.push(format!(
            "authz-simple,id=auth0,identity={}",
            source_dn_option()
        ));
    }
    let mut dst = start(dir, name, &["-incoming", "tcp:127.0.0.1:0", "-S"], &extra);
    dst.caps_on(CAPS);
    dst.set_params(json!({"multifd-channels": channels}));
    if sub.is_some() {
        dst.set_params(json!({"tls-creds": "tls0", "tls-authz": "auth0"}));
    }
    let port = dst.incoming_port();
    (dst, SocketAddr::from(([127, 0, 0, 1], port)))
}

#[test]
fn multifd_over_tls_with_three_channels() {
    let dir = tempdir();
    let dir = dir.path();
    Creds::X509.write(dir);
    let (mut dst, addr) = destination(dir, "dst", Some("srv"), 3);
    let mut src = source(dir, "cli", BUSY, 3);
    src.wait_filled();
    src.wait_bitmap_dirty("b0");
    src.migrate(&format!("tcp:{addr}"));
    let v = check_stop_point(&mut src, &mut dst, &["b0"]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
    let q = src.ok("query-migrate", json!({}));
    assert!(
        q["ram"]["multifd-bytes"].as_u64().unwrap_or(0) >= FILL_PAGES * 4096,
        "the pages went over the encrypted channels: {q}"
    );
    check_carries_on(&mut dst);
}

/// A TCP listener standing in for the extra channels' peer: `serve` runs on each
/// connection it accepts (on its own thread); the first bytes each connection brought are
/// kept.
struct Impostor {
    addr: SocketAddr,
    first_bytes: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Impostor {
    fn start(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> Impostor {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("address");
        let first_bytes = Arc::new(Mutex::new(Vec::new()));
        let seen = first_bytes.clone();
        let serve = Arc::new(serve);
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let seen = seen.clone();
                let serve = serve.clone();
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut b = [0u8; 5];
                    if c.read_exact(&mut b).is_ok() {
                        seen.lock().unwrap().push(b.to_vec());
                    }
                    serve(c);
                });
            }
        });
        Impostor { addr, first_bytes }
    }

    /// Every channel began with a TLS handshake record (content type 22, version 3.x), not
    /// with the multifd magic 0x11223344.
    fn saw_tls_records(&self, channels: usize) {
        let seen = self.first_bytes.lock().unwrap().clone();
        assert!(seen.len() >= channels, "channels seen: {seen:?}");
        for b in &seen {
            assert_eq!(&b[..2], &[22, 3], "not a TLS record: {b:?}");
        }
    }
}

#[test]
fn multifd_tls_channel_refusals_are_clear_on_both_ends() {
    let dir = tempdir();
    let dir = dir.path();
    Creds::X509.write(dir);
    // A destination whose certificate another CA signed.
    Ca::new("another CA").write_server(
        &dir.join("other-srv"),
        &Subject::new("dest.example.org", &["127.0.0.1"]),
    );
    let mut src = source(dir, "cli", IDLE, 1);
    src.wait_filled();
    let via = |main: SocketAddr, rest: SocketAddr| {
        Relay::tcp(
            Target::Tcp(main),
            Plan::none().diverting(1, Target::Tcp(rest)),
        )
    };

    // 1. The channel reaches a destination with a certificate of another CA. (One channel:
    //    with two, the second one's end — the other peer closes when it fails — may be
    //    reported before the first one's refusal.)
    src.set_params(json!({"multifd-channels": 1}));
    let (mut dst, addr) = destination(dir, "dst1", Some("srv"), 1);
    let (mut other, other_addr) = destination(dir, "other1", Some("other-srv"), 1);
    let relay = via(addr, other_addr);
    src.migrate(&relay.uri);
    src.failed_and_runs("The certificate hasn't got a known issuer");
    let e = dst.migration_failed();
    assert!(
        e.contains("the main channel closed before every multifd channel connected"),
        "destination: {e}"
    );
    assert_ne!(dst.status(), "running");
    let e = other.migration_failed();
    assert!(e.starts_with("TLS handshake failed"), "the other peer: {e}");
    drop((relay, dst, other));

    // 2. The channel reaches a plaintext destination.
    let (mut dst, addr) = destination(dir, "dst2", Some("srv"), 1);
    let (mut plain, plain_addr) = destination(dir, "plain2", None, 1);
    // Without multifd it reads the stream at once and fails on the hello as a stream
    // header (with it, it would see the same hello while it waits for its channels).
    plain.set_caps(&[("multifd", false)]);
    let relay = via(addr, plain_addr);
    src.migrate(&relay.uri);
    src.failed_and_runs("TLS handshake failed");
    let e = dst.migration_failed();
    assert!(
        e.contains("the main channel closed before every multifd channel connected"),
        "destination: {e}"
    );
    // The plaintext end read a TLS ClientHello where a stream header should be: its load
    // failed, and it exits with status 1, as QEMU's does.
    let e = plain.wait_load_failed();
    assert!(
        e.contains("Not a migration stream"),
        "the plaintext end: {e}"
    );
    drop((relay, dst, plain));

    // 3. The destination's side: a plaintext impostor connects to the TLS destination's
    //    channel port in the source's place (the source's channels wait at the impostor).
    src.set_params(json!({"multifd-channels": 2}));
    let (mut dst, addr) = destination(dir, "dst3", Some("srv"), 2);
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let keep = held.clone();
    let impostor = Impostor::start(move |c| {
        if let Ok(mut p) = TcpStream::connect(addr) {
            // A MultiFDInit_t in the clear: magic, version 1, then zeros.
            let mut init = vec![0u8; 64];
            init[..8].copy_from_slice(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
            let _ = p.write_all(&init);
            keep.lock().unwrap().push(p);
        }
        keep.lock().unwrap().push(c);
    });
    let relay = via(addr, impostor.addr);
    src.migrate(&relay.uri);
    let e = dst.migration_failed();
    assert!(
        e.contains("TLS handshake failed: the peer does not speak TLS"),
        "destination: {e}"
    );
    assert_ne!(dst.status(), "running");
    // The destination gave up on the main channel: the source fails and runs on.
    let e = src.migration_failed();
    assert!(!e.is_empty());
    assert_eq!(src.status(), "running", "the source runs on");
    impostor.saw_tls_records(1);
    drop((relay, dst, impostor, held));

    // 4. And the source migrates whole.
    let (mut dst, addr) = destination(dir, "dst4", Some("srv"), 2);
    src.migrate(&format!("tcp:{addr}"));
    // (The idle guest writes no disk: its bitmap stays empty, so it is not compared.)
    let v = check_stop_point(&mut src, &mut dst, &[]);
    assert!(v["valid"].as_u64().unwrap_or(0) >= FILL_PAGES, "{v}");
    dst.ok("cont", json!({}));
    assert_eq!(dst.status(), "running");
}
