//! The gateway's stats as the scaler and the live view read them: one scrape of Envoy's
//! `/stats/prometheus`, parsed with `prometheus-parse`, reduced to per-revision numbers.

use super::http;
use anyhow::{bail, Result};
use inflight_core::Outcome;
use prometheus_parse::{Scrape, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// One revision's series at one scrape. Gauges the filter does not export (yet) are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RevisionStats {
    /// The filter exports series for it (a revision, not just an Envoy cluster).
    pub tracked: bool,
    pub admitted: f64,
    pub shed_full: f64,
    pub shed_timeout: f64,
    /// Shed because the gateway's shared state failed (a host error).
    pub state_unavailable: f64,
    /// Shed because the gateway drains.
    pub shed_draining: f64,
    /// Sent to a peer gateway of a fleet (admitted there).
    pub forwarded: f64,
    pub cancelled: f64,
    pub active: f64,
    pub queued: f64,
    pub capacity: f64,
    pub desired: Option<f64>,
    pub ready: Option<f64>,
    /// ∫(in-flight + queued) dt in request-milliseconds.
    pub demand_ms_total: Option<f64>,
    pub stable_concurrency: Option<f64>,
    pub panic_concurrency: Option<f64>,
    /// Decisions the queue-aware panic raised (a counter; 0 when not exported).
    pub queue_aware_scale_ups: f64,
    /// Cumulative `(upper bound ms, count)` of the time upstream took (Envoy's cluster
    /// `upstream_rq_time` for the revision's cluster).
    pub upstream_time: Vec<(f64, f64)>,
    /// Cumulative `(upper bound ms, count)` of the time spent queued in the gateway.
    pub queue_wait: Vec<(f64, f64)>,
    /// Responses by class from the revision's cluster (`2`, `5`, …).
    pub upstream_rq_xx: BTreeMap<String, f64>,
    /// Requests waiting per priority class (`inflight_class_queued`; exported only with a
    /// `classHeader`), by class name.
    pub queued_by_class: BTreeMap<String, f64>,
}

impl RevisionStats {
    pub fn shed(&self) -> f64 {
        self.shed_full + self.shed_timeout + self.state_unavailable + self.shed_draining
    }

    /// Every request the gateway decided on (admitted or shed).
    pub fn decided(&self) -> f64 {
        self.admitted + self.shed()
    }
}

/// Per-revision stats of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub revisions: BTreeMap<String, RevisionStats>,
    /// The size of the fleet the gateway sees (`inflight_fleet_gateways`), when in a fleet.
    pub fleet_gateways: Option<f64>,
}

/// The stats of a fleet's gateways as one gateway's: what each counts of its own requests
/// (counters, in-flight, queued, its slice of the capacity, histograms) summed, so each request
/// counts once (a forwarded one is counted where it is admitted); what every gateway computes
/// for the whole fleet (the desired count, the windows' averages behind it, ready replicas)
/// the highest, never the sum (docs/fleet.md, "Scaling signals").
pub fn merge(gateways: &[Snapshot]) -> Snapshot {
    let mut out = Snapshot::default();
    for g in gateways {
        out.fleet_gateways = max_of(out.fleet_gateways, g.fleet_gateways);
        for (name, r) in &g.revisions {
            let m = out.revisions.entry(name.clone()).or_default();
            m.tracked |= r.tracked;
            m.admitted += r.admitted;
            m.shed_full += r.shed_full;
            m.shed_timeout += r.shed_timeout;
            m.state_unavailable += r.state_unavailable;
            m.shed_draining += r.shed_draining;
            m.cancelled += r.cancelled;
            m.forwarded += r.forwarded;
            m.active += r.active;
            m.queued += r.queued;
            m.capacity += r.capacity;
            m.desired = max_of(m.desired, r.desired);
            m.ready = max_of(m.ready, r.ready);
            m.demand_ms_total = match (m.demand_ms_total, r.demand_ms_total) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            m.stable_concurrency = max_of(m.stable_concurrency, r.stable_concurrency);
            m.panic_concurrency = max_of(m.panic_concurrency, r.panic_concurrency);
            // Every gateway decides on the fleet's demand, so each counts the same panics.
            m.queue_aware_scale_ups = m.queue_aware_scale_ups.max(r.queue_aware_scale_ups);
            m.upstream_time = add_buckets(&m.upstream_time, &r.upstream_time);
            m.queue_wait = add_buckets(&m.queue_wait, &r.queue_wait);
            for (class, v) in &r.upstream_rq_xx {
                *m.upstream_rq_xx.entry(class.clone()).or_default() += v;
            }
            for (class, v) in &r.queued_by_class {
                *m.queued_by_class.entry(class.clone()).or_default() += v;
            }
        }
    }
    out
}

