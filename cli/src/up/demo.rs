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

pub fn run(stack: &mut Stack, args: &Args) -> Result<()> {
    let duration = config::duration("--duration", &args.duration)?;
    let Some(spec) = stack.pools.first().map(|p| p.spec.clone()) else {
        bail!("the demo needs a revision");
    };
    let host = spec.hosts.first().cloned().unwrap_or_default();
    let cc = spec.container_concurrency;

    // 1. Wait for the initial replicas, and for the gateway to see them (capacity = cc × ready).
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
            break;
        }
        if stack.stopping() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the initial replicas were not ready (and seen by the gateway) within 90s; ready {ready}, gateway capacity {capacity}; logs in {}",
                stack.dir.display()
            );
        }
        stack.sleep_tick();
    }
    let url = format!("http://{}/v1/models/mnist:predict", stack.listener());
    stack.console.log(&[
        format!("gateway http://{}  admin http://{}", stack.listener(), stack.envoy.admin),
        format!(
            "revision {}: containerConcurrency {cc}, target {} at {} % utilization, {} ready replica(s)",
            spec.name, spec.target, spec.target_utilization_percentage, spec.initial_replicas
        ),
    ]);
    // A short idle baseline for the plot.
    for _ in 0..4 {
        stack.tick()?;
        stack.sleep_tick();
    }

    // 2. The load step: 0 → N clients.
    let body = stack.dir.join("mnist.json");
    std::fs::write(&body, SAMPLE)?;
    let hey_out = stack.dir.join("hey.out");
    let mut cmd = Command::new("hey");
    cmd.args(["-m", "POST", "-z"])
        .arg(format!("{}s", duration.as_secs_f64()))
        .args(["-c", &args.clients.to_string(), "-D"])
        .arg(&body)
        .args(["-T", "application/json", "-host", &host])
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&hey_out)?)
        .stderr(Stdio::null());
    stack.console.log(&[format!(
        "load: hey -m POST -z {}s -c {} -D mnist.json -T application/json -host {host} {url}",
        duration.as_secs_f64(),
        args.clients
    )]);
    let mut hey = process::spawn(&mut cmd).context(
        "starting hey (the load generator; `make setup` installs it: apt-get install hey)",
    )?;
    stack.adopt_pid(hey.id());
    let load_start = Instant::now();
    let load_t = stack.started.elapsed().as_secs_f64();
    let mut first_desired: BTreeMap<u32, f64> = BTreeMap::new();
    let mut first_ready: BTreeMap<u32, f64> = BTreeMap::new();
    let mut peak_desired = 0u32;
    let mut peak_ready = 0usize;
    loop {
        stack.tick()?;
        let since = load_start.elapsed().as_secs_f64();
        let desired = stack
            .last
            .revisions
            .get(&spec.name)
            .and_then(|s| s.desired)
            .unwrap_or(0.0);
        let desired = if desired.is_finite() && desired > 0.0 {
            desired.round() as u32
        } else {
            0
        };
        let ready = stack.pools[0].ready();
        for k in 1..=desired {
            first_desired.entry(k).or_insert(since);
        }
        for k in 1..=u32::try_from(ready).unwrap_or(0) {
            first_ready.entry(k).or_insert(since);
        }
        peak_desired = peak_desired.max(desired);
        peak_ready = peak_ready.max(ready);
        if hey.try_wait()?.is_some() {
            break;
        }
        if stack.stopping() {
            process::stop(&mut hey, Duration::from_secs(2));
            break;
        }
        stack.sleep_tick();
    }
    let load_end_t = stack.started.elapsed().as_secs_f64();
    // Let in-flight work finish and the view settle.
    for _ in 0..3 {
        stack.tick()?;
        stack.sleep_tick();
    }
    stack.console.keep();

    // 3. Results.
    for pool in &mut stack.pools {
        for r in &mut pool.replicas {
            let _ = r.read_metrics();
        }
    }
    let hey_text = std::fs::read_to_string(&hey_out).unwrap_or_default();
    let statuses = hey_statuses(&hey_text);
    let errors = hey_errors(&hey_text);
    let s = stack
        .last
        .revisions
        .get(&spec.name)
        .cloned()
        .unwrap_or_default();
    let pool = &stack.pools[0];
    let final_ready = pool.ready();
    let mut max_seen: BTreeMap<String, f64> = BTreeMap::new();
    for r in pool.replicas.iter().chain(&pool.gone) {
        max_seen.insert(r.name.clone(), r.max_in_flight);
    }
    let total: u64 = statuses.values().sum();
    let ok = statuses.get(&200).copied().unwrap_or(0);
    let shed503 = statuses.get(&503).copied().unwrap_or(0);
    let upstream_5xx = s.upstream_rq_xx.get("5").copied().unwrap_or(0.0);
    let t_desired = first_desired.get(&peak_desired).copied();
    let t_ready = first_ready.get(&peak_desired).copied();
    // What the clients ask for at steady state (50 / 10 = 5 in the KServe example), and when the
    // gateway first asked for it.
    let kpa = inflight_core::kpa::KpaConfig {
        target: spec.target,
        container_concurrency: cc,
        target_utilization_percentage: spec.target_utilization_percentage,
        ..inflight_core::kpa::KpaConfig::default()
    };
    let expected = inflight_core::kpa::desired_for_concurrency(f64::from(args.clients), &kpa);
    let t_expected = first_desired.get(&expected).copied();
    let fired: Vec<f64> = plot::queue_aware_times(&stack.timeline)
        .into_iter()
        .filter(|t| *t >= load_t)
        .map(|t| t - load_t)
        .collect();

    println!(
        "\n=== hey (load: {} clients for {:.0}s) ===",
        args.clients,
        duration.as_secs_f64()
    );
    println!("{}", hey_text.trim_end());
    println!("\n=== kubectl get pods (revision {}) ===", spec.name);
    print!("{}", stack.pods_table());
    println!("\n=== totals ===");
    println!(
        "requests {total}: 200 → {ok}, 503 → {shed503}{}",
        statuses
            .iter()
            .filter(|(c, _)| **c != 200 && **c != 503)
            .map(|(c, n)| format!(", {c} → {n}"))
            .collect::<String>()
    );
    if !errors.is_empty() {
        println!("client errors: {}", errors.join("; "));
    }
    println!(
        "gateway: admitted {}, shed (queue full) {}, shed (wait timeout) {}, cancelled {}; upstream 5xx {upstream_5xx}",
        s.admitted, s.shed_full, s.shed_timeout, s.cancelled
    );
    println!("max in-flight seen by each predictor (hard limit containerConcurrency = {cc}):");
    for (name, m) in &max_seen {
        println!("  {name:<34} {m}");
    }
    let fmt_t = |t: Option<f64>| t.map_or_else(|| "never".into(), |t| format!("{t:.1}s"));
    println!(
        "scaling: desired {peak_desired} after {} of load, {peak_desired} ready after {}; ready at the end: {final_ready}",
        fmt_t(t_desired),
        fmt_t(t_ready)
    );
    println!(
        "time to desired = {expected} ({} clients / effective target {}): {}; queue-aware panic fired {}",
        args.clients,
        kpa.effective_target(),
        fmt_t(t_expected),
        if fired.is_empty() {
            "never".to_string()
        } else {
            fired
                .iter()
                .map(|t| format!("at {t:.1}s"))
                .collect::<Vec<_>>()
                .join(", ")
                + " of load"
        }
    );
    let plot_path = &args.plot;
    match plot::draw(
        plot_path,
        &spec.name,
        &stack.timeline,
        &[(load_t, "load"), (load_end_t, "end")],
    ) {
        Ok(()) => println!("plot: {}", plot_path.display()),
        Err(e) => eprintln!("plot: could not draw {}: {e:#}", plot_path.display()),
    }

    if let Some(path) = &args.summary_json {
        let summary = serde_json::json!({
            "revision": spec.name,
            "containerConcurrency": cc,
            "clients": args.clients,
            "statuses": statuses.iter().map(|(c, n)| (c.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "clientErrors": errors,
            "gateway": { "admitted": s.admitted, "shedFull": s.shed_full, "shedTimeout": s.shed_timeout, "cancelled": s.cancelled },
            "upstream5xx": upstream_5xx,
            "maxInFlight": max_seen,
            "peakDesired": peak_desired,
            "peakReady": peak_ready,
            "finalReady": final_ready,
            "secondsToDesired": t_desired,
            "secondsToReady": t_ready,
            "expectedDesired": expected,
            "secondsToExpectedDesired": t_expected,
            "queueAwareFiredAt": fired,
            "plot": plot_path,
            "pids": stack.pids(),
            "timeline": stack.timeline,
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
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
