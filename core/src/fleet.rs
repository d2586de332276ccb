//! A fleet of gateways sharing every endpoint's `containerConcurrency` (docs/fleet.md).
//!
//! Three pure pieces, kept apart from the worker so that each is tested on its own:
//! - [`share`]: the deterministic split. Endpoint `e`'s `cc` slots are divided among the `N`
//!   members (the healthy peer addresses, sorted): `cc / N` each, and the `cc mod N` remaining
//!   slots go to the members after a rotation `hash(e) mod N`. The shares of an endpoint sum to
//!   exactly `cc`, and depend on that endpoint, `cc` and the members only: a pod that comes or
//!   goes moves no other pod's slots.
//! - [`Report`]: what a gateway tells its peers once per interval (who it is, its view of the
//!   fleet, per revision its `cc` and per endpoint the slots it may use and holds).
//! - [`FleetRecord::caps`]: the hand-over rule. Losing slots is immediate (a cap never exceeds
//!   the share); a cap rises only while every member's fresh report shows the same fleet and the
//!   same `cc`, and only into what the other gateways cannot be using — each counted at
//!   `max(its share, its reported cap, its reported in flight)`, and gateways that left the
//!   fleet at their last reported `max(cap, in flight)` until they hold nothing or are lost.
//!
//! The worker keeps a [`FleetRecord`] in shared data (all its VMs see the same fleet), writes
//! the caps into each revision's endpoints, and admission picks an endpoint only below its cap.

use serde::{Deserialize, Serialize};

/// The path a gateway answers its peers' report requests on (on its peer port only).
pub const REPORT_PATH: &str = "/.inflight/v1/fleet";

/// Envoy's node metadata key naming a gateway's own peer address (`IP:port`).
pub const SELF_METADATA_KEY: &str = "INFLIGHT_FLEET_SELF";

/// A stable 32-bit hash (FNV-1a) of an endpoint address: the rotation of its split.
pub fn address_hash(address: &str) -> u32 {
    address.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A fingerprint (FNV-1a, 64 bits) of a fleet's sorted member list: two gateways agree on the
/// fleet iff their fingerprints match.
pub fn fleet_hash(members: &[String]) -> u64 {
    members
        .iter()
        .flat_map(|m| m.bytes().chain(std::iter::once(b'\n')))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Slots of endpoint `endpoint` (at `cc`) owned by member `me` of a fleet of `members`.
/// For each endpoint the shares of members `0..members` sum to exactly `cc`; 0 for a `me`
/// outside the fleet.
pub fn share(endpoint: &str, cc: u32, members: usize, me: usize) -> u32 {
    let (Ok(n), Ok(i)) = (u32::try_from(members), u32::try_from(me)) else {
        return 0;
    };
    if n == 0 || i >= n {
        return 0;
    }
    let r = address_hash(endpoint) % n;
    cc / n + u32::from((i + n - r) % n < cc % n)
}

/// A gateway's report to its peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The reporter's own peer address.
    pub from: String,
    /// [`fleet_hash`] of the reporter's members.
    pub fleet: u64,
    /// How many members the reporter sees.
    pub members: u32,
    pub revisions: Vec<RevisionReport>,
}

/// One revision in a [`Report`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionReport {
    pub name: String,
    /// The `containerConcurrency` the reporter applies.
    pub cc: u32,
    /// Slots free on its ready endpoints, less its queue (what a forwarded request would find).
    pub free: u32,
    /// Its slots on ready endpoints (the sum of its caps).
    pub slots: u32,
    pub queued: u32,
    /// Its cumulative demand, ∫ (in flight + queued) dt, in request-milliseconds.
    pub demand_ms: u64,
    pub endpoints: Vec<EndpointReport>,
}

/// One endpoint in a [`RevisionReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointReport {
    pub address: String,
    /// Slots the reporter may use on it.
    pub cap: u32,
    /// Requests the reporter has in flight on it.
    pub active: u32,
}

impl Report {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Report, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("bad fleet report: {e}"))
    }

    pub fn revision(&self, name: &str) -> Option<&RevisionReport> {
        self.revisions.iter().find(|r| r.name == name)
    }
}

impl RevisionReport {
    /// `max(cap, active)` on endpoint `address`: what the reporter may have in flight there.
    fn claim(&self, address: &str, cc: u32) -> u32 {
        self.endpoints
            .iter()
            .find(|e| e.address == address)
            .map_or(0, |e| e.cap.min(cc).max(e.active))
    }

