//! Fault injection against the real filter.wasm: CAS contention, a wake queue that no longer
//! exists, and a worker VM that dies holding admitted slots and waiters.
//!
//! Run: `cargo test -p inflight-host-tests --test emu_faults`.

use inflight_host_tests::emu::{FailurePolicy, Filter, Host, Req, State};
use serde_json::json;

const A: &str = "a.example.com";

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

fn m(what: &str) -> String {
    match what {
        "active" | "queued" | "capacity" | "queue_wait_ms" => {
            format!("inflight.revision.rev-a.{what}")
        }
        outcome => format!("inflight.revision.rev-a.outcome.{outcome}.requests_total"),
    }
}

#[test]
fn cas_storm_changes_nothing_but_the_number_of_attempts() {
    let mut h = Host::new(Filter::built(), 4, &config_a(2, 5, 1000));
    let sets_before = h.hostcall_count("proxy_set_shared_data");
    let mut rs: Vec<Req> = Vec::new();
    for i in 0..10 {
        // Every decision loses its first 3 CAS races.
        h.inject_cas_mismatch(3);
        rs.push(h.request(i % 4, A).send());
        assert_eq!(
            h.cas_mismatches_left(),
            0,
            "request {i} consumed the injected mismatches"
        );
    }
    assert_eq!(
        h.hostcall_count("proxy_set_shared_data") - sets_before,
        10 * 4
    );
    let states: Vec<State> = rs.iter().map(|r| h.state(*r)).collect();
    assert_eq!(states[..2], [State::Admitted, State::Admitted]);
    assert!(states[2..7].iter().all(|s| *s == State::Paused));
    assert!(states[7..]
        .iter()
        .all(|s| matches!(s, State::LocalReply(r) if r.status == 503)));
    while let Some(&r) = h.upstream().first() {
        h.inject_cas_mismatch(5);
        h.finish(r, 200);
        assert!(h.upstream().len() <= 2);
    }
    assert_eq!(h.resume_order(), rs[2..7].to_vec());
    h.advance(50);
    assert_eq!(h.gauge(&m("active")), 0);
    assert_eq!(h.gauge(&m("queued")), 0);
    assert_eq!(h.counter(&m("admitted")), 7);
    assert!(h.anomalies().is_empty(), "{:#?}", h.anomalies());
}

#[test]
fn cas_storm_past_the_retry_bound_sheds_with_state_unavailable() {
    let mut h = Host::new(Filter::built(), 1, &config_a(2, 5, 1000));
    h.inject_cas_mismatch(10_000);
    let r = h.request(0, A).send();
    let reply = h.reply(r);
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-inflight-shed"), Some("state-unavailable"));
    assert_eq!(h.cas_mismatches_left(), 0);
    // The next request is decided normally.
    let r = h.request(0, A).send();
    assert_eq!(h.state(r), State::Admitted);
}

/// Known limit: a release that loses 10 000 CAS races in a row is dropped (logged), and the
/// slot stays counted. Not reachable by real contention between a handful of workers.
#[test]
fn cas_storm_past_the_retry_bound_on_release_leaks_the_slot() {
    let mut h = Host::new(Filter::built(), 1, &config_a(1, 5, 1000));
    let r0 = h.request(0, A).send();
    h.inject_cas_mismatch(10_000);
    h.finish(r0, 200);
    h.advance(50);
    assert_eq!(h.gauge(&m("active")), 1, "leaked");
    assert!(
        h.logs(0).iter().any(|l| l.contains("slot leaked")),
        "{:#?}",
        h.logs(0)
    );
}

#[test]
fn grant_to_a_wake_queue_that_is_gone_passes_to_the_next_ticket() {
    let mut h = Host::new(Filter::built(), 3, &config_a(1, 5, 1000));
    let r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    let r2 = h.request(2, A).send();
    let q1 = h
        .queues()
        .into_iter()
        .find(|(_, w, _)| *w == 1)
        .map(|(name, _, _)| name)
        .unwrap();
    assert!(q1.starts_with("inflight.wake."), "{q1}");
    assert!(h.drop_queue(&q1));
    h.finish(r0, 200);
    assert_eq!(
        h.resume_order(),
        vec![r2],
        "r1's worker unreachable: slot passed on"
    );
    assert_eq!(h.state(r1), State::Paused);
    h.finish(r2, 200);
    h.advance(50);
    // r1's ticket was granted (and the grant passed on): it is no longer queued, and it holds
    // no slot, but its client still waits — until its own worker's tick sheds it.
    assert_eq!(h.gauge(&m("active")), 0);
    assert_eq!(h.gauge(&m("queued")), 0);
    h.advance(1000);
    // Its worker's tick finds the ticket gone from the FIFO ("a grant is on its way") and
    // keeps waiting for a wake that never comes: the client hangs past max wait.
    assert!(
        matches!(h.state(r1), State::LocalReply(_)),
        "r1 still {:?} at {} ms, {} ms past its max wait",
        h.state(r1),
        h.now_ms(),
        h.now_ms() - 1000
    );
}

