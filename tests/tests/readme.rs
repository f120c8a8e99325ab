//! The README's two commands are true: the quick start runs as written, and CI runs the test
//! command.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_protocol::PeerId;
use cohort_tests::{cohort, cohort_bin, readme_block, repo_root, success};

#[test]
fn the_quick_start_runs_as_written() {
    let command = readme_block("quickstart");
    assert!(!command.trim().is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // COHORT_BIN: use the binary this test run built instead of building another.
    let out = success(
        std::process::Command::new("bash")
            .arg("-euo")
            .arg("pipefail")
            .arg("-c")
            .arg(&command)
            .current_dir(repo_root())
            .env("COHORT_BIN", cohort_bin())
            .env("COHORT_DATA_DIR", &data)
            .output()
            .unwrap(),
    );
    let id = success(cohort(&data).arg("id").output().unwrap());
    let id: PeerId = id.trim().parse().unwrap();
    assert!(
        out.contains(&id.to_string()),
        "the quick start does not show the peer id:\n{out}"
    );
    assert!(
        out.contains("init"),
        "the quick start does not list the commands:\n{out}"
    );
    assert!(
        out.contains("Paris"),
        "the base model's answer in the quick start does not mention Paris:\n{out}"
    );
}

#[test]
fn ci_runs_the_readme_test_command() {
    let command = readme_block("test-command");
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).unwrap();
    let command = command.trim();
    assert!(!command.is_empty());
    assert!(
        ci.lines().any(|l| l.trim() == format!("exec {command}")),
        ".ci/run does not run the README's test command `{command}`:\n{ci}"
    );
}
