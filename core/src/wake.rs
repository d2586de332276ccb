//! The message a worker sends another worker's wake queue: "this ticket of this revision now
//! holds a slot; resume that stream (or pass the slot on if it is gone)".
//!
//! Carries the revision by name, not index, so it stays meaningful across a configuration
//! reload (old and new VMs run side by side and share revision state by name).

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    pub revision: String,
    pub ticket: u64,
    pub context: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("malformed wake message ({0} bytes)")]
pub struct WakeDecodeError(pub usize);

impl Wake {
    pub fn encode(&self) -> Vec<u8> {
        let name = self.revision.as_bytes();
        let len = name.len().min(255);
        let mut out = Vec::with_capacity(1 + len + 12);
        out.push(len as u8);
        out.extend_from_slice(&name[..len]);
        out.extend_from_slice(&self.ticket.to_le_bytes());
        out.extend_from_slice(&self.context.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Wake, WakeDecodeError> {
        let err = || WakeDecodeError(bytes.len());
        let (&len, rest) = bytes.split_first().ok_or_else(err)?;
        let len = usize::from(len);
        if rest.len() != len + 12 {
            return Err(err());
        }
        let (name, rest) = rest.split_at(len);
        let (ticket, context) = rest.split_at(8);
        let revision = std::str::from_utf8(name).map_err(|_| err())?.to_string();
        let ticket = u64::from_le_bytes(ticket.try_into().map_err(|_| err())?);
        let context = u32::from_le_bytes(context.try_into().map_err(|_| err())?);
        Ok(Wake {
            revision,
            ticket,
            context,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let w = Wake {
            revision: "torchserve".into(),
            ticket: 42,
            context: 7,
        };
        assert_eq!(Wake::decode(&w.encode()), Ok(w.clone()));
        let b = w.encode();
        assert!(Wake::decode(&b[..b.len() - 1]).is_err());
        assert!(Wake::decode(&[]).is_err());
        assert!(
            Wake::decode(&[1, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "not utf-8"
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = Wake::decode(&bytes);
        }
    }
}
