//! What a word is, and which words a model may write for a query (docs/grounding.md, "The
//! grounding file" and "Words"). The model directory's `grounding.json` becomes [`WordRules`];
//! without one the guards use [`WordRules::defaults`] and nothing is grounded against a
//! vocabulary. The Python twin is `train/qr_train/grounding.py`; both are held to
//! `tests/golden/grounding.json`.

use std::collections::HashSet;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use crate::metrics::is_word_char;
use crate::subqueries::is_space;

/// The file's name in a model directory.
pub const GROUNDING_FILE: &str = "grounding.json";
/// The only format version this build reads.
pub const VERSION: u64 = 1;

/// Characters that `query_words` strips from the end of a raw token (`St.` keeps its dot).
const TRAILING_PUNCTUATION: [char; 5] = ['?', '!', ',', ';', ':'];
const DEFAULT_STOPWORDS: [&str; 21] = [
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "have", "in", "is", "of", "on", "or", "the",
    "to", "was", "with",
];

/// ASCII lowercase of the UTF-8 bytes; other bytes unchanged. Words compare folded.
pub fn fold(word: &str) -> Vec<u8> {
    word.as_bytes().to_ascii_lowercase()
}

/// `word` with its first character uppercased (`ærø` -> `Ærø`): folding lowercases ASCII only,
/// so a query's lowercase non-ASCII name also allows its capitalised spelling.
fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `core` without a final `'s` or `’s`.
fn strip_possessive(core: &str) -> &str {
    core.strip_suffix("'s").or_else(|| core.strip_suffix("\u{2019}s")).unwrap_or(core)
}

/// A raw token without its leading and trailing non-word characters.
fn core(raw: &str) -> &str {
    raw.trim_matches(|c: char| !is_word_char(c))
}

/// The whitespace-separated tokens of `text`.
fn tokens(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_space).filter(|t| !t.is_empty())
}

/// The folded forms of every query token that the model may copy (see docs/grounding.md).
pub fn query_words(query: &str) -> HashSet<Vec<u8>> {
    let mut out = HashSet::new();
    let mut add = |form: &str| {
        if !form.is_empty() {
            out.insert(fold(form));
            out.insert(fold(&capitalise(form)));
        }
    };
    // The model reads the query through the tokenizer's NFKC normaliser, so it copies `km2` for
    // `km²` and `fi` for the ligature `ﬁ`: both spellings are the query's words.
    let normalised: String = query.nfkc().collect();
    let other = (normalised != query).then_some(normalised.as_str());
    for raw in std::iter::once(query).chain(other).flat_map(tokens) {
        let core = core(raw);
        // The token as written: the query returned as it is holds no ungrounded word.
        add(raw);
        add(core);
        add(strip_possessive(core));
        add(raw.trim_end_matches(TRAILING_PUNCTUATION));
        for run in core.split(|c: char| !is_word_char(c)) {
            add(run);
        }
    }
    out
}

/// Guard sizes (docs/grounding.md, "Guards", step 3 and 6). A field the file leaves out
/// takes its default (as in `qr_train.grounding`); a field it misspells is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Guards {
    pub max_subquery_words: usize,
    pub max_word_repeats: usize,
    pub no_repeat_ngram: usize,
    pub max_subqueries: usize,
}

impl Default for Guards {
    fn default() -> Self {
        Self { max_subquery_words: 16, max_word_repeats: 3, no_repeat_ngram: 3, max_subqueries: 8 }
    }
}

/// When a misspelled query word may stand for a known word (missing fields: the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FuzzySettings {
    /// Shorter query words are never corrected.
    pub min_len: usize,
    /// Query words at least this long may be 2 edits away (else 1).
    pub long_len: usize,
}

impl Default for FuzzySettings {
    fn default() -> Self {
        Self { min_len: 5, long_len: 8 }
    }
}

fn default_stopwords() -> Vec<String> {
    DEFAULT_STOPWORDS.iter().map(|w| (*w).to_owned()).collect()
}

/// `grounding.json` as written by the pipeline. Word lists are folded, sorted and unique.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundingFile {
    pub version: u64,
    pub generative_words: Vec<String>,
    pub known_words: Vec<String>,
    #[serde(default = "default_stopwords")]
    pub stopwords: Vec<String>,
    #[serde(default)]
    pub fuzzy: FuzzySettings,
    #[serde(default)]
    pub guards: Guards,
    #[serde(default)]
    pub min_mean_logprob: Option<f64>,
}

