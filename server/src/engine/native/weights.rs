//! The decoder's weights, read from the model's PyTorch checkpoint (`model.safetensors`, the
//! Hugging Face `T5ForConditionalGeneration` names) and quantized to int8 per output row.

use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde_json::Value;

use super::kernels::{QuantMatrix, RowProduct};
use super::matrix::{Matrix, WeightFormat};
use crate::engine::model_dir::{ModelError, T5Config};

/// Decoder hyper-parameters beyond [`T5Config`], from `config.json` with T5's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderShape {
    pub d_model: usize,
    pub num_heads: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub vocab: usize,
    pub layers: usize,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub eps: f32,
    /// `gated-gelu` (T5 v1.1, Flan-T5) rather than `relu` (original T5).
    pub gated_gelu: bool,
    /// Tied input/output embeddings: T5 then scales the last hidden state by d_model^-0.5.
    pub tied: bool,
}

impl DecoderShape {
    pub fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }

    pub fn from_config(config: &T5Config, json: &Value) -> Result<Self, String> {
        let uint = |key: &str, default: usize| json.get(key).and_then(Value::as_u64).map_or(default, |v| v as usize);
        let act = json.get("feed_forward_proj").and_then(Value::as_str).unwrap_or("relu");
        let gated_gelu = match act {
            "gated-gelu" => true,
            "relu" => false,
            other => return Err(format!("feed_forward_proj `{other}` is not supported (gated-gelu or relu)")),
        };
        let d_ff = uint("d_ff", 0);
        if d_ff == 0 {
            return Err("config.json has no `d_ff`".into());
        }
        Ok(Self {
            d_model: config.d_model,
            num_heads: config.num_heads,
            d_kv: config.d_kv,
            d_ff,
            vocab: config.vocab_size,
            layers: config.num_decoder_layers,
            num_buckets: uint("relative_attention_num_buckets", 32),
            max_distance: uint("relative_attention_max_distance", 128),
            eps: json.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            gated_gelu,
            tied: json.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(true),
        })
    }
}

/// One decoder block, projections fused where they share an input.
pub struct Layer {
    pub self_norm: Vec<f32>,
    /// q, k and v stacked: (3 * inner) x d_model.
    pub qkv: Matrix,
    pub self_out: Matrix,
    pub cross_norm: Vec<f32>,
    pub cross_q: Matrix,
    /// Cross-attention k and v stacked: (2 * inner) x d_model, applied to the encoder output once.
    pub cross_kv: QuantMatrix,
    pub cross_out: Matrix,
    pub ff_norm: Vec<f32>,
    /// Gated: wi_0 and wi_1 stacked, (2 * d_ff) x d_model; relu: wi, d_ff x d_model.
    pub ff_in: Matrix,
    pub ff_out: Matrix,
}

/// Step weights above this size are streamed when the CPU's last-level cache size cannot be
/// read (`kernels::streams`).
pub const STREAM_ABOVE_BYTES: usize = 16 << 20;

pub struct Weights {
    pub shape: DecoderShape,
    /// Token embeddings, fp32, vocab x d_model (one row is read per step).
    pub embed: Vec<f32>,
    /// Relative position bias of the first self-attention, num_buckets x num_heads.
    pub position_bias: Vec<f32>,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    pub lm_head: Matrix,
    pub format: WeightFormat,
    /// The step weights are read with non-temporal prefetches ([`Weights::mark_streamed`]).
    pub streamed: bool,
}

struct Checkpoint<'a> {
    tensors: SafeTensors<'a>,
    file: &'a Path,
}

impl Checkpoint<'_> {
    fn malformed(&self, reason: String) -> ModelError {
        ModelError::Malformed { file: self.file.to_path_buf(), reason }
    }

    /// A tensor as fp32, checked against the expected shape.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let view = self.tensors.tensor(name).map_err(|_| self.malformed(format!("no tensor `{name}`")))?;
        if view.shape() != shape {
            return Err(self.malformed(format!("`{name}` has shape {:?}; expected {shape:?}", view.shape())));
        }
        let values = to_f32(&view).map_err(|reason| self.malformed(format!("`{name}`: {reason}")))?;
        // A NaN or infinity turns every logit into NaN: the server would answer the query
        // itself to everything while looking healthy.
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.malformed(format!(
                "`{name}` holds a non-finite value ({}) at index {i}; the checkpoint is corrupt",
                values[i]
            )));
        }
        Ok(values)
    }

    fn first_of(&self, names: &[&str], shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let name = names.iter().find(|n| self.tensors.tensor(n).is_ok()).unwrap_or(&names[0]);
        self.get(name, shape)
    }

    /// Row-stacked `[rows_i, cols]` matrices, fp32.
    fn stacked_f32(&self, names: &[String], rows: usize, cols: usize) -> Result<Vec<f32>, ModelError> {
        let mut all = Vec::with_capacity(names.len() * rows * cols);
        for name in names {
            all.extend(self.get(name, &[rows, cols])?);
        }
        Ok(all)
    }

    /// Row-stacked step weights, quantized to `format`.
    fn stacked(&self, names: &[String], rows: usize, cols: usize, format: WeightFormat) -> Result<Matrix, ModelError> {
        Ok(Matrix::quantize(format, names.len() * rows, cols, &self.stacked_f32(names, rows, cols)?))
    }
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let bytes = view.data();
    let pairs = bytes.chunks_exact(2).map(|b| [b[0], b[1]]);
    Ok(match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => pairs.map(|b| half::f16::from_le_bytes(b).to_f32()).collect(),
        Dtype::BF16 => pairs.map(|b| half::bf16::from_le_bytes(b).to_f32()).collect(),
        other => return Err(format!("dtype {other:?} is not supported (F32, F16 or BF16)")),
    })
}

