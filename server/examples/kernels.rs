//! GEMV kernel micro-benchmark (docs/performance.md): the matrix-vector products of one
//! decoder step of a model shape (random weights, int8 or 4-bit), with every kernel this CPU
//! supports, interleaved round by round on one thread; prints the median step time per kernel,
//! its ratio to the scalar reference and the weight bytes streamed per second.
//!
//! Then the batched product (continuous batching) with the process's kernel: one step for 1, 2,
//! 4 and 8 rows, per step and per row.
//!
//! `cargo run --release -p qserver --example kernels -- [shipped|flan-t5-small|flan-t5-base] [ROUNDS] [int8|q4]`
use std::time::Instant;

use clap::ValueEnum;
use qserver::engine::native::{
    kernels::{gemv, gemv_batch, kernel, streams, tiled_rows, Kernel, QuantVector, RowProduct},
    matrix::{Matrix, WeightFormat},
    team::{Team, Waiting},
};

/// (d_model, heads x d_kv, d_ff, decoder layers, vocab): the decoder of each shape, gated-GELU.
fn shape(name: &str) -> (usize, usize, usize, usize, usize) {
    match name {
        "shipped" => (256, 256, 768, 3, 2048),
        "flan-t5-small" => (512, 384, 1024, 8, 32128),
        "flan-t5-base" => (768, 768, 2048, 12, 32128),
        other => panic!("unknown shape {other:?}: shipped, flan-t5-small or flan-t5-base"),
    }
}

fn random_weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..rows * cols)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map_or("flan-t5-small", String::as_str);
    let rounds: usize = args.get(2).map_or(30, |r| r.parse().expect("ROUNDS is a number"));
    let format = args.get(3).map_or(WeightFormat::Int8, |f| WeightFormat::from_str(f, true).expect("int8 or q4"));
    let (d, inner, ff, layers, vocab) = shape(name);
    // One decoder step: per layer self q/k/v and out, cross q and out, gated FF in and out; the LM head.
    let mut dims = Vec::new();
    for _ in 0..layers {
        dims.extend([(3 * inner, d), (d, inner), (inner, d), (d, inner), (2 * ff, d), (d, ff)]);
    }
    dims.push((vocab, d));
    let mut mats: Vec<Matrix> = dims
        .iter()
        .enumerate()
        .map(|(i, &(r, c))| Matrix::quantize(format, r, c, &random_weights(r, c, i as u64 + 1)))
        .collect();
    let bytes: usize = mats.iter().map(|m| m.bytes()).sum();
    let streamed = streams(bytes);
    for m in &mut mats {
        m.set_streamed(streamed);
    }
    let inputs: Vec<QuantVector> = mats
        .iter()
        .map(|m| {
            let mut x = QuantVector::default();
            x.set(&random_weights(1, m.cols(), 7));
            x
        })
        .collect();
    let mut outputs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; m.rows()]).collect();
    let kernels: Vec<Kernel> = Kernel::ALL.into_iter().filter(|k| k.supported()).collect();
    let skipped: Vec<&str> = Kernel::ALL.into_iter().filter(|k| !k.supported()).map(Kernel::name).collect();
    println!(
        "{name}: {} GEMVs per step, {:.1} MiB of {format:?} weights{}, {rounds} rounds, kernels {:?}, skipped (unsupported) {skipped:?}",
        mats.len(),
        bytes as f64 / (1 << 20) as f64,
        if streamed { " (streamed)" } else { "" },
        kernels.iter().map(|k| k.name()).collect::<Vec<_>>()
    );
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kernels.len()];
    let mut reference: Option<Vec<Vec<f32>>> = None;
    for round in 0..rounds + 2 {
        // Alternate the order each round so no kernel always runs on a cache warmed by another.
        let order: Vec<usize> =
            if round % 2 == 0 { (0..kernels.len()).collect() } else { (0..kernels.len()).rev().collect() };
        for &k in &order {
            let started = Instant::now();
            for ((m, x), y) in mats.iter().zip(&inputs).zip(outputs.iter_mut()) {
                m.product_rows_with(kernels[k], 0, x, y);
            }
            let ms = started.elapsed().as_secs_f64() * 1e3;
            if round >= 2 {
                times[k].push(ms);
            }
            match &reference {
                None => reference = Some(outputs.clone()),
                Some(r) => assert!(r == &outputs, "the {} kernel gave other results", kernels[k].name()),
            }
        }
    }
    let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    let scalar = kernels.iter().position(|k| *k == Kernel::Scalar).map(|i| medians[i]);
    for (k, ms) in kernels.iter().zip(&medians) {
        println!(
            "  {:<12} {:>8.3} ms/step  {:>5.2}x scalar  {:>6.1} GB/s",
            k.name(),
            ms,
            scalar.map_or(f64::NAN, |s| s / ms),
            bytes as f64 / (ms * 1e-3) / 1e9
        );
    }

    batched(&mats, rounds);
    threaded(&mats, &inputs, rounds);
}

