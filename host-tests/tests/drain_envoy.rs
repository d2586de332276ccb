//! Drain in real Envoy (`--concurrency 4`): when the gateway is told to drain (`POST
//! /healthcheck/fail`, what a Kubernetes preStop hook sends before the pod stops), the filter
//! learns it from Envoy's `/ready` at its next admin poll and answers every waiter `503
//! gateway-draining` with `retry-after`; requests in flight complete; nothing is reset and
//! nothing hangs until Envoy exits.
//!
//! Needs `.venv/bin/envoy` (`make setup`); builds filter.wasm itself.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::client::Request;
use inflight_host_tests::envoy::{self, free_port, Cluster, Envoy, Gateway, ADMIN_CLUSTER};
use inflight_host_tests::upstream::Upstream;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn a_drain_answers_waiters_503_and_lets_in_flight_requests_finish() {
    let up = Upstream::start().unwrap();
    let config = serde_json::json!({
        "revisions": [{
            "name": "rev-a", "hosts": ["a.test"], "containerConcurrency": 10,
            "upstreamCluster": "rev-a", "bufferDepth": 100, "maxWait": "60s"
        }],
        "membership": {"cluster": ADMIN_CLUSTER, "interval": "200ms"},
        "tick": "50ms", "retryAfter": "2s"
    });
    let g = Gateway {
        plugin_config: config.to_string(),
        routes: vec![],
        clusters: vec![Cluster::fixed("rev-a", vec![up.port()])],
        wasm: envoy::filter_wasm(),
        admin_port: Some(free_port().unwrap()),
    };
    let envoy = Envoy::start(&g.yaml(), 4).expect("start envoy");
    envoy
        .wait_stats(Duration::from_secs(10), "1 ready", |s| {
            s.gauge("inflight_ready_replicas", "rev-a") == 1
        })
        .unwrap();
    let addr = envoy.listener;
    let send = move |i: usize| {
        thread::spawn(move || {
            Request::get(addr, "a.test")
                .header("x-gate", 1)
                .header("x-id", i)
                .timeout(Duration::from_secs(30))
                .send()
        })
    };
    let in_flight: Vec<_> = (0..10).map(send).collect();
    envoy
        .wait_stats(Duration::from_secs(10), "10 in flight", |s| {
            s.gauge("inflight_active", "rev-a") == 10
        })
        .unwrap();
    let waiters: Vec<_> = (10..40).map(send).collect();
    envoy
        .wait_stats(Duration::from_secs(10), "30 waiting", |s| {
            s.gauge("inflight_queued", "rev-a") == 30
        })
        .unwrap();
    let drain_at = Instant::now();
    let (status, _) = envoy.admin_post("/healthcheck/fail").unwrap();
    assert_eq!(status, 200);
    let mut answered_after = Duration::ZERO;
    for w in waiters {
        let r = w.join().unwrap().expect("a waiter is answered, not reset");
        answered_after = answered_after.max(drain_at.elapsed());
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.header("x-inflight-shed"), Some("gateway-draining"));
        assert_eq!(r.header("retry-after"), Some("2"));
    }
    assert_eq!(up.current(), 10, "what is in flight is untouched");
    // While draining, a request that would wait is shed at once.
    let r = Request::get(addr, "a.test").send().unwrap();
    assert_eq!(r.header("x-inflight-shed"), Some("gateway-draining"));
    up.open_gate();
    for h in in_flight {
        let r = h.join().unwrap().expect("in flight completes");
        assert_eq!(r.status, 200);
    }
    // With slots free, a draining gateway still serves.
    assert_eq!(Request::get(addr, "a.test").send().unwrap().status, 200);
    let s = envoy
        .wait_stats(Duration::from_secs(5), "drained", |s| {
            s.gauge("inflight_active", "rev-a") == 0 && s.gauge("inflight_queued", "rev-a") == 0
        })
        .unwrap();
    assert_eq!(s.outcome("rev-a", "shed_draining"), 31);
    assert_eq!(s.outcome("rev-a", "admitted"), 11);
    eprintln!(
        "drain: 30 waiters answered 503 gateway-draining within {answered_after:?} of /healthcheck/fail (poll 200 ms, tick 50 ms); 10 in flight completed 200"
    );
    // Envoy stops (dropped) with nothing left to reset.
}
