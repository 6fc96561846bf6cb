//! Philox4x32-10, the counter-based generator behind every random draw.
//!
//! A counter-based generator maps `(key, counter)` to random bits with no
//! state in between, so a GPU thread and a CPU loop that name the same counter
//! get the same numbers. That is what lets the CPU and CUDA backends produce
//! token-identical samples.
//!
//! # Streams
//!
//! Every draw is addressed by five coordinates. The 64-bit seed is the key;
//! the 128-bit counter is laid out as
//!
//! | word | holds | example |
//! |---|---|---|
//! | `c0` | `index` — the element, e.g. a vocabulary id / 2 or a try | `v >> 1` |
//! | `c1` | `row` — the position in the sequence, or the sequence in a batch | `pos` |
//! | `c2` | `step` — the training step or the denoiser call | `step` |
//! | `c3` | `purpose << 24 \| sample` — what the draw is for, and which sample | `Purpose::Categorical` |
//!
//! so draws for different purposes, samples, steps and positions never share
//! a counter. `sample` is limited to 24 bits (16,777,216 samples per seed);
//! [`RngStream::new`] masks it and [`RngStream::checked`] rejects larger ones.
//!
//! One 128-bit block gives four `u32` words or two `f64` uniforms: element `i`
//! of a stream uses block `i >> 1`, words `2·(i & 1)` and `2·(i & 1) + 1`.
//!
//! ```
//! use did_core::rng::{Purpose, RngStream};
//! let s = RngStream::new(42, Purpose::Categorical, 0, 7);
//! let u = s.uniform(3, 10);
//! assert!(u > 0.0 && u < 1.0);
//! assert_eq!(u, RngStream::new(42, Purpose::Categorical, 0, 7).uniform(3, 10));
//! ```

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The Philox4x32 bijection with 10 rounds (Salmon et al., SC'11; Random123).
///
/// ```
/// use did_core::rng::philox4x32_10;
/// // Random123's known-answer vector for a zero counter and key.
/// assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
/// ```
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// What a random draw is for; part of the counter, so purposes never collide.
///
/// ```
/// use did_core::rng::{Purpose, RngStream};
/// let noise = RngStream::new(1, Purpose::Noise, 0, 0);
/// let time = RngStream::new(1, Purpose::Time, 0, 0);
/// assert_ne!(noise.uniform(0, 0), time.uniform(0, 0));
/// ```
///
/// The numbering is part of the sample format: a CUDA kernel uses the same
/// numbers. Never renumber; only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Purpose {
    /// Per-token masking of the forward process (`row` = sequence in batch, `index` = position + try·L).
    Noise = 1,
    /// The stratified time offset per (sequence, block) (`row` = sequence, `index` = block).
    Time = 2,
    /// Dropout masks in training.
    Dropout = 3,
    /// The block size of a mix-scale optimizer step (`step` = optimizer step).
    MixScale = 4,
    /// Which masked position a first-hitting step reveals (`row` = block start).
    RevealPosition = 5,
    /// Gumbel noise of a categorical draw (`row` = position, `index` = vocabulary id).
    Categorical = 6,
    /// Whether a masked position stays masked in a DDPM step (`row` = position).
    StayMasked = 7,
    /// Random remasking keys (`row` = stage, `index` = position).
    Remask = 8,
    /// Shuffling of training data.
    DataOrder = 9,
    /// Parameter initialisation.
    Init = 10,
}

/// Largest sample id that fits the 24 bits of the counter.
pub const MAX_SAMPLE: u32 = (1 << 24) - 1;

/// A stream of random numbers: a seed, a purpose, a sample and a step fixed;
/// draws addressed by `(row, index)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngStream {
    key: [u32; 2],
    step: u32,
    tag: u32,
}

impl RngStream {
    /// A stream for `seed`, `purpose`, `sample` (low 24 bits used) and `step`.
    pub fn new(seed: u64, purpose: Purpose, sample: u32, step: u32) -> Self {
        RngStream {
            key: [seed as u32, (seed >> 32) as u32],
            step,
            tag: (u32::from(purpose as u8) << 24) | (sample & MAX_SAMPLE),
        }
    }

    /// Like [`RngStream::new`] but rejects a `sample` that does not fit 24 bits.
    pub fn checked(
        seed: u64,
        purpose: Purpose,
        sample: u32,
        step: u32,
    ) -> Result<Self, crate::Error> {
        if sample > MAX_SAMPLE {
            return Err(crate::error::invalid(
                "sample id",
                alloc::format!(
                    "{sample} exceeds {MAX_SAMPLE}, the largest sample id per seed; use another seed for more samples"
                ),
            ));
        }
        Ok(Self::new(seed, purpose, sample, step))
    }

    /// The same stream at another step.
    pub fn at_step(self, step: u32) -> Self {
        RngStream { step, ..self }
    }

