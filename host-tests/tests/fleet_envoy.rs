//! A fleet of real gateway Envoys (docs/fleet.md, issue #15): several gateways split every
//! pod's `containerConcurrency`, behind an L4 Envoy or with clients straight on one gateway.
//! Each test upstream records what it holds at every instant (its timeline), so "every pod
//! ≤ cc" is measured at the pods, across the whole fleet, throughout.
//!
//! Timing of these configs: membership (and reports) every 200 ms with a 500 ms timeout, tick
//! 50 ms, `lostAfter` its default (3 intervals, 600 ms). A gateway raises a cap only once its
//! view of the fleet stood for `settle` = fresh + 2 timeouts + 1 interval, fresh = 2 intervals
//! + 1 timeout (core `fleet::Timing::for_poll`): 900 ms fresh, 2.1 s settle.
//!
//! Needs `.venv/bin/envoy` (`make setup`); builds filter.wasm itself. One scenario at a time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::fleet::{
    self, first_at_least, max_between, spread, Fleet, Load, Outcome, Revision, Spec, Tally,
};
use inflight_host_tests::upstream::{Group, Upstream};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const POLL: Duration = Duration::from_millis(200);
const POLL_TIMEOUT: Duration = Duration::from_millis(500);
const TICK: Duration = Duration::from_millis(50);
/// `fleet.lostAfter`'s default: 3 membership intervals.
const LOST_AFTER: Duration = Duration::from_millis(600);
/// How long a new view of the fleet must stand before a cap rises (module docs).
const SETTLE: Duration = Duration::from_millis(2 * 200 + 500 + 2 * 500 + 200);
/// Long enough for a fleet to start and settle on a loaded machine.
const READY: Duration = Duration::from_secs(20);

fn upstreams(n: usize, group: &Arc<Group>) -> Vec<Arc<Upstream>> {
    (0..n)
        .map(|_| Arc::new(Upstream::start_in(Some(Arc::clone(group))).unwrap()))
        .collect()
}

fn ports(ups: &[Arc<Upstream>]) -> Vec<u16> {
    ups.iter().map(|u| u.port()).collect()
}

/// Each gateway learns its own peer address from node metadata `INFLIGHT_FLEET_SELF`, as
/// `inflight up --gateways N` sets it.
fn spec(gateways: usize, revision: Revision) -> Spec {
    Spec {
        workers: 2,
        poll: POLL,
        poll_timeout: POLL_TIMEOUT,
        tick: TICK,
        ..Spec::new(gateways, vec![revision])
    }
}

/// Starts the fleet and waits until every gateway knows the endpoints and the fleet, and the
/// gateways' caps add up to every slot.
fn start(spec: Spec) -> Fleet {
    let slots: u64 = spec
        .revisions
        .iter()
        .map(|r| u64::from(r.cc) * r.ports.len() as u64)
        .sum();
    let name = spec.revisions[0].name.clone();
    let in_fleet = spec.fleet.is_some();
    let fleet = Fleet::start(spec).expect("start the fleet");
    let n = if in_fleet { fleet.len() } else { 1 };
    fleet.wait_ready(&fleet.all(), n).unwrap();
    if in_fleet {
        let caps = fleet
            .wait_capacity(&fleet.all(), &name, slots, READY)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.log_tails(30)));
        eprintln!("settled: caps per gateway {caps:?}");
    }
    fleet
}

fn maxima(ups: &[Arc<Upstream>]) -> Vec<u32> {
    ups.iter().map(|u| u.max_concurrency()).collect()
}

/// Per gateway: `inflight_requests_total` by outcome, for the log.
fn outcomes(fleet: &Fleet, revision: &str) -> Vec<String> {
    fleet
        .all()
        .iter()
        .map(|&i| match fleet.stats(i) {
            Ok(s) => {
                let mut v: Vec<String> = s
                    .samples
                    .iter()
                    .filter(|x| {
                        x.name == "inflight_requests_total"
                            && x.labels
                                .iter()
                                .any(|(k, v)| k == "revision" && v == revision)
                            && x.value > 0.0
                    })
                    .map(|x| {
                        let o = x
                            .labels
                            .iter()
                            .find(|(k, _)| k == "outcome")
                            .map_or("?", |(_, v)| v.as_str());
                        format!("{o}={}", x.value)
                    })
                    .collect();
                v.sort();
                format!("gateway {i}: {}", v.join(" "))
            }
            Err(e) => format!("gateway {i}: {e}"),
        })
        .collect()
}

