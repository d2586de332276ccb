//! A fleet of real gateway Envoys (docs/fleet.md, issue #15): several gateways split every
//! pod's `containerConcurrency`, behind an L4 Envoy or with clients straight on one gateway.
//! Each test upstream records what it holds at every instant, so "every pod ≤ cc" is measured
//! at the pods, across the whole fleet.
//!
//! Needs `.venv/bin/envoy` (`make setup`); builds filter.wasm itself. One scenario at a time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::fleet::{self, Fleet, Load, Revision, Spec, Tally};
use inflight_host_tests::upstream::{Group, Upstream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn upstreams(n: usize, group: &Arc<Group>) -> Vec<Arc<Upstream>> {
    (0..n)
        .map(|_| Arc::new(Upstream::start_in(Some(Arc::clone(group))).unwrap()))
        .collect()
}

fn ports(ups: &[Arc<Upstream>]) -> Vec<u16> {
    ups.iter().map(|u| u.port()).collect()
}

#[test]
fn the_fleet_bootstraps_are_valid_envoy_configs() {
    let spec = Spec::new(3, vec![Revision::new("rev-a", "a.test", 4, vec![1, 2])]);
    fleet::validate(&spec).unwrap();
}

/// Each gateway alone (no `fleet` key): the harness's listeners, clusters and L4 Envoy carry
/// requests; without the split every gateway allows cc per pod.
#[test]
fn gateways_without_fleet_serve_through_the_l4_envoy_and_directly() {
    let _g = serial();
    let group = Group::new();
    let ups = upstreams(2, &group);
    let mut spec = Spec::new(3, vec![Revision::new("rev-a", "a.test", 4, ports(&ups))]);
    spec.fleet = None;
    let fleet = Fleet::start(spec).unwrap();
    fleet.wait_ready(&fleet.all(), 1).unwrap();
    let mut addrs = vec![fleet.front().unwrap(); 6];
    addrs.extend((0..3).map(|i| fleet.public(i)));
    addrs.extend((0..3).map(|i| fleet.peer(i)));
    let load = Load::start(
        &addrs,
        "a.test",
        Duration::from_millis(20),
        Duration::from_secs(10),
    );
    thread::sleep(Duration::from_secs(2));
    let out = load.finish();
    let t = Tally::of(&out);
    eprintln!(
        "{t:?}; per endpoint max {:?}",
        ups.iter().map(|u| u.max_concurrency()).collect::<Vec<_>>()
    );
    assert_eq!(t.ok, t.total(), "{t:?}");
}
