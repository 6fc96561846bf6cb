//! Sharing model calls between cohorts.
//!
//! - **Merged** (`Sharing::Merged`): calls over whole sequences from position 0 — a global
//!   refine call, post-hoc scoring — read no cached keys, so the sequences of every such call
//!   with the same shape, kind and nucleus run as one batch of one pass ([`run`]).
//! - **Joint** (`Sharing::Joint`, `Sharing::JointCommit`): draft-block calls, each over its own
//!   cohort's KV cache and at its own block, run as one pass whose linear layers take every
//!   call's rows and whose attention reads each cohort's cache
//!   (`DiffusionDenoiser::draw_together`, [`run_joint`]); block commits likewise store every
//!   cohort's finished block in one pass (`DiffusionDenoiser::commit_together`).
//!
//! Either way each cohort gets what its own call would give: a row of a linear layer does not
//! depend on the other rows (the batch-invariance property every backend is tested for), and
//! each cohort's attention is the call it would make alone.

use did_core::backend::Backend;
use did_core::denoiser::{Denoiser, HostDrawScratch, OutputPosition};
use did_core::model::{DiffusionDenoiser, JointRequest};
use did_core::sample::{Confidence, SampledToken};

use crate::cohort::{Call, Reply, Request, Sharing};

/// Whether calls `a` and `b`, shared the same way, can share one model call: the same kind and
/// nucleus, and for merged calls the same block and length, for joint ones the same block size
/// and block length.
fn compatible(a: &Call, b: &Call) -> bool {
    let same_shape = |x: &Request, y: &Request| match (a.sharing(), b.sharing()) {
        (Sharing::Merged(_), Sharing::Merged(_)) => {
            (x.seq_len, x.block_size, &x.block) == (y.seq_len, y.block_size, &y.block)
        }
        (Sharing::Joint(_), Sharing::Joint(_))
        | (Sharing::JointCommit(_), Sharing::JointCommit(_)) => {
            (x.block_size, x.block.len()) == (y.block_size, y.block.len())
        }
        _ => false,
    };
    match (a, b) {
        (Call::Logits(x), Call::Logits(y)) | (Call::Commit(x), Call::Commit(y)) => same_shape(x, y),
        (
            Call::Draw {
                request: x,
                mask_id: mx,
                nucleus: nx,
                ..
            },
            Call::Draw {
                request: y,
                mask_id: my,
                nucleus: ny,
                ..
            },
        ) => same_shape(x, y) && mx == my && nx == ny,
        _ => false,
    }
}

/// Groups `calls` (all merged, or all joint) into model calls: each group's calls are
/// compatible, and a group holds at most `max_outputs` outputs unless one call alone has more
/// (a call is never split). Returns indices into `calls`, in order.
pub(crate) fn groups(calls: &[&Call], max_outputs: usize) -> Vec<Vec<usize>> {
    let outputs = |c: &Call| match c.sharing() {
        Sharing::Merged(r) | Sharing::Joint(r) | Sharing::JointCommit(r) => r.outputs.len(),
        Sharing::Alone => 0,
    };
    let mut groups: Vec<(Vec<usize>, usize)> = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let n = outputs(call);
        let open = groups.iter_mut().find(|(members, total)| {
            compatible(calls[members[0]], call) && total + n <= max_outputs
        });
        match open {
            Some((members, total)) => {
                members.push(i);
                *total += n;
            }
            None => groups.push((vec![i], n)),
        }
    }
    groups.into_iter().map(|(members, _)| members).collect()
}

/// Runs compatible merged `calls` as one model call on `shared` and gives each its reply.
pub(crate) fn run<B: Backend>(
    shared: &mut DiffusionDenoiser<'_, B>,
    calls: &[&Call],
) -> Vec<Reply> {
    match run_merged(shared, calls) {
        Ok(replies) => replies,
        Err(e) => vec![Reply::Failed(e); calls.len()],
    }
}

