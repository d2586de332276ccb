//! Envoy as the worker's host: shared data, wake queues and the request's facts, through
//! proxy-wasm host calls that return their `Status` (the SDK's trait helpers would unwrap).

use inflight_core::store::{Host, HostError};
use inflight_core::worker::{RequestFacts, ResponseFacts};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};

fn host_error(s: Status) -> HostError {
    match s {
        Status::NotFound => HostError::NotFound,
        Status::CasMismatch => HostError::CasMismatch,
        Status::BadArgument => HostError::BadArgument,
        other => HostError::Other(other as u32),
    }
}

/// The proxy-wasm host of this VM.
pub struct EnvoyHost;

impl Host for EnvoyHost {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError> {
        hostcalls::get_shared_data(key).map_err(host_error)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(host_error)
    }

    fn register_queue(&self, name: &str) -> Result<u32, HostError> {
        hostcalls::register_shared_queue(name).map_err(host_error)
    }

    fn enqueue(&self, token: u32, message: &[u8]) -> Result<(), HostError> {
        hostcalls::enqueue_shared_queue(token, Some(message)).map_err(host_error)
    }
}

/// The current request, as Envoy sees it at request headers.
pub struct EnvoyRequest;

impl RequestFacts for EnvoyRequest {
    fn authority(&self) -> Option<String> {
        self.header(":authority")
    }

    fn cluster(&self) -> Option<String> {
        let bytes = hostcalls::get_property(vec!["xds", "cluster_name"]).ok()??;
        String::from_utf8(bytes).ok()
    }

    fn header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn local_port(&self) -> Option<u16> {
        // Envoy serializes integer attributes as 8 little-endian bytes.
        let bytes = hostcalls::get_property(vec!["destination", "port"]).ok()??;
        let raw: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        u16::try_from(u64::from_le_bytes(raw)).ok()
    }
}

/// What Envoy's node says about this gateway's place in a fleet (its metadata, attribute
/// `xds.node`; Istio's proxy also offers it as `node`).
pub fn node_facts() -> inflight_core::worker::NodeFacts {
    let string = |key: &str| {
        hostcalls::get_property(vec!["xds", "node", "metadata", key])
            .ok()
            .flatten()
            .or_else(|| {
                hostcalls::get_property(vec!["node", "metadata", key])
                    .ok()
                    .flatten()
            })
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| !s.trim().is_empty())
    };
    inflight_core::worker::NodeFacts {
        fleet_self: string(inflight_core::fleet::SELF_METADATA_KEY),
        instance_ips: string("INSTANCE_IPS"),
    }
}

/// The current response, as Envoy sees it at response headers.
pub struct EnvoyResponse;

impl ResponseFacts for EnvoyResponse {
    fn upstream_address(&self) -> Option<String> {
        let bytes = hostcalls::get_property(vec!["upstream", "address"]).ok()??;
        String::from_utf8(bytes).ok()
    }
}

/// The answer to the membership poll being delivered: its `:status` (empty if none) and its
/// body. The worker judges them.
pub fn poll_answer(body_size: usize) -> (String, Result<Vec<u8>, String>) {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .unwrap_or_default();
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .map(Option::unwrap_or_default)
        .map_err(|e| format!("{e:?}"));
    (status, body)
}
