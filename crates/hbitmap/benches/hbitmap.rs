#![allow(missing_docs)] // criterion's macros generate undocumented public functions
//! Criterion benchmarks for hbitmap: range set/reset, dirty-area walks, (de)serialization and
//! sparse searches, on the bitmap of a 1 TiB disk at 64 KiB granularity (2^24 bits, 2 MiB).
//!
//! Run with `cargo bench -p hbitmap`; the figures are recorded in `BENCHMARKS.md`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use hbitmap::HBitmap;

const TIB: u64 = 1 << 40;
/// 64 KiB granularity.
const G: u32 = 16;
const MAX: u64 = i64::MAX as u64;

/// xorshift64: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A 1 TiB bitmap at 64 KiB granularity with each bit set with probability `per_million / 1e6`.
fn random_bitmap(per_million: u64) -> HBitmap {
    let mut hb = HBitmap::new(TIB, G).expect("valid size");
    let bits = hb.size();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; (bits / 8) as usize];
    for byte in buf.iter_mut() {
        for j in 0..8 {
            if rng.next() % 1_000_000 < per_million {
                *byte |= 1 << j;
            }
        }
    }
    hb.deserialize_part(&buf, 0, TIB, true)
        .expect("whole bitmap");
    hb
}

fn set_reset(c: &mut Criterion) {
    let mut group = c.benchmark_group("set_reset");
    let mut hb = HBitmap::new(TIB, G).expect("valid size");
    // Ranges in bits; starts are 3 bits past a 2^20-bit boundary so both ends are partial.
    for bits in [1u64, 100, 1 << 16, 1 << 22] {
        let start = ((1u64 << 20) + 3) << G;
        let len = bits << G;
        group.throughput(Throughput::Elements(bits));
        group.bench_with_input(
            BenchmarkId::new("set_then_reset_bits", bits),
            &bits,
            |b, _| {
                b.iter(|| {
                    hb.set(black_box(start), black_box(len)).expect("in range");
                    hb.reset(black_box(start), black_box(len)).expect("aligned");
                })
            },
        );
    }
    // Small writes at scattered offsets, as a guest's dirty tracking sees them.
    let mut rng = Rng(42);
    group.throughput(Throughput::Elements(1));
    group.bench_function("set_4k_write_random_offset", |b| {
        b.iter(|| {
            let off = (rng.next() % (TIB >> 12)) << 12;
            hb.set(black_box(off), 4096).expect("in range");
        })
    });
    group.finish();
}

fn walk_areas(c: &mut Criterion) {
    let mut group = c.benchmark_group("dirty_area_walk_1TiB_64KiB");
    for (name, per_million) in [("0.1%", 1_000u64), ("10%", 100_000), ("90%", 900_000)] {
        let hb = random_bitmap(per_million);
        let mut areas = 0u64;
        let mut off = 0;
        while let Some((s, n)) = hb.next_dirty_area(off, MAX, MAX) {
            areas += 1;
            off = s + n;
        }
        eprintln!("density {name}: {areas} dirty areas");
        group.throughput(Throughput::Elements(areas));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut off = 0;
                let mut n_areas = 0u64;
                while let Some((s, n)) = hb.next_dirty_area(black_box(off), MAX, MAX) {
                    n_areas += 1;
                    off = s + n;
                }
                n_areas
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("iterate_1TiB_64KiB");
    let hb = random_bitmap(100_000);
    group.throughput(Throughput::Elements(hb.count() >> G));
    group.bench_function("10%", |b| {
        b.iter(|| hb.iter_from(0).expect("in range").count())
    });
    group.finish();
}

fn serialization(c: &mut Criterion) {
    let mut group = c.benchmark_group("serialize_1TiB_64KiB");
    let hb = random_bitmap(100_000);
    let bytes = hb.serialization_size(0, TIB).expect("whole bitmap");
    let mut buf = vec![0u8; bytes as usize];
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("serialize_whole", |b| {
        b.iter(|| {
            hb.serialize_part(black_box(&mut buf), 0, TIB)
                .expect("whole bitmap")
        })
    });
    // The migration stream sends 1 KiB (8192-bit) chunks.
    let chunk_items = 8192u64 << G;
    group.bench_function("serialize_1KiB_chunks", |b| {
        b.iter(|| {
            let mut start = 0;
            for piece in buf.chunks_mut(1024) {
                hb.serialize_part(piece, start, chunk_items)
                    .expect("aligned chunk");
                start += chunk_items;
            }
        })
    });
    hb.serialize_part(&mut buf, 0, TIB).expect("whole bitmap");
    let mut dst = HBitmap::new(TIB, G).expect("valid size");
    group.bench_function("deserialize_whole", |b| {
        b.iter(|| {
            dst.deserialize_part(black_box(&buf), 0, TIB, true)
                .expect("whole bitmap")
        })
    });
    group.bench_function("deserialize_whole_into_new_bitmap", |b| {
        b.iter_batched(
            || HBitmap::new(TIB, G).expect("valid size"),
            |mut fresh| {
                fresh
                    .deserialize_part(&buf, 0, TIB, true)
                    .expect("whole bitmap");
                fresh
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("deserialize_1KiB_chunks", |b| {
        b.iter(|| {
            let mut start = 0;
            for piece in buf.chunks(1024) {
                dst.deserialize_part(piece, start, chunk_items, false)
                    .expect("aligned chunk");
                start += chunk_items;
            }
            dst.deserialize_finish();
        })
    });
    group.bench_function("sha256", |b| b.iter(|| hb.sha256()));
    group.finish();
}

fn sparse_search(c: &mut Criterion) {
    let mut group = c.benchmark_group("next_dirty_one_bit_near_end");
    for (name, g) in [("1TiB_64KiB", G), ("1TiB_512B", 9u32), ("2^41_bits", 0)] {
        let size = if g == 0 { 1u64 << 41 } else { TIB };
        let mut hb = HBitmap::new(size, g).expect("valid size");
        hb.set(size - (3u64 << g), 1).expect("in range");
        group.bench_function(name, |b| b.iter(|| hb.next_dirty(black_box(0), MAX)));
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = set_reset, walk_areas, serialization, sparse_search
}
criterion_main!(benches);
