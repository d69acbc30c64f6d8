//! The engine's worker thread: start-up (load, warm-up), then batches. A batch is filled with
//! images in queue order (FIFO by job, the image the unit): first the images still to run of the
//! jobs already started, then queued jobs that share the batch's [`BatchKey`], up to
//! `max_batch` images; a job that cannot share it waits for the next batch, and so does
//! everything behind it. Each job is answered as soon as its last image is done or it is stopped.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Job, JobError, JobOutput, ModelInfo, ModelLoader, Shared, StartupError};
use crate::error::Fault;
use crate::image_io::RgbImage;
use crate::pipeline::{
    BatchRow, GeneratedImage, GenerationRequest, ImageGenerator, PreparedJob, Start, StepRow,
};
use crate::sampling::SchedulerKind;
use crate::Error;

pub(super) fn worker_main(
    shared: &Shared,
    load: ModelLoader,
    started: oneshot::Sender<Result<ModelInfo, StartupError>>,
) {
    let generator = match start_up(shared, load) {
        Ok(generator) => generator,
        Err(e) => {
            tracing::error!(error = %e, "engine start-up failed");
            shared.lock().closed = true;
            let _ = started.send(Err(e));
            return;
        }
    };
    shared.ready.store(true, Ordering::Release);
    if let Some(info) = shared.model.get() {
        let _ = started.send(Ok(info.clone()));
    }
    let mut worker = Worker {
        shared,
        generator: generator.as_ref(),
        active: Vec::new(),
    };
    while worker.fill() {
        worker.run_batch();
    }
    tracing::info!("engine stopped");
}

/// Loads the model and runs one warm-up generation at the smallest size.
fn start_up(shared: &Shared, load: ModelLoader) -> Result<Box<dyn ImageGenerator>, StartupError> {
    let started = Instant::now();
    let generator = match catch_unwind(AssertUnwindSafe(load)) {
        Ok(Ok(generator)) => generator,
        Ok(Err(e)) => return Err(StartupError::Load(e)),
        Err(panic) => return Err(StartupError::LoadPanicked(panic_message(panic.as_ref()))),
    };
    let info = ModelInfo::of(generator.as_ref());
    tracing::info!(
        model = %info.name,
        device = %info.device,
        seconds = started.elapsed().as_secs_f64(),
        "model loaded; warming up"
    );
    let side = warm_up_side(info.latent_factor);
    let warm_up = GenerationRequest {
        prompt: String::new(),
        negative_prompt: String::new(),
        width: side,
        height: side,
        steps: 1,
        cfg_scale: 7.0,
        seed: 0,
        scheduler: info
            .default_scheduler
            .clone()
            .unwrap_or(SchedulerKind::Ddim),
        number_of_images: 1,
    };
    let start = warm_up_start(&info, side);
    let _ = shared.model.set(info);
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| {
        start.run(generator.as_ref(), &warm_up, &mut |_| {
            !shared.abort.load(Ordering::Relaxed)
        })
    }));
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(Error::Cancelled)) => return Err(StartupError::WarmUp(JobError::ShuttingDown)),
        Ok(Err(e)) => return Err(StartupError::WarmUp(job_error(e))),
        Err(panic) => {
            return Err(StartupError::WarmUp(JobError::Panicked(panic_message(
                panic.as_ref(),
            ))))
        }
    }
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "warm-up done; ready"
    );
    Ok(generator)
}

/// txt2img, or for an inpainting model (which runs nothing else) a grey `side`² image with all of
/// it repainted.
fn warm_up_start(info: &ModelInfo, side: usize) -> Start {
    if !info.inpainting_model {
        return Start::Noise;
    }
    let plain = |value| {
        Arc::new(RgbImage {
            width: side,
            height: side,
            pixels: vec![value; side * side * 3],
        })
    };
    Start::Masked {
        image: plain(128),
        mask: plain(255),
        strength: 1.0,
    }
}

/// Width and height of the warm-up generation: 8 latent pixels (64 for SD 2.1), enough to run
/// every UNet block at a real (if small) size.
fn warm_up_side(latent_factor: usize) -> usize {
    8 * latent_factor
}

/// The worker's state between batches.
struct Worker<'a> {
    shared: &'a Shared,
    generator: &'a dyn ImageGenerator,
    /// Started jobs with images still to run, oldest first (all share one [`BatchKey`]).
    active: Vec<ActiveJob>,
}

/// A started job: prepared once, its images run in one batch or several.
struct ActiveJob {
    prepared: PreparedJob,
    state: JobState,
}

/// What the worker tracks of a started job besides its prepared inputs.
struct JobState {
    job: Job,
    started: Instant,
    queued: Duration,
    /// Images handed to batches so far (in index order).
    next_image: usize,
    images: Vec<Option<GeneratedImage>>,
    /// Answered (done, failed or stopped): it leaves after the batch.
    answered: bool,
}

