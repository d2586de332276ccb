//! The real filter.wasm in the emulated host: every behaviour the real-Envoy suite checks, with
//! exact assertions (who is admitted, resume order and worker, replies, metric values), plus
//! the interleavings Envoy cannot be made to produce on demand.
//!
//! Run: `cargo test -p inflight-host-tests --test emu_scenarios` (builds filter.wasm first).

use inflight_host_tests::emu::{Delivery, End, Filter, Host, Req, State};
use serde_json::json;

const A: &str = "a.example.com";
const B: &str = "b.example.com";

/// One revision `rev-a` for `a.example.com` with `cc` slots (1 replica), `buffer` waiters,
/// `max_wait_ms`, 50 ms ticks, `retry-after` 1 s.
fn config_a(cc: u32, buffer: u32, max_wait_ms: u64) -> String {
    json!({
        "revisions": [{
            "name": "rev-a", "hosts": [A], "containerConcurrency": cc, "readyReplicas": 1,
            "bufferDepth": buffer, "maxWait": format!("{max_wait_ms}ms")
        }],
        "tick": "50ms", "retryAfter": "1s"
    })
    .to_string()
}

fn m(rev: &str, what: &str) -> String {
    match what {
        "active" | "queued" | "capacity" | "queue_wait_ms" => {
            format!("inflight.revision.{rev}.{what}")
        }
        outcome => format!("inflight.revision.{rev}.outcome.{outcome}.requests_total"),
    }
}

fn assert_clean(h: &Host) {
    assert!(h.anomalies().is_empty(), "anomalies: {:#?}", h.anomalies());
    assert!(h.traps().is_empty(), "traps: {:#?}", h.traps());
}

fn assert_shed(h: &Host, r: Req, reason: &str, rev: &str) {
    let reply = h.reply(r);
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.header("x-inflight-shed"), Some(reason), "{reply:?}");
    assert_eq!(reply.header("retry-after"), Some("1"), "{reply:?}");
    assert!(
        reply.body.contains(rev),
        "body names the revision: {reply:?}"
    );
    assert_eq!(
        reply.body.trim_end().lines().count(),
        1,
        "one line: {reply:?}"
    );
    assert!(matches!(h.ended(r), Some(End::LocalReply { .. })));
}

#[test]
fn limit_is_exact_and_the_excess_waits_then_sheds_buffer_full() {
    let mut h = Host::new(Filter::built(), 4, &config_a(2, 5, 1000));
    // 10 requests round-robin over 4 workers: 2 admitted, 5 wait, 3 shed.
    let rs: Vec<Req> = (0..10).map(|i| h.request(i % 4, A).send()).collect();
    assert_eq!(h.state(rs[0]), State::Admitted);
    assert_eq!(h.state(rs[1]), State::Admitted);
    for r in &rs[2..7] {
        assert_eq!(h.state(*r), State::Paused, "{r:?}");
    }
    for r in &rs[7..] {
        assert_shed(&h, *r, "buffer-full", "rev-a");
    }
    assert_eq!(h.upstream(), vec![rs[0], rs[1]]);
    assert_eq!(h.counter(&m("rev-a", "admitted")), 2);
    assert_eq!(h.counter(&m("rev-a", "shed_full")), 3);
    h.advance(50);
    assert_eq!(h.gauge(&m("rev-a", "active")), 2);
    assert_eq!(h.gauge(&m("rev-a", "queued")), 5);
    assert_eq!(h.gauge(&m("rev-a", "capacity")), 2);

    // Finishing the upstream requests one by one lets the waiters in, oldest first, each on
    // its own worker; the upstream never sees more than 2.
    let mut order = Vec::new();
    while let Some(&r) = h.upstream().first() {
        h.advance(10);
        h.finish(r, 200);
        assert!(h.upstream().len() <= 2);
        order = h.resume_order();
    }
    assert_eq!(order, rs[2..7].to_vec(), "FIFO across workers");
    for r in &rs[2..7] {
        let State::Resumed { worker, .. } = h.state(*r) else {
            panic!("{r:?} not resumed: {:?}", h.state(*r))
        };
        assert_eq!(worker, r.0 % 4, "resumed on the worker that holds it");
    }
    h.advance(50);
    assert_eq!(h.counter(&m("rev-a", "admitted")), 7);
    assert_eq!(h.counter(&m("rev-a", "shed_full")), 3);
    assert_eq!(h.counter(&m("rev-a", "shed_timeout")), 0);
    assert_eq!(h.counter(&m("rev-a", "cancelled")), 0);
    assert_eq!(h.gauge(&m("rev-a", "active")), 0);
    assert_eq!(h.gauge(&m("rev-a", "queued")), 0);
    // Waiters arrived at 0 and resumed at 60, 70, 80, 90 and 100 ms.
    assert_eq!(
        h.histogram(&m("rev-a", "queue_wait_ms")),
        vec![60, 70, 80, 90, 100]
    );
    assert_clean(&h);
}

