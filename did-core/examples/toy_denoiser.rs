//! An engine builder's view of did-core: implement `Denoiser` for your model,
//! then draft → snapshot remask → global refine through `generate`.
//!
//! The "model" here is a bigram table counted from a few sentences. At a
//! position it scores each word by the visible left neighbour, P(w | left),
//! and the visible right neighbour, P(right | w). "Visible" is decided by the
//! request's attention mask, as in a real transformer: while drafting with
//! blocks of 4 the right neighbour beyond the block is hidden; the global
//! refine sees both sides.
//!
//! Run: `cargo run -p did-core --example toy_denoiser`

use did_core::denoiser::{DenoiseRequest, Denoiser};
use did_core::refine::{generate, GenerateConfig, StagePlan};

const CORPUS: &str = "the cat sat on the mat . the dog sat on the log . a cat saw the dog . \
                      the dog saw a cat on the mat . a dog sat on a log . the cat ran to the dog .";

struct Bigram {
    words: Vec<&'static str>,
    log_p: Vec<f32>, // [prev, next]: ln P(next | prev), add-0.01 smoothed; <bos> never follows
}

impl Bigram {
    fn new() -> Self {
        let mut words = vec!["<bos>"];
        for w in CORPUS.split_whitespace() {
            if !words.contains(&w) {
                words.push(w);
            }
        }
        words.push("[MASK]"); // the last id; never predicted
        let n = words.len();
        let id = |w: &str| words.iter().position(|x| *x == w).unwrap_or(0);
        let mut counts = vec![0.01f32; n * n];
        let mut prev = 0;
        for w in CORPUS.split_whitespace() {
            counts[prev * n + id(w)] += 1.0;
            prev = id(w);
        }
        (0..n).for_each(|p| counts[p * n] = 0.0);
        let mut log_p = vec![0.0; n * n];
        for p in 0..n {
            let total: f32 = counts[p * n..(p + 1) * n].iter().sum();
            for v in 0..n {
                log_p[p * n + v] = (counts[p * n + v] / total).ln();
            }
        }
        Bigram { words, log_p }
    }

    fn text(&self, tokens: &[u32]) -> String {
        let w: Vec<&str> = tokens
            .iter()
            .map(|&t| {
                if t == self.mask_id() {
                    "_"
                } else {
                    self.words[t as usize]
                }
            })
            .collect();
        w.join(" ")
    }
}

impl Denoiser for Bigram {
    type Error = std::convert::Infallible;

    fn vocab_size(&self) -> usize {
        self.words.len()
    }

    fn mask_id(&self) -> u32 {
        (self.words.len() - 1) as u32
    }

    fn logits(&mut self, r: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
        let (n, mask, attention) = (self.vocab_size(), self.mask_id(), r.attention());
        for (o, row) in r.outputs.iter().zip(out.chunks_mut(n)) {
            let (seq, pos) = (r.sequence(o.seq as usize), o.pos as usize);
            let query = pos - r.block.start; // attention queries are numbered from the block start
            let visible = |p: usize| p < seq.len() && attention.allows(query, p) && seq[p] != mask;
            row.fill(0.0);
            if pos > 0 && visible(pos - 1) {
                let left = seq[pos - 1] as usize;
                row.iter_mut()
                    .zip(&self.log_p[left * n..])
                    .for_each(|(x, lp)| *x += lp);
            }
            if visible(pos + 1) {
                let right = seq[pos + 1] as usize;
                row.iter_mut()
                    .enumerate()
                    .for_each(|(v, x)| *x += self.log_p[v * n + right]);
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model = Bigram::new();
    let plan = "4,L:0.25".parse::<StagePlan>()?.resolve(24)?;
    let config = GenerateConfig::new(plan, 2024);
    let out = generate(&mut model, &config, &[&[0]])?;

    println!("plan      4,L:0.25 over 24 positions (draft with blocks of 4, remask 25 %, refine with one block)");
    println!("draft     {}", model.text(&out.stages[0].tokens));
    let remasked = &out.stages[1].remasked[0];
    let mut shown = out.stages[0].tokens.clone();
    remasked.iter().for_each(|&p| shown[p] = model.mask_id());
    println!("remasked  {}", model.text(&shown));
    println!("          positions {remasked:?}, the least confident when drawn");
    println!("refined   {}", model.text(&out.batch.tokens));
    println!(
        "NFE       draft {} + refine {}",
        out.stages[0].nfe, out.stages[1].nfe
    );
    Ok(())
}
