//! Peer identity: one ed25519 key per peer.
//!
//! A [`PeerId`] is the peer's ed25519 public key: the same 32 bytes as its iroh `EndpointId`,
//! and the key its libp2p `PeerId` is derived from (the conversions live in `cohort-peer`).
//!
//! **Printable form.** A `PeerId` prints as 64 lowercase hex digits of the public key — the
//! form iroh prints an `EndpointId` in — and parses back from 64 hex digits in either case.
//!
//! **Key file.** The secret key lives in one text file, written with mode 0600:
//!
//! ```text
//! cohort-secret-key-v1
//! <64 hex digits: the 32-byte ed25519 seed>
//! ```
//!
//! Loading fails, naming the file, if it is missing, malformed, or readable or writable by the
//! group or others (like ssh, Cohort will not use a key that others can read).

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use bincode::de::Decoder;
use bincode::error::DecodeError as BincodeDecodeError;
use bincode::{Decode, Encode};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::hash::parse_hex32;

/// A peer's public identity: its ed25519 public key.
///
/// Every `PeerId` holds a valid curve point: parsing and decoding check it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode)]
pub struct PeerId([u8; 32]);

/// Bytes that are not an ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an ed25519 public key ({reason}): {input:?}")]
pub struct ParsePeerIdError {
    input: String,
    reason: &'static str,
}

impl PeerId {
    /// A peer id from the 32 bytes of an ed25519 public key.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, ParsePeerIdError> {
        VerifyingKey::from_bytes(bytes).map_err(|_| ParsePeerIdError {
            input: hex::encode(bytes),
            reason: "not a point on the curve",
        })?;
        Ok(Self(*bytes))
    }

    /// The 32 bytes of the public key.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 5 bytes in hex, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..5])
    }

    /// Verifies `signature` over `message` with ed25519's strict rules (no small-order keys,
    /// canonical `R` and `s`).
    pub fn verify_strict(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        key.verify_strict(message, &signature).is_ok()
    }
}

impl<Ctx> Decode<Ctx> for PeerId {
    fn decode<D: Decoder<Context = Ctx>>(decoder: &mut D) -> Result<Self, BincodeDecodeError> {
        let bytes = <[u8; 32]>::decode(decoder)?;
        PeerId::from_bytes(&bytes)
            .map_err(|_| BincodeDecodeError::Other("peer id is not an ed25519 public key"))
    }
}
bincode::impl_borrow_decode!(PeerId);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl FromStr for PeerId {
    type Err = ParsePeerIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = parse_hex32(s).map_err(|reason| ParsePeerIdError {
            input: s.chars().take(80).collect(),
            reason,
        })?;
        Self::from_bytes(&bytes)
    }
}

/// A peer's signing keypair.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.peer_id().short())
    }
}

/// Why a key file could not be loaded or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or writing the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file's contents are not a Cohort key file.
    #[error("key file {path}: line {line}: {reason}")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// The 1-based line that is wrong.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The file is readable or writable by others.
    #[error(
        "key file {path}: permissions {mode:04o} let other users read or change the secret key; \
         run `chmod 600 {path}`"
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Refusing to overwrite an existing key.
    #[error("key file {path} already exists; refusing to overwrite a peer's identity")]
    AlreadyExists {
        /// The key file.
        path: PathBuf,
    },
}

const KEY_FILE_HEADER: &str = "cohort-secret-key-v1";

