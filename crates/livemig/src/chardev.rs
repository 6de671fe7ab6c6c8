//! QEMU's `-chardev socket,...`, `-mon chardev=ID,mode=control` and `-qtest CHARDEV`, as far as
//! livemig has uses for a character device: a QMP monitor, or the qtest protocol.
//!
//! A chardev is a socket: a unix path or a TCP host and port that livemig connects to (or, with
//! `server=on`, listens on), or an already connected socket the parent process passed down
//! (`fd=N`, as QEMU's Python test library does). Every chardev must be used by a `-mon` or by
//! `-qtest`; one that nothing uses is refused rather than connected and left alone. Other
//! backends (`stdio`, `pty`, `file`, ...) and other socket options are refused with QEMU's
//! wording.

use qmp::{split_options as split, QmpAddress, QmpOption};
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Where a chardev's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A socket livemig connects to or listens on.
    Socket(QmpOption),
    /// A connected socket inherited from the parent (`fd=N`).
    Fd(i32),
}

/// A parsed `-chardev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chardev {
    /// `id=`.
    pub id: String,
    /// The socket.
    pub endpoint: Endpoint,
}

fn parse_bool(opt: &str, k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("{opt}: Parameter '{k}' expects 'on' or 'off'")),
    }
}

/// Parses the socket options after the backend name (or after `unix:`), `implied` naming the
/// key of a leading bare value (`path` for `unix:PATH`).
fn parse_socket(opt: &str, parts: &[String], implied: Option<&str>) -> Result<Chardev, String> {
    let mut id = None;
    let mut path = None;
    let mut host = None;
    let mut port = None;
    let mut fd = None;
    let mut server = false;
    let mut wait = true;
    let mut wait_given = false;
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() {
            continue;
        }
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k, v),
            None if i == 0 && implied.is_some() => (implied.unwrap_or_default(), p.as_str()),
            // QemuOpts' shorthand: `server` is server=on, `nowait` is wait=off.
            None => match p.strip_prefix("no") {
                Some(n @ ("server" | "wait")) => (n, "off"),
                _ => (p.as_str(), "on"),
            },
        };
        match k {
            "id" => id = Some(v.to_string()),
            "path" => path = Some(v.to_string()),
            "host" => host = Some(v.to_string()),
            "port" => port = Some(v.to_string()),
            "fd" => fd = Some(v.to_string()),
            "server" => server = parse_bool(opt, k, v)?,
            "wait" => {
                wait = parse_bool(opt, k, v)?;
                wait_given = true;
            }
            _ => return Err(format!("{opt}: Invalid parameter '{k}'")),
        }
    }
    // QEMU's `qmp_chardev_validate_socket`: a connecting socket has nothing to wait for, and
    // `wait` of any value is refused rather than dropped.
    if wait_given && !server {
        return Err(format!(
            "{opt}: 'wait' option is incompatible with socket in client connect mode"
        ));
    }
    let id = id.unwrap_or_default();
    let endpoint = match (path, host, fd) {
        (Some(p), None, None) => {
            if p.is_empty() {
                return Err(format!("{opt}: unix socket path is empty"));
            }
            Endpoint::Socket(QmpOption {
                address: QmpAddress::Unix(PathBuf::from(p)),
                server,
                wait,
                nodelay: false,
            })
        }
        (None, Some(h), None) => {
            let Some(port) = port else {
                return Err(format!("{opt}: chardev: socket: no port given"));
            };
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{opt}: port '{port}' is not a number from 0 to 65535"))?;
            Endpoint::Socket(QmpOption {
                address: QmpAddress::Tcp { host: h, port },
                server,
                wait,
                nodelay: false,
            })
        }
        (None, None, Some(n)) => {
            if server {
                return Err(format!(
                    "{opt}: a chardev given as fd= is a connected socket here, not a listening one (server=off)"
                ));
            }
            let n: i32 =
                n.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                    format!("{opt}: Parameter 'fd' expects a file descriptor number")
                })?;
            Endpoint::Fd(n)
        }
        (None, None, None) => {
            return Err(format!("{opt}: chardev: socket: no host given"));
        }
        _ => {
            return Err(format!(
                "{opt}: chardev: socket: path=, host= and fd= exclude each other"
            ))
        }
    };
    Ok(Chardev { id, endpoint })
}

