//! Pieces of Envoy bootstrap YAML that the project's generators (the benchmark's setups, the
//! local stack, the test gateways) write the same way. Each generator keeps its own document;
//! these are only the fragments whose text really is the same, each a whole number of lines,
//! indented for the place it goes.

use std::net::SocketAddr;
use std::path::Path;

/// `stats_tags` as shipped (`envoy/envoy.yaml`): the filter's `revision.<name>`,
/// `outcome.<o>` and `class.<c>` name segments become Prometheus labels. Goes under
/// `stats_config:`.
pub const STATS_TAGS: &str = r#"  stats_tags:
  - tag_name: revision
    regex: '^wasmcustom\.inflight\.(revision\.([a-z0-9-]+)\.)'
  - tag_name: outcome
    regex: '^wasmcustom\.inflight\.revision\.[a-z0-9-]+\.(outcome\.([a-z_]+)\.)'
  - tag_name: class
    regex: '^wasmcustom\.inflight\.revision\.[a-z0-9-]+\.(?:outcome\.[a-z_]+\.)?(class\.([a-z0-9-]+)\.)'
"#;

/// Envoy's router, the last entry of `http_filters`.
pub const ROUTER: &str = r#"          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
"#;

/// The admin endpoint on loopback `port` (0: any; read it back through
/// `--admin-address-path`).
pub fn admin(port: u16) -> String {
    format!(
        "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n"
    )
}

/// `static_resources:` and the head of its one listener, on loopback `port`, with an HTTP
/// connection manager, up to its `stat_prefix`: the caller goes on with the manager's other
/// settings, its `route_config` and its `http_filters`.
pub fn http_listener(name: &str, port: u16, stat_prefix: &str) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {stat_prefix}
"#
    )
}

/// An `http_filters` entry running the proxy-wasm module `wasm` in V8 under `root_id` (also
/// its name and VM id), with `configuration` (the plugin's JSON) as a string if given.
pub fn wasm_filter(root_id: &str, wasm: &Path, configuration: Option<&str>) -> String {
    let configuration = match configuration {
        Some(c) => format!(
            "\n                configuration:\n                  \"@type\": type.googleapis.com/google.protobuf.StringValue\n                  value: {}",
            serde_json::to_string(c).unwrap_or_default()
        ),
        None => String::new(),
    };
    format!(
        r#"          - name: {root_id}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {root_id}
                root_id: {root_id}
                failure_policy: FAIL_RELOAD
                vm_config:
                  vm_id: {root_id}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: "{wasm}" }} }}{configuration}
"#,
        wasm = wasm.display(),
    )
}

/// One `lb_endpoints` entry.
pub fn lb_endpoint(addr: SocketAddr) -> String {
    format!(
        "        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}\n",
        addr.ip(),
        addr.port()
    )
}

/// A cluster's `load_balancing_policy` (at 4 spaces, inside a cluster) that routes a request to
/// the endpoint named in request header `header` (`IP:port`, Envoy's `override_host` policy),
/// the filter's pick; requests without the header, or naming an endpoint the cluster does not
/// have, go to the least-loaded endpoint (least request, full scan). That fallback keeps a
/// request whose pod just left EDS (before the filter's next poll) served, at the price of a
/// pod briefly above `containerConcurrency`; [`override_host_policy_strict`] refuses it
/// instead. A pod removed gracefully (listed as `DRAINING` until it stops, as `inflight up`
/// does) needs neither: Envoy still sends it what the filter picked.
pub fn override_host_policy(header: &str) -> String {
    override_host_with_fallback(
        header,
        r#"              - typed_extension_config:
                  name: envoy.load_balancing_policies.least_request
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest
                    selection_method: FULL_SCAN
"#,
    )
}

