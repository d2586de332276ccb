//! An empty Rust proxy-wasm HTTP filter: the benchmark's floor for "any wasm filter".
//!
//! Envoy still creates a context per stream, calls `proxy_on_context_create`,
//! `proxy_on_request_headers`, `proxy_on_response_headers`, `proxy_on_log`, `proxy_on_done`
//! and `proxy_on_delete` through V8; the SDK's defaults answer `Continue`. What inflight pays
//! on top of this is its own work.
//!
//! Built with features (none by default), it does one more piece of inflight's per-request work
//! each — the ablation ladder of `bench/ablation.sh` (issue 17): which of inflight's host calls
//! and bookkeeping cost what in Envoy, measured beside inflight and this empty filter in one run.
//!
//! - `authority`: read `:authority` at request headers (inflight's identify);
//! - `shared-get`: read a 4-byte shared-data key (inflight's recall epoch per arrival);
//! - `metric`: increment a counter (inflight's outcome counter);
//! - `strip-header`: remove a request header (inflight's endpoint header strip);
//! - `stream-state`: per stream, what inflight's adapter keeps (an `Rc<RefCell<_>>` shared with
//!   the root, a map entry from request headers to the stream's end, a clock read at each).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[cfg(feature = "stream-state")]
type Shared = std::rc::Rc<std::cell::RefCell<std::collections::HashMap<u32, u64>>>;

#[derive(Default)]
struct Root {
    #[cfg(feature = "metric")]
    counter: Option<u32>,
    #[cfg(feature = "stream-state")]
    streams: Shared,
}

impl Context for Root {}

impl RootContext for Root {
    #[cfg(feature = "metric")]
    fn on_configure(&mut self, _: usize) -> bool {
        self.counter = proxy_wasm::hostcalls::define_metric(
            proxy_wasm::types::MetricType::Counter,
            "ablation.requests_total",
        )
        .ok();
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            #[cfg(feature = "metric")]
            counter: self.counter,
            #[cfg(feature = "stream-state")]
            context: _context_id,
            #[cfg(feature = "stream-state")]
            streams: std::rc::Rc::clone(&self.streams),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    #[cfg(feature = "metric")]
    counter: Option<u32>,
    #[cfg(feature = "stream-state")]
    context: u32,
    #[cfg(feature = "stream-state")]
    streams: Shared,
}

#[cfg(feature = "stream-state")]
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Context for Stream {
    #[cfg(feature = "stream-state")]
    fn on_done(&mut self) -> bool {
        let since = self.streams.borrow_mut().remove(&self.context);
        std::hint::black_box((since, now_ns()));
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        #[cfg(feature = "authority")]
        std::hint::black_box(
            proxy_wasm::hostcalls::get_map_value(
                proxy_wasm::types::MapType::HttpRequestHeaders,
                ":authority",
            )
            .ok(),
        );
        #[cfg(feature = "shared-get")]
        std::hint::black_box(proxy_wasm::hostcalls::get_shared_data("ablation.epoch").ok());
        #[cfg(feature = "metric")]
        if let Some(id) = self.counter {
            std::hint::black_box(proxy_wasm::hostcalls::increment_metric(id, 1).ok());
        }
        #[cfg(feature = "strip-header")]
        std::hint::black_box(
            proxy_wasm::hostcalls::set_map_value(
                proxy_wasm::types::MapType::HttpRequestHeaders,
                "x-gateway-destination-endpoint",
                None,
            )
            .ok(),
        );
        #[cfg(feature = "stream-state")]
        self.streams.borrow_mut().insert(self.context, now_ns());
        Action::Continue
    }
}
