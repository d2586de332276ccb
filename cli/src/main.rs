//! `inflight`: the operator tool.
//!
//! - `inflight up` — the local stack: Envoy + filter, predictor replicas, the scaler, live view;
//! - `inflight render` — gateway config (filter config, WasmPlugin, EnvoyFilter) from
//!   InferenceService YAML;
//! - `inflight top` — a live per-revision view of a running gateway;
//! - `inflight bench` — what the filter costs, side by side with plain Envoy;
//! - `inflight tune` — a model server's knee, and the containerConcurrency and target from it.

use clap::{Parser, Subcommand};

mod bench;
mod render;
mod tune;
mod up;

#[derive(Parser)]
#[command(
    name = "inflight",
    version,
    about = "Concurrency-aware routing for inference gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the local stack (Envoy + filter, predictor replicas, scaler) from one config file.
    Up(up::Args),
    /// Live per-revision view of a running gateway (replicas, in-flight, queued, shed, req/s).
    Top(up::TopArgs),
    /// Render gateway config from KServe InferenceService YAML.
    Render(render::Args),
    /// Benchmark the filter against plain Envoy, an empty wasm filter and Envoy's circuit breaker.
    Bench(bench::Args),
    /// Find a model server's knee (sweep concurrency up) and recommend containerConcurrency and
    /// the autoscaling target.
    Tune(tune::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Up(a) => up::run(a),
        Command::Top(a) => up::top(a),
        Command::Render(a) => render::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Tune(a) => tune::run(a),
    }
}
