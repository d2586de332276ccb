//! The KPA decider: Knative's Pod Autoscaler algorithm, turning average concurrency into a
//! desired replica count.
//!
//! The gateway filter runs it on its own stable/panic window averages (see [`crate::window`])
//! and publishes the result as `inflight_desired_replicas`; the CLI's local scaler runs the same
//! code on scraped stats. It follows Knative Serving's `pkg/autoscaler/scaling/autoscaler.go`
//! (stable and panic modes, scale-up/down rate limits relative to ready replicas, no scale-down
//! while panicking) plus the parts Knative applies in its KPA reconciler (min/max scale,
//! activation scale, initial scale, scale-to-zero grace period), so one call gives the number an
//! autoscaler should apply. Time is an argument and the state is a small value that encodes to
//! bytes, because the filter keeps it in Envoy shared data shared by all worker VMs.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::window::{kind, DecodeError, Decoder, Encoder};

/// Knative's autoscaling knobs for one revision, with Knative's defaults.
///
/// Durations are milliseconds here; the config module parses `"60s"`-style strings into them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KpaConfig {
    /// Soft target: concurrent requests per replica (`autoscaling.knative.dev/target`).
    pub target: f64,
    /// Hard limit per replica; 0 means unlimited. When set it caps the target.
    pub container_concurrency: u32,
    /// Share of the target to aim for, in percent (0, 100].
    pub target_utilization_percentage: f64,
    /// Stable window, and how long panic mode lasts after the last panic condition.
    pub stable_window_ms: u64,
    /// Panic window as a percentage of the stable window (10 → 6 s).
    pub panic_window_percentage: f64,
    /// Panic when panic-desired replicas reach this percentage of ready replicas.
    pub panic_threshold_percentage: f64,
    /// At most this many times the ready replicas per decision (> 1).
    pub max_scale_up_rate: f64,
    /// At least ready replicas divided by this per decision (> 1).
    pub max_scale_down_rate: f64,
    /// Never fewer replicas (0 allows scale to zero).
    pub min_scale: u32,
    /// Never more replicas; 0 means unbounded.
    pub max_scale: u32,
    /// Zero demand must last this long (after the stable window has emptied) before the last
    /// replica goes.
    pub scale_to_zero_grace_period_ms: u64,
    /// Minimum non-zero scale: coming up from zero asks for at least this many at once.
    pub activation_scale: u32,
    /// Replicas to ask for until the revision has once had this many ready.
    pub initial_scale: u32,
}

impl Default for KpaConfig {
    /// Knative Serving's defaults (`config-autoscaler`).
    fn default() -> Self {
        Self {
            target: 100.0,
            container_concurrency: 0,
            target_utilization_percentage: 70.0,
            stable_window_ms: 60_000,
            panic_window_percentage: 10.0,
            panic_threshold_percentage: 200.0,
            max_scale_up_rate: 1_000.0,
            max_scale_down_rate: 2.0,
            min_scale: 0,
            max_scale: 0,
            scale_to_zero_grace_period_ms: 30_000,
            activation_scale: 1,
            initial_scale: 1,
        }
    }
}

/// What is wrong with a [`KpaConfig`]; fields are named by their config keys.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KpaConfigError {
    #[error("{field} is {value}; expected {expected}")]
    OutOfRange {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("minScale ({min_scale}) is above maxScale ({max_scale}); lower minScale, raise maxScale, or set maxScale to 0 for no upper bound")]
    MinAboveMax { min_scale: u32, max_scale: u32 },
    #[error("activationScale ({activation_scale}) is above maxScale ({max_scale}); expected activationScale <= maxScale")]
    ActivationAboveMax {
        activation_scale: u32,
        max_scale: u32,
    },
}

/// Knative's lowest accepted target; keeps `avg / target` well-conditioned.
const MIN_TARGET: f64 = 0.01;

fn out_of_range(
    field: &'static str,
    value: impl ToString,
    expected: &'static str,
) -> KpaConfigError {
    KpaConfigError::OutOfRange {
        field,
        value: value.to_string(),
        expected,
    }
}

