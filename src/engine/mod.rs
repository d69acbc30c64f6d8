//! The engine: one worker thread owns the model and runs generation jobs from a bounded queue,
//! so the HTTP side never touches the model and a full queue is a cheap, immediate "no".
//!
//! Life of a job: [`Engine::submit`] admits it (or refuses at once: not ready, queue full,
//! shutting down) and hands back a [`Ticket`]; the worker takes it in queue order, skips it if
//! its client went away or its deadline passed while it waited, and runs its images in batches
//! with those of other jobs that share the UNet passes (up to [`EngineConfig::max_batch`]
//! images; see `worker`). A step callback drops the job's rows as soon as its ticket is dropped,
//! its deadline passes or the engine is aborted; the answer goes through a oneshot channel. A
//! panic inside a batch fails that batch's jobs only; the worker keeps serving.
//!
//! Start-up runs in the worker too: load the model, then one warm-up generation (1 step at the
//! smallest size); the engine is ready only after both, and reports how start-up went once.

mod worker;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::oneshot;

use crate::pipeline::{
    BatchKey, GeneratedImage, GenerationRequest, ImageGenerator, Progress, Start,
};
use crate::request::ValidationError;
use crate::sampling::SchedulerKind;
use crate::Error;

/// Loads the model inside the worker thread (so the server answers `/health` while it loads).
pub type ModelLoader = Box<dyn FnOnce() -> crate::Result<Box<dyn ImageGenerator>> + Send>;

/// [`EngineConfig::max_batch`] unless configured: one image at a time, on every device, until a
/// batch is measured faster per image there.
pub const DEFAULT_MAX_BATCH: usize = 1;

/// How the engine admits and bounds work.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Jobs that may wait while one runs; one more is refused with [`SubmitError::QueueFull`].
    pub queue_size: usize,
    /// Time from admission to answer; checked while queued and between denoising steps.
    pub request_timeout: Duration,
    /// Images per batch: queued jobs that share size, steps, scheduler and start step run their
    /// images together, up to this many (1: one image at a time).
    pub max_batch: usize,
}

/// What the HTTP side needs to know about the loaded model (defaults and limits).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub device: String,
    /// `(width, height)` used when a request gives none.
    pub native_size: (usize, usize),
    /// Width and height must be multiples of this.
    pub latent_factor: usize,
    /// The model's own scheduler, or why it cannot be used (then requests must name one).
    pub default_scheduler: std::result::Result<SchedulerKind, String>,
    /// An inpainting model ([`crate::config::is_inpainting_model`]): it runs inpainting only.
    pub inpainting_model: bool,
}

impl ModelInfo {
    /// What `generator` tells about its model.
    pub fn of(generator: &dyn ImageGenerator) -> Self {
        ModelInfo {
            name: generator.model_name().to_string(),
            device: generator.describe_device(),
            native_size: generator.native_size(),
            latent_factor: generator.latent_factor(),
            default_scheduler: generator.default_scheduler().map_err(|e| e.to_string()),
            inpainting_model: generator.inpainting_model(),
        }
    }

    /// Whether this model can run a generation from `start`: an inpainting model runs only
    /// [`Start::Masked`].
    pub fn check_start(&self, start: &Start) -> std::result::Result<(), ValidationError> {
        start
            .pipeline()
            .check_runs_on(&self.name, self.inpainting_model)
    }
}

/// The engine's Prometheus metrics; `server::metrics` registers them with the HTTP ones.
#[derive(Clone)]
pub struct EngineMetrics {
    /// `sd21_queue_depth`: jobs waiting (not counting the one running).
    pub queue_depth: IntGauge,
    /// `sd21_jobs_running`: jobs started and not yet answered.
    pub jobs_running: IntGauge,
    /// `sd21_step_duration_seconds`: one denoising step (UNet with guidance + scheduler).
    pub step_seconds: Histogram,
    /// `sd21_queue_wait_seconds`: time a job waited before the worker took it.
    pub queue_wait_seconds: Histogram,
    /// `sd21_batch_images`: images per batch the worker ran.
    pub batch_images: Histogram,
    /// `sd21_jobs_total{outcome}`: finished jobs by outcome (ok, cancelled, deadline, …).
    pub jobs: IntCounterVec,
    /// `sd21_vae_f32_decodes_total`: images whose device VAE decode overflowed and was redone in
    /// f32.
    pub vae_f32_decodes: IntCounter,
}

