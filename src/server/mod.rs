//! `sd21 serve`: the HTTP server around the engine. This file holds the configuration, the
//! route table, the middleware (request logs, JSON errors, CORS, bearer auth, panic catching)
//! and the life cycle: bind, serve while the engine loads and warms up, and on SIGTERM/SIGINT
//! stop accepting, finish in-flight requests up to a timeout, stop the engine, return.
//!
//! Request flow: middleware → `api.rs` (`body.rs` reads the body, `crate::request` checks it)
//! → engine queue → worker → `response.rs` (PNG/JSON) → client; `error.rs` turns every failure
//! into its status and JSON answer. Nothing in a request is ever used as a file path.

mod allow;
pub mod api;
pub mod body;
pub mod connection;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod response;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use poem::http::{header, HeaderValue, Method, StatusCode};
use poem::listener::TcpAcceptor;
use poem::middleware::{CatchPanic, Cors, NormalizePath, TrailingSlash};
use poem::web::Html;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route};
use poem_openapi::OpenApiService;

use crate::engine::{Engine, EngineConfig, ModelLoader};
use crate::request::schema::{self, SchemaContext};
use crate::request::Limits;
use allow::AllowedMethods;
use api::{Api, Documented};
use connection::{Connections, WatchedAcceptor};
use error::ApiError;
use jobs::store::{JobStore, StoreLimits};
use jobs::JobsApi;
use metrics::Metrics;

/// Everything `sd21 serve` is configured with (besides the model).
#[derive(Clone)]
pub struct ServerConfig {
    /// Address to bind; loopback by default.
    pub host: String,
    /// 0 picks a free port (logged as `listening on http://…`).
    pub port: u16,
    pub limits: Limits,
    /// Requests that may wait while one runs; more are answered 429.
    pub queue_size: usize,
    /// Images per batch ([`EngineConfig::max_batch`]).
    pub max_batch: usize,
    /// Deadline of a request from admission to answer.
    pub request_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// When set, CORS headers allow this origin; otherwise no CORS headers at all.
    pub cors_origin: Option<String>,
    /// How long and how much finished jobs are kept (`POST /jobs`).
    pub jobs: StoreLimits,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("limits", &self.limits)
            .field("queue_size", &self.queue_size)
            .field("max_batch", &self.max_batch)
            .field("request_timeout", &self.request_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("cors_origin", &self.cors_origin)
            .field("jobs", &self.jobs)
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            limits: Limits::default(),
            queue_size: 16,
            max_batch: crate::engine::DEFAULT_MAX_BATCH,
            request_timeout: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(60),
            api_key: None,
            cors_origin: None,
            jobs: StoreLimits {
                ttl: Duration::from_secs(600),
                max_stored_bytes: 512 << 20,
            },
        }
    }
}

/// What the start-up log line says before the address it listens on.
const LISTENING_ON: &str = "listening on http://";

/// The address in the server's start-up log line (`listening on http://…`), for whoever started
/// it with `--port 0` (the bench, the tests).
pub fn listening_address(log_line: &str) -> Option<std::net::SocketAddr> {
    let rest = log_line.split(LISTENING_ON).nth(1)?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    addr.parse().ok()
}

/// Binds `config.host:config.port` and serves until SIGTERM or SIGINT.
pub async fn run(config: ServerConfig, load: ModelLoader) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind((config.host.as_str(), config.port))
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    serve(config, load, listener, shutdown_signal()).await
}