/// Why a grounding file cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroundingError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("no integer `version` field (this build reads version {VERSION})")]
    MissingVersion,
    #[error("version {0}; this build reads version {VERSION}")]
    Version(u64),
    #[error("{0}")]
    Shape(String),
    #[error("{list}[{index}] {word:?} {problem}")]
    Word { list: &'static str, index: usize, word: String, problem: &'static str },
    #[error("guards.{0} must be at least 1")]
    ZeroGuard(&'static str),
    #[error("min_mean_logprob must be a finite number or null, not {0}")]
    Threshold(f64),
}

impl GroundingFile {
    /// Parses and checks the file's text: the version first, so a newer format is named as
    /// such rather than as a missing field.
    pub fn parse(text: &str) -> Result<Self, GroundingError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| GroundingError::Json(e.to_string()))?;
        match value.get("version").and_then(serde_json::Value::as_u64) {
            None => return Err(GroundingError::MissingVersion),
            Some(VERSION) => {}
            Some(other) => return Err(GroundingError::Version(other)),
        }
        let file: Self = serde_json::from_value(value).map_err(|e| GroundingError::Shape(e.to_string()))?;
        file.check()?;
        Ok(file)
    }

    fn check(&self) -> Result<(), GroundingError> {
        for (list, words) in [
            ("generative_words", &self.generative_words),
            ("known_words", &self.known_words),
            ("stopwords", &self.stopwords),
        ] {
            for (index, word) in words.iter().enumerate() {
                let problem = if word.is_empty() {
                    Some("is empty")
                } else if word.contains(|c: char| is_space(c) || c == '|') {
                    Some("holds whitespace or '|'")
                } else if fold(word) != word.as_bytes() {
                    Some("is not folded (ASCII lowercase)")
                } else if index > 0 && words[index - 1] >= *word {
                    Some("is out of order or repeated (lists are sorted and unique)")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(GroundingError::Word { list, index, word: word.clone(), problem });
                }
            }
        }
        let g = &self.guards;
        for (field, value) in [
            ("max_subquery_words", g.max_subquery_words),
            ("max_word_repeats", g.max_word_repeats),
            ("no_repeat_ngram", g.no_repeat_ngram),
            ("max_subqueries", g.max_subqueries),
        ] {
            if value == 0 {
                return Err(GroundingError::ZeroGuard(field));
            }
        }
        match self.min_mean_logprob {
            Some(t) if !t.is_finite() => Err(GroundingError::Threshold(t)),
            _ => Ok(()),
        }
    }
}

/// The characters a word holds, hashed into 64 bits. One edit changes at most two bits of it
/// (a substitution: one character out, one in; a swap: none), so words `d` edits apart differ
/// in at most `2 d` bits: a one-instruction test that rules out most candidates.
fn char_mask(chars: &[char]) -> u64 {
    chars.iter().fold(0, |mask, &c| mask | 1 << (u32::from(c) % 64))
}

/// One known word, ready for the fuzzy match.
#[derive(Debug, Clone)]
struct KnownWord {
    chars: Box<[char]>,
    mask: u64,
    folded: Vec<u8>,
}

/// The known words by length in characters, for the fuzzy match: a word within distance `d`
/// of a `n`-character word has `n - d ..= n + d` characters, so only those buckets are read.
#[derive(Debug, Clone, Default)]
struct KnownWords {
    set: HashSet<Vec<u8>>,
    by_len: Vec<Vec<KnownWord>>,
}

impl KnownWords {
    fn new(words: &[String]) -> Self {
        let mut by_len: Vec<Vec<KnownWord>> = Vec::new();
        for w in words {
            let chars: Box<[char]> = w.chars().collect();
            if by_len.len() <= chars.len() {
                by_len.resize_with(chars.len() + 1, Vec::new);
            }
            by_len[chars.len()].push(KnownWord { mask: char_mask(&chars), chars, folded: fold(w) });
        }
        Self { set: words.iter().map(|w| fold(w)).collect(), by_len }
    }

    /// Every known word within `max` edits of `word` (folded characters).
    fn near(&self, word: &[char], max: usize, out: &mut HashSet<Vec<u8>>) {
        let lo = word.len().saturating_sub(max);
        let hi = (word.len() + max).min(self.by_len.len().saturating_sub(1));
        let mask = char_mask(word);
        for bucket in self.by_len.get(lo..=hi).into_iter().flatten() {
            for known in bucket {
                if (known.mask ^ mask).count_ones() as usize <= 2 * max && osa_within(word, &known.chars, max) {
                    out.insert(known.folded.clone());
                }
            }
        }
    }
}

