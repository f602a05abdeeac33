//! Capitalised-word constraint for greedy decoding, the Rust twin of
//! `train/qr_train/constraint.py` (same rule, same file): the model may only write a
//! capitalised word that the query contains (or its capitalised form), or one of the model's
//! property words ("Birth", "Population", ...) shipped as `constraint.json`. A small model
//! trained from scratch tends to write a name it memorised instead of the one asked about;
//! this closes that door without retraining.
//!
//! Words are tracked as UTF-8 bytes so byte-fallback pieces (`<0xC3>`) work, and only the
//! top-k logits are candidates, so the model's own ranking decides among allowed tokens;
//! when none of them is allowed the argmax is taken.

use std::{collections::HashSet, path::Path, sync::Arc};

use qreformulate::metrics::is_word_char;
use serde::Deserialize;

use super::{logits, model_dir::ModelError};

pub const CONSTRAINT_FILE: &str = "constraint.json";
const METASPACE: char = '\u{2581}';

#[derive(Debug, Deserialize)]
struct ConstraintJson {
    #[serde(default = "default_top_k")]
    top_k: usize,
    property_words: Vec<String>,
}

fn default_top_k() -> usize {
    8
}

/// The model's constraint settings, read once per model directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstraintFile {
    pub top_k: usize,
    pub property_words: Vec<String>,
}

impl ConstraintFile {
    /// `Ok(None)` when the model ships no `constraint.json`.
    pub fn read(dir: &Path) -> Result<Option<Self>, ModelError> {
        let path = dir.join(CONSTRAINT_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let malformed = |reason: String| ModelError::Malformed { file: path.clone(), reason };
        let text = std::fs::read_to_string(&path).map_err(|e| malformed(e.to_string()))?;
        let json: ConstraintJson = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        if json.top_k == 0 {
            return Err(malformed("top_k must be at least 1".into()));
        }
        Ok(Some(Self { top_k: json.top_k, property_words: json.property_words }))
    }
}

/// One vocabulary piece as the rule sees it.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    /// `<0xNN>`: one raw byte, appended to the current word.
    Byte(u8),
    /// `▁word`: starts a new word (the metaspace removed).
    WordStart(Vec<u8>),
    /// Continues the current word.
    Continuation(Vec<u8>),
}

fn parse_piece(piece: &str) -> Piece {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        if hex.len() == 2 {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return Piece::Byte(b);
            }
        }
    }
    match piece.strip_prefix(METASPACE) {
        Some(rest) => Piece::WordStart(rest.as_bytes().to_vec()),
        None => Piece::Continuation(piece.as_bytes().to_vec()),
    }
}

/// What every request of one model shares: the vocabulary pieces and the property words.
#[derive(Debug)]
pub struct ConstraintModel {
    pieces: Vec<Piece>,
    top_k: usize,
    eos: u32,
    property_full: HashSet<Vec<u8>>,
    property_prefixes: HashSet<Vec<u8>>,
}

fn prefixes(words: &HashSet<Vec<u8>>) -> HashSet<Vec<u8>> {
    words.iter().flat_map(|w| (1..=w.len()).map(move |i| w[..i].to_vec())).collect()
}

impl ConstraintModel {
    /// `pieces[id]` is the tokenizer's piece for token `id` (empty when it has none).
    pub fn new(pieces: &[String], file: &ConstraintFile, eos: u32) -> Self {
        let property_full: HashSet<Vec<u8>> = file.property_words.iter().map(|w| w.as_bytes().to_vec()).collect();
        Self {
            pieces: pieces.iter().map(|p| parse_piece(p)).collect(),
            top_k: file.top_k,
            eos,
            property_prefixes: prefixes(&property_full),
            property_full,
        }
    }

    /// The per-request state for `query`.
    pub fn for_query(self: &Arc<Self>, query: &str) -> WordConstraint {
        let full: HashSet<Vec<u8>> = query_words(query).into_iter().map(String::into_bytes).collect();
        WordConstraint { model: Arc::clone(self), prefixes: prefixes(&full), full, word: Vec::new(), top: Vec::new() }
    }
}

