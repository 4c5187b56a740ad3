//! Shared helpers for the benchmarks: timing baselines and the ratio report.
