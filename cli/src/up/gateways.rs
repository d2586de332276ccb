//! The stack's gateways: one Envoy with the filter on the stack's port (`gateways: 1`, the
//! default), or a fleet of N (docs/fleet.md) behind one more Envoy, the L4 load balancer, on
//! that port. Each gateway of a fleet has its own admin port, a public listener (where the L4
//! balancer sends connections) and a peer listener (its peer address, where the others forward
//! requests and ask for reports); all read the same EDS files and the same plugin configuration
//! (one ECDS file), and each learns its own peer address from its node metadata.
//!
//! [`plan`] chooses the ports and writes nothing but text, so the bootstraps can be checked
//! (`envoy --mode validate`) without starting anything; [`Gateways::start`] runs the plan.

use super::config::StackConfig;
use super::envoy::{self, Bootstrap, FleetMember, L4Lb};
use super::stats::{self, Snapshot};
use anyhow::{bail, Context as _, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One gateway to start: its directory (bootstrap, log, admin address file), ports and
/// bootstrap.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayPlan {
    pub name: String,
    pub dir: PathBuf,
    pub listener_port: u16,
    pub admin_port: u16,
    /// Its peer address, in a fleet.
    pub peer: Option<SocketAddr>,
    pub yaml: String,
}

/// The L4 load balancer to start in front of a fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct BalancerPlan {
    pub dir: PathBuf,
    pub port: u16,
    pub yaml: String,
}

/// Every Envoy of the stack, and the plugin configuration they share (the ECDS file's text).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub gateways: Vec<GatewayPlan>,
    pub balancer: Option<BalancerPlan>,
    pub filter: String,
}

impl Plan {
    /// Every bootstrap with the file it goes to.
    pub fn files(&self) -> Vec<(PathBuf, &str)> {
        let mut files: Vec<(PathBuf, &str)> = self
            .gateways
            .iter()
            .map(|g| (g.dir.join("envoy.yaml"), g.yaml.as_str()))
            .collect();
        if let Some(b) = &self.balancer {
            files.push((b.dir.join("envoy.yaml"), b.yaml.as_str()));
        }
        files
    }
}

/// The stack's Envoys for `config` (`config.gateways` of them, plus the balancer for two or
/// more), their directories under `stack_dir`. One gateway keeps today's layout: its bootstrap
/// and log in `stack_dir`, on `config.port` and `config.admin_port`. A fleet: the balancer on
/// `config.port`, gateway 0's admin on `config.admin_port`, every other port free.
pub fn plan(
    config: &StackConfig,
    lb: L4Lb,
    wasm: &Path,
    stack_dir: &Path,
    eds_dir: &Path,
    ecds_file: &Path,
) -> Result<Plan> {
    if !config.fleet() {
        let listener_port = envoy::pick_port(config.port)?;
        let admin_port = envoy::pick_port(config.admin_port)?;
        let Bootstrap { yaml, filter } =
            envoy::bootstrap(config, listener_port, admin_port, wasm, eds_dir, ecds_file)?;
        return Ok(Plan {
            gateways: vec![GatewayPlan {
                name: "gateway".into(),
                dir: stack_dir.to_path_buf(),
                listener_port,
                admin_port,
                peer: None,
                yaml,
            }],
            balancer: None,
            filter,
        });
    }
    let n = config.gateways as usize;
    // Balancer's port and admin, then per gateway: public, peer, admin.
    let mut wanted = vec![config.port, 0];
    for i in 0..n {
        wanted.extend([0, 0, if i == 0 { config.admin_port } else { 0 }]);
    }
    let ports = envoy::pick_ports(&wanted)?;
    let (port, balancer_admin) = (ports[0], ports[1]);
    let member_ports: Vec<(u16, u16, u16)> =
        ports[2..].chunks(3).map(|c| (c[0], c[1], c[2])).collect();
    let peers: Vec<SocketAddr> = member_ports
        .iter()
        .map(|&(_, peer, _)| SocketAddr::from(([127, 0, 0, 1], peer)))
        .collect();
    let mut gateways = Vec::new();
    let mut filter = String::new();
    for (index, &(listener_port, peer_port, admin_port)) in member_ports.iter().enumerate() {
        let member = FleetMember {
            index,
            peer_port,
            peers: &peers,
        };
        let generated = envoy::gateway_bootstrap(
            config,
            listener_port,
            admin_port,
            Some(&member),
            wasm,
            eds_dir,
            ecds_file,
        )?;
        // The plugin configuration is the same for every gateway (its own address is in the
        // node metadata): one ECDS file.
        filter = generated.filter;
        gateways.push(GatewayPlan {
            name: format!("gateway-{index}"),
            dir: stack_dir.join(format!("gateway-{index}")),
            listener_port,
            admin_port,
            peer: Some(member.peer_address()),
            yaml: generated.yaml,
        });
    }
    let publics: Vec<SocketAddr> = gateways
        .iter()
        .map(|g| SocketAddr::from(([127, 0, 0, 1], g.listener_port)))
        .collect();
    Ok(Plan {
        balancer: Some(BalancerPlan {
            dir: stack_dir.join("l4"),
            port,
            yaml: envoy::l4_bootstrap(port, balancer_admin, &publics, lb),
        }),
        gateways,
        filter,
    })
}

