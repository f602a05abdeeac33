//! The real `qclient` binary without a qserver: generated docs (completions, man page), usage
//! errors, and `health`'s exit codes and `--wait` against a standard gRPC health service
//! (tonic-health, the implementation qserver mounts) whose status the test sets. qserver's
//! own NOT_SERVING window (while loading) is too short to hit reliably; e2e.rs covers SERVING,
//! NOT_FOUND and a closed port against the real server.

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

fn qclient(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qclient"));
    command.args(args).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("QCLIENT_") {
            command.env_remove(name);
        }
    }
    command.output().expect("qclient runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or_else(|| panic!("killed: {output:?}"))
}

const SUBCOMMANDS: [&str; 7] = ["chat", "reformulate", "bench", "eval", "health", "completions", "man"];

#[test]
fn completions_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let output = qclient(&["completions", shell]);
        assert_eq!(code(&output), 0, "{shell}: {}", text(&output.stderr));
        let script = text(&output.stdout);
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
        assert!(script.contains("max-new-tokens") && script.contains("history-file"), "{shell}");
    }
    assert_eq!(code(&qclient(&["completions", "tcsh"])), 1, "an unknown shell is bad usage");
}

#[test]
fn bash_accepts_the_completion_script() {
    let script = text(&qclient(&["completions", "bash"]).stdout);
    let output = Command::new("bash")
        .args(["-c", "eval \"$QCLIENT_SCRIPT\" && complete -p qclient"])
        .env("QCLIENT_SCRIPT", script)
        .output()
        .expect("bash runs");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("qclient"), "{}", text(&output.stdout));
}

#[test]
fn man_page_renders() {
    let output = qclient(&["man"]);
    assert_eq!(code(&output), 0);
    let page = text(&output.stdout);
    assert!(page.contains(".TH qclient 1"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(page.contains(sub), "man page lacks {sub}");
    }
    // groff (what man(1) uses) turns it into text without complaint.
    let dir = tempfile::tempdir().unwrap();
    let roff = dir.path().join("qclient.1");
    std::fs::write(&roff, &page).unwrap();
    // Plain text: no bold by overstriking, no SGR escapes.
    match Command::new("groff").args(["-man", "-Tutf8", "-ww", "-P-bou"]).env("GROFF_NO_SGR", "1").arg(&roff).output() {
        Ok(rendered) => {
            assert!(rendered.status.success(), "{}", text(&rendered.stderr));
            assert_eq!(text(&rendered.stderr), "", "groff warnings");
            let body = text(&rendered.stdout);
            assert!(body.contains("NAME") && body.contains("SUBCOMMANDS"), "{body}");
        }
        Err(e) => eprintln!("groff not installed ({e}); checked the roff text only"),
    }
    // --out-dir: one page per subcommand, each with the env variables of its flags.
    let out = dir.path().join("man1");
    let output = qclient(&["man", "--out-dir", &out.to_string_lossy()]);
    assert_eq!(code(&output), 0, "{}", text(&output.stderr));
    let health = std::fs::read_to_string(out.join("qclient-health.1")).expect("qclient-health.1 written");
    assert!(health.contains("QCLIENT_HEALTH_WAIT") && health.contains("grpc_health_probe"), "{health}");
    assert!(out.join("qclient.1").is_file() && out.join("qclient-chat.1").is_file());
}

#[test]
fn help_shows_the_environment_variables() {
    let help = text(&qclient(&["bench", "--help"]).stdout);
    for var in
        ["QCLIENT_ADDR", "QCLIENT_MAX_NEW_TOKENS", "QCLIENT_NUM_BEAMS", "QCLIENT_CONCURRENCY", "QCLIENT_MAX_ERROR_RATE"]
    {
        assert!(help.contains(&format!("[env: {var}=")), "{var} missing:\n{help}");
    }
}

#[test]
fn bad_usage_exits_1_and_help_exits_0() {
    let output = qclient(&["health", "--no-such-flag"]);
    assert_eq!(code(&output), 1);
    assert!(text(&output.stderr).contains("--no-such-flag"));
    assert_eq!(code(&qclient(&["health", "--wait", "soon"])), 1);
    assert_eq!(code(&qclient(&["bench", "f", "--max-error-rate", "2"])), 1);
    assert_eq!(code(&qclient(&["--help"])), 0);
    // An address that can never work is usage too, also for health.
    let output = qclient(&["--addr", "ftp://host:1", "health", "--wait", "5"]);
    assert_eq!(code(&output), 1);
}

/// A standard gRPC health server on 127.0.0.1 in this process; the reporter sets its status.
/// `addr` reuses a port reserved earlier; `None` takes any free one.
fn health_server(
    addr: Option<SocketAddr>,
    status: ServingStatus,
) -> (HealthReporter, String, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let (reporter, service) = tonic_health::server::health_reporter();
            reporter.set_service_status("", status).await;
            reporter.set_service_status("test.Ready", ServingStatus::Serving).await;
            let listener = tokio::net::TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
                .await
                .expect("bind");
            let addr = format!("http://{}", listener.local_addr().unwrap());
            tx.send((reporter, addr)).unwrap();
            // Serves until the test process exits.
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
    });
    let (reporter, addr) = rx.recv().expect("health server started");
    (reporter, addr, thread)
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&output.stdout)))
}

