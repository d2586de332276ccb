//! From predictors to the three outputs: the filter's plugin configuration, an Istio
//! `WasmPlugin`, an Istio `EnvoyFilter`. Both Istio outputs are followed by the `EnvoyFilter`
//! that gives each revision's cluster the `override_host` load-balancing policy, so Envoy sends
//! a request to the endpoint the filter picked for it ([`endpoint_picking`]).
//!
//! Outputs are serde structs with their fields in the order a person reads them, so the text is
//! stable (golden-tested) whatever features `serde_json` is built with.

use super::fleet::{self, Fleet};
use super::isvc::{self, Mode, Predictor};
use super::Args;
use anyhow::{bail, Context as _, Result};
use inflight_core::config::{
    AutoscalingDoc, ConfigDoc, FleetDoc, MembershipDoc, RevisionDoc, RoutingDoc,
    DEFAULT_ENDPOINT_HEADER,
};
use inflight_envoy_control::bootstrap;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

pub const DEFAULT_WASM_URL: &str = "oci://registry.example.com/inflight/filter:0.1.0";
pub const DEFAULT_WASM_FILE: &str = "/var/local/lib/wasm/inflight/inflight.wasm";
/// The cluster manifests/istio/common/membership-cluster.yaml adds to the gateway.
pub const DEFAULT_MEMBERSHIP_CLUSTER: &str = "inflight-admin";
/// The filter's root context id and the name of everything it adds to the gateway.
const PLUGIN: &str = "inflight";
/// The EnvoyFilter that sets the load-balancing policy of the revisions' clusters.
const ENDPOINT_PICKING: &str = "inflight-endpoint-picking";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The filter's plugin configuration (JSON), for plain Envoy.
    FilterConfig,
    /// An Istio WasmPlugin for the ingress gateway.
    Wasmplugin,
    /// An Istio EnvoyFilter inserting the wasm filter before the router (the module mounted
    /// into the gateway).
    Envoyfilter,
}

/// The gateway the Istio outputs target.
pub struct Gateway<'a> {
    pub namespace: &'a str,
    pub selector: BTreeMap<String, String>,
    pub wasm_url: &'a str,
    pub wasm_file: &'a str,
    /// The port of the gateway's plain-HTTP listener, where a fleet's peer port is added.
    pub http_port: u16,
}

/// `k=v[,k=v]` → labels.
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                labels.insert(k.trim().to_string(), v.trim().to_string());
            }
            _ => bail!("--gateway-selector: `{part}` is not `label=value`"),
        }
    }
    if labels.is_empty() {
        bail!("--gateway-selector: empty; e.g. istio=ingressgateway");
    }
    Ok(labels)
}

/// The filter's plugin configuration: core's own schema, so render cannot drift from what the
/// filter reads.
pub type FilterConfig = ConfigDoc;

/// The validated result: the filter configuration and what the operator should know.
pub struct Plan {
    pub config: FilterConfig,
    /// The gateway replicas split each pod's containerConcurrency (`config.fleet`, by name).
    pub fleet: Option<Fleet>,
    pub notes: Vec<String>,
}

