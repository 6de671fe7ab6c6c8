//! What QEMU (through GnuTLS) reads out of an X.509 certificate, read the same way here:
//!
//! * the subject's distinguished name as the string `gnutls_x509_crt_get_dn` makes of it —
//!   the identity that `authz-simple`/`authz-list` objects match (RDNs in certificate order,
//!   `TYPE=value` joined by `,`, multi-valued RDNs joined by `+`, RFC 4514 escapes, GnuTLS's
//!   attribute names such as `EMAIL` and `surName`, `OID=#hex` for attributes it cannot
//!   print);
//! * hostname matching as `gnutls_x509_crt_check_hostname` does it: IP addresses against
//!   `iPAddress` alternative names, DNS names against `dNSName` alternative names with a
//!   leftmost-label wildcard, and — only when there is no `dNSName` at all — against a single
//!   common name;
//! * the checks of QEMU's `sanity-check` (validity times, basic constraints, key usage, key
//!   purpose), with QEMU's messages.
//!
//! Everything here reads bytes from files or from the peer: nothing panics, a certificate
//! that does not parse is an error naming the file or the peer.

use std::net::IpAddr;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate, X509Name};

/// What a certificate says, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject as `gnutls_x509_crt_get_dn` prints it.
    pub dn: String,
    /// `dNSName` subject alternative names.
    pub dns_names: Vec<String>,
    /// `iPAddress` subject alternative names.
    pub ips: Vec<IpAddr>,
    /// The subject's common names (CN), in order.
    pub common_names: Vec<String>,
    /// Start of validity (seconds since the epoch).
    pub not_before: i64,
    /// End of validity (seconds since the epoch).
    pub not_after: i64,
    /// Basic constraints: `None` when the extension is absent, else the CA flag.
    pub basic_ca: Option<bool>,
    /// Key usage bits (bit 0 digitalSignature … bit 5 keyCertSign) and whether the extension
    /// is critical; `None` when absent.
    pub key_usage: Option<(u16, bool)>,
    /// Extended key usage: `None` when absent, else (server auth or any, client auth or any,
    /// critical).
    pub key_purpose: Option<(bool, bool, bool)>,
}

/// Key usage bit: digitalSignature.
pub const KU_DIGITAL_SIGNATURE: u16 = 1;
/// Key usage bit: keyEncipherment.
pub const KU_KEY_ENCIPHERMENT: u16 = 1 << 2;
/// Key usage bit: keyCertSign.
pub const KU_KEY_CERT_SIGN: u16 = 1 << 5;

impl CertInfo {
    /// Parses a DER certificate; the error is the parser's reason.
    pub fn parse(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        Self::from_cert(&cert)
    }

