//! The HTTP API (poem-openapi): `POST /generate/` (and `/generate`), `/health`, `/ready`,
//! `/metrics`, with the request, answer and error schemas that `/openapi.json` and `/docs` show.
//!
//! The request body is read by [`GenerateBody`] and checked by `validation.rs` (not parsed by
//! poem-openapi, whose errors are 400 plain text): the [`GenerateRequest`] object below exists
//! to document it. Limits that come from the command line are written into the served spec by
//! [`document`].

use std::sync::Arc;
use std::time::Instant;

use poem::http::{header, HeaderMap, HeaderValue, StatusCode};
use poem::web::RemoteAddr;
use poem::{Request, RequestBody, Response};
use poem_openapi::payload::{Binary, Json, PlainText};
use poem_openapi::registry::{
    MetaHeader, MetaMediaType, MetaRequest, MetaResponse, MetaResponses, Registry,
};
use poem_openapi::types::{Example, Type};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ApiResponse, ExtractParamOptions, Object, OpenApi,
    ResponseContent,
};
use serde_json::Value;

use super::connection::Connections;
use super::metrics::{Metrics, CLIENT_CLOSED};
use super::response::{self, Encoded};
use super::validation::{self, ApiError, Limits, MAX_BODY_BYTES};
use crate::engine::{Engine, SubmitError};
use crate::sampling::SchedulerKind;

/// The routes and what they share.
pub struct Api {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub connections: Connections,
}

/// `POST /generate/` body: the original API's fields plus `negative_prompt` and `scheduler`.
/// Every field but `prompt` is optional; `null` means the default.
#[derive(Debug, Object)]
#[oai(example)]
pub struct GenerateRequest {
    /// What to draw (at most 2000 characters).
    #[oai(validator(max_length = 2000))]
    pub prompt: String,
    /// What to steer away from (at most 2000 characters; default empty). Used when cfg_scale > 1.
    #[oai(validator(max_length = 2000))]
    pub negative_prompt: Option<String>,
    /// Image width in pixels, a multiple of 8 (default: the model's native size).
    /// width × height is limited by --max-pixels.
    #[oai(validator(minimum(value = "8"), maximum(value = "4096"), multiple_of = "8"))]
    pub width: Option<u32>,
    /// Image height in pixels, a multiple of 8 (default: the model's native size).
    #[oai(validator(minimum(value = "8"), maximum(value = "4096"), multiple_of = "8"))]
    pub height: Option<u32>,
    /// Classifier-free guidance scale, integer or float (default 7.0; ≤ 1 turns guidance off).
    #[oai(validator(minimum(value = "0"), maximum(value = "30")))]
    pub cfg_scale: Option<f64>,
    /// Denoising steps (default 30, at most --max-steps).
    #[oai(validator(minimum(value = "1"), maximum(value = "150")))]
    pub steps: Option<u32>,
    /// Images to generate (default 1, at most --max-images); image i uses seed + i.
    #[oai(validator(minimum(value = "1"), maximum(value = "8")))]
    pub number_of_images: Option<u32>,
    /// Seed of image 0, 0 ≤ seed < 2⁶⁴; absent or -1: a random seed (returned in X-Seeds).
    pub seed: Option<u64>,
    /// ddim, pndm, euler, euler_a, dpmpp_2m or dpmpp_2m_karras (default: the model's own).
    pub scheduler: Option<String>,
}

impl Example for GenerateRequest {
    /// The original API's documented example request.
    fn example() -> Self {
        GenerateRequest {
            prompt:
                "Illustration of a Stable Diffusion FastAPI API, comic novel, ligth pastel colors"
                    .into(),
            negative_prompt: None,
            width: Some(512),
            height: Some(512),
            cfg_scale: Some(7.0),
            steps: Some(30),
            number_of_images: Some(1),
            seed: Some(208513106212),
            scheduler: None,
        }
    }
}

/// The raw `/generate/` body, or why it could not be read (wrong content type, too large).
/// Reading never fails the extraction: the handler answers every error itself, as JSON.
pub struct GenerateBody(Result<Vec<u8>, ApiError>);