/// One running gateway.
pub struct Gateway {
    pub name: String,
    pub envoy: envoy::Envoy,
    pub peer: Option<SocketAddr>,
    pub config: PathBuf,
}

/// The running Envoys of the stack.
pub struct Gateways {
    pub members: Vec<Gateway>,
    /// The L4 load balancer in front of a fleet.
    pub balancer: Option<envoy::Envoy>,
}

impl Gateways {
    /// Writes the bootstraps and starts every Envoy of `plan` (the gateways, then the balancer),
    /// each LIVE before the next; one that fails stops those already started (by pid, on drop).
    pub fn start(plan: &Plan, binary: &Path, workers: u32) -> Result<Gateways> {
        let mut members = Vec::new();
        for g in &plan.gateways {
            std::fs::create_dir_all(&g.dir)
                .with_context(|| format!("creating {}", g.dir.display()))?;
            let config = g.dir.join("envoy.yaml");
            std::fs::write(&config, &g.yaml)
                .with_context(|| format!("writing {}", config.display()))?;
            let envoy = envoy::Envoy::start(binary, &config, workers, &g.dir)
                .with_context(|| format!("{} ({})", g.name, config.display()))?;
            members.push(Gateway {
                name: g.name.clone(),
                envoy,
                peer: g.peer,
                config,
            });
        }
        let balancer = match &plan.balancer {
            Some(b) => {
                std::fs::create_dir_all(&b.dir)
                    .with_context(|| format!("creating {}", b.dir.display()))?;
                let config = b.dir.join("envoy.yaml");
                std::fs::write(&config, &b.yaml)
                    .with_context(|| format!("writing {}", config.display()))?;
                // One worker: it only moves bytes, and round robin is exact within a worker.
                Some(
                    envoy::Envoy::start(binary, &config, 1, &b.dir)
                        .with_context(|| format!("the L4 load balancer ({})", config.display()))?,
                )
            }
            None => None,
        };
        Ok(Gateways { members, balancer })
    }

