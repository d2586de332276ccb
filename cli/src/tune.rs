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
//!
//! Two ways to reach the server: `--url`, one replica directly, at concurrency k; or
//! `--admin` and `--revision`, through a running gateway that caps the revision at k itself
//! ([`gateway`]). `--apply` writes the recommendation into the gateway's plugin configuration
//! file without a restart ([`apply`]).

mod apply;
mod gateway;
mod knee;
mod report;

use crate::bench::load::{Generator, Load, LoadTool, Target};
use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The model server to load, e.g. http://127.0.0.1:8080/v1/models/mnist:predict: one
    /// replica, directly (not through a gateway that limits it). Without it, give --admin and
    /// --revision: the sweep goes through that gateway, which caps the revision at each step.
    #[arg(long, required_unless_present_all = ["admin", "revision"])]
    pub url: Option<String>,
    /// Through a gateway (no --url): the request path, e.g. /v1/models/mnist:predict.
    #[arg(long, default_value = "/", conflicts_with = "url")]
    pub path: String,
    /// POST this file's bytes as `application/json` (as hey's and curl's `-D`); without it, GET.
    #[arg(short = 'D', long = "data", value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// `Host` header [default: the URL's; through a gateway, the revision's first exact host].
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
    /// gateway at --admin for --revision: its plugin configuration file (file-based ECDS, as
    /// `inflight up` runs Envoy; or file-based LDS), replaced atomically, which Envoy applies
    /// without a restart; waits for the capacity gauge.
    #[arg(long, requires_all = ["admin", "revision"])]
    pub apply: bool,
    /// With --apply: apply this containerConcurrency (target the same, at --utilization)
    /// instead of measuring one: no sweep.
    #[arg(long, requires = "apply", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
    /// Admin address (HOST:PORT) of the gateway to sweep through (without --url) or to
    /// --apply to (`inflight up` prints it).
    #[arg(long, requires = "revision")]
    pub admin: Option<std::net::SocketAddr>,
    /// The gateway's revision to sweep or to --apply to.
    #[arg(long, requires = "admin")]
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
    /// The concurrency at the server: the clients' directly, the gateway's cap through it.
    pub concurrency: u32,
    /// Closed-loop clients of the load generator.
    pub clients: u32,
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
    /// Through a gateway: ms from writing the step's cap to the capacity gauge showing it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cap_ms: Option<f64>,
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
    fn of(concurrency: u32, clients: u32, windows: &[Load]) -> Step {
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
            clients,
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
            cap_ms: None,
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
    /// The gateway the sweep went through (its cap set the concurrency), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<gateway::Through>,
    pub steps: Vec<Step>,
    pub stop: Stop,
    pub threshold_percent: f64,
    pub knee: Option<knee::Knee>,
    pub recommendation: Option<Recommendation>,
    /// What `--apply` changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<Applied>,
}

/// What `--apply` changed, as printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    pub revision: String,
    pub file: String,
    pub from: u64,
    pub to: u32,
    /// The capacity gauge (limit × ready replicas) once it showed the new limit.
    pub capacity: f64,
    /// From the file's replacement to the capacity gauge showing the new limit.
    pub after_ms: f64,
    /// From the file's replacement to Envoy counting the update, when seen first.
    pub accepted_ms: Option<f64>,
}

impl Applied {
    fn of(revision: &str, file: &apply::ConfigFile, a: &apply::Applied) -> Applied {
        Applied {
            revision: revision.to_string(),
            file: file.describe(),
            from: a.from,
            to: a.to,
            capacity: a.capacity,
            after_ms: a.after.as_secs_f64() * 1e3,
            accepted_ms: a.accepted.map(|d| d.as_secs_f64() * 1e3),
        }
    }

