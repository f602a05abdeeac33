//! Opening ONNX Runtime sessions with the server's settings, and checking the input and output
//! names a session declares: what the encoder (onnx_t5.rs) and the decoder sessions
//! (onnx_decoder.rs) share.

use std::path::{Path, PathBuf};

use ort::{
    environment::Environment,
    session::{
        builder::{GraphOptimizationLevel, SessionBuilder},
        Session,
    },
};

use super::{
    model_dir::{ModelDir, ModelError},
    native::WeightFormat,
    DecoderKind,
};

pub(super) const INPUT_IDS: &str = "input_ids";
pub(super) const ATTENTION_MASK: &str = "attention_mask";
pub(super) const ENCODER_MASK: &str = "encoder_attention_mask";
pub(super) const ENCODER_STATES: &str = "encoder_hidden_states";
pub(super) const LOGITS: &str = "logits";
pub(super) const PAST_PREFIX: &str = "past_key_values.";
pub(super) const PRESENT_PREFIX: &str = "present.";

/// Session settings (from the server configuration).
#[derive(Debug, Clone, Default)]
pub struct SessionSettings {
    pub intra_op_threads: usize,
    /// Who runs the decoder steps: ONNX Runtime, or the native int8 decoder.
    pub decoder: DecoderKind,
    /// How the native decoder stores its step weights (`--native-weights`).
    pub native_weights: WeightFormat,
    /// The native decoder's threads (`intra_op_threads` above 1) busy-wait for each other
    /// between the products of a step: only right when every thread of every worker has a
    /// core of its own (`Waiting` in native/team.rs).
    pub spin_waits: bool,
    /// Draft tokens the native decoder checks per step after a one-row request's next token
    /// (`--draft-tokens`; 0: none).
    pub draft_tokens: usize,
    /// ONNX Runtime's int8 products saturate on CPUs without VNNI, as is its default
    /// (`--saturating-int8`; off: [`EXACT_INT8_PRODUCTS`]).
    pub saturating_int8: bool,
    /// Extra ONNX Runtime session config entries (`key`, `value`), applied after ours; for
    /// experiments (see docs/performance.md and `examples/profile.rs`).
    pub config_entries: Vec<(String, String)>,
    /// ONNX Runtime's memory pattern optimisation (`None`: its default, on).
    pub memory_pattern: Option<bool>,
    /// The CPU memory arena (`None`: ONNX Runtime's default, on).
    pub cpu_arena: Option<bool>,
    /// Writes ONNX Runtime's per-node profile (JSON) for each session, named from this prefix.
    pub profile_prefix: Option<PathBuf>,
}

impl SessionSettings {
    pub fn new(intra_op_threads: usize) -> Self {
        Self { intra_op_threads, ..Self::default() }
    }
}

pub(super) fn load_error(file: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load { file: file.to_path_buf(), reason: e.to_string() }
}

/// ONNX Runtime's switch for exact int8 products on x86 CPUs without VNNI. There its uint8 x
/// int8 kernels add each pair of products into 16 bits with saturation (`vpmaddubsw`), so the
/// same model answered differently on AVX2 and VNNI machines: 83 of the corpus test split's
/// 1335 answers changed on a Zen 3 when it was turned on (docs/performance.md, session 15).
/// With it, ONNX Runtime multiplies such weights as uint8 x uint8, exactly, on every CPU; VNNI
/// machines are unaffected. It costs the Zen 3's encoder about 13-15%.
pub(super) const EXACT_INT8_PRODUCTS: (&str, &str) = ("session.x64quantprecision", "1");

/// Opens `path` with exact int8 products ([`EXACT_INT8_PRODUCTS`]) unless `saturating_int8`,
/// or without them, with a warning, for a file ONNX Runtime cannot convert: 1.31 refuses an
/// int8 weight read by two products ("Attempt to replace the existing tensor";
/// tests/data/shared_int8_weights.onnx).
pub fn open_session(env: &Environment, path: &Path, settings: &SessionSettings) -> Result<Session, ModelError> {
    let open = |exact| builder(env, path, settings, exact)?.commit_from_file(path).map_err(|e| load_error(path, e));
    if settings.saturating_int8 {
        return open(false);
    }
    let exact_error = match open(true) {
        Ok(session) => return Ok(session),
        Err(e) => e,
    };
    let session = open(false)?;
    tracing::warn!(
        file = %path.display(),
        reason = %exact_error,
        "ONNX Runtime cannot give this file exact int8 products: on CPUs without VNNI its answers may differ from other CPUs'"
    );
    Ok(session)
}

fn builder(
    env: &Environment,
    path: &Path,
    settings: &SessionSettings,
    exact: bool,
) -> Result<SessionBuilder, ModelError> {
    let threads = settings.intra_op_threads.max(1);
    let mut builder = Session::builder(env)
        .map_err(|e| load_error(path, e))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| load_error(path, e))?
        .with_intra_threads(threads)
        .map_err(|e| load_error(path, e))?;
    if exact {
        let (key, value) = EXACT_INT8_PRODUCTS;
        builder = builder.with_config_entry(key, value).map_err(|e| load_error(path, e))?;
    }
    if threads > 1 {
        // Spinning intra-op threads steal the CPU from the other workers (see STACK.md).
        builder = builder.with_intra_op_spinning(false).map_err(|e| load_error(path, e))?;
    }
    if let Some(enable) = settings.memory_pattern {
        builder = builder.with_memory_pattern(enable).map_err(|e| load_error(path, e))?;
    }
    if let Some(enable) = settings.cpu_arena {
        builder = builder
            .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(enable).build()])
            .map_err(|e| load_error(path, e))?;
    }
    for (key, value) in &settings.config_entries {
        builder = builder.with_config_entry(key, value).map_err(|e| load_error(path, e))?;
    }
    if let Some(prefix) = &settings.profile_prefix {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("session");
        let mut file = prefix.as_os_str().to_owned();
        file.push(stem);
        builder = builder.with_profiling(PathBuf::from(file)).map_err(|e| load_error(path, e))?;
    }
    Ok(builder)
}

pub(super) fn names(outlets: &[ort::value::Outlet]) -> Vec<String> {
    outlets.iter().map(|o| o.name().to_owned()).collect()
}

pub(super) fn malformed(dir: &ModelDir, file: &str, reason: String) -> ModelError {
    ModelError::Malformed { file: dir.file(file), reason }
}

pub(super) fn has(list: &[String], name: &str) -> bool {
    list.iter().any(|n| n == name)
}

/// Any input we cannot feed is an error (cache inputs only where `allow_past`).
pub(super) fn check_known(
    dir: &ModelDir,
    file: &str,
    list: &[String],
    known: &[&str],
    allow_past: bool,
) -> Result<(), ModelError> {
    for n in list {
        let is_cache_input = allow_past && n.starts_with(PAST_PREFIX);
        if !known.contains(&n.as_str()) && !is_cache_input {
            return Err(malformed(dir, file, format!("unexpected input `{n}`")));
        }
    }
    Ok(())
}
