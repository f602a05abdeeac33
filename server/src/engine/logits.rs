//! Allocation-free operations on one row of logits (one vocabulary distribution).

use rand::Rng;

use super::native::kernels;

/// Index of the largest logit, skipping `banned`; the first one on ties. NaNs are never
/// chosen; 0 when nothing can be chosen.
///
/// Two passes: the maximum over 8 independent lanes (vectorised: no data-dependent branch,
/// NaN compares false so it is skipped), then the first index holding it. The banned index
/// is left out by splitting the row around it.
pub fn argmax(row: &[f32], banned: Option<usize>) -> usize {
    let (head, tail) = split_around(row, banned);
    let max = max_value(head).max_ignoring_nan(max_value(tail));
    // NEG_INFINITY is also the identity: the first non-NaN logit equal to it is the answer.
    let first = |part: &[f32]| part.iter().position(|&x| x == max);
    match (first(head), first(tail)) {
        (Some(i), _) => i,
        (None, Some(i)) => head.len() + 1 + i,
        (None, None) => 0,
    }
}

/// `part` without index `banned`: the logits before it and after it (all of `part` and an
/// empty tail when `banned` is outside it).
fn split_around(part: &[f32], banned: Option<usize>) -> (&[f32], &[f32]) {
    match banned {
        Some(b) if b < part.len() => (&part[..b], &part[b + 1..]),
        _ => (part, &part[..0]),
    }
}

trait MaxIgnoringNan {
    fn max_ignoring_nan(self, other: f32) -> f32;
}

impl MaxIgnoringNan for f32 {
    fn max_ignoring_nan(self, other: f32) -> f32 {
        if other > self {
            other
        } else {
            self
        }
    }
}

/// Largest non-NaN value of `part`, NEG_INFINITY when there is none.
fn max_value(part: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = part.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = a.max_ignoring_nan(x);
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &x in acc.iter().chain(rest) {
        max = max.max_ignoring_nan(x);
    }
    max
}

/// `log(sum(exp(row)))` in two vectorised passes: the maximum, then the sum of `e^(x - max)`.
/// Each term is an f32 [`kernels::exp`] (relative error below 2e-7, so the result is within
/// about 2e-7 of the exact value) summed in f64 over [`SUM_LANES`] lanes; libm's f64 `exp`,
/// one element at a time, took 124 us per 32128-logit row (docs/performance.md, session 7).
/// NaNs are skipped; NEG_INFINITY when every value is NaN or NEG_INFINITY.
pub fn logsumexp(row: &[f32]) -> f64 {
    let max = max_value(row);
    if max.is_infinite() {
        return f64::from(max); // +inf dominates; -inf: nothing to sum
    }
    f64::from(max) + sum_exp(row, max).ln()
}

/// Independent f64 sums in [`sum_exp_body`]: the order of additions depends on nothing but
/// the row's length, whichever instruction set runs it.
const SUM_LANES: usize = 16;

/// `sum(e^(x - max))` over the non-NaN values of `row`, `max` its finite maximum.
fn sum_exp(row: &[f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { sum_exp_avx512(row, max) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { sum_exp_avx2(row, max) };
        }
    }
    sum_exp_body(row, max)
}

/// The same operations in the same order on wider registers (Rust never fuses a multiply
/// and an add), so the result is the baseline build's to the bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_exp_avx2(row: &[f32], max: f32) -> f64 {
    sum_exp_body(row, max)
}

/// As [`sum_exp_avx2`], on AVX-512 registers: 16 terms per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_exp_avx512(row: &[f32], max: f32) -> f64 {
    sum_exp_body(row, max)
}

#[inline(always)]
fn sum_exp_body(row: &[f32], max: f32) -> f64 {
    let mut lanes = [0f64; SUM_LANES];
    let chunks = row.chunks_exact(SUM_LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        add_terms(&mut lanes, chunk, max);
    }
    add_terms(&mut lanes, rest, max);
    lanes.iter().sum()
}