impl Plan {
    pub fn build(predictors: &[(String, Predictor)], args: &Args) -> Result<Plan> {
        let membership = match (&args.membership_cluster, args.no_membership, args.format) {
            (_, true, _) => None,
            (Some(c), false, _) => Some(membership(c)),
            (None, false, Format::FilterConfig) => None,
            (None, false, _) => Some(membership(DEFAULT_MEMBERSHIP_CLUSTER)),
        };
        let mut revisions = Vec::new();
        let mut notes = Vec::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (source, p) in predictors {
            notes.extend(p.notes.iter().cloned());
            let name = if args.namespaced_names {
                format!("{}-{}", p.namespace, p.name)
            } else {
                p.name.clone()
            };
            if !isvc::is_dns_label(&name) {
                bail!("{source}: revision name `{name}` is longer than 63 characters; it is the `revision` label of every metric");
            }
            let id = format!("{}/{}", p.namespace, p.name);
            if let Some(other) = seen.insert(name.clone(), id.clone()) {
                if other == id {
                    bail!("{source}: InferenceService {id} is given twice");
                }
                bail!("{source}: InferenceServices {other} and {id} both map to revision `{name}`; pass --namespaced-names to name revisions <namespace>-<name>");
            }
            let template = args.domain_template.as_deref().unwrap_or(match p.mode {
                Mode::Serverless => "{{.Name}}.{{.Namespace}}.{{.Domain}}",
                Mode::Raw => "{{ .Name }}-{{ .Namespace }}.{{ .IngressDomain }}",
            });
            // The InferenceService's own host, then the predictor component's (KServe routes
            // both to the predictor).
            let hosts = vec![
                host(template, &p.name, &p.namespace, &args.domain)?,
                host(
                    template,
                    &format!("{}-predictor", p.name),
                    &p.namespace,
                    &args.domain,
                )?,
            ];
            // Raw mode: KServe's Service `<name>-predictor` on port 80 is one Istio cluster,
            // whatever host the client used.
            let clusters = match p.mode {
                Mode::Raw => vec![format!(
                    "outbound|80||{}-predictor.{}.svc.cluster.local",
                    p.name, p.namespace
                )],
                Mode::Serverless => Vec::new(),
            };
            let enforced = match p.mode {
                Mode::Serverless => serverless_limits(p, &name, &mut notes),
                Mode::Raw => raw_limits(p, &name, membership.is_some(), args, &mut notes),
            };
            revisions.push(RevisionDoc {
                name,
                hosts,
                clusters,
                container_concurrency: enforced.container_concurrency,
                target: Some(enforced.target),
                target_utilization_percentage: Some(
                    p.target_utilization_percentage
                        .unwrap_or(inflight_core::config::DEFAULT_UTILIZATION_PERCENT),
                ),
                ready_replicas: enforced.ready_replicas,
                max_wait: args.max_wait.clone(),
                autoscaling: Some(AutoscalingDoc {
                    min_scale: Some(p.min_scale),
                    max_scale: Some(p.max_scale),
                    initial_scale: p.initial_scale,
                    activation_scale: p.activation_scale,
                    stable_window: p.stable_window.clone(),
                    panic_window_percentage: p.panic_window_percentage,
                    panic_threshold_percentage: p.panic_threshold_percentage,
                    ..AutoscalingDoc::default()
                }),
                ..RevisionDoc::default()
            });
        }
        let fleet = fleet_plan(args, membership.is_some(), &mut notes)?;
        let config = FilterConfig {
            revisions,
            membership,
            routing: args.no_endpoint_picking.then_some(RoutingDoc {
                enabled: Some(false),
                endpoint_header: None,
            }),
            // Every name written out, so that the file shows what the Envoy pieces must match;
            // `self` unset: each gateway takes the first of Istio's INSTANCE_IPS (its pod IP).
            fleet: fleet.as_ref().map(|f| FleetDoc {
                peer_cluster: f.peer_cluster.clone(),
                forward_cluster: Some(f.forward_cluster.clone()),
                forward_header: Some(f.forward_header.clone()),
                peer_port: Some(f.peer_port),
                ..FleetDoc::default()
            }),
            ..FilterConfig::default()
        };
        let plan = Plan {
            config,
            fleet,
            notes,
        };
        // The filter's own parser is the judge: never print a config it would refuse.
        let json = serde_json::to_vec(&plan.config)?;
        if let Err(e) = inflight_core::Config::parse(&json) {
            bail!("the rendered filter configuration is invalid: {e}");
        }
        Ok(plan)
    }
}

