//! `inflight tune`: find a model server's knee and recommend `containerConcurrency` and
//! `autoscaling.knative.dev/target` from measurements instead of guesswork.
//!
//! The sweep drives the server closed-loop with the benchmark's load generator (wrk or hey,
//! [`crate::bench::load`]) at concurrency 1, 2, 3, 4, 6, 8, 12, 16, 24, … and holds each step
//! in windows until the 95 % confidence interval of throughput is within `--precision` of its
//! mean (between `--min-hold` and `--max-hold`). It stops at the bound (`--max-concurrency`,
//! `--max-duration`), at the first step whose errors pass `--max-errors` or whose p99 passes
//! `--max-p99`, or once `--past-knee` steps beyond a knee are measured. The knee and the
//! recommendation are pure arithmetic over the steps ([`knee`]); the output is a table, a PNG,
//! the InferenceService snippet, or `--json`.

mod apply;
mod knee;
mod report;

use crate::bench::load::{Generator, Load, LoadTool, Target};
use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The model server to load, e.g. http://127.0.0.1:8080/v1/models/mnist:predict: one
    /// replica, directly (not through a gateway that limits it).
    #[arg(long)]
    pub url: String,
    /// POST this file's bytes as `application/json` (as hey's and curl's `-D`); without it, GET.
    #[arg(short = 'D', long = "data", value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// `Host` header [default: the URL's].
    #[arg(long)]
    pub host: Option<String>,
    /// Highest concurrency to try.
    #[arg(long, default_value_t = 64)]
    pub max_concurrency: u32,
    /// Longest the whole sweep may run; it stops after the step that passes it.
    #[arg(long, default_value = "5m")]
    pub max_duration: String,
    /// Knee threshold, %: at the step after the knee throughput rises by less than this (and
    /// p90 latency by more).
    #[arg(long, default_value_t = 5.0)]
    pub threshold: f64,
    /// Hold a step until the 95 % confidence interval of its throughput is within this many %
    /// of the mean.
    #[arg(long, default_value_t = 3.0)]
    pub precision: f64,
    /// Length of one measured window [default: 1s; wrk counts whole seconds].
    #[arg(long)]
    pub window: Option<String>,
    /// Shortest hold of a step.
    #[arg(long, default_value = "3s")]
    pub min_hold: String,
    /// Longest hold of a step (if the interval never narrows enough).
    #[arg(long, default_value = "15s")]
    pub max_hold: String,
    /// Stop after the first step whose p99 latency passes this.
    #[arg(long, default_value = "10s")]
    pub max_p99: String,
    /// Stop after the first step with more than this % of errors (non-2xx, socket errors).
    #[arg(long, default_value_t = 1.0)]
    pub max_errors: f64,
    /// Steps to measure beyond the knee before stopping (for the table and the plot; the step
    /// right after the knee decides it).
    #[arg(long, default_value_t = 2)]
    pub past_knee: u32,
    /// Knative's target utilization, % (its default: 70): the autoscaler aims at
    /// target × utilization requests per replica.
    #[arg(long, default_value_t = 70.0)]
    pub utilization: f64,
    /// InferenceService name in the printed snippet.
    #[arg(long, default_value = "my-model")]
    pub name: String,
    /// Where to save the plot (throughput and p99 against concurrency, the knee marked).
    #[arg(long, default_value = "inflight-tune.png")]
    pub plot: PathBuf,
    /// Print the result as JSON (steps, knee, recommendation) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Load generator.
    #[arg(long, value_enum, default_value_t = LoadTool::Auto)]
    pub load: LoadTool,
    /// Write the recommendation (containerConcurrency, target, utilization) into the running
    /// gateway at --admin for --revision: its listener file (file-based LDS, as `inflight up`
    /// runs Envoy), which Envoy reloads without a restart; waits for the capacity gauge.
    #[arg(long, requires_all = ["admin", "revision"])]
    pub apply: bool,
    /// Admin address (HOST:PORT) of the gateway for --apply (`inflight up` prints it).
    #[arg(long)]
    pub admin: Option<std::net::SocketAddr>,
    /// The gateway's revision to --apply to.
    #[arg(long)]
    pub revision: Option<String>,
}

/// The resolved limits of a sweep.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    levels: Vec<u32>,
    max_duration: Duration,
    threshold: f64,
    precision: f64,
    window: Duration,
    min_hold: Duration,
    max_hold: Duration,
    max_p99_ms: f64,
    max_errors: f64,
    past_knee: u32,
}

