//! Grounded decoding (docs/grounding.md, "Token-level enforcement"): with the model's
//! `grounding.json`, every word the decoder writes must be, byte by byte, on its way to a word
//! of the query (or a fuzzy match of one) or to one of the model's generative words.
//!
//! Built once per model: each token's bytes, a trie over the generative words and a trie over
//! the token byte strings (to list every allowed token without trying each). Built per
//! request: a small trie over the query's words. A decoding row's state is one node in each
//! word trie; both at the root means no word is in progress.

use std::sync::Arc;

use qreformulate::grounding::WordRules;

/// Vocabulary pieces start words with this character (SentencePiece's metaspace).
const METASPACE: char = '\u{2581}';
/// How many of the best tokens greedy search tries before scanning every allowed token.
pub const GREEDY_TOP_K: usize = 8;

const ROOT: u32 = 0;
/// No node: the word in progress left this trie.
const NONE: u32 = u32::MAX;

/// A prefix trie over byte strings; node 0 is the root.
#[derive(Debug, Default)]
struct ByteTrie {
    /// Per node: children sorted by byte.
    children: Vec<Vec<(u8, u32)>>,
    /// Per node: a whole word ends here.
    end: Vec<bool>,
}

impl ByteTrie {
    fn new<'a>(words: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut trie = ByteTrie { children: vec![Vec::new()], end: vec![false] };
        for word in words {
            let node = word.iter().fold(ROOT, |node, &b| trie.child_or_insert(node, b));
            trie.end[node as usize] = true;
        }
        trie
    }

    fn child_or_insert(&mut self, node: u32, byte: u8) -> u32 {
        let children = &self.children[node as usize];
        match children.binary_search_by_key(&byte, |&(b, _)| b) {
            Ok(i) => children[i].1,
            Err(i) => {
                let new = self.children.len() as u32;
                self.children[node as usize].insert(i, (byte, new));
                self.children.push(Vec::new());
                self.end.push(false);
                new
            }
        }
    }

    fn child(&self, node: u32, byte: u8) -> u32 {
        if node == NONE {
            return NONE;
        }
        let children = &self.children[node as usize];
        children.binary_search_by_key(&byte, |&(b, _)| b).map_or(NONE, |i| children[i].1)
    }

    fn is_end(&self, node: u32) -> bool {
        node != NONE && self.end[node as usize]
    }
}

/// Where a decoding row stands in the word it is writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WordState {
    generative: u32,
    query: u32,
}

impl WordState {
    /// Between words (also the state before the first token).
    pub const START: WordState = WordState { generative: ROOT, query: ROOT };

    fn between_words(self) -> bool {
        self == Self::START
    }
}

/// The bytes a piece stands for: `<0xNN>` is byte NN; otherwise its UTF-8 text with the
/// metaspace as a space.
pub fn piece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        if hex.len() == 2 {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
    }
    piece.replace(METASPACE, " ").into_bytes()
}

/// Whitespace as Python's `bytes.isspace` sees it (the pipeline's twin): it ends a word.
fn is_ascii_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// What every request of one model shares.
#[derive(Debug)]
pub struct GroundingModel {
    rules: Arc<WordRules>,
    /// Per token id: its bytes, or `None` when it is never allowed (special, no piece).
    tokens: Vec<Option<Box<[u8]>>>,
    /// The token byte strings, for listing the allowed tokens of a state.
    token_trie: ByteTrie,
    /// Per node of `token_trie`: the tokens whose bytes end there.
    token_ids: Vec<Vec<u32>>,
    generative: ByteTrie,
    eos: u32,
}

impl GroundingModel {
    /// `pieces[id]` is the tokenizer's piece for token `id` (`None` when it has none; an empty
    /// piece counts as none); `special` lists the special tokens.
    pub fn new(pieces: &[Option<String>], special: &[u32], eos: u32, rules: Arc<WordRules>) -> Self {
        let tokens: Vec<Option<Box<[u8]>>> = pieces
            .iter()
            .enumerate()
            .map(|(id, piece)| {
                let never = special.contains(&(id as u32)) || id as u32 == eos;
                piece.as_deref().filter(|p| !never && !p.is_empty()).map(|p| piece_bytes(p).into_boxed_slice())
            })
            .collect();
        let mut token_trie = ByteTrie::new(std::iter::empty());
        let mut token_ids = vec![Vec::new()];
        for (id, bytes) in tokens.iter().enumerate() {
            if let Some(bytes) = bytes {
                let node = bytes.iter().fold(ROOT, |node, &b| token_trie.child_or_insert(node, b)) as usize;
                token_ids.resize_with(token_trie.children.len(), Vec::new);
                token_ids[node].push(id as u32);
            }
        }
        token_ids.resize_with(token_trie.children.len(), Vec::new);
        let generative = match &rules.vocabulary {
            Some(v) => ByteTrie::new(v.generative()),
            None => ByteTrie::new(std::iter::empty()),
        };
        Self { rules, tokens, token_trie, token_ids, generative, eos }
    }

    pub fn rules(&self) -> &Arc<WordRules> {
        &self.rules
    }

    /// The per-request automaton: the query's words (and fuzzy matches) become a trie.
    pub fn for_query(self: &Arc<Self>, query: &str) -> Grounding {
        let words = self.rules.context(query).words;
        Grounding { query: ByteTrie::new(words.iter().map(Vec::as_slice)), model: Arc::clone(self) }
    }
}

/// One request's automaton; cheap to consult, shared by every row of the search.
#[derive(Debug)]
pub struct Grounding {
    model: Arc<GroundingModel>,
    query: ByteTrie,
}

