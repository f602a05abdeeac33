//! The seam between the decode loop and whatever runs decoder steps.
//!
//! A [`DecoderBackend`] (ONNX Runtime's two decoder sessions in onnx_decoder.rs, the native int8
//! decoder in native_steps.rs) opens [`DecoderSteps`] for one request's rows; [`run_search`] is
//! the one loop that drives every search strategy (greedy, beam, sampling, grounded or not) on
//! any of them. A new backend implements the two traits and gets every strategy, cancellation
//! and deadlines for free.

use ort::value::DynValue;

use super::{
    decode::{Hypothesis, Search},
    CancelToken, DecoderKind, EngineError,
};

/// Decoder state of one request: `rows` sequences decoding the same source.
pub trait DecoderSteps {
    /// Feeds one token per row (the start token first), or to a one-row request its next token
    /// and up to [`DecoderSteps::drafts`] drafts after it; returns the logits after each fed
    /// token, `vocab` per token, row-major. The slice lives until the next call.
    fn step(&mut self, tokens: &[i64]) -> Result<&[f32], EngineError>;
    /// Beam search reordered its rows: row `i` continues what row `parents[i]` had.
    fn reorder(&mut self, parents: &[usize]) -> Result<(), EngineError>;
    /// How many drafts a step may take after a one-row request's next token (0: one token per
    /// row only). Which requests draft is [`Decoding`]'s decision.
    fn drafts(&self) -> usize {
        0
    }
    /// Forgets the last `positions` fed tokens (rejected drafts).
    fn rewind(&mut self, positions: usize) -> Result<(), EngineError> {
        Err(EngineError::Model(format!("this decoder cannot rewind {positions} positions")))
    }
}

/// Who runs the decoder steps. One per worker, driven by that worker's thread only.
pub trait DecoderBackend: Send {
    fn kind(&self) -> DecoderKind;
    /// Opens `rows` rows on the encoder's output for one source, shaped (1, src_len, d_model).
    fn begin<'a>(
        &'a mut self,
        encoder_states: DynValue,
        rows: usize,
    ) -> Result<Box<dyn DecoderSteps + 'a>, EngineError>;
    /// Ends ONNX Runtime profiling of the backend's own sessions: the files written.
    fn end_profiling(&mut self) -> Result<Vec<String>, EngineError> {
        Ok(Vec::new())
    }
}

/// One request's search between decoder steps: what to feed next, and when it is done. The
/// loop below drives one of them; a batching worker ([`super::batch`]) drives several, one step
/// of each per pass over the weights.
///
/// A one-row search can also feed draft tokens ([`super::lookup`]) after its next token: the
/// step then returns logits for each position, and [`Decoding::advance`] consumes them in order
/// for as long as each draft is the token the search chose. Every consumed position's logits are
/// what a step of its own would have given, so the answer is the same with or without drafts.
pub struct Decoding {
    search: Box<dyn Search>,
    tokens: Vec<i64>,
    steps_left: usize,
    done: bool,
    /// What the last [`Decoding::feed`] returned: the rows' tokens, or one token and its drafts.
    fed: Vec<i64>,
    /// Set by [`Decoding::drafting_from`]: the query's tokens and the answer's so far.
    lookup: Option<Lookup>,
    /// Decoder steps taken (fewer than the tokens when drafts were kept).
    steps: usize,
}

/// A finished search: its sequences, best first, and the decoder steps they took.
#[derive(Debug)]
pub struct Decoded {
    pub hypotheses: Vec<Hypothesis>,
    pub steps: usize,
}

struct Lookup {
    source: Vec<u32>,
    generated: Vec<u32>,
}

/// What the caller does to its decoder state after [`Decoding::advance`].
#[derive(Debug, PartialEq, Eq)]
pub enum Advanced<'a> {
    /// Nothing: every fed position stays.
    Kept,
    /// Beam search reordered the rows: row `i` continues what row `parents[i]` had.
    Reorder(&'a [usize]),
    /// Drafts were rejected: the last `n` fed positions are dropped from the caches.
    Rewind(usize),
}

impl Decoding {
    pub fn new(search: Box<dyn Search>, start: u32, max_new_tokens: usize) -> Self {
        let tokens = vec![i64::from(start); search.rows()];
        Self {
            search,
            tokens,
            steps_left: max_new_tokens,
            done: max_new_tokens == 0,
            fed: Vec::new(),
            lookup: None,
            steps: 0,
        }
    }