fn max_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Two cumulative histograms as one, bucket by bucket (the gateways' bounds are the same; a
/// bound only one has is taken as it is).
fn add_buckets(a: &[(f64, f64)], b: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = a.to_vec();
    for &(le, c) in b {
        match out.iter_mut().find(|(ole, _)| *ole == le) {
            Some((_, oc)) => *oc += c,
            None => out.push((le, c)),
        }
    }
    out.sort_by(|x, y| x.0.total_cmp(&y.0));
    out
}

/// Scrapes `admin` once.
pub fn scrape(admin: SocketAddr) -> Result<Snapshot> {
    let (status, body) = http::get(admin, "/stats/prometheus", Duration::from_secs(2))?;
    if status != 200 {
        bail!("{admin}/stats/prometheus answered {status}");
    }
    parse(&body)
}

pub fn parse(text: &str) -> Result<Snapshot> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let mut snap = Snapshot::default();
    for s in scrape.samples {
        if s.metric == "inflight_fleet_gateways" {
            if let Value::Gauge(v) | Value::Untyped(v) = s.value {
                snap.fleet_gateways = max_of(snap.fleet_gateways, Some(v));
            }
            continue;
        }
        // Per-revision filter series carry `revision`; Envoy's cluster series carry the cluster
        // name, which for the local stack is the revision's name.
        let (revision, cluster_series) =
            match (s.labels.get("revision"), s.labels.get("envoy_cluster_name")) {
                (Some(r), _) => (r.to_string(), false),
                (None, Some(c)) => (c.to_string(), true),
                _ => continue,
            };
        let scalar = match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
            _ => None,
        };
        let buckets = match &s.value {
            Value::Histogram(h) => h.iter().map(|b| (b.less_than, b.count)).collect(),
            _ => Vec::new(),
        };
        let name = s.metric.as_str();
        // Envoy's other clusters (the admin cluster) land here too; callers look revisions up
        // by name, so they are never read.
        let r = snap.revisions.entry(revision).or_default();
        if cluster_series {
            apply_cluster(r, name, &s.labels, scalar, buckets);
            continue;
        }
        let v = scalar.unwrap_or(0.0);
        r.tracked = true;
        match name {
            "inflight_requests_total" => {
                match s.labels.get("outcome").and_then(Outcome::from_label) {
                    Some(Outcome::Admitted) => r.admitted = v,
                    Some(Outcome::ShedFull) => r.shed_full = v,
                    Some(Outcome::ShedTimeout) => r.shed_timeout = v,
                    Some(Outcome::StateUnavailable) => r.state_unavailable = v,
                    Some(Outcome::ShedDraining) => r.shed_draining = v,
                    Some(Outcome::Cancelled) => r.cancelled = v,
                    Some(Outcome::Forwarded) => r.forwarded = v,
                    Some(Outcome::UnknownRevision) | None => {}
                }
            }
            "inflight_active" => r.active = v,
            "inflight_queued" => r.queued = v,
            "inflight_capacity" => r.capacity = v,
            "inflight_desired_replicas" => r.desired = Some(v),
            "inflight_ready_replicas" => r.ready = Some(v),
            "inflight_demand_ms_total" => r.demand_ms_total = Some(v),
            "inflight_stable_concurrency_milli" => r.stable_concurrency = Some(v / 1000.0),
            "inflight_panic_concurrency_milli" => r.panic_concurrency = Some(v / 1000.0),
            "inflight_queue_aware_scale_ups_total" => r.queue_aware_scale_ups = v,
            "inflight_queue_wait_ms" => r.queue_wait = buckets,
            "inflight_class_queued" => {
                if let Some(class) = s.labels.get("class") {
                    r.queued_by_class.insert(class.to_string(), v);
                }
            }
            _ => {}
        }
    }
    Ok(snap)
}

