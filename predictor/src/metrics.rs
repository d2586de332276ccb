//! Prometheus metrics of one predictor process, rendered in the text exposition format at
//! `GET /metrics`. Hand-rolled on atomics: a handful of series, no registry needed.
//!
//! In-flight counts inference requests only (`:predict` and `/infer`), from the moment the
//! request is routed until its response is ready, so health probes and scrapes do not show up
//! as load. `inflight_predictor_max_in_flight` is the highest value the gauge ever had in this
//! process: the local stack reads it to check that the gateway never let more than the hard
//! limit through to one replica.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a request was, as a metrics label; a fixed set so labels cannot explode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    V1Predict,
    V2Infer,
    Metadata,
    Health,
    Metrics,
    Unknown,
}

impl Route {
    const ALL: [Route; 6] = [
        Route::V1Predict,
        Route::V2Infer,
        Route::Metadata,
        Route::Health,
        Route::Metrics,
        Route::Unknown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Route::V1Predict => "v1_predict",
            Route::V2Infer => "v2_infer",
            Route::Metadata => "metadata",
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Unknown => "unknown",
        }
    }

    pub fn is_inference(self) -> bool {
        matches!(self, Route::V1Predict | Route::V2Infer)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A cumulative histogram with fixed upper bounds; `sum` is kept in integer units
/// (`unit_scale` units per rendered unit) so that it can be an atomic add.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>, // one per bound, plus +Inf
    sum_units: AtomicU64,
    unit_scale: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64], unit_scale: f64) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_units: AtomicU64::new(0),
            unit_scale,
        }
    }

    fn observe(&self, value: f64) {
        let slot = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(count) = self.counts.get(slot) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let units = (value * self.unit_scale).round().max(0.0) as u64;
        self.sum_units.fetch_add(units, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        if let Some(inf) = self.counts.last() {
            cumulative += inf.load(Ordering::Relaxed);
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_units.load(Ordering::Relaxed) as f64 / self.unit_scale;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// All metrics of the process; cheap to share (`Arc`).
pub struct Metrics {
    requests: Mutex<BTreeMap<(Route, u16), u64>>,
    latency: Vec<Histogram>, // indexed by Route::index
    in_flight: AtomicI64,
    max_in_flight: AtomicI64,
    batch_size: Histogram,
    inference_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            latency: Route::ALL
                .iter()
                .map(|_| Histogram::new(LATENCY_BOUNDS, 1e6))
                .collect(),
            in_flight: AtomicI64::new(0),
            max_in_flight: AtomicI64::new(0),
            batch_size: Histogram::new(BATCH_BOUNDS, 1.0),
            inference_seconds: Histogram::new(LATENCY_BOUNDS, 1e6),
        }
    }
}

/// Counts one inference request as in flight until dropped.
pub struct InFlight {
    metrics: Arc<Metrics>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics::default())
    }

    /// Marks an inference request as started; it ends when the guard is dropped.
    pub fn start_inference(self: &Arc<Self>) -> InFlight {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight {
            metrics: Arc::clone(self),
        }
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn max_in_flight(&self) -> i64 {
        self.max_in_flight.load(Ordering::Relaxed)
    }

    pub fn record_request(&self, route: Route, status: u16, elapsed: Duration) {
        if let Ok(mut requests) = self.requests.lock() {
            *requests.entry((route, status)).or_insert(0) += 1;
        }
        if let Some(h) = self.latency.get(route.index()) {
            h.observe(elapsed.as_secs_f64());
        }
    }

    pub fn record_batch(&self, images: usize, elapsed: Duration) {
        self.batch_size.observe(images as f64);
        self.inference_seconds.observe(elapsed.as_secs_f64());
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP inflight_predictor_requests_total HTTP requests answered, by route and status code.\n");
        out.push_str("# TYPE inflight_predictor_requests_total counter\n");
        if let Ok(requests) = self.requests.lock() {
            for ((route, status), count) in requests.iter() {
                let _ = writeln!(
                    out,
                    "inflight_predictor_requests_total{{route=\"{}\",status=\"{status}\"}} {count}",
                    route.label()
                );
            }
        }
        out.push_str("# HELP inflight_predictor_request_duration_seconds Time from routing a request to its response, by route.\n");
        out.push_str("# TYPE inflight_predictor_request_duration_seconds histogram\n");
        for route in Route::ALL {
            if let Some(h) = self.latency.get(route.index()) {
                h.render(
                    &mut out,
                    "inflight_predictor_request_duration_seconds",
                    &format!("route=\"{}\"", route.label()),
                );
            }
        }
        out.push_str(
            "# HELP inflight_predictor_in_flight Inference requests being handled right now.\n",
        );
        out.push_str("# TYPE inflight_predictor_in_flight gauge\n");
        let _ = writeln!(out, "inflight_predictor_in_flight {}", self.in_flight());
        out.push_str("# HELP inflight_predictor_max_in_flight Highest inflight_predictor_in_flight since the process started.\n");
        out.push_str("# TYPE inflight_predictor_max_in_flight gauge\n");
        let _ = writeln!(
            out,
            "inflight_predictor_max_in_flight {}",
            self.max_in_flight()
        );
        out.push_str(
            "# HELP inflight_predictor_batch_size Images per forward pass of the model.\n",
        );
        out.push_str("# TYPE inflight_predictor_batch_size histogram\n");
        self.batch_size
            .render(&mut out, "inflight_predictor_batch_size", "");
        out.push_str("# HELP inflight_predictor_inference_duration_seconds Time of one forward pass of the model.\n");
        out.push_str("# TYPE inflight_predictor_inference_duration_seconds histogram\n");
        self.inference_seconds.render(
            &mut out,
            "inflight_predictor_inference_duration_seconds",
            "",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
    }

    #[test]
    fn in_flight_and_max_follow_guards() {
        let m = Metrics::new();
        let a = m.start_inference();
        let b = m.start_inference();
        assert_eq!((m.in_flight(), m.max_in_flight()), (2, 2));
        drop(a);
        drop(b);
        let _c = m.start_inference();
        assert_eq!((m.in_flight(), m.max_in_flight()), (1, 2));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        m.record_batch(1, Duration::from_micros(100));
        m.record_batch(3, Duration::from_millis(2));
        m.record_batch(1000, Duration::from_secs(60)); // past the last bound: only +Inf
        let text = m.render();
        assert_eq!(
            line(&text, "inflight_predictor_batch_size_bucket{le=\"1\"}"),
            "inflight_predictor_batch_size_bucket{le=\"1\"} 1"
        );
        assert!(
            text.contains("inflight_predictor_batch_size_bucket{le=\"4\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("inflight_predictor_batch_size_bucket{le=\"256\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("inflight_predictor_batch_size_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("inflight_predictor_batch_size_sum 1004\n"),
            "{text}"
        );
        assert!(
            text.contains("inflight_predictor_batch_size_count 3\n"),
            "{text}"
        );
    }

    #[test]
    fn requests_are_counted_by_route_and_status() {
        let m = Metrics::new();
        m.record_request(Route::V1Predict, 200, Duration::from_millis(1));
        m.record_request(Route::V1Predict, 200, Duration::from_millis(1));
        m.record_request(Route::V2Infer, 400, Duration::from_millis(1));
        let text = m.render();
        assert!(text.contains(
            "inflight_predictor_requests_total{route=\"v1_predict\",status=\"200\"} 2\n"
        ));
        assert!(text
            .contains("inflight_predictor_requests_total{route=\"v2_infer\",status=\"400\"} 1\n"));
        assert!(text.contains(
            "inflight_predictor_request_duration_seconds_count{route=\"v1_predict\"} 2\n"
        ));
    }
}
