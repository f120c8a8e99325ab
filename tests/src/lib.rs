//! Helpers for Cohort's end-to-end tests: find the `cohort` binary the test build produced,
//! run it in a sandbox data directory, and read the README's commands.
//!
//! The tests themselves are in `tests/tests/`; they start real `cohort` processes (and, as the
//! node grows, networks of them on 127.0.0.1) and never mock the network.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// The `cohort` binary built alongside this test (same target directory and profile).
pub fn cohort_bin() -> PathBuf {
    // Test binaries live in <target>/<profile>/deps/; binaries in <target>/<profile>/.
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in <target>/<profile>/deps");
    let bin = profile_dir.join(format!("cohort{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo build -p cohort-peer --bin cohort` \
         (a workspace test run builds it)",
        bin.display()
    );
    bin
}

/// A `cohort` command with `--data-dir` set and the environment cleaned of Cohort settings.
pub fn cohort(data_dir: &Path) -> Command {
    let mut cmd = Command::new(cohort_bin());
    cmd.env_remove("COHORT_DATA_DIR")
        .arg("--data-dir")
        .arg(data_dir);
    cmd
}

/// Stdout of a finished command, asserting success and showing stderr otherwise.
pub fn success(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "command failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
}

/// Stderr of a finished command, asserting failure.
pub fn failure(output: Output) -> String {
    assert!(
        !output.status.success(),
        "command unexpectedly succeeded:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The fenced code block that follows the marker comment `<!-- NAME -->` in the README.
pub fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let marker = format!("<!-- {name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let mut lines = after.lines().skip_while(|l| !l.starts_with("```"));
    lines.next();
    lines
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}
