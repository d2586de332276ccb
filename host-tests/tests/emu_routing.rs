//! Property test for endpoint picking, through the real filter.wasm on the emulated host:
//! random arrivals (each carrying a client's own `x-gateway-destination-endpoint`), completions,
//! resets, clock jumps and endpoint churn (the admin poll answered with a random view: each of
//! 4 endpoints absent, healthy, or failing) across 1–4 workers. After every step:
//! - no endpoint holds more than cc requests upstream (counted by the header each request
//!   carried upstream, which is where Envoy's `override_host` sends it);
//! - no request went upstream with the client's header, and once endpoints are known every
//!   request went upstream naming an endpoint that was listed;
//! - no host anomaly, no trap.
//!
//! After draining: every count back to 0. A slot released on the wrong endpoint shows up as a
//! later endpoint above cc (its own count never went down) or as active > 0 at the end.
//!
//! `EMU_PROPTEST_CASES=N` changes the number of cases (default 600).

use inflight_host_tests::emu::{Filter, Host, Req, Response, State};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use std::collections::HashSet;

const HEADER: &str = "x-gateway-destination-endpoint";
const CLIENT_COPY: &str = "10.66.66.66:6666";
const ADDRESSES: [&str; 4] = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"];

#[derive(Clone, Debug)]
enum Op {
    Arrive {
        worker: usize,
    },
    Finish {
        pick: usize,
    },
    Reset {
        pick: usize,
    },
    Advance {
        ms: u64,
    },
    /// Answer the next admin poll: per endpoint 0 absent, 1 healthy, 2 failing.
    View {
        hosts: [u8; 4],
    },
}

#[derive(Clone, Debug)]
struct Case {
    workers: usize,
    cc: u32,
    ops: Vec<Op>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let op = prop_oneof![
        8 => (0usize..4).prop_map(|worker| Op::Arrive { worker }),
        5 => any::<usize>().prop_map(|pick| Op::Finish { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Reset { pick }),
        2 => (1u64..150).prop_map(|ms| Op::Advance { ms }),
        2 => proptest::array::uniform4(prop_oneof![1 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8)])
            .prop_map(|hosts| Op::View { hosts }),
    ];
    (1usize..=4, 1u32..=3, proptest::collection::vec(op, 1..80))
        .prop_map(|(workers, cc, ops)| Case { workers, cc, ops })
}

fn config(cc: u32) -> String {
    json!({
        "revisions": [{"name": "r0", "hosts": ["r0.example.com"], "containerConcurrency": cc,
                       "readyReplicas": 1, "upstreamCluster": "r0", "bufferDepth": 50,
                       "maxWait": "1s"}],
        "membership": {"cluster": "admin", "interval": "100ms"},
        "tick": "10ms", "retryAfter": "1s"
    })
    .to_string()
}

/// The header a request carried upstream, if it went upstream.
fn sent_to(h: &Host, r: Req) -> Option<Option<String>> {
    let headers = h.stream(r).upstream_headers?;
    Some(
        headers
            .iter()
            .find(|(k, _)| k == HEADER)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned()),
    )
}

/// `before_known`: requests that went upstream before the first poll answer (`None` until
/// then): they carry no endpoint; every other one that went upstream must.
/// The requests that went upstream so far.
fn went_upstream(h: &Host) -> HashSet<Req> {
    h.requests()
        .into_iter()
        .filter(|r| sent_to(h, *r).is_some())
        .collect()
}

