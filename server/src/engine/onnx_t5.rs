//! T5 on ONNX Runtime, in Hugging Face Optimum's split layout: the encoder runs once, then
//! `decoder_model.onnx` takes the first step (it also returns the cross-attention KV), and
//! `decoder_with_past_model.onnx` takes every further step, fed its own previous KV outputs
//! as ORT values (no copies, except the beam reorder). When the model ships its checkpoint, the
//! decoder steps run on the native int8 decoder instead ([`super::native`], `--decoder`), and
//! only the encoder session is opened.
//!
//! Input and output names are discovered from the sessions, so any layer count works.

use std::{
    borrow::Cow,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use ort::{
    environment::Environment,
    session::{builder::GraphOptimizationLevel, Session, SessionInputValue, SessionOutputs},
    value::{DynValue, Tensor, ValueType},
};
use tokenizers::Tokenizer;

use super::{
    decode::{new_search, Hypothesis, Search, Special},
    grounding::GroundingModel,
    model_dir::{self, ModelDir, ModelError, T5Config},
    native::{DecoderShape, NativeDecoder, Scratch},
    CancelToken, Candidate, DecoderKind, Engine, EngineError, GenerateRequest, Generation, Timings,
};

const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
const ENCODER_MASK: &str = "encoder_attention_mask";
const ENCODER_STATES: &str = "encoder_hidden_states";
const LOGITS: &str = "logits";
const PAST_PREFIX: &str = "past_key_values.";
const PRESENT_PREFIX: &str = "present.";

/// Session settings (from the server configuration).
#[derive(Debug, Clone, Default)]
pub struct SessionSettings {
    pub intra_op_threads: usize,
    /// Who runs the decoder steps: ONNX Runtime, or the native int8 decoder.
    pub decoder: DecoderKind,
    /// Extra ONNX Runtime session config entries (`key`, `value`), applied after ours; for
    /// experiments (see docs/performance.md and `examples/profile.rs`).
    pub config_entries: Vec<(String, String)>,
    /// ONNX Runtime's memory pattern optimisation (`None`: its default, on).
    pub memory_pattern: Option<bool>,
    /// The CPU memory arena (`None`: ONNX Runtime's default, on).
    pub cpu_arena: Option<bool>,
    /// Writes ONNX Runtime's per-node profile (JSON) for each session, named from this prefix.
    pub profile_prefix: Option<PathBuf>,
}

impl SessionSettings {
    pub fn new(intra_op_threads: usize) -> Self {
        Self { intra_op_threads, ..Self::default() }
    }
}

/// One KV-cache tensor: fed as `past_key_values.X`, produced as `present.X`.
#[derive(Debug, Clone)]
struct CacheSlot {
    input: String,
    present: String,
    /// Produced by every with-past step (self-attention): replaced each step and reordered
    /// by beam search. Otherwise (cross-attention) kept from the first step.
    per_step: bool,
}

/// The encoder session's output name and whether it takes a mask.
#[derive(Debug, Clone)]
struct EncoderIo {
    output: String,
    takes_mask: bool,
}

/// Which optional inputs each decoder session takes, and the cache wiring.
#[derive(Debug, Clone)]
struct DecoderIo {
    first_takes_mask: bool,
    past_takes_mask: bool,
    past_takes_states: bool,
    slots: Vec<CacheSlot>,
}

/// The two decoder sessions of Optimum's layout.
struct OnnxDecoder {
    first: Session,
    with_past: Session,
    io: DecoderIo,
}

/// Who runs the decoder steps.
enum Decoder {
    Onnx(OnnxDecoder),
    /// Shared by every worker of the process: its weights are read-only.
    Native(Arc<NativeDecoder>),
}

pub struct OnnxT5 {
    model_id: String,
    tokenizer: Tokenizer,
    encoder: Session,
    encoder_io: EncoderIo,
    decoder: Decoder,
    config: T5Config,
    length_penalty: f64,
    /// Grounded decoding, when the model ships `grounding.json` (every search strategy).
    grounding: Option<Arc<GroundingModel>>,
    /// The native decoder's threads when it may use more than one (`intra_op_threads`).
    threads: Option<Arc<rayon::ThreadPool>>,
}

fn load_error(file: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load { file: file.to_path_buf(), reason: e.to_string() }
}

fn open_session(env: &Environment, path: &Path, settings: &SessionSettings) -> Result<Session, ModelError> {
    let threads = settings.intra_op_threads.max(1);
    let mut builder = Session::builder(env)
        .map_err(|e| load_error(path, e))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| load_error(path, e))?
        .with_intra_threads(threads)
        .map_err(|e| load_error(path, e))?;
    if threads > 1 {
        // Spinning intra-op threads steal the CPU from the other workers (see STACK.md).
        builder = builder.with_intra_op_spinning(false).map_err(|e| load_error(path, e))?;
    }
    if let Some(enable) = settings.memory_pattern {
        builder = builder.with_memory_pattern(enable).map_err(|e| load_error(path, e))?;
    }
    if let Some(enable) = settings.cpu_arena {
        builder = builder
            .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(enable).build()])
            .map_err(|e| load_error(path, e))?;
    }
    for (key, value) in &settings.config_entries {
        builder = builder.with_config_entry(key, value).map_err(|e| load_error(path, e))?;
    }
    if let Some(prefix) = &settings.profile_prefix {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("session");
        let mut file = prefix.as_os_str().to_owned();
        file.push(stem);
        builder = builder.with_profiling(PathBuf::from(file)).map_err(|e| load_error(path, e))?;
    }
    builder.commit_from_file(path).map_err(|e| load_error(path, e))
}

