//! The load generator: `wrk` (preferred: C, epoll, microsecond latency histogram) or `hey`
//! (the KServe example's tool; its per-request CSV has 0.1 ms resolution, too coarse for the
//! added-latency target, so it is the fallback). Both run closed-loop: `c` connections, each
//! sending its next request when the previous answer arrives, with keep-alive. `inflight bench`
//! sends GETs; `inflight tune` also POSTs a body ([`Target::body`]).

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Which load generator to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadTool {
    /// `wrk` if installed, else `hey`.
    #[default]
    Auto,
    Wrk,
    Hey,
}

/// A load generator found on `PATH`.
#[derive(Debug, Clone)]
pub enum Generator {
    Wrk(PathBuf),
    Hey(PathBuf),
}

impl Generator {
    pub fn find(tool: LoadTool) -> Result<Generator> {
        let wrk = || which("wrk").map(Generator::Wrk);
        let hey = || which("hey").map(Generator::Hey);
        let found = match tool {
            LoadTool::Auto => wrk().or_else(hey),
            LoadTool::Wrk => wrk(),
            LoadTool::Hey => hey(),
        };
        found.context(
            "no load generator found: install wrk (`apt-get install wrk`) or hey (`apt-get install hey`); `make setup` installs both",
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Generator::Wrk(_) => "wrk",
            Generator::Hey(_) => "hey",
        }
    }

    /// Runs `c` connections against `url` with `Host: host` for `duration` (GET).
    pub fn run(
        &self,
        url: &str,
        host: &str,
        c: u32,
        duration: Duration,
        scratch: &Path,
    ) -> Result<Load> {
        let target = Target {
            url: url.to_string(),
            host: host.to_string(),
            body: None,
        };
        self.run_target(&target, c, duration, scratch)
    }

    /// Runs `c` connections against `target` for `duration`.
    pub fn run_target(
        &self,
        target: &Target,
        c: u32,
        duration: Duration,
        scratch: &Path,
    ) -> Result<Load> {
        match self {
            Generator::Wrk(bin) => run_wrk(bin, target, c, duration, scratch),
            Generator::Hey(bin) => run_hey(bin, target, c, duration),
        }
    }

    /// The shortest run this generator can time: wrk counts whole seconds.
    pub fn min_duration(&self) -> Duration {
        match self {
            Generator::Wrk(_) => Duration::from_secs(1),
            Generator::Hey(_) => Duration::from_millis(1),
        }
    }
}

/// What to send: a GET, or a POST of a file's bytes (`Content-Type: application/json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub host: String,
    pub body: Option<PathBuf>,
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What one load run measured, as the client saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Responses received (any status).
    pub requests: u64,
    /// Responses with a status other than 2xx/3xx (the circuit breaker's and inflight's 503s).
    pub non_2xx: u64,
    /// Socket errors and timeouts (should be 0).
    pub errors: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

impl Load {
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Successful (2xx/3xx) responses per second.
    pub fn ok_rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests.saturating_sub(self.non_2xx) as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// wrk's `done` hook prints one line with exact percentiles from its microsecond histogram.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "inflight-bench requests=%d duration_us=%d status=%d connect=%d read=%d write=%d timeout=%d p50=%d p90=%d p99=%d p999=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// wrk's script for a POST of `body` (read by wrk's LuaJIT when it starts).
fn wrk_post_script(body: &Path) -> String {
    format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nlocal f = assert(io.open({:?}, \"rb\"))\nwrk.body = f:read(\"*a\")\nf:close()\n{WRK_SCRIPT}",
        body.display().to_string()
    )
}

fn run_wrk(
    bin: &Path,
    target: &Target,
    c: u32,
    duration: Duration,
    scratch: &Path,
) -> Result<Load> {
    let script = match &target.body {
        None => {
            let script = scratch.join("wrk-report.lua");
            if !script.exists() {
                std::fs::write(&script, WRK_SCRIPT)?;
            }
            script
        }
        Some(body) => {
            let script = scratch.join("wrk-post.lua");
            std::fs::write(&script, wrk_post_script(body))?;
            script
        }
    };
    // Two threads (one per core of the machines we target) when they split the connections
    // evenly: wrk opens c / threads (rounded down) per thread, so `-t 2 -c 3` keeps 2.
    let threads = wrk_threads(c);
    let out = Command::new(bin)
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &c.to_string(),
            "-d",
            // wrk takes whole seconds.
            &format!("{}s", duration.as_secs_f64().ceil().max(1.0)),
            "--timeout",
            "60s",
            "-H",
            &format!("Host: {}", target.host),
            "-s",
        ])
        .arg(&script)
        .arg(&target.url)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&stdout).with_context(|| format!("unexpected wrk output:\n{stdout}"))
}

