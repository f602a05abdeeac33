//! API crate of qreformulate: the generated gRPC types and stubs, the descriptor set for
//! reflection, and the rules that server and client must share (subquery splitting, word
//! grounding and the output guards, the evaluation metrics, latency statistics, gRPC code
//! names).

pub mod grounding;
pub mod guards;
pub mod latency;
pub mod metrics;
pub mod subqueries;

/// Generated from `proto/qreformulate/v1/reformulate.proto` (messages, client and server).
pub mod pb {
    tonic::include_proto!("qreformulate.v1");
}

/// Encoded `FileDescriptorSet` of the qreformulate protos, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qreformulate_descriptor");

/// Fully qualified gRPC service name, as health checks and reflection name it.
pub const SERVICE_NAME: &str = "qreformulate.v1.Reformulator";

/// The canonical gRPC name of a status code (`UNAVAILABLE`, `INVALID_ARGUMENT`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<metrics::MetricRow> for pb::MetricRow {
    fn from(row: metrics::MetricRow) -> Self {
        pb::MetricRow {
            name: row.name,
            examples: u32::try_from(row.examples).unwrap_or(u32::MAX),
            exact_match: row.exact_match,
            rouge_l: row.rouge_l,
            count_accuracy: row.count_accuracy,
            levenshtein: row.levenshtein,
            invented_rate: row.invented_rate,
            degenerate_rate: row.degenerate_rate,
            fallback_rate: row.fallback_rate,
        }
    }
}

impl From<Option<guards::FallbackReason>> for pb::FallbackReason {
    fn from(reason: Option<guards::FallbackReason>) -> Self {
        use guards::FallbackReason as R;
        match reason {
            None => pb::FallbackReason::None,
            Some(R::Empty) => pb::FallbackReason::Empty,
            Some(R::Ungrounded) => pb::FallbackReason::Ungrounded,
            Some(R::OffTopic) => pb::FallbackReason::OffTopic,
            Some(R::Degenerate) => pb::FallbackReason::Degenerate,
            Some(R::LowConfidence) => pb::FallbackReason::LowConfidence,
        }
    }
}

impl From<pb::FallbackReason> for Option<guards::FallbackReason> {
    fn from(reason: pb::FallbackReason) -> Self {
        use guards::FallbackReason as R;
        match reason {
            pb::FallbackReason::None => None,
            pb::FallbackReason::Empty => Some(R::Empty),
            pb::FallbackReason::Ungrounded => Some(R::Ungrounded),
            pb::FallbackReason::OffTopic => Some(R::OffTopic),
            pb::FallbackReason::Degenerate => Some(R::Degenerate),
            pb::FallbackReason::LowConfidence => Some(R::LowConfidence),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_set_names_the_service() {
        // The reflection service is useless if the set lacks our service; look for its name.
        let needle = b"Reformulator";
        assert!(FILE_DESCRIPTOR_SET.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn metric_row_converts_field_by_field() {
        let row = metrics::MetricRow {
            name: "comparison".into(),
            examples: 3,
            exact_match: 0.5,
            rouge_l: 0.25,
            count_accuracy: 1.0,
            levenshtein: 0.75,
            invented_rate: Some(0.125),
            degenerate_rate: 0.0625,
            fallback_rate: 0.5,
        };
        let pb: pb::MetricRow = row.into();
        assert_eq!(pb.name, "comparison");
        assert_eq!(pb.examples, 3);
        assert_eq!(pb.exact_match, 0.5);
        assert_eq!(pb.rouge_l, 0.25);
        assert_eq!(pb.count_accuracy, 1.0);
        assert_eq!(pb.levenshtein, 0.75);
        assert_eq!((pb.invented_rate, pb.degenerate_rate, pb.fallback_rate), (Some(0.125), 0.0625, 0.5));
    }

    #[test]
    fn fallback_reasons_round_trip_through_the_wire_enum() {
        let mut seen = std::collections::HashSet::new();
        for reason in std::iter::once(None).chain(guards::FallbackReason::ALL.map(Some)) {
            let wire = pb::FallbackReason::from(reason);
            assert!(seen.insert(wire), "{wire:?} twice");
            assert_eq!(Option::<guards::FallbackReason>::from(wire), reason);
            // The wire name ends with the same words as the reason's name.
            let name = reason.map_or("none", guards::FallbackReason::name);
            assert!(wire.as_str_name().ends_with(&name.to_ascii_uppercase()), "{wire:?} vs {name}");
        }
    }
}