/// `lanes[i] += e^(xs[i] - max)` for up to [`SUM_LANES`] values. A function, not a closure:
/// a closure is compiled without the caller's target features and was left out of line.
#[inline(always)]
fn add_terms(lanes: &mut [f64; SUM_LANES], xs: &[f32], max: f32) {
    // Below this e^d is no longer a normal f32 (kernels::exp clamps there); such terms, NaN
    // and -inf add nothing next to the maximum's e^0 = 1.
    const SMALLEST: f32 = -87.3;
    // The f32 terms first, then the f64 sums: one loop of both vectorises at the f64 width.
    let mut terms = [0f32; SUM_LANES];
    for (t, &x) in terms.iter_mut().zip(xs) {
        let d = x - max;
        *t = if d >= SMALLEST { kernels::exp(d) } else { 0.0 };
    }
    for (sum, &t) in lanes.iter_mut().zip(&terms) {
        *sum += f64::from(t);
    }
}

/// Log-probability of `token` under the softmax of `row`.
pub fn log_prob(row: &[f32], token: usize, lse: f64) -> f64 {
    f64::from(row[token]) - lse
}

/// Draws one index from `softmax(row / temperature)`, never `banned`. Three passes over the
/// row, no buffer.
pub fn sample<R: Rng + ?Sized>(row: &[f32], temperature: f32, banned: Option<usize>, rng: &mut R) -> usize {
    sample_among(row, 0..row.len(), temperature, banned, rng).unwrap_or_else(|| argmax(row, banned))
}

/// Draws one of the `candidates` (indices into `row`) from the softmax of their logits over
/// `temperature`, never `banned`; `None` when no candidate has a finite logit.
pub fn sample_among<R: Rng + ?Sized>(
    row: &[f32],
    candidates: impl Iterator<Item = usize> + Clone,
    temperature: f32,
    banned: Option<usize>,
    rng: &mut R,
) -> Option<usize> {
    let inv_t = 1.0 / f64::from(temperature);
    let allowed = candidates.filter(|&i| Some(i) != banned && !row[i].is_nan());
    let max = allowed.clone().map(|i| f64::from(row[i])).fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    let weight = |i: usize| ((f64::from(row[i]) - max) * inv_t).exp();
    let total: f64 = allowed.clone().map(weight).sum();
    let mut threshold = rng.random::<f64>() * total;
    let mut last_allowed = None;
    for i in allowed {
        last_allowed = Some(i);
        threshold -= weight(i);
        if threshold < 0.0 {
            return Some(i);
        }
    }
    // Rounding left a sliver of mass: take the last candidate.
    last_allowed
}

/// Logits per block of [`top_k`] (more in rows of over `TOP_K_BLOCK * TOP_K_MAX_BLOCKS`).
const TOP_K_BLOCK: usize = 64;
/// Blocks of [`top_k`] at most: its block maxima live on the stack (2 x 4 KiB).
const TOP_K_MAX_BLOCKS: usize = 1024;

/// The `k` largest logits of `row` as `(logit, index)`, largest first, skipping `banned`.
/// `out` is cleared and reused.
///
/// Two passes, so that only a few blocks of the row go through the insertion loop: first each
/// block's maximum (vectorised, like [`argmax`]; `banned` left out), then the element loop of
/// [`top_k_among`] over the blocks whose maximum is at least the k-th largest of those maxima.
/// Those k maxima are k distinct logits, so every logit of the answer is at least that large
/// and lies in a block that is read: the list is the element loop's over the whole row, entry
/// for entry.
pub fn top_k(row: &[f32], k: usize, banned: Option<usize>, out: &mut Vec<(f32, u32)>) {
    out.clear();
    if k == 0 {
        return;
    }
    let size = TOP_K_BLOCK.max(row.len().div_ceil(TOP_K_MAX_BLOCKS));
    let mut maxima = [0f32; TOP_K_MAX_BLOCKS];
    let blocks = row.chunks(size).len();
    for (b, (block, max)) in row.chunks(size).zip(&mut maxima).enumerate() {
        let (head, tail) = split_around(block, banned.and_then(|i| i.checked_sub(b * size)));
        *max = max_value(head).max_ignoring_nan(max_value(tail));
    }
    let maxima = &maxima[..blocks];
    let threshold = kth_largest(maxima, k);
    for (b, &max) in maxima.iter().enumerate() {
        if max >= threshold {
            // A logit below the threshold cannot be in the answer (nor can a NaN).
            let start = b * size;
            let block = start..(start + size).min(row.len());
            insert_top(row, block.filter(|&i| row[i] >= threshold), k, banned, out);
        }
    }
}

