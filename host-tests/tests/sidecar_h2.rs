//! The h2c fronts of `inflight_host_tests::sidecar` in real Envoy: a plain gateway (router only,
//! no filter) whose cluster speaks HTTP/2 to the fronts reaches the HTTP/1.1 test upstreams
//! through them, every request once, and h2 streams multiplexed on a few connections become
//! concurrent requests at each upstream.
//!
//! Needs `.venv/bin/envoy` (`make setup`); not filter.wasm.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_envoy_control::bootstrap::{self, ROUTER};
use inflight_host_tests::client::{Request, Response};
use inflight_host_tests::envoy::{self, Envoy};
use inflight_host_tests::sidecar::{self, H2Fronts};
use inflight_host_tests::upstream::Upstream;
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

const GATEWAY_WORKERS: u32 = 2;
const CLUSTER: &str = "fronts";

/// A gateway without the filter: everything to one STATIC cluster of `endpoints`, with
/// `protocol_options` among the cluster's fields (over h2: [`sidecar::http2_cluster_options`]).
fn gateway_yaml(endpoints: &[SocketAddr], protocol_options: &str) -> String {
    let mut lb_endpoints = String::new();
    for &e in endpoints {
        lb_endpoints.push_str(&bootstrap::lb_endpoint(e));
    }
    format!(
        r#"node: {{ id: inflight-h2-gateway, cluster: inflight-h2-gateway }}
{admin}{listener}          stream_idle_timeout: 600s
          route_config:
            virtual_hosts:
            - name: default
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {CLUSTER}, timeout: 0s }}
          http_filters:
{ROUTER}  clusters:
  - name: {CLUSTER}
    type: STATIC
    connect_timeout: 1s
    circuit_breakers:
      thresholds:
      - {{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }}
{protocol_options}    load_assignment:
      cluster_name: {CLUSTER}
      endpoints:
      - lb_endpoints:
{lb_endpoints}"#,
        admin = bootstrap::admin(0),
        listener = bootstrap::http_listener("ingress", 0, "ingress"),
    )
}

#[test]
fn the_fronts_and_an_h2_gateway_config_validate() {
    let dir = std::env::temp_dir().join(format!("inflight-h2-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addrs = [
        SocketAddr::from(([127, 0, 0, 1], 9001)),
        SocketAddr::from(([127, 0, 0, 1], 9002)),
    ];
    for (name, yaml) in [
        ("fronts.yaml", sidecar::yaml(&addrs)),
        (
            "gateway.yaml",
            gateway_yaml(&addrs, sidecar::http2_cluster_options()),
        ),
    ] {
        let file = dir.join(name);
        std::fs::write(&file, yaml).unwrap();
        envoy::validate(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_h2_gateway_reaches_http1_upstreams_through_the_fronts() {
    const N: usize = 20;
    let ups = [Upstream::start().unwrap(), Upstream::start().unwrap()];
    let fronts = H2Fronts::start(&ups.iter().map(Upstream::addr).collect::<Vec<_>>()).unwrap();
    assert_eq!(fronts.addrs().len(), ups.len());
    let gateway = Envoy::start(
        &gateway_yaml(&fronts.addrs(), sidecar::http2_cluster_options()),
        GATEWAY_WORKERS,
    )
    .unwrap();

    let addr = gateway.listener;
    let responses: Vec<Response> = (0..N)
        .map(|i| {
            thread::spawn(move || {
                Request::get(addr, "h2.test")
                    .header("x-hold-ms", 200)
                    .header("x-id", i)
                    .send()
                    .expect("request answered")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();

    for r in &responses {
        assert_eq!(r.status, 200, "{r:?}");
        // x-hold-ms got through too: the upstream held every request.
        assert!(r.elapsed >= Duration::from_millis(200), "{r:?}");
    }
    let totals: Vec<u64> = ups.iter().map(Upstream::total).collect();
    let maxes: Vec<u32> = ups.iter().map(Upstream::max_concurrency).collect();
    assert_eq!(totals.iter().sum::<u64>(), N as u64, "totals {totals:?}");
    // The x-id headers got through the gateway and the fronts unchanged, each exactly once.
    let mut ids: Vec<usize> = ups
        .iter()
        .flat_map(Upstream::arrivals)
        .map(|id| id.parse().expect("x-id a number"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..N).collect::<Vec<_>>());

    // The gateway spoke h2, and only h2, to the fronts, on a few connections (one per worker
    // per front, give or take the pool's start-up).
    let stat = |name: &str| sidecar::stat(&gateway, &format!("cluster.{CLUSTER}.{name}")).unwrap();
    let h2_cx = stat("upstream_cx_http2_total");
    assert!(h2_cx > 0, "the gateway opened no h2 connection");
    assert_eq!(stat("upstream_cx_http1_total"), 0);
    assert!(h2_cx < N as u64, "{h2_cx} h2 connections for {N} requests");
    assert_eq!(stat("upstream_rq_total"), N as u64);
    // The fronts took h2 only, and sent each request up once, none retried.
    assert_eq!(
        fronts.sum_fronts("downstream_cx_http2_total").unwrap(),
        h2_cx
    );
    assert_eq!(fronts.sum_fronts("downstream_cx_http1_total").unwrap(), 0);
    assert_eq!(fronts.sum_backends("upstream_rq_total").unwrap(), N as u64);
    assert_eq!(fronts.sum_backends("upstream_rq_retry").unwrap(), 0);
    // Streams multiplexed on those connections became concurrent HTTP/1.1 requests.
    for (i, &max) in maxes.iter().enumerate() {
        assert!(
            max > 1,
            "backend {i} held at most {max} at once; maxes {maxes:?}"
        );
    }
    let http1_cx = fronts.sum_backends("upstream_cx_http1_total").unwrap();
    eprintln!(
        "h2 fronts: {N} requests, totals {totals:?}, max concurrency {maxes:?}; gateway h2 connections {h2_cx}, fronts' HTTP/1.1 connections {http1_cx}"
    );
}

/// Without [`sidecar::http2_cluster_options`] a gateway speaks HTTP/1.1, which the fronts do not.
#[test]
fn the_fronts_refuse_http1() {
    let up = Upstream::start().unwrap();
    let fronts = H2Fronts::start(&[up.addr()]).unwrap();
    let gateway = Envoy::start(&gateway_yaml(&fronts.addrs(), ""), 1).unwrap();
    let r = Request::get(gateway.listener, "h2.test")
        .header("x-id", 0)
        .send()
        .expect("answered");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(up.total(), 0, "nothing got through");
    // The front read HTTP/1.1 bytes where it wanted the h2 preface.
    assert!(fronts.sum_fronts("downstream_cx_protocol_error").unwrap() > 0);
    assert_eq!(fronts.sum_fronts("downstream_rq_total").unwrap(), 0);
}
