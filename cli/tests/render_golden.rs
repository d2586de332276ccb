//! Golden tests for `inflight render`: each `tests/golden/<case>.yaml` is rendered in the
//! formats listed below and compared with `<case>.<format>` (stdout) and `<case>.stderr`
//! (notes, or the error). `UPDATE_GOLDEN=1 cargo test -p inflight --test render_golden`
//! rewrites the expected files; review the diff.
//!
//! Every successful output is also checked by the filter's own parser (JSON) or the CRD
//! schemas (YAML), so a golden file can never bless an invalid config.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code (clippy.toml allows it in #[test] fns only)

mod render;

use render::{golden_dir, render, yaml_docs};

struct Case {
    name: &'static str,
    formats: &'static [&'static str],
    extra: &'static [&'static str],
    ok: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "seed",
        formats: &["filter-config", "wasmplugin", "envoyfilter"],
        extra: &[],
        ok: true,
    },
    Case {
        name: "no-annotations",
        formats: &["filter-config"],
        extra: &[],
        ok: true,
    },
    Case {
        name: "target-above-cc",
        formats: &["filter-config"],
        extra: &["--max-wait", "10s"],
        ok: true,
    },
    Case {
        name: "cc-zero",
        formats: &["filter-config"],
        extra: &[],
        ok: true,
    },
    Case {
        name: "raw",
        formats: &["filter-config", "wasmplugin", "envoyfilter"],
        extra: &["--domain", "models.example.org"],
        ok: true,
    },
    Case {
        name: "multi",
        formats: &["filter-config"],
        extra: &["--namespace", "ignored-because-set"],
        ok: true,
    },
    Case {
        name: "invalid-cc",
        formats: &["filter-config"],
        extra: &[],
        ok: false,
    },
    Case {
        name: "invalid-rps",
        formats: &["filter-config"],
        extra: &[],
        ok: false,
    },
    Case {
        name: "invalid-target",
        formats: &["filter-config"],
        extra: &[],
        ok: false,
    },
    Case {
        name: "invalid-scale",
        formats: &["filter-config"],
        extra: &[],
        ok: false,
    },
];

