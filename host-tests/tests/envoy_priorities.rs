//! Priority classes and fairness groups in real Envoy (`--concurrency 4`, one revision, cc 4,
//! an upstream that holds every request 100 ms): interactive traffic is not stuck behind a
//! flood of batch traffic, and a tenant with few clients gets its turn against one with many.
//!
//! Needs `.venv/bin/envoy` (`make setup`); builds filter.wasm itself. Scenarios run one at a
//! time (a lock), since each starts its own Envoy with four workers on a two-core machine.
//! The numbers are printed (`--nocapture`) as well as asserted. The queue wait asserted is the
//! gateway's own measure (`inflight_class_queue_wait_ms`, pause to grant); the client-side
//! figure beside it adds connecting and the proxy's work, and gets 50 ms of slack for that.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::client::{Request, Response};
use inflight_host_tests::envoy::{self, Cluster, Envoy, Gateway, Stats};
use inflight_host_tests::upstream::Upstream;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const WORKERS: u32 = 4;
const CC: u32 = 4;
const SERVICE_MS: u64 = 100;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn gateway(plugin_config: serde_json::Value, up: &Upstream) -> Envoy {
    let g = Gateway {
        plugin_config: plugin_config.to_string(),
        routes: Vec::new(),
        clusters: vec![Cluster::fixed("a", vec![up.port()])],
        wasm: envoy::filter_wasm(),
        admin_port: None,
    };
    Envoy::start(&g.yaml(), WORKERS).expect("start envoy")
}

/// One revision `rev-a`, cc 4 on one replica, classes from `x-class`, tenants from `x-tenant`.
fn config(revision: serde_json::Value) -> serde_json::Value {
    let mut rev = serde_json::json!({
        "name": "rev-a", "hosts": ["a.test"], "containerConcurrency": CC, "target": 10,
    });
    if let (Some(r), Some(extra)) = (rev.as_object_mut(), revision.as_object()) {
        r.extend(extra.clone());
    }
    serde_json::json!({
        "revisions": [rev], "tick": "50ms",
        "classHeader": "x-class", "fairnessHeader": "x-tenant",
    })
}

/// One answered request: who sent it, when it finished (since the run started), the answer.
struct Done {
    who: &'static str,
    at: Duration,
    response: Response,
}

/// `n` closed-loop clients labelled `who` sending `make(i, k)` until `stop`; a shed client
/// waits `backoff` before its next request (as a client honouring `retry-after` would, scaled
/// down), so the flood stays a flood without burning the two cores on 503s.
fn clients(
    n: usize,
    who: &'static str,
    backoff: Duration,
    started: Instant,
    stop: &Arc<AtomicBool>,
    done: &Arc<Mutex<Vec<Done>>>,
    make: impl Fn(usize, usize) -> Request + Send + Sync + 'static,
) -> Vec<thread::JoinHandle<()>> {
    let make = Arc::new(make);
    (0..n)
        .map(|i| {
            let (make, stop, done) = (Arc::clone(&make), Arc::clone(stop), Arc::clone(done));
            thread::spawn(move || {
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    let response = make(i, k).send().expect("request answered");
                    k += 1;
                    let shed = response.status != 200;
                    done.lock().unwrap().push(Done {
                        who,
                        at: started.elapsed(),
                        response,
                    });
                    if shed {
                        thread::sleep(backoff);
                    }
                }
            })
        })
        .collect()
}

fn get(addr: SocketAddr) -> Request {
    Request::get(addr, "a.test").header("x-hold-ms", SERVICE_MS)
}

