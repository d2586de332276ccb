//! Predictor replicas: processes on free loopback ports, each with a lifecycle the scaler drives
//! and the pods table shows.
//!
//! Starting → (address printed, readiness probe 200) Ready → (scale-down: removed from EDS)
//! Draining → (in-flight 0, or the drain timeout) Terminating (SIGTERM sent) → Exited.
//! A replica that exits on its own while Starting or Ready is noticed and restarted in place,
//! like a kubelet restarting a container: same name, RESTARTS + 1.

use super::config::RevisionSpec;
use super::http;
use super::process;
use anyhow::{Context as _, Result};
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Ready,
    Draining { since: Instant },
    Terminating { since: Instant },
    Exited,
}

impl Phase {
    /// The STATUS column of the pods table.
    pub fn status(self) -> &'static str {
        match self {
            Phase::Starting => "ContainerCreating",
            Phase::Ready => "Running",
            Phase::Draining { .. } | Phase::Terminating { .. } => "Terminating",
            Phase::Exited => "Completed",
        }
    }

    /// Counted towards the revision's scale (what the scaler compares with desired).
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Starting | Phase::Ready)
    }
}

/// What the scaler needs to start a replica.
#[derive(Debug, Clone)]
pub struct Launch {
    pub command: PathBuf,
    pub args: Vec<String>,
    pub ready_path: String,
    pub metrics_path: String,
    pub log_dir: PathBuf,
}

impl Launch {
    pub fn new(spec: &RevisionSpec, command: PathBuf, log_dir: &Path) -> Launch {
        Launch {
            command,
            args: spec.predictor.args.clone(),
            ready_path: spec.predictor.ready_path.clone(),
            metrics_path: spec.predictor.metrics_path.clone(),
            log_dir: log_dir.to_path_buf(),
        }
    }
}

pub struct Replica {
    pub name: String,
    pub phase: Phase,
    pub addr: Option<SocketAddr>,
    pub created: Instant,
    /// When the current process started (differs from `created` after a restart).
    pub started: Instant,
    pub restarts: u32,
    /// Pids of every process this replica ran (restarts included), for the no-orphans check.
    pub pids: Vec<u32>,
    /// Highest in-flight the predictor reported (its own `max_in_flight` gauge), over restarts.
    pub max_in_flight: f64,
    /// In-flight at the last metrics read.
    pub in_flight: f64,
    child: Child,
    addr_rx: Receiver<SocketAddr>,
    launch: Launch,
}

