//! The docker-compose stack's Envoy config, checked the way Envoy would check it: `envoy --mode
//! validate` with the filter at the path the gateway image holds it replaced by the local build,
//! and the plugin config it embeds accepted by the filter's own parser (fast, without Docker;
//! scripts/test-compose.sh runs the stack itself). Also validates the bootstrap `inflight up`
//! generates.

// Test helpers and tests: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod up_common;

use std::process::Command;
use up_common::*;

fn validate(config: &std::path::Path) {
    let out = Command::new(envoy())
        .args(["--mode", "validate", "-l", "warn", "-c"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "envoy --mode validate {}:\n{}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_envoy_config_validates() {
    let root = workspace_root();
    let yaml = std::fs::read_to_string(root.join("envoy/envoy.yaml")).unwrap();
    let dockerfile = std::fs::read_to_string(root.join("envoy/Dockerfile.gateway")).unwrap();
    assert!(
        dockerfile.contains("COPY envoy.yaml /etc/envoy/envoy.yaml")
            && dockerfile.contains("COPY inflight_filter.wasm /etc/envoy/inflight_filter.wasm"),
        "the gateway image holds the config and the filter where envoy.yaml expects them"
    );
    let dir = scratch("compose");
    let local = dir.join("envoy.yaml");
    std::fs::write(
        &local,
        yaml.replace(
            "/etc/envoy/inflight_filter.wasm",
            filter_wasm().to_str().unwrap(),
        ),
    )
    .unwrap();
    validate(&local);

    // The embedded plugin config, through the filter's parser.
    let start = yaml.find("value: |").unwrap() + "value: |".len();
    let end = yaml[start..]
        .find("          - name: envoy.filters.http.router")
        .unwrap()
        + start;
    let plugin = &yaml[start..end];
    inflight_core::Config::parse(plugin.as_bytes())
        .unwrap_or_else(|e| panic!("compose plugin config rejected: {e}\n{plugin}"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generated_bootstrap_validates() {
    let out = Command::new(env!("CARGO_BIN_EXE_inflight"))
        .current_dir(workspace_root())
        .args([
            "up",
            "--config",
            "demo/torchserve.json",
            "--print-config",
            "--wasm",
        ])
        .arg(filter_wasm())
        .arg("--envoy")
        .arg(envoy())
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        yaml.contains("type: EDS"),
        "{yaml}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = scratch("bootstrap");
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, yaml.as_bytes()).unwrap();
    validate(&path);
    let _ = std::fs::remove_dir_all(&dir);
    // The filter's configuration is in the ECDS file the bootstrap names (which validation
    // does not read): the filter under the entry's name, with a plugin config it accepts.
    let ecds = yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("path: \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .find(|p| p.ends_with("/ecds/inflight.yaml"))
        .unwrap_or_else(|| panic!("no ECDS file in the bootstrap:\n{yaml}"));
    assert!(
        yaml.contains("          - name: inflight\n            config_discovery:\n"),
        "{yaml}"
    );
    let filter: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(ecds).unwrap()).unwrap();
    let resource = &filter["resources"][0];
    assert_eq!(resource["name"], "inflight", "{filter}");
    let plugin = resource["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    inflight_core::Config::parse(plugin.as_bytes())
        .unwrap_or_else(|e| panic!("the ECDS file's plugin config rejected: {e}\n{plugin}"));
    // --print-config leaves the (empty) EDS files its bootstrap points at: remove them.
    if let Some(eds_dir) = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("watched_directory: { path: \""))
        .and_then(|rest| rest.split('"').next())
    {
        let stack_dir = std::path::Path::new(eds_dir).parent().unwrap();
        assert!(stack_dir.starts_with(std::env::temp_dir()), "{eds_dir}");
        let _ = std::fs::remove_dir_all(stack_dir);
    }
}
