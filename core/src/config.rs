//! The plugin configuration: what operators write (JSON) and what the filter runs on.
//!
//! Two stages, as in the house style: serde structs that mirror the JSON exactly (unknown keys
//! rejected, defaults explicit) and a validated [`Config`] with durations in milliseconds and a
//! precompiled [`RevisionTable`]. Every error names the key (`revisions[1].maxWait`), the
//! revision when there is one, and what was expected, because an operator reads it in Envoy's
//! log with nothing else to go on.

use crate::admission::MAX_CLASSES;
use crate::duration::{self, DurationError};
use crate::kpa::{KpaConfig, KpaConfigError};
use crate::table::{RevisionId, RevisionTable, TableError};
use serde::{Deserialize, Serialize};
use std::rc::Rc;
use thiserror::Error;

/// Knative's default soft target (`container-concurrency-target-default`).
pub const DEFAULT_TARGET: f64 = 100.0;
/// Knative's default target utilization (`container-concurrency-target-percentage`).
pub const DEFAULT_UTILIZATION_PERCENT: f64 = 70.0;
/// Buffer depth per unit of capacity when `bufferDepth` is not set.
pub const DEFAULT_BUFFER_PER_SLOT: u32 = 10;
/// Buffer depth of a revision with `containerConcurrency` 0 while it has no ready replica (the
/// requests that wait for the first one) when `bufferDepth` is not set: cc 0 has no slot count
/// to multiply, so this is the per-slot rule's floor, 10 × cc 10.
pub const DEFAULT_COLD_BUFFER: u32 = 100;
pub const DEFAULT_MAX_WAIT: &str = "30s";
pub const DEFAULT_TICK: &str = "100ms";
pub const DEFAULT_RETRY_AFTER: &str = "1s";
/// The request header that names the picked endpoint for Envoy's `override_host` policy (the
/// name Gateway API Inference Extension's endpoint picker uses).
pub const DEFAULT_ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";
/// The classes of a revision that configures none, highest priority first: Gateway API
/// Inference Extension's criticalities.
pub const DEFAULT_CLASSES: [&str; 3] = ["critical", "standard", "sheddable"];
/// The class of a request whose class header is missing or names no class (when the revision
/// has it; otherwise its lowest class). Never the highest: a client cannot jump the queue by
/// sending a made-up value.
pub const DEFAULT_CLASS: &str = "standard";
/// The class whose maximum wait defaults to at most [`SHEDDABLE_MAX_WAIT`].
pub const SHEDDABLE_CLASS: &str = "sheddable";
/// Default `maxWait` cap of the `sheddable` class: batch traffic that is shed first should
/// learn it is not served soon, not hold a buffer place for the revision's full wait.
pub const SHEDDABLE_MAX_WAIT: &str = "5s";

/// A configuration that could not be used. The filter logs it and refuses the configuration.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    #[error("plugin configuration is empty; expected a JSON object with a `revisions` list")]
    Empty,
    #[error("plugin configuration: `{path}`: {message}")]
    Json { path: String, message: String },
    #[error("plugin configuration: `{path}`: {message}")]
    Invalid { path: String, message: String },
}

impl ConfigError {
    fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The key the error is about, e.g. `revisions[0].maxWait`.
    pub fn path(&self) -> &str {
        match self {
            ConfigError::Empty => "",
            ConfigError::Json { path, .. } | ConfigError::Invalid { path, .. } => path,
        }
    }
}

/// What to do with a request that matches no configured revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UnknownRevision {
    /// Forward it untracked (the default: the filter never breaks traffic it does not own).
    #[default]
    PassThrough,
    /// Answer 404 with the `unknown-revision` reason.
    Reject,
}

/// The plugin configuration as operators write it: the one schema, read by the filter and
/// written by the CLI (`inflight render`, `inflight up`), which build this type and serialize it.
/// Unset keys are omitted when written, so the output holds what the operator chose.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigDoc {
    pub revisions: Vec<RevisionDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_revision: Option<UnknownRevision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<MembershipDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingDoc>,
    /// A request header naming the request's priority class (set by the gateway, not clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_header: Option<String>,
    /// A request header whose value is the request's fairness key (a tenant or API key set by
    /// an auth filter); none: one group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fairness_header: Option<String>,
    /// Several gateway replicas sharing every endpoint's slots (docs/fleet.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetDoc>,
    /// Slot leases: how many slots a worker takes ahead of its requests while a revision is
    /// far from its limit (docs/configuration.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_lease: Option<SlotLeaseDoc>,
}

/// The `slotLease` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SlotLeaseDoc {
    /// Slots a worker takes at once; 0 turns leases off. Default 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Slots that must stay free after a lease; leases come back when fewer than half of it
    /// are. Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom: Option<u32>,
}

/// The validated `slotLease` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLease {
    pub slots: u32,
    pub headroom: u32,
}

pub const DEFAULT_LEASE_SLOTS: u32 = 8;
pub const DEFAULT_LEASE_HEADROOM: u32 = 64;

/// A fleet of gateways: where the peers are listed, how to reach one, and who this one is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FleetDoc {
    /// The Envoy cluster whose endpoints are the gateways' peer addresses.
    pub peer_cluster: String,
    /// An ORIGINAL_DST cluster keyed by `forwardHeader`; default `inflight-peer-direct`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_cluster: Option<String>,
    /// Default `x-inflight-peer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_header: Option<String>,
    /// This gateway's peer address (`IP:port`); default: node metadata `INFLIGHT_FLEET_SELF`,
    /// else Istio's `INSTANCE_IPS` with `peerPort`.
    #[serde(default, rename = "self", skip_serializing_if = "Option::is_none")]
    pub self_address: Option<String>,
    /// Default 15081.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// Default: 3 × the membership interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after: Option<String>,
}

/// One priority class of a revision's buffer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClassDoc {
    pub name: String,
    /// Default: the revision's `maxWait` (`sheddable`: at most 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait: Option<String>,
    /// Share of the revision's buffer its waiters may take, in (0, 1]; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number")]
    pub buffer_share: Option<f64>,
}

