//! The sweep through a running gateway (`inflight tune --admin ADDR --revision NAME`, no
//! `--url`): the gateway itself holds the revision at each step's concurrency. Before a step at
//! k the revision's `containerConcurrency` becomes k (the same file write as `--apply`, through
//! the gateway's ECDS file), and the load is twice the revision's capacity (2 × k × ready), so
//! the gateway keeps exactly k requests at each replica and queues the rest: the replica never
//! sees more than k, and none of the closed-loop client's turnaround shows as idle time at the
//! server. The latency recorded is the clients' (gateway queue included), which is flat below
//! the knee (each request waits about one service time) and grows beyond it.
//!
//! For the sweep the revision's scale is pinned at its ready replicas (`autoscaling.minScale` =
//! `maxScale`), so that `inflight up`'s scaler, which follows the filter, holds still while the
//! load is above the target; and its buffer is made deep enough for the queued half. Afterwards
//! the file is put back as it was (or, with `--apply`, as it was with the recommendation).

use super::apply::{self, Applied, ConfigFile};
use crate::up::http;
use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

/// Clients per unit of capacity during a step.
pub const LOAD_FACTOR: u32 = 2;

/// A running gateway whose revision the sweep caps.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub admin: SocketAddr,
    pub revision: String,
    pub file: ConfigFile,
    /// The file as it was: put back after the sweep, and the base of `--apply`.
    pub original: String,
    /// The revision's limit in `original`.
    pub original_cc: u64,
    /// The gateway's listener, where the load goes.
    pub listener: SocketAddr,
    /// The `Host` that routes to the revision.
    pub host: String,
    /// Ready replicas when the sweep began; the scale is pinned there.
    pub ready: u32,
}

/// What the JSON output says of the gateway.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Through {
    pub admin: String,
    pub revision: String,
    pub file: String,
    pub ready_replicas: u32,
    pub clients_per_limit: u32,
}

impl Gateway {
    /// Finds the gateway's configuration file, listener and the revision's host and ready
    /// replicas.
    pub fn open(admin: SocketAddr, revision: &str, host: Option<&str>) -> Result<Gateway> {
        let (file, original) = apply::preflight(admin, revision)?;
        let doc = apply::revision_doc(&original, revision)?;
        let host = match host {
            Some(h) => h.to_string(),
            None => doc
                .hosts
                .iter()
                .find(|h| !h.contains('*'))
                .cloned()
                .with_context(|| {
                    format!(
                        "revision {revision} has no exact host in the plugin configuration ({:?}); pass --host with one that routes to it",
                        doc.hosts
                    )
                })?,
        };
        let ready = apply::gauges(admin, revision)?.ready.unwrap_or(1.0);
        if ready < 1.0 {
            bail!("revision {revision} has no ready replica at the gateway; start one first");
        }
        Ok(Gateway {
            admin,
            revision: revision.to_string(),
            file,
            original_cc: u64::from(doc.container_concurrency),
            original,
            listener: listener(admin)?,
            host,
            // A gauge of whole replicas.
            ready: ready.round() as u32,
        })
    }

    /// `http://LISTENER/PATH`.
    pub fn url(&self, path: &str) -> String {
        let path = path.strip_prefix('/').unwrap_or(path);
        format!("http://{}/{path}", self.listener)
    }

    /// Clients for a step capped at `k`: [`LOAD_FACTOR`] × the revision's capacity.
    pub fn clients(&self, k: u32) -> u32 {
        LOAD_FACTOR
            .saturating_mul(k)
            .saturating_mul(self.ready.max(1))
    }

    /// Caps the revision at `k` for a step, once the last step's requests are gone; returns
    /// once the capacity gauge shows the cap.
    pub fn cap(&self, k: u32) -> Result<Applied> {
        let (text, from) = self.capped(k)?;
        self.idle()?;
        apply::write_and_wait(self.admin, &self.revision, &self.file, &text, k, from)
    }

