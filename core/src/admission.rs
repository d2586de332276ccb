//! Admission: who may go upstream now, who waits, who is shed — for one revision.
//!
//! [`RevisionState`] is the part of a revision's state that every Envoy worker must agree on:
//! requests in flight, the next ticket number, and the FIFO of waiters (each remembering which
//! worker VM and stream holds it, so a freed slot can be handed to exactly that stream). The
//! filter keeps it in Envoy shared data and applies these methods inside a compare-and-swap
//! loop, so each method is a pure state transition: decode, apply, encode, swap.
//!
//! Strict FIFO: a new arrival is admitted only if nobody waits, so tickets are granted in the
//! order they were taken (Knative's breaker lets a new arrival barge past waiters; we don't).
//!
//! A granted slot belongs to the waiter from the moment it is granted (`active` counts it). If
//! the waiter turns out to be gone, whoever notices calls [`RevisionState::release`], which
//! passes the slot on to the next ticket.
//!
//! The state also integrates demand (in-flight + queued) over time, exactly, at every change:
//! `rate()` of that integral is the time-weighted concurrency Knative's autoscaler averages,
//! with queued demand included, and it costs nothing extra to keep it in the same swap.
//!
//! The capacity is an input ([`Limits`]), not state: it follows the ready replicas, which the
//! filter learns separately, and a later per-endpoint model can sum its endpoints' capacity
//! without changing this type's contract.

use crate::config::{LimitParams, Limits};
use crate::window::Demand;
use std::collections::VecDeque;
use thiserror::Error;

/// Where a waiting stream lives: the worker VM (by its shared id) and the stream's context id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    pub vm: u32,
    pub context: u32,
}

/// A request waiting for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub ticket: u64,
    pub owner: Owner,
    pub since_ms: u64,
}

/// A slot handed to a waiter; `active` already counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub ticket: u64,
    pub owner: Owner,
    pub waited_ms: u64,
}

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    /// The buffer had no room (or the revision has neither capacity nor buffer).
    BufferFull,
    /// It waited the revision's maximum wait without getting a slot.
    WaitTimeout,
}

impl ShedReason {
    /// The value of the reason header on the 503.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::BufferFull => "buffer-full",
            ShedReason::WaitTimeout => "wait-timeout",
        }
    }
}

/// The answer to a request asking to go upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go now; a slot is taken and must be released when the stream ends.
    Admitted,
    /// Wait with this ticket until granted, cancelled or expired.
    Queued { ticket: u64 },
    /// Answer 503 now.
    Shed(ShedReason),
}

/// Shared-data bytes that could not be decoded (another version, or corruption).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("revision state has unknown version {0}")]
    Version(u8),
    #[error("revision state is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("revision state has {0} trailing bytes")]
    Trailing(usize),
    #[error("revision state's demand is unreadable: {0}")]
    Demand(String),
}

const VERSION: u8 = 4;
/// `ready` when the filter has not learned it (static configuration applies).
const READY_UNKNOWN: u32 = u32::MAX;
const WAITER_BYTES: usize = 8 + 4 + 4 + 8;

/// A revision's state shared by all workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevisionState {
    /// Requests holding a slot (admitted or granted, not yet released).
    pub active: u32,
    /// The ticket the next waiter gets; tickets only grow.
    pub next_ticket: u64,
    waiters: VecDeque<Waiter>,
    demand: Demand,
    /// Part of the demand integral already added to the Prometheus counter.
    exported_ms: u64,
    /// Ready replicas learned from Envoy's membership; `None` until learned.
    ready: Option<u32>,
    /// Slots held per worker VM, `(vm, held)` sorted by vm; they sum to `active`. Lets a
    /// survivor give back the slots of a VM that crashed (its streams never call release).
    holders: Vec<(u32, u32)>,
    /// The limit parameters of the newest configuration generation that configured this
    /// revision, `(generation, params)`.
    published: Option<(u64, LimitParams)>,
}