/// [`override_host_policy`] without a balancing fallback: a request naming no endpoint, or one
/// the cluster no longer has, gets Envoy's 503 `no healthy upstream` (a subset balancer whose
/// one subset matches no host, with no fallback of its own). No pod ever goes above
/// `containerConcurrency`, even when pods leave EDS abruptly; requests picked for a pod in the
/// moment after it left fail instead (docs/deploy.md).
pub fn override_host_policy_strict(header: &str) -> String {
    override_host_with_fallback(
        header,
        r#"              - typed_extension_config:
                  name: envoy.load_balancing_policies.subset
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.subset.v3.Subset
                    fallback_policy: NO_FALLBACK
                    subset_selectors: [{ keys: [inflight.never] }]
                    subset_lb_policy:
                      policies:
                      - typed_extension_config:
                          name: envoy.load_balancing_policies.round_robin
                          typed_config: { "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin }
"#,
    )
}

fn override_host_with_fallback(header: &str, fallback: &str) -> String {
    format!(
        r#"    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources: [{{ header: {header} }}]
            fallback_policy:
              policies:
{fallback}"#
    )
}

/// A STATIC cluster `name` of the one endpoint loopback `port`: the filter's way to the admin
/// endpoint (`membership.cluster`), to learn ready replicas.
pub fn admin_cluster(name: &str, port: u16) -> String {
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{}",
        lb_endpoint(SocketAddr::from(([127, 0, 0, 1], port)))
    )
}

/// A cluster's `eds_cluster_config` reading its endpoints from the file `eds_file`; Envoy
/// watches the file's directory for the file being moved into place.
pub fn eds_from_file(eds_file: &Path) -> String {
    format!(
        "    eds_cluster_config:\n      eds_config:\n        resource_api_version: V3\n        path_config_source:\n          path: \"{}\"\n          watched_directory: {{ path: \"{}\" }}\n",
        eds_file.display(),
        eds_file.parent().unwrap_or(Path::new(".")).display()
    )
}

/// Moves the one listener of a bootstrap written with [`http_listener`] (everything between
/// `  listeners:` and `  clusters:`) into a file-based LDS resource for `lds_path`, watched in
/// that file's directory: returns the bootstrap that reads it, and the file's contents. Envoy
/// then reloads the listener when the file is replaced by a rename — a new plugin configuration
/// without a restart. A listener's address cannot change in an update, so `port`, if given,
/// replaces the listener's `port_value: 0`. None if the bootstrap has no such listener.
pub fn listener_from_file(
    yaml: &str,
    lds_path: &Path,
    port: Option<u16>,
) -> Option<(String, String)> {
    let start = yaml.find("  listeners:\n")?;
    let end = yaml.find("  clusters:\n")?;
    let block = yaml.get(start + "  listeners:\n".len()..end)?;
    let mut listener: String = block
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        .replacen(
            "- name: ",
            "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: ",
            1,
        );
    if let Some(port) = port {
        listener = listener.replacen("port_value: 0", &format!("port_value: {port}"), 1);
    }
    let lds = format!("resources:\n{listener}\n");
    let bootstrap = format!(
        "{}{}dynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    path_config_source:\n      path: \"{}\"\n      watched_directory: {{ path: \"{}\" }}\n",
        &yaml[..start],
        &yaml[end..],
        lds_path.display(),
        lds_path.parent().unwrap_or(Path::new(".")).display(),
    );
    Some((bootstrap, lds))
}