/// Whether the optimal-string-alignment distance (insert, delete, substitute, swap two
/// neighbours; no substring edited twice) between `a` and `b` is at most `max`. Only the
/// diagonal band of width `2 * max + 1` is computed, and a row whose band all exceeds `max`
/// ends the search.
pub fn osa_within(a: &[char], b: &[char], max: usize) -> bool {
    if a.len().abs_diff(b.len()) > max {
        return false;
    }
    // Three rows on the stack for words of up to 31 characters (nearly all).
    const STACK: usize = 32;
    let width = b.len() + 1;
    if width <= STACK {
        let mut stack = [[0; STACK]; 3];
        let [x, y, z] = &mut stack;
        osa_rows(a, b, max, &mut [&mut x[..width], &mut y[..width], &mut z[..width]])
    } else {
        let mut rows = [vec![0; width], vec![0; width], vec![0; width]];
        osa_rows(a, b, max, &mut rows.each_mut().map(|r| r.as_mut_slice()))
    }
}

/// [`osa_within`] on three rows of `b.len() + 1` cells: i-2 (for swaps), i-1, i.
fn osa_rows(a: &[char], b: &[char], max: usize, rows: &mut [&mut [usize]; 3]) -> bool {
    // Cells outside the band hold `big`.
    let big = max + 1;
    for row in rows.iter_mut() {
        row.fill(big);
    }
    for (j, cell) in rows[1].iter_mut().enumerate().take(max + 1) {
        *cell = j;
    }
    for i in 1..=a.len() {
        let [older, prev, cur] = rows;
        let (older, prev): (&[usize], &[usize]) = (older, prev);
        cur.fill(big);
        let lo = i.saturating_sub(max);
        let hi = (i + max).min(b.len());
        if lo == 0 {
            cur[0] = i.min(big);
        }
        let mut row_min = if lo == 0 { cur[0] } else { big };
        for j in lo.max(1)..=hi {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (prev[j - 1] + cost).min(prev[j] + 1).min(cur[j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(older[j - 2] + 1);
            }
            cur[j] = d.min(big);
            row_min = row_min.min(cur[j]);
        }
        if row_min > max {
            return false;
        }
        rows.rotate_left(1);
    }
    // After the last rotation the final row sits in the middle slot.
    rows[1][b.len()] <= max
}

/// The words a model of this grounding file knows: what it may write beyond the query.
#[derive(Debug, Clone, Default)]
pub struct Vocabulary {
    generative: HashSet<Vec<u8>>,
    known: KnownWords,
}

impl Vocabulary {
    /// Folded generative words (properties, relations, types), in no particular order.
    pub fn generative(&self) -> impl Iterator<Item = &[u8]> {
        self.generative.iter().map(Vec::as_slice)
    }

    pub fn generative_count(&self) -> usize {
        self.generative.len()
    }

    pub fn known_count(&self) -> usize {
        self.known.set.len()
    }
}

/// The guards' settings and, with a grounding file, the vocabulary words are grounded against.
#[derive(Debug, Clone)]
pub struct WordRules {
    /// `None` without a grounding file: then no word is checked for grounding.
    pub vocabulary: Option<Vocabulary>,
    pub stopwords: HashSet<Vec<u8>>,
    pub fuzzy: FuzzySettings,
    pub guards: Guards,
    pub min_mean_logprob: Option<f64>,
}

impl WordRules {
    /// The rules of a model directory without `grounding.json`.
    pub fn defaults() -> &'static WordRules {
        static DEFAULTS: OnceLock<WordRules> = OnceLock::new();
        DEFAULTS.get_or_init(|| WordRules {
            vocabulary: None,
            stopwords: DEFAULT_STOPWORDS.iter().map(|w| fold(w)).collect(),
            fuzzy: FuzzySettings::default(),
            guards: Guards::default(),
            min_mean_logprob: None,
        })
    }

    pub fn from_file(file: &GroundingFile) -> Self {
        WordRules {
            vocabulary: Some(Vocabulary {
                generative: file.generative_words.iter().map(|w| fold(w)).collect(),
                known: KnownWords::new(&file.known_words),
            }),
            stopwords: file.stopwords.iter().map(|w| fold(w)).collect(),
            fuzzy: file.fuzzy,
            guards: file.guards,
            min_mean_logprob: file.min_mean_logprob,
        }
    }

    /// Parses and checks `grounding.json`'s text.
    pub fn parse(text: &str) -> Result<Self, GroundingError> {
        GroundingFile::parse(text).map(|f| Self::from_file(&f))
    }

    /// Whether words are grounded against a vocabulary (a grounding file was read).
    pub fn grounded(&self) -> bool {
        self.vocabulary.is_some()
    }

    /// Known words that a misspelled query word may stand for (folded; empty without a
    /// vocabulary).
    pub fn fuzzy(&self, query: &str) -> HashSet<Vec<u8>> {
        let mut out = HashSet::new();
        let Some(vocabulary) = &self.vocabulary else { return out };
        for raw in tokens(query) {
            let core = core(raw);
            for form in [core, strip_possessive(core)] {
                let folded = form.to_ascii_lowercase();
                let chars: Vec<char> = folded.chars().collect();
                if chars.len() < self.fuzzy.min_len || vocabulary.known.set.contains(folded.as_bytes()) {
                    continue;
                }
                let max = if chars.len() >= self.fuzzy.long_len { 2 } else { 1 };
                vocabulary.known.near(&chars, max, &mut out);
            }
        }
        out
    }

    /// What one query allows: its words and their fuzzy matches.
    pub fn context(&self, query: &str) -> QueryContext<'_> {
        let mut words = query_words(query);
        words.extend(self.fuzzy(query));
        QueryContext { rules: self, words }
    }
}

