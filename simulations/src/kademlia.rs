//! Kademlia lookups at scale: hops and requests per provider lookup against log2(N).
//!
//! The peer runs libp2p-kad; this scenario asks how its lookups grow with the network, which
//! twelve loopback processes cannot show. The model follows libp2p-kad's iterative
//! closest-peers query:
//!
//! - Ids are random 128-bit keys (ample for 10^4 peers: only the top ~14 bits separate buckets);
//!   distance is XOR. Every peer's routing table is converged: bucket i (distance in
//!   [2^i, 2^(i+1))) holds `k` peers of that range chosen uniformly, or all of them if fewer.
//! - A provider record for key T lives on the `k` peers closest to T (where a publish puts it).
//! - A lookup from a random peer starts from its own `k` closest entries to T, keeps at most
//!   `alpha` requests in flight per round, asks the closest not-yet-asked peer among the `k`
//!   closest known, and learns each answerer's `k` closest entries to T. It ends when the `k`
//!   closest known peers have all answered (libp2p's termination). The first record holder
//!   asked ends a provider lookup that stops early.
//!
//! Reported per lookup: hops (the length of the referral chain to the first record holder:
//! 1 = a direct contact of the initiator), rounds, requests until the first record holder and
//! requests until the query converges. All choices draw from the run seed ([`crate::seed`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rand::Rng as _;

use crate::seed::rng_for;

const STREAM_IDS: u64 = 0x6b61_6400;
const STREAM_TABLES: u64 = 0x6b61_6401;
const STREAM_LOOKUPS: u64 = 0x6b61_6402;

/// What to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KadConfig {
    /// Peers.
    pub nodes: usize,
    /// Bucket size and replication factor (libp2p: 20).
    pub k: usize,
    /// Requests in flight per lookup (libp2p: 3).
    pub alpha: usize,
    /// Lookups to run.
    pub lookups: usize,
    /// The run seed.
    pub seed: u64,
}

impl Default for KadConfig {
    fn default() -> Self {
        Self {
            nodes: 1_000,
            k: 20,
            alpha: 3,
            lookups: 1_000,
            seed: 0,
        }
    }
}

/// Why a configuration cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KadError {
    /// Too few peers for a lookup (the initiator must not hold the record).
    #[error("{nodes} peers: need more than k = {k}")]
    TooFewNodes {
        /// Peers asked for.
        nodes: usize,
        /// Bucket size.
        k: usize,
    },
    /// k, alpha or lookups is zero.
    #[error("k, alpha and lookups must be at least 1")]
    Zero,
}

/// Mean, median and maximum of one measure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Maximum.
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let at = |p: f64| {
            if v.is_empty() {
                f64::NAN
            } else {
                v[((v.len() - 1) as f64 * p).round() as usize]
            }
        };
        Self {
            mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
            median: at(0.5),
            p90: at(0.9),
            max: at(1.0),
        }
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mean {:.2}, median {:.0}, p90 {:.0}, max {:.0}",
            self.mean, self.median, self.p90, self.max
        )
    }
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct KadReport {
    /// The configuration.
    pub config: KadConfig,
    /// Lookups that reached a record holder.
    pub found: usize,
    /// Referral-chain length to the first record holder.
    pub hops: Spread,
    /// Rounds of up to alpha parallel requests until the first record holder.
    pub rounds: Spread,
    /// Requests until the first record holder answered.
    pub requests_first: Spread,
    /// Requests until the query converged.
    pub requests_total: Spread,
    /// Mean routing-table size.
    pub table_size: f64,
}

impl KadReport {
    /// log2 of the number of peers: Kademlia's bound on hops with one bit per hop.
    pub fn log2_n(&self) -> f64 {
        (self.config.nodes as f64).log2()
    }
}