impl KpaConfig {
    /// Checks every field; the first problem found is returned, named by its config key.
    pub fn validate(&self) -> Result<(), KpaConfigError> {
        // `!(x >= lo)` style checks would also catch NaN; spell NaN out for clippy and readers.
        let within = |x: f64, lo: f64, hi: f64| !x.is_nan() && x >= lo && x <= hi;
        if !within(self.target, MIN_TARGET, f64::MAX) {
            return Err(out_of_range("target", self.target, "a number >= 0.01"));
        }
        let utilization = self.target_utilization_percentage;
        if utilization.is_nan() || utilization <= 0.0 || utilization > 100.0 {
            return Err(out_of_range(
                "targetUtilizationPercentage",
                utilization,
                "a percentage in (0, 100]",
            ));
        }
        if self.stable_window_ms == 0 {
            return Err(out_of_range("stableWindow", "0ms", "a duration > 0"));
        }
        let panic_pct = self.panic_window_percentage;
        if panic_pct.is_nan() || panic_pct <= 0.0 || panic_pct > 100.0 {
            return Err(out_of_range(
                "panicWindowPercentage",
                panic_pct,
                "a percentage in (0, 100]",
            ));
        }
        if self.panic_window_ms() == 0 {
            return Err(out_of_range(
                "panicWindowPercentage",
                panic_pct,
                "a percentage giving a panic window of at least 1ms",
            ));
        }
        // At or below 100 % a revision at steady state would panic forever and never scale down.
        if !within(self.panic_threshold_percentage, f64::MIN_POSITIVE, f64::MAX)
            || self.panic_threshold_percentage <= 100.0
        {
            return Err(out_of_range(
                "panicThresholdPercentage",
                self.panic_threshold_percentage,
                "a percentage > 100 (Knative accepts 110 to 1000)",
            ));
        }
        if !within(self.max_scale_up_rate, 1.0, f64::MAX) || self.max_scale_up_rate <= 1.0 {
            return Err(out_of_range(
                "maxScaleUpRate",
                self.max_scale_up_rate,
                "a rate > 1",
            ));
        }
        if !within(self.max_scale_down_rate, 1.0, f64::MAX) || self.max_scale_down_rate <= 1.0 {
            return Err(out_of_range(
                "maxScaleDownRate",
                self.max_scale_down_rate,
                "a rate > 1",
            ));
        }
        if self.max_scale > 0 && self.min_scale > self.max_scale {
            return Err(KpaConfigError::MinAboveMax {
                min_scale: self.min_scale,
                max_scale: self.max_scale,
            });
        }
        if self.activation_scale == 0 {
            return Err(out_of_range("activationScale", 0, "an integer >= 1"));
        }
        if self.max_scale > 0 && self.activation_scale > self.max_scale {
            return Err(KpaConfigError::ActivationAboveMax {
                activation_scale: self.activation_scale,
                max_scale: self.max_scale,
            });
        }
        Ok(())
    }

    /// Concurrency per replica the decider aims for: min(target, cc when cc > 0) × utilization.
    pub fn effective_target(&self) -> f64 {
        let mut target = self.target;
        if self.container_concurrency > 0 {
            target = target.min(f64::from(self.container_concurrency));
        }
        // Multiply before dividing: 10 × 70 / 100 is exactly 7, 10 × 0.7 is not.
        target * self.target_utilization_percentage / 100.0
    }

    /// Panic window length: the stable window × panicWindowPercentage / 100, rounded.
    pub fn panic_window_ms(&self) -> u64 {
        let window = self.stable_window_ms as f64 * self.panic_window_percentage / 100.0;
        // `as` saturates and maps NaN to 0; validate() rejects the inputs that would need it.
        window.round() as u64
    }
}

/// Relative tolerance for "is this ratio a whole number": float division may land a hair above
/// an exact quotient (0.3 / 0.1 = 2.9999999999999996, 0.30000000000000004 / 0.1 =
/// 3.0000000000000004) and a plain `ceil` would then ask for a whole extra replica.
const WHOLE_RATIO_TOLERANCE: f64 = 1e-9;

