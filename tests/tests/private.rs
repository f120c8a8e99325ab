//! Private datanets across real processes: shards encrypted under a per-datanet key wrapped to
//! each grantee; providers refuse manifests and blobs to everyone else; revoking rotates the key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_tests::{Node, success, write_chat_records};

fn get_blob(requester: &Node, provider: &Node, hash: &str) -> Result<String, String> {
    let out = requester
        .cmd()
        .args(["debug", "get-blob", "--from", &provider.bootstrap, hash])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn grantees_read_a_private_datanet_others_are_refused_and_revocation_rotates_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), &[]);
    let b = Node::start(&tmp.path().join("b"), &["--bootstrap", &a.bootstrap]);
    let c = Node::start(&tmp.path().join("c"), &["--bootstrap", &a.bootstrap]);

    a.json(&[
        "datanet",
        "create",
        "secret",
        "--schema",
        "chat",
        "--access",
        "allowlist",
    ]);
    let f = tmp.path().join("v1.jsonl");
    write_chat_records(&f, 0, 300, 50);
    a.json(&["datanet", "add", "secret", f.to_str().unwrap()]);
    a.json(&["datanet", "grant", "secret", &b.id]);
    a.json(&["datanet", "publish", "secret"]);
    let owner_view = a.datanet("secret").unwrap();
    let shard = owner_view["shards"][0]["hash"].as_str().unwrap().to_owned();
    assert_eq!(owner_view["access"], "allowlist");
    // The owner reads its own records; the blob itself is ciphertext.
    let own = a.json(&["datanet", "cat", "secret", "--limit", "1"]);
    assert_eq!(own["total"], 300);
    let blob = std::fs::read(
        tmp.path()
            .join("a/blobs/data")
            .join(format!("{shard}.data")),
    )
    .unwrap();
    assert!(!String::from_utf8_lossy(&blob).contains("question 0"));

    // B, a grantee, learns the version, fetches the shards and decrypts them.
    b.wait_for_version("secret", 1);
    b.json(&["datanet", "fetch", "secret"]);
    let read = b.json(&["datanet", "cat", "secret", "--limit", "1000"]);
    assert_eq!(read["total"], 300);
    assert!(read["records"].to_string().contains("question 0"), "{read}");

    // C, not a grantee, is refused the manifest and the shard, by the owner and by B.
    assert!(
        get_blob(&b, &a, &shard).is_ok(),
        "a grantee may fetch directly"
    );
    for provider in [&a, &b] {
        let err = get_blob(&c, provider, &shard).unwrap_err();
        assert!(!err.is_empty());
    }
    c.json(&["sync"]);
    let seen = c.datanet("secret");
    assert!(
        seen.is_none(),
        "C was served the private manifest: {seen:?}"
    );

    // Revoke B, grant C, add records under the rotated key and publish version 2.
    let revoked = a.json(&["datanet", "revoke", "secret", &b.id]);
    assert_eq!(revoked["new_key_epoch"], 1);
    a.json(&["datanet", "grant", "secret", &c.id]);
    let g = tmp.path().join("v2.jsonl");
    write_chat_records(&g, 1000, 100, 50);
    a.json(&["datanet", "add", "secret", g.to_str().unwrap()]);
    a.json(&["datanet", "publish", "secret"]);
    let v2 = a.datanet("secret").unwrap();
    let new_shard = v2["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["hash"].as_str().unwrap().to_owned())
        .find(|h| *h != shard)
        .unwrap();

    // C now reads everything: the old shard (epoch 0) and the new one (epoch 1).
    c.wait_for_version("secret", 2);
    c.json(&["datanet", "fetch", "secret"]);
    let read = c.json(&["datanet", "cat", "secret", "--limit", "0"]);
    assert_eq!(read["total"], 400);

    // C, a grantee, contributes to the private datanet; the owner encrypts the shard on
    // approval and it enters version 3 credited to C.
    let gift = tmp.path().join("gift.jsonl");
    write_chat_records(&gift, 5000, 7, 20);
    let sent = c.json(&["datanet", "contribute", "secret", gift.to_str().unwrap()]);
    let sub = sent["submissions"][0].as_str().unwrap().to_owned();
    a.json(&["datanet", "review", "--approve", &sub]);
    let v3 = a.json(&["datanet", "publish", "secret"]);
    assert_eq!(v3["records"], 407);
    c.wait_for_version("secret", 3);
    c.json(&["datanet", "fetch", "secret"]);
    let read = c.json(&["datanet", "cat", "secret", "--limit", "1000"]);
    assert_eq!(read["total"], 407);
    assert!(read["records"].to_string().contains("question 5006"));
    let seen = c.datanet("secret").unwrap();
    assert!(
        seen["shards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["contributor"] == c.id.as_str() && s["records"] == 7),
        "{seen}"
    );

    // B cannot read version 2: neither its manifest nor its new shard is served to B, and B
    // holds no key for the new epoch.
    let b_sync = b.json(&["sync"]);
    assert_eq!(b_sync["pulled"], 0, "{b_sync}");
    assert_eq!(b.datanet("secret").unwrap()["version"], 1);
    for provider in [&a, &c] {
        assert!(get_blob(&b, provider, &new_shard).is_err());
    }
    let err = success(
        c.cmd()
            .args(["debug", "get-blob", "--from", &a.bootstrap, &new_shard])
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("received"),
        "C, a grantee now, may fetch it: {err}"
    );
}
