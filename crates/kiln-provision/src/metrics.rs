//! The provisioner's metrics, under the seed's names so existing alert rules
//! keep working (`libvirt_volume_provisioner_requests_total`,
//! `..._jobs_total{status}`, `..._active_jobs`), plus job and stage duration
//! histograms and cache counters. Registered in kiln's one registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct ProvisionMetrics {
    /// Every HTTP request kiln answers, by endpoint, method and status (the
    /// seed counted its own API's; kiln is the whole service on that port).
    pub requests: IntCounterVec,
    /// Provisioning jobs by status: started, completed, failed, cancelled.
    pub jobs: IntCounterVec,
    pub active: IntGauge,
    pub job_duration: HistogramVec,
    pub stage_duration: HistogramVec,
    /// Image lookups: hit, miss, shared (waited for another job's download).
    pub cache: IntCounterVec,
    pub downloaded_bytes: IntCounter,
}

const BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

impl ProvisionMetrics {
    pub fn register(r: &Registry) -> Result<ProvisionMetrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "libvirt_volume_provisioner_requests_total",
                "HTTP requests by endpoint, method and status.",
            ),
            &["endpoint", "method", "status"],
        )?;
        let jobs = IntCounterVec::new(
            Opts::new(
                "libvirt_volume_provisioner_jobs_total",
                "Provisioning jobs by status (started, completed, failed, cancelled).",
            ),
            &["status"],
        )?;
        let active = IntGauge::new(
            "libvirt_volume_provisioner_active_jobs",
            "Provisioning jobs running now.",
        )?;
        let job_duration = HistogramVec::new(
            HistogramOpts::new(
                "libvirt_volume_provisioner_job_duration_seconds",
                "Wall time of provisioning jobs, by final status.",
            )
            .buckets(BUCKETS.to_vec()),
            &["status"],
        )?;
        let stage_duration = HistogramVec::new(
            HistogramOpts::new(
                "libvirt_volume_provisioner_stage_duration_seconds",
                "Wall time of each provisioning stage (downloading, verifying, converting, finalizing).",
            )
            .buckets(BUCKETS.to_vec()),
            &["stage"],
        )?;
        let cache = IntCounterVec::new(
            Opts::new(
                "libvirt_volume_provisioner_image_cache_total",
                "Image cache lookups by result (hit, miss, shared).",
            ),
            &["result"],
        )?;
        let downloaded_bytes = IntCounter::new(
            "libvirt_volume_provisioner_downloaded_bytes_total",
            "Image bytes downloaded.",
        )?;
        r.register(Box::new(requests.clone()))?;
        r.register(Box::new(jobs.clone()))?;
        r.register(Box::new(active.clone()))?;
        r.register(Box::new(job_duration.clone()))?;
        r.register(Box::new(stage_duration.clone()))?;
        r.register(Box::new(cache.clone()))?;
        r.register(Box::new(downloaded_bytes.clone()))?;
        Ok(ProvisionMetrics {
            requests,
            jobs,
            active,
            job_duration,
            stage_duration,
            cache,
            downloaded_bytes,
        })
    }
}