impl fmt::Display for KadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "kademlia         {} peers, k = {}, alpha = {}, seed {}; routing table {:.1} entries on average",
            c.nodes, c.k, c.alpha, c.seed, self.table_size
        )?;
        writeln!(
            f,
            "lookups          {} run, {} found a provider; log2(N) = {:.2}",
            c.lookups,
            self.found,
            self.log2_n()
        )?;
        writeln!(f, "hops             {}", self.hops)?;
        writeln!(f, "rounds           {}", self.rounds)?;
        writeln!(f, "requests, first  {}", self.requests_first)?;
        write!(f, "requests, total  {}", self.requests_total)
    }
}

/// A converged network: ids and routing tables.
#[derive(Debug)]
struct Network {
    ids: Vec<u128>,
    tables: Vec<Vec<u32>>,
}

fn bucket_of(d: u128) -> usize {
    127 - d.leading_zeros() as usize
}

impl Network {
    fn new(config: &KadConfig) -> Self {
        let mut rng = rng_for(config.seed, STREAM_IDS, 0);
        let ids: Vec<u128> = (0..config.nodes).map(|_| rng.random()).collect();
        let tables = (0..config.nodes)
            .map(|a| {
                // Reservoir sampling of k peers per bucket.
                let mut rng = rng_for(config.seed, STREAM_TABLES, a as u64);
                let mut buckets: BTreeMap<usize, (Vec<u32>, usize)> = BTreeMap::new();
                for (b, id) in ids.iter().enumerate() {
                    if b == a {
                        continue;
                    }
                    let (kept, seen) = buckets.entry(bucket_of(ids[a] ^ id)).or_default();
                    *seen += 1;
                    if kept.len() < config.k {
                        kept.push(b as u32);
                    } else {
                        let j = rng.random_range(0..*seen);
                        if j < config.k {
                            kept[j] = b as u32;
                        }
                    }
                }
                buckets.into_values().flat_map(|(kept, _)| kept).collect()
            })
            .collect();
        Self { ids, tables }
    }

    /// The `k` entries of `node`'s table closest to `target`.
    fn closest_known(&self, node: usize, target: u128, k: usize) -> Vec<u32> {
        let mut t = self.tables[node].clone();
        t.sort_by_key(|&p| self.ids[p as usize] ^ target);
        t.truncate(k);
        t
    }

    /// The `k` peers closest to `target` in the whole network.
    fn closest_global(&self, target: u128, k: usize) -> BTreeSet<u32> {
        let mut all: Vec<u32> = (0..self.ids.len() as u32).collect();
        let k = k.min(all.len());
        if k < all.len() {
            all.select_nth_unstable_by_key(k, |&p| self.ids[p as usize] ^ target);
        }
        all.truncate(k);
        all.into_iter().collect()
    }
}

/// One lookup's measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lookup {
    /// (hops, rounds, requests) when the first record holder answered.
    first: Option<(u32, u32, u32)>,
    requests: u32,
}

fn lookup(net: &Network, config: &KadConfig, from: usize, target: u128) -> Lookup {
    let holders = net.closest_global(target, config.k);
    let dist = |p: u32| net.ids[p as usize] ^ target;
    // Known peers by distance: (peer, referral depth, asked).
    let mut known: BTreeMap<u128, (u32, u32, bool)> = BTreeMap::new();
    for p in net.closest_known(from, target, config.k) {
        known.insert(dist(p), (p, 1, false));
    }
    let (mut rounds, mut requests) = (0u32, 0u32);
    let mut first = None;
    loop {
        let batch: Vec<(u128, u32, u32)> = known
            .iter()
            .take(config.k)
            .filter(|(_, (_, _, asked))| !asked)
            .take(config.alpha)
            .map(|(d, (p, depth, _))| (*d, *p, *depth))
            .collect();
        if batch.is_empty() {
            break;
        }
        rounds += 1;
        for (d, p, depth) in batch {
            requests += 1;
            if let Some(e) = known.get_mut(&d) {
                e.2 = true;
            }
            if first.is_none() && holders.contains(&p) {
                first = Some((depth, rounds, requests));
            }
            for q in net.closest_known(p as usize, target, config.k) {
                if q as usize != from {
                    known.entry(dist(q)).or_insert((q, depth + 1, false));
                }
            }
        }
    }
    Lookup { first, requests }
}

