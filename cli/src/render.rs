//! `inflight render`: gateway config from KServe InferenceService YAML.
//!
//! Reads InferenceServices (multi-document YAML, several files), maps each predictor's Knative
//! and KServe settings to one gateway revision ([`isvc`]), and writes one of:
//! - `filter-config`: the filter's plugin configuration (JSON), for plain Envoy;
//! - `wasmplugin`: an Istio `WasmPlugin` for the ingress gateway (the default);
//! - `envoyfilter`: the equivalent Istio `EnvoyFilter` (wasm file mounted into the gateway).
//!
//! The two Istio outputs also carry the `EnvoyFilter` that sets the `override_host` policy on
//! the clusters of revisions whose endpoints the filter picks (raw deployments), so Envoy sends
//! each request to the pod the filter named in its endpoint header, and, unless `--no-fleet`,
//! what lets the gateway replicas split each pod's `containerConcurrency` ([`fleet`]).
//!
//! Serverless (Knative) revisions get no limit at the gateway (`containerConcurrency: 0` in the
//! filter): their pods sit behind Knative's activator, out of the gateway's sight, and queue-proxy
//! already holds each to its `containerConcurrency`; the gateway observes and exports demand.
//!
//! The filter configuration is checked with the filter's own parser (`inflight_core::Config`)
//! before anything is printed, so a config that render writes is one the filter accepts.
//! Notes (values KServe overrides, settings that fight the gateway) go to stderr, and into the
//! YAML as comments, so they travel with the file that gets applied.

mod fleet;
pub(crate) mod isvc;
mod out;

use anyhow::{bail, Context as _, Result};
use isvc::Mode;
use serde_json::Value;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;

pub use out::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// InferenceService YAML (multi-document; other kinds are skipped); `-` reads stdin.
    #[arg(short = 'f', long = "filename", required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// What to write.
    #[arg(long, value_enum, default_value_t = Format::Wasmplugin)]
    pub format: Format,
    /// The cluster's ingress domain (KServe `ingressDomain`, Knative's domain).
    #[arg(long, default_value = "example.com")]
    pub domain: String,
    /// Namespace of InferenceServices that do not set `metadata.namespace` (as `kubectl -n`).
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Deployment mode of InferenceServices without the `serving.kserve.io/deploymentMode`
    /// annotation.
    #[arg(long, value_enum, default_value_t = Mode::Serverless)]
    pub deployment_mode: Mode,
    /// Host name template, KServe syntax (`{{ .Name }}`, `{{ .Namespace }}`,
    /// `{{ .IngressDomain }}`). Default: Knative's `{{.Name}}.{{.Namespace}}.{{.Domain}}` for
    /// serverless, KServe's `{{ .Name }}-{{ .Namespace }}.{{ .IngressDomain }}` for raw.
    #[arg(long)]
    pub domain_template: Option<String>,
    /// Name revisions `<namespace>-<name>` (needed when two namespaces use the same name).
    #[arg(long)]
    pub namespaced_names: bool,
    /// Ready replicas the filter assumes for raw-deployment revisions until it learns them
    /// (default: min scale; without membership at least 1). Serverless revisions get no
    /// gateway limit, so they need none.
    #[arg(long)]
    pub ready_replicas: Option<u32>,
    /// Envoy cluster that reaches the gateway's own admin, for learning ready replicas (the
    /// filter's `membership.cluster`). Default for wasmplugin/envoyfilter: `inflight-admin`
    /// (manifests/istio/common/membership-cluster.yaml); filter-config: none unless given.
    #[arg(long, conflicts_with = "no_membership")]
    pub membership_cluster: Option<String>,
    /// Do not learn ready replicas from Envoy; capacity stays containerConcurrency × readyReplicas.
    #[arg(long)]
    pub no_membership: bool,
    /// Leave the choice of pod to Envoy: the filter picks no endpoint (`"routing": {"enabled":
    /// false}`) and no cluster policy is written, so a pod is no longer held to
    /// containerConcurrency on its own, only the revision's total.
    #[arg(long)]
    pub no_endpoint_picking: bool,
    /// Split each pod's containerConcurrency across the gateway replicas (docs/fleet.md): the
    /// plugin configuration's `fleet`, and for the Istio outputs the headless Service of the
    /// gateway pods and the EnvoyFilter `inflight-fleet` (peer and forward clusters, the peer
    /// port on the gateway's HTTP listener, the forward route). Default: on for
    /// wasmplugin/envoyfilter, off for filter-config.
    #[arg(long, conflicts_with = "no_fleet")]
    pub fleet: bool,
    /// No fleet: each gateway replica enforces containerConcurrency on its own (N replicas
    /// allow N × containerConcurrency per pod).
    #[arg(long)]
    pub no_fleet: bool,
    /// The port gateways reach each other on (`fleet.peerPort`); the public Service does not
    /// expose it.
    #[arg(long, default_value_t = fleet::DEFAULT_PEER_PORT)]
    pub peer_port: u16,
    /// The port of the gateway's plain-HTTP listener (the target port of the gateway Service's
    /// port 80: 8080 for istioctl's istio-ingressgateway, 80 for the `gateway` Helm chart);
    /// a fleet adds the peer port to that listener.
    #[arg(long, default_value_t = 8080)]
    pub gateway_http_port: u16,
    /// Longest a request may wait in the gateway's buffer (e.g. `30s`; filter default 30s).
    #[arg(long)]
    pub max_wait: Option<String>,
    /// Namespace of the WasmPlugin/EnvoyFilter (the gateway's namespace).
    #[arg(long, default_value = "istio-system")]
    pub gateway_namespace: String,
    /// Labels that select the gateway pods, `k=v[,k=v]`.
    #[arg(long, default_value = "istio=ingressgateway")]
    pub gateway_selector: String,
    /// Where Istio pulls the filter from (WasmPlugin `url`: `oci://…`, `https://…`, `file://…`).
    #[arg(long, default_value = out::DEFAULT_WASM_URL)]
    pub wasm_url: String,
    /// Path of the wasm file inside the gateway pod (EnvoyFilter: mounted from a ConfigMap).
    #[arg(long, default_value = out::DEFAULT_WASM_FILE)]
    pub wasm_file: String,
}

