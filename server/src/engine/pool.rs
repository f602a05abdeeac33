//! Engine workers: each engine instance is owned by one OS thread and driven by jobs over a
//! channel (no lock around sessions). Jobs carry a oneshot for the reply, so async handlers
//! await results without blocking the runtime.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use super::{Batching, CancelToken, Engine, EngineError, GenerateRequest, Generation, ModelError};

/// Builds worker `i`'s engine, on that worker's thread.
pub type EngineFactory = Arc<dyn Fn(usize) -> Result<Box<dyn Engine>, ModelError> + Send + Sync>;

enum Job {
    Generate { req: GenerateRequest, cancel: CancelToken, reply: oneshot::Sender<Result<Generation, EngineError>> },
    Stop,
}

pub struct EnginePool {
    tx: Sender<Job>,
    size: usize,
    model_id: String,
    /// Set by `stop`: queued jobs are refused and running ones cancelled at their next step.
    aborted: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    busy: Arc<Busy>,
    batches: Arc<BatchCounters>,
}

/// Continuous batching counters: decoder steps taken by batching workers, and the requests
/// those steps carried (their ratio is the mean batch).
#[derive(Debug, Default)]
pub struct BatchCounters {
    steps: AtomicU64,
    requests: AtomicU64,
}

/// A reading of [`BatchCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub steps: u64,
    pub requests: u64,
}

impl BatchCounters {
    fn record(&self, requests: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(requests as u64, Ordering::Relaxed);
    }

    fn read(&self) -> BatchStats {
        BatchStats { steps: self.steps.load(Ordering::Relaxed), requests: self.requests.load(Ordering::Relaxed) }
    }
}

/// When each worker took its current job, for the watchdog: milliseconds since `epoch` plus
/// one, 0 while idle.
struct Busy {
    epoch: Instant,
    since: Vec<AtomicU64>,
}

impl Busy {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn start(&self, worker: usize) {
        self.since[worker].store(self.now(), Ordering::Relaxed);
    }

    fn end(&self, worker: usize) {
        self.since[worker].store(0, Ordering::Relaxed);
    }

    /// A batching worker is on its oldest request in flight: since it joined (`now()` then),
    /// or idle when none is.
    fn on_oldest(&self, worker: usize, joined: impl Iterator<Item = u64>) {
        self.since[worker].store(joined.min().unwrap_or(0), Ordering::Relaxed);
    }

    fn longest(&self) -> Duration {
        let now = self.now();
        let started = self.since.iter().map(|s| s.load(Ordering::Relaxed)).filter(|&s| s != 0).min();
        started.map_or(Duration::ZERO, |s| Duration::from_millis(now.saturating_sub(s)))
    }
}

impl EnginePool {
    /// Starts `size` workers; each builds its engine and runs `warmup` once before it counts
    /// as ready. Blocks until all are ready or one fails; then the others are stopped and
    /// joined before the error is returned, so that no worker is still inside ONNX Runtime
    /// when the process exits with it (that crashed the process instead of exiting 1).
    pub fn start(size: usize, factory: EngineFactory, warmup: GenerateRequest) -> Result<Self, ModelError> {
        Self::start_batched(size, 1, factory, warmup)
    }

