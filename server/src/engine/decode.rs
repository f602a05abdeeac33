//! Search strategies over the decoder's logits: greedy, beam search, seeded sampling.
//!
//! The decode loop (`steps::run_search`) runs the decoder for `rows()` sequences at once and
//! hands each step's last-position logits (`rows x vocab`) to a [`Search`]; the search picks
//! the next tokens and, for beam search, which row's KV cache each new row continues.
//! Nothing here knows about any decoder backend, so strategies are unit-tested on plain slices.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{
    grounding::{Grounding, WordState, GREEDY_TOP_K},
    logits, SearchKind,
};

/// Beam search under grounding first tries this many times its `2 * num_beams` candidates.
const BEAM_FAST_PATH: usize = 4;

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
    /// Mean of the tokens' log-probabilities under the model's unconstrained distribution at
    /// temperature 1 (what the grounding file's confidence threshold compares).
    pub mean_logprob: f64,
}

fn mean(sum: f64, tokens: usize) -> f64 {
    if tokens == 0 {
        0.0
    } else {
        sum / tokens as f64
    }
}

pub trait Search: Send {
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

/// Builds the search for `kind`; with `grounding`, every strategy writes only allowed tokens
/// (docs/grounding.md, "Token-level enforcement").
pub fn new_search(
    kind: SearchKind,
    special: Special,
    ignore_eos: bool,
    length_penalty: f64,
    grounding: Option<Grounding>,
) -> Box<dyn Search> {
    match kind {
        SearchKind::Greedy => Box::new(Greedy::new(special, ignore_eos, grounding)),
        SearchKind::Beam { num_beams, num_return_sequences } => Box::new(Beam::new(
            num_beams.max(1),
            num_return_sequences.max(1),
            special,
            ignore_eos,
            length_penalty,
            grounding,
        )),
        SearchKind::Sample { num_return_sequences, temperature, seed } => {
            Box::new(Sampler::new(num_return_sequences.max(1), temperature, seed, special, ignore_eos, grounding))
        }
    }
}

fn banned(special: Special, ignore_eos: bool) -> Option<usize> {
    ignore_eos.then_some(special.eos as usize)
}

/// The tokens allowed in `state` that index into `row` (a tokenizer may list more tokens than
/// the model has logits).
fn allowed_in_row<'a>(
    g: &Grounding,
    state: WordState,
    row: &[f32],
    allowed: &'a mut Vec<u32>,
) -> impl Iterator<Item = usize> + Clone + 'a {
    g.allowed(state, allowed);
    let len = row.len();
    allowed.iter().map(|&t| t as usize).filter(move |&t| t < len)
}

/// When no token is allowed: end-of-sequence; when that is banned (`ignore_eos` benchmarks,
/// which must write every token), the plain argmax, after which a new word starts.
fn nothing_allowed(row: &[f32], ban: Option<usize>, special: Special, state: WordState) -> (usize, WordState) {
    match ban {
        None => (special.eos as usize, state),
        Some(_) => (logits::argmax(row, ban), WordState::START),
    }
}

/// Argmax at every step, one row; under grounding the best allowed token (the top k first,
/// then every allowed one).
pub struct Greedy {
    tokens: Vec<u32>,
    next: [i64; 1],
    special: Special,
    ignore_eos: bool,
    grounding: Option<Grounding>,
    state: WordState,
    logprob_sum: f64,
    // Scratch buffers kept across steps.
    top: Vec<(f32, u32)>,
    allowed: Vec<u32>,
}

impl Greedy {
    pub fn new(special: Special, ignore_eos: bool, grounding: Option<Grounding>) -> Self {
        Self {
            tokens: Vec::with_capacity(64),
            next: [0],
            special,
            ignore_eos,
            grounding,
            state: WordState::START,
            logprob_sum: 0.0,
            top: Vec::with_capacity(GREEDY_TOP_K),
            allowed: Vec::new(),
        }
    }