impl JobState {
    fn images_to_run(&self) -> usize {
        if self.answered {
            return 0;
        }
        self.job.request.number_of_images - self.next_image
    }
}

impl Worker<'_> {
    fn max_batch(&self) -> usize {
        self.shared.config.max_batch.max(1)
    }

    /// Starts queued jobs while the next batch has room: FIFO by job, only jobs that share the
    /// started ones' key. Blocks while there is nothing to run; false once the queue is closed
    /// and nothing is left.
    fn fill(&mut self) -> bool {
        loop {
            let waiting: usize = self.active.iter().map(|a| a.state.images_to_run()).sum();
            if waiting >= self.max_batch() {
                return true;
            }
            let key = self.active.first().map(|a| a.state.job.key);
            let mut queue = self.shared.lock();
            let job = loop {
                match queue.jobs.front() {
                    Some(front) if key.is_some_and(|key| key != front.key) => return true,
                    Some(_) => {
                        if let Some(job) = queue.jobs.pop_front() {
                            break job;
                        }
                    }
                    None if !self.active.is_empty() => return true,
                    None if queue.closed => return false,
                    None => {
                        queue = self
                            .shared
                            .job_available
                            .wait(queue)
                            .unwrap_or_else(PoisonError::into_inner)
                    }
                }
            };
            self.shared.metrics.queue_depth.set(queue.jobs.len() as i64);
            queue.tell_positions();
            drop(queue);
            self.start(job);
        }
    }

    /// Prepares `job` and makes it active, or answers it at once (stopped while it waited, or
    /// failed to prepare).
    fn start(&mut self, job: Job) {
        let started = Instant::now();
        let queued = started.duration_since(job.enqueued);
        let metrics = &self.shared.metrics;
        metrics.queue_wait_seconds.observe(queued.as_secs_f64());
        let images = job.request.number_of_images;
        let mut state = JobState {
            job,
            started,
            queued,
            next_image: 0,
            images: (0..images).map(|_| None).collect(),
            answered: false,
        };
        if let Some(reason) = stop_reason(self.shared, &state.job, started) {
            finish(self.shared, &mut state, Err(reason));
            return;
        }
        self.shared
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((state.job.sequence, state.job.cancel.clone()));
        metrics.jobs_running.inc();
        if let Some(observer) = &state.job.observer {
            observer.started();
        }
        let generator = self.generator;
        let job = &state.job;
        match catch_unwind(AssertUnwindSafe(|| {
            generator.prepare(&job.request, &job.start)
        })) {
            Ok(Ok(prepared)) => self.active.push(ActiveJob { prepared, state }),
            Ok(Err(e)) => finish(self.shared, &mut state, Err(job_error(e))),
            Err(panic) => finish(
                self.shared,
                &mut state,
                Err(JobError::Panicked(panic_message(panic.as_ref()))),
            ),
        }
    }

    /// Runs the next batch: the active jobs' next images, oldest first, up to `max_batch`.
    fn run_batch(&mut self) {
        let max_batch = self.max_batch();
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (active job, image) per row
        for (a, active) in self.active.iter_mut().enumerate() {
            while active.state.images_to_run() > 0 && plan.len() < max_batch {
                plan.push((a, active.state.next_image));
                active.state.next_image += 1;
            }
        }
        if !plan.is_empty() {
            self.shared.metrics.batch_images.observe(plan.len() as f64);
            self.run_rows(&plan);
        }
        for active in &mut self.active {
            let state = &mut active.state;
            if !state.answered && state.images_to_run() == 0 {
                let images: Option<Vec<GeneratedImage>> =
                    std::mem::take(&mut state.images).into_iter().collect();
                // Every row files its image or answers its job, so a gap is a bug: say so
                // rather than leave the job waiting.
                let result = images
                    .map(|images| JobOutput {
                        images,
                        queued: state.queued,
                        generation: state.started.elapsed(),
                    })
                    .ok_or_else(|| JobError::Failed("a batch lost one of the job's images".into()));
                finish(self.shared, state, result);
            }
        }
        self.active.retain(|a| !a.state.answered);
    }

    /// Runs `plan`'s rows as one batch and files each row's image or error with its job.
    fn run_rows(&mut self, plan: &[(usize, usize)]) {
        let shared = self.shared;
        let generator = self.generator;
        let (prepared, mut states): (Vec<&PreparedJob>, Vec<&mut JobState>) = self
            .active
            .iter_mut()
            .map(|a| (&a.prepared, &mut a.state))
            .unzip();
        let rows: Vec<BatchRow<'_>> = plan
            .iter()
            .map(|&(a, image)| BatchRow {
                job: prepared[a],
                image,
            })
            .collect();
        let mut last_step: Option<Instant> = None;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            generator.run_batch(&rows, &mut |steps: &mut [StepRow<'_>]| {
                let now = Instant::now();
                // Step 1 also holds preparing the rows; the last one of a batch the decodes.
                if let (Some(last), Some(true)) =
                    (last_step, steps.first().map(|s| s.progress.step > 1))
                {
                    shared
                        .metrics
                        .step_seconds
                        .observe(now.duration_since(last).as_secs_f64());
                }
                last_step = Some(now);
                tell_steps(shared, plan, &mut states, steps, now);
            })
        }));
        match outcome {
            Ok(Ok(results)) => {
                for (&(a, image), result) in plan.iter().zip(results) {
                    let state = &mut states[a];
                    match result {
                        _ if state.answered => {}
                        Ok(generated) => state.images[image] = Some(generated),
                        Err(Error::Cancelled) => {
                            let reason = stop_reason(shared, &state.job, Instant::now());
                            finish(shared, state, Err(reason.unwrap_or(JobError::Cancelled)));
                        }
                        Err(e) => finish(shared, state, Err(job_error(e))),
                    }
                }
            }
            Ok(Err(e)) => {
                let error = job_error(e);
                for &(a, _) in plan {
                    if !states[a].answered {
                        finish(shared, states[a], Err(error.clone()));
                    }
                }
            }
            Err(panic) => {
                let error = JobError::Panicked(panic_message(panic.as_ref()));
                for &(a, _) in plan {
                    if !states[a].answered {
                        finish(shared, states[a], Err(error.clone()));
                    }
                }
            }
        }
    }
}

