//! The optional configuration file `DATA_DIR/config.json`.
//!
//! It holds what a node needs on every start and would be tedious on the command line: for now
//! the DHT's bootstrap multiaddrs and settings. Flags of `cohort up` override it (bootstrap
//! addresses from both are joined). A missing file is an empty configuration; an unreadable
//! or malformed one is an error naming the file and the field.
//!
//! ```json
//! {
//!   "dht": {
//!     "bootstrap": ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."],
//!     "listen": ["/ip4/0.0.0.0/tcp/4001"],
//!     "mode": "auto",
//!     "record_ttl_secs": 172800,
//!     "mdns": true
//!   }
//! }
//! ```

use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use serde::Deserialize;

use crate::dht::DhtMode;

/// The name of the configuration file in the data directory.
pub const CONFIG_FILE: &str = "config.json";

/// The configuration file's contents.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// DHT settings.
    #[serde(default)]
    pub dht: DhtFileConfig,
}

/// The `dht` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DhtFileConfig {
    /// Multiaddrs ending in `/p2p/PEER_ID` to join.
    #[serde(default)]
    pub bootstrap: Vec<Multiaddr>,
    /// Where to listen (replaces the default `/ip4/127.0.0.1/tcp/0`).
    #[serde(default)]
    pub listen: Vec<Multiaddr>,
    /// `auto`, `server` or `client`.
    #[serde(default)]
    pub mode: Option<DhtMode>,
    /// Record lifetime in seconds.
    #[serde(default)]
    pub record_ttl_secs: Option<u64>,
    /// mDNS on the local network (with `--public`; on by default there).
    #[serde(default)]
    pub mdns: Option<bool>,
}

/// Why the configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// It could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// It is not valid.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Where.
        line: usize,
        /// Where.
        column: usize,
        /// What is wrong.
        message: String,
    },
}

impl FileConfig {
    /// Reads `dir/config.json`; a missing file is the empty configuration.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ConfigError::Io { path, source }),
        };
        Self::parse(&text, &path)
    }

    /// Parses the file's text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example_and_names_bad_fields() {
        let p = Path::new("config.json");
        let peer = crate::identity::libp2p_peer_id(
            &cohort_protocol::Keypair::from_seed(&[3; 32]).peer_id(),
        );
        let text = format!(
            r#"{{"dht": {{"bootstrap": ["/ip4/127.0.0.1/tcp/4001/p2p/{peer}"], "mode": "server", "record_ttl_secs": 60}}}}"#
        );
        let c = FileConfig::parse(&text, p).unwrap();
        assert_eq!(c.dht.bootstrap.len(), 1);
        assert_eq!(c.dht.mode, Some(DhtMode::Server));
        assert_eq!(c.dht.record_ttl_secs, Some(60));
        assert_eq!(FileConfig::parse("{}", p).unwrap(), FileConfig::default());

        let e = FileConfig::parse("{\"dht\": {\"bootstrap\": [\"not an address\"]}}", p)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config.json:1:"), "{e}");
        let e = FileConfig::parse("{\"dht\": {\"bootsrap\": []}}", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bootsrap"), "{e}");
        let e = FileConfig::parse("{\"dht\": {\"mode\": \"both\"}}", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("both"), "{e}");
    }

    #[test]
    fn a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(FileConfig::load(dir.path()).unwrap(), FileConfig::default());
    }
}
