//! `inflight up --demo`: the KServe autoscaling page on a laptop. Revision `torchserve` (soft
//! target 10, hard limit 10, utilization 100 %) starts at one replica; `hey -m POST -z 30s -c 50`
//! sends the mnist sample; the gateway asks for 50 / 10 = 5 replicas and the scaler starts them.
//! At the end: hey's summary, the replicas as `kubectl get pods` shows them, totals checked
//! against the predictors' own counts, and a plot of the run.

use super::Args;
use super::{config, plot, process, Stack};
use anyhow::{bail, Context as _, Result};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The request body of the KServe example (v1 protocol, one base64 PNG digit).
const SAMPLE: &str = include_str!("../../../predictor/samples/mnist.json");

/// Status code counts from hey's `Status code distribution:` section.
pub fn hey_statuses(out: &str) -> BTreeMap<u16, u64> {
    let mut codes = BTreeMap::new();
    let mut in_section = false;
    for line in out.lines() {
        if line.starts_with("Status code distribution") {
            in_section = true;
            continue;
        }
        if in_section {
            let l = line.trim();
            let Some(rest) = l.strip_prefix('[') else {
                if !l.is_empty() {
                    in_section = false;
                }
                continue;
            };
            if let Some((code, count)) = rest.split_once(']') {
                let n = count.split_whitespace().next().and_then(|n| n.parse().ok());
                if let (Ok(code), Some(n)) = (code.parse(), n) {
                    codes.insert(code, n);
                }
            }
        }
    }
    codes
}

/// hey's `Error distribution:` lines (connection errors, timeouts), if any.
pub fn hey_errors(out: &str) -> Vec<String> {
    out.lines()
        .skip_while(|l| !l.starts_with("Error distribution"))
        .skip(1)
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .map(str::to_string)
        .collect()
}

/// The demo: wait for the initial replicas, a short idle baseline, the load step, then the
/// results (printed, plotted, and written as JSON when asked).
pub fn run(stack: &mut Stack, args: &Args) -> Result<()> {
    let duration = config::duration("--duration", &args.duration)?;
    let Some(spec) = stack.pools.first().map(|p| p.spec.clone()) else {
        bail!("the demo needs a revision");
    };
    if !wait_for_initial_replicas(stack, &spec)? {
        return Ok(());
    }
    let url = format!("http://{}/v1/models/mnist:predict", stack.listener());
    stack.console.log(&[
        format!("gateway http://{}  admin http://{}", stack.listener(), stack.admin()),
        format!(
            "revision {}: containerConcurrency {}, target {} at {} % utilization, {} ready replica(s)",
            spec.name,
            spec.container_concurrency,
            spec.target,
            spec.target_utilization_percentage,
            spec.initial_replicas
        ),
    ]);
    // A short idle baseline for the plot.
    idle_ticks(stack, 4)?;
    let host = spec.hosts.first().cloned().unwrap_or_default();
    let (hey, hey_out) = start_load(stack, args, duration, &host, &url)?;
    let trace = follow_load(stack, hey, &spec.name)?;
    // Let in-flight work finish and the view settle.
    idle_ticks(stack, 3)?;
    stack.console.keep();
    let results = Results::collect(stack, args, &spec, &hey_out, &trace);
    results.print(stack, args, duration);
    let plot_path = &args.plot;
    match plot::draw(
        plot_path,
        &spec.name,
        &stack.timeline,
        &[(trace.load_t, "load"), (trace.load_end_t, "end")],
    ) {
        Ok(()) => println!("plot: {}", plot_path.display()),
        Err(e) => eprintln!("plot: could not draw {}: {e:#}", plot_path.display()),
    }
    if let Some(path) = &args.summary_json {
        results.write_json(stack, args, path)?;
    }
    Ok(())
}