impl<'a> ApiExtractor<'a> for GenerateBody {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        GenerateRequest::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: Some("The generation request (JSON)."),
            content: vec![MetaMediaType {
                content_type: "application/json",
                schema: GenerateRequest::schema_ref(),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        Ok(GenerateBody(read_json_body(request, body).await))
    }
}

/// The body of a JSON request, at most [`MAX_BODY_BYTES`]. A missing Content-Type is taken
/// as JSON (as FastAPI does); any other than `application/json` or `…+json` is refused.
async fn read_json_body(request: &Request, body: &mut RequestBody) -> Result<Vec<u8>, ApiError> {
    if let Some(content_type) = request.headers().get(header::CONTENT_TYPE) {
        let text = content_type.to_str().unwrap_or("");
        let essence = text
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let is_json = essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType {
                content_type: text.chars().take(100).collect(),
            });
        }
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        });
    }
    let body = body.take().map_err(|e| ApiError::Internal(e.to_string()))?;
    match body.into_bytes_limit(MAX_BODY_BYTES).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(poem::error::ReadBodyError::PayloadTooLarge) => Err(ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        }),
        Err(e) => Err(ApiError::BodyRead(e.to_string())),
    }
}

/// The JSON body of every error answer.
#[derive(Debug, Object)]
pub struct ErrorBody {
    /// What went wrong, with the limit and the value given.
    pub error: String,
    /// The request field at fault (422 answers).
    #[oai(skip_serializing_if_is_none)]
    pub field: Option<String>,
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        ApiError::status(self)
    }

    fn as_response(&self) -> Response {
        let body = ErrorBody {
            error: self.to_string(),
            field: self.field().map(str::to_string),
        };
        let mut response = poem::IntoResponse::into_response(Json(body));
        response.set_status(ApiError::status(self));
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        let error = |status: u16, description: &'static str, retry_after: bool| MetaResponse {
            description,
            status: Some(status),
            status_range: None,
            content: vec![MetaMediaType {
                content_type: <Json<ErrorBody> as poem_openapi::payload::Payload>::CONTENT_TYPE,
                schema: ErrorBody::schema_ref(),
            }],
            headers: if retry_after {
                vec![MetaHeader {
                    name: "Retry-After".into(),
                    description: Some("Seconds to wait before retrying.".into()),
                    required: false,
                    deprecated: false,
                    schema: u64::schema_ref(),
                }]
            } else {
                vec![]
            },
        };
        MetaResponses {
            responses: vec![
                error(400, "Malformed JSON or an unreadable body.", false),
                error(401, "Missing or wrong API key (when the server has one).", false),
                error(406, "The Accept header allows neither image/png nor application/json.", false),
                error(413, "The body is larger than 64 KiB.", false),
                error(415, "The Content-Type is not application/json.", false),
                error(
                    422,
                    "Invalid request: `field` names the field, `error` the limit and the value given.",
                    false,
                ),
                error(429, "The queue is full; retry after Retry-After seconds.", true),
                error(500, "A bug in the server (the generation failed or panicked); logged with its cause.", false),
                error(
                    503,
                    "Not ready yet or the device is out of memory or failed (both with Retry-After), shutting down, or past the request deadline.",
                    true,
                ),
            ],
        }
    }

    fn register(registry: &mut Registry) {
        ErrorBody::register(registry);
    }
}

/// The settings an answer was generated with.
#[derive(Debug, Object)]
pub struct GenerationParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u64,
    pub height: u64,
    pub steps: u64,
    pub cfg_scale: f32,
    /// Seed of image 0.
    pub seed: u64,
    pub scheduler: String,
    pub number_of_images: u64,
    pub model: String,
}

/// Where the time went, in seconds.
#[derive(Debug, Object)]
pub struct Timings {
    pub queue_seconds: f64,
    pub generation_seconds: f64,
    pub encode_seconds: f64,
    pub total_seconds: f64,
}

/// The JSON answer.
#[derive(Debug, Object)]
pub struct GenerateResult {
    /// Base64 PNGs (each with its A1111 `parameters` chunk); image i used seeds[i] = seed + i.
    pub images: Vec<String>,
    pub seeds: Vec<u64>,
    pub parameters: GenerationParameters,
    pub timings: Timings,
}

