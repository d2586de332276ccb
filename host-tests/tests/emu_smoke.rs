//! The emulated host loads the real filter.wasm and drives a request through it.

use inflight_host_tests::emu::{Filter, Host, State};

const CONFIG: &str = r#"{"revisions":[{"name":"rev-a","hosts":["a.example.com"],"containerConcurrency":1,"readyReplicas":1,"bufferDepth":2,"maxWait":"1s"}],"tick":"50ms","retryAfter":"1s"}"#;

#[test]
fn imports_are_all_provided() {
    let f = Filter::built();
    let imports = f.imports();
    eprintln!("imports: {imports:#?}");
    assert!(f.exports().iter().any(|e| e == "proxy_abi_version_0_2_1"));
}

#[test]
fn smoke() {
    let mut h = Host::new(Filter::built(), 2, CONFIG);
    let r0 = h.request(0, "a.example.com").send();
    let r1 = h.request(1, "a.example.com").send();
    eprintln!("logs: {:#?}", h.log_lines());
    assert_eq!(h.state(r0), State::Admitted);
    assert_eq!(h.state(r1), State::Paused);
    h.advance(10);
    h.finish(r0, 200);
    assert!(
        matches!(h.state(r1), State::Resumed { worker: 1, .. }),
        "{:?}",
        h.state(r1)
    );
    h.finish(r1, 200);
    h.advance(100);
    eprintln!("metrics: {:#?}", h.metric_names());
    eprintln!("anomalies: {:#?}", h.anomalies());
    assert_eq!(h.gauge("inflight.revision.rev-a.active"), 0);
}

#[test]
fn timing() {
    let t = std::time::Instant::now();
    let f = Filter::built();
    eprintln!("build+compile: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    for _ in 0..20 {
        let _h = Host::new(f, 4, CONFIG);
    }
    eprintln!("host with 4 workers: {:?}", t.elapsed() / 20);
}
