#![allow(missing_docs)] // criterion's macros generate undocumented public functions
//! Data-path benchmarks: RAM page records through the writer (header + page in one vectored
//! write) and through the reader (page read straight into a guest buffer), and the analyzer
//! on a zero-page-heavy stream.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use wire::ram::{read_ram_record, write_eos, write_page, write_zero, BlockTracker, RamRecord};
use wire::{StreamReader, StreamWriter};

const PAGES: usize = 1024;

fn page_stream(guest: &[u8]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::with_capacity(guest.len() + PAGES * 16));
    let mut t = BlockTracker::new();
    for (i, p) in guest.chunks(4096).enumerate() {
        write_page(&mut w, t.encode("pc.ram"), i as u64 * 4096, p).unwrap();
    }
    write_eos(&mut w).unwrap();
    w.into_inner().unwrap()
}

fn bench(c: &mut Criterion) {
    let guest: Vec<u8> = (0..PAGES * 4096).map(|i| (i * 31) as u8).collect();

    let mut g = c.benchmark_group("ram_pages");
    g.throughput(Throughput::Bytes((PAGES * 4096) as u64));
    g.bench_function("write_page_vectored_1024", |b| {
        let mut out = Vec::with_capacity(guest.len() + PAGES * 16);
        b.iter(|| {
            out.clear();
            let mut w = StreamWriter::new(&mut out);
            let mut t = BlockTracker::new();
            for (i, p) in guest.chunks(4096).enumerate() {
                write_page(&mut w, t.encode("pc.ram"), i as u64 * 4096, p).unwrap();
            }
            w.flush().unwrap();
            black_box(w.bytes_written());
        })
    });
    let stream = page_stream(&guest);
    g.bench_function("read_page_into_guest_1024", |b| {
        let mut dst = vec![0u8; guest.len()];
        b.iter(|| {
            let mut r = StreamReader::new(&stream[..]);
            while let RamRecord::Page { offset, .. } = read_ram_record(&mut r).unwrap() {
                let o = offset as usize;
                r.read_into(&mut dst[o..o + 4096]).unwrap();
            }
            black_box(&dst);
        })
    });
    g.finish();

    // 8192 zero-page records (a 32 MiB guest's first pass), analyzed.
    let mut w = StreamWriter::new(Vec::new());
    wire::section::write_file_header(&mut w).unwrap();
    wire::config::write_configuration(&mut w, &wire::config::Configuration::new("none")).unwrap();
    wire::section::write_part(&mut w, 2).unwrap();
    let mut t = BlockTracker::new();
    for i in 0..8192u64 {
        write_zero(&mut w, t.encode("ram"), i * 4096, 0).unwrap();
    }
    write_eos(&mut w).unwrap();
    wire::section::write_footer(&mut w, 2).unwrap();
    wire::section::write_eof(&mut w).unwrap();
    let zeros = w.into_inner().unwrap();
    let mut g = c.benchmark_group("analyze");
    g.throughput(Throughput::Elements(8192));
    g.bench_function("zero_pages_8192", |b| {
        b.iter(|| black_box(wire::analyze(&zeros[..]).summary.items.len()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