impl EngineMetrics {
    pub fn new() -> prometheus::Result<Self> {
        Ok(EngineMetrics {
            queue_depth: IntGauge::new("sd21_queue_depth", "Generation jobs waiting in the queue")?,
            jobs_running: IntGauge::new(
                "sd21_jobs_running",
                "Generation jobs started and not yet answered (in the running batch or waiting for the next)",
            )?,
            step_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "sd21_step_duration_seconds",
                    "Duration of one denoising step (UNet with guidance and scheduler update)",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
            )?,
            queue_wait_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "sd21_queue_wait_seconds",
                    "Time a generation job waited in the queue before it started",
                )
                .buckets(vec![
                    0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ]),
            )?,
            batch_images: Histogram::with_opts(
                HistogramOpts::new("sd21_batch_images", "Images per batch (rows of one UNet pass)")
                    .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]),
            )?,
            jobs: IntCounterVec::new(
                Opts::new("sd21_jobs_total", "Finished generation jobs by outcome"),
                &["outcome"],
            )?,
            vae_f32_decodes: IntCounter::new(
                "sd21_vae_f32_decodes_total",
                "Images whose VAE decode overflowed on the device and was redone in f32",
            )?,
        })
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.queue_depth.clone()))?;
        registry.register(Box::new(self.jobs_running.clone()))?;
        registry.register(Box::new(self.step_seconds.clone()))?;
        registry.register(Box::new(self.queue_wait_seconds.clone()))?;
        registry.register(Box::new(self.batch_images.clone()))?;
        registry.register(Box::new(self.jobs.clone()))?;
        registry.register(Box::new(self.vae_f32_decodes.clone()))
    }
}

/// Why a job was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the model is not ready yet (loading or warming up)")]
    NotReady,
    #[error("the queue is full ({capacity} requests waiting); retry later")]
    QueueFull { capacity: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Why an admitted job produced no images.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("cancelled: the client went away")]
    Cancelled,
    #[error("the request took longer than its deadline of {0:?}")]
    DeadlineExceeded(Duration),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The device ran out of memory or failed; retrying later may work.
    #[error("the device is unavailable: {0}")]
    Unavailable(String),
    /// A bug: a broken invariant, model file or configuration.
    #[error("generation failed: {0}")]
    Failed(String),
    #[error("generation failed (internal panic: {0})")]
    Panicked(String),
    #[error("the engine stopped")]
    EngineStopped,
}

impl JobError {
    /// The `outcome` label of `sd21_jobs_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            JobError::Cancelled => "cancelled",
            JobError::DeadlineExceeded(_) => "deadline",
            JobError::ShuttingDown => "shutdown",
            JobError::Invalid(_) => "invalid",
            JobError::Unavailable(_) => "unavailable",
            JobError::Failed(_) => "failed",
            JobError::Panicked(_) => "panicked",
            JobError::EngineStopped => "stopped",
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("loading the model: {0}")]
    Load(#[source] Error),
    #[error("loading the model panicked: {0}")]
    LoadPanicked(String),
    #[error("warm-up generation: {0}")]
    WarmUp(#[source] JobError),
}

/// A finished job.
#[derive(Debug, Clone)]
pub struct JobOutput {
    pub images: Vec<GeneratedImage>,
    /// Time spent waiting in the queue.
    pub queued: Duration,
    /// Time spent generating (all images).
    pub generation: Duration,
}

type JobResult = std::result::Result<JobOutput, JobError>;

/// An admitted job. Dropping it (e.g. the HTTP handler's future being dropped because the
/// client disconnected) cancels the job: before it starts, or at the next denoising step.
pub struct Ticket {
    cancel: Arc<AtomicBool>,
    reply: Option<oneshot::Receiver<JobResult>>,
    /// When the job must be answered by, and the timeout it came from.
    deadline: Option<(Instant, Duration)>,
    sequence: u64,
}

impl Ticket {
    /// Waits for the job's result, at most until its deadline.
    pub async fn wait(mut self) -> JobResult {
        let Some(reply) = self.reply.take() else {
            return Err(JobError::EngineStopped);
        };
        let Some((deadline, timeout)) = self.deadline else {
            return reply.await.unwrap_or(Err(JobError::EngineStopped));
        };
        // The worker enforces the deadline between steps; this also covers one very long step.
        let deadline = tokio::time::Instant::from_std(deadline);
        match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(JobError::EngineStopped),
            Err(_) => Err(JobError::DeadlineExceeded(timeout)),
        }
    }

    /// The job's number in this engine (for [`Engine::queue_position`] and [`Engine::cancel`]).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
}

