//! A peer's data directory.
//!
//! ```text
//! DATA_DIR/            mode 0700
//!   peer.key           the peer's ed25519 key, mode 0600 (format: cohort_protocol::identity)
//!   meta/              rocksdb metadata store (crate::store)
//!   blobs/             iroh-blobs store: shards, manifests, adapters, models
//! ```
//!
//! The directory is chosen by `--data-dir`, else `COHORT_DATA_DIR`, else `~/.cohort`.

use std::path::{Path, PathBuf};

use cohort_protocol::identity::KeyFileError;
use cohort_protocol::{Keypair, PeerId};

use crate::store::{Store, StoreError};

/// The file name of the peer's key inside the data directory.
pub const KEY_FILE: &str = "peer.key";

/// Why a data directory could not be set up or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// Creating the directory failed.
    #[error("data directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The directory has no key: it was never initialised.
    #[error("data directory {path} is not initialised: run `cohort init --data-dir {path}`")]
    NotInitialised {
        /// The directory.
        path: PathBuf,
    },
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The metadata store is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `init` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOutcome {
    /// The peer's id.
    pub peer_id: PeerId,
    /// Whether a new key was created (false: the directory was already initialised).
    pub created: bool,
}

/// A peer's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root` (nothing is touched yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The key file.
    pub fn key_path(&self) -> PathBuf {
        self.root.join(KEY_FILE)
    }

    /// The metadata store's directory.
    pub fn meta_path(&self) -> PathBuf {
        self.root.join("meta")
    }

    /// The blob store's directory.
    pub fn blobs_path(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// Creates the directory, the peer's key and the metadata store. Idempotent: an already
    /// initialised directory keeps its key (it is checked, never replaced).
    pub fn init(&self) -> Result<InitOutcome, DataDirError> {
        let io = |source| DataDirError::Io {
            path: self.root.clone(),
            source,
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            builder.mode(0o700);
        }
        builder.create(&self.root).map_err(io)?;
        let key_path = self.key_path();
        let (keypair, created) = if key_path.exists() {
            (Keypair::load(&key_path)?, false)
        } else {
            let keypair = Keypair::generate();
            keypair.save_new(&key_path)?;
            (keypair, true)
        };
        // Opening creates the store and records which peer it belongs to.
        drop(Store::open(&self.meta_path(), &keypair.peer_id())?);
        Ok(InitOutcome {
            peer_id: keypair.peer_id(),
            created,
        })
    }

    /// Loads the peer's key.
    pub fn keypair(&self) -> Result<Keypair, DataDirError> {
        let key_path = self.key_path();
        if !key_path.exists() {
            return Err(DataDirError::NotInitialised {
                path: self.root.clone(),
            });
        }
        Ok(Keypair::load(&key_path)?)
    }

    /// Opens the metadata store for this directory's peer.
    pub fn open_store(&self, keypair: &Keypair) -> Result<Store, DataDirError> {
        Ok(Store::open(&self.meta_path(), &keypair.peer_id())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_idempotent_and_keeps_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("nested/data"));
        let first = dir.init().unwrap();
        assert!(first.created);
        let second = dir.init().unwrap();
        assert!(!second.created);
        assert_eq!(first.peer_id, second.peer_id);
        assert_eq!(dir.keypair().unwrap().peer_id(), first.peer_id);
        dir.open_store(&dir.keypair().unwrap()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.root()).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
    }

    #[test]
    fn an_uninitialised_directory_says_how_to_fix_it() {
        let tmp = tempfile::tempdir().unwrap();
        let err = DataDir::new(tmp.path()).keypair().unwrap_err();
        assert!(err.to_string().contains("cohort init"), "{err}");
    }

    #[test]
    fn a_swapped_key_is_refused_by_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        dir.init().unwrap();
        std::fs::remove_file(dir.key_path()).unwrap();
        Keypair::generate().save_new(&dir.key_path()).unwrap();
        let err = dir.init().unwrap_err();
        assert!(
            matches!(err, DataDirError::Store(StoreError::WrongPeer { .. })),
            "{err}"
        );
    }
}
