//! Envoy for the local stack: the bootstrap (listener with the filter, one EDS cluster per
//! revision fed from a file the scaler rewrites and routed by the filter's endpoint pick, and
//! the STATIC admin cluster through which the filter learns ready replicas), the filter's
//! configuration in a file of its own (file-based ECDS, as Istio delivers a WasmPlugin, so
//! `inflight tune` can change a limit in the running gateway within a tick), and the process,
//! started in its own process group and stopped by pid.

use super::config::{StackConfig, ADMIN_CLUSTER, FORWARD_CLUSTER, FORWARD_HEADER, PEER_CLUSTER};
use anyhow::{bail, Context as _, Result};
use inflight_core::config::DEFAULT_ENDPOINT_HEADER;
use inflight_envoy_control::bootstrap::{self, ROUTER, STATS_TAGS};
use inflight_envoy_control::Launch;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The name of the filter in `http_filters`, which is also the name of its ECDS resource.
pub const FILTER: &str = "inflight";

/// The ECDS file of the filter (its plugin configuration) inside the stack's directory.
pub fn ecds_path(stack_dir: &Path) -> PathBuf {
    stack_dir.join("ecds").join(format!("{FILTER}.yaml"))
}

/// Replaces `path` with `text` atomically: written beside it, then renamed into place. Envoy
/// watches the directory for the rename, and never reads a half-written file.
pub fn replace_file(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// What `inflight up` gives Envoy: the bootstrap, and the contents of the ECDS file it names
/// (the filter with its plugin configuration), which must be in place before Envoy starts: the
/// listener serves only once the filter has a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    pub yaml: String,
    pub filter: String,
}

/// The EDS file of a revision's cluster inside `eds_dir`.
pub fn eds_path(eds_dir: &Path, revision: &str) -> PathBuf {
    eds_dir.join(format!("{revision}.json"))
}

/// A port to listen on: `wanted` if it can be bound on loopback now, else a free one.
/// (Envoy binds it a moment later; the window for a race is small and the error would be loud.)
pub fn pick_port(wanted: u16) -> Result<u16> {
    if wanted != 0 && TcpListener::bind(("127.0.0.1", wanted)).is_ok() {
        return Ok(wanted);
    }
    let l = TcpListener::bind(("127.0.0.1", 0)).context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Ports to listen on, one per entry of `wanted` ([`pick_port`] each), all different: each is
/// held bound until all are chosen.
pub fn pick_ports(wanted: &[u16]) -> Result<Vec<u16>> {
    let mut held = Vec::new();
    for &w in wanted {
        let l = match (w != 0).then(|| TcpListener::bind(("127.0.0.1", w))) {
            Some(Ok(l)) => l,
            _ => TcpListener::bind(("127.0.0.1", 0)).context("finding a free loopback port")?,
        };
        held.push(l);
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The Envoy bootstrap of the local stack, its filter's configuration read from `ecds_file`.
pub fn bootstrap(
    config: &StackConfig,
    listener_port: u16,
    admin_port: u16,
    wasm: &Path,
    eds_dir: &Path,
    ecds_file: &Path,
) -> Result<Bootstrap> {
    gateway_bootstrap(
        config,
        listener_port,
        admin_port,
        None,
        wasm,
        eds_dir,
        ecds_file,
    )
}

/// A gateway's place in a fleet (docs/fleet.md): its number, its own peer port (its peer
/// address is `127.0.0.1:peer_port`), and every member's peer address, its own included.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetMember<'a> {
    pub index: usize,
    pub peer_port: u16,
    pub peers: &'a [SocketAddr],
}

impl FleetMember<'_> {
    pub fn peer_address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.peer_port))
    }
}

