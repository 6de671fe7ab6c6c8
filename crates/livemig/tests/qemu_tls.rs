//! Migration over TLS between QEMU 7.2 (GnuTLS) and livemig (rustls), both `-M none -m 32M`,
//! with certificates made by the test (testkit::pki) in QEMU's directory layout.
//!
//! * QEMU → livemig → QEMU over TCP with a return path, once on one channel and once with
//!   multifd (two channels, each its own TLS session): x509 credentials on every end, the
//!   destinations checking the source's certificate with `tls-authz` (livemig an `authz-list`
//!   glob, QEMU an `authz-simple` with the distinguished name as GnuTLS prints it — so QEMU
//!   itself confirms livemig's reading of the name). RAM identical at every step. livemig's
//!   client credentials come by `object-add`, its server credentials by `-object`.
//! * Each failure, on both ends: a wrong CA, a wrong hostname, a source outside the authz
//!   list, a plaintext peer. The migration fails with a clear error, the source runs on.

mod qemu_common;

use qemu_common::secure::{
    self, destination_failed, livemig_destination, livemig_source, qemu_destination, qemu_source,
    source_failed_and_runs, wait_log,
};
use qemu_common::*;
use serde_json::json;
use std::path::Path;
use testkit::pki::{Ca, Subject};

/// The source certificate's subject as GnuTLS prints it.
const SOURCE_DN: &str = "O=livemig test,CN=source.example.org";

/// `authz-simple` `auth0` allowing [`SOURCE_DN`] (its commas doubled for QEMU's options).
fn source_authz() -> String {
    format!(
        "authz-simple,id=auth0,identity={}",
        SOURCE_DN.replace(',', ",,")
    )
}

/// Writes `srv/` (server credentials for 127.0.0.1) and `cli/` (client credentials for
/// `client_cn`) under `dir`, both trusting `ca`.
fn pki(dir: &Path, ca: &Ca, client_cn: &str) {
    ca.write_server(
        &dir.join("srv"),
        &Subject::new("dest.example.org", &["dest.example.org", "127.0.0.1"]),
    );
    ca.write_client(&dir.join("cli"), &Subject::new(client_cn, &[]));
}

fn creds_arg(dir: &Path, id: &str, sub: &str, endpoint: &str) -> Vec<String> {
    secure::creds_arg("tls-creds-x509", dir, id, sub, endpoint)
}

#[test]
fn tls_qemu_to_livemig_to_qemu() {
    chain("tls_qemu_to_livemig_to_qemu", false);
}

/// The same chain with multifd: every channel of every hop is a TLS session of its own.
#[test]
fn tls_multifd_qemu_to_livemig_to_qemu() {
    chain("tls_multifd_qemu_to_livemig_to_qemu", true);
}

/// The chain with x509 credentials: livemig checks QEMU A with an `authz-list` glob, QEMU B
/// checks livemig with an `authz-simple` on the distinguished name as GnuTLS prints it.
fn chain(test: &str, with_multifd: bool) {
    let qemu_authz = source_authz();
    let Some(mut end) = secure::chain(&secure::Chain {
        test,
        multifd: with_multifd,
        kind: "tls-creds-x509",
        credentials: &|dir| pki(dir, &Ca::new("livemig test CA"), "source.example.org"),
        qemu_props: "",
        livemig_env: &[],
        livemig_authz: "authz-list,id=auth0,policy=deny,rules.0.match=O=livemig test,,CN=source.*,rules.0.policy=allow,rules.0.format=glob",
        qemu_authz: Some(&qemu_authz),
        seed: 11,
        over: "TLS",
    }) else {
        return;
    };
    // The credentials can go; the finished migration does not care.
    end.l_q.ok("object-del", json!({"id": "tls1"}));
    assert_eq!(
        end.l_q.err("object-del", json!({"id": "tls1"})),
        "object 'tls1' not found"
    );
}

