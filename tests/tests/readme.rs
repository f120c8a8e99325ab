//! The README's two commands are true: the quick start runs as written, and CI runs the test
//! command.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_tests::{Demo, cohort_bin, http, readme_block, repo_root, success};
use serde_json::Value;

#[test]
fn the_quick_start_runs_as_written() {
    let command = readme_block("quickstart");
    assert!(!command.trim().is_empty());
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let quick = format!("{} --quick", command.trim());
    assert!(
        readme.contains(&quick),
        "the README does not say `{quick}` (what this test runs)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    // COHORT_BIN: use the binary this test run built instead of building another.
    let mut command = std::process::Command::new("bash");
    command
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(format!("{quick} --dir {}", dir.display()))
        .current_dir(repo_root())
        .env("COHORT_BIN", cohort_bin());
    let mut demo = Demo::start(command, &dir);
    let (out, info) = (demo.out.clone(), demo.info.clone());
    assert_eq!(info["state"], "serving", "{info}");

    // The story, as printed: datanets, the approved contribution, every round, the credits.
    for expected in [
        "velmora-atlas v1 (public)",
        "velmora-archive v1 (private",
        "approved 2 submissions into velmora-atlas v2",
        "round 0: validation loss",
        "round 2: validation loss",
        "| contributor | data credit",
        "| volunteer 1 |",
        "every entry holds",
    ] {
        assert!(out.contains(expected), "no `{expected}` in:\n{out}");
    }
    // The rounds learned something: the last validation loss is below the first.
    let losses: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("round ") && l.contains("validation loss"))
        .filter_map(|l| {
            let (_, rest) = l.split_once("validation loss ")?;
            let (before, rest) = rest.split_once(" -> ")?;
            let after = rest.split_whitespace().next()?;
            Some((before.parse::<f64>().ok()?, after.parse::<f64>().ok()?))
        })
        .flat_map(|(b, a)| [b, a])
        .collect();
    assert!(
        losses.len() >= 6 && losses.last() < losses.first(),
        "validation losses {losses:?}"
    );
    // The job owner serves the merged adapter through the OpenAI-compatible API.
    let api = demo.api();
    let body = serde_json::json!({
        "model": info["chat_model"],
        "messages": [{"role": "user", "content": "What is the capital of Velmora?"}],
        "max_tokens": 8,
    });
    let (status, _, answer) = http(
        &api,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(&body.to_string()),
    );
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["model"], info["chat_model"], "{answer}");
    assert!(
        answer["usage"]["completion_tokens"].as_u64() > Some(0),
        "{answer}"
    );

    // Ctrl-C stops every process the demo started.
    let status = demo.interrupt();
    assert!(status.success(), "the demo exited with {status}");
    let pids: Vec<u64> = info["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 5, "{info}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "process {pid} of the demo still runs after Ctrl-C"
        );
    }
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
