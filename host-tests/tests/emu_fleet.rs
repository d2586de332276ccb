//! Property test for a fleet of gateways, through the real filter.wasm: three emulated Envoys,
//! each with its own shared data (its own store, VMs and clock, kept in step), share one
//! revision's endpoints. The test is the network between them:
//! - admin polls are answered with the current view: the revision's endpoints (each absent,
//!   healthy or failing) and the peer cluster (the gateways that exist; a killed one stays
//!   listed or not, at random, as a static cluster or a Kubernetes Service would);
//! - a report request (`inflight-peer-direct`, header `x-inflight-peer`) is delivered to the
//!   named gateway as a request on its peer port, and its local reply is the answer; a dead
//!   gateway does not answer;
//! - a request a gateway forwards (it went upstream carrying `x-inflight-peer`) arrives at the
//!   named gateway's peer port as a new request; when that copy ends, the original ends with it.
//!
//! Random arrivals on every gateway, completions, clock steps, endpoint churn, gateways killed
//! (their requests die with them) and restarted (empty state, same address). After every step,
//! over all gateways, no endpoint holds more than cc requests upstream (counted by the endpoint
//! header each request carried upstream). At the end, with a steady view, every request that
//! is still open is answered within its maximum wait.
//!
//! `EMU_PROPTEST_CASES=N` changes the number of cases (default 80).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::emu::{Filter, Host, Req, Response};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use std::collections::HashMap;

const ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";
const PEER_HEADER: &str = "x-inflight-peer";
const ENDPOINTS: [&str; 3] = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
const GATEWAYS: usize = 3;
const PEER_PORT: u16 = 15081;
const PUBLIC_PORT: u16 = 8080;
const REPORT_PATH: &str = "/.inflight/v1/fleet";
const SELF_PROPERTY: &str = "xds.node.metadata.INFLIGHT_FLEET_SELF";

fn peer_address(g: usize) -> String {
    format!("10.1.0.{}:{PEER_PORT}", g + 1)
}

#[derive(Clone, Debug)]
enum Op {
    Arrive {
        gateway: usize,
        worker: usize,
    },
    Finish {
        pick: usize,
    },
    Advance {
        ms: u64,
    },
    /// The endpoints' view: per endpoint 0 absent, 1 healthy, 2 failing.
    View {
        hosts: [u8; 3],
    },
    /// Kill a gateway; `unlist`: the peer cluster stops listing it.
    Kill {
        gateway: usize,
        unlist: bool,
    },
    Restart {
        gateway: usize,
    },
}

#[derive(Clone, Debug)]
struct Case {
    cc: u32,
    workers: usize,
    ops: Vec<Op>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let op = prop_oneof![
        10 => (0..GATEWAYS, 0usize..2).prop_map(|(gateway, worker)| Op::Arrive { gateway, worker }),
        6 => any::<usize>().prop_map(|pick| Op::Finish { pick }),
        4 => (20u64..400).prop_map(|ms| Op::Advance { ms }),
        1 => proptest::array::uniform3(prop_oneof![1 => Just(0u8), 4 => Just(1u8), 1 => Just(2u8)])
            .prop_map(|hosts| Op::View { hosts }),
        1 => (1..GATEWAYS, any::<bool>()).prop_map(|(gateway, unlist)| Op::Kill { gateway, unlist }),
        1 => (0..GATEWAYS).prop_map(|gateway| Op::Restart { gateway }),
    ];
    (1u32..=4, 1usize..=2, proptest::collection::vec(op, 1..70))
        .prop_map(|(cc, workers, ops)| Case { cc, workers, ops })
}

fn config(cc: u32) -> String {
    json!({
        "revisions": [{"name": "r0", "hosts": ["r0.example.com"], "containerConcurrency": cc,
                       "upstreamCluster": "r0", "bufferDepth": 100, "maxWait": "5s"}],
        "membership": {"cluster": "admin", "interval": "100ms", "timeout": "100ms"},
        "fleet": {"peerCluster": "peers"},
        "tick": "10ms", "retryAfter": "1s"
    })
    .to_string()
}

