//! The decoder on ONNX Runtime, in Hugging Face Optimum's split layout: `decoder_model.onnx`
//! takes the first step (it also returns the cross-attention KV), and
//! `decoder_with_past_model.onnx` takes every further step, fed its own previous KV outputs as
//! ORT values (no copies, except the beam reorder). Input and output names are discovered from
//! the sessions, so any layer count works.

use std::borrow::Cow;

use ort::{
    environment::Environment,
    session::{Session, SessionInputValue, SessionOutputs},
    value::{DynValue, Tensor, ValueType},
};

use super::{
    model_dir::{self, ModelDir, ModelError, T5Config},
    onnx_session::{
        check_known, has, malformed, names, open_session, SessionSettings, ENCODER_MASK, ENCODER_STATES, INPUT_IDS,
        LOGITS, PAST_PREFIX, PRESENT_PREFIX,
    },
    steps::{DecoderBackend, DecoderSteps},
    DecoderKind, EngineError,
};

/// One KV-cache tensor: fed as `past_key_values.X`, produced as `present.X`.
#[derive(Debug, Clone)]
struct CacheSlot {
    input: String,
    present: String,
    /// Produced by every with-past step (self-attention): replaced each step and reordered
    /// by beam search. Otherwise (cross-attention) kept from the first step.
    per_step: bool,
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
pub struct OnnxDecoder {
    first: Session,
    with_past: Session,
    io: DecoderIo,
    config: T5Config,
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
    pub fn load(env: &Environment, dir: &ModelDir, settings: &SessionSettings) -> Result<Self, ModelError> {
        let first = open_session(env, &dir.file(model_dir::DECODER_FILE), settings)?;
        let with_past = open_session(env, &dir.file(model_dir::DECODER_WITH_PAST_FILE), settings)?;
        let io = DecoderIo::discover(dir, &first, &with_past)?;
        Ok(Self { first, with_past, io, config: dir.config.clone() })
    }
}

/// Opens the two ONNX decoder files once, checks how they wire together, and drops them. With
/// the native decoder they answer nothing, but a damaged file should stop start-up now, not on
/// the day someone runs `--decoder onnx`.
pub fn check_onnx_decoder(env: &Environment, dir: &ModelDir) -> Result<(), ModelError> {
    OnnxDecoder::load(env, dir, &SessionSettings::new(1)).map(|_| ())
}

/// One request's rows on the two sessions: the cache of the previous step, as ORT values.
struct OnnxSteps<'a> {
    decoder: &'a mut OnnxDecoder,
    rows: usize,
    encoder_states: DynValue,
    encoder_mask: Tensor<i64>,
    input_ids: Tensor<i64>,
    /// One entry per cache slot; all `None` until the first step.
    cache: Vec<Option<DynValue>>,
    logits: Vec<f32>,
}

impl DecoderBackend for OnnxDecoder {
    fn kind(&self) -> DecoderKind {
        DecoderKind::Onnx
    }

    fn begin<'a>(
        &'a mut self,
        encoder_states: DynValue,
        rows: usize,
    ) -> Result<Box<dyn DecoderSteps + 'a>, EngineError> {
        let src_len = match encoder_states.dtype() {
            ValueType::Tensor { shape, .. } if shape.len() == 3 && shape[0] == 1 => shape[1] as usize,
            other => {
                return Err(EngineError::Model(format!("encoder output is {other:?}; expected (1, len, d_model)")))
            }
        };
        // Every row decodes the same source: repeat the encoder output and mask per row.
        let encoder_states = if rows == 1 { encoder_states } else { repeat_rows(&encoder_states, rows)? };
        let encoder_mask = Tensor::from_array(([rows, src_len], vec![1i64; rows * src_len]))?;
        let input_ids = Tensor::from_array(([rows, 1usize], vec![0i64; rows]))?;
        let cache = self.io.slots.iter().map(|_| None).collect();
        Ok(Box::new(OnnxSteps {
            decoder: self,
            rows,
            encoder_states,
            encoder_mask,
            input_ids,
            cache,
            logits: Vec::new(),
        }))
    }

    fn end_profiling(&mut self) -> Result<Vec<String>, EngineError> {
        Ok(vec![self.first.end_profiling()?, self.with_past.end_profiling()?])
    }
}

impl DecoderSteps for OnnxSteps<'_> {
    fn step(&mut self, tokens: &[i64]) -> Result<&[f32], EngineError> {
        self.input_ids.extract_tensor_mut().1.copy_from_slice(tokens);
        let dec = &mut *self.decoder;
        let first_step = self.cache.iter().any(Option::is_none);
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(3 + self.cache.len());
        inputs.push((INPUT_IDS.into(), (&self.input_ids).into()));
        if first_step {
            inputs.push((ENCODER_STATES.into(), (&self.encoder_states).into()));
            if dec.io.first_takes_mask {
                inputs.push((ENCODER_MASK.into(), (&self.encoder_mask).into()));
            }
            let mut outputs = dec.first.run(inputs)?;
            copy_logits(&outputs, self.rows, &mut self.logits)?;
            for (slot, value) in dec.io.slots.iter().zip(self.cache.iter_mut()) {
                let v = outputs
                    .remove(slot.present.as_str())
                    .ok_or_else(|| EngineError::Model(format!("decoder returned no `{}`", slot.present)))?;
                check_cache_shape(&v, &slot.present, &dec.config)?;
                *value = Some(v);
            }
        } else {
            if dec.io.past_takes_mask {
                inputs.push((ENCODER_MASK.into(), (&self.encoder_mask).into()));
            }
            if dec.io.past_takes_states {
                inputs.push((ENCODER_STATES.into(), (&self.encoder_states).into()));
            }
            for (slot, value) in dec.io.slots.iter().zip(self.cache.iter()) {
                let value = value.as_ref().expect("the first step fills every cache slot; this is a bug");
                inputs.push((slot.input.as_str().into(), value.into()));
            }
            let mut outputs = dec.with_past.run(inputs)?;
            copy_logits(&outputs, self.rows, &mut self.logits)?;
            for (slot, value) in dec.io.slots.iter().zip(self.cache.iter_mut()) {
                if slot.per_step {
                    *value = Some(outputs.remove(slot.present.as_str()).ok_or_else(|| {
                        EngineError::Model(format!("decoder with past returned no `{}`", slot.present))
                    })?);
                }
            }
        }
        Ok(&self.logits)
    }

    fn reorder(&mut self, parents: &[usize]) -> Result<(), EngineError> {
        for (slot, value) in self.decoder.io.slots.iter().zip(self.cache.iter_mut()) {
            // Cross-attention entries are identical across rows: no reorder needed.
            if slot.per_step {
                if let Some(v) = value.as_ref() {
                    *value = Some(gather_rows(v, parents)?);
                }
            }
        }
        Ok(())
    }
}

/// Copies one step's last-position logits, shaped (rows, 1, vocab): one token is fed per step,
/// so they are the whole, contiguous tensor.
fn copy_logits(outputs: &SessionOutputs<'_>, rows: usize, out: &mut Vec<f32>) -> Result<(), EngineError> {
    let (shape, logits) = outputs
        .get(LOGITS)
        .ok_or_else(|| EngineError::Model("decoder returned no logits".into()))?
        .try_extract_tensor::<f32>()?;
    let vocab = last_position_vocab(shape, rows)?;
    out.clear();
    out.extend_from_slice(&logits[..rows * vocab]);
    Ok(())
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