/// Moves the `http_filters` entry `name` of a bootstrap (as [`wasm_filter`] writes it: ten
/// spaces, then `- name: {name}`, up to the next entry) into a file-based ECDS resource for
/// `ecds_path` — the way Istio delivers a WasmPlugin: the entry left in the listener only
/// names the filter and where its configuration comes from (`config_discovery`), and the file
/// holds a `TypedExtensionConfig` of that name. Returns the bootstrap and the file's contents.
/// Envoy watches the file's directory and applies a new file (replaced by a rename) to the
/// filter chains it creates from then on; the listener stays. The filter is warmed: the
/// listener serves only once the file gave a valid configuration. None if there is no entry
/// `name` followed by another entry.
pub fn filter_from_file(yaml: &str, name: &str, ecds_path: &Path) -> Option<(String, String)> {
    const INDENT: &str = "          ";
    // `needle` at the start of a line of `text` (a deeper entry also contains the indent).
    let line_at = |text: &str, needle: &str| {
        text.match_indices(needle)
            .map(|(i, _)| i)
            .find(|&i| i == 0 || text.as_bytes().get(i - 1) == Some(&b'\n'))
    };
    let head = format!("{INDENT}- name: {name}\n");
    let start = line_at(yaml, &head)?;
    let len = line_at(yaml.get(start + head.len()..)?, &format!("{INDENT}- "))?;
    let block = yaml.get(start..start + head.len() + len)?;
    let resource: String = block
        .lines()
        .map(|l| l.strip_prefix(INDENT).unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        .replacen(
            "- name: ",
            "- \"@type\": type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\n  name: ",
            1,
        );
    let ecds = format!("resources:\n{resource}\n");
    let entry = format!(
        "{head}{INDENT}  config_discovery:\n{INDENT}    config_source:\n{INDENT}      resource_api_version: V3\n{INDENT}      path_config_source:\n{INDENT}        path: \"{}\"\n{INDENT}        watched_directory: {{ path: \"{}\" }}\n{INDENT}    type_urls: [\"type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\"]\n",
        ecds_path.display(),
        ecds_path.parent().unwrap_or(Path::new(".")).display(),
    );
    let bootstrap = format!("{}{entry}{}", &yaml[..start], &yaml[start + block.len()..]);
    Some((bootstrap, ecds))
}

/// The node metadata key naming a gateway's own peer address (`IP:port`) in a fleet: the filter
/// reads it when the plugin configuration's `fleet.self` is unset (docs/fleet.md).
pub const FLEET_SELF_KEY: &str = "INFLIGHT_FLEET_SELF";

/// The bootstrap's `node:` line: `id` (also its cluster), with the gateway's own peer address
/// under [`FLEET_SELF_KEY`] when it is a member of a fleet.
pub fn node(id: &str, fleet_self: Option<SocketAddr>) -> String {
    match fleet_self {
        Some(addr) => {
            format!("node: {{ id: {id}, cluster: {id}, metadata: {{ {FLEET_SELF_KEY}: \"{addr}\" }} }}\n")
        }
        None => format!("node: {{ id: {id}, cluster: {id} }}\n"),
    }
}

/// A cluster entry (at 2 spaces, under `clusters:`) of type `ORIGINAL_DST` that sends each
/// request to the `IP:port` named in request header `header`: the fleet's way to one chosen peer
/// gateway, for reports and forwarded requests (`fleet.forwardCluster`).
pub fn forward_cluster(name: &str, header: &str) -> String {
    format!(
        "  - name: {name}\n    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED\n    connect_timeout: 1s\n    original_dst_lb_config: {{ use_http_header: true, http_header_name: {header} }}\n"
    )
}

/// A STATIC cluster entry (at 2 spaces) `name` of the gateways' peer addresses: the fleet's
/// members (`fleet.peerCluster`), polled through the admin like the revisions' clusters.
pub fn peer_cluster(name: &str, peers: &[SocketAddr]) -> String {
    let endpoints: String = peers.iter().map(|p| lb_endpoint(*p)).collect();
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{endpoints}"
    )
}

/// The forward route, first in each virtual host (a `routes:` entry at 14 spaces, as the
/// generators indent them): a request carrying `header` (set only by the filter, which strips
/// it from everything else) goes to the peer gateway it names through `cluster`.
pub fn forward_route(header: &str, cluster: &str) -> String {
    format!(
        "              - match: {{ prefix: \"/\", headers: [{{ name: {header}, present_match: true }}] }}\n                route: {{ cluster: {cluster}, timeout: 0s }}\n"
    )
}

/// A listener `name` on loopback `port` that passes TCP connections to the endpoints of
/// `cluster` (`tcp_proxy`): the L4 load balancer in front of a local fleet of gateways, as a
/// Kubernetes Service spreads connections over gateway pods. A connection refused by a gateway
/// that died is tried on another (up to 3 attempts). Starts with `  - name:` (under
/// `listeners:`).
pub fn tcp_proxy_listener(name: &str, port: u16, cluster: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
          max_connect_attempts: 3
"#
    )
}

