//! Slot leases: while a revision is far from its limit and nobody waits, a worker takes a few
//! slots at once ([`RevisionState::lease`]) and admits and releases on them without touching
//! shared state. What keeps the guarantees:
//!
//! - **exact limit**: leased slots count in the shared `active` whether in use or not, so the
//!   slots in use across all VMs never exceed the limit;
//! - **strict FIFO**: a leased slot admits only while the revision's recall epoch (its own small
//!   key, one read per arrival) still holds the value it had when the lease was taken. An
//!   arrival that would wait (or be shed) while any VM holds a lease first bumps the epoch, then
//!   tells every lessee through its wake queue ([`Wake::Recall`]), then decides again: from
//!   then on no lease admits anyone, and each lessee gives its spare slots back, which grants
//!   the waiters in order;
//! - **demand**: a lessee integrates the demand of its leased slots in use and adds it to the
//!   shared integral at every swap it makes on the revision (at least every tick), so the
//!   autoscaler and the demand counter lose nothing; the other VMs' part lags by one tick at most;
//! - **a VM that crashes**: its lease is among its held slots and comes back when it is reaped.
//!
//! A lease goes back at the first tick with no lease admit since the one before, when the
//! revision nears its limit (fewer than half the headroom free), on a recall, and when the
//! worker is reconfigured or ends.

use super::{StreamState, Worker};
use crate::admission::{Grant, RevisionState};
use crate::config::{Config, Limits};
use crate::store::{self, Host};
use crate::table::RevisionId;
use crate::wake::Wake;
use crate::window::Demand;

/// Shared-data key of a revision's recall epoch (a u32; absent is 0).
pub fn recall_key(revision: &str) -> String {
    format!("inflight.v1.recall.{revision}")
}

/// This VM's lease on one revision.
#[derive(Debug, Default)]
pub(super) struct LocalLease {
    /// Which lease (unique in this VM; 0: none held). A stream admitted on a lease carries its
    /// id; once the lease went back, such a stream's slot is an ordinary held slot.
    pub id: u32,
    /// Leased slots held, and how many of them a stream uses.
    pub slots: u32,
    pub used: u32,
    /// The recall epoch read before the lease was taken.
    pub epoch: u32,
    /// Demand over the slots in use, and the part of it already in the shared integral.
    pub demand: Demand,
    pub merged_ms: u64,
    /// Lease admits since the last tick.
    pub admits: u32,
}

impl LocalLease {
    /// Demand not yet merged, up to `now`.
    pub fn pending_ms(&self, now: u64) -> u64 {
        self.demand.integral_ms(now).saturating_sub(self.merged_ms)
    }

    /// Marks the demand up to `now` as merged.
    pub fn merged(&mut self, now: u64) {
        self.merged_ms = self.demand.integral_ms(now);
    }

    /// The lease went back at `now` (its demand up to `now` merged): its streams' slots are
    /// ordinary held slots from here on.
    pub fn returned(&mut self, now: u64) {
        self.demand.observe(now, 0);
        self.merged(now);
        self.id = 0;
        self.slots = 0;
        self.used = 0;
    }
}

/// What a swap did with this VM's lease, applied to the local state once the swap succeeded.
#[derive(Debug, Default)]
pub(super) struct LeaseChange {
    /// The lease went back (its grants are in `grants`).
    pub returned: bool,
    /// Slots newly leased.
    pub taken: u32,
    pub grants: Vec<Grant>,
    /// Other VMs hold leases that should come back.
    pub recall: Vec<u32>,
}

/// Reads the recall epoch of a revision: `None` when it cannot be read (then no lease is used).
pub(super) fn read_epoch<H: Host>(host: &H, key: &str) -> Option<u32> {
    let bytes = store::read(host, key).ok()?;
    store::load_u32(bytes.as_deref())
        .ok()
        .map(|e| e.unwrap_or(0))
}

impl<H: Host> Worker<H> {
    /// Whether leases may be used for revision `rev` at all (configured, not draining, slots
    /// not tied to endpoints, no fleet).
    pub(super) fn may_lease(&self, config: &Config, rev: RevisionId) -> bool {
        config.slot_lease.slots > 0
            && config.fleet.is_none()
            && !self.draining
            && self
                .revisions
                .get(rev.0)
                .is_some_and(|r| !r.needs_endpoints)
    }

    /// Admits stream `context` on this VM's lease of `rev` if it has a spare slot and the
    /// lease still holds (no recall since it was taken): no shared state is written.
    pub(super) fn admit_on_lease(&mut self, rev: RevisionId, context: u32, now: u64) -> bool {
        let Some(r) = self.revisions.get(rev.0) else {
            return false;
        };
        if r.lease.used >= r.lease.slots
            || read_epoch(&self.host, &r.recall_key) != Some(r.lease.epoch)
        {
            return false;
        }
        let Some(r) = self.revisions.get_mut(rev.0) else {
            return false;
        };
        let lease = &mut r.lease;
        lease.used += 1;
        lease.admits = lease.admits.saturating_add(1);
        lease.demand.observe(now, lease.used);
        self.streams.insert(
            context,
            StreamState::Admitted {
                rev,
                endpoint: None,
                lease: lease.id,
            },
        );
        true
    }

    /// A stream admitted on lease `lease` of `rev` ended: its slot goes back to the lease.
    /// Returns false if that lease went back meanwhile (the slot is then an ordinary one and
    /// must be released in shared state).
    pub(super) fn end_on_lease(&mut self, rev: RevisionId, lease: u32, now: u64) -> bool {
        let Some(r) = self.revisions.get_mut(rev.0) else {
            return false;
        };
        let l = &mut r.lease;
        if lease == 0 || l.id != lease || l.used == 0 {
            return false;
        }
        l.used -= 1;
        l.demand.observe(now, l.used);
        true
    }

