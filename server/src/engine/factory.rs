//! Which engine serves a model directory, decided once at start-up: the native int8 decoder
//! when the directory ships a checkpoint and `--decoder` allows it, else ONNX Runtime's decoder
//! sessions. Makes the worker pool's engines; the server only logs and exports the choice.

use std::sync::Arc;

use ort::environment::Environment;

use super::{
    model_dir::{ModelDir, ModelError},
    native::{kernels, NativeDecoder, WeightFormat},
    native_steps::load_native,
    onnx_decoder::check_onnx_decoder,
    onnx_t5::{OnnxT5, SessionSettings},
    pool::EngineFactory,
    DecoderKind, Engine,
};

/// The native decoder's set-up, as start-up reports it.
#[derive(Debug, Clone, Copy)]
pub struct NativeInfo {
    pub kernel: &'static str,
    pub weights: WeightFormat,
    /// Bytes of weights one decoder step reads.
    pub step_bytes: usize,
    /// Read with non-temporal prefetches (larger than the last-level cache).
    pub streamed: bool,
}

/// The loaded choice: what every worker's engine will be.
pub struct Engines {
    env: Environment,
    model: ModelDir,
    settings: SessionSettings,
    /// One copy of the native decoder's weights for every worker.
    native: Option<Arc<NativeDecoder>>,
}

impl Engines {
    /// Loads what workers share and checks the files every choice needs: with the native
    /// decoder the ONNX decoder files answer nothing, but a damaged one should stop start-up
    /// now, not on the day someone runs `--decoder onnx`.
    pub fn load(env: Environment, model: ModelDir, settings: SessionSettings) -> Result<Self, ModelError> {
        let native = load_native(&model, settings.decoder, settings.native_weights)?;
        if native.is_some() {
            check_onnx_decoder(&env, &model)?;
        }
        Ok(Self { env, model, settings, native })
    }

    /// Who runs the decoder steps.
    pub fn decoder(&self) -> DecoderKind {
        if self.native.is_some() {
            DecoderKind::Native
        } else {
            DecoderKind::Onnx
        }
    }

    /// What the native decoder runs on, when it runs the steps (logs and metrics).
    pub fn native(&self) -> Option<NativeInfo> {
        self.native.as_ref().map(|n| NativeInfo {
            kernel: kernels::kernel().name(),
            weights: n.weight_format(),
            step_bytes: n.step_bytes(),
            streamed: n.streams_weights(),
        })
    }

    pub fn model_id(&self) -> &str {
        &self.model.model_id
    }

    /// Makes one engine per worker.
    pub fn factory(self) -> EngineFactory {
        Arc::new(move |_| {
            OnnxT5::load_with(&self.env, &self.model, &self.settings, self.native.clone())
                .map(|engine| Box::new(engine) as Box<dyn Engine>)
        })
    }
}
