//! One Envoy worker's VM, as a sans-IO state machine: events in, effects out.
//!
//! Every Envoy worker thread runs its own VM of the filter; the filter turns each host callback
//! into one call on its [`Worker`] and applies what comes back: a [`Verdict`] for the request at
//! hand, and [`Effect`]s (resume or answer another stream, metrics, an admin call). Shared data
//! and the wake queues are reached through the [`Host`] trait; time is an argument. So every
//! policy below runs natively, against a fake host, in `cargo test -p inflight-core`:
//!
//! - **which revision** a request belongs to ([`Worker::on_request`]): host, cluster (listed or
//!   learned from host matches; a cluster seen behind two revisions is never used), header;
//! - **classes and fairness**: a request's priority class comes from the class header (missing
//!   or unknown: the revision's default class, never the highest), its fairness group from a
//!   hash of the fairness header; admission queues it there ([`RevisionState::try_admit_as`]),
//!   and a waiter evicted from a full buffer for a higher class is answered `buffer-full` by its
//!   owner, reached through its wake queue ([`Wake::Shed`]);
//! - **grant delivery**: a freed slot goes to the next ticket through its owner's wake queue; a
//!   wake that cannot be delivered (owner VM gone) releases the slot in the owner's name, which
//!   grants the next ticket, up to [`MAX_HANDOVERS`] times;
//! - **expiry**: a waiter is shed at its class's maximum wait; one whose ticket is gone (a grant
//!   was sent) but whose grant did not arrive by one tick later lost it and is shed too;
//! - **reaping**: another VM that held slots or waiters and stopped beating for
//!   [`dead_after_ms`] is dead, and what it held is given back; a waiter still queued
//!   [`orphan_age_ms`] after its maximum wait is orphaned and removed;
//! - **the abandoned hold**: a stream that ends before its response keeps its slot
//!   [`ABANDONED_HOLD_MS`] (Envoy resets the upstream request only after the filter hears the end);
//! - **drain**: the same poll asks Envoy's `/ready`; once the server drains (`/healthcheck/fail`,
//!   as a Kubernetes preStop hook does it) every worker answers its waiters `503
//!   gateway-draining` with `retry-after` and sheds what would wait, so a shutdown resets none;
//! - **membership**: one worker at a time polls Envoy's admin for each revision's endpoints and
//!   their health; the ready ones are the revision's ready replicas, and capacity follows;
//! - **endpoint picking** (routing on): a request is admitted on an endpoint with a free slot
//!   and the adapter names it in the endpoint header ([`Effect::Route`]) for Envoy's
//!   `override_host` policy; every other request passing the filter has a client's copy of that
//!   header removed; the response is checked against the pick ([`Worker::on_response`]);
//! - **slot leases** (`lease_ops`): far from its limit, a worker takes a few slots at once and
//!   admits and releases on them without a shared-data write; a read of the revision's recall
//!   epoch per arrival keeps strict FIFO (an arrival that would wait bumps it and recalls the
//!   leases first), and lessees add the demand of their leased requests at each swap;
//! - **the fleet** (`fleet` configured, `fleet_ops`): the same poll lists the peer gateways, and
//!   the polling worker asks each peer for its report; each endpoint's cap (this gateway's
//!   usable share of its slots) follows `crate::fleet`'s hand-over rule; a request this gateway
//!   has no slot for, or would queue while a peer has a free one, is forwarded to that peer
//!   ([`Effect::Forward`]); the report is answered on the peer port ([`Verdict::Report`]).

use crate::admission::{Admission, Arrival, Grant, Owner, Pick, RevisionState, Waiter};
use crate::autoscaler::{Autoscaler, Observation, DEFAULT_DECISION_PERIOD_MS};
use crate::config::{Config, ConfigError, Limits, Membership, RevisionConfig, UnknownRevision};
use crate::kpa::Reason;
use crate::membership;
use crate::outcome::{ClassGauge, Gauge, Outcome};
use crate::store::{self, Change, ClusterOwner, Host, StoreError};
use crate::table::RevisionId;
use crate::wake::Wake;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use thiserror::Error;

mod fleet_ops;
mod lease_ops;
pub use fleet_ops::NodeFacts;
pub use lease_ops::recall_key;

/// Bound on slot hand-overs in one delivery (each failed hand-over releases to the next waiter).
pub const MAX_HANDOVERS: usize = 10_000;
/// How long the slot of a stream that ended before its response stays held. Releasing at once
/// (or one event-loop turn later; measured: 1–2 violations in 6 000 requests with 30 % leavers
/// under CPU contention) lets the next request reach the upstream before Envoy resets the
/// abandoned one: limit + 1 there.
pub const ABANDONED_HOLD_MS: u64 = 20;
/// Host matches per revision whose upstream cluster a VM records.
pub const LEARN_SAMPLES: u8 = 32;

/// A VM that held slots or waiters and has not beaten for this long is dead (a crash; Envoy's
/// `FAIL_RELOAD` starts a new VM with a new id).
pub fn dead_after_ms(tick_ms: u64) -> u64 {
    tick_ms.saturating_mul(50).max(5_000)
}

/// A waiter still queued this long is orphaned: its owner sheds its own waiters at their maximum
/// wait, so one far past it has no owner.
pub fn orphan_age_ms(max_wait_ms: u64, tick_ms: u64) -> u64 {
    max_wait_ms.saturating_add(tick_ms.saturating_mul(20).max(5_000))
}

/// A waiter whose ticket left the queue (a grant was sent) but whose grant has not arrived this
/// long after its maximum wait lost the grant (its wake could not be delivered): shed it.
pub fn lost_grant_after_ms(tick_ms: u64) -> u64 {
    tick_ms
}

/// What Envoy knows about the request at hand, read lazily (a host call each).
pub trait RequestFacts {
    /// The `:authority` header.
    fn authority(&self) -> Option<String>;
    /// The cluster Envoy routed the request to (`xds.cluster_name`).
    fn cluster(&self) -> Option<String>;
    /// A request header.
    fn header(&self, name: &str) -> Option<String>;
    /// The local port the request arrived on (`destination.port`); read only in a fleet.
    fn local_port(&self) -> Option<u16> {
        None
    }
}

/// What Envoy knows about the response of the request at hand.
pub trait ResponseFacts {
    /// The upstream host Envoy sent the request to (`upstream.address`).
    fn upstream_address(&self) -> Option<String>;
}

/// The gateway's own answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub outcome: Outcome,
    pub retry_after_s: Option<u64>,
    pub body: String,
}

impl Reply {
    pub fn status(&self) -> u32 {
        self.outcome.status()
    }
}

/// What to do with the request at hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Hold it (it waits for a grant).
    Pause,
    /// Answer it now (and stop it).
    Reply(Reply),
    /// Answer a peer gateway's report request: 200 with this JSON body.
    Report(String),
}

/// The membership request to send to Envoy's admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRequest {
    pub kind: PollKind,
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
}

/// What an admin poll asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollKind {
    /// `/clusters?filter=…`: the revisions' endpoints and their health.
    Endpoints,
    /// `/ready`: whether the server drains.
    Ready,
}

/// Envoy's admin path answering 200 `LIVE`, or 503 with the server state (`DRAINING` after
/// `/healthcheck/fail`).
pub const READY_PATH: &str = "/ready";

