//! T5 with its encoder on ONNX Runtime (`encoder_model.onnx` of Hugging Face Optimum's layout)
//! and its decoder steps behind the decoder seam ([`super::steps`]): ONNX Runtime's decoder
//! sessions (onnx_decoder.rs), or the native int8 decoder (native_steps.rs) when the model ships
//! its checkpoint (`--decoder`). This file owns one request's way through: tokenize, encode,
//! decode with the request's search, detokenize.

use std::{borrow::Cow, sync::Arc, time::Instant};

use ort::{
    environment::Environment,
    session::{Session, SessionInputValue},
    value::{DynValue, Tensor},
};
use tokenizers::Tokenizer;

pub use super::native_steps::load_native;
pub use super::onnx_decoder::check_onnx_decoder;
pub use super::onnx_session::SessionSettings;
use super::{
    batch::Batch,
    decode::{new_search, Search, Special},
    grounding::GroundingModel,
    model_dir::{self, ModelDir, ModelError, T5Config},
    native::{
        team::{Team, Waiting},
        NativeDecoder, WeightFormat,
    },
    native_steps::{DraftBudget, NativeBackend},
    onnx_decoder::OnnxDecoder,
    onnx_session::{check_known, has, load_error, malformed, names, open_session, ATTENTION_MASK, INPUT_IDS},
    steps::{run_search, Decoded, DecoderBackend},
    Batching, CancelToken, Candidate, DecoderKind, Engine, EngineError, GenerateRequest, Generation, Timings,
};

/// The encoder session's output name and whether it takes a mask.
#[derive(Debug, Clone)]
struct EncoderIo {
    output: String,
    takes_mask: bool,
}

pub struct OnnxT5 {
    model_id: String,
    tokenizer: Tokenizer,
    encoder: Session,
    encoder_io: EncoderIo,
    decoder: Box<dyn DecoderBackend>,
    config: T5Config,
    length_penalty: f64,
    /// Grounded decoding, when the model ships `grounding.json` (every search strategy).
    grounding: Option<Arc<GroundingModel>>,
    /// The native decoder's threads when it may use more than one (`intra_op_threads`).
    threads: Option<Arc<Team>>,
    /// The requests in flight together, with the native decoder (continuous batching).
    pub(super) batch: Option<Batch>,
}

impl EncoderIo {
    fn discover(dir: &ModelDir, encoder: &Session) -> Result<Self, ModelError> {
        let enc_in = names(encoder.inputs());
        let enc_out = names(encoder.outputs());
        if !has(&enc_in, INPUT_IDS) {
            return Err(malformed(dir, model_dir::ENCODER_FILE, format!("no `{INPUT_IDS}` input")));
        }
        check_known(dir, model_dir::ENCODER_FILE, &enc_in, &[INPUT_IDS, ATTENTION_MASK], false)?;
        let output = if has(&enc_out, "last_hidden_state") {
            "last_hidden_state".to_owned()
        } else {
            enc_out.first().cloned().ok_or_else(|| malformed(dir, model_dir::ENCODER_FILE, "no outputs".into()))?
        };
        Ok(Self { output, takes_mask: has(&enc_in, ATTENTION_MASK) })
    }
}

impl OnnxT5 {
    /// Loads tokenizer and sessions from a checked model directory; the decoder as
    /// `settings.decoder` says (see [`load_native`]).
    pub fn load(env: &Environment, dir: &ModelDir, settings: &SessionSettings) -> Result<Self, ModelError> {
        Self::load_with(env, dir, settings, load_native(dir, settings.decoder, settings.native_weights)?)
    }

    /// Like [`OnnxT5::load`], with the native decoder given (loaded once and shared by every
    /// worker); `None` opens the two ONNX decoder sessions instead.
    pub fn load_with(
        env: &Environment,
        dir: &ModelDir,
        settings: &SessionSettings,
        native: Option<Arc<NativeDecoder>>,
    ) -> Result<Self, ModelError> {
        let tokenizer_path = dir.file(model_dir::TOKENIZER_FILE);
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| load_error(&tokenizer_path, e))?;
        // The server enforces its own input limit; padding would feed fake tokens.
        tokenizer.with_truncation(None).map_err(|e| load_error(&tokenizer_path, e))?;
        tokenizer.with_padding(None);

