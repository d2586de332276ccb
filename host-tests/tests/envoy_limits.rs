//! The filter in real Envoy (`--concurrency 4`: more workers than cores, so cross-worker grants
//! really happen): exact limits, FIFO, sheds, timeouts, cancellation, releases on errors,
//! independent revisions, and gauges back to 0 after every scenario.
//!
//! Needs `.venv/bin/envoy` (`make setup`); builds filter.wasm itself. Scenarios run one at a
//! time (a lock), since each starts its own Envoy with four workers on a two-core machine.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::client::{Request, Response};
use inflight_host_tests::envoy::{self, Cluster, Envoy, Gateway, Stats};
use inflight_host_tests::upstream::Upstream;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const WORKERS: u32 = 4;
const TICK_MS: u64 = 50;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn gateway(
    plugin_config: serde_json::Value,
    clusters: Vec<(&str, Vec<&Upstream>)>,
    routes: &[(&str, &str)],
) -> Envoy {
    let g = Gateway {
        plugin_config: plugin_config.to_string(),
        routes: routes
            .iter()
            .map(|(d, c)| (d.to_string(), c.to_string()))
            .collect(),
        clusters: clusters
            .into_iter()
            .map(|(name, ups)| Cluster::fixed(name, ups.iter().map(|u| u.port()).collect()))
            .collect(),
        wasm: envoy::filter_wasm(),
        admin_port: None,
    };
    Envoy::start(&g.yaml(), WORKERS).expect("start envoy")
}

fn one_revision(cc: u32, buffer: Option<u32>, max_wait: &str) -> serde_json::Value {
    let mut rev = serde_json::json!({
        "name": "rev-a", "hosts": ["a.test"], "containerConcurrency": cc, "target": 10,
        "maxWait": max_wait,
    });
    if let Some(b) = buffer {
        rev["bufferDepth"] = b.into();
    }
    serde_json::json!({ "revisions": [rev], "tick": format!("{TICK_MS}ms") })
}

/// Waits until the revision's gauges are back to 0 (refreshed every tick).
fn assert_drained(envoy: &Envoy, revision: &str) -> Stats {
    envoy
        .wait_stats(Duration::from_secs(5), "active and queued back to 0", |s| {
            s.gauge("inflight_active", revision) == 0 && s.gauge("inflight_queued", revision) == 0
        })
        .expect("no leaked slot or waiter")
}

fn wait_queued(envoy: &Envoy, revision: &str, n: u64) -> Stats {
    envoy
        .wait_stats(Duration::from_secs(10), &format!("{n} queued"), |s| {
            s.gauge("inflight_queued", revision) == n
        })
        .expect("queued")
}

fn spawn_requests(
    n: usize,
    make: impl Fn(usize) -> Request + Send + Sync + 'static,
) -> Vec<thread::JoinHandle<Response>> {
    let make = std::sync::Arc::new(make);
    (0..n)
        .map(|i| {
            let make = std::sync::Arc::clone(&make);
            thread::spawn(move || make(i).send().expect("request answered"))
        })
        .collect()
}

fn join(handles: Vec<thread::JoinHandle<Response>>) -> Vec<Response> {
    handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect()
}

#[test]
fn exact_limit_with_200_concurrent_clients() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let envoy = gateway(
        one_revision(10, Some(1000), "60s"),
        vec![("a", vec![&up])],
        &[],
    );
    let addr = envoy.listener;
    let started = Instant::now();
    let responses = join(spawn_requests(200, move |i| {
        Request::get(addr, "a.test")
            .header("x-hold-ms", 50)
            .header("x-id", i)
    }));
    let ok = responses.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, 200, "every client gets 200");
    assert_eq!(
        up.max_concurrency(),
        10,
        "upstream saw exactly cc=10 at most, and reached it"
    );
    assert_eq!(up.total(), 200);
    let s = assert_drained(&envoy, "rev-a");
    assert_eq!(s.outcome("rev-a", "admitted"), 200);
    assert_eq!(s.outcome("rev-a", "shed_full"), 0);
    assert_eq!(s.gauge("inflight_capacity", "rev-a"), 10);
    eprintln!(
        "exact_limit: 200 requests in {:?}, upstream max concurrency {}",
        started.elapsed(),
        up.max_concurrency()
    );
}