/// What a generator wrote for a representative input before the generators shared these
/// fragments (`envoy-control/testdata/<name>`), for its tests to compare with.
pub fn captured(name: &str) -> std::io::Result<String> {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_moves_to_its_file() {
        let yaml = format!(
            "{}{}          http_filters:\n{ROUTER}  clusters:\n  - name: c\n",
            admin(9901),
            http_listener("ingress", 0, "ingress")
        );
        let (boot, lds) =
            listener_from_file(&yaml, Path::new("/tmp/lds/listener.yaml"), Some(8080)).unwrap();
        assert!(lds.starts_with("resources:\n- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: ingress\n"), "{lds}");
        assert!(lds.contains("port_value: 8080"), "{lds}");
        assert!(
            !boot.contains("listeners:") && boot.contains("  clusters:\n  - name: c\n"),
            "{boot}"
        );
        assert!(
            boot.contains("path: \"/tmp/lds/listener.yaml\"")
                && boot.contains("watched_directory: { path: \"/tmp/lds\" }"),
            "{boot}"
        );
        assert!(boot.contains("static_resources:\n"), "{boot}");
        assert_eq!(
            listener_from_file("admin: {}\n", Path::new("/x"), None),
            None
        );
    }

    #[test]
    fn the_wasm_filter_moves_to_its_ecds_file() {
        let yaml = format!(
            "{}          http_filters:\n{}{ROUTER}  clusters:\n  - name: c\n",
            http_listener("ingress", 0, "ingress"),
            wasm_filter("inflight", Path::new("/x/f.wasm"), Some("{}"))
        );
        let (boot, ecds) =
            filter_from_file(&yaml, "inflight", Path::new("/tmp/ecds/inflight.yaml")).unwrap();
        assert!(
            ecds.starts_with("resources:\n- \"@type\": type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\n  name: inflight\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\n"),
            "{ecds}"
        );
        assert!(
            ecds.contains("\n      root_id: inflight\n") && !ecds.contains("router"),
            "{ecds}"
        );
        assert!(
            boot.contains("          - name: inflight\n            config_discovery:\n")
                && boot.contains("path: \"/tmp/ecds/inflight.yaml\"")
                && boot.contains("watched_directory: { path: \"/tmp/ecds\" }"),
            "{boot}"
        );
        assert!(
            !boot.contains("wasm.v3.Wasm\n"),
            "no inline filter left: {boot}"
        );
        assert!(
            boot.ends_with(&format!("{ROUTER}  clusters:\n  - name: c\n")),
            "{boot}"
        );
        let cases = [
            ("no such filter", "other"),
            (
                "the last entry (nothing after it)",
                "envoy.filters.http.router",
            ),
        ];
        for (what, name) in cases {
            assert_eq!(
                filter_from_file(&yaml, name, Path::new("/x")),
                None,
                "{what}"
            );
        }
    }

    #[test]
    fn fragments_are_whole_lines() {
        let cases = [
            ("stats tags", STATS_TAGS.to_string()),
            ("router", ROUTER.to_string()),
            ("admin", admin(0)),
            ("listener", http_listener("ingress", 8080, "ingress")),
            (
                "wasm filter",
                wasm_filter("inflight", Path::new("/f.wasm"), None),
            ),
            (
                "wasm filter with configuration",
                wasm_filter("inflight", Path::new("/f.wasm"), Some("{}")),
            ),
            (
                "endpoint",
                lb_endpoint(SocketAddr::from(([127, 0, 0, 1], 1))),
            ),
            ("admin cluster", admin_cluster("inflight_admin", 9901)),
            ("eds", eds_from_file(Path::new("/eds/rev-a.json"))),
        ];
        for (name, text) in cases {
            assert!(
                text.ends_with('\n') && !text.ends_with("\n\n"),
                "{name}: {text:?}"
            );
        }
    }

    #[test]
    fn the_plugin_configuration_is_one_yaml_string() {
        let f = wasm_filter("inflight", Path::new("/x/f.wasm"), Some(r#"{"a":"b\n"}"#));
        assert!(
            f.ends_with("                  value: \"{\\\"a\\\":\\\"b\\\\n\\\"}\"\n"),
            "{f}"
        );
        assert!(
            f.contains("code: { local: { filename: \"/x/f.wasm\" } }\n"),
            "{f}"
        );
        assert!(!wasm_filter("e", Path::new("/e.wasm"), None).contains("configuration"));
    }

    #[test]
    fn eds_watches_the_directory_of_its_file() {
        let cases = [
            (
                "absolute",
                "/tmp/eds/a.json",
                "watched_directory: { path: \"/tmp/eds\" }",
            ),
            ("bare name", "a.json", "watched_directory: { path: \"\" }"),
        ];
        for (name, file, want) in cases {
            assert!(eds_from_file(Path::new(file)).contains(want), "{name}");
        }
    }
}
