//! Latency statistics (microsecond resolution) with HdrHistogram, as the server's Benchmark and
//! Evaluate RPCs and the client's bench report them (one recorder, one summary shape).

use std::time::Duration;

use crate::pb;
use hdrhistogram::Histogram;

/// Highest latency the histogram resolves: one hour, in microseconds.
const MAX_MICROS: u64 = 3_600_000_000;

pub struct LatencyRecorder {
    hist: Histogram<u64>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRecorder {
    pub fn new() -> Self {
        let hist =
            Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("static histogram bounds are valid; this is a bug");
        Self { hist }
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_micros(micros);
    }

    /// Anything under one microsecond counts as one (the histogram's lowest value).
    pub fn record_micros(&mut self, micros: u64) {
        self.hist.saturating_record(micros.max(1));
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Summary in milliseconds; all zeros when nothing was recorded.
    pub fn summary(&self) -> pb::LatencyStats {
        let h = &self.hist;
        if h.is_empty() {
            return pb::LatencyStats::default();
        }
        let ms = |micros: u64| micros as f64 / 1e3;
        pb::LatencyStats {
            count: h.len(),
            mean_ms: h.mean() / 1e3,
            median_ms: ms(h.value_at_quantile(0.5)),
            std_ms: h.stdev() / 1e3,
            p90_ms: ms(h.value_at_quantile(0.90)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            min_ms: ms(h.min()),
        }
    }
}

/// Milliseconds as the wire reports them.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_one_to_hundred_ms() {
        let mut r = LatencyRecorder::new();
        for i in 1..=100u64 {
            r.record(Duration::from_millis(i));
        }
        let s = r.summary();
        assert_eq!(s.count, 100);
        assert!((s.mean_ms - 50.5).abs() < 0.1, "{}", s.mean_ms);
        assert!((s.median_ms - 50.0).abs() < 0.1, "{}", s.median_ms);
        assert!((s.p90_ms - 90.0).abs() < 0.1, "{}", s.p90_ms);
        assert!((s.p99_ms - 99.0).abs() < 0.1, "{}", s.p99_ms);
        assert!((s.min_ms - 1.0).abs() < 0.01 && (s.max_ms - 100.0).abs() < 0.1);
        assert!((s.std_ms - 28.87).abs() < 0.1, "{}", s.std_ms);
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(LatencyRecorder::new().summary(), pb::LatencyStats::default());
    }

    #[test]
    fn sub_microsecond_counts_as_one() {
        let mut r = LatencyRecorder::new();
        r.record(Duration::from_nanos(10));
        assert_eq!(r.count(), 1);
        assert!(r.summary().min_ms > 0.0);
    }
}
