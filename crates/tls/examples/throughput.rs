//! Loopback throughput of one migration-like channel, plaintext against TLS (livemig's
//! `tls` crate, the session split into reader and writer halves): x509 credentials (rustls
//! with ring) and a pre-shared key (`tls-creds-psk`, OpenSSL).
//!
//! `cargo run --release -p tls --example throughput [GIB] [ROUNDS]`
//!
//! The sender writes GIB GiB (default 4) in 256 KiB vectored writes of 4 KiB slices — the
//! shape of the RAM saver's batches — to a TCP connection on 127.0.0.1; the receiver reads it
//! into a 256 KiB buffer and drops it. Each round runs plaintext, then x509 TLS, then PSK TLS,
//! and prints the rates and their ratios to plaintext; the certificates and the key are made
//! for the run in a temporary directory.

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;
use tls::{Endpoint, PskOptions, TlsCreds};

#[path = "../benches/support/mod.rs"]
mod support;

const CHUNK: usize = 256 * 1024;

fn send_all<W: Write>(w: &mut W, total: u64, page: &[u8]) {
    let slices: Vec<IoSlice<'_>> = (0..CHUNK / 4096).map(|_| IoSlice::new(page)).collect();
    let mut sent = 0u64;
    while sent < total {
        let mut owned = slices.clone();
        let mut bufs: &mut [IoSlice<'_>] = &mut owned;
        while !bufs.is_empty() {
            let n = w.write_vectored(bufs).expect("write");
            IoSlice::advance_slices(&mut bufs, n);
        }
        sent += CHUNK as u64;
    }
    w.flush().expect("flush");
}

fn drain<R: Read>(r: &mut R, total: u64) {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < total {
        let n = r.read(&mut buf).expect("read");
        assert!(n > 0, "early end");
        got += n as u64;
    }
}

fn run(total: u64, creds: Option<(&TlsCreds, &TlsCreds)>) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let page = vec![0x5au8; 4096];
    let start = Instant::now();
    std::thread::scope(|s| {
        let rx = s.spawn(|| {
            let (sock, _) = l.accept().expect("accept");
            match creds {
                None => drain(&mut &sock, total),
                Some((server, _)) => {
                    let w = sock.try_clone().expect("clone");
                    let mut st = tls::accept(server, None, sock, w).expect("accept TLS");
                    drain(&mut st.reader, total);
                }
            }
        });
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_nodelay(true).expect("nodelay");
        match creds {
            None => send_all(&mut &sock, total, &page),
            Some((_, client)) => {
                let r = sock.try_clone().expect("clone");
                let fd = sock.try_clone().expect("clone");
                let mut st = tls::connect(client, Some("127.0.0.1"), r, sock).expect("TLS");
                // As migration's channels do: records go out straight from rustls's buffers.
                st.writer.set_socket(&fd).expect("socket handle");
                send_all(&mut st.writer, total, &page);
            }
        }
        rx.join().expect("receiver");
    });
    total as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(4);
    let rounds: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let tmp = tempfile::tempdir().expect("tmp");
    let (server, client) = support::x509_pair(tmp.path());
    let psk_dir = tmp.path().join("k");
    std::fs::create_dir_all(&psk_dir).expect("mkdir");
    std::fs::write(
        psk_dir.join("keys.psk"),
        "qemu:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n",
    )
    .expect("keys.psk");
    let psk = |endpoint| {
        TlsCreds::load_psk(PskOptions {
            dir: Some(psk_dir.display().to_string()),
            endpoint,
            username: None,
        })
        .expect("PSK creds")
    };
    let (psk_server, psk_client) = (psk(Endpoint::Server), psk(Endpoint::Client));
    let total = gib << 30;
    println!("round  plaintext GB/s  TLS GB/s  TLS/plaintext  PSK GB/s  PSK/plaintext");
    for i in 1..=rounds {
        let plain = run(total, None);
        let tls = run(total, Some((&server, &client)));
        let psk = run(total, Some((&psk_server, &psk_client)));
        println!(
            "{i:5}  {plain:14.2}  {tls:8.2}  {:12.0}%  {psk:8.2}  {:12.0}%",
            100.0 * tls / plain,
            100.0 * psk / plain
        );
    }
}
