//! The `inflight-predictor` binary: flags, signals, and the one stdout line
//! (`listening on HOST:PORT`) that scripts and tests read to find the server.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::Parser as _;
use inflight_predictor::batcher::ModelStatus;
use inflight_predictor::config::Config;
use inflight_predictor::server::Server;

fn main() -> ExitCode {
    let config = Config::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads.max(1))
        .thread_name("http")
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("inflight-predictor: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inflight-predictor: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let server = Server::bind(&config)
        .await
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    let addr = server.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }
    eprintln!(
        "inflight-predictor: serving model {:?} from {} (workers {}, threads {}, max batch {}, max delay {:?})",
        config.model_name,
        config.model_dir.display(),
        config.workers,
        config.threads,
        config.max_batch_size,
        config.max_batch_delay
    );

    let batcher = server.batcher();
    let load_failure: Arc<Mutex<Option<String>>> = Arc::default();
    let failure = Arc::clone(&load_failure);
    let stop = async move {
        let loaded = async {
            let started = std::time::Instant::now();
            match batcher.wait_loaded().await {
                ModelStatus::Failed(e) => {
                    if let Ok(mut f) = failure.lock() {
                        *f = Some(e);
                    }
                }
                status => {
                    eprintln!(
                        "inflight-predictor: model ready ({status:?}) in {:?}",
                        started.elapsed()
                    );
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = loaded => {}
            signal = shutdown_signal() => eprintln!("inflight-predictor: {signal}: finishing in-flight requests"),
        }
    };
    server.serve(stop).await?;
    if let Ok(mut failure) = load_failure.lock() {
        if let Some(e) = failure.take() {
            anyhow::bail!("{e}");
        }
    }
    eprintln!("inflight-predictor: stopped");
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            eprintln!("inflight-predictor: cannot install signal handlers; stop with SIGKILL");
            std::future::pending().await
        }
    }
}
