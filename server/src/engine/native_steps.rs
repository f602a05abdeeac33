//! The native int8 decoder ([`super::native`]) behind the decoder seam: one self-attention cache
//! per row, the cross-attention keys and values computed once per request and shared by its rows.

use std::sync::Arc;

use ort::value::DynValue;

use super::{
    model_dir::{self, ModelDir, ModelError},
    native::{kernels, q4, CrossCache, DecoderShape, NativeDecoder, RowCache, Scratch, StepRow, WeightFormat},
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

/// How many draft tokens a step carries ([`super::lookup`]): up to `per_request` after the
/// next token of a one-row request, while the step's rows stay within what the kernel's
/// batched product reads for about the price of one ([`kernels::Kernel::free_rows`]), so a
/// rejected draft costs little and a loaded worker's full batch none. On 4-bit weights only
/// with AVX2, whose batched 4-bit kernel unpacks each row once for every vector
/// ([`q4::free_rows`]; the shipped model at concurrency 1, AMD Zen 3: 94-110 req/s with 3
/// drafts against 83-100 without); elsewhere their product runs one vector at a time (60-74
/// req/s with 3 drafts against 84-86 without, Intel Xeon).
#[derive(Debug, Clone, Copy)]
pub struct DraftBudget {
    per_request: usize,
    rows: usize,
}

impl DraftBudget {
    /// `per_request` drafts at most (`--draft-tokens`; 0 turns drafting off) on step weights
    /// stored as `format`.
    pub fn new(per_request: usize, format: WeightFormat) -> Self {
        let rows = match format {
            WeightFormat::Int8 => kernels::kernel().free_rows(),
            WeightFormat::Q4 => q4::free_rows(kernels::kernel()),
        };
        Self { per_request, rows }
    }

    /// Drafts for a one-row request when the step already has `taken` rows (its own included).
    pub fn drafts(&self, taken: usize) -> usize {
        self.per_request.min(self.rows.saturating_sub(taken))
    }
}

/// One worker's handle on the shared native decoder.
pub struct NativeBackend {
    pub native: Arc<NativeDecoder>,
    pub drafts: DraftBudget,
}

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

    /// Forgets the last `positions` fed tokens of every row (rejected drafts).
    pub fn rewind(&mut self, positions: usize) {
        self.caches.iter_mut().for_each(|c| c.rewind(positions));
    }
}

/// One decoder step for the rows of several requests, each request fed its `tokens` (the same
/// number per row, consecutive per row: one each, or a token and its drafts): every matrix is
/// read once for all of them. `logits` gets `vocab` per fed token, in the order fed.
pub fn step_requests(
    native: &NativeDecoder,
    requests: &mut [(&mut NativeRequest, &[i64])],
    scratch: &mut Scratch,
    logits: &mut Vec<f32>,
) -> Result<(), EngineError> {
    let vocab = native.shape().vocab;
    let mut ids = Vec::with_capacity(requests.iter().map(|(_, t)| t.len()).sum());
    for (request, tokens) in requests.iter() {
        let rows = request.caches.len();
        if rows == 0 || tokens.is_empty() || tokens.len() % rows != 0 {
            return Err(EngineError::Model(format!("{} tokens fed to {rows} rows", tokens.len())));
        }
        for &token in tokens.iter() {
            ids.push(u32::try_from(token).map_err(|_| EngineError::Model(format!("token id {token} out of range")))?);
        }
    }
    logits.resize(ids.len() * vocab, 0.0);
    let (mut ids, mut outs) = (ids.as_slice(), logits.as_mut_slice());
    let mut batch = Vec::with_capacity(requests.len());
    for (request, tokens) in requests.iter_mut() {
        let request = &mut **request;
        let per_row = tokens.len() / request.caches.len();
        let cross = &request.cross;
        for cache in request.caches.iter_mut() {
            let (fed, rest) = ids.split_at(per_row);
            let (out, more) = std::mem::take(&mut outs).split_at_mut(per_row * vocab);
            (ids, outs) = (rest, more);
            batch.push(StepRow { tokens: fed, cache, cross, logits: out });
        }
    }
    native.step_batch(&mut batch, scratch);
    Ok(())
}

/// [`DecoderSteps`] of one request on the native decoder (its beam's rows share each pass).
struct NativeSteps<'a> {
    native: &'a NativeDecoder,
    drafts: DraftBudget,
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
        let native: &NativeDecoder = &self.native;
        let request = NativeRequest::begin(native, &encoder_states, rows)?;
        Ok(Box::new(NativeSteps {
            native,
            drafts: self.drafts,
            request,
            scratch: Scratch::default(),
            logits: Vec::new(),
        }))
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

    fn drafts(&self) -> usize {
        self.drafts.drafts(1)
    }

    fn rewind(&mut self, positions: usize) -> Result<(), EngineError> {
        self.request.rewind(positions);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{kernels, q4, DraftBudget, WeightFormat};

    #[test]
    fn drafts_fill_only_the_rows_a_step_has_to_spare() {
        let free = kernels::kernel().free_rows();
        let budget = DraftBudget::new(3, WeightFormat::Int8);
        assert_eq!(budget.drafts(1), 3.min(free - 1), "{} kernel", kernels::kernel().name());
        assert_eq!(budget.drafts(free), 0, "a step at the kernel's free rows takes no drafts");
        assert_eq!(budget.drafts(free + 5), 0);
        assert_eq!(DraftBudget::new(0, WeightFormat::Int8).drafts(1), 0, "--draft-tokens 0");
        // 4-bit rows: AVX2's batched kernel has a row to spare, the others run one vector at a time.
        let q4_free = q4::free_rows(kernels::kernel());
        assert_eq!(q4_free, if kernels::kernel() == kernels::Kernel::Avx2 { 2 } else { 1 });
        assert_eq!(DraftBudget::new(3, WeightFormat::Q4).drafts(1), 3.min(q4_free - 1));
        assert_eq!(DraftBudget::new(3, WeightFormat::Q4).drafts(q4_free), 0);
    }
}
