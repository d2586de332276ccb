//! Revision matching on arbitrary authorities, names and clusters, against a fixed table and
//! against a table built from the input's first line (as hosts): never panics, and a match is
//! a valid revision id.
#![no_main]

use inflight_core::Config;
use libfuzzer_sys::fuzz_target;

const FIXED: &[u8] = br#"{"revisions":[
    {"name":"a","hosts":["a.example.com","*.example.com"]},
    {"name":"b","hosts":["*.b.example.com","b.example.com"],"clusters":["outbound|80||b"]},
    {"name":"c","clusters":["c-cluster"]}],
    "revisionHeader":"x-rev"}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fixed = Config::parse(FIXED).expect("the fixed table parses");
    let n = fixed.revisions.len();
    for probe in [text, text.trim()] {
        for id in [
            fixed.table.match_host(probe),
            fixed.table.match_name(probe),
            fixed.table.match_cluster(probe),
        ]
        .into_iter()
        .flatten()
        {
            assert!(id.0 < n);
        }
    }
    // A table from the input: first line as a host list, the rest probed against it.
    let (hosts, rest) = text.split_once('\n').unwrap_or((text, ""));
    let hosts: Vec<&str> = hosts.split(',').collect();
    let json = serde_json_like(&hosts);
    if let Ok(c) = Config::parse(json.as_bytes()) {
        for line in rest.lines() {
            if let Some(id) = c.table.match_host(line) {
                assert!(id.0 < c.revisions.len());
            }
        }
        for h in &hosts {
            let _ = c.table.match_host(h);
        }
    }
});

/// `{"revisions":[{"name":"r","hosts":[...]}]}` with the hosts JSON-escaped.
fn serde_json_like(hosts: &[&str]) -> String {
    let mut out = String::from(r#"{"revisions":[{"name":"r","hosts":["#);
    for (i, h) in hosts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for ch in h.chars() {
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push_str("]}]}");
    out
}
