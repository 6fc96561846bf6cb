//! The independent judge against CMU's own evaluator: our reader of
//! PocketSphinx's en-us trigram model (`scripts/fetch-judges.sh`, sha256
//! pinned) gives the perplexities `sphinx_lm_eval` (Debian sphinxbase-utils
//! 0.8+5prealpha+1-16) printed for 300 public-domain State of the Union
//! sentences (2017–2021, tests/fixtures/ngram/sotu-real.txt) and for the same
//! words shuffled within each sentence (sotu-shuffled.txt), within 0.1 %.
//!
//! The model is 27 MB and not committed: the test looks for it in
//! `DID_NGRAM_LM` or data/judges/en-us.lm.bin and prints SKIP without it,
//! unless `DID_REQUIRE_NGRAM_LM=1` (CI fetches it and sets that).

mod common;
use common::{did, scratch};

use std::path::{Path, PathBuf};

use did_engine::ngram_judge::{NgramLm, WordScore};

fn model() -> Option<PathBuf> {
    let path = std::env::var_os("DID_NGRAM_LM").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/judges/en-us.lm.bin"),
        PathBuf::from,
    );
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("DID_REQUIRE_NGRAM_LM").as_deref() != Ok("1"),
        "DID_REQUIRE_NGRAM_LM=1 but {} is missing; run scripts/fetch-judges.sh",
        path.display()
    );
    eprintln!(
        "SKIP: no {} (scripts/fetch-judges.sh fetches it)",
        path.display()
    );
    None
}

fn score_file(lm: &NgramLm, name: &str) -> WordScore {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ngram")
            .join(name),
    )
    .unwrap();
    let mut total = WordScore::default();
    for line in text.lines() {
        let words: Vec<&str> = line
            .split_whitespace()
            .filter(|w| *w != "<s>" && *w != "</s>")
            .collect();
        total.add(lm.score_sentence(&words));
    }
    total
}

#[test]
fn the_trigram_judge_matches_cmus_evaluator_on_real_and_shuffled_sentences() {
    let Some(path) = model() else { return };
    let lm = NgramLm::from_bytes(std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(lm.order(), 3);
    assert_eq!(
        lm.counts()[0],
        72_547,
        "unigrams, as docs/data.md counts them"
    );
    // sphinx_lm_eval: "5869 words evaluated, 25 OOVs (0.43%), 300 context cues removed".
    for (file, cmu) in [
        ("sotu-real.txt", 223.000091),
        ("sotu-shuffled.txt", 3387.183187),
    ] {
        let s = score_file(&lm, file);
        assert_eq!((s.scored, s.oov), (5869 - 300 - 25, 25), "{file}");
        let rel = (s.perplexity() - cmu).abs() / cmu;
        eprintln!(
            "{file}: ours {:.3}, CMU {cmu:.3}, relative difference {rel:.1e}",
            s.perplexity()
        );
        assert!(
            rel < 1e-3,
            "{file}: perplexity {} vs CMU's {cmu}",
            s.perplexity()
        );
    }
}

#[test]
fn did_eval_word_ppl_scores_sample_files() {
    let Some(path) = model() else { return };
    let dir = scratch("word-ppl");
    let samples = dir.join("samples.jsonl");
    std::fs::write(
        &samples,
        "{\"tokens\": [1, 2, 3], \"text\": \"We will build the roads and the bridges of tomorrow.\"}\n\
         {\"tokens\": [4, 4, 4], \"text\": \"tomorrow of bridges the and roads the build will we\"}\n",
    )
    .unwrap();
    let json = dir.join("w.json");
    let (code, stdout, err) = did(&[
        "eval",
        "word-ppl",
        samples.to_str().unwrap(),
        "--lm",
        path.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("word perplexity"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let per = v["per_sample_word_ppl"].as_array().unwrap();
    assert!(
        per[0].as_f64().unwrap() * 5.0 < per[1].as_f64().unwrap(),
        "fluent text scores far better than its words reversed: {per:?}"
    );
    assert_eq!(v["words_scored"], 22, "10 words + </s> per sample");
    // A file without text says what it needs.
    std::fs::write(&samples, "{\"tokens\": [1]}\n").unwrap();
    let (code, _, err) = did(&[
        "eval",
        "word-ppl",
        samples.to_str().unwrap(),
        "--lm",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("no \"text\""), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `did eval gen-ppl --word-judge` reports both judges side by side; samples
/// without a "text" field are decoded with the judge's tokenizer.
#[test]
fn gen_ppl_reports_the_word_judge_beside_the_causal_one() {
    let Some(path) = model() else { return };
    let dir = scratch("gen-ppl-word");
    let samples = dir.join("samples.jsonl");
    let line = |text: &str| {
        let tokens: Vec<u32> = std::iter::once(256)
            .chain(text.bytes().map(u32::from))
            .collect();
        format!("{{\"tokens\": {tokens:?}, \"nfe\": [4]}}\n")
    };
    std::fs::write(
        &samples,
        line("The people of this nation will not be silent.")
            + &line("nation silent of the will be people this not"),
    )
    .unwrap();
    let json = dir.join("g.json");
    let judge = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo/judge.safetensors.gz");
    let (code, stdout, err) = did(&[
        "eval",
        "gen-ppl",
        "--samples",
        samples.to_str().unwrap(),
        "--judge",
        judge.to_str().unwrap(),
        "--word-judge",
        path.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("word judge"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let per = v["word_judge"]["per_sample_word_ppl"].as_array().unwrap();
    assert_eq!(
        v["word_judge"]["words_scored"], 20,
        "9 words + </s> per sample"
    );
    assert!(
        per[0].as_f64().unwrap() < per[1].as_f64().unwrap(),
        "{per:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
