//! A fleet of real gateway Envoys for tests (docs/fleet.md): N gateways that split every
//! endpoint's `containerConcurrency`, and an L4 Envoy (`tcp_proxy`) in front of them, as a
//! Kubernetes Service spreads connections over gateway pods.
//!
//! Each gateway has a **public listener** (clients) and a **peer listener** (forwarded requests
//! and reports), both with the same HTTP connection manager, filter and routes; its own peer
//! address in node metadata `INFLIGHT_FLEET_SELF`; the revisions' clusters as EDS files (so a
//! test adds and removes pods while the fleet runs) with endpoint picking; the peer cluster
//! `inflight-peers` as an EDS file (so a test removes and adds gateways); the forward cluster
//! `inflight-peer-direct`; and the forward route first in every virtual host.
//!
//! Every port is chosen before the start, so a gateway killed with SIGKILL comes back on the
//! same addresses ([`Fleet::restart`]). Every Envoy is killed by its pid when the fleet is
//! dropped. [`Load`] runs closed-loop clients, each on the address a test gives it (through the
//! L4 Envoy, or straight at one gateway for an uneven spread).

use crate::client::Request;
use crate::envoy::{
    clusters_yaml, free_port, scratch_dir, write_eds, Cluster, Envoy, Lb, Stats, ADMIN_CLUSTER,
    STATS_TAGS,
};
use anyhow::{bail, Context as _, Result};
use inflight_envoy_control::bootstrap::{self, ROUTER};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The peer cluster's name in these configs (`fleet.peerCluster`).
pub const PEER_CLUSTER: &str = "inflight-peers";
/// The forward cluster's name (`fleet.forwardCluster`).
pub const FORWARD_CLUSTER: &str = "inflight-peer-direct";
/// The header naming the peer a request is forwarded to (`fleet.forwardHeader`'s default).
pub const FORWARD_HEADER: &str = "x-inflight-peer";

/// A revision of the fleet's configs: requests for `host` go to cluster `name`, whose endpoints
/// (loopback `ports`) each take `cc` at once.
#[derive(Debug, Clone)]
pub struct Revision {
    pub name: String,
    pub host: String,
    pub cc: u32,
    pub ports: Vec<u16>,
}

impl Revision {
    pub fn new(name: &str, host: &str, cc: u32, ports: Vec<u16>) -> Revision {
        Revision {
            name: name.into(),
            host: host.into(),
            cc,
            ports,
        }
    }
}

/// What a fleet runs.
#[derive(Debug, Clone)]
pub struct Spec {
    pub gateways: usize,
    pub revisions: Vec<Revision>,
    /// Each gateway's worker threads (`--concurrency`).
    pub workers: u32,
    /// `membership.interval`: how often a gateway polls its clusters and asks its peers.
    pub poll: Duration,
    /// `membership.timeout`: how long a poll or a report request may take.
    pub poll_timeout: Duration,
    pub tick: Duration,
    pub max_wait: Duration,
    pub buffer_depth: u32,
    /// The plugin's `fleet` keys besides `peerCluster` and `forwardCluster` (e.g. `lostAfter`);
    /// `None` leaves `fleet` out: every gateway alone, as before the fleet.
    pub fleet: Option<serde_json::Value>,
    /// An L4 Envoy in front of the gateways' public listeners.
    pub l4: bool,
}

impl Spec {
    /// `gateways` gateways in a fleet serving `revisions`: one worker each, poll 200 ms (timeout
    /// 500 ms), tick 50 ms, a generous `maxWait` (30 s) and buffer (1000), an L4 Envoy in front.
    pub fn new(gateways: usize, revisions: Vec<Revision>) -> Spec {
        Spec {
            gateways,
            revisions,
            workers: 1,
            poll: Duration::from_millis(200),
            poll_timeout: Duration::from_millis(500),
            tick: Duration::from_millis(50),
            max_wait: Duration::from_secs(30),
            buffer_depth: 1000,
            fleet: Some(serde_json::json!({})),
            l4: true,
        }
    }