/// One gateway: its emulated Envoy (none while dead) and the copies of forwarded requests it
/// holds (its request → the original on the forwarding gateway).
struct Gateway {
    host: Option<Host>,
    listed: bool,
    /// Forwarded copies here: copy → (origin gateway, origin request).
    copies: HashMap<Req, (usize, Req)>,
    /// Origins here already delivered to a peer.
    sent: HashMap<Req, (usize, Req)>,
}

struct Fleet {
    cc: u32,
    workers: usize,
    gateways: Vec<Gateway>,
    endpoints: [u8; 3],
    now_ms: u64,
}

fn start(cc: u32, workers: usize, g: usize) -> Host {
    Host::builder(Filter::built())
        .workers(workers)
        .plugin_config(config(cc))
        .property(SELF_PROPERTY, peer_address(g))
        .build()
        .unwrap_or_else(|e| panic!("gateway {g}: {e}"))
}

fn header(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// Whether request `r` went upstream to a peer gateway (not to an endpoint).
fn forwarded(h: &Host, r: Req) -> bool {
    h.stream(r)
        .upstream_headers
        .is_some_and(|hs| header(&hs, PEER_HEADER).is_some())
}

fn port(p: u16) -> [u8; 8] {
    u64::from(p).to_le_bytes()
}

impl Fleet {
    fn new(cc: u32, workers: usize) -> Fleet {
        Fleet {
            cc,
            workers,
            gateways: (0..GATEWAYS)
                .map(|g| Gateway {
                    host: Some(start(cc, workers, g)),
                    listed: true,
                    copies: HashMap::new(),
                    sent: HashMap::new(),
                })
                .collect(),
            endpoints: [1, 1, 0],
            now_ms: 0,
        }
    }

    fn admin_body(&self) -> String {
        let mut body = String::from("r0::added_via_api::false\n");
        for (a, k) in ENDPOINTS.iter().zip(self.endpoints) {
            match k {
                1 => body.push_str(&format!("r0::{a}::health_flags::healthy\n")),
                2 => body.push_str(&format!("r0::{a}::health_flags::/failed_active_hc\n")),
                _ => {}
            }
        }
        body.push_str("peers::added_via_api::false\n");
        for (g, gw) in self.gateways.iter().enumerate() {
            if gw.listed {
                body.push_str(&format!(
                    "peers::{}::health_flags::healthy\n",
                    peer_address(g)
                ));
            }
        }
        body
    }

    fn gateway_of(addr: &str) -> Option<usize> {
        (0..GATEWAYS).find(|g| peer_address(*g) == addr)
    }

    /// Answers every open call and delivers every forwarded request, until nothing moves.
    fn pump(&mut self) {
        for _ in 0..20 {
            let mut moved = false;
            for g in 0..GATEWAYS {
                moved |= self.pump_calls(g);
                moved |= self.pump_forwards(g);
            }
            if !moved {
                break;
            }
        }
    }

    fn pump_calls(&mut self, g: usize) -> bool {
        let Some(h) = self.gateways[g].host.as_ref() else {
            return false;
        };
        let calls: Vec<_> = h.http_calls().into_iter().filter(|c| !c.answered).collect();
        let mut moved = false;
        for call in calls {
            moved = true;
            let path = header(&call.headers, ":path").unwrap_or_default();
            let resp = if call.upstream == "admin" && path.starts_with("/clusters") {
                Response {
                    body: self.admin_body().into_bytes(),
                    ..Response::status(200)
                }
            } else if call.upstream == "admin" {
                Response {
                    body: b"LIVE".to_vec(),
                    ..Response::status(200)
                }
            } else {
                let to = header(&call.headers, PEER_HEADER)
                    .as_deref()
                    .and_then(Fleet::gateway_of);
                match to.and_then(|t| self.report_of(t)) {
                    Some(body) => Response {
                        body: body.into_bytes(),
                        ..Response::status(200)
                    },
                    None => Response::status(503),
                }
            };
            if let Some(h) = self.gateways[g].host.as_mut() {
                h.respond_http_call(call.token, resp);
            }
        }
        moved
    }

    /// Gateway `t`'s answer to a report request on its peer port.
    fn report_of(&mut self, t: usize) -> Option<String> {
        let h = self.gateways[t].host.as_mut()?;
        let r = h
            .request(0, "inflight-fleet")
            .header(":path", REPORT_PATH)
            .header(PEER_HEADER, &peer_address(t))
            .property_bytes("destination.port", &port(PEER_PORT))
            .send();
        let reply = h.reply(r);
        (reply.status == 200).then_some(reply.body)
    }

    fn pump_forwards(&mut self, g: usize) -> bool {
        let Some(h) = self.gateways[g].host.as_ref() else {
            return false;
        };
        let mut out = Vec::new();
        for r in h.upstream() {
            if self.gateways[g].sent.contains_key(&r) {
                continue;
            }
            let Some(headers) = h.stream(r).upstream_headers else {
                continue;
            };
            if let Some(peer) = header(&headers, PEER_HEADER) {
                out.push((r, peer));
            }
        }
        let moved = !out.is_empty();
        for (r, peer) in out {
            let to = Fleet::gateway_of(&peer);
            let workers = self.workers;
            let delivered = to.and_then(|t| {
                let h = self.gateways[t].host.as_mut()?;
                let copy = h
                    .request(r.0 % workers, "r0.example.com")
                    .header(PEER_HEADER, &peer)
                    .property_bytes("destination.port", &port(PEER_PORT))
                    .send();
                Some((t, copy))
            });
            match delivered {
                Some((t, copy)) => {
                    self.gateways[t].copies.insert(copy, (g, r));
                    self.gateways[g].sent.insert(r, (t, copy));
                }
                None => {
                    // The peer is gone: the connection fails.
                    if let Some(h) = self.gateways[g].host.as_mut() {
                        h.finish(r, 503);
                    }
                    self.gateways[g].sent.insert(r, (usize::MAX, r));
                }
            }
        }
        moved
    }

    /// Ends forwarded originals whose copy ended (any way).
    fn settle_copies(&mut self) {
        let mut ended = Vec::new();
        for t in 0..GATEWAYS {
            let Some(h) = self.gateways[t].host.as_ref() else {
                continue;
            };
            for (copy, origin) in &self.gateways[t].copies {
                if h.ended(*copy).is_some() {
                    ended.push((t, *copy, *origin));
                }
            }
        }
        for (t, copy, (g, r)) in ended {
            self.gateways[t].copies.remove(&copy);
            if let Some(h) = self.gateways[g].host.as_mut() {
                if h.ended(r).is_none() {
                    h.finish(r, 200);
                }
            }
        }
    }

    /// Requests upstream at the endpoints, per endpoint, over all gateways.
    fn at_endpoints(&self) -> Vec<usize> {
        let mut n = vec![0; ENDPOINTS.len()];
        for gw in &self.gateways {
            let Some(h) = gw.host.as_ref() else { continue };
            for r in h.upstream() {
                let Some(headers) = h.stream(r).upstream_headers else {
                    continue;
                };
                if header(&headers, PEER_HEADER).is_some() {
                    continue;
                }
                if let Some(e) = header(&headers, ENDPOINT_HEADER) {
                    if let Some(k) = ENDPOINTS.iter().position(|a| *a == e) {
                        n[k] += 1;
                    }
                }
            }
        }
        n
    }

    fn advance(&mut self, ms: u64) {
        // In small steps, so the gateways' clocks stay within a tick of each other.
        let mut left = ms;
        while left > 0 {
            let step = left.min(10);
            for gw in &mut self.gateways {
                if let Some(h) = gw.host.as_mut() {
                    h.advance(step);
                }
            }
            self.now_ms += step;
            left -= step;
            self.pump();
            self.settle_copies();
        }
    }

    fn check(&self, step: &str) -> Result<(), TestCaseError> {
        for (g, gw) in self.gateways.iter().enumerate() {
            let Some(h) = gw.host.as_ref() else { continue };
            if !h.anomalies().is_empty() {
                return Err(TestCaseError::fail(format!(
                    "after {step}: gateway {g} anomalies {:#?}",
                    h.anomalies()
                )));
            }
            if !h.traps().is_empty() {
                return Err(TestCaseError::fail(format!(
                    "after {step}: gateway {g} traps {:#?}",
                    h.traps()
                )));
            }
        }
        let at = self.at_endpoints();
        for (k, n) in at.iter().enumerate() {
            if *n as u32 > self.cc {
                return Err(TestCaseError::fail(format!(
                    "after {step} (t={} ms): endpoint {} holds {n} > cc {} over the fleet {at:?}",
                    self.now_ms, ENDPOINTS[k], self.cc
                )));
            }
        }
        Ok(())
    }
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let mut f = Fleet::new(case.cc, case.workers);
    f.advance(50);
    for (n, op) in case.ops.iter().enumerate() {
        match op {
            Op::Arrive { gateway, worker } => {
                let w = worker % case.workers;
                if let Some(h) = f.gateways[*gateway].host.as_mut() {
                    h.request(w, "r0.example.com")
                        .property_bytes("destination.port", &port(PUBLIC_PORT))
                        .send();
                }
                f.pump();
            }
            Op::Finish { pick } => {
                // Among requests at the endpoints (not those on their way to a peer).
                let mut at: Vec<(usize, Req)> = Vec::new();
                for (g, gw) in f.gateways.iter().enumerate() {
                    let Some(h) = gw.host.as_ref() else { continue };
                    for r in h.upstream() {
                        let forwarded = h
                            .stream(r)
                            .upstream_headers
                            .is_some_and(|hs| header(&hs, PEER_HEADER).is_some());
                        if !forwarded {
                            at.push((g, r));
                        }
                    }
                }
                if !at.is_empty() {
                    let (g, r) = at[pick % at.len()];
                    if let Some(h) = f.gateways[g].host.as_mut() {
                        h.finish(r, 200);
                    }
                    f.settle_copies();
                    f.pump();
                }
            }
            Op::Advance { ms } => f.advance(*ms),
            Op::View { hosts } => {
                f.endpoints = *hosts;
                f.advance(110);
            }
            Op::Kill { gateway, unlist } => {
                let g = *gateway;
                if f.gateways[g].host.take().is_some() {
                    f.gateways[g].listed = !unlist;
                    // Requests forwarded to it fail at their origin.
                    let copies: Vec<(usize, Req)> =
                        f.gateways[g].copies.drain().map(|(_, o)| o).collect();
                    f.gateways[g].sent.clear();
                    // Its requests forwarded elsewhere lose their downstream: reset there.
                    for t in 0..GATEWAYS {
                        let gone: Vec<Req> = f.gateways[t]
                            .copies
                            .iter()
                            .filter(|(_, (o, _))| *o == g)
                            .map(|(c, _)| *c)
                            .collect();
                        for c in gone {
                            f.gateways[t].copies.remove(&c);
                            if let Some(h) = f.gateways[t].host.as_mut() {
                                if h.ended(c).is_none() {
                                    h.reset(c);
                                }
                            }
                        }
                    }
                    for (o, r) in copies {
                        if let Some(h) = f.gateways[o].host.as_mut() {
                            if h.ended(r).is_none() {
                                h.finish(r, 503);
                            }
                        }
                    }
                }
            }
            Op::Restart { gateway } => {
                let g = *gateway;
                if f.gateways[g].host.is_none() {
                    let mut h = start(case.cc, case.workers, g);
                    h.advance(f.now_ms);
                    f.gateways[g].host = Some(h);
                    f.gateways[g].listed = true;
                }
            }
        }
        f.check(&format!("op {n} {op:?}"))?;
    }
    // A steady view with a ready endpoint: whatever is open ends within the maximum wait.
    f.endpoints = [1, 1, 1];
    for g in 0..GATEWAYS {
        if f.gateways[g].host.is_none() {
            let mut h = start(case.cc, case.workers, g);
            h.advance(f.now_ms);
            f.gateways[g].host = Some(h);
            f.gateways[g].listed = true;
        }
    }
    for _ in 0..80 {
        f.advance(100);
        let done: Vec<(usize, Req)> = f
            .gateways
            .iter()
            .enumerate()
            .flat_map(|(g, gw)| {
                gw.host.as_ref().map_or(Vec::new(), |h| {
                    h.upstream()
                        .into_iter()
                        .filter(|r| !forwarded(h, *r))
                        .map(|r| (g, r))
                        .collect()
                })
            })
            .collect();
        for (g, r) in done {
            if let Some(h) = f.gateways[g].host.as_mut() {
                h.finish(r, 200);
            }
        }
        f.settle_copies();
        f.check("drain")?;
    }
    for (g, gw) in f.gateways.iter().enumerate() {
        let Some(h) = gw.host.as_ref() else { continue };
        for r in h.requests() {
            if h.ended(r).is_none() {
                return Err(TestCaseError::fail(format!(
                    "gateway {g}: {r:?} still open 8 s after the view settled: {:?}",
                    h.state(r)
                )));
            }
        }
    }
    Ok(())
}

#[test]
fn the_fleet_never_exceeds_cc_on_an_endpoint_and_answers_everyone() {
    let cases = std::env::var("EMU_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(80);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case_strategy(), |case| run_case(&case));
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// One gateway owns the only slot (cc 1, one endpoint, three gateways): requests on the other
/// two are forwarded to it and served in turn; none is shed, and the endpoint never holds 2.
#[test]
fn with_one_slot_in_the_fleet_every_gateway_is_served_through_the_owner() {
    one_slot_for_three_gateways(1_500);
}

/// The same, with the requests arriving before the fleet settled (no gateway owns a slot
/// yet): they wait where they arrived and move to the owner once its reports show the slot.
#[test]
fn requests_that_queued_before_the_fleet_settled_move_to_the_owner() {
    one_slot_for_three_gateways(50);
}

fn one_slot_for_three_gateways(warm_ms: u64) {
    let mut f = Fleet::new(1, 1);
    f.endpoints = [1, 0, 0];
    f.advance(warm_ms);
    let mut sent = Vec::new();
    for i in 0..9 {
        let g = i % GATEWAYS;
        let h = f.gateways[g].host.as_mut().expect("alive");
        let r = h
            .request(0, "r0.example.com")
            .property_bytes("destination.port", &port(PUBLIC_PORT))
            .send();
        sent.push((g, r));
        f.pump();
    }
    let mut served = 0;
    for _ in 0..200 {
        f.check("serving").unwrap_or_else(|e| panic!("{e}"));
        let at: Vec<(usize, Req)> = f
            .gateways
            .iter()
            .enumerate()
            .flat_map(|(g, gw)| {
                let h = gw.host.as_ref().expect("alive");
                h.upstream()
                    .into_iter()
                    .filter(|r| !forwarded(h, *r))
                    .map(|r| (g, r))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (g, r) in at {
            f.gateways[g].host.as_mut().expect("alive").finish(r, 200);
            served += 1;
        }
        f.settle_copies();
        f.advance(20);
        if sent.iter().all(|(g, r)| {
            f.gateways[*g]
                .host
                .as_ref()
                .is_some_and(|h| h.ended(*r).is_some())
        }) {
            break;
        }
    }
    for (g, r) in &sent {
        let h = f.gateways[*g].host.as_ref().expect("alive");
        assert!(
            matches!(
                h.ended(*r),
                Some(inflight_host_tests::emu::End::Finished { status: 200, .. })
            ),
            "gateway {g} {r:?}: {:?}",
            h.state(*r)
        );
    }
    assert_eq!(served, 9, "each request reached the endpoint once");
}
