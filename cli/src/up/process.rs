//! Child processes of the stack: each in its own process group, so a Ctrl-C in the terminal
//! reaches only `inflight up`, which then stops them in order (drain, SIGTERM, wait) instead of
//! all of them dying at once mid-request. Stopped by pid, always waited for: no orphans. The
//! same calls stop Envoy ([`inflight_envoy_control::Envoy`]), so they live beside it.

pub use inflight_envoy_control::process::{alive, signal, spawn, stop};
