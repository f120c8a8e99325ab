//! Signed envelopes.
//!
//! A [`Signed<T>`] carries a payload `T` as canonical bytes together with who signed it, for
//! which message kind, under which protocol version. On the wire (canonical encoding):
//!
//! | field     | encoding                                      |
//! |-----------|-----------------------------------------------|
//! | domain    | u64 length + UTF-8, e.g. `cohort/manifest/v1` |
//! | version   | u16, [`crate::PROTOCOL_VERSION`]              |
//! | signer    | 32 bytes, the ed25519 public key              |
//! | payload   | u64 length + the payload's canonical bytes    |
//! | signature | 64 bytes                                      |
//!
//! The signature covers the canonical encoding of
//! `("cohort/signature/v1", domain, version, signer, payload)`, so a signature made for one
//! domain, version or signer never verifies as another, and the payload is checked before it is
//! decoded. Verification uses ed25519's strict rules.

use std::fmt;
use std::marker::PhantomData;

use bincode::{Decode, Encode};

use crate::PROTOCOL_VERSION;
use crate::encoding::{self, Canonical, DecodeError};
use crate::hash::ContentHash;
use crate::identity::{Keypair, PeerId};

/// A payload that travels signed: each kind has its own domain tag.
pub trait SignedPayload: Canonical {
    /// The domain tag, e.g. `cohort/manifest/v1`. Never reuse one for another kind.
    const DOMAIN: &'static str;
}

/// The context string that starts every signed message.
const SIGNATURE_CONTEXT: &str = "cohort/signature/v1";

#[derive(Encode)]
struct SigningInput<'a> {
    context: &'a str,
    domain: &'a str,
    version: u16,
    signer: &'a PeerId,
    payload: &'a [u8],
}

/// The envelope as it is encoded: `Signed<T>` without the type marker.
#[derive(Clone, PartialEq, Eq, Encode, Decode)]
struct Envelope {
    domain: String,
    version: u16,
    signer: PeerId,
    payload: Vec<u8>,
    signature: [u8; 64],
}

/// A payload of type `T`, signed. See the module docs for the format.
pub struct Signed<T> {
    envelope: Envelope,
    _payload: PhantomData<fn() -> T>,
}

/// Why a signed envelope was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The envelope is for another kind of message.
    #[error("signed {expected}: envelope is for domain {found:?}")]
    WrongDomain {
        /// The domain the receiver expected.
        expected: &'static str,
        /// The domain in the envelope.
        found: String,
    },
    /// The envelope is from a protocol version this peer does not speak.
    #[error(
        "signed {domain}: unsupported protocol version {found} (this peer speaks {PROTOCOL_VERSION})"
    )]
    UnsupportedVersion {
        /// The domain.
        domain: &'static str,
        /// The version in the envelope.
        found: u16,
    },
    /// The signature does not verify under the signer's key.
    #[error("signed {domain}: bad signature from {signer}")]
    BadSignature {
        /// The domain.
        domain: &'static str,
        /// The claimed signer.
        signer: PeerId,
    },
    /// The signature is valid but the payload does not decode.
    #[error("signed {domain} from {signer}: payload: {source}")]
    Payload {
        /// The domain.
        domain: &'static str,
        /// The signer.
        signer: PeerId,
        /// The decoding error.
        #[source]
        source: DecodeError,
    },
}

impl<T: SignedPayload> Signed<T> {
    /// Signs `payload` with `keypair`.
    pub fn sign(keypair: &Keypair, payload: &T) -> Self {
        let payload = encoding::encode(payload);
        let signer = keypair.peer_id();
        let signature = keypair.sign(&signing_input(
            T::DOMAIN,
            PROTOCOL_VERSION,
            &signer,
            &payload,
        ));
        Self {
            envelope: Envelope {
                domain: T::DOMAIN.to_owned(),
                version: PROTOCOL_VERSION,
                signer,
                payload,
                signature,
            },
            _payload: PhantomData,
        }
    }

    /// Checks domain, version and signature (strict ed25519), then decodes the payload.
    pub fn verify(&self) -> Result<T, VerifyError> {
        self.verify_signature()?;
        T::from_bytes(&self.envelope.payload).map_err(|source| VerifyError::Payload {
            domain: T::DOMAIN,
            signer: self.envelope.signer,
            source,
        })
    }

    /// Checks domain, version and signature without decoding the payload.
    pub fn verify_signature(&self) -> Result<(), VerifyError> {
        let e = &self.envelope;
        if e.domain != T::DOMAIN {
            return Err(VerifyError::WrongDomain {
                expected: T::DOMAIN,
                found: e.domain.chars().take(64).collect(),
            });
        }
        if e.version != PROTOCOL_VERSION {
            return Err(VerifyError::UnsupportedVersion {
                domain: T::DOMAIN,
                found: e.version,
            });
        }
        let input = signing_input(&e.domain, e.version, &e.signer, &e.payload);
        if !e.signer.verify_strict(&input, &e.signature) {
            return Err(VerifyError::BadSignature {
                domain: T::DOMAIN,
                signer: e.signer,
            });
        }
        Ok(())
    }