impl Weights {
    pub fn load(file: &Path, shape: DecoderShape, format: WeightFormat) -> Result<Self, ModelError> {
        let bytes =
            std::fs::read(file).map_err(|e| ModelError::Load { file: file.to_path_buf(), reason: e.to_string() })?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::Malformed { file: file.to_path_buf(), reason: e.to_string() })?;
        let ck = Checkpoint { tensors, file };
        let (d, inner, ff) = (shape.d_model, shape.inner(), shape.d_ff);

        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let p = format!("decoder.block.{i}.layer");
            let names = |prefix: &str, parts: &[&str]| -> Vec<String> {
                parts.iter().map(|n| format!("{p}.{prefix}.{n}.weight")).collect()
            };
            let ff_in = if shape.gated_gelu {
                ck.stacked(&names("2.DenseReluDense", &["wi_0", "wi_1"]), ff, d, format)?
            } else {
                ck.stacked(&names("2.DenseReluDense", &["wi"]), ff, d, format)?
            };
            layers.push(Layer {
                self_norm: ck.get(&format!("{p}.0.layer_norm.weight"), &[d])?,
                qkv: ck.stacked(&names("0.SelfAttention", &["q", "k", "v"]), inner, d, format)?,
                self_out: ck.stacked(&names("0.SelfAttention", &["o"]), d, inner, format)?,
                cross_norm: ck.get(&format!("{p}.1.layer_norm.weight"), &[d])?,
                cross_q: ck.stacked(&names("1.EncDecAttention", &["q"]), inner, d, format)?,
                // Applied once per request (not per step): int8 in every format.
                cross_kv: QuantMatrix::quantize(
                    2 * inner,
                    d,
                    &ck.stacked_f32(&names("1.EncDecAttention", &["k", "v"]), inner, d)?,
                ),
                cross_out: ck.stacked(&names("1.EncDecAttention", &["o"]), d, inner, format)?,
                ff_norm: ck.get(&format!("{p}.2.layer_norm.weight"), &[d])?,
                ff_in,
                ff_out: ck.stacked(&names("2.DenseReluDense", &["wo"]), d, ff, format)?,
            });
        }
        let embed = ck.first_of(&["decoder.embed_tokens.weight", "shared.weight"], &[shape.vocab, d])?;
        let lm_head = if shape.tied {
            Matrix::quantize(format, shape.vocab, d, &embed)
        } else {
            ck.stacked(&["lm_head.weight".to_owned()], shape.vocab, d, format)?
        };
        let mut w = Self {
            position_bias: ck.get(
                "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                &[shape.num_buckets, shape.num_heads],
            )?,
            final_norm: ck.get("decoder.final_layer_norm.weight", &[d])?,
            embed,
            layers,
            lm_head,
            shape,
            format,
            streamed: false,
        };
        w.mark_streamed();
        Ok(w)
    }

    /// Bytes a decoder step reads: every matrix but the cross-attention K/V, plus the LM head.
    pub fn step_bytes(&self) -> usize {
        let per_layer = |l: &Layer| {
            l.qkv.bytes()
                + l.self_out.bytes()
                + l.cross_q.bytes()
                + l.cross_out.bytes()
                + l.ff_in.bytes()
                + l.ff_out.bytes()
        };
        self.layers.iter().map(per_layer).sum::<usize>() + self.lm_head.bytes()
    }

    /// Step weights larger than the last-level cache are read with non-temporal prefetches
    /// (`kernels::streams`): flan-t5-small (36.7 MiB) generates 5% faster on one thread, 9% on
    /// two, on the Zen 4 EPYC (32 MiB L3). Ones that fit stay cached (the shipped model's
    /// 3.4 MiB were 4-7% slower streamed). docs/performance.md has the runs.
    fn mark_streamed(&mut self) {
        let stream = super::kernels::streams(self.step_bytes());
        self.streamed = stream;
        for l in &mut self.layers {
            for m in [&mut l.qkv, &mut l.self_out, &mut l.cross_q, &mut l.cross_out, &mut l.ff_in, &mut l.ff_out] {
                m.set_streamed(stream);
            }
        }
        self.lm_head.set_streamed(stream);
    }
}
