//! Corpus → tokenised documents → a deterministic split by whole documents → three shards.

use crate::Error;
use std::path::{Path, PathBuf};

use super::documents::Document;
use super::documents::{for_each_document, input_bytes};
use super::shard::{fnv1a, Finished, ShardWriter, FNV_OFFSET};
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
    /// The text field of `.jsonl` inputs and the text column of `.parquet` ones.
    pub text_field: String,
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

/// The split of a document: by a hash of its name alone, so independent of
/// the input order, stable as the corpus grows, and decided the moment the
/// document streams past. `0` train, `1` valid, `2` test.
pub fn split_of(name: &str, valid_fraction: f64, test_fraction: f64) -> usize {
    // FNV-1a mixes its last bytes poorly into the high bits; a finaliser
    // (splitmix64's) spreads them, so "part:1", "part:2", … fall evenly.
    let mut z = fnv1a(FNV_OFFSET, name.as_bytes());
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    if u < valid_fraction {
        1
    } else if u < valid_fraction + test_fraction {
        2
    } else {
        0
    }
}

/// A train document kept back until the end, in case a held-out split would
/// otherwise be empty.
struct Held {
    key: u64,
    /// Its place in the input, to keep input order where it can be kept.
    order: usize,
    tokens: Vec<u32>,
    bytes: usize,
}

/// Where tokenised documents go: their split's shard, except the few kept
/// back to the end (the first two, and the two train documents of smallest
/// key) so that small corpora split as they should.
struct Splitter {
    writers: Vec<ShardWriter>,
    splits: [SplitSummary; 3],
    valid_fraction: f64,
    test_fraction: f64,
    /// The first two documents: with fewer than three in all, none is held out.
    early: Vec<(usize, Held)>,
    /// The two train documents of smallest key: with three or more
    /// documents, a held-out split asked for is never empty.
    reserve: Vec<Held>,
    seen: usize,
}

impl Splitter {
    fn add(&mut self, name: &str, bytes: usize, tokens: Vec<u32>) -> Result<(), Error> {
        let s = split_of(name, self.valid_fraction, self.test_fraction);
        self.seen += 1;
        let held = Held {
            order: self.seen,
            key: fnv1a(FNV_OFFSET, name.as_bytes()),
            tokens,
            bytes,
        };
        if self.early.len() < 2 {
            self.early.push((s, held));
            return Ok(());
        }
        let held = if s == 0 {
            match keep_smallest(&mut self.reserve, held) {
                Some(h) => h,
                None => return Ok(()),
            }
        } else {
            held
        };
        self.write(s, held)
    }

    fn write(&mut self, s: usize, held: Held) -> Result<(), Error> {
        self.writers[s].push_document(&held.tokens)?;
        self.splits[s].documents += 1;
        self.splits[s].bytes += held.bytes;
        Ok(())
    }

    fn tokens(&self) -> u64 {
        self.writers.iter().map(ShardWriter::tokens).sum()
    }

    /// Places the documents kept back and writes the three shards (not yet in place).
    fn finish(mut self) -> Result<([SplitSummary; 3], Vec<Finished>), Error> {
        let documents = self.seen;
        let mut kept = std::mem::take(&mut self.reserve);
        for (s, held) in std::mem::take(&mut self.early) {
            if s == 0 || documents < 3 {
                kept.push(held);
            } else {
                self.write(s, held)?;
            }
        }
        kept.sort_by_key(|h| h.key);
        let mut kept = kept.into_iter();
        for (s, f) in [(1, self.valid_fraction), (2, self.test_fraction)] {
            if f > 0.0 && documents >= 3 && self.splits[s].documents == 0 {
                if let Some(h) = kept.next() {
                    self.write(s, h)?;
                }
            }
        }
        let mut rest: Vec<Held> = kept.collect();
        rest.sort_by_key(|h| h.order);
        for h in rest {
            self.write(0, h)?;
        }
        let mut finished = Vec::with_capacity(3);
        for (s, w) in std::mem::take(&mut self.writers).into_iter().enumerate() {
            self.splits[s].tokens = w.tokens() as usize;
            finished.push(w.finish()?);
        }
        Ok((self.splits, finished))
    }
}

