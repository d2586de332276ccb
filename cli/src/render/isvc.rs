//! KServe `InferenceService` (v1beta1) → one gateway revision, with KServe's and Knative's
//! semantics and defaults.
//!
//! What KServe does with the fields we read (its knative reconciler, `setAutoScalingAnnotations`):
//! `spec.predictor.scaleTarget` overwrites the `autoscaling.knative.dev/target` annotation,
//! `scaleMetric` overwrites `autoscaling.knative.dev/metric`, `minReplicas` (default 1) always
//! overwrites `min-scale`, and `maxReplicas` overwrites `max-scale` when it is not 0. Knative then
//! reads the annotations (legacy camelCase spellings too). We apply the same precedence, so the
//! limits the gateway enforces are the ones the revision really runs with.
//!
//! Every error names the document and the field (`spec.predictor.containerConcurrency`,
//! `metadata.annotations["autoscaling.knative.dev/target"]`), says what was expected and shows
//! what was found, because an operator reads it with nothing else to go on.

use serde_json::Value;
use std::fmt;

pub const ANN_TARGET: &str = "autoscaling.knative.dev/target";
pub const ANN_UTILIZATION: &str = "autoscaling.knative.dev/target-utilization-percentage";
pub const ANN_METRIC: &str = "autoscaling.knative.dev/metric";
pub const ANN_CLASS: &str = "autoscaling.knative.dev/class";
/// Knative accepts both spellings; the kebab-case one is current.
pub const ANN_MIN_SCALE: [&str; 2] = [
    "autoscaling.knative.dev/min-scale",
    "autoscaling.knative.dev/minScale",
];
pub const ANN_MAX_SCALE: [&str; 2] = [
    "autoscaling.knative.dev/max-scale",
    "autoscaling.knative.dev/maxScale",
];
pub const ANN_WINDOW: &str = "autoscaling.knative.dev/window";
pub const ANN_PANIC_WINDOW: &str = "autoscaling.knative.dev/panic-window-percentage";
pub const ANN_PANIC_THRESHOLD: &str = "autoscaling.knative.dev/panic-threshold-percentage";
pub const ANN_INITIAL_SCALE: [&str; 2] = [
    "autoscaling.knative.dev/initial-scale",
    "autoscaling.knative.dev/initialScale",
];
pub const ANN_ACTIVATION_SCALE: &str = "autoscaling.knative.dev/activation-scale";
pub const ANN_DEPLOYMENT_MODE: &str = "serving.kserve.io/deploymentMode";
pub const ANN_AUTOSCALER_CLASS: &str = "serving.kserve.io/autoscalerClass";

/// KServe's `constants.DefaultMinReplicas`.
pub const DEFAULT_MIN_REPLICAS: u32 = 1;
/// Knative's `TargetMin`: the smallest soft target the autoscaler accepts.
const KNATIVE_TARGET_MIN: f64 = 0.01;

/// How KServe runs the predictor, which decides its host names and who else limits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Knative (KServe "Serverless"/"Knative"): the activator and queue-proxy enforce
    /// containerConcurrency and buffer at zero; the gateway only observes and exports demand.
    Serverless,
    /// Raw deployment (KServe "RawDeployment"/"Standard"): a Deployment behind a Service; the
    /// gateway is the only concurrency limit.
    Raw,
}

/// One InferenceService's predictor, as the gateway sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictor {
    pub name: String,
    pub namespace: String,
    pub mode: Mode,
    /// Hard limit per replica; 0 = unlimited (Knative's default).
    pub container_concurrency: u32,
    /// Soft target; Knative's default (100) when unset.
    pub target: Option<f64>,
    pub target_utilization_percentage: Option<f64>,
    pub min_scale: u32,
    /// 0 = unbounded.
    pub max_scale: u32,
    /// Knative's per-revision autoscaler annotations, as written (the filter validates ranges).
    pub stable_window: Option<String>,
    pub panic_window_percentage: Option<f64>,
    pub panic_threshold_percentage: Option<f64>,
    pub initial_scale: Option<u32>,
    pub activation_scale: Option<u32>,
    /// What the operator should know (values that KServe overrides, settings that fight the
    /// gateway); printed, never fatal.
    pub notes: Vec<String>,
}

