//! `did-report`: turns the results folder of `scripts/reproduce.sh` into
//! `docs/results/`: `README.md` (tables, the paper's claims with ours, plots,
//! the hand-written discussion), `results.json` (every number, with the
//! commit, machine and seeds) and the figures as SVG and PNG.

pub mod adaptive;
pub mod claims;
#[cfg(feature = "plots")]
pub mod plots;
pub mod results;

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use claims::{nelbo_claims, sample_claims};
use results::{Results, Stat};

/// Where and how the results were made.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    /// `git rev-parse HEAD` (with `-dirty` when the tree had changes).
    pub commit: String,
    /// The machine, in words.
    pub machine: String,
    /// The script's settings (`settings.json` in the results folder).
    pub settings: Value,
}

fn pm(s: Stat) -> String {
    if !s.mean.is_finite() {
        return "–".into();
    }
    let digits = if s.mean.abs() >= 1000.0 {
        0
    } else if s.mean.abs() >= 10.0 {
        1
    } else {
        2
    };
    if s.n > 1 {
        format!("{:.*} ± {:.*}", digits, s.mean, digits, s.std)
    } else {
        format!("{:.*}", digits, s.mean)
    }
}

fn holds(h: Option<bool>) -> &'static str {
    match h {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}

/// What each model is, for the tables.
fn describe_model(name: &str) -> &'static str {
    match name {
        "mdlm" => "MDLM pre-train (block = L), from scratch",
        "bd3-4" => "BD3 block 4, fine-tuned from `mdlm`",
        "mix" => "mix-scale (4 : 0.9, L : 0.1), fine-tuned from `mdlm`",
        "ar" => "causal (GPT-2 layout), from scratch; also the judge",
        _ => "",
    }
}

