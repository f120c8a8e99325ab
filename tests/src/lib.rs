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

/// Polls `check` every 50 ms until it returns `Some`, or panics naming `what` after `deadline`.
pub fn wait_until<T>(
    what: &str,
    deadline: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A running `cohort up` process in its own data directory; killed when dropped.
#[derive(Debug)]
pub struct Node {
    /// The data directory.
    pub dir: PathBuf,
    /// The peer id.
    pub id: String,
    /// `PEER_ID@ADDR` for `--bootstrap`.
    pub bootstrap: String,
    /// The endpoint's socket address.
    pub addr: String,
    /// The DHT's first listen multiaddr (with `/p2p/PEER_ID`) for `--dht-bootstrap`.
    pub dht_addr: String,
    child: Option<std::process::Child>,
    log: PathBuf,
}

/// How long a node may take to start (a loaded 2-core machine builds a few in parallel).
pub const START_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

impl Node {
    /// Initialises `dir` (if needed) and starts `cohort up` on it with `args` (e.g.
    /// `--bootstrap`), waiting until it has written its node.json and its API answers.
    pub fn start(dir: &Path, args: &[&str]) -> Node {
        success(cohort(dir).arg("init").output().expect("cohort init runs"));
        std::fs::remove_file(dir.join("node.json")).ok();
        let log = dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = cohort(dir)
            .arg("up")
            .args(["--sync-interval-ms", "500"])
            .args(args)
            .env("RUST_LOG", "warn,cohort_peer=debug")
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("cohort up starts");
        let pid = child.id();
        let mut node = Node {
            dir: dir.to_path_buf(),
            id: String::new(),
            bootstrap: String::new(),
            addr: String::new(),
            dht_addr: String::new(),
            child: Some(child),
            log,
        };
        let info = wait_until("the node's node.json", START_DEADLINE, || {
            if let Some(status) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("cohort up exited with {status}:\n{}", node.logs());
            }
            let text = std::fs::read_to_string(dir.join("node.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            (v["pid"].as_u64() == Some(u64::from(pid))).then_some(v)
        });
        node.id = info["peer_id"].as_str().expect("peer_id").to_owned();
        node.bootstrap = info["bootstrap"].as_str().expect("bootstrap").to_owned();
        node.addr = info["addrs"][0].as_str().expect("addrs").to_owned();
        node.dht_addr = info["dht_addrs"][0].as_str().expect("dht_addrs").to_owned();
        node
    }

    /// The node's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A `cohort` command on this node's data directory.
    pub fn cmd(&self) -> Command {
        cohort(&self.dir)
    }

    /// Runs `cohort --json ARGS` against this node; its JSON answer, or a panic showing the
    /// error and the node's log.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self
            .cmd()
            .arg("--json")
            .args(args)
            .output()
            .expect("cohort runs");
        if !out.status.success() {
            panic!(
                "cohort {args:?} failed: {}\nnode log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        serde_json::from_slice(&out.stdout).expect("cohort --json prints JSON")
    }

    /// Runs `cohort ARGS` and returns its stderr, asserting that it failed.
    pub fn fails(&self, args: &[&str]) -> String {
        failure(self.cmd().args(args).output().expect("cohort runs"))
    }

    /// The datanet `name` as this node shows it, if it knows it.
    pub fn datanet(&self, name: &str) -> Option<serde_json::Value> {
        let out = self
            .cmd()
            .args(["--json", "datanet", "show", name])
            .output()
            .expect("cohort runs");
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("JSON"))
    }

    /// Waits until this node knows version `version` (or later) of datanet `name`.
    pub fn wait_for_version(&self, name: &str, version: u64) -> serde_json::Value {
        wait_until(
            &format!("{} to hold version {version} of {name}", &self.id[..8]),
            std::time::Duration::from_secs(60),
            || {
                self.datanet(name)
                    .filter(|d| d["version"].as_u64().is_some_and(|v| v >= version))
            },
        )
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success());
            let exit = wait_until(
                "the node to exit",
                std::time::Duration::from_secs(60),
                || child.try_wait().expect("try_wait"),
            );
            assert!(exit.success(), "node exited with {exit}:\n{}", self.logs());
        }
    }

    /// Kills the process with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("wait");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `n` distinct chat records, each about `pad` bytes long, to `path`.
pub fn write_chat_records(path: &Path, start: usize, n: usize, pad: usize) {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let filler = "x".repeat(pad);
    for i in start..start + n {
        writeln!(
            f,
            r#"{{"messages":[{{"role":"user","content":"question {i} {filler}"}},{{"role":"assistant","content":"answer {i}"}}]}}"#
        )
        .expect("write");
    }
}

/// Whether the default base model is in the model cache (`$COHORT_MODEL_DIR`, or
/// `${XDG_CACHE_HOME:-~/.cache}/cohort/models`). Under CI (`CI=true`) its absence fails the
/// calling test, since `scripts/test.sh` fetches it first; elsewhere the test says it skipped.
pub fn default_model_present() -> bool {
    let path = cohort_trainer::models::default_model_path();
    if path.is_file() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{} is missing under CI: scripts/fetch-model.sh must run first",
        path.display()
    );
    eprintln!(
        "skipped: {} is missing (run scripts/fetch-model.sh)",
        path.display()
    );
    false
}