/// Adds `held` to the reserve of the two smallest keys; returns the one that no longer fits.
fn keep_smallest(reserve: &mut Vec<Held>, held: Held) -> Option<Held> {
    reserve.push(held);
    reserve.sort_by_key(|h| h.key);
    if reserve.len() > 2 {
        reserve.pop()
    } else {
        None
    }
}

/// Documents are tokenised in parallel batches of about this much text.
const BATCH_BYTES: usize = 8 << 20;

/// Runs the preparation and writes the shards, streaming: documents are
/// read, tokenised (a batch at a time, on every core) and appended to their
/// split's shard in input order, so memory stays flat whatever the corpus
/// size. The previous shards are replaced only once all three new ones are written.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareSummary, Error> {
    for (name, f) in [
        ("--valid-fraction", opts.valid_fraction),
        ("--test-fraction", opts.test_fraction),
    ] {
        if !(0.0..0.5).contains(&f) {
            return Err(Error::Corpus(format!("{name} {f} must be in [0, 0.5)")));
        }
    }
    // Inputs are checked before anything is created.
    for p in &opts.inputs {
        std::fs::metadata(p).map_err(|e| {
            Error::Corpus(format!(
                "input {} cannot be read: {e}; check the path",
                p.display()
            ))
        })?;
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| {
        Error::Corpus(format!(
            "cannot create the output folder {}: {e}; choose a writable place with --out",
            opts.out_dir.display()
        ))
    })?;
    let tokenizer = Tokenizer::new(opts.tokenizer);
    let eos = opts.tokenizer.eos();
    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::new(input_bytes(&opts.inputs));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} reading {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} ETA {eta} ({msg})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let paths = SPLITS.map(|name| opts.out_dir.join(format!("{name}.bin")));
    let vocab = opts.tokenizer.vocab_size();
    let mut writers = Vec::with_capacity(3);
    for p in &paths {
        writers.push(ShardWriter::create(p, opts.tokenizer, vocab)?);
    }
    let mut splitter = Splitter {
        writers,
        splits: [SplitSummary::default(); 3],
        valid_fraction: opts.valid_fraction,
        test_fraction: opts.test_fraction,
        early: Vec::new(),
        reserve: Vec::new(),
        seen: 0,
    };
    let mut batch: Vec<Document> = Vec::new();
    let mut batch_bytes = 0usize;
    let flush = |batch: &mut Vec<Document>, splitter: &mut Splitter| {
        use rayon::prelude::*;
        let tokens: Vec<Vec<u32>> = batch
            .par_iter()
            .map(|d| {
                let mut t = tokenizer.encode(&d.text);
                t.push(eos);
                t
            })
            .collect();
        for (doc, tokens) in batch.drain(..).zip(tokens) {
            splitter.add(&doc.name, doc.text.len(), tokens)?;
        }
        bar.set_message(format!("{} tokens", splitter.tokens()));
        Ok::<(), Error>(())
    };
    for_each_document(&opts.inputs, &opts.text_field, &bar, &mut |doc| {
        batch_bytes += doc.text.len();
        batch.push(doc);
        if batch_bytes >= BATCH_BYTES {
            batch_bytes = 0;
            flush(&mut batch, &mut splitter)?;
        }
        Ok(())
    })?;
    flush(&mut batch, &mut splitter)?;
    bar.finish_and_clear();
    let (splits, finished) = splitter.finish()?;
    for f in finished {
        f.commit()?;
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

    #[test]
    fn the_split_depends_on_the_name_alone_and_meets_its_fractions() {
        let names: Vec<String> = (0..20_000).map(|i| format!("corpus.jsonl:{i}")).collect();
        let which: Vec<usize> = names.iter().map(|n| split_of(n, 0.1, 0.05)).collect();
        let share = |s: usize| which.iter().filter(|&&w| w == s).count() as f64 / 20_000.0;
        assert!((share(1) - 0.1).abs() < 0.01, "valid {}", share(1));
        assert!((share(2) - 0.05).abs() < 0.01, "test {}", share(2));
        // Consecutive names do not cluster.
        let runs = which.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(runs > 4000, "{runs} changes of split along the names");
        assert!(names.iter().all(|n| split_of(n, 0.0, 0.0) == 0));
        assert_eq!(split_of("x", 0.1, 0.05), split_of("x", 0.1, 0.05));
    }
}
