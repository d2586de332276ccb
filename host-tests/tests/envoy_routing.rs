//! Endpoint picking in real Envoy (`--concurrency 4`): the filter learns the revision's
//! endpoints from Envoy's admin, names a free one per request in `x-gateway-destination-endpoint`,
//! and Envoy's `override_host` policy routes there. Each test upstream records the concurrency
//! it sees, so "every pod ≤ containerConcurrency" is measured at the pods.
//!
//! Needs `.venv/bin/envoy` (`make setup`); builds filter.wasm itself. One scenario at a time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::client::Request;
use inflight_host_tests::envoy::{
    self, free_port, write_eds, Cluster, Envoy, Gateway, Lb, Stats, ADMIN_CLUSTER, ENDPOINT_HEADER,
};
use inflight_host_tests::sidecar::{self, H2Fronts};
use inflight_host_tests::upstream::{Group, Upstream};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const WORKERS: u32 = 4;
/// The membership poll interval of these configs.
const POLL_MS: u64 = 200;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Revision `rev-a` (host `a.test`) behind cluster `rev-a`, `cc` per endpoint, endpoints polled
/// every [`POLL_MS`].
fn config(cc: u32) -> serde_json::Value {
    serde_json::json!({
        "revisions": [{
            "name": "rev-a", "hosts": ["a.test"], "containerConcurrency": cc, "target": 10,
            "upstreamCluster": "rev-a", "bufferDepth": 1000, "maxWait": "30s"
        }],
        "membership": {"cluster": ADMIN_CLUSTER, "interval": format!("{POLL_MS}ms")},
        "tick": "50ms"
    })
}

fn start(cluster: Cluster, cc: u32) -> Envoy {
    let g = Gateway {
        plugin_config: config(cc).to_string(),
        routes: vec![],
        clusters: vec![cluster],
        wasm: envoy::filter_wasm(),
        admin_port: Some(free_port().unwrap()),
    };
    Envoy::start(&g.yaml(), WORKERS).expect("start envoy")
}

fn ports(ups: &[&Upstream]) -> Vec<u16> {
    ups.iter().map(|u| u.port()).collect()
}

/// Waits until the filter has learned `n` ready endpoints.
fn wait_ready(envoy: &Envoy, n: u64) {
    envoy
        .wait_stats(Duration::from_secs(10), &format!("{n} ready"), |s| {
            s.gauge("inflight_ready_replicas", "rev-a") == n
        })
        .expect("endpoints learned");
}

fn drained(envoy: &Envoy) -> Stats {
    envoy
        .wait_stats(Duration::from_secs(5), "active and queued back to 0", |s| {
            s.gauge("inflight_active", "rev-a") == 0 && s.gauge("inflight_queued", "rev-a") == 0
        })
        .expect("no leaked slot or waiter")
}

fn mismatches(s: &Stats) -> u64 {
    s.get("inflight_endpoint_mismatch_total", &[("revision", "rev-a")]) as u64
}

/// Closed-loop clients (like `hey -c N`), each request holding `hold(i)` ms upstream.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<thread::JoinHandle<Vec<(u16, Duration)>>>,
}

impl Load {
    fn start(
        addr: SocketAddr,
        clients: usize,
        extra: &'static [(&'static str, &'static str)],
        hold_ms: u64,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let mut r = Request::get(addr, "a.test").header("x-hold-ms", hold_ms);
                        for (k, v) in extra {
                            r = r.header(k, v);
                        }
                        let started = Instant::now();
                        let status = r.send().map_or(0, |r| r.status);
                        out.push((status, started.elapsed()));
                    }
                    out
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients; returns every request's status and latency.
    fn finish(self) -> Vec<(u16, Duration)> {
        self.stop.store(true, Ordering::SeqCst);
        self.clients
            .into_iter()
            .flat_map(|c| c.join().expect("client"))
            .collect()
    }
}

fn all_ok(results: &[(u16, Duration)]) {
    let bad: Vec<u16> = results.iter().map(|r| r.0).filter(|s| *s != 200).collect();
    assert!(
        bad.is_empty(),
        "{} of {} requests failed: {:?}",
        bad.len(),
        results.len(),
        &bad[..bad.len().min(10)]
    );
}

