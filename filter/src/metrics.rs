//! Metrics. Envoy prefixes names with `wasmcustom.`; the `revision.<name>` and `outcome.<o>`
//! segments become Prometheus labels through the `stats_tags` shipped in `envoy/envoy.yaml`,
//! giving e.g. `envoy_wasmcustom_inflight_requests_total{revision,outcome}`. The names come from
//! core's [`Outcome`] and [`Gauge`]: one vocabulary for replies, metrics and docs.
//!
//! With a `classHeader`, each revision also gets per-class series under their own names, so the
//! revision-level ones stay exactly as they were (dashboards and autoscaler queries keep
//! working; the per-class series add up to them): `…outcome.<o>.class.<c>.class_requests_total`,
//! `…class.<c>.class_queue_wait_ms`, `…class.<c>.class_queued` and `…class.<c>.class_groups`
//! (tenants waiting), labelled `class` by the `stats_tags` entry for `class.<name>`. Without a
//! `classHeader` every request is of the default class and nothing per class is defined or
//! recorded.

use inflight_core::outcome::ClassGauge;
use inflight_core::worker::Effect;
use inflight_core::{Config, Gauge, Outcome, RevisionId};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};

/// Metric ids of one revision (ids are per VM; the stats behind them are process-wide).
#[derive(Debug, Clone)]
struct RevisionMetrics {
    /// By [`Outcome::index`].
    outcomes: Vec<u32>,
    /// By [`Gauge::index`].
    gauges: Vec<u32>,
    queue_wait_ms: u32,
    demand_ms: u32,
    /// Decisions raised by the queue-aware panic.
    queue_aware_scale_ups: u32,
    /// Requests Envoy sent to another endpoint than picked.
    endpoint_mismatch: u32,
    /// Per class (by index), when classes are reported.
    classes: Vec<ClassMetrics>,
}

/// Metric ids of one class of a revision.
#[derive(Debug, Clone)]
struct ClassMetrics {
    /// By [`Outcome::index`].
    outcomes: Vec<u32>,
    queue_wait_ms: u32,
    /// By [`ClassGauge::index`].
    gauges: Vec<u32>,
}

/// This VM's metric ids, per revision by [`RevisionId`].
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    revisions: Vec<RevisionMetrics>,
    unknown_revision: Option<u32>,
    poll_failures: Option<u32>,
}

impl Metrics {
    pub fn define(config: &Config) -> Result<Self, Status> {
        let mut revisions = Vec::with_capacity(config.revisions.len());
        for r in &config.revisions {
            let prefix = format!("inflight.revision.{}", r.name);
            let outcomes = Outcome::PER_REVISION
                .iter()
                .map(|o| {
                    hostcalls::define_metric(
                        MetricType::Counter,
                        &format!("{prefix}.outcome.{}.requests_total", o.label()),
                    )
                })
                .collect::<Result<_, _>>()?;
            let gauges = Gauge::ALL
                .iter()
                .map(|g| {
                    hostcalls::define_metric(MetricType::Gauge, &format!("{prefix}.{}", g.name()))
                })
                .collect::<Result<_, _>>()?;
            let mut classes = Vec::new();
            if config.class_header.is_some() {
                for c in &r.classes {
                    let outcomes = Outcome::PER_REVISION
                        .iter()
                        .map(|o| {
                            hostcalls::define_metric(
                                MetricType::Counter,
                                &format!(
                                    "{prefix}.outcome.{}.class.{}.class_requests_total",
                                    o.label(),
                                    c.name
                                ),
                            )
                        })
                        .collect::<Result<_, _>>()?;
                    classes.push(ClassMetrics {
                        outcomes,
                        queue_wait_ms: hostcalls::define_metric(
                            MetricType::Histogram,
                            &format!("{prefix}.class.{}.class_queue_wait_ms", c.name),
                        )?,
                        gauges: ClassGauge::ALL
                            .iter()
                            .map(|g| {
                                hostcalls::define_metric(
                                    MetricType::Gauge,
                                    &format!("{prefix}.class.{}.{}", c.name, g.name()),
                                )
                            })
                            .collect::<Result<_, _>>()?,
                    });
                }
            }
            revisions.push(RevisionMetrics {
                classes,
                outcomes,
                gauges,
                queue_wait_ms: hostcalls::define_metric(
                    MetricType::Histogram,
                    &format!("{prefix}.queue_wait_ms"),
                )?,
                demand_ms: hostcalls::define_metric(
                    MetricType::Counter,
                    &format!("{prefix}.demand_ms_total"),
                )?,
                queue_aware_scale_ups: hostcalls::define_metric(
                    MetricType::Counter,
                    &format!("{prefix}.queue_aware_scale_ups_total"),
                )?,
                endpoint_mismatch: hostcalls::define_metric(
                    MetricType::Counter,
                    &format!("{prefix}.endpoint_mismatch_total"),
                )?,
            });
        }
        Ok(Metrics {
            revisions,
            unknown_revision: Some(hostcalls::define_metric(
                MetricType::Counter,
                "inflight.unknown_revision_total",
            )?),
            poll_failures: Some(hostcalls::define_metric(
                MetricType::Counter,
                "inflight.membership_poll_failures_total",
            )?),
        })
    }

