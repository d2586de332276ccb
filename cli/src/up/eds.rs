//! The file-based EDS config Envoy watches: one `DiscoveryResponse` per revision cluster, listing
//! the ready replicas, and the draining ones as `DRAINING` (a replica on its way out stays listed
//! until it is stopped, so a request the filter picked for it before its next poll is still
//! served there: Envoy's `override_host` follows a pick of a draining host, while the filter
//! picks only healthy ones; removed at once, that request would get a 503). Written to a temporary file beside the watched directory and renamed into
//! it, so Envoy (which reloads on a move into the directory) never reads a half-written file.

use anyhow::{Context as _, Result};
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;

/// The `DiscoveryResponse` for `cluster` with `endpoints` (healthy) and `draining`.
pub fn render(
    cluster: &str,
    version: u64,
    endpoints: &[SocketAddr],
    draining: &[SocketAddr],
) -> String {
    let entry = |a: &SocketAddr| {
        json!({ "endpoint": { "address": { "socket_address": {
            "address": a.ip().to_string(), "port_value": a.port() } } } })
    };
    let mut lb_endpoints: Vec<_> = endpoints.iter().map(entry).collect();
    lb_endpoints.extend(draining.iter().map(|a| {
        let mut e = entry(a);
        e["health_status"] = json!("DRAINING");
        e
    }));
    json!({
        "version_info": version.to_string(),
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": cluster,
            "endpoints": [{ "lb_endpoints": lb_endpoints }],
        }],
    })
    .to_string()
}

/// Writes `path` atomically: a temp file in the parent of `path`'s directory, then a rename.
pub fn write(
    path: &Path,
    cluster: &str,
    version: u64,
    endpoints: &[SocketAddr],
    draining: &[SocketAddr],
) -> Result<()> {
    let dir = path.parent().context("EDS path has no directory")?;
    let staging = dir.parent().unwrap_or(dir).join(format!(
        ".{}.{version}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("eds")
    ));
    std::fs::write(&staging, render(cluster, version, endpoints, draining))
        .with_context(|| format!("writing {}", staging.display()))?;
    std::fs::rename(&staging, path)
        .with_context(|| format!("renaming {} to {}", staging.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_cluster_load_assignment() {
        let eps: Vec<SocketAddr> = vec!["127.0.0.1:4001".parse().unwrap()];
        let v: serde_json::Value =
            serde_json::from_str(&render("torchserve", 7, &eps, &[])).unwrap();
        assert_eq!(v["version_info"], "7");
        let r = &v["resources"][0];
        assert_eq!(r["cluster_name"], "torchserve");
        assert_eq!(
            r["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                ["port_value"],
            4001
        );
        let empty: serde_json::Value = serde_json::from_str(&render("x", 1, &[], &[])).unwrap();
        assert_eq!(
            empty["resources"][0]["endpoints"][0]["lb_endpoints"]
                .as_array()
                .map(Vec::len),
            Some(0),
            "zero replicas is a valid, empty assignment"
        );
    }

    #[test]
    fn write_replaces_the_file_whole() {
        let dir = std::env::temp_dir().join(format!("inflight-eds-test-{}", std::process::id()));
        let eds = dir.join("eds");
        std::fs::create_dir_all(&eds).unwrap();
        let path = eds.join("a.json");
        let eps: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap()];
        write(&path, "a", 1, &eps, &[]).unwrap();
        write(&path, "a", 2, &[], &[]).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["version_info"], "2");
        assert_eq!(
            std::fs::read_dir(&eds).unwrap().count(),
            1,
            "no temp files in the watched directory"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