/// A value in the input that cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// `spec.predictor.containerConcurrency`, `metadata.annotations["…"]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn annotation_field(key: &str) -> String {
    format!("metadata.annotations[\"{key}\"]")
}

/// The value as the user wrote it, for messages: strings quoted, everything else as JSON.
fn shown(v: &Value) -> String {
    v.to_string()
}

/// Whether a YAML document is an InferenceService (any version; we check the version later).
pub fn is_inference_service(doc: &Value) -> bool {
    doc.get("kind").and_then(Value::as_str) == Some("InferenceService")
}

/// `namespace/name` of a document, for messages, as far as it can be read.
pub fn display_name(doc: &Value, default_namespace: &str) -> String {
    let meta = doc.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<no name>");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or(default_namespace);
    format!("{ns}/{name}")
}

/// Reads one InferenceService document: its identity, then the predictor's concurrency, the
/// scaling metric (concurrency only), the soft target, scale bounds and the KPA knobs, each
/// with KServe's precedence (spec fields over annotations, predictor annotations over the
/// InferenceService's).
pub fn parse(
    doc: &Value,
    default_namespace: &str,
    default_mode: Mode,
) -> Result<Predictor, FieldError> {
    check_api_version(doc)?;
    let meta = doc.get("metadata").unwrap_or(&Value::Null);
    let name = metadata_name(meta)?;
    let namespace = metadata_namespace(meta, default_namespace)?;
    let predictor = predictor_spec(doc)?;
    // KServe merges the component's own annotations over the InferenceService's.
    let ann = Annotations::read(meta.get("annotations"), "metadata.annotations")?.overlay(
        Annotations::read(predictor.get("annotations"), "spec.predictor.annotations")?,
    );
    let mut notes = Vec::new();
    let mode = deployment_mode(&ann, default_mode)?;
    let container_concurrency = optional_u32(
        predictor.get("containerConcurrency"),
        &pfield("containerConcurrency"),
    )?
    .unwrap_or(0);
    check_metric(predictor, &ann)?;
    let target = soft_target(predictor, &ann, &name, container_concurrency, &mut notes)?;
    let target_utilization_percentage = utilization(&ann)?;
    let (min_scale, max_scale) = scale_bounds(predictor, &ann, mode, &name, &mut notes)?;
    if mode == Mode::Raw {
        notes.push(raw_autoscaler_note(&ann, &name));
        notes.retain(|n| !n.is_empty());
    }
    let knobs = kpa_knobs(&ann)?;
    Ok(Predictor {
        name,
        namespace,
        mode,
        container_concurrency,
        target,
        target_utilization_percentage,
        min_scale,
        max_scale,
        stable_window: knobs.stable_window,
        panic_window_percentage: knobs.panic_window_percentage,
        panic_threshold_percentage: knobs.panic_threshold_percentage,
        initial_scale: knobs.initial_scale,
        activation_scale: knobs.activation_scale,
        notes,
    })
}

fn pfield(key: &str) -> String {
    format!("spec.predictor.{key}")
}

fn check_api_version(doc: &Value) -> Result<(), FieldError> {
    let api = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if api == "serving.kserve.io/v1beta1" {
        return Ok(());
    }
    Err(err(
        "apiVersion",
        format!(
            "expected \"serving.kserve.io/v1beta1\", got {}",
            shown_opt(doc.get("apiVersion"))
        ),
    ))
}

fn metadata_name(meta: &Value) -> Result<String, FieldError> {
    match meta.get("name") {
        Some(Value::String(s)) if is_dns_label(s) => Ok(s.clone()),
        Some(v) => Err(err(
            "metadata.name",
            format!(
                "expected a DNS label (lower-case letters, digits and '-', at most 63), got {}",
                shown(v)
            ),
        )),
        None => Err(err(
            "metadata.name",
            "missing; every InferenceService needs a name",
        )),
    }
}

