//! Test-only fault injection (cargo feature `fault-injection`; never in the release wasm): a
//! request with `x-inflight-fault: panic` makes this VM panic, which kills it in Envoy — the
//! trigger for the VM-crash tests.

#![allow(clippy::panic)]

use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;

pub fn maybe_crash() {
    if let Ok(Some(v)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, "x-inflight-fault") {
        if v == "panic" {
            panic!("fault injection: panic requested by x-inflight-fault");
        }
    }
}
