//! The adaptive-sampling goal (issue #27): a plan with parallel update rules or adaptive
//! remasking that matches the fixed `4,L:0.25` plan's quality at a fraction of its NFE.
//!
//! "Matches" is judged on the seeds' means and spreads: under both judges the plan's
//! perplexity is no worse than the reference's by more than the two spreads together, and its
//! sample entropy is within 0.05 nats of the reference's (a plan must not buy perplexity with
//! less diverse text). Better perplexity at equal entropy matches.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::results::{Experiment, Results, Stat};

/// The plan every adaptive plan is compared with: the paper's, first-hitting throughout.
pub const REFERENCE_PLAN: &str = "4,L:0.25";
/// How far a plan's entropy may move from the reference's, in nats.
pub const ENTROPY_TOLERANCE: f64 = 0.05;
/// The goal: at most this fraction of the reference's NFE.
pub const GOAL_NFE_RATIO: f64 = 0.5;
/// The stretch goal.
pub const STRETCH_NFE_RATIO: f64 = 1.0 / 3.0;

/// The families whose fronts the report draws, in legend order.
pub const FAMILIES: [&str; 7] = [
    "fixed plans (first-hitting, fixed γ)",
    "confidence threshold in the draft",
    "entropy bound in the draft",
    "k per call in the draft",
    "parallel rule in the refine only",
    "parallel rules in both stages",
    "adaptive remask (below:c)",
];

/// The family of a stage plan: where its parallel rules act, or whether it remasks adaptively.
///
/// ```
/// use did_report::adaptive::{family, FAMILIES};
/// assert_eq!(family("4,L:0.25"), FAMILIES[0]);
/// assert_eq!(family("4@entropy:0.5"), FAMILIES[2]);
/// assert_eq!(family("4,L:0.25@threshold:0.9"), FAMILIES[4]);
/// assert_eq!(family("4@topk:2,L:0.25@entropy:1"), FAMILIES[5]);
/// assert_eq!(family("4,L:below:0.1"), FAMILIES[6]);
/// ```
pub fn family(stages: &str) -> &'static str {
    if stages.contains("below:") {
        return FAMILIES[6];
    }
    let mut parts = stages.split(',');
    let draft = parts.next().unwrap_or("");
    let refine_rule = parts.any(|p| p.contains('@'));
    match (draft.split_once('@').map(|(_, r)| r), refine_rule) {
        (None, false) => FAMILIES[0],
        (None, true) => FAMILIES[4],
        (Some(_), true) => FAMILIES[5],
        (Some(r), false) if r.starts_with("threshold") => FAMILIES[1],
        (Some(r), false) if r.starts_with("entropy") => FAMILIES[2],
        (Some(_), false) => FAMILIES[3],
    }
}

/// One plan against the reference of its model.
#[derive(Debug, Clone, PartialEq)]
pub struct GoalRow {
    /// The experiment.
    pub name: String,
    /// Its stage plan.
    pub stages: String,
    /// Its NFE over the reference's.
    pub nfe_ratio: f64,
    /// Its wall time per sample over the reference's (fastest seeds).
    pub time_ratio: f64,
    /// Causal judge, word judge: no worse than the reference beyond the spreads.
    pub judges_match: [bool; 2],
    /// Entropy minus the reference's (nats).
    pub entropy_shift: f64,
}

impl GoalRow {
    /// Equal quality under both judges and in entropy.
    pub fn matches(&self) -> bool {
        self.judges_match.iter().all(|&m| m) && self.entropy_shift.abs() <= ENTROPY_TOLERANCE
    }
}

fn no_worse(plan: Stat, reference: Stat) -> bool {
    plan.mean <= reference.mean + plan.std + reference.std
}

/// The reference experiment of `model`: the one sampled with [`REFERENCE_PLAN`] and snapshot
/// remasking.
pub fn reference_of<'a>(results: &'a Results, model: &str) -> Option<&'a Experiment> {
    results.experiments.values().find(|e| {
        e.model == model
            && e.stages.as_deref() == Some(REFERENCE_PLAN)
            && e.remask.as_deref().is_none_or(|r| r == "snapshot")
    })
}

