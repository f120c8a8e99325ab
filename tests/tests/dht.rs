//! Discovery through the libp2p Kademlia DHT across real `cohort up` processes on 127.0.0.1:
//! content found by hash without gossip, and providers that go away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use cohort_tests::{Node, wait_until, write_chat_records};
use serde_json::Value;

/// Starts `n` nodes in a binary tree: node i's only DHT bootstrap peer is node (i - 1) / 2, and
/// no node is given a gossip peer. Each level starts in parallel.
fn start_tree(root: &Path, n: usize, extra: &[&str]) -> Vec<Node> {
    let mut nodes: Vec<Node> = vec![Node::start(&root.join("n0"), extra)];
    while nodes.len() < n {
        let level: Vec<usize> = (nodes.len()..n.min(2 * nodes.len() + 1)).collect();
        let started: Vec<Node> = std::thread::scope(|s| {
            let handles: Vec<_> = level
                .iter()
                .map(|&i| {
                    let parent = nodes[(i - 1) / 2].dht_addr.clone();
                    let dir = root.join(format!("n{i}"));
                    s.spawn(move || {
                        let mut args = vec!["--dht-bootstrap", parent.as_str()];
                        args.extend_from_slice(extra);
                        Node::start(&dir, &args)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        nodes.extend(started);
    }
    nodes
}

fn providers(node: &Node, hash: &str) -> Vec<String> {
    node.json(&["dht", "providers", hash])["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

/// Creates a public datanet on `owner` with one file of chat records, publishes it, and
/// returns the shards' hashes and sizes.
fn publish_one(owner: &Node, dir: &Path, name: &str, records: usize) -> Vec<(String, u64)> {
    owner.json(&["datanet", "create", name, "--schema", "chat"]);
    let file = dir.join(format!("{name}.jsonl"));
    write_chat_records(&file, 0, records, 50);
    owner.json(&["datanet", "add", name, file.to_str().unwrap()]);
    owner.json(&["datanet", "publish", name]);
    owner.datanet(name).unwrap()["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["hash"].as_str().unwrap().to_owned(),
                s["bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn twelve_peers_find_a_shard_through_the_dht_and_one_without_its_gossip_fetches_it() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let nodes = start_tree(tmp.path(), 12, &[]);
    eprintln!("12 nodes up in {:?}", started.elapsed());
    let (publisher, fetcher) = (&nodes[5], &nodes[10]);

    // Nothing provides this hash yet: a clear failure, not a hang.
    // Not the BLAKE3 of the empty string: every blob store holds that one.
    let unknown = "7b3c9a0d2e4f6a8b1c3d5e7f9a0b2c4d6e8f0a1b3c5d7e9f1a2b3c4d5e6f7a8b";
    let err = fetcher.fails(&["blob", "fetch", unknown]);
    assert!(err.contains("no provider served it"), "{err}");

    let shards = publish_one(publisher, tmp.path(), "dht-news", 20);
    assert_eq!(shards.len(), 1);
    let (hash, bytes) = shards[0].clone();

    // Every other peer finds the publisher through the DHT alone.
    for n in nodes.iter().filter(|n| n.id != publisher.id) {
        wait_until(
            &format!("{} to find the provider", &n.id[..8]),
            Duration::from_secs(30),
            || providers(n, &hash).contains(&publisher.id).then_some(()),
        );
    }

    // The fetcher has no gossip neighbour and never learned the datanet.
    let status = fetcher.json(&["status"]);
    assert_eq!(status["neighbours"], serde_json::json!([]), "{status}");
    assert_eq!(status["datanets"], 0);
    assert!(
        status["dht"]["routing_peers"].as_u64().unwrap() >= 1,
        "{status}"
    );

    let out = tmp.path().join("fetched.shard");
    let fetched = fetcher.json(&["blob", "fetch", &hash, "--out", out.to_str().unwrap()]);
    assert_eq!(fetched["answered_by"], "dht", "{fetched}");
    assert_eq!(fetched["provider"], publisher.id.as_str());
    assert_eq!(fetched["bytes"], bytes);
    assert!(
        fetched["dht"]["messages"].as_u64().unwrap() >= 1,
        "{fetched}"
    );
    // The bytes on disk are the shard: their BLAKE3 is its hash.
    let hashed = cohort_tests::success(fetcher.cmd().arg("hash").arg(&out).output().unwrap());
    assert!(hashed.starts_with(&hash), "{hashed}");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), bytes);

    // Fetching again is local.
    let again = fetcher.json(&["blob", "fetch", &hash]);
    assert_eq!(again["answered_by"], "local");

    // The publisher resolved by id: its signed address record names its iroh address.
    let resolved = nodes[11].json(&["dht", "resolve", &publisher.id]);
    assert_eq!(
        resolved["lookup"]["addrs"][0],
        publisher.addr.as_str(),
        "{resolved}"
    );
    eprintln!("test took {:?}", started.elapsed());
}

#[test]
fn a_provider_that_goes_away_expires_and_the_fetch_falls_back_to_another() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ttl = ["--dht-record-ttl-secs", "3"];
    let mut a = Node::start(&tmp.path().join("a"), &ttl);
    let with = |boot: &str, gossip: Option<&str>| {
        let mut v = vec!["--dht-bootstrap".to_owned(), boot.to_owned()];
        if let Some(g) = gossip {
            v.extend(["--bootstrap".to_owned(), g.to_owned()]);
        }
        v.extend(ttl.iter().map(|s| (*s).to_owned()));
        v
    };
    let args_b = with(&a.dht_addr, Some(&a.bootstrap));
    let b = Node::start(
        &tmp.path().join("b"),
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let args_c = with(&b.dht_addr, None);
    let c = Node::start(
        &tmp.path().join("c"),
        &args_c.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let args_d = with(&c.dht_addr, None);
    let d = Node::start(
        &tmp.path().join("d"),
        &args_d.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    let shards = publish_one(&a, tmp.path(), "fallback", 20);
    let (hash, _) = shards[0].clone();
    // B learns the datanet by gossip, fetches it and provides the shard too.
    b.wait_for_version("fallback", 1);
    let report = b.json(&["datanet", "fetch", "fallback"]);
    assert_eq!(report["report"]["fetched"], 1, "{report}");

    for n in [&c, &d] {
        wait_until("both providers in the DHT", Duration::from_secs(30), || {
            let ps = providers(n, &hash);
            (ps.contains(&a.id) && ps.contains(&b.id)).then_some(())
        });
    }

    // A goes away without a goodbye. C fetches at once: A's record may still be there, and if
    // A is tried first it is dropped and counted; B serves the shard either way.
    a.kill();
    let fetched = c.json(&["blob", "fetch", &hash]);
    assert_eq!(fetched["answered_by"], "dht", "{fetched}");
    assert_eq!(fetched["provider"], b.id.as_str(), "{fetched}");
    let tried: Vec<Value> = fetched["tried"].as_array().unwrap().clone();
    if !tried.is_empty() {
        let status = c.json(&["status"]);
        assert!(
            status["rejected"][&a.id]["stale_record"].as_u64() >= Some(1),
            "{status}"
        );
        assert!(
            status["dht"]["dropped_providers"].as_u64() >= Some(1),
            "{status}"
        );
        assert!(!providers(&c, &hash).contains(&a.id));
    }

    // D never tried A: A's record leaves its answers only by expiring (3 s TTL), while B,
    // which re-publishes, stays.
    let killed = Instant::now();
    wait_until(
        "A's provider record to expire",
        Duration::from_secs(30),
        || {
            let ps = providers(&d, &hash);
            assert!(ps.contains(&b.id), "B's record must stay: {ps:?}");
            (!ps.contains(&a.id)).then_some(())
        },
    );
    eprintln!(
        "A's record gone from D's answers {:?} after the kill",
        killed.elapsed()
    );
    let fetched = d.json(&["blob", "fetch", &hash]);
    assert_eq!(fetched["provider"], b.id.as_str(), "{fetched}");
    assert_eq!(fetched["tried"], serde_json::json!([]), "{fetched}");
    eprintln!("test took {:?}", started.elapsed());
}