/// Endpoint picking: the filter chooses each request's pod (an endpoint of the revision's
/// `upstreamCluster` with fewer than `containerConcurrency` in flight) and names it in
/// `endpointHeader` for Envoy's `override_host` load-balancing policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutingDoc {
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Default `x-gateway-destination-endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_header: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MembershipDoc {
    pub cluster: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// Knative's per-revision autoscaling keys; unset keys keep Knative's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AutoscalingDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_scale: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_scale: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_scale: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_scale: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number")]
    pub panic_window_percentage: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number")]
    pub panic_threshold_percentage: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number")]
    pub max_scale_up_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number")]
    pub max_scale_down_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_grace_period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_aware_panic: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_aware_horizon: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevisionDoc {
    pub name: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    #[serde(default)]
    pub container_concurrency: u32,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number")]
    pub target: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number")]
    pub target_utilization_percentage: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingDoc>,
    /// Priority classes, highest first; default `critical`, `standard`, `sheddable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<ClassDoc>>,
}

/// Numbers written as people write them: `10`, not `10.0`.
mod number {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match *v {
            Some(x) if x.fract() == 0.0 && (0.0..9.0e15).contains(&x) => s.serialize_u64(x as u64),
            Some(x) => s.serialize_f64(x),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Option::<f64>::deserialize(d)
    }
}

/// One revision's validated limits.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionConfig {
    /// DNS-1123 label; also the `revision` label of every metric.
    pub name: String,
    pub hosts: Vec<String>,
    pub clusters: Vec<String>,
    /// Hard limit per ready replica; 0 means unlimited (stats only).
    pub container_concurrency: u32,
    /// Soft target (a scaling signal, never enforced).
    pub target: f64,
    pub target_utilization_percentage: f64,
    /// Ready replicas assumed until the gateway learns them from Envoy.
    pub ready_replicas: u32,
    /// Explicit buffer depth; `None` means `10 × cc × max(ready, 1)`.
    pub buffer_depth: Option<u32>,
    pub max_wait_ms: u64,
    /// Envoy cluster whose healthy members are this revision's ready replicas (needs
    /// `membership`); defaults to the only entry of `clusters`.
    pub upstream_cluster: Option<String>,
    /// The KPA settings, with `target`, `containerConcurrency` and utilization filled in.
    pub autoscaling: KpaConfig,
    /// Priority classes, highest first (at most [`MAX_CLASSES`]); a waiter's class is its index.
    pub classes: Vec<ClassConfig>,
    /// Index of the class of requests that name none (or an unknown one).
    pub default_class: u8,
}

/// One validated priority class.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassConfig {
    /// Lower-case; the `class` label of the per-class metrics.
    pub name: String,
    pub max_wait_ms: u64,
    /// Share of the buffer, in (0, 1].
    pub buffer_share: f64,
}

/// Where the filter learns ready replicas: Envoy's own admin `/stats`, reached through
/// `cluster` (a cluster that points at the admin address and is not routable from outside).
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    pub cluster: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub authority: String,
}

/// The validated `fleet` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    pub peer_cluster: String,
    pub forward_cluster: String,
    /// Lower-case.
    pub forward_header: Rc<str>,
    pub self_address: Option<String>,
    pub peer_port: u16,
    pub lost_after_ms: u64,
}

pub const DEFAULT_FORWARD_CLUSTER: &str = "inflight-peer-direct";
pub const DEFAULT_FORWARD_HEADER: &str = "x-inflight-peer";
pub const DEFAULT_PEER_PORT: u16 = 15081;

/// Capacity and buffer of a revision at a given number of ready replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests allowed in flight; `None` is unlimited.
    pub capacity: Option<u32>,
    /// Requests allowed to wait.
    pub buffer: u32,
    /// Requests allowed in flight on one endpoint (containerConcurrency); `None` is unlimited.
    pub per_endpoint: Option<u32>,
}

/// What decides a revision's limits: published in shared state by the newest configuration so
/// that VMs of an older one (still draining after a reload) apply the new limits too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitParams {
    pub container_concurrency: u32,
    pub buffer_depth: Option<u32>,
    /// Ready replicas assumed until learned from Envoy.
    pub ready_replicas: u32,
}

impl LimitParams {
    /// Limits for `ready` replicas: capacity = cc × ready; the default buffer keeps room while
    /// scaling from zero, so it counts at least one replica. cc 0 is unlimited once a replica is
    /// ready; with none ready its capacity is 0 too, and requests wait (up to `bufferDepth`,
    /// default [`DEFAULT_COLD_BUFFER`]) for the first, as behind Knative's activator.
    pub fn limits(&self, ready: u32) -> Limits {
        let cc = self.container_concurrency;
        if cc == 0 {
            return Limits {
                capacity: (ready == 0).then_some(0),
                buffer: self.buffer_depth.unwrap_or(if ready == 0 {
                    DEFAULT_COLD_BUFFER
                } else {
                    0
                }),
                per_endpoint: None,
            };
        }
        let buffer = self.buffer_depth.unwrap_or_else(|| {
            DEFAULT_BUFFER_PER_SLOT
                .saturating_mul(cc)
                .saturating_mul(ready.max(1))
        });
        Limits {
            capacity: Some(cc.saturating_mul(ready)),
            buffer,
            per_endpoint: Some(cc),
        }
    }
}

impl RevisionConfig {
    /// Limits for `ready` replicas (see [`LimitParams::limits`]).
    pub fn limits(&self, ready: u32) -> Limits {
        self.limit_params().limits(ready)
    }

    /// The parts of this revision's configuration that decide its limits.
    pub fn limit_params(&self) -> LimitParams {
        LimitParams {
            container_concurrency: self.container_concurrency,
            buffer_depth: self.buffer_depth,
            ready_replicas: self.ready_replicas,
        }
    }

    /// The class named `name` (trimmed, case-insensitive), else the default class.
    pub fn class_of(&self, name: Option<&str>) -> u8 {
        name.map(str::trim)
            .and_then(|n| {
                self.classes
                    .iter()
                    .position(|c| c.name.eq_ignore_ascii_case(n))
            })
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(self.default_class)
    }

    /// The maximum wait of class `class` (the revision's for an unknown index).
    pub fn class_max_wait_ms(&self, class: u8) -> u64 {
        self.classes
            .get(usize::from(class))
            .map_or(self.max_wait_ms, |c| c.max_wait_ms)
    }

    /// The longest maximum wait of any class: after it, a waiter has no owner left.
    pub fn longest_wait_ms(&self) -> u64 {
        self.classes
            .iter()
            .map(|c| c.max_wait_ms)
            .fold(self.max_wait_ms, u64::max)
    }