fn names(outlets: &[ort::value::Outlet]) -> Vec<String> {
    outlets.iter().map(|o| o.name().to_owned()).collect()
}

fn malformed(dir: &ModelDir, file: &str, reason: String) -> ModelError {
    ModelError::Malformed { file: dir.file(file), reason }
}

fn has(list: &[String], name: &str) -> bool {
    list.iter().any(|n| n == name)
}

/// Any input we cannot feed is an error (cache inputs only where `allow_past`).
fn check_known(
    dir: &ModelDir,
    file: &str,
    list: &[String],
    known: &[&str],
    allow_past: bool,
) -> Result<(), ModelError> {
    for n in list {
        let is_cache_input = allow_past && n.starts_with(PAST_PREFIX);
        if !known.contains(&n.as_str()) && !is_cache_input {
            return Err(malformed(dir, file, format!("unexpected input `{n}`")));
        }
    }
    Ok(())
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

impl DecoderIo {
    /// Wires the two decoder sessions together by name.
    fn discover(dir: &ModelDir, decoder: &Session, with_past: &Session) -> Result<Self, ModelError> {
        let malformed = |file: &str, reason: String| malformed(dir, file, reason);
        let dec_in = names(decoder.inputs());
        let dec_out = names(decoder.outputs());
        let past_in = names(with_past.inputs());
        let past_out = names(with_past.outputs());

        for (file, inputs, outputs) in
            [(model_dir::DECODER_FILE, &dec_in, &dec_out), (model_dir::DECODER_WITH_PAST_FILE, &past_in, &past_out)]
        {
            if !has(inputs, INPUT_IDS) {
                return Err(malformed(file, format!("no `{INPUT_IDS}` input")));
            }
            if !has(outputs, LOGITS) {
                return Err(malformed(file, format!("no `{LOGITS}` output")));
            }
        }
        if !has(&dec_in, ENCODER_STATES) {
            return Err(malformed(model_dir::DECODER_FILE, format!("no `{ENCODER_STATES}` input")));
        }
        check_known(dir, model_dir::DECODER_FILE, &dec_in, &[INPUT_IDS, ENCODER_MASK, ENCODER_STATES], false)?;
        check_known(
            dir,
            model_dir::DECODER_WITH_PAST_FILE,
            &past_in,
            &[INPUT_IDS, ENCODER_MASK, ENCODER_STATES],
            true,
        )?;

        let mut slots = Vec::new();
        for input in past_in.iter().filter(|n| n.starts_with(PAST_PREFIX)) {
            let present = format!("{PRESENT_PREFIX}{}", &input[PAST_PREFIX.len()..]);
            let per_step = has(&past_out, &present);
            if !per_step && !has(&dec_out, &present) {
                return Err(malformed(
                    model_dir::DECODER_WITH_PAST_FILE,
                    format!("input `{input}` has no matching `{present}` output in either decoder"),
                ));
            }
            if !has(&dec_out, &present) {
                // The first step must produce every cache entry: the with-past graph needs all.
                return Err(malformed(model_dir::DECODER_FILE, format!("no `{present}` output")));
            }
            slots.push(CacheSlot { input: input.clone(), present, per_step });
        }
        if slots.is_empty() {
            return Err(malformed(model_dir::DECODER_WITH_PAST_FILE, format!("no `{PAST_PREFIX}*` inputs")));
        }

        Ok(DecoderIo {
            first_takes_mask: has(&dec_in, ENCODER_MASK),
            past_takes_mask: has(&past_in, ENCODER_MASK),
            past_takes_states: has(&past_in, ENCODER_STATES),
            slots,
        })
    }
}

impl OnnxDecoder {
    fn load(env: &Environment, dir: &ModelDir, settings: &SessionSettings) -> Result<Self, ModelError> {
        let first = open_session(env, &dir.file(model_dir::DECODER_FILE), settings)?;
        let with_past = open_session(env, &dir.file(model_dir::DECODER_WITH_PAST_FILE), settings)?;
        let io = DecoderIo::discover(dir, &first, &with_past)?;
        Ok(Self { first, with_past, io })
    }
}

/// Opens the two ONNX decoder files once, checks how they wire together, and drops them. With
/// the native decoder they answer nothing, but a damaged file should stop start-up now, not on
/// the day someone runs `--decoder onnx`.
pub fn check_onnx_decoder(env: &Environment, dir: &ModelDir) -> Result<(), ModelError> {
    OnnxDecoder::load(env, dir, &SessionSettings::new(1)).map(|_| ())
}

impl OnnxT5 {
    /// Loads tokenizer and sessions from a checked model directory; the decoder as
    /// `settings.decoder` says (see [`load_native`]).
    pub fn load(env: &Environment, dir: &ModelDir, settings: &SessionSettings) -> Result<Self, ModelError> {
        Self::load_with(env, dir, settings, load_native(dir, settings.decoder)?)
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
        let threads = match (&native, settings.intra_op_threads) {
            (Some(_), n) if n > 1 => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("qserver-decode-{i}"))
                    .build()
                    .map_err(|e| ModelError::Load { file: dir.root.clone(), reason: format!("decoder threads: {e}") })?,
            )),
            _ => None,
        };
        let decoder = match native {
            Some(native) => Decoder::Native(native),
            None => Decoder::Onnx(OnnxDecoder::load(env, dir, settings)?),
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
        })
    }

    /// Which decoder runs the steps, for logs.
    pub fn decoder_kind(&self) -> DecoderKind {
        match self.decoder {
            Decoder::Native(_) => DecoderKind::Native,
            Decoder::Onnx(_) => DecoderKind::Onnx,
        }
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

    /// The decode loop shared by every search strategy.
    fn decode(
        &mut self,
        encoder_states: DynValue,
        src_len: usize,
        req: &GenerateRequest,
        cancel: &CancelToken,
    ) -> Result<Vec<Hypothesis>, EngineError> {
        let params = &req.params;
        let grounding = self.grounding.as_ref().filter(|_| !params.unguarded).map(|g| g.for_query(&req.query));
        let search = new_search(params.search, self.special(), params.ignore_eos, self.length_penalty, grounding);
        let start = self.config.decoder_start_token_id;
        match &mut self.decoder {
            Decoder::Native(native) => decode_native(native, &encoder_states, search, start, req, cancel),
            Decoder::Onnx(onnx) => onnx.decode(encoder_states, src_len, search, &self.config, req, cancel),
        }
    }
}

