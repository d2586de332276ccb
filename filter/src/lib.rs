//! inflight-filter: the proxy-wasm adapter that puts inflight-core in Envoy's HTTP filter chain.
//!
//! Each Envoy worker thread runs one VM of this module. A VM holds its configuration, the
//! streams it has paused or admitted, and its metric ids; everything the workers must agree on
//! (in-flight counts and the FIFO of waiters per revision) lives in shared data ([`shared`]).
//! Callbacks read their inputs, ask `inflight-core`, and apply the answer:
//!
//! - request headers: find the revision, `try_admit` → continue, pause (ticket) or 503;
//! - stream done: release the slot (or cancel the ticket) and hand freed slots to the oldest
//!   waiters, through the owner VM's wake queue;
//! - queue ready: resume the granted stream, or pass the slot on if the stream is gone;
//! - tick: shed waiters past their maximum wait, refresh gauges, grant slots when capacity grew,
//!   reap waiters whose VM died.

mod clock;
mod metrics;
mod shared;

use inflight_core::wake::Wake;
use inflight_core::{
    Admission, Config, Grant, Limits, Owner, RevisionId, ShedReason, UnknownRevision,
};
use metrics::RevisionMetrics;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, Status};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

/// Header carrying the shed reason on every local reply of the filter.
pub const SHED_HEADER: &str = "x-inflight-shed";
/// Bound on slot hand-overs in one delivery (each failed hand-over releases to the next waiter).
const MAX_HANDOVERS: usize = 10_000;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// What this VM knows about one of its streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Waiting {
        rev: RevisionId,
        ticket: u64,
        since_ms: u64,
    },
    Admitted {
        rev: RevisionId,
    },
}

struct Revision {
    key: String,
    metrics: RevisionMetrics,
}

#[derive(Default)]
struct Vm {
    id: u32,
    queue: u32,
    config: Option<Rc<Config>>,
    revisions: Vec<Revision>,
    streams: HashMap<u32, StreamState>,
    wake_tokens: HashMap<u32, u32>,
}

impl Vm {
    fn limits(&self, rev: RevisionId) -> Limits {
        match self.config.as_ref().and_then(|c| c.revision(rev)) {
            Some(r) => r.limits(r.ready_replicas),
            // Unreachable with ids from this config; fail safe: no capacity, no buffer.
            None => Limits {
                capacity: Some(0),
                buffer: 0,
            },
        }
    }

    fn revision(&self, rev: RevisionId) -> Option<&Revision> {
        self.revisions.get(rev.0)
    }
}

type SharedVm = Rc<RefCell<Vm>>;

#[derive(Default)]
struct Root {
    vm: SharedVm,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_queue_ready(&mut self, queue_id: u32) {
        loop {
            let bytes = match hostcalls::dequeue_shared_queue(queue_id) {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("dequeue from wake queue failed: {e:?}");
                    break;
                }
            };
            match Wake::decode(&bytes) {
                Ok(w) => on_wake(&self.vm, w),
                Err(e) => log::warn!("inflight: {e}"),
            }
        }
    }
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        match shared::register_vm() {
            Ok((id, queue)) => {
                let mut vm = self.vm.borrow_mut();
                vm.id = id;
                vm.queue = queue;
                log::debug!("worker VM {id} registered wake queue {queue}");
                true
            }
            Err(e) => {
                log::error!("cannot register this worker VM: {e}");
                false
            }
        }
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                log::error!("cannot read the plugin configuration: {e:?}");
                return false;
            }
        };
        let config = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("inflight: {e}");
                return false;
            }
        };
        let mut revisions = Vec::with_capacity(config.revisions.len());
        for r in &config.revisions {
            let key = shared::state_key(&r.name);
            if let Err(e) =
                shared::create_if_absent(&key, &inflight_core::RevisionState::default().encode())
            {
                log::error!("cannot create shared state for revision `{}`: {e}", r.name);
                return false;
            }
            match RevisionMetrics::define(&r.name) {
                Ok(metrics) => revisions.push(Revision { key, metrics }),
                Err(e) => {
                    log::error!("cannot define metrics for revision `{}`: {e:?}", r.name);
                    return false;
                }
            }
        }
        if let Err(e) = hostcalls::set_tick_period(std::time::Duration::from_millis(config.tick_ms))
        {
            log::error!("cannot set the tick period: {e:?}");
            return false;
        }
        log::info!(
            "configured {} revision(s): {}",
            config.revisions.len(),
            config
                .revisions
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut vm = self.vm.borrow_mut();
        vm.config = Some(Rc::new(config));
        vm.revisions = revisions;
        true
    }

    fn on_tick(&mut self) {
        on_tick(&self.vm, clock::now_ms());
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            context: context_id,
            vm: Rc::clone(&self.vm),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    context: u32,
    vm: SharedVm,
}