#[test]
fn cross_worker_grant_resumes_on_the_waiters_worker() {
    let mut h = Host::new(Filter::built(), 4, &config_a(1, 5, 1000));
    let r0 = h.request(0, A).send();
    let r1 = h.request(3, A).send();
    assert_eq!(h.state(r1), State::Paused);
    h.advance(7);
    h.finish(r0, 200);
    assert_eq!(
        h.state(r1),
        State::Resumed {
            worker: 3,
            at_ms: 7
        }
    );
    assert_eq!(h.resumes().len(), 1);
    h.finish(r1, 200);
    assert_clean(&h);
}

#[test]
fn grant_waits_in_the_queue_until_the_event_loop_runs() {
    let mut h = Host::builder(Filter::built())
        .workers(2)
        .plugin_config(config_a(1, 5, 1000))
        .delivery(Delivery::Manual)
        .build()
        .unwrap();
    let r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    h.finish(r0, 200);
    assert_eq!(h.state(r1), State::Paused, "grant not delivered yet");
    assert_eq!(h.pending_events().len(), 1);
    h.run();
    assert!(matches!(h.state(r1), State::Resumed { worker: 1, .. }));
    assert_clean(&h);
}

#[test]
fn cancelled_waiter_consumes_no_slot() {
    let mut h = Host::new(Filter::built(), 3, &config_a(1, 5, 1000));
    let r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    let r2 = h.request(2, A).send();
    h.reset(r1);
    assert_eq!(h.counter(&m("rev-a", "cancelled")), 1);
    h.finish(r0, 200);
    assert_eq!(h.resume_order(), vec![r2]);
    assert!(matches!(h.state(r2), State::Resumed { worker: 2, .. }));
    assert_eq!(h.state(r1), State::Paused, "never resumed");
    assert!(matches!(h.ended(r1), Some(End::Reset { .. })));
    h.finish(r2, 200);
    h.advance(50);
    assert_eq!(h.gauge(&m("rev-a", "active")), 0);
    assert_eq!(h.gauge(&m("rev-a", "queued")), 0);
    assert_eq!(h.counter(&m("rev-a", "admitted")), 2);
    assert_clean(&h);
}

#[test]
fn grant_to_a_stream_that_left_passes_to_the_next_ticket() {
    // The grant for r1 is in w1's queue when r1's client disconnects; w1 passes the slot on.
    let mut h = Host::builder(Filter::built())
        .workers(3)
        .plugin_config(config_a(1, 5, 1000))
        .delivery(Delivery::Manual)
        .build()
        .unwrap();
    let r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    let r2 = h.request(2, A).send();
    h.finish(r0, 200);
    h.reset(r1);
    h.run();
    assert_eq!(h.resume_order(), vec![r2]);
    assert!(matches!(h.state(r2), State::Resumed { worker: 2, .. }));
    assert!(h.upstream().len() <= 1);
    h.finish(r2, 200);
    h.advance(50);
    assert_eq!(h.gauge(&m("rev-a", "active")), 0);
    assert_eq!(h.gauge(&m("rev-a", "queued")), 0);
    assert_eq!(h.counter(&m("rev-a", "cancelled")), 1);
    assert_eq!(h.counter(&m("rev-a", "admitted")), 2);
    assert_clean(&h);
}

#[test]
fn grant_to_a_stream_that_left_on_the_same_worker_passes_on() {
    // Releaser and waiter on one worker; the waiter leaves before the queue is served.
    let mut h = Host::builder(Filter::built())
        .workers(2)
        .plugin_config(config_a(1, 5, 1000))
        .delivery(Delivery::Manual)
        .build()
        .unwrap();
    let r0 = h.request(0, A).send();
    let r1 = h.request(0, A).send();
    let r2 = h.request(1, A).send();
    h.finish(r0, 200);
    h.reset(r1);
    h.run();
    assert_eq!(h.resume_order(), vec![r2]);
    h.finish(r2, 200);
    h.advance(50);
    assert_eq!(h.gauge(&m("rev-a", "active")), 0);
    assert_clean(&h);
}

