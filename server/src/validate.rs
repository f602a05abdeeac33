//! Request validation: the limits from the configuration, and the mapping of the wire's
//! generation options (zero = server default) to engine parameters.

use qreformulate::{pb, subqueries::collapse_whitespace};

use crate::config::Config;
use crate::engine::{GenerateRequest, GenerationParams, SearchKind};
use crate::error::ServiceError;

/// Largest beam width.
pub const MAX_BEAMS: u32 = 8;
/// Largest number of samples per request.
pub const MAX_SAMPLES: u32 = 8;
/// Temperature used when sampling and `temperature` is left at 0.
pub const DEFAULT_TEMPERATURE: f32 = 1.0;

/// The request limits of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_query_chars: usize,
    pub max_input_tokens: usize,
    pub default_max_new_tokens: usize,
    pub max_new_tokens_limit: usize,
}

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Self {
            max_query_chars: c.max_query_chars.get(),
            max_input_tokens: c.max_input_tokens.get(),
            default_max_new_tokens: c.default_max_new_tokens.get(),
            max_new_tokens_limit: c.max_new_tokens_limit.get(),
        }
    }
}

/// A checked request: normalised query and fully resolved options.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// Trimmed, whitespace runs collapsed (case kept: the model is case-sensitive).
    pub query: String,
    pub params: GenerationParams,
    pub truncate: bool,
}

impl ValidRequest {
    pub fn to_engine(&self, limits: &Limits) -> GenerateRequest {
        GenerateRequest {
            query: self.query.clone(),
            params: self.params,
            max_input_tokens: limits.max_input_tokens,
            truncate: self.truncate,
        }
    }
}

fn invalid(msg: String) -> ServiceError {
    ServiceError::InvalidArgument(msg)
}

/// Checks and normalises a query.
pub fn query(raw: &str, limits: &Limits) -> Result<String, ServiceError> {
    if raw.is_empty() {
        return Err(invalid("query is empty".into()));
    }
    // Bytes bound characters from above: count only when it can matter.
    if raw.len() > limits.max_query_chars {
        let chars = raw.chars().count();
        if chars > limits.max_query_chars {
            return Err(invalid(format!(
                "query is {chars} characters long; the limit is {} (--max-query-chars)",
                limits.max_query_chars
            )));
        }
    }
    let normalised = collapse_whitespace(raw);
    if normalised.is_empty() {
        return Err(invalid("query is blank (whitespace only)".into()));
    }
    if normalised.chars().all(|c| c == ' ' || invisible(c)) {
        return Err(invalid(
            "query is blank: it holds only invisible characters (zero-width, format or control characters)".into(),
        ));
    }
    Ok(normalised)
}

/// Characters that print nothing: controls, zero-width and other format characters (Unicode
/// category Cf), variation selectors and Hangul fillers.
fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
        )
}

/// Resolves generation options against the server defaults and limits.
pub fn options(opts: &pb::GenerationOptions, limits: &Limits) -> Result<(GenerationParams, bool), ServiceError> {
    let max_new_tokens = match opts.max_new_tokens as usize {
        0 => limits.default_max_new_tokens,
        n if n > limits.max_new_tokens_limit => {
            return Err(invalid(format!(
                "options.max_new_tokens is {n}; the limit is {} (--max-new-tokens-limit)",
                limits.max_new_tokens_limit
            )))
        }
        n => n,
    };
    if opts.num_beams > MAX_BEAMS {
        return Err(invalid(format!("options.num_beams is {}; the limit is {MAX_BEAMS}", opts.num_beams)));
    }
    let beams = opts.num_beams.max(1);
    let n_return = opts.num_return_sequences.max(1);
    let search = if opts.do_sample {
        if beams > 1 {
            return Err(invalid(format!(
                "options.do_sample cannot be combined with options.num_beams {} (beam search); use one or the other",
                opts.num_beams
            )));
        }
        let t = opts.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(invalid(format!("options.temperature is {t}; sampling needs a finite temperature > 0")));
        }
        if n_return > MAX_SAMPLES {
            return Err(invalid(format!(
                "options.num_return_sequences is {n_return}; the limit with sampling is {MAX_SAMPLES}"
            )));
        }
        SearchKind::Sample {
            num_return_sequences: n_return as usize,
            temperature: if t == 0.0 { DEFAULT_TEMPERATURE } else { t },
            seed: opts.seed,
        }
    } else if beams > 1 {
        if n_return > beams {
            return Err(invalid(format!(
                "options.num_return_sequences is {n_return}; beam search returns at most options.num_beams ({beams})"
            )));
        }
        SearchKind::Beam { num_beams: beams as usize, num_return_sequences: n_return as usize }
    } else {
        if n_return > 1 {
            return Err(invalid(format!(
                "options.num_return_sequences is {n_return}; greedy search returns 1 (set num_beams >= {n_return} or do_sample)"
            )));
        }
        SearchKind::Greedy
    };
    Ok((
        GenerationParams { max_new_tokens, search, ignore_eos: opts.ignore_eos, unguarded: opts.unguarded },
        opts.truncate,
    ))
}