/// `ceil(value / per_replica)` as a replica count, robust to float noise, saturating at u32::MAX;
/// 0 for non-positive or NaN inputs.
fn ceil_ratio(value: f64, per_replica: f64) -> u32 {
    if value.is_nan() || value <= 0.0 || per_replica.is_nan() || per_replica <= 0.0 {
        return 0;
    }
    let ratio = value / per_replica;
    let nearest = ratio.round();
    let replicas = if (ratio - nearest).abs() <= WHOLE_RATIO_TOLERANCE * nearest.max(1.0) {
        nearest
    } else {
        ratio.ceil()
    };
    // `as` saturates (and maps NaN to 0), which is the clamp we want.
    replicas as u32
}

/// Replicas needed for an average concurrency under `cfg`'s effective target, before rate
/// limits, panic mode and scale bounds: `ceil(avg / effective target)`. 0 when `avg` is not
/// positive, and also for a config whose effective target is not positive (validate it first).
pub fn desired_for_concurrency(avg: f64, cfg: &KpaConfig) -> u32 {
    ceil_ratio(avg, cfg.effective_target())
}

/// Panic-mode bookkeeping: present while panicking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panic {
    /// When panic mode began (for logs and the panic gauge).
    pub started_ms: u64,
    /// The last decision that saw the panic condition; panic ends a stable window after it.
    pub last_over_threshold_ms: u64,
    /// The highest desired count during this panic: panic never scales down below it.
    pub max_desired: u32,
}

/// What a [`Decider`] remembers between decisions; encodes to bytes for shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeciderState {
    pub panic: Option<Panic>,
    /// The last decision's desired count (the `inflight_desired_replicas` gauge).
    pub last_desired: u32,
    /// The last decision that saw demand, or the first decision if none has: the
    /// scale-to-zero grace period counts from here, so a freshly started gateway does not
    /// drop a revision's replicas before it has watched it for a while.
    pub last_demand_ms: Option<u64>,
    /// The revision has had `initialScale` replicas ready at least once.
    pub initial_scale_reached: bool,
}

const FLAG_PANIC: u8 = 1;
const FLAG_DEMAND_SEEN: u8 = 1 << 1;
const FLAG_INITIAL_SCALE_REACHED: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = FLAG_PANIC | FLAG_DEMAND_SEEN | FLAG_INITIAL_SCALE_REACHED;

impl DeciderState {
    /// Compact bytes for shared data: version, kind, a flag byte, then varints for the fields
    /// the flags say are present.
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = 0;
        if self.panic.is_some() {
            flags |= FLAG_PANIC;
        }
        if self.last_demand_ms.is_some() {
            flags |= FLAG_DEMAND_SEEN;
        }
        if self.initial_scale_reached {
            flags |= FLAG_INITIAL_SCALE_REACHED;
        }
        let mut encoder = Encoder::new(kind::DECIDER_STATE);
        encoder.put_u8(flags);
        if let Some(panic) = self.panic {
            encoder.put_varint(panic.started_ms);
            encoder.put_varint(panic.last_over_threshold_ms);
            encoder.put_varint(u64::from(panic.max_desired));
        }
        encoder.put_varint(u64::from(self.last_desired));
        if let Some(at) = self.last_demand_ms {
            encoder.put_varint(at);
        }
        encoder.finish()
    }

    /// Reads what [`DeciderState::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut decoder = Decoder::new(bytes, kind::DECIDER_STATE)?;
        let flags = decoder.take_u8("decider flags")?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::Invalid {
                field: "decider flags",
                reason: "unknown flag bits set",
            });
        }
        let panic = if flags & FLAG_PANIC != 0 {
            Some(Panic {
                started_ms: decoder.take_varint("panic start")?,
                last_over_threshold_ms: decoder.take_varint("panic last over threshold")?,
                max_desired: decoder.take_u32("panic max desired")?,
            })
        } else {
            None
        };
        let last_desired = decoder.take_u32("last desired")?;
        let last_demand_ms = if flags & FLAG_DEMAND_SEEN != 0 {
            Some(decoder.take_varint("last demand")?)
        } else {
            None
        };
        decoder.finish()?;
        Ok(Self {
            panic,
            last_desired,
            last_demand_ms,
            initial_scale_reached: flags & FLAG_INITIAL_SCALE_REACHED != 0,
        })
    }
}