/// What the adapter does for the worker after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Set request header `header` of stream `context` to `endpoint`, or remove it (`None`);
    /// comes before the stream continues upstream.
    Route {
        context: u32,
        header: Rc<str>,
        endpoint: Option<String>,
    },
    /// Resume a paused stream; if that fails, call [`Worker::on_resume_failed`].
    Resume { context: u32 },
    /// Answer a paused stream.
    Reply { context: u32, reply: Reply },
    /// Count a request's outcome for a revision.
    Count { rev: RevisionId, outcome: Outcome },
    /// Count a request that matched no revision.
    CountUnknown,
    /// Add request-milliseconds of demand to the revision's counter.
    AddDemand { rev: RevisionId, ms: u64 },
    /// Record how long a request waited.
    QueueWait { rev: RevisionId, ms: u64 },
    /// Count a request's outcome for its class too (only with a `classHeader`: without one every
    /// request is of the default class and the revision's series say it all).
    CountClass {
        rev: RevisionId,
        class: u8,
        outcome: Outcome,
    },
    /// Record how long a request of a class waited (only with a `classHeader`).
    ClassQueueWait { rev: RevisionId, class: u8, ms: u64 },
    /// A per-class gauge (only with a `classHeader`).
    ClassGauge {
        rev: RevisionId,
        class: u8,
        gauge: ClassGauge,
        value: u64,
    },
    Gauge {
        rev: RevisionId,
        gauge: Gauge,
        value: u64,
    },
    /// The autoscaler scaled up on the queue-aware rule (`kpa::Reason::QueueAwarePanic`).
    QueueAwareScaleUp { rev: RevisionId },
    /// Envoy sent a request of the revision to another endpoint than the one picked.
    EndpointMismatch { rev: RevisionId },
    /// A membership poll failed.
    PollFailed,
    /// Send this request to Envoy's admin; then call [`Worker::on_poll_dispatched`].
    Poll(PollRequest),
    /// Ask peer gateway `peer` for its report: `GET` [`crate::fleet::REPORT_PATH`] through
    /// `cluster` with request header `header: peer`; then call [`Worker::on_peer_dispatched`].
    PeerCall {
        cluster: String,
        header: Rc<str>,
        peer: String,
        timeout_ms: u64,
    },
    /// Set request header `header` of stream `context` to `peer` (forward the request to that
    /// peer gateway), or remove it (`None`); then clear Envoy's route cache, so the route
    /// follows the header.
    Forward {
        context: u32,
        header: Rc<str>,
        peer: Option<String>,
    },
}

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigureError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot record the configuration generation: {0}")]
    Generation(StoreError),
    #[error("cannot publish the limits of revision `{0}`: {1}")]
    Publish(String, StoreError),
}

/// What the VM knows about one of its streams.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StreamState {
    Waiting {
        rev: RevisionId,
        ticket: u64,
        since_ms: u64,
        /// Its priority class (its maximum wait is the class's).
        class: u8,
    },
    Admitted {
        rev: RevisionId,
        /// The endpoint its slot is on, when picked.
        endpoint: Option<Pick>,
        /// The slot lease it was admitted on (0: none, an ordinary slot).
        lease: u32,
    },
}

/// This VM's view of one revision of its configuration.
#[derive(Debug)]
struct RevisionVm {
    /// Generation of the configuration this VM runs (a reload makes a newer one).
    generation: u64,
    key: String,
    kpa_key: String,
    /// Host matches whose cluster was recorded so far.
    learn_samples: u8,
    last_desired: Option<u32>,
    /// Other VMs that held slots or waiters at the last tick.
    seen: Vec<u32>,
    /// A request of this revision reached another endpoint than picked (logged once).
    mismatch_seen: bool,
    /// Slots exist only on known endpoints (endpoint picking from the admin poll, or a fleet):
    /// until the first poll lists them, the revision counts no ready endpoint and requests wait.
    needs_endpoints: bool,
    /// The revision's recall epoch key, and this VM's slot lease (`lease_ops`).
    recall_key: String,
    lease: lease_ops::LocalLease,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poll {
    Idle,
    Dispatching,
    InFlight(u32),
}

/// One worker VM. See the module docs.
pub struct Worker<H: Host> {
    host: H,
    id: u32,
    config: Option<Rc<Config>>,
    revisions: Vec<RevisionVm>,
    /// Every stream that holds a slot or a ticket, by context id.
    streams: HashMap<u32, StreamState>,
    /// Slots of streams that ended before their response (revision, endpoint id, lease id),
    /// with when.
    abandoned: Vec<(RevisionId, u32, u32, u64)>,
    /// The last slot lease id handed out.
    lease_ids: u32,
    wake_tokens: HashMap<u32, u32>,
    /// Clusters this VM recorded behind host matches: `Some(rev)`, or `None` once found
    /// ambiguous (so each is written to shared data once).
    learned_clusters: HashMap<String, Option<RevisionId>>,
    poll: Poll,
    ready_poll: Poll,
    /// The gateway drains: waiters were answered, and nothing new waits.
    draining: bool,
    /// What Envoy's node says about this gateway (its fleet identity).
    node: NodeFacts,
    /// This gateway's fleet state, refreshed at each tick and after each update.
    fleet: fleet_ops::FleetVm,
    effects: Vec<Effect>,
}

impl<H: Host> Worker<H> {
    /// Registers a new VM: takes the next id from a shared counter, registers its wake queue
    /// under it and publishes the queue's token, so other workers can reach this one.
    pub fn start(host: H) -> Result<Worker<H>, StoreError> {
        let id = store::update(
            &host,
            store::VM_SEQ_KEY,
            store::load_u32,
            |v| v.unwrap_or(0).to_le_bytes().to_vec(),
            |v| {
                let next = v.unwrap_or(0).wrapping_add(1);
                *v = Some(next);
                Change::Write(next)
            },
        )?;
        let token = host.register_queue(&store::wake_queue_name(id))?;
        store::write(&host, &store::wake_token_key(id), &token.to_le_bytes())?;
        log::debug!("worker VM {id} registered wake queue {token}");
        Ok(Worker {
            host,
            id,
            config: None,
            revisions: Vec::new(),
            streams: HashMap::new(),
            abandoned: Vec::new(),
            lease_ids: 0,
            wake_tokens: HashMap::new(),
            learned_clusters: HashMap::new(),
            poll: Poll::Idle,
            ready_poll: Poll::Idle,
            draining: false,
            node: NodeFacts::default(),
            fleet: fleet_ops::FleetVm::default(),
            effects: Vec::new(),
        })
    }

    /// This VM's shared id.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn config(&self) -> Option<&Config> {
        self.config.as_deref()
    }