/// wrk's `-t` for `c` connections: 2, or 1 when c is odd (then `-t 2` would open c − 1).
fn wrk_threads(c: u32) -> u32 {
    if c >= 2 && c.is_multiple_of(2) {
        2
    } else {
        1
    }
}

fn parse_wrk(stdout: &str) -> Option<Load> {
    let line = stdout.lines().find(|l| l.starts_with("inflight-bench "))?;
    let field = |k: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
    };
    Some(Load {
        requests: field("requests")? as u64,
        non_2xx: field("status")? as u64,
        errors: (field("connect")? + field("read")? + field("write")? + field("timeout")?) as u64,
        seconds: field("duration_us")? / 1e6,
        p50_us: field("p50")?,
        p90_us: field("p90")?,
        p99_us: field("p99")?,
        p999_us: field("p999")?,
    })
}

fn run_hey(bin: &Path, target: &Target, c: u32, duration: Duration) -> Result<Load> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "-z",
        &format!("{}ms", duration.as_millis().max(1)),
        "-c",
        &c.to_string(),
        "-t",
        "60",
        "-host",
        &target.host,
        "-o",
        "csv",
    ]);
    if let Some(body) = &target.body {
        cmd.args(["-m", "POST", "-T", "application/json", "-D"])
            .arg(body);
    }
    let out = cmd
        .arg(&target.url)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "hey failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_hey_csv(&String::from_utf8_lossy(&out.stdout))
        .context("hey printed no responses (is the gateway answering?)")
}

/// hey's CSV: `response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,
/// status-code,offset`, times in seconds; `offset` is when the request started.
fn parse_hey_csv(csv: &str) -> Option<Load> {
    let mut lat_us = Vec::new();
    let mut non_2xx = 0u64;
    let mut end = 0f64;
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (Some(rt), Some(status), Some(offset)) = (f.first(), f.get(6), f.get(7)) else {
            continue;
        };
        let (Ok(rt), Ok(status), Ok(offset)) = (
            rt.parse::<f64>(),
            status.parse::<u32>(),
            offset.parse::<f64>(),
        ) else {
            continue;
        };
        lat_us.push(rt * 1e6);
        if !(200..400).contains(&status) {
            non_2xx += 1;
        }
        end = end.max(offset + rt);
    }
    if lat_us.is_empty() {
        return None;
    }
    lat_us.sort_by(f64::total_cmp);
    Some(Load {
        requests: lat_us.len() as u64,
        non_2xx,
        errors: 0,
        seconds: end,
        p50_us: percentile(&lat_us, 50.0),
        p90_us: percentile(&lat_us, 90.0),
        p99_us: percentile(&lat_us, 99.0),
        p999_us: percentile(&lat_us, 99.9),
    })
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // The epsilon keeps 99.9 % of 1000 at rank 999 despite 0.999 × 1000 = 999.0000000000001.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_threads_split_the_connections_evenly() {
        for (c, want) in [(1, 1), (2, 2), (3, 1), (4, 2), (6, 2), (7, 1), (64, 2)] {
            assert_eq!(wrk_threads(c), want, "c={c}");
            assert_eq!(c / wrk_threads(c) * wrk_threads(c), c, "c={c}: all opened");
        }
    }

    #[test]
    fn parses_wrk_report_line() {
        let out = "Running 1s test @ http://127.0.0.1:1/\n\
            inflight-bench requests=1000 duration_us=2000000 status=10 connect=0 read=1 write=0 timeout=2 p50=120 p90=500 p99=900 p999=1500\n";
        let l = parse_wrk(out).unwrap();
        assert_eq!((l.requests, l.non_2xx, l.errors), (1000, 10, 3));
        assert_eq!(l.rps(), 500.0);
        assert_eq!(l.ok_rps(), 495.0);
        assert_eq!(
            (l.p50_us, l.p90_us, l.p99_us, l.p999_us),
            (120.0, 500.0, 900.0, 1500.0)
        );
        assert!(parse_wrk("no report\n").is_none());
        assert!(
            parse_wrk("inflight-bench requests=1\n").is_none(),
            "fields missing"
        );
    }

    #[test]
    fn parses_hey_csv() {
        let csv = "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset\n\
            0.0010,0.0001,0.0000,0.0000,0.0009,0.0000,200,0.0000\n\
            0.0020,0.0000,0.0000,0.0000,0.0019,0.0000,503,0.0010\n\
            0.0030,0.0000,0.0000,0.0000,0.0029,0.0000,200,0.9970\n";
        let l = parse_hey_csv(csv).unwrap();
        assert_eq!((l.requests, l.non_2xx), (3, 1));
        assert!((l.seconds - 1.0).abs() < 1e-9);
        assert!((l.p50_us - 2000.0).abs() < 1e-6);
        assert!(parse_hey_csv("header only\n").is_none());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 500.0);
        assert_eq!(percentile(&v, 99.9), 999.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