impl OnnxDecoder {
    /// The decode loop on the two decoder sessions, for every search strategy.
    fn decode(
        &mut self,
        encoder_states: DynValue,
        src_len: usize,
        mut search: Box<dyn Search>,
        config: &T5Config,
        req: &GenerateRequest,
        cancel: &CancelToken,
    ) -> Result<Vec<Hypothesis>, EngineError> {
        let params = &req.params;
        let rows = search.rows();

        // Every row decodes the same source: repeat the encoder output and mask per row.
        let encoder_states = if rows == 1 { encoder_states } else { repeat_rows(&encoder_states, rows)? };
        let encoder_mask = Tensor::from_array(([rows, src_len], vec![1i64; rows * src_len]))?;
        let start = i64::from(config.decoder_start_token_id);
        let mut input_ids = Tensor::from_array(([rows, 1usize], vec![start; rows]))?;
        let mut cache: Vec<Option<DynValue>> = self.io.slots.iter().map(|_| None).collect();

        for step in 0..params.max_new_tokens {
            cancel.check(search.generated())?;
            let done = if step == 0 {
                let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(3);
                inputs.push((INPUT_IDS.into(), (&input_ids).into()));
                inputs.push((ENCODER_STATES.into(), (&encoder_states).into()));
                if self.io.first_takes_mask {
                    inputs.push((ENCODER_MASK.into(), (&encoder_mask).into()));
                }
                let mut outputs = self.first.run(inputs)?;
                let done = advance_on_logits(&outputs, rows, search.as_mut())?;
                for (slot, value) in self.io.slots.iter().zip(cache.iter_mut()) {
                    let v = outputs
                        .remove(slot.present.as_str())
                        .ok_or_else(|| EngineError::Model(format!("decoder returned no `{}`", slot.present)))?;
                    check_cache_shape(&v, &slot.present, config)?;
                    *value = Some(v);
                }
                done
            } else {
                let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(3 + cache.len());
                inputs.push((INPUT_IDS.into(), (&input_ids).into()));
                if self.io.past_takes_mask {
                    inputs.push((ENCODER_MASK.into(), (&encoder_mask).into()));
                }
                if self.io.past_takes_states {
                    inputs.push((ENCODER_STATES.into(), (&encoder_states).into()));
                }
                for (slot, value) in self.io.slots.iter().zip(cache.iter()) {
                    let value = value.as_ref().expect("the first step fills every cache slot; this is a bug");
                    inputs.push((slot.input.as_str().into(), value.into()));
                }
                let mut outputs = self.with_past.run(inputs)?;
                let done = advance_on_logits(&outputs, rows, search.as_mut())?;
                for (slot, value) in self.io.slots.iter().zip(cache.iter_mut()) {
                    if slot.per_step {
                        *value = Some(outputs.remove(slot.present.as_str()).ok_or_else(|| {
                            EngineError::Model(format!("decoder with past returned no `{}`", slot.present))
                        })?);
                    }
                }
                done
            };
            if done {
                break;
            }
            if let Some(parents) = search.parents() {
                for (slot, value) in self.io.slots.iter().zip(cache.iter_mut()) {
                    // Cross-attention entries are identical across rows: no reorder needed.
                    if slot.per_step {
                        let v = value.as_ref().expect("cache slot filled above; this is a bug");
                        *value = Some(gather_rows(v, parents)?);
                    }
                }
            }
            input_ids.extract_tensor_mut().1.copy_from_slice(search.next_tokens());
        }
        Ok(search.finish())
    }
}

