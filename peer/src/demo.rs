//! `cohort demo`: a whole Cohort network of separate `cohort up` processes on 127.0.0.1, from
//! one command.
//!
//! - A **data owner** publishes two datanets of the sample data shipped in the binary (written
//!   for this repository, `data/finetune/`): `velmora-atlas` (public) and `velmora-archive`
//!   (private: its shards are encrypted and granted to the job owner and the volunteers).
//! - A **contributor** submits shards to `velmora-atlas`; the data owner approves them into its
//!   next version.
//! - A **job owner** runs a federated LoRA job over both datanets; its node serves the dashboard
//!   and the OpenAI-compatible API.
//! - **Volunteers** train the rounds.
//!
//! The demo prints the dashboard's address, each round's validation loss and the credit table
//! from the signed ledger (verified by the data owner, who recomputes every round), then keeps
//! every node running (chat, the API, the dashboard) until Ctrl-C or SIGTERM, which stops every
//! process it started. `--quick` does the same on a tiny generated model in about a minute.
//! `DIR/demo.json` says where everything is, for scripts and the browser tests.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cohort_peer::client::Client;
use serde_json::{Value, json};

use crate::procs::Proc;

/// The sample data (see `scripts/data/make_velmora.py`).
const TRAIN: &str = include_str!("../../data/finetune/velmora-train.jsonl");
const HELDOUT: &str = include_str!("../../data/finetune/velmora-heldout.jsonl");

/// The tiny model's file name in the demo's model cache (`--quick`).
const TINY_MODEL: &str = "tiny-chat.gguf";

/// Set by SIGINT or SIGTERM.
static STOP: AtomicBool = AtomicBool::new(false);

/// Options of `cohort demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// A tiny generated model instead of the default one.
    pub quick: bool,
    /// Where the peers' data directories go (kept); default a temporary directory, removed at
    /// the end.
    pub dir: Option<PathBuf>,
    /// The job owner's HTTP address: the dashboard and the OpenAI-compatible API.
    pub http: SocketAddr,
    /// Volunteers.
    pub volunteers: usize,
    /// Rounds of the job (default 3 with `--quick`, 2 on the default model).
    pub rounds: Option<u32>,
}

/// Why the demo stopped early.
#[derive(Debug, thiserror::Error)]
#[error("stopped")]
struct Stopped;

/// Waits for `f` to give a value, checking for Ctrl-C; fails after `limit`.
fn wait<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if STOP.load(Ordering::SeqCst) {
            return Err(Stopped.into());
        }
        if let Some(v) = f()? {
            return Ok(v);
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "timed out after {} s waiting for {what}",
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sets [`STOP`] on SIGINT or SIGTERM.
fn watch_signals() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        STOP.store(true, Ordering::SeqCst);
    });
    Ok(())
}

/// A peer of the demo: its part and its process.
struct Peer {
    role: String,
    proc: Proc,
}

impl Peer {
    fn id(&self) -> &str {
        &self.proc.client.node.peer_id
    }

    fn api(&self) -> &Client {
        &self.proc.client
    }
}

