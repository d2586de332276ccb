//! Hostile input in real Envoy: what a client can do to the revision the filter picks, to the
//! filter itself, and to the admin endpoint the filter polls. Each test asserts what the filter
//! actually does today; docs/hardening.md states the rule and its risk.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::chaos::{Ledger, Replica};
use inflight_host_tests::client::{Request, Response};

use inflight_host_tests::envoy::{self, Cluster, Envoy, Gateway};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Setup {
    envoy: Envoy,
    a: Arc<Ledger>,
    b: Arc<Ledger>,
    _replicas: Vec<Replica>,
}

/// rev-a (cc 1) and rev-b (cc 10), each on its own cluster and replica; `plugin` is the
/// plugin config; routes `a.test` → rev-a, `b.test` → rev-b, anything else → rev-a (the
/// default vhost, as a wildcard vhost of a real gateway would).
fn setup(plugin: serde_json::Value, admin_port: Option<u16>) -> Setup {
    let a = Ledger::new("rev-a", 1);
    let b = Ledger::new("rev-b", 10);
    let ra = Replica::start(a.clone()).unwrap();
    let rb = Replica::start(b.clone()).unwrap();
    let g = Gateway {
        plugin_config: plugin.to_string(),
        routes: vec![
            ("a.test".into(), "rev-a".into()),
            ("b.test".into(), "rev-b".into()),
        ],
        clusters: vec![
            Cluster::fixed("rev-a", vec![ra.port()]),
            Cluster::fixed("rev-b", vec![rb.port()]),
        ],
        wasm: envoy::filter_wasm(),
        admin_port,
    };
    let envoy = Envoy::start(&g.yaml(), 4).unwrap();
    Setup {
        envoy,
        a,
        b,
        _replicas: vec![ra, rb],
    }
}

/// One revision with `cc` slots, 1 ready replica, a buffer of 10 and a 10 s maximum wait,
/// matched by `matchers` (`hosts` and/or `clusters`).
fn rev(name: &str, cc: u32, matchers: serde_json::Value) -> serde_json::Value {
    let mut r = serde_json::json!({
        "name": name, "containerConcurrency": cc,
        "readyReplicas": 1, "bufferDepth": 10, "maxWait": "10s"
    });
    if let (Some(r), Some(m)) = (r.as_object_mut(), matchers.as_object()) {
        for (k, v) in m {
            r.insert(k.clone(), v.clone());
        }
    }
    r
}

