//! `inflight-predictor`: a TorchScript image classifier served over KServe's v1 and v2 (Open
//! Inference) protocols, on libtorch through `tch`.
//!
//! The request path: [`server`] accepts HTTP/1.1 connections on tokio, routes and reads the
//! body under a size limit and a read timeout; [`protocol`] and [`input`] turn the JSON into
//! image tensors or say exactly what is wrong; [`batcher`] hands them to model worker threads
//! that merge concurrent requests into one forward pass of the [`model`]; [`metrics`] counts
//! it all for Prometheus. The binary (`main.rs`) adds flags ([`config`]) and signals.

pub mod batcher;
pub mod config;
pub mod duration;
pub mod input;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod server;
