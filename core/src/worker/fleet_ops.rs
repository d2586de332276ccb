//! The worker's side of a fleet of gateways (docs/fleet.md; the rules live in `crate::fleet`).
//!
//! - The membership poll also lists the peer cluster: [`Worker::fleet_members`] records it in
//!   the gateway's shared [`FleetRecord`], and the caps of every endpoint are recomputed in the
//!   same swap that records the endpoints ([`FleetCaps::apply`]).
//! - The worker that polls also asks every peer for its report ([`Effect::PeerCall`]); each
//!   answer (or failure) updates the record, then every revision's caps ([`Worker::recap`]).
//! - Each tick every worker refreshes its copy of the record ([`FleetVm::refresh`]): forwarding
//!   decisions and the fleet-wide autoscaler input read that copy, never shared data per request.

use super::{Effect, Worker};
use crate::admission::{RevisionState, NO_CAP};
use crate::config::{Config, Fleet, Limits, Membership};
use crate::fleet::{EndpointReport, EndpointView, FleetRecord, Report, RevisionReport, Timing};
use crate::store::{self, Change, Host};
use crate::table::RevisionId;
use std::collections::HashMap;
use std::rc::Rc;

/// Shared-data key of the gateway's [`FleetRecord`].
pub const FLEET_KEY: &str = "inflight.v1.fleet";

/// What Envoy's node says about this gateway; the adapter reads it once per VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Node metadata `INFLIGHT_FLEET_SELF` (`IP:port`).
    pub fleet_self: Option<String>,
    /// Istio's node metadata `INSTANCE_IPS` (comma-separated addresses).
    pub instance_ips: Option<String>,
}

/// Load the peers reported for a revision (fresh reports of members only).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct PeerLoad {
    /// The peers' demand increments so far (request-milliseconds).
    pub demand_ms: u64,
    pub queued: u32,
    pub active: u32,
}

/// This VM's fleet state.
#[derive(Debug, Default)]
pub(super) struct FleetVm {
    on: bool,
    /// This gateway's peer address, when it could be found.
    me: Option<String>,
    /// Every address this gateway may be known by (Istio's `INSTANCE_IPS` with `peerPort`, in
    /// order); the first one the peer cluster lists is `me`.
    candidates: Vec<String>,
    my_port: Option<u16>,
    timing: Option<Timing>,
    lost_after_ms: u64,
    /// A copy of the shared record (refreshed each tick and after each update by this VM).
    view: FleetRecord,
    /// Requests forwarded to each peer since the last refresh.
    sent: HashMap<String, u32>,
    /// Report requests in flight: (token, peer).
    calls: Vec<(u32, String)>,
    /// The last members this VM logged.
    logged_members: Vec<String>,
    /// Streams a peer forwarded here (they are never forwarded again).
    forwarded_in: std::collections::HashSet<u32>,
}

/// What the caps of one revision are computed from.
pub(super) struct FleetCaps {
    record: FleetRecord,
    me: String,
    timing: Timing,
}

impl FleetCaps {
    /// Sets the caps of `s`'s endpoints (revision `name`, at `limits`): outside a fleet's split
    /// for cc 0 (unlimited), else by the hand-over rule.
    pub(super) fn apply(&self, name: &str, s: &mut RevisionState, limits: Limits, now: u64) {
        let Some(cc) = limits.per_endpoint else {
            s.set_caps(|_| NO_CAP);
            return;
        };
        let Some(endpoints) = s.endpoints() else {
            return;
        };
        let views: Vec<EndpointView<'_>> = endpoints
            .iter()
            .map(|e| EndpointView {
                address: &e.address,
                // A cap from before the fleet (or cc 0) counts as none: gained like any other.
                cap: if e.cap == NO_CAP { 0 } else { e.cap },
            })
            .collect();
        let caps = self
            .record
            .caps(&self.me, name, cc, &views, now, self.timing);
        let mut it = caps.into_iter();
        s.set_caps(|_| it.next().unwrap_or(0));
    }
}