fn percentile(mut v: Vec<u64>, p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn class_outcome(s: &Stats, class: &str, outcome: &str) -> u64 {
    s.get(
        "inflight_class_requests_total",
        &[
            ("revision", "rev-a"),
            ("class", class),
            ("outcome", outcome),
        ],
    ) as u64
}

fn assert_drained(envoy: &Envoy) -> Stats {
    envoy
        .wait_stats(
            Duration::from_secs(10),
            "active and queued back to 0",
            |s| {
                s.gauge("inflight_active", "rev-a") == 0 && s.gauge("inflight_queued", "rev-a") == 0
            },
        )
        .expect("no leaked slot or waiter")
}

#[test]
fn critical_requests_wait_at_most_one_service_time_behind_a_sheddable_flood() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    // Default classes and buffer (10 × cc = 40); sheddable waits at most 5 s by default.
    let envoy = gateway(config(serde_json::json!({ "maxWait": "30s" })), &up);
    let addr = envoy.listener;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut handles = clients(
        200,
        "sheddable",
        Duration::from_millis(200),
        started,
        &stop,
        &done,
        move |i, k| {
            get(addr)
                .header("x-class", "sheddable")
                .header("x-id", format!("s-{i}-{k}"))
        },
    );
    // The flood fills the buffer before the interactive clients come.
    envoy
        .wait_stats(
            Duration::from_secs(20),
            "the buffer full of sheddable",
            |s| s.gauge("inflight_queued", "rev-a") >= u64::from(10 * CC),
        )
        .expect("flood");
    let critical_from = started.elapsed();
    handles.extend(clients(
        5,
        "critical",
        Duration::from_millis(200),
        started,
        &stop,
        &done,
        move |i, k| {
            get(addr)
                .header("x-class", "critical")
                .header("x-id", format!("c-{i}-{k}"))
        },
    ));
    thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("client thread");
    }
    let s = assert_drained(&envoy);
    let done = done.lock().unwrap();
    let critical: Vec<&Done> = done.iter().filter(|d| d.who == "critical").collect();
    let sheddable: Vec<&Done> = done
        .iter()
        .filter(|d| d.who == "sheddable" && d.at > critical_from)
        .collect();
    // Client-side wait: the time to the answer beyond the upstream's service time.
    let waits: Vec<u64> = critical
        .iter()
        .map(|d| (d.response.elapsed.as_millis() as u64).saturating_sub(SERVICE_MS))
        .collect();
    let (p50, p99, max) = (
        percentile(waits.clone(), 0.50),
        percentile(waits.clone(), 0.99),
        percentile(waits.clone(), 1.0),
    );
    let critical_ok = critical.iter().filter(|d| d.response.status == 200).count();
    let sheddable_ok = sheddable
        .iter()
        .filter(|d| d.response.status == 200)
        .count();
    let in_bucket = s.get(
        "inflight_class_queue_wait_ms_bucket",
        &[("revision", "rev-a"), ("class", "critical"), ("le", "100")],
    );
    let waited = s.get(
        "inflight_class_queue_wait_ms_count",
        &[("revision", "rev-a"), ("class", "critical")],
    );
    eprintln!(
        "priorities: {} critical requests, {} answered 200, client-side wait p50 {p50} ms, p99 {p99} ms, max {max} ms (service {SERVICE_MS} ms); gateway histogram: {in_bucket}/{waited} critical waits ≤ 100 ms; sheddable while critical ran: {} requests, {} answered 200, {} shed (buffer-full {}, wait-timeout {} overall)",
        critical.len(),
        critical_ok,
        sheddable.len(),
        sheddable_ok,
        sheddable.len() - sheddable_ok,
        class_outcome(&s, "sheddable", "shed_full"),
        class_outcome(&s, "sheddable", "shed_timeout"),
    );
    assert!(
        critical.len() >= 100,
        "enough critical samples: {}",
        critical.len()
    );
    assert_eq!(critical_ok, critical.len(), "no critical request is shed");
    assert_eq!(class_outcome(&s, "critical", "shed_full"), 0);
    assert_eq!(class_outcome(&s, "critical", "shed_timeout"), 0);
    // The queue wait as the gateway measures it (pause to grant), over every critical request
    // (those admitted at once waited 0): at most 1 % above one service time.
    let admitted = class_outcome(&s, "critical", "admitted") as f64;
    let over = waited - in_bucket;
    assert!(
        over <= admitted * 0.01,
        "critical queue wait p99 > one service time ({SERVICE_MS} ms): {over} of {admitted} waited longer"
    );
    // The client sees that plus connecting and the proxy's own work on two loaded cores.
    assert!(
        p99 <= SERVICE_MS + 50,
        "critical client-side wait p99 {p99} ms > one service time + 50 ms"
    );
    assert!(
        class_outcome(&s, "sheddable", "shed_full") > 0,
        "the sheddable flood takes the sheds"
    );
    assert_eq!(up.max_concurrency(), CC, "the limit holds");
    // The per-class series add up to the revision's.
    for o in ["admitted", "shed_full", "shed_timeout", "cancelled"] {
        let by_class: u64 = ["critical", "standard", "sheddable"]
            .iter()
            .map(|c| class_outcome(&s, c, o))
            .sum();
        assert_eq!(by_class, s.outcome("rev-a", o), "{o}: classes add up");
    }
}

