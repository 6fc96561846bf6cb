//! The engine: one thread that owns the backend and the weights, takes the waiting requests,
//! batches those that share their settings, and generates them together. Every sequence is
//! named by its own seed and sample number (`did_core::sample::SequenceId`), so it draws the
//! same tokens whatever else is in its batch (docs/serving.md).
//!
//! Batches form whenever the engine is free: the requests that arrived while the previous batch
//! ran go together in the next. Requests join a running batch only at its start: joining at a
//! block boundary needs sequences at different blocks in one model call, which the `Denoiser`
//! contract does not have yet.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use did_core::backend::Backend;
use did_core::model::{DiffusionDenoiser, Transformer};
use did_core::refine::{generate_observed, GenerateConfig, Generation, Progress};
use did_core::sample::SequenceId;
use tokio::sync::mpsc as events;

use crate::metrics::Metrics;

/// One request's work: its sequences (a prompt and an id each) and the settings they share.
#[derive(Debug)]
pub struct Job {
    /// Plan, sampler, remasking (the seed in it is unused: each sequence has its id).
    pub config: GenerateConfig,
    /// Per sequence: BOS and the prompt's tokens.
    pub prompts: Vec<Vec<u32>>,
    /// Per sequence: its name in the random streams.
    pub ids: Vec<SequenceId>,
    /// Send the draft block by block.
    pub stream: bool,
    /// Where the engine reports; a closed channel means the client left.
    pub events: events::UnboundedSender<JobEvent>,
}

/// What the engine tells a job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// The draft has drawn another block: per sequence, its tokens so far (prompt included,
    /// up to the block's end or the sequence's end).
    Draft(Vec<Vec<u32>>),
    /// Generation finished.
    Done(Vec<Finished>),
    /// Generation failed; the message says why.
    Failed(String),
}

/// One finished sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Its tokens, prompt included, up to its end.
    pub tokens: Vec<u32>,
    /// Positions regenerated after the draft (ascending).
    pub regenerated: Vec<usize>,
    /// Model calls it took part in: its cost alone.
    pub nfe: u32,
}

/// The queue is full: try again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// The handle the HTTP side submits jobs through.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
    capacity: usize,
}

impl EngineHandle {
    /// Queues `job`, or answers [`Busy`] when `capacity` jobs already wait.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        let reserved = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w < self.capacity).then_some(w + 1)
            });
        if reserved.is_err() {
            return Err(Busy);
        }
        self.jobs.send(job).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            Busy
        })
    }

    /// Jobs waiting for a batch.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// How the engine batches.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// At most this many sequences in one batch.
    pub max_batch: usize,
    /// At most this many jobs waiting; more are refused ([`Busy`]).
    pub queue: usize,
}

/// Starts the engine thread on the backend `make` creates there (a GPU context belongs to the
/// thread that uses it), sampling `model` with `weights`. It ends when every handle is dropped.
pub fn start<B, F>(
    make: F,
    model: Transformer,
    weights: Vec<f32>,
    options: EngineOptions,
    metrics: Arc<Metrics>,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>), String>
where
    B: Backend + 'static,
    F: FnOnce() -> Result<B, String> + Send + 'static,
{
    let (jobs, rx) = mpsc::channel::<Job>();
    let waiting = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let counter = Arc::clone(&waiting);
    let thread = std::thread::Builder::new()
        .name("did-engine".into())
        .spawn(move || {
            let started = make().and_then(|be| {
                let params = be.upload(&weights).map_err(|e| e.to_string())?;
                Ok((be, params))
            });
            let (be, params) = match started {
                Ok(v) => {
                    let _ = ready_tx.send(Ok(()));
                    v
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let engine = Engine {
                be,
                params,
                model,
                options,
                waiting: counter,
                metrics,
            };
            engine.run(&rx);
        })
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    ready_rx
        .recv()
        .map_err(|_| "the engine thread stopped while starting".to_string())??;
    Ok((
        EngineHandle {
            jobs,
            waiting,
            capacity: options.queue,
        },
        thread,
    ))
}

struct Engine<B: Backend> {
    be: B,
    params: B::Buffer,
    model: Transformer,
    options: EngineOptions,
    waiting: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl<B: Backend> Engine<B> {
    fn run(&self, rx: &mpsc::Receiver<Job>) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        loop {
            if waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => return, // every handle is gone: the server has stopped
                }
            }
            waiting.extend(rx.try_iter());
            let before = waiting.len();
            waiting.retain(|j| !j.events.is_closed());
            let cancelled = before - waiting.len();
            self.waiting.fetch_sub(cancelled, Ordering::SeqCst);
            self.metrics.cancelled.inc_by(cancelled as u64);
            let batch = take_batch(&mut waiting, self.options.max_batch);
            self.waiting.fetch_sub(batch.len(), Ordering::SeqCst);
            self.metrics
                .queue_depth
                .set(self.waiting.load(Ordering::SeqCst) as i64);
            if !batch.is_empty() {
                self.run_batch(&batch);
            }
        }
    }

    fn run_batch(&self, jobs: &[Job]) {
        let started = Instant::now();
        let prompts: Vec<&[u32]> = jobs
            .iter()
            .flat_map(|j| j.prompts.iter().map(Vec::as_slice))
            .collect();
        let ids: Vec<SequenceId> = jobs.iter().flat_map(|j| j.ids.iter().copied()).collect();
        let config = &jobs[0].config;
        self.metrics.running.set(ids.len() as i64);
        let result = DiffusionDenoiser::new(&self.be, &self.model, &self.params, true)
            .map_err(|e| e.to_string())
            .and_then(|mut denoiser| {
                generate_observed(&mut denoiser, config, &prompts, &ids, |p| {
                    if let Progress::Block {
                        stage: 0,
                        block,
                        batch,
                    } = p
                    {
                        let mut first = 0;
                        for job in jobs {
                            let seqs = first..first + job.ids.len();
                            first = seqs.end;
                            if job.stream {
                                let so_far = seqs
                                    .map(|s| {
                                        let end = block.end.min(batch.lengths[s]);
                                        batch.tokens[s * batch.seq_len()..][..end].to_vec()
                                    })
                                    .collect();
                                let _ = job.events.send(JobEvent::Draft(so_far));
                            }
                        }
                    }
                })
                .map_err(|e| e.to_string())
            });
        self.metrics.running.set(0);
        self.metrics.batch_sequences.observe(ids.len() as f64);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(g) => {
                self.metrics.model_calls.inc_by(u64::from(g.nfe()));
                let mut first = 0;
                for job in jobs {
                    let seqs = first..first + job.ids.len();
                    first = seqs.end;
                    let done: Vec<Finished> = seqs.map(|s| finished(&g, s)).collect();
                    let drawn: usize = done
                        .iter()
                        .zip(&job.prompts)
                        .map(|(f, p)| f.tokens.len() - p.len())
                        .sum();
                    self.metrics.generated_tokens.inc_by(drawn as u64);
                    let _ = job.events.send(JobEvent::Done(done));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.events.send(JobEvent::Failed(e.clone()));
                }
            }
        }
    }
}