impl FleetVm {
    /// Follows a new configuration: finds this gateway's own peer address.
    pub(super) fn configure(&mut self, config: &Config, node: &NodeFacts) {
        let Some(f) = &config.fleet else {
            *self = FleetVm::default();
            return;
        };
        self.on = true;
        self.lost_after_ms = f.lost_after_ms;
        self.timing = config
            .membership
            .as_ref()
            .map(|m| Timing::for_poll(m.interval_ms, m.timeout_ms));
        self.candidates = own_addresses(f, node);
        self.me = self.candidates.first().cloned();
        self.my_port = self
            .me
            .as_deref()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port());
        match &self.me {
            Some(me) => log::info!("fleet: this gateway's peer address is {me}"),
            None => log::error!(
                "fleet: this gateway's own peer address is unknown (set fleet.self, node metadata {}, or Istio's INSTANCE_IPS): it owns no slot and forwards every request to its peers",
                crate::fleet::SELF_METADATA_KEY
            ),
        }
    }

    /// Whether the request at hand arrived on this gateway's peer port (a peer forwarded it).
    pub(super) fn arrived_on_peer_port(&self, facts: &impl super::RequestFacts) -> bool {
        self.my_port.is_some() && facts.local_port() == self.my_port
    }

    /// Where a request of revision `rev` may be forwarded, by this VM's copy of the reports: a
    /// member with a free slot, else (with `any`) a member with slots.
    pub(super) fn forward_target(&self, rev: &str, now: u64, any: bool) -> Option<String> {
        let t = self.timing?;
        let sent = |p: &str| self.sent.get(p).copied().unwrap_or(0);
        self.view.forward_target(rev, now, t.fresh_ms, &sent, any)
    }

    pub(super) fn arrived_forwarded(&mut self, context: u32) {
        self.forwarded_in.insert(context);
    }

    pub(super) fn ended(&mut self, context: u32) {
        if self.on {
            self.forwarded_in.remove(&context);
        }
    }

    pub(super) fn forwarded_to(&mut self, peer: &str) {
        *self.sent.entry(peer.to_string()).or_insert(0) += 1;
    }

    /// Re-reads the shared record.
    pub(super) fn refresh<H: Host>(&mut self, host: &H) {
        if !self.on {
            return;
        }
        let bytes = store::read(host, FLEET_KEY).ok().flatten();
        self.view = FleetRecord::decode(bytes.as_deref());
        self.sent.clear();
    }

    pub(super) fn awaits(&self, token: u32) -> bool {
        self.calls.iter().any(|(t, _)| *t == token)
    }

    /// The fleet's size as this gateway sees it (1 without a fleet).
    pub(super) fn gateways(&self) -> u64 {
        if self.on {
            self.view.members.len() as u64
        } else {
            1
        }
    }

    /// What the peers report for revision `rev`.
    pub(super) fn peer_load(&self, rev: &str, now: u64) -> PeerLoad {
        let (Some(t), true) = (self.timing, self.on) else {
            return PeerLoad::default();
        };
        let mut load = PeerLoad {
            demand_ms: self.view.peer_demand_ms(rev),
            ..PeerLoad::default()
        };
        for p in &self.view.peers {
            if now.saturating_sub(p.received_ms) > t.fresh_ms {
                continue;
            }
            if let Some(rr) = p.report.as_ref().and_then(|r| r.revision(rev)) {
                load.queued = load.queued.saturating_add(rr.queued);
                let active: u32 = rr.endpoints.iter().map(|e| e.active).sum();
                load.active = load.active.saturating_add(active);
            }
        }
        load
    }
}

