//! The proxy-wasm adapter (placeholder).