    fn from_cert(cert: &X509Certificate<'_>) -> Result<CertInfo, String> {
        let dn = gnutls_dn(cert.subject());
        let mut common_names = Vec::new();
        for cn in cert.subject().iter_common_name() {
            match directory_string(cn.attr_value()) {
                Some(s) => common_names.push(s),
                None => return Err("the subject's common name is not a string".into()),
            }
        }
        let mut info = CertInfo {
            dn,
            dns_names: Vec::new(),
            ips: Vec::new(),
            common_names,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            basic_ca: None,
            key_usage: None,
            key_purpose: None,
        };
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => info.basic_ca = Some(bc.ca),
                ParsedExtension::KeyUsage(ku) => info.key_usage = Some((ku.flags, ext.critical)),
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    info.key_purpose = Some((
                        eku.server_auth || eku.any,
                        eku.client_auth || eku.any,
                        ext.critical,
                    ))
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::DNSName(d) => info.dns_names.push(d.to_string()),
                            GeneralName::IPAddress(b) => {
                                if let Ok(a) = <[u8; 4]>::try_from(*b) {
                                    info.ips.push(IpAddr::from(a));
                                } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                                    info.ips.push(IpAddr::from(a));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                ParsedExtension::ParseError { error } => {
                    return Err(format!("extension {}: {error}", ext.oid))
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// Whether the certificate is valid for `hostname`, by GnuTLS's rules (see the module
    /// documentation).
    pub fn matches_hostname(&self, hostname: &str) -> bool {
        if let Ok(ip) = hostname
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            if self.ips.contains(&ip) {
                return true;
            }
            // GnuTLS falls through to the DNS names: some certificates carry their address
            // as a dNSName.
        }
        if !self.dns_names.is_empty() {
            return self.dns_names.iter().any(|d| hostname_matches(d, hostname));
        }
        // No dNSName: the common name counts, if there is exactly one and the certificate may
        // serve TLS servers.
        let www_server = self.key_purpose.is_none_or(|(server, _, _)| server);
        match self.common_names.as_slice() {
            [cn] if www_server => hostname_matches(cn, hostname),
            _ => false,
        }
    }
}

/// GnuTLS's comparison of a certificate name with a hostname: ASCII case-insensitive, a `*`
/// matching part or all of one label (never a dot), and only in a name with at least two
/// dots after it (`*.example.org`, not `*.org`).
pub fn hostname_matches(pattern: &str, hostname: &str) -> bool {
    let p = pattern.as_bytes();
    let h = hostname.as_bytes();
    let common = p
        .iter()
        .zip(h)
        .take_while(|(a, b)| a.eq_ignore_ascii_case(b))
        .count();
    if common == p.len() && common == h.len() {
        return true;
    }
    let (p, h) = (&p[common..], &h[common..]);
    if p.first() != Some(&b'*') || p.iter().skip(1).any(|&c| c == b'*') {
        return false;
    }
    let rest = &p[1..];
    if rest.iter().filter(|&&c| c == b'.').count() < 2 {
        return false;
    }
    // The star eats characters of the hostname's current label, one at a time.
    let mut i = 0;
    loop {
        let tail = &h[i..];
        if tail.len() == rest.len() && tail.eq_ignore_ascii_case(rest) {
            return true;
        }
        match h.get(i) {
            None | Some(b'.') => return false,
            Some(_) => i += 1,
        }
    }
}

/// GnuTLS's short names for the attribute types it knows (and prints as text); other types
/// are printed as their dotted OID with a hex value.
fn attribute_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.6" => "C",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.3" => "CN",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.17" => "postalCode",
        "2.5.4.5" => "serialNumber",
        "2.5.4.4" => "surName",
        "2.5.4.42" => "givenName",
        "2.5.4.12" => "title",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "2.5.4.41" => "name",
        "2.5.4.15" => "businessCategory",
        "2.5.4.16" => "postalAddress",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

/// The subject (or any name) as `gnutls_x509_crt_get_dn` prints it.
pub fn gnutls_dn(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    for (i, rdn) in name.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type().to_id_string();
            let text = attribute_name(&oid)
                .and_then(|n| directory_string(atv.attr_value()).map(|v| (n, v)));
            match text {
                Some((n, v)) => {
                    out.push_str(n);
                    out.push('=');
                    escape_into(&v, &mut out);
                }
                None => {
                    out.push_str(&oid);
                    out.push_str("=#");
                    for b in der_of(atv.attr_value()) {
                        out.push_str(&format!("{b:02x}"));
                    }
                }
            }
        }
    }
    out
}

/// Decodes an X.500 string value as GnuTLS does before printing it; `None` for a type it
/// prints as hex.
fn directory_string(v: &x509_parser::der_parser::asn1_rs::Any<'_>) -> Option<String> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let data = v.data;
    let s = match v.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString
        | Tag::TeletexString => String::from_utf8(data.to_vec()).ok()?,
        Tag::BmpString => {
            if !data.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()?
        }
        _ => return None,
    };
    // GnuTLS refuses embedded NULs.
    if s.contains('\0') {
        return None;
    }
    Some(s)
}