    /// The plugin configuration every gateway runs.
    pub fn plugin_config(&self) -> serde_json::Value {
        let revisions: Vec<serde_json::Value> = self
            .revisions
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "hosts": [r.host], "containerConcurrency": r.cc,
                    "upstreamCluster": r.name, "bufferDepth": self.buffer_depth,
                    "maxWait": format!("{}ms", self.max_wait.as_millis()),
                })
            })
            .collect();
        let mut config = serde_json::json!({
            "revisions": revisions,
            "membership": {
                "cluster": ADMIN_CLUSTER,
                "interval": format!("{}ms", self.poll.as_millis()),
                "timeout": format!("{}ms", self.poll_timeout.as_millis()),
            },
            "tick": format!("{}ms", self.tick.as_millis()),
        });
        if let Some(extra) = &self.fleet {
            let mut fleet = serde_json::json!({
                "peerCluster": PEER_CLUSTER,
                "forwardCluster": FORWARD_CLUSTER,
            });
            if let (Some(f), Some(e)) = (fleet.as_object_mut(), extra.as_object()) {
                for (k, v) in e {
                    f.insert(k.clone(), v.clone());
                }
            }
            config["fleet"] = fleet;
        }
        config
    }
}

/// One gateway's addresses and bootstrap; its Envoy while it runs.
struct Member {
    public: SocketAddr,
    peer: SocketAddr,
    yaml: String,
    workers: u32,
    envoy: Envoy,
}

/// A running fleet; every Envoy is killed by its pid when dropped, and the scratch directory
/// (EDS files) removed.
pub struct Fleet {
    spec: Spec,
    dir: PathBuf,
    members: Vec<Member>,
    l4: Option<Envoy>,
}

/// `n` distinct free loopback ports.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut ports = BTreeSet::new();
    let mut tries = 0;
    while ports.len() < n {
        ports.insert(free_port()?);
        tries += 1;
        if tries > n * 10 {
            bail!("could not find {n} distinct free ports");
        }
    }
    Ok(ports.into_iter().collect())
}

/// Each gateway's (public, peer, admin) ports, all distinct and free.
fn port_triples(gateways: usize) -> Result<Vec<(u16, u16, u16)>> {
    Ok(free_ports(3 * gateways)?
        .chunks(3)
        .map(|c| {
            (
                c[0],
                c.get(1).copied().unwrap_or(0),
                c.get(2).copied().unwrap_or(0),
            )
        })
        .collect())
}

/// The revisions' EDS files and the peer cluster's (every gateway's peer port).
fn write_eds_files(spec: &Spec, dir: &Path, triples: &[(u16, u16, u16)]) -> Result<()> {
    let peer_ports: Vec<u16> = triples.iter().map(|t| t.1).collect();
    let files = spec
        .revisions
        .iter()
        .map(|r| (r.name.as_str(), r.ports.clone()))
        .chain([(PEER_CLUSTER, peer_ports)]);
    for (name, ports) in files {
        let file = eds_file(dir, name);
        std::fs::create_dir_all(file.parent().unwrap_or(dir))?;
        write_eds(&file, name, &ports)?;
    }
    Ok(())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The EDS file of cluster `name` in `dir`: a directory of its own, as Envoy reloads every
/// file source of a watched directory when anything is moved into it.
fn eds_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("eds-{name}")).join(format!("{name}.yaml"))
}