/// The rule that set a decision's final desired count, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Stable window average over the effective target.
    Stable,
    /// Capped by the scale-up rate.
    ScaleUpRateLimited,
    /// Held up by the scale-down rate.
    ScaleDownRateLimited,
    /// Panic mode: the larger of the stable and panic counts.
    Panic,
    /// Panic mode holding the highest count of this panic: no scale-down while panicking.
    PanicHold,
    /// Demand on a revision with no ready replica: at least one, at once.
    ScaleFromZero,
    /// No demand, but the grace period is not over: keep one replica.
    ScaleToZeroGrace,
    /// Raised to the activation scale (minimum non-zero scale).
    ActivationScale,
    /// Raised to the initial scale, not yet reached once.
    InitialScale,
    /// Raised to minScale.
    MinScale,
    /// Lowered to maxScale.
    MaxScale,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stable => "stable window average over the target",
            Self::ScaleUpRateLimited => "limited by maxScaleUpRate",
            Self::ScaleDownRateLimited => "limited by maxScaleDownRate",
            Self::Panic => "panic mode: larger of stable and panic windows",
            Self::PanicHold => "panic mode: no scale-down while panicking",
            Self::ScaleFromZero => "demand with no ready replica: scale from zero",
            Self::ScaleToZeroGrace => "no demand, within scaleToZeroGracePeriod: keep one",
            Self::ActivationScale => "raised to activationScale",
            Self::InitialScale => "raised to initialScale (not reached yet)",
            Self::MinScale => "raised to minScale",
            Self::MaxScale => "lowered to maxScale",
        })
    }
}

/// One decision and the inputs that explain it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Replicas the revision should have.
    pub desired: u32,
    /// Panic mode is on after this decision.
    pub panic: bool,
    /// ceil(stable average / effective target), before any limit.
    pub stable_desired: u32,
    /// ceil(panic average / effective target), before any limit.
    pub panic_desired: u32,
    /// Rate limits of this decision: ceil(maxScaleUpRate × max(ready, 1)) ...
    pub max_scale_up: u32,
    /// ... and floor(max(ready, 1) / maxScaleDownRate).
    pub max_scale_down: u32,
    pub effective_target: f64,
    pub ready: u32,
    pub reason: Reason,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "desired={} ready={} stable={} panic={} mode={} limits=[{}, {}] target={} ({})",
            self.desired,
            self.ready,
            self.stable_desired,
            self.panic_desired,
            if self.panic { "panic" } else { "stable" },
            self.max_scale_down,
            self.max_scale_up,
            self.effective_target,
            self.reason
        )
    }
}

/// Knative's KPA for one revision: a validated config plus the state between decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct Decider {
    config: KpaConfig,
    state: DeciderState,
}