    /// Parses, validates and installs a plugin configuration; the previous one stays on error.
    pub fn configure(&mut self, bytes: &[u8], now: u64) -> Result<Rc<Config>, ConfigureError> {
        let config = Config::parse(bytes)?;
        // Leases are per revision of the running configuration: give them back first.
        self.give_all_leases_back(now);
        let generation =
            config_generation(&self.host, bytes).map_err(ConfigureError::Generation)?;
        let mut revisions = Vec::with_capacity(config.revisions.len());
        for r in &config.revisions {
            let key = store::revision_key(&r.name);
            let params = r.limit_params();
            store::update_revision(&self.host, &key, |s| s.publish(generation, params))
                .map_err(|e| ConfigureError::Publish(r.name.clone(), e))?;
            revisions.push(RevisionVm {
                generation,
                kpa_key: store::autoscaler_key(&r.name),
                key,
                learn_samples: 0,
                last_desired: None,
                seen: Vec::new(),
                mismatch_seen: false,
                needs_endpoints: r.upstream_cluster.is_some()
                    && config.membership.is_some()
                    && (config.fleet.is_some() || config.endpoint_header.is_some()),
                recall_key: recall_key(&r.name),
                lease: lease_ops::LocalLease::default(),
            });
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
        self.learned_clusters.clear();
        self.revisions = revisions;
        self.fleet.configure(&config, &self.node);
        self.beat(now);
        let config = Rc::new(config);
        self.config = Some(Rc::clone(&config));
        Ok(config)
    }

    /// Moves the effects of the last calls into `out` (which the adapter keeps and clears, so
    /// neither side allocates per call).
    pub fn take_effects(&mut self, out: &mut Vec<Effect>) {
        if out.is_empty() {
            std::mem::swap(&mut self.effects, out);
        } else {
            out.append(&mut self.effects);
        }
    }

    // ---- request path ----------------------------------------------------------------------

    /// Request headers of stream `context`: identify its revision, then admit, queue or shed.
    pub fn on_request(&mut self, context: u32, facts: &impl RequestFacts, now: u64) -> Verdict {
        self.release_abandoned(now);
        let Some(config) = self.config.clone() else {
            // Envoy does not create streams for a VM whose configuration failed.
            return Verdict::Continue;
        };
        let mut forwarded_in = false;
        if let Some(f) = &config.fleet {
            forwarded_in = self.fleet.arrived_on_peer_port(facts);
            if forwarded_in {
                self.fleet.arrived_forwarded(context);
            }
            if forwarded_in && facts.header(":path").as_deref() == Some(crate::fleet::REPORT_PATH) {
                return Verdict::Report(self.fleet_report(&config, now));
            }
            if facts.header(&f.forward_header).is_some() {
                self.effects.push(Effect::Forward {
                    context,
                    header: Rc::clone(&f.forward_header),
                    peer: None,
                });
            }
        }
        let Some(rev) = self.identify(&config, facts) else {
            return match config.unknown_revision {
                UnknownRevision::PassThrough => {
                    self.route(&config, context, None);
                    Verdict::Continue
                }
                UnknownRevision::Reject => {
                    self.effects.push(Effect::CountUnknown);
                    Verdict::Reply(Reply {
                        outcome: Outcome::UnknownRevision,
                        retry_after_s: None,
                        body: "inflight: no revision matches this request\n".into(),
                    })
                }
            };
        };
        let (Some(rc), Some(_)) = (config.revision(rev), self.revisions.get(rev.0)) else {
            self.route(&config, context, None);
            return Verdict::Continue;
        };
        let owner = Owner {
            vm: self.id,
            context,
        };
        let draining = self.draining;
        let class = match &config.class_header {
            Some(h) => rc.class_of(facts.header(h).as_deref()),
            None => rc.default_class,
        };
        let group = config
            .fairness_header
            .as_deref()
            .and_then(|h| facts.header(h))
            .map_or(0, |key| fairness_group(&key));
        // A spare slot of this VM's lease admits without touching shared state.
        let lease_ask = self.lease_ask(&config, rev);
        if lease_ask > 0 && self.admit_on_lease(rev, context, now) {
            self.route(&config, context, None);
            self.count(rev, class, Outcome::Admitted);
            return Verdict::Continue;
        }
        // In a fleet, a request that cannot be admitted here goes to a peer with a free slot;
        // or, when this gateway owns no slot of the revision, to any peer with slots.
        let may_forward = config.fleet.is_some() && !forwarded_in;
        let me = self.id;
        let headroom = config.slot_lease.headroom;
        let mut recalled = false;
        let leased_before = self.revisions.get(rev.0).is_some_and(|r| r.lease.slots > 0);
        let (admission, epoch) = loop {
            let Some(r) = self.revisions.get(rev.0) else {
                return Verdict::Continue;
            };
            // Read before the swap: a lease taken in it holds only while the epoch does.
            let epoch = (lease_ask > 0 || r.lease.slots > 0)
                .then(|| lease_ops::read_epoch(&self.host, &r.recall_key))
                .flatten();
            let give_back = r.lease.slots > 0 && (lease_ask == 0 || epoch != Some(r.lease.epoch));
            let fleet = &self.fleet;
            let lease = &r.lease;
            let swapped = store::update(
                &self.host,
                &r.key,
                store::load_revision,
                RevisionState::encode,
                |s| {
                    let mut limits = r.limits(rc, s);
                    if may_forward && !s.can_admit(limits) {
                        let owned = s.endpoint_slots(limits.per_endpoint).unwrap_or(0);
                        if let Some(peer) = fleet.forward_target(&rc.name, now, owned == 0) {
                            return Change::Keep(Err(Detour::Forward(peer)));
                        }
                    }
                    if draining {
                        // Admitted if a slot is free; nothing new waits (or evicts) on a
                        // gateway that goes away.
                        limits.buffer = 0;
                    }
                    let mut change = lease_ops::LeaseChange::default();
                    // Demand is pending only while a lease is held (giving one back merges it).
                    if lease.slots > 0 {
                        s.merge_lease(me, lease.pending_ms(now), lease.used);
                    }
                    // This VM's own lease goes back before this arrival could wait behind it.
                    if lease.slots > 0
                        && (give_back || s.should_recall(limits, headroom) || !s.can_admit(limits))
                    {
                        change.grants = s.return_lease(me, lease.used, limits, now);
                        change.returned = true;
                    }
                    // Strict FIFO: before this arrival waits (or is shed), no lease may admit.
                    if !recalled && s.leases().iter().any(|l| l.vm != me) && !s.can_admit(limits) {
                        return Change::Keep(Err(Detour::Recall(s.other_lessees(me))));
                    }
                    let arrival = Arrival {
                        owner,
                        class,
                        group,
                        class_buffer: rc.class_buffer(class, limits.buffer),
                    };
                    let (admission, evicted) = s.try_admit_as(limits, arrival, now);
                    if lease_ask > 0
                        && epoch.is_some()
                        && matches!(admission, Admission::Admitted { endpoint: None })
                        && (change.returned || lease.slots == 0 || !give_back)
                    {
                        change.taken = s.lease(me, lease_ask, headroom, limits, now);
                    }
                    if s.should_recall(limits, headroom) {
                        change.recall = s.other_lessees(me);
                    }
                    Change::Write(Ok((admission, evicted, limits, change)))
                },
            );
            match swapped {
                Ok(Err(Detour::Recall(lessees))) => {
                    self.recall(rev, &lessees);
                    recalled = true;
                }
                Ok(Err(Detour::Forward(peer))) => {
                    self.route(&config, context, None);
                    if let Some(f) = &config.fleet {
                        self.effects.push(Effect::Forward {
                            context,
                            header: Rc::clone(&f.forward_header),
                            peer: Some(peer.clone()),
                        });
                    }
                    self.fleet.forwarded_to(&peer);
                    self.count(rev, class, Outcome::Forwarded);
                    return Verdict::Continue;
                }
                Ok(Ok(a)) => break (Ok(a), epoch),
                Err(e) => break (Err(e), epoch),
            }
        };
        let admission = admission.map(|(admission, evicted, limits, change)| {
            if change.taken > 0 || change.returned || !change.recall.is_empty() || leased_before {
                self.lease_swapped(rev, change, epoch, now);
            }
            (admission, evicted, limits)
        });
        match admission {
            Ok((Admission::Admitted { endpoint }, _, _)) => {
                self.admit_ordinary(&config, context, rev, endpoint);
                self.count(rev, class, Outcome::Admitted);
                Verdict::Continue
            }
            Ok((Admission::Queued { ticket }, evicted, _)) => {
                self.streams.insert(
                    context,
                    StreamState::Waiting {
                        rev,
                        ticket,
                        since_ms: now,
                        class,
                    },
                );
                if let Some(w) = evicted {
                    self.send_shed(&rc.name, w);
                }
                Verdict::Pause
            }
            Ok((Admission::Shed(_), _, _)) if draining => {
                self.count(rev, class, Outcome::ShedDraining);
                Verdict::Reply(draining_reply(&config, &rc.name))
            }
            Ok((Admission::Shed(reason), _, limits)) => {
                let outcome = Outcome::from(reason);
                self.count(rev, class, outcome);
                Verdict::Reply(Reply {
                    outcome,
                    retry_after_s: Some(config.retry_after_s),
                    body: format!(
                        "inflight: revision {} is at capacity ({}) and its buffer ({}) is full; retry later\n",
                        rc.name,
                        limits.capacity.map_or("unlimited".into(), |c| c.to_string()),
                        limits.buffer
                    ),
                })
            }
            Err(e) => {
                log::error!("admission for revision `{}` failed: {e}", rc.name);
                let outcome = Outcome::StateUnavailable;
                self.count(rev, class, outcome);
                Verdict::Reply(Reply {
                    outcome,
                    retry_after_s: Some(config.retry_after_s),
                    body: "inflight: gateway state unavailable; retry later\n".into(),
                })
            }
        }
    }

    /// Counts a request's outcome for its revision, and for its class when classes are
    /// reported (a `classHeader` is configured).
    fn count(&mut self, rev: RevisionId, class: u8, outcome: Outcome) {
        self.effects.push(Effect::Count { rev, outcome });
        if self.reports_classes() {
            self.effects.push(Effect::CountClass {
                rev,
                class,
                outcome,
            });
        }
    }

    /// Whether per-class series are reported: only with a `classHeader` (without one every
    /// request is of the default class, and the extra series would only cost).
    fn reports_classes(&self) -> bool {
        self.config
            .as_ref()
            .is_some_and(|c| c.class_header.is_some())
    }

    /// Tells the owner of waiter `w`, evicted from the full buffer, to answer it `buffer-full`.
    /// An owner that cannot be reached is gone, and its stream with it: nothing to do.
    fn send_shed(&mut self, revision: &str, w: Waiter) {
        let message = Wake::Shed {
            revision: revision.to_string(),
            ticket: w.ticket,
            context: w.owner.context,
        }
        .encode();
        let sent = match self.wake_token(w.owner.vm) {
            Some(t) => self.host.enqueue(t, &message),
            None => Err(store::HostError::NotFound),
        };
        if let Err(e) = sent {
            log::debug!(
                "worker VM {} unreachable ({e}); evicted ticket {} needs no answer",
                w.owner.vm,
                w.ticket
            );
        }
    }

    /// Names the picked endpoint in the endpoint header of stream `context`, or removes a
    /// client's copy of the header (routing on; nothing otherwise).
    fn route(&mut self, config: &Config, context: u32, endpoint: Option<&Pick>) {
        if let Some(header) = &config.endpoint_header {
            self.effects.push(Effect::Route {
                context,
                header: Rc::clone(header),
                endpoint: endpoint.map(|p| p.address.clone()),
            });
        }
    }

    /// Response headers of stream `context`: a request sent to another endpoint than picked
    /// is counted (and the first one of a revision logged), since then the per-endpoint limit
    /// does not hold there. Reads the upstream only for streams that were picked an endpoint.
    pub fn on_response(&mut self, context: u32, facts: &impl ResponseFacts) {
        let Some(StreamState::Admitted {
            rev,
            endpoint: Some(pick),
            ..
        }) = self.streams.get(&context)
        else {
            return;
        };
        // A local reply (no healthy upstream, a timeout) has no upstream: nothing to compare.
        let Some(upstream) = facts.upstream_address() else {
            return;
        };
        if upstream == pick.address {
            return;
        }
        let (rev, pick) = (*rev, pick.clone());
        self.effects.push(Effect::EndpointMismatch { rev });
        let (Some(config), Some(r)) = (self.config.clone(), self.revisions.get_mut(rev.0)) else {
            return;
        };
        if r.mismatch_seen {
            return;
        }
        r.mismatch_seen = true;
        let rc = config.revision(rev);
        log::warn!(
            "a request of `{}` picked for endpoint {} went to {upstream}: cluster `{}` does not route by header `{}` (give it the load_balancing_policy envoy.load_balancing_policies.override_host with that header; until then the per-endpoint limit does not hold). Counted in endpoint_mismatch; logged once per worker",
            rc.map_or("?", |rc| rc.name.as_str()),
            pick.address,
            rc.and_then(|rc| rc.upstream_cluster.as_deref()).unwrap_or("?"),
            config.endpoint_header.as_deref().unwrap_or("?"),
        );
    }

    /// Whether stream `context` waits for a grant (its body and trailers must stay paused:
    /// continuing would send the held headers upstream and bypass the limit).
    pub fn is_waiting(&self, context: u32) -> bool {
        matches!(
            self.streams.get(&context),
            Some(StreamState::Waiting { .. })
        )
    }

    /// Stream `context` ended (every path: success, resets, local replies). `response_complete`:
    /// the upstream's response reached its end.
    pub fn on_done(&mut self, context: u32, response_complete: bool, now: u64) {
        self.release_abandoned(now);
        self.fleet.ended(context);
        match self.streams.remove(&context) {
            // Envoy destroys filters in chain order, so the router resets the upstream request
            // of a stream that ended early only after this callback: hold its slot a while.
            Some(StreamState::Admitted {
                rev,
                endpoint,
                lease,
            }) if !response_complete => {
                self.abandoned
                    .push((rev, pick_id(endpoint.as_ref()), lease, now));
            }
            Some(StreamState::Admitted {
                rev,
                endpoint,
                lease,
            }) => {
                self.end_slot(rev, pick_id(endpoint.as_ref()), lease, now);
            }
            Some(StreamState::Waiting {
                rev, ticket, class, ..
            }) => {
                self.count(rev, class, Outcome::Cancelled);
                let Some(r) = self.revisions.get(rev.0) else {
                    return;
                };
                // Not found means a grant is on its way here; on_wake will pass it on.
                if let Err(e) =
                    store::update_revision(&self.host, &r.key, |s| s.cancel(ticket, now))
                {
                    log::error!("cancelling ticket {ticket} failed: {e}");
                }
            }
            None => {}
        }
    }

    // ---- identification --------------------------------------------------------------------

    /// The revision of a request: `:authority`, then the upstream cluster (listed, then learned),
    /// then the revision header.
    ///
    /// Host and cluster decide where Envoy actually routes the request, so they come first; the
    /// header is a last resort for gateways that name the revision themselves (an earlier filter
    /// must set it, overwriting any client copy).
    ///
    /// A client picks the authority, Envoy the cluster. So that an authority matching no host
    /// cannot go around the limit through a catch-all route, VMs record in shared data the
    /// cluster behind the first [`LEARN_SAMPLES`] host matches of every revision, and a request
    /// whose host matches nothing counts for the revision whose cluster Envoy routed it to. A
    /// cluster seen behind two revisions' hosts is ambiguous, for good, and not used.
    fn identify(&mut self, config: &Config, facts: &impl RequestFacts) -> Option<RevisionId> {
        if let Some(authority) = facts.authority() {
            if let Some(id) = config.table.match_host(&authority) {
                self.learn_cluster(config, id, facts);
                return Some(id);
            }
        }
        if let Some(cluster) = facts.cluster() {
            if let Some(id) = config.table.match_cluster(&cluster) {
                return Some(id);
            }
            if let Some(id) = self.learned_cluster(config, &cluster) {
                return Some(id);
            }
        }
        let header = config.revision_header.as_deref()?;
        let name = facts.header(header)?;
        config.table.match_name(name.trim())
    }

    /// The revision recorded for `cluster` by host matches (of any VM). One shared read, only
    /// for requests whose host matched nothing; not cached, so a cluster found ambiguous later by
    /// another VM stops counting at once.
    fn learned_cluster(&self, config: &Config, cluster: &str) -> Option<RevisionId> {
        let bytes = store::read(&self.host, &store::cluster_key(cluster)).ok()?;
        match store::load_cluster(bytes.as_deref()).ok()?? {
            ClusterOwner::Revision(name) => config.table.match_name(&name),
            ClusterOwner::Ambiguous => None,
        }
    }

    /// Records the cluster of the current request, whose host matched `rev`.
    fn learn_cluster(&mut self, config: &Config, rev: RevisionId, facts: &impl RequestFacts) {
        match self.revisions.get_mut(rev.0) {
            Some(r) if r.learn_samples < LEARN_SAMPLES => r.learn_samples += 1,
            _ => return,
        }
        let Some(cluster) = facts.cluster() else {
            return;
        };
        let Some(name) = config.revision(rev).map(|r| r.name.as_str()) else {
            return;
        };
        // Already recorded by this VM for this revision, or known ambiguous: nothing to write.
        if matches!(self.learned_clusters.get(&cluster), Some(known) if known.is_none_or(|r| r == rev))
        {
            return;
        }
        let recorded = store::update(
            &self.host,
            &store::cluster_key(&cluster),
            store::load_cluster,
            store::encode_cluster,
            |owner| match owner.clone() {
                None => {
                    *owner = Some(ClusterOwner::Revision(name.to_string()));
                    Change::Write(ClusterRecord::New)
                }
                Some(ClusterOwner::Revision(first)) if first == name => {
                    Change::Keep(ClusterRecord::Same)
                }
                Some(ClusterOwner::Ambiguous) => Change::Keep(ClusterRecord::Ambiguous(None)),
                Some(ClusterOwner::Revision(first)) => {
                    *owner = Some(ClusterOwner::Ambiguous);
                    Change::Write(ClusterRecord::Ambiguous(Some(first)))
                }
            },
        );
        match recorded {
            Ok(ClusterRecord::New) => {
                log::info!(
                    "revision `{name}`: its hosts route to cluster `{cluster}`; requests routed there whose host matches no revision count for it too"
                );
                self.learned_clusters.insert(cluster, Some(rev));
            }
            Ok(ClusterRecord::Same) => {
                self.learned_clusters.insert(cluster, Some(rev));
            }
            Ok(ClusterRecord::Ambiguous(first)) => {
                if let Some(first) = first {
                    log::warn!(
                        "cluster `{cluster}` serves hosts of revisions `{first}` and `{name}`; requests routed there whose host matches no revision are not counted by cluster"
                    );
                }
                self.learned_clusters.insert(cluster, None);
            }
            // Not cached: the next sample tries again.
            Err(e) => log::warn!("recording cluster `{cluster}` failed: {e}"),
        }
    }

    // ---- slots and grants ------------------------------------------------------------------

    /// A slot of `rev` on endpoint `endpoint` (0: none) frees: release it and hand what follows
    /// to the next waiters (highest class, tenants in turn, oldest first).
    fn release(&mut self, rev: RevisionId, endpoint: u32, now: u64) {
        let (Some(config), Some(r)) = (self.config.clone(), self.revisions.get(rev.0)) else {
            return;
        };
        let Some(rc) = config.revision(rev) else {
            return;
        };
        let me = self.id;
        match store::update_revision(&self.host, &r.key, |s| {
            let limits = r.limits(rc, s);
            s.release(me, endpoint, limits, now)
        }) {
            Ok(grants) => self.deliver(rev, grants, now),
            Err(e) => log::error!("releasing a slot of `{}` failed (slot leaked): {e}", r.key),
        }
    }

    /// Releases the slots of abandoned streams held for [`ABANDONED_HOLD_MS`]. Runs at every
    /// request, stream end and tick of this VM, so a slot is held at most until the first of
    /// them after that time.
    fn release_abandoned(&mut self, now: u64) {
        if self.abandoned.is_empty() {
            return;
        }
        let mut due = Vec::new();
        self.abandoned.retain(|(rev, endpoint, lease, since)| {
            let ripe = now.saturating_sub(*since) >= ABANDONED_HOLD_MS;
            if ripe {
                due.push((*rev, *endpoint, *lease));
            }
            !ripe
        });
        for (rev, endpoint, lease) in due {
            self.end_slot(rev, endpoint, lease, now);
        }
    }

    /// Stream `context` holds an ordinary slot of `rev` (on `endpoint` when picked): name the
    /// endpoint for Envoy and remember the stream.
    fn admit_ordinary(
        &mut self,
        config: &Config,
        context: u32,
        rev: RevisionId,
        endpoint: Option<Pick>,
    ) {
        self.route(config, context, endpoint.as_ref());
        self.streams.insert(
            context,
            StreamState::Admitted {
                rev,
                endpoint,
                lease: 0,
            },
        );
    }

    /// A stream's slot frees: back to this VM's lease if it was admitted on the lease still
    /// held, else released in shared state.
    fn end_slot(&mut self, rev: RevisionId, endpoint: u32, lease: u32, now: u64) {
        if !self.end_on_lease(rev, lease, now) {
            self.release(rev, endpoint, now);
        }
    }

    /// Sends each grant to its owner's wake queue. A grant that cannot be delivered (owner VM
    /// gone) is released in the owner's name at once, which grants the next ticket.
    fn deliver(&mut self, rev: RevisionId, grants: Vec<Grant>, now: u64) {
        if grants.is_empty() {
            return;
        }
        let (Some(config), Some(r)) = (self.config.clone(), self.revisions.get(rev.0)) else {
            return;
        };
        let Some(rc) = config.revision(rev) else {
            return;
        };
        let key = r.key.clone();
        let mut pending: VecDeque<Grant> = grants.into();
        let mut handovers = 0;
        while let Some(g) = pending.pop_front() {
            let message = Wake::Grant {
                revision: rc.name.clone(),
                ticket: g.ticket,
                context: g.owner.context,
                endpoint: g.endpoint.clone(),
            }
            .encode();
            let sent = match self.wake_token(g.owner.vm) {
                Some(t) => self.host.enqueue(t, &message),
                None => Err(store::HostError::NotFound),
            };
            let Err(e) = sent else {
                continue;
            };
            log::warn!(
                "worker VM {} unreachable ({e}); passing ticket {}'s slot on",
                g.owner.vm,
                g.ticket
            );
            handovers += 1;
            if handovers > MAX_HANDOVERS {
                log::error!(
                    "too many unreachable waiters of `{}`; stopping hand-over",
                    rc.name
                );
                return;
            }
            let Some(r) = self.revisions.get(rev.0) else {
                return;
            };
            // The slot was counted as the unreachable owner's: give it back in its name.
            match store::update_revision(&self.host, &key, |s| {
                let limits = r.limits(rc, s);
                s.release(g.owner.vm, pick_id(g.endpoint.as_ref()), limits, now)
            }) {
                Ok(more) => pending.extend(more),
                Err(e) => log::error!("passing a slot of `{key}` on failed: {e}"),
            }
        }
    }

    fn wake_token(&mut self, owner: u32) -> Option<u32> {
        if let Some(t) = self.wake_tokens.get(&owner) {
            return Some(*t);
        }
        let bytes = store::read(&self.host, &store::wake_token_key(owner)).ok()?;
        let token = store::load_u32(bytes.as_deref()).ok()??;
        self.wake_tokens.insert(owner, token);
        Some(token)
    }

    /// A message arrived on this VM's wake queue.
    pub fn on_wake(&mut self, message: &[u8], now: u64) {
        match Wake::decode(message) {
            Ok(Wake::Grant {
                revision,
                ticket,
                context,
                endpoint,
            }) => self.on_grant(&revision, ticket, context, endpoint, now),
            Ok(Wake::Shed {
                revision,
                ticket,
                context,
            }) => self.on_evicted(&revision, ticket, context),
            Ok(Wake::Recall { revision }) => self.on_recall(&revision, now),
            Err(e) => log::warn!("{e}"),
        }
    }

    /// A grant arrived for one of this VM's streams: resume it, or pass the slot on.
    fn on_grant(
        &mut self,
        revision: &str,
        ticket: u64,
        context: u32,
        endpoint: Option<Pick>,
        now: u64,
    ) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let Some(rev) = config.table.match_name(revision) else {
            log::warn!("grant for unknown revision `{revision}` dropped");
            return;
        };
        match self.streams.get(&context).cloned() {
            Some(StreamState::Waiting {
                rev: wr,
                ticket: t,
                since_ms,
                class,
            }) if wr == rev && t == ticket => {
                self.admit_ordinary(&config, context, rev, endpoint);
                self.count(rev, class, Outcome::Admitted);
                let ms = now.saturating_sub(since_ms);
                self.effects.push(Effect::QueueWait { rev, ms });
                if self.reports_classes() {
                    self.effects.push(Effect::ClassQueueWait { rev, class, ms });
                }
                self.effects.push(Effect::Resume { context });
            }
            _ => self.release(rev, pick_id(endpoint.as_ref()), now),
        }
    }