/// The bootstrap of one gateway: public and peer listener (same manager, filter and routes),
/// node metadata naming its peer address, the revisions' EDS clusters, the peer cluster (EDS),
/// the forward cluster and the admin cluster the filter polls.
fn gateway_yaml(spec: &Spec, dir: &Path, index: usize, ports: (u16, u16, u16)) -> String {
    let (public, peer, admin) = ports;
    let config = spec.plugin_config().to_string();
    let forward = bootstrap::forward_route(FORWARD_HEADER, FORWARD_CLUSTER);
    let mut vhosts = String::new();
    let route = |vhosts: &mut String, name: &str, domain: &str, cluster: &str| {
        let _ = write!(
            vhosts,
            "            - name: {name}\n              domains: [\"{domain}\"]\n              routes:\n{forward}              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: {cluster}, timeout: 0s }}\n"
        );
    };
    for r in &spec.revisions {
        route(&mut vhosts, &r.name, &r.host, &r.name);
    }
    if let Some(first) = spec.revisions.first() {
        route(&mut vhosts, "default", "*", &first.name);
    }
    let manager = format!(
        "          stream_idle_timeout: 600s\n          route_config:\n            virtual_hosts:\n{vhosts}          http_filters:\n{}{ROUTER}",
        bootstrap::wasm_filter("inflight", &crate::envoy::filter_wasm(), Some(&config)),
    );
    let public_listener = bootstrap::http_listener("public", public, "public");
    // The same listener again, without the `static_resources:` and `listeners:` lines.
    let peer_listener = bootstrap::http_listener("peer", peer, "peer")
        .split_once("  listeners:\n")
        .map(|(_, l)| l.to_string())
        .unwrap_or_default();
    let mut clusters: Vec<Cluster> = spec
        .revisions
        .iter()
        .map(|r| Cluster::eds(&r.name, eds_file(dir, &r.name)))
        .collect();
    clusters.push(Cluster {
        lb: Lb::RoundRobin,
        ..Cluster::eds(PEER_CLUSTER, eds_file(dir, PEER_CLUSTER))
    });
    format!(
        "{node}{admin}stats_config:\n{STATS_TAGS}{public_listener}{manager}{peer_listener}{manager}  clusters:\n{clusters}{forward}{admin_cluster}",
        node = bootstrap::node(&format!("gateway-{index}"), Some(loopback(peer))),
        admin = bootstrap::admin(admin),
        clusters = clusters_yaml(&clusters),
        forward = bootstrap::forward_cluster(FORWARD_CLUSTER, FORWARD_HEADER),
        admin_cluster = bootstrap::admin_cluster(ADMIN_CLUSTER, admin),
    )
}

/// The L4 load balancer: a `tcp_proxy` listener spreading connections at random over the
/// gateways' public listeners.
fn l4_yaml(publics: &[SocketAddr]) -> String {
    let endpoints: String = publics.iter().map(|a| bootstrap::lb_endpoint(*a)).collect();
    format!(
        "node: {{ id: l4, cluster: l4 }}\n{admin}static_resources:\n  listeners:\n{listener}  clusters:\n  - name: gateways\n    type: STATIC\n    connect_timeout: 1s\n    lb_policy: RANDOM\n    load_assignment:\n      cluster_name: gateways\n      endpoints:\n      - lb_endpoints:\n{endpoints}",
        admin = bootstrap::admin(0),
        listener = bootstrap::tcp_proxy_listener("front", 0, "gateways"),
    )
}