/// This gateway's possible peer addresses: `fleet.self`, else node metadata
/// `INFLIGHT_FLEET_SELF`, else each of Istio's `INSTANCE_IPS` with `peerPort` (a dual-stack pod
/// has two; the one the peer cluster lists wins).
fn own_addresses(f: &Fleet, node: &NodeFacts) -> Vec<String> {
    let valid = |a: &str| a.parse::<std::net::SocketAddr>().is_ok();
    if let Some(a) = &f.self_address {
        return vec![a.clone()];
    }
    if let Some(a) = node.fleet_self.as_deref().map(str::trim) {
        if valid(a) {
            return vec![a.to_string()];
        }
        log::error!(
            "fleet: node metadata {} is `{a}`, not an IP:port address",
            crate::fleet::SELF_METADATA_KEY
        );
    }
    node.instance_ips
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter_map(|ip| match ip.parse::<std::net::IpAddr>().ok()? {
            std::net::IpAddr::V4(_) => Some(format!("{ip}:{}", f.peer_port)),
            std::net::IpAddr::V6(_) => Some(format!("[{ip}]:{}", f.peer_port)),
        })
        .collect()
}

impl<H: Host> Worker<H> {
    /// Tells the worker what Envoy's node says (call before [`Worker::configure`]).
    pub fn set_node(&mut self, node: NodeFacts) {
        self.node = node;
    }