    /// Waiters of class `class` a buffer of `buffer` may hold (its share, rounded up).
    pub fn class_buffer(&self, class: u8, buffer: u32) -> u32 {
        match self.classes.get(usize::from(class)) {
            Some(c) if c.buffer_share < 1.0 => (c.buffer_share * f64::from(buffer))
                .ceil()
                .min(f64::from(u32::MAX)) as u32,
            _ => u32::MAX,
        }
    }

    /// Knative's effective soft target: min(target, cc when cc > 0) × utilization (the
    /// autoscaler's own rule, on the values this revision filled in).
    pub fn effective_target(&self) -> f64 {
        self.autoscaling.effective_target()
    }
}

/// The validated plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub revisions: Vec<RevisionConfig>,
    /// Lower-case header name whose value names a revision (set by the gateway, not clients).
    pub revision_header: Option<String>,
    pub unknown_revision: UnknownRevision,
    pub tick_ms: u64,
    /// `retry-after` seconds on shed replies.
    pub retry_after_s: u64,
    pub membership: Option<Membership>,
    /// The endpoint header when endpoint picking is on (the default): the filter sets it on
    /// every request it picked an endpoint for and removes a client's copy from every other.
    /// Picking applies to revisions with an `upstreamCluster` whose endpoints `membership`
    /// learns.
    pub endpoint_header: Option<Rc<str>>,
    /// Lower-case header naming a request's class (set by the gateway, not clients); none:
    /// every request is of its revision's default class.
    pub class_header: Option<String>,
    /// Lower-case header holding a request's fairness key; none: one group.
    pub fairness_header: Option<String>,
    /// The gateway fleet, when several replicas share the endpoints' slots.
    pub fleet: Option<Fleet>,
    /// Slot leases (`slots` 0: off).
    pub slot_lease: SlotLease,
    pub table: RevisionTable,
}

impl Config {
    /// Parses and validates the plugin configuration bytes.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::Empty);
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: ConfigDoc = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Json {
                path: if path == "." || path == "?" {
                    "(top level)".into()
                } else {
                    path
                },
                message: e.into_inner().to_string(),
            }
        })?;
        Self::validate(raw)
    }

    fn validate(raw: ConfigDoc) -> Result<Config, ConfigError> {
        let tick_ms = duration_key("tick", raw.tick.as_deref().unwrap_or(DEFAULT_TICK))?;
        if !(1..=10_000).contains(&tick_ms) {
            return Err(ConfigError::invalid(
                "tick",
                format!("{tick_ms}ms is out of range; expected 1ms to 10s"),
            ));
        }
        let retry_after_ms = duration_key(
            "retryAfter",
            raw.retry_after.as_deref().unwrap_or(DEFAULT_RETRY_AFTER),
        )?;
        if !retry_after_ms.is_multiple_of(1000) {
            return Err(ConfigError::invalid(
                "retryAfter",
                "the retry-after header counts whole seconds; use e.g. \"1s\"",
            ));
        }
        let revision_header = match raw.revision_header {
            None => None,
            Some(h) => Some(header_name("revisionHeader", &h)?),
        };
        let membership = match raw.membership {
            None => None,
            Some(m) => {
                if m.cluster.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        "membership.cluster",
                        "empty; name the Envoy cluster that reaches the admin endpoint",
                    ));
                }
                let interval_ms =
                    duration_key("membership.interval", m.interval.as_deref().unwrap_or("1s"))?;
                let timeout_ms =
                    duration_key("membership.timeout", m.timeout.as_deref().unwrap_or("1s"))?;
                if interval_ms < 100 {
                    return Err(ConfigError::invalid(
                        "membership.interval",
                        format!("{interval_ms}ms is too short; expected at least 100ms"),
                    ));
                }
                if timeout_ms == 0 {
                    return Err(ConfigError::invalid(
                        "membership.timeout",
                        "expected a timeout above 0, like \"1s\"",
                    ));
                }
                Some(Membership {
                    cluster: m.cluster.trim().to_string(),
                    interval_ms,
                    timeout_ms,
                    authority: m.authority.unwrap_or_else(|| "envoy-admin".into()),
                })
            }
        };
        let class_header = match raw.class_header {
            None => None,
            Some(h) => Some(header_name("classHeader", &h)?),
        };
        let fairness_header = match raw.fairness_header {
            None => None,
            Some(h) => Some(header_name("fairnessHeader", &h)?),
        };
        let routing = raw.routing.unwrap_or_default();
        let endpoint_header = match (routing.enabled.unwrap_or(true), routing.endpoint_header) {
            (false, _) => None,
            (true, None) => Some(Rc::from(DEFAULT_ENDPOINT_HEADER)),
            (true, Some(h)) => Some(Rc::from(header_name("routing.endpointHeader", &h)?)),
        };
        let fleet = match raw.fleet {
            None => None,
            Some(f) => Some(validate_fleet(
                f,
                membership.as_ref(),
                endpoint_header.is_some(),
            )?),
        };
        let lease = raw.slot_lease.unwrap_or_default();
        let slot_lease = SlotLease {
            slots: lease.slots.unwrap_or(DEFAULT_LEASE_SLOTS),
            headroom: lease.headroom.unwrap_or(DEFAULT_LEASE_HEADROOM),
        };
        if slot_lease.slots > 1024 {
            return Err(ConfigError::invalid(
                "slotLease.slots",
                format!(
                    "{} is too many; expected 0 (off) to 1024 (default {DEFAULT_LEASE_SLOTS})",
                    slot_lease.slots
                ),
            ));
        }
        if raw.revisions.is_empty() {
            return Err(ConfigError::invalid(
                "revisions",
                "no revisions configured; add at least one {\"name\": ..., \"hosts\": [...]}",
            ));
        }
        let mut revisions = Vec::with_capacity(raw.revisions.len());
        for (i, r) in raw.revisions.into_iter().enumerate() {
            revisions.push(validate_revision(i, r, revision_header.is_some())?);
        }
        let table = RevisionTable::build(&revisions).map_err(|e| match e {
            TableError::Name { index, name } => ConfigError::invalid(
                format!("revisions[{index}].name"),
                format!("revision `{name}` is configured twice; names must be unique"),
            ),
            TableError::Host { index, host, other } => ConfigError::invalid(
                format!("revisions[{index}].hosts"),
                format!("host `{host}` already belongs to revision `{other}`"),
            ),
            TableError::Cluster {
                index,
                cluster,
                other,
            } => ConfigError::invalid(
                format!("revisions[{index}].clusters"),
                format!("cluster `{cluster}` already belongs to revision `{other}`"),
            ),
        })?;
        Ok(Config {
            revisions,
            revision_header,
            unknown_revision: raw.unknown_revision.unwrap_or_default(),
            tick_ms,
            retry_after_s: retry_after_ms / 1000,
            membership,
            endpoint_header,
            class_header,
            fairness_header,
            fleet,
            slot_lease,
            table,
        })
    }

    /// The revision with this id. Ids come from this config's table, so they are in range.
    pub fn revision(&self, id: RevisionId) -> Option<&RevisionConfig> {
        self.revisions.get(id.0)
    }
}

