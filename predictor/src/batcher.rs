//! Runs the model on dedicated worker threads, off the async runtime, and merges concurrent
//! requests into one forward pass (dynamic batching, as TorchServe's `batch_size` and
//! `max_batch_delay`).
//!
//! A worker takes the oldest job, then keeps taking queued jobs while the batch has fewer than
//! `max_batch_size` images, waiting at most `max_batch_delay` after the first one for more to
//! arrive. With a delay of zero it only takes what is already queued: no request ever waits for
//! a batch to fill, but under load the jobs that queued during one forward pass share the next.
//! A job is never split; one bigger than `max_batch_size` runs alone.
//!
//! Each worker loads its own copy of the model and sets its own intra-op thread count (libtorch
//! keeps that per thread). The model is ready when every worker has loaded it.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use tokio::sync::{oneshot, watch};

use crate::metrics::Metrics;
use crate::model::{Classify, ModelError, IMAGE_LEN};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOptions {
    /// Images per forward pass at most (1 turns batching off).
    pub max_batch_size: usize,
    /// How long the first job of a batch may wait for more.
    pub max_batch_delay: Duration,
    /// Worker threads, each with its own model copy.
    pub workers: usize,
    /// libtorch intra-op threads per worker (0: leave libtorch's default).
    pub threads: usize,
    /// Jobs waiting for a worker at most; past that requests are refused with 503.
    pub max_queue: usize,
}

/// Where the model is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelStatus {
    Loading,
    Ready { classes: usize },
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(
        "the server is overloaded: {0} requests are already waiting for the model; retry later"
    )]
    Overloaded(usize),
    #[error("the model workers have stopped")]
    Stopped,
    #[error(transparent)]
    Model(#[from] ModelError),
}

struct Job {
    images: Vec<f32>,
    count: usize,
    reply: oneshot::Sender<Result<Vec<f32>, ModelError>>,
}

/// The handle the HTTP side uses: cheap to clone, `infer` never blocks the runtime.
#[derive(Clone)]
pub struct Batcher {
    jobs: Sender<Job>,
    status: watch::Receiver<ModelStatus>,
    max_queue: usize,
}

/// Builds the model inside a worker thread (called once per worker).
pub type Loader<M> = Arc<dyn Fn() -> Result<M, ModelError> + Send + Sync>;

impl Batcher {
    /// Spawns the workers; they load the model and then serve jobs until every `Batcher`
    /// clone is dropped.
    pub fn start<M: Classify + 'static>(
        loader: Loader<M>,
        options: BatchOptions,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Batcher> {
        let (jobs, receiver) = crossbeam_channel::bounded(options.max_queue.max(1));
        let (status_tx, status) = watch::channel(ModelStatus::Loading);
        let status_tx = Arc::new(status_tx);
        let workers = options.workers.max(1);
        let loaded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for index in 0..workers {
            let receiver = receiver.clone();
            let loader = Arc::clone(&loader);
            let status_tx = Arc::clone(&status_tx);
            let loaded = Arc::clone(&loaded);
            let metrics = Arc::clone(&metrics);
            thread::Builder::new()
                .name(format!("model-worker-{index}"))
                .spawn(move || {
                    if options.threads > 0 {
                        tch::set_num_threads(options.threads as i32);
                    }
                    let model = match loader() {
                        Ok(model) => model,
                        Err(e) => {
                            status_tx.send_replace(ModelStatus::Failed(e.to_string()));
                            return;
                        }
                    };
                    let done = loaded.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    if done == workers {
                        // A failure in another worker wins over readiness.
                        status_tx.send_if_modified(|s| {
                            if *s == ModelStatus::Loading {
                                *s = ModelStatus::Ready {
                                    classes: model.classes(),
                                };
                                true
                            } else {
                                false
                            }
                        });
                    }
                    run_worker(&model, &receiver, &options, &metrics);
                })?;
        }
        Ok(Batcher {
            jobs,
            status,
            max_queue: options.max_queue.max(1),
        })
    }

    pub fn status(&self) -> ModelStatus {
        self.status.borrow().clone()
    }

    pub fn is_ready(&self) -> bool {
        matches!(*self.status.borrow(), ModelStatus::Ready { .. })
    }

    /// Waits until the model is ready or failed to load.
    pub async fn wait_loaded(&self) -> ModelStatus {
        let mut status = self.status.clone();
        let result = match status
            .wait_for(|s| !matches!(s, ModelStatus::Loading))
            .await
        {
            Ok(s) => s.clone(),
            Err(_) => ModelStatus::Failed("the model workers stopped while loading".into()),
        };
        result
    }