    fn revision(&self, rev: RevisionId) -> Option<&RevisionMetrics> {
        self.revisions.get(rev.0)
    }

    fn class(&self, rev: RevisionId, class: u8) -> Option<&ClassMetrics> {
        self.revision(rev)?.classes.get(usize::from(class))
    }

    /// Applies a metric effect; other effects are not metrics and are ignored here.
    pub fn apply(&self, effect: &Effect) {
        match *effect {
            Effect::Count { rev, outcome } => {
                if let Some(id) = outcome
                    .index()
                    .and_then(|i| self.revision(rev)?.outcomes.get(i))
                {
                    add(*id, 1);
                }
            }
            Effect::CountClass {
                rev,
                class,
                outcome,
            } => {
                if let Some(id) = outcome
                    .index()
                    .and_then(|i| self.class(rev, class)?.outcomes.get(i))
                {
                    add(*id, 1);
                }
            }
            Effect::ClassQueueWait { rev, class, ms } => {
                if let Some(m) = self.class(rev, class) {
                    record(m.queue_wait_ms, ms);
                }
            }
            Effect::ClassGauge {
                rev,
                class,
                gauge,
                value,
            } => {
                if let Some(id) = self
                    .class(rev, class)
                    .and_then(|m| m.gauges.get(gauge.index()))
                {
                    record(*id, value);
                }
            }
            Effect::CountUnknown => {
                if let Some(id) = self.unknown_revision {
                    add(id, 1);
                }
            }
            Effect::AddDemand { rev, ms } => {
                if let Some(m) = self.revision(rev) {
                    add(m.demand_ms, ms);
                }
            }
            Effect::QueueWait { rev, ms } => {
                if let Some(m) = self.revision(rev) {
                    record(m.queue_wait_ms, ms);
                }
            }
            Effect::Gauge { rev, gauge, value } => {
                if let Some(id) = self.revision(rev).and_then(|m| m.gauges.get(gauge.index())) {
                    record(*id, value);
                }
            }
            Effect::QueueAwareScaleUp { rev } => {
                if let Some(m) = self.revision(rev) {
                    add(m.queue_aware_scale_ups, 1);
                }
            }
            Effect::EndpointMismatch { rev } => {
                if let Some(m) = self.revision(rev) {
                    add(m.endpoint_mismatch, 1);
                }
            }
            Effect::PollFailed => {
                if let Some(id) = self.poll_failures {
                    add(id, 1);
                }
            }
            Effect::Route { .. }
            | Effect::Resume { .. }
            | Effect::Reply { .. }
            | Effect::Poll(_)
            | Effect::PeerCall { .. }
            | Effect::Forward { .. } => {}
        }
    }
}

/// Adds to a counter; a failed metric call must never fail the request.
fn add(id: u32, n: u64) {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    if let Err(e) = hostcalls::increment_metric(id, n) {
        log::debug!("increment_metric({id}) failed: {e:?}");
    }
}

/// Sets a gauge or records a histogram sample.
fn record(id: u32, value: u64) {
    if let Err(e) = hostcalls::record_metric(id, value) {
        log::debug!("record_metric({id}) failed: {e:?}");
    }
}
