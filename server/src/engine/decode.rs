//! Search strategies over the decoder's logits: greedy, beam search, seeded sampling.
//!
//! The ONNX decode loop (in `onnx_t5`) runs the decoder for `rows()` sequences at once and
//! hands each step's last-position logits (`rows x vocab`) to a [`Search`]; the search picks
//! the next tokens and, for beam search, which row's KV cache each new row continues.
//! Nothing here knows about ONNX Runtime, so strategies are unit-tested on plain slices.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{constraint::WordConstraint, logits, SearchKind};

/// Seed used when the request leaves `seed` at 0.
pub const DEFAULT_SEED: u64 = 0x5eed_0f9e_0e2a_7e00;

/// Token ids the strategies need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Special {
    pub eos: u32,
    pub pad: u32,
}

/// One finished sequence: its tokens (end-of-sequence included when produced) and score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f64,
}

pub trait Search {
    /// Sequences decoded side by side (the decoder's batch size).
    fn rows(&self) -> usize;
    /// Consumes the newest position's logits (`rows x vocab`); true when decoding is done.
    fn advance(&mut self, logits: &[f32], vocab: usize) -> bool;
    /// The token each row feeds to the next step.
    fn next_tokens(&self) -> &[i64];
    /// For each row, the row whose KV cache it continues; `None` when each continues its own.
    fn parents(&self) -> Option<&[usize]>;
    /// Tokens generated so far by the leading row (for logs when stopped early).
    fn generated(&self) -> usize;
    /// Finished sequences, best first.
    fn finish(self: Box<Self>) -> Vec<Hypothesis>;
}

/// Builds the search for `kind`. The word constraint, when given, applies to greedy search.
pub fn new_search(
    kind: SearchKind,
    special: Special,
    ignore_eos: bool,
    length_penalty: f64,
    constraint: Option<WordConstraint>,
) -> Box<dyn Search> {
    match kind {
        SearchKind::Greedy => Box::new(Greedy::new(special, ignore_eos).with_constraint(constraint)),
        SearchKind::Beam { num_beams, num_return_sequences } => {
            Box::new(Beam::new(num_beams.max(1), num_return_sequences.max(1), special, ignore_eos, length_penalty))
        }
        SearchKind::Sample { num_return_sequences, temperature, seed } => {
            Box::new(Sampler::new(num_return_sequences.max(1), temperature, seed, special, ignore_eos))
        }
    }
}

fn banned(special: Special, ignore_eos: bool) -> Option<usize> {
    ignore_eos.then_some(special.eos as usize)
}

/// Argmax at every step (or the word constraint's choice), one row. Scores are not
/// computed: greedy returns one candidate.
pub struct Greedy {
    tokens: Vec<u32>,
    next: [i64; 1],
    special: Special,
    ignore_eos: bool,
    constraint: Option<WordConstraint>,
}

impl Greedy {
    pub fn new(special: Special, ignore_eos: bool) -> Self {
        Self { tokens: Vec::with_capacity(64), next: [0], special, ignore_eos, constraint: None }
    }

    pub fn with_constraint(mut self, constraint: Option<WordConstraint>) -> Self {
        self.constraint = constraint;
        self
    }
}

impl Search for Greedy {
    fn rows(&self) -> usize {
        1
    }

    fn advance(&mut self, logits: &[f32], vocab: usize) -> bool {
        let row = &logits[..vocab];
        let ban = banned(self.special, self.ignore_eos);
        let t = match &mut self.constraint {
            Some(c) => c.choose(row, ban),
            None => logits::argmax(row, ban),
        } as u32;
        self.tokens.push(t);
        self.next[0] = i64::from(t);
        !self.ignore_eos && t == self.special.eos
    }

    fn next_tokens(&self) -> &[i64] {
        &self.next
    }

    fn parents(&self) -> Option<&[usize]> {
        None
    }

    fn generated(&self) -> usize {
        self.tokens.len()
    }

    fn finish(self: Box<Self>) -> Vec<Hypothesis> {
        vec![Hypothesis { tokens: self.tokens, score: 0.0 }]
    }
}

/// `n` independent samples decoded as `n` rows, from one seeded RNG (equal seeds, equal
/// samples). Scores are the model's log-probabilities of the drawn tokens (before
/// temperature); candidates come back best score first.
pub struct Sampler {
    seqs: Vec<Vec<u32>>,
    scores: Vec<f64>,
    done: Vec<bool>,
    next: Vec<i64>,
    temperature: f32,
    rng: ChaCha8Rng,
    special: Special,
    ignore_eos: bool,
}

