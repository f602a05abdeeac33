//! The Reformulator gRPC service: validate -> cache -> admission -> engine -> response.
//! Evaluate and Benchmark reuse the same validation and engine path.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::Instant,
};

use qreformulate::{
    grounding::{QueryContext, WordRules},
    guards::{self, Answer, FallbackReason},
    pb,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::budget::{Budgets, CallBudget};
use crate::cache::{CacheKey, CacheStats, ResponseCache};
use crate::config::Config;
use crate::deadline;
use crate::engine::{
    pool::{BatchStats, EnginePool},
    CancelToken, Candidate, GenerateRequest, Generation,
};
use crate::error::ServiceError;
use crate::prometheus::Metrics;
use crate::validate::{self, Limits, ValidRequest};
use qreformulate::latency::{ms, LatencyRecorder};

mod evaluate;

use evaluate::SendRows;

/// Most warm-up generations in one Benchmark call.
pub const MAX_BENCHMARK_WARMUP: usize = 10_000;

/// Request outcomes since start, for the periodic stats log line.
#[derive(Debug, Default)]
pub struct Counters {
    pub ok: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub failed: AtomicU64,
}

/// State shared by all handlers.
pub struct Shared {
    limits: Limits,
    budgets: Budgets,
    max_concurrent: usize,
    pool: OnceLock<EnginePool>,
    /// The model's `grounding.json`, when it ships one.
    rules: Option<Arc<WordRules>>,
    cache: ResponseCache,
    admission: Arc<Semaphore>,
    shutting_down: AtomicBool,
    pub counters: Counters,
    pub metrics: Metrics,
}

impl Shared {
    /// `rules`: the model directory's grounding file (`None`: the guards' defaults).
    pub fn new(config: &Config, rules: Option<Arc<WordRules>>) -> Self {
        let max_concurrent = config.max_concurrent_requests.get();
        Self {
            limits: Limits::from(config),
            budgets: Budgets::from(config),
            max_concurrent,
            pool: OnceLock::new(),
            rules,
            cache: ResponseCache::new(config.cache_capacity),
            admission: Arc::new(Semaphore::new(max_concurrent)),
            shutting_down: AtomicBool::new(false),
            counters: Counters::default(),
            metrics: Metrics::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn rules(&self) -> Option<&WordRules> {
        self.rules.as_deref()
    }

    /// Makes the service ready (once the model is loaded and warmed up).
    pub fn set_pool(&self, pool: EnginePool) {
        if self.pool.set(pool).is_err() {
            tracing::error!("engine pool set twice; keeping the first");
        }
    }

    /// From now on requests are refused with UNAVAILABLE.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Stops the engine workers (after the drain) and waits a little for their threads.
    pub async fn stop_pool(&self) {
        if let Some(pool) = self.pool.get() {
            if !pool.shutdown(std::time::Duration::from_secs(5)).await {
                tracing::warn!("engine workers still busy 5 s after stop");
            }
        }
    }

    /// How long the longest-running generation has been running (zero before the model is
    /// ready or when the workers are idle).
    pub fn longest_busy(&self) -> std::time::Duration {
        self.pool.get().map_or(std::time::Duration::ZERO, EnginePool::longest_busy)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Continuous batching so far (zeros before the model is loaded).
    pub fn batch_stats(&self) -> BatchStats {
        self.pool.get().map(EnginePool::batch_stats).unwrap_or_default()
    }

    /// RPCs holding an admission permit now.
    pub fn in_flight(&self) -> usize {
        self.max_concurrent.saturating_sub(self.admission.available_permits())
    }

    fn ready_pool(&self) -> Result<&EnginePool, ServiceError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ServiceError::Unavailable("server is shutting down".into()));
        }
        self.pool.get().ok_or_else(|| ServiceError::Unavailable("model is still loading; retry shortly".into()))
    }

    /// One permit per in-flight request; none left means RESOURCE_EXHAUSTED now, not a queue.
    fn admit(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        Arc::clone(&self.admission).try_acquire_owned().map_err(|e| match e {
            TryAcquireError::NoPermits => {
                self.counters.rejected_busy.fetch_add(1, Ordering::Relaxed);
                ServiceError::ResourceExhausted(format!(
                    "server is at its limit of {} concurrent requests (--max-concurrent-requests); retry later",
                    self.max_concurrent
                ))
            }
            TryAcquireError::Closed => ServiceError::Unavailable("server is shutting down".into()),
        })
    }

    /// Waits for a permit until `until`: for the examples of an Evaluate stream, which hold one
    /// only while a generation runs (a stream that sends nothing holds none).
    async fn admit_waiting(&self, until: Instant) -> Result<OwnedSemaphorePermit, ServiceError> {
        match tokio::time::timeout_at(until.into(), Arc::clone(&self.admission).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ServiceError::Unavailable("server is shutting down".into())),
            Err(_) => Err(ServiceError::DeadlineExceeded(format!(
                "deadline exceeded waiting for one of the {} request slots (--max-concurrent-requests)",
                self.max_concurrent
            ))),
        }
    }

    /// Runs one generation; a client that goes away or runs out of time stops the decode loop.
    async fn generate(
        &self,
        pool: &EnginePool,
        req: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<Generation, ServiceError> {
        let cancel = CancelToken::new(deadline);
        // Dropped with this future: cancels the job when the client disconnects.
        let _cancel_on_drop = cancel.cancel_on_drop();
        let job = pool.generate(req, cancel.clone());
        match deadline {
            None => Ok(job.await?),
            Some(d) => match tokio::time::timeout_at(d.into(), job).await {
                Ok(result) => Ok(result?),
                Err(_) => Err(ServiceError::DeadlineExceeded("deadline exceeded before the model finished".into())),
            },
        }
    }

    pub async fn reformulate(
        &self,
        req: pb::ReformulateRequest,
        deadline: Option<Instant>,
        received: Instant,
    ) -> Result<pb::ReformulateResponse, ServiceError> {
        let pool = self.ready_pool()?;
        let valid = validate::request(&req.query, req.options.as_ref(), &self.limits)?;
        let key = self.cache.enabled().then(|| CacheKey::new(&valid));
        if let Some(hit) = key.as_ref().filter(|_| !req.skip_cache).and_then(|k| self.cache.get(k)) {
            let mut response = (*hit).clone();
            response.timings =
                Some(pb::Timings { total_ms: ms(received.elapsed()), cached: true, ..Default::default() });
            return Ok(response);
        }
        let _permit = self.admit()?;
        let generation = self.generate(pool, valid.to_engine(&self.limits), deadline).await?;
        let response = build_response(&valid, &generation, pool.model_id(), self.rules());
        if let Some(key) = key {
            self.cache.insert(key, response.clone());
        }
        Ok(response)
    }

    pub async fn benchmark(
        &self,
        req: pb::BenchmarkRequest,
        deadline: Option<Instant>,
    ) -> Result<pb::BenchmarkResponse, ServiceError> {
        let pool = self.ready_pool()?;
        if req.queries.is_empty() {
            return Err(ServiceError::InvalidArgument("queries is empty; Benchmark needs at least one".into()));
        }
        let repeat = req.repeat.max(1) as usize;
        let runs = req.queries.len().saturating_mul(repeat);
        if runs > self.budgets.max_benchmark_runs {
            return Err(ServiceError::InvalidArgument(format!(
                "queries x repeat is {} x {repeat} = {runs}; the limit is {} (--max-benchmark-runs)",
                req.queries.len(),
                self.budgets.max_benchmark_runs
            )));
        }
        let warmup = req.warmup as usize;
        if warmup > MAX_BENCHMARK_WARMUP {
            return Err(ServiceError::InvalidArgument(format!(
                "warmup is {warmup}; the limit is {MAX_BENCHMARK_WARMUP}"
            )));
        }
        let mut queries = Vec::with_capacity(req.queries.len());
        for (i, q) in req.queries.iter().enumerate() {
            queries.push(validate::query(q, &self.limits).map_err(|e| match e {
                ServiceError::InvalidArgument(m) => ServiceError::InvalidArgument(format!("queries[{i}]: {m}")),
                other => other,
            })?);
        }
        let (params, truncate) =
            validate::options(req.options.as_ref().unwrap_or(&pb::GenerationOptions::default()), &self.limits)?;
        self.budgets.check_benchmark(warmup + runs, &params)?;
        let mut req =
            GenerateRequest { query: String::new(), params, max_input_tokens: self.limits.max_input_tokens, truncate };

        let _permit = self.admit()?;
        // Each run is its own job in the workers' queue, so other calls' jobs take turns with
        // the benchmark's instead of waiting for all of it.
        let budget = CallBudget::start("Benchmark", &self.budgets, deadline);
        for i in 0..warmup {
            req.query.clone_from(&queries[i % queries.len()]);
            self.generate(pool, req.clone(), Some(budget.deadline()))
                .await
                .map_err(|e| budget.explain(e, &format!("after {i} of {warmup} warm-up runs")))?;
        }
        let mut timings = Vec::with_capacity(runs);
        let started = Instant::now();
        for _ in 0..repeat {
            for q in &queries {
                req.query.clone_from(q);
                let generation = self
                    .generate(pool, req.clone(), Some(budget.deadline()))
                    .await
                    .map_err(|e| budget.explain(e, &format!("after {} of {runs} runs", timings.len())))?;
                timings.push(generation.timings);
            }
        }
        let run = BenchmarkRun { runs: timings, wall: started.elapsed() };

        let mut latency = LatencyRecorder::new();
        let (mut tokens, mut tokenize, mut encode, mut decode) = (0u64, 0.0, 0.0, 0.0);
        for t in &run.runs {
            latency.record(t.total);
            tokens += t.generated_tokens as u64;
            tokenize += ms(t.tokenize);
            encode += ms(t.encode);
            decode += ms(t.decode);
        }
        let n = run.runs.len().max(1) as f64;
        let wall = run.wall.as_secs_f64();
        Ok(pb::BenchmarkResponse {
            latency: Some(latency.summary()),
            requests: run.runs.len() as u64,
            generated_tokens: tokens,
            tokens_per_second: if wall > 0.0 { tokens as f64 / wall } else { 0.0 },
            wall_seconds: wall,
            mean_tokenize_ms: tokenize / n,
            mean_encode_ms: encode / n,
            mean_decode_ms: decode / n,
            model_id: pool.model_id().to_owned(),
        })
    }
}

/// The measured runs of one Benchmark call and the wall time they took together.
struct BenchmarkRun {
    runs: Vec<crate::engine::Timings>,
    wall: std::time::Duration,
}

/// What is served for one candidate: the guards' answer, or the plain split when the request
/// is unguarded.
fn answer(candidate: &Candidate, valid: &ValidRequest, ctx: &QueryContext<'_>) -> Answer {
    let text = served_text(&candidate.text);
    let mut answer = if valid.params.unguarded {
        guards::unguarded(&text, &valid.query)
    } else {
        guards::sanitize_in(&text, &valid.query, ctx, Some(candidate.mean_logprob))
    };
    clean_subqueries(&mut answer.subqueries);
    answer
}

/// Byte-level tokens can decode to U+FFFD (half a character): it is never served.
fn served_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\u{FFFD}') {
        text.replace('\u{FFFD}', "").into()
    } else {
        text.into()
    }
}

