//! The optimiser around the model: AdamW with linear warm-up, gradient-norm
//! clipping, EMA weights with BD3-LM's warm-up, and gradient accumulation.

use alloc::vec::Vec;

use crate::backend::{AdamW, Backend, OptimizerStep, Slice, SliceMut, UpdatedWeights};
use crate::collective::{checksum, Collective, SingleProcess};
use crate::error::invalid;
use crate::model::network::activations::Activations;
use crate::model::network::transformer::{DropoutStreams, Transformer};
use crate::model::training::batch::TrainBatch;
use crate::model::ModelError;

/// Batch shapes whose activations are kept between steps.
const MAX_CACHED_SHAPES: usize = 2;

/// Optimiser settings; the defaults are BD3-LM's (docs/bd3lm.md §6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    /// Peak learning rate (3e-4).
    pub lr: f32,
    /// Linear warm-up from 0 over this many optimizer steps (2,500), then constant.
    pub warmup_steps: u32,
    /// AdamW β₁ (0.9).
    pub beta1: f32,
    /// AdamW β₂ (0.999).
    pub beta2: f32,
    /// AdamW ε (1e-8).
    pub eps: f32,
    /// Decoupled weight decay (0).
    pub weight_decay: f32,
    /// Gradient-norm clip (1.0); `None` disables it.
    pub grad_clip: Option<f32>,
    /// EMA decay (0.9999), with warm-up `min(decay, (1 + n)/(10 + n))`; `None` disables the EMA.
    pub ema_decay: Option<f32>,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            lr: 3e-4,
            warmup_steps: 2500,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: Some(1.0),
            ema_decay: Some(0.9999),
        }
    }
}

impl TrainerConfig {
    /// The learning rate of optimizer step `step` (0-based).
    ///
    /// ```
    /// let c = did_core::model::TrainerConfig { warmup_steps: 10, ..Default::default() };
    /// assert!((c.lr_at(0) - 3e-5).abs() < 1e-10);
    /// assert_eq!(c.lr_at(50), 3e-4);
    /// ```
    pub fn lr_at(&self, step: u32) -> f32 {
        if self.warmup_steps == 0 {
            self.lr
        } else {
            self.lr * ((step + 1).min(self.warmup_steps) as f32 / self.warmup_steps as f32)
        }
    }

    /// The EMA decay after `updates` previous updates.
    ///
    /// ```
    /// let c = did_core::model::TrainerConfig::default();
    /// assert_eq!(c.ema_decay_at(0), Some(0.1)); // (1 + 0)/(10 + 0): early weights are not frozen in
    /// assert_eq!(c.ema_decay_at(1_000_000), Some(0.9999));
    /// ```
    pub fn ema_decay_at(&self, updates: u32) -> Option<f32> {
        let n = updates as f32;
        self.ema_decay.map(|d| d.min((1.0 + n) / (10.0 + n)))
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The optimizer step just taken (1-based).
    pub step: u32,
    /// The loss, averaged over the micro-batches.
    pub loss: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f32,
    /// Tokens predicted (masked or AR targets).
    pub predicted: usize,
}

/// Weights the optimizer updates: the f32 master and, where the backend stores below f32, the
/// copy rounded to the storage that the model reads ([`UpdatedWeights`]).
struct Weights<B: Backend> {
    master: B::Buffer,
    rounded: Option<B::Buffer>,
}

impl<B: Backend> Weights<B> {
    fn upload(be: &B, host: &[f32]) -> Result<Self, B::Error> {
        let master = be.upload_f32(host)?;
        let rounded = if be.stores_below_f32() {
            let mut r = be.zeros(host.len())?;
            be.round_into(Slice::whole(&master), SliceMut::whole(&mut r), host.len())?;
            Some(r)
        } else {
            None
        };
        Ok(Weights { master, rounded })
    }

    /// What the model reads.
    fn for_model(&self) -> &B::Buffer {
        self.rounded.as_ref().unwrap_or(&self.master)
    }

    /// Replaces the master with rank `root`'s, and the copy the model reads with its rounding.
    fn broadcast<C: Collective<B>>(
        &mut self,
        be: &B,
        comm: &mut C,
        len: usize,
        root: usize,
    ) -> Result<(), ModelError<B::Error>> {
        comm.broadcast(be, &mut self.master, len, root)
            .map_err(ModelError::Collective)?;
        if let Some(r) = self.rounded.as_mut() {
            be.round_into(Slice::whole(&self.master), SliceMut::whole(r), len)
                .map_err(ModelError::Backend)?;
        }
        Ok(())
    }

