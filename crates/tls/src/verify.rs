//! The checks a session makes of its peer, as rustls verifiers, deciding what QEMU's
//! `qcrypto_tls_session_check_credentials` decides — but during the handshake, so that the
//! peer is told with an alert instead of finding a closed socket:
//!
//! * a client endpoint with `verify-peer=on` checks the server's chain against `ca-cert.pem`,
//!   then the hostname by GnuTLS's rules ([`crate::cert::CertInfo::matches_hostname`]); no
//!   hostname at all is an error, as in QEMU;
//! * a server endpoint always asks for a client certificate; with `verify-peer=on` it requires
//!   one, checks its chain (and `ca-crl.pem`), then asks the `tls-authz` object, if any, about
//!   the certificate's distinguished name;
//! * with `verify-peer=off` nothing about the peer's certificate is checked (the handshake's
//!   signatures still are).
//!
//! Why a refusal happened is kept in a [`Rejection`] slot, with QEMU's wording, because rustls
//! reduces it to an enum on the way out.

use crate::authz::Authz;
use crate::cert::CertInfo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::sync::{Arc, Mutex};

/// Where a verifier leaves the reason it refused the peer, and the peer's distinguished name
/// once it is known.
#[derive(Debug, Clone, Default)]
pub struct Rejection {
    inner: Arc<Mutex<RejectionState>>,
}

#[derive(Debug, Default)]
struct RejectionState {
    reason: Option<String>,
    peer_dn: Option<String>,
}

impl Rejection {
    pub(crate) fn set(&self, reason: String) {
        if let Ok(mut g) = self.inner.lock() {
            g.reason.get_or_insert(reason);
        }
    }

    pub(crate) fn set_dn(&self, dn: String) {
        if let Ok(mut g) = self.inner.lock() {
            g.peer_dn = Some(dn);
        }
    }

    /// Why the peer was refused, if it was.
    pub fn reason(&self) -> Option<String> {
        self.inner.lock().ok().and_then(|g| g.reason.clone())
    }

    /// The distinguished name of the peer's certificate, once verified.
    pub fn peer_dn(&self) -> Option<String> {
        self.inner.lock().ok().and_then(|g| g.peer_dn.clone())
    }
}

/// GnuTLS's words (as QEMU reports them) for why a certificate chain did not verify.
pub fn rejection_reason(e: &Error) -> String {
    match e {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
            CertificateError::BadSignature => "The certificate is not trusted".into(),
            CertificateError::Revoked => "The certificate has been revoked".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "The certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "The certificate is not yet activated".into()
            }
            #[allow(deprecated)]
            CertificateError::UnsupportedSignatureAlgorithm
            | CertificateError::UnsupportedSignatureAlgorithmContext { .. } => {
                "The certificate uses an insecure algorithm".into()
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "The certificate's key purpose does not allow this use".into()
            }
            other => format!("Invalid certificate ({other:?})"),
        },
        Error::NoCertificatesPresented => "Verify failed: No certificate was found.".into(),
        other => format!("Invalid certificate ({other})"),
    }
}

/// The check a client endpoint makes of the server.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    verify_peer: bool,
    hostname: Option<String>,
    algs: WebPkiSupportedAlgorithms,
    rejection: Rejection,
}

impl ServerVerifier {
    pub(crate) fn new(
        roots: Arc<rustls::RootCertStore>,
        verify_peer: bool,
        hostname: Option<String>,
        algs: WebPkiSupportedAlgorithms,
        rejection: Rejection,
    ) -> Self {
        ServerVerifier {
            roots,
            verify_peer,
            hostname,
            algs,
            rejection,
        }
    }

    fn refuse<T>(&self, reason: String, err: CertificateError) -> Result<T, Error> {
        self.rejection.set(reason);
        Err(Error::InvalidCertificate(err))
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if !self.verify_peer {
            return Ok(ServerCertVerified::assertion());
        }
        let parsed = match rustls::server::ParsedCertificate::try_from(end_entity) {
            Ok(p) => p,
            Err(e) => return self.refuse(rejection_reason(&e), CertificateError::BadEncoding),
        };
        if let Err(e) = rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        ) {
            let code = match &e {
                Error::InvalidCertificate(c) => c.clone(),
                _ => CertificateError::BadEncoding,
            };
            return self.refuse(rejection_reason(&e), code);
        }
        let info = match CertInfo::parse(end_entity) {
            Ok(i) => i,
            Err(r) => {
                return self.refuse(
                    format!("Cannot import certificate: {r}"),
                    CertificateError::BadEncoding,
                )
            }
        };
        self.rejection.set_dn(info.dn.clone());
        match &self.hostname {
            Some(h) if info.matches_hostname(h) => Ok(ServerCertVerified::assertion()),
            Some(h) => self.refuse(
                format!("Certificate does not match the hostname {h}"),
                CertificateError::NotValidForName,
            ),
            None => self.refuse(
                "No hostname for certificate validation".into(),
                CertificateError::ApplicationVerificationFailure,
            ),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The check a server endpoint makes of the client.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    /// Chain checking (with the CRL); `None` when `verify-peer` is off.
    webpki: Option<Arc<dyn ClientCertVerifier>>,
    authz: Option<Arc<Authz>>,
    algs: WebPkiSupportedAlgorithms,
    rejection: Rejection,
}

impl ClientVerifier {
    pub(crate) fn new(
        webpki: Option<Arc<dyn ClientCertVerifier>>,
        authz: Option<Arc<Authz>>,
        algs: WebPkiSupportedAlgorithms,
        rejection: Rejection,
    ) -> Self {
        ClientVerifier {
            webpki,
            authz,
            algs,
            rejection,
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        // QEMU's server always asks (GNUTLS_CERT_REQUEST), and enforces only with verify-peer.
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.is_some()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        match &self.webpki {
            Some(w) => w.root_hint_subjects(),
            None => &[],
        }
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ClientCertVerified::assertion());
        };
        if let Err(e) = webpki.verify_client_cert(end_entity, intermediates, now) {
            self.rejection.set(rejection_reason(&e));
            return Err(e);
        }
        let info = match CertInfo::parse(end_entity) {
            Ok(i) => i,
            Err(r) => {
                self.rejection
                    .set(format!("Cannot import certificate: {r}"));
                return Err(Error::InvalidCertificate(CertificateError::BadEncoding));
            }
        };
        self.rejection.set_dn(info.dn.clone());
        if let Some(authz) = &self.authz {
            if !authz.is_allowed(&info.dn) {
                self.rejection
                    .set(format!("TLS x509 authz check for {} is denied", info.dn));
                return Err(Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ));
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
