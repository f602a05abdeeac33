//! Reading query files: JSONL (objects with a `"query"` field) or plain text (one query per
//! line), and labelled JSONL for `eval` (`{"query", "subqueries", "kind"}`). Blank lines are
//! skipped; a malformed line is an error that names its (1-based) line number.

use std::path::Path;

use qreformulate::subqueries::collapse_whitespace;
use serde_json::Value;

use crate::error::ClientError;

/// A malformed line: `line N: what is wrong`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct DatasetError {
    pub line: usize,
    pub message: String,
}

impl DatasetError {
    fn new(line: usize, message: impl Into<String>) -> Self {
        DatasetError { line, message: message.into() }
    }
}

/// One labelled example for `eval`.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledExample {
    pub query: String,
    pub subqueries: Vec<String>,
    /// Empty when the line has no kind.
    pub kind: String,
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|source| ClientError::ReadFile { path: path.to_path_buf(), source })
}

/// Queries of a JSONL or plain-text file, in order.
pub fn load_queries(path: &Path) -> Result<Vec<String>, ClientError> {
    parse_queries(&read_file(path)?)
        .map_err(|source| ClientError::Dataset { origin: path.display().to_string(), source })
}

/// Labelled examples of a JSONL file, in order.
pub fn load_labelled(path: &Path) -> Result<Vec<LabelledExample>, ClientError> {
    parse_labelled(&read_file(path)?)
        .map_err(|source| ClientError::Dataset { origin: path.display().to_string(), source })
}

/// Every query of `text`; blank lines skipped.
pub fn parse_queries(text: &str) -> Result<Vec<String>, DatasetError> {
    let mut queries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if let Some(query) = parse_query_line(line, index + 1)? {
            queries.push(query);
        }
    }
    Ok(queries)
}

/// One line of a query file: `None` for a blank line, the `"query"` field of a JSON
/// object, or else the trimmed line itself.
pub fn parse_query_line(line: &str, line_no: usize) -> Result<Option<String>, DatasetError> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if !trimmed.starts_with('{') {
        return Ok(Some(trimmed.to_string()));
    }
    let object = parse_object(trimmed, line_no)?;
    query_field(&object, line_no).map(Some)
}

/// Every labelled example of `text`; blank lines skipped.
pub fn parse_labelled(text: &str) -> Result<Vec<LabelledExample>, DatasetError> {
    let mut examples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let object = parse_object(trimmed, line_no)?;
        let query = query_field(&object, line_no)?;
        let subqueries = match object.get("subqueries") {
            Some(Value::String(joined)) => split_subqueries(joined),
            Some(Value::Array(items)) => {
                let mut parts = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => parts.push(collapse_whitespace(s)),
                        other => {
                            return Err(DatasetError::new(
                                line_no,
                                format!("\"subqueries\" must hold strings, found {}", type_name(other)),
                            ))
                        }
                    }
                }
                parts.retain(|p| !p.is_empty());
                parts
            }
            Some(other) => {
                return Err(DatasetError::new(
                    line_no,
                    format!(
                        "\"subqueries\" must be a '|'-joined string or a list of strings, found {}",
                        type_name(other)
                    ),
                ))
            }
            None => return Err(DatasetError::new(line_no, "missing \"subqueries\" field")),
        };
        if subqueries.is_empty() {
            return Err(DatasetError::new(line_no, "\"subqueries\" is empty"));
        }
        let kind = match object.get("kind") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(kind)) => kind.trim().to_string(),
            Some(other) => {
                return Err(DatasetError::new(
                    line_no,
                    format!("\"kind\" must be a string, found {}", type_name(other)),
                ))
            }
        };
        examples.push(LabelledExample { query, subqueries, kind });
    }
    Ok(examples)
}

/// The corpus format, split by the plain rule (`qreformulate::subqueries::split`: trimmed,
/// whitespace collapsed, duplicates dropped; what the server answers to an unguarded request);
/// empty when there is no non-blank part.
pub fn split_subqueries(joined: &str) -> Vec<String> {
    qreformulate::subqueries::split(joined, "").into_iter().filter(|part| !part.is_empty()).collect()
}

fn parse_object(line: &str, line_no: usize) -> Result<serde_json::Map<String, Value>, DatasetError> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(DatasetError::new(line_no, format!("expected a JSON object, found {}", type_name(&other)))),
        Err(e) => {
            // serde_json appends "at line 1 column N"; every line is line 1 to it.
            let text = e.to_string();
            let reason = text.rfind(" at line ").map_or(text.as_str(), |i| &text[..i]);
            Err(DatasetError::new(line_no, format!("invalid JSON: {reason} (column {})", e.column())))
        }
    }
}

