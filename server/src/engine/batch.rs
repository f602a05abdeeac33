//! Continuous batching on the native decoder ([`super::Batching`]): the requests in flight on
//! one worker take their decoder steps together, so each weight matrix is read once per step
//! for all their rows instead of once per row. A request joins between two steps (after its
//! own tokenizer and encoder run) and leaves as soon as it ends; each keeps its own search,
//! grounding, cancel token and deadline. Every row's arithmetic is what it would be alone
//! ([`super::native::NativeDecoder::step_batch`]), so answers do not depend on the neighbours.

use std::sync::Arc;

use super::{
    native::{NativeDecoder, Scratch},
    native_steps::{step_requests, DraftBudget, NativeRequest},
    onnx_t5::{OnnxT5, Timed},
    steps::{Advanced, Decoding},
    Batching, CancelToken, EngineError, GenerateRequest, Generation,
};

/// The requests in flight on one worker, and the buffers their steps share.
pub struct Batch {
    native: Arc<NativeDecoder>,
    drafts: DraftBudget,
    requests: Vec<InFlight>,
    scratch: Scratch,
    logits: Vec<f32>,
}

struct InFlight {
    tag: u64,
    cancel: CancelToken,
    decoding: Decoding,
    rows: NativeRequest,
    timed: Timed,
    failed: Option<EngineError>,
}

impl InFlight {
    fn ended(&self) -> bool {
        self.failed.is_some() || self.decoding.done()
    }
}

impl Batch {
    pub fn new(native: Arc<NativeDecoder>, drafts: DraftBudget) -> Self {
        Self { native, drafts, requests: Vec::new(), scratch: Scratch::default(), logits: Vec::new() }
    }

    /// One step for every request still running; a request whose client left or whose
    /// deadline passed is stopped first, as the single-request loop does.
    fn step(&mut self) {
        for r in self.requests.iter_mut().filter(|r| !r.ended()) {
            if let Err(e) = r.decoding.check(&r.cancel) {
                r.failed = Some(e);
            }
        }
        let mut running: Vec<&mut InFlight> = self.requests.iter_mut().filter(|r| !r.ended()).collect();
        if running.is_empty() {
            return;
        }
        // Drafts fill the rows the step has to spare, first come first served.
        let mut taken: usize = running.iter().map(|r| r.decoding.rows()).sum();
        let mut feeds: Vec<(&mut NativeRequest, &[i64])> = Vec::with_capacity(running.len());
        for r in running.iter_mut() {
            let r = &mut **r;
            let rows = r.decoding.rows();
            let fed = r.decoding.feed(self.drafts.drafts(taken));
            taken += fed.len() - rows;
            feeds.push((&mut r.rows, fed));
        }
        if let Err(e) = step_requests(&self.native, &mut feeds, &mut self.scratch, &mut self.logits) {
            let message = match e {
                EngineError::Model(m) => m,
                other => other.to_string(),
            };
            for r in running {
                r.failed = Some(EngineError::Model(message.clone()));
            }
            return;
        }
        let vocab = self.native.shape().vocab;
        let mut offset = 0;
        for r in running {
            let n = r.decoding.fed() * vocab;
            match r.decoding.advance(&self.logits[offset..offset + n]) {
                Ok(Advanced::Kept) => {}
                Ok(Advanced::Reorder(parents)) => r.rows.reorder(parents),
                Ok(Advanced::Rewind(positions)) => r.rows.rewind(positions),
                Err(e) => r.failed = Some(e),
            }
            offset += n;
        }
    }

    /// Takes out the requests that ended.
    fn take_ended(&mut self) -> Vec<InFlight> {
        let (ended, running) = std::mem::take(&mut self.requests).into_iter().partition(InFlight::ended);
        self.requests = running;
        ended
    }
}

impl OnnxT5 {
    fn batch_mut(&mut self) -> &mut Batch {
        self.batch.as_mut().expect("only an engine with a batch offers batching")
    }
}

impl Batching for OnnxT5 {
    fn join(&mut self, tag: u64, req: &GenerateRequest, cancel: CancelToken) -> Result<(), EngineError> {
        self.in_pool(|engine| {
            let prepared = engine.prepare(req, &cancel)?;
            let search = engine.search_for(req);
            let start = engine.start_token();
            let batch = engine.batch_mut();
            let rows = NativeRequest::begin(&batch.native, &prepared.states, search.rows())?;
            let decoding = Decoding::new(search, start, req.params.max_new_tokens).drafting_from(&prepared.ids);
            let timed = prepared.timed;
            batch.requests.push(InFlight { tag, cancel, decoding, rows, timed, failed: None });
            Ok(())
        })
    }

    fn step(&mut self) -> Vec<(u64, Result<Generation, EngineError>)> {
        self.in_pool(|engine| {
            engine.batch_mut().step();
            let ended = engine.batch_mut().take_ended();
            ended
                .into_iter()
                .map(|r| {
                    let answer = match r.failed {
                        Some(e) => Err(e),
                        None => engine.answer(r.timed, &r.decoding.finish()),
                    };
                    (r.tag, answer)
                })
                .collect()
        })
    }

    fn in_flight(&self) -> usize {
        self.batch.as_ref().map_or(0, |b| b.requests.len())
    }

    fn clear(&mut self) -> Vec<u64> {
        self.batch.as_mut().map_or_else(Vec::new, |b| b.requests.drain(..).map(|r| r.tag).collect())
    }
}
