//! What the simulated Envoy process holds across its workers: the virtual clock, shared data
//! (with Envoy's CAS rules), shared queues (last registrant is notified), process-wide metrics,
//! every stream the test started, and what the test reads back (logs, resumes, anomalies).

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{End, LogLine, Reply, Req, Resume, State};

/// Status codes of the proxy-wasm ABI (the SDK's `types::Status`, plus Envoy's extras).
pub mod status {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
    pub const BAD_ARGUMENT: u32 = 2;
    pub const SERIALIZATION_FAILURE: u32 = 3;
    pub const INVALID_MEMORY_ACCESS: u32 = 6;
    pub const EMPTY: u32 = 7;
    pub const CAS_MISMATCH: u32 = 8;
    pub const INTERNAL_FAILURE: u32 = 10;
    pub const UNIMPLEMENTED: u32 = 12;
}

pub type Headers = Vec<(String, Vec<u8>)>;

/// Where a stream is in its life, as the host drives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    pub worker: usize,
    /// The VM generation (a worker's VM restarted after a crash is a new generation).
    pub generation: u32,
    pub ctx: u32,
    pub started_ms: u64,
    pub request_headers: Headers,
    pub request_body: Vec<u8>,
    pub response_headers: Option<Headers>,
    pub response_body: Vec<u8>,
    pub properties: HashMap<String, Vec<u8>>,
    pub state: State,
    pub ended: Option<End>,
    /// The request headers as they went upstream (set when the request left the filter).
    pub upstream_headers: Option<Headers>,
    /// `continue_stream` was called while `on_request_headers` of this stream was running.
    pub continue_in_headers: bool,
    /// on_log is running: missing maps read as empty, like Envoy's access-log phase.
    pub log_phase: bool,
}

impl Stream {
    /// The request is past the filter and not finished: what the upstream sees.
    pub fn is_upstream(&self) -> bool {
        self.ended.is_none() && matches!(self.state, State::Admitted | State::Resumed { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Copy)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metric {
    pub kind: MetricKind,
    /// Counter or gauge value as Envoy keeps it (u64: a gauge below zero wraps).
    pub value: u64,
    /// Histogram samples in the order they were recorded.
    pub samples: Vec<u64>,
}

pub struct Queue {
    pub name: String,
    /// (worker, VM generation, root context) of the last VM that registered the name.
    pub owner: (usize, u32, u32),
    pub items: VecDeque<Vec<u8>>,
}

/// A notification posted to a worker's event loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    QueueReady {
        worker: usize,
        generation: u32,
        root_ctx: u32,
        token: u32,
    },
}

/// A host call the test made fail.
#[derive(Clone, Debug)]
pub struct TrapFault {
    pub worker: Option<usize>,
    pub hostcall: String,
    /// Calls to let through before trapping.
    pub skip: u32,
}

#[derive(Default, Clone, Debug)]
pub struct Faults {
    /// The next N `proxy_set_shared_data` calls that carry a CAS on an existing key fail with
    /// `CasMismatch`, as if another worker had written the key first.
    pub cas_mismatch_next: u32,
    pub traps: Vec<TrapFault>,
}

/// A `dispatch_http_call` the filter made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCall {
    pub token: u32,
    pub worker: usize,
    pub generation: u32,
    pub ctx: u32,
    pub upstream: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
    pub answered: bool,
}

/// A VM that trapped (or was killed by the test).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrapRecord {
    pub worker: usize,
    pub generation: u32,
    pub at_ms: u64,
    pub message: String,
}

#[derive(Default)]
pub struct World {
    pub now_ns: u64,
    pub epoch_ns: u64,
    pub vm_id: String,
    pub log_level: u32,
    pub echo_logs: bool,
    pub shared: HashMap<String, (Vec<u8>, u32)>,
    pub next_cas: u32,
    pub queue_tokens: HashMap<String, u32>,
    pub queues: HashMap<u32, Queue>,
    pub next_queue_token: u32,
    pub metrics: BTreeMap<String, Metric>,
    pub streams: Vec<Stream>,
    pub logs: Vec<LogLine>,
    pub anomalies: Vec<String>,
    pub traps: Vec<TrapRecord>,
    pub resumes: Vec<Resume>,
    pub events: VecDeque<Event>,
    pub dropped_events: Vec<Event>,
    pub faults: Faults,
    pub http_calls: Vec<HttpCall>,
    pub hostcall_counts: HashMap<&'static str, u64>,
}