impl Decider {
    /// A decider with fresh state (not panicking, nothing seen yet).
    pub fn new(config: KpaConfig) -> Result<Self, KpaConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            state: DeciderState::default(),
        })
    }

    pub fn config(&self) -> &KpaConfig {
        &self.config
    }

    pub fn state(&self) -> &DeciderState {
        &self.state
    }

    /// Continues from a state read from shared data (another worker may have decided last).
    pub fn restore(&mut self, state: DeciderState) {
        self.state = state;
    }

    /// Decides the desired replica count at `now_ms` from the stable and panic window average
    /// concurrencies and the ready replica count, and updates the state.
    ///
    /// Negative or NaN averages count as zero demand.
    pub fn decide(&mut self, now_ms: u64, stable_avg: f64, panic_avg: f64, ready: u32) -> Decision {
        let cfg = &self.config;
        let state = &mut self.state;
        let target = cfg.effective_target();
        let stable_desired = ceil_ratio(stable_avg, target);
        let panic_desired = ceil_ratio(panic_avg, target);

        // Knative treats zero ready pods as one for the rates and the panic ratio, so a
        // revision at zero can grow to maxScaleUpRate at once and never divides by zero.
        let ready_for_rates = f64::from(ready.max(1));
        let max_scale_up = (cfg.max_scale_up_rate * ready_for_rates).ceil() as u32;
        let max_scale_down = ((ready_for_rates / cfg.max_scale_down_rate).floor() as u32)
            // Only an invalid config (rate <= 1) could cross the limits; keep clamp total.
            .min(max_scale_up);
        let limited = |want: u32| want.clamp(max_scale_down, max_scale_up);

        let over_threshold =
            f64::from(panic_desired) * 100.0 >= cfg.panic_threshold_percentage * ready_for_rates;
        match (&mut state.panic, over_threshold) {
            (None, true) => {
                state.panic = Some(Panic {
                    started_ms: now_ms,
                    last_over_threshold_ms: now_ms,
                    max_desired: 0,
                });
            }
            (Some(panic), true) => {
                panic.last_over_threshold_ms = panic.last_over_threshold_ms.max(now_ms);
            }
            (Some(panic), false)
                if now_ms
                    > panic
                        .last_over_threshold_ms
                        .saturating_add(cfg.stable_window_ms) =>
            {
                // The surge has made its way into the stable window.
                state.panic = None;
            }
            _ => {}
        }

        let (mut desired, mut reason) = match &mut state.panic {
            Some(panic) => {
                // The stable count can exceed the panic one (load just dropped); provision for
                // the larger.
                let want = limited(stable_desired).max(limited(panic_desired));
                if want >= panic.max_desired {
                    panic.max_desired = want;
                    (want, Reason::Panic)
                } else {
                    (panic.max_desired, Reason::PanicHold)
                }
            }
            None => {
                let desired = limited(stable_desired);
                let reason = if stable_desired > max_scale_up {
                    Reason::ScaleUpRateLimited
                } else if stable_desired < max_scale_down {
                    Reason::ScaleDownRateLimited
                } else {
                    Reason::Stable
                };
                (desired, reason)
            }
        };

        let has_demand = stable_avg > 0.0 || panic_avg > 0.0;
        if has_demand || state.last_demand_ms.is_none() {
            state.last_demand_ms = Some(state.last_demand_ms.unwrap_or(0).max(now_ms));
        }
        if ready == 0 && has_demand && desired == 0 {
            desired = 1;
            reason = Reason::ScaleFromZero;
        }
        if desired == 0 && ready > 0 {
            let since_demand = now_ms.saturating_sub(state.last_demand_ms.unwrap_or(now_ms));
            if since_demand < cfg.scale_to_zero_grace_period_ms {
                desired = 1;
                reason = Reason::ScaleToZeroGrace;
            }
        }
        if desired > 0 && desired < cfg.activation_scale {
            desired = cfg.activation_scale;
            reason = if ready == 0 {
                Reason::ScaleFromZero
            } else {
                Reason::ActivationScale
            };
        }
        if !state.initial_scale_reached {
            if ready >= cfg.initial_scale {
                state.initial_scale_reached = true;
            } else if desired < cfg.initial_scale {
                desired = cfg.initial_scale;
                reason = Reason::InitialScale;
            }
        }
        if desired < cfg.min_scale {
            desired = cfg.min_scale;
            reason = Reason::MinScale;
        }
        if cfg.max_scale > 0 && desired > cfg.max_scale {
            desired = cfg.max_scale;
            reason = Reason::MaxScale;
        }
        state.last_desired = desired;

        Decision {
            desired,
            panic: state.panic.is_some(),
            stable_desired,
            panic_desired,
            max_scale_up,
            max_scale_down,
            effective_target: target,
            ready,
            reason,
        }
    }
}
