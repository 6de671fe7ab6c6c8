//! livemig's TLS against itself over socket pairs: what each end reports for a good session,
//! a wrong CA, a wrong hostname, a client outside the authz list, a plaintext peer, and data
//! both ways at once.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use testkit::pki::{Ca, Subject};
use tls::authz::{Authz, Format, Policy, Rule};
use tls::{accept, connect, Endpoint, TlsCreds, TlsError, X509Options};

fn creds(dir: &Path, endpoint: Endpoint, verify_peer: bool) -> Result<TlsCreds, TlsError> {
    TlsCreds::load_x509(X509Options {
        dir: Some(dir.to_string_lossy().into_owned()),
        endpoint,
        verify_peer,
        sanity_check: true,
    })
}

struct Setup {
    _tmp: tempfile::TempDir,
    server: TlsCreds,
    client: TlsCreds,
}

fn setup(server_ca: &Ca, client_ca: &Ca, client_dn_cn: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let sdir = tmp.path().join("server");
    let cdir = tmp.path().join("client");
    server_ca.write_server(
        &sdir,
        &Subject::new("dest.example.org", &["dest.example.org", "127.0.0.1"]),
    );
    client_ca.write_client(&cdir, &Subject::new(client_dn_cn, &[]));
    // Each side trusts the CA of the other's certificate.
    std::fs::write(sdir.join("ca-cert.pem"), &client_ca.cert_pem).unwrap();
    std::fs::write(cdir.join("ca-cert.pem"), &server_ca.cert_pem).unwrap();
    Setup {
        server: creds(&sdir, Endpoint::Server, true).unwrap(),
        client: creds(&cdir, Endpoint::Client, true).unwrap(),
        _tmp: tmp,
    }
}

/// Runs a server session on a thread and a client session here; returns both results.
fn run(
    s: &Setup,
    hostname: Option<&str>,
    authz: Option<Authz>,
) -> (Result<String, TlsError>, Result<String, TlsError>) {
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            let r = a.try_clone().unwrap();
            let mut st = accept(&s.server, authz.map(Arc::new), r, a)?;
            let mut buf = [0u8; 5];
            st.reader
                .read_exact(&mut buf)
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            st.writer
                .write_all(b"world")
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            st.writer.flush().unwrap();
            Ok(format!(
                "{} {}",
                String::from_utf8_lossy(&buf),
                st.peer_dn().unwrap_or("-")
            ))
        });
        let client = (|| {
            let r = b.try_clone().unwrap();
            let probe = b.try_clone().unwrap();
            let mut st = connect(&s.client, hostname, r, b)?;
            // As the migration source and the NBD client do: a write that fails because the
            // server went away reads the server's last words (in TLS 1.3 a refused client
            // certificate is answered after the client's handshake is over).
            st.writer.set_socket(&probe).unwrap();
            st.writer
                .write_all(b"hello")
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            let mut buf = [0u8; 5];
            st.reader
                .read_exact(&mut buf)
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        })();
        (server.join().unwrap(), client)
    })
}

#[test]
fn good_session_carries_data_and_names_the_peer() {
    let ca = Ca::new("livemig test CA");
    let s = setup(&ca, &ca, "source.example.org");
    let (server, client) = run(&s, Some("dest.example.org"), None);
    assert_eq!(client.unwrap(), "world");
    assert_eq!(
        server.unwrap(),
        "hello O=livemig test,CN=source.example.org"
    );
    // An IP address matches an iPAddress alternative name.
    let (server, client) = run(&s, Some("127.0.0.1"), None);
    assert_eq!(client.unwrap(), "world");
    assert!(server.is_ok());
}

#[test]
fn wrong_ca_fails_on_both_ends() {
    let ca = Ca::new("livemig test CA");
    let other = Ca::new("some other CA");
    // The client trusts `other`, the server's certificate comes from `ca`.
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(&ca, &ca, "source.example.org");
    let cdir = tmp.path().join("c");
    ca.write_client(&cdir, &Subject::new("source.example.org", &[]));
    std::fs::write(cdir.join("ca-cert.pem"), &other.cert_pem).unwrap();
    // Our own certificate no longer validates against ca-cert.pem: QEMU's sanity check.
    let e = creds(&cdir, Endpoint::Client, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("Our own certificate ")
            && e.ends_with("The certificate hasn't got a known issuer"),
        "{e}"
    );
    let s2 = Setup {
        client: TlsCreds::load_x509(X509Options {
            dir: Some(cdir.to_string_lossy().into_owned()),
            endpoint: Endpoint::Client,
            verify_peer: true,
            sanity_check: false,
        })
        .unwrap(),
        server: s.server,
        _tmp: tmp,
    };
    let (server, client) = run(&s2, Some("dest.example.org"), None);
    assert_eq!(
        client.unwrap_err().to_string(),
        "The certificate hasn't got a known issuer"
    );
    let se = server.unwrap_err().to_string();
    assert!(
        se.starts_with("TLS handshake failed: the peer refused this side's certificate"),
        "{se}"
    );
}

