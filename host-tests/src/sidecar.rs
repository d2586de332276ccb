//! h2c (HTTP/2 prior knowledge) fronts for HTTP/1.1 test upstreams, the way a mesh puts a
//! sidecar before each pod: one Envoy process, one listener per upstream, each forwarding to
//! exactly that upstream, so the concurrency each [`Upstream`](crate::upstream::Upstream)
//! records is the concurrency at its h2 endpoint.
//!
//! The listeners speak HTTP/2 only (`codec_type: HTTP2`): a gateway cluster reaches them with
//! [`http2_cluster_options`]. A front adds nothing a test would see: no route timeout, no
//! retries (none configured, and its `max_retries` circuit breaker is 0, so not even a
//! caller's `x-envoy-retry-on` makes one), no queueing (every other breaker at 100000), the
//! request's headers forwarded unchanged (Envoy adds only `x-forwarded-proto`, and
//! `x-request-id` if there is none). Each request a gateway sends down an h2 stream goes up to its
//! upstream on an HTTP/1.1 connection of its own (Envoy's HTTP/1.1 pool, one request per
//! connection at a time), so many streams on one h2 connection are as many concurrent
//! requests at the upstream.

use crate::envoy::Envoy;
use anyhow::{bail, Context as _, Result};
use inflight_envoy_control::bootstrap::{self, ROUTER};
use std::fmt::Write as _;
use std::net::SocketAddr;

/// Worker threads of the fronts' Envoy: one is plenty for a test's load, on a shared machine.
const WORKERS: u32 = 1;

/// The fronts of some HTTP/1.1 backends: one Envoy process, killed by its pid when dropped
/// (its log tail printed if the test is failing).
pub struct H2Fronts {
    envoy: Envoy,
    addrs: Vec<SocketAddr>,
}

impl H2Fronts {
    /// Starts one Envoy with an h2c listener on a free loopback port for each of `backends`;
    /// returns once it is LIVE and every listener's port is known.
    pub fn start(backends: &[SocketAddr]) -> Result<H2Fronts> {
        if backends.is_empty() {
            bail!("H2Fronts::start needs at least one backend to front");
        }
        let envoy = Envoy::start(&yaml(backends), WORKERS).context("starting the h2 fronts")?;
        let (status, body) = envoy
            .admin_get("/listeners?format=json")
            .context("asking the h2 fronts for their listeners")?;
        if status != 200 {
            bail!("the h2 fronts' /listeners answered {status}: {body}");
        }
        let addrs = listener_addrs(&body, backends.len())?;
        Ok(H2Fronts { envoy, addrs })
    }

    /// The h2c listener of each backend, in the order `start` was given them.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// The fronts' Envoy (admin, log, pid).
    pub fn envoy(&self) -> &Envoy {
        &self.envoy
    }

    /// The fronts' counter or gauge `name` in admin `/stats` (an error if there is none).
    pub fn stat(&self, name: &str) -> Result<u64> {
        stat(&self.envoy, name)
    }

    /// The sum over every front `i` of `http.front_<i>.<stat>`: the h2 side, e.g.
    /// `downstream_cx_http2_total`, `downstream_rq_total`.
    pub fn sum_fronts(&self, stat: &str) -> Result<u64> {
        self.sum(|i| format!("http.front_{i}.{stat}"))
    }

    /// The sum over every front `i` of `cluster.backend_<i>.<stat>`: the HTTP/1.1 side, e.g.
    /// `upstream_cx_http1_total`, `upstream_rq_retry`.
    pub fn sum_backends(&self, stat: &str) -> Result<u64> {
        self.sum(|i| format!("cluster.backend_{i}.{stat}"))
    }

    fn sum(&self, name: impl Fn(usize) -> String) -> Result<u64> {
        let text = stats_text(&self.envoy)?;
        (0..self.addrs.len())
            .map(|i| stat_in(&text, &name(i)))
            .sum()
    }
}

/// What a gateway cluster needs (at the 4-space indentation of a cluster's fields, like the
/// fragments of [`bootstrap`]) to reach h2c-only endpoints such as [`H2Fronts`]: HTTP/2 with
/// prior knowledge to every endpoint of the cluster.
pub fn http2_cluster_options() -> &'static str {
    r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
"#
}

/// The fronts' bootstrap: listener `front-<i>` (stat prefix `front_<i>`) on loopback port 0
/// routes everything to cluster `backend_<i>`, whose one endpoint is `backends[i]`.
pub fn yaml(backends: &[SocketAddr]) -> String {
    let mut listeners = String::new();
    let mut clusters = String::new();
    for (i, &backend) in backends.iter().enumerate() {
        let _ = write!(
            listeners,
            r#"  - name: front-{i}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front_{i}
          codec_type: HTTP2
          stream_idle_timeout: 600s
          route_config:
            virtual_hosts:
            - name: backend_{i}
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend_{i}, timeout: 0s }}
          http_filters:
{ROUTER}"#
        );
        // max_retries 0: a retry would be one more request at the upstream that the gateway
        // never sent; with this breaker at 0 Envoy cannot make one, whatever the headers say.
        let _ = write!(
            clusters,
            "  - name: backend_{i}\n    type: STATIC\n    connect_timeout: 1s\n    circuit_breakers:\n      thresholds:\n      - {{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 0 }}\n    load_assignment:\n      cluster_name: backend_{i}\n      endpoints:\n      - lb_endpoints:\n{}",
            bootstrap::lb_endpoint(backend)
        );
    }
    format!(
        "node: {{ id: inflight-h2-fronts, cluster: inflight-h2-fronts }}\n{admin}static_resources:\n  listeners:\n{listeners}  clusters:\n{clusters}",
        admin = bootstrap::admin(0),
    )
}

