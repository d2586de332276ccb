//! The live view: per revision replicas ready/desired, in-flight, queued, shed, requests/s and
//! latency quantiles, from two scrapes of the gateway a few seconds apart; refreshed in place on
//! a terminal (log lines scroll above it), printed as plain lines otherwise.

use super::stats::{quantile, RevisionStats, Snapshot};
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::time::Instant;

/// One revision's row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub revision: String,
    /// Ready replicas as the scaler knows them (None in `top`, which sees only the gateway).
    pub ready: Option<usize>,
    pub gateway_ready: Option<f64>,
    pub desired: Option<f64>,
    pub in_flight: f64,
    pub queued: f64,
    pub capacity: f64,
    pub shed: f64,
    pub rps: f64,
    /// Average concurrency over the window (∫ demand / time), when the gateway exports it.
    pub demand: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub wait_p99_ms: Option<f64>,
    /// Requests waiting per priority class, highest first as far as the default classes go
    /// (empty without a `classHeader`).
    pub queued_by_class: Vec<(String, f64)>,
}

/// A row from the stats `secs` apart.
pub fn row(revision: &str, before: &RevisionStats, now: &RevisionStats, secs: f64) -> Row {
    let secs = secs.max(1e-3);
    let demand = match (before.demand_ms_total, now.demand_ms_total) {
        (Some(b), Some(n)) => Some(((n - b) / 1000.0 / secs).max(0.0)),
        _ => None,
    };
    Row {
        revision: revision.to_string(),
        ready: None,
        gateway_ready: now.ready,
        desired: now.desired,
        in_flight: now.active,
        queued: now.queued,
        capacity: now.capacity,
        shed: now.shed(),
        rps: ((now.decided() - before.decided()) / secs).max(0.0),
        demand,
        p50_ms: quantile(&before.upstream_time, &now.upstream_time, 0.5),
        p99_ms: quantile(&before.upstream_time, &now.upstream_time, 0.99),
        wait_p99_ms: quantile(&before.queue_wait, &now.queue_wait, 0.99),
        queued_by_class: by_priority(&now.queued_by_class),
    }
}

/// Classes in priority order as far as the defaults (`critical`, `standard`, `sheddable`) go,
/// other names after them by name: the gateway's series carry names, not ranks.
fn by_priority(queued: &std::collections::BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let rank = |name: &str| {
        inflight_core::config::DEFAULT_CLASSES
            .iter()
            .position(|c| *c == name)
            .unwrap_or(usize::MAX)
    };
    let mut v: Vec<(String, f64)> = queued.iter().map(|(k, n)| (k.clone(), *n)).collect();
    v.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then_with(|| a.0.cmp(&b.0)));
    v
}

/// Rows for every revision in `now`, in name order.
pub fn rows(before: &Snapshot, now: &Snapshot, secs: f64, names: &[String]) -> Vec<Row> {
    names
        .iter()
        .map(|n| {
            let empty = RevisionStats::default();
            let b = before.revisions.get(n).unwrap_or(&empty);
            let c = now.revisions.get(n).unwrap_or(&empty);
            row(n, b, c, secs)
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// The table, one line per revision under a header.
pub fn render(rows: &[Row]) -> String {
    render_fleet(rows, &[])
}

/// The table of a fleet: each revision's line is the fleet's (in-flight, queued, capacity, shed,
/// demand and rates summed over the gateways, the desired count the highest), and under it one
/// line per gateway with its slice of the capacity (the slots it may use), what it has in flight
/// and queued, and how many requests it forwarded to a peer, then their total. No gateways: the
/// table of one gateway.
pub fn render_fleet(rows: &[Row], gateways: &[(String, Snapshot)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>13} {:>9} {:>7} {:>8} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9}",
        "REVISION",
        "READY/DESIRED",
        "IN-FLIGHT",
        "QUEUED",
        "CAPACITY",
        "SHED",
        "DEMAND",
        "REQ/S",
        "P50(ms)",
        "P99(ms)",
        "WAIT-P99"
    );
    for r in rows {
        let ready = match (r.ready, r.gateway_ready) {
            (Some(n), _) => n.to_string(),
            (None, Some(g)) => format!("{g:.0}"),
            (None, None) => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:>13} {:>9.0} {:>7.0} {:>8.0} {:>7.0} {:>7} {:>8.1} {:>8} {:>8} {:>9}",
            r.revision,
            format!("{ready}/{}", opt(r.desired, 0)),
            r.in_flight,
            r.queued,
            r.capacity,
            r.shed,
            opt(r.demand, 1),
            r.rps,
            opt(r.p50_ms, 1),
            opt(r.p99_ms, 1),
            opt(r.wait_p99_ms, 1),
        );
        if !r.queued_by_class.is_empty() {
            let classes: Vec<String> = r
                .queued_by_class
                .iter()
                .map(|(c, n)| format!("{c} {n:.0}"))
                .collect();
            let _ = writeln!(out, "  queued by class: {}", classes.join(", "));
        }
        if !gateways.is_empty() {
            out.push_str(&gateway_lines(&r.revision, gateways));
        }
    }
    out
}