impl Context for Stream {
    fn on_done(&mut self) -> bool {
        let now = clock::now_ms();
        let state = self.vm.borrow_mut().streams.remove(&self.context);
        match state {
            Some(StreamState::Admitted { rev }) => release(&self.vm, rev, now),
            Some(StreamState::Waiting { rev, ticket, .. }) => {
                let vm = self.vm.borrow();
                let Some(r) = vm.revision(rev) else {
                    return true;
                };
                metrics::count(r.metrics.cancelled);
                // Not found means a grant is on its way here; on_wake will pass it on.
                if let Err(e) = shared::update_state(&r.key, |s| s.cancel(ticket)) {
                    log::error!("cancelling ticket {ticket} failed: {e}");
                }
            }
            None => {}
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let now = clock::now_ms();
        let Some(config) = self.vm.borrow().config.clone() else {
            // Envoy does not create streams for a VM whose configuration failed.
            return Action::Continue;
        };
        let Some(rev) = identify(&config) else {
            return match config.unknown_revision {
                UnknownRevision::PassThrough => Action::Continue,
                UnknownRevision::Reject => {
                    local_reply(
                        404,
                        "unknown-revision",
                        None,
                        "no revision matches this request\n",
                    );
                    Action::Pause
                }
            };
        };
        let (key, limits, owner) = {
            let vm = self.vm.borrow();
            let Some(r) = vm.revision(rev) else {
                return Action::Continue;
            };
            (
                r.key.clone(),
                vm.limits(rev),
                Owner {
                    vm: vm.id,
                    context: self.context,
                },
            )
        };
        let name = config.revision(rev).map(|r| r.name.as_str()).unwrap_or("?");
        match shared::update_state(&key, |s| s.try_admit(limits, owner, now)) {
            Ok(Admission::Admitted) => {
                let mut vm = self.vm.borrow_mut();
                vm.streams
                    .insert(self.context, StreamState::Admitted { rev });
                if let Some(r) = vm.revision(rev) {
                    metrics::count(r.metrics.admitted);
                }
                Action::Continue
            }
            Ok(Admission::Queued { ticket }) => {
                self.vm.borrow_mut().streams.insert(
                    self.context,
                    StreamState::Waiting {
                        rev,
                        ticket,
                        since_ms: now,
                    },
                );
                Action::Pause
            }
            Ok(Admission::Shed(reason)) => {
                if let Some(r) = self.vm.borrow().revision(rev) {
                    metrics::count(r.metrics.shed_full);
                }
                let body = format!(
                    "revision {name} is at capacity ({}) and its buffer ({}) is full; retry later\n",
                    limits.capacity.map_or("unlimited".into(), |c| c.to_string()),
                    limits.buffer
                );
                local_reply(503, reason.as_str(), Some(config.retry_after_s), &body);
                Action::Pause
            }
            Err(e) => {
                log::error!("admission for revision `{name}` failed: {e}");
                local_reply(
                    503,
                    "state-unavailable",
                    Some(config.retry_after_s),
                    "gateway state unavailable; retry later\n",
                );
                Action::Pause
            }
        }
    }
}

/// The revision of the current request: `:authority`, then the revision header, then the
/// upstream cluster.
fn identify(config: &Config) -> Option<RevisionId> {
    if let Ok(Some(authority)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":authority")
    {
        if let Some(id) = config.table.match_host(&authority) {
            return Some(id);
        }
    }
    if let Some(header) = &config.revision_header {
        if let Ok(Some(name)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, header) {
            if let Some(id) = config.table.match_name(name.trim()) {
                return Some(id);
            }
        }
    }
    if config.table.has_clusters() {
        if let Ok(Some(bytes)) = hostcalls::get_property(vec!["xds", "cluster_name"]) {
            if let Ok(cluster) = std::str::from_utf8(&bytes) {
                return config.table.match_cluster(cluster);
            }
        }
    }
    None
}

/// Sends the filter's local reply for the current (effective) stream.
fn local_reply(status: u32, reason: &str, retry_after_s: Option<u64>, body: &str) {
    let retry;
    let mut headers = vec![(SHED_HEADER, reason), ("content-type", "text/plain")];
    if let Some(s) = retry_after_s {
        retry = s.to_string();
        headers.push(("retry-after", retry.as_str()));
    }
    if let Err(e) = hostcalls::send_http_response(status, headers, Some(body.as_bytes())) {
        log::error!("sending the {status} reply failed: {e:?}");
    }
}

/// A slot of `rev` frees: release it and hand what follows to the oldest waiters.
fn release(vm: &SharedVm, rev: RevisionId, now: u64) {
    let (key, limits) = {
        let v = vm.borrow();
        let Some(r) = v.revision(rev) else { return };
        (r.key.clone(), v.limits(rev))
    };
    match shared::update_state(&key, |s| s.release(limits, now)) {
        Ok(grants) => deliver(vm, rev, grants, now),
        Err(e) => log::error!("releasing a slot of `{key}` failed (slot leaked): {e}"),
    }
}

/// Sends each grant to its owner's wake queue. A grant that cannot be delivered (owner VM
/// gone) is released at once, which grants the next ticket.
fn deliver(vm: &SharedVm, rev: RevisionId, grants: Vec<Grant>, now: u64) {
    if grants.is_empty() {
        return;
    }
    let Some(config) = vm.borrow().config.clone() else {
        return;
    };
    let Some(name) = config.revision(rev).map(|r| r.name.clone()) else {
        return;
    };
    let mut pending: VecDeque<Grant> = grants.into();
    let mut handovers = 0;
    while let Some(g) = pending.pop_front() {
        let message = Wake {
            revision: name.clone(),
            ticket: g.ticket,
            context: g.owner.context,
        }
        .encode();
        let token = wake_token(vm, g.owner.vm);
        let sent = match token {
            Some(t) => hostcalls::enqueue_shared_queue(t, Some(&message)),
            None => Err(Status::NotFound),
        };
        if let Err(e) = sent {
            log::warn!(
                "worker VM {} unreachable ({e:?}); passing ticket {}'s slot on",
                g.owner.vm,
                g.ticket
            );
            handovers += 1;
            if handovers > MAX_HANDOVERS {
                log::error!("too many unreachable waiters of `{name}`; stopping hand-over");
                return;
            }
            let (key, limits) = {
                let v = vm.borrow();
                let Some(r) = v.revision(rev) else { return };
                (r.key.clone(), v.limits(rev))
            };
            match shared::update_state(&key, |s| s.release(limits, now)) {
                Ok(more) => pending.extend(more),
                Err(e) => log::error!("passing a slot of `{key}` on failed: {e}"),
            }
        }
    }
}

fn wake_token(vm: &SharedVm, owner: u32) -> Option<u32> {
    if let Some(t) = vm.borrow().wake_tokens.get(&owner) {
        return Some(*t);
    }
    let token = shared::wake_token(owner).ok().flatten()?;
    vm.borrow_mut().wake_tokens.insert(owner, token);
    Some(token)
}

/// A grant arrived for one of this VM's streams.
fn on_wake(vm: &SharedVm, w: Wake) {
    let now = clock::now_ms();
    let Some(config) = vm.borrow().config.clone() else {
        return;
    };
    let Some(rev) = config.table.match_name(&w.revision) else {
        log::warn!("grant for unknown revision `{}` dropped", w.revision);
        return;
    };
    let waiting = vm.borrow().streams.get(&w.context).copied();
    match waiting {
        Some(StreamState::Waiting {
            rev: r,
            ticket,
            since_ms,
        }) if r == rev && ticket == w.ticket => {
            {
                let mut v = vm.borrow_mut();
                v.streams.insert(w.context, StreamState::Admitted { rev });
                if let Some(r) = v.revision(rev) {
                    metrics::count(r.metrics.admitted);
                    metrics::record(r.metrics.queue_wait_ms, now.saturating_sub(since_ms));
                }
            }
            let resumed = hostcalls::set_effective_context(w.context)
                .and_then(|()| hostcalls::resume_http_request());
            if let Err(e) = resumed {
                // The stream ended without on_done reaching us yet; its slot goes to the next.
                log::debug!("resuming stream {} failed: {e:?}", w.context);
                vm.borrow_mut().streams.remove(&w.context);
                release(vm, rev, now);
            }
        }
        _ => release(vm, rev, now),
    }
}

fn on_tick(vm: &SharedVm, now: u64) {
    let Some(config) = vm.borrow().config.clone() else {
        return;
    };
    // 1. Shed this VM's waiters past their maximum wait.
    let expired: Vec<(u32, RevisionId, u64)> = vm
        .borrow()
        .streams
        .iter()
        .filter_map(|(ctx, s)| match *s {
            StreamState::Waiting {
                rev,
                ticket,
                since_ms,
            } => {
                let max_wait = config.revision(rev)?.max_wait_ms;
                (now.saturating_sub(since_ms) >= max_wait).then_some((*ctx, rev, ticket))
            }
            StreamState::Admitted { .. } => None,
        })
        .collect();
    for (ctx, rev, ticket) in expired {
        let Some(key) = vm.borrow().revision(rev).map(|r| r.key.clone()) else {
            continue;
        };
        match shared::update_state(&key, |s| s.cancel(ticket)) {
            Ok(Some(_)) => {
                let metric = {
                    let mut v = vm.borrow_mut();
                    v.streams.remove(&ctx);
                    v.revision(rev).map(|r| r.metrics.shed_timeout)
                };
                if let Some(m) = metric {
                    metrics::count(m);
                }
                let name = config.revision(rev).map(|r| r.name.as_str()).unwrap_or("?");
                let wait = config.revision(rev).map(|r| r.max_wait_ms).unwrap_or(0);
                if hostcalls::set_effective_context(ctx).is_ok() {
                    let body = format!(
                        "revision {name} had no free slot within the maximum wait ({}); retry later\n",
                        inflight_core::duration::format_ms(wait)
                    );
                    local_reply(
                        503,
                        ShedReason::WaitTimeout.as_str(),
                        Some(config.retry_after_s),
                        &body,
                    );
                }
            }
            // A grant is on its way; on_wake resumes the stream.
            Ok(None) => {}
            Err(e) => log::error!("expiring ticket {ticket} failed: {e}"),
        }
    }
    // 2. Gauges, grants after capacity grew, and waiters whose VM died.
    for (i, rc) in config.revisions.iter().enumerate() {
        let rev = RevisionId(i);
        let (key, m, limits) = {
            let v = vm.borrow();
            let Some(r) = v.revision(rev) else { continue };
            (r.key.clone(), r.metrics.clone(), v.limits(rev))
        };
        let state = match shared::read_state(&key) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("reading `{key}` failed: {e}");
                continue;
            }
        };
        metrics::record(m.active, u64::from(state.active));
        metrics::record(m.queued, u64::from(state.queued()));
        metrics::record(m.capacity, limits.capacity.map_or(0, u64::from));
        // An owner sheds its own waiters at max wait; one still here long after is orphaned.
        let orphan_age = rc
            .max_wait_ms
            .saturating_add(config.tick_ms.saturating_mul(20))
            .max(rc.max_wait_ms + 5_000);
        let has_orphans = state
            .waiters()
            .any(|w| now.saturating_sub(w.since_ms) > orphan_age);
        let room = limits.capacity.is_none_or(|c| state.active < c);
        if state.queued() > 0 && (room || has_orphans) {
            match shared::update_state(&key, |s| {
                let reaped = s.reap(now, orphan_age);
                (reaped.len(), s.grant_ready(limits, now))
            }) {
                Ok((reaped, grants)) => {
                    if reaped > 0 {
                        log::warn!("reaped {reaped} orphaned waiter(s) of `{}`", rc.name);
                    }
                    deliver(vm, rev, grants, now);
                }
                Err(e) => log::warn!("granting on tick for `{key}` failed: {e}"),
            }
        }
    }
}
