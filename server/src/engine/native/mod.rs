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
pub mod team;
pub mod weights;

use std::path::Path;

use kernels::{dot, gelu_new, gemv_batch, rms_norm, softmax, weighted_sum, QuantVector, RowProduct};
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

impl RowCache {
    /// Positions fed so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Forgets the last `positions` fed tokens (drafts the search rejected).
    pub fn rewind(&mut self, positions: usize) {
        let keep = self.steps.saturating_sub(positions);
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let per_step = layer.len() / self.steps.max(1);
            layer.truncate(keep * per_step);
        }
        self.steps = keep;
    }
}

/// Reusable buffers of the rows of one step, so a step allocates nothing once they have grown.
#[derive(Default)]
pub struct Scratch {
    rows: Vec<RowScratch>,
}

/// One row's buffers.
#[derive(Default)]
struct RowScratch {
    hidden: Vec<f32>,
    normed: Vec<f32>,
    qv: QuantVector,
    proj: Vec<f32>,
    ctx: Vec<f32>,
    scores: Vec<f32>,
    bias: Vec<f32>,
    ff: Vec<f32>,
}

/// One row of a batched decoder step ([`NativeDecoder::step_batch`]): the tokens it is fed
/// (one, or a token and drafts after it), its self-attention cache, the cross-attention cache
/// of its source, and where the logits after each token go (vocab entries per token).
pub struct StepRow<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut RowCache,
    pub cross: &'a CrossCache,
    pub logits: &'a mut [f32],
}

/// The input and output a batched matrix product reads and writes in a row's buffers.
type Operands = fn(&mut RowScratch) -> (&QuantVector, &mut Vec<f32>);

fn into_proj(r: &mut RowScratch) -> (&QuantVector, &mut Vec<f32>) {
    (&r.qv, &mut r.proj)
}

fn into_ff(r: &mut RowScratch) -> (&QuantVector, &mut Vec<f32>) {
    (&r.qv, &mut r.ff)
}

/// `W qv` into each row's output buffer, the weights read once for all rows ([`gemv_batch`]).
fn project(w: &matrix::Matrix, rows: &mut [RowScratch], operands: Operands) {
    let n = w.rows();
    let (xs, mut ys): (Vec<&QuantVector>, Vec<&mut [f32]>) = rows
        .iter_mut()
        .map(|r| {
            let (x, y) = operands(r);
            y.resize(n, 0.0);
            (x, y.as_mut_slice())
        })
        .unzip();
    gemv_batch(w, &xs, &mut ys);
}