#[test]
fn small_buffer_sheds_exactly_the_overflow() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let envoy = gateway(one_revision(2, Some(5), "60s"), vec![("a", vec![&up])], &[]);
    let addr = envoy.listener;
    let handles = spawn_requests(20, move |i| {
        Request::get(addr, "a.test")
            .header("x-gate", 1)
            .header("x-id", i)
    });
    // 2 admitted and held at the gate, 5 waiting, 13 shed at once.
    envoy
        .wait_stats(Duration::from_secs(10), "13 shed and 5 queued", |s| {
            s.outcome("rev-a", "shed_full") == 13 && s.gauge("inflight_queued", "rev-a") == 5
        })
        .unwrap();
    assert_eq!(up.current(), 2);
    up.open_gate();
    let responses = join(handles);
    let shed: Vec<&Response> = responses.iter().filter(|r| r.status == 503).collect();
    assert_eq!(shed.len(), 13, "exactly the overflow is shed");
    assert_eq!(responses.iter().filter(|r| r.status == 200).count(), 7);
    for r in &shed {
        assert_eq!(r.header("x-inflight-shed"), Some("buffer-full"));
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(
            r.body.contains("rev-a") && r.body.contains("full"),
            "body says why: {}",
            r.body
        );
    }
    assert_eq!(up.max_concurrency(), 2);
    let s = assert_drained(&envoy, "rev-a");
    assert_eq!(
        (
            s.outcome("rev-a", "admitted"),
            s.outcome("rev-a", "shed_full")
        ),
        (7, 13)
    );
    eprintln!(
        "small_buffer: shed {} (expected 13), upstream max {}",
        shed.len(),
        up.max_concurrency()
    );
}

#[test]
fn waiters_past_max_wait_get_503_timeout() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let max_wait_ms = 500;
    let envoy = gateway(
        one_revision(1, Some(10), "500ms"),
        vec![("a", vec![&up])],
        &[],
    );
    let addr = envoy.listener;
    let holder = Request::get(addr, "a.test")
        .header("x-gate", 1)
        .start()
        .unwrap();
    envoy
        .wait_stats(Duration::from_secs(5), "holder admitted", |s| {
            s.outcome("rev-a", "admitted") == 1
        })
        .unwrap();
    let waiters = join(spawn_requests(5, move |_| Request::get(addr, "a.test")));
    for r in &waiters {
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-inflight-shed"), Some("wait-timeout"));
        let ms = r.elapsed.as_millis() as u64;
        // Within max wait + one tick, plus 250 ms for process scheduling on a loaded 2-core box
        // (typically 510–560 ms here: see the eprintln below).
        assert!(
            ms >= max_wait_ms,
            "shed after {ms} ms, before the maximum wait"
        );
        assert!(
            ms <= max_wait_ms + TICK_MS + 250,
            "shed after {ms} ms, later than wait + tick"
        );
    }
    up.open_gate();
    assert_eq!(holder.wait().unwrap().status, 200);
    let s = assert_drained(&envoy, "rev-a");
    assert_eq!(s.outcome("rev-a", "shed_timeout"), 5);
    assert_eq!(up.total(), 1, "no timed-out waiter reached the upstream");
    let worst = waiters
        .iter()
        .map(|r| r.elapsed.as_millis())
        .max()
        .unwrap_or(0);
    eprintln!("timeouts: 5 shed, latest after {worst} ms (max wait {max_wait_ms}, tick {TICK_MS})");
}

