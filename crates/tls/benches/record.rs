#![allow(missing_docs)] // criterion's macros generate undocumented public functions
//! The record layer's CPU cost, without sockets.
//!
//! * `aead`: sealing and opening one full TLS record (16 KiB) in place with each AEAD that
//!   livemig's cipher suites use (ring) — the floor of what a TLS channel costs per byte.
//! * `session`: livemig's TLS session ([`tls::connect`]/[`tls::accept`], reader and writer
//!   halves) carrying 256 KiB written as 64 vectored 4 KiB pages (the RAM saver's batch shape)
//!   and read back into a 256 KiB buffer, through an in-memory pipe that copies once each way
//!   (as the kernel does). Against `aead`'s seal + open, the difference is what the session
//!   costs on top of the cryptography: its copies and bookkeeping. A pipe has no socket
//!   handle, so the writer takes its buffered path (records copied out of rustls once more);
//!   migration's and NBD's writers send straight from rustls's buffers instead.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ring::aead::{
    Aad, Algorithm, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use std::collections::VecDeque;
use std::hint::black_box;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

mod support;

const RECORD: usize = 16384;
const BATCH: usize = 256 * 1024;

fn aead(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead");
    g.throughput(Throughput::Bytes(RECORD as u64));
    let ciphers: [(&str, &'static Algorithm); 3] = [
        ("aes128gcm", &AES_128_GCM),
        ("aes256gcm", &AES_256_GCM),
        ("chacha20poly1305", &CHACHA20_POLY1305),
    ];
    let aad = [23u8, 3, 3, 0x40, 0x11];
    for (name, alg) in ciphers {
        let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).unwrap());
        let mut record = vec![0x5au8; RECORD + alg.tag_len()];
        let mut seq = 0u64;
        g.bench_function(format!("seal_16k_{name}"), |b| {
            b.iter(|| {
                seq += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&seq.to_be_bytes());
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut record[..RECORD],
                    )
                    .unwrap();
                let _ = black_box(tag);
            })
        });
        // One sealed record, opened again and again from a copy: the copy (16 KiB, in cache)
        // is part of the figure, as the receive side copies each record once at least.
        let nonce = [3u8; 12];
        let mut sealed = vec![0x5au8; RECORD + alg.tag_len()];
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed[..RECORD],
            )
            .unwrap();
        sealed[RECORD..].copy_from_slice(tag.as_ref());
        g.bench_function(format!("copy_open_16k_{name}"), |b| {
            b.iter(|| {
                record.copy_from_slice(&sealed);
                let p = key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut record,
                    )
                    .unwrap();
                black_box(p.len());
            })
        });
    }
    g.finish();
}

/// One direction of an in-memory pipe that carries the handshake over a socket pair and, once
/// `memory` is set, the data through a shared buffer (one copy in, one copy out).
struct Half {
    sock: UnixStream,
    pipe: Arc<Mutex<VecDeque<u8>>>,
    memory: Arc<AtomicBool>,
}

impl Read for Half {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.memory.load(Ordering::Relaxed) {
            return self.sock.read(buf);
        }
        let mut p = self.pipe.lock().unwrap();
        let n = p.len().min(buf.len());
        let (a, b) = p.as_slices();
        let from_a = n.min(a.len());
        buf[..from_a].copy_from_slice(&a[..from_a]);
        buf[from_a..n].copy_from_slice(&b[..n - from_a]);
        p.drain(..n);
        Ok(n)
    }
}

impl Write for Half {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.memory.load(Ordering::Relaxed) {
            return self.sock.write(buf);
        }
        self.pipe.lock().unwrap().extend(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn session(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let (server, client) = support::x509_pair(tmp.path());

    let (a, b) = UnixStream::pair().unwrap();
    let memory = Arc::new(AtomicBool::new(false));
    let to_server = Arc::new(Mutex::new(VecDeque::with_capacity(2 * BATCH)));
    let to_client = Arc::new(Mutex::new(VecDeque::new()));
    let half = |s: &UnixStream, pipe: &Arc<Mutex<VecDeque<u8>>>| Half {
        sock: s.try_clone().unwrap(),
        pipe: pipe.clone(),
        memory: memory.clone(),
    };
    let (cr, cw) = (half(&a, &to_client), half(&a, &to_server));
    let (sr, sw) = (half(&b, &to_server), half(&b, &to_client));
    let (mut tx, mut rx) = std::thread::scope(|s| {
        let srv = s.spawn(|| tls::accept(&server, None, sr, sw).unwrap());
        let cli = tls::connect(&client, Some("127.0.0.1"), cr, cw).unwrap();
        (cli, srv.join().unwrap())
    });
    memory.store(true, Ordering::Relaxed);
    let suite = tx.protocol().to_string();

    let page: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
    let pages: Vec<IoSlice<'_>> = (0..BATCH / 4096).map(|_| IoSlice::new(&page)).collect();
    let mut dst = vec![0u8; BATCH];
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Bytes(BATCH as u64));
    eprintln!("session: {suite}");
    g.bench_function("write_read_256k_in_4k_pages", |b| {
        b.iter(|| {
            let mut owned = pages.clone();
            let mut bufs: &mut [IoSlice<'_>] = &mut owned;
            while !bufs.is_empty() {
                let n = tx.writer.write_vectored(bufs).unwrap();
                IoSlice::advance_slices(&mut bufs, n);
            }
            let mut got = 0;
            while got < BATCH {
                let n = rx.reader.read(&mut dst[got..]).unwrap();
                assert!(n > 0);
                got += n;
            }
            black_box(&dst);
        })
    });
    g.finish();
}

criterion_group!(benches, aead, session);
criterion_main!(benches);
