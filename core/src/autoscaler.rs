//! The gateway's autoscaler for one revision: the demand integral sampled into stable/panic
//! windows, and the KPA decider run on their averages.
//!
//! All workers feed one [`Autoscaler`] kept in shared data (CAS), so the decision sees the
//! demand of the whole gateway, not of one worker. Sampling happens at every tick of every
//! worker (the window keeps one sample per bucket); deciding happens once per decision period,
//! like Knative's autoscaler tick, so the per-decision scale rates mean what Knative means —
//! except on a revision with no ready replicas and no desired ones, where the first demand
//! decides at once (scale from zero without waiting for a period).

use crate::kpa::{Decider, DeciderState, Decision, KpaConfig};
use crate::window::Window;
use thiserror::Error;

/// Knative decides every 2 s; we decide every second (the gauge is read by scalers that poll).
pub const DEFAULT_DECISION_PERIOD_MS: u64 = 1_000;

const VERSION: u8 = 1;

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
}

#[derive(Debug, Clone, PartialEq)]
pub struct Autoscaler {
    window: Window,
    decider: DeciderState,
    last_decision_ms: Option<u64>,
    signal: Signal,
}

/// Bucket width: 1 s as in Knative, finer for short (test) windows so a window has ≥ 10 buckets.
fn granularity_ms(stable_window_ms: u64) -> u64 {
    (stable_window_ms / 10).clamp(1, 1_000)
}

impl Autoscaler {
    pub fn new(cfg: &KpaConfig) -> Autoscaler {
        let window = Window::new(cfg.stable_window_ms, granularity_ms(cfg.stable_window_ms))
            .unwrap_or_default();
        Autoscaler {
            window,
            decider: DeciderState::default(),
            last_decision_ms: None,
            signal: Signal::default(),
        }
    }

    /// The last decision's output.
    pub fn signal(&self) -> Signal {
        self.signal
    }

    /// Samples the demand integral at `now_ms` and decides when a decision is due. Returns the
    /// decision when one was made.
    pub fn step(
        &mut self,
        cfg: &KpaConfig,
        now_ms: u64,
        demand_ms: u64,
        demand_level: u32,
        ready: u32,
        decision_period_ms: u64,
    ) -> Option<Decision> {
        if self.window.stable_window_ms() != cfg.stable_window_ms {
            // The configuration changed the window: start a new one.
            *self = Autoscaler::new(cfg);
        }
        self.window.record(now_ms, demand_ms);
        let due = match self.last_decision_ms {
            None => true,
            Some(last) => now_ms.saturating_sub(last) >= decision_period_ms,
        };
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
        let mut decider = Decider::new(cfg.clone()).ok()?;
        decider.restore(self.decider);
        let decision = decider.decide(now_ms, stable, panic, ready);
        self.decider = *decider.state();
        self.last_decision_ms = Some(now_ms);
        self.signal = Signal {
            desired: decision.desired,
            stable_concurrency: stable,
            panic_concurrency: panic,
            panic: decision.panic,
        };
        Some(decision)
    }

    pub fn encode(&self) -> Vec<u8> {
        let window = self.window.encode();
        let decider = self.decider.encode();
        let mut out = Vec::with_capacity(1 + 8 * 4 + 5 + 4 + window.len() + decider.len());
        out.push(VERSION);
        out.extend_from_slice(&self.last_decision_ms.map_or(u64::MAX, |v| v).to_le_bytes());
        out.extend_from_slice(&self.signal.desired.to_le_bytes());
        out.extend_from_slice(&self.signal.stable_concurrency.to_le_bytes());
        out.extend_from_slice(&self.signal.panic_concurrency.to_le_bytes());
        out.push(u8::from(self.signal.panic));
        out.extend_from_slice(&u32::try_from(window.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&window);
        out.extend_from_slice(&u32::try_from(decider.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&decider);
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
        let desired = u32_of(take(4)?)?;
        let stable = f64::from_bits(u64_of(take(8)?)?);
        let panic_avg = f64::from_bits(u64_of(take(8)?)?);
        let panic = take(1)?.first().copied().unwrap_or(0) != 0;
        let wlen = u32_of(take(4)?)? as usize;
        let window = Window::decode(take(wlen)?).map_err(|e| err(&e.to_string()))?;
        let dlen = u32_of(take(4)?)? as usize;
        let decider = DeciderState::decode(take(dlen)?).map_err(|e| err(&e.to_string()))?;
        if at != bytes.len() {
            return Err(err("trailing bytes"));
        }
        Ok(Autoscaler {
            window,
            decider,
            last_decision_ms: (last != u64::MAX).then_some(last),
            signal: Signal {
                desired,
                stable_concurrency: stable,
                panic_concurrency: panic_avg,
                panic,
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
            a.step(
                c,
                t,
                level * t,
                level as u32,
                ready,
                DEFAULT_DECISION_PERIOD_MS,
            );
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
        assert!(
            a.step(&c, 0, 0, 0, 1, 1_000).is_some(),
            "first step decides"
        );
        assert!(a.step(&c, 500, 0, 0, 1, 1_000).is_none());
        assert!(a.step(&c, 1_000, 0, 0, 1, 1_000).is_some());
    }

    #[test]
    fn cold_start_decides_at_once() {
        let c = KpaConfig {
            min_scale: 0,
            ..cfg(10.0, 100.0)
        };
        let mut a = Autoscaler::new(&c);
        a.step(&c, 0, 0, 0, 0, 1_000);
        assert_eq!(a.signal().desired, 0);
        // 100 ms later one request waits on a revision with no replicas: ask for one now.
        let d = a
            .step(&c, 100, 0, 1, 0, 1_000)
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

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = Autoscaler::decode(&bytes);
        }
    }
}