impl Plan {
    fn from(args: &Args) -> Result<Plan> {
        let ms = crate::bench::duration_flag;
        if args.max_concurrency == 0 {
            bail!("--max-concurrency must be at least 1");
        }
        for (v, what) in [
            (args.threshold, "threshold"),
            (args.precision, "precision"),
            (args.max_errors, "max-errors"),
        ] {
            if !(v > 0.0 && v < 100.0) {
                bail!("--{what} {v}: a percentage between 0 and 100, e.g. 5");
            }
        }
        if !(args.utilization > 0.0 && args.utilization <= 100.0) {
            bail!(
                "--utilization {}: a percentage in (0, 100], Knative's default is 70",
                args.utilization
            );
        }
        let plan = Plan {
            levels: levels(args.max_concurrency),
            max_duration: ms(&args.max_duration, "max-duration")?,
            threshold: args.threshold / 100.0,
            precision: args.precision / 100.0,
            window: ms(args.window.as_deref().unwrap_or("1s"), "window")?,
            min_hold: ms(&args.min_hold, "min-hold")?,
            max_hold: ms(&args.max_hold, "max-hold")?,
            max_p99_ms: ms(&args.max_p99, "max-p99")?.as_secs_f64() * 1e3,
            max_errors: args.max_errors / 100.0,
            past_knee: args.past_knee.max(1),
        };
        if plan.window.is_zero() || plan.max_hold < plan.min_hold || plan.max_hold.is_zero() {
            bail!("--window must be above 0 and --max-hold at least --min-hold (and above 0)");
        }
        Ok(plan)
    }
}

/// 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, … (powers of two and one and a half times them) up to
/// `max`, which is always the last level.
fn levels(max: u32) -> Vec<u32> {
    let mut out = vec![1, 2, 3];
    let mut p = 4u32;
    while p <= max {
        out.push(p);
        out.push(p.saturating_add(p / 2));
        let Some(next) = p.checked_mul(2) else {
            break;
        };
        p = next;
    }
    out.retain(|&c| c <= max);
    if out.last() != Some(&max) {
        out.push(max);
    }
    out
}

/// One held step of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub concurrency: u32,
    pub requests: u64,
    /// Non-2xx answers and socket errors.
    pub errors: u64,
    /// Seconds of load measured.
    pub seconds: f64,
    /// Successful answers per second.
    pub throughput: f64,
    /// Half-width of the 95 % interval of throughput over the windows.
    pub ci95: f64,
    pub windows: u32,
    /// Latency percentiles, ms: each window's, weighted by its requests (the generators report
    /// percentiles per run, not every latency).
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

impl Step {
    fn error_rate(&self) -> f64 {
        self.errors as f64 / self.requests.max(1) as f64
    }

    fn point(&self) -> knee::Point {
        knee::Point {
            concurrency: self.concurrency,
            throughput: self.throughput,
            ci95: self.ci95,
            p90_ms: self.p90_ms,
        }
    }

    /// Folds the windows of one step.
    fn of(concurrency: u32, windows: &[Load]) -> Step {
        let requests: u64 = windows.iter().map(|l| l.requests).sum();
        let ok: u64 = windows
            .iter()
            .map(|l| l.requests.saturating_sub(l.non_2xx))
            .sum();
        let errors = windows.iter().map(|l| l.non_2xx + l.errors).sum();
        let seconds: f64 = windows.iter().map(|l| l.seconds).sum();
        let rates: Vec<f64> = windows.iter().map(Load::ok_rps).collect();
        let weighted = |f: fn(&Load) -> f64| {
            windows
                .iter()
                .map(|l| f(l) * l.requests as f64)
                .sum::<f64>()
                / requests.max(1) as f64
                / 1e3
        };
        Step {
            concurrency,
            requests,
            errors,
            seconds,
            throughput: if seconds > 0.0 {
                ok as f64 / seconds
            } else {
                0.0
            },
            ci95: knee::ci95(&rates).unwrap_or(f64::INFINITY),
            windows: u32::try_from(windows.len()).unwrap_or(u32::MAX),
            p50_ms: weighted(|l| l.p50_us),
            p90_ms: weighted(|l| l.p90_us),
            p99_ms: weighted(|l| l.p99_us),
        }
    }
}

/// Why the sweep ended.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "reason")]
pub enum Stop {
    /// `--past-knee` steps beyond the knee were measured.
    KneeConfirmed,
    /// The highest level (`--max-concurrency`) was measured.
    MaxConcurrency,
    /// `--max-duration` passed.
    MaxDuration,
    /// A step's p99 passed `--max-p99`.
    Latency { concurrency: u32, p99_ms: f64 },
    /// A step's errors passed `--max-errors`.
    Errors { concurrency: u32, rate: f64 },
}

/// The outcome of `inflight tune`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tuning {
    pub url: String,
    pub steps: Vec<Step>,
    pub stop: Stop,
    pub threshold_percent: f64,
    pub knee: Option<knee::Knee>,
    pub recommendation: Option<Recommendation>,
}

/// What to set on the InferenceService.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    pub container_concurrency: u32,
    /// `autoscaling.knative.dev/target`: the limit itself; the utilization keeps the autoscaler
    /// ahead of it.
    pub target: u32,
    pub target_utilization_percentage: f64,
    /// target × utilization: the in-flight requests per replica the autoscaler aims at.
    pub effective_target: f64,
    /// The InferenceService fields to paste.
    pub snippet: String,
}

