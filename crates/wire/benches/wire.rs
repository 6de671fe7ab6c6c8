//! Benchmarks of the data path: page records through the writer and the reader.
fn main() {}