    fn updated(&mut self) -> UpdatedWeights<'_, B::Buffer> {
        UpdatedWeights {
            master: SliceMut::whole(&mut self.master),
            rounded: self.rounded.as_mut().map(SliceMut::whole),
        }
    }
}

/// What a checkpoint keeps of a [`Trainer`], in f32: the master weights, the EMA and the AdamW
/// moments (never their copies rounded to a lower storage precision), and the steps taken.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingState {
    /// The weights being trained.
    pub params: Vec<f32>,
    /// The EMA weights, when kept.
    pub ema: Option<Vec<f32>>,
    /// AdamW's first and second moments; `None` starts them at zero.
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
    /// Optimizer steps taken.
    pub step: u32,
}

/// Parameters, gradients, AdamW moments and EMA weights, each one flat buffer. Weights,
/// moments and the EMA are kept in f32 whatever the backend's storage; where that is below f32
/// (bf16) the model reads copies rounded from them after every step
/// ([`MemoryOps::stores_below_f32`](crate::backend::MemoryOps::stores_below_f32)).
///
/// A runnable training step is the example at the top of the `did-backend-cpu` crate.
pub struct Trainer<B: Backend> {
    /// Settings.
    pub config: TrainerConfig,
    /// The weights being trained.
    params: Weights<B>,
    /// Gradients (zeroed at every step), in the storage precision.
    pub grads: B::Buffer,
    /// First and second moments, in f32.
    m: B::Buffer,
    v: B::Buffer,
    /// EMA weights (used for sampling and evaluation).
    ema: Option<Weights<B>>,
    /// Optimizer steps taken.
    pub step: u32,
    /// The seed of every random stream of training.
    pub seed: u64,
    len: usize,
    /// Activations per batch shape (a mix-scale run alternates between two).
    acts: Vec<Activations<B>>,
}

impl<B: Backend> Trainer<B> {
    /// A trainer starting from `initial` (one value per parameter of `model`).
    pub fn new(
        be: &B,
        model: &Transformer,
        config: TrainerConfig,
        initial: &[f32],
        seed: u64,
    ) -> Result<Self, ModelError<B::Error>> {
        Self::start(be, model, config, initial, None, None, 0, seed)
    }