/// Checks a whole request (missing options = all defaults).
pub fn request(
    raw_query: &str,
    opts: Option<&pb::GenerationOptions>,
    limits: &Limits,
) -> Result<ValidRequest, ServiceError> {
    let query = query(raw_query, limits)?;
    let (params, truncate) = options(opts.unwrap_or(&pb::GenerationOptions::default()), limits)?;
    Ok(ValidRequest { query, params, truncate })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LIMITS: Limits =
        Limits { max_query_chars: 20, max_input_tokens: 256, default_max_new_tokens: 64, max_new_tokens_limit: 256 };

    fn message(r: Result<impl std::fmt::Debug, ServiceError>) -> String {
        match r {
            Err(ServiceError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn query_is_normalised_case_kept() {
        assert_eq!(query("  Who  is\tTesla? ", &LIMITS).unwrap(), "Who is Tesla?");
    }

    #[test]
    fn empty_blank_and_long_queries_are_refused() {
        assert!(message(query("", &LIMITS)).contains("empty"));
        assert!(message(query(" \t\n", &LIMITS)).contains("blank"));
        let zero_width = query("\u{200B}\u{200D} \u{FEFF}\u{2060}", &LIMITS);
        assert!(message(zero_width).contains("invisible"));
        assert_eq!(query("a\u{200B}b", &LIMITS).unwrap(), "a\u{200B}b");
        let m = message(query(&"x".repeat(21), &LIMITS));
        assert!(m.contains("21") && m.contains("20"), "{m}");
        // 20 two-byte characters are within a 20-character limit.
        assert!(query(&"é".repeat(20), &LIMITS).is_ok());
    }

    #[test]
    fn zero_options_are_server_defaults() {
        let (p, truncate) = options(&pb::GenerationOptions::default(), &LIMITS).unwrap();
        assert_eq!(
            p,
            GenerationParams { max_new_tokens: 64, search: SearchKind::Greedy, ignore_eos: false, unguarded: false }
        );
        assert!(!truncate);
        let o = pb::GenerationOptions { unguarded: true, ..Default::default() };
        assert!(options(&o, &LIMITS).unwrap().0.unguarded);
    }

    #[test]
    fn max_new_tokens_limit() {
        let o = pb::GenerationOptions { max_new_tokens: 257, ..Default::default() };
        let m = message(options(&o, &LIMITS));
        assert!(m.contains("max_new_tokens") && m.contains("257") && m.contains("256"), "{m}");
        let o = pb::GenerationOptions { max_new_tokens: 256, ..Default::default() };
        assert_eq!(options(&o, &LIMITS).unwrap().0.max_new_tokens, 256);
    }

    #[test]
    fn beams_and_return_sequences() {
        let o = pb::GenerationOptions { num_beams: 9, ..Default::default() };
        assert!(message(options(&o, &LIMITS)).contains("num_beams is 9"));
        let o = pb::GenerationOptions { num_beams: 4, num_return_sequences: 5, ..Default::default() };
        assert!(message(options(&o, &LIMITS)).contains("num_return_sequences is 5"));
        let o = pb::GenerationOptions { num_beams: 4, num_return_sequences: 3, ..Default::default() };
        assert_eq!(options(&o, &LIMITS).unwrap().0.search, SearchKind::Beam { num_beams: 4, num_return_sequences: 3 });
        let o = pb::GenerationOptions { num_return_sequences: 2, ..Default::default() };
        assert!(message(options(&o, &LIMITS)).contains("greedy"));
    }

    #[test]
    fn sampling_rules() {
        let o = pb::GenerationOptions { do_sample: true, num_beams: 2, ..Default::default() };
        assert!(message(options(&o, &LIMITS)).contains("do_sample"));
        for t in [-1.0, f32::NAN, f32::INFINITY] {
            let o = pb::GenerationOptions { do_sample: true, temperature: t, ..Default::default() };
            assert!(message(options(&o, &LIMITS)).contains("temperature"));
        }
        let o = pb::GenerationOptions { do_sample: true, num_return_sequences: 9, ..Default::default() };
        assert!(message(options(&o, &LIMITS)).contains("num_return_sequences is 9"));
        let o = pb::GenerationOptions { do_sample: true, seed: 5, num_return_sequences: 3, ..Default::default() };
        assert_eq!(
            options(&o, &LIMITS).unwrap().0.search,
            SearchKind::Sample { num_return_sequences: 3, temperature: DEFAULT_TEMPERATURE, seed: 5 }
        );
    }

    // Random options, in and far out of range: the checks accept exactly the documented space
    // and never hand the engine anything outside it.
    fn wire_options() -> impl Strategy<Value = pb::GenerationOptions> {
        let small = || prop_oneof![0u32..=12, Just(u32::MAX), any::<u32>()];
        let temperature = prop_oneof![Just(0.0f32), -2.0f32..4.0, Just(f32::NAN), Just(f32::INFINITY), any::<f32>()];
        (
            prop_oneof![0u32..=300, any::<u32>()],
            small(),
            small(),
            any::<bool>(),
            temperature,
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(
                |(max_new_tokens, num_beams, num_return_sequences, do_sample, temperature, seed, truncate)| {
                    pb::GenerationOptions {
                        max_new_tokens,
                        num_beams,
                        num_return_sequences,
                        do_sample,
                        temperature,
                        seed,
                        truncate,
                        ..Default::default()
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn options_accept_exactly_the_documented_space(o in wire_options()) {
            let beams = o.num_beams.max(1);
            let n = o.num_return_sequences.max(1);
            let valid = o.max_new_tokens as usize <= LIMITS.max_new_tokens_limit
                && o.num_beams <= MAX_BEAMS
                && if o.do_sample {
                    beams == 1 && o.temperature.is_finite() && o.temperature >= 0.0 && n <= MAX_SAMPLES
                } else {
                    n <= beams
                };
            match options(&o, &LIMITS) {
                Ok((p, truncate)) => {
                    prop_assert!(valid, "accepted {o:?}");
                    prop_assert!((1..=LIMITS.max_new_tokens_limit).contains(&p.max_new_tokens));
                    prop_assert_eq!(truncate, o.truncate);
                    match p.search {
                        SearchKind::Greedy => prop_assert!(!o.do_sample && beams == 1 && n == 1),
                        SearchKind::Beam { num_beams, num_return_sequences } => {
                            prop_assert!((2..=MAX_BEAMS as usize).contains(&num_beams));
                            prop_assert!((1..=num_beams).contains(&num_return_sequences));
                        }
                        SearchKind::Sample { num_return_sequences, temperature, .. } => {
                            prop_assert!(temperature.is_finite() && temperature > 0.0);
                            prop_assert!((1..=MAX_SAMPLES as usize).contains(&num_return_sequences));
                        }
                    }
                }
                Err(ServiceError::InvalidArgument(m)) => {
                    prop_assert!(!valid, "refused {o:?}: {m}");
                    prop_assert!(m.starts_with("options."), "the message names the field: {m}");
                }
                Err(other) => prop_assert!(false, "not InvalidArgument: {other:?}"),
            }
        }

        #[test]
        fn accepted_queries_are_normalised_visible_and_stable(raw in "[ a\\t\\n\\u{200B}\\u{FEFF}\\u{0}é中|]{0,30}") {
            match query(&raw, &LIMITS) {
                Ok(q) => {
                    prop_assert!(!q.is_empty() && q.chars().count() <= LIMITS.max_query_chars);
                    prop_assert!(!q.starts_with(' ') && !q.ends_with(' ') && !q.contains("  "));
                    prop_assert!(q.chars().any(|c| c != ' ' && !invisible(c)), "{q:?}");
                    prop_assert_eq!(query(&q, &LIMITS).unwrap(), q.clone());
                }
                Err(ServiceError::InvalidArgument(m)) => prop_assert!(!m.is_empty()),
                Err(other) => prop_assert!(false, "not InvalidArgument: {other:?}"),
            }
        }
    }
}
