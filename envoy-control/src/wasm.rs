//! Building a proxy-wasm crate with cargo, as it ships: `--target wasm32-wasip1 --profile wasm`,
//! without the caller's `RUSTFLAGS` (flags meant for the native build), into a target
//! directory of its own, so a build started from a test or the benchmark never waits on the
//! lock of the build that runs it, and one artifact directory serves every caller.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use thiserror::Error;

/// The filter's package and the file cargo writes for it.
const FILTER_PACKAGE: &str = "inflight-filter";
const FILTER_ARTIFACT: &str = "inflight_filter.wasm";

/// A cargo build of one wasm crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmBuild {
    /// Where cargo runs: the workspace, or a crate with a workspace of its own.
    pub dir: PathBuf,
    /// `CARGO_TARGET_DIR`.
    pub target_dir: PathBuf,
    /// `-p`; `None` builds the package at `dir`.
    pub package: Option<String>,
    /// `--features`.
    pub features: Vec<String>,
    /// `--locked`.
    pub locked: bool,
    /// The file cargo writes (the crate's name with `_`, `.wasm`).
    pub artifact: String,
}

/// Why a wasm build produced nothing.
#[derive(Debug, Error)]
pub enum BuildError {
    #[error("could not run cargo ({cargo}): {source}")]
    Run {
        cargo: String,
        source: std::io::Error,
    },
    #[error("building {artifact} failed ({status}); to see why: {command}")]
    Failed {
        artifact: String,
        status: ExitStatus,
        command: String,
    },
}

impl WasmBuild {
    /// The project's filter (`-p inflight-filter`) of the workspace at `root`, into
    /// `root/target_dir`.
    pub fn filter(root: &Path, target_dir: &str) -> WasmBuild {
        WasmBuild {
            dir: root.to_path_buf(),
            target_dir: root.join(target_dir),
            package: Some(FILTER_PACKAGE.into()),
            features: Vec::new(),
            locked: false,
            artifact: FILTER_ARTIFACT.into(),
        }
    }

    /// The crate at `dir`, a workspace of its own with its own lock file (`--locked`), into
    /// `target_dir`; cargo writes `artifact`.
    pub fn own_workspace(dir: PathBuf, target_dir: PathBuf, artifact: &str) -> WasmBuild {
        WasmBuild {
            dir,
            target_dir,
            package: None,
            features: Vec::new(),
            locked: true,
            artifact: artifact.into(),
        }
    }

    /// Cargo's arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["build".to_string()];
        if self.locked {
            args.push("--locked".into());
        }
        if let Some(p) = &self.package {
            args.extend(["-p".into(), p.clone()]);
        }
        args.extend(["--target", "wasm32-wasip1", "--profile", "wasm"].map(String::from));
        if !self.features.is_empty() {
            args.extend(["--features".into(), self.features.join(",")]);
        }
        args
    }

    /// Where the built module is.
    pub fn output(&self) -> PathBuf {
        self.target_dir
            .join("wasm32-wasip1/wasm")
            .join(&self.artifact)
    }

    /// The build as a shell command, for error messages.
    pub fn command_line(&self) -> String {
        format!(
            "(cd {} && CARGO_TARGET_DIR={} cargo {})",
            self.dir.display(),
            self.target_dir.display(),
            self.args().join(" ")
        )
    }

    /// Runs the build (cargo's progress on this process's stderr); the module's path.
    pub fn run(&self) -> Result<PathBuf, BuildError> {
        // Cargo sets CARGO for build scripts and tests: the same toolchain as the caller's.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(&cargo)
            .current_dir(&self.dir)
            .env("CARGO_TARGET_DIR", &self.target_dir)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args(self.args())
            .status()
            .map_err(|source| BuildError::Run { cargo, source })?;
        if !status.success() {
            return Err(BuildError::Failed {
                artifact: self.artifact.clone(),
                status,
                command: self.command_line(),
            });
        }
        Ok(self.output())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_and_output() {
        let root = Path::new("/w");
        let plain = WasmBuild::filter(root, "target-emu-wasm");
        let faulty = WasmBuild {
            features: vec!["fault-injection".into()],
            ..WasmBuild::filter(root, "target-chaos-wasm")
        };
        let own_workspace = WasmBuild::own_workspace(
            root.join("bench/empty-filter"),
            root.join("target-bench-wasm"),
            "inflight_bench_empty_filter.wasm",
        );
        let cases = [
            (
                "the filter",
                &plain,
                "build -p inflight-filter --target wasm32-wasip1 --profile wasm",
                "/w/target-emu-wasm/wasm32-wasip1/wasm/inflight_filter.wasm",
            ),
            (
                "with a feature",
                &faulty,
                "build -p inflight-filter --target wasm32-wasip1 --profile wasm --features fault-injection",
                "/w/target-chaos-wasm/wasm32-wasip1/wasm/inflight_filter.wasm",
            ),
            (
                "a crate with its own workspace",
                &own_workspace,
                "build --locked --target wasm32-wasip1 --profile wasm",
                "/w/target-bench-wasm/wasm32-wasip1/wasm/inflight_bench_empty_filter.wasm",
            ),
        ];
        for (name, build, args, output) in cases {
            assert_eq!(build.args().join(" "), args, "{name}");
            assert_eq!(build.output(), Path::new(output), "{name}");
        }
        assert_eq!(
            plain.command_line(),
            "(cd /w && CARGO_TARGET_DIR=/w/target-emu-wasm cargo build -p inflight-filter --target wasm32-wasip1 --profile wasm)"
        );
    }

    #[test]
    fn a_failed_build_says_how_to_repeat_it() {
        let dir = std::env::temp_dir().join(format!("inflight-wasm-build-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // No Cargo.toml here: cargo fails at once, without building anything.
        let build = WasmBuild::own_workspace(dir.clone(), dir.join("target"), "nothing.wasm");
        let err = build.run().unwrap_err();
        assert!(matches!(err, BuildError::Failed { .. }), "{err}");
        assert!(err.to_string().contains(&build.command_line()), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