/// RFC 4514 escapes as GnuTLS applies them.
fn escape_into(v: &str, out: &mut String) {
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The DER encoding (tag, length, contents) of a parsed value.
fn der_of(v: &x509_parser::der_parser::asn1_rs::Any<'_>) -> Vec<u8> {
    let tag = v.tag().0;
    let class = v.class() as u8;
    let constructed = if v.header.is_constructed() { 0x20 } else { 0 };
    let mut out = Vec::with_capacity(v.data.len() + 8);
    if tag < 31 {
        out.push((class << 6) | constructed | tag as u8);
    } else {
        out.push((class << 6) | constructed | 0x1f);
        let mut groups = Vec::new();
        let mut t = tag;
        loop {
            groups.push((t & 0x7f) as u8);
            t >>= 7;
            if t == 0 {
                break;
            }
        }
        for (i, g) in groups.iter().rev().enumerate() {
            out.push(if i + 1 < groups.len() { g | 0x80 } else { *g });
        }
    }
    let len = v.data.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(v.data);
    out
}

/// Which certificate a sanity check is about: it picks QEMU's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    /// The CA certificate(s) of `ca-cert.pem`.
    Ca,
    /// This side's certificate, on a server endpoint.
    Server,
    /// This side's certificate, on a client endpoint.
    Client,
}

/// QEMU's `sanity-check` of one certificate from `file` (times, basic constraints, key usage
/// and, for a non-CA certificate, key purpose), with QEMU's messages.
pub fn sanity_check(info: &CertInfo, file: &str, role: CertRole, now: i64) -> Result<(), String> {
    let is_ca = role == CertRole::Ca;
    let is_server = role == CertRole::Server;
    let who = match role {
        CertRole::Ca => "CA",
        CertRole::Server => "server",
        CertRole::Client => "client",
    };
    if info.not_after < now {
        return Err(format!("The {who} certificate {file} has expired"));
    }
    if info.not_before > now {
        return Err(format!("The {who} certificate {file} is not yet active"));
    }
    match info.basic_ca {
        Some(true) if !is_ca => {
            let need = if is_server { "server" } else { "client" };
            return Err(format!(
                "The certificate {file} basic constraints show a CA, but we need one for a {need}"
            ));
        }
        Some(false) if is_ca => {
            return Err(format!(
                "The certificate {file} basic constraints do not show a CA"
            ))
        }
        None if is_ca => {
            return Err(format!(
                "The certificate {file} is missing basic constraints for a CA"
            ))
        }
        _ => {}
    }
    if let Some((usage, critical)) = info.key_usage {
        if critical {
            if is_ca {
                if usage & KU_KEY_CERT_SIGN == 0 {
                    return Err(format!(
                        "Certificate {file} usage does not permit certificate signing"
                    ));
                }
            } else {
                if usage & KU_DIGITAL_SIGNATURE == 0 {
                    return Err(format!(
                        "Certificate {file} usage does not permit digital signature"
                    ));
                }
                if usage & KU_KEY_ENCIPHERMENT == 0 {
                    return Err(format!(
                        "Certificate {file} usage does not permit key encipherment"
                    ));
                }
            }
        }
    }
    if !is_ca {
        if let Some((server, client, critical)) = info.key_purpose {
            if critical && is_server && !server {
                return Err(format!(
                    "Certificate {file} purpose does not allow use with a TLS server"
                ));
            }
            if critical && !is_server && !client {
                return Err(format!(
                    "Certificate {file} purpose does not allow use with a TLS client"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_follow_gnutls() {
        assert!(hostname_matches("*.example.org", "foo.example.org"));
        assert!(hostname_matches("*.Example.ORG", "FOO.example.org"));
        assert!(!hostname_matches("*.example.org", "a.b.example.org"));
        assert!(!hostname_matches("*.example.org", "example.org"));
        assert!(!hostname_matches("*.org", "example.org"));
        assert!(hostname_matches("f*.example.org", "foo.example.org"));
        assert!(!hostname_matches("b*.example.org", "foo.example.org"));
        assert!(hostname_matches("host.test", "HOST.test"));
        assert!(!hostname_matches("host.test", "host.tes"));
        assert!(!hostname_matches("host.test", "host.test.evil"));
    }

    #[test]
    fn escapes_follow_rfc4514_as_gnutls() {
        let mut s = String::new();
        escape_into(" a,b+c\"d\\e<f>g;h ", &mut s);
        assert_eq!(s, "\\ a\\,b\\+c\\\"d\\\\e\\<f\\>g\\;h\\ ");
        let mut s = String::new();
        escape_into("#x#", &mut s);
        assert_eq!(s, "\\#x#");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(CertInfo::parse(b"").is_err());
        assert!(CertInfo::parse(&[0x30, 0x82, 0xff, 0xff, 0]).is_err());
    }
}