#[test]
fn tls_failures_are_clear_on_both_ends() {
    let Some(tmp) = setup("tls_failures_are_clear_on_both_ends") else {
        return;
    };
    let dir = tmp.path();
    let ca = Ca::new("livemig test CA");
    pki(dir, &ca, "source.example.org");
    // A second PKI: the "wrong CA" for the source.
    let other = Ca::new("another CA");
    other.write_client(&dir.join("other"), &Subject::new("source.example.org", &[]));
    // A client certificate from the right CA with a name outside the authz list.
    ca.write_client(
        &dir.join("intruder"),
        &Subject::new("intruder.example.org", &[]),
    );

    // Wrong CA: livemig source trusts `other`, QEMU's server certificate comes from `ca`.
    let mut src = livemig_source(
        dir,
        "l-ca",
        &creds_arg(dir, "tls0", "other", "client"),
        json!({"tls-creds": "tls0"}),
    );
    let (dst, uri) = qemu_destination(
        dir,
        "q-ca",
        &creds_arg(dir, "tls0", "srv", "server"),
        json!({"tls-creds": "tls0"}),
        false,
    );
    src.q.ok("migrate", json!({"uri": uri}));
    let e = source_failed_and_runs(&mut src.q, "wrong CA");
    assert_eq!(e, "The certificate hasn't got a known issuer");
    wait_log(&dst.p, "TLS handshake failed");
    drop(dst);

    // Wrong hostname: tls-hostname names another host.
    src.q.ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "good", "endpoint": "client",
               "dir": dir.join("cli").display().to_string()}),
    );
    src.q.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "good", "tls-hostname": "other.example.org"}),
    );
    let (dst, uri) = qemu_destination(
        dir,
        "q-host",
        &creds_arg(dir, "tls0", "srv", "server"),
        json!({"tls-creds": "tls0"}),
        false,
    );
    src.q.ok("migrate", json!({"uri": uri}));
    let e = source_failed_and_runs(&mut src.q, "wrong hostname");
    assert_eq!(
        e,
        "Certificate does not match the hostname other.example.org"
    );
    wait_log(&dst.p, "TLS handshake failed");
    drop(dst);

    // A source outside the authz list: QEMU source (intruder) -> livemig destination.
    let mut qs = qemu_source(dir, "q-src", &creds_arg(dir, "tls0", "intruder", "client"));
    let mut extra = creds_arg(dir, "tls0", "srv", "server");
    extra.extend(strings(&["-object", &source_authz()]));
    let (mut ld, uri) = livemig_destination(
        dir,
        "l-authz",
        &extra,
        json!({"tls-creds": "tls0", "tls-authz": "auth0"}),
    );
    qs.q.ok("migrate", json!({"uri": uri}));
    assert_eq!(
        destination_failed(&mut ld.q),
        "TLS x509 authz check for O=livemig test,CN=intruder.example.org is denied"
    );
    // QEMU 7.2's source fails; its error-desc is sometimes empty (its return-path thread
    // fails without setting one), so only the status is QEMU's word here.
    source_failed_and_runs(&mut qs.q, "outside the authz list");
    drop(ld);

    // A plaintext QEMU source -> livemig TLS destination.
    qs.q.ok("migrate-set-parameters", json!({"tls-creds": ""}));
    let (mut ld, uri) = livemig_destination(
        dir,
        "l-plain",
        &creds_arg(dir, "tls0", "srv", "server"),
        json!({"tls-creds": "tls0"}),
    );
    qs.q.ok("migrate", json!({"uri": uri}));
    let e = destination_failed(&mut ld.q);
    assert!(
        e.starts_with("TLS handshake failed: the peer does not speak TLS"),
        "{e}"
    );
    source_failed_and_runs(&mut qs.q, "plaintext source");

    // A livemig TLS source -> a plaintext QEMU destination.
    src.q
        .ok("migrate-set-parameters", json!({"tls-hostname": ""}));
    let (dst, uri) = qemu_destination(dir, "q-plain", &[], json!({}), false);
    src.q.ok("migrate", json!({"uri": uri}));
    let e = source_failed_and_runs(&mut src.q, "plaintext destination");
    assert!(e.starts_with("TLS handshake failed: "), "{e}");
    drop(dst);
}