    /// Logits for `count` images (`count × classes` values).
    pub async fn infer(&self, images: Vec<f32>, count: usize) -> Result<Vec<f32>, InferError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            images,
            count,
            reply,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(InferError::Overloaded(self.max_queue)),
            Err(TrySendError::Disconnected(_)) => return Err(InferError::Stopped),
        }
        match answer.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(InferError::Stopped),
        }
    }
}

fn run_worker<M: Classify>(
    model: &M,
    jobs: &Receiver<Job>,
    options: &BatchOptions,
    metrics: &Metrics,
) {
    let classes = model.classes();
    let mut held: Option<Job> = None;
    let mut batch: Vec<Job> = Vec::with_capacity(options.max_batch_size.max(1));
    let mut input: Vec<f32> = Vec::new();
    loop {
        let first = match held.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return, // every Batcher is gone: shut down
            },
        };
        held = collect_batch(first, jobs, options, &mut batch);
        // A requester that went away (client disconnected) needs no answer.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let count: usize = batch.iter().map(|j| j.count).sum();
        let result = if let [only] = batch.as_slice() {
            run_timed(model, &only.images, count, metrics)
        } else {
            input.clear();
            input.reserve(count * IMAGE_LEN);
            for job in &batch {
                input.extend_from_slice(&job.images);
            }
            run_timed(model, &input, count, metrics)
        };
        match result {
            Ok(logits) => {
                let mut rest = logits.as_slice();
                for job in batch.drain(..) {
                    let (mine, tail) = rest.split_at((job.count * classes).min(rest.len()));
                    rest = tail;
                    let _ = job.reply.send(Ok(mine.to_vec()));
                }
            }
            Err(e) => {
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn run_timed<M: Classify>(
    model: &M,
    images: &[f32],
    count: usize,
    metrics: &Metrics,
) -> Result<Vec<f32>, ModelError> {
    let started = Instant::now();
    // A panic in the model (tch panics on some errors) must not take the worker down with the
    // requests queued on it: it becomes this batch's error.
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.logits(images, count)))
            .unwrap_or_else(|_| Err(ModelError::Inference("the model panicked".into())));
    metrics.record_batch(count, started.elapsed());
    result
}

