//! Datanets across real `cohort up` processes on 127.0.0.1: publish, fetch, sync, contribute,
//! and a store that survives SIGKILL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cohort_tests::{Node, wait_until, write_chat_records};
use serde_json::Value;

fn shard_hashes(d: &Value) -> Vec<String> {
    let mut v: Vec<String> = d["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["hash"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

fn all_local(d: &Value) -> bool {
    d["shards"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["local"] == true)
}

#[test]
fn owner_publishes_and_two_peers_fetch_verify_and_serve_on() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::start(&tmp.path().join("a"), &[]);
    let b = Node::start(&tmp.path().join("b"), &["--bootstrap", &a.bootstrap]);
    let c = Node::start(&tmp.path().join("c"), &["--bootstrap", &a.bootstrap]);

    a.json(&[
        "datanet",
        "create",
        "recipes",
        "--schema",
        "chat",
        "--license",
        "CC-BY-4.0",
        "--description",
        "cooking chats",
    ]);
    let file = tmp.path().join("recipes.jsonl");
    write_chat_records(&file, 0, 2000, 100);
    let added = a.json(&[
        "datanet",
        "add",
        "recipes",
        file.to_str().unwrap(),
        "--shard-bytes",
        "65536",
    ]);
    assert_eq!(added["records_read"], 2000);
    assert!(added["shards"].as_array().unwrap().len() > 1);
    let published = a.json(&["datanet", "publish", "recipes"]);
    assert_eq!(published["version"], 1);
    assert_eq!(published["records"], 2000);
    let owner_view = a.datanet("recipes").unwrap();
    assert!(all_local(&owner_view));

    // Both peers learn the manifest (gossip announcement, then a pull over cohort/1).
    for peer in [&b, &c] {
        let d = peer.wait_for_version("recipes", 1);
        assert_eq!(d["owner"], a.id.as_str());
        assert_eq!(d["license"], "CC-BY-4.0");
        assert_eq!(shard_hashes(&d), shard_hashes(&owner_view));
        assert!(!all_local(&d), "nothing is fetched yet");
    }

    // B fetches from the owner; every shard arrives verified against its hash.
    let fetched = b.json(&["datanet", "fetch", "recipes"]);
    assert_eq!(
        fetched["report"]["fetched"].as_u64().unwrap() as usize,
        shard_hashes(&owner_view).len()
    );
    assert!(all_local(&b.datanet("recipes").unwrap()));

    // With the owner gone, C still fetches every shard: from B, which serves them on.
    a.stop();
    assert!(
        !a.dir.join("node.json").exists(),
        "a clean shutdown removes node.json"
    );
    let fetched = c.json(&["datanet", "fetch", "recipes"]);
    assert_eq!(
        fetched["report"]["fetched"].as_u64().unwrap() as usize,
        shard_hashes(&owner_view).len()
    );
    let d = c.datanet("recipes").unwrap();
    assert!(all_local(&d));
    assert_eq!(d["records"], 2000);
    // A second fetch has nothing to do.
    let again = c.json(&["datanet", "fetch", "recipes"]);
    assert_eq!(again["report"]["fetched"], 0);
}

#[test]
fn a_late_joiner_catches_up_by_anti_entropy() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), &[]);
    a.json(&["datanet", "create", "early", "--schema", "alpaca"]);
    let f1 = tmp.path().join("one.jsonl");
    std::fs::write(
        &f1,
        "{\"instruction\":\"add\",\"input\":\"1 2\",\"output\":\"3\"}\n",
    )
    .unwrap();
    a.json(&["datanet", "add", "early", f1.to_str().unwrap()]);
    let v1 = a.json(&["datanet", "publish", "early"]);
    let f2 = tmp.path().join("two.jsonl");
    std::fs::write(
        &f2,
        "{\"instruction\":\"add\",\"input\":\"2 2\",\"output\":\"4\"}\n",
    )
    .unwrap();
    a.json(&["datanet", "add", "early", f2.to_str().unwrap()]);
    let v2 = a.json(&["datanet", "publish", "early"]);
    assert_eq!(v2["version"], 2);

    // Both announcements went out before D existed: only anti-entropy can bring them. D also
    // knows a peer that never answers; it must not hold the sync up.
    let dead = cohort_protocol::Keypair::from_seed(&[99; 32])
        .peer_id()
        .to_string()
        + "@127.0.0.1:9";
    let d = Node::start(
        &tmp.path().join("d"),
        &["--bootstrap", &dead, "--bootstrap", &a.bootstrap],
    );
    let seen = d.wait_for_version("early", 2);
    assert_eq!(seen["manifest"], v2["manifest"]);
    assert_eq!(
        seen["previous"], v1["manifest"],
        "the chain to version 1 is held"
    );
    assert_eq!(seen["records"], 2);
    d.json(&["datanet", "fetch", "early"]);
    assert!(all_local(&d.datanet("early").unwrap()));
}