/// `|` separates subqueries and U+FFFD is no text: neither is left in a served subquery (a
/// fallback is the query itself, which may hold both).
fn clean_subqueries(subqueries: &mut Vec<String>) {
    for s in subqueries.iter_mut() {
        if s.contains(['|', '\u{FFFD}']) {
            *s = qreformulate::subqueries::collapse_whitespace(&s.replace('|', " ").replace('\u{FFFD}', ""));
        }
    }
    // Never empty: a query of nothing but separators keeps its (empty) answer.
    if subqueries.iter().any(|s| !s.is_empty()) {
        subqueries.retain(|s| !s.is_empty());
    }
}

/// The wire response for one generation: best candidate's answer, and all candidates when
/// more than one was asked for. `rules`: the model's grounding file.
pub fn build_response(
    valid: &ValidRequest,
    generation: &Generation,
    model_id: &str,
    rules: Option<&WordRules>,
) -> pb::ReformulateResponse {
    let ctx = rules.unwrap_or(WordRules::defaults()).context(&valid.query);
    let listed = if valid.params.search.num_return_sequences() > 1 { generation.candidates.len() } else { 1 };
    let mut answers: Vec<(Answer, &Candidate)> =
        generation.candidates.iter().take(listed).map(|c| (answer(c, valid, &ctx), c)).collect();
    let candidates = if listed > 1 {
        answers
            .iter()
            .map(|(a, c)| pb::Candidate {
                subqueries: a.subqueries.clone(),
                text: served_text(&c.text).into_owned(),
                score: c.score,
                fallback_reason: pb::FallbackReason::from(a.fallback).into(),
                mean_logprob: c.mean_logprob,
            })
            .collect()
    } else {
        Vec::new()
    };
    let (best, best_candidate) = answers.swap_remove(0);
    let t = &generation.timings;
    pb::ReformulateResponse {
        subqueries: best.subqueries,
        fallback_reason: pb::FallbackReason::from(best.fallback).into(),
        mean_logprob: best_candidate.mean_logprob,
        grounded: rules.is_some_and(WordRules::grounded) && !valid.params.unguarded,
        candidates,
        timings: Some(pb::Timings {
            tokenize_ms: ms(t.tokenize),
            encode_ms: ms(t.encode),
            decode_ms: ms(t.decode),
            total_ms: ms(t.total),
            generated_tokens: u32::try_from(t.generated_tokens).unwrap_or(u32::MAX),
            input_tokens: u32::try_from(t.input_tokens).unwrap_or(u32::MAX),
            cached: false,
            decoder_steps: u32::try_from(t.decoder_steps).unwrap_or(u32::MAX),
        }),
        model_id: model_id.to_owned(),
        truncated: generation.truncated,
    }
}