impl Grounding {
    fn may_end(&self, s: WordState) -> bool {
        s.between_words() || self.model.generative.is_end(s.generative) || self.query.is_end(s.query)
    }

    /// The state after one byte, or `None` when the byte breaks the rule.
    fn step(&self, s: WordState, byte: u8) -> Option<WordState> {
        if is_ascii_space(byte) || byte == b'|' {
            return self.may_end(s).then_some(WordState::START);
        }
        let b = byte.to_ascii_lowercase();
        let next =
            WordState { generative: self.model.generative.child(s.generative, b), query: self.query.child(s.query, b) };
        (next.generative != NONE || next.query != NONE).then_some(next)
    }

    /// The state after `token`, or `None` when the token is not allowed in state `s`.
    pub fn after(&self, s: WordState, token: u32) -> Option<WordState> {
        if token == self.model.eos {
            return self.may_end(s).then_some(s);
        }
        let bytes = self.model.tokens.get(token as usize)?.as_deref()?;
        bytes.iter().try_fold(s, |s, &b| self.step(s, b))
    }

    pub fn allows(&self, s: WordState, token: u32) -> bool {
        self.after(s, token).is_some()
    }

    /// Every token allowed in state `s` (end-of-sequence included when the word may end), in no
    /// particular order: a walk of the token trie that leaves every branch the rule closes.
    pub fn allowed(&self, s: WordState, out: &mut Vec<u32>) {
        out.clear();
        if self.may_end(s) {
            out.push(self.model.eos);
        }
        let trie = &self.model.token_trie;
        let mut stack = vec![(ROOT, s)];
        while let Some((node, state)) = stack.pop() {
            out.extend_from_slice(&self.model.token_ids[node as usize]);
            for &(byte, child) in &trie.children[node as usize] {
                if let Some(next) = self.step(state, byte) {
                    stack.push((child, next));
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::Value;

    use super::*;

    fn golden() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/grounding.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// The golden file's toy vocabulary under its rules (end-of-sequence is id 1).
    pub(crate) fn toy_model() -> (Arc<GroundingModel>, Vec<String>) {
        let g = golden();
        let rules = Arc::new(WordRules::parse(&g["rules"].to_string()).unwrap());
        let t = &g["tokens"];
        let pieces: Vec<String> = t["pieces"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().into()).collect();
        let special: Vec<u32> = t["special"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let eos = t["eos"].as_u64().unwrap() as u32;
        let with_ids: Vec<Option<String>> = pieces.iter().cloned().map(Some).collect();
        (Arc::new(GroundingModel::new(&with_ids, &special, eos, rules)), pieces)
    }

    #[test]
    fn golden_token_steps() {
        let (model, pieces) = toy_model();
        let id = |p: &str| pieces.iter().position(|x| x == p).unwrap_or_else(|| panic!("{p:?} not a piece")) as u32;
        for case in golden()["tokens"]["cases"].as_array().unwrap() {
            let query = case["query"].as_str().unwrap();
            let g = model.for_query(query);
            let mut state = WordState::START;
            let mut written = String::new();
            for step in case["steps"].as_array().unwrap() {
                let (piece, expected) = (step[0].as_str().unwrap(), step[1].as_bool().unwrap());
                let next = g.after(state, id(piece));
                assert_eq!(next.is_some(), expected, "{query:?}: after {written:?}, {piece:?}");
                // The list of allowed tokens says the same as the single check.
                let mut allowed = Vec::new();
                g.allowed(state, &mut allowed);
                assert_eq!(allowed.contains(&id(piece)), expected, "{query:?}: after {written:?}, {piece:?} listed");
                if let Some(next) = next {
                    state = next;
                    written.push_str(piece);
                }
            }
        }
    }

    #[test]
    fn allowed_lists_exactly_the_tokens_that_pass_one_by_one() {
        let (model, pieces) = toy_model();
        let g = &model.for_query("How long did Nikola Tesla live?");
        let mut states = vec![WordState::START];
        // Every state reachable in two tokens.
        for _ in 0..2 {
            let next: Vec<WordState> =
                states.iter().flat_map(|&s| (0..pieces.len() as u32).filter_map(move |t| g.after(s, t))).collect();
            states.extend(next);
        }
        for s in states {
            let mut listed = Vec::new();
            g.allowed(s, &mut listed);
            listed.sort_unstable();
            let one_by_one: Vec<u32> = (0..pieces.len() as u32).filter(|&t| g.allows(s, t)).collect();
            assert_eq!(listed, one_by_one, "state {s:?}");
        }
    }

    #[test]
    fn pieces_become_bytes() {
        assert_eq!(piece_bytes("<0xC3>"), vec![0xC3]);
        assert_eq!(piece_bytes("▁Tes"), b" Tes".to_vec());
        assert_eq!(piece_bytes("<0xZZ>"), b"<0xZZ>".to_vec());
        assert_eq!(piece_bytes("la"), b"la".to_vec());
    }

    #[test]
    fn ids_without_a_piece_or_past_the_table_are_never_allowed() {
        let rules =
            Arc::new(WordRules::parse(r#"{"version": 1, "generative_words": ["a"], "known_words": []}"#).unwrap());
        let pieces = [None, Some("</s>".into()), Some("a".into()), Some(String::new())];
        let model = Arc::new(GroundingModel::new(&pieces, &[1], 1, rules));
        let g = model.for_query("q");
        assert!(!g.allows(WordState::START, 0));
        assert!(!g.allows(WordState::START, 3), "an empty piece is no piece");
        assert!(!g.allows(WordState::START, 99));
        assert!(g.allows(WordState::START, 2) && g.allows(WordState::START, 1));
    }
}