impl RevisionState {
    /// Admit, queue or shed one arriving request.
    pub fn try_admit(&mut self, limits: Limits, owner: Owner, now_ms: u64) -> Admission {
        let has_room = match limits.capacity {
            None => true,
            Some(cap) => self.active < cap,
        };
        if has_room && self.waiters.is_empty() {
            self.active = self.active.saturating_add(1);
            self.hold(owner.vm, true);
            self.observe(now_ms);
            return Admission::Admitted;
        }
        if (self.waiters.len() as u64) < u64::from(limits.buffer) {
            let ticket = self.next_ticket;
            self.next_ticket = self.next_ticket.wrapping_add(1);
            self.waiters.push_back(Waiter {
                ticket,
                owner,
                since_ms: now_ms,
            });
            self.observe(now_ms);
            return Admission::Queued { ticket };
        }
        Admission::Shed(ShedReason::BufferFull)
    }

    /// One slot held by worker VM `vm` frees (a stream ended, or a granted waiter was gone);
    /// returns the grants that follow, oldest ticket first.
    pub fn release(&mut self, vm: u32, limits: Limits, now_ms: u64) -> Vec<Grant> {
        self.active = self.active.saturating_sub(1);
        self.hold(vm, false);
        self.observe(now_ms);
        self.grant_ready(limits, now_ms)
    }

    /// Grants slots to the oldest waiters while capacity allows — after a release, or when the
    /// capacity grew (more ready replicas).
    pub fn grant_ready(&mut self, limits: Limits, now_ms: u64) -> Vec<Grant> {
        // A grant moves a request from queued to in-flight: demand does not change.
        let mut grants = Vec::new();
        while limits.capacity.is_none_or(|cap| self.active < cap) {
            let Some(w) = self.waiters.pop_front() else {
                break;
            };
            self.active = self.active.saturating_add(1);
            self.hold(w.owner.vm, true);
            grants.push(Grant {
                ticket: w.ticket,
                owner: w.owner,
                waited_ms: now_ms.saturating_sub(w.since_ms),
            });
        }
        grants
    }

    /// Removes a waiter (its client left, or it timed out). `None` means it is no longer
    /// waiting: a grant for it is on its way and must be passed on by whoever receives it.
    pub fn cancel(&mut self, ticket: u64, now_ms: u64) -> Option<Waiter> {
        let i = self.waiters.iter().position(|w| w.ticket == ticket)?;
        let w = self.waiters.remove(i);
        self.observe(now_ms);
        w
    }

    /// Removes waiters that waited longer than `max_age_ms`: their owner should have expired
    /// them itself, so it is gone (a crashed VM). Keeps the buffer from filling with ghosts.
    pub fn reap(&mut self, now_ms: u64, max_age_ms: u64) -> Vec<Waiter> {
        let mut reaped = Vec::new();
        self.waiters.retain(|w| {
            let stale = now_ms.saturating_sub(w.since_ms) > max_age_ms;
            if stale {
                reaped.push(*w);
            }
            !stale
        });
        if !reaped.is_empty() {
            self.observe(now_ms);
        }
        reaped
    }

    fn hold(&mut self, vm: u32, take: bool) {
        match self.holders.binary_search_by_key(&vm, |h| h.0) {
            Ok(i) => {
                if let Some(h) = self.holders.get_mut(i) {
                    h.1 = if take {
                        h.1.saturating_add(1)
                    } else {
                        h.1.saturating_sub(1)
                    };
                    if h.1 == 0 {
                        self.holders.remove(i);
                    }
                }
            }
            Err(i) if take => self.holders.insert(i, (vm, 1)),
            Err(_) => {}
        }
    }

    /// Publishes the limit parameters of configuration `generation` unless a newer one did.
    pub fn publish(&mut self, generation: u64, params: LimitParams) {
        if self.published.is_none_or(|(g, _)| g <= generation) {
            self.published = Some((generation, params));
        }
    }

