//! The CMU Sphinx trie n-gram reader (the independent judge) on arbitrary
//! bytes. A trigram file's quantisation tables alone are 786 KB, past what a
//! fuzzer mutates, so the input supplies the order and counts (u16 each) and
//! everything after the tables, and the tables are zeros; an input with its
//! first bit set goes in raw. Then every lookup over the first ids. A model or
//! a clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

use did_engine::ngram_judge::NgramLm;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let file = if first & 0x80 != 0 {
        rest.to_vec()
    } else {
        let order = usize::from(first % 4) + 2;
        if rest.len() < 2 * order {
            return;
        }
        let mut f = b"Trie Language Model".to_vec();
        f.push(order as u8);
        for c in rest[..2 * order].chunks_exact(2) {
            f.extend(u32::from(u16::from_le_bytes([c[0], c[1]])).to_le_bytes());
        }
        f.extend([0u8; 4]);
        f.resize(f.len() + 4 * (((order - 2) * 2 + 1) << 16), 0);
        f.extend(&rest[2 * order..]);
        f
    };
    if let Ok(lm) = NgramLm::from_bytes(file) {
        let n = lm.counts()[0].min(6);
        for w in 0..n {
            for h1 in 0..n {
                for h2 in 0..n {
                    let p = lm.ln_prob(w, &[h1, h2]);
                    assert!(!p.is_nan());
                }
            }
        }
        let _ = lm.score_sentence(&["a", "b", "c"]);
    }
});
