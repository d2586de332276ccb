//! `envoy --mode validate` on every Envoy config the project ships that is not covered by a more
//! specific test (validate mode also runs the filter's configure, so a bad plugin config fails).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use inflight_host_tests::envoy::{self, workspace_root};
use std::process::Command;

#[test]
fn shipped_minimal_config_validates_with_the_real_filter() {
    let root = workspace_root();
    // The config names the wasm by its path relative to the repository root.
    let wasm = envoy::filter_wasm();
    let text = std::fs::read_to_string(root.join("docs/envoy-minimal.yaml")).unwrap();
    let text = text.replace(
        "target/wasm32-wasip1/wasm/inflight_filter.wasm",
        &wasm.display().to_string(),
    );
    let dir = std::env::temp_dir().join(format!("inflight-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("envoy-minimal.yaml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(envoy::envoy_binary().unwrap())
        .args(["--mode", "validate", "-l", "warn", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "docs/envoy-minimal.yaml does not validate:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