/// The rules applied to one query.
#[derive(Debug, Clone)]
pub struct QueryContext<'r> {
    pub rules: &'r WordRules,
    /// Folded `query_words ∪ fuzzy`.
    pub words: HashSet<Vec<u8>>,
}

/// A word is grounded when its folded form is a query word, a fuzzy match or a generative word.
pub fn is_grounded(word: &str, ctx: &QueryContext<'_>) -> bool {
    let folded = fold(word);
    ctx.words.contains(&folded) || ctx.rules.vocabulary.as_ref().is_some_and(|v| v.generative.contains(&folded))
}

/// The hand-written cases of `tests/golden/grounding.json`, for the tests of every module
/// that implements docs/grounding.md.
#[cfg(test)]
pub(crate) mod golden {
    use serde_json::Value;

    use super::WordRules;

    pub fn golden() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/grounding.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The golden file's `rules` section, as a model's grounding file.
    pub fn golden_rules() -> WordRules {
        WordRules::parse(&golden()["rules"].to_string()).unwrap()
    }

    pub fn strings(v: &Value) -> Vec<String> {
        v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::golden::{golden, golden_rules, strings};
    use super::*;

    #[test]
    fn defaults_are_the_golden_defaults() {
        let g = golden();
        let d = &g["defaults"];
        let guards: Guards = serde_json::from_value(d["guards"].clone()).unwrap();
        let fuzzy: FuzzySettings = serde_json::from_value(d["fuzzy"].clone()).unwrap();
        let rules = WordRules::defaults();
        assert_eq!(rules.guards, guards);
        assert_eq!(rules.fuzzy, fuzzy);
        let stopwords: HashSet<Vec<u8>> = strings(&d["stopwords"]).iter().map(|w| fold(w)).collect();
        assert_eq!(rules.stopwords, stopwords);
        assert!(!rules.grounded() && rules.min_mean_logprob.is_none());
        // A file that leaves the optional sections out gets the same defaults, field by field.
        let file = GroundingFile::parse(r#"{"version": 1, "generative_words": [], "known_words": []}"#).unwrap();
        assert_eq!((file.guards, file.fuzzy, file.stopwords.len()), (guards, fuzzy, 21));
        let partial = r#"{"version": 1, "generative_words": [], "known_words": [], "guards": {"max_subqueries": 2}}"#;
        assert_eq!(GroundingFile::parse(partial).unwrap().guards, Guards { max_subqueries: 2, ..guards });
        let typo = r#"{"version": 1, "generative_words": [], "known_words": [], "guards": {"max_subquery": 2}}"#;
        assert!(GroundingFile::parse(typo).unwrap_err().to_string().contains("unknown field `max_subquery`"));
    }

    #[test]
    fn golden_query_words() {
        for case in golden()["query_words"].as_array().unwrap() {
            let query = case["query"].as_str().unwrap();
            let words = query_words(query);
            for w in strings(&case["contains"]) {
                assert!(words.contains(w.as_bytes()), "{query:?}: {w:?} missing from {:?}", lossy(&words));
            }
            for w in strings(&case["excludes"]) {
                assert!(!words.contains(w.as_bytes()), "{query:?}: {w:?} should not be in {:?}", lossy(&words));
            }
        }
    }

    fn lossy(words: &HashSet<Vec<u8>>) -> Vec<String> {
        let mut v: Vec<String> = words.iter().map(|w| String::from_utf8_lossy(w).into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn golden_grounded() {
        let rules = golden_rules();
        for case in golden()["grounded"].as_array().unwrap() {
            let (query, word) = (case["query"].as_str().unwrap(), case["word"].as_str().unwrap());
            let ctx = rules.context(query);
            assert_eq!(is_grounded(word, &ctx), case["grounded"].as_bool().unwrap(), "{query:?} / {word:?}");
        }
    }

    #[test]
    fn fold_lowercases_ascii_only() {
        assert_eq!(fold("TeSLA Ærø"), "tesla Ærø".as_bytes());
    }

    /// Full optimal-string-alignment table, the reference for the banded one.
    fn osa(a: &[char], b: &[char]) -> usize {
        let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for (i, row) in d.iter_mut().enumerate() {
            row[0] = i;
        }
        for (j, cell) in d[0].iter_mut().enumerate() {
            *cell = j;
        }
        for i in 1..=a.len() {
            for j in 1..=b.len() {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
                }
            }
        }
        d[a.len()][b.len()]
    }

    #[test]
    fn banded_osa_agrees_with_the_full_table() {
        // The last three are longer than the rows kept on the stack.
        let words = [
            "",
            "a",
            "ab",
            "ba",
            "abc",
            "acb",
            "ca",
            "abc",
            "tesla",
            "telsa",
            "tesl",
            "einstein",
            "einstien",
            "albert",
            "albrt",
            "alberta",
            "ærø",
            "aerø",
            "kitten",
            "sitting",
            "abcdef",
            "badcfe",
            "xyz",
            "pneumonoultramicroscopicsilicovolcanoconiosis",
            "pneumonoultramicroscopicsilicovolcanoconiosys",
            "pneumonoultramicroscopicsilicovolcanoconiossi",
        ];
        for a in words {
            for b in words {
                let (ca, cb): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
                let d = osa(&ca, &cb);
                for max in 0..4 {
                    assert_eq!(osa_within(&ca, &cb, max), d <= max, "{a:?} {b:?} max {max} (distance {d})");
                }
            }
        }
        // A swap is one edit; "ca" -> "abc" is 3 under OSA (2 under unrestricted Damerau).
        assert_eq!(osa(&['t', 'e', 'l', 's', 'a'], &['t', 'e', 's', 'l', 'a']), 1);
        assert_eq!(osa(&['c', 'a'], &['a', 'b', 'c']), 3);
    }

    #[test]
    fn fuzzy_reads_only_nearby_lengths_and_skips_known_and_short_words() {
        let rules = golden_rules();
        let f = rules.fuzzy("who was albert einstien, telsa and tesl");
        let mut got = lossy(&f);
        got.sort();
        assert_eq!(got, vec!["einstein", "tesla"]);
        assert!(WordRules::defaults().fuzzy("einstien").is_empty(), "no vocabulary, no fuzzy words");
    }

    #[test]
    fn malformed_files_are_named_errors() {
        let ok = r#"{"version": 1, "generative_words": ["birth"], "known_words": ["tesla"]}"#;
        assert!(WordRules::parse(ok).unwrap().grounded());
        let cases: [(&str, &str); 8] = [
            ("not json", "not valid JSON"),
            (r#"{"generative_words": []}"#, "no integer `version`"),
            (r#"{"version": 2, "anything": 1}"#, "version 2; this build reads version 1"),
            (r#"{"version": 1, "known_words": []}"#, "missing field `generative_words`"),
            (
                r#"{"version": 1, "generative_words": ["Birth"], "known_words": []}"#,
                "generative_words[0] \"Birth\" is not folded",
            ),
            (
                r#"{"version": 1, "generative_words": ["b", "a"], "known_words": []}"#,
                "generative_words[1] \"a\" is out of order",
            ),
            (
                r#"{"version": 1, "generative_words": [], "known_words": [], "guards": {"max_subquery_words": 0, "max_word_repeats": 1, "no_repeat_ngram": 1, "max_subqueries": 1}}"#,
                "guards.max_subquery_words must be at least 1",
            ),
            (
                r#"{"version": 1, "generative_words": [], "known_words": ["a b"]}"#,
                "known_words[0] \"a b\" holds whitespace",
            ),
        ];
        for (text, needle) in cases {
            let err = WordRules::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn the_golden_rules_parse() {
        let file = GroundingFile::parse(&golden()["rules"].to_string()).unwrap();
        assert_eq!(file.guards.max_subquery_words, 6);
        let rules = WordRules::from_file(&file);
        let v = rules.vocabulary.as_ref().unwrap();
        assert_eq!((v.generative_count(), v.known_count()), (10, 8));
    }
}