impl Replica {
    pub fn start(name: String, launch: &Launch) -> Result<Replica> {
        let (child, addr_rx) = spawn(&name, launch)?;
        Ok(Replica {
            name,
            phase: Phase::Starting,
            addr: None,
            created: Instant::now(),
            started: Instant::now(),
            restarts: 0,
            pids: vec![child.id()],
            max_in_flight: 0.0,
            in_flight: 0.0,
            child,
            addr_rx,
            launch: launch.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Advances Starting → Ready (address known and readiness probe answered 200) and notices
    /// exits. Returns true if the process died on its own while it was meant to be running.
    pub fn poll(&mut self) -> bool {
        if let Ok(addr) = self.addr_rx.try_recv() {
            self.addr = Some(addr);
        }
        let exited = !matches!(self.child.try_wait(), Ok(None));
        if exited {
            let unexpected = self.phase.is_live();
            self.phase = Phase::Exited;
            return unexpected;
        }
        if self.phase == Phase::Starting {
            if let Some(addr) = self.addr {
                if let Ok((200, _)) =
                    http::get(addr, &self.launch.ready_path, Duration::from_millis(300))
                {
                    self.phase = Phase::Ready;
                }
            }
        }
        false
    }

    /// Reads the predictor's in-flight gauges from its `/metrics`.
    pub fn read_metrics(&mut self) -> Result<()> {
        let addr = self.addr.context("no address yet")?;
        let (status, body) =
            http::get(addr, &self.launch.metrics_path, Duration::from_millis(500))?;
        anyhow::ensure!(status == 200, "{}: /metrics answered {status}", self.name);
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?;
        for s in scrape.samples {
            let v = match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => continue,
            };
            match s.metric.as_str() {
                "inflight_predictor_in_flight" => self.in_flight = v,
                "inflight_predictor_max_in_flight" => {
                    self.max_in_flight = self.max_in_flight.max(v)
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Restarts a replica that died: same name, RESTARTS + 1.
    pub fn restart(&mut self) -> Result<()> {
        let (child, addr_rx) = spawn(&self.name, &self.launch)?;
        self.pids.push(child.id());
        self.child = child;
        self.addr_rx = addr_rx;
        self.addr = None;
        self.started = Instant::now();
        self.phase = Phase::Starting;
        self.restarts += 1;
        Ok(())
    }

    /// Removed from EDS: requests already sent finish, no new ones arrive.
    pub fn drain(&mut self) {
        if self.phase.is_live() {
            self.phase = Phase::Draining {
                since: Instant::now(),
            };
        }
    }

    /// Sends SIGTERM (the predictor finishes its in-flight requests and exits).
    pub fn terminate(&mut self) {
        if !matches!(self.phase, Phase::Terminating { .. } | Phase::Exited) {
            // A final read so the max in-flight it ever saw is kept.
            let _ = self.read_metrics();
            process::signal(self.pid(), libc::SIGTERM);
            self.phase = Phase::Terminating {
                since: Instant::now(),
            };
        }
    }

    /// Stops the process now (SIGTERM, SIGKILL after `grace`) and reaps it.
    pub fn stop(&mut self, grace: Duration) {
        if !matches!(self.phase, Phase::Exited) {
            let _ = self.read_metrics();
        }
        process::stop(&mut self.child, grace);
        self.phase = Phase::Exited;
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        process::stop(&mut self.child, Duration::from_secs(5));
    }
}

fn spawn(name: &str, launch: &Launch) -> Result<(Child, Receiver<SocketAddr>)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(launch.log_dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(&launch.command);
    cmd.args(&launch.args)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    let mut child = process::spawn(&mut cmd)
        .with_context(|| format!("starting {} ({name})", launch.command.display()))?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        // Reads the `listening on HOST:PORT` line, then keeps draining stdout until the process
        // closes it so the predictor never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line
                    .trim()
                    .strip_prefix("listening on ")
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    let _ = tx.send(addr);
                }
            }
        });
    }
    Ok((child, rx))
}

/// A pod-like name: `<revision>-predictor-<5 chars>`, unique within a run.
pub fn pod_name(revision: &str, n: u32) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = u64::from(n).wrapping_add(u64::from(std::process::id()) << 16);
    let mut suffix = String::new();
    for _ in 0..5 {
        // splitmix64 step: a stable, well-spread suffix without a random-number crate.
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let i = usize::try_from(z % ALPHABET.len() as u64).unwrap_or(0);
        suffix.push(char::from(ALPHABET[i]));
    }
    format!("{revision}-predictor-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_distinct_and_dns_labels() {
        let names: std::collections::BTreeSet<String> =
            (0..100).map(|n| pod_name("torchserve", n)).collect();
        assert_eq!(names.len(), 100);
        for n in &names {
            assert!(
                n.starts_with("torchserve-predictor-") && n.len() == 26,
                "{n}"
            );
        }
    }

    #[test]
    fn phases_map_to_kubectl_statuses() {
        let now = Instant::now();
        let cases = [
            (Phase::Starting, "ContainerCreating", true),
            (Phase::Ready, "Running", true),
            (Phase::Draining { since: now }, "Terminating", false),
            (Phase::Terminating { since: now }, "Terminating", false),
            (Phase::Exited, "Completed", false),
        ];
        for (phase, status, live) in cases {
            assert_eq!(
                (phase.status(), phase.is_live()),
                (status, live),
                "{phase:?}"
            );
        }
    }
}