    /// A waiter of this VM was evicted from the full buffer for a higher class: answer it
    /// `buffer-full`. A stream that is no longer waiting on that ticket (it left, or expired)
    /// was already answered and counted.
    fn on_evicted(&mut self, revision: &str, ticket: u64, context: u32) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let Some(rev) = config.table.match_name(revision) else {
            return;
        };
        let class = match self.streams.get(&context) {
            Some(StreamState::Waiting {
                rev: wr,
                ticket: t,
                class,
                ..
            }) if *wr == rev && *t == ticket => *class,
            _ => return,
        };
        self.shed_waiter(
            context,
            rev,
            class,
            Reply {
                outcome: Outcome::ShedFull,
                retry_after_s: Some(config.retry_after_s),
                body: format!(
                    "inflight: revision {revision}'s buffer is full and a request of a higher class took this one's place; retry later\n"
                ),
            },
        );
    }

    /// Answers waiting stream `context` (its ticket already gone from the queue) with `reply`,
    /// and counts it.
    fn shed_waiter(&mut self, context: u32, rev: RevisionId, class: u8, reply: Reply) {
        self.streams.remove(&context);
        self.count(rev, class, reply.outcome);
        self.effects.push(Effect::Reply { context, reply });
    }

    /// Resuming stream `context` failed: it ended without its end reaching us yet. Its slot
    /// goes to the next ticket.
    pub fn on_resume_failed(&mut self, context: u32, now: u64) {
        log::debug!("resuming stream {context} failed");
        if let Some(StreamState::Admitted {
            rev,
            endpoint,
            lease,
        }) = self.streams.remove(&context)
        {
            self.end_slot(rev, pick_id(endpoint.as_ref()), lease, now);
        }
    }

    // ---- tick --------------------------------------------------------------------------------

    /// The root context of this worker is being torn down (Envoy ends an old configuration's
    /// root when its last stream ends, e.g. after an ECDS or LDS update). Slots of streams that
    /// ended before their response are still held for [`ABANDONED_HOLD_MS`]; only this
    /// worker's ticks release them, so it must live until then. Returns whether it may end now;
    /// if not, the adapter keeps it ticking and ends it once [`Worker::may_end`] says so.
    /// (Without this, those slots stayed held until the dead-VM reaper, ≈ 5 s, under a limit
    /// that had just been lowered.)
    pub fn on_root_done(&mut self, now: u64) -> bool {
        self.release_abandoned(now);
        self.give_all_leases_back(now);
        self.may_end()
    }

    /// Whether nothing of this worker still needs its ticks (no held slot of an ended stream).
    pub fn may_end(&self) -> bool {
        self.abandoned.is_empty()
    }

    /// The VM's periodic work.
    pub fn on_tick(&mut self, now: u64) {
        let Some(config) = self.config.clone() else {
            return;
        };
        self.release_abandoned(now);
        self.beat(now);
        if config.fleet.is_some() {
            self.fleet.refresh(&self.host);
        }
        self.follow_drain(&config, now);
        self.expire_waiters(&config, now);
        if config.fleet.is_some() {
            self.forward_waiters(&config, now);
        }
        for i in 0..self.revisions.len() {
            self.tick_revision(&config, RevisionId(i), now);
        }
        self.poll_membership(&config, now);
    }

    fn beat(&self, now: u64) {
        if let Err(e) = store::write(
            &self.host,
            &store::heartbeat_key(self.id),
            &now.to_le_bytes(),
        ) {
            log::warn!("heartbeat failed: {e}");
        }
    }

    /// Milliseconds since VM `vm` last beat; `None` if it never did.
    fn heartbeat_age(&self, vm: u32, now: u64) -> Option<u64> {
        let bytes = store::read(&self.host, &store::heartbeat_key(vm)).ok()?;
        let last = store::load_u64(bytes.as_deref()).ok()??;
        Some(now.saturating_sub(last))
    }

    /// Sheds this VM's waiters that reached their maximum wait, and those whose grant was lost.
    fn expire_waiters(&mut self, config: &Config, now: u64) {
        let lost_after = lost_grant_after_ms(config.tick_ms);
        let mut expired: Vec<(u32, RevisionId, u64, bool, u8)> = self
            .streams
            .iter()
            .filter_map(|(ctx, s)| match *s {
                StreamState::Waiting {
                    rev,
                    ticket,
                    since_ms,
                    class,
                } => {
                    let max_wait = config.revision(rev)?.class_max_wait_ms(class);
                    let age = now.saturating_sub(since_ms);
                    let overdue = age >= max_wait.saturating_add(lost_after);
                    (age >= max_wait).then_some((*ctx, rev, ticket, overdue, class))
                }
                StreamState::Admitted { .. } => None,
            })
            .collect();
        // Oldest ticket first, so replies go out in a stable order.
        expired.sort_unstable_by_key(|e| (e.1 .0, e.2));
        for (context, rev, ticket, overdue, class) in expired {
            let (Some(rc), Some(r)) = (config.revision(rev), self.revisions.get(rev.0)) else {
                continue;
            };
            match store::update_revision(&self.host, &r.key, |s| s.cancel(ticket, now)) {
                Ok(found) if found.is_some() || overdue => {
                    if found.is_none() {
                        log::warn!(
                            "ticket {ticket} of `{}` lost its grant; shedding it",
                            rc.name
                        );
                    }
                    let reply = Reply {
                        outcome: Outcome::ShedTimeout,
                        retry_after_s: Some(config.retry_after_s),
                        body: format!(
                            "inflight: revision {} had no free slot within the maximum wait ({}); retry later\n",
                            rc.name,
                            crate::duration::format_ms(rc.class_max_wait_ms(class))
                        ),
                    };
                    self.shed_waiter(context, rev, class, reply);
                }
                // A grant is on its way; on_wake resumes the stream.
                Ok(_) => {}
                Err(e) => log::error!("expiring ticket {ticket} failed: {e}"),
            }
        }
    }

    /// Follows the gateway's drain state (shared, written by whichever worker polled `/ready`):
    /// when it starts, answers this VM's waiters `503 gateway-draining` (their clients retry on
    /// another gateway replica; a grant already on its way still resumes its stream).
    fn follow_drain(&mut self, config: &Config, now: u64) {
        let draining = store::read(&self.host, store::DRAINING_KEY)
            .ok()
            .flatten()
            .is_some_and(|v| v.first() == Some(&1));
        if draining == self.draining {
            return;
        }
        self.draining = draining;
        if !draining {
            log::info!("the gateway is live again: requests may wait for a slot again");
            return;
        }
        let mut waiting: Vec<(u32, RevisionId, u64, u8)> = self
            .streams
            .iter()
            .filter_map(|(ctx, s)| match *s {
                StreamState::Waiting {
                    rev, ticket, class, ..
                } => Some((*ctx, rev, ticket, class)),
                StreamState::Admitted { .. } => None,
            })
            .collect();
        waiting.sort_unstable_by_key(|w| (w.1 .0, w.2));
        log::warn!(
            "the gateway drains: answering {} waiter(s) of this worker 503 gateway-draining; requests that would wait are shed until it is live again",
            waiting.len()
        );
        for (context, rev, ticket, class) in waiting {
            let (Some(rc), Some(r)) = (config.revision(rev), self.revisions.get(rev.0)) else {
                continue;
            };
            match store::update_revision(&self.host, &r.key, |s| s.cancel(ticket, now)) {
                Ok(Some(_)) => {
                    self.shed_waiter(context, rev, class, draining_reply(config, &rc.name));
                }
                // A grant is on its way: the stream goes upstream.
                Ok(None) => {}
                Err(e) => log::error!("shedding ticket {ticket} at drain failed: {e}"),
            }
        }
    }

    /// Other VMs seen holding slots or waiters of `rev` at the last tick that stopped beating.
    fn dead_vms(&self, rev: RevisionId, tick_ms: u64, now: u64) -> Vec<u32> {
        let dead_after = dead_after_ms(tick_ms);
        self.revisions.get(rev.0).map_or(Vec::new(), |r| {
            r.seen
                .iter()
                .copied()
                .filter(|vm| {
                    self.heartbeat_age(*vm, now)
                        .is_none_or(|age| age > dead_after)
                })
                .collect()
        })
    }

    /// Per-revision housekeeping: reap, grant after capacity grew, export demand, step the
    /// autoscaler, refresh gauges. One CAS on the revision state and one on the autoscaler.
    fn tick_revision(&mut self, config: &Config, rev: RevisionId, now: u64) {
        let Some(rc) = config.revision(rev) else {
            return;
        };
        let dead = self.dead_vms(rev, config.tick_ms, now);
        let orphan_age = orphan_age_ms(rc.longest_wait_ms(), config.tick_ms);
        let Some(r) = self.revisions.get(rev.0) else {
            return;
        };
        let me = self.id;
        let headroom = config.slot_lease.headroom;
        // A lease no request used since the last tick goes back (so does one on a revision
        // that may no longer lease, e.g. the gateway drains).
        let idle = r.lease.admits == 0 || !self.may_lease(config, rev);
        let housekeeping = store::update_revision(&self.host, &r.key, |s| {
            let mut h = Housekeeping::default();
            let limits = r.limits(rc, s);
            h.lease = Self::lease_in_swap(me, &r.lease, s, limits, headroom, idle, 0, now);
            for d in &dead {
                let (slots, waiters, grants) = s.reap_vm(*d, r.limits(rc, s), now);
                h.reclaimed_slots += slots;
                h.reclaimed_waiters += waiters;
                h.grants.extend(grants);
            }
            h.reaped = s.reap(now, orphan_age).len();
            let limits = r.limits(rc, s);
            h.limits = Some(limits);
            h.grants.extend(s.grant_ready(limits, now));
            h.demand_delta_ms = s.take_unexported_demand_ms(now);
            h.state = s.clone();
            h
        });
        let mut h = housekeeping;
        if let Ok(h) = &mut h {
            let change = std::mem::take(&mut h.lease);
            self.lease_swapped(rev, change, None, now);
            if let Some(r) = self.revisions.get_mut(rev.0) {
                r.lease.admits = 0;
            }
        }
        let housekeeping = h;
        let h = match housekeeping {
            Ok(h) => h,
            Err(e) => {
                log::warn!("tick for `{}` failed: {e}", rc.name);
                return;
            }
        };
        if h.reclaimed_slots > 0 || h.reclaimed_waiters > 0 {
            log::warn!(
                "revision `{}`: reclaimed {} slot(s) and {} waiter(s) of dead worker VM(s) {dead:?}",
                rc.name,
                h.reclaimed_slots,
                h.reclaimed_waiters
            );
        }
        if h.reaped > 0 {
            log::warn!(
                "reaped {} orphaned waiter(s) of `{}` (their worker VM is gone)",
                h.reaped,
                rc.name
            );
        }
        if let Some(r) = self.revisions.get_mut(rev.0) {
            r.seen = others(&h.state, me);
        }
        self.deliver(rev, h.grants, now);
        if h.demand_delta_ms > 0 {
            self.effects.push(Effect::AddDemand {
                rev,
                ms: h.demand_delta_ms,
            });
        }
        let ready = h.state.ready().unwrap_or(rc.ready_replicas);
        // In a fleet the autoscaler sees the fleet's demand: its own plus its peers' reported
        // increments (docs/fleet.md, "Scaling signals").
        let peers = self.fleet.peer_load(&rc.name, now);
        let observation = Observation {
            now_ms: now,
            demand_ms: h.state.demand_ms(now).saturating_add(peers.demand_ms),
            active: h.state.in_flight().saturating_add(peers.active),
            queued: h.state.queued().saturating_add(peers.queued),
            capacity: h.limits.and_then(|l| l.capacity),
            ready,
        };
        // The capacity gauge is this gateway's slice in a fleet: its slots on ready endpoints.
        let capacity = match &config.fleet {
            Some(_) => h
                .state
                .endpoint_slots(h.limits.and_then(|l| l.per_endpoint))
                .or(Some(0)),
            None => h.limits.and_then(|l| l.capacity),
        };
        self.step_autoscaler(rc, rev, &observation);
        for (gauge, value) in [
            (Gauge::Active, u64::from(h.state.in_flight())),
            (Gauge::Queued, u64::from(h.state.queued())),
            (Gauge::Capacity, capacity.map_or(0, u64::from)),
            (Gauge::ReadyReplicas, u64::from(ready)),
            (Gauge::FleetGateways, self.fleet.gateways()),
        ] {
            self.effects.push(Effect::Gauge { rev, gauge, value });
        }
        if self.reports_classes() {
            let (queued, groups) = h.state.waiting_by_class();
            for (i, _) in rc.classes.iter().enumerate() {
                let Ok(class) = u8::try_from(i) else {
                    break;
                };
                for (gauge, of) in [(ClassGauge::Queued, &queued), (ClassGauge::Groups, &groups)] {
                    let value = u64::from(of.get(i).copied().unwrap_or(0));
                    self.effects.push(Effect::ClassGauge {
                        rev,
                        class,
                        gauge,
                        value,
                    });
                }
            }
        }
    }

    /// One step of the revision's autoscaler (shared by all workers: whoever steps when a
    /// decision is due makes it).
    fn step_autoscaler(&mut self, rc: &RevisionConfig, rev: RevisionId, obs: &Observation) {
        let Some(r) = self.revisions.get(rev.0) else {
            return;
        };
        let stepped = store::update_autoscaler(
            &self.host,
            &r.kpa_key,
            || Autoscaler::new(&rc.autoscaling),
            |a| {
                let decision = a.step(&rc.autoscaling, obs, DEFAULT_DECISION_PERIOD_MS);
                (decision, a.signal())
            },
        );
        let (decision, signal) = match stepped {
            Ok(v) => v,
            Err(e) => {
                log::warn!("autoscaler step for `{}` failed: {e}", rc.name);
                return;
            }
        };
        if decision.is_some_and(|d| d.reason == Reason::QueueAwarePanic) {
            self.effects.push(Effect::QueueAwareScaleUp { rev });
        }
        if let (Some(d), Some(r)) = (decision, self.revisions.get_mut(rev.0)) {
            let previous = r.last_desired.replace(d.desired);
            if previous.is_some_and(|p| p != d.desired) {
                log::info!("revision `{}`: {d}", rc.name);
            } else {
                log::debug!("revision `{}`: {d}", rc.name);
            }
        }
        for (gauge, value) in [
            (Gauge::DesiredReplicas, u64::from(signal.desired)),
            (
                Gauge::StableConcurrencyMilli,
                milli(signal.stable_concurrency),
            ),
            (
                Gauge::PanicConcurrencyMilli,
                milli(signal.panic_concurrency),
            ),
        ] {
            self.effects.push(Effect::Gauge { rev, gauge, value });
        }
    }

    // ---- membership --------------------------------------------------------------------------

    /// Asks Envoy's admin for cluster membership, at most once per interval across all workers.
    fn poll_membership(&mut self, config: &Config, now: u64) {
        let Some(m) = &config.membership else {
            return;
        };
        if self.poll != Poll::Idle || self.ready_poll != Poll::Idle {
            return;
        }
        match claim_poll(&self.host, now, m.interval_ms) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::warn!("membership poll claim failed: {e}");
                return;
            }
        }
        self.poll = Poll::Dispatching;
        self.ready_poll = Poll::Dispatching;
        self.effects.push(Effect::Poll(poll_request(m, config)));
        self.effects.push(Effect::Poll(PollRequest {
            kind: PollKind::Ready,
            cluster: m.cluster.clone(),
            authority: m.authority.clone(),
            path: READY_PATH.to_string(),
            timeout_ms: m.timeout_ms,
        }));
        if let Some(f) = &config.fleet {
            self.ask_peers(f, m, now);
        }
    }

    /// The adapter sent (`Ok(token)`) or could not send the poll of [`Effect::Poll`] of `kind`.
    pub fn on_poll_dispatched(&mut self, kind: PollKind, sent: Result<u32, String>) {
        let poll = match kind {
            PollKind::Endpoints => &mut self.poll,
            PollKind::Ready => &mut self.ready_poll,
        };
        match sent {
            Ok(token) => *poll = Poll::InFlight(token),
            Err(why) => {
                *poll = Poll::Idle;
                self.poll_failed(&why);
            }
        }
    }

    /// Whether `token` is one of this VM's admin polls or peer report requests (the answer to
    /// read).
    pub fn awaits_poll(&self, token: u32) -> bool {
        self.poll == Poll::InFlight(token)
            || self.ready_poll == Poll::InFlight(token)
            || self.fleet.awaits(token)
    }

    /// The answer to the `/ready` poll: 503 `DRAINING` starts the drain for every worker (a
    /// shared flag, followed at each worker's tick), 200 ends it; anything else keeps it.
    fn on_ready_answer(&mut self, status: &str, body: Result<Vec<u8>, String>) {
        let draining = match (status, &body) {
            ("200", _) => false,
            ("503", Ok(b)) if b.trim_ascii() == b"DRAINING" => true,
            _ => return,
        };
        if let Err(e) = store::write(&self.host, store::DRAINING_KEY, &[u8::from(draining)]) {
            log::warn!("recording the drain state failed: {e}");
        }
    }

    /// The admin's answer to poll `token`: its `:status` (empty: none came, a timeout or
    /// reset) and its body (or why it could not be read). A 200 records each revision's
    /// endpoints (routing on) or its ready count, and grants what now fits; anything else keeps
    /// the last view.
    pub fn on_poll_answer(
        &mut self,
        token: u32,
        status: &str,
        body: Result<Vec<u8>, String>,
        now: u64,
    ) {
        if self.ready_poll == Poll::InFlight(token) {
            self.ready_poll = Poll::Idle;
            return self.on_ready_answer(status, body);
        }
        if self.fleet.awaits(token) {
            return self.on_peer_answer(token, status, body, now);
        }
        if self.poll != Poll::InFlight(token) {
            return;
        }
        self.poll = Poll::Idle;
        let Some(config) = self.config.clone() else {
            return;
        };
        let body = match (status, body) {
            ("", _) => return self.poll_failed("no answer (timeout or reset)"),
            ("200", Ok(b)) => b,
            ("200", Err(why)) => {
                return self.poll_failed(&format!("reading the body failed: {why}"))
            }
            (other, _) => return self.poll_failed(&format!("status {other}")),
        };
        let clusters: Vec<&str> = config
            .revisions
            .iter()
            .filter_map(|r| r.upstream_cluster.as_deref())
            .chain(config.fleet.as_ref().map(|f| f.peer_cluster.as_str()))
            .collect();
        let reported = match membership::endpoints(&body, &clusters) {
            Ok(h) => h,
            Err(e) => return self.poll_failed(&e.to_string()),
        };
        let fleet = match &config.fleet {
            Some(f) => {
                let listed = reported
                    .get(f.peer_cluster.as_str())
                    .map(|hosts| hosts.iter().map(|h| h.address.clone()).collect::<Vec<_>>());
                self.fleet_members(listed, now)
            }
            None => None,
        };
        let routing = config.endpoint_header.is_some();
        for (i, rc) in config.revisions.iter().enumerate() {
            let rev = RevisionId(i);
            let Some(cluster) = rc.upstream_cluster.as_deref() else {
                continue;
            };
            let Some(hosts) = reported.get(cluster) else {
                // Envoy has no such cluster: nothing to pick from; the configured ready
                // replicas apply (requests to a missing cluster fail in Envoy anyway).
                if let Some(r) = self.revisions.get(i) {
                    let unknown = store::update_revision(&self.host, &r.key, |s| {
                        let unknown = s.ready().is_none();
                        if unknown {
                            s.set_ready(rc.ready_replicas);
                        }
                        unknown
                    });
                    if unknown.unwrap_or(false) {
                        log::warn!(
                            "revision `{}`: Envoy lists no cluster `{cluster}`; using readyReplicas {}",
                            rc.name,
                            rc.ready_replicas
                        );
                    }
                }
                continue;
            };
            let n = u32::try_from(hosts.iter().filter(|h| h.ready).count()).unwrap_or(u32::MAX);
            let Some(r) = self.revisions.get(i) else {
                continue;
            };
            match store::update_revision(&self.host, &r.key, |s| {
                let before = s.ready();
                if let Some(f) = &fleet {
                    s.set_endpoints_capped(hosts.iter().map(|h| (h.address.as_str(), h.ready)), 0);
                    f.apply(&rc.name, s, r.limits(rc, s), now);
                } else if routing {
                    s.set_endpoints(hosts.iter().map(|h| (h.address.as_str(), h.ready)));
                } else {
                    s.set_ready(n);
                }
                let limits = r.limits(rc, s);
                (before, s.grant_ready(limits, now))
            }) {
                Ok((before, grants)) => {
                    if before != Some(n) {
                        log::info!(
                            "revision `{}`: {n} ready replica(s) (was {before:?})",
                            rc.name
                        );
                    }
                    self.deliver(rev, grants, now);
                }
                Err(e) => log::warn!("recording ready replicas of `{}` failed: {e}", rc.name),
            }
        }
    }

    fn poll_failed(&mut self, why: &str) {
        log::warn!("membership poll failed (keeping the last ready counts): {why}");
        self.effects.push(Effect::PollFailed);
    }
}

