//! `inflight up --gateways 3` against real Envoys and real predictors: three gateways behind the
//! L4 Envoy split each replica's containerConcurrency (their slices sum to cc × ready, none holds
//! it all), the load through the L4 port is answered with no replica above cc, `inflight top`
//! shows each gateway's line, `inflight tune --apply` on one gateway reaches all three (they read
//! one plugin configuration file), and SIGTERM stops every process, the L4 Envoy's included.
//!
//! Requests carry `x-predictor-delay-ms` (the predictor's `--delay-header`) so that each takes
//! ~50 ms: the fleet's limit, not the model's speed, is under test.

// Test helpers and tests: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod up_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use up_common::*;

const CC: u32 = 4;
const REPLICAS: u32 = 2;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let c = serde_json::json!({
        "port": 0,
        "gateways": 3,
        "scalerTick": "250ms",
        "membershipInterval": "250ms",
        "revisions": [{
            "name": "fleet",
            "hosts": ["fleet.example.com"],
            "containerConcurrency": CC,
            "target": CC,
            "targetUtilizationPercentage": 100,
            "initialReplicas": REPLICAS,
            "maxWait": "30s",
            "autoscaling": { "minScale": REPLICAS, "maxScale": REPLICAS },
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

/// A gauge of revision `fleet` from one gateway's `/stats/prometheus`.
fn gauge(admin: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) =
        inflight_envoy_control::get(admin, "/stats/prometheus", Duration::from_secs(2)).ok()?;
    let prefix = format!("{name}{{revision=\"fleet\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn admins(s: &serde_json::Value) -> Vec<SocketAddr> {
    s["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["admin"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// Polls until the gateways' capacity slices sum to `total`, each below it; returns them.
fn wait_for_slices(admins: &[SocketAddr], total: f64, timeout: Duration) -> Vec<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let slices: Vec<f64> = admins
            .iter()
            .map(|a| gauge(*a, "inflight_capacity").unwrap_or(-1.0))
            .collect();
        if slices.iter().sum::<f64>() == total && slices.iter().all(|s| *s >= 0.0 && *s < total) {
            return slices;
        }
        assert!(
            Instant::now() < deadline,
            "the gateways' slices {slices:?} do not sum to {total} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_gateways_split_the_limit_and_stop_together() {
    let dir = scratch("fleet");
    let cfg = config(&dir);
    let mut up = Up::start(&dir, &["--config", cfg.to_str().unwrap()]);
    let s = up.wait(Duration::from_secs(120), "2 ready replicas", |s| {
        s["revisions"][0]["ready"].as_u64() == Some(u64::from(REPLICAS))
    });
    let gateways = s["gateways"].as_array().unwrap().clone();
    assert_eq!(gateways.len(), 3, "{s}");
    let balancer = &s["balancer"];
    assert_eq!(
        s["listener"], balancer["listener"],
        "clients go to the L4 Envoy"
    );
    let mut pids: Vec<u64> = s["envoyPids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "three gateways and the L4 Envoy: {s}");
    let admins = admins(&s);

    // The split: cc × ready slots in all, no gateway with all of them.
    let slices = wait_for_slices(&admins, f64::from(CC * REPLICAS), Duration::from_secs(30));
    eprintln!("slices of {} slots: {slices:?}", CC * REPLICAS);
    for a in &admins {
        let seen = gauge(*a, "inflight_fleet_gateways")
            .or_else(|| {
                let (_, body) =
                    inflight_envoy_control::get(*a, "/stats/prometheus", Duration::from_secs(2))
                        .ok()?;
                body.lines()
                    .find_map(|l| l.strip_prefix("inflight_fleet_gateways "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0);
        assert_eq!(seen, 3.0, "{a} sees a fleet of 3");
    }

    // Load through the L4 port: every request answered, no replica above cc.
    let listener = s["listener"].as_str().unwrap().to_string();
    let load = hey(
        &listener,
        "fleet.example.com",
        24,
        6,
        &["x-predictor-delay-ms: 50"],
    );
    // `inflight top` over the three admin endpoints shows the fleet while the load runs.
    let list = admins
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let top = std::process::Command::new(env!("CARGO_BIN_EXE_inflight"))
        .args(["top", "--admin", &list, "--count", "2", "--interval", "0.5"])
        .output()
        .unwrap();
    let top_out = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{top_out}");
    for a in &admins {
        assert!(top_out.contains(&a.to_string()), "{a}: {top_out}");
    }
    assert!(
        top_out.contains("fleet of 3 gateways") && top_out.contains("FORWARDED"),
        "{top_out}"
    );
    let out = load.wait_with_output().unwrap();
    let codes = hey_statuses(&out);
    assert_eq!(
        codes.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        vec![200],
        "every request answered 200: {codes:?}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let s = up.state().unwrap();
    for r in s["revisions"][0]["replicas"].as_array().unwrap() {
        let max = r["maxInFlight"].as_f64().unwrap();
        assert!(max <= f64::from(CC), "hard limit {CC} exceeded: {r}");
        eprintln!("{}: max in flight {max}", r["name"]);
    }
    for p in s["revisions"][0]["pids"].as_array().unwrap() {
        pids.push(p.as_u64().unwrap());
    }

    // One plugin configuration for all: a new limit through gateway 1 reaches every gateway.
    let tune = std::process::Command::new(env!("CARGO_BIN_EXE_inflight"))
        .args([
            "tune",
            "--apply",
            "--limit",
            "2",
            "--revision",
            "fleet",
            "--admin",
        ])
        .arg(admins[1].to_string())
        .output()
        .unwrap();
    assert!(
        tune.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&tune.stdout),
        String::from_utf8_lossy(&tune.stderr)
    );
    let slices = wait_for_slices(&admins, f64::from(2 * REPLICAS), Duration::from_secs(10));
    eprintln!("after tune --apply --limit 2: slices {slices:?}");

    let status = up.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status}\n{}", up.output());
    for p in pids {
        assert!(!alive(p as u32), "pid {p} still running\n{}", up.output());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
