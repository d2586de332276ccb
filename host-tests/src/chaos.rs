//! Chaos support for the hardening suites: upstream replicas that can be killed and restarted,
//! an exact per-revision concurrency ledger, and a seeded load run with client disconnects,
//! upstream resets and 5xx.
//!
//! Why not [`crate::upstream`]: a replica there keeps serving connections it already accepted
//! when dropped (it cannot be killed), and a request whose client left stays counted until its
//! hold ends — a gateway that correctly frees the slot when the client leaves would then show a
//! "violation" that is the test's own. The [`Ledger`] here counts a held request as gone as soon
//! as the gateway closed its connection, and it notices that causally: before counting a new
//! arrival it probes every held connection of the revision for a close. The gateway's close of
//! the old upstream connection happens before it grants the slot that the new arrival uses, and
//! loopback delivers the close before the new request's bytes, so the probe never misses it.
//! Plain version: `enter: current += 1; violation if current > limit` and `leave: current -= 1`,
//! with `leave` also applied to every held connection found closed before an `enter`.

use crate::client::Request;
use crate::envoy::{self, Cluster, Envoy, Gateway};
use anyhow::{bail, Context as _, Result};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Default)]
struct LedgerInner {
    current: u32,
    max: u32,
    window_max: u32,
    violations: u64,
    total: u64,
    next: u64,
    /// Requests counted now; held ones carry a probe (a clone of their connection, non-blocking).
    live: HashMap<u64, Option<TcpStream>>,
    /// `x-id`s that reached a replica.
    arrived: HashSet<String>,
    /// Each violation: when, and the `x-id`s held then (the arrival included).
    violation_log: Vec<(Instant, Vec<String>)>,
    ids: HashMap<u64, String>,
    /// Held requests that left because the gateway closed their connection, and when.
    closed_by_gateway: HashMap<u64, Instant>,
}

/// Concurrency one revision's replicas hold together, against its hard limit.
pub struct Ledger {
    pub name: String,
    limit: Mutex<u32>,
    inner: Mutex<LedgerInner>,
}

/// Whether the peer closed (or reset) a non-blocking connection.
fn closed(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted,
    }
}