/// The first waiting job and every later one with the same settings, up to `max_batch`
/// sequences; the others keep their order.
fn take_batch(waiting: &mut VecDeque<Job>, max_batch: usize) -> Vec<Job> {
    let Some(first) = waiting.pop_front() else {
        return Vec::new();
    };
    let mut size = first.ids.len();
    let mut batch = vec![first];
    let mut rest = VecDeque::with_capacity(waiting.len());
    while let Some(job) = waiting.pop_front() {
        if size + job.ids.len() <= max_batch && same_settings(&batch[0].config, &job.config) {
            size += job.ids.len();
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *waiting = rest;
    batch
}

/// Whether two jobs can share a batch: everything but the seed alike.
pub fn same_settings(a: &GenerateConfig, b: &GenerateConfig) -> bool {
    let unseeded = |c: &GenerateConfig| GenerateConfig {
        seed: 0,
        first_sample: 0,
        ..c.clone()
    };
    unseeded(a) == unseeded(b)
}

fn finished(g: &Generation, s: usize) -> Finished {
    let mut regenerated: Vec<usize> = g.stages[1..]
        .iter()
        .flat_map(|st| st.remasked[s].iter().copied())
        .collect();
    regenerated.sort_unstable();
    regenerated.dedup();
    Finished {
        tokens: g.batch.sequence(s).to_vec(),
        regenerated,
        nfe: g.sequence_nfe(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use did_backend_cpu::CpuBackend;
    use did_core::model::{Architecture, ModelConfig};
    use did_core::refine::StagePlan;

    fn job(seed: u64) -> (Job, events::UnboundedReceiver<JobEvent>) {
        let plan = "4,L:0.5".parse::<StagePlan>().unwrap().resolve(16).unwrap();
        let (events, rx) = events::unbounded_channel();
        let job = Job {
            config: GenerateConfig::new(plan, 0),
            prompts: vec![vec![256]],
            ids: SequenceId::numbered(seed, 0, 1),
            stream: false,
            events,
        };
        (job, rx)
    }

    #[test]
    fn a_job_whose_client_left_is_dropped_before_it_runs() {
        let config = ModelConfig {
            vocab_size: 258,
            mask_id: 257,
            layers: 1,
            hidden: 32,
            heads: 2,
            mlp_hidden: 64,
            context: 16,
            cond_dim: 8,
            ..ModelConfig::preset("tiny", Architecture::Dit).unwrap()
        };
        let model = Transformer::new(config).unwrap();
        let weights = model.table().random_values(1, 0.5);
        let metrics = Arc::new(Metrics::new());
        let options = EngineOptions {
            max_batch: 4,
            queue: 8,
        };
        let (handle, thread) = start(
            || Ok(CpuBackend::new()),
            model,
            weights,
            options,
            Arc::clone(&metrics),
        )
        .unwrap();
        let (gone, left) = job(1);
        drop(left);
        handle.submit(gone).unwrap();
        let (kept, mut rx) = job(2);
        handle.submit(kept).unwrap();
        match rx.blocking_recv() {
            Some(JobEvent::Done(done)) => assert_eq!(done.len(), 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(metrics.cancelled.get(), 1);
        assert_eq!(metrics.batch_sequences.get_sample_count(), 1);
        assert_eq!(handle.waiting(), 0);
        drop(handle);
        thread.join().unwrap();
    }

    #[test]
    fn a_full_queue_is_busy_until_a_job_leaves_it() {
        let (jobs, queue) = mpsc::channel();
        let handle = EngineHandle {
            jobs,
            waiting: Arc::new(AtomicUsize::new(0)),
            capacity: 2,
        };
        handle.submit(job(1).0).unwrap();
        handle.submit(job(2).0).unwrap();
        assert_eq!(handle.submit(job(3).0), Err(Busy));
        assert_eq!(handle.waiting(), 2);
        // The engine taking a job makes room.
        let _taken = queue.recv().unwrap();
        handle.waiting.fetch_sub(1, Ordering::SeqCst);
        assert!(handle.submit(job(4).0).is_ok());
    }
}
