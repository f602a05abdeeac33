//! The client's deadline, from the `grpc-timeout` request header.
//!
//! tonic's server also enforces that header, but answers CANCELLED when it fires; the
//! service therefore stops a little earlier and answers DEADLINE_EXCEEDED itself.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// The service gives up a tenth of the client's timeout early (10 to 20 ms, at most half of
/// it), so that its DEADLINE_EXCEEDED is on the wire before the client's own timer fires:
/// tonic clients enforce `grpc-timeout` locally too and report CANCELLED "Timeout expired"
/// when they win. The 10 ms floor is a scheduler time slice or two: with the engine workers
/// on every core, the thread that sends the answer can wait that long to run, and a 3 ms
/// margin (a tenth of 30 ms) lost that race in about one test run in six on 2 cores.
fn margin(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(20)).min(timeout / 2)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The instant the service must answer by, if the client set a timeout.
pub fn from_metadata(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    let timeout = metadata.get("grpc-timeout")?.to_str().ok().and_then(parse_grpc_timeout)?;
    Some(received + timeout.saturating_sub(margin(timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
    }

    #[test]
    fn rejects_malformed_values() {
        for v in ["", "S", "10", "10x", "-1S", "123456789S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(v), None, "{v}");
        }
    }

    #[test]
    fn deadline_from_metadata_is_slightly_early() {
        let now = Instant::now();
        let mut md = MetadataMap::new();
        assert_eq!(from_metadata(&md, now), None);
        md.insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(from_metadata(&md, now), Some(now + Duration::from_millis(90)));
        md.insert("grpc-timeout", "10S".parse().unwrap());
        assert_eq!(from_metadata(&md, now), Some(now + Duration::from_millis(9980)));
        md.insert("grpc-timeout", "30m".parse().unwrap());
        assert_eq!(from_metadata(&md, now), Some(now + Duration::from_millis(20)));
        md.insert("grpc-timeout", "1m".parse().unwrap());
        assert_eq!(from_metadata(&md, now), Some(now + Duration::from_micros(500)));
    }
}
