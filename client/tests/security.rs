//! The real `qclient` binary against the real server (in-process, 127.0.0.1:0) with TLS,
//! mutual TLS and bearer tokens; certificates are generated at run time.

#[path = "../../server/tests/common/certs.rs"]
mod certs;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use clap::Parser;

fn model_dir() -> PathBuf {
    match std::env::var_os("QREFORMULATE_TEST_MODEL") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/qreformulate-t5"),
    }
}

/// Starts a server with `flags` on its own runtime (it serves until the process exits);
/// returns `127.0.0.1:PORT`.
fn start_server(flags: Vec<String>) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            let model = model_dir().display().to_string();
            let mut args = vec!["qserver".to_string(), "--model".into(), model];
            args.extend(flags);
            let config = qserver::Config::parse_from(args);
            if let Err(e) = qserver::serve(config, listener, std::future::pending::<()>()).await {
                panic!("test qserver failed: {e}");
            }
        });
    });
    format!("127.0.0.1:{}", rx.recv().expect("server thread bound a port"))
}

struct Secured {
    addr: String,
    pki: certs::Pki,
}

/// One server with mutual TLS and a bearer token ("s3cret"); ready (SERVING) when returned.
fn mtls_token_server() -> &'static Secured {
    static SERVER: OnceLock<Secured> = OnceLock::new();
    SERVER.get_or_init(|| {
        let pki = certs::generate("qclient-mtls");
        let p = |path: &PathBuf| path.display().to_string();
        let addr = start_server(vec![
            "--tls-cert".into(),
            p(&pki.server_cert),
            "--tls-key".into(),
            p(&pki.server_key),
            "--tls-client-ca".into(),
            p(&pki.ca),
            "--auth-tokens".into(),
            "s3cret".into(),
        ]);
        let secured = Secured { addr, pki };
        // Health needs no token: `health --wait` over mTLS is the readiness probe.
        let ready = qclient(&secured, &["--tls-cert", "good", "health", "--wait", "120"]);
        assert!(ready.status.success(), "server never SERVING: {}", text(&ready.stderr));
        secured
    })
}

/// Runs qclient against `server`; `--tls-cert good|rogue` picks the generated identity, the
/// other arguments pass through. Environment cleaned of qclient's variables.
fn qclient(server: &Secured, args: &[&str]) -> Output {
    let pki = &server.pki;
    let mut full: Vec<String> = vec!["--addr".into(), format!("localhost:{}", port(&server.addr))];
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match (*arg, rest.as_slice().first()) {
            ("--tls-cert", Some(&"good")) => {
                rest.next();
                full.extend(["--tls-cert".into(), path(&pki.client_cert), "--tls-key".into(), path(&pki.client_key)]);
            }
            ("--tls-cert", Some(&"rogue")) => {
                rest.next();
                full.extend(["--tls-cert".into(), path(&pki.rogue_cert), "--tls-key".into(), path(&pki.rogue_key)]);
            }
            _ => full.push(arg.to_string()),
        }
    }
    if !args.contains(&"--no-ca") {
        full.splice(0..0, ["--tls-ca".to_string(), path(&pki.ca)]);
    } else {
        full.retain(|a| a != "--no-ca");
    }
    let mut command = Command::new(env!("CARGO_BIN_EXE_qclient"));
    for var in ["QCLIENT_ADDR", "QCLIENT_TLS_CA", "QCLIENT_TLS_CERT", "QCLIENT_TLS_KEY", "QCLIENT_TOKEN"] {
        command.env_remove(var);
    }
    command.args(&full).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command.output().expect("qclient runs")
}

fn port(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a failure with one `qclient: error:` line; returns it.
fn one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "expected failure, stdout:\n{}", text(&output.stdout));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("qclient: error: "), "{stderr}");
    stderr
}

const QUERY: &str = "Who lived longer, Nikola Tesla or Milutin Milankovic?";

#[test]
fn mtls_with_the_right_token_answers() {
    let server = mtls_token_server();
    let out = qclient(server, &["--tls-cert", "good", "--token", "s3cret", "reformulate", "--json", QUERY]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(answer["subqueries"].as_array().is_some_and(|s| !s.is_empty()), "{answer}");
}

#[test]
fn token_from_the_environment_works_too() {
    let server = mtls_token_server();
    let pki = &server.pki;
    let out = Command::new(env!("CARGO_BIN_EXE_qclient"))
        .args(["--addr", &format!("localhost:{}", port(&server.addr)), "reformulate", QUERY])
        .env("QCLIENT_TLS_CA", &pki.ca)
        .env("QCLIENT_TLS_CERT", &pki.client_cert)
        .env("QCLIENT_TLS_KEY", &pki.client_key)
        .env("QCLIENT_TOKEN", "s3cret")
        .env_remove("QCLIENT_ADDR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn missing_or_wrong_token_is_unauthenticated() {
    let server = mtls_token_server();
    for token in [None, Some("wrong")] {
        let mut args = vec!["--tls-cert", "good"];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        args.extend(["reformulate", QUERY]);
        let err = one_line_error(&qclient(server, &args));
        assert!(err.contains("UNAUTHENTICATED"), "{token:?}: {err}");
    }
}

#[test]
fn health_needs_no_token() {
    let out = qclient(mtls_token_server(), &["--tls-cert", "good", "health"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "SERVING");
}

#[test]
fn no_client_certificate_or_one_from_another_ca_is_refused() {
    let server = mtls_token_server();
    for identity in [None, Some("rogue")] {
        let mut args = vec!["--token", "s3cret"];
        if let Some(id) = identity {
            args.extend(["--tls-cert", id]);
        }
        args.extend(["reformulate", QUERY]);
        let out = qclient(server, &args);
        let err = one_line_error(&out);
        // TLS 1.3: the server refuses the certificate after the client's handshake is done, so
        // the refusal (a TLS alert, or the closed connection) arrives with the first call; the
        // call never reaches the token check.
        assert!(out.stdout.is_empty() && !err.contains("UNAUTHENTICATED"), "{identity:?}: {err}");
    }
}

#[test]
fn plaintext_client_cannot_talk_to_a_tls_server() {
    let server = mtls_token_server();
    let err = one_line_error(&qclient(server, &["--no-ca", "--token", "s3cret", "health"]));
    assert!(err.contains("cannot connect") || err.contains("failed"), "{err}");
    // https:// without a CA to check the server against is a usage error, before connecting.
    let out = Command::new(env!("CARGO_BIN_EXE_qclient"))
        .args(["--addr", &format!("https://localhost:{}", port(&server.addr)), "health"])
        .env_remove("QCLIENT_TLS_CA")
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("needs --tls-ca"), "{err}");
}

#[test]
fn tls_only_server_needs_just_the_ca() {
    static SERVER: OnceLock<Secured> = OnceLock::new();
    let server = SERVER.get_or_init(|| {
        let pki = certs::generate("qclient-tls");
        let addr =
            start_server(vec!["--tls-cert".into(), path(&pki.server_cert), "--tls-key".into(), path(&pki.server_key)]);
        Secured { addr, pki }
    });
    let ready = qclient(server, &["health", "--wait", "120"]);
    assert!(ready.status.success(), "{}", text(&ready.stderr));
    let out = qclient(server, &["reformulate", QUERY]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The CA of another PKI does not vouch for this server.
    let out = qclient(server, &["--no-ca", "--tls-ca", &path(&server.pki.rogue_ca), "health"]);
    one_line_error(&out);
}