fn assert_all_ok(what: &str, out: &[Outcome]) {
    let t = Tally::of(out);
    let bad: Vec<&Outcome> = out.iter().filter(|o| o.status != 200).take(5).collect();
    assert_eq!(t.ok, t.total(), "{what}: {t:?}; e.g. {bad:?}");
}

#[test]
fn the_fleet_bootstraps_are_valid_envoy_configs() {
    let spec = spec(3, Revision::new("rev-a", "a.test", 4, vec![1, 2]));
    fleet::validate(&spec).unwrap();
}

/// The control: three gateways without `fleet` each allow cc per pod, so the pods see more
/// than cc — what the fleet exists to prevent, and proof that the recording catches it.
#[test]
fn without_the_fleet_three_gateways_overrun_each_pod() {
    let _g = serial();
    let group = Group::new();
    let ups = upstreams(2, &group);
    let mut spec = spec(3, Revision::new("rev-a", "a.test", 4, ports(&ups)));
    spec.fleet = None;
    let fleet = start(spec);
    let mut addrs = vec![fleet.front().unwrap(); 30];
    for i in 0..3 {
        addrs.extend(std::iter::repeat_n(fleet.public(i), 10));
    }
    let load = Load::start(
        &addrs,
        "a.test",
        Duration::from_millis(20),
        Duration::from_secs(10),
    );
    thread::sleep(Duration::from_secs(2));
    let out = load.finish();
    assert_all_ok("without fleet", &out);
    eprintln!(
        "without fleet: {} requests, per endpoint max {:?}, revision max {}",
        out.len(),
        maxima(&ups),
        group.max_concurrency()
    );
    assert!(
        maxima(&ups).iter().any(|&m| m > 4),
        "three lone gateways let a pod above cc 4: {:?}",
        maxima(&ups)
    );
}

/// 3 gateways, 2 endpoints at cc 4, 60 clients spread by the L4 Envoy: every endpoint at most
/// 4 at every instant, and 4 reached; the revision at most 8; every request answered 200.
#[test]
fn three_gateways_hold_every_endpoint_at_cc_behind_the_l4_envoy() {
    let _g = serial();
    let group = Group::new();
    let ups = upstreams(2, &group);
    let fleet = start(spec(3, Revision::new("rev-a", "a.test", 4, ports(&ups))));
    let load = Load::start(
        &vec![fleet.front().unwrap(); 60],
        "a.test",
        Duration::from_millis(20),
        Duration::from_secs(30),
    );
    thread::sleep(Duration::from_secs(3));
    let out = load.finish();
    let max = maxima(&ups);
    eprintln!(
        "3 gateways, 2 × cc 4, 60 clients via L4: {} requests, {:?}; per endpoint max {max:?}, revision max {}; {:?}",
        out.len(),
        Tally::of(&out),
        group.max_concurrency(),
        outcomes(&fleet, "rev-a")
    );
    assert_all_ok("through the L4 Envoy", &out);
    assert_eq!(max, vec![4, 4], "each endpoint at most cc = 4, and reached");
    assert!(group.max_concurrency() <= 8, "the revision at most 2 × 4");
}

/// cc 1, one endpoint, 3 gateways, clients on every gateway: two gateways own no slot and
/// forward; every request is served (none shed, none timed out), the endpoint never holds 2.
#[test]
fn one_slot_serves_clients_of_every_gateway() {
    let _g = serial();
    let group = Group::new();
    let ups = upstreams(1, &group);
    // 12 clients holding 20 ms on one slot: each waits about 240 ms; 10 s is generous.
    let fleet = start(Spec {
        max_wait: Duration::from_secs(10),
        ..spec(3, Revision::new("rev-a", "a.test", 1, ports(&ups)))
    });
    let publics: Vec<SocketAddr> = (0..3).map(|i| fleet.public(i)).collect();
    let load = Load::start(
        &spread(&publics, &[4, 4, 4]),
        "a.test",
        Duration::from_millis(20),
        Duration::from_secs(15),
    );
    thread::sleep(Duration::from_secs(3));
    let out = load.finish();
    let per_gateway: Vec<Tally> = (0..3)
        .map(|g| Tally::of(out.iter().filter(|o| o.client / 4 == g)))
        .collect();
    let slowest = out.iter().map(|o| o.elapsed).max().unwrap_or_default();
    eprintln!(
        "cc 1, 3 gateways, 4 clients each: {} requests, per gateway {:?}, slowest {slowest:?}, endpoint max {}; {:?}",
        out.len(),
        per_gateway.iter().map(|t| t.ok).collect::<Vec<_>>(),
        ups[0].max_concurrency(),
        outcomes(&fleet, "rev-a")
    );
    assert_all_ok("cc 1 across 3 gateways", &out);
    assert!(
        per_gateway.iter().all(|t| t.ok > 0),
        "clients of every gateway were served: {per_gateway:?}"
    );
    assert_eq!(ups[0].max_concurrency(), 1, "the endpoint never held 2");
}

