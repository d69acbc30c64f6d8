//! The asynchronous jobs API: `POST /jobs` (any generation body, by `kind`) → 202 and an id;
//! `GET /jobs/{id}` (status, queue position, progress, ETA, seeds, error, image URLs);
//! `GET /jobs/{id}/events` (Server-Sent Events, resumable with `Last-Event-ID`);
//! `GET /jobs/{id}/images/{i}.png`; `DELETE /jobs/{id}`. Jobs run on the same engine as the
//! synchronous routes; `store.rs` keeps them in memory.

pub mod store;

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, Stream, StreamExt};
use poem::http::HeaderMap;
use poem::web::sse::Event;
use poem_openapi::param::Path;
use poem_openapi::payload::{Binary, EventStream, Json};
use poem_openapi::types::ToJSON;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::body::{parse_json, JsonBody};
use super::error::ApiError;
use crate::engine::{Admission, Engine};
use crate::pipeline::Start;
use crate::request::job::{kind_name, JobRequest, JobRules};
use crate::request::Limits;
use store::{FinishedImages, JobEvent, JobStore, NewJob, Snapshot};

/// The jobs routes and what they share.
#[derive(Clone)]
pub struct JobsApi {
    pub engine: Arc<Engine>,
    pub limits: Limits,
    pub store: Arc<JobStore>,
}

/// `POST /jobs`'s answer.
#[derive(Debug, Object)]
pub struct JobCreated {
    /// 128 random bits, hex: the only way to reach the job (besides the API key, when set).
    pub id: String,
    pub status_url: String,
    pub events_url: String,
    /// Jobs ahead of this one (0: it runs next).
    pub queue_position: u64,
}

/// Steps done.
#[derive(Debug, Object)]
pub struct JobProgress {
    /// Steps done of the current image (1-based).
    pub step: u64,
    /// Steps per image (PNDM runs one more than `steps`, as in diffusers).
    pub steps: u64,
    /// The current image (0-based).
    pub image: u64,
    pub images: u64,
}

/// A job as it is now (and in each event, as it was then).
#[derive(Debug, Object)]
pub struct JobState {
    pub id: String,
    /// txt2img, img2img or inpaint.
    pub kind: String,
    /// queued, running, done, failed or cancelled.
    pub status: String,
    /// Jobs ahead of it while queued (0: it runs next).
    #[oai(skip_serializing_if_is_none)]
    pub queue_position: Option<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub progress: Option<JobProgress>,
    /// Seconds since it started running (0 while queued).
    pub elapsed_seconds: f64,
    /// Seconds left, from this job's measured step times (while running).
    #[oai(skip_serializing_if_is_none)]
    pub eta_seconds: Option<f64>,
    /// The seeds of its images (when done).
    pub seeds: Vec<u64>,
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
    /// `GET` URLs of the result PNGs (when done).
    pub images: Vec<String>,
}

/// One Server-Sent Event's data: the job's state then, and its type.
#[derive(Debug, Object)]
pub struct JobEventBody {
    /// queued, step, preview, done, failed or cancelled (also the SSE `event:` name).
    #[oai(rename = "type")]
    pub event_type: String,
    /// The SSE id (1, 2, …): send it back as `Last-Event-ID` to resume after it.
    pub event_id: u64,
    #[oai(flatten)]
    pub state: JobState,
    /// `preview` events: a PNG data URL of the cheap latent preview (latent size).
    #[oai(skip_serializing_if_is_none)]
    pub preview: Option<String>,
}

#[derive(ApiResponse)]
pub enum Accepted {
    /// The job is queued.
    #[oai(status = 202)]
    Created(Json<JobCreated>),
}

#[derive(ApiResponse)]
pub enum JobImage {
    /// The PNG, with its A1111 `parameters` chunk.
    #[oai(status = 200, content_type = "image/png")]
    Png(Binary<Vec<u8>>),
}

