//! What `inflight tune` prints: the progress line, the table with the knee and the
//! recommendation explained, the InferenceService snippet, and the plot (throughput and p99
//! against concurrency, drawn with `inflight up`'s font handling).

use super::knee::{Choice, Knee};
use super::{Step, Stop, Tuning};
use crate::render::isvc::{ANN_TARGET, ANN_UTILIZATION};
use crate::up::plot::{draw_legend, draw_mesh, font, legend_mark};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// The live line of the step being held (redrawn in place with `\r`).
pub fn progress(step: &Step, held: Duration) -> String {
    format!(
        "tune: c={:<4} {:>5.1}s  {:>9.1} req/s ±{:<5}  p50 {:>8.1} ms  p99 {:>8.1} ms  errors {}   ",
        step.concurrency,
        held.as_secs_f64(),
        step.throughput,
        percent_ci(step),
        step.p50_ms,
        step.p99_ms,
        step.errors
    )
}

fn percent_ci(step: &Step) -> String {
    if step.ci95.is_finite() && step.throughput > 0.0 {
        format!("{:.1}%", 100.0 * step.ci95 / step.throughput)
    } else {
        "-".into()
    }
}

/// The table, the knee, the recommendation and the snippet.
pub fn text(t: &Tuning) -> String {
    let mut out = format!(
        "inflight tune {} (knee threshold {} %)\n\n{:>6} {:>10} {:>7} {:>9} {:>9} {:>9} {:>7} {:>8}\n",
        t.url,
        t.threshold_percent,
        "CONC",
        "REQ/S",
        "±95%",
        "P50(ms)",
        "P90(ms)",
        "P99(ms)",
        "ERRORS",
        "HELD(s)"
    );
    if let Some(g) = &t.gateway {
        out.insert_str(
            out.find("\n\n").unwrap_or(0),
            &format!(
                "\nthrough the gateway at {}: CONC is revision {}'s containerConcurrency, set per step in {}; {} clients per unit of capacity ({} ready replica(s))",
                g.admin, g.revision, g.file, g.clients_per_limit, g.ready_replicas
            ),
        );
    }
    let knee_c = t.knee.map(|k| k.concurrency);
    for s in &t.steps {
        let _ = writeln!(
            out,
            "{:>6} {:>10.1} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>8.1}{}",
            s.concurrency,
            s.throughput,
            percent_ci(s),
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.errors,
            s.seconds,
            if knee_c == Some(s.concurrency) {
                "  ← knee"
            } else {
                ""
            }
        );
    }
    out.push('\n');
    out.push_str(&explain(t));
    out
}

/// The knee and the recommendation in words, from the numbers.
fn explain(t: &Tuning) -> String {
    let mut out = String::new();
    let stop = match t.stop {
        Stop::KneeConfirmed => "--past-knee steps beyond the knee measured".to_string(),
        Stop::MaxConcurrency => "highest concurrency (--max-concurrency) measured".to_string(),
        Stop::MaxDuration => "--max-duration reached".to_string(),
        Stop::Latency {
            concurrency,
            p99_ms,
        } => format!("p99 {p99_ms:.1} ms at concurrency {concurrency} passed --max-p99"),
        Stop::Errors { concurrency, rate } => format!(
            "{:.1} % errors at concurrency {concurrency} passed --max-errors",
            rate * 100.0
        ),
    };
    let _ = writeln!(out, "stopped: {stop}");
    let (Some(k), Some(r)) = (t.knee, &t.recommendation) else {
        let _ = writeln!(
            out,
            "no knee: throughput still rose by {} % or more at the last steps (or latency did not grow). \
             Raise --max-concurrency / --max-p99, or check that the server, not the client, is the bottleneck.",
            t.threshold_percent
        );
        return out;
    };
    let at = t.steps.iter().find(|s| s.concurrency == k.concurrency);
    let next = t.steps.iter().find(|s| s.concurrency > k.concurrency);
    let _ = writeln!(
        out,
        "knee: concurrency {} (confidence {:.0} %): {}beyond it throughput changed by at most {:+.1} %{}",
        k.concurrency,
        k.confidence * 100.0,
        k.gain_into
            .map(|g| format!("throughput rose {:.1} % into it; ", g * 100.0))
            .unwrap_or_default(),
        k.gain_beyond * 100.0,
        match (at, next) {
            (Some(a), Some(n)) => format!(
                ", while p90 grew {:.1} → {:.1} ms (c={})",
                a.p90_ms, n.p90_ms, n.concurrency
            ),
            _ => String::new(),
        }
    );
    if k.gain_beyond * 100.0 >= t.threshold_percent {
        let _ = writeln!(
            out,
            "note: further on throughput rose {:.1} % over the knee, more than the threshold: the \
             client's own turnaround left the server idle at the knee (the queue beyond it hides \
             that), or the server gains again at higher concurrency (batching?); read the table",
            k.gain_beyond * 100.0
        );
    }
    let why = match k.choice {
        Choice::Knee => format!(
            "= the knee: the next step changed throughput by {:+.1} %, under half the {} % threshold",
            next_gain(&k, t) * 100.0,
            t.threshold_percent
        ),
        Choice::KneePlusOne => format!(
            "= knee + 1: the next step still gained {:+.1} %, marginal (between half the {} % threshold and the threshold)",
            next_gain(&k, t) * 100.0,
            t.threshold_percent
        ),
    };
    let _ = writeln!(
        out,
        "recommended: containerConcurrency {} ({why})",
        r.container_concurrency
    );
    let _ = writeln!(
        out,
        "             target {} at {} % utilization: the autoscaler adds replicas when they average more than {:.1} requests in flight",
        r.target, r.target_utilization_percentage, r.effective_target
    );
    let _ = write!(out, "\n# paste into the InferenceService:\n{}", r.snippet);
    out
}