fn check(path: &std::path::Path, actual: &str, failures: &mut Vec<String>) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        if actual.is_empty() {
            let _ = std::fs::remove_file(path);
        } else {
            std::fs::write(path, actual).unwrap();
        }
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if expected != actual {
        failures.push(format!(
            "{}: differs (UPDATE_GOLDEN=1 to accept)\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        ));
    }
}

#[test]
fn render_matches_golden_files() {
    let dir = golden_dir();
    let mut failures = Vec::new();
    for case in CASES {
        let input = dir.join(format!("{}.yaml", case.name));
        let input = input.to_str().unwrap();
        let mut stderr_seen = None;
        for format in case.formats {
            let mut args = vec!["-f", input, "--format", format];
            args.extend_from_slice(case.extra);
            let (ok, stdout, stderr) = render(&args);
            // Paths in messages are the test machine's: make them relative.
            let stderr = stderr.replace(&format!("{}/", dir.display()), "");
            assert_eq!(
                ok, case.ok,
                "{}: {format}: exit status; stderr:\n{stderr}",
                case.name
            );
            if ok {
                if *format == "filter-config" {
                    if let Err(e) = inflight_core::Config::parse(stdout.as_bytes()) {
                        panic!("{}: the filter rejects the rendered config: {e}", case.name);
                    }
                } else {
                    render::assert_valid_yaml(&format!("{} --format {format}", case.name), &stdout);
                }
                check(
                    &dir.join(format!("{}.{format}", case.name)),
                    &stdout,
                    &mut failures,
                );
            } else {
                assert!(
                    stdout.is_empty(),
                    "{}: printed output despite failing",
                    case.name
                );
            }
            // Notes and errors do not depend on the format.
            if let Some(prev) = &stderr_seen {
                assert_eq!(
                    prev, &stderr,
                    "{}: stderr differs between formats",
                    case.name
                );
            }
            stderr_seen = Some(stderr);
        }
        check(
            &dir.join(format!("{}.stderr", case.name)),
            stderr_seen.as_deref().unwrap_or(""),
            &mut failures,
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The failing cases must name the field and say what was wrong, as the issue asks.
#[test]
fn errors_name_the_field_and_the_value() {
    let dir = golden_dir();
    let cases = [
        (
            "invalid-cc",
            "spec.predictor.containerConcurrency: expected a non-negative integer, got \"ten\"",
        ),
        (
            "invalid-rps",
            "spec.predictor.scaleMetric: `rps` is not supported",
        ),
        (
            "invalid-target",
            "metadata.annotations[\"autoscaling.knative.dev/target\"]: expected a number",
        ),
        (
            "invalid-scale",
            "document 2 (InferenceService default/torchserve): spec.predictor.maxReplicas",
        ),
    ];
    for (case, want) in cases {
        let input = dir.join(format!("{case}.yaml"));
        let (ok, _, stderr) = render(&["-f", input.to_str().unwrap()]);
        assert!(!ok, "{case}");
        assert!(stderr.contains(want), "{case}: {stderr}");
    }
}

#[test]
fn usage_errors() {
    // No InferenceService at all.
    let dir = std::env::temp_dir().join(format!("inflight-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("cm.yaml");
    std::fs::write(&f, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap();
    let (ok, _, stderr) = render(&["-f", f.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("no InferenceService"), "{stderr}");
    // Two namespaces, one name: a clear way out.
    let f = dir.join("two.yaml");
    let isvc = |ns: &str| {
        format!("apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata: {{name: m, namespace: {ns}}}\nspec: {{predictor: {{containerConcurrency: 1}}}}\n")
    };
    std::fs::write(&f, format!("{}---\n{}", isvc("a"), isvc("b"))).unwrap();
    let (ok, _, stderr) = render(&["-f", f.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("--namespaced-names"), "{stderr}");
    let out = render::render_ok(&[
        "-f",
        f.to_str().unwrap(),
        "--namespaced-names",
        "--format",
        "filter-config",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["revisions"][0]["name"], "a-m");
    assert_eq!(v["revisions"][1]["name"], "b-m");
    // Bad flags.
    let (ok, _, stderr) = render(&["-f", f.to_str().unwrap(), "--max-wait", "soon"]);
    assert!(!ok && stderr.contains("--max-wait"), "{stderr}");
    let (ok, _, stderr) = render(&["-f", f.to_str().unwrap(), "--gateway-selector", "istio"]);
    assert!(!ok && stderr.contains("--gateway-selector"), "{stderr}");
    // Not YAML.
    std::fs::write(&f, "kind: [").unwrap();
    let (ok, _, stderr) = render(&["-f", f.to_str().unwrap()]);
    assert!(!ok && stderr.contains("not valid YAML"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = yaml_docs("");
}

/// `--no-endpoint-picking`: the filter is told to leave the choice of pod to Envoy, and no
/// cluster policy is written (it would let clients choose a pod: with picking off the filter
/// no longer removes their copy of the header).
#[test]
fn no_endpoint_picking_turns_routing_off_and_writes_no_cluster_policy() {
    let input = golden_dir().join("raw.yaml");
    let input = input.to_str().unwrap();
    for format in ["wasmplugin", "envoyfilter"] {
        let on = yaml_docs(&render::render_ok(&["-f", input, "--format", format]));
        let off = yaml_docs(&render::render_ok(&[
            "-f",
            input,
            "--format",
            format,
            "--no-endpoint-picking",
        ]));
        assert_eq!(
            on.len(),
            4,
            "{format}: the filter, the cluster policy and the fleet's EnvoyFilter and Service"
        );
        assert_eq!(on[1]["metadata"]["name"], "inflight-endpoint-picking");
        assert_eq!(off.len(), 1, "{format}: {off:?}");
    }
    let config: serde_json::Value = serde_json::from_str(&render::render_ok(&[
        "-f",
        input,
        "--format",
        "filter-config",
        "--no-endpoint-picking",
    ]))
    .unwrap();
    assert_eq!(config["routing"], serde_json::json!({"enabled": false}));
    inflight_core::Config::parse(config.to_string().as_bytes()).unwrap();
}

/// The fleet (docs/fleet.md): on by default for the Istio outputs, where it adds the
/// EnvoyFilter `inflight-fleet` and the headless Service `inflight-peers` after the filter;
/// off for plain Envoy unless asked; never without membership and endpoint picking. The names
/// and ports in the plugin configuration's `fleet` are the ones the Envoy pieces use.
#[test]
fn fleet_pieces_agree_with_the_plugin_configuration() {
    let input = golden_dir().join("raw.yaml");
    let input = input.to_str().unwrap();
    for format in ["wasmplugin", "envoyfilter"] {
        for (flags, peer_port, http_port) in [
            (&[][..], 15081, 8080),
            (
                &["--peer-port", "16000", "--gateway-http-port", "80"][..],
                16000,
                80,
            ),
        ] {
            let mut args = vec!["-f", input, "--format", format];
            args.extend_from_slice(flags);
            let docs = yaml_docs(&render::render_ok(&args));
            let names: Vec<(&str, &str)> = docs
                .iter()
                .map(|d| {
                    (
                        d["kind"].as_str().unwrap(),
                        d["metadata"]["name"].as_str().unwrap(),
                    )
                })
                .collect();
            let filter_kind = if format == "wasmplugin" {
                "WasmPlugin"
            } else {
                "EnvoyFilter"
            };
            assert_eq!(
                names,
                [
                    (filter_kind, "inflight"),
                    ("EnvoyFilter", "inflight-endpoint-picking"),
                    ("EnvoyFilter", "inflight-fleet"),
                    ("Service", "inflight-peers"),
                ],
                "{format} {flags:?}"
            );
            let config: serde_json::Value = if format == "wasmplugin" {
                docs[0]["spec"]["pluginConfig"].clone()
            } else {
                serde_json::from_str(
                    docs[0]["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]
                        ["configuration"]["value"]
                        .as_str()
                        .unwrap(),
                )
                .unwrap()
            };
            inflight_core::Config::parse(config.to_string().as_bytes()).unwrap();
            let fleet = &config["fleet"];
            assert_eq!(
                fleet,
                &serde_json::json!({
                    "peerCluster": "inflight-peers",
                    "forwardCluster": "inflight-peer-direct",
                    "forwardHeader": "x-inflight-peer",
                    "peerPort": peer_port,
                }),
                "{format} {flags:?}: `self` stays unset (Istio's INSTANCE_IPS)"
            );
            let patches = docs[2]["spec"]["configPatches"].as_array().unwrap();
            let value = |apply_to: &str, n: usize| {
                patches
                    .iter()
                    .filter(|p| p["applyTo"] == apply_to)
                    .nth(n)
                    .unwrap()["patch"]["value"]
                    .clone()
            };
            assert_eq!(value("CLUSTER", 0)["name"], fleet["peerCluster"]);
            assert_eq!(
                value("CLUSTER", 0)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
                    ["endpoint"]["address"]["socket_address"]["port_value"],
                peer_port
            );
            assert_eq!(value("CLUSTER", 1)["name"], fleet["forwardCluster"]);
            assert_eq!(
                value("CLUSTER", 1)["original_dst_lb_config"]["http_header_name"],
                fleet["forwardHeader"]
            );
            assert_eq!(
                value("LISTENER", 0)["additional_addresses"][0]["address"]["socket_address"]
                    ["port_value"],
                peer_port
            );
            let listener = patches.iter().find(|p| p["applyTo"] == "LISTENER").unwrap();
            assert_eq!(listener["match"]["listener"]["portNumber"], http_port);
            let route = value("HTTP_ROUTE", 0);
            assert_eq!(route["match"]["headers"][0]["name"], fleet["forwardHeader"]);
            assert_eq!(route["route"]["cluster"], fleet["forwardCluster"]);
            // The Service selects the pods the filter and the EnvoyFilters select, on the port.
            let service = &docs[3];
            let selector = if format == "wasmplugin" {
                &docs[0]["spec"]["selector"]["matchLabels"]
            } else {
                &docs[0]["spec"]["workloadSelector"]["labels"]
            };
            assert_eq!(&service["spec"]["selector"], selector);
            assert_eq!(&docs[2]["spec"]["workloadSelector"]["labels"], selector);
            assert_eq!(service["spec"]["ports"][0]["port"], peer_port);
            assert_eq!(service["spec"]["clusterIP"], "None");
        }
        // --no-fleet: the filter and the cluster policy only.
        let off = yaml_docs(&render::render_ok(&[
            "-f",
            input,
            "--format",
            format,
            "--no-fleet",
        ]));
        assert_eq!(off.len(), 2, "{format}");
        assert!(off[0].to_string().find("\"fleet\"").is_none(), "{format}");
        // Without endpoint picking there is nothing to split: no fleet, and a note says so.
        let (ok, out, err) = render(&["-f", input, "--format", format, "--no-endpoint-picking"]);
        assert!(ok, "{err}");
        assert_eq!(yaml_docs(&out).len(), 1, "{format}");
        assert!(err.contains("no fleet: it needs endpoint picking"), "{err}");
    }
    // Plain Envoy: off unless asked; with --fleet, the section only (the operator adds the
    // clusters and the peer listener, docs/fleet.md).
    let plain: serde_json::Value = serde_json::from_str(&render::render_ok(&[
        "-f",
        input,
        "--format",
        "filter-config",
    ]))
    .unwrap();
    assert!(plain.get("fleet").is_none(), "{plain}");
    let with: serde_json::Value = serde_json::from_str(&render::render_ok(&[
        "-f",
        input,
        "--format",
        "filter-config",
        "--fleet",
        "--membership-cluster",
        "admin",
    ]))
    .unwrap();
    assert_eq!(with["fleet"]["peerCluster"], "inflight-peers");
    inflight_core::Config::parse(with.to_string().as_bytes()).unwrap();
    // Asked for, but impossible (or on the HTTP listener's own port): an error that says why.
    for (flags, want) in [
        (
            &["--format", "filter-config", "--fleet"][..],
            "--fleet needs membership",
        ),
        (
            &["--fleet", "--no-endpoint-picking"][..],
            "--fleet needs endpoint picking",
        ),
        (
            &["--fleet", "--no-membership"][..],
            "--fleet needs membership",
        ),
        (
            &["--peer-port", "8080"][..],
            "--peer-port 8080: expected a port of its own",
        ),
    ] {
        let mut args = vec!["-f", input];
        args.extend_from_slice(flags);
        let (ok, out, err) = render(&args);
        assert!(!ok && out.is_empty(), "{flags:?}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}
