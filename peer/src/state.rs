//! The node's state actor: the one owner of the metadata [`Store`] and of the per-peer
//! counters.
//!
//! Every read and change of node state runs on the actor's own thread, one at a time, in the
//! order sent: callers hold a [`StateHandle`] and send it a closure over [`State`] through a
//! bounded channel, and get the closure's result back on a oneshot. rocksdb calls block, so the
//! actor runs on a blocking thread rather than on the async runtime. Each change that touches
//! more than one key is one [`Batch`].
//!
//! [`State`]'s methods are plain synchronous code: the unit tests call them directly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bincode::{Decode, Encode};
use cohort_protocol::types::rpc::Head;
use cohort_protocol::types::{
    AccessPolicy, Announcement, DatanetId, Grant, Manifest, RecordSchema, Revocation, ShardEntry,
    ShardInfo, ShardSubmission, SubmissionDecision, Timestamp, Verdict,
};
use cohort_protocol::{Canonical, ContentHash, Keypair, PeerId, Signed};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::crypto::{self, DatanetKey};
use crate::store::{Batch, Cf, Store, StoreError};

const KEY_ANNOUNCE_SEQ: &[u8] = b"announce_seq";
/// Announcements accepted per signer (and per forwarding peer) in one [`RATE_WINDOW`].
pub const RATE_LIMIT: u32 = 200;
/// The rate-limit window.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How far behind its newest sequence number a signer's announcement may arrive.
const REPLAY_WINDOW: u64 = 256;

/// What this peer knows about one datanet.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DatanetRecord {
    /// The id.
    pub id: DatanetId,
    /// The owner.
    pub owner: PeerId,
    /// The nonce the id derives from.
    pub nonce: u64,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// License.
    pub license: String,
    /// Record format.
    pub schema: RecordSchema,
    /// Access policy.
    pub access: AccessPolicy,
    /// The latest version known, if any was published.
    pub head: Option<Head>,
}

/// A shard whose blob this peer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct LocalShard {
    /// The datanet it belongs to.
    pub datanet: DatanetId,
    /// The shard.
    pub info: ShardInfo,
}

/// Where a submission stands.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SubmissionStatus {
    /// Waiting for the owner.
    Pending,
    /// Approved; enters the next version.
    Approved,
    /// Rejected.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// A submission received by the owner (or sent by a contributor).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SubmissionRecord {
    /// The signed submission.
    pub signed: Signed<ShardSubmission>,
    /// Where it stands.
    pub status: SubmissionStatus,
    /// The owner's signed decision, once decided.
    pub decision: Option<Signed<SubmissionDecision>>,
}

/// Why a state operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record does not decode: the store is corrupt.
    #[error("metadata store: record in `{cf}` does not decode: {reason}")]
    Corrupt {
        /// The column family.
        cf: &'static str,
        /// The decode error.
        reason: String,
    },
    /// No datanet matches.
    #[error("no datanet named or with id `{0}`")]
    UnknownDatanet(String),
    /// More than one datanet has this name.
    #[error("more than one datanet is named `{0}`: use its id")]
    AmbiguousDatanet(String),
    /// The operation needs the datanet's owner.
    #[error("datanet `{0}` belongs to another peer")]
    NotOwner(String),
    /// Invalid input from the local user.
    #[error("{0}")]
    Invalid(String),
    /// Nothing to do.
    #[error("{0}")]
    Nothing(String),
}

/// Why a message from a peer was rejected; the counters are per peer and per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// Does not decode (or is not what the request claims).
    Malformed,
    /// Larger than the protocol allows.
    Oversized,
    /// The signature does not verify (unsigned, wrongly signed, or tampered with).
    BadSignature,
    /// Decodes and verifies, but breaks the message's rules.
    Invalid,
    /// A sequence number already seen from that signer.
    Replayed,
    /// Over the per-peer rate.
    RateLimited,
    /// A shard whose bytes did not match its hash.
    BadShard,
    /// A manifest that conflicts with one already held (same version, other content).
    Conflicting,
    /// A provider that accepted a blob request and then failed to deliver verified bytes
    /// (its own store found the bytes do not match the hash and reset the stream, or it did
    /// not hold what it announced).
    FailedTransfer,
    /// A provider the DHT named that could not be reached or resolved for the hash it was
    /// said to provide (its record is dropped).
    StaleRecord,
    /// A round message for a round or phase that is over, or from a peer not assigned.
    OutOfRound,
    /// An update that failed verification (shape, values, norm bound, spot check, availability).
    BadUpdate,
    /// Two different signed commits for one round.
    Equivocation,
}

/// What ingesting a manifest did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// New and stored.
    New,
    /// Already held.
    Known,
    /// The previous version is needed first.
    NeedPrevious(ContentHash),
}

#[derive(Debug, Default)]
struct RateWindow {
    start: Option<Instant>,
    count: u32,
}

impl RateWindow {
    fn allow(&mut self, now: Instant) -> bool {
        match self.start {
            Some(s) if now.duration_since(s) < RATE_WINDOW => {}
            _ => {
                self.start = Some(now);
                self.count = 0;
            }
        }
        self.count += 1;
        self.count <= RATE_LIMIT
    }
}

#[derive(Debug, Default)]
struct SeqWindow {
    max: u64,
    seen: BTreeSet<u64>,
}

/// The node's state; owned by the actor.
#[derive(Debug)]
pub struct State {
    store: Arc<Store>,
    rejections: BTreeMap<PeerId, BTreeMap<Rejection, u64>>,
    rates: BTreeMap<PeerId, RateWindow>,
    seqs: BTreeMap<PeerId, SeqWindow>,
    stop: bool,
}

fn decode<T: Canonical>(cf: Cf, bytes: &[u8]) -> Result<T, StateError> {
    T::from_bytes(bytes).map_err(|e| StateError::Corrupt {
        cf: cf.name(),
        reason: e.to_string(),
    })
}

