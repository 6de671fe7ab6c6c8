//! Our client against our server, over unix and TCP sockets: data commands, block status of
//! both meta contexts, QEMU's error codes, negotiation errors, export removal, and a server
//! that survives hostile clients.

use block::BlockLayer;
use nbd::client::{ConnectOptions, NbdClient};
use nbd::proto::{self, opt, rep};
use nbd::{ExportConfig, NbdServer, SocketAddress};
use nix::errno::Errno;
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 4 << 20;

fn layer_with_file(dir: &Path) -> Arc<BlockLayer> {
    let img = dir.join("disk.img");
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    std::fs::write(&img, &data).unwrap();
    let l = Arc::new(BlockLayer::new());
    l.blockdev_add(&json!({"driver": "raw", "node-name": "d0",
        "file": {"driver": "file", "filename": img.to_str().unwrap()}}))
        .unwrap();
    l
}

fn export(server: &NbdServer, l: &BlockLayer, name: &str, writable: bool, bitmap: Option<&str>) {
    server
        .add(
            l.node("d0").unwrap(),
            ExportConfig {
                id: name.into(),
                name: name.into(),
                description: Some("test disk".into()),
                writable,
                bitmap: bitmap.map(str::to_string),
                bitmap_node: None,
            },
        )
        .unwrap();
}

/// Our server listening on `dir/nbd.sock`: the socket's path and the server.
fn unix_server(dir: &Path) -> (PathBuf, NbdServer) {
    let sock = dir.join("nbd.sock");
    let server = NbdServer::new();
    server.start(&SocketAddress::Unix(sock.clone()), 0).unwrap();
    (sock, server)
}

fn connect(addr: &SocketAddress, export: &str, ctx: Option<&str>) -> NbdClient {
    NbdClient::connect(
        addr,
        &ConnectOptions {
            export: export.into(),
            meta_context: ctx.map(str::to_string),
            tls: None,
        },
    )
    .unwrap()
}

#[test]
fn read_write_zero_trim_flush_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let l = layer_with_file(dir.path());
    for addr in [
        SocketAddress::Unix(dir.path().join("nbd.sock")),
        SocketAddress::Inet {
            host: "127.0.0.1".into(),
            port: "0".into(),
        },
    ] {
        let server = NbdServer::new();
        server.start(&addr, 0).unwrap();
        let addr = server.address().unwrap();
        export(&server, &l, "disk", true, None);
        let mut c = connect(&addr, "disk", None);
        assert_eq!(c.size(), SIZE);
        assert!(c.structured());
        let mut buf = vec![0u8; 8192];
        c.read_at(200_000, &mut buf).unwrap();
        assert!(buf
            .iter()
            .enumerate()
            .all(|(i, b)| *b == ((200_000 + i) % 253) as u8));
        c.write_at(4096, b"hello nbd").unwrap();
        c.write_zeroes(65536, 65536, false).unwrap();
        c.flush_export().unwrap();
        let mut got = vec![0u8; 9];
        c.read_at(4096, &mut got).unwrap();
        assert_eq!(&got, b"hello nbd");
        let mut z = vec![1u8; 65536];
        c.read_at(65536, &mut z).unwrap();
        assert!(z.iter().all(|b| *b == 0));
        // The write reached the node itself.
        let mut direct = vec![0u8; 9];
        l.node("d0").unwrap().read_at(4096, &mut direct).unwrap();
        assert_eq!(&direct, b"hello nbd");
        // Past the end: EINVAL for reads, ENOSPC for writes (QEMU's choices).
        assert_eq!(
            c.read_at(SIZE - 1, &mut [0u8; 2]).unwrap_err(),
            block::BlockError::Io(Errno::EIO),
            "the client refuses before sending"
        );
        c.trim(0, 4096).unwrap();
        c.disconnect();
        server.stop().unwrap();
        assert!(!server.is_running());
    }
}

/// A raw request over a fresh connection negotiated with structured replies, returning the
/// error field of the reply.
fn raw_request_error(
    addr: &Path,
    export: &str,
    kind: u16,
    flags: u16,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> u32 {
    let mut s = UnixStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    // Simple replies: GO directly.
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&proto::option_header(opt::GO, d.len() as u32))
        .unwrap();
    s.write_all(&d).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).unwrap();
        if kind == rep::ACK {
            break;
        }
        assert_eq!(kind, rep::INFO);
    }
    s.write_all(
        &proto::Request {
            flags,
            kind,
            handle: 77,
            offset,
            len,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(payload).unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        u32::from_be_bytes(r[0..4].try_into().unwrap()),
        proto::SIMPLE_REPLY_MAGIC
    );
    assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 77);
    u32::from_be_bytes(r[4..8].try_into().unwrap())
}

