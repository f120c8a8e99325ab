//! The rocksdb metadata store.
//!
//! One rocksdb database per data directory, one column family per kind of record (see [`Cf`]).
//! Every change that touches more than one key goes through one [`rocksdb::WriteBatch`], so a
//! `kill -9` at any moment leaves either all of it or none. Blob bytes live in iroh-blobs' own
//! store; this store only points at them by hash.
//!
//! The `meta` column family holds the schema version and the peer id the store belongs to; a
//! store written by a newer Cohort, or for another peer's key, is refused with a clear error.

use std::path::{Path, PathBuf};

use cohort_protocol::PeerId;

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

const KEY_SCHEMA_VERSION: &[u8] = b"schema_version";
const KEY_PEER_ID: &[u8] = b"peer_id";

/// The column families: one per kind of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cf {
    /// Store-level facts: schema version, owner peer id.
    Meta,
    /// Datanets this peer knows: id -> latest manifest hash.
    Datanets,
    /// Signed manifests by hash.
    Manifests,
    /// Shard submissions by hash.
    Submissions,
    /// Grants and revocations.
    Grants,
    /// Signed job specs by job id.
    Jobs,
    /// Round state per (job, round).
    Rounds,
    /// Ledger entries per (coordinator, seq).
    Ledger,
    /// Adapters this peer holds.
    Adapters,
    /// Known peers and their counters.
    Peers,
    /// Shards waiting for the next version of an owned datanet: datanet id ++ shard hash.
    Pending,
    /// Shards whose blobs this peer holds: shard hash -> datanet and shard info.
    Shards,
    /// Normalised-record hashes per datanet, for deduplication: datanet id ++ record hash.
    Records,
}

impl Cf {
    /// Every column family.
    pub const ALL: [Cf; 13] = [
        Cf::Meta,
        Cf::Datanets,
        Cf::Manifests,
        Cf::Submissions,
        Cf::Grants,
        Cf::Jobs,
        Cf::Rounds,
        Cf::Ledger,
        Cf::Adapters,
        Cf::Peers,
        Cf::Pending,
        Cf::Shards,
        Cf::Records,
    ];

    /// The column family's name in rocksdb.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Datanets => "datanets",
            Cf::Manifests => "manifests",
            Cf::Submissions => "submissions",
            Cf::Grants => "grants",
            Cf::Jobs => "jobs",
            Cf::Rounds => "rounds",
            Cf::Ledger => "ledger",
            Cf::Adapters => "adapters",
            Cf::Peers => "peers",
            Cf::Pending => "pending",
            Cf::Shards => "shards",
            Cf::Records => "records",
        }
    }
}

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// rocksdb failed (I/O, corruption, a lock held by another process).
    #[error("metadata store {path}: {source}")]
    Db {
        /// The store's directory.
        path: PathBuf,
        /// rocksdb's error.
        #[source]
        source: rocksdb::Error,
    },
    /// The store was written by a newer (or unknown) schema.
    #[error(
        "metadata store {path}: schema version {found}, this build of cohort reads version \
         {SCHEMA_VERSION}; upgrade cohort"
    )]
    SchemaVersion {
        /// The store's directory.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// A meta record is malformed.
    #[error("metadata store {path}: meta record {key:?} is malformed")]
    MalformedMeta {
        /// The store's directory.
        path: PathBuf,
        /// The record's key.
        key: &'static str,
    },
    /// A record does not decode.
    #[error("metadata store {path}: a {key} record is malformed")]
    Malformed {
        /// The store's directory.
        path: PathBuf,
        /// What kind of record.
        key: &'static str,
    },
    /// The store belongs to another peer's key.
    #[error("metadata store {path} belongs to peer {stored}, but the key file is for peer {key}")]
    WrongPeer {
        /// The store's directory.
        path: PathBuf,
        /// The peer id recorded in the store.
        stored: PeerId,
        /// The peer id of the key file.
        key: PeerId,
    },
}

/// The metadata store of one peer.
#[derive(Debug)]
pub struct Store {
    db: rocksdb::DB,
    path: PathBuf,
}

/// A key and its value, as read from the store.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A set of changes applied atomically by [`Store::write`].
#[derive(Default)]
pub struct Batch(rocksdb::WriteBatch);

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Batch({} changes)", self.0.len())
    }
}

