//! Command-line flags, each also settable by an `INFLIGHT_PREDICTOR_*` env var.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::batcher::BatchOptions;
use crate::duration::parse_duration;

/// The model shipped in the source tree this binary was built from; containers and the local
/// stack pass `--model-dir` instead.
const DEFAULT_MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/model/mnist");

#[derive(Parser, Debug, Clone)]
#[command(
    name = "inflight-predictor",
    version,
    about = "Serves a TorchScript image classifier over KServe's v1 and v2 (Open Inference) protocols."
)]
pub struct Config {
    /// Directory holding the TorchScript module `model.pt`.
    #[arg(long, env = "INFLIGHT_PREDICTOR_MODEL_DIR", default_value = DEFAULT_MODEL_DIR)]
    pub model_dir: PathBuf,

    /// Name the model is served under: /v1/models/NAME:predict, /v2/models/NAME/infer.
    #[arg(long, env = "INFLIGHT_PREDICTOR_MODEL_NAME", default_value = "mnist")]
    pub model_name: String,

    /// Address to listen on; 0.0.0.0 in a container.
    #[arg(long, env = "INFLIGHT_PREDICTOR_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on; 0 picks a free one (the chosen address is printed on stdout as
    /// `listening on HOST:PORT`).
    #[arg(long, env = "INFLIGHT_PREDICTOR_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Model worker threads, each with its own copy of the model.
    #[arg(long, env = "INFLIGHT_PREDICTOR_WORKERS", default_value_t = 1)]
    pub workers: usize,

    /// Threads of the async runtime that serve HTTP (parsing, decoding, answering).
    #[arg(long, env = "INFLIGHT_PREDICTOR_IO_THREADS", default_value_t = 1)]
    pub io_threads: usize,

    /// libtorch intra-op threads per worker (0 = libtorch's default, one per core).
    #[arg(long, env = "INFLIGHT_PREDICTOR_THREADS", default_value_t = 1)]
    pub threads: usize,

    /// Images per forward pass at most; 1 turns dynamic batching off.
    #[arg(long, env = "INFLIGHT_PREDICTOR_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,

    /// How long the first request of a batch may wait for others ("0": take only what is
    /// already queued, never wait).
    #[arg(long, env = "INFLIGHT_PREDICTOR_MAX_BATCH_DELAY", default_value = "0", value_parser = parse_duration)]
    pub max_batch_delay: Duration,

    /// Requests waiting for a model worker at most; more are refused with 503.
    #[arg(long, env = "INFLIGHT_PREDICTOR_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "INFLIGHT_PREDICTOR_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Time a client has to send a request's headers, and again its body; slower ones get
    /// 408 (body) or are disconnected (headers).
    #[arg(long, env = "INFLIGHT_PREDICTOR_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub read_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, env = "INFLIGHT_PREDICTOR_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Test aid: honour an `x-predictor-delay-ms` request header by holding the request that
    /// long (at most 60 s) before inference, to simulate a slow model. Off in production.
    #[arg(long, env = "INFLIGHT_PREDICTOR_DELAY_HEADER", default_value_t = false)]
    pub delay_header: bool,
}

impl Config {
    /// The defaults, as if run without flags (and without env vars).
    pub fn defaults() -> Self {
        Config {
            model_dir: PathBuf::from(DEFAULT_MODEL_DIR),
            model_name: "mnist".into(),
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            workers: 1,
            io_threads: 1,
            threads: 1,
            max_batch_size: 32,
            max_batch_delay: Duration::ZERO,
            max_queue: 1024,
            max_body_bytes: 4 * 1024 * 1024,
            read_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            delay_header: false,
        }
    }

    pub fn batch_options(&self) -> BatchOptions {
        BatchOptions {
            max_batch_size: self.max_batch_size.max(1),
            max_batch_delay: self.max_batch_delay,
            workers: self.workers.max(1),
            threads: self.threads,
            max_queue: self.max_queue.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_clap_defaults() {
        let parsed = Config::try_parse_from(["inflight-predictor"]).unwrap();
        let defaults = Config::defaults();
        // Env vars could change the parsed values; the test environment sets none.
        assert_eq!(format!("{parsed:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn flags_parse() {
        let c = Config::try_parse_from([
            "inflight-predictor",
            "--port",
            "0",
            "--max-batch-delay",
            "5ms",
            "--model-name",
            "torchserve",
        ])
        .unwrap();
        assert_eq!(c.port, 0);
        assert_eq!(c.max_batch_delay, Duration::from_millis(5));
        assert_eq!(c.model_name, "torchserve");
    }

    #[test]
    fn bad_duration_is_explained() {
        let err = Config::try_parse_from(["inflight-predictor", "--read-timeout", "5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no unit"), "{err}");
    }
}
