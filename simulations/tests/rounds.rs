//! The small rounds scenario as an ordinary test: the protocol's machines driven in virtual
//! time must finish the job, catch cheaters, and give the same output for the same seed.

use cohort_sim::rounds::{Scenario, run_scenario};

const SMALL: &str = include_str!("../scenarios/small.toml");

#[test]
fn small_scenario_runs_and_is_deterministic() {
    let scenario = Scenario::parse(SMALL).expect("small.toml parses");
    let a = run_scenario(&scenario).expect("runs");
    let b = run_scenario(&scenario).expect("runs again");
    // Same seed, same output (wall-clock columns aside).
    assert_eq!(a.runs_csv(false), b.runs_csv(false));
    assert_eq!(a.rounds_csv(false), b.rounds_csv(false));
    assert_eq!(a.shards_csv(), b.shards_csv());
    assert_eq!(a.shapley_csv(), b.shapley_csv());

    let defended = &a.runs[0];
    let undefended = &a.runs[1];
    assert_eq!(defended.finished.as_deref(), Some("merged"));
    assert_eq!(defended.rounds.len(), 3);
    for r in &defended.rounds {
        assert_eq!(r.outcome, "merged");
        // Honest updates are never rejected by the checks.
        assert_eq!(r.honest_rejected, 0, "round {}", r.round);
        assert!(
            r.loss_after < r.loss_before,
            "round {} did not improve",
            r.round
        );
    }
    // The leaver left in round 0.
    assert_eq!(defended.rounds[0].left, 1);
    // Spot checks at 50% per segment over all-faked updates catch nearly every cheat, and a
    // caught cheat is barred from the later rounds: only the ones not caught commit again.
    let adv: usize = defended.rounds.iter().map(|r| r.adversary_commits).sum();
    let caught: usize = defended.rounds.iter().map(|r| r.adversary_rejected).sum();
    assert!(adv >= 2 && caught * 4 >= adv * 3, "{caught} of {adv}");
    let (cheats0, caught0) = (
        defended.rounds[0].adversary_commits,
        defended.rounds[0].adversary_rejected,
    );
    assert!(caught0 >= 1, "round 0 caught nobody");
    let later: usize = defended.rounds[1..]
        .iter()
        .map(|r| r.adversary_commits)
        .sum();
    assert!(
        later <= (cheats0 - caught0) * 2,
        "{later} cheating commits after round 0, whose {caught0} of {cheats0} were caught"
    );
    // Without defences nothing is caught and the job ends worse.
    assert!(undefended.rounds.iter().all(|r| r.adversary_rejected == 0));
    assert!(undefended.final_loss > defended.final_loss);
    // Label-flipped shards trained honestly pass every spot check; Multi-Krum (f = 2) refuses
    // the two poisoned updates of each round, and only them, and the job ends better for it.
    let krum = &a.runs[2];
    let no_krum = &a.runs[3];
    assert_eq!(krum.finished.as_deref(), Some("merged"));
    for r in &krum.rounds {
        assert_eq!(r.outcome, "merged");
        assert_eq!(r.rejected_spot + r.rejected_norm, 0, "round {}", r.round);
        assert_eq!(r.rejected_outlier, 2, "round {}", r.round);
        assert_eq!(r.adversary_commits, 2, "round {}", r.round);
        assert_eq!(r.adversary_rejected, 2, "round {}", r.round);
        assert_eq!(r.honest_outliers, r.honest_rejected);
    }
    assert!(no_krum.rounds.iter().all(|r| r.adversary_rejected == 0));
    assert!(
        no_krum
            .rounds
            .iter()
            .map(|r| r.adversary_commits)
            .sum::<usize>()
            >= 5
    );
    assert!(krum.final_loss < no_krum.final_loss);
    // The closed-form Shapley values agree with the protocol's exact ones.
    assert!(a.shapley.iter().all(|s| s.closed_form_gap < 1e-9));
    // A different seed gives a different run.
    let mut other = scenario.clone();
    other.runs.truncate(1);
    other.runs[0].seed += 1;
    let c = run_scenario(&other).expect("runs");
    assert_ne!(c.runs[0].rounds, a.runs[0].rounds);
}

#[test]
fn every_scenario_file_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("scenarios folder") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("readable");
            Scenario::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 6, "{n} scenario files");
}
