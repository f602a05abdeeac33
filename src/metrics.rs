//! Evaluation metrics, defined exactly as the Python pipeline (`train/qr_train/metrics.py`)
//! defines them, so a table from `qclient eval` and one from the training run compare.
//!
//! Per example:
//! - `exact_match`: normalised predicted list == normalised expected list (order matters);
//!   normalised = lowercased, whitespace runs collapsed, trimmed.
//! - `rouge_l`: ROUGE-L F1 (longest common subsequence) over the word tokens of the subqueries
//!   joined by a space; word tokens = maximal runs of Unicode alphanumerics or `_` after
//!   lowercasing; 0 when either side has no tokens.
//! - `count_accuracy`: both lists have the same length.
//! - `levenshtein`: 0 when the counts differ, else the mean over positions of
//!   `1 - lev(p, e) / max(len(p), len(e))` on normalised strings, in characters (both empty: 1).
//!
//!
//! Per served answer (docs/grounding.md, "Metrics"): `invented` (a word that is not grounded;
//! only with a grounding file), `degenerate` (breaks a guard), `fallback` (the query itself).
//! A fallback counts as neither invented nor degenerate: what it serves is the query.
//!
//! A table row is the mean over its examples; per-kind rows group by the kind label (an empty
//! kind counts as `"unknown"`).

use std::collections::BTreeMap;

use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

use crate::grounding::{QueryContext, WordRules};
use crate::guards::{has_invented_word_in, is_degenerate_in, Answer};
use crate::subqueries::collapse_whitespace;

/// Name of the row over all examples.
pub const OVERALL: &str = "overall";
/// Kind label used for examples without one.
pub const UNKNOWN_KIND: &str = "unknown";

/// Lowercase, collapse whitespace runs to one space, trim.
pub fn normalise(text: &str) -> String {
    collapse_whitespace(&text.to_lowercase())
}

/// Python's `\w` on `str`: letters and numbers (general categories L* and N*) or `_`.
pub fn is_word_char(c: char) -> bool {
    c == '_' || matches!(c.general_category_group(), GeneralCategoryGroup::Letter | GeneralCategoryGroup::Number)
}

/// Word tokens of the subqueries joined by a space, after lowercasing.
pub fn word_tokens<S: AsRef<str>>(subqueries: &[S]) -> Vec<String> {
    let joined = subqueries.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" ").to_lowercase();
    joined.split(|c: char| !is_word_char(c)).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

/// Length of the longest common subsequence (two-row dynamic programme).
fn lcs_length<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    if a.is_empty() || b.is_empty() {
        return 0;
    }
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F1 over word tokens; 0 when either side is empty or nothing is shared.
pub fn rouge_l<S: AsRef<str>>(predicted: &[S], expected: &[S]) -> f64 {
    let p = word_tokens(predicted);
    let e = word_tokens(expected);
    let lcs = lcs_length(&p, &e);
    if lcs == 0 {
        return 0.0;
    }
    let precision = lcs as f64 / p.len() as f64;
    let recall = lcs as f64 / e.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Character-level edit distance (insert, delete, substitute; each costs 1).
pub fn levenshtein_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0usize; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(x != y);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Mean positional normalised Levenshtein similarity; 0 when the counts differ.
pub fn levenshtein_score<S: AsRef<str>>(predicted: &[S], expected: &[S]) -> f64 {
    if predicted.len() != expected.len() {
        return 0.0;
    }
    if expected.is_empty() {
        return 1.0;
    }
    let total: f64 = predicted
        .iter()
        .zip(expected)
        .map(|(p, e)| {
            let (p, e) = (normalise(p.as_ref()), normalise(e.as_ref()));
            let longest = p.chars().count().max(e.chars().count());
            if longest == 0 {
                1.0
            } else {
                1.0 - levenshtein_distance(&p, &e) as f64 / longest as f64
            }
        })
        .sum();
    total / expected.len() as f64
}

/// Normalised lists equal, position by position.
pub fn exact_match<S: AsRef<str>>(predicted: &[S], expected: &[S]) -> bool {
    predicted.len() == expected.len()
        && predicted.iter().zip(expected).all(|(p, e)| normalise(p.as_ref()) == normalise(e.as_ref()))
}

/// The four scores of one example.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExampleScores {
    pub exact_match: bool,
    pub rouge_l: f64,
    pub count_accuracy: bool,
    pub levenshtein: f64,
}

/// Scores one prediction against its reference.
pub fn score<S: AsRef<str>>(predicted: &[S], expected: &[S]) -> ExampleScores {
    ExampleScores {
        exact_match: exact_match(predicted, expected),
        rouge_l: rouge_l(predicted, expected),
        count_accuracy: predicted.len() == expected.len(),
        levenshtein: levenshtein_score(predicted, expected),
    }
}

/// What the guards say of one served answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardOutcome {
    /// `None` without a grounding file.
    pub invented: Option<bool>,
    pub degenerate: bool,
    pub fallback: bool,
}

