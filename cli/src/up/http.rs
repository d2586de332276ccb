//! Blocking HTTP/1.1 to loopback admin, health and metrics endpoints, with this crate's errors
//! (the client itself is `inflight-envoy-control`'s, shared with the benchmark and the tests).

use anyhow::{Context as _, Result};
use std::net::SocketAddr;
use std::time::Duration;

/// GET `path` on `addr`: (status, body).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    request(addr, "GET", path, timeout)
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    inflight_envoy_control::request(addr, method, path, timeout)
        .with_context(|| format!("{method} {path} on {addr}"))
}
