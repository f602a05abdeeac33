//! Start-up failures: a bad model directory or ONNX Runtime library is one clear error,
//! from `serve` and from the binary (non-zero exit, no panic).

mod common;

use std::{path::Path, process::Command, time::Duration};

use qserver::{serve, ServerError};
use tokio::net::TcpListener;

async fn serve_error(extra: &[&str]) -> ServerError {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = serve(common::config(extra), listener, std::future::pending());
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("serve must fail fast")
        .expect_err("serve must fail")
}

/// The model's files without `skip`.
fn temp_model_copy(name: &str, skip: &str) -> std::path::PathBuf {
    let dir = common::model_files_copy(&format!("startup-{name}"));
    std::fs::remove_file(dir.join(skip)).unwrap();
    dir
}

#[tokio::test]
async fn missing_model_dir_is_named() {
    let err = serve_error(&["--model", "/nonexistent/qreformulate-model"]).await;
    assert!(matches!(err, ServerError::Model(_)), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/qreformulate-model"), "{err}");
}

#[tokio::test]
async fn missing_model_file_is_named() {
    let dir = temp_model_copy("missing", "decoder_with_past_model.onnx");
    let err = serve_error(&["--model", dir.to_str().unwrap()]).await;
    let msg = err.to_string();
    assert!(msg.contains("decoder_with_past_model.onnx") && msg.contains("missing"), "{msg}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn corrupt_onnx_file_fails_serve_with_the_file_name() {
    let dir = temp_model_copy("corrupt", "encoder_model.onnx");
    std::fs::write(dir.join("encoder_model.onnx"), b"not an onnx model").unwrap();
    let err = serve_error(&["--model", dir.to_str().unwrap(), "--workers", "1"]).await;
    assert!(err.to_string().contains("encoder_model.onnx"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn damaged_onnx_decoder_fails_start_up_even_when_the_native_decoder_runs_the_steps() {
    let dir = temp_model_copy("native-onnx", "decoder_with_past_model.onnx");
    // The checkpoint makes `--decoder auto` choose the native decoder.
    std::os::unix::fs::symlink(common::model_dir().join("pytorch"), dir.join("pytorch")).unwrap();
    std::fs::write(dir.join("decoder_with_past_model.onnx"), b"not an onnx model").unwrap();
    let err = serve_error(&["--model", dir.to_str().unwrap(), "--workers", "1"]).await;
    assert!(err.to_string().contains("decoder_with_past_model.onnx"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

fn qserver(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qserver"))
        .args(args)
        .env_remove("ORT_DYLIB_PATH")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run qserver")
}

#[test]
fn binary_reports_a_missing_runtime_in_one_line() {
    let out = qserver(&["--listen", "127.0.0.1:0", "--ort-dylib", "/nonexistent/libonnxruntime.so.1.31.1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("qserver: ") && last.contains("/nonexistent/libonnxruntime.so.1.31.1"), "{stderr}");
    assert!(last.contains("make runtime") && last.contains("--ort-dylib"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn binary_reports_a_missing_model_and_exits_non_zero() {
    let model = common::model_dir();
    assert!(Path::new(&model).is_dir(), "test model missing at {}", model.display());
    let out = qserver(&["--listen", "127.0.0.1:0", "--model", "/nonexistent/model-dir"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().last().unwrap_or_default().contains("/nonexistent/model-dir"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn binary_help_documents_every_flag() {
    let out = qserver(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--model",
        "--ort-dylib",
        "--workers",
        "--intra-op-threads",
        "--max-concurrent-requests",
        "--max-query-chars",
        "--max-input-tokens",
        "--default-max-new-tokens",
        "--max-new-tokens-limit",
        "--cache-capacity",
        "--grace-period-secs",
        "--log-format",
        "--log-level",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn binary_exits_1_not_a_signal_when_workers_fail_to_load() {
    use std::os::unix::process::ExitStatusExt;
    // An encoder file that is a valid ONNX graph of the wrong kind: every worker fails while
    // the others are still inside ONNX Runtime. The process used to die with SIGSEGV.
    let dir = common::model_files_copy("startup-wrong-graph");
    std::fs::copy(dir.join("decoder_model.onnx"), dir.join("encoder_model.onnx")).unwrap();
    for attempt in 0..5 {
        let out = qserver(&["--listen", "127.0.0.1:0", "--model", dir.to_str().unwrap(), "--workers", "8"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), None, "attempt {attempt}: killed by a signal: {stderr}");
        assert_eq!(out.status.code(), Some(1), "attempt {attempt}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("qserver: ") && last.contains("encoder_model.onnx"), "attempt {attempt}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