    /// The best allowed token and the state after it.
    fn choose_grounded(&mut self, g: &Grounding, row: &[f32], ban: Option<usize>) -> (usize, WordState) {
        logits::top_k(row, GREEDY_TOP_K, ban, &mut self.top);
        for &(_, t) in &self.top {
            if let Some(next) = g.after(self.state, t) {
                return (t as usize, next);
            }
        }
        let candidates = allowed_in_row(g, self.state, row, &mut self.allowed);
        logits::top_k_among(row, candidates, 1, ban, &mut self.top);
        match self.top.first() {
            Some(&(_, t)) => (t as usize, g.after(self.state, t).expect("a listed token is allowed; this is a bug")),
            None => nothing_allowed(row, ban, self.special, self.state),
        }
    }
}

impl Search for Greedy {
    fn rows(&self) -> usize {
        1
    }

    fn advance(&mut self, logits: &[f32], vocab: usize) -> bool {
        let row = &logits[..vocab];
        let ban = banned(self.special, self.ignore_eos);
        let t = match self.grounding.take() {
            None => logits::argmax(row, ban),
            Some(g) => {
                let (t, state) = self.choose_grounded(&g, row, ban);
                self.state = state;
                self.grounding = Some(g);
                t
            }
        };
        self.logprob_sum += logits::log_prob(row, t, logits::logsumexp(row));
        let t = t as u32;
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
        let mean_logprob = mean(self.logprob_sum, self.tokens.len());
        vec![Hypothesis { tokens: self.tokens, score: self.logprob_sum, mean_logprob }]
    }
}

/// `n` independent samples decoded as `n` rows, from one seeded RNG (equal seeds, equal
/// samples). Scores are the model's log-probabilities of the drawn tokens (before
/// temperature); candidates come back best score first. Under grounding each row draws
/// among its allowed tokens only.
pub struct Sampler {
    seqs: Vec<Vec<u32>>,
    scores: Vec<f64>,
    done: Vec<bool>,
    next: Vec<i64>,
    temperature: f32,
    rng: ChaCha8Rng,
    special: Special,
    ignore_eos: bool,
    grounding: Option<Grounding>,
    states: Vec<WordState>,
    allowed: Vec<u32>,
}

impl Sampler {
    pub fn new(
        n: usize,
        temperature: f32,
        seed: u64,
        special: Special,
        ignore_eos: bool,
        grounding: Option<Grounding>,
    ) -> Self {
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
            grounding,
            states: vec![WordState::START; n],
            allowed: Vec::new(),
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
            let t = match &self.grounding {
                None => logits::sample(row, self.temperature, ban, &mut self.rng),
                Some(g) => {
                    let state = self.states[r];
                    let candidates = allowed_in_row(g, state, row, &mut self.allowed);
                    let (t, next) = match logits::sample_among(row, candidates, self.temperature, ban, &mut self.rng) {
                        Some(t) => (t, g.after(state, t as u32).expect("a listed token is allowed; this is a bug")),
                        None => nothing_allowed(row, ban, self.special, state),
                    };
                    self.states[r] = next;
                    t
                }
            };
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
        let mut out: Vec<Hypothesis> = self
            .seqs
            .into_iter()
            .zip(self.scores)
            .map(|(tokens, score)| Hypothesis { mean_logprob: mean(score, tokens.len()), tokens, score })
            .collect();
        // Stable: equal scores keep draw order, so the result is reproducible.
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out
    }
}

/// Beam search as Hugging Face `generate` does it (early_stopping=False): each step keeps
/// the `num_beams` best continuations of all beams; a beam that ends in EOS becomes a
/// finished hypothesis scored `sum_logprobs / len^length_penalty`; done when no running
/// beam can beat the worst kept hypothesis. Under grounding a disallowed token's log-prob is
/// -inf: candidates come from the allowed tokens only, and when fewer than `num_beams`
/// continuations exist the rest of the rows are dead (score -inf, never a hypothesis).
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
    grounding: Option<Grounding>,
    states: Vec<WordState>,
    // Scratch buffers kept across steps.
    row_top: Vec<(f32, u32)>,
    candidates: Vec<(f64, usize, u32)>,
    allowed: Vec<u32>,
}