/// Runs `envoy --mode validate` on the bootstraps `spec` gives (every gateway's and the L4
/// Envoy's), without starting anything.
pub fn validate(spec: &Spec) -> Result<()> {
    let dir = scratch_dir("fleet-validate")?;
    let triples = port_triples(spec.gateways)?;
    write_eds_files(spec, &dir, &triples)?;
    let mut publics = Vec::new();
    for (i, &t) in triples.iter().enumerate() {
        publics.push(loopback(t.0));
        let p = dir.join(format!("gateway-{i}.yaml"));
        std::fs::write(&p, gateway_yaml(spec, &dir, i, t))?;
        crate::envoy::validate(&p).with_context(|| format!("gateway {i}"))?;
    }
    let p = dir.join("l4.yaml");
    std::fs::write(&p, l4_yaml(&publics))?;
    crate::envoy::validate(&p).context("the L4 Envoy")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

impl Fleet {
    /// Writes the EDS files, starts every gateway (together) and the L4 Envoy; returns once all
    /// are LIVE (not yet once the filters learned their endpoints: [`Fleet::wait_ready`]).
    pub fn start(spec: Spec) -> Result<Fleet> {
        let dir = scratch_dir("fleet")?;
        let triples = port_triples(spec.gateways)?;
        write_eds_files(&spec, &dir, &triples)?;
        let yamls: Vec<String> = triples
            .iter()
            .enumerate()
            .map(|(i, &t)| gateway_yaml(&spec, &dir, i, t))
            .collect();
        let workers = spec.workers;
        let started: Vec<Result<Envoy>> = thread::scope(|s| {
            let handles: Vec<_> = yamls
                .iter()
                .map(|y| s.spawn(move || Envoy::start(y, workers)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("starting thread panicked")))
                })
                .collect()
        });
        let mut members = Vec::new();
        for ((envoy, yaml), t) in started.into_iter().zip(yamls).zip(&triples) {
            members.push(Member {
                public: loopback(t.0),
                peer: loopback(t.1),
                yaml,
                workers,
                envoy: envoy.context("starting a gateway")?,
            });
        }
        let l4 = if spec.l4 {
            let publics: Vec<SocketAddr> = members.iter().map(|m| m.public).collect();
            Some(Envoy::start(&l4_yaml(&publics), 1).context("starting the L4 Envoy")?)
        } else {
            None
        };
        Ok(Fleet {
            spec,
            dir,
            members,
            l4,
        })
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The L4 Envoy's listener: clients spread at random over the gateways.
    pub fn front(&self) -> Result<SocketAddr> {
        match &self.l4 {
            Some(e) => Ok(e.listener),
            None => bail!("this fleet was started without an L4 Envoy (Spec::l4)"),
        }
    }

    /// Gateway `i`'s public listener.
    pub fn public(&self, i: usize) -> SocketAddr {
        self.members[i].public
    }

    /// Gateway `i`'s peer address (its listener for forwarded requests and reports).
    pub fn peer(&self, i: usize) -> SocketAddr {
        self.members[i].peer
    }

    /// Gateway `i`'s Envoy (stats, admin, log).
    pub fn gateway(&self, i: usize) -> &Envoy {
        &self.members[i].envoy
    }

    /// The bootstrap gateway `i` runs.
    pub fn yaml(&self, i: usize) -> &str {
        &self.members[i].yaml
    }

    /// SIGKILL to gateway `i` (its process is reaped; its log stays until the restart).
    pub fn kill(&mut self, i: usize) {
        self.members[i].envoy.kill();
    }

    /// Starts gateway `i` again on the same bootstrap (same addresses); returns once it is LIVE.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        // Bound until the listeners' ports come free after the kill; LIVE only once bound.
        m.envoy = Envoy::start(&m.yaml, m.workers).context("restarting a gateway")?;
        Ok(())
    }

    /// Replaces revision `name`'s endpoints (EDS file; each gateway sees it when Envoy does).
    pub fn set_endpoints(&self, name: &str, ports: &[u16]) -> Result<()> {
        write_eds(&eds_file(&self.dir, name), name, ports)
    }

    /// Like [`Fleet::set_endpoints`], with `draining` listed as `DRAINING` (a pod on its way out).
    pub fn set_endpoints_draining(
        &self,
        name: &str,
        ports: &[u16],
        draining: &[u16],
    ) -> Result<()> {
        crate::envoy::write_eds_draining(&eds_file(&self.dir, name), name, ports, draining)
    }

    /// Replaces the peer cluster's endpoints with the peer addresses of gateways `members`.
    pub fn set_peers(&self, members: &[usize]) -> Result<()> {
        let ports: Vec<u16> = members
            .iter()
            .map(|&i| self.members[i].peer.port())
            .collect();
        write_eds(&eds_file(&self.dir, PEER_CLUSTER), PEER_CLUSTER, &ports)
    }

    /// Gateway `i`'s stats.
    pub fn stats(&self, i: usize) -> Result<Stats> {
        self.members[i].envoy.stats()
    }

    /// Waits until `check(i, stats)` holds for every gateway `i` in `which`.
    pub fn wait_stats(
        &self,
        which: &[usize],
        timeout: Duration,
        what: &str,
        check: impl Fn(usize, &Stats) -> bool,
    ) -> Result<()> {
        for &i in which {
            self.members[i]
                .envoy
                .wait_stats(timeout, &format!("gateway {i}: {what}"), |s| check(i, s))?;
        }
        Ok(())
    }

    /// Gateway numbers `0..len`.
    pub fn all(&self) -> Vec<usize> {
        (0..self.members.len()).collect()
    }

    /// Waits until every gateway in `which` knows every revision's endpoints and, in a fleet,
    /// sees `fleet` gateways.
    pub fn wait_ready(&self, which: &[usize], fleet: usize) -> Result<()> {
        let revisions: Vec<(String, u64)> = self
            .spec
            .revisions
            .iter()
            .map(|r| (r.name.clone(), r.ports.len() as u64))
            .collect();
        let in_fleet = self.spec.fleet.is_some();
        self.wait_stats(
            which,
            Duration::from_secs(20),
            &format!("endpoints learned, {fleet} gateways seen"),
            |_, s| {
                revisions
                    .iter()
                    .all(|(r, n)| s.gauge("inflight_ready_replicas", r) == *n)
                    && (!in_fleet || fleet_size(s) == fleet as u64)
            },
        )
    }

    /// Waits until the caps of the gateways in `which` on revision `revision` sum to `slots`
    /// (`inflight_capacity`: each gateway's slice): the split has settled and every slot is
    /// usable by some gateway.
    pub fn wait_capacity(
        &self,
        which: &[usize],
        revision: &str,
        slots: u64,
        timeout: Duration,
    ) -> Result<Vec<u64>> {
        self.wait_caps(which, revision, timeout, &format!("sum {slots}"), |caps| {
            caps.iter().sum::<u64>() == slots
        })
    }

    /// Waits until `check` holds for the caps (`inflight_capacity`) on `revision` of the
    /// gateways in `which`, in that order; returns them.
    pub fn wait_caps(
        &self,
        which: &[usize],
        revision: &str,
        timeout: Duration,
        what: &str,
        check: impl Fn(&[u64]) -> bool,
    ) -> Result<Vec<u64>> {
        let deadline = Instant::now() + timeout;
        loop {
            let caps = which
                .iter()
                .map(|&i| Ok(self.stats(i)?.gauge("inflight_capacity", revision)))
                .collect::<Result<Vec<u64>>>()?;
            if check(&caps) {
                return Ok(caps);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {revision}'s caps ({what}): {caps:?}"
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every gateway's log tail, for a failing test's message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            let _ = writeln!(out, "--- gateway {i} ---\n{}", m.envoy.log_tail(lines));
        }
        out
    }
}

