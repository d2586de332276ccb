//! The local scaler: each tick it follows the gateway's decision (`inflight_desired_replicas`,
//! computed in the filter by core's KPA decider) and applies it to one revision's replica
//! processes and EDS file. It does not recompute the decision: the gateway owns it, the scaler
//! only clamps it to min/max scale and acts.
//!
//! One rule is the scaler's own, from Knative's KPA reconciler: **initial scale**. A revision
//! starts with its `initialReplicas` and is not scaled below them until they have all been ready
//! once. The gateway cannot apply it: a replica joins EDS only once ready, so while the first
//! ones start the gateway sees 0 ready and no demand, and with `minScale: 0` Knative's rule says
//! 0 (the scale-to-zero grace period protects ready replicas only). Followed blindly, that
//! stopped a `minScale: 0` revision's replicas before they ever served. The hold ends once the
//! gateway has counted the initial replicas as ready for a whole decision period, so that the
//! desired count the scaler reads comes from a decision that saw them (the gauge does not say
//! which ready count its decision used; this waits for one instead). After that the scaler
//! follows the gateway down to 0 (once the stable window has seen no demand and the grace period
//! has passed) and back up on the next request, which waits in the gateway meanwhile.
//!
//! Scale-up starts processes and publishes each in EDS only once its readiness probe answers.
//! Scale-down drains: the replica stays in EDS as DRAINING (the filter stops picking it at its
//! next poll; a pick made just before still reaches it), then gets SIGTERM and leaves EDS once its own in-flight is
//! 0 (bounded by the drain timeout). A replica that dies is restarted in place.

use super::config::RevisionSpec;
use super::eds;
use super::replicas::{pod_name, Launch, Phase, Replica};
use super::stats::RevisionStats;
use anyhow::Result;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a draining replica stays listed in EDS (as `DRAINING`) before it may be stopped:
/// the filter's next poll (every 500 ms by default) sees it draining and picks it no more, and a
/// request picked for it just before still finds it there. Also covers requests on their way.
const EDS_GRACE: Duration = Duration::from_millis(1000);
/// SIGTERM'd replicas get this long to exit before SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(35);
/// How long the gateway must have counted the initial replicas as ready before its desired count
/// is trusted to include them: one decision period, plus a second for the filter's tick (100 ms
/// by default) and the scrape.
const INITIAL_SCALE_SEEN: Duration =
    Duration::from_millis(inflight_core::autoscaler::DEFAULT_DECISION_PERIOD_MS + 1_000);

/// What to do this tick, from the target scale and the replicas' phases (oldest first).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub start: u32,
    /// Indices of replicas to take out of service (Starting ones first, then the newest Ready).
    pub retire: Vec<usize>,
}

pub fn plan(target: u32, phases: &[Phase]) -> Plan {
    let live: Vec<usize> = (0..phases.len()).filter(|&i| phases[i].is_live()).collect();
    let n = u32::try_from(live.len()).unwrap_or(u32::MAX);
    if target > n {
        return Plan {
            start: target - n,
            retire: Vec::new(),
        };
    }
    let excess = usize::try_from(n - target).unwrap_or(usize::MAX);
    let mut order: Vec<usize> = live
        .iter()
        .rev()
        .copied()
        .filter(|&i| phases[i] == Phase::Starting)
        .collect();
    order.extend(
        live.iter()
            .rev()
            .copied()
            .filter(|&i| phases[i] == Phase::Ready),
    );
    order.truncate(excess);
    Plan {
        start: 0,
        retire: order,
    }
}

/// The scale to apply: the gateway's `desired` within [min, max], and at least `initial` while
/// the revision has not yet had its initial replicas ready (`None` once it has).
pub fn scale_target(desired: f64, min: u32, max: u32, initial: Option<u32>) -> u32 {
    let target = clamp(desired, min, max);
    initial.map_or(target, |i| target.max(i))
}

/// `desired` from the gateway clamped to [min, max] (max 0 = unbounded).
pub fn clamp(desired: f64, min: u32, max: u32) -> u32 {
    let d = if desired.is_finite() && desired > 0.0 {
        desired.ceil().min(f64::from(u32::MAX)) as u32
    } else {
        0
    };
    let d = d.max(min);
    if max > 0 {
        d.min(max)
    } else {
        d
    }
}