#[test]
fn wait_timeout_sheds_at_max_wait_when_arrival_is_on_a_tick() {
    let mut h = Host::new(Filter::built(), 2, &config_a(1, 5, 1000));
    h.advance(50);
    let r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    h.advance(999);
    assert_eq!(h.state(r1), State::Paused, "age 999 ms < max wait");
    h.advance(1);
    assert_shed(&h, r1, "wait-timeout", "rev-a");
    assert_eq!(h.reply(r1).at_ms, 50 + 1000);
    assert_eq!(h.counter(&m("rev-a", "shed_timeout")), 1);
    h.finish(r0, 200);
    assert!(h.resume_order().is_empty());
    h.advance(50);
    assert_eq!(h.gauge(&m("rev-a", "queued")), 0);
    assert_eq!(h.gauge(&m("rev-a", "active")), 0);
    assert_clean(&h);
}

#[test]
fn wait_timeout_sheds_by_max_wait_plus_one_tick_at_the_latest() {
    let mut h = Host::new(Filter::built(), 2, &config_a(1, 5, 1000));
    h.advance(51);
    let _r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    // Ticks at 1050 (age 999: stays) and 1100 (age 1049: shed) = arrival + max wait + tick - 1.
    h.advance(1098);
    assert_eq!(h.now_ms(), 1149);
    assert!(matches!(h.state(r1), State::LocalReply(_)));
    assert_eq!(h.reply(r1).at_ms, 1100);
    assert!(h.reply(r1).at_ms <= 51 + 1000 + 50);
    assert!(h.reply(r1).at_ms >= 51 + 1000);
    assert_clean(&h);
}

#[test]
fn upstream_5xx_and_resets_release_their_slot() {
    let mut h = Host::new(Filter::built(), 2, &config_a(1, 5, 1000));
    let r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    h.finish(r0, 503);
    assert!(matches!(h.state(r1), State::Resumed { worker: 1, .. }));
    let r2 = h.request(0, A).send();
    assert_eq!(h.state(r2), State::Paused);
    // Downstream reset while upstream. The slot of a stream that ended before its response is
    // held 20 ms (the upstream request is reset after the filter's on_done), then released at
    // the next event or tick.
    h.reset(r1);
    h.run();
    assert_eq!(h.state(r2), State::Paused);
    h.advance(19);
    assert_eq!(h.state(r2), State::Paused);
    h.advance(81);
    assert!(matches!(h.state(r2), State::Resumed { worker: 0, .. }));
    h.finish(r2, 504);
    let r3 = h.request(1, A).send();
    assert_eq!(h.state(r3), State::Admitted);
    h.reset(r3);
    h.advance(100);
    assert_eq!(h.gauge(&m("rev-a", "active")), 0);
    assert_eq!(h.counter(&m("rev-a", "admitted")), 4);
    assert_clean(&h);
}

#[test]
fn two_revisions_are_independent() {
    let cfg = json!({
        "revisions": [
            {"name": "rev-a", "hosts": [A], "containerConcurrency": 1, "bufferDepth": 2},
            {"name": "rev-b", "hosts": [B], "containerConcurrency": 1, "bufferDepth": 2}
        ],
        "tick": "50ms", "retryAfter": "1s"
    })
    .to_string();
    let mut h = Host::new(Filter::built(), 2, &cfg);
    let a0 = h.request(0, A).send();
    let a1 = h.request(1, A).send();
    let b0 = h.request(1, B).send();
    assert_eq!(h.state(a1), State::Paused);
    assert_eq!(h.state(b0), State::Admitted);
    let b1 = h.request(0, B).send();
    h.finish(b0, 200);
    assert_eq!(h.resume_order(), vec![b1], "a's waiter untouched by b");
    h.finish(a0, 200);
    assert_eq!(h.resume_order(), vec![b1, a1]);
    h.finish(a1, 200);
    h.finish(b1, 200);
    h.advance(50);
    for rev in ["rev-a", "rev-b"] {
        assert_eq!(h.counter(&m(rev, "admitted")), 2);
        assert_eq!(h.gauge(&m(rev, "active")), 0);
        assert_eq!(h.gauge(&m(rev, "queued")), 0);
        assert_eq!(h.gauge(&m(rev, "capacity")), 1);
    }
    assert_clean(&h);
}

