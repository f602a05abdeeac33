//! Draft tokens by prompt lookup: a reformulation mostly copies words of its query and repeats
//! its own attributes ("Nikola Tesla Lifespan | Milutin Milankovic Lifespan"), so the tokens
//! that followed the answer's last tokens where they occurred before are a good guess at what
//! comes next. The decoder checks a guess in the same step as the token before it
//! ([`super::steps::Decoding::feed`]); a wrong guess costs a row of that step, never a different
//! answer. (Hugging Face's `prompt_lookup_num_tokens` and llama.cpp's lookup decoding work the
//! same way.)

/// Longest suffix of the answer looked up.
const MAX_NGRAM: usize = 2;

/// Appends to `out` up to `max` tokens guessed to follow `generated`: for the longest suffix of
/// `generated` (up to [`MAX_NGRAM`] tokens) found earlier in `generated` (latest first) or in
/// `source` (first first), the tokens that followed it there. Nothing when no suffix is found.
pub fn draft(source: &[u32], generated: &[u32], max: usize, out: &mut Vec<i64>) {
    if max == 0 {
        return;
    }
    for n in (1..=MAX_NGRAM.min(generated.len())).rev() {
        let suffix = &generated[generated.len() - n..];
        // In the answer itself, before the suffix's own occurrence, the latest first.
        let earlier = &generated[..generated.len() - 1];
        let in_answer = (0..earlier.len().saturating_sub(n - 1)).rev().find(|&s| &earlier[s..s + n] == suffix);
        let (text, at) = match in_answer {
            Some(s) => (generated, s + n),
            None => match source.windows(n).position(|w| w == suffix) {
                Some(s) if s + n < source.len() => (source, s + n),
                _ => continue,
            },
        };
        let end = text.len().min(at + max);
        out.extend(text[at..end].iter().map(|&t| i64::from(t)));
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::draft;

    fn drafted(source: &[u32], generated: &[u32], max: usize) -> Vec<i64> {
        let mut out = Vec::new();
        draft(source, generated, max, &mut out);
        out
    }

    #[test]
    fn the_query_continues_a_copied_word() {
        // Query "a b c d e"; the answer so far "x b": next guesses c, d, e.
        assert_eq!(drafted(&[1, 2, 3, 4, 5], &[9, 2], 3), vec![3, 4, 5]);
        assert_eq!(drafted(&[1, 2, 3, 4, 5], &[9, 2], 2), vec![3, 4]);
        // Near the query's end, fewer than asked.
        assert_eq!(drafted(&[1, 2, 3, 4, 5], &[9, 4], 3), vec![5]);
    }

    #[test]
    fn the_answer_repeats_itself_before_the_query_is_consulted() {
        // "7 8 | 5" after "... 5 8 ..." in the query: the answer's own "7 8" gave "8 |" before.
        let source = [5, 8, 2];
        let generated = [7, 8, 6, 4, 7];
        assert_eq!(drafted(&source, &generated, 2), vec![8, 6]);
    }

    #[test]
    fn a_longer_match_wins_over_a_shorter_one() {
        // Suffix "2 3": in the query it is followed by 4; "3" alone last appeared before 9 in
        // the answer.
        let source = [1, 2, 3, 4];
        let generated = [3, 9, 2, 3];
        assert_eq!(drafted(&source, &generated, 1), vec![4]);
    }

    #[test]
    fn nothing_to_guess() {
        assert!(drafted(&[1, 2, 3], &[], 3).is_empty());
        assert!(drafted(&[1, 2, 3], &[7], 3).is_empty());
        assert!(drafted(&[1, 2, 3], &[2], 0).is_empty());
        // The last query token has nothing after it.
        assert!(drafted(&[1, 2, 3], &[3], 3).is_empty());
    }
}
