//! Everything under `manifests/`: each Kubernetes object validates against its CRD schema from
//! `cli/tests/crds/` (core kinds: apiVersion, kind and required fields), the kustomizations
//! reference files that exist and leave nothing out, the WasmPlugin and EnvoyFilter are exactly
//! what `inflight render` writes for the InferenceServices beside them, every metric a query
//! names is one the filter exports, serverless revisions carry no gateway cap, and the KEDA
//! ScaledObject's scale to zero rests on what the gateway does at zero.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code (clippy.toml allows it in #[test] fns only)

mod render;

use render::{manifests_dir, render_ok, validate_object, yaml_docs, yaml_files};
use serde_json::{json, Value};
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
    "inflight_fleet_gateways",
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

/// promtool: `.venv/bin/promtool` (`make setup` puts it there), else one on PATH.
fn promtool() -> PathBuf {
    let local = render::workspace_root().join(".venv/bin/promtool");
    if local.is_file() {
        return local;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!("promtool not found: run `make setup` (it puts promtool into .venv/bin)")
    })
}

/// The revision the synthetic series below belong to (the shipped raw InferenceService's).
const REV: &str = "torchserve-raw";

/// What each series of a fleet of three gateway pods reads, and what a query over all three must
/// read for the revision: counters and the per-gateway slices add up (demand 10 + 20 + 5 = 35,
/// capacity 4 + 3 + 3 = cc 10 × 1 ready pod); the fleet-wide decision does not (every gateway
/// says 5 replicas: 5, never 15); nor does what every gateway sees alike (1 ready pod, a fleet
/// of 3). (metric, per-pod values, or per-second rates for counters; counter?; fleet's value)
const FLEET_SERIES: &[(&str, [f64; 3], bool, f64)] = &[
    (
        "inflight_demand_ms_total",
        [10_000.0, 20_000.0, 5_000.0],
        true,
        35.0,
    ),
    ("inflight_requests_total", [1.0, 1.5, 0.5], true, 3.0),
    ("inflight_active", [4.0, 3.0, 3.0], false, 10.0),
    ("inflight_capacity", [4.0, 3.0, 3.0], false, 10.0),
    ("inflight_queued", [6.0, 40.0, 2.0], false, 48.0),
    ("inflight_desired_replicas", [5.0, 5.0, 5.0], false, 5.0),
    ("inflight_ready_replicas", [1.0, 1.0, 1.0], false, 1.0),
    ("inflight_fleet_gateways", [3.0, 3.0, 3.0], false, 3.0),
];

const PODS: [&str; 3] = ["gw-a", "gw-b", "gw-c"];

/// promtool input series for the three gateway pods (`extra` labels, e.g. an outcome), scraped
/// every 15 s for 20 minutes; counters grow at their per-second rate.
fn pod_series(metric: &str, values: [f64; 3], counter: bool, extra: &str) -> Vec<Value> {
    PODS.iter()
        .zip(values)
        .map(|(pod, v)| {
            json!({
                "series": format!("{metric}{{revision=\"{REV}\",pod=\"{pod}\",namespace=\"istio-system\"{extra}}}"),
                "values": if counter { format!("0+{}x80", v * 15.0) } else { format!("{v}x80") },
            })
        })
        .collect()
}

fn fleet_series(replace: &[(&str, [f64; 3])]) -> Vec<Value> {
    FLEET_SERIES
        .iter()
        .flat_map(|(metric, values, counter, _)| {
            let values = replace
                .iter()
                .find(|(m, _)| m == metric)
                .map_or(*values, |(_, v)| *v);
            let extra = if *metric == "inflight_requests_total" {
                ",outcome=\"admitted\""
            } else {
                ""
            };
            pod_series(metric, values, *counter, extra)
        })
        .collect()
}

/// Every query the manifests hand to an autoscaler or a dashboard, with its template variables
/// filled in for [`REV`]: (where, PromQL).
fn scaling_and_dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let so = yaml_docs(&read("autoscaling/keda/scaledobject.yaml")).remove(0);
    for t in so["spec"]["triggers"].as_array().unwrap() {
        out.push((
            "autoscaling/keda/scaledobject.yaml".to_string(),
            t["metadata"]["query"].as_str().unwrap().to_string(),
        ));
    }
    let adapter = yaml_docs(&read("autoscaling/hpa/prometheus-adapter-values.yaml")).remove(0);
    for r in adapter["rules"]["external"].as_array().unwrap() {
        let q = r["metricsQuery"]
            .as_str()
            .unwrap()
            .replace("<<.Series>>", "inflight_demand_ms_total")
            .replace("<<.LabelMatchers>>", &format!("revision=\"{REV}\""))
            .replace("<<.GroupBy>>", "revision");
        out.push(("autoscaling/hpa/prometheus-adapter-values.yaml".into(), q));
    }
    let dash: Value = serde_json::from_str(&read("monitoring/grafana-dashboard.json")).unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let q = t["expr"].as_str().unwrap().replace("$revision", REV);
            out.push((
                format!("monitoring/grafana-dashboard.json: {}", p["title"]),
                q,
            ));
        }
    }
    out
}

