//! Time-weighted concurrency windows: the demand integral and its stable/panic averages.
//!
//! Knative's autoscaler does not scale on the instantaneous number of requests but on the
//! time-weighted average concurrency over a stable window (60 s) and a panic window (6 s). The
//! gateway knows demand exactly — in-flight plus queued, a step function that only changes at
//! events — so instead of sampling it we integrate it: [`Demand`] keeps ∫d dt in
//! request-milliseconds with integer arithmetic (no drift, no rounding), which is also the
//! Prometheus counter `inflight_demand_ms_total` whose `rate() / 1000` is the average concurrency.
//! [`Window`] keeps samples of that integral, at most one per time bucket, and answers the
//! average over the last N buckets as (integral now − integral then) / (time now − time then).
//!
//! Both live in Envoy shared data, shared by every worker VM and updated with compare-and-swap,
//! so both encode to compact bytes (a version byte, a kind byte, then LEB128 varints) and decode
//! defensively: truncated or garbage input is a [`DecodeError`], never a panic.

use std::collections::VecDeque;

use thiserror::Error;

/// Encoding version written as the first byte of every encoded value of this crate.
pub const ENCODING_VERSION: u8 = 1;

/// Default bucket granularity, as in Knative: one second.
pub const DEFAULT_GRANULARITY_MS: u64 = 1_000;

/// Default stable window, as in Knative: sixty seconds.
pub const DEFAULT_STABLE_WINDOW_MS: u64 = 60_000;

/// Upper bound on buckets per window: keeps the shared-data value (and the CAS that copies it)
/// small even for a misconfigured one-hour window at millisecond granularity.
pub const MAX_BUCKETS: u64 = 4_096;

/// Why bytes read from shared data could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("empty input: expected a version byte")]
    Empty,
    #[error("unsupported encoding version {found} (this build reads version {expected}); the value was written by a different filter build, drop it and start fresh")]
    UnsupportedVersion { found: u8, expected: u8 },
    #[error("wrong kind of value: found kind {found}, expected {expected} (a shared-data key holds a different type)")]
    WrongKind { found: u8, expected: u8 },
    #[error("input ends inside {field}")]
    Truncated { field: &'static str },
    #[error("{field} overflows its integer type")]
    Overflow { field: &'static str },
    #[error("{count} unexpected trailing bytes after the encoded value")]
    TrailingBytes { count: usize },
    #[error("invalid {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

/// Kind bytes: the second byte of an encoding, so a value decoded from the wrong shared-data key
/// is rejected instead of misread.
pub(crate) mod kind {
    pub(crate) const DEMAND: u8 = 1;
    pub(crate) const WINDOW: u8 = 2;
    pub(crate) const DECIDER_STATE: u8 = 3;
}

/// Appends the version byte, a kind byte, then LEB128 varints.
pub(crate) struct Encoder {
    bytes: Vec<u8>,
}

impl Encoder {
    pub(crate) fn new(kind: u8) -> Self {
        let mut bytes = Vec::with_capacity(32);
        bytes.push(ENCODING_VERSION);
        bytes.push(kind);
        Self { bytes }
    }

    pub(crate) fn put_u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub(crate) fn put_varint(&mut self, mut value: u64) {
        loop {
            // Low seven bits, with the high bit set while more bytes follow.
            let low = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                self.bytes.push(low);
                return;
            }
            self.bytes.push(low | 0x80);
        }
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Reads what [`Encoder`] wrote; every read is bounds-checked and returns a [`DecodeError`].
pub(crate) struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// Checks the version and kind bytes.
    pub(crate) fn new(bytes: &'a [u8], expected_kind: u8) -> Result<Self, DecodeError> {
        let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if version != ENCODING_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                expected: ENCODING_VERSION,
            });
        }
        let mut decoder = Self { rest };
        let found = decoder.take_u8("kind")?;
        if found != expected_kind {
            return Err(DecodeError::WrongKind {
                found,
                expected: expected_kind,
            });
        }
        Ok(decoder)
    }

    pub(crate) fn take_u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let (&byte, rest) = self
            .rest
            .split_first()
            .ok_or(DecodeError::Truncated { field })?;
        self.rest = rest;
        Ok(byte)
    }

    pub(crate) fn take_varint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        let mut shift: u32 = 0;
        loop {
            let byte = self.take_u8(field)?;
            let payload = u64::from(byte & 0x7f);
            // The tenth byte may only carry the top bit of a u64.
            if shift == 63 && payload > 1 || shift > 63 {
                return Err(DecodeError::Overflow { field });
            }
            value |= payload << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    pub(crate) fn take_u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let value = self.take_varint(field)?;
        u32::try_from(value).map_err(|_| DecodeError::Overflow { field })
    }

    /// Rejects trailing bytes: a value that decodes but is followed by garbage is not trusted.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                count: self.rest.len(),
            })
        }
    }
}

