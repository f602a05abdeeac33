//! The output guards (docs/grounding.md, "Guards"): the decoded text becomes the served
//! subqueries, or the query itself with the reason it fell back. The detectors
//! [`is_degenerate`] and [`has_invented_word`] measure answers for the metrics.

use std::collections::{HashMap, HashSet};

use crate::grounding::{fold, is_grounded, QueryContext, WordRules};
use crate::subqueries::{collapse_whitespace, is_space, parts, split};

/// Why an answer is the query itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FallbackReason {
    /// The model wrote no part.
    Empty,
    /// Every part held a word that is not grounded (and one was dropped for it).
    Ungrounded,
    /// Every part was about something else than the query.
    OffTopic,
    /// Every part broke a guard.
    Degenerate,
    /// The model was less sure of its answer than the grounding file's threshold.
    LowConfidence,
}

impl FallbackReason {
    pub const ALL: [FallbackReason; 5] = [
        FallbackReason::Empty,
        FallbackReason::Ungrounded,
        FallbackReason::OffTopic,
        FallbackReason::Degenerate,
        FallbackReason::LowConfidence,
    ];

    /// Lowercase name for logs, metric labels and JSON (`off_topic`).
    pub fn name(self) -> &'static str {
        match self {
            FallbackReason::Empty => "empty",
            FallbackReason::Ungrounded => "ungrounded",
            FallbackReason::OffTopic => "off_topic",
            FallbackReason::Degenerate => "degenerate",
            FallbackReason::LowConfidence => "low_confidence",
        }
    }
}

/// What is served for one decoded text.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Never empty.
    pub subqueries: Vec<String>,
    /// Set when `subqueries` is the normalised query alone.
    pub fallback: Option<FallbackReason>,
}

impl Answer {
    fn fallback(query: &str, reason: FallbackReason) -> Self {
        Answer { subqueries: vec![collapse_whitespace(query)], fallback: Some(reason) }
    }
}

/// Steps 1-7 of the guards on the model's `text` for `query`. `rules` is the model's
/// grounding file (`None`: the defaults, nothing checked for grounding); `mean_logprob` the
/// generation's, for the confidence threshold.
pub fn sanitize(text: &str, query: &str, rules: Option<&WordRules>, mean_logprob: Option<f64>) -> Answer {
    sanitize_in(text, query, &rules.unwrap_or(WordRules::defaults()).context(query), mean_logprob)
}

/// [`sanitize`] with the query's context already built.
pub fn sanitize_in(text: &str, query: &str, ctx: &QueryContext<'_>, mean_logprob: Option<f64>) -> Answer {
    let rules = ctx.rules;
    let guards = &rules.guards;
    let mut kept: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    let (mut any_part, mut ungrounded, mut off_topic) = (false, false, false);
    for part in parts(text) {
        any_part = true;
        let words: Vec<&str> = part.split(' ').collect();
        if rules.grounded() && !words.iter().all(|w| is_grounded(w, ctx)) {
            ungrounded = true;
            continue;
        }
        let folded: Vec<Vec<u8>> = words.iter().map(|w| fold(w)).collect();
        let keep = cut_length(&folded, rules);
        if keep == 0 {
            continue;
        }
        let run = &folded[..keep];
        if !on_topic(run, ctx, kept.last().map(|(_, s)| s.as_slice())) {
            off_topic = true;
            continue;
        }
        if kept.iter().any(|(_, s)| contains_run(s, run)) {
            continue;
        }
        if kept.len() == guards.max_subqueries {
            break;
        }
        kept.push((words[..keep].join(" "), run.to_vec()));
    }
    if !any_part {
        return Answer::fallback(query, FallbackReason::Empty);
    }
    if kept.is_empty() {
        let reason = if ungrounded {
            FallbackReason::Ungrounded
        } else if off_topic {
            FallbackReason::OffTopic
        } else {
            FallbackReason::Degenerate
        };
        return Answer::fallback(query, reason);
    }
    if let (Some(threshold), Some(mean)) = (rules.min_mean_logprob, mean_logprob) {
        if mean < threshold {
            return Answer::fallback(query, FallbackReason::LowConfidence);
        }
    }
    Answer { subqueries: kept.into_iter().map(|(s, _)| s).collect(), fallback: None }
}

/// The plain split of an unguarded request (`GenerationOptions.unguarded`): no grounding, no
/// guards; the query itself (`EMPTY`) only when the text has no part.
pub fn unguarded(text: &str, query: &str) -> Answer {
    let empty = parts(text).next().is_none();
    Answer { subqueries: split(text, query), fallback: empty.then_some(FallbackReason::Empty) }
}