#[test]
fn error_codes_are_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let l = layer_with_file(dir.path());
    let (sock, server) = unix_server(dir.path());
    export(&server, &l, "rw", true, None);
    server
        .add(
            l.node("d0").unwrap(),
            ExportConfig {
                id: "ro".into(),
                name: "ro".into(),
                description: None,
                writable: false,
                bitmap: None,
                bitmap_node: None,
            },
        )
        .unwrap();
    use proto::{cmd, err};
    assert_eq!(
        raw_request_error(&sock, "rw", cmd::READ, 0, SIZE, 1, &[]),
        err::EINVAL
    );
    assert_eq!(
        raw_request_error(&sock, "rw", cmd::WRITE, 0, SIZE - 1, 2, &[1, 2]),
        err::ENOSPC
    );
    assert_eq!(
        raw_request_error(&sock, "rw", cmd::WRITE_ZEROES, 0, u64::MAX - 10, 100, &[]),
        err::EINVAL
    );
    assert_eq!(
        raw_request_error(&sock, "ro", cmd::WRITE, 0, 0, 2, &[1, 2]),
        err::EPERM
    );
    assert_eq!(
        raw_request_error(&sock, "rw", cmd::READ, 0x8000, 0, 512, &[]),
        err::EINVAL
    );
    assert_eq!(
        raw_request_error(&sock, "rw", 99, 0, 0, 512, &[]),
        err::EINVAL
    );
    assert_eq!(
        raw_request_error(
            &sock,
            "rw",
            cmd::READ,
            0,
            0,
            proto::MAX_BUFFER_SIZE + 1,
            &[]
        ),
        err::EINVAL
    );
    // BLOCK_STATUS without a negotiated context.
    assert_eq!(
        raw_request_error(&sock, "rw", cmd::BLOCK_STATUS, 0, 0, 512, &[]),
        err::EINVAL
    );
    assert_eq!(raw_request_error(&sock, "rw", cmd::FLUSH, 0, 0, 0, &[]), 0);
    // QEMU 7.2 checks the range of every command, FLUSH's too (found by the nbd_server fuzz
    // target: a FLUSH at 2 GiB was answered with success).
    assert_eq!(
        raw_request_error(&sock, "rw", cmd::FLUSH, 0, 1 << 31, 0, &[]),
        err::EINVAL
    );
    assert_eq!(
        raw_request_error(&sock, "ro", cmd::FLUSH, 0, SIZE, 1, &[]),
        err::EINVAL
    );
    server.stop().unwrap();
}

/// A write longer than the largest buffer is refused and, its payload left unread, the client
/// is disconnected after the reply, as QEMU 7.2's nbd_trip does ("Request handling failed in
/// intermediate state"), instead of the server reading up to 4 GiB it will throw away.
#[test]
fn an_oversized_write_is_refused_then_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let l = layer_with_file(dir.path());
    let (sock, server) = unix_server(dir.path());
    export(&server, &l, "rw", true, None);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&proto::option_header(opt::EXPORT_NAME, 2))
        .unwrap();
    s.write_all(b"rw").unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    let req = proto::Request {
        flags: 0,
        kind: proto::cmd::WRITE,
        handle: 5,
        offset: 0,
        len: proto::MAX_BUFFER_SIZE + 1,
    };
    s.write_all(&req.encode()).unwrap();
    s.write_all(&[0u8; 4096]).unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        proto::err::EINVAL
    );
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes after the refusal", rest.len());
    server.stop().unwrap();
}