fn check(
    h: &Host,
    cc: u32,
    listed: &HashSet<String>,
    before_known: Option<&HashSet<Req>>,
    step: &str,
) -> Result<(), TestCaseError> {
    let fail = |msg: String| Err(TestCaseError::fail(format!("after {step}: {msg}")));
    if !h.anomalies().is_empty() {
        return fail(format!("anomalies {:#?}", h.anomalies()));
    }
    if !h.traps().is_empty() {
        return fail(format!("traps {:#?}", h.traps()));
    }
    for a in ADDRESSES {
        let n = h
            .upstream()
            .into_iter()
            .filter(|r| sent_to(h, *r).flatten().as_deref() == Some(a))
            .count();
        if n as u32 > cc {
            return fail(format!("endpoint {a} holds {n} > cc {cc}"));
        }
    }
    for r in h.requests() {
        match sent_to(h, r) {
            Some(Some(v)) if v == CLIENT_COPY => {
                return fail(format!("{r:?} went upstream with the client's header"))
            }
            Some(Some(v)) if !listed.contains(&v) => {
                return fail(format!("{r:?} sent to {v}, never listed"))
            }
            Some(None) if before_known.is_some_and(|b| !b.contains(&r)) => {
                return fail(format!(
                    "{r:?} went upstream without an endpoint after they were known"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

fn answer_polls(h: &mut Host, hosts: &[u8; 4], listed: &mut HashSet<String>) -> bool {
    let mut body = String::from("r0::added_via_api::false\n");
    for (a, k) in ADDRESSES.iter().zip(hosts) {
        match k {
            1 => body.push_str(&format!("r0::{a}::health_flags::healthy\n")),
            2 => body.push_str(&format!("r0::{a}::health_flags::/failed_active_hc\n")),
            _ => continue,
        }
        listed.insert((*a).to_string());
    }
    let mut answered = false;
    for call in h.http_calls().into_iter().filter(|c| !c.answered) {
        let resp = Response {
            body: body.clone().into_bytes(),
            ..Response::status(200)
        };
        h.respond_http_call(call.token, resp);
        answered = true;
    }
    answered
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let mut h = Host::new(Filter::built(), case.workers, &config(case.cc));
    let mut listed = HashSet::new();
    let mut before_known: Option<HashSet<Req>> = None;
    for (n, op) in case.ops.iter().enumerate() {
        match op {
            Op::Arrive { worker } => {
                h.request(worker % case.workers, "r0.example.com")
                    .header(HEADER, CLIENT_COPY)
                    .send();
            }
            Op::Finish { pick } => {
                let up = h.upstream();
                if !up.is_empty() {
                    h.finish(up[pick % up.len()], 200);
                }
            }
            Op::Reset { pick } => {
                let live: Vec<Req> = h
                    .requests()
                    .into_iter()
                    .filter(|r| h.ended(*r).is_none())
                    .collect();
                if !live.is_empty() {
                    h.reset(live[pick % live.len()]);
                }
            }
            Op::Advance { ms } => h.advance(*ms),
            Op::View { hosts } => {
                // A poll goes out at most every 100 ms: let one be due, then answer it.
                h.advance(100);
                let upstream_now = went_upstream(&h);
                if answer_polls(&mut h, hosts, &mut listed) && before_known.is_none() {
                    before_known = Some(upstream_now);
                }
            }
        }
        check(
            &h,
            case.cc,
            &listed,
            before_known.as_ref(),
            &format!("op {n} {op:?}"),
        )?;
    }
    // Drain: every endpoint healthy, finish everything upstream until nobody waits.
    let mut rounds = 0;
    while !h.upstream().is_empty() || !h.paused().is_empty() {
        for r in h.upstream() {
            h.finish(r, 200);
        }
        h.advance(100);
        let upstream_now = went_upstream(&h);
        if answer_polls(&mut h, &[1, 1, 1, 1], &mut listed) && before_known.is_none() {
            before_known = Some(upstream_now);
        }
        check(&h, case.cc, &listed, before_known.as_ref(), "drain")?;
        rounds += 1;
        prop_assert!(rounds < 10_000, "drain does not converge");
    }
    h.advance(100);
    answer_polls(&mut h, &[1, 1, 1, 1], &mut listed);
    prop_assert_eq!(
        h.gauge("inflight.revision.r0.active"),
        0,
        "active back to 0"
    );
    prop_assert_eq!(
        h.gauge("inflight.revision.r0.queued"),
        0,
        "queued back to 0"
    );
    for r in h.requests() {
        prop_assert!(h.ended(r).is_some(), "{:?} never ended", r);
        if matches!(h.state(r), State::Admitted | State::Resumed { .. }) {
            prop_assert!(sent_to(&h, r).is_some());
        }
    }
    Ok(())
}

#[test]
fn endpoint_churn_never_puts_an_endpoint_above_cc() {
    let cases: u32 = std::env::var("EMU_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case_strategy(), |case| run_case(&case));
    let failure = result.err().map(|e| e.to_string());
    assert!(failure.is_none(), "{}", failure.unwrap_or_default());
}