#[test]
fn revision_found_by_host_wildcard_header_and_cluster() {
    let cfg = json!({
        "revisions": [
            {"name": "rev-a", "hosts": [A, "*.w.example.com"], "containerConcurrency": 1, "bufferDepth": 0},
            {"name": "rev-c", "clusters": ["outbound|80||c"], "containerConcurrency": 1, "bufferDepth": 0}
        ],
        "revisionHeader": "x-inflight-revision",
        "tick": "50ms", "retryAfter": "1s"
    })
    .to_string();
    let mut h = Host::new(Filter::built(), 1, &cfg);
    let a = h.request(0, "a.example.com:8080").send();
    assert_eq!(h.state(a), State::Admitted);
    // Each of these is rev-a, which is full and has no buffer: shed.
    let w = h.request(0, "x.w.example.com").send();
    let hd = h
        .request(0, "other.example.com")
        .header("x-inflight-revision", "rev-a")
        .send();
    assert_shed(&h, w, "buffer-full", "rev-a");
    assert_shed(&h, hd, "buffer-full", "rev-a");
    let c0 = h
        .request(0, "c.internal")
        .property("xds.cluster_name", "outbound|80||c")
        .send();
    let c1 = h
        .request(0, "c.internal")
        .property("xds.cluster_name", "outbound|80||c")
        .send();
    assert_eq!(h.state(c0), State::Admitted);
    assert_shed(&h, c1, "buffer-full", "rev-c");
    // Unknown: passes through, untracked.
    let u = h.request(0, "unknown.example.com").send();
    assert_eq!(h.state(u), State::Admitted);
    h.finish(u, 200);
    assert_eq!(h.counter(&m("rev-a", "admitted")), 1);
    assert_eq!(h.counter(&m("rev-a", "shed_full")), 2);
    assert_eq!(h.counter(&m("rev-c", "admitted")), 1);
    assert_clean(&h);
}

#[test]
fn unknown_revision_rejected_with_404_when_configured() {
    let cfg = json!({
        "revisions": [{"name": "rev-a", "hosts": [A], "containerConcurrency": 1}],
        "unknownRevision": "reject", "tick": "50ms"
    })
    .to_string();
    let mut h = Host::new(Filter::built(), 1, &cfg);
    let u = h.request(0, "nope.example.com").send();
    let reply = h.reply(u);
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("x-inflight-shed"), Some("unknown-revision"));
    assert_clean(&h);
}

