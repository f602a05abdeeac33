//! The on-disk model: Hugging Face Optimum's T5 ONNX layout (`optimum-cli export onnx --task
//! text2text-generation-with-past`). Checked up front so a bad `--model` fails fast with the
//! name of what is missing.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use qreformulate::grounding::{WordRules, GROUNDING_FILE};
use serde_json::Value;

pub const ENCODER_FILE: &str = "encoder_model.onnx";
pub const DECODER_FILE: &str = "decoder_model.onnx";
pub const DECODER_WITH_PAST_FILE: &str = "decoder_with_past_model.onnx";
pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Where the PyTorch checkpoint sits (the native decoder's weights), first match wins.
pub const CHECKPOINT_FILES: [&str; 2] = ["pytorch/model.safetensors", "model.safetensors"];

/// The files the engine needs; `decoder_model_merged.onnx`, if present, is ignored.
const REQUIRED: [&str; 5] = [ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE, CONFIG_FILE, TOKENIZER_FILE];

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {0} does not exist (pass --model DIR)")]
    DirNotFound(PathBuf),
    #[error("model path {0} is not a directory (pass --model DIR)")]
    NotADirectory(PathBuf),
    #[error("model file {0} is missing (a model directory needs {files})", files = REQUIRED.join(", "))]
    MissingFile(PathBuf),
    #[error(
        "--decoder native needs the model's PyTorch checkpoint at {0} (or model.safetensors beside the \
         ONNX files); use --decoder auto or onnx to decode with ONNX Runtime"
    )]
    MissingCheckpoint(PathBuf),
    #[error("model file {file} is malformed: {reason}")]
    Malformed { file: PathBuf, reason: String },
    #[error("cannot load {file}: {reason}")]
    Load { file: PathBuf, reason: String },
    #[error("warm-up generation failed: {0}")]
    WarmUp(String),
}

/// The parts of `config.json` (a `T5Config`) the decode loop needs.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub d_kv: usize,
    pub d_model: usize,
    pub vocab_size: usize,
    pub decoder_start_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

/// The parts of `generation_config.json` that change decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    /// Exponent of the length normalisation in beam search (Hugging Face default 1.0).
    pub length_penalty: f64,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self { length_penalty: 1.0 }
    }
}

/// A checked model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    pub model_id: String,
    pub config: T5Config,
    pub generation: GenerationDefaults,
    /// The word rules of `grounding.json`, when the model ships one (else decoding is
    /// unconstrained and the guards use their defaults).
    pub grounding: Option<Arc<WordRules>>,
    /// The PyTorch checkpoint (safetensors), when the model ships one.
    pub checkpoint: Option<PathBuf>,
    /// All of `config.json`: the native decoder reads more fields than [`T5Config`] holds.
    pub config_json: Value,
}

impl ModelDir {
    /// Checks that `root` holds every required file and that the configs parse.
    pub fn open(root: &Path) -> Result<Self, ModelError> {
        if !root.exists() {
            return Err(ModelError::DirNotFound(root.to_path_buf()));
        }
        if !root.is_dir() {
            return Err(ModelError::NotADirectory(root.to_path_buf()));
        }
        for name in REQUIRED {
            let path = root.join(name);
            if !path.is_file() {
                return Err(ModelError::MissingFile(path));
            }
        }
        let config_path = root.join(CONFIG_FILE);
        let config_json = read_json(&config_path)?;
        let config = parse_t5_config(&config_path, &config_json)?;
        let generation_path = root.join(GENERATION_CONFIG_FILE);
        let generation = if generation_path.is_file() {
            parse_generation_config(&generation_path)?
        } else {
            GenerationDefaults::default()
        };
        let canonical = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        let model_id = canonical
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| canonical.display().to_string());
        let grounding = read_grounding(&root.join(GROUNDING_FILE))?;
        let checkpoint = CHECKPOINT_FILES.iter().map(|f| root.join(f)).find(|p| p.is_file());
        Ok(Self { root: root.to_path_buf(), model_id, config, generation, grounding, checkpoint, config_json })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// `None` when the file is absent; a file that is there must be valid.
fn read_grounding(path: &Path) -> Result<Option<Arc<WordRules>>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Load { file: path.to_path_buf(), reason: e.to_string() })?;
    let rules = WordRules::parse(&text)
        .map_err(|e| ModelError::Malformed { file: path.to_path_buf(), reason: e.to_string() })?;
    Ok(Some(Arc::new(rules)))
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Load { file: path.to_path_buf(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Malformed { file: path.to_path_buf(), reason: e.to_string() })
}

/// A non-negative integer field, or the first element of a list of them (Hugging Face
/// allows `eos_token_id: [1, ...]`).
fn uint_field(json: &Value, key: &str) -> Option<u64> {
    match json.get(key)? {
        Value::Array(items) => items.first().and_then(Value::as_u64),
        v => v.as_u64(),
    }
}

