//! `logits::top_k` micro-benchmark (docs/performance.md, session 13): the block-skipping top-k
//! against the element loop it replaced (`top_k_among` over every index), k = 8 as greedy search
//! with grounding asks, on 64 pseudo-random rows of the shipped (2048) and Flan-T5 (32128)
//! vocabulary sizes; microseconds per row, three rounds.
//!
//! `cargo run --release -p qserver --example top_k`
use std::time::Instant;

use qserver::engine::logits::{top_k, top_k_among};

/// Rows of `n` logits spread like a model's (a few high, most low), from a fixed LCG.
fn rows(n: usize) -> Vec<Vec<f32>> {
    let mut s = 1u64;
    let mut next = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32, ((s >> 11) & 0xffff) as f32 / 65536.0)
    };
    (0..64)
        .map(|_| {
            (0..n)
                .map(|_| {
                    let (u, v) = next();
                    (u + v + u * v) * 4.0 - 6.0
                })
                .collect()
        })
        .collect()
}

fn micros_per_row(rows: &[Vec<f32>], mut f: impl FnMut(&[f32])) -> f64 {
    const PASSES: usize = 50;
    let started = Instant::now();
    for _ in 0..PASSES {
        for row in rows {
            f(row);
        }
    }
    started.elapsed().as_secs_f64() * 1e6 / (PASSES * rows.len()) as f64
}

fn main() {
    let mut out = Vec::new();
    for vocab in [2048usize, 32128] {
        let rows = rows(vocab);
        for round in 0..3 {
            let blocks = micros_per_row(&rows, |row| top_k(row, 8, Some(1), &mut out));
            let elements = micros_per_row(&rows, |row| top_k_among(row, 0..row.len(), 8, Some(1), &mut out));
            println!(
                "vocab {vocab} round {round}: top_k {blocks:.2} us, element loop {elements:.2} us ({:.1}x)",
                elements / blocks
            );
        }
    }
}