fn metadata_namespace(meta: &Value, default_namespace: &str) -> Result<String, FieldError> {
    match meta.get("namespace") {
        None | Some(Value::Null) => Ok(default_namespace.to_string()),
        Some(Value::String(s)) if is_dns_label(s) => Ok(s.clone()),
        Some(v) => Err(err(
            "metadata.namespace",
            format!("expected a DNS label, got {}", shown(v)),
        )),
    }
}

fn predictor_spec(doc: &Value) -> Result<&Value, FieldError> {
    match doc.get("spec").and_then(|s| s.get("predictor")) {
        Some(p @ Value::Object(_)) => Ok(p),
        Some(v) => Err(err(
            "spec.predictor",
            format!("expected an object, got {}", shown(v)),
        )),
        None => Err(err(
            "spec.predictor",
            "missing; an InferenceService needs a predictor",
        )),
    }
}

fn deployment_mode(ann: &Annotations, default_mode: Mode) -> Result<Mode, FieldError> {
    match ann.get(ANN_DEPLOYMENT_MODE) {
        None => Ok(default_mode),
        Some((field, v)) => match v {
            "Serverless" | "Knative" => Ok(Mode::Serverless),
            "RawDeployment" | "Standard" => Ok(Mode::Raw),
            other => Err(err(
                field,
                format!("`{other}` is not supported; expected Serverless (Knative) or RawDeployment (Standard): ModelMesh does not route through the ingress gateway per InferenceService"),
            )),
        },
    }
}

/// The metric must be concurrency: scaleMetric overwrites the annotation (KServe); the class
/// decides the default.
fn check_metric(predictor: &Value, ann: &Annotations) -> Result<(), FieldError> {
    let metric = match predictor.get("scaleMetric") {
        Some(Value::Null) | None => ann.get(ANN_METRIC).map(|(f, v)| (f, v.to_string())),
        Some(Value::String(s)) => Some((pfield("scaleMetric"), s.clone())),
        Some(v) => {
            return Err(err(
                pfield("scaleMetric"),
                format!(
                    "expected one of concurrency, rps, cpu, memory, got {}",
                    shown(v)
                ),
            ))
        }
    };
    match metric {
        None => match ann.get(ANN_CLASS) {
            Some((field, c)) if c.starts_with("hpa.") => Err(err(
                field,
                format!("`{c}` scales on CPU by default, which is not a concurrency target; remove the annotation (KPA) or set autoscaling.knative.dev/metric: concurrency"),
            )),
            _ => Ok(()),
        },
        Some((_, m)) if m == "concurrency" => Ok(()),
        Some((field, m)) => Err(err(
            field,
            match m.as_str() {
                "rps" | "cpu" | "memory" => format!(
                    "`{m}` is not supported: the gateway limits and measures concurrency (requests in flight plus queued), so its soft target is a number of concurrent requests, not {}; use concurrency (the default) or remove the field",
                    match m.as_str() {
                        "rps" => "requests per second",
                        "cpu" => "CPU utilization",
                        _ => "memory use",
                    }
                ),
                _ => format!("expected one of concurrency, rps, cpu, memory, got \"{m}\""),
            },
        )),
    }
}

