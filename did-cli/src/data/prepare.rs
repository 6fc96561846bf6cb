//! Corpus → tokenised documents → a deterministic split by whole documents → three shards.

use std::path::{Path, PathBuf};

use super::documents::{for_each_document, input_bytes};
use super::shard::{fnv1a, ShardWriter, FNV_OFFSET};
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

fn write_to(w: &mut ShardWriter, split: &mut SplitSummary, held: Held) -> Result<(), String> {
    w.push_document(&held.tokens)?;
    split.documents += 1;
    split.bytes += held.bytes;
    Ok(())
}

/// Runs the preparation and writes the shards, streaming: documents are
/// read, tokenised and appended to their split's shard one at a time, so
/// memory stays flat whatever the corpus size. The previous shards are
/// replaced only once all three new ones are written.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareSummary, String> {
    for (name, f) in [
        ("--valid-fraction", opts.valid_fraction),
        ("--test-fraction", opts.test_fraction),
    ] {
        if !(0.0..0.5).contains(&f) {
            return Err(format!("{name} {f} must be in [0, 0.5)"));
        }
    }
    // Inputs are checked before anything is created.
    for p in &opts.inputs {
        std::fs::metadata(p)
            .map_err(|e| format!("input {} cannot be read: {e}; check the path", p.display()))?;
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| {
        format!(
            "cannot create the output folder {}: {e}; choose a writable place with --out",
            opts.out_dir.display()
        )
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
    let mut splits = [SplitSummary::default(); 3];
    // The first two documents wait for the end: with fewer than three, none is held out.
    let mut early: Vec<(usize, Held)> = Vec::new();
    // Train documents pass through a reserve of the two smallest keys: with
    // three or more documents, a held-out split asked for is never empty.
    let mut reserve: Vec<Held> = Vec::new();
    let mut seen = 0usize;
    let documents = for_each_document(&opts.inputs, &opts.text_field, &bar, &mut |doc| {
        let mut tokens = tokenizer.encode(&doc.text);
        tokens.push(eos);
        let s = split_of(&doc.name, opts.valid_fraction, opts.test_fraction);
        seen += 1;
        let held = Held {
            order: seen,
            key: fnv1a(FNV_OFFSET, doc.name.as_bytes()),
            tokens,
            bytes: doc.text.len(),
        };
        if early.len() < 2 {
            early.push((s, held));
            return Ok(());
        }
        let held = if s == 0 {
            match keep_smallest(&mut reserve, held) {
                Some(h) => h,
                None => return Ok(()),
            }
        } else {
            held
        };
        write_to(&mut writers[s], &mut splits[s], held)?;
        if splits.iter().map(|s| s.documents).sum::<usize>() % 1024 == 0 {
            bar.set_message(format!(
                "{} tokens",
                writers.iter().map(|w| w.tokens()).sum::<u64>()
            ));
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let mut kept = reserve;
    for (s, held) in early {
        if s == 0 || documents < 3 {
            kept.push(held);
        } else {
            write_to(&mut writers[s], &mut splits[s], held)?;
        }
    }
    kept.sort_by_key(|h| h.key);
    let mut kept = kept.into_iter();
    for (s, f) in [(1, opts.valid_fraction), (2, opts.test_fraction)] {
        if f > 0.0 && documents >= 3 && splits[s].documents == 0 {
            if let Some(h) = kept.next() {
                write_to(&mut writers[s], &mut splits[s], h)?;
            }
        }
    }
    let mut rest: Vec<Held> = kept.collect();
    rest.sort_by_key(|h| h.order);
    for h in rest {
        write_to(&mut writers[0], &mut splits[0], h)?;
    }
    let mut finished = Vec::with_capacity(3);
    for (s, w) in writers.into_iter().enumerate() {
        splits[s].tokens = w.tokens() as usize;
        finished.push(w.finish()?);
    }
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
