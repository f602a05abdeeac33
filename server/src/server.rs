//! `serve`: load the model, answer health and reflection at once, flip to SERVING after the
//! warm-up, serve until the shutdown future resolves, then drain within the grace period.

use std::{
    future::Future,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use qreformulate::{pb::reformulator_server::ReformulatorServer, FILE_DESCRIPTOR_SET};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::service::Routes;

use crate::config::Config;
use crate::listener::{self, Transport};
use qreformulate::grounding::GROUNDING_FILE;

use crate::auth::{AuthLayer, Tokens};
use crate::decode_errors::DecodeErrors;
use crate::engine::{
    factory::Engines, native::kernels, onnx_t5::SessionSettings, pool::EnginePool, GenerateRequest, GenerationParams,
    ModelDir, ModelError, SearchKind,
};
use crate::error::ServerError;
use crate::health::Health;
use crate::layers::{access::AccessLayer, body_timeout::BodyTimeoutLayer, content_type::GrpcOnlyLayer};
use crate::runtime;
use crate::service::{ReformulatorService, Shared};

/// How often request and cache counters are logged (when they changed).
const STATS_INTERVAL: Duration = Duration::from_secs(60);

/// The warm-up generation: a few tokens through both decoders.
fn warmup_request(config: &Config) -> GenerateRequest {
    GenerateRequest {
        query: "Who lived longer, Nikola Tesla or Milutin Milankovic?".into(),
        params: GenerationParams { max_new_tokens: 4, search: SearchKind::Greedy, ignore_eos: true, unguarded: false },
        max_input_tokens: config.max_input_tokens.get(),
        truncate: true,
    }
}

/// Runs the server on `listener` until `shutdown` resolves (or the model fails to load).
///
/// Fails fast, before serving anything, when the configuration is invalid, ONNX Runtime
/// cannot be loaded, or the model directory lacks a file. Health reports NOT_SERVING until
/// every engine worker has loaded the model and run one warm-up generation.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    config.validate().map_err(ServerError::Config)?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(crate::prometheus::bind(addr).await.map_err(ServerError::Config)?),
        None => None,
    };
    if let Some(kernel) = config.native_kernel {
        kernels::select(kernel).map_err(|e| ServerError::Config(format!("--native-kernel: {e}")))?;
    }
    let env = runtime::init(config.ort_dylib.as_deref())?;
    let model = ModelDir::open(&config.model)?;
    let workers = config.worker_count();
    let max_batch = config.batch_requests();
    let spin_waits = config.threads_have_cores();
    tracing::info!(
        model = %model.root.display(),
        model_id = %model.model_id,
        workers,
        intra_op_threads = config.intra_op_threads.get(),
        decoder_threads_spin = spin_waits,
        max_batch_requests = max_batch,
        draft_tokens = config.draft_tokens,
        exact_int8_products = !config.saturating_int8,
        "loading model"
    );
    match model.grounding.as_ref().and_then(|rules| rules.vocabulary.as_ref()) {
        Some(v) => tracing::info!(
            generative_words = v.generative_count(),
            known_words = v.known_count(),
            "grounding on: every search writes only the query's words, close spellings of known words \
             and the model's generative words; the guards use {GROUNDING_FILE}"
        ),
        None => tracing::info!(
            file = %model.file(GROUNDING_FILE).display(),
            "grounding off: the model directory has no {GROUNDING_FILE}; decoding is unconstrained and the \
             guards use their defaults"
        ),
    }

    let (health, health_service) = Health::new().await;
    let shared = Arc::new(Shared::new(&config, model.grounding.clone()));
    // Server reflection, both versions when on: v1 and v1alpha (grpcurl before 1.8.8 and
    // Python's grpcio-reflection ask v1alpha).
    let (reflection_v1, reflection_v1alpha) = if config.reflection {
        let builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let failed = |e: tonic_reflection::server::Error| ServerError::Config(format!("reflection service: {e}"));
        (Some(builder().build_v1().map_err(failed)?), Some(builder().build_v1alpha().map_err(failed)?))
    } else {
        (None, None)
    };
    let tls = crate::tls::server_config(&config).map_err(ServerError::Config)?;
    let tokens = Tokens::load(config.auth_tokens_file.as_deref(), &config.auth_tokens).map_err(ServerError::Config)?;
    tracing::info!(
        tls = tls.is_some(),
        mutual_tls = config.tls_client_ca.is_some(),
        bearer_tokens = tokens.is_some(),
        reflection = config.reflection,
        "security"
    );

    // Load and warm up off the async runtime; health flips to SERVING when done.
    let load_error: Arc<Mutex<Option<ModelError>>> = Arc::default();
    let (load_failed_tx, load_failed_rx) = oneshot::channel::<()>();
    let loader = {
        let shared = Arc::clone(&shared);
        let health = health.clone();
        let load_error = Arc::clone(&load_error);
        let settings = SessionSettings {
            decoder: config.decoder,
            native_weights: config.native_weights,
            spin_waits,
            draft_tokens: config.draft_tokens,
            saturating_int8: config.saturating_int8,
            ..SessionSettings::new(config.intra_op_threads.get())
        };
        let warmup = warmup_request(&config);
        let build_info = Arc::clone(&shared);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = tokio::task::spawn_blocking(move || {
                let engines = Engines::load(env, model, settings)?;
                let decoder = engines.decoder();
                let native = engines.native();
                match native {
                    Some(n) => tracing::info!(
                        ?decoder,
                        streamed_weights = n.streamed,
                        kernel = n.kernel,
                        weights = n.weights.name(),
                        step_mib = format!("{:.1}", n.step_bytes as f64 / (1 << 20) as f64),
                        supported = %kernels::supported_names(),
                        "decoder steps run on {decoder:?} with the {} kernel on {} weights",
                        n.kernel,
                        n.weights.name()
                    ),
                    None => tracing::info!(?decoder, "decoder steps run on {decoder:?}"),
                }
                build_info.metrics.set_build_info(
                    engines.model_id(),
                    &format!("{decoder:?}").to_lowercase(),
                    native.map(|n| (n.kernel, n.weights.name())),
                );
                let factory = engines.factory();
                EnginePool::start_batched(workers, max_batch, factory, warmup)
            })
            .await
            .unwrap_or_else(|e| Err(ModelError::WarmUp(format!("loader task failed: {e}"))));
            match result {
                Ok(pool) => {
                    tracing::info!(
                        model_id = pool.model_id(),
                        workers = pool.size(),
                        ms = started.elapsed().as_millis() as u64,
                        "model ready; SERVING"
                    );
                    shared.set_pool(pool);
                    health.set(true).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "model failed to load");
                    *load_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    let _ = load_failed_tx.send(());
                }
            }
        })
    };

    let metrics_endpoint = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "Prometheus metrics on GET /metrics");
        }
        tokio::spawn(crate::prometheus::serve(listener, Arc::clone(&shared)))
    });

    let stats_logger = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut last = (0, 0, 0, 0);
            let mut tick = tokio::time::interval(STATS_INTERVAL);
            loop {
                tick.tick().await;
                let c = &shared.counters;
                let cache = shared.cache_stats();
                let now = (c.ok.load(Ordering::Relaxed), c.failed.load(Ordering::Relaxed), cache.hits, cache.misses);
                if now != last {
                    tracing::info!(
                        ok = now.0,
                        failed = now.1,
                        rejected_busy = c.rejected_busy.load(Ordering::Relaxed),
                        cache_hits = cache.hits,
                        cache_misses = cache.misses,
                        cache_entries = cache.entries,
                        "stats"
                    );
                    last = now;
                }
            }
        })
    };

    let watchdog = crate::watchdog::spawn(Arc::clone(&shared), health.clone(), config.stuck_worker_time());

    // Shutdown: on the caller's signal or a failed load, stop answering (NOT_SERVING and
    // UNAVAILABLE), then let tonic drain; the grace timer starts at the same moment.
    let (drain_started_tx, drain_started_rx) = oneshot::channel::<()>();
    let signal = {
        let shared = Arc::clone(&shared);
        let health = health.clone();
        async move {
            tokio::select! {
                () = shutdown => tracing::info!("shutdown requested; draining"),
                Ok(()) = load_failed_rx => tracing::info!("stopping: the model could not be loaded"),
            }
            shared.begin_shutdown();
            health.set(false).await;
            let _ = drain_started_tx.send(());
        }
    };

    let local_addr = listener.local_addr().ok();
    let layers = tower::ServiceBuilder::new()
        .layer(AccessLayer::new(config.log_queries))
        .layer(GrpcOnlyLayer)
        .layer(AuthLayer::new(tokens))
        .layer(BodyTimeoutLayer::new(Config::secs_or_off(config.request_body_timeout_secs)));
    let reformulator = ReformulatorServer::new(ReformulatorService::new(Arc::clone(&shared)))
        .max_decoding_message_size(config.max_request_bytes)
        .max_encoding_message_size(config.max_response_bytes);
    let mut routes = Routes::new(health_service).add_service(DecodeErrors::new(reformulator, Arc::clone(&shared)));
    if let (Some(v1), Some(v1alpha)) = (reflection_v1, reflection_v1alpha) {
        routes = routes.add_service(v1).add_service(v1alpha);
    }
    let service = layers.service(routes.prepare());
    let server = listener::serve(listener, tls, service, Transport::from_config(&config), signal);
    if let Some(addr) = local_addr {
        tracing::info!(%addr, "listening (NOT_SERVING until the model is warm)");
    }

    let grace = config.grace_period();
    let grace_over = async move {
        if drain_started_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => {}
        () = grace_over => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over; abandoning in-flight requests");
        }
    };

    stats_logger.abort();
    watchdog.abort();
    if let Some(endpoint) = metrics_endpoint {
        endpoint.abort();
    }
    shared.stop_pool().await;
    if !loader.is_finished() {
        // Shut down while loading: the loader finishes in the background and its pool is
        // dropped (stopped) with the last reference to `shared`.
        tracing::info!("shut down before the model finished loading");
    }
    let cache = shared.cache_stats();
    tracing::info!(cache_hits = cache.hits, cache_misses = cache.misses, "server stopped");
    if let Some(e) = load_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e.into());
    }
    Ok(())
}
