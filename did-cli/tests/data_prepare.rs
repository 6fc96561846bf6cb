//! End-to-end: `did data prepare` on the committed excerpt, an archive, and bad input.

mod common;
use common::did;
use common::scratch;

use std::path::{Path, PathBuf};

use did_engine::data::shard::Shard;

fn excerpt() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/excerpt")
}

#[test]
fn the_excerpt_becomes_three_shards_split_by_document() {
    let out = scratch("excerpt");
    let (code, stdout, err) = did(&[
        "data",
        "prepare",
        excerpt().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("tokenizer gpt2"), "{stdout}");
    let shards: Vec<Shard> = ["train", "valid", "test"]
        .iter()
        .map(|s| Shard::open(&out.join(format!("{s}.bin"))).unwrap())
        .collect();
    let docs: Vec<u64> = shards.iter().map(|s| s.header().documents).collect();
    assert_eq!(
        docs.iter().sum::<u64>(),
        29,
        "7 books + 22 speeches (2000–2021)"
    );
    assert!(
        docs[1] >= 1 && docs[2] >= 1,
        "validation and test hold whole documents: {docs:?}"
    );
    let train = &shards[0];
    assert!(train.len() > 300_000, "{}", train.len());
    // Every document ends with EOS, and the split is reproducible.
    assert_eq!(train.get(train.len() - 1), Some(50256));
    let eos = (0..train.len())
        .filter(|&i| train.get(i) == Some(50256))
        .count() as u64;
    assert_eq!(eos, train.header().documents);
    let again = scratch("excerpt-again");
    let (code, _, _) = did(&[
        "data",
        "prepare",
        excerpt().to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    for s in ["train", "valid", "test"] {
        assert_eq!(
            std::fs::read(out.join(format!("{s}.bin"))).unwrap(),
            std::fs::read(again.join(format!("{s}.bin"))).unwrap()
        );
    }
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&again);
}

#[test]
fn archives_are_read_in_place_and_bytes_tokenizer_works() {
    let dir = scratch("archive");
    let tgz = dir.join("corpus.tgz");
    {
        let file = std::fs::File::create(&tgz).unwrap();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::default(),
        ));
        for (name, text) in [
            ("package/a.txt", "first document\r\n"),
            ("package/b.txt", "second\n"),
            ("package/skip.js", "code"),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, text.as_bytes())
                .unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap();
    }
    let out = dir.join("out");
    let (code, stdout, err) = did(&[
        "data",
        "prepare",
        tgz.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--tokenizer",
        "bytes",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("tokenizer bytes"), "{stdout}");
    let train = Shard::open(&out.join("train.bin")).unwrap();
    assert_eq!(
        train.header().documents,
        2,
        "the .js file is skipped; two documents are too few to hold any out"
    );
    let text: Vec<u32> = (0..train.len()).map(|i| train.get(i).unwrap()).collect();
    let expect: Vec<u32> = "first document\n"
        .bytes()
        .map(u32::from)
        .chain([256])
        .chain("second\n".bytes().map(u32::from))
        .chain([256])
        .collect();
    assert_eq!(text, expect, "CRLF became LF, one EOS after each document");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_corpora_name_the_cause() {
    let dir = scratch("bad");
    let out = dir.join("out");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let garbage = dir.join("garbage.txt");
    std::fs::write(
        &garbage,
        (0..4096u32)
            .map(|i| (i * 7 % 32) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let not_gz = dir.join("fake.tgz");
    std::fs::write(&not_gz, b"not gzip at all").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![dir.join("missing").display().to_string()],
            "cannot be read",
        ),
        (vec![empty.display().to_string()], "no text found"),
        (vec![garbage.display().to_string()], "looks binary"),
        (vec![not_gz.display().to_string()], "not a readable archive"),
    ];
    for (inputs, want) in cases {
        let mut args = vec!["data".to_string(), "prepare".into()];
        args.extend(inputs);
        args.extend(["--out".into(), out.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = did(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (code, _, err) = did(&[
        "data",
        "prepare",
        excerpt().to_str().unwrap(),
        "--tokenizer",
        "sentencepiece",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown tokenizer"), "{err}");
    let (code, _, err) = did(&[
        "data",
        "prepare",
        excerpt().to_str().unwrap(),
        "--valid-fraction",
        "0.7",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--valid-fraction"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_lines_are_one_document_per_line_with_a_named_field() {
    let dir = scratch("jsonl");
    let folder = dir.join("corpus");
    std::fs::create_dir_all(&folder).unwrap();
    // 30 documents: enough for every split to get some.
    let line = |i: usize, field: &str| {
        format!("{{\"{field}\": \"Document {i}.\\r\\nIt has two lines, \\u00e9 and all.\", \"id\": {i}}}\n")
    };
    let text: String = (0..30).map(|i| line(i, "text")).collect();
    std::fs::write(folder.join("part-0.jsonl"), &text).unwrap();
    let out = dir.join("out");
    let (code, stdout, err) = did(&[
        "data",
        "prepare",
        folder.to_str().unwrap(),
        "--tokenizer",
        "bytes",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let docs: u64 = ["train", "valid", "test"]
        .iter()
        .map(|s| {
            Shard::open(&out.join(format!("{s}.bin")))
                .unwrap()
                .header()
                .documents
        })
        .sum();
    assert_eq!(docs, 30, "{stdout}");
    // Another field name, given with --jsonl-field; a missing one names the line and the flag.
    let other = dir.join("body.jsonl");
    std::fs::write(&other, (0..30).map(|i| line(i, "body")).collect::<String>()).unwrap();
    let out2 = dir.join("out2");
    let (code, _, err) = did(&[
        "data",
        "prepare",
        other.to_str().unwrap(),
        "--jsonl-field",
        "body",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = did(&[
        "data",
        "prepare",
        other.to_str().unwrap(),
        "--out",
        dir.join("out3").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("line 1") && err.contains("--text-field"),
        "{err}"
    );
    std::fs::write(&other, "{\"text\": \"ok\"}\nnot json\n").unwrap();
    let (code, _, err) = did(&[
        "data",
        "prepare",
        other.to_str().unwrap(),
        "--out",
        dir.join("out4").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("line 2") && err.contains("not JSON"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn corpora() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpora")
}

/// Documents and tokens per split after `did data prepare INPUT --tokenizer bytes`.
fn prepare_bytes(input: &Path, out: &Path, extra: &[&str]) -> Result<Vec<(u64, usize)>, String> {
    let mut args = vec![
        "data",
        "prepare",
        input.to_str().unwrap(),
        "--tokenizer",
        "bytes",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let (code, _, err) = did(&args);
    if code != 0 {
        return Err(err);
    }
    Ok(["train", "valid", "test"]
        .iter()
        .map(|s| {
            let shard = Shard::open(&out.join(format!("{s}.bin"))).unwrap();
            (shard.header().documents, shard.len())
        })
        .collect())
}

/// The committed samples (scripts/make-corpus-fixtures.py): the same six
/// paragraphs as JSON lines and as a snappy Parquet file of three row groups
/// (plus a null row), and six more in OpenWebText's nested .tar.xz of .xz tars.
#[test]
fn json_lines_parquet_and_openwebtexts_tar_xz_are_read() {
    let dir = scratch("formats");
    let total = |v: &[(u64, usize)]| v.iter().fold((0, 0), |(d, t), &(dd, tt)| (d + dd, t + tt));
    let jsonl = prepare_bytes(&corpora().join("sample.jsonl"), &dir.join("jsonl"), &[]).unwrap();
    let parquet =
        prepare_bytes(&corpora().join("sample.parquet"), &dir.join("parquet"), &[]).unwrap();
    assert_eq!(total(&jsonl).0, 6);
    assert_eq!(
        total(&parquet),
        total(&jsonl),
        "the same paragraphs, the same tokens; the null row is skipped"
    );
    let owt = corpora().join("openwebtext-mini.tar.xz");
    let docs = did_engine::data::documents::collect(std::slice::from_ref(&owt)).unwrap();
    assert_eq!(docs.len(), 6);
    assert!(
        docs[0].name.ends_with(
            "openwebtext-mini.tar.xz:openwebtext/urlsf_subset00-1_data.xz:0000000-0.txt"
        ),
        "{}",
        docs[0].name
    );
    assert_eq!(
        total(&prepare_bytes(&owt, &dir.join("owt"), &[]).unwrap()).0,
        6
    );

    // A gzip-compressed text file is one document.
    let gz = dir.join("speech.txt.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    std::io::Write::write_all(&mut enc, b"One document,\r\ncompressed.").unwrap();
    enc.finish().unwrap();
    let docs = did_engine::data::documents::collect(&[gz]).unwrap();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].text, "One document,\ncompressed.");

    // A missing Parquet column names the columns there are and the flag.
    let err = prepare_bytes(
        &corpora().join("sample.parquet"),
        &dir.join("bad"),
        &["--text-field", "body"],
    )
    .unwrap_err();
    assert!(
        err.contains("no column \"body\"")
            && err.contains("id, text")
            && err.contains("--text-field"),
        "{err}"
    );
    // Corrupt Parquet files (found by fuzzing; the parquet crate asserts on
    // them) are errors that name the file.
    for crash in [
        "regression-negative-column-start",
        "regression-dictionary-decoder",
    ] {
        let bad = dir.join(format!("{crash}.parquet"));
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/corpus/corpus_parquet")
                .join(crash),
            &bad,
        )
        .unwrap();
        let err = prepare_bytes(&bad, &dir.join("bad"), &[]).unwrap_err();
        assert!(
            err.contains(&format!("{crash}.parquet is not a readable Parquet file")),
            "{err}"
        );
    }
    // A truncated .xz is an error naming the file, and writes nothing.
    let cut = dir.join("cut.tar.xz");
    let bytes = std::fs::read(&owt).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = prepare_bytes(&cut, &dir.join("cut"), &[]).unwrap_err();
    assert!(err.contains("cut.tar.xz"), "{err}");
    assert!(!dir.join("cut/train.bin").exists() && !dir.join("cut/train.bin.tmp").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
