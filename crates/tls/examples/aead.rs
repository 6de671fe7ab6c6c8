//! The ceiling TLS puts on one channel: how fast one core seals 16 KiB records (a full TLS
//! record's payload) with ring's AEADs — the cipher suites rustls negotiates — against a
//! plain copy of the same bytes. A TLS channel can go no faster than its sealing (sender)
//! or opening (receiver) side; a plaintext one costs the kernel a copy or two per byte.
//!
//! `cargo run --release -p tls --example aead [GIB]` (default 1 GiB per cipher).

use ring::aead::{
    Aad, Algorithm, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use std::time::Instant;

const RECORD: usize = 16384;

fn rate(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() {
    let gib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let records = (gib << 30) / RECORD as u64;
    let bytes = records * RECORD as u64;
    // Sources larger than the caches, so the copy is not a cache-to-cache one.
    let src: Vec<u8> = (0..64 << 20).map(|i: u32| (i * 7 + 1) as u8).collect();
    let mut record = vec![0u8; RECORD];
    let ciphers: [(&str, &'static Algorithm); 3] = [
        ("AES-128-GCM", &AES_128_GCM),
        ("AES-256-GCM", &AES_256_GCM),
        ("CHACHA20-POLY1305", &CHACHA20_POLY1305),
    ];
    println!("cipher              seal GB/s  copy GB/s");
    for (name, alg) in ciphers {
        let key = LessSafeKey::new(UnboundKey::new(alg, &vec![1u8; alg.key_len()]).expect("key"));
        let chunks = src.len() / RECORD;
        let t = Instant::now();
        for i in 0..records {
            let at = (i as usize % chunks) * RECORD;
            record.copy_from_slice(&src[at..at + RECORD]);
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&i.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from([23u8, 3, 3, 64, 17]),
                    &mut record,
                )
                .expect("seal");
            let _ = std::hint::black_box(tag);
        }
        let seal = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..records {
            let at = (i as usize % chunks) * RECORD;
            record.copy_from_slice(&src[at..at + RECORD]);
            std::hint::black_box(&record);
        }
        let copy = t.elapsed().as_secs_f64();
        println!(
            "{name:<18} {:>10.2} {:>10.2}",
            rate(bytes, seal),
            rate(bytes, copy)
        );
    }
}
