//! Applying the worker's effects to Envoy: replies, resumes, metrics, the membership call.

use crate::SharedVm;
use inflight_core::worker::{Effect, PollRequest, Reply};
use proxy_wasm::hostcalls;
use std::time::Duration;

/// Header carrying the outcome on every local reply of the filter.
pub const SHED_HEADER: &str = "x-inflight-shed";

/// Applies `effects` in order. Holds no borrow of the VM while resuming or replying: both can
/// re-enter this VM (a resumed stream's body callback, say).
pub fn apply(vm: &SharedVm, effects: &mut Vec<Effect>) {
    for effect in effects.drain(..) {
        match effect {
            Effect::Resume { context } => {
                let resumed = hostcalls::set_effective_context(context)
                    .and_then(|()| hostcalls::resume_http_request());
                if resumed.is_err() {
                    // The stream ended without on_done reaching us yet.
                    crate::with_worker(vm, |w| w.on_resume_failed(context, crate::clock::now_ms()));
                }
            }
            Effect::Reply { context, reply } => {
                if hostcalls::set_effective_context(context).is_ok() {
                    send_reply(&reply);
                }
            }
            Effect::Poll(request) => {
                let sent = dispatch(&request);
                crate::with_worker(vm, |w| w.on_poll_dispatched(sent));
            }
            other => {
                if let Ok(v) = vm.try_borrow() {
                    v.metrics.apply(&other);
                }
            }
        }
    }
}

/// Sends the gateway's own reply on the current (effective) stream.
pub fn send_reply(reply: &Reply) {
    let retry;
    let mut headers = vec![("content-type", "text/plain")];
    if let Some(value) = reply.outcome.shed_header() {
        headers.insert(0, (SHED_HEADER, value));
    }
    if let Some(s) = reply.retry_after_s {
        retry = s.to_string();
        headers.push(("retry-after", retry.as_str()));
    }
    let status = reply.status();
    if let Err(e) = hostcalls::send_http_response(status, headers, Some(reply.body.as_bytes())) {
        log::error!("sending the {status} reply failed: {e:?}");
    }
}

fn dispatch(r: &PollRequest) -> Result<u32, String> {
    let headers = vec![
        (":method", "GET"),
        (":path", r.path),
        (":authority", r.authority.as_str()),
    ];
    hostcalls::dispatch_http_call(
        &r.cluster,
        headers,
        None,
        vec![],
        Duration::from_millis(r.timeout_ms),
    )
    .map_err(|e| format!("dispatch to cluster `{}` failed: {e:?}", r.cluster))
}
