//! Federated rounds across real `cohort up` processes on loopback, with a tiny generated model:
//! one coordinator and six volunteers (three of them send a NaN, an oversized and a made-up
//! update) run a two-round job; the NaN and made-up ones are barred from round 1;
//! a volunteer killed after enrolling does not stop its round; the coordinator, killed with
//! SIGKILL in the middle of round 1 and restarted, finishes the job; `cohort ledger verify`
//! passes on every peer and fails on a tampered entry. Two consumers that took no part serve
//! the job's merged adapter: one fetches it by hash from the coordinator and answers through
//! the OpenAI-compatible API (`cohort chat --job`), the other refuses a tampered copy.
//!
//! And Multi-Krum in real rounds: `ledger verify` recomputes the robust filter's refusals from
//! the published updates, and rejects the entry of a coordinator that lied about them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cohort_tests::{Node, cohort, http, success, wait_until};
use serde_json::Value;

/// Chat records that teach a made-up vocabulary (seeded pseudo-words, so that shards are not
/// near-duplicates of each other the way records from one template with different numbers are).
fn write_facts(path: &std::path::Path, n: usize) {
    use std::io::Write as _;
    let mut rng = cohort_protocol::rng::SplitMix64::new(7);
    let syllables = [
        "ka", "lo", "ve", "mi", "ru", "sa", "to", "ne", "di", "pa", "gor", "lin",
    ];
    let mut word = || {
        (0..2 + rng.next_u64() % 2)
            .map(|_| syllables[(rng.next_u64() % syllables.len() as u64) as usize])
            .collect::<String>()
    };
    let mut f = std::fs::File::create(path).unwrap();
    for _ in 0..n {
        let (a, b, c, d) = (word(), word(), word(), word());
        writeln!(
            f,
            r#"{{"messages":[{{"role":"user","content":"What does {a} {b} mean in Velmoran?"}},{{"role":"assistant","content":"{a} {b} means {c} {d}."}}]}}"#
        )
        .unwrap();
    }
}

/// A generated tiny model at `dir/tiny.gguf`, and a node at `dir/a` that publishes the datanet
/// `velmora` (160 facts in at least five shards).
fn tiny_model_and_velmora(dir: &std::path::Path) -> (Node, std::path::PathBuf) {
    let model = dir.join("tiny.gguf");
    success(
        cohort(&dir.join("unused"))
            .args(["model", "tiny"])
            .arg(&model)
            .output()
            .unwrap(),
    );
    let a = Node::start(&dir.join("a"), &[]);
    a.json(&["datanet", "create", "velmora", "--schema", "chat"]);
    let file = dir.join("facts.jsonl");
    write_facts(&file, 160);
    let added = a.json(&[
        "datanet",
        "add",
        "velmora",
        file.to_str().unwrap(),
        "--shard-bytes",
        "3000",
    ]);
    assert!(added["shards"].as_array().unwrap().len() >= 5, "{added}");
    a.json(&["datanet", "publish", "velmora"]);
    (a, model)
}

fn job_status(node: &Node, job: &str) -> Value {
    node.json(&["job", "status", job])
}

fn phase_of(node: &Node, job: &str) -> Option<(u64, String)> {
    let out = node.cmd().args(["--json", "job", "list"]).output().ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["jobs"].as_array()?.iter().find_map(|j| {
        (j["job"].as_str() == Some(job)).then(|| {
            (
                j["status"]["round"].as_u64().unwrap_or(0),
                j["status"]["phase"].as_str().unwrap_or("").to_owned(),
            )
        })
    })
}

fn verdict<'a>(round: &'a Value, peer: &str) -> Option<&'a Value> {
    round["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["worker"] == peer)
}