impl Ledger {
    pub fn new(name: &str, limit: u32) -> Arc<Ledger> {
        Arc::new(Ledger {
            name: name.into(),
            limit: Mutex::new(limit),
            inner: Mutex::new(LedgerInner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LedgerInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the hard limit arrivals are checked against (a config reload).
    pub fn set_limit(&self, limit: u32) {
        *self.limit.lock().unwrap_or_else(|e| e.into_inner()) = limit;
    }

    pub fn limit(&self) -> u32 {
        *self.limit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an arrival; a held one is registered with its probe in the same step, so no
    /// later arrival can miss its close.
    fn enter(&self, id: Option<&str>, probe: Option<TcpStream>) -> u64 {
        let limit = self.limit();
        let mut g = self.lock();
        let gone: Vec<u64> = g
            .live
            .iter()
            .filter(|(_, probe)| probe.as_ref().is_some_and(closed))
            .map(|(k, _)| *k)
            .collect();
        let now = Instant::now();
        for k in gone {
            g.live.remove(&k);
            g.current = g.current.saturating_sub(1);
            g.closed_by_gateway.insert(k, now);
        }
        g.current += 1;
        g.max = g.max.max(g.current);
        g.window_max = g.window_max.max(g.current);
        g.total += 1;
        if g.current > limit {
            g.violations += 1;
            let mut held: Vec<String> = g
                .live
                .keys()
                .filter_map(|k| g.ids.get(k).cloned())
                .collect();
            held.extend(id.map(str::to_string));
            g.violation_log.push((now, held));
        }
        if let Some(id) = id {
            g.arrived.insert(id.to_string());
        }
        let key = g.next;
        g.next += 1;
        g.live.insert(key, probe);
        if let Some(id) = id {
            g.ids.insert(key, id.to_string());
        }
        key
    }

    fn is_live(&self, key: u64) -> bool {
        self.lock().live.contains_key(&key)
    }

    /// A held request leaves because the gateway closed its connection.
    fn leave_closed(&self, key: u64) {
        let mut g = self.lock();
        if g.live.remove(&key).is_some() {
            g.current = g.current.saturating_sub(1);
            g.closed_by_gateway.insert(key, Instant::now());
        }
    }

    /// For each violation, the `x-id`s held at that moment.
    pub fn violation_holders(&self) -> Vec<Vec<String>> {
        self.lock()
            .violation_log
            .iter()
            .map(|(_, ids)| ids.clone())
            .collect()
    }

    /// The request `key` leaves (idempotent).
    fn leave(&self, key: u64) {
        let mut g = self.lock();
        if g.live.remove(&key).is_some() {
            g.current = g.current.saturating_sub(1);
        }
    }

    /// Most requests held at once, together, over the whole run.
    pub fn max(&self) -> u32 {
        self.lock().max
    }

    /// Most requests held at once since the last [`Ledger::reset_window`].
    pub fn window_max(&self) -> u32 {
        self.lock().window_max
    }

    pub fn reset_window(&self) {
        let mut g = self.lock();
        g.window_max = g.current;
    }

    /// Arrivals that found more than the limit held (the arrival included).
    pub fn violations(&self) -> u64 {
        self.lock().violations
    }

    pub fn current(&self) -> u32 {
        self.lock().current
    }

    pub fn total(&self) -> u64 {
        self.lock().total
    }

    pub fn arrived(&self, id: &str) -> bool {
        self.lock().arrived.contains(id)
    }
}

struct ReplicaState {
    ledger: Arc<Ledger>,
    killed: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    keys: Mutex<HashSet<u64>>,
}

/// One upstream replica on 127.0.0.1 that can be killed (listener closed, every connection
/// reset, held requests dropped) and started again on the same port.
///
/// Requests steer it with headers: `x-hold-ms: N` (answer after N ms, or leave when the gateway
/// closes the connection), `x-status: N`, `x-reset: 1` (close without an answer), `x-id`.
pub struct Replica {
    addr: SocketAddr,
    state: Arc<ReplicaState>,
}

impl Replica {
    pub fn start(ledger: Arc<Ledger>) -> Result<Replica> {
        Self::start_on(0, ledger)
    }

    /// Starts on `port` (0: any free port); retries a busy port for a few seconds.
    pub fn start_on(port: u16, ledger: Arc<Ledger>) -> Result<Replica> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).with_context(|| format!("binding 127.0.0.1:{port}")),
            }
        };
        let addr = listener.local_addr()?;
        let state = Arc::new(ReplicaState {
            ledger,
            killed: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            keys: Mutex::new(HashSet::new()),
        });
        let s = Arc::clone(&state);
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.killed.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                if let Ok(c) = conn.try_clone() {
                    s.conns.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                }
                let s = Arc::clone(&s);
                thread::spawn(move || serve(conn, &s));
            }
        });
        Ok(Replica { addr, state })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Kills the replica: stops accepting, drops every held request, resets every connection.
    pub fn kill(&self) {
        if self.state.killed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept loop so it sees `killed` and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        let keys: Vec<u64> = self
            .state
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for k in keys {
            self.state.ledger.leave(k);
        }
        for c in self
            .state
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(conn: TcpStream, s: &ReplicaState) {
    let _ = conn.set_nodelay(true);
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let Ok(probe_src) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut headers: Vec<(String, String)> = Vec::new();
        let mut content_length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim().to_string();
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                }
                headers.push((k, v));
            }
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let hold = get("x-hold-ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        // Held: probe-able by other arrivals (non-blocking clone); leave early if the gateway
        // closes the connection.
        let probe = if hold > 0 {
            match probe_src.try_clone() {
                Ok(p) if p.set_nonblocking(true).is_ok() => Some(p),
                _ => return,
            }
        } else {
            None
        };
        let key = s.ledger.enter(get("x-id"), probe);
        s.keys.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
        let leave = |s: &ReplicaState| {
            s.keys
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            s.ledger.leave(key);
        };
        if s.killed.load(Ordering::SeqCst) {
            leave(s);
            return;
        }
        if hold > 0 {
            let deadline = Instant::now() + Duration::from_millis(hold);
            loop {
                if !s.ledger.is_live(key) || s.killed.load(Ordering::SeqCst) {
                    leave(s);
                    return;
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                if closed(&probe_src) {
                    s.keys
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    s.ledger.leave_closed(key);
                    return;
                }
                thread::sleep((deadline - now).min(Duration::from_millis(2)));
            }
            // Unregister the probe before the socket is blocking again.
            leave(s);
            if probe_src.set_nonblocking(false).is_err() {
                return;
            }
        } else {
            leave(s);
        }
        if get("x-reset").is_some() {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        let status: u16 = get("x-status").and_then(|v| v.parse().ok()).unwrap_or(200);
        let body = format!("ok {}\n", get("x-id").unwrap_or(""));
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A small deterministic generator (xorshift64*), so a failing run can be repeated by seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `pct` %.
    pub fn percent(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// One revision of the chaos run.
#[derive(Debug, Clone)]
pub struct RevisionPlan {
    pub name: String,
    pub cc: u32,
    pub replicas: u32,
    pub buffer: u32,
    pub max_wait_ms: u64,
    /// Upstream hold times to draw from, ms.
    pub holds: Vec<u64>,
}

impl RevisionPlan {
    pub fn host(&self) -> String {
        format!("{}.chaos.test", self.name)
    }

    pub fn limit(&self) -> u32 {
        self.cc * self.replicas
    }
}

/// What the chaos run does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub requests: u64,
    pub clients: u32,
    pub workers: u32,
    pub seed: u64,
    pub revisions: Vec<RevisionPlan>,
    /// Share of clients that leave before their answer (while queued or in flight), %.
    pub disconnect_pct: u64,
    /// Share of requests the upstream resets, and answers with a 500, %.
    pub reset_pct: u64,
    pub error_pct: u64,
    /// Kill replica 0 of revision 0 after this share of requests (%), restart it after that one.
    pub kill_at_pct: u64,
    pub restart_at_pct: u64,
    pub wasm: PathBuf,
}

impl Plan {
    /// Three revisions with different limits, latencies, buffers and wait bounds.
    pub fn standard(requests: u64, clients: u32, wasm: PathBuf) -> Plan {
        Plan {
            requests,
            clients,
            workers: 4,
            seed: 0x1f1f_2024,
            revisions: vec![
                RevisionPlan {
                    name: "rev-a".into(),
                    cc: 2,
                    replicas: 2,
                    buffer: 40,
                    max_wait_ms: 3_000,
                    holds: vec![0, 2, 5, 10, 20],
                },
                RevisionPlan {
                    name: "rev-b".into(),
                    cc: 3,
                    replicas: 1,
                    buffer: 6,
                    max_wait_ms: 2_000,
                    holds: vec![1, 10, 40],
                },
                RevisionPlan {
                    name: "rev-c".into(),
                    cc: 1,
                    replicas: 2,
                    buffer: 30,
                    max_wait_ms: 800,
                    holds: vec![5, 30, 80, 150],
                },
            ],
            disconnect_pct: 10,
            reset_pct: 5,
            error_pct: 5,
            kill_at_pct: 40,
            restart_at_pct: 60,
            wasm,
        }
    }

    pub fn plugin_config(&self) -> serde_json::Value {
        let revisions: Vec<serde_json::Value> = self
            .revisions
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "hosts": [r.host()], "containerConcurrency": r.cc,
                    "readyReplicas": r.replicas, "bufferDepth": r.buffer,
                    "maxWait": format!("{}ms", r.max_wait_ms), "target": 10,
                })
            })
            .collect();
        serde_json::json!({ "revisions": revisions, "tick": "50ms", "retryAfter": "1s" })
    }
}