    /// Lets a one-row search feed drafts looked up in `source` (the query's token ids).
    pub fn drafting_from(mut self, source: &[i64]) -> Self {
        if self.search.rows() == 1 {
            let source = source.iter().filter_map(|&t| u32::try_from(t).ok()).collect();
            self.lookup = Some(Lookup { source, generated: Vec::with_capacity(64) });
        }
        self
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// How many tokens the last [`Decoding::feed`] returned (the logits [`Decoding::advance`]
    /// takes are `vocab` per fed token).
    pub fn fed(&self) -> usize {
        self.fed.len()
    }

    /// The tokens to feed to the next step: one per row, then for a drafting search up to
    /// `drafts` guesses after it (never more than the steps left can use).
    pub fn feed(&mut self, drafts: usize) -> &[i64] {
        self.fed.clear();
        self.fed.extend_from_slice(&self.tokens);
        if let Some(l) = &self.lookup {
            super::lookup::draft(&l.source, &l.generated, drafts.min(self.steps_left.saturating_sub(1)), &mut self.fed);
        }
        &self.fed
    }

    pub fn done(&self) -> bool {
        self.done
    }

    /// Stops a request whose client left or whose deadline passed, before its next step.
    pub fn check(&self, cancel: &CancelToken) -> Result<(), EngineError> {
        cancel.check(self.search.generated())
    }

    /// Consumes one step's logits (`vocab` per fed position, row by row) and says what the
    /// caller does to its caches before the next step.
    pub fn advance(&mut self, logits: &[f32]) -> Result<Advanced<'_>, EngineError> {
        let fed = self.fed.len();
        let vocab = logits.len().checked_div(fed).unwrap_or(0);
        if vocab == 0 || logits.len() != fed * vocab || fed < self.rows() {
            return Err(EngineError::Model(format!("a step gave {} logits for {fed} fed positions", logits.len())));
        }
        self.steps += 1;
        let mut used = 0;
        for (p, position) in logits.chunks_exact(vocab * self.rows()).enumerate() {
            // A draft's logits count only when the draft is the token just chosen.
            if p > 0 && self.tokens[0] != self.fed[p] {
                break;
            }
            used += 1;
            self.steps_left -= 1;
            if self.search.advance(position, vocab) || self.steps_left == 0 {
                self.done = true;
                return Ok(Advanced::Kept);
            }
            self.tokens.copy_from_slice(self.search.next_tokens());
            if let Some(l) = &mut self.lookup {
                l.generated.extend(self.tokens.iter().map(|&t| t as u32));
            }
        }
        let unused = fed / self.rows() - used;
        Ok(match self.search.parents() {
            Some(parents) => Advanced::Reorder(parents),
            None if unused > 0 => Advanced::Rewind(unused),
            None => Advanced::Kept,
        })
    }

    pub fn finish(self) -> Decoded {
        Decoded { hypotheses: self.search.finish(), steps: self.steps }
    }
}