        let encoder = open_session(env, &dir.file(model_dir::ENCODER_FILE), settings)?;
        let encoder_io = EncoderIo::discover(dir, &encoder)?;
        let waiting = if settings.spin_waits { Waiting::Spin } else { Waiting::Block };
        let threads =
            match (&native, settings.intra_op_threads) {
                (Some(_), n) if n > 1 => Some(Arc::new(Team::new(n, "qserver-decode", waiting).map_err(|e| {
                    ModelError::Load { file: dir.root.clone(), reason: format!("decoder threads: {e}") }
                })?)),
                _ => None,
            };
        let drafts = DraftBudget::new(settings.draft_tokens, settings.native_weights);
        // Continuous batching on int8 weights only: batching 4-bit steps measured no gain and a
        // worse tail, tile by tile and with AVX2's batched 4-bit kernel (docs/performance.md).
        let batch = native
            .as_ref()
            .filter(|native| native.weight_format() == WeightFormat::Int8)
            .map(|native| Batch::new(Arc::clone(native), drafts));
        let decoder: Box<dyn DecoderBackend> = match native {
            Some(native) => Box::new(NativeBackend { native, drafts }),
            None => Box::new(OnnxDecoder::load(env, dir, settings)?),
        };
        let grounding = dir.grounding.as_ref().map(|rules| {
            let pieces: Vec<Option<String>> =
                (0..tokenizer.get_vocab_size(true) as u32).map(|id| tokenizer.id_to_token(id)).collect();
            let special: Vec<u32> =
                tokenizer.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
            Arc::new(GroundingModel::new(&pieces, &special, dir.config.eos_token_id, Arc::clone(rules)))
        });
        Ok(Self {
            model_id: dir.model_id.clone(),
            tokenizer,
            encoder,
            encoder_io,
            decoder,
            config: dir.config.clone(),
            length_penalty: dir.generation.length_penalty,
            grounding,
            threads,
            batch,
        })
    }

    /// Which decoder runs the steps, for logs.
    pub fn decoder_kind(&self) -> DecoderKind {
        self.decoder.kind()
    }

    fn special(&self) -> Special {
        Special { eos: self.config.eos_token_id, pad: self.config.pad_token_id }
    }

    /// Token ids of the query (with the tokenizer's `</s>`), cut or rejected at the limit.
    fn tokenize(&self, req: &GenerateRequest) -> Result<(Vec<i64>, bool), EngineError> {
        let encoding =
            self.tokenizer.encode_fast(req.query.as_str(), true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        let eos = i64::from(self.config.eos_token_id);
        if ids.is_empty() {
            ids.push(eos);
        }
        let limit = req.max_input_tokens.max(1);
        if ids.len() <= limit {
            return Ok((ids, false));
        }
        if !req.truncate {
            return Err(EngineError::TooManyTokens { tokens: ids.len(), limit });
        }
        let ended_with_eos = ids.last() == Some(&eos);
        ids.truncate(limit);
        if ended_with_eos {
            ids[limit - 1] = eos;
        }
        Ok((ids, true))
    }

    /// Runs the encoder on one sequence; returns `last_hidden_state` (1, len, d_model).
    fn encode(&mut self, ids: &[i64]) -> Result<DynValue, EngineError> {
        let len = ids.len();
        let input_ids = Tensor::from_array(([1usize, len], ids.to_vec()))?;
        let mask = Tensor::from_array(([1usize, len], vec![1i64; len]))?;
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![(INPUT_IDS.into(), (&input_ids).into())];
        if self.encoder_io.takes_mask {
            inputs.push((ATTENTION_MASK.into(), (&mask).into()));
        }
        let mut outputs = self.encoder.run(inputs)?;
        outputs
            .remove(self.encoder_io.output.as_str())
            .ok_or_else(|| EngineError::Model(format!("encoder returned no `{}`", self.encoder_io.output)))
    }

    /// The request's search (its strategy, grounded unless the request is unguarded).
    pub(super) fn search_for(&self, req: &GenerateRequest) -> Box<dyn Search> {
        let params = &req.params;
        let grounding = self.grounding.as_ref().filter(|_| !params.unguarded).map(|g| g.for_query(&req.query));
        new_search(params.search, self.special(), params.ignore_eos, self.length_penalty, grounding)
    }

    /// Decodes the encoder's output with the request's search on the decoder backend.
    fn decode(
        &mut self,
        prepared: Prepared,
        req: &GenerateRequest,
        cancel: &CancelToken,
    ) -> Result<Decoded, EngineError> {
        let (search, start) = (self.search_for(req), self.start_token());
        let mut steps = self.decoder.begin(prepared.states, search.rows())?;
        run_search(steps.as_mut(), search, &prepared.ids, start, req.params.max_new_tokens, cancel)
    }

    /// Runs `f` with the native decoder's thread team when it has one, so that its matrix
    /// products use the whole team; else on this thread alone.
    pub(super) fn in_pool<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        match self.threads.clone() {
            Some(team) => team.install(|| f(self)),
            None => f(self),
        }
    }

    /// Tokenizes and encodes one request.
    pub(super) fn prepare(&mut self, req: &GenerateRequest, cancel: &CancelToken) -> Result<Prepared, EngineError> {
        let started = Instant::now();
        cancel.check(0)?;
        let (ids, truncated) = self.tokenize(req)?;
        let tokenized = Instant::now();
        let states = self.encode(&ids)?;
        let timed = Timed { started, tokenized, encoded: Instant::now(), input_tokens: ids.len(), truncated };
        Ok(Prepared { states, ids, timed })
    }

    /// The answer: the hypotheses detokenized, with the request's timings.
    pub(super) fn answer(&self, timed: Timed, decoded: &Decoded) -> Result<Generation, EngineError> {
        let mut candidates = Vec::with_capacity(decoded.hypotheses.len());
        for h in &decoded.hypotheses {
            let text = self.tokenizer.decode(&h.tokens, true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            candidates.push(Candidate { text, score: h.score, mean_logprob: h.mean_logprob, tokens: h.tokens.len() });
        }
        let done = Instant::now();
        if candidates.is_empty() {
            return Err(EngineError::Model("search returned no sequence".into()));
        }
        let timings = Timings {
            tokenize: timed.tokenized - timed.started,
            encode: timed.encoded - timed.tokenized,
            decode: done - timed.encoded,
            total: done - timed.started,
            generated_tokens: candidates[0].tokens,
            decoder_steps: decoded.steps,
            input_tokens: timed.input_tokens,
        };
        Ok(Generation { candidates, timings, truncated: timed.truncated })
    }

    /// The first decoder token.
    pub(super) fn start_token(&self) -> u32 {
        self.config.decoder_start_token_id
    }
}

