//! The local scaler against real Envoy (with the filter) and real predictor processes, driven
//! by `inflight up` exactly as a user runs it: load up → scales up; load gone → scales down after
//! the (shortened) stable window, draining without failed requests; a replica killed →
//! restarted; SIGTERM → every process stopped.
//!
//! Requests carry `x-predictor-delay-ms` (the predictor's test aid, `--delay-header`) so that
//! each takes ~50 ms and the gateway's average concurrency equals the number of clients even on
//! a busy 2-core machine; the scaler's logic, not the model's speed, is under test.

// Test helpers and tests: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod up_common;

use std::time::{Duration, Instant};
use up_common::*;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let c = serde_json::json!({
        "port": 0,
        "scalerTick": "250ms",
        "membershipInterval": "250ms",
        "revisions": [{
            "name": "scaled",
            "hosts": ["scaled.example.com"],
            "containerConcurrency": 4,
            "target": 2,
            "targetUtilizationPercentage": 100,
            "initialReplicas": 1,
            "maxWait": "30s",
            "autoscaling": {
                "minScale": 1, "maxScale": 4, "stableWindow": "6s",
                "panicWindowPercentage": 10, "panicThresholdPercentage": 200,
                "maxScaleDownRate": 2
            },
            "predictor": {
                "command": "inflight-predictor",
                "args": ["--model-name", "mnist", "--delay-header"],
                "drainTimeout": "10s"
            }
        }]
    });
    let p = dir.join("stack.json");
    std::fs::write(&p, c.to_string()).unwrap();
    p
}

fn rev(s: &serde_json::Value) -> &serde_json::Value {
    &s["revisions"][0]
}

fn ready(s: &serde_json::Value) -> u64 {
    rev(s)["ready"].as_u64().unwrap_or(0)
}