#[derive(ResponseContent)]
pub enum ImageOrJson {
    /// The image, or with several images one grid of all of them (A1111's layout).
    #[oai(content_type = "image/png")]
    Png(Binary<Vec<u8>>),
    /// Base64 PNGs, seeds, parameters and timings.
    Json(Json<GenerateResult>),
}

#[derive(ApiResponse)]
pub enum Generated {
    /// PNG bytes (Accept: image/png, */* or none) or JSON (Accept: application/json).
    #[oai(status = 200)]
    Ok(
        ImageOrJson,
        /// The seeds used, comma-separated (image i: seed + i).
        #[oai(header = "X-Seeds")]
        String,
    ),
}

#[derive(Debug, Object)]
pub struct Health {
    /// Always "ok" while the process serves HTTP.
    pub status: String,
}

#[derive(Debug, Object)]
pub struct ReadyBody {
    pub ready: bool,
    pub model: String,
    pub device: String,
    /// Jobs waiting in the queue.
    pub queue_depth: u64,
}

#[derive(ApiResponse)]
pub enum Readiness {
    /// The model is loaded and a warm-up generation succeeded.
    #[oai(status = 200)]
    Ready(Json<ReadyBody>),
    /// Loading or warming up.
    #[oai(status = 503)]
    NotReady(Json<ErrorBody>),
}

#[OpenApi]
impl Api {
    /// Generate images from a prompt
    ///
    /// The original API's request (prompt, width, height, cfg_scale, steps, number_of_images,
    /// seed) plus negative_prompt and scheduler. Answers PNG bytes (one image, or a grid of
    /// several) with `Accept: image/png`, `*/*` or no Accept; base64 PNGs with seeds, parameters
    /// and timings with `Accept: application/json`. Requests wait in a bounded queue (429 when
    /// full); a client that disconnects cancels its job.
    // poem-openapi drops trailing slashes: this route serves `/generate` and, through the
    // server's path normalisation, `/generate/`; `document` lists it as `/generate/`.
    #[oai(path = "/generate", method = "post", operation_id = "generate")]
    async fn generate(
        &self,
        headers: &HeaderMap,
        remote: &RemoteAddr,
        body: GenerateBody,
    ) -> Result<Generated, ApiError> {
        let record = self.metrics.start_request();
        let client_gone = self.connections.client_gone(remote);
        let result = self
            .generate_images(headers, client_gone.clone(), body)
            .await;
        let gone = client_gone.is_some_and(|g| g.load(std::sync::atomic::Ordering::Relaxed));
        match &result {
            Err(e) if gone => {
                tracing::info!(error = %e, "the client went away; its job was cancelled");
                record.finish_as(CLIENT_CLOSED);
            }
            Ok(_) => record.finish_as(StatusCode::OK.as_str()),
            Err(e) => record.finish_as(e.status().as_str()),
        }
        result
    }

    /// Liveness: the process serves HTTP
    #[oai(path = "/health", method = "get")]
    async fn health(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// Readiness: the model is loaded and warmed up
    #[oai(path = "/ready", method = "get")]
    async fn ready(&self) -> Readiness {
        match self.engine.model().filter(|_| self.engine.is_ready()) {
            Some(model) => Readiness::Ready(Json(ReadyBody {
                ready: true,
                model: model.name.clone(),
                device: model.device.clone(),
                queue_depth: self.engine.queue_depth() as u64,
            })),
            None => Readiness::NotReady(Json(ErrorBody {
                error: SubmitError::NotReady.to_string(),
                field: None,
            })),
        }
    }

    /// Prometheus metrics (text exposition format)
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self) -> PlainText<String> {
        PlainText(self.metrics.render())
    }
}