/// Every number of the report as JSON.
pub fn results_json(results: &Results, prov: &Provenance) -> Value {
    let stat = |s: Stat| json!({"mean": s.mean, "spread": s.std, "seeds": s.n});
    let experiments: Vec<Value> = results
        .experiments
        .values()
        .map(|e| {
            json!({
                "name": e.name,
                "model": e.model,
                "stages": e.stages,
                "remask": e.remask,
                "causal_judge_ppl": stat(e.stat(|r| r.gen_ppl)),
                "causal_judge_ppl_token_weighted": stat(e.stat(|r| r.gen_ppl_token_weighted)),
                "word_ppl_oov_charged": stat(e.stat(|r| r.word_ppl_charged)),
                "word_ppl_oov_skipped": stat(e.stat(|r| r.word_ppl_pooled)),
                "oov_rate": stat(e.stat(|r| r.oov_rate)),
                "entropy": stat(e.stat(|r| r.entropy)),
                "nfe": stat(e.stat(|r| r.nfe)),
                "seconds_per_sample": stat(e.stat(|r| r.seconds_per_sample)),
                "seconds_per_sample_fastest_seed": e.fastest_seconds_per_sample(),
                "per_seed": e.runs.iter().map(|r| json!({
                    "seed": r.seed,
                    "samples": r.samples,
                    "causal_judge_ppl": r.gen_ppl,
                    "causal_judge_ppl_token_weighted": r.gen_ppl_token_weighted,
                    "word_ppl_oov_charged": r.word_ppl_charged,
                    "word_ppl_oov_skipped": r.word_ppl_pooled,
                    "oov_rate": r.oov_rate,
                    "entropy": r.entropy,
                    "nfe": r.nfe,
                    "seconds_per_sample": r.seconds_per_sample,
                    "regenerated": r.regenerated,
                    "regen_threshold": r.regen_threshold,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let claims: Vec<Value> = sample_claims(results)
        .into_iter()
        .map(|c| {
            json!({
                "claim": c.claim, "paper": c.paper,
                "ours_causal_judge": c.ours[0], "holds_causal_judge": c.holds[0],
                "ours_word_judge": c.ours[1], "holds_word_judge": c.holds[1],
            })
        })
        .chain(nelbo_claims(results).into_iter().map(|c| {
            json!({"claim": c.claim, "paper": c.paper, "ours_nelbo": c.ours, "holds_nelbo": c.holds})
        }))
        .collect();
    let seeds: std::collections::BTreeSet<u64> = results
        .experiments
        .values()
        .flat_map(|e| e.runs.iter().map(|r| r.seed))
        .collect();
    json!({
        "commit": prov.commit,
        "machine": prov.machine,
        "seeds": seeds,
        "settings": prov.settings,
        "models": results.models.values().map(|m| json!({
            "name": m.name,
            "what": describe_model(&m.name),
            "steps": m.loss.last().map(|l| l.0),
            "final_train_loss_mean_last_20": Stat::of(&m.loss.iter().rev().take(20).map(|l| l.1).collect::<Vec<_>>()).mean,
            "final_valid_loss": m.valid_loss.last().map(|l| l.1),
            "tokens_per_s": m.tokens_per_s,
            "wall_seconds": m.wall_seconds,
        })).collect::<Vec<_>>(),
        "nelbo": results.nelbo.iter().map(|r| json!({
            "model": r.model, "block": r.block, "nll_per_token": r.nll_per_token,
            "perplexity": r.perplexity, "tokens": r.tokens,
        })).collect::<Vec<_>>(),
        "experiments": experiments,
        "claims": claims,
        "adaptive_goal": adaptive::json(results),
    })
}

/// The report's markdown (the discussion appended as given).
pub fn markdown(results: &Results, prov: &Provenance, discussion: Option<&str>) -> String {
    let mut md = String::new();
    let s = &prov.settings;
    let get = |k: &str| {
        s.get(k).map_or("?".to_string(), |v| {
            v.to_string().trim_matches('"').to_string()
        })
    };
    let _ = writeln!(
        md,
        "# Diffusion in Diffusion, reproduced at our scale\n\n\
         *Generated by `scripts/reproduce.sh` (`did-report`); do not edit by hand — the discussion at the end is \
         [`discussion.md`](discussion.md). Every number is in [`results.json`](results.json).*\n\n\
         - **Commit** `{}`; **machine**: {}; **backend** {}.\n\
         - **Models**: all `tiny` (4 layers × 256, 4 heads, MLP 1024; GPT-2 vocabulary 50,258; {} parameters for the DiT), \
         length {}, batch {}, trained on the full default corpus (`scripts/fetch-corpus.sh`, GPT-2 tokens, 5.08 M training tokens). \
         Budget: pre-train {} steps; each fine-tune {} steps; AR {} steps (= pre-train + one fine-tune).\n\
         - **Sampling**: {} samples per experiment and seed, seeds {}, nucleus p = 0.9, first-hitting sampler, KV-cached draft; \
         degenerate samples (unigram entropy below {} nats) regenerated as BD3-LM does.\n\
         - **Judges**: the `ar` model (token perplexity of the retokenised samples, BD3-LM's protocol) and CMU's en-us word \
         trigram model (nobody here trained it; OOV words charged the rarest word's probability). Entropy is the samples' unigram \
         token entropy (nats). Mean ± spread = mean and sample standard deviation over seeds.\n",
        prov.commit,
        prov.machine,
        get("backend"),
        get("dit_parameters"),
        get("length"),
        get("batch"),
        get("pretrain_steps"),
        get("finetune_steps"),
        get("ar_steps"),
        get("samples"),
        get("seeds"),
        get("regen_threshold"),
    );

    // Claims first: the point of the exercise.
    let _ = writeln!(md, "## The paper's claims, and ours\n");
    let _ = writeln!(
        md,
        "The paper's figures are gen PPL under GPT-2 Large at 110 M parameters and L = 1024 (docs/paper.md §4); ours are \
         orders of magnitude smaller, so only the **direction** of each claim is compared.\n"
    );
    let _ = writeln!(
        md,
        "| claim | paper | ours: causal judge | holds | ours: word trigram judge | holds |\n|---|---|---|---|---|---|"
    );
    for c in sample_claims(results) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            c.claim,
            c.paper,
            c.ours[0],
            holds(c.holds[0]),
            c.ours[1],
            holds(c.holds[1])
        );
    }
    let _ = writeln!(
        md,
        "\n| likelihood claim (validation) | BD3-LM | ours | holds |\n|---|---|---|---|"
    );
    for c in nelbo_claims(results) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            c.claim,
            c.paper,
            c.ours,
            holds(c.holds)
        );
    }

    let goal = adaptive::markdown(results);
    if !goal.is_empty() {
        let _ = writeln!(
            md,
            "\n## Adaptive sampling: the fixed plan's quality at fewer model calls\n"
        );
        let _ = writeln!(md, "{}\n\n{goal}", adaptive_preamble("../sampling.md"));
        md.push_str(&fronts_links(results));
    }

    let _ = writeln!(md, "\n## Samples: every experiment\n");
    md.push_str(&experiments_table(results));
    let _ = writeln!(md, "![NFE against perplexity](pareto-nfe.png)\n\n![wall time against perplexity](pareto-time.png)\n\n![remask ratio](gamma.png)\n");
    let _ = writeln!(md, "SVG versions: [pareto-nfe.svg](pareto-nfe.svg), [pareto-time.svg](pareto-time.svg), [gamma.svg](gamma.svg), [training.svg](training.svg).\n");
    md.push_str(&reproduction_tail(results, discussion));
    md
}

/// What the adaptive section measures, in words.
/// `sampling` is the path of docs/sampling.md from the page.
fn adaptive_preamble(sampling: &str) -> String {
    format!("Every plan of a model against its fixed `4,L:0.25` plan (first-hitting in both stages; the rules are described in \
     [docs/sampling.md]({sampling})). *No worse*: the plan's mean perplexity is at most the fixed plan's plus both \
     spreads over seeds. *Equal quality*: no worse under both judges, and entropy within 0.05 nats of the fixed plan's. \
     The goal is equal quality at ≤ ½ the NFE, the stretch goal ≤ ⅓.")
}

/// The table of every experiment, with the notes and plots under it.
fn experiments_table(results: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| experiment | model | stage plan | remask | causal judge PPL | word PPL (OOV charged) | word PPL (OOV skipped) | OOV % | entropy | NFE | s / sample (fastest seed) | regenerated | seeds |\n\
         |---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for e in results.experiments.values() {
        let _ = writeln!(
            md,
            "| `{}` | `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            e.name,
            e.model,
            e.stages
                .as_deref()
                .map_or("left to right".into(), |s| format!("`{s}`")),
            e.remask.as_deref().unwrap_or("–"),
            pm(e.stat(|r| r.gen_ppl)),
            pm(e.stat(|r| r.word_ppl_charged)),
            pm(e.stat(|r| r.word_ppl_pooled)),
            pm(e.stat(|r| 100.0 * r.oov_rate)),
            pm(e.stat(|r| r.entropy)),
            pm(e.stat(|r| r.nfe)),
            pm(Stat {
                mean: e.fastest_seconds_per_sample(),
                std: 0.0,
                n: 1
            }),
            e.runs.iter().map(|r| r.regenerated).sum::<u64>(),
            e.runs
                .iter()
                .map(|r| r.seed.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
    }

    let _ = writeln!(
        md,
        "\nNFE counts the model calls each sample took part in: what it costs alone (a batch shares each call, and \
         takes as many as its costliest sample). Wall time is the fastest seed's: \
         other work on the machine only adds time, and some seeds shared it. Regenerated: degenerate samples drawn again, \
         summed over seeds.\n"
    );
    md
}

/// The rest of the reproduction's page: NELBO, models, example samples, discussion.
fn reproduction_tail(results: &Results, discussion: Option<&str>) -> String {
    let mut md = String::new();

    let _ = writeln!(md, "## Validation NELBO perplexity\n");
    let mut blocks: Vec<usize> = results.nelbo.iter().filter_map(|r| r.block).collect();
    blocks.sort_unstable();
    blocks.dedup();
    let _ = write!(md, "| model |");
    for b in &blocks {
        let _ = write!(md, " block {b} |");
    }
    let _ = writeln!(md, " causal (exact) |");
    let _ = writeln!(md, "|---|{}---:|", "---:|".repeat(blocks.len()));
    let mut models: Vec<&str> = results.nelbo.iter().map(|r| r.model.as_str()).collect();
    models.dedup();
    for m in models {
        let _ = write!(md, "| `{m}` |");
        for b in blocks.iter().map(|b| Some(*b)).chain([None]) {
            let cell = results
                .nelbo
                .iter()
                .find(|r| r.model == m && r.block == b)
                .map_or("–".into(), |r| {
                    if b.is_some() {
                        format!("≤ {:.1}", r.perplexity)
                    } else {
                        format!("{:.1}", r.perplexity)
                    }
                });
            let _ = write!(md, " {cell} |");
        }
        let _ = writeln!(md);
    }
    let tokens = results.nelbo.first().map_or(0, |r| r.tokens);
    let _ = writeln!(
        md,
        "\nBD3-LM's evaluation (docs/bd3lm.md §5.1): the first {tokens} scored tokens of the validation split in windows of the \
         model's length, one diffusion time per (sequence, block) from the antithetic stratified sampler, unclipped linear \
         schedule; a bound, so lower is better and ≥ the true perplexity.\n"
    );

    let _ = writeln!(md, "## Models\n");
    let _ = writeln!(
        md,
        "| model | what | steps | tokens/s | training time | final training loss | final validation loss |\n|---|---|---:|---:|---:|---:|---:|"
    );
    for m in results.models.values() {
        let last: Vec<f64> = m.loss.iter().rev().take(20).map(|l| l.1).collect();
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {:.0} | {} | {:.3} | {} |",
            m.name,
            describe_model(&m.name),
            m.loss.last().map_or(0, |l| l.0),
            m.tokens_per_s,
            m.wall_seconds
                .map_or("–".into(), |s| format!("{:.1} min", s / 60.0)),
            Stat::of(&last).mean,
            m.valid_loss
                .last()
                .map_or("–".into(), |l| format!("{:.3}", l.1)),
        );
    }
    let _ = writeln!(md, "\n![training curves](training.png)\n");

    let examples = ["mix.draft", "mix.snapshot", "mix.random", "ar", "mdlm"];
    let _ = writeln!(md, "## What the samples look like (seed 1, sample 0)\n");
    for name in examples {
        if let Some(text) = results
            .experiments
            .get(name)
            .and_then(|e| e.runs.first())
            .and_then(|r| r.first_text.as_deref())
        {
            let quoted: String = text
                .chars()
                .take(600)
                .collect::<String>()
                .lines()
                .map(|l| format!("> {l}\n"))
                .collect();
            let _ = writeln!(md, "**`{name}`**\n\n{quoted}");
        }
    }
    if let Some(d) = discussion {
        let _ = writeln!(md, "{}", d.trim_end());
    }
    md
}

/// The page of a plan sweep (`scripts/adaptive-sweep.sh`): the adaptive goal, every plan, the fronts.
pub fn sweep_markdown(results: &Results, prov: &Provenance, title: &str) -> String {
    let mut md = String::new();
    let get = |k: &str| {
        prov.settings.get(k).map_or("?".to_string(), |v| {
            v.to_string().trim_matches('"').to_string()
        })
    };
    let _ = writeln!(
        md,
        "# {title}\n\n\
         *Generated by `scripts/adaptive-sweep.sh` (`did-report --sweep`); do not edit by hand. Every number is in \
         [`results.json`](results.json).*\n\n\
         - **Commit** `{}`; **machine**: {}; **backend** {}.\n\
         - **Model** `{}`, judged by `{}` (causal, token perplexity) and CMU's en-us word trigram model (OOV words charged \
         the rarest word's probability); {} samples per plan and seed, seeds {}, nucleus p = 0.9, length {}. Mean ± spread \
         = mean and sample standard deviation over seeds.\n",
        prov.commit,
        prov.machine,
        get("backend"),
        get("checkpoint"),
        get("judge"),
        get("samples"),
        get("seeds"),
        get("length"),
    );
    let goal = adaptive::markdown(results);
    if !goal.is_empty() {
        let _ = writeln!(
            md,
            "## The goal: the fixed plan's quality at fewer model calls\n"
        );
        let _ = writeln!(md, "{}\n\n{goal}", adaptive_preamble("../../sampling.md"));
        md.push_str(&fronts_links(results));
    }
    let _ = writeln!(md, "## Every plan\n");
    md.push_str(&experiments_table(results));
    let _ = writeln!(md, "![NFE against perplexity](pareto-nfe.png)\n\n![wall time against perplexity](pareto-time.png)\n");
    let _ = writeln!(
        md,
        "SVG versions: [pareto-nfe.svg](pareto-nfe.svg), [pareto-time.svg](pareto-time.svg).\n"
    );
    md
}

/// The fronts by family of every model that has a fixed-plan reference:
/// `fronts-MODEL-nfe` and `fronts-MODEL-time`.
#[cfg(feature = "plots")]
fn save_fronts(results: &Results, out: &Path) -> Result<(), String> {
    for model in fronts_models(results) {
        for (by_time, what) in [(false, "nfe"), (true, "time")] {
            let figure = plots::FrontsFigure::new(results, &model, by_time);
            plots::save(&figure, out, &format!("fronts-{model}-{what}"))?;
        }
    }
    Ok(())
}

/// The models whose plans the report draws fronts of (a fixed-plan reference and other plans).
fn fronts_models(results: &Results) -> Vec<String> {
    let mut models: Vec<String> = results
        .experiments
        .values()
        // A front needs plans to compare: the reference and at least two others.
        .filter(|e| {
            adaptive::reference_of(results, &e.model)
                .is_some_and(|r| adaptive::goal_rows(results, r).len() >= 2)
        })
        .map(|e| e.model.clone())
        .collect();
    models.sort();
    models.dedup();
    models
}

/// Links to the fronts figures, under the adaptive section.
fn fronts_links(results: &Results) -> String {
    let mut md = String::new();
    for model in fronts_models(results) {
        let _ = writeln!(
            md,
            "Fronts of `{model}`'s plans by family (each family's own Pareto front):\n\n\
             ![fronts by NFE](fronts-{model}-nfe.png)\n\n![fronts by wall time](fronts-{model}-time.png)\n"
        );
    }
    md
}

/// Reads a sweep's `results_dir` and writes its page (with `out/discussion.md` appended where
/// it exists), `results.json` and fronts into `out`.
pub fn write_sweep_report(
    results_dir: &Path,
    out: &Path,
    prov: &Provenance,
    title: &str,
) -> Result<Results, String> {
    let results = results::load(results_dir)?;
    if results.experiments.is_empty() {
        return Err(format!(
            "{} holds no samples/ JSON; run scripts/adaptive-sweep.sh first",
            results_dir.display()
        ));
    }
    write_outputs(&results, out, prov, |discussion| {
        let mut page = sweep_markdown(&results, prov, title);
        if let Some(d) = discussion {
            page.push_str(d.trim_end());
            page.push('\n');
        }
        page
    })?;
    Ok(results)
}

/// Reads `results_dir`, writes `README.md`, `results.json` and the figures into `out`.
pub fn write_report(results_dir: &Path, out: &Path, prov: &Provenance) -> Result<Results, String> {
    let results = results::load(results_dir)?;
    if results.experiments.is_empty() && results.nelbo.is_empty() {
        return Err(format!(
            "{} holds no results (no samples/ or nelbo/ JSON); run scripts/reproduce.sh first",
            results_dir.display()
        ));
    }
    #[cfg(feature = "plots")]
    {
        std::fs::create_dir_all(out)
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        plots::register_font()?;
        plots::save(&plots::gamma_figure(&results), out, "gamma")?;
        plots::save(&plots::training_figure(&results), out, "training")?;
    }
    write_outputs(&results, out, prov, |discussion| {
        markdown(&results, prov, discussion)
    })?;
    Ok(results)
}

/// What both pages write into `out`: the Pareto figures and fronts, `README.md` (from `page`,
/// given `out/discussion.md` where it exists) and `results.json`.
fn write_outputs(
    results: &Results,
    out: &Path,
    prov: &Provenance,
    page: impl FnOnce(Option<&str>) -> String,
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    #[cfg(feature = "plots")]
    {
        plots::register_font()?;
        plots::save(&plots::ParetoFigure::new(results, false), out, "pareto-nfe")?;
        plots::save(&plots::ParetoFigure::new(results, true), out, "pareto-time")?;
        save_fronts(results, out)?;
    }
    let discussion = std::fs::read_to_string(out.join("discussion.md")).ok();
    let write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write("README.md", page(discussion.as_deref()))?;
    let json =
        serde_json::to_string_pretty(&results_json(results, prov)).map_err(|e| e.to_string())?;
    write("results.json", json + "\n")
}