    /// [`EnginePool::start`] with continuous batching: a worker whose engine supports it
    /// ([`Engine::batching`]) keeps up to `max_batch` requests in flight, joining queued ones
    /// between decoder steps. 1 serves one request at a time.
    pub fn start_batched(
        size: usize,
        max_batch: usize,
        factory: EngineFactory,
        warmup: GenerateRequest,
    ) -> Result<Self, ModelError> {
        let size = size.max(1);
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, ModelError>>();
        let aborted = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(Busy { epoch: Instant::now(), since: (0..size).map(|_| AtomicU64::new(0)).collect() });
        let loads: Arc<[AtomicUsize]> = (0..size).map(|_| AtomicUsize::new(0)).collect();
        let batches = Arc::new(BatchCounters::default());
        let mut threads = Vec::with_capacity(size);
        for i in 0..size {
            let rx = rx.clone();
            let factory = Arc::clone(&factory);
            let ready_tx = ready_tx.clone();
            let warmup = warmup.clone();
            let worker_aborted = Arc::clone(&aborted);
            let worker_busy = Arc::clone(&busy);
            let loads = Arc::clone(&loads);
            let worker_batches = Arc::clone(&batches);
            let spawned = thread::Builder::new().name(format!("qserver-engine-{i}")).spawn(move || {
                let engine = match factory(i) {
                    Ok(engine) => engine,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let shared = Shared {
                    index: i,
                    rx,
                    aborted: worker_aborted,
                    busy: worker_busy,
                    max_batch,
                    loads,
                    batches: worker_batches,
                };
                worker(engine, ready_tx, warmup, shared);
            });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    aborted.store(true, Ordering::Relaxed);
                    for _ in 0..threads.len() {
                        let _ = tx.send(Job::Stop);
                    }
                    for thread in threads {
                        let _ = thread.join();
                    }
                    return Err(ModelError::Load { file: "engine worker thread".into(), reason: e.to_string() });
                }
            }
        }
        drop(ready_tx);
        let fail = |e: ModelError, threads: Vec<JoinHandle<()>>| {
            aborted.store(true, Ordering::Relaxed);
            for _ in 0..size {
                let _ = tx.send(Job::Stop);
            }
            for thread in threads {
                let _ = thread.join();
            }
            Err(e)
        };
        let mut model_id = String::new();
        for _ in 0..size {
            match ready_rx.recv() {
                Ok(Ok(id)) => model_id = id,
                Ok(Err(e)) => return fail(e, threads),
                Err(_) => {
                    return fail(ModelError::WarmUp("an engine worker exited during start-up".into()), threads);
                }
            }
        }
        Ok(Self { tx, size, model_id, aborted, threads: Mutex::new(threads), busy, batches })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Decoder steps of batching workers so far, and the requests they carried.
    pub fn batch_stats(&self) -> BatchStats {
        self.batches.read()
    }

    /// How long the worker longest on its current job has been on it (zero when all are idle).
    pub fn longest_busy(&self) -> Duration {
        self.busy.longest()
    }