impl Sampler {
    pub fn new(n: usize, temperature: f32, seed: u64, special: Special, ignore_eos: bool) -> Self {
        let seed = if seed == 0 { DEFAULT_SEED } else { seed };
        Self {
            seqs: vec![Vec::with_capacity(64); n],
            scores: vec![0.0; n],
            done: vec![false; n],
            next: vec![i64::from(special.pad); n],
            temperature,
            rng: ChaCha8Rng::seed_from_u64(seed),
            special,
            ignore_eos,
        }
    }
}

impl Search for Sampler {
    fn rows(&self) -> usize {
        self.seqs.len()
    }

    fn advance(&mut self, logits: &[f32], vocab: usize) -> bool {
        let ban = banned(self.special, self.ignore_eos);
        for r in 0..self.seqs.len() {
            if self.done[r] {
                // A finished row keeps feeding padding; its output is ignored.
                self.next[r] = i64::from(self.special.pad);
                continue;
            }
            let row = &logits[r * vocab..(r + 1) * vocab];
            let t = logits::sample(row, self.temperature, ban, &mut self.rng);
            self.scores[r] += logits::log_prob(row, t, logits::logsumexp(row));
            self.seqs[r].push(t as u32);
            self.next[r] = t as i64;
            if !self.ignore_eos && t as u32 == self.special.eos {
                self.done[r] = true;
            }
        }
        self.done.iter().all(|&d| d)
    }

    fn next_tokens(&self) -> &[i64] {
        &self.next
    }

    fn parents(&self) -> Option<&[usize]> {
        None
    }

    fn generated(&self) -> usize {
        self.seqs.first().map_or(0, Vec::len)
    }

    fn finish(self: Box<Self>) -> Vec<Hypothesis> {
        let mut out: Vec<Hypothesis> =
            self.seqs.into_iter().zip(self.scores).map(|(tokens, score)| Hypothesis { tokens, score }).collect();
        // Stable: equal scores keep draw order, so the result is reproducible.
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out
    }
}

/// Beam search as Hugging Face `generate` does it (early_stopping=False): each step keeps
/// the `num_beams` best continuations of all beams; a beam that ends in EOS becomes a
/// finished hypothesis scored `sum_logprobs / len^length_penalty`; done when no running
/// beam can beat the worst kept hypothesis.
pub struct Beam {
    num_beams: usize,
    num_return: usize,
    seqs: Vec<Vec<u32>>,
    sums: Vec<f64>,
    hyps: Vec<Hypothesis>,
    next: Vec<i64>,
    parents: Vec<usize>,
    reordered: bool,
    first_step: bool,
    done: bool,
    special: Special,
    ignore_eos: bool,
    length_penalty: f64,
    // Scratch buffers kept across steps.
    row_top: Vec<(f32, u32)>,
    candidates: Vec<(f64, usize, u32)>,
}

impl Beam {
    pub fn new(num_beams: usize, num_return: usize, special: Special, ignore_eos: bool, length_penalty: f64) -> Self {
        Self {
            num_beams,
            num_return: num_return.min(num_beams),
            seqs: vec![Vec::with_capacity(64); num_beams],
            sums: vec![0.0; num_beams],
            hyps: Vec::with_capacity(num_beams + 1),
            next: vec![i64::from(special.pad); num_beams],
            parents: (0..num_beams).collect(),
            reordered: false,
            first_step: true,
            done: false,
            special,
            ignore_eos,
            length_penalty,
            row_top: Vec::with_capacity(2 * num_beams),
            candidates: Vec::with_capacity(2 * num_beams * num_beams),
        }
    }

    fn normalised(&self, sum_logprobs: f64, len: usize) -> f64 {
        sum_logprobs / (len.max(1) as f64).powf(self.length_penalty)
    }

    /// Keeps the `num_beams` best finished hypotheses.
    fn add_hypothesis(&mut self, tokens: Vec<u32>, sum_logprobs: f64) {
        let score = self.normalised(sum_logprobs, tokens.len());
        if self.hyps.len() == self.num_beams && score <= self.worst_hypothesis() {
            return;
        }
        self.hyps.push(Hypothesis { tokens, score });
        if self.hyps.len() > self.num_beams {
            let worst = self
                .hyps
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.score.total_cmp(&b.1.score))
                .map(|(i, _)| i)
                .expect("hypotheses are not empty; this is a bug");
            self.hyps.remove(worst);
        }
    }

    fn worst_hypothesis(&self) -> f64 {
        self.hyps.iter().map(|h| h.score).fold(f64::INFINITY, f64::min)
    }
}

