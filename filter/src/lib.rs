//! inflight-filter: the proxy-wasm adapter that puts inflight-core in Envoy's HTTP filter chain.
//!
//! Each Envoy worker thread runs one VM of this module. A VM holds its configuration, the
//! streams it has paused or admitted, and its metric ids; everything the workers must agree on
//! (in-flight counts, the FIFO of waiters, demand, learned ready replicas, the autoscaler) lives
//! in shared data ([`shared`]). Callbacks read their inputs, ask `inflight-core`, and apply the
//! answer:
//!
//! - request headers: find the revision, `try_admit` → continue, pause (ticket) or 503;
//! - stream done: release the slot (or cancel the ticket) and hand freed slots to the oldest
//!   waiters, through the owner VM's wake queue;
//! - queue ready: resume the granted stream, or pass the slot on if the stream is gone;
//! - tick: shed waiters past their maximum wait, export demand, step the autoscaler, refresh
//!   gauges, grant slots when capacity grew, reap waiters whose VM died, poll membership;
//! - membership answer: record ready replicas (capacity follows) and grant what now fits.

mod clock;
#[cfg(feature = "fault-injection")]
mod fault;
mod metrics;
mod shared;

use inflight_core::autoscaler::{Autoscaler, Observation, DEFAULT_DECISION_PERIOD_MS};
use inflight_core::kpa::Reason;
use inflight_core::membership;
use inflight_core::wake::Wake;
use inflight_core::{
    Admission, Config, Grant, Limits, Owner, RevisionConfig, RevisionId, RevisionState, ShedReason,
    UnknownRevision,
};
use metrics::RevisionMetrics;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, Status};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// Header carrying the shed reason on every local reply of the filter.
pub const SHED_HEADER: &str = "x-inflight-shed";
/// Bound on slot hand-overs in one delivery (each failed hand-over releases to the next waiter).
const MAX_HANDOVERS: usize = 10_000;
/// How long the slot of a stream that ended before its response stays held (see `on_done`).
const ABANDONED_HOLD_MS: u64 = 20;
/// Host matches per revision whose upstream cluster a VM records (see [`identify`]).
const LEARN_SAMPLES: u8 = 32;

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
    config: Rc<RevisionConfig>,
    /// Generation of the configuration this VM runs (a reload makes a newer one).
    generation: u64,
    key: String,
    kpa_key: String,
    metrics: RevisionMetrics,
}

impl Revision {
    /// Limits from the shared state: the newest configuration's parameters (after a reload,
    /// VMs of the old one apply the new limits too), with ready replicas learned from Envoy.
    fn limits(&self, s: &RevisionState) -> Limits {
        let p = s.limit_params(self.generation, self.config.limit_params());
        p.limits(s.ready().unwrap_or(p.ready_replicas))
    }
}

#[derive(Default)]
struct Vm {
    id: u32,
    config: Option<Rc<Config>>,
    revisions: Vec<Rc<Revision>>,
    /// Streams that waited (paused, or granted and resumed), by context id: a grant arrives at
    /// the root context and must find them. A stream admitted at once keeps its state in its own
    /// context ([`Stream::admitted`]): no map work on the uncontended path.
    streams: HashMap<u32, StreamState>,
    wake_tokens: HashMap<u32, u32>,
    /// Metric id of membership poll failures.
    poll_failures: Option<u32>,
    /// Token of the membership call in flight, if this VM made it.
    poll_token: Option<u32>,
    last_desired: HashMap<usize, u32>,
    /// Per revision: other VMs that held slots or waiters at the last tick.
    seen: HashMap<usize, Vec<u32>>,
    /// Slots of streams that ended before their response, with when: released once
    /// `ABANDONED_HOLD_MS` passed (see `on_done`).
    abandoned: Vec<(RevisionId, u64)>,
    /// Clusters this VM recorded behind host matches: `Some(rev)`, or `None` once found
    /// ambiguous (so each is written to shared data once). See [`identify`].
    learned_clusters: HashMap<String, Option<RevisionId>>,
    /// Per revision index: host matches whose cluster was recorded so far.
    learn_samples: Vec<u8>,
}

impl Vm {
    fn revision(&self, rev: RevisionId) -> Option<Rc<Revision>> {
        self.revisions.get(rev.0).cloned()
    }
}