/// A gateway killed with SIGKILL under load: its slots serve the others within the bound the
/// design gives (its reports fail from the next poll; lost `lostAfter` later at a poll; the
/// survivors' new view settles; the next tick raises the caps); nothing above cc ever, also
/// once it is back on the same addresses; no request hangs.
#[test]
fn a_killed_gateway_s_slots_serve_the_others_and_its_return_keeps_the_limit() {
    let _g = serial();
    const CC: u32 = 6;
    let hold = Duration::from_millis(50);
    let client_timeout = Duration::from_secs(40);
    let group = Group::new();
    let ups = upstreams(1, &group);
    let mut fleet = start(spec(3, Revision::new("rev-a", "a.test", CC, ports(&ups))));
    let survivors = Load::start(
        &spread(&[fleet.public(0), fleet.public(1)], &[6, 6]),
        "a.test",
        hold,
        client_timeout,
    );
    let victims = Load::start(&[fleet.public(2); 6], "a.test", hold, client_timeout);
    thread::sleep(Duration::from_millis(1500));
    let before = Instant::now();
    victims.stop();
    fleet.kill(2);
    let killed_at = Instant::now();
    eprintln!(
        "killed gateway 2 ({} since the stop)",
        (killed_at - before).as_millis()
    );
    // The dead gateway's requests at the pod end after `hold`: from then on, only the
    // survivors' caps (2 + 2 of 6 until they take gateway 2's share) fill the pod.
    let bound = LOST_AFTER + 2 * POLL + SETTLE + TICK;
    let slack = Duration::from_secs(1);
    let deadline = killed_at + bound + slack + Duration::from_secs(5);
    let recovered = loop {
        let tl = ups[0].timeline();
        if let Some(t) = first_at_least(&tl, killed_at + hold + Duration::from_millis(30), CC) {
            break Some(t);
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let victims_out = victims.finish();
    let took = recovered.map(|t| t - killed_at);
    eprintln!(
        "after SIGKILL: survivors filled the pod ({CC}) again after {took:?} (bound {bound:?} + {slack:?} slack); gateway 2's clients: {:?}; {:?}",
        Tally::of(&victims_out),
        outcomes(&fleet, "rev-a")
    );
    let took = took.unwrap_or_else(|| {
        panic!(
            "the survivors never took the dead gateway's slots\n{}",
            fleet.log_tails(40)
        )
    });
    assert!(
        took <= bound + slack,
        "slots of the dead gateway reused after {took:?}; bound {bound:?} + {slack:?}"
    );
    thread::sleep(Duration::from_millis(500));
    let back_at = Instant::now();
    fleet.restart(2).unwrap();
    eprintln!(
        "gateway 2 LIVE again on the same addresses after {:?}",
        back_at.elapsed()
    );
    let returned = Load::start(&[fleet.public(2); 6], "a.test", hold, client_timeout);
    fleet.wait_ready(&[2], 3).unwrap();
    let caps = fleet
        .wait_caps(&fleet.all(), "rev-a", READY, "2 each", |c| c == [2, 2, 2])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", fleet.log_tails(30)));
    eprintln!(
        "the fleet of 3 settled again {:?} after the restart: caps {caps:?}",
        back_at.elapsed()
    );
    thread::sleep(Duration::from_secs(1));
    let returned_out = returned.finish();
    let survivors_out = survivors.finish();
    let tl = ups[0].timeline();
    eprintln!(
        "returned gateway's clients {:?}; survivors' clients {:?}; pod max before the kill {}, kill..restart {}, after the restart {}; {:?}",
        Tally::of(&returned_out),
        Tally::of(&survivors_out),
        max_between(&tl, before - Duration::from_secs(60), killed_at),
        max_between(&tl, killed_at, back_at),
        max_between(&tl, back_at, Instant::now()),
        outcomes(&fleet, "rev-a")
    );
    assert_eq!(
        ups[0].max_concurrency(),
        CC,
        "the pod held at most cc = {CC} at every instant, and was full"
    );
    assert_eq!(
        max_between(&tl, back_at, Instant::now()),
        CC,
        "full, and never above, with the gateway back"
    );
    let hung: Vec<&Outcome> = victims_out
        .iter()
        .chain(&survivors_out)
        .chain(&returned_out)
        .filter(|o| o.timed_out)
        .collect();
    assert!(hung.is_empty(), "requests hung: {hung:?}");
    assert_all_ok("the survivors' clients", &survivors_out);
    assert_all_ok("the returned gateway's clients", &returned_out);
}

/// A pod added and another removed gracefully (listed draining, then gone; then added back)
/// while the fleet serves under load, each change seen by each gateway when its Envoy reads the
/// EDS file and its next poll: no endpoint ever holds more than cc, and every request is
/// answered 200. (Removed abruptly, a request picked for the pod before the filter's next poll
/// goes to another pod through override_host's least-request fallback: docs/deploy.md.)
#[test]
fn pods_added_and_removed_under_load_never_exceed_cc() {
    pods_churn(3);
}

/// The same churn on one gateway alone (no `fleet`): a fleet of one behaves as before.
#[test]
fn pods_added_and_removed_under_load_never_exceed_cc_on_one_gateway() {
    pods_churn(1);
}

/// 2 pods at cc 3, 24 clients holding 200 ms through the L4 Envoy (or on the one gateway);
/// pod c added, pod a drained and removed, pod a back at once.
fn pods_churn(gateways: usize) {
    let _g = serial();
    const CC: u32 = 3;
    let group = Group::new();
    let ups = upstreams(3, &group);
    let mut sp = spec(
        gateways,
        Revision::new("rev-a", "a.test", CC, ports(&ups[..2])),
    );
    if gateways == 1 {
        sp.fleet = None;
    }
    let fleet = start(sp);
    let load = Load::start(
        &vec![fleet.front().unwrap(); 24],
        "a.test",
        Duration::from_millis(200),
        Duration::from_secs(40),
    );
    let ready = |n: u64| {
        fleet
            .wait_stats(&fleet.all(), READY, &format!("{n} ready"), |_, s| {
                s.gauge("inflight_ready_replicas", "rev-a") == n
            })
            .unwrap();
    };
    let p = ports(&ups);
    let started = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    fleet.set_endpoints("rev-a", &p).unwrap();
    ready(3);
    eprintln!("pod c added: every gateway sees 3 after {:?}", t0.elapsed());
    thread::sleep(Duration::from_secs(1));
    // Pod a leaves gracefully, as `inflight up` removes a replica: listed DRAINING until every
    // gateway's filter has seen it draining (it picks it no more; Envoy still routes a pick made
    // just before to it), then removed.
    let t1 = Instant::now();
    fleet
        .set_endpoints_draining("rev-a", &p[1..], &p[..1])
        .unwrap();
    ready(2);
    thread::sleep(Duration::from_millis(300));
    fleet.set_endpoints("rev-a", &p[1..]).unwrap();
    eprintln!(
        "pod a removed: every gateway sees 2 after {:?}",
        t1.elapsed()
    );
    // Back at once: requests the gateways sent before the removal may still run on it.
    let t2 = Instant::now();
    fleet.set_endpoints("rev-a", &p).unwrap();
    ready(3);
    thread::sleep(Duration::from_secs(1));
    let out = load.finish();
    let max = maxima(&ups);
    eprintln!(
        "pods added and removed: {} requests, {:?}, per endpoint max {max:?} (totals {:?}); {:?}",
        out.len(),
        Tally::of(&out),
        ups.iter().map(|u| u.total()).collect::<Vec<_>>(),
        outcomes(&fleet, "rev-a")
    );
    let events = [("c added", t0), ("a removed", t1), ("a back", t2)];
    let over: Vec<String> = ups
        .iter()
        .enumerate()
        .filter_map(|(i, u)| {
            let at = first_at_least(&u.timeline(), started, CC + 1)?;
            let when: Vec<String> = events
                .iter()
                .map(|(e, t)| {
                    format!(
                        "{:+}ms after {e}",
                        at.duration_since(*t.min(&at)).as_millis() as i64
                            - t.duration_since(at.min(*t)).as_millis() as i64
                    )
                })
                .collect();
            Some(format!("endpoint {i} above {CC} at {}", when.join(", ")))
        })
        .collect();
    let mismatches: Vec<u64> = fleet
        .all()
        .iter()
        .map(|&i| {
            fleet
                .stats(i)
                .map(|s| s.get("inflight_endpoint_mismatch_total", &[("revision", "rev-a")]) as u64)
                .unwrap_or(0)
        })
        .collect();
    assert!(
        max.iter().all(|&m| m <= CC),
        "every endpoint at most cc = {CC} throughout: {max:?}; {over:?}; Envoy routed elsewhere than picked (per gateway): {mismatches:?}"
    );
    assert_eq!(max[2], CC, "the added pod was filled to cc");
    assert_all_ok("through pod churn", &out);
}

/// Goodput of a fleet of 3 with clients spread 70/20/10 % straight on the gateways, against
/// one gateway with the same endpoints' capacity and all the clients, measured in alternating
/// windows in one run (BENCHMARKS.md). A benchmark: printed, with only a generous sanity bound.
#[test]
fn uneven_spread_goodput_against_one_gateway() {
    let _g = serial();
    const CC: u32 = 6;
    let hold = Duration::from_millis(50);
    let window = Duration::from_millis(2500);
    let fleet_group = Group::new();
    let fleet_ups = upstreams(2, &fleet_group);
    let one_group = Group::new();
    let one_ups = upstreams(2, &one_group);
    let fleet = start(spec(
        3,
        Revision::new("rev-a", "a.test", CC, ports(&fleet_ups)),
    ));
    let mut one_spec = spec(1, Revision::new("rev-a", "a.test", CC, ports(&one_ups)));
    one_spec.fleet = None;
    one_spec.l4 = false;
    let one = start(one_spec);
    let publics: Vec<SocketAddr> = (0..3).map(|i| fleet.public(i)).collect();
    let fleet_clients = spread(&publics, &[21, 6, 3]);
    let one_clients = vec![one.public(0); 30];
    let measure = |addrs: &[SocketAddr]| {
        let load = Load::start(addrs, "a.test", hold, Duration::from_secs(30));
        // Warm-up, then the window.
        thread::sleep(Duration::from_millis(300));
        let from = Instant::now();
        thread::sleep(window);
        let to = Instant::now();
        let out = load.finish();
        let ok = out
            .iter()
            .filter(|o| o.status == 200 && o.started >= from && o.started + o.elapsed <= to)
            .count();
        (ok as f64 / (to - from).as_secs_f64(), Tally::of(&out))
    };
    let mut fleet_rps = Vec::new();
    let mut one_rps = Vec::new();
    for _ in 0..2 {
        let (f, ft) = measure(&fleet_clients);
        let (o, ot) = measure(&one_clients);
        assert_eq!(ft.ok, ft.total(), "fleet: {ft:?}");
        assert_eq!(ot.ok, ot.total(), "one gateway: {ot:?}");
        fleet_rps.push(f);
        one_rps.push(o);
    }
    let f = fleet_rps.iter().sum::<f64>() / fleet_rps.len() as f64;
    let o = one_rps.iter().sum::<f64>() / one_rps.len() as f64;
    let ideal = f64::from(2 * CC) / hold.as_secs_f64();
    eprintln!(
        "uneven spread 70/20/10 % of 30 clients on 3 gateways: {f:.0} req/s {fleet_rps:.0?}; one gateway, same capacity (2 × cc {CC}, hold {hold:?}, ideal {ideal:.0} req/s): {o:.0} req/s {one_rps:.0?}; goodput ratio fleet/one = {:.3}; per endpoint max fleet {:?}, one {:?}; {:?}",
        f / o,
        maxima(&fleet_ups),
        maxima(&one_ups),
        outcomes(&fleet, "rev-a")
    );
    assert!(
        maxima(&fleet_ups).iter().all(|&m| m <= CC),
        "{:?}",
        maxima(&fleet_ups)
    );
    assert!(f / o > 0.5, "sanity: the fleet's goodput {f:.0} vs {o:.0}");
}