#[test]
fn dirty_bitmap_and_allocation_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let l = layer_with_file(dir.path());
    l.block_dirty_bitmap_add("d0", "b0", Some(65536), None, None)
        .unwrap();
    let node = l.node("d0").unwrap();
    node.write_at(0, &[1u8; 10]).unwrap();
    node.write_at(3 * 65536 + 5, &[1u8; 70000]).unwrap();
    let (sock, server) = unix_server(dir.path());
    // Read-only export of an enabled bitmap: refused, as QEMU refuses it.
    let e = server
        .add(
            node.clone(),
            ExportConfig {
                id: "x".into(),
                name: "x".into(),
                description: None,
                writable: false,
                bitmap: Some("b0".into()),
                bitmap_node: None,
            },
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Enabled bitmap 'b0' incompatible with readonly export"
    );
    l.block_dirty_bitmap_disable("d0", "b0").unwrap();
    export(&server, &l, "disk", false, Some("b0"));
    // The exported bitmap is busy.
    assert_eq!(
        l.block_dirty_bitmap_remove("d0", "b0")
            .unwrap_err()
            .to_string(),
        "Bitmap 'b0' is currently in use by another operation and cannot be used"
    );
    let addr = SocketAddress::Unix(sock);
    let mut c = connect(&addr, "disk", Some("qemu:dirty-bitmap:b0"));
    let ext = c.block_status(0, SIZE as u32).unwrap();
    let flat: Vec<(u32, u32)> = ext.iter().map(|e| (e.len, e.flags)).collect();
    assert_eq!(
        flat,
        vec![
            (65536, 1),
            (2 * 65536, 0),
            (2 * 65536, 1),
            (SIZE as u32 - 5 * 65536, 0)
        ]
    );
    let mut c2 = connect(&addr, "disk", Some("base:allocation"));
    let ext = c2.block_status(4096, 8192).unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!((ext[0].len, ext[0].flags), (8192, 0));
    // An unknown context is not selected.
    let e = NbdClient::connect(
        &addr,
        &ConnectOptions {
            export: "disk".into(),
            meta_context: Some("qemu:dirty-bitmap:nope".into()),
            tls: None,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    // Safe removal refuses while clients are connected; hard removal disconnects them.
    assert_eq!(
        server.remove("disk", false).unwrap_err().to_string(),
        "export 'disk' still in use"
    );
    server.remove("disk", true).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(c.read_at(0, &mut [0u8; 512]).is_err());
    // The bitmap is free again.
    l.block_dirty_bitmap_remove("d0", "b0").unwrap();
    server.stop().unwrap();
}

/// `bitmaps: [{"node": N, "name": B}]`: the export serves another node's bitmap — enabled,
/// on a read-only export, as QEMU allows for that form — and frees it when removed.
#[test]
fn bitmap_of_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let l = layer_with_file(dir.path());
    l.blockdev_add(&json!({"driver": "null-co", "node-name": "other", "size": SIZE}))
        .unwrap();
    l.block_dirty_bitmap_add("other", "ob", Some(65536), None, None)
        .unwrap();
    let other = l.node("other").unwrap();
    other.write_at(2 * 65536, &[1u8; 512]).unwrap();
    // The exported node's own writes do not show in another node's bitmap.
    l.node("d0").unwrap().write_at(0, &[1u8; 512]).unwrap();
    let (sock, server) = unix_server(dir.path());
    let config = ExportConfig {
        id: "disk".into(),
        name: "disk".into(),
        description: None,
        writable: false,
        bitmap: Some("nope".into()),
        bitmap_node: Some(other.clone()),
    };
    assert_eq!(
        server
            .add(l.node("d0").unwrap(), config.clone())
            .unwrap_err()
            .to_string(),
        "Dirty bitmap 'nope' not found"
    );
    server
        .add(
            l.node("d0").unwrap(),
            ExportConfig {
                bitmap: Some("ob".into()),
                ..config
            },
        )
        .unwrap();
    assert!(
        l.block_dirty_bitmap_remove("other", "ob").is_err(),
        "busy while exported"
    );
    let addr = SocketAddress::Unix(sock);
    let mut c = connect(&addr, "disk", Some("qemu:dirty-bitmap:ob"));
    let flat: Vec<(u32, u32)> = c
        .block_status(0, SIZE as u32)
        .unwrap()
        .iter()
        .map(|e| (e.len, e.flags))
        .collect();
    assert_eq!(
        flat,
        vec![(2 * 65536, 0), (65536, 1), (SIZE as u32 - 3 * 65536, 0)]
    );
    drop(c);
    server.remove("disk", true).unwrap();
    l.block_dirty_bitmap_remove("other", "ob").unwrap();
    server.stop().unwrap();
}

