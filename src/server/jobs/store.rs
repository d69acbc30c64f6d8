//! The asynchronous jobs in memory: each job's status, progress, event log and results, kept
//! for `--job-ttl` after it finishes within `--max-stored-bytes` (the oldest finished go first).
//! A restart loses them. Lock order: the engine's queue, then this store (the engine tells the
//! store about a job while it holds its queue); the store never calls the engine while locked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::watch;

use crate::engine::{JobError, JobObserver};
use crate::image_io::encode_png;
use crate::pipeline::{GenerationRequest, Pipelines, Progress};
use crate::preview::latent_preview;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// What kind of event a job's log holds; the SSE `event:` name is [`EventKind::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Queued,
    Step,
    Preview,
    Done,
    Failed,
    Cancelled,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Queued => "queued",
            EventKind::Step => "step",
            EventKind::Preview => "preview",
            EventKind::Done => "done",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
        }
    }

    /// The job's last event.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            EventKind::Done | EventKind::Failed | EventKind::Cancelled
        )
    }
}

/// Steps done, as `GET /jobs/{id}` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    /// Steps done of the current image (1-based).
    pub step: usize,
    /// Steps per image.
    pub steps: usize,
    /// Index of the current image (the first, when several run in one batch).
    pub image: usize,
    pub images: usize,
    /// Images of the job taking these steps together (one batch).
    pub images_at_once: usize,
}

/// A job as `GET /jobs/{id}` shows it at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub id: String,
    pub kind: Pipelines,
    pub status: JobStatus,
    /// Jobs ahead of it while queued (0: it runs next).
    pub queue_position: Option<usize>,
    pub progress: Option<StepProgress>,
    pub elapsed: Duration,
    /// From this job's measured steps; `None` before its first.
    pub eta: Option<Duration>,
    pub seeds: Vec<u64>,
    pub error: Option<String>,
    /// Result images (when done).
    pub images: usize,
}

/// One entry of a job's event log: its id (1, 2, …) for `Last-Event-ID`.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub id: u64,
    pub kind: EventKind,
    pub snapshot: Snapshot,
    /// `preview` events: a `data:image/png;base64,…` URL.
    pub preview: Option<String>,
}

/// How long and how much the store keeps.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// A finished job is dropped this long after it finished.
    pub ttl: Duration,
    /// Result images, previews and event logs together; beyond it the oldest finished jobs go.
    pub max_stored_bytes: usize,
}

/// What one event costs in the memory bound besides its preview (a generous JSON size).
const EVENT_BYTES: usize = 512;

struct Record {
    kind: Pipelines,
    request: GenerationRequest,
    preview_every: Option<usize>,
    /// The engine's number for it (to cancel it).
    sequence: u64,
    status: JobStatus,
    started: Option<Instant>,
    finished: Option<Instant>,
    queue_position: Option<usize>,
    progress: Option<StepProgress>,
    seeds: Vec<u64>,
    error: Option<String>,
    images: Vec<Arc<Vec<u8>>>,
    events: Vec<JobEvent>,
    stored_bytes: usize,
    /// The number of events, for streams waiting for the next.
    notify: watch::Sender<usize>,
}

impl Record {
    fn snapshot(&self, id: &str, now: Instant) -> Snapshot {
        Snapshot {
            id: id.to_string(),
            kind: self.kind,
            status: self.status,
            queue_position: self
                .queue_position
                .filter(|_| self.status == JobStatus::Queued),
            progress: self.progress,
            elapsed: self.started.map_or(Duration::ZERO, |started| {
                self.finished.unwrap_or(now).duration_since(started)
            }),
            eta: self.eta(now),
            seeds: self.seeds.clone(),
            error: self.error.clone(),
            images: self.images.len(),
        }
    }

    /// Remaining image-steps × the mean time per image-step so far (images before the current
    /// ones are done; the current ones run together).
    fn eta(&self, now: Instant) -> Option<Duration> {
        if self.status != JobStatus::Running {
            return None;
        }
        let (started, p) = (self.started?, self.progress?);
        let total = p.steps * p.images;
        let done = p.image * p.steps + p.step * p.images_at_once.max(1);
        if done == 0 {
            return None;
        }
        let per_step = now.duration_since(started).as_secs_f64() / done as f64;
        Some(Duration::from_secs_f64(
            per_step * total.saturating_sub(done) as f64,
        ))
    }

