//! `inflight top --admin ADDR`: the live per-revision view of any gateway running the filter
//! (the local stack's, or a port-forwarded Istio gateway's admin endpoint).

use super::{stats, view};
use anyhow::{Context as _, Result};
use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Envoy's admin address, e.g. 127.0.0.1:15000.
    #[arg(long)]
    admin: String,
    /// Refresh interval in seconds.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Print this many refreshes, then exit (0 = until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    count: u32,
}

pub fn run(args: TopArgs) -> Result<()> {
    let admin: SocketAddr = args
        .admin
        .to_socket_addrs()
        .with_context(|| format!("`{}` is not an address (expected HOST:PORT)", args.admin))?
        .next()
        .with_context(|| format!("`{}` resolves to no address", args.admin))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 60.0));
    let mut console = view::Console::new(Instant::now()).always_redraw();
    let mut history: VecDeque<(Instant, stats::Snapshot)> = VecDeque::new();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let snap = stats::scrape(admin)
            .with_context(|| format!("scraping http://{admin}/stats/prometheus"))?;
        let now = Instant::now();
        history.push_back((now, snap.clone()));
        while history.len() > 2
            && history
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            history.pop_front();
        }
        let names: Vec<String> = snap
            .revisions
            .iter()
            .filter(|(_, r)| r.tracked)
            .map(|(n, _)| n.clone())
            .collect();
        let (t0, first) = history.front().cloned().unwrap_or((now, snap.clone()));
        let rows = view::rows(&first, &snap, now.duration_since(t0).as_secs_f64(), &names);
        console.view(&format!("gateway {admin}\n{}", view::render(&rows)));
        n += 1;
        if args.count > 0 && n >= args.count {
            break;
        }
        let until = Instant::now() + interval;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    console.keep();
    Ok(())
}