impl RevisionVm {
    /// Limits from the shared state: the newest configuration's parameters (after a reload,
    /// VMs of the old one apply the new limits too), with ready replicas learned from Envoy.
    fn limits(&self, rc: &RevisionConfig, s: &RevisionState) -> Limits {
        let p = s.limit_params(self.generation, rc.limit_params());
        if self.needs_endpoints && s.endpoints().is_none() && s.ready().is_none() {
            // Every request must name its endpoint (Envoy's override_host policy refuses one
            // that does not): before the first poll, no endpoint is ready yet.
            return p.limits(0);
        }
        p.limits(s.ready().unwrap_or(p.ready_replicas))
    }
}

/// What one tick's CAS on a revision did.
#[derive(Default)]
struct Housekeeping {
    lease: lease_ops::LeaseChange,
    reclaimed_slots: u32,
    reclaimed_waiters: usize,
    reaped: usize,
    grants: Vec<Grant>,
    limits: Option<Limits>,
    demand_delta_ms: u64,
    state: RevisionState,
}

/// Why an arrival's swap wrote nothing: forward it to a peer gateway, or recall the other VMs'
/// slot leases (these VMs) and decide again.
enum Detour {
    Forward(String),
    Recall(Vec<u32>),
}

/// What [`Worker::learn_cluster`]'s CAS found.
enum ClusterRecord {
    New,
    Same,
    /// Recorded for another revision (`Some(first)`, now marked ambiguous), or already
    /// ambiguous (`None`).
    Ambiguous(Option<String>),
}

