//! Command-line interface (clap derive). Doc comments are the `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
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
    ///
    /// On a terminal: line editing, Up/Down and Ctrl-R through the questions of this and
    /// earlier sessions (--history-file), `:help` for the commands, Ctrl-C cancels the question
    /// in flight, Ctrl-D or `:quit` leaves. From a pipe: one question per line, each echoed
    /// before its answer; `:quit` or end of input exits, and a failed question makes the exit
    /// status 1.
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
    /// Ask the server's standard gRPC health service whether it is SERVING.
    ///
    /// Exit codes (as grpc_health_probe): 0 SERVING; 1 bad usage (e.g. an invalid --addr);
    /// 2 connection failure (refused, or no connection within --connect-timeout-ms);
    /// 3 the Health/Check RPC failed (e.g. NOT_FOUND for an unknown --service, a deadline);
    /// 4 the server answered but is not SERVING (NOT_SERVING while it loads or drains).
    /// With --wait, the last attempt's outcome decides.
    #[command(verbatim_doc_comment)]
    Health(HealthArgs),
    /// Print a shell completion script: `qclient completions bash > ~/.local/share/bash-completion/completions/qclient`.
    Completions(CompletionsArgs),
    /// Print the man page (roff) built from these same definitions: `qclient man > qclient.1`.
    Man(ManArgs),
}

/// Generation options; an option left out means "server default".
#[derive(Debug, Clone, Default, Args)]
pub struct GenerationArgs {
    /// Upper bound on generated tokens.
    #[arg(long, env = "QCLIENT_MAX_NEW_TOKENS")]
    pub max_new_tokens: Option<u32>,
    /// Beam width (1 is greedy).
    #[arg(long, env = "QCLIENT_NUM_BEAMS")]
    pub num_beams: Option<u32>,
    /// How many candidates to return (at most --num-beams with beam search).
    #[arg(long, env = "QCLIENT_NUM_RETURN_SEQUENCES")]
    pub num_return_sequences: Option<u32>,
    /// Sample instead of searching.
    #[arg(long, env = "QCLIENT_SAMPLE", value_parser = BoolishValueParser::new())]
    pub sample: bool,
    /// Softmax temperature for --sample (server default 1.0).
    #[arg(long, env = "QCLIENT_TEMPERATURE")]
    pub temperature: Option<f32>,
    /// Seed for --sample; equal seeds give equal outputs.
    #[arg(long, env = "QCLIENT_SEED")]
    pub seed: Option<u64>,
    /// Truncate a query over the server's token limit instead of rejecting it.
    #[arg(long, env = "QCLIENT_TRUNCATE", value_parser = BoolishValueParser::new())]
    pub truncate: bool,
    /// Decode without the model's grounding and answer with the plain split of the text (no
    /// guards, no fallbacks but an empty text): for side-by-side measurement.
    #[arg(long, env = "QCLIENT_UNGUARDED", value_parser = BoolishValueParser::new())]
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
    #[arg(long, env = "QCLIENT_JOINED", value_parser = BoolishValueParser::new())]
    pub joined: bool,
    /// Where the prompt keeps the questions asked (on a terminal only) [default: the user's
    /// data directory, e.g. ~/.local/share/qclient/history].
    #[arg(long, env = "QCLIENT_HISTORY_FILE", value_name = "PATH")]
    pub history_file: Option<PathBuf>,
    /// Keep no history file (Up still recalls this session's questions).
    #[arg(long, env = "QCLIENT_NO_HISTORY", value_parser = BoolishValueParser::new(), conflicts_with = "history_file")]
    pub no_history: bool,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Debug, Args)]