#[test]
fn a_tenant_with_5_clients_gets_half_the_slots_against_one_with_100() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    // A buffer that holds both tenants' requests: nobody is shed, both stay backlogged.
    let envoy = gateway(
        config(serde_json::json!({ "bufferDepth": 200, "maxWait": "60s" })),
        &up,
    );
    let addr = envoy.listener;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let tenant = |who: &'static str, n: usize| {
        clients(
            n,
            who,
            Duration::from_millis(200),
            started,
            &stop,
            &done,
            move |i, k| {
                get(addr)
                    .header("x-tenant", who)
                    .header("x-id", format!("{who}-{i}-{k}"))
            },
        )
    };
    let mut handles = tenant("A", 100);
    handles.extend(tenant("B", 5));
    // Both backlogged from well after the start until the clients stop.
    let run = Duration::from_secs(7);
    let window = (Duration::from_millis(1_500), run);
    thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("client thread");
    }
    let s = assert_drained(&envoy);
    let done = done.lock().unwrap();
    let in_window = |who: &str| {
        done.iter()
            .filter(|d| d.who == who && d.response.status == 200)
            .filter(|d| d.at >= window.0 && d.at < window.1)
            .count()
    };
    let (a, b) = (in_window("A"), in_window("B"));
    let share = b as f64 / (a + b).max(1) as f64;
    let shed = done.iter().filter(|d| d.response.status != 200).count();
    eprintln!(
        "fairness: admitted in [{:?}, {:?}): tenant A (100 clients) {a}, tenant B (5 clients) {b}: B's share {:.1} %; {shed} shed; upstream max concurrency {}",
        window.0,
        window.1,
        share * 100.0,
        up.max_concurrency()
    );
    assert_eq!(shed, 0, "the buffer holds both tenants");
    assert!(a + b >= 100, "enough requests in the window: {}", a + b);
    assert!(share >= 0.45, "B's share {:.1} % < 45 %", share * 100.0);
    assert_eq!(up.max_concurrency(), CC, "the limit holds");
    assert_eq!(s.outcome("rev-a", "shed_full"), 0);
}

/// The class header as docs/deploy.md sets it: a `header_mutation` filter before inflight strips
/// every client copy, a second one sets the class on the routes that have one (per-route
/// config). Two filters, so the order (strip, then set) is the filter chain's, not a rule of
/// how one filter merges its levels.
const CLASS_FILTERS: &str = r#"          - name: strip-class
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations:
                request_mutations:
                - remove: x-class
          - name: set-class
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations: {}
"#;

const CLASS_ROUTES: &str = r#"              routes:
              - match: { prefix: "/critical" }
                route: { cluster: a, timeout: 0s }
                typed_per_filter_config:
                  set-class:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute
                    mutations:
                      request_mutations:
                      - append:
                          header: { key: x-class, value: critical }
                          append_action: OVERWRITE_IF_EXISTS_OR_ADD
              - match: { prefix: "/" }
                route: { cluster: a, timeout: 0s }
"#;

#[test]
fn a_client_copy_of_the_class_header_is_stripped_and_the_request_is_standard() {
    let _g = serial();
    let up = Upstream::start().unwrap();
    let g = Gateway {
        plugin_config: config(serde_json::json!({})).to_string(),
        routes: Vec::new(),
        clusters: vec![Cluster::fixed("a", vec![up.port()])],
        wasm: envoy::filter_wasm(),
        admin_port: None,
    };
    let default_route = "              routes:\n              - match: { prefix: \"/\" }\n                route: { cluster: a, timeout: 0s }\n";
    let yaml = g.yaml();
    assert!(yaml.contains(default_route) && yaml.contains("          http_filters:\n"));
    let yaml = yaml.replace(default_route, CLASS_ROUTES).replace(
        "          http_filters:\n",
        &format!("          http_filters:\n{CLASS_FILTERS}"),
    );
    let envoy = Envoy::start(&yaml, WORKERS).expect("start envoy");
    let addr = envoy.listener;
    let send = |path: &str, class: Option<&str>| {
        let mut r = Request::post(addr, "a.test", path, Vec::new());
        if let Some(c) = class {
            r = r.header("x-class", c);
        }
        r.send().expect("answered").status
    };
    for _ in 0..3 {
        assert_eq!(send("/", Some("critical")), 200, "client claims critical");
        assert_eq!(send("/", None), 200);
        assert_eq!(
            send("/critical", Some("sheddable")),
            200,
            "route says critical"
        );
    }
    let s = envoy
        .wait_stats(Duration::from_secs(5), "9 admitted", |s| {
            s.outcome("rev-a", "admitted") == 9
        })
        .expect("counted");
    let admitted = |c| class_outcome(&s, c, "admitted");
    eprintln!(
        "class header: admitted critical {}, standard {}, sheddable {}",
        admitted("critical"),
        admitted("standard"),
        admitted("sheddable")
    );
    assert_eq!(
        admitted("standard"),
        6,
        "client copies were stripped: default class"
    );
    assert_eq!(
        admitted("critical"),
        3,
        "only the route's own class is critical"
    );
    assert_eq!(admitted("sheddable"), 0);
}
