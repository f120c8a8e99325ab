//! `cohort up` child processes for `cohort bench` and `cohort demo`: each on its own data
//! directory, logging to `DIR.log`, stopped with SIGTERM when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cohort_peer::client::Client;
use cohort_peer::data_dir::DataDir;
use serde_json::Value;

/// A running `cohort up`.
pub struct Proc {
    pub dir: PathBuf,
    child: Child,
    pub client: Client,
}

impl Proc {
    /// Starts a node on `dir`, joining `bootstrap` if given.
    pub fn start(dir: &Path, bootstrap: Option<&str>) -> anyhow::Result<Proc> {
        match bootstrap {
            Some(b) => Self::start_with(dir, &["--bootstrap", b]),
            None => Self::start_with(dir, &[]),
        }
    }

    /// Starts a node on `dir` with extra `cohort up` arguments.
    pub fn start_with(dir: &Path, args: &[&str]) -> anyhow::Result<Proc> {
        Self::spawn(dir, args, 2000, &[])
    }

    /// Starts a node on `dir` with extra `cohort up` arguments, an anti-entropy interval and
    /// extra environment variables; waits until its API answers.
    pub fn spawn(
        dir: &Path,
        args: &[&str],
        sync_ms: u64,
        envs: &[(&str, &Path)],
    ) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe()?;
        DataDir::new(dir).init()?;
        std::fs::remove_file(dir.join("node.json")).ok();
        let log = std::fs::File::create(dir.with_extension("log"))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--data-dir")
            .arg(dir)
            .args(["up", "--sync-interval-ms", &sync_ms.to_string()])
            .env_remove("COHORT_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        cmd.args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting cohort up")?;
        let start = Instant::now();
        let client = loop {
            if let Ok(c) = Client::for_data_dir(&DataDir::new(dir))
                && c.node.pid == child.id()
            {
                break c;
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "cohort up in {} exited with {status}; its log is {}",
                    dir.display(),
                    dir.with_extension("log").display()
                );
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "node in {} did not start",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Proc {
            dir: dir.to_path_buf(),
            child,
            client,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        if Command::new("kill").args(["-TERM", &pid]).status().is_err() {
            self.child.kill().ok();
        }
        // A node that does not stop within 10 s is killed.
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if start.elapsed() > Duration::from_secs(10) {
                self.child.kill().ok();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.wait().ok();
        tracing::debug!("stopped node in {}", self.dir.display());
    }
}

/// The sum of `field` (e.g. `entries`, `recomputed`) over the chains of a `POST /api/ledger/verify`
/// answer.
pub fn chains_sum(verify: &Value, field: &str) -> u64 {
    verify["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c[field].as_u64().unwrap_or(0))
        .sum()
}
