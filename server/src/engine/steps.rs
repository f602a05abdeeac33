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
    /// Feeds one token per row (the start token first); returns the next token's logits,
    /// `rows x vocab`, row-major. The slice lives until the next call.
    fn step(&mut self, tokens: &[i64]) -> Result<&[f32], EngineError>;
    /// Beam search reordered its rows: row `i` continues what row `parents[i]` had.
    fn reorder(&mut self, parents: &[usize]) -> Result<(), EngineError>;
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
pub struct Decoding {
    search: Box<dyn Search>,
    tokens: Vec<i64>,
    steps_left: usize,
    done: bool,
}

impl Decoding {
    pub fn new(search: Box<dyn Search>, start: u32, max_new_tokens: usize) -> Self {
        let tokens = vec![i64::from(start); search.rows()];
        Self { search, tokens, steps_left: max_new_tokens, done: max_new_tokens == 0 }
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// The token each row feeds to the next step.
    pub fn tokens(&self) -> &[i64] {
        &self.tokens
    }

    pub fn done(&self) -> bool {
        self.done
    }

    /// Stops a request whose client left or whose deadline passed, before its next step.
    pub fn check(&self, cancel: &CancelToken) -> Result<(), EngineError> {
        cancel.check(self.search.generated())
    }

    /// Consumes one step's logits (`rows x vocab`). Returns the rows' parents when beam search
    /// reordered them: the caller reorders its caches before the next step.
    pub fn advance(&mut self, logits: &[f32]) -> Result<Option<&[usize]>, EngineError> {
        let rows = self.rows();
        let vocab = logits.len() / rows;
        if vocab == 0 || logits.len() != rows * vocab {
            return Err(EngineError::Model(format!("a step gave {} logits for {rows} rows", logits.len())));
        }
        self.steps_left -= 1;
        if self.search.advance(logits, vocab) || self.steps_left == 0 {
            self.done = true;
            return Ok(None);
        }
        self.tokens.copy_from_slice(self.search.next_tokens());
        Ok(self.search.parents())
    }

    pub fn finish(self) -> Vec<Hypothesis> {
        self.search.finish()
    }
}

/// The decode loop shared by every backend and search strategy: at most `max_new_tokens`
/// steps, checking `cancel` (client gone, deadline) before each.
pub fn run_search(
    steps: &mut dyn DecoderSteps,
    search: Box<dyn Search>,
    start: u32,
    max_new_tokens: usize,
    cancel: &CancelToken,
) -> Result<Vec<Hypothesis>, EngineError> {
    let mut decoding = Decoding::new(search, start, max_new_tokens);
    while !decoding.done() {
        decoding.check(cancel)?;
        let logits = steps.step(decoding.tokens())?;
        if let Some(parents) = decoding.advance(logits)? {
            steps.reorder(parents)?;
        }
    }
    Ok(decoding.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::decode::{new_search, Special};
    use crate::engine::SearchKind;

    /// A decoder that always prefers token `(previous + 1) % vocab` and records what it saw.
    struct Counting {
        vocab: usize,
        fed: Vec<Vec<i64>>,
        reorders: usize,
        logits: Vec<f32>,
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
    }

    fn greedy() -> Box<dyn Search> {
        new_search(SearchKind::Greedy, Special { eos: 1, pad: 0 }, false, 1.0, None)
    }

    #[test]
    fn feeds_the_start_token_then_each_choice_until_end_of_sequence() {
        // From 3 the decoder walks 4, 5, 6, 7, 0, 1 (= eos): six steps.
        let mut steps = Counting { vocab: 8, fed: vec![], reorders: 0, logits: vec![] };
        let hyps = run_search(&mut steps, greedy(), 3, 20, &CancelToken::default()).unwrap();
        assert_eq!(steps.fed, vec![vec![3], vec![4], vec![5], vec![6], vec![7], vec![0]]);
        assert_eq!(hyps[0].tokens, vec![4, 5, 6, 7, 0, 1]);
    }

    #[test]
    fn stops_at_max_new_tokens() {
        let mut steps = Counting { vocab: 64, fed: vec![], reorders: 0, logits: vec![] };
        let hyps = run_search(&mut steps, greedy(), 3, 5, &CancelToken::default()).unwrap();
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
        let err = run_search(&mut Short(vec![]), greedy(), 0, 4, &CancelToken::default()).unwrap_err();
        assert!(matches!(err, EngineError::Model(_)), "{err:?}");
    }

    #[test]
    fn beam_search_reorders_the_rows() {
        let mut steps = Counting { vocab: 16, fed: vec![], reorders: 0, logits: vec![] };
        let beam = new_search(
            SearchKind::Beam { num_beams: 3, num_return_sequences: 1 },
            Special { eos: 1, pad: 0 },
            false,
            1.0,
            None,
        );
        run_search(&mut steps, beam, 3, 4, &CancelToken::default()).unwrap();
        assert!(steps.fed.iter().all(|t| t.len() == 3));
        assert!(steps.reorders > 0);
    }
}
