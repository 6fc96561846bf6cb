//! Merging cohorts' calls into shared model calls.
//!
//! A call whose block starts at position 0 reads no cached keys (`Call::mergeable`), so the
//! calls of several cohorts with the same block, block size and kind run as one batch: their
//! sequences' rows go through one pass, and each cohort gets back its own rows. A sequence's
//! rows do not depend on the other rows of a pass (the batch-invariance property every backend
//! is tested for), and the merged pass takes the path a cohort's own denoiser would take for
//! that call (a first block, or a whole sequence, over an empty cache), so every cohort gets
//! what it would get alone.

use did_core::backend::Backend;
use did_core::denoiser::{Denoiser, HostDrawScratch, OutputPosition};
use did_core::model::DiffusionDenoiser;
use did_core::sample::{Confidence, SampledToken};

use crate::cohort::{Call, Reply, Request};

/// Whether calls `a` and `b` (both mergeable) can share one model call.
fn compatible(a: &Call, b: &Call) -> bool {
    let same_shape = |x: &Request, y: &Request| {
        (x.seq_len, x.block_size, &x.block) == (y.seq_len, y.block_size, &y.block)
    };
    match (a, b) {
        (Call::Logits(x), Call::Logits(y)) => same_shape(x, y),
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

/// Groups the mergeable `calls` into model calls: each group's calls are compatible, and a
/// group holds at most `max_outputs` outputs unless one call alone has more (a call is never
/// split). Returns indices into `calls`, in order.
pub(crate) fn groups(calls: &[&Call], max_outputs: usize) -> Vec<Vec<usize>> {
    let outputs = |c: &Call| c.mergeable().map_or(0, |r| r.outputs.len());
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

/// Runs compatible mergeable `calls` as one model call on `shared` and gives each its reply.
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
    let requests: Vec<&Request> = calls.iter().filter_map(|c| c.mergeable()).collect();
    let Some(first) = requests.first() else {
        return Ok(Vec::new());
    };
    if requests.len() != calls.len() {
        return Err("a call that reads the KV cache cannot be merged".into());
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
            let draws: Vec<_> = calls
                .iter()
                .flat_map(|c| match c {
                    Call::Draw { draws, .. } => draws.as_slice(),
                    _ => &[],
                })
                .copied()
                .collect();
            let mut drawn = vec![
                SampledToken {
                    id: *mask_id,
                    confidence: Confidence::PINNED,
                };
                merged.outputs.len()
            ];
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
    fn only_calls_from_position_zero_merge() {
        assert!(draw(0, 2, 0.9).mergeable().is_some());
        assert!(draw(4, 2, 0.9).mergeable().is_none());
        assert!(Call::Commit(request(0, 0)).mergeable().is_none());
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
        // A call larger than the cap still runs, alone.
        assert_eq!(groups(&refs[..1], 2), vec![vec![0]]);
    }
}