/// The native decoder for `kind`, if it applies to this model directory.
pub fn load_native(dir: &ModelDir, kind: DecoderKind) -> Result<Option<Arc<NativeDecoder>>, ModelError> {
    let checkpoint = match (kind, &dir.checkpoint) {
        (DecoderKind::Onnx, _) | (DecoderKind::Auto, None) => return Ok(None),
        (_, Some(file)) => file,
        (DecoderKind::Native, None) => {
            return Err(ModelError::MissingCheckpoint(dir.file(model_dir::CHECKPOINT_FILES[0])));
        }
    };
    let shape = DecoderShape::from_config(&dir.config, &dir.config_json)
        .map_err(|reason| ModelError::Malformed { file: dir.file(model_dir::CONFIG_FILE), reason })?;
    NativeDecoder::load(checkpoint, shape).map(|d| Some(Arc::new(d)))
}

/// The decode loop on the native decoder: same searches, one cache per row.
fn decode_native(
    native: &NativeDecoder,
    encoder_states: &DynValue,
    mut search: Box<dyn Search>,
    start: u32,
    req: &GenerateRequest,
    cancel: &CancelToken,
) -> Result<Vec<Hypothesis>, EngineError> {
    let (shape, states) = encoder_states.try_extract_tensor::<f32>()?;
    let d = native.shape().d_model;
    if !matches!(&shape[..], [1, _, w] if *w as usize == d) {
        return Err(EngineError::Model(format!("encoder output has shape {shape:?}; expected (1, len, {d})")));
    }
    let cross = native.cross_cache(states);
    let rows = search.rows();
    let vocab = native.shape().vocab;
    let mut caches = vec![native.new_row(); rows];
    let mut scratch = Scratch::default();
    let mut logits = vec![0f32; rows * vocab];
    let mut tokens = vec![start; rows];
    for _ in 0..req.params.max_new_tokens {
        cancel.check(search.generated())?;
        for ((token, cache), out) in tokens.iter().zip(caches.iter_mut()).zip(logits.chunks_exact_mut(vocab)) {
            native.step(*token, cache, &cross, &mut scratch, out);
        }
        if search.advance(&logits, vocab) {
            break;
        }
        if let Some(parents) = search.parents() {
            caches = parents.iter().map(|&p| caches[p].clone()).collect();
        }
        for (t, &next) in tokens.iter_mut().zip(search.next_tokens()) {
            *t = u32::try_from(next).map_err(|_| EngineError::Model(format!("token id {next} out of range")))?;
        }
    }
    Ok(search.finish())
}