/// The soft target: scaleTarget overwrites the annotation (KServe).
fn soft_target(
    predictor: &Value,
    ann: &Annotations,
    name: &str,
    container_concurrency: u32,
    notes: &mut Vec<String>,
) -> Result<Option<f64>, FieldError> {
    let target = match predictor.get("scaleTarget") {
        Some(Value::Null) | None => match ann.get(ANN_TARGET) {
            None => None,
            Some((field, v)) => Some(positive_target(&field, v)?),
        },
        Some(v) => {
            let t = optional_u32(Some(v), &pfield("scaleTarget"))?.unwrap_or(0);
            if t == 0 {
                return Err(err(
                    pfield("scaleTarget"),
                    "0 is not a valid soft target; expected an integer > 0 (Knative default 100)",
                ));
            }
            if let Some((field, a)) = ann.get(ANN_TARGET) {
                if a.trim() != t.to_string() {
                    notes.push(format!(
                        "{}: {field} = \"{a}\" is overwritten by spec.predictor.scaleTarget = {t} (KServe sets the annotation from scaleTarget)",
                        name
                    ));
                }
            }
            Some(f64::from(t))
        }
    };
    if let (Some(t), true) = (target, container_concurrency > 0) {
        if t > f64::from(container_concurrency) {
            notes.push(format!(
                "{name}: soft target {} is above containerConcurrency {container_concurrency}; Knative (and the gateway) use min(target, containerConcurrency) = {container_concurrency}",
                fmt_num(t)
            ));
        }
    }
    Ok(target)
}

fn utilization(ann: &Annotations) -> Result<Option<f64>, FieldError> {
    let Some((field, v)) = ann.get(ANN_UTILIZATION) else {
        return Ok(None);
    };
    let u = parse_f64(&field, v, "a percentage in [1, 100] (Knative default 70)")?;
    if !(1.0..=100.0).contains(&u) {
        return Err(err(
            field,
            format!("expected a percentage in [1, 100] (Knative default 70), got \"{v}\""),
        ));
    }
    Ok(Some(u))
}

/// `(min scale, max scale)`. KServe always writes min-scale from minReplicas (default 1) and
/// max-scale from maxReplicas when it is not 0; the annotations only matter where KServe leaves
/// them.
fn scale_bounds(
    predictor: &Value,
    ann: &Annotations,
    mode: Mode,
    name: &str,
    notes: &mut Vec<String>,
) -> Result<(u32, u32), FieldError> {
    let ann_min = match ann.get_any(&ANN_MIN_SCALE) {
        None => None,
        Some((field, v)) => Some((field.clone(), scale(&field, v)?)),
    };
    let ann_max = match ann.get_any(&ANN_MAX_SCALE) {
        None => None,
        Some((field, v)) => Some((field.clone(), scale(&field, v)?)),
    };
    let min_replicas = optional_u32(predictor.get("minReplicas"), &pfield("minReplicas"))?;
    let max_replicas = optional_u32(predictor.get("maxReplicas"), &pfield("maxReplicas"))?;
    let min_scale = min_replicas.unwrap_or(DEFAULT_MIN_REPLICAS);
    if let Some((field, m)) = &ann_min {
        if *m != min_scale {
            notes.push(format!(
                "{name}: {field} = {m} is overwritten by {} = {min_scale} (KServe sets min-scale from minReplicas, default {DEFAULT_MIN_REPLICAS})",
                if min_replicas.is_some() { "spec.predictor.minReplicas" } else { "the default minReplicas" }
            ));
        }
    }
    let mut max_scale = match (max_replicas, &ann_max, mode) {
        (Some(m), _, _) if m > 0 => m,
        (_, Some((_, m)), Mode::Serverless) => *m,
        _ => 0,
    };
    if mode == Mode::Raw {
        if let Some((field, _)) = &ann_max {
            if max_replicas.unwrap_or(0) == 0 {
                notes.push(format!(
                    "{name}: {field} is a Knative annotation; in raw deployment mode KServe's scaler reads spec.predictor.maxReplicas"
                ));
            }
        }
        // KServe's raw HPA uses max(maxReplicas, minReplicas).
        max_scale = max_scale.max(min_scale);
    }
    if max_scale > 0 && min_scale > max_scale {
        let field = if max_replicas.unwrap_or(0) > 0 {
            pfield("maxReplicas")
        } else {
            ann_max
                .map(|(f, _)| f)
                .unwrap_or_else(|| pfield("maxReplicas"))
        };
        return Err(err(
            field,
            format!("max scale {max_scale} is below min scale {min_scale}; raise it or set 0 for unbounded"),
        ));
    }
    Ok((min_scale, max_scale))
}

