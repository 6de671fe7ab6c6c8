//! What a client's announced lengths cost the server in memory: a write request announcing
//! 32 MiB and then sending almost nothing must not make the server hold 32 MiB. Alone in its
//! binary, since it measures the process's resident memory.

mod support;

use nbd::proto::{self, cmd, opt, rep};
use nbd::NbdServer;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A client negotiated (simple replies) on `disk`.
fn client(server: &NbdServer) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let s = server.clone();
    std::thread::spawn(move || s.serve(theirs.into()));
    let mut c = ours;
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"disk\0\0");
    c.write_all(&proto::option_header(opt::GO, d.len() as u32))
        .unwrap();
    c.write_all(&d).unwrap();
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        c.read_exact(&mut vec![0u8; len as usize]).unwrap();
        if kind == rep::ACK {
            return c;
        }
    }
}

#[test]
fn an_announced_write_costs_what_arrives_not_what_was_announced() {
    let dir = tempfile::tempdir().unwrap();
    let l = support::raw_node(&dir.path().join("disk.img"));
    let server = NbdServer::new();
    server.start(&support::any_port(), 0).unwrap();
    support::export(&server, &l, true, None);
    // Four clients, each announcing the largest write (32 MiB) and sending 1 KiB of it.
    let before = rss();
    let mut clients = Vec::new();
    for i in 0..4 {
        let mut c = client(&server);
        let req = proto::Request {
            flags: 0,
            kind: cmd::WRITE,
            handle: i,
            offset: 0,
            len: proto::MAX_BUFFER_SIZE,
        };
        c.write_all(&req.encode()).unwrap();
        c.write_all(&[0x5a; 1024]).unwrap();
        clients.push(c);
    }
    // The servers' threads are waiting for the rest of the payload.
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut grown = 0;
    while Instant::now() < deadline {
        grown = grown.max(rss().saturating_sub(before));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        grown < 16 << 20,
        "4 clients that sent 1 KiB each made the server grow by {} MiB",
        grown >> 20
    );
    // A write that does arrive whole still works.
    let mut c = client(&server);
    let req = proto::Request {
        flags: 0,
        kind: cmd::WRITE,
        handle: 9,
        offset: 4096,
        len: 3 << 20,
    };
    c.write_all(&req.encode()).unwrap();
    c.write_all(&vec![0x77; 3 << 20]).unwrap();
    let mut r = [0u8; 16];
    c.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 0);
    let mut back = vec![0u8; 3 << 20];
    l.node("d0").unwrap().read_at(4096, &mut back).unwrap();
    assert!(back.iter().all(|b| *b == 0x77));
    drop(clients);
    server.stop().unwrap();
}
