#![allow(missing_docs)] // criterion's macros generate undocumented public functions
//! The engine's RAM data path without a network: how fast the saver turns dirty guest pages
//! into records (walking the bitmap, zero detection, headers, vectored writes into a sink), and
//! how fast the loader puts records back into guest memory. Both must be far above what
//! loopback TCP carries (≈3.3 GB/s here) so that the socket, not the engine, is the limit.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use migration::guest::{MmapRamBlock, RamBlock, PAGE_SIZE};
use migration::machine::{Reader, Writer};
use migration::ram::{RamCounters, RamLoader, RamSaver};
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};
use wire::{StreamReader, StreamWriter};

const RAM: usize = 64 << 20;

/// Guest RAM as a rust-vmm VMM has it (a `vm-memory` region with a dirty bitmap), handed to
/// the engine as it is.
struct BenchRam;

impl BenchRam {
    #[allow(clippy::new_ret_no_self)]
    fn new(fill: impl Fn(usize) -> u64) -> Arc<MmapRamBlock> {
        let mapping = MmapRegion::<AtomicBitmap>::new(RAM).expect("mmap");
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).expect("region");
        let block = MmapRamBlock::new("ram", Arc::new(region)).expect("block");
        let r = block.region();
        for i in 0..RAM / 8 {
            let w = fill(i);
            if w != 0 {
                r.write(i as u64 * 8, &w.to_le_bytes());
            }
        }
        Arc::new(block)
    }
}

/// A reader over shared bytes, so each iteration reads the same stream without copying it.
struct Shared(Arc<Vec<u8>>, usize);

impl Read for Shared {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.0[self.1..];
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        self.1 += n;
        Ok(n)
    }
}

fn save_all(
    ram: &Arc<MmapRamBlock>,
    sink: Box<dyn std::io::Write + Send>,
    integrity: bool,
) -> Writer {
    let mut w: Writer = StreamWriter::with_capacity(sink, 256 * 1024);
    let mut saver = RamSaver::new(
        vec![ram.clone() as Arc<dyn RamBlock>],
        Arc::new(RamCounters::default()),
    );
    saver.set_integrity(integrity);
    saver.setup(&mut w).expect("setup");
    saver.send(&mut w, u64::MAX, None).expect("send");
    saver.end_section(&mut w).expect("eos");
    w.flush().expect("flush");
    w
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ram");
    g.measurement_time(Duration::from_secs(5)).sample_size(20);
    g.throughput(Throughput::Bytes(RAM as u64));

    let data = BenchRam::new(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let zero = BenchRam::new(|_| 0);
    let dst = BenchRam::new(|_| 0);
    // `x-livemig-integrity` off (QEMU's stream) and on (a digest per batch; the source sends
    // a copy of each batch's pages).
    for (integrity, tag) in [(false, ""), (true, " (x-livemig-integrity)")] {
        g.bench_function(format!("save 64 MiB of data pages{tag}"), |b| {
            b.iter(|| save_all(&data, Box::new(std::io::sink()), integrity))
        });
        g.bench_function(format!("save 64 MiB of zero pages{tag}"), |b| {
            b.iter(|| save_all(&zero, Box::new(std::io::sink()), integrity))
        });

        // One stream of all data pages, loaded again and again into a destination.
        let mut bytes = Vec::new();
        {
            struct Collect(std::sync::mpsc::Sender<Vec<u8>>);
            impl std::io::Write for Collect {
                fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                    let _ = self.0.send(b.to_vec());
                    Ok(b.len())
                }
                fn flush(&mut self) -> std::io::Result<()> {
                    Ok(())
                }
            }
            let (tx, rx) = std::sync::mpsc::channel();
            drop(save_all(&data, Box::new(Collect(tx)), integrity));
            for part in rx.try_iter() {
                bytes.extend_from_slice(&part);
            }
        }
        let stream = Arc::new(bytes);
        g.bench_function(format!("load 64 MiB of data pages{tag}"), |b| {
            b.iter(|| {
                let mut r: Reader =
                    StreamReader::with_capacity(Box::new(Shared(stream.clone(), 0)), 256 * 1024);
                let mut loader = RamLoader::new(vec![dst.clone() as Arc<dyn RamBlock>]);
                loader.set_integrity(integrity);
                // The setup body (MEM_SIZE, EOS), then the pages (up to the second EOS).
                loader.load(&mut r).expect("load setup");
                loader.load(&mut r).expect("load pages");
                assert_eq!(loader.pages_loaded, (RAM as u64) / PAGE_SIZE);
                loader.pages_loaded
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