    /// The limit parameters to apply for a VM of configuration `generation` whose own are
    /// `own`: a newer generation's published ones win (a reload lowers limits for VMs of the
    /// old configuration too while they drain).
    pub fn limit_params(&self, generation: u64, own: LimitParams) -> LimitParams {
        match self.published {
            Some((g, p)) if g > generation => p,
            _ => own,
        }
    }

    /// Slots held per worker VM, `(vm, held)`.
    pub fn holders(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.holders.iter().copied()
    }

    /// Gives back everything worker VM `vm` held — its slots and its waiters — because it is
    /// gone (crashed; its streams will never release). Returns (slots, waiters, grants).
    pub fn reap_vm(&mut self, vm: u32, limits: Limits, now_ms: u64) -> (u32, usize, Vec<Grant>) {
        let slots = match self.holders.binary_search_by_key(&vm, |h| h.0) {
            Ok(i) => self.holders.remove(i).1,
            Err(_) => 0,
        };
        self.active = self.active.saturating_sub(slots);
        let before = self.waiters.len();
        self.waiters.retain(|w| w.owner.vm != vm);
        let waiters = before - self.waiters.len();
        self.observe(now_ms);
        (slots, waiters, self.grant_ready(limits, now_ms))
    }

    /// Records the current demand level from `now_ms` on (after every change).
    fn observe(&mut self, now_ms: u64) {
        let level = self.active.saturating_add(self.queued());
        self.demand.observe(now_ms, level);
    }

    /// ∫ (in-flight + queued) dt up to `now_ms`, in request-milliseconds.
    pub fn demand_ms(&self, now_ms: u64) -> u64 {
        self.demand.integral_ms(now_ms)
    }

    /// The demand accumulated since the last call (for a process-wide counter that every worker
    /// may feed: each millisecond is handed out exactly once).
    pub fn take_unexported_demand_ms(&mut self, now_ms: u64) -> u64 {
        let total = self.demand.integral_ms(now_ms);
        let delta = total.saturating_sub(self.exported_ms);
        self.exported_ms = self.exported_ms.max(total);
        delta
    }

    /// Ready replicas learned from Envoy, if any.
    pub fn ready(&self) -> Option<u32> {
        self.ready
    }

