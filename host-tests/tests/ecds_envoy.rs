//! Limit changes the way Istio delivers a WasmPlugin: through ECDS (extension config
//! discovery). The listener's `http_filters` entry `inflight` only says where its configuration
//! comes from (`config_discovery` on a file config source, watched directory); the file holds a
//! `TypedExtensionConfig` with the Wasm filter's configuration, replaced by a rename. Envoy
//! applies a new one to every filter chain it creates from then on (each new request) while the
//! listener stays; the new configuration gets new root contexts, which share the revision's
//! state by name with the old ones, as after an LDS reload (`reload_envoy.rs`).
//!
//! Asserted, under closed-loop load above every limit (4 → 1 → 6): the upstream never holds
//! more than the limit in force, reaches each limit, every request is answered 200, and active
//! and queued go back to 0. Printed: how long after the file was written Envoy counted the
//! update, the capacity gauge showed the new limit, and the upstream followed it.
//!
//! Where ECDS differs from LDS for the filter — how long the old configuration's root context
//! lives — has a test of its own: `ecds_update_ends_the_old_root_context_with_its_last_stream`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_envoy_control::bootstrap;
use inflight_host_tests::chaos::{Ledger, Replica};
use inflight_host_tests::client::Request;
use inflight_host_tests::envoy::{self, Cluster, Envoy, Gateway, Stats};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The filter's name in `http_filters`, which is also the ECDS resource's name.
const FILTER: &str = "inflight";
const TICK_MS: u64 = 50;
const CLIENTS: usize = 20;
const HOLD_MS: u64 = 30;

/// A client's status and shed reason.
type Answer = (u16, Option<String>);

/// A buffer deeper than the clients and a long `maxWait`: nothing is ever shed, so every
/// request must end in a 200.
fn plugin_config(cc: u32, tick_ms: u64) -> String {
    serde_json::json!({
        "revisions": [{
            "name": "rev-a", "hosts": ["a.test"], "containerConcurrency": cc,
            "readyReplicas": 1, "bufferDepth": 1000, "maxWait": "60s"
        }],
        "tick": format!("{tick_ms}ms")
    })
    .to_string()
}

/// The bootstrap whose `inflight` filter reads its configuration from `file`, and the file.
fn ecds_configs(g: &Gateway, file: &Path) -> (String, String) {
    bootstrap::filter_from_file(&g.yaml(), FILTER, file).unwrap()
}