/// What one client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Seen {
    Ok,
    /// 5xx the upstream was asked for.
    Upstream5xx,
    /// 503 from Envoy without a shed header: upstream reset or refused (killed replica).
    Gateway5xx,
    ShedFull,
    ShedTimeout,
    /// The client left before an answer came (planned).
    Left,
    /// No final status before the hang bound (a hung request).
    Hung,
    /// The connection closed without a status line.
    ClosedWithoutStatus,
    /// Anything else (another status or shed reason).
    Unexpected,
}

/// Per-revision figures.
#[derive(Debug, Clone, Default)]
pub struct RevisionReport {
    pub name: String,
    pub limit: u32,
    pub seen: HashMap<String, u64>,
    pub left_after_reaching_upstream: u64,
    pub counters: HashMap<String, u64>,
    pub upstream_max: u32,
    pub violations: u64,
    /// Violations where a request held at that moment belonged to a client that had left:
    /// the gateway freed its slot before closing its upstream connection.
    pub violations_after_client_left: u64,
    pub leaked_active: u64,
    pub leaked_queued: u64,
}

impl RevisionReport {
    pub fn seen(&self, what: &str) -> u64 {
        self.seen.get(what).copied().unwrap_or(0)
    }

    pub fn counter(&self, outcome: &str) -> u64 {
        self.counters.get(outcome).copied().unwrap_or(0)
    }
}

