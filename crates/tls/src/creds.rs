//! `tls-creds-x509`: certificates and keys loaded from a directory laid out as QEMU's (see the
//! table), checked as QEMU checks them, and turned into rustls configurations — one per
//! session, because the checks a session makes (hostname, authz) are its own.
//!
//! | file | server endpoint | client endpoint |
//! |---|---|---|
//! | `ca-cert.pem` | required: CAs that sign client certificates | required: CAs that sign the server's |
//! | `ca-crl.pem` | optional: revoked client certificates | — |
//! | `server-cert.pem`, `server-key.pem` | required | — |
//! | `client-cert.pem`, `client-key.pem` | — | optional (a server with `verify-peer=on` wants them) |
//! | `dh-params.pem` | optional; read and checked, then unused: rustls offers ECDHE key exchange only, which needs no parameters | — |
//!
//! Keys come from these files only, and no key material is ever logged.

use crate::authz::Authz;
use crate::cert::{sanity_check, CertInfo, CertRole};
use crate::error::TlsError;
use crate::psk::{PskCreds, PskOptions};
use crate::verify::{rejection_reason, ClientVerifier, Rejection, ServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

/// File names inside `dir`, as QEMU names them.
pub mod files {
    /// CA certificates.
    pub const CA_CERT: &str = "ca-cert.pem";
    /// Certificate revocation list (server endpoint).
    pub const CA_CRL: &str = "ca-crl.pem";
    /// The server's certificate (chain).
    pub const SERVER_CERT: &str = "server-cert.pem";
    /// The server's private key.
    pub const SERVER_KEY: &str = "server-key.pem";
    /// The client's certificate (chain).
    pub const CLIENT_CERT: &str = "client-cert.pem";
    /// The client's private key.
    pub const CLIENT_KEY: &str = "client-key.pem";
    /// Diffie-Hellman parameters (server endpoint).
    pub const DH_PARAMS: &str = "dh-params.pem";
}

/// Which side of a TLS session credentials are for (QAPI `QCryptoTLSCredsEndpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `client`: this side connects (migration source, NBD client).
    Client,
    /// `server`: this side accepts (migration destination, NBD server).
    Server,
}

impl Endpoint {
    /// QAPI names, in QEMU's order.
    pub const NAMES: [&'static str; 2] = ["client", "server"];

    /// The QAPI name.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Client => "client",
            Endpoint::Server => "server",
        }
    }
}

/// The properties of a `tls-creds-x509` object that livemig acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Options {
    /// `dir`: where the files are.
    pub dir: Option<String>,
    /// `endpoint` (default `client`).
    pub endpoint: Endpoint,
    /// `verify-peer` (default on): check the peer's certificate.
    pub verify_peer: bool,
    /// `sanity-check` (default on): check this side's certificates when loading.
    pub sanity_check: bool,
}

impl Default for X509Options {
    fn default() -> Self {
        X509Options {
            dir: None,
            endpoint: Endpoint::Client,
            verify_peer: true,
            sanity_check: true,
        }
    }
}

/// QEMU's `qcrypto_tls_creds_get_dh_params_file` check of an optional `dh-params.pem`: it must
/// hold PKCS#3 parameters. livemig then needs none (ECDHE key exchange only).
pub(crate) fn check_dh_params(p: &str) -> Result<(), TlsError> {
    let pem = std::fs::read(p).map_err(|e| TlsError::Creds(strerror(&e)))?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN DH PARAMETERS-----") {
        return Err(TlsError::Creds(format!(
            "Unable to load DH parameters from {p}: no PKCS#3 DH parameters found"
        )));
    }
    log::info!("{p}: DH parameters not needed: livemig's TLS uses ECDHE key exchange only");
    Ok(())
}

/// Loaded TLS credentials of either kind, as a `tls-creds` parameter names them: each kind
/// runs its sessions on its own engine (see [`crate::stream`]).
#[derive(Debug)]
pub enum TlsCreds {
    /// `tls-creds-x509`: certificates, sessions on rustls.
    X509(X509Creds),
    /// `tls-creds-psk`: a pre-shared key, sessions on OpenSSL.
    Psk(PskCreds),
}

