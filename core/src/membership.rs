//! A revision's endpoints, from Envoy's own view of its upstream clusters.
//!
//! The filter asks the admin endpoint for `GET /clusters?filter=^(c1|c2)$` — the text format,
//! only the configured revisions' clusters (Envoy applies the regex before writing, so the
//! answer's size does not grow with the gateway's other clusters) — and reads, per host,
//! `<cluster>::<ip:port>::health_flags::<flags>`. Flags `healthy` means the host takes traffic:
//! no failed or pending health check, no outlier ejection, not degraded, not draining, not
//! pending removal. Those are the ready endpoints; their number is the ready replicas.

use std::collections::HashMap;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MembershipError {
    #[error("admin /clusters answer is not text: {0}")]
    NotText(String),
}

/// One host of a cluster as Envoy reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `IP:port` (`[v6]:port`), as Envoy's `override_host` policy takes it.
    pub address: String,
    /// Healthy: takes new requests.
    pub ready: bool,
}

/// The admin path asking for `clusters` (each RE2-escaped, the regex percent-encoded).
pub fn clusters_path(clusters: &[&str]) -> String {
    let mut regex = String::from("^(");
    for (i, c) in clusters.iter().enumerate() {
        if i > 0 {
            regex.push('|');
        }
        for ch in c.chars() {
            if !ch.is_ascii_alphanumeric() && ch != '_' {
                regex.push('\\');
            }
            regex.push(ch);
        }
    }
    regex.push_str(")$");
    let mut path = String::from("/clusters?filter=");
    for b in regex.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    path
}

/// The hosts of each cluster in `clusters` that Envoy reported, in Envoy's order. A cluster
/// Envoy reported with no hosts maps to an empty list; one it did not report is absent
/// (unknown, not empty).
pub fn endpoints(
    body: &[u8],
    clusters: &[&str],
) -> Result<HashMap<String, Vec<Host>>, MembershipError> {
    let text = std::str::from_utf8(body).map_err(|e| MembershipError::NotText(e.to_string()))?;
    let mut out: HashMap<String, Vec<Host>> = HashMap::new();
    for line in text.lines() {
        // Cluster names may hold `::`-free punctuation (Istio's `outbound|80||svc`), addresses
        // may hold `::` (IPv6): match the known cluster prefix, split the flags off the end.
        let Some(cluster) = clusters.iter().find(|c| {
            line.strip_prefix(**c)
                .is_some_and(|rest| rest.starts_with("::"))
        }) else {
            continue;
        };
        let hosts = out.entry((*cluster).to_string()).or_default();
        let rest = line.get(cluster.len() + 2..).unwrap_or_default();
        let Some((address, flags)) = rest.rsplit_once("::health_flags::") else {
            continue;
        };
        if address.is_empty() {
            continue;
        }
        hosts.push(Host {
            address: address.to_string(),
            ready: flags.trim() == "healthy",
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO: &str = "outbound|80||a.default.svc.cluster.local";

    #[test]
    fn path_escapes_names_for_re2_and_the_query() {
        assert_eq!(
            clusters_path(&["torchserve"]),
            "/clusters?filter=%5E%28torchserve%29%24"
        );
        assert_eq!(
            clusters_path(&["a", ISTIO]),
            "/clusters?filter=%5E%28a%7Coutbound%5C%7C80%5C%7C%5C%7Ca%5C.default%5C.svc%5C.cluster%5C.local%29%24"
        );
    }

    #[test]
    fn reads_envoy_text() {
        let body = format!(
            "torchserve::observability_name::torchserve\n\
             torchserve::default_priority::max_connections::1024\n\
             torchserve::127.0.0.1:18081::rq_active::3\n\
             torchserve::127.0.0.1:18081::health_flags::healthy\n\
             torchserve::127.0.0.1:18082::health_flags::/eds_status_draining\n\
             torchserve::[::1]:8080::health_flags::healthy\n\
             torchserve::10.0.0.9:80::health_flags::/failed_active_hc/active_hc_timeout\n\
             {ISTIO}::added_via_api::true\n\
             other::127.0.0.1:1::health_flags::healthy\n"
        );
        let m = endpoints(body.as_bytes(), &["torchserve", ISTIO, "missing"]).unwrap();
        let ts: Vec<(&str, bool)> = m["torchserve"]
            .iter()
            .map(|h| (h.address.as_str(), h.ready))
            .collect();
        assert_eq!(
            ts,
            vec![
                ("127.0.0.1:18081", true),
                ("127.0.0.1:18082", false),
                ("[::1]:8080", true),
                ("10.0.0.9:80", false),
            ]
        );
        assert_eq!(m.get(ISTIO), Some(&vec![]), "reported, no hosts");
        assert_eq!(m.get("other"), None, "not asked for");
        assert_eq!(m.get("missing"), None, "unknown is not empty");
    }

    #[test]
    fn a_name_that_prefixes_another_is_not_confused() {
        let body = b"ab::1.2.3.4:5::health_flags::healthy\na::1.2.3.4:6::health_flags::healthy\n";
        let m = endpoints(body, &["a"]).unwrap();
        assert_eq!(m["a"].len(), 1);
        assert_eq!(m["a"][0].address, "1.2.3.4:6");
    }

    #[test]
    fn rejects_garbage() {
        assert!(endpoints(&[0xff, 0xfe], &["a"]).is_err());
        assert!(endpoints(b"<html>", &["a"]).unwrap().is_empty());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = endpoints(&bytes, &["a", "a:"]);
        }
    }
}
