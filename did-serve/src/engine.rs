//! The engine: one thread that owns the backend and the weights. Jobs wait in a bounded queue;
//! while the running sequences leave room (`max_batch`), the front job and the waiting jobs that
//! share its settings start as a cohort, generated on its own thread (`crate::cohort`). Each
//! turn the engine runs every cohort's next model call, merging those that read no cached keys
//! (`crate::merge`), so requests join and leave between model calls rather than waiting for a
//! whole batch. Every sequence is named by its own seed and sample number
//! (`did_core::sample::SequenceId`), so it draws the same tokens whatever runs beside it
//! (docs/serving.md).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use did_core::backend::{Backend, WeightFormat};
use did_core::denoiser::{Denoiser, HostDrawScratch};
use did_core::model::{DiffusionDenoiser, Transformer};
use did_core::refine::GenerateConfig;
use did_core::sample::SequenceId;
use tokio::sync::mpsc as events;

use crate::cohort::{self, Call, CohortId, Message, Reply, Sharing};
use crate::merge;
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

    /// Jobs waiting to start.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// How much the engine runs and queues.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// At most this many sequences running at once.
    pub max_batch: usize,
    /// At most this many jobs waiting; more are refused ([`Busy`]).
    pub queue: usize,
    /// How the weight matrices are stored on the backend.
    pub weights: WeightFormat,
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
                let params = be
                    .upload_weights(&weights, &model.weight_matrices(), options.weights)
                    .map_err(|e| format!("--weights {}: {e}", options.weights))?;
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

/// A running cohort as the engine sees it.
struct Running<'a, B: Backend> {
    id: CohortId,
    /// Its jobs' channels: when every one is closed, every client left.
    clients: Vec<events::UnboundedSender<JobEvent>>,
    sequences: usize,
    /// Its KV cache lives here.
    denoiser: DiffusionDenoiser<'a, B>,
    replies: mpsc::Sender<Reply>,
    /// The call it waits on.
    pending: Option<Call>,
}

impl<B: Backend> Engine<B> {
    /// Each turn: take in new jobs and start cohorts while there is room, wait until every
    /// running cohort has asked for its next call, then run those calls — merging what can be
    /// merged — and answer them.
    fn run(&self, rx: &mpsc::Receiver<Job>) {
        let (calls_tx, calls) = mpsc::channel::<Message>();
        let mut shared = match self.denoiser() {
            Ok(d) => d,
            Err(e) => return fail_all(rx, &e),
        };
        let mut running: Vec<Running<'_, B>> = Vec::new();
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut next_id: CohortId = 0;
        loop {
            if running.is_empty() && waiting.is_empty() {
                // Idle: give back the shared passes' buffers (sized by the largest call so far).
                if let Ok(fresh) = self.denoiser() {
                    shared = fresh;
                }
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
            self.admit(&mut waiting, &mut running, &mut next_id, &calls_tx);
            self.metrics
                .queue_depth
                .set(self.waiting.load(Ordering::SeqCst) as i64);
            self.count_running(&running);
            while running.iter().any(|r| r.pending.is_none()) {
                match calls.recv() {
                    Ok(Message::Call(id, call)) => {
                        if let Some(r) = running.iter_mut().find(|r| r.id == id) {
                            r.pending = Some(call);
                        }
                    }
                    Ok(Message::Ended(id)) => {
                        running.retain(|r| r.id != id);
                        self.count_running(&running);
                    }
                    Err(_) => return, // unreachable: this thread holds a sender
                }
            }
            for r in running.iter_mut() {
                if r.clients.iter().all(|c| c.is_closed()) && r.pending.is_some() {
                    r.pending = None;
                    self.metrics.cancelled.inc_by(r.clients.len() as u64);
                    let _ = r
                        .replies
                        .send(Reply::Failed("cancelled: every client left".into()));
                }
            }
            self.step(&mut shared, &mut running);
        }
    }

    fn denoiser(&self) -> Result<DiffusionDenoiser<'_, B>, String> {
        DiffusionDenoiser::new(&self.be, &self.model, &self.params, true).map_err(|e| e.to_string())
    }

