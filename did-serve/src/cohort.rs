//! A cohort: the requests admitted together, generated on a thread of their own by the
//! unchanged driver (`did_core::refine::generate_observed`) through a [`RemoteDenoiser`] whose
//! every call goes to the engine thread and waits for its answer. The engine owns the backend,
//! waits until every running cohort has asked for its next call, runs them (sharing model calls
//! where it can, `crate::merge`) and answers each. So requests join and leave the
//! running set between model calls, and a cohort's calls are those it would make alone.

use std::ops::Range;
use std::sync::mpsc;
use std::sync::Arc;

use did_core::denoiser::{DenoiseRequest, Denoiser, HostDrawScratch, OutputPosition};
use did_core::refine::{generate_observed, Generation, Progress};
use did_core::sample::{DrawSpec, Nucleus, SampledToken};

use crate::engine::{Finished, Job, JobEvent};
use crate::metrics::Metrics;

/// Which cohort a message is from.
pub(crate) type CohortId = u64;

/// A [`DenoiseRequest`] that owns its tokens and outputs, to travel to the engine thread.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Request {
    pub tokens: Vec<u32>,
    pub batch: usize,
    pub seq_len: usize,
    pub block_size: usize,
    pub block: Range<usize>,
    pub outputs: Vec<OutputPosition>,
}

impl Request {
    fn of(r: &DenoiseRequest<'_>) -> Self {
        Request {
            tokens: r.tokens.to_vec(),
            batch: r.batch,
            seq_len: r.seq_len,
            block_size: r.block_size,
            block: r.block.clone(),
            outputs: r.outputs.to_vec(),
        }
    }

    pub fn view(&self) -> DenoiseRequest<'_> {
        DenoiseRequest {
            tokens: &self.tokens,
            batch: self.batch,
            seq_len: self.seq_len,
            block_size: self.block_size,
            block: self.block.clone(),
            outputs: &self.outputs,
        }
    }
}

/// One [`Denoiser`] method, asked of the engine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Call {
    BeginStage {
        batch: usize,
        seq_len: usize,
        block_size: usize,
    },
    Logits(Request),
    Draw {
        request: Request,
        mask_id: u32,
        nucleus: Nucleus,
        draws: Vec<DrawSpec>,
    },
    Commit(Request),
}