    /// Whether it may hold anything anywhere.
    fn holds_any(&self) -> bool {
        self.endpoints.iter().any(|e| e.cap > 0 || e.active > 0)
    }
}

/// What a gateway knows of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub address: String,
    /// Its latest report; dropped once it is lost.
    pub report: Option<Report>,
    /// When the latest report arrived.
    pub received_ms: u64,
    /// Since when its reports fail (none: the last one arrived).
    pub failing_since_ms: Option<u64>,
    /// Its reports failed for `lostAfter`: taken for dead, out of the fleet until it answers.
    pub lost: bool,
    /// Per revision, its cumulative demand as last reported (to add only its increments).
    pub demand_seen: Vec<(String, u64)>,
}

/// The fleet as this gateway sees it: shared by its workers (one JSON record in shared data).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetRecord {
    /// The healthy peer addresses of the peer cluster, sorted; empty until first listed.
    pub listed: Vec<String>,
    /// The members: the listed addresses less the peers taken for dead (`lost`).
    pub members: Vec<String>,
    /// Since when `members` has been what it is.
    pub members_since_ms: u64,
    /// Peers to ask for reports: members other than this gateway, and gateways that left the
    /// fleet while they may still hold slots.
    pub peers: Vec<PeerRecord>,
    /// Per revision, the sum of the peers' demand increments (request-milliseconds): added to
    /// this gateway's own demand, it makes the autoscaler's input fleet-wide.
    pub peer_demand_ms: Vec<(String, u64)>,
}

/// How old a peer's report may be, and how long a new view must stand, before a cap rises.
///
/// A report reaches its reader at most `timeout_ms` after it was written (the report request's
/// timeout). A gateway raises a cap only when (1) its view of the members has not changed for
/// `settle_ms`, and (2) every report it counts arrived after that view began and within
/// `fresh_ms`. With `settle_ms > fresh_ms + 2 × timeout_ms`, two gateways can never raise on two
/// different views from reports that crossed a change: a raise under view V needs a report
/// from every peer showing V, and a peer that has since left V waits `settle_ms` before it
/// raises, by which time any report showing V is older than `fresh_ms` (docs/fleet.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub fresh_ms: u64,
    pub settle_ms: u64,
}

impl Timing {
    /// For reports asked every `interval_ms` with a timeout of `timeout_ms`: fresh for two
    /// intervals plus a timeout; settled after that plus two timeouts and an interval.
    pub fn for_poll(interval_ms: u64, timeout_ms: u64) -> Timing {
        let fresh_ms = 2 * interval_ms + timeout_ms;
        Timing {
            fresh_ms,
            settle_ms: fresh_ms + 2 * timeout_ms + interval_ms,
        }
    }
}

/// One endpoint of a revision, as [`FleetRecord::caps`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointView<'a> {
    pub address: &'a str,
    /// The cap this gateway applies now (0 for an endpoint it never had one for).
    pub cap: u32,
}