/// The figures of a chaos run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub requests: u64,
    /// Clients planned to leave early, and those that left before an answer came.
    pub leavers_planned: u64,
    pub left: u64,
    pub resets_planned: u64,
    pub errors_planned: u64,
    pub kills: u64,
    pub restarts: u64,
    pub violations: u64,
    pub hung: u64,
    pub closed_without_status: u64,
    pub unexpected: u64,
    pub leaked: u64,
    pub duration: Duration,
    pub revisions: Vec<RevisionReport>,
    pub examples: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos: {} requests in {:.1?} ({:.0} req/s); {} clients left before their answer ({} planned to); planned {} upstream resets, {} upstream 5xx; replica kills {} (restarts {})",
            self.requests,
            self.duration,
            self.requests as f64 / self.duration.as_secs_f64().max(1e-9),
            self.left,
            self.leavers_planned,
            self.resets_planned,
            self.errors_planned,
            self.kills,
            self.restarts
        )?;
        writeln!(
            f,
            "chaos: violations {}, hung {}, closed without status {}, unexpected {}, leaked {}",
            self.violations, self.hung, self.closed_without_status, self.unexpected, self.leaked
        )?;
        for r in &self.revisions {
            let mut seen: Vec<_> = r.seen.iter().collect();
            seen.sort();
            let mut counters: Vec<_> = r.counters.iter().collect();
            counters.sort();
            writeln!(
                f,
                "  {} (limit {}): upstream max {} violations {}; clients saw {:?}; left after reaching upstream {}; counters {:?}; active {} queued {}",
                r.name, r.limit, r.upstream_max, r.violations, seen, r.left_after_reaching_upstream, counters, r.leaked_active, r.leaked_queued
            )?;
            if r.violations > 0 {
                writeln!(
                    f,
                    "    of the violations, {} had a request of a client that left among those held",
                    r.violations_after_client_left
                )?;
            }
        }
        Ok(())
    }
}

impl Report {
    pub fn violations_after_client_left(&self) -> u64 {
        self.revisions
            .iter()
            .map(|r| r.violations_after_client_left)
            .sum()
    }