/// Every other diffusion plan of the reference's model, cheapest first.
pub fn goal_rows(results: &Results, reference: &Experiment) -> Vec<GoalRow> {
    let judge = |e: &Experiment| [e.stat(|r| r.gen_ppl), e.stat(|r| r.word_ppl_charged)];
    let base = judge(reference);
    let base_nfe = reference.stat(|r| r.nfe).mean;
    let base_entropy = reference.stat(|r| r.entropy).mean;
    let base_time = reference.fastest_seconds_per_sample();
    let mut rows: Vec<GoalRow> = results
        .experiments
        .values()
        .filter(|e| e.model == reference.model && e.name != reference.name)
        .filter(|e| e.remask.as_deref().is_none_or(|r| r == "snapshot"))
        .filter_map(|e| {
            let stages = e.stages.clone()?;
            let j = judge(e);
            Some(GoalRow {
                name: e.name.clone(),
                stages,
                nfe_ratio: e.stat(|r| r.nfe).mean / base_nfe,
                time_ratio: e.fastest_seconds_per_sample() / base_time,
                judges_match: [no_worse(j[0], base[0]), no_worse(j[1], base[1])],
                entropy_shift: e.stat(|r| r.entropy).mean - base_entropy,
            })
        })
        .collect();
    rows.sort_by(|a, b| a.nfe_ratio.total_cmp(&b.nfe_ratio));
    rows
}

/// The verdict in one sentence.
pub fn verdict(rows: &[GoalRow]) -> String {
    let best = rows
        .iter()
        .filter(|r| r.matches())
        .min_by(|a, b| a.nfe_ratio.total_cmp(&b.nfe_ratio));
    match best {
        Some(r) if r.nfe_ratio <= STRETCH_NFE_RATIO => format!(
            "**Goal and stretch goal met**: `{}` matches the fixed plan at {:.2}× its NFE (≤ ⅓).",
            r.stages, r.nfe_ratio
        ),
        Some(r) if r.nfe_ratio <= GOAL_NFE_RATIO => format!(
            "**Goal met** (stretch goal missed): `{}` matches the fixed plan at {:.2}× its NFE (≤ ½; ⅓ not reached).",
            r.stages, r.nfe_ratio
        ),
        Some(r) => format!(
            "**Goal missed**: the cheapest plan of equal quality, `{}`, needs {:.2}× the fixed plan's NFE (goal ≤ 0.5).",
            r.stages, r.nfe_ratio
        ),
        None => "**Goal missed**: no plan matched the fixed plan's quality under both judges with entropy within 0.05 nats."
            .to_string(),
    }
}

fn tick(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "**no**"
    }
}

/// The section of the report: per model with a reference, the verdict and every plan's row.
pub fn markdown(results: &Results) -> String {
    let mut md = String::new();
    let mut models: Vec<&str> = results
        .experiments
        .values()
        .map(|e| e.model.as_str())
        .collect();
    models.sort_unstable();
    models.dedup();
    for model in models {
        let Some(reference) = reference_of(results, model) else {
            continue;
        };
        let rows = goal_rows(results, reference);
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            md,
            "**Model `{model}`**, against `{}` (`{REFERENCE_PLAN}`, NFE {:.1}). {}\n",
            reference.name,
            reference.stat(|r| r.nfe).mean,
            verdict(&rows)
        );
        let _ = writeln!(
            md,
            "| plan | experiment | NFE ÷ fixed | time ÷ fixed | causal judge no worse | word judge no worse | entropy shift (nats) | equal quality |\n\
             |---|---|---:|---:|---|---|---:|---|"
        );
        for r in &rows {
            let _ = writeln!(
                md,
                "| `{}` | `{}` | {:.2} | {:.2} | {} | {} | {:+.3} | {} |",
                r.stages,
                r.name,
                r.nfe_ratio,
                r.time_ratio,
                tick(r.judges_match[0]),
                tick(r.judges_match[1]),
                r.entropy_shift,
                tick(r.matches())
            );
        }
        let _ = writeln!(md);
    }
    md
}