    /// Where clients send requests: the balancer of a fleet, else the one gateway.
    pub fn listener(&self) -> SocketAddr {
        match (&self.balancer, self.members.first()) {
            (Some(b), _) => b.listener,
            (None, Some(g)) => g.envoy.listener,
            (None, None) => SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// The first gateway's admin endpoint (`inflight top`, `inflight tune` reach the others'
    /// plugin configuration through the file they share).
    pub fn admin(&self) -> SocketAddr {
        self.members
            .first()
            .map_or(SocketAddr::from(([127, 0, 0, 1], 0)), |g| g.envoy.admin)
    }

    pub fn fleet(&self) -> bool {
        self.balancer.is_some()
    }

    /// Every Envoy's pid: the gateways', then the balancer's.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .map(|g| g.envoy.pid())
            .chain(self.balancer.iter().map(|b| b.pid()))
            .collect()
    }

    /// An error with the log of the first Envoy that has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(b) = &mut self.balancer {
            if b.exited() {
                bail!("the L4 load balancer exited:\n{}", b.log_tail(30));
            }
        }
        for g in &mut self.members {
            if g.envoy.exited() {
                bail!("envoy of {} exited:\n{}", g.name, g.envoy.log_tail(30));
            }
        }
        Ok(())
    }

    /// One scrape of every gateway, in order.
    pub fn scrape(&self) -> Vec<Result<Snapshot>> {
        self.members
            .iter()
            .map(|g| stats::scrape(g.envoy.admin).with_context(|| g.name.clone()))
            .collect()
    }

    /// Stops the balancer first (no new connections), then every gateway; waits for each pid.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(b) = &mut self.balancer {
            b.stop(grace);
        }
        for g in &mut self.members {
            g.envoy.stop(grace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::config::{self, StackConfig};

    fn demo(gateways: u32) -> StackConfig {
        let mut c = StackConfig::parse(config::DEMO).unwrap();
        c.gateways = gateways;
        c.port = 0;
        c
    }

    fn plan_in(c: &StackConfig, lb: L4Lb, dir: &Path) -> Plan {
        plan(
            c,
            lb,
            Path::new("/x/f.wasm"),
            dir,
            &dir.join("eds"),
            &envoy::ecds_path(dir),
        )
        .unwrap()
    }

    #[test]
    fn one_gateway_is_todays_stack() {
        let dir = Path::new("/tmp/s");
        let c = demo(1);
        let p = plan_in(&c, L4Lb::RoundRobin, dir);
        assert_eq!(p.gateways.len(), 1);
        assert!(p.balancer.is_none());
        let g = &p.gateways[0];
        assert_eq!(g.dir, dir, "bootstrap and log where they always were");
        let want = envoy::bootstrap(
            &c,
            g.listener_port,
            g.admin_port,
            Path::new("/x/f.wasm"),
            &dir.join("eds"),
            &envoy::ecds_path(dir),
        )
        .unwrap();
        assert_eq!((&g.yaml, &p.filter), (&want.yaml, &want.filter));
        assert!(!g.yaml.contains("inflight-peer"), "{}", g.yaml);
    }

    #[test]
    fn a_fleet_has_distinct_ports_one_filter_file_and_a_balancer() {
        let dir = Path::new("/tmp/s");
        let p = plan_in(&demo(3), L4Lb::Random, dir);
        assert_eq!(p.gateways.len(), 3);
        let b = p.balancer.as_ref().unwrap();
        let mut ports = vec![b.port];
        for g in &p.gateways {
            ports.extend([g.listener_port, g.admin_port, g.peer.unwrap().port()]);
        }
        let n = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), n, "every port once: {ports:?}");
        assert!(b.yaml.contains("lb_policy: RANDOM"), "{}", b.yaml);
        for g in &p.gateways {
            // The balancer spreads over the public listeners, never the peer ports.
            assert!(
                b.yaml
                    .contains(&format!("port_value: {} }}", g.listener_port)),
                "{}",
                b.yaml
            );
            assert!(
                !b.yaml
                    .contains(&format!("port_value: {} }}", g.peer.unwrap().port())),
                "{}",
                b.yaml
            );
            assert!(
                g.yaml.contains(&format!(
                    "metadata: {{ INFLIGHT_FLEET_SELF: \"{}\" }}",
                    g.peer.unwrap()
                )),
                "{}",
                g.yaml
            );
            // Every peer in every gateway's peer cluster.
            for other in &p.gateways {
                assert!(
                    g.yaml.contains(&envoy_endpoint(other.peer.unwrap())),
                    "{}",
                    g.yaml
                );
            }
        }
        let dirs: Vec<_> = p.files().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            dirs,
            [
                dir.join("gateway-0/envoy.yaml"),
                dir.join("gateway-1/envoy.yaml"),
                dir.join("gateway-2/envoy.yaml"),
                dir.join("l4/envoy.yaml"),
            ]
        );
        let plugin = plugin_of(&p.filter);
        assert_eq!(plugin["fleet"]["peerCluster"], "inflight-peers");
        assert_eq!(
            plan_in(&demo(2), L4Lb::RoundRobin, dir)
                .balancer
                .unwrap()
                .yaml
                .matches("lb_policy: ROUND_ROBIN")
                .count(),
            1
        );
    }

    fn envoy_endpoint(a: SocketAddr) -> String {
        inflight_envoy_control::bootstrap::lb_endpoint(a)
    }

    fn plugin_of(filter: &str) -> serde_json::Value {
        let doc: serde_json::Value = serde_norway::from_str(filter).unwrap();
        let text = doc["resources"][0]["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap()
            .to_string();
        serde_json::from_str(&text).unwrap()
    }

    /// Each gateway's bootstrap as YAML: its listeners and the routes and clusters a fleet adds.
    #[test]
    fn a_fleet_gateway_has_a_peer_listener_and_forwards_first() {
        let p = plan_in(&demo(3), L4Lb::RoundRobin, Path::new("/tmp/s"));
        for g in &p.gateways {
            let doc: serde_json::Value = serde_norway::from_str(&g.yaml).unwrap();
            let listeners = doc["static_resources"]["listeners"].as_array().unwrap();
            let names: Vec<_> = listeners.iter().map(|l| l["name"].clone()).collect();
            assert_eq!(names, ["ingress", "peer"]);
            let port = |l: &serde_json::Value| {
                l["address"]["socket_address"]["port_value"]
                    .as_u64()
                    .unwrap()
            };
            assert_eq!(port(&listeners[0]), u64::from(g.listener_port));
            assert_eq!(port(&listeners[1]), u64::from(g.peer.unwrap().port()));
            // The same manager, routes and filter on both, apart from the stats prefix.
            let hcm = |l: &serde_json::Value| {
                let mut h = l["filter_chains"][0]["filters"][0]["typed_config"].clone();
                h["stat_prefix"] = serde_json::Value::Null;
                h
            };
            assert_eq!(hcm(&listeners[0]), hcm(&listeners[1]));
            let vhosts = listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
                ["route_config"]["virtual_hosts"]
                .as_array()
                .unwrap();
            assert_eq!(vhosts.len(), 2);
            for v in vhosts {
                let first = &v["routes"][0];
                assert_eq!(first["match"]["headers"][0]["name"], "x-inflight-peer");
                assert_eq!(first["route"]["cluster"], "inflight-peer-direct");
                assert_eq!(v["routes"].as_array().unwrap().len(), 2);
            }
            let clusters: Vec<_> = doc["static_resources"]["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(
                clusters,
                [
                    "torchserve",
                    "inflight-peers",
                    "inflight-peer-direct",
                    "inflight_admin"
                ]
            );
            let admin = doc["static_resources"]["clusters"][3]["load_assignment"]["endpoints"][0]
                ["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"]
                .as_u64()
                .unwrap();
            assert_eq!(
                admin,
                u64::from(g.admin_port),
                "the filter polls its own admin"
            );
        }
    }

    /// The bootstrap with its filter's `config_discovery` entry replaced by the filter itself,
    /// from the ECDS file's text: `envoy --mode validate` does not read ECDS files, so this is
    /// how the plugin configuration gets checked too.
    fn with_filter_inline(yaml: &str, ecds: &str) -> String {
        const INDENT: &str = "          ";
        let head = format!("{INDENT}- name: {}\n", envoy::FILTER);
        let start = yaml
            .find(&format!("{head}{INDENT}  config_discovery:\n"))
            .unwrap();
        let rest = &yaml[start + head.len()..];
        let len = rest.find(&format!("\n{INDENT}- ")).unwrap() + 1;
        let filter: String = ecds
            .lines()
            .skip(2) // `resources:` and the resource's `@type`
            .map(|l| {
                let l = l.replacen(
                    "  name: ",
                    "- name: ",
                    usize::from(l.starts_with("  name: ")),
                );
                format!("{INDENT}{l}\n")
            })
            .collect();
        assert!(filter.starts_with(&head), "{filter}");
        let yaml = format!("{}{filter}{}", &yaml[..start], &rest[len..]);
        // The peer listener has the same entry.
        if yaml.contains("config_discovery") {
            with_filter_inline(&yaml, ecds)
        } else {
            yaml
        }
    }

    /// `envoy --mode validate` on every bootstrap of one gateway and of fleets (with the filter
    /// and its plugin configuration inline, and the EDS files they name in place; Envoy from
    /// `make setup`, the filter built as the host tests build it).
    #[test]
    fn envoy_validates_every_generated_bootstrap() {
        let envoy_bin = crate::up::find_envoy(&None).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let wasm = inflight_envoy_control::WasmBuild::filter(root, "target-emu-wasm")
            .run()
            .unwrap();
        for (name, gateways, lb) in [
            ("one gateway", 1, L4Lb::RoundRobin),
            ("fleet of three, round robin", 3, L4Lb::RoundRobin),
            ("fleet of two, random", 2, L4Lb::Random),
        ] {
            let dir = std::env::temp_dir().join(format!(
                "inflight-gateways-validate-{}-{gateways}",
                std::process::id()
            ));
            let eds_dir = dir.join("eds");
            std::fs::create_dir_all(&eds_dir).unwrap();
            let ecds = envoy::ecds_path(&dir);
            std::fs::create_dir_all(ecds.parent().unwrap()).unwrap();
            let c = demo(gateways);
            let p = plan(&c, lb, &wasm, &dir, &eds_dir, &ecds).unwrap();
            std::fs::write(&ecds, &p.filter).unwrap();
            for r in &c.revisions {
                crate::up::eds::write(&envoy::eds_path(&eds_dir, &r.name), &r.name, 1, &[], &[])
                    .unwrap();
            }
            let files = p.files();
            assert_eq!(
                files.len(),
                if gateways == 1 {
                    1
                } else {
                    gateways as usize + 1
                }
            );
            for (file, yaml) in files {
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                // As written (the filter through ECDS), then with the filter inline.
                let mut variants = vec![(file.clone(), yaml.to_string())];
                if yaml.contains("config_discovery") {
                    let inline = with_filter_inline(yaml, &p.filter);
                    assert!(!inline.contains("config_discovery"), "{inline}");
                    variants.push((file.with_file_name("inline.yaml"), inline));
                }
                for (file, yaml) in variants {
                    std::fs::write(&file, yaml).unwrap();
                    if let Err(e) = inflight_envoy_control::validate(&envoy_bin, &file, None) {
                        panic!("{name}: {}: {e}", file.display());
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