    /// Every invariant the run must keep; the error lists each one broken.
    pub fn check(&self) -> Result<()> {
        let mut broken = Vec::new();
        if self.violations != 0 {
            broken.push(format!(
                "{} hard-limit violations at the upstreams ({} with a departed client's request among those held)",
                self.violations,
                self.violations_after_client_left()
            ));
        }
        if self.hung != 0 || self.closed_without_status != 0 || self.unexpected != 0 {
            broken.push(format!(
                "{} hung, {} closed without status, {} unexpected answers: {:?}",
                self.hung, self.closed_without_status, self.unexpected, self.examples
            ));
        }
        if self.leaked != 0 {
            broken.push(format!("{} slots or waiters leaked", self.leaked));
        }
        for r in &self.revisions {
            let sent: u64 = r.seen.values().sum();
            let counted: u64 = ["admitted", "shed_full", "shed_timeout", "cancelled"]
                .iter()
                .map(|o| r.counter(o))
                .sum();
            if counted != sent {
                broken.push(format!(
                    "{}: counters sum to {counted}, clients sent {sent}",
                    r.name
                ));
            }
            // A client that left may still have been shed (its request reached the filter
            // before Envoy saw it leave): those sheds are counted but not seen.
            let unseen_full = r.counter("shed_full").checked_sub(r.seen("shed_full"));
            let unseen_timeout = r
                .counter("shed_timeout")
                .checked_sub(r.seen("shed_timeout"));
            let (Some(unseen_full), Some(unseen_timeout)) = (unseen_full, unseen_timeout) else {
                broken.push(format!(
                    "{}: clients saw more sheds than counted (full {} vs {}, timeout {} vs {})",
                    r.name,
                    r.seen("shed_full"),
                    r.counter("shed_full"),
                    r.seen("shed_timeout"),
                    r.counter("shed_timeout")
                ));
                continue;
            };
            let answered_upstream = r.seen("ok") + r.seen("upstream_5xx") + r.seen("gateway_5xx");
            if r.counter("admitted") + r.counter("cancelled") + unseen_full + unseen_timeout
                != answered_upstream + r.seen("left")
            {
                broken.push(format!(
                    "{}: admitted {} + cancelled {} + unseen sheds {} != answered after admission {} + left {}",
                    r.name,
                    r.counter("admitted"),
                    r.counter("cancelled"),
                    unseen_full + unseen_timeout,
                    answered_upstream,
                    r.seen("left")
                ));
            }
            let left_unadmitted = r.counter("cancelled") + unseen_full + unseen_timeout;
            if left_unadmitted + r.left_after_reaching_upstream > r.seen("left") {
                broken.push(format!(
                    "{}: cancelled + unseen sheds {} + left after reaching the upstream {} > left {}",
                    r.name,
                    left_unadmitted,
                    r.left_after_reaching_upstream,
                    r.seen("left")
                ));
            }
        }
        if broken.is_empty() {
            Ok(())
        } else {
            bail!(
                "chaos invariants broken:\n- {}\n{self}",
                broken.join("\n- ")
            )
        }
    }
}

struct Outcome {
    revision: usize,
    id: String,
    reset: bool,
    error: bool,
    leaves: bool,
    seen: Seen,
    detail: String,
}

/// The bound after which a client that has no final status counts as hung.
fn hang_bound(plan: &Plan) -> Duration {
    let worst_wait = plan
        .revisions
        .iter()
        .map(|r| r.max_wait_ms + r.holds.iter().copied().max().unwrap_or(0))
        .max()
        .unwrap_or(0);
    Duration::from_millis(worst_wait + 10_000)
}

fn classify(status: u16, shed: Option<&str>) -> Seen {
    match (status, shed) {
        (200, None) => Seen::Ok,
        (503, Some("buffer-full")) => Seen::ShedFull,
        (503, Some("wait-timeout")) => Seen::ShedTimeout,
        (500, None) => Seen::Upstream5xx,
        (503, None) => Seen::Gateway5xx,
        _ => Seen::Unexpected,
    }
}

fn seen_name(s: Seen) -> &'static str {
    match s {
        Seen::Ok => "ok",
        Seen::Upstream5xx => "upstream_5xx",
        Seen::Gateway5xx => "gateway_5xx",
        Seen::ShedFull => "shed_full",
        Seen::ShedTimeout => "shed_timeout",
        Seen::Left => "left",
        Seen::Hung => "hung",
        Seen::ClosedWithoutStatus => "closed_without_status",
        Seen::Unexpected => "unexpected",
    }
}