fn duration_key(path: &str, value: &str) -> Result<u64, ConfigError> {
    duration::parse_ms(value).map_err(|e: DurationError| ConfigError::invalid(path, e.to_string()))
}

/// A request header name, lower-cased; pseudo-headers are refused.
fn header_name(path: &str, h: &str) -> Result<String, ConfigError> {
    let h = h.trim().to_ascii_lowercase();
    if h.is_empty() || h.starts_with(':') || !h.bytes().all(is_header_char) {
        return Err(ConfigError::invalid(
            path,
            format!("`{h}` is not a valid request header name"),
        ));
    }
    Ok(h)
}

fn is_header_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// DNS-1123 label, as Kubernetes names revisions; it also keeps metric names parseable.
fn validate_fleet(
    f: FleetDoc,
    membership: Option<&Membership>,
    routing: bool,
) -> Result<Fleet, ConfigError> {
    let Some(m) = membership else {
        return Err(ConfigError::invalid(
            "fleet",
            "a fleet needs `membership`: the peers and the endpoints come from Envoy's admin",
        ));
    };
    if !routing {
        return Err(ConfigError::invalid(
            "fleet",
            "a fleet splits each endpoint's slots: it needs endpoint picking (`routing.enabled`)",
        ));
    }
    if f.peer_cluster.trim().is_empty() {
        return Err(ConfigError::invalid(
            "fleet.peerCluster",
            "empty; name the Envoy cluster whose endpoints are the gateways' peer addresses",
        ));
    }
    let self_address = match f.self_address {
        None => None,
        Some(a) if a.parse::<std::net::SocketAddr>().is_ok() => Some(a),
        Some(a) => {
            return Err(ConfigError::invalid(
                "fleet.self",
                format!("`{a}` is not an IP:port address"),
            ))
        }
    };
    let lost_after_ms = match f.lost_after.as_deref() {
        None => 3 * m.interval_ms,
        Some(d) => duration_key("fleet.lostAfter", d)?,
    };
    if lost_after_ms < m.interval_ms {
        return Err(ConfigError::invalid(
            "fleet.lostAfter",
            format!(
                "{lost_after_ms}ms is shorter than the membership interval ({}ms): a live peer would be taken for dead",
                m.interval_ms
            ),
        ));
    }
    Ok(Fleet {
        peer_cluster: f.peer_cluster.trim().to_string(),
        forward_cluster: f
            .forward_cluster
            .unwrap_or_else(|| DEFAULT_FORWARD_CLUSTER.into()),
        forward_header: Rc::from(header_name(
            "fleet.forwardHeader",
            f.forward_header
                .as_deref()
                .unwrap_or(DEFAULT_FORWARD_HEADER),
        )?),
        self_address,
        peer_port: f.peer_port.unwrap_or(DEFAULT_PEER_PORT),
        lost_after_ms,
    })
}

pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn validate_revision(
    i: usize,
    r: RevisionDoc,
    has_header: bool,
) -> Result<RevisionConfig, ConfigError> {
    let at = |key: &str| format!("revisions[{i}].{key}");
    if !is_dns_label(&r.name) {
        return Err(ConfigError::invalid(
            at("name"),
            format!(
                "`{}` is not a valid revision name; expected a DNS label (lower-case letters, digits and '-', at most 63, like a Kubernetes name)",
                r.name
            ),
        ));
    }
    let named = |key: &str| format!("revisions[{i}].{key} (revision `{}`)", r.name);
    let mut hosts = Vec::with_capacity(r.hosts.len());
    for h in &r.hosts {
        let h = h.trim().to_ascii_lowercase();
        let bare = h.strip_prefix("*.").unwrap_or(&h);
        let ok = !bare.is_empty()
            && !bare.contains('*')
            && !bare.contains(':')
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(ConfigError::invalid(
                named("hosts"),
                format!("`{h}` is not a host name; expected `name.example.com` or `*.example.com` (no port, no scheme)"),
            ));
        }
        hosts.push(h);
    }
    let clusters: Vec<String> = r.clusters.iter().map(|c| c.trim().to_string()).collect();
    if let Some(c) = clusters.iter().find(|c| c.is_empty()) {
        return Err(ConfigError::invalid(
            named("clusters"),
            format!("`{c}`: an empty cluster name matches nothing"),
        ));
    }
    if hosts.is_empty() && clusters.is_empty() && !has_header {
        return Err(ConfigError::invalid(
            named("hosts"),
            "the revision can never match: give it `hosts`, `clusters`, or set `revisionHeader`",
        ));
    }
    let target = r.target.unwrap_or(DEFAULT_TARGET);
    if !(target.is_finite() && target > 0.0) {
        return Err(ConfigError::invalid(
            named("target"),
            format!(
                "{target} is not a valid soft target; expected a number > 0 (Knative default 100)"
            ),
        ));
    }
    let util = r
        .target_utilization_percentage
        .unwrap_or(DEFAULT_UTILIZATION_PERCENT);
    if !(util.is_finite() && util > 0.0 && util <= 100.0) {
        return Err(ConfigError::invalid(
            named("targetUtilizationPercentage"),
            format!(
                "{util} is out of range; expected a percentage in (0, 100] (Knative default 70)"
            ),
        ));
    }
    let max_wait_ms = match r.max_wait.as_deref() {
        None => duration::parse_ms(DEFAULT_MAX_WAIT).unwrap_or(30_000),
        Some(s) => duration_key(&named("maxWait"), s)?,
    };
    if max_wait_ms == 0 && r.buffer_depth.unwrap_or(1) > 0 && r.container_concurrency > 0 {
        return Err(ConfigError::invalid(
            named("maxWait"),
            "0 would shed every buffered request at once; set bufferDepth to 0 to disable buffering, or a wait like \"30s\"",
        ));
    }
    let upstream_cluster = match r.upstream_cluster {
        Some(c) if c.trim().is_empty() => {
            return Err(ConfigError::invalid(
                named("upstreamCluster"),
                "empty cluster name",
            ));
        }
        Some(c) => Some(c.trim().to_string()),
        None if clusters.len() == 1 => clusters.first().cloned(),
        None => None,
    };
    let (classes, default_class) = validate_classes(i, &r.name, r.classes, max_wait_ms)?;
    let a = r.autoscaling.unwrap_or_default();
    let defaults = KpaConfig::default();
    let autoscaling_key =
        |key: &str| format!("revisions[{i}].autoscaling.{key} (revision `{}`)", r.name);
    let stable_window_ms = match a.stable_window.as_deref() {
        None => defaults.stable_window_ms,
        Some(s) => duration_key(&autoscaling_key("stableWindow"), s)?,
    };
    let grace_ms = match a.scale_to_zero_grace_period.as_deref() {
        None => defaults.scale_to_zero_grace_period_ms,
        Some(s) => duration_key(&autoscaling_key("scaleToZeroGracePeriod"), s)?,
    };
    let queue_aware_horizon_ms = match a.queue_aware_horizon.as_deref() {
        None => defaults.queue_aware_horizon_ms,
        Some(s) => duration_key(&autoscaling_key("queueAwareHorizon"), s)?,
    };
    let autoscaling = KpaConfig {
        target,
        container_concurrency: r.container_concurrency,
        target_utilization_percentage: util,
        stable_window_ms,
        panic_window_percentage: a
            .panic_window_percentage
            .unwrap_or(defaults.panic_window_percentage),
        panic_threshold_percentage: a
            .panic_threshold_percentage
            .unwrap_or(defaults.panic_threshold_percentage),
        max_scale_up_rate: a.max_scale_up_rate.unwrap_or(defaults.max_scale_up_rate),
        max_scale_down_rate: a
            .max_scale_down_rate
            .unwrap_or(defaults.max_scale_down_rate),
        min_scale: a.min_scale.unwrap_or(defaults.min_scale),
        max_scale: a.max_scale.unwrap_or(defaults.max_scale),
        scale_to_zero_grace_period_ms: grace_ms,
        activation_scale: a.activation_scale.unwrap_or(defaults.activation_scale),
        initial_scale: a.initial_scale.unwrap_or(defaults.initial_scale),
        queue_aware_panic: a.queue_aware_panic.unwrap_or(defaults.queue_aware_panic),
        queue_aware_horizon_ms,
    };
    autoscaling.validate().map_err(|e| {
        let field = match &e {
            KpaConfigError::OutOfRange { field, .. } => *field,
            KpaConfigError::MinAboveMax { .. } => "minScale",
            KpaConfigError::ActivationAboveMax { .. } => "activationScale",
        };
        let path = match field {
            "target" | "targetUtilizationPercentage" | "containerConcurrency" => named(field),
            f => autoscaling_key(f),
        };
        ConfigError::invalid(path, e.to_string())
    })?;
    Ok(RevisionConfig {
        name: r.name,
        hosts,
        clusters,
        container_concurrency: r.container_concurrency,
        target,
        target_utilization_percentage: util,
        ready_replicas: r.ready_replicas.unwrap_or(1),
        buffer_depth: r.buffer_depth,
        max_wait_ms,
        upstream_cluster,
        autoscaling,
        classes,
        default_class,
    })
}

