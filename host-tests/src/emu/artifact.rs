//! Builds the release `filter.wasm` once per test process, so `cargo test -p
//! inflight-host-tests` works from a clean checkout:
//!
//! ```text
//! cargo build -p inflight-filter --target wasm32-wasip1 --profile wasm
//! ```
//!
//! run with its own target directory (`target-emu-wasm/` at the workspace root) so it never
//! waits on the lock of the build that runs the tests. `INFLIGHT_FILTER_WASM=/path/to.wasm`
//! skips the build and loads that file instead.

use inflight_envoy_control::WasmBuild;
use std::path::PathBuf;
use std::sync::OnceLock;

use super::Filter;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The path of the release filter, building it first (once per process) unless
/// `INFLIGHT_FILTER_WASM` names one.
pub fn filter_wasm_path() -> &'static PathBuf {
    // A failed build is remembered, so the other tests of the process fail fast with it.
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PATH.get_or_init(build) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn build() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("INFLIGHT_FILTER_WASM") {
        return Ok(PathBuf::from(p));
    }
    WasmBuild::filter(&workspace_root(), "target-emu-wasm")
        .run()
        .map_err(|e| e.to_string())
}

/// The compiled filter, shared by every host in the process.
pub fn filter() -> &'static Filter {
    static FILTER: OnceLock<Filter> = OnceLock::new();
    FILTER.get_or_init(|| {
        let path = filter_wasm_path();
        let bytes =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        Filter::from_bytes_cached(&bytes, &path.with_extension("emu.cwasm"))
            .unwrap_or_else(|e| panic!("compiling {}: {e:#}", path.display()))
    })
}
