//! Benchmark placeholder: filled by the issue that builds this stage.
fn main() {}