#[test]
fn negotiation_errors_and_listing() {
    let dir = tempfile::tempdir().unwrap();
    let l = layer_with_file(dir.path());
    let (sock, server) = unix_server(dir.path());
    export(&server, &l, "disk", true, None);
    let e = NbdClient::connect(
        &SocketAddress::Unix(sock.clone()),
        &ConnectOptions {
            export: "nope".into(),
            meta_context: None,
            tls: None,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("export 'nope' not present"), "{e}");

    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[0..8], b"NBDMAGIC");
    assert_eq!(&greet[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([greet[16], greet[17]]), 3);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let reply = |s: &mut UnixStream, o: u32, data: &[u8]| -> Vec<(u32, Vec<u8>)> {
        s.write_all(&proto::option_header(o, data.len() as u32))
            .unwrap();
        s.write_all(data).unwrap();
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            assert_eq!(
                u64::from_be_bytes(h[0..8].try_into().unwrap()),
                proto::REP_MAGIC
            );
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body).unwrap();
            let last = kind == rep::ACK || rep::is_err(kind);
            out.push((kind, body));
            if last {
                return out;
            }
        }
    };
    let r = reply(&mut s, opt::LIST, &[]);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, rep::SERVER);
    assert_eq!(&r[0].1[4..8], b"disk");
    assert_eq!(&r[0].1[8..], b"test disk");
    let r = reply(&mut s, opt::LIST, &[1]);
    assert_eq!(r[0].0, rep::ERR_INVALID);
    assert_eq!(r[0].1, b"option 'list' has unexpected length");
    let r = reply(&mut s, 77, &[1, 2, 3]);
    assert_eq!(r[0].0, rep::ERR_UNSUP);
    assert_eq!(r[0].1, b"Unsupported option 77 (<unknown>)");
    let r = reply(&mut s, opt::SET_META_CONTEXT, &[]);
    assert_eq!(r[0].0, rep::ERR_INVALID);
    let r = reply(&mut s, opt::STRUCTURED_REPLY, &[]);
    assert_eq!(r[0].0, rep::ACK);
    let r = reply(&mut s, opt::STRUCTURED_REPLY, &[]);
    assert_eq!(r[0].1, b"structured reply already negotiated");
    // Truncated meta context request.
    let r = reply(&mut s, opt::LIST_META_CONTEXT, &[0, 0, 0, 9, b'd']);
    assert_eq!(r[0].0, rep::ERR_INVALID);
    // Listing every context of the export.
    let mut q = 4u32.to_be_bytes().to_vec();
    q.extend_from_slice(b"disk");
    q.extend_from_slice(&0u32.to_be_bytes());
    let r = reply(&mut s, opt::LIST_META_CONTEXT, &q);
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].1[4..], b"base:allocation");
    let r = reply(&mut s, opt::ABORT, &[]);
    assert_eq!(r[0].0, rep::ACK);
    server.stop().unwrap();
}

#[test]
fn hostile_clients_do_not_hurt_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let l = layer_with_file(dir.path());
    let (sock, server) = unix_server(dir.path());
    export(&server, &l, "disk", true, None);
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        vec![0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef],
        // Fixed newstyle, then an option with a huge announced length.
        [
            1u32.to_be_bytes().to_vec(),
            proto::option_header(opt::GO, u32::MAX).to_vec(),
        ]
        .concat(),
        // GO whose name length points past the payload.
        [
            1u32.to_be_bytes().to_vec(),
            proto::option_header(opt::GO, 6).to_vec(),
            vec![0xff, 0xff, 0xff, 0xff, 0, 0],
        ]
        .concat(),
        // Unknown client flags.
        0xffff_ffffu32.to_be_bytes().to_vec(),
    ];
    for g in garbage {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        let _ = s.write_all(&g);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // (An oversized write: an_oversized_write_is_refused_then_disconnected.)
    // Still serving.
    let mut c = connect(&SocketAddress::Unix(sock), "disk", None);
    let mut b = [0u8; 4];
    c.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0, 1, 2, 3]);
    server.stop().unwrap();
}

