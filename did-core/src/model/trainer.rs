//! The optimiser around the model: AdamW with linear warm-up, gradient-norm
//! clipping, EMA weights with BD3-LM's warm-up, and gradient accumulation.

use alloc::vec::Vec;

use super::activations::Activations;
use super::pass::TrainBatch;
use super::transformer::{DropoutStreams, Transformer};
use super::ModelError;
use crate::backend::{AdamW, Backend, Slice, SliceMut};
use crate::error::invalid;

/// Batch shapes whose activations are kept between steps.
const MAX_CACHED_SHAPES: usize = 2;

/// Optimiser settings; the defaults are BD3-LM's (bd3lm.md §6).
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

/// Parameters, gradients, AdamW moments and EMA weights, each one flat buffer.
///
/// A runnable training step is the example at the top of the `did-backend-cpu` crate.
pub struct Trainer<B: Backend> {
    /// Settings.
    pub config: TrainerConfig,
    /// The weights being trained.
    pub params: B::Buffer,
    /// Gradients (zeroed at every step).
    pub grads: B::Buffer,
    /// First moments.
    pub m: B::Buffer,
    /// Second moments.
    pub v: B::Buffer,
    /// EMA weights (used for sampling and evaluation).
    pub ema: Option<B::Buffer>,
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
        let len = model.table().total();
        if initial.len() != len {
            return Err(invalid(
                "parameters",
                alloc::format!(
                    "{} values given for a model of {len} parameters",
                    initial.len()
                ),
            )
            .into());
        }
        let e = ModelError::Backend;
        Ok(Trainer {
            config,
            params: be.upload(initial).map_err(e)?,
            grads: be.zeros(len).map_err(e)?,
            m: be.zeros(len).map_err(e)?,
            v: be.zeros(len).map_err(e)?,
            ema: if config.ema_decay.is_some() {
                Some(be.upload(initial).map_err(e)?)
            } else {
                None
            },
            step: 0,
            seed,
            len,
            acts: Vec::new(),
        })
    }

    /// The weights to sample and evaluate with: the EMA when kept, else the trained ones.
    pub fn eval_params(&self) -> &B::Buffer {
        self.ema.as_ref().unwrap_or(&self.params)
    }

    /// One optimizer step over `micro_batches` (gradient accumulation):
    /// forward, backward, clip, AdamW, EMA.
    pub fn step(
        &mut self,
        be: &B,
        model: &Transformer,
        micro_batches: &[TrainBatch],
    ) -> Result<StepReport, ModelError<B::Error>> {
        if micro_batches.is_empty() {
            return Err(invalid("training step", "needs at least one micro-batch").into());
        }
        let e = ModelError::Backend;
        let accum = micro_batches.len();
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
                step: self.step.wrapping_mul(accum as u32).wrapping_add(i as u32),
            });
            model.forward(be, &self.params, acts, dropout)?;
            loss += model.backward(
                be,
                &self.params,
                &mut self.grads,
                acts,
                dropout,
                1.0 / accum as f32,
            )?;
            predicted += batch.predicted;
        }
        loss /= accum as f64;
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
        if let Some(clip) = self.config.grad_clip {
            if grad_norm > f64::from(clip) {
                be.scale(
                    SliceMut::whole(&mut self.grads),
                    self.len,
                    (f64::from(clip) / (grad_norm + 1e-6)) as f32,
                )
                .map_err(e)?;
            }
        }
        let lr = self.config.lr_at(self.step);
        let hp = AdamW {
            lr,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            step: self.step + 1,
        };
        be.adamw(
            &hp,
            SliceMut::whole(&mut self.params),
            Slice::whole(&self.grads),
            SliceMut::whole(&mut self.m),
            SliceMut::whole(&mut self.v),
            self.len,
        )
        .map_err(e)?;
        if let (Some(ema), Some(decay)) = (self.ema.as_mut(), self.config.ema_decay_at(self.step)) {
            be.ema_update(
                SliceMut::whole(ema),
                Slice::whole(&self.params),
                self.len,
                decay,
            )
            .map_err(e)?;
        }
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
        let params = self.ema.as_ref().unwrap_or(&self.params);
        model.loss(be, params, &mut acts, None)
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