    fn line(&self) -> String {
        format!(
            "applied to {}: containerConcurrency {} → {} in {}; capacity gauge {} {:.0} ms after the write{}\n",
            self.revision,
            self.from,
            self.to,
            self.file,
            self.capacity,
            self.after_ms,
            self.accepted_ms
                .map(|a| format!(" (Envoy counted the update after {a:.0} ms)"))
                .unwrap_or_default()
        )
    }
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
    if let Some(limit) = args.limit {
        return apply_limit(&args, limit);
    }
    let through = match (&args.url, args.admin, &args.revision) {
        (None, Some(admin), Some(revision)) => {
            let g = gateway::Gateway::open(admin, revision, args.host.as_deref())?;
            eprintln!(
                "tune: through the gateway at {admin}: {} (Host {}), revision {revision} capped at each step in {} ({} ready replica(s), pinned for the sweep; containerConcurrency {} restored after)",
                g.url(&args.path),
                g.host,
                g.file.describe(),
                g.ready,
                g.original_cc,
            );
            Some(g)
        }
        (None, _, _) => bail!(
            "give --url (one replica, directly) or --admin and --revision (through a running gateway)"
        ),
        _ => None,
    };
    // Where --apply writes, checked before the sweep: the gateway's file as it is now.
    let apply_to = match (args.apply, &through, args.admin, &args.revision) {
        (true, Some(g), _, _) => Some((g.file.clone(), g.original.clone())),
        (true, None, Some(admin), Some(revision)) => {
            let (file, text) = apply::preflight(admin, revision)?;
            eprintln!("tune: will apply to {revision} in {}", file.describe());
            Some((file, text))
        }
        _ => None,
    };
    // Through a gateway the sweep changes its configuration: Ctrl-C ends the sweep and puts
    // the file back (a second Ctrl-C exits at once).
    let interrupted = Arc::new(AtomicBool::new(false));
    if through.is_some() {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&interrupted))
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&interrupted)))
                .context("installing signal handler")?;
        }
    }
    let swept = sweep(&args, through.as_ref(), &interrupted);
    let (mut applied, mut apply_error) = (None, None);
    if let (Ok(t), Some((file, base)), Some(admin), Some(revision)) =
        (&swept, &apply_to, args.admin, &args.revision)
    {
        match &t.recommendation {
            // Through the gateway, over the file as it was before the sweep's caps; directly,
            // over the file as it is now.
            Some(rec) => match through
                .as_ref()
                .map_or_else(|| file.read(), |g| g.idle().map(|()| base.clone()))
                .and_then(|base| apply::apply(admin, revision, file, &base, rec))
            {
                Ok(done) => applied = Some(Applied::of(revision, file, &done)),
                Err(e) => apply_error = Some(e),
            },
            None => {
                apply_error = Some(anyhow::anyhow!(
                    "--apply: no knee, so nothing to apply (the gateway is as it was)"
                ))
            }
        }
    }
    if let (Some(g), None) = (&through, &applied) {
        let restored = g
            .restore()
            .with_context(|| format!("putting {} back as it was", g.file.describe()))?;
        eprintln!(
            "tune: {} back as it was: containerConcurrency {} (capacity gauge {} after {} ms)",
            g.file.describe(),
            restored.to,
            restored.capacity,
            restored.after.as_millis()
        );
    }
    let mut tuning = swept?;
    tuning.applied = applied;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tuning)?);
    } else {
        print!("{}", report::text(&tuning));
        if let Some(a) = &tuning.applied {
            print!("{}", a.line());
        }
    }
    match report::plot(&args.plot, &tuning) {
        Ok(()) => eprintln!("tune: plot written to {}", args.plot.display()),
        Err(e) => eprintln!("tune: no plot ({}): {e:#}", args.plot.display()),
    }
    match apply_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `--apply --limit N`: the given limit into the gateway, no sweep.
fn apply_limit(args: &Args, limit: u32) -> Result<()> {
    let (Some(admin), Some(revision)) = (args.admin, &args.revision) else {
        bail!("--apply needs --admin and --revision");
    };
    if !(args.utilization > 0.0 && args.utilization <= 100.0) {
        bail!(
            "--utilization {}: a percentage in (0, 100], Knative's default is 70",
            args.utilization
        );
    }
    let (file, base) = apply::preflight(admin, revision)?;
    let rec = recommend_limit(limit, args.utilization, &args.name);
    let done = apply::apply(admin, revision, &file, &base, &rec)?;
    let applied = Applied::of(revision, &file, &done);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&applied)?);
    } else {
        print!("{}", applied.line());
    }
    Ok(())
}

