//! The work behind round actions: blobs in and out of the store, a job's files on disk, and
//! the trainer's blocking functions run off the async runtime.
//!
//! Layout under the data directory: `jobs/JOB/` holds one job's files — `base.gguf` is not
//! copied there; base models are exported once to `models/HASH.gguf` — `adapters/HASH/` the
//! unpacked adapters (start and merged), `rounds/R/updates/PEER/` the updates a coordinator
//! checked, `rounds/R/train/` a worker's training run and snapshots. Everything in it can be
//! rebuilt from blobs, so a restarted node only loses time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cohort_protocol::rounds::is_validation;
use cohort_protocol::types::{DatanetId, JobId, JobSpec, Manifest, ShardEntry};
use cohort_protocol::{ContentHash, PeerId, Signed};
use cohort_trainer::federated;

use super::BlobKind;
use crate::node::Node;
use crate::store::Batch;

/// A job's working directory.
pub fn job_dir(node: &Node, job: &JobId) -> PathBuf {
    node.data_dir.root().join("jobs").join(job.0.to_string())
}

fn hash_of(h: iroh_blobs::Hash) -> ContentHash {
    ContentHash::from_bytes(*h.as_bytes())
}

fn blob(h: &ContentHash) -> iroh_blobs::Hash {
    iroh_blobs::Hash::from_bytes(*h.as_bytes())
}

/// Whether the blob store holds `hash` completely.
pub async fn held(node: &Node, hash: &ContentHash) -> bool {
    matches!(
        node.blobs.status(blob(hash)).await,
        Ok(iroh_blobs::api::proto::BlobStatus::Complete { .. })
    )
}

/// The bytes of blob `hash`, fetched first (from `hint`, the gossip index or the DHT) if
/// this peer does not hold it. iroh-blobs verifies them against the hash as they arrive.
pub async fn blob_bytes(
    node: &Node,
    hash: &ContentHash,
    hint: Option<PeerId>,
) -> Result<Vec<u8>, String> {
    if !held(node, hash).await {
        let mut conns = crate::node::BlobConnections::new(node.me());
        let r = node.fetch_routed(&mut conns, *hash, hint).await;
        conns.close();
        r?;
    }
    node.blobs
        .get_bytes(blob(hash))
        .await
        .map(|b| b.to_vec())
        .map_err(|e| format!("blob {hash}: {e}"))
}

