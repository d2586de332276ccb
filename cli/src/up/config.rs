//! The local stack's config file (`demo/torchserve.json`): which revisions to run, their limits
//! and autoscaling knobs, the predictor command, and the ports. From it come the filter's plugin
//! configuration and the Envoy bootstrap.

use anyhow::{bail, Context as _, Result};
use inflight_core::config::{AutoscalingDoc, ConfigDoc, FleetDoc, MembershipDoc, RevisionDoc};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// The demo's config, built in so `inflight up --demo` works from any directory.
pub const DEMO: &str = include_str!("../../../demo/torchserve.json");

/// The name of the STATIC cluster through which the filter reads Envoy's own admin endpoint.
pub const ADMIN_CLUSTER: &str = "inflight_admin";

/// A fleet of gateways (`gateways` ≥ 2, docs/fleet.md): the cluster of the gateways' peer
/// addresses (`fleet.peerCluster`), the `ORIGINAL_DST` cluster through which a gateway reaches one
/// of them (`fleet.forwardCluster`), and the header naming that peer (`fleet.forwardHeader`).
pub const PEER_CLUSTER: &str = "inflight-peers";
pub const FORWARD_CLUSTER: &str = inflight_core::config::DEFAULT_FORWARD_CLUSTER;
pub const FORWARD_HEADER: &str = inflight_core::config::DEFAULT_FORWARD_HEADER;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StackConfig {
    /// Envoy's listener port; taken → a free one is chosen and printed. 0 = any free port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Envoy's admin port; 0 (the default) = any free port.
    #[serde(default)]
    pub admin_port: u16,
    /// Envoy worker threads.
    #[serde(default = "default_concurrency")]
    pub envoy_concurrency: u32,
    /// How often the scaler scrapes the gateway and applies its decision.
    #[serde(default = "default_scaler_tick")]
    pub scaler_tick: String,
    /// How often the filter polls Envoy for ready replicas.
    #[serde(default = "default_membership_interval")]
    pub membership_interval: String,
    /// The filter's own tick.
    #[serde(default = "default_filter_tick")]
    pub filter_tick: String,
    /// Gateways (Envoy processes with the filter). 1: one gateway on `port`. 2 or more: a
    /// fleet that splits every replica's containerConcurrency among its members, behind one
    /// more Envoy on `port` that spreads connections over them (L4, `tcp_proxy`).
    #[serde(default = "one")]
    pub gateways: u32,
    pub revisions: Vec<RevisionSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevisionSpec {
    pub name: String,
    pub hosts: Vec<String>,
    pub container_concurrency: u32,
    #[serde(default = "default_target")]
    pub target: f64,
    #[serde(default = "default_utilization")]
    pub target_utilization_percentage: f64,
    /// Replicas started with the stack.
    #[serde(default = "one")]
    pub initial_replicas: u32,
    #[serde(default)]
    pub max_wait: Option<String>,
    #[serde(default)]
    pub buffer_depth: Option<u32>,
    /// The filter's `autoscaling` object, passed through (minScale, maxScale, stableWindow, …).
    #[serde(default)]
    pub autoscaling: AutoscalingDoc,
    pub predictor: PredictorSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PredictorSpec {
    /// A path, or a bare name looked up next to the `inflight` binary, then on PATH.
    pub command: String,
    /// Arguments; `--host 127.0.0.1 --port 0` are appended and the bound address is read from
    /// the `listening on HOST:PORT` line the predictor prints.
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default = "default_ready_path")]
    pub ready_path: String,
    #[serde(default = "default_metrics_path")]
    pub metrics_path: String,
    /// Longest a removed replica may take to finish its in-flight requests before SIGTERM.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: String,
}

fn default_port() -> u16 {
    8080
}
fn default_concurrency() -> u32 {
    2
}
fn default_scaler_tick() -> String {
    "500ms".into()
}
fn default_membership_interval() -> String {
    "500ms".into()
}
fn default_filter_tick() -> String {
    "100ms".into()
}
fn default_target() -> f64 {
    100.0
}
fn default_utilization() -> f64 {
    70.0
}
fn one() -> u32 {
    1
}
fn default_ready_path() -> String {
    "/v2/health/ready".into()
}
fn default_metrics_path() -> String {
    "/metrics".into()
}
fn default_drain_timeout() -> String {
    "30s".into()
}

/// `"250ms"`, `"2s"`, `"1m"` → Duration, through core's parser so the syntax is the filter's.
pub fn duration(key: &str, s: &str) -> Result<Duration> {
    let ms = inflight_core::duration::parse_ms(s)
        .map_err(|e| anyhow::anyhow!("`{key}`: {e}; expected e.g. \"500ms\" or \"30s\""))?;
    Ok(Duration::from_millis(ms))
}