/// Vocabulary size from logits shaped (rows, 1, vocab): one token is fed per step, so the
/// last position's logits of all rows are the whole, contiguous tensor.
/// Feeds one decoder step's last-position logits to the search; true when it is done.
fn advance_on_logits(outputs: &SessionOutputs<'_>, rows: usize, search: &mut dyn Search) -> Result<bool, EngineError> {
    let (shape, logits) = outputs
        .get(LOGITS)
        .ok_or_else(|| EngineError::Model("decoder returned no logits".into()))?
        .try_extract_tensor::<f32>()?;
    let vocab = last_position_vocab(shape, rows)?;
    Ok(search.advance(&logits[..rows * vocab], vocab))
}

fn last_position_vocab(shape: &[i64], rows: usize) -> Result<usize, EngineError> {
    match shape {
        [r, 1, v] if *r as usize == rows && *v >= 1 => Ok(*v as usize),
        _ => Err(EngineError::Model(format!("logits have shape {shape:?}; expected ({rows}, 1, vocab)"))),
    }
}

/// Checks a first-step cache tensor against config.json: (batch, num_heads, len, d_kv).
fn check_cache_shape(value: &DynValue, name: &str, config: &T5Config) -> Result<(), EngineError> {
    if let ValueType::Tensor { shape, .. } = value.dtype() {
        if shape.len() == 4 && shape[1] as usize == config.num_heads && shape[3] as usize == config.d_kv {
            return Ok(());
        }
        return Err(EngineError::Model(format!(
            "`{name}` has shape {:?}; config.json says (batch, {}, len, {})",
            &shape[..],
            config.num_heads,
            config.d_kv
        )));
    }
    Err(EngineError::Model(format!("`{name}` is not a tensor")))
}