type SharedVm = Rc<RefCell<Vm>>;

#[derive(Default)]
struct Root {
    vm: SharedVm,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        on_membership(&self.vm, token, body_size, clock::now_ms());
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        match shared::register_vm() {
            Ok((id, queue)) => {
                self.vm.borrow_mut().id = id;
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
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                log::error!("cannot read the plugin configuration: {e:?}");
                return false;
            }
        };
        let config = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        let generation = match shared::config_generation(&bytes) {
            Ok(g) => g,
            Err(e) => {
                log::error!("cannot record the configuration generation: {e}");
                return false;
            }
        };
        let mut revisions = Vec::with_capacity(config.revisions.len());
        for r in &config.revisions {
            let key = shared::state_key(&r.name);
            let kpa_key = shared::autoscaler_key(&r.name);
            if let Err(e) = shared::create_if_absent(&key, &RevisionState::default().encode()) {
                log::error!("cannot create shared state for revision `{}`: {e}", r.name);
                return false;
            }
            let metrics = match RevisionMetrics::define(&r.name) {
                Ok(m) => m,
                Err(e) => {
                    log::error!("cannot define metrics for revision `{}`: {e:?}", r.name);
                    return false;
                }
            };
            let params = r.limit_params();
            if let Err(e) = shared::update_state(&key, |s| s.publish(generation, params)) {
                log::error!("cannot publish the limits of revision `{}`: {e}", r.name);
                return false;
            }
            revisions.push(Rc::new(Revision {
                config: Rc::new(r.clone()),
                generation,
                key,
                kpa_key,
                metrics,
            }));
        }
        let poll_failures = match metrics::define_poll_failures() {
            Ok(id) => Some(id),
            Err(e) => {
                log::error!("cannot define the membership metric: {e:?}");
                return false;
            }
        };
        if let Err(e) = hostcalls::set_tick_period(Duration::from_millis(config.tick_ms)) {
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
        vm.learned_clusters.clear();
        vm.learn_samples.clear();
        if let Err(e) = shared::beat(vm.id, clock::now_ms()) {
            log::warn!("heartbeat failed: {e}");
        }
        vm.config = Some(Rc::new(config));
        vm.revisions = revisions;
        vm.poll_failures = poll_failures;
        true
    }

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
                Ok(Wake::Grant {
                    revision,
                    ticket,
                    context,
                }) => on_grant(&self.vm, &revision, ticket, context),
                // Sent by builds before abandoned slots were held for ABANDONED_HOLD_MS (a
                // reload can run both side by side).
                Ok(Wake::Release { revision }) => on_deferred_release(&self.vm, &revision),
                Err(e) => log::warn!("{e}"),
            }
        }
    }

    fn on_tick(&mut self) {
        on_tick(&self.vm, clock::now_ms());
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            context: context_id,
            vm: Rc::clone(&self.vm),
            admitted: None,
            response_complete: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    context: u32,
    vm: SharedVm,
    /// Admitted at once (without waiting): the revision whose slot this stream holds.
    admitted: Option<RevisionId>,
    /// The upstream's response ended (end of stream seen); see `on_done`.
    response_complete: bool,
}

impl Context for Stream {
    fn on_done(&mut self) -> bool {
        let now = clock::now_ms();
        release_abandoned(&self.vm, now);
        let state = match self.admitted.take() {
            Some(rev) => Some(StreamState::Admitted { rev }),
            None => self.vm.borrow_mut().streams.remove(&self.context),
        };
        match state {
            // A stream that ends before its response did (client left, reset) still has an
            // upstream request open: Envoy destroys filters in chain order, so the router resets
            // it only after this callback, and the upstream connection closes later still.
            // Releasing now (or one event-loop turn later, measured: 1–2 violations in 6 000
            // requests with 30 % leavers under CPU contention) lets the next request reach the
            // upstream first, limit + 1 there. Hold the slot ABANDONED_HOLD_MS instead.
            Some(StreamState::Admitted { rev }) if !self.response_complete => {
                self.vm.borrow_mut().abandoned.push((rev, now));
            }
            Some(StreamState::Admitted { rev }) => release(&self.vm, rev, now),
            Some(StreamState::Waiting { rev, ticket, .. }) => {
                let Some(r) = self.vm.borrow().revision(rev) else {
                    return true;
                };
                metrics::count(r.metrics.cancelled);
                // Not found means a grant is on its way here; on_wake will pass it on.
                if let Err(e) = shared::update_state(&r.key, |s| s.cancel(ticket, now)) {
                    log::error!("cancelling ticket {ticket} failed: {e}");
                }
            }
            None => {}
        }
        true
    }
}

