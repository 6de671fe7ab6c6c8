//! QEMU 7.2's tools against our server, and our client against `qemu-nbd`:
//!
//! * `qemu-io` writes and reads our export (`nbd+unix://`), and the writes land in the node;
//! * `qemu-img map --image-opts ...,x-dirty-bitmap=qemu:dirty-bitmap:b0` reads our exported
//!   bitmap (QEMU's client reports dirty areas as `"data": false`);
//! * `qemu-img info` and `qemu-img compare` see the export's size and contents;
//! * our client reads and writes a `qemu-nbd` export, and reads its `base:allocation`.
//!
//! Skipped, with the reason printed, where QEMU's tools are missing.

use block::BlockLayer;
use nbd::client::{ConnectOptions, NbdClient};
use nbd::{NbdServer, SocketAddress};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::{raw_node, tool, SIZE};

fn tools(test: &str, extra: &[&str]) -> bool {
    let mut names = vec!["qemu-img", "qemu-io"];
    names.extend_from_slice(extra);
    testkit::require(test, testkit::programs(&names))
}

fn serve(dir: &Path, bitmap: Option<&str>) -> (Arc<BlockLayer>, NbdServer, String) {
    let l = raw_node(&dir.join("disk.img"));
    if let Some(b) = bitmap {
        l.block_dirty_bitmap_add("d0", b, Some(65536), None, None)
            .unwrap();
    }
    let sock = dir.join("nbd.sock");
    let server = NbdServer::new();
    server.start(&SocketAddress::Unix(sock.clone()), 0).unwrap();
    (l, server, sock.display().to_string())
}

use support::export as add;

fn run(cmd: &str, args: &[&str]) -> String {
    let (ok, text) = tool(cmd, args);
    assert!(ok, "{cmd} {args:?} failed: {text}");
    text
}

#[test]
fn qemu_io_reads_and_writes_our_export() {
    if !tools("qemu_io_reads_and_writes_our_export", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (l, server, sock) = serve(dir.path(), None);
    add(&server, &l, true, None);
    let url = format!("nbd+unix:///disk?socket={sock}");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 65536 131072",
            "-c",
            "write -z 1048576 65536",
            "-c",
            "read -P 0xab 65536 131072",
            "-c",
            "read -P 0 0 65536",
            "-c",
            "flush",
            &url,
        ],
    );
    assert!(
        out.contains("wrote 131072/131072 bytes at offset 65536"),
        "{out}"
    );
    assert!(
        out.contains("read 131072/131072 bytes at offset 65536"),
        "{out}"
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let mut b = vec![0u8; 131072];
    l.node("d0").unwrap().read_at(65536, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0xab));
    // Past the end: QEMU's client refuses before sending, our server would say EINVAL.
    let info = run("qemu-img", &["info", "--output=json", "-f", "raw", &url]);
    let v: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], SIZE);
    server.stop().unwrap();
}

#[test]
fn qemu_io_sees_a_readonly_export_as_readonly() {
    if !tools("qemu_io_sees_a_readonly_export_as_readonly", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (l, server, sock) = serve(dir.path(), None);
    add(&server, &l, false, None);
    let url = format!("nbd+unix:///disk?socket={sock}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &url])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // QEMU 7.2 refuses to open a read-only export for writing.
    assert!(!out.status.success());
    assert!(
        text.contains("Could not open image: Permission denied"),
        "{text}"
    );
    // Reading works.
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 0 4096", &url],
    );
    server.stop().unwrap();
}

#[test]
fn qemu_img_map_reads_our_dirty_bitmap() {
    if !tools("qemu_img_map_reads_our_dirty_bitmap", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (l, server, sock) = serve(dir.path(), Some("b0"));
    let n = l.node("d0").unwrap();
    n.write_at(0, &[1u8; 512]).unwrap();
    n.write_at(5 * 65536 + 100, &[1u8; 65536]).unwrap();
    l.block_dirty_bitmap_disable("d0", "b0").unwrap();
    add(&server, &l, false, Some("b0"));
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={sock},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:b0"
    );
    let out = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let map: Vec<(u64, u64, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    // QEMU's x-dirty-bitmap reads the dirty bit as NBD_STATE_HOLE: dirty means "data": false.
    assert_eq!(
        map,
        vec![
            (0, 65536, false),
            (65536, 4 * 65536, true),
            (5 * 65536, 2 * 65536, false),
            (7 * 65536, SIZE - 7 * 65536, true),
        ],
        "{out}"
    );
    server.stop().unwrap();
}

fn qemu_nbd(dir: &Path, img: &Path) -> (std::process::Child, std::path::PathBuf) {
    let sock = dir.join("qemu-nbd.sock");
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "disk", "-k"])
        .arg(&sock)
        .arg("--persistent")
        .arg(img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd made no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, sock)
}