/// `k` ++ datanet ++ epoch (big-endian): a datanet key this peer holds.
fn key_key(id: &DatanetId, epoch: u32) -> Vec<u8> {
    let mut k = b"k".to_vec();
    k.extend_from_slice(id.0.as_bytes());
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

/// `g` ++ datanet ++ grantee ++ epoch (big-endian): a grant this owner issued.
fn grant_key(id: &DatanetId, grantee: &PeerId, epoch: u32) -> Vec<u8> {
    let mut k = b"g".to_vec();
    k.extend_from_slice(id.0.as_bytes());
    k.extend_from_slice(grantee.as_bytes());
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

fn cat(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len());
    k.extend_from_slice(a);
    k.extend_from_slice(b);
    k
}

/// Whether a normalised record is already in the datanet (published or pending).
pub fn has_record(store: &Store, id: &DatanetId, record: &ContentHash) -> Result<bool, StateError> {
    Ok(store.contains(Cf::Records, &cat(id.0.as_bytes(), record.as_bytes()))?)
}

/// Milliseconds since the Unix epoch.
pub fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Timestamp(ms)
}

impl State {
    /// State over an open store.
    pub fn new(store: Store) -> Self {
        Self {
            store: Arc::new(store),
            rejections: BTreeMap::new(),
            rates: BTreeMap::new(),
            seqs: BTreeMap::new(),
            stop: false,
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A read-only view of the store for long reads off the actor (imports checking for
    /// duplicate records). rocksdb allows concurrent readers; every write stays on the actor.
    pub fn reader(&self) -> Arc<Store> {
        self.store.clone()
    }

    // ---------------------------------------------------------------- counters

    /// Counts a rejected message from `peer`.
    pub fn reject(&mut self, peer: PeerId, why: Rejection) {
        tracing::debug!(%peer, ?why, "rejected a message");
        *self
            .rejections
            .entry(peer)
            .or_default()
            .entry(why)
            .or_default() += 1;
    }

    /// Rejection counters per peer.
    pub fn rejections(&self) -> &BTreeMap<PeerId, BTreeMap<Rejection, u64>> {
        &self.rejections
    }

    /// Total penalties of a provider: bad shards weigh ten failed transfers or stale DHT records.
    pub fn penalties(&self, peer: &PeerId) -> u64 {
        self.rejections.get(peer).map_or(0, |r| {
            10 * r.get(&Rejection::BadShard).copied().unwrap_or(0)
                + r.get(&Rejection::FailedTransfer).copied().unwrap_or(0)
                + r.get(&Rejection::StaleRecord).copied().unwrap_or(0)
        })
    }

    /// Whether `peer` may send another announcement now (counts it).
    pub fn rate_allow(&mut self, peer: PeerId) -> bool {
        let ok = self.rates.entry(peer).or_default().allow(Instant::now());
        if !ok {
            self.reject(peer, Rejection::RateLimited);
        }
        ok
    }

    /// Checks an announcement's sequence number against the signer's window and records it.
    /// False (and counted) for a replay.
    pub fn accept_seq(&mut self, signer: PeerId, seq: u64) -> bool {
        let w = self.seqs.entry(signer).or_default();
        let fresh = seq + REPLAY_WINDOW > w.max && !w.seen.contains(&seq);
        if fresh {
            w.seen.insert(seq);
            w.max = w.max.max(seq);
            while w.seen.len() as u64 > REPLAY_WINDOW {
                w.seen.pop_first();
            }
        } else {
            self.reject(signer, Rejection::Replayed);
        }
        fresh
    }

    // ---------------------------------------------------------------- datanets

    /// Every datanet known, sorted by id.
    pub fn datanets(&self) -> Result<Vec<DatanetRecord>, StateError> {
        self.store
            .scan_prefix(Cf::Datanets, &[])?
            .iter()
            .map(|(_, v)| decode(Cf::Datanets, v))
            .collect()
    }

    /// One datanet by id.
    pub fn datanet(&self, id: &DatanetId) -> Result<Option<DatanetRecord>, StateError> {
        self.store
            .get(Cf::Datanets, id.0.as_bytes())?
            .map(|v| decode(Cf::Datanets, &v))
            .transpose()
    }

    /// A datanet by id (hex) or name.
    pub fn resolve(&self, name_or_id: &str) -> Result<DatanetRecord, StateError> {
        if let Ok(hash) = name_or_id.parse::<ContentHash>()
            && let Some(d) = self.datanet(&DatanetId(hash))?
        {
            return Ok(d);
        }
        let mut found = self
            .datanets()?
            .into_iter()
            .filter(|d| d.name == name_or_id);
        match (found.next(), found.next()) {
            (Some(d), None) => Ok(d),
            (Some(_), Some(_)) => Err(StateError::AmbiguousDatanet(name_or_id.to_owned())),
            _ => Err(StateError::UnknownDatanet(name_or_id.to_owned())),
        }
    }

    /// Creates a datanet owned by `me`.
    pub fn create_datanet(
        &mut self,
        me: PeerId,
        name: String,
        description: String,
        license: String,
        schema: RecordSchema,
        access: AccessPolicy,
    ) -> Result<DatanetRecord, StateError> {
        if self
            .datanets()?
            .iter()
            .any(|d| d.owner == me && d.name == name)
        {
            return Err(StateError::Invalid(format!(
                "you already have a datanet named `{name}`"
            )));
        }
        let nonce = rand::random::<u64>();
        let id = DatanetId::derive(&me, &name, nonce);
        let record = DatanetRecord {
            id,
            owner: me,
            nonce,
            name,
            description,
            license,
            schema,
            access,
            head: None,
        };
        // Check the fields with the manifest's own rules before anything is stored.
        self.draft(&record, Vec::new(), now())?
            .validate()
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        let mut batch = Batch::default();
        self.store.put(
            &mut batch,
            Cf::Datanets,
            id.0.as_bytes(),
            &record.to_bytes(),
        );
        if let AccessPolicy::Allowlist { key_epoch, .. } = &record.access {
            self.put_key(&mut batch, &id, *key_epoch, &crypto::new_key());
        }
        self.store.write(batch)?;
        Ok(record)
    }

    fn put_key(&self, batch: &mut Batch, id: &DatanetId, epoch: u32, key: &DatanetKey) {
        self.store
            .put(batch, Cf::Grants, &key_key(id, epoch), key.as_slice());
    }

    /// The datanet key of `epoch`, if this peer holds it (the owner, or a grantee that fetched
    /// its grant).
    pub fn datanet_key(
        &self,
        id: &DatanetId,
        epoch: u32,
    ) -> Result<Option<DatanetKey>, StateError> {
        Ok(self
            .store
            .get(Cf::Grants, &key_key(id, epoch))?
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()))
    }

    /// Stores a key received in a grant.
    pub fn store_key(
        &mut self,
        id: &DatanetId,
        epoch: u32,
        key: &DatanetKey,
    ) -> Result<(), StateError> {
        let mut batch = Batch::default();
        self.put_key(&mut batch, id, epoch, key);
        Ok(self.store.write(batch)?)
    }

    /// Whether `peer` may read datanet `id` (public, or owner, or a grantee as of the latest
    /// version or grant this peer knows).
    pub fn may_read(&self, id: &DatanetId, peer: &PeerId) -> Result<bool, StateError> {
        Ok(match self.datanet(id)? {
            None => false,
            Some(d) => match &d.access {
                AccessPolicy::Public => true,
                AccessPolicy::Allowlist { grantees, .. } => {
                    d.owner == *peer || grantees.binary_search(peer).is_ok()
                }
            },
        })
    }

    /// Whether this peer may serve blob `hash` to `peer`: only recorded shards, and private
    /// ones only to the owner and grantees.
    pub fn may_serve(&self, hash: &ContentHash, peer: &PeerId) -> Result<bool, StateError> {
        match self.store.get(Cf::Shards, hash.as_bytes())? {
            None => Ok(false),
            Some(v) => {
                let local: LocalShard = decode(Cf::Shards, &v)?;
                self.may_read(&local.datanet, peer)
            }
        }
    }

    /// Grants `grantee` read access to an owned private datanet: adds it to the allowlist (in
    /// the next version) and wraps every key epoch to it. One batch.
    pub fn grant(
        &mut self,
        keypair: &Keypair,
        name_or_id: &str,
        grantee: PeerId,
    ) -> Result<Vec<Signed<Grant>>, StateError> {
        let mut d = self.resolve(name_or_id)?;
        if d.owner != keypair.peer_id() {
            return Err(StateError::NotOwner(name_or_id.to_owned()));
        }
        let AccessPolicy::Allowlist {
            grantees,
            key_epoch,
        } = &mut d.access
        else {
            return Err(StateError::Invalid(format!(
                "datanet `{}` is public",
                d.name
            )));
        };
        if grantee == d.owner {
            return Err(StateError::Invalid("the owner needs no grant".into()));
        }
        if let Err(at) = grantees.binary_search(&grantee) {
            grantees.insert(at, grantee);
        }
        let epoch_now = *key_epoch;
        let mut batch = Batch::default();
        let mut out = Vec::new();
        for epoch in 0..=epoch_now {
            let Some(key) = self.datanet_key(&d.id, epoch)? else {
                continue;
            };
            let g = self.sign_grant(keypair, &d.id, grantee, epoch, &key)?;
            self.store.put(
                &mut batch,
                Cf::Grants,
                &grant_key(&d.id, &grantee, epoch),
                &g.to_bytes(),
            );
            out.push(g);
        }
        self.store
            .put(&mut batch, Cf::Datanets, d.id.0.as_bytes(), &d.to_bytes());
        self.store.write(batch)?;
        Ok(out)
    }

    fn sign_grant(
        &self,
        keypair: &Keypair,
        id: &DatanetId,
        grantee: PeerId,
        epoch: u32,
        key: &DatanetKey,
    ) -> Result<Signed<Grant>, StateError> {
        let wrapped_key = crypto::wrap_key(key, id, epoch, &grantee)
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        let grant = Grant {
            datanet: *id,
            grantee,
            key_epoch: epoch,
            wrapped_key,
            granted_at: now(),
        };
        grant
            .validate()
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        Ok(Signed::sign(keypair, &grant))
    }

    /// Revokes `grantee`: removes it from the allowlist, rotates to a new key epoch for shards
    /// added from now on, and wraps the new key to the remaining grantees. One batch.
    pub fn revoke(
        &mut self,
        keypair: &Keypair,
        name_or_id: &str,
        grantee: PeerId,
    ) -> Result<Signed<Revocation>, StateError> {
        let mut d = self.resolve(name_or_id)?;
        if d.owner != keypair.peer_id() {
            return Err(StateError::NotOwner(name_or_id.to_owned()));
        }
        let next_version = d.head.map_or(1, |h| h.version + 1);
        let AccessPolicy::Allowlist {
            grantees,
            key_epoch,
        } = &mut d.access
        else {
            return Err(StateError::Invalid(format!(
                "datanet `{}` is public",
                d.name
            )));
        };
        let Ok(at) = grantees.binary_search(&grantee) else {
            return Err(StateError::Invalid(format!("{grantee} holds no grant")));
        };
        grantees.remove(at);
        *key_epoch += 1;
        let epoch = *key_epoch;
        let remaining = grantees.clone();
        let key = crypto::new_key();
        let mut batch = Batch::default();
        self.put_key(&mut batch, &d.id, epoch, &key);
        for g in remaining {
            let signed = self.sign_grant(keypair, &d.id, g, epoch, &key)?;
            self.store.put(
                &mut batch,
                Cf::Grants,
                &grant_key(&d.id, &g, epoch),
                &signed.to_bytes(),
            );
        }
        let revocation = Revocation {
            datanet: d.id,
            grantee,
            from_version: next_version,
            new_key_epoch: epoch,
            revoked_at: now(),
        };
        let signed = Signed::sign(keypair, &revocation);
        let mut rkey = b"r".to_vec();
        rkey.extend_from_slice(d.id.0.as_bytes());
        rkey.extend_from_slice(grantee.as_bytes());
        self.store
            .put(&mut batch, Cf::Grants, &rkey, &signed.to_bytes());
        self.store
            .put(&mut batch, Cf::Datanets, d.id.0.as_bytes(), &d.to_bytes());
        self.store.write(batch)?;
        Ok(signed)
    }

    /// The grants issued to `peer` for datanet `id`, by epoch.
    pub fn grants_for(
        &self,
        id: &DatanetId,
        peer: &PeerId,
    ) -> Result<Vec<Signed<Grant>>, StateError> {
        let mut prefix = b"g".to_vec();
        prefix.extend_from_slice(id.0.as_bytes());
        prefix.extend_from_slice(peer.as_bytes());
        self.store
            .scan_prefix(Cf::Grants, &prefix)?
            .iter()
            .map(|(_, v)| decode(Cf::Grants, v))
            .collect()
    }

    fn draft(
        &self,
        d: &DatanetRecord,
        shards: Vec<ShardEntry>,
        at: Timestamp,
    ) -> Result<Manifest, StateError> {
        Ok(Manifest {
            datanet: d.id,
            owner: d.owner,
            nonce: d.nonce,
            version: d.head.map_or(1, |h| h.version + 1),
            previous: d.head.map(|h| h.manifest),
            name: d.name.clone(),
            description: d.description.clone(),
            license: d.license.clone(),
            schema: d.schema,
            access: d.access.clone(),
            shards,
            published_at: at,
        })
    }

    /// Whether a normalised record is already in the datanet (published or pending).
    pub fn has_record(&self, id: &DatanetId, record: &ContentHash) -> Result<bool, StateError> {
        has_record(&self.store, id, record)
    }

    /// Records imported shards (their blobs already synced to the blob store) as pending for
    /// the next version, with their record hashes, in one batch.
    pub fn commit_shards(
        &mut self,
        id: &DatanetId,
        contributor: PeerId,
        key_epoch: Option<u32>,
        shards: &[(ShardInfo, Vec<ContentHash>)],
    ) -> Result<(), StateError> {
        let mut batch = Batch::default();
        for (info, records) in shards {
            let entry = ShardEntry {
                info: *info,
                contributor,
                key_epoch,
            };
            self.store.put(
                &mut batch,
                Cf::Pending,
                &cat(id.0.as_bytes(), info.hash.as_bytes()),
                &entry.to_bytes(),
            );
            for r in records {
                self.store.put(
                    &mut batch,
                    Cf::Records,
                    &cat(id.0.as_bytes(), r.as_bytes()),
                    info.hash.as_bytes(),
                );
            }
            let local = LocalShard {
                datanet: *id,
                info: *info,
            };
            self.store.put(
                &mut batch,
                Cf::Shards,
                info.hash.as_bytes(),
                &local.to_bytes(),
            );
        }
        self.store.write(batch)?;
        Ok(())
    }

    /// Shards waiting for the next version.
    pub fn pending(&self, id: &DatanetId) -> Result<Vec<ShardEntry>, StateError> {
        self.store
            .scan_prefix(Cf::Pending, id.0.as_bytes())?
            .iter()
            .map(|(_, v)| decode(Cf::Pending, v))
            .collect()
    }

    /// Records that this peer holds these shards' blobs.
    pub fn record_local_shards(
        &mut self,
        id: &DatanetId,
        infos: &[ShardInfo],
    ) -> Result<(), StateError> {
        let mut batch = Batch::default();
        for info in infos {
            let local = LocalShard {
                datanet: *id,
                info: *info,
            };
            self.store.put(
                &mut batch,
                Cf::Shards,
                info.hash.as_bytes(),
                &local.to_bytes(),
            );
        }
        self.store.write(batch)?;
        Ok(())
    }

    /// Whether this peer holds a shard's blob (as recorded).
    pub fn has_shard(&self, hash: &ContentHash) -> Result<bool, StateError> {
        Ok(self.store.contains(Cf::Shards, hash.as_bytes())?)
    }

    /// Every shard this peer holds.
    pub fn local_shards(&self) -> Result<Vec<LocalShard>, StateError> {
        self.store
            .scan_prefix(Cf::Shards, &[])?
            .iter()
            .map(|(_, v)| decode(Cf::Shards, v))
            .collect()
    }

    /// The next announcement sequence number (persisted in `batch`).
    fn next_seq(&self, batch: &mut Batch) -> Result<u64, StateError> {
        let seq = match self.store.get(Cf::Meta, KEY_ANNOUNCE_SEQ)? {
            Some(v) => <[u8; 8]>::try_from(v.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| StateError::Corrupt {
                    cf: "meta",
                    reason: "announce_seq is not 8 bytes".into(),
                })?,
            None => 0,
        } + 1;
        self.store
            .put(batch, Cf::Meta, KEY_ANNOUNCE_SEQ, &seq.to_le_bytes());
        Ok(seq)
    }

    /// Signs an announcement with the next sequence number.
    pub fn sign_announcement(
        &mut self,
        keypair: &Keypair,
        body: cohort_protocol::types::AnnouncementBody,
    ) -> Result<Signed<Announcement>, StateError> {
        let mut batch = Batch::default();
        let seq = self.next_seq(&mut batch)?;
        self.store.write(batch)?;
        Ok(Signed::sign(
            keypair,
            &Announcement {
                seq,
                at: now(),
                body,
            },
        ))
    }

    /// Signs the next version of an owned datanet: the previous version's shards plus the
    /// pending ones. Stores it, moves the head and clears the pending shards in one batch.
    pub fn publish(
        &mut self,
        keypair: &Keypair,
        name_or_id: &str,
    ) -> Result<Signed<Manifest>, StateError> {
        let d = self.resolve(name_or_id)?;
        if d.owner != keypair.peer_id() {
            return Err(StateError::NotOwner(name_or_id.to_owned()));
        }
        let pending = self.pending(&d.id)?;
        let mut shards: BTreeMap<ContentHash, ShardEntry> = BTreeMap::new();
        if let Some(head) = d.head {
            let prev = self
                .manifest(&head.manifest)?
                .ok_or_else(|| StateError::Corrupt {
                    cf: "manifests",
                    reason: format!("head manifest {} is missing", head.manifest),
                })?;
            let prev = prev.verify().map_err(|e| StateError::Corrupt {
                cf: "manifests",
                reason: e.to_string(),
            })?;
            shards.extend(prev.shards.into_iter().map(|s| (s.info.hash, s)));
        }
        if pending.is_empty() && d.head.is_some() {
            return Err(StateError::Nothing(format!(
                "datanet `{}` has nothing new since version {}",
                d.name,
                d.head.map_or(0, |h| h.version)
            )));
        }
        for s in &pending {
            shards.entry(s.info.hash).or_insert(*s);
        }
        let manifest = self.draft(&d, shards.into_values().collect(), now())?;
        manifest
            .validate()
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        let signed = Signed::sign(keypair, &manifest);
        let mut batch = Batch::default();
        for s in &pending {
            self.store.delete(
                &mut batch,
                Cf::Pending,
                &cat(d.id.0.as_bytes(), s.info.hash.as_bytes()),
            );
        }
        self.put_manifest(&mut batch, &d, &manifest, &signed);
        self.store.write(batch)?;
        Ok(signed)
    }

    fn put_manifest(
        &self,
        batch: &mut Batch,
        known: &DatanetRecord,
        m: &Manifest,
        signed: &Signed<Manifest>,
    ) {
        let hash = signed.hash();
        self.store
            .put(batch, Cf::Manifests, hash.as_bytes(), &signed.to_bytes());
        if known.head.is_none_or(|h| h.version < m.version) {
            let record = DatanetRecord {
                id: m.datanet,
                owner: m.owner,
                nonce: m.nonce,
                name: m.name.clone(),
                description: m.description.clone(),
                license: m.license.clone(),
                schema: m.schema,
                access: m.access.clone(),
                head: Some(Head {
                    datanet: m.datanet,
                    version: m.version,
                    manifest: hash,
                }),
            };
            self.store.put(
                batch,
                Cf::Datanets,
                m.datanet.0.as_bytes(),
                &record.to_bytes(),
            );
        }
    }

    /// A signed manifest by hash.
    pub fn manifest(&self, hash: &ContentHash) -> Result<Option<Signed<Manifest>>, StateError> {
        self.store
            .get(Cf::Manifests, hash.as_bytes())?
            .map(|v| decode(Cf::Manifests, &v))
            .transpose()
    }

    /// The latest version of every datanet known.
    pub fn heads(&self) -> Result<Vec<Head>, StateError> {
        Ok(self
            .datanets()?
            .into_iter()
            .filter_map(|d| d.head)
            .collect())
    }

    /// Checks and stores a manifest received from `from`. The signer must be the owner, the
    /// manifest valid, and chained to the previous version (which must be held first). A bad
    /// one is counted against `from`.
    pub fn ingest_manifest(
        &mut self,
        from: PeerId,
        signed: &Signed<Manifest>,
    ) -> Result<Ingested, Rejection> {
        let hash = signed.hash();
        match self.manifest(&hash) {
            Ok(Some(_)) => return Ok(Ingested::Known),
            Ok(None) => {}
            Err(e) => {
                tracing::error!("metadata store: {e}");
                return Err(Rejection::Malformed);
            }
        }
        let result = self.check_manifest(signed);
        match result {
            Ok(Ingested::New) => {
                let Ok(m) = signed.verify() else {
                    return Err(Rejection::BadSignature);
                };
                let known = match self.datanet(&m.datanet) {
                    Ok(Some(d)) => d,
                    Ok(None) => DatanetRecord {
                        id: m.datanet,
                        owner: m.owner,
                        nonce: m.nonce,
                        name: m.name.clone(),
                        description: String::new(),
                        license: String::new(),
                        schema: m.schema,
                        access: m.access.clone(),
                        head: None,
                    },
                    Err(e) => {
                        tracing::error!("metadata store: {e}");
                        return Err(Rejection::Malformed);
                    }
                };
                let mut batch = Batch::default();
                self.put_manifest(&mut batch, &known, &m, signed);
                if let Err(e) = self.store.write(batch) {
                    tracing::error!("metadata store: {e}");
                    return Err(Rejection::Malformed);
                }
                Ok(Ingested::New)
            }
            Ok(other) => Ok(other),
            Err(why) => {
                self.reject(from, why);
                Err(why)
            }
        }
    }

    fn check_manifest(&self, signed: &Signed<Manifest>) -> Result<Ingested, Rejection> {
        let m = signed.verify().map_err(|_| Rejection::BadSignature)?;
        m.validate().map_err(|_| Rejection::Invalid)?;
        if signed.signer() != m.owner {
            return Err(Rejection::Invalid);
        }
        let known = self.datanet(&m.datanet).map_err(|_| Rejection::Malformed)?;
        if let Some(d) = &known {
            if d.owner != m.owner || d.nonce != m.nonce {
                return Err(Rejection::Invalid);
            }
            if let Some(h) = d.head
                && h.version == m.version
            {
                // Same version, other bytes: the owner equivocated, or someone replays an
                // edited copy.
                return Err(Rejection::Conflicting);
            }
        }
        if let Some(prev_hash) = m.previous {
            let Some(prev) = self
                .manifest(&prev_hash)
                .map_err(|_| Rejection::Malformed)?
            else {
                return Ok(Ingested::NeedPrevious(prev_hash));
            };
            let prev = prev.verify().map_err(|_| Rejection::Malformed)?;
            if prev.datanet != m.datanet
                || prev.owner != m.owner
                || prev.nonce != m.nonce
                || prev.version + 1 != m.version
            {
                return Err(Rejection::Invalid);
            }
        }
        Ok(Ingested::New)
    }

    // ---------------------------------------------------------------- submissions

    /// Stores a submission received for a datanet this peer owns.
    pub fn receive_submission(
        &mut self,
        me: PeerId,
        from: PeerId,
        signed: &Signed<ShardSubmission>,
    ) -> Result<ContentHash, String> {
        let s = match signed.verify() {
            Ok(s) => s,
            Err(e) => {
                self.reject(from, Rejection::BadSignature);
                return Err(e.to_string());
            }
        };
        if let Err(e) = s.validate() {
            self.reject(from, Rejection::Invalid);
            return Err(e.to_string());
        }
        match self.datanet(&s.datanet) {
            Ok(Some(d)) if d.owner == me => {}
            Ok(_) => return Err(format!("this peer does not own datanet {}", s.datanet)),
            Err(e) => return Err(e.to_string()),
        }
        let hash = signed.hash();
        let record = SubmissionRecord {
            signed: signed.clone(),
            status: SubmissionStatus::Pending,
            decision: None,
        };
        let mut batch = Batch::default();
        if self
            .store
            .contains(Cf::Submissions, hash.as_bytes())
            .unwrap_or(false)
        {
            return Ok(hash);
        }
        self.store.put(
            &mut batch,
            Cf::Submissions,
            hash.as_bytes(),
            &record.to_bytes(),
        );
        self.store.write(batch).map_err(|e| e.to_string())?;
        Ok(hash)
    }

    /// Every submission stored, by hash.
    pub fn submissions(&self) -> Result<Vec<(ContentHash, SubmissionRecord)>, StateError> {
        self.store
            .scan_prefix(Cf::Submissions, &[])?
            .iter()
            .map(|(k, v)| {
                let hash = <[u8; 32]>::try_from(k.as_slice())
                    .map(ContentHash::from_bytes)
                    .map_err(|_| StateError::Corrupt {
                        cf: "submissions",
                        reason: "key is not a hash".into(),
                    })?;
                Ok((hash, decode(Cf::Submissions, v)?))
            })
            .collect()
    }

    /// One submission by hash or unique hex prefix.
    pub fn submission(&self, id: &str) -> Result<(ContentHash, SubmissionRecord), StateError> {
        let mut found = self
            .submissions()?
            .into_iter()
            .filter(|(h, _)| h.to_string().starts_with(id));
        match (found.next(), found.next()) {
            (Some(s), None) => Ok(s),
            (Some(_), Some(_)) => Err(StateError::Invalid(format!(
                "submission id `{id}` is ambiguous"
            ))),
            _ => Err(StateError::Invalid(format!("no submission `{id}`"))),
        }
    }

    /// Approves (the shard becomes pending, credited to the contributor; its blob must be held
    /// already) or rejects a submission.
    /// For a private datanet, `stored` is the shard as the owner encrypted it (its info and
    /// key epoch); the manifest lists that, credited to the contributor.
    pub fn decide(
        &mut self,
        keypair: &Keypair,
        id: &str,
        verdict: Verdict,
        stored: Option<(ShardInfo, u32)>,
    ) -> Result<SubmissionRecord, StateError> {
        let me = keypair.peer_id();
        let (hash, mut record) = self.submission(id)?;
        if record.status != SubmissionStatus::Pending {
            return Err(StateError::Invalid(format!(
                "submission {hash} was already decided"
            )));
        }
        let s = record
            .signed
            .verify()
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        let d = self
            .datanet(&s.datanet)?
            .ok_or_else(|| StateError::UnknownDatanet(s.datanet.to_string()))?;
        if d.owner != me {
            return Err(StateError::NotOwner(d.name));
        }
        let mut batch = Batch::default();
        let verdict = match verdict {
            Verdict::Approved { .. } => Verdict::Approved {
                version: d.head.map_or(1, |h| h.version + 1),
            },
            other => other,
        };
        let decision = SubmissionDecision {
            datanet: d.id,
            submission: hash,
            verdict: verdict.clone(),
            decided_at: now(),
        };
        decision
            .validate()
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        record.decision = Some(Signed::sign(keypair, &decision));
        match verdict {
            Verdict::Approved { .. } => {
                let private = matches!(d.access, AccessPolicy::Allowlist { .. });
                if private != stored.is_some() {
                    return Err(StateError::Invalid(
                        "a private datanet's shards enter encrypted, a public one's in the clear"
                            .into(),
                    ));
                }
                let (info, key_epoch) = match stored {
                    Some((info, epoch)) => (info, Some(epoch)),
                    None => (s.shard, None),
                };
                let entry = ShardEntry {
                    info,
                    contributor: record.signed.signer(),
                    key_epoch,
                };
                self.store.put(
                    &mut batch,
                    Cf::Pending,
                    &cat(d.id.0.as_bytes(), info.hash.as_bytes()),
                    &entry.to_bytes(),
                );
                let local = LocalShard {
                    datanet: d.id,
                    info,
                };
                self.store.put(
                    &mut batch,
                    Cf::Shards,
                    info.hash.as_bytes(),
                    &local.to_bytes(),
                );
                record.status = SubmissionStatus::Approved;
            }
            Verdict::Rejected { reason } => {
                record.status = SubmissionStatus::Rejected { reason };
            }
        }
        self.store.put(
            &mut batch,
            Cf::Submissions,
            hash.as_bytes(),
            &record.to_bytes(),
        );
        self.store.write(batch)?;
        Ok(record)
    }
}

impl State {
    /// Records a submission this peer sent as a contributor.
    pub fn record_sent_submission(
        &mut self,
        signed: &Signed<ShardSubmission>,
    ) -> Result<(), StateError> {
        let record = SubmissionRecord {
            signed: signed.clone(),
            status: SubmissionStatus::Pending,
            decision: None,
        };
        let mut batch = Batch::default();
        self.store.put(
            &mut batch,
            Cf::Submissions,
            signed.hash().as_bytes(),
            &record.to_bytes(),
        );
        Ok(self.store.write(batch)?)
    }

    /// Applies the owner's decision on a submission this peer sent. Anything else (not signed
    /// by the datanet's owner, for an unknown or already decided submission) is counted
    /// against `from`.
    pub fn receive_decision(
        &mut self,
        from: PeerId,
        signed: &Signed<SubmissionDecision>,
    ) -> Result<(), String> {
        let checked = (|| {
            let d = signed.verify().map_err(|_| Rejection::BadSignature)?;
            d.validate().map_err(|_| Rejection::Invalid)?;
            let owner = self
                .datanet(&d.datanet)
                .map_err(|_| Rejection::Malformed)?
                .ok_or(Rejection::Invalid)?
                .owner;
            if signed.signer() != owner {
                return Err(Rejection::Invalid);
            }
            let mut record: SubmissionRecord = self
                .store
                .get(Cf::Submissions, d.submission.as_bytes())
                .map_err(|_| Rejection::Malformed)?
                .and_then(|v| SubmissionRecord::from_bytes(&v).ok())
                .ok_or(Rejection::Invalid)?;
            if record.status != SubmissionStatus::Pending {
                return Err(Rejection::Replayed);
            }
            record.status = match &d.verdict {
                Verdict::Approved { .. } => SubmissionStatus::Approved,
                Verdict::Rejected { reason } => SubmissionStatus::Rejected {
                    reason: reason.clone(),
                },
            };
            record.decision = Some(signed.clone());
            Ok((d.submission, record))
        })();
        match checked {
            Ok((hash, record)) => {
                let mut batch = Batch::default();
                self.store.put(
                    &mut batch,
                    Cf::Submissions,
                    hash.as_bytes(),
                    &record.to_bytes(),
                );
                self.store.write(batch).map_err(|e| e.to_string())
            }
            Err(why) => {
                self.reject(from, why);
                Err(format!("decision rejected: {why:?}"))
            }
        }
    }
}

/// The actor is gone (the node is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the node's state actor has stopped")]
pub struct StateGone;

type Job = Box<dyn FnOnce(&mut State) + Send>;

/// A handle to the state actor; cheap to clone.
#[derive(Debug, Clone)]
pub struct StateHandle {
    tx: mpsc::Sender<Job>,
}

/// Capacity of the actor's inbox.
const INBOX: usize = 256;

impl StateHandle {
    /// Starts the actor on a blocking thread. It runs until [`StateHandle::stop`] or until every
    /// handle is dropped; await the returned handle for it to finish (the store is closed then).
    pub fn spawn(state: State) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Job>(INBOX);
        let join = tokio::task::spawn_blocking(move || {
            let mut state = state;
            while let Some(job) = rx.blocking_recv() {
                job(&mut state);
                if state.stop {
                    break;
                }
            }
            tracing::debug!("state actor stopped");
        });
        (Self { tx }, join)
    }

    /// Runs `f` on the actor and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> R + Send + 'static,
    ) -> Result<R, StateGone> {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |state| {
            if reply.send(f(state)).is_err() {
                tracing::debug!("a state caller went away before its reply");
            }
        });
        self.tx.send(job).await.map_err(|_| StateGone)?;
        rx.await.map_err(|_| StateGone)
    }

    /// Asks the actor to stop after the jobs already queued.
    pub async fn stop(&self) -> Result<(), StateGone> {
        self.call(|s| s.stop = true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, State, Keypair) {
        let dir = tempfile::tempdir().unwrap();
        let kp = Keypair::from_seed(&[7; 32]);
        let store = Store::open(dir.path(), &kp.peer_id()).unwrap();
        (dir, State::new(store), kp)
    }

    fn info(n: u8) -> ShardInfo {
        ShardInfo {
            hash: ContentHash::of(&[n]),
            bytes: 10,
            records: 1,
            tokens: 3,
        }
    }

    #[test]
    fn publish_chains_versions_and_a_peer_ingests_them_in_order() {
        let (_d, mut owner, kp) = state();
        let me = kp.peer_id();
        owner
            .create_datanet(
                me,
                "n".into(),
                "d".into(),
                "MIT".into(),
                RecordSchema::Chat,
                AccessPolicy::Public,
            )
            .unwrap();
        owner
            .commit_shards(
                &owner.resolve("n").unwrap().id,
                me,
                None,
                &[(info(1), vec![ContentHash::of(b"r1")])],
            )
            .unwrap();
        let v1 = owner.publish(&kp, "n").unwrap();
        assert!(matches!(
            owner.publish(&kp, "n"),
            Err(StateError::Nothing(_))
        ));
        let id = owner.resolve("n").unwrap().id;
        owner
            .commit_shards(&id, me, None, &[(info(2), vec![])])
            .unwrap();
        let v2 = owner.publish(&kp, "n").unwrap();
        let m2 = v2.verify().unwrap();
        assert_eq!(m2.version, 2);
        assert_eq!(m2.previous, Some(v1.hash()));
        assert_eq!(m2.shards.len(), 2);
        assert!(owner.pending(&id).unwrap().is_empty());

        let (_d2, mut peer, _) = state();
        let from = Keypair::from_seed(&[9; 32]).peer_id();
        assert_eq!(
            peer.ingest_manifest(from, &v2),
            Ok(Ingested::NeedPrevious(v1.hash()))
        );
        assert_eq!(peer.ingest_manifest(from, &v1), Ok(Ingested::New));
        assert_eq!(peer.ingest_manifest(from, &v2), Ok(Ingested::New));
        assert_eq!(peer.ingest_manifest(from, &v2), Ok(Ingested::Known));
        assert_eq!(peer.heads().unwrap(), owner.heads().unwrap());
        assert!(peer.rejections().is_empty());
    }

    #[test]
    fn tampered_and_foreign_manifests_are_counted() {
        let (_d, mut owner, kp) = state();
        owner
            .create_datanet(
                kp.peer_id(),
                "n".into(),
                String::new(),
                "MIT".into(),
                RecordSchema::Alpaca,
                AccessPolicy::Public,
            )
            .unwrap();
        let v1 = owner.publish(&kp, "n").unwrap();
        let (_d2, mut peer, _) = state();
        let from = Keypair::from_seed(&[9; 32]).peer_id();
        // Re-signed by someone else: the signer is not the owner.
        let m = v1.verify().unwrap();
        let forged = Signed::sign(&Keypair::from_seed(&[3; 32]), &m);
        assert_eq!(peer.ingest_manifest(from, &forged), Err(Rejection::Invalid));
        // Payload edited after signing.
        let mut edited = m.clone();
        edited.description = "edited".into();
        let tampered = Signed::from_parts(
            v1.domain().to_owned(),
            v1.version(),
            v1.signer(),
            edited.to_bytes(),
            *v1.signature(),
        );
        assert_eq!(
            peer.ingest_manifest(from, &tampered),
            Err(Rejection::BadSignature)
        );
        assert_eq!(peer.rejections()[&from].values().sum::<u64>(), 2);
    }

    #[test]
    fn grants_and_revocations_rotate_keys_and_gate_reading() {
        let (_d, mut owner, kp) = state();
        let me = kp.peer_id();
        let b = Keypair::from_seed(&[11; 32]);
        let c = Keypair::from_seed(&[12; 32]);
        let d = owner
            .create_datanet(
                me,
                "p".into(),
                String::new(),
                "MIT".into(),
                RecordSchema::Chat,
                AccessPolicy::Allowlist {
                    grantees: vec![],
                    key_epoch: 0,
                },
            )
            .unwrap();
        let k0 = owner.datanet_key(&d.id, 0).unwrap().unwrap();
        assert!(!owner.may_read(&d.id, &b.peer_id()).unwrap());
        let grants = owner.grant(&kp, "p", b.peer_id()).unwrap();
        owner.grant(&kp, "p", c.peer_id()).unwrap();
        assert_eq!(grants.len(), 1);
        let g = grants[0].verify().unwrap();
        assert_eq!(
            crypto::unwrap_key(&b, &d.id, 0, &g.wrapped_key).unwrap(),
            k0
        );
        assert!(owner.may_read(&d.id, &b.peer_id()).unwrap());
        assert!(owner.may_read(&d.id, &me).unwrap());

        owner.revoke(&kp, "p", b.peer_id()).unwrap();
        assert!(!owner.may_read(&d.id, &b.peer_id()).unwrap());
        let k1 = owner.datanet_key(&d.id, 1).unwrap().unwrap();
        assert_ne!(k0, k1);
        // C receives the new epoch, B does not.
        let for_c = owner.grants_for(&d.id, &c.peer_id()).unwrap();
        assert_eq!(for_c.len(), 2);
        let g1 = for_c[1].verify().unwrap();
        assert_eq!(g1.key_epoch, 1);
        assert_eq!(
            crypto::unwrap_key(&c, &d.id, 1, &g1.wrapped_key).unwrap(),
            k1
        );
        assert!(
            owner
                .grants_for(&d.id, &b.peer_id())
                .unwrap()
                .iter()
                .all(|g| g.verify().unwrap().key_epoch == 0)
        );
        let v1 = owner.publish(&kp, "p").unwrap().verify().unwrap();
        assert_eq!(
            v1.access,
            AccessPolicy::Allowlist {
                grantees: vec![c.peer_id()],
                key_epoch: 1
            }
        );
    }

    #[test]
    fn a_decision_is_applied_once_and_only_from_the_owner() {
        let (_d, mut owner, okp) = state();
        let (_d2, mut contrib, _) = state();
        let ckp = Keypair::from_seed(&[21; 32]);
        let d = owner
            .create_datanet(
                okp.peer_id(),
                "n".into(),
                String::new(),
                "MIT".into(),
                RecordSchema::Chat,
                AccessPolicy::Public,
            )
            .unwrap();
        let v1 = owner.publish(&okp, "n").unwrap();
        contrib.ingest_manifest(okp.peer_id(), &v1).unwrap();
        let sub = Signed::sign(
            &ckp,
            &ShardSubmission {
                datanet: d.id,
                base_version: 1,
                shard: info(5),
                note: String::new(),
                submitted_at: now(),
            },
        );
        contrib.record_sent_submission(&sub).unwrap();
        owner
            .receive_submission(okp.peer_id(), ckp.peer_id(), &sub)
            .unwrap();
        let decided = owner
            .decide(
                &okp,
                &sub.hash().to_string(),
                Verdict::Approved { version: 0 },
                None,
            )
            .unwrap();
        let decision = decided.decision.unwrap();
        assert_eq!(
            decision.verify().unwrap().verdict,
            Verdict::Approved { version: 2 }
        );
        // A decision signed by anyone but the owner is refused and counted.
        let forged = Signed::sign(&ckp, &decision.verify().unwrap());
        let mallory = Keypair::from_seed(&[22; 32]).peer_id();
        assert!(contrib.receive_decision(mallory, &forged).is_err());
        contrib.receive_decision(okp.peer_id(), &decision).unwrap();
        assert!(contrib.receive_decision(okp.peer_id(), &decision).is_err());
        let (_, mine) = contrib.submission(&sub.hash().to_string()).unwrap();
        assert_eq!(mine.status, SubmissionStatus::Approved);
        assert_eq!(contrib.rejections()[&mallory][&Rejection::Invalid], 1);
        assert_eq!(
            contrib.rejections()[&okp.peer_id()][&Rejection::Replayed],
            1
        );
    }

    #[test]
    fn replays_and_floods_are_refused() {
        let (_d, mut s, _) = state();
        let p = Keypair::from_seed(&[9; 32]).peer_id();
        assert!(s.accept_seq(p, 5));
        assert!(s.accept_seq(p, 3));
        assert!(!s.accept_seq(p, 5));
        assert!(s.accept_seq(p, 1000));
        assert!(!s.accept_seq(p, 10));
        for _ in 0..RATE_LIMIT {
            assert!(s.rate_allow(p));
        }
        assert!(!s.rate_allow(p));
        let counts = &s.rejections()[&p];
        assert_eq!(counts[&Rejection::Replayed], 2);
        assert_eq!(counts[&Rejection::RateLimited], 1);
    }
}
