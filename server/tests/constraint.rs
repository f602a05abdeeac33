//! The capitalised-word constraint on the real model: with `constraint.json` in the model
//! directory, greedy output only writes capitalised words that the query (or the property
//! list) contains.

mod common;

use std::path::PathBuf;

use qserver::engine::{
    constraint::query_words,
    onnx_t5::{OnnxT5, SessionSettings},
    CancelToken, Engine, GenerateRequest, GenerationParams, ModelDir, SearchKind,
};

fn model_copy_with_constraint() -> PathBuf {
    let dir = common::model_files_copy("constraint-e2e");
    // top_k this wide always holds an allowed token, so the argmax fallback never fires.
    std::fs::write(dir.join("constraint.json"), r#"{"top_k": 2048, "property_words": ["Lifespan", "Birth"]}"#).unwrap();
    dir
}

#[test]
fn greedy_output_only_writes_allowed_capitalised_words() {
    let dir = model_copy_with_constraint();
    let env = qserver::runtime::init(None).unwrap();
    let model = ModelDir::open(&dir).unwrap();
    assert!(model.constraint.is_some());
    let mut engine = OnnxT5::load(&env, &model, &SessionSettings::new(1)).unwrap();
    assert!(engine.constrained());
    for query in
        ["Who lived longer, Nikola Tesla or Milutin Milankovic?", "When was Ada Lovelace born?", "tesla coil inventor"]
    {
        let mut allowed = query_words(query);
        allowed.extend(["Lifespan".to_owned(), "Birth".to_owned()]);
        let req = GenerateRequest {
            query: query.into(),
            params: GenerationParams { max_new_tokens: 24, search: SearchKind::Greedy, ignore_eos: false },
            max_input_tokens: 256,
            truncate: false,
        };
        let text = engine.generate(&req, &CancelToken::new(None)).unwrap().candidates.remove(0).text;
        let words: Vec<&str> = text.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            if !w.chars().next().is_some_and(char::is_uppercase) {
                continue;
            }
            // The last word may be cut by max_new_tokens: then it is a prefix of an allowed one.
            let ok = allowed.contains(*w) || (i + 1 == words.len() && allowed.iter().any(|a| a.starts_with(w)));
            assert!(ok, "{query:?} -> {text:?}: {w:?} is not allowed ({allowed:?})");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
