//! The gateway's autoscaler for one revision: the demand integral sampled into stable/panic
//! windows, and the KPA decider run on their averages.
//!
//! All workers feed one [`Autoscaler`] kept in shared data (CAS), so the decision sees the
//! demand of the whole gateway, not of one worker. Sampling happens at every tick of every
//! worker (the window keeps one sample per bucket); deciding happens once per decision period,
//! like Knative's autoscaler tick, so the per-decision scale rates mean what Knative means —
//! except on a revision with no ready replicas and no desired ones, where the first demand
//! decides at once (scale from zero without waiting for a period).
//!
//! It also keeps what the queue-aware panic needs (see [`crate::kpa`]): a short window over the
//! last `queueAwareHorizon` and since when requests have waited at capacity without a break.
//! When that has lasted a whole horizon, one decision is made at once with the short average —
//! once per stretch of waiting; the decisions after it are Knative's, at the usual period.

use crate::kpa::{Decider, DeciderState, Decision, KpaConfig, Reason};
use crate::window::Window;
use thiserror::Error;

/// Knative decides every 2 s; we decide every second (the gauge is read by scalers that poll).
pub const DEFAULT_DECISION_PERIOD_MS: u64 = 1_000;

/// 2: the short window and the saturation start (queue-aware panic) were added.
const VERSION: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("autoscaler state is unreadable: {0}")]
pub struct AutoscalerDecodeError(pub String);

/// What the gauges show after a step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Signal {
    pub desired: u32,
    /// Average concurrency (in-flight + queued) over the stable and panic windows.
    pub stable_concurrency: f64,
    pub panic_concurrency: f64,
    pub panic: bool,
    /// The last decision was raised by the queue-aware panic.
    pub queue_aware: bool,
}

/// What a worker sees of a revision at a tick: the input of [`Autoscaler::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observation {
    pub now_ms: u64,
    /// The demand integral, ∫(in flight + queued) dt in request-milliseconds.
    pub demand_ms: u64,
    /// Requests holding a slot now.
    pub active: u32,
    /// Requests waiting now.
    pub queued: u32,
    /// Requests allowed in flight (cc × ready); `None` is unlimited.
    pub capacity: Option<u32>,
    /// Ready replicas.
    pub ready: u32,
}

impl Observation {
    /// In flight + queued now.
    pub fn demand_level(&self) -> u32 {
        self.active.saturating_add(self.queued)
    }