/// Waits for the initial replicas, and for the gateway to see them (capacity = cc × ready).
/// `false` when the stack is stopping.
fn wait_for_initial_replicas(stack: &mut Stack, spec: &config::RevisionSpec) -> Result<bool> {
    let cc = spec.container_concurrency;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        stack.tick()?;
        let ready = stack.pools[0].ready();
        let capacity = stack
            .last
            .revisions
            .get(&spec.name)
            .map_or(0.0, |s| s.capacity);
        if ready >= spec.initial_replicas as usize
            && (cc == 0 || capacity >= f64::from(cc * spec.initial_replicas))
        {
            return Ok(true);
        }
        if stack.stopping() {
            return Ok(false);
        }
        if Instant::now() > deadline {
            bail!(
                "the initial replicas were not ready (and seen by the gateway) within 90s; ready {ready}, gateway capacity {capacity}; logs in {}",
                stack.dir.display()
            );
        }
        stack.sleep_tick();
    }
}

fn idle_ticks(stack: &mut Stack, n: usize) -> Result<()> {
    for _ in 0..n {
        stack.tick()?;
        stack.sleep_tick();
    }
    Ok(())
}

/// The load step, 0 → N clients: starts hey, writing its report to the returned file.
fn start_load(
    stack: &mut Stack,
    args: &Args,
    duration: Duration,
    host: &str,
    url: &str,
) -> Result<(std::process::Child, std::path::PathBuf)> {
    let body = stack.dir.join("mnist.json");
    std::fs::write(&body, SAMPLE)?;
    let hey_out = stack.dir.join("hey.out");
    let mut cmd = Command::new("hey");
    cmd.args(["-m", "POST", "-z"])
        .arg(format!("{}s", duration.as_secs_f64()))
        .args(["-c", &args.clients.to_string(), "-D"])
        .arg(&body)
        .args(["-T", "application/json", "-host", host])
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&hey_out)?)
        .stderr(Stdio::null());
    stack.console.log(&[format!(
        "load: hey -m POST -z {}s -c {} -D mnist.json -T application/json -host {host} {url}",
        duration.as_secs_f64(),
        args.clients
    )]);
    let hey = process::spawn(&mut cmd).context(
        "starting hey (the load generator; `make setup` installs it: apt-get install hey)",
    )?;
    stack.adopt_pid(hey.id());
    Ok((hey, hey_out))
}

/// When each replica count was first desired and first ready during the load, and the peaks.
struct LoadTrace {
    /// Seconds since the stack started when the load began and ended.
    load_t: f64,
    load_end_t: f64,
    /// Seconds of load until `k` replicas were first desired / ready.
    first_desired: BTreeMap<u32, f64>,
    first_ready: BTreeMap<u32, f64>,
    peak_desired: u32,
    peak_ready: usize,
}

/// Ticks the stack until hey ends (or the stack stops), recording the scaling.
fn follow_load(
    stack: &mut Stack,
    mut hey: std::process::Child,
    revision: &str,
) -> Result<LoadTrace> {
    let load_start = Instant::now();
    let mut t = LoadTrace {
        load_t: stack.started.elapsed().as_secs_f64(),
        load_end_t: 0.0,
        first_desired: BTreeMap::new(),
        first_ready: BTreeMap::new(),
        peak_desired: 0,
        peak_ready: 0,
    };
    loop {
        stack.tick()?;
        let since = load_start.elapsed().as_secs_f64();
        let desired = stack
            .last
            .revisions
            .get(revision)
            .and_then(|s| s.desired)
            .unwrap_or(0.0);
        let desired = if desired.is_finite() && desired > 0.0 {
            desired.round() as u32
        } else {
            0
        };
        let ready = stack.pools[0].ready();
        for k in 1..=desired {
            t.first_desired.entry(k).or_insert(since);
        }
        for k in 1..=u32::try_from(ready).unwrap_or(0) {
            t.first_ready.entry(k).or_insert(since);
        }
        t.peak_desired = t.peak_desired.max(desired);
        t.peak_ready = t.peak_ready.max(ready);
        if hey.try_wait()?.is_some() {
            break;
        }
        if stack.stopping() {
            process::stop(&mut hey, Duration::from_secs(2));
            break;
        }
        stack.sleep_tick();
    }
    t.load_end_t = stack.started.elapsed().as_secs_f64();
    Ok(t)
}

