//! Content routing: "which peers provide hash H".
//!
//! [`ContentRouting`] is the interface; [`GossipIndex`] is the implementation used now, fed by
//! signed gossip announcements (a manifest's owner provides its shards; a `Provides`
//! announcement lists what its signer serves). A later issue puts libp2p Kademlia provider
//! records behind the same trait.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Mutex;

use cohort_protocol::{ContentHash, PeerId};

/// Most providers remembered per hash.
const MAX_PROVIDERS: usize = 64;
/// Most hashes indexed.
const MAX_HASHES: usize = 1 << 20;

/// Finds providers of content.
pub trait ContentRouting: Send + Sync {
    /// Peers believed to provide `hash` (unordered, possibly stale: callers verify what they
    /// download).
    fn providers(&self, hash: ContentHash) -> impl Future<Output = Vec<PeerId>> + Send;

    /// Records that `peer` provides `hashes` (from a checked announcement or our own store).
    fn add_providers(
        &self,
        peer: PeerId,
        hashes: &[ContentHash],
    ) -> impl Future<Output = ()> + Send;
}

/// The gossip-fed local index.
#[derive(Debug, Default)]
pub struct GossipIndex {
    map: Mutex<BTreeMap<ContentHash, BTreeSet<PeerId>>>,
}

impl GossipIndex {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<ContentHash, BTreeSet<PeerId>>) -> R) -> R {
        let mut guard = match self.map.lock() {
            Ok(g) => g,
            // A panic while holding the lock leaves plain data behind; keep using it.
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Hashes indexed.
    pub fn len(&self) -> usize {
        self.with(|m| m.len())
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ContentRouting for GossipIndex {
    async fn providers(&self, hash: ContentHash) -> Vec<PeerId> {
        self.with(|m| {
            m.get(&hash)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default()
        })
    }

    async fn add_providers(&self, peer: PeerId, hashes: &[ContentHash]) {
        self.with(|m| {
            for h in hashes {
                if m.len() >= MAX_HASHES && !m.contains_key(h) {
                    continue;
                }
                let set = m.entry(*h).or_default();
                if set.len() < MAX_PROVIDERS {
                    set.insert(peer);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_protocol::Keypair;

    #[tokio::test]
    async fn remembers_providers_per_hash() {
        let idx = GossipIndex::default();
        let a = Keypair::from_seed(&[1; 32]).peer_id();
        let b = Keypair::from_seed(&[2; 32]).peer_id();
        let h = ContentHash::of(b"x");
        assert!(idx.providers(h).await.is_empty());
        idx.add_providers(a, &[h]).await;
        idx.add_providers(b, &[h, ContentHash::of(b"y")]).await;
        idx.add_providers(a, &[h]).await;
        let mut got = idx.providers(h).await;
        got.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(idx.len(), 2);
    }
}