/// 3 endpoints, cc 2, 60 clients: every endpoint at exactly 2 (reached, never above), the
/// revision at 6, all answered, and Envoy went where the filter picked every time.
fn every_endpoint_holds_exactly_cc(h2: bool) {
    let _g = serial();
    let group = Group::new();
    let ups: Vec<Upstream> = (0..3)
        .map(|_| Upstream::start_in(Some(Arc::clone(&group))).unwrap())
        .collect();
    let fronts;
    let cluster = if h2 {
        fronts = H2Fronts::start(&ups.iter().map(|u| u.addr()).collect::<Vec<_>>()).unwrap();
        Cluster {
            extra: sidecar::http2_cluster_options().to_string(),
            ..Cluster::fixed("rev-a", fronts.addrs().iter().map(|a| a.port()).collect())
        }
    } else {
        Cluster::fixed("rev-a", ports(&ups.iter().collect::<Vec<_>>()))
    };
    let envoy = start(cluster, 2);
    wait_ready(&envoy, 3);
    let load = Load::start(envoy.listener, 60, &[], 20);
    thread::sleep(Duration::from_secs(3));
    let results = load.finish();
    all_ok(&results);
    let max: Vec<u32> = ups.iter().map(Upstream::max_concurrency).collect();
    let totals: Vec<u64> = ups.iter().map(Upstream::total).collect();
    eprintln!(
        "{}: {} requests, per endpoint max {max:?}, totals {totals:?}, revision max {}",
        if h2 { "HTTP/2" } else { "HTTP/1.1" },
        results.len(),
        group.max_concurrency()
    );
    assert_eq!(
        max,
        vec![2, 2, 2],
        "each endpoint held exactly cc = 2 at most, and reached it"
    );
    assert_eq!(group.max_concurrency(), 6, "the revision held 3 × 2");
    let s = drained(&envoy);
    assert_eq!(mismatches(&s), 0, "Envoy routed every request where picked");
    assert_eq!(s.outcome("rev-a", "admitted") as usize, results.len());
    if h2 {
        let h2_cx = s.get(
            "envoy_cluster_upstream_cx_http2_total",
            &[("envoy_cluster_name", "rev-a")],
        );
        assert!(h2_cx > 0.0, "the gateway spoke HTTP/2 to the endpoints");
    }
}

#[test]
fn every_endpoint_holds_exactly_cc_over_http1() {
    every_endpoint_holds_exactly_cc(false);
}

#[test]
fn every_endpoint_holds_exactly_cc_over_http2() {
    every_endpoint_holds_exactly_cc(true);
}