/// Instantaneous demand (in-flight + queued) of one revision and its exact time integral.
///
/// Demand is a step function that changes only at events (admit, enqueue, release, shed), so
/// the integral is a sum of `level × duration` terms, kept in request-milliseconds as a `u64`:
/// exact, never drifting, and saturating rather than wrapping (at 10 000 concurrent requests it
/// would take 58 000 years to saturate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    level: u32,
    /// When `level` took effect; the open segment runs from here to "now".
    since_ms: u64,
    /// Area of all closed segments, up to `since_ms`.
    settled_ms: u64,
}

impl Demand {
    /// A demand of zero; the start time does not matter because zero adds no area.
    pub fn new() -> Self {
        Self::default()
    }

    /// Closes the open segment at `now_ms` and continues at `new_level`.
    ///
    /// Workers read the clock before a compare-and-swap retry, so `now_ms` may be slightly
    /// older than the last event another worker wrote; time never runs backwards here — the new
    /// level then takes effect at the last event's time instead.
    pub fn observe(&mut self, now_ms: u64, new_level: u32) {
        self.settled_ms = self.integral_ms(now_ms);
        self.since_ms = self.since_ms.max(now_ms);
        self.level = new_level;
    }

    /// Adds `ms` request-milliseconds integrated elsewhere (a worker's leased slots).
    pub fn add(&mut self, ms: u64) {
        self.settled_ms = self.settled_ms.saturating_add(ms);
    }

    /// The current demand (in-flight + queued).
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Area under demand up to `now_ms`, including the open segment, in request-milliseconds.
    /// A `now_ms` before the last event counts the open segment as empty.
    pub fn integral_ms(&self, now_ms: u64) -> u64 {
        let open_ms = now_ms.saturating_sub(self.since_ms);
        let open_area = u64::from(self.level).saturating_mul(open_ms);
        self.settled_ms.saturating_add(open_area)
    }

    /// Compact bytes for shared data: version, kind, then level, since and settled as varints.
    pub fn encode(&self) -> Vec<u8> {
        let mut encoder = Encoder::new(kind::DEMAND);
        encoder.put_varint(u64::from(self.level));
        encoder.put_varint(self.since_ms);
        encoder.put_varint(self.settled_ms);
        encoder.finish()
    }

    /// Reads what [`Demand::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut decoder = Decoder::new(bytes, kind::DEMAND)?;
        let level = decoder.take_u32("demand level")?;
        let since_ms = decoder.take_varint("demand since")?;
        let settled_ms = decoder.take_varint("demand integral")?;
        decoder.finish()?;
        Ok(Self {
            level,
            since_ms,
            settled_ms,
        })
    }
}

/// Why a [`Window`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WindowError {
    #[error("window granularity is 0 ms; expected a bucket width of at least 1 ms (default 1s)")]
    ZeroGranularity,
    #[error("stable window of {window_ms} ms is shorter than one bucket of {granularity_ms} ms; expected a window of at least one bucket")]
    ShorterThanBucket { window_ms: u64, granularity_ms: u64 },
    #[error("stable window of {window_ms} ms at {granularity_ms} ms buckets needs {buckets} buckets; expected at most {max}: use coarser buckets")]
    TooManyBuckets {
        window_ms: u64,
        granularity_ms: u64,
        buckets: u64,
        max: u64,
    },
}

