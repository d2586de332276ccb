//! A revision's limit in a running gateway, without a restart: `inflight tune --apply`, and the
//! caps of a sweep through the gateway (`--admin` without `--url`).
//!
//! The gateway must read the filter's plugin configuration from a file. Preferably its ECDS file
//! (`config_discovery` on the `http_filters` entry with a file config source: how `inflight up`
//! runs Envoy, and how Istio delivers a WasmPlugin), else its listener file (file-based LDS).
//! The file is found from the admin endpoint (`/server_info` gives the bootstrap's path; the
//! bootstrap, or the LDS file it names, gives the ECDS file), the revision's fields are
//! rewritten inside the plugin configuration (and checked with the filter's own parser), and
//! the file is replaced by a rename, which Envoy watches for.
//!
//! Through ECDS, Envoy hands the new configuration to the filter in the VMs it already runs
//! within milliseconds, and the capacity gauge shows the new limit at the filter's next tick;
//! streams already admitted finish on the old configuration, which shares the revision's state,
//! so nothing in flight is lost (`host-tests/tests/ecds_envoy.rs`). Through LDS, Envoy first
//! builds a new listener and its VMs (hundreds of milliseconds; `reload_envoy.rs`).

use super::Recommendation;
use crate::up::{envoy::replace_file, http};
use anyhow::{bail, Context as _, Result};
use inflight_core::config::{ConfigDoc, RevisionDoc};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file a gateway reads the plugin configuration from, and how Envoy counts its updates.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub kind: FileKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FileKind {
    /// File-based ECDS for the `http_filters` entry of this name.
    Ecds { filter: String },
    /// File-based LDS (the listener, with the filter in it).
    Lds,
}

impl ConfigFile {
    /// Envoy's counter of the file's accepted updates.
    fn updates_stat(&self) -> String {
        match &self.kind {
            FileKind::Ecds { filter } => {
                format!("extension_config_discovery.http_filter.{filter}.config_reload")
            }
            FileKind::Lds => "listener_manager.lds.update_success".to_string(),
        }
    }

    pub fn describe(&self) -> String {
        match &self.kind {
            FileKind::Ecds { filter } => {
                format!("{} (ECDS, filter {filter})", self.path.display())
            }
            FileKind::Lds => format!("{} (LDS listener)", self.path.display()),
        }
    }

    pub fn read(&self) -> Result<String> {
        std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))
    }
}

/// What a change of the limit did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub file: PathBuf,
    pub from: u64,
    pub to: u32,
    /// The capacity gauge (cc × ready) after the change.
    pub capacity: f64,
    /// From the file's replacement to the gauge showing the new limit.
    pub after: Duration,
    /// From the file's replacement to Envoy counting the update (None if the gauge showed the
    /// new limit first, as when it did not change).
    pub accepted: Option<Duration>,
}

/// Sets `revision`'s limit, soft target and utilization to `rec`'s in the plugin configuration
/// `base` (the text of `file`) and writes it; returns once the capacity gauge shows the limit.
pub fn apply(
    admin: SocketAddr,
    revision: &str,
    file: &ConfigFile,
    base: &str,
    rec: &Recommendation,
) -> Result<Applied> {
    let (new, from) =
        set_limit(base, revision, rec).with_context(|| format!("in {}", file.describe()))?;
    write_and_wait(admin, revision, file, &new, rec.container_concurrency, from)
}