#[test]
fn scales_up_down_drains_and_replaces() {
    let dir = scratch("scaler");
    let cfg = config(&dir);
    let mut up = Up::start(&dir, &["--config", cfg.to_str().unwrap()]);
    let s = up.wait(Duration::from_secs(90), "1 ready replica", |s| {
        ready(s) == 1
    });
    let listener = s["listener"].as_str().unwrap().to_string();
    let mut all_pids: Vec<u64> = vec![s["envoyPid"].as_u64().unwrap()];

    // Load up: 8 clients against target 2 → the gateway asks for 4.
    let t0 = Instant::now();
    let load = hey(
        &listener,
        "scaled.example.com",
        8,
        8,
        &["x-predictor-delay-ms: 50"],
    );
    let s = up.wait(
        Duration::from_secs(20),
        "4 ready replicas under load",
        |s| ready(s) == 4,
    );
    let scale_up = t0.elapsed();
    for p in rev(&s)["pids"].as_array().unwrap() {
        all_pids.push(p.as_u64().unwrap());
    }
    // `inflight top` sees the same gateway.
    let top = std::process::Command::new(env!("CARGO_BIN_EXE_inflight"))
        .args(["top", "--admin", s["admin"].as_str().unwrap()])
        .args(["--count", "2", "--interval", "0.3"])
        .output()
        .unwrap();
    let top_out = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{top_out}");
    assert!(
        top_out.contains("READY/DESIRED") && top_out.contains("scaled "),
        "{top_out}"
    );
    let out = load.wait_with_output().unwrap();
    let codes = hey_statuses(&out);
    assert_eq!(
        codes.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        vec![200],
        "every request under load answered 200: {codes:?}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for r in rev(&s)["replicas"].as_array().unwrap() {
        assert!(
            r["maxInFlight"].as_f64().unwrap() <= 4.0,
            "hard limit 4 exceeded at a replica: {r}"
        );
    }

    // Load gone (one slow client left, which still needs one replica): after the 6 s stable
    // window the gateway asks for 1, at most halving per decision; replicas drain first.
    let t1 = Instant::now();
    let trickle = hey(
        &listener,
        "scaled.example.com",
        1,
        60,
        &["x-predictor-delay-ms: 20"],
    );
    let s = up.wait(Duration::from_secs(30), "back to 1 replica", |s| {
        ready(s) == 1 && rev(s)["replicas"].as_array().map(Vec::len) == Some(1)
    });
    let scale_down = t1.elapsed();
    assert!(
        scale_down >= Duration::from_secs(4),
        "scaled down after {scale_down:?}, before the stable window could pass"
    );
    assert_eq!(rev(&s)["target"], 1);

    // The trickle ran through the whole scale-down: every drained replica finished its
    // requests, none failed. (hey prints its report on SIGINT.)
    assert!(unsafe_kill(trickle.id(), libc::SIGINT));
    let out = trickle.wait_with_output().unwrap();
    let codes = hey_statuses(&out);
    assert!(
        codes.len() == 1 && codes[0].0 == 200 && codes[0].1 > 20,
        "requests during the scale-down: {codes:?}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A replica killed → noticed and restarted in place, and serving again. (Requests in
    // flight on it when it dies fail; that is the crash, not the scaler.)
    let victim = rev(&s)["replicas"][0].clone();
    let pid = victim["pid"].as_u64().unwrap();
    assert!(unsafe_kill(pid as u32, libc::SIGKILL));
    let s = up.wait(
        Duration::from_secs(30),
        "the killed replica restarted and ready",
        |s| {
            let r = &rev(s)["replicas"][0];
            r["restarts"].as_u64() == Some(1) && r["ready"] == true && ready(s) == 1
        },
    );
    assert_eq!(rev(&s)["replicas"][0]["name"], victim["name"]);
    assert_ne!(rev(&s)["replicas"][0]["pid"], victim["pid"]);
    // The gateway learns the new endpoint within a membership poll.
    std::thread::sleep(Duration::from_millis(1000));
    let out = hey(&listener, "scaled.example.com", 2, 2, &[])
        .wait_with_output()
        .unwrap();
    let codes = hey_statuses(&out);
    assert!(
        codes.len() == 1 && codes[0].0 == 200,
        "after the restart: {codes:?}"
    );
    for p in rev(&s)["pids"].as_array().unwrap() {
        all_pids.push(p.as_u64().unwrap());
    }

    // Stop: SIGTERM → clean exit, nothing left.
    let status = up.terminate(Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{}", up.output());
    let end = up.state().unwrap();
    assert_eq!(end["stopped"], true);
    for p in end["pids"].as_array().unwrap() {
        all_pids.push(p.as_u64().unwrap());
    }
    all_pids.sort_unstable();
    all_pids.dedup();
    let left: Vec<u64> = all_pids
        .iter()
        .copied()
        .filter(|&p| alive(p as u32))
        .collect();
    assert!(left.is_empty(), "still running: {left:?}");
    let log = up.output();
    assert!(log.contains("leaves EDS, draining"), "{log}");
    assert!(log.contains("exited unexpectedly"), "{log}");
    eprintln!("scale-up 1→4 ready in {scale_up:?}; scale-down to 1 in {scale_down:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A revision that may scale to zero (`minScale: 0`), with a 4 s stable window and a 3 s
/// scale-to-zero grace period so that idling takes seconds.
fn zero_config(dir: &std::path::Path) -> std::path::PathBuf {
    let c = serde_json::json!({
        "port": 0,
        "scalerTick": "250ms",
        "membershipInterval": "250ms",
        "revisions": [{
            "name": "zero",
            "hosts": ["zero.example.com"],
            "containerConcurrency": 4,
            "target": 2,
            "targetUtilizationPercentage": 100,
            "initialReplicas": 1,
            "maxWait": "30s",
            "autoscaling": {
                "minScale": 0, "maxScale": 3, "stableWindow": "4s",
                "scaleToZeroGracePeriod": "3s"
            },
            "predictor": {
                "command": "inflight-predictor",
                "args": ["--model-name", "mnist", "--delay-header"],
                "drainTimeout": "10s"
            }
        }]
    });
    let p = dir.join("stack.json");
    std::fs::write(&p, c.to_string()).unwrap();
    p
}

/// One HTTP/1.1 exchange on a new connection: the status, the time to the answer's first
/// byte, and the whole answer.
fn exchange(addr: &str, request: &str) -> (u16, Duration, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let t0 = Instant::now();
    s.write_all(request.as_bytes()).unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    let ttfb = t0.elapsed();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let text = format!("{}{}", first[0] as char, String::from_utf8_lossy(&rest));
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, ttfb, text)
}

/// The mnist sample POSTed to the revision behind `host`.
fn predict(listener: &str, host: &str) -> (u16, Duration, String) {
    let body =
        std::fs::read_to_string(workspace_root().join("predictor/samples/mnist.json")).unwrap();
    exchange(
        listener,
        &format!(
            "POST /v1/models/mnist:predict HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// The value of the series `name{revision="…"}` (its first sample) in the gateway's stats.
fn gateway_stat(admin: &str, name: &str, revision: &str) -> Option<f64> {
    let (_, _, text) = exchange(
        admin,
        "GET /stats/prometheus HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n",
    );
    let prefix = format!("{name}{{revision=\"{revision}\"");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn scales_to_zero_after_the_grace_period_and_back_on_the_next_request() {
    let dir = scratch("zero");
    let cfg = zero_config(&dir);
    let mut up = Up::start(&dir, &["--config", cfg.to_str().unwrap()]);
    let s = up.wait(Duration::from_secs(90), "1 ready replica", |s| {
        ready(s) == 1
    });
    let listener = s["listener"].as_str().unwrap().to_string();
    let admin = s["admin"].as_str().unwrap().to_string();

    // Load: 6 clients against target 2 → the gateway asks for 3.
    let t0 = Instant::now();
    let load = hey(
        &listener,
        "zero.example.com",
        6,
        6,
        &["x-predictor-delay-ms: 50"],
    );
    up.wait(
        Duration::from_secs(20),
        "3 ready replicas under load",
        |s| ready(s) == 3,
    );
    let scale_up = t0.elapsed();
    let out = load.wait_with_output().unwrap();
    let codes = hey_statuses(&out);
    assert_eq!(
        codes.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        vec![200],
        "every request under load answered 200: {codes:?}"
    );

    // Idle: once the stable window (4 s) has seen no demand and the grace period (3 s) has
    // passed, the gateway asks for 0, and the scaler drains the last replica and stops it. The
    // decisions (once a second) see the last demand in the window's 400 ms buckets until at
    // least 4 - 1 - 0.4 s after it, so 0 comes at least 5.6 s after the load.
    let idle = Instant::now();
    up.wait(Duration::from_secs(60), "the gateway asking for 0", |s| {
        rev(s)["desired"] == 0.0
    });
    let to_desired_zero = idle.elapsed();
    assert!(
        to_desired_zero >= Duration::from_secs(5),
        "desired 0 {to_desired_zero:?} after the load, before the stable window and the grace period could pass"
    );
    let s = up.wait(Duration::from_secs(30), "0 replicas after idling", |s| {
        rev(s)["replicas"].as_array().map(Vec::len) == Some(0)
    });
    let to_zero = idle.elapsed();
    assert_eq!(rev(&s)["target"], 0);
    assert_eq!(
        gateway_stat(&admin, "inflight_ready_replicas", "zero"),
        Some(0.0)
    );

    // One request on zero replicas: it waits in the gateway, the gateway asks for 1, the scaler
    // starts it, and the request is answered once the replica is ready.
    let waited_before = gateway_stat(&admin, "inflight_queue_wait_ms_count", "zero").unwrap_or(0.0);
    let (status, ttfb, answer) = predict(&listener, "zero.example.com");
    assert_eq!(status, 200, "{answer}\n{}", up.output());
    let s = up.wait(Duration::from_secs(10), "1 ready replica again", |s| {
        ready(s) == 1
    });
    assert_eq!(rev(&s)["target"], 1);
    // Envoy merges histograms at its stats flush (every 5 s): wait for it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while gateway_stat(&admin, "inflight_queue_wait_ms_count", "zero") != Some(waited_before + 1.0)
    {
        assert!(
            Instant::now() < deadline,
            "the request did not wait in the gateway: queue waits {:?}, before {waited_before}",
            gateway_stat(&admin, "inflight_queue_wait_ms_count", "zero")
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let status = up.terminate(Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{}", up.output());
    let log = std::fs::read_to_string(&up.log).unwrap();
    // The starting replica was held at the initial scale, not stopped before it was ever ready.
    let out = up.output();
    assert!(!log.contains("not ready yet, not needed"), "{out}");
    assert!(log.contains("initial scale reached"), "{out}");
    assert_eq!(log.matches("scale 1 → 0").count(), 1, "{out}");
    assert!(log.contains("scale 0 → 1"), "{out}");
    eprintln!(
        "scale-up 1→3 ready in {scale_up:?}; after the load: desired 0 in {to_desired_zero:?}, \
         0 replicas in {to_zero:?}; from zero: time to first byte {ttfb:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