    /// Records the peer cluster's listed addresses (`None`: the poll did not list the cluster)
    /// and returns what caps are computed from. `None` when the record cannot be updated.
    pub(super) fn fleet_members(
        &mut self,
        listed: Option<Vec<String>>,
        now: u64,
    ) -> Option<FleetCaps> {
        let config = self.config.clone()?;
        let f = config.fleet.as_ref()?;
        let timing = self.fleet.timing?;
        if let (Some(l), true) = (&listed, self.fleet.candidates.len() > 1) {
            if let Some(c) = self.fleet.candidates.iter().find(|c| l.contains(c)) {
                self.fleet.me = Some(c.clone());
                self.fleet.my_port = c
                    .parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|a| a.port());
            }
        }
        let me = self.fleet.me.clone().unwrap_or_default();
        if listed.is_none() {
            log::warn!(
                "fleet: Envoy lists no cluster `{}` (the peer cluster): keeping the last members",
                f.peer_cluster
            );
        }
        let record = store::update(
            &self.host,
            FLEET_KEY,
            |b| Ok(FleetRecord::decode(b)),
            FleetRecord::encode,
            |r| {
                if let Some(l) = &listed {
                    r.set_members(l.iter().cloned(), &me, now);
                }
                Change::Write(r.clone())
            },
        );
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                log::warn!("fleet: recording the members failed: {e}");
                return None;
            }
        };
        if record.members != self.fleet.logged_members {
            self.fleet.logged_members = record.members.clone();
            match record.index_of(&me) {
                Some(i) => log::info!(
                    "fleet: {} gateway(s) {:?}; this one ({me}) is number {i}",
                    record.members.len(),
                    record.members
                ),
                None => log::warn!(
                    "fleet: {} gateway(s) {:?} and this one ({me}) is not among them: it owns no slot and forwards",
                    record.members.len(),
                    record.members
                ),
            }
        }
        self.fleet.view = record.clone();
        Some(FleetCaps { record, me, timing })
    }

    /// Asks every peer this VM is not already asking for its report.
    pub(super) fn ask_peers(&mut self, f: &Fleet, m: &Membership, _now: u64) {
        let bytes = store::read(&self.host, FLEET_KEY).ok().flatten();
        let record = FleetRecord::decode(bytes.as_deref());
        for p in &record.peers {
            if self.fleet.calls.iter().any(|(_, peer)| peer == &p.address) {
                continue;
            }
            self.effects.push(Effect::PeerCall {
                cluster: f.forward_cluster.clone(),
                header: Rc::clone(&f.forward_header),
                peer: p.address.clone(),
                timeout_ms: m.timeout_ms,
            });
        }
    }

    /// The adapter sent (`Ok(token)`) or could not send the report request of
    /// [`Effect::PeerCall`] to `peer`.
    pub fn on_peer_dispatched(&mut self, peer: &str, sent: Result<u32, String>, now: u64) {
        match sent {
            Ok(token) => self.fleet.calls.push((token, peer.to_string())),
            Err(why) => {
                log::warn!("fleet: asking peer {peer} for its report failed: {why}");
                self.peer_failed(peer, now);
            }
        }
    }

    /// A peer's answer to report request `token`.
    pub(super) fn on_peer_answer(
        &mut self,
        token: u32,
        status: &str,
        body: Result<Vec<u8>, String>,
        now: u64,
    ) {
        let Some(i) = self.fleet.calls.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, peer) = self.fleet.calls.swap_remove(i);
        let report = match (status, body) {
            ("200", Ok(b)) => Report::decode(&b),
            ("", _) => Err("no answer (timeout or reset)".to_string()),
            (s, _) => Err(format!("status {s}")),
        };
        let report = match report {
            Ok(r) => r,
            Err(why) => {
                log::debug!("fleet: peer {peer} gave no report: {why}");
                return self.peer_failed(&peer, now);
            }
        };
        let accepted = store::update(
            &self.host,
            FLEET_KEY,
            |b| Ok(FleetRecord::decode(b)),
            FleetRecord::encode,
            |r| Change::Write(r.on_report(&peer, report.clone(), now)),
        );
        match accepted {
            Ok(true) => {}
            Ok(false) => log::warn!(
                "fleet: the report asked of {peer} came from {} (the forward cluster must reach the address in the forward header)",
                report.from
            ),
            Err(e) => log::warn!("fleet: recording {peer}'s report failed: {e}"),
        }
        self.recap(now);
    }

    fn peer_failed(&mut self, peer: &str, now: u64) {
        let lost_after = self.fleet.lost_after_ms;
        let lost = store::update(
            &self.host,
            FLEET_KEY,
            |b| Ok(FleetRecord::decode(b)),
            FleetRecord::encode,
            |r| Change::Write(r.on_report_failed(peer, now, lost_after)),
        );
        match lost {
            Ok(true) => {
                log::warn!(
                    "fleet: peer {peer} answered no report for {lost_after}ms: taken for dead, its slots go to the others"
                );
                self.recap(now);
            }
            Ok(false) => {}
            Err(e) => log::warn!("fleet: recording {peer}'s failure failed: {e}"),
        }
    }

    /// Recomputes every revision's caps from the shared record, and grants what they allow.
    pub(super) fn recap(&mut self, now: u64) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let Some(timing) = self.fleet.timing else {
            return;
        };
        let bytes = store::read(&self.host, FLEET_KEY).ok().flatten();
        let caps = FleetCaps {
            record: FleetRecord::decode(bytes.as_deref()),
            me: self.fleet.me.clone().unwrap_or_default(),
            timing,
        };
        for (i, rc) in config.revisions.iter().enumerate() {
            let Some(r) = self.revisions.get(i) else {
                continue;
            };
            let granted = store::update_revision(&self.host, &r.key, |s| {
                if s.endpoints().is_none() {
                    return Vec::new();
                }
                let limits = r.limits(rc, s);
                caps.apply(&rc.name, s, limits, now);
                s.grant_ready(limits, now)
            });
            match granted {
                Ok(grants) => self.deliver(RevisionId(i), grants, now),
                Err(e) => log::warn!("fleet: updating the caps of `{}` failed: {e}", rc.name),
            }
        }
        self.fleet.view = caps.record;
    }

    /// Forwards this VM's waiters that a peer can serve sooner: all of them while this gateway
    /// owns no slot of their revision (to a peer with free slots, else one with slots), else
    /// the oldest ones while a peer reports free slots. Requests that a peer forwarded here
    /// stay. Runs each tick: a request that queued here before any peer's report showed slots
    /// (a gateway that just started, a fleet that just changed) moves as soon as one does.
    pub(super) fn forward_waiters(&mut self, config: &Config, now: u64) {
        let Some(f) = &config.fleet else {
            return;
        };
        let mut waiting: Vec<(u32, RevisionId, u64, u8)> = self
            .streams
            .iter()
            .filter(|(ctx, _)| !self.fleet.forwarded_in.contains(ctx))
            .filter_map(|(ctx, s)| match *s {
                super::StreamState::Waiting {
                    rev, ticket, class, ..
                } => Some((*ctx, rev, ticket, class)),
                super::StreamState::Admitted { .. } => None,
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        waiting.sort_unstable_by_key(|w| (w.1 .0, w.2));
        for (context, rev, ticket, class) in waiting {
            let (Some(rc), Some(r)) = (config.revision(rev), self.revisions.get(rev.0)) else {
                continue;
            };
            let Ok(bytes) = store::read(&self.host, &r.key) else {
                continue;
            };
            let Ok(state) = store::load_revision(bytes.as_deref()) else {
                continue;
            };
            let limits = r.limits(rc, &state);
            let owned = state.endpoint_slots(limits.per_endpoint).unwrap_or(0);
            let Some(peer) = self.fleet.forward_target(&rc.name, now, owned == 0) else {
                continue;
            };
            match store::update_revision(&self.host, &r.key, |s| s.cancel(ticket, now)) {
                Ok(Some(_)) => {}
                // A grant is on its way: it goes upstream here.
                Ok(None) => continue,
                Err(e) => {
                    log::warn!("fleet: taking ticket {ticket} out to forward it failed: {e}");
                    continue;
                }
            }
            self.streams.remove(&context);
            self.route(config, context, None);
            self.effects.push(Effect::Forward {
                context,
                header: Rc::clone(&f.forward_header),
                peer: Some(peer.clone()),
            });
            self.effects.push(Effect::Resume { context });
            self.fleet.forwarded_to(&peer);
            self.count(rev, class, crate::outcome::Outcome::Forwarded);
        }
    }

    /// This gateway's report to a peer.
    pub(super) fn fleet_report(&self, config: &Config, now: u64) -> String {
        let bytes = store::read(&self.host, FLEET_KEY).ok().flatten();
        let record = FleetRecord::decode(bytes.as_deref());
        let mut revisions = Vec::with_capacity(config.revisions.len());
        for (i, rc) in config.revisions.iter().enumerate() {
            let Some(r) = self.revisions.get(i) else {
                continue;
            };
            let Ok(bytes) = store::read(&self.host, &r.key) else {
                continue;
            };
            let Ok(s) = store::load_revision(bytes.as_deref()) else {
                continue;
            };
            let limits = r.limits(rc, &s);
            let cc = limits.per_endpoint.unwrap_or(0);
            let endpoints: Vec<EndpointReport> = s
                .endpoints()
                .unwrap_or_default()
                .iter()
                .map(|e| EndpointReport {
                    address: e.address.clone(),
                    cap: e.cap.min(cc),
                    active: e.active,
                })
                .collect();
            let ready = s
                .endpoints()
                .unwrap_or_default()
                .iter()
                .filter(|e| e.state == crate::admission::EndpointState::Ready);
            let free: u32 = ready
                .map(|e| e.cap.min(cc).saturating_sub(e.active))
                .sum::<u32>()
                .saturating_sub(s.queued());
            revisions.push(RevisionReport {
                name: rc.name.clone(),
                cc,
                free,
                slots: s.endpoint_slots(limits.per_endpoint).unwrap_or(0),
                queued: s.queued(),
                demand_ms: s.demand_ms(now),
                endpoints,
            });
        }
        Report {
            from: self.fleet.me.clone().unwrap_or_default(),
            fleet: crate::fleet::fleet_hash(&record.members),
            members: u32::try_from(record.members.len()).unwrap_or(u32::MAX),
            revisions,
        }
        .encode()
    }
}