/// What the run produced: hey's counts, the gateway's, each predictor's peak, and the scaling.
struct Results {
    hey_text: String,
    statuses: BTreeMap<u16, u64>,
    errors: Vec<String>,
    /// The gateway's counts (a fleet's summed), then each gateway's own.
    gateway: super::stats::RevisionStats,
    per_gateway: Vec<(String, super::stats::RevisionStats)>,
    max_seen: BTreeMap<String, f64>,
    final_ready: usize,
    peak_desired: u32,
    peak_ready: usize,
    t_desired: Option<f64>,
    t_ready: Option<f64>,
    /// What the clients ask for at steady state (50 / 10 = 5 in the KServe example), the
    /// effective target behind it, and when the gateway first asked for it.
    expected: u32,
    effective_target: f64,
    t_expected: Option<f64>,
    /// Seconds of load at which the queue-aware panic fired.
    fired: Vec<f64>,
    revision: String,
    cc: u32,
}

impl Results {
    fn collect(
        stack: &mut Stack,
        args: &Args,
        spec: &config::RevisionSpec,
        hey_out: &std::path::Path,
        trace: &LoadTrace,
    ) -> Results {
        for pool in &mut stack.pools {
            for r in &mut pool.replicas {
                let _ = r.read_metrics();
            }
        }
        let hey_text = std::fs::read_to_string(hey_out).unwrap_or_default();
        let pool = &stack.pools[0];
        let max_seen = pool
            .replicas
            .iter()
            .chain(&pool.gone)
            .map(|r| (r.name.clone(), r.max_in_flight))
            .collect();
        let kpa = inflight_core::kpa::KpaConfig {
            target: spec.target,
            container_concurrency: spec.container_concurrency,
            target_utilization_percentage: spec.target_utilization_percentage,
            ..inflight_core::kpa::KpaConfig::default()
        };
        let expected = inflight_core::kpa::desired_for_concurrency(f64::from(args.clients), &kpa);
        Results {
            statuses: hey_statuses(&hey_text),
            errors: hey_errors(&hey_text),
            hey_text,
            gateway: stack
                .last
                .revisions
                .get(&spec.name)
                .cloned()
                .unwrap_or_default(),
            per_gateway: stack
                .gateways
                .members
                .iter()
                .zip(&stack.last_gateways)
                .map(|(g, snap)| {
                    let s = snap.revisions.get(&spec.name).cloned().unwrap_or_default();
                    (g.name.clone(), s)
                })
                .collect(),
            max_seen,
            final_ready: pool.ready(),
            peak_desired: trace.peak_desired,
            peak_ready: trace.peak_ready,
            t_desired: trace.first_desired.get(&trace.peak_desired).copied(),
            t_ready: trace.first_ready.get(&trace.peak_desired).copied(),
            expected,
            effective_target: kpa.effective_target(),
            t_expected: trace.first_desired.get(&expected).copied(),
            fired: plot::queue_aware_times(&stack.timeline)
                .into_iter()
                .filter(|t| *t >= trace.load_t)
                .map(|t| t - trace.load_t)
                .collect(),
            revision: spec.name.clone(),
            cc: spec.container_concurrency,
        }
    }

    fn upstream_5xx(&self) -> f64 {
        self.gateway.upstream_rq_xx.get("5").copied().unwrap_or(0.0)
    }

