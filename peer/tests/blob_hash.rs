//! A Cohort content hash is the iroh-blobs hash of the same bytes: checked against a real
//! iroh-blobs file store, across BLAKE3 chunk (1 KiB) and iroh-blobs chunk-group (16 KiB)
//! boundaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cohort_protocol::ContentHash;

#[tokio::test]
async fn content_hash_equals_iroh_blobs_hash() {
    let dir = tempfile::tempdir().unwrap();
    let store = iroh_blobs::store::fs::FsStore::load(dir.path())
        .await
        .unwrap();
    for len in [
        0usize,
        1,
        1023,
        1024,
        1025,
        16 * 1024,
        16 * 1024 + 1,
        1 << 20,
    ] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let tag = store.add_bytes(bytes.clone()).await.unwrap();
        assert_eq!(
            tag.hash.as_bytes(),
            ContentHash::of(&bytes).as_bytes(),
            "length {len}"
        );
        assert_eq!(tag.hash.to_string(), ContentHash::of(&bytes).to_string());
    }
    store.shutdown().await.unwrap();
}
