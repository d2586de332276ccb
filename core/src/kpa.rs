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
//!
//! One rule is ours, not Knative's, and can be turned off (`queueAwarePanic: false`): the
//! **queue-aware panic**. Knative's autoscaler sees only what pods report once a second, so a
//! load step has to fill its 6 s panic window before the count catches up. The gateway sees
//! every request in flight and every request waiting in its buffer; while the revision is at
//! capacity and requests have waited for a whole short horizon (1 s by default), the demand is
//! not a guess. Then [`Decider::decide_queue_aware`] may use the average demand over that
//! horizon instead of the panic window (once per stretch of waiting: [`crate::autoscaler`]
//! decides when) — only to scale *up*, bounded by `maxScaleUpRate` and
//! `maxScale` like any count, and entering (or extending) Knative's panic mode at that count, so
//! the scale-down that follows is Knative's own: no scale-down for a stable window after the
//! last surge, then the stable average under `maxScaleDownRate`. Without waiters every decision
//! is exactly Knative's.

use thiserror::Error;

use crate::window::{kind, DecodeError, Decoder, Encoder};

/// Knative's autoscaling knobs for one revision, with Knative's defaults.
///
/// Durations are milliseconds here. This is the validated form; the one schema users write is
/// the plugin configuration's `autoscaling` object (`config.rs`), which fills this in.
#[derive(Debug, Clone, PartialEq)]
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
    /// Not in Knative: while the revision is at capacity and requests wait, scale up on the
    /// demand of the last `queue_aware_horizon_ms` instead of waiting for the panic window (see
    /// the module docs). `false` gives Knative's behaviour exactly.
    pub queue_aware_panic: bool,
    /// How long requests must have waited at capacity before the queue-aware panic may act, and
    /// the span its demand average covers. At least one tick in practice (the gateway samples
    /// at ticks); at most the stable window.
    pub queue_aware_horizon_ms: u64,
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
            queue_aware_panic: true,
            queue_aware_horizon_ms: DEFAULT_QUEUE_AWARE_HORIZON_MS,
        }
    }
}

