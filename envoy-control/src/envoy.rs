//! One Envoy process: started on a bootstrap file with its log in a file, LIVE once
//! [`Envoy::wait_live`] says so, stopped with a grace period, and killed by its pid when dropped,
//! so no benchmark, test or local stack leaves an Envoy behind. The callers (the stack, the
//! benchmark, the test harness) wrap it with what only they need (stats, scratch directories).
//!
//! [`validate`] runs `envoy --mode validate`, for configs a test wants checked without a process.

use crate::{process, request, wait_live, Live, StartError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use thiserror::Error;

/// How to start Envoy. [`Launch::new`] fills in the usual: one worker, log level `warn`, the
/// log in `envoy.log` and the admin address in `admin-address` of a directory, killed at once
/// when dropped.
#[derive(Debug, Clone)]
pub struct Launch {
    pub binary: PathBuf,
    /// The bootstrap (`-c`).
    pub config: PathBuf,
    /// Worker threads (`--concurrency`).
    pub workers: u32,
    /// `-l`.
    pub log_level: &'static str,
    /// Envoy's stderr, i.e. its log; created afresh.
    pub log: PathBuf,
    /// `--admin-address-path`, where Envoy writes its admin address; removed before the start.
    pub admin_address: PathBuf,
    /// In its own process group, with SIGTERM as its parent-death signal ([`process::spawn`]).
    pub own_group: bool,
    /// On drop: zero kills at once; more sends SIGTERM first and kills after that long.
    pub drop_grace: Duration,
}

impl Launch {
    /// Envoy `binary` on `config`, with its log and admin address file in `dir`.
    pub fn new(binary: &Path, config: &Path, dir: &Path) -> Launch {
        Launch {
            binary: binary.to_path_buf(),
            config: config.to_path_buf(),
            workers: 1,
            log_level: "warn",
            log: dir.join("envoy.log"),
            admin_address: dir.join("admin-address"),
            own_group: false,
            drop_grace: Duration::ZERO,
        }
    }
}

/// A running Envoy; `admin` and `listener` are known once [`Envoy::wait_live`] succeeded.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
    log: PathBuf,
    admin_address: PathBuf,
    drop_grace: Duration,
}