/// Other VMs than `me` holding slots or waiters in `state`.
fn others(state: &RevisionState, me: u32) -> Vec<u32> {
    let mut others: Vec<u32> = state
        .holders()
        .map(|h| h.0)
        .chain(state.waiters().map(|w| w.owner.vm))
        .filter(|v| *v != me)
        .collect();
    others.sort_unstable();
    others.dedup();
    others
}

fn poll_request(m: &Membership, config: &Config) -> PollRequest {
    let clusters: Vec<&str> = config
        .revisions
        .iter()
        .filter_map(|r| r.upstream_cluster.as_deref())
        .chain(config.fleet.as_ref().map(|f| f.peer_cluster.as_str()))
        .collect();
    PollRequest {
        kind: PollKind::Endpoints,
        cluster: m.cluster.clone(),
        authority: m.authority.clone(),
        path: membership::clusters_path(&clusters),
        timeout_ms: m.timeout_ms,
    }
}

/// The reply to a request shed because the gateway drains.
fn draining_reply(config: &Config, revision: &str) -> Reply {
    Reply {
        outcome: Outcome::ShedDraining,
        retry_after_s: Some(config.retry_after_s),
        body: format!(
            "inflight: this gateway is draining and revision {revision} has no free slot here; retry (another gateway replica serves it)\n"
        ),
    }
}

