//! Envoy processes for the benchmark: the gateway in each setup, and one upstream.
//!
//! Every gateway has the same listener, route, cluster and worker count; the setups differ only
//! in the HTTP filter before the router and in the cluster's `max_requests` — and, for endpoint
//! picking alone, in the pieces picking needs ([`Picking`]). The upstream is Envoy too,
//! answering with a `direct_response`: fast, steady, and no code of ours in it.
//!
//! Ports are 0 and read back through the admin API (the admin of a picking gateway excepted: its
//! filter reaches it through a cluster, so its port is fixed before the start); each process is
//! killed when dropped.

use anyhow::{bail, Context as _, Result};
use inflight_envoy_control::bootstrap::{self, ROUTER, STATS_TAGS};
use inflight_envoy_control::Launch;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Buckets for the filter's `queue_wait_ms` histogram: its samples are whole milliseconds, so
/// bucket bounds at `n + 0.5` count each small value exactly (Envoy's defaults jump 1 → 5 → 10).
const WAIT_BUCKETS: &str = "[0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 8.5, 10.5, 12.5, 15.5, 20.5, 25.5, 30.5, 40.5, 50.5, 75.5, 100.5, 150.5, 200.5, 300.5, 500.5, 1000.5, 2000.5, 5000.5, 10000.5, 30000.5]";

/// How often Envoy merges the workers' histograms into what the admin API shows (default 5 s);
/// short, so the queue wait of one run can be read right after it (same in every setup).
pub const STATS_FLUSH: Duration = Duration::from_millis(250);

/// A proxy-wasm filter in the gateway's chain.
#[derive(Debug, Clone)]
pub struct WasmFilter {
    pub wasm: PathBuf,
    pub root_id: &'static str,
    /// The plugin configuration (JSON), if any.
    pub config: Option<String>,
}

/// What distinguishes one gateway setup from another.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    pub filter: Option<WasmFilter>,
    /// The upstream cluster's circuit breaker `max_requests`.
    pub max_requests: u32,
    /// Endpoint picking live; `None`: the bootstrap of the other setups, unchanged.
    pub picking: Option<Picking>,
}

/// What endpoint picking adds to a gateway: its admin on a fixed loopback port with a STATIC
/// cluster [`ADMIN_CLUSTER`] pointing at it (the filter's `membership` polls go there), and the
/// upstream cluster routed by the filter's endpoint header (`override_host`, least request
/// without it).
#[derive(Debug, Clone, Copy)]
pub struct Picking {
    pub admin_port: u16,
}

/// The name [`gateway_yaml`] gives the cluster of the upstream (a picking revision's
/// `upstreamCluster`).
pub const UPSTREAM_CLUSTER: &str = "upstream";

/// The cluster the filter's `membership.cluster` names in a picking gateway.
pub const ADMIN_CLUSTER: &str = "inflight_admin";

/// A loopback port free right now (bound and released), for an admin address that must be
/// known before Envoy starts. Another process may take it in between; the caller retries.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Envoy's own "never trips" value for the other thresholds and for uncapped setups.
pub const NO_LIMIT: u32 = 1_000_000;

pub fn gateway_yaml(spec: &GatewaySpec, upstream: SocketAddr) -> String {
    let filter = match &spec.filter {
        Some(f) => bootstrap::wasm_filter(f.root_id, &f.wasm, f.config.as_deref()),
        None => String::new(),
    };
    let (admin_port, lb_policy, admin_cluster) = match spec.picking {
        Some(p) => (
            p.admin_port,
            bootstrap::override_host_policy(inflight_core::config::DEFAULT_ENDPOINT_HEADER),
            bootstrap::admin_cluster(ADMIN_CLUSTER, p.admin_port),
        ),
        None => (0, String::new(), String::new()),
    };
    format!(
        r#"{admin}stats_flush_interval: {flush}s
stats_config:
{STATS_TAGS}  histogram_bucket_settings:
  - match: {{ prefix: "wasmcustom.inflight" }}
    buckets: {WAIT_BUCKETS}
{listener}          stream_idle_timeout: 600s
          route_config:
            virtual_hosts:
            - name: bench
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream, timeout: 0s }}
          http_filters:
{filter}{ROUTER}  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    circuit_breakers:
      thresholds:
      - {{ max_connections: {NO_LIMIT}, max_pending_requests: {NO_LIMIT}, max_requests: {max_requests}, max_retries: {NO_LIMIT} }}
{lb_policy}    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
{endpoint}{admin_cluster}"#,
        admin = bootstrap::admin(admin_port),
        listener = bootstrap::http_listener("ingress", 0, "ingress"),
        max_requests = spec.max_requests,
        flush = STATS_FLUSH.as_secs_f64(),
        endpoint = bootstrap::lb_endpoint(upstream),
    )
}

