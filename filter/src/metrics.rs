//! Per-revision metrics. Envoy prefixes names with `wasmcustom.`; the `revision.<name>` and
//! `outcome.<o>` segments become Prometheus labels through the `stats_tags` shipped in
//! `envoy/envoy.yaml`, giving e.g. `envoy_wasmcustom_inflight_requests_total{revision,outcome}`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};

/// Metric ids of one revision (ids are per VM; the stats behind them are process-wide).
#[derive(Debug, Clone)]
pub struct RevisionMetrics {
    pub admitted: u32,
    pub shed_full: u32,
    pub shed_timeout: u32,
    pub cancelled: u32,
    pub active: u32,
    pub queued: u32,
    pub capacity: u32,
    pub queue_wait_ms: u32,
    pub demand_ms: u32,
    pub desired_replicas: u32,
    pub ready_replicas: u32,
    pub stable_concurrency_milli: u32,
    pub panic_concurrency_milli: u32,
    /// Decisions raised by the queue-aware panic (core's `Reason::QueueAwarePanic`).
    pub queue_aware_scale_ups: u32,
}

impl RevisionMetrics {
    pub fn define(revision: &str) -> Result<Self, Status> {
        let outcome = |o: &str| {
            hostcalls::define_metric(
                MetricType::Counter,
                &format!("inflight.revision.{revision}.outcome.{o}.requests_total"),
            )
        };
        let gauge = |g: &str| {
            hostcalls::define_metric(
                MetricType::Gauge,
                &format!("inflight.revision.{revision}.{g}"),
            )
        };
        Ok(RevisionMetrics {
            admitted: outcome("admitted")?,
            shed_full: outcome("shed_full")?,
            shed_timeout: outcome("shed_timeout")?,
            cancelled: outcome("cancelled")?,
            active: gauge("active")?,
            queued: gauge("queued")?,
            capacity: gauge("capacity")?,
            demand_ms: hostcalls::define_metric(
                MetricType::Counter,
                &format!("inflight.revision.{revision}.demand_ms_total"),
            )?,
            desired_replicas: gauge("desired_replicas")?,
            ready_replicas: gauge("ready_replicas")?,
            stable_concurrency_milli: gauge("stable_concurrency_milli")?,
            panic_concurrency_milli: gauge("panic_concurrency_milli")?,
            queue_aware_scale_ups: hostcalls::define_metric(
                MetricType::Counter,
                &format!("inflight.revision.{revision}.queue_aware_scale_ups_total"),
            )?,
            queue_wait_ms: hostcalls::define_metric(
                MetricType::Histogram,
                &format!("inflight.revision.{revision}.queue_wait_ms"),
            )?,
        })
    }
}

/// Failed membership polls (not per revision).
pub fn define_poll_failures() -> Result<u32, Status> {
    hostcalls::define_metric(
        MetricType::Counter,
        "inflight.membership_poll_failures_total",
    )
}

/// Adds to a counter.
pub fn add(id: u32, n: u64) {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    if let Err(e) = hostcalls::increment_metric(id, n) {
        log::debug!("increment_metric({id}) failed: {e:?}");
    }
}

/// Counts one event; a failed metric call must never fail the request.
pub fn count(id: u32) {
    if let Err(e) = hostcalls::increment_metric(id, 1) {
        log::debug!("increment_metric({id}) failed: {e:?}");
    }
}

/// Sets a gauge or records a histogram sample.
pub fn record(id: u32, value: u64) {
    if let Err(e) = hostcalls::record_metric(id, value) {
        log::debug!("record_metric({id}) failed: {e:?}");
    }
}