#[test]
fn a_federated_job_survives_dropouts_bad_updates_and_a_coordinator_restart() {
    let tmp = tempfile::tempdir().unwrap();
    // The data owner, who also coordinates the job.
    let (mut a, model) = tiny_model_and_velmora(tmp.path());

    let boot = a.bootstrap.clone();
    let v1 = Node::start(
        &tmp.path().join("v1"),
        &["--bootstrap", &boot, "--volunteer"],
    );
    let v2 = Node::start(
        &tmp.path().join("v2"),
        &["--bootstrap", &boot, "--volunteer"],
    );
    let mut v3 = Node::start(
        &tmp.path().join("v3"),
        &["--bootstrap", &boot, "--volunteer"],
    );
    let bad = Node::start(
        &tmp.path().join("bad"),
        &[
            "--bootstrap",
            &boot,
            "--volunteer",
            "--volunteer-fault",
            "nan",
        ],
    );
    let big = Node::start(
        &tmp.path().join("big"),
        &[
            "--bootstrap",
            &boot,
            "--volunteer",
            "--volunteer-fault",
            "oversized",
        ],
    );
    let liar = Node::start(
        &tmp.path().join("liar"),
        &[
            "--bootstrap",
            &boot,
            "--volunteer",
            "--volunteer-fault",
            "made-up",
        ],
    );
    // Consumers: not volunteers, they only use the result.
    let consumer = Node::start(&tmp.path().join("consumer"), &["--bootstrap", &boot]);
    let wary = Node::start(&tmp.path().join("wary"), &["--bootstrap", &boot]);

    // Bad values are refused before anything starts, naming the field.
    let err = a.fails(&[
        "job",
        "create",
        "--datanet",
        "velmora",
        "--model",
        model.to_str().unwrap(),
        "--rank",
        "0",
    ]);
    assert!(err.contains("adapter.rank"), "{err}");

    let created = a.json(&[
        "job",
        "create",
        "--name",
        "velmora-facts",
        "--datanet",
        "velmora",
        "--model",
        model.to_str().unwrap(),
        // Rank 8 on every projection: the merged adapter (64 KiB) is stored as a file, which
        // the tamper test below corrupts.
        "--rank",
        "8",
        "--targets",
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "--learning-rate",
        "0.01",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--rounds",
        "2",
        "--min-updates",
        "2",
        "--max-workers",
        "8",
        "--enroll-secs",
        "5",
        "--train-secs",
        "40",
        "--validate-secs",
        "120",
        "--segment-steps",
        "2",
        "--audit-rate",
        "1",
        "--validation-fraction",
        "0.1",
    ]);
    let job = created["job"].as_str().unwrap().to_owned();

    // v3 enrols in round 0, then dies before it can train.
    wait_until("v3 to join round 0", Duration::from_secs(60), || {
        phase_of(&v3, &job).filter(|(r, p)| *r == 0 && p == "joined")
    });
    v3.kill();

    // Round 0 closes at its commit deadline with the updates that did arrive.
    let status = wait_until("round 0 to close", Duration::from_secs(180), || {
        let s = job_status(&a, &job);
        (s["closed_rounds"].as_array().is_some_and(|r| !r.is_empty())).then_some(s)
    });
    let r0 = &status["closed_rounds"][0];
    assert_eq!(r0["outcome"], "Merged", "{status}\n{}", a.logs());
    for v in [&v1, &v2] {
        assert_eq!(verdict(r0, &v.id).unwrap()["rejected"], Value::Null, "{r0}");
    }
    assert_eq!(
        verdict(r0, &bad.id).unwrap()["rejected"],
        "NonFinite",
        "{r0}"
    );
    assert_eq!(
        verdict(r0, &big.id).unwrap()["rejected"],
        "NormBound",
        "{r0}"
    );
    let lie = verdict(r0, &liar.id).unwrap()["rejected"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(lie.starts_with("SpotCheckMismatch"), "{r0}");
    assert!(verdict(r0, &v3.id).is_none(), "{r0}");
    let before = r0["validation_loss_before"].as_f64().unwrap();
    let after = r0["validation_loss_after"].as_f64().unwrap();
    assert!(
        after < before,
        "round 0 did not improve validation: {before} -> {after}"
    );

    // The coordinator dies in round 1 and comes back on the same address.
    wait_until("round 1 to open", Duration::from_secs(60), || {
        phase_of(&a, &job).filter(|(r, _)| *r == 1)
    });
    let addr = a.addr.clone();
    a.kill();
    let a = Node::start(&tmp.path().join("a"), &["--bind", &addr]);
    assert!(a.logs().contains("resuming job"), "{}", a.logs());
    let status = wait_until("the job to finish", Duration::from_secs(240), || {
        let s = job_status(&a, &job);
        (s["finished"] == true).then_some(s)
    });
    let rounds = status["closed_rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{status}");
    assert_eq!(rounds[1]["outcome"], "Merged", "{status}\n{}", a.logs());
    // The NaN volunteer and the one caught by a spot check are barred from round 1 (the bar
    // survived the coordinator's restart); the oversized one is not (the norm bound also
    // catches honest outliers). When it made it into round 1 (it has to find the restarted
    // coordinator within the enrolment period) with at least two good updates, the norm bound
    // refuses it again; beside a single good update the median of two is their mean, which
    // neither exceeds threefold, so the bound cannot refuse it there.
    for cheat in [&bad, &liar] {
        assert!(verdict(&rounds[1], &cheat.id).is_none(), "{status}");
    }
    let big_again = verdict(&rounds[1], &big.id).map(|v| v["rejected"].clone());
    let others_merged = rounds[1]["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["worker"] != big.id.as_str() && v["rejected"].is_null())
        .count();
    if big_again.is_some() && others_merged >= 2 {
        assert_eq!(big_again, Some(Value::from("NormBound")), "{status}");
    }
    let big_failed = 1 + usize::from(big_again == Some(Value::from("NormBound")));

    // Every peer pulls the coordinator's chain and verifies it.
    for peer in [&a, &v1, &v2, &bad, &big, &liar, &consumer, &wary] {
        wait_until(
            "the ledger to reach every peer",
            Duration::from_secs(60),
            || {
                let l = peer.json(&["ledger", "show"]);
                let n = l["chains"]
                    .as_array()?
                    .iter()
                    .find(|c| c["coordinator"] == a.id.as_str())?["entries"]
                    .as_array()?
                    .len();
                (n == 2).then_some(())
            },
        );
        let out = peer.cmd().args(["ledger", "verify"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ledger verify on {}: {text}{}",
            peer.id,
            String::from_utf8_lossy(&out.stderr)
        );
        // Both rounds were recomputed from the published blobs (merge, losses, Shapley values,
        // credits), not only checked for signatures.
        assert!(text.contains("2 entries, 2 recomputed"), "{text}");
    }
    let ledger = v1.json(&["ledger", "show"]);
    let totals = &ledger["totals"];
    assert!(
        totals["volunteer_tokens"][&v1.id].as_u64().unwrap() > 0,
        "{totals}"
    );
    for (cheat, failed) in [(&bad, 1), (&big, big_failed), (&liar, 1)] {
        assert_eq!(
            totals["volunteer_failed_updates"][&cheat.id], failed,
            "{totals}"
        );
        // Credit only for verified work: none unless the oversized update slipped through
        // beside a single other one (above).
        if failed == 2 || cheat.id != big.id {
            assert!(
                totals["volunteer_tokens"].get(&cheat.id).is_none(),
                "{totals}"
            );
        }
    }
    let owner_credit: f64 = totals["contributors"][&a.id]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(owner_credit > 0.0, "{totals}");

    // A consumer that took no part chats with the job's latest merged adapter: it learns the
    // job from the ledger, its spec from the coordinator, and fetches the base model and the
    // adapter by hash.
    let answer = consumer.json(&[
        "chat",
        "--job",
        &job[..16],
        "--prompt",
        "Where is the harbour of Velm7?",
        "--compare",
    ]);
    let final_adapter = rounds[1]["merged_adapter"].as_str().unwrap().to_owned();
    assert!(
        answer["model"].as_str().unwrap().ends_with(&job),
        "{answer}"
    );
    assert!(
        answer["adapter"].is_string() && answer["base"].is_string(),
        "{answer}"
    );
    let base = status["base_model"].as_str().unwrap().to_owned();
    let (code, _, body) = openai(&consumer, &format!("{base}:{final_adapter}"));
    assert_eq!(code, 200, "{body}");

    // The coordinator's copy of the final adapter rots on disk; the other consumer, for whom the
    // coordinator is the only provider, refuses the bytes and says so.
    let mut a = a;
    let a_bind = a.addr.clone();
    a.stop();
    let blob = tmp
        .path()
        .join("a/blobs/data")
        .join(format!("{final_adapter}.data"));
    let mut bytes = std::fs::read(&blob).unwrap_or_else(|e| panic!("{}: {e}", blob.display()));
    let mid = bytes.len() / 2;
    for x in &mut bytes[mid..mid + 64] {
        *x ^= 0xff;
    }
    std::fs::write(&blob, &bytes).unwrap();
    let a = Node::start(&tmp.path().join("a"), &["--bind", &a_bind]);
    let (code, _, body) = openai(&wary, &format!("{base}:{final_adapter}"));
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no provider served it"), "{body}");
    let counts = wary.json(&["status"])["rejected"][&a.id].clone();
    let penalised =
        counts["bad_shard"].as_u64().unwrap_or(0) + counts["failed_transfer"].as_u64().unwrap_or(0);
    assert!(penalised >= 1, "{counts}\n{body}");

    // A tampered entry fails verification, loudly.
    let mut v1 = v1;
    v1.stop();
    tamper_first_entry(&v1.dir);
    let v1 = Node::start(&v1.dir, &["--bootstrap", &a.bootstrap]);
    let out = v1.cmd().args(["ledger", "verify"]).output().unwrap();
    assert!(!out.status.success(), "a tampered ledger verified");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL"), "{text}");
}

/// One chat completion on a node's OpenAI-compatible API.
fn openai(node: &Node, model: &str) -> (u16, Vec<(String, String)>, String) {
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(node.dir.join("node.json")).unwrap())
            .unwrap();
    let addr = info["http"].as_str().unwrap().to_owned();
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Where is the harbour of Velm7?"}],
        "max_tokens": 8,
        "temperature": 0,
    });
    http(
        &addr,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(&body.to_string()),
    )
}