impl Stream {
    fn waiting(&self) -> bool {
        self.admitted.is_none()
            && matches!(
                self.vm.borrow().streams.get(&self.context),
                Some(StreamState::Waiting { .. })
            )
    }
}

impl HttpContext for Stream {
    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.response_complete |= end_of_stream;
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

    /// A paused request stays paused while its body arrives: returning Continue here would make
    /// Envoy send the held headers upstream and bypass the limit. Envoy buffers the body (up to
    /// the connection's buffer limit) until the grant resumes the stream.
    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        if self.waiting() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.waiting() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let now = clock::now_ms();
        release_abandoned(&self.vm, now);
        #[cfg(feature = "fault-injection")]
        fault::maybe_crash();
        let Some(config) = self.vm.borrow().config.clone() else {
            // Envoy does not create streams for a VM whose configuration failed.
            return Action::Continue;
        };
        let Some(rev) = identify(&self.vm, &config) else {
            return match config.unknown_revision {
                UnknownRevision::PassThrough => Action::Continue,
                UnknownRevision::Reject => {
                    local_reply(
                        404,
                        "unknown-revision",
                        None,
                        "inflight: no revision matches this request\n",
                    );
                    Action::Pause
                }
            };
        };
        let (r, owner) = {
            let vm = self.vm.borrow();
            let Some(r) = vm.revision(rev) else {
                return Action::Continue;
            };
            (
                r,
                Owner {
                    vm: vm.id,
                    context: self.context,
                },
            )
        };
        let outcome = shared::update_state(&r.key, |s| {
            let limits = r.limits(s);
            (s.try_admit(limits, owner, now), limits)
        });
        match outcome {
            Ok((Admission::Admitted, _)) => {
                self.admitted = Some(rev);
                metrics::count(r.metrics.admitted);
                Action::Continue
            }
            Ok((Admission::Queued { ticket }, _)) => {
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
            Ok((Admission::Shed(reason), limits)) => {
                metrics::count(r.metrics.shed_full);
                let body = format!(
                    "inflight: revision {} is at capacity ({}) and its buffer ({}) is full; retry later\n",
                    r.config.name,
                    limits.capacity.map_or("unlimited".into(), |c| c.to_string()),
                    limits.buffer
                );
                local_reply(503, reason.as_str(), Some(config.retry_after_s), &body);
                Action::Pause
            }
            Err(e) => {
                log::error!("admission for revision `{}` failed: {e}", r.config.name);
                local_reply(
                    503,
                    "state-unavailable",
                    Some(config.retry_after_s),
                    "inflight: gateway state unavailable; retry later\n",
                );
                Action::Pause
            }
        }
    }
}

/// The revision of the current request: `:authority`, then the upstream cluster, then the
/// revision header.
///
/// Host and cluster decide where Envoy actually routes the request, so they come first; the
/// header is a last resort for gateways that name the revision themselves (an earlier filter
/// must set it, overwriting any client copy, or a client could pick another revision's limit).
///
/// A client picks the authority, Envoy the cluster. So that an authority matching no host (too
/// long, odd, or simply unlisted) cannot go around the limit through a catch-all route even
/// when the configuration lists no clusters, VMs record in shared data the cluster behind the
/// first `LEARN_SAMPLES` host matches of every revision (each VM), and a request whose host
/// matches nothing is counted for the revision whose cluster Envoy routed it to. A cluster seen
/// behind two revisions' hosts is ambiguous and not used.
fn identify(vm: &SharedVm, config: &Config) -> Option<RevisionId> {
    if let Ok(Some(authority)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":authority")
    {
        if let Some(id) = config.table.match_host(&authority) {
            learn_cluster(vm, config, id);
            return Some(id);
        }
    }
    if let Some(cluster) = current_cluster() {
        if let Some(id) = config.table.match_cluster(&cluster) {
            return Some(id);
        }
        if let Some(id) = learned_cluster(config, &cluster) {
            return Some(id);
        }
    }
    if let Some(header) = &config.revision_header {
        if let Ok(Some(name)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, header) {
            return config.table.match_name(name.trim());
        }
    }
    None
}