/// Adds `bytes` to the blob store as a public blob of `kind`, provided to the network.
pub async fn add_public(
    node: &Node,
    bytes: Vec<u8>,
    kind: BlobKind,
) -> Result<ContentHash, String> {
    let tag = node
        .blobs
        .add_bytes(bytes)
        .await
        .map_err(|e| format!("blob store: {e}"))?;
    let hash = hash_of(tag.hash);
    node.blobs
        .sync_db()
        .await
        .map_err(|e| format!("blob store sync: {e}"))?;
    node.state
        .call(move |s| {
            let mut b = Batch::default();
            super::put_public(s.store(), &mut b, &hash, kind);
            s.store().write(b)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    node.provide_own(&[hash]).await;
    // Base models, validation sets and merged adapters are what other peers ask for by hash
    // alone: tell the gossip neighbours too (updates and snapshots go to the coordinator, which
    // knows whom to ask).
    if matches!(
        kind,
        BlobKind::Model | BlobKind::Validation | BlobKind::Adapter
    ) && let Err(e) = node.announce_provides(vec![hash]).await
    {
        tracing::debug!("announcing {hash}: {e}");
    }
    Ok(hash)
}

/// The directory holding bundled blob `hash` unpacked under `root/HASH`, fetching and
/// unpacking it if needed.
pub async fn unpacked(
    node: &Node,
    hash: &ContentHash,
    hint: Option<PeerId>,
    root: &Path,
) -> Result<PathBuf, String> {
    let dest = root.join(hash.to_string());
    if dest.is_dir() {
        return Ok(dest);
    }
    let bytes = blob_bytes(node, hash, hint).await?;
    // Several tasks may unpack the same blob at once: each into its own directory, and the
    // first rename wins (the others find the destination there).
    let tmp = root.join(format!("{hash}.partial-{:016x}", rand::random::<u64>()));
    let d2 = dest.clone();
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let unpacked = federated::unpack_dir(&bytes, &tmp)
            .map_err(|e| format!("bundle {}: {e}", d2.display()))
            .and_then(|()| match std::fs::rename(&tmp, &d2) {
                Ok(()) => Ok(()),
                Err(_) if d2.is_dir() => Ok(()),
                Err(e) => Err(format!("{}: {e}", d2.display())),
            });
        let _ = std::fs::remove_dir_all(&tmp);
        unpacked
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(dest)
}

/// Packs `dir` into one bundle and adds it as a public blob of `kind`.
pub async fn publish_dir(node: &Node, dir: &Path, kind: BlobKind) -> Result<ContentHash, String> {
    let d = dir.to_path_buf();
    let bytes = tokio::task::spawn_blocking(move || federated::pack_dir(&d))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bundling {}: {e}", dir.display()))?;
    add_public(node, bytes, kind).await
}

/// The local path of base model `hash` (exported from the blob store, fetched first if
/// needed), checked against its hash.
pub async fn model_path(
    node: &Node,
    hash: &ContentHash,
    hint: Option<PeerId>,
) -> Result<PathBuf, String> {
    let dir = node.data_dir.root().join("models");
    let path = dir.join(format!("{hash}.gguf"));
    if path.is_file() {
        return Ok(path);
    }
    if !held(node, hash).await {
        let mut conns = crate::node::BlobConnections::new(node.me());
        let r = node.fetch_routed(&mut conns, *hash, hint).await;
        conns.close();
        r?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Concurrent callers export to their own files; the first rename wins.
    let tmp = dir.join(format!("{hash}.partial-{:016x}", rand::random::<u64>()));
    node.blobs
        .export(blob(hash), tmp.clone())
        .await
        .map_err(|e| format!("exporting model {hash}: {e}"))?;
    match std::fs::rename(&tmp, &path) {
        Ok(()) => Ok(path),
        Err(_) if path.is_file() => {
            let _ = std::fs::remove_file(&tmp);
            Ok(path)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// A shard of a job, with what is needed to fetch and read it.
#[derive(Debug, Clone)]
pub struct JobShard {
    /// The datanet.
    pub datanet: DatanetId,
    /// Its owner (a provider of last resort).
    pub owner: PeerId,
    /// The manifest entry.
    pub entry: ShardEntry,
}

/// The shards of a job's datanet versions, pulling missing manifests from `hint` (the job's
/// owner holds them).
pub async fn job_shards(
    node: &Node,
    spec: &JobSpec,
    hint: PeerId,
) -> Result<Vec<JobShard>, String> {
    let mut out = Vec::new();
    for d in &spec.datanets {
        let mh = d.manifest;
        let mut m: Option<Signed<Manifest>> = node
            .state
            .call(move |s| s.manifest(&mh))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if m.is_none() && hint != node.me() {
            node.pull_manifest(hint, mh).await?;
            m = node
                .state
                .call(move |s| s.manifest(&mh))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        let m = m.ok_or_else(|| format!("manifest {mh} of datanet {} is not held", d.datanet))?;
        let manifest = m.verify().map_err(|e| e.to_string())?;
        for entry in manifest.shards {
            out.push(JobShard {
                datanet: manifest.datanet,
                owner: manifest.owner,
                entry,
            });
        }
    }
    Ok(out)
}

/// The JSONL records of one shard (fetched if needed, decrypted where private), in order.
pub async fn shard_records(node: &Node, shard: &JobShard) -> Result<Vec<String>, String> {
    let hash = shard.entry.info.hash;
    if !held(node, &hash).await {
        node.fetch_shards(shard.datanet, shard.owner, &[shard.entry.info])
            .await?;
    }
    let bytes = node
        .blobs
        .get_bytes(blob(&hash))
        .await
        .map_err(|e| format!("shard {hash}: {e}"))?;
    let plain = match shard.entry.key_epoch {
        None => bytes.to_vec(),
        Some(epoch) => {
            let id = shard.datanet;
            let stored = || async move {
                node.state
                    .call(move |s| s.datanet_key(&id, epoch))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            };
            let key = match stored().await? {
                Some(key) => key,
                // Not asked for yet: the owner hands this peer's grants out on request.
                None => {
                    node.fetch_grants(id, shard.owner)
                        .await
                        .map_err(|e| format!("shard {hash}: no key for epoch {epoch}: {e}"))?;
                    stored().await?.ok_or_else(|| {
                        format!("shard {hash}: no key for epoch {epoch}: not granted")
                    })?
                }
            };
            crate::crypto::decrypt_shard(&key, &id, epoch, &bytes).map_err(|e| e.to_string())?
        }
    };
    let text = String::from_utf8(plain).map_err(|_| format!("shard {hash} is not UTF-8"))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// Splits records into (training, validation) by the job's seeded split.
pub fn split(spec: &JobSpec, records: Vec<String>) -> (Vec<String>, Vec<String>) {
    records.into_iter().partition(|r| {
        !is_validation(
            spec.validation.seed,
            spec.validation.fraction_ppm,
            r.as_bytes(),
        )
    })
}

/// The training records of `shards` (in the given order), validation records removed.
pub async fn training_records(
    node: &Node,
    spec: &JobSpec,
    all: &[JobShard],
    shards: &[ContentHash],
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for h in shards {
        let s = all
            .iter()
            .find(|s| s.entry.info.hash == *h)
            .ok_or_else(|| format!("shard {h} is not in the job's datanets"))?;
        out.extend(split(spec, shard_records(node, s).await?).0);
    }
    Ok(out)
}

/// Runs a blocking closure off the runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("blocking task: {e}"))?
}

/// The job's trainer setup for base model `base`.
pub fn setup(spec: &JobSpec, base: &Path) -> Result<Arc<federated::JobSetup>, String> {
    federated::JobSetup::from_spec(spec, base)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}