impl World {
    pub fn new() -> Self {
        World {
            next_cas: 1,
            next_queue_token: 1,
            log_level: 2,
            ..World::default()
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ns / 1_000_000
    }

    pub fn anomaly(&mut self, worker: usize, what: impl Into<String>) {
        let line = format!("[t={}ms w{}] {}", self.now_ms(), worker, what.into());
        if self.echo_logs {
            eprintln!("emu anomaly: {line}");
        }
        self.anomalies.push(line);
    }

    /// Envoy's `SharedData::nextCas`: never 0, which means "no CAS".
    fn take_cas(&mut self) -> u32 {
        let cas = self.next_cas;
        self.next_cas = self.next_cas.wrapping_add(1);
        if self.next_cas == 0 {
            self.next_cas = 1;
        }
        cas
    }

    /// Envoy's shared-data set: a CAS is checked only when the key exists (a set with a CAS
    /// on a missing key creates it); CAS 0 is unconditional.
    pub fn set_shared(&mut self, key: &str, value: Vec<u8>, cas: u32) -> u32 {
        if cas != 0 && self.faults.cas_mismatch_next > 0 && self.shared.contains_key(key) {
            // As if another worker wrote the key first: its CAS moves on, the value stays.
            self.faults.cas_mismatch_next -= 1;
            let bumped = self.take_cas();
            if let Some(entry) = self.shared.get_mut(key) {
                entry.1 = bumped;
            }
            return status::CAS_MISMATCH;
        }
        let next = self.take_cas();
        match self.shared.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return status::CAS_MISMATCH;
                }
                *entry = (value, next);
            }
            None => {
                self.shared.insert(key.to_string(), (value, next));
            }
        }
        status::OK
    }

    pub fn register_queue(&mut self, name: &str, owner: (usize, u32, u32)) -> u32 {
        let token = match self.queue_tokens.get(name) {
            Some(t) => *t,
            None => {
                let t = self.next_queue_token;
                self.next_queue_token += 1;
                self.queue_tokens.insert(name.to_string(), t);
                t
            }
        };
        let q = self.queues.entry(token).or_insert_with(|| Queue {
            name: name.to_string(),
            owner,
            items: VecDeque::new(),
        });
        q.owner = owner;
        token
    }

    pub fn enqueue(&mut self, token: u32, value: Vec<u8>) -> u32 {
        let Some(q) = self.queues.get_mut(&token) else {
            return status::NOT_FOUND;
        };
        q.items.push_back(value);
        let (worker, generation, root_ctx) = q.owner;
        self.events.push_back(Event::QueueReady {
            worker,
            generation,
            root_ctx,
            token,
        });
        status::OK
    }

    pub fn stream(&self, r: Req) -> &Stream {
        &self.streams[r.0]
    }

    pub fn stream_mut(&mut self, r: Req) -> &mut Stream {
        &mut self.streams[r.0]
    }

    /// Takes a matching trap fault, if the test armed one for this host call.
    pub fn take_trap(&mut self, worker: usize, hostcall: &str) -> bool {
        let pos = self
            .faults
            .traps
            .iter()
            .position(|f| f.hostcall == hostcall && f.worker.is_none_or(|w| w == worker));
        let Some(i) = pos else { return false };
        if self.faults.traps[i].skip > 0 {
            self.faults.traps[i].skip -= 1;
            return false;
        }
        self.faults.traps.remove(i);
        true
    }

    pub fn record_resume(&mut self, r: Req, worker: usize) {
        let at_ms = self.now_ms();
        let s = &mut self.streams[r.0];
        s.state = State::Resumed { worker, at_ms };
        s.upstream_headers = Some(s.request_headers.clone());
        self.resumes.push(Resume {
            req: r,
            worker,
            at_ms,
        });
    }

    pub fn record_local_reply(&mut self, r: Req, reply: Reply) {
        self.streams[r.0].state = State::LocalReply(reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_follows_envoy_cas_rules() {
        let mut w = World::new();
        // A CAS on a missing key is ignored: the key is created.
        assert_eq!(w.set_shared("k", b"1".to_vec(), 12345), status::OK);
        let cas = w.shared["k"].1;
        assert_ne!(cas, 0);
        assert_eq!(
            w.set_shared("k", b"2".to_vec(), cas + 1),
            status::CAS_MISMATCH
        );
        assert_eq!(w.shared["k"].0, b"1");
        assert_eq!(w.set_shared("k", b"2".to_vec(), cas), status::OK);
        assert_eq!(
            w.set_shared("k", b"3".to_vec(), cas),
            status::CAS_MISMATCH,
            "stale"
        );
        assert_eq!(
            w.set_shared("k", b"3".to_vec(), 0),
            status::OK,
            "0 = unconditional"
        );
        assert_eq!(w.shared["k"].0, b"3");
    }

    #[test]
    fn injected_mismatch_moves_the_cas_of_existing_keys_only() {
        let mut w = World::new();
        w.faults.cas_mismatch_next = 2;
        assert_eq!(
            w.set_shared("new", b"1".to_vec(), 7),
            status::OK,
            "missing key"
        );
        let cas = w.shared["new"].1;
        assert_eq!(
            w.set_shared("new", b"2".to_vec(), cas),
            status::CAS_MISMATCH
        );
        assert_ne!(w.shared["new"].1, cas, "as if someone else wrote");
        assert_eq!(
            w.set_shared("new", b"2".to_vec(), 0),
            status::OK,
            "unconditional"
        );
        assert_eq!(w.faults.cas_mismatch_next, 1);
    }

    #[test]
    fn queue_notifies_the_last_registrant() {
        let mut w = World::new();
        let t = w.register_queue("q", (0, 0, 1));
        assert_eq!(w.register_queue("q", (2, 0, 1)), t, "same name, same token");
        assert_eq!(w.enqueue(t, b"x".to_vec()), status::OK);
        assert_eq!(
            w.events.pop_front(),
            Some(Event::QueueReady {
                worker: 2,
                generation: 0,
                root_ctx: 1,
                token: t
            })
        );
        assert_eq!(w.enqueue(t + 1, b"x".to_vec()), status::NOT_FOUND);
    }

    #[test]
    fn armed_trap_fires_after_skips_once() {
        let mut w = World::new();
        w.faults.traps.push(TrapFault {
            worker: Some(1),
            hostcall: "proxy_log".into(),
            skip: 1,
        });
        assert!(!w.take_trap(0, "proxy_log"), "other worker");
        assert!(!w.take_trap(1, "proxy_log"), "skipped");
        assert!(w.take_trap(1, "proxy_log"));
        assert!(!w.take_trap(1, "proxy_log"), "fired once");
    }
}
