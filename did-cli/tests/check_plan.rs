//! End-to-end: the `did` binary on good and bad stage plans.

mod common;
use common::did;

#[test]
fn a_good_plan_is_explained() {
    let (code, out, _) = did(&["check-plan", "4,L:0.25", "1024"]);
    assert_eq!(code, 0);
    assert!(out.contains("draft with blocks of 4"), "{out}");
    assert!(
        out.contains("remask 25% of drawn tokens, regenerate with blocks of 1024"),
        "{out}"
    );
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
