//! The native int8 decoder ([`super::native`]) behind the decoder seam: one self-attention cache
//! per row, the cross-attention keys and values computed once per request and shared by its rows.

use std::sync::Arc;

use ort::value::DynValue;

use super::{
    model_dir::{self, ModelDir, ModelError},
    native::{CrossCache, DecoderShape, NativeDecoder, RowCache, Scratch, StepRow, WeightFormat},
    steps::{DecoderBackend, DecoderSteps},
    DecoderKind, EngineError,
};

/// The native decoder for `kind`, if it applies to this model directory, its step weights in
/// `format`: loaded once and shared by every worker (its weights are read-only).
pub fn load_native(
    dir: &ModelDir,
    kind: DecoderKind,
    format: WeightFormat,
) -> Result<Option<Arc<NativeDecoder>>, ModelError> {
    let checkpoint = match (kind, &dir.checkpoint) {
        (DecoderKind::Onnx, _) | (DecoderKind::Auto, None) => return Ok(None),
        (_, Some(file)) => file,
        (DecoderKind::Native, None) => {
            return Err(ModelError::MissingCheckpoint(dir.file(model_dir::CHECKPOINT_FILES[0])));
        }
    };
    let shape = DecoderShape::from_config(&dir.config, &dir.config_json)
        .map_err(|reason| ModelError::Malformed { file: dir.file(model_dir::CONFIG_FILE), reason })?;
    NativeDecoder::load(checkpoint, shape, format).map(|d| Some(Arc::new(d)))
}

/// One worker's handle on the shared native decoder.
pub struct NativeBackend(pub Arc<NativeDecoder>);

/// The decoder state of one request on the native decoder: the cross-attention keys and values
/// of its source, computed once, and one self-attention cache per row.
pub struct NativeRequest {
    cross: CrossCache,
    caches: Vec<RowCache>,
}

impl NativeRequest {
    /// `rows` rows on the encoder's output for one source, shaped (1, src_len, d_model).
    pub fn begin(native: &NativeDecoder, encoder_states: &DynValue, rows: usize) -> Result<Self, EngineError> {
        let (shape, states) = encoder_states.try_extract_tensor::<f32>()?;
        let d = native.shape().d_model;
        if !matches!(&shape[..], [1, _, w] if *w as usize == d) {
            return Err(EngineError::Model(format!("encoder output has shape {shape:?}; expected (1, len, {d})")));
        }
        Ok(Self { cross: native.cross_cache(states), caches: vec![native.new_row(); rows] })
    }

    /// Beam search reordered the rows: row `i` continues what row `parents[i]` had.
    pub fn reorder(&mut self, parents: &[usize]) {
        self.caches = parents.iter().map(|&p| self.caches[p].clone()).collect();
    }
}

/// One decoder step for the rows of several requests, each fed its `tokens`: every matrix is
/// read once for all of them. `logits` gets `rows x vocab` per request, in order.
pub fn step_requests(
    native: &NativeDecoder,
    requests: &mut [(&mut NativeRequest, &[i64])],
    scratch: &mut Scratch,
    logits: &mut Vec<f32>,
) -> Result<(), EngineError> {
    let vocab = native.shape().vocab;
    let rows: usize = requests.iter().map(|(r, _)| r.caches.len()).sum();
    logits.resize(rows * vocab, 0.0);
    let mut outs = logits.chunks_exact_mut(vocab);
    let mut batch = Vec::with_capacity(rows);
    for (request, tokens) in requests.iter_mut() {
        let request = &mut **request;
        if tokens.len() != request.caches.len() {
            return Err(EngineError::Model(format!("{} tokens fed to {} rows", tokens.len(), request.caches.len())));
        }
        let cross = &request.cross;
        for (&token, cache) in tokens.iter().zip(request.caches.iter_mut()) {
            let token =
                u32::try_from(token).map_err(|_| EngineError::Model(format!("token id {token} out of range")))?;
            let logits = outs.next().expect("one logits row per decoder row");
            batch.push(StepRow { token, cache, cross, logits });
        }
    }
    native.step_batch(&mut batch, scratch);
    Ok(())
}

/// [`DecoderSteps`] of one request on the native decoder (its beam's rows share each pass).
struct NativeSteps<'a> {
    native: &'a NativeDecoder,
    request: NativeRequest,
    scratch: Scratch,
    logits: Vec<f32>,
}

impl DecoderBackend for NativeBackend {
    fn kind(&self) -> DecoderKind {
        DecoderKind::Native
    }

    fn begin<'a>(
        &'a mut self,
        encoder_states: DynValue,
        rows: usize,
    ) -> Result<Box<dyn DecoderSteps + 'a>, EngineError> {
        let native: &NativeDecoder = &self.0;
        let request = NativeRequest::begin(native, &encoder_states, rows)?;
        Ok(Box::new(NativeSteps { native, request, scratch: Scratch::default(), logits: Vec::new() }))
    }
}

impl DecoderSteps for NativeSteps<'_> {
    fn step(&mut self, tokens: &[i64]) -> Result<&[f32], EngineError> {
        step_requests(self.native, &mut [(&mut self.request, tokens)], &mut self.scratch, &mut self.logits)?;
        Ok(&self.logits)
    }

    fn reorder(&mut self, parents: &[usize]) -> Result<(), EngineError> {
        self.request.reorder(parents);
        Ok(())
    }
}