/// The Envoy cluster the current request is routed to.
fn current_cluster() -> Option<String> {
    let bytes = hostcalls::get_property(vec!["xds", "cluster_name"]).ok()??;
    String::from_utf8(bytes).ok()
}

/// The revision recorded for `cluster` by host matches (of any VM). One shared read, only for
/// requests whose host matched nothing; not cached, so a cluster found ambiguous later by
/// another VM stops counting at once.
fn learned_cluster(config: &Config, cluster: &str) -> Option<RevisionId> {
    let name = shared::cluster_revision(cluster).ok()??;
    config.table.match_name(&name)
}

/// Records the cluster of the current request, whose host matched `rev` (see [`identify`]).
fn learn_cluster(vm: &SharedVm, config: &Config, rev: RevisionId) {
    {
        let mut v = vm.borrow_mut();
        if v.learn_samples.len() <= rev.0 {
            v.learn_samples.resize(rev.0 + 1, 0);
        }
        match v.learn_samples.get_mut(rev.0) {
            Some(n) if *n < LEARN_SAMPLES => *n += 1,
            _ => return,
        }
    }
    let Some(cluster) = current_cluster() else {
        return;
    };
    let Some(name) = config.revision(rev).map(|r| r.name.clone()) else {
        return;
    };
    // Already recorded by this VM for this revision, or known ambiguous: nothing to write.
    if matches!(vm.borrow().learned_clusters.get(&cluster), Some(known) if known.is_none_or(|r| r == rev))
    {
        return;
    }
    match shared::record_cluster_revision(&cluster, &name) {
        Ok(shared::ClusterRecord::New) => {
            log::info!(
                "revision `{name}`: its hosts route to cluster `{cluster}`; requests routed there whose host matches no revision count for it too"
            );
            vm.borrow_mut().learned_clusters.insert(cluster, Some(rev));
        }
        Ok(shared::ClusterRecord::Same) => {
            vm.borrow_mut().learned_clusters.insert(cluster, Some(rev));
        }
        Ok(shared::ClusterRecord::Ambiguous { first }) => {
            if let Some(first) = first {
                log::warn!(
                    "cluster `{cluster}` serves hosts of revisions `{first}` and `{name}`; requests routed there whose host matches no revision are not counted by cluster"
                );
            }
            vm.borrow_mut().learned_clusters.insert(cluster, None);
        }
        Err(e) => log::debug!("recording cluster `{cluster}` failed: {e}"),
    }
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
    let Some(r) = vm.borrow().revision(rev) else {
        return;
    };
    let me = vm.borrow().id;
    match shared::update_state(&r.key, |s| {
        let limits = r.limits(s);
        s.release(me, limits, now)
    }) {
        Ok(grants) => deliver(vm, &r, grants, now),
        Err(e) => log::error!("releasing a slot of `{}` failed (slot leaked): {e}", r.key),
    }
}