/// The fairness group of a fairness key: its 32-bit FNV-1a hash, stable across VMs and builds
/// (0 is kept for "no key", so a key hashing to 0 takes 1).
pub fn fairness_group(key: &str) -> u32 {
    let h = key.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    h.max(1)
}

/// The id a slot is released under: its endpoint's, or 0 (none).
fn pick_id(p: Option<&Pick>) -> u32 {
    p.map_or(0, |p| p.id)
}

fn milli(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        (v * 1000.0).round() as u64
    } else {
        0
    }
}

/// Claims the next membership poll if `interval_ms` passed since the last claim by any worker.
fn claim_poll<H: Host>(host: &H, now: u64, interval_ms: u64) -> Result<bool, StoreError> {
    store::update(
        host,
        store::POLL_CLAIM_KEY,
        store::load_u64,
        |v| v.unwrap_or(0).to_le_bytes().to_vec(),
        |last| {
            if last.is_some_and(|l| now.saturating_sub(l) < interval_ms) {
                return Change::Keep(false);
            }
            *last = Some(now);
            Change::Write(true)
        },
    )
}

/// The generation of the configuration `bytes`: the same bytes get the same generation; other
/// bytes than the last configured get the next one. Orders configurations across a reload.
fn config_generation<H: Host>(host: &H, bytes: &[u8]) -> Result<u64, StoreError> {
    // FNV-1a: a stable fingerprint of the configuration bytes.
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    store::update(
        host,
        store::CONFIG_GENERATION_KEY,
        store::load_generation,
        store::encode_generation,
        |current| match *current {
            Some((generation, last)) if last == hash => Change::Keep(generation),
            _ => {
                let next = current.map_or(0, |c| c.0).wrapping_add(1);
                *current = Some((next, hash));
                Change::Write(next)
            }
        },
    )
}

#[cfg(test)]
mod tests;
