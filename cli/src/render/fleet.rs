//! The Istio pieces a fleet of gateway replicas needs (docs/fleet.md, docs/deploy.md "A fleet of
//! gateways"), written after the filter by the two Istio outputs:
//!
//! - a headless `Service` of the gateway pods on the peer port, whose DNS name lists every
//!   gateway pod that exists, ready or not: the peer cluster resolves it;
//! - the `EnvoyFilter` `inflight-fleet`, four patches on the gateway's Envoy:
//!   1. `CLUSTER ADD` of the peer cluster (`STRICT_DNS` of that Service), which the filter polls
//!      through the admin like the revisions' clusters;
//!   2. `CLUSTER ADD` of the forward cluster (`ORIGINAL_DST` on the peer header), through which
//!      the filter reaches one chosen peer, for its reports and for forwarded requests;
//!   3. `LISTENER MERGE` of the peer port into the gateway's plain-HTTP listener as an
//!      `additional_addresses` entry: the same listener, so the same HTTP connection manager,
//!      Istio filters, inflight filter and routes serve the peer port, while the public Service
//!      never exposes it;
//!   4. `HTTP_ROUTE INSERT_FIRST` of the forward route in every virtual host.
//!
//! Why an additional address and not a second Istio `Gateway` server or a `LISTENER ADD`: a
//! server on the peer port would only carry the routes of VirtualServices bound to that
//! `Gateway` object, and KServe and Knative generate theirs bound to their own gateways (we
//! would have to edit objects the installation owns, or duplicate every route); a listener added
//! by an EnvoyFilter would need a copy of the connection manager and of the WasmPlugin's filter,
//! which Istio only puts into the listeners it generates. Envoy 1.40 accepts adding and removing
//! the address on a running listener (an in-place listener update, checked in
//! `cli/tests/render_envoy.rs`).
//!
//! The Envoy text of the forward cluster and the forward route is the project's shared fragment
//! (`inflight_envoy_control::bootstrap`), as the local fleet (`inflight up --gateways`) writes it.

use super::out::{metadata, Gateway, Labels, Metadata};
use anyhow::{Context as _, Result};
use inflight_envoy_control::bootstrap;
use serde::Serialize;
use std::collections::BTreeMap;

pub use inflight_core::config::{
    DEFAULT_FORWARD_CLUSTER, DEFAULT_FORWARD_HEADER, DEFAULT_PEER_PORT,
};
/// The peer cluster's name (the filter has no default: `fleet.peerCluster` is required).
pub const DEFAULT_PEER_CLUSTER: &str = "inflight-peers";
/// The headless Service of the gateway pods (named as the peer cluster that resolves it).
pub const PEERS_SERVICE: &str = "inflight-peers";
/// The EnvoyFilter with the fleet's clusters, peer port and forward route.
pub const FLEET_ENVOYFILTER: &str = "inflight-fleet";

/// The names a fleet's Envoy pieces share with the filter configuration's `fleet` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    pub peer_cluster: String,
    pub forward_cluster: String,
    pub forward_header: String,
    pub peer_port: u16,
}

impl Default for Fleet {
    fn default() -> Fleet {
        Fleet {
            peer_cluster: DEFAULT_PEER_CLUSTER.into(),
            forward_cluster: DEFAULT_FORWARD_CLUSTER.into(),
            forward_header: DEFAULT_FORWARD_HEADER.into(),
            peer_port: DEFAULT_PEER_PORT,
        }
    }
}

/// The headless Service's DNS name: Kubernetes answers it with the addresses of every gateway
/// pod that exists (`publishNotReadyAddresses: true`): one that is starting, or draining after
/// `/healthcheck/fail`, may hold slots and must be counted (docs/fleet.md, `peerCluster`); one
/// that is gone drops out, and its peers also give it up when it stops answering reports.
pub fn peers_fqdn(gateway_namespace: &str) -> String {
    format!("{PEERS_SERVICE}.{gateway_namespace}.svc.cluster.local")
}

