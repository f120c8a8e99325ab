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

#[test]
fn the_readme_datanet_commands_exist() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = readme
        .split_once("## Datanets")
        .expect("README.md has a Datanets section")
        .1;
    let block = section
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Datanets section has a sh block");
    let help = success(
        std::process::Command::new(cohort_bin())
            .args(["datanet", "--help"])
            .output()
            .unwrap(),
    );
    let mut seen = 0;
    for line in block.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "datanet") {
            let sub = words[i + 1];
            assert!(
                help.lines().any(|l| l.trim_start().starts_with(sub)),
                "README uses `cohort datanet {sub}`, which `cohort datanet --help` does not list"
            );
            seen += 1;
        }
        if words.contains(&"up") {
            let up = success(
                std::process::Command::new(cohort_bin())
                    .args(["up", "--help"])
                    .output()
                    .unwrap(),
            );
            assert!(up.contains("--bootstrap"));
        }
    }
    assert!(
        seen >= 10,
        "the Datanets block shows only {seen} datanet commands"
    );
}