fn apply_cluster(
    r: &mut RevisionStats,
    name: &str,
    labels: &prometheus_parse::Labels,
    scalar: Option<f64>,
    buckets: Vec<(f64, f64)>,
) {
    match name {
        "envoy_cluster_upstream_rq_time" => r.upstream_time = buckets,
        "envoy_cluster_upstream_rq_xx" => {
            if let (Some(class), Some(v)) = (labels.get("envoy_response_code_class"), scalar) {
                r.upstream_rq_xx.insert(class.to_string(), v);
            }
        }
        _ => {}
    }
}

/// The `q` quantile (0..1) of the observations between two cumulative histograms (`now` minus
/// `before`), interpolated linearly inside the bucket as Prometheus' `histogram_quantile` does.
/// `None` when nothing was observed in between.
pub fn quantile(before: &[(f64, f64)], now: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|&(le, c)| {
            let b = before
                .iter()
                .find(|(ble, _)| *ble == le)
                .map_or(0.0, |(_, c)| *c);
            (le, (c - b).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_le = 0.0;
    let mut prev_c = 0.0;
    for &(le, c) in &delta {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let in_bucket = c - prev_c;
            let frac = if in_bucket > 0.0 {
                (rank - prev_c) / in_bucket
            } else {
                1.0
            };
            return Some(prev_le + (le - prev_le) * frac);
        }
        prev_le = le;
        prev_c = c;
    }
    Some(prev_le)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVOY: &str = r#"# TYPE inflight_requests_total counter
inflight_requests_total{revision="torchserve",outcome="admitted"} 120
inflight_requests_total{revision="torchserve",outcome="shed_full"} 3
inflight_requests_total{revision="torchserve",outcome="shed_timeout"} 1
# TYPE inflight_active gauge
inflight_active{revision="torchserve"} 10
# TYPE inflight_queued gauge
inflight_queued{revision="torchserve"} 40
# TYPE inflight_desired_replicas gauge
inflight_desired_replicas{revision="torchserve"} 5
# TYPE inflight_stable_concurrency_milli gauge
inflight_stable_concurrency_milli{revision="torchserve"} 48500
# TYPE inflight_queue_aware_scale_ups_total counter
inflight_queue_aware_scale_ups_total{revision="torchserve"} 1
# TYPE envoy_cluster_upstream_rq_xx counter
envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="torchserve"} 117
# TYPE envoy_cluster_upstream_rq_time histogram
envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="torchserve",le="1"} 10
envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="torchserve",le="5"} 90
envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="torchserve",le="+Inf"} 100
envoy_cluster_upstream_rq_time_sum{envoy_cluster_name="torchserve"} 300
envoy_cluster_upstream_rq_time_count{envoy_cluster_name="torchserve"} 100
# TYPE inflight_class_queued gauge
inflight_class_queued{revision="torchserve",class="critical"} 0
inflight_class_queued{revision="torchserve",class="sheddable"} 38
inflight_class_queued{revision="torchserve",class="standard"} 2
# TYPE envoy_server_live gauge
envoy_server_live{} 1
"#;

    #[test]
    fn parses_envoy_exposition() {
        let s = parse(ENVOY).unwrap();
        let r = &s.revisions["torchserve"];
        assert_eq!((r.admitted, r.shed(), r.decided()), (120.0, 4.0, 124.0));
        assert_eq!((r.active, r.queued), (10.0, 40.0));
        assert_eq!(r.desired, Some(5.0));
        assert_eq!(r.ready, None, "absent gauges stay None");
        assert_eq!(r.stable_concurrency, Some(48.5));
        assert_eq!(r.queue_aware_scale_ups, 1.0);
        assert_eq!(r.upstream_rq_xx.get("2"), Some(&117.0));
        assert_eq!(r.upstream_time.len(), 3);
        assert_eq!(r.queued_by_class.get("sheddable"), Some(&38.0));
        assert_eq!(r.queued_by_class.len(), 3);
    }

    #[test]
    fn a_fleet_sums_what_each_gateway_counts_and_takes_the_highest_decision() {
        let gateway = |admitted: f64, forwarded: f64, active: f64, desired: f64, le5: f64| {
            parse(&format!(
                r#"# TYPE inflight_requests_total counter
inflight_requests_total{{revision="torchserve",outcome="admitted"}} {admitted}
inflight_requests_total{{revision="torchserve",outcome="forwarded"}} {forwarded}
# TYPE inflight_active gauge
inflight_active{{revision="torchserve"}} {active}
# TYPE inflight_capacity gauge
inflight_capacity{{revision="torchserve"}} {active}
# TYPE inflight_desired_replicas gauge
inflight_desired_replicas{{revision="torchserve"}} {desired}
# TYPE inflight_ready_replicas gauge
inflight_ready_replicas{{revision="torchserve"}} 2
# TYPE inflight_demand_ms_total counter
inflight_demand_ms_total{{revision="torchserve"}} 1000
# TYPE inflight_fleet_gateways gauge
inflight_fleet_gateways 3
# TYPE envoy_cluster_upstream_rq_time histogram
envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="torchserve",le="1"}} 1
envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="torchserve",le="5"}} {le5}
envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="torchserve",le="+Inf"}} {le5}
"#
            ))
            .unwrap()
        };
        let gateways = [
            gateway(100.0, 7.0, 4.0, 5.0, 10.0),
            gateway(50.0, 0.0, 3.0, 4.0, 20.0),
            gateway(25.0, 1.0, 3.0, 5.0, 30.0),
        ];
        assert_eq!(gateways[0].fleet_gateways, Some(3.0));
        assert_eq!(gateways[0].revisions["torchserve"].forwarded, 7.0);
        let m = merge(&gateways);
        let r = &m.revisions["torchserve"];
        assert_eq!((r.admitted, r.forwarded), (175.0, 8.0), "counters summed");
        assert_eq!((r.active, r.capacity), (10.0, 10.0), "slices summed");
        assert_eq!(
            r.desired,
            Some(5.0),
            "the fleet-wide decision: the max, never the sum"
        );
        assert_eq!(r.ready, Some(2.0), "every gateway sees the same replicas");
        assert_eq!(r.demand_ms_total, Some(3000.0));
        assert_eq!(
            r.upstream_time,
            [(1.0, 3.0), (5.0, 60.0), (f64::INFINITY, 60.0)]
        );
        assert_eq!(m.fleet_gateways, Some(3.0));
        assert_eq!(
            merge(&gateways[..1]),
            gateways[0],
            "a fleet of one is that gateway"
        );
        assert_eq!(merge(&[]), Snapshot::default());
    }

    #[test]
    fn quantiles_of_a_window() {
        let before = [(1.0, 0.0), (5.0, 0.0), (f64::INFINITY, 0.0)];
        let now = [(1.0, 10.0), (5.0, 90.0), (f64::INFINITY, 100.0)];
        let cases = [
            ("p10 at the first bound", 0.1, Some(1.0)),
            ("p50 interpolated", 0.5, Some(3.0)),
            ("p99 in +Inf reports the last bound", 0.99, Some(5.0)),
        ];
        for (name, q, want) in cases {
            assert_eq!(quantile(&before, &now, q), want, "{name}");
        }
        assert_eq!(
            quantile(&now, &now, 0.5),
            None,
            "no observations in the window"
        );
        assert_eq!(quantile(&[], &[], 0.5), None, "empty histogram");
    }
}
