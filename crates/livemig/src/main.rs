//! livemig command line.
fn main() {}