pub struct ReformulateArgs {
    /// Queries, one per argument (quote each); none: read one query per stdin line
    /// (plain text, or JSON objects with a "query" field).
    pub queries: Vec<String>,
    /// Print one JSON object per query: {"query", "subqueries", "latency_ms", ...}.
    #[arg(long, env = "QCLIENT_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// Print the subqueries on one line, joined with " | ".
    #[arg(long, env = "QCLIENT_JOINED", value_parser = BoolishValueParser::new(), conflicts_with = "json")]
    pub joined: bool,
    /// Run the model even when the server's response cache holds the answer.
    #[arg(long, env = "QCLIENT_SKIP_CACHE", value_parser = BoolishValueParser::new())]
    pub skip_cache: bool,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Query file: JSONL with a "query" field, or plain text, one query per line.
    pub file: PathBuf,
    /// Requests in flight at once.
    #[arg(long, short = 'c', env = "QCLIENT_CONCURRENCY", default_value_t = 1, value_parser = positive_u32)]
    pub concurrency: u32,
    /// Measured requests, cycling through the file (default: each query once).
    #[arg(long, short = 'n', env = "QCLIENT_REQUESTS", value_parser = positive_u64)]
    pub requests: Option<u64>,
    /// Untimed requests before the measurement.
    #[arg(long, env = "QCLIENT_WARMUP", default_value_t = 0)]
    pub warmup: u64,
    /// HTTP/2 connections to spread the requests over (default one shared connection).
    #[arg(long, env = "QCLIENT_CONNECTIONS", default_value_t = 1, value_parser = positive_u32)]
    pub connections: u32,
    /// Print one JSON object with the results instead of the table.
    #[arg(long, env = "QCLIENT_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// Keep generating until --max-new-tokens even after end-of-sequence (equal work per request).
    #[arg(long, env = "QCLIENT_IGNORE_EOS", value_parser = BoolishValueParser::new())]
    pub ignore_eos: bool,
    /// Call the Benchmark RPC instead: the server replays the queries in-process, so the
    /// numbers exclude the network (--concurrency and --connections do not apply).
    #[arg(long, env = "QCLIENT_SERVER_SIDE", value_parser = BoolishValueParser::new())]
    pub server_side: bool,
    /// Run the model on every request, even when the server's response cache holds the answer.
    #[arg(long, env = "QCLIENT_SKIP_CACHE", value_parser = BoolishValueParser::new(), conflicts_with = "server_side")]
    pub skip_cache: bool,
    /// Largest share of failed requests (0 to 1) that still exits 0. The default 0 makes any
    /// failed request exit 1 (after the report); 1 never fails on request errors.
    #[arg(long, env = "QCLIENT_MAX_ERROR_RATE", default_value_t = 0.0, value_parser = fraction)]
    pub max_error_rate: f64,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Labelled JSONL: {"query", "subqueries" ('|'-joined string or list), "kind"}.
    pub file: PathBuf,
    /// Print one JSON object (metrics, latency, per-example results) instead of tables.
    #[arg(long, env = "QCLIENT_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// Also print up to N examples whose prediction differs from the label.
    #[arg(long, env = "QCLIENT_MISMATCHES", default_value_t = 0)]
    pub mismatches: usize,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The gRPC health service name to ask about: empty means the server as a whole;
    /// qserver also answers for qreformulate.v1.Reformulator.
    #[arg(long, env = "QCLIENT_HEALTH_SERVICE", default_value = "")]
    pub service: String,
    /// Keep polling (every 200 ms) until SERVING or this many seconds have passed (fractions
    /// allowed, e.g. 0.5); without it, one check.
    #[arg(long, env = "QCLIENT_HEALTH_WAIT", value_name = "SECONDS", value_parser = wait_seconds)]
    pub wait: Option<Duration>,
    /// Print one JSON object: {"status", "service", "addr", "exit_code", "attempts", "elapsed_ms", "error"}.
    #[arg(long, env = "QCLIENT_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write qclient.1 and one page per subcommand (qclient-chat.1, ...) into this directory
    /// instead of printing qclient.1 to stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// `--wait` seconds: a finite, non-negative number.
fn wait_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{e} (expected seconds, e.g. 30 or 0.5)"))?;
    Duration::try_from_secs_f64(seconds).map_err(|_| "must be a finite number of seconds, at least 0".to_string())
}

/// A share between 0 and 1.
fn fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err("must be between 0 and 1 (e.g. 0.01 for 1%)".to_string())
    }
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
                _ => unreachable!(),
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
    fn every_flag_has_a_qclient_environment_variable() {
        // Flags that pick a document rather than configure a call.
        let exempt = ["help", "version", "out_dir"];
        let root = Cli::command();
        let mut checked = 0;
        for command in std::iter::once(&root).chain(root.get_subcommands()) {
            for arg in command.get_arguments().filter(|a| a.get_long().is_some()) {
                let id = arg.get_id().as_str();
                if exempt.contains(&id) {
                    continue;
                }
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                let name = command.get_name();
                assert!(env.as_deref().is_some_and(|e| e.starts_with("QCLIENT_")), "{name} --{id}: {env:?}");
                checked += 1;
            }
        }
        assert!(checked > 30, "{checked}");
    }

    #[test]
    fn boolean_variables_take_the_usual_spellings() {
        use clap::builder::TypedValueParser;
        let parser = BoolishValueParser::new();
        let cmd = Cli::command();
        let arg = clap::Arg::new("x");
        for (text, value) in
            [("1", true), ("true", true), ("yes", true), ("0", false), ("false", false), ("off", false)]
        {
            assert_eq!(parser.parse_ref(&cmd, Some(&arg), std::ffi::OsStr::new(text)).unwrap(), value, "{text}");
        }
    }

    #[test]
    fn health_wait_takes_seconds_and_fractions() {
        let parse = |wait: &str| Cli::try_parse_from(["qclient", "health", "--wait", wait]).map(|cli| cli.command);
        let Ok(Command::Health(args)) = parse("1.5") else { panic!("1.5 rejected") };
        assert_eq!(args.wait, Some(Duration::from_millis(1500)));
        assert!(parse("-1").is_err() && parse("soon").is_err() && parse("inf").is_err());
    }

    #[test]
    fn zero_concurrency_is_rejected() {
        assert!(Cli::try_parse_from(["qclient", "bench", "f", "--concurrency", "0"]).is_err());
    }
}