/// Default horizon of the queue-aware panic: one Knative reporting period.
pub const DEFAULT_QUEUE_AWARE_HORIZON_MS: u64 = 1_000;

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
        // Every float check also rejects NaN and infinities: `x.is_finite() && ...` first.
        let above = |x: f64, lo: f64| x.is_finite() && x > lo;
        let percentage = |x: f64| above(x, 0.0) && x <= 100.0;
        if !(self.target.is_finite() && self.target >= MIN_TARGET) {
            return Err(out_of_range("target", self.target, "a number >= 0.01"));
        }
        if !percentage(self.target_utilization_percentage) {
            return Err(out_of_range(
                "targetUtilizationPercentage",
                self.target_utilization_percentage,
                "a percentage in (0, 100]",
            ));
        }
        if self.stable_window_ms == 0 {
            return Err(out_of_range("stableWindow", "0ms", "a duration > 0"));
        }
        if !percentage(self.panic_window_percentage) {
            return Err(out_of_range(
                "panicWindowPercentage",
                self.panic_window_percentage,
                "a percentage in (0, 100]",
            ));
        }
        if self.panic_window_ms() == 0 {
            return Err(out_of_range(
                "panicWindowPercentage",
                self.panic_window_percentage,
                "a percentage giving a panic window of at least 1ms",
            ));
        }
        // At or below 100 % a revision at steady state would panic forever and never scale down.
        if !above(self.panic_threshold_percentage, 100.0) {
            return Err(out_of_range(
                "panicThresholdPercentage",
                self.panic_threshold_percentage,
                "a percentage > 100 (Knative accepts 110 to 1000)",
            ));
        }
        if !above(self.max_scale_up_rate, 1.0) {
            return Err(out_of_range(
                "maxScaleUpRate",
                self.max_scale_up_rate,
                "a finite rate > 1",
            ));
        }
        if !above(self.max_scale_down_rate, 1.0) {
            return Err(out_of_range(
                "maxScaleDownRate",
                self.max_scale_down_rate,
                "a finite rate > 1",
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
        if self.queue_aware_horizon_ms == 0 || self.queue_aware_horizon_ms > self.stable_window_ms {
            return Err(out_of_range(
                "queueAwareHorizon",
                format!("{}ms", self.queue_aware_horizon_ms),
                "a duration > 0 and at most the stable window (default 1s)",
            ));
        }
        Ok(())
    }

    /// Concurrency per replica the decider aims for: min(target, cc when cc > 0) × utilization.
    pub fn effective_target(&self) -> f64 {
        let mut target = self.target;
        if self.container_concurrency > 0 {
            target = target.min(f64::from(self.container_concurrency));
        }
        // Multiply before dividing so whole-number inputs stay exact: 10 × 70 / 100 is 7.
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
    /// drop a revision's replicas before it has watched it for a while. `None` only before the
    /// first decision.
    pub last_demand_ms: Option<u64>,
    /// The revision is new and has not yet had `initialScale` replicas ready: ask for at least
    /// that many. Only [`Decider::for_new_revision`] sets it — see there why.
    pub initial_scale_pending: bool,
}

const FLAG_PANIC: u8 = 1;
const FLAG_DEMAND_SEEN: u8 = 1 << 1;
const FLAG_INITIAL_SCALE_PENDING: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = FLAG_PANIC | FLAG_DEMAND_SEEN | FLAG_INITIAL_SCALE_PENDING;

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
        if self.initial_scale_pending {
            flags |= FLAG_INITIAL_SCALE_PENDING;
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
            initial_scale_pending: flags & FLAG_INITIAL_SCALE_PENDING != 0,
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
    /// Not Knative's: requests waited at capacity for the whole horizon, and the demand over it
    /// asked for more than the panic window did (see the module docs).
    QueueAwarePanic,
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
            Self::QueueAwarePanic => {
                "queue-aware panic: requests wait at capacity, scale up on the short horizon"
            }
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
    /// ceil(short-horizon average / effective target) when the queue-aware panic could act
    /// (requests waited at capacity for the whole horizon), before any limit.
    pub queue_desired: Option<u32>,
    /// Upper rate limit of this decision: ceil(maxScaleUpRate × max(ready, 1)).
    pub max_scale_up: u32,
    /// Lower rate limit of this decision: floor(max(ready, 1) / maxScaleDownRate).
    pub max_scale_down: u32,
    /// Concurrency per replica aimed for (see [`KpaConfig::effective_target`]).
    pub effective_target: f64,
    /// Ready replicas this decision was based on.
    pub ready: u32,
    /// The rule that set `desired` last.
    pub reason: Reason,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "desired={} ready={} stable={} panic={}{} mode={} limits=[{}, {}] target={} ({})",
            self.desired,
            self.ready,
            self.stable_desired,
            self.panic_desired,
            self.queue_desired
                .map_or(String::new(), |q| format!(" queue={q}")),
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
    /// A decider joining a revision that already exists: fresh state and no initial scale (its
    /// first decision holds the ready scale for a stable window, see [`Decider::decide`]). This is what the gateway uses: it cannot tell a new
    /// revision from its own restart, and applying `initialScale` on every gateway start would
    /// wake every revision that had scaled to zero.
    pub fn new(config: KpaConfig) -> Result<Self, KpaConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            state: DeciderState::default(),
        })
    }

    /// A decider for a revision that was just created (the local scaler knows when it creates
    /// one): asks for `initialScale` replicas until that many have been ready once, as Knative
    /// does for a new revision.
    pub fn for_new_revision(config: KpaConfig) -> Result<Self, KpaConfigError> {
        let mut decider = Self::new(config)?;
        decider.state.initial_scale_pending = true;
        Ok(decider)
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
    /// Negative or NaN averages count as zero demand. The first decision of a fresh state with
    /// more than one ready replica enters panic mode at the ready count, as a new Knative
    /// autoscaler does: windows that have just started know too little to scale down on.
    pub fn decide(&mut self, now_ms: u64, stable_avg: f64, panic_avg: f64, ready: u32) -> Decision {
        self.decide_queue_aware(now_ms, stable_avg, panic_avg, None, ready)
    }

    /// [`Decider::decide`] plus the queue-aware panic: `queued_avg` is the average demand
    /// (in flight + queued) over the last `queueAwareHorizon`, given only when requests have
    /// waited at capacity for that whole horizon; `None` (or `queueAwarePanic: false`) decides
    /// exactly as Knative.
    ///
    /// The rule only raises: when ceil(queued_avg / target), rate-limited, exceeds Knative's
    /// count, that is the count, and panic mode starts (or is extended) holding it — so no
    /// decision of this rule ever scales down, and the decisions after it are Knative's own.
    pub fn decide_queue_aware(
        &mut self,
        now_ms: u64,
        stable_avg: f64,
        panic_avg: f64,
        queued_avg: Option<f64>,
        ready: u32,
    ) -> Decision {
        let cfg = &self.config;
        let state = &mut self.state;
        if state.last_demand_ms.is_none() && state.panic.is_none() && ready > 1 {
            // First decision: the windows hold seconds of data at most, and a gateway restart
            // is not a reason to halve a revision. Like a new Knative autoscaler, start in panic
            // mode holding the current scale, so nothing scales down for a stable window.
            state.panic = Some(Panic {
                started_ms: now_ms,
                last_over_threshold_ms: now_ms,
                max_desired: ready,
            });
        }
        let target = cfg.effective_target();
        let stable_desired = ceil_ratio(stable_avg, target);
        let panic_desired = ceil_ratio(panic_avg, target);
        let queue_desired = queued_avg
            .filter(|_| cfg.queue_aware_panic)
            .map(|avg| ceil_ratio(avg, target));

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
        // Knative leaves panic mode only when the surge has made its way into the stable window:
        // a full stable window after the last decision over the threshold.
        let panic_expired = state.panic.is_some_and(|panic| {
            now_ms
                > panic
                    .last_over_threshold_ms
                    .saturating_add(cfg.stable_window_ms)
        });
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
            (Some(_), false) if panic_expired => state.panic = None,
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
        if let Some(want) = queue_desired.map(limited).filter(|want| *want > desired) {
            // Requests wait at capacity and the short horizon asks for more: a panic at that
            // count, held as Knative holds its own (no scale-down for a stable window after).
            let panic = state.panic.get_or_insert(Panic {
                started_ms: now_ms,
                last_over_threshold_ms: now_ms,
                max_desired: 0,
            });
            panic.last_over_threshold_ms = panic.last_over_threshold_ms.max(now_ms);
            panic.max_desired = panic.max_desired.max(want);
            desired = want;
            reason = Reason::QueueAwarePanic;
        }

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
            reason = if ready == 0 && has_demand {
                Reason::ScaleFromZero
            } else {
                Reason::ActivationScale
            };
        }
        if state.initial_scale_pending {
            if ready >= cfg.initial_scale {
                state.initial_scale_pending = false;
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
            queue_desired,
            max_scale_up,
            max_scale_down,
            effective_target: target,
            ready,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Knative defaults with the given changes.
    fn config(change: impl FnOnce(&mut KpaConfig)) -> KpaConfig {
        let mut cfg = KpaConfig::default();
        change(&mut cfg);
        cfg
    }

    /// The KServe docs scenario: soft target 10, utilization as given.
    fn target_10(utilization: f64) -> KpaConfig {
        config(|c| {
            c.target = 10.0;
            c.target_utilization_percentage = utilization;
        })
    }

    fn decider(cfg: KpaConfig) -> Decider {
        Decider::new(cfg).unwrap()
    }

    struct Case {
        name: &'static str,
        cfg: KpaConfig,
        stable_avg: f64,
        panic_avg: f64,
        ready: u32,
        desired: u32,
        panic: bool,
        reason: Reason,
    }

    #[test]
    fn single_decisions_match_knative() {
        let cases = vec![
            Case {
                name: "docs: 50 concurrent, target 10, utilization 100% -> 5",
                cfg: target_10(100.0),
                stable_avg: 50.0,
                panic_avg: 50.0,
                ready: 5,
                desired: 5,
                panic: false,
                reason: Reason::Stable,
            },
            Case {
                name: "docs: 50 concurrent, target 10, utilization 70% -> 50/7 = 7.14 -> 8",
                cfg: target_10(70.0),
                stable_avg: 50.0,
                panic_avg: 50.0,
                ready: 8,
                desired: 8,
                panic: false,
                reason: Reason::Stable,
            },
            Case {
                name: "docs: target 10 with cc 5 uses 5 x utilization (3.5): 50 -> 15",
                cfg: config(|c| {
                    c.target = 10.0;
                    c.container_concurrency = 5;
                }),
                stable_avg: 50.0,
                panic_avg: 50.0,
                ready: 15,
                desired: 15,
                panic: false,
                reason: Reason::Stable,
            },
            Case {
                name: "cc above target does not raise it",
                cfg: config(|c| {
                    c.target = 10.0;
                    c.container_concurrency = 50;
                    c.target_utilization_percentage = 100.0;
                }),
                stable_avg: 50.0,
                panic_avg: 50.0,
                ready: 5,
                desired: 5,
                panic: false,
                reason: Reason::Stable,
            },
            Case {
                name: "exact quotient is not rounded up: 50 / 10 = 5",
                cfg: target_10(100.0),
                stable_avg: 50.0,
                panic_avg: 0.0,
                ready: 5,
                desired: 5,
                panic: false,
                reason: Reason::Stable,
            },
            Case {
                name: "float noise below a whole quotient: 0.3 / 0.1 -> 3",
                cfg: config(|c| {
                    c.target = 0.1;
                    c.target_utilization_percentage = 100.0;
                }),
                stable_avg: 0.3,
                panic_avg: 0.0,
                ready: 3,
                desired: 3,
                panic: false,
                reason: Reason::Stable,
            },
            Case {
                name: "float noise above a whole quotient: 0.30000000000000004 / 0.1 -> 3",
                cfg: config(|c| {
                    c.target = 0.1;
                    c.target_utilization_percentage = 100.0;
                }),
                stable_avg: 0.1 + 0.2,
                panic_avg: 0.0,
                ready: 3,
                desired: 3,
                panic: false,
                reason: Reason::Stable,
            },
            Case {
                name: "scale-down rate 2: 10 ready go at most down to 5",
                cfg: target_10(100.0),
                stable_avg: 1.0,
                panic_avg: 1.0,
                ready: 10,
                desired: 5,
                panic: false,
                reason: Reason::ScaleDownRateLimited,
            },
            Case {
                name: "scale-down rate 2: 11 ready go at most down to floor(5.5) = 5",
                cfg: target_10(100.0),
                stable_avg: 1.0,
                panic_avg: 1.0,
                ready: 11,
                desired: 5,
                panic: false,
                reason: Reason::ScaleDownRateLimited,
            },
            Case {
                name: "scale-up rate 1.5: 4 ready grow at most to ceil(6) = 6",
                cfg: config(|c| {
                    c.target = 10.0;
                    c.target_utilization_percentage = 100.0;
                    c.max_scale_up_rate = 1.5;
                }),
                stable_avg: 70.0,
                panic_avg: 70.0,
                ready: 4,
                desired: 6,
                panic: false,
                reason: Reason::ScaleUpRateLimited,
            },
            Case {
                name: "scale-up rate 1.1 still grows by one: ceil(1.1 x 2) = 3",
                cfg: config(|c| {
                    c.target = 1.0;
                    c.target_utilization_percentage = 100.0;
                    c.max_scale_up_rate = 1.1;
                }),
                stable_avg: 5.0,
                panic_avg: 2.0,
                ready: 2,
                desired: 3,
                panic: false,
                reason: Reason::ScaleUpRateLimited,
            },
            Case {
                name: "panic entry at exactly 200%: panic-desired 10 with 5 ready",
                cfg: target_10(100.0),
                stable_avg: 10.0,
                panic_avg: 99.0,
                ready: 5,
                desired: 10,
                panic: true,
                reason: Reason::Panic,
            },
            Case {
                name: "no panic just below 200%: panic-desired 9 with 5 ready",
                cfg: target_10(100.0),
                stable_avg: 10.0,
                panic_avg: 89.0,
                ready: 5,
                desired: 2,
                panic: false,
                reason: Reason::ScaleDownRateLimited,
            },
            Case {
                name: "panic counts zero ready as one: 50 concurrent from zero -> 5 at once",
                cfg: target_10(100.0),
                stable_avg: 50.0,
                panic_avg: 50.0,
                ready: 0,
                desired: 5,
                panic: true,
                reason: Reason::Panic,
            },
            Case {
                name: "demand on zero replicas asks for one at once",
                cfg: target_10(100.0),
                stable_avg: 0.1,
                panic_avg: 0.1,
                ready: 0,
                desired: 1,
                panic: false,
                reason: Reason::Stable,
            },
            Case {
                name: "vanishing demand on zero replicas still asks for one",
                cfg: target_10(100.0),
                stable_avg: 1e-15,
                panic_avg: 0.0,
                ready: 0,
                desired: 1,
                panic: false,
                reason: Reason::ScaleFromZero,
            },
            Case {
                name: "activation scale 3: from zero asks for 3 at once",
                cfg: config(|c| c.activation_scale = 3),
                stable_avg: 0.1,
                panic_avg: 0.1,
                ready: 0,
                desired: 3,
                panic: false,
                reason: Reason::ScaleFromZero,
            },
            Case {
                name: "activation scale is the minimum non-zero scale",
                cfg: config(|c| c.activation_scale = 3),
                stable_avg: 0.1,
                panic_avg: 0.1,
                ready: 3,
                desired: 3,
                panic: false,
                reason: Reason::ActivationScale,
            },
            Case {
                name: "no demand, no replicas: stay at zero",
                cfg: KpaConfig::default(),
                stable_avg: 0.0,
                panic_avg: 0.0,
                ready: 0,
                desired: 0,
                panic: false,
                reason: Reason::Stable,
            },
            Case {
                name: "minScale holds replicas without demand",
                cfg: config(|c| c.min_scale = 3),
                stable_avg: 0.0,
                panic_avg: 0.0,
                ready: 3,
                desired: 3,
                panic: false,
                reason: Reason::MinScale,
            },
            Case {
                name: "maxScale caps demand",
                cfg: config(|c| {
                    c.target = 10.0;
                    c.max_scale = 4;
                }),
                stable_avg: 500.0,
                panic_avg: 500.0,
                ready: 4,
                desired: 4,
                panic: true,
                reason: Reason::MaxScale,
            },
            Case {
                name: "initial scale applies to new revisions only",
                cfg: config(|c| c.initial_scale = 3),
                stable_avg: 0.0,
                panic_avg: 0.0,
                ready: 1,
                desired: 1,
                panic: false,
                reason: Reason::ScaleToZeroGrace,
            },
            Case {
                name: "NaN and negative averages are no demand",
                cfg: KpaConfig::default(),
                stable_avg: f64::NAN,
                panic_avg: -5.0,
                ready: 0,
                desired: 0,
                panic: false,
                reason: Reason::Stable,
            },
        ];
        for case in cases {
            // A decider that has run before (at t = 0), so the first-decision hold is out of the
            // way; `a_fresh_decider_holds_the_current_scale_for_a_stable_window` covers that.
            let mut decider = decider(case.cfg);
            decider.restore(DeciderState {
                last_demand_ms: Some(0),
                ..DeciderState::default()
            });
            let decision = decider.decide(1_000, case.stable_avg, case.panic_avg, case.ready);
            assert_eq!(
                (decision.desired, decision.panic, decision.reason),
                (case.desired, case.panic, case.reason),
                "{}: {decision}",
                case.name
            );
            assert_eq!(
                decider.state().last_desired,
                decision.desired,
                "{}",
                case.name
            );
        }
    }

    /// The queue-aware panic, beside the Knative cases above: each case is one decision of a
    /// decider that has run before, with `queued` the short-horizon average when requests have
    /// waited at capacity for the whole horizon (`None`: nothing waits).
    #[test]
    fn queue_aware_panic_decisions() {
        struct QueueCase {
            name: &'static str,
            cfg: KpaConfig,
            stable_avg: f64,
            panic_avg: f64,
            queued: Option<f64>,
            ready: u32,
            desired: u32,
            panic: bool,
            reason: Reason,
        }
        let cases = vec![
            QueueCase {
                name: "load step: 50 waiting on 1 ready, panic window 1 s full -> 5 at once",
                cfg: target_10(100.0),
                stable_avg: 8.0,
                panic_avg: 8.0,
                queued: Some(50.0),
                ready: 1,
                desired: 5,
                panic: true,
                reason: Reason::QueueAwarePanic,
            },
            QueueCase {
                name: "the same step with queueAwarePanic off: Knative's 1",
                cfg: config(|c| {
                    c.target = 10.0;
                    c.target_utilization_percentage = 100.0;
                    c.queue_aware_panic = false;
                }),
                stable_avg: 8.0,
                panic_avg: 8.0,
                queued: Some(50.0),
                ready: 1,
                desired: 1,
                panic: false,
                reason: Reason::Stable,
            },
            QueueCase {
                name: "nothing waits: Knative's count even with a high short horizon",
                cfg: target_10(100.0),
                stable_avg: 8.0,
                panic_avg: 8.0,
                queued: None,
                ready: 1,
                desired: 1,
                panic: false,
                reason: Reason::Stable,
            },
            QueueCase {
                name: "below the panic threshold it still scales up: 4 ready, 45 waiting -> 5",
                cfg: target_10(100.0),
                stable_avg: 40.0,
                panic_avg: 42.0,
                queued: Some(45.0),
                ready: 4,
                desired: 5,
                panic: true,
                reason: Reason::QueueAwarePanic,
            },
            QueueCase {
                name: "never for scale-down: a lower short horizon leaves Knative's 10",
                cfg: target_10(100.0),
                stable_avg: 100.0,
                panic_avg: 100.0,
                queued: Some(30.0),
                ready: 10,
                desired: 10,
                panic: false,
                reason: Reason::Stable,
            },
            QueueCase {
                name: "equal to Knative's panic count: Knative's decision",
                cfg: target_10(100.0),
                stable_avg: 20.0,
                panic_avg: 50.0,
                queued: Some(50.0),
                ready: 1,
                desired: 5,
                panic: true,
                reason: Reason::Panic,
            },
            QueueCase {
                name: "bounded by maxScaleUpRate: rate 2 on 1 ready -> 2",
                cfg: config(|c| {
                    c.target = 10.0;
                    c.target_utilization_percentage = 100.0;
                    c.max_scale_up_rate = 2.0;
                }),
                stable_avg: 8.0,
                panic_avg: 8.0,
                queued: Some(50.0),
                ready: 1,
                desired: 2,
                panic: true,
                reason: Reason::QueueAwarePanic,
            },
            QueueCase {
                name: "bounded by maxScale: 3",
                cfg: config(|c| {
                    c.target = 10.0;
                    c.target_utilization_percentage = 100.0;
                    c.max_scale = 3;
                }),
                stable_avg: 8.0,
                panic_avg: 8.0,
                queued: Some(50.0),
                ready: 1,
                desired: 3,
                panic: true,
                reason: Reason::MaxScale,
            },
            QueueCase {
                name: "uses the effective target: 50 at 70% of 10 -> 8",
                cfg: target_10(70.0),
                stable_avg: 8.0,
                panic_avg: 8.0,
                queued: Some(50.0),
                ready: 1,
                desired: 8,
                panic: true,
                reason: Reason::QueueAwarePanic,
            },
            QueueCase {
                name: "scale from zero: 6 waiting with cc 2 -> 3",
                cfg: config(|c| {
                    c.target = 2.0;
                    c.container_concurrency = 2;
                    c.target_utilization_percentage = 100.0;
                }),
                stable_avg: 0.5,
                panic_avg: 0.5,
                queued: Some(6.0),
                ready: 0,
                desired: 3,
                panic: true,
                reason: Reason::QueueAwarePanic,
            },
        ];
        for case in cases {
            let mut decider = decider(case.cfg);
            decider.restore(DeciderState {
                last_demand_ms: Some(0),
                ..DeciderState::default()
            });
            let d = decider.decide_queue_aware(
                1_000,
                case.stable_avg,
                case.panic_avg,
                case.queued,
                case.ready,
            );
            assert_eq!(
                (d.desired, d.panic, d.reason),
                (case.desired, case.panic, case.reason),
                "{}: {d}",
                case.name
            );
        }
    }

    #[test]
    fn queue_aware_panic_holds_then_scales_down_as_knative() {
        // 50 clients arrive on 1 replica: after the 1 s horizon the rule asks for 5.
        let mut rule = decider(target_10(100.0));
        let mut knative = decider(target_10(100.0));
        let d = rule.decide_queue_aware(1_000, 8.0, 8.0, Some(50.0), 1);
        assert_eq!((d.desired, d.reason), (5, Reason::QueueAwarePanic), "{d}");
        knative.decide(1_000, 8.0, 8.0, 1);
        // Replicas start, the queue drains: no short horizon any more; the panic window still
        // reads low. Knative alone would ask for fewer; the panic entered by the rule holds 5.
        let d = rule.decide_queue_aware(2_000, 16.0, 16.0, None, 5);
        assert_eq!((d.desired, d.reason), (5, Reason::PanicHold), "{d}");
        // Demand stays at 50: Knative's own count catches up and agrees.
        for now in [10_000, 30_000, 61_000] {
            let d = rule.decide_queue_aware(now, 50.0, 50.0, None, 5);
            assert_eq!(d.desired, 5, "at {now}: {d}");
        }
        // The load ends. Panic ends a stable window after the rule last fired (t = 1 s), and
        // from then on both scale down the same way: Knative's rate limit, 5 -> 2 -> 1.
        let d = rule.decide_queue_aware(61_001, 1.0, 0.0, None, 5);
        let k = knative.decide(61_001, 1.0, 0.0, 5);
        assert_eq!(
            (d.desired, d.panic, d.reason),
            (2, false, Reason::ScaleDownRateLimited)
        );
        assert_eq!((k.desired, k.panic), (d.desired, d.panic));
        let d = rule.decide_queue_aware(62_000, 1.0, 0.0, None, 2);
        let k = knative.decide(62_000, 1.0, 0.0, 2);
        assert_eq!((d.desired, k.desired), (1, 1));
    }

    #[test]
    fn panic_never_scales_down_and_ends_a_stable_window_after_the_last_surge() {
        let mut decider = decider(target_10(100.0));
        // A surge: 100 concurrent on 5 ready -> panic, 10 replicas.
        let d = decider.decide(0, 20.0, 100.0, 5);
        assert!(d.panic);
        assert_eq!(d.desired, 10);
        // Still over the threshold a bit later: panic extended to 10 s.
        let d = decider.decide(10_000, 40.0, 200.0, 10);
        assert_eq!((d.desired, d.panic), (20, true));
        // The surge is over (panic-desired 3 of 20 ready): no scale-down while panicking.
        let d = decider.decide(20_000, 30.0, 30.0, 20);
        assert_eq!(
            (d.desired, d.panic, d.reason),
            (20, true, Reason::PanicHold)
        );
        // Exactly a stable window after the last surge: still panicking (Knative's `Before`).
        let d = decider.decide(70_000, 30.0, 30.0, 20);
        assert_eq!((d.desired, d.panic), (20, true));
        // One millisecond later: stable mode, and the scale-down rate applies (20 -> 10).
        let d = decider.decide(70_001, 30.0, 30.0, 20);
        assert_eq!(
            (d.desired, d.panic, d.reason),
            (10, false, Reason::ScaleDownRateLimited)
        );
        assert_eq!(decider.state().panic, None);
    }

    #[test]
    fn panic_follows_the_stable_window_when_it_is_larger() {
        let mut decider = decider(target_10(100.0));
        decider.decide(0, 10.0, 100.0, 5);
        // Panic window calmed down but the stable average is high: provision for the stable.
        let d = decider.decide(1_000, 150.0, 30.0, 10);
        assert_eq!((d.desired, d.panic, d.reason), (15, true, Reason::Panic));
    }

    #[test]
    fn scale_to_zero_waits_for_the_grace_period_without_demand() {
        let mut decider = decider(KpaConfig::default());
        // Demand until t = 10 s (as seen by the windows).
        let d = decider.decide(10_000, 5.0, 0.0, 1);
        assert_eq!(d.desired, 1);
        // No demand since: one replica stays for the 30 s grace period...
        for now in [10_001, 20_000, 39_999] {
            let d = decider.decide(now, 0.0, 0.0, 1);
            assert_eq!(
                (d.desired, d.reason),
                (1, Reason::ScaleToZeroGrace),
                "at {now}"
            );
        }
        // ...and goes when it is over.
        let d = decider.decide(40_000, 0.0, 0.0, 1);
        assert_eq!((d.desired, d.reason), (0, Reason::Stable));
        // Demand again on zero replicas: back to one at once.
        let d = decider.decide(41_000, 0.0, 0.5, 0);
        assert_eq!(d.desired, 1);
    }

    #[test]
    fn a_fresh_decider_holds_the_current_scale_for_a_stable_window() {
        // A gateway restart with 10 replicas ready and windows that know nothing yet: Knative's
        // new autoscaler starts in panic mode at the current scale; so does this one.
        let mut decider = decider(target_10(100.0));
        let d = decider.decide(5_000, 0.0, 0.0, 10);
        assert_eq!(
            (d.desired, d.panic, d.reason),
            (10, true, Reason::PanicHold)
        );
        let d = decider.decide(65_000, 10.0, 10.0, 10);
        assert_eq!((d.desired, d.panic), (10, true));
        // A stable window later it scales down as usual (rate 2: 10 -> 5).
        let d = decider.decide(65_001, 10.0, 10.0, 10);
        assert_eq!(
            (d.desired, d.panic, d.reason),
            (5, false, Reason::ScaleDownRateLimited)
        );
    }

    #[test]
    fn a_fresh_decider_scales_up_at_once() {
        let mut decider = decider(target_10(100.0));
        let d = decider.decide(0, 300.0, 300.0, 10);
        assert_eq!((d.desired, d.panic, d.reason), (30, true, Reason::Panic));
    }

    #[test]
    fn a_fresh_decider_does_not_drop_replicas_before_the_grace_period() {
        let mut decider = decider(KpaConfig::default());
        assert_eq!(decider.decide(100_000, 0.0, 0.0, 1).desired, 1);
        assert_eq!(decider.decide(129_999, 0.0, 0.0, 1).desired, 1);
        assert_eq!(decider.decide(130_000, 0.0, 0.0, 1).desired, 0);
    }

    #[test]
    fn zero_grace_period_scales_to_zero_at_once() {
        let mut decider = decider(config(|c| c.scale_to_zero_grace_period_ms = 0));
        assert_eq!(decider.decide(0, 0.0, 0.0, 1).desired, 0);
    }

    #[test]
    fn initial_scale_applies_until_reached_once() {
        let mut decider = Decider::for_new_revision(config(|c| c.initial_scale = 3)).unwrap();
        assert_eq!(decider.decide(0, 0.0, 0.0, 0).desired, 3);
        assert_eq!(decider.decide(1_000, 0.0, 0.0, 2).desired, 3);
        assert!(decider.state().initial_scale_pending);
        // Reached: from now on ordinary rules (scale-down rate 2: 3 -> 1).
        assert_eq!(decider.decide(2_000, 0.0, 0.0, 3).desired, 1);
        assert!(!decider.state().initial_scale_pending);
        assert_eq!(decider.decide(3_000, 0.0, 0.0, 1).desired, 1);
    }

    #[test]
    fn restore_continues_from_another_workers_state() {
        let mut first = decider(target_10(100.0));
        first.decide(0, 10.0, 100.0, 5);
        let bytes = first.state().encode();
        let mut second = decider(target_10(100.0));
        second.restore(DeciderState::decode(&bytes).unwrap());
        // The panic entered by the first worker holds on the second.
        let d = second.decide(1_000, 10.0, 10.0, 10);
        assert_eq!(
            (d.desired, d.panic, d.reason),
            (10, true, Reason::PanicHold)
        );
    }

    #[test]
    fn desired_for_concurrency_is_the_plain_ratio() {
        let cases: &[(&str, f64, KpaConfig, u32)] = &[
            ("docs at 100%", 50.0, target_10(100.0), 5),
            ("docs at 70%", 50.0, target_10(70.0), 8),
            (
                "default target 100 at 70%: 50 -> 1",
                50.0,
                KpaConfig::default(),
                1,
            ),
            (
                "default target 100 at 70%: 71 -> 2",
                71.0,
                KpaConfig::default(),
                2,
            ),
            ("no demand", 0.0, target_10(100.0), 0),
            ("negative", -1.0, target_10(100.0), 0),
            ("NaN", f64::NAN, target_10(100.0), 0),
            (
                "infinite demand saturates",
                f64::INFINITY,
                target_10(100.0),
                u32::MAX,
            ),
            (
                "invalid zero target gives 0",
                50.0,
                config(|c| c.target = 0.0),
                0,
            ),
        ];
        for (name, avg, cfg, expected) in cases {
            assert_eq!(desired_for_concurrency(*avg, cfg), *expected, "{name}");
        }
    }

    #[test]
    fn config_defaults_are_knatives() {
        let cfg = KpaConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.effective_target(), 70.0);
        assert_eq!(cfg.panic_window_ms(), 6_000);
        assert_eq!(target_10(70.0).effective_target(), 7.0);
    }

    #[test]
    fn config_validation_names_the_bad_field() {
        let cases: Vec<(&str, KpaConfig, &str)> = vec![
            ("zero target", config(|c| c.target = 0.0), "target"),
            ("NaN target", config(|c| c.target = f64::NAN), "target"),
            ("tiny target", config(|c| c.target = 0.001), "target"),
            (
                "zero utilization",
                config(|c| c.target_utilization_percentage = 0.0),
                "targetUtilizationPercentage",
            ),
            (
                "utilization above 100",
                config(|c| c.target_utilization_percentage = 100.5),
                "targetUtilizationPercentage",
            ),
            (
                "zero stable window",
                config(|c| c.stable_window_ms = 0),
                "stableWindow",
            ),
            (
                "zero panic window",
                config(|c| c.panic_window_percentage = 0.0),
                "panicWindowPercentage",
            ),
            (
                "panic window rounds to 0 ms",
                config(|c| {
                    c.stable_window_ms = 1;
                    c.panic_window_percentage = 10.0;
                }),
                "panicWindowPercentage",
            ),
            (
                "panic window above 100%",
                config(|c| c.panic_window_percentage = 101.0),
                "panicWindowPercentage",
            ),
            (
                "panic threshold 100%",
                config(|c| c.panic_threshold_percentage = 100.0),
                "panicThresholdPercentage",
            ),
            (
                "scale-up rate 1",
                config(|c| c.max_scale_up_rate = 1.0),
                "maxScaleUpRate",
            ),
            (
                "scale-down rate 1",
                config(|c| c.max_scale_down_rate = 1.0),
                "maxScaleDownRate",
            ),
            (
                "infinite scale-down rate",
                config(|c| c.max_scale_down_rate = f64::INFINITY),
                "maxScaleDownRate",
            ),
            (
                "activation 0",
                config(|c| c.activation_scale = 0),
                "activationScale",
            ),
        ];
        for (name, cfg, field) in cases {
            match cfg.validate() {
                Err(KpaConfigError::OutOfRange { field: got, .. }) => {
                    assert_eq!(got, field, "{name}")
                }
                other => panic!("{name}: expected OutOfRange for {field}, got {other:?}"),
            }
            assert!(Decider::new(cfg).is_err(), "{name}");
        }
        assert_eq!(
            config(|c| {
                c.min_scale = 5;
                c.max_scale = 3;
            })
            .validate(),
            Err(KpaConfigError::MinAboveMax {
                min_scale: 5,
                max_scale: 3
            })
        );
        assert_eq!(
            config(|c| {
                c.activation_scale = 5;
                c.max_scale = 3;
            })
            .validate(),
            Err(KpaConfigError::ActivationAboveMax {
                activation_scale: 5,
                max_scale: 3
            })
        );
        // maxScale 0 is unbounded: any minScale is fine.
        assert_eq!(config(|c| c.min_scale = 50).validate(), Ok(()));
        let message = config(|c| c.target_utilization_percentage = 0.0)
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "targetUtilizationPercentage is 0; expected a percentage in (0, 100]"
        );
    }

    #[test]
    fn state_round_trips_and_rejects_damaged_bytes() {
        let states = [
            DeciderState::default(),
            DeciderState {
                panic: Some(Panic {
                    started_ms: 1,
                    last_over_threshold_ms: u64::MAX,
                    max_desired: u32::MAX,
                }),
                last_desired: 17,
                last_demand_ms: Some(0),
                initial_scale_pending: true,
            },
        ];
        for state in states {
            let bytes = state.encode();
            assert_eq!(DeciderState::decode(&bytes), Ok(state));
            for cut in 0..bytes.len() {
                assert!(DeciderState::decode(&bytes[..cut]).is_err(), "prefix {cut}");
            }
        }
        let mut unknown_flag = DeciderState::default().encode();
        unknown_flag[2] |= 0x80;
        assert!(matches!(
            DeciderState::decode(&unknown_flag),
            Err(DecodeError::Invalid { .. })
        ));
        assert!(matches!(
            DeciderState::decode(&crate::window::Demand::new().encode()),
            Err(DecodeError::WrongKind { .. })
        ));
    }

    // ---- properties ----

    /// Valid configs across the whole accepted range.
    fn any_config() -> impl Strategy<Value = KpaConfig> {
        (
            (0.01f64..500.0, 0u32..50, 1.0f64..=100.0, 1_000u64..600_000),
            (
                1.0f64..=100.0,
                101.0f64..1_000.0,
                1.01f64..1_000.0,
                1.01f64..10.0,
            ),
            (0u32..20, 0u32..40, 0u64..120_000, 1u32..5, 0u32..5),
        )
            .prop_map(
                |(
                    (target, cc, utilization, stable),
                    (panic_pct, threshold, up, down),
                    (min, max, grace, activation, initial),
                )| {
                    let max = if max == 0 {
                        0
                    } else {
                        max.max(min).max(activation)
                    };
                    KpaConfig {
                        target,
                        container_concurrency: cc,
                        target_utilization_percentage: utilization,
                        stable_window_ms: stable,
                        panic_window_percentage: panic_pct,
                        panic_threshold_percentage: threshold,
                        max_scale_up_rate: up,
                        max_scale_down_rate: down,
                        min_scale: min,
                        max_scale: max,
                        scale_to_zero_grace_period_ms: grace,
                        activation_scale: activation,
                        initial_scale: initial,
                        queue_aware_panic: true,
                        queue_aware_horizon_ms: DEFAULT_QUEUE_AWARE_HORIZON_MS.min(stable),
                    }
                },
            )
    }

    fn any_state() -> impl Strategy<Value = DeciderState> {
        (
            proptest::option::of((any::<u64>(), any::<u64>(), any::<u32>())),
            any::<u32>(),
            proptest::option::of(any::<u64>()),
            any::<bool>(),
        )
            .prop_map(
                |(panic, last_desired, last_demand_ms, initial_scale_pending)| DeciderState {
                    panic: panic.map(|(started_ms, last_over_threshold_ms, max_desired)| Panic {
                        started_ms,
                        last_over_threshold_ms,
                        max_desired,
                    }),
                    last_desired,
                    last_demand_ms,
                    initial_scale_pending,
                },
            )
    }

    fn any_average() -> impl Strategy<Value = f64> {
        prop_oneof![Just(0.0), 0.0f64..1e-6, 0.0f64..10_000.0]
    }

    proptest! {
        #[test]
        fn desired_is_monotonic_in_demand(
            cfg in any_config(),
            state in any_state(),
            now in 0u64..1_000_000,
            ready in 0u32..200,
            (stable_low, stable_extra) in (any_average(), any_average()),
            (panic_low, panic_extra) in (any_average(), any_average()),
        ) {
            let mut low = decider(cfg.clone());
            low.restore(state);
            let mut high = decider(cfg);
            high.restore(state);
            let low = low.decide(now, stable_low, panic_low, ready);
            let high = high.decide(now, stable_low + stable_extra, panic_low + panic_extra, ready);
            prop_assert!(low.desired <= high.desired, "{low} vs {high}");
        }

        #[test]
        fn queue_aware_panic_only_raises_knatives_decision(
            cfg in any_config(),
            state in any_state(),
            now in 0u64..1_000_000,
            ready in 0u32..200,
            stable in any_average(),
            panic in any_average(),
            queued in proptest::option::of(any_average()),
        ) {
            let mut knative = decider(KpaConfig { queue_aware_panic: false, ..cfg.clone() });
            knative.restore(state);
            let mut rule = decider(cfg);
            rule.restore(state);
            let k = knative.decide(now, stable, panic, ready);
            let d = rule.decide_queue_aware(now, stable, panic, queued, ready);
            prop_assert!(d.desired >= k.desired, "{d} below Knative's {k}");
            // The rule acts only by raising a count, which always changes the state.
            let fired = rule.state() != knative.state();
            if !fired {
                // Not raised: exactly Knative's decision.
                prop_assert_eq!((d.desired, d.panic, d.reason), (k.desired, k.panic, k.reason));
            } else {
                // Raised: only with a short horizon, within maxScaleUpRate and maxScale.
                prop_assert!(queued.is_some());
                prop_assert!(d.panic, "{d}");
                let activation = rule.config().activation_scale;
                prop_assert!(
                    d.desired <= d.max_scale_up.max(k.desired).max(activation),
                    "{d} vs {k}"
                );
                let max = rule.config().max_scale;
                prop_assert!(max == 0 || d.desired <= max, "{d}");
            }
        }

        #[test]
        fn rate_limits_are_always_respected(
            cfg in any_config(),
            steps in proptest::collection::vec(
                (1u64..20_000, any_average(), any_average(), 0u32..200), 1..40),
        ) {
            // Only the rate limits and the panic hold may shape the result.
            let cfg = KpaConfig {
                min_scale: 0,
                max_scale: 0,
                activation_scale: 1,
                initial_scale: 0,
                ..cfg
            };
            let mut decider = decider(cfg);
            let mut now = 0;
            for (gap, stable, panic, ready) in steps {
                now += gap;
                let held = decider.state().panic.map(|p| p.max_desired);
                let d = decider.decide(now, stable, panic, ready);
                prop_assert!(d.desired >= d.max_scale_down, "{d}");
                prop_assert!(
                    d.desired <= d.max_scale_up || (d.panic && Some(d.desired) == held),
                    "{d} (held {held:?})"
                );
            }
        }

        #[test]
        fn desired_stays_within_min_and_max_scale(
            cfg in any_config(),
            state in any_state(),
            now in any::<u64>(),
            ready in 0u32..500,
            stable in any_average(),
            panic in any_average(),
        ) {
            let (min, max) = (cfg.min_scale, cfg.max_scale);
            let mut decider = decider(cfg);
            decider.restore(state);
            let d = decider.decide(now, stable, panic, ready);
            prop_assert!(d.desired >= min, "{d} below minScale {min}");
            prop_assert!(max == 0 || d.desired <= max, "{d} above maxScale {max}");
        }

        #[test]
        fn state_decode_inverts_encode(state in any_state()) {
            prop_assert_eq!(DeciderState::decode(&state.encode()), Ok(state));
        }

        #[test]
        fn state_decode_of_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = DeciderState::decode(&bytes);
            let mut framed = vec![crate::window::ENCODING_VERSION, kind::DECIDER_STATE];
            framed.extend(&bytes);
            if let Ok(state) = DeciderState::decode(&framed) {
                prop_assert_eq!(DeciderState::decode(&state.encode()), Ok(state));
            }
        }
    }
}