fn state(s: &Snapshot) -> JobState {
    JobState {
        id: s.id.clone(),
        kind: kind_name(s.kind).to_string(),
        status: s.status.name().to_string(),
        queue_position: s.queue_position.map(|p| p as u64),
        progress: s.progress.map(|p| JobProgress {
            step: p.step as u64,
            steps: p.steps as u64,
            image: p.image as u64,
            images: p.images as u64,
        }),
        elapsed_seconds: s.elapsed.as_secs_f64(),
        eta_seconds: s.eta.map(|d| d.as_secs_f64()),
        seeds: s.seeds.clone(),
        error: s.error.clone(),
        images: (0..s.images)
            .map(|i| format!("/jobs/{}/images/{i}.png", s.id))
            .collect(),
    }
}

fn event_body(event: &JobEvent) -> JobEventBody {
    JobEventBody {
        event_type: event.kind.name().to_string(),
        event_id: event.id,
        state: state(&event.snapshot),
        preview: event.preview.clone(),
    }
}

#[OpenApi]
impl JobsApi {
    /// Queue a generation job
    ///
    /// Any generation body with `kind` (txt2img when absent, img2img, inpaint): the same fields
    /// and checks as `/generate/`, `/img2img/` and `/inpaint/`; `preview_every` asks for preview
    /// images in the events. Answers 202 at once. Jobs live in memory: a restart loses them.
    #[oai(path = "/jobs", method = "post", operation_id = "create_job")]
    async fn create(&self, body: JsonBody<JobRequest>) -> Result<Accepted, ApiError> {
        let model = self
            .engine
            .model()
            .ok_or(crate::engine::SubmitError::NotReady)?;
        let rules = JobRules::new(self.limits, model.latent_factor);
        let job = rules.parse(parse_json(&body.bytes()?)?, model, random_seed)?;
        model.check_start(&job.start)?;
        let request = job.generation.request;
        let kind = job.start.pipeline();
        let id = self.store.create(NewJob {
            kind,
            request: request.clone(),
            preview_every: job.preview_every,
        });
        let admission = Admission {
            observer: Some(self.store.observer(id.clone())),
            no_deadline: true,
            ..Admission::default()
        };
        let ticket = match self
            .engine
            .admit(request.clone(), job.start.clone(), admission)
        {
            Ok(ticket) => ticket,
            Err(e) => {
                self.store.remove(&id);
                return Err(e.into());
            }
        };
        self.store.set_sequence(&id, ticket.sequence());
        let queue_position = self.engine.queue_position(ticket.sequence()).unwrap_or(0) as u64;
        let (store, job_id, model_name) = (self.store.clone(), id.clone(), model.name.clone());
        tokio::spawn(async move {
            let result = ticket.wait().await;
            let start = job.start;
            let encoded = tokio::task::spawn_blocking(move || {
                result.map(|output| encode(&request, &model_name, &start, output))
            })
            .await;
            match encoded {
                Ok(Ok(Ok(images))) => store.finish(&job_id, Ok(images)),
                Ok(Ok(Err(message))) => {
                    store.finish(&job_id, Err(crate::engine::JobError::Failed(message)))
                }
                Ok(Err(e)) => store.finish(&job_id, Err(e)),
                Err(e) => store.finish(
                    &job_id,
                    Err(crate::engine::JobError::Failed(format!(
                        "encoding task: {e}"
                    ))),
                ),
            }
        });
        tracing::info!(job = %id, kind = kind_name(kind), "job queued");
        Ok(Accepted::Created(Json(JobCreated {
            status_url: format!("/jobs/{id}"),
            events_url: format!("/jobs/{id}/events"),
            id,
            queue_position,
        })))
    }

    /// A job's status, progress and results
    #[oai(path = "/jobs/:id", method = "get", operation_id = "get_job")]
    async fn get(&self, id: Path<String>) -> Result<Json<JobState>, ApiError> {
        let snapshot = self.store.snapshot(&id).ok_or_else(|| not_found(&id))?;
        Ok(Json(state(&snapshot)))
    }

