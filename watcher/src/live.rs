//! The live event source: the proc connector plus /proc reads, with rescans after loss.
