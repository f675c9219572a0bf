//! What the benchmarks share (a directory, so that cargo does not take it for a benchmark).

use std::time::{Duration, Instant};

/// The median time of `runs` runs of `f`.
pub fn median_of<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut v: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}
