//! Command-line interface (clap derive). Doc comments are the `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use qreformulate::pb::GenerationOptions;

/// Thin client of the qreformulate service: turns natural-language questions into
/// search-engine subqueries, benchmarks and evaluates the server.
#[derive(Debug, Parser)]
#[command(name = "qclient", version, propagate_version = true)]
pub struct Cli {
    /// Server address (http://host:port; a bare host:port gets http://).
    #[arg(long, env = "QCLIENT_ADDR", default_value = "http://127.0.0.1:50051", global = true)]
    pub addr: String,

    /// Deadline for each RPC in milliseconds, sent to the server as grpc-timeout and
    /// enforced by the client too (for eval and bench --server-side it covers the whole call).
    #[arg(long, env = "QCLIENT_TIMEOUT_MS", global = true, value_parser = positive_u64)]
    pub timeout_ms: Option<u64>,

    /// Give up connecting after this many milliseconds.
    #[arg(
        long,
        env = "QCLIENT_CONNECT_TIMEOUT_MS",
        default_value_t = 5000,
        global = true,
        value_parser = positive_u64
    )]
    pub connect_timeout_ms: u64,

    /// CA certificate (PEM) that signed the server's certificate: connect over TLS (a bare
    /// host:port gets https://).
    #[arg(long, env = "QCLIENT_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS; needs --tls-key and --tls-ca.
    #[arg(long, env = "QCLIENT_TLS_CERT", global = true, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "QCLIENT_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Bearer token sent as `authorization: Bearer <token>` on every call (prefer the
    /// environment variable: command lines are visible to other local users).
    #[arg(long, env = "QCLIENT_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Interactive prompt: type a question, get its subqueries and the latency.
    /// Reads lines from stdin (a pipe works too); `:quit` or end of input exits.
    Chat(ChatArgs),
    /// Reformulate the given queries (or one query per stdin line when none are given).
    Reformulate(ReformulateArgs),
    /// Replay the queries of a file against the server and report latency and throughput.
    ///
    /// A query sent again (cycling with --requests, or after --warmup) may be answered from
    /// the server's response cache; the report counts those cache hits. To measure the model
    /// on every request, pass --skip-cache (or use --server-side).
    Bench(BenchArgs),
    /// Stream a labelled JSONL file to the server's Evaluate RPC and print the metric table.
    Eval(EvalArgs),
    /// Print the server's health status; exits 0 only when SERVING.
    Health(HealthArgs),
}

/// Generation options; an option left out means "server default".
#[derive(Debug, Clone, Default, Args)]
pub struct GenerationArgs {
    /// Upper bound on generated tokens.
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    /// Beam width (1 is greedy).
    #[arg(long)]
    pub num_beams: Option<u32>,
    /// How many candidates to return (at most --num-beams with beam search).
    #[arg(long)]
    pub num_return_sequences: Option<u32>,
    /// Sample instead of searching.
    #[arg(long)]
    pub sample: bool,
    /// Softmax temperature for --sample (server default 1.0).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Seed for --sample; equal seeds give equal outputs.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Truncate a query over the server's token limit instead of rejecting it.
    #[arg(long)]
    pub truncate: bool,
    /// Decode without the model's grounding and answer with the plain split of the text (no
    /// guards, no fallbacks but an empty text): for side-by-side measurement.
    #[arg(long)]
    pub unguarded: bool,
}

impl GenerationArgs {
    pub fn to_proto(&self) -> GenerationOptions {
        GenerationOptions {
            max_new_tokens: self.max_new_tokens.unwrap_or(0),
            num_beams: self.num_beams.unwrap_or(0),
            num_return_sequences: self.num_return_sequences.unwrap_or(0),
            do_sample: self.sample,
            temperature: self.temperature.unwrap_or(0.0),
            seed: self.seed.unwrap_or(0),
            ignore_eos: false,
            truncate: self.truncate,
            unguarded: self.unguarded,
        }
    }
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Print the subqueries on one line, joined with " | ".
    #[arg(long)]
    pub joined: bool,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Debug, Args)]