impl Envoy {
    /// Spawns Envoy as `launch` says; it is not LIVE yet ([`Envoy::wait_live`]).
    pub fn spawn(launch: &Launch) -> Result<Envoy, StartError> {
        let _ = std::fs::remove_file(&launch.admin_address);
        let log = std::fs::File::create(&launch.log).map_err(|source| StartError::Log {
            path: launch.log.clone(),
            source,
        })?;
        let mut cmd = Command::new(&launch.binary);
        cmd.arg("-c")
            .arg(&launch.config)
            .args([
                "--concurrency",
                &launch.workers.to_string(),
                "--disable-hot-restart",
                "-l",
                launch.log_level,
            ])
            .arg("--admin-address-path")
            .arg(&launch.admin_address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = if launch.own_group {
            process::spawn(&mut cmd)
        } else {
            cmd.spawn()
        }
        .map_err(|source| StartError::Spawn {
            binary: launch.binary.clone(),
            source,
        })?;
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        Ok(Envoy {
            child,
            admin: unknown,
            listener: unknown,
            log: launch.log.clone(),
            admin_address: launch.admin_address.clone(),
            drop_grace: launch.drop_grace,
        })
    }

    /// Waits until Envoy is LIVE and records its admin and listener addresses.
    pub fn wait_live(&mut self, timeout: Duration) -> Result<Live, StartError> {
        let live = wait_live(&mut self.child, &self.admin_address, timeout)?;
        self.admin = live.admin;
        self.listener = live.listener;
        Ok(live)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Envoy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of Envoy's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    /// GET on the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        self.admin_request("GET", path)
    }

    /// A request on the admin endpoint (e.g. POST `/reset_counters`): (status, body).
    pub fn admin_request(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        request(self.admin, method, path, Duration::from_secs(10))
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the process.
    pub fn stop(&mut self, grace: Duration) {
        process::stop(&mut self.child, grace);
    }

    /// SIGKILL now; waits for the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if self.drop_grace.is_zero() {
            self.kill();
        } else {
            self.stop(self.drop_grace);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Why `envoy --mode validate` did not accept a config.
#[derive(Debug, Error)]
pub enum ValidateError {
    #[error("could not run {binary} --mode validate: {source}")]
    Run {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("envoy --mode validate {config} failed:\n{output}")]
    Invalid { config: String, output: String },
}

/// Runs `envoy --mode validate` on the bootstrap `config`, with `overlay` as `--config-yaml`
/// if given; Envoy's output in the error when it rejects the config.
pub fn validate(binary: &Path, config: &Path, overlay: Option<&str>) -> Result<(), ValidateError> {
    let mut cmd = Command::new(binary);
    cmd.args([
        "--mode",
        "validate",
        "--disable-hot-restart",
        "-l",
        "warn",
        "-c",
    ])
    .arg(config);
    if let Some(overlay) = overlay {
        cmd.args(["--config-yaml", overlay]);
    }
    let out = cmd.output().map_err(|source| ValidateError::Run {
        binary: binary.to_path_buf(),
        source,
    })?;
    if !out.status.success() {
        return Err(ValidateError::Invalid {
            config: config.display().to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails() {
        let cases = [
            ("fewer lines than asked", "a\nb", 5, "a\nb"),
            ("the last ones", "a\nb\nc\n", 2, "b\nc"),
            ("none asked", "a\nb", 0, ""),
            ("empty log", "", 3, ""),
        ];
        for (name, text, n, want) in cases {
            assert_eq!(tail(text, n), want, "{name}");
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "inflight-envoy-control-{tag}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A stand-in for Envoy: a shell script that logs its arguments and waits.
    fn fake_envoy(dir: &Path, script: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let bin = dir.join("fake-envoy");
        std::fs::write(&bin, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[test]
    fn a_dropped_envoy_is_killed_by_pid_and_its_log_kept() {
        let dir = scratch("drop");
        let bin = fake_envoy(&dir, "echo \"args: $*\" >&2\nexec sleep 30");
        for grace in [Duration::ZERO, Duration::from_millis(200)] {
            let launch = Launch {
                drop_grace: grace,
                ..Launch::new(&bin, &dir.join("envoy.yaml"), &dir)
            };
            let mut envoy = Envoy::spawn(&launch).unwrap();
            let pid = envoy.pid();
            assert!(envoy.alive());
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while envoy.log().is_empty() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(
                envoy.log_tail(1).contains("--admin-address-path"),
                "{}",
                envoy.log()
            );
            drop(envoy);
            assert!(!process::alive(pid), "grace {grace:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_envoy_that_exits_is_not_live_and_stop_is_harmless() {
        let dir = scratch("exits");
        let bin = fake_envoy(&dir, "echo bad config >&2\nexit 1");
        let mut envoy = Envoy::spawn(&Launch::new(&bin, &dir.join("envoy.yaml"), &dir)).unwrap();
        let err = envoy.wait_live(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, StartError::Exited(_)), "{err}");
        assert!(!envoy.alive());
        assert_eq!(envoy.log_tail(5), "bad config");
        envoy.stop(Duration::from_millis(100));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let dir = scratch("missing");
        let launch = Launch::new(Path::new("/nonexistent/envoy"), Path::new("x.yaml"), &dir);
        let err = Envoy::spawn(&launch).unwrap_err();
        assert!(matches!(err, StartError::Spawn { .. }), "{err}");
        let err = validate(Path::new("/nonexistent/envoy"), Path::new("x.yaml"), None).unwrap_err();
        assert!(matches!(err, ValidateError::Run { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validate_passes_the_overlay_and_reports_a_rejection() {
        let dir = scratch("validate");
        let bin = fake_envoy(&dir, "echo \"rejected: $*\"\nexit 1");
        let err = validate(&bin, Path::new("b.yaml"), Some("admin: {}")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("envoy --mode validate b.yaml failed:"),
            "{text}"
        );
        assert!(text.contains("-c b.yaml --config-yaml admin: {}"), "{text}");
        let ok = fake_envoy(&dir, "exit 0");
        validate(&ok, Path::new("b.yaml"), None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
