//! Allocation-free operations on one row of logits (one vocabulary distribution).

use rand::Rng;

/// Index of the largest logit, skipping `banned`; the first one on ties. NaNs are never
/// chosen; 0 when nothing can be chosen.
///
/// Two passes: the maximum over 8 independent lanes (vectorised: no data-dependent branch,
/// NaN compares false so it is skipped), then the first index holding it. The banned index
/// is left out by splitting the row around it.
pub fn argmax(row: &[f32], banned: Option<usize>) -> usize {
    let (head, tail) = match banned {
        Some(b) if b < row.len() => (&row[..b], &row[b + 1..]),
        _ => (row, &row[..0]),
    };
    let max = max_value(head).max_ignoring_nan(max_value(tail));
    // NEG_INFINITY is also the identity: the first non-NaN logit equal to it is the answer.
    let first = |part: &[f32]| part.iter().position(|&x| x == max);
    match (first(head), first(tail)) {
        (Some(i), _) => i,
        (None, Some(i)) => head.len() + 1 + i,
        (None, None) => 0,
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

/// `log(sum(exp(row)))`, computed stably in f64 in one pass: the sum is kept relative to the
/// running maximum and rescaled when a larger value comes (rarely, after the first few).
/// NaNs are skipped; NEG_INFINITY when every value is.
pub fn logsumexp(row: &[f32]) -> f64 {
    let mut max = f64::NEG_INFINITY;
    let mut sum = 0.0f64;
    for &x in row {
        let x = f64::from(x);
        if x == f64::NEG_INFINITY {
            continue; // adds nothing (and -inf - -inf would be NaN)
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

/// The `k` largest logits of `row` as `(logit, index)`, largest first, skipping `banned`.
/// `out` is cleared and reused.
pub fn top_k(row: &[f32], k: usize, banned: Option<usize>, out: &mut Vec<(f32, u32)>) {
    top_k_among(row, 0..row.len(), k, banned, out);
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

    #[test]
    fn logsumexp_matches_direct_formula() {
        let row = [1.0f32, 2.0, 3.0];
        let direct = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((logsumexp(&row) - direct).abs() < 1e-9);
        let lp: f64 = (0..3).map(|i| log_prob(&row, i, logsumexp(&row)).exp()).sum();
        assert!((lp - 1.0).abs() < 1e-9);
        // One pass: a later maximum rescales the sum so far; large logits do not overflow.
        let rising = [-3.0f32, 0.5, 800.0, 799.0, f32::NAN];
        let direct = 800.0 + (1.0 + (-1f64).exp() + (-803f64).exp() + (-799.5f64).exp()).ln();
        assert!((logsumexp(&rising) - direct).abs() < 1e-9, "{}", logsumexp(&rising));
        assert_eq!(logsumexp(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), f64::NEG_INFINITY);
        assert_eq!(logsumexp(&[1.0, f32::INFINITY]), f64::INFINITY);
        assert_eq!(logsumexp(&[f32::NEG_INFINITY, 2.0]), 2.0);
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