fn write_atomically(file: &Path, contents: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// A counter or gauge from `/stats` by its exact name (0 when absent).
fn stat(envoy: &Envoy, name: &str) -> u64 {
    let (_, body) = envoy
        .admin_get(&format!("/stats?filter=^{}$", name.replace('.', "\\.")))
        .unwrap();
    body.split(':')
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// ECDS updates of the filter Envoy accepted (`extension_config_discovery.<prefix>.<name>`).
fn ecds_reloads(envoy: &Envoy) -> u64 {
    stat(
        envoy,
        &format!("extension_config_discovery.http_filter.{FILTER}.config_reload"),
    )
}

fn ecds_failures(envoy: &Envoy) -> u64 {
    stat(
        envoy,
        &format!("extension_config_discovery.http_filter.{FILTER}.config_fail"),
    )
}

/// Wasm VMs Envoy created so far, and those alive now (V8).
fn wasm_vms(envoy: &Envoy) -> (u64, u64) {
    (
        stat(envoy, "wasm.envoy.wasm.runtime.v8.created"),
        stat(envoy, "wasm.envoy.wasm.runtime.v8.active"),
    )
}

/// Root contexts that installed a plugin configuration so far (the filter logs each).
fn configured(envoy: &Envoy) -> usize {
    envoy
        .log()
        .matches("configured 1 revision(s): rev-a")
        .count()
}

fn capacity(s: &Stats) -> u64 {
    s.gauge("inflight_capacity", "rev-a")
}

#[test]
fn ecds_limit_changes_under_load_hold_the_limit_in_force() {
    let ledger = Ledger::new("rev-a", 4);
    let replica = Replica::start(ledger.clone()).unwrap();
    let dir = std::env::temp_dir().join(format!("inflight-ecds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("inflight-filter.yaml");
    let gateway = |cc: u32| Gateway {
        plugin_config: plugin_config(cc, TICK_MS),
        routes: vec![("a.test".into(), "rev-a".into())],
        clusters: vec![Cluster::fixed("rev-a", vec![replica.port()])],
        wasm: envoy::filter_wasm(),
        admin_port: None,
    };
    let (bootstrap, ecds) = ecds_configs(&gateway(4), &file);
    assert!(!bootstrap.contains("wasm.v3.Wasm\n"), "{bootstrap}");
    write_atomically(&file, &ecds);
    let envoy = Envoy::start(&bootstrap, 4).unwrap();
    let addr = envoy.listener;
    envoy
        .wait_stats(Duration::from_secs(10), "capacity 4", |s| capacity(s) == 4)
        .expect("the first ECDS configuration is in force");
    let (created, active) = wasm_vms(&envoy);
    eprintln!(
        "ecds: started: {} ECDS update(s), {} root context(s) configured, wasm VMs created {created} active {active}",
        ecds_reloads(&envoy),
        configured(&envoy)
    );

    // Closed-loop load above every limit: CLIENTS clients, HOLD_MS at the upstream.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, seen, errors) = (stop.clone(), seen.clone(), errors.clone());
            thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    match Request::get(addr, "a.test")
                        .header("x-id", format!("{c}-{n}"))
                        .header("x-hold-ms", HOLD_MS)
                        .timeout(Duration::from_secs(60))
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
    let measure = |limit: u32| {
        ledger.reset_window();
        thread::sleep(Duration::from_millis(1500));
        let max = ledger.window_max();
        eprintln!("ecds: cc={limit}: upstream max {max}");
        assert_eq!(
            max, limit,
            "cc={limit}: the upstream reaches the limit in force and never exceeds it"
        );
    };
    thread::sleep(Duration::from_millis(500));
    measure(4);

    let mut timings = Vec::new();
    for (from, to) in [(4, 1), (1, 6)] {
        // While the update spreads, streams admitted under the old limit may still be at the
        // upstream: the ledger allows the larger of the two limits.
        ledger.set_limit(from.max(to));
        let (updates, configured_before, vms_before) =
            (ecds_reloads(&envoy), configured(&envoy), wasm_vms(&envoy));
        let written = Instant::now();
        write_atomically(&file, &ecds_configs(&gateway(to), &file).1);
        while ecds_reloads(&envoy) == updates {
            assert_eq!(ecds_failures(&envoy), 0, "the ECDS update is accepted");
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "ECDS update {from} → {to} applied"
            );
            thread::sleep(Duration::from_millis(5));
        }
        let applied = written.elapsed();
        envoy
            .wait_stats(Duration::from_secs(10), "the new capacity", |s| {
                capacity(s) == u64::from(to)
            })
            .expect("the new limit reaches the capacity gauge");
        let in_force = written.elapsed();
        // The rule of `reload_envoy.rs`, with a signal instead of its fixed 500 ms: once the
        // new configuration published its limit (before any VM's tick could show it in the
        // gauge), every VM, old or new, admits only while the revision's active count is below
        // the new limit, and every request at the upstream is an active stream. So after the
        // gauge shows the new limit, the upstream's count can only grow from below the limit:
        // once it is at or under the new limit it stays there. Streams admitted under the
        // old, larger limit finish first (HOLD_MS each); only arrivals after that are checked
        // against the new limit.
        while ledger.current() > to {
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "streams admitted under cc={from} drain"
            );
            thread::sleep(Duration::from_millis(1));
        }
        let drained = written.elapsed();
        ledger.set_limit(to);
        // Raised: the waiters (of old and new VMs alike) fill the new slots, at the latest at
        // the next tick of any VM ("grant after capacity grew").
        ledger.reset_window();
        while ledger.window_max() < to {
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "the upstream reaches cc={to}"
            );
            thread::sleep(Duration::from_millis(1));
        }
        let reached = written.elapsed();
        let (created, active) = wasm_vms(&envoy);
        eprintln!(
            "ecds: {from} → {to}: file written → update counted {applied:?}, capacity gauge {to} {in_force:?}, \
             old streams drained {drained:?}, upstream at {to} {reached:?}; root contexts configured +{}, wasm VMs created +{} (active {} → {active})",
            configured(&envoy) - configured_before,
            created - vms_before.0,
            vms_before.1,
        );
        assert_eq!(
            active, vms_before.1,
            "no new worker VM: the new root contexts run in the VMs there are"
        );
        assert!(
            in_force - applied < Duration::from_secs(1),
            "{from} → {to}: the capacity gauge follows the update within a second (a tick is {TICK_MS} ms): {:?}",
            in_force - applied
        );
        timings.push((from, to, applied, in_force - applied));
        measure(to);
    }

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
        .expect("nothing leaked across the ECDS updates");
    let seen = seen.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    let ok = seen.iter().filter(|(st, _)| *st == 200).count() as u64;
    eprintln!(
        "ecds: {} requests: {ok} × 200, {} errors; violations {}; counters admitted {} shed_full {} shed_timeout {}",
        seen.len(),
        errors.len(),
        ledger.violations(),
        s.outcome("rev-a", "admitted"),
        s.outcome("rev-a", "shed_full"),
        s.outcome("rev-a", "shed_timeout")
    );
    for (from, to, applied, to_gauge) in &timings {
        eprintln!("ecds: {from} → {to}: update counted after {applied:?}, capacity gauge {to_gauge:?} later (tick {TICK_MS} ms)");
    }
    assert!(
        errors.is_empty(),
        "every client got a final status: {errors:?}"
    );
    let not_ok: Vec<_> = seen.iter().filter(|(st, _)| *st != 200).collect();
    assert!(not_ok.is_empty(), "every request answered 200: {not_ok:?}");
    assert_eq!(
        ledger.violations(),
        0,
        "the upstream never held more than the limit in force: {:?}",
        ledger.violation_holders()
    );
    assert_eq!(
        s.outcome("rev-a", "admitted"),
        ok,
        "every admitted request answered 200"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The calls Envoy made into the wasm module on thread `tid` (its trace log), as
/// `proxy_on_tick(3)`.
fn calls(log: &str, tid: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.split(']').nth(1) == Some(&format!("[{tid}")))
        .filter_map(|l| l.split_once("[host->vm] "))
        .map(|(_, call)| call.trim().to_string())
        .collect()
}

/// What the filter relies on in Envoy's side of an ECDS update, and where it differs from an
/// LDS reload. After either, each worker's VM stays (Envoy creates the new configuration's
/// root context in the same VM: no new worker VM) and the old root context keeps serving its
/// streams: its waiters are woken through its queue, and its tick expires them. With LDS the
/// old root context lives as long as the old listener drains (ticking beside the new one for
/// up to the drain time, 600 s by default); with ECDS Envoy ends it (`proxy_on_done`) when its
/// last stream ends, and not before. A root context ended while a waiter of it is paused would
/// strand that waiter: nothing would wake or expire it.
///
/// One worker, so that its root contexts are told apart by id (the main thread numbers its
/// own); Envoy's trace log of the wasm calls shows which context Envoy calls.
#[test]
fn ecds_update_ends_the_old_root_context_with_its_last_stream() {
    const TICK: u64 = 100;
    let ledger = Ledger::new("rev-a", 1);
    let replica = Replica::start(ledger.clone()).unwrap();
    let dir = std::env::temp_dir().join(format!("inflight-ecds-root-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("inflight-filter.yaml");
    let gateway = |cc: u32| Gateway {
        plugin_config: plugin_config(cc, TICK),
        routes: vec![("a.test".into(), "rev-a".into())],
        clusters: vec![Cluster::fixed("rev-a", vec![replica.port()])],
        wasm: envoy::filter_wasm(),
        admin_port: None,
    };
    let (bootstrap, ecds) = ecds_configs(&gateway(1), &file);
    write_atomically(&file, &ecds);
    let envoy = Envoy::start(&bootstrap, 1).unwrap();
    envoy.admin_post("/logging?wasm=trace").unwrap();
    let addr = envoy.listener;

    // One request holds the only slot for 2 s, one waits behind it: both streams of the old
    // root context.
    let send = move |hold_ms: u64| {
        thread::spawn(move || {
            Request::get(addr, "a.test")
                .header("x-hold-ms", hold_ms)
                .send()
                .unwrap()
                .status
        })
    };
    let held = send(2000);
    envoy
        .wait_stats(Duration::from_secs(10), "one active", |s| {
            s.gauge("inflight_active", "rev-a") == 1
        })
        .unwrap();
    let waiter = send(0);
    envoy
        .wait_stats(Duration::from_secs(10), "one queued", |s| {
            s.gauge("inflight_queued", "rev-a") == 1
        })
        .unwrap();
    // The worker thread and its root context: the one the streams were created under
    // (`proxy_on_context_create(stream, root)`).
    let log = envoy.log();
    let (tid, old_root) = log
        .lines()
        .find_map(|l| {
            let (_, call) = l.split_once("[host->vm] proxy_on_context_create(")?;
            let (_, root) = call.trim_end_matches(')').split_once(", ")?;
            (root != "0").then(|| {
                let tid = l.split(']').nth(1).unwrap().trim_start_matches('[');
                (tid.to_string(), root.to_string())
            })
        })
        .expect("a stream context in the trace log");
    let tick = format!("proxy_on_tick({old_root})");
    let done = format!("proxy_on_done({old_root})");

    let updates = ecds_reloads(&envoy);
    write_atomically(&file, &ecds_configs(&gateway(2), &file).1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ecds_reloads(&envoy) == updates {
        assert!(Instant::now() < deadline, "ECDS update applied");
        thread::sleep(Duration::from_millis(5));
    }
    // Raised to 2: the waiter is granted at the next tick, while the first request is held.
    let w = waiter.join().unwrap();
    assert_eq!(w, 200, "the old root context's waiter is served");
    let ticks_before = calls(&envoy.log(), &tid)
        .iter()
        .filter(|c| **c == tick)
        .count();
    thread::sleep(Duration::from_millis(3 * TICK));
    let now = calls(&envoy.log(), &tid);
    assert!(
        !now.contains(&done),
        "the old root context lives while its stream does"
    );
    let ticks_after = now.iter().filter(|c| **c == tick).count();
    assert!(
        ticks_after > ticks_before,
        "the old root context still ticks after the update ({ticks_before} → {ticks_after})"
    );
    assert_eq!(held.join().unwrap(), 200);
    while !calls(&envoy.log(), &tid).contains(&done) {
        assert!(
            Instant::now() < deadline,
            "the old root context ends after its last stream"
        );
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(3 * TICK));
    let calls = calls(&envoy.log(), &tid);
    let ended = calls.iter().position(|c| *c == done).unwrap();
    assert!(
        !calls[ended..].contains(&tick),
        "no tick of the old root context after it ended"
    );
    assert!(
        calls[ended..]
            .iter()
            .any(|c| c.starts_with("proxy_on_tick(")),
        "the new root context ticks on"
    );
    eprintln!(
        "ecds: old root context {old_root} on worker thread {tid}: ticked {ticks_after} times, ended after its last stream"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Clients that leave just before an update: their slots are held `ABANDONED_HOLD_MS` (20 ms)
/// and released by their own (old) root context's tick. Envoy ends that root as soon as its
/// last stream ends — here at the update — so the root must stay until the hold is over
/// (`on_done` answers "not yet", and the filter says done after the release); otherwise the
/// slots stayed held until the dead-VM reaper, ≈ 5 s, under the new limit.
#[test]
fn slots_of_clients_that_left_just_before_an_update_are_released_at_once() {
    const TICK: u64 = 100;
    let up = inflight_host_tests::upstream::Upstream::start().unwrap();
    let dir = std::env::temp_dir().join(format!("inflight-ecds-hold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("inflight-filter.yaml");
    let gateway = |cc: u32| Gateway {
        plugin_config: plugin_config(cc, TICK),
        routes: vec![("a.test".into(), "rev-a".into())],
        clusters: vec![Cluster::fixed("rev-a", vec![up.port()])],
        wasm: envoy::filter_wasm(),
        admin_port: None,
    };
    let (bootstrap, ecds) = ecds_configs(&gateway(2), &file);
    write_atomically(&file, &ecds);
    let envoy = Envoy::start(&bootstrap, 2).unwrap();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            Request::get(envoy.listener, "a.test")
                .header("x-gate", 1)
                .start()
                .unwrap()
        })
        .collect();
    envoy
        .wait_stats(Duration::from_secs(10), "two active", |s| {
            s.gauge("inflight_active", "rev-a") == 2
        })
        .unwrap();
    let updates = ecds_reloads(&envoy);
    // Both clients leave, and the update follows at once (it lands within the 20 ms hold).
    drop(clients);
    let left = Instant::now();
    write_atomically(&file, &ecds_configs(&gateway(3), &file).1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ecds_reloads(&envoy) == updates {
        assert!(Instant::now() < deadline, "ECDS update applied");
        thread::sleep(Duration::from_millis(2));
    }
    let applied = left.elapsed();
    envoy
        .wait_stats(Duration::from_secs(2), "the held slots released", |s| {
            s.gauge("inflight_active", "rev-a") == 0
        })
        .unwrap();
    let released = left.elapsed();
    eprintln!(
        "clients left; update applied after {applied:?}; their slots released after {released:?} (tick {TICK} ms)"
    );
    assert!(
        released < Duration::from_millis(1_000),
        "released by the old root's tick, not the 5 s reaper: {released:?}"
    );
    up.open_gate();
    let _ = std::fs::remove_dir_all(&dir);
}
