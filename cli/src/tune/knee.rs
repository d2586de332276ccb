//! The knee of a concurrency sweep, and what to set from it. Pure arithmetic over the measured
//! steps, so every rule is table-tested here and the sweep only measures.
//!
//! The knee is the smallest concurrency beyond which throughput rises by less than a threshold
//! (default 5 %) while latency keeps growing: past it, more requests in flight only queue inside
//! the server. "Beyond" is the next measured step, with some slack for the steps after it: a
//! closed-loop client leaves a server with k workers idle for its own turnaround at
//! concurrency k, so throughput creeps up a little more past the knee while the queue hides
//! those gaps; asking every later step to stay within the threshold would push the knee past
//! k. Later steps may gain up to twice the threshold; more, beyond the noise of the two
//! measurements (95 % sure, from their intervals), means throughput rose again and the candidate
//! was a noisy flat step, not the knee. A later gain that is only noisily above twice the
//! threshold does not move the knee: on a loaded machine a step with a wide interval (a 32 %
//! dip, then a step 10.6 % over a candidate measured ±9 %) would otherwise push the knee of 8
//! workers to 16. Growing latency (p90 up by more than the
//! threshold) also tells the knee from a flat step on the way up, where latency stays put. p90,
//! not p50: one step past a knee of k workers (1.5 k clients) a third of the requests wait a
//! whole service time, which moves p90 and leaves the median where it was.
//! The largest later gain is reported beside it. Its confidence is how sure the measurements
//! are of both sides of the statement, from each step's confidence interval of throughput
//! (normal approximation).

use serde::Serialize;

/// One measured step of the sweep, as the knee needs it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub concurrency: u32,
    /// Mean requests/s.
    pub throughput: f64,
    /// Half-width of the 95 % confidence interval of `throughput`, requests/s.
    pub ci95: f64,
    /// 90th percentile latency, ms.
    pub p90_ms: f64,
}

/// Why the recommendation is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Choice {
    /// containerConcurrency = knee: the next step gained less than half the threshold.
    Knee,
    /// containerConcurrency = knee + 1: the next step still gained between half the threshold
    /// and the threshold — marginal, so one more slot is worth its latency.
    KneePlusOne,
}

/// The knee and the limits recommended from it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Knee {
    /// Concurrency at the knee.
    pub concurrency: u32,
    /// Relative throughput gain from the step before the knee to the knee (None at c = 1).
    pub gain_into: Option<f64>,
    /// Largest relative throughput gain of any later step over the knee (above the threshold
    /// when throughput rose again further on, e.g. a batching server: worth a look).
    pub gain_beyond: f64,
    /// 0..1: probability, under the measured intervals, that the gain into the knee is above the
    /// threshold and the gain beyond it below.
    pub confidence: f64,
    pub choice: Choice,
    /// The recommended `containerConcurrency`.
    pub container_concurrency: u32,
}

/// Finds the knee of `points` (sorted by concurrency) for a relative `threshold` (0.05 = 5 %).
/// None when no step is followed by one that gains less than the threshold with latency up by
/// more than it: the sweep did not reach the knee (raise its bound).
pub fn find(points: &[Point], threshold: f64) -> Option<Knee> {
    let i = (0..points.len()).find(|&i| is_knee(points, i, threshold))?;
    let at = points[i];
    let next = points[i + 1];
    let gain_beyond = points[i + 1..]
        .iter()
        .map(|p| gain(at.throughput, p.throughput))
        .fold(f64::NEG_INFINITY, f64::max);
    let gain_into = i
        .checked_sub(1)
        .map(|p| gain(points[p].throughput, at.throughput));
    // Into: the step before is clearly below (gain above the threshold). Beyond: the next step
    // is clearly flat (gain below the threshold). Both must hold, so the weaker one counts.
    let p_into = i
        .checked_sub(1)
        .map_or(1.0, |p| prob_gain_above(points[p], at, threshold));
    let p_beyond = 1.0 - prob_gain_above(at, next, threshold);
    let choice = if gain(at.throughput, next.throughput) >= threshold / 2.0 {
        Choice::KneePlusOne
    } else {
        Choice::Knee
    };
    Some(Knee {
        concurrency: at.concurrency,
        gain_into,
        gain_beyond,
        confidence: p_into.min(p_beyond),
        choice,
        container_concurrency: match choice {
            Choice::Knee => at.concurrency,
            Choice::KneePlusOne => at.concurrency + 1,
        },
    })
}

