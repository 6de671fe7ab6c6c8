//! The value of QEMU's `-qmp` option, so a program can take the same command line as QEMU:
//! `unix:PATH,server=on,wait=off`, the older `unix:PATH,server,nowait`, and
//! `tcp:HOST:PORT,server=on,wait=off`.
//!
//! As in QEMU, `server` defaults to off (connect to a listening client), `wait` defaults to on
//! (with `server=on`, block until the first client connects), a comma inside a path is written
//! `,,`, an IPv6 host is written in brackets (`tcp:[::1]:4444`), and an empty host listens on
//! every address.

use std::path::PathBuf;
use std::str::FromStr;

/// Where the monitor lives: a unix path or a TCP host and port (an empty host means every
/// address when listening, localhost when connecting).
pub use net::Address as QmpAddress;

/// A parsed `-qmp` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpOption {
    /// The socket.
    pub address: QmpAddress,
    /// Listen (`server=on`) rather than connect.
    pub server: bool,
    /// With `server`, wait for the first client before going on.
    pub wait: bool,
    /// QEMU's `nodelay`. Accepted for compatibility; the server always sets `TCP_NODELAY`, since
    /// it writes whole messages.
    pub nodelay: bool,
}

/// Why a `-qmp` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpOptionError {
    /// Neither `unix:` nor `tcp:`.
    #[error("'{0}' is not a supported QMP address: use unix:PATH or tcp:HOST:PORT")]
    UnknownBackend(String),
    /// `unix:` with nothing after it.
    #[error("unix socket path is empty")]
    EmptyPath,
    /// `tcp:` without `:PORT`.
    #[error("'{0}' lacks a port (tcp:HOST:PORT)")]
    MissingPort(String),
    /// A port that is not a number from 0 to 65535.
    #[error("port '{0}' is not a number from 0 to 65535")]
    BadPort(String),
    /// An option this implementation does not know (QEMU's wording).
    #[error("Invalid parameter '{0}'")]
    UnknownParameter(String),
    /// A boolean option with a value other than on/off (QEMU's wording).
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    BadBool(String),
    /// `wait` given to a connecting socket, where it has nothing to wait for (QEMU's
    /// `qmp_chardev_validate_socket` refuses it, whatever its value).
    #[error("'wait' option is incompatible with socket in client connect mode")]
    WaitInClientMode,
    /// Both spellings of the same option (QEMU's `qemu_chr_parse_socket`).
    #[error("'delay' and 'nodelay' are mutually exclusive")]
    DelayAndNodelay,
}

/// Splits a value in QEMU's option syntax at single commas; `,,` stands for a literal comma.
/// Every option of this syntax (`-qmp`, `-chardev`, `-mon`, ...) is split by this function.
pub fn split_options(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = parts.last_mut() {
                    last.push(',');
                }
            } else {
                parts.push(String::new());
            }
        } else if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

fn parse_bool(name: &str, value: &str) -> Result<bool, QmpOptionError> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(QmpOptionError::BadBool(name.to_string())),
    }
}

impl FromStr for QmpOption {
    type Err = QmpOptionError;

