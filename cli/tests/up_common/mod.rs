//! Shared by the `up_*` tests: the artifacts the stack needs (Envoy from `make setup`, the
//! filter, the real predictor), `inflight up` as a child process, its state file, and hey.

#![allow(dead_code)]

use inflight_envoy_control::WasmBuild;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap()
}

pub fn envoy() -> PathBuf {
    if let Some(p) = std::env::var_os("INFLIGHT_ENVOY") {
        return p.into();
    }
    let p = workspace_root().join(".venv/bin/envoy");
    assert!(
        p.exists(),
        "Envoy not found at {}; run `make setup`",
        p.display()
    );
    p
}

fn cargo_build(target_dir: &str, args: &[&str], what: &str) -> PathBuf {
    let root = workspace_root();
    let target_dir = root.join(target_dir);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(args);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build {what}: {e}"));
    assert!(status.success(), "building {what} failed: cargo {args:?}");
    target_dir
}

/// The filter, built once (the same command and target directory as host-tests, so one build
/// serves both) unless `INFLIGHT_FILTER_WASM` names one.
pub fn filter_wasm() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        if let Some(p) = std::env::var_os("INFLIGHT_FILTER_WASM") {
            return p.into();
        }
        WasmBuild::filter(&workspace_root(), "target-emu-wasm")
            .run()
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .clone()
}

/// The real predictor: `INFLIGHT_PREDICTOR`, else the one `cargo test --workspace` built beside
/// this test, else a release build (needs libtorch: `make setup`).
pub fn predictor() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        if let Some(p) = std::env::var_os("INFLIGHT_PREDICTOR") {
            return p.into();
        }
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().and_then(Path::parent).map(Path::to_path_buf))
        {
            for profile_dir in [dir.clone(), dir.join("../release")] {
                let p = profile_dir.join("inflight-predictor");
                if p.is_file() {
                    return p;
                }
            }
        }
        if std::env::var_os("LIBTORCH").is_none() {
            let out = Command::new(workspace_root().join("scripts/setup-torch.sh"))
                .arg("--print-libtorch")
                .output()
                .expect("running scripts/setup-torch.sh --print-libtorch (run `make setup`)");
            let libtorch = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(!libtorch.is_empty(), "libtorch not found; run `make setup`");
            std::env::set_var("LIBTORCH", libtorch);
        }
        cargo_build(
            "target-up-predictor",
            &["build", "--release", "-p", "inflight-predictor"],
            "inflight-predictor",
        )
        .join("release/inflight-predictor")
    })
    .clone()
}

pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("inflight-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `inflight up` with `args`, its output in `dir/up.log`, killed (by pid) if the test fails.
pub struct Up {
    pub child: Child,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl Up {
    pub fn start(dir: &Path, args: &[&str]) -> Up {
        let state = dir.join("state.json");
        let log = dir.join("up.log");
        let child = Command::new(env!("CARGO_BIN_EXE_inflight"))
            .arg("up")
            .args(args)
            .arg("--state-file")
            .arg(&state)
            .arg("--envoy")
            .arg(envoy())
            .arg("--wasm")
            .arg(filter_wasm())
            .arg("--predictor")
            .arg(predictor())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("up.err")).unwrap())
            .spawn()
            .unwrap();
        Up { child, state, log }
    }

    pub fn state(&self) -> Option<serde_json::Value> {
        std::fs::read_to_string(&self.state)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
    }

    /// Polls the state file until `check` holds; panics with the log after `timeout`.
    pub fn wait(
        &mut self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.state() {
                if check(&s) {
                    return s;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "inflight up exited ({status}) while waiting for {what}:\n{}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; state {:?}\n{}",
                    self.state(),
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn output(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let err = std::fs::read_to_string(self.log.with_file_name("up.err")).unwrap_or_default();
        let tail: Vec<&str> = out.lines().collect();
        format!(
            "--- up.log (tail) ---\n{}\n--- up.err ---\n{err}",
            tail[tail.len().saturating_sub(120)..].join("\n")
        )
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "inflight up did not stop within {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            unsafe_kill(self.child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` to `pid`; false if there is no such process.
pub fn unsafe_kill(pid: u32, sig: i32) -> bool {
    inflight_envoy_control::process::signal(pid, sig)
}

/// Whether `pid` is a running (not zombie) process.
pub fn alive(pid: u32) -> bool {
    inflight_envoy_control::process::alive(pid)
}

/// hey against the stack (`-host` set, body = the mnist sample); returns its output.
pub fn hey(listener: &str, host: &str, clients: u32, secs: u32, headers: &[&str]) -> Child {
    let mut cmd = Command::new("hey");
    cmd.args([
        "-m",
        "POST",
        "-z",
        &format!("{secs}s"),
        "-c",
        &clients.to_string(),
    ])
    .arg("-D")
    .arg(workspace_root().join("predictor/samples/mnist.json"))
    .args(["-T", "application/json", "-host", host]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("http://{listener}/v1/models/mnist:predict"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("hey (run `make setup`)")
}

pub fn hey_statuses(out: &Output) -> Vec<(u16, u64)> {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = Vec::new();
    let mut on = false;
    for l in text.lines() {
        if l.starts_with("Status code distribution") {
            on = true;
            continue;
        }
        if on {
            let Some(rest) = l.trim().strip_prefix('[') else {
                if !l.trim().is_empty() {
                    on = false;
                }
                continue;
            };
            if let Some((c, n)) = rest.split_once(']') {
                v.push((
                    c.parse().unwrap(),
                    n.split_whitespace().next().unwrap().parse().unwrap(),
                ));
            }
        }
    }
    v
}