/// How many leading words of a part step 3 keeps. Word by word, the first of: an n-gram
/// ending here that repeats an earlier one (cut at its start: the whole repeat goes), a word
/// past the length limit or repeated too often (cut before it).
fn cut_length(folded: &[Vec<u8>], rules: &WordRules) -> usize {
    let g = &rules.guards;
    let n = g.no_repeat_ngram;
    let mut counts: HashMap<&[u8], usize> = HashMap::new();
    let mut ngrams: HashSet<&[Vec<u8>]> = HashSet::new();
    for (i, word) in folded.iter().enumerate() {
        if i + 1 >= n && !ngrams.insert(&folded[i + 1 - n..=i]) {
            return i + 1 - n;
        }
        let count = counts.entry(word).or_default();
        *count += 1;
        if i >= g.max_subquery_words || *count > g.max_word_repeats {
            return i;
        }
    }
    folded.len()
}

/// Bytes two words share at the start to count as related in step 4 (`textiles`, `Textile`).
const RELATED_PREFIX: usize = 5;

fn related(a: &[u8], b: &[u8]) -> bool {
    a == b || (a.len() >= RELATED_PREFIX && b.len() >= RELATED_PREFIX && a[..RELATED_PREFIX] == b[..RELATED_PREFIX])
}

/// Step 4: a folded non-stopword of the part is related to one of the query's words (and
/// their fuzzy matches) or of the previous kept part.
fn on_topic(part: &[Vec<u8>], ctx: &QueryContext<'_>, previous: Option<&[Vec<u8>]>) -> bool {
    part.iter().filter(|w| !ctx.rules.stopwords.contains(*w)).any(|w| {
        ctx.words.contains(w)
            || ctx.words.iter().any(|a| related(w, a))
            || previous.is_some_and(|p| p.iter().any(|a| related(w, a)))
    })
}

/// Step 5: `run` occurs as a contiguous run of words inside `kept` (equal included).
fn contains_run(kept: &[Vec<u8>], run: &[Vec<u8>]) -> bool {
    run.len() <= kept.len() && kept.windows(run.len()).any(|window| window == run)
}

fn folded_words(subquery: &str) -> Vec<Vec<u8>> {
    subquery.split(is_space).filter(|w| !w.is_empty()).map(fold).collect()
}

/// Served subqueries that break a guard of step 3, 4, 5 or 6 (`rules`: `None` for the
/// defaults).
pub fn is_degenerate<S: AsRef<str>>(subqueries: &[S], query: &str, rules: Option<&WordRules>) -> bool {
    is_degenerate_in(subqueries, &rules.unwrap_or(WordRules::defaults()).context(query))
}

/// [`is_degenerate`] with the query's context already built.
pub fn is_degenerate_in<S: AsRef<str>>(subqueries: &[S], ctx: &QueryContext<'_>) -> bool {
    if subqueries.len() > ctx.rules.guards.max_subqueries {
        return true;
    }
    let mut seen: Vec<Vec<Vec<u8>>> = Vec::with_capacity(subqueries.len());
    for subquery in subqueries {
        let folded = folded_words(subquery.as_ref());
        if cut_length(&folded, ctx.rules) < folded.len() {
            return true;
        }
        if folded.is_empty() || !on_topic(&folded, ctx, seen.last().map(Vec::as_slice)) {
            return true;
        }
        if seen.iter().any(|s| contains_run(s, &folded)) {
            return true;
        }
        seen.push(folded);
    }
    false
}

/// Served subqueries that hold a word that is not grounded under `rules` (a grounding file).
pub fn has_invented_word<S: AsRef<str>>(subqueries: &[S], query: &str, rules: &WordRules) -> bool {
    has_invented_word_in(subqueries, &rules.context(query))
}