    /// Cancel a queued or running job
    ///
    /// A queued job leaves the queue at once; a running one stops at its next step. Answers the
    /// job's state (cancelled); 409 when it had already finished.
    #[oai(path = "/jobs/:id", method = "delete", operation_id = "cancel_job")]
    async fn cancel(&self, id: Path<String>) -> Result<Json<JobState>, ApiError> {
        match self.store.cancel(&id).ok_or_else(|| not_found(&id))? {
            Ok(sequence) => {
                self.engine.cancel(sequence);
                tracing::info!(job = %id.0, "job cancelled");
            }
            Err(status) => {
                return Err(ApiError::JobFinished {
                    id: id.0,
                    status: status.name(),
                })
            }
        }
        let snapshot = self.store.snapshot(&id).ok_or_else(|| not_found(&id))?;
        Ok(Json(state(&snapshot)))
    }

    /// A job's events (Server-Sent Events)
    ///
    /// `queued` (when its position changes), `step` (every step), `preview` (every
    /// `preview_every` steps when asked), then one of `done`, `failed`, `cancelled`, after which
    /// the stream ends. Each event's data is the job's state with `type` and `event_id`; the
    /// SSE id is `event_id`, so a client reconnecting with `Last-Event-ID` gets only what it
    /// missed.
    #[oai(path = "/jobs/:id/events", method = "get", operation_id = "job_events")]
    async fn events(
        &self,
        id: Path<String>,
        headers: &HeaderMap,
    ) -> Result<EventStream<std::pin::Pin<Box<dyn Stream<Item = JobEventBody> + Send>>>, ApiError>
    {
        let after = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if self.store.snapshot(&id).is_none() {
            return Err(not_found(&id));
        }
        let stream = event_stream(self.store.clone(), id.0, after);
        Ok(EventStream::new(stream)
            .keep_alive(Duration::from_secs(15))
            .to_event(|body: JobEventBody| {
                let data = body.to_json_string();
                Event::message(data)
                    .event_type(body.event_type.clone())
                    .id(body.event_id.to_string())
            }))
    }

    /// A result image of a finished job
    #[oai(
        path = "/jobs/:id/images/:name",
        method = "get",
        operation_id = "job_image"
    )]
    async fn image(&self, id: Path<String>, name: Path<String>) -> Result<JobImage, ApiError> {
        let index = name
            .strip_suffix(".png")
            .and_then(|i| i.parse::<usize>().ok())
            .ok_or_else(|| not_found(&id))?;
        let png = self.store.image(&id, index).ok_or_else(|| not_found(&id))?;
        Ok(JobImage::Png(Binary(png.as_ref().clone())))
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::JobNotFound {
        id: id.chars().take(40).collect(),
    }
}

/// A random seed for jobs that ask for one (-1 or none).
fn random_seed() -> u64 {
    u64::from(rand::random::<u32>())
}

/// The PNGs of a finished job, each with its own seed's parameters.
fn encode(
    request: &crate::pipeline::GenerationRequest,
    model: &str,
    start: &Start,
    output: crate::engine::JobOutput,
) -> Result<FinishedImages, String> {
    let seeds = output.images.iter().map(|g| g.seed).collect();
    let pngs = output
        .images
        .iter()
        .map(|g| {
            let parameters = super::response::parameters(request, model, g.seed, start);
            crate::image_io::encode_png(&g.image, Some(&parameters)).map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    Ok(FinishedImages { seeds, pngs })
}

/// The job's events after `after`, then each new one as it comes, until a final one.
fn event_stream(
    store: Arc<JobStore>,
    id: String,
    after: u64,
) -> std::pin::Pin<Box<dyn Stream<Item = JobEventBody> + Send>> {
    let state = (store, id, after, false);
    let batches = stream::unfold(state, |(store, id, after, ended)| async move {
        if ended {
            return None;
        }
        let (mut events, mut changed) = store.events_after(&id, after)?;
        while events.is_empty() {
            changed.changed().await.ok()?;
            events = store.events_after(&id, after)?.0;
        }
        let last = events.last().map_or(after, |e| e.id);
        let ended = events.iter().any(|e| e.kind.is_final());
        let bodies: Vec<JobEventBody> = events.iter().map(event_body).collect();
        Some((stream::iter(bodies), (store, id, last, ended)))
    });
    Box::pin(batches.flatten())
}
