//! Property test: random arrivals, completions, cancels and clock jumps across 1–8 workers and
//! 1–3 revisions, run through the real filter.wasm. After every step:
//! - in flight upstream ≤ capacity, per revision;
//! - grants in ticket order: no request still waits while a later one of its revision got in;
//! - no waiter older than max wait + one tick;
//! - no host anomaly, no trap.
//!
//! After draining: every count back to 0 and each metric equal to the events that happened
//! (admitted, shed_full, shed_timeout, cancelled, and each queue-wait sample = resume − arrival).
//!
//! Run: `cargo test -p inflight-host-tests --test emu_props -- --nocapture` (prints cases/s).
//! `EMU_PROPTEST_CASES=N` changes the number of cases (default 3000).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use inflight_host_tests::emu::{End, Filter, Host, Req, State};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;

#[derive(Clone, Debug)]
struct Rev {
    cc: u32,
    ready: u32,
    buffer: Option<u32>,
    max_wait_ms: u64,
}

impl Rev {
    fn capacity(&self) -> Option<usize> {
        (self.cc > 0).then_some((self.cc * self.ready) as usize)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Arrive {
        worker: usize,
        rev: usize,
        post: bool,
    },
    Finish {
        pick: usize,
        status: u32,
    },
    Cancel {
        pick: usize,
    },
    Advance {
        ms: u64,
    },
}

#[derive(Clone, Debug)]
struct Case {
    workers: usize,
    tick_ms: u64,
    revs: Vec<Rev>,
    ops: Vec<Op>,
    /// `slotLease` (slots, headroom); `None`: the default.
    lease: Option<(u32, u32)>,
}

fn rev_strategy() -> impl Strategy<Value = Rev> {
    (
        prop_oneof![1 => Just(0u32), 6 => 1u32..=3],
        1u32..=2,
        prop_oneof![4 => (0u32..=4).prop_map(Some), 1 => Just(None)],
        prop_oneof![Just(100u64), Just(250), Just(1000)],
    )
        .prop_map(|(cc, ready, buffer, max_wait_ms)| Rev {
            cc,
            ready,
            buffer,
            max_wait_ms,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..8, 0usize..3, any::<bool>())
            .prop_map(|(worker, rev, post)| Op::Arrive { worker, rev, post }),
        4 => (any::<usize>(), prop_oneof![4 => Just(200u32), 1 => Just(503)])
            .prop_map(|(pick, status)| Op::Finish { pick, status }),
        2 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        3 => prop_oneof![4 => 1u64..60, 1 => 60u64..1500].prop_map(|ms| Op::Advance { ms }),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1usize..=8,
        prop_oneof![Just(10u64), Just(50)],
        proptest::collection::vec(rev_strategy(), 1..=3),
        proptest::collection::vec(op_strategy(), 1..60),
    )
        .prop_map(|(workers, tick_ms, revs, ops)| Case {
            workers,
            tick_ms,
            revs,
            ops,
            lease: None,
        })
}

/// Cases with slot leases small enough to be taken, used and recalled at these small limits.
fn lease_case_strategy() -> impl Strategy<Value = Case> {
    (case_strategy(), 1u32..=3, 0u32..=3).prop_map(|(mut case, slots, headroom)| {
        case.workers = case.workers.clamp(2, 4);
        case.lease = Some((slots, headroom));
        case
    })
}

fn authority(rev: usize) -> String {
    format!("r{rev}.example.com")
}

fn metric(rev: usize, what: &str) -> String {
    match what {
        "active" | "queued" | "capacity" | "queue_wait_ms" => {
            format!("inflight.revision.r{rev}.{what}")
        }
        outcome => format!("inflight.revision.r{rev}.outcome.{outcome}.requests_total"),
    }
}

fn config(case: &Case) -> String {
    let revs: Vec<_> = case
        .revs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut v = json!({
                "name": format!("r{i}"), "hosts": [authority(i)],
                "containerConcurrency": r.cc, "readyReplicas": r.ready,
                "maxWait": format!("{}ms", r.max_wait_ms)
            });
            if let Some(b) = r.buffer {
                v["bufferDepth"] = json!(b);
            }
            v
        })
        .collect();
    let mut config =
        json!({"revisions": revs, "tick": format!("{}ms", case.tick_ms), "retryAfter": "1s"});
    if let Some((slots, headroom)) = case.lease {
        config["slotLease"] = json!({"slots": slots, "headroom": headroom});
    }
    config.to_string()
}

/// What the test knows about each request: its revision and, for paused ones, the order in
/// which they took tickets (arrivals are one at a time, so this is ticket order).
struct Model {
    rev_of: Vec<usize>,
    paused_order: Vec<Vec<Req>>,
    cancelled_while_paused: Vec<u64>,
}