/// The loopback address of listeners `front-0` … `front-<n-1>`, in that order, from an admin
/// `/listeners?format=json` answer.
fn listener_addrs(json: &str, n: usize) -> Result<Vec<SocketAddr>> {
    let v: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("parsing /listeners: {json}"))?;
    let statuses = v["listener_statuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    (0..n)
        .map(|i| {
            let name = format!("front-{i}");
            statuses
                .iter()
                .find(|s| s["name"] == name.as_str())
                .and_then(|s| s["local_address"]["socket_address"]["port_value"].as_u64())
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p != 0)
                .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                .with_context(|| format!("no bound listener {name} in /listeners: {json}"))
        })
        .collect()
}

/// Counter or gauge `name` (e.g. `cluster.fronts.upstream_cx_http2_total`) in `envoy`'s admin
/// `/stats`; an error if Envoy has no such stat, so a misspelt name fails a test instead of
/// reading as 0.
pub fn stat(envoy: &inflight_envoy_control::Envoy, name: &str) -> Result<u64> {
    stat_in(&stats_text(envoy)?, name)
}

fn stats_text(envoy: &inflight_envoy_control::Envoy) -> Result<String> {
    let (status, body) = envoy.admin_get("/stats").context("GET /stats")?;
    if status != 200 {
        bail!("/stats answered {status}: {body}");
    }
    Ok(body)
}

/// `name`'s value in admin `/stats` text (`name: value` lines).
fn stat_in(text: &str, name: &str) -> Result<u64> {
    let (_, value) = text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .find(|(n, _)| *n == name)
        .with_context(|| format!("Envoy has no stat {name}"))?;
    value
        .trim()
        .parse()
        .with_context(|| format!("stat {name} is not a counter or gauge: {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn each_backend_gets_an_h2_only_listener_and_a_cluster_of_its_own() {
        let y = yaml(&[addr(9001), addr(9002)]);
        for i in 0..2 {
            assert!(y.contains(&format!("  - name: front-{i}\n")), "{y}");
            assert!(y.contains(&format!("  - name: backend_{i}\n")), "{y}");
            assert!(
                y.contains(&format!("route: {{ cluster: backend_{i}, timeout: 0s }}\n")),
                "{y}"
            );
        }
        assert_eq!(y.matches("codec_type: HTTP2\n").count(), 2, "{y}");
        assert_eq!(y.matches("max_retries: 0").count(), 2, "{y}");
        assert!(!y.contains("retry_policy"), "{y}");
        assert!(y.contains("port_value: 9001 }") && y.contains("port_value: 9002 }"));
        assert_eq!(
            y.matches("port_value: 0 }").count(),
            3,
            "admin + 2 listeners: {y}"
        );
    }

    #[test]
    fn the_cluster_options_are_whole_lines_at_cluster_indentation() {
        let o = http2_cluster_options();
        assert!(o.ends_with('\n') && !o.ends_with("\n\n"), "{o:?}");
        assert!(
            o.starts_with("    typed_extension_protocol_options:\n"),
            "{o}"
        );
        assert!(
            o.lines().all(|l| l.starts_with("    ")),
            "nothing shallower than a cluster field: {o}"
        );
    }

    #[test]
    fn listener_addresses_come_back_in_front_order() {
        let json = r#"{"listener_statuses":[
            {"name":"front-1","local_address":{"socket_address":{"address":"127.0.0.1","port_value":4002}}},
            {"name":"front-0","local_address":{"socket_address":{"address":"127.0.0.1","port_value":4001}}}]}"#;
        assert_eq!(
            listener_addrs(json, 2).unwrap(),
            vec![addr(4001), addr(4002)]
        );
        let cases = [
            ("a front missing", json, 3),
            ("not json", "<html>", 1),
            (
                "not bound yet",
                r#"{"listener_statuses":[{"name":"front-0","local_address":{"socket_address":{"port_value":0}}}]}"#,
                1,
            ),
        ];
        for (name, json, n) in cases {
            assert!(listener_addrs(json, n).is_err(), "{name}");
        }
    }

    #[test]
    fn stats_are_read_by_exact_name() {
        let text = "cluster.fronts.upstream_cx_http2_total: 2\ncluster.fronts.upstream_cx_http2_total_x: 9\ncluster.fronts.upstream_rq_time: P0(nan,1) P25(nan,2)\n";
        let cases = [
            ("present", "cluster.fronts.upstream_cx_http2_total", Some(2)),
            ("absent", "cluster.fronts.upstream_cx_http1_total", None),
            ("a prefix of another", "cluster.fronts.upstream_cx", None),
            (
                "a histogram is no number",
                "cluster.fronts.upstream_rq_time",
                None,
            ),
        ];
        for (name, stat, want) in cases {
            assert_eq!(stat_in(text, stat).ok(), want, "{name}");
        }
    }

    #[test]
    fn no_backends_is_an_error_not_an_envoy_without_listeners() {
        let err = H2Fronts::start(&[]).err().expect("refused");
        assert!(err.to_string().contains("at least one backend"), "{err}");
    }
}
