//! The worker's decisions, natively, on a fake host with Envoy's shared-data semantics: several
//! workers share one world; wake queues are drained by the test, so every interleaving is
//! chosen here.

use super::*;
use crate::admission::Lease;
use crate::store::fake::{FakeHost, World};
use proptest::prelude::*;
use serde_json::json;
use std::cell::RefCell;

/// The facts of one request.
#[derive(Default, Clone)]
struct Req {
    authority: Option<String>,
    cluster: Option<String>,
    headers: Vec<(String, String)>,
}

fn host(h: &str) -> Req {
    Req {
        authority: Some(h.into()),
        ..Req::default()
    }
}

impl Req {
    fn via(mut self, cluster: &str) -> Req {
        self.cluster = Some(cluster.into());
        self
    }
}

impl RequestFacts for Req {
    fn authority(&self) -> Option<String> {
        self.authority.clone()
    }
    fn cluster(&self) -> Option<String> {
        self.cluster.clone()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
}

/// Workers on one fake Envoy.
struct Gateway {
    world: Rc<RefCell<World>>,
    workers: Vec<Worker<FakeHost>>,
    effects: Vec<Vec<Effect>>,
}

fn gateway(workers: usize, config: serde_json::Value) -> Gateway {
    let world = Rc::new(RefCell::new(World::default()));
    let bytes = config.to_string();
    let workers: Vec<_> = (0..workers)
        .map(|_| {
            let mut w = Worker::start(FakeHost {
                world: Rc::clone(&world),
            })
            .unwrap();
            w.configure(bytes.as_bytes(), 0).unwrap();
            w
        })
        .collect();
    let effects = vec![Vec::new(); workers.len()];
    Gateway {
        world,
        workers,
        effects,
    }
}

/// One revision `rev-a` for `a.test`, `cc` slots (1 replica), `buffer` waiters, 1 s max wait,
/// 100 ms ticks.
fn one_revision(cc: u32, buffer: u32) -> serde_json::Value {
    json!({
        "revisions": [{
            "name": "rev-a", "hosts": ["a.test"], "containerConcurrency": cc,
            "readyReplicas": 1, "bufferDepth": buffer, "maxWait": "1s"
        }],
        "tick": "100ms", "retryAfter": "1s"
    })
}

impl Gateway {
    fn request(&mut self, w: usize, context: u32, req: &Req, now: u64) -> Verdict {
        let v = self.workers[w].on_request(context, req, now);
        self.collect(w);
        v
    }

    fn collect(&mut self, w: usize) {
        self.workers[w].take_effects(&mut self.effects[w]);
    }

    /// Delivers every message waiting on worker `w`'s wake queue.
    fn wake(&mut self, w: usize, now: u64) {
        let token = self.token(w);
        loop {
            let msg = self
                .world
                .borrow_mut()
                .queues
                .get_mut(&token)
                .and_then(|q| q.pop_front());
            let Some(msg) = msg else { break };
            self.workers[w].on_wake(&msg, now);
        }
        self.collect(w);
    }

    fn token(&self, w: usize) -> u32 {
        let key = store::wake_token_key(self.workers[w].id());
        let bytes = self.world.borrow().shared.get(&key).unwrap().0.clone();
        u32::from_le_bytes(bytes.try_into().unwrap())
    }

    fn state(&self) -> RevisionState {
        let bytes = self.world.borrow().shared[&store::revision_key("rev-a")]
            .0
            .clone();
        RevisionState::decode(&bytes).unwrap()
    }

    fn resumed(&mut self, w: usize) -> Vec<u32> {
        let mut out = Vec::new();
        self.effects[w].retain(|e| match e {
            Effect::Resume { context } => {
                out.push(*context);
                false
            }
            _ => true,
        });
        out
    }

    fn replies(&mut self, w: usize) -> Vec<(u32, Outcome)> {
        let mut out = Vec::new();
        self.effects[w].retain(|e| match e {
            Effect::Reply { context, reply } => {
                out.push((*context, reply.outcome));
                false
            }
            _ => true,
        });
        out
    }

