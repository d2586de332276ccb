//! Messages a worker VM finds on its wake queue.
//!
//! [`Wake::Grant`]: "this ticket of this revision now holds a slot; resume that stream (or pass
//! the slot on if it is gone)", sent by whichever worker freed the slot. (Kind 2, a deferred
//! release of unreleased builds, is gone; it decodes as malformed.)
//!
//! [`Wake::Shed`]: "this waiting ticket was evicted from the full buffer to make room for a
//! higher class; answer that stream `buffer-full`", sent by the worker that admitted the
//! higher-class request. It carries no slot, so a Shed that finds no stream needs nothing done.
//!
//! [`Wake::Recall`]: "give your slot lease of this revision back", sent by a worker whose
//! arrival would wait (or the revision nears its limit) while other VMs hold leased slots
//! (`admission::Lease`). It carries no slot.
//!
//! Revisions travel by name, not index, so a message stays meaningful across a configuration
//! reload (old and new VMs run side by side and share revision state by name).

use crate::admission::Pick;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    Grant {
        revision: String,
        ticket: u64,
        context: u32,
        /// The endpoint the slot is on (its id and address), when endpoints are known.
        endpoint: Option<Pick>,
    },
    Shed {
        revision: String,
        ticket: u64,
        context: u32,
    },
    Recall {
        revision: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("malformed wake message ({0} bytes)")]
pub struct WakeDecodeError(pub usize);

const GRANT: u8 = 1;
const SHED: u8 = 3;
const RECALL: u8 = 4;

impl Wake {
    pub fn revision(&self) -> &str {
        match self {
            Wake::Grant { revision, .. }
            | Wake::Shed { revision, .. }
            | Wake::Recall { revision } => revision,
        }
    }

    /// `kind, name length, name, [ticket, context]`, then for a slot on an endpoint
    /// `[endpoint id, address length, address]`. A Shed is `3, name length, name, ticket,
    /// context`. A Recall is `4, name length, name`.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.revision().as_bytes();
        let len = name.len().min(255);
        let (ticket, context, endpoint) = match self {
            Wake::Recall { .. } => {
                let mut out = Vec::with_capacity(2 + len);
                out.push(RECALL);
                out.push(len as u8);
                out.extend_from_slice(name.get(..len).unwrap_or_default());
                return out;
            }
            Wake::Grant {
                ticket,
                context,
                endpoint,
                ..
            } => (ticket, context, endpoint),
            Wake::Shed {
                ticket, context, ..
            } => {
                let mut out = Vec::with_capacity(2 + len + 12);
                out.push(SHED);
                out.push(len as u8);
                out.extend_from_slice(name.get(..len).unwrap_or_default());
                out.extend_from_slice(&ticket.to_le_bytes());
                out.extend_from_slice(&context.to_le_bytes());
                return out;
            }
        };
        let address = endpoint.as_ref().map_or(&[][..], |p| p.address.as_bytes());
        let alen = address.len().min(255);
        let mut out = Vec::with_capacity(2 + len + 12 + 5 + alen);
        out.push(GRANT);
        out.push(len as u8);
        out.extend_from_slice(name.get(..len).unwrap_or_default());
        out.extend_from_slice(&ticket.to_le_bytes());
        out.extend_from_slice(&context.to_le_bytes());
        if let Some(p) = endpoint {
            out.extend_from_slice(&p.id.to_le_bytes());
            out.push(alen as u8);
            out.extend_from_slice(address.get(..alen).unwrap_or_default());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Wake, WakeDecodeError> {
        let err = || WakeDecodeError(bytes.len());
        let (&kind, rest) = bytes.split_first().ok_or_else(err)?;
        let (&len, rest) = rest.split_first().ok_or_else(err)?;
        let len = usize::from(len);
        let name = rest.get(..len).ok_or_else(err)?;
        let rest = rest.get(len..).ok_or_else(err)?;
        let revision = std::str::from_utf8(name).map_err(|_| err())?.to_string();
        if kind == RECALL {
            return match rest {
                [] => Ok(Wake::Recall { revision }),
                _ => Err(err()),
            };
        }
        if kind != GRANT && kind != SHED {
            return Err(err());
        }
        let ticket = rest.get(..8).ok_or_else(err)?;
        let context = rest.get(8..12).ok_or_else(err)?;
        if kind == SHED {
            if rest.len() != 12 {
                return Err(err());
            }
            return Ok(Wake::Shed {
                revision,
                ticket: u64::from_le_bytes(ticket.try_into().map_err(|_| err())?),
                context: u32::from_le_bytes(context.try_into().map_err(|_| err())?),
            });
        }
        let endpoint = match rest.get(12..) {
            Some([]) => None,
            Some([a, b, c, d, len, address @ ..]) if address.len() == usize::from(*len) => {
                Some(Pick {
                    id: u32::from_le_bytes([*a, *b, *c, *d]),
                    address: std::str::from_utf8(address).map_err(|_| err())?.to_string(),
                })
            }
            _ => return Err(err()),
        };
        Ok(Wake::Grant {
            revision,
            ticket: u64::from_le_bytes(ticket.try_into().map_err(|_| err())?),
            context: u32::from_le_bytes(context.try_into().map_err(|_| err())?),
            endpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let g = Wake::Grant {
            revision: "torchserve".into(),
            ticket: 42,
            context: 7,
            endpoint: None,
        };
        assert_eq!(Wake::decode(&g.encode()).as_ref(), Ok(&g));
        let routed = Wake::Grant {
            revision: "torchserve".into(),
            ticket: 42,
            context: 7,
            endpoint: Some(Pick {
                id: 3,
                address: "10.0.0.5:8080".into(),
            }),
        };
        assert_eq!(Wake::decode(&routed.encode()).as_ref(), Ok(&routed));
        let r = routed.encode();
        assert!(
            Wake::decode(&r[..r.len() - 1]).is_err(),
            "truncated address"
        );
        let b = g.encode();
        assert!(Wake::decode(&b[..b.len() - 1]).is_err(), "truncated");
        let mut long = b.clone();
        long.push(0);
        assert!(Wake::decode(&long).is_err(), "trailing");
        assert!(Wake::decode(&[]).is_err());
        assert!(Wake::decode(&[9, 0]).is_err(), "unknown kind");
        assert!(Wake::decode(&[2, 1, b'a']).is_err(), "the old release kind");
        let shed = Wake::Shed {
            revision: "torchserve".into(),
            ticket: 9,
            context: 4,
        };
        let s = shed.encode();
        assert_eq!(Wake::decode(&s).as_ref(), Ok(&shed));
        assert!(Wake::decode(&s[..s.len() - 1]).is_err(), "truncated shed");
        let mut long = s.clone();
        long.push(0);
        assert!(Wake::decode(&long).is_err(), "trailing shed");
        let recall = Wake::Recall {
            revision: "torchserve".into(),
        };
        let r = recall.encode();
        assert_eq!(Wake::decode(&r).as_ref(), Ok(&recall));
        assert!(Wake::decode(&r[..r.len() - 1]).is_err(), "truncated recall");
        let mut long = r.clone();
        long.push(0);
        assert!(Wake::decode(&long).is_err(), "trailing recall");
        let mut bad = g.encode();
        bad[2] = 0xff;
        assert!(Wake::decode(&bad).is_err(), "not utf-8");
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = Wake::decode(&bytes);
        }
    }
}