/// Parses `-chardev socket,id=ID,(path=P|host=H,port=N|fd=N)[,server=on|off][,wait=on|off]`.
pub fn parse_chardev(value: &str) -> Result<Chardev, String> {
    let opt = format!("-chardev {value}");
    let parts = split(value);
    let backend = parts.first().cloned().unwrap_or_default();
    let backend = backend.strip_prefix("backend=").unwrap_or(&backend);
    if backend != "socket" {
        return Err(format!(
            "{opt}: chardev backend '{backend}' is not supported (livemig's chardevs are sockets: -chardev socket,...)"
        ));
    }
    let c = parse_socket(&opt, parts.get(1..).unwrap_or_default(), None)?;
    if c.id.is_empty() {
        return Err(format!("{opt}: Parameter 'id' is missing"));
    }
    if !qmp::id_wellformed(&c.id) {
        return Err(format!("{opt}: Parameter 'id' expects an identifier"));
    }
    Ok(c)
}

/// Parses `-mon [chardev=]ID[,mode=control][,pretty=off]`: a QMP monitor on the chardev.
/// `mode=readline` (the human monitor on a chardev) is refused: livemig's HMP is reached through
/// QMP's `human-monitor-command`.
pub fn parse_mon(value: &str) -> Result<String, String> {
    let opt = format!("-mon {value}");
    let mut chardev = None;
    let mut control = false;
    for (i, p) in split(value).iter().enumerate() {
        let (k, v) = match p.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => ("chardev", p.as_str()),
            None => (p.as_str(), "on"),
        };
        match k {
            "chardev" => chardev = Some(v.to_string()),
            "mode" => match v {
                "control" => control = true,
                "readline" => {
                    return Err(format!(
                        "{opt}: a human monitor on a chardev is not supported: use mode=control, and human-monitor-command for HMP"
                    ))
                }
                _ => return Err(format!("{opt}: unknown monitor mode '{v}'")),
            },
            "pretty" => {
                if parse_bool(&opt, k, v)? {
                    return Err(format!(
                        "{opt}: pretty=on is not supported: livemig's QMP writes one line per message"
                    ));
                }
            }
            _ => return Err(format!("{opt}: Invalid parameter '{k}'")),
        }
    }
    let Some(chardev) = chardev else {
        return Err(format!("{opt}: Parameter 'chardev' is missing"));
    };
    if !control {
        return Err(format!(
            "{opt}: a human monitor on a chardev is not supported: use mode=control, and human-monitor-command for HMP"
        ));
    }
    Ok(chardev)
}

/// Parses `-qtest` as QEMU does: `chardev:ID`, or an inline `unix:[path=]PATH[,server=on...]`.
/// Returns the chardev (with an empty id when inline) or the id it names.
pub fn parse_qtest(value: &str) -> Result<Result<Chardev, String>, String> {
    let opt = format!("-qtest {value}");
    if let Some(id) = value.strip_prefix("chardev:") {
        return Ok(Err(id.to_string()));
    }
    if let Some(rest) = value.strip_prefix("unix:") {
        let parts = split(rest);
        return parse_socket(&opt, &parts, Some("path")).map(Ok);
    }
    Err(format!(
        "{opt}: the qtest chardev must be a unix socket here (unix:PATH or chardev:ID)"
    ))
}

/// The monitors and the qtest endpoint a command line asks for, with every chardev used
/// exactly once.
#[derive(Debug, Default)]
pub struct Wiring {
    /// QMP monitors (`-mon ...,mode=control` on a chardev).
    pub monitors: Vec<Endpoint>,
    /// The qtest protocol's socket.
    pub qtest: Option<Endpoint>,
}