/// Replaces `file` with `text`, in which `revision`'s limit is `cc` (it was `from`), and waits
/// until the revision's capacity gauge is `cc` × its ready replicas (at most 10 s).
pub fn write_and_wait(
    admin: SocketAddr,
    revision: &str,
    file: &ConfigFile,
    text: &str,
    cc: u32,
    from: u64,
) -> Result<Applied> {
    let stat = file.updates_stat();
    let before = counter(admin, &stat)?;
    replace_file(&file.path, text)?;
    let written = Instant::now();
    let mut accepted = None;
    loop {
        if accepted.is_none() && counter(admin, &stat)? > before {
            accepted = Some(written.elapsed());
        }
        let Gauges {
            capacity,
            ready,
            fleet,
            ..
        } = gauges(admin, revision)?;
        let want = f64::from(cc) * ready.unwrap_or(1.0);
        // A fleet's slice can be the same under the old limit: wait for Envoy's word too.
        let in_fleet = fleet.is_some_and(|n| n > 1.0);
        if shows_limit(capacity, cc, ready.unwrap_or(1.0), fleet)
            && (!in_fleet || accepted.is_some())
        {
            return Ok(Applied {
                file: file.path.clone(),
                from,
                to: cc,
                capacity,
                after: written.elapsed(),
                accepted,
            });
        }
        if written.elapsed() > Duration::from_secs(10) {
            let want = if in_fleet {
                format!(
                    "this gateway's slice of {want} in a fleet of {}",
                    fleet.unwrap_or(1.0)
                )
            } else {
                want.to_string()
            };
            bail!(
                "wrote {} but after 10 s the gateway's capacity for {revision} is {capacity}, not {want} ({stat}: {before} → {}); see Envoy's log",
                file.describe(),
                counter(admin, &stat)?
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Checks before the sweep that the limit can be changed: the gateway answers, reads the plugin
/// configuration from a file, and the file's configuration has `revision`. Returns the file and
/// its text.
pub fn preflight(admin: SocketAddr, revision: &str) -> Result<(ConfigFile, String)> {
    let file = config_file(admin)?;
    let text = file.read()?;
    edit_revision(&text, revision, |_| {}).with_context(|| format!("in {}", file.describe()))?;
    Ok((file, text))
}

/// The file the gateway behind `admin` reads the plugin configuration from: the first ECDS file
/// named in its bootstrap or its LDS file that holds an inflight plugin configuration, else
/// the LDS file.
pub fn config_file(admin: SocketAddr) -> Result<ConfigFile> {
    let (_, info) = http::get(admin, "/server_info", Duration::from_secs(5))?;
    let info: Value = serde_json::from_str(&info).context("/server_info is not JSON")?;
    let bootstrap = info["command_line_options"]["config_path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .context("the gateway was started without a config file (-c); changing a limit needs its plugin configuration in a file")?;
    let doc = read_yaml(Path::new(bootstrap))
        .with_context(|| format!("the gateway's bootstrap {bootstrap}"))?;
    let lds = doc["dynamic_resources"]["lds_config"]["path_config_source"]["path"]
        .as_str()
        .map(PathBuf::from);
    let mut ecds = Vec::new();
    ecds_files(&doc, &mut ecds);
    if let Some(lds) = &lds {
        let listeners = read_yaml(lds)
            .with_context(|| format!("the gateway's listener file {}", lds.display()))?;
        ecds_files(&listeners, &mut ecds);
    }
    for (filter, path) in ecds {
        if std::fs::read_to_string(&path).is_ok_and(|text| has_plugin(&text)) {
            return Ok(ConfigFile {
                path,
                kind: FileKind::Ecds { filter },
            });
        }
    }
    match lds {
        Some(path) => Ok(ConfigFile {
            path,
            kind: FileKind::Lds,
        }),
        None => bail!(
            "{bootstrap} names no file with the plugin configuration (an ECDS file through `config_discovery` with a `path_config_source`, or file-based LDS): a change would need a restart"
        ),
    }
}

fn read_yaml(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_norway::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Whether `yaml` holds an inflight plugin configuration.
fn has_plugin(yaml: &str) -> bool {
    let Ok(mut doc) = serde_norway::from_str::<Value>(yaml) else {
        return false;
    };
    let mut found = false;
    let _ = edit_configs(&mut doc, &mut |_| {
        found = true;
        Ok(())
    });
    found
}

/// `(filter name, file)` of every `http_filters` entry under `v` whose configuration comes from
/// a file (`config_discovery.config_source.path_config_source.path`).
fn ecds_files(v: &Value, out: &mut Vec<(String, PathBuf)>) {
    match v {
        Value::Object(map) => {
            let path = map
                .get("config_discovery")
                .and_then(|d| d["config_source"]["path_config_source"]["path"].as_str());
            if let (Some(path), Some(name)) = (path, map.get("name").and_then(Value::as_str)) {
                out.push((name.to_string(), PathBuf::from(path)));
            }
            for child in map.values() {
                ecds_files(child, out);
            }
        }
        Value::Array(items) => {
            for child in items {
                ecds_files(child, out);
            }
        }
        _ => {}
    }
}

/// An Envoy counter by its exact name (0 when absent).
fn counter(admin: SocketAddr, name: &str) -> Result<u64> {
    let (_, body) = http::get(
        admin,
        &format!("/stats?filter=^{}$", name.replace('.', "\\.")),
        Duration::from_secs(2),
    )?;
    Ok(body
        .split(':')
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// A revision's gauges, as the filter last published them (at its tick).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauges {
    /// cc × ready replicas.
    pub capacity: f64,
    /// None before the filter exports it.
    pub ready: Option<f64>,
    pub active: f64,
    pub queued: f64,
    /// The fleet this gateway sees (`fleet_gateways`); None or 1 without a fleet.
    pub fleet: Option<f64>,
}

/// Whether a gateway's `capacity` shows the limit `cc` on `ready` replicas: cc × ready alone;
/// in a fleet of `fleet` gateways, its slice: of each replica's cc it holds cc / N, or one more
/// where the remainder falls to it (docs/fleet.md, "How slots are split").
pub fn shows_limit(capacity: f64, cc: u32, ready: f64, fleet: Option<f64>) -> bool {
    match fleet.filter(|n| *n > 1.0) {
        None => capacity == f64::from(cc) * ready,
        Some(n) => {
            let n = n as u32;
            let base = f64::from(cc / n);
            let extra = f64::from(u32::from(!cc.is_multiple_of(n)));
            capacity >= base * ready && capacity <= (base + extra) * ready
        }
    }
}

/// The revision's gauges.
pub fn gauges(admin: SocketAddr, revision: &str) -> Result<Gauges> {
    let prefix = format!("wasmcustom.inflight.revision.{revision}.");
    let (_, body) = http::get(
        admin,
        &format!("/stats?filter=^{}", prefix.replace('.', "\\.")),
        Duration::from_secs(2),
    )?;
    let value = |gauge: &str| {
        body.lines().find_map(|l| {
            let (name, v) = l.split_once(':')?;
            (name.strip_prefix(&prefix)? == gauge).then(|| v.trim().parse::<f64>().ok())?
        })
    };
    Ok(Gauges {
        capacity: value("capacity").unwrap_or(0.0),
        ready: value("ready_replicas"),
        active: value("active").unwrap_or(0.0),
        queued: value("queued").unwrap_or(0.0),
        fleet: value("fleet_gateways"),
    })
}

/// The YAML with `revision`'s `containerConcurrency`, `target` and
/// `targetUtilizationPercentage` set to `rec`'s in every inflight plugin configuration it holds;
/// also returns the old limit.
pub fn set_limit(yaml: &str, revision: &str, rec: &Recommendation) -> Result<(String, u64)> {
    edit_revision(yaml, revision, |r| {
        r.container_concurrency = rec.container_concurrency;
        r.target = Some(f64::from(rec.target));
        r.target_utilization_percentage = Some(rec.target_utilization_percentage);
    })
}

/// The YAML with `edit` applied to `revision` in every inflight plugin configuration it holds
/// (the JSON string of a `google.protobuf.StringValue` whose JSON has `revisions`), each checked
/// with the filter's own parser; also returns the revision's old limit.
pub fn edit_revision(
    yaml: &str,
    revision: &str,
    mut edit: impl FnMut(&mut RevisionDoc),
) -> Result<(String, u64)> {
    let mut doc: Value = serde_norway::from_str(yaml).context("not YAML")?;
    let mut old = None;
    let mut configs = 0;
    edit_configs(&mut doc, &mut |config: &mut ConfigDoc| -> Result<()> {
        configs += 1;
        for r in config.revisions.iter_mut().filter(|r| r.name == revision) {
            old = Some(u64::from(r.container_concurrency));
            edit(r);
        }
        // The filter's own validation, so a change it would refuse is never written.
        inflight_core::config::Config::parse(serde_json::to_string(config)?.as_bytes())
            .map_err(|e| anyhow::anyhow!("the filter would reject the change: {e}"))?;
        Ok(())
    })?;
    if configs == 0 {
        bail!("no inflight plugin configuration (a StringValue with `revisions`) found");
    }
    let Some(old) = old else {
        bail!("no revision named {revision:?} in the plugin configuration");
    };
    Ok((serde_norway::to_string(&doc)?, old))
}

/// The revision's entry in the first inflight plugin configuration of `yaml`.
pub fn revision_doc(yaml: &str, revision: &str) -> Result<RevisionDoc> {
    let mut doc: Value = serde_norway::from_str(yaml).context("not YAML")?;
    let mut found = None;
    edit_configs(&mut doc, &mut |config: &mut ConfigDoc| -> Result<()> {
        if found.is_none() {
            found = config
                .revisions
                .iter()
                .find(|r| r.name == revision)
                .cloned();
        }
        Ok(())
    })?;
    found.with_context(|| format!("no revision named {revision:?} in the plugin configuration"))
}

/// Calls `f` on every plugin configuration (parsed as core's schema) under `v` and writes it
/// back.
fn edit_configs(v: &mut Value, f: &mut dyn FnMut(&mut ConfigDoc) -> Result<()>) -> Result<()> {
    match v {
        Value::Object(map) => {
            let is_string_value = map.get("@type").and_then(Value::as_str)
                == Some("type.googleapis.com/google.protobuf.StringValue");
            if is_string_value {
                if let Some(Value::String(s)) = map.get("value") {
                    if let Ok(mut config) = serde_json::from_str::<ConfigDoc>(s) {
                        f(&mut config)?;
                        map.insert(
                            "value".into(),
                            Value::String(serde_json::to_string(&config)?),
                        );
                        return Ok(());
                    }
                }
            }
            for child in map.values_mut() {
                edit_configs(child, f)?;
            }
        }
        Value::Array(items) => {
            for child in items {
                edit_configs(child, f)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lds(config: &str) -> String {
        format!(
            "resources:\n- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: ingress\n  filter_chains:\n  - filters:\n    - name: hcm\n      typed_config:\n        http_filters:\n        - name: inflight\n          typed_config:\n            config:\n              configuration:\n                \"@type\": type.googleapis.com/google.protobuf.StringValue\n                value: {}\n",
            serde_json::to_string(config).unwrap()
        )
    }

    fn config_of(yaml: &str) -> Value {
        let doc: Value = serde_norway::from_str(yaml).unwrap();
        let s = doc["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"][0]["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap();
        serde_json::from_str(s).unwrap()
    }

    fn rec(cc: u32, utilization: f64) -> Recommendation {
        Recommendation {
            container_concurrency: cc,
            target: cc,
            target_utilization_percentage: utilization,
            effective_target: 0.0,
            snippet: String::new(),
        }
    }

    #[test]
    fn sets_the_revisions_limit_and_nothing_else() {
        let yaml = lds(
            r#"{"tick":"100ms","revisions":[{"name":"a","hosts":["a.test"],"containerConcurrency":10,"target":10},{"name":"b","hosts":["b.test"],"containerConcurrency":3}]}"#,
        );
        let (new, old) = set_limit(&yaml, "a", &rec(4, 70.0)).unwrap();
        assert_eq!(old, 10);
        let c = config_of(&new);
        assert_eq!(c["revisions"][0]["containerConcurrency"], 4);
        assert_eq!(c["revisions"][0]["target"], 4);
        assert_eq!(c["revisions"][0]["targetUtilizationPercentage"], 70.0);
        assert_eq!(c["revisions"][0]["hosts"][0], "a.test");
        assert_eq!(
            c["revisions"][1]["containerConcurrency"], 3,
            "other revisions kept"
        );
        assert_eq!(c["tick"], "100ms");
        let doc: Value = serde_norway::from_str(&new).unwrap();
        assert_eq!(doc["resources"][0]["name"], "ingress", "the listener kept");
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        let cases = [
            (
                "unknown revision",
                lds(r#"{"revisions":[{"name":"a","hosts":["a.test"],"containerConcurrency":1}]}"#),
                "no revision named \"zz\"",
            ),
            (
                "no plugin configuration",
                "resources: []\n".to_string(),
                "no inflight plugin configuration",
            ),
            ("not YAML", "resources: [\n".to_string(), "not YAML"),
        ];
        for (name, yaml, want) in cases {
            let e = format!("{:#}", set_limit(&yaml, "zz", &rec(2, 70.0)).unwrap_err());
            assert!(e.contains(want), "{name}: {e}");
        }
        // A change the filter would refuse is never written.
        let ok = lds(r#"{"revisions":[{"name":"a","hosts":["a.test"],"containerConcurrency":1}]}"#);
        let e = format!("{:#}", set_limit(&ok, "a", &rec(2, 0.0)).unwrap_err());
        assert!(e.contains("the filter would reject"), "{e}");
    }

    #[test]
    fn a_limit_shows_in_the_capacity_alone_or_as_a_slice_in_a_fleet() {
        // (case, capacity, cc, ready, fleet) → shows the limit
        let cases = [
            ("alone: cc × ready", 8.0, 4, 2.0, None, true),
            ("alone: the old limit", 10.0, 4, 2.0, None, false),
            ("a fleet of one is alone", 8.0, 4, 2.0, Some(1.0), true),
            (
                "fleet: 10 over 3 is 3 or 4 per replica",
                7.0,
                10,
                2.0,
                Some(3.0),
                true,
            ),
            ("fleet: the most it can hold", 8.0, 10, 2.0, Some(3.0), true),
            ("fleet: above its slice", 9.0, 10, 2.0, Some(3.0), false),
            ("fleet: below its slice", 5.0, 10, 2.0, Some(3.0), false),
            (
                "fleet: 2 over 3, none or one per replica",
                0.0,
                2,
                2.0,
                Some(3.0),
                true,
            ),
            ("fleet: even split is exact", 2.0, 6, 1.0, Some(3.0), true),
            (
                "fleet: even split, one more is too many",
                3.0,
                6,
                1.0,
                Some(3.0),
                false,
            ),
        ];
        for (name, capacity, cc, ready, fleet, want) in cases {
            assert_eq!(shows_limit(capacity, cc, ready, fleet), want, "{name}");
        }
    }

    /// The file is found where `inflight up` puts it: the ECDS file its bootstrap names for the
    /// `inflight` filter (the one against a running Envoy, and `--apply` under load, are in
    /// `cli/tests/tune.rs`).
    #[test]
    fn the_ecds_file_is_found_in_the_bootstrap() {
        use crate::up::{config::StackConfig, envoy as up_envoy};
        let config = StackConfig::parse(crate::up::config::DEMO).unwrap();
        let generated = up_envoy::bootstrap(
            &config,
            8080,
            9901,
            Path::new("/x/f.wasm"),
            Path::new("/s/eds"),
            &up_envoy::ecds_path(Path::new("/s")),
        )
        .unwrap();
        let doc: Value = serde_norway::from_str(&generated.yaml).unwrap();
        let mut found = Vec::new();
        ecds_files(&doc, &mut found);
        assert_eq!(
            found,
            [(
                "inflight".to_string(),
                PathBuf::from("/s/ecds/inflight.yaml")
            )]
        );
        assert!(has_plugin(&generated.filter));
        assert!(!has_plugin(&generated.yaml), "the bootstrap holds none");
        let (_, old) = set_limit(&generated.filter, "torchserve", &rec(3, 70.0)).unwrap();
        assert_eq!(old, 10);
        let file = ConfigFile {
            path: PathBuf::from("/s/ecds/inflight.yaml"),
            kind: FileKind::Ecds {
                filter: "inflight".into(),
            },
        };
        assert_eq!(
            file.updates_stat(),
            "extension_config_discovery.http_filter.inflight.config_reload"
        );
    }
}
