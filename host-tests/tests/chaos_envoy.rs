//! Chaos in real Envoy (`--concurrency 4`): three revisions with different limits, latencies,
//! buffers and wait bounds; ~10 % of clients leave before their answer (while queued or in
//! flight), ~5 % of requests are reset by the upstream and ~5 % answered with a 500, and one
//! replica is killed and restarted on the same port mid-run. Invariants (see
//! [`inflight_host_tests::chaos::Report::check`]): no hard-limit violation at the upstreams,
//! every client that stayed gets a final status, active and queued back to 0, and the filter's
//! counters equal what clients saw.
//!
//! CI-sized here; the long run (≥ 100k requests) is `scripts/chaos-long.sh`
//! (`chaos_long`, ignored by default; `CHAOS_REQUESTS`, `CHAOS_CLIENTS`, `CHAOS_SEED` tune it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::chaos::{self, Plan};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn chaos_ci() {
    let plan = Plan::standard(3_000, 48, chaos::release_wasm());
    let report = chaos::run(&plan).expect("chaos run");
    eprintln!("{report}");
    report.check().unwrap();
    assert_eq!(report.kills, 1);
    assert!(report.left > 0 && report.resets_planned > 0);
    // The run exercised every outcome (not a vacuous pass).
    let seen = |what: &str| -> u64 { report.revisions.iter().map(|r| r.seen(what)).sum() };
    assert!(seen("shed_full") > 0, "{report}");
    assert!(
        seen("gateway_5xx") > 0 && seen("upstream_5xx") > 0,
        "{report}"
    );
    let counted = |what: &str| -> u64 { report.revisions.iter().map(|r| r.counter(what)).sum() };
    assert!(counted("cancelled") > 0, "{report}");
    for r in &report.revisions {
        assert!(
            r.upstream_max >= r.limit,
            "{}: limit reached: {report}",
            r.name
        );
        if r.violations == 0 {
            assert_eq!(r.upstream_max, r.limit, "{report}");
        }
    }
}

#[test]
#[ignore = "long run (minutes): scripts/chaos-long.sh"]
fn chaos_long() {
    let mut plan = Plan::standard(
        env_u64("CHAOS_REQUESTS", 100_000),
        u32::try_from(env_u64("CHAOS_CLIENTS", 64)).unwrap(),
        chaos::release_wasm(),
    );
    plan.seed = env_u64("CHAOS_SEED", plan.seed);
    plan.disconnect_pct = env_u64("CHAOS_DISCONNECT_PCT", plan.disconnect_pct);
    plan.reset_pct = env_u64("CHAOS_RESET_PCT", plan.reset_pct);
    plan.error_pct = env_u64("CHAOS_ERROR_PCT", plan.error_pct);
    plan.kill_at_pct = env_u64("CHAOS_KILL_AT_PCT", plan.kill_at_pct);
    let report = chaos::run(&plan).expect("chaos run");
    eprintln!("{report}");
    report.check().unwrap();
}

/// Clients that leave while their request is in flight (30 %) never let the upstream see more
/// than the limit. Envoy destroys a stream's filters in chain order, so the filter's `on_done`
/// runs before the router resets the upstream request, and the upstream connection closes later
/// still; the filter holds such a slot `ABANDONED_HOLD_MS` (20 ms) before releasing it. Releasing
/// at once gave 7 violations in this run; one event-loop turn later, 0–2 under CPU contention.
#[test]
fn in_flight_disconnects_never_exceed_the_limit() {
    let mut plan = Plan::standard(6_000, 48, chaos::release_wasm());
    plan.disconnect_pct = 30;
    plan.reset_pct = 0;
    plan.error_pct = 0;
    plan.kill_at_pct = 0;
    let report = chaos::run(&plan).expect("chaos run");
    eprintln!("{report}");
    assert_eq!(report.violations, 0, "{report}");
}
