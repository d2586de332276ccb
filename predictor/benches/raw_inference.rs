//! Raw in-process inference, the predictor's upper bound: W threads, each with its own copy
//! of the TorchScript model and T intra-op threads, run forward passes of B images back to
//! back for S seconds; prints images/s and microseconds per image. No HTTP, no JSON, no PNG.
//!
//! `cargo bench -p inflight-predictor --bench raw_inference -- [--workers W] [--threads T]
//! [--batch B] [--seconds S] [--model-dir DIR]`; scripts/bench-predictor.sh runs it next to
//! the HTTP numbers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inflight_predictor::model::{Classify, TorchModel, IMAGE_LEN};

fn main() -> anyhow::Result<()> {
    let mut workers = 1usize;
    let mut threads = 1usize;
    let mut batch = 1usize;
    let mut seconds = 5.0f64;
    let mut model_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/model/mnist"));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--workers" => workers = value()?.parse()?,
            "--threads" => threads = value()?.parse()?,
            "--batch" => batch = value()?.parse()?,
            "--seconds" => seconds = value()?.parse()?,
            "--model-dir" => model_dir = value()?.into(),
            "--bench" => {} // passed by `cargo bench`
            other => anyhow::bail!("unknown argument {other}"),
        }
    }

    // A real digit, repeated: the work does not depend on the values.
    let digit = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/digits/3.png"
    ))?;
    let mut image = Vec::with_capacity(IMAGE_LEN);
    inflight_predictor::input::decode_png(&digit, &mut image).map_err(anyhow::Error::msg)?;
    let input: Arc<Vec<f32>> = Arc::new(image.repeat(batch));

    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(std::sync::Barrier::new(workers + 1));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (input, done, stop, ready, dir) = (
            Arc::clone(&input),
            Arc::clone(&done),
            Arc::clone(&stop),
            Arc::clone(&ready),
            model_dir.clone(),
        );
        handles.push(std::thread::spawn(move || -> anyhow::Result<()> {
            tch::set_num_threads(threads as i32);
            let model = TorchModel::load(&dir)?;
            for _ in 0..20 {
                model.logits(&input, batch)?; // warm up
            }
            ready.wait();
            while !stop.load(Ordering::Relaxed) {
                model.logits(&input, batch)?;
                done.fetch_add(batch as u64, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    ready.wait();
    let started = Instant::now();
    let cpu_before = process_cpu_seconds();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let images = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu_before;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    let per_second = images as f64 / elapsed;
    println!(
        "raw_inference workers={workers} threads={threads} batch={batch}: {per_second:.0} images/s, {:.1} us per image per worker, {:.1} cpu_us per image",
        1e6 * workers as f64 / per_second,
        1e6 * cpu / images.max(1) as f64
    );
    Ok(())
}

/// User + system CPU time of this process so far (from /proc/self/stat, in clock ticks of
/// 1/100 s, the Linux default): unlike wall time it does not grow when other processes
/// share the cores.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