/// Whether the gateway replicas split each pod's containerConcurrency, and under which names.
/// On by default for the Istio outputs: Istio's gateway runs as a Deployment that is often
/// scaled (istioctl's default installs an HPA of 1 to 5 replicas), and without the fleet N
/// replicas allow N × containerConcurrency per pod; a fleet of one behaves as no fleet. Off by
/// default for plain Envoy (`filter-config`), whose peer cluster and listener the operator adds.
/// The split needs the endpoints (membership) and the pick (endpoint picking).
fn fleet_plan(args: &Args, membership: bool, notes: &mut Vec<String>) -> Result<Option<Fleet>> {
    let wanted = match (args.fleet, args.no_fleet, args.format) {
        (true, _, _) => true,
        (_, true, _) => false,
        (false, false, Format::FilterConfig) => false,
        (false, false, _) => true,
    };
    if !wanted {
        return Ok(None);
    }
    if args.peer_port == 0 || args.peer_port == args.gateway_http_port {
        bail!(
            "--peer-port {}: expected a port of its own, other than the gateway's HTTP port {}",
            args.peer_port,
            args.gateway_http_port
        );
    }
    let missing = match (membership, args.no_endpoint_picking) {
        (false, _) => {
            Some("membership (--no-membership, or filter-config without --membership-cluster)")
        }
        (true, true) => Some("endpoint picking (--no-endpoint-picking)"),
        (true, false) => None,
    };
    match missing {
        Some(what) if args.fleet => bail!(
            "--fleet needs {what}: the gateways split each pod's slots, so they must learn the pods and pick them"
        ),
        Some(what) => {
            notes.push(format!(
                "no fleet: it needs {what}; with N gateway replicas a revision may get N × containerConcurrency per pod (pass --no-fleet to say this is meant)"
            ));
            Ok(None)
        }
        None => Ok(Some(Fleet {
            peer_port: args.peer_port,
            ..Fleet::default()
        })),
    }
}

/// What the gateway enforces for one revision (its limit and soft target), and the ready
/// replicas it starts from.
struct Enforced {
    container_concurrency: u32,
    target: f64,
    /// `None`: the filter's default (1).
    ready_replicas: Option<u32>,
}

/// Serverless (Knative): the gateway enforces no limit and only observes. Knative's pods sit
/// behind the activator, where the gateway cannot count them, so any cap it held would be a
/// guess at `containerConcurrency × ready pods`; too low (the activator's view of one pod), it
/// would hold Knative's autoscaler below the demand it needs to see to scale up (the seed, 50
/// clients at target 10, would stay at 2 pods instead of 5 or more). queue-proxy holds each pod
/// to `containerConcurrency` and the activator buffers while the revision has no pod, as
/// without the gateway. So the filter gets `containerConcurrency: 0` (no limit, no queue: one
/// assumed ready replica makes it unlimited) and the soft target capped by the hard limit, as
/// Knative caps it, so `inflight_desired_replicas` stays Knative's decision on the demand the
/// gateway sees.
fn serverless_limits(p: &Predictor, name: &str, notes: &mut Vec<String>) -> Enforced {
    let mut target = p.target.unwrap_or(inflight_core::config::DEFAULT_TARGET);
    if p.container_concurrency > 0 {
        target = target.min(f64::from(p.container_concurrency));
        notes.push(format!(
            "{name}: serverless: the gateway enforces no limit (filter containerConcurrency 0) and exports the demand it sees; Knative's queue-proxy holds each pod to containerConcurrency {} and its activator buffers while no pod is ready",
            p.container_concurrency
        ));
    }
    Enforced {
        container_concurrency: 0,
        target,
        ready_replicas: None,
    }
}

/// Raw deployment: the gateway is the only limit, `containerConcurrency` per ready pod. With
/// membership the filter counts the healthy members of the predictor Service's cluster, so
/// the static value only covers the first poll; otherwise capacity stays cc × this guess, the
/// least the revision runs (min scale), so that no pod is overloaded.
fn raw_limits(
    p: &Predictor,
    name: &str,
    membership: bool,
    args: &Args,
    notes: &mut Vec<String>,
) -> Enforced {
    let ready = args.ready_replicas.unwrap_or(if membership {
        p.min_scale
    } else {
        p.min_scale.max(1)
    });
    let guessed = !membership && (p.max_scale == 0 || p.max_scale > p.min_scale.max(1));
    if p.container_concurrency > 0 && args.ready_replicas.is_none() && guessed {
        notes.push(format!(
            "{name}: the filter assumes {ready} ready replica{} (capacity {} in flight): without membership it cannot learn more; keep membership on, or pass --ready-replicas for a fixed replica count",
            if ready == 1 { "" } else { "s" },
            u64::from(p.container_concurrency) * u64::from(ready),
        ));
    }
    Enforced {
        container_concurrency: p.container_concurrency,
        target: p.target.unwrap_or(inflight_core::config::DEFAULT_TARGET),
        ready_replicas: Some(ready),
    }
}