/// A revision's classes (the defaults when `None`) and the index of its default class.
fn validate_classes(
    i: usize,
    revision: &str,
    classes: Option<Vec<ClassDoc>>,
    max_wait_ms: u64,
) -> Result<(Vec<ClassConfig>, u8), ConfigError> {
    let docs = classes.unwrap_or_else(|| {
        DEFAULT_CLASSES
            .iter()
            .map(|n| ClassDoc {
                name: (*n).to_string(),
                ..ClassDoc::default()
            })
            .collect()
    });
    let at =
        |j: usize, key: &str| format!("revisions[{i}].classes[{j}].{key} (revision `{revision}`)");
    if docs.is_empty() || docs.len() > MAX_CLASSES {
        return Err(ConfigError::invalid(
            format!("revisions[{i}].classes (revision `{revision}`)"),
            format!(
                "{} classes; expected 1 to {MAX_CLASSES}, highest priority first (or leave it out for critical, standard, sheddable)",
                docs.len()
            ),
        ));
    }
    let sheddable_cap = duration::parse_ms(SHEDDABLE_MAX_WAIT).unwrap_or(5_000);
    let mut out: Vec<ClassConfig> = Vec::with_capacity(docs.len());
    for (j, c) in docs.into_iter().enumerate() {
        let name = c.name.trim().to_ascii_lowercase();
        if !is_dns_label(&name) {
            return Err(ConfigError::invalid(
                at(j, "name"),
                format!("`{name}` is not a valid class name; expected lower-case letters, digits and '-' (it becomes a metric label)"),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(ConfigError::invalid(
                at(j, "name"),
                format!("class `{name}` is listed twice"),
            ));
        }
        let class_wait_ms = match c.max_wait.as_deref() {
            Some(w) => duration_key(&at(j, "maxWait"), w)?,
            None if name == SHEDDABLE_CLASS => max_wait_ms.min(sheddable_cap),
            None => max_wait_ms,
        };
        if class_wait_ms == 0 && max_wait_ms > 0 {
            return Err(ConfigError::invalid(
                at(j, "maxWait"),
                "0 would shed every buffered request of the class at once; use e.g. \"1s\", or a bufferShare near 0",
            ));
        }
        let buffer_share = c.buffer_share.unwrap_or(1.0);
        if !(buffer_share.is_finite() && buffer_share > 0.0 && buffer_share <= 1.0) {
            return Err(ConfigError::invalid(
                at(j, "bufferShare"),
                format!("{buffer_share} is out of range; expected a fraction in (0, 1] of the revision's buffer"),
            ));
        }
        out.push(ClassConfig {
            name,
            max_wait_ms: class_wait_ms,
            buffer_share,
        });
    }
    let default_class = out
        .iter()
        .position(|c| c.name == DEFAULT_CLASS)
        .unwrap_or(out.len() - 1);
    Ok((out, u8::try_from(default_class).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s.as_bytes())
    }

    const MINIMAL: &str = r#"{"revisions":[{"name":"torchserve","hosts":["torchserve.default.example.com"],"containerConcurrency":10,"target":10}]}"#;

    #[test]
    fn minimal_config_gets_knative_defaults() {
        let c = parse(MINIMAL).unwrap();
        let r = &c.revisions[0];
        assert_eq!(r.container_concurrency, 10);
        assert_eq!(r.target, 10.0);
        assert_eq!(r.target_utilization_percentage, 70.0);
        assert_eq!(r.ready_replicas, 1);
        assert_eq!(r.max_wait_ms, 30_000);
        assert_eq!(c.tick_ms, 100);
        assert_eq!(c.retry_after_s, 1);
        assert_eq!(c.unknown_revision, UnknownRevision::PassThrough);
        assert_eq!(
            r.limits(1),
            Limits {
                capacity: Some(10),
                buffer: 100,
                per_endpoint: Some(10)
            }
        );
        assert_eq!(r.limits(3).capacity, Some(30));
        assert_eq!(r.limits(3).buffer, 300);
        // Scale from zero: no capacity, but room to wait.
        assert_eq!(
            r.limits(0),
            Limits {
                capacity: Some(0),
                buffer: 100,
                per_endpoint: Some(10)
            }
        );
        assert!((r.effective_target() - 7.0).abs() < 1e-9);
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"{"revisions":[{"name":"a","hosts":["A.example.com","*.b.example.com"],"clusters":["outbound|80||a"],
                "containerConcurrency":2,"target":10,"targetUtilizationPercentage":100,"readyReplicas":3,
                "bufferDepth":5,"maxWait":"1.5s"}],
                "revisionHeader":"X-Inflight-Revision","unknownRevision":"reject","tick":"50ms","retryAfter":"2s"}"#,
        )
        .unwrap();
        let r = &c.revisions[0];
        assert_eq!(r.hosts, vec!["a.example.com", "*.b.example.com"]);
        assert_eq!(r.max_wait_ms, 1_500);
        assert_eq!(
            r.limits(3),
            Limits {
                capacity: Some(6),
                buffer: 5,
                per_endpoint: Some(2)
            }
        );
        assert_eq!(c.revision_header.as_deref(), Some("x-inflight-revision"));
        assert_eq!(c.unknown_revision, UnknownRevision::Reject);
        assert_eq!((c.tick_ms, c.retry_after_s), (50, 2));
        assert!(
            (r.effective_target() - 2.0).abs() < 1e-9,
            "cc caps the target"
        );
    }

    #[test]
    fn unlimited_when_cc_zero_once_a_replica_is_ready() {
        let c = parse(r#"{"revisions":[{"name":"a","hosts":["a"]}]}"#).unwrap();
        assert_eq!(
            c.revisions[0].limits(1),
            Limits {
                capacity: None,
                buffer: 0,
                per_endpoint: None
            }
        );
        // No replica ready: capacity 0, and the first requests wait for one.
        assert_eq!(
            c.revisions[0].limits(0),
            Limits {
                capacity: Some(0),
                buffer: DEFAULT_COLD_BUFFER,
                per_endpoint: None
            }
        );
        let explicit =
            parse(r#"{"revisions":[{"name":"a","hosts":["a"],"bufferDepth":3}]}"#).unwrap();
        assert_eq!(explicit.revisions[0].limits(0).buffer, 3);
        assert_eq!(explicit.revisions[0].limits(2).buffer, 3);
        assert!((c.revisions[0].effective_target() - 70.0).abs() < 1e-9);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("empty", "  ", "", "empty"),
            ("not json", "{", "(top level)", "EOF"),
            (
                "unknown top key",
                r#"{"revisions":[],"revisoinHeader":"x"}"#,
                "revisoinHeader",
                "unknown field",
            ),
            (
                "unknown revision key",
                r#"{"revisions":[{"name":"a","hosts":["a"],"concurrency":3}]}"#,
                "revisions[0].concurrency",
                "unknown field",
            ),
            (
                "wrong type",
                r#"{"revisions":[{"name":"a","hosts":["a"],"containerConcurrency":"ten"}]}"#,
                "revisions[0].containerConcurrency",
                "expected u32",
            ),
            (
                "negative cc",
                r#"{"revisions":[{"name":"a","hosts":["a"],"containerConcurrency":-1}]}"#,
                "revisions[0].containerConcurrency",
                "invalid value",
            ),
            (
                "missing name",
                r#"{"revisions":[{"hosts":["a"]}]}"#,
                "revisions[0]",
                "missing field `name`",
            ),
            (
                "no revisions",
                r#"{"revisions":[]}"#,
                "revisions",
                "no revisions",
            ),
            (
                "bad name",
                r#"{"revisions":[{"name":"Torch_Serve","hosts":["a"]}]}"#,
                "revisions[0].name",
                "DNS label",
            ),
            (
                "bad duration",
                r#"{"revisions":[{"name":"a","hosts":["a"],"maxWait":"30"}]}"#,
                "revisions[0].maxWait (revision `a`)",
                "no unit",
            ),
            (
                "bad utilization",
                r#"{"revisions":[{"name":"a","hosts":["a"],"targetUtilizationPercentage":170}]}"#,
                "revisions[0].targetUtilizationPercentage (revision `a`)",
                "(0, 100]",
            ),
            (
                "zero target",
                r#"{"revisions":[{"name":"a","hosts":["a"],"target":0}]}"#,
                "revisions[0].target (revision `a`)",
                "> 0",
            ),
            (
                "host with port",
                r#"{"revisions":[{"name":"a","hosts":["a:80"]}]}"#,
                "revisions[0].hosts (revision `a`)",
                "no port",
            ),
            (
                "unreachable",
                r#"{"revisions":[{"name":"a"}]}"#,
                "revisions[0].hosts (revision `a`)",
                "never match",
            ),
            (
                "duplicate host",
                r#"{"revisions":[{"name":"a","hosts":["x"]},{"name":"b","hosts":["X"]}]}"#,
                "revisions[1].hosts",
                "already belongs to revision `a`",
            ),
            (
                "duplicate name",
                r#"{"revisions":[{"name":"a","hosts":["x"]},{"name":"a","hosts":["y"]}]}"#,
                "revisions[1].name",
                "twice",
            ),
            (
                "tick zero",
                r#"{"revisions":[{"name":"a","hosts":["a"]}],"tick":"0s"}"#,
                "tick",
                "out of range",
            ),
            (
                "retry after ms",
                r#"{"revisions":[{"name":"a","hosts":["a"]}],"retryAfter":"500ms"}"#,
                "retryAfter",
                "whole seconds",
            ),
            (
                "bad header",
                r#"{"revisions":[{"name":"a","hosts":["a"]}],"revisionHeader":":authority"}"#,
                "revisionHeader",
                "not a valid",
            ),
            (
                "bad unknown policy",
                r#"{"revisions":[{"name":"a","hosts":["a"]}],"unknownRevision":"drop"}"#,
                "unknownRevision",
                "unknown variant",
            ),
            (
                "zero wait with buffer",
                r#"{"revisions":[{"name":"a","hosts":["a"],"containerConcurrency":1,"maxWait":"0s"}]}"#,
                "revisions[0].maxWait (revision `a`)",
                "bufferDepth to 0",
            ),
        ];
        for (name, input, path, fragment) in cases {
            let err = parse(input).expect_err(name);
            assert_eq!(err.path(), *path, "case {name}: {err}");
            assert!(
                err.to_string().contains(fragment),
                "case {name}: `{err}` lacks `{fragment}`"
            );
        }
    }

    #[test]
    fn autoscaling_and_membership() {
        let c = parse(
            r#"{"revisions":[{"name":"a","hosts":["a"],"clusters":["up-a"],"containerConcurrency":10,"target":10,
                "targetUtilizationPercentage":100,
                "autoscaling":{"minScale":1,"maxScale":8,"stableWindow":"6s","scaleToZeroGracePeriod":"1s","maxScaleDownRate":4}}],
                "membership":{"cluster":"inflight_admin","interval":"500ms"}}"#,
        )
        .unwrap();
        let r = &c.revisions[0];
        assert_eq!(
            r.upstream_cluster.as_deref(),
            Some("up-a"),
            "defaults to the only cluster"
        );
        let k = &r.autoscaling;
        assert_eq!(
            (
                k.min_scale,
                k.max_scale,
                k.stable_window_ms,
                k.scale_to_zero_grace_period_ms
            ),
            (1, 8, 6_000, 1_000)
        );
        assert_eq!(
            (
                k.target,
                k.container_concurrency,
                k.target_utilization_percentage
            ),
            (10.0, 10, 100.0)
        );
        assert_eq!(k.max_scale_down_rate, 4.0);
        assert_eq!(k.panic_threshold_percentage, 200.0, "Knative default");
        let m = c.membership.unwrap();
        assert_eq!(
            (m.cluster.as_str(), m.interval_ms, m.timeout_ms),
            ("inflight_admin", 500, 1_000)
        );
        let plain = parse(MINIMAL).unwrap();
        assert_eq!(plain.membership, None);
        assert_eq!(plain.revisions[0].upstream_cluster, None);
        assert_eq!(plain.revisions[0].autoscaling.stable_window_ms, 60_000);
    }

    #[test]
    fn the_document_round_trips_and_writes_numbers_as_people_do() {
        let text = r#"{"revisions":[{"name":"a","hosts":["a.test"],"containerConcurrency":10,"target":10,"targetUtilizationPercentage":70.5,"autoscaling":{"minScale":1,"maxScaleUpRate":2.5}}],"unknownRevision":"reject"}"#;
        let doc: ConfigDoc = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&doc).unwrap(), text);
        assert!(Config::parse(text.as_bytes()).is_ok());
    }

    #[test]
    fn queue_aware_panic_is_on_by_default_and_can_be_turned_off() {
        let on = &parse(MINIMAL).unwrap().revisions[0].autoscaling;
        assert_eq!(
            (on.queue_aware_panic, on.queue_aware_horizon_ms),
            (true, 1_000)
        );
        let off = parse(
            r#"{"revisions":[{"name":"a","hosts":["a"],
                "autoscaling":{"queueAwarePanic":false,"queueAwareHorizon":"500ms"}}]}"#,
        )
        .unwrap();
        let off = &off.revisions[0].autoscaling;
        assert_eq!(
            (off.queue_aware_panic, off.queue_aware_horizon_ms),
            (false, 500)
        );
    }

    #[test]
    fn autoscaling_errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "min above max",
                r#"{"minScale":5,"maxScale":2}"#,
                "revisions[0].autoscaling.minScale (revision `a`)",
            ),
            (
                "bad window",
                r#"{"stableWindow":"soon"}"#,
                "revisions[0].autoscaling.stableWindow (revision `a`)",
            ),
            (
                "bad rate",
                r#"{"maxScaleDownRate":1}"#,
                "revisions[0].autoscaling.maxScaleDownRate (revision `a`)",
            ),
            (
                "unknown key",
                r#"{"minReplicas":1}"#,
                "revisions[0].autoscaling.minReplicas",
            ),
            (
                "zero queue-aware horizon",
                r#"{"queueAwareHorizon":"0s"}"#,
                "revisions[0].autoscaling.queueAwareHorizon (revision `a`)",
            ),
            (
                "queue-aware horizon longer than the stable window",
                r#"{"stableWindow":"6s","queueAwareHorizon":"7s"}"#,
                "revisions[0].autoscaling.queueAwareHorizon (revision `a`)",
            ),
            (
                "queue-aware panic not a bool",
                r#"{"queueAwarePanic":"off"}"#,
                "revisions[0].autoscaling.queueAwarePanic",
            ),
        ];
        for (name, a, path) in cases {
            let cfg =
                format!(r#"{{"revisions":[{{"name":"a","hosts":["a"],"autoscaling":{a}}}]}}"#);
            let err = parse(&cfg).expect_err(name);
            assert_eq!(err.path(), *path, "case {name}: {err}");
        }
        let err = parse(r#"{"revisions":[{"name":"a","hosts":["a"]}],"membership":{"cluster":"x","interval":"10ms"}}"#).unwrap_err();
        assert_eq!(err.path(), "membership.interval");
    }

    #[test]
    fn classes_default_to_the_inference_extension_criticalities() {
        let c = parse(MINIMAL).unwrap();
        let r = &c.revisions[0];
        let names: Vec<&str> = r.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["critical", "standard", "sheddable"]);
        assert_eq!(
            r.classes.iter().map(|c| c.max_wait_ms).collect::<Vec<_>>(),
            [30_000, 30_000, 5_000],
            "sheddable waits at most 5s by default"
        );
        assert!(r.classes.iter().all(|c| c.buffer_share == 1.0));
        assert_eq!(
            (c.class_header.as_deref(), c.fairness_header.as_deref()),
            (None, None)
        );
        struct Case {
            name: &'static str,
            header: Option<&'static str>,
            class: u8,
        }
        let cases = [
            Case {
                name: "missing: standard",
                header: None,
                class: 1,
            },
            Case {
                name: "critical",
                header: Some("critical"),
                class: 0,
            },
            Case {
                name: "case and spaces",
                header: Some(" Sheddable "),
                class: 2,
            },
            Case {
                name: "unknown: standard, never the highest",
                header: Some("vip"),
                class: 1,
            },
            Case {
                name: "empty: standard",
                header: Some(""),
                class: 1,
            },
        ];
        for case in cases {
            assert_eq!(r.class_of(case.header), case.class, "{}", case.name);
        }
        assert_eq!(r.longest_wait_ms(), 30_000);
        assert_eq!(
            r.class_buffer(2, 100),
            u32::MAX,
            "share 1: only the buffer bounds it"
        );
    }

    #[test]
    fn classes_can_be_configured_and_their_errors_name_the_key() {
        let c = parse(
            r#"{"revisions":[{"name":"a","hosts":["a"],"containerConcurrency":1,"maxWait":"10s","classes":[
                {"name":"interactive","maxWait":"20s"},{"name":"batch","bufferShare":0.25}]}],
                "classHeader":"X-Class","fairnessHeader":"x-tenant"}"#,
        )
        .unwrap();
        let r = &c.revisions[0];
        assert_eq!(r.classes.len(), 2);
        assert_eq!(r.default_class, 1, "no `standard`: the lowest class");
        assert_eq!(r.class_max_wait_ms(0), 20_000);
        assert_eq!(r.class_max_wait_ms(1), 10_000);
        assert_eq!(r.longest_wait_ms(), 20_000);
        assert_eq!(r.class_buffer(1, 10), 3, "a quarter of 10, rounded up");
        assert_eq!(r.class_buffer(0, 10), u32::MAX);
        assert_eq!(c.class_header.as_deref(), Some("x-class"));
        assert_eq!(c.fairness_header.as_deref(), Some("x-tenant"));
        let rev = |classes: &str| {
            format!(
                r#"{{"revisions":[{{"name":"a","hosts":["a"],"containerConcurrency":1,"classes":{classes}}}]}}"#
            )
        };
        let cases: &[(&str, String, &str, &str)] = &[
            (
                "none",
                rev("[]"),
                "revisions[0].classes (revision `a`)",
                "expected 1 to 8",
            ),
            (
                "nine",
                rev(&format!(
                    "[{}]",
                    (0..9)
                        .map(|i| format!(r#"{{"name":"c{i}"}}"#))
                        .collect::<Vec<_>>()
                        .join(",")
                )),
                "revisions[0].classes (revision `a`)",
                "9 classes",
            ),
            (
                "bad name",
                rev(r#"[{"name":"a b"}]"#),
                "revisions[0].classes[0].name (revision `a`)",
                "not a valid class name",
            ),
            (
                "twice",
                rev(r#"[{"name":"x"},{"name":"X"}]"#),
                "revisions[0].classes[1].name (revision `a`)",
                "listed twice",
            ),
            (
                "share 0",
                rev(r#"[{"name":"x","bufferShare":0}]"#),
                "revisions[0].classes[0].bufferShare (revision `a`)",
                "(0, 1]",
            ),
            (
                "share 2",
                rev(r#"[{"name":"x","bufferShare":2}]"#),
                "revisions[0].classes[0].bufferShare (revision `a`)",
                "(0, 1]",
            ),
            (
                "wait 0",
                rev(r#"[{"name":"x","maxWait":"0s"}]"#),
                "revisions[0].classes[0].maxWait (revision `a`)",
                "shed every",
            ),
            (
                "bad wait",
                rev(r#"[{"name":"x","maxWait":"soon"}]"#),
                "revisions[0].classes[0].maxWait (revision `a`)",
                "",
            ),
            (
                "unknown key",
                rev(r#"[{"name":"x","priority":1}]"#),
                "revisions[0].classes[0].priority",
                "unknown field",
            ),
            (
                "bad header",
                r#"{"revisions":[{"name":"a","hosts":["a"]}],"classHeader":":path"}"#.to_string(),
                "classHeader",
                "not a valid request header",
            ),
        ];
        for (name, json, path, message) in cases {
            let e = parse(json).expect_err(name);
            assert_eq!(e.path(), *path, "{name}: {e}");
            assert!(e.to_string().contains(message), "{name}: {e}");
        }
    }

    #[test]
    fn routing_defaults_on_with_the_inference_extension_header() {
        let c = parse(r#"{"revisions":[{"name":"a","hosts":["a"]}]}"#).unwrap();
        assert_eq!(c.endpoint_header.as_deref(), Some(DEFAULT_ENDPOINT_HEADER));
        let off =
            parse(r#"{"revisions":[{"name":"a","hosts":["a"]}],"routing":{"enabled":false}}"#)
                .unwrap();
        assert_eq!(off.endpoint_header, None);
        let own = parse(
            r#"{"revisions":[{"name":"a","hosts":["a"]}],"routing":{"endpointHeader":" X-Pod "}}"#,
        )
        .unwrap();
        assert_eq!(own.endpoint_header.as_deref(), Some("x-pod"));
        let bad = parse(
            r#"{"revisions":[{"name":"a","hosts":["a"]}],"routing":{"endpointHeader":":path"}}"#,
        )
        .unwrap_err();
        assert_eq!(bad.path(), "routing.endpointHeader");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = Config::parse(&bytes);
        }
    }
}
