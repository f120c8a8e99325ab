//! The canonical encoding.
//!
//! Every message is encoded with bincode 2 in ONE configuration: little-endian, fixed-width
//! integers (so each value has exactly one encoding: no variable-length integers with redundant
//! forms), lengths as u64, enum variants as u32 in declaration order, strings as UTF-8, `bool`
//! as one byte that must be 0 or 1, `Option` as a 0/1 tag. Wire types contain no maps and keep
//! their lists in a documented order, so that decoding and re-encoding any accepted byte string
//! gives the same bytes back (a property test checks this).
//!
//! Decoding never panics, rejects trailing bytes, and never allocates more than the limit it is
//! given: bincode checks each collection's claimed size against the limit before allocating.

use bincode::config::{Configuration, Fixint, LittleEndian, NoLimit};

/// The default decode limit for one message: 16 MiB. Larger artefacts travel as blobs and are
/// referenced by hash.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

const fn config() -> Configuration<LittleEndian, Fixint, NoLimit> {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input (or what it claims to contain) is larger than the limit.
    #[error("{what}: message is larger than the {limit}-byte limit")]
    TooLarge {
        /// The type being decoded.
        what: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// Bytes were left over after a complete value.
    #[error("{what}: {extra} trailing bytes after a complete value")]
    TrailingBytes {
        /// The type being decoded.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// The bytes are not a valid encoding.
    #[error("{what}: malformed encoding: {reason}")]
    Malformed {
        /// The type being decoded.
        what: &'static str,
        /// What bincode or a validity check said.
        reason: String,
    },
}

/// A type with a canonical byte encoding.
///
/// Implemented for every type that derives bincode's `Encode` and `Decode`.
pub trait Canonical: bincode::Encode + bincode::Decode<()> + Sized {
    /// Encodes `self` canonically.
    fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a value from exactly `bytes`, with the default [`MAX_MESSAGE_BYTES`] limit.
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_limited::<Self, MAX_MESSAGE_BYTES>(bytes)
    }
}

impl<T: bincode::Encode + bincode::Decode<()>> Canonical for T {}

/// Encodes a value canonically.
pub fn encode<T: bincode::Encode + ?Sized>(value: &T) -> Vec<u8> {
    // Encoding into a Vec fails only if a type's own Encode impl returns an error, and none of
    // ours do; a failure here is a bug in this crate, not bad input.
    #[allow(clippy::expect_used)]
    bincode::encode_to_vec(value, config()).expect("canonical encoding into a Vec cannot fail")
}

/// Decodes exactly `bytes` into a `T`, allocating at most `LIMIT` bytes for its contents.
pub fn decode_limited<T: bincode::Decode<()>, const LIMIT: usize>(
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let what = short_type_name::<T>();
    if bytes.len() > LIMIT {
        return Err(DecodeError::TooLarge { what, limit: LIMIT });
    }
    let (value, used) =
        bincode::decode_from_slice(bytes, config().with_limit::<LIMIT>()).map_err(|e| match e {
            bincode::error::DecodeError::LimitExceeded => {
                DecodeError::TooLarge { what, limit: LIMIT }
            }
            other => DecodeError::Malformed {
                what,
                reason: other.to_string(),
            },
        })?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    // Keep the last path segment of the outer type, e.g. "Signed<..>" or "Manifest".
    let outer = full.split('<').next().unwrap_or(full);
    let start = outer.rfind("::").map_or(0, |i| i + 2);
    &full[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, bincode::Encode, bincode::Decode)]
    struct Sample {
        a: u32,
        b: Vec<u8>,
        c: Option<bool>,
    }

    #[test]
    fn fixed_little_endian_layout() {
        let s = Sample {
            a: 0x0102_0304,
            b: vec![9, 8],
            c: Some(true),
        };
        assert_eq!(
            hex::encode(s.to_bytes()),
            concat!("04030201", "0200000000000000", "0908", "01", "01")
        );
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = Sample {
            a: 1,
            b: vec![],
            c: None,
        }
        .to_bytes();
        bytes.push(0);
        assert!(matches!(
            Sample::from_bytes(&bytes),
            Err(DecodeError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn huge_claimed_length_is_refused_before_allocating() {
        // a = 0, then a Vec<u8> claiming 2^62 bytes.
        let mut bytes = vec![0u8; 4];
        bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(
            Sample::from_bytes(&bytes),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_limited::<Sample, 64>(&[0u8; 65]),
            Err(DecodeError::TooLarge { limit: 64, .. })
        ));
    }

    #[test]
    fn invalid_bool_and_option_tags_are_rejected() {
        let good = Sample {
            a: 0,
            b: vec![],
            c: Some(false),
        }
        .to_bytes();
        let mut bad_bool = good.clone();
        *bad_bool.last_mut().unwrap_or(&mut 0) = 2;
        assert!(Sample::from_bytes(&bad_bool).is_err());
        let mut bad_tag = good;
        let n = bad_tag.len();
        bad_tag[n - 2] = 2;
        assert!(Sample::from_bytes(&bad_tag).is_err());
    }
}