/// Sends each grant to its owner's wake queue. A grant that cannot be delivered (owner VM
/// gone) is released at once, which grants the next ticket.
fn deliver(vm: &SharedVm, r: &Revision, grants: Vec<Grant>, now: u64) {
    let mut pending: VecDeque<Grant> = grants.into();
    let mut handovers = 0;
    while let Some(g) = pending.pop_front() {
        let message = Wake::Grant {
            revision: r.config.name.clone(),
            ticket: g.ticket,
            context: g.owner.context,
        }
        .encode();
        let sent = match wake_token(vm, g.owner.vm) {
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
                log::error!(
                    "too many unreachable waiters of `{}`; stopping hand-over",
                    r.config.name
                );
                return;
            }
            // The slot was counted as the unreachable owner's: give it back in its name.
            match shared::update_state(&r.key, |s| {
                let limits = r.limits(s);
                s.release(g.owner.vm, limits, now)
            }) {
                Ok(more) => pending.extend(more),
                Err(e) => log::error!("passing a slot of `{}` on failed: {e}", r.key),
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
fn on_grant(vm: &SharedVm, revision: &str, ticket: u64, context: u32) {
    let now = clock::now_ms();
    let Some(config) = vm.borrow().config.clone() else {
        return;
    };
    let Some(rev) = config.table.match_name(revision) else {
        log::warn!("grant for unknown revision `{revision}` dropped");
        return;
    };
    let Some(r) = vm.borrow().revision(rev) else {
        return;
    };
    let waiting = vm.borrow().streams.get(&context).copied();
    match waiting {
        Some(StreamState::Waiting {
            rev: wr,
            ticket: t,
            since_ms,
        }) if wr == rev && t == ticket => {
            vm.borrow_mut()
                .streams
                .insert(context, StreamState::Admitted { rev });
            metrics::count(r.metrics.admitted);
            metrics::record(r.metrics.queue_wait_ms, now.saturating_sub(since_ms));
            let resumed = hostcalls::set_effective_context(context)
                .and_then(|()| hostcalls::resume_http_request());
            if let Err(e) = resumed {
                // The stream ended without on_done reaching us yet; its slot goes to the next.
                log::debug!("resuming stream {} failed: {e:?}", context);
                vm.borrow_mut().streams.remove(&context);
                release(vm, rev, now);
            }
        }
        _ => release(vm, rev, now),
    }
}

/// Releases the slots of abandoned streams (see `on_done`) held for `ABANDONED_HOLD_MS`.
/// Runs at every request, stream end and tick of this VM, so a slot is held at most until the
/// first of them after that time.
fn release_abandoned(vm: &SharedVm, now: u64) {
    let due: Vec<RevisionId> = {
        let mut v = vm.borrow_mut();
        if v.abandoned.is_empty() {
            return;
        }
        let mut due = Vec::new();
        v.abandoned.retain(|(rev, since)| {
            let ripe = now.saturating_sub(*since) >= ABANDONED_HOLD_MS;
            if ripe {
                due.push(*rev);
            }
            !ripe
        });
        due
    };
    for rev in due {
        release(vm, rev, now);
    }
}

fn on_deferred_release(vm: &SharedVm, revision: &str) {
    let Some(config) = vm.borrow().config.clone() else {
        return;
    };
    match config.table.match_name(revision) {
        Some(rev) => release(vm, rev, clock::now_ms()),
        None => log::warn!("deferred release for unknown revision `{revision}` dropped"),
    }
}

fn on_tick(vm: &SharedVm, now: u64) {
    let Some(config) = vm.borrow().config.clone() else {
        return;
    };
    let me = vm.borrow().id;
    release_abandoned(vm, now);
    if let Err(e) = shared::beat(me, now) {
        log::warn!("heartbeat failed: {e}");
    }
    expire_waiters(vm, &config, now);
    let revisions = vm.borrow().revisions.clone();
    for (i, r) in revisions.iter().enumerate() {
        tick_revision(vm, &config, i, r, now);
    }
    poll_membership(vm, &config, now);
}

/// Sheds this VM's waiters that reached their maximum wait.
///
/// A waiter whose ticket is no longer queued normally has a grant on its way (it arrives within
/// an event-loop turn). If none came by the next tick, the grant was passed on (its wake could
/// not be delivered): shed it too, so no client hangs; a grant arriving later finds no stream
/// and passes its slot on.
fn expire_waiters(vm: &SharedVm, config: &Config, now: u64) {
    let lost_grant_after = config.tick_ms;
    let expired: Vec<(u32, RevisionId, u64, bool)> = vm
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
                let age = now.saturating_sub(since_ms);
                let overdue = age >= max_wait.saturating_add(lost_grant_after);
                (age >= max_wait).then_some((*ctx, rev, ticket, overdue))
            }
            StreamState::Admitted { .. } => None,
        })
        .collect();
    for (ctx, rev, ticket, overdue) in expired {
        let Some(r) = vm.borrow().revision(rev) else {
            continue;
        };
        match shared::update_state(&r.key, |s| s.cancel(ticket, now)) {
            Ok(found) if found.is_some() || overdue => {
                if found.is_none() {
                    log::warn!(
                        "ticket {ticket} of `{}` lost its grant; shedding it",
                        r.config.name
                    );
                }
                vm.borrow_mut().streams.remove(&ctx);
                metrics::count(r.metrics.shed_timeout);
                if hostcalls::set_effective_context(ctx).is_ok() {
                    let body = format!(
                        "inflight: revision {} had no free slot within the maximum wait ({}); retry later\n",
                        r.config.name,
                        inflight_core::duration::format_ms(r.config.max_wait_ms)
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
            Ok(_) => {}
            Err(e) => log::error!("expiring ticket {ticket} failed: {e}"),
        }
    }
}

/// Per-revision housekeeping: export demand, reap orphans, grant after capacity grew, step the
/// autoscaler, refresh gauges. One CAS on the revision state and one on the autoscaler.
fn tick_revision(vm: &SharedVm, config: &Config, index: usize, r: &Revision, now: u64) {
    let rc = &r.config;
    // An owner sheds its own waiters at max wait; one still queued long after is orphaned.
    let orphan_age = rc
        .max_wait_ms
        .saturating_add(config.tick_ms.saturating_mul(20).max(5_000));
    // Other VMs that held slots or waiters at the last tick and stopped beating are dead
    // (a crash; FAIL_RELOAD starts a new VM with a new id): give back what they held.
    let dead_after = config.tick_ms.saturating_mul(50).max(5_000);
    let suspects = vm.borrow().seen.get(&index).cloned().unwrap_or_default();
    let dead: Vec<u32> = suspects
        .into_iter()
        .filter(|other| shared::heartbeat_age(*other, now).is_none_or(|age| age > dead_after))
        .collect();
    let step = shared::update_state(&r.key, |s| {
        let mut grants = Vec::new();
        let mut reclaimed = (0u32, 0usize);
        for d in &dead {
            let limits = r.limits(s);
            let (slots, waiters, g) = s.reap_vm(*d, limits, now);
            reclaimed = (reclaimed.0 + slots, reclaimed.1 + waiters);
            grants.extend(g);
        }
        let reaped = s.reap(now, orphan_age).len();
        let limits = r.limits(s);
        grants.extend(s.grant_ready(limits, now));
        let demand_delta = s.take_unexported_demand_ms(now);
        (reaped, reclaimed, grants, demand_delta, s.clone(), limits)
    });
    let (reaped, reclaimed, grants, demand_delta, state, limits) = match step {
        Ok(v) => v,
        Err(e) => {
            log::warn!("tick for `{}` failed: {e}", rc.name);
            return;
        }
    };
    if reclaimed != (0, 0) {
        log::warn!(
            "revision `{}`: reclaimed {} slot(s) and {} waiter(s) of dead worker VM(s) {dead:?}",
            rc.name,
            reclaimed.0,
            reclaimed.1
        );
    }
    {
        let mut others: Vec<u32> = state
            .holders()
            .map(|h| h.0)
            .chain(state.waiters().map(|w| w.owner.vm))
            .filter(|v| *v != vm.borrow().id)
            .collect();
        others.sort_unstable();
        others.dedup();
        vm.borrow_mut().seen.insert(index, others);
    }
    if reaped > 0 {
        log::warn!(
            "reaped {reaped} orphaned waiter(s) of `{}` (their worker VM is gone)",
            rc.name
        );
    }
    deliver(vm, r, grants, now);
    if demand_delta > 0 {
        metrics::add(r.metrics.demand_ms, demand_delta);
    }
    let ready = state.ready().unwrap_or(rc.ready_replicas);
    let observation = Observation {
        now_ms: now,
        demand_ms: state.demand_ms(now),
        active: state.active,
        queued: state.queued(),
        capacity: limits.capacity,
        ready,
    };
    let signal = shared::update_autoscaler(
        &r.kpa_key,
        || Autoscaler::new(&rc.autoscaling),
        |a| {
            let decision = a.step(&rc.autoscaling, &observation, DEFAULT_DECISION_PERIOD_MS);
            (decision, a.signal())
        },
    );
    match signal {
        Ok((decision, signal)) => {
            if let Some(d) = decision {
                if d.reason == Reason::QueueAwarePanic {
                    metrics::count(r.metrics.queue_aware_scale_ups);
                }
                let previous = vm.borrow_mut().last_desired.insert(index, d.desired);
                if previous.is_some_and(|p| p != d.desired) {
                    log::info!("revision `{}`: {d}", rc.name);
                } else {
                    log::debug!("revision `{}`: {d}", rc.name);
                }
            }
            metrics::record(r.metrics.desired_replicas, u64::from(signal.desired));
            metrics::record(
                r.metrics.stable_concurrency_milli,
                milli(signal.stable_concurrency),
            );
            metrics::record(
                r.metrics.panic_concurrency_milli,
                milli(signal.panic_concurrency),
            );
        }
        Err(e) => log::warn!("autoscaler step for `{}` failed: {e}", rc.name),
    }
    metrics::record(r.metrics.active, u64::from(state.active));
    metrics::record(r.metrics.queued, u64::from(state.queued()));
    metrics::record(r.metrics.capacity, limits.capacity.map_or(0, u64::from));
    metrics::record(r.metrics.ready_replicas, u64::from(ready));
}

fn milli(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        (v * 1000.0).round() as u64
    } else {
        0
    }
}

/// Asks Envoy's admin for cluster membership, at most once per interval across all workers.
fn poll_membership(vm: &SharedVm, config: &Config, now: u64) {
    let Some(m) = &config.membership else {
        return;
    };
    if vm.borrow().poll_token.is_some() {
        return;
    }
    match shared::claim_poll(now, m.interval_ms) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            log::warn!("membership poll claim failed: {e}");
            return;
        }
    }
    let headers = vec![
        (":method", "GET"),
        (":path", membership::STATS_PATH),
        (":authority", m.authority.as_str()),
    ];
    match hostcalls::dispatch_http_call(
        &m.cluster,
        headers,
        None,
        vec![],
        Duration::from_millis(m.timeout_ms),
    ) {
        Ok(token) => vm.borrow_mut().poll_token = Some(token),
        Err(e) => {
            poll_failed(
                vm,
                &format!("dispatch to cluster `{}` failed: {e:?}", m.cluster),
            );
        }
    }
}