impl FleetRecord {
    pub fn decode(bytes: Option<&[u8]>) -> FleetRecord {
        bytes
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// This gateway's index among the members.
    pub fn index_of(&self, me: &str) -> Option<usize> {
        self.members.iter().position(|m| m == me)
    }

    /// Records the addresses Envoy lists in the peer cluster (any order). Listed addresses
    /// other than `me` become peers; a peer that is no longer listed stays while its last report
    /// says it may hold slots.
    pub fn set_members(&mut self, listed: impl IntoIterator<Item = String>, me: &str, now: u64) {
        let mut listed: Vec<String> = listed.into_iter().collect();
        listed.sort_unstable();
        listed.dedup();
        for m in &listed {
            if m != me && !self.peers.iter().any(|p| &p.address == m) {
                self.peers.push(PeerRecord {
                    address: m.clone(),
                    ..PeerRecord::default()
                });
            }
        }
        self.peers.retain(|p| {
            listed.contains(&p.address)
                || p.report
                    .as_ref()
                    .is_some_and(|r| r.revisions.iter().any(RevisionReport::holds_any))
        });
        self.peers
            .sort_unstable_by(|a, b| a.address.cmp(&b.address));
        self.listed = listed;
        self.refresh_members(now);
    }

    /// Members = listed less lost peers; a change restarts the settling time.
    fn refresh_members(&mut self, now: u64) {
        let peers = &self.peers;
        let members: Vec<String> = self
            .listed
            .iter()
            .filter(|m| !peers.iter().any(|p| &p.address == *m && p.lost))
            .cloned()
            .collect();
        if members != self.members {
            self.members = members;
            self.members_since_ms = now;
        }
    }

    /// Records peer `from`'s report, received at `now`. Returns false (and keeps nothing) if
    /// the report is not from `from` (Envoy sent the request elsewhere) or `from` is unknown.
    pub fn on_report(&mut self, from: &str, report: Report, now: u64) -> bool {
        if report.from != from {
            return false;
        }
        let Some(p) = self.peers.iter_mut().find(|p| p.address == from) else {
            return false;
        };
        for r in &report.revisions {
            let seen = p.demand_seen.iter_mut().find(|(n, _)| n == &r.name);
            let delta = match seen {
                Some((_, last)) => {
                    // A smaller total: the peer restarted and counts from 0 again.
                    let d = if r.demand_ms >= *last {
                        r.demand_ms - *last
                    } else {
                        r.demand_ms
                    };
                    *last = r.demand_ms;
                    d
                }
                None => {
                    p.demand_seen.push((r.name.clone(), r.demand_ms));
                    0
                }
            };
            if delta > 0 {
                match self.peer_demand_ms.iter_mut().find(|(n, _)| n == &r.name) {
                    Some((_, total)) => *total = total.saturating_add(delta),
                    None => self.peer_demand_ms.push((r.name.clone(), delta)),
                }
            }
        }
        p.report = Some(report);
        p.received_ms = now;
        p.failing_since_ms = None;
        if p.lost {
            p.lost = false;
            self.refresh_members(now);
        }
        true
    }

    /// Peer `from` did not answer at `now`. Once it has failed for `lost_after_ms` it is taken
    /// for dead: its report (its claims) is dropped, it leaves the members until it answers
    /// again (its share goes to the others), and a peer no longer listed is forgotten. Returns
    /// true when it was just declared lost.
    pub fn on_report_failed(&mut self, from: &str, now: u64, lost_after_ms: u64) -> bool {
        let listed = &self.listed;
        let mut lost = false;
        self.peers.retain_mut(|p| {
            if p.address != from {
                return true;
            }
            let since = *p.failing_since_ms.get_or_insert(now);
            if now.saturating_sub(since) >= lost_after_ms && !p.lost {
                p.report = None;
                p.lost = true;
                lost = true;
            }
            listed.contains(&p.address) || (!p.lost && p.report.is_some())
        });
        if lost {
            self.refresh_members(now);
        }
        lost
    }

    /// The sum of the peers' demand increments for revision `name`.
    pub fn peer_demand_ms(&self, name: &str) -> u64 {
        self.peer_demand_ms
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, d)| *d)
    }

    /// Whether this gateway may raise caps of revision `rev` now: its view of the members has
    /// stood for `settle_ms` (a gateway alone too: another may not be listed yet), and every member other than `me` sent, since the view began and
    /// within `fresh_ms` of `now`, a report showing the same fleet and the same `cc`.
    pub fn agreed(&self, me: &str, rev: &str, cc: u32, now: u64, t: Timing) -> bool {
        let hash = fleet_hash(&self.members);
        self.index_of(me).is_some()
            && now.saturating_sub(self.members_since_ms) >= t.settle_ms
            && self.members.iter().filter(|m| *m != me).all(|m| {
                self.peers.iter().any(|p| {
                    &p.address == m
                        && p.received_ms >= self.members_since_ms
                        && now.saturating_sub(p.received_ms) <= t.fresh_ms
                        && p.report.as_ref().is_some_and(|r| {
                            r.fleet == hash && r.revision(rev).is_some_and(|rr| rr.cc == cc)
                        })
                })
            })
    }

    /// This gateway's caps on revision `rev`'s endpoints (in the order given), at `cc` (> 0):
    /// never above its share; above its current cap only under agreement, and then only into
    /// slots no other gateway may be using (see the module docs).
    pub fn caps(
        &self,
        me: &str,
        rev: &str,
        cc: u32,
        endpoints: &[EndpointView<'_>],
        now: u64,
        t: Timing,
    ) -> Vec<u32> {
        let n = self.members.len();
        let mine = self.index_of(me);
        let agreed = self.agreed(me, rev, cc, now, t);
        endpoints
            .iter()
            .map(|e| {
                let own = mine.map_or(0, |i| share(e.address, cc, n, i));
                if !agreed {
                    return e.cap.min(own);
                }
                let mut others = 0u32;
                for p in &self.peers {
                    let reported = p
                        .report
                        .as_ref()
                        .and_then(|r| r.revision(rev))
                        .map_or(0, |rr| rr.claim(e.address, cc));
                    let claim = match self.index_of(&p.address) {
                        Some(j) => share(e.address, cc, n, j).max(reported),
                        None => reported,
                    };
                    others = others.saturating_add(claim);
                }
                own.min(cc.saturating_sub(others))
            })
            .collect()
    }

    /// Where to forward a request of revision `rev`: the member with the most free slots by its
    /// latest fresh report (less `sent` already forwarded to it since), else — when `any` — the
    /// member with the most slots (it queues the request). `None`: no peer has a slot.
    pub fn forward_target(
        &self,
        rev: &str,
        now: u64,
        fresh_ms: u64,
        sent: &dyn Fn(&str) -> u32,
        any: bool,
    ) -> Option<String> {
        let mut best_free: Option<(&str, u32)> = None;
        let mut best_slots: Option<(&str, u32)> = None;
        for p in &self.peers {
            if !self.members.contains(&p.address) || now.saturating_sub(p.received_ms) > fresh_ms {
                continue;
            }
            let Some(rr) = p.report.as_ref().and_then(|r| r.revision(rev)) else {
                continue;
            };
            let free = rr.free.saturating_sub(sent(&p.address));
            if free > 0 && best_free.is_none_or(|(_, f)| free > f) {
                best_free = Some((&p.address, free));
            }
            if rr.slots > 0 && best_slots.is_none_or(|(_, s)| rr.slots > s) {
                best_slots = Some((&p.address, rr.slots));
            }
        }
        best_free
            .or(if any { best_slots } else { None })
            .map(|(a, _)| a.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Timing = Timing {
        fresh_ms: 1_000,
        settle_ms: 2_000,
    };

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:15081", i + 1)).collect()
    }

    fn report(
        from: &str,
        fleet: &[String],
        rev: &str,
        cc: u32,
        eps: &[(&str, u32, u32)],
    ) -> Report {
        Report {
            from: from.into(),
            fleet: fleet_hash(fleet),
            members: u32::try_from(fleet.len()).unwrap_or(0),
            revisions: vec![RevisionReport {
                name: rev.into(),
                cc,
                endpoints: eps
                    .iter()
                    .map(|(a, cap, active)| EndpointReport {
                        address: (*a).into(),
                        cap: *cap,
                        active: *active,
                    })
                    .collect(),
                ..RevisionReport::default()
            }],
        }
    }

    fn ep(address: &str, cap: u32) -> [EndpointView<'_>; 1] {
        [EndpointView { address, cap }]
    }

    #[test]
    fn shares_of_an_endpoint_sum_to_cc_and_a_fleet_of_one_owns_it_all() {
        for cc in 0..12 {
            for n in 1..6 {
                for e in ["10.1.0.1:8080", "10.1.0.2:8080", "pod-x:80"] {
                    let total: u32 = (0..n).map(|i| share(e, cc, n, i)).sum();
                    assert_eq!(total, cc, "cc {cc}, {n} members, {e}");
                    let (lo, hi) = (cc / n as u32, cc.div_ceil(n as u32));
                    assert!((0..n).all(|i| (lo..=hi).contains(&share(e, cc, n, i))));
                }
                assert_eq!(share("a:1", cc, 1, 0), cc);
            }
        }
        assert_eq!(share("a:1", 4, 3, 3), 0, "outside the fleet: nothing");
        assert_eq!(share("a:1", 4, 0, 0), 0);
    }

    #[test]
    fn remainders_of_many_endpoints_spread_over_the_members() {
        // cc 1, 30 endpoints, 3 gateways: every gateway owns some endpoints.
        let owned: Vec<u32> = (0..3)
            .map(|i| {
                (0..30)
                    .map(|k| share(&format!("10.2.0.{k}:8080"), 1, 3, i))
                    .sum()
            })
            .collect();
        assert_eq!(owned.iter().sum::<u32>(), 30);
        assert!(owned.iter().all(|o| *o >= 5), "{owned:?}");
    }

    #[test]
    fn a_lone_gateway_owns_every_slot_once_its_view_settled() {
        let mut f = FleetRecord::default();
        f.set_members(["a:1".to_string()], "a:1", 0);
        assert_eq!(f.caps("a:1", "r", 4, &ep("e:1", 0), 1_000, T), vec![0]);
        assert_eq!(f.caps("a:1", "r", 4, &ep("e:1", 0), 2_000, T), vec![4]);
    }

    #[test]
    fn a_gateway_outside_the_fleet_owns_nothing() {
        let mut f = FleetRecord::default();
        f.set_members(["b:1".to_string()], "a:1", 0);
        assert_eq!(f.caps("a:1", "r", 4, &ep("e:1", 4), 10_000, T), vec![0]);
    }

    #[test]
    fn without_agreement_nothing_is_gained_and_losses_apply_at_once() {
        let m = members(3);
        let mut f = FleetRecord::default();
        f.set_members(m.clone(), &m[0], 0);
        let own = share("e:1", 4, 3, 0);
        assert_eq!(f.caps(&m[0], "r", 4, &ep("e:1", 4), 5_000, T), vec![own]);
        assert_eq!(f.caps(&m[0], "r", 4, &ep("e:1", 0), 5_000, T), vec![0]);
    }

    #[test]
    fn agreement_needs_a_settled_view_and_fresh_reports_of_that_view() {
        let m = members(2);
        let (a, b) = (&m[0], &m[1]);
        let mut f = FleetRecord::default();
        f.set_members(m.clone(), a, 0);
        f.on_report(b, report(b, &m, "r", 4, &[]), 500);
        assert!(!f.agreed(a, "r", 4, 1_000, T), "view not settled");
        f.on_report(b, report(b, &m, "r", 4, &[]), 1_900);
        assert!(f.agreed(a, "r", 4, 2_000, T));
        assert!(!f.agreed(a, "r", 6, 2_000, T), "another cc");
        assert!(!f.agreed(a, "r", 4, 3_000, T), "stale report");
        let other = [a.clone(), "c:1".to_string()];
        f.on_report(b, report(b, &other, "r", 4, &[]), 2_500);
        assert!(!f.agreed(a, "r", 4, 2_600, T), "another fleet");
        assert_eq!(
            f.caps(a, "r", 4, &ep("e:1", 0), 2_600, T),
            vec![0],
            "no gain without agreement"
        );
    }

    #[test]
    fn a_gain_waits_for_the_loser_to_drain_and_report() {
        // Fleet {a, b} at cc 2 on e: one slot each. b leaves; a's share becomes 2, but b still
        // runs 1 request on e: a gains b's slot only once b reports it holds nothing.
        let (a, b) = ("a:1".to_string(), "b:1".to_string());
        let two = [a.clone(), b.clone()];
        let mut f = FleetRecord::default();
        f.set_members(two.clone(), &a, 0);
        f.on_report(&b, report(&b, &two, "r", 2, &[("e:1", 1, 1)]), 2_500);
        let own = share("e:1", 2, 2, 0);
        assert_eq!(own, 1);
        assert_eq!(f.caps(&a, "r", 2, &ep("e:1", 0), 2_600, T), vec![1]);
        // b leaves the fleet (unhealthy), still holding 1.
        f.set_members([a.clone()], &a, 3_000);
        assert_eq!(f.peers.len(), 1, "kept while it may hold slots");
        let alone = [a.clone()];
        f.on_report(&b, report(&b, &alone, "r", 2, &[("e:1", 0, 1)]), 5_500);
        assert_eq!(f.caps(&a, "r", 2, &ep("e:1", 1), 5_600, T), vec![1]);
        // Its request finished.
        f.on_report(&b, report(&b, &alone, "r", 2, &[("e:1", 0, 0)]), 5_700);
        assert_eq!(f.caps(&a, "r", 2, &ep("e:1", 1), 5_800, T), vec![2]);
        f.set_members([a.clone()], &a, 5_900);
        assert!(f.peers.is_empty(), "forgotten once it holds nothing");
    }

    #[test]
    fn a_lost_peer_is_forgotten_after_lost_after() {
        let (a, b) = ("a:1".to_string(), "b:1".to_string());
        let two = [a.clone(), b.clone()];
        let mut f = FleetRecord::default();
        f.set_members(two.clone(), &a, 0);
        f.on_report(&b, report(&b, &two, "r", 2, &[("e:1", 1, 1)]), 100);
        f.set_members([a.clone()], &a, 200);
        assert!(!f.on_report_failed(&b, 300, 1_000));
        assert_eq!(f.caps(&a, "r", 2, &ep("e:1", 1), 2_500, T), vec![1]);
        assert!(f.on_report_failed(&b, 1_300, 1_000));
        assert!(f.peers.is_empty());
        assert_eq!(f.caps(&a, "r", 2, &ep("e:1", 1), 2_500, T), vec![2]);
    }

    #[test]
    fn a_report_from_someone_else_is_refused() {
        let (a, b) = ("a:1".to_string(), "b:1".to_string());
        let mut f = FleetRecord::default();
        f.set_members([a.clone(), b.clone()], &a, 0);
        assert!(!f.on_report(&b, report("c:1", &[], "r", 2, &[]), 0));
        assert!(f.peers.iter().all(|p| p.report.is_none()));
    }

    #[test]
    fn peers_demand_adds_increments_only() {
        let (a, b) = ("a:1".to_string(), "b:1".to_string());
        let mut f = FleetRecord::default();
        f.set_members([a.clone(), b.clone()], &a, 0);
        let mut r = report(&b, &[], "r", 2, &[]);
        r.revisions[0].demand_ms = 5_000;
        f.on_report(&b, r.clone(), 0);
        assert_eq!(f.peer_demand_ms("r"), 0, "the first report is the baseline");
        r.revisions[0].demand_ms = 7_500;
        f.on_report(&b, r.clone(), 1000);
        assert_eq!(f.peer_demand_ms("r"), 2_500);
        r.revisions[0].demand_ms = 300; // restarted
        f.on_report(&b, r, 2000);
        assert_eq!(f.peer_demand_ms("r"), 2_800);
    }

    #[test]
    fn forwarding_prefers_free_slots_then_slots() {
        let m = members(3);
        let mut f = FleetRecord::default();
        f.set_members(m.clone(), &m[0], 0);
        let mut r1 = report(&m[1], &m, "r", 4, &[]);
        r1.revisions[0].slots = 2;
        let mut r2 = report(&m[2], &m, "r", 4, &[]);
        r2.revisions[0].slots = 1;
        r2.revisions[0].free = 1;
        f.on_report(&m[1], r1, 0);
        f.on_report(&m[2], r2, 0);
        let none = |_: &str| 0;
        assert_eq!(
            f.forward_target("r", 0, 1000, &none, true),
            Some(m[2].clone())
        );
        let one = |_: &str| 1;
        assert_eq!(f.forward_target("r", 0, 1000, &one, false), None);
        assert_eq!(
            f.forward_target("r", 0, 1000, &one, true),
            Some(m[1].clone())
        );
        assert_eq!(
            f.forward_target("r", 5000, 1000, &none, true),
            None,
            "stale"
        );
    }

    /// One gateway of a simulated fleet: its record, caps and in-flight per endpoint.
    struct Gw {
        addr: String,
        record: FleetRecord,
        caps: Vec<u32>,
        active: Vec<u32>,
        alive: bool,
    }

    fn snapshot(g: &Gw, eps: &[String], cc: u32) -> Report {
        Report {
            from: g.addr.clone(),
            fleet: fleet_hash(&g.record.members),
            members: 0,
            revisions: vec![RevisionReport {
                name: "r".into(),
                cc,
                endpoints: eps
                    .iter()
                    .enumerate()
                    .map(|(k, a)| EndpointReport {
                        address: a.clone(),
                        cap: g.caps[k],
                        active: g.active[k],
                    })
                    .collect(),
                ..RevisionReport::default()
            }],
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        /// Random interleavings, 100 ms apart, of: a gateway refreshing its view of the
        /// members (each at its own time, at least every 400 ms, so views differ), recomputing
        /// its caps and admitting on an endpoint, requests completing, reports written and
        /// delivered late (within the report timeout, else dropped), gateways killed (their
        /// requests die with them; the peer cluster drops them; peers' reports to them fail)
        /// and restarted with the same address and an empty state. At every instant the
        /// requests in flight on an endpoint, summed over the gateways, are at most cc.
        #[test]
        fn the_fleet_never_exceeds_cc_on_an_endpoint(
            cc in 1u32..6,
            steps in prop::collection::vec((0u8..7, 0usize..4, 0usize..4, 0usize..3), 1..300),
        ) {
            let timeout = 300u64;
            let t = Timing::for_poll(200, timeout);
            let lost_after = 1_000u64;
            let addrs = members(4);
            let eps: Vec<String> = (0..3).map(|k| format!("10.9.0.{k}:8080")).collect();
            let mut gws: Vec<Gw> = addrs.iter().map(|a| Gw {
                addr: a.clone(), record: FleetRecord::default(),
                caps: vec![0; 3], active: vec![0; 3], alive: true,
            }).collect();
            // The peer cluster lists the gateways that exist (docs/fleet.md: not-ready ones
            // too); a gateway's view of it lags by at most `lag` (it polls every interval).
            let mut healthy = [true, true, true, false];
            let lag = 400u64;
            let mut seen_at = [0u64; 4];
            // Reports on their way: (to, written at, report).
            let mut mail: Vec<(usize, u64, Report)> = Vec::new();
            let mut now = 0u64;
            for (op, g, h, e) in steps {
                now += 100;
                // Reports older than the timeout are never read (the request timed out).
                mail.retain(|(_, at, _)| now - at <= timeout);
                match op {
                    0 => if gws[g].alive {
                        let listed: Vec<String> = (0..4).filter(|i| healthy[*i]).map(|i| addrs[i].clone()).collect();
                        let me = gws[g].addr.clone();
                        gws[g].record.set_members(listed, &me, now);
                        seen_at[g] = now;
                    },
                    1 => if gws[g].alive && g != h {
                        mail.push((h, now, snapshot(&gws[g], &eps, cc)));
                    },
                    2 => if let Some(i) = mail.iter().position(|(to, _, _)| *to == h) {
                        let (_, _, r) = mail.remove(i);
                        let from = r.from.clone();
                        if gws[h].alive { gws[h].record.on_report(&from, r, now); }
                    },
                    3 | 4 => if gws[g].alive {
                        let views: Vec<EndpointView> = eps.iter().enumerate()
                            .map(|(k, a)| EndpointView { address: a, cap: gws[g].caps[k] }).collect();
                        let me = gws[g].addr.clone();
                        gws[g].caps = gws[g].record.caps(&me, "r", cc, &views, now, t);
                        if gws[g].active[e] < gws[g].caps[e] { gws[g].active[e] += 1; }
                    },
                    5 => if gws[g].active[e] > 0 { gws[g].active[e] -= 1; },
                    _ => {
                        if g != 0 && gws[g].alive && e <= 1 {
                            gws[g].alive = false;
                            gws[g].active = vec![0; 3];
                            mail.retain(|(to, _, r)| *to != g && r.from != addrs[g]);
                            // A Kubernetes Service drops a dead pod; a static cluster keeps
                            // listing it, and only failing reports take it out.
                            healthy[g] = h % 2 == 1;
                        } else if !gws[g].alive && e >= 1 {
                            // Restarted with the same address and an empty state.
                            gws[g] = Gw { addr: addrs[g].clone(), record: FleetRecord::default(),
                                caps: vec![0; 3], active: vec![0; 3], alive: true };
                            healthy[g] = true;
                        }
                    }
                }
                // Views older than the lag follow the cluster.
                for k in 0..4 {
                    if gws[k].alive && now - seen_at[k] >= lag {
                        let listed: Vec<String> = (0..4).filter(|i| healthy[*i]).map(|i| addrs[i].clone()).collect();
                        let me = gws[k].addr.clone();
                        gws[k].record.set_members(listed, &me, now);
                        seen_at[k] = now;
                    }
                }
                // Peers ask the dead for reports and fail.
                for k in 0..4 {
                    for d in 0..4 {
                        if k != d && gws[k].alive && !gws[d].alive {
                            let a = addrs[d].clone();
                            gws[k].record.on_report_failed(&a, now, lost_after);
                        }
                    }
                }
                for k in 0..3 {
                    let total: u32 = gws.iter().map(|g| g.active[k]).sum();
                    prop_assert!(total <= cc, "t={now}: endpoint {k}: {total} in flight > cc {cc}");
                }
            }
        }
    }
}