fn run_merged<B: Backend>(
    shared: &mut DiffusionDenoiser<'_, B>,
    calls: &[&Call],
) -> Result<Vec<Reply>, String> {
    let requests: Vec<&Request> = calls
        .iter()
        .filter_map(|c| match c.sharing() {
            Sharing::Merged(r) => Some(r),
            _ => None,
        })
        .collect();
    let Some(first) = requests.first() else {
        return Ok(Vec::new());
    };
    if requests.len() != calls.len() {
        return Err("only calls over whole sequences merge".into());
    }
    let batch: usize = requests.iter().map(|r| r.batch).sum();
    let mut tokens = Vec::with_capacity(batch * first.seq_len);
    let mut outputs = Vec::new();
    let mut seq = 0u32;
    for r in &requests {
        tokens.extend_from_slice(&r.tokens);
        outputs.extend(r.outputs.iter().map(|o| OutputPosition {
            seq: o.seq + seq,
            pos: o.pos,
        }));
        seq += r.batch as u32;
    }
    let merged = Request {
        tokens,
        batch,
        seq_len: first.seq_len,
        block_size: first.block_size,
        block: first.block.clone(),
        outputs,
    };
    let fail = |e: did_core::model::ModelError<B::Error>| e.to_string();
    shared
        .begin_stage(batch, merged.seq_len, merged.block_size)
        .map_err(fail)?;
    let counts = requests.iter().map(|r| r.outputs.len());
    match calls[0] {
        Call::Logits(_) => {
            let vocab = shared.vocab_size();
            let mut logits = vec![0.0; merged.outputs.len() * vocab];
            shared.logits(&merged.view(), &mut logits).map_err(fail)?;
            Ok(split(&logits, counts.map(|n| n * vocab), Reply::Logits))
        }
        Call::Draw {
            mask_id, nucleus, ..
        } => {
            let draws = all_draws(calls);
            let mut drawn = vec![unset(*mask_id); merged.outputs.len()];
            shared
                .draw(
                    &merged.view(),
                    *mask_id,
                    nucleus,
                    &draws,
                    &mut HostDrawScratch::default(),
                    &mut drawn,
                )
                .map_err(fail)?;
            Ok(split(&drawn, counts, Reply::Tokens))
        }
        _ => Err("only logits and draws merge".into()),
    }
}

/// Runs compatible joint `members` (each a cohort's denoiser and its call) as one model call
/// run by `shared`, each over its own cohort's KV cache, and gives each its reply.
pub(crate) fn run_joint<'a, B: Backend>(
    shared: &mut DiffusionDenoiser<'a, B>,
    members: Vec<(&mut DiffusionDenoiser<'a, B>, &Call)>,
) -> Vec<Reply> {
    let n = members.len();
    run_joint_calls(shared, members).unwrap_or_else(|e| vec![Reply::Failed(e); n])
}

fn run_joint_calls<'a, B: Backend>(
    shared: &mut DiffusionDenoiser<'a, B>,
    members: Vec<(&mut DiffusionDenoiser<'a, B>, &Call)>,
) -> Result<Vec<Reply>, String> {
    let calls: Vec<&Call> = members.iter().map(|(_, c)| *c).collect();
    let Some(&first) = calls.first() else {
        return Ok(Vec::new());
    };
    let mut joint = Vec::with_capacity(members.len());
    for (denoiser, call) in members {
        let (Sharing::Joint(r) | Sharing::JointCommit(r)) = call.sharing() else {
            return Err("only draft-block calls and commits run jointly".into());
        };
        joint.push(JointRequest {
            denoiser,
            request: r.view(),
        });
    }
    let counts: Vec<usize> = joint.iter().map(|j| j.request.outputs.len()).collect();
    let total: usize = counts.iter().sum();
    let fail = |e: did_core::model::ModelError<B::Error>| e.to_string();
    match first {
        Call::Logits(_) => {
            let vocab = shared.vocab_size();
            let mut logits = vec![0.0; total * vocab];
            shared
                .logits_together(&mut joint, &mut logits)
                .map_err(fail)?;
            Ok(split(
                &logits,
                counts.into_iter().map(|n| n * vocab),
                Reply::Logits,
            ))
        }
        Call::Draw {
            mask_id, nucleus, ..
        } => {
            let draws = all_draws(&calls);
            let mut drawn = vec![unset(*mask_id); total];
            shared
                .draw_together(&mut joint, *mask_id, nucleus, &draws, &mut drawn)
                .map_err(fail)?;
            Ok(split(&drawn, counts.into_iter(), Reply::Tokens))
        }
        Call::Commit(_) => {
            shared.commit_together(&mut joint).map_err(fail)?;
            Ok(vec![Reply::Ready; counts.len()])
        }
        _ => Err("only logits, draws and commits run jointly".into()),
    }
}

