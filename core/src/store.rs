//! Cross-worker state in Envoy shared data, behind the [`Host`] trait, with one CAS loop.
//!
//! Every Envoy worker thread runs its own VM; shared data is the only memory they share, and
//! every record the workers agree on is updated here with [`update`], the one compare-and-swap
//! loop of the project. Two host facts shape it (both modelled by the fake host in the tests):
//!
//! - a set on a key that does not exist ignores the CAS value. [`update`] passes
//!   [`CAS_NEVER_CURRENT`] for a missing key, a CAS value no live key can have: the write then
//!   either creates the key or fails with `CasMismatch` because another worker created it first
//!   — never overwriting a live value;
//! - an **empty value reads as absent** (the SDK gets a null pointer for zero bytes and returns
//!   `None`). So no record may encode to zero bytes: an empty marker would read back as "never
//!   written". (The cluster record once used `""` for "ambiguous"; a VM that had not seen the
//!   marker then read the key as new and overwrote it, which is how an ambiguous cluster came
//!   to count again in the real-Envoy hostile suite.)

use crate::autoscaler::Autoscaler;
use crate::RevisionState;
use std::fmt;
use thiserror::Error;

/// Envoy hands out CAS values from a counter starting at 1; this one is never current for a key
/// written fewer than 2^32 − 1 times since Envoy started, which is how we detect "exists".
pub const CAS_NEVER_CURRENT: u32 = u32::MAX;
/// Bound on CAS retries; contention between a handful of workers settles in a few.
pub const MAX_ATTEMPTS: u32 = 10_000;

/// A failed host call (the proxy-wasm `Status`, reduced to what callers tell apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    NotFound,
    CasMismatch,
    BadArgument,
    /// Any other status, by its proxy-wasm code.
    Other(u32),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::NotFound => write!(f, "NotFound"),
            HostError::CasMismatch => write!(f, "CasMismatch"),
            HostError::BadArgument => write!(f, "BadArgument"),
            HostError::Other(code) => write!(f, "status {code}"),
        }
    }
}

/// What a worker needs from its host (Envoy through proxy-wasm, or a fake in tests): shared
/// data with compare-and-swap, and the wake queues between workers.
pub trait Host {
    /// The value of `key` and its CAS value. An empty value reads as `None` (see module docs).
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError>;
    /// Writes `key` if its CAS value is still `cas` (`None`: unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError>;
    /// Registers this VM's queue `name` and returns its token.
    fn register_queue(&self, name: &str) -> Result<u32, HostError>;
    /// Appends `message` to the queue `token` (any VM's).
    fn enqueue(&self, token: u32, message: &[u8]) -> Result<(), HostError>;
}

/// Why an update of shared state failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    #[error("host call failed: {0}")]
    Host(HostError),
    #[error("shared state unreadable: {0}")]
    Corrupt(String),
    #[error("shared state update lost {MAX_ATTEMPTS} CAS races")]
    Contended,
}

impl From<HostError> for StoreError {
    fn from(e: HostError) -> Self {
        StoreError::Host(e)
    }
}

/// What an update does with the value it looked at.
pub enum Change<T> {
    /// Store the (changed) value, then return `T`; retried on a CAS race.
    Write(T),
    /// Leave the key as it is and return `T`.
    Keep(T),
}