/// Raw deployments: what KServe's own autoscaler will do beside a scaler on the gateway's demand
/// (empty when it stays out of the way).
fn raw_autoscaler_note(ann: &Annotations, name: &str) -> String {
    match ann.get(ANN_AUTOSCALER_CLASS) {
        Some((_, c)) if c == "external" || c == "none" => String::new(),
        Some((field, c)) => format!(
            "{name}: {field} = \"{c}\": KServe will run its own autoscaler on this Deployment, which fights a scaler driven by the gateway's demand; set it to \"external\" when KEDA or the HPA in manifests/autoscaling/ scales the predictor"
        ),
        None => format!(
            "{name}: raw deployment without {ANN_AUTOSCALER_CLASS}: KServe creates a CPU-based HPA for it; set the annotation to \"external\" when KEDA or the HPA in manifests/autoscaling/ scales the predictor on the gateway's demand"
        ),
    }
}

/// The KPA knobs the filter takes from Knative's annotations.
struct KpaKnobs {
    stable_window: Option<String>,
    panic_window_percentage: Option<f64>,
    panic_threshold_percentage: Option<f64>,
    initial_scale: Option<u32>,
    activation_scale: Option<u32>,
}

fn kpa_knobs(ann: &Annotations) -> Result<KpaKnobs, FieldError> {
    let stable_window = match ann.get(ANN_WINDOW) {
        None => None,
        Some((field, v)) => {
            inflight_core::duration::parse_ms(v).map_err(|e| err(&field, e.to_string()))?;
            Some(v.trim().to_string())
        }
    };
    let percentage = |key: &str| -> Result<Option<f64>, FieldError> {
        match ann.get(key) {
            None => Ok(None),
            Some((field, v)) => parse_f64(&field, v, "a percentage").map(Some),
        }
    };
    let scale_of = |keys: &[&str]| -> Result<Option<u32>, FieldError> {
        match ann.get_any(keys) {
            None => Ok(None),
            Some((field, v)) => scale(&field, v).map(Some),
        }
    };
    Ok(KpaKnobs {
        stable_window,
        panic_window_percentage: percentage(ANN_PANIC_WINDOW)?,
        panic_threshold_percentage: percentage(ANN_PANIC_THRESHOLD)?,
        initial_scale: scale_of(&ANN_INITIAL_SCALE)?,
        activation_scale: scale_of(&[ANN_ACTIVATION_SCALE])?,
    })
}

fn shown_opt(v: Option<&Value>) -> String {
    v.map(shown).unwrap_or_else(|| "nothing".into())
}

/// A non-negative integer that fits the gateway's u32 counters.
fn optional_u32(v: Option<&Value>, field: &str) -> Result<Option<u32>, FieldError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(err(
                field,
                format!("expected a non-negative integer below 2^32, got {n}"),
            )),
        },
        Some(other) => Err(err(
            field,
            format!("expected a non-negative integer, got {}", shown(other)),
        )),
    }
}

fn parse_f64(field: &str, v: &str, expected: &str) -> Result<f64, FieldError> {
    match v.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(err(field, format!("expected {expected}, got \"{v}\""))),
    }
}

fn positive_target(field: &str, v: &str) -> Result<f64, FieldError> {
    let t = parse_f64(field, v, "a number ≥ 0.01 (Knative default 100)")?;
    if t < KNATIVE_TARGET_MIN {
        return Err(err(
            field,
            format!("expected a number ≥ 0.01 (Knative default 100), got \"{v}\""),
        ));
    }
    Ok(t)
}

fn scale(field: &str, v: &str) -> Result<u32, FieldError> {
    v.trim().parse::<u32>().map_err(|_| {
        err(
            field,
            format!("expected a non-negative integer, got \"{v}\""),
        )
    })
}

/// Formats a number the way a person wrote it: `10`, not `10.0`.
pub fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// Kubernetes names: DNS-1123 labels (core's rule, which the filter applies to revisions).
pub use inflight_core::config::is_dns_label;

