//! One identity, three stacks: the peer's ed25519 key is its Cohort [`PeerId`], its iroh
//! `EndpointId`, and the key its libp2p `PeerId` derives from. These conversions are the only
//! place the three meet.

use cohort_protocol::{Keypair, PeerId};

/// The iroh secret key of a Cohort keypair (the same 32-byte seed).
pub fn iroh_secret_key(keypair: &Keypair) -> iroh::SecretKey {
    iroh::SecretKey::from_bytes(&keypair.secret_seed())
}

/// The iroh endpoint id of a peer (the same 32 bytes).
pub fn endpoint_id(peer: &PeerId) -> iroh::EndpointId {
    // Every PeerId holds a valid ed25519 point, which is all iroh checks.
    #[allow(clippy::expect_used)]
    iroh::EndpointId::from_bytes(peer.as_bytes()).expect("a PeerId is a valid ed25519 public key")
}

/// The Cohort peer id of an iroh endpoint (the same 32 bytes).
pub fn peer_id_of_endpoint(id: &iroh::EndpointId) -> PeerId {
    #[allow(clippy::expect_used)]
    PeerId::from_bytes(id.as_bytes()).expect("an iroh EndpointId is a valid ed25519 public key")
}

/// The libp2p keypair of a Cohort keypair (the same ed25519 key).
pub fn libp2p_keypair(keypair: &Keypair) -> libp2p::identity::Keypair {
    let mut seed = keypair.secret_seed();
    // `ed25519_from_bytes` zeroizes its input; 32 bytes are always a valid ed25519 seed.
    #[allow(clippy::expect_used)]
    libp2p::identity::Keypair::ed25519_from_bytes(seed.as_mut())
        .expect("32 bytes are a valid ed25519 secret key")
}

/// The libp2p peer id of a Cohort peer.
pub fn libp2p_peer_id(peer: &PeerId) -> libp2p::PeerId {
    #[allow(clippy::expect_used)]
    let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(peer.as_bytes())
        .expect("a PeerId is a valid ed25519 public key");
    libp2p::identity::PublicKey::from(key).to_peer_id()
}

/// The Cohort peer id behind a libp2p peer id, if it wraps an ed25519 key (libp2p inlines
/// ed25519 keys in the id with the identity multihash).
pub fn peer_id_of_libp2p(id: &libp2p::PeerId) -> Option<PeerId> {
    let public = libp2p::identity::PublicKey::try_decode_protobuf(id.as_ref().digest()).ok()?;
    let ed = public.try_into_ed25519().ok()?;
    PeerId::from_bytes(&ed.to_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iroh_sees_the_same_identity() {
        let kp = Keypair::from_seed(&[5; 32]);
        let secret = iroh_secret_key(&kp);
        assert_eq!(secret.public().as_bytes(), kp.peer_id().as_bytes());
        assert_eq!(endpoint_id(&kp.peer_id()), secret.public());
        assert_eq!(peer_id_of_endpoint(&secret.public()), kp.peer_id());
        // iroh and Cohort print the id the same way.
        assert_eq!(secret.public().to_string(), kp.peer_id().to_string());
        // And sign the same: a signature by iroh's key verifies as Cohort's.
        let sig = secret.sign(b"one identity");
        assert!(kp.peer_id().verify_strict(b"one identity", &sig.to_bytes()));
    }

    #[test]
    fn libp2p_sees_the_same_identity() {
        let kp = Keypair::from_seed(&[6; 32]);
        let lp = libp2p_keypair(&kp);
        let lp_public = lp.public().try_into_ed25519().unwrap();
        assert_eq!(&lp_public.to_bytes(), kp.peer_id().as_bytes());
        let id = lp.public().to_peer_id();
        assert_eq!(libp2p_peer_id(&kp.peer_id()), id);
        assert_eq!(peer_id_of_libp2p(&id), Some(kp.peer_id()));
        // libp2p signatures are plain ed25519 over the message.
        let sig: [u8; 64] = lp.sign(b"one identity").unwrap().try_into().unwrap();
        assert!(kp.peer_id().verify_strict(b"one identity", &sig));
        // And the seed stays intact after libp2p zeroized its copy.
        assert_eq!(libp2p_keypair(&kp).public(), lp.public());
    }
}
