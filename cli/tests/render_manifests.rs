//! Everything under `manifests/`: each Kubernetes object validates against its CRD schema from
//! `cli/tests/crds/` (core kinds: apiVersion, kind and required fields), the kustomizations
//! reference files that exist and leave nothing out, the WasmPlugin and EnvoyFilter are exactly
//! what `inflight render` writes for the InferenceServices beside them, every metric a query
//! names is one the filter exports, serverless revisions carry no gateway cap, and the KEDA
//! ScaledObject's scale to zero rests on what the gateway does at zero.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code (clippy.toml allows it in #[test] fns only)

mod render;

use render::{manifests_dir, render_ok, validate_object, yaml_docs, yaml_files};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files that are not complete Kubernetes objects, and what they are instead.
const NOT_OBJECTS: &[(&str, &str)] = &[
    ("istio/gateway/bootstrap-patch.yaml", "patch"),
    ("istio/gateway/wasm-volume-patch.yaml", "patch"),
    (
        "autoscaling/hpa/prometheus-adapter-values.yaml",
        "helm values",
    ),
];

/// Objects deliberately not in any kustomization (documented alternatives).
const UNREFERENCED: &[&str] = &["kserve/serverless/torchserve-scaletarget.yaml"];

fn rel(p: &Path) -> String {
    p.strip_prefix(manifests_dir())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn read(p: &str) -> String {
    std::fs::read_to_string(manifests_dir().join(p)).unwrap()
}

#[test]
fn every_manifest_validates() {
    let mut objects = 0;
    let mut failures = Vec::new();
    for f in yaml_files(&manifests_dir()) {
        let r = rel(&f);
        let docs = yaml_docs(&std::fs::read_to_string(&f).unwrap());
        assert!(!docs.is_empty(), "{r}: empty");
        match NOT_OBJECTS.iter().find(|(p, _)| *p == r).map(|(_, k)| *k) {
            Some("patch") => check_gateway_patch(&r, &docs, &mut failures),
            Some(_) => {}
            None => {
                for (i, d) in docs.iter().enumerate() {
                    objects += 1;
                    for p in validate_object(d) {
                        failures.push(format!(
                            "{r}: document {} ({} {}): {p}",
                            i + 1,
                            d["kind"],
                            d["metadata"]["name"]
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        objects >= 15,
        "only {objects} objects found under manifests/"
    );
}

/// A strategic-merge patch of the gateway Deployment: it must name the gateway and the
/// `istio-proxy` container, and every mount must come from a volume it declares.
fn check_gateway_patch(r: &str, docs: &[Value], failures: &mut Vec<String>) {
    let d = &docs[0];
    if d["kind"] != "Deployment" || d["metadata"]["name"] != "istio-ingressgateway" {
        failures.push(format!(
            "{r}: not a patch of Deployment istio-ingressgateway"
        ));
    }
    let pod = &d["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().cloned().unwrap_or_default();
    if containers.len() != 1 || containers[0]["name"] != "istio-proxy" {
        failures.push(format!("{r}: must patch exactly the istio-proxy container"));
    }
    let volumes: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for c in &containers {
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap_or("");
            if !volumes.contains(name) {
                failures.push(format!("{r}: volumeMount {name} has no volume"));
            }
        }
    }
}

#[test]
fn kustomizations_reference_existing_files_and_cover_every_object() {
    let root = manifests_dir();
    let mut referenced = BTreeSet::new();
    let mut failures = Vec::new();
    let kustomizations: Vec<PathBuf> = yaml_files(&root)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .collect();
    assert!(kustomizations.len() >= 10, "{kustomizations:?}");
    for k in &kustomizations {
        let dir = k.parent().unwrap();
        let doc = &yaml_docs(&std::fs::read_to_string(k).unwrap())[0];
        for r in doc["resources"].as_array().into_iter().flatten() {
            let p = dir.join(r.as_str().unwrap());
            if p.is_dir() {
                if !p.join("kustomization.yaml").is_file() {
                    failures.push(format!("{}: {} has no kustomization.yaml", rel(k), r));
                }
            } else if p.is_file() {
                referenced.insert(p.canonicalize().unwrap());
            } else {
                failures.push(format!("{}: resource {r} does not exist", rel(k)));
            }
        }
        for g in doc["configMapGenerator"].as_array().into_iter().flatten() {
            for f in g["files"].as_array().into_iter().flatten() {
                let name = f.as_str().unwrap();
                let p = dir.join(name.split('=').next_back().unwrap());
                // A build artifact (the wasm module) is copied in by the user and git-ignored.
                let ignored = std::fs::read_to_string(dir.join(".gitignore"))
                    .map(|g| g.lines().any(|l| l.trim() == name))
                    .unwrap_or(false);
                if !p.is_file() && !ignored {
                    failures.push(format!("{}: generator file {name} does not exist", rel(k)));
                }
            }
        }
    }
    for f in yaml_files(&root) {
        let r = rel(&f);
        if f.file_name().is_some_and(|n| n == "kustomization.yaml")
            || NOT_OBJECTS.iter().any(|(p, _)| *p == r)
            || UNREFERENCED.contains(&r.as_str())
        {
            continue;
        }
        if !referenced.contains(&f.canonicalize().unwrap()) {
            failures.push(format!("{r}: not in any kustomization"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

const ISVCS: [&str; 4] = [
    "-f",
    "manifests/kserve/serverless/torchserve.yaml",
    "-f",
    "manifests/kserve/raw/torchserve-raw.yaml",
];

/// The shipped WasmPlugin and EnvoyFilter are render's output for the shipped
/// InferenceServices (comments aside), so they can never drift from `inflight render`.
#[test]
fn istio_manifests_are_render_output() {
    for (format, file) in [
        ("wasmplugin", "istio/wasmplugin/wasmplugin.yaml"),
        ("envoyfilter", "istio/envoyfilter/envoyfilter.yaml"),
    ] {
        let mut args = ISVCS.to_vec();
        args.extend(["--format", format]);
        let rendered = yaml_docs(&render_ok(&args));
        let shipped = yaml_docs(&read(file));
        assert_eq!(
            rendered,
            shipped,
            "{file} differs from `inflight render {}`; regenerate it",
            args.join(" ")
        );
    }
}

#[test]
fn annotation_and_scale_target_spellings_render_the_same() {
    let a = render_ok(&[
        "-f",
        "manifests/kserve/serverless/torchserve.yaml",
        "--format",
        "filter-config",
    ]);
    let b = render_ok(&[
        "-f",
        "manifests/kserve/serverless/torchserve-scaletarget.yaml",
        "--format",
        "filter-config",
    ]);
    assert_eq!(a, b);
}

/// The stats tags shipped for Istio are the ones the real-Envoy tests run with.
#[test]
fn stats_bootstrap_tags_match_the_tested_ones() {
    let cm = &yaml_docs(&read("istio/common/stats-bootstrap.yaml"))[0];
    let boot: Value =
        serde_json::from_str(cm["data"]["custom_bootstrap.json"].as_str().unwrap()).unwrap();
    let tags = boot["stats_config"]["stats_tags"].as_array().unwrap();
    assert_eq!(tags.len(), 3);
    for t in tags {
        let regex = t["regex"].as_str().unwrap();
        // STATS_TAGS is YAML with single-quoted regexes: same text.
        assert!(
            inflight_host_tests::envoy::STATS_TAGS.contains(&format!("'{regex}'")),
            "{regex} not in host-tests STATS_TAGS"
        );
    }
    // The bootstrap patch mounts the ConfigMap where it points ISTIO_BOOTSTRAP_OVERRIDE.
    let patch = &yaml_docs(&read("istio/gateway/bootstrap-patch.yaml"))[0];
    let c = &patch["spec"]["template"]["spec"]["containers"][0];
    let path = c["env"][0]["value"].as_str().unwrap();
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert_eq!(path, format!("{mount}/custom_bootstrap.json"));
    assert_eq!(
        patch["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"],
        cm["metadata"]["name"]
    );
    // The EnvoyFilter reads the module where the volume patch mounts it.
    let ef = &yaml_docs(&read("istio/envoyfilter/envoyfilter.yaml"))[0];
    let file = ef["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]
        ["vm_config"]["code"]["local"]["filename"]
        .as_str()
        .unwrap();
    let vp = &yaml_docs(&read("istio/gateway/wasm-volume-patch.yaml"))[0];
    let mount = vp["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap();
    assert_eq!(file, format!("{mount}/inflight.wasm"));
}

/// Series the filter exports (issue 5 adds the demand, desired and ready series).
const METRICS: &[&str] = &[
    "inflight_requests_total",
    "inflight_active",
    "inflight_queued",
    "inflight_capacity",
    "inflight_queue_wait_ms_bucket",
    "inflight_demand_ms_total",
    "inflight_desired_replicas",
    "inflight_ready_replicas",
    "inflight_endpoint_mismatch_total",
];

/// Every `inflight_*` name in an alert, a dashboard or a scaler query is a series we export.
#[test]
fn queries_use_exported_metrics() {
    let mut seen = BTreeSet::new();
    let mut texts: Vec<(String, String)> = yaml_files(&manifests_dir())
        .into_iter()
        .map(|f| (rel(&f), std::fs::read_to_string(&f).unwrap()))
        .collect();
    texts.push((
        "monitoring/grafana-dashboard.json".into(),
        read("monitoring/grafana-dashboard.json"),
    ));
    for (file, text) in &texts {
        // Comment lines may name metrics loosely (e.g. `inflight_queue_wait_ms (histogram)`).
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let mut rest = line;
            while let Some(i) = rest.find("inflight_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                // Names of our own objects (`inflight-…`) never match: they use '-'.
                // prometheus-adapter serves the demand rate under this external metric name.
                if name == "inflight_demand" && file.starts_with("autoscaling/hpa/") {
                    continue;
                }
                assert!(
                    METRICS.contains(&name.as_str()),
                    "{file}: `{name}` is not a series the filter exports"
                );
                seen.insert(name);
            }
        }
    }
    // ...and every name in METRICS is one the filter defines (filter/src/metrics.rs, with the
    // outcome and gauge names of core/src/outcome.rs).
    let root = render::workspace_root();
    let defined = ["filter/src/metrics.rs", "core/src/outcome.rs"]
        .map(|f| std::fs::read_to_string(root.join(f)).unwrap())
        .join("\n");
    for m in METRICS {
        assert!(seen.contains(*m), "no manifest uses {m}");
        let stem = m
            .trim_start_matches("inflight_")
            .trim_end_matches("_bucket");
        assert!(
            defined.contains(&format!("\"{stem}\"")) || defined.contains(&format!(".{stem}\"")),
            "{m}: filter/src/metrics.rs (with core/src/outcome.rs) defines no `{stem}` metric"
        );
    }
    let dash: Value = serde_json::from_str(&read("monitoring/grafana-dashboard.json")).unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 6);
}

/// The schema check is strict: a misspelt field or a wrong type is reported, as
/// `kubectl apply` (strict field validation) would.
#[test]
fn schema_validation_rejects_what_kubectl_would() {
    let mut wp = yaml_docs(&read("istio/wasmplugin/wasmplugin.yaml")).remove(0);
    assert!(validate_object(&wp).is_empty());
    wp["spec"]["failstrategy"] = Value::from("FAIL_OPEN");
    let problems = validate_object(&wp);
    assert!(
        problems.iter().any(|p| p.contains("failstrategy")),
        "{problems:?}"
    );
    let mut wp = yaml_docs(&read("istio/wasmplugin/wasmplugin.yaml")).remove(0);
    wp["spec"]["phase"] = Value::from("BEFORE_ROUTER");
    assert!(!validate_object(&wp).is_empty());
    // The endpoint-picking EnvoyFilter's cluster match and patch are checked too.
    let picking = yaml_docs(&read("istio/wasmplugin/wasmplugin.yaml")).remove(1);
    assert_eq!(picking["metadata"]["name"], "inflight-endpoint-picking");
    assert!(validate_object(&picking).is_empty());
    let mut misspelt = picking.clone();
    let cluster = misspelt["spec"]["configPatches"][0]["match"]["cluster"]
        .as_object_mut()
        .unwrap();
    let name = cluster.remove("name").unwrap();
    cluster.insert("nmae".into(), name);
    let problems = validate_object(&misspelt);
    assert!(problems.iter().any(|p| p.contains("nmae")), "{problems:?}");
    let mut bad_op = picking;
    bad_op["spec"]["configPatches"][0]["patch"]["operation"] = Value::from("MERGE_ALL");
    assert!(!validate_object(&bad_op).is_empty());
    let mut so = yaml_docs(&read("autoscaling/keda/scaledobject.yaml")).remove(0);
    so["spec"]["maxReplicaCount"] = Value::from("ten");
    assert!(!validate_object(&so).is_empty());
    let mut isvc = yaml_docs(&read("kserve/serverless/torchserve.yaml")).remove(0);
    isvc["spec"]["predictor"]["containerConcurrency"] = Value::from("10");
    assert!(!validate_object(&isvc).is_empty());
    let hpa = serde_json::json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"}, "spec": {}});
    assert!(!validate_object(&hpa).is_empty());
    let unknown = serde_json::json!({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "x"}});
    assert!(!validate_object(&unknown).is_empty());
}

/// The gateway configurations we ship (the WasmPlugin's `pluginConfig`, and the same text inside
/// the EnvoyFilter), as the filter reads them.
fn shipped_filter_configs() -> Vec<(&'static str, inflight_core::Config)> {
    let wasmplugin = yaml_docs(&read("istio/wasmplugin/wasmplugin.yaml")).remove(0);
    let envoyfilter = yaml_docs(&read("istio/envoyfilter/envoyfilter.yaml")).remove(0);
    let embedded = envoyfilter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]
        ["config"]["configuration"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    [
        (
            "istio/wasmplugin/wasmplugin.yaml",
            wasmplugin["spec"]["pluginConfig"].to_string(),
        ),
        ("istio/envoyfilter/envoyfilter.yaml", embedded),
    ]
    .into_iter()
    .map(|(file, text)| (file, inflight_core::Config::parse(text.as_bytes()).unwrap()))
    .collect()
}

/// A serverless revision's pods sit behind Knative's activator, out of the gateway's sight, so
/// the gateway must not cap it: under the seed's load (50 clients, target 10, cc 10) a cap below
/// 50 would keep Knative's autoscaler from seeing the demand for 5 pods. Whatever number of
/// ready replicas the filter assumes, nothing is capped and nothing queues; the gateway's own
/// desired-replicas gauge still reads Knative's decision on the demand it sees.
#[test]
fn serverless_revisions_have_no_gateway_cap() {
    for (file, config) in shipped_filter_configs() {
        let serverless: Vec<_> = config
            .revisions
            .iter()
            .filter(|r| r.clusters.is_empty() && r.upstream_cluster.is_none())
            .collect();
        assert_eq!(
            serverless
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            vec!["torchserve"],
            "{file}"
        );
        for r in serverless {
            assert!(
                r.ready_replicas >= 1,
                "{file}: {}: never learned, never 0",
                r.name
            );
            for ready in [r.ready_replicas, 1, 5, 10] {
                let limits = r.limits(ready);
                assert_eq!(limits.capacity, None, "{file}: {} at {ready} ready", r.name);
                assert_eq!(limits.buffer, 0, "{file}: {}: nothing queues", r.name);
                assert_eq!(limits.per_endpoint, None, "{file}: {}", r.name);
            }
            // Knative's effective target for the seed: min(target 10, cc 10) × 70 % = 7.
            assert_eq!(r.effective_target(), 7.0, "{file}: {}", r.name);
            assert!(
                inflight_core::kpa::desired_for_concurrency(50.0, &r.autoscaling) >= 5,
                "{file}: {}",
                r.name
            );
        }
    }
}

/// KEDA takes the raw revision to zero and back: minReplicaCount 0, active on any demand, the
/// grace period Knative's. That only works because the gateway holds the revision's requests
/// while no pod is ready (capacity 0, a buffer, a wait long enough for a pod to start), and
/// counts them in `inflight_demand_ms_total`, the series the trigger reads.
#[test]
fn keda_scales_the_raw_revision_to_zero_and_the_gateway_holds_requests_meanwhile() {
    let so = yaml_docs(&read("autoscaling/keda/scaledobject.yaml")).remove(0);
    assert_eq!(so["spec"]["minReplicaCount"], 0);
    assert_eq!(
        so["spec"]["cooldownPeriod"], 30,
        "Knative's scale-to-zero grace period"
    );
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["metadata"]["activationThreshold"], "0");
    let query = trigger["metadata"]["query"].as_str().unwrap();
    assert!(
        query.contains("rate(inflight_demand_ms_total{revision=\"torchserve-raw\"}[1m])"),
        "{query}"
    );
    for (file, config) in shipped_filter_configs() {
        let raw = config
            .revisions
            .iter()
            .find(|r| r.name == "torchserve-raw")
            .unwrap();
        let at_zero = raw.limits(0);
        assert_eq!(at_zero.capacity, Some(0), "{file}");
        assert!(at_zero.buffer >= raw.container_concurrency, "{file}");
        assert!(raw.max_wait_ms >= 30_000, "{file}");
    }
}