/// A tokenized and encoded request: the encoder's output, the query's token ids (drafts are
/// looked up in them) and what the answer reports.
pub(super) struct Prepared {
    pub states: DynValue,
    pub ids: Vec<i64>,
    pub timed: Timed,
}

/// A tokenized and encoded request's timings and input, for its answer.
#[derive(Clone, Copy)]
pub(super) struct Timed {
    pub started: Instant,
    pub tokenized: Instant,
    pub encoded: Instant,
    pub input_tokens: usize,
    pub truncated: bool,
}

impl Engine for OnnxT5 {
    fn generate(&mut self, req: &GenerateRequest, cancel: &CancelToken) -> Result<Generation, EngineError> {
        self.in_pool(|engine| engine.generate_here(req, cancel))
    }

    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn batching(&mut self) -> Option<&mut dyn Batching> {
        if self.batch.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl OnnxT5 {
    fn generate_here(&mut self, req: &GenerateRequest, cancel: &CancelToken) -> Result<Generation, EngineError> {
        let prepared = self.prepare(req, cancel)?;
        let timed = prepared.timed;
        let decoded = self.decode(prepared, req, cancel)?;
        self.answer(timed, &decoded)
    }

    /// Whether decoding is grounded (the model ships `grounding.json`) unless a request is
    /// unguarded.
    pub fn grounded(&self) -> bool {
        self.grounding.is_some()
    }

    /// Ends ONNX Runtime profiling (sessions opened with `profile_prefix`): returns the JSON
    /// files written, encoder first.
    pub fn end_profiling(&mut self) -> Result<Vec<String>, EngineError> {
        let mut files = vec![self.encoder.end_profiling()?];
        files.extend(self.decoder.end_profiling()?);
        Ok(files)
    }
}