/// One sample of a cumulative counter (normally [`Demand::integral_ms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at_ms: u64,
    pub integral_ms: u64,
}

/// Bucketed samples of a cumulative counter, answering time-weighted averages over the last
/// N buckets (Knative's stable and panic windows from one structure).
///
/// Each bucket keeps the last sample recorded in it. The average over a window of N buckets
/// ends at the newest sample and starts at the newest sample in a bucket at least N buckets
/// older than the current one, and divides by the actual time between the two samples — so it
/// is the exact average over that span however irregular the ticks were, and the span is the
/// window rounded to bucket boundaries. Memory is bounded: only the samples in the newest
/// `stable` buckets plus one reference sample before them are kept.
///
/// Any monotone counter works: fed with request counts instead of the demand integral, the
/// average is requests per millisecond.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    granularity_ms: u64,
    /// Buckets in the longest (stable) window; at most `buckets + 1` samples are kept.
    buckets: u64,
    /// Oldest first; strictly increasing bucket indices, non-decreasing integrals.
    samples: VecDeque<Sample>,
}

impl Default for Window {
    /// Knative's defaults: 60 s stable window in 1 s buckets.
    fn default() -> Self {
        Self {
            granularity_ms: DEFAULT_GRANULARITY_MS,
            buckets: DEFAULT_STABLE_WINDOW_MS / DEFAULT_GRANULARITY_MS,
            samples: VecDeque::new(),
        }
    }
}

impl Window {
    /// A window that can answer averages over up to `stable_window_ms` (rounded up to whole
    /// buckets of `granularity_ms`).
    pub fn new(stable_window_ms: u64, granularity_ms: u64) -> Result<Self, WindowError> {
        if granularity_ms == 0 {
            return Err(WindowError::ZeroGranularity);
        }
        if stable_window_ms < granularity_ms {
            return Err(WindowError::ShorterThanBucket {
                window_ms: stable_window_ms,
                granularity_ms,
            });
        }
        let buckets = stable_window_ms.div_ceil(granularity_ms);
        if buckets > MAX_BUCKETS {
            return Err(WindowError::TooManyBuckets {
                window_ms: stable_window_ms,
                granularity_ms,
                buckets,
                max: MAX_BUCKETS,
            });
        }
        Ok(Self {
            granularity_ms,
            buckets,
            samples: VecDeque::new(),
        })
    }

    /// Bucket width in milliseconds.
    pub fn granularity_ms(&self) -> u64 {
        self.granularity_ms
    }

    /// The longest window this can answer, in milliseconds.
    pub fn stable_window_ms(&self) -> u64 {
        self.buckets.saturating_mul(self.granularity_ms)
    }

