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
}
