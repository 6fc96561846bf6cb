//! The whole report from a small results folder in the shape
//! `scripts/reproduce.sh` leaves (the JSON keys of `did eval`; that `did`
//! really writes them is checked in did-cli's tests with `read_seed_run`).

use std::path::{Path, PathBuf};

use serde_json::json;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("did-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(path: &Path, value: serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, value.to_string()).unwrap();
}

fn gen_ppl(model: &str, stages: &str, remask: &str, seed: u64, ppl: f64) -> serde_json::Value {
    json!({
        "metric": "gen-ppl",
        "source": format!("runs/reproduce/models/{model}/ckpt-00000150.safetensors"),
        "judge": "runs/reproduce/models/ar/ckpt-00000650.safetensors",
        "samples": 64, "stages": stages, "remask": remask, "seed": seed,
        "gen_ppl_mean_per_sample": ppl, "gen_ppl_token_weighted": ppl * 0.9,
        "entropy": 4.1, "nfe_mean": if stages.contains(':') { 159.0 } else { 127.0 },
        "samples_per_s": 4.0, "regenerated": 1, "regen_threshold": 3.5,
        "per_sample": [{"ppl": ppl, "entropy": 4.1, "targets": 120, "nfe": 127, "seconds": 0.25, "text": "The people of"}],
        "word_judge": {"word_ppl_oov_charged": ppl * 40.0, "word_ppl_pooled": ppl * 20.0, "oov_rate": 0.05},
        "seconds": 30.0,
    })
}

#[test]
fn a_results_folder_becomes_tables_claims_json_and_plots() {
    let dir = scratch("full");
    let results = dir.join("results");
    let experiments = [
        ("ar", "ar", "4,L:0.25", "snapshot", 30.0),
        ("mdlm", "mdlm", "L", "snapshot", 90.0),
        ("bd3-4.draft", "bd3-4", "4", "snapshot", 60.0),
        ("bd3-4.refine", "bd3-4", "4,L:0.25", "snapshot", 70.0),
        ("mix.draft", "mix", "4", "snapshot", 58.0),
        ("mix.snapshot", "mix", "4,L:0.25", "snapshot", 50.0),
        ("mix.posthoc", "mix", "4,L:0.25", "posthoc", 62.0),
        ("mix.random", "mix", "4,L:0.25", "random", 45.0),
    ];
    for seed in 1..=3u64 {
        for (name, model, stages, remask, ppl) in experiments {
            write(
                &results.join(format!("samples/{name}.seed-{seed}.json")),
                gen_ppl(model, stages, remask, seed, ppl + seed as f64),
            );
        }
    }
    for (model, block, nll) in [("mdlm", 128, 5.0), ("bd3-4", 4, 4.8), ("bd3-4", 128, 5.5)] {
        write(
            &results.join(format!("nelbo/{model}.block-{block}.json")),
            json!({"metric": "nelbo", "checkpoint": format!("x/models/{model}/ckpt-1.safetensors"),
                   "architecture": "Dit", "block_size": block, "tokens": 32512, "nll_per_token": nll}),
        );
    }
    write(
        &results.join("nelbo/ar.block-causal.json"),
        json!({"metric": "nelbo", "checkpoint": "x/models/ar/ckpt-1.safetensors",
               "architecture": "Gpt2", "block_size": 128, "tokens": 32512, "nll_per_token": 4.5}),
    );
    std::fs::create_dir_all(results.join("models/mix")).unwrap();
    std::fs::write(
        results.join("models/mix/metrics.jsonl"),
        (1..=30)
            .map(|s| {
                format!(
                    "{{\"step\":{s},\"loss\":{},\"tokens_per_s\":900.0{}}}\n",
                    8.0 - s as f64 * 0.05,
                    if s % 10 == 0 {
                        format!(",\"valid_loss\":{}", 8.2 - s as f64 * 0.05)
                    } else {
                        String::new()
                    }
                )
            })
            .collect::<String>(),
    )
    .unwrap();
    std::fs::write(results.join("models/mix/wall-seconds"), "300\n120\n").unwrap();

    let out = dir.join("docs");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("discussion.md"),
        "## Discussion\n\nHand-written.\n",
    )
    .unwrap();
    let prov = did_report::Provenance {
        commit: "abc123".into(),
        machine: "test machine".into(),
        settings: json!({"length": 128, "seeds": "1 2 3"}),
    };
    let r = did_report::write_report(&results, &out, &prov).unwrap();
    assert_eq!(r.experiments.len(), 8);
    assert_eq!(r.experiments["mix.snapshot"].runs.len(), 3);
    assert_eq!(
        r.experiments["ar"].stages, None,
        "a causal model has no stage plan"
    );
    assert_eq!(
        r.experiments["mix.draft"].remask, None,
        "a draft remasks nothing"
    );

    let md = std::fs::read_to_string(out.join("README.md")).unwrap();
    // Mean ± sample spread of 51, 52, 53.
    assert!(
        md.contains("| `mix.snapshot` | `mix` | `4,L:0.25` | snapshot | 52.0 ± 1.0 |"),
        "{md}"
    );
    // Snapshot improves on the draft (60 → 52), random does not get worse (60 → 47): reported as such.
    assert!(md.contains("| 60.0 → 52.0 | yes |"), "{md}");
    assert!(md.contains("| 60.0 → 47.0 | **no** |"), "{md}");
    assert!(md.contains("≤ 121.5 vs ≤ 148.4"), "NELBO claim: {md}");
    assert!(md.contains("Hand-written."));
    assert!(md.contains("**Commit** `abc123`"));
    assert!(md.contains("| `mix` | mix-scale"), "{md}");
    assert!(
        md.contains("7.0 min"),
        "wall seconds summed over resumed runs: {md}"
    );

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(v["seeds"], json!([1, 2, 3]));
    assert_eq!(v["machine"], "test machine");
    let snap = v["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "mix.snapshot")
        .unwrap();
    assert_eq!(snap["causal_judge_ppl"]["mean"], 52.0);
    assert_eq!(snap["per_seed"].as_array().unwrap().len(), 3);
    assert!(v["claims"].as_array().unwrap().len() >= 10);

    for stem in ["pareto-nfe", "pareto-time", "gamma", "training"] {
        let png = std::fs::read(out.join(format!("{stem}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png");
        let svg = std::fs::read_to_string(out.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<text"),
            "{stem}.svg"
        );
    }
    let svg = std::fs::read_to_string(out.join("pareto-nfe.svg")).unwrap();
    assert!(svg.contains("mix.snapshot"), "points are labelled");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_empty_results_folder_is_an_error_that_says_what_to_run() {
    let dir = scratch("empty");
    let err = did_report::write_report(&dir, &dir.join("out"), &did_report::Provenance::default())
        .unwrap_err();
    assert!(err.contains("scripts/reproduce.sh"), "{err}");
    std::fs::create_dir_all(dir.join("samples")).unwrap();
    std::fs::write(dir.join("samples/x.seed-1.json"), "{\"samples\": 3}").unwrap();
    let err = did_report::write_report(&dir, &dir.join("out"), &did_report::Provenance::default())
        .unwrap_err();
    assert!(
        err.contains("x.seed-1.json") && err.contains("rerun"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