#[test]
fn wrong_hostname_and_missing_hostname_fail() {
    let ca = Ca::new("livemig test CA");
    let s = setup(&ca, &ca, "source.example.org");
    let (server, client) = run(&s, Some("other.example.org"), None);
    assert_eq!(
        client.unwrap_err().to_string(),
        "Certificate does not match the hostname other.example.org"
    );
    assert!(server
        .unwrap_err()
        .to_string()
        .starts_with("TLS handshake failed: the peer refused"));
    let (_, client) = run(&s, None, None);
    assert_eq!(
        client.unwrap_err().to_string(),
        "No hostname for certificate validation"
    );
}

#[test]
fn authz_list_refuses_a_client_outside_it() {
    let ca = Ca::new("livemig test CA");
    let s = setup(&ca, &ca, "intruder.example.org");
    let list = Authz::List {
        policy: Policy::Deny,
        rules: vec![Rule {
            pattern: "O=livemig test,CN=source.example.org".into(),
            policy: Policy::Allow,
            format: Format::Exact,
        }],
    };
    let (server, client) = run(&s, Some("dest.example.org"), Some(list.clone()));
    assert_eq!(
        server.unwrap_err().to_string(),
        "TLS x509 authz check for O=livemig test,CN=intruder.example.org is denied"
    );
    let ce = client.unwrap_err().to_string();
    assert!(ce.contains("AccessDenied"), "{ce}");

    let s = setup(&ca, &ca, "source.example.org");
    let (server, client) = run(&s, Some("dest.example.org"), Some(list));
    assert!(server.is_ok() && client.is_ok());
}

#[test]
fn plaintext_peer_is_named() {
    let ca = Ca::new("livemig test CA");
    let s = setup(&ca, &ca, "source.example.org");
    let (a, mut b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        // A plaintext migration source: the stream's magic.
        let _ = b.write_all(b"QEVM\0\0\0\x03");
        let mut sink = Vec::new();
        let _ = b.read_to_end(&mut sink);
    });
    let r = a.try_clone().unwrap();
    let e = match accept(&s.server, None, r, a) {
        Ok(_) => panic!("handshake with a plaintext peer succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.starts_with("TLS handshake failed: the peer does not speak TLS"),
        "{e}"
    );
    t.join().unwrap();
}

#[test]
fn missing_files_get_qemus_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_string_lossy().into_owned();
    let e = creds(tmp.path(), Endpoint::Server, true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!("Unable to access credentials {dir}/ca-cert.pem: No such file or directory")
    );
    let ca = Ca::new("CA");
    std::fs::write(tmp.path().join("ca-cert.pem"), &ca.cert_pem).unwrap();
    let e = creds(tmp.path(), Endpoint::Server, true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!("Unable to access credentials {dir}/server-cert.pem: No such file or directory")
    );
    // A client needs only the CA.
    assert!(creds(tmp.path(), Endpoint::Client, true).is_ok());
    let e = TlsCreds::load_x509(X509Options::default())
        .unwrap_err()
        .to_string();
    assert_eq!(e, "Missing 'dir' property value");
}

#[test]
fn expired_certificate_fails_the_sanity_check() {
    let ca = Ca::new("CA");
    let tmp = tempfile::tempdir().unwrap();
    let mut subj = Subject::new("dest", &["dest"]);
    subj.years = (-3, -1);
    ca.write_server(tmp.path(), &subj);
    let e = creds(tmp.path(), Endpoint::Server, true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "The server certificate {}/server-cert.pem has expired",
            tmp.path().display()
        )
    );
}

#[test]
fn both_directions_at_once_do_not_deadlock() {
    both_directions_at_once(false);
}

/// The same with the writers sending straight from rustls's buffers through their socket
/// handles (as migration and NBD set them up): full sockets are waited for without the lock,
/// and every byte arrives in order.
#[test]
fn both_directions_at_once_with_direct_sends() {
    both_directions_at_once(true);
}

