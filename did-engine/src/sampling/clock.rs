//! Wall time of each sampling stage, measured around the model's calls, and a stop between
//! two calls when one is asked for (Ctrl-C).
//!
//! Every call a sampler makes ends with its result on the host (logits downloaded, or drawn
//! tokens), so the wall time around a call is the model's time for it, host draws included;
//! what the sampler does between calls (remasking, bookkeeping) is the generation's wall time
//! less the stages' sum.

use std::fmt;
use std::time::Instant;

use did_core::denoiser::{DenoiseRequest, Denoiser, HostDrawScratch};
use did_core::refine::Generation;
use did_core::sample::categorical::SampledToken;
use did_core::sample::nucleus::Nucleus;
use did_core::sample::DrawSpec;

/// One stage's share of a generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageTime {
    /// The stage's attention block size.
    pub block_size: usize,
    /// Calls for logits or drawn tokens (the stage's NFE).
    pub calls: u32,
    /// Seconds inside the model: those calls and the KV-cache commits.
    pub seconds: f64,
}

/// Why a timed call did not return the model's result.
#[derive(Debug)]
pub enum ClockError<E> {
    /// A stop was asked for before the call.
    Stopped,
    /// The model failed.
    Model(E),
}

impl<E: fmt::Display> fmt::Display for ClockError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClockError::Stopped => write!(f, "stopped between two model calls"),
            ClockError::Model(e) => e.fmt(f),
        }
    }
}

/// A [`Denoiser`] that times `inner` stage by stage and stops when `stop()` turns true.
///
/// ```
/// use did_engine::sampling::StageClock;
/// # use did_core::denoiser::{DenoiseRequest, Denoiser};
/// # struct Flat;
/// # impl Denoiser for Flat {
/// #     type Error = core::convert::Infallible;
/// #     fn vocab_size(&self) -> usize { 3 }
/// #     fn mask_id(&self) -> u32 { 2 }
/// #     fn logits(&mut self, _: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
/// #         out.fill(0.0);
/// #         Ok(())
/// #     }
/// # }
/// use did_core::refine::{generate, GenerateConfig, StagePlan};
/// let plan: StagePlan = "2,L:0.5".parse().unwrap();
/// let mut clock = StageClock::new(Flat, || false);
/// let g = generate(&mut clock, &GenerateConfig::new(plan.resolve(8).unwrap(), 1), &[&[0]]).unwrap();
/// let stages = clock.stages(&g);
/// assert_eq!(stages.len(), 2);
/// assert_eq!((stages[0].block_size, stages[0].calls), (2, g.stages[0].nfe));
/// ```
pub struct StageClock<D, S> {
    inner: D,
    stop: S,
    stages: Vec<StageTime>,
}

impl<D: Denoiser, S: FnMut() -> bool> StageClock<D, S> {
    /// Times `inner`; every call first asks `stop` whether to go on.
    pub fn new(inner: D, stop: S) -> Self {
        StageClock {
            inner,
            stop,
            stages: Vec::new(),
        }
    }

    /// Every `begin_stage` so far with the calls after it, the draft first; the last may be
    /// unfinished. A stage can begin more than once (post-hoc scoring begins the stage it
    /// scores for, then the stage itself begins): [`StageClock::stages`] joins them.
    pub fn segments(&self) -> &[StageTime] {
        &self.stages
    }

    /// The finished `generation`'s stages, timed: each report takes the next segment, then
    /// further ones until it has its calls.
    pub fn stages(&self, generation: &Generation) -> Vec<StageTime> {
        let mut segments = self.stages.iter().peekable();
        let mut out: Vec<StageTime> = Vec::with_capacity(generation.stages.len());
        for report in &generation.stages {
            let mut stage = StageTime {
                block_size: report.block_size,
                calls: 0,
                seconds: 0.0,
            };
            let mut first = true;
            while let Some(s) = segments.next_if(|s| {
                first || stage.calls + s.calls <= report.nfe && stage.calls < report.nfe
            }) {
                stage.calls += s.calls;
                stage.seconds += s.seconds;
                first = false;
            }
            out.push(stage);
        }
        // Anything left (a sampler that begins a stage it never reports) goes to the last.
        if let Some(last) = out.last_mut() {
            for s in segments {
                last.calls += s.calls;
                last.seconds += s.seconds;
            }
        }
        out
    }