/// The residual: `hidden += W qv` for every row.
fn add_projection(w: &matrix::Matrix, rows: &mut [RowScratch]) {
    project(w, rows, into_proj);
    for r in rows.iter_mut() {
        r.hidden.iter_mut().zip(&r.proj).for_each(|(h, p)| *h += p);
    }
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
        // Layer by layer, so one layer's K/V weights stay in cache across all positions, and
        // CROSS_POSITIONS positions per batched product (each weight block loaded once for
        // them); the groups are split across the pool's threads, if any.
        const CROSS_POSITIONS: usize = 4;
        for (i, layer) in self.w.layers.iter().enumerate() {
            let project = |(qvs, out): (&[QuantVector], &mut [f32])| {
                let xs: Vec<&QuantVector> = qvs.iter().collect();
                let mut ys: Vec<&mut [f32]> = out.chunks_mut(2 * inner).collect();
                layer.cross_kv.product_rows_batch(0, &xs, &mut ys);
            };
            team::with_current(|team| match team.filter(|t| t.threads() > 1 && !inputs.is_empty()) {
                // Whole groups of positions per thread, in order.
                Some(team) => {
                    let per = inputs.len().div_ceil(CROSS_POSITIONS).div_ceil(team.threads()) * CROSS_POSITIONS;
                    team.run_parts(kv.chunks_mut(per * 2 * inner).collect(), |i, out| {
                        let qvs = &inputs[i * per..(i * per + out.len() / (2 * inner))];
                        qvs.chunks(CROSS_POSITIONS).zip(out.chunks_mut(CROSS_POSITIONS * 2 * inner)).for_each(project);
                    });
                }
                None => {
                    inputs.chunks(CROSS_POSITIONS).zip(kv.chunks_mut(CROSS_POSITIONS * 2 * inner)).for_each(project);
                }
            });
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
        self.step_batch(&mut [StepRow { tokens: &[token], cache: row, cross, logits }], sc);
    }

    /// Feeds each row its tokens, for one request or several (continuous batching): each
    /// matrix is read once for every fed position. Each position's arithmetic is the one
    /// [`Self::step`] does for it alone, bit for bit: positions of one row attend to the ones
    /// before them, as if fed one step at a time, and an answer never depends on its neighbours.
    pub fn step_batch(&self, batch: &mut [StepRow<'_>], sc: &mut Scratch) {
        let s = &self.w.shape;
        let (d, inner, heads) = (s.d_model, s.inner(), s.num_heads);
        let positions: usize = batch.iter().map(|row| row.tokens.len()).sum();
        if sc.rows.len() < positions {
            sc.rows.resize_with(positions, RowScratch::default);
        }
        let rows = &mut sc.rows[..positions];
        let fed = batch.iter().flat_map(|row| (0..row.tokens.len()).map(move |p| (row, p)));
        for ((row, p), r) in fed.zip(rows.iter_mut()) {
            let token = (row.tokens[p] as usize).min(s.vocab - 1);
            r.hidden.clear();
            r.hidden.extend_from_slice(&self.w.embed[token * d..(token + 1) * d]);
            r.normed.resize(d, 0.0);
            r.ctx.resize(inner, 0.0);
            // Position bias of this query against every key before it (shared by all layers).
            let t = row.cache.steps + p;
            r.bias.resize(heads * (t + 1), 0.0);
            for j in 0..=t {
                let bucket = causal_bucket(t - j, s.num_buckets, s.max_distance);
                for h in 0..heads {
                    r.bias[h * (t + 1) + j] = self.w.position_bias[bucket * heads + h];
                }
            }
        }

        for (i, layer) in self.w.layers.iter().enumerate() {
            self.self_attention(layer, i, batch, rows);
            self.cross_attention(layer, i, batch, rows);
            self.feed_forward(layer, rows);
        }

        for row in batch.iter_mut() {
            row.cache.steps += row.tokens.len();
        }
        for r in rows.iter_mut() {
            rms_norm(&r.hidden, &self.w.final_norm, s.eps, &mut r.normed);
            if s.tied {
                let scale = (d as f32).powf(-0.5);
                r.normed.iter_mut().for_each(|v| *v *= scale);
            }
            r.qv.set(&r.normed);
        }
        let xs: Vec<&QuantVector> = rows.iter().map(|r| &r.qv).collect();
        let mut ys: Vec<&mut [f32]> = batch.iter_mut().flat_map(|row| row.logits.chunks_exact_mut(s.vocab)).collect();
        assert_eq!(ys.len(), xs.len(), "vocab logits per fed token");
        gemv_batch(&self.w.lm_head, &xs, &mut ys);
    }

    /// Each row's normed hidden state, quantized into its `qv`.
    fn norm_rows(&self, weight: &[f32], rows: &mut [RowScratch]) {
        for r in rows.iter_mut() {
            rms_norm(&r.hidden, weight, self.w.shape.eps, &mut r.normed);
            r.qv.set(&r.normed);
        }
    }

    fn self_attention(&self, layer: &Layer, i: usize, batch: &mut [StepRow<'_>], rows: &mut [RowScratch]) {
        let s = &self.w.shape;
        let inner = s.inner();
        self.norm_rows(&layer.self_norm, rows);
        project(&layer.qkv, rows, into_proj);
        let mut first = 0;
        for row in batch.iter_mut() {
            let fed = &mut rows[first..first + row.tokens.len()];
            first += fed.len();
            let cache = &mut *row.cache;
            for r in fed.iter() {
                cache.keys[i].extend_from_slice(&r.proj[inner..2 * inner]);
                cache.values[i].extend_from_slice(&r.proj[2 * inner..]);
            }
            // Each position sees the keys up to its own (the cache's length counts those before).
            for (p, r) in fed.iter_mut().enumerate() {
                let len = cache.steps + p + 1;
                let at = Positions { keys: &cache.keys[i], values: &cache.values[i], len, bias: Some(&r.bias) };
                attend(&r.proj[..inner], &at, s, &mut r.scores, &mut r.ctx);
            }
        }
        self.project_back(&layer.self_out, rows);
    }

    fn cross_attention(&self, layer: &Layer, i: usize, batch: &[StepRow<'_>], rows: &mut [RowScratch]) {
        let s = &self.w.shape;
        self.norm_rows(&layer.cross_norm, rows);
        project(&layer.cross_q, rows, into_proj);
        let crosses = batch.iter().flat_map(|row| std::iter::repeat_n(row.cross, row.tokens.len()));
        for (cross, r) in crosses.zip(rows.iter_mut()) {
            let at = Positions { keys: &cross.keys[i], values: &cross.values[i], len: cross.len, bias: None };
            attend(&r.proj, &at, s, &mut r.scores, &mut r.ctx);
        }
        self.project_back(&layer.cross_out, rows);
    }

    fn feed_forward(&self, layer: &Layer, rows: &mut [RowScratch]) {
        let s = &self.w.shape;
        self.norm_rows(&layer.ff_norm, rows);
        project(&layer.ff_in, rows, into_ff);
        for r in rows.iter_mut() {
            let act = if s.gated_gelu {
                let (gate, linear) = r.ff.split_at_mut(s.d_ff);
                for (g, l) in gate.iter_mut().zip(linear.iter()) {
                    *g = gelu_new(*g) * l;
                }
                &r.ff[..s.d_ff]
            } else {
                r.ff.iter_mut().for_each(|v| *v = v.max(0.0));
                &r.ff[..]
            };
            r.qv.set(act);
        }
        add_projection(&layer.ff_out, rows);
    }

    /// `hidden += out_proj(ctx)` for every row.
    fn project_back(&self, out: &matrix::Matrix, rows: &mut [RowScratch]) {
        for r in rows.iter_mut() {
            r.qv.set(&r.ctx);
        }
        add_projection(out, rows);
    }
}

/// What one query attends over: `len` cached positions of keys and values (`[len][inner]`),
/// with an optional bias per head and position (`[heads][len]`).
struct Positions<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    len: usize,
    bias: Option<&'a [f32]>,
}

/// Multi-head attention of one query, T5-style: no 1/sqrt(d_kv) scaling (folded into the
/// weights).
///
/// Compiled twice: for the build's baseline (SSE2) and with AVX2 (scores by
/// [`kernels::dots_avx2`]), chosen at run time. Both perform the same float operations in the
/// same order (no contraction into FMA), only on wider registers, so the results are the same
/// to the bit, and the same as one score and one value row at a time (the test's reference).
fn attend(q: &[f32], at: &Positions<'_>, s: &DecoderShape, scores: &mut Vec<f32>, ctx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { attend_avx2(q, at, s, scores, ctx) };
    }
    attend_body(q, at, s, scores, ctx, kernels::dots)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(q: &[f32], at: &Positions<'_>, s: &DecoderShape, scores: &mut Vec<f32>, ctx: &mut [f32]) {
    // SAFETY: this function runs only where the CPU has AVX2.
    attend_body(q, at, s, scores, ctx, |a, bs| unsafe { kernels::dots_avx2(a, bs) })
}

/// Key positions scored together in [`attend_body`] (independent sums the CPU overlaps).
const SCORE_BLOCK: usize = 4;

/// `dots` scores `SCORE_BLOCK` key positions at once ([`kernels::dots`] or its AVX2 form).
#[inline(always)]
fn attend_body(
    q: &[f32],
    at: &Positions<'_>,
    s: &DecoderShape,
    scores: &mut Vec<f32>,
    ctx: &mut [f32],
    dots: impl Fn(&[f32], [&[f32]; SCORE_BLOCK]) -> [f32; SCORE_BLOCK],
) {
    let (dk, inner, len) = (s.d_kv, s.inner(), at.len);
    scores.resize(len, 0.0);
    for h in 0..s.num_heads {
        let qh = &q[h * dk..(h + 1) * dk];
        let key = |j: usize| &at.keys[j * inner + h * dk..j * inner + (h + 1) * dk];
        let bias = |j: usize| at.bias.map_or(0.0, |b| b[h * len + j]);
        let mut blocks = scores.chunks_exact_mut(SCORE_BLOCK);
        for (b, block) in blocks.by_ref().enumerate() {
            let first = b * SCORE_BLOCK;
            let sums = dots(qh, std::array::from_fn::<_, SCORE_BLOCK, _>(|n| key(first + n)));
            for (n, (score, sum)) in block.iter_mut().zip(sums).enumerate() {
                *score = sum + bias(first + n);
            }
        }
        let first = len - blocks.into_remainder().len();
        for (j, score) in scores.iter_mut().enumerate().skip(first) {
            *score = dot(qh, key(j)) + bias(j);
        }
        softmax(scores);
        weighted_sum(
            scores,
            |j| &at.values[j * inner + h * dk..j * inner + (h + 1) * dk],
            &mut ctx[h * dk..(h + 1) * dk],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{attend, attend_body, causal_bucket, kernels, DecoderShape, Positions};
    use crate::engine::native::kernels::{dot, softmax, testing::pseudo_random};

    /// Attention one score and one value row at a time, as it was written before the scores
    /// were blocked and the values summed in registers: the order of operations every path keeps.
    fn attend_reference(q: &[f32], at: &Positions<'_>, s: &DecoderShape) -> Vec<f32> {
        let (dk, inner, len) = (s.d_kv, s.inner(), at.len);
        let mut ctx = vec![0f32; inner];
        let mut scores = vec![0f32; len];
        for h in 0..s.num_heads {
            let qh = &q[h * dk..(h + 1) * dk];
            for (j, score) in scores.iter_mut().enumerate() {
                let k = &at.keys[j * inner + h * dk..j * inner + (h + 1) * dk];
                *score = dot(qh, k) + at.bias.map_or(0.0, |b| b[h * len + j]);
            }
            softmax(&mut scores);
            let out = &mut ctx[h * dk..(h + 1) * dk];
            out.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let v = &at.values[j * inner + h * dk..j * inner + (h + 1) * dk];
                out.iter_mut().zip(v).for_each(|(o, x)| *o += p * x);
            }
        }
        ctx
    }

    #[test]
    fn attention_on_wide_registers_is_the_baseline_to_the_bit() {
        // Heads of 16, 32 (the shipped model's) and 40 values: under, at and over the 32 summed
        // in registers; lengths around the block of 4 scored positions.
        for (num_heads, d_kv) in [(4, 16), (2, 32), (2, 40)] {
            let inner = num_heads * d_kv;
            let s = DecoderShape {
                d_model: inner,
                num_heads,
                d_kv,
                d_ff: 128,
                vocab: 32,
                layers: 1,
                num_buckets: 32,
                max_distance: 128,
                eps: 1e-6,
                gated_gelu: true,
                tied: false,
            };
            for len in [1usize, 3, 4, 5, 23, 64] {
                let (q, keys, values) = (
                    pseudo_random(inner, 1),
                    pseudo_random(len * inner, 2 + len as u64),
                    pseudo_random(len * inner, 90 + len as u64),
                );
                let bias = pseudo_random(num_heads * len, 7);
                for bias in [None, Some(bias.as_slice())] {
                    let (mut fast, mut base) = (vec![0f32; inner], vec![0f32; inner]);
                    let at = Positions { keys: &keys, values: &values, len, bias };
                    attend(&q, &at, &s, &mut Vec::new(), &mut fast);
                    attend_body(&q, &at, &s, &mut Vec::new(), &mut base, kernels::dots);
                    let what = format!("d_kv {d_kv}, len {len}, bias {}", bias.is_some());
                    assert_eq!(fast, base, "{what}");
                    assert_eq!(base, attend_reference(&q, &at, &s), "{what}");
                }
            }
        }
    }

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