/// Applies `f` to the record at `key` atomically and returns its result. `load` turns the
/// stored bytes (`None`: absent) into the record, `encode` back into bytes (never empty).
///
/// Plain version, without concurrency: `let mut r = load(get(key)); let out = f(&mut r);
/// set(key, encode(r)); out`.
pub fn update<H: Host + ?Sized, R, T>(
    host: &H,
    key: &str,
    load: impl Fn(Option<&[u8]>) -> Result<R, StoreError>,
    encode: impl Fn(&R) -> Vec<u8>,
    mut f: impl FnMut(&mut R) -> Change<T>,
) -> Result<T, StoreError> {
    for _ in 0..MAX_ATTEMPTS {
        let (bytes, cas) = host.get(key)?;
        let mut record = load(bytes.as_deref())?;
        let out = match f(&mut record) {
            Change::Keep(out) => return Ok(out),
            Change::Write(out) => out,
        };
        match host.set(key, &encode(&record), cas.or(Some(CAS_NEVER_CURRENT))) {
            Ok(()) => return Ok(out),
            Err(HostError::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Contended)
}

/// The bytes at `key`, if any.
pub fn read<H: Host + ?Sized>(host: &H, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(host.get(key)?.0)
}

/// Writes `key` unconditionally (keys with a single writer: heartbeats, wake tokens).
pub fn write<H: Host + ?Sized>(host: &H, key: &str, value: &[u8]) -> Result<(), StoreError> {
    Ok(host.set(key, value, None)?)
}

// Keys. Revisions travel by name so that VMs of two configurations (during a reload) share them.

pub fn revision_key(revision: &str) -> String {
    format!("inflight.v1.rev.{revision}")
}

pub fn autoscaler_key(revision: &str) -> String {
    format!("inflight.v1.kpa.{revision}")
}

pub fn wake_queue_name(vm: u32) -> String {
    format!("inflight.wake.{vm}")
}

pub fn wake_token_key(vm: u32) -> String {
    format!("inflight.v1.wake.{vm}")
}

pub fn heartbeat_key(vm: u32) -> String {
    format!("inflight.v1.heartbeat.{vm}")
}

pub fn cluster_key(cluster: &str) -> String {
    format!("inflight.v1.cluster.{cluster}")
}

pub const VM_SEQ_KEY: &str = "inflight.v1.vm-seq";
pub const POLL_CLAIM_KEY: &str = "inflight.v1.membership-poll";
/// Whether the gateway drains (Envoy's server state is DRAINING): one byte, 1 or 0.
pub const DRAINING_KEY: &str = "inflight.v1.draining";
pub const CONFIG_GENERATION_KEY: &str = "inflight.v1.config-generation";

// Record codecs: fixed-width little-endian integers; a wrong length is corrupt, absent is
// `None`. One style for every small record.

/// Decodes a record of `N` bytes.
pub fn fixed<const N: usize>(bytes: Option<&[u8]>) -> Result<Option<[u8; N]>, StoreError> {
    match bytes {
        None => Ok(None),
        Some(b) => <[u8; N]>::try_from(b)
            .map(Some)
            .map_err(|_| StoreError::Corrupt(format!("expected {N} bytes, found {}", b.len()))),
    }
}

pub fn load_u32(bytes: Option<&[u8]>) -> Result<Option<u32>, StoreError> {
    Ok(fixed::<4>(bytes)?.map(u32::from_le_bytes))
}

pub fn load_u64(bytes: Option<&[u8]>) -> Result<Option<u64>, StoreError> {
    Ok(fixed::<8>(bytes)?.map(u64::from_le_bytes))
}

/// A revision's shared state; absent means nothing happened yet.
pub fn load_revision(bytes: Option<&[u8]>) -> Result<RevisionState, StoreError> {
    match bytes {
        None => Ok(RevisionState::default()),
        Some(b) => RevisionState::decode(b).map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

/// Applies `f` to a revision's shared state.
pub fn update_revision<H: Host + ?Sized, T>(
    host: &H,
    key: &str,
    mut f: impl FnMut(&mut RevisionState) -> T,
) -> Result<T, StoreError> {
    update(host, key, load_revision, RevisionState::encode, |s| {
        Change::Write(f(s))
    })
}

/// Applies `f` to a revision's autoscaler, started with `init` when absent or written by another
/// version (the window refills).
pub fn update_autoscaler<H: Host + ?Sized, T>(
    host: &H,
    key: &str,
    init: impl Fn() -> Autoscaler,
    mut f: impl FnMut(&mut Autoscaler) -> T,
) -> Result<T, StoreError> {
    update(
        host,
        key,
        |b| {
            Ok(b.and_then(|b| Autoscaler::decode(b).ok())
                .unwrap_or_else(&init))
        },
        Autoscaler::encode,
        |a| Change::Write(f(a)),
    )
}

/// The value of a cluster record: which revision's hosts route to a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterOwner {
    Revision(String),
    /// Seen behind the hosts of two revisions: not used.
    Ambiguous,
}

/// Marks an ambiguous cluster: one NUL byte, which no revision name (a DNS label) contains and
/// which is not empty (an empty value reads as absent).
const AMBIGUOUS: &[u8] = b"\0";

pub fn load_cluster(bytes: Option<&[u8]>) -> Result<Option<ClusterOwner>, StoreError> {
    match bytes {
        None => Ok(None),
        Some(AMBIGUOUS) => Ok(Some(ClusterOwner::Ambiguous)),
        Some(b) => std::str::from_utf8(b)
            .map(|s| Some(ClusterOwner::Revision(s.to_string())))
            .map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

pub fn encode_cluster(owner: &Option<ClusterOwner>) -> Vec<u8> {
    match owner {
        Some(ClusterOwner::Revision(name)) if !name.is_empty() => name.as_bytes().to_vec(),
        _ => AMBIGUOUS.to_vec(),
    }
}

/// A configuration generation record: `(generation, fingerprint of the configuration bytes)`.
pub fn load_generation(bytes: Option<&[u8]>) -> Result<Option<(u64, u64)>, StoreError> {
    Ok(fixed::<16>(bytes)?.map(|b| {
        let (g, h) = b.split_at(8);
        let word = |s: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        };
        (word(g), word(h))
    }))
}

pub fn encode_generation(value: &Option<(u64, u64)>) -> Vec<u8> {
    let (g, h) = value.unwrap_or((0, 0));
    let mut out = g.to_le_bytes().to_vec();
    out.extend_from_slice(&h.to_le_bytes());
    out
}

#[cfg(test)]
pub(crate) mod fake {
    //! A host with Envoy's shared-data semantics, for native tests: CAS values from a counter
    //! starting at 1, CAS ignored on a missing key, an empty value read as absent; queues that
    //! deliver nothing by themselves (the test drains them).

    use super::{Host, HostError};
    use std::cell::RefCell;
    use std::collections::{HashMap, VecDeque};
    use std::rc::Rc;

    #[derive(Default)]
    pub struct World {
        pub shared: HashMap<String, (Vec<u8>, u32)>,
        next_cas: u32,
        pub queues: HashMap<u32, VecDeque<Vec<u8>>>,
        queue_names: HashMap<String, u32>,
        /// Tokens whose enqueue fails (a VM that is gone).
        pub unreachable: Vec<u32>,
        /// Keys whose next `set` fails with this status.
        pub failing_sets: HashMap<String, HostError>,
    }

    #[derive(Clone, Default)]
    pub struct FakeHost {
        pub world: Rc<RefCell<World>>,
    }

    impl Host for FakeHost {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError> {
            let w = self.world.borrow();
            Ok(match w.shared.get(key) {
                None => (None, None),
                Some((v, cas)) => ((!v.is_empty()).then(|| v.clone()), Some(*cas)),
            })
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
            let mut w = self.world.borrow_mut();
            if let Some(e) = w.failing_sets.remove(key) {
                return Err(e);
            }
            if let (Some(want), Some((_, current))) = (cas, w.shared.get(key)) {
                if want != *current {
                    return Err(HostError::CasMismatch);
                }
            }
            w.next_cas = w.next_cas.wrapping_add(1).max(1);
            let next = w.next_cas;
            w.shared.insert(key.to_string(), (value.to_vec(), next));
            Ok(())
        }

        fn register_queue(&self, name: &str) -> Result<u32, HostError> {
            let mut w = self.world.borrow_mut();
            let n = u32::try_from(w.queue_names.len()).unwrap_or(u32::MAX) + 1;
            let token = *w.queue_names.entry(name.to_string()).or_insert(n);
            w.queues.entry(token).or_default();
            Ok(token)
        }

        fn enqueue(&self, token: u32, message: &[u8]) -> Result<(), HostError> {
            let mut w = self.world.borrow_mut();
            if w.unreachable.contains(&token) {
                return Err(HostError::NotFound);
            }
            match w.queues.get_mut(&token) {
                Some(q) => {
                    q.push_back(message.to_vec());
                    Ok(())
                }
                None => Err(HostError::NotFound),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeHost;
    use super::*;

    #[test]
    fn an_empty_value_reads_as_absent_so_no_record_encodes_empty() {
        let h = FakeHost::default();
        h.set("k", b"", None).unwrap();
        assert_eq!(h.get("k").unwrap().0, None);
        assert!(!encode_cluster(&Some(ClusterOwner::Ambiguous)).is_empty());
        assert!(!RevisionState::default().encode().is_empty());
        assert_eq!(
            load_cluster(Some(&encode_cluster(&Some(ClusterOwner::Ambiguous)))).unwrap(),
            Some(ClusterOwner::Ambiguous)
        );
    }

    #[test]
    fn update_creates_a_missing_key_and_retries_a_lost_race() {
        let h = FakeHost::default();
        let n = update(
            &h,
            "n",
            load_u32,
            |v| v.unwrap_or(0).to_le_bytes().to_vec(),
            |v| {
                *v = Some(v.unwrap_or(0) + 1);
                Change::Write(())
            },
        );
        assert_eq!(n, Ok(()));
        // A racing writer changes the key between our read and our write: we retry once.
        let racer = h.clone();
        let mut raced = false;
        let out = update(
            &h,
            "n",
            load_u32,
            |v| v.unwrap_or(0).to_le_bytes().to_vec(),
            |v| {
                if !raced {
                    raced = true;
                    racer.set("n", &7u32.to_le_bytes(), None).unwrap();
                }
                *v = Some(v.unwrap_or(0) + 1);
                Change::Write(v.unwrap_or(0))
            },
        );
        assert_eq!(out, Ok(8), "the retry saw the racer's 7");
    }

    #[test]
    fn keep_does_not_write_and_errors_pass_through() {
        let h = FakeHost::default();
        let out = update(&h, "k", load_u64, |_| vec![1], |_| Change::Keep(5));
        assert_eq!(out, Ok(5));
        assert!(h.world.borrow().shared.is_empty());
        h.world
            .borrow_mut()
            .failing_sets
            .insert("k".into(), HostError::Other(9));
        let out = update(&h, "k", load_u64, |_| vec![1; 8], |_| Change::Write(()));
        assert_eq!(out, Err(StoreError::Host(HostError::Other(9))));
        h.set("k", &[1, 2, 3], None).unwrap();
        assert!(matches!(
            load_u64(h.get("k").unwrap().0.as_deref()),
            Err(StoreError::Corrupt(_))
        ));
    }
}