    /// Runs one model call, counted as a call of the stage when `counted`.
    fn timed<T>(
        &mut self,
        counted: bool,
        call: impl FnOnce(&mut D) -> Result<T, D::Error>,
    ) -> Result<T, ClockError<D::Error>> {
        if (self.stop)() {
            return Err(ClockError::Stopped);
        }
        let t0 = Instant::now();
        let result = call(&mut self.inner).map_err(ClockError::Model);
        // A call before any stage began (a sampler that never calls begin_stage) opens one.
        if self.stages.is_empty() {
            self.stages.push(StageTime {
                block_size: 0,
                calls: 0,
                seconds: 0.0,
            });
        }
        if let Some(stage) = self.stages.last_mut() {
            stage.seconds += t0.elapsed().as_secs_f64();
            stage.calls += u32::from(counted);
        }
        result
    }
}

impl<D: Denoiser, S: FnMut() -> bool> Denoiser for StageClock<D, S> {
    type Error = ClockError<D::Error>;

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn mask_id(&self) -> u32 {
        self.inner.mask_id()
    }

    fn begin_stage(
        &mut self,
        batch: usize,
        seq_len: usize,
        block_size: usize,
    ) -> Result<(), Self::Error> {
        if (self.stop)() {
            return Err(ClockError::Stopped);
        }
        let t0 = Instant::now();
        self.inner
            .begin_stage(batch, seq_len, block_size)
            .map_err(ClockError::Model)?;
        self.stages.push(StageTime {
            block_size,
            calls: 0,
            seconds: t0.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    fn logits(&mut self, request: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
        self.timed(true, |d| d.logits(request, out))
    }

    fn commit_block(&mut self, request: &DenoiseRequest<'_>) -> Result<(), Self::Error> {
        self.timed(false, |d| d.commit_block(request))
    }

    fn draw(
        &mut self,
        request: &DenoiseRequest<'_>,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        scratch: &mut HostDrawScratch,
        out: &mut [SampledToken],
    ) -> Result<(), Self::Error> {
        self.timed(true, |d| {
            d.draw(request, mask_id, nucleus, draws, scratch, out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use did_core::refine::{generate, GenerateConfig, GenerateError, RemaskStrategy, StagePlan};

    /// Logits that favour token `pos % 3`, never the mask (id 3).
    struct Cyclic;
    impl Denoiser for Cyclic {
        type Error = core::convert::Infallible;
        fn vocab_size(&self) -> usize {
            4
        }
        fn mask_id(&self) -> u32 {
            3
        }
        fn logits(
            &mut self,
            request: &DenoiseRequest<'_>,
            out: &mut [f32],
        ) -> Result<(), Self::Error> {
            for (o, row) in request.outputs.iter().zip(out.chunks_mut(4)) {
                row.fill(0.0);
                row[o.pos as usize % 3] = 2.0;
                row[3] = f32::NEG_INFINITY;
            }
            Ok(())
        }
    }

    fn config(plan: &str, len: usize) -> GenerateConfig {
        let plan: StagePlan = plan.parse().unwrap();
        GenerateConfig::new(plan.resolve(len).unwrap(), 5)
    }

    #[test]
    fn every_stage_is_timed_with_the_calls_the_generation_counts() {
        for (plan, len, remask) in [
            ("4,L:0.25", 32, RemaskStrategy::default()),
            ("2,8:0.5,L:0.25", 16, RemaskStrategy::default()),
            // Post-hoc scoring calls the model for logits before the stage's draws.
            ("4,L:0.5", 16, RemaskStrategy::PostHoc),
        ] {
            let mut gen = config(plan, len);
            gen.remask = remask;
            let mut clock = StageClock::new(Cyclic, || false);
            let g = generate(&mut clock, &gen, &[&[0], &[1]]).unwrap();
            let stages = clock.stages(&g);
            assert_eq!(stages.len(), g.stages.len(), "{plan}");
            for (timed, report) in stages.iter().zip(&g.stages) {
                assert_eq!(timed.block_size, report.block_size, "{plan}");
                assert_eq!(timed.calls, report.nfe, "{plan}");
                assert!(timed.seconds >= 0.0 && timed.seconds.is_finite());
            }
            // Timing changes nothing the sampler does.
            assert_eq!(g, generate(&mut Cyclic, &gen, &[&[0], &[1]]).unwrap());
        }
    }

    #[test]
    fn a_stop_ends_the_generation_between_two_calls() {
        let gen = config("4,L:0.25", 32);
        let total = generate(&mut Cyclic, &gen, &[&[0]]).unwrap().nfe();
        let mut asked = 0u32;
        let mut clock = StageClock::new(Cyclic, || {
            asked += 1;
            asked > 10
        });
        match generate(&mut clock, &gen, &[&[0]]) {
            Err(GenerateError::Denoiser(ClockError::Stopped)) => {}
            other => panic!("expected a stop, got {other:?}"),
        }
        let calls: u32 = clock.segments().iter().map(|s| s.calls).sum();
        assert!(calls > 0 && calls < total, "{calls} of {total}");
    }
}