/// The decode loop shared by every backend and search strategy: at most `max_new_tokens`
/// tokens, checking `cancel` (client gone, deadline) before each step; drafts from `source`
/// (the query's token ids) where the backend takes them.
pub fn run_search(
    steps: &mut dyn DecoderSteps,
    search: Box<dyn Search>,
    source: &[i64],
    start: u32,
    max_new_tokens: usize,
    cancel: &CancelToken,
) -> Result<Decoded, EngineError> {
    let mut decoding = Decoding::new(search, start, max_new_tokens).drafting_from(source);
    let drafts = steps.drafts();
    while !decoding.done() {
        decoding.check(cancel)?;
        let logits = steps.step(decoding.feed(drafts))?;
        match decoding.advance(logits)? {
            Advanced::Kept => {}
            Advanced::Reorder(parents) => steps.reorder(parents)?,
            Advanced::Rewind(positions) => steps.rewind(positions)?,
        }
    }
    Ok(decoding.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::decode::{new_search, Special};
    use crate::engine::SearchKind;

    /// A decoder that always prefers token `(previous + 1) % vocab` and records what it saw;
    /// with `drafts`, it takes that many after a one-row request's token and records rewinds.
    struct Counting {
        vocab: usize,
        fed: Vec<Vec<i64>>,
        reorders: usize,
        logits: Vec<f32>,
        drafts: usize,
        rewound: Vec<usize>,
    }

    fn counting(vocab: usize, drafts: usize) -> Counting {
        Counting { vocab, fed: vec![], reorders: 0, logits: vec![], drafts, rewound: vec![] }
    }

    impl DecoderSteps for Counting {
        fn step(&mut self, tokens: &[i64]) -> Result<&[f32], EngineError> {
            self.fed.push(tokens.to_vec());
            self.logits = vec![0.0; tokens.len() * self.vocab];
            for (r, &t) in tokens.iter().enumerate() {
                self.logits[r * self.vocab + (t as usize + 1) % self.vocab] = 5.0;
            }
            Ok(&self.logits)
        }
        fn reorder(&mut self, _parents: &[usize]) -> Result<(), EngineError> {
            self.reorders += 1;
            Ok(())
        }
        fn drafts(&self) -> usize {
            self.drafts
        }
        fn rewind(&mut self, positions: usize) -> Result<(), EngineError> {
            self.rewound.push(positions);
            Ok(())
        }
    }

    fn greedy() -> Box<dyn Search> {
        new_search(SearchKind::Greedy, Special { eos: 1, pad: 0 }, false, 1.0, None)
    }

    fn beam(num_beams: usize) -> Box<dyn Search> {
        let kind = SearchKind::Beam { num_beams, num_return_sequences: 1 };
        new_search(kind, Special { eos: 1, pad: 0 }, false, 1.0, None)
    }

    #[test]
    fn feeds_the_start_token_then_each_choice_until_end_of_sequence() {
        // From 3 the decoder walks 4, 5, 6, 7, 0, 1 (= eos): six steps.
        let mut steps = counting(8, 0);
        let hyps = run_search(&mut steps, greedy(), &[], 3, 20, &CancelToken::default()).unwrap().hypotheses;
        assert_eq!(steps.fed, vec![vec![3], vec![4], vec![5], vec![6], vec![7], vec![0]]);
        assert_eq!(hyps[0].tokens, vec![4, 5, 6, 7, 0, 1]);
    }

    #[test]
    fn stops_at_max_new_tokens() {
        let mut steps = counting(64, 0);
        let hyps = run_search(&mut steps, greedy(), &[], 3, 5, &CancelToken::default()).unwrap().hypotheses;
        assert_eq!(steps.fed.len(), 5);
        assert_eq!(hyps[0].tokens, vec![4, 5, 6, 7, 8]);
    }

    #[test]
    fn a_step_with_a_wrong_logit_count_is_a_model_error() {
        struct Short(Vec<f32>);
        impl DecoderSteps for Short {
            fn step(&mut self, _tokens: &[i64]) -> Result<&[f32], EngineError> {
                Ok(&self.0)
            }
            fn reorder(&mut self, _parents: &[usize]) -> Result<(), EngineError> {
                Ok(())
            }
        }
        let err = run_search(&mut Short(vec![]), greedy(), &[], 0, 4, &CancelToken::default()).unwrap_err();
        assert!(matches!(err, EngineError::Model(_)), "{err:?}");
    }

    #[test]
    fn beam_search_reorders_the_rows() {
        let mut steps = counting(16, 2);
        run_search(&mut steps, beam(3), &[], 3, 4, &CancelToken::default()).unwrap();
        assert!(steps.fed.iter().all(|t| t.len() == 3));
        assert!(steps.reorders > 0);
    }

    #[test]
    fn drafts_that_match_save_steps_and_leave_the_answer_alone() {
        // The query's tokens 4 5 6 9: after 4, the lookup guesses 5 6 9; the decoder's 5 and 6
        // agree, 9 does not (it writes 7), so three of the four fed positions count and one is
        // rewound. The answer is the one without drafts.
        let source = [4, 5, 6, 9, 1];
        let plain =
            run_search(&mut counting(16, 0), greedy(), &source, 3, 10, &CancelToken::default()).unwrap().hypotheses;
        let mut steps = counting(16, 3);
        let decoded = run_search(&mut steps, greedy(), &source, 3, 10, &CancelToken::default()).unwrap();
        let drafted = decoded.hypotheses;
        assert_eq!(drafted[0].tokens, plain[0].tokens);
        assert_eq!(drafted[0].score, plain[0].score);
        assert_eq!(decoded.steps, steps.fed.len());
        assert_eq!(steps.fed[0], vec![3]);
        assert_eq!(steps.fed[1], vec![4, 5, 6, 9]);
        assert_eq!(steps.rewound[0], 1);
        assert!(steps.fed.len() < 10, "{} steps for 10 tokens", steps.fed.len());
    }

    #[test]
    fn drafts_never_run_past_max_new_tokens() {
        let source = [4, 5, 6, 7, 8, 9];
        let mut steps = counting(16, 3);
        let hyps = run_search(&mut steps, greedy(), &source, 3, 3, &CancelToken::default()).unwrap().hypotheses;
        assert_eq!(hyps[0].tokens, vec![4, 5, 6]);
        // The first step has nothing to look up; the second may feed only what is left (4 and 5).
        assert_eq!(steps.fed, vec![vec![3], vec![4, 5]]);
    }

    #[test]
    fn beam_search_takes_no_drafts() {
        let mut steps = counting(16, 3);
        run_search(&mut steps, beam(2), &[4, 5, 6, 7], 3, 4, &CancelToken::default()).unwrap();
        assert!(steps.fed.iter().all(|t| t.len() == 2), "{:?}", steps.fed);
        assert!(steps.rewound.is_empty());
    }
}
