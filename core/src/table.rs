//! Which revision a request belongs to.
//!
//! Built once per configuration; looked up on every request, so lookups allocate only to
//! lower-case a mixed-case authority. Matching follows Envoy's virtual-host rules: exact host
//! first, then the longest `*.suffix` wildcard (which, as in Envoy, also matches deeper
//! subdomains). The port and a trailing dot are ignored.

use crate::config::RevisionConfig;
use std::collections::HashMap;

/// Index of a revision in the configuration's `revisions` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevisionId(pub usize);

/// Longest authority considered; longer ones match nothing (DNS names are at most 253).
pub const MAX_AUTHORITY_LEN: usize = 300;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TableError {
    Name {
        index: usize,
        name: String,
    },
    Host {
        index: usize,
        host: String,
        other: String,
    },
    Cluster {
        index: usize,
        cluster: String,
        other: String,
    },
}

/// Precompiled lookup from host, revision name or cluster to a revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RevisionTable {
    exact: HashMap<String, RevisionId>,
    /// `(".example.com", id)`, longest suffix first.
    wildcards: Vec<(String, RevisionId)>,
    names: HashMap<String, RevisionId>,
    clusters: HashMap<String, RevisionId>,
}

impl RevisionTable {
    pub(crate) fn build(revisions: &[RevisionConfig]) -> Result<Self, TableError> {
        let mut t = RevisionTable::default();
        for (index, r) in revisions.iter().enumerate() {
            let id = RevisionId(index);
            if t.names.insert(r.name.clone(), id).is_some() {
                return Err(TableError::Name {
                    index,
                    name: r.name.clone(),
                });
            }
            for h in &r.hosts {
                let previous = match h.strip_prefix('*') {
                    Some(suffix) => {
                        let prev = t
                            .wildcards
                            .iter()
                            .find(|(s, _)| s == suffix)
                            .map(|(_, i)| *i);
                        if prev.is_none() {
                            t.wildcards.push((suffix.to_string(), id));
                        }
                        prev
                    }
                    None => t.exact.insert(h.clone(), id),
                };
                if let Some(other) = previous {
                    return Err(TableError::Host {
                        index,
                        host: h.clone(),
                        other: revisions[other.0].name.clone(),
                    });
                }
            }
            for c in &r.clusters {
                if let Some(other) = t.clusters.insert(c.clone(), id) {
                    return Err(TableError::Cluster {
                        index,
                        cluster: c.clone(),
                        other: revisions[other.0].name.clone(),
                    });
                }
            }
        }
        t.wildcards
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Ok(t)
    }

    /// The revision serving this `:authority` (port and trailing dot ignored, case-insensitive).
    pub fn match_host(&self, authority: &str) -> Option<RevisionId> {
        if authority.len() > MAX_AUTHORITY_LEN {
            return None;
        }
        let host = strip_port(authority);
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() {
            return None;
        }
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        if let Some(id) = self.exact.get(host) {
            return Some(*id);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .map(|(_, id)| *id)
    }

    /// The revision with this name (the value of the configured revision header).
    pub fn match_name(&self, name: &str) -> Option<RevisionId> {
        self.names.get(name).copied()
    }

    /// The revision routed to this upstream cluster (`xds.cluster_name`).
    pub fn match_cluster(&self, cluster: &str) -> Option<RevisionId> {
        self.clusters.get(cluster).copied()
    }

    /// Whether any revision matches by cluster (so the filter reads the property only then).
    pub fn has_clusters(&self) -> bool {
        !self.clusters.is_empty()
    }
}

fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: `[::1]:8080`.
        return match rest.find(']') {
            Some(end) => &authority[..end + 2],
            None => authority,
        };
    }
    match authority.rfind(':') {
        Some(i) if authority[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &authority[..i],
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table() -> Config {
        Config::parse(
            br#"{"revisions":[
                {"name":"a","hosts":["a.example.com","*.example.com"]},
                {"name":"b","hosts":["*.b.example.com","b.example.com"],"clusters":["outbound|80||b"]},
                {"name":"c","clusters":["c-cluster"]}],
                "revisionHeader":"x-rev"}"#,
        )
        .unwrap()
    }

    #[test]
    fn host_matching_table() {
        let c = table();
        let cases: &[(&str, &str, Option<usize>)] = &[
            ("exact", "a.example.com", Some(0)),
            ("exact with port", "a.example.com:8080", Some(0)),
            ("upper case", "A.Example.COM", Some(0)),
            ("trailing dot", "a.example.com.", Some(0)),
            ("wildcard", "x.example.com", Some(0)),
            ("longest wildcard wins", "x.b.example.com", Some(1)),
            ("deeper subdomain", "y.x.b.example.com", Some(1)),
            ("exact beats wildcard", "b.example.com", Some(1)),
            ("wildcard needs a label", "example.com", None),
            ("other domain", "a.example.org", None),
            ("suffix is not a label", "xexample.com", None),
            ("empty", "", None),
            ("only port", ":80", None),
            ("ipv6", "[::1]:80", None),
            ("garbage port kept", "a.example.com:x", None),
        ];
        for (name, authority, want) in cases {
            assert_eq!(
                c.table.match_host(authority).map(|i| i.0),
                *want,
                "case {name}"
            );
        }
        let long = format!("{}.example.com", "a".repeat(MAX_AUTHORITY_LEN));
        assert_eq!(c.table.match_host(&long), None, "overlong authority");
    }

    #[test]
    fn name_and_cluster() {
        let c = table();
        assert_eq!(c.table.match_name("c"), Some(RevisionId(2)));
        assert_eq!(c.table.match_name("C"), None);
        assert_eq!(c.table.match_cluster("outbound|80||b"), Some(RevisionId(1)));
        assert_eq!(c.table.match_cluster("nope"), None);
        assert!(c.table.has_clusters());
    }

    proptest::proptest! {
        #[test]
        fn lookups_never_panic(s in "\\PC{0,40}") {
            let c = table();
            let _ = c.table.match_host(&s);
            let _ = c.table.match_name(&s);
            let _ = c.table.match_cluster(&s);
        }
    }
}
