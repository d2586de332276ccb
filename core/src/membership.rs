//! Ready replicas from Envoy's own view of its upstream clusters.
//!
//! The filter asks the admin endpoint for `GET /stats?format=json&filter=membership_healthy`
//! (small, unlike `/clusters`) and reads `cluster.<name>.membership_healthy` — the hosts that
//! are healthy after EDS status, active health checks and outlier detection.

use serde::Deserialize;
use std::collections::HashMap;
use thiserror::Error;

/// Path of the admin request.
pub const STATS_PATH: &str = "/stats?format=json&filter=membership_healthy";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MembershipError {
    #[error("admin /stats answer is not the expected JSON: {0}")]
    Json(String),
}

#[derive(Deserialize)]
struct StatsDoc {
    #[serde(default)]
    stats: Vec<Stat>,
}

#[derive(Deserialize)]
struct Stat {
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: Option<serde_json::Value>,
}

/// Healthy members of each cluster in `clusters` that Envoy reported. Clusters Envoy did not
/// report are absent (unknown), not zero.
pub fn healthy_members(
    body: &[u8],
    clusters: &[&str],
) -> Result<HashMap<String, u32>, MembershipError> {
    let doc: StatsDoc =
        serde_json::from_slice(body).map_err(|e| MembershipError::Json(e.to_string()))?;
    let mut out = HashMap::new();
    for stat in doc.stats {
        let Some(cluster) = stat
            .name
            .strip_prefix("cluster.")
            .and_then(|rest| rest.strip_suffix(".membership_healthy"))
        else {
            continue;
        };
        if !clusters.contains(&cluster) {
            continue;
        }
        let value = stat
            .value
            .as_ref()
            .and_then(serde_json::Value::as_u64)
            .map(|v| u32::try_from(v).unwrap_or(u32::MAX));
        if let Some(v) = value {
            out.insert(cluster.to_string(), v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_envoy_stats() {
        let body = br#"{"stats":[
            {"name":"cluster.torchserve.membership_healthy","value":3},
            {"name":"cluster.outbound|80||a.default.svc.cluster.local.membership_healthy","value":0},
            {"name":"cluster.other.membership_healthy","value":7},
            {"name":"cluster.torchserve.membership_total","value":4}]}"#;
        let m = healthy_members(
            body,
            &[
                "torchserve",
                "outbound|80||a.default.svc.cluster.local",
                "missing",
            ],
        )
        .unwrap();
        assert_eq!(m.get("torchserve"), Some(&3));
        assert_eq!(m.get("outbound|80||a.default.svc.cluster.local"), Some(&0));
        assert_eq!(m.get("other"), None, "not asked for");
        assert_eq!(m.get("missing"), None, "unknown is not zero");
    }

    #[test]
    fn rejects_garbage() {
        assert!(healthy_members(b"<html>", &["a"]).is_err());
        assert!(healthy_members(b"{}", &["a"]).unwrap().is_empty());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = healthy_members(&bytes, &["a"]);
        }
    }
}