    /// A trainer continuing from `state` (a checkpoint's): its weights, EMA (the weights when it
    /// has none and `config` keeps one), moments (zeros when it has none) and step count.
    pub fn resume(
        be: &B,
        model: &Transformer,
        config: TrainerConfig,
        state: &TrainingState,
        seed: u64,
    ) -> Result<Self, ModelError<B::Error>> {
        let moments = state.moments.as_ref().map(|(m, v)| (&m[..], &v[..]));
        Self::start(
            be,
            model,
            config,
            &state.params,
            state.ema.as_deref(),
            moments,
            state.step,
            seed,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        be: &B,
        model: &Transformer,
        config: TrainerConfig,
        params: &[f32],
        ema: Option<&[f32]>,
        moments: Option<(&[f32], &[f32])>,
        step: u32,
        seed: u64,
    ) -> Result<Self, ModelError<B::Error>> {
        let len = model.table().total();
        let check = |what: &str, values: &[f32]| {
            if values.len() == len {
                Ok(())
            } else {
                Err(invalid(
                    "parameters",
                    alloc::format!(
                        "{} {what} given for a model of {len} parameters",
                        values.len()
                    ),
                ))
            }
        };
        check("values", params)?;
        if let Some(ema) = ema {
            check("EMA values", ema)?;
        }
        if let Some((m, v)) = moments {
            check("first moments", m)?;
            check("second moments", v)?;
        }
        let e = ModelError::Backend;
        let moment = |values: Option<&[f32]>| match values {
            Some(values) => be.upload_f32(values),
            None => be.zeros_f32(len),
        };
        Ok(Trainer {
            config,
            params: Weights::upload(be, params).map_err(e)?,
            grads: be.zeros(len).map_err(e)?,
            m: moment(moments.map(|(m, _)| m)).map_err(e)?,
            v: moment(moments.map(|(_, v)| v)).map_err(e)?,
            ema: match config.ema_decay {
                Some(_) => Some(Weights::upload(be, ema.unwrap_or(params)).map_err(e)?),
                None => None,
            },
            step,
            seed,
            len,
            acts: Vec::new(),
        })
    }

    /// The weights being trained, as the model reads them.
    pub fn params(&self) -> &B::Buffer {
        self.params.for_model()
    }

    /// The weights to sample and evaluate with: the EMA when kept, else the trained ones.
    pub fn eval_params(&self) -> &B::Buffer {
        self.ema.as_ref().unwrap_or(&self.params).for_model()
    }

    /// Downloads what a checkpoint keeps: the f32 weights, EMA and moments, and the step.
    pub fn state(&self, be: &B) -> Result<TrainingState, B::Error> {
        let get = |buf: &B::Buffer| Self::download_all(be, buf, self.len);
        Ok(TrainingState {
            params: get(&self.params.master)?,
            ema: self.ema.as_ref().map(|e| get(&e.master)).transpose()?,
            moments: Some((get(&self.m)?, get(&self.v)?)),
            step: self.step,
        })
    }

    /// One optimizer step over `micro_batches` (gradient accumulation):
    /// forward, backward, clip, AdamW, EMA.
    pub fn step(
        &mut self,
        be: &B,
        model: &Transformer,
        micro_batches: &[TrainBatch],
    ) -> Result<StepReport, ModelError<B::Error>> {
        self.step_with(be, model, micro_batches, &mut SingleProcess)
    }

    /// One optimizer step of a data-parallel world: this rank's `micro_batches` are its share of
    /// the global batch (`micro_batches[i]` built for
    /// [`DataParallel::micro_step`](crate::collective::DataParallel::micro_step)`(step, len, i)`),
    /// their gradients summed over the ranks before the clip and the update, so that every rank
    /// applies the same update. The report's loss and token count are the world's.
    pub fn step_with<C: Collective<B>>(
        &mut self,
        be: &B,
        model: &Transformer,
        micro_batches: &[TrainBatch],
        comm: &mut C,
    ) -> Result<StepReport, ModelError<B::Error>> {
        if micro_batches.is_empty() {
            return Err(invalid("training step", "needs at least one micro-batch").into());
        }
        let e = ModelError::Backend;
        let shared = ModelError::Collective;
        let accum = micro_batches.len();
        let place = comm.place();
        // Every micro-batch of the world weighs the same: a mean over world × accumulation.
        let scale = 1.0 / (accum * place.world) as f32;
        be.fill(SliceMut::whole(&mut self.grads), self.len, 0.0)
            .map_err(e)?;
        let mut loss = 0.0;
        let mut predicted = 0;
        for (i, batch) in micro_batches.iter().enumerate() {
            let fits = |a: &Activations<B>| {
                a.batch == batch.batch && a.seq_len == batch.seq_len && a.pass == batch.pass
            };
            let index = match self.acts.iter().position(fits) {
                Some(i) => i,
                None => {
                    if self.acts.len() >= MAX_CACHED_SHAPES {
                        self.acts.remove(0); // free before allocating the new shape
                    }
                    let a = Activations::for_training(be, model.config(), batch);
                    self.acts.push(a.map_err(e)?);
                    self.acts.len() - 1
                }
            };
            let acts = &mut self.acts[index];
            model.load_batch(be, acts, batch)?;
            let dropout = Some(DropoutStreams {
                seed: self.seed,
                step: place.micro_step(self.step, accum, i),
            });
            model.forward(be, self.params.for_model(), acts, dropout)?;
            // The last micro-batch's gradients are final stage by stage: sum them as they are.
            let last = i + 1 == accum && place.world > 1;
            loss += model.backward_staged(
                be,
                self.params.for_model(),
                &mut self.grads,
                acts,
                dropout,
                scale,
                |grads, stage| {
                    if last {
                        for range in model.gradient_buckets().at(stage) {
                            comm.start_sum(be, grads, range.clone()).map_err(shared)?;
                        }
                    }
                    Ok(())
                },
            )?;
            predicted += batch.predicted;
        }
        comm.finish_sums(be, &mut self.grads).map_err(shared)?;
        let mut world_sums = [loss, predicted as f64];
        comm.all_reduce_host(&mut world_sums).map_err(shared)?;
        let loss = world_sums[0] / (accum * place.world) as f64;
        let predicted = world_sums[1] as usize;
        if !loss.is_finite() {
            return Err(invalid(
                "training",
                alloc::format!(
                    "the loss became {loss} at step {}; lower the learning rate or check the data",
                    self.step + 1
                ),
            )
            .into());
        }
        let grad_norm = libm::sqrt(
            be.sum_squares(Slice::whole(&self.grads), self.len)
                .map_err(e)?,
        );
        if !grad_norm.is_finite() {
            return Err(invalid(
                "training",
                alloc::format!(
                    "the gradient norm became {grad_norm} at step {}; lower the learning rate",
                    self.step + 1
                ),
            )
            .into());
        }
        // Clipping scales the gradients inside the update's pass.
        let grad_scale = match self.config.grad_clip {
            Some(clip) if grad_norm > f64::from(clip) => {
                (f64::from(clip) / (grad_norm + 1e-6)) as f32
            }
            _ => 1.0,
        };
        let lr = self.config.lr_at(self.step);
        let update = OptimizerStep {
            adamw: AdamW {
                lr,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: self.config.weight_decay,
                step: self.step + 1,
            },
            grad_scale,
            ema_decay: self.config.ema_decay_at(self.step),
        };
        be.optimizer_step(
            &update,
            self.params.updated(),
            SliceMut::whole(&mut self.grads),
            SliceMut::whole(&mut self.m),
            SliceMut::whole(&mut self.v),
            self.ema.as_mut().map(Weights::updated),
            self.len,
        )
        .map_err(e)?;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss,
            grad_norm,
            lr,
            predicted,
        })
    }

    /// The loss of `batch` under the evaluation weights, without gradients.
    pub fn evaluate(
        &mut self,
        be: &B,
        model: &Transformer,
        batch: &TrainBatch,
    ) -> Result<f64, ModelError<B::Error>> {
        let e = ModelError::Backend;
        let mut acts = Activations::for_training(be, model.config(), batch).map_err(e)?;
        model.load_batch(be, &mut acts, batch)?;
        let params = self.eval_params();
        model.loss(be, params, &mut acts, None)
    }

    /// Makes every rank's weights, moments and EMA rank `root`'s (the start of a data-parallel
    /// run, whatever each rank loaded). The step count and seed must already agree.
    pub fn broadcast_from<C: Collective<B>>(
        &mut self,
        be: &B,
        comm: &mut C,
        root: usize,
    ) -> Result<(), ModelError<B::Error>> {
        let len = self.len;
        self.params.broadcast(be, comm, len, root)?;
        for moment in [&mut self.m, &mut self.v] {
            comm.broadcast(be, moment, len, root)
                .map_err(ModelError::Collective)?;
        }
        if let Some(ema) = self.ema.as_mut() {
            ema.broadcast(be, comm, len, root)?;
        }
        Ok(())
    }

    /// Checks that every rank holds the same weights (a checksum of their bits, gathered from
    /// every rank); an error names the ranks that differ from rank 0. Every rank must call it.
    pub fn check_replicas<C: Collective<B>>(
        &self,
        be: &B,
        comm: &mut C,
    ) -> Result<(), ModelError<B::Error>> {
        let place = comm.place();
        let weights =
            Self::download_all(be, &self.params.master, self.len).map_err(ModelError::Backend)?;
        let mine = checksum(&weights);
        // An all-gather by a sum: each rank fills its own two slots.
        let mut all = alloc::vec![0.0f64; 2 * place.world];
        all[2 * place.rank] = f64::from(mine[0]);
        all[2 * place.rank + 1] = f64::from(mine[1]);
        comm.all_reduce_host(&mut all)
            .map_err(ModelError::Collective)?;
        let differ: Vec<usize> = (1..place.world)
            .filter(|r| all[2 * r..2 * r + 2] != all[0..2])
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        Err(ModelError::Collective(crate::collective::CollectiveError {
            rank: place.rank,
            message: alloc::format!(
                "at step {} the weights of rank(s) {differ:?} differ from rank 0's; the ranks ran different code or data, or a device is faulty: stop, and --resume from the last checkpoint",
                self.step
            ),
        }))
    }

    /// Drops the cached activations (memory) until the next step.
    pub fn release_activations(&mut self) {
        self.acts.clear();
    }

    /// Downloads a buffer of this trainer to the host (checkpoints).
    pub fn download_all(be: &B, buf: &B::Buffer, len: usize) -> Result<Vec<f32>, B::Error> {
        let mut out = alloc::vec![0.0f32; len];
        be.download(Slice::whole(buf), &mut out)?;
        Ok(out)
    }
}