impl StackConfig {
    pub fn load(path: &Path) -> Result<StackConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the stack config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<StackConfig> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let c: StackConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| anyhow::anyhow!("`{}`: {}", e.path(), e.inner()))?;
        c.check()?;
        Ok(c)
    }

    /// Checks the config as a whole (after command-line overrides too): the filter's own
    /// validation of the plugin configuration included.
    pub fn check(&self) -> Result<()> {
        if self.gateways == 0 {
            bail!("`gateways`: 0; run at least one gateway");
        }
        if self.revisions.is_empty() {
            bail!("`revisions`: empty; configure at least one revision");
        }
        duration("scalerTick", &self.scaler_tick)?;
        duration("membershipInterval", &self.membership_interval)?;
        for (i, r) in self.revisions.iter().enumerate() {
            if r.name.is_empty()
                || !r
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                bail!(
                    "`revisions[{i}].name`: `{}` must be a DNS label (a-z, 0-9, -)",
                    r.name
                );
            }
            duration(
                &format!("revisions[{i}].predictor.drainTimeout"),
                &r.predictor.drain_timeout,
            )?;
        }
        // The filter's own validation, so a bad file fails here and not in Envoy's log.
        inflight_core::config::Config::parse(self.plugin_config().to_string().as_bytes())
            .map_err(|e| anyhow::anyhow!("the filter rejects this config: {e}"))?;
        Ok(())
    }

    pub fn scaler_tick(&self) -> Duration {
        duration("scalerTick", &self.scaler_tick).unwrap_or(Duration::from_millis(500))
    }

    /// The filter's plugin configuration, built as core's own schema.
    pub fn plugin_config(&self) -> Value {
        let revisions = self
            .revisions
            .iter()
            .map(|r| RevisionDoc {
                name: r.name.clone(),
                hosts: r.hosts.clone(),
                clusters: vec![r.name.clone()],
                container_concurrency: r.container_concurrency,
                target: Some(r.target),
                target_utilization_percentage: Some(r.target_utilization_percentage),
                ready_replicas: Some(r.initial_replicas),
                buffer_depth: r.buffer_depth,
                max_wait: r.max_wait.clone(),
                upstream_cluster: Some(r.name.clone()),
                autoscaling: Some(r.autoscaling.clone()),
                classes: None,
            })
            .collect();
        let doc = ConfigDoc {
            revisions,
            tick: Some(self.filter_tick.clone()),
            membership: Some(MembershipDoc {
                cluster: ADMIN_CLUSTER.into(),
                interval: Some(self.membership_interval.clone()),
                ..MembershipDoc::default()
            }),
            // Each gateway's own peer address comes from its node metadata
            // (`INFLIGHT_FLEET_SELF`), so every gateway reads the same file.
            fleet: self.fleet().then(|| FleetDoc {
                peer_cluster: PEER_CLUSTER.into(),
                forward_cluster: Some(FORWARD_CLUSTER.into()),
                forward_header: Some(FORWARD_HEADER.into()),
                ..FleetDoc::default()
            }),
            ..ConfigDoc::default()
        };
        // A plain struct of strings and numbers always converts.
        serde_json::to_value(doc).unwrap_or_default()
    }

    /// Whether the stack runs a fleet of gateways (two or more).
    pub fn fleet(&self) -> bool {
        self.gateways >= 2
    }
}

impl RevisionSpec {
    pub fn min_scale(&self) -> u32 {
        self.autoscaling.min_scale.unwrap_or(0)
    }

    /// 0 = unbounded.
    pub fn max_scale(&self) -> u32 {
        self.autoscaling.max_scale.unwrap_or(0)
    }

    pub fn drain_timeout(&self) -> Duration {
        duration("drainTimeout", &self.predictor.drain_timeout).unwrap_or(Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_the_kserve_page() {
        let c = StackConfig::parse(DEMO).unwrap();
        let r = &c.revisions[0];
        assert_eq!(r.name, "torchserve");
        assert_eq!(
            (
                r.container_concurrency,
                r.target,
                r.target_utilization_percentage
            ),
            (10, 10.0, 100.0)
        );
        assert_eq!(r.initial_replicas, 1);
        let p = c.plugin_config();
        assert_eq!(p["revisions"][0]["upstreamCluster"], "torchserve");
        assert_eq!(p["membership"]["cluster"], ADMIN_CLUSTER);
        assert_eq!(c.gateways, 1);
        assert!(p.get("fleet").is_none(), "one gateway, no fleet: {p}");
    }

    #[test]
    fn a_fleet_names_its_clusters_and_header_in_the_plugin_configuration() {
        let mut c = StackConfig::parse(DEMO).unwrap();
        c.gateways = 3;
        let p = c.plugin_config();
        assert_eq!(
            p["fleet"],
            serde_json::json!({
                "peerCluster": "inflight-peers",
                "forwardCluster": "inflight-peer-direct",
                "forwardHeader": "x-inflight-peer",
            })
        );
        assert!(
            p["fleet"].get("self").is_none(),
            "self comes from node metadata"
        );
        c.gateways = 0;
        let e = format!("{:#}", c.check().unwrap_err());
        assert!(e.contains("`gateways`"), "{e}");
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("no revisions", r#"{"revisions": []}"#, "revisions"),
            ("unknown key", r#"{"revisions": [], "prot": 1}"#, "prot"),
            (
                "bad name",
                r#"{"revisions": [{"name": "A", "hosts": [], "containerConcurrency": 1, "predictor": {"command": "x"}}]}"#,
                "revisions[0].name",
            ),
            (
                "bad tick",
                r#"{"scalerTick": "soon", "revisions": [{"name": "a", "hosts": [], "containerConcurrency": 1, "predictor": {"command": "x"}}]}"#,
                "scalerTick",
            ),
        ];
        for (name, text, key) in cases {
            let e = format!("{:#}", StackConfig::parse(text).unwrap_err());
            assert!(e.contains(key), "{name}: {e}");
        }
    }
}
