//! Turns the runs into tables: per setup and concurrency (medians over rounds), the ratios the
//! targets are stated in (paired within a round, then min/median/max over rounds), and the
//! contention view (capped setups: goodput, shed share, queue wait).

use super::load::Load;
use super::Setup;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Queue-wait quantiles (ms) of one run, from the filter's `queue_wait_ms` histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wait {
    pub granted: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Wait {
    /// From the bucket counts before and after a run (`(le, cumulative)`, `+Inf` last).
    /// A sample of `n` ms falls in the bucket `le = n + 0.5`, so a quantile is reported as
    /// the whole number below its bucket's bound (`f64::INFINITY` past the last bound).
    pub fn from_buckets(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<Wait> {
        let delta: Vec<(f64, u64)> = after
            .iter()
            .map(|(le, n)| {
                let was = before.iter().find(|(b, _)| b == le).map_or(0, |(_, c)| *c);
                (*le, n.saturating_sub(was))
            })
            .collect();
        let total = delta.last()?.1;
        if total == 0 {
            return None;
        }
        let q = |p: f64| -> f64 {
            let rank = ((p / 100.0) * total as f64 - 1e-9).ceil().max(1.0) as u64;
            delta
                .iter()
                .find(|(_, n)| *n >= rank)
                .map_or(f64::INFINITY, |(le, _)| le.floor())
        };
        Some(Wait {
            granted: total,
            p50_ms: q(50.0),
            p99_ms: q(99.0),
            p999_ms: q(99.9),
            max_ms: q(100.0),
        })
    }
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub setup: Setup,
    pub concurrency: u32,
    pub round: u32,
    pub load: Load,
    /// Gateway Envoy CPU time (all threads) per response, µs.
    pub cpu_us_per_req: f64,
    pub wait: Option<Wait>,
}

/// Everything the report says besides the numbers.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub command: String,
    pub machine: String,
    pub envoy: String,
    pub generator: String,
    pub revision: String,
    pub duration: String,
    pub rounds: u32,
    pub workers: u32,
    pub cap: u32,
    /// Names of the `--variant` builds.
    pub variants: Vec<String>,
    /// The variants run configured as setup 3's inflight-cap (else as setup 2).
    pub variants_at_cap: bool,
    /// The machine's load when the run started and when it ended.
    pub load_before: Option<MachineLoad>,
    pub load_after: Option<MachineLoad>,
}

/// A machine's 1-minute load average and cores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineLoad {
    pub avg1: f64,
    pub cores: u32,
}

impl MachineLoad {
    /// At most [`crate::bench::QUIET_LOAD_PER_CORE`] per core.
    pub fn quiet(self) -> bool {
        self.avg1 <= crate::bench::QUIET_LOAD_PER_CORE * f64::from(self.cores)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[n - 1],
        })
    }
}

pub struct Report {
    pub meta: Meta,
    pub samples: Vec<Sample>,
}

/// The concurrency at which the targets are stated.
pub const TARGET_CONCURRENCY: u32 = 50;

impl Report {
    fn concurrencies(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self.samples.iter().map(|s| s.concurrency).collect();
        set.into_iter().collect()
    }

    fn setups(&self) -> Vec<Setup> {
        let set: BTreeSet<Setup> = self.samples.iter().map(|s| s.setup).collect();
        set.into_iter().collect()
    }

