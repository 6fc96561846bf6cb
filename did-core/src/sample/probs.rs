//! Probabilities from logits, in f64, with SUBS zero-masking: the `[MASK]`
//! token gets probability 0 (docs/bd3lm.md §4.5).

/// Writes `softmax(logits)` into `out` in f64, excluding `mask_id` (probability 0).
///
/// Non-finite logits get probability 0; if every logit is non-finite, the
/// distribution falls back to uniform over the non-mask tokens, so a draw is
/// always defined.
///
/// ```
/// let mut p = [0.0; 3];
/// did_core::sample::probs::subs_softmax(&[0.0, 0.0, 5.0], 2, &mut p);
/// assert_eq!(p, [0.5, 0.5, 0.0]);
/// ```
pub fn subs_softmax(logits: &[f32], mask_id: u32, out: &mut [f64]) {
    assert_eq!(
        logits.len(),
        out.len(),
        "subs_softmax: logits and out differ in length"
    );
    let mask = mask_id as usize;
    let mut max = f64::NEG_INFINITY;
    for (v, &x) in logits.iter().enumerate() {
        if v != mask && x.is_finite() && f64::from(x) > max {
            max = f64::from(x);
        }
    }
    if max == f64::NEG_INFINITY {
        let n = logits.len() - usize::from(mask < logits.len());
        for (v, o) in out.iter_mut().enumerate() {
            *o = if v == mask || n == 0 {
                0.0
            } else {
                1.0 / n as f64
            };
        }
        return;
    }
    let mut sum = 0.0;
    for (v, (&x, o)) in logits.iter().zip(out.iter_mut()).enumerate() {
        *o = if v == mask || !x.is_finite() {
            0.0
        } else {
            libm::exp(f64::from(x) - max)
        };
        sum += *o;
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    quickcheck! {
        fn sums_to_one_and_mask_is_zero(logits: Vec<f32>, mask: u8) -> bool {
            if logits.len() < 2 { return true; }
            let mask = u32::from(mask) % logits.len() as u32;
            let mut p = vec![0.0; logits.len()];
            subs_softmax(&logits, mask, &mut p);
            let s: f64 = p.iter().sum();
            (s - 1.0).abs() < 1e-9 && p[mask as usize] == 0.0 && p.iter().all(|x| x.is_finite() && *x >= 0.0)
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let mut p = [0.0; 3];
        subs_softmax(&[1e30, 1e30, f32::NAN], 99, &mut p);
        assert_eq!(p, [0.5, 0.5, 0.0]);
    }
}