impl Api {
    async fn generate_images(
        &self,
        headers: &HeaderMap,
        client_gone: Option<Arc<std::sync::atomic::AtomicBool>>,
        body: GenerateBody,
    ) -> Result<Generated, ApiError> {
        let started = Instant::now();
        let accept = headers
            .get(header::ACCEPT)
            .map(|v| v.to_str().unwrap_or("?"));
        let format = response::negotiate(accept).ok_or_else(|| ApiError::NotAcceptable {
            accept: accept.unwrap_or("").chars().take(100).collect(),
        })?;
        let body = body.0?;
        let model = self.engine.model().ok_or(SubmitError::NotReady)?;
        let model_name = model.name.clone();
        let validated = validation::validate(&body, &self.limits, model, || {
            u64::from(rand::random::<u32>())
        })?;
        let request = validated.request;
        let ticket = self.engine.submit(request.clone(), client_gone)?;
        let output = ticket.wait().await?;

        let encode_started = Instant::now();
        let images = output.images;
        let seeds: Vec<u64> = images.iter().map(|g| g.seed).collect();
        let encode_request = request.clone();
        let encode_model = model_name.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            response::encode(format, &encode_request, &encode_model, &images)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("encoding task: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        self.metrics.add_images(seeds.len());

        let x_seeds = seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        tracing::info!(
            seeds = %x_seeds,
            random_seed = validated.random_seed,
            width = request.width,
            height = request.height,
            steps = request.steps,
            scheduler = request.scheduler.name(),
            images = seeds.len(),
            queue_s = output.queued.as_secs_f64(),
            generation_s = output.generation.as_secs_f64(),
            "generated"
        );
        let content = match encoded {
            Encoded::Png(bytes) => ImageOrJson::Png(Binary(bytes)),
            Encoded::Json(images) => ImageOrJson::Json(Json(GenerateResult {
                images,
                seeds: seeds.clone(),
                parameters: GenerationParameters {
                    prompt: request.prompt.clone(),
                    negative_prompt: request.negative_prompt.clone(),
                    width: request.width as u64,
                    height: request.height as u64,
                    steps: request.steps as u64,
                    cfg_scale: request.cfg_scale,
                    seed: request.seed,
                    scheduler: request.scheduler.name().to_string(),
                    number_of_images: request.number_of_images as u64,
                    model: model_name,
                },
                timings: Timings {
                    queue_seconds: output.queued.as_secs_f64(),
                    generation_seconds: output.generation.as_secs_f64(),
                    encode_seconds: encode_started.elapsed().as_secs_f64(),
                    total_seconds: started.elapsed().as_secs_f64(),
                },
            })),
        };
        Ok(Generated::Ok(content, x_seeds))
    }
}

/// The served OpenAPI document: poem-openapi's, with the limits of this server's command line
/// (and the model's size limits) written into the request schema.
pub fn document(spec: &str, limits: &Limits, latent_factor: usize) -> String {
    let Ok(mut doc) = serde_json::from_str::<Value>(spec) else {
        return spec.to_string();
    };
    let max_side = limits.max_side(latent_factor);
    let min_side = validation::min_side(latent_factor);
    if let Some(properties) = doc
        .pointer_mut("/components/schemas/GenerateRequest/properties")
        .and_then(Value::as_object_mut)
    {
        let mut set = |field: &str, key: &str, value: Value| {
            if let Some(schema) = properties.get_mut(field).and_then(Value::as_object_mut) {
                schema.insert(key.to_string(), value);
            }
        };
        set("steps", "maximum", limits.max_steps.into());
        set("number_of_images", "maximum", limits.max_images.into());
        for side in ["width", "height"] {
            set(side, "maximum", max_side.into());
            set(side, "minimum", min_side.into());
            set(side, "multipleOf", latent_factor.into());
        }
        set("steps", "minimum", 1.into());
        set("number_of_images", "minimum", 1.into());
        set("seed", "minimum", (-1).into());
        let names: Vec<Value> = SchedulerKind::ALL.iter().map(|k| k.name().into()).collect();
        set("scheduler", "enum", names.into());
    }
    if let Some(schema) = doc
        .pointer_mut("/components/schemas/GenerateRequest")
        .and_then(Value::as_object_mut)
    {
        schema.insert(
            "description".into(),
            format!(
                "The original API's fields plus negative_prompt and scheduler. Limits of this \
                 server: width × height ≤ {} pixels, steps ≤ {}, number_of_images ≤ {}, prompts \
                 ≤ {} characters. Every field but prompt is optional; null means the default.",
                limits.max_pixels,
                limits.max_steps,
                limits.max_images,
                validation::MAX_PROMPT_CHARS
            )
            .into(),
        );
    }
    // The original API's path, with its trailing slash (`/generate` works too).
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        if let Some(generate) = paths.remove("/generate") {
            paths.insert("/generate/".into(), generate);
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| spec.to_string())
}