    fn of(&self, setup: Setup, c: u32) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |s| s.setup == setup && s.concurrency == c)
    }

    fn spread(&self, setup: Setup, c: u32, f: impl Fn(&Sample) -> f64) -> Option<Spread> {
        Spread::of(&self.of(setup, c).map(f).collect::<Vec<_>>())
    }

    /// `f(a) op f(b)` paired by round, over rounds.
    pub fn paired(
        &self,
        a: Setup,
        b: Setup,
        c: u32,
        f: impl Fn(&Sample) -> f64,
        op: impl Fn(f64, f64) -> f64,
    ) -> Option<Spread> {
        let values: Vec<f64> = self
            .of(a, c)
            .filter_map(|x| {
                self.of(b, c)
                    .find(|y| y.round == x.round)
                    .map(|y| op(f(x), f(y)))
            })
            .collect();
        Spread::of(&values)
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.meta;
        let _ = writeln!(out, "Command: `{}`  ", m.command);
        let _ = writeln!(out, "Machine: {}  ", m.machine);
        let _ = writeln!(
            out,
            "Envoy: {} · {} worker(s) in gateway and upstream · load: {} · {} per run · {} round(s), setups alternating · code: {}\n",
            m.envoy, m.workers, m.generator, m.duration, m.rounds, m.revision
        );
        out.push_str(&self.load_line());
        out.push_str(&self.setups_table());
        out.push('\n');
        out.push_str(&self.ratios_table());
        out.push('\n');
        out.push_str(&self.contention_table());
        out.push('\n');
        out.push_str(&self.targets());
        out
    }

    /// The machine's load before and after, and whether the run can be trusted: only the load
    /// before counts (after includes the run's own gateway, upstream and load generator).
    fn load_line(&self) -> String {
        let m = &self.meta;
        let show =
            |l: Option<MachineLoad>| l.map_or("unknown".to_string(), |l| format!("{:.2}", l.avg1));
        let cores = m.load_before.or(m.load_after).map_or(0, |l| l.cores);
        let verdict = if m.load_before.is_some_and(MachineLoad::quiet) {
            "quiet before the run".to_string()
        } else {
            format!(
                "**NOT QUIET before the run (above {:.2} per core): figures inflated, not a run of record**",
                crate::bench::QUIET_LOAD_PER_CORE
            )
        };
        format!(
            "Machine load (1-minute average): {} before, {} after (the run's own load included), on {cores} core(s): {verdict}\n\n",
            show(m.load_before),
            show(m.load_after)
        )
    }

    fn setups_table(&self) -> String {
        let mut out = String::from(
            "### Per setup (median over rounds; req/s as median [min–max])\n\n\
             | c | setup | req/s | non-2xx % | p50 µs | p99 µs | p99.9 µs | gateway CPU µs/req |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|\n",
        );
        for c in self.concurrencies() {
            for setup in self.setups() {
                let Some(rps) = self.spread(setup, c, |s| s.load.rps()) else {
                    continue;
                };
                let med =
                    |f: fn(&Sample) -> f64| self.spread(setup, c, f).map_or(f64::NAN, |s| s.median);
                let _ = writeln!(
                    out,
                    "| {c} | {} | {:.0} [{:.0}–{:.0}] | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} |",
                    setup.label(&super::variant_labels(
                        &self.meta.variants,
                        self.meta.variants_at_cap
                    )),
                    rps.median,
                    rps.min,
                    rps.max,
                    med(|s| 100.0 * s.load.non_2xx as f64 / (s.load.requests.max(1)) as f64),
                    med(|s| s.load.p50_us),
                    med(|s| s.load.p99_us),
                    med(|s| s.load.p999_us),
                    med(|s| s.cpu_us_per_req),
                );
            }
        }
        out
    }

    fn ratios(&self) -> Vec<(String, Vec<Option<Spread>>)> {
        use Setup::*;
        let cs = self.concurrencies();
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let sub = |a: f64, b: f64| a - b;
        let row = |name: &str, a: Setup, b: Setup, f: fn(&Sample) -> f64, diff: bool| {
            (
                name.to_string(),
                cs.iter()
                    .map(|&c| {
                        if diff {
                            self.paired(a, b, c, f, sub)
                        } else {
                            self.paired(a, b, c, f, div)
                        }
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let rps = |s: &Sample| s.load.rps();
        let ok = |s: &Sample| s.load.ok_rps();
        let p50 = |s: &Sample| s.load.p50_us;
        let cpu = |s: &Sample| s.cpu_us_per_req;
        let mut rows = vec![
            row("2/1 inflight / plain, req/s", Inflight, Plain, rps, false),
            row("2−1 inflight − plain, p50 µs", Inflight, Plain, p50, true),
            row(
                "2/4 inflight / empty-wasm, req/s",
                Inflight,
                EmptyWasm,
                rps,
                false,
            ),
            row(
                "2/3 inflight-cap / native-cb, 2xx req/s",
                InflightCap,
                NativeCb,
                ok,
                false,
            ),
            row(
                "2/3 inflight-cap / native-cb, all req/s",
                InflightCap,
                NativeCb,
                rps,
                false,
            ),
            row(
                "4/1 empty-wasm / plain, req/s",
                EmptyWasm,
                Plain,
                rps,
                false,
            ),
            row(
                "4−1 empty-wasm − plain, p50 µs",
                EmptyWasm,
                Plain,
                p50,
                true,
            ),
            row(
                "2−1 inflight − plain, CPU µs/req",
                Inflight,
                Plain,
                cpu,
                true,
            ),
            row(
                "4−1 empty-wasm − plain, CPU µs/req",
                EmptyWasm,
                Plain,
                cpu,
                true,
            ),
            row(
                "2−4 inflight − empty-wasm, CPU µs/req",
                Inflight,
                EmptyWasm,
                cpu,
                true,
            ),
            // What endpoint picking costs over the filter without it (issue 14).
            row(
                "5/2 inflight-pick / inflight, req/s",
                Pick,
                Inflight,
                rps,
                false,
            ),
            row(
                "5−2 inflight-pick − inflight, p50 µs",
                Pick,
                Inflight,
                p50,
                true,
            ),
            row(
                "5−2 inflight-pick − inflight, CPU µs/req",
                Pick,
                Inflight,
                cpu,
                true,
            ),
        ];
        let (base, base_name, mark) = if self.meta.variants_at_cap {
            (InflightCap, "inflight-cap", "3'")
        } else {
            (Inflight, "inflight", "2'")
        };
        let base_no = &mark[..1];
        for (i, name) in self.meta.variants.iter().enumerate() {
            let v = Variant(u8::try_from(i).unwrap_or(u8::MAX));
            rows.push(row(
                &format!("{mark}/{base_no} {name} / {base_name}, req/s"),
                v,
                base,
                rps,
                false,
            ));
            rows.push(row(
                &format!("{mark}−{base_no} {name} − {base_name}, p50 µs"),
                v,
                base,
                p50,
                true,
            ));
            rows.push(row(
                &format!("{mark}−{base_no} {name} − {base_name}, CPU µs/req"),
                v,
                base,
                cpu,
                true,
            ));
            rows.push(row(
                &format!("{mark}−4 {name} − empty-wasm, CPU µs/req"),
                v,
                EmptyWasm,
                cpu,
                true,
            ));
        }
        rows
    }

    fn ratios_table(&self) -> String {
        let cs = self.concurrencies();
        let mut out = String::from(
            "### Ratios and differences (paired within a round; median [min–max] over rounds)\n\n| |",
        );
        for c in &cs {
            let _ = write!(out, " c={c} |");
        }
        out.push_str("\n|---|");
        for _ in &cs {
            out.push_str("---:|");
        }
        out.push('\n');
        for (name, cells) in self.ratios() {
            if cells.iter().all(Option::is_none) {
                continue;
            }
            let diff = name.contains('−');
            let _ = write!(out, "| {name} |");
            for cell in cells {
                match cell {
                    Some(s) if diff => {
                        let _ = write!(out, " {:+.1} [{:+.1}…{:+.1}] |", s.median, s.min, s.max);
                    }
                    Some(s) => {
                        let _ = write!(out, " {:.3} [{:.3}–{:.3}] |", s.median, s.min, s.max);
                    }
                    None => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
        out
    }

    fn contention_table(&self) -> String {
        let mut out = format!(
            "### At the cap ({} in flight): Envoy's circuit breaker sheds, inflight buffers\n\n\
             Queue wait is the filter's `queue_wait_ms` histogram (whole ms; 0 = under 1 ms), \
             median over rounds.\n\n\
             | c | setup | 2xx req/s | shed % | p50 µs | p99 µs | waited | wait p50 ms | wait p99 ms | wait p99.9 ms | wait max ms |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.meta.cap
        );
        let fmt_ms = |v: f64| {
            if v.is_finite() {
                format!("{v:.0}")
            } else if v.is_nan() {
                "–".to_string()
            } else {
                ">30000".to_string()
            }
        };
        for c in self.concurrencies() {
            let mut at_cap = vec![Setup::NativeCb, Setup::InflightCap];
            if self.meta.variants_at_cap {
                at_cap.extend(
                    (0..self.meta.variants.len())
                        .map(|i| Setup::Variant(u8::try_from(i).unwrap_or(u8::MAX))),
                );
            }
            for setup in at_cap {
                let Some(ok) = self.spread(setup, c, |s| s.load.ok_rps()) else {
                    continue;
                };
                let med = |f: &dyn Fn(&Sample) -> f64| {
                    Spread::of(&self.of(setup, c).map(f).collect::<Vec<_>>())
                        .map_or(f64::NAN, |s| s.median)
                };
                let wait = |f: fn(&Wait) -> f64| {
                    let v: Vec<f64> = self
                        .of(setup, c)
                        .filter_map(|s| s.wait.map(|w| f(&w)))
                        .collect();
                    // Spread drops infinities; keep "beyond the last bucket" visible.
                    if v.iter().any(|x| x.is_infinite()) {
                        f64::INFINITY
                    } else {
                        Spread::of(&v).map_or(f64::NAN, |s| s.median)
                    }
                };
                let waited = med(&|s| s.wait.map_or(0.0, |w| w.granted as f64));
                let _ = writeln!(
                    out,
                    "| {c} | {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
                    setup.label(&super::variant_labels(
                        &self.meta.variants,
                        self.meta.variants_at_cap
                    )),
                    ok.median,
                    med(&|s| 100.0 * s.load.non_2xx as f64 / (s.load.requests.max(1)) as f64),
                    med(&|s| s.load.p50_us),
                    med(&|s| s.load.p99_us),
                    waited,
                    fmt_ms(wait(|w| w.p50_ms)),
                    fmt_ms(wait(|w| w.p99_ms)),
                    fmt_ms(wait(|w| w.p999_ms)),
                    fmt_ms(wait(|w| w.max_ms)),
                );
            }
        }
        out
    }

    /// Where the run stands against the targets of issues 8 and 14 (reported, never asserted).
    pub fn targets(&self) -> String {
        use Setup::*;
        let c = TARGET_CONCURRENCY;
        let mut out = format!("### Targets at c={c} (median over rounds)\n\n");
        if !self.concurrencies().contains(&c) {
            out.push_str("(not measured: c=50 was not among the concurrency levels)\n");
            return out;
        }
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let checks: [(&str, Option<Spread>, f64, bool); 5] = [
            (
                "inflight ≥ 0.97 × plain Envoy req/s",
                self.paired(Inflight, Plain, c, |s| s.load.rps(), div),
                0.97,
                true,
            ),
            (
                "inflight adds ≤ 30 µs p50 over plain Envoy",
                self.paired(Inflight, Plain, c, |s| s.load.p50_us, |a, b| a - b),
                30.0,
                false,
            ),
            (
                "inflight ≥ 0.95 × empty wasm filter req/s",
                self.paired(Inflight, EmptyWasm, c, |s| s.load.rps(), div),
                0.95,
                true,
            ),
            (
                "inflight at the cap ≥ 0.9 × native circuit breaker 2xx req/s",
                self.paired(InflightCap, NativeCb, c, |s| s.load.ok_rps(), div),
                0.9,
                true,
            ),
            (
                "endpoint picking adds ≤ 10 µs gateway CPU per request over inflight",
                self.paired(Pick, Inflight, c, |s| s.cpu_us_per_req, |a, b| a - b),
                10.0,
                false,
            ),
        ];
        for (what, spread, target, at_least) in checks {
            let line = match spread {
                Some(s) => {
                    let met = if at_least {
                        s.median >= target
                    } else {
                        s.median <= target
                    };
                    format!(
                        "- {what}: {:.3} → {}\n",
                        s.median,
                        if met { "met" } else { "missed" }
                    )
                }
                None => format!("- {what}: not measured\n"),
            };
            out.push_str(&line);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(setup: Setup, c: u32, round: u32, rps: f64, p50: f64) -> Sample {
        Sample {
            setup,
            concurrency: c,
            round,
            load: Load {
                requests: rps as u64,
                non_2xx: 0,
                errors: 0,
                seconds: 1.0,
                p50_us: p50,
                p90_us: p50 * 1.5,
                p99_us: p50 * 2.0,
                p999_us: p50 * 3.0,
            },
            cpu_us_per_req: 10.0,
            wait: None,
        }
    }

    #[test]
    fn spread_median_min_max() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 2.0]).unwrap().median, 1.5);
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn ratios_are_paired_by_round() {
        let r = Report {
            meta: Meta::default(),
            samples: vec![
                sample(Setup::Plain, 50, 0, 1000.0, 100.0),
                sample(Setup::Inflight, 50, 0, 900.0, 120.0),
                sample(Setup::Plain, 50, 1, 500.0, 100.0),
                sample(Setup::Inflight, 50, 1, 490.0, 110.0),
            ],
        };
        let s = r
            .paired(
                Setup::Inflight,
                Setup::Plain,
                50,
                |s| s.load.rps(),
                |a, b| a / b,
            )
            .unwrap();
        assert!((s.min - 0.9).abs() < 1e-9 && (s.max - 0.98).abs() < 1e-9);
        let md = r.markdown();
        assert!(md.contains("2/1 inflight / plain, req/s"), "{md}");
        assert!(
            md.contains("inflight adds ≤ 30 µs p50 over plain Envoy: 15.000 → met"),
            "{md}"
        );
        assert!(md.contains("empty wasm filter req/s: not measured"), "{md}");
        assert!(
            !md.contains("5−2 inflight-pick"),
            "no rows for setups not run: {md}"
        );
    }

    #[test]
    fn picking_is_compared_with_setup_2_round_by_round() {
        let cpu = |mut s: Sample, us: f64| {
            s.cpu_us_per_req = us;
            s
        };
        let r = Report {
            meta: Meta::default(),
            samples: vec![
                cpu(sample(Setup::Inflight, 50, 0, 1000.0, 100.0), 190.0),
                cpu(sample(Setup::Pick, 50, 0, 980.0, 104.0), 196.0),
                cpu(sample(Setup::Inflight, 50, 1, 900.0, 110.0), 200.0),
                cpu(sample(Setup::Pick, 50, 1, 850.0, 111.0), 212.0),
                cpu(sample(Setup::Inflight, 50, 2, 950.0, 100.0), 180.0),
                cpu(sample(Setup::Pick, 50, 2, 950.0, 106.0), 188.0),
            ],
        };
        let md = r.markdown();
        assert!(
            md.contains("| 5−2 inflight-pick − inflight, CPU µs/req | +8.0 [+6.0…+12.0] |"),
            "{md}"
        );
        assert!(
            md.contains("| 5−2 inflight-pick − inflight, p50 µs | +4.0 [+1.0…+6.0] |"),
            "{md}"
        );
        assert!(md.contains("| 5 inflight-pick |"), "{md}");
        assert!(
            md.contains(
                "endpoint picking adds ≤ 10 µs gateway CPU per request over inflight: 8.000 → met"
            ),
            "{md}"
        );
    }

    #[test]
    fn wait_quantiles_from_bucket_deltas() {
        let before = [(0.5, 10), (1.5, 10), (2.5, 10), (f64::INFINITY, 10)];
        let after = [(0.5, 60), (1.5, 108), (2.5, 110), (f64::INFINITY, 110)];
        let w = Wait::from_buckets(&before, &after).unwrap();
        assert_eq!(w.granted, 100);
        assert_eq!((w.p50_ms, w.p99_ms, w.max_ms), (0.0, 2.0, 2.0));
        assert!(
            Wait::from_buckets(&after, &after).is_none(),
            "no new samples"
        );
        let beyond = [(0.5, 0), (f64::INFINITY, 1)];
        assert_eq!(
            Wait::from_buckets(&[], &beyond).unwrap().max_ms,
            f64::INFINITY
        );
    }

    #[test]
    fn a_run_on_a_loaded_machine_is_flagged_and_a_quiet_one_is_not() {
        let mut r = Report {
            meta: Meta::default(),
            samples: Vec::new(),
        };
        r.meta.load_before = Some(MachineLoad {
            avg1: 0.1,
            cores: 2,
        });
        r.meta.load_after = Some(MachineLoad {
            avg1: 3.4,
            cores: 2,
        });
        let line = r.load_line();
        assert!(
            line.contains("0.10 before, 3.40 after (the run's own load included), on 2 core(s): quiet before the run"),
            "{line}"
        );
        r.meta.load_before = Some(MachineLoad {
            avg1: 2.4,
            cores: 2,
        });
        assert!(r.load_line().contains("NOT QUIET"), "{}", r.load_line());
        r.meta.load_before = None;
        assert!(r.load_line().contains("unknown before"));
        assert!(r.load_line().contains("NOT QUIET"));
    }
}