/// Flips one byte of the signature of the first stored ledger entry, in the node's store.
fn tamper_first_entry(dir: &std::path::Path) {
    use cohort_peer::data_dir::DataDir;
    use cohort_peer::store::{Batch, Cf};
    let d = DataDir::new(dir);
    let store = d.open_store(&d.keypair().unwrap()).unwrap();
    let (key, mut value) = store
        .scan_prefix(Cf::Ledger, &[])
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.len() == 40)
        .expect("a stored entry");
    let n = value.len();
    value[n - 10] ^= 0x40;
    let mut b = Batch::default();
    store.put(&mut b, Cf::Ledger, &key, &value);
    store.write(b).unwrap();
}

/// Creates a one-round job on `node` with Multi-Krum (`--byzantine 1`) over `datanet`; its id.
fn filtered_job(node: &Node, model: &std::path::Path, datanet: &str) -> String {
    let created = node.json(&[
        "job",
        "create",
        "--datanet",
        datanet,
        "--model",
        model.to_str().unwrap(),
        "--rank",
        "4",
        "--learning-rate",
        "0.01",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--rounds",
        "1",
        "--min-updates",
        "3",
        "--max-workers",
        "5",
        "--enroll-secs",
        "15",
        "--train-secs",
        "60",
        "--validate-secs",
        "120",
        "--segment-steps",
        "2",
        "--validation-fraction",
        "0.1",
        "--byzantine",
        "1",
    ]);
    created["job"].as_str().unwrap().to_owned()
}

