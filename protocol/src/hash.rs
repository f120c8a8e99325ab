//! Content hashes.
//!
//! A [`ContentHash`] is the BLAKE3 hash of some bytes: bit-identical to the hash iroh-blobs gives
//! the same bytes, so a shard's, an adapter's or a model's hash is also its blob hash. Printed as
//! 64 lowercase hex digits, as iroh-blobs prints its hashes.

use std::fmt;
use std::str::FromStr;

use bincode::{Decode, Encode};

/// The BLAKE3 hash of a byte string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// A hash from its 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 5 bytes in hex, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..5])
    }
}

/// An incremental hasher for content too large to hold in memory at once.
#[derive(Debug, Default, Clone)]
pub struct ContentHasher(blake3::Hasher);

impl ContentHasher {
    /// A new hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(bytes);
        self
    }

    /// The hash of everything fed so far.
    pub fn finalize(&self) -> ContentHash {
        ContentHash(*self.0.finalize().as_bytes())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.short())
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a 32-byte hash in hex ({reason}): {input:?}")]
pub struct ParseHashError {
    input: String,
    reason: &'static str,
}

/// Parses exactly 64 hex digits (either case) into 32 bytes.
pub(crate) fn parse_hex32(s: &str) -> Result<[u8; 32], &'static str> {
    if s.len() != 64 {
        return Err("expected 64 hex digits");
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| "not hex")?;
    Ok(out)
}

impl FromStr for ContentHash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s).map(Self).map_err(|reason| ParseHashError {
            input: s.chars().take(80).collect(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_blake3_vector() {
        // BLAKE3 of the empty input, from the BLAKE3 specification's test vectors.
        assert_eq!(
            ContentHash::of(b"").to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn incremental_matches_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut h = ContentHasher::new();
        for chunk in data.chunks(777) {
            h.update(chunk);
        }
        assert_eq!(h.finalize(), ContentHash::of(&data));
    }

    #[test]
    fn printable_form_parses_back() {
        let h = ContentHash::of(b"cohort");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ContentHash>(), Ok(h));
        assert_eq!(s.to_uppercase().parse::<ContentHash>(), Ok(h));
        assert!("abc".parse::<ContentHash>().is_err());
        assert!(format!("{}zz", &s[..62]).parse::<ContentHash>().is_err());
    }
}
