//! What Cohort stores in Kademlia, without I/O: the record keys, the signed address record that
//! maps a peer id to its iroh socket addresses, and the per-peer insert budget.
//!
//! Provider records are keyed by the 32 bytes of the content hash (a shard's hash is its blob
//! hash). Address records are keyed by [`ADDR_KEY_PREFIX`] followed by the peer's 32-byte key;
//! the value is signed by that key, so a peer can only ever publish its own addresses.
//!
//! Address record, version 1 (all integers little-endian):
//!
//! ```text
//! version u8 = 1 | peer [32] | issued_ms u64 | count u8 (<= 8)
//!   | count x (family u8: 4 or 6 | ip [4 or 16] | port u16)
//!   | signature [64] over ADDR_DOMAIN ++ everything before it
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use cohort_protocol::{ContentHash, Keypair, PeerId};

/// Prefix of address record keys.
pub const ADDR_KEY_PREFIX: &[u8] = b"cohort/addr/v1/";
/// Domain tag of address record signatures.
pub const ADDR_DOMAIN: &[u8] = b"cohort/dht-addr/v1\0";
/// Most socket addresses in one address record.
pub const MAX_ADDRS: usize = 8;
/// Largest encoded address record.
pub const MAX_RECORD_BYTES: usize = 1 + 32 + 8 + 1 + MAX_ADDRS * (1 + 16 + 2) + 64;
/// How far in the future an address record's issue time may lie (clock skew).
pub const MAX_SKEW: Duration = Duration::from_secs(300);
const VERSION: u8 = 1;

/// The Kademlia key of a content hash's provider records.
pub fn provider_key(hash: &ContentHash) -> Vec<u8> {
    hash.as_bytes().to_vec()
}

/// The content hash of a provider record key, if it is one.
pub fn hash_of_provider_key(key: &[u8]) -> Option<ContentHash> {
    let bytes: [u8; 32] = key.try_into().ok()?;
    Some(ContentHash::from_bytes(bytes))
}

/// The Kademlia key of a peer's address record.
pub fn addr_key(peer: &PeerId) -> Vec<u8> {
    let mut k = ADDR_KEY_PREFIX.to_vec();
    k.extend_from_slice(peer.as_bytes());
    k
}

/// Why an address record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrRecordError {
    /// The key is not an address record key.
    #[error("the key is not `cohort/addr/v1/` followed by a 32-byte peer id")]
    BadKey,
    /// The value is longer than any valid record.
    #[error("{0} bytes is larger than an address record can be ({MAX_RECORD_BYTES})")]
    Oversized(usize),
    /// The value does not decode.
    #[error("malformed address record: {0}")]
    Malformed(&'static str),
    /// The record names another peer than its key.
    #[error("the record's peer is not the peer its key names")]
    WrongPeer,
    /// The signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// Issued too long ago, or in the future.
    #[error("issued at {issued_ms} ms, outside [{oldest_ms}, {newest_ms}]")]
    Stale {
        /// When it says it was issued.
        issued_ms: u64,
        /// The oldest accepted.
        oldest_ms: u64,
        /// The newest accepted.
        newest_ms: u64,
    },
}

/// A verified address record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrRecord {
    /// The peer.
    pub peer: PeerId,
    /// When it was signed (ms since the Unix epoch).
    pub issued_ms: u64,
    /// Its iroh socket addresses.
    pub addrs: Vec<SocketAddr>,
}