/// Counts an RPC as abandoned when its handler future is dropped before it answered.
struct Abandonment<'a> {
    metrics: &'a Metrics,
    rpc: &'static str,
    answered: bool,
}

impl<'a> Abandonment<'a> {
    fn watch(metrics: &'a Metrics, rpc: &'static str) -> Self {
        Self { metrics, rpc, answered: false }
    }
}

impl Drop for Abandonment<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics.abandoned(self.rpc);
        }
    }
}

/// The tonic service: thin wrappers that log and map errors.
#[derive(Clone)]
pub struct ReformulatorService {
    shared: Arc<Shared>,
}

impl ReformulatorService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn outcome<T>(&self, rpc: &str, started: Instant, result: &Result<T, ServiceError>) {
        let c = &self.shared.counters;
        let code = result.as_ref().map_or_else(ServiceError::code, |_| tonic::Code::Ok);
        self.shared.metrics.observe(rpc, code, started.elapsed());
        match result {
            Ok(_) => {
                c.ok.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(rpc, ms = ms(started.elapsed()), "ok");
            }
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(rpc, ms = ms(started.elapsed()), error = %e, "failed");
            }
        }
    }
}

#[tonic::async_trait]
impl pb::reformulator_server::Reformulator for ReformulatorService {
    async fn reformulate(
        &self,
        request: Request<pb::ReformulateRequest>,
    ) -> Result<Response<pb::ReformulateResponse>, Status> {
        let received = Instant::now();
        let deadline = deadline::from_metadata(request.metadata(), received);
        crate::layers::access::note_query(request.extensions(), &request.get_ref().query);
        let mut watch = Abandonment::watch(&self.shared.metrics, "Reformulate");
        let result = self.shared.reformulate(request.into_inner(), deadline, received).await;
        watch.answered = true;
        self.outcome("Reformulate", received, &result);
        if let Ok(r) = &result {
            if let Some(t) = r.timings.as_ref().filter(|t| !t.cached) {
                self.shared.metrics.generated(t);
            }
            if let Some(reason) = Option::<FallbackReason>::from(r.fallback_reason()) {
                self.shared.metrics.fallback(reason);
            }
            // cache_stats() settles the cache's pending work: only for a log line someone reads.
            if tracing::enabled!(tracing::Level::DEBUG) {
                let cache = self.shared.cache_stats();
                tracing::debug!(
                    subqueries = r.subqueries.len(),
                    fallback = r.fallback_reason().as_str_name(),
                    cached = r.timings.as_ref().is_some_and(|t| t.cached),
                    cache_hits = cache.hits,
                    cache_misses = cache.misses,
                    "reformulated"
                );
            }
        }
        result.map(Response::new).map_err(Status::from)
    }