pub struct ReformulateArgs {
    /// Queries, one per argument (quote each); none: read one query per stdin line
    /// (plain text, or JSON objects with a "query" field).
    pub queries: Vec<String>,
    /// Print one JSON object per query: {"query", "subqueries", "latency_ms", ...}.
    #[arg(long)]
    pub json: bool,
    /// Print the subqueries on one line, joined with " | ".
    #[arg(long, conflicts_with = "json")]
    pub joined: bool,
    /// Run the model even when the server's response cache holds the answer.
    #[arg(long)]
    pub skip_cache: bool,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Query file: JSONL with a "query" field, or plain text, one query per line.
    pub file: PathBuf,
    /// Requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = positive_u32)]
    pub concurrency: u32,
    /// Measured requests, cycling through the file (default: each query once).
    #[arg(long, short = 'n', value_parser = positive_u64)]
    pub requests: Option<u64>,
    /// Untimed requests before the measurement.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// HTTP/2 connections to spread the requests over (default one shared connection).
    #[arg(long, default_value_t = 1, value_parser = positive_u32)]
    pub connections: u32,
    /// Print one JSON object with the results instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep generating until --max-new-tokens even after end-of-sequence (equal work per request).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Call the Benchmark RPC instead: the server replays the queries in-process, so the
    /// numbers exclude the network (--concurrency and --connections do not apply).
    #[arg(long)]
    pub server_side: bool,
    /// Run the model on every request, even when the server's response cache holds the answer.
    #[arg(long, conflicts_with = "server_side")]
    pub skip_cache: bool,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Labelled JSONL: {"query", "subqueries" ('|'-joined string or list), "kind"}.
    pub file: PathBuf,
    /// Print one JSON object (metrics, latency, per-example results) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also print up to N examples whose prediction differs from the label.
    #[arg(long, default_value_t = 0)]
    pub mismatches: usize,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Service to ask about (default: the server as a whole), e.g. qreformulate.v1.Reformulator.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Keep polling until SERVING or this many milliseconds have passed.
    #[arg(long)]
    pub wait_ms: Option<u64>,
}

fn positive_u64(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn positive_u32(text: &str) -> Result<u32, String> {
    let n = positive_u64(text)?;
    u32::try_from(n).map_err(|_| format!("must be at most {}", u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn generation_options_default_to_server_defaults() {
        let cli = Cli::try_parse_from(["qclient", "reformulate", "q"]).unwrap();
        let Command::Reformulate(args) = cli.command else { panic!("wrong subcommand") };
        assert_eq!(args.generation.to_proto(), GenerationOptions::default());
        assert_eq!(args.queries, vec!["q"]);
    }

    #[test]
    fn generation_options_map_to_proto() {
        let cli = Cli::try_parse_from([
            "qclient",
            "--timeout-ms",
            "250",
            "reformulate",
            "--max-new-tokens",
            "16",
            "--num-beams",
            "4",
            "--num-return-sequences",
            "2",
            "--sample",
            "--temperature",
            "0.7",
            "--seed",
            "9",
            "--truncate",
        ])
        .unwrap();
        assert_eq!(cli.timeout(), Some(Duration::from_millis(250)));
        let Command::Reformulate(args) = cli.command else { panic!("wrong subcommand") };
        assert!(args.queries.is_empty());
        let options = args.generation.to_proto();
        assert_eq!(options.max_new_tokens, 16);
        assert_eq!(options.num_beams, 4);
        assert_eq!(options.num_return_sequences, 2);
        assert!(options.do_sample);
        assert_eq!(options.temperature, 0.7);
        assert_eq!(options.seed, 9);
        assert!(options.truncate);
        assert!(!options.ignore_eos);
        assert!(!options.unguarded);
    }

    #[test]
    fn unguarded_reaches_every_generating_command() {
        for args in [
            vec!["qclient", "bench", "f", "--unguarded"],
            vec!["qclient", "eval", "f", "--unguarded"],
            vec!["qclient", "reformulate", "--unguarded", "q"],
            vec!["qclient", "chat", "--unguarded"],
        ] {
            let generation = match Cli::try_parse_from(&args).unwrap().command {
                Command::Bench(a) => a.generation,
                Command::Eval(a) => a.generation,
                Command::Reformulate(a) => a.generation,
                Command::Chat(a) => a.generation,
                Command::Health(_) => unreachable!(),
            };
            assert!(generation.to_proto().unguarded, "{args:?}");
        }
    }

    #[test]
    fn global_addr_works_after_the_subcommand() {
        let cli = Cli::try_parse_from(["qclient", "health", "--addr", "http://10.0.0.1:1"]).unwrap();
        assert_eq!(cli.addr, "http://10.0.0.1:1");
    }

    #[test]
    fn zero_concurrency_is_rejected() {
        assert!(Cli::try_parse_from(["qclient", "bench", "f", "--concurrency", "0"]).is_err());
    }
}
