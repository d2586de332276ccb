//! A test upstream that records what the gateway lets through.
//!
//! Plain HTTP/1.1 over std threads (one per connection), so a test controls every byte. Each
//! replica records how many requests it holds at once (current and maximum) and the order
//! requests arrive (by their `x-id` header). Requests steer the replica with headers:
//! `x-hold-ms: N` (answer after N ms), `x-gate: 1` (answer when the test opens the gate),
//! `x-status: N` (answer with that status), `x-reset: 1` (close the connection without an answer).
//! `GET /healthz` is a health check: answered at once, 200 or (after [`Upstream::set_healthy`]
//! `(false)`) 503, and not recorded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Record {
    current: u32,
    max: u32,
    total: u64,
    arrivals: Vec<String>,
    /// `(when, current)` after every change: the in-flight count at every instant.
    timeline: Vec<(Instant, u32)>,
}

/// Concurrency seen across several replicas together (a revision's total).
#[derive(Default)]
pub struct Group {
    record: Mutex<(u32, u32)>,
}

impl Group {
    pub fn new() -> Arc<Group> {
        Arc::new(Group::default())
    }

    /// The most requests the replicas of this group held at once, together.
    pub fn max_concurrency(&self) -> u32 {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// The requests the replicas of this group hold now, together.
    pub fn current(&self) -> u32 {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn enter(&self) {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        r.0 += 1;
        r.1 = r.1.max(r.0);
    }

    fn leave(&self) {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        r.0 = r.0.saturating_sub(1);
    }
}

struct Shared {
    group: Option<Arc<Group>>,
    record: Mutex<Record>,
    gate_open: Mutex<bool>,
    gate: Condvar,
    stopped: AtomicBool,
    unhealthy: AtomicBool,
}

/// One upstream replica on a free loopback port; stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Upstream {
    pub fn start() -> std::io::Result<Upstream> {
        Self::start_in(None)
    }

    /// A replica that also counts into `group`.
    pub fn start_in(group: Option<Arc<Group>>) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            group,
            record: Mutex::new(Record::default()),
            gate_open: Mutex::new(false),
            gate: Condvar::new(),
            stopped: AtomicBool::new(false),
            unhealthy: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = Arc::clone(&s);
                thread::spawn(move || serve(conn, &s));
            }
        });
        Ok(Upstream { addr, shared })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The most requests this replica held at once.
    pub fn max_concurrency(&self) -> u32 {
        self.lock().max
    }

    pub fn current(&self) -> u32 {
        self.lock().current
    }

    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// `(when, in flight)` after every arrival and every answer, in order: what this replica held
    /// at every instant.
    pub fn timeline(&self) -> Vec<(Instant, u32)> {
        self.lock().timeline.clone()
    }

    /// `x-id`s in arrival order.
    pub fn arrivals(&self) -> Vec<String> {
        self.lock().arrivals.clone()
    }

    /// What `GET /healthz` answers from now on: 200 (healthy) or 503.
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.unhealthy.store(!healthy, Ordering::SeqCst);
    }

    /// Releases every request held by `x-gate`, now and later.
    pub fn open_gate(&self) {
        let mut open = self
            .shared
            .gate_open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *open = true;
        self.shared.gate.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.shared.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.open_gate();
        // Wake the accept loop so it sees `stopped`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn serve(conn: TcpStream, s: &Shared) {
    let _ = conn.set_nodelay(true);
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut writer = write_half;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut headers = Vec::new();
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
        if line.starts_with("GET /healthz") {
            let status = if s.unhealthy.load(Ordering::SeqCst) {
                503
            } else {
                200
            };
            let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
            if writer.write_all(response.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        let body_len = body.len();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        {
            let mut r = s.record.lock().unwrap_or_else(|e| e.into_inner());
            r.current += 1;
            r.max = r.max.max(r.current);
            r.total += 1;
            let now = (Instant::now(), r.current);
            r.timeline.push(now);
            if let Some(id) = get("x-id") {
                r.arrivals.push(id.to_string());
            }
        }
        if let Some(g) = &s.group {
            g.enter();
        }
        let hold = get("x-hold-ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if hold > 0 {
            thread::sleep(Duration::from_millis(hold));
        }
        if get("x-gate").is_some() {
            let mut open = s.gate_open.lock().unwrap_or_else(|e| e.into_inner());
            while !*open {
                open = s.gate.wait(open).unwrap_or_else(|e| e.into_inner());
            }
        }
        let done = |s: &Shared| {
            let mut r = s.record.lock().unwrap_or_else(|e| e.into_inner());
            r.current -= 1;
            let now = (Instant::now(), r.current);
            r.timeline.push(now);
            if let Some(g) = &s.group {
                g.leave();
            }
        };
        if get("x-reset").is_some() {
            done(s);
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return;
        }
        let status: u16 = get("x-status").and_then(|v| v.parse().ok()).unwrap_or(200);
        let body = format!("ok {} {body_len}\n", get("x-id").unwrap_or(""));
        // Decrement before answering: once the client has the answer, the slot must be free.
        done(s);
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