/// A client naming an endpoint itself is ignored: the pick stands (and spreads).
#[test]
fn a_client_supplied_endpoint_header_is_ignored() {
    let _g = serial();
    let a = Upstream::start().unwrap();
    let b = Upstream::start().unwrap();
    let envoy = start(Cluster::fixed("rev-a", ports(&[&a, &b])), 1);
    wait_ready(&envoy, 2);
    let target = format!("127.0.0.1:{}", b.port());
    // Hold a request on whichever endpoint it lands, then ask for b while b may be the busy one.
    for i in 0..20 {
        let r = Request::get(envoy.listener, "a.test")
            .header(ENDPOINT_HEADER, &target)
            .header("x-id", i)
            .send()
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let (ta, tb) = (a.total(), b.total());
    eprintln!("client asked for b 20 times: a served {ta}, b served {tb}");
    assert!(
        ta >= 5,
        "the filter's pick, not the client's header: a served {ta}"
    );
    assert_eq!(ta + tb, 20);
    assert_eq!(mismatches(&drained(&envoy)), 0);
}

/// A cluster without `override_host`: the counter counts and the log says why.
#[test]
fn a_cluster_without_override_host_is_counted_and_explained() {
    let _g = serial();
    let a = Upstream::start().unwrap();
    let b = Upstream::start().unwrap();
    let cluster = Cluster {
        lb: Lb::RoundRobin,
        ..Cluster::fixed("rev-a", ports(&[&a, &b]))
    };
    let envoy = start(cluster, 4);
    wait_ready(&envoy, 2);
    // One request held: the filter then picks the other endpoint for every request after it,
    // while round robin keeps alternating (20 requests on 4 workers: some worker sends ≥ 5).
    let held = Request::get(envoy.listener, "a.test")
        .header("x-gate", 1)
        .start()
        .unwrap();
    envoy
        .wait_stats(Duration::from_secs(5), "one in flight", |s| {
            s.gauge("inflight_active", "rev-a") == 1
        })
        .unwrap();
    for _ in 0..20 {
        assert_eq!(
            Request::get(envoy.listener, "a.test")
                .send()
                .unwrap()
                .status,
            200
        );
    }
    a.open_gate();
    b.open_gate();
    assert_eq!(held.wait().unwrap().status, 200);
    let s = drained(&envoy);
    let n = mismatches(&s);
    eprintln!("round robin: {n} of 21 requests went elsewhere than picked");
    assert!(n >= 1, "mismatches counted");
    let log = envoy.log();
    assert!(
        log.contains("does not route by header `x-gateway-destination-endpoint`")
            && log.contains("override_host"),
        "the log says why"
    );
}

struct EdsDir(PathBuf);

impl EdsDir {
    fn new(tag: &str) -> EdsDir {
        let d = std::env::temp_dir().join(format!("inflight-routing-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        EdsDir(d)
    }
    fn file(&self) -> PathBuf {
        self.0.join("rev-a.yaml")
    }
}

impl Drop for EdsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Membership changes under load: an endpoint removed from EDS and one failing its health
/// checks get no new request after one interval; one added gets traffic within one; every
/// request is answered 200 and the gauges return to 0.
#[test]
fn endpoints_follow_eds_and_health_checks_under_load() {
    let _g = serial();
    let ups: Vec<Upstream> = (0..4).map(|_| Upstream::start().unwrap()).collect();
    let eds = EdsDir::new("churn");
    let first3: Vec<u16> = ups[..3].iter().map(Upstream::port).collect();
    write_eds(&eds.file(), "rev-a", &first3).unwrap();
    let cluster = Cluster {
        extra: "    health_checks:\n    - timeout: 1s\n      interval: 0.1s\n      no_traffic_interval: 0.1s\n      unhealthy_threshold: 1\n      healthy_threshold: 1\n      http_health_check: { path: /healthz }\n".into(),
        ..Cluster::eds("rev-a", eds.file())
    };
    let envoy = start(cluster, 2);
    wait_ready(&envoy, 3);
    let load = Load::start(envoy.listener, 12, &[], 20);
    thread::sleep(Duration::from_millis(700));
    // Remove endpoint 0 from EDS; endpoint 1 starts failing health checks.
    let rest: Vec<u16> = ups[1..3].iter().map(Upstream::port).collect();
    write_eds(&eds.file(), "rev-a", &rest).unwrap();
    ups[1].set_healthy(false);
    if let Err(e) = envoy.wait_stats(Duration::from_secs(5), "1 ready", |s| {
        s.gauge("inflight_ready_replicas", "rev-a") == 1
    }) {
        let (_, clusters) = envoy.admin_get("/clusters?filter=rev-a").unwrap();
        let flags: Vec<&str> = clusters
            .lines()
            .filter(|l| l.contains("health_flags"))
            .collect();
        panic!("{e}\nEnvoy's view: {flags:#?}");
    }
    // Requests picked just before the poll may still be on their way: one interval more.
    thread::sleep(Duration::from_millis(POLL_MS + 100));
    let (t0, t1) = (ups[0].total(), ups[1].total());
    thread::sleep(Duration::from_millis(800));
    assert_eq!(
        ups[0].total(),
        t0,
        "no new request to the endpoint removed from EDS"
    );
    assert_eq!(
        ups[1].total(),
        t1,
        "no new request to the unhealthy endpoint"
    );
    assert!(ups[2].max_concurrency() <= 2);
    // Endpoint 3 is added: traffic within an interval (plus its first health check).
    let added_at = Instant::now();
    let with_new: Vec<u16> = [1, 2, 3].iter().map(|&i| ups[i].port()).collect();
    write_eds(&eds.file(), "rev-a", &with_new).unwrap();
    while ups[3].total() == 0 {
        assert!(
            added_at.elapsed() < Duration::from_secs(5),
            "the new endpoint gets traffic"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let took = added_at.elapsed();
    thread::sleep(Duration::from_millis(500));
    let results = load.finish();
    all_ok(&results);
    let max: Vec<u32> = ups.iter().map(Upstream::max_concurrency).collect();
    eprintln!(
        "churn: {} requests, max per endpoint {max:?}, totals {:?}, new endpoint's first request after {took:?}",
        results.len(),
        ups.iter().map(Upstream::total).collect::<Vec<_>>()
    );
    assert!(
        max.iter().all(|m| *m <= 2),
        "no endpoint above cc at any time: {max:?}"
    );
    let s = drained(&envoy);
    assert_eq!(mismatches(&s), 0);
    assert_eq!(s.outcome("rev-a", "admitted") as usize, results.len());
}

/// One endpoint 10× slower than the others: with picking the fast ones serve proportionally
/// more. Printed side by side with Envoy's least request and round robin under the same
/// revision-level limit (routing off), for BENCHMARKS.md.
#[test]
fn a_slow_endpoint_gets_less_work_with_picking() {
    let _g = serial();
    let mut rows = Vec::new();
    for (name, lb, routing) in [
        ("inflight pick", Lb::Pick, true),
        ("least request", Lb::LeastRequest, false),
        ("round robin", Lb::RoundRobin, false),
    ] {
        // The slow one answers in 200 ms, the fast ones in 20 ms (the client asks for 20 ms;
        // the slow upstream adds its own 180 ms).
        let ups: Vec<Upstream> = (0..3).map(|_| Upstream::start().unwrap()).collect();
        let slow_front = SlowFront::start(ups[0].addr(), 180);
        let mut cfg = config(2);
        if !routing {
            cfg["routing"] = serde_json::json!({"enabled": false});
        }
        let g = Gateway {
            plugin_config: cfg.to_string(),
            routes: vec![],
            clusters: vec![Cluster {
                lb,
                ..Cluster::fixed(
                    "rev-a",
                    vec![slow_front.port(), ups[1].port(), ups[2].port()],
                )
            }],
            wasm: envoy::filter_wasm(),
            admin_port: Some(free_port().unwrap()),
        };
        let envoy = Envoy::start(&g.yaml(), WORKERS).unwrap();
        wait_ready(&envoy, 3);
        let load = Load::start(envoy.listener, 30, &[], 20);
        let secs = 4;
        thread::sleep(Duration::from_secs(secs));
        let mut results = load.finish();
        all_ok(&results);
        results.sort_by_key(|r| r.1);
        let p = |q: f64| results[((results.len() as f64 * q) as usize).min(results.len() - 1)].1;
        let totals: Vec<u64> = ups.iter().map(Upstream::total).collect();
        let max: Vec<u32> = ups.iter().map(Upstream::max_concurrency).collect();
        rows.push(format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {} / {} / {} | {:?} |",
            results.len() as f64 / secs as f64,
            p(0.5).as_secs_f64() * 1e3,
            p(0.99).as_secs_f64() * 1e3,
            totals[0],
            totals[1],
            totals[2],
            max,
        ));
        if routing {
            let fast = totals[1] + totals[2];
            assert!(
                fast >= 5 * totals[0],
                "the fast endpoints serve proportionally more: {totals:?}"
            );
            assert!(max.iter().all(|m| *m <= 2), "{max:?}");
        }
        drained(&envoy);
    }
    eprintln!(
        "one endpoint 10x slower (200 ms vs 20 ms), cc 2 per endpoint, 30 clients, 4 s, load {}:\n| balancer | req/s | p50 ms | p99 ms | served slow / fast / fast | max in flight per endpoint |\n|---|---:|---:|---:|---|---|\n{}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        rows.join("\n")
    );
}

/// A delaying TCP relay in front of an upstream: adds `delay_ms` before forwarding each
/// request, so that endpoint is slow whatever the client asks.
struct SlowFront {
    port: u16,
    stop: Arc<AtomicBool>,
    _served: Arc<AtomicU64>,
}

impl SlowFront {
    fn start(backend: SocketAddr, delay_ms: u64) -> SlowFront {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (st, sv) = (Arc::clone(&stop), Arc::clone(&served));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut down) = conn else { continue };
                let sv = Arc::clone(&sv);
                thread::spawn(move || {
                    let Ok(mut up) = std::net::TcpStream::connect(backend) else {
                        return;
                    };
                    let mut up_read = up.try_clone().unwrap();
                    let mut down_write = down.try_clone().unwrap();
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut up_read, &mut down_write);
                        let _ = down_write.shutdown(std::net::Shutdown::Both);
                    });
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match down.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // A new request starts with its method: delay it (HTTP/1.1, one at a
                        // time per connection, so each read that starts a request is one).
                        if buf[..n].starts_with(b"GET ") {
                            sv.fetch_add(1, Ordering::SeqCst);
                            thread::sleep(Duration::from_millis(delay_ms));
                        }
                        if up.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = up.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        SlowFront {
            port,
            stop,
            _served: served,
        }
    }

    fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for SlowFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}