    async fn evaluate(
        &self,
        request: Request<Streaming<pb::EvaluateRequest>>,
    ) -> Result<Response<pb::EvaluateResponse>, Status> {
        let received = Instant::now();
        let deadline = deadline::from_metadata(request.metadata(), received);
        let mut watch = Abandonment::watch(&self.shared.metrics, "Evaluate");
        let result = self.shared.evaluate(request.into_inner(), deadline).await;
        watch.answered = true;
        self.outcome("Evaluate", received, &result);
        if let Ok(r) = &result {
            tracing::info!(examples = r.examples.len(), ms = ms(received.elapsed()), "evaluated");
        }
        result.map(Response::new).map_err(Status::from)
    }

    type EvaluateStreamStream = ReceiverStream<Result<pb::EvaluateProgress, Status>>;

    async fn evaluate_stream(
        &self,
        request: Request<Streaming<pb::EvaluateRequest>>,
    ) -> Result<Response<Self::EvaluateStreamStream>, Status> {
        const RPC: &str = "EvaluateStream";
        let received = Instant::now();
        let deadline = deadline::from_metadata(request.metadata(), received);
        // Rows wait here while the client reads; HTTP/2 flow control holds the rest.
        let (tx, rx) = mpsc::channel(16);
        let service = self.clone();
        let stream = request.into_inner();
        tokio::spawn(async move {
            let mut rows = SendRows::new(tx.clone());
            let scored = service.shared.score_examples(RPC, stream, deadline, &mut rows);
            // A client that goes away drops `rx`: the call stops and its generation with it.
            let result = tokio::select! {
                result = scored => result,
                () = tx.closed() => {
                    service.shared.metrics.abandoned(RPC);
                    return;
                }
            };
            service.outcome(RPC, received, &result);
            if let Ok(summary) = &result {
                tracing::info!(
                    ms = ms(received.elapsed()),
                    examples = summary.latency.as_ref().map_or(0, |l| l.count),
                    "evaluated (streamed)"
                );
            }
            let last = result
                .map(|summary| pb::EvaluateProgress { item: Some(pb::evaluate_progress::Item::Summary(summary)) })
                .map_err(Status::from);
            let _ = tx.send(last).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn benchmark(
        &self,
        request: Request<pb::BenchmarkRequest>,
    ) -> Result<Response<pb::BenchmarkResponse>, Status> {
        let received = Instant::now();
        let deadline = deadline::from_metadata(request.metadata(), received);
        let mut watch = Abandonment::watch(&self.shared.metrics, "Benchmark");
        let result = self.shared.benchmark(request.into_inner(), deadline).await;
        watch.answered = true;
        self.outcome("Benchmark", received, &result);
        result.map(Response::new).map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{GenerationParams, SearchKind, Timings};

    const QUERY: &str = "Who lived longer, Ada Lovelace or Bob Dylan?";

    fn generation(texts: &[&str]) -> Generation {
        Generation {
            candidates: texts
                .iter()
                .map(|t| Candidate { text: (*t).into(), score: -1.0, mean_logprob: -0.25, tokens: 3 })
                .collect(),
            timings: Timings { generated_tokens: 3, input_tokens: 9, ..Timings::default() },
            truncated: false,
        }
    }

    fn valid(search: SearchKind) -> ValidRequest {
        ValidRequest {
            query: QUERY.into(),
            params: GenerationParams { max_new_tokens: 8, search, ignore_eos: false, unguarded: false },
            truncate: false,
        }
    }

    fn rules(generative: &[&str]) -> WordRules {
        let json = serde_json::json!({"version": 1, "generative_words": generative, "known_words": []});
        WordRules::parse(&json.to_string()).unwrap()
    }

    #[test]
    fn response_answers_the_best_candidate_and_omits_single_candidates() {
        let r = build_response(&valid(SearchKind::Greedy), &generation(&["Ada lifespan | Bob  lifespan"]), "m", None);
        assert_eq!(r.subqueries, vec!["Ada lifespan", "Bob lifespan"]);
        assert!(r.candidates.is_empty());
        assert_eq!(r.model_id, "m");
        assert_eq!((r.fallback_reason(), r.mean_logprob, r.grounded), (pb::FallbackReason::None, -0.25, false));
        let t = r.timings.unwrap();
        assert_eq!((t.generated_tokens, t.input_tokens, t.cached), (3, 9, false));
    }

    #[test]
    fn response_lists_candidates_with_their_fallbacks() {
        let search = SearchKind::Beam { num_beams: 3, num_return_sequences: 3 };
        let r = build_response(&valid(search), &generation(&["Ada | Bob", " | ", "Mars | Venus"]), "m", None);
        assert_eq!(r.candidates.len(), 3);
        assert_eq!(r.candidates[0].subqueries, vec!["Ada", "Bob"]);
        assert_eq!(r.subqueries, r.candidates[0].subqueries);
        // An empty candidate and an off-topic one fall back to the query.
        let fallbacks: Vec<_> = r.candidates.iter().map(|c| (c.subqueries[0].as_str(), c.fallback_reason())).collect();
        assert_eq!(fallbacks[1], (QUERY, pb::FallbackReason::Empty));
        assert_eq!(fallbacks[2], (QUERY, pb::FallbackReason::OffTopic));
        assert!(r.candidates.iter().all(|c| c.mean_logprob == -0.25));
    }

    #[test]
    fn grounding_file_drops_invented_words_unless_unguarded() {
        let rules = rules(&["lifespan"]);
        let text = "Ada Lovelace Lifespan | Bob Dylon Lifespan";
        let r = build_response(&valid(SearchKind::Greedy), &generation(&[text]), "m", Some(&rules));
        assert_eq!(r.subqueries, vec!["Ada Lovelace Lifespan"]);
        assert!(r.grounded);
        let r = build_response(&valid(SearchKind::Greedy), &generation(&["Bob Dylon Lifespan"]), "m", Some(&rules));
        assert_eq!((r.fallback_reason(), r.subqueries), (pb::FallbackReason::Ungrounded, vec![QUERY.to_owned()]));
        let mut unguarded = valid(SearchKind::Greedy);
        unguarded.params.unguarded = true;
        let r = build_response(&unguarded, &generation(&[text]), "m", Some(&rules));
        assert_eq!(r.subqueries, qreformulate::subqueries::split(text, QUERY));
        assert!(!r.grounded);
    }

    #[test]
    fn served_subqueries_hold_no_separator_and_no_replacement_character() {
        let r = build_response(
            &valid(SearchKind::Greedy),
            &generation(&["Ada\u{FFFD} lifespan | Bob lifespan"]),
            "m",
            None,
        );
        assert_eq!(r.subqueries, vec!["Ada lifespan", "Bob lifespan"]);
        // A fallback is the query, which may hold the separator.
        let mut piped = valid(SearchKind::Greedy);
        piped.query = "Ada | Bob lifespan?".into();
        let r = build_response(&piped, &generation(&[""]), "m", None);
        assert_eq!(
            (r.fallback_reason(), r.subqueries),
            (pb::FallbackReason::Empty, vec!["Ada Bob lifespan?".to_owned()])
        );
    }

    #[test]
    fn low_confidence_falls_back() {
        let mut rules = rules(&["lifespan"]);
        rules.min_mean_logprob = Some(-0.1);
        let r = build_response(&valid(SearchKind::Greedy), &generation(&["Ada Lifespan"]), "m", Some(&rules));
        assert_eq!((r.fallback_reason(), r.subqueries), (pb::FallbackReason::LowConfidence, vec![QUERY.to_owned()]));
    }
}
