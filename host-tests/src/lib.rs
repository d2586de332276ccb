//! Test support for running filter.wasm in real Envoy and in an emulated host.
pub mod emu;
