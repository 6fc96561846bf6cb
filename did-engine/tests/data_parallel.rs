//! Data-parallel training on threads (`InProcess`, each rank with its own CPU backend) against
//! the single-rank trainer, for the BD3 and the mix-scale objectives, with dropout on, at W = 2
//! and 3. A world of W ranks running batch b is defined as one rank accumulating W micro-batches
//! of b, a global batch of W·b (did-core's `collective` module): the same windows, times, masks
//! and dropout, gradients scaled by 1/W and summed.
//!
//! What is bit-identical: every rank's weights to every other rank's, and the first step's loss
//! to the single rank's (the same batches through the same weights: the addressing is exact).
//! What is not: a single rank adds each micro-batch's gradients inside the backward's GEMMs
//! (C ← C + AᵀB) while ranks sum finished gradients, so the f32 roundings differ by an ulp or so
//! from the second update on. Adam turns a relative gradient error ε into a step error of at most
//! about lr·ε·|m|/√v, largest where a gradient is near zero, so the tolerances are a loss within
//! 1e-7 (relative) and weights within 1e-3·lr per step taken (1.2e-5 here); measured: 9e-9 and
//! 3.4e-6.

use std::ops::Range;
use std::time::Duration;

use did_backend_cpu::{CpuBackend, CpuBuffer};
use did_core::collective::{Collective, CollectiveError, DataParallel};
use did_core::model::{
    diffusion_batch, Architecture, BlockSizeDistribution, ModelConfig, Trainer, TrainerConfig,
    Transformer,
};
use did_core::rng::{Purpose, RngStream};
use did_core::schedule::TrainingSchedule;
use did_engine::collective::InProcess;

const L: usize = 32;
const MASK: u32 = 17;
const BATCH: usize = 2;
const STEPS: u32 = 4;
const SEED: u64 = 7;
const LR: f32 = 3e-3;

fn config() -> ModelConfig {
    ModelConfig {
        vocab_size: 18,
        mask_id: MASK,
        context: L,
        layers: 2,
        hidden: 64,
        heads: 2,
        mlp_hidden: 128,
        dropout: 0.1,
        ..ModelConfig::preset("tiny", Architecture::Dit).unwrap()
    }
}

/// What a step trains: BD3 at block 4, or mix-scale with a block size drawn per step.
#[derive(Clone, Copy)]
enum Objective {
    Bd3,
    MixScale,
}

/// The batch of global micro-batch `micro` of optimizer `step`: random tokens addressed by
/// (micro, sequence), as the engine's windows are.
fn micro_batch(objective: Objective, step: u32, micro: u32) -> did_core::model::TrainBatch {
    let stream = RngStream::new(SEED, Purpose::DataOrder, 0, micro);
    let x: Vec<u32> = (0..BATCH * L)
        .map(|i| stream.u32((i / L) as u32, (i % L) as u32) % 17)
        .collect();
    let block = match objective {
        Objective::Bd3 => 4,
        Objective::MixScale => "4:0.5,L:0.5"
            .parse::<BlockSizeDistribution>()
            .unwrap()
            .resolve(L)
            .unwrap()
            .sample(SEED, step),
    };
    diffusion_batch(
        &x,
        BATCH,
        L,
        block,
        &TrainingSchedule::default(),
        MASK,
        SEED,
        micro,
    )
    .unwrap()
}

fn trainer(be: &CpuBackend, model: &Transformer, init_seed: u64) -> Trainer<CpuBackend> {
    let config = TrainerConfig {
        lr: LR,
        warmup_steps: 2,
        ema_decay: Some(0.9),
        ..TrainerConfig::default()
    };
    Trainer::new(
        be,
        model,
        config,
        &model.table().initial_values(init_seed),
        SEED,
    )
    .unwrap()
}

/// Losses (bits) of every step and the final weights and EMA.
type Run = (Vec<u64>, Vec<f32>, Vec<f32>);

