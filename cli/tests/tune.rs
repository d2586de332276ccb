//! `inflight tune` against a synthetic model server with a known knee: k workers of 50 ms, so
//! throughput rises linearly up to k requests in flight and is flat beyond. The built
//! `inflight tune --json` sweeps it over real HTTP and must recommend k (± 1).
//!
//! A test binary of its own on purpose. As unit tests these sweeps ran inside the `inflight`
//! unit-test process, in parallel with the rest of that suite (the bench test that starts five
//! Envoys among it): on a 2-core machine the load generator then lost the CPU between an
//! answer and its next request, could not keep k requests at the server at concurrency k, and
//! more concurrency "helped" (the knee drifted to 2k). Cargo runs test binaries one after
//! another, so nothing else in the suite runs beside this one; its three sweeps take turns.
//! Needs wrk (`make setup`): C and epoll, far less client turnaround than hey on a loaded
//! machine.

// Test helpers and tests: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A model server with `workers` workers, each answering one request in `service` time: its
/// throughput rises linearly up to `workers` requests in flight and is flat beyond (the excess
/// queues inside it) — the knee is `workers`. HTTP/1.1 keep-alive, one thread per connection,
/// bound to 127.0.0.1 on a free port; stops when dropped.
struct Synthetic {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

/// The model's workers: a counting semaphore that serves waiting requests first come, first
/// served, as a model server's queue does. Not a plain mutex-and-condvar count: there a
/// connection whose answer just went out may take the freed worker again with its next request
/// before the notified waiter is scheduled (likelier on a loaded machine), so past the knee a
/// client could starve instead of queueing, and the latency that marks the knee would not grow.
struct Workers {
    state: Mutex<Queue>,
    changed: Condvar,
}

struct Queue {
    free: u32,
    /// Tickets of the waiting requests, oldest first.
    waiting: VecDeque<u64>,
    next_ticket: u64,
}

impl Workers {
    fn new(workers: u32) -> Workers {
        Workers {
            state: Mutex::new(Queue {
                free: workers,
                waiting: VecDeque::new(),
                next_ticket: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn serve(&self, service: Duration) {
        let mut q = self.state.lock().unwrap();
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.waiting.push_back(ticket);
        while !(q.free > 0 && q.waiting.front() == Some(&ticket)) {
            q = self.changed.wait(q).unwrap();
        }
        q.waiting.pop_front();
        q.free -= 1;
        drop(q);
        // The next in line may take another free worker.
        self.changed.notify_all();
        thread::sleep(service);
        self.state.lock().unwrap().free += 1;
        self.changed.notify_all();
    }
}

impl Synthetic {
    fn start(workers: u32, service: Duration) -> Synthetic {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let pool = Arc::new(Workers::new(workers));
        let accept = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (stop, pool) = (Arc::clone(&stop), Arc::clone(&pool));
                            thread::spawn(move || serve_connection(conn, &pool, service, &stop));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Synthetic {
            addr,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for Synthetic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Answers requests on one keep-alive connection until the client closes it (or the server
/// stops): read the head and body, take a worker for `service`, answer `200 ok`.
fn serve_connection(conn: TcpStream, pool: &Workers, service: Duration, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    while !stop.load(Ordering::SeqCst) {
        let mut length = 0usize;
        let mut line = String::new();
        let mut saw_request = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) && !saw_request =>
                {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            }
            saw_request = true;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        pool.serve(service);
        if out
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            )
            .is_err()
        {
            return;
        }
    }
}

/// One sweep at a time: two at once on a 2-core machine make the client, not the server, the
/// bottleneck.
static SERIAL: Mutex<()> = Mutex::new(());

/// The service time: long against a loaded machine's client turnaround and scheduling delays
/// (a few ms), which a closed-loop client at concurrency k leaves as idle gaps at the server.
const SERVICE: Duration = Duration::from_millis(50);

/// `inflight tune --json` against k workers of [`SERVICE`], with short holds (1 s wrk windows,
/// 2–3 per step): the recommendation is k (± 1).
fn recommends_the_worker_count(k: u32) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Synthetic::start(k, SERVICE);
    let dir = std::env::temp_dir().join(format!("inflight-tune-test-{}-{k}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = dir.join("body.json");
    std::fs::write(&body, br#"{"instances": [[0]]}"#).unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_inflight"))
        .args(["tune", "--url"])
        .arg(format!("http://{}/v1/models/m:predict", server.addr))
        .arg("-D")
        .arg(&body)
        .args([
            "--max-concurrency",
            "32",
            "--window",
            "1s",
            "--min-hold",
            "1s",
            "--max-hold",
            "3s",
            "--precision",
            "5",
            "--max-duration",
            "40s",
            "--load",
            "wrk",
            "--json",
            "--plot",
        ])
        .arg(dir.join("tune.png"))
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "inflight tune failed:\n{stderr}");
    let t: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let steps = t["steps"].as_array().unwrap();
    let knee = t["knee"]["concurrency"].as_u64();
    let mut table = String::from("  c   req/s    CI     p50    p90    p99\n");
    for s in steps {
        let c = s["concurrency"].as_u64().unwrap();
        let x = s["throughput"].as_f64().unwrap();
        table += &format!(
            "{c:>3} {x:>7.1} {:>5.1}% {:>6.1} {:>6.1} {:>6.1}{}\n",
            100.0 * s["ci95"].as_f64().unwrap_or(f64::INFINITY) / x,
            s["p50Ms"].as_f64().unwrap(),
            s["p90Ms"].as_f64().unwrap(),
            s["p99Ms"].as_f64().unwrap(),
            if Some(c) == knee { "  ← knee" } else { "" }
        );
    }
    let cc = t["recommendation"]["containerConcurrency"].as_u64();
    eprintln!(
        "k={k}: recommended {cc:?}, swept in {:.1}s:\n{table}",
        elapsed.as_secs_f64()
    );
    let cc = cc.unwrap_or_else(|| panic!("k={k}: no recommendation\n{table}"));
    assert!(
        (u64::from(k) - 1..=u64::from(k) + 1).contains(&cc),
        "k={k}: recommended {cc}\n{table}"
    );
    assert_eq!(t["stop"]["reason"], "kneeConfirmed", "k={k}\n{table}");
    // The server's capacity is k / 50 ms: the plateau reaches most of it (a loaded machine's
    // sleeps and the client's turnaround take some) and never more.
    let ideal = f64::from(k) / SERVICE.as_secs_f64();
    let best = steps
        .iter()
        .map(|s| s["throughput"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        best > 0.7 * ideal && best < 1.03 * ideal,
        "k={k}: plateau {best} req/s, capacity {ideal}\n{table}"
    );
    assert!(
        steps.iter().all(|s| s["errors"] == 0),
        "k={k}: errors\n{table}"
    );
    let snippet = t["recommendation"]["snippet"].as_str().unwrap();
    assert!(
        snippet.contains(&format!("containerConcurrency: {cc}")),
        "{snippet}"
    );
}

#[test]
fn recommends_two_for_two_workers() {
    recommends_the_worker_count(2);
}

#[test]
fn recommends_four_for_four_workers() {
    recommends_the_worker_count(4);
}

#[test]
fn recommends_eight_for_eight_workers() {
    recommends_the_worker_count(8);
}