fn both_directions_at_once(direct: bool) {
    let ca = Ca::new("livemig test CA");
    let s = setup(&ca, &ca, "source.example.org");
    let (a, b) = UnixStream::pair().unwrap();
    let a_fd = a.try_clone().unwrap();
    const N: usize = 32 << 20;
    std::thread::scope(|scope| {
        let srv = scope.spawn(|| {
            let r = a.try_clone().unwrap();
            accept(&s.server, None, r, a).unwrap()
        });
        let r = b.try_clone().unwrap();
        let b_fd = b.try_clone().unwrap();
        let mut cl = connect(&s.client, Some("dest.example.org"), r, b).unwrap();
        let mut sv = srv.join().unwrap();
        if direct {
            cl.writer.set_socket(&b_fd).unwrap();
            sv.writer.set_socket(&a_fd).unwrap();
        }
        // Each side writes 32 MiB while the other writes too; readers run on their own threads.
        let pump = |mut w: tls::TlsWriter<UnixStream>, mut r: tls::TlsReader<UnixStream>| {
            let reader = std::thread::spawn(move || {
                let mut got = vec![0u8; N];
                r.read_exact(&mut got).unwrap();
                got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8)
            });
            let data: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
            w.write_all(&data).unwrap();
            w.flush().unwrap();
            reader.join().unwrap()
        };
        let t1 = scope.spawn(move || pump(cl.writer, cl.reader));
        let t2 = scope.spawn(move || pump(sv.writer, sv.reader));
        assert!(t1.join().unwrap());
        assert!(t2.join().unwrap());
    });
}

#[test]
fn peer_name_is_printed_as_gnutls_prints_it() {
    // Expected strings checked against gnutls_x509_crt_get_dn (GnuTLS 3.7.9): certificate
    // order, RFC 4514 escapes, a leading space and '#' escaped.
    let ca = Ca::new("livemig test CA");
    let s = setup(&ca, &ca, "x");
    let tmp = tempfile::tempdir().unwrap();
    let mut subj = Subject::new("x", &[]);
    subj.dn = vec![
        ("C", "GB".into()),
        ("ST", "London".into()),
        ("L", "London".into()),
        ("O", "Example, Org".into()),
        ("OU", "#x;y<z>\"q\\r".into()),
        ("CN", " laptop.example.com".into()),
    ];
    ca.write_client(tmp.path(), &subj);
    let s = Setup {
        client: creds(tmp.path(), Endpoint::Client, true).unwrap(),
        server: s.server,
        _tmp: tmp,
    };
    let (server, client) = run(&s, Some("dest.example.org"), None);
    client.unwrap();
    assert_eq!(
        server.unwrap(),
        "hello C=GB,ST=London,L=London,O=Example\\, Org,OU=\\#x\\;y\\<z\\>\\\"q\\\\r,CN=\\ laptop.example.com"
    );
}

#[test]
fn a_refused_client_that_only_writes_learns_why() {
    // TLS 1.3: the server refuses the client certificate after the client's handshake is
    // over. A client that only writes (a migration source without return path) must still
    // report the server's alert, not just "Broken pipe".
    let ca = Ca::new("livemig test CA");
    let s = setup(&ca, &ca, "intruder.example.org");
    let deny = Authz::Simple {
        identity: "O=livemig test,CN=source.example.org".into(),
    };
    let (a, b) = UnixStream::pair().unwrap();
    let r = b.try_clone().unwrap();
    let probe = b.try_clone().unwrap();
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            let r = a.try_clone().unwrap();
            let e = accept(&s.server, Some(Arc::new(deny)), r, a).err();
            e.map(|e| e.to_string())
        });
        let mut st = connect(&s.client, Some("dest.example.org"), r, b).unwrap();
        st.writer.set_socket(probe).unwrap();
        // The server has refused and closed before the client writes.
        assert_eq!(
            server.join().unwrap().as_deref(),
            Some("TLS x509 authz check for O=livemig test,CN=intruder.example.org is denied")
        );
        let e = st
            .writer
            .write_all(&[0u8; 1 << 20])
            .unwrap_err()
            .to_string();
        assert!(e.contains("AccessDenied"), "{e}");
    });
}

/// rustls's ring provider with the TLS 1.3 suites in the order given: a peer that prefers
/// something else than livemig does.
fn peer_provider(suites: &[rustls::SupportedCipherSuite]) -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = suites.to_vec();
    Arc::new(p)
}