/// A worker VM dies (Envoy: a trap kills the VM; nothing more is called on it or its streams;
/// its wake queue stays registered, so grants sent to it are lost). What the filter does:
/// - waiters on other workers are not stranded: they keep their place and are served once the
///   dead VM's slots come back (or shed at their max wait, whichever is first);
/// - survivors reclaim the dead VM's slots (its admitted streams and the grants sent to it) and
///   its waiters at their first tick after its heartbeat is older than max(5 s, 50 ticks): with
///   a 50 ms tick, at the first tick past 5 000 ms after its last beat (here t = 5 050 ms).
#[test]
fn vm_crash_with_admitted_and_waiting_streams() {
    let mut h = Host::builder(Filter::built())
        .workers(3)
        .plugin_config(config_a(2, 5, 10_000))
        .failure_policy(FailurePolicy::Closed)
        .build()
        .unwrap();
    let r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    let r2 = h.request(1, A).send();
    let r2b = h.request(1, A).send();
    let r3 = h.request(2, A).send();
    assert_eq!(h.upstream(), vec![r0, r1]);
    assert_eq!(
        (h.state(r2), h.state(r2b), h.state(r3)),
        (State::Paused, State::Paused, State::Paused)
    );
    h.advance(10);
    // Worker 1's VM last beat at t = 0 (on_configure); its first tick would have been t = 50.
    h.kill(1);
    h.finish(r0, 200); // grants r2 (oldest ticket), on the dead VM: the wake is dropped
    assert_eq!(h.dropped_events().len(), 1);
    assert_eq!(h.state(r2), State::Paused, "stranded on the dead VM");
    h.finish(r1, 200); // upstream finishes; the dead VM never sees it
    assert!(h.upstream().is_empty());
    let r4 = h.request(0, A).send();
    assert_eq!(h.state(r4), State::Paused, "FIFO: behind r2b and r3");
    // Until the bound the dead VM's 2 slots (r1's and the grant to r2) and r2b's place count.
    h.advance(4_990);
    assert_eq!(h.now_ms(), 5_000);
    assert_eq!(h.gauge(&m("active")), 2);
    assert_eq!(h.gauge(&m("queued")), 3, "r2b (dead VM), r3, r4");
    assert_eq!((h.state(r3), h.state(r4)), (State::Paused, State::Paused));
    // First tick with the heartbeat older than 5 000 ms: reclaimed, and the survivors' waiters
    // get the slots in FIFO order, on their own workers, at that tick.
    h.advance(50);
    assert_eq!(
        h.state(r3),
        State::Resumed {
            worker: 2,
            at_ms: 5_050
        }
    );
    assert_eq!(
        h.state(r4),
        State::Resumed {
            worker: 0,
            at_ms: 5_050
        }
    );
    assert_eq!(h.resume_order(), vec![r3, r4]);
    assert_eq!(
        h.state(r2b),
        State::Paused,
        "dead VM's stream: never resumed"
    );
    let logs: Vec<String> = h.logs(0).into_iter().chain(h.logs(2)).collect();
    let reclaimed: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("reclaimed 2 slot(s) and 1 waiter(s) of dead worker VM(s)"))
        .collect();
    assert_eq!(reclaimed.len(), 1, "one survivor reclaims, once: {logs:#?}");
    h.advance(50);
    assert_eq!(h.gauge(&m("active")), 2, "r3 and r4");
    assert_eq!(h.gauge(&m("queued")), 0);
    h.finish(r3, 200);
    h.finish(r4, 200);
    h.advance(50);
    assert_eq!(h.gauge(&m("active")), 0, "nothing leaked");
    assert_eq!(
        h.counter(&m("admitted")),
        4,
        "r0, r1, r3, r4 (r2's grant died with its VM)"
    );
    // Full capacity again: two new requests go straight upstream.
    let r5 = h.request(0, A).send();
    let r6 = h.request(2, A).send();
    assert_eq!(
        (h.state(r5), h.state(r6)),
        (State::Admitted, State::Admitted)
    );
    // Requests on the dead worker: fail closed (the host answers).
    let r7 = h.request(1, A).send();
    assert_eq!(h.reply(r7).details, "wasm_fail_stream");
    assert!(h.anomalies().is_empty(), "{:#?}", h.anomalies());
}