/// One client request of the plan, drawn from `rng`.
fn one_request(plan: &Plan, addr: SocketAddr, n: u64, rng: &mut Rng) -> Outcome {
    let revision = rng.below(plan.revisions.len() as u64) as usize;
    let rev = &plan.revisions[revision];
    let leaves = rng.percent(plan.disconnect_pct);
    let longest = rev.holds.iter().copied().max().unwrap_or(0);
    // A client that leaves asks for a long hold and leaves within it: in flight if admitted at
    // once, while queued otherwise.
    let hold = if leaves {
        (2 * longest).max(40)
    } else {
        rev.holds[rng.below(rev.holds.len() as u64) as usize]
    };
    let id = format!("c{n}");
    let mut req = Request::get(addr, &rev.host())
        .header("x-id", &id)
        .header("x-hold-ms", hold);
    let fault = rng.below(100);
    let reset = fault < plan.reset_pct;
    let error = !reset && fault < plan.reset_pct + plan.error_pct;
    if reset {
        req = req.header("x-reset", 1);
    } else if error {
        req = req.header("x-status", 500);
    }
    let leave_after = leaves.then(|| Duration::from_millis(2 + rng.below(hold)));
    let timeout = leave_after.unwrap_or_else(|| hang_bound(plan));
    let (seen, detail) = match req.timeout(timeout).start() {
        Err(e) => (Seen::Unexpected, format!("connect: {e}")),
        Ok(p) => match p.wait() {
            Ok(r) => {
                let s = classify(r.status, r.header("x-inflight-shed"));
                (s, format!("{} {:?} {}", r.status, r.headers, r.body.trim()))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if leave_after.is_some() {
                    (Seen::Left, String::new())
                } else {
                    (Seen::Hung, format!("no answer within {timeout:?}"))
                }
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                (Seen::ClosedWithoutStatus, e.to_string())
            }
            Err(e) => (Seen::Unexpected, e.to_string()),
        },
    };
    Outcome {
        revision,
        id,
        reset,
        error,
        leaves,
        seen,
        detail,
    }
}

