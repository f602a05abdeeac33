//! Reads an Evaluate stream ahead of the generations.
//!
//! h2 charges every small DATA frame that the application has not read yet against a
//! per-connection budget and answers GOAWAY ENHANCE_YOUR_CALM when it runs out. Clients such
//! as grpcio send one frame per message as fast as they can, so reading one message per
//! generation exhausted that budget after a few thousand rows. A task therefore drains the
//! stream into a queue of parsed examples, bounded by the example limit, while the handler
//! generates; the cheap per-example checks (count, label size) run as messages arrive.

use qreformulate::pb;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status, Streaming};

use crate::budget::Budgets;
use crate::error::ServiceError;

/// Why reading stopped early.
pub enum Failure {
    /// Over a limit, or the stream broke; answered as it is.
    Refused(ServiceError),
    /// The client sent a message that is not an EvaluateRequest.
    Undecodable(ServiceError),
}

impl Failure {
    pub fn into_error(self) -> ServiceError {
        match self {
            Failure::Refused(e) | Failure::Undecodable(e) => e,
        }
    }
}

/// The handler's end: examples in order, and the reader's failure as soon as it is known.
pub struct ReadAhead {
    examples: mpsc::Receiver<(usize, pb::EvaluateRequest)>,
    failure: oneshot::Receiver<Failure>,
}

impl ReadAhead {
    /// The next example (1-based index), `None` after the last. A failure comes first, even
    /// while examples read before it are still queued: a stream over the example limit is
    /// refused before the examples under it are all run.
    pub async fn next(&mut self) -> Option<Result<(usize, pb::EvaluateRequest), Failure>> {
        if let Ok(failure) = self.failure.try_recv() {
            return Some(Err(failure));
        }
        match self.examples.recv().await {
            Some(example) => Some(Ok(example)),
            // The reader reports a failure before it closes the queue.
            None => self.failure.try_recv().ok().map(Err),
        }
    }
}

/// Starts the reader. It ends when the stream does, on the first failure, or when the
/// `ReadAhead` is dropped (the call was answered or abandoned), even if the client keeps an
/// idle stream open.
pub fn spawn(mut stream: Streaming<pb::EvaluateRequest>, budgets: Budgets) -> ReadAhead {
    // Never full before the example limit is hit, so the reader never waits on the handler.
    let (tx, examples) = mpsc::channel(budgets.max_evaluate_examples.saturating_add(1));
    let (failed, failure) = oneshot::channel();
    tokio::spawn(async move {
        let mut index = 0usize;
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                () = tx.closed() => return,
            };
            let example = match next {
                Ok(None) => return,
                Ok(Some(example)) => example,
                Err(status) => {
                    let _ = failed.send(from_status(index + 1, status));
                    return;
                }
            };
            index += 1;
            if let Err(e) = check(index, &example, &budgets) {
                let _ = failed.send(Failure::Refused(e));
                return;
            }
            if tx.send((index, example)).await.is_err() {
                return;
            }
        }
    });
    ReadAhead { examples, failure }
}

fn check(index: usize, example: &pb::EvaluateRequest, budgets: &Budgets) -> Result<(), ServiceError> {
    if index > budgets.max_evaluate_examples {
        return Err(ServiceError::InvalidArgument(format!(
            "Evaluate accepts at most {} examples per call (--max-evaluate-examples); split the file",
            budgets.max_evaluate_examples
        )));
    }
    budgets
        .check_label(&example.expected_subqueries, &example.kind)
        .map_err(|e| ServiceError::InvalidArgument(format!("example {index}: {e}")))
}

/// tonic reports an undecodable message as INTERNAL; it is the client's error.
fn from_status(index: usize, status: Status) -> Failure {
    match status.code() {
        Code::Internal if status.message().starts_with("failed to decode") => {
            Failure::Undecodable(ServiceError::InvalidArgument(format!(
                "example {index}: the message is not a valid EvaluateRequest ({})",
                status.message()
            )))
        }
        Code::Cancelled => Failure::Refused(ServiceError::Cancelled("the client cancelled the stream".into())),
        _ => Failure::Refused(ServiceError::Stream(status)),
    }
}
