//! The vocabulary of what happened to a request, and of the per-revision gauges: one enum each
//! drives the reply's `x-inflight-shed` value, the metric names and labels, the docs and the CLI.
//!
//! Words: a request is **admitted** (it holds a slot: in flight), **queued** (it waits in the
//! buffer with a ticket), **shed** (answered 503 by the gateway) or **cancelled** (its client left
//! while it was queued). Metric labels use `_`, header values `-`, as each convention wants.

/// What the gateway did with one request; each is counted in
/// `inflight_requests_total{revision, outcome}`, so admitted + shed_* + cancelled +
/// state_unavailable = requests of the revision that reached a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Went upstream (at once, or after waiting).
    Admitted,
    /// Shed at arrival: the buffer was full (or the revision has neither capacity nor buffer).
    ShedFull,
    /// Shed after waiting the revision's maximum wait.
    ShedTimeout,
    /// Its client left while it waited.
    Cancelled,
    /// Shed because the shared state could not be read or written (a host failure).
    StateUnavailable,
    /// Shed because the gateway drains (shutting down): it would have waited, or it was waiting.
    ShedDraining,
    /// Sent to a peer gateway of the fleet that has a slot (counted there when admitted).
    Forwarded,
    /// Matched no revision, under `unknownRevision: reject` (counted once, not per revision).
    UnknownRevision,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Admitted,
        Outcome::ShedFull,
        Outcome::ShedTimeout,
        Outcome::Cancelled,
        Outcome::StateUnavailable,
        Outcome::ShedDraining,
        Outcome::Forwarded,
        Outcome::UnknownRevision,
    ];

    /// Outcomes counted per revision, in metric order.
    pub const PER_REVISION: [Outcome; 7] = [
        Outcome::Admitted,
        Outcome::ShedFull,
        Outcome::ShedTimeout,
        Outcome::Cancelled,
        Outcome::StateUnavailable,
        Outcome::ShedDraining,
        Outcome::Forwarded,
    ];

    /// The `outcome` label of `inflight_requests_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Admitted => "admitted",
            Outcome::ShedFull => "shed_full",
            Outcome::ShedTimeout => "shed_timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::StateUnavailable => "state_unavailable",
            Outcome::ShedDraining => "shed_draining",
            Outcome::Forwarded => "forwarded",
            Outcome::UnknownRevision => "unknown_revision",
        }
    }

    /// The `x-inflight-shed` value on the gateway's own reply; `None` when there is no reply.
    pub fn shed_header(self) -> Option<&'static str> {
        match self {
            Outcome::Admitted | Outcome::Cancelled | Outcome::Forwarded => None,
            Outcome::ShedFull => Some("buffer-full"),
            Outcome::ShedTimeout => Some("wait-timeout"),
            Outcome::StateUnavailable => Some("state-unavailable"),
            Outcome::ShedDraining => Some("gateway-draining"),
            Outcome::UnknownRevision => Some("unknown-revision"),
        }
    }

    /// The outcome whose [`label`](Self::label) is `label`.
    pub fn from_label(label: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.label() == label)
    }

    /// The HTTP status of the gateway's own reply.
    pub fn status(self) -> u32 {
        match self {
            Outcome::UnknownRevision => 404,
            _ => 503,
        }
    }

    /// Index into [`Outcome::PER_REVISION`].
    pub fn index(self) -> Option<usize> {
        Outcome::PER_REVISION.iter().position(|o| *o == self)
    }
}

/// Per-revision gauges, exported as `inflight_<name>{revision}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gauge {
    /// Requests in flight (holding a slot).
    Active,
    /// Requests queued in the buffer.
    Queued,
    /// Slots: cc × ready replicas (0: unlimited).
    Capacity,
    DesiredReplicas,
    ReadyReplicas,
    /// The autoscaler's stable-window average concurrency, × 1000.
    StableConcurrencyMilli,
    /// The autoscaler's panic-window average concurrency, × 1000.
    PanicConcurrencyMilli,
    /// Gateways in the fleet as this one sees it (1 without a fleet).
    FleetGateways,
}

impl Gauge {
    pub const ALL: [Gauge; 8] = [
        Gauge::Active,
        Gauge::Queued,
        Gauge::Capacity,
        Gauge::DesiredReplicas,
        Gauge::ReadyReplicas,
        Gauge::StableConcurrencyMilli,
        Gauge::PanicConcurrencyMilli,
        Gauge::FleetGateways,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Gauge::Active => "active",
            Gauge::Queued => "queued",
            Gauge::Capacity => "capacity",
            Gauge::DesiredReplicas => "desired_replicas",
            Gauge::ReadyReplicas => "ready_replicas",
            Gauge::StableConcurrencyMilli => "stable_concurrency_milli",
            Gauge::PanicConcurrencyMilli => "panic_concurrency_milli",
            Gauge::FleetGateways => "fleet_gateways",
        }
    }

    pub fn index(self) -> usize {
        Gauge::ALL.iter().position(|g| *g == self).unwrap_or(0)
    }
}

/// Per-class gauges of a revision, exported as `inflight_<name>{revision, class}` (only with a
/// `classHeader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClassGauge {
    /// Requests of the class waiting.
    Queued,
    /// Fairness groups (tenants) with requests of the class waiting.
    Groups,
}

impl ClassGauge {
    pub const ALL: [ClassGauge; 2] = [ClassGauge::Queued, ClassGauge::Groups];

    pub fn name(self) -> &'static str {
        match self {
            ClassGauge::Queued => "class_queued",
            ClassGauge::Groups => "class_groups",
        }
    }

    pub fn index(self) -> usize {
        ClassGauge::ALL.iter().position(|g| *g == self).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shed_has_a_header_and_every_outcome_a_distinct_label() {
        let all = Outcome::ALL;
        let mut labels: Vec<_> = all.iter().map(|o| o.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), all.len());
        for o in all {
            let replies = o.shed_header().is_some();
            assert_eq!(
                replies,
                !matches!(
                    o,
                    Outcome::Admitted | Outcome::Cancelled | Outcome::Forwarded
                ),
                "{o:?}"
            );
            assert_eq!(o.index().is_some(), o != Outcome::UnknownRevision, "{o:?}");
            assert_eq!(Outcome::from_label(o.label()), Some(o));
        }
        for (i, g) in Gauge::ALL.iter().enumerate() {
            assert_eq!(g.index(), i);
        }
    }
}
