//! Server configuration: one struct from flags and environment, passed down whole.

use std::{
    net::SocketAddr,
    num::{NonZeroU64, NonZeroUsize},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, ValueEnum};

use crate::engine::{
    native::{kernels::Kernel, WeightFormat},
    DecoderKind,
};

/// The model shipped with the repository.
pub const DEFAULT_MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/qreformulate-t5");

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// qserver: gRPC service that rewrites a natural-language question into search-engine
/// subqueries with an int8 T5 model on ONNX Runtime (CPU).
#[derive(Debug, Clone, Parser)]
#[command(name = "qserver", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on. Loopback by default: set 0.0.0.0:50051 (as the container
    /// image does) to serve other hosts.
    #[arg(long, env = "QSERVER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Server certificate chain (PEM). With --tls-key, the server speaks TLS only.
    #[arg(long, env = "QSERVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "QSERVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificate(s) (PEM) for mutual TLS: every client must present a certificate signed
    /// by one of them. Needs --tls-cert and --tls-key.
    #[arg(long, env = "QSERVER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// File of accepted bearer tokens, one per line (`#` starts a comment). With it or
    /// QSERVER_AUTH_TOKENS, every call but the standard health service needs
    /// `authorization: Bearer <token>`.
    #[arg(long, env = "QSERVER_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Accepted bearer tokens, comma-separated (prefer the environment variable to the flag:
    /// command lines are visible to other local users).
    #[arg(long, env = "QSERVER_AUTH_TOKENS", value_delimiter = ',', hide_env_values = true)]
    pub auth_tokens: Vec<String>,

    /// Serve gRPC server reflection (v1 and v1alpha), which lists the services and their schema.
    #[arg(long, env = "QSERVER_REFLECTION")]
    pub reflection: bool,

    /// Put each Reformulate query's text in its access-log line (off: queries may be personal data).
    #[arg(long, env = "QSERVER_LOG_QUERIES")]
    pub log_queries: bool,

    /// Most concurrent HTTP/2 streams (calls) per connection; further calls wait on the client.
    #[arg(long, env = "QSERVER_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub max_concurrent_streams: u32,

    /// Seconds between HTTP/2 keepalive pings on a connection; 0 turns pings off.
    #[arg(long, env = "QSERVER_KEEPALIVE_INTERVAL_SECS", default_value_t = 60)]
    pub keepalive_interval_secs: u64,

    /// Seconds to wait for a keepalive ping's answer before closing the connection.
    #[arg(long, env = "QSERVER_KEEPALIVE_TIMEOUT_SECS", default_value_t = 20)]
    pub keepalive_timeout_secs: u64,

    /// Seconds after which a connection is told to go away (GOAWAY) and the client reconnects,
    /// so that load spreads to new replicas and idle connections end; 0 keeps connections.
    #[arg(long, env = "QSERVER_MAX_CONNECTION_AGE_SECS", default_value_t = 300)]
    pub max_connection_age_secs: u64,

    /// Seconds a connection may go without a call in flight before it is told to go away
    /// (GOAWAY; the client reconnects on its next call), so that idle connections do not pile
    /// up; 0 keeps them (until their age).
    #[arg(long, env = "QSERVER_IDLE_TIMEOUT_SECS", default_value_t = 120)]
    pub idle_timeout_secs: u64,

    /// Seconds a connection told to go away (age, idle timeout, shutdown) may still finish its
    /// calls before it is closed with whatever still runs (listener.rs).
    #[arg(long, env = "QSERVER_MAX_CONNECTION_AGE_GRACE_SECS", default_value_t = 60)]
    pub max_connection_age_grace_secs: u64,

    /// Largest request header list (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE), in bytes.
    #[arg(long, env = "QSERVER_MAX_HEADER_LIST_BYTES", default_value_t = 16 * 1024)]
    pub max_header_list_bytes: u32,

    /// Largest request message, in bytes (larger: OUT_OF_RANGE, as tonic answers).
    #[arg(long, env = "QSERVER_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Largest response message, in bytes (an Evaluate or Benchmark answer over it fails with
    /// OUT_OF_RANGE). The default holds an Evaluate answer for 100 000 examples (its limit).
    #[arg(long, env = "QSERVER_MAX_RESPONSE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_response_bytes: usize,

    /// Seconds a started request body may stall (no bytes from the client) before the call is
    /// failed and its buffers freed; 0 waits forever.
    #[arg(long, env = "QSERVER_REQUEST_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub request_body_timeout_secs: u64,

    /// Address of the Prometheus metrics endpoint (plain HTTP, `GET /metrics`); off when unset.
    #[arg(long, env = "QSERVER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Model directory in Hugging Face Optimum's T5 ONNX layout (encoder_model.onnx,
    /// decoder_model.onnx, decoder_with_past_model.onnx, config.json, tokenizer.json).
    #[arg(long, env = "QSERVER_MODEL", default_value = DEFAULT_MODEL_DIR)]
    pub model: PathBuf,

    /// ONNX Runtime shared library (libonnxruntime.so.1.31.1). Default: next to the
    /// executable, then the repository's .ort/ (filled by `make runtime`).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib: Option<PathBuf>,

    /// Engine workers, each a thread with its own model sessions [default: available cores].
    #[arg(long, env = "QSERVER_WORKERS")]
    pub workers: Option<NonZeroUsize>,

    /// Who runs the decoder steps: `native` (the Rust int8 decoder on the model's
    /// pytorch/model.safetensors), `onnx` (ONNX Runtime on the decoder files), or `auto` (native
    /// when the checkpoint exists).
    #[arg(long, env = "QSERVER_DECODER", value_enum, default_value_t = DecoderKind::Auto)]
    pub decoder: DecoderKind,

    /// The native decoder's int8 kernel: the fastest the CPU supports when unset. Set it to
    /// compare kernels side by side; a kernel the CPU cannot run is refused at start-up.
    #[arg(long, env = "QSERVER_NATIVE_KERNEL", value_enum)]
    pub native_kernel: Option<Kernel>,

    /// How the native decoder stores its step weights: `int8` (one scale per row), or `q4`
    /// (4-bit blocks of 32: half the bytes read per step, faster on large models; answers differ
    /// slightly, measured in docs/performance.md). Matrices whose shape q4 cannot hold stay int8.
    #[arg(long, env = "QSERVER_NATIVE_WEIGHTS", value_enum, default_value_t = WeightFormat::Int8)]
    pub native_weights: WeightFormat,

    /// Let ONNX Runtime's int8 products saturate on x86 CPUs without VNNI, as it does by
    /// default: each pair of uint8 x int8 products is added into 16 bits with saturation there.
    /// Off, every CPU computes them exactly and answers alike. On, an AVX2 Zen 3 served about 8%
    /// more requests at concurrency 8, and 83 of the corpus test split's 1335 answers differed
    /// (docs/performance.md, session 15).
    #[arg(long, env = "QSERVER_SATURATING_INT8")]
    pub saturating_int8: bool,

    /// Threads per generation: ONNX Runtime intra-op threads per session (spinning is turned
    /// off above 1) and the native decoder's threads per worker.
    #[arg(long, env = "QSERVER_INTRA_OP_THREADS", default_value_t = NonZeroUsize::MIN)]
    pub intra_op_threads: NonZeroUsize,

    /// Continuous batching: requests each engine worker decodes together, joining and leaving
    /// between decoder steps, so that each step reads the weights once for all of them (native
    /// decoder on int8 weights only; answers are the same as one at a time). 1 serves one
    /// request at a time. Unset: what measured best for the native kernel in use (8 with
    /// AVX-512 VNNI, 2 otherwise, 1 for the scalar kernel; docs/performance.md, session 10).
    #[arg(long, env = "QSERVER_MAX_BATCH_REQUESTS")]
    pub max_batch_requests: Option<NonZeroUsize>,

    /// Draft tokens per decoder step (prompt lookup, native decoder): a one-row search (greedy,
    /// or sampling one sequence) feeds up to this many tokens guessed from the query and its own
    /// answer after its next token, and keeps those the model would have chosen anyway: answers
    /// are the same as without drafts, in fewer steps. Only while the step has rows to spare
    /// (up to 4 with AVX-512 VNNI, 2 with AVX2, none otherwise; on 4-bit weights 2 with AVX2,
    /// none otherwise), so a full batch is unaffected. 0 turns drafting off.
    #[arg(long, env = "QSERVER_DRAFT_TOKENS", default_value_t = 3)]
    pub draft_tokens: usize,

    /// Requests handled at once (Reformulate, Evaluate and Benchmark calls); more are
    /// refused with RESOURCE_EXHAUSTED instead of queueing.
    #[arg(long, env = "QSERVER_MAX_CONCURRENT_REQUESTS", default_value = "64")]
    pub max_concurrent_requests: NonZeroUsize,

    /// Longest accepted query, in characters.
    #[arg(long, env = "QSERVER_MAX_QUERY_CHARS", default_value = "2000")]
    pub max_query_chars: NonZeroUsize,

    /// Longest accepted query, in model tokens (longer ones are refused unless the request
    /// sets options.truncate).
    #[arg(long, env = "QSERVER_MAX_INPUT_TOKENS", default_value = "256")]
    pub max_input_tokens: NonZeroUsize,

    /// Generated-token budget when a request leaves options.max_new_tokens at 0. The training
    /// targets are clipped at 96 tokens; at 64, answers naming three long or accented names lost
    /// their third subquery.
    #[arg(long, env = "QSERVER_DEFAULT_MAX_NEW_TOKENS", default_value = "96")]
    pub default_max_new_tokens: NonZeroUsize,

    /// Largest options.max_new_tokens a request may ask for.
    #[arg(long, env = "QSERVER_MAX_NEW_TOKENS_LIMIT", default_value = "256")]
    pub max_new_tokens_limit: NonZeroUsize,

    /// Response cache entries (normalised query + all options); 0 disables the cache.
    #[arg(long, env = "QSERVER_CACHE_CAPACITY", default_value_t = 10_000)]
    pub cache_capacity: u64,

    // --- Work budgets of one Evaluate or Benchmark call (docs/service.md, "Limits") ---
    /// Most examples one Evaluate call may stream.
    #[arg(long, env = "QSERVER_MAX_EVALUATE_EXAMPLES", default_value = "100000")]
    pub max_evaluate_examples: NonZeroUsize,

    /// Most measured generations (queries x repeat) in one Benchmark call.
    #[arg(long, env = "QSERVER_MAX_BENCHMARK_RUNS", default_value = "100000")]
    pub max_benchmark_runs: NonZeroUsize,

    /// Most tokens one Evaluate or Benchmark call may generate, counted once per beam or
    /// sample. Benchmark plans whose worst case is over it are refused up front; an
    /// evaluation is stopped when it gets there.
    #[arg(long, env = "QSERVER_MAX_CALL_TOKENS", default_value = "2000000")]
    pub max_call_tokens: NonZeroU64,

    /// Wall-clock budget of one Evaluate or Benchmark call, in seconds; the call is stopped
    /// with RESOURCE_EXHAUSTED when it runs out.
    #[arg(long, env = "QSERVER_MAX_CALL_SECS", default_value = "600")]
    pub max_call_secs: NonZeroU64,

    /// Longest label of one Evaluate example (its expected_subqueries together, plus kind),
    /// in characters.
    #[arg(long, env = "QSERVER_MAX_LABEL_CHARS", default_value = "4000")]
    pub max_label_chars: NonZeroUsize,

    /// Largest Evaluate response, in bytes (gRPC clients refuse messages over 4 MiB by default).
    #[arg(long, env = "QSERVER_MAX_EVALUATE_RESPONSE_BYTES", default_value = "4194304")]
    pub max_evaluate_response_bytes: NonZeroUsize,
    /// A worker on one generation for longer than this many seconds counts as stuck: health
    /// says NOT_SERVING until it is free again.
    #[arg(long, env = "QSERVER_STUCK_WORKER_SECS", default_value = "60")]
    pub stuck_worker_secs: NonZeroU64,
    // --- end of work budgets ---
    /// Seconds to let in-flight requests finish after a shutdown signal.
    #[arg(long, env = "QSERVER_GRACE_PERIOD_SECS", default_value_t = 10)]
    pub grace_period_secs: u64,

    /// Log format.
    #[arg(long, env = "QSERVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `qserver=debug,info` (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "QSERVER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl Config {
    /// Checks relations between fields that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.default_max_new_tokens > self.max_new_tokens_limit {
            return Err(format!(
                "--default-max-new-tokens {} is above --max-new-tokens-limit {}",
                self.default_max_new_tokens, self.max_new_tokens_limit
            ));
        }
        if self.keepalive_interval_secs > 0 && self.keepalive_timeout_secs == 0 {
            return Err("--keepalive-timeout-secs must be above 0 when keepalive pings are on".into());
        }
        if self.max_concurrent_streams == 0 {
            return Err("--max-concurrent-streams must be at least 1".into());
        }
        Ok(())
    }

    /// Whether the server speaks TLS.
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// A duration flag where 0 means "off".
    pub fn secs_or_off(secs: u64) -> Option<Duration> {
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    /// Workers to start: the flag, or one per available core.
    pub fn worker_count(&self) -> usize {
        self.workers
            .map(NonZeroUsize::get)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
    }

    /// Whether every thread of every worker has a core of its own (`--workers` x
    /// `--intra-op-threads` at most the available cores): only then may threads busy-wait.
    pub fn threads_have_cores(&self) -> bool {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        self.worker_count() * self.intra_op_threads.get() <= cores
    }

    /// `--max-batch-requests`, or the default of the native kernel in use (call it after
    /// `--native-kernel` is applied, so the kernel it asks about is the one that will run).
    pub fn batch_requests(&self) -> usize {
        self.max_batch_requests
            .map_or_else(|| crate::engine::native::kernels::kernel().batch_requests(), NonZeroUsize::get)
    }

    pub fn stuck_worker_time(&self) -> Duration {
        Duration::from_secs(self.stuck_worker_secs.get())
    }

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batching_follows_the_kernel_unless_set() {
        let set = Config::try_parse_from(["qserver", "--max-batch-requests", "3"]).unwrap();
        assert_eq!(set.batch_requests(), 3);
        let one = Config::try_parse_from(["qserver", "--max-batch-requests", "1"]).unwrap();
        assert_eq!(one.batch_requests(), 1);
        let unset = Config::try_parse_from(["qserver"]).unwrap();
        let kernel = crate::engine::native::kernels::kernel();
        assert_eq!(unset.batch_requests(), kernel.batch_requests(), "{} kernel", kernel.name());
        // Only a kernel with a product to share batches by default; VNNI, whose batched product
        // stays bound by reading the weights up to 8 rows, the most.
        assert_eq!(Kernel::Scalar.batch_requests(), 1);
        assert_eq!(Kernel::Avx2.batch_requests(), 2);
        assert_eq!(Kernel::Avx512Vnni.batch_requests(), 8);
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = Config::try_parse_from(["qserver"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051", "loopback unless told otherwise");
        assert!(!c.reflection && !c.log_queries && !c.tls() && c.auth_tokens.is_empty());
        assert_eq!(c.max_concurrent_streams, 100);
        assert_eq!(c.max_connection_age_secs, 300);
        assert_eq!(c.idle_timeout_secs, 120);
        assert_eq!(c.max_request_bytes, 4 << 20);
        assert_eq!(c.max_response_bytes, 64 << 20);
        assert!(c.model.ends_with("models/qreformulate-t5"));
        assert_eq!(c.intra_op_threads.get(), 1);
        assert_eq!(c.decoder, DecoderKind::Auto);
        assert_eq!(c.native_kernel, None);
        assert_eq!(c.native_weights, WeightFormat::Int8);
        assert!(!c.saturating_int8, "exact int8 products unless asked");
        assert_eq!(c.max_batch_requests, None, "chosen by the kernel unless set");
        assert_eq!(c.max_concurrent_requests.get(), 64);
        assert_eq!(c.max_query_chars.get(), 2000);
        assert_eq!(c.max_input_tokens.get(), 256);
        assert_eq!(c.default_max_new_tokens.get(), 96);
        assert_eq!(c.max_new_tokens_limit.get(), 256);
        assert_eq!(c.cache_capacity, 10_000);
        assert_eq!(c.grace_period_secs, 10);
        assert_eq!((c.max_evaluate_examples.get(), c.max_benchmark_runs.get()), (100_000, 100_000));
        assert_eq!((c.max_call_tokens.get(), c.max_call_secs.get()), (2_000_000, 600));
        assert_eq!((c.max_label_chars.get(), c.max_evaluate_response_bytes.get()), (4000, 4 << 20));
        assert_eq!(c.stuck_worker_time(), Duration::from_secs(60));
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.worker_count() >= 1);
        c.validate().unwrap();
    }

    #[test]
    fn flags_parse_and_zero_limits_are_refused() {
        let c = Config::try_parse_from(["qserver", "--model", "/m", "--workers", "3", "--log-format", "json"]).unwrap();
        assert_eq!(c.model, PathBuf::from("/m"));
        assert_eq!(c.worker_count(), 3);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(Config::try_parse_from(["qserver", "--workers", "0"]).is_err());
        let c = Config::try_parse_from(["qserver", "--decoder", "onnx"]).unwrap();
        assert_eq!(c.decoder, DecoderKind::Onnx);
        assert!(Config::try_parse_from(["qserver", "--decoder", "gpu"]).is_err());
        let c = Config::try_parse_from(["qserver", "--native-kernel", "avx512-vnni"]).unwrap();
        assert_eq!(c.native_kernel, Some(Kernel::Avx512Vnni));
        assert!(Config::try_parse_from(["qserver", "--native-kernel", "neon"]).is_err());
        let c = Config::try_parse_from(["qserver", "--native-weights", "q4"]).unwrap();
        assert_eq!(c.native_weights, WeightFormat::Q4);
        assert!(Config::try_parse_from(["qserver", "--native-weights", "q2"]).is_err());
        assert!(Config::try_parse_from(["qserver", "--saturating-int8"]).unwrap().saturating_int8);
        assert!(Config::try_parse_from(["qserver", "--max-input-tokens", "0"]).is_err());
    }

    #[test]
    fn tls_flags_come_in_pairs() {
        assert!(Config::try_parse_from(["qserver", "--tls-cert", "c.pem"]).is_err());
        assert!(Config::try_parse_from(["qserver", "--tls-key", "k.pem"]).is_err());
        assert!(Config::try_parse_from(["qserver", "--tls-client-ca", "ca.pem"]).is_err());
        let c = Config::try_parse_from(["qserver", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        assert!(c.tls());
        let c = Config::try_parse_from(["qserver", "--auth-tokens", "a,b", "--reflection"]).unwrap();
        assert_eq!(c.auth_tokens, ["a", "b"]);
        assert!(c.reflection);
    }

    #[test]
    fn threads_spin_only_when_each_has_a_core() {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get).to_string();
        let one = Config::try_parse_from(["qserver", "--workers", "1", "--intra-op-threads", "1"]).unwrap();
        assert!(one.threads_have_cores());
        let all = Config::try_parse_from(["qserver", "--workers", &cores, "--intra-op-threads", "1"]).unwrap();
        assert!(all.threads_have_cores());
        // Every worker with two threads on every core: more threads than cores.
        let over = Config::try_parse_from(["qserver", "--workers", &cores, "--intra-op-threads", "2"]).unwrap();
        assert!(!over.threads_have_cores());
    }

    #[test]
    fn default_above_limit_is_refused() {
        let c = Config::try_parse_from(["qserver", "--default-max-new-tokens", "300"]).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.contains("300") && err.contains("256"), "{err}");
    }
}