fn membership(cluster: &str) -> MembershipDoc {
    MembershipDoc {
        cluster: cluster.to_string(),
        ..MembershipDoc::default()
    }
}

/// Expands KServe's (Go template) host template for the three names it knows.
fn host(template: &str, name: &str, namespace: &str, domain: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("}}") else {
            bail!("--domain-template: unclosed `{{{{` in `{template}`");
        };
        let key = rest[start + 2..start + end].trim();
        out.push_str(match key {
            ".Name" => name,
            ".Namespace" => namespace,
            ".IngressDomain" | ".Domain" => domain,
            other => bail!("--domain-template: unknown field `{other}`; use .Name, .Namespace and .IngressDomain"),
        });
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Ok(out.to_ascii_lowercase())
}

// ---- Kubernetes objects ----

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Object<S> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: S,
}

#[derive(Serialize)]
pub(super) struct Metadata {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) annotations: BTreeMap<String, String>,
}

pub(super) fn metadata(name: &str, namespace: &str) -> Metadata {
    let mut labels = BTreeMap::new();
    labels.insert("app.kubernetes.io/name".into(), PLUGIN.into());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "inflight-render".into(),
    );
    Metadata {
        name: name.into(),
        namespace: namespace.into(),
        labels,
        annotations: BTreeMap::new(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmPluginSpec<'a> {
    selector: MatchLabels,
    url: &'a str,
    image_pull_policy: &'static str,
    plugin_name: &'static str,
    /// After authentication, authorization and Istio's stats, just before the router: only
    /// requests that will be routed take a slot, and Istio's metrics see the 503s we shed.
    phase: &'static str,
    fail_strategy: &'static str,
    #[serde(rename = "type")]
    plugin_type: &'static str,
    plugin_config: &'a FilterConfig,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MatchLabels {
    match_labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvoyFilterSpec<P> {
    workload_selector: Labels,
    config_patches: Vec<P>,
}

#[derive(Serialize)]
pub(super) struct Labels {
    pub(super) labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigPatch {
    apply_to: &'static str,
    #[serde(rename = "match")]
    on: PatchMatch,
    patch: Patch,
}

#[derive(Serialize)]
struct PatchMatch {
    context: &'static str,
    listener: ListenerMatch,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListenerMatch {
    filter_chain: FilterChainMatch,
}

#[derive(Serialize)]
struct FilterChainMatch {
    filter: FilterMatch,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FilterMatch {
    name: &'static str,
    sub_filter: Named,
}

#[derive(Serialize)]
struct Named {
    name: &'static str,
}

#[derive(Serialize)]
struct Patch {
    operation: &'static str,
    value: WasmFilter,
}

/// A `CLUSTER` patch that merges `value` into the gateway's cluster `name`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterPatch {
    apply_to: &'static str,
    #[serde(rename = "match")]
    on: ClusterPatchMatch,
    patch: MergePatch,
}

#[derive(Serialize)]
struct ClusterPatchMatch {
    context: &'static str,
    cluster: ClusterName,
}

#[derive(Serialize)]
struct ClusterName {
    name: String,
}

#[derive(Serialize)]
struct MergePatch {
    operation: &'static str,
    /// Envoy's own YAML (a `Cluster` fragment), kept in the order it was written.
    value: serde_norway::Value,
}

/// The Envoy HTTP filter (`envoy.extensions.filters.http.wasm.v3.Wasm`), as Envoy reads it.
#[derive(Serialize)]
pub struct WasmFilter {
    name: &'static str,
    typed_config: WasmTyped,
}

#[derive(Serialize)]
struct WasmTyped {
    #[serde(rename = "@type")]
    type_url: &'static str,
    config: PluginConfig,
}

#[derive(Serialize)]
struct PluginConfig {
    name: &'static str,
    root_id: &'static str,
    /// A VM that dies (a trap) is reloaded instead of failing every request.
    failure_policy: &'static str,
    vm_config: VmConfig,
    configuration: StringValue,
}

#[derive(Serialize)]
struct VmConfig {
    vm_id: &'static str,
    runtime: &'static str,
    code: Code,
}

#[derive(Serialize)]
struct Code {
    local: Local,
}

#[derive(Serialize)]
struct Local {
    filename: String,
}

#[derive(Serialize)]
struct StringValue {
    #[serde(rename = "@type")]
    type_url: &'static str,
    value: String,
}

/// The wasm HTTP filter with this configuration, loading the module from `wasm_file`.
pub fn wasm_filter(config: &FilterConfig, wasm_file: &str) -> Result<WasmFilter> {
    Ok(WasmFilter {
        name: PLUGIN,
        typed_config: WasmTyped {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            config: PluginConfig {
                name: PLUGIN,
                root_id: PLUGIN,
                failure_policy: "FAIL_RELOAD",
                vm_config: VmConfig {
                    vm_id: PLUGIN,
                    runtime: "envoy.wasm.runtime.v8",
                    code: Code {
                        local: Local {
                            filename: wasm_file.into(),
                        },
                    },
                },
                configuration: StringValue {
                    type_url: "type.googleapis.com/google.protobuf.StringValue",
                    value: serde_json::to_string(config)?,
                },
            },
        },
    })
}

/// The request header the filter names its pick in; `None` when the configuration turns
/// endpoint picking off.
fn endpoint_header(config: &FilterConfig) -> Option<&str> {
    match &config.routing {
        Some(r) if r.enabled == Some(false) => None,
        Some(r) => Some(
            r.endpoint_header
                .as_deref()
                .unwrap_or(DEFAULT_ENDPOINT_HEADER),
        ),
        None => Some(DEFAULT_ENDPOINT_HEADER),
    }
}

/// The clusters whose endpoints the filter picks: each revision's upstream cluster (its only
/// `clusters` entry unless `upstreamCluster` names one), when membership lets the filter learn
/// the endpoints. Serverless revisions have none: their pods sit behind Knative's activator,
/// where the gateway cannot see them.
fn picked_clusters(config: &FilterConfig) -> Vec<&str> {
    if config.membership.is_none() {
        return Vec::new();
    }
    let mut clusters: Vec<&str> = Vec::new();
    for r in &config.revisions {
        let upstream = match (&r.upstream_cluster, r.clusters.as_slice()) {
            (Some(c), _) => c.as_str(),
            (None, [only]) => only.as_str(),
            (None, _) => continue,
        };
        if !clusters.contains(&upstream) {
            clusters.push(upstream);
        }
    }
    clusters
}

/// The `EnvoyFilter` that makes Envoy follow the filter's pick: a `CLUSTER` patch per picked
/// cluster merging in `load_balancing_policy` = `override_host` on the endpoint header, with
/// least request (full scan) for requests without it. The policy is the YAML the project's own
/// Envoy configs use (`inflight_envoy_control::bootstrap::override_host_policy`). Istio's
/// `lb_policy` on the cluster can stay (a MERGE could not clear it): Envoy balances by
/// `load_balancing_policy` when both are set. What it refuses beside it is locality-weighted
/// balancing, which Istio adds for a `localityLbSetting` with `distribute` or failover (see
/// docs/deploy.md). `None` when there is nothing to patch.
fn endpoint_picking(config: &FilterConfig, gw: &Gateway<'_>) -> Result<Option<String>> {
    let Some(header) = endpoint_header(config) else {
        return Ok(None);
    };
    let clusters = picked_clusters(config);
    if clusters.is_empty() {
        return Ok(None);
    }
    let policy: serde_norway::Value =
        serde_norway::from_str(&bootstrap::override_host_policy(header))
            .context("the override_host policy is not YAML")?;
    let patches = clusters
        .into_iter()
        .map(|name| ClusterPatch {
            apply_to: "CLUSTER",
            on: ClusterPatchMatch {
                context: "GATEWAY",
                cluster: ClusterName { name: name.into() },
            },
            patch: MergePatch {
                operation: "MERGE",
                value: policy.clone(),
            },
        })
        .collect();
    let doc = serde_norway::to_string(&Object {
        api_version: "networking.istio.io/v1alpha3",
        kind: "EnvoyFilter",
        metadata: metadata(ENDPOINT_PICKING, gw.namespace),
        spec: EnvoyFilterSpec {
            workload_selector: Labels {
                labels: gw.selector.clone(),
            },
            config_patches: patches,
        },
    })?;
    Ok(Some(format!(
        "# Endpoint picking (docs/deploy.md): the filter names the pod it picked for each request\n\
         # in `{header}`; the override_host policy merged into the revision's\n\
         # cluster sends the request there (least request without the header). Without it,\n\
         # inflight_endpoint_mismatch_total grows.\n{doc}"
    )))
}

/// Writes the plan in `format`; YAML outputs carry the notes as comments.
pub fn write(plan: &Plan, format: Format, gw: &Gateway<'_>, notes: &[String]) -> Result<String> {
    let mut header = String::new();
    if format != Format::FilterConfig {
        let _ = writeln!(
            header,
            "# Rendered by `inflight render` from InferenceService YAML; see docs/deploy.md."
        );
        if let Some(m) = &plan.config.membership {
            let _ = writeln!(
                header,
                "# Ready replicas are read from Envoy's admin through the cluster `{}`{}.",
                m.cluster,
                if m.cluster == DEFAULT_MEMBERSHIP_CLUSTER {
                    " (manifests/istio/common/membership-cluster.yaml)"
                } else {
                    ""
                }
            );
        }
        for n in notes {
            let _ = writeln!(header, "# note: {n}");
        }
    }
    let body = match format {
        Format::FilterConfig => {
            let mut s = serde_json::to_string_pretty(&plan.config)?;
            s.push('\n');
            s
        }
        Format::Wasmplugin => serde_norway::to_string(&Object {
            api_version: "extensions.istio.io/v1alpha1",
            kind: "WasmPlugin",
            metadata: metadata(PLUGIN, gw.namespace),
            spec: WasmPluginSpec {
                selector: MatchLabels {
                    match_labels: gw.selector.clone(),
                },
                url: gw.wasm_url,
                image_pull_policy: "IfNotPresent",
                plugin_name: PLUGIN,
                phase: "UNSPECIFIED_PHASE",
                fail_strategy: "FAIL_RELOAD",
                plugin_type: "HTTP",
                plugin_config: &plan.config,
            },
        })?,
        Format::Envoyfilter => serde_norway::to_string(&Object {
            api_version: "networking.istio.io/v1alpha3",
            kind: "EnvoyFilter",
            metadata: metadata(PLUGIN, gw.namespace),
            spec: EnvoyFilterSpec {
                workload_selector: Labels {
                    labels: gw.selector.clone(),
                },
                config_patches: vec![ConfigPatch {
                    apply_to: "HTTP_FILTER",
                    on: PatchMatch {
                        context: "GATEWAY",
                        listener: ListenerMatch {
                            filter_chain: FilterChainMatch {
                                filter: FilterMatch {
                                    name: "envoy.filters.network.http_connection_manager",
                                    sub_filter: Named {
                                        name: "envoy.filters.http.router",
                                    },
                                },
                            },
                        },
                    },
                    patch: Patch {
                        operation: "INSERT_BEFORE",
                        value: wasm_filter(&plan.config, gw.wasm_file)?,
                    },
                }],
            },
        })?,
    };
    let mut text = header + &body;
    if format != Format::FilterConfig {
        if let Some(p) = endpoint_picking(&plan.config, gw)? {
            text = format!("{text}---\n{p}");
        }
        if let Some(f) = &plan.fleet {
            text = format!("{text}---\n{}", fleet::documents(f, gw)?);
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_templates() {
        let cases = [
            (
                "{{.Name}}.{{.Namespace}}.{{.Domain}}",
                "torchserve.default.example.com",
            ),
            (
                "{{ .Name }}-{{ .Namespace }}.{{ .IngressDomain }}",
                "torchserve-default.example.com",
            ),
            ("models.{{ .IngressDomain }}", "models.example.com"),
        ];
        for (t, want) in cases {
            assert_eq!(
                host(t, "torchserve", "default", "example.com").unwrap(),
                want,
                "{t}"
            );
        }
        assert!(host("{{ .Nope }}", "a", "b", "c").is_err());
        assert!(host("{{ .Name", "a", "b", "c").is_err());
    }

    fn revision(name: &str, clusters: &[&str], upstream: Option<&str>) -> RevisionDoc {
        RevisionDoc {
            name: name.into(),
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
            upstream_cluster: upstream.map(String::from),
            ..RevisionDoc::default()
        }
    }

    #[test]
    fn endpoint_header_follows_routing() {
        let routing = |enabled, header: Option<&str>| FilterConfig {
            routing: Some(RoutingDoc {
                enabled,
                endpoint_header: header.map(String::from),
            }),
            ..FilterConfig::default()
        };
        let cases = [
            (
                "unset: on, the default header",
                FilterConfig::default(),
                Some(DEFAULT_ENDPOINT_HEADER),
            ),
            (
                "enabled, no header",
                routing(Some(true), None),
                Some(DEFAULT_ENDPOINT_HEADER),
            ),
            ("own header", routing(None, Some("x-pod")), Some("x-pod")),
            ("turned off", routing(Some(false), Some("x-pod")), None),
        ];
        for (name, config, want) in cases {
            assert_eq!(endpoint_header(&config), want, "{name}");
        }
    }

    #[test]
    fn picked_clusters_are_the_upstream_clusters_membership_learns() {
        let raw = "outbound|80||m-predictor.default.svc.cluster.local";
        let with = |revisions| FilterConfig {
            revisions,
            membership: Some(membership("inflight-admin")),
            ..FilterConfig::default()
        };
        let cases: [(&str, FilterConfig, Vec<&str>); 6] = [
            (
                "raw: its only cluster",
                with(vec![revision("m", &[raw], None)]),
                vec![raw],
            ),
            (
                "serverless: none",
                with(vec![revision("s", &[], None)]),
                vec![],
            ),
            (
                "explicit upstreamCluster",
                with(vec![revision("m", &["a", "b"], Some("b"))]),
                vec!["b"],
            ),
            (
                "two clusters, no upstreamCluster: none",
                with(vec![revision("m", &["a", "b"], None)]),
                vec![],
            ),
            (
                "one cluster behind two revisions: once",
                with(vec![
                    revision("a", &[raw], None),
                    revision("b", &[raw], None),
                ]),
                vec![raw],
            ),
            (
                "no membership: the filter cannot learn endpoints",
                FilterConfig {
                    revisions: vec![revision("m", &[raw], None)],
                    ..FilterConfig::default()
                },
                vec![],
            ),
        ];
        for (name, config, want) in cases {
            assert_eq!(picked_clusters(&config), want, "{name}");
        }
    }

    #[test]
    fn endpoint_picking_patches_each_picked_cluster_with_the_shared_policy() {
        let gw = Gateway {
            namespace: "istio-system",
            selector: parse_selector("istio=ingressgateway").unwrap(),
            wasm_url: DEFAULT_WASM_URL,
            wasm_file: DEFAULT_WASM_FILE,
            http_port: 8080,
        };
        let config = FilterConfig {
            revisions: vec![revision("m", &["outbound|80||m"], None)],
            membership: Some(membership("inflight-admin")),
            ..FilterConfig::default()
        };
        let text = endpoint_picking(&config, &gw).unwrap().unwrap();
        let doc: serde_json::Value = serde_norway::from_str(&text).unwrap();
        let patch = &doc["spec"]["configPatches"][0];
        assert_eq!(doc["metadata"]["name"], ENDPOINT_PICKING);
        assert_eq!(patch["applyTo"], "CLUSTER");
        assert_eq!(patch["match"]["context"], "GATEWAY");
        assert_eq!(patch["match"]["cluster"]["name"], "outbound|80||m");
        assert_eq!(patch["patch"]["operation"], "MERGE");
        let shared: serde_json::Value =
            serde_norway::from_str(&bootstrap::override_host_policy(DEFAULT_ENDPOINT_HEADER))
                .unwrap();
        assert_eq!(patch["patch"]["value"], shared);
        // Nothing to patch: no document at all.
        let serverless = FilterConfig {
            revisions: vec![revision("s", &[], None)],
            ..config
        };
        assert!(endpoint_picking(&serverless, &gw).unwrap().is_none());
    }

    fn predictor(mode: Mode, cc: u32, target: Option<f64>, min: u32, max: u32) -> Predictor {
        Predictor {
            name: "m".into(),
            namespace: "default".into(),
            mode,
            container_concurrency: cc,
            target,
            target_utilization_percentage: None,
            min_scale: min,
            max_scale: max,
            stable_window: None,
            panic_window_percentage: None,
            panic_threshold_percentage: None,
            initial_scale: None,
            activation_scale: None,
            notes: Vec::new(),
        }
    }

    /// `inflight render -f x` plus `extra`, as clap reads it.
    fn args(extra: &[&str]) -> Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let argv = ["render", "-f", "x.yaml"].iter().chain(extra);
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn serverless_revisions_get_no_gateway_limit() {
        // (case, cc, target, max scale) → (filter target, a note)
        let cases = [
            ("the seed: cc 10, target 10", 10, Some(10.0), 0, 10.0, true),
            (
                "target above cc: capped as Knative caps it",
                10,
                Some(100.0),
                0,
                10.0,
                true,
            ),
            (
                "no target: Knative's default, capped by cc",
                4,
                None,
                0,
                4.0,
                true,
            ),
            (
                "bounded max scale changes nothing",
                10,
                Some(10.0),
                5,
                10.0,
                true,
            ),
            (
                "cc 0: nothing to hand to Knative",
                0,
                Some(3.0),
                0,
                3.0,
                false,
            ),
        ];
        for (name, cc, target, max, want_target, want_note) in cases {
            let mut notes = Vec::new();
            let l = serverless_limits(
                &predictor(Mode::Serverless, cc, target, 1, max),
                "m",
                &mut notes,
            );
            assert_eq!(l.container_concurrency, 0, "{name}");
            assert_eq!(l.target, want_target, "{name}");
            assert_eq!(l.ready_replicas, None, "{name}: the filter's default, 1");
            assert_eq!(notes.len(), usize::from(want_note), "{name}: {notes:?}");
        }
    }

    #[test]
    fn raw_revisions_keep_the_hard_limit_and_start_at_min_scale() {
        struct Case {
            name: &'static str,
            min: u32,
            max: u32,
            membership: bool,
            flags: &'static [&'static str],
            ready: u32,
            note: bool,
        }
        let case = |name, min, max, membership, flags, ready, note| Case {
            name,
            min,
            max,
            membership,
            flags,
            ready,
            note,
        };
        let cases = [
            case(
                "membership: min scale until the first poll",
                2,
                10,
                true,
                &[],
                2,
                false,
            ),
            case(
                "membership, min 0: starts at zero",
                0,
                10,
                true,
                &[],
                0,
                false,
            ),
            case(
                "no membership: min scale, at least 1, said",
                0,
                10,
                false,
                &[],
                1,
                true,
            ),
            case(
                "no membership, fixed size: nothing to say",
                3,
                3,
                false,
                &[],
                3,
                false,
            ),
            case(
                "--ready-replicas wins",
                1,
                10,
                false,
                &["--ready-replicas", "4"],
                4,
                false,
            ),
        ];
        for Case {
            name,
            min,
            max,
            membership,
            flags,
            ready: want_ready,
            note: want_note,
        } in cases
        {
            let mut notes = Vec::new();
            let l = raw_limits(
                &predictor(Mode::Raw, 10, Some(10.0), min, max),
                "m",
                membership,
                &args(flags),
                &mut notes,
            );
            assert_eq!(l.container_concurrency, 10, "{name}");
            assert_eq!(l.ready_replicas, Some(want_ready), "{name}");
            assert_eq!(notes.len(), usize::from(want_note), "{name}: {notes:?}");
        }
    }

    #[test]
    fn selectors() {
        let s = parse_selector("istio=ingressgateway, app=gw").unwrap();
        assert_eq!(s.len(), 2);
        assert!(parse_selector("").is_err());
        assert!(parse_selector("istio").is_err());
    }
}