#[test]
fn clients_that_leave_while_waiting_consume_no_slot() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let envoy = gateway(
        one_revision(1, Some(10), "60s"),
        vec![("a", vec![&up])],
        &[],
    );
    let addr = envoy.listener;
    let holder = Request::get(addr, "a.test")
        .header("x-gate", 1)
        .start()
        .unwrap();
    envoy
        .wait_stats(Duration::from_secs(5), "holder admitted", |s| {
            s.outcome("rev-a", "admitted") == 1
        })
        .unwrap();
    let mut waiting: Vec<_> = (0..5)
        .map(|i| {
            Request::get(addr, "a.test")
                .header("x-id", i)
                .start()
                .unwrap()
        })
        .collect();
    wait_queued(&envoy, "rev-a", 5);
    // Three clients give up.
    let keep: Vec<_> = waiting.drain(..2).collect();
    drop(waiting);
    envoy
        .wait_stats(Duration::from_secs(5), "3 cancelled, 2 queued", |s| {
            s.outcome("rev-a", "cancelled") == 3 && s.gauge("inflight_queued", "rev-a") == 2
        })
        .unwrap();
    up.open_gate();
    assert_eq!(holder.wait().unwrap().status, 200);
    for p in keep {
        assert_eq!(p.wait().unwrap().status, 200);
    }
    let s = assert_drained(&envoy, "rev-a");
    assert_eq!(
        up.total(),
        3,
        "cancelled waiters never reached the upstream"
    );
    assert_eq!(
        (
            s.outcome("rev-a", "admitted"),
            s.outcome("rev-a", "cancelled")
        ),
        (3, 3)
    );
}

#[test]
fn waiters_reach_the_upstream_in_fifo_order_across_workers() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let envoy = gateway(
        one_revision(1, Some(50), "60s"),
        vec![("a", vec![&up])],
        &[],
    );
    let addr = envoy.listener;
    let holder = Request::get(addr, "a.test")
        .header("x-gate", 1)
        .header("x-id", "holder")
        .start()
        .unwrap();
    envoy
        .wait_stats(Duration::from_secs(5), "holder admitted", |s| {
            s.outcome("rev-a", "admitted") == 1
        })
        .unwrap();
    // One connection each (the kernel spreads them over the four workers); each joins the queue
    // only after the previous one is queued, so ticket order is known.
    let mut pending = Vec::new();
    for i in 0..12 {
        pending.push(
            Request::get(addr, "a.test")
                .header("x-id", i)
                .header("x-hold-ms", 5)
                .start()
                .unwrap(),
        );
        wait_queued(&envoy, "rev-a", i + 1);
    }
    up.open_gate();
    assert_eq!(holder.wait().unwrap().status, 200);
    for p in pending {
        assert_eq!(p.wait().unwrap().status, 200);
    }
    let expected: Vec<String> = std::iter::once("holder".to_string())
        .chain((0..12).map(|i| i.to_string()))
        .collect();
    assert_eq!(up.arrivals(), expected, "strict FIFO");
    assert_eq!(up.max_concurrency(), 1);
    let s = assert_drained(&envoy, "rev-a");
    assert_eq!(s.outcome("rev-a", "admitted"), 13);
    // The wakes crossed workers: more than one VM registered a wake queue and served waiters.
    assert!(envoy.log().matches("configured 1 revision").count() >= WORKERS as usize);
}

#[test]
fn upstream_errors_and_resets_release_their_slots() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let envoy = gateway(
        one_revision(2, Some(100), "60s"),
        vec![("a", vec![&up])],
        &[],
    );
    let addr = envoy.listener;
    let errors = join(spawn_requests(20, move |_| {
        Request::get(addr, "a.test")
            .header("x-status", 500)
            .header("x-hold-ms", 10)
    }));
    assert!(errors.iter().all(|r| r.status == 500));
    let resets = join(spawn_requests(20, move |_| {
        Request::get(addr, "a.test")
            .header("x-reset", 1)
            .header("x-hold-ms", 10)
    }));
    // Envoy answers an upstream reset itself (502/503).
    assert!(
        resets.iter().all(|r| r.status == 502 || r.status == 503),
        "{:?}",
        resets.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(
        resets.iter().all(|r| r.header("x-inflight-shed").is_none()),
        "not shed by us"
    );
    let s = assert_drained(&envoy, "rev-a");
    assert_eq!(s.outcome("rev-a", "admitted"), 40);
    // The slots came back: the next wave is served at full capacity.
    let ok = join(spawn_requests(10, move |_| {
        Request::get(addr, "a.test").header("x-hold-ms", 20)
    }));
    assert!(ok.iter().all(|r| r.status == 200));
    assert_eq!(up.max_concurrency(), 2);
    assert_drained(&envoy, "rev-a");
}