/// The chain of `coordinator` in `ledger verify --json`'s answer.
fn chain_report<'a>(report: &'a Value, coordinator: &str) -> &'a Value {
    report["chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["coordinator"] == coordinator)
        .unwrap_or_else(|| panic!("no chain of {coordinator}: {report}"))
}

/// Multi-Krum inside real rounds, checked by `ledger verify`: with `--byzantine 1` and five
/// volunteers, the coordinator refuses one of the updates as an outlier, and every peer
/// recomputes that verdict from the published updates (the refused one included). A second
/// coordinator that lies about its filter (the hidden `misfilter` fault: it refuses the most
/// central update instead of the farthest, and signs that) has its entry rejected by
/// `ledger verify`, naming the updates each side refuses.
#[test]
fn ledger_verify_recomputes_the_robust_filter() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, model) = tiny_model_and_velmora(tmp.path());
    let boot = a.bootstrap.clone();
    let liar = Node::start(
        &tmp.path().join("liar"),
        &["--bootstrap", &boot, "--coordinator-fault", "misfilter"],
    );
    // The volunteers know both coordinators from the start (finding a coordinator is not what
    // this test is about), and hold the datanet before the first job is announced.
    let volunteers: Vec<Node> = (0..5)
        .map(|i| {
            Node::start(
                &tmp.path().join(format!("v{i}")),
                &[
                    "--bootstrap",
                    &boot,
                    "--bootstrap",
                    &liar.bootstrap,
                    "--volunteer",
                ],
            )
        })
        .collect();
    for peer in volunteers.iter().chain([&liar]) {
        peer.wait_for_version("velmora", 1);
    }

    // One honest round, then one by the liar, on the same volunteers.
    let mut outliers = Vec::new();
    for coordinator in [&a, &liar] {
        let job = filtered_job(coordinator, &model, "velmora");
        let started = std::time::Instant::now();
        let status = loop {
            let s = job_status(coordinator, &job);
            if s["finished"] == true {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "the filtered job did not finish: {s}\n{}",
                coordinator.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        let round = &status["closed_rounds"][0];
        assert_eq!(
            round["outcome"],
            "Merged",
            "{status}\n{}",
            coordinator.logs()
        );
        let verdicts = round["verdicts"].as_array().unwrap();
        // Five volunteers (Multi-Krum with f = 1 needs room for 2f + 3); one that joined late
        // leaves four, still enough for the filter to refuse one.
        assert!(verdicts.len() >= 4, "{round}\n{}", coordinator.logs());
        let refused: Vec<&str> = verdicts
            .iter()
            .filter(|v| v["rejected"] == "Outlier")
            .map(|v| v["worker"].as_str().unwrap())
            .collect();
        assert_eq!(refused.len(), 1, "{round}");
        assert_eq!(
            verdicts.iter().filter(|v| v["rejected"].is_null()).count(),
            verdicts.len() - 1,
            "{round}"
        );
        outliers.push(refused[0].to_owned());
    }

    // Every peer, the liar included, recomputes both rounds.
    for peer in volunteers.iter().chain([&a, &liar]) {
        wait_until(
            "both chains to reach the peer",
            Duration::from_secs(60),
            || {
                let l = peer.json(&["ledger", "show"]);
                (l["chains"].as_array()?.len() == 2).then_some(())
            },
        );
        let out = peer
            .cmd()
            .args(["--json", "ledger", "verify"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the liar's chain verified on {}",
            peer.id
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let honest = chain_report(&report, &a.id);
        assert_eq!(honest["problems"], serde_json::json!([]), "{report}");
        assert_eq!(honest["recomputed"], 1, "{report}");
        let lying = chain_report(&report, &liar.id);
        let problems = lying["problems"].as_array().unwrap();
        assert_eq!(problems.len(), 1, "{report}");
        let p = problems[0].as_str().unwrap();
        assert!(
            p.contains("Multi-Krum over the published updates refuses"),
            "{p}"
        );
        // The problem names the update the liar refused and the one Multi-Krum refuses.
        let short = |id: &str| id[..10].to_owned();
        assert!(p.contains(&short(&outliers[1])), "{p}");
        assert_eq!(lying["recomputed"], 0, "{report}");
    }
}