/// Step `i` is the knee candidate: the next step gains less than the threshold in throughput
/// and more than it in p90 latency, and no later step [rises again](rises_again).
fn is_knee(points: &[Point], i: usize, threshold: f64) -> bool {
    let at = points[i];
    let Some(next) = points.get(i + 1) else {
        return false;
    };
    at.throughput > 0.0
        && gain(at.throughput, next.throughput) < threshold
        && next.p90_ms > at.p90_ms * (1.0 + threshold)
        && !points[i + 1..]
            .iter()
            .any(|&p| rises_again(at, p, threshold))
}

/// How sure a later step's gain over a candidate must be to be above twice the threshold before
/// it rules the candidate out.
const RISE_CONFIDENCE: f64 = 0.95;

/// `later` gained more than twice the threshold over the candidate `at`, and its intervals say
/// so with [`RISE_CONFIDENCE`]: throughput really rose again, the candidate was not the knee.
fn rises_again(at: Point, later: Point, threshold: f64) -> bool {
    gain(at.throughput, later.throughput) >= 2.0 * threshold
        && prob_gain_above(at, later, 2.0 * threshold) >= RISE_CONFIDENCE
}

fn gain(from: f64, to: f64) -> f64 {
    if from > 0.0 {
        to / from - 1.0
    } else {
        f64::INFINITY
    }
}

/// P(to / from − 1 > threshold) with each mean normal, standard error = ci95 / 1.96; the ratio's
/// relative error is the root sum of squares of the two relative errors (delta method).
fn prob_gain_above(from: Point, to: Point, threshold: f64) -> f64 {
    if from.throughput <= 0.0 || to.throughput <= 0.0 {
        return 0.5;
    }
    let rel = |p: Point| p.ci95 / 1.96 / p.throughput;
    let ratio = to.throughput / from.throughput;
    let se = ratio * (rel(from).powi(2) + rel(to).powi(2)).sqrt();
    let margin = ratio - (1.0 + threshold);
    if se <= 0.0 {
        return if margin > 0.0 { 1.0 } else { 0.0 };
    }
    normal_cdf(margin / se)
}

/// Φ(x), from the Abramowitz–Stegun 7.1.26 approximation of erf (error < 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    0.5 * (1.0 + if z >= 0.0 { erf } else { -erf })
}

/// Knative's soft target for a limit: `target` = containerConcurrency, and the autoscaler aims
/// at `target × utilization` per replica (70 % by default: 7 of 10).
pub fn effective_target(container_concurrency: u32, utilization_percent: f64) -> f64 {
    f64::from(container_concurrency) * utilization_percent / 100.0
}