/// `inflight_fleet_gateways`: the fleet size a gateway sees.
pub fn fleet_size(s: &Stats) -> u64 {
    s.samples
        .iter()
        .find(|x| x.name == "inflight_fleet_gateways")
        .map(|x| x.value as u64)
        .unwrap_or(0)
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // The Envoys are killed by their own drops (members, then the L4 Envoy); the EDS files
        // go with the directory.
        self.members.clear();
        self.l4 = None;
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `counts[i]` copies of `addrs[i]`, in order: the address of each client of a spread.
pub fn spread(addrs: &[SocketAddr], counts: &[usize]) -> Vec<SocketAddr> {
    addrs
        .iter()
        .zip(counts)
        .flat_map(|(a, &n)| std::iter::repeat_n(*a, n))
        .collect()
}

/// One request of a [`Load`], as its client saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The client's number (its place in the addresses given to [`Load::start`]).
    pub client: usize,
    /// The status; 0 when there was no answer (see `error`).
    pub status: u16,
    /// `x-inflight-shed`, when the filter shed it.
    pub shed: Option<String>,
    pub started: Instant,
    pub elapsed: Duration,
    /// Why there was no answer (refused, reset, timed out).
    pub error: Option<String>,
    /// No answer within the client's timeout.
    pub timed_out: bool,
}

/// Closed-loop clients (like `hey -c N`): client `i` sends to `addrs[i]`, one request at a time
/// on its own connection, each holding `hold` upstream and given up after `timeout`.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<thread::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    pub fn start(addrs: &[SocketAddr], host: &str, hold: Duration, timeout: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = addrs
            .iter()
            .enumerate()
            .map(|(client, &addr)| {
                let stop = Arc::clone(&stop);
                let host = host.to_string();
                thread::spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        let r = Request::get(addr, &host)
                            .header("x-hold-ms", hold.as_millis())
                            .header("x-id", format!("c{client}-{}", out.len()))
                            .timeout(timeout)
                            .send();
                        let elapsed = started.elapsed();
                        let failed = r.is_err();
                        out.push(match r {
                            Ok(r) => Outcome {
                                client,
                                status: r.status,
                                shed: r.header("x-inflight-shed").map(str::to_string),
                                started,
                                elapsed,
                                error: None,
                                timed_out: false,
                            },
                            Err(e) => Outcome {
                                client,
                                status: 0,
                                shed: None,
                                started,
                                elapsed,
                                timed_out: matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ),
                                error: Some(e.to_string()),
                            },
                        });
                        if failed {
                            // A gateway that is down refuses at once: do not spin.
                            thread::sleep(Duration::from_millis(20));
                        }
                    }
                    out
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Tells the clients to stop after their current request (without waiting).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stops the clients and waits for their last requests; every request, by client.
    pub fn finish(self) -> Vec<Outcome> {
        self.stop();
        self.clients
            .into_iter()
            .flat_map(|c| c.join().unwrap_or_default())
            .collect()
    }
}