    /// Waits until the revision has nothing active or queued (at most 10 s). The load generator
    /// ends each step by dropping its connections: those requests end without their response,
    /// and the filter holds their slots a little longer (`ABANDONED_HOLD_MS`). A configuration
    /// change in that moment once left the slots held for about 5 s (fixed in the filter: an
    /// ending root context now ticks until it has released them, ≈ one tick). Each step still
    /// starts on an idle revision, so that its measurement starts clean. The gauges are
    /// published at the filter's tick.
    pub fn idle(&self) -> Result<()> {
        let started = std::time::Instant::now();
        loop {
            let g = apply::gauges(self.admin, &self.revision)?;
            if g.active == 0.0 && g.queued == 0.0 {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!(
                    "revision {} still has {} active and {} queued 10 s after the load stopped: is other traffic reaching it? The sweep needs the revision to itself",
                    self.revision,
                    g.active,
                    g.queued
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The original configuration with the revision at `k`, its scale pinned and its buffer
    /// deep enough for the step's queued clients.
    fn capped(&self, k: u32) -> Result<(String, u64)> {
        let (ready, waiting) = (self.ready, self.clients(k).saturating_sub(k));
        apply::edit_revision(&self.original, &self.revision, |r| {
            r.container_concurrency = k;
            // The default depth, 10 × cc × ready, holds them; a set one may be too shallow.
            r.buffer_depth = r.buffer_depth.map(|b| b.max(waiting));
            let scale = r.autoscaling.get_or_insert_with(Default::default);
            scale.min_scale = Some(ready);
            scale.max_scale = Some(ready);
        })
    }

    /// Puts the file back as it was, once the last step's requests are gone.
    pub fn restore(&self) -> Result<Applied> {
        let cc = u32::try_from(self.original_cc).unwrap_or(u32::MAX);
        self.idle()?;
        apply::write_and_wait(
            self.admin,
            &self.revision,
            &self.file,
            &self.original,
            cc,
            self.original_cc,
        )
    }

    pub fn through(&self) -> Through {
        Through {
            admin: self.admin.to_string(),
            revision: self.revision.clone(),
            file: self.file.describe(),
            ready_replicas: self.ready,
            clients_per_limit: LOAD_FACTOR,
        }
    }
}

/// The gateway's listener (the first with a socket address; a wildcard address as loopback).
fn listener(admin: SocketAddr) -> Result<SocketAddr> {
    let (_, body) = http::get(admin, "/listeners?format=json", Duration::from_secs(5))?;
    let doc: Value = serde_json::from_str(&body).context("/listeners is not JSON")?;
    listener_of(&doc)
        .with_context(|| format!("no listener with a socket address at {admin}: {body}"))
}

fn listener_of(doc: &Value) -> Option<SocketAddr> {
    doc["listener_statuses"].as_array()?.iter().find_map(|l| {
        let a = &l["local_address"]["socket_address"];
        let ip: std::net::IpAddr = a["address"].as_str()?.parse().ok()?;
        let port = u16::try_from(a["port_value"].as_u64()?).ok()?;
        let ip = match ip {
            std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        Some(SocketAddr::new(ip, port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_is_read_from_the_admin_answer() {
        let cases = [
            (
                "loopback",
                r#"{"listener_statuses":[{"name":"ingress","local_address":{"socket_address":{"address":"127.0.0.1","port_value":8080}}}]}"#,
                Some("127.0.0.1:8080"),
            ),
            (
                "wildcard becomes loopback",
                r#"{"listener_statuses":[{"name":"ingress","local_address":{"socket_address":{"address":"0.0.0.0","port_value":80}}}]}"#,
                Some("127.0.0.1:80"),
            ),
            (
                "a pipe listener is skipped",
                r#"{"listener_statuses":[{"name":"p","local_address":{"pipe":{"path":"/x"}}},{"name":"i","local_address":{"socket_address":{"address":"::","port_value":81}}}]}"#,
                Some("[::1]:81"),
            ),
            ("no listener", r#"{"listener_statuses":[]}"#, None),
            ("not the answer", r#"{}"#, None),
        ];
        for (name, json, want) in cases {
            let doc: Value = serde_json::from_str(json).unwrap();
            assert_eq!(
                listener_of(&doc).map(|a| a.to_string()).as_deref(),
                want,
                "{name}"
            );
        }
    }

    fn gateway(config: &str, ready: u32) -> Gateway {
        let yaml = format!(
            "resources:\n- name: inflight\n  typed_config:\n    config:\n      configuration:\n        \"@type\": type.googleapis.com/google.protobuf.StringValue\n        value: {}\n",
            serde_json::to_string(config).unwrap()
        );
        Gateway {
            admin: "127.0.0.1:1".parse().unwrap(),
            revision: "a".into(),
            file: ConfigFile {
                path: "/x/inflight.yaml".into(),
                kind: apply::FileKind::Ecds {
                    filter: "inflight".into(),
                },
            },
            original: yaml,
            original_cc: 10,
            listener: "127.0.0.1:2".parse().unwrap(),
            host: "a.test".into(),
            ready,
        }
    }

    #[test]
    fn a_step_caps_the_revision_pins_its_scale_and_deepens_its_buffer() {
        let cases = [
            // (name, config, ready, k, cc, buffer, scale)
            (
                "the default buffer (10 × cc × ready) is kept",
                r#"{"revisions":[{"name":"a","hosts":["a.test"],"containerConcurrency":10}]}"#,
                1,
                4,
                4,
                None,
                1,
            ),
            (
                "a deeper buffer is kept",
                r#"{"revisions":[{"name":"a","hosts":["a.test"],"containerConcurrency":10,"bufferDepth":50,"autoscaling":{"minScale":1,"maxScale":10}}]}"#,
                2,
                3,
                3,
                Some(50),
                2,
            ),
            (
                "a shallow buffer is deepened for 2 × k × ready clients",
                r#"{"revisions":[{"name":"a","hosts":["a.test"],"containerConcurrency":10,"bufferDepth":1}]}"#,
                2,
                3,
                3,
                Some(9),
                2,
            ),
        ];
        for (name, config, ready, k, cc, buffer, scale) in cases {
            let g = gateway(config, ready);
            let (text, from) = g.capped(k).unwrap();
            assert_eq!(from, 10, "{name}");
            let r = apply::revision_doc(&text, "a").unwrap();
            assert_eq!(r.container_concurrency, cc, "{name}");
            assert_eq!(r.buffer_depth, buffer, "{name}");
            let a = r.autoscaling.unwrap();
            assert_eq!(
                (a.min_scale, a.max_scale),
                (Some(scale), Some(scale)),
                "{name}"
            );
            assert_eq!(r.hosts, ["a.test"], "{name}: the rest kept");
        }
        assert_eq!(gateway("{}", 3).clients(4), 24);
        assert_eq!(
            gateway("{}", 1).url("/v1/models/m:predict"),
            "http://127.0.0.1:2/v1/models/m:predict"
        );
        assert_eq!(gateway("{}", 1).url(""), "http://127.0.0.1:2/");
    }

    #[test]
    fn a_step_for_a_revision_the_configuration_lacks_is_an_error() {
        let g = Gateway {
            revision: "zz".into(),
            ..gateway(
                r#"{"revisions":[{"name":"a","hosts":["a.test"],"containerConcurrency":10}]}"#,
                1,
            )
        };
        let e = format!("{:#}", g.capped(2).unwrap_err());
        assert!(e.contains("no revision named \"zz\""), "{e}");
    }
}
