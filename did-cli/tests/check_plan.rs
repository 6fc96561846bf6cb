//! End-to-end: the `did` binary on good and bad stage plans.

mod common;
use common::did;

#[test]
fn a_good_plan_is_explained() {
    let (code, out, _) = did(&["check-plan", "4,L:0.25", "1024"]);
    assert_eq!(code, 0);
    assert!(out.contains("draft with blocks of 4"), "{out}");
    assert!(
        out.contains("remask the least confident 25% of the drawn tokens"),
        "{out}"
    );
    assert!(out.contains("regenerate them with blocks of 1024"), "{out}");
    assert!(out.contains("by the --sampler rule"), "{out}");
}

#[test]
fn an_adaptive_plan_is_explained_stage_by_stage() {
    let plan = "4@threshold:0.9,L:below:0.5:0.05..0.5@entropy:0.3";
    let (code, out, err) = did(&["check-plan", plan, "1024"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("keeps the draws surer than 0.9"), "{out}");
    assert!(
        out.contains("confidence is below 0.5, but at least 5% and at most 50%"),
        "{out}"
    );
    assert!(out.contains("sum to at most 0.3 nats"), "{out}");
    let (code, _, err) = did(&["check-plan", "4@threshold:1.5,L:0.25", "64"]);
    assert_eq!(code, 2);
    assert!(err.contains("τ = 1.5 must be in (0, 1]"), "{err}");
    let (code, _, err) = did(&["check-plan", "4,L:below:0.5:0.5..0.1", "64"]);
    assert_eq!(code, 2);
    assert!(err.contains("0 ≤ min ≤ max ≤ 1"), "{err}");
}

#[test]
fn bad_input_names_the_cause_and_exits_non_zero() {
    let (code, _, err) = did(&["check-plan", "4,1000:0.25", "1024"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("does not divide the sequence length 1024"),
        "{err}"
    );
    let (code, _, err) = did(&["check-plan", "4,L:0.25", "ten"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value 'ten' for '<LENGTH>'"), "{err}");
    let (code, _, err) = did(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unrecognized subcommand") && err.contains("Usage"),
        "{err}"
    );
}
