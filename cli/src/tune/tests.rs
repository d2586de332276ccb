//! The pieces around the sweep. The sweep itself, against a synthetic model server with a
//! known knee, is `cli/tests/tune.rs`: a test binary of its own, so nothing else in the suite
//! competes with it for the CPU.

use super::*;

fn args(url: String) -> Args {
    Args {
        url: Some(url),
        path: "/".into(),
        data: None,
        host: None,
        max_concurrency: 64,
        max_duration: "5m".into(),
        threshold: 5.0,
        precision: 3.0,
        window: None,
        min_hold: "3s".into(),
        max_hold: "15s".into(),
        max_p99: "10s".into(),
        max_errors: 1.0,
        past_knee: 2,
        utilization: 70.0,
        name: "my-model".into(),
        plot: PathBuf::from("inflight-tune.png"),
        json: false,
        load: LoadTool::Auto,
        apply: false,
        limit: None,
        admin: None,
        revision: None,
    }
}

#[test]
fn levels_are_powers_of_two_and_halfway() {
    let cases: &[(&str, u32, &[u32])] = &[
        ("one", 1, &[1]),
        ("three", 3, &[1, 2, 3]),
        ("sixteen", 16, &[1, 2, 3, 4, 6, 8, 12, 16]),
        (
            "bound between levels is the last",
            20,
            &[1, 2, 3, 4, 6, 8, 12, 16, 20],
        ),
        (
            "sixty-four",
            64,
            &[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64],
        ),
    ];
    for (name, max, want) in cases {
        assert_eq!(levels(*max), *want, "{name}");
    }
    assert_eq!(levels(u32::MAX).last(), Some(&u32::MAX), "no overflow");
}

#[test]
fn bad_arguments_say_which() {
    let base = || args("http://127.0.0.1:1/".into());
    let cases: Vec<(&str, Args, &str)> = vec![
        (
            "zero bound",
            Args {
                max_concurrency: 0,
                ..base()
            },
            "--max-concurrency",
        ),
        (
            "threshold",
            Args {
                threshold: 0.0,
                ..base()
            },
            "--threshold",
        ),
        (
            "precision",
            Args {
                precision: 150.0,
                ..base()
            },
            "--precision",
        ),
        (
            "utilization",
            Args {
                utilization: 0.0,
                ..base()
            },
            "--utilization",
        ),
        (
            "duration",
            Args {
                max_duration: "soon".into(),
                ..base()
            },
            "--max-duration",
        ),
        (
            "hold",
            Args {
                min_hold: "5s".into(),
                max_hold: "1s".into(),
                ..base()
            },
            "--max-hold",
        ),
    ];
    for (name, a, want) in cases {
        let e = format!("{:#}", Plan::from(&a).unwrap_err());
        assert!(e.contains(want), "{name}: {e}");
    }
    assert!(Plan::from(&base()).is_ok());
    let e = format!(
        "{:#}",
        target(&args("127.0.0.1:8080/".into()), None).unwrap_err()
    );
    assert!(e.contains("http://"), "{e}");
    let t = target(
        &args("http://127.0.0.1:8080/v1/models/m:predict".into()),
        None,
    )
    .unwrap();
    assert_eq!(t.host, "127.0.0.1:8080");
    let e = format!(
        "{:#}",
        target(
            &Args {
                data: Some("/nonexistent.json".into()),
                ..base()
            },
            None
        )
        .unwrap_err()
    );
    assert!(e.contains("-D /nonexistent.json"), "{e}");
}

/// The command line picks the mode: `--url` (directly), or `--admin` and `--revision` (through
/// the gateway); `--path` only through the gateway, `--apply` only with a gateway to apply to.
#[test]
fn the_command_line_names_one_way_to_the_server() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }
    let parse = |line: &str| Cli::try_parse_from(line.split_whitespace()).map(|c| c.args);
    let direct = parse("tune --url http://127.0.0.1:1/").unwrap();
    assert_eq!(
        (direct.url.as_deref(), direct.admin),
        (Some("http://127.0.0.1:1/"), None)
    );
    let through = parse("tune --admin 127.0.0.1:9901 --revision r --path /v1/m").unwrap();
    assert_eq!(
        (
            through.url,
            through.revision.as_deref(),
            through.path.as_str()
        ),
        (None, Some("r"), "/v1/m")
    );
    assert!(
        parse("tune --url http://127.0.0.1:1/ --admin 127.0.0.1:9901 --revision r --apply").is_ok()
    );
    let refused = [
        ("neither", "tune"),
        ("admin without revision", "tune --admin 127.0.0.1:9901"),
        (
            "revision without admin",
            "tune --url http://x/ --revision r",
        ),
        ("path with url", "tune --url http://127.0.0.1:1/ --path /v1"),
        (
            "apply without a gateway",
            "tune --url http://127.0.0.1:1/ --apply",
        ),
    ];
    for (name, line) in refused {
        assert!(parse(line).is_err(), "{name}: {line}");
    }
}

fn load(requests: u64, non_2xx: u64, seconds: f64, p50_ms: f64) -> Load {
    Load {
        requests,
        non_2xx,
        errors: 0,
        seconds,
        p50_us: p50_ms * 1e3,
        p90_us: p50_ms * 1.5e3,
        p99_us: p50_ms * 2e3,
        p999_us: p50_ms * 3e3,
    }
}