fn parse_t5_config(path: &Path, json: &Value) -> Result<T5Config, ModelError> {
    let malformed = |reason: String| ModelError::Malformed { file: path.to_path_buf(), reason };
    let required = |key: &str| -> Result<usize, ModelError> {
        let v = uint_field(json, key).ok_or_else(|| malformed(format!("missing or non-integer field `{key}`")))?;
        usize::try_from(v).map_err(|_| malformed(format!("field `{key}` is out of range")))
    };
    let num_layers = required("num_layers")?;
    let num_heads = required("num_heads")?;
    let d_kv = required("d_kv")?;
    let d_model = required("d_model")?;
    let vocab_size = required("vocab_size")?;
    if num_heads == 0 || d_kv == 0 || vocab_size == 0 {
        return Err(malformed("num_heads, d_kv and vocab_size must be positive".into()));
    }
    let num_decoder_layers = uint_field(json, "num_decoder_layers").map_or(num_layers, |v| v as usize);
    let token = |key: &str, default: u32| -> Result<u32, ModelError> {
        match uint_field(json, key) {
            None => Ok(default),
            Some(v) => u32::try_from(v).map_err(|_| malformed(format!("field `{key}` is out of range"))),
        }
    };
    let pad_token_id = token("pad_token_id", 0)?;
    Ok(T5Config {
        num_layers,
        num_decoder_layers,
        num_heads,
        d_kv,
        d_model,
        vocab_size,
        // T5 starts decoding from the pad token unless told otherwise.
        decoder_start_token_id: token("decoder_start_token_id", pad_token_id)?,
        eos_token_id: token("eos_token_id", 1)?,
        pad_token_id,
    })
}

fn parse_generation_config(path: &Path) -> Result<GenerationDefaults, ModelError> {
    let json = read_json(path)?;
    let length_penalty = match json.get("length_penalty") {
        None | Some(Value::Null) => 1.0,
        Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| ModelError::Malformed {
            file: path.to_path_buf(),
            reason: "`length_penalty` is not a finite number".into(),
        })?,
    };
    Ok(GenerationDefaults { length_penalty })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qserver-model-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_all(dir: &Path, config: &str) {
        for f in [ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE, TOKENIZER_FILE] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
    }

    const CONFIG: &str = r#"{"num_layers": 2, "num_heads": 6, "d_kv": 64, "d_model": 256,
        "vocab_size": 8000, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}"#;

    #[test]
    fn missing_directory_is_named() {
        let err = ModelDir::open(Path::new("/nonexistent/qreformulate-model")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/qreformulate-model"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let dir = temp_dir("missing");
        write_all(&dir, CONFIG);
        std::fs::remove_file(dir.join(DECODER_WITH_PAST_FILE)).unwrap();
        let err = ModelDir::open(&dir).unwrap_err();
        assert!(matches!(err, ModelError::MissingFile(ref p) if p.ends_with(DECODER_WITH_PAST_FILE)), "{err}");
        assert!(err.to_string().contains(DECODER_WITH_PAST_FILE));
    }

    #[test]
    fn parses_config_with_defaults() {
        let dir = temp_dir("ok");
        write_all(&dir, CONFIG);
        let m = ModelDir::open(&dir).unwrap();
        assert_eq!(m.config.num_heads, 6);
        assert_eq!(m.config.d_kv, 64);
        assert_eq!(m.config.num_decoder_layers, 2); // falls back to num_layers
        assert_eq!(m.config.eos_token_id, 1);
        assert_eq!(m.generation.length_penalty, 1.0);
        assert!(m.model_id.starts_with("qserver-model-dir-ok"));
    }

    #[test]
    fn finds_the_checkpoint_where_the_layouts_put_it() {
        let dir = temp_dir("checkpoint");
        write_all(&dir, CONFIG);
        assert_eq!(ModelDir::open(&dir).unwrap().checkpoint, None);
        std::fs::write(dir.join("model.safetensors"), b"x").unwrap();
        assert_eq!(ModelDir::open(&dir).unwrap().checkpoint, Some(dir.join("model.safetensors")));
        // The shipped layout (pytorch/) wins over a file at the top.
        std::fs::create_dir_all(dir.join("pytorch")).unwrap();
        std::fs::write(dir.join("pytorch/model.safetensors"), b"x").unwrap();
        assert_eq!(ModelDir::open(&dir).unwrap().checkpoint, Some(dir.join("pytorch/model.safetensors")));
    }

    #[test]
    fn eos_list_and_generation_config() {
        let dir = temp_dir("lists");
        write_all(&dir, &CONFIG.replace(r#""eos_token_id": 1"#, r#""eos_token_id": [1, 5]"#));
        std::fs::write(dir.join(GENERATION_CONFIG_FILE), r#"{"length_penalty": 0.6}"#).unwrap();
        let m = ModelDir::open(&dir).unwrap();
        assert_eq!(m.config.eos_token_id, 1);
        assert_eq!(m.generation.length_penalty, 0.6);
    }

    #[test]
    fn grounding_file_is_optional_but_checked() {
        let dir = temp_dir("grounding");
        write_all(&dir, CONFIG);
        assert!(ModelDir::open(&dir).unwrap().grounding.is_none());
        let file = dir.join(GROUNDING_FILE);
        std::fs::write(&file, r#"{"version": 1, "generative_words": ["birth"], "known_words": ["tesla"]}"#).unwrap();
        let rules = ModelDir::open(&dir).unwrap().grounding.expect("grounding.json read");
        assert_eq!(rules.vocabulary.as_ref().map(|v| (v.generative_count(), v.known_count())), Some((1, 1)));
        std::fs::write(&file, r#"{"version": 7}"#).unwrap();
        let err = ModelDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains(GROUNDING_FILE) && err.contains("version 7"), "{err}");
    }

    #[test]
    fn malformed_config_names_file_and_field() {
        let dir = temp_dir("bad");
        write_all(&dir, r#"{"num_layers": 2}"#);
        let err = ModelDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains(CONFIG_FILE) && err.contains("num_heads"), "{err}");
        write_all(&dir, "not json");
        let err = ModelDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains("malformed"), "{err}");
    }
}