#[test]
fn two_revisions_do_not_interfere() {
    let _g = serial();
    let (ua, ub) = (Upstream::start().unwrap(), Upstream::start().unwrap());
    let config = serde_json::json!({
        "tick": "50ms",
        "revisions": [
            {"name": "rev-a", "hosts": ["a.test"], "containerConcurrency": 2, "bufferDepth": 200},
            {"name": "rev-b", "hosts": ["b.test"], "containerConcurrency": 5, "bufferDepth": 200},
        ]
    });
    let envoy = gateway(
        config,
        vec![("a", vec![&ua]), ("b", vec![&ub])],
        &[("a.test", "a"), ("b.test", "b")],
    );
    let addr = envoy.listener;
    let a = spawn_requests(60, move |_| {
        Request::get(addr, "a.test").header("x-hold-ms", 20)
    });
    let b = spawn_requests(60, move |_| {
        Request::get(addr, "b.test").header("x-hold-ms", 20)
    });
    assert!(join(a)
        .iter()
        .chain(join(b).iter())
        .all(|r| r.status == 200));
    assert_eq!((ua.max_concurrency(), ub.max_concurrency()), (2, 5));
    assert_eq!((ua.total(), ub.total()), (60, 60));
    assert_drained(&envoy, "rev-a");
    let s = assert_drained(&envoy, "rev-b");
    assert_eq!(
        (
            s.outcome("rev-a", "admitted"),
            s.outcome("rev-b", "admitted")
        ),
        (60, 60)
    );
    assert_eq!(
        (
            s.gauge("inflight_capacity", "rev-a"),
            s.gauge("inflight_capacity", "rev-b")
        ),
        (2, 5)
    );
}

#[test]
fn unknown_hosts_pass_through_untracked_by_default() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let envoy = gateway(one_revision(1, Some(0), "1s"), vec![("a", vec![&up])], &[]);
    let addr = envoy.listener;
    let r = join(spawn_requests(5, move |_| {
        Request::get(addr, "other.test").header("x-hold-ms", 100)
    }));
    assert!(r.iter().all(|r| r.status == 200));
    assert!(up.max_concurrency() > 1, "untracked traffic is not limited");
    let s = envoy.stats().unwrap();
    assert_eq!(s.outcome("rev-a", "admitted"), 0);
}

#[test]
fn invalid_config_fails_closed_and_names_the_key() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let g = Gateway {
        plugin_config:
            r#"{"revisions":[{"name":"rev-a","hosts":["a.test"],"containerConcurency":10}]}"#.into(),
        routes: vec![],
        clusters: vec![Cluster::fixed("a", vec![up.port()])],
        wasm: envoy::filter_wasm(),
        admin_port: None,
    };
    let err = match Envoy::start(&g.yaml(), 1) {
        Ok(_) => panic!("Envoy must refuse a gateway whose filter config is invalid"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("revisions[0].containerConcurency"),
        "the error names the bad key: {err}"
    );
    assert!(err.contains("unknown field"), "{err}");
    // validate mode catches it too, before anything is deployed.
    let dir = std::env::temp_dir().join(format!("inflight-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, g.yaml()).unwrap();
    assert!(envoy::validate(&file).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn paused_posts_stay_paused_while_their_body_arrives() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let envoy = gateway(
        one_revision(1, Some(20), "60s"),
        vec![("a", vec![&up])],
        &[],
    );
    let addr = envoy.listener;
    let holder = Request::get(addr, "a.test")
        .header("x-gate", 1)
        .start()
        .unwrap();
    envoy
        .wait_stats(Duration::from_secs(5), "holder admitted", |s| {
            s.outcome("rev-a", "admitted") == 1
        })
        .unwrap();
    let body = vec![b'x'; 64 * 1024];
    let posts: Vec<_> = (0..5)
        .map(|i| {
            Request::post(addr, "a.test", "/v1/models/m:predict", body.clone())
                .header("x-id", i)
                .start()
                .unwrap()
        })
        .collect();
    wait_queued(&envoy, "rev-a", 5);
    assert_eq!(up.total(), 1, "no POST got past the limit with its body");
    up.open_gate();
    assert_eq!(holder.wait().unwrap().status, 200);
    for p in posts {
        let r = p.wait().unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.body.ends_with(" 65536\n"),
            "the whole body reached the upstream: {}",
            r.body
        );
    }
    assert_eq!(up.max_concurrency(), 1);
    assert_drained(&envoy, "rev-a");
}
