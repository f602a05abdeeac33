//! Engine profiling driver (docs/performance.md): loads one engine per VARIANT on MODEL_DIR,
//! runs ITERS greedy generations of exactly TOKENS tokens (ignore_eos) per variant,
//! interleaved A B A B ..., and prints each variant's median/mean ms and its output text.
//!
//! `cargo run --release -p qserver --example profile -- MODEL_DIR ITERS TOKENS [VARIANT ...]`
//!
//! A VARIANT is `-` (defaults) or comma-separated `key=value` items: `dir=PATH` (another
//! model directory), `threads=N` (intra-op threads), `drafts=N` (draft tokens per step), `mempattern=0|1`, `arena=0|1` (CPU memory arena), `profile=PREFIX` (ONNX Runtime per-node
//! JSON profile), anything else is an ONNX Runtime session config entry, e.g.
//! `session.intra_op.allow_spinning=0`. `WARMUP=n` untimed runs per variant first (default 2).
//! `QUERY=...` replaces the query.
use std::{path::PathBuf, time::Instant};

use qserver::engine::{
    onnx_t5::{OnnxT5, SessionSettings},
    CancelToken, Engine, GenerateRequest, Generation, GenerationParams, ModelDir, SearchKind,
};

/// CPU time of the calling thread in ms (/proc/thread-self/schedstat, ns resolution). With
/// one intra-op thread ONNX Runtime computes on the caller, so this is the generation's CPU
/// cost, much less disturbed by other load on the machine than wall time.
fn thread_cpu_ms() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse::<f64>().unwrap() / 1e6
}

/// One generation, never inlined so that callgrind can `--toggle-collect=*run_one*`.
#[inline(never)]
fn run_one(engine: &mut OnnxT5, req: &GenerateRequest, cancel: &CancelToken) -> Generation {
    engine.generate(req, cancel).unwrap()
}

fn median(v: &[f64]) -> f64 {
    let mut m = v.to_vec();
    m.sort_by(f64::total_cmp);
    if m.is_empty() {
        f64::NAN
    } else {
        m[m.len() / 2]
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = PathBuf::from(&args[0]);
    let iters: usize = args[1].parse().unwrap();
    let tokens: usize = args[2].parse().unwrap();
    let mut variants: Vec<String> = args[3..].to_vec();
    if variants.is_empty() {
        variants.push("-".into());
    }
    let warmup: usize = std::env::var("WARMUP").ok().map_or(2, |w| w.parse().unwrap());
    let query = std::env::var("QUERY")
        .unwrap_or_else(|_| "Who lived longer, Nikola Tesla or Milutin Milankovic, and where were they born?".into());
    let env = qserver::runtime::init(None).unwrap();

    let mut engines = Vec::new();
    for v in &variants {
        // One engine at a time: its threads have the cores to themselves.
        let mut settings = SessionSettings { spin_waits: true, ..SessionSettings::new(1) };
        let mut dir = model.clone();
        for item in v.split(',').filter(|s| !s.is_empty() && *s != "-") {
            let (k, val) = item.split_once('=').expect("VARIANT items are key=value");
            match k {
                "dir" => dir = PathBuf::from(val),
                "threads" => settings.intra_op_threads = val.parse().unwrap(),
                "drafts" => settings.draft_tokens = val.parse().unwrap(),
                "mempattern" => settings.memory_pattern = Some(val == "1"),
                "arena" => settings.cpu_arena = Some(val == "1"),
                "profile" => settings.profile_prefix = Some(PathBuf::from(val)),
                "decoder" => settings.decoder = clap::ValueEnum::from_str(val, true).unwrap(),
                _ => settings.config_entries.push((k.into(), val.into())),
            }
        }
        let loaded = Instant::now();
        let engine = OnnxT5::load(&env, &ModelDir::open(&dir).unwrap(), &settings).unwrap();
        eprintln!("variant {v}: loaded in {:.0} ms", loaded.elapsed().as_secs_f64() * 1e3);
        engines.push(engine);
    }
    let req = GenerateRequest {
        query,
        params: GenerationParams {
            max_new_tokens: tokens,
            search: SearchKind::Greedy,
            ignore_eos: true,
            unguarded: false,
        },
        max_input_tokens: 512,
        truncate: false,
    };
    let cancel = CancelToken::new(None);
    let mut texts = vec![String::new(); engines.len()];
    let mut input_tokens = 0;
    for _ in 0..warmup {
        for (e, text) in engines.iter_mut().zip(texts.iter_mut()) {
            let g = e.generate(&req, &cancel).unwrap();
            *text = g.candidates[0].text.clone();
            input_tokens = g.timings.input_tokens;
        }
    }
    let mut ms: Vec<Vec<f64>> = vec![Vec::with_capacity(iters); engines.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::with_capacity(iters); engines.len()];
    let mut encode: Vec<Vec<f64>> = vec![Vec::with_capacity(iters); engines.len()];
    for i in 0..iters {
        // Alternate the order too, so neither variant always runs right after the other.
        let order: Vec<usize> =
            if i % 2 == 0 { (0..engines.len()).collect() } else { (0..engines.len()).rev().collect() };
        for j in order {
            let started = Instant::now();
            let cpu_started = thread_cpu_ms();
            let g = run_one(&mut engines[j], &req, &cancel);
            cpu[j].push(thread_cpu_ms() - cpu_started);
            ms[j].push(started.elapsed().as_secs_f64() * 1e3);
            encode[j].push(g.timings.encode.as_secs_f64() * 1e3);
            assert_eq!(g.candidates[0].tokens, tokens);
            assert_eq!(g.candidates[0].text, texts[j], "variant {}: output changed between runs", variants[j]);
        }
    }
    println!("query: {input_tokens} input tokens, {tokens} generated");
    for (j, v) in variants.iter().enumerate() {
        let m = &ms[j];
        let min = m.iter().copied().fold(f64::INFINITY, f64::min);
        let cpu_min = cpu[j].iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "variant {v}: n={} wall median {:.2} ms (min {min:.2}, encoder {:.2}); thread CPU median {:.2} ms (min {cpu_min:.2})",
            m.len(),
            median(m),
            median(&encode[j]),
            median(&cpu[j])
        );
        println!("  text: {:?}", texts[j]);
    }
    for (v, e) in variants.iter().zip(engines.iter_mut()) {
        if v.contains("profile=") {
            for f in e.end_profiling().unwrap() {
                println!("profile: {f}");
            }
        }
    }
}