impl Store {
    /// Opens (creating if needed) the store at `path` for `peer`: checks the schema version and
    /// that the store belongs to `peer`, recording both on first open in one batch.
    pub fn open(path: &Path, peer: &PeerId) -> Result<Self, StoreError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = Cf::ALL
            .iter()
            .map(|cf| rocksdb::ColumnFamilyDescriptor::new(cf.name(), rocksdb::Options::default()));
        let db = rocksdb::DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| {
            StoreError::Db {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let store = Self {
            db,
            path: path.to_path_buf(),
        };
        store.check_meta(peer)?;
        Ok(store)
    }

    fn check_meta(&self, peer: &PeerId) -> Result<(), StoreError> {
        let version = self.get(Cf::Meta, KEY_SCHEMA_VERSION)?;
        let owner = self.get(Cf::Meta, KEY_PEER_ID)?;
        match (version, owner) {
            (None, None) => {
                let mut batch = Batch::default();
                self.put(
                    &mut batch,
                    Cf::Meta,
                    KEY_SCHEMA_VERSION,
                    &SCHEMA_VERSION.to_le_bytes(),
                );
                self.put(&mut batch, Cf::Meta, KEY_PEER_ID, peer.as_bytes());
                self.write(batch)
            }
            (Some(version), Some(owner)) => {
                let version = <[u8; 4]>::try_from(version.as_slice())
                    .map(u32::from_le_bytes)
                    .map_err(|_| self.malformed("schema_version"))?;
                if version != SCHEMA_VERSION {
                    return Err(StoreError::SchemaVersion {
                        path: self.path.clone(),
                        found: version,
                    });
                }
                let stored = <[u8; 32]>::try_from(owner.as_slice())
                    .ok()
                    .and_then(|b| PeerId::from_bytes(&b).ok())
                    .ok_or_else(|| self.malformed("peer_id"))?;
                if &stored != peer {
                    return Err(StoreError::WrongPeer {
                        path: self.path.clone(),
                        stored,
                        key: *peer,
                    });
                }
                Ok(())
            }
            // Both are written in one batch: one without the other is not a state we produce.
            (Some(_), None) => Err(self.malformed("peer_id")),
            (None, Some(_)) => Err(self.malformed("schema_version")),
        }
    }

    fn malformed(&self, key: &'static str) -> StoreError {
        StoreError::MalformedMeta {
            path: self.path.clone(),
            key,
        }
    }

    fn db_error(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn handle(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        // Every Cf is created by `open`; a missing handle is a bug here, not bad input.
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(cf.name())
            .expect("every column family is opened with the store")
    }

    /// Reads one value.
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.handle(cf), key)
            .map_err(|e| self.db_error(e))
    }

    /// Adds a put to `batch`.
    pub fn put(&self, batch: &mut Batch, cf: Cf, key: &[u8], value: &[u8]) {
        batch.0.put_cf(self.handle(cf), key, value);
    }

    /// Adds a delete to `batch`.
    pub fn delete(&self, batch: &mut Batch, cf: Cf, key: &[u8]) {
        batch.0.delete_cf(self.handle(cf), key);
    }

    /// Applies `batch` atomically.
    pub fn write(&self, batch: Batch) -> Result<(), StoreError> {
        self.db.write(batch.0).map_err(|e| self.db_error(e))
    }

    /// All `(key, value)` pairs of `cf` whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let mode = rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.handle(cf), mode) {
            let (k, v) = item.map_err(|e| self.db_error(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Whether `cf` holds `key`.
    pub fn contains(&self, cf: Cf, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(cf, key)?.is_some())
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_protocol::Keypair;

    #[test]
    fn creates_every_column_family_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let me = Keypair::from_seed(&[1; 32]).peer_id();
        {
            let store = Store::open(dir.path(), &me).unwrap();
            let mut batch = Batch::default();
            for cf in Cf::ALL {
                store.put(&mut batch, cf, b"k/1", cf.name().as_bytes());
                store.put(&mut batch, cf, b"k/2", b"two");
                store.put(&mut batch, cf, b"l/1", b"other prefix");
            }
            store.write(batch).unwrap();
        }
        let store = Store::open(dir.path(), &me).unwrap();
        for cf in Cf::ALL {
            assert_eq!(
                store.get(cf, b"k/1").unwrap().as_deref(),
                Some(cf.name().as_bytes())
            );
            let scanned = store.scan_prefix(cf, b"k/").unwrap();
            assert_eq!(scanned.len(), 2, "{}", cf.name());
        }
        // The column families are really there, under these names.
        let names = rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.path()).unwrap();
        for cf in Cf::ALL {
            assert!(names.iter().any(|n| n == cf.name()), "{names:?}");
        }
    }

    #[test]
    fn refuses_another_peers_store() {
        let dir = tempfile::tempdir().unwrap();
        let me = Keypair::from_seed(&[1; 32]).peer_id();
        let other = Keypair::from_seed(&[2; 32]).peer_id();
        drop(Store::open(dir.path(), &me).unwrap());
        let err = Store::open(dir.path(), &other).unwrap_err();
        assert!(matches!(err, StoreError::WrongPeer { .. }), "{err}");
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let me = Keypair::from_seed(&[1; 32]).peer_id();
        {
            let store = Store::open(dir.path(), &me).unwrap();
            let mut batch = Batch::default();
            store.put(
                &mut batch,
                Cf::Meta,
                KEY_SCHEMA_VERSION,
                &(SCHEMA_VERSION + 1).to_le_bytes(),
            );
            store.write(batch).unwrap();
        }
        let err = Store::open(dir.path(), &me).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaVersion { found, .. } if found == SCHEMA_VERSION + 1)
        );
        assert!(err.to_string().contains("upgrade cohort"), "{err}");
    }

    #[test]
    fn a_second_process_cannot_open_a_store_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let me = Keypair::from_seed(&[1; 32]).peer_id();
        let _open = Store::open(dir.path(), &me).unwrap();
        let err = Store::open(dir.path(), &me).unwrap_err();
        assert!(matches!(err, StoreError::Db { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }
}
