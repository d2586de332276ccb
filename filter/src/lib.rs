//! inflight-filter: the proxy-wasm adapter that puts inflight-core in Envoy's HTTP filter chain.
//!
//! Each Envoy worker thread runs one VM of this module, and each VM one
//! [`inflight_core::Worker`], which makes every decision. Callbacks follow one pattern: read
//! the inputs from Envoy, call the worker, apply what it returns ([`apply`]). The worker is
//! reached through [`with_worker`], which never nests a borrow: effects are applied after the
//! worker call returned, because applying one (resuming a stream) can re-enter this VM.
//!
//! Follow one request: `Stream::on_http_request_headers` → `Worker::on_request` (core: find
//! the revision, `try_admit_as` in shared data) → `Verdict` → continue, pause or reply here; later
//! `Stream::on_done` → `Worker::on_done` (release, grants to the next waiters on their VMs'
//! wake queues) → `Root::on_queue_ready` on the waiter's VM → `Worker::on_wake` →
//! `Effect::Resume` applied in [`apply`]. This file and `core/src/worker.rs` hold the whole path.

mod clock;
#[cfg(feature = "fault-injection")]
mod fault;
mod host;
mod metrics;

use host::{EnvoyHost, EnvoyRequest, EnvoyResponse};
use inflight_core::worker::{Effect, PollRequest, Reply, Worker};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// This VM's worker (`None` until `on_vm_start` registered it) and its metric ids.
#[derive(Default)]
struct Vm {
    worker: Option<Worker<EnvoyHost>>,
    metrics: metrics::Metrics,
    /// The effects buffer, kept between calls so that no call allocates one.
    spare: Vec<inflight_core::Effect>,
}

type SharedVm = Rc<RefCell<Vm>>;

/// Runs `f` on this VM's worker, then applies its effects. Returns `None` (and logs) if the
/// worker is missing or already borrowed — a re-entrant callback, which must not panic.
fn with_worker<T>(vm: &SharedVm, f: impl FnOnce(&mut Worker<EnvoyHost>) -> T) -> Option<T> {
    let (out, mut effects) = {
        let Ok(mut v) = vm.try_borrow_mut() else {
            log::error!("re-entrant callback: the worker is busy");
            return None;
        };
        let v = &mut *v;
        let w = v.worker.as_mut()?;
        let out = f(w);
        let mut effects = std::mem::take(&mut v.spare);
        w.take_effects(&mut effects);
        (out, effects)
    };
    if !effects.is_empty() {
        apply(vm, &mut effects);
        effects.clear();
    }
    if let Ok(mut v) = vm.try_borrow_mut() {
        v.spare = effects;
    }
    Some(out)
}

#[derive(Default)]
struct Root {
    vm: SharedVm,
    /// Envoy asked this root to end while slots of ended streams were still held: it keeps
    /// ticking until they are released, then tells Envoy it is done.
    ending: bool,
    /// This VM's wake queue, once a notification named it.
    queue: Option<u32>,
}