/// The upstream: every request answered 200 with a short body by Envoy itself.
pub fn upstream_yaml() -> String {
    format!(
        r#"{admin}{listener}          route_config:
            virtual_hosts:
            - name: upstream
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "ok\n" }} }}
          http_filters:
{ROUTER}"#,
        admin = bootstrap::admin(0),
        listener = bootstrap::http_listener("upstream", 0, "upstream"),
    )
}

/// A running Envoy, killed by its pid when dropped, with what the benchmark reads of it.
pub struct Envoy {
    process: inflight_envoy_control::Envoy,
    pub listener: SocketAddr,
}

impl Envoy {
    /// Starts Envoy with `yaml` and `workers` worker threads in `dir`; returns once it is LIVE
    /// and its listener's port is known.
    pub fn start(binary: &Path, dir: &Path, yaml: &str, workers: u32) -> Result<Envoy> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, yaml)?;
        let launch = Launch {
            workers,
            ..Launch::new(binary, &config, dir)
        };
        let mut envoy = inflight_envoy_control::Envoy::spawn(&launch)
            .with_context(|| format!("spawning {}", binary.display()))?;
        if let Err(e) = envoy.wait_live(Duration::from_secs(60)) {
            bail!("{e}; config {}:\n{}", config.display(), envoy.log_tail(40));
        }
        Ok(Envoy {
            listener: envoy.listener,
            process: envoy,
        })
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.process.alive()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// CPU time used by all of the process's threads so far, in nanoseconds.
    pub fn cpu_ns(&self) -> Result<u64> {
        cpu_ns(self.process.pid())
    }

    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        Ok(self.process.admin_get(path)?)
    }

    /// The buckets of the histogram named like `needle` once Envoy has merged every sample
    /// taken so far: read until two reads a few flush intervals apart agree.
    pub fn settled_histogram(&self, needle: &str) -> Result<Vec<(f64, u64)>> {
        let mut last = histogram_buckets(&self.prometheus()?, needle);
        for _ in 0..20 {
            std::thread::sleep(STATS_FLUSH * 2);
            let now = histogram_buckets(&self.prometheus()?, needle);
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    }

    /// The Prometheus exposition.
    pub fn prometheus(&self) -> Result<String> {
        let (status, body) = self.admin_get("/stats/prometheus")?;
        if status != 200 {
            bail!("/stats/prometheus answered {status}");
        }
        Ok(body)
    }
}

/// Sum of `/proc/<pid>/task/*/schedstat` run times (ns); falls back to `/proc/<pid>/stat`'s
/// utime + stime (clock ticks, assumed 100 Hz as on every Linux we target) without schedstats.
fn cpu_ns(pid: u32) -> Result<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    if let Ok(tasks) = tasks {
        let mut total = 0u64;
        let mut any = false;
        for t in tasks.flatten() {
            let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
                continue;
            };
            if let Some(ns) = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                total = total.saturating_add(ns);
                any = true;
            }
        }
        if any {
            return Ok(total);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    Ok((tick(11) + tick(12)) * 10_000_000)
}

/// Cumulative counts of a Prometheus histogram whose name contains `needle`, as `(le, count)`
/// in exposition order (`le = +Inf` last, as `f64::INFINITY`).
pub fn histogram_buckets(prometheus: &str, needle: &str) -> Vec<(f64, u64)> {
    let mut out = Vec::new();
    for line in prometheus.lines() {
        if line.starts_with('#') || !line.contains(needle) || !line.contains("_bucket{") {
            continue;
        }
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        let Some(count) = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        else {
            continue;
        };
        out.push((le, count as u64));
    }
    out
}