/// The bootstrap of one gateway: alone (`fleet` None, the stack of one gateway), or as a member
/// of a fleet, which adds what docs/fleet.md asks of each gateway: its peer address in the node
/// metadata, a peer listener (the public listener's copy on the peer port), the peer and forward
/// clusters, and the forward route first in every virtual host. Every gateway of a fleet reads
/// the same EDS files and the same ECDS file (one plugin configuration, so `inflight tune
/// --apply` on any of them reaches all).
pub fn gateway_bootstrap(
    config: &StackConfig,
    listener_port: u16,
    admin_port: u16,
    fleet: Option<&FleetMember>,
    wasm: &Path,
    eds_dir: &Path,
    ecds_file: &Path,
) -> Result<Bootstrap> {
    // A forwarded request names its peer gateway in the forward header; this route, before the
    // revisions' own, sends it there.
    let forward = match fleet {
        Some(_) => bootstrap::forward_route(FORWARD_HEADER, FORWARD_CLUSTER),
        None => String::new(),
    };
    let mut vhosts = String::new();
    for r in &config.revisions {
        let domains = r
            .hosts
            .iter()
            .map(|h| format!("\"{h}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            vhosts,
            "            - name: {name}\n              domains: [{domains}]\n              routes:\n{forward}              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: {name}, timeout: 0s, retry_policy: {{ retry_on: \"connect-failure,refused-stream\", num_retries: 2 }} }}\n",
            name = r.name
        );
    }
    if let Some(first) = config.revisions.first() {
        let _ = write!(
            vhosts,
            "            - name: default\n              domains: [\"*\"]\n              routes:\n{forward}              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: {name}, timeout: 0s, retry_policy: {{ retry_on: \"connect-failure,refused-stream\", num_retries: 2 }} }}\n",
            name = first.name
        );
    }
    // The filter keeps the revision's total in flight ≤ cc × ready, and each replica ≤ cc by
    // picking: it sends each request to a replica with a free slot (fewer than cc of its
    // requests in flight) and names it in the endpoint header, which the cluster's
    // `override_host` policy follows. So the replica limit holds from the first request a new
    // replica gets, and follows a new containerConcurrency without a restart (`tune --apply`).
    // A request without the header, or naming a replica the cluster no longer has, goes to the
    // least loaded replica (a replica leaving is listed DRAINING until it stops, so a pick of it
    // still reaches it: see `eds`). The circuit breakers are only there to be out of the way: with
    // Envoy's defaults (1024 requests, 3 retries) Envoy could refuse what the filter admitted.
    let policy = bootstrap::override_host_policy(DEFAULT_ENDPOINT_HEADER);
    let mut clusters = String::new();
    for r in &config.revisions {
        let _ = write!(
            clusters,
            r#"  - name: {name}
    type: EDS
    connect_timeout: 1s
{policy}    circuit_breakers:
      thresholds:
      - {{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 100000 }}
{eds}"#,
            name = r.name,
            eds = bootstrap::eds_from_file(&eds_path(eds_dir, &r.name)),
        );
    }
    if let Some(member) = fleet {
        clusters.push_str(&bootstrap::peer_cluster(PEER_CLUSTER, member.peers));
        clusters.push_str(&bootstrap::forward_cluster(FORWARD_CLUSTER, FORWARD_HEADER));
    }
    let node = match fleet {
        Some(member) => bootstrap::node(
            &format!("inflight-up-gateway-{}", member.index),
            Some(member.peer_address()),
        ),
        None => bootstrap::node("inflight-up", None),
    };
    let plugin = config.plugin_config().to_string();
    let inline = format!(
        r#"# Generated by `inflight up`.
{node}{admin}stats_flush_interval: 1s
stats_config:
{STATS_TAGS}{listener}          strip_any_host_port: true
          stream_idle_timeout: 600s
          route_config:
            virtual_hosts:
{vhosts}          http_filters:
{filter}{ROUTER}  clusters:
{clusters}{admin_cluster}"#,
        admin = bootstrap::admin(admin_port),
        listener = bootstrap::http_listener("ingress", listener_port, "ingress"),
        filter = bootstrap::wasm_filter(FILTER, wasm, Some(&plugin)),
        admin_cluster = bootstrap::admin_cluster(ADMIN_CLUSTER, admin_port),
    );
    // The plugin configuration through ECDS rather than in the listener: a new one applies to
    // the next request within milliseconds, where a listener reload (LDS) starts new VMs first
    // and took 130–410 ms.
    let (yaml, filter) = bootstrap::filter_from_file(&inline, FILTER, ecds_file)
        .context("the generated bootstrap has no filter entry to move into its ECDS file")?;
    let yaml = match fleet {
        Some(member) => with_peer_listener(&yaml, listener_port, member.peer_port)
            .context("the generated bootstrap has no listener to copy for the peer port")?,
        None => yaml,
    };
    Ok(Bootstrap { yaml, filter })
}

/// `yaml` (with the one public listener `ingress` on `public_port`) with a copy of that
/// listener named `peer` on `peer_port`: the same connection manager, routes and filter (its
/// configuration from the same ECDS file), where peers send forwarded requests and reports.
fn with_peer_listener(yaml: &str, public_port: u16, peer_port: u16) -> Option<String> {
    let start = yaml.find("  listeners:\n")? + "  listeners:\n".len();
    let end = yaml.find("  clusters:\n")?;
    let public = yaml.get(start..end)?;
    let mut peer = public.to_string();
    for (from, to) in [
        (
            "  - name: ingress\n".to_string(),
            "  - name: peer\n".to_string(),
        ),
        (
            format!("port_value: {public_port} }}"),
            format!("port_value: {peer_port} }}"),
        ),
        (
            "stat_prefix: ingress\n".to_string(),
            "stat_prefix: peer\n".to_string(),
        ),
    ] {
        if !peer.contains(&from) {
            return None;
        }
        peer = peer.replacen(&from, &to, 1);
    }
    Some(format!("{}{peer}{}", &yaml[..end], &yaml[end..]))
}

/// How the L4 load balancer in front of a fleet spreads connections over the gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum L4Lb {
    /// Each new connection to the next gateway in turn (Envoy's `ROUND_ROBIN`).
    #[default]
    RoundRobin,
    /// Each new connection to a gateway chosen at random (`RANDOM`).
    Random,
}