fn check_step(h: &Host, case: &Case, model: &Model, step: &str) -> Result<(), TestCaseError> {
    let fail = |msg: String| {
        Err(TestCaseError::fail(format!(
            "after {step} at {} ms: {msg}",
            h.now_ms()
        )))
    };
    if !h.anomalies().is_empty() {
        return fail(format!("anomalies {:#?}", h.anomalies()));
    }
    if !h.traps().is_empty() {
        return fail(format!("traps {:#?}", h.traps()));
    }
    let upstream = h.upstream();
    for (i, rev) in case.revs.iter().enumerate() {
        let n = upstream.iter().filter(|r| model.rev_of[r.0] == i).count();
        if let Some(cap) = rev.capacity() {
            if n > cap {
                return fail(format!("revision r{i}: {n} upstream > capacity {cap}"));
            }
        }
    }
    // FIFO: a resumed request has no earlier ticket of its revision still waiting.
    for resume in h.resumes() {
        let i = model.rev_of[resume.req.0];
        for earlier in model.paused_order[i]
            .iter()
            .take_while(|r| **r != resume.req)
        {
            let s = h.stream(*earlier);
            if s.state == State::Paused && s.ended.is_none() {
                return fail(format!(
                    "{:?} resumed while earlier ticket {earlier:?} of r{i} still waits",
                    resume.req
                ));
            }
        }
    }
    for r in h.paused() {
        let s = h.stream(r);
        let rev = &case.revs[model.rev_of[r.0]];
        let age = h.now_ms() - s.started_ms;
        if age > rev.max_wait_ms + case.tick_ms {
            return fail(format!(
                "{r:?} waited {age} ms > max wait {} + tick {}",
                rev.max_wait_ms, case.tick_ms
            ));
        }
    }
    Ok(())
}

/// Totals over all cases of one run, printed at the end to show what the cases exercised.
#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    resumed: AtomicU64,
    shed_full: AtomicU64,
    shed_timeout: AtomicU64,
    cancelled: AtomicU64,
}

fn run_case(case: &Case, with_bodies: bool, t: &Totals) -> Result<(), TestCaseError> {
    let mut h = Host::new(Filter::built(), case.workers, &config(case));
    let mut model = Model {
        rev_of: Vec::new(),
        paused_order: vec![Vec::new(); case.revs.len()],
        cancelled_while_paused: vec![0; case.revs.len()],
    };
    for (n, op) in case.ops.iter().enumerate() {
        match *op {
            Op::Arrive { worker, rev, post } => {
                let (worker, rev) = (worker % case.workers, rev % case.revs.len());
                let mut req = h.request(worker, &authority(rev));
                if post && with_bodies {
                    req = req.header(":method", "POST").body(b"{\"instances\":[1]}");
                }
                let r = req.send();
                model.rev_of.push(rev);
                // Paused, or paused and already resumed: a wait can end within the arrival's own
                // turn when other workers' slot leases are recalled and come back at once.
                if matches!(h.state(r), State::Paused | State::Resumed { .. }) {
                    model.paused_order[rev].push(r);
                }
                // Strict FIFO: nobody gets in on arrival while an earlier request of its
                // revision waits (a leased slot included).
                if h.state(r) == State::Admitted {
                    let earlier = model.paused_order[rev].iter().find(|w| {
                        let s = h.stream(**w);
                        s.state == State::Paused && s.ended.is_none()
                    });
                    prop_assert!(
                        earlier.is_none(),
                        "op {n}: {r:?} admitted on arrival while {earlier:?} of r{rev} waits"
                    );
                }
            }
            Op::Finish { pick, status } => {
                let up = h.upstream();
                if !up.is_empty() {
                    h.finish(up[pick % up.len()], status);
                }
            }
            Op::Cancel { pick } => {
                let live: Vec<Req> = h
                    .requests()
                    .into_iter()
                    .filter(|r| h.ended(*r).is_none())
                    .collect();
                if !live.is_empty() {
                    let r = live[pick % live.len()];
                    if h.state(r) == State::Paused {
                        model.cancelled_while_paused[model.rev_of[r.0]] += 1;
                    }
                    h.reset(r);
                }
            }
            Op::Advance { ms } => h.advance(ms),
        }
        check_step(&h, case, &model, &format!("op {n} {op:?}"))?;
    }
    // Drain: finish everything upstream until nobody waits.
    let mut rounds = 0;
    while !h.upstream().is_empty() || !h.paused().is_empty() {
        for r in h.upstream() {
            h.finish(r, 200);
        }
        h.advance(case.tick_ms);
        check_step(&h, case, &model, "drain")?;
        rounds += 1;
        prop_assert!(rounds < 10_000, "drain does not converge");
    }
    // Slots of streams reset before their response are held 20 ms (the filter's
    // ABANDONED_HOLD_MS), then released at the next tick.
    h.advance(2 * case.tick_ms + 20);
    for (i, rev) in case.revs.iter().enumerate() {
        let mine: Vec<Req> = h
            .requests()
            .into_iter()
            .filter(|r| model.rev_of[r.0] == i)
            .collect();
        let count =
            |f: &dyn Fn(&State) -> bool| mine.iter().filter(|r| f(&h.state(**r))).count() as u64;
        let admitted = count(&|s| matches!(s, State::Admitted | State::Resumed { .. }));
        let shed = |reason: &'static str| move |s: &State| matches!(s, State::LocalReply(r) if r.header("x-inflight-shed") == Some(reason));
        let shed_full = count(&shed("buffer-full"));
        let shed_timeout = count(&shed("wait-timeout"));
        prop_assert_eq!(h.gauge(&metric(i, "active")), 0, "r{} active", i);
        prop_assert_eq!(h.gauge(&metric(i, "queued")), 0, "r{} queued", i);
        prop_assert_eq!(
            h.gauge(&metric(i, "capacity")),
            rev.capacity().unwrap_or(0) as i64
        );
        prop_assert_eq!(
            h.counter(&metric(i, "admitted")),
            admitted,
            "r{} admitted",
            i
        );
        prop_assert_eq!(
            h.counter(&metric(i, "shed_full")),
            shed_full,
            "r{} shed_full",
            i
        );
        prop_assert_eq!(
            h.counter(&metric(i, "shed_timeout")),
            shed_timeout,
            "r{} shed_timeout",
            i
        );
        prop_assert_eq!(
            h.counter(&metric(i, "cancelled")),
            model.cancelled_while_paused[i],
            "r{} cancelled",
            i
        );
        // Every request got exactly one outcome.
        prop_assert_eq!(
            admitted + shed_full + shed_timeout + model.cancelled_while_paused[i],
            mine.len() as u64
        );
        let mut expected_waits: Vec<u64> = h
            .resumes()
            .iter()
            .filter(|res| model.rev_of[res.req.0] == i)
            .map(|res| res.at_ms - h.stream(res.req).started_ms)
            .collect();
        let mut waits = h.histogram(&metric(i, "queue_wait_ms"));
        expected_waits.sort_unstable();
        waits.sort_unstable();
        prop_assert_eq!(waits, expected_waits, "r{} queue_wait_ms samples", i);
        t.shed_full.fetch_add(shed_full, Relaxed);
        t.shed_timeout.fetch_add(shed_timeout, Relaxed);
        t.cancelled
            .fetch_add(model.cancelled_while_paused[i], Relaxed);
    }
    t.requests.fetch_add(h.requests().len() as u64, Relaxed);
    t.resumed.fetch_add(h.resumes().len() as u64, Relaxed);
    for r in h.requests() {
        prop_assert!(h.ended(r).is_some(), "{:?} never ended", r);
        if let Some(End::Finished { .. }) = h.ended(r) {
            let went_upstream = matches!(h.state(r), State::Admitted | State::Resumed { .. });
            prop_assert!(went_upstream, "{:?} finished without going upstream", r);
        }
    }
    Ok(())
}