    /// Requests wait because the revision is at capacity (never with unlimited capacity).
    pub fn saturated(&self) -> bool {
        self.queued > 0 && self.capacity.is_some_and(|c| self.active >= c)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Autoscaler {
    window: Window,
    /// The demand integral over the last `queueAwareHorizon` (queue-aware panic).
    short: Window,
    /// Since when every step saw requests waiting at capacity; `None` when the last did not.
    saturated_since_ms: Option<u64>,
    decider: DeciderState,
    last_decision_ms: Option<u64>,
    signal: Signal,
}

/// Bucket width: 1 s as in Knative, finer for short (test) windows so a window has ≥ 10 buckets.
fn granularity_ms(stable_window_ms: u64) -> u64 {
    (stable_window_ms / 10).clamp(1, 1_000)
}

/// A window of `length_ms` at [`granularity_ms`] (Knative's default window if the length is 0,
/// which a validated config never has).
fn window_for(length_ms: u64) -> Window {
    Window::new(length_ms, granularity_ms(length_ms)).unwrap_or_default()
}

/// The window has the shape `window_for(length_ms)` would give (compared by shape, because a
/// length that is not a whole number of buckets is rounded up to one).
fn shaped_for(window: &Window, length_ms: u64) -> bool {
    let want = window_for(length_ms);
    (window.granularity_ms(), window.stable_window_ms())
        == (want.granularity_ms(), want.stable_window_ms())
}

impl Autoscaler {
    pub fn new(cfg: &KpaConfig) -> Autoscaler {
        Autoscaler {
            window: window_for(cfg.stable_window_ms),
            short: window_for(cfg.queue_aware_horizon_ms),
            saturated_since_ms: None,
            decider: DeciderState::default(),
            last_decision_ms: None,
            signal: Signal::default(),
        }
    }

    /// The last decision's output.
    pub fn signal(&self) -> Signal {
        self.signal
    }

    /// Samples the demand integral at `obs.now_ms` and decides when a decision is due. Returns
    /// the decision when one was made.
    pub fn step(
        &mut self,
        cfg: &KpaConfig,
        obs: &Observation,
        decision_period_ms: u64,
    ) -> Option<Decision> {
        if !shaped_for(&self.window, cfg.stable_window_ms)
            || !shaped_for(&self.short, cfg.queue_aware_horizon_ms)
        {
            // The configuration changed a window: start new ones.
            *self = Autoscaler::new(cfg);
        }
        let now_ms = obs.now_ms;
        self.window.record(now_ms, obs.demand_ms);
        self.short.record(now_ms, obs.demand_ms);
        self.saturated_since_ms = if obs.saturated() {
            Some(self.saturated_since_ms.unwrap_or(now_ms))
        } else {
            None
        };
        let demand_level = obs.demand_level();
        let ready = obs.ready;
        // Requests have waited at capacity for a whole horizon: the short average is demand.
        // The rule acts once per stretch of waiting, at the first decision after the horizon
        // (made at once): an open-loop overload grows the backlog every second, and reading that
        // backlog as concurrency again and again would run ahead of replicas that are still
        // starting. After that first step Knative's windows, which now see the same demand, go on.
        let queue_aware = self
            .saturated_since_ms
            .filter(|_| cfg.queue_aware_panic)
            .map(|since| since.saturating_add(cfg.queue_aware_horizon_ms))
            .is_some_and(|from| {
                now_ms >= from && self.last_decision_ms.is_none_or(|last| last < from)
            });
        let due = queue_aware
            || self
                .last_decision_ms
                .is_none_or(|last| now_ms.saturating_sub(last) >= decision_period_ms);
        let cold_start = ready == 0 && self.signal.desired == 0 && demand_level > 0;
        if !due && !cold_start {
            return None;
        }
        let mut stable = self.window.average(now_ms, cfg.stable_window_ms);
        let mut panic = self.window.average(now_ms, cfg.panic_window_ms());
        if cold_start {
            // The window may not hold two samples yet; what is waiting now is demand.
            stable = stable.max(f64::from(demand_level));
            panic = panic.max(f64::from(demand_level));
        }
        // The span is the horizon less one bucket, so that (the window being bucket-aligned) it
        // does not reach back before the requests started waiting: demand from before the step
        // would dilute the average.
        let span_ms = cfg
            .queue_aware_horizon_ms
            .saturating_sub(self.short.granularity_ms())
            .max(1);
        let queued = queue_aware.then(|| self.short.average(now_ms, span_ms));
        let mut decider = Decider::new(cfg.clone()).ok()?;
        decider.restore(self.decider);
        let decision = decider.decide_queue_aware(now_ms, stable, panic, queued, ready);
        self.decider = *decider.state();
        self.last_decision_ms = Some(now_ms);
        self.signal = Signal {
            desired: decision.desired,
            stable_concurrency: stable,
            panic_concurrency: panic,
            panic: decision.panic,
            queue_aware: decision.reason == Reason::QueueAwarePanic,
        };
        Some(decision)
    }

    pub fn encode(&self) -> Vec<u8> {
        let window = self.window.encode();
        let short = self.short.encode();
        let decider = self.decider.encode();
        let mut out =
            Vec::with_capacity(1 + 8 * 5 + 6 + 4 * 3 + window.len() + short.len() + decider.len());
        out.push(VERSION);
        out.extend_from_slice(&self.last_decision_ms.map_or(u64::MAX, |v| v).to_le_bytes());
        out.extend_from_slice(
            &self
                .saturated_since_ms
                .map_or(u64::MAX, |v| v)
                .to_le_bytes(),
        );
        out.extend_from_slice(&self.signal.desired.to_le_bytes());
        out.extend_from_slice(&self.signal.stable_concurrency.to_le_bytes());
        out.extend_from_slice(&self.signal.panic_concurrency.to_le_bytes());
        out.push(u8::from(self.signal.panic));
        out.push(u8::from(self.signal.queue_aware));
        for part in [&window, &short, &decider] {
            out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(0).to_le_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Autoscaler, AutoscalerDecodeError> {
        let err = |what: &str| AutoscalerDecodeError(what.to_string());
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], AutoscalerDecodeError> {
            let end = at.checked_add(n).ok_or_else(|| err("length overflow"))?;
            let s = bytes.get(at..end).ok_or_else(|| err("truncated"))?;
            at = end;
            Ok(s)
        };
        let version = take(1)?.first().copied().unwrap_or(0);
        if version != VERSION {
            return Err(err("unknown version"));
        }
        let u64_of = |b: &[u8]| {
            b.try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| err("truncated"))
        };
        let u32_of = |b: &[u8]| {
            b.try_into()
                .map(u32::from_le_bytes)
                .map_err(|_| err("truncated"))
        };
        let last = u64_of(take(8)?)?;
        let saturated_since = u64_of(take(8)?)?;
        let desired = u32_of(take(4)?)?;
        let stable = f64::from_bits(u64_of(take(8)?)?);
        let panic_avg = f64::from_bits(u64_of(take(8)?)?);
        let panic = take(1)?.first().copied().unwrap_or(0) != 0;
        let queue_aware = take(1)?.first().copied().unwrap_or(0) != 0;
        let wlen = u32_of(take(4)?)? as usize;
        let window = Window::decode(take(wlen)?).map_err(|e| err(&e.to_string()))?;
        let slen = u32_of(take(4)?)? as usize;
        let short = Window::decode(take(slen)?).map_err(|e| err(&e.to_string()))?;
        let dlen = u32_of(take(4)?)? as usize;
        let decider = DeciderState::decode(take(dlen)?).map_err(|e| err(&e.to_string()))?;
        if at != bytes.len() {
            return Err(err("trailing bytes"));
        }
        Ok(Autoscaler {
            window,
            short,
            saturated_since_ms: (saturated_since != u64::MAX).then_some(saturated_since),
            decider,
            last_decision_ms: (last != u64::MAX).then_some(last),
            signal: Signal {
                desired,
                stable_concurrency: stable,
                panic_concurrency: panic_avg,
                panic,
                queue_aware,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(target: f64, util: f64) -> KpaConfig {
        KpaConfig {
            target,
            container_concurrency: 10,
            target_utilization_percentage: util,
            ..KpaConfig::default()
        }
    }

    fn obs(
        now_ms: u64,
        demand_ms: u64,
        active: u32,
        queued: u32,
        capacity: Option<u32>,
        ready: u32,
    ) -> Observation {
        Observation {
            now_ms,
            demand_ms,
            active,
            queued,
            capacity,
            ready,
        }
    }

    /// Steady demand of `level` from t=0, sampled every 100 ms like worker ticks.
    fn run_steady(
        a: &mut Autoscaler,
        c: &KpaConfig,
        level: u64,
        until_ms: u64,
        ready: u32,
    ) -> Signal {
        let mut t = 0;
        while t <= until_ms {
            // All in flight, nothing waits (unlimited capacity): Knative's rules only.
            let o = obs(t, level * t, level as u32, 0, None, ready);
            a.step(c, &o, DEFAULT_DECISION_PERIOD_MS);
            t += 100;
        }
        a.signal()
    }

    #[test]
    fn knative_page_fifty_clients_target_ten() {
        let cases: &[(&str, f64, u32)] =
            &[("utilization 100%", 100.0, 5), ("utilization 70%", 70.0, 8)];
        for (name, util, want) in cases {
            let c = cfg(10.0, *util);
            let mut a = Autoscaler::new(&c);
            let s = run_steady(&mut a, &c, 50, 10_000, 1);
            assert_eq!(s.desired, *want, "case {name}");
            assert!((s.stable_concurrency - 50.0).abs() < 0.01, "{s:?}");
            assert!((s.panic_concurrency - 50.0).abs() < 0.01);
        }
    }

    #[test]
    fn decides_once_per_period() {
        let c = cfg(10.0, 100.0);
        let mut a = Autoscaler::new(&c);
        let idle = |t| obs(t, 0, 0, 0, Some(10), 1);
        assert!(a.step(&c, &idle(0), 1_000).is_some(), "first step decides");
        assert!(a.step(&c, &idle(500), 1_000).is_none());
        assert!(a.step(&c, &idle(1_000), 1_000).is_some());
    }

    #[test]
    fn cold_start_decides_at_once() {
        let c = KpaConfig {
            min_scale: 0,
            ..cfg(10.0, 100.0)
        };
        let mut a = Autoscaler::new(&c);
        a.step(&c, &obs(0, 0, 0, 0, Some(0), 0), 1_000);
        assert_eq!(a.signal().desired, 0);
        // 100 ms later one request waits on a revision with no replicas: ask for one now.
        let d = a
            .step(&c, &obs(100, 0, 0, 1, Some(0), 0), 1_000)
            .expect("decides without waiting a period");
        assert!(d.desired >= 1, "{d}");
    }

    #[test]
    fn round_trips_and_rejects_garbage() {
        let c = cfg(10.0, 100.0);
        let mut a = Autoscaler::new(&c);
        run_steady(&mut a, &c, 20, 3_000, 1);
        let back = Autoscaler::decode(&a.encode()).unwrap();
        assert_eq!(back, a);
        assert!(Autoscaler::decode(&[]).is_err());
        let b = a.encode();
        assert!(Autoscaler::decode(&b[..b.len() - 1]).is_err());
    }

    /// Ten idle seconds on one ready replica (capacity 10), a step every 100 ms.
    fn idle_for_10s(a: &mut Autoscaler, c: &KpaConfig) {
        for t in (0..10_000).step_by(100) {
            a.step(c, &obs(t, 0, 0, 0, Some(10), 1), 1_000);
        }
    }

    #[test]
    fn a_saturated_stretch_decides_once_at_the_horizon() {
        let c = cfg(10.0, 100.0);
        let mut a = Autoscaler::new(&c);
        // Idle, then from t = 10 s 50 requests on 1 ready (10 in flight, 40 waiting).
        idle_for_10s(&mut a, &c);
        let saturated = |t: u64| obs(t, 50 * (t - 10_000), 10, 40, Some(10), 1);
        // The regular decision at 10 s sees nothing yet; 10.9 s is not due and not a horizon.
        assert!(a.step(&c, &saturated(10_000), 1_000).is_some());
        assert!(a.step(&c, &saturated(10_900), 1_000).is_none());
        // At 11.0 s both a period and the horizon: the rule acts (5 at once).
        let d = a.step(&c, &saturated(11_000), 1_000).unwrap();
        assert_eq!((d.desired, d.reason), (5, Reason::QueueAwarePanic), "{d}");
        assert!(a.signal().queue_aware);
        // Off-period steps in the same stretch do not decide again; the next regular decision
        // of the same stretch is Knative's alone (the rule acts once per stretch).
        assert!(a.step(&c, &saturated(11_500), 1_000).is_none());
        let d = a.step(&c, &saturated(12_000), 1_000).unwrap();
        assert_eq!((d.desired, d.queue_desired), (5, None), "{d}");
        assert!(!a.signal().queue_aware);
        // A break in the saturation starts a new stretch: the rule may act again a horizon
        // later (12.7 s), at once, off-period.
        assert!(a
            .step(&c, &obs(12_600, 50 * 2_600, 10, 0, Some(10), 1), 1_000)
            .is_none());
        assert!(a.step(&c, &saturated(12_700), 1_000).is_none());
        let d = a.step(&c, &saturated(13_000), 1_000).unwrap();
        assert_eq!(
            d.queue_desired, None,
            "a regular decision, before the horizon: {d}"
        );
        assert!(a.step(&c, &saturated(13_600), 1_000).is_none());
        let d = a.step(&c, &saturated(13_700), 1_000).unwrap();
        assert_eq!(d.queue_desired, Some(5), "{d}");
    }

    #[test]
    fn the_short_average_does_not_reach_back_before_the_waiting() {
        // 41 requests from t = 10 s on 1 ready: 41 / 10 -> 5. Idle time before the step in the
        // average (1.1 s span) would read 37 -> 4.
        let c = cfg(10.0, 100.0);
        let mut a = Autoscaler::new(&c);
        idle_for_10s(&mut a, &c);
        let mut last = None;
        for t in (10_000..=11_000).step_by(100) {
            last = a.step(&c, &obs(t, 41 * (t - 10_000), 10, 31, Some(10), 1), 1_000);
        }
        let d = last.unwrap();
        assert_eq!((d.queue_desired, d.desired), (Some(5), 5), "{d}");
    }

    #[test]
    fn a_window_that_is_not_whole_buckets_is_kept_between_steps() {
        // 60.5 s rounds up to 61 buckets of 1 s; the state must not restart at every step.
        let c = KpaConfig {
            stable_window_ms: 60_500,
            ..cfg(10.0, 100.0)
        };
        let mut a = Autoscaler::new(&c);
        a.step(&c, &obs(0, 0, 20, 0, None, 1), 1_000);
        a.step(&c, &obs(2_000, 40_000, 20, 0, None, 1), 1_000);
        assert!(
            (a.signal().stable_concurrency - 20.0).abs() < 1e-9,
            "{:?}",
            a.signal()
        );
    }

    /// A deterministic generator for the simulations (SplitMix64): same numbers everywhere.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Exponential with the given mean: Poisson inter-arrival times.
        fn exponential(&mut self, mean: f64) -> f64 {
            let uniform = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            -mean * (1.0 - uniform).ln()
        }
    }

    /// How requests arrive in a simulation.
    #[derive(Clone, Copy)]
    enum Load {
        /// `clients` closed loops from `from_ms` on: each starts a new request as its last ends.
        Step { from_ms: u64, clients: u32 },
        /// Poisson arrivals at `per_s` while on, switching on/off every `period_ms`, from
        /// `from_ms` until `until_ms`.
        Bursts {
            per_s: f64,
            period_ms: u64,
            from_ms: u64,
            until_ms: u64,
        },
    }

    const CC: u32 = 10;
    const SERVICE_MS: u64 = 100;
    const TICK_MS: u64 = 100;
    /// A replica is ready this long after the scaler starts it (the predictor: ≈ 1 s).
    const START_MS: u64 = 1_000;

    /// What a simulated run did.
    #[derive(Debug, Default)]
    struct Run {
        /// Every decision: time, desired, reason.
        decisions: Vec<(u64, u32, Reason)>,
        /// Replicas added by all scale-ups / removed by all scale-downs (sums of the steps).
        scaled_up: u32,
        scaled_down: u32,
        peak: u32,
        /// Decisions that lowered the count, and how many of them equal Knative's from the same
        /// state and inputs.
        scale_downs: u32,
        scale_downs_as_knative: u32,
        /// Decisions below Knative's from the same state and inputs (must stay 0).
        below_knative: u32,
    }

    impl Run {
        fn first_at(&self, desired: u32, from_ms: u64) -> Option<u64> {
            self.decisions
                .iter()
                .find(|(t, d, _)| *t >= from_ms && *d >= desired)
                .map(|(t, _, _)| t - from_ms)
        }
    }

    /// One revision (cc 10, target 10 at 100 %, fixed 100 ms service) behind the gateway's
    /// admission (FIFO, capacity cc × ready), its autoscaler stepped at every 100 ms tick, and a
    /// scaler that follows the desired count (new replicas ready after 1 s, removed ones at
    /// once). Every decision is also made by a copy running Knative's rule alone from the same
    /// state and inputs, to compare.
    fn simulate(c: &KpaConfig, load: Load, end_ms: u64, seed: u64) -> Run {
        let knative_cfg = KpaConfig {
            queue_aware_panic: false,
            ..c.clone()
        };
        let mut rng = Rng(seed);
        let mut a = Autoscaler::new(c);
        let mut run = Run::default();
        let (mut ready, mut starting) = (1u32, Vec::<u64>::new());
        let mut in_flight = std::collections::VecDeque::<u64>::new(); // completion times
        let (mut queued, mut demand_ms) = (0u32, 0u64);
        let mut next_arrival = 0.0f64;
        let mut desired = 1u32;
        for t in 0..end_ms {
            starting.retain(|at| {
                let done = *at <= t;
                ready += u32::from(done);
                !done
            });
            let mut completed = 0;
            while in_flight.front().is_some_and(|end| *end <= t) {
                in_flight.pop_front();
                completed += 1;
            }
            match load {
                Load::Step { from_ms, clients } if t >= from_ms => {
                    let open = in_flight.len() as u32 + queued;
                    queued += clients.saturating_sub(open);
                    let _ = completed;
                }
                Load::Bursts {
                    per_s,
                    period_ms,
                    from_ms,
                    until_ms,
                } => {
                    let on =
                        (from_ms..until_ms).contains(&t) && ((t - from_ms) / period_ms) % 2 == 0;
                    if !on {
                        next_arrival = next_arrival.max((t + 1) as f64);
                    }
                    while on && next_arrival < (t + 1) as f64 {
                        queued += 1;
                        next_arrival += rng.exponential(1_000.0 / per_s);
                    }
                }
                Load::Step { .. } => {}
            }
            while queued > 0 && (in_flight.len() as u32) < CC * ready {
                queued -= 1;
                in_flight.push_back(t + SERVICE_MS);
            }
            demand_ms += u64::from(in_flight.len() as u32 + queued);
            if t % TICK_MS != 0 {
                continue;
            }
            let o = Observation {
                now_ms: t,
                demand_ms,
                active: in_flight.len() as u32,
                queued,
                capacity: Some(CC * ready),
                ready,
            };
            let mut knative = a.clone();
            let (Some(d), k) = (
                a.step(c, &o, DEFAULT_DECISION_PERIOD_MS),
                knative.step(&knative_cfg, &o, DEFAULT_DECISION_PERIOD_MS),
            ) else {
                continue;
            };
            if let Some(k) = k {
                run.below_knative += u32::from(d.desired < k.desired);
                if d.desired < desired {
                    run.scale_downs += 1;
                    run.scale_downs_as_knative += u32::from(d.desired == k.desired);
                }
            }
            run.decisions.push((t, d.desired, d.reason));
            run.scaled_up += d.desired.saturating_sub(desired);
            run.scaled_down += desired.saturating_sub(d.desired);
            run.peak = run.peak.max(d.desired);
            desired = d.desired;
            // The scaler: start what is missing, remove starting replicas first.
            let live = ready + starting.len() as u32;
            for _ in live..desired {
                starting.push(t + START_MS);
            }
            for _ in desired..live {
                if starting.pop().is_none() {
                    ready -= 1;
                }
            }
        }
        run
    }

    fn knative_and_rule() -> (KpaConfig, KpaConfig) {
        let rule = KpaConfig {
            min_scale: 1,
            ..cfg(10.0, 100.0)
        };
        let knative = KpaConfig {
            queue_aware_panic: false,
            ..rule.clone()
        };
        (knative, rule)
    }

    #[test]
    fn load_step_reaches_five_within_two_seconds_with_the_rule() {
        // The demo's step: 0 -> 50 closed-loop clients at 10 s on 1 ready replica.
        let (knative, rule) = knative_and_rule();
        let load = Load::Step {
            from_ms: 10_000,
            clients: 50,
        };
        let k = simulate(&knative, load, 30_000, 1);
        let r = simulate(&rule, load, 30_000, 1);
        let (tk, tr) = (k.first_at(5, 10_000), r.first_at(5, 10_000));
        eprintln!("load step 0 -> 50: desired 5 after {tk:?} ms (Knative), {tr:?} ms (rule)");
        assert!(tr.is_some_and(|t| t <= 2_000), "rule: {tr:?}");
        assert!(
            tk.is_some_and(|t| t >= 4_000),
            "Knative waits for the window: {tk:?}"
        );
        // No overshoot, and after the step both stay at 5.
        assert_eq!((r.peak, k.peak), (5, 5));
        assert_eq!(r.decisions.last().map(|d| d.1), Some(5));
        assert_eq!((r.scale_downs, r.below_knative), (0, 0));
    }

    #[test]
    fn bursty_load_scales_up_at_most_one_replica_more_than_knative_and_down_as_knative() {
        // After 70 s idle (full windows, as in the demo): on/off every 2 s for 40 s, Poisson
        // arrivals at 2x the capacity of the one replica (cc 10 / 100 ms = 100/s, so 200/s),
        // then 120 s of quiet for the scale-down.
        let (knative, rule) = knative_and_rule();
        let load = Load::Bursts {
            per_s: 200.0,
            period_ms: 2_000,
            from_ms: 70_000,
            until_ms: 110_000,
        };
        for seed in 1..=8 {
            let k = simulate(&knative, load, 230_000, seed);
            let r = simulate(&rule, load, 230_000, seed);
            let fired = r
                .decisions
                .iter()
                .filter(|d| d.2 == Reason::QueueAwarePanic)
                .count();
            eprintln!(
                "seed {seed}: scaled up by {} (Knative {}), peak {} (Knative {}), down by {} \
                 (Knative {}), rule fired {fired} times, {}/{} scale-downs equal Knative's",
                r.scaled_up,
                k.scaled_up,
                r.peak,
                k.peak,
                r.scaled_down,
                k.scaled_down,
                r.scale_downs_as_knative,
                r.scale_downs
            );
            let trace = |run: &Run| {
                let mut steps = Vec::new();
                for w in run.decisions.windows(2) {
                    if w[1].1 != w[0].1 {
                        steps.push(format!("{}ms:{}({:?})", w[1].0, w[1].1, w[1].2));
                    }
                }
                steps.join(" ")
            };
            assert!(
                r.scaled_up <= k.scaled_up + 1,
                "seed {seed}: rule {} vs Knative {}",
                trace(&r),
                trace(&k)
            );
            assert_eq!(r.below_knative, 0, "seed {seed}");
            assert_eq!(r.scale_downs, r.scale_downs_as_knative, "seed {seed}");
            // Every run ends back at minScale.
            assert_eq!(r.decisions.last().map(|d| d.1), Some(1), "seed {seed}");
            assert_eq!(k.decisions.last().map(|d| d.1), Some(1), "seed {seed}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = Autoscaler::decode(&bytes);
        }
    }
}
