//! Finds and loads the ONNX Runtime shared library, once per process.
//!
//! `ort` keeps one environment per process (a second `build()` fails), so the first
//! successful initialisation is kept and handed to every later caller.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use ort::environment::Environment;

/// The library file the `api-31` build of `ort` is meant for.
pub const LIBRARY_FILE: &str = "libonnxruntime.so.1.31.1";

/// Where `make runtime` (scripts/fetch-onnxruntime.sh) puts the library.
pub const REPO_LIBRARY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ort/libonnxruntime.so.1.31.1");

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found (tried {tried}); run `make runtime` or pass --ort-dylib PATH")]
    NotFound { tried: String },
    #[error("cannot load ONNX Runtime from {path}: {reason}; run `make runtime` or pass --ort-dylib PATH")]
    Load { path: PathBuf, reason: String },
}

static ENVIRONMENT: Mutex<Option<(Environment, PathBuf)>> = Mutex::new(None);

/// Candidate library paths, in order: the explicit one alone, or next to the executable then
/// the repository's `.ort/`.
pub fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    let mut out = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
        out.push(dir.join(LIBRARY_FILE));
    }
    out.push(PathBuf::from(REPO_LIBRARY));
    out
}

/// Loads the library (first call) and returns the process-wide environment. Later calls
/// return the same environment whatever path they name.
pub fn init(explicit: Option<&Path>) -> Result<Environment, RuntimeError> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((env, loaded)) = slot.as_ref() {
        if let Some(p) = explicit.filter(|p| *p != loaded.as_path()) {
            tracing::warn!(requested = %p.display(), loaded = %loaded.display(), "ONNX Runtime already loaded; keeping it");
        }
        return Ok(env.clone());
    }
    let candidates = candidates(explicit);
    let path = candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| RuntimeError::NotFound {
        tried: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })?;
    let load = |reason: String| RuntimeError::Load { path: path.clone(), reason };
    let env = ort::init_from(&path)
        .map_err(|e| load(e.to_string()))?
        .with_name("qserver")
        .with_telemetry(false)
        .build()
        .map_err(|e| load(e.to_string()))?;
    tracing::info!(path = %path.display(), "ONNX Runtime loaded");
    *slot = Some((env.clone(), path));
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_is_the_only_candidate() {
        assert_eq!(candidates(Some(Path::new("/x/lib.so"))), vec![PathBuf::from("/x/lib.so")]);
    }

    #[test]
    fn default_candidates_end_with_the_repo_library() {
        let c = candidates(None);
        assert_eq!(c.len(), 2);
        assert!(c[0].ends_with(LIBRARY_FILE));
        assert_eq!(c[1], PathBuf::from(REPO_LIBRARY));
    }

    #[test]
    fn missing_explicit_library_is_a_clear_error() {
        // No unit test in this crate loads the runtime, so this reaches the lookup.
        let msg = match init(Some(Path::new("/nonexistent/libonnxruntime.so.1.31.1"))) {
            Ok(_) => panic!("loading a missing library must fail"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("/nonexistent/libonnxruntime.so.1.31.1") && msg.contains("make runtime"), "{msg}");
    }
}
