//! The model commands on the real default model: `cohort model list`, `chat` (one shot and
//! interactive) and `perplexity`, checked against figures produced by other tools.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};

use cohort_tests::{cohort_bin, default_model_present, failure, repo_root, success};

fn fixture() -> serde_json::Value {
    let text =
        std::fs::read_to_string(repo_root().join("tests/fixtures/perplexity_llama_cpp.json"))
            .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn model_list_names_the_default_model_by_its_blake3_hash() {
    if !default_model_present() {
        return;
    }
    let out = success(
        Command::new(cohort_bin())
            .args(["model", "list"])
            .output()
            .unwrap(),
    );
    let hash = fixture()["model_blake3"].as_str().unwrap().to_string();
    assert!(
        out.contains(&hash),
        "the list lacks the hash computed by another BLAKE3 implementation:\n{out}"
    );
    assert!(out.contains("llama") && out.contains("30 layers"), "{out}");
}

#[test]
fn chat_answers_once_and_interactively() {
    if !default_model_present() {
        return;
    }
    let out = success(
        Command::new(cohort_bin())
            .args(["chat", "--prompt", "What is the capital of France?"])
            .output()
            .unwrap(),
    );
    assert!(out.contains("Paris"), "{out}");
    let mut child = Command::new(cohort_bin())
        .args(["chat", "--max-tokens", "24"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n/reset\nSay hello.\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = success(out);
    assert!(stdout.contains("Paris"), "{stdout}");
    assert!(
        stdout.lines().filter(|l| !l.trim().is_empty()).count() >= 2,
        "two answers expected:\n{stdout}"
    );
}

#[test]
fn perplexity_agrees_with_llama_cpp_on_the_fixed_text() {
    if !default_model_present() {
        return;
    }
    let want = fixture();
    let out = success(
        Command::new(cohort_bin())
            .current_dir(repo_root())
            .args([
                "perplexity",
                "--file",
                "data/text/lighthouse.txt",
                "--ctx",
                "512",
                "--json",
            ])
            .output()
            .unwrap(),
    );
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // The same tokens as llama.cpp's tokenizer, the same windows.
    for key in ["text_tokens", "windows", "scored_tokens"] {
        assert_eq!(got[key], want[key], "{key}");
    }
    let (ours, theirs) = (
        got["perplexity"].as_f64().unwrap(),
        want["perplexity"].as_f64().unwrap(),
    );
    assert!(
        (ours / theirs - 1.0).abs() < 0.01,
        "perplexity {ours} vs llama.cpp's {theirs}"
    );
}

#[test]
fn bad_inputs_get_clear_errors() {
    let err = failure(
        Command::new(cohort_bin())
            .args(["perplexity", "--file", "/nonexistent/text.txt"])
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("nonexistent") || err.contains("no model"),
        "{err}"
    );
    let err = failure(
        Command::new(cohort_bin())
            .args(["chat", "--model", "no-such-model", "--prompt", "hi"])
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("no-such-model") && err.contains("fetch-model"),
        "{err}"
    );
    let err = failure(
        Command::new(cohort_bin())
            .args([
                "chat",
                "--model",
                "no-such-model",
                "--top-p",
                "2",
                "--prompt",
                "hi",
            ])
            .output()
            .unwrap(),
    );
    assert!(!err.is_empty());
}
