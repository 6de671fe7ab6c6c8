//! livemig's PSK sessions (`tls-creds-psk`, on OpenSSL) against themselves over socket pairs:
//! data both ways, large and at once; what each end reports for a wrong key, a username the
//! server does not know, a username its `tls-authz` denies, an x509 or a plaintext peer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use tls::authz::Authz;
use tls::{accept, connect, Endpoint, PskOptions, TlsCreds, TlsError, TlsStreams};

const KEY: &str = "0123456789abcdef0123456789abcdef";

fn psk(dir: &Path, endpoint: Endpoint, username: Option<&str>) -> TlsCreds {
    TlsCreds::load_psk(PskOptions {
        dir: Some(dir.to_string_lossy().into_owned()),
        endpoint,
        username: username.map(str::to_string),
    })
    .unwrap()
}

/// A directory holding `keys.psk` with `lines`.
fn keys(lines: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("keys.psk"), lines).unwrap();
    d
}

/// One end of [`run`]: writes `data` through `st` (on a thread of its own) while it reads as
/// many bytes, which must be `data` too (what the other end wrote); `who` names the end.
fn exchange(
    st: TlsStreams<UnixStream, UnixStream>,
    data: &[u8],
    who: &str,
) -> Result<(), TlsError> {
    let (mut rd, mut wr) = (st.reader, st.writer);
    std::thread::scope(|s| {
        s.spawn(move || {
            wr.write_all(data).unwrap();
            wr.flush().unwrap();
        });
        let mut got = vec![0u8; data.len()];
        rd.read_exact(&mut got)
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        assert!(got == *data, "{who} received other bytes");
        Ok(())
    })
}

/// Runs a server session on a thread and a client session here, each sending `n` bytes to the
/// other at once and reading the other's; returns what each end saw (the server's with the
/// peer name it learnt).
fn run(
    server: &TlsCreds,
    client: &TlsCreds,
    authz: Option<Authz>,
    n: usize,
) -> (Result<String, TlsError>, Result<String, TlsError>) {
    let (a, b) = UnixStream::pair().unwrap();
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::thread::scope(|scope| {
        let data = &data;
        let s = scope.spawn(move || {
            let r = a.try_clone().unwrap();
            let st = accept(server, authz.map(Arc::new), r, a)?;
            let peer = st.peer_dn().unwrap_or("-").to_string();
            let protocol = st.protocol().to_string();
            exchange(st, data, "server")?;
            Ok(format!("{peer} {protocol}"))
        });
        let c = (|| {
            let r = b.try_clone().unwrap();
            let st = connect(client, Some("ignored.example.org"), r, b)?;
            exchange(st, data, "client")?;
            Ok("ok".to_string())
        })();
        (s.join().unwrap(), c)
    })
}

#[test]
fn psk_session_carries_data_both_ways_and_names_the_user() {
    let sd = keys(&format!("alice:00ff\nqemu:{KEY}\n"));
    let cd = keys(&format!("qemu:{KEY}\n"));
    let server = psk(sd.path(), Endpoint::Server, None);
    let client = psk(cd.path(), Endpoint::Client, None);
    // 8 MiB each way at once: both writers block on full sockets while both readers run.
    let (s, c) = run(&server, &client, None, 8 << 20);
    assert_eq!(c.unwrap(), "ok");
    let s = s.unwrap();
    // AES-GCM first: the faster of the two suites that can carry a SHA-256 external key.
    assert!(s.starts_with("qemu TLSv1.3 TLS_AES_128_GCM_SHA256 "), "{s}");
    assert!(s.ends_with("with a pre-shared key"), "{s}");
    // Another username, allowed by tls-authz.
    let cd2 = keys("alice:00ff\n");
    let alice = psk(cd2.path(), Endpoint::Client, Some("alice"));
    let authz = Authz::Simple {
        identity: "alice".into(),
    };
    let (s, c) = run(&server, &alice, Some(authz), 1000);
    assert_eq!(c.unwrap(), "ok");
    assert!(s.unwrap().starts_with("alice "));
}

