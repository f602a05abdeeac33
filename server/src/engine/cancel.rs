//! Deadline plus cancelled flag, checked by the decode loop once per step.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use super::EngineError;

/// Cheap to clone; every clone shares the flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    deadline: Option<Instant>,
    cancelled: Arc<AtomicBool>,
    /// A second, shared flag (the worker pool's stop flag) that cancels too.
    linked: Option<Arc<AtomicBool>>,
}

impl CancelToken {
    pub fn new(deadline: Option<Instant>) -> Self {
        Self { deadline, cancelled: Arc::default(), linked: None }
    }

    /// This token, also cancelled once `flag` is set.
    pub fn linked_to(mut self, flag: Arc<AtomicBool>) -> Self {
        self.linked = Some(flag);
        self
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed) || self.linked.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// `Err` once cancelled or past the deadline; `generated` goes into the error for logs.
    pub fn check(&self, generated: usize) -> Result<(), EngineError> {
        if self.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(EngineError::DeadlineExceeded { generated }),
            _ => Ok(()),
        }
    }

    /// A guard that cancels this token when dropped: tie it to a request future so that a
    /// client that goes away stops the decode loop.
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// Cancels its token on drop.
#[derive(Debug)]
pub struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn fresh_token_passes() {
        assert!(CancelToken::new(None).check(0).is_ok());
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(CancelToken::new(Some(later)).check(0).is_ok());
    }

    #[test]
    fn past_deadline_fails() {
        let t = CancelToken::new(Some(Instant::now()));
        assert!(matches!(t.check(7), Err(EngineError::DeadlineExceeded { generated: 7 })));
    }

    #[test]
    fn linked_flag_cancels() {
        let flag = Arc::new(AtomicBool::new(false));
        let t = CancelToken::new(None).linked_to(Arc::clone(&flag));
        assert!(t.check(0).is_ok());
        flag.store(true, Ordering::Relaxed);
        assert!(matches!(t.check(0), Err(EngineError::Cancelled)));
    }

    #[test]
    fn dropping_the_guard_cancels_every_clone() {
        let t = CancelToken::new(None);
        let seen_by_worker = t.clone();
        drop(t.cancel_on_drop());
        assert!(matches!(seen_by_worker.check(0), Err(EngineError::Cancelled)));
    }
}