/// Half-width of the 95 % confidence interval of the mean of `samples` (Student's t), or None
/// with fewer than two samples.
pub fn ci95(samples: &[f64]) -> Option<f64> {
    let n = samples.len();
    if n < 2 {
        return None;
    }
    let mean = samples.iter().sum::<f64>() / n as f64;
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some(t95(n - 1) * (var / n as f64).sqrt())
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    match df {
        0 => f64::INFINITY,
        1..=10 => T[df - 1],
        11..=20 => 2.16,
        21..=30 => 2.06,
        _ => 1.96,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points from (c, req/s, p90 ms) with a ±1 % interval.
    fn sweep(steps: &[(u32, f64, f64)]) -> Vec<Point> {
        steps
            .iter()
            .map(|&(c, x, l)| Point {
                concurrency: c,
                throughput: x,
                ci95: x * 0.01,
                p90_ms: l,
            })
            .collect()
    }

    /// (name, steps as (c, req/s, p90 ms), expected (knee, containerConcurrency)).
    type Case = (&'static str, &'static [(u32, f64, f64)], Option<(u32, u32)>);

    #[test]
    fn knee_table() {
        let cases: &[Case] = &[
            (
                "k=2 workers, 20 ms: flat from 2",
                &[
                    (1, 50.0, 20.0),
                    (2, 100.0, 20.0),
                    (3, 100.0, 30.0),
                    (4, 99.0, 40.0),
                ],
                Some((2, 2)),
            ),
            (
                "k=8 workers: knee at 8 with steps 6, 8, 12, 16",
                &[
                    (1, 50.0, 20.0),
                    (2, 100.0, 20.0),
                    (3, 150.0, 20.0),
                    (4, 200.0, 20.0),
                    (6, 300.0, 20.0),
                    (8, 398.0, 20.0),
                    (12, 401.0, 30.0),
                    (16, 400.0, 40.0),
                ],
                Some((8, 8)),
            ),
            (
                "marginal gain at the next step → knee + 1",
                &[
                    (1, 100.0, 10.0),
                    (2, 180.0, 11.0),
                    (3, 186.0, 16.0),
                    (4, 187.0, 21.0),
                ],
                Some((2, 3)),
            ),
            (
                "still rising at the last step: no knee",
                &[(1, 50.0, 20.0), (2, 100.0, 20.0), (3, 150.0, 20.0)],
                None,
            ),
            (
                "flat but latency not growing (client-bound): no knee",
                &[(1, 50.0, 20.0), (2, 51.0, 20.0), (3, 51.0, 20.0)],
                None,
            ),
            (
                "creeping past the knee (closed-loop gaps filled by the queue) keeps it",
                &[
                    (1, 18.5, 52.1),
                    (2, 36.2, 51.2),
                    (3, 36.2, 54.8),
                    (4, 38.5, 100.8),
                ],
                Some((2, 2)),
            ),
            (
                "a later rise of twice the threshold: the flat step was noise",
                &[(1, 949.6, 0.7), (2, 984.0, 1.6), (3, 1365.7, 0.9)],
                None,
            ),
            (
                "creep of more than twice the threshold moves the knee on",
                &[
                    (1, 40.0, 21.0),
                    (2, 81.0, 20.8),
                    (3, 82.2, 28.8),
                    (4, 90.8, 40.6),
                    (6, 94.0, 60.8),
                ],
                Some((4, 5)),
            ),
            (
                "a flat step where latency stays put is noise, not the knee",
                &[
                    (1, 50.0, 20.0),
                    (2, 51.0, 20.5),
                    (3, 100.0, 20.0),
                    (4, 102.0, 27.0),
                ],
                Some((3, 3)),
            ),
            (
                "latency growing less than the threshold: no knee",
                &[(1, 50.0, 20.0), (2, 50.5, 20.9)],
                None,
            ),
            (
                "knee at the first step",
                &[(1, 100.0, 10.0), (2, 101.0, 20.0)],
                Some((1, 1)),
            ),
            ("a single step: no knee", &[(1, 100.0, 10.0)], None),
            ("nothing measured: no knee", &[], None),
            (
                "zero throughput is never a knee",
                &[(1, 0.0, 10.0), (2, 0.0, 20.0)],
                None,
            ),
        ];
        for (name, steps, want) in cases {
            let got = find(&sweep(steps), 0.05).map(|k| (k.concurrency, k.container_concurrency));
            assert_eq!(got, *want, "{name}");
        }
    }

    /// (name, steps as (c, req/s, ci95 as % of req/s, p90 ms), expected (knee, cc)).
    type CiCase = (
        &'static str,
        &'static [(u32, f64, f64, f64)],
        Option<(u32, u32)>,
    );

    /// The later-rise rule against each step's own interval.
    #[test]
    fn knee_table_with_intervals() {
        let cases: &[CiCase] = &[
            (
                "k=8 on a loaded machine: a noisy dip at 12, then 16 only noisily over 8 + 10 %",
                &[
                    (6, 98.5, 12.1, 73.9),
                    (8, 135.4, 9.0, 69.3),
                    (12, 114.9, 32.4, 118.2),
                    (16, 149.7, 3.5, 106.4),
                    (24, 147.2, 9.0, 225.7),
                ],
                Some((8, 8)),
            ),
            (
                "the same dip, but a rise past it measured narrowly: the knee moves on",
                &[
                    (6, 98.5, 1.0, 73.9),
                    (8, 135.4, 1.0, 69.3),
                    (12, 114.9, 1.0, 118.2),
                    (16, 152.0, 1.0, 106.4),
                    (24, 147.2, 1.0, 225.7),
                ],
                Some((16, 16)),
            ),
            (
                "a large rise is a rise even through wide intervals",
                &[
                    (1, 50.0, 10.0, 20.0),
                    (2, 51.0, 10.0, 30.0),
                    (3, 150.0, 10.0, 20.0),
                    (4, 151.0, 10.0, 30.0),
                ],
                Some((3, 3)),
            ),
        ];
        for (name, steps, want) in cases {
            let points: Vec<Point> = steps
                .iter()
                .map(|&(c, x, ci, l)| Point {
                    concurrency: c,
                    throughput: x,
                    ci95: x * ci / 100.0,
                    p90_ms: l,
                })
                .collect();
            let got = find(&points, 0.05).map(|k| (k.concurrency, k.container_concurrency));
            assert_eq!(got, *want, "{name}");
        }
    }

    #[test]
    fn gains_and_choice_are_reported() {
        let k = find(
            &sweep(&[
                (1, 100.0, 10.0),
                (2, 180.0, 11.0),
                (3, 186.0, 16.0),
                (4, 187.0, 21.0),
            ]),
            0.05,
        )
        .unwrap();
        assert_eq!(k.choice, Choice::KneePlusOne);
        assert!((k.gain_into.unwrap() - 0.8).abs() < 1e-9);
        assert!((k.gain_beyond - (187.0 / 180.0 - 1.0)).abs() < 1e-9);
        let k = find(&sweep(&[(1, 100.0, 10.0), (2, 101.0, 20.0)]), 0.05).unwrap();
        assert_eq!((k.choice, k.gain_into), (Choice::Knee, None));
    }

    #[test]
    fn confidence_follows_the_intervals() {
        let with_ci = |ci: f64| {
            let pts: Vec<Point> = [(1, 100.0, 10.0), (2, 190.0, 10.0), (3, 193.0, 15.0)]
                .iter()
                .map(|&(c, x, l)| Point {
                    concurrency: c,
                    throughput: x,
                    ci95: x * ci,
                    p90_ms: l,
                })
                .collect();
            find(&pts, 0.05).unwrap().confidence
        };
        // Gain beyond is 1.6 %, 3.4 points under the threshold.
        let tight = with_ci(0.005);
        let loose = with_ci(0.03);
        let wide = with_ci(0.2);
        assert!(tight > 0.99, "tight {tight}");
        assert!(loose > 0.8 && loose < tight, "loose {loose}");
        assert!(wide < 0.7, "wide {wide}");
        // Exact intervals: certainty either way.
        let exact = find(
            &[
                Point {
                    concurrency: 1,
                    throughput: 50.0,
                    ci95: 0.0,
                    p90_ms: 1.0,
                },
                Point {
                    concurrency: 2,
                    throughput: 50.0,
                    ci95: 0.0,
                    p90_ms: 2.0,
                },
            ],
            0.05,
        )
        .unwrap();
        assert_eq!(exact.confidence, 1.0);
    }

    #[test]
    fn normal_cdf_matches_the_table() {
        let cases = [
            (0.0, 0.5),
            (1.0, 0.841_345),
            (1.96, 0.975_002),
            (-1.645, 0.049_985),
        ];
        for (x, want) in cases {
            assert!(
                (normal_cdf(x) - want).abs() < 1e-5,
                "Φ({x}) = {}",
                normal_cdf(x)
            );
        }
    }

    #[test]
    fn ci95_of_samples() {
        assert_eq!(ci95(&[]), None);
        assert_eq!(ci95(&[5.0]), None, "one sample has no interval");
        assert_eq!(ci95(&[3.0, 3.0, 3.0]), Some(0.0));
        // mean 2, s = 1, n = 3: t(2) × 1/√3.
        let h = ci95(&[1.0, 2.0, 3.0]).unwrap();
        assert!((h - 4.303 / 3f64.sqrt()).abs() < 1e-9, "{h}");
        assert_eq!(t95(100), 1.96);
    }

    #[test]
    fn effective_target_is_cc_times_utilization() {
        assert_eq!(effective_target(10, 70.0), 7.0);
        assert_eq!(effective_target(8, 100.0), 8.0);
        assert_eq!(effective_target(0, 70.0), 0.0);
    }
}
