//! Private datanets' cryptography.
//!
//! - **Shards**: XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`) under the datanet key of a
//!   key epoch, a random 24-byte nonce per shard (prefixed to the blob), the datanet id and the
//!   epoch as associated data. The blob (and its hash) is the ciphertext, so providers that are
//!   not grantees only ever hold and serve ciphertext.
//! - **Key wrapping** (the `wrapped_key` of a [`cohort_protocol::types::Grant`]): an
//!   ECIES-style sealed box to the grantee's X25519 key, which is derived from its ed25519 peer
//!   key (the birational map to Montgomery form; the secret scalar is the one ed25519 signs
//!   with). An ephemeral X25519 key per wrap; the wrapping key is BLAKE3 `derive_key` over the
//!   shared secret, both public keys, the datanet and the epoch; the datanet key is sealed with
//!   XChaCha20-Poly1305. Output: ephemeral public key (32) || ciphertext (48) = 80 bytes.
//!   Deriving X25519 from the peer key means a grant needs nothing from the grantee but its
//!   peer id; using one key for signing and for DH is the standard ed25519->X25519 conversion
//!   (as libsodium's `crypto_sign_ed25519_pk_to_curve25519`), kept apart by BLAKE3 contexts.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use cohort_protocol::types::DatanetId;
use cohort_protocol::{Keypair, PeerId};
use curve25519_dalek::montgomery::MontgomeryPoint;

/// A datanet key of one epoch.
pub type DatanetKey = [u8; 32];

/// Length of a wrapped key.
pub const WRAPPED_KEY_BYTES: usize = 32 + 32 + 16;

/// Why decryption or unwrapping failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The ciphertext is too short to hold a nonce and a tag.
    #[error("ciphertext of {0} bytes is too short")]
    TooShort(usize),
    /// Authentication failed: wrong key, or tampered bytes.
    #[error("decryption failed: wrong key or tampered ciphertext")]
    Auth,
    /// The peer id is not a usable public key.
    #[error("peer {0} has no usable X25519 key")]
    BadPeerKey(PeerId),
    /// The key exchange produced an all-zero secret (a low-order point).
    #[error("key exchange with a low-order point")]
    LowOrder,
}

/// A fresh random datanet key.
pub fn new_key() -> DatanetKey {
    rand::random()
}

fn aad(datanet: &DatanetId, epoch: u32) -> Vec<u8> {
    let mut a = b"cohort/shard/v1".to_vec();
    a.extend_from_slice(datanet.0.as_bytes());
    a.extend_from_slice(&epoch.to_le_bytes());
    a
}

