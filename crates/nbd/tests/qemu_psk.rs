//! NBD over TLS with pre-shared keys (`tls-creds-psk`) against QEMU 7.2's tools, both ways:
//!
//! * our server (`tls-creds` naming PSK server credentials, `tls-authz` on the username)
//!   with `qemu-io` as the client: data both ways inside TLS; a wrong key, and a username
//!   the authz object denies, get nothing;
//! * our `nbd` block driver with PSK client credentials against `qemu-nbd --tls-creds`: data
//!   both ways, as QEMU reads the image afterwards; a wrong key fails the open clearly.

use block::{BlockLayer, BlockNode};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::{tls_server, tool};

const KEY: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const WRONG: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f91";

/// `dir/sub/keys.psk` with `lines`; returns the directory.
fn keys(dir: &Path, sub: &str, lines: &str) -> String {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("keys.psk"), lines).unwrap();
    d.display().to_string()
}

/// `qemu-io` on our export with PSK client credentials from `dir` as `username`.
fn qemu_io(dir: &str, username: Option<&str>, port: u16, cmds: &[&str]) -> (bool, String) {
    let mut object = format!("tls-creds-psk,id=t0,endpoint=client,dir={dir}");
    if let Some(u) = username {
        object.push_str(&format!(",username={u}"));
    }
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,\
         tls-creds=t0"
    );
    let mut args = vec!["--object".to_string(), object, "--image-opts".into(), opts];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = tool("qemu-io", &args);
    (ok && !text.contains("failed"), text)
}

#[test]
fn qemu_io_over_psk_to_our_server() {
    if !testkit::require(
        "qemu_io_over_psk_to_our_server",
        testkit::programs(&["qemu-io"]),
    ) {
        return;
    }
    let tmp = testkit::tempdir();
    let dir = tmp.path();
    let srv = keys(dir, "srv", &format!("qemu:{KEY}\nguest:{KEY}\n"));
    let cli = keys(dir, "cli", &format!("qemu:{KEY}\nguest:{KEY}\n"));
    let bad = keys(dir, "bad", &format!("qemu:{WRONG}\n"));
    let objects = Arc::new(tls::Objects::new());
    objects
        .object_add_cmdline(&format!("tls-creds-psk,id=srv,endpoint=server,dir={srv}"))
        .unwrap();
    objects
        .object_add_cmdline("authz-simple,id=auth0,identity=qemu")
        .unwrap();
    let img = dir.join("disk.img");
    let (server, port, _layer) = tls_server(&img, &objects, Some("srv"), Some("auth0"));

    let (ok, text) = qemu_io(
        &cli,
        None,
        port,
        &["write -P 0x3c 64k 8k", "read -P 0x3c 64k 8k"],
    );
    assert!(ok, "{text}");
    let data = std::fs::read(&img).unwrap();
    assert!(data[64 << 10..72 << 10].iter().all(|&b| b == 0x3c));

    // A wrong key: the handshake fails, nothing is read.
    let (ok, text) = qemu_io(&bad, None, port, &["read -P 0x3c 64k 8k"]);
    assert!(!ok, "{text}");
    assert!(text.contains("TLS handshake failed"), "{text}");

    // The right key under a username the authz object does not allow.
    let (ok, text) = qemu_io(&cli, Some("guest"), port, &["read -P 0x3c 64k 8k"]);
    assert!(!ok, "{text}");
    assert!(text.contains("TLS handshake failed"), "{text}");
    server.stop().unwrap();
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbd_node(
    layer: &BlockLayer,
    name: &str,
    port: u16,
    extra: Value,
) -> Result<Arc<BlockNode>, String> {
    let mut o = json!({"driver": "nbd", "node-name": name, "export": "disk",
        "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}});
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    layer.blockdev_add(&o).map_err(|e| e.to_string())
}

#[test]
fn nbd_driver_over_psk_to_qemu_nbd() {
    if !testkit::require(
        "nbd_driver_over_psk_to_qemu_nbd",
        testkit::programs(&["qemu-nbd", "qemu-img", "qemu-io"]),
    ) {
        return;
    }
    let tmp = testkit::tempdir();
    let dir = tmp.path();
    let srv = keys(dir, "srv", &format!("qemu:{KEY}\n"));
    let cli = keys(dir, "cli", &format!("qemu:{KEY}\n"));
    let bad = keys(dir, "bad", &format!("qemu:{WRONG}\n"));
    let img = dir.join("q.raw");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw", img.to_str().unwrap(), "4M"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("qemu-nbd")
        .args([
            "--object",
            &format!("tls-creds-psk,id=t0,endpoint=server,dir={srv}"),
            "--tls-creds",
            "t0",
            "-f",
            "raw",
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--persistent",
            "--shared=4",
            img.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let qemu_nbd = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }

    let objects = Arc::new(tls::Objects::new());
    objects
        .object_add_cmdline(&format!("tls-creds-psk,id=cli,endpoint=client,dir={cli}"))
        .unwrap();
    objects
        .object_add_cmdline(&format!("tls-creds-psk,id=bad,endpoint=client,dir={bad}"))
        .unwrap();
    nbd::register_driver(objects);
    let layer = BlockLayer::new();
    let n = nbd_node(&layer, "q0", port, json!({"tls-creds": "cli"})).unwrap();
    assert_eq!(n.size().unwrap(), 4 << 20);
    n.write_at(65536, &[0x96; 4096]).unwrap();
    n.flush().unwrap();
    let mut back = vec![0u8; 4096];
    n.read_at(65536, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x96));

    let e = nbd_node(&layer, "q1", port, json!({"tls-creds": "bad"})).unwrap_err();
    assert!(
        e.contains("TLS handshake failed: the peer closed the connection during the handshake: it refused this side's pre-shared key"),
        "{e}"
    );
    drop(n);
    layer.blockdev_del("q0").unwrap();
    drop(qemu_nbd);

    // What the node wrote is in the image, as QEMU reads it.
    let (ok, text) = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x96 64k 4k",
            img.to_str().unwrap(),
        ],
    );
    assert!(
        ok && !text.contains("Pattern verification failed"),
        "{text}"
    );
}