pub fn run(args: Args) -> Result<()> {
    if let (true, Some(admin), Some(revision)) = (args.apply, args.admin, &args.revision) {
        let lds = apply::preflight(admin, revision)?;
        eprintln!("tune: will apply to {revision} in {}", lds.display());
    }
    let tuning = sweep(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tuning)?);
    } else {
        print!("{}", report::text(&tuning));
    }
    match report::plot(&args.plot, &tuning) {
        Ok(()) => eprintln!("tune: plot written to {}", args.plot.display()),
        Err(e) => eprintln!("tune: no plot ({}): {e:#}", args.plot.display()),
    }
    if let (true, Some(admin), Some(revision)) = (args.apply, args.admin, &args.revision) {
        let Some(rec) = &tuning.recommendation else {
            bail!("--apply: no knee, so nothing to apply (the gateway is unchanged)");
        };
        let done = apply::apply(admin, revision, rec)?;
        eprintln!(
            "tune: applied to {revision}: containerConcurrency {} → {} in {}; capacity gauge {} after {} ms ({} ms after Envoy took the listener)",
            done.from,
            done.to,
            done.lds.display(),
            done.capacity,
            done.after.as_millis(),
            done.after_accepted.as_millis()
        );
    }
    Ok(())
}

/// Runs the sweep and finds the knee.
fn sweep(args: &Args) -> Result<Tuning> {
    let plan = Plan::from(args)?;
    let target = target(args)?;
    let generator = Generator::find(args.load)?;
    let window = plan.window.max(generator.min_duration());
    let scratch = std::env::temp_dir().join(format!("inflight-tune-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let started = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let mut stop = Stop::MaxConcurrency;
    for &c in &plan.levels {
        let step = hold(&generator, &target, c, window, &plan, &scratch);
        let step = match step {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&scratch);
                return Err(e.context(format!("measuring concurrency {c} on {}", target.url)));
            }
        };
        steps.push(step);
        if step.error_rate() > plan.max_errors {
            stop = Stop::Errors {
                concurrency: c,
                rate: step.error_rate(),
            };
            break;
        }
        if step.p99_ms > plan.max_p99_ms {
            stop = Stop::Latency {
                concurrency: c,
                p99_ms: step.p99_ms,
            };
            break;
        }
        if let Some(k) = find_knee(&steps, &plan) {
            let beyond = steps
                .iter()
                .filter(|s| s.concurrency > k.concurrency)
                .count();
            if beyond >= plan.past_knee as usize {
                stop = Stop::KneeConfirmed;
                break;
            }
        }
        if started.elapsed() >= plan.max_duration {
            stop = Stop::MaxDuration;
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let knee = find_knee(&steps, &plan);
    let recommendation = knee.map(|k| recommend(k, args.utilization, &args.name));
    Ok(Tuning {
        url: target.url,
        steps,
        stop,
        threshold_percent: args.threshold,
        knee,
        recommendation,
    })
}

/// The knee among the steps within the error limit (a step that failed is no evidence of
/// throughput).
fn find_knee(steps: &[Step], plan: &Plan) -> Option<knee::Knee> {
    let points: Vec<knee::Point> = steps
        .iter()
        .filter(|s| s.error_rate() <= plan.max_errors)
        .map(Step::point)
        .collect();
    knee::find(&points, plan.threshold)
}

fn recommend(k: knee::Knee, utilization: f64, name: &str) -> Recommendation {
    let cc = k.container_concurrency;
    Recommendation {
        container_concurrency: cc,
        target: cc,
        target_utilization_percentage: utilization,
        effective_target: knee::effective_target(cc, utilization),
        snippet: report::snippet(name, cc, cc, utilization),
    }
}

fn target(args: &Args) -> Result<Target> {
    let rest = args
        .url
        .strip_prefix("http://")
        .with_context(|| format!("--url {}: expected http://HOST:PORT/PATH", args.url))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        bail!("--url {}: no host", args.url);
    }
    if let Some(d) = &args.data {
        if !d.is_file() {
            bail!("-D {}: no such file", d.display());
        }
    }
    Ok(Target {
        url: args.url.clone(),
        host: args.host.clone().unwrap_or_else(|| authority.to_string()),
        body: args.data.clone(),
    })
}

/// Holds concurrency `c` in windows until the throughput interval is narrow enough.
fn hold(
    generator: &Generator,
    target: &Target,
    c: u32,
    window: Duration,
    plan: &Plan,
    scratch: &Path,
) -> Result<Step> {
    let started = Instant::now();
    let mut windows = Vec::new();
    loop {
        windows.push(generator.run_target(target, c, window, scratch)?);
        let step = Step::of(c, &windows);
        let held = started.elapsed();
        let relative = step.ci95 / step.throughput.max(f64::MIN_POSITIVE);
        eprint!("\r{}", report::progress(&step, held));
        let steady = held >= plan.min_hold && relative <= plan.precision;
        if steady || held >= plan.max_hold || step.error_rate() > plan.max_errors {
            eprintln!();
            return Ok(step);
        }
    }
}

#[cfg(test)]
mod tests;