/// Encrypts a shard: nonce || ciphertext.
pub fn encrypt_shard(
    key: &DatanetKey,
    datanet: &DatanetId,
    epoch: u32,
    plaintext: &[u8],
) -> Vec<u8> {
    let nonce: [u8; 24] = rand::random();
    let cipher = XChaCha20Poly1305::new(key.into());
    let aad = aad(datanet, epoch);
    // Encryption into a Vec fails only on lengths beyond 2^38 bytes, far above a shard.
    #[allow(clippy::expect_used)]
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("a shard is far below XChaCha20-Poly1305's length limit");
    let mut out = Vec::with_capacity(24 + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Decrypts a shard produced by [`encrypt_shard`].
pub fn decrypt_shard(
    key: &DatanetKey,
    datanet: &DatanetId,
    epoch: u32,
    blob: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if blob.len() < 24 + 16 {
        return Err(CryptoError::TooShort(blob.len()));
    }
    let (nonce, ct) = blob.split_at(24);
    let aad = aad(datanet, epoch);
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
        .map_err(|_| CryptoError::Auth)
}

fn x25519_public(peer: &PeerId) -> Result<MontgomeryPoint, CryptoError> {
    let vk = ed25519_dalek::VerifyingKey::from_bytes(peer.as_bytes())
        .map_err(|_| CryptoError::BadPeerKey(*peer))?;
    Ok(vk.to_montgomery())
}

fn x25519_secret(keypair: &Keypair) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(&keypair.secret_seed()).to_scalar_bytes()
}

fn wrapping_key(
    shared: &MontgomeryPoint,
    ephemeral: &MontgomeryPoint,
    recipient: &MontgomeryPoint,
    datanet: &DatanetId,
    epoch: u32,
) -> Result<[u8; 32], CryptoError> {
    if shared.as_bytes() == &[0u8; 32] {
        return Err(CryptoError::LowOrder);
    }
    let mut h = blake3::Hasher::new_derive_key("cohort/grant-wrap/v1");
    h.update(shared.as_bytes());
    h.update(ephemeral.as_bytes());
    h.update(recipient.as_bytes());
    h.update(datanet.0.as_bytes());
    h.update(&epoch.to_le_bytes());
    Ok(*h.finalize().as_bytes())
}

/// Seals `key` to `grantee`.
pub fn wrap_key(
    key: &DatanetKey,
    datanet: &DatanetId,
    epoch: u32,
    grantee: &PeerId,
) -> Result<Vec<u8>, CryptoError> {
    let recipient = x25519_public(grantee)?;
    let eph_secret: [u8; 32] = rand::random();
    let eph_public = MontgomeryPoint::mul_base_clamped(eph_secret);
    let shared = recipient.mul_clamped(eph_secret);
    let k = wrapping_key(&shared, &eph_public, &recipient, datanet, epoch)?;
    // A fresh key per wrap: the all-zero nonce is used once per key.
    #[allow(clippy::expect_used)]
    let ct = XChaCha20Poly1305::new((&k).into())
        .encrypt(XNonce::from_slice(&[0; 24]), key.as_slice())
        .expect("32 bytes always encrypt");
    let mut out = eph_public.as_bytes().to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens a key sealed to `keypair` by [`wrap_key`].
pub fn unwrap_key(
    keypair: &Keypair,
    datanet: &DatanetId,
    epoch: u32,
    wrapped: &[u8],
) -> Result<DatanetKey, CryptoError> {
    if wrapped.len() != WRAPPED_KEY_BYTES {
        return Err(CryptoError::TooShort(wrapped.len()));
    }
    let (eph, ct) = wrapped.split_at(32);
    let mut eph_bytes = [0u8; 32];
    eph_bytes.copy_from_slice(eph);
    let eph_public = MontgomeryPoint(eph_bytes);
    let secret = x25519_secret(keypair);
    let me = MontgomeryPoint::mul_base_clamped(secret);
    let shared = eph_public.mul_clamped(secret);
    let k = wrapping_key(&shared, &eph_public, &me, datanet, epoch)?;
    let key = XChaCha20Poly1305::new((&k).into())
        .decrypt(XNonce::from_slice(&[0; 24]), ct)
        .map_err(|_| CryptoError::Auth)?;
    key.try_into().map_err(|_| CryptoError::Auth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_protocol::ContentHash;

    #[test]
    fn shards_round_trip_and_refuse_the_wrong_key_or_context() {
        let d = DatanetId(ContentHash::of(b"d"));
        let key = new_key();
        let blob = encrypt_shard(&key, &d, 3, b"secret records\n");
        assert_eq!(
            decrypt_shard(&key, &d, 3, &blob).unwrap(),
            b"secret records\n"
        );
        assert_eq!(
            decrypt_shard(&new_key(), &d, 3, &blob),
            Err(CryptoError::Auth)
        );
        assert_eq!(decrypt_shard(&key, &d, 4, &blob), Err(CryptoError::Auth));
        let mut bad = blob.clone();
        bad[30] ^= 1;
        assert_eq!(decrypt_shard(&key, &d, 3, &bad), Err(CryptoError::Auth));
    }

    #[test]
    fn a_wrapped_key_opens_only_for_its_grantee() {
        let d = DatanetId(ContentHash::of(b"d"));
        let grantee = Keypair::from_seed(&[1; 32]);
        let other = Keypair::from_seed(&[2; 32]);
        let key = new_key();
        let wrapped = wrap_key(&key, &d, 0, &grantee.peer_id()).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_KEY_BYTES);
        assert_eq!(unwrap_key(&grantee, &d, 0, &wrapped).unwrap(), key);
        assert_eq!(unwrap_key(&other, &d, 0, &wrapped), Err(CryptoError::Auth));
        assert_eq!(
            unwrap_key(&grantee, &d, 1, &wrapped),
            Err(CryptoError::Auth)
        );
        // Two wraps of one key differ (fresh ephemeral keys).
        assert_ne!(wrapped, wrap_key(&key, &d, 0, &grantee.peer_id()).unwrap());
    }
}