impl GuardOutcome {
    /// The outcome of `answer` to the query of `ctx`.
    pub fn of(answer: &Answer, ctx: &QueryContext<'_>) -> Self {
        let served = answer.fallback.is_none();
        GuardOutcome {
            invented: ctx.rules.grounded().then(|| served && has_invented_word_in(&answer.subqueries, ctx)),
            degenerate: served && is_degenerate_in(&answer.subqueries, ctx),
            fallback: !served,
        }
    }

    /// The echo baseline's: the query itself, which is what a fallback serves.
    pub fn echo(rules: &WordRules) -> Self {
        GuardOutcome { invented: rules.grounded().then_some(false), degenerate: false, fallback: true }
    }
}

/// One row of the metric table: means over `examples`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRow {
    pub name: String,
    pub examples: u64,
    pub exact_match: f64,
    pub rouge_l: f64,
    pub count_accuracy: f64,
    pub levenshtein: f64,
    /// Over the examples measured with a grounding file; `None` when there were none.
    pub invented_rate: Option<f64>,
    pub degenerate_rate: f64,
    pub fallback_rate: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    n: u64,
    exact_match: f64,
    rouge_l: f64,
    count_accuracy: f64,
    levenshtein: f64,
    /// Examples with an `invented` verdict, and how many of them were invented.
    invented_n: u64,
    invented: u64,
    degenerate: u64,
    fallback: u64,
}

impl Sums {
    fn add(&mut self, s: &ExampleScores, g: GuardOutcome) {
        self.n += 1;
        self.exact_match += f64::from(u8::from(s.exact_match));
        self.rouge_l += s.rouge_l;
        self.count_accuracy += f64::from(u8::from(s.count_accuracy));
        self.levenshtein += s.levenshtein;
        if let Some(invented) = g.invented {
            self.invented_n += 1;
            self.invented += u64::from(invented);
        }
        self.degenerate += u64::from(g.degenerate);
        self.fallback += u64::from(g.fallback);
    }

    fn row(&self, name: &str) -> MetricRow {
        let n = self.n.max(1) as f64;
        MetricRow {
            name: name.to_owned(),
            examples: self.n,
            exact_match: self.exact_match / n,
            rouge_l: self.rouge_l / n,
            count_accuracy: self.count_accuracy / n,
            levenshtein: self.levenshtein / n,
            invented_rate: (self.invented_n > 0).then(|| self.invented as f64 / self.invented_n as f64),
            degenerate_rate: self.degenerate as f64 / n,
            fallback_rate: self.fallback as f64 / n,
        }
    }
}

/// Accumulates examples; [`MetricTable::overall`] and [`MetricTable::per_kind`] give the rows.
#[derive(Debug, Default, Clone)]
pub struct MetricTable {
    overall: Sums,
    kinds: BTreeMap<String, Sums>,
}