/// After a step: each job's observer hears once (its first row: the lowest image), and the rows
/// of jobs that must stop are dropped, the jobs answered at once.
fn tell_steps(
    shared: &Shared,
    plan: &[(usize, usize)],
    states: &mut [&mut JobState],
    steps: &mut [StepRow<'_>],
    now: Instant,
) {
    let mut told = vec![false; states.len()];
    for step in steps.iter_mut() {
        let Some(&(a, _)) = plan.get(step.row) else {
            continue;
        };
        let state = &mut states[a];
        if !state.answered {
            if let Some(reason) = stop_reason(shared, &state.job, now) {
                finish(shared, state, Err(reason));
            }
        }
        if state.answered {
            step.keep = false;
            continue;
        }
        if !told[a] {
            told[a] = true;
            if let Some(observer) = &state.job.observer {
                observer.step(&step.progress);
            }
        }
    }
}

/// Why `job` must stop now, if it must. The deadline first: a ticket that timed out also sets
/// the cancel flag.
fn stop_reason(shared: &Shared, job: &Job, now: Instant) -> Option<JobError> {
    if job.deadline.is_some_and(|deadline| now >= deadline) {
        Some(JobError::DeadlineExceeded(shared.config.request_timeout))
    } else if shared.abort.load(Ordering::Relaxed) {
        Some(JobError::ShuttingDown)
    } else if !job.wanted() {
        Some(JobError::Cancelled)
    } else {
        None
    }
}

/// Answers a job (once): metrics, the log line, the running list, the reply.
fn finish(shared: &Shared, state: &mut JobState, result: Result<JobOutput, JobError>) {
    if state.answered {
        return;
    }
    state.answered = true;
    let outcome = match &result {
        Ok(output) => {
            let redone = output.images.iter().filter(|g| g.decoded_in_f32).count();
            shared.metrics.vae_f32_decodes.inc_by(redone as u64);
            "ok"
        }
        Err(e) => e.outcome(),
    };
    shared.metrics.jobs.with_label_values(&[outcome]).inc();
    match &result {
        Ok(_) | Err(JobError::Cancelled) => tracing::info!(
            outcome,
            queued_s = state.queued.as_secs_f64(),
            run_s = state.started.elapsed().as_secs_f64(),
            "job finished"
        ),
        Err(e) => tracing::warn!(outcome, error = %e, "job failed"),
    }
    let sequence = state.job.sequence;
    let mut running = shared
        .running
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(i) = running.iter().position(|(s, _)| *s == sequence) {
        running.swap_remove(i);
        shared.metrics.jobs_running.dec();
    }
    drop(running);
    // The receiver is gone when the client went away; nothing to tell then.
    if let Some(reply) = state.job.reply.take() {
        let _ = reply.send(result);
    }
}

/// A generation error as the job's outcome, by whose fault it is. The error's source chain
/// is logged here, since the job error keeps only its message.
pub(super) fn job_error(e: Error) -> JobError {
    match e.fault() {
        Fault::Client => match e {
            Error::InvalidRequest(message) => JobError::Invalid(message),
            other => JobError::Invalid(other.to_string()),
        },
        Fault::Unavailable => JobError::Unavailable(e.to_string()),
        Fault::Cancelled => JobError::Cancelled,
        Fault::Bug => {
            tracing::error!(error = ?e, "generation failed (a bug)");
            JobError::Failed(e.to_string())
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
