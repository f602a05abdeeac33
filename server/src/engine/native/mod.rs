//! A T5 decoder step in Rust on int8 weights, for the engine's decode loop.
//!
//! ONNX Runtime still runs the encoder; every decoder step, the first included, runs here. Why:
//! a step multiplies one vector by every decoder matrix plus the LM head (38 MiB of int8 for
//! flan-t5-small), so its cost is reading those weights. ONNX Runtime's int8 ops take about
//! 5.5 ms for that on the 2-core EPYC VM, against a 3.2 ms plain read (docs/performance.md);
//! the GEMV in [`kernels`] runs at read speed.
//!
//! Numerics: weights are quantized symmetrically per output row from the checkpoint, and each
//! input vector per call, so a row's answer never depends on other rows (ONNX Runtime's
//! dynamic quantization uses one activation scale per tensor). Everything else is fp32.

pub mod kernels;
pub mod matrix;
pub mod q4;
pub mod weights;

use std::path::Path;

use kernels::{dot, gelu_new, gemv, gemv_rows, rms_norm, softmax, QuantVector, RowProduct};
pub use matrix::WeightFormat;
pub use weights::DecoderShape;
use weights::{Layer, Weights};

use super::model_dir::ModelError;

pub struct NativeDecoder {
    w: Weights,
}

/// Cross-attention keys and values of one source, per layer `[src_len][inner]`: computed once
/// from the encoder output and shared by every row.
pub struct CrossCache {
    len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// One row's self-attention cache, per layer `[steps][inner]`.
#[derive(Clone)]
pub struct RowCache {
    steps: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// Reusable buffers of one generation, so a step allocates nothing once they have grown.
#[derive(Default)]
pub struct Scratch {
    hidden: Vec<f32>,
    normed: Vec<f32>,
    qv: QuantVector,
    proj: Vec<f32>,
    ctx: Vec<f32>,
    scores: Vec<f32>,
    bias: Vec<f32>,
    ff: Vec<f32>,
}

/// T5's relative position bucket for a decoder (causal) self-attention: `distance` = query
/// position minus key position (>= 0). Same arithmetic (fp32 log) as Hugging Face's
/// `_relative_position_bucket`, which the ONNX export also baked in.
pub fn causal_bucket(distance: usize, num_buckets: usize, max_distance: usize) -> usize {
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        return distance;
    }
    let ratio = (distance as f32 / max_exact as f32).ln() / (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (ratio * (num_buckets - max_exact) as f32) as usize;
    large.min(num_buckets - 1)
}

impl NativeDecoder {
    pub fn load(checkpoint: &Path, shape: DecoderShape, format: WeightFormat) -> Result<Self, ModelError> {
        Ok(Self { w: Weights::load(checkpoint, shape, format)? })
    }

    pub fn shape(&self) -> &DecoderShape {
        &self.w.shape
    }

    /// Whether each step's weights are read as a stream (too large to stay cached).
    pub fn streams_weights(&self) -> bool {
        self.w.streamed
    }

    /// How the step weights are stored (`--native-weights`).
    pub fn weight_format(&self) -> WeightFormat {
        self.w.format
    }

    /// Bytes of weights one decoder step reads.
    pub fn step_bytes(&self) -> usize {
        self.w.step_bytes()
    }

    /// Cross-attention K/V of every layer for one encoder output, `[src_len][d_model]` row-major.
    pub fn cross_cache(&self, encoder_states: &[f32]) -> CrossCache {
        let s = &self.w.shape;
        let (d, inner) = (s.d_model, s.inner());
        let len = encoder_states.len() / d;
        let inputs: Vec<QuantVector> = encoder_states
            .chunks_exact(d)
            .map(|pos| {
                let mut qv = QuantVector::default();
                qv.set(pos);
                qv
            })
            .collect();
        let mut keys = vec![Vec::with_capacity(len * inner); s.layers];
        let mut values = vec![Vec::with_capacity(len * inner); s.layers];
        let mut kv = vec![0f32; len * 2 * inner];
        // Layer by layer, so one layer's K/V weights stay in cache across all positions; the
        // positions are split across the pool's threads, if any.
        for (i, layer) in self.w.layers.iter().enumerate() {
            let project = |(qv, out): (&QuantVector, &mut [f32])| gemv_rows(&layer.cross_kv, 0, qv, out);
            if kernels::pool_threads() > 1 {
                use rayon::prelude::*;
                inputs.par_iter().zip(kv.par_chunks_mut(2 * inner)).for_each(project);
            } else {
                inputs.iter().zip(kv.chunks_mut(2 * inner)).for_each(project);
            }
            for pos in kv.chunks_exact(2 * inner) {
                keys[i].extend_from_slice(&pos[..inner]);
                values[i].extend_from_slice(&pos[inner..]);
            }
        }
        CrossCache { len, keys, values }
    }

    pub fn new_row(&self) -> RowCache {
        let layers = self.w.shape.layers;
        RowCache { steps: 0, keys: vec![Vec::new(); layers], values: vec![Vec::new(); layers] }
    }

