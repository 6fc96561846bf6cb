//! The paper's claims (docs/paper.md §3–§4, BD3-LM's tables for the
//! baselines), each with the paper's figures and a test of its *direction* on
//! ours: the scale differs by orders of magnitude, so only directions compare.

use crate::results::Results;

/// Which sample judge a figure is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    /// The causal model trained on the same split (token perplexity).
    Causal,
    /// CMU's word trigram model, OOV words charged (word perplexity).
    WordTrigram,
}

impl Judge {
    /// Both, in table order.
    pub const ALL: [Judge; 2] = [Judge::Causal, Judge::WordTrigram];

    /// The experiment's mean figure under this judge.
    pub fn mean(self, results: &Results, experiment: &str) -> Option<f64> {
        let e = results.experiments.get(experiment)?;
        let s = match self {
            Judge::Causal => e.stat(|r| r.gen_ppl),
            Judge::WordTrigram => e.stat(|r| r.word_ppl_charged),
        };
        s.mean.is_finite().then_some(s.mean)
    }
}

/// One claim checked on our results.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimCheck {
    /// The claim, in a line.
    pub claim: &'static str,
    /// The paper's figures.
    pub paper: &'static str,
    /// Our figures under each judge (empty where an experiment is missing).
    pub ours: [String; 2],
    /// Whether the direction holds under each judge (`None`: not measured).
    pub holds: [Option<bool>; 2],
}

fn f(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

type Check = fn(&dyn Fn(&str) -> Option<f64>) -> Option<(String, bool)>;

/// `a → b` and whether `b < a` (`better`) or `b > a`.
fn arrow(
    v: &dyn Fn(&str) -> Option<f64>,
    a: &str,
    b: &str,
    better: bool,
) -> Option<(String, bool)> {
    let (x, y) = (v(a)?, v(b)?);
    Some((
        format!("{} → {}", f(x), f(y)),
        if better { y < x } else { y > x },
    ))
}

const GAMMAS: [(&str, &str); 5] = [
    ("0.1", "mix.gamma-0.1"),
    ("0.25", "mix.snapshot"),
    ("0.5", "mix.gamma-0.5"),
    ("0.75", "mix.gamma-0.75"),
    ("1", "mix.gamma-1.0"),
];

/// Every diffusion experiment of `scripts/reproduce.sh`.
pub const DIFFUSION_EXPERIMENTS: [&str; 20] = [
    "mdlm",
    "mix-26.draft",
    "mix-26.snapshot",
    "mix-uniform.draft",
    "mix-uniform.snapshot",
    "bd3-4.draft",
    "bd3-4.refine",
    "mix.draft",
    "mix.snapshot",
    "mix.posthoc",
    "mix.random",
    "mix.snapshot-raw",
    "mix.snapshot-max",
    "mix.gamma-0.1",
    "mix.gamma-0.5",
    "mix.gamma-0.75",
    "mix.gamma-1.0",
    "mix.refine-16",
    "mix.refine-64",
    "mix.three-stage",
];

/// The sample-quality claims and their checks.
const SAMPLE_CLAIMS: [(&str, &str, Check); 13] = [
    (
        "Snapshot remask → global refine improves on the draft (mix-scale model, γ = 0.25)",
        "27.36 → 21.85",
        |v| arrow(v, "mix.draft", "mix.snapshot", true),
    ),
    (
        "Random remasking is worse than no refinement",
        "27.36 → 30.26",
        |v| arrow(v, "mix.draft", "mix.random", false),
    ),
    (
        "Post-hoc confidence remasking is worse than no refinement",
        "27.36 → 29.85",
        |v| arrow(v, "mix.draft", "mix.posthoc", false),
    ),
    (
        "Snapshot confidence is the best remasking strategy",
        "21.85 vs 29.85 (post-hoc), 30.26 (random)",
        |v| {
            let (s, p, r) = (v("mix.snapshot")?, v("mix.posthoc")?, v("mix.random")?);
            Some((
                format!("{} vs {} (post-hoc), {} (random)", f(s), f(p), f(r)),
                s < p && s < r,
            ))
        },
    ),
    (
        "A small-block-only model gets worse under global refinement",
        "27.95 → 31.97",
        |v| arrow(v, "bd3-4.draft", "bd3-4.refine", false),
    ),
    (
        "Mix-scale training drafts no worse than small-block-only training",
        "27.36 vs 27.95",
        |v| {
            let (m, b) = (v("mix.draft")?, v("bd3-4.draft")?);
            Some((format!("{} vs {}", f(m), f(b)), m <= b))
        },
    ),
    (
        "Under refinement, the mix-scale model beats the small-block-only one",
        "21.85 vs 31.97",
        |v| {
            let (m, b) = (v("mix.snapshot")?, v("bd3-4.refine")?);
            Some((format!("{} vs {}", f(m), f(b)), m < b))
        },
    ),
    (
        "Only a global refine block helps; small refine blocks do not improve on the draft",
        "no figures published",
        |v| {
            let (d, a, b, l) = (
                v("mix.draft")?,
                v("mix.refine-16")?,
                v("mix.refine-64")?,
                v("mix.snapshot")?,
            );
            Some((
                format!(
                    "draft {}; refine 16: {}, 64: {}, L: {}",
                    f(d),
                    f(a),
                    f(b),
                    f(l)
                ),
                l < d && a >= d && b >= d,
            ))
        },
    ),
    (
        "The remask ratio γ is U-shaped, best at 0.25–0.5, worst towards 1",
        "no figures published",
        |v| {
            let vals: Vec<(&str, f64)> = GAMMAS
                .iter()
                .map(|(g, e)| v(e).map(|x| (*g, x)))
                .collect::<Option<_>>()?;
            let best = vals.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1))?;
            let text = vals
                .iter()
                .map(|(g, x)| format!("{g}: {}", f(*x)))
                .collect::<Vec<_>>()
                .join(", ");
            // U: both ends worse than the best, and γ = 1 the worst of all.
            let worst = vals.iter().map(|v| v.1).fold(f64::NEG_INFINITY, f64::max);
            let ends_worse = vals[0].1 > best.1 && vals[4].1 > best.1 && vals[4].1 >= worst;
            Some((
                format!("{text} (best γ = {})", best.0),
                (best.0 == "0.25" || best.0 == "0.5") && ends_worse,
            ))
        },
    ),
    (
        "Mix-scale fine-tuning at 26 % of the block-4 budget still refines better than block-4 only",
        "21.85 (26 %) vs 31.97",
        |v| {
            let (m, b) = (v("mix-26.snapshot")?, v("bd3-4.refine")?);
            Some((format!("{} vs {}", f(m), f(b)), m < b))
        },
    ),
    (
        "A uniform spread of block sizes (4, 16, 64, L) drafts worse than the bimodal mix",
        "31.98 vs 27.36",
        |v| {
            let (u, m) = (v("mix-uniform.draft")?, v("mix.draft")?);
            Some((format!("{} vs {}", f(u), f(m)), u > m))
        },
    ),
    (
        "Block-4 drafting beats MDLM (BD3-LM's table)",
        "25.7 vs 46.8",
        |v| {
            let (b, m) = (v("bd3-4.draft")?, v("mdlm")?);
            Some((format!("{} vs {}", f(b), f(m)), b < m))
        },
    ),
    (
        "AR beats every diffusion sampler",
        "14.1 vs ≥ 21.9",
        |v| {
            let ar = v("ar")?;
            let best = DIFFUSION_EXPERIMENTS
                .iter()
                .filter_map(|e| v(e))
                .fold(f64::INFINITY, f64::min);
            best.is_finite()
                .then(|| (format!("{} vs ≥ {}", f(ar), f(best)), ar < best))
        },
    ),
];