/// A survivor that is merely slow is not reaped: a VM that keeps beating keeps its slots,
/// however long its streams last.
#[test]
fn a_live_vm_holding_slots_for_long_is_not_reaped() {
    let mut h = Host::new(Filter::built(), 2, &config_a(1, 5, 60_000));
    let r0 = h.request(1, A).send();
    let r1 = h.request(0, A).send();
    h.advance(30_000);
    assert_eq!(
        h.state(r1),
        State::Paused,
        "still waiting: the slot is really held"
    );
    assert_eq!(h.gauge(&m("active")), 1);
    assert!(
        !h.logs(0).iter().any(|l| l.contains("reclaimed")),
        "{:#?}",
        h.logs(0)
    );
    h.finish(r0, 200);
    assert!(matches!(h.state(r1), State::Resumed { worker: 0, .. }));
}

/// The bound follows the tick: with a 200 ms tick, 50 ticks (10 s) is above the 5 s floor.
#[test]
fn vm_crash_reclaim_bound_is_fifty_ticks_when_that_exceeds_five_seconds() {
    let config = json!({
        "revisions": [{
            "name": "rev-a", "hosts": [A], "containerConcurrency": 1, "readyReplicas": 1,
            "bufferDepth": 5, "maxWait": "60s"
        }],
        "tick": "200ms"
    })
    .to_string();
    let mut h = Host::new(Filter::built(), 2, &config);
    let _r0 = h.request(1, A).send();
    let r1 = h.request(0, A).send();
    h.kill(1);
    h.advance(10_000);
    assert_eq!(
        h.state(r1),
        State::Paused,
        "heartbeat age 10 000 ms: not above the bound"
    );
    h.advance(200);
    assert_eq!(
        h.state(r1),
        State::Resumed {
            worker: 0,
            at_ms: 10_200
        }
    );
}

#[test]
fn dead_vms_waiters_are_reaped_after_the_orphan_age() {
    let mut h = Host::new(Filter::built(), 2, &config_a(1, 5, 1000));
    let r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    h.kill(1);
    h.advance(50);
    assert_eq!(h.gauge(&m("queued")), 1);
    h.advance(6000);
    // Its heartbeat stopped: the survivor reclaims its waiter once the heartbeat is older than
    // 5 s (before the orphan-age fallback at max wait + 5 s would); the gauge shows it a tick later.
    h.advance(50);
    assert_eq!(h.gauge(&m("queued")), 0, "reaped");
    assert!(
        h.logs(0)
            .iter()
            .any(|l| l.contains("reclaimed 0 slot(s) and 1 waiter(s) of dead worker VM(s)")),
        "{:#?}",
        h.logs(0)
    );
    h.finish(r0, 200);
    h.advance(50);
    assert_eq!(
        h.gauge(&m("active")),
        0,
        "no grant went to the reaped waiter"
    );
    assert_eq!(
        h.state(r1),
        State::Paused,
        "its client waits until Envoy's idle timeout"
    );
}

#[test]
fn trap_in_a_host_call_kills_only_that_vm() {
    let mut h = Host::new(Filter::built(), 2, &config_a(1, 5, 1000));
    let r0 = h.request(0, A).send();
    let r1 = h.request(1, A).send();
    h.inject_trap(Some(1), "proxy_continue_stream", 0);
    h.finish(r0, 200);
    let traps = h.traps();
    assert_eq!(traps.len(), 1);
    assert_eq!(traps[0].worker, 1);
    assert!(
        traps[0].message.contains("proxy_continue_stream"),
        "{traps:?}"
    );
    assert!(!h.is_alive(1));
    assert_eq!(h.state(r1), State::Paused);
    // Worker 0 still decides; the slot granted to r1 is held by the dead VM until a survivor
    // reclaims it (heartbeat bound, see vm_crash_with_admitted_and_waiting_streams).
    let r2 = h.request(0, A).send();
    assert_eq!(h.state(r2), State::Paused);
    // FAIL_RELOAD: the next request on worker 1 gets a fresh VM with a new wake queue.
    let r3 = h.request(1, A).send();
    assert!(h.is_alive(1));
    assert_eq!(h.generation(1), 1);
    assert_eq!(h.state(r3), State::Paused);
    assert_eq!(h.queues().len(), 3, "{:?}", h.queues());
}