#[test]
fn wrong_key_fails_on_both_ends() {
    let sd = keys(&format!("qemu:{KEY}\n"));
    let cd = keys("qemu:00112233445566778899aabbccddeeff\n");
    let server = psk(sd.path(), Endpoint::Server, None);
    let client = psk(cd.path(), Endpoint::Client, None);
    let (s, c) = run(&server, &client, None, 10);
    let s = s.unwrap_err().to_string();
    let c = c.unwrap_err().to_string();
    assert!(
        s.starts_with("TLS handshake failed: the pre-shared key of username qemu does not match"),
        "{s}"
    );
    assert!(
        c.starts_with("TLS handshake failed: the peer refused this side's pre-shared key"),
        "{c}"
    );
}

#[test]
fn unknown_or_denied_username_fails_on_both_ends() {
    let sd = keys(&format!("qemu:{KEY}\n"));
    let server = psk(sd.path(), Endpoint::Server, None);
    let cd = keys(&format!("bob:{KEY}\n"));
    let bob = psk(cd.path(), Endpoint::Client, Some("bob"));
    let (s, c) = run(&server, &bob, None, 10);
    let s = s.unwrap_err().to_string();
    assert_eq!(
        s,
        format!(
            "Username bob not found in PSK file {}/keys.psk",
            sd.path().display()
        )
    );
    let c = c.unwrap_err().to_string();
    assert!(
        c.starts_with("TLS handshake failed: the peer refused the handshake"),
        "{c}"
    );

    let cd = keys(&format!("qemu:{KEY}\n"));
    let client = psk(cd.path(), Endpoint::Client, None);
    let authz = Authz::Simple {
        identity: "alice".into(),
    };
    let (s, c) = run(&server, &client, Some(authz), 10);
    assert_eq!(
        s.unwrap_err().to_string(),
        "TLS PSK authz check for qemu is denied"
    );
    assert!(c.is_err());
}

#[test]
fn plaintext_or_x509_peer_fails_clearly() {
    let sd = keys(&format!("qemu:{KEY}\n"));
    let server = psk(sd.path(), Endpoint::Server, None);
    // A plaintext client: the migration stream's magic instead of a ClientHello.
    let (a, mut b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        b.write_all(b"QEVM\0\0\0\x03").unwrap();
        let mut rest = Vec::new();
        let _ = b.read_to_end(&mut rest);
    });
    let r = a.try_clone().unwrap();
    let e = accept(&server, None, r, a).err().unwrap().to_string();
    t.join().unwrap();
    assert!(
        e.starts_with("TLS handshake failed: the peer does not speak TLS"),
        "{e}"
    );

    // A plaintext server that answers with bytes that are not TLS.
    let cd = keys(&format!("qemu:{KEY}\n"));
    let client = psk(cd.path(), Endpoint::Client, None);
    let (a, mut b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut hello = [0u8; 5];
        b.read_exact(&mut hello).unwrap();
        b.write_all(b"NBDMAGIC IHAVEOPT plaintext").unwrap();
    });
    let r = a.try_clone().unwrap();
    let e = connect(&client, None, r, a).err().unwrap().to_string();
    t.join().unwrap();
    assert!(
        e.starts_with("TLS handshake failed: the peer does not speak TLS"),
        "{e}"
    );

    // Credentials of the other kind on the server: x509 meets a PSK client.
    let ca = testkit::pki::Ca::new("livemig test CA");
    let xd = tempfile::tempdir().unwrap();
    ca.write_server(
        xd.path(),
        &testkit::pki::Subject::new("dest.example.org", &["127.0.0.1"]),
    );
    let x509 = TlsCreds::load_x509(tls::X509Options {
        dir: Some(xd.path().to_string_lossy().into_owned()),
        endpoint: Endpoint::Server,
        verify_peer: false,
        sanity_check: true,
    })
    .unwrap();
    // The x509 server completes its side of the handshake with any client (verify-peer
    // off); the PSK client must not take a certificate it cannot check in place of the key.
    let (s, c) = run(&x509, &client, None, 10);
    assert!(s.is_err(), "the server gets no data");
    assert_eq!(
        c.unwrap_err().to_string(),
        "The server presented a certificate instead of using the pre-shared key: is it set up \
         with tls-creds-x509? (a PSK client checks no certificates)"
    );
}