/// Annotations with the field each came from (`metadata.annotations` or the predictor's own).
#[derive(Debug, Default)]
struct Annotations {
    entries: Vec<(String, String, String)>, // (field prefix, key, value)
}

impl Annotations {
    fn read(v: Option<&Value>, prefix: &str) -> Result<Annotations, FieldError> {
        let mut entries = Vec::new();
        match v {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (k, v) in map {
                    // Kubernetes only stores strings; accept unquoted numbers rather than
                    // failing on what the API server would have reported as a type error.
                    let value = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        other => {
                            return Err(err(
                                format!("{prefix}[\"{k}\"]"),
                                format!("expected a string, got {}", shown(other)),
                            ))
                        }
                    };
                    entries.push((prefix.to_string(), k.clone(), value));
                }
            }
            Some(other) => {
                return Err(err(
                    prefix,
                    format!("expected a map of strings, got {}", shown(other)),
                ))
            }
        }
        Ok(Annotations { entries })
    }

    /// `self` with `top`'s keys replacing the same keys.
    fn overlay(mut self, top: Annotations) -> Annotations {
        for (p, k, v) in top.entries {
            self.entries.retain(|(_, key, _)| *key != k);
            self.entries.push((p, k, v));
        }
        self
    }

    /// The value of `key` and the field it came from.
    fn get(&self, key: &str) -> Option<(String, &str)> {
        self.entries
            .iter()
            .find(|(_, k, _)| k == key)
            .map(|(p, k, v)| {
                let field = if p == "metadata.annotations" {
                    annotation_field(k)
                } else {
                    format!("{p}[\"{k}\"]")
                };
                (field, v.as_str())
            })
    }

    /// The first of `keys` that is set (Knative's priority order).
    fn get_any(&self, keys: &[&str]) -> Option<(String, &str)> {
        keys.iter().find_map(|k| self.get(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn isvc(annotations: Value, predictor: Value) -> Value {
        json!({
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {"name": "torchserve", "annotations": annotations},
            "spec": {"predictor": predictor},
        })
    }

    fn ok(annotations: Value, predictor: Value) -> Predictor {
        parse(&isvc(annotations, predictor), "default", Mode::Serverless).unwrap()
    }

    fn fails(annotations: Value, predictor: Value) -> FieldError {
        parse(&isvc(annotations, predictor), "default", Mode::Serverless).unwrap_err()
    }

    #[test]
    fn seed_maps_target_and_hard_limit() {
        let p = ok(
            json!({ANN_TARGET: "10"}),
            json!({"containerConcurrency": 10, "pytorch": {"storageUri": "gs://x"}}),
        );
        assert_eq!(p.container_concurrency, 10);
        assert_eq!(p.target, Some(10.0));
        assert_eq!(p.min_scale, 1);
        assert_eq!(p.max_scale, 0);
        assert_eq!(p.namespace, "default");
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn scale_target_overwrites_the_annotation() {
        let p = ok(
            json!({ANN_TARGET: "5"}),
            json!({"scaleTarget": 10, "scaleMetric": "concurrency"}),
        );
        assert_eq!(p.target, Some(10.0));
        assert_eq!(p.notes.len(), 1);
    }

    #[test]
    fn min_replicas_overwrites_min_scale_and_defaults_to_one() {
        let p = ok(json!({"autoscaling.knative.dev/minScale": "3"}), json!({}));
        assert_eq!(p.min_scale, 1);
        assert!(p.notes[0].contains("minScale"), "{:?}", p.notes);
        let p = ok(json!({}), json!({"minReplicas": 0, "maxReplicas": 4}));
        assert_eq!((p.min_scale, p.max_scale), (0, 4));
        let p = ok(json!({"autoscaling.knative.dev/max-scale": "7"}), json!({}));
        assert_eq!(p.max_scale, 7);
    }

    #[test]
    fn raw_mode_max_is_at_least_min() {
        let mut doc = isvc(
            json!({ANN_DEPLOYMENT_MODE: "RawDeployment"}),
            json!({"minReplicas": 2}),
        );
        doc["metadata"]["annotations"][ANN_AUTOSCALER_CLASS] = json!("external");
        let p = parse(&doc, "default", Mode::Serverless).unwrap();
        assert_eq!(p.mode, Mode::Raw);
        assert_eq!((p.min_scale, p.max_scale), (2, 2));
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, Value, Value, &str, &str)] = &[
            (
                "cc string",
                json!({}),
                json!({"containerConcurrency": "ten"}),
                "spec.predictor.containerConcurrency",
                "expected a non-negative integer, got \"ten\"",
            ),
            (
                "cc negative",
                json!({}),
                json!({"containerConcurrency": -1}),
                "spec.predictor.containerConcurrency",
                "non-negative",
            ),
            (
                "rps",
                json!({}),
                json!({"scaleMetric": "rps"}),
                "spec.predictor.scaleMetric",
                "requests per second",
            ),
            (
                "cpu annotation",
                json!({ANN_METRIC: "cpu"}),
                json!({}),
                "metadata.annotations[\"autoscaling.knative.dev/metric\"]",
                "CPU",
            ),
            (
                "hpa class",
                json!({ANN_CLASS: "hpa.autoscaling.knative.dev"}),
                json!({}),
                "metadata.annotations[\"autoscaling.knative.dev/class\"]",
                "CPU",
            ),
            (
                "target text",
                json!({ANN_TARGET: "lots"}),
                json!({}),
                "metadata.annotations[\"autoscaling.knative.dev/target\"]",
                "got \"lots\"",
            ),
            (
                "target zero",
                json!({ANN_TARGET: "0"}),
                json!({}),
                "metadata.annotations[\"autoscaling.knative.dev/target\"]",
                "0.01",
            ),
            (
                "scaleTarget zero",
                json!({}),
                json!({"scaleTarget": 0}),
                "spec.predictor.scaleTarget",
                "> 0",
            ),
            (
                "utilization",
                json!({ANN_UTILIZATION: "150"}),
                json!({}),
                "metadata.annotations[\"autoscaling.knative.dev/target-utilization-percentage\"]",
                "[1, 100]",
            ),
            (
                "min-scale",
                json!({"autoscaling.knative.dev/min-scale": "-1"}),
                json!({}),
                "metadata.annotations[\"autoscaling.knative.dev/min-scale\"]",
                "non-negative",
            ),
            (
                "max below min",
                json!({}),
                json!({"minReplicas": 3, "maxReplicas": 2}),
                "spec.predictor.maxReplicas",
                "below min",
            ),
            (
                "predictor annotation",
                json!({}),
                json!({"annotations": {ANN_TARGET: "x"}}),
                "spec.predictor.annotations[\"autoscaling.knative.dev/target\"]",
                "got \"x\"",
            ),
        ];
        for (case, ann, pred, field, msg) in cases {
            let e = fails(ann.clone(), pred.clone());
            assert_eq!(e.field, *field, "{case}: {e}");
            assert!(e.message.contains(msg), "{case}: {e}");
        }
    }

    #[test]
    fn missing_predictor_and_bad_mode() {
        let doc = json!({"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "a"}, "spec": {}});
        assert_eq!(
            parse(&doc, "default", Mode::Raw).unwrap_err().field,
            "spec.predictor"
        );
        let e = fails(json!({ANN_DEPLOYMENT_MODE: "ModelMesh"}), json!({}));
        assert!(e.field.contains("deploymentMode"), "{e}");
        let doc = json!({"apiVersion": "serving.kserve.io/v1alpha2", "kind": "InferenceService"});
        assert_eq!(
            parse(&doc, "default", Mode::Raw).unwrap_err().field,
            "apiVersion"
        );
    }

    #[test]
    fn fmt_num_drops_integral_fraction() {
        assert_eq!(fmt_num(10.0), "10");
        assert_eq!(fmt_num(0.5), "0.5");
    }
}