/// Resolves `-chardev`, `-mon` and `-qtest` into [`Wiring`].
pub fn wire(chardevs: &[String], mons: &[String], qtest: Option<&str>) -> Result<Wiring, String> {
    let mut by_id: HashMap<String, Chardev> = HashMap::new();
    let mut order = Vec::new();
    for text in chardevs {
        let c = parse_chardev(text)?;
        if by_id.contains_key(&c.id) {
            return Err(format!(
                "-chardev {text}: attempt to add duplicate property '{}' to object (type 'container')",
                c.id
            ));
        }
        order.push((c.id.clone(), text));
        by_id.insert(c.id.clone(), c);
    }
    let mut take = |id: &str, user: &str| {
        by_id
            .remove(id)
            .ok_or_else(|| format!("{user}: chardev '{id}' not found (or already in use)"))
    };
    let mut w = Wiring::default();
    for m in mons {
        let id = parse_mon(m)?;
        w.monitors.push(take(&id, &format!("-mon {m}"))?.endpoint);
    }
    if let Some(q) = qtest {
        w.qtest = Some(match parse_qtest(q)? {
            Ok(inline) => inline.endpoint,
            Err(id) => take(&id, &format!("-qtest {q}"))?.endpoint,
        });
    }
    if let Some((_, text)) = order.iter().find(|(id, _)| by_id.contains_key(id)) {
        return Err(format!(
            "-chardev {text}: nothing uses this chardev (livemig's chardevs serve -mon and -qtest)"
        ));
    }
    Ok(w)
}

/// Connects (or listens, with `server=on`) for a qtest endpoint and returns the stream.
pub fn connect_qtest(e: &Endpoint) -> Result<UnixStream, String> {
    match e {
        Endpoint::Fd(fd) => crate::inherited_fd::adopt_socket(*fd),
        Endpoint::Socket(QmpOption {
            address: QmpAddress::Unix(path),
            server: false,
            ..
        }) => UnixStream::connect(path)
            .map_err(|e| format!("-qtest: Failed to connect to '{}': {e}", path.display())),
        Endpoint::Socket(_) => Err(
            "-qtest: the qtest chardev must be a unix socket livemig connects to (server=off)"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn what_qemus_python_library_passes() {
        let w = wire(
            &s(&["socket,id=mon,fd=7"]),
            &s(&["chardev=mon,mode=control"]),
            Some("unix:path=/tmp/q-qtest.sock"),
        )
        .unwrap();
        assert_eq!(w.monitors, vec![Endpoint::Fd(7)]);
        assert_eq!(
            w.qtest,
            Some(Endpoint::Socket(QmpOption {
                address: QmpAddress::Unix("/tmp/q-qtest.sock".into()),
                server: false,
                wait: true,
                nodelay: false
            }))
        );
        let w = wire(
            &s(&["socket,id=mon,path=/tmp/m.sock"]),
            &s(&["chardev=mon,mode=control"]),
            None,
        )
        .unwrap();
        assert!(matches!(&w.monitors[..], [Endpoint::Socket(o)] if !o.server));
    }

    #[test]
    fn what_livemig_cannot_do_is_refused() {
        let e = |c: &[&str], m: &[&str], q: Option<&str>| wire(&s(c), &s(m), q).unwrap_err();
        assert!(e(&["socket,id=x,path=/p"], &[], None).contains("nothing uses"));
        assert!(e(&["stdio,id=x"], &["x"], None).contains("'stdio' is not supported"));
        assert!(e(
            &["socket,id=x,path=/p,telnet=on"],
            &["x,mode=control"],
            None
        )
        .contains("Invalid parameter 'telnet'"));
        assert!(e(&["socket,id=x,path=/p"], &["x,mode=readline"], None).contains("human monitor"));
        assert!(e(&["socket,id=x,path=/p"], &["x"], None).contains("human monitor"));
        assert!(e(&["socket,id=x,path=/p"], &["y,mode=control"], None).contains("'y' not found"));
        assert!(e(&[], &[], Some("tcp:1:2")).contains("unix socket"));
        assert!(e(&["socket,path=/p"], &[], None).contains("'id' is missing"));
    }
}