    fn push(&mut self, id: &str, kind: EventKind, preview: Option<String>, now: Instant) {
        self.stored_bytes += EVENT_BYTES + preview.as_ref().map_or(0, String::len);
        let event = JobEvent {
            id: self.events.len() as u64 + 1,
            kind,
            snapshot: self.snapshot(id, now),
            preview,
        };
        self.events.push(event);
        self.notify.send_replace(self.events.len());
    }
}

/// The jobs, by id.
pub struct JobStore {
    limits: StoreLimits,
    jobs: Mutex<HashMap<String, Record>>,
}

/// A new job's description.
pub struct NewJob {
    pub kind: Pipelines,
    pub request: GenerationRequest,
    pub preview_every: Option<usize>,
}

/// A finished job's results: PNGs (with their parameters) and their seeds.
pub struct FinishedImages {
    pub seeds: Vec<u64>,
    pub pngs: Vec<Vec<u8>>,
}

impl JobStore {
    pub fn new(limits: StoreLimits) -> Arc<Self> {
        Arc::new(JobStore {
            limits,
            jobs: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Record>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a job under a new random id (128 bits, hex) and returns the id.
    pub fn create(&self, job: NewJob) -> String {
        let id = format!("{:032x}", rand::random::<u128>());
        let (notify, _) = watch::channel(0);
        let record = Record {
            kind: job.kind,
            request: job.request,
            preview_every: job.preview_every,
            sequence: u64::MAX,
            status: JobStatus::Queued,
            started: None,
            finished: None,
            queue_position: None,
            progress: None,
            seeds: Vec::new(),
            error: None,
            images: Vec::new(),
            events: Vec::new(),
            stored_bytes: 0,
            notify,
        };
        let mut jobs = self.lock();
        self.expire(&mut jobs, Instant::now());
        jobs.insert(id.clone(), record);
        id
    }

    /// Forgets a job that the engine refused.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Records the engine's number for the job (after admission).
    pub fn set_sequence(&self, id: &str, sequence: u64) {
        if let Some(record) = self.lock().get_mut(id) {
            record.sequence = sequence;
        }
    }

    /// The job now, or `None` when unknown or expired.
    pub fn snapshot(&self, id: &str) -> Option<Snapshot> {
        let now = Instant::now();
        let mut jobs = self.lock();
        self.expire(&mut jobs, now);
        jobs.get(id).map(|r| r.snapshot(id, now))
    }

    /// Result image `index` (PNG with its parameters).
    pub fn image(&self, id: &str, index: usize) -> Option<Arc<Vec<u8>>> {
        let mut jobs = self.lock();
        self.expire(&mut jobs, Instant::now());
        jobs.get(id)?.images.get(index).cloned()
    }

    /// The events after `after` and a receiver that changes when more come; `None` when the job
    /// is unknown.
    pub fn events_after(
        &self,
        id: &str,
        after: u64,
    ) -> Option<(Vec<JobEvent>, watch::Receiver<usize>)> {
        let jobs = self.lock();
        let record = jobs.get(id)?;
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(record.events.len());
        Some((record.events[start..].to_vec(), record.notify.subscribe()))
    }

    /// Marks the job cancelled (unless it already finished) and returns its engine number; the
    /// caller then cancels it in the engine. `Err(status)` when it had finished.
    pub fn cancel(&self, id: &str) -> Option<Result<u64, JobStatus>> {
        let now = Instant::now();
        let mut jobs = self.lock();
        let record = jobs.get_mut(id)?;
        if record.status.is_final() {
            return Some(Err(record.status));
        }
        record.status = JobStatus::Cancelled;
        record.finished = Some(now);
        record.error = Some("cancelled by DELETE /jobs/{id}".into());
        record.push(id, EventKind::Cancelled, None, now);
        Some(Ok(record.sequence))
    }

    /// Records the engine's answer: the images (encoded PNGs with their seeds) or why there are
    /// none. A job already cancelled stays cancelled.
    pub fn finish(&self, id: &str, result: Result<FinishedImages, JobError>) {
        let now = Instant::now();
        let mut jobs = self.lock();
        let Some(record) = jobs.get_mut(id) else {
            return;
        };
        if record.status.is_final() {
            return;
        }
        record.finished = Some(now);
        match result {
            Ok(finished) => {
                record.stored_bytes += finished.pngs.iter().map(Vec::len).sum::<usize>();
                record.images = finished.pngs.into_iter().map(Arc::new).collect();
                record.seeds = finished.seeds;
                record.status = JobStatus::Done;
                record.push(id, EventKind::Done, None, now);
            }
            Err(e) => {
                record.error = Some(e.to_string());
                let (status, kind) = if matches!(e, JobError::Cancelled) {
                    (JobStatus::Cancelled, EventKind::Cancelled)
                } else {
                    (JobStatus::Failed, EventKind::Failed)
                };
                record.status = status;
                record.push(id, kind, None, now);
            }
        }
        self.evict(&mut jobs);
    }

    /// Drops finished jobs past their TTL.
    fn expire(&self, jobs: &mut HashMap<String, Record>, now: Instant) {
        let ttl = self.limits.ttl;
        jobs.retain(|_, r| r.finished.is_none_or(|f| now.duration_since(f) < ttl));
    }

    /// Drops the oldest finished jobs while the store holds more than its bound.
    fn evict(&self, jobs: &mut HashMap<String, Record>) {
        let mut total: usize = jobs.values().map(|r| r.stored_bytes).sum();
        while total > self.limits.max_stored_bytes {
            let oldest = jobs
                .iter()
                .filter_map(|(id, r)| Some((r.finished?, id)))
                .min()
                .map(|(_, id)| id.clone());
            let Some(oldest) = oldest else { break };
            if let Some(record) = jobs.remove(&oldest) {
                tracing::info!(job = %oldest, bytes = record.stored_bytes, "job results evicted (--max-stored-bytes)");
                total -= record.stored_bytes;
            }
        }
    }

    /// The observer the engine tells about job `id`.
    pub fn observer(self: &Arc<Self>, id: String) -> Arc<dyn JobObserver> {
        Arc::new(Watch {
            store: self.clone(),
            id,
        })
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Record, Instant)) {
        if let Some(record) = self.lock().get_mut(id) {
            if !record.status.is_final() {
                f(record, Instant::now());
            }
        }
    }
}

/// [`JobObserver`] of one job: the engine's news become the job's status and events.
struct Watch {
    store: Arc<JobStore>,
    id: String,
}

impl JobObserver for Watch {
    fn queued(&self, ahead: usize) {
        self.store.update(&self.id, |r, now| {
            if r.status == JobStatus::Queued && r.queue_position != Some(ahead) {
                r.queue_position = Some(ahead);
                r.push(&self.id, EventKind::Queued, None, now);
            }
        });
    }

    fn started(&self) {
        self.store.update(&self.id, |r, now| {
            r.status = JobStatus::Running;
            r.started = Some(now);
            r.queue_position = None;
        });
    }

    fn step(&self, progress: &Progress<'_>) {
        self.store.update(&self.id, |r, now| {
            r.progress = Some(StepProgress {
                step: progress.step,
                steps: progress.steps_per_image,
                image: progress.image,
                images: r.request.number_of_images,
                images_at_once: progress.images_at_once,
            });
            r.push(&self.id, EventKind::Step, None, now);
            let due = r
                .preview_every
                .is_some_and(|n| progress.step.is_multiple_of(n));
            if let Some(preview) = due.then(|| preview_url(progress)).flatten() {
                r.push(&self.id, EventKind::Preview, Some(preview), now);
            }
        });
    }
}

/// A preview of the step's latents as a PNG data URL.
fn preview_url(progress: &Progress<'_>) -> Option<String> {
    let image = latent_preview(&progress.latents)?;
    let png = encode_png(&image, None).ok()?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
    Some(format!("data:image/png;base64,{b64}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Latents;
    use crate::sampling::SchedulerKind;

    fn store(ttl: Duration, max_stored_bytes: usize) -> Arc<JobStore> {
        JobStore::new(StoreLimits {
            ttl,
            max_stored_bytes,
        })
    }

    fn job(preview_every: Option<usize>) -> NewJob {
        NewJob {
            kind: Pipelines::Txt2Img,
            request: GenerationRequest {
                prompt: "a".into(),
                negative_prompt: String::new(),
                width: 8,
                height: 8,
                steps: 2,
                cfg_scale: 7.0,
                seed: 5,
                scheduler: SchedulerKind::Ddim,
                number_of_images: 1,
            },
            preview_every,
        }
    }

    fn output() -> FinishedImages {
        FinishedImages {
            seeds: vec![5],
            pngs: vec![vec![7; 300]],
        }
    }

    fn step(observer: &Arc<dyn JobObserver>, step: usize) {
        let data = [0.1f32; 4];
        observer.step(&Progress {
            image: 0,
            step,
            steps_per_image: 2,
            images_at_once: 1,
            latents: Latents {
                data: &data,
                channels: 4,
                height: 1,
                width: 1,
            },
        });
    }

    #[test]
    fn events_follow_the_job_in_order_and_resume_after_an_id() {
        let store = store(Duration::from_secs(60), 1 << 20);
        let id = store.create(job(Some(2)));
        let observer = store.observer(id.clone());
        observer.queued(1);
        observer.queued(1); // unchanged: no event
        observer.queued(0);
        observer.started();
        step(&observer, 1);
        step(&observer, 2);
        store.finish(&id, Ok(output()));
        let (events, _) = store.events_after(&id, 0).unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.kind.name()).collect();
        assert_eq!(
            kinds,
            ["queued", "queued", "step", "step", "preview", "done"]
        );
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
        assert_eq!(events[0].snapshot.queue_position, Some(1));
        assert!(events[4]
            .preview
            .as_deref()
            .unwrap()
            .starts_with("data:image/png;base64,"));
        let (rest, _) = store.events_after(&id, 4).unwrap();
        assert_eq!(rest.iter().map(|e| e.id).collect::<Vec<_>>(), [5, 6]);
        let done = store.snapshot(&id).unwrap();
        assert_eq!(
            (done.status, done.images, done.seeds.clone()),
            (JobStatus::Done, 1, vec![5])
        );
        assert!(store.image(&id, 0).is_some() && store.image(&id, 1).is_none());
        // A job cancelled stays cancelled whatever the engine answers later.
        let other = store.create(job(None));
        assert_eq!(store.cancel(&other), Some(Ok(u64::MAX)));
        store.finish(&other, Ok(output()));
        assert_eq!(store.snapshot(&other).unwrap().status, JobStatus::Cancelled);
        assert_eq!(store.cancel(&id), Some(Err(JobStatus::Done)));
        assert!(store.cancel("nope").is_none());
    }

    #[test]
    fn finished_jobs_expire_after_the_ttl_and_the_oldest_go_past_the_bound() {
        let short = store(Duration::from_millis(30), 1 << 20);
        let id = short.create(job(None));
        short.finish(&id, Ok(output()));
        assert!(short.snapshot(&id).is_some());
        let running = short.create(job(None));
        std::thread::sleep(Duration::from_millis(60));
        assert!(short.snapshot(&id).is_none(), "expired");
        assert!(
            short.snapshot(&running).is_some(),
            "unfinished jobs never expire"
        );

        // Room for about two finished jobs: the third evicts the first.
        let one = {
            let probe = store(Duration::from_secs(60), usize::MAX);
            let id = probe.create(job(None));
            probe.finish(&id, Ok(output()));
            let bytes = probe.lock()[&id].stored_bytes;
            bytes
        };
        let bounded = store(Duration::from_secs(60), 2 * one + one / 2);
        let ids: Vec<String> = (0..3)
            .map(|_| {
                let id = bounded.create(job(None));
                bounded.finish(&id, Ok(output()));
                std::thread::sleep(Duration::from_millis(2));
                id
            })
            .collect();
        assert!(bounded.snapshot(&ids[0]).is_none(), "the oldest went");
        assert!(bounded.snapshot(&ids[1]).is_some());
        assert!(bounded.snapshot(&ids[2]).is_some());
    }

    #[test]
    fn a_failed_job_keeps_its_error() {
        let store = store(Duration::from_secs(60), 1 << 20);
        let id = store.create(job(None));
        store.finish(&id, Err(JobError::Failed("boom".into())));
        let s = store.snapshot(&id).unwrap();
        assert_eq!(s.status, JobStatus::Failed);
        assert!(s.error.unwrap().contains("boom"));
    }
}
