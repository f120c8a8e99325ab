//! The dashboard in a real browser: headless Chromium (Debian's `chromium` package), driven by
//! Playwright (`playwright-core` from npm, `tests/browser/`), against a live
//! `cohort demo --quick`. The script creates a job from the Train page with non-default values,
//! watches its loss chart fill, chats with the result, reads the credits and the network, and
//! saves a screenshot of each page in `tests/browser/artifacts/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_tests::{Demo, cohort_bin, repo_root};

const CHROMIUM: &str = "/usr/bin/chromium";

#[test]
fn the_dashboard_tells_the_whole_story_in_chromium() {
    let browser = repo_root().join("tests/browser");
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: scripts/setup-system.sh installs Debian's chromium package"
    );
    if !browser.join("node_modules/playwright-core").is_dir() {
        // scripts/test.sh installs it; a test run on its own does it here.
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&browser)
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm ci in tests/browser failed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let mut command = std::process::Command::new(cohort_bin());
    command
        .args(["demo", "--quick", "--dir"])
        .arg(&dir)
        .env_remove("COHORT_DATA_DIR");
    let mut demo = Demo::start(command, &dir);
    let artifacts = browser.join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let out = std::process::Command::new("node")
        .arg(browser.join("dashboard.mjs"))
        .env("COHORT_DEMO_JSON", dir.join("demo.json"))
        .env("COHORT_ARTIFACTS", &artifacts)
        .env("COHORT_CHROMIUM", CHROMIUM)
        .output()
        .expect("node runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    let status = demo.interrupt();
    assert!(out.status.success(), "the browser script failed:\n{text}");
    assert!(status.success(), "the demo exited with {status}");
    for page in ["train", "chat", "datanets", "credits", "network"] {
        let shot = artifacts.join(format!("{page}.png"));
        let bytes = std::fs::read(&shot).unwrap_or_default();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "no screenshot of the {page} page at {}",
            shot.display()
        );
    }
}
