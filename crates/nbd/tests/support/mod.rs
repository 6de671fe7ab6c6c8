//! What the NBD tests share: a raw image node to export, our server started on it (plain or
//! with TLS) with the image exported as `disk`, the run of a QEMU tool, an `nbd` node, and our
//! driver's round trip through `qemu-nbd` with TLS. Each test binary uses part of it.
#![allow(dead_code)]

use block::{BlockLayer, BlockNode};
use nbd::{ExportConfig, NbdServer, SocketAddress};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The size of every exported image.
pub const SIZE: u64 = 4 << 20;

/// A block layer with node `d0`: a raw image of [`SIZE`] zeroes at `img`.
pub fn raw_node(img: &Path) -> Arc<BlockLayer> {
    std::fs::write(img, vec![0u8; SIZE as usize]).unwrap();
    let l = Arc::new(BlockLayer::new());
    l.blockdev_add(&json!({"driver": "raw", "node-name": "d0",
        "file": {"driver": "file", "filename": img.to_str().unwrap()}}))
        .unwrap();
    l
}

/// Exports node `d0` of `l` as `disk`.
pub fn export(server: &NbdServer, l: &BlockLayer, writable: bool, bitmap: Option<&str>) {
    server
        .add(
            l.node("d0").unwrap(),
            ExportConfig {
                id: "disk".into(),
                name: "disk".into(),
                description: None,
                writable,
                bitmap: bitmap.map(str::to_string),
                bitmap_node: None,
            },
        )
        .unwrap();
}

/// 127.0.0.1, any port.
pub fn any_port() -> SocketAddress {
    SocketAddress::Inet {
        host: "127.0.0.1".into(),
        port: "0".into(),
    }
}

/// Our server on an ephemeral port of 127.0.0.1 with TLS credentials `tls` (or none) and
/// `authz`, exporting a fresh raw image at `img` writable as `disk`: the server, its port
/// and the image's layer.
pub fn tls_server(
    img: &Path,
    objects: &Arc<tls::Objects>,
    tls: Option<&str>,
    authz: Option<&str>,
) -> (NbdServer, u16, Arc<BlockLayer>) {
    let l = raw_node(img);
    let server = NbdServer::new();
    server.set_tls_objects(objects.clone());
    server.start_with_tls(&any_port(), 0, tls, authz).unwrap();
    let port = match server.address() {
        Some(SocketAddress::Inet { port, .. }) => port.parse().unwrap(),
        other => panic!("{other:?}"),
    };
    export(&server, &l, true, None);
    (server, port, l)
}

/// Runs a QEMU tool: whether it exited with success, and all it printed.
pub fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `blockdev-add` of an `nbd` node `name` for export `disk` at 127.0.0.1:`port`, with the
/// members of `extra` (`tls-creds`, `tls-hostname`, ...); its error as text.
pub fn nbd_node(
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

/// A child process that is killed and reaped when the test lets go of it.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port of 127.0.0.1 free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Our `nbd` driver, registered with `objects` (which hold client credentials `cli`),
/// against `qemu-nbd` serving a fresh `format` image of [`SIZE`] as `disk` with the server
/// credentials `creds` (an `--object` value with id `t0`): node `q0` with `tls-creds` `cli`
/// sees the size, writes 4 KiB of `byte` at 64 KiB and reads them back; `refusals` then
/// tries, on the same server, what must fail. Once the node and `qemu-nbd` are gone,
/// `qemu-io` reads the bytes from the image.
pub fn against_qemu_nbd(
    dir: &Path,
    format: &str,
    creds: &str,
    objects: Arc<tls::Objects>,
    byte: u8,
    refusals: impl FnOnce(&BlockLayer, u16),
) {
    let img = dir.join(format!("q.{format}"));
    let img_s = img.to_str().unwrap();
    let (ok, text) = tool(
        "qemu-img",
        &["create", "-q", "-f", format, img_s, &SIZE.to_string()],
    );
    assert!(ok, "{text}");
    let port = free_port();
    let child = Command::new("qemu-nbd")
        .args([
            "--object",
            creds,
            "--tls-creds",
            "t0",
            "-f",
            format,
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--persistent",
            "--shared=4",
            img_s,
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

    nbd::register_driver(objects);
    let layer = BlockLayer::new();
    let n = nbd_node(&layer, "q0", port, json!({"tls-creds": "cli"})).unwrap();
    assert_eq!(n.size().unwrap(), SIZE);
    n.write_at(65536, &[byte; 4096]).unwrap();
    n.flush().unwrap();
    let mut back = vec![0u8; 4096];
    n.read_at(65536, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == byte));
    refusals(&layer, port);
    drop(n);
    layer.blockdev_del("q0").unwrap();
    drop(qemu_nbd);

    // What the node wrote is in the image, as QEMU reads it.
    let read = format!("read -P {byte:#x} 64k 4k");
    let (ok, text) = tool("qemu-io", &["-f", format, "-c", &read, img_s]);
    assert!(
        ok && !text.contains("Pattern verification failed"),
        "{text}"
    );
}