/// Told what happens to a job, on the worker thread (keep it short: the queue may be locked).
pub trait JobObserver: Send + Sync {
    /// `ahead` jobs now wait before this one (0: it runs next).
    fn queued(&self, ahead: usize);
    /// The worker took the job.
    fn started(&self);
    /// A denoising step finished.
    fn step(&self, progress: &Progress<'_>);
}

/// How a job is admitted besides its request.
#[derive(Default)]
pub struct Admission {
    /// Raised by the caller when nobody wants the answer any more (the client went away).
    pub client_gone: Option<Arc<AtomicBool>>,
    /// Told about the job's queue position and progress.
    pub observer: Option<Arc<dyn JobObserver>>,
    /// Without a deadline: a job that runs until done or cancelled ([`Engine::cancel`]), for
    /// the asynchronous jobs API; with one, the engine's request timeout applies.
    pub no_deadline: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // After completion this is a no-op for the worker; before it, it cancels the job.
        self.cancel.store(true, Ordering::Relaxed);
    }
}

struct Job {
    sequence: u64,
    /// What it must share with other jobs to run in their batch.
    key: BatchKey,
    request: GenerationRequest,
    start: Start,
    observer: Option<Arc<dyn JobObserver>>,
    /// Raised when the ticket is dropped.
    cancel: Arc<AtomicBool>,
    /// Raised by the caller's own signal (e.g. the client's connection closed).
    client_gone: Option<Arc<AtomicBool>>,
    enqueued: Instant,
    deadline: Option<Instant>,
    /// Taken when the job is answered.
    reply: Option<oneshot::Sender<JobResult>>,
}

impl Job {
    /// False once the ticket was dropped or the client's own signal was raised.
    fn wanted(&self) -> bool {
        !self.cancel.load(Ordering::Relaxed)
            && !self
                .client_gone
                .as_ref()
                .is_some_and(|gone| gone.load(Ordering::Relaxed))
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    /// The next job's [`Ticket::sequence`].
    next_sequence: u64,
}

impl Queue {
    /// Tells every waiting job's observer its position.
    fn tell_positions(&self) {
        for (ahead, job) in self.jobs.iter().enumerate() {
            if let Some(observer) = &job.observer {
                observer.queued(ahead);
            }
        }
    }
}

struct Shared {
    config: EngineConfig,
    queue: Mutex<Queue>,
    job_available: Condvar,
    ready: AtomicBool,
    /// Set to stop the running job at its next step and fail the queued ones.
    abort: AtomicBool,
    model: OnceLock<ModelInfo>,
    metrics: EngineMetrics,
    /// The started jobs' sequence numbers and cancel flags.
    running: Mutex<Vec<(u64, Arc<AtomicBool>)>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; if something ever did, the queue is still valid.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle the server holds: admission, readiness, shutdown.
pub struct Engine {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the worker thread, which loads the model, warms it up and then serves jobs. The
    /// receiver says once whether start-up succeeded.
    pub fn start(
        config: EngineConfig,
        load: ModelLoader,
        metrics: EngineMetrics,
    ) -> std::io::Result<(Engine, oneshot::Receiver<Result<ModelInfo, StartupError>>)> {
        let shared = Arc::new(Shared {
            config,
            queue: Mutex::new(Queue::default()),
            job_available: Condvar::new(),
            ready: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            model: OnceLock::new(),
            metrics,
            running: Mutex::new(Vec::new()),
        });
        let (started_tx, started_rx) = oneshot::channel();
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new()
            .name("sd21-engine".into())
            .spawn(move || worker::worker_main(&worker_shared, load, started_tx))?;
        Ok((
            Engine {
                shared,
                worker: Mutex::new(Some(worker)),
            },
            started_rx,
        ))
    }

    /// Admits a txt2img job or refuses it at once (see [`Engine::submit_from`]).
    pub fn submit(
        &self,
        request: GenerationRequest,
        client_gone: Option<Arc<AtomicBool>>,
    ) -> Result<Ticket, SubmitError> {
        self.submit_from(request, Start::Noise, client_gone)
    }

    /// Admits a job starting from `start` or refuses it at once. The job is cancelled when its
    /// ticket is dropped, or when `client_gone` (if given) is raised.
    pub fn submit_from(
        &self,
        request: GenerationRequest,
        start: Start,
        client_gone: Option<Arc<AtomicBool>>,
    ) -> Result<Ticket, SubmitError> {
        let admission = Admission {
            client_gone,
            ..Admission::default()
        };
        self.admit(request, start, admission)
    }