    fn count(&self, w: usize, outcome: Outcome) -> usize {
        self.effects[w]
            .iter()
            .filter(|e| matches!(e, Effect::Count { outcome: o, .. } if *o == outcome))
            .count()
    }
}

#[test]
fn the_limit_is_exact_and_a_freed_slot_resumes_the_oldest_waiter_on_its_own_worker() {
    let mut g = gateway(2, one_revision(1, 5));
    let a = host("a.test");
    assert_eq!(g.request(0, 1, &a, 0), Verdict::Continue);
    assert_eq!(g.request(1, 2, &a, 1), Verdict::Pause);
    assert_eq!(g.request(0, 3, &a, 2), Verdict::Pause);
    assert!(g.workers[1].is_waiting(2));
    assert_eq!(g.state().active, 1);
    assert_eq!(g.state().queued(), 2);
    // The holder's response completes: its slot goes to ticket 0, held by worker 1's stream 2.
    g.workers[0].on_done(1, true, 10);
    g.collect(0);
    assert_eq!(g.resumed(0), Vec::<u32>::new());
    g.wake(1, 11);
    assert_eq!(g.resumed(1), vec![2]);
    assert!(!g.workers[1].is_waiting(2));
    assert!(g.effects[1].contains(&Effect::QueueWait {
        rev: RevisionId(0),
        ms: 10
    }));
    assert_eq!(g.state().active, 1);
    assert_eq!(g.state().queued(), 1);
}

#[test]
fn a_full_buffer_sheds_with_the_outcome_and_the_limits_in_words() {
    let mut g = gateway(1, one_revision(1, 1));
    let a = host("a.test");
    g.request(0, 1, &a, 0);
    g.request(0, 2, &a, 0);
    let Verdict::Reply(r) = g.request(0, 3, &a, 0) else {
        panic!("shed expected");
    };
    assert_eq!((r.status(), r.outcome), (503, Outcome::ShedFull));
    assert_eq!(r.outcome.shed_header(), Some("buffer-full"));
    assert_eq!(r.retry_after_s, Some(1));
    assert!(
        r.body
            .contains("rev-a is at capacity (1) and its buffer (1)"),
        "{}",
        r.body
    );
    assert_eq!(g.count(0, Outcome::ShedFull), 1);
}

#[test]
fn a_grant_whose_owner_vm_is_gone_is_handed_to_the_next_ticket() {
    let mut g = gateway(3, one_revision(1, 5));
    let a = host("a.test");
    g.request(0, 1, &a, 0);
    g.request(1, 2, &a, 0); // ticket 0, on worker 1, which will be gone
    g.request(2, 3, &a, 0); // ticket 1, on worker 2
    let gone = g.token(1);
    g.world.borrow_mut().unreachable.push(gone);
    g.workers[0].on_done(1, true, 5);
    g.wake(2, 6);
    assert_eq!(g.resumed(2), vec![3], "ticket 1 got the slot");
    let s = g.state();
    assert_eq!((s.active, s.queued()), (1, 0));
    let holders: Vec<_> = s.holders().collect();
    assert_eq!(
        holders,
        vec![(g.workers[2].id(), 1)],
        "counted as worker 2's"
    );
}

#[test]
fn a_grant_for_a_stream_that_ended_is_passed_on() {
    let mut g = gateway(2, one_revision(1, 5));
    let a = host("a.test");
    g.request(0, 1, &a, 0);
    g.request(1, 2, &a, 0);
    g.request(1, 3, &a, 0);
    // Worker 0 frees the slot; the grant to stream 2 is on its way when stream 2 ends.
    g.workers[0].on_done(1, true, 5);
    g.workers[1].on_done(2, true, 6);
    g.collect(1);
    assert_eq!(g.count(1, Outcome::Cancelled), 1);
    // The grant finds no stream 2 and is passed on, to stream 3 on this same worker.
    g.wake(1, 7);
    assert_eq!(g.resumed(1), vec![3]);
    assert_eq!(g.count(1, Outcome::Admitted), 1);
    // Resuming can still fail (the stream ended, its end not yet seen): the slot frees.
    g.workers[1].on_resume_failed(3, 9);
    assert_eq!(g.state().active, 0);
}

#[test]
fn an_abandoned_slot_is_released_after_the_hold_not_before() {
    let mut g = gateway(1, one_revision(1, 5));
    let a = host("a.test");
    g.request(0, 1, &a, 0);
    g.request(0, 2, &a, 0);
    // The client left before the response: the slot stays held.
    g.workers[0].on_done(1, false, 100);
    g.workers[0].on_tick(100 + ABANDONED_HOLD_MS - 1);
    g.wake(0, 100 + ABANDONED_HOLD_MS - 1);
    assert_eq!(g.state().active, 1);
    assert_eq!(g.resumed(0), Vec::<u32>::new());
    // The first request, stream end or tick after the hold releases it.
    g.request(0, 3, &a, 100 + ABANDONED_HOLD_MS);
    g.wake(0, 100 + ABANDONED_HOLD_MS);
    assert_eq!(g.resumed(0), vec![2]);
}

#[test]
fn waiters_are_shed_at_their_maximum_wait_and_a_lost_grant_one_tick_later() {
    let mut g = gateway(2, one_revision(1, 5));
    let a = host("a.test");
    g.request(0, 1, &a, 0);
    g.request(1, 2, &a, 0);
    g.request(1, 3, &a, 500);
    g.workers[1].on_tick(999);
    g.collect(1);
    assert_eq!(g.replies(1), Vec::<(u32, Outcome)>::new());
    g.workers[1].on_tick(1_000);
    g.collect(1);
    assert_eq!(g.replies(1), vec![(2, Outcome::ShedTimeout)]);
    assert_eq!(g.count(1, Outcome::ShedTimeout), 1);
    // Stream 3's grant is sent but never arrives (its wake is lost): it is not shed at its max
    // wait (a grant may be on its way) but one tick after.
    g.workers[0].on_done(1, true, 1_200);
    g.world
        .borrow_mut()
        .queues
        .values_mut()
        .for_each(|q| q.clear());
    g.workers[1].on_tick(1_500);
    g.collect(1);
    assert_eq!(
        g.replies(1),
        Vec::<(u32, Outcome)>::new(),
        "at max wait: the grant may still arrive"
    );
    g.workers[1].on_tick(1_600);
    g.collect(1);
    assert_eq!(g.replies(1), vec![(3, Outcome::ShedTimeout)]);
}

#[test]
fn a_dead_vms_slots_and_waiters_are_given_back_after_it_stops_beating() {
    let mut config = one_revision(1, 5);
    config["revisions"][0]["maxWait"] = json!("60s");
    let mut g = gateway(2, config);
    let a = host("a.test");
    g.request(1, 1, &a, 0); // worker 1 holds the slot...
    g.request(1, 2, &a, 0); // ...and a waiter, then dies
    g.request(0, 3, &a, 0);
    g.workers[0].on_tick(100); // sees worker 1 holding
    let dead = dead_after_ms(100);
    g.workers[0].on_tick(dead);
    assert_eq!(g.state().active, 1, "not dead yet (it beat at 0)");
    g.workers[0].on_tick(dead + 1);
    g.wake(0, dead + 1);
    assert_eq!(
        g.resumed(0),
        vec![3],
        "worker 0's waiter got the reclaimed slot"
    );
    let s = g.state();
    assert_eq!((s.active, s.queued()), (1, 0));
}

#[test]
fn an_orphaned_waiter_is_reaped_long_after_its_maximum_wait() {
    let mut g = gateway(2, one_revision(1, 5));
    let a = host("a.test");
    g.request(0, 1, &a, 0);
    g.request(1, 2, &a, 0);
    // Worker 1 keeps beating (a reload keeps a VM alive) but never expires its waiter.
    let age = orphan_age_ms(1_000, 100);
    g.workers[0].on_tick(age);
    assert_eq!(g.state().queued(), 1);
    g.workers[0].on_tick(age + 1);
    assert_eq!(g.state().queued(), 0);
}

#[test]
fn membership_sets_ready_replicas_and_grants_what_now_fits() {
    let mut g = gateway(
        1,
        json!({
            "revisions": [{"name": "rev-a", "hosts": ["a.test"], "containerConcurrency": 1,
                           "readyReplicas": 1, "upstreamCluster": "rev-a", "maxWait": "5s"}],
            "membership": {"cluster": "admin", "interval": "1s"},
            "tick": "100ms"
        }),
    );
    let a = host("a.test");
    // Before the first poll no endpoint is known to be ready: both wait (a request must name
    // its endpoint, and there is none to name yet).
    assert_eq!(g.request(0, 1, &a, 0), Verdict::Pause);
    assert_eq!(g.request(0, 2, &a, 0), Verdict::Pause);
    g.workers[0].on_tick(100);
    g.collect(0);
    let polls: Vec<_> = g.effects[0]
        .iter()
        .filter(|e| matches!(e, Effect::Poll(p) if p.cluster == "admin"))
        .collect();
    assert_eq!(polls.len(), 2, "endpoints and /ready");
    assert!(
        matches!(polls[0], Effect::Poll(p) if p.kind == PollKind::Endpoints && p.path == "/clusters?filter=%5E%28rev%5C-a%29%24"),
        "{polls:?}"
    );
    assert!(
        matches!(polls[1], Effect::Poll(p) if p.kind == PollKind::Ready && p.path == "/ready"),
        "{polls:?}"
    );
    g.workers[0].on_poll_dispatched(PollKind::Endpoints, Ok(7));
    g.workers[0].on_poll_dispatched(PollKind::Ready, Ok(6));
    g.workers[0].on_poll_answer(6, "200", Ok(b"LIVE\n".to_vec()), 150);
    // Another tick in the interval does not poll again.
    g.effects[0].clear();
    g.workers[0].on_tick(200);
    g.collect(0);
    assert!(!g.effects[0].iter().any(|e| matches!(e, Effect::Poll(_))));
    assert!(!g.workers[0].awaits_poll(8));
    let body = b"rev-a::added_via_api::false\nrev-a::10.0.0.1:80::health_flags::healthy\nrev-a::10.0.0.2:80::health_flags::healthy\nrev-a::10.0.0.3:80::health_flags::/failed_active_hc\n";
    g.workers[0].on_poll_answer(7, "200", Ok(body.to_vec()), 250);
    assert_eq!(g.state().ready(), Some(2));
    g.wake(0, 251);
    assert_eq!(g.resumed(0), vec![1, 2], "2 ready endpoints: both go");
    // A failed answer keeps the count and is counted.
    g.workers[0].on_tick(1_300);
    g.workers[0].on_poll_dispatched(PollKind::Endpoints, Ok(9));
    g.workers[0].on_poll_dispatched(PollKind::Ready, Ok(10));
    g.workers[0].on_poll_answer(10, "200", Ok(b"LIVE\n".to_vec()), 1_305);
    g.effects[0].clear();
    g.workers[0].on_poll_answer(9, "503", Ok(Vec::new()), 1_310);
    g.collect(0);
    assert!(g.effects[0].contains(&Effect::PollFailed));
    assert_eq!(g.state().ready(), Some(2));
}

#[test]
fn a_host_failure_sheds_with_state_unavailable_and_counts_it() {
    let mut g = gateway(1, one_revision(1, 5));
    g.world
        .borrow_mut()
        .failing_sets
        .insert(store::revision_key("rev-a"), store::HostError::Other(2));
    let Verdict::Reply(r) = g.request(0, 1, &host("a.test"), 0) else {
        panic!("reply expected");
    };
    assert_eq!(r.outcome, Outcome::StateUnavailable);
    assert_eq!(r.outcome.shed_header(), Some("state-unavailable"));
    assert_eq!(g.count(0, Outcome::StateUnavailable), 1);
}

#[test]
fn unknown_requests_pass_through_or_get_404_as_configured() {
    let mut g = gateway(1, one_revision(1, 5));
    assert_eq!(g.request(0, 1, &host("x.test"), 0), Verdict::Continue);
    let mut cfg = one_revision(1, 5);
    cfg["unknownRevision"] = json!("reject");
    cfg["revisionHeader"] = json!("x-rev");
    let mut g = gateway(1, cfg);
    let Verdict::Reply(r) = g.request(0, 1, &host("x.test"), 0) else {
        panic!("404 expected");
    };
    assert_eq!(
        (r.status(), r.outcome.shed_header()),
        (404, Some("unknown-revision"))
    );
    assert!(g.effects[0].contains(&Effect::CountUnknown));
    // The gateway's header names the revision when host and cluster say nothing.
    let mut named = host("x.test");
    named.headers.push(("x-rev".into(), " rev-a ".into()));
    assert_eq!(g.request(0, 2, &named, 0), Verdict::Continue);
}

/// Three revisions; `a.test` and `c.test` both route to cluster `shared` (a catch-all), `b.test`
/// to `b`. Hosts only, no clusters listed, reject unknown.
fn three_revisions() -> serde_json::Value {
    json!({
        "revisions": [
            {"name": "rev-a", "hosts": ["a.test"], "containerConcurrency": 1, "readyReplicas": 1},
            {"name": "rev-b", "hosts": ["b.test"], "containerConcurrency": 10, "readyReplicas": 1},
            {"name": "rev-c", "hosts": ["c.test"], "containerConcurrency": 10, "readyReplicas": 1}
        ],
        "unknownRevision": "reject", "tick": "50ms"
    })
}

fn routed(h: &str) -> Req {
    let cluster = if h == "b.test" { "b" } else { "shared" };
    host(h).via(cluster)
}

#[test]
fn an_unknown_host_counts_by_the_cluster_learned_from_host_matches() {
    let mut g = gateway(2, three_revisions());
    g.request(0, 1, &routed("b.test"), 0);
    // Worker 1 learned nothing itself: the record is shared.
    assert_eq!(
        g.request(1, 2, &routed("x.test").via("b"), 0),
        Verdict::Continue
    );
    assert_eq!(g.count(1, Outcome::Admitted), 1);
}

#[test]
fn two_revisions_behind_one_cluster_are_not_learned_in_the_order_that_failed_on_envoy() {
    // The real-Envoy hostile test's order: worker 0 records `shared` for rev-a, worker 1 finds
    // it ambiguous, then worker 0 (whose cache still says rev-a) sees c.test. With an empty
    // ambiguity marker this read as "absent" and re-recorded `shared` for rev-c.
    let mut g = gateway(2, three_revisions());
    for (w, h) in [(0, "a.test"), (1, "c.test"), (1, "a.test"), (0, "c.test")] {
        g.request(w, 1, &routed(h), 0);
        g.workers[w].on_done(1, true, 0);
    }
    for w in 0..2 {
        let Verdict::Reply(r) = g.request(w, 9, &routed("x.test"), 1) else {
            panic!("worker {w}: an ambiguous cluster must not count");
        };
        assert_eq!(r.status(), 404);
    }
}

proptest! {
    /// Over any interleaving of requests on three workers: once a cluster has been seen behind
    /// the hosts of two revisions, on any worker, no worker counts an unknown host through it.
    #[test]
    fn once_ambiguous_a_cluster_never_counts_again(
        steps in proptest::collection::vec((0usize..3, 0usize..4), 1..40)
    ) {
        let mut g = gateway(3, three_revisions());
        let hosts = ["a.test", "b.test", "c.test", "x.test"];
        let mut seen_behind_shared: Vec<&str> = Vec::new();
        for (i, (w, h)) in steps.into_iter().enumerate() {
            let ctx = u32::try_from(i).unwrap() + 1;
            let host_name = hosts[h];
            let verdict = g.request(w, ctx, &routed(host_name), 0);
            if host_name == "x.test" {
                let ambiguous = seen_behind_shared.len() >= 2;
                let learned = !seen_behind_shared.is_empty();
                if ambiguous || !learned {
                    prop_assert!(matches!(verdict, Verdict::Reply(_)), "step {i}: counted");
                }
            } else if host_name != "b.test" && !seen_behind_shared.contains(&host_name) {
                seen_behind_shared.push(host_name);
            }
            g.workers[w].on_done(ctx, true, 0);
        }
    }
}

// ---- endpoint picking ----------------------------------------------------------------------

/// One revision `rev-a` behind cluster `rev-a` whose endpoints the worker polls, `cc` per
/// endpoint, 10 waiters, 5 s max wait; routing as configured by `routing`.
fn routed_revision(cc: u32, routing: serde_json::Value) -> serde_json::Value {
    json!({
        "revisions": [{"name": "rev-a", "hosts": ["a.test"], "containerConcurrency": cc,
                       "readyReplicas": 1, "upstreamCluster": "rev-a", "bufferDepth": 10,
                       "maxWait": "5s"}],
        "membership": {"cluster": "admin", "interval": "1s"},
        "routing": routing,
        "tick": "100ms"
    })
}

struct Resp(Option<&'static str>);

impl ResponseFacts for Resp {
    fn upstream_address(&self) -> Option<String> {
        self.0.map(String::from)
    }
}

impl Gateway {
    /// Worker `w` polls the admin and gets `hosts` (`(address, health flags)`) for `rev-a`.
    fn poll(&mut self, w: usize, now: u64, hosts: &[(&str, &str)]) {
        self.workers[w].on_tick(now);
        self.collect(w);
        assert!(
            self.effects[w].iter().any(|e| matches!(e, Effect::Poll(_))),
            "worker {w} polls at {now}"
        );
        self.effects[w].retain(|e| !matches!(e, Effect::Poll(_)));
        self.workers[w].on_poll_dispatched(PollKind::Endpoints, Ok(99));
        self.workers[w].on_poll_dispatched(PollKind::Ready, Ok(98));
        self.workers[w].on_poll_answer(98, "200", Ok(b"LIVE\n".to_vec()), now);
        let mut body = String::from("rev-a::added_via_api::false\n");
        for (address, flags) in hosts {
            body.push_str(&format!("rev-a::{address}::health_flags::{flags}\n"));
        }
        self.workers[w].on_poll_answer(99, "200", Ok(body.into_bytes()), now);
        self.collect(w);
    }

    /// The endpoint-header effects of worker `w` (taken out), in order.
    fn routes(&mut self, w: usize) -> Vec<(u32, Option<String>)> {
        let mut out = Vec::new();
        self.effects[w].retain(|e| match e {
            Effect::Route {
                context,
                header,
                endpoint,
            } => {
                assert_eq!(&**header, "x-gateway-destination-endpoint");
                out.push((*context, endpoint.clone()));
                false
            }
            _ => true,
        });
        out
    }
}

#[test]
fn each_request_is_named_a_free_endpoint_and_a_grant_carries_the_freed_one() {
    let mut g = gateway(2, routed_revision(1, json!({})));
    g.poll(
        0,
        100,
        &[("10.0.0.1:80", "healthy"), ("10.0.0.2:80", "healthy")],
    );
    let a = host("a.test");
    assert_eq!(g.request(0, 1, &a, 200), Verdict::Continue);
    assert_eq!(g.request(1, 2, &a, 200), Verdict::Continue);
    let first = g.routes(0);
    let second = g.routes(1);
    assert_eq!(first.len(), 1);
    assert_eq!(second.len(), 1);
    let (e1, e2) = (first[0].1.clone().unwrap(), second[0].1.clone().unwrap());
    assert_ne!(e1, e2, "the second request goes to the free endpoint");
    // Both endpoints full (cc 1): the third waits, with no endpoint named yet.
    assert_eq!(g.request(0, 3, &a, 201), Verdict::Pause);
    assert!(g.routes(0).is_empty());
    // Worker 1's stream ends: its endpoint's slot goes to stream 3, named before the resume.
    g.workers[1].on_done(2, true, 300);
    g.collect(1);
    g.wake(0, 301);
    let order: Vec<&Effect> = g.effects[0]
        .iter()
        .filter(|e| matches!(e, Effect::Route { .. } | Effect::Resume { .. }))
        .collect();
    assert_eq!(
        order,
        vec![
            &Effect::Route {
                context: 3,
                header: Rc::from("x-gateway-destination-endpoint"),
                endpoint: Some(e2.clone())
            },
            &Effect::Resume { context: 3 }
        ]
    );
    let per: Vec<(String, u32)> = g
        .state()
        .endpoints()
        .unwrap()
        .iter()
        .map(|e| (e.address.clone(), e.active))
        .collect();
    assert_eq!(
        per,
        vec![("10.0.0.1:80".into(), 1), ("10.0.0.2:80".into(), 1)]
    );
    // Releases land on their endpoints.
    g.workers[0].on_done(1, true, 400);
    g.workers[0].on_done(3, true, 400);
    assert!(g.state().endpoints().unwrap().iter().all(|e| e.active == 0));
    assert_eq!(g.state().active, 0);
}

#[test]
fn a_client_copy_of_the_endpoint_header_never_survives() {
    let mut g = gateway(1, routed_revision(2, json!({})));
    let mut a = host("a.test");
    a.headers.push((
        "x-gateway-destination-endpoint".into(),
        "10.9.9.9:80".into(),
    ));
    // Before the first poll it waits (no endpoint to name yet); the client's header is not
    // used: the grant names the pick.
    assert_eq!(g.request(0, 1, &a, 0), Verdict::Pause);
    // A host of no revision passes through, also without the client's header.
    let mut x = host("x.test");
    x.headers = a.headers.clone();
    assert_eq!(g.request(0, 2, &x, 0), Verdict::Continue);
    assert_eq!(g.routes(0), vec![(2, None)]);
    // Endpoints known: the waiter goes with the pick, and so does the next one.
    g.poll(0, 100, &[("10.0.0.1:80", "healthy")]);
    g.wake(0, 150);
    assert_eq!(g.resumed(0), vec![1]);
    assert_eq!(g.routes(0), vec![(1, Some("10.0.0.1:80".into()))]);
    assert_eq!(g.request(0, 3, &a, 200), Verdict::Continue);
    assert_eq!(g.routes(0), vec![(3, Some("10.0.0.1:80".into()))]);
}

#[test]
fn unready_endpoints_get_nothing_new_and_capacity_follows_the_ready_ones() {
    let mut g = gateway(1, routed_revision(1, json!({})));
    g.poll(
        0,
        100,
        &[
            ("10.0.0.1:80", "healthy"),
            ("10.0.0.2:80", "/eds_status_draining"),
            ("10.0.0.3:80", "/failed_active_hc"),
        ],
    );
    assert_eq!(g.state().ready(), Some(1));
    let a = host("a.test");
    assert_eq!(g.request(0, 1, &a, 200), Verdict::Continue);
    assert_eq!(g.routes(0), vec![(1, Some("10.0.0.1:80".into()))]);
    assert_eq!(g.request(0, 2, &a, 200), Verdict::Pause);
    // 10.0.0.3 recovers: the waiter is granted there at the poll.
    g.poll(
        0,
        1_200,
        &[
            ("10.0.0.1:80", "healthy"),
            ("10.0.0.2:80", "/eds_status_draining"),
            ("10.0.0.3:80", "healthy"),
        ],
    );
    g.wake(0, 1_201);
    assert_eq!(g.routes(0), vec![(2, Some("10.0.0.3:80".into()))]);
    assert_eq!(g.resumed(0), vec![2]);
}

#[test]
fn a_response_from_another_endpoint_is_counted_as_a_mismatch() {
    let mut g = gateway(1, routed_revision(3, json!({})));
    g.poll(0, 100, &[("10.0.0.1:80", "healthy")]);
    let a = host("a.test");
    g.request(0, 1, &a, 200);
    g.request(0, 2, &a, 200);
    g.request(0, 3, &a, 200);
    g.effects[0].clear();
    let mismatches = |g: &mut Gateway| {
        g.collect(0);
        g.effects[0]
            .iter()
            .filter(|e| matches!(e, Effect::EndpointMismatch { .. }))
            .count()
    };
    g.workers[0].on_response(1, &Resp(Some("10.0.0.1:80")));
    assert_eq!(mismatches(&mut g), 0, "went where picked");
    g.workers[0].on_response(2, &Resp(None));
    assert_eq!(mismatches(&mut g), 0, "a local reply has no upstream");
    g.workers[0].on_response(3, &Resp(Some("10.0.0.7:80")));
    assert_eq!(mismatches(&mut g), 1);
}

#[test]
fn with_routing_off_no_header_is_touched_and_slots_stay_on_the_revision() {
    let mut g = gateway(1, routed_revision(1, json!({"enabled": false})));
    g.poll(
        0,
        100,
        &[("10.0.0.1:80", "healthy"), ("10.0.0.2:80", "healthy")],
    );
    assert_eq!(g.state().ready(), Some(2));
    assert_eq!(g.state().endpoints(), None);
    let a = host("a.test");
    assert_eq!(g.request(0, 1, &a, 200), Verdict::Continue);
    assert_eq!(g.request(0, 2, &a, 200), Verdict::Continue);
    assert!(g.routes(0).is_empty());
    assert_eq!(g.request(0, 3, &a, 200), Verdict::Pause);
}

#[test]
fn cc_zero_scales_from_zero_requests_wait_for_the_first_replica() {
    for routing in [json!({}), json!({"enabled": false})] {
        let mut g = gateway(1, routed_revision(0, routing.clone()));
        g.poll(0, 100, &[]);
        assert_eq!(g.state().ready(), Some(0));
        let a = host("a.test");
        assert_eq!(g.request(0, 1, &a, 200), Verdict::Pause, "{routing}");
        assert_eq!(g.request(0, 2, &a, 200), Verdict::Pause);
        // The next tick asks for a replica.
        g.effects[0].clear();
        g.workers[0].on_tick(300);
        g.collect(0);
        let desired = g.effects[0].iter().find_map(|e| match e {
            Effect::Gauge {
                gauge: Gauge::DesiredReplicas,
                value,
                ..
            } => Some(*value),
            _ => None,
        });
        assert!(desired >= Some(1), "{routing}: desired {desired:?}");
        // A replica becomes ready: both waiters go, unlimited again.
        g.poll(0, 1_200, &[("10.0.0.1:80", "healthy")]);
        g.wake(0, 1_201);
        assert_eq!(g.resumed(0), vec![1, 2], "{routing}");
        assert_eq!(g.request(0, 3, &a, 1_300), Verdict::Continue);
    }
}

// ---- drain ---------------------------------------------------------------------------------

#[test]
fn a_drain_answers_every_waiter_503_and_sheds_what_would_wait() {
    let mut g = gateway(2, routed_revision(1, json!({})));
    g.poll(0, 100, &[("10.0.0.1:80", "healthy")]);
    let a = host("a.test");
    assert_eq!(g.request(0, 1, &a, 200), Verdict::Continue);
    assert_eq!(g.request(0, 2, &a, 200), Verdict::Pause);
    assert_eq!(g.request(1, 3, &a, 200), Verdict::Pause);
    // The next poll finds the server draining (`/healthcheck/fail`).
    g.workers[0].on_tick(1_200);
    g.collect(0);
    g.effects[0].retain(|e| !matches!(e, Effect::Poll(_)));
    g.workers[0].on_poll_dispatched(PollKind::Endpoints, Ok(11));
    g.workers[0].on_poll_dispatched(PollKind::Ready, Ok(12));
    g.workers[0].on_poll_answer(12, "503", Ok(b"DRAINING\n".to_vec()), 1_210);
    // Each worker answers its own waiters at its next tick.
    for w in 0..2 {
        g.workers[w].on_tick(1_300);
        g.collect(w);
    }
    assert_eq!(g.replies(0), vec![(2, Outcome::ShedDraining)]);
    assert_eq!(g.replies(1), vec![(3, Outcome::ShedDraining)]);
    assert_eq!(g.state().queued(), 0);
    assert_eq!(g.state().active, 1, "what is in flight completes");
    // Nothing new waits: no slot means 503 at once, with retry-after and the reason.
    let Verdict::Reply(r) = g.request(1, 4, &a, 1_350) else {
        panic!("shed expected");
    };
    assert_eq!(r.outcome, Outcome::ShedDraining);
    assert_eq!(r.outcome.shed_header(), Some("gateway-draining"));
    assert_eq!(r.retry_after_s, Some(1));
    // A free slot still serves.
    g.workers[0].on_done(1, true, 1_400);
    assert_eq!(g.request(1, 5, &a, 1_410), Verdict::Continue);
    // Live again (`/healthcheck/ok`): requests wait again.
    g.workers[0].on_tick(2_300);
    g.collect(0);
    g.effects[0].retain(|e| !matches!(e, Effect::Poll(_)));
    g.workers[0].on_poll_dispatched(PollKind::Endpoints, Ok(13));
    g.workers[0].on_poll_dispatched(PollKind::Ready, Ok(14));
    g.workers[0].on_poll_answer(14, "200", Ok(b"LIVE\n".to_vec()), 2_310);
    g.workers[1].on_tick(2_400);
    assert_eq!(g.request(1, 6, &a, 2_410), Verdict::Pause);
}

// ---- classes and fairness -------------------------------------------------------------------

/// `one_revision` with the class header `x-class` and the fairness header `x-tenant`.
fn classed(cc: u32, buffer: u32) -> serde_json::Value {
    let mut c = one_revision(cc, buffer);
    c["classHeader"] = json!("x-class");
    c["fairnessHeader"] = json!("x-tenant");
    c
}

fn as_class(class: &str) -> Req {
    let mut r = host("a.test");
    r.headers.push(("x-class".into(), class.into()));
    r
}

fn of_tenant(class: &str, tenant: &str) -> Req {
    let mut r = as_class(class);
    r.headers.push(("x-tenant".into(), tenant.into()));
    r
}

impl Gateway {
    fn class_counts(&self, w: usize, outcome: Outcome) -> Vec<u8> {
        self.effects[w]
            .iter()
            .filter_map(|e| match e {
                Effect::CountClass {
                    class, outcome: o, ..
                } if *o == outcome => Some(*class),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn the_class_comes_from_the_header_and_a_missing_or_unknown_one_is_standard() {
    let mut g = gateway(1, classed(1, 10));
    g.request(0, 1, &host("a.test"), 0);
    g.request(0, 2, &host("a.test"), 1); // no header: standard
    g.request(0, 3, &as_class("vip"), 2); // unknown: standard, not critical
    g.request(0, 4, &as_class("sheddable"), 3);
    g.request(0, 5, &as_class("Critical"), 4);
    let classes: Vec<u8> = g.state().waiters().map(|w| w.class).collect();
    assert_eq!(classes, vec![1, 1, 2, 0]);
    assert_eq!(
        g.class_counts(0, Outcome::Admitted),
        vec![1],
        "admitted as standard"
    );
    // The slot goes to the critical request, then standard in order, then sheddable.
    let mut order = Vec::new();
    let mut holder = 1;
    for t in 0..4 {
        g.workers[0].on_done(holder, true, 10 + t);
        g.wake(0, 10 + t);
        let r = g.resumed(0);
        assert_eq!(r.len(), 1);
        holder = r[0];
        order.push(holder);
    }
    assert_eq!(order, vec![5, 2, 3, 4]);
    assert!(g.effects[0].contains(&Effect::ClassQueueWait {
        rev: RevisionId(0),
        class: 0,
        ms: 10 - 4
    }));
}

#[test]
fn without_a_class_header_every_request_is_standard_and_no_class_series_are_reported() {
    let mut g = gateway(1, one_revision(1, 10));
    g.request(0, 1, &host("a.test"), 0);
    g.request(0, 2, &as_class("critical"), 0);
    assert_eq!(
        g.state().waiters().map(|w| w.class).collect::<Vec<_>>(),
        vec![1]
    );
    g.workers[0].on_tick(100);
    g.collect(0);
    assert!(!g.effects[0].iter().any(|e| matches!(
        e,
        Effect::CountClass { .. } | Effect::ClassQueueWait { .. } | Effect::ClassGauge { .. }
    )));
}

#[test]
fn a_higher_class_evicts_the_newest_sheddable_and_its_owner_on_another_worker_answers_it() {
    let mut g = gateway(2, classed(1, 2));
    g.request(0, 1, &host("a.test"), 0);
    assert_eq!(g.request(1, 2, &as_class("sheddable"), 1), Verdict::Pause);
    assert_eq!(g.request(1, 3, &as_class("sheddable"), 2), Verdict::Pause);
    // Full. A critical request on worker 0 takes the newest sheddable's place.
    assert_eq!(g.request(0, 4, &as_class("critical"), 3), Verdict::Pause);
    assert_eq!(
        g.state()
            .waiters()
            .map(|w| w.owner.context)
            .collect::<Vec<_>>(),
        vec![2, 4]
    );
    assert!(
        g.workers[1].is_waiting(3),
        "answered by its owner, on its wake"
    );
    g.wake(1, 4);
    assert_eq!(g.replies(1), vec![(3, Outcome::ShedFull)]);
    assert_eq!(g.count(1, Outcome::ShedFull), 1);
    assert_eq!(g.class_counts(1, Outcome::ShedFull), vec![2]);
    assert!(!g.workers[1].is_waiting(3));
    assert!(g.workers[1].is_waiting(2));
    // A standard request finds the buffer full of higher or equal classes... except the
    // remaining sheddable: it takes that place too.
    assert_eq!(g.request(0, 5, &host("a.test"), 5), Verdict::Pause);
    g.wake(1, 6);
    assert_eq!(g.replies(1), vec![(2, Outcome::ShedFull)]);
    // Now only critical and standard wait: a sheddable or standard arrival is shed at once.
    for (ctx, class) in [(6, "sheddable"), (7, "standard")] {
        let Verdict::Reply(r) = g.request(0, ctx, &as_class(class), 7) else {
            panic!("{class}: shed expected");
        };
        assert_eq!(r.outcome, Outcome::ShedFull);
    }
    // An evicted waiter whose client already left needs nothing: counted once, as cancelled.
    let mut g = gateway(2, classed(1, 1));
    g.request(0, 1, &host("a.test"), 0);
    g.request(1, 2, &as_class("sheddable"), 1);
    g.request(0, 3, &as_class("critical"), 2);
    g.workers[1].on_done(2, true, 3);
    g.wake(1, 4);
    assert_eq!(g.replies(1), Vec::<(u32, Outcome)>::new());
    assert_eq!(
        (
            g.count(1, Outcome::Cancelled),
            g.count(1, Outcome::ShedFull)
        ),
        (1, 0)
    );
}

#[test]
fn an_eviction_for_a_gone_worker_needs_no_answer() {
    let mut g = gateway(2, classed(1, 1));
    g.request(0, 1, &host("a.test"), 0);
    g.request(1, 2, &as_class("sheddable"), 1);
    let gone = g.token(1);
    g.world.borrow_mut().unreachable.push(gone);
    assert_eq!(g.request(0, 3, &as_class("critical"), 2), Verdict::Pause);
    assert_eq!(g.state().queued(), 1);
}

#[test]
fn each_class_waits_its_own_maximum() {
    let mut config = classed(1, 10);
    config["revisions"][0]["maxWait"] = json!("10s");
    let mut g = gateway(1, config);
    g.request(0, 1, &host("a.test"), 0);
    g.request(0, 2, &as_class("sheddable"), 0);
    g.request(0, 3, &as_class("standard"), 0);
    g.request(0, 4, &as_class("critical"), 0);
    g.workers[0].on_tick(4_999);
    g.collect(0);
    assert_eq!(g.replies(0), Vec::<(u32, Outcome)>::new());
    g.workers[0].on_tick(5_000);
    g.collect(0);
    assert_eq!(
        g.replies(0),
        vec![(2, Outcome::ShedTimeout)],
        "sheddable: 5s by default"
    );
    g.workers[0].on_tick(10_000);
    g.collect(0);
    assert_eq!(
        g.replies(0),
        vec![(3, Outcome::ShedTimeout), (4, Outcome::ShedTimeout)]
    );
    assert_eq!(g.class_counts(0, Outcome::ShedTimeout), vec![2, 1, 0]);
}

#[test]
fn tenants_take_turns_whatever_their_number_of_requests() {
    let mut g = gateway(2, classed(1, 20));
    g.request(0, 1, &host("a.test"), 0);
    // Tenant "big" queues 6 requests on worker 0 before "small" queues 2 on worker 1.
    for c in 10..16 {
        g.request(0, c, &of_tenant("standard", "big"), 1);
    }
    for c in 20..22 {
        g.request(1, c, &of_tenant("standard", "small"), 2);
    }
    let groups: Vec<u32> = g.state().waiters().map(|w| w.group).collect();
    assert_eq!(groups[0], fairness_group("big"));
    assert_eq!(groups[6], fairness_group("small"));
    g.workers[1].on_tick(3);
    g.collect(1);
    for (gauge, value) in [(ClassGauge::Queued, 8), (ClassGauge::Groups, 2)] {
        assert!(
            g.effects[1].contains(&Effect::ClassGauge {
                rev: RevisionId(0),
                class: 1,
                gauge,
                value
            }),
            "{gauge:?} {value}"
        );
    }
    let mut served = Vec::new();
    let (mut holder_w, mut holder) = (0, 1);
    for t in 0..4 {
        g.workers[holder_w].on_done(holder, true, 10 + t);
        g.collect(holder_w);
        g.wake(0, 10 + t);
        g.wake(1, 10 + t);
        let (w, r) = match (g.resumed(0).as_slice(), g.resumed(1).as_slice()) {
            ([r], []) => (0, *r),
            ([], [r]) => (1, *r),
            other => panic!("one resume expected, got {other:?}"),
        };
        (holder_w, holder) = (w, r);
        served.push(w);
    }
    assert_eq!(
        served.iter().filter(|w| **w == 1).count(),
        2,
        "small got every other slot: {served:?}"
    );
    assert_ne!(served[0], served[1]);
}

#[derive(Debug, Clone)]
enum ClassOp {
    Arrive(usize, u8),
    Finish(usize),
    Leave(usize),
    Tick(u64),
    Wake(usize),
}

fn class_op() -> impl Strategy<Value = ClassOp> {
    prop_oneof![
        5 => (0usize..2, 0u8..4).prop_map(|(w, c)| ClassOp::Arrive(w, c)),
        3 => (0usize..64).prop_map(ClassOp::Finish),
        1 => (0usize..64).prop_map(ClassOp::Leave),
        2 => (1u64..400).prop_map(ClassOp::Tick),
        3 => (0usize..2).prop_map(ClassOp::Wake),
    ]
}

proptest! {
    /// Two workers, three classes (sheddable waits 0.5s, the others 1s), random arrivals,
    /// completions, leavers, ticks and wake deliveries: after a worker's tick none of its
    /// streams waits at or past its class's maximum wait (a lost grant aside: none is lost
    /// here); the limit holds; every request ends with exactly one outcome, counted once for
    /// the revision and once for its class.
    #[test]
    fn no_class_waits_past_its_maximum_and_counts_are_conserved(
        ops in proptest::collection::vec(class_op(), 1..150),
    ) {
        let mut config = classed(2, 4);
        config["revisions"][0]["classes"] = json!([
            {"name": "critical"}, {"name": "standard"}, {"name": "sheddable", "maxWait": "500ms"}
        ]);
        let mut g = gateway(2, config);
        let names = ["critical", "standard", "sheddable", "bogus"];
        let wait_of = |class: u8| if class == 2 { 500 } else { 1_000 };
        let mut now = 0u64;
        let mut ctx = 0u32;
        // Streams the test has: (worker, context, class as the gateway sees it, since).
        let mut waiting: Vec<(usize, u32, u8, u64)> = Vec::new();
        let mut running: Vec<(usize, u32)> = Vec::new();
        let mut arrivals = 0usize;
        let settle = |g: &mut Gateway, w: usize, waiting: &mut Vec<(usize, u32, u8, u64)>, running: &mut Vec<(usize, u32)>| {
            for c in g.resumed(w) {
                waiting.retain(|s| !(s.0 == w && s.1 == c));
                running.push((w, c));
            }
            for (c, _) in g.replies(w) {
                waiting.retain(|s| !(s.0 == w && s.1 == c));
            }
        };
        for op in ops {
            match op {
                ClassOp::Arrive(w, c) => {
                    ctx += 1;
                    arrivals += 1;
                    let class = if c == 3 { 1 } else { c };
                    match g.request(w, ctx, &as_class(names[usize::from(c)]), now) {
                        Verdict::Continue => running.push((w, ctx)),
                        Verdict::Pause => waiting.push((w, ctx, class, now)),
                        Verdict::Reply(_) | Verdict::Report(_) => {}
                    }
                }
                ClassOp::Finish(i) => {
                    if !running.is_empty() {
                        let (w, c) = running.remove(i % running.len());
                        g.workers[w].on_done(c, true, now);
                        g.collect(w);
                    }
                }
                ClassOp::Leave(i) => {
                    if !waiting.is_empty() {
                        let (w, c, _, _) = waiting.remove(i % waiting.len());
                        g.workers[w].on_done(c, true, now);
                        g.collect(w);
                    }
                }
                ClassOp::Tick(d) => {
                    now += d;
                    for w in 0..2 {
                        g.workers[w].on_tick(now);
                        g.collect(w);
                        settle(&mut g, w, &mut waiting, &mut running);
                        // A stream whose grant is on its way (its ticket left the queue) may
                        // wait one tick more; every stream still queued is within its wait.
                        let me = g.workers[w].id();
                        let queued: Vec<u32> = g.state().waiters().filter(|x| x.owner.vm == me).map(|x| x.owner.context).collect();
                        for s in waiting.iter().filter(|s| s.0 == w && queued.contains(&s.1)) {
                            prop_assert!(now - s.3 < wait_of(s.2), "stream {} of class {} waited {} ms", s.1, s.2, now - s.3);
                        }
                    }
                }
                ClassOp::Wake(w) => {
                    g.wake(w, now);
                    settle(&mut g, w, &mut waiting, &mut running);
                }
            }
            for w in 0..2 {
                settle(&mut g, w, &mut waiting, &mut running);
            }
            prop_assert!(g.state().active <= 2);
            prop_assert_eq!(g.state().active as usize, running.len() + pending_grants(&g));
        }
        // Drain: finish everything, deliver every wake, expire the rest.
        for _ in 0..20 {
            while let Some((w, c)) = running.pop() {
                g.workers[w].on_done(c, true, now);
                g.collect(w);
            }
            now += 1_000;
            for w in 0..2 {
                g.wake(w, now);
                g.workers[w].on_tick(now);
                g.collect(w);
                settle(&mut g, w, &mut waiting, &mut running);
            }
        }
        prop_assert!(waiting.is_empty() && running.is_empty());
        let decided: usize = [Outcome::Admitted, Outcome::ShedFull, Outcome::ShedTimeout, Outcome::Cancelled]
            .iter()
            .map(|o| g.count(0, *o) + g.count(1, *o))
            .sum();
        // Admitted counts each request that went upstream once; the others end it.
        prop_assert_eq!(decided, arrivals, "one outcome per request");
        let by_class = g.effects.iter().flatten().filter(|e| matches!(e, Effect::CountClass { .. })).count();
        prop_assert_eq!(by_class, arrivals, "and once per class");
        prop_assert_eq!((g.state().active, g.state().queued()), (0, 0));
    }
}

/// Grants sent but not yet delivered (slots counted as active, stream not resumed yet).
fn pending_grants(g: &Gateway) -> usize {
    g.world
        .borrow()
        .queues
        .values()
        .flatten()
        .filter(|m| matches!(Wake::decode(m), Ok(Wake::Grant { .. })))
        .count()
}

#[test]
fn a_root_that_ends_with_held_slots_lives_until_they_are_released() {
    let mut g = gateway(1, one_revision(1, 5));
    let a = host("a.test");
    assert_eq!(g.request(0, 1, &a, 0), Verdict::Continue);
    // The client leaves before the response: the slot is held ABANDONED_HOLD_MS.
    g.workers[0].on_done(1, false, 10);
    assert!(!g.workers[0].on_root_done(12), "a held slot: not yet");
    assert_eq!(g.state().active, 1);
    g.workers[0].on_tick(10 + ABANDONED_HOLD_MS);
    assert!(g.workers[0].may_end());
    assert_eq!(g.state().active, 0, "released by the root's own tick");
    // With nothing held a root ends at once.
    assert!(g.workers[0].on_root_done(100));
}

// ---- slot leases ---------------------------------------------------------------------------

fn leasing(cc: u32, buffer: u32, slots: u32, headroom: u32) -> serde_json::Value {
    let mut c = one_revision(cc, buffer);
    c["slotLease"] = json!({"slots": slots, "headroom": headroom});
    c
}

impl Gateway {
    /// The swap counter of the revision's record: it moves with every write.
    fn writes(&self) -> u32 {
        self.world.borrow().shared[&store::revision_key("rev-a")].1
    }
}

#[test]
fn a_lease_admits_and_releases_without_writing_shared_state() {
    let mut g = gateway(2, leasing(1000, 10, 8, 64));
    let a = host("a.test");
    // The first arrival goes through shared state and takes 8 slots ahead.
    assert_eq!(g.request(0, 1, &a, 0), Verdict::Continue);
    let s = g.state();
    assert_eq!((s.active, s.in_flight()), (9, 1));
    let me = g.workers[0].id();
    assert_eq!(
        s.leases(),
        &[Lease {
            vm: me,
            slots: 8,
            used: 0
        }]
    );
    let before = g.writes();
    for c in 2..=9 {
        assert_eq!(g.request(0, c, &a, 1), Verdict::Continue);
    }
    for c in 2..=9 {
        g.workers[0].on_done(c, true, 5);
    }
    assert_eq!(
        g.writes(),
        before,
        "8 admits and 8 ends on the lease wrote nothing"
    );
    assert_eq!(g.count(0, Outcome::Admitted), 9);
    // The ninth on the lease finds it full: shared state again, and 8 more slots.
    for c in 10..=18 {
        assert_eq!(g.request(0, c, &a, 6), Verdict::Continue);
    }
    assert!(g.writes() > before);
    assert_eq!(
        g.state().active,
        1 + 8 + 1 + 8,
        "stream 1, the first lease, stream 18 and the second lease"
    );
    for c in 10..=18 {
        g.workers[0].on_done(c, true, 7);
    }
    g.workers[0].on_done(1, true, 8);
    // A tick with lease admits since the last keeps the lease; the next, with none, gives it
    // back, and the state is empty again.
    g.workers[0].on_tick(100);
    assert_eq!(g.state().in_flight(), 0);
    g.workers[0].on_tick(200);
    let s = g.state();
    assert_eq!((s.active, s.queued(), s.leases().len()), (0, 0, 0));
    assert_eq!(s.holders().count(), 0);
}

#[test]
fn no_lease_near_the_limit_and_leases_come_back_when_it_nears() {
    // cc 20, headroom 8, slots 4: a lease only while at least 12 slots are free.
    let mut g = gateway(2, leasing(20, 10, 4, 8));
    let a = host("a.test");
    g.request(0, 1, &a, 0);
    assert_eq!(g.state().active, 5, "leased: 19 free ≥ 4 + 8");
    let mut c = 100;
    // Worker 1 fills up through shared state (and leases while there is room).
    while g.state().active < 17 {
        c += 1;
        assert_eq!(g.request(1, c, &a, 1), Verdict::Continue);
    }
    // Fewer than headroom / 2 free: the next swap recalls the other worker's lease.
    c += 1;
    g.request(1, c, &a, 2);
    assert!(g.state().leases().iter().any(|l| l.vm == g.workers[0].id()));
    g.wake(0, 3);
    let s = g.state();
    assert!(
        s.leases().iter().all(|l| l.vm != g.workers[0].id()),
        "worker 0 gave its lease back: {:?}",
        s.leases()
    );
}

#[test]
fn an_arrival_that_would_wait_recalls_the_leases_and_waits_first_in_line() {
    // cc 10, slots 4, headroom 0: two workers lease everything between them.
    let mut g = gateway(2, leasing(10, 5, 4, 0));
    let a = host("a.test");
    g.request(0, 1, &a, 0); // worker 0: 1 in flight, 4 leased spare
    for c in 10..=14 {
        assert_eq!(g.request(1, c, &a, 1), Verdict::Continue); // 1 + 4 on its lease
    }
    assert_eq!(g.state().active, 10);
    // Worker 1's next arrival finds no slot while worker 0 holds 4 spare: it recalls them
    // (the epoch moves first), gives its own lease back, and waits.
    assert_eq!(g.request(1, 15, &a, 2), Verdict::Pause);
    // Worker 0 sees a request before the recall message: its lease no longer admits, it goes
    // through shared state, where giving the lease back grants stream 15 first.
    assert_eq!(g.request(0, 2, &a, 3), Verdict::Continue);
    g.wake(1, 4);
    assert_eq!(
        g.resumed(1),
        vec![15],
        "the waiter got a slot before stream 2 did"
    );
    g.wake(0, 5); // the recall finds nothing left to give
    let s = g.state();
    assert_eq!(
        (s.active, s.queued()),
        (8, 0),
        "streams 1, 2, 10–15 in flight"
    );
    assert!(s.leases().is_empty(), "{:?}", s.leases());
    // Every slot still frees: the lease streams of worker 1 end through shared state now.
    for c in 10..=15 {
        g.workers[1].on_done(c, true, 6);
    }
    for c in [1, 2] {
        g.workers[0].on_done(c, true, 6);
    }
    assert_eq!(g.state().active, 0);
}

#[test]
fn demand_with_leases_equals_demand_without() {
    // The same schedule on two gateways, leases on and off: the shared demand integral after
    // the ticks is the same request-millisecond for request-millisecond.
    let schedule = |g: &mut Gateway| {
        let a = host("a.test");
        let mut t = 0;
        for round in 0..5u32 {
            for w in 0..2 {
                for k in 0..6 {
                    let c = 1000 * round + 100 * w as u32 + k;
                    t += 3;
                    g.request(w, c, &a, t);
                }
            }
            for w in 0..2 {
                for k in 0..6 {
                    let c = 1000 * round + 100 * w as u32 + k;
                    t += 7;
                    g.workers[w].on_done(c, true, t);
                }
            }
            t += 40;
            for w in 0..2 {
                g.workers[w].on_tick(t);
            }
        }
        for w in 0..2 {
            g.workers[w].on_tick(t + 100);
            g.workers[w].on_tick(t + 200);
        }
        let s = g.state();
        (s.active, s.leases().len(), s.demand_ms(t + 300))
    };
    let with = schedule(&mut gateway(2, leasing(1000, 10, 8, 64)));
    let without = schedule(&mut gateway(2, leasing(1000, 10, 0, 64)));
    assert!(with.2 > 0);
    assert_eq!(with, without);
}
