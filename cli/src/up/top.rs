//! `inflight top --admin ADDR`: the live per-revision view of any gateway running the filter
//! (the local stack's, or a port-forwarded Istio gateway's admin endpoint). Several `--admin`s
//! (a fleet's gateways): the fleet's view, each revision's line the fleet's (counters and
//! gauges summed, the desired count the highest) with one line per gateway under it.

use super::{stats, view};
use anyhow::{Context as _, Result};
use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Envoy's admin address, e.g. 127.0.0.1:15000; repeat it (or separate by commas) for each
    /// gateway of a fleet.
    #[arg(long, required = true, value_delimiter = ',')]
    admin: Vec<String>,
    /// Refresh interval in seconds.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Print this many refreshes, then exit (0 = until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    count: u32,
}

fn resolve(admin: &str) -> Result<SocketAddr> {
    admin
        .to_socket_addrs()
        .with_context(|| format!("`{admin}` is not an address (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("`{admin}` resolves to no address"))
}

pub fn run(args: TopArgs) -> Result<()> {
    let admins = args
        .admin
        .iter()
        .map(|a| resolve(a))
        .collect::<Result<Vec<_>>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 60.0));
    let mut console = view::Console::new(Instant::now()).always_redraw();
    let mut history: VecDeque<(Instant, stats::Snapshot)> = VecDeque::new();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let per_gateway = admins
            .iter()
            .map(|admin| {
                stats::scrape(*admin)
                    .with_context(|| format!("scraping http://{admin}/stats/prometheus"))
            })
            .collect::<Result<Vec<_>>>()?;
        let snap = match per_gateway.as_slice() {
            [one] => one.clone(),
            all => stats::merge(all),
        };
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
        let text = match admins.as_slice() {
            [admin] => format!("gateway {admin}\n{}", view::render(&rows)),
            _ => {
                let named: Vec<(String, stats::Snapshot)> = admins
                    .iter()
                    .map(ToString::to_string)
                    .zip(per_gateway)
                    .collect();
                format!(
                    "fleet of {} gateways (each revision's line: the fleet's)\n{}",
                    admins.len(),
                    view::render_fleet(&rows, &named)
                )
            }
        };
        console.view(&text);
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