#[test]
fn a_step_folds_its_windows() {
    let s = Step::of(4, 4, &[load(100, 0, 1.0, 10.0), load(300, 10, 2.0, 20.0)]);
    assert_eq!((s.requests, s.errors, s.windows), (400, 10, 2));
    assert!(
        (s.throughput - 390.0 / 3.0).abs() < 1e-9,
        "{}",
        s.throughput
    );
    // Weighted by requests: (100 × 10 + 300 × 20) / 400.
    assert!((s.p50_ms - 17.5).abs() < 1e-9, "{}", s.p50_ms);
    // Window rates 100 and 145: mean 122.5, s = 31.8, t(1) = 12.706.
    assert!((s.ci95 - 12.706 * 22.5).abs() < 1e-6, "{}", s.ci95);
    assert!((s.error_rate() - 0.025).abs() < 1e-12);
    let one = Step::of(1, 1, &[load(10, 0, 1.0, 5.0)]);
    assert!(one.ci95.is_infinite(), "one window has no interval");
    let none = Step::of(1, 1, &[]);
    assert_eq!((none.throughput, none.requests), (0.0, 0));
}

fn tuning() -> Tuning {
    let step = |c: u32, x: f64, l: f64| Step {
        concurrency: c,
        clients: c,
        requests: (x * 2.0) as u64,
        errors: 0,
        seconds: 2.0,
        throughput: x,
        ci95: x * 0.01,
        windows: 4,
        p50_ms: l,
        p90_ms: l * 1.2,
        p99_ms: l * 1.5,
        cap_ms: None,
    };
    let steps = vec![
        step(1, 50.0, 20.0),
        step(2, 100.0, 20.0),
        step(3, 149.0, 20.0),
        step(4, 150.0, 26.0),
        step(6, 151.0, 40.0),
    ];
    let points: Vec<knee::Point> = steps.iter().map(Step::point).collect();
    let k = knee::find(&points, 0.05);
    Tuning {
        url: "http://127.0.0.1:1/".into(),
        gateway: None,
        steps,
        stop: Stop::KneeConfirmed,
        threshold_percent: 5.0,
        knee: k,
        recommendation: k.map(|k| recommend(k, 70.0, "mnist")),
        applied: None,
    }
}

#[test]
fn the_report_explains_the_recommendation() {
    let t = tuning();
    assert_eq!(t.knee.map(|k| k.concurrency), Some(3));
    let text = report::text(&t);
    for want in [
        "     3      149.0    1.0%",
        "← knee",
        "knee: concurrency 3",
        "recommended: containerConcurrency 3 (= the knee: the next step changed throughput by +0.7 %",
        "target 3 at 70 % utilization",
        "more than 2.1 requests in flight",
        "containerConcurrency: 3",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let json: serde_json::Value = serde_json::to_value(&t).unwrap();
    assert_eq!(json["recommendation"]["containerConcurrency"], 3);
    assert_eq!(json["knee"]["choice"], "knee");
    assert_eq!(json["stop"]["reason"], "kneeConfirmed");
    assert_eq!(json["steps"][4]["concurrency"], 6);
    let none = Tuning {
        knee: None,
        recommendation: None,
        stop: Stop::MaxConcurrency,
        ..tuning()
    };
    assert!(
        report::text(&none).contains("no knee"),
        "{}",
        report::text(&none)
    );
    // Through a gateway the table says what CONC is, and the JSON names the gateway.
    let through = Tuning {
        gateway: Some(gateway::Through {
            admin: "127.0.0.1:9901".into(),
            revision: "mnist".into(),
            file: "/s/ecds/inflight.yaml (ECDS, filter inflight)".into(),
            ready_replicas: 1,
            clients_per_limit: 2,
        }),
        ..tuning()
    };
    let text = report::text(&through);
    assert!(
        text.contains("(knee threshold 5 %)\nthrough the gateway at 127.0.0.1:9901: CONC is revision mnist's containerConcurrency")
            && text.contains("2 clients per unit of capacity (1 ready replica(s))\n\n"),
        "{text}"
    );
    assert_eq!(
        serde_json::to_value(&through).unwrap()["gateway"]["revision"],
        "mnist"
    );
    assert!(json.get("gateway").is_none(), "directly: no gateway");
}

/// The snippet is a valid InferenceService fragment: `inflight render`'s own parser reads the
/// recommended limit, target and utilization back from it.
#[test]
fn the_snippet_reads_back_through_render() {
    let snippet = report::snippet("mnist", 8, 8, 70.0);
    let yaml = format!(
        "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\n{}",
        snippet.replace(
            "  predictor:\n",
            "  predictor:\n    model:\n      modelFormat: {name: pytorch}\n"
        )
    );
    let doc: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    let p =
        crate::render::isvc::parse(&doc, "default", crate::render::isvc::Mode::Serverless).unwrap();
    assert_eq!(p.name, "mnist");
    assert_eq!(p.container_concurrency, 8);
    assert_eq!(p.target, Some(8.0));
    assert_eq!(p.target_utilization_percentage, Some(70.0));
}

#[test]
fn plots_throughput_and_p99() {
    let path = std::env::temp_dir().join(format!("inflight-tune-{}.png", std::process::id()));
    report::plot(&path, &tuning()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
    assert!(bytes.len() > 5_000, "{} bytes", bytes.len());
    std::fs::remove_file(&path).unwrap();
    assert!(report::plot(Path::new("/nonexistent-dir/x.png"), &tuning()).is_err());
}
