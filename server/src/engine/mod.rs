//! The model: tokenizer, ONNX Runtime sessions, the native int8 decoder, the decode loop and
//! its search strategies, grounded decoding, timings. Nothing of gRPC lives here; the service talks to it through [`Engine`] and the
//! worker [`pool`].

pub mod batch;
pub mod cancel;
pub mod decode;
pub mod factory;
pub mod grounding;
pub mod logits;
pub mod lookup;
pub mod model_dir;
pub mod native;
pub mod native_steps;
pub mod onnx_decoder;
pub mod onnx_session;
pub mod onnx_t5;
pub mod pool;
pub mod steps;

use std::time::Duration;

pub use cancel::CancelToken;
pub use model_dir::{ModelDir, ModelError};

/// Which code runs the decoder steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DecoderKind {
    /// Native when the model directory has a checkpoint (`pytorch/model.safetensors`), else ONNX.
    #[default]
    Auto,
    /// The Rust int8 decoder on the checkpoint's weights (engine/native); fails without one.
    Native,
    /// ONNX Runtime on `decoder_model.onnx` and `decoder_with_past_model.onnx`.
    Onnx,
}

/// One generation backend. Implementations own their sessions and are driven by exactly
/// one worker thread, hence `&mut self` and no locks.
pub trait Engine: Send {
    /// Runs one query through the model. Must check `cancel` at least once per decode step.
    fn generate(&mut self, req: &GenerateRequest, cancel: &CancelToken) -> Result<Generation, EngineError>;
    /// Identifies the loaded model in responses and logs.
    fn model_id(&self) -> &str;
    /// Continuous batching, when the engine's decoder can step several requests together.
    fn batching(&mut self) -> Option<&mut dyn Batching> {
        None
    }
}

/// Continuous batching: the requests in flight on one worker share each decoder step (each
/// weight matrix is read once for all their rows). The worker joins queued requests between
/// steps and answers each as soon as it ends; an answer is the same as [`Engine::generate`]'s.
pub trait Batching {
    /// Tokenizes and encodes one request and adds it to those in flight under `tag`. An error
    /// is the request's answer; it did not join.
    fn join(&mut self, tag: u64, req: &GenerateRequest, cancel: CancelToken) -> Result<(), EngineError>;
    /// One decoder step of every request in flight; returns those that ended (answered,
    /// failed, cancelled or past their deadline) with their answers.
    fn step(&mut self) -> Vec<(u64, Result<Generation, EngineError>)>;
    fn in_flight(&self) -> usize;
    /// Drops every request in flight (after a panic inside a step); returns their tags.
    fn clear(&mut self) -> Vec<u64>;
}

/// What to generate for one query (already validated by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub query: String,
    pub params: GenerationParams,
    /// Queries longer than this many tokens are rejected, or cut when `truncate` is set.
    pub max_input_tokens: usize,
    pub truncate: bool,
}

/// Decoding parameters, with every server default already applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub search: SearchKind,
    /// Never stop at end-of-sequence: generate exactly `max_new_tokens` tokens.
    pub ignore_eos: bool,
    /// Decode without the model's grounding (GenerationOptions.unguarded).
    pub unguarded: bool,
}

/// The search strategy and its own parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SearchKind {
    Greedy,
    Beam { num_beams: usize, num_return_sequences: usize },
    Sample { num_return_sequences: usize, temperature: f32, seed: u64 },
}

impl SearchKind {
    /// How many candidates this search returns.
    pub fn num_return_sequences(&self) -> usize {
        match *self {
            SearchKind::Greedy => 1,
            SearchKind::Beam { num_return_sequences, .. } | SearchKind::Sample { num_return_sequences, .. } => {
                num_return_sequences
            }
        }
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Decoded text, special tokens skipped.
    pub text: String,
    /// Sum of the chosen tokens' log-probabilities; beam search: length-normalised.
    pub score: f64,
    /// Mean log-probability of the generated tokens under the unconstrained distribution.
    pub mean_logprob: f64,
    /// Generated tokens, end-of-sequence included when it was produced.
    pub tokens: usize,
}

/// Wall-clock phases of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub tokenize: Duration,
    pub encode: Duration,
    pub decode: Duration,
    pub total: Duration,
    /// Tokens of the best candidate.
    pub generated_tokens: usize,
    /// Decoder steps the search took: fewer than the tokens when drafts were kept
    /// (`--draft-tokens`).
    pub decoder_steps: usize,
    pub input_tokens: usize,
}

/// The result of one generation: candidates best first (never empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub candidates: Vec<Candidate>,
    pub timings: Timings,
    /// The query was cut to `max_input_tokens`.
    pub truncated: bool,
}

/// Why a generation did not complete.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "query is {tokens} tokens long; the limit is {limit} (--max-input-tokens); set options.truncate to cut it"
    )]
    TooManyTokens { tokens: usize, limit: usize },
    #[error("deadline exceeded after {generated} generated tokens")]
    DeadlineExceeded { generated: usize },
    #[error("cancelled by the client")]
    Cancelled,
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("ONNX Runtime failed: {0}")]
    Runtime(String),
    #[error("model output is not what the T5 layout promises: {0}")]
    Model(String),
    #[error("engine is not available: {0}")]
    Unavailable(String),
    #[error("engine panicked: {0}")]
    Panicked(String),
}

impl From<ort::Error> for EngineError {
    fn from(e: ort::Error) -> Self {
        EngineError::Runtime(e.to_string())
    }
}
