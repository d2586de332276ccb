//! `inflight up --demo` with the real predictor for 10 s: CI-sized through one gateway (20
//! clients against target 4, cc 10), and the seed's load (50 clients, target 10, cc 10) through
//! a fleet of three (`--gateways 3`), which must end at the seed's 5 replicas. Asserts it scaled above one replica, answered nothing
//! but 200s and the gateway's documented sheds (503, counted by the filter as shed_full/shed_timeout; Envoy saw
//! no 5xx from the predictors), never let more than cc requests into one predictor, stopped
//! every process it started, and wrote the plot.

// Test helpers and tests: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod up_common;

use std::time::Duration;
use up_common::*;

/// `inflight up --demo` for 10 s with `load` (clients and target) and `extra` arguments. Checks
/// what holds for every run (only 200s and the gateway's documented sheds, no predictor above
/// cc, no process left, the plot) and returns the summary.
fn demo_with(tag: &str, load: &[&str], extra: &[&str]) -> serde_json::Value {
    let dir = scratch(tag);
    let summary = dir.join("summary.json");
    let plot = dir.join("demo.png");
    let mut args = vec![
        "--demo",
        "--port",
        "0",
        "--duration",
        "10s",
        "--summary-json",
        summary.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ];
    args.extend_from_slice(load);
    args.extend_from_slice(extra);
    let mut up = Up::start(&dir, &args);
    let status = loop {
        if let Some(s) = up.child.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = up.output();
    assert!(status.success(), "demo failed ({status}):\n{out}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();

    assert!(
        s["peakReady"].as_u64().unwrap() > 1,
        "did not scale: {s}\n{out}"
    );
    let statuses = s["statuses"].as_object().unwrap();
    let ok = statuses.get("200").and_then(|v| v.as_u64()).unwrap_or(0);
    let shed = statuses.get("503").and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(ok > 100, "{statuses:?}");
    for (code, n) in statuses {
        assert!(
            code == "200" || code == "503",
            "unexpected {code} × {n}\n{out}"
        );
    }
    let gw = &s["gateway"];
    let gateway_shed = gw["shedFull"].as_f64().unwrap() + gw["shedTimeout"].as_f64().unwrap();
    assert_eq!(
        shed as f64, gateway_shed,
        "every 503 is a documented shed of the gateway: {s}"
    );
    assert_eq!(
        s["upstream5xx"].as_f64(),
        Some(0.0),
        "no 5xx from the predictors"
    );
    assert!(s["clientErrors"].as_array().unwrap().is_empty(), "{s}");
    let cc = s["containerConcurrency"].as_f64().unwrap();
    let max = s["maxInFlight"].as_object().unwrap();
    assert!(!max.is_empty());
    for (name, m) in max {
        assert!(
            m.as_f64().unwrap() <= cc,
            "{name} saw {m} in flight > cc {cc}"
        );
    }
    assert!(
        max.values().any(|m| m.as_f64().unwrap() > 0.0),
        "the predictors' metrics were read"
    );
    for pid in s["pids"].as_array().unwrap() {
        assert!(
            !alive(pid.as_u64().unwrap() as u32),
            "pid {pid} still running"
        );
    }
    let png = std::fs::read(&plot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "plot");
    assert!(
        out.contains("kubectl get pods") && out.contains("Running"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    s
}

/// CI-sized: 20 clients against target 4 (cc 10).
const CI_LOAD: [&str; 4] = ["--clients", "20", "--target", "4"];
/// The seed's load: 50 clients against the demo's target 10 (cc 10): 50 / 10 = 5 replicas.
const SEED_LOAD: [&str; 2] = ["--clients", "50"];

#[test]
fn ci_sized_demo() {
    let s = demo_with("demo", &CI_LOAD, &[]);
    assert_eq!(s["gateways"].as_array().unwrap().len(), 1, "{s}");
}

/// The seed's load (10 s of it) through a fleet of three gateways behind the L4 Envoy: the
/// gateways split each predictor's 10 slots, forward what they have no slot for, and agree on
/// one desired count, so the scaler (following the highest) ends at the same 5 replicas as one
/// gateway does, with no predictor ever above cc 10. (The seed's load, not the CI-sized one:
/// with a queue in the gateways their demand is the 50 clients even on a busy machine, where
/// 20 clients without a queue kept only ~15 in the gateways and the fleet rightly asked for 4.)
#[test]
fn seed_demo_through_a_fleet_of_three_gateways() {
    let s = demo_with("demo-fleet", &SEED_LOAD, &["--gateways", "3"]);
    let gateways = s["gateways"].as_array().unwrap();
    assert_eq!(gateways.len(), 3, "{s}");
    assert_eq!(s["expectedDesired"].as_u64(), Some(5), "{s}");
    assert_eq!(
        s["peakDesired"].as_u64(),
        Some(5),
        "the fleet asked for 5: {s}"
    );
    assert_eq!(
        s["finalReady"].as_u64(),
        Some(5),
        "ended at 5 replicas: {s}"
    );
    // The L4 Envoy spread the clients: every gateway admitted requests itself.
    for g in gateways {
        assert!(g["admitted"].as_f64().unwrap() > 0.0, "{g}");
    }
    eprintln!(
        "fleet demo: peak desired {}, ready at the end {}, max in flight per predictor {}, per gateway {}",
        s["peakDesired"], s["finalReady"], s["maxInFlight"], s["gateways"]
    );
}