impl Search for Beam {
    fn rows(&self) -> usize {
        self.num_beams
    }

    fn advance(&mut self, logits: &[f32], vocab: usize) -> bool {
        let k = self.num_beams;
        let ban = banned(self.special, self.ignore_eos);
        // All beams start from the same token: on the first step only row 0 is expanded,
        // otherwise the k beams would be k copies of one.
        let live_rows = if self.first_step { 1 } else { k };
        self.candidates.clear();
        for r in 0..live_rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let lse = logits::logsumexp(row);
            // log-softmax is monotone within a row, so the top logits are the top log-probs.
            logits::top_k(row, 2 * k, ban, &mut self.row_top);
            for &(logit, t) in &self.row_top {
                self.candidates.push((self.sums[r] + f64::from(logit) - lse, r, t));
            }
        }
        // Highest score first; ties by row then token so results are deterministic.
        self.candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));

        let mut new_seqs = Vec::with_capacity(k);
        let mut new_sums = Vec::with_capacity(k);
        let mut new_parents = Vec::with_capacity(k);
        let candidates = std::mem::take(&mut self.candidates);
        for (rank, &(score, r, t)) in candidates.iter().enumerate() {
            if !self.ignore_eos && t == self.special.eos {
                // Only an EOS among the k best may end a hypothesis (as in HF).
                if rank < k {
                    let mut tokens = self.seqs[r].clone();
                    tokens.push(t);
                    self.add_hypothesis(tokens, score);
                }
                continue;
            }
            let mut seq = self.seqs[r].clone();
            seq.push(t);
            new_seqs.push(seq);
            new_sums.push(score);
            new_parents.push(r);
            if new_seqs.len() == k {
                break;
            }
        }
        self.candidates = candidates;
        // 2k candidates per live row hold at most one EOS each, so k continuations exist.
        debug_assert_eq!(new_seqs.len(), k);
        for (i, seq) in new_seqs.iter().enumerate() {
            self.next[i] = i64::from(*seq.last().expect("a new beam has a token; this is a bug"));
        }
        self.reordered = new_parents.iter().enumerate().any(|(i, &p)| i != p);
        self.parents = new_parents;
        self.seqs = new_seqs;
        self.sums = new_sums;
        self.first_step = false;

        let cur_len = self.seqs[0].len();
        let best_running = self.sums.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        self.done = self.hyps.len() >= k && self.worst_hypothesis() >= self.normalised(best_running, cur_len);
        self.done
    }

    fn next_tokens(&self) -> &[i64] {
        &self.next
    }

    fn parents(&self) -> Option<&[usize]> {
        self.reordered.then_some(self.parents.as_slice())
    }

    fn generated(&self) -> usize {
        self.seqs.first().map_or(0, Vec::len)
    }

    fn finish(mut self: Box<Self>) -> Vec<Hypothesis> {
        if !self.done {
            // Out of steps: running beams compete with the finished ones.
            let seqs = std::mem::take(&mut self.seqs);
            let sums = std::mem::take(&mut self.sums);
            for (tokens, sum) in seqs.into_iter().zip(sums) {
                self.add_hypothesis(tokens, sum);
            }
        }
        let mut hyps = std::mem::take(&mut self.hyps);
        hyps.sort_by(|a, b| b.score.total_cmp(&a.score));
        hyps.truncate(self.num_return);
        hyps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECIAL: Special = Special { eos: 1, pad: 0 };
    const V: usize = 5;

    /// Drives a search with a fixed table: `table(step, row) -> logits row`.
    fn run(
        mut s: Box<dyn Search>,
        max_steps: usize,
        table: impl Fn(usize, usize, &[i64]) -> [f32; V],
    ) -> Vec<Hypothesis> {
        let mut prev: Vec<i64> = vec![0; s.rows()];
        for step in 0..max_steps {
            let mut logits = Vec::new();
            for r in 0..s.rows() {
                logits.extend_from_slice(&table(step, r, &prev));
            }
            if s.advance(&logits, V) {
                break;
            }
            prev = s.next_tokens().to_vec();
        }
        s.finish()
    }

    #[test]
    fn greedy_stops_at_eos() {
        let hyps = run(new_search(SearchKind::Greedy, SPECIAL, false, 1.0, None), 10, |step, _, _| {
            if step < 2 {
                [0.0, 0.0, 5.0, 0.0, 0.0]
            } else {
                [0.0, 9.0, 0.0, 0.0, 0.0]
            }
        });
        assert_eq!(hyps, vec![Hypothesis { tokens: vec![2, 2, 1], score: 0.0 }]);
    }

    #[test]
    fn greedy_ignore_eos_runs_to_the_limit() {
        let hyps =
            run(new_search(SearchKind::Greedy, SPECIAL, true, 1.0, None), 6, |_, _, _| [0.0, 9.0, 0.0, 3.0, 0.0]);
        assert_eq!(hyps[0].tokens, vec![3; 6]);
    }

    #[test]
    fn sampling_is_reproducible_per_seed_and_sorted() {
        let kind = SearchKind::Sample { num_return_sequences: 4, temperature: 1.0, seed: 42 };
        let table = |step: usize, _: usize, _: &[i64]| {
            if step < 3 {
                [0.0, -1.0, 1.0, 1.0, 1.0]
            } else {
                [0.0, 9.0, 0.0, 0.0, 0.0]
            }
        };
        let a = run(new_search(kind, SPECIAL, false, 1.0, None), 8, table);
        let b = run(new_search(kind, SPECIAL, false, 1.0, None), 8, table);
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        assert!(a.windows(2).all(|w| w[0].score >= w[1].score));
        let other = SearchKind::Sample { num_return_sequences: 4, temperature: 1.0, seed: 43 };
        let c = run(new_search(other, SPECIAL, false, 1.0, None), 8, table);
        assert_ne!(a, c, "a different seed should draw differently on this table");
    }

    #[test]
    fn beam_finds_sequence_greedy_misses() {
        // Step 0: token 2 (p~0.6) vs token 3 (p~0.4). After 2 the model is unsure (flat);
        // after 3 it is sure of EOS. Greedy takes 2; beam search prefers 3 then EOS.
        let table = |step: usize, r: usize, prev: &[i64]| -> [f32; V] {
            if step == 0 {
                return [-9.0, -9.0, 0.4, 0.0, -9.0];
            }
            match prev[r] {
                3 => [-9.0, 5.0, -9.0, -9.0, -9.0],
                _ => [0.0, 0.0, 0.0, 0.0, 0.0],
            }
        };
        let greedy = run(new_search(SearchKind::Greedy, SPECIAL, false, 1.0, None), 2, table);
        assert_eq!(greedy[0].tokens[0], 2);
        let kind = SearchKind::Beam { num_beams: 2, num_return_sequences: 2 };
        let hyps = run(new_search(kind, SPECIAL, false, 1.0, None), 4, table);
        assert_eq!(hyps.len(), 2);
        assert_eq!(hyps[0].tokens, vec![3, 1]);
        assert!(hyps[0].score >= hyps[1].score);
    }

    #[test]
    fn beam_reports_parents_when_beams_swap() {
        let mut beam = Beam::new(2, 2, SPECIAL, true, 1.0);
        // Step 0: row 0 expands into tokens 2 (best) and 3.
        let mut logits = vec![0.0f32; 2 * V];
        logits[..V].copy_from_slice(&[-9.0, -9.0, 2.0, 1.9, -9.0]);
        beam.advance(&logits, V);
        assert_eq!(beam.next_tokens(), &[2, 3]);
        assert_eq!(beam.parents(), Some(&[0usize, 0][..]));
        // Step 1: row 0 (after token 2) is unsure (flat), row 1 (after token 3) is sure of two
        // tokens: both new beams continue row 1.
        logits[..V].copy_from_slice(&[0.0, 0.0, 0.0, 0.0, 0.0]);
        logits[V..].copy_from_slice(&[-9.0, -9.0, 5.0, 5.0, -9.0]);
        beam.advance(&logits, V);
        assert_eq!(beam.parents(), Some(&[1usize, 1][..]));
        assert_eq!(beam.next_tokens(), &[2, 3]);
    }

    #[test]
    fn beam_ignore_eos_never_finishes_early() {
        let kind = SearchKind::Beam { num_beams: 3, num_return_sequences: 3 };
        let hyps = run(new_search(kind, SPECIAL, true, 1.0, None), 5, |_, _, _| [0.0, 9.0, 1.0, 2.0, 0.5]);
        assert_eq!(hyps.len(), 3);
        assert!(hyps.iter().all(|h| h.tokens.len() == 5 && !h.tokens.contains(&1)));
        assert!(hyps.windows(2).all(|w| w[0].score >= w[1].score));
    }
}