    /// Starts cohorts from the front of the queue while their sequences fit in `max_batch`.
    fn admit<'a>(
        &'a self,
        waiting: &mut VecDeque<Job>,
        running: &mut Vec<Running<'a, B>>,
        next_id: &mut CohortId,
        calls: &mpsc::Sender<Message>,
    ) {
        let cfg = self.model.config();
        loop {
            let busy: usize = running.iter().map(|r| r.sequences).sum();
            let jobs = take_batch(waiting, self.options.max_batch.saturating_sub(busy));
            if jobs.is_empty() {
                return;
            }
            self.waiting.fetch_sub(jobs.len(), Ordering::SeqCst);
            let clients: Vec<_> = jobs.iter().map(|j| j.events.clone()).collect();
            let sequences = jobs.iter().map(|j| j.ids.len()).sum();
            let started = self.denoiser().and_then(|denoiser| {
                let id = *next_id;
                let replies = cohort::spawn(
                    id,
                    jobs,
                    (cfg.vocab_size, cfg.mask_id),
                    calls.clone(),
                    Arc::clone(&self.metrics),
                )?;
                Ok(Running {
                    id,
                    clients: clients.clone(),
                    sequences,
                    denoiser,
                    replies,
                    pending: None,
                })
            });
            *next_id += 1;
            match started {
                Ok(r) => {
                    self.metrics.started.inc_by(r.sequences as u64);
                    running.push(r);
                }
                Err(e) => {
                    for c in clients {
                        let _ = c.send(JobEvent::Failed(e.clone()));
                    }
                }
            }
        }
    }

    /// Runs every pending call: stage starts on the cohort's own denoiser; calls over whole
    /// sequences merged, draft-block calls and block commits jointly over their cohorts' caches,
    /// in as few model calls as they allow (`crate::merge`).
    fn step<'a>(&'a self, shared: &mut DiffusionDenoiser<'a, B>, running: &mut [Running<'a, B>]) {
        let mut merged: Vec<(usize, Call)> = Vec::new();
        let mut joint: Vec<(usize, Call)> = Vec::new();
        for (i, r) in running.iter_mut().enumerate() {
            let Some(call) = r.pending.take() else {
                continue;
            };
            match call.sharing() {
                Sharing::Merged(_) => merged.push((i, call)),
                Sharing::Joint(_) | Sharing::JointCommit(_) => joint.push((i, call)),
                Sharing::Alone => {
                    let asks_outputs = matches!(call, Call::Logits(_) | Call::Draw { .. });
                    let started = Instant::now();
                    let _ = r.replies.send(run_own(&mut r.denoiser, call));
                    if asks_outputs {
                        self.count_call(r.sequences, started);
                    }
                }
            }
        }
        let calls: Vec<&Call> = merged.iter().map(|(_, c)| c).collect();
        for group in merge::groups(&calls, MAX_SHARED_OUTPUTS) {
            let members: Vec<&Call> = group.iter().map(|&g| calls[g]).collect();
            let started = Instant::now();
            let replies = merge::run(shared, &members);
            let cohorts: Vec<usize> = group.iter().map(|&g| merged[g].0).collect();
            let sequences = cohorts.iter().map(|&i| running[i].sequences).sum();
            self.count_call(sequences, started);
            for (&i, reply) in cohorts.iter().zip(replies) {
                let _ = running[i].replies.send(reply);
            }
        }
        let calls: Vec<&Call> = joint.iter().map(|(_, c)| c).collect();
        for group in merge::groups(&calls, MAX_SHARED_OUTPUTS) {
            let cohorts: Vec<usize> = group.iter().map(|&g| joint[g].0).collect();
            let started = Instant::now();
            // Each member's denoiser, borrowed together (the cohorts are distinct).
            let mut denoisers: Vec<(usize, &mut DiffusionDenoiser<'a, B>)> = running
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| cohorts.contains(i))
                .map(|(i, r)| (i, &mut r.denoiser))
                .collect();
            denoisers.sort_by_key(|(i, _)| cohorts.iter().position(|c| c == i));
            let members = denoisers
                .into_iter()
                .zip(&group)
                .map(|((_, d), &g)| (d, calls[g]))
                .collect();
            let commits = matches!(calls[group[0]], Call::Commit(_));
            let replies = merge::run_joint(shared, members);
            if !commits {
                let sequences = cohorts.iter().map(|&i| running[i].sequences).sum();
                self.count_call(sequences, started);
            }
            for (&i, reply) in cohorts.iter().zip(replies) {
                let _ = running[i].replies.send(reply);
            }
        }
    }

    fn count_running(&self, running: &[Running<'_, B>]) {
        let sequences: usize = running.iter().map(|r| r.sequences).sum();
        self.metrics.running.set(sequences as i64);
    }

    /// A model call that served `sequences`.
    fn count_call(&self, sequences: usize, started: Instant) {
        self.metrics.model_calls.inc();
        self.metrics.batch_sequences.observe(sequences as f64);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

/// At most this many outputs (logits or draws) in one shared model call: the default
/// `max_outputs_per_call` of one cohort's calls.
const MAX_SHARED_OUTPUTS: usize = 1024;

/// A cohort's call that does not merge, on its own denoiser.
fn run_own<B: Backend>(d: &mut DiffusionDenoiser<'_, B>, call: Call) -> Reply {
    let vocab = d.vocab_size();
    let reply = match call {
        Call::BeginStage {
            batch,
            seq_len,
            block_size,
        } => d
            .begin_stage(batch, seq_len, block_size)
            .map(|()| Reply::Ready),
        Call::Commit(r) => d.commit_block(&r.view()).map(|()| Reply::Ready),
        Call::Logits(r) => {
            let mut out = vec![0.0; r.outputs.len() * vocab];
            d.logits(&r.view(), &mut out).map(|()| Reply::Logits(out))
        }
        Call::Draw {
            request,
            mask_id,
            nucleus,
            draws,
        } => {
            let mut out = vec![merge::unset(mask_id); request.outputs.len()];
            d.draw(
                &request.view(),
                mask_id,
                &nucleus,
                &draws,
                &mut HostDrawScratch::default(),
                &mut out,
            )
            .map(|()| Reply::Tokens(out))
        }
    };
    reply.unwrap_or_else(|e| Reply::Failed(e.to_string()))
}

/// The engine could not start: every job that comes fails with `why`.
fn fail_all(rx: &mpsc::Receiver<Job>, why: &str) {
    for job in rx {
        let _ = job.events.send(JobEvent::Failed(why.to_string()));
    }
}

/// The first waiting job and every later one with the same settings, up to `room` sequences;
/// nothing when the first does not fit. The others keep their order.
fn take_batch(waiting: &mut VecDeque<Job>, room: usize) -> Vec<Job> {
    match waiting.front() {
        Some(first) if first.ids.len() <= room => {}
        _ => return Vec::new(),
    }
    let Some(first) = waiting.pop_front() else {
        return Vec::new();
    };
    let mut size = first.ids.len();
    let mut batch = vec![first];
    let mut rest = VecDeque::with_capacity(waiting.len());
    while let Some(job) = waiting.pop_front() {
        if size + job.ids.len() <= room && same_settings(&batch[0].config, &job.config) {
            size += job.ids.len();
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *waiting = rest;
    batch
}

/// Whether two jobs can start as one cohort: everything but the seed alike.
pub fn same_settings(a: &GenerateConfig, b: &GenerateConfig) -> bool {
    let unseeded = |c: &GenerateConfig| GenerateConfig {
        seed: 0,
        first_sample: 0,
        ..c.clone()
    };
    unseeded(a) == unseeded(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use did_backend_cpu::CpuBackend;
    use did_core::model::{Architecture, ModelConfig};
    use did_core::refine::StagePlan;
    use std::time::Duration;

    const LEN: usize = 32;

    /// A job of one sequence with `plan` at length `LEN`.
    fn job_with(plan: &str, seed: u64) -> (Job, events::UnboundedReceiver<JobEvent>) {
        let plan = plan.parse::<StagePlan>().unwrap().resolve(LEN).unwrap();
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

    fn job(seed: u64) -> (Job, events::UnboundedReceiver<JobEvent>) {
        job_with("4,L:0.5", seed)
    }

    /// Many calls (first-hitting reveals one position a call), drafting in blocks of 4 as the
    /// quick job does, so their drafts share calls.
    const SLOW: &str = "4,4:0.9,4:0.9,4:0.9,4:0.9,4:0.9,4:0.9,L:0.9";

    fn engine(max_batch: usize) -> (EngineHandle, std::thread::JoinHandle<()>, Arc<Metrics>) {
        let config = ModelConfig {
            vocab_size: 258,
            mask_id: 257,
            layers: 1,
            hidden: 32,
            heads: 2,
            mlp_hidden: 64,
            context: LEN,
            cond_dim: 8,
            ..ModelConfig::preset("tiny", Architecture::Dit).unwrap()
        };
        let model = Transformer::new(config).unwrap();
        let weights = model.table().random_values(1, 0.5);
        let metrics = Arc::new(Metrics::new());
        let options = EngineOptions {
            max_batch,
            queue: 8,
            weights: WeightFormat::F32,
        };
        let (handle, thread) = start(
            || Ok(CpuBackend::new()),
            model,
            weights,
            options,
            Arc::clone(&metrics),
        )
        .unwrap();
        (handle, thread, metrics)
    }

    fn done(rx: &mut events::UnboundedReceiver<JobEvent>) -> Vec<Finished> {
        loop {
            match rx.blocking_recv() {
                Some(JobEvent::Done(done)) => return done,
                Some(JobEvent::Draft(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ready() {
            assert!(start.elapsed() < Duration::from_secs(60), "{what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    #[test]
    fn a_job_whose_client_left_is_dropped_before_it_runs() {
        let (handle, thread, metrics) = engine(4);
        let (gone, left) = job(1);
        drop(left);
        handle.submit(gone).unwrap();
        let (kept, mut rx) = job(2);
        handle.submit(kept).unwrap();
        assert_eq!(done(&mut rx).len(), 1);
        assert_eq!(metrics.cancelled.get(), 1);
        assert_eq!(metrics.started.get(), 1);
        assert_eq!(handle.waiting(), 0);
        drop(handle);
        thread.join().unwrap();
    }

    #[test]
    fn a_job_that_arrives_mid_generation_joins_and_gets_its_tokens_alone() {
        let (handle, thread, metrics) = engine(4);
        let (slow, mut slow_rx) = job_with(SLOW, 1);
        handle.submit(slow).unwrap();
        wait_until("the slow job never ran", || metrics.model_calls.get() > 0);
        let (quick, mut quick_rx) = job_with("4,L:0.5", 2);
        handle.submit(quick).unwrap();
        let quick_beside = done(&mut quick_rx);
        // The engine runs one call of every cohort a turn, and the quick job needs far fewer.
        assert!(
            slow_rx.try_recv().is_err(),
            "the quick job waited for the slow one to finish"
        );
        let slow_beside = done(&mut slow_rx);
        let calls = metrics.batch_sequences.get_sample_count() as f64;
        assert!(
            metrics.batch_sequences.get_sample_sum() > calls,
            "the two jobs never shared a model call"
        );
        for (plan, seed, beside) in [(SLOW, 1, slow_beside), ("4,L:0.5", 2, quick_beside)] {
            let (again, mut rx) = job_with(plan, seed);
            handle.submit(again).unwrap();
            assert_eq!(done(&mut rx), beside, "{plan}");
        }
        drop(handle);
        thread.join().unwrap();
    }

    #[test]
    fn a_running_job_whose_client_leaves_stops_at_its_next_call() {
        let (handle, thread, metrics) = engine(4);
        // Long enough (about 2,500 calls) that the client surely leaves mid-way.
        let slower = format!("1{},L:0.9", ",1:0.9".repeat(40));
        let (alone, mut rx) = job_with(&slower, 1);
        handle.submit(alone).unwrap();
        let full = u64::from(done(&mut rx)[0].nfe);
        let before = metrics.model_calls.get();
        let (slow, slow_rx) = job_with(&slower, 1);
        handle.submit(slow).unwrap();
        wait_until("the slow job never ran", || {
            metrics.model_calls.get() > before
        });
        drop(slow_rx);
        wait_until("the job kept running", || metrics.running.get() == 0);
        let (next, mut rx) = job(2);
        handle.submit(next).unwrap();
        done(&mut rx);
        assert_eq!(metrics.cancelled.get(), 1);
        let spent = metrics.model_calls.get() - before;
        assert!(
            spent < full,
            "the job that lost its client made {spent} calls of its {full}"
        );
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