/// The sum of all samples of counters whose line contains every one of `needles`.
pub fn counter_sum(prometheus: &str, needles: &[&str]) -> u64 {
    prometheus
        .lines()
        .filter(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_yaml_differs_only_in_filter_and_cap() {
        let up = SocketAddr::from(([127, 0, 0, 1], 9000));
        let plain = gateway_yaml(
            &GatewaySpec {
                filter: None,
                max_requests: NO_LIMIT,
                picking: None,
            },
            up,
        );
        let capped = gateway_yaml(
            &GatewaySpec {
                filter: None,
                max_requests: 10,
                picking: None,
            },
            up,
        );
        assert!(plain.contains("max_requests: 1000000"));
        assert!(capped.contains("max_requests: 10,"));
        assert!(!plain.contains("envoy.wasm.runtime.v8"));
        let wasm = gateway_yaml(
            &GatewaySpec {
                filter: Some(WasmFilter {
                    wasm: PathBuf::from("/x/f.wasm"),
                    root_id: "inflight",
                    config: Some(r#"{"revisions":[]}"#.into()),
                }),
                max_requests: NO_LIMIT,
                picking: None,
            },
            up,
        );
        assert!(wasm.contains(r#"value: "{\"revisions\":[]}""#), "{wasm}");
        assert!(wasm.contains("port_value: 9000"));
    }

    /// Setup 5's bootstrap is setup 2's plus exactly what picking needs: the admin on its fixed
    /// port, the `override_host` policy on the upstream cluster, and the admin cluster.
    #[test]
    fn picking_adds_only_admin_port_policy_and_admin_cluster() {
        let up = SocketAddr::from(([127, 0, 0, 1], 9000));
        let filter = Some(WasmFilter {
            wasm: PathBuf::from("/x/f.wasm"),
            root_id: "inflight",
            config: Some(r#"{"revisions":[]}"#.into()),
        });
        let two = gateway_yaml(
            &GatewaySpec {
                filter: filter.clone(),
                max_requests: NO_LIMIT,
                picking: None,
            },
            up,
        );
        let five = gateway_yaml(
            &GatewaySpec {
                filter,
                max_requests: NO_LIMIT,
                picking: Some(Picking { admin_port: 19901 }),
            },
            up,
        );
        let policy = bootstrap::override_host_policy("x-gateway-destination-endpoint");
        let cluster = "    load_assignment:\n      cluster_name: upstream\n";
        let expected = two
            .replacen(&bootstrap::admin(0), &bootstrap::admin(19901), 1)
            .replacen(cluster, &format!("{policy}{cluster}"), 1)
            + &bootstrap::admin_cluster(ADMIN_CLUSTER, 19901);
        assert_eq!(five, expected);
        assert!(five.contains("envoy.load_balancing_policies.override_host"));
        assert!(five.contains("envoy.load_balancing_policies.least_request"));
        assert!(five.contains(&format!("  - name: {UPSTREAM_CLUSTER}\n")));
        assert_eq!(
            five.matches("port_value: 19901").count(),
            2,
            "admin and its cluster"
        );
        assert!(!two.contains("override_host") && !two.contains(ADMIN_CLUSTER));
    }

    #[test]
    fn parses_histogram_and_counters() {
        let text = "# TYPE x histogram\n\
            inflight_queue_wait_ms_bucket{revision=\"bench\",le=\"0.5\"} 3\n\
            inflight_queue_wait_ms_bucket{revision=\"bench\",le=\"1.5\"} 7\n\
            inflight_queue_wait_ms_bucket{revision=\"bench\",le=\"+Inf\"} 9\n\
            inflight_requests_total{revision=\"bench\",outcome=\"admitted\"} 12\n\
            inflight_requests_total{revision=\"bench\",outcome=\"shed_full\"} 2\n";
        assert_eq!(
            histogram_buckets(text, "queue_wait"),
            vec![(0.5, 3), (1.5, 7), (f64::INFINITY, 9)]
        );
        assert_eq!(
            counter_sum(text, &["inflight_requests_total", "admitted"]),
            12
        );
        assert_eq!(counter_sum(text, &["inflight_requests_total"]), 14);
        assert!(histogram_buckets("garbage le=\"x\" _bucket{", "x").is_empty());
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let ns = cpu_ns(std::process::id()).unwrap_or(0);
        assert!(ns > 0);
    }
}

/// The generated YAML, as it was before the generators shared `inflight_envoy_control::bootstrap`.
#[cfg(test)]
mod golden {
    use super::*;

    #[test]
    fn generated_yaml_is_unchanged() {
        let up = SocketAddr::from(([127, 0, 0, 1], 9000));
        let inflight = GatewaySpec {
            filter: Some(WasmFilter {
                wasm: PathBuf::from("/x/f.wasm"),
                root_id: "inflight",
                config: Some(
                    r#"{"revisions":[{"name":"bench","hosts":["bench.example"]}]}"#.into(),
                ),
            }),
            max_requests: 10,
            picking: None,
        };
        let empty = GatewaySpec {
            filter: Some(WasmFilter {
                wasm: PathBuf::from("/x/empty.wasm"),
                root_id: "empty",
                config: None,
            }),
            max_requests: NO_LIMIT,
            picking: None,
        };
        assert_eq!(
            gateway_yaml(&inflight, up),
            bootstrap::captured("bench-gateway.yaml").unwrap()
        );
        assert_eq!(
            gateway_yaml(&empty, up),
            bootstrap::captured("bench-gateway-empty.yaml").unwrap()
        );
        assert_eq!(
            upstream_yaml(),
            bootstrap::captured("bench-upstream.yaml").unwrap()
        );
    }
}