/// With several gateway pods (a fleet), every scaling query and dashboard panel reads the
/// fleet's value: per-gateway counters and slices summed across pods, the fleet-wide desired
/// replicas (and what every gateway sees alike) taken as the max, never summed (docs/fleet.md,
/// "Scaling signals"). promtool evaluates each query, as written in the manifests, on the
/// series of three gateway pods, and the alerts on the same fleet and on three ways it goes
/// wrong.
#[test]
fn queries_read_the_fleet_once_across_gateway_pods() {
    let dir = std::env::temp_dir().join(format!("inflight-promql-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut expr_tests = Vec::new();
    for (origin, q) in scaling_and_dashboard_queries() {
        // Percentiles of the wait histogram merge buckets (`sum by (le)`), the same with one
        // gateway or many; the series here have none.
        if q.contains("histogram_quantile") {
            continue;
        }
        let metric = FLEET_SERIES
            .iter()
            .filter(|(m, ..)| q.contains(m))
            .collect::<Vec<_>>();
        assert_eq!(metric.len(), 1, "{origin}: `{q}` reads {metric:?}");
        let (_, _, _, want) = metric[0];
        // One revision, so each query gives one series; `sum()` only drops its labels.
        expr_tests.push(json!({
            "expr": format!("sum({q})"),
            "eval_time": "10m",
            "exp_samples": [{"labels": "{}", "value": want}],
        }));
    }
    assert!(expr_tests.len() >= 8, "only {} queries", expr_tests.len());
    let alerts = yaml_docs(&read("monitoring/prometheusrule.yaml")).remove(0);
    let names: Vec<String> = alerts["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect();
    let firing = |fire: &[(&str, Value)]| -> Vec<Value> {
        names
            .iter()
            .map(|a| {
                let exp: Vec<Value> = fire
                    .iter()
                    .filter(|(n, _)| n == a)
                    .map(|(_, labels)| json!({"exp_labels": labels}))
                    .collect();
                json!({"eval_time": "20m", "alertname": a, "exp_alerts": exp})
            })
            .collect()
    };
    let warning = |extra: &[(&str, &str)]| {
        let mut l = json!({"revision": REV, "severity": "warning"});
        for (k, v) in extra {
            l[*k] = Value::from(*v);
        }
        l
    };
    // 1. The healthy fleet: no alert. Its biggest queue, 40 at one gateway, is half of the
    //    buffer each gateway has by default, 10 × containerConcurrency 10 × 1 ready pod: the
    //    fleet's summed capacity, not the gateway's own slice (4).
    let healthy = fleet_series(&[]);
    // 2. One gateway's queue passes 80 % of that buffer.
    let full = fleet_series(&[("inflight_queued", [6.0, 85.0, 2.0])]);
    // 3. Shedding 0.2/s while gw-c forwards 1/s that gw-a and gw-b admit (and count again):
    //    0.2 of 3.2 requests a second is 6 %, above the 5 % of InflightSheddingHigh; counting
    //    the forwarded ones twice would make it 0.2 of 4.2, under it.
    let mut shedding = fleet_series(&[]);
    shedding.extend(pod_series(
        "inflight_requests_total",
        [0.0, 0.0, 1.0],
        true,
        ",outcome=\"forwarded\"",
    ));
    shedding.extend(pod_series(
        "inflight_requests_total",
        [0.2, 0.0, 0.0],
        true,
        ",outcome=\"shed_full\"",
    ));
    // 4. Three gateway pods that each see a fleet of one (no fleet, or no peer port).
    let split = fleet_series(&[("inflight_fleet_gateways", [1.0, 1.0, 1.0])]);
    // The alerts' expressions and labels are under test; their annotations (templates of the
    // text) are not, and promtool would compare them too.
    let mut groups = alerts["spec"]["groups"].clone();
    for g in groups.as_array_mut().unwrap() {
        for r in g["rules"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("annotations");
        }
    }
    let rules = dir.join("rules.yaml");
    std::fs::write(
        &rules,
        serde_json::to_string(&json!({ "groups": groups })).unwrap(),
    )
    .unwrap();
    let case = |series: Vec<Value>, alerts: Vec<Value>, exprs: Vec<Value>| json!({"interval": "15s", "input_series": series, "alert_rule_test": alerts, "promql_expr_test": exprs});
    let tests = json!({
        "rule_files": [rules.to_str().unwrap()],
        "evaluation_interval": "15s",
        "tests": [
            case(healthy, firing(&[]), expr_tests),
            case(full, firing(&[("InflightBufferNearFull", warning(&[]))]), vec![]),
            case(shedding, firing(&[
                ("InflightShedding", warning(&[("outcome", "shed_full")])),
                ("InflightSheddingHigh", json!({"revision": REV, "severity": "critical"})),
            ]), vec![]),
            case(split, firing(&[("InflightFleetSplit", warning(&[]))]), vec![]),
        ],
    });
    let test_file = dir.join("tests.yaml");
    std::fs::write(&test_file, serde_json::to_string(&tests).unwrap()).unwrap();
    let out = std::process::Command::new(promtool())
        .args(["test", "rules"])
        .arg(&test_file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
