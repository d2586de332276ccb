//! Criterion benchmarks of the per-request hot path in `inflight-core`.
//!
//! What the filter does per request, natively (the wasm build runs the same code in V8, a few
//! times slower): find the revision from `:authority`, then one CAS round on the revision's
//! shared state to admit (decode → `try_admit` → encode) and one to release (decode →
//! `release` → encode). Under contention the state carries the FIFO of waiters, kept as its
//! wire records, so each round's decode/encode copies O(queued) bytes in one slice copy (no
//! per-waiter parsing): the `*_queued/N` groups show how that grows.
//!
//! Run: `cargo bench -p inflight-core --bench admission` (add `-- --quick` for a fast pass).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use inflight_core::store::{Host, HostError};
use inflight_core::{Admission, Config, Limits, Owner, RequestFacts, RevisionState, Worker};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;

const OWNER: Owner = Owner { vm: 1, context: 7 };
const UNLIMITED: Limits = Limits {
    capacity: None,
    buffer: 0,
    per_endpoint: None,
};
const CAP_HIGH: Limits = Limits {
    capacity: Some(1_000_000),
    buffer: 1_000,
    per_endpoint: Some(1_000_000),
};

/// A state with `active == cap` and `n` waiters (the buffer in use).
fn contended(cap: u32, n: u32) -> (RevisionState, Limits) {
    let limits = Limits {
        capacity: Some(cap),
        buffer: n.saturating_add(1),
        per_endpoint: Some(cap),
    };
    let mut s = RevisionState::default();
    for c in 0..cap.saturating_add(n) {
        let _ = s.try_admit(
            limits,
            Owner {
                vm: c % 4,
                context: c,
            },
            u64::from(c),
        );
    }
    (s, limits)
}

fn admit_release(c: &mut Criterion) {
    let mut g = c.benchmark_group("admit_release");
    // With 10 endpoints known: the pick (least loaded, ties spread) and the per-endpoint
    // release, in the same two CAS rounds.
    g.bench_function(
        BenchmarkId::new("two_cas_rounds", "picking_10_endpoints"),
        |b| {
            let mut s = RevisionState::default();
            let addresses: Vec<String> = (1..=10).map(|i| format!("10.0.0.{i}:8080")).collect();
            s.set_endpoints(addresses.iter().map(|a| (a.as_str(), true)));
            let mut bytes = s.encode();
            b.iter(|| {
                let mut s = RevisionState::decode(black_box(&bytes)).unwrap_or_default();
                let a = s.try_admit(CAP_HIGH, OWNER, 1);
                bytes = s.encode();
                let id = match &a {
                    Admission::Admitted {
                        endpoint: Some(p), ..
                    } => p.id,
                    _ => 0,
                };
                let mut s = RevisionState::decode(black_box(&bytes)).unwrap_or_default();
                let grants = s.release(1, id, CAP_HIGH, 2);
                bytes = s.encode();
                black_box((a, grants))
            })
        },
    );
    for (name, limits) in [("unlimited", UNLIMITED), ("cap_not_hit", CAP_HIGH)] {
        g.bench_function(BenchmarkId::new("in_memory", name), |b| {
            let mut s = RevisionState::default();
            b.iter(|| {
                let a = s.try_admit(black_box(limits), OWNER, 1);
                let grants = s.release(1, 0, limits, 2);
                black_box((a, grants))
            })
        });
        // The filter's real cost per request: two CAS rounds, each decode → apply → encode.
        g.bench_function(BenchmarkId::new("two_cas_rounds", name), |b| {
            let mut bytes = RevisionState::default().encode();
            b.iter(|| {
                let mut s = RevisionState::decode(black_box(&bytes)).unwrap_or_default();
                let a = s.try_admit(limits, OWNER, 1);
                bytes = s.encode();
                let mut s = RevisionState::decode(black_box(&bytes)).unwrap_or_default();
                let grants = s.release(1, 0, limits, 2);
                bytes = s.encode();
                black_box((a, grants))
            })
        });
    }
    g.finish();
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec_queued");
    for n in [0u32, 10, 100, 1_000] {
        let (s, _) = contended(10, n);
        let bytes = s.encode();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", n), &s, |b, s| {
            b.iter(|| black_box(s.encode()))
        });
        g.bench_with_input(BenchmarkId::new("decode", n), &bytes, |b, bytes| {
            b.iter(|| black_box(RevisionState::decode(black_box(bytes))))
        });
    }
    g.finish();
}

fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention_queued");
    for n in [1u32, 10, 100, 1_000] {
        // A slot frees with N waiters: the oldest is granted; a new arrival queues behind.
        // In memory only, then as the filter does it (two CAS rounds of decode/apply/encode).
        let (start, limits) = contended(10, n);
        g.bench_with_input(BenchmarkId::new("release_grant_queue", n), &n, |b, _| {
            let mut s = start.clone();
            let mut ctx = 0u32;
            b.iter(|| {
                let grants = s.release(1, 0, limits, 5);
                ctx = ctx.wrapping_add(1);
                let a = s.try_admit(
                    limits,
                    Owner {
                        vm: 1,
                        context: ctx,
                    },
                    5,
                );
                debug_assert!(matches!(a, Admission::Queued { .. }));
                black_box((grants, a))
            })
        });
        g.bench_with_input(BenchmarkId::new("two_cas_rounds", n), &n, |b, _| {
            let mut bytes = start.encode();
            let mut ctx = 0u32;
            b.iter(|| {
                let mut s = RevisionState::decode(&bytes).unwrap_or_default();
                let grants = s.release(1, 0, limits, 5);
                bytes = s.encode();
                let mut s = RevisionState::decode(&bytes).unwrap_or_default();
                ctx = ctx.wrapping_add(1);
                let a = s.try_admit(
                    limits,
                    Owner {
                        vm: 1,
                        context: ctx,
                    },
                    5,
                );
                bytes = s.encode();
                black_box((grants, a))
            })
        });
        // A waiter leaves (client gone or wait timeout): cancel searches the FIFO.
        g.bench_with_input(BenchmarkId::new("cancel_newest", n), &n, |b, _| {
            let mut s = start.clone();
            let mut ctx = 0u32;
            b.iter(|| {
                ctx = ctx.wrapping_add(1);
                if let Admission::Queued { ticket } = s.try_admit(
                    limits,
                    Owner {
                        vm: 1,
                        context: ctx,
                    },
                    5,
                ) {
                    black_box(s.cancel(ticket, 5));
                }
                // Keep the queue at N: the arrival above found the buffer full only if N is.
            })
        });
    }
    g.finish();
}

fn identify(c: &mut Criterion) {
    let config = Config::parse(
        br#"{"revisions":[
            {"name":"a","hosts":["a.example.com"]},
            {"name":"b","hosts":["bench.test","*.bench.example.com"]}]}"#,
    );
    let Ok(config) = config else {
        return;
    };
    let mut g = c.benchmark_group("match_host");
    for (name, host) in [
        ("exact", "bench.test"),
        ("exact_port", "bench.test:8080"),
        ("wildcard", "x.bench.example.com"),
        ("mixed_case", "Bench.Test"),
        ("miss", "other.example.org"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(config.table.match_host(black_box(host))))
        });
    }
    g.finish();
}

/// Shared data as Envoy keeps it (a map of bytes and CAS values), for the worker's whole path.
#[derive(Default)]
struct MapHost {
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    cas: RefCell<u32>,
}

impl Host for MapHost {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError> {
        Ok(match self.shared.borrow().get(key) {
            Some((v, c)) => (Some(v.clone()), Some(*c)),
            None => (None, None),
        })
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        let mut shared = self.shared.borrow_mut();
        if let (Some(c), Some((_, now))) = (cas, shared.get(key)) {
            if c != *now {
                return Err(HostError::CasMismatch);
            }
        }
        let mut n = self.cas.borrow_mut();
        *n += 1;
        shared.insert(key.to_string(), (value.to_vec(), *n));
        Ok(())
    }
    fn register_queue(&self, _name: &str) -> Result<u32, HostError> {
        Ok(1)
    }
    fn enqueue(&self, _token: u32, _message: &[u8]) -> Result<(), HostError> {
        Ok(())
    }
}

struct Facts;

impl RequestFacts for Facts {
    fn authority(&self) -> Option<String> {
        Some("r0.example.com".into())
    }
    fn cluster(&self) -> Option<String> {
        None
    }
    fn header(&self, _name: &str) -> Option<String> {
        None
    }
}

/// The worker's whole request path (identify, admit, route, count; then the end), natively:
/// with slot leases (the default: one recall-epoch read, no write) and without (two swaps of
/// the revision record), limit never reached.
fn worker_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker_request");
    for (name, slots) in [("slot_lease", 8), ("no_lease", 0)] {
        let config = format!(
            r#"{{"revisions":[{{"name":"r0","hosts":["r0.example.com"],"containerConcurrency":1000000,"readyReplicas":1,"bufferDepth":1000}}],"slotLease":{{"slots":{slots}}}}}"#
        );
        let Ok(mut w) = Worker::start(MapHost::default()) else {
            return;
        };
        if w.configure(config.as_bytes(), 0).is_err() {
            return;
        }
        let mut effects = Vec::new();
        let mut t = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                t += 1;
                let v = w.on_request(7, &Facts, t);
                w.on_done(7, true, t);
                w.take_effects(&mut effects);
                effects.clear();
                black_box(v)
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    admit_release,
    codec,
    contention,
    identify,
    worker_path
);
criterion_main!(benches);
