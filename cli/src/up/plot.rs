//! The plot of a run: demand, in-flight, queued and capacity (requests, top panel) and ready /
//! desired replicas (bottom panel) over time, as a PNG. Dashed orange lines in the bottom panel
//! mark when the gateway's queue-aware panic raised the desired count. Text uses a system TrueType font when
//! one is found (DejaVu/Liberation); without one the plot is drawn without text rather than not
//! at all.

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// A line of the plot: legend, colour, value at a point.
type Series = (&'static str, RGBColor, fn(&Point) -> f64);

/// One point of the timeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Point {
    pub t: f64,
    pub demand: f64,
    pub in_flight: f64,
    pub queued: f64,
    pub capacity: f64,
    pub ready: f64,
    pub desired: f64,
    /// Decisions the gateway's queue-aware panic raised so far (a counter).
    pub queue_aware_scale_ups: f64,
}

/// Times at which the queue-aware panic fired: where its counter grew since the previous point.
pub fn queue_aware_times(points: &[Point]) -> Vec<f64> {
    points
        .windows(2)
        .filter(|w| w[1].queue_aware_scale_ups > w[0].queue_aware_scale_ups)
        .map(|w| w[1].t)
        .collect()
}

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a font for plotters once; false if none was found.
pub(crate) fn font() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        for p in FONTS {
            if let Ok(bytes) = std::fs::read(p) {
                // Plotters keeps fonts for the whole process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// A legend entry: a short line in the series' style.
pub(crate) fn legend_mark(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)
}

/// The grid with the axes named, or without a font a bare grid.
pub(crate) fn draw_mesh<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    text: bool,
    x_desc: &str,
    y_desc: &str,
) -> Result<()> {
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(x_desc).y_desc(y_desc);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| anyhow!("{e}"))
}

/// The legend box, drawn the same way on every plot of the CLI.
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

/// Draws `points` of `revision` into a PNG at `path`.
pub fn draw(path: &Path, revision: &str, points: &[Point], markers: &[(f64, &str)]) -> Result<()> {
    let text = font();
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(500);
    let t_max = points.iter().map(|p| p.t).fold(1.0, f64::max);
    let y_max = points
        .iter()
        .map(|p| p.demand.max(p.in_flight).max(p.queued).max(p.capacity))
        .fold(1.0, f64::max)
        * 1.1;
    let r_max = points
        .iter()
        .map(|p| p.ready.max(p.desired))
        .fold(1.0, f64::max)
        + 1.0;

    let series: [Series; 4] = [
        (
            "demand (avg in-flight + queued, 3 s)",
            RGBColor(214, 39, 40),
            |p| p.demand,
        ),
        ("in-flight", RGBColor(31, 119, 180), |p| p.in_flight),
        ("queued", RGBColor(255, 127, 14), |p| p.queued),
        ("capacity (cc x ready)", RGBColor(120, 120, 120), |p| {
            p.capacity
        }),
    ];
    let mut b = ChartBuilder::on(&top);
    b.margin(15).x_label_area_size(30).y_label_area_size(50);
    if text {
        b.caption(
            format!("inflight up --demo: revision {revision}"),
            ("sans-serif", 22),
        );
    }
    let mut chart = b
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| anyhow!("{e}"))?;
    if text {
        chart
            .configure_mesh()
            .y_desc("requests")
            .x_desc("seconds")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(0)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    for (label, color, f) in series {
        let s = chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.t, f(p))),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        if text {
            s.label(label).legend(legend_mark(color.stroke_width(2)));
        }
    }
    for (t, _) in markers {
        chart
            .draw_series(LineSeries::new(
                [(*t, 0.0), (*t, y_max)],
                BLACK.mix(0.3).stroke_width(1),
            ))
            .map_err(|e| anyhow!("{e}"))?;
    }
    if text {
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }

    let mut b = ChartBuilder::on(&bottom);
    b.margin(15).x_label_area_size(30).y_label_area_size(50);
    let mut chart = b
        .build_cartesian_2d(0.0..t_max, 0.0..r_max)
        .map_err(|e| anyhow!("{e}"))?;
    draw_mesh(&mut chart, text, "seconds", "replicas")?;
    let reps: [Series; 2] = [
        ("desired (gateway)", RGBColor(148, 103, 189), |p| p.desired),
        ("ready", RGBColor(44, 160, 44), |p| p.ready),
    ];
    for (label, color, f) in reps {
        // Replica counts are steps, not slopes.
        let mut pts = Vec::with_capacity(points.len() * 2);
        for w in points.windows(2) {
            pts.push((w[0].t, f(&w[0])));
            pts.push((w[1].t, f(&w[0])));
        }
        if let Some(last) = points.last() {
            pts.push((last.t, f(last)));
        }
        let s = chart
            .draw_series(LineSeries::new(pts, color.stroke_width(3)))
            .map_err(|e| anyhow!("{e}"))?;
        if text {
            s.label(label).legend(legend_mark(color.stroke_width(3)));
        }
    }
    let fired = RGBColor(255, 127, 14);
    for (i, t) in queue_aware_times(points).into_iter().enumerate() {
        // A dashed vertical line: short segments, every other one drawn.
        let dashes = (0..20).filter(|k| k % 2 == 0).map(move |k| {
            let y = r_max * f64::from(k) / 20.0;
            PathElement::new(vec![(t, y), (t, y + r_max / 20.0)], fired.stroke_width(2))
        });
        let s = chart.draw_series(dashes).map_err(|e| anyhow!("{e}"))?;
        if text && i == 0 {
            s.label("queue-aware panic fired").legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], fired.stroke_width(2))
            });
        }
    }
    if text {
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        let points: Vec<Point> = (0..40)
            .map(|i| {
                let t = f64::from(i) * 0.5;
                Point {
                    t,
                    demand: if t > 2.0 { 50.0 } else { 0.0 },
                    in_flight: 10.0,
                    queued: 40.0,
                    capacity: 10.0,
                    ready: 1.0,
                    desired: 5.0,
                    queue_aware_scale_ups: if t > 3.0 { 1.0 } else { 0.0 },
                }
            })
            .collect();
        assert_eq!(queue_aware_times(&points), vec![3.5]);
        let path = std::env::temp_dir().join(format!("inflight-plot-{}.png", std::process::id()));
        draw(&path, "torchserve", &points, &[(2.0, "load")]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        assert!(bytes.len() > 5_000, "{} bytes", bytes.len());
        std::fs::remove_file(&path).unwrap();
        assert!(
            draw(Path::new("/nonexistent-dir/x.png"), "a", &points, &[]).is_err(),
            "an unwritable path is an error, not a panic"
        );
    }
}