/// Every sample-quality claim, checked under both judges.
pub fn sample_claims(results: &Results) -> Vec<ClaimCheck> {
    SAMPLE_CLAIMS
        .iter()
        .map(|(claim, paper, check)| {
            let mut ours = [String::new(), String::new()];
            let mut holds = [None, None];
            for (j, judge) in Judge::ALL.iter().enumerate() {
                let v = |e: &str| judge.mean(results, e);
                if let Some((text, ok)) = check(&v) {
                    ours[j] = text;
                    holds[j] = Some(ok);
                }
            }
            ClaimCheck {
                claim,
                paper,
                ours,
                holds,
            }
        })
        .collect()
}

/// A likelihood claim checked on the validation NELBO table.
#[derive(Debug, Clone, PartialEq)]
pub struct NelboClaim {
    /// The claim.
    pub claim: &'static str,
    /// BD3-LM's figures (OpenWebText, L = 1024).
    pub paper: &'static str,
    /// Ours.
    pub ours: String,
    /// Whether its direction holds.
    pub holds: Option<bool>,
}

/// The validation-perplexity claims of BD3-LM's Table (docs/bd3lm.md).
pub fn nelbo_claims(results: &Results) -> Vec<NelboClaim> {
    let ppl = |model: &str, block: Option<usize>| {
        results
            .nelbo
            .iter()
            .find(|r| r.model == model && r.block == block)
            .map(|r| r.perplexity)
    };
    let full = results
        .nelbo
        .iter()
        .filter(|r| r.model == "mdlm")
        .filter_map(|r| r.block)
        .max();
    let ar = ppl("ar", None);
    let bd3 = ppl("bd3-4", Some(4));
    let mdlm = full.and_then(|b| ppl("mdlm", Some(b)));
    let pair = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (format!("{} vs ≤ {}", f(a), f(b)), Some(a < b)),
        _ => (String::new(), None),
    };
    let (ours1, holds1) = pair(ar, bd3);
    let (ours2, holds2) = pair(bd3, mdlm);
    vec![
        NelboClaim {
            claim: "AR's perplexity is below the block-4 model's bound",
            paper: "17.54 vs ≤ 20.73",
            ours: ours1,
            holds: holds1,
        },
        NelboClaim {
            claim: "A block-4 model's bound is below MDLM's (block = L)",
            paper: "≤ 20.73 vs ≤ 22.98",
            ours: if ours2.is_empty() {
                ours2
            } else {
                format!("≤ {ours2}")
            },
            holds: holds2,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Experiment, SeedRun};

    fn with(values: &[(&str, f64)]) -> Results {
        let mut r = Results::default();
        for (name, v) in values {
            let run = SeedRun {
                seed: 1,
                samples: 1,
                gen_ppl: *v,
                gen_ppl_token_weighted: *v,
                word_ppl_charged: 2.0 * v,
                word_ppl_pooled: *v,
                oov_rate: 0.0,
                entropy: 4.0,
                nfe: 1.0,
                seconds_per_sample: 1.0,
                regenerated: 0,
                regen_threshold: 3.5,
                first_text: None,
            };
            r.experiments.insert(
                name.to_string(),
                Experiment {
                    name: name.to_string(),
                    model: String::new(),
                    stages: None,
                    remask: None,
                    runs: vec![run],
                },
            );
        }
        r
    }

    #[test]
    fn the_papers_own_figures_satisfy_its_claims() {
        // Feeding the paper's numbers through the checks: every claim with
        // published figures must come out as holding.
        let r = with(&[
            ("mix.draft", 27.36),
            ("mix.snapshot", 21.85),
            ("mix.random", 30.26),
            ("mix.posthoc", 29.85),
            ("bd3-4.draft", 27.95),
            ("bd3-4.refine", 31.97),
            ("mdlm", 46.8),
            ("ar", 14.1),
        ]);
        let claims = sample_claims(&r);
        let measured: Vec<_> = claims.iter().filter(|c| c.holds[0].is_some()).collect();
        assert_eq!(measured.len(), 9, "{claims:#?}");
        for c in measured {
            assert_eq!(c.holds, [Some(true), Some(true)], "{}", c.claim);
        }
    }

    #[test]
    fn a_reversed_result_is_reported_as_not_holding() {
        let r = with(&[("mix.draft", 20.0), ("mix.snapshot", 25.0)]);
        let c = &sample_claims(&r)[0];
        assert_eq!(c.holds, [Some(false), Some(false)]);
        assert_eq!(c.ours[0], "20.0 → 25.0");
        assert_eq!(c.ours[1], "40.0 → 50.0");
        // A claim whose experiments are missing is not measured, not failed.
        assert_eq!(sample_claims(&r)[1].holds, [None, None]);
    }

    #[test]
    fn refine_block_claim_needs_the_global_refine_to_help_and_local_ones_not_to() {
        let claim = |r: &Results| {
            sample_claims(r)
                .into_iter()
                .find(|c| c.claim.contains("global refine block"))
                .map(|c| c.holds[0])
        };
        let paper_like = with(&[
            ("mix.draft", 27.0),
            ("mix.refine-16", 28.0),
            ("mix.refine-64", 27.5),
            ("mix.snapshot", 22.0),
        ]);
        assert_eq!(claim(&paper_like), Some(Some(true)));
        // The global refine best of the three but still worse than the draft: no.
        let all_hurt = with(&[
            ("mix.draft", 20.0),
            ("mix.refine-16", 28.0),
            ("mix.refine-64", 27.5),
            ("mix.snapshot", 22.0),
        ]);
        assert_eq!(claim(&all_hurt), Some(Some(false)));
    }

    #[test]
    fn ar_claim_is_not_measured_without_a_diffusion_experiment() {
        let c = sample_claims(&with(&[("ar", 10.0)]))
            .into_iter()
            .find(|c| c.claim.starts_with("AR beats"))
            .map(|c| c.holds);
        assert_eq!(c, Some([None, None]));
    }

    #[test]
    fn gamma_claim_wants_an_interior_minimum() {
        let u = with(&[
            ("mix.gamma-0.1", 30.0),
            ("mix.snapshot", 25.0),
            ("mix.gamma-0.5", 26.0),
            ("mix.gamma-0.75", 28.0),
            ("mix.gamma-1.0", 40.0),
        ]);
        let gamma = |r: &Results| {
            sample_claims(r)
                .into_iter()
                .find(|c| c.claim.contains("U-shaped"))
                .map(|c| c.holds[0])
        };
        assert_eq!(gamma(&u), Some(Some(true)));
        let monotone = with(&[
            ("mix.gamma-0.1", 20.0),
            ("mix.snapshot", 25.0),
            ("mix.gamma-0.5", 26.0),
            ("mix.gamma-0.75", 28.0),
            ("mix.gamma-1.0", 40.0),
        ]);
        assert_eq!(gamma(&monotone), Some(Some(false)));
    }
}