/// Signs an address record for `keypair` (at most [`MAX_ADDRS`] addresses are kept).
pub fn sign_addr_record(keypair: &Keypair, issued_ms: u64, addrs: &[SocketAddr]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_RECORD_BYTES);
    out.push(VERSION);
    out.extend_from_slice(keypair.peer_id().as_bytes());
    out.extend_from_slice(&issued_ms.to_le_bytes());
    let addrs = &addrs[..addrs.len().min(MAX_ADDRS)];
    out.push(addrs.len() as u8);
    for a in addrs {
        match a.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&a.port().to_le_bytes());
    }
    let mut message = ADDR_DOMAIN.to_vec();
    message.extend_from_slice(&out);
    out.extend_from_slice(&keypair.sign(&message));
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AddrRecordError> {
        if self.0.len() < n {
            return Err(AddrRecordError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], AddrRecordError> {
        self.take(N)?
            .try_into()
            .map_err(|_| AddrRecordError::Malformed("truncated"))
    }
}

/// Checks an address record found under `key`: encoding (no trailing bytes), that it names the
/// key's peer, its signature, and that it was issued within `max_age` before `now_ms`.
pub fn verify_addr_record(
    key: &[u8],
    value: &[u8],
    now_ms: u64,
    max_age: Duration,
) -> Result<AddrRecord, AddrRecordError> {
    let key_peer: [u8; 32] = key
        .strip_prefix(ADDR_KEY_PREFIX)
        .and_then(|k| k.try_into().ok())
        .ok_or(AddrRecordError::BadKey)?;
    if value.len() > MAX_RECORD_BYTES {
        return Err(AddrRecordError::Oversized(value.len()));
    }
    if value.len() < 64 {
        return Err(AddrRecordError::Malformed("truncated"));
    }
    let (body, signature) = value.split_at(value.len() - 64);
    let mut r = Reader(body);
    if r.array::<1>()?[0] != VERSION {
        return Err(AddrRecordError::Malformed("unknown version"));
    }
    let peer_bytes = r.array::<32>()?;
    if peer_bytes != key_peer {
        return Err(AddrRecordError::WrongPeer);
    }
    let peer = PeerId::from_bytes(&peer_bytes)
        .map_err(|_| AddrRecordError::Malformed("peer id is not an ed25519 key"))?;
    let issued_ms = u64::from_le_bytes(r.array::<8>()?);
    let count = usize::from(r.array::<1>()?[0]);
    if count > MAX_ADDRS {
        return Err(AddrRecordError::Malformed("too many addresses"));
    }
    let mut addrs = Vec::with_capacity(count);
    for _ in 0..count {
        let ip = match r.array::<1>()?[0] {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            _ => return Err(AddrRecordError::Malformed("unknown address family")),
        };
        let port = u16::from_le_bytes(r.array::<2>()?);
        addrs.push(SocketAddr::new(ip, port));
    }
    if !r.0.is_empty() {
        return Err(AddrRecordError::Malformed("trailing bytes"));
    }
    let signature: [u8; 64] = signature
        .try_into()
        .map_err(|_| AddrRecordError::Malformed("truncated"))?;
    let mut message = ADDR_DOMAIN.to_vec();
    message.extend_from_slice(body);
    if !peer.verify_strict(&message, &signature) {
        return Err(AddrRecordError::BadSignature);
    }
    let oldest_ms = now_ms.saturating_sub(max_age.as_millis() as u64);
    let newest_ms = now_ms.saturating_add(MAX_SKEW.as_millis() as u64);
    if issued_ms < oldest_ms || issued_ms > newest_ms {
        return Err(AddrRecordError::Stale {
            issued_ms,
            oldest_ms,
            newest_ms,
        });
    }
    Ok(AddrRecord {
        peer,
        issued_ms,
        addrs,
    })
}

/// A budget of record inserts per peer: at most `limit` in each `window`. Remembers at most
/// `max_peers` peers (the longest idle is forgotten first), so its memory is bounded too.
#[derive(Debug)]
pub struct InsertBudget<P> {
    limit: u32,
    window: Duration,
    max_peers: usize,
    peers: BTreeMap<P, (Instant, u32)>,
}

impl<P: Ord + Copy> InsertBudget<P> {
    /// `limit` inserts per `window` and peer, for at most `max_peers` peers at once.
    pub fn new(limit: u32, window: Duration, max_peers: usize) -> Self {
        Self {
            limit,
            window,
            max_peers: max_peers.max(1),
            peers: BTreeMap::new(),
        }
    }

    /// Whether `peer` may insert one more record at `now` (counts it).
    pub fn allow(&mut self, peer: P, now: Instant) -> bool {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, (start, _))| *start)
                .map(|(p, _)| *p);
            if let Some(p) = oldest {
                self.peers.remove(&p);
            }
        }
        let entry = self.peers.entry(peer).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 <= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000_000;
    const AGE: Duration = Duration::from_secs(3600);

    fn addrs() -> Vec<SocketAddr> {
        vec![
            "127.0.0.1:4433".parse().unwrap(),
            "[::1]:9".parse().unwrap(),
        ]
    }

    #[test]
    fn a_signed_record_verifies_under_its_key() {
        let kp = Keypair::from_seed(&[7; 32]);
        let value = sign_addr_record(&kp, NOW, &addrs());
        let got = verify_addr_record(&addr_key(&kp.peer_id()), &value, NOW, AGE).unwrap();
        assert_eq!(got.peer, kp.peer_id());
        assert_eq!(got.addrs, addrs());
        assert_eq!(got.issued_ms, NOW);
        assert!(value.len() <= MAX_RECORD_BYTES);
    }

    #[test]
    fn golden_bytes() {
        let kp = Keypair::from_seed(&[1; 32]);
        let value = sign_addr_record(&kp, 5, &["127.0.0.1:258".parse().unwrap()]);
        let body = hex::encode(&value[..value.len() - 64]);
        assert_eq!(
            body,
            format!(
                "01{}050000000000000001047f0000010201",
                hex::encode(kp.peer_id().as_bytes())
            )
        );
    }

    #[test]
    fn another_peers_key_stale_or_tampered_records_are_refused() {
        let kp = Keypair::from_seed(&[7; 32]);
        let other = Keypair::from_seed(&[8; 32]).peer_id();
        let value = sign_addr_record(&kp, NOW, &addrs());
        // Published under another peer's key.
        assert_eq!(
            verify_addr_record(&addr_key(&other), &value, NOW, AGE),
            Err(AddrRecordError::WrongPeer)
        );
        // Not an address key at all.
        assert_eq!(
            verify_addr_record(b"cohort/addr/v1/short", &value, NOW, AGE),
            Err(AddrRecordError::BadKey)
        );
        let key = addr_key(&kp.peer_id());
        // Too old, or from the future.
        assert!(matches!(
            verify_addr_record(&key, &value, NOW + AGE.as_millis() as u64 + 1, AGE),
            Err(AddrRecordError::Stale { .. })
        ));
        assert!(matches!(
            verify_addr_record(&key, &value, NOW - MAX_SKEW.as_millis() as u64 - 1, AGE),
            Err(AddrRecordError::Stale { .. })
        ));
        // A changed port breaks the signature.
        let mut tampered = value.clone();
        let port_at = value.len() - 64 - 2;
        tampered[port_at] ^= 1;
        assert_eq!(
            verify_addr_record(&key, &tampered, NOW, AGE),
            Err(AddrRecordError::BadSignature)
        );
        // Trailing bytes, oversize.
        let mut long = value.clone();
        long.insert(value.len() - 64, 0);
        assert!(verify_addr_record(&key, &long, NOW, AGE).is_err());
        assert!(matches!(
            verify_addr_record(&key, &vec![0; MAX_RECORD_BYTES + 1], NOW, AGE),
            Err(AddrRecordError::Oversized(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_verify(
            bytes in proptest::collection::vec(any::<u8>(), 0..400)
        ) {
            let kp = Keypair::from_seed(&[9; 32]);
            prop_assert!(verify_addr_record(&addr_key(&kp.peer_id()), &bytes, NOW, AGE).is_err());
        }

        #[test]
        fn corrupting_one_byte_is_always_refused(at in 0usize..200, bit in 0u8..8) {
            let kp = Keypair::from_seed(&[9; 32]);
            let value = sign_addr_record(&kp, NOW, &addrs());
            let mut bad = value.clone();
            let at = at % bad.len();
            bad[at] ^= 1 << bit;
            prop_assert!(verify_addr_record(&addr_key(&kp.peer_id()), &bad, NOW, AGE).is_err());
        }
    }

    #[test]
    fn the_insert_budget_refills_per_window_and_forgets_idle_peers() {
        let t0 = Instant::now();
        let mut b = InsertBudget::new(2, Duration::from_secs(1), 2);
        assert!(b.allow(1, t0));
        assert!(b.allow(1, t0));
        assert!(!b.allow(1, t0));
        assert!(b.allow(2, t0));
        assert!(b.allow(1, t0 + Duration::from_secs(1)));
        // A third peer evicts the one idle longest; memory stays at two peers.
        assert!(b.allow(3, t0 + Duration::from_secs(2)));
        assert_eq!(b.peers.len(), 2);
    }
}