/// How a set of requests ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub ok: usize,
    /// By `x-inflight-shed` reason.
    pub shed: BTreeMap<String, usize>,
    /// Other statuses (not shed by the filter), by status.
    pub other: BTreeMap<u16, usize>,
    /// No answer within the client's timeout.
    pub timed_out: usize,
    /// No answer: refused, reset, closed.
    pub failed: usize,
}

impl Tally {
    pub fn of<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Tally {
        let mut t = Tally::default();
        for o in outcomes {
            match (o.status, &o.shed) {
                (200, _) => t.ok += 1,
                (0, _) if o.timed_out => t.timed_out += 1,
                (0, _) => t.failed += 1,
                (_, Some(reason)) => *t.shed.entry(reason.clone()).or_default() += 1,
                (s, None) => *t.other.entry(s).or_default() += 1,
            }
        }
        t
    }

    pub fn total(&self) -> usize {
        self.ok
            + self.shed.values().sum::<usize>()
            + self.other.values().sum::<usize>()
            + self.timed_out
            + self.failed
    }
}

/// The most a replica held at once within `[from, to)`, from its timeline (`(when, in
/// flight)` after each change), counting what it held when the window opened.
pub fn max_between(timeline: &[(Instant, u32)], from: Instant, to: Instant) -> u32 {
    let before = timeline
        .iter()
        .take_while(|(t, _)| *t < from)
        .last()
        .map_or(0, |(_, n)| *n);
    timeline
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, n)| *n)
        .fold(before, u32::max)
}

/// The first instant at or after `from` when a replica held at least `n` (its timeline).
pub fn first_at_least(timeline: &[(Instant, u32)], from: Instant, n: u32) -> Option<Instant> {
    timeline
        .iter()
        .find(|(t, held)| *t >= from && *held >= n)
        .map(|(t, _)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_gives_each_address_its_count() {
        let a = loopback(1);
        let b = loopback(2);
        let cases = [
            ("even", vec![2, 2], vec![a, a, b, b]),
            ("uneven", vec![3, 1], vec![a, a, a, b]),
            ("none on one", vec![0, 2], vec![b, b]),
            ("none", vec![0, 0], vec![]),
        ];
        for (name, counts, want) in cases {
            assert_eq!(spread(&[a, b], &counts), want, "{name}");
        }
    }

    #[test]
    fn timelines_answer_max_and_first() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let tl = vec![
            (at(0), 1),
            (at(10), 2),
            (at(20), 3),
            (at(30), 2),
            (at(40), 4),
        ];
        let cases = [
            ("whole", at(0), at(50), 4),
            ("held at the window's start counts", at(25), at(35), 3),
            ("before the first change", at(0), at(0), 0),
            ("empty window inside", at(31), at(39), 2),
        ];
        for (name, from, to, want) in cases {
            assert_eq!(max_between(&tl, from, to), want, "{name}");
        }
        assert_eq!(first_at_least(&tl, at(21), 3), Some(at(40)));
        assert_eq!(first_at_least(&tl, at(0), 5), None);
    }

    #[test]
    fn the_plugin_config_carries_the_fleet_keys() {
        let mut spec = Spec::new(3, vec![Revision::new("rev-a", "a.test", 4, vec![1, 2])]);
        spec.fleet = Some(serde_json::json!({"lostAfter": "600ms"}));
        let c = spec.plugin_config();
        assert_eq!(c["fleet"]["peerCluster"], PEER_CLUSTER);
        assert_eq!(c["fleet"]["forwardCluster"], FORWARD_CLUSTER);
        assert_eq!(c["fleet"]["lostAfter"], "600ms");
        assert_eq!(c["membership"]["interval"], "200ms");
        spec.fleet = None;
        assert!(spec.plugin_config().get("fleet").is_none());
    }
}