    fn print(&self, stack: &Stack, args: &Args, duration: Duration) {
        let s = &self.gateway;
        let cc = self.cc;
        println!(
            "\n=== hey (load: {} clients for {:.0}s) ===",
            args.clients,
            duration.as_secs_f64()
        );
        println!("{}", self.hey_text.trim_end());
        println!("\n=== kubectl get pods (revision {}) ===", self.revision);
        print!("{}", stack.pods_table());
        println!("\n=== totals ===");
        let total: u64 = self.statuses.values().sum();
        let count = |code: u16| self.statuses.get(&code).copied().unwrap_or(0);
        println!(
            "requests {total}: 200 → {}, 503 → {}{}",
            count(200),
            count(503),
            self.statuses
                .iter()
                .filter(|(c, _)| **c != 200 && **c != 503)
                .map(|(c, n)| format!(", {c} → {n}"))
                .collect::<String>()
        );
        if !self.errors.is_empty() {
            println!("client errors: {}", self.errors.join("; "));
        }
        println!(
            "{}: admitted {}, shed (queue full) {}, shed (wait timeout) {}, cancelled {}; upstream 5xx {}",
            match self.per_gateway.len() {
                0 | 1 => "gateway".to_string(),
                n => format!("{n} gateways (summed)"),
            },
            s.admitted,
            s.shed_full,
            s.shed_timeout,
            s.cancelled,
            self.upstream_5xx()
        );
        if self.per_gateway.len() > 1 {
            for (name, g) in &self.per_gateway {
                println!(
                    "  {name}: admitted {}, forwarded to a peer {}, shed {}",
                    g.admitted,
                    g.forwarded,
                    g.shed()
                );
            }
        }
        println!("max in-flight seen by each predictor (hard limit containerConcurrency = {cc}):");
        for (name, m) in &self.max_seen {
            println!("  {name:<34} {m}");
        }
        let fmt_t = |t: Option<f64>| t.map_or_else(|| "never".into(), |t| format!("{t:.1}s"));
        println!(
            "scaling: desired {peak} after {} of load, {peak} ready after {}; ready at the end: {}",
            fmt_t(self.t_desired),
            fmt_t(self.t_ready),
            self.final_ready,
            peak = self.peak_desired,
        );
        println!(
            "time to desired = {} ({} clients / effective target {}): {}; queue-aware panic fired {}",
            self.expected,
            args.clients,
            self.effective_target,
            fmt_t(self.t_expected),
            if self.fired.is_empty() {
                "never".to_string()
            } else {
                self.fired
                    .iter()
                    .map(|t| format!("at {t:.1}s"))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + " of load"
            }
        );
    }

    fn write_json(&self, stack: &Stack, args: &Args, path: &std::path::Path) -> Result<()> {
        let s = &self.gateway;
        let summary = serde_json::json!({
            "revision": self.revision,
            "containerConcurrency": self.cc,
            "clients": args.clients,
            "statuses": self.statuses.iter().map(|(c, n)| (c.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "clientErrors": self.errors,
            "gateway": { "admitted": s.admitted, "shedFull": s.shed_full, "shedTimeout": s.shed_timeout, "cancelled": s.cancelled },
            "upstream5xx": self.upstream_5xx(),
            "gateways": self.per_gateway.iter().map(|(name, g)| serde_json::json!({
                "name": name, "admitted": g.admitted, "forwarded": g.forwarded,
                "shedFull": g.shed_full, "shedTimeout": g.shed_timeout,
            })).collect::<Vec<_>>(),
            "maxInFlight": self.max_seen,
            "peakDesired": self.peak_desired,
            "peakReady": self.peak_ready,
            "finalReady": self.final_ready,
            "secondsToDesired": self.t_desired,
            "secondsToReady": self.t_ready,
            "expectedDesired": self.expected,
            "secondsToExpectedDesired": self.t_expected,
            "queueAwareFiredAt": self.fired,
            "plot": args.plot,
            "pids": stack.pids(),
            "timeline": stack.timeline,
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEY: &str = "Summary:\n  Total:\t10.0 secs\n\nStatus code distribution:\n  [200]\t12000 responses\n  [503]\t12 responses\n\nError distribution:\n  [3]\tPost \"http://x\": context deadline exceeded\n";

    #[test]
    fn parses_hey_summary() {
        let s = hey_statuses(HEY);
        assert_eq!(s.get(&200), Some(&12000));
        assert_eq!(s.get(&503), Some(&12));
        assert_eq!(s.len(), 2);
        assert_eq!(hey_errors(HEY).len(), 1);
        assert!(hey_statuses("").is_empty(), "no summary, no codes");
        assert!(hey_errors("Summary:\n").is_empty());
    }
}