#[test]
fn our_client_reads_and_writes_a_qemu_nbd_export() {
    if !tools(
        "our_client_reads_and_writes_a_qemu_nbd_export",
        &["qemu-nbd"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.img");
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, &data).unwrap();
    let (mut child, sock) = qemu_nbd(dir.path(), &img);
    let addr = SocketAddress::Unix(sock);
    let r = std::panic::catch_unwind(|| {
        let mut c = NbdClient::connect(
            &addr,
            &ConnectOptions {
                export: "disk".into(),
                meta_context: Some("base:allocation".into()),
                tls: None,
            },
        )
        .unwrap();
        assert_eq!(c.size(), SIZE);
        assert!(c.structured());
        let mut b = vec![0u8; 100_000];
        c.read_at(12345, &mut b).unwrap();
        assert!(b
            .iter()
            .enumerate()
            .all(|(i, x)| *x == ((12345 + i) % 251) as u8));
        c.write_at(4096, b"written by livemig").unwrap();
        c.write_zeroes(1 << 20, 1 << 20, true).unwrap();
        c.flush_export().unwrap();
        let mut z = vec![1u8; 1 << 20];
        c.read_at(1 << 20, &mut z).unwrap();
        assert!(z.iter().all(|x| *x == 0));
        let ext = c.block_status(0, SIZE as u32).unwrap();
        let total: u64 = ext.iter().map(|e| u64::from(e.len)).sum();
        assert!(total > 0 && total <= SIZE, "{ext:?}");
        // A read past the end is refused.
        assert!(c.read_at(SIZE - 1, &mut [0u8; 2]).is_err());
        c.disconnect();
        // Through the block driver, as blockdev-add opens it.
        nbd::register_driver(std::sync::Arc::new(tls::Objects::new()));
        let l = BlockLayer::new();
        let n = l
            .blockdev_add(&json!({"driver": "nbd", "node-name": "q",
                "server": addr.to_json(), "export": "disk"}))
            .unwrap();
        let mut got = [0u8; 18];
        n.read_at(4096, &mut got).unwrap();
        assert_eq!(&got, b"written by livemig");
        l.blockdev_del("q").unwrap();
    });
    let _ = child.kill();
    let _ = child.wait();
    r.unwrap();
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[4096..4096 + 18], b"written by livemig");
    assert!(file[1 << 20..2 << 20].iter().all(|x| *x == 0));
}

#[test]
fn qemu_img_convert_copies_between_our_export_and_qemu_nbd() {
    if !tools(
        "qemu_img_convert_copies_between_our_export_and_qemu_nbd",
        &[],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (l, server, sock) = serve(dir.path(), None);
    let n = l.node("d0").unwrap();
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i * 13 % 256) as u8).collect();
    n.write_at(0, &pattern).unwrap();
    add(&server, &l, true, None);
    let url = format!("nbd+unix:///disk?socket={sock}");
    let out = dir.path().join("copy.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            out.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&out).unwrap() == pattern);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &url,
            out.to_str().unwrap(),
        ],
    );
    server.stop().unwrap();
}