#[test]
fn random_interleavings_keep_the_invariants() {
    let cases: u32 = std::env::var("EMU_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    run("GET", cases, false);
}

/// With slot leases at these small limits (1–3 slots, headroom 0–3, 2–4 workers), so leases
/// are taken, used, given back and recalled: the same invariants, strict FIFO on arrival too.
#[test]
fn random_interleavings_with_slot_leases_keep_the_invariants() {
    run_with("leases", 1500, false, lease_case_strategy());
}

/// The same with half of the arrivals being POSTs with a body (the reference load).
#[test]
fn random_interleavings_with_request_bodies_keep_the_invariants() {
    run("POST", 300, true);
}

fn run(name: &str, cases: u32, with_bodies: bool) {
    run_with(name, cases, with_bodies, case_strategy());
}

fn run_with(name: &str, cases: u32, with_bodies: bool, strategy: impl Strategy<Value = Case>) {
    let filter = Filter::built(); // build and compile outside the timing
    drop(Host::new(
        filter,
        1,
        r#"{"revisions":[{"name":"x","hosts":["x"],"containerConcurrency":1}]}"#,
    ));
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let start = Instant::now();
    let totals = Totals::default();
    let result = runner.run(&strategy, |case| run_case(&case, with_bodies, &totals));
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "emu_props {name}: {cases} cases in {secs:.1} s = {:.0} cases/s",
        f64::from(cases) / secs
    );
    eprintln!(
        "emu_props {name}: {} requests, {} resumed, {} shed buffer-full, {} shed wait-timeout, {} cancelled while waiting",
        totals.requests.load(Relaxed),
        totals.resumed.load(Relaxed),
        totals.shed_full.load(Relaxed),
        totals.shed_timeout.load(Relaxed),
        totals.cancelled.load(Relaxed)
    );
    let failure = result.err().map(|e| e.to_string());
    assert!(failure.is_none(), "{}", failure.unwrap_or_default());
}