#[test]
fn blockdev_add_nbd_driver_reaches_the_export() {
    nbd::register_driver(Arc::new(tls::Objects::new()));
    let dir = tempfile::tempdir().unwrap();
    let l = layer_with_file(dir.path());
    let (sock, server) = unix_server(dir.path());
    export(&server, &l, "disk", true, None);
    let client_layer = BlockLayer::new();
    let n = client_layer
        .blockdev_add(&json!({"driver": "nbd", "node-name": "remote",
            "server": {"type": "unix", "path": sock.to_str().unwrap()}, "export": "disk"}))
        .unwrap();
    assert_eq!(n.size().unwrap(), SIZE);
    n.write_at(512, b"via blockdev-add").unwrap();
    let mut got = [0u8; 16];
    l.node("d0").unwrap().read_at(512, &mut got).unwrap();
    assert_eq!(&got, b"via blockdev-add");
    assert_eq!(
        n.filename(),
        format!("nbd+unix:///disk?socket={}", sock.display())
    );
    let e = client_layer
        .blockdev_add(&json!({"driver": "nbd", "node-name": "r2",
            "server": {"type": "unix", "path": sock.to_str().unwrap()}, "export": "nope"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("export 'nope' not present"), "{e}");
    assert_eq!(
        client_layer
            .blockdev_add(&json!({"driver": "nbd", "node-name": "r3", "export": "disk"}))
            .unwrap_err()
            .to_string(),
        "Parameter 'server' is missing"
    );
    // A request the server refuses fails alone; the connection carries on.
    let d0 = l.node("d0").unwrap();
    let bm = d0.create_bitmap(65536, Some("ro")).unwrap();
    d0.with_bitmaps(|b| b.get_mut(bm).unwrap().set_readonly(true));
    assert_eq!(
        n.write_at(0, &[1u8; 512]),
        Err(block::BlockError::Io(Errno::EPERM))
    );
    let mut again = [0u8; 16];
    n.read_at(512, &mut again).unwrap();
    assert_eq!(&again, b"via blockdev-add");
    client_layer.blockdev_del("remote").unwrap();
    server.stop().unwrap();
}

#[test]
fn exporting_an_incoming_node_activates_it_for_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; SIZE as usize]).unwrap();
    let l = Arc::new(BlockLayer::new());
    // As on a migration destination: nodes open inactive.
    l.set_incoming(true);
    l.blockdev_add(&json!({"driver": "raw", "node-name": "d0",
        "file": {"driver": "file", "filename": img.to_str().unwrap()}}))
        .unwrap();
    let node = l.node("d0").unwrap();
    assert!(node.is_inactive());
    let (sock, server) = unix_server(dir.path());
    export(&server, &l, "disk", true, None);
    assert!(!node.is_inactive());
    let mut c = connect(&SocketAddress::Unix(sock), "disk", None);
    c.write_at(0, b"incoming").unwrap();
    assert_eq!(&std::fs::read(&img).unwrap()[..8], b"incoming");
    server.stop().unwrap();
}

/// A server that answers the handshake with `greeting` and then anything with `junk`.
fn hostile_server(dir: &Path, greeting: Vec<u8>, junk: Vec<u8>) -> SocketAddress {
    let path = dir.join("evil.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(&greeting);
            let mut buf = [0u8; 4096];
            // Answer whatever the client sends with the junk, then hang up.
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = s.read(&mut buf);
            let _ = s.write_all(&junk);
        }
    });
    SocketAddress::Unix(path)
}

#[test]
fn a_hostile_server_gets_errors_not_panics() {
    let mut greeting = proto::NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes());
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"NOTMAGIC".to_vec(), vec![]),
        (greeting.clone(), vec![]),
        // An option reply announcing 4 GiB.
        (greeting.clone(), {
            let mut r =
                proto::option_reply_header(opt::STRUCTURED_REPLY, rep::ACK, u32::MAX).to_vec();
            r.extend_from_slice(&[0u8; 64]);
            r
        }),
        // A reply to the wrong option.
        (
            greeting.clone(),
            proto::option_reply_header(opt::LIST, rep::ACK, 0).to_vec(),
        ),
        // Random bytes.
        (
            greeting,
            (0..300u32).map(|i| (i * 97 % 256) as u8).collect(),
        ),
    ];
    for (g, junk) in cases {
        let dir = tempfile::tempdir().unwrap();
        let addr = hostile_server(dir.path(), g, junk);
        let r = NbdClient::connect(
            &addr,
            &ConnectOptions {
                export: "disk".into(),
                meta_context: None,
                tls: None,
            },
        );
        assert!(r.is_err());
    }
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Random requests after a real handshake: the server answers or hangs up, never
        /// dies, and keeps serving other clients.
        #[test]
        fn random_requests_never_take_the_server_down(
            reqs in proptest::collection::vec(
                (any::<u16>(), 0u16..10, any::<u64>(), 0u64..(8 << 20), 0u32..70_000),
                1..8,
            )
        ) {
            let dir = tempfile::tempdir().unwrap();
            let l = layer_with_file(dir.path());
            let (sock, server) = unix_server(dir.path());
            export(&server, &l, "disk", true, None);
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut greet = [0u8; 18];
            s.read_exact(&mut greet).unwrap();
            s.write_all(&3u32.to_be_bytes()).unwrap();
            let mut d = 4u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"disk");
            d.extend_from_slice(&0u16.to_be_bytes());
            s.write_all(&proto::option_header(opt::GO, d.len() as u32)).unwrap();
            s.write_all(&d).unwrap();
            for (flags, kind, handle, offset, len) in reqs {
                let r = proto::Request { flags, kind, handle, offset, len };
                if s.write_all(&r.encode()).is_err() {
                    break;
                }
                if kind == proto::cmd::WRITE {
                    let _ = s.write_all(&vec![0x5a; len as usize]);
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            let mut c = connect(&SocketAddress::Unix(sock), "disk", None);
            let mut b = [0u8; 8];
            prop_assert!(c.read_at(0, &mut b).is_ok());
            server.stop().unwrap();
        }
    }
}
