//! Work budgets of one Evaluate or Benchmark call: examples, runs, generated tokens, wall
//! time, label and response size (the flags of config.rs's "work budgets" block). A batch call
//! must not hold the server for hours nor answer more than a client can receive.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::engine::{GenerationParams, SearchKind};
use crate::error::ServiceError;

/// The configured limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub max_evaluate_examples: usize,
    pub max_benchmark_runs: usize,
    pub max_call_tokens: u64,
    pub max_call_time: Duration,
    pub max_label_chars: usize,
    pub max_evaluate_response_bytes: usize,
}

impl From<&Config> for Budgets {
    fn from(c: &Config) -> Self {
        Self {
            max_evaluate_examples: c.max_evaluate_examples.get(),
            max_benchmark_runs: c.max_benchmark_runs.get(),
            max_call_tokens: c.max_call_tokens.get(),
            max_call_time: Duration::from_secs(c.max_call_secs.get()),
            max_label_chars: c.max_label_chars.get(),
            max_evaluate_response_bytes: c.max_evaluate_response_bytes.get(),
        }
    }
}

/// Sequences decoded side by side: the token work of one step.
pub fn width(search: &SearchKind) -> u64 {
    let n = match *search {
        SearchKind::Greedy => 1,
        SearchKind::Beam { num_beams, .. } => num_beams,
        SearchKind::Sample { num_return_sequences, .. } => num_return_sequences,
    };
    n.max(1) as u64
}

impl Budgets {
    /// Refuses a Benchmark plan whose worst case (every generation runs to max_new_tokens) is
    /// over the token budget, before any work is done.
    pub fn check_benchmark(&self, generations: usize, params: &GenerationParams) -> Result<(), ServiceError> {
        let per_run = params.max_new_tokens as u64 * width(&params.search);
        let worst = (generations as u64).saturating_mul(per_run);
        if worst > self.max_call_tokens {
            return Err(ServiceError::InvalidArgument(format!(
                "Benchmark may generate up to {worst} tokens ({generations} generations x max_new_tokens {} x {} \
                 beams or samples); the limit is {} per call (--max-call-tokens); lower repeat, warmup, \
                 max_new_tokens or num_beams",
                params.max_new_tokens,
                width(&params.search),
                self.max_call_tokens
            )));
        }
        Ok(())
    }

    /// Refuses an Evaluate example whose labels (expected subqueries plus kind) are too long.
    pub fn check_label(&self, expected: &[String], kind: &str) -> Result<(), ServiceError> {
        // Bytes bound characters from above: count only when it can matter.
        let bytes: usize = expected.iter().map(String::len).sum::<usize>() + kind.len();
        if bytes <= self.max_label_chars {
            return Ok(());
        }
        let chars: usize = expected.iter().map(|s| s.chars().count()).sum::<usize>() + kind.chars().count();
        if chars > self.max_label_chars {
            return Err(ServiceError::InvalidArgument(format!(
                "the label is {chars} characters long (expected_subqueries plus kind); the limit is {} \
                 (--max-label-chars)",
                self.max_label_chars
            )));
        }
        Ok(())
    }
}

/// One call's running account of its wall time and generated tokens.
#[derive(Debug)]
pub struct CallBudget {
    rpc: &'static str,
    started: Instant,
    wall_end: Instant,
    client_deadline: Option<Instant>,
    max_time: Duration,
    max_tokens: u64,
    tokens: u64,
}

impl CallBudget {
    pub fn start(rpc: &'static str, budgets: &Budgets, client_deadline: Option<Instant>) -> Self {
        let started = Instant::now();
        Self {
            rpc,
            started,
            wall_end: started + budgets.max_call_time,
            client_deadline,
            max_time: budgets.max_call_time,
            max_tokens: budgets.max_call_tokens,
            tokens: 0,
        }
    }

    /// The earlier of the client's deadline and the end of the wall budget: what each
    /// generation of the call runs under.
    pub fn deadline(&self) -> Instant {
        self.client_deadline.map_or(self.wall_end, |d| d.min(self.wall_end))
    }

    /// The wall budget, not the client, sets the deadline.
    fn budget_binds(&self) -> bool {
        self.client_deadline.is_none_or(|d| self.wall_end < d)
    }