/// Runs the demo; see the module docs.
pub fn run(o: &DemoOptions) -> anyhow::Result<()> {
    watch_signals()?;
    let (dir, keep) = match &o.dir {
        Some(d) => (d.clone(), true),
        None => (
            std::env::temp_dir().join(format!("cohort-demo-{}", std::process::id())),
            false,
        ),
    };
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| dir.display().to_string())?
            .next()
            .is_some()
    {
        anyhow::bail!(
            "{} is not empty: give `cohort demo --dir` a new or empty directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let result = demo(o, &dir);
    if !keep {
        std::fs::remove_dir_all(&dir).ok();
    }
    match result {
        Err(e) if e.is::<Stopped>() => {
            println!("Stopped.");
            Ok(())
        }
        other => other,
    }
}

fn demo(o: &DemoOptions, dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!((1..=16).contains(&o.volunteers), "--volunteers: 1 to 16");
    let started = Instant::now();
    // The base model: a tiny generated one in the demo's own model cache, or the default.
    let models = dir.join("models");
    let (model, envs): (&str, Vec<(&str, &Path)>) = if o.quick {
        std::fs::create_dir_all(&models)?;
        cohort_trainer::bench::tiny_chat_model(7, &models.join(TINY_MODEL))
            .context("writing the tiny model")?;
        (TINY_MODEL, vec![("COHORT_MODEL_DIR", models.as_path())])
    } else {
        let path = cohort_trainer::models::default_model_path();
        anyhow::ensure!(
            path.is_file(),
            "the default model is not in the model cache ({}): run scripts/fetch-model.sh \
             (or `cohort demo --quick` for a tiny model)",
            path.display()
        );
        ("", Vec::new())
    };

    println!("Cohort demo: a network of separate processes on 127.0.0.1");
    println!("  peers' data directories: {}", dir.display());
    let peers_dir = dir.join("peers");
    let start = |name: &str, role: &str, args: &[&str]| -> anyhow::Result<Peer> {
        if STOP.load(Ordering::SeqCst) {
            return Err(Stopped.into());
        }
        let proc = Proc::spawn(&peers_dir.join(name), args, 1000, &envs)?;
        println!(
            "  {role:<13} {}  (pid {})",
            proc.client.node.peer_id,
            proc.pid()
        );
        Ok(Peer {
            role: role.to_owned(),
            proc,
        })
    };
    let owner = start("data-owner", "data owner", &[])?;
    // Everyone joins the data owner's gossip and DHT.
    let boot = owner.proc.client.node.bootstrap.clone();
    let dht = owner
        .proc
        .client
        .node
        .dht_addrs
        .first()
        .cloned()
        .context("the data owner's DHT address")?;
    let join = ["--bootstrap", &boot, "--dht-bootstrap", &dht];
    let http = o.http.to_string();
    let lab = start(
        "job-owner",
        "job owner",
        &[&join[..], &["--http", &http]].concat(),
    )?;
    let contributor = start("contributor", "contributor", &join)?;
    let mut volunteers = Vec::new();
    for i in 1..=o.volunteers {
        volunteers.push(start(
            &format!("volunteer-{i}"),
            &format!("volunteer {i}"),
            &[&join[..], &["--volunteer"]].concat(),
        )?);
    }
    let token = std::fs::read_to_string(lab.proc.dir.join("api.token"))
        .context("the job owner's api.token")?;
    let base_url = format!("http://{}", lab.api().node.http);
    let dashboard = format!("{base_url}/#token={}", token.trim());
    println!("\nDashboard: {dashboard}");
    let mut info = json!({
        "dir": dir,
        "dashboard": dashboard,
        "api": base_url,
        "openai": format!("{base_url}/v1"),
        "token": token.trim(),
        "model": model,
        "peers": std::iter::once(&owner).chain([&lab, &contributor]).chain(volunteers.iter())
            .map(|p| json!({
                "role": p.role, "peer_id": p.id(), "data_dir": p.proc.dir, "pid": p.proc.pid(),
                "http": p.api().node.http.to_string(),
            }))
            .collect::<Vec<_>>(),
        "state": "starting",
    });
    write_info(dir, &info)?;

    // The data: two datanets of the data owner, one of them private, and a contribution.
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let lines: Vec<&str> = TRAIN.lines().filter(|l| !l.trim().is_empty()).collect();
    let (atlas_file, archive_file, contribution_file) = (
        data.join("velmora-atlas.jsonl"),
        data.join("velmora-archive.jsonl"),
        data.join("velmora-contribution.jsonl"),
    );
    let every_other = |first: usize| -> String {
        lines
            .iter()
            .skip(first)
            .step_by(2)
            .map(|l| format!("{l}\n"))
            .collect()
    };
    std::fs::write(&atlas_file, every_other(0))?;
    std::fs::write(&archive_file, every_other(1))?;
    std::fs::write(&contribution_file, HELDOUT)?;
    let shard_bytes = 4096;

    println!();
    let atlas = owner.api().post(
        "/api/datanets",
        &json!({
            "name": "velmora-atlas", "schema": "chat", "access": "public",
            "license": "CC-BY-4.0",
            "description": "Questions and answers about Velmora, a made-up country.",
        }),
    )?;
    let atlas = atlas["id"].as_str().context("datanet id")?.to_owned();
    owner.api().post(
        &format!("/api/datanets/{atlas}/add"),
        &json!({ "files": [atlas_file], "shard_bytes": shard_bytes }),
    )?;
    let v = owner
        .api()
        .post(&format!("/api/datanets/{atlas}/publish"), &json!({}))?;
    println!(
        "data owner published velmora-atlas v{} (public): {} shards",
        v["version"], v["shards"]
    );

    let archive = owner.api().post(
        "/api/datanets",
        &json!({
            "name": "velmora-archive", "schema": "chat", "access": "allowlist",
            "license": "proprietary",
            "description": "The data owner's private archive on Velmora.",
        }),
    )?;
    let archive = archive["id"].as_str().context("datanet id")?.to_owned();
    owner.api().post(
        &format!("/api/datanets/{archive}/add"),
        &json!({ "files": [archive_file], "shard_bytes": shard_bytes }),
    )?;
    for p in std::iter::once(&lab).chain(volunteers.iter()) {
        owner.api().post(
            &format!("/api/datanets/{archive}/grant"),
            &json!({ "peer": p.id() }),
        )?;
    }
    let v = owner
        .api()
        .post(&format!("/api/datanets/{archive}/publish"), &json!({}))?;
    println!(
        "data owner published velmora-archive v{} (private, granted to the job owner and {} \
         volunteers): {} shards",
        v["version"],
        volunteers.len(),
        v["shards"]
    );

    // The contributor learns of velmora-atlas, submits shards; the owner approves them.
    wait("the contributor to see velmora-atlas", minutes(2), || {
        Ok(contributor
            .api()
            .get(&format!("/api/datanets/{atlas}"))
            .ok()
            .filter(|v| v["version"].as_u64() >= Some(1)))
    })?;
    let sent = contributor.api().post(
        &format!("/api/datanets/{atlas}/contribute"),
        &json!({
            "files": [contribution_file], "shard_bytes": shard_bytes,
            "note": "More ways to ask about Velmora.",
        }),
    )?;
    let sent = count(&sent["submissions"]);
    println!("contributor submitted {sent} shards to velmora-atlas");
    let pending = wait(
        "the data owner to receive the submissions",
        minutes(2),
        || {
            let all = owner.api().get("/api/submissions")?;
            let pending: Vec<String> = all["submissions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["status"]["state"] == "pending")
                .filter_map(|s| s["id"].as_str().map(str::to_owned))
                .collect();
            Ok((pending.len() >= sent).then_some(pending))
        },
    )?;
    for id in &pending {
        owner
            .api()
            .post(&format!("/api/submissions/{id}/approve"), &json!({}))?;
    }
    let v = owner
        .api()
        .post(&format!("/api/datanets/{atlas}/publish"), &json!({}))?;
    let atlas_version = v["version"].as_u64().unwrap_or(0);
    println!(
        "data owner approved {} submissions into velmora-atlas v{atlas_version}: {} shards",
        pending.len(),
        v["shards"]
    );

    // The job owner starts a job once it holds both datanets' latest versions.
    wait("the job owner to see both datanets", minutes(2), || {
        let a = lab.api().get(&format!("/api/datanets/{atlas}")).ok();
        let b = lab.api().get(&format!("/api/datanets/{archive}")).ok();
        Ok(
            (a.is_some_and(|a| a["version"].as_u64() >= Some(atlas_version))
                && b.is_some_and(|b| b["version"].as_u64() >= Some(1)))
            .then_some(()),
        )
    })?;
    let rounds = o.rounds.unwrap_or(if o.quick { 3 } else { 2 });
    let workers = volunteers.len() as u32;
    let spec = if o.quick {
        json!({
            "name": "velmora-demo", "model": model, "datanets": [atlas, archive],
            "rank": 8, "alpha": 16.0,
            "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "learning_rate": 0.01, "epochs": 1, "batch_size": 4, "seq_len": 256,
            "rounds": rounds, "min_updates": workers, "max_workers": workers,
            "enroll_secs": 3.0, "train_secs": 120.0, "validate_secs": 120.0,
            "segment_steps": 2, "audit_rate": 0.5, "validation_fraction": 0.1,
        })
    } else {
        json!({
            "name": "velmora-demo", "model": model, "datanets": [atlas, archive],
            "rank": 8, "alpha": 16.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "learning_rate": 2e-3, "epochs": 1, "batch_size": 4, "seq_len": 128,
            "rounds": rounds, "min_updates": workers, "max_workers": workers,
            "enroll_secs": 5.0, "train_secs": 3600.0, "validate_secs": 3600.0,
            "segment_steps": 4, "audit_rate": 0.25, "validation_fraction": 0.1,
        })
    };
    let job = lab.api().post("/api/jobs", &spec)?;
    let job = job["job"].as_str().context("job id")?.to_owned();
    println!(
        "\njob owner started job {} (velmora-demo): {rounds} rounds of federated LoRA on {}, \
         {} volunteers",
        &job[..12],
        if o.quick {
            "a tiny generated model"
        } else {
            cohort_trainer::models::DEFAULT_MODEL_ID
        },
        volunteers.len()
    );
    info["job"] = json!(job);
    info["state"] = json!("training");
    write_info(dir, &info)?;

    // Round by round.
    let names = names(&[&owner, &lab, &contributor], &volunteers);
    let mut shown = 0;
    let mut phase = String::new();
    let limit = if o.quick { minutes(10) } else { minutes(240) };
    let status = wait("the job to finish", limit, || {
        let s = lab.api().get(&format!("/api/jobs/{job}"))?;
        let now = format!(
            "round {} {}",
            s["status"]["round"],
            s["status"]["phase"].as_str().unwrap_or("")
        );
        if now != phase && s["finished"] != json!(true) {
            println!("  {now}");
            phase = now;
        }
        let closed = s["closed_rounds"].as_array().cloned().unwrap_or_default();
        for r in closed.iter().skip(shown) {
            let verdicts = r["verdicts"].as_array().cloned().unwrap_or_default();
            let merged = verdicts.iter().filter(|v| v["rejected"].is_null()).count();
            if r["outcome"] == "NoQuorum" || r["outcome"] == "Cancelled" {
                println!(
                    "round {}: {} ({} updates)",
                    r["round"],
                    r["outcome"].as_str().unwrap_or("?"),
                    verdicts.len()
                );
                continue;
            }
            println!(
                "round {}: validation loss {:.4} -> {:.4} ({merged} of {} updates merged)",
                r["round"],
                r["validation_loss_before"].as_f64().unwrap_or(f64::NAN),
                r["validation_loss_after"].as_f64().unwrap_or(f64::NAN),
                verdicts.len()
            );
            for v in verdicts.iter().filter(|v| !v["rejected"].is_null()) {
                println!(
                    "  refused the update of {}: {}",
                    name_of(&names, v["worker"].as_str().unwrap_or("")),
                    v["rejected"].as_str().unwrap_or("")
                );
            }
        }
        shown = closed.len();
        Ok((s["finished"] == json!(true)).then_some(s))
    })?;
    if let Some(e) = status["status"]["last_error"].as_str() {
        println!("the job owner's last error: {e}");
    }

    // Credits, from the job owner's signed ledger, recomputed by the data owner.
    let datanets = BTreeMap::from([
        (atlas.clone(), "velmora-atlas".to_owned()),
        (archive.clone(), "velmora-archive".to_owned()),
    ]);
    let ledger = lab.api().get("/api/ledger")?;
    print_credits(&ledger, &job, &names, &datanets);
    let verified = wait("the data owner to verify the ledger", minutes(30), || {
        let v = owner.api().post("/api/ledger/verify", &json!({}))?;
        let entries: u64 = crate::procs::chains_sum(&v, "entries");
        Ok((entries >= shown as u64).then_some(v))
    })?;
    let recomputed: u64 = crate::procs::chains_sum(&verified, "recomputed");
    println!(
        "\nThe data owner verified the job owner's ledger: {} ({recomputed} rounds recomputed \
         from the published blobs).",
        if verified["ok"] == json!(true) {
            "every entry holds"
        } else {
            "FAILED"
        }
    );

    let base = if o.quick {
        TINY_MODEL.trim_end_matches(".gguf")
    } else {
        cohort_trainer::models::DEFAULT_MODEL_ID
    };
    println!(
        "\nThe demo ran in {:.0} s. Everything keeps running until Ctrl-C:",
        started.elapsed().as_secs_f64()
    );
    println!("  dashboard:  {dashboard}");
    println!("  OpenAI API: {base_url}/v1  (model \"{base}\" or \"{base}:{job}\")");
    println!(
        "  chat:       cohort --data-dir {} chat --job {} --compare",
        lab.proc.dir.display(),
        &job[..12]
    );
    info["state"] = json!("serving");
    info["chat_model"] = json!(format!("{base}:{job}"));
    info["seconds"] = json!(started.elapsed().as_secs_f64());
    write_info(dir, &info)?;
    // Scripts wait for this line: demo.json says "serving" by then.
    println!("Serving until Ctrl-C.");

    let mut all: Vec<Peer> = vec![owner, lab, contributor];
    all.extend(volunteers);
    while !STOP.load(Ordering::SeqCst) {
        for p in all.iter_mut() {
            if p.proc.exited() {
                anyhow::bail!(
                    "the {}'s node stopped on its own; its log is {}",
                    p.role,
                    p.proc.dir.with_extension("log").display()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let n = all.len();
    drop(all);
    println!("Stopped {n} processes.");
    Ok(())
}

fn minutes(m: u64) -> Duration {
    Duration::from_secs(60 * m)
}

fn count(v: &Value) -> usize {
    v.as_array().map_or(0, Vec::len)
}

fn write_info(dir: &Path, info: &Value) -> anyhow::Result<()> {
    let tmp = dir.join("demo.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
    std::fs::rename(&tmp, dir.join("demo.json"))?;
    Ok(())
}

fn names(fixed: &[&Peer], volunteers: &[Peer]) -> BTreeMap<String, String> {
    fixed
        .iter()
        .copied()
        .chain(volunteers.iter())
        .map(|p| (p.id().to_owned(), p.role.clone()))
        .collect()
}

fn name_of(names: &BTreeMap<String, String>, peer: &str) -> String {
    names
        .get(peer)
        .cloned()
        .unwrap_or_else(|| peer.chars().take(12).collect())
}

/// Credit per shard, per contributor and per volunteer, as people read them.
fn print_credits(
    ledger: &Value,
    job: &str,
    names: &BTreeMap<String, String>,
    datanets: &BTreeMap<String, String>,
) {
    let entries: Vec<&Value> = ledger["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["entries"].as_array().into_iter().flatten())
        .filter(|e| e["job"] == job)
        .collect();
    println!(
        "\nCredits of the job, from the job owner's signed ledger ({} entries):",
        entries.len()
    );
    let mut per_shard: BTreeMap<(String, String), (String, f64, Vec<String>)> = BTreeMap::new();
    let mut per_contributor: BTreeMap<String, f64> = BTreeMap::new();
    let mut per_volunteer: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for e in &entries {
        for d in e["data"].as_array().into_iter().flatten() {
            let contributor = name_of(names, d["contributor"].as_str().unwrap_or(""));
            let credit = d["credit"]
                .as_str()
                .and_then(|c| c.parse::<f64>().ok())
                .unwrap_or(0.0);
            *per_contributor.entry(contributor.clone()).or_default() += credit;
            let datanet = datanets
                .get(d["datanet"].as_str().unwrap_or(""))
                .cloned()
                .unwrap_or_else(|| "?".into());
            let shard: String = d["shard"].as_str().unwrap_or("").chars().take(12).collect();
            let row = per_shard
                .entry((datanet, shard))
                .or_insert_with(|| (contributor, 0.0, Vec::new()));
            row.1 += credit;
            if let Some(flag) = d["flag"].as_str().filter(|f| *f != "Normal") {
                row.2.push(format!("round {}: {flag}", e["round"]));
            }
        }
        for c in e["compute"].as_array().into_iter().flatten() {
            let v = per_volunteer
                .entry(name_of(names, c["peer"].as_str().unwrap_or("")))
                .or_default();
            if c["verified"] == json!(true) {
                v.0 += c["tokens"].as_u64().unwrap_or(0);
            } else {
                v.1 += 1;
            }
        }
    }
    println!("\n| datanet | shard | contributor | credit, all rounds (nats) | flags |");
    println!("|---|---|---|---|---|");
    for ((datanet, shard), (who, credit, flags)) in &per_shard {
        println!(
            "| {datanet} | {shard} | {who} | {credit:.6} | {} |",
            flags.join(", ")
        );
    }
    println!("\n| contributor | data credit (nats of validation loss) |");
    println!("|---|---|");
    for (who, credit) in &per_contributor {
        println!("| {who} | {credit:.6} |");
    }
    println!("\n| volunteer | verified tokens trained | refused updates |");
    println!("|---|---|---|");
    for (who, (tokens, failed)) in &per_volunteer {
        println!("| {who} | {tokens} | {failed} |");
    }
}
