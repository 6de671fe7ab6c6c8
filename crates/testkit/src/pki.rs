//! Test certificates, made when a test runs (no key is ever committed): a CA, and server and
//! client certificates it signs, written into directories with QEMU's file names
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`), so that both livemig's `tls-creds-x509` and QEMU's read them.

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::Path;

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
}

/// A certificate and its key, PEM.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

/// What to put in a certificate.
#[derive(Clone, Debug)]
pub struct Subject {
    /// Subject attributes in certificate order: (`C`, `ST`, `L`, `O`, `OU`, `CN`), value.
    pub dn: Vec<(&'static str, String)>,
    /// Subject alternative names (DNS names or IP addresses).
    pub sans: Vec<String>,
    /// Validity in years relative to now: (start, end); (-1, 10) is valid now.
    pub years: (i32, i32),
}

impl Subject {
    /// A subject with `CN=cn,O=livemig test` and the given alternative names, valid now.
    pub fn new(cn: &str, sans: &[&str]) -> Subject {
        Subject {
            dn: vec![("O", "livemig test".into()), ("CN", cn.into())],
            sans: sans.iter().map(|s| s.to_string()).collect(),
            years: (-1, 10),
        }
    }
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn params(s: &Subject) -> CertificateParams {
    let mut p = CertificateParams::new(s.sans.clone()).expect("valid names");
    p.distinguished_name = rcgen::DistinguishedName::new();
    for (k, v) in &s.dn {
        let ty = match *k {
            "C" => DnType::CountryName,
            "ST" => DnType::StateOrProvinceName,
            "L" => DnType::LocalityName,
            "O" => DnType::OrganizationName,
            "OU" => DnType::OrganizationalUnitName,
            "CN" => DnType::CommonName,
            other => panic!("unknown DN attribute {other}"),
        };
        p.distinguished_name.push(ty, v.as_str());
    }
    let y = this_year();
    p.not_before = date_time_ymd(y + s.years.0, 1, 1);
    p.not_after = date_time_ymd(y + s.years.1, 1, 1);
    p
}

impl Ca {
    /// A new CA named `CN=cn`.
    pub fn new(cn: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut p = params(&Subject::new(cn, &[]));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).expect("self-signed CA");
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A certificate for a TLS server (`server`) or client.
    pub fn issue(&self, subject: &Subject, server: bool) -> Issued {
        let key = KeyPair::generate().expect("key");
        let mut p = params(subject);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = p.signed_by(&key, &self.issuer).expect("signed");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes `ca-cert.pem`, `server-cert.pem` and `server-key.pem` into `dir`.
    pub fn write_server(&self, dir: &Path, subject: &Subject) {
        let i = self.issue(subject, true);
        write(dir, "ca-cert.pem", &self.cert_pem);
        write(dir, "server-cert.pem", &i.cert_pem);
        write(dir, "server-key.pem", &i.key_pem);
    }

    /// Writes `ca-cert.pem`, `client-cert.pem` and `client-key.pem` into `dir`.
    pub fn write_client(&self, dir: &Path, subject: &Subject) {
        let i = self.issue(subject, false);
        write(dir, "ca-cert.pem", &self.cert_pem);
        write(dir, "client-cert.pem", &i.cert_pem);
        write(dir, "client-key.pem", &i.key_pem);
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join(name), text).expect("write");
}
