//! inflight-core: every decision the inflight gateway filter makes, with no I/O.
//!
//! The filter (`inflight-filter`) is a thin proxy-wasm adapter around this crate; the CLI's
//! local scaler uses the same decider. Nothing here imports proxy-wasm or reads a clock: time
//! is passed in as milliseconds, so every test drives the clock exactly, and the crate builds
//! for native targets and for `wasm32-wasip1` alike.

pub mod admission;
pub mod autoscaler;
pub mod config;
pub mod duration;
pub mod fleet;
pub mod kpa;
pub mod membership;
pub mod outcome;
pub mod store;
pub mod table;
pub mod wake;
pub mod window;
pub mod worker;

pub use admission::{Admission, Grant, Owner, RevisionState, ShedReason, Waiter};
pub use config::{Config, ConfigError, LimitParams, Limits, RevisionConfig, UnknownRevision};
pub use outcome::{Gauge, Outcome};
pub use table::{RevisionId, RevisionTable};
pub use worker::{Effect, Reply, RequestFacts, Verdict, Worker};