/// Every call's draw streams, in order.
fn all_draws(calls: &[&Call]) -> Vec<did_core::sample::DrawSpec> {
    calls
        .iter()
        .flat_map(|c| match c {
            Call::Draw { draws, .. } => draws.as_slice(),
            _ => &[],
        })
        .copied()
        .collect()
}

/// A token slot before its draw.
pub(crate) fn unset(mask_id: u32) -> SampledToken {
    SampledToken {
        id: mask_id,
        confidence: Confidence::PINNED,
    }
}

/// `items` cut into consecutive pieces of `lengths`, each wrapped by `reply`.
fn split<T: Clone>(
    items: &[T],
    lengths: impl Iterator<Item = usize>,
    reply: fn(Vec<T>) -> Reply,
) -> Vec<Reply> {
    let mut at = 0;
    lengths
        .map(|n| {
            let piece = items[at..at + n].to_vec();
            at += n;
            reply(piece)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use did_core::sample::{Nucleus, NucleusRule};

    fn request(start: usize, outputs: usize) -> Request {
        Request {
            tokens: vec![0; 8],
            batch: 1,
            seq_len: 8,
            block_size: 4,
            block: start..start + 4,
            outputs: (0..outputs)
                .map(|i| OutputPosition {
                    seq: 0,
                    pos: (start + i) as u32,
                })
                .collect(),
        }
    }

    fn draw(start: usize, outputs: usize, top_p: f64) -> Call {
        Call::Draw {
            request: request(start, outputs),
            mask_id: 7,
            nucleus: Nucleus::new(top_p, NucleusRule::Bd3).unwrap(),
            draws: Vec::new(),
        }
    }

    #[test]
    fn whole_sequences_merge_cached_blocks_and_commits_run_jointly_stage_starts_alone() {
        let whole = Call::Draw {
            request: Request {
                block: 0..8,
                block_size: 8,
                ..request(0, 2)
            },
            mask_id: 7,
            nucleus: Nucleus::new(0.9, NucleusRule::Bd3).unwrap(),
            draws: Vec::new(),
        };
        assert!(matches!(whole.sharing(), Sharing::Merged(_)));
        assert!(matches!(draw(0, 2, 0.9).sharing(), Sharing::Joint(_)));
        assert!(matches!(draw(4, 2, 0.9).sharing(), Sharing::Joint(_)));
        assert!(matches!(
            Call::Commit(request(4, 0)).sharing(),
            Sharing::JointCommit(_)
        ));
        let start = Call::BeginStage {
            batch: 1,
            seq_len: 8,
            block_size: 4,
        };
        assert_eq!(start.sharing(), Sharing::Alone);
    }

    #[test]
    fn groups_keep_kinds_nuclei_and_the_output_cap_apart() {
        let calls = [
            draw(0, 3, 0.9),
            Call::Logits(request(0, 3)),
            draw(0, 3, 0.9),
            draw(0, 3, 0.5),
            draw(0, 3, 0.9),
            Call::Logits(request(0, 3)),
        ];
        let refs: Vec<&Call> = calls.iter().collect();
        assert_eq!(
            groups(&refs, 6),
            vec![vec![0, 2], vec![1, 5], vec![3], vec![4]]
        );
        // Joint calls at different blocks share a call; merged ones need the same block.
        let apart = [draw(0, 1, 0.9), draw(4, 1, 0.9)];
        assert_eq!(
            groups(&apart.iter().collect::<Vec<_>>(), 8),
            vec![vec![0, 1]]
        );
        // A call larger than the cap still runs, alone.
        assert_eq!(groups(&refs[..1], 2), vec![vec![0]]);
    }
}
