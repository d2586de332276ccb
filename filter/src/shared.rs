//! Cross-worker state in Envoy shared data, and the wake queues between workers.
//!
//! Every Envoy worker thread runs its own VM; shared data is the only memory they share.
//! Updates are compare-and-swap loops. Envoy ignores the CAS on a key that does not exist yet,
//! so keys are created with [`create_if_absent`], which passes a CAS value that no live key can
//! have: the write then either creates the key or fails with `CasMismatch` because someone else
//! created it first — never overwriting a live value.

use inflight_core::autoscaler::Autoscaler;
use inflight_core::RevisionState;
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// Envoy hands out CAS values from a counter starting at 1; this one is never current for a key
/// written fewer than 2^32 − 1 times since Envoy started, which is how we detect "exists".
const CAS_NEVER_CURRENT: u32 = u32::MAX;
/// Bound on CAS retries; contention between a handful of workers settles in a few.
const MAX_ATTEMPTS: u32 = 10_000;

/// Why an update of shared state failed.
#[derive(Debug)]
pub enum SharedError {
    Host(Status),
    Corrupt(String),
    Contended,
}

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SharedError::Host(s) => write!(f, "host call failed: {s:?}"),
            SharedError::Corrupt(e) => write!(f, "shared state unreadable: {e}"),
            SharedError::Contended => {
                write!(f, "shared state update lost {MAX_ATTEMPTS} CAS races")
            }
        }
    }
}

impl From<Status> for SharedError {
    fn from(s: Status) -> Self {
        SharedError::Host(s)
    }
}

pub fn state_key(revision: &str) -> String {
    format!("inflight.v1.rev.{revision}")
}

pub fn autoscaler_key(revision: &str) -> String {
    format!("inflight.v1.kpa.{revision}")
}

pub fn wake_queue_name(vm: u32) -> String {
    format!("inflight.wake.{vm}")
}

fn wake_token_key(vm: u32) -> String {
    format!("inflight.v1.wake.{vm}")
}

