//! inflight-envoy-control: what every part of the project that runs Envoy needs — the local
//! stack (`inflight up`), the benchmark (`inflight bench`) and the test harness.
//!
//! Envoy is started with admin and listener on port 0 and `--admin-address-path`, so nothing
//! assumes a free port; [`wait_live`] waits for the admin address, for `/ready` to say `LIVE`,
//! and reads the listener's real port back from `/listeners`. [`request`] is a one-shot blocking
//! HTTP/1.1 client for loopback admin, health and metrics endpoints (chunked bodies decoded).
//!
//! Around that: [`Envoy`], the one Envoy process type (spawn, LIVE, log, stop, killed by pid
//! when dropped) with [`validate`]; [`bootstrap`], the YAML fragments the project's bootstrap
//! generators share; [`WasmBuild`], building a proxy-wasm crate with cargo; [`process`], stopping
//! children by pid.

pub mod bootstrap;
mod envoy;
pub mod process;
mod wasm;

pub use envoy::{validate, Envoy, Launch, ValidateError};
pub use wasm::{BuildError, WasmBuild};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why Envoy did not start or did not become LIVE.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("envoy exited during startup ({0})")]
    Exited(ExitStatus),
    #[error("envoy did not become ready in {0:?}")]
    Timeout(Duration),
    #[error("envoy is LIVE but its /listeners answer has no listener port: {0}")]
    NoListener(String),
    #[error("checking on envoy: {0}")]
    Io(#[from] std::io::Error),
    #[error("could not start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("creating envoy's log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a LIVE Envoy listens: its admin endpoint and its first listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub admin: SocketAddr,
    pub listener: SocketAddr,
}

/// Waits until the Envoy `child`, started with `--admin-address-path admin_file`, is LIVE.
pub fn wait_live(
    child: &mut Child,
    admin_file: &Path,
    timeout: Duration,
) -> Result<Live, StartError> {
    let deadline = Instant::now() + timeout;
    let admin = loop {
        if let Some(status) = child.try_wait()? {
            return Err(StartError::Exited(status));
        }
        let admin = std::fs::read_to_string(admin_file)
            .ok()
            .and_then(|s| s.trim().parse::<SocketAddr>().ok());
        if let Some(a) = admin {
            if let Ok((200, body)) = get(a, "/ready", Duration::from_secs(2)) {
                if body.trim() == "LIVE" {
                    break a;
                }
            }
        }
        if Instant::now() > deadline {
            return Err(StartError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (_, listeners) = get(admin, "/listeners?format=json", Duration::from_secs(5))?;
    let port = serde_json::from_str::<serde_json::Value>(&listeners)
        .ok()
        .and_then(|v| {
            v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"].as_u64()
        })
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| StartError::NoListener(listeners.clone()))?;
    Ok(Live {
        admin,
        listener: SocketAddr::from(([127, 0, 0, 1], port)),
    })
}

/// GET `path` on `addr`: (status, body).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    request(addr, "GET", path, timeout)
}

/// One request on its own connection, bounded by `timeout`: (status, body).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        let cases = [
            ("two chunks", "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", "abcde"),
            ("empty", "0\r\n\r\n", ""),
            ("truncated", "5\r\nab", ""),
            ("garbage size", "zz\r\nab", ""),
        ];
        for (name, input, want) in cases {
            assert_eq!(dechunk(input), want, "{name}");
        }
    }

    #[test]
    fn a_dead_child_is_reported_not_waited_for() {
        let mut child = std::process::Command::new("false").spawn().unwrap();
        let _ = child.wait();
        let err = wait_live(
            &mut child,
            Path::new("/nonexistent"),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, StartError::Exited(_)), "{err}");
    }

    #[test]
    fn request_to_a_closed_port_fails() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(get(port, "/", Duration::from_millis(300)).is_err());
    }
}