    /// The retained samples, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    fn bucket_of(&self, at_ms: u64) -> u64 {
        // `granularity_ms > 0` is an invariant of `new` and `decode`; `max(1)` keeps this
        // division total anyway.
        at_ms / self.granularity_ms.max(1)
    }

    /// Records the counter's value at `now_ms`; call it at every tick (irregular ticks are fine).
    ///
    /// A sample older than the newest one is ignored (a worker that lost a compare-and-swap race
    /// retries with the newer state, and its clock reading may predate the winner's). A counter
    /// value below the newest one is raised to it: the counter is monotone, so a smaller value
    /// can only be a stale read.
    pub fn record(&mut self, now_ms: u64, integral_ms: u64) {
        let bucket = self.bucket_of(now_ms);
        let mut sample = Sample {
            at_ms: now_ms,
            integral_ms,
        };
        if let Some(newest) = self.samples.back_mut() {
            if now_ms < newest.at_ms {
                return;
            }
            sample.integral_ms = sample.integral_ms.max(newest.integral_ms);
            if bucket == newest.at_ms / self.granularity_ms.max(1) {
                *newest = sample;
                return;
            }
        }
        self.samples.push_back(sample);
        self.prune(bucket);
    }

    /// Drops samples no window can need: keep exactly one sample at or before the start of the
    /// stable window (the reference), and everything after it.
    fn prune(&mut self, current_bucket: u64) {
        let Some(reference_bucket) = current_bucket.checked_sub(self.buckets) else {
            return;
        };
        while self
            .samples
            .get(1)
            .is_some_and(|second| self.bucket_of(second.at_ms) <= reference_bucket)
        {
            self.samples.pop_front();
        }
    }

    /// Time-weighted average of the counter's rate over the last `window_ms` (rounded up to
    /// whole buckets, at least one, at most the stable window), as seen at `now_ms`.
    ///
    /// - No sample inside the window: 0, as Knative does when nothing was reported for a window.
    /// - The window reaches back before the first retained sample (the gateway just started):
    ///   the average over what is known, from the oldest sample to the newest. Knative's bucket
    ///   averages likewise divide by the buckets seen since the first write, not by the whole
    ///   window; dividing by the whole window would underestimate demand at start by up to 60×
    ///   and scale a cold revision up far too slowly.
    /// - Fewer than two samples in reach: 0, nothing is known about a rate yet.
    pub fn average(&self, now_ms: u64, window_ms: u64) -> f64 {
        let Some(newest) = self.samples.back() else {
            return 0.0;
        };
        let window_buckets = window_ms
            .div_ceil(self.granularity_ms.max(1))
            .clamp(1, self.buckets.max(1));
        let current_bucket = self.bucket_of(now_ms.max(newest.at_ms));
        let Some(reference_bucket) = current_bucket.checked_sub(window_buckets) else {
            // The whole history is inside the window.
            return self.rate_between(self.samples.front(), newest);
        };
        if self.bucket_of(newest.at_ms) <= reference_bucket {
            return 0.0;
        }
        let reference = self
            .samples
            .iter()
            .rev()
            .find(|sample| self.bucket_of(sample.at_ms) <= reference_bucket)
            .or(self.samples.front());
        self.rate_between(reference, newest)
    }

    fn rate_between(&self, from: Option<&Sample>, to: &Sample) -> f64 {
        let Some(from) = from else {
            return 0.0;
        };
        let elapsed_ms = to.at_ms.saturating_sub(from.at_ms);
        if elapsed_ms == 0 {
            return 0.0;
        }
        let area = to.integral_ms.saturating_sub(from.integral_ms);
        area as f64 / elapsed_ms as f64
    }

    /// Compact bytes for shared data: version, kind, granularity, buckets, sample count, the
    /// oldest sample, then each later sample as deltas (a few bytes each at 1 s ticks).
    pub fn encode(&self) -> Vec<u8> {
        let mut encoder = Encoder::new(kind::WINDOW);
        encoder.put_varint(self.granularity_ms);
        encoder.put_varint(self.buckets);
        encoder.put_varint(self.samples.len() as u64);
        let mut previous = Sample {
            at_ms: 0,
            integral_ms: 0,
        };
        for sample in &self.samples {
            // Samples are ordered and the counter monotone, so the deltas are never negative.
            encoder.put_varint(sample.at_ms.saturating_sub(previous.at_ms));
            encoder.put_varint(sample.integral_ms.saturating_sub(previous.integral_ms));
            previous = *sample;
        }
        encoder.finish()
    }

    /// Reads what [`Window::encode`] wrote, checking every invariant `record` maintains.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut decoder = Decoder::new(bytes, kind::WINDOW)?;
        let granularity_ms = decoder.take_varint("window granularity")?;
        if granularity_ms == 0 {
            return Err(DecodeError::Invalid {
                field: "window granularity",
                reason: "must be at least 1 ms",
            });
        }
        let buckets = decoder.take_varint("window buckets")?;
        if buckets == 0 || buckets > MAX_BUCKETS {
            return Err(DecodeError::Invalid {
                field: "window buckets",
                reason: "must be between 1 and MAX_BUCKETS",
            });
        }
        let count = decoder.take_varint("window sample count")?;
        if count > buckets + 1 {
            return Err(DecodeError::Invalid {
                field: "window sample count",
                reason: "more samples than buckets + 1",
            });
        }
        let mut window = Self {
            granularity_ms,
            buckets,
            samples: VecDeque::new(),
        };
        let mut previous: Option<Sample> = None;
        for _ in 0..count {
            let at_delta = decoder.take_varint("window sample time")?;
            let integral_delta = decoder.take_varint("window sample integral")?;
            let (base_at, base_integral) =
                previous.map_or((0, 0), |sample| (sample.at_ms, sample.integral_ms));
            let sample = Sample {
                at_ms: base_at.checked_add(at_delta).ok_or(DecodeError::Overflow {
                    field: "window sample time",
                })?,
                integral_ms: base_integral.checked_add(integral_delta).ok_or(
                    DecodeError::Overflow {
                        field: "window sample integral",
                    },
                )?,
            };
            if let Some(previous) = previous {
                if window.bucket_of(sample.at_ms) <= window.bucket_of(previous.at_ms) {
                    return Err(DecodeError::Invalid {
                        field: "window sample time",
                        reason: "two samples in one bucket or out of order",
                    });
                }
            }
            window.samples.push_back(sample);
            previous = Some(sample);
        }
        decoder.finish()?;
        Ok(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- Demand ----

    #[test]
    fn demand_integrates_a_step_function_exactly() {
        // (time, new level, expected integral at that time before the change)
        let steps: &[(u64, u32, u64)] = &[
            (1_000, 3, 0),
            (1_500, 5, 1_500),    // 3 × 500
            (4_000, 0, 14_000),   // + 5 × 2500
            (10_000, 50, 14_000), // + 0
            (10_001, 49, 14_050), // + 50 × 1
        ];
        let mut demand = Demand::new();
        for &(at, level, expected) in steps {
            assert_eq!(demand.integral_ms(at), expected, "at {at}");
            demand.observe(at, level);
            assert_eq!(demand.level(), level);
            assert_eq!(
                demand.integral_ms(at),
                expected,
                "right after the change at {at}"
            );
        }
        // The open segment counts: 49 × 999 more.
        assert_eq!(demand.integral_ms(11_000), 14_050 + 49 * 999);
    }

    #[test]
    fn demand_never_runs_backwards_on_a_stale_clock() {
        let mut demand = Demand::new();
        demand.observe(1_000, 10);
        demand.observe(2_000, 20); // 10 × 1000 settled
                                   // A worker that read the clock at 1 500 but applies its event after: the new level
                                   // takes effect at 2 000, nothing is subtracted.
        demand.observe(1_500, 30);
        assert_eq!(demand.integral_ms(2_000), 10_000);
        assert_eq!(
            demand.integral_ms(1_000),
            10_000,
            "a past now sees the settled area"
        );
        assert_eq!(demand.integral_ms(3_000), 10_000 + 30 * 1_000);
    }

    #[test]
    fn demand_saturates_instead_of_wrapping() {
        let mut demand = Demand::new();
        demand.observe(0, u32::MAX);
        assert_eq!(demand.integral_ms(u64::MAX), u64::MAX);
        demand.observe(u64::MAX, 1);
        assert_eq!(demand.integral_ms(u64::MAX), u64::MAX);
    }

    #[test]
    fn demand_round_trips_and_rejects_damaged_bytes() {
        let mut demand = Demand::new();
        demand.observe(123_456, 7);
        demand.observe(200_000, 3);
        let bytes = demand.encode();
        assert_eq!(bytes[0], ENCODING_VERSION);
        assert_eq!(Demand::decode(&bytes), Ok(demand));
        for cut in 0..bytes.len() {
            assert!(
                Demand::decode(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            Demand::decode(&longer),
            Err(DecodeError::TrailingBytes { count: 1 })
        );
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        assert_eq!(
            Demand::decode(&wrong_version),
            Err(DecodeError::UnsupportedVersion {
                found: 9,
                expected: ENCODING_VERSION
            })
        );
        assert!(matches!(
            Demand::decode(&Window::default().encode()),
            Err(DecodeError::WrongKind { .. })
        ));
        assert_eq!(Demand::decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn varint_rejects_overlong_values() {
        // Eleven continuation bytes cannot be a u64.
        let mut bytes = vec![ENCODING_VERSION, kind::DEMAND];
        bytes.extend([0xff; 10]);
        bytes.push(0x01);
        assert!(matches!(
            Demand::decode(&bytes),
            Err(DecodeError::Overflow { .. })
        ));
        // Level above u32::MAX.
        let mut encoder = Encoder::new(kind::DEMAND);
        encoder.put_varint(u64::from(u32::MAX) + 1);
        encoder.put_varint(0);
        encoder.put_varint(0);
        assert_eq!(
            Demand::decode(&encoder.finish()),
            Err(DecodeError::Overflow {
                field: "demand level"
            })
        );
        // u64::MAX itself round-trips.
        let mut encoder = Encoder::new(kind::DEMAND);
        encoder.put_varint(1);
        encoder.put_varint(u64::MAX);
        encoder.put_varint(u64::MAX);
        let demand = Demand::decode(&encoder.finish()).unwrap();
        assert_eq!(demand.integral_ms(u64::MAX), u64::MAX);
    }

    // ---- Window ----

    /// Drives a demand step function through a window at a fixed tick, like the filter does.
    fn drive(window: &mut Window, demand: &mut Demand, from_ms: u64, to_ms: u64, tick_ms: u64) {
        let mut now = from_ms;
        while now <= to_ms {
            window.record(now, demand.integral_ms(now));
            now += tick_ms;
        }
    }

    #[test]
    fn window_new_validates_its_arguments() {
        let cases: &[(&str, u64, u64, Result<u64, WindowError>)] = &[
            ("knative defaults", 60_000, 1_000, Ok(60)),
            ("partial bucket rounds up", 60_500, 1_000, Ok(61)),
            ("one bucket", 1_000, 1_000, Ok(1)),
            (
                "zero granularity",
                60_000,
                0,
                Err(WindowError::ZeroGranularity),
            ),
            (
                "window shorter than a bucket",
                500,
                1_000,
                Err(WindowError::ShorterThanBucket {
                    window_ms: 500,
                    granularity_ms: 1_000,
                }),
            ),
            (
                "too many buckets",
                3_600_000,
                1,
                Err(WindowError::TooManyBuckets {
                    window_ms: 3_600_000,
                    granularity_ms: 1,
                    buckets: 3_600_000,
                    max: MAX_BUCKETS,
                }),
            ),
        ];
        for (name, window_ms, granularity_ms, expected) in cases {
            let got = Window::new(*window_ms, *granularity_ms).map(|w| w.buckets);
            assert_eq!(&got, expected, "{name}");
        }
        assert_eq!(Window::default(), Window::new(60_000, 1_000).unwrap());
    }

    #[test]
    fn window_averages_a_constant_demand_exactly() {
        let mut window = Window::default();
        let mut demand = Demand::new();
        demand.observe(0, 50);
        drive(&mut window, &mut demand, 0, 120_000, 1_000);
        assert_eq!(window.average(120_000, 60_000), 50.0);
        assert_eq!(window.average(120_000, 6_000), 50.0);
    }

    #[test]
    fn window_separates_the_panic_window_from_the_stable_window() {
        // Idle for a minute, then 50 concurrent for 6 s: the panic window sees 50, the stable
        // window sees 50 × 6 / 60 = 5.
        let mut window = Window::default();
        let mut demand = Demand::new();
        drive(&mut window, &mut demand, 0, 60_000, 1_000);
        demand.observe(60_000, 50);
        drive(&mut window, &mut demand, 61_000, 66_000, 1_000);
        assert_eq!(window.average(66_000, 6_000), 50.0);
        assert_eq!(window.average(66_000, 60_000), 5.0);
    }

    #[test]
    fn window_averages_over_what_is_known_at_start() {
        // Ten seconds after the first sample, with 50 concurrent all along: the stable average
        // is 50 (over the 10 s known), not 50 × 10 / 60.
        let mut window = Window::default();
        let mut demand = Demand::new();
        demand.observe(5_000, 50);
        drive(&mut window, &mut demand, 5_000, 15_000, 1_000);
        assert_eq!(window.average(15_000, 60_000), 50.0);
        assert_eq!(window.average(15_000, 6_000), 50.0);
    }

    #[test]
    fn window_edges() {
        let mut window = Window::default();
        assert_eq!(window.average(0, 60_000), 0.0, "empty");
        window.record(1_000, 0);
        assert_eq!(
            window.average(1_000, 60_000),
            0.0,
            "a single sample has no rate"
        );
        window.record(2_000, 10_000);
        assert_eq!(window.average(2_000, 60_000), 10.0);
        assert_eq!(
            window.average(2_000, 0),
            10.0,
            "zero window means one bucket"
        );
        // Nothing recorded for longer than the panic window: 0, as in Knative.
        assert_eq!(window.average(9_000, 6_000), 0.0);
        // ...but the stable window still reaches the samples.
        assert_eq!(window.average(9_000, 60_000), 10.0);
    }

    #[test]
    fn window_handles_irregular_ticks() {
        // Ticks from 10 ms to 1 s apart, demand changing between them: the average is still the
        // exact mean over the span between the reference and the newest sample.
        let mut window = Window::default();
        let mut demand = Demand::new();
        let mut now = 0;
        let mut level = 0;
        for gap in [10, 990, 1_000, 250, 250, 500, 30, 970, 1_000, 1_000].repeat(10) {
            now += gap;
            level = (level + 7) % 23;
            demand.observe(now, level);
            window.record(now, demand.integral_ms(now));
        }
        let newest = *window.samples().last().unwrap();
        let reference = window
            .samples()
            .filter(|s| s.at_ms / 1_000 <= now / 1_000 - 6)
            .last()
            .copied()
            .unwrap();
        let expected = (newest.integral_ms - reference.integral_ms) as f64
            / (newest.at_ms - reference.at_ms) as f64;
        assert_eq!(window.average(now, 6_000), expected);
        let span = newest.at_ms - reference.at_ms;
        assert!((5_000..7_000).contains(&span), "span {span}");
    }

    #[test]
    fn window_keeps_one_sample_per_bucket_and_bounded_memory() {
        let mut window = Window::default();
        for at in (0..200_000).step_by(10) {
            window.record(at, at);
            assert!(window.samples.len() as u64 <= window.buckets + 1);
        }
        assert_eq!(window.samples.len(), 61);
        let buckets: Vec<u64> = window.samples().map(|s| s.at_ms / 1_000).collect();
        assert!(buckets.windows(2).all(|pair| pair[0] < pair[1]));
        // The last sample of each bucket is kept.
        assert_eq!(window.samples().last().unwrap().at_ms, 199_990);
    }

    #[test]
    fn window_ignores_stale_and_smaller_samples() {
        let mut window = Window::default();
        window.record(1_000, 100);
        window.record(2_000, 200);
        window.record(1_500, 999); // older than the newest: ignored
        window.record(3_000, 150); // stale integral: raised to 200
        let samples: Vec<Sample> = window.samples().copied().collect();
        assert_eq!(
            samples,
            vec![
                Sample {
                    at_ms: 1_000,
                    integral_ms: 100
                },
                Sample {
                    at_ms: 2_000,
                    integral_ms: 200
                },
                Sample {
                    at_ms: 3_000,
                    integral_ms: 200
                },
            ]
        );
    }

    #[test]
    fn window_round_trips_and_rejects_damaged_bytes() {
        let mut window = Window::new(10_000, 500).unwrap();
        let mut demand = Demand::new();
        demand.observe(0, 42);
        drive(&mut window, &mut demand, 0, 30_000, 333);
        let bytes = window.encode();
        assert_eq!(Window::decode(&bytes), Ok(window.clone()));
        for cut in 0..bytes.len() {
            assert!(
                Window::decode(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
        // Compact: about 5 bytes per sample rather than 16.
        assert!(
            bytes.len() < 8 * window.samples.len(),
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn window_decode_rejects_broken_invariants() {
        let encode = |granularity: u64, buckets: u64, samples: &[(u64, u64)]| {
            let mut encoder = Encoder::new(kind::WINDOW);
            encoder.put_varint(granularity);
            encoder.put_varint(buckets);
            encoder.put_varint(samples.len() as u64);
            for &(at, integral) in samples {
                encoder.put_varint(at);
                encoder.put_varint(integral);
            }
            encoder.finish()
        };
        let cases: &[(&str, Vec<u8>, &str)] = &[
            ("zero granularity", encode(0, 60, &[]), "window granularity"),
            ("zero buckets", encode(1_000, 0, &[]), "window buckets"),
            (
                "too many buckets",
                encode(1_000, MAX_BUCKETS + 1, &[]),
                "window buckets",
            ),
            (
                "too many samples",
                encode(1_000, 1, &[(0, 0), (1_000, 0), (1_000, 0)]),
                "window sample count",
            ),
            (
                "two samples in one bucket",
                encode(1_000, 60, &[(0, 0), (999, 0)]),
                "window sample time",
            ),
        ];
        for (name, bytes, field) in cases {
            match Window::decode(bytes) {
                Err(DecodeError::Invalid { field: got, .. }) => assert_eq!(got, *field, "{name}"),
                other => panic!("{name}: expected Invalid, got {other:?}"),
            }
        }
        assert!(matches!(
            Window::decode(&encode(1_000, 60, &[(u64::MAX, 0), (1, 0)])),
            Err(DecodeError::Overflow { .. })
        ));
    }

    proptest! {
        #[test]
        fn demand_integral_matches_brute_force(
            events in proptest::collection::vec((0u64..5_000, 0u32..1_000), 0..50),
            tail in 0u64..5_000,
        ) {
            let mut demand = Demand::new();
            let mut now = 0u64;
            let mut level = 0u64;
            let mut area = 0u64;
            for (gap, new_level) in events {
                now += gap;
                area += level * gap;
                demand.observe(now, new_level);
                level = u64::from(new_level);
                prop_assert_eq!(demand.integral_ms(now), area);
            }
            prop_assert_eq!(demand.integral_ms(now + tail), area + level * tail);
            prop_assert_eq!(Demand::decode(&demand.encode()), Ok(demand));
        }

        #[test]
        fn window_average_lies_between_the_lowest_and_highest_level(
            steps in proptest::collection::vec((10u64..1_000, 0u32..200), 2..400),
            window_ms in 1u64..70_000,
        ) {
            let mut window = Window::default();
            let mut demand = Demand::new();
            let mut now = 0;
            let (mut lowest, mut highest) = (u32::MAX, 0);
            for (gap, level) in steps {
                demand.observe(now, level);
                lowest = lowest.min(level);
                highest = highest.max(level);
                now += gap;
                window.record(now, demand.integral_ms(now));
                prop_assert!(window.samples.len() as u64 <= window.buckets + 1);
            }
            let average = window.average(now, window_ms);
            prop_assert!(average == 0.0 || average >= f64::from(lowest) - 1e-9, "{average} < {lowest}");
            prop_assert!(average <= f64::from(highest) + 1e-9, "{average} > {highest}");
            prop_assert_eq!(Window::decode(&window.encode()), Ok(window));
        }

        #[test]
        fn window_decode_of_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let _ = Window::decode(&bytes);
            let _ = Demand::decode(&bytes);
            // With a valid header the body is exercised too.
            let mut framed = vec![ENCODING_VERSION, kind::WINDOW];
            framed.extend(&bytes);
            if let Ok(window) = Window::decode(&framed) {
                prop_assert_eq!(Window::decode(&window.encode()), Ok(window.clone()));
                let _ = window.average(u64::MAX, u64::MAX);
                let _ = window.average(0, 0);
            }
            framed[1] = kind::DEMAND;
            let _ = Demand::decode(&framed);
        }
    }
}