impl L4Lb {
    /// As the command line says it.
    pub fn name(self) -> &'static str {
        match self {
            L4Lb::RoundRobin => "round-robin",
            L4Lb::Random => "random",
        }
    }

    fn policy(self) -> &'static str {
        match self {
            L4Lb::RoundRobin => "ROUND_ROBIN",
            L4Lb::Random => "RANDOM",
        }
    }
}

/// The cluster of the L4 load balancer: the gateways' public listeners.
pub const GATEWAYS_CLUSTER: &str = "inflight-gateways";

/// The bootstrap of the L4 load balancer in front of a fleet: a `tcp_proxy` listener on `port`
/// over the gateways' public listeners, as a Kubernetes Service spreads connections over the
/// gateway pods. It sees connections, not requests: a client's keep-alive connection stays with
/// one gateway.
pub fn l4_bootstrap(port: u16, admin_port: u16, gateways: &[SocketAddr], lb: L4Lb) -> String {
    let endpoints: String = gateways
        .iter()
        .map(|g| bootstrap::lb_endpoint(*g))
        .collect();
    format!(
        r#"# Generated by `inflight up --gateways {n}`: the L4 load balancer in front of the gateways.
{node}{admin}static_resources:
  listeners:
{listener}  clusters:
  - name: {GATEWAYS_CLUSTER}
    type: STATIC
    connect_timeout: 1s
    lb_policy: {policy}
    circuit_breakers:
      thresholds:
      - {{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 100000 }}
    # A gateway that died leaves the rotation within a second (and a connection it refuses is
    # tried on another: the listener's max_connect_attempts).
    health_checks:
    - {{ timeout: 1s, interval: 1s, no_traffic_interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {{}} }}
    load_assignment:
      cluster_name: {GATEWAYS_CLUSTER}
      endpoints:
      - lb_endpoints:
{endpoints}"#,
        n = gateways.len(),
        node = bootstrap::node("inflight-up-l4", None),
        admin = bootstrap::admin(admin_port),
        listener = bootstrap::tcp_proxy_listener("public", port, GATEWAYS_CLUSTER),
        policy = lb.policy(),
    )
}

/// The running Envoy of the stack: in its own process group, stopped by pid (SIGTERM, then
/// SIGKILL) when dropped.
pub struct Envoy(inflight_envoy_control::Envoy);