#[test]
fn invalid_configuration_is_rejected_with_a_reason() {
    let err = Host::builder(Filter::built())
        .plugin_config(r#"{"revisions":[{"name":"r","containerConcurrency":1,"bogus":1}]}"#)
        .build()
        .err()
        .expect("configuration rejected");
    assert!(err.contains("on_configure rejected"), "{err}");
    assert!(err.contains("bogus"), "the log says what is wrong: {err}");
}

#[test]
fn unlimited_revision_admits_everything_and_counts_it() {
    let mut h = Host::new(Filter::built(), 2, &config_a(0, 0, 1000));
    let rs: Vec<Req> = (0..20).map(|i| h.request(i % 2, A).send()).collect();
    assert!(rs.iter().all(|r| h.state(*r) == State::Admitted));
    for r in rs {
        h.finish(r, 200);
    }
    h.advance(50);
    assert_eq!(h.counter(&m("rev-a", "admitted")), 20);
    assert_eq!(h.gauge(&m("rev-a", "active")), 0);
    assert_clean(&h);
}

/// A POST's body reaches the filter while its headers are paused (Envoy calls decodeData on a
/// filter whose decodeHeaders returned StopIteration). If `on_http_request_body` answers
/// Continue — the SDK default — Envoy sends the paused headers on: the request bypasses the
/// limit (filter.h: "If headers have not yet been sent to the next filter, they will be sent
/// first"). The reference load (`hey -m POST -D mnist.json`) is exactly this.
#[test]
fn paused_post_stays_paused_when_its_body_arrives() {
    let mut h = Host::new(Filter::built(), 2, &config_a(1, 5, 1000));
    let r0 = h.request(0, A).header(":method", "POST").body(b"{}").send();
    let r1 = h.request(1, A).header(":method", "POST").body(b"{}").send();
    assert_eq!(h.state(r0), State::Admitted);
    assert_eq!(
        h.state(r1),
        State::Paused,
        "the body released the paused request: upstream sees {} > capacity 1; anomalies: {:#?}",
        h.upstream().len(),
        h.anomalies()
    );
    h.finish(r0, 200);
    assert!(matches!(h.state(r1), State::Resumed { worker: 1, .. }));
    assert_clean(&h);
}

/// A request whose host matches nothing is counted by its cluster when another worker learned
/// that cluster from a host match; a cluster seen behind two revisions' hosts is not used.
#[test]
fn unmatched_host_counts_by_the_cluster_learned_on_another_worker() {
    const CLUSTER: &str = "xds.cluster_name";
    let cfg = json!({
        "revisions": [
            {"name": "rev-a", "hosts": [A], "containerConcurrency": 1, "bufferDepth": 5},
            {"name": "rev-b", "hosts": [B], "containerConcurrency": 5}
        ],
        "unknownRevision": "reject", "tick": "50ms"
    })
    .to_string();
    let mut h = Host::new(Filter::built(), 2, &cfg);
    // Nothing learned yet: an unknown host is unknown, whatever its cluster.
    let early = h.request(1, "odd.test").property(CLUSTER, "ca").send();
    assert_eq!(h.reply(early).status, 404);
    // Worker 0 sees a.example.com routed to cluster `ca`.
    let holder = h.request(0, A).property(CLUSTER, "ca").send();
    assert_eq!(h.state(holder), State::Admitted);
    // Worker 1: an odd host on `ca` counts for rev-a (full: it waits), one on `cb` is unknown.
    let odd = h.request(1, "odd.test").property(CLUSTER, "ca").send();
    assert_eq!(h.state(odd), State::Paused);
    let other = h.request(1, "odd.test").property(CLUSTER, "cb").send();
    assert_eq!(h.reply(other).status, 404);
    h.finish(holder, 200);
    h.run();
    assert!(matches!(h.state(odd), State::Resumed { worker: 1, .. }));
    h.finish(odd, 200);
    assert_eq!(h.counter(&m("rev-a", "admitted")), 2);
    // b.example.com on the same cluster: `ca` is now ambiguous and no longer used.
    let b = h.request(1, B).property(CLUSTER, "ca").send();
    assert_eq!(h.state(b), State::Admitted);
    let late = h.request(0, "odd.test").property(CLUSTER, "ca").send();
    assert_eq!(h.reply(late).status, 404);
    h.finish(b, 200);
    h.advance(50);
    assert_eq!(h.gauge(&m("rev-a", "active")), 0);
    assert_eq!(h.gauge(&m("rev-b", "active")), 0);
    assert_clean(&h);
}

/// Classes through the real filter.wasm: a critical request on worker 0 takes the place of the
/// newest sheddable waiter, held by worker 2, which answers it `buffer-full` from its wake
/// queue; the freed slot then goes to the critical request before the older sheddable one, and
/// the per-class series count it all.
#[test]
fn a_critical_request_evicts_a_sheddable_waiter_held_by_another_worker() {
    let config = json!({
        "revisions": [{
            "name": "rev-a", "hosts": [A], "containerConcurrency": 1, "readyReplicas": 1,
            "bufferDepth": 2, "maxWait": "1s"
        }],
        "tick": "50ms", "retryAfter": "1s", "classHeader": "x-class"
    })
    .to_string();
    let mut h = Host::new(Filter::built(), 4, &config);
    let holder = h.request(0, A).send();
    let older = h.request(1, A).header("x-class", "sheddable").send();
    let newer = h.request(2, A).header("x-class", "sheddable").send();
    let critical = h.request(0, A).header("x-class", "critical").send();
    assert_eq!(h.state(critical), State::Paused);
    assert_shed(&h, newer, "buffer-full", "rev-a");
    assert_eq!(h.state(older), State::Paused);
    h.advance(10);
    h.finish(holder, 200);
    assert_eq!(
        h.upstream(),
        vec![critical],
        "the critical request goes first"
    );
    h.advance(10);
    h.finish(critical, 200);
    assert_eq!(h.upstream(), vec![older]);
    h.advance(10);
    h.finish(older, 200);
    h.advance(50);
    let class = |c: &str, o: &str| {
        h.counter(&format!(
            "inflight.revision.rev-a.outcome.{o}.class.{c}.class_requests_total"
        ))
    };
    assert_eq!(class("sheddable", "shed_full"), 1);
    assert_eq!(class("sheddable", "admitted"), 1);
    assert_eq!(class("critical", "admitted"), 1);
    assert_eq!(class("standard", "admitted"), 1);
    assert_eq!(h.counter(&m("rev-a", "shed_full")), 1);
    assert_eq!(h.counter(&m("rev-a", "admitted")), 3);
    assert_eq!(
        h.histogram("inflight.revision.rev-a.class.critical.class_queue_wait_ms"),
        vec![10]
    );
    for gauge in ["class_queued", "class_groups"] {
        assert_eq!(
            h.gauge(&format!("inflight.revision.rev-a.class.sheddable.{gauge}")),
            0
        );
    }
    assert_clean(&h);
}
