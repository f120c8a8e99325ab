//! Hostile input against real `cohort up` processes: malformed, oversized, unsigned, wrongly
//! signed and replayed announcements, a tampered manifest and a shard whose bytes do not match
//! its hash are rejected, counted per peer, and never stop the node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_peer::state::DatanetRecord;
use cohort_peer::store::{Batch, Cf, Store};
use cohort_protocol::types::rpc::{Request, RequestBody};
use cohort_protocol::types::{Announcement, AnnouncementBody, Manifest, Timestamp};
use cohort_protocol::{Canonical, ContentHash, Keypair, Signed};
use cohort_tests::{Node, success, wait_until, write_chat_records};
use serde_json::Value;

fn rejected(node: &Node, peer: &str) -> Value {
    node.json(&["status"])["rejected"][peer].clone()
}

/// Sends `request` bytes to `to` over cohort/1 with the key in `attacker`; returns the answer.
fn send(attacker: &std::path::Path, to: &Node, request: &[u8]) -> String {
    let file = attacker.join("request.bin");
    std::fs::write(&file, request).unwrap();
    success(
        cohort_tests::cohort(attacker)
            .args(["debug", "send", "--to", &to.bootstrap])
            .arg(&file)
            .output()
            .unwrap(),
    )
}

fn announce(bytes: Vec<u8>) -> Vec<u8> {
    Request {
        version: 1,
        body: RequestBody::Announce { bytes },
    }
    .to_bytes()
}

#[test]
fn bad_announcements_are_rejected_and_counted_per_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), &[]);
    let x_dir = tmp.path().join("x");
    let x_id = success(cohort_tests::cohort(&x_dir).arg("init").output().unwrap());
    let x_id = x_id.trim().to_owned();
    let x = Keypair::load(&x_dir.join("peer.key")).unwrap();
    let other = Keypair::from_seed(&[42; 32]);
    let notice = |seq| Announcement {
        seq,
        at: Timestamp(1),
        body: AnnouncementBody::Provides {
            hashes: vec![ContentHash::of(b"shard")],
        },
    };

    // Not a request at all.
    let out = send(&x_dir, &a, b"\x07garbage");
    assert!(out.contains("Refused"), "{out}");
    // An announcement over the gossip size limit.
    let out = send(&x_dir, &a, &announce(vec![0; 5000]));
    assert!(out.contains("Refused"), "{out}");
    // Bytes that are not an announcement.
    send(&x_dir, &a, &announce(vec![1, 2, 3]));
    // Unsigned: a zero signature.
    let good = Signed::sign(&x, &notice(1));
    let unsigned = Signed::<Announcement>::from_parts(
        good.domain().to_owned(),
        good.version(),
        good.signer(),
        good.payload_bytes().to_vec(),
        [0; 64],
    );
    send(&x_dir, &a, &announce(unsigned.to_bytes()));
    // Wrongly signed: the signature of another key over the same envelope.
    let by_other = Signed::sign(&other, &notice(1));
    let wrong = Signed::<Announcement>::from_parts(
        good.domain().to_owned(),
        good.version(),
        good.signer(),
        good.payload_bytes().to_vec(),
        *by_other.signature(),
    );
    send(&x_dir, &a, &announce(wrong.to_bytes()));
    // A good one is accepted once, and refused when replayed.
    let out = send(&x_dir, &a, &announce(good.to_bytes()));
    assert!(out.contains("Accepted"), "{out}");
    let out = send(&x_dir, &a, &announce(good.to_bytes()));
    assert!(out.contains("Replayed"), "{out}");

    let counts = rejected(&a, &x_id);
    assert_eq!(counts["malformed"], 2, "{counts}");
    assert_eq!(counts["oversized"], 1, "{counts}");
    assert_eq!(counts["bad_signature"], 2, "{counts}");
    assert_eq!(counts["replayed"], 1, "{counts}");
    // The node is fine and keeps working.
    let status = a.json(&["status"]);
    assert_eq!(status["rejected_total"], 6);
    a.json(&["datanet", "create", "still-alive", "--schema", "chat"]);
    // `cohort status` shows the counters to a person too.
    let text = success(a.cmd().arg("status").output().unwrap());
    assert!(
        text.contains(&x_id) && text.contains("bad_signature"),
        "{text}"
    );
}

