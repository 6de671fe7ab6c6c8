//! What the NBD tests share: a raw image node to export, our server started on it (plain or
//! with TLS) with the image exported as `disk`, and the run of a QEMU tool. Each test binary
//! uses part of it.
#![allow(dead_code)]

use block::BlockLayer;
use nbd::{ExportConfig, NbdServer, SocketAddress};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

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
