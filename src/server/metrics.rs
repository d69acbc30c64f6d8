//! Prometheus metrics (`GET /metrics`): requests by status, request and step durations, images,
//! queue depth and job outcomes. Units are in the names; the engine's own metrics are defined in
//! `engine.rs` next to where they are observed and registered here.

use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::engine::EngineMetrics;

/// The `status` label for a request whose client went away before the answer (nginx's 499).
pub const CLIENT_CLOSED: &str = "499";

pub struct Metrics {
    registry: Registry,
    /// `sd21_requests_total{status}`: `/generate/` requests by HTTP status (499: client gone).
    requests: IntCounterVec,
    /// `sd21_request_duration_seconds`: `/generate/` from arrival to answer.
    request_seconds: Histogram,
    /// `sd21_images_total`: images returned.
    images: IntCounter,
    /// `sd21_ready`: 1 once the model is loaded and warmed up.
    pub ready: IntGauge,
    pub engine: EngineMetrics,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("sd21_requests_total", "Generation requests by HTTP status"),
            &["status"],
        )?;
        let request_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "sd21_request_duration_seconds",
                "Generation requests from arrival to answer",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
            ]),
        )?;
        let images = IntCounter::new("sd21_images_total", "Images generated and returned")?;
        let ready = IntGauge::new("sd21_ready", "1 once the model is loaded and warmed up")?;
        let engine = EngineMetrics::new()?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(images.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        engine.register(&registry)?;
        Ok(Metrics {
            registry,
            requests,
            request_seconds,
            images,
            ready,
            engine,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Starts timing a generation request; dropping the record unfinished (the handler was
    /// dropped) counts it as 499.
    pub fn start_request(&self) -> RequestRecord<'_> {
        RequestRecord {
            metrics: self,
            started: Instant::now(),
            finished: false,
        }
    }

    pub fn add_images(&self, n: usize) {
        self.images.inc_by(n as u64);
    }
}

/// One `/generate/` request in flight, counted when it ends however it ends.
pub struct RequestRecord<'a> {
    metrics: &'a Metrics,
    started: Instant,
    finished: bool,
}

impl RequestRecord<'_> {
    /// Counts the request under `status` (an HTTP status code, or [`CLIENT_CLOSED`]).
    pub fn finish_as(mut self, status: &str) {
        self.record(status);
    }

    fn record(&mut self, status: &str) {
        self.finished = true;
        self.metrics.requests.with_label_values(&[status]).inc();
        self.metrics
            .request_seconds
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        if !self.finished {
            tracing::info!(
                seconds = self.started.elapsed().as_secs_f64(),
                "client went away before the answer; its job is cancelled"
            );
            self.record(CLIENT_CLOSED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_the_issue_names_is_exposed() {
        let m = Metrics::new().expect("metrics");
        m.start_request().finish_as("200");
        drop(m.start_request());
        m.add_images(2);
        m.engine.step_seconds.observe(0.01);
        m.engine.jobs.with_label_values(&["ok"]).inc();
        let text = m.render();
        for needle in [
            "sd21_requests_total{status=\"200\"} 1",
            "sd21_requests_total{status=\"499\"} 1",
            "sd21_queue_depth 0",
            "sd21_request_duration_seconds_count 2",
            "sd21_step_duration_seconds_count 1",
            "sd21_queue_wait_seconds_count 0",
            "sd21_images_total 2",
            "sd21_jobs_total{outcome=\"ok\"} 1",
            "sd21_ready 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