    /// Admits a job starting from `start` as `admission` says, or refuses it at once. The job is
    /// cancelled when its ticket is dropped.
    pub fn admit(
        &self,
        request: GenerationRequest,
        start: Start,
        admission: Admission,
    ) -> Result<Ticket, SubmitError> {
        if !self.is_ready() {
            return Err(SubmitError::NotReady);
        }
        let mut queue = self.shared.lock();
        if queue.closed {
            return Err(SubmitError::ShuttingDown);
        }
        let capacity = self.shared.config.queue_size;
        if queue.jobs.len() >= capacity {
            // Jobs whose clients went away need no slot: drop them (nobody awaits the answer).
            let before = queue.jobs.len();
            queue.jobs.retain(|job| job.wanted());
            let dropped = before - queue.jobs.len();
            self.shared
                .metrics
                .jobs
                .with_label_values(&[JobError::Cancelled.outcome()])
                .inc_by(dropped as u64);
            self.shared.metrics.queue_depth.set(queue.jobs.len() as i64);
        }
        if queue.jobs.len() >= capacity {
            return Err(SubmitError::QueueFull { capacity });
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let (reply_tx, reply_rx) = oneshot::channel();
        let now = Instant::now();
        let timeout = self.shared.config.request_timeout;
        let deadline = (!admission.no_deadline).then_some((now + timeout, timeout));
        let sequence = queue.next_sequence;
        queue.next_sequence += 1;
        if let Some(observer) = &admission.observer {
            observer.queued(queue.jobs.len());
        }
        queue.jobs.push_back(Job {
            sequence,
            key: BatchKey::of(&request, &start),
            request,
            start,
            observer: admission.observer,
            cancel: cancel.clone(),
            client_gone: admission.client_gone,
            enqueued: now,
            deadline: deadline.map(|(at, _)| at),
            reply: Some(reply_tx),
        });
        self.shared.metrics.queue_depth.set(queue.jobs.len() as i64);
        drop(queue);
        self.shared.job_available.notify_one();
        Ok(Ticket {
            cancel,
            reply: Some(reply_rx),
            deadline,
            sequence,
        })
    }

    /// How many jobs wait before job `sequence`; `None` when it is not waiting (running or
    /// finished).
    pub fn queue_position(&self, sequence: u64) -> Option<usize> {
        self.shared
            .lock()
            .jobs
            .iter()
            .position(|job| job.sequence == sequence)
    }

    /// Cancels job `sequence`: a waiting job leaves the queue at once (its ticket answers
    /// [`JobError::Cancelled`] and the jobs behind it move up); a running one stops at its next
    /// step. False when the engine no longer knows it.
    pub fn cancel(&self, sequence: u64) -> bool {
        let mut queue = self.shared.lock();
        let Some(index) = queue.jobs.iter().position(|job| job.sequence == sequence) else {
            drop(queue);
            return self.cancel_running(sequence);
        };
        let Some(job) = queue.jobs.remove(index) else {
            return false;
        };
        self.shared.metrics.queue_depth.set(queue.jobs.len() as i64);
        queue.tell_positions();
        drop(queue);
        job.cancel.store(true, Ordering::Relaxed);
        self.shared
            .metrics
            .jobs
            .with_label_values(&[JobError::Cancelled.outcome()])
            .inc();
        if let Some(reply) = job.reply {
            let _ = reply.send(Err(JobError::Cancelled));
        }
        true
    }

    /// Raises the cancel flag of job `sequence` when it has started.
    fn cancel_running(&self, sequence: u64) -> bool {
        let running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match running.iter().find(|(s, _)| *s == sequence) {
            Some((_, cancel)) => {
                cancel.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// True once the model is loaded and the warm-up generation succeeded.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// The loaded model's description (None while loading).
    pub fn model(&self) -> Option<&ModelInfo> {
        self.shared.model.get()
    }

    /// Jobs waiting (not counting the one running).
    pub fn queue_depth(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    /// Stops admitting jobs; the worker finishes the queued ones and exits.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.job_available.notify_all();
    }

    /// Closes the queue, stops the running job at its next step and fails the queued ones.
    pub fn abort(&self) {
        self.shared.abort.store(true, Ordering::Relaxed);
        self.close();
    }

    /// Waits up to `timeout` for the worker thread to exit (after [`Engine::close`] or
    /// [`Engine::abort`]); true if it did.
    pub async fn join(&self, timeout: Duration) -> bool {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let finished = {
                let worker = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
                worker.as_ref().is_none_or(|w| w.is_finished())
            };
            if finished {
                let handle = self
                    .worker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if let Some(handle) = handle {
                    // The worker catches job panics; a panic escaping it is already logged.
                    let _ = handle.join();
                }
                return true;
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeGenerator;

    fn request(prompt: &str) -> GenerationRequest {
        GenerationRequest {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            steps: 2,
            cfg_scale: 7.0,
            seed: 1,
            scheduler: SchedulerKind::Ddim,
            number_of_images: 2,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    fn start(queue_size: usize, timeout: Duration) -> (Engine, tokio::runtime::Runtime) {
        start_batching(queue_size, timeout, 1)
    }

    fn start_batching(
        queue_size: usize,
        timeout: Duration,
        max_batch: usize,
    ) -> (Engine, tokio::runtime::Runtime) {
        let rt = runtime();
        let metrics = EngineMetrics::new().expect("metrics");
        let (engine, started) = Engine::start(
            EngineConfig {
                queue_size,
                request_timeout: timeout,
                max_batch,
            },
            FakeGenerator::new(SchedulerKind::Ddim).loader(),
            metrics,
        )
        .expect("thread");
        let info = rt.block_on(started).expect("reply").expect("start-up");
        assert_eq!(info.native_size, (64, 64));
        assert!(engine.is_ready());
        (engine, rt)
    }

    /// Waits (bounded) until the worker has picked up a job.
    fn wait_running(engine: &Engine) {
        wait_jobs_running(engine, 1);
    }

    /// Waits (bounded) until `n` jobs have started and are not answered.
    fn wait_jobs_running(engine: &Engine, n: i64) {
        for _ in 0..5000 {
            if engine.shared.metrics.jobs_running.get() == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("{n} jobs never ran at once");
    }

    fn images(prompt: &str, number_of_images: usize) -> GenerationRequest {
        GenerationRequest {
            number_of_images,
            ..request(prompt)
        }
    }

    #[test]
    fn queued_jobs_share_batches_in_queue_order_up_to_max_batch() {
        let (engine, rt) = start_batching(8, Duration::from_secs(60), 4);
        let blocker = engine.submit(images("slow", 1), None).expect("admitted");
        wait_running(&engine);
        let b = engine.submit(images("b", 2), None).expect("admitted");
        let c = engine.submit(images("c", 1), None).expect("admitted");
        let d = engine.submit(images("d", 3), None).expect("admitted");
        let other_size = GenerationRequest {
            width: 72,
            ..images("e", 1)
        };
        let e = engine.submit(other_size, None).expect("admitted");
        drop(blocker);
        let seeds = |ticket: Ticket| -> Vec<u64> {
            let out = rt.block_on(ticket.wait()).expect("ok");
            out.images.iter().map(|i| i.seed).collect()
        };
        assert_eq!(seeds(b), [1, 2]);
        assert_eq!(seeds(c), [1]);
        assert_eq!(seeds(d), [1, 2, 3]);
        assert_eq!(seeds(e), [1]);
        // Batches: the blocker alone; b0 b1 c0 d0; d1 d2 (e cannot share it, so it waits); e.
        let batches = &engine.shared.metrics.batch_images;
        assert_eq!(batches.get_sample_count(), 4);
        assert_eq!(batches.get_sample_sum(), 8.0);
    }

    #[test]
    fn cancelling_one_job_drops_its_rows_and_its_batch_goes_on() {
        let (engine, rt) = start_batching(8, Duration::from_secs(60), 4);
        let blocker = engine.submit(images("slow", 1), None).expect("admitted");
        wait_running(&engine);
        let x = engine.submit(images("slow", 1), None).expect("admitted");
        let y = engine.submit(images("slow", 2), None).expect("admitted");
        drop(blocker);
        wait_jobs_running(&engine, 2);
        assert!(engine.cancel(x.sequence()));
        assert_eq!(rt.block_on(x.wait()).unwrap_err(), JobError::Cancelled);
        // y's rows still run in the same batch.
        assert_eq!(engine.shared.metrics.jobs_running.get(), 1);
        assert_eq!(engine.shared.metrics.batch_images.get_sample_count(), 2);
        drop(y);
        wait_jobs_running(&engine, 0);
        assert_eq!(engine.shared.metrics.batch_images.get_sample_count(), 2);
    }

    #[test]
    fn jobs_run_and_image_i_uses_seed_plus_i() {
        let (engine, rt) = start(4, Duration::from_secs(60));
        let out = rt
            .block_on(
                engine
                    .submit(request("a cat"), None)
                    .expect("admitted")
                    .wait(),
            )
            .expect("ok");
        let seeds: Vec<u64> = out.images.iter().map(|i| i.seed).collect();
        assert_eq!(seeds, [1, 2]);
    }

    #[test]
    fn failures_and_panics_fail_one_job_and_the_worker_survives() {
        let (engine, rt) = start(4, Duration::from_secs(60));
        let oom = rt.block_on(
            engine
                .submit(request("oom"), None)
                .expect("admitted")
                .wait(),
        );
        assert!(
            matches!(oom, Err(JobError::Unavailable(ref m)) if m.contains("out of memory")),
            "{oom:?}"
        );
        let panicked = rt.block_on(
            engine
                .submit(request("panic"), None)
                .expect("admitted")
                .wait(),
        );
        assert_eq!(panicked.unwrap_err(), JobError::Panicked("boom".into()));
        let ok = rt.block_on(
            engine
                .submit(request("fine"), None)
                .expect("admitted")
                .wait(),
        );
        assert!(ok.is_ok());
        assert_eq!(
            engine
                .shared
                .metrics
                .jobs
                .with_label_values(&["panicked"])
                .get(),
            1
        );
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_a_dropped_ticket_cancels() {
        let (engine, rt) = start(1, Duration::from_secs(60));
        let running = engine.submit(request("slow"), None).expect("admitted");
        wait_running(&engine);
        let waiting = engine.submit(request("slow"), None).expect("queued");
        assert_eq!(engine.queue_depth(), 1);
        assert_eq!(
            engine.submit(request("x"), None).err(),
            Some(SubmitError::QueueFull { capacity: 1 })
        );
        // Dropping both tickets cancels the queued job before it starts and the running one
        // at its next step; the engine then serves again.
        drop(waiting);
        drop(running);
        let ok = rt.block_on(
            engine
                .submit(request("fine"), None)
                .expect("admitted")
                .wait(),
        );
        assert!(ok.is_ok());
        assert_eq!(
            engine
                .shared
                .metrics
                .jobs
                .with_label_values(&["cancelled"])
                .get(),
            2
        );
    }

    #[test]
    fn a_raised_client_gone_flag_cancels_the_running_job() {
        let (engine, rt) = start(1, Duration::from_secs(60));
        let gone = Arc::new(AtomicBool::new(false));
        let ticket = engine
            .submit(request("slow"), Some(gone.clone()))
            .expect("admitted");
        wait_running(&engine);
        gone.store(true, Ordering::Relaxed);
        assert_eq!(rt.block_on(ticket.wait()).unwrap_err(), JobError::Cancelled);
    }

    #[test]
    fn the_deadline_stops_a_running_job() {
        let (engine, rt) = start(1, Duration::from_millis(50));
        let result = rt.block_on(
            engine
                .submit(request("slow"), None)
                .expect("admitted")
                .wait(),
        );
        assert!(matches!(result, Err(JobError::DeadlineExceeded(_))));
        // The worker notices the deadline between steps too, and moves on.
        engine.close();
        assert!(rt.block_on(engine.join(Duration::from_secs(30))));
        assert_eq!(
            engine
                .shared
                .metrics
                .jobs
                .with_label_values(&["deadline"])
                .get(),
            1
        );
    }

    #[test]
    fn abort_stops_the_running_job_and_the_worker_exits() {
        let (engine, rt) = start(2, Duration::from_secs(60));
        let ticket = engine.submit(request("slow"), None).expect("admitted");
        wait_running(&engine);
        engine.abort();
        assert_eq!(
            rt.block_on(ticket.wait()).unwrap_err(),
            JobError::ShuttingDown
        );
        assert!(rt.block_on(engine.join(Duration::from_secs(30))));
        assert_eq!(
            engine.submit(request("x"), None).err(),
            Some(SubmitError::ShuttingDown)
        );
    }

    #[test]
    fn a_failing_load_or_warm_up_is_reported() {
        let rt = runtime();
        let (_engine, started) = Engine::start(
            EngineConfig {
                queue_size: 1,
                request_timeout: Duration::from_secs(1),
                max_batch: 1,
            },
            Box::new(|| Err(Error::Config("no such model".into()))),
            EngineMetrics::new().expect("metrics"),
        )
        .expect("thread");
        let err = rt.block_on(started).expect("reply").unwrap_err();
        assert!(err.to_string().contains("no such model"), "{err}");
    }
}
