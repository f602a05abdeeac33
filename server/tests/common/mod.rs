//! Starts the real server (real model, real ONNX Runtime) on 127.0.0.1:0 for the tests.
#![allow(dead_code)] // each test binary uses a different subset

pub mod raw_grpc;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use qreformulate::{
    grounding::{WordRules, GROUNDING_FILE},
    pb::reformulator_client::ReformulatorClient,
    SERVICE_NAME,
};
use qserver::{serve, Config, ServerError};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// The model under test: `QREFORMULATE_TEST_MODEL`, else the repository's shipped model.
pub fn model_dir() -> PathBuf {
    std::env::var_os("QREFORMULATE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/qreformulate-t5")))
}

/// A fresh temporary copy of the model directory's top-level files (`qserver-{tag}-{pid}`):
/// subdirectories such as `pytorch/` are left out, as in a plain Optimum export.
pub fn model_files_copy(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qserver-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// A model directory with a grounding file: the shipped model when it ships one, else a copy of
/// its files (`pytorch/` linked, so the native decoder still runs) with the golden rules of
/// `tests/golden/grounding.json`.
pub fn grounded_model_dir() -> PathBuf {
    let shipped = model_dir();
    if shipped.join(GROUNDING_FILE).is_file() {
        return shipped;
    }
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let dir = model_files_copy("grounded");
        let checkpoint = shipped.join("pytorch");
        if checkpoint.is_dir() {
            std::os::unix::fs::symlink(checkpoint.canonicalize().unwrap(), dir.join("pytorch")).unwrap();
        }
        let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/grounding.json");
        let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
        std::fs::write(dir.join(GROUNDING_FILE), golden["rules"].to_string()).unwrap();
        dir
    })
    .clone()
}

/// The word rules of a model directory's grounding file.
pub fn rules_of(dir: &Path) -> WordRules {
    WordRules::parse(&std::fs::read_to_string(dir.join(GROUNDING_FILE)).unwrap()).unwrap()
}

/// A copy of the model's top-level files without a grounding file (`qserver-{tag}-{pid}`).
pub fn ungrounded_model_copy(tag: &str) -> PathBuf {
    let dir = model_files_copy(tag);
    let _ = std::fs::remove_file(dir.join(GROUNDING_FILE));
    dir
}

/// The queries of a dataset under `datasets/`, or `None` when the file is absent.
pub fn dataset_queries(name: &str) -> Option<Vec<String>> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets").join(name);
    let text = std::fs::read_to_string(file).ok()?;
    Some(
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["query"].as_str().unwrap().to_owned())
            .collect(),
    )
}

pub fn config(extra: &[&str]) -> Config {
    let mut args: Vec<String> = vec!["qserver".into()];
    if !extra.contains(&"--model") {
        args.extend(["--model".into(), model_dir().display().to_string()]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    <Config as clap::Parser>::try_parse_from(&args).unwrap_or_else(|e| panic!("bad test config {args:?}: {e}"))
}

/// A server owned by one test; stopped through `shutdown`.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<Result<(), ServerError>>,
}

impl TestServer {
    /// Binds 127.0.0.1:0 and runs `serve` on the current runtime (does not wait for SERVING).
    pub async fn spawn(extra: &[&str]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(config(extra), listener, async move {
            let _ = rx.await;
        }));
        Self { addr, shutdown: Some(tx), handle }
    }

    /// Spawns and waits until health says SERVING.
    pub async fn start(extra: &[&str]) -> Self {
        let server = Self::spawn(extra).await;
        wait_serving(server.addr).await;
        server
    }

    /// Resolves the shutdown future and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("serve did not return within 30 s of shutdown")
            .expect("serve task panicked")
    }
}

/// One server for the whole test binary, in its own thread and runtime (so it outlives each
/// test's runtime). Cache disabled so that repeated requests reach the engine; a low token
/// limit so that over-long queries are cheap to build.
pub fn shared_server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("shared-qserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    tx.send(listener.local_addr().unwrap()).unwrap();
                    let cfg = config(&["--workers", "2", "--cache-capacity", "0", "--max-input-tokens", "32"]);
                    if let Err(e) = serve(cfg, listener, std::future::pending()).await {
                        panic!("shared test server failed: {e}");
                    }
                });
            })
            .unwrap();
        rx.recv().expect("shared server thread died before binding")
    })
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect to test server")
}

pub async fn client(addr: SocketAddr) -> ReformulatorClient<Channel> {
    ReformulatorClient::new(channel(addr).await)
}

pub async fn health_status(addr: SocketAddr, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(channel(addr).await);
    let reply = health.check(HealthCheckRequest { service: service.into() }).await.expect("health check");
    reply.into_inner().status()
}

/// Polls health until SERVING (60 s at most: the model loads in well under a second).
pub async fn wait_serving(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await {
            let mut health = HealthClient::new(ch);
            if let Ok(r) = health.check(HealthCheckRequest { service: SERVICE_NAME.into() }).await {
                if r.into_inner().status() == ServingStatus::Serving {
                    return;
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "server at {addr} never became SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET `path` over plain HTTP/1.1 (no client library needed for one request); the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}