    /// Queues one generation on the next free worker.
    pub async fn generate(&self, req: GenerateRequest, cancel: CancelToken) -> Result<Generation, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Generate { req, cancel, reply })?;
        rx.await.map_err(|_| EngineError::Unavailable("engine worker stopped before answering".into()))?
    }

    fn send(&self, job: Job) -> Result<(), EngineError> {
        if self.aborted.load(Ordering::Relaxed) {
            return Err(EngineError::Unavailable("server is shutting down".into()));
        }
        self.tx.send(job).map_err(|_| EngineError::Unavailable("engine workers have stopped".into()))
    }

    /// Stops the workers: queued jobs are answered `Unavailable`, running ones are cancelled
    /// at their next decode step.
    pub fn stop(&self) {
        self.aborted.store(true, Ordering::Relaxed);
        for _ in 0..self.size {
            let _ = self.tx.send(Job::Stop);
        }
    }

    /// `stop`, then waits up to `wait` for the worker threads to exit, so that no ONNX
    /// Runtime call is still running when the process exits. True when all have exited.
    pub async fn shutdown(&self, wait: Duration) -> bool {
        self.stop();
        let deadline = Instant::now() + wait;
        loop {
            let finished = {
                let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.is_empty()
            };
            if finished || Instant::now() >= deadline {
                return finished;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for EnginePool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a worker thread shares with its pool.
struct Shared {
    index: usize,
    rx: Receiver<Job>,
    /// Set by `stop`.
    aborted: Arc<AtomicBool>,
    busy: Arc<Busy>,
    max_batch: usize,
    /// Requests in flight on each worker (continuous batching).
    loads: Arc<[AtomicUsize]>,
    batches: Arc<BatchCounters>,
}

impl Shared {
    /// Whether this worker, with requests in flight, should take another queued job now: only
    /// when no other worker has fewer in flight. A blocked idle worker would otherwise lose
    /// every new job to a busy one polling between its steps, and that one's batch would grow
    /// while the other core idles.
    fn takes_more(&self, in_flight: usize) -> bool {
        in_flight < self.max_batch
            && self.loads.iter().enumerate().all(|(i, l)| i == self.index || l.load(Ordering::Relaxed) >= in_flight)
    }

    fn set_load(&self, in_flight: usize) {
        self.loads[self.index].store(in_flight, Ordering::Relaxed);
    }
}

type Reply = oneshot::Sender<Result<Generation, EngineError>>;

fn worker(
    mut engine: Box<dyn Engine>,
    ready: mpsc::Sender<Result<String, ModelError>>,
    warmup: GenerateRequest,
    w: Shared,
) {
    let index = w.index;
    let started = Instant::now();
    match run_guarded(engine.as_mut(), &warmup, &CancelToken::new(None)).and_then(sane) {
        Ok(g) => {
            tracing::info!(
                worker = index,
                ms = started.elapsed().as_secs_f64() * 1e3,
                text = %g.candidates[0].text,
                "engine warmed up"
            );
            let _ = ready.send(Ok(engine.model_id().to_owned()));
        }
        Err(e) => {
            let _ = ready.send(Err(ModelError::WarmUp(e.to_string())));
            return;
        }
    }
    drop(ready);
    let batched = w.max_batch > 1 && engine.batching().is_some();
    match engine.batching() {
        Some(batching) if batched => serve_batched(batching, &w),
        _ => serve_one_at_a_time(engine.as_mut(), &w),
    }
    tracing::debug!(worker = index, "engine worker stopped");
}

fn serve_one_at_a_time(engine: &mut dyn Engine, w: &Shared) {
    while let Ok(job) = w.rx.recv() {
        match job {
            Job::Stop => break,
            Job::Generate { req, cancel, reply } => {
                w.busy.start(w.index);
                let result = unless_aborted(&w.aborted, cancel, |c| run_guarded(engine, &req, c));
                w.busy.end(w.index);
                let _ = reply.send(result);
            }
        }
    }
}

/// Continuous batching: between two decoder steps the worker joins the jobs already queued (it
/// waits for one only when nothing is in flight), up to `max_batch` in flight, and answers each
/// request as soon as it ends. For the watchdog the worker is on its oldest request in flight,
/// as a worker without batching is on its one request. A panic answers the requests it touched
/// and keeps the worker alive. After `Stop`, the requests in flight end (the abort cancels them
/// at their next step) before the worker exits.
fn serve_batched(batching: &mut dyn Batching, w: &Shared) {
    // Per request in flight: its tag, its reply, when it joined (`Busy::now`).
    let mut replies: Vec<(u64, Reply, u64)> = Vec::new();
    let oldest = |replies: &Vec<(u64, Reply, u64)>| w.busy.on_oldest(w.index, replies.iter().map(|r| r.2));
    let mut next_tag = 0u64;
    let mut stopping = false;
    loop {
        while !stopping && (batching.in_flight() == 0 || w.takes_more(batching.in_flight())) {
            let job = if batching.in_flight() == 0 {
                match w.rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match w.rx.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            let (req, cancel, reply) = match job {
                Job::Stop => {
                    stopping = true;
                    break;
                }
                Job::Generate { req, cancel, reply } => (req, cancel, reply),
            };
            let tag = next_tag;
            next_tag += 1;
            let joining = w.busy.now();
            w.busy.on_oldest(w.index, replies.iter().map(|r| r.2).chain([joining]));
            let joined = unless_aborted(&w.aborted, cancel, |c| {
                c.check(0)?; // the client gave up while the job was queued
                guarded(|| batching.join(tag, &req, c.clone()))?
            });
            w.set_load(batching.in_flight());
            match joined {
                Ok(()) => replies.push((tag, reply, joining)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
            oldest(&replies);
        }
        if batching.in_flight() == 0 {
            if stopping {
                return;
            }
            continue;
        }
        w.batches.record(batching.in_flight());
        let ended = guarded(|| batching.step()).unwrap_or_else(|panic| {
            let message = match panic {
                EngineError::Panicked(m) => m,
                other => other.to_string(),
            };
            batching.clear().into_iter().map(|tag| (tag, Err(EngineError::Panicked(message.clone())))).collect()
        });
        w.set_load(batching.in_flight());
        for (tag, answer) in ended {
            if let Some(i) = replies.iter().position(|r| r.0 == tag) {
                let (_, reply, _) = replies.swap_remove(i);
                let _ = reply.send(answer.map_err(|e| shutdown_error(&w.aborted, e)));
            }
        }
        oldest(&replies);
    }
}

/// The warm-up answer must have finite scores: NaN or infinite weights (a corrupt ONNX file)
/// make every logit NaN, and the server would answer the query itself to everything.
fn sane(g: Generation) -> Result<Generation, EngineError> {
    match g.candidates.first() {
        Some(c) if c.score.is_finite() && c.mean_logprob.is_finite() => Ok(g),
        Some(c) => Err(EngineError::Model(format!(
            "the warm-up answer has non-finite scores (score {}, mean log-probability {}): the model's \
             weights hold NaN or infinite values",
            c.score, c.mean_logprob
        ))),
        None => Err(EngineError::Model("the warm-up generation returned no candidate".into())),
    }
}

/// A job taken after the pool was aborted is refused; otherwise it runs with a cancel token
/// that the abort also trips. Either way the caller hears UNAVAILABLE (retry elsewhere), not
/// CANCELLED: the server stopped the call, the client did not.
fn unless_aborted<T>(
    aborted: &Arc<AtomicBool>,
    cancel: CancelToken,
    run: impl FnOnce(&CancelToken) -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    if aborted.load(Ordering::Relaxed) {
        Err(EngineError::Unavailable("server is shutting down".into()))
    } else {
        run(&cancel.linked_to(Arc::clone(aborted))).map_err(|e| shutdown_error(aborted, e))
    }
}

/// A request cancelled because the pool was aborted is UNAVAILABLE, not CANCELLED.
fn shutdown_error(aborted: &AtomicBool, e: EngineError) -> EngineError {
    match e {
        EngineError::Cancelled if aborted.load(Ordering::Relaxed) => EngineError::Unavailable(
            "server is shutting down: the call was stopped when the grace period ran out; retry".into(),
        ),
        other => other,
    }
}

/// A panicking engine answers with an error instead of taking its worker down.
fn run_guarded(
    engine: &mut dyn Engine,
    req: &GenerateRequest,
    cancel: &CancelToken,
) -> Result<Generation, EngineError> {
    cancel.check(0)?; // the client gave up while the job was queued
    guarded(|| engine.generate(req, cancel))?
}

/// Runs `f`, turning a panic into [`EngineError::Panicked`] with its message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        EngineError::Panicked(msg)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Candidate, GenerationParams, SearchKind, Timings};

    /// Echoes the query; counts calls; fails on "fail", panics on "panic".
    struct Echo {
        calls: usize,
    }

    impl Engine for Echo {
        fn generate(&mut self, req: &GenerateRequest, cancel: &CancelToken) -> Result<Generation, EngineError> {
            cancel.check(0)?;
            self.calls += 1;
            match req.query.as_str() {
                "fail" => Err(EngineError::Runtime("boom".into())),
                "panic" => panic!("engine bug"),
                q => Ok(Generation {
                    candidates: vec![Candidate {
                        text: format!("{q}|{}", self.calls),
                        score: 0.0,
                        mean_logprob: 0.0,
                        tokens: 1,
                    }],
                    timings: Timings { generated_tokens: 1, ..Timings::default() },
                    truncated: false,
                }),
            }
        }
        fn model_id(&self) -> &str {
            "echo"
        }
    }

    fn request(q: &str) -> GenerateRequest {
        GenerateRequest {
            query: q.into(),
            params: GenerationParams {
                max_new_tokens: 4,
                search: SearchKind::Greedy,
                ignore_eos: false,
                unguarded: false,
            },
            max_input_tokens: 16,
            truncate: false,
        }
    }

    fn pool(size: usize) -> EnginePool {
        let factory: EngineFactory = Arc::new(|_| Ok(Box::new(Echo { calls: 0 }) as Box<dyn Engine>));
        EnginePool::start(size, factory, request("warm")).unwrap()
    }

    #[tokio::test]
    async fn answers_jobs_and_survives_errors_and_panics() {
        let pool = pool(1);
        assert_eq!(pool.model_id(), "echo");
        let g = pool.generate(request("a"), CancelToken::new(None)).await.unwrap();
        assert_eq!(g.candidates[0].text, "a|2"); // warm-up was call 1
        assert!(matches!(pool.generate(request("fail"), CancelToken::new(None)).await, Err(EngineError::Runtime(_))));
        let panicked = pool.generate(request("panic"), CancelToken::new(None)).await;
        assert!(matches!(panicked, Err(EngineError::Panicked(ref m)) if m.contains("engine bug")), "{panicked:?}");
        // The worker is still alive.
        assert!(pool.generate(request("b"), CancelToken::new(None)).await.is_ok());
    }

    /// A batching engine: a request takes as many steps as its query has characters and answers
    /// with the query and the most requests it ever shared a step with; "panic" panics in a step.
    struct Stepper {
        running: Vec<(u64, String, usize)>,
        widest: usize,
    }

    impl Engine for Stepper {
        fn generate(&mut self, req: &GenerateRequest, _: &CancelToken) -> Result<Generation, EngineError> {
            Ok(answer(&req.query, 1))
        }
        fn model_id(&self) -> &str {
            "stepper"
        }
        fn batching(&mut self) -> Option<&mut dyn Batching> {
            Some(self)
        }
    }

    impl Batching for Stepper {
        fn join(&mut self, tag: u64, req: &GenerateRequest, _: CancelToken) -> Result<(), EngineError> {
            self.running.push((tag, req.query.clone(), req.query.len()));
            Ok(())
        }
        fn step(&mut self) -> Vec<(u64, Result<Generation, EngineError>)> {
            assert!(self.running.iter().all(|(_, q, _)| q != "panic"), "engine bug");
            self.widest = self.widest.max(self.running.len());
            self.running.iter_mut().for_each(|r| r.2 -= 1);
            let (done, running) = std::mem::take(&mut self.running).into_iter().partition(|r| r.2 == 0);
            self.running = running;
            done.into_iter().map(|(tag, q, _)| (tag, Ok(answer(&q, self.widest)))).collect::<Vec<_>>()
        }
        fn in_flight(&self) -> usize {
            self.running.len()
        }
        fn clear(&mut self) -> Vec<u64> {
            self.running.drain(..).map(|r| r.0).collect()
        }
    }

    fn answer(text: &str, widest: usize) -> Generation {
        Generation {
            candidates: vec![Candidate { text: format!("{text}|{widest}"), score: 0.0, mean_logprob: 0.0, tokens: 1 }],
            timings: Timings::default(),
            truncated: false,
        }
    }

    #[tokio::test]
    async fn a_batching_worker_steps_requests_together_and_survives_a_panic() {
        let factory: EngineFactory =
            Arc::new(|_| Ok(Box::new(Stepper { running: Vec::new(), widest: 0 }) as Box<dyn Engine>));
        let pool = Arc::new(EnginePool::start_batched(1, 4, factory, request("warm")).unwrap());
        let run = |q: &'static str| {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { pool.generate(request(q), CancelToken::new(None)).await })
        };
        // Six at once on one worker: at most four in flight, every one answered.
        let jobs: Vec<_> = ["aaaaaaaa", "bbbbbbbb", "cccccccc", "dddddddd", "ee", "ff"].into_iter().map(run).collect();
        let mut widest = 0;
        for job in jobs {
            let text = job.await.unwrap().unwrap().candidates[0].text.clone();
            widest = widest.max(text.rsplit('|').next().unwrap().parse::<usize>().unwrap());
        }
        assert!((2..=4).contains(&widest), "requests shared steps up to {widest}; the limit is 4");
        let stats = pool.batch_stats();
        assert!(stats.requests > stats.steps, "{stats:?}");
        // A panic in a step answers the requests it touched, and the worker goes on.
        let panicked = run("panic").await.unwrap();
        assert!(matches!(panicked, Err(EngineError::Panicked(ref m)) if m == "engine bug"), "{panicked:?}");
        assert!(run("after").await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn cancelled_job_is_not_run() {
        let pool = pool(1);
        let cancel = CancelToken::new(None);
        cancel.cancel();
        assert!(matches!(pool.generate(request("a"), cancel).await, Err(EngineError::Cancelled)));
    }

    #[tokio::test]
    async fn failing_factory_fails_start_with_its_error() {
        let factory: EngineFactory = Arc::new(|i| {
            if i == 1 {
                Err(ModelError::MissingFile("nope.onnx".into()))
            } else {
                Ok(Box::new(Echo { calls: 0 }) as Box<dyn Engine>)
            }
        });
        let err = EnginePool::start(2, factory, request("warm")).err().expect("start must fail");
        assert!(err.to_string().contains("nope.onnx"), "{err}");
    }

    #[tokio::test]
    async fn warm_up_with_non_finite_scores_fails_the_start() {
        struct Nan;
        impl Engine for Nan {
            fn generate(&mut self, req: &GenerateRequest, _: &CancelToken) -> Result<Generation, EngineError> {
                Ok(Generation {
                    candidates: vec![Candidate {
                        text: req.query.clone(),
                        score: f64::NAN,
                        mean_logprob: f64::NAN,
                        tokens: 1,
                    }],
                    timings: Timings::default(),
                    truncated: false,
                })
            }
            fn model_id(&self) -> &str {
                "nan"
            }
        }
        let factory: EngineFactory = Arc::new(|_| Ok(Box::new(Nan) as Box<dyn Engine>));
        let err = EnginePool::start(2, factory, request("warm")).err().expect("NaN scores must fail the start");
        assert!(err.to_string().contains("non-finite"), "{err}");
    }

    #[tokio::test]
    async fn failed_start_returns_only_after_every_worker_has_exited() {
        // Worker 0 fails at once; the others are still loading, as ONNX Runtime sessions would be.
        let loading = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let still = Arc::clone(&loading);
        let factory: EngineFactory = Arc::new(move |i| {
            if i == 0 {
                return Err(ModelError::MissingFile("bad.onnx".into()));
            }
            still.fetch_add(1, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(300));
            still.fetch_sub(1, Ordering::SeqCst);
            Ok(Box::new(Echo { calls: 0 }) as Box<dyn Engine>)
        });
        assert!(EnginePool::start(4, factory, request("warm")).is_err());
        assert_eq!(loading.load(Ordering::SeqCst), 0, "start returned while workers were still loading");
    }

    #[tokio::test]
    async fn jobs_cut_by_the_stop_are_unavailable_not_cancelled() {
        struct Slow;
        impl Engine for Slow {
            fn generate(&mut self, req: &GenerateRequest, cancel: &CancelToken) -> Result<Generation, EngineError> {
                for step in 0..if req.query == "warm" { 1 } else { 1000 } {
                    cancel.check(step)?;
                    thread::sleep(Duration::from_millis(5));
                }
                Echo { calls: 0 }.generate(req, cancel)
            }
            fn model_id(&self) -> &str {
                "slow"
            }
        }
        let factory: EngineFactory = Arc::new(|_| Ok(Box::new(Slow) as Box<dyn Engine>));
        let pool = Arc::new(EnginePool::start(1, factory, request("warm")).unwrap());
        let running = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.generate(request("long"), CancelToken::new(None)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.stop();
        let result = running.await.unwrap();
        assert!(matches!(result, Err(EngineError::Unavailable(ref m)) if m.contains("shutting down")), "{result:?}");
    }

    #[tokio::test]
    async fn stopped_pool_is_unavailable_and_its_threads_exit() {
        let pool = pool(2);
        assert!(pool.shutdown(Duration::from_secs(10)).await, "workers did not exit");
        assert!(matches!(pool.generate(request("a"), CancelToken::new(None)).await, Err(EngineError::Unavailable(_))));
    }
}