fn finish(be: &CpuBackend, t: &Trainer<CpuBackend>, losses: Vec<u64>) -> Run {
    let state = t.state(be).unwrap();
    (losses, state.params, state.ema.unwrap())
}

/// One rank accumulating `world` micro-batches a step.
fn single(objective: Objective, world: usize) -> Run {
    let be = CpuBackend::new();
    let model = Transformer::new(config()).unwrap();
    let mut t = trainer(&be, &model, 1);
    let losses = (0..STEPS)
        .map(|step| {
            let micro: Vec<_> = (0..world)
                .map(|i| {
                    micro_batch(
                        objective,
                        step,
                        DataParallel::SINGLE.micro_step(step, world, i),
                    )
                })
                .collect();
            t.step(&be, &model, &micro).unwrap().loss.to_bits()
        })
        .collect();
    finish(&be, &t, losses)
}

/// `world` ranks on threads, one micro-batch each a step; every rank's run. Each rank starts
/// from its own initial values and takes rank 0's by broadcast.
fn data_parallel(objective: Objective, world: usize) -> Vec<Run> {
    data_parallel_over(objective, world, |comm| comm)
}

/// [`data_parallel`] over `wrap`'s collective.
fn data_parallel_over<C: Collective<CpuBackend> + Send>(
    objective: Objective,
    world: usize,
    wrap: fn(InProcess) -> C,
) -> Vec<Run> {
    std::thread::scope(|s| {
        let handles: Vec<_> = InProcess::world(world, Duration::from_secs(60))
            .into_iter()
            .map(|comm| {
                let mut comm = wrap(comm);
                s.spawn(move || {
                    let be = CpuBackend::new();
                    let model = Transformer::new(config()).unwrap();
                    let place = Collective::<CpuBackend>::place(&comm);
                    let mut t = trainer(&be, &model, 1 + place.rank as u64);
                    t.broadcast_from(&be, &mut comm, 0).unwrap();
                    let losses = (0..STEPS)
                        .map(|step| {
                            let b = micro_batch(objective, step, place.micro_step(step, 1, 0));
                            t.step_with(&be, &model, &[b], &mut comm)
                                .unwrap()
                                .loss
                                .to_bits()
                        })
                        .collect();
                    t.check_replicas(&be, &mut comm).unwrap();
                    finish(&be, &t, losses)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The largest relative difference of the losses and the largest absolute difference of the
/// weights and of the EMA weights.
fn distance(a: &Run, b: &Run) -> (f64, f32, f32) {
    let loss =
        a.0.iter()
            .zip(&b.0)
            .map(|(x, y)| {
                let (x, y) = (f64::from_bits(*x), f64::from_bits(*y));
                (x - y).abs() / y.abs()
            })
            .fold(0.0, f64::max);
    let far = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max)
    };
    (loss, far(&a.1, &b.1), far(&a.2, &b.2))
}

#[test]
fn ranks_follow_the_single_rank_trajectory_and_agree_bit_for_bit() {
    for objective in [Objective::Bd3, Objective::MixScale] {
        for world in [2, 3] {
            let name = match objective {
                Objective::Bd3 => "bd3",
                Objective::MixScale => "mix-scale",
            };
            let what = format!("{name}, world {world}");
            let reference = single(objective, world);
            let runs = data_parallel(objective, world);
            for run in &runs[1..] {
                assert_eq!(
                    distance(run, &runs[0]),
                    (0.0, 0.0, 0.0),
                    "{what}: ranks differ"
                );
                assert_eq!(
                    run.1.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                    runs[0].1.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                    "{what}: ranks differ"
                );
            }
            assert_eq!(
                runs[0].0[0], reference.0[0],
                "{what}: the first step's batches differ"
            );
            let (loss, weights, ema) = distance(&runs[0], &reference);
            let weight_tolerance = 1e-3 * LR * STEPS as f32;
            assert!(loss < 1e-7, "{what}: losses differ by {loss:e} (relative)");
            assert!(weights < weight_tolerance && ema < weight_tolerance,
                "{what}: weights differ by {weights:e}, EMA by {ema:e} (tolerance {weight_tolerance:e})");
        }
    }
}

/// The collective that sums the whole gradient buffer once a step, after the backward, as the
/// trainer did before it summed bucket by bucket.
struct OneSum {
    inner: InProcess,
    end: usize,
}

impl Collective<CpuBackend> for OneSum {
    fn place(&self) -> DataParallel {
        Collective::<CpuBackend>::place(&self.inner)
    }
    fn all_reduce_sum(
        &mut self,
        be: &CpuBackend,
        buf: &mut CpuBuffer<f32>,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.inner.all_reduce_sum(be, buf, range)
    }
    fn start_sum(
        &mut self,
        _: &CpuBackend,
        _: &mut CpuBuffer<f32>,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.end = self.end.max(range.end);
        Ok(())
    }
    fn finish_sums(
        &mut self,
        be: &CpuBackend,
        buf: &mut CpuBuffer<f32>,
    ) -> Result<(), CollectiveError> {
        assert_eq!(self.end, buf.len(), "the buckets reach the last parameter");
        self.end = 0;
        self.inner.all_reduce_sum(be, buf, 0..buf.len())
    }
    fn all_reduce_host(&mut self, values: &mut [f64]) -> Result<(), CollectiveError> {
        Collective::<CpuBackend>::all_reduce_host(&mut self.inner, values)
    }
    fn broadcast(
        &mut self,
        be: &CpuBackend,
        buf: &mut CpuBuffer<f32>,
        len: usize,
        root: usize,
    ) -> Result<(), CollectiveError> {
        self.inner.broadcast(be, buf, len, root)
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Collective::<CpuBackend>::barrier(&mut self.inner)
    }
}

/// Summing bucket by bucket during the backward is, bit for bit, summing the finished buffer:
/// the buckets cover every gradient, and each is final when its sum starts.
#[test]
fn bucketed_sums_equal_one_sum_of_the_finished_gradients() {
    for objective in [Objective::Bd3, Objective::MixScale] {
        let bucketed = data_parallel(objective, 2);
        let whole = data_parallel_over(objective, 2, |inner| OneSum { inner, end: 0 });
        assert_eq!(distance(&bucketed[0], &whole[0]), (0.0, 0.0, 0.0));
        let bits = |r: &Run| r.1.iter().map(|w| w.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&bucketed[0]), bits(&whole[0]));
    }
}

#[test]
fn ranks_that_hold_different_weights_are_named() {
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = InProcess::world(3, Duration::from_secs(60))
            .into_iter()
            .map(|mut comm| {
                s.spawn(move || {
                    let be = CpuBackend::new();
                    let model = Transformer::new(config()).unwrap();
                    let rank = Collective::<CpuBackend>::place(&comm).rank;
                    // Ranks 0 and 1 start alike, rank 2 from other values, and nobody broadcasts.
                    let t = trainer(&be, &model, if rank == 2 { 9 } else { 1 });
                    t.check_replicas(&be, &mut comm).unwrap_err().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errors {
        assert!(
            e.contains("rank(s) [2] differ from rank 0") && e.contains("--resume"),
            "{e}"
        );
    }
}

#[test]
fn a_rank_that_never_arrives_is_named_within_the_timeout() {
    let started = std::time::Instant::now();
    let mut ranks = InProcess::world(3, Duration::from_millis(300));
    drop(ranks.pop()); // rank 2 dies before its first collective
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut comm| {
                s.spawn(move || {
                    let mut v = [1.0];
                    Collective::<CpuBackend>::all_reduce_host(&mut comm, &mut v)
                        .unwrap_err()
                        .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    for e in errors {
        assert!(
            e.contains("rank(s) [2] did not reach the host all-reduce"),
            "{e}"
        );
    }
}
