//! Engine stress loop on the repository's model, without gRPC: N threads, each with its own
//! engine, run the same generation repeatedly and report ms/run and errors.
//!
//! `cargo run --release -p qserver --example stress -- THREADS ITERS BEAMS TOKENS [DEADLINE_US]`
//! (ignore_eos, so every run generates TOKENS tokens; DEADLINE_US cuts each run short).
//! `EXIT_EARLY_MS=n` exits the process after n ms while the threads are still running.
use std::{path::Path, sync::Arc};

use qserver::engine::{
    onnx_t5::{OnnxT5, SessionSettings},
    CancelToken, Engine, GenerateRequest, GenerationParams, ModelDir, SearchKind,
};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (threads, iters, beams, tokens) = (args[0], args[1], args[2], args[3]);
    // Optional: deadline in microseconds after the start of each generation.
    let deadline_us = args.get(4).copied();
    let env = qserver::runtime::init(None).unwrap();
    let dir =
        Arc::new(ModelDir::open(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/qreformulate-t5"))).unwrap());
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let env = env.clone();
            let dir = Arc::clone(&dir);
            std::thread::spawn(move || {
                let mut e = OnnxT5::load(&env, &dir, &SessionSettings::new(1)).unwrap();
                let search = if beams > 1 {
                    SearchKind::Beam { num_beams: beams, num_return_sequences: 1 }
                } else {
                    SearchKind::Greedy
                };
                let req = GenerateRequest {
                    query: format!("Who lived longer, Nikola Tesla or Milutin Milankovic? {t}"),
                    params: GenerationParams { max_new_tokens: tokens, search, ignore_eos: true, unguarded: false },
                    max_input_tokens: 256,
                    truncate: false,
                };
                let mut errors = 0;
                let started = std::time::Instant::now();
                for _ in 0..iters {
                    let deadline =
                        deadline_us.map(|us| std::time::Instant::now() + std::time::Duration::from_micros(us as u64));
                    match e.generate(&req, &CancelToken::new(deadline)) {
                        Err(qserver::engine::EngineError::DeadlineExceeded { .. }) => {}
                        Err(err) => {
                            errors += 1;
                            eprintln!("thread {t}: {err}");
                        }
                        Ok(_) => {}
                    }
                }
                println!(
                    "thread {t}: {iters} runs, {errors} errors, {:.2} ms/run",
                    started.elapsed().as_secs_f64() * 1e3 / iters as f64
                );
            })
        })
        .collect();
    if std::env::var_os("EXIT_EARLY_MS").is_some() {
        let ms: u64 = std::env::var("EXIT_EARLY_MS").unwrap().parse().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        std::process::exit(0);
    }
    for h in handles {
        h.join().unwrap();
    }
}