// ---- the Service ----

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Service {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: ServiceSpec,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    /// Headless: DNS returns the pods themselves, no virtual IP spreads connections.
    #[serde(rename = "clusterIP")]
    cluster_ip: &'static str,
    /// IPv4, as the peer cluster resolves it and the peer address listens: an IPv6-only
    /// cluster refuses the Service (saying why) rather than leaving the fleet empty.
    ip_family_policy: &'static str,
    ip_families: Vec<&'static str>,
    publish_not_ready_addresses: bool,
    selector: BTreeMap<String, String>,
    ports: Vec<ServicePort>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServicePort {
    name: &'static str,
    port: u16,
    target_port: u16,
    protocol: &'static str,
}

fn service(fleet: &Fleet, gw: &Gateway<'_>) -> Service {
    let mut metadata = metadata(PEERS_SERVICE, gw.namespace);
    // Only the gateway's own namespace needs Istio's view of it (and the gateway reaches it
    // by DNS, not through Istio's cluster of it): keep it out of every sidecar's config.
    metadata
        .annotations
        .insert("networking.istio.io/exportTo".into(), ".".into());
    Service {
        api_version: "v1",
        kind: "Service",
        metadata,
        spec: ServiceSpec {
            cluster_ip: "None",
            ip_family_policy: "SingleStack",
            ip_families: vec!["IPv4"],
            publish_not_ready_addresses: true,
            selector: gw.selector.clone(),
            ports: vec![ServicePort {
                name: "http-inflight-peer",
                port: fleet.peer_port,
                target_port: fleet.peer_port,
                protocol: "TCP",
            }],
        },
    }
}

// ---- the EnvoyFilter ----

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvoyFilter {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    workload_selector: Labels,
    config_patches: Vec<Patch>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Patch {
    apply_to: &'static str,
    #[serde(rename = "match")]
    on: Match,
    patch: Operation,
}

#[derive(Serialize)]
struct Match {
    context: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    listener: Option<ListenerPort>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListenerPort {
    port_number: u16,
}

#[derive(Serialize)]
struct Operation {
    operation: &'static str,
    /// Envoy's own YAML (a `Cluster`, `Listener` or `Route` fragment), in the order written.
    value: serde_norway::Value,
}

/// The peer cluster: the headless Service's addresses on the peer port. Re-resolved at Envoy's
/// default rate (5 s, CoreDNS's TTL for Service records; `dns_refresh_rate` is deprecated in
/// Envoy 1.40): a gateway that joins is seen within that, one that dies is taken for dead by
/// its missing reports (`fleet.lostAfter`) sooner. IPv4 only, as the first of Istio's
/// `INSTANCE_IPS` is on an IPv4 or dual-stack cluster: the filter finds itself among the peers
/// by that address.
pub fn peer_cluster(fleet: &Fleet, gateway_namespace: &str) -> String {
    let host = peers_fqdn(gateway_namespace);
    format!(
        r#"name: {name}
type: STRICT_DNS
dns_lookup_family: V4_ONLY
connect_timeout: 1s
load_assignment:
  cluster_name: {name}
  endpoints:
  - lb_endpoints:
    - endpoint:
        address:
          socket_address:
            address: {host}
            port_value: {port}
"#,
        name = fleet.peer_cluster,
        port = fleet.peer_port,
    )
}

/// The patch values, in the order of the EnvoyFilter's patches: peer cluster, forward cluster,
/// the listener's additional address, the forward route.
pub struct PatchValues {
    pub peer_cluster: serde_norway::Value,
    pub forward_cluster: serde_norway::Value,
    pub listener: serde_norway::Value,
    pub forward_route: serde_norway::Value,
}

pub fn patch_values(fleet: &Fleet, gateway_namespace: &str) -> Result<PatchValues> {
    let yaml = |what: &str, text: &str| -> Result<serde_norway::Value> {
        serde_norway::from_str(text).with_context(|| format!("{what} is not YAML:\n{text}"))
    };
    // The shared fragments are list entries (`- name: …`) indented for a bootstrap: one item.
    let first = |what: &str, text: &str| -> Result<serde_norway::Value> {
        match yaml(what, text)? {
            serde_norway::Value::Sequence(mut items) if items.len() == 1 => Ok(items.remove(0)),
            other => anyhow::bail!("{what}: expected one list entry, got {other:?}"),
        }
    };
    let mut forward_cluster = first(
        "the forward cluster",
        &bootstrap::forward_cluster(&fleet.forward_cluster, &fleet.forward_header),
    )?;
    // Envoy's default circuit breakers allow 1024 requests (and connections, and pending
    // requests) per cluster: forwarded requests are the excess of a busy gateway, so lift them
    // as Istio lifts them on its own clusters. The filter's limits are what hold.
    if let serde_norway::Value::Mapping(m) = &mut forward_cluster {
        m.insert(
            "circuit_breakers".into(),
            yaml(
                "circuit breakers",
                "thresholds:\n- { max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295 }\n",
            )?,
        );
    }
    Ok(PatchValues {
        peer_cluster: yaml("the peer cluster", &peer_cluster(fleet, gateway_namespace))?,
        forward_cluster,
        listener: yaml(
            "the peer address",
            &format!(
                "additional_addresses:\n- address:\n    socket_address:\n      address: 0.0.0.0\n      port_value: {}\n",
                fleet.peer_port
            ),
        )?,
        forward_route: first(
            "the forward route",
            &bootstrap::forward_route(&fleet.forward_header, &fleet.forward_cluster),
        )?,
    })
}

/// The fleet's documents for the gateway (`---`-separated, each with its comment).
pub fn documents(fleet: &Fleet, gw: &Gateway<'_>) -> Result<String> {
    let v = patch_values(fleet, gw.namespace)?;
    let gateway = || Match {
        context: "GATEWAY",
        listener: None,
    };
    let filter = EnvoyFilter {
        api_version: "networking.istio.io/v1alpha3",
        kind: "EnvoyFilter",
        metadata: metadata(FLEET_ENVOYFILTER, gw.namespace),
        spec: Spec {
            workload_selector: Labels {
                labels: gw.selector.clone(),
            },
            config_patches: vec![
                Patch {
                    apply_to: "CLUSTER",
                    on: gateway(),
                    patch: Operation {
                        operation: "ADD",
                        value: v.peer_cluster,
                    },
                },
                Patch {
                    apply_to: "CLUSTER",
                    on: gateway(),
                    patch: Operation {
                        operation: "ADD",
                        value: v.forward_cluster,
                    },
                },
                Patch {
                    apply_to: "LISTENER",
                    on: Match {
                        context: "GATEWAY",
                        listener: Some(ListenerPort {
                            port_number: gw.http_port,
                        }),
                    },
                    patch: Operation {
                        operation: "MERGE",
                        value: v.listener,
                    },
                },
                Patch {
                    apply_to: "HTTP_ROUTE",
                    on: gateway(),
                    patch: Operation {
                        operation: "INSERT_FIRST",
                        value: v.forward_route,
                    },
                },
            ],
        },
    };
    let filter = serde_norway::to_string(&filter)?;
    let service = serde_norway::to_string(&service(fleet, gw))?;
    Ok(format!(
        "# Fleet (docs/deploy.md, \"A fleet of gateways\"): the gateway replicas split each pod's\n\
         # containerConcurrency. `{peers}` lists the gateway pods (the headless Service\n\
         # below); the listener on port {http} also listens on the peer port {port}, which the\n\
         # public Service does not expose; a request the filter forwards carries `{header}`\n\
         # and goes, by the first route of every virtual host, through `{forward}`\n\
         # to the peer named. --gateway-http-port must be the port of the gateway's plain-HTTP\n\
         # listener.\n\
         {filter}---\n\
         # The gateway pods on the peer port, for the peer cluster's DNS: every pod that exists,\n\
         # ready or not (a starting or draining gateway may hold slots: it must be counted).\n\
         # Headless: nothing load-balances through it.\n\
         {service}",
        peers = fleet.peer_cluster,
        http = gw.http_port,
        port = fleet.peer_port,
        header = fleet.forward_header,
        forward = fleet.forward_cluster,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> Gateway<'static> {
        Gateway {
            namespace: "istio-system",
            selector: super::super::out::parse_selector("istio=ingressgateway").unwrap(),
            wasm_url: super::super::out::DEFAULT_WASM_URL,
            wasm_file: super::super::out::DEFAULT_WASM_FILE,
            http_port: 8080,
        }
    }

    #[test]
    fn fleet_documents_are_the_filter_and_the_headless_service() {
        let text = documents(&Fleet::default(), &gateway()).unwrap();
        let docs: Vec<serde_json::Value> = serde_norway::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2, "{text}");
        let (ef, svc) = (&docs[0], &docs[1]);
        assert_eq!(ef["metadata"]["name"], FLEET_ENVOYFILTER);
        let patches = ef["spec"]["configPatches"].as_array().unwrap();
        let kinds: Vec<(&str, &str)> = patches
            .iter()
            .map(|p| {
                (
                    p["applyTo"].as_str().unwrap(),
                    p["patch"]["operation"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("CLUSTER", "ADD"),
                ("CLUSTER", "ADD"),
                ("LISTENER", "MERGE"),
                ("HTTP_ROUTE", "INSERT_FIRST")
            ]
        );
        let peer = &patches[0]["patch"]["value"];
        assert_eq!(peer["name"], DEFAULT_PEER_CLUSTER);
        assert_eq!(peer["type"], "STRICT_DNS");
        let addr = &peer["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ["address"]["socket_address"];
        assert_eq!(
            addr["address"],
            "inflight-peers.istio-system.svc.cluster.local"
        );
        assert_eq!(addr["port_value"], 15081);
        let forward = &patches[1]["patch"]["value"];
        assert_eq!(forward["type"], "ORIGINAL_DST");
        assert_eq!(
            forward["original_dst_lb_config"],
            serde_json::json!({"use_http_header": true, "http_header_name": "x-inflight-peer"})
        );
        assert_eq!(patches[2]["match"]["listener"]["portNumber"], 8080);
        assert_eq!(
            patches[2]["patch"]["value"]["additional_addresses"][0]["address"]["socket_address"]
                ["port_value"],
            15081
        );
        let route = &patches[3]["patch"]["value"];
        assert_eq!(
            route["match"]["headers"][0],
            serde_json::json!({"name": "x-inflight-peer", "present_match": true})
        );
        assert_eq!(route["route"]["cluster"], DEFAULT_FORWARD_CLUSTER);
        // Every patch applies to the gateway only.
        assert!(patches.iter().all(|p| p["match"]["context"] == "GATEWAY"));

        assert_eq!(svc["kind"], "Service");
        assert_eq!(svc["metadata"]["name"], PEERS_SERVICE);
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["ipFamilies"], serde_json::json!(["IPv4"]));
        assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
        assert_eq!(svc["spec"]["selector"]["istio"], "ingressgateway");
        assert_eq!(svc["spec"]["ports"][0]["port"], 15081);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 15081);
    }

    #[test]
    fn names_and_ports_follow_the_fleet_and_the_gateway() {
        let fleet = Fleet {
            peer_cluster: "peers".into(),
            forward_cluster: "direct".into(),
            forward_header: "x-peer".into(),
            peer_port: 16000,
        };
        let gw = Gateway {
            namespace: "gw",
            http_port: 80,
            ..gateway()
        };
        let v = patch_values(&fleet, gw.namespace).unwrap();
        let json = |v: &serde_norway::Value| serde_json::to_value(v).unwrap();
        let peer = json(&v.peer_cluster);
        assert_eq!(peer["name"], "peers");
        assert_eq!(
            peer["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["address"],
            "inflight-peers.gw.svc.cluster.local"
        );
        let forward = json(&v.forward_cluster);
        assert_eq!(forward["name"], "direct");
        assert_eq!(
            forward["original_dst_lb_config"]["http_header_name"],
            "x-peer"
        );
        let route = json(&v.forward_route);
        assert_eq!(route["match"]["headers"][0]["name"], "x-peer");
        assert_eq!(route["route"]["cluster"], "direct");
        let text = documents(&fleet, &gw).unwrap();
        assert!(text.contains("portNumber: 80\n"), "{text}");
        assert!(text.contains("port_value: 16000\n"), "{text}");
    }
}
