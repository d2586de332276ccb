//! The built binary as a process: the `listening on` line, flags, and a graceful stop on
//! SIGTERM with requests in flight. Every child binds 127.0.0.1 and is killed when its test
//! ends, whatever happens.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: fail loudly

mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use hyper::StatusCode;
use inflight_predictor::server::DELAY_HEADER;
use serde_json::json;

/// A running `inflight-predictor`; killed on drop.
struct Predictor {
    child: Child,
    addr: SocketAddr,
}

impl Predictor {
    fn spawn(args: &[&str]) -> Predictor {
        let mut child = Command::new(env!("CARGO_BIN_EXE_inflight-predictor"))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn inflight-predictor");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first stdout line is {line:?}"))
            .parse()
            .unwrap();
        Predictor { child, addr }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = request(self.addr, "GET", "/v2/health/ready", &[], Bytes::new()).await;
            if r.status == StatusCode::OK {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready after 30 s: {}",
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Predictor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_its_address_and_serves() {
    let p = Predictor::spawn(&["--model-name", "torchserve"]);
    assert!(p.addr.ip().is_loopback());
    p.wait_ready().await;
    let body = serde_json::to_vec(&json!({"instances": [{"data": b64(&digit_png(9))}]})).unwrap();
    let r = request(
        p.addr,
        "POST",
        "/v1/models/torchserve:predict",
        &[],
        body.into(),
    )
    .await;
    assert_eq!(r.json(), json!({"predictions": [9]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_can_come_from_the_environment() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_inflight-predictor"))
        .env("INFLIGHT_PREDICTOR_HOST", "127.0.0.1")
        .env("INFLIGHT_PREDICTOR_PORT", "0")
        .env("INFLIGHT_PREDICTOR_MODEL_NAME", "digits")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let p = Predictor {
        addr: line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .parse()
            .unwrap(),
        child,
    };
    p.wait_ready().await;
    let r = request(p.addr, "GET", "/v1/models", &[], Bytes::new()).await;
    assert_eq!(r.json(), json!({"models": ["digits"]}));
}

#[test]
fn a_missing_model_exits_with_a_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_inflight-predictor"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model-dir",
            "/nonexistent/model",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.starts_with("listening on 127.0.0.1:"), "{stdout}");
    assert!(
        stderr.contains("/nonexistent/model/model.pt does not exist"),
        "{stderr}"
    );
    assert!(stderr.contains("--model-dir"), "{stderr}");
}

#[test]
fn bad_flags_are_explained() {
    let output = Command::new(env!("CARGO_BIN_EXE_inflight-predictor"))
        .args(["--max-batch-delay", "5"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("has no unit"), "{stderr}");
}

/// SIGTERM with requests in flight: the listener closes at once, every in-flight request is
/// answered, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let mut p = Predictor::spawn(&["--delay-header"]);
    p.wait_ready().await;
    let body = Bytes::from(
        serde_json::to_vec(&json!({"instances": [{"data": b64(&digit_png(3))}]})).unwrap(),
    );
    // An idle keep-alive connection must not hold the stop up.
    let idle = tokio::net::TcpStream::connect(p.addr).await.unwrap();

    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (addr, body) = (p.addr, body.clone());
            tokio::spawn(async move {
                request(
                    addr,
                    "POST",
                    "/v1/models/mnist:predict",
                    &[(DELAY_HEADER, "1500")],
                    body,
                )
                .await
            })
        })
        .collect();
    // All ten are in flight (a signal from the server, not a guess).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = request(p.addr, "GET", "/metrics", &[], Bytes::new())
            .await
            .text();
        if metric(&text, "inflight_predictor_in_flight") == 10.0 {
            break;
        }
        assert!(Instant::now() < deadline, "requests never all in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    p.signal(libc::SIGTERM);

    // New connections are refused while the ten are still held.
    loop {
        if tokio::net::TcpStream::connect(p.addr).await.is_err() {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_millis(1000),
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        tasks.iter().all(|t| !t.is_finished()),
        "a held request finished before the listener closed"
    );

    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json(), json!({"predictions": [3]}));
    }
    let status = p.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    drop(idle);
}

#[test]
fn help_lists_every_flag_with_its_env_var() {
    let output = Command::new(env!("CARGO_BIN_EXE_inflight-predictor"))
        .arg("--help")
        .output()
        .unwrap();
    let mut help = String::new();
    output.stdout.as_slice().read_to_string(&mut help).unwrap();
    for flag in [
        "--model-dir",
        "--model-name",
        "--host",
        "--port",
        "--workers",
        "--io-threads",
        "--threads",
        "--max-batch-size",
        "--max-batch-delay",
        "--max-queue",
        "--max-body-bytes",
        "--read-timeout",
        "--shutdown-timeout",
        "--delay-header",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(help.contains("INFLIGHT_PREDICTOR_MODEL_DIR"), "{help}");
}