/// [`has_invented_word`] with the query's context already built.
pub fn has_invented_word_in<S: AsRef<str>>(subqueries: &[S], ctx: &QueryContext<'_>) -> bool {
    subqueries.iter().flat_map(|s| s.as_ref().split(is_space)).filter(|w| !w.is_empty()).any(|w| !is_grounded(w, ctx))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::grounding::golden::{golden, golden_rules, strings};

    fn reason(name: &str) -> Option<FallbackReason> {
        match name {
            "NONE" => None,
            other => Some(
                *FallbackReason::ALL
                    .iter()
                    .find(|r| r.name().eq_ignore_ascii_case(other))
                    .unwrap_or_else(|| panic!("unknown fallback {other:?} in the golden file")),
            ),
        }
    }

    fn check_sanitize(section: &str, rules: Option<&WordRules>) {
        let g = golden();
        let cases = g[section].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let (query, text) = (case["query"].as_str().unwrap(), case["text"].as_str().unwrap());
            let answer = sanitize(text, query, rules, None);
            let expected = Answer {
                subqueries: strings(&case["subqueries"]),
                fallback: reason(case["fallback"].as_str().unwrap()),
            };
            assert_eq!(answer, expected, "{section}: {query:?} / {text:?}");
        }
    }

    #[test]
    fn golden_sanitize() {
        check_sanitize("sanitize", Some(&golden_rules()));
    }

    #[test]
    fn golden_sanitize_without_rules() {
        check_sanitize("sanitize_without_rules", None);
    }

    #[test]
    fn golden_degenerate() {
        let rules = golden_rules();
        for case in golden()["degenerate"].as_array().unwrap() {
            let query = case["query"].as_str().unwrap();
            let subqueries = strings(&case["subqueries"]);
            let expected = case["degenerate"].as_bool().unwrap();
            assert_eq!(is_degenerate(&subqueries, query, Some(&rules)), expected, "{query:?} / {subqueries:?}");
        }
    }

    #[test]
    fn low_confidence_replaces_an_answer_only_below_the_threshold() {
        let mut rules = golden_rules();
        rules.min_mean_logprob = Some(-1.0);
        let text = "Tesla Lifespan";
        assert_eq!(sanitize(text, "tesla", Some(&rules), Some(-0.5)).fallback, None);
        assert_eq!(sanitize(text, "tesla", Some(&rules), None).fallback, None, "no mean, no threshold");
        let low = sanitize(text, "tesla", Some(&rules), Some(-1.5));
        assert_eq!(low, Answer { subqueries: vec!["tesla".into()], fallback: Some(FallbackReason::LowConfidence) });
        // An answer that already falls back keeps its own reason.
        assert_eq!(sanitize("", "tesla", Some(&rules), Some(-9.0)).fallback, Some(FallbackReason::Empty));
    }

    #[test]
    fn a_part_cut_to_nothing_is_degenerate() {
        let mut rules = golden_rules();
        rules.guards.max_word_repeats = 0; // every first word repeats "too often"
        assert_eq!(sanitize("Tesla Lifespan", "tesla", Some(&rules), None).fallback, Some(FallbackReason::Degenerate));
    }

    #[test]
    fn unguarded_answers_are_the_plain_split() {
        let text = "Tesla Tesla Tesla Tesla | tesla tesla TESLA tesla | Edison";
        let answer = unguarded(text, "q");
        assert_eq!(answer, Answer { subqueries: split(text, "q"), fallback: None });
        assert_eq!(answer.subqueries, vec!["Tesla Tesla Tesla Tesla", "Edison"]);
        assert_eq!(unguarded(" | ", " who  is it? ").fallback, Some(FallbackReason::Empty));
    }

    #[test]
    fn invented_words_are_found_with_the_rules() {
        let rules = golden_rules();
        let q = "How long did Nikola Tesla live?";
        assert!(!has_invented_word(&["Nikola Tesla Lifespan"], q, &rules));
        assert!(has_invented_word(&["Nikola Tesla Lifespan", "Edison Birth"], q, &rules));
    }

    /// Text the way a model writes it: words from a small pool (grounded or not, repeated),
    /// spaces, separators.
    fn model_text() -> impl Strategy<Value = String> {
        let word = prop::sample::select(vec![
            "Tesla",
            "tesla",
            "Nikola",
            "Lifespan",
            "Birth",
            "Date",
            "Country",
            "Height",
            "Edison",
            "the",
            "of",
            "|",
            " | ",
            "in",
            "Albert",
            "Einstein",
            "Population",
            "x",
            "Ærø",
            "  ",
        ]);
        prop::collection::vec(word, 0..24).prop_map(|w| w.join(" "))
    }

    fn query() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "How long did Nikola Tesla live?",
            "tesla",
            "When were Tesla, Albert and Einstein born?",
            "What is the population of Ærø?",
            "who was albert einstien",
        ])
        .prop_map(str::to_owned)
    }

    proptest! {
        #[test]
        fn sanitized_answers_pass_their_own_detectors(text in model_text(), query in query(), with_rules: bool) {
            let rules = golden_rules();
            let rules = with_rules.then_some(&rules);
            let answer = sanitize(&text, &query, rules, None);
            prop_assert!(!answer.subqueries.is_empty());
            if answer.fallback.is_none() {
                prop_assert!(!is_degenerate(&answer.subqueries, &query, rules), "{:?}", answer);
                if let Some(rules) = rules {
                    prop_assert!(!has_invented_word(&answer.subqueries, &query, rules), "{:?}", answer);
                    let ctx = rules.context(&query);
                    for w in answer.subqueries.iter().flat_map(|s| s.split(' ')) {
                        prop_assert!(is_grounded(w, &ctx), "{:?} in {:?}", w, answer);
                    }
                }
            } else {
                prop_assert_eq!(answer.subqueries, vec![collapse_whitespace(&query)]);
            }
        }
    }
}