fn poll_failed(vm: &SharedVm, why: &str) {
    log::warn!("membership poll failed (keeping the last ready counts): {why}");
    if let Some(id) = vm.borrow().poll_failures {
        metrics::count(id);
    }
}

/// The admin's answer: record ready replicas per revision and grant what now fits.
fn on_membership(vm: &SharedVm, token: u32, body_size: usize, now: u64) {
    if vm.borrow().poll_token != Some(token) {
        return;
    }
    vm.borrow_mut().poll_token = None;
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .unwrap_or_default();
    if status != "200" {
        let why = if status.is_empty() {
            "no answer (timeout or reset)".to_string()
        } else {
            format!("status {status}")
        };
        poll_failed(vm, &why);
        return;
    }
    let body = match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
        Ok(b) => b.unwrap_or_default(),
        Err(e) => {
            poll_failed(vm, &format!("reading the body failed: {e:?}"));
            return;
        }
    };
    let revisions = vm.borrow().revisions.clone();
    let clusters: Vec<&str> = revisions
        .iter()
        .filter_map(|r| r.config.upstream_cluster.as_deref())
        .collect();
    let healthy = match membership::healthy_members(&body, &clusters) {
        Ok(h) => h,
        Err(e) => {
            poll_failed(vm, &e.to_string());
            return;
        }
    };
    for r in &revisions {
        let Some(n) = r
            .config
            .upstream_cluster
            .as_deref()
            .and_then(|c| healthy.get(c))
            .copied()
        else {
            continue;
        };
        match shared::update_state(&r.key, |s| {
            let before = s.ready();
            s.set_ready(n);
            let limits = r.limits(s);
            (before, s.grant_ready(limits, now))
        }) {
            Ok((before, grants)) => {
                if before != Some(n) {
                    log::info!(
                        "revision `{}`: {n} ready replica(s) (was {before:?})",
                        r.config.name
                    );
                }
                deliver(vm, r, grants, now);
            }
            Err(e) => log::warn!(
                "recording ready replicas of `{}` failed: {e}",
                r.config.name
            ),
        }
    }
}