impl Beam {
    pub fn new(
        num_beams: usize,
        num_return: usize,
        special: Special,
        ignore_eos: bool,
        length_penalty: f64,
        grounding: Option<Grounding>,
    ) -> Self {
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
            grounding,
            states: vec![WordState::START; num_beams],
            row_top: Vec::with_capacity(2 * num_beams),
            candidates: Vec::with_capacity(2 * num_beams * num_beams),
            allowed: Vec::new(),
        }
    }

    fn normalised(&self, sum_logprobs: f64, len: usize) -> f64 {
        sum_logprobs / (len.max(1) as f64).powf(self.length_penalty)
    }

    /// Keeps the `num_beams` best finished hypotheses (a dead row's -inf never counts).
    fn add_hypothesis(&mut self, tokens: Vec<u32>, sum_logprobs: f64) {
        if sum_logprobs == f64::NEG_INFINITY {
            return;
        }
        let score = self.normalised(sum_logprobs, tokens.len());
        if self.hyps.len() == self.num_beams && score <= self.worst_hypothesis() {
            return;
        }
        let mean_logprob = mean(sum_logprobs, tokens.len());
        self.hyps.push(Hypothesis { tokens, score, mean_logprob });
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

    /// Row `r`'s best `2 * num_beams` tokens (allowed ones only under grounding) into `row_top`.
    fn row_candidates(&mut self, r: usize, row: &[f32], ban: Option<usize>) {
        let k2 = 2 * self.num_beams;
        let Some(g) = &self.grounding else {
            // log-softmax is monotone within a row, so the top logits are the top log-probs.
            logits::top_k(row, k2, ban, &mut self.row_top);
            return;
        };
        // Fast path: when the best few tokens hold 2k allowed ones, those are exactly the 2k best
        // allowed tokens, and listing every allowed token (most of the cost) is not needed.
        let state = self.states[r];
        logits::top_k(row, BEAM_FAST_PATH * k2, ban, &mut self.row_top);
        self.row_top.retain(|&(_, t)| g.allows(state, t));
        if self.row_top.len() >= k2 {
            self.row_top.truncate(k2);
            return;
        }
        let candidates = allowed_in_row(g, state, row, &mut self.allowed);
        logits::top_k_among(row, candidates, k2, ban, &mut self.row_top);
        if self.row_top.is_empty() {
            let (t, _) = nothing_allowed(row, ban, self.special, self.states[r]);
            self.row_top.push((row[t], t as u32));
        }
    }

    /// The state of a new beam: its parent's after `token` (a new word after a token taken
    /// because nothing was allowed).
    fn state_after(&self, parent: usize, token: u32) -> WordState {
        self.grounding
            .as_ref()
            .map_or(WordState::START, |g| g.after(self.states[parent], token).unwrap_or(WordState::START))
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
            if self.sums[r] == f64::NEG_INFINITY {
                continue; // a dead row
            }
            let row = &logits[r * vocab..(r + 1) * vocab];
            let lse = logits::logsumexp(row);
            self.row_candidates(r, row, ban);
            for &(logit, t) in &self.row_top {
                self.candidates.push((self.sums[r] + f64::from(logit) - lse, r, t));
            }
        }
        // Highest score first; ties by row then token so results are deterministic.
        self.candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));

        let mut new_seqs = Vec::with_capacity(k);
        let mut new_sums = Vec::with_capacity(k);
        let mut new_parents = Vec::with_capacity(k);
        let mut new_states = Vec::with_capacity(k);
        let candidates = std::mem::take(&mut self.candidates);
        for (rank, &(score, r, t)) in candidates.iter().enumerate() {
            if score == f64::NEG_INFINITY {
                break; // sorted: only impossible continuations are left
            }
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
            new_states.push(self.state_after(r, t));
            if new_seqs.len() == k {
                break;
            }
        }
        self.candidates = candidates;
        // Without grounding 2k candidates per live row hold at most one EOS each, so k
        // continuations exist; under grounding fewer may: the rest are dead copies that keep
        // the decoder's batch full.
        debug_assert!(self.grounding.is_some() || new_seqs.len() == k);
        while new_seqs.len() < k {
            let (seq, parent, state) = match new_seqs.first() {
                Some(seq) => (seq.clone(), new_parents[0], new_states[0]),
                None => ([self.seqs[0].as_slice(), &[self.special.pad]].concat(), 0, WordState::START),
            };
            new_seqs.push(seq);
            new_sums.push(f64::NEG_INFINITY);
            new_parents.push(parent);
            new_states.push(state);
        }
        for (i, seq) in new_seqs.iter().enumerate() {
            self.next[i] = i64::from(*seq.last().expect("a new beam has a token; this is a bug"));
        }
        self.reordered = new_parents.iter().enumerate().any(|(i, &p)| i != p);
        self.parents = new_parents;
        self.seqs = new_seqs;
        self.sums = new_sums;
        self.states = new_states;
        self.first_step = false;

        let cur_len = self.seqs[0].len();
        let best_running = self.sums.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        self.done = best_running == f64::NEG_INFINITY
            || (self.hyps.len() >= k && self.worst_hypothesis() >= self.normalised(best_running, cur_len));
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
    fn greedy_stops_at_eos_with_its_mean_log_prob() {
        let hyps = run(new_search(SearchKind::Greedy, SPECIAL, false, 1.0, None), 10, |step, _, _| {
            if step < 2 {
                [0.0, 0.0, 5.0, 0.0, 0.0]
            } else {
                [0.0, 9.0, 0.0, 0.0, 0.0]
            }
        });
        assert_eq!(hyps.len(), 1);
        assert_eq!(hyps[0].tokens, vec![2, 2, 1]);
        // log-softmax of the chosen token, end-of-sequence included.
        let sum = 2.0 * (5.0 - (4.0 + 5f64.exp()).ln()) + (9.0 - (4.0 + 9f64.exp()).ln());
        assert!((hyps[0].score - sum).abs() < 1e-9, "{hyps:?}");
        assert!((hyps[0].mean_logprob - sum / 3.0).abs() < 1e-9, "{hyps:?}");
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
        assert!(a.iter().all(|h| (h.mean_logprob - h.score / h.tokens.len() as f64).abs() < 1e-12));
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
        // Length penalty 1: the score is the mean log-prob.
        assert!((hyps[0].mean_logprob - hyps[0].score).abs() < 1e-12, "{hyps:?}");
    }

    #[test]
    fn beam_reports_parents_when_beams_swap() {
        let mut beam = Beam::new(2, 2, SPECIAL, true, 1.0, None);
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

    mod grounded {
        use std::sync::Arc;

        use qreformulate::grounding::WordRules;

        use super::super::*;
        use crate::engine::grounding::{tests::toy_model as toy, GroundingModel};

        const QUERY: &str = "How long did Nikola Tesla live?";

        fn id(pieces: &[String], piece: &str) -> usize {
            pieces.iter().position(|p| p == piece).unwrap()
        }

        /// Logits that rank the tokens the query does not allow first: every disallowed token
        /// out-scores every allowed one, and eight of them fill greedy's top k.
        fn adversarial(pieces: &[String]) -> Vec<f32> {
            let mut row = vec![-10.0f32; pieces.len()];
            let disallowed = ["▁Edison", "<pad>", "<unk>", "la", "<0xC3>", "<0x86>", "▁Ed", "esla"];
            for (rank, p) in disallowed.iter().enumerate() {
                row[id(pieces, p)] = 10.0 - rank as f32;
            }
            row[id(pieces, "▁Tesla")] = 1.0;
            row[id(pieces, "▁T")] = 0.9;
            row[id(pieces, "▁Lifespan")] = 0.5;
            row[id(pieces, "▁|")] = 0.4;
            row[1] = -1.0; // end-of-sequence
            row
        }

        /// Runs `kind` on the same logits every step; returns the hypotheses.
        fn decode(kind: SearchKind, ignore_eos: bool, steps: usize) -> (Vec<Hypothesis>, Arc<GroundingModel>) {
            let (model, pieces) = toy();
            let row = adversarial(&pieces);
            let special = Special { eos: 1, pad: 0 };
            let mut search = new_search(kind, special, ignore_eos, 1.0, Some(model.for_query(QUERY)));
            for _ in 0..steps {
                let logits: Vec<f32> = (0..search.rows()).flat_map(|_| row.iter().copied()).collect();
                if search.advance(&logits, pieces.len()) {
                    break;
                }
            }
            (search.finish(), model)
        }

        /// Every token of `tokens` is allowed where it was written.
        fn assert_grounded(model: &Arc<GroundingModel>, tokens: &[u32]) {
            let g = model.for_query(QUERY);
            let mut state = WordState::START;
            for (i, &t) in tokens.iter().enumerate() {
                state = g.after(state, t).unwrap_or_else(|| panic!("token {t} at {i} of {tokens:?} is not allowed"));
            }
        }

        #[test]
        fn greedy_takes_the_best_allowed_token_past_the_top_k() {
            let (hyps, model) = decode(SearchKind::Greedy, false, 6);
            let (_, pieces) = toy();
            // Unconstrained greedy would write "▁Edison" six times.
            assert_eq!(hyps[0].tokens, vec![id(&pieces, "▁Tesla") as u32; 6]);
            assert_grounded(&model, &hyps[0].tokens);
            // The mean log-prob is under the unconstrained distribution: "▁Tesla" is unlikely.
            let row = adversarial(&pieces);
            let expected = f64::from(row[id(&pieces, "▁Tesla")]) - logits::logsumexp(&row);
            assert!((hyps[0].mean_logprob - expected).abs() < 1e-9, "{hyps:?}");
        }

        #[test]
        fn beam_search_chooses_among_allowed_tokens_only() {
            for ignore_eos in [false, true] {
                let kind = SearchKind::Beam { num_beams: 3, num_return_sequences: 3 };
                let (hyps, model) = decode(kind, ignore_eos, 5);
                assert!(!hyps.is_empty());
                for h in &hyps {
                    assert!(h.score.is_finite(), "{hyps:?}");
                    assert_grounded(&model, &h.tokens);
                }
            }
        }

        #[test]
        fn sampling_draws_among_allowed_tokens_only() {
            for seed in 1..20 {
                let kind = SearchKind::Sample { num_return_sequences: 3, temperature: 2.0, seed };
                let (hyps, model) = decode(kind, false, 8);
                assert_eq!(hyps.len(), 3);
                for h in &hyps {
                    assert_grounded(&model, &h.tokens);
                }
            }
        }

        #[test]
        fn a_word_no_token_can_finish_ends_the_sequence() {
            // "tes" may only go on as "tesla", but no piece writes "la".
            let rules = Arc::new(
                WordRules::parse(r#"{"version": 1, "generative_words": ["tesla"], "known_words": []}"#).unwrap(),
            );
            let pieces = ["<pad>", "</s>", "▁Tes", "x"].map(|p| Some(p.to_owned()));
            let model = Arc::new(GroundingModel::new(&pieces, &[0, 1], 1, rules));
            let special = Special { eos: 1, pad: 0 };
            let row = [-9.0f32, -9.0, 2.0, 1.0];
            for (kind, ignore_eos, expected) in [
                (SearchKind::Greedy, false, vec![2, 1]),
                (SearchKind::Sample { num_return_sequences: 1, temperature: 1.0, seed: 3 }, false, vec![2, 1]),
                (SearchKind::Beam { num_beams: 2, num_return_sequences: 1 }, false, vec![2, 1]),
                // ignore_eos must write every token: the plain argmax, then a new word.
                (SearchKind::Greedy, true, vec![2, 2, 2]),
            ] {
                let mut search = new_search(kind, special, ignore_eos, 1.0, Some(model.for_query("q")));
                for _ in 0..3 {
                    let logits: Vec<f32> = (0..search.rows()).flat_map(|_| row).collect();
                    if search.advance(&logits, row.len()) {
                        break;
                    }
                }
                assert_eq!(search.finish()[0].tokens, expected, "{kind:?} ignore_eos {ignore_eos}");
            }
        }
    }
}