#[test]
fn health_exit_codes_follow_grpc_health_probe() {
    let (_reporter, addr, _thread) = health_server(None, ServingStatus::NotServing);
    let output = qclient(&["--addr", &addr, "health"]);
    assert_eq!((code(&output), text(&output.stdout)), (4, "NOT_SERVING\n".to_string()));
    assert_eq!(text(&output.stderr), "");
    let report = json(&qclient(&["--addr", &addr, "health", "--json"]));
    assert_eq!((&report["status"], &report["exit_code"]), (&Value::from("NOT_SERVING"), &Value::from(4)), "{report}");
    // A named service that is SERVING, though the server as a whole is not.
    assert_eq!(code(&qclient(&["--addr", &addr, "health", "--service", "test.Ready"])), 0);
    // An unknown service: the RPC fails (NOT_FOUND).
    assert_eq!(code(&qclient(&["--addr", &addr, "health", "--service", "test.Missing"])), 3);
    // Nothing listening.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let output = qclient(&["--addr", &closed, "health", "--json"]);
    assert_eq!(code(&output), 2);
    let report = json(&output);
    assert_eq!((&report["status"], &report["exit_code"]), (&Value::Null, &Value::from(2)), "{report}");
}

#[test]
fn health_wait_gives_up_with_the_last_outcome() {
    let (_reporter, addr, _thread) = health_server(None, ServingStatus::NotServing);
    let started = Instant::now();
    let output = qclient(&["--addr", &addr, "health", "--wait", "0.8", "--json"]);
    let took = started.elapsed();
    assert_eq!(code(&output), 4);
    let report = json(&output);
    assert!(report["attempts"].as_u64().unwrap() >= 3, "{report}");
    assert!(took >= Duration::from_millis(600) && took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn health_wait_polls_through_refused_and_not_serving_until_serving() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let addr = format!("http://{port}");
    let waiting = Command::new(env!("CARGO_BIN_EXE_qclient"))
        .args(["--addr", &addr, "health", "--wait", "60", "--json"])
        .env_remove("QCLIENT_ADDR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qclient starts");
    // Refused for a while, then NOT_SERVING for a while, then SERVING.
    std::thread::sleep(Duration::from_millis(700));
    let (reporter, _, _thread) = health_server(Some(port), ServingStatus::NotServing);
    std::thread::sleep(Duration::from_millis(700));
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(reporter.set_service_status("", ServingStatus::Serving));
    let output = waiting.wait_with_output().expect("qclient ends");
    assert_eq!(code(&output), 0, "{}", text(&output.stderr));
    let report = json(&output);
    assert_eq!(report["status"], "SERVING", "{report}");
    assert!(report["attempts"].as_u64().unwrap() >= 5, "{report}");
    assert!(report["elapsed_ms"].as_f64().unwrap() >= 1400.0, "{report}");
}
