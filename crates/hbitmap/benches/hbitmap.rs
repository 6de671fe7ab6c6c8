//! Criterion benchmarks for hbitmap (written with the implementation).
fn main() {}
