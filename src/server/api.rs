//! The HTTP API (poem-openapi): `POST /generate/` (and `/generate`), `/health`, `/ready`,
//! `/metrics`, with the answer and error schemas that `/openapi.json` and `/docs` show. The
//! request body is read by `body.rs` and checked by its request type (`crate::request`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use poem::endpoint::BoxEndpoint;
use poem::http::{header, HeaderMap, Method, StatusCode};
use poem::web::RemoteAddr;
use poem_openapi::payload::{Binary, Json, PlainText};
use poem_openapi::registry::{MetaApi, Registry};
use poem_openapi::{ApiResponse, Object, OpenApi, ResponseContent};

use super::body::{parse_json, JsonBody};
use super::connection::Connections;
use super::error::{ApiError, ErrorBody};
use super::metrics::{Metrics, CLIENT_CLOSED};
use super::response::{self, Encoded};
use crate::engine::{Engine, SubmitError};
use crate::pipeline::Pipelines;
use crate::request::generate::GenerateRequest;
use crate::request::img2img::Img2ImgRequest;
use crate::request::inpaint::InpaintRequest;
use crate::request::job::parse_generation;
use crate::request::Limits;

/// The routes and what they share.
#[derive(Clone)]
pub struct Api {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub connections: Connections,
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
    /// img2img's strength (`/img2img/` only).
    #[oai(skip_serializing_if_is_none)]
    pub strength: Option<f64>,
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
    Json(Json<Box<GenerateResult>>),
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
    // server's path normalisation, `/generate/`; [`Documented`] lists it as `/generate/`.
    #[oai(path = "/generate", method = "post", operation_id = "generate")]
    async fn generate(
        &self,
        headers: &HeaderMap,
        remote: &RemoteAddr,
        body: JsonBody<GenerateRequest>,
    ) -> Result<Generated, ApiError> {
        self.answer(headers, remote, body.bytes(), Pipelines::Txt2Img)
            .await
    }

    /// Generate images from an image and a prompt (img2img)
    ///
    /// As diffusers' StableDiffusionImg2ImgPipeline: `/generate/`'s fields plus `init_image`
    /// (base64 PNG, JPEG or WebP) and `strength` (how much of the schedule runs from the noised
    /// image). The same answers as `/generate/`; bodies up to 16 MiB.
    #[oai(path = "/img2img", method = "post", operation_id = "img2img")]
    async fn img2img(
        &self,
        headers: &HeaderMap,
        remote: &RemoteAddr,
        body: JsonBody<Img2ImgRequest>,
    ) -> Result<Generated, ApiError> {
        self.answer(headers, remote, body.bytes(), Pipelines::Img2Img)
            .await
    }

    /// Repaint the masked part of an image from a prompt (inpainting)
    ///
    /// As diffusers' StableDiffusionInpaintPipeline, with an ordinary model or an inpainting
    /// (9-channel) one: `/generate/`'s fields plus `image` and `mask` (base64 PNG, JPEG or WebP;
    /// white in the mask is repainted) and `strength` (default 1). The same answers as
    /// `/generate/`; bodies up to 16 MiB. An inpainting model serves only this route.
    #[oai(path = "/inpaint", method = "post", operation_id = "inpaint")]
    async fn inpaint(
        &self,
        headers: &HeaderMap,
        remote: &RemoteAddr,
        body: JsonBody<InpaintRequest>,
    ) -> Result<Generated, ApiError> {
        self.answer(headers, remote, body.bytes(), Pipelines::Inpaint)
            .await
    }

    /// The web page: one file built into the binary, driving the jobs API
    #[oai(path = "/", method = "get", hidden)]
    async fn page(&self) -> poem_openapi::payload::Html<&'static str> {
        poem_openapi::payload::Html(PAGE)
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

/// The web page (`GET /`).
const PAGE: &str = include_str!("page/index.html");

/// A random seed for requests that ask for one (-1 or none).
fn random_seed() -> u64 {
    u64::from(rand::random::<u32>())
}

impl Api {
    /// One generation route: counted in the request metrics (499 when the client went away).
    async fn answer(
        &self,
        headers: &HeaderMap,
        remote: &RemoteAddr,
        body: Result<Vec<u8>, ApiError>,
        pipeline: Pipelines,
    ) -> Result<Generated, ApiError> {
        let record = self.metrics.start_request();
        let client_gone = self.connections.client_gone(remote);
        let result = self
            .generate_images(headers, client_gone.clone(), body, pipeline)
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

    async fn generate_images(
        &self,
        headers: &HeaderMap,
        client_gone: Option<Arc<std::sync::atomic::AtomicBool>>,
        body: Result<Vec<u8>, ApiError>,
        pipeline: Pipelines,
    ) -> Result<Generated, ApiError> {
        let started = Instant::now();
        let accept = headers
            .get(header::ACCEPT)
            .map(|v| v.to_str().unwrap_or("?"));
        let format = response::negotiate(accept).ok_or_else(|| ApiError::NotAcceptable {
            accept: accept.unwrap_or("").chars().take(100).collect(),
        })?;
        let body = body?;
        let model = self.engine.model().ok_or(SubmitError::NotReady)?;
        let model_name = model.name.clone();
        let (validated, start) = parse_generation(
            pipeline,
            parse_json(&body)?,
            model,
            self.limits,
            model.latent_factor,
            random_seed,
        )?;
        model.check_start(&start)?;
        let request = validated.request;
        let strength = start.strength();
        let encode_start = start.clone();
        let ticket = self
            .engine
            .submit_from(request.clone(), start, client_gone)?;
        let output = ticket.wait().await?;

        let encode_started = Instant::now();
        let images = output.images;
        let seeds: Vec<u64> = images.iter().map(|g| g.seed).collect();
        let encode_request = request.clone();
        let encode_model = model_name.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            response::encode(
                format,
                &encode_request,
                &encode_model,
                &encode_start,
                &images,
            )
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
            Encoded::Json(images) => ImageOrJson::Json(Json(Box::new(GenerateResult {
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
                    strength,
                },
                timings: Timings {
                    queue_seconds: output.queued.as_secs_f64(),
                    generation_seconds: output.generation.as_secs_f64(),
                    encode_seconds: encode_started.elapsed().as_secs_f64(),
                    total_seconds: started.elapsed().as_secs_f64(),
                },
            }))),
        };
        Ok(Generated::Ok(content, x_seeds))
    }
}

/// [`Api`] as documented: the original API's path `/generate/` and `/img2img/`, `/inpaint/`,
/// with their trailing slash (the routes have none; the server's path normalisation makes them
/// answer both).
pub struct Documented(pub Api);

impl OpenApi for Documented {
    fn meta() -> Vec<MetaApi> {
        let mut apis = Api::meta();
        for path in apis.iter_mut().flat_map(|api| api.paths.iter_mut()) {
            if ["/generate", "/img2img", "/inpaint"].contains(&path.path.as_str()) {
                path.path.push('/');
            }
        }
        apis
    }

    fn register(registry: &mut Registry) {
        Api::register(registry);
    }

    fn add_routes(self, route_table: &mut HashMap<String, HashMap<Method, BoxEndpoint<'static>>>) {
        self.0.add_routes(route_table);
    }
}