    fn from_str(s: &str) -> Result<QmpOption, QmpOptionError> {
        let mut parts = split_options(s).into_iter();
        let addr = parts.next().unwrap_or_default();
        let address = if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(QmpOptionError::EmptyPath);
            }
            QmpAddress::Unix(PathBuf::from(path))
        } else if let Some(hp) = addr.strip_prefix("tcp:") {
            let (host, port) = hp
                .rsplit_once(':')
                .ok_or_else(|| QmpOptionError::MissingPort(addr.clone()))?;
            let port: u16 = port
                .parse()
                .map_err(|_| QmpOptionError::BadPort(port.to_string()))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            QmpAddress::Tcp {
                host: host.to_string(),
                port,
            }
        } else {
            return Err(QmpOptionError::UnknownBackend(addr));
        };
        let mut opt = QmpOption {
            address,
            server: false,
            wait: true,
            nodelay: false,
        };
        let (mut wait_given, mut delay_given, mut nodelay_given) = (false, false, false);
        for part in parts {
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (n.to_string(), parse_bool(n, v)?),
                // QemuOpts' shorthand: `flag` is flag=on, `noflag` is flag=off.
                None => match part.strip_prefix("no") {
                    Some(n) if matches!(n, "server" | "wait" | "delay") => (n.to_string(), false),
                    _ => (part.clone(), true),
                },
            };
            match name.as_str() {
                "server" => opt.server = value,
                "wait" => {
                    opt.wait = value;
                    wait_given = true;
                }
                "nodelay" => {
                    opt.nodelay = value;
                    nodelay_given = true;
                }
                // `nodelay` spelled as the negation of `delay`.
                "delay" => {
                    opt.nodelay = !value;
                    delay_given = true;
                }
                _ => return Err(QmpOptionError::UnknownParameter(name)),
            }
        }
        if delay_given && nodelay_given {
            return Err(QmpOptionError::DelayAndNodelay);
        }
        if wait_given && !opt.server {
            return Err(QmpOptionError::WaitInClientMode);
        }
        Ok(opt)
    }
}

impl QmpOption {
    /// Parses a `-qmp` value.
    pub fn parse(s: &str) -> Result<QmpOption, QmpOptionError> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_forms() {
        let o = QmpOption::parse("unix:/tmp/a,,b.sock,server=on,wait=off").unwrap();
        assert_eq!(o.address, QmpAddress::Unix("/tmp/a,b.sock".into()));
        assert!(o.server && !o.wait);
        let o = QmpOption::parse("unix:/tmp/q.sock,server,nowait").unwrap();
        assert!(o.server && !o.wait);
        let o = QmpOption::parse("unix:/tmp/q.sock").unwrap();
        assert!(!o.server && o.wait);
        let o = QmpOption::parse("tcp:127.0.0.1:4444,server=on,wait=off,nodelay=on").unwrap();
        assert_eq!(
            o.address,
            QmpAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert!(o.server && !o.wait && o.nodelay);
        let o = QmpOption::parse("tcp:[::1]:0,server").unwrap();
        assert_eq!(
            o.address,
            QmpAddress::Tcp {
                host: "::1".into(),
                port: 0
            }
        );
        let o = QmpOption::parse("tcp::4444,server=yes,wait=no").unwrap();
        assert_eq!(
            o.address,
            QmpAddress::Tcp {
                host: String::new(),
                port: 4444
            }
        );
        assert!(o.server && !o.wait);
    }

    #[test]
    fn refusals() {
        use QmpOptionError::*;
        assert_eq!(
            QmpOption::parse("stdio"),
            Err(UnknownBackend("stdio".into()))
        );
        assert_eq!(QmpOption::parse("unix:"), Err(EmptyPath));
        assert_eq!(
            QmpOption::parse("tcp:host"),
            Err(MissingPort("tcp:host".into()))
        );
        assert_eq!(
            QmpOption::parse("tcp:host:99999"),
            Err(BadPort("99999".into()))
        );
        assert_eq!(
            QmpOption::parse("unix:/x,bogus=on"),
            Err(UnknownParameter("bogus".into()))
        );
        assert_eq!(
            QmpOption::parse("unix:/x,server=maybe"),
            Err(BadBool("server".into()))
        );
        // QEMU refuses these rather than take one and drop the other.
        for v in [
            "unix:/x,wait=off",
            "unix:/x,server=off,wait=on",
            "tcp:h:1,nowait",
        ] {
            assert_eq!(QmpOption::parse(v), Err(WaitInClientMode), "{v}");
        }
        assert_eq!(
            QmpOption::parse("unix:/x,server=on,wait=off,delay=on,nodelay=on"),
            Err(DelayAndNodelay)
        );
        assert_eq!(
            QmpOption::parse("unix:/x,server=maybe")
                .unwrap_err()
                .to_string(),
            "Parameter 'server' expects 'on' or 'off'"
        );
    }
}