    /// The words a device kernel needs to draw this stream's numbers: the
    /// Philox key, the step and the tag (purpose and sample). The block at
    /// `(row, block)` is `philox4x32_10([block, row, step, tag], key)`.
    ///
    /// ```
    /// use did_core::rng::{philox4x32_10, Purpose, RngStream};
    /// let s = RngStream::new(42, Purpose::Dropout, 3, 9);
    /// let (key, step, tag) = s.counter_parts();
    /// assert_eq!(philox4x32_10([5, 2, step, tag], key), s.block(2, 5));
    /// ```
    pub fn counter_parts(&self) -> ([u32; 2], u32, u32) {
        (self.key, self.step, self.tag)
    }

    /// The raw 128-bit block at `(row, block)`.
    #[inline]
    pub fn block(&self, row: u32, block: u32) -> [u32; 4] {
        philox4x32_10([block, row, self.step, self.tag], self.key)
    }

    /// A uniform `u32`: word `index & 3` of block `index >> 2`.
    #[inline]
    pub fn u32(&self, row: u32, index: u32) -> u32 {
        self.block(row, index >> 2)[(index & 3) as usize]
    }

    /// A uniform `f64` in the open interval (0, 1), with 52 random bits.
    ///
    /// The value is `(m + 0.5) · 2⁻⁵²` for a 52-bit integer `m`: every value is
    /// exactly representable, never 0 or 1, and `ln` of it is always finite.
    #[inline]
    pub fn uniform(&self, row: u32, index: u32) -> f64 {
        let b = self.block(row, index >> 1);
        let half = ((index & 1) * 2) as usize;
        let bits = (u64::from(b[half + 1]) << 32) | u64::from(b[half]);
        u64_to_open_unit(bits)
    }

    /// A uniform `f32` in [0, 1) from the top 24 bits of [`RngStream::u32`] (dropout).
    #[inline]
    pub fn uniform_f32(&self, row: u32, index: u32) -> f32 {
        (self.u32(row, index) >> 8) as f32 * (1.0 / 16_777_216.0)
    }
}

/// Maps 64 random bits to (0, 1): the top 52 bits, centred in their cell.
/// (With 53 bits the top cell's centre, 1 − 2⁻⁵⁴, would round to 1.)
#[inline]
pub fn u64_to_open_unit(bits: u64) -> f64 {
    ((bits >> 12) as f64 + 0.5) * (1.0 / 4_503_599_627_370_496.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    // Random123 kat_vectors, philox4x32 10 lines: counter, key, expected.
    const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0, 0, 0, 0],
            [0, 0],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];

    #[test]
    fn philox_known_answer_vectors() {
        for (ctr, key, want) in KAT {
            assert_eq!(
                philox4x32_10(ctr, key),
                want,
                "counter {ctr:08x?} key {key:08x?}"
            );
        }
    }

    #[test]
    fn open_unit_extremes_are_inside() {
        assert!(u64_to_open_unit(0) > 0.0);
        assert!(u64_to_open_unit(u64::MAX) < 1.0);
        assert!(libm::log(u64_to_open_unit(0)).is_finite());
        assert!(libm::log(u64_to_open_unit(u64::MAX)) < 0.0);
    }

    #[test]
    fn purposes_samples_steps_rows_are_independent_counters() {
        let base = RngStream::new(7, Purpose::Noise, 3, 5);
        let others = [
            RngStream::new(7, Purpose::Time, 3, 5),
            RngStream::new(7, Purpose::Noise, 4, 5),
            RngStream::new(7, Purpose::Noise, 3, 6),
            RngStream::new(8, Purpose::Noise, 3, 5),
        ];
        for o in others {
            assert_ne!(base.block(0, 0), o.block(0, 0));
        }
        assert_ne!(base.block(0, 0), base.block(1, 0));
        assert_ne!(base.block(0, 0), base.block(0, 1));
    }

    #[test]
    fn uniform_mean_and_spread_are_plausible() {
        let s = RngStream::new(1, Purpose::Categorical, 0, 0);
        let n = 100_000u32;
        let mut sum = 0.0;
        let mut below_tenth = 0u32;
        for i in 0..n {
            let u = s.uniform(0, i);
            sum += u;
            below_tenth += u32::from(u < 0.1);
        }
        let mean = sum / f64::from(n);
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        assert!((f64::from(below_tenth) / f64::from(n) - 0.1).abs() < 0.005);
    }

    #[test]
    fn checked_rejects_samples_beyond_24_bits() {
        assert!(RngStream::checked(0, Purpose::Noise, MAX_SAMPLE, 0).is_ok());
        assert!(RngStream::checked(0, Purpose::Noise, MAX_SAMPLE + 1, 0).is_err());
    }

    quickcheck! {
        fn uniform_is_in_open_unit_interval(seed: u64, row: u32, index: u32, step: u32) -> bool {
            let u = RngStream::new(seed, Purpose::Categorical, 0, step).uniform(row, index);
            u > 0.0 && u < 1.0
        }
        fn uniform_f32_is_in_half_open_unit_interval(seed: u64, row: u32, index: u32) -> bool {
            let u = RngStream::new(seed, Purpose::Dropout, 0, 0).uniform_f32(row, index);
            (0.0..1.0).contains(&u)
        }
    }
}