fn query_field(object: &serde_json::Map<String, Value>, line_no: usize) -> Result<String, DatasetError> {
    match object.get("query") {
        Some(Value::String(query)) if !query.trim().is_empty() => Ok(query.trim().to_string()),
        Some(Value::String(_)) => Err(DatasetError::new(line_no, "\"query\" is empty")),
        Some(other) => {
            Err(DatasetError::new(line_no, format!("\"query\" must be a string, found {}", type_name(other))))
        }
        None => Err(DatasetError::new(line_no, "missing \"query\" field")),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_queries_are_read_in_order_and_blank_lines_skipped() {
        let text = "{\"query\": \"Who lived longer, Nikola Tesla or Milutin Milankovic?\", \"kind\": \"comparison\"}\n\n   \n{\"query\":\"  padded  \"}\n";
        assert_eq!(
            parse_queries(text).unwrap(),
            vec!["Who lived longer, Nikola Tesla or Milutin Milankovic?".to_string(), "padded".to_string()]
        );
    }

    #[test]
    fn plain_text_lines_are_queries() {
        let text = "first query\r\nsecond | not split\n\nthird\n";
        assert_eq!(parse_queries(text).unwrap(), vec!["first query", "second | not split", "third"]);
    }

    #[test]
    fn jsonl_and_plain_text_can_mix() {
        let text = "plain one\n{\"query\": \"json two\"}\n";
        assert_eq!(parse_queries(text).unwrap(), vec!["plain one", "json two"]);
    }

    #[test]
    fn bad_json_names_the_line() {
        let text = "{\"query\": \"ok\"}\n\n{\"query\": \"broken\"\n";
        let err = parse_queries(text).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.to_string().starts_with("line 3: invalid JSON: EOF while parsing an object (column "), "{err}");
    }

    #[test]
    fn missing_or_wrong_query_field_names_the_line() {
        assert_eq!(parse_queries("{\"q\": \"x\"}").unwrap_err(), DatasetError::new(1, "missing \"query\" field"));
        assert_eq!(
            parse_queries("a\n{\"query\": 3}").unwrap_err(),
            DatasetError::new(2, "\"query\" must be a string, found a number")
        );
        assert_eq!(parse_queries("{\"query\": \"  \"}").unwrap_err(), DatasetError::new(1, "\"query\" is empty"));
    }

    #[test]
    fn labelled_subqueries_as_string_or_list() {
        let text = concat!(
            "{\"query\": \"Who lived longer, Nikola Tesla or Milutin Milankovic?\", ",
            "\"subqueries\": \"Nikola Tesla lifespan | Milutin Milankovic lifespan\", \"kind\": \"comparison\"}\n",
            "\n",
            "{\"query\": \"q2\", \"subqueries\": [\" a \", \"b\"]}\n",
        );
        let examples = parse_labelled(text).unwrap();
        assert_eq!(
            examples,
            vec![
                LabelledExample {
                    query: "Who lived longer, Nikola Tesla or Milutin Milankovic?".into(),
                    subqueries: vec!["Nikola Tesla lifespan".into(), "Milutin Milankovic lifespan".into()],
                    kind: "comparison".into(),
                },
                LabelledExample { query: "q2".into(), subqueries: vec!["a".into(), "b".into()], kind: String::new() },
            ]
        );
    }

    #[test]
    fn labelled_errors_name_the_line() {
        let cases = [
            ("{\"query\": \"q\"}", 1, "missing \"subqueries\" field"),
            (
                "\n{\"query\": \"q\", \"subqueries\": 5}",
                2,
                "\"subqueries\" must be a '|'-joined string or a list of strings, found a number",
            ),
            ("{\"query\": \"q\", \"subqueries\": [\"a\", 1]}", 1, "\"subqueries\" must hold strings, found a number"),
            ("{\"query\": \"q\", \"subqueries\": \" | \"}", 1, "\"subqueries\" is empty"),
            ("{\"query\": \"q\", \"subqueries\": \"a\", \"kind\": 2}", 1, "\"kind\" must be a string, found a number"),
            ("plain text", 1, ""),
            ("[1, 2]", 1, "expected a JSON object, found a list"),
        ];
        for (text, line, message) in cases {
            let err = parse_labelled(text).unwrap_err();
            assert_eq!(err.line, line, "{text}");
            if !message.is_empty() {
                assert_eq!(err.message, message, "{text}");
            }
        }
    }

    #[test]
    fn split_trims_and_drops_empty_parts() {
        assert_eq!(split_subqueries(" a |b||  c  d "), vec!["a", "b", "c d"]);
        assert!(split_subqueries("").is_empty());
    }

    #[test]
    fn load_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "{\"query\": \"ok\"}\n{oops}\n").unwrap();
        let err = load_queries(&path).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl: line 2: invalid JSON"), "{err}");
        let missing = load_queries(&dir.path().join("missing.jsonl")).unwrap_err().to_string();
        assert!(missing.starts_with("cannot read "), "{missing}");
    }
}