/// One step's products on one thread and split across 2 threads (`--intra-op-threads 2`): by
/// the decoder's [`Team`] and, for comparison, by a rayon pool (what the decoder used before),
/// interleaved round by round; all three must agree bit for bit.
fn threaded(mats: &[Matrix], inputs: &[QuantVector], rounds: usize) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let team = Team::new(2, "kernels", Waiting::Spin).unwrap();
    let mut outputs: [Vec<Vec<f32>>; 3] = std::array::from_fn(|_| mats.iter().map(|m| vec![0f32; m.rows()]).collect());
    let mut times: [Vec<f64>; 3] = Default::default();
    let step = |outputs: &mut Vec<Vec<f32>>| {
        let started = Instant::now();
        for ((m, x), y) in mats.iter().zip(inputs).zip(outputs.iter_mut()) {
            gemv(m, x, y);
        }
        started.elapsed().as_secs_f64() * 1e3
    };
    let rayon_step = |outputs: &mut Vec<Vec<f32>>| {
        use rayon::prelude::*;
        let started = Instant::now();
        for ((m, x), y) in mats.iter().zip(inputs).zip(outputs.iter_mut()) {
            let part = m.rows().div_ceil(2).next_multiple_of(4);
            y.par_chunks_mut(part).enumerate().for_each(|(i, ys)| m.product_rows(i * part, x, ys));
        }
        started.elapsed().as_secs_f64() * 1e3
    };
    for round in 0..rounds + 2 {
        let ms = [
            step(&mut outputs[0]),
            team.install(|| step(&mut outputs[1])),
            pool.install(|| rayon_step(&mut outputs[2])),
        ];
        if round >= 2 {
            times.iter_mut().zip(ms).for_each(|(t, ms)| t.push(ms));
        }
        assert!(outputs[1] == outputs[0] && outputs[2] == outputs[0], "a split changed a result");
    }
    let [one, team, rayon] = times.map(|mut t| median(&mut t));
    println!(
        "one step on 1 thread {one:.3} ms; split across 2 threads: decoder team {team:.3} ms ({:.2}x), rayon pool {rayon:.3} ms ({:.2}x)",
        one / team,
        one / rayon
    );
}

/// One step's products for 1, 2, 4 and 8 rows at once, the sizes and the two ways interleaved
/// round by round: the process's kernel as [`gemv_batch`] runs it (a batched kernel where it has
/// one) and its one-vector kernel tile by tile ([`tiled_rows`]); they must agree bit for bit.
fn batched(mats: &[Matrix], rounds: usize) {
    const SIZES: [usize; 4] = [1, 2, 4, 8];
    let inputs: Vec<Vec<QuantVector>> = mats
        .iter()
        .map(|m| {
            (0..8)
                .map(|b| {
                    let mut x = QuantVector::default();
                    x.set(&random_weights(1, m.cols(), 100 + b));
                    x
                })
                .collect()
        })
        .collect();
    let mut outputs: [Vec<Vec<Vec<f32>>>; 2] =
        std::array::from_fn(|_| mats.iter().map(|m| vec![vec![0f32; m.rows()]; 8]).collect());
    let mut times: [Vec<Vec<f64>>; 2] = std::array::from_fn(|_| vec![Vec::new(); SIZES.len()]);
    for round in 0..rounds + 2 {
        for (i, &n) in SIZES.iter().enumerate() {
            for (way, (outs, t)) in outputs.iter_mut().zip(times.iter_mut()).enumerate() {
                let started = Instant::now();
                for ((m, xs), ys) in mats.iter().zip(&inputs).zip(outs.iter_mut()) {
                    let xs: Vec<&QuantVector> = xs[..n].iter().collect();
                    let mut ys: Vec<&mut [f32]> = ys[..n].iter_mut().map(Vec::as_mut_slice).collect();
                    if way == 0 {
                        gemv_batch(m, &xs, &mut ys);
                    } else {
                        tiled_rows(m, 0, &xs, &mut ys);
                    }
                }
                if round >= 2 {
                    t[i].push(started.elapsed().as_secs_f64() * 1e3);
                }
            }
            assert!(outputs[0] == outputs[1], "the batched kernel and the tiled one disagree at {n} rows");
        }
    }
    println!(
        "batched products, {} kernel (ms per step; batched kernel, then one-vector kernel tile by tile):",
        kernel().name()
    );
    let [own, tiled] = &mut times;
    for ((n, a), b) in SIZES.iter().zip(own.iter_mut()).zip(tiled.iter_mut()) {
        let (ms, tiled_ms) = (median(a), median(b));
        println!("  {n} rows  {ms:>8.3} ({:>6.3}/row)  tiled {tiled_ms:>8.3}  {:>5.2}x", ms / *n as f64, tiled_ms / ms);
    }
}