/// One revision's lines per gateway of a fleet, and their total.
fn gateway_lines(revision: &str, gateways: &[(String, Snapshot)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<21} {:>7} {:>9} {:>7} {:>9} {:>8} {:>6}",
        "GATEWAY", "SLICE", "IN-FLIGHT", "QUEUED", "FORWARDED", "DESIRED", "FLEET"
    );
    let empty = RevisionStats::default();
    let mut total = RevisionStats::default();
    for (name, snap) in gateways {
        let s = snap.revisions.get(revision).unwrap_or(&empty);
        let _ = writeln!(
            out,
            "  {:<21} {:>7.0} {:>9.0} {:>7.0} {:>9.0} {:>8} {:>6}",
            name,
            s.capacity,
            s.active,
            s.queued,
            s.forwarded,
            opt(s.desired, 0),
            opt(snap.fleet_gateways, 0),
        );
        total.capacity += s.capacity;
        total.active += s.active;
        total.queued += s.queued;
        total.forwarded += s.forwarded;
    }
    let _ = writeln!(
        out,
        "  {:<21} {:>7.0} {:>9.0} {:>7.0} {:>9.0}",
        "fleet", total.capacity, total.active, total.queued, total.forwarded
    );
    out
}

/// Terminal output: log lines scroll, the view stays at the bottom, redrawn in place.
pub struct Console {
    tty: bool,
    view_lines: usize,
    started: Instant,
    last_plain: Option<Instant>,
    every_plain: f64,
}

impl Console {
    pub fn new(started: Instant) -> Console {
        Console {
            tty: std::io::stdout().is_terminal(),
            view_lines: 0,
            started,
            last_plain: None,
            every_plain: 5.0,
        }
    }

    /// Off a terminal, print every view (for `top`, whose views are already spaced out).
    pub fn always_redraw(mut self) -> Console {
        self.every_plain = 0.0;
        self
    }

    fn clear_view(&mut self, out: &mut impl std::io::Write) {
        if self.tty && self.view_lines > 0 {
            // Up to the first line of the view, then clear to the end of the screen.
            let _ = write!(out, "\x1b[{}F\x1b[J", self.view_lines);
            self.view_lines = 0;
        }
    }

    /// Prints log lines above the view, stamped with the time since start.
    pub fn log(&mut self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        self.clear_view(&mut out);
        let t = self.started.elapsed().as_secs_f64();
        for l in lines {
            let _ = writeln!(out, "[{t:>6.1}s] {l}");
        }
        let _ = out.flush();
    }