/// The `k`-th largest of `values` (none NaN; at most [`TOP_K_MAX_BLOCKS`]), NEG_INFINITY when
/// there are fewer than `k`.
fn kth_largest(values: &[f32], k: usize) -> f32 {
    if values.len() < k {
        return f32::NEG_INFINITY;
    }
    let mut copy = [0f32; TOP_K_MAX_BLOCKS];
    let copy = &mut copy[..values.len()];
    copy.copy_from_slice(values);
    *copy.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
}

/// [`top_k`] over the `candidates` (indices into `row`) only; ties keep the earlier candidate.
pub fn top_k_among(
    row: &[f32],
    candidates: impl Iterator<Item = usize>,
    k: usize,
    banned: Option<usize>,
    out: &mut Vec<(f32, u32)>,
) {
    out.clear();
    if k == 0 {
        return;
    }
    insert_top(row, candidates, k, banned, out);
}

/// Adds the `candidates` to `out`, which holds the `k > 0` largest so far.
fn insert_top(
    row: &[f32],
    candidates: impl Iterator<Item = usize>,
    k: usize,
    banned: Option<usize>,
    out: &mut Vec<(f32, u32)>,
) {
    for i in candidates {
        let x = row[i];
        if Some(i) == banned || x.is_nan() {
            continue;
        }
        if out.len() == k && x <= out[k - 1].0 {
            continue;
        }
        // Insert keeping descending order; ties keep the lower index first.
        let pos = out.partition_point(|&(v, _)| v >= x);
        out.insert(pos, (x, i as u32));
        out.truncate(k);
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn argmax_picks_largest_and_respects_ban() {
        let row = [0.1, 3.0, 2.0, f32::NAN];
        assert_eq!(argmax(&row, None), 1);
        assert_eq!(argmax(&row, Some(1)), 2);
    }

    /// The original one-pass argmax, as the reference for the two-pass one.
    fn argmax_reference(row: &[f32], banned: Option<usize>) -> usize {
        let mut best = usize::MAX;
        let mut best_value = f32::NEG_INFINITY;
        for (i, &x) in row.iter().enumerate() {
            if Some(i) == banned || x.is_nan() {
                continue;
            }
            if best == usize::MAX || x > best_value {
                best = i;
                best_value = x;
            }
        }
        if best == usize::MAX {
            0
        } else {
            best
        }
    }

    #[test]
    fn argmax_matches_reference_on_edge_cases_and_random_rows() {
        let inf = f32::INFINITY;
        let nan = f32::NAN;
        let cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![nan],
            vec![nan, nan, nan],
            vec![-inf, -inf, nan],
            vec![nan, -inf],
            vec![1.0, 1.0, 1.0],
            vec![inf, 2.0, inf],
            (0..37).map(|i| (i % 5) as f32).collect(),
            (0..37).map(|i| if i == 20 { 9.0 } else { nan }).collect(),
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut rows = cases;
        for len in [1usize, 7, 8, 9, 16, 33, 1000, 32128] {
            // Few distinct values: many ties.
            rows.push((0..len).map(|_| (rng.random::<u32>() % 7) as f32).collect());
            rows.push((0..len).map(|_| rng.random::<f32>()).collect());
        }
        for row in &rows {
            let mut bans = vec![None, Some(0), Some(row.len()), Some(row.len() + 5)];
            if !row.is_empty() {
                bans.push(Some(row.len() - 1));
                bans.push(Some(argmax_reference(row, None)));
                bans.push(Some(row.len() / 2));
            }
            for ban in bans {
                assert_eq!(argmax(row, ban), argmax_reference(row, ban), "row {row:?} ban {ban:?}");
            }
        }
    }

    /// The earlier one-pass f64 log-sum-exp (libm's `exp` per element), as the reference.
    fn logsumexp_reference(row: &[f32]) -> f64 {
        let mut max = f64::NEG_INFINITY;
        let mut sum = 0.0f64;
        for &x in row {
            let x = f64::from(x);
            if x == f64::NEG_INFINITY {
                continue;
            }
            if x <= max {
                sum += (x - max).exp();
            } else if x > max {
                if x == f64::INFINITY {
                    return x;
                }
                sum = sum * (max - x).exp() + 1.0;
                max = x;
            }
        }
        max + sum.ln()
    }

    /// f32 terms: within 3e-7 of the f64 reference (the polynomial's 2e-7, plus rounding).
    const LSE_TOLERANCE: f64 = 3e-7;

    #[test]
    fn logsumexp_matches_direct_formula() {
        let row = [1.0f32, 2.0, 3.0];
        let direct = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((logsumexp(&row) - direct).abs() < LSE_TOLERANCE);
        let lp: f64 = (0..3).map(|i| log_prob(&row, i, logsumexp(&row)).exp()).sum();
        assert!((lp - 1.0).abs() < 1e-6);
        // Large logits do not overflow; far-below ones and NaN add nothing.
        let rising = [-3.0f32, 0.5, 800.0, 799.0, f32::NAN];
        let direct = 800.0 + (1.0 + (-1f64).exp() + (-803f64).exp() + (-799.5f64).exp()).ln();
        assert!((logsumexp(&rising) - direct).abs() < LSE_TOLERANCE, "{}", logsumexp(&rising));
        assert_eq!(logsumexp(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), f64::NEG_INFINITY);
        assert_eq!(logsumexp(&[f32::NAN, f32::NEG_INFINITY]), f64::NEG_INFINITY);
        assert_eq!(logsumexp(&[]), f64::NEG_INFINITY);
        assert_eq!(logsumexp(&[1.0, f32::INFINITY]), f64::INFINITY);
        assert_eq!(logsumexp(&[f32::NEG_INFINITY, 2.0]), 2.0);
    }

    #[test]
    fn logsumexp_matches_the_f64_reference_on_random_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        for len in [1usize, 15, 16, 17, 33, 2048, 32128] {
            for spread in [0.5f32, 8.0, 40.0, 200.0] {
                let mut row: Vec<f32> = (0..len).map(|_| (rng.random::<f32>() - 0.5) * spread).collect();
                // Masked entries, as grounding and bans leave them.
                for i in (0..len).step_by(7) {
                    row[i] = f32::NEG_INFINITY;
                }
                row[len / 2] = 3.0;
                let (got, want) = (logsumexp(&row), logsumexp_reference(&row));
                assert!((got - want).abs() < LSE_TOLERANCE, "len {len} spread {spread}: {got} vs {want}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sum_exp_on_wide_registers_is_the_baseline_to_the_bit() {
        type SumExp = unsafe fn(&[f32], f32) -> f64;
        let variants: [(&str, bool, SumExp); 2] = [
            ("avx2", std::is_x86_feature_detected!("avx2"), sum_exp_avx2),
            ("avx512f", std::is_x86_feature_detected!("avx512f"), sum_exp_avx512),
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let rows: Vec<Vec<f32>> = [1usize, 16, 31, 2048, 32128]
            .iter()
            .map(|&len| (0..len).map(|_| (rng.random::<f32>() - 0.5) * 60.0).collect())
            .collect();
        for (name, supported, wide) in variants {
            if !supported {
                eprintln!("skipped {name}: this CPU lacks it");
                continue;
            }
            for row in &rows {
                let max = max_value(row);
                // SAFETY: the CPU has the variant's features (checked above).
                let got = unsafe { wide(row, max) };
                assert_eq!(got.to_bits(), sum_exp_body(row, max).to_bits(), "{name}, len {}", row.len());
            }
        }
    }

    #[test]
    fn top_k_and_sampling_among_candidates_only() {
        let row = [9.0f32, 1.0, 8.0, 2.0, 3.0];
        let mut out = Vec::new();
        top_k_among(&row, [1usize, 3, 4].into_iter(), 2, Some(4), &mut out);
        assert_eq!(out, vec![(2.0, 3), (1.0, 1)]);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..50 {
            let i = sample_among(&row, [1usize, 3].into_iter(), 1.0, None, &mut rng).unwrap();
            assert!(i == 1 || i == 3);
        }
        assert_eq!(sample_among(&row, [4usize].into_iter(), 1.0, Some(4), &mut rng), None);
    }

    /// The block-skipping `top_k` against the element loop over every index, on rows with ties
    /// (a few distinct values), NaNs, infinities and a banned index, at lengths around the block
    /// and, now and then, past `TOP_K_BLOCK * TOP_K_MAX_BLOCKS` (larger blocks).
    #[test]
    fn top_k_matches_the_element_loop() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for case in 0..3000 {
            // Now and then a row long enough for blocks larger than TOP_K_BLOCK.
            let longest = if case % 100 == 0 { TOP_K_BLOCK * TOP_K_MAX_BLOCKS * 2 + 5 } else { 4 * TOP_K_BLOCK + 3 };
            let len = rng.random_range(0..longest);
            let distinct = if case % 3 == 0 { 4 } else { 1000 };
            let row: Vec<f32> = (0..len)
                .map(|_| match rng.random_range(0..50) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    _ => rng.random_range(0..distinct) as f32 * 0.25 - 10.0,
                })
                .collect();
            let k = rng.random_range(0..12);
            let banned = if len > 0 && rng.random_bool(0.5) { Some(rng.random_range(0..len + 2)) } else { None };
            top_k(&row, k, banned, &mut got);
            top_k_among(&row, 0..row.len(), k, banned, &mut want);
            assert_eq!(got, want, "row {row:?}, k {k}, banned {banned:?}");
        }
    }

    #[test]
    fn top_k_sorted_descending_with_ban() {
        let row = [0.5, 4.0, -1.0, 3.0, 4.0, 2.0];
        let mut out = Vec::new();
        top_k(&row, 3, None, &mut out);
        assert_eq!(out, vec![(4.0, 1), (4.0, 4), (3.0, 3)]);
        top_k(&row, 2, Some(1), &mut out);
        assert_eq!(out, vec![(4.0, 4), (3.0, 3)]);
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let row = [0.0f32, 2.0, -50.0];
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..200).map(|_| sample(&row, 1.0, None, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let picks = draw(7);
        // p(1) = e^2 / (1 + e^2) ~ 0.88; index 2 has ~e^-50 mass.
        let ones = picks.iter().filter(|&&i| i == 1).count();
        assert!(ones > 140 && ones < 200, "{ones}");
        assert!(!picks.contains(&2));
    }

    #[test]
    fn sampling_never_returns_banned_index() {
        let row = [0.0f32, 10.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!((0..50).all(|_| sample(&row, 1.0, Some(1), &mut rng) == 0));
    }

    #[test]
    fn low_temperature_approaches_argmax() {
        let row = [1.0f32, 1.5, 0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        assert!((0..50).all(|_| sample(&row, 0.01, None, &mut rng) == 1));
    }
}