#[test]
fn a_tampered_manifest_is_rejected_and_counted_against_its_server() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), &[]);
    a.json(&["datanet", "create", "honest", "--schema", "chat"]);
    let f = tmp.path().join("r.jsonl");
    write_chat_records(&f, 0, 5, 5);
    a.json(&["datanet", "add", "honest", f.to_str().unwrap()]);
    a.json(&["datanet", "publish", "honest"]);

    // H copies version 1, then (offline) edits it in its own store and re-signs it with its
    // own key, stored as the head under its new hash.
    let h_dir = tmp.path().join("h");
    let mut h = Node::start(&h_dir, &["--bootstrap", &a.bootstrap]);
    let real = h.wait_for_version("honest", 1);
    let h_bind = h.addr.clone();
    h.stop();
    {
        let key = Keypair::load(&h_dir.join("peer.key")).unwrap();
        let store = Store::open(&h_dir.join("meta"), &key.peer_id()).unwrap();
        let manifest_hash: ContentHash = real["manifest"].as_str().unwrap().parse().unwrap();
        let signed = Signed::<Manifest>::from_bytes(
            &store
                .get(Cf::Manifests, manifest_hash.as_bytes())
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        let mut m = signed.verify().unwrap();
        m.description = "free crypto here".into();
        // H cannot forge the owner's signature, so it signs the edit with its own key (a
        // manifest edited under the owner's old signature is refused by the unit tests of
        // `State::ingest_manifest`; the node never serves a manifest that does not verify).
        let tampered = Signed::sign(&key, &m);
        let id: ContentHash = real["id"].as_str().unwrap().parse().unwrap();
        let mut record =
            DatanetRecord::from_bytes(&store.get(Cf::Datanets, id.as_bytes()).unwrap().unwrap())
                .unwrap();
        record.head.as_mut().unwrap().manifest = tampered.hash();
        let mut batch = Batch::default();
        store.put(
            &mut batch,
            Cf::Manifests,
            tampered.hash().as_bytes(),
            &tampered.to_bytes(),
        );
        store.put(&mut batch, Cf::Datanets, id.as_bytes(), &record.to_bytes());
        store.write(batch).unwrap();
    }
    let h = Node::start(&h_dir, &["--bind", &h_bind]);

    // E knows only H; it asks H for heads and is served the tampered manifest.
    let e = Node::start(&tmp.path().join("e"), &["--bootstrap", &h.bootstrap]);
    let counts = wait_until(
        "E to reject H's tampered manifest",
        std::time::Duration::from_secs(60),
        || {
            let c = rejected(&e, &h.id);
            c["invalid"].as_u64().is_some_and(|n| n >= 1).then_some(c)
        },
    );
    assert!(counts["invalid"].as_u64().unwrap() >= 1, "{counts}");
    // E never stores it: it holds no version with the tampered text.
    if let Some(d) = e.datanet("honest") {
        assert_ne!(d["description"], "free crypto here", "{d}");
    }
}

#[test]
fn a_shard_with_wrong_bytes_is_discarded_and_its_provider_penalised() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Node::start(&tmp.path().join("a"), &[]);
    let b_dir = tmp.path().join("b");
    let mut b = Node::start(&b_dir, &["--bootstrap", &a.bootstrap]);
    let d = Node::start(&tmp.path().join("d"), &["--bootstrap", &a.bootstrap]);
    a.json(&["datanet", "create", "blobs", "--schema", "chat"]);
    // One shard well over iroh-blobs' 16 KiB inline limit, so it is a file on disk.
    let f = tmp.path().join("r.jsonl");
    write_chat_records(&f, 0, 2000, 100);
    a.json(&["datanet", "add", "blobs", f.to_str().unwrap()]);
    a.json(&["datanet", "publish", "blobs"]);
    let view = b.wait_for_version("blobs", 1);
    let shard = view["shards"][0]["hash"].as_str().unwrap().to_owned();
    d.wait_for_version("blobs", 1);

    // B fetches and announces that it provides the shard; D indexes that.
    b.json(&["datanet", "fetch", "blobs"]);
    wait_until(
        "D to index B as a provider",
        std::time::Duration::from_secs(30),
        || (d.json(&["status"])["indexed_hashes"].as_u64() >= Some(1)).then_some(()),
    );

    // B's copy rots on disk.
    let b_bind = b.addr.clone();
    b.stop();
    let data = b_dir
        .join("blobs")
        .join("data")
        .join(format!("{shard}.data"));
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    for x in &mut bytes[mid..mid + 64] {
        *x ^= 0xff;
    }
    std::fs::write(&data, &bytes).unwrap();
    let b = Node::start(&b_dir, &["--bind", &b_bind, "--bootstrap", &a.bootstrap]);

    // With the owner away, B is the only provider. iroh-blobs verifies on both sides: B's
    // store finds its bytes do not match the hash and resets the stream (a requester's bao
    // decoder would equally refuse a mismatching stream). D gets no bad byte, discards the
    // partial transfer and penalises B.
    let a_bind = a.addr.clone();
    a.stop();
    let err = d.fails(&["datanet", "fetch", "blobs"]);
    assert!(err.contains("no provider served it"), "{err}");
    let counts = rejected(&d, &b.id);
    let penalised =
        counts["bad_shard"].as_u64().unwrap_or(0) + counts["failed_transfer"].as_u64().unwrap_or(0);
    assert_eq!(penalised, 1, "{counts} {err}");
    assert!(
        !d.datanet("blobs").unwrap()["shards"][0]["local"]
            .as_bool()
            .unwrap()
    );

    // The owner returns; D fetches the true bytes from it.
    let _a = Node::start(&tmp.path().join("a"), &["--bind", &a_bind]);
    let fetched = wait_until(
        "D to fetch from the owner",
        std::time::Duration::from_secs(60),
        || {
            let out = d
                .cmd()
                .args(["--json", "datanet", "fetch", "blobs"])
                .output()
                .unwrap();
            out.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
        },
    );
    assert_eq!(fetched["report"]["fetched"], 1);
    assert_eq!(d.datanet("blobs").unwrap()["shards"][0]["local"], true);
}