/// The same as JSON: per model, the verdict and the rows.
pub fn json(results: &Results) -> Value {
    let mut out = serde_json::Map::new();
    for e in results.experiments.values() {
        if out.contains_key(&e.model) {
            continue;
        }
        let Some(reference) = reference_of(results, &e.model) else {
            continue;
        };
        let rows = goal_rows(results, reference);
        out.insert(
            e.model.clone(),
            json!({
                "reference": reference.name,
                "verdict": verdict(&rows),
                "plans": rows.iter().map(|r| json!({
                    "experiment": r.name, "stages": r.stages, "nfe_ratio": r.nfe_ratio,
                    "time_ratio": r.time_ratio, "causal_judge_no_worse": r.judges_match[0],
                    "word_judge_no_worse": r.judges_match[1], "entropy_shift": r.entropy_shift,
                    "equal_quality": r.matches(),
                })).collect::<Vec<_>>(),
            }),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::SeedRun;

    fn run(seed: u64, ppl: f64, entropy: f64, nfe: f64) -> SeedRun {
        SeedRun {
            seed,
            samples: 4,
            gen_ppl: ppl,
            gen_ppl_token_weighted: ppl,
            word_ppl_charged: ppl * 10.0,
            word_ppl_pooled: ppl,
            oov_rate: 0.0,
            entropy,
            nfe,
            seconds_per_sample: nfe / 100.0,
            regenerated: 0,
            regen_threshold: 0.0,
            first_text: None,
        }
    }

    fn experiment(name: &str, stages: &str, runs: Vec<SeedRun>) -> Experiment {
        Experiment {
            name: name.into(),
            model: "mix".into(),
            stages: Some(stages.into()),
            remask: Some("snapshot".into()),
            runs,
        }
    }

    #[test]
    fn the_cheapest_plan_of_equal_quality_decides() {
        let mut r = Results::default();
        let add = |r: &mut Results, e: Experiment| {
            r.experiments.insert(e.name.clone(), e);
        };
        add(
            &mut r,
            experiment(
                "mix.snapshot",
                "4,L:0.25",
                vec![run(1, 10.0, 4.0, 158.0), run(2, 12.0, 4.0, 158.0)],
            ),
        );
        // Within the spreads, at 0.4× the calls: meets the goal, not the stretch.
        add(
            &mut r,
            experiment(
                "mix.a",
                "4@entropy:1,L:0.25@entropy:1",
                vec![run(1, 12.0, 4.02, 63.0), run(2, 13.0, 4.03, 63.0)],
            ),
        );
        // Cheaper, but its entropy fell by 0.2: not equal quality.
        add(
            &mut r,
            experiment(
                "mix.b",
                "4@topk:4",
                vec![run(1, 5.0, 3.8, 40.0), run(2, 5.0, 3.8, 40.0)],
            ),
        );
        // Cheaper, entropy fine, perplexity far worse.
        add(
            &mut r,
            experiment(
                "mix.c",
                "4@topk:3",
                vec![run(1, 30.0, 4.0, 50.0), run(2, 31.0, 4.0, 50.0)],
            ),
        );
        let reference = reference_of(&r, "mix").unwrap();
        let rows = goal_rows(&r, reference);
        assert_eq!(
            rows.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["mix.b", "mix.c", "mix.a"]
        );
        assert!(!rows[0].matches() && !rows[1].matches() && rows[2].matches());
        assert!(
            verdict(&rows).starts_with("**Goal met** (stretch goal missed)"),
            "{}",
            verdict(&rows)
        );
        assert!(markdown(&r).contains("| `4@topk:4` | `mix.b` | 0.25 |"));
        assert_eq!(json(&r)["mix"]["plans"][2]["equal_quality"], true);
    }
}
