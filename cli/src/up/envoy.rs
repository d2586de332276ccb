//! Envoy for the local stack: the bootstrap (listener with the filter, one EDS cluster per
//! revision fed from a file the scaler rewrites and routed by the filter's endpoint pick, and
//! the STATIC admin cluster through which the filter learns ready replicas), the filter's
//! configuration in a file of its own (file-based ECDS, as Istio delivers a WasmPlugin, so
//! `inflight tune` can change a limit in the running gateway within a tick), and the process,
//! started in its own process group and stopped by pid.

use super::config::{StackConfig, ADMIN_CLUSTER};
use anyhow::{bail, Context as _, Result};
use inflight_core::config::DEFAULT_ENDPOINT_HEADER;
use inflight_envoy_control::bootstrap::{self, ROUTER, STATS_TAGS};
use inflight_envoy_control::Launch;
use std::fmt::Write as _;
use std::net::TcpListener;
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

/// The Envoy bootstrap of the local stack, its filter's configuration read from `ecds_file`.
pub fn bootstrap(
    config: &StackConfig,
    listener_port: u16,
    admin_port: u16,
    wasm: &Path,
    eds_dir: &Path,
    ecds_file: &Path,
) -> Result<Bootstrap> {
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
            "            - name: {name}\n              domains: [{domains}]\n              routes:\n              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: {name}, timeout: 0s, retry_policy: {{ retry_on: \"connect-failure,refused-stream\", num_retries: 2 }} }}\n",
            name = r.name
        );
    }
    if let Some(first) = config.revisions.first() {
        let _ = write!(
            vhosts,
            "            - name: default\n              domains: [\"*\"]\n              routes:\n              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: {name}, timeout: 0s, retry_policy: {{ retry_on: \"connect-failure,refused-stream\", num_retries: 2 }} }}\n",
            name = first.name
        );
    }
    // The filter keeps the revision's total in flight ≤ cc × ready, and each replica ≤ cc by
    // picking: it sends each request to a replica with a free slot (fewer than cc of its
    // requests in flight) and names it in the endpoint header, which the cluster's
    // `override_host` policy follows. So the replica limit holds from the first request a new
    // replica gets, and follows a new containerConcurrency without a restart (`tune --apply`).
    // A request without the header, or naming a replica the cluster no longer has, gets 503
    // (no balancing fallback: another replica may be full). The circuit breakers are only there to be out of the way: with
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
    let plugin = config.plugin_config().to_string();
    let inline = format!(
        r#"# Generated by `inflight up`.
node: {{ id: inflight-up, cluster: inflight-up }}
{admin}stats_flush_interval: 1s
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
    Ok(Bootstrap { yaml, filter })
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