fn by_host(extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "revisions": [
            rev("rev-a", 1, serde_json::json!({"hosts": ["a.test", "*.a.test"]})),
            rev("rev-b", 10, serde_json::json!({"hosts": ["b.test"]}))
        ],
        "tick": "50ms"
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

/// Holds rev-a's only slot for `ms` with a request to `a.test`; returns it once admitted.
fn hold_rev_a(s: &Setup, ms: u64) -> inflight_host_tests::client::Pending {
    let p = Request::get(s.envoy.listener, "a.test")
        .header("x-hold-ms", ms)
        .start()
        .unwrap();
    s.envoy
        .wait_stats(Duration::from_secs(5), "rev-a holds its slot", |st| {
            st.gauge("inflight_active", "rev-a") == 1
        })
        .unwrap();
    p
}

fn no_panic(envoy: &mut Envoy) {
    assert!(envoy.alive());
    let log = envoy.log();
    assert!(
        !log.contains("panicked") && !log.contains("Function: proxy_on"),
        "filter VM crashed:\n{}",
        envoy.log_tail(30)
    );
}

/// The matched cluster outranks the revision header: a client that sends the header naming
/// another revision does not move its request off its route's revision (it queues behind the
/// holder of rev-a's only slot and is counted for rev-a).
#[test]
fn client_sent_revision_header_cannot_override_the_cluster() {
    let _g = serial();
    let plugin = serde_json::json!({
        "revisions": [
            rev("rev-a", 1, serde_json::json!({"clusters": ["rev-a"]})),
            rev("rev-b", 10, serde_json::json!({"clusters": ["rev-b"]}))
        ],
        "revisionHeader": "x-inflight-revision",
        "tick": "50ms"
    });
    let mut s = setup(plugin, None);
    let holder = hold_rev_a(&s, 1000);
    let spoofed = Request::get(s.envoy.listener, "a.test")
        .header("x-inflight-revision", "rev-b")
        .header("x-hold-ms", 10)
        .send()
        .unwrap();
    assert_eq!(spoofed.status, 200);
    assert!(
        spoofed.elapsed >= Duration::from_millis(500),
        "queued behind the holder: {:?}",
        spoofed.elapsed
    );
    assert_eq!(holder.wait().unwrap().status, 200);
    assert_eq!(s.a.max(), 1, "rev-a's limit held");
    let st = s.envoy.stats().unwrap();
    assert_eq!(st.outcome("rev-a", "admitted"), 2);
    assert_eq!(
        st.outcome("rev-b", "admitted"),
        0,
        "not counted against rev-b"
    );
    no_panic(&mut s.envoy);
}

/// With hosts configured, `:authority` outranks the header: the same spoof changes nothing.
#[test]
fn revision_header_cannot_override_a_matching_authority() {
    let _g = serial();
    let mut s = setup(
        by_host(serde_json::json!({"revisionHeader": "x-inflight-revision"})),
        None,
    );
    let holder = hold_rev_a(&s, 800);
    let spoofed = Request::get(s.envoy.listener, "a.test")
        .header("x-inflight-revision", "rev-b")
        .header("x-hold-ms", 10)
        .send()
        .unwrap();
    assert_eq!(spoofed.status, 200);
    assert!(
        spoofed.elapsed >= Duration::from_millis(500),
        "queued behind the holder: {:?}",
        spoofed.elapsed
    );
    holder.wait().unwrap();
    assert_eq!(s.a.max(), 1);
    no_panic(&mut s.envoy);
}

/// An authority longer than core's 300-byte cap matches no host (not even `*.a.test`), while
/// Envoy's router still sends it to rev-a's upstream (the catch-all vhost). The configuration
/// lists no clusters, but the filter recorded rev-a's cluster from the holder's host match, so
/// the request is counted for rev-a and queues behind the holder. Before any host match (fresh
/// gateway) nothing is recorded: with `unknownRevision: reject` it gets a 404.
#[test]
fn overlong_authority_is_tracked_by_the_learned_cluster_or_rejected() {
    let _g = serial();
    let long = format!("{}a.test", "x.".repeat(200));
    assert!(long.len() > 300);
    {
        let mut s = setup(by_host(serde_json::json!({})), None);
        let holder = hold_rev_a(&s, 1000);
        let r = Request::get(s.envoy.listener, &long)
            .header("x-hold-ms", 100)
            .send()
            .unwrap();
        assert_eq!(r.status, 200, "routed to rev-a's upstream");
        assert!(
            r.elapsed >= Duration::from_millis(500),
            "queued behind the holder: {:?}",
            r.elapsed
        );
        holder.wait().unwrap();
        assert_eq!(s.a.max(), 1, "rev-a's limit held (cc 1)");
        assert!(
            s.envoy
                .log()
                .contains("requests routed there whose host matches no revision count for it too"),
            "the learned cluster is logged"
        );
        no_panic(&mut s.envoy);
    }
    {
        let mut s = setup(
            by_host(serde_json::json!({"unknownRevision": "reject"})),
            None,
        );
        let r = Request::get(s.envoy.listener, &long).send().unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-inflight-shed"), Some("unknown-revision"));
        assert_eq!(s.a.total(), 0);
        no_panic(&mut s.envoy);
    }
}

/// A cluster behind two revisions' hosts is ambiguous: requests routed there with a host that
/// matches nothing are not counted by cluster (here: `unknownRevision: reject` answers 404).
#[test]
fn a_cluster_behind_two_revisions_is_not_learned() {
    let _g = serial();
    let plugin = serde_json::json!({
        "revisions": [
            rev("rev-a", 1, serde_json::json!({"hosts": ["a.test"]})),
            rev("rev-b", 10, serde_json::json!({"hosts": ["b.test"]})),
            rev("rev-c", 10, serde_json::json!({"hosts": ["c.test"]}))
        ],
        "unknownRevision": "reject",
        "tick": "50ms"
    });
    // c.test has no route of its own: the catch-all sends it to rev-a's cluster, like a.test.
    let mut s = setup(plugin, None);
    for host in ["a.test", "c.test", "a.test", "c.test"] {
        let r = Request::get(s.envoy.listener, host).send().unwrap();
        assert_eq!(r.status, 200, "{host}");
    }
    let r = Request::get(s.envoy.listener, "unknown.test")
        .send()
        .unwrap();
    assert_eq!(r.status, 404, "ambiguous cluster: not counted for a or c");
    assert!(s.envoy.log().contains("serves hosts of revisions"));
    no_panic(&mut s.envoy);
}

/// The same overlong authority cannot go around the limit when the revision lists its cluster:
/// the host misses, the cluster (where Envoy actually routed it) matches, and the request queues
/// behind the holder of rev-a's only slot. Odd authorities (leading dot, several ports) too.
#[test]
fn authorities_matching_no_host_are_tracked_by_cluster() {
    let _g = serial();
    let plugin = serde_json::json!({
        "revisions": [
            rev(
                "rev-a",
                1,
                serde_json::json!({"hosts": ["a.test", "*.a.test"], "clusters": ["rev-a"]}),
            ),
            rev(
                "rev-b",
                10,
                serde_json::json!({"hosts": ["b.test"], "clusters": ["rev-b"]}),
            )
        ],
        "tick": "50ms"
    });
    let mut s = setup(plugin, None);
    let long = format!("{}a.test", "x.".repeat(200));
    for authority in [long.as_str(), ".a.test", "a.test:1:2:3", "[::1]:8080"] {
        let holder = hold_rev_a(&s, 600);
        let r = Request::get(s.envoy.listener, authority)
            .header("x-hold-ms", 10)
            .send()
            .unwrap();
        assert_eq!(r.status, 200, "{authority:.40}: routed to rev-a's upstream");
        assert!(
            r.elapsed >= Duration::from_millis(300),
            "{authority:.40}: queued behind the holder, took {:?}",
            r.elapsed
        );
        assert_eq!(holder.wait().unwrap().status, 200);
    }
    assert_eq!(s.a.max(), 1, "rev-a's limit held for every authority");
    s.envoy
        .wait_stats(
            Duration::from_secs(5),
            "rev-a back to 0 with 8 admitted",
            |st| st.gauge("inflight_active", "rev-a") == 0 && st.outcome("rev-a", "admitted") == 8,
        )
        .unwrap();
    no_panic(&mut s.envoy);
}

/// Odd but valid authorities: each gets a final status, the VM survives, and the revision is
/// what the table rules say (port and trailing dot ignored, case-insensitive).
#[test]
fn malformed_authorities_and_huge_headers_neither_crash_nor_hang() {
    let _g = serial();
    let mut s = setup(
        by_host(serde_json::json!({"unknownRevision": "reject"})),
        None,
    );
    let addr = s.envoy.listener;
    let cases: Vec<(String, Vec<(String, String)>)> = vec![
        ("A.TEST.".into(), vec![]),
        ("a.test:8080".into(), vec![]),
        ("a.test:1:2:3".into(), vec![]),
        ("[::1]:8080".into(), vec![]),
        ("[::1".into(), vec![]),
        ("::::::::".into(), vec![]),
        (":".into(), vec![]),
        ("a.test:".into(), vec![]),
        ("%61.test".into(), vec![]),
        ("a..test".into(), vec![]),
        (".a.test".into(), vec![]),
        ("*.a.test".into(), vec![]),
        ("é.a.test".into(), vec![]),
        ("x".repeat(8_000), vec![]),
        (
            "a.test".into(),
            (0..80)
                .map(|i| (format!("x-junk-{i}"), "v".repeat(700)))
                .collect(),
        ),
        ("a.test".into(), vec![("x-big".into(), "b".repeat(50_000))]),
        (
            "a.test".into(),
            vec![("x-inflight-revision".into(), "\u{1}rev-b\u{7f}".into())],
        ),
    ];
    let mut seen = Vec::new();
    for (host, headers) in &cases {
        let mut req = Request::get(addr, host).timeout(Duration::from_secs(10));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let r: std::io::Result<Response> = req.send();
        let status = r.as_ref().map(|r| r.status).map_err(|e| e.kind());
        let shed = r
            .as_ref()
            .ok()
            .and_then(|r| r.header("x-inflight-shed").map(str::to_string));
        let shown: String = host.chars().take(24).collect();
        eprintln!(
            "hostile: host {shown:?} (+{} headers): {status:?} {shed:?}",
            headers.len()
        );
        seen.push((shown, status, shed));
    }
    // Every request got a final status (Envoy or the filter answered).
    for (h, status, _) in &seen {
        assert!(status.is_ok(), "{h}: no final status: {status:?}");
    }
    let st = s.envoy.stats().unwrap();
    eprintln!(
        "hostile: rev-a admitted {}",
        st.outcome("rev-a", "admitted")
    );
    // The first two map to rev-a by host (case, trailing dot, port ignored). The odd ones match
    // no host, but Envoy routes them to rev-a's cluster (catch-all), which the filter learned
    // from the host matches before them: every request that went upstream counted for rev-a,
    // none slipped past as unknown (no 404 despite `reject`).
    assert_eq!(seen[0].1.as_ref().ok(), Some(&200));
    assert_eq!(seen[1].1.as_ref().ok(), Some(&200));
    let upstream = seen
        .iter()
        .filter(|(_, status, _)| status.as_ref().ok() == Some(&200))
        .count() as u64;
    assert_eq!(st.outcome("rev-a", "admitted"), upstream);
    assert!(seen
        .iter()
        .all(|(_, status, _)| status.as_ref().ok() != Some(&404)));
    no_panic(&mut s.envoy);
    // The filter still decides after all of it.
    let r = Request::get(addr, "a.test").send().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(s.a.max(), 1);
    let _ = &s.b;
}

struct Raw {
    status: u16,
    body: String,
}

/// One raw HTTP/1.1 request with any method and path; reads to the end.
fn raw(addr: std::net::SocketAddr, method: &str, path: &str, host: &str) -> Raw {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Raw { status, body }
}

/// The admin endpoint the filter polls (membership) is reachable only through its own cluster,
/// which no route names: admin paths and the admin authority on the public listener reach the
/// revision's upstream, never Envoy's admin.
#[test]
fn admin_endpoint_is_not_reachable_through_the_listener() {
    let _g = serial();
    let admin_port = envoy::free_port().unwrap();
    let mut plugin = by_host(serde_json::json!({}));
    plugin["membership"] = serde_json::json!({"cluster": envoy::ADMIN_CLUSTER, "interval": "1s"});
    let mut s = setup(plugin, Some(admin_port));
    assert_eq!(s.envoy.admin.port(), admin_port);
    let addr = s.envoy.listener;
    for (method, path, host) in [
        ("GET", "/stats", "envoy-admin"),
        ("GET", "/stats/prometheus", "envoy-admin"),
        ("GET", "/clusters", "envoy-admin"),
        ("GET", "/server_info", "a.test"),
        ("GET", "/config_dump", "127.0.0.1"),
        ("POST", "/quitquitquit", "envoy-admin"),
        ("POST", "/healthcheck/fail", "inflight_admin"),
        ("POST", "/reset_counters", "a.test"),
    ] {
        let r = raw(addr, method, path, host);
        eprintln!(
            "admin probe {method} {path} host {host}: {} {:?}",
            r.status,
            r.body.chars().take(40).collect::<String>()
        );
        assert!(
            r.body.starts_with("ok ") || r.status == 404 || r.status == 503,
            "{method} {path} ({host}) reached something other than the upstream: {} {}",
            r.status,
            r.body
        );
        for admin_text in [
            "cluster.",
            "version",
            "uptime",
            "OK\n",
            "envoy_",
            "command_line",
        ] {
            assert!(!r.body.contains(admin_text), "{path}: {}", r.body);
        }
    }
    thread::sleep(Duration::from_millis(200));
    no_panic(&mut s.envoy);
    let (status, body) = s.envoy.admin_get("/ready").unwrap();
    assert_eq!(
        (status, body.trim()),
        (200, "LIVE"),
        "not drained or failed by the probes"
    );
}