impl Root {
    /// Takes up to `n` messages from the wake queue to the worker.
    fn dequeue(&self, n: usize) {
        let Some(queue_id) = self.queue else {
            return;
        };
        for _ in 0..n {
            match hostcalls::dequeue_shared_queue(queue_id) {
                Ok(Some(message)) => {
                    with_worker(&self.vm, |w| w.on_wake(&message, clock::now_ms()));
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!("dequeue from wake queue failed: {e:?}");
                    break;
                }
            }
        }
    }
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        let done = with_worker(&self.vm, |w| w.on_root_done(clock::now_ms())).unwrap_or(true);
        self.ending = !done;
        done
    }

    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let now = clock::now_ms();
        let ours = self
            .vm
            .try_borrow()
            .is_ok_and(|v| v.worker.as_ref().is_some_and(|w| w.awaits_poll(token)));
        if ours {
            let (status, body) = host::poll_answer(body_size);
            with_worker(&self.vm, |w| w.on_poll_answer(token, &status, body, now));
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        if let Ok(level) = hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
        let started = Worker::start(EnvoyHost).map_err(|e| e.to_string());
        match (started, self.vm.try_borrow_mut()) {
            (Ok(w), Ok(mut v)) => {
                v.worker = Some(w);
                true
            }
            (Err(e), _) => {
                log::error!("cannot register this worker VM: {e}");
                false
            }
            (Ok(_), Err(_)) => false,
        }
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let configured = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .map_err(|e| format!("cannot read the plugin configuration: {e:?}"))
            .and_then(|bytes| configure(&self.vm, &bytes.unwrap_or_default()));
        if let Err(e) = &configured {
            log::error!("{e}");
        }
        configured.is_ok()
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        // Envoy notifies once per message enqueued, so one dequeue per notification takes
        // every message (a second would only find the queue empty: one host call per grant
        // saved). The tick drains whatever a lost notification would leave.
        self.queue = Some(queue_id);
        self.dequeue(1);
    }

    fn on_tick(&mut self) {
        self.dequeue(usize::MAX);
        let may_end = with_worker(&self.vm, |w| {
            w.on_tick(clock::now_ms());
            w.may_end()
        });
        if self.ending && may_end.unwrap_or(true) {
            self.ending = false;
            if let Err(e) = hostcalls::done() {
                log::warn!("telling Envoy this root context is done failed: {e:?}");
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            context: context_id,
            vm: Rc::clone(&self.vm),
            response_complete: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Installs a plugin configuration: the worker validates and publishes it; then this VM's
/// metrics and tick follow it. On error nothing of the new configuration is used.
fn configure(vm: &SharedVm, bytes: &[u8]) -> Result<(), String> {
    let mut v = vm
        .try_borrow_mut()
        .map_err(|_| "the worker is busy".to_string())?;
    let v = &mut *v;
    let w = v.worker.as_mut().ok_or("this worker VM did not start")?;
    // The node's metadata is readable from the plugin's configure on (not at VM start).
    w.set_node(host::node_facts());
    let config = w
        .configure(bytes, clock::now_ms())
        .map_err(|e| e.to_string())?;
    v.metrics =
        metrics::Metrics::define(&config).map_err(|e| format!("cannot define metrics: {e:?}"))?;
    hostcalls::set_tick_period(Duration::from_millis(config.tick_ms))
        .map_err(|e| format!("cannot set the tick period: {e:?}"))
}

struct Stream {
    context: u32,
    vm: SharedVm,
    /// The upstream's response ended (end of stream seen): an admitted stream that ends
    /// without it keeps its slot a while (see `inflight_core::worker::ABANDONED_HOLD_MS`).
    response_complete: bool,
}

impl Stream {
    /// A paused request stays paused while its body arrives: returning Continue would make
    /// Envoy send the held headers upstream and bypass the limit. Envoy buffers the body (up to
    /// the connection's buffer limit) until the grant resumes the stream.
    fn hold_if_waiting(&self) -> Action {
        let waiting = self.vm.try_borrow().is_ok_and(|v| {
            v.worker
                .as_ref()
                .is_some_and(|w| w.is_waiting(self.context))
        });
        if waiting {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

impl Context for Stream {
    fn on_done(&mut self) -> bool {
        let (context, complete) = (self.context, self.response_complete);
        with_worker(&self.vm, |w| w.on_done(context, complete, clock::now_ms()));
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "fault-injection")]
        fault::maybe_crash();
        let context = self.context;
        let previous = IN_STREAM.replace(Some(context));
        let verdict = with_worker(&self.vm, |w| {
            w.on_request(context, &EnvoyRequest, clock::now_ms())
        });
        IN_STREAM.set(previous);
        match verdict {
            Some(inflight_core::Verdict::Pause) => Action::Pause,
            Some(inflight_core::Verdict::Reply(reply)) => {
                send_reply(&reply);
                Action::Pause
            }
            Some(inflight_core::Verdict::Report(body)) => {
                let headers = vec![("content-type", "application/json")];
                if let Err(e) = hostcalls::send_http_response(200, headers, Some(body.as_bytes())) {
                    log::warn!("answering a peer's report request failed: {e:?}");
                }
                Action::Pause
            }
            Some(inflight_core::Verdict::Continue) | None => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        self.hold_if_waiting()
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.hold_if_waiting()
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.response_complete |= end_of_stream;
        let context = self.context;
        with_worker(&self.vm, |w| w.on_response(context, &EnvoyResponse));
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        self.response_complete |= end_of_stream;
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.response_complete = true;
        Action::Continue
    }
}

// ---- applying the worker's effects to Envoy --------------------------------------------------

/// Header carrying the outcome on every local reply of the filter.
pub const SHED_HEADER: &str = "x-inflight-shed";

thread_local! {
    /// The stream whose request-headers callback runs now: Envoy made it the effective context,
    /// so effects on it need no `set_effective_context` (one host call less per request).
    static IN_STREAM: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Makes stream `context` the effective one unless it is already (`effective`, updated).
fn make_effective(
    effective: &mut Option<u32>,
    context: u32,
) -> Result<(), proxy_wasm::types::Status> {
    if *effective != Some(context) {
        hostcalls::set_effective_context(context)?;
        *effective = Some(context);
    }
    Ok(())
}

/// Applies `effects` in order. Holds no borrow of the VM while resuming or replying: both can
/// re-enter this VM (a resumed stream's body callback, say).
fn apply(vm: &SharedVm, effects: &mut Vec<Effect>) {
    // The effective context as far as known: the current stream's, until a call that may
    // re-enter Envoy (resume, reply, dispatch) leaves it unknown.
    let mut effective = IN_STREAM.get();
    for effect in effects.drain(..) {
        match effect {
            Effect::Route {
                context,
                header,
                endpoint,
            } => {
                let set = make_effective(&mut effective, context).and_then(|()| {
                    hostcalls::set_map_value(
                        MapType::HttpRequestHeaders,
                        &header,
                        endpoint.as_deref(),
                    )
                });
                if let Err(e) = set {
                    log::warn!("setting `{header}` on stream {context} failed: {e:?}");
                }
            }
            Effect::Resume { context } => {
                // A grant's header write just before made this stream effective already: one
                // host call per grant saved. Resuming may run other callbacks, so nothing is
                // assumed effective after it.
                let resumed = make_effective(&mut effective, context)
                    .and_then(|()| hostcalls::resume_http_request());
                effective = None;
                if resumed.is_err() {
                    // The stream ended without on_done reaching us yet.
                    with_worker(vm, |w| w.on_resume_failed(context, clock::now_ms()));
                }
            }
            Effect::Reply { context, reply } => {
                effective = None;
                if hostcalls::set_effective_context(context).is_ok() {
                    send_reply(&reply);
                }
            }
            Effect::Poll(request) => {
                effective = None;
                let sent = dispatch(&request);
                with_worker(vm, |w| w.on_poll_dispatched(request.kind, sent));
            }
            Effect::PeerCall {
                cluster,
                header,
                peer,
                timeout_ms,
            } => {
                effective = None;
                let headers = vec![
                    (":method", "GET"),
                    (":path", inflight_core::fleet::REPORT_PATH),
                    (":authority", "inflight-fleet"),
                    (&*header, peer.as_str()),
                ];
                let sent = hostcalls::dispatch_http_call(
                    &cluster,
                    headers,
                    None,
                    vec![],
                    Duration::from_millis(timeout_ms),
                )
                .map_err(|e| format!("dispatch to cluster `{cluster}` failed: {e:?}"));
                with_worker(vm, |w| w.on_peer_dispatched(&peer, sent, clock::now_ms()));
            }
            Effect::Forward {
                context,
                header,
                peer,
            } => {
                let set = make_effective(&mut effective, context).and_then(|()| {
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, &header, peer.as_deref())
                });
                if let Err(e) = set {
                    log::warn!("setting `{header}` on stream {context} failed: {e:?}");
                }
                clear_route_cache();
            }
            other => {
                if let Ok(v) = vm.try_borrow() {
                    v.metrics.apply(&other);
                }
            }
        }
    }
}

/// Makes Envoy pick the route again (after the forward header changed): Envoy ≥ 1.33 offers
/// the foreign function `clear_route_cache`; older ones clear the cache on every header change.
fn clear_route_cache() {
    if let Err(e) = hostcalls::call_foreign_function("clear_route_cache", None) {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            log::warn!("clear_route_cache is not available ({e:?}); relying on Envoy clearing the route cache when headers change");
        }
    }
}

/// Sends the gateway's own reply on the current (effective) stream.
fn send_reply(reply: &Reply) {
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
        (":path", r.path.as_str()),
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