    /// Builds an envelope from its parts without signing (for tests of verification and for
    /// replaying stored envelopes).
    pub fn from_parts(
        domain: String,
        version: u16,
        signer: PeerId,
        payload: Vec<u8>,
        signature: [u8; 64],
    ) -> Self {
        Self {
            envelope: Envelope {
                domain,
                version,
                signer,
                payload,
                signature,
            },
            _payload: PhantomData,
        }
    }
}

fn signing_input(domain: &str, version: u16, signer: &PeerId, payload: &[u8]) -> Vec<u8> {
    encoding::encode(&SigningInput {
        context: SIGNATURE_CONTEXT,
        domain,
        version,
        signer,
        payload,
    })
}

/// A signed message with its payload, verified once ([`Signed::verify`]): many state machines in
/// one process (the simulator's thousands of workers) can share it behind an `Arc` instead of
/// each checking the signature and decoding the payload again.
#[derive(Debug)]
pub struct Verified<T> {
    signed: Signed<T>,
    payload: T,
}

impl<T: SignedPayload> Verified<T> {
    /// Verifies `signed` (domain, version, signature, payload).
    pub fn new(signed: Signed<T>) -> Result<Self, VerifyError> {
        let payload = signed.verify()?;
        Ok(Self { signed, payload })
    }
}

impl<T> Verified<T> {
    /// The signed message.
    pub fn signed(&self) -> &Signed<T> {
        &self.signed
    }

    /// Its verified payload.
    pub fn payload(&self) -> &T {
        &self.payload
    }
}

impl<T> Signed<T> {
    /// Who claims to have signed this (verified only by `verify`).
    pub fn signer(&self) -> PeerId {
        self.envelope.signer
    }

    /// The domain tag in the envelope.
    pub fn domain(&self) -> &str {
        &self.envelope.domain
    }

    /// The protocol version in the envelope.
    pub fn version(&self) -> u16 {
        self.envelope.version
    }

    /// The payload's canonical bytes.
    pub fn payload_bytes(&self) -> &[u8] {
        &self.envelope.payload
    }

    /// The signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.envelope.signature
    }

    /// The hash of the whole envelope's canonical encoding: the message's id, and what hash
    /// chains link to.
    pub fn hash(&self) -> ContentHash {
        ContentHash::of(&encoding::encode(&self.envelope))
    }
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            envelope: self.envelope.clone(),
            _payload: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.envelope == other.envelope
    }
}

impl<T> Eq for Signed<T> {}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("domain", &self.envelope.domain)
            .field("version", &self.envelope.version)
            .field("signer", &self.envelope.signer)
            .field("payload_len", &self.envelope.payload.len())
            .finish_non_exhaustive()
    }
}

impl<T> Encode for Signed<T> {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.envelope.encode(encoder)
    }
}

impl<T, Ctx> Decode<Ctx> for Signed<T> {
    fn decode<D: bincode::de::Decoder<Context = Ctx>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Ok(Self {
            envelope: Envelope::decode(decoder)?,
            _payload: PhantomData,
        })
    }
}

impl<'de, T, Ctx> bincode::BorrowDecode<'de, Ctx> for Signed<T> {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = Ctx>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Self::decode(decoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Encode, Decode)]
    struct Ping(u64);
    impl SignedPayload for Ping {
        const DOMAIN: &'static str = "cohort/test-ping/v1";
    }

    #[derive(Debug, PartialEq, Encode, Decode)]
    struct Pong(u64);
    impl SignedPayload for Pong {
        const DOMAIN: &'static str = "cohort/test-pong/v1";
    }

    #[test]
    fn sign_verify_round_trip() {
        let kp = Keypair::from_seed(&[7; 32]);
        let s = Signed::sign(&kp, &Ping(42));
        assert_eq!(s.verify(), Ok(Ping(42)));
        let back = Signed::<Ping>::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.verify(), Ok(Ping(42)));
        assert_eq!(back.signer(), kp.peer_id());
    }

    #[test]
    fn a_signature_for_one_domain_never_verifies_as_another() {
        let kp = Keypair::from_seed(&[7; 32]);
        let ping = Signed::sign(&kp, &Ping(1));
        // Same bytes reinterpreted as the other kind: the domain check refuses it.
        let as_pong = Signed::<Pong>::from_bytes(&ping.to_bytes()).unwrap();
        assert!(matches!(
            as_pong.verify(),
            Err(VerifyError::WrongDomain { .. })
        ));
        // Relabelled domain: the signature covers the domain, so it fails.
        let relabelled = Signed::<Pong>::from_parts(
            Pong::DOMAIN.into(),
            PROTOCOL_VERSION,
            ping.signer(),
            ping.payload_bytes().to_vec(),
            *ping.signature(),
        );
        assert!(matches!(
            relabelled.verify(),
            Err(VerifyError::BadSignature { .. })
        ));
    }

    #[test]
    fn other_versions_are_refused() {
        let kp = Keypair::from_seed(&[7; 32]);
        let s = Signed::sign(&kp, &Ping(1));
        let v2 = Signed::<Ping>::from_parts(
            s.domain().into(),
            2,
            s.signer(),
            s.payload_bytes().to_vec(),
            *s.signature(),
        );
        assert!(matches!(
            v2.verify(),
            Err(VerifyError::UnsupportedVersion { found: 2, .. })
        ));
    }
}