/// Creates `key` with `value` unless it already exists.
pub fn create_if_absent(key: &str, value: &[u8]) -> Result<(), SharedError> {
    if let (Some(_), _) = hostcalls::get_shared_data(key)? {
        return Ok(());
    }
    match hostcalls::set_shared_data(key, Some(value), Some(CAS_NEVER_CURRENT)) {
        Ok(()) | Err(Status::CasMismatch) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Applies `f` to the decoded state of `key` atomically (CAS loop) and returns its result.
///
/// Plain version, without concurrency: `let mut s = load(key); let out = f(&mut s); store(key, s); out`.
pub fn update_state<T>(
    key: &str,
    mut f: impl FnMut(&mut RevisionState) -> T,
) -> Result<T, SharedError> {
    for _ in 0..MAX_ATTEMPTS {
        let (bytes, cas) = hostcalls::get_shared_data(key)?;
        let Some(bytes) = bytes else {
            // Only before on_configure created it (or if Envoy dropped it): create and retry.
            create_if_absent(key, &RevisionState::default().encode())?;
            continue;
        };
        let mut state = if bytes.is_empty() {
            RevisionState::default()
        } else {
            RevisionState::decode(&bytes).map_err(|e| SharedError::Corrupt(e.to_string()))?
        };
        let out = f(&mut state);
        match hostcalls::set_shared_data(
            key,
            Some(&state.encode()),
            cas.or(Some(CAS_NEVER_CURRENT)),
        ) {
            Ok(()) => return Ok(out),
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SharedError::Contended)
}

/// Takes the next VM id from a shared counter, registers this VM's wake queue under it and
/// publishes the queue's token, so other workers can reach this one.
pub fn register_vm() -> Result<(u32, u32), SharedError> {
    const KEY: &str = "inflight.v1.vm-seq";
    create_if_absent(KEY, &0u32.to_le_bytes())?;
    let mut id = None;
    for _ in 0..MAX_ATTEMPTS {
        let (bytes, cas) = hostcalls::get_shared_data(KEY)?;
        let current = bytes
            .as_deref()
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0);
        let next = current.wrapping_add(1);
        match hostcalls::set_shared_data(
            KEY,
            Some(&next.to_le_bytes()),
            cas.or(Some(CAS_NEVER_CURRENT)),
        ) {
            Ok(()) => {
                id = Some(next);
                break;
            }
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let id = id.ok_or(SharedError::Contended)?;
    let token = hostcalls::register_shared_queue(&wake_queue_name(id))?;
    hostcalls::set_shared_data(&wake_token_key(id), Some(&token.to_le_bytes()), None)?;
    Ok((id, token))
}

/// The wake-queue token of VM `vm`, if it ever registered.
pub fn wake_token(vm: u32) -> Result<Option<u32>, SharedError> {
    let (bytes, _) = hostcalls::get_shared_data(&wake_token_key(vm))?;
    Ok(bytes
        .as_deref()
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes))
}

/// Applies `f` to the revision's autoscaler state (created with `init` if missing or from an
/// older format) atomically.
pub fn update_autoscaler<T>(
    key: &str,
    init: impl Fn() -> Autoscaler,
    mut f: impl FnMut(&mut Autoscaler) -> T,
) -> Result<T, SharedError> {
    for _ in 0..MAX_ATTEMPTS {
        let (bytes, cas) = hostcalls::get_shared_data(key)?;
        let mut a = match bytes.as_deref().map(Autoscaler::decode) {
            Some(Ok(a)) => a,
            // Missing, or written by another version: start over (the window refills).
            _ => init(),
        };
        let out = f(&mut a);
        match hostcalls::set_shared_data(key, Some(&a.encode()), cas.or(Some(CAS_NEVER_CURRENT))) {
            Ok(()) => return Ok(out),
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SharedError::Contended)
}

/// Claims the next membership poll for this VM if `interval_ms` passed since the last claim by
/// any worker.
pub fn claim_poll(now_ms: u64, interval_ms: u64) -> Result<bool, SharedError> {
    const KEY: &str = "inflight.v1.membership-poll";
    for _ in 0..MAX_ATTEMPTS {
        let (bytes, cas) = hostcalls::get_shared_data(KEY)?;
        let last = bytes
            .as_deref()
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes);
        if last.is_some_and(|l| now_ms.saturating_sub(l) < interval_ms) {
            return Ok(false);
        }
        match hostcalls::set_shared_data(
            KEY,
            Some(&now_ms.to_le_bytes()),
            cas.or(Some(CAS_NEVER_CURRENT)),
        ) {
            Ok(()) => return Ok(true),
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SharedError::Contended)
}

fn heartbeat_key(vm: u32) -> String {
    format!("inflight.v1.heartbeat.{vm}")
}

/// Records that VM `vm` is alive at `now_ms` (its own key: no CAS needed).
pub fn beat(vm: u32, now_ms: u64) -> Result<(), SharedError> {
    hostcalls::set_shared_data(&heartbeat_key(vm), Some(&now_ms.to_le_bytes()), None)?;
    Ok(())
}

/// Milliseconds since VM `vm` last beat; `None` if it never did.
pub fn heartbeat_age(vm: u32, now_ms: u64) -> Option<u64> {
    let (bytes, _) = hostcalls::get_shared_data(&heartbeat_key(vm)).ok()?;
    let last = bytes
        .as_deref()
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)?;
    Some(now_ms.saturating_sub(last))
}

/// The generation of the configuration `bytes`: the same bytes get the same generation; other
/// bytes than the last configured get the next one. Orders configurations across a reload.
pub fn config_generation(bytes: &[u8]) -> Result<u64, SharedError> {
    const KEY: &str = "inflight.v1.config-generation";
    // FNV-1a: a stable fingerprint of the configuration bytes.
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    for _ in 0..MAX_ATTEMPTS {
        let (current, cas) = hostcalls::get_shared_data(KEY)?;
        let (generation, last_hash) = current
            .as_deref()
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(|b| {
                let (g, h) = b.split_at(8);
                (
                    u64::from_le_bytes(g.try_into().unwrap_or_default()),
                    u64::from_le_bytes(h.try_into().unwrap_or_default()),
                )
            })
            .unwrap_or((0, 0));
        if current.is_some() && last_hash == hash {
            return Ok(generation);
        }
        let next = generation.wrapping_add(1);
        let mut value = next.to_le_bytes().to_vec();
        value.extend_from_slice(&hash.to_le_bytes());
        match hostcalls::set_shared_data(KEY, Some(&value), cas.or(Some(CAS_NEVER_CURRENT))) {
            Ok(()) => return Ok(next),
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SharedError::Contended)
}

fn cluster_key(cluster: &str) -> String {
    format!("inflight.v1.cluster.{cluster}")
}

/// Marks a cluster seen behind two revisions' hosts.
const AMBIGUOUS: &[u8] = b"";

/// What [`record_cluster_revision`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ClusterRecord {
    /// First seen: now recorded for this revision.
    New,
    /// Already recorded for this revision.
    Same,
    /// Recorded for another revision (`first`, now marked ambiguous), or already ambiguous
    /// (`None`).
    Ambiguous { first: Option<String> },
}

/// Records that a host of `revision` routes to `cluster` (shared by all VMs).
pub fn record_cluster_revision(
    cluster: &str,
    revision: &str,
) -> Result<ClusterRecord, SharedError> {
    let key = cluster_key(cluster);
    for _ in 0..MAX_ATTEMPTS {
        let (bytes, cas) = hostcalls::get_shared_data(&key)?;
        let (value, outcome): (&[u8], ClusterRecord) = match bytes.as_deref() {
            None => (revision.as_bytes(), ClusterRecord::New),
            Some(b) if b == revision.as_bytes() => return Ok(ClusterRecord::Same),
            Some(b) if b == AMBIGUOUS => return Ok(ClusterRecord::Ambiguous { first: None }),
            Some(b) => (
                AMBIGUOUS,
                ClusterRecord::Ambiguous {
                    first: Some(String::from_utf8_lossy(b).into_owned()),
                },
            ),
        };
        match hostcalls::set_shared_data(&key, Some(value), cas.or(Some(CAS_NEVER_CURRENT))) {
            Ok(()) => return Ok(outcome),
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SharedError::Contended)
}

/// The revision recorded for `cluster`; `None` if none is, or several are.
pub fn cluster_revision(cluster: &str) -> Result<Option<String>, SharedError> {
    let (bytes, _) = hostcalls::get_shared_data(&cluster_key(cluster))?;
    Ok(bytes
        .filter(|b| b.as_slice() != AMBIGUOUS)
        .and_then(|b| String::from_utf8(b).ok()))
}