/// Drives a plain rustls connection's handshake over `sock` to its end.
fn handshake(
    conn: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    sock: &mut UnixStream,
) {
    while conn.is_handshaking() || conn.wants_write() {
        conn.complete_io(sock).unwrap();
    }
}

#[test]
fn aes_128_gcm_is_preferred_as_server_whatever_the_client_prefers() {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let ca = Ca::new("livemig test CA");
    let tmp = tempfile::tempdir().unwrap();
    ca.write_server(
        tmp.path(),
        &Subject::new("dest.example.org", &["dest.example.org"]),
    );
    let server = creds(tmp.path(), Endpoint::Server, false).unwrap();
    // A client that lists AES-256-GCM first (as GnuTLS's NORMAL priority does).
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(peer_provider(&[
        TLS13_AES_256_GCM_SHA384,
        TLS13_AES_128_GCM_SHA256,
    ]))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let (a, mut b) = UnixStream::pair().unwrap();
    let (protocol, chosen) = std::thread::scope(|scope| {
        let srv = scope.spawn(|| {
            let r = a.try_clone().unwrap();
            accept(&server, None, r, a).unwrap().protocol().to_string()
        });
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), "dest.example.org".try_into().unwrap())
                .unwrap();
        handshake(&mut conn, &mut b);
        let chosen = conn.negotiated_cipher_suite().unwrap().suite();
        (srv.join().unwrap(), chosen)
    });
    assert_eq!(chosen, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert!(protocol.contains("TLS13_AES_128_GCM_SHA256"), "{protocol}");
}

#[test]
fn aes_128_gcm_is_asked_for_as_client() {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let ca = Ca::new("livemig test CA");
    let tmp = tempfile::tempdir().unwrap();
    let issued = ca.issue(
        &Subject::new("dest.example.org", &["dest.example.org"]),
        true,
    );
    std::fs::create_dir_all(tmp.path().join("client")).unwrap();
    std::fs::write(tmp.path().join("client/ca-cert.pem"), &ca.cert_pem).unwrap();
    let client = creds(&tmp.path().join("client"), Endpoint::Client, true).unwrap();
    // A server that prefers AES-256-GCM but follows the client's order (rustls's default).
    let config = rustls::ServerConfig::builder_with_provider(peer_provider(&[
        TLS13_AES_256_GCM_SHA384,
        TLS13_AES_128_GCM_SHA256,
    ]))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    let (protocol, chosen) = std::thread::scope(|scope| {
        let cli = scope.spawn(|| {
            let r = a.try_clone().unwrap();
            connect(&client, Some("dest.example.org"), r, a)
        });
        let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
        handshake(&mut conn, &mut b);
        let protocol = cli.join().unwrap().unwrap().protocol().to_string();
        let chosen = conn.negotiated_cipher_suite().unwrap().suite();
        (protocol, chosen)
    });
    assert_eq!(chosen, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert!(protocol.contains("TLS13_AES_128_GCM_SHA256"), "{protocol}");
}

/// A peer that stops reading: the writer's socket send timeout (the migration's stall bound,
/// `SO_SNDTIMEO`) ends the write with `WouldBlock`, as it ends a blocking write without TLS,
/// also when the writer sends through its socket handle and waits for room itself.
#[test]
fn a_stalled_peer_fails_the_write_within_the_send_timeout() {
    let ca = Ca::new("livemig test CA");
    let s = setup(&ca, &ca, "source.example.org");
    for direct in [false, true] {
        let (a, b) = UnixStream::pair().unwrap();
        let (srv, mut cl) = std::thread::scope(|scope| {
            let srv = scope.spawn(|| {
                let r = a.try_clone().unwrap();
                accept(&s.server, None, r, a).unwrap()
            });
            let r = b.try_clone().unwrap();
            let fd = b.try_clone().unwrap();
            fd.set_write_timeout(Some(std::time::Duration::from_millis(300)))
                .unwrap();
            let mut cl = connect(&s.client, Some("dest.example.org"), r, b).unwrap();
            if direct {
                cl.writer.set_socket(&fd).unwrap();
            }
            (srv.join().unwrap(), cl)
        });
        // The server holds its session and reads nothing.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let data = vec![7u8; 64 << 20];
            let _ = tx.send(cl.writer.write_all(&data).map_err(|e| e.kind()));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(20));
        drop(srv);
        assert_eq!(
            got,
            Ok(Err(std::io::ErrorKind::WouldBlock)),
            "direct sends: {direct}"
        );
    }
}
