//! Text into subqueries: the parts of a `|`-joined text. The service answers with
//! [`crate::guards::sanitize`], which starts from [`parts`]; [`split`] is the plain rule of
//! unguarded answers (`GenerationOptions.unguarded`) and of labelled data.

/// The `|`-separated parts of `text`, whitespace collapsed, empty parts dropped.
pub fn parts(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split('|').map(collapse_whitespace).filter(|part| !part.is_empty())
}

/// The plain split: [`parts`] without case-insensitive duplicates (the first wins). Never
/// empty: falls back to the trimmed `query` itself.
pub fn split(text: &str, query: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen: Vec<String> = Vec::new(); // lowercased; lists are a handful long
    for part in parts(text) {
        let key = part.to_lowercase();
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        out.push(part);
    }
    if out.is_empty() {
        out.push(query.trim().to_string());
    }
    out
}

/// Whitespace as Python's `str.isspace` / `re` `\s` see it (the training pipeline's rule):
/// Unicode `White_Space` plus the ASCII separators U+001C..U+001F.
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Trims and collapses every run of whitespace to a single space.
pub fn collapse_whitespace(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split(is_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_trims_and_keeps_order() {
        assert_eq!(
            split(" Nikola Tesla lifespan |Milutin  Milankovic\tlifespan ", "q"),
            vec!["Nikola Tesla lifespan", "Milutin Milankovic lifespan"]
        );
    }

    #[test]
    fn drops_empty_parts() {
        assert_eq!(split("a|| |b|", "q"), vec!["a", "b"]);
    }

    #[test]
    fn deduplicates_case_insensitively_keeping_first() {
        assert_eq!(split("Paris population|paris  POPULATION|Rome", "q"), vec!["Paris population", "Rome"]);
    }

    #[test]
    fn falls_back_to_trimmed_query() {
        assert_eq!(split(" | |", "  who is it? "), vec!["who is it?"]);
        assert_eq!(split("", "q"), vec!["q"]);
    }

    #[test]
    fn single_subquery_without_separator() {
        assert_eq!(split("capital of France", "q"), vec!["capital of France"]);
    }

    #[test]
    fn collapse_whitespace_handles_unicode_spaces() {
        assert_eq!(collapse_whitespace("\u{00a0} a \n\n b\u{2003}"), "a b");
        assert_eq!(collapse_whitespace("a\u{1f}b"), "a b");
    }

    proptest::proptest! {
        #[test]
        fn split_is_never_empty_and_holds_clean_distinct_parts(
            text in "[ a-cA-C|\\t\\n\\u{3000}é]{0,40}",
            query in "[ a-z]{0,10}",
        ) {
            let out = split(&text, &query);
            proptest::prop_assert!(!out.is_empty());
            let parts: Vec<String> = parts(&text).collect();
            if parts.is_empty() {
                proptest::prop_assert_eq!(out, vec![query.trim().to_string()]);
            } else {
                let mut seen = std::collections::HashSet::new();
                for p in &out {
                    proptest::prop_assert!(!p.is_empty() && !p.contains('|'), "{:?}", out);
                    proptest::prop_assert_eq!(&collapse_whitespace(p), p);
                    proptest::prop_assert!(parts.contains(p));
                    proptest::prop_assert!(seen.insert(p.to_lowercase()), "duplicate {:?} in {:?}", p, out);
                }
            }
        }

        #[test]
        fn collapse_whitespace_is_idempotent(s in "[ a\\t\\n\\u{a0}\\u{1c}\\u{2028}é]{0,30}") {
            let once = collapse_whitespace(&s);
            proptest::prop_assert_eq!(collapse_whitespace(&once), once.clone());
            proptest::prop_assert!(!once.chars().any(|c| is_space(c) && c != ' '));
            proptest::prop_assert!(!once.starts_with(' ') && !once.ends_with(' ') && !once.contains("  "));
        }
    }
}