    /// Replaces the view (on a terminal), or prints it every few seconds (otherwise).
    pub fn view(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            self.clear_view(&mut out);
            let _ = write!(out, "{text}");
            self.view_lines = text.lines().count();
        } else if self
            .last_plain
            .is_none_or(|t| t.elapsed().as_secs_f64() >= self.every_plain)
        {
            self.last_plain = Some(Instant::now());
            let t = self.started.elapsed().as_secs_f64();
            let _ = write!(out, "[{t:>6.1}s] view:\n{text}");
        }
        let _ = out.flush();
    }

    /// Leaves the last view on screen; later output starts below it.
    pub fn keep(&mut self) {
        self.view_lines = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_the_window() {
        let before = RevisionStats {
            admitted: 100.0,
            demand_ms_total: Some(0.0),
            ..Default::default()
        };
        let now = RevisionStats {
            admitted: 300.0,
            shed_full: 10.0,
            active: 10.0,
            queued: 40.0,
            desired: Some(5.0),
            demand_ms_total: Some(100_000.0),
            ..Default::default()
        };
        let r = row("torchserve", &before, &now, 2.0);
        assert_eq!(r.rps, 105.0);
        assert_eq!(r.demand, Some(50.0));
        assert_eq!((r.in_flight, r.queued, r.shed), (10.0, 40.0, 10.0));
        assert_eq!(r.p50_ms, None, "no latency observations");
        let text = render(&[r]);
        assert!(text.contains("torchserve"), "{text}");
        assert!(text.contains("-/5"), "{text}");
        assert!(!text.contains("by class"), "no classes, no line: {text}");
    }

    #[test]
    fn queues_by_class_are_listed_in_priority_order() {
        let now = RevisionStats {
            queued: 40.0,
            queued_by_class: [
                ("sheddable", 38.0),
                ("standard", 2.0),
                ("critical", 0.0),
                ("batch", 0.0),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            ..Default::default()
        };
        let text = render(&[row("torchserve", &RevisionStats::default(), &now, 1.0)]);
        assert!(
            text.contains("  queued by class: critical 0, standard 2, sheddable 38, batch 0\n"),
            "{text}"
        );
    }

    #[test]
    fn a_fleet_shows_each_gateways_slice_under_the_fleets_line() {
        let gateway = |capacity: f64, active: f64, forwarded: f64| {
            let r = RevisionStats {
                tracked: true,
                capacity,
                active,
                queued: 1.0,
                forwarded,
                desired: Some(5.0),
                ..Default::default()
            };
            Snapshot {
                revisions: [("torchserve".to_string(), r)].into_iter().collect(),
                fleet_gateways: Some(3.0),
            }
        };
        let gateways = vec![
            ("gateway-0".to_string(), gateway(17.0, 16.0, 120.0)),
            ("gateway-1".to_string(), gateway(17.0, 15.0, 0.0)),
            ("gateway-2".to_string(), gateway(16.0, 16.0, 3.0)),
        ];
        let snaps: Vec<Snapshot> = gateways.iter().map(|(_, s)| s.clone()).collect();
        let fleet = super::super::stats::merge(&snaps);
        let rows = rows(&fleet, &fleet, 1.0, &["torchserve".to_string()]);
        let text = render_fleet(&rows, &gateways);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        assert!(lines[1].starts_with("torchserve"), "{text}");
        assert!(lines[1].contains("-/5"), "the fleet's desired: {text}");
        assert_eq!(
            lines[1].split_whitespace().nth(2),
            Some("47"),
            "in flight summed: {text}"
        );
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["gateway-0", "17", "16", "1", "120", "5", "3"],
            "{text}"
        );
        assert_eq!(
            lines[6].split_whitespace().collect::<Vec<_>>(),
            ["fleet", "50", "47", "3", "123"],
            "{text}"
        );
        assert_eq!(
            render_fleet(&rows, &[]),
            render(&rows),
            "no gateways, no lines"
        );
    }

    #[test]
    fn counter_resets_do_not_go_negative() {
        let before = RevisionStats {
            admitted: 100.0,
            ..Default::default()
        };
        let r = row("a", &before, &RevisionStats::default(), 1.0);
        assert_eq!(r.rps, 0.0);
    }
}