/// Fills `batch` starting with `first`; returns a job that did not fit, to start the next batch.
fn collect_batch(
    first: Job,
    jobs: &Receiver<Job>,
    options: &BatchOptions,
    batch: &mut Vec<Job>,
) -> Option<Job> {
    let deadline = Instant::now() + options.max_batch_delay;
    let mut images = first.count;
    batch.push(first);
    while images < options.max_batch_size {
        let next = match jobs.try_recv() {
            Ok(job) => job,
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {
                if options.max_batch_delay.is_zero() {
                    return None;
                }
                match jobs.recv_deadline(deadline) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
                }
            }
        };
        if images + next.count > options.max_batch_size {
            return Some(next);
        }
        images += next.count;
        batch.push(next);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Logit `k` of an image is its first pixel + k, so answers can be traced to inputs; every
    /// call's batch size is recorded as the call starts; a barrier can hold the first call.
    struct Fake {
        calls: Arc<Mutex<Vec<usize>>>,
        gate: Option<Arc<std::sync::Barrier>>,
    }

    impl Classify for Fake {
        fn logits(&self, images: &[f32], count: usize) -> Result<Vec<f32>, ModelError> {
            let first_call = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(count);
                calls.len() == 1
            };
            if let (true, Some(gate)) = (first_call, &self.gate) {
                gate.wait();
            }
            if images.first() == Some(&-1.0) {
                return Err(ModelError::Inference("poisoned".into()));
            }
            if images.first() == Some(&-2.0) {
                panic!("the fake model panics on -2");
            }
            Ok(images
                .chunks(IMAGE_LEN)
                .flat_map(|img| (0..3).map(move |k| img[0] + k as f32))
                .collect())
        }
        fn classes(&self) -> usize {
            3
        }
    }

    fn options(max_batch_size: usize, delay_ms: u64) -> BatchOptions {
        BatchOptions {
            max_batch_size,
            max_batch_delay: Duration::from_millis(delay_ms),
            workers: 1,
            threads: 0,
            max_queue: 64,
        }
    }

    fn images(first_pixels: &[f32]) -> Vec<f32> {
        first_pixels
            .iter()
            .flat_map(|p| {
                let mut img = vec![0.0; IMAGE_LEN];
                img[0] = *p;
                img
            })
            .collect()
    }

    fn start(
        opts: BatchOptions,
        gate: Option<Arc<std::sync::Barrier>>,
    ) -> (Batcher, Arc<Mutex<Vec<usize>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = Arc::clone(&calls);
        let loader: Loader<Fake> = Arc::new(move || {
            Ok(Fake {
                calls: Arc::clone(&c),
                gate: gate.clone(),
            })
        });
        (Batcher::start(loader, opts, Metrics::new()).unwrap(), calls)
    }

    #[tokio::test]
    async fn answers_each_job_with_its_own_logits() {
        let (b, _) = start(options(8, 0), None);
        assert_eq!(b.wait_loaded().await, ModelStatus::Ready { classes: 3 });
        let out = b.infer(images(&[5.0, 7.0]), 2).await.unwrap();
        assert_eq!(out, vec![5.0, 6.0, 7.0, 7.0, 8.0, 9.0]);
    }

    #[tokio::test]
    async fn jobs_queued_during_a_pass_share_the_next_one() {
        // The first pass blocks on the gate until all jobs are queued behind it.
        let gate = Arc::new(std::sync::Barrier::new(2));
        let (b, calls) = start(options(4, 0), Some(Arc::clone(&gate)));
        b.wait_loaded().await;
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.infer(images(&[0.0]), 1).await }
        });
        while calls.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let mut rest = Vec::new();
        for i in 1..=5 {
            let b = b.clone();
            rest.push(tokio::spawn(async move {
                (i, b.infer(images(&[i as f32]), 1).await)
            }));
        }
        // Wait (on a signal, not a sleep) until the five are in the queue.
        while b.jobs.len() < 5 {
            tokio::task::yield_now().await;
        }
        gate.wait();
        assert_eq!(first.await.unwrap().unwrap(), vec![0.0, 1.0, 2.0]);
        for task in rest {
            let (i, out) = task.await.unwrap();
            let i = i as f32;
            assert_eq!(out.unwrap(), vec![i, i + 1.0, i + 2.0]);
        }
        // 1 alone, then 4 (the maximum), then the 1 left over.
        assert_eq!(*calls.lock().unwrap(), vec![1, 4, 1]);
    }

    #[tokio::test]
    async fn a_job_larger_than_the_maximum_runs_alone() {
        let (b, calls) = start(options(2, 0), None);
        b.wait_loaded().await;
        let out = b.infer(images(&[1.0, 2.0, 3.0]), 3).await.unwrap();
        assert_eq!(out.len(), 9);
        assert_eq!(*calls.lock().unwrap(), vec![3]);
    }

    #[tokio::test]
    async fn delay_waits_for_more_jobs() {
        let (b, calls) = start(options(8, 200), None);
        b.wait_loaded().await;
        let tasks: Vec<_> = (0..3)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.infer(images(&[i as f32]), 1).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // All three arrive well within 200 ms of the first: one pass.
        assert_eq!(*calls.lock().unwrap(), vec![3]);
    }

    #[tokio::test]
    async fn a_model_error_reaches_every_job_of_the_batch() {
        let (b, _) = start(options(1, 0), None);
        b.wait_loaded().await;
        let err = b.infer(images(&[-1.0]), 1).await.unwrap_err();
        assert!(err.to_string().contains("poisoned"), "{err}");
        // The worker is still alive.
        assert!(b.infer(images(&[1.0]), 1).await.is_ok());
    }

    #[tokio::test]
    async fn a_panicking_model_fails_the_batch_not_the_worker() {
        let (b, _) = start(options(1, 0), None);
        b.wait_loaded().await;
        let err = b.infer(images(&[-2.0]), 1).await.unwrap_err();
        assert!(err.to_string().contains("the model panicked"), "{err}");
        assert_eq!(
            b.infer(images(&[1.0]), 1).await.unwrap(),
            vec![1.0, 2.0, 3.0]
        );
    }

    #[tokio::test]
    async fn a_load_failure_is_reported() {
        let loader: Loader<Fake> = Arc::new(|| Err(ModelError::Inference("no such model".into())));
        let b = Batcher::start(loader, options(1, 0), Metrics::new()).unwrap();
        match b.wait_loaded().await {
            ModelStatus::Failed(msg) => assert!(msg.contains("no such model")),
            other => panic!("{other:?}"),
        }
        assert!(!b.is_ready());
    }

    #[tokio::test]
    async fn a_full_queue_is_refused() {
        let gate = Arc::new(std::sync::Barrier::new(2));
        let mut opts = options(1, 0);
        opts.max_queue = 1;
        let (b, calls) = start(opts, Some(Arc::clone(&gate)));
        b.wait_loaded().await;
        // First job: taken by the worker and held at the gate. Second: fills the queue.
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.infer(images(&[0.0]), 1).await }
        });
        while calls.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let b = b.clone();
            async move { b.infer(images(&[1.0]), 1).await }
        });
        while b.jobs.is_empty() {
            tokio::task::yield_now().await;
        }
        let third = b.infer(images(&[2.0]), 1).await;
        assert!(matches!(third, Err(InferError::Overloaded(1))), "{third:?}");
        gate.wait();
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok());
    }
}
