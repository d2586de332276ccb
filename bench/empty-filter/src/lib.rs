//! An empty Rust proxy-wasm HTTP filter: the benchmark's floor for "any wasm filter".
//!
//! Envoy still creates a context per stream, calls `proxy_on_context_create`,
//! `proxy_on_request_headers`, `proxy_on_response_headers`, `proxy_on_log`, `proxy_on_done`
//! and `proxy_on_delete` through V8; the SDK's defaults answer `Continue`. What inflight pays
//! on top of this is its own work.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream;

impl Context for Stream {}

impl HttpContext for Stream {}