/// Serves on `listener` until `shutdown` completes (or the engine fails to start, which is an
/// error). In-flight requests get `config.shutdown_timeout` to finish.
pub async fn serve(
    config: ServerConfig,
    load: ModelLoader,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if config.api_key.as_deref() == Some("") {
        anyhow::bail!("the API key must not be empty");
    }
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let connections = Connections::default();
    let acceptor = WatchedAcceptor::new(TcpAcceptor::from_std(listener)?, connections.clone());

    let metrics = Arc::new(Metrics::new().context("creating metrics")?);
    let (engine, started) = Engine::start(
        EngineConfig {
            queue_size: config.queue_size,
            request_timeout: config.request_timeout,
            max_batch: config.max_batch,
        },
        load,
        metrics.engine.clone(),
    )
    .context("starting the engine thread")?;
    let engine = Arc::new(engine);
    let app = app(&config, engine.clone(), metrics.clone(), connections);
    tracing::info!(?config, "{LISTENING_ON}{addr}");

    let startup_failure = Arc::new(Mutex::new(None::<String>));
    let shutdown_timeout = config.shutdown_timeout;
    let stop = {
        let engine = engine.clone();
        let metrics = metrics.clone();
        let startup_failure = startup_failure.clone();
        async move {
            tokio::pin!(shutdown);
            tokio::select! {
                _ = &mut shutdown => {}
                started = started => match started {
                    Ok(Ok(model)) => {
                        metrics.ready.set(1);
                        tracing::info!(model = %model.name, device = %model.device, "ready");
                        shutdown.await;
                    }
                    Ok(Err(e)) => {
                        *startup_failure.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(e.to_string());
                    }
                    Err(_) => {
                        *startup_failure.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some("the engine thread ended during start-up".into());
                    }
                },
            }
            // New requests on open connections are refused from now on; admitted ones finish.
            engine.close();
            metrics.ready.set(0);
            tracing::info!("shutting down: no new requests; finishing the ones in flight");
            // Work still running near the end of the timeout is stopped at its next step, so its
            // request is answered (503) before the connections are dropped.
            let engine = engine.clone();
            tokio::spawn(async move {
                tokio::time::sleep(shutdown_timeout.saturating_sub(answer_grace(shutdown_timeout)))
                    .await;
                tracing::warn!("--shutdown-timeout is ending: stopping the work still running");
                engine.abort();
            });
        }
    };
    poem::Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app, stop, Some(config.shutdown_timeout))
        .await
        .context("serving HTTP")?;

    // Connections are closed; a job still running lost its client (and is cancelled).
    engine.abort();
    if !engine.join(Duration::from_secs(10)).await {
        tracing::warn!("the engine did not stop within 10 s; exiting anyway");
    }
    if let Some(failure) = startup_failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        anyhow::bail!("{failure}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long before the end of `--shutdown-timeout` running work is stopped, so that its answer
/// (503) is sent in time: 2 s, or half of a shorter timeout. A denoising step longer than this
/// still loses its answer (work stops between steps only).
fn answer_grace(shutdown_timeout: Duration) -> Duration {
    (shutdown_timeout / 2).min(Duration::from_secs(2))
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}

/// The routes with their middleware, outermost first: request log, trailing-slash trimming
/// (`/generate/` → `/generate`), `Allow` on 405s (`allow.rs`), JSON errors, CORS (only with
/// `--cors-origin`), bearer auth (only with `--api-key`), JSON errors again (for what the router
/// and the handlers return), panic catcher, routes.
fn app(
    config: &ServerConfig,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    connections: Connections,
) -> impl Endpoint {
    let jobs = JobsApi {
        engine: engine.clone(),
        limits: config.limits,
        store: JobStore::new(config.jobs),
    };
    let api = Api {
        engine: engine.clone(),
        metrics,
        limits: config.limits,
        connections,
    };
    // The spec and the docs page are generated per request with this server's limits and the
    // loaded model's latent factor (8, SD 2.x, until it is loaded) in the schema context.
    let limits = config.limits;
    let spec_context = move || SchemaContext {
        limits,
        latent_factor: engine.model().map_or(8, |m| m.latent_factor),
    };
    let documented = Arc::new(openapi_service(api.clone(), jobs.clone()));
    let allowed = Arc::new(AllowedMethods::new(
        &schema::with_context(spec_context(), || documented.spec()),
        &[
            ("/openapi.json", &["GET", "HEAD"]),
            ("/docs", &["GET", "HEAD"]),
        ],
    ));
    let (docs_context, docs_service) = (spec_context.clone(), documented.clone());
    let docs = poem::endpoint::make_sync(move |_| {
        Html(schema::with_context(docs_context(), || {
            docs_service.swagger_ui_html()
        }))
    });
    let spec_json = poem::endpoint::make_sync(move |_| {
        schema::with_context(spec_context(), || documented.spec())
            .with_content_type("application/json; charset=utf-8")
            .into_response()
    });

    let routes = Route::new()
        .nest("/", openapi_service(api, jobs))
        .at("/openapi.json", poem::get(spec_json))
        .at("/docs", poem::get(docs));
    let mut app = routes
        .with(CatchPanic::new())
        .around(json_errors)
        .map_to_response()
        .boxed();
    if let Some(key) = config.api_key.clone() {
        let key: Arc<str> = key.into();
        app = app
            .around(move |ep, req| {
                let key = key.clone();
                async move {
                    if always_open(&req) || authorized(&req, &key) {
                        ep.call(req).await
                    } else {
                        Ok(poem::error::ResponseError::as_response(
                            &ApiError::Unauthorized,
                        ))
                    }
                }
            })
            .boxed();
    }
    if let Some(origin) = &config.cors_origin {
        // An always-open route from a foreign Origin (which CORS would refuse with 403) bypasses
        // the CORS check and gets no CORS headers.
        let plain = Arc::new(app);
        let without_cors = Arc::clone(&plain);
        let allowed: Arc<str> = origin.as_str().into();
        app = plain
            .with(
                Cors::new()
                    .allow_origin(origin.as_str())
                    .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
                    .allow_headers([header::CONTENT_TYPE, header::ACCEPT, header::AUTHORIZATION])
                    .expose_headers([
                        header::HeaderName::from_static("x-seeds"),
                        header::RETRY_AFTER,
                    ]),
            )
            .map_to_response()
            .around(move |cors, req| {
                let (without_cors, allowed) = (Arc::clone(&without_cors), Arc::clone(&allowed));
                async move {
                    let foreign = req
                        .header(header::ORIGIN)
                        .is_some_and(|o| o != allowed.as_ref());
                    if foreign && always_open(&req) {
                        without_cors.call(req).await
                    } else {
                        cors.call(req).await
                    }
                }
            })
            .boxed();
    }
    app.around(json_errors)
        .around(move |ep, req| allow::add_allow(ep, req, Arc::clone(&allowed)))
        .with(NormalizePath::new(TrailingSlash::Trim))
        .around(log_request)
}

/// The routes of `api`, documented.
fn openapi_service(api: Api, jobs: JobsApi) -> OpenApiService<(Documented, JobsApi), ()> {
    OpenApiService::new((Documented(api), jobs), "sd21", env!("CARGO_PKG_VERSION")).description(
        "Stable Diffusion 2.1 text-to-image, compatible with the original FastAPI server's \
         POST /generate/.",
    )
}

/// `/health`: answered to every caller, without the API key and from any Origin (load balancers
/// and other pages' status checks).
fn always_open(req: &Request) -> bool {
    req.uri().path() == "/health"
}

/// `Authorization: Bearer <key>`, compared in constant time.
fn authorized(req: &Request, key: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
    else {
        return false;
    };
    let (a, b) = (given.as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Every error answer is JSON `{"error": …}`: errors the handlers return render themselves
/// (`ApiError`); the router's (404, 405), CORS's and the panic catcher's are wrapped here.
async fn json_errors<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let response = match ep.call(req).await {
        Ok(output) => output.into_response(),
        Err(e) => {
            if let Some(api_error) = e.downcast_ref::<ApiError>() {
                return Ok(poem::error::ResponseError::as_response(api_error));
            }
            let status = e.status();
            let message = e.to_string();
            return Ok(http_error(status, message));
        }
    };
    let status = response.status();
    let is_json = response
        .content_type()
        .is_some_and(|ct| ct.starts_with("application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let mut response = response;
        let text = response.take_body().into_string().await.unwrap_or_default();
        let message = if text.trim().is_empty() {
            status.canonical_reason().unwrap_or("error").to_string()
        } else {
            text
        };
        let mut rewritten = http_error(status, message);
        for name in [header::RETRY_AFTER, header::WWW_AUTHENTICATE, header::ALLOW] {
            if let Some(value) = response.headers().get(&name) {
                rewritten.headers_mut().insert(name, value.clone());
            }
        }
        return Ok(rewritten);
    }
    Ok(response)
}

fn http_error(status: StatusCode, message: String) -> Response {
    poem::error::ResponseError::as_response(&ApiError::Http { status, message })
}

/// One log line per request: method, path, status, duration, client.
async fn log_request<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let remote = req.remote_addr().to_string();
    let mut response = ep.call(req).await?.into_response();
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert("x-request-id", value);
    }
    tracing::info!(
        id,
        %method,
        path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        remote,
        "request"
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_must_match_exactly() {
        let req = |value: &str| {
            Request::builder()
                .header(header::AUTHORIZATION, value)
                .finish()
        };
        assert!(authorized(&req("Bearer secret"), "secret"));
        assert!(authorized(&req("bearer  secret "), "secret"));
        assert!(!authorized(&req("Bearer secre"), "secret"));
        assert!(!authorized(&req("Bearer secret2"), "secret"));
        assert!(!authorized(&req("Basic secret"), "secret"));
        assert!(!authorized(&Request::builder().finish(), "secret"));
    }
}