impl TlsCreds {
    /// Loads `tls-creds-x509` credentials ([`X509Creds::load`]).
    pub fn load_x509(options: X509Options) -> Result<TlsCreds, TlsError> {
        X509Creds::load(options).map(TlsCreds::X509)
    }

    /// Loads `tls-creds-psk` credentials ([`PskCreds::load`]).
    pub fn load_psk(options: PskOptions) -> Result<TlsCreds, TlsError> {
        PskCreds::load(options).map(TlsCreds::Psk)
    }

    /// The QOM type name.
    pub fn qom_type(&self) -> &'static str {
        match self {
            TlsCreds::X509(_) => "tls-creds-x509",
            TlsCreds::Psk(_) => "tls-creds-psk",
        }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            TlsCreds::X509(c) => c.endpoint(),
            TlsCreds::Psk(c) => c.endpoint(),
        }
    }

    /// Whether a session checks who the peer is, and so whether a server asks `tls-authz`:
    /// x509 credentials with `verify-peer` on (the certificate's distinguished name), PSK
    /// credentials always (only a peer with the key gets through; the username it sent is
    /// what `tls-authz` is asked about).
    pub fn verify_peer(&self) -> bool {
        match self {
            TlsCreds::X509(c) => c.verify_peer(),
            TlsCreds::Psk(_) => true,
        }
    }
}

/// Loaded `tls-creds-x509` credentials.
pub struct X509Creds {
    options: X509Options,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    /// This side's certificate chain and key (always on a server; on a client when the
    /// files exist).
    own: Option<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for X509Creds {
    // No key material in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Creds")
            .field("options", &self.options)
            .field("roots", &self.roots.len())
            .field("crls", &self.crls.len())
            .field("own_certificate", &self.own.is_some())
            .finish()
    }
}

/// The cipher suites in livemig's order of preference: AES-128-GCM first, then AES-256-GCM,
/// then ChaCha20-Poly1305, in TLS 1.3 and in TLS 1.2 alike. On a CPU with AES-NI and
/// PCLMULQDQ (every x86-64 server livemig runs on), AES-128-GCM seals and opens 10–20 %
/// faster than AES-256-GCM (10 rounds of AES against 14; the GHASH half is the same), and a
/// fast link makes the cipher a channel's ceiling. AES-128-GCM is TLS 1.3's one mandatory
/// suite, and what Go's crypto/tls prefers on such hardware; GnuTLS (QEMU 7.2) offers all
/// three, so the choice costs no interoperability. Clients send this order; servers pick
/// from it whatever the client's order (`ignore_client_order`).
///
/// ring, not aws-lc-rs: it builds without cmake or a C toolchain's long compile, GnuTLS 3.7
/// has no post-quantum key exchange to meet anyway, and on this hardware aws-lc-rs's AES-GCM
/// (the same stitched AES-NI/AVX code) measured no faster (BENCHMARKS.md, TLS).
fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    provider
}

/// `strerror(errno)` of an I/O error, without Rust's " (os error N)" suffix.
pub(crate) fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// QEMU's `qcrypto_tls_creds_get_path`: the path of `name` in `dir`, `None` for an optional
/// file that does not exist.
pub(crate) fn cred_path(
    dir: Option<&str>,
    name: &str,
    required: bool,
) -> Result<Option<String>, TlsError> {
    let Some(dir) = dir else {
        return if required {
            Err(TlsError::Creds("Missing 'dir' property value".into()))
        } else {
            Ok(None)
        };
    };
    let path = format!("{dir}/{name}");
    match std::fs::metadata(&path) {
        Ok(_) => Ok(Some(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(TlsError::Creds(format!(
            "Unable to access credentials {path}: {}",
            strerror(&e)
        ))),
    }
}

fn read_file(path: &str, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| TlsError::Creds(format!("Cannot load {what} {path}: {}", strerror(&e))))
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::NoItemsFound => "No certificate was found.".into(),
        E::Base64Decode(s) => format!("Base64 decoding error ({s})"),
        E::MissingSectionEnd { .. } => "The PEM section has no END line".into(),
        E::IllegalSectionStart { .. } => "The PEM section start is malformed".into(),
        other => format!("{other:?}"),
    }
}

fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(pem) {
        out.push(c.map_err(|e| pem_reason(&e))?);
    }
    if out.is_empty() {
        return Err("No certificate was found.".into());
    }
    Ok(out)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl X509Creds {
    /// Loads credentials as QEMU's `tls-creds-x509` does when the object is completed: finds
    /// the files, runs the sanity checks (unless turned off), loads the CA list, this side's
    /// certificate and key, and the CRL. Errors carry QEMU's messages.
    pub fn load(options: X509Options) -> Result<X509Creds, TlsError> {
        let dir = options.dir.as_deref();
        let server = options.endpoint == Endpoint::Server;
        let ca = cred_path(dir, files::CA_CERT, true)?.unwrap_or_default();
        let (crl, cert, key, dh) = if server {
            (
                cred_path(dir, files::CA_CRL, false)?,
                cred_path(dir, files::SERVER_CERT, true)?,
                cred_path(dir, files::SERVER_KEY, true)?,
                cred_path(dir, files::DH_PARAMS, false)?,
            )
        } else {
            (
                None,
                cred_path(dir, files::CLIENT_CERT, false)?,
                cred_path(dir, files::CLIENT_KEY, false)?,
                None,
            )
        };

        let ca_pem = read_file(&ca, "CA cert list")?;
        let ca_certs = certs_from_pem(&ca_pem)
            .map_err(|_| TlsError::Creds(format!("Unable to import CA certificate list {ca}")))?;
        let cert_pem = match &cert {
            Some(p) => Some(read_file(p, "CA cert list")?),
            None => None,
        };
        let role = if server {
            CertRole::Server
        } else {
            CertRole::Client
        };
        let own_chain = match (&cert, &cert_pem) {
            (Some(p), Some(pem)) => Some(certs_from_pem(pem).map_err(|r| {
                TlsError::Creds(format!(
                    "Unable to import {} certificate {p}: {r}",
                    if server { "server" } else { "client" }
                ))
            })?),
            _ => None,
        };

        let provider = Arc::new(provider());
        if options.sanity_check {
            let now = now_secs();
            if let (Some(p), Some(chain)) = (&cert, &own_chain) {
                let first = chain.first().map(|c| c.as_ref()).unwrap_or_default();
                let info = CertInfo::parse(first).map_err(|r| {
                    TlsError::Creds(format!(
                        "Unable to import {} certificate {p}: {r}",
                        if server { "server" } else { "client" }
                    ))
                })?;
                sanity_check(&info, p, role, now).map_err(TlsError::Creds)?;
            }
            for c in &ca_certs {
                let info = CertInfo::parse(c).map_err(|_| {
                    TlsError::Creds(format!("Unable to import CA certificate list {ca}"))
                })?;
                sanity_check(&info, &ca, CertRole::Ca, now).map_err(TlsError::Creds)?;
            }
        }

        let mut roots = RootCertStore::empty();
        for c in &ca_certs {
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Creds(format!("Cannot load CA certificate '{ca}': {e}")))?;
        }
        let roots = Arc::new(roots);

        if options.sanity_check {
            if let (Some(p), Some(chain)) = (&cert, &own_chain) {
                if let Some((first, rest)) = chain.split_first() {
                    let checked = if server {
                        verify_as_server(&provider, &roots, first, rest)
                    } else {
                        verify_as_client(&provider, &roots, first, rest)
                    };
                    checked.map_err(|reason| {
                        TlsError::Creds(format!(
                            "Our own certificate {p} failed validation against {ca}: {reason}"
                        ))
                    })?;
                }
            }
        }

        let own = match (&cert, &key, own_chain) {
            (Some(cert), Some(key), Some(chain)) => {
                let fail = |r: String| {
                    TlsError::Creds(format!(
                        "Cannot load certificate '{cert}' & key '{key}': {r}"
                    ))
                };
                let der = PrivateKeyDer::from_pem_file(Path::new(key))
                    .map_err(|e| fail(pem_key_reason(&e)))?;
                let signing = provider
                    .key_provider
                    .load_private_key(der)
                    .map_err(|e| fail(e.to_string()))?;
                let ck = CertifiedKey::new(chain, signing);
                ck.keys_match().map_err(|_| {
                    fail("The certificate's public key does not match the private key".into())
                })?;
                Some(Arc::new(ck))
            }
            _ => None,
        };

        let mut crls = Vec::new();
        if let Some(p) = &crl {
            let pem = read_file(p, "CRL")?;
            for c in CertificateRevocationListDer::pem_slice_iter(&pem) {
                crls.push(c.map_err(|e| {
                    TlsError::Creds(format!("Cannot load CRL '{p}': {}", pem_reason(&e)))
                })?);
            }
        }

        if let Some(p) = &dh {
            check_dh_params(p)?;
        }

        Ok(X509Creds {
            options,
            provider,
            roots,
            crls,
            own,
        })
    }

    /// The options the credentials were loaded with.
    pub fn options(&self) -> &X509Options {
        &self.options
    }

    /// The endpoint.
    pub fn endpoint(&self) -> Endpoint {
        self.options.endpoint
    }

    /// Whether the peer's certificate is checked.
    pub fn verify_peer(&self) -> bool {
        self.options.verify_peer
    }

    /// A rustls client configuration for one session to a server known as `hostname` (the
    /// name its certificate must carry; required when `verify-peer` is on). The returned
    /// [`Rejection`] slot receives the reason when this side refuses the server.
    pub fn client_config(
        &self,
        hostname: Option<&str>,
    ) -> Result<(Arc<ClientConfig>, Rejection), TlsError> {
        let rejection = Rejection::default();
        let verifier = Arc::new(ServerVerifier::new(
            self.roots.clone(),
            self.options.verify_peer,
            hostname.map(str::to_string),
            self.provider.signature_verification_algorithms,
            rejection.clone(),
        ));
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Creds(format!("Cannot set up TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.own {
            Some(ck) => builder.with_client_cert_resolver(Arc::new(OwnCert(ck.clone()))),
            None => builder.with_no_client_auth(),
        };
        // QEMU sends no server name, and resumes no session: each channel is a full handshake.
        config.enable_sni = false;
        config.resumption = rustls::client::Resumption::disabled();
        Ok((Arc::new(config), rejection))
    }

    /// A rustls server configuration for one session; `authz` (with its id, for messages)
    /// decides which client certificates get in when `verify-peer` is on.
    pub fn server_config(
        &self,
        authz: Option<Arc<Authz>>,
    ) -> Result<(Arc<ServerConfig>, Rejection), TlsError> {
        let own = self.own.clone().ok_or_else(|| {
            TlsError::Creds("TLS credentials for a server endpoint have no certificate".into())
        })?;
        let rejection = Rejection::default();
        let webpki = if self.options.verify_peer {
            Some(
                WebPkiClientVerifier::builder_with_provider(
                    self.roots.clone(),
                    self.provider.clone(),
                )
                .with_crls(self.crls.clone())
                .build()
                .map_err(|e| TlsError::Creds(format!("Cannot set up TLS: {e}")))?,
            )
        } else {
            None
        };
        let verifier = Arc::new(ClientVerifier::new(
            webpki,
            authz,
            self.provider.signature_verification_algorithms,
            rejection.clone(),
        ));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Creds(format!("Cannot set up TLS: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(OwnCert(own)));
        // The server's order of cipher suites (`provider`) decides, not the client's.
        config.ignore_client_order = true;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok((Arc::new(config), rejection))
    }
}

/// This side's one certificate, offered whatever the peer asks for (GnuTLS does the same
/// with a single certificate).
#[derive(Debug)]
struct OwnCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn pem_key_reason(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "No unencrypted private key was found (livemig reads PKCS#8, PKCS#1 and SEC1 PEM keys)"
                .into()
        }
        other => pem_reason(other),
    }
}

fn verify_as_server(
    provider: &CryptoProvider,
    roots: &RootCertStore,
    cert: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), String> {
    let parsed =
        rustls::server::ParsedCertificate::try_from(cert).map_err(|e| rejection_reason(&e))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| rejection_reason(&e))
}

fn verify_as_client(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    cert: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), String> {
    let v = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    v.verify_client_cert(cert, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| rejection_reason(&e))
}