impl Keypair {
    /// A fresh keypair from the operating system's random source.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        // The OS random source failing is not recoverable and not caused by any input.
        #[allow(clippy::expect_used)]
        getrandom::fill(seed.as_mut()).expect("the operating system's random source failed");
        Self::from_seed(&seed)
    }

    /// The keypair with the given 32-byte secret seed (deterministic; for tests and vectors).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The secret seed. Handle with care: it is the peer's identity.
    pub fn secret_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// This keypair's public identity.
    pub fn peer_id(&self) -> PeerId {
        PeerId(self.0.verifying_key().to_bytes())
    }

    /// Signs `message` (deterministic ed25519).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// The key file's text for this keypair.
    fn key_file_text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{KEY_FILE_HEADER}\n{}\n",
            hex::encode(self.0.to_bytes())
        ))
    }

    /// Parses a key file's text; `path` is used in errors only.
    pub fn parse_key_file(text: &str, path: &Path) -> Result<Self, KeyFileError> {
        let malformed = |line, reason| KeyFileError::Malformed {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let mut lines = text.lines();
        match lines.next() {
            Some(KEY_FILE_HEADER) => {}
            Some(_) => return Err(malformed(1, "expected the header `cohort-secret-key-v1`")),
            None => return Err(malformed(1, "the file is empty")),
        }
        let Some(seed_hex) = lines.next() else {
            return Err(malformed(2, "missing the secret key line"));
        };
        let seed = Zeroizing::new(
            parse_hex32(seed_hex.trim())
                .map_err(|_| malformed(2, "expected 64 hex digits of secret key"))?,
        );
        if let Some((i, _)) = lines.enumerate().find(|(_, l)| !l.trim().is_empty()) {
            return Err(malformed(i + 3, "unexpected content after the secret key"));
        }
        Ok(Self::from_seed(&seed))
    }

    /// Loads a key file, refusing files that others can read or change.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::TooOpen {
                    path: path.to_path_buf(),
                    mode,
                });
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        Self::parse_key_file(&text, path)
    }

    /// Writes a new key file with mode 0600. Never overwrites an existing file.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyFileError::AlreadyExists {
                    path: path.to_path_buf(),
                }
            } else {
                io(e)
            }
        })?;
        file.write_all(self.key_file_text().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8032_test_vector_1() {
        // RFC 8032 section 7.1, TEST 1: the empty message.
        let seed = parse_hex32("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap();
        let kp = Keypair::from_seed(&seed);
        assert_eq!(
            kp.peer_id().to_string(),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        assert_eq!(
            hex::encode(kp.sign(b"")),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        assert!(kp.peer_id().verify_strict(b"", &kp.sign(b"")));
        assert!(!kp.peer_id().verify_strict(b"x", &kp.sign(b"")));
    }

    #[test]
    fn peer_id_printable_form_parses_back() {
        let id = Keypair::generate().peer_id();
        assert_eq!(id.to_string().parse::<PeerId>().unwrap(), id);
        assert_eq!(id.to_string().to_uppercase().parse::<PeerId>().unwrap(), id);
        assert!("00".parse::<PeerId>().is_err());
    }

    #[test]
    fn invalid_curve_point_is_rejected() {
        // y = 2 is not the y-coordinate of any point on edwards25519.
        let mut bytes = [0u8; 32];
        bytes[0] = 2;
        assert!(PeerId::from_bytes(&bytes).is_err());
        let encoded = crate::encoding::encode(&bytes);
        assert!(<PeerId as crate::Canonical>::from_bytes(&encoded).is_err());
    }

    #[test]
    fn key_file_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.key");
        let kp = Keypair::generate();
        kp.save_new(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(Keypair::load(&path).unwrap().peer_id(), kp.peer_id());
        let again = kp.save_new(&path).unwrap_err();
        assert!(
            matches!(again, KeyFileError::AlreadyExists { .. }),
            "{again}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_key_file_is_refused_naming_the_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("open.key");
        Keypair::generate().save_new(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keypair::load(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::TooOpen { mode: 0o644, .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("open.key") && msg.contains("chmod 600"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_key_files_say_which_line() {
        let p = Path::new("/data/peer.key");
        let cases: [(&str, usize); 5] = [
            ("", 1),
            ("ssh-ed25519 AAAA\n", 1),
            ("cohort-secret-key-v1\n", 2),
            ("cohort-secret-key-v1\nabcd\n", 2),
            (
                "cohort-secret-key-v1\n\
                 9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60\n\nextra\n",
                4,
            ),
        ];
        for (text, want_line) in cases {
            match Keypair::parse_key_file(text, p) {
                Err(KeyFileError::Malformed { line, .. }) => {
                    assert_eq!(line, want_line, "{text:?}")
                }
                other => panic!("{text:?}: expected a malformed error, got {other:?}"),
            }
        }
        let err = Keypair::parse_key_file("x", p).unwrap_err().to_string();
        assert!(
            err.contains("/data/peer.key") && err.contains("line 1"),
            "{err}"
        );
    }
}
