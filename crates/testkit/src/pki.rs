//! Test certificates, made when a test runs (no key is ever committed): a CA, and server and
//! client certificates it signs, written into directories with QEMU's file names
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`), so that both livemig's `tls-creds-x509` and QEMU's read them; and
//! pre-shared keys in QEMU's `keys.psk` format for `tls-creds-psk`. [`Creds`] writes a
//! matching pair of either kind for a source and a destination.

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

    /// Writes a destination's credentials into `dir/srv` (for `dest.example.org` and
    /// 127.0.0.1) and a source's into `dir/cli` (`source.example.org`, [`SOURCE_DN`]).
    pub fn write_pair(&self, dir: &Path) {
        self.write_server(
            &dir.join("srv"),
            &Subject::new("dest.example.org", &["dest.example.org", "127.0.0.1"]),
        );
        self.write_client(&dir.join("cli"), &Subject::new("source.example.org", &[]));
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

/// The subject of [`Creds::write`]'s client certificate as GnuTLS prints it (what a
/// destination's `tls-authz` matches).
pub const SOURCE_DN: &str = "O=livemig test,CN=source.example.org";

/// The source's subject as an `authz-simple` object takes it (`,` doubled in an `-object`
/// option).
pub fn source_dn_option() -> String {
    SOURCE_DN.replace(',', ",,")
}

/// The key [`Creds::Psk`] writes on both ends (user `qemu`, QEMU's default username).
pub const PSK_KEY: &str = "4f1c2a9e0b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f";

/// Writes `dir/keys.psk` with `lines` (`username:hexkey` each); returns `dir`.
pub fn write_psk(dir: &Path, lines: &str) -> String {
    write(dir, "keys.psk", lines);
    dir.display().to_string()
}

/// A kind of TLS credentials for a migration's two ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Creds {
    /// `tls-creds-x509`: a CA, a server certificate for `dest.example.org` and 127.0.0.1,
    /// a client certificate for `source.example.org` ([`SOURCE_DN`]).
    X509,
    /// `tls-creds-psk`: [`PSK_KEY`] for user `qemu` on both ends.
    Psk,
}

impl Creds {
    /// Writes the server's credentials into `dir/srv` and the client's into `dir/cli`.
    pub fn write(self, dir: &Path) {
        match self {
            Creds::X509 => Ca::new("livemig test CA").write_pair(dir),
            Creds::Psk => {
                let line = format!("qemu:{PSK_KEY}\n");
                write_psk(&dir.join("srv"), &line);
                write_psk(&dir.join("cli"), &line);
            }
        }
    }

    /// The `-object` option of credentials `id` from `dir/sub` for `endpoint` (`server` or
    /// `client`).
    pub fn object(self, id: &str, dir: &Path, sub: &str, endpoint: &str) -> String {
        let ty = match self {
            Creds::X509 => "tls-creds-x509",
            Creds::Psk => "tls-creds-psk",
        };
        format!(
            "{ty},id={id},dir={},endpoint={endpoint}",
            dir.join(sub).display()
        )
    }

    /// The destination's `-object`s: server credentials `tls0` from `dir/srv` and `authz0`,
    /// an `authz-simple` that admits the source (its certificate's name, or the PSK
    /// username), for `tls-authz`.
    pub fn server_objects(self, dir: &Path) -> Vec<String> {
        let identity = match self {
            Creds::X509 => source_dn_option(),
            Creds::Psk => "qemu".into(),
        };
        vec![
            "-object".into(),
            self.object("tls0", dir, "srv", "server"),
            "-object".into(),
            format!("authz-simple,id=authz0,identity={identity}"),
        ]
    }

    /// The source's `-object`: client credentials `tls0` from `dir/cli`.
    pub fn client_objects(self, dir: &Path) -> Vec<String> {
        vec!["-object".into(), self.object("tls0", dir, "cli", "client")]
    }
}
