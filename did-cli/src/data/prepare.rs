//! Corpus → tokenised documents → a deterministic split by whole documents → three shards.

use std::path::{Path, PathBuf};

use super::documents::{collect_with, Document};
use super::shard::{self, fnv1a, FNV_OFFSET};
use super::tokenizer::{Tokenizer, TokenizerKind};

/// What `did data prepare` is asked to do.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files, folders, archives.
    pub inputs: Vec<PathBuf>,
    /// Where `train.bin`, `valid.bin`, `test.bin` go.
    pub out_dir: PathBuf,
    /// The tokenizer.
    pub tokenizer: TokenizerKind,
    /// Fraction of documents held out for validation.
    pub valid_fraction: f64,
    /// Fraction held out for test.
    pub test_fraction: f64,
    /// The text field of `.jsonl` inputs.
    pub jsonl_field: String,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// One split's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplitSummary {
    /// Documents.
    pub documents: usize,
    /// Tokens, EOS included.
    pub tokens: usize,
    /// Bytes of text.
    pub bytes: usize,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareSummary {
    /// Train, validation, test.
    pub splits: [SplitSummary; 3],
    /// The shard paths, in the same order.
    pub paths: [PathBuf; 3],
}

/// The split names and shard file names.
pub const SPLITS: [&str; 3] = ["train", "valid", "test"];

/// Assigns documents to splits by a hash of their names: independent of the
/// input order, stable as the corpus grows. Returns the split of each document.
pub fn split(docs: &[Document], valid_fraction: f64, test_fraction: f64) -> Vec<usize> {
    let n = docs.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (fnv1a(FNV_OFFSET, docs[i].name.as_bytes()), i));
    let count = |f: f64| {
        if n >= 3 && f > 0.0 {
            ((f * n as f64).round() as usize).max(1)
        } else {
            0
        }
    };
    let (nv, nt) = (count(valid_fraction), count(test_fraction));
    let mut which = vec![0; n];
    for (rank, &i) in order.iter().enumerate() {
        which[i] = if rank < nv {
            1
        } else if rank < nv + nt {
            2
        } else {
            0
        };
    }
    which
}

/// Runs the preparation and writes the shards.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareSummary, String> {
    for (name, f) in [
        ("--valid-fraction", opts.valid_fraction),
        ("--test-fraction", opts.test_fraction),
    ] {
        if !(0.0..0.5).contains(&f) {
            return Err(format!("{name} {f} must be in [0, 0.5)"));
        }
    }
    let docs = collect_with(&opts.inputs, &opts.jsonl_field)?;
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| {
        format!(
            "cannot create the output folder {}: {e}; choose a writable place with --out",
            opts.out_dir.display()
        )
    })?;
    let which = split(&docs, opts.valid_fraction, opts.test_fraction);
    let tokenizer = Tokenizer::new(opts.tokenizer);
    let eos = opts.tokenizer.eos();
    let total_bytes: u64 = docs.iter().map(|d| d.text.len() as u64).sum();
    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::new(total_bytes);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} tokenising {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} ETA {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut tokens: [Vec<u32>; 3] = Default::default();
    let mut splits = [SplitSummary::default(); 3];
    for (doc, &s) in docs.iter().zip(&which) {
        tokens[s].extend(tokenizer.encode(&doc.text));
        tokens[s].push(eos);
        splits[s].documents += 1;
        splits[s].bytes += doc.text.len();
        bar.inc(doc.text.len() as u64);
    }
    bar.finish_and_clear();
    let paths = SPLITS.map(|name| opts.out_dir.join(format!("{name}.bin")));
    for s in 0..3 {
        splits[s].tokens = tokens[s].len();
        shard::write(
            &paths[s],
            opts.tokenizer,
            opts.tokenizer.vocab_size(),
            splits[s].documents as u64,
            &tokens[s],
        )?;
    }
    Ok(PrepareSummary { splits, paths })
}

/// The summary as a table for the terminal.
pub fn render(summary: &PrepareSummary, tokenizer: TokenizerKind, out_dir: &Path) -> String {
    let mut s = format!("tokenizer {tokenizer}; shards in {}\n", out_dir.display());
    s.push_str("split   documents        tokens          bytes  bytes/token\n");
    for (name, sp) in SPLITS.iter().zip(&summary.splits) {
        let ratio = if sp.tokens > 0 {
            sp.bytes as f64 / sp.tokens as f64
        } else {
            0.0
        };
        s.push_str(&format!(
            "{name:<6} {:>10} {:>13} {:>14} {:>12.2}\n",
            sp.documents, sp.tokens, sp.bytes, ratio
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str) -> Document {
        Document {
            name: name.into(),
            text: "x".into(),
        }
    }

    #[test]
    fn split_is_by_name_and_order_free() {
        let docs: Vec<Document> = (0..40).map(|i| doc(&format!("d{i}"))).collect();
        let a = split(&docs, 0.1, 0.05);
        assert_eq!(a.iter().filter(|&&s| s == 1).count(), 4);
        assert_eq!(a.iter().filter(|&&s| s == 2).count(), 2);
        let mut rev = docs.clone();
        rev.reverse();
        let b = split(&rev, 0.1, 0.05);
        for (i, d) in docs.iter().enumerate() {
            let j = rev.iter().position(|r| r.name == d.name).unwrap();
            assert_eq!(a[i], b[j], "{}", d.name);
        }
        assert!(
            split(&docs[..2], 0.1, 0.1).iter().all(|&s| s == 0),
            "too few documents to hold any out"
        );
    }
}