/// Runs the plan against a fresh Envoy and returns the figures (check them with
/// [`Report::check`]).
pub fn run(plan: &Plan) -> Result<Report> {
    let ledgers: Vec<Arc<Ledger>> = plan
        .revisions
        .iter()
        .map(|r| Ledger::new(&r.name, r.limit()))
        .collect();
    let mut replicas: Vec<Vec<Replica>> = Vec::new();
    for (r, l) in plan.revisions.iter().zip(&ledgers) {
        let mut v = Vec::new();
        for _ in 0..r.replicas {
            v.push(Replica::start(Arc::clone(l))?);
        }
        replicas.push(v);
    }
    let gateway = Gateway {
        plugin_config: plan.plugin_config().to_string(),
        routes: plan
            .revisions
            .iter()
            .map(|r| (r.host(), r.name.clone()))
            .collect(),
        clusters: plan
            .revisions
            .iter()
            .zip(&replicas)
            .map(|(r, reps)| Cluster::fixed(&r.name, reps.iter().map(Replica::port).collect()))
            .collect(),
        wasm: plan.wasm.clone(),
        admin_port: None,
    };
    let envoy = Envoy::start(&gateway.yaml(), plan.workers)?;
    let addr = envoy.listener;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for c in 0..plan.clients {
        let plan = plan.clone();
        let next = Arc::clone(&next);
        let done = Arc::clone(&done);
        let outcomes = Arc::clone(&outcomes);
        clients.push(thread::spawn(move || {
            let mut rng = Rng::new(plan.seed ^ (u64::from(c) + 1).wrapping_mul(0x9E37_79B9));
            let mut mine = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= plan.requests {
                    break;
                }
                mine.push(one_request(&plan, addr, n, &mut rng));
                done.fetch_add(1, Ordering::SeqCst);
            }
            outcomes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(mine);
        }));
    }
    // The kill: replica 0 of revision 0, killed and later restarted on the same port.
    let mut kills = 0;
    let mut restarts = 0;
    if plan.kill_at_pct > 0 {
        let at = plan.requests * plan.kill_at_pct / 100;
        let back = plan.requests * plan.restart_at_pct / 100;
        while done.load(Ordering::SeqCst) < at && !clients.iter().all(|h| h.is_finished()) {
            thread::sleep(Duration::from_millis(5));
        }
        if let Some(victim) = replicas.first_mut().and_then(|v| v.first_mut()) {
            let port = victim.port();
            victim.kill();
            kills += 1;
            while done.load(Ordering::SeqCst) < back && !clients.iter().all(|h| h.is_finished()) {
                thread::sleep(Duration::from_millis(5));
            }
            *victim = Replica::start_on(port, Arc::clone(&ledgers[0]))?;
            restarts += 1;
        }
    }
    for h in clients {
        if h.join().is_err() {
            bail!("a client thread panicked");
        }
    }
    let duration = started.elapsed();
    let names: Vec<String> = plan.revisions.iter().map(|r| r.name.clone()).collect();
    let drained = envoy.wait_stats(
        Duration::from_secs(15),
        "active and queued back to 0",
        |s| {
            names
                .iter()
                .all(|n| s.gauge("inflight_active", n) == 0 && s.gauge("inflight_queued", n) == 0)
        },
    );
    let stats = match drained {
        Ok(s) => s,
        Err(_) => envoy.stats()?,
    };
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|e| e.into_inner()));
    let mut report = Report {
        requests: outcomes.len() as u64,
        kills,
        restarts,
        duration,
        ..Report::default()
    };
    for (i, r) in plan.revisions.iter().enumerate() {
        let mut rr = RevisionReport {
            name: r.name.clone(),
            limit: r.limit(),
            upstream_max: ledgers[i].max(),
            violations: ledgers[i].violations(),
            leaked_active: stats.gauge("inflight_active", &r.name),
            leaked_queued: stats.gauge("inflight_queued", &r.name),
            ..RevisionReport::default()
        };
        for o in ["admitted", "shed_full", "shed_timeout", "cancelled"] {
            rr.counters.insert(o.to_string(), stats.outcome(&r.name, o));
        }
        report.violations += rr.violations;
        report.leaked += rr.leaked_active + rr.leaked_queued;
        report.revisions.push(rr);
    }
    for o in &outcomes {
        let rr = &mut report.revisions[o.revision];
        *rr.seen.entry(seen_name(o.seen).to_string()).or_default() += 1;
        match o.seen {
            Seen::Left => {
                report.left += 1;
                if ledgers[o.revision].arrived(&o.id) {
                    rr.left_after_reaching_upstream += 1;
                }
            }
            Seen::Hung => report.hung += 1,
            Seen::ClosedWithoutStatus => report.closed_without_status += 1,
            Seen::Unexpected => report.unexpected += 1,
            _ => {}
        }
        if matches!(
            o.seen,
            Seen::Hung | Seen::ClosedWithoutStatus | Seen::Unexpected
        ) && report.examples.len() < 5
        {
            report.examples.push(format!("{}: {}", o.id, o.detail));
        }
    }
    let left_ids: HashSet<&str> = outcomes
        .iter()
        .filter(|o| o.seen == Seen::Left)
        .map(|o| o.id.as_str())
        .collect();
    for (i, rr) in report.revisions.iter_mut().enumerate() {
        rr.violations_after_client_left = ledgers[i]
            .violation_holders()
            .iter()
            .filter(|held| held.iter().any(|id| left_ids.contains(id.as_str())))
            .count() as u64;
    }
    report.leavers_planned = outcomes.iter().filter(|o| o.leaves).count() as u64;
    report.resets_planned = outcomes.iter().filter(|o| o.reset).count() as u64;
    report.errors_planned = outcomes.iter().filter(|o| o.error).count() as u64;
    if report.requests != plan.requests {
        bail!(
            "{} of {} requests have an outcome",
            report.requests,
            plan.requests
        );
    }
    drop(envoy);
    Ok(report)
}

/// The envoy module's release wasm, for plans.
pub fn release_wasm() -> PathBuf {
    envoy::filter_wasm()
}

/// The filter built with the test-only `fault-injection` feature (a request with
/// `x-inflight-fault: panic` panics its VM), in its own target directory
/// (`target-chaos-wasm/`), built once per process:
///
/// ```text
/// CARGO_TARGET_DIR=target-chaos-wasm cargo build -p inflight-filter --target wasm32-wasip1 \
///     --profile wasm --features fault-injection
/// ```
pub fn fault_wasm() -> Result<PathBuf> {
    static PATH: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let build = inflight_envoy_control::WasmBuild {
            features: vec!["fault-injection".into()],
            ..inflight_envoy_control::WasmBuild::filter(
                &envoy::workspace_root(),
                "target-chaos-wasm",
            )
        };
        build.run().map_err(|e| e.to_string())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Whether `haystack` contains `needle` (for checking what a wasm binary carries).
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
