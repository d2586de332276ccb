//! Plugin configuration reload under load in real Envoy: the listener comes from file-based
//! LDS; a new listener file (atomic rename) with a changed `containerConcurrency` makes Envoy
//! start the new configuration (new root contexts, new worker VM ids) while streams already
//! admitted finish on the old one. Old and new share the revision's state by name.
//!
//! Asserted: nothing lost (every client gets 200 or a documented shed), nothing leaked
//! (active/queued back to 0), and the upstream's concurrency follows the new limit once the
//! old streams are gone — up (2 → 4) and down (4 → 1).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_envoy_control::bootstrap;
use inflight_host_tests::chaos::{Ledger, Replica};
use inflight_host_tests::client::Request;
use inflight_host_tests::envoy::{self, Cluster, Envoy, Gateway};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// A client's status and shed reason.
type Answer = (u16, Option<String>);

fn plugin_config(cc: u32) -> String {
    serde_json::json!({
        "revisions": [{
            "name": "rev-a", "hosts": ["a.test"], "containerConcurrency": cc,
            "readyReplicas": 1, "bufferDepth": 100, "maxWait": "10s"
        }],
        "tick": "50ms"
    })
    .to_string()
}

/// Splits the static gateway config into a bootstrap with file-based LDS and the listener
/// resource (on a fixed port, since a listener's address cannot change in an update).
fn lds_configs(g: &Gateway, dir: &Path, port: u16) -> (String, String) {
    bootstrap::listener_from_file(&g.yaml(), &dir.join("lds.yaml"), Some(port)).unwrap()
}

fn write_atomically(dir: &Path, lds: &str) {
    let tmp = dir.join("lds.yaml.tmp");
    std::fs::write(&tmp, lds).unwrap();
    std::fs::rename(&tmp, dir.join("lds.yaml")).unwrap();
}

fn lds_successes(envoy: &Envoy) -> u64 {
    let (_, body) = envoy
        .admin_get("/stats?filter=^listener_manager.lds.update_success$")
        .unwrap();
    body.split(':')
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn reload_raising_the_limit_under_load_loses_nothing_and_switches() {
    reload_under_load(2, 4);
}

/// After a reload that lowers `containerConcurrency`, the old configuration's VMs keep ticking
/// until Envoy destroys the drained filter chain (600 s by default). They must not grant with
/// the OLD capacity: the newest configuration publishes its limit parameters (with a
/// configuration generation) in the revision state, and older VMs apply them. Expected: the
/// upstream at 1 once the streams admitted under 4 have finished.
#[test]
fn reload_lowering_the_limit_under_load_switches_to_the_new_limit() {
    reload_under_load(4, 1);
}

fn reload_under_load(from: u32, to: u32) {
    let ledger = Ledger::new("rev-a", from);
    let replica = Replica::start(ledger.clone()).unwrap();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!(
        "inflight-reload-{}-{from}-{to}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let port = envoy::free_port().unwrap();
    let gateway = |cc: u32| Gateway {
        plugin_config: plugin_config(cc),
        routes: vec![("a.test".into(), "rev-a".into())],
        clusters: vec![Cluster::fixed("rev-a", vec![replica.port()])],
        wasm: envoy::filter_wasm(),
        admin_port: None,
    };
    let (bootstrap, lds) = lds_configs(&gateway(from), &dir, port);
    write_atomically(&dir, &lds);
    let envoy = Envoy::start(&bootstrap, 4).unwrap();
    assert_eq!(envoy.listener.port(), port);
    let addr = envoy.listener;

    // Closed-loop load: 16 clients, 30 ms upstream hold, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let (stop, seen, errors) = (stop.clone(), seen.clone(), errors.clone());
            thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    match Request::get(addr, "a.test")
                        .header("x-id", format!("{c}-{n}"))
                        .header("x-hold-ms", 30)
                        .timeout(Duration::from_secs(30))
                        .send()
                    {
                        Ok(r) => seen
                            .lock()
                            .unwrap()
                            .push((r.status, r.header("x-inflight-shed").map(str::to_string))),
                        Err(e) => errors.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    let measure = |what: &str, limit: u32| {
        ledger.reset_window();
        thread::sleep(Duration::from_millis(1500));
        let max = ledger.window_max();
        eprintln!("reload: {what}: upstream max {max} (limit {limit})");
        assert_eq!(max, limit, "{what}: upstream concurrency follows the limit");
    };
    thread::sleep(Duration::from_millis(500));
    measure(&format!("cc={from} before the reload"), from);

    // During the switch old and new VMs share the state: at most the larger limit; streams
    // admitted under the old limit finish (30 ms holds), then the new limit applies.
    let before = lds_successes(&envoy);
    ledger.set_limit(from.max(to));
    let switched = Instant::now();
    write_atomically(&dir, &lds_configs(&gateway(to), &dir, port).1);
    while lds_successes(&envoy) == before {
        assert!(
            switched.elapsed() < Duration::from_secs(10),
            "LDS update applied"
        );
        thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "reload: {from} → {to} applied after {:?}",
        switched.elapsed()
    );
    thread::sleep(Duration::from_millis(500));
    ledger.set_limit(to);
    measure(&format!("cc={to} after the reload"), to);

    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let s = envoy
        .wait_stats(
            Duration::from_secs(10),
            "active and queued back to 0",
            |s| {
                s.gauge("inflight_active", "rev-a") == 0 && s.gauge("inflight_queued", "rev-a") == 0
            },
        )
        .expect("nothing leaked across the reloads");
    let seen = seen.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    let ok = seen.iter().filter(|(st, _)| *st == 200).count() as u64;
    let shed = seen.iter().filter(|(st, _)| *st != 200).count() as u64;
    eprintln!(
        "reload: {} requests: {ok} × 200, {shed} shed, {} errors; violations {}; counters admitted {} shed_full {} shed_timeout {}",
        seen.len(),
        errors.len(),
        ledger.violations(),
        s.outcome("rev-a", "admitted"),
        s.outcome("rev-a", "shed_full"),
        s.outcome("rev-a", "shed_timeout")
    );
    assert!(
        errors.is_empty(),
        "every client got a final status: {errors:?}"
    );
    for (st, reason) in &seen {
        assert!(
            *st == 200 || (*st == 503 && reason.is_some()),
            "{st} {reason:?}: only 200 or a documented shed"
        );
    }
    assert_eq!(ledger.violations(), 0, "limit held through both reloads");
    assert_eq!(
        s.outcome("rev-a", "admitted"),
        ok,
        "every admitted request answered 200"
    );
    assert_eq!(
        s.outcome("rev-a", "shed_full") + s.outcome("rev-a", "shed_timeout"),
        shed
    );
    let _ = std::fs::remove_dir_all(&dir);
}
