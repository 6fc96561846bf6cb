//! Where a sample ends, and BD3-LM's degenerate-sample check (docs/bd3lm.md §4.7).

use alloc::vec::Vec;

/// The first position `≥ from` holding `eos`, if any.
///
/// ```
/// assert_eq!(did_core::sample::stop::first_eos(&[7, 1, 7, 2], 1, 7), Some(2));
/// ```
pub fn first_eos(tokens: &[u32], from: usize, eos: u32) -> Option<usize> {
    tokens
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, &t)| t == eos)
        .map(|(i, _)| i)
}

/// The Shannon entropy, in nats, of the unigram histogram of `tokens`.
/// BD3-LM regenerates a sample whose last 256 tokens score below 4.
///
/// ```
/// let h = did_core::sample::stop::unigram_entropy(&[1, 2, 1, 2]);
/// assert!((h - std::f64::consts::LN_2).abs() < 1e-12);
/// ```
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    if tokens.is_empty() {
        return 0.0;
    }
    let mut sorted: Vec<u32> = tokens.to_vec();
    sorted.sort_unstable();
    let n = tokens.len() as f64;
    let mut h = 0.0;
    let mut run = 1usize;
    for i in 1..=sorted.len() {
        if i < sorted.len() && sorted[i] == sorted[i - 1] {
            run += 1;
        } else {
            let p = run as f64 / n;
            h -= p * libm::log(p);
            run = 1;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_constant_and_uniform() {
        assert_eq!(unigram_entropy(&[5; 10]), 0.0);
        let all: Vec<u32> = (0..256).collect();
        assert!((unigram_entropy(&all) - libm::log(256.0)).abs() < 1e-12);
    }
}