    /// In a swap on `rev`'s state: merges this VM's lease demand and gives the lease back if
    /// `give_back`; then, if `take` and the revision has room, takes `slots` more. Reports who
    /// else should give theirs back.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lease_in_swap(
        me: u32,
        lease: &LocalLease,
        s: &mut RevisionState,
        limits: Limits,
        headroom: u32,
        give_back: bool,
        take: u32,
        now: u64,
    ) -> LeaseChange {
        let mut change = LeaseChange::default();
        s.merge_lease(me, lease.pending_ms(now), lease.used);
        let recalling = s.should_recall(limits, headroom);
        if lease.slots > 0 && (give_back || recalling) {
            change.grants = s.return_lease(me, lease.used, limits, now);
            change.returned = true;
        }
        if take > 0 && !recalling {
            change.taken = s.lease(me, take, headroom, limits, now);
        }
        if s.should_recall(limits, headroom) {
            change.recall = s.other_lessees(me);
        }
        change
    }

    /// Applies a successful swap's [`LeaseChange`] to this VM's lease of `rev`; `epoch` is the
    /// recall epoch read before the swap.
    pub(super) fn lease_swapped(
        &mut self,
        rev: RevisionId,
        change: LeaseChange,
        epoch: Option<u32>,
        now: u64,
    ) {
        let id = self.next_lease_id();
        let Some(r) = self.revisions.get_mut(rev.0) else {
            return;
        };
        let l = &mut r.lease;
        l.merged(now);
        if change.returned {
            l.returned(now);
        }
        if change.taken > 0 {
            if l.slots == 0 {
                l.id = id;
                l.epoch = epoch.unwrap_or(u32::MAX);
                l.demand.observe(now, l.used);
            }
            l.slots = l.slots.saturating_add(change.taken);
        }
        if !change.grants.is_empty() {
            self.deliver(rev, change.grants, now);
        }
        if !change.recall.is_empty() {
            self.recall(rev, &change.recall);
        }
    }

    fn next_lease_id(&mut self) -> u32 {
        self.lease_ids = self.lease_ids.wrapping_add(1).max(1);
        self.lease_ids
    }

    /// Bumps `rev`'s recall epoch (no lease admits from then on) and asks `lessees` to give
    /// their leases back.
    pub(super) fn recall(&mut self, rev: RevisionId, lessees: &[u32]) {
        let (Some(config), Some(r)) = (self.config.clone(), self.revisions.get(rev.0)) else {
            return;
        };
        let Some(rc) = config.revision(rev) else {
            return;
        };
        if let Err(e) = store::update(
            &self.host,
            &r.recall_key,
            store::load_u32,
            |e: &Option<u32>| e.unwrap_or(0).to_le_bytes().to_vec(),
            |e| {
                *e = Some(e.unwrap_or(0).wrapping_add(1));
                store::Change::Write(())
            },
        ) {
            log::error!("recalling the slot leases of `{}` failed: {e}", rc.name);
        }
        let message = Wake::Recall {
            revision: rc.name.clone(),
        }
        .encode();
        for vm in lessees {
            if *vm == self.id {
                continue;
            }
            let sent = match self.wake_token(*vm) {
                Some(t) => self.host.enqueue(t, &message),
                None => Err(store::HostError::NotFound),
            };
            if let Err(e) = sent {
                // A VM that is gone gives its lease back when it is reaped.
                log::debug!("recall to worker VM {vm} not sent: {e}");
            }
        }
    }

    /// Gives this VM's lease of `rev` back (a recall, a reconfiguration, the end), merging its
    /// demand, and delivers the grants that follow.
    pub(super) fn give_lease_back(&mut self, config: &Config, rev: RevisionId, now: u64) {
        let (Some(rc), Some(r)) = (config.revision(rev), self.revisions.get(rev.0)) else {
            return;
        };
        if r.lease.slots == 0 {
            return;
        }
        let me = self.id;
        let headroom = config.slot_lease.headroom;
        let swapped = store::update_revision(&self.host, &r.key, |s| {
            let limits = r.limits(rc, s);
            Self::lease_in_swap(me, &r.lease, s, limits, headroom, true, 0, now)
        });
        match swapped {
            Ok(change) => self.lease_swapped(rev, change, None, now),
            Err(e) => log::error!("giving the slot lease of `{}` back failed: {e}", rc.name),
        }
    }

    /// A recall for `revision` arrived.
    pub(super) fn on_recall(&mut self, revision: &str, now: u64) {
        let Some(config) = self.config.clone() else {
            return;
        };
        if let Some(rev) = config.table.match_name(revision) {
            self.give_lease_back(&config, rev, now);
        }
    }

    /// Gives back every lease this VM holds (before a reconfiguration, or at its end).
    pub(super) fn give_all_leases_back(&mut self, now: u64) {
        let Some(config) = self.config.clone() else {
            return;
        };
        for i in 0..self.revisions.len() {
            self.give_lease_back(&config, RevisionId(i), now);
        }
    }

    /// The slot lease size to ask for in a swap admitting a request of `rc` (0: none).
    pub(super) fn lease_ask(&self, config: &Config, rev: RevisionId) -> u32 {
        if self.may_lease(config, rev) {
            config.slot_lease.slots
        } else {
            0
        }
    }
}
