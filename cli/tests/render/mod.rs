//! Shared by the render tests: running `inflight render`, reading YAML, and validating
//! Kubernetes objects against the real CRD schemas in `cli/tests/crds/` (or `INFLIGHT_CRDS`).
//!
//! CRD schemas are OpenAPI v3 subsets, not JSON Schema: before compiling one we turn
//! `nullable: true` into a `null` type, and close every object that lists `properties` and is not
//! `x-kubernetes-preserve-unknown-fields` (`additionalProperties: false`), which is what
//! `kubectl apply` does with its default strict field validation: a misspelt key is an error,
//! not silently pruned. Other `x-kubernetes-*` keywords are left for the validator to ignore.
#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde::Deserialize as _;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn manifests_dir() -> PathBuf {
    workspace_root().join("manifests")
}

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// `inflight render <args>`: (exit ok, stdout, stderr).
pub fn render(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_inflight"))
        .arg("render")
        .args(args)
        // Golden stderr must not depend on the caller's backtrace settings.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .current_dir(workspace_root())
        .output()
        .expect("running inflight render");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `inflight render` that must succeed; returns stdout.
pub fn render_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = render(args);
    assert!(ok, "inflight render {args:?} failed:\n{stderr}");
    stdout
}

/// The documents of a YAML stream (empty documents dropped).
pub fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|de| Value::deserialize(de).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Every `*.yaml`/`*.yml` under `dir`, sorted.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn crds_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("INFLIGHT_CRDS") {
        return PathBuf::from(p);
    }
    let p = workspace_root().join("cli/tests/crds");
    assert!(
        p.is_dir(),
        "CRD schemas not found at {} (set INFLIGHT_CRDS to the folder with istio.yaml, kserve-inferenceservices.yaml, keda-scaledobjects.yaml)",
        p.display()
    );
    p
}

/// Compiled validators by (group/version, kind).
pub struct Schemas {
    validators: BTreeMap<(String, String), jsonschema::Validator>,
}

pub fn schemas() -> &'static Schemas {
    static S: OnceLock<Schemas> = OnceLock::new();
    S.get_or_init(|| {
        let mut validators = BTreeMap::new();
        let dir = crds_dir();
        for f in [
            "istio.yaml",
            "kserve-inferenceservices.yaml",
            "keda-scaledobjects.yaml",
        ] {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            for crd in yaml_docs(&text) {
                if crd["kind"] != "CustomResourceDefinition" {
                    continue;
                }
                let group = crd["spec"]["group"].as_str().unwrap().to_string();
                let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_string();
                for v in crd["spec"]["versions"].as_array().unwrap() {
                    let version = v["name"].as_str().unwrap();
                    let mut schema = v["schema"]["openAPIV3Schema"].clone();
                    // Some CRDs (Istio's) leave the object's envelope out of the schema.
                    let props = schema["properties"].as_object_mut().unwrap();
                    for (k, t) in [
                        ("apiVersion", "string"),
                        ("kind", "string"),
                        ("metadata", "object"),
                    ] {
                        props.entry(k).or_insert(json!({"type": t}));
                    }
                    to_json_schema(&mut schema);
                    let validator = jsonschema::options()
                        .with_draft(jsonschema::Draft::Draft202012)
                        .should_validate_formats(false)
                        .build(&schema)
                        .unwrap_or_else(|e| panic!("{f}: {kind} {version}: {e}"));
                    validators.insert((format!("{group}/{version}"), kind.clone()), validator);
                }
            }
        }
        assert!(
            validators.len() >= 8,
            "too few CRDs loaded from {}",
            dir.display()
        );
        Schemas { validators }
    })
}

/// OpenAPI v3 (Kubernetes structural schema) → JSON Schema, strict about unknown fields.
fn to_json_schema(s: &mut Value) {
    let Some(obj) = s.as_object_mut() else { return };
    let preserve = obj
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if obj.get("nullable").and_then(Value::as_bool) == Some(true) {
        if let Some(t) = obj.get("type").and_then(Value::as_str).map(String::from) {
            obj.insert("type".into(), json!([t, "null"]));
        }
    }
    if obj.contains_key("properties") && !obj.contains_key("additionalProperties") && !preserve {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (k, v) in obj.iter_mut() {
        match k.as_str() {
            "properties" | "patternProperties" | "definitions" | "$defs" => {
                if let Some(m) = v.as_object_mut() {
                    for sub in m.values_mut() {
                        to_json_schema(sub);
                    }
                }
            }
            "items" | "additionalProperties" | "not" => to_json_schema(v),
            "allOf" | "anyOf" | "oneOf" => {
                if let Some(a) = v.as_array_mut() {
                    for sub in a {
                        to_json_schema(sub);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Kinds we know without a CRD: (apiVersion, kind) → required paths beyond metadata.name.
const CORE_KINDS: &[(&str, &str, &[&str])] = &[
    ("v1", "ConfigMap", &[]),
    ("v1", "Service", &["spec"]),
    (
        "apps/v1",
        "Deployment",
        &["spec.selector", "spec.template.spec.containers"],
    ),
    (
        "autoscaling/v2",
        "HorizontalPodAutoscaler",
        &[
            "spec.scaleTargetRef.kind",
            "spec.scaleTargetRef.name",
            "spec.maxReplicas",
        ],
    ),
    (
        "monitoring.coreos.com/v1",
        "PodMonitor",
        &["spec.selector", "spec.podMetricsEndpoints"],
    ),
    (
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        &["spec.selector", "spec.endpoints"],
    ),
    (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        &["spec.groups"],
    ),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization", &[]),
];

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// Validates one object; returns the problems (empty when valid).
pub fn validate_object(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let api = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    if api.is_empty() || kind.is_empty() {
        return vec!["missing apiVersion or kind".into()];
    }
    if kind != "Kustomization" {
        match doc["metadata"]["name"].as_str() {
            Some(n) if is_dns_subdomain(n) => {}
            other => problems.push(format!("metadata.name: expected a DNS name, got {other:?}")),
        }
    }
    if let Some(v) = schemas()
        .validators
        .get(&(api.to_string(), kind.to_string()))
    {
        for e in v.iter_errors(doc) {
            problems.push(format!("{}: {e}", e.instance_path()));
        }
        return problems;
    }
    match CORE_KINDS.iter().find(|(a, k, _)| *a == api && *k == kind) {
        None => problems.push(format!(
            "{api} {kind}: neither a CRD in cli/tests/crds nor a known core kind"
        )),
        Some((_, _, required)) => {
            for r in *required {
                if at(doc, r).is_none_or(Value::is_null) {
                    problems.push(format!("{r}: required"));
                }
            }
        }
    }
    problems
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Asserts every document of `text` is valid; `what` names the source in failures.
pub fn assert_valid_yaml(what: &str, text: &str) -> usize {
    let docs = yaml_docs(text);
    assert!(!docs.is_empty(), "{what}: no documents");
    for (i, d) in docs.iter().enumerate() {
        let problems = validate_object(d);
        assert!(
            problems.is_empty(),
            "{what}: document {} ({} {}):\n  {}",
            i + 1,
            d["kind"],
            d["metadata"]["name"],
            problems.join("\n  ")
        );
    }
    docs.len()
}