/// A plain HTTP/1.1 exchange over one `Connection: close` connection: the status, the headers
/// (lower-case names) and the body (chunked transfer decoded). Written for the tests so that the
/// wire format is read by code that shares nothing with the server.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the server");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(300)))
        .expect("read timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    stream.write_all(req.as_bytes()).expect("send the request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk size line");
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("0")
                    .trim(),
                16,
            )
            .expect("a hex chunk size");
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// The `data:` payloads of a server-sent-events body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .flat_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// A running `cohort serve` process; killed when dropped.
#[derive(Debug)]
pub struct Server {
    /// `IP:PORT`.
    pub addr: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Server {
    /// Starts `cohort serve --http 127.0.0.1:0 ARGS` and waits until it listens.
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        std::fs::create_dir_all(dir).expect("data dir");
        let log = dir.join("serve.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut child = cohort(dir)
            .args(["serve", "--http", "127.0.0.1:0"])
            .args(args)
            .env_remove("COHORT_API_KEY")
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("cohort serve starts");
        let info = wait_until("cohort serve's serve.json", START_DEADLINE, || {
            if let Some(status) = child.try_wait().ok().flatten() {
                panic!(
                    "cohort serve exited with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(dir.join("serve.json")).ok()?;
            serde_json::from_str::<serde_json::Value>(&text).ok()
        });
        Server {
            addr: info["http"].as_str().expect("http").to_owned(),
            child,
            log,
        }
    }

    /// The server's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A running `cohort demo` (started by any command that execs it), in its own process group;
/// the whole group is killed when dropped.
#[derive(Debug)]
pub struct Demo {
    child: std::process::Child,
    /// What it printed up to `Serving until Ctrl-C.`.
    pub out: String,
    /// Its `demo.json` once serving.
    pub info: serde_json::Value,
}

impl Demo {
    /// Spawns `command` (which must run `cohort demo --dir DIR`) and waits until the demo
    /// serves, echoing its output; panics with the output if it does not within 10 minutes.
    pub fn start(mut command: Command, dir: &Path) -> Demo {
        use std::io::{BufRead as _, BufReader};
        use std::os::unix::process::CommandExt as _;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("the demo starts");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        // The demo's output goes on to the test's own, where a failing test shows it.
        #[allow(clippy::print_stdout)]
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("{line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut demo = Demo {
            child,
            out: String::new(),
            info: serde_json::Value::Null,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        while !demo.out.contains("Serving until Ctrl-C.") {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    demo.out.push_str(&line);
                    demo.out.push('\n');
                }
                Err(_) => panic!(
                    "the demo did not reach `Serving until Ctrl-C.`:\n{}",
                    demo.out
                ),
            }
        }
        let text = std::fs::read(dir.join("demo.json")).expect("the demo's demo.json");
        demo.info = serde_json::from_slice(&text).expect("demo.json is JSON");
        demo
    }

    /// The job owner's HTTP address (`127.0.0.1:PORT`).
    pub fn api(&self) -> String {
        self.info["api"]
            .as_str()
            .expect("demo.json has api")
            .trim_start_matches("http://")
            .to_owned()
    }

    /// Sends `signal` (e.g. `-INT`) to the demo's process group, as a terminal's Ctrl-C does.
    pub fn signal(&self, signal: &str) {
        Command::new("kill")
            .args([signal, "--", &format!("-{}", self.child.id())])
            .status()
            .ok();
    }

    /// Sends Ctrl-C and waits for the demo to exit.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        self.signal("-INT");
        self.child.wait().expect("the demo exits")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal("-KILL");
            self.child.wait().ok();
        }
    }
}