/// How a call can share a model call with other cohorts' calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Sharing<'c> {
    /// Outputs over whole sequences from position 0 (a global refine call, post-hoc scoring):
    /// no cached keys, so the calls run as one batch over one pass (`merge::run`).
    Merged(&'c Request),
    /// Outputs in one block of a cached stage (a draft block): the calls run as one pass in
    /// which each reads its own cohort's KV cache (`merge::run_joint`).
    Joint(&'c Request),
    /// A block commit of a cached stage: the calls store their blocks in one pass, each in its
    /// own cohort's KV cache (`merge::run_joint`).
    JointCommit(&'c Request),
    /// A stage start (or a call of another shape): on the cohort's own denoiser.
    Alone,
}

impl Call {
    pub fn sharing(&self) -> Sharing<'_> {
        match self {
            Call::Logits(r) | Call::Draw { request: r, .. } => {
                if r.block == (0..r.seq_len) {
                    Sharing::Merged(r)
                } else if r.block.len() <= r.block_size && r.block.start % r.block_size == 0 {
                    Sharing::Joint(r)
                } else {
                    Sharing::Alone
                }
            }
            Call::Commit(r)
                if r.block.len() <= r.block_size && r.block.start % r.block_size == 0 =>
            {
                Sharing::JointCommit(r)
            }
            _ => Sharing::Alone,
        }
    }
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    Ready,
    Logits(Vec<f32>),
    Tokens(Vec<SampledToken>),
    Failed(String),
}

/// What a cohort thread tells the engine.
#[derive(Debug)]
pub(crate) enum Message {
    Call(CohortId, Call),
    /// The cohort's generation returned (or its thread died): it asks for nothing more.
    Ended(CohortId),
}

/// The model as a cohort thread sees it: each method is a message to the engine thread.
pub(crate) struct RemoteDenoiser {
    id: CohortId,
    vocab: usize,
    mask_id: u32,
    calls: mpsc::Sender<Message>,
    replies: mpsc::Receiver<Reply>,
}

impl RemoteDenoiser {
    fn ask(&self, call: Call) -> Result<Reply, String> {
        self.calls
            .send(Message::Call(self.id, call))
            .map_err(|_| "the engine stopped".to_string())?;
        match self.replies.recv() {
            Ok(Reply::Failed(e)) => Err(e),
            Ok(reply) => Ok(reply),
            Err(_) => Err("the engine stopped".into()),
        }
    }
}

fn unexpected(reply: &Reply) -> String {
    format!("the engine answered {reply:?} to the wrong call")
}

impl Denoiser for RemoteDenoiser {
    type Error = String;

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn mask_id(&self) -> u32 {
        self.mask_id
    }

    fn begin_stage(
        &mut self,
        batch: usize,
        seq_len: usize,
        block_size: usize,
    ) -> Result<(), String> {
        self.ask(Call::BeginStage {
            batch,
            seq_len,
            block_size,
        })
        .map(drop)
    }

    fn logits(&mut self, request: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), String> {
        match self.ask(Call::Logits(Request::of(request)))? {
            Reply::Logits(rows) if rows.len() <= out.len() => {
                out[..rows.len()].copy_from_slice(&rows);
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    fn commit_block(&mut self, request: &DenoiseRequest<'_>) -> Result<(), String> {
        self.ask(Call::Commit(Request::of(request))).map(drop)
    }

    fn draw(
        &mut self,
        request: &DenoiseRequest<'_>,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        _scratch: &mut HostDrawScratch,
        out: &mut [SampledToken],
    ) -> Result<(), String> {
        let call = Call::Draw {
            request: Request::of(request),
            mask_id,
            nucleus: *nucleus,
            draws: draws.to_vec(),
        };
        match self.ask(call)? {
            Reply::Tokens(tokens) if tokens.len() <= out.len() => {
                out[..tokens.len()].copy_from_slice(&tokens);
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }
}

/// Tells the engine the cohort ended when its thread finishes, however it finishes.
struct EndedOnDrop(CohortId, mpsc::Sender<Message>);

impl Drop for EndedOnDrop {
    fn drop(&mut self) {
        let _ = self.1.send(Message::Ended(self.0));
    }
}

/// Starts cohort `id`'s thread: it generates `jobs` (which share their settings) with a model
/// of `vocab` ids and mask `mask_id`, streams drafts, answers each job, and ends. Returns the
/// sender of the engine's replies, or the jobs back when no thread could start.
pub(crate) fn spawn(
    id: CohortId,
    jobs: Vec<Job>,
    (vocab, mask_id): (usize, u32),
    calls: mpsc::Sender<Message>,
    metrics: Arc<Metrics>,
) -> Result<mpsc::Sender<Reply>, String> {
    let (replies_tx, replies) = mpsc::channel();
    let remote = RemoteDenoiser {
        id,
        vocab,
        mask_id,
        calls: calls.clone(),
        replies,
    };
    std::thread::Builder::new()
        .name(format!("did-cohort-{id}"))
        .spawn(move || {
            let _ended = EndedOnDrop(id, calls);
            generate_and_answer(remote, &jobs, &metrics);
        })
        .map_err(|e| format!("cannot start a generation thread: {e}"))?;
    Ok(replies_tx)
}

fn generate_and_answer(mut remote: RemoteDenoiser, jobs: &[Job], metrics: &Metrics) {
    let prompts: Vec<&[u32]> = jobs
        .iter()
        .flat_map(|j| j.prompts.iter().map(Vec::as_slice))
        .collect();
    let ids: Vec<_> = jobs.iter().flat_map(|j| j.ids.iter().copied()).collect();
    let config = &jobs[0].config;
    let result = generate_observed(&mut remote, config, &prompts, &ids, |p| {
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
    });
    match result {
        Ok(g) => {
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
                metrics.generated_tokens.inc_by(drawn as u64);
                let _ = job.events.send(JobEvent::Done(done));
            }
        }
        Err(e) => {
            for job in jobs {
                let _ = job.events.send(JobEvent::Failed(e.to_string()));
            }
        }
    }
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
