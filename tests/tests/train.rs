//! `cohort train` on the real default model: a LoRA adapter trained on invented facts
//! (data/finetune/velmora-*.jsonl) lowers the held-out loss and makes the model answer a question
//! phrased in a way it never trained on, which the base model gets wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use cohort_tests::{cohort_bin, default_model_present, repo_root, success};

fn ask(adapter: Option<&std::path::Path>, question: &str) -> String {
    let mut cmd = Command::new(cohort_bin());
    cmd.args(["chat", "--max-tokens", "32", "--prompt", question]);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    success(cmd.output().unwrap())
}

#[test]
fn a_short_lora_run_teaches_the_model_invented_facts() {
    if !default_model_present() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("velmora");
    let summary = success(
        Command::new(cohort_bin())
            .current_dir(repo_root())
            .args([
                "train",
                "--data",
                "data/finetune/velmora-train.jsonl",
                "--eval",
                "data/finetune/velmora-heldout.jsonl",
                "--epochs",
                "1",
                "--learning-rate",
                "3e-3",
                "--warmup-steps",
                "2",
                "--seed",
                "0",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap(),
    );
    let s: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    let (before, after) = (
        s["eval_loss_before"].as_f64().unwrap(),
        s["eval_loss_after"].as_f64().unwrap(),
    );
    eprintln!("held-out loss {before:.3} -> {after:.3}");
    assert!(after < before / 2.0, "held-out loss {before} -> {after}");
    assert!(
        out.join("adapter_config.json").is_file()
            && out.join("adapter_model.safetensors").is_file()
    );
    // A held-out phrasing: the base model does not know, the adapted one does.
    let question = "Velmora's capital is which city?";
    let base = ask(None, question);
    let tuned = ask(Some(&out), question);
    eprintln!("base: {base:?}\ntuned: {tuned:?}");
    assert!(
        !base.contains("Tarsk"),
        "the base model already knew: {base}"
    );
    assert!(
        tuned.contains("Tarsk"),
        "the adapted model does not know: {tuned}"
    );
}