/// One revision's replicas and EDS file.
pub struct Pool {
    pub spec: RevisionSpec,
    launch: Launch,
    eds_path: PathBuf,
    pub replicas: Vec<Replica>,
    /// Replicas that have exited after a scale-down (kept for totals and the pid check).
    pub gone: Vec<Replica>,
    next_name: u32,
    eds_version: u64,
    published: Option<(Vec<SocketAddr>, Vec<SocketAddr>)>,
    /// The scale the scaler is applying.
    pub target: u32,
    /// The revision has had its initial replicas ready at once, and the gateway has counted
    /// them (Knative's initial scale): from then on the gateway's decision may take it below
    /// them.
    initial_scale_reached: bool,
    /// Since when the gateway has counted the initial replicas as ready (while not yet reached).
    initial_seen_since: Option<Instant>,
    drain_timeout: Duration,
}

impl Pool {
    pub fn new(spec: RevisionSpec, launch: Launch, eds_path: PathBuf) -> Pool {
        let drain_timeout = spec.drain_timeout();
        let initial_scale_reached = spec.initial_replicas == 0;
        Pool {
            target: spec.initial_replicas,
            spec,
            launch,
            eds_path,
            replicas: Vec::new(),
            gone: Vec::new(),
            next_name: 0,
            eds_version: 0,
            published: None,
            initial_scale_reached,
            initial_seen_since: None,
            drain_timeout,
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn count(&self, f: impl Fn(Phase) -> bool) -> usize {
        self.replicas.iter().filter(|r| f(r.phase)).count()
    }

    pub fn ready(&self) -> usize {
        self.count(|p| p == Phase::Ready)
    }

    /// Writes the EDS file if the set of ready or draining replicas changed (and once at start).
    pub fn publish(&mut self) -> Result<Option<String>> {
        let eps: Vec<SocketAddr> = self
            .replicas
            .iter()
            .filter(|r| r.phase == Phase::Ready)
            .filter_map(|r| r.addr)
            .collect();
        let draining: Vec<SocketAddr> = self
            .replicas
            .iter()
            .filter(|r| matches!(r.phase, Phase::Draining { .. }))
            .filter_map(|r| r.addr)
            .collect();
        let now = (eps, draining);
        if self.published.as_ref() == Some(&now) {
            return Ok(None);
        }
        let (eps, draining) = now;
        self.eds_version += 1;
        eds::write(
            &self.eds_path,
            self.name(),
            self.eds_version,
            &eps,
            &draining,
        )?;
        let list = eps
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let drain_list = draining
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        self.published = Some((eps, draining));
        Ok(Some(if drain_list.is_empty() {
            format!("{}: EDS v{} → [{list}]", self.name(), self.eds_version)
        } else {
            format!(
                "{}: EDS v{} → [{list}], draining [{drain_list}]",
                self.name(),
                self.eds_version
            )
        }))
    }

    fn start_one(&mut self) -> Result<String> {
        let name = pod_name(&self.spec.name, self.next_name);
        self.next_name += 1;
        let r = Replica::start(name.clone(), &self.launch)?;
        let line = format!("{}: started {name} (pid {})", self.name(), r.pid());
        self.replicas.push(r);
        Ok(line)
    }

    /// Starts the initial replicas.
    pub fn start_initial(&mut self) -> Result<Vec<String>> {
        let mut log = Vec::new();
        for _ in 0..self.spec.initial_replicas {
            log.push(self.start_one()?);
        }
        Ok(log)
    }

    /// One scaler tick; returns the log lines of what it did and why.
    /// One scaler step: observe the processes, follow the gateway's desired count, publish the
    /// endpoints, then end what was drained and forget what exited. Returns the log lines.
    pub fn tick(&mut self, stats: Option<&RevisionStats>) -> Result<Vec<String>> {
        let mut log = Vec::new();
        self.observe(&mut log)?;
        self.track_initial_scale(stats.and_then(|s| s.ready), &mut log);
        if let Some(desired) = stats.and_then(|s| s.desired) {
            self.follow(desired, stats, &mut log)?;
        }
        // Publish before terminating anything, so drained replicas are out of EDS first.
        if let Some(line) = self.publish()? {
            log.push(line);
        }
        self.end_drained(&mut log);
        self.forget_exited(&mut log);
        Ok(log)
    }

    /// Polls every replica: restarts one that exited unexpectedly, notes one that became ready,
    /// reads the metrics of those serving.
    fn observe(&mut self, log: &mut Vec<String>) -> Result<()> {
        let name = &self.spec.name;
        for r in &mut self.replicas {
            let was = r.phase;
            if r.poll() {
                log.push(format!(
                    "{name}: {} (pid {}) exited unexpectedly while {} → restarting it",
                    r.name,
                    r.pid(),
                    was.status()
                ));
                r.restart()?;
                log.push(format!(
                    "{name}: {} restarted (pid {}, restarts {})",
                    r.name,
                    r.pid(),
                    r.restarts
                ));
            } else if was == Phase::Starting && r.phase == Phase::Ready {
                log.push(format!(
                    "{name}: {} ready at {} after {:.1}s",
                    r.name,
                    r.addr.map(|a| a.to_string()).unwrap_or_default(),
                    r.started.elapsed().as_secs_f64()
                ));
            }
            if matches!(r.phase, Phase::Ready | Phase::Draining { .. }) {
                let _ = r.read_metrics();
            }
        }
        Ok(())
    }

    /// Ends the initial-scale hold once the initial replicas are ready here and the gateway has
    /// counted them for [`INITIAL_SCALE_SEEN`].
    fn track_initial_scale(&mut self, gateway_ready: Option<f64>, log: &mut Vec<String>) {
        if self.initial_scale_reached {
            return;
        }
        let initial = self.spec.initial_replicas;
        let seen = self.ready() >= initial as usize
            && gateway_ready.is_some_and(|g| g >= f64::from(initial));
        let since = match (seen, self.initial_seen_since) {
            (false, _) => {
                self.initial_seen_since = None;
                return;
            }
            (true, Some(since)) => since,
            (true, None) => *self.initial_seen_since.insert(Instant::now()),
        };
        if since.elapsed() >= INITIAL_SCALE_SEEN {
            self.initial_scale_reached = true;
            log.push(format!(
                "{}: initial scale reached ({initial} ready, counted by the gateway); its decision may go below it now",
                self.spec.name
            ));
        }
    }

    /// Follows the gateway's desired count (within min and max scale): starts replicas, or
    /// retires the newest (SIGTERM if not ready yet, else out of EDS and draining).
    fn follow(
        &mut self,
        desired: f64,
        stats: Option<&RevisionStats>,
        log: &mut Vec<String>,
    ) -> Result<()> {
        let name = self.spec.name.clone();
        let initial = (!self.initial_scale_reached).then_some(self.spec.initial_replicas);
        let target = scale_target(
            desired,
            self.spec.min_scale(),
            self.spec.max_scale(),
            initial,
        );
        let phases: Vec<Phase> = self.replicas.iter().map(|r| r.phase).collect();
        let p = plan(target, &phases);
        if target != self.target || p.start > 0 || !p.retire.is_empty() {
            let s = stats.cloned().unwrap_or_default();
            let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            let action = if p.start > 0 {
                format!("start {}", p.start)
            } else if !p.retire.is_empty() {
                format!("drain {}", p.retire.len())
            } else {
                "nothing to do".into()
            };
            log.push(format!(
                "{name}: scale {} → {target} (gateway desired {desired}, min {}, max {}{}; ready {} [gateway {}], starting {}, in-flight {}, queued {}, capacity {}, stable avg {}, panic avg {}) → {action}",
                self.target,
                self.spec.min_scale(),
                self.spec.max_scale(),
                initial.map_or(String::new(), |i| format!(", initial {i} until ready once")),
                self.ready(),
                fmt(s.ready),
                self.count(|p| p == Phase::Starting),
                s.active,
                s.queued,
                s.capacity,
                fmt(s.stable_concurrency),
                fmt(s.panic_concurrency),
            ));
            self.target = target;
        }
        for _ in 0..p.start {
            log.push(self.start_one()?);
        }
        for i in p.retire {
            let Some(r) = self.replicas.get_mut(i) else {
                continue;
            };
            if r.phase == Phase::Starting {
                log.push(format!(
                    "{name}: {} not ready yet, not needed → SIGTERM",
                    r.name
                ));
                r.terminate();
            } else {
                log.push(format!(
                    "{name}: {} leaves EDS, draining (in-flight {})",
                    r.name, r.in_flight
                ));
                r.drain();
            }
        }
        Ok(())
    }

    /// Drained replicas: SIGTERM once idle (or the drain timeout passed); SIGKILL one that
    /// ignored SIGTERM.
    fn end_drained(&mut self, log: &mut Vec<String>) {
        let name = &self.spec.name;
        for r in &mut self.replicas {
            match r.phase {
                Phase::Draining { since } => {
                    let waited = since.elapsed();
                    let idle = r.in_flight <= 0.0 && waited >= EDS_GRACE;
                    if idle || waited >= self.drain_timeout {
                        log.push(format!(
                            "{name}: {} drained (in-flight {} after {:.1}s{}) → SIGTERM",
                            r.name,
                            r.in_flight,
                            waited.as_secs_f64(),
                            if idle { "" } else { ", drain timeout" }
                        ));
                        r.terminate();
                    }
                }
                Phase::Terminating { since } if since.elapsed() > TERMINATE_GRACE => {
                    log.push(format!("{name}: {} ignored SIGTERM → SIGKILL", r.name));
                    r.stop(Duration::ZERO);
                }
                _ => {}
            }
        }
    }

    /// Forgets replicas that have exited after being retired (kept in `gone` for the summary).
    fn forget_exited(&mut self, log: &mut Vec<String>) {
        let (gone, kept): (Vec<Replica>, Vec<Replica>) = std::mem::take(&mut self.replicas)
            .into_iter()
            .partition(|r| r.phase == Phase::Exited);
        for r in &gone {
            log.push(format!(
                "{}: {} (pid {}) exited",
                self.spec.name,
                r.name,
                r.pid()
            ));
        }
        self.gone.extend(gone);
        self.replicas = kept;
    }

    /// Stops every replica: out of EDS, SIGTERM to all, then wait for each.
    pub fn shutdown(&mut self) {
        for r in &mut self.replicas {
            r.drain();
        }
        let _ = self.publish();
        for r in &mut self.replicas {
            r.terminate();
        }
        for r in &mut self.replicas {
            r.stop(Duration::from_secs(10));
        }
        self.gone.append(&mut self.replicas);
    }

    /// Every pid this pool ever started.
    pub fn pids(&self) -> Vec<u32> {
        self.replicas
            .iter()
            .chain(&self.gone)
            .flat_map(|r| r.pids.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn plans() {
        let now = Instant::now();
        let (s, r, d) = (
            Phase::Starting,
            Phase::Ready,
            Phase::Draining { since: now },
        );
        let cases: [(&str, u32, Vec<Phase>, Plan); 7] = [
            ("steady", 2, vec![r, r], Plan::default()),
            (
                "scale up counts starting replicas",
                5,
                vec![r, s],
                Plan {
                    start: 3,
                    retire: vec![],
                },
            ),
            (
                "draining replicas do not count",
                2,
                vec![r, d],
                Plan {
                    start: 1,
                    retire: vec![],
                },
            ),
            (
                "scale down retires starting first, then newest ready",
                1,
                vec![r, r, s, r],
                Plan {
                    start: 0,
                    retire: vec![2, 3, 1],
                },
            ),
            (
                "to zero",
                0,
                vec![r],
                Plan {
                    start: 0,
                    retire: vec![0],
                },
            ),
            (
                "from zero",
                1,
                vec![],
                Plan {
                    start: 1,
                    retire: vec![],
                },
            ),
            (
                "exited replicas ignored",
                1,
                vec![Phase::Exited, r],
                Plan::default(),
            ),
        ];
        for (name, target, phases, want) in cases {
            assert_eq!(plan(target, &phases), want, "{name}");
        }
    }

    #[test]
    fn scale_targets() {
        // (case, desired, min, max, initial not yet reached) → target
        let cases = [
            ("follows the gateway", 3.0, 0, 5, None, 3),
            ("down to zero with minScale 0", 0.0, 0, 5, None, 0),
            (
                "a starting revision is not taken to zero",
                0.0,
                0,
                5,
                Some(1),
                1,
            ),
            ("initial scale is a floor, not a cap", 4.0, 0, 5, Some(2), 4),
            (
                "initial scale above the gateway's count",
                1.0,
                0,
                5,
                Some(3),
                3,
            ),
            ("min scale still applies", 0.0, 2, 5, Some(1), 2),
            ("no initial replicas: nothing held", 0.0, 0, 5, Some(0), 0),
        ];
        for (name, desired, min, max, initial, want) in cases {
            assert_eq!(scale_target(desired, min, max, initial), want, "{name}");
        }
    }

    #[test]
    fn clamps() {
        let cases = [
            ("within", 5.0, 1, 10, 5),
            ("below min", 0.0, 1, 10, 1),
            ("above max", 50.0, 1, 10, 10),
            ("unbounded max", 50.0, 0, 0, 50),
            ("fractional rounds up", 2.2, 0, 0, 3),
            ("NaN is zero", f64::NAN, 0, 0, 0),
            ("negative is zero", -3.0, 0, 0, 0),
        ];
        for (name, d, min, max, want) in cases {
            assert_eq!(clamp(d, min, max), want, "{name}");
        }
    }
}