/// Runs the sweep and finds the knee: directly at `--url`, or `through` a gateway that caps
/// the revision at each step.
fn sweep(
    args: &Args,
    through: Option<&gateway::Gateway>,
    interrupted: &AtomicBool,
) -> Result<Tuning> {
    let plan = Plan::from(args)?;
    let target = target(args, through)?;
    let generator = Generator::find(args.load)?;
    let window = plan.window.max(generator.min_duration());
    let scratch = std::env::temp_dir().join(format!("inflight-tune-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let started = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let mut stop = Stop::MaxConcurrency;
    let steady = Steady {
        generator: &generator,
        target: &target,
        through,
        window,
        plan: &plan,
        scratch: &scratch,
        interrupted,
    };
    for &c in &plan.levels {
        let step = match steady.measure(c) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&scratch);
                return Err(e.context(format!("measuring concurrency {c} on {}", target.url)));
            }
        };
        if interrupted.load(Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&scratch);
            bail!("interrupted at concurrency {c}");
        }
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
        gateway: through.map(gateway::Gateway::through),
        steps,
        stop,
        threshold_percent: args.threshold,
        knee,
        recommendation,
        applied: None,
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
    recommend_limit(k.container_concurrency, utilization, name)
}

fn recommend_limit(cc: u32, utilization: f64, name: &str) -> Recommendation {
    Recommendation {
        container_concurrency: cc,
        target: cc,
        target_utilization_percentage: utilization,
        effective_target: knee::effective_target(cc, utilization),
        snippet: report::snippet(name, cc, cc, utilization),
    }
}

fn target(args: &Args, through: Option<&gateway::Gateway>) -> Result<Target> {
    if let Some(d) = &args.data {
        if !d.is_file() {
            bail!("-D {}: no such file", d.display());
        }
    }
    if let Some(g) = through {
        return Ok(Target {
            url: g.url(&args.path),
            host: g.host.clone(),
            body: args.data.clone(),
        });
    }
    let url = args.url.as_deref().unwrap_or_default();
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url}: expected http://HOST:PORT/PATH"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        bail!("--url {url}: no host");
    }
    Ok(Target {
        url: url.to_string(),
        host: args.host.clone().unwrap_or_else(|| authority.to_string()),
        body: args.data.clone(),
    })
}

/// How each step is held: the load generator and its target, the gateway if the sweep goes
/// through one, and the plan's limits.
struct Steady<'a> {
    generator: &'a Generator,
    target: &'a Target,
    through: Option<&'a gateway::Gateway>,
    window: Duration,
    plan: &'a Plan,
    scratch: &'a Path,
    interrupted: &'a AtomicBool,
}

impl Steady<'_> {
    /// One step at concurrency `c`: directly, `c` clients; through a gateway, the revision
    /// capped at `c` first, and twice its capacity in clients.
    fn measure(&self, c: u32) -> Result<Step> {
        let mut cap_ms = None;
        let clients = match self.through {
            Some(g) => {
                let capped = g.cap(c)?;
                cap_ms = Some(capped.after.as_secs_f64() * 1e3);
                let want = f64::from(c) * f64::from(g.ready);
                if capped.capacity != want {
                    eprintln!(
                        "tune: revision {} has capacity {} at cap {c}, not {want}: its ready replicas changed during the sweep",
                        g.revision, capped.capacity
                    );
                }
                g.clients(c)
            }
            None => c,
        };
        let step = self.hold(c, clients)?;
        Ok(Step { cap_ms, ..step })
    }

    /// Holds concurrency `c` (`clients` closed-loop clients) in windows until the throughput
    /// interval is narrow enough.
    fn hold(&self, c: u32, clients: u32) -> Result<Step> {
        let plan = self.plan;
        let started = Instant::now();
        let mut windows = Vec::new();
        loop {
            windows.push(self.generator.run_target(
                self.target,
                clients,
                self.window,
                self.scratch,
            )?);
            let step = Step::of(c, clients, &windows);
            let held = started.elapsed();
            let relative = step.ci95 / step.throughput.max(f64::MIN_POSITIVE);
            eprint!("\r{}", report::progress(&step, held));
            let steady = held >= plan.min_hold && relative <= plan.precision;
            let ended = steady || held >= plan.max_hold || step.error_rate() > plan.max_errors;
            if ended || self.interrupted.load(Ordering::SeqCst) {
                eprintln!();
                return Ok(step);
            }
        }
    }
}

#[cfg(test)]
mod tests;
