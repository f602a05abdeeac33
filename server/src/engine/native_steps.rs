//! The native int8 decoder ([`super::native`]) behind the decoder seam: one self-attention cache
//! per row, the cross-attention keys and values computed once per request and shared by its rows.

use std::sync::Arc;

use ort::value::DynValue;

use super::{
    model_dir::{self, ModelDir, ModelError},
    native::{CrossCache, DecoderShape, NativeDecoder, RowCache, Scratch, WeightFormat},
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

struct NativeSteps<'a> {
    native: &'a NativeDecoder,
    cross: CrossCache,
    caches: Vec<RowCache>,
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
        let (shape, states) = encoder_states.try_extract_tensor::<f32>()?;
        let d = native.shape().d_model;
        if !matches!(&shape[..], [1, _, w] if *w as usize == d) {
            return Err(EngineError::Model(format!("encoder output has shape {shape:?}; expected (1, len, {d})")));
        }
        let cross = native.cross_cache(states);
        let logits = vec![0f32; rows * native.shape().vocab];
        Ok(Box::new(NativeSteps {
            native,
            cross,
            caches: vec![native.new_row(); rows],
            scratch: Scratch::default(),
            logits,
        }))
    }
}

impl DecoderSteps for NativeSteps<'_> {
    fn step(&mut self, tokens: &[i64]) -> Result<&[f32], EngineError> {
        let vocab = self.native.shape().vocab;
        for ((&token, cache), out) in tokens.iter().zip(self.caches.iter_mut()).zip(self.logits.chunks_exact_mut(vocab))
        {
            let token =
                u32::try_from(token).map_err(|_| EngineError::Model(format!("token id {token} out of range")))?;
            self.native.step(token, cache, &self.cross, &mut self.scratch, out);
        }
        Ok(&self.logits)
    }

    fn reorder(&mut self, parents: &[usize]) -> Result<(), EngineError> {
        self.caches = parents.iter().map(|&p| self.caches[p].clone()).collect();
        Ok(())
    }
}
