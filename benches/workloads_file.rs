//! The workloads file's checks at and beyond their bounds (issue 15, "Quadratic inputs"): how
//! long the agent takes to accept or refuse a large or hostile file, which is the time its main
//! loop spends on a SIGHUP's re-read. Refusals must come before the YAML parser builds the
//! file's events; the overlap check of many workloads must not be quadratic. Beside each file
//! it accepts, the YAML parser alone reading the same text into a generic value: what the
//! agent's own checks cost beyond reading the YAML.
//!
//! `cargo bench --bench workloads_file`

use criterion::{criterion_group, criterion_main, Criterion};
use resolver::Workloads;
use testkit::workloads_text::{long_address_list, many};

fn bench(c: &mut Criterion) {
    let depth = 100_000;
    let inputs = [
        (
            "flow nesting 100k deep (refused)",
            format!(
                "version: 1\nexempt: {}{}\n",
                "[".repeat(depth),
                "]".repeat(depth)
            ),
            false,
        ),
        (
            "block nesting 100k deep (refused)",
            format!("version: 1\nexempt:\n{}x\n", "- ".repeat(depth)),
            false,
        ),
        ("50,000 workloads", many(50_000), true),
        (
            "one workload, 200,000 addresses",
            long_address_list(200_000),
            true,
        ),
    ];
    let mut group = c.benchmark_group("workloads file");
    group.sample_size(10);
    for (name, text, accepted) in &inputs {
        // What is measured is what the agent does: accept or refuse, as expected.
        assert_eq!(Workloads::parse(text).is_ok(), *accepted, "{name}");
        group.bench_function(*name, |b| b.iter(|| Workloads::parse(text).is_ok()));
        if *accepted {
            group.bench_function(format!("{name}: the YAML parser alone"), |b| {
                b.iter(|| serde_norway::from_str::<serde_norway::Value>(text).is_ok())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