    /// Feeds one token to one row; writes the next token's logits (vocab entries).
    pub fn step(&self, token: u32, row: &mut RowCache, cross: &CrossCache, sc: &mut Scratch, logits: &mut [f32]) {
        let s = &self.w.shape;
        let (d, inner, heads) = (s.d_model, s.inner(), s.num_heads);
        let token = (token as usize).min(s.vocab - 1);
        sc.hidden.clear();
        sc.hidden.extend_from_slice(&self.w.embed[token * d..(token + 1) * d]);
        sc.normed.resize(d, 0.0);
        sc.ctx.resize(inner, 0.0);

        // Position bias of this query against every cached key (shared by all layers).
        let t = row.steps;
        sc.bias.resize(heads * (t + 1), 0.0);
        for j in 0..=t {
            let bucket = causal_bucket(t - j, s.num_buckets, s.max_distance);
            for h in 0..heads {
                sc.bias[h * (t + 1) + j] = self.w.position_bias[bucket * heads + h];
            }
        }

        for (i, layer) in self.w.layers.iter().enumerate() {
            self.self_attention(layer, i, row, sc);
            self.cross_attention(layer, i, cross, sc);
            self.feed_forward(layer, sc);
        }
        row.steps += 1;

        rms_norm(&sc.hidden, &self.w.final_norm, s.eps, &mut sc.normed);
        if s.tied {
            let scale = (d as f32).powf(-0.5);
            sc.normed.iter_mut().for_each(|v| *v *= scale);
        }
        sc.qv.set(&sc.normed);
        gemv(&self.w.lm_head, &sc.qv, logits);
    }

    fn self_attention(&self, layer: &Layer, i: usize, row: &mut RowCache, sc: &mut Scratch) {
        let s = &self.w.shape;
        let inner = s.inner();
        rms_norm(&sc.hidden, &layer.self_norm, s.eps, &mut sc.normed);
        sc.qv.set(&sc.normed);
        sc.proj.resize(3 * inner, 0.0);
        gemv(&layer.qkv, &sc.qv, &mut sc.proj);
        row.keys[i].extend_from_slice(&sc.proj[inner..2 * inner]);
        row.values[i].extend_from_slice(&sc.proj[2 * inner..]);
        let len = row.steps + 1;
        attend(&sc.proj[..inner], &row.keys[i], &row.values[i], len, s, Some(&sc.bias), &mut sc.scores, &mut sc.ctx);
        self.project_back(&layer.self_out, sc);
    }

    fn cross_attention(&self, layer: &Layer, i: usize, cross: &CrossCache, sc: &mut Scratch) {
        let s = &self.w.shape;
        rms_norm(&sc.hidden, &layer.cross_norm, s.eps, &mut sc.normed);
        sc.qv.set(&sc.normed);
        sc.proj.resize(s.inner(), 0.0);
        gemv(&layer.cross_q, &sc.qv, &mut sc.proj);
        attend(&sc.proj, &cross.keys[i], &cross.values[i], cross.len, s, None, &mut sc.scores, &mut sc.ctx);
        self.project_back(&layer.cross_out, sc);
    }

    fn feed_forward(&self, layer: &Layer, sc: &mut Scratch) {
        let s = &self.w.shape;
        rms_norm(&sc.hidden, &layer.ff_norm, s.eps, &mut sc.normed);
        sc.qv.set(&sc.normed);
        sc.ff.resize(layer.ff_in.rows(), 0.0);
        gemv(&layer.ff_in, &sc.qv, &mut sc.ff);
        let act = if s.gated_gelu {
            let (gate, linear) = sc.ff.split_at_mut(s.d_ff);
            for (g, l) in gate.iter_mut().zip(linear.iter()) {
                *g = gelu_new(*g) * l;
            }
            &sc.ff[..s.d_ff]
        } else {
            sc.ff.iter_mut().for_each(|v| *v = v.max(0.0));
            &sc.ff[..]
        };
        sc.qv.set(act);
        sc.proj.resize(s.d_model, 0.0);
        gemv(&layer.ff_out, &sc.qv, &mut sc.proj);
        sc.hidden.iter_mut().zip(&sc.proj).for_each(|(h, p)| *h += p);
    }

    /// `hidden += out_proj(ctx)`.
    fn project_back(&self, out: &matrix::Matrix, sc: &mut Scratch) {
        sc.qv.set(&sc.ctx);
        sc.proj.resize(self.w.shape.d_model, 0.0);
        gemv(out, &sc.qv, &mut sc.proj);
        sc.hidden.iter_mut().zip(&sc.proj).for_each(|(h, p)| *h += p);
    }
}

/// Multi-head attention of one query over `len` cached positions (`[len][inner]`), T5-style:
/// no 1/sqrt(d_kv) scaling (folded into the weights), an optional bias per head and position.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    len: usize,
    s: &DecoderShape,
    bias: Option<&[f32]>,
    scores: &mut Vec<f32>,
    ctx: &mut [f32],
) {
    let (dk, inner) = (s.d_kv, s.inner());
    scores.resize(len, 0.0);
    for h in 0..s.num_heads {
        let qh = &q[h * dk..(h + 1) * dk];
        for (j, score) in scores.iter_mut().enumerate() {
            let k = &keys[j * inner + h * dk..j * inner + (h + 1) * dk];
            *score = dot(qh, k) + bias.map_or(0.0, |b| b[h * len + j]);
        }
        softmax(scores);
        let out = &mut ctx[h * dk..(h + 1) * dk];
        out.fill(0.0);
        for (j, p) in scores.iter().enumerate() {
            let v = &values[j * inner + h * dk..j * inner + (h + 1) * dk];
            out.iter_mut().zip(v).for_each(|(o, x)| *o += p * x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::causal_bucket;

    #[test]
    fn buckets_match_hugging_face() {
        // Values of transformers' T5Attention._relative_position_bucket(-n, bidirectional=False,
        // num_buckets=32, max_distance=128) for these distances.
        let expected =
            [(0, 0), (1, 1), (15, 15), (16, 16), (20, 17), (31, 21), (32, 21), (64, 26), (127, 31), (500, 31)];
        for (n, b) in expected {
            assert_eq!(causal_bucket(n, 32, 128), b, "distance {n}");
        }
    }
}