pub fn run(args: Args) -> Result<()> {
    let mut inputs = Vec::new();
    for f in &args.files {
        let text = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            s
        } else {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        };
        inputs.push((f.display().to_string(), text));
    }
    let rendered = render(&inputs, &args)?;
    for n in &rendered.notes {
        eprintln!("note: {n}");
    }
    std::io::stdout()
        .write_all(rendered.text.as_bytes())
        .context("writing stdout")?;
    Ok(())
}

/// What `render` produced: the document and the notes for the operator.
#[derive(Debug)]
pub struct Rendered {
    pub text: String,
    pub notes: Vec<String>,
}

/// Renders `(source name, YAML text)` inputs.
pub fn render(inputs: &[(String, String)], args: &Args) -> Result<Rendered> {
    if let Some(w) = &args.max_wait {
        inflight_core::duration::parse_ms(w).map_err(|e| anyhow::anyhow!("--max-wait: {e}"))?;
    }
    let selector = out::parse_selector(&args.gateway_selector)?;
    let mut predictors = Vec::new();
    let mut skipped = Vec::new();
    for (source, text) in inputs {
        for (i, doc) in yaml_documents(source, text)?.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            if !isvc::is_inference_service(&doc) {
                skipped.push(format!(
                    "{source}: document {}: skipped {} {}",
                    i + 1,
                    doc.get("kind")
                        .and_then(Value::as_str)
                        .unwrap_or("(no kind)"),
                    doc.pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("(no name)")
                ));
                continue;
            }
            let p = isvc::parse(&doc, &args.namespace, args.deployment_mode).map_err(|e| {
                anyhow::anyhow!(
                    "{source}: document {} (InferenceService {}): {e}",
                    i + 1,
                    isvc::display_name(&doc, &args.namespace)
                )
            })?;
            predictors.push((source.clone(), p));
        }
    }
    if predictors.is_empty() {
        bail!(
            "no InferenceService in {}; expected documents with `apiVersion: serving.kserve.io/v1beta1` and `kind: InferenceService`",
            inputs
                .iter()
                .map(|(s, _)| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let plan = out::Plan::build(&predictors, args)?;
    let mut notes = skipped;
    notes.extend(plan.notes.iter().cloned());
    let text = out::write(
        &plan,
        args.format,
        &out::Gateway {
            namespace: &args.gateway_namespace,
            selector,
            wasm_url: &args.wasm_url,
            wasm_file: &args.wasm_file,
            http_port: args.gateway_http_port,
        },
        &notes,
    )?;
    Ok(Rendered { text, notes })
}

/// The documents of one YAML stream, as JSON values.
fn yaml_documents(source: &str, text: &str) -> Result<Vec<Value>> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de)
            .with_context(|| format!("{source}: document {}: not valid YAML", i + 1))?;
        docs.push(v);
    }
    Ok(docs)
}