    fn out_of_time(&self, progress: &str) -> ServiceError {
        ServiceError::ResourceExhausted(format!(
            "{} ran out of its wall-time budget of {} s (--max-call-secs) {progress}; split the work into \
             smaller calls",
            self.rpc,
            self.max_time.as_secs()
        ))
    }

    /// Err once the wall budget is spent. `progress` says how far the call got.
    pub fn check_time(&self, progress: &str) -> Result<(), ServiceError> {
        if Instant::now() >= self.wall_end {
            return Err(self.out_of_time(progress));
        }
        Ok(())
    }

    /// A DEADLINE_EXCEEDED that the wall budget caused (not the client's deadline) is
    /// answered RESOURCE_EXHAUSTED, naming the budget.
    pub fn explain(&self, e: ServiceError, progress: &str) -> ServiceError {
        match e {
            ServiceError::DeadlineExceeded(_) if self.budget_binds() && Instant::now() >= self.wall_end => {
                self.out_of_time(progress)
            }
            other => other,
        }
    }

    /// Counts `steps` decode steps of a search of `search`'s width; Err once over the budget.
    pub fn spend_tokens(&mut self, steps: usize, search: &SearchKind, progress: &str) -> Result<(), ServiceError> {
        self.tokens = self.tokens.saturating_add((steps as u64).saturating_mul(width(search)));
        if self.tokens > self.max_tokens {
            return Err(ServiceError::ResourceExhausted(format!(
                "{} generated {} tokens {progress}, over its budget of {} per call (--max-call-tokens); split \
                 the work into smaller calls",
                self.rpc, self.tokens, self.max_tokens
            )));
        }
        Ok(())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets() -> Budgets {
        Budgets {
            max_evaluate_examples: 10,
            max_benchmark_runs: 10,
            max_call_tokens: 1000,
            max_call_time: Duration::from_secs(60),
            max_label_chars: 8,
            max_evaluate_response_bytes: 1 << 20,
        }
    }

    fn params(max_new_tokens: usize, search: SearchKind) -> GenerationParams {
        GenerationParams { max_new_tokens, search, ignore_eos: true, unguarded: false }
    }

    #[test]
    fn benchmark_worst_case_counts_every_beam() {
        let b = budgets();
        b.check_benchmark(10, &params(100, SearchKind::Greedy)).unwrap();
        let beams = SearchKind::Beam { num_beams: 8, num_return_sequences: 1 };
        let err = b.check_benchmark(10, &params(100, beams)).unwrap_err().to_string();
        assert!(err.contains("8000") && err.contains("--max-call-tokens") && err.contains("1000"), "{err}");
    }

    #[test]
    fn labels_are_counted_in_characters() {
        let b = budgets();
        b.check_label(&["ääää".into()], "éééé").unwrap(); // 8 characters, 16 bytes
        let err = b.check_label(&["abcde".into(), "fgh".into()], "k").unwrap_err().to_string();
        assert!(err.contains("9 characters") && err.contains("--max-label-chars"), "{err}");
    }

    #[test]
    fn tokens_over_budget_are_resource_exhausted() {
        let mut call = CallBudget::start("Evaluate", &budgets(), None);
        call.spend_tokens(500, &SearchKind::Greedy, "after 1 example").unwrap();
        let beams = SearchKind::Beam { num_beams: 2, num_return_sequences: 1 };
        let err = call.spend_tokens(300, &beams, "after 2 examples").unwrap_err();
        assert!(matches!(err, ServiceError::ResourceExhausted(ref m) if m.contains("1100")), "{err}");
    }

    #[test]
    fn deadline_is_the_earlier_and_only_the_budget_is_explained() {
        let b = Budgets { max_call_time: Duration::ZERO, ..budgets() };
        let later = Instant::now() + Duration::from_secs(5);
        let call = CallBudget::start("Benchmark", &b, Some(later));
        assert!(call.deadline() < later);
        let e = call.explain(ServiceError::DeadlineExceeded("x".into()), "after 3 runs");
        assert!(matches!(e, ServiceError::ResourceExhausted(ref m) if m.contains("--max-call-secs")), "{e}");
        // The client's own deadline stays DEADLINE_EXCEEDED.
        let call = CallBudget::start("Benchmark", &budgets(), Some(Instant::now()));
        let e = call.explain(ServiceError::DeadlineExceeded("x".into()), "");
        assert!(matches!(e, ServiceError::DeadlineExceeded(_)));
    }
}