/// Words of the query, edge punctuation and a possessive 's stripped, plus capitalised forms
/// (`query_words` in constraint.py).
pub fn query_words(query: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    for raw in query.split_whitespace() {
        let mut word = raw.trim_matches(|c: char| !is_word_char(c));
        if let Some(w) = word.strip_suffix("'s").or_else(|| word.strip_suffix("\u{2019}s")) {
            word = w;
        }
        // 'St.' keeps its dot, 'Tesla,' loses its comma.
        for w in [word, raw.trim_end_matches(['?', '!', ',', ';', ':'])] {
            if !w.is_empty() {
                out.insert(w.to_owned());
                out.insert(capitalise(w));
            }
        }
    }
    out
}

fn capitalise(w: &str) -> String {
    let mut chars = w.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// First character of the valid UTF-8 in `word` is uppercase (invalid bytes are skipped,
/// like Python's `decode("utf-8", "ignore")`).
fn capitalised(word: &[u8]) -> bool {
    word.utf8_chunks().flat_map(|chunk| chunk.valid().chars()).next().is_some_and(char::is_uppercase)
}

/// Per-request state: the word being written.
pub struct WordConstraint {
    model: Arc<ConstraintModel>,
    full: HashSet<Vec<u8>>,
    prefixes: HashSet<Vec<u8>>,
    word: Vec<u8>,
    top: Vec<(f32, u32)>,
}

impl WordConstraint {
    fn ok_complete(&self, word: &[u8]) -> bool {
        !capitalised(word) || self.full.contains(word) || self.model.property_full.contains(word)
    }

    fn ok_partial(&self, word: &[u8]) -> bool {
        !capitalised(word) || self.prefixes.contains(word) || self.model.property_prefixes.contains(word)
    }

    /// The current word after `token`, or `None` when the token breaks the rule.
    fn step(&self, token: u32) -> Option<Vec<u8>> {
        if token == self.model.eos {
            return self.ok_complete(&self.word).then(Vec::new);
        }
        match self.model.pieces.get(token as usize) {
            // Checked byte by byte like any continuation: an unfinished first character does
            // not count as capitalised yet, and byte prefixes of allowed words pass.
            Some(Piece::Byte(b)) => {
                let word = [self.word.as_slice(), &[*b]].concat();
                self.ok_partial(&word).then_some(word)
            }
            Some(Piece::WordStart(text)) => {
                if !self.ok_complete(&self.word) {
                    return None;
                }
                self.ok_partial(text).then(|| text.clone())
            }
            Some(Piece::Continuation(text)) => {
                let word = [self.word.as_slice(), text].concat();
                self.ok_partial(&word).then_some(word)
            }
            // Ids past the tokenizer's vocabulary (padded embedding rows) add nothing.
            None => self.ok_partial(&self.word).then(|| self.word.clone()),
        }
    }

    /// Picks the next token from one row of logits: the best allowed among the top k, else
    /// the argmax. Never picks `banned`.
    pub fn choose(&mut self, row: &[f32], banned: Option<usize>) -> usize {
        let mut top = std::mem::take(&mut self.top);
        logits::top_k(row, self.model.top_k, banned, &mut top);
        let mut chosen = None;
        for &(_, token) in &top {
            if let Some(word) = self.step(token) {
                self.word = word;
                chosen = Some(token as usize);
                break;
            }
        }
        self.top = top;
        chosen.unwrap_or_else(|| {
            let best = logits::argmax(row, banned);
            self.word = self.step(best as u32).unwrap_or_default();
            best
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The same vocabulary and cases as train/tests/test_constraint.py.
    const PIECES: [&str; 14] = [
        "<pad>",
        "</s>",
        "<unk>",
        "▁Nikola",
        "▁Tesla",
        "▁Edison",
        "▁Lifespan",
        "▁|",
        "▁Tes",
        "la",
        "▁lifespan",
        "<0xC3>",
        "<0x86>",
        "▁Ed",
    ];
    const EOS: u32 = 1;

    fn run(query: &str, ranking_per_step: &[&[&str]], words: &[&str]) -> Vec<&'static str> {
        let pieces: Vec<String> = PIECES.iter().map(|p| (*p).to_owned()).collect();
        let file = ConstraintFile { top_k: 4, property_words: words.iter().map(|w| (*w).to_owned()).collect() };
        let model = Arc::new(ConstraintModel::new(&pieces, &file, EOS));
        let mut c = model.for_query(query);
        let index = |p: &str| PIECES.iter().position(|x| *x == p).unwrap();
        ranking_per_step
            .iter()
            .map(|ranking| {
                let mut row = vec![-10.0f32; PIECES.len()];
                for (rank, token) in ranking.iter().enumerate() {
                    row[index(token)] = 10.0 - rank as f32;
                }
                PIECES[c.choose(&row, None)]
            })
            .collect()
    }

    #[test]
    fn memorised_name_is_replaced_by_the_querys() {
        let out = run(
            "How long did Nikola Tesla live?",
            &[&["▁Nikola"], &["▁Edison", "▁Tesla"], &["▁Lifespan"], &["</s>"]],
            &["Lifespan"],
        );
        assert_eq!(out, ["▁Nikola", "▁Tesla", "▁Lifespan", "</s>"]);
    }

    #[test]
    fn words_are_checked_piece_by_piece() {
        let out = run("Tesla?", &[&["▁Ed", "▁Tes"], &["la"], &["</s>"]], &["Lifespan"]);
        assert_eq!(out, ["▁Tes", "la", "</s>"]);
    }

    #[test]
    fn lowercase_and_property_words_are_free() {
        let out = run("tesla?", &[&["▁lifespan"], &["▁Lifespan"], &["</s>"]], &["Lifespan"]);
        assert_eq!(out, ["▁lifespan", "▁Lifespan", "</s>"]);
        assert!(query_words("what about tesla's coils?").contains("Tesla"));
    }

    #[test]
    fn falls_back_to_argmax_when_nothing_allowed_is_in_the_top_k() {
        let out = run("Tesla?", &[&["▁Edison", "▁Ed", "▁Nikola", "▁Lifespan"]], &[]);
        assert_eq!(out, ["▁Edison"]);
    }

    #[test]
    fn byte_pieces_are_checked_as_they_arrive() {
        // "Æ" is C3 86. Asked about "Ærø", the model may spell it byte by byte.
        assert_eq!(run("Ærø?", &[&["<0xC3>"], &["<0x86>"]], &[]), ["<0xC3>", "<0x86>"]);
        // Not in the query: C3 alone is no character yet, but C3 86 is a capitalised "Æ" that
        // begins no allowed word, so the next allowed candidate ("la") is taken instead.
        assert_eq!(run("x", &[&["<0xC3>"], &["<0x86>", "la"]], &[]), ["<0xC3>", "la"]);
        // A capitalised word may not run on into bytes that no allowed word has.
        assert_eq!(run("Tesla?", &[&["▁Tes"], &["<0xC3>", "la"]], &[]), ["▁Tes", "la"]);
    }

    #[test]
    fn query_words_strip_punctuation_and_possessives() {
        let w = query_words("Who is St. Patrick's friend, “Tesla”?");
        for expected in ["St.", "St", "Patrick", "Patrick's", "friend", "Friend", "Tesla", "Who"] {
            assert!(w.contains(expected), "{expected} missing from {w:?}");
        }
    }

    #[test]
    fn constraint_file_parses_and_rejects_zero_top_k() {
        let dir = std::env::temp_dir().join(format!("qserver-constraint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(ConstraintFile::read(&dir).unwrap(), None);
        std::fs::write(dir.join(CONSTRAINT_FILE), r#"{"property_words": ["Birth"]}"#).unwrap();
        let f = ConstraintFile::read(&dir).unwrap().unwrap();
        assert_eq!((f.top_k, f.property_words.as_slice()), (8, &["Birth".to_owned()][..]));
        std::fs::write(dir.join(CONSTRAINT_FILE), r#"{"top_k": 0, "property_words": []}"#).unwrap();
        assert!(ConstraintFile::read(&dir).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