impl MetricTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scores one example, adds it and its guard outcome to the overall row and to its kind's
    /// row, returns its scores.
    pub fn add<S: AsRef<str>>(
        &mut self,
        predicted: &[S],
        expected: &[S],
        kind: &str,
        guards: GuardOutcome,
    ) -> ExampleScores {
        let scores = score(predicted, expected);
        let kind = if kind.trim().is_empty() { UNKNOWN_KIND } else { kind };
        self.overall.add(&scores, guards);
        self.kinds.entry(kind.to_owned()).or_default().add(&scores, guards);
        scores
    }

    pub fn examples(&self) -> u64 {
        self.overall.n
    }

    /// The row over all examples (zeros when there are none).
    pub fn overall(&self) -> MetricRow {
        self.overall.row(OVERALL)
    }

    /// One row per kind label, sorted by name.
    pub fn per_kind(&self) -> Vec<MetricRow> {
        self.kinds.iter().map(|(name, sums)| sums.row(name)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn normalise_lowercases_and_collapses() {
        assert_eq!(normalise("  Nikola\t TESLA  lifespan "), "nikola tesla lifespan");
    }

    #[test]
    fn word_tokens_split_on_non_word_chars() {
        assert_eq!(word_tokens(&["Tesla's birth-date", "x_y 42"]), vec!["tesla", "s", "birth", "date", "x_y", "42"]);
        // Unicode letters are word characters, punctuation is not.
        assert_eq!(word_tokens(&["Milanković, Ђорђе!"]), vec!["milanković", "ђорђе"]);
    }

    #[test]
    fn exact_match_ignores_case_and_spacing_but_not_order() {
        assert!(exact_match(&["Tesla  lifespan", "b"], &["tesla lifespan", "B"]));
        assert!(!exact_match(&["b", "tesla lifespan"], &["tesla lifespan", "b"]));
        assert!(!exact_match(&["a"], &["a", "b"]));
    }

    #[test]
    fn rouge_l_matches_hand_computation() {
        // pred tokens: a b c d (4), ref tokens: a c e (3); LCS = a c = 2.
        // P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7.
        assert!(close(rouge_l(&["a b", "c d"], &["a c e"]), 4.0 / 7.0));
        assert!(close(rouge_l(&["x"], &["x"]), 1.0));
        assert_eq!(rouge_l::<&str>(&[], &["x"]), 0.0);
        assert_eq!(rouge_l(&["y"], &["x"]), 0.0);
        assert_eq!(rouge_l(&["!!"], &["!!"]), 0.0);
    }

    #[test]
    fn levenshtein_distance_classic_cases() {
        assert_eq!(levenshtein_distance("kitten", "sitting"), 3);
        assert_eq!(levenshtein_distance("", "abc"), 3);
        assert_eq!(levenshtein_distance("abc", ""), 3);
        assert_eq!(levenshtein_distance("same", "same"), 0);
        assert_eq!(levenshtein_distance("ćao", "cao"), 1); // characters, not bytes
    }

    #[test]
    fn levenshtein_score_positional_mean() {
        // "kitten"/"sitting": 1 - 3/7; identical (after normalising): 1.
        let s = levenshtein_score(&["kitten", "Paris"], &["sitting", "paris"]);
        assert!(close(s, ((1.0 - 3.0 / 7.0) + 1.0) / 2.0));
        assert_eq!(levenshtein_score(&["a"], &["a", "b"]), 0.0);
        assert_eq!(levenshtein_score(&[" "], &[""]), 1.0);
        assert_eq!(levenshtein_score::<&str>(&[], &[]), 1.0);
    }

    #[test]
    fn table_rows_are_means_and_group_by_kind() {
        let mut t = MetricTable::new();
        let none = GuardOutcome::default();
        t.add(&["a", "b"], &["a", "b"], "comparison", none);
        t.add(&["a"], &["a", "c"], "comparison", none);
        t.add(&["x"], &["y"], "", none);
        assert_eq!(t.examples(), 3);
        let overall = t.overall();
        assert_eq!(overall.name, OVERALL);
        assert_eq!(overall.examples, 3);
        assert!(close(overall.exact_match, 1.0 / 3.0));
        assert!(close(overall.count_accuracy, 2.0 / 3.0));
        // levenshtein: 1, 0 (counts differ), 0 ("x" vs "y")
        assert!(close(overall.levenshtein, 1.0 / 3.0));
        let kinds = t.per_kind();
        let names: Vec<_> = kinds.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["comparison", UNKNOWN_KIND]);
        assert_eq!(kinds[0].examples, 2);
        assert!(close(kinds[0].exact_match, 0.5));
        // rouge: 1 for the first; second: pred [a], ref [a c] -> P=1, R=1/2, F1=2/3.
        assert!(close(kinds[0].rouge_l, (1.0 + 2.0 / 3.0) / 2.0));
        assert_eq!(kinds[1].examples, 1);
        assert_eq!(kinds[1].rouge_l, 0.0);
        assert_eq!((overall.invented_rate, overall.degenerate_rate, overall.fallback_rate), (None, 0.0, 0.0));
    }

    #[test]
    fn guard_rates_are_shares_of_the_examples() {
        let mut t = MetricTable::new();
        let invented = GuardOutcome { invented: Some(true), ..GuardOutcome::default() };
        let clean = GuardOutcome { invented: Some(false), ..GuardOutcome::default() };
        let degenerate = GuardOutcome { invented: Some(false), degenerate: true, fallback: false };
        let fallback = GuardOutcome { invented: Some(false), degenerate: false, fallback: true };
        for g in [invented, clean, degenerate, fallback] {
            t.add(&["a"], &["a"], "k", g);
        }
        let row = t.overall();
        assert_eq!((row.invented_rate, row.degenerate_rate, row.fallback_rate), (Some(0.25), 0.25, 0.25));
    }

    #[test]
    fn guard_outcome_of_answers_and_the_echo() {
        use crate::grounding::golden::golden_rules;
        use crate::guards::{sanitize, FallbackReason};
        let rules = golden_rules();
        let q = "How long did Nikola Tesla live?";
        let ctx = rules.context(q);
        let served = Answer { subqueries: vec!["Nikola Edison".into(), "Nikola Edison".into()], fallback: None };
        assert_eq!(
            GuardOutcome::of(&served, &ctx),
            GuardOutcome { invented: Some(true), degenerate: true, fallback: false }
        );
        // A fallback serves the query: counted as a fallback only.
        let fallback = sanitize("Edison Edison", q, Some(&rules), None);
        assert_eq!(fallback.fallback, Some(FallbackReason::Ungrounded));
        assert_eq!(
            GuardOutcome::of(&fallback, &ctx),
            GuardOutcome { invented: Some(false), degenerate: false, fallback: true }
        );
        let plain = WordRules::defaults().context(q);
        assert_eq!(GuardOutcome::of(&served, &plain).invented, None, "no grounding file, no verdict");
        assert_eq!(
            GuardOutcome::echo(&rules),
            GuardOutcome { invented: Some(false), degenerate: false, fallback: true }
        );
        assert_eq!(GuardOutcome::echo(WordRules::defaults()).invented, None);
    }

    #[test]
    fn empty_table_has_zero_rows() {
        let t = MetricTable::new();
        assert_eq!(t.overall().examples, 0);
        assert_eq!(t.overall().exact_match, 0.0);
        assert!(t.per_kind().is_empty());
    }
}