#[test]
fn a_contribution_is_approved_into_the_next_version_with_its_contributor() {
    let tmp = tempfile::tempdir().unwrap();
    let owner = Node::start(&tmp.path().join("owner"), &[]);
    let contributor = Node::start(
        &tmp.path().join("contrib"),
        &["--bootstrap", &owner.bootstrap],
    );
    owner.json(&["datanet", "create", "shared", "--schema", "chat"]);
    let f = tmp.path().join("own.jsonl");
    write_chat_records(&f, 0, 10, 10);
    owner.json(&["datanet", "add", "shared", f.to_str().unwrap()]);
    owner.json(&["datanet", "publish", "shared"]);
    contributor.wait_for_version("shared", 1);

    let g = tmp.path().join("gift.jsonl");
    write_chat_records(&g, 100, 5, 10);
    let sent = contributor.json(&[
        "datanet",
        "contribute",
        "shared",
        g.to_str().unwrap(),
        "--note",
        "five more",
    ]);
    let id = sent["submissions"][0].as_str().unwrap().to_owned();

    let listed = owner.json(&["datanet", "review"]);
    let sub = &listed["submissions"][0];
    assert_eq!(sub["id"], id.as_str());
    assert_eq!(sub["contributor"], contributor.id.as_str());
    assert_eq!(sub["note"], "five more");
    assert_eq!(sub["status"]["state"], "pending");

    let approved = owner.json(&["datanet", "review", "--approve", &id[..12]]);
    assert_eq!(approved["status"]["state"], "approved");
    assert_eq!(approved["contributor_notified"], true);
    // The contributor holds the owner's signed decision.
    let mine = contributor.json(&["datanet", "review"]);
    let sub = mine["submissions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id.as_str())
        .expect("the contributor lists its submission");
    assert_eq!(sub["status"]["state"], "approved", "{mine}");
    let v2 = owner.json(&["datanet", "publish", "shared"]);
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["records"], 15);

    let seen = contributor.wait_for_version("shared", 2);
    let shards = seen["shards"].as_array().unwrap();
    let theirs: Vec<_> = shards
        .iter()
        .filter(|s| s["contributor"] == contributor.id.as_str())
        .collect();
    assert_eq!(theirs.len(), 1, "{seen}");
    assert_eq!(theirs[0]["records"], 5);
    assert!(shards.iter().any(|s| s["contributor"] == owner.id.as_str()));

    // A decided submission cannot be decided again; a rejection needs a reason.
    let err = owner.fails(&["datanet", "review", "--reject", &id, "--reason", "late"]);
    assert!(err.contains("already decided"), "{err}");
}

#[test]
fn sigkill_during_import_leaves_a_consistent_store_and_loses_nothing_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut a = Node::start(&dir, &[]);
    a.json(&["datanet", "create", "big", "--schema", "chat"]);
    let small = tmp.path().join("small.jsonl");
    write_chat_records(&small, 0, 50, 10);
    let committed = a.json(&["datanet", "add", "big", small.to_str().unwrap()]);
    let committed: Vec<String> = committed["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["hash"].as_str().unwrap().to_owned())
        .collect();

    let large = tmp.path().join("large.jsonl");
    write_chat_records(&large, 1000, 120_000, 200);
    let add = a
        .cmd()
        .args([
            "datanet",
            "add",
            "big",
            large.to_str().unwrap(),
            "--shard-bytes",
            "1048576",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the node while the import runs: once its first shards reach the blob store.
    let data = dir.join("blobs").join("data");
    wait_until("the import to write blobs", Duration::from_secs(60), || {
        let n = std::fs::read_dir(&data).map(|d| d.count()).unwrap_or(0);
        (n > 0).then_some(())
    });
    a.kill();
    let out = add.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the import finished before the kill; the test needs a bigger file"
    );

    // The store opens, everything committed is still there, and every recorded shard's blob
    // is present.
    let a = Node::start(&dir, &[]);
    let d = a.datanet("big").unwrap();
    let pending = d["pending"].as_array().unwrap();
    for h in &committed {
        assert!(pending.iter().any(|p| p["hash"] == h.as_str()), "lost {h}");
    }
    assert!(pending.iter().all(|p| p["local"] == true), "{d}");
    // The interrupted import can simply be run again.
    let again = a.json(&[
        "datanet",
        "add",
        "big",
        large.to_str().unwrap(),
        "--shard-bytes",
        "1048576",
    ]);
    assert_eq!(again["records_read"], 120_000);
    let v = a.json(&["datanet", "publish", "big"]);
    assert_eq!(v["records"], 120_050);
    assert!(all_local(&a.datanet("big").unwrap()));
}

fn http(addr: &str, request: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_api_serves_the_dashboard_and_changes_need_the_bearer_token() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), &[]);
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(a.dir.join("node.json")).unwrap()).unwrap();
    let addr = info["http"].as_str().unwrap();
    let page = http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.to_lowercase().contains("content-type: text/html"));
    let body = r#"{"name":"x","schema":"chat"}"#;
    let create = |auth: &str| {
        http(
            addr,
            &format!(
                "POST /api/datanets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n{body}",
                body.len()
            ),
        )
    };
    assert!(create("").starts_with("HTTP/1.1 401"));
    assert!(create("Authorization: Bearer wrong\r\n").starts_with("HTTP/1.1 401"));
    let token = std::fs::read_to_string(a.dir.join("api.token")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(a.dir.join("api.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let ok = create(&format!("Authorization: Bearer {}\r\n", token.trim()));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(a.json(&["datanet", "list"])["datanets"][0]["name"], "x");
}
