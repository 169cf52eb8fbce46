//! Prometheus metrics that belong to no single HTTP route: jobs by status,
//! job durations, and the cache's hits, misses and bytes. kiln-api renders
//! the registry; it does not own these.

use kiln_core::JobStatus;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub jobs_total: IntCounterVec,
    pub job_duration: HistogramVec,
    pub jobs_active: IntGaugeVec,
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub cache_bytes: IntGauge,
    pub http_requests: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let jobs_total = IntCounterVec::new(
            Opts::new(
                "kiln_jobs_total",
                "Jobs that reached a final status, by kind and status.",
            ),
            &["kind", "status"],
        )
        .expect("static metric");
        let job_duration = HistogramVec::new(
            HistogramOpts::new(
                "kiln_job_duration_seconds",
                "Wall time of a job run, by kind and outcome.",
            )
            .buckets(vec![
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
            ]),
            &["kind", "status"],
        )
        .expect("static metric");
        let jobs_active = IntGaugeVec::new(
            Opts::new("kiln_jobs", "Jobs currently in each status, by kind."),
            &["kind", "status"],
        )
        .expect("static metric");
        let cache_hits = IntCounterVec::new(
            Opts::new(
                "kiln_cache_hits_total",
                "Requests answered from the cache, by kind and index (raw or tree).",
            ),
            &["kind", "index"],
        )
        .expect("static metric");
        let cache_misses = IntCounterVec::new(
            Opts::new(
                "kiln_cache_misses_total",
                "Requests that needed a job, by kind.",
            ),
            &["kind"],
        )
        .expect("static metric");
        let cache_bytes = IntGauge::new(
            "kiln_cache_bytes",
            "Bytes held in the content-addressed cache.",
        )
        .expect("static metric");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "kiln_http_requests_total",
                "HTTP requests, by method, route and status code.",
            ),
            &["method", "route", "code"],
        )
        .expect("static metric");
        for c in [
            Box::new(jobs_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(job_duration.clone()),
            Box::new(jobs_active.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(http_requests.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            jobs_total,
            job_duration,
            jobs_active,
            cache_hits,
            cache_misses,
            cache_bytes,
            http_requests,
        }
    }

    pub fn job_finished(&self, kind: &str, status: JobStatus, secs: Option<f64>) {
        self.jobs_total
            .with_label_values(&[kind, status.as_str()])
            .inc();
        if let Some(s) = secs {
            self.job_duration
                .with_label_values(&[kind, status.as_str()])
                .observe(s);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
