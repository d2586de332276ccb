//! Test support for running filter.wasm in real Envoy and in an emulated host.
//!
//! - [`envoy`]: real Envoy processes (from the project's `.venv`), config generation, stats;
//! - [`fleet`]: a fleet of gateway Envoys splitting each pod's concurrency, an L4 Envoy in front;
//! - [`upstream`]: a recording test upstream; [`client`]: a raw HTTP/1.1 client;
//! - [`emu`]: the emulated proxy-wasm host on wasmtime (many workers, virtual clock).
pub mod chaos;
pub mod client;
pub mod emu;
pub mod envoy;
pub mod fleet;
pub mod sidecar;
pub mod upstream;