fn next_gain(k: &Knee, t: &Tuning) -> f64 {
    let at = t.steps.iter().find(|s| s.concurrency == k.concurrency);
    let next = t.steps.iter().find(|s| s.concurrency > k.concurrency);
    match (at, next) {
        (Some(a), Some(n)) if a.throughput > 0.0 => n.throughput / a.throughput - 1.0,
        _ => 0.0,
    }
}

/// The InferenceService fields: the annotations and `spec.predictor.containerConcurrency`.
pub fn snippet(name: &str, cc: u32, target: u32, utilization: f64) -> String {
    format!(
        "metadata:\n  name: {name}\n  annotations:\n    {ANN_TARGET}: \"{target}\"\n    {ANN_UTILIZATION}: \"{}\"\nspec:\n  predictor:\n    containerConcurrency: {cc}\n",
        crate::render::isvc::fmt_num(utilization)
    )
}

/// Throughput (left axis) and p99 (right axis) against concurrency, the knee marked.
pub fn plot(path: &Path, t: &Tuning) -> Result<()> {
    let text = font();
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let x_max = t
        .steps
        .iter()
        .map(|s| f64::from(s.concurrency))
        .fold(1.0, f64::max)
        * 1.05;
    let y_max = t.steps.iter().map(|s| s.throughput).fold(1.0, f64::max) * 1.15;
    let l_max = t.steps.iter().map(|s| s.p99_ms).fold(1.0, f64::max) * 1.15;
    let mut b = ChartBuilder::on(&root);
    b.margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60);
    if text {
        b.caption(format!("inflight tune: {}", t.url), ("sans-serif", 20));
    }
    let mut chart = b
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| anyhow!("{e}"))?
        .set_secondary_coord(0.0..x_max, 0.0..l_max);
    draw_mesh(&mut chart, text, "concurrency", "requests/s")?;
    if text {
        chart
            .configure_secondary_axes()
            .y_desc("p99 latency (ms)")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    let blue = RGBColor(31, 119, 180);
    let red = RGBColor(214, 39, 40);
    let xs = |f: fn(&Step) -> f64| -> Vec<(f64, f64)> {
        t.steps
            .iter()
            .map(|s| (f64::from(s.concurrency), f(s)))
            .collect()
    };
    let s = chart
        .draw_series(LineSeries::new(xs(|s| s.throughput), blue.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;
    if text {
        s.label("throughput (req/s)")
            .legend(legend_mark(blue.stroke_width(2)));
    }
    chart
        .draw_series(
            xs(|s| s.throughput)
                .into_iter()
                .map(|p| Circle::new(p, 4, blue.filled())),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let s = chart
        .draw_secondary_series(LineSeries::new(xs(|s| s.p99_ms), red.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;
    if text {
        s.label("p99 latency (ms, right axis)")
            .legend(legend_mark(red.stroke_width(2)));
    }
    if let Some(k) = t.knee {
        let x = f64::from(k.concurrency);
        let s = chart
            .draw_series(LineSeries::new(
                [(x, 0.0), (x, y_max)],
                BLACK.mix(0.5).stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        if text {
            s.label(format!(
                "knee: c = {} → containerConcurrency {}",
                k.concurrency, k.container_concurrency
            ))
            .legend(legend_mark(BLACK.mix(0.5).stroke_width(2)));
        }
    }
    if text {
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