    /// Records the ready replicas Envoy reports (the caller then grants with the new limits).
    pub fn set_ready(&mut self, ready: u32) {
        self.ready = (ready != READY_UNKNOWN).then_some(ready);
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> u32 {
        u32::try_from(self.waiters.len()).unwrap_or(u32::MAX)
    }

    /// The waiters, oldest first.
    pub fn waiters(&self) -> impl Iterator<Item = &Waiter> {
        self.waiters.iter()
    }

    /// Compact little-endian encoding for shared data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 4 + 8 + 4 + self.waiters.len() * WAITER_BYTES);
        out.push(VERSION);
        out.extend_from_slice(&self.active.to_le_bytes());
        out.extend_from_slice(&self.next_ticket.to_le_bytes());
        out.extend_from_slice(&self.exported_ms.to_le_bytes());
        out.extend_from_slice(&self.ready.unwrap_or(READY_UNKNOWN).to_le_bytes());
        let demand = self.demand.encode();
        out.push(u8::try_from(demand.len()).unwrap_or(0));
        out.extend_from_slice(&demand);
        match &self.published {
            None => out.push(0),
            Some((g, p)) => {
                out.push(1);
                out.extend_from_slice(&g.to_le_bytes());
                out.extend_from_slice(&p.container_concurrency.to_le_bytes());
                out.extend_from_slice(&p.buffer_depth.unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(&p.ready_replicas.to_le_bytes());
            }
        }
        out.extend_from_slice(&u32::try_from(self.holders.len()).unwrap_or(0).to_le_bytes());
        for (vm, held) in &self.holders {
            out.extend_from_slice(&vm.to_le_bytes());
            out.extend_from_slice(&held.to_le_bytes());
        }
        out.extend_from_slice(&self.queued().to_le_bytes());
        for w in &self.waiters {
            out.extend_from_slice(&w.ticket.to_le_bytes());
            out.extend_from_slice(&w.owner.vm.to_le_bytes());
            out.extend_from_slice(&w.owner.context.to_le_bytes());
            out.extend_from_slice(&w.since_ms.to_le_bytes());
        }
        out
    }

    /// Decodes [`encode`](Self::encode)'s bytes; never panics on bad input.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let active = r.u32()?;
        let next_ticket = r.u64()?;
        let exported_ms = r.u64()?;
        let ready = r.u32()?;
        let demand_len = usize::from(r.u8()?);
        let demand_bytes = r.slice(demand_len)?;
        let demand =
            Demand::decode(demand_bytes).map_err(|e| DecodeError::Demand(e.to_string()))?;
        let published = match r.u8()? {
            0 => None,
            _ => {
                let g = r.u64()?;
                let container_concurrency = r.u32()?;
                let buffer = r.u32()?;
                let ready_replicas = r.u32()?;
                Some((
                    g,
                    LimitParams {
                        container_concurrency,
                        buffer_depth: (buffer != u32::MAX).then_some(buffer),
                        ready_replicas,
                    },
                ))
            }
        };
        let h = r.u32()? as usize;
        if bytes.len().saturating_sub(r.at) < h.saturating_mul(8) {
            return Err(DecodeError::Truncated(bytes.len()));
        }
        let mut holders = Vec::with_capacity(h);
        for _ in 0..h {
            holders.push((r.u32()?, r.u32()?));
        }
        let n = r.u32()? as usize;
        if bytes.len().saturating_sub(r.at) < n.saturating_mul(WAITER_BYTES) {
            return Err(DecodeError::Truncated(bytes.len()));
        }
        let mut waiters = VecDeque::with_capacity(n);
        for _ in 0..n {
            let ticket = r.u64()?;
            let vm = r.u32()?;
            let context = r.u32()?;
            let since_ms = r.u64()?;
            waiters.push_back(Waiter {
                ticket,
                owner: Owner { vm, context },
                since_ms,
            });
        }
        if r.at != bytes.len() {
            return Err(DecodeError::Trailing(bytes.len() - r.at));
        }
        Ok(RevisionState {
            active,
            next_ticket,
            waiters,
            demand,
            exported_ms,
            ready: (ready != READY_UNKNOWN).then_some(ready),
            holders,
            published,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self
            .at
            .checked_add(N)
            .ok_or(DecodeError::Truncated(self.bytes.len()))?;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or(DecodeError::Truncated(self.bytes.len()))?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        self.at = end;
        Ok(out)
    }
    fn slice(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(DecodeError::Truncated(self.bytes.len()))?;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or(DecodeError::Truncated(self.bytes.len()))?;
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const fn lim(capacity: u32, buffer: u32) -> Limits {
        Limits {
            capacity: Some(capacity),
            buffer,
        }
    }
    fn owner(vm: u32, context: u32) -> Owner {
        Owner { vm, context }
    }

    #[test]
    fn admits_up_to_capacity_then_queues_then_sheds() {
        let mut s = RevisionState::default();
        let l = lim(2, 1);
        assert_eq!(s.try_admit(l, owner(0, 1), 0), Admission::Admitted);
        assert_eq!(s.try_admit(l, owner(1, 1), 0), Admission::Admitted);
        assert_eq!(
            s.try_admit(l, owner(2, 1), 5),
            Admission::Queued { ticket: 0 }
        );
        assert_eq!(
            s.try_admit(l, owner(3, 1), 6),
            Admission::Shed(ShedReason::BufferFull)
        );
        assert_eq!((s.active, s.queued()), (2, 1));
        let g = s.release(0, l, 45);
        assert_eq!(
            g,
            vec![Grant {
                ticket: 0,
                owner: owner(2, 1),
                waited_ms: 40
            }]
        );
        assert_eq!((s.active, s.queued()), (2, 0));
    }

    #[test]
    fn new_arrivals_do_not_barge_past_waiters() {
        let mut s = RevisionState::default();
        let l = lim(1, 5);
        assert_eq!(s.try_admit(l, owner(0, 1), 0), Admission::Admitted);
        assert_eq!(
            s.try_admit(l, owner(0, 2), 0),
            Admission::Queued { ticket: 0 }
        );
        // The slot frees but the grant is in transit; capacity is full again with the grantee.
        let g = s.release(0, l, 1);
        assert_eq!(g.len(), 1);
        // Even with room, an arrival while someone waits must queue.
        let mut s2 = RevisionState::default();
        s2.try_admit(lim(0, 5), owner(0, 1), 0);
        assert_eq!(
            s2.try_admit(lim(1, 5), owner(0, 2), 0),
            Admission::Queued { ticket: 1 }
        );
    }

    #[test]
    fn unlimited_always_admits() {
        let mut s = RevisionState::default();
        let l = Limits {
            capacity: None,
            buffer: 0,
        };
        for i in 0..1000 {
            assert_eq!(s.try_admit(l, owner(0, i), 0), Admission::Admitted);
        }
        assert_eq!(s.active, 1000);
    }

    #[test]
    fn zero_capacity_buffers_until_capacity_appears() {
        let mut s = RevisionState::default();
        let zero = lim(0, 3);
        for c in 0..3 {
            assert_eq!(
                s.try_admit(zero, owner(0, c), c.into()),
                Admission::Queued { ticket: c.into() }
            );
        }
        assert_eq!(
            s.try_admit(zero, owner(0, 9), 0),
            Admission::Shed(ShedReason::BufferFull)
        );
        assert!(s.grant_ready(zero, 10).is_empty());
        let grants = s.grant_ready(lim(2, 3), 10);
        assert_eq!(
            grants.iter().map(|g| g.ticket).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!((s.active, s.queued()), (2, 1));
    }

    #[test]
    fn no_capacity_no_buffer_sheds() {
        let mut s = RevisionState::default();
        assert_eq!(
            s.try_admit(lim(0, 0), owner(0, 1), 0),
            Admission::Shed(ShedReason::BufferFull)
        );
    }

    #[test]
    fn cancel_removes_only_that_waiter() {
        let mut s = RevisionState::default();
        let l = lim(0, 10);
        for c in 0..4 {
            s.try_admit(l, owner(c, c), 0);
        }
        assert_eq!(s.cancel(2, 0).map(|w| w.owner), Some(owner(2, 2)));
        assert_eq!(s.cancel(2, 0), None, "second cancel finds nothing");
        assert_eq!(s.cancel(99, 0), None);
        assert_eq!(
            s.waiters().map(|w| w.ticket).collect::<Vec<_>>(),
            vec![0, 1, 3]
        );
        // Cancelling never touches active.
        assert_eq!(s.active, 0);
    }

    #[test]
    fn release_of_empty_state_saturates() {
        let mut s = RevisionState::default();
        assert!(s.release(0, lim(1, 1), 0).is_empty());
        assert_eq!(s.active, 0);
    }

    #[test]
    fn reap_takes_only_stale_waiters() {
        let mut s = RevisionState::default();
        let l = lim(0, 10);
        s.try_admit(l, owner(0, 1), 0);
        s.try_admit(l, owner(0, 2), 500);
        let reaped = s.reap(1_200, 1_000);
        assert_eq!(reaped.iter().map(|w| w.ticket).collect::<Vec<_>>(), vec![0]);
        assert_eq!(s.queued(), 1);
        assert!(s.reap(1_200, 1_000).is_empty());
    }

    #[test]
    fn demand_integrates_in_flight_plus_queued() {
        let mut s = RevisionState::default();
        let l = lim(1, 5);
        s.try_admit(l, owner(0, 1), 0); // level 1
        s.try_admit(l, owner(0, 2), 100); // level 2 (1 in flight, 1 queued)
        assert_eq!(s.demand_ms(300), 100 + 2 * 200);
        assert_eq!(s.release(0, l, 300).len(), 1); // the grant keeps level at 1
        assert_eq!(s.release(0, l, 500).len(), 0); // level 0
        assert_eq!(s.demand_ms(10_000), 100 + 400 + 200);
        assert_eq!(s.take_unexported_demand_ms(10_000), 700);
        assert_eq!(s.take_unexported_demand_ms(20_000), 0, "exported once");
        s.try_admit(l, owner(0, 3), 20_000);
        s.try_admit(l, owner(0, 4), 20_000);
        assert!(s.cancel(1, 20_050).is_some());
        assert_eq!(s.take_unexported_demand_ms(20_100), 2 * 50 + 50);
        let back = RevisionState::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn reap_vm_gives_back_its_slots_and_waiters() {
        let mut s = RevisionState::default();
        let l = lim(3, 10);
        s.try_admit(l, owner(1, 10), 0);
        s.try_admit(l, owner(1, 11), 0);
        s.try_admit(l, owner(2, 20), 0);
        s.try_admit(l, owner(1, 12), 0); // waits: ticket 0 on the dying VM
        s.try_admit(l, owner(2, 21), 0); // waits: ticket 1
        assert_eq!(s.holders().collect::<Vec<_>>(), vec![(1, 2), (2, 1)]);
        let (slots, waiters, grants) = s.reap_vm(1, l, 5);
        assert_eq!((slots, waiters), (2, 1));
        assert_eq!(grants.iter().map(|g| g.ticket).collect::<Vec<_>>(), vec![1]);
        assert_eq!((s.active, s.queued()), (2, 0));
        assert_eq!(s.holders().collect::<Vec<_>>(), vec![(2, 2)]);
        assert_eq!(s.reap_vm(9, l, 5).0, 0, "unknown VM holds nothing");
        assert_eq!(RevisionState::decode(&s.encode()), Ok(s.clone()));
    }

    #[test]
    fn newest_configuration_publishes_its_limits() {
        let mut s = RevisionState::default();
        let old = LimitParams {
            container_concurrency: 4,
            buffer_depth: Some(8),
            ready_replicas: 1,
        };
        let new = LimitParams {
            container_concurrency: 1,
            buffer_depth: None,
            ready_replicas: 1,
        };
        assert_eq!(s.limit_params(1, old), old, "nothing published: own");
        s.publish(1, old);
        s.publish(2, new);
        s.publish(1, old); // a late VM of the old configuration does not win back
        assert_eq!(
            s.limit_params(1, old),
            new,
            "old generation applies the new limits"
        );
        assert_eq!(s.limit_params(2, new), new);
        assert_eq!(s.limit_params(3, old), old, "a newer VM keeps its own");
        assert_eq!(RevisionState::decode(&s.encode()), Ok(s.clone()));
    }

    #[test]
    fn ready_is_learned_and_round_trips() {
        let mut s = RevisionState::default();
        assert_eq!(s.ready(), None);
        s.set_ready(3);
        assert_eq!(RevisionState::decode(&s.encode()).unwrap().ready(), Some(3));
        s.set_ready(0);
        assert_eq!(s.ready(), Some(0));
    }

    #[test]
    fn decode_rejects_bad_bytes() {
        let mut s = RevisionState::default();
        s.try_admit(lim(0, 4), owner(7, 9), 3);
        let bytes = s.encode();
        assert_eq!(RevisionState::decode(&bytes), Ok(s.clone()));
        assert_eq!(RevisionState::decode(&[]), Err(DecodeError::Truncated(0)));
        assert_eq!(RevisionState::decode(&[9]), Err(DecodeError::Version(9)));
        assert!(matches!(
            RevisionState::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated(_))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(RevisionState::decode(&long), Err(DecodeError::Trailing(1)));
        // A huge waiter count must not allocate or panic.
        let mut lying = RevisionState::default().encode();
        lying.truncate(lying.len() - 4);
        lying.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(RevisionState::decode(&lying).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Arrive(u32),
        Finish(usize),
        Cancel(usize),
        Resize(u32),
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..8).prop_map(Op::Arrive),
            3 => (0usize..64).prop_map(Op::Finish),
            1 => (0usize..64).prop_map(Op::Cancel),
            1 => (0u32..6).prop_map(Op::Resize),
            1 => (0u64..100).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Against a plain model: in-flight never exceeds capacity, grants come in ticket
        /// order, and draining returns everything to zero.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..200), cap in 0u32..5, buffer in 0u32..8) {
            let mut s = RevisionState::default();
            let mut limits = lim(cap, buffer);
            let mut running: Vec<(u64, u32)> = Vec::new(); // (admitted id, holder vm)
            let mut last_granted: Option<u64> = None;
            let mut now = 0u64;
            let mut arrivals = 0u64;
            for o in ops {
                let grants = match o {
                    Op::Arrive(vm) => {
                        arrivals += 1;
                        match s.try_admit(limits, owner(vm, arrivals as u32), now) {
                            Admission::Admitted => { running.push((u64::MAX - arrivals, vm)); vec![] }
                            Admission::Queued { .. } | Admission::Shed(_) => vec![],
                        }
                    }
                    Op::Finish(i) => {
                        if running.is_empty() { vec![] } else {
                            let (_, vm) = running.remove(i % running.len());
                            s.release(vm, limits, now)
                        }
                    }
                    Op::Cancel(i) => {
                        let tickets: Vec<u64> = s.waiters().map(|w| w.ticket).collect();
                        if !tickets.is_empty() {
                            prop_assert!(s.cancel(tickets[i % tickets.len()], now).is_some());
                        }
                        vec![]
                    }
                    Op::Resize(c) => { limits = lim(c, buffer); s.grant_ready(limits, now) }
                    Op::Tick(d) => { now += d; vec![] }
                };
                for g in grants {
                    if let Some(prev) = last_granted { prop_assert!(g.ticket > prev, "FIFO"); }
                    last_granted = Some(g.ticket);
                    running.push((g.ticket, g.owner.vm));
                }
                prop_assert_eq!(s.active as usize, running.len());
                // Holders agree with the model, VM by VM.
                for (vm, held) in s.holders() {
                    prop_assert_eq!(held as usize, running.iter().filter(|r| r.1 == vm).count());
                }
                prop_assert_eq!(s.holders().map(|h| h.1).sum::<u32>(), s.active);
                prop_assert!(s.queued() <= buffer);
                // No idle slot while someone waits (work-conserving).
                if s.waiters().next().is_some() {
                    prop_assert!(s.active >= limits.capacity.unwrap_or(0));
                }
                prop_assert_eq!(RevisionState::decode(&s.encode()), Ok(s.clone()));
            }
            // Drain: finish everything, cancel everyone.
            let tickets: Vec<u64> = s.waiters().map(|w| w.ticket).collect();
            for t in tickets { s.cancel(t, now); }
            while let Some((_, vm)) = running.pop() { prop_assert!(s.release(vm, limits, now).is_empty()); }
            prop_assert_eq!((s.active, s.queued()), (0, 0));
            prop_assert_eq!(s.holders().count(), 0);
        }

        #[test]
        fn never_above_capacity_without_shrink(ops in proptest::collection::vec(0u8..3, 1..300), cap in 1u32..6) {
            let mut s = RevisionState::default();
            let l = lim(cap, 20);
            let mut held = 0u32;
            for o in ops {
                match o {
                    0 | 1 => { if s.try_admit(l, owner(0, 0), 0) == Admission::Admitted { held += 1; } }
                    _ => if held > 0 { held -= 1; held += s.release(0, l, 0).len() as u32; },
                }
                prop_assert!(s.active <= cap);
                prop_assert_eq!(s.active, held);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            let _ = RevisionState::decode(&bytes);
        }
    }
}