/// Repeats a (1, ...) f32 tensor `rows` times along the first axis.
fn repeat_rows(value: &DynValue, rows: usize) -> Result<DynValue, EngineError> {
    let (shape, data) = value.try_extract_tensor::<f32>()?;
    let mut dims: Vec<i64> = shape.to_vec();
    if dims.first() != Some(&1) {
        return Err(EngineError::Model(format!("expected a batch of one, got shape {dims:?}")));
    }
    dims[0] = rows as i64;
    let mut out = Vec::with_capacity(data.len() * rows);
    for _ in 0..rows {
        out.extend_from_slice(data);
    }
    Ok(Tensor::from_array((dims, out))?.into_dyn())
}

/// New tensor whose row `i` is row `parents[i]` of `value` (beam reorder of the KV cache).
fn gather_rows(value: &DynValue, parents: &[usize]) -> Result<DynValue, EngineError> {
    let (shape, data) = value.try_extract_tensor::<f32>()?;
    let rows = shape.first().copied().unwrap_or(0) as usize;
    if rows != parents.len() || rows == 0 {
        return Err(EngineError::Model(format!("cache has {rows} rows, search has {}", parents.len())));
    }
    let chunk = data.len() / rows;
    let mut out = Vec::with_capacity(data.len());
    for &p in parents {
        out.extend_from_slice(&data[p * chunk..(p + 1) * chunk]);
    }
    Ok(Tensor::from_array((shape.to_vec(), out))?.into_dyn())
}

impl Engine for OnnxT5 {
    fn generate(&mut self, req: &GenerateRequest, cancel: &CancelToken) -> Result<Generation, EngineError> {
        match self.threads.clone() {
            // On a pool thread, so the native decoder's matrix products use the whole pool.
            Some(pool) => pool.install(|| self.generate_here(req, cancel)),
            None => self.generate_here(req, cancel),
        }
    }

    fn model_id(&self) -> &str {
        &self.model_id
    }
}

impl OnnxT5 {
    fn generate_here(&mut self, req: &GenerateRequest, cancel: &CancelToken) -> Result<Generation, EngineError> {
        let started = Instant::now();
        cancel.check(0)?;
        let (ids, truncated) = self.tokenize(req)?;
        let tokenized = Instant::now();

        let encoder_states = self.encode(&ids)?;
        let encoded = Instant::now();

        let hyps = self.decode(encoder_states, ids.len(), req, cancel)?;
        let mut candidates = Vec::with_capacity(hyps.len());
        for h in &hyps {
            let text = self.tokenizer.decode(&h.tokens, true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            candidates.push(Candidate { text, score: h.score, mean_logprob: h.mean_logprob, tokens: h.tokens.len() });
        }
        let decoded = Instant::now();
        if candidates.is_empty() {
            return Err(EngineError::Model("search returned no sequence".into()));
        }
        let timings = Timings {
            tokenize: tokenized - started,
            encode: encoded - tokenized,
            decode: decoded - encoded,
            total: decoded - started,
            generated_tokens: candidates[0].tokens,
            input_tokens: ids.len(),
        };
        Ok(Generation { candidates, timings, truncated })
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
        if let Decoder::Onnx(onnx) = &mut self.decoder {
            files.extend([onnx.first.end_profiling()?, onnx.with_past.end_profiling()?]);
        }
        Ok(files)
    }
}