/// Runs `config.lookups` provider lookups for random keys from random peers that do not hold
/// the record themselves.
pub fn run_kademlia(config: KadConfig) -> Result<KadReport, KadError> {
    if config.k == 0 || config.alpha == 0 || config.lookups == 0 {
        return Err(KadError::Zero);
    }
    if config.nodes <= config.k {
        return Err(KadError::TooFewNodes {
            nodes: config.nodes,
            k: config.k,
        });
    }
    let net = Network::new(&config);
    let mut rng = rng_for(config.seed, STREAM_LOOKUPS, 0);
    let (mut hops, mut rounds, mut first_req, mut total_req) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut found = 0;
    for _ in 0..config.lookups {
        let target: u128 = rng.random();
        let holders = net.closest_global(target, config.k);
        let from = loop {
            let f = rng.random_range(0..config.nodes);
            if !holders.contains(&(f as u32)) {
                break f;
            }
        };
        let l = lookup(&net, &config, from, target);
        total_req.push(f64::from(l.requests));
        if let Some((h, r, q)) = l.first {
            found += 1;
            hops.push(f64::from(h));
            rounds.push(f64::from(r));
            first_req.push(f64::from(q));
        }
    }
    let table_size = net.tables.iter().map(Vec::len).sum::<usize>() as f64 / config.nodes as f64;
    Ok(KadReport {
        config,
        found,
        hops: Spread::of(hops),
        rounds: Spread::of(rounds),
        requests_first: Spread::of(first_req),
        requests_total: Spread::of(total_req),
        table_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(nodes: usize, seed: u64) -> KadConfig {
        KadConfig {
            nodes,
            lookups: 200,
            seed,
            ..KadConfig::default()
        }
    }

    #[test]
    fn every_lookup_finds_a_provider_within_log2_n_hops() {
        let r = run_kademlia(small(400, 1)).unwrap();
        assert_eq!(r.found, r.config.lookups, "{r}");
        assert!(r.hops.max <= r.log2_n(), "{r}");
        assert!(r.hops.mean >= 1.0);
        // A converged query asks at least the k closest.
        assert!(r.requests_total.median >= r.config.k as f64, "{r}");
    }

    #[test]
    fn hops_grow_slowly_with_the_network() {
        let a = run_kademlia(small(100, 2)).unwrap();
        let b = run_kademlia(small(1600, 2)).unwrap();
        assert!(b.hops.mean >= a.hops.mean, "{a}\n{b}");
        // At most alpha requests per hop, and about log2(N) hops at worst.
        for r in [&a, &b] {
            assert!(
                r.requests_first.mean <= r.config.alpha as f64 * r.log2_n(),
                "{r}"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_report_and_another_seed_another() {
        let measures = |r: KadReport| (r.hops, r.requests_first, r.requests_total, r.table_size);
        assert_eq!(
            run_kademlia(small(300, 5)).unwrap(),
            run_kademlia(small(300, 5)).unwrap()
        );
        assert_ne!(
            measures(run_kademlia(small(300, 5)).unwrap()),
            measures(run_kademlia(small(300, 6)).unwrap())
        );
    }

    #[test]
    fn a_tiny_network_knows_everyone_in_one_hop() {
        let r = run_kademlia(KadConfig {
            nodes: 21,
            k: 20,
            lookups: 20,
            ..KadConfig::default()
        })
        .unwrap();
        assert_eq!(r.hops.max, 1.0, "{r}");
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert_eq!(
            run_kademlia(small(20, 0)),
            Err(KadError::TooFewNodes { nodes: 20, k: 20 })
        );
        assert_eq!(
            run_kademlia(KadConfig {
                alpha: 0,
                ..KadConfig::default()
            }),
            Err(KadError::Zero)
        );
    }
}