impl Envoy {
    /// Starts Envoy on `config` and returns once it is LIVE.
    pub fn start(binary: &Path, config: &Path, workers: u32, dir: &Path) -> Result<Envoy> {
        let launch = Launch {
            workers,
            admin_address: dir.join("envoy-admin-address"),
            own_group: true,
            drop_grace: Duration::from_secs(2),
            ..Launch::new(binary, config, dir)
        };
        let mut envoy = inflight_envoy_control::Envoy::spawn(&launch)
            .with_context(|| format!("starting envoy ({})", binary.display()))?;
        if let Err(e) = envoy.wait_live(Duration::from_secs(60)) {
            bail!("{e}:\n{}", envoy.log_tail(30));
        }
        Ok(Envoy(envoy))
    }

    pub fn exited(&mut self) -> bool {
        !self.0.alive()
    }
}

/// The process's own methods: `pid`, `log_tail`, `stop(grace)`, `admin`, `listener`.
impl std::ops::Deref for Envoy {
    type Target = inflight_envoy_control::Envoy;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Envoy {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// The generated YAML against `testdata/bootstrap.yaml` (`UPDATE_GOLDEN=1` rewrites it; review
/// the diff), and the parts of it that matter, said outright.
#[cfg(test)]
mod golden {
    use super::*;

    fn demo_bootstrap() -> Bootstrap {
        let config = StackConfig::parse(super::super::config::DEMO).unwrap();
        bootstrap(
            &config,
            8080,
            9901,
            Path::new("/x/f.wasm"),
            Path::new("/tmp/eds"),
            Path::new("/tmp/ecds/inflight.yaml"),
        )
        .unwrap()
    }

    #[test]
    fn generated_bootstrap_matches_the_golden_file() {
        let generated = demo_bootstrap();
        let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/up/testdata");
        for (file, text) in [
            ("bootstrap.yaml", &generated.yaml),
            ("filter.yaml", &generated.filter),
        ] {
            let path = testdata.join(file);
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&path, text).unwrap();
            }
            assert_eq!(*text, std::fs::read_to_string(&path).unwrap(), "{file}");
        }
    }

    #[test]
    fn the_plugin_configuration_comes_from_the_ecds_file() {
        let Bootstrap { yaml, filter } = demo_bootstrap();
        assert!(
            yaml.contains("          - name: inflight\n            config_discovery:\n")
                && yaml.contains("path: \"/tmp/ecds/inflight.yaml\"")
                && yaml.contains("watched_directory: { path: \"/tmp/ecds\" }"),
            "{yaml}"
        );
        assert!(
            !yaml.contains("StringValue"),
            "no inline configuration: {yaml}"
        );
        // The file holds the filter, named as the entry, with the stack's plugin configuration.
        let doc: serde_json::Value = serde_norway::from_str(&filter).unwrap();
        let resource = &doc["resources"][0];
        assert_eq!(resource["name"], FILTER);
        let plugin = resource["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap();
        let want = StackConfig::parse(super::super::config::DEMO)
            .unwrap()
            .plugin_config();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(plugin).unwrap(),
            want
        );
    }

    #[test]
    fn replace_file_leaves_only_the_new_contents() {
        let dir = std::env::temp_dir().join(format!("inflight-replace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("inflight.yaml");
        replace_file(&path, "one").unwrap();
        replace_file(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["inflight.yaml"], "no temporary file left");
        let e = format!(
            "{:#}",
            replace_file(&dir.join("no/such/dir/f"), "x").unwrap_err()
        );
        assert!(e.contains("writing"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn revision_clusters_follow_the_filters_pick() {
        let yaml = demo_bootstrap().yaml;
        let cluster = &yaml[yaml.find("  - name: torchserve\n").unwrap()..];
        let cluster = &cluster[..cluster.find("  - name: inflight_admin").unwrap()];
        assert!(
            cluster.contains(&bootstrap::override_host_policy(DEFAULT_ENDPOINT_HEADER)),
            "{cluster}"
        );
        // The filter's pick holds each replica to cc: no per-host connection cap (it would also
        // hold a raised containerConcurrency at the old value until a restart).
        assert!(!cluster.contains("per_host_thresholds"), "{cluster}");
        assert!(cluster.contains("max_requests: 100000"), "{cluster}");
        // The filter names the endpoint in the header the policy reads: the default one.
        let plugin = StackConfig::parse(super::super::config::DEMO)
            .unwrap()
            .plugin_config();
        assert!(plugin.get("routing").is_none(), "{plugin}");
    }
}
