//! Scenario: flooding one signed announcement through a random overlay.
//!
//! The first scenario that moves real protocol bytes. `nodes` peers, each with its own
//! [`Keypair`] (from a seed derived from the run seed and its index), sit on a random
//! [`Overlay`] of about `degree` neighbours each. One honest origin signs an
//! [`Announcement`] and sends [`encode_announcement`]'s bytes to its neighbours. Every peer that
//! receives bytes
//!
//! 1. hashes them and drops a copy of a message it has already accepted (a duplicate). The
//!    encoding is canonical, so the bytes' hash is the envelope's [`Signed::hash`]; and the hash
//!    covers the signature too, so dropping on it before verifying is safe. iroh-gossip
//!    deduplicates the same way before the application sees a message, and it matters for
//!    speed: most deliveries are duplicates, and decoding alone checks the signer's curve
//!    point (a square root in the field);
//! 2. decodes them with [`decode_announcement`] (the gossip size limit applies);
//! 3. verifies the signature and validates the announcement; and
//! 4. on first acceptance records when and from whom, and forwards the same bytes to every
//!    other neighbour.
//!
//! Only verified envelopes enter the "seen" set, so corrupted copies cannot shadow the real
//! one. A fraction of peers are adversarial: they behave the same, except that each copy they
//! forward has one byte flipped (a random position per copy). Honest receivers must reject every
//! such copy (counted as a decode or a verify rejection) and still get the real message over
//! honest paths, when the honest peers alone are connected.
//!
//! Hop counts are not carried in the message (real gossip carries none): a peer's hop count is
//! its depth in the tree of first deliveries (the origin is 0, its neighbours 1, ...), computed
//! after the run from whom each peer first accepted the message from. Since only honest peers
//! forward valid bytes, that tree contains only honest peers.
//!
//! Randomness: overlay, network latencies, roles (origin and adversaries), each node's
//! generator and each node's key come from separate streams of the one run seed
//! ([`crate::seed`]).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use cohort_protocol::types::announce::{
    AnnouncementTooLarge, decode_announcement, encode_announcement,
};
use cohort_protocol::types::{Announcement, AnnouncementBody, DatanetId, Timestamp};
use cohort_protocol::{ContentHash, Keypair, Signed};
use rand::Rng as _;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom as _;

use crate::network::{Network, NetworkConfig, NetworkConfigError};
use crate::overlay::{Overlay, OverlayError};
use crate::seed::{derive_seed, rng_for};
use crate::sim::{Input, Node, NodeId, Outbox, RunOutcome, Simulation};
use crate::time::{SimDuration, SimTime};

/// Seed streams (see [`crate::seed`]).
const OVERLAY_STREAM: u64 = 1;
const NETWORK_STREAM: u64 = 2;
const ROLES_STREAM: u64 = 3;
const NODE_STREAM: u64 = 4;

/// The wall-clock time virtual time zero stands for in signed timestamps: 2026-01-01T00:00Z.
pub const SIM_EPOCH: Timestamp = Timestamp(1_767_225_600_000);

/// A flood run's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct FloodConfig {
    /// How many peers.
    pub nodes: usize,
    /// The overlay's target degree (each peer gets at least this many neighbours).
    pub degree: usize,
    /// The run's seed.
    pub seed: u64,
    /// The fraction of peers that corrupt what they forward, in `0.0..1.0`; the number of
    /// adversaries is `floor(fraction * nodes)`, never the origin.
    pub adversary_fraction: f64,
    /// Latencies and bandwidth.
    pub network: NetworkConfig,
    /// What the origin announces.
    pub body: AnnouncementBody,
    /// Virtual time after which the run stops even if messages are still in flight.
    pub time_limit: SimTime,
}

impl Default for FloodConfig {
    fn default() -> Self {
        Self {
            nodes: 100,
            degree: 6,
            seed: 0,
            adversary_fraction: 0.0,
            network: NetworkConfig::default(),
            body: default_body(),
            time_limit: SimTime::from_secs(3_600),
        }
    }
}

/// The default announcement: version 1 of a datanet's manifest.
pub fn default_body() -> AnnouncementBody {
    AnnouncementBody::Manifest {
        datanet: DatanetId(ContentHash::of(b"cohort-sim/datanet")),
        version: 1,
        manifest: ContentHash::of(b"cohort-sim/manifest/1"),
    }
}

/// A flood run that cannot be set up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FloodError {
    /// The overlay parameters are impossible.
    #[error("overlay: {0}")]
    Overlay(#[from] OverlayError),
    /// The network parameters are impossible.
    #[error("network: {0}")]
    Network(#[from] NetworkConfigError),
    /// The adversary fraction is not in `0.0..1.0`.
    #[error("adversary fraction must be at least 0 and below 1, got {fraction}")]
    AdversaryFraction {
        /// The configured fraction.
        fraction: f64,
    },
    /// The announcement does not fit in a gossip message.
    #[error("announcement: {0}")]
    TooLarge(#[from] AnnouncementTooLarge),
}

/// The flood scenario's timer: the origin publishes when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloodTimer {
    /// Send the announcement to every neighbour.
    Publish,
}

/// When and from whom a peer first accepted the announcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// When.
    pub at: SimTime,
    /// From whom; `None` at the origin.
    pub from: Option<NodeId>,
}

/// One peer of the flood scenario.
#[derive(Debug)]
pub struct FloodNode {
    keypair: Keypair,
    neighbours: Vec<NodeId>,
    adversary: bool,
    rng: SmallRng,
    to_publish: Option<(ContentHash, Arc<[u8]>)>,
    seen: BTreeSet<ContentHash>,
    first: Option<Receipt>,
    duplicates: u64,
    rejected_decode: u64,
    rejected_verify: u64,
}

impl FloodNode {
    /// The peer's keypair.
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// Whether the peer corrupts what it forwards.
    pub fn is_adversary(&self) -> bool {
        self.adversary
    }

    /// When and from whom it first accepted the announcement.
    pub fn first_receipt(&self) -> Option<Receipt> {
        self.first
    }

    /// Valid copies received after the first.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Copies that did not decode.
    pub fn rejected_decode(&self) -> u64 {
        self.rejected_decode
    }

    /// Copies that decoded but failed signature verification or validation.
    pub fn rejected_verify(&self) -> u64 {
        self.rejected_verify
    }

    fn accept(
        &mut self,
        now: SimTime,
        from: Option<NodeId>,
        hash: ContentHash,
        bytes: &Arc<[u8]>,
        out: &mut Outbox<FloodTimer>,
    ) {
        self.seen.insert(hash);
        self.first = Some(Receipt { at: now, from });
        let Self {
            neighbours,
            adversary,
            rng,
            ..
        } = self;
        for &n in neighbours.iter().filter(|&&n| Some(n) != from) {
            let copy = if *adversary {
                corrupt(bytes, rng)
            } else {
                Arc::clone(bytes)
            };
            out.send(n, copy);
        }
    }
}

/// `bytes` with one byte, at a random position, inverted.
fn corrupt(bytes: &[u8], rng: &mut SmallRng) -> Arc<[u8]> {
    let mut copy = bytes.to_vec();
    if !copy.is_empty() {
        let i = rng.random_range(0..copy.len());
        copy[i] ^= 0xff;
    }
    copy.into()
}

impl Node for FloodNode {
    type Timer = FloodTimer;

    fn handle(&mut self, now: SimTime, input: Input<FloodTimer>, out: &mut Outbox<FloodTimer>) {
        match input {
            Input::Timer(FloodTimer::Publish) => {
                if let Some((hash, bytes)) = self.to_publish.take() {
                    self.accept(now, None, hash, &bytes, out);
                }
            }
            Input::Message { from, bytes } => {
                // The canonical encoding makes the hash of the bytes the envelope's hash, so
                // a copy of an accepted message is dropped before any decoding: decoding
                // checks the signer's curve point, which costs as much as half a verification.
                let hash = ContentHash::of(&bytes);
                if self.seen.contains(&hash) {
                    self.duplicates += 1;
                    return;
                }
                let Ok(signed) = decode_announcement(&bytes) else {
                    self.rejected_decode += 1;
                    return;
                };
                debug_assert_eq!(signed.hash(), hash, "decoding is canonical");
                match signed.verify() {
                    Ok(announcement) if announcement.validate().is_ok() => {
                        self.accept(now, Some(from), hash, &bytes, out);
                    }
                    _ => self.rejected_verify += 1,
                }
            }
        }
    }
}

/// What a flood run measured. Times are virtual, from the publish at time zero.
#[derive(Clone, Debug, PartialEq)]
pub struct FloodReport {
    /// Peers in the run.
    pub nodes: usize,
    /// Honest peers (including the origin).
    pub honest: usize,
    /// Adversarial peers.
    pub adversaries: usize,
    /// The publishing peer.
    pub origin: NodeId,
    /// The configured overlay degree.
    pub degree: usize,
    /// The overlay's actual mean degree.
    pub mean_degree: f64,
    /// Whether the honest peers alone form a connected graph (if not, full coverage is not
    /// expected).
    pub honest_connected: bool,
    /// The encoded signed announcement's size.
    pub message_bytes: usize,
    /// Honest peers that accepted the announcement (including the origin).
    pub covered_honest: usize,
    /// Time until every honest peer had it; `None` if some never did.
    pub coverage_time: Option<SimDuration>,
    /// Median delivery time over honest peers other than the origin that got it.
    pub median_delivery: Option<SimDuration>,
    /// Latest delivery time over honest peers other than the origin that got it.
    pub max_delivery: Option<SimDuration>,
    /// Messages sent, valid and corrupted.
    pub messages_sent: u64,
    /// Corrupted messages sent by adversaries.
    pub corrupted_sent: u64,
    /// Bytes sent by all peers.
    pub bytes_sent: u64,
    /// Bytes sent per peer, mean.
    pub bytes_per_node_mean: f64,
    /// Bytes sent by the busiest peer.
    pub bytes_per_node_max: u64,
    /// Valid copies received after the first, summed over all peers.
    pub duplicates: u64,
    /// Copies that did not decode, summed over all peers.
    pub rejected_decode: u64,
    /// Copies that decoded but did not verify or validate, summed over all peers.
    pub rejected_verify: u64,
    /// `hops_histogram[h]`: honest peers other than the origin first reached in `h` hops.
    pub hops_histogram: Vec<u64>,
    /// The largest hop count.
    pub hops_max: u32,
    /// The mean hop count over honest peers other than the origin.
    pub hops_mean: f64,
    /// The mean shortest-path distance from the origin over the honest peers, other than the
    /// origin, that honest paths reach: the hop counts a flood would give if every link were
    /// equally fast. Delivery hops are higher because the first copy to arrive takes the
    /// fastest path, not the shortest.
    pub shortest_hops_mean: f64,
    /// `ln(nodes) / ln(degree - 1)`, the expected depth of a tree of that branching factor;
    /// `None` at degree 2.
    pub hops_estimate: Option<f64>,
    /// Events the simulator handled.
    pub events: u64,
    /// Virtual time of the last event.
    pub end_time: SimTime,
    /// Whether the run ended because nothing was left to do (not at the time limit).
    pub drained: bool,
}

impl FloodReport {
    /// Whether every honest peer got the announcement.
    pub fn complete(&self) -> bool {
        self.covered_honest == self.honest
    }

    /// Every rejected copy.
    pub fn rejected(&self) -> u64 {
        self.rejected_decode + self.rejected_verify
    }
}

fn opt_duration(d: Option<SimDuration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| d.to_string())
}

impl fmt::Display for FloodReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "peers            {} ({} honest, {} adversarial), origin {}",
            self.nodes, self.honest, self.adversaries, self.origin
        )?;
        writeln!(
            f,
            "overlay          degree {} (mean {:.2}), honest peers connected: {}",
            self.degree, self.mean_degree, self.honest_connected
        )?;
        writeln!(f, "message          {} bytes", self.message_bytes)?;
        writeln!(
            f,
            "coverage         {}/{} honest peers, all by {}",
            self.covered_honest,
            self.honest,
            opt_duration(self.coverage_time)
        )?;
        writeln!(
            f,
            "delivery         median {}, max {}",
            opt_duration(self.median_delivery),
            opt_duration(self.max_delivery)
        )?;
        writeln!(
            f,
            "traffic          {} messages ({} corrupted), {} bytes; per peer mean {:.0} bytes, max {} bytes",
            self.messages_sent,
            self.corrupted_sent,
            self.bytes_sent,
            self.bytes_per_node_mean,
            self.bytes_per_node_max
        )?;
        writeln!(
            f,
            "received         {} duplicates, {} rejected ({} undecodable, {} bad signature or invalid)",
            self.duplicates,
            self.rejected(),
            self.rejected_decode,
            self.rejected_verify
        )?;
        let estimate = self
            .hops_estimate
            .map_or_else(|| "-".to_owned(), |e| format!("{e:.2}"));
        writeln!(
            f,
            "hops             max {}, mean {:.2}; shortest paths mean {:.2}; ln(N)/ln(degree-1) = {estimate}",
            self.hops_max, self.hops_mean, self.shortest_hops_mean
        )?;
        let histogram: Vec<String> = self
            .hops_histogram
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(h, n)| format!("{h}:{n}"))
            .collect();
        writeln!(f, "hop histogram    {}", histogram.join(" "))?;
        write!(
            f,
            "simulator        {} events, ended at {} ({})",
            self.events,
            self.end_time,
            if self.drained {
                "drained"
            } else {
                "time limit"
            }
        )
    }
}

/// A flood run, set up and ready to run.
#[derive(Debug)]
pub struct Flood {
    config: FloodConfig,
    sim: Simulation<FloodNode>,
    overlay: Overlay,
    origin: NodeId,
    message_bytes: usize,
}

/// The 32-byte key seed of node `index` in the run seeded with `seed`.
pub fn node_key_seed(seed: u64, index: u32) -> [u8; 32] {
    let mut input = b"cohort-sim/node-key/v1".to_vec();
    input.extend_from_slice(&seed.to_le_bytes());
    input.extend_from_slice(&index.to_le_bytes());
    *ContentHash::of(&input).as_bytes()
}

impl Flood {
    /// Builds the overlay, the peers and their keys, and signs and encodes the announcement.
    pub fn new(config: FloodConfig) -> Result<Self, FloodError> {
        let fraction = config.adversary_fraction;
        if !(0.0..1.0).contains(&fraction) {
            return Err(FloodError::AdversaryFraction { fraction });
        }
        let seed = config.seed;
        let n = config.nodes;
        let overlay = Overlay::random(n, config.degree, &mut rng_for(seed, OVERLAY_STREAM, 0))?;
        let network = Network::new(config.network.clone(), derive_seed(seed, NETWORK_STREAM, 0))?;

        // Roles: a random origin, then adversaries among the others.
        let mut roles = rng_for(seed, ROLES_STREAM, 0);
        let origin = roles.random_range(0..n);
        let mut others: Vec<usize> = (0..n).filter(|&i| i != origin).collect();
        others.shuffle(&mut roles);
        // floor(fraction * n) <= n - 1 because fraction < 1.
        let count = ((fraction * n as f64).floor() as usize).min(n - 1);
        let mut adversary = vec![false; n];
        for &i in &others[..count] {
            adversary[i] = true;
        }

        let mut sim = Simulation::new(network);
        // `Overlay::random` refused more than u32::MAX nodes, so indices fit.
        for (i, &adversary) in (0u32..).zip(&adversary) {
            let id = NodeId(i);
            sim.add_node(
                id,
                FloodNode {
                    keypair: Keypair::from_seed(&node_key_seed(seed, i)),
                    neighbours: overlay.neighbours(id).to_vec(),
                    adversary,
                    rng: rng_for(seed, NODE_STREAM, u64::from(i)),
                    to_publish: None,
                    seen: BTreeSet::new(),
                    first: None,
                    duplicates: 0,
                    rejected_decode: 0,
                    rejected_verify: 0,
                },
            );
        }

        let origin = NodeId(origin as u32);
        let announcement = Announcement {
            seq: 0,
            at: SIM_EPOCH,
            body: config.body.clone(),
        };
        let mut message_bytes = 0;
        if let Some(node) = sim.node_mut(origin) {
            let signed = Signed::sign(&node.keypair, &announcement);
            let bytes = encode_announcement(&signed)?;
            message_bytes = bytes.len();
            node.to_publish = Some((signed.hash(), bytes.into()));
        }
        sim.schedule(SimTime::ZERO, origin, FloodTimer::Publish);
        Ok(Self {
            config,
            sim,
            overlay,
            origin,
            message_bytes,
        })
    }

    /// The simulation (for inspection before or after [`Self::run`]).
    pub fn simulation(&self) -> &Simulation<FloodNode> {
        &self.sim
    }

    /// The overlay.
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// Runs to completion or the time limit and reports.
    pub fn run(&mut self) -> FloodReport {
        let outcome = self.sim.run_until(self.config.time_limit);
        self.report(outcome == RunOutcome::Drained)
    }

    fn report(&self, drained: bool) -> FloodReport {
        let sim = &self.sim;
        let n = self.config.nodes;
        let nodes: Vec<&FloodNode> = sim.nodes().map(|(_, node)| node).collect();
        let is_honest = |id: NodeId| nodes.get(id.0 as usize).is_some_and(|node| !node.adversary);
        let honest = nodes.iter().filter(|node| !node.adversary).count();

        // Depth in the tree of first deliveries. A parent accepted the message before it
        // forwarded it, so following parents always ends at the origin.
        let mut hops: Vec<Option<u32>> = vec![None; n];
        for start in 0..n {
            let mut chain = Vec::new();
            let mut at = start;
            let base = loop {
                if let Some(h) = hops[at] {
                    break Some(h);
                }
                match nodes[at].first {
                    None => break None,
                    Some(Receipt { from: None, .. }) => {
                        hops[at] = Some(0);
                        break Some(0);
                    }
                    Some(Receipt {
                        from: Some(parent), ..
                    }) => {
                        chain.push(at);
                        at = parent.0 as usize;
                    }
                }
            };
            if let Some(base) = base {
                for (k, &node) in chain.iter().rev().enumerate() {
                    hops[node] = Some(base + k as u32 + 1);
                }
            }
        }

        let mut delivery: Vec<SimDuration> = Vec::new();
        let mut histogram: Vec<u64> = Vec::new();
        let mut covered_honest = 0;
        for (i, node) in nodes.iter().enumerate() {
            let Some(receipt) = node.first.filter(|_| !node.adversary) else {
                continue;
            };
            covered_honest += 1;
            if receipt.from.is_none() {
                continue;
            }
            delivery.push(receipt.at.since_start());
            if let Some(h) = hops[i] {
                let h = h as usize;
                if histogram.len() <= h {
                    histogram.resize(h + 1, 0);
                }
                histogram[h] += 1;
            }
        }
        delivery.sort_unstable();
        let reached: u64 = histogram.iter().sum();
        let hop_sum: u64 = histogram
            .iter()
            .enumerate()
            .map(|(h, c)| h as u64 * c)
            .sum();

        let uplinks: Vec<_> = sim.network().uplinks().map(|(_, u)| u).collect();
        let bytes_sent: u64 = uplinks.iter().map(|u| u.bytes_sent()).sum();
        let corrupted_sent = sim
            .network()
            .uplinks()
            .filter(|(id, _)| !is_honest(*id))
            .map(|(_, u)| u.messages_sent())
            .sum();
        let complete = covered_honest == honest;
        FloodReport {
            nodes: n,
            honest,
            adversaries: n - honest,
            origin: self.origin,
            degree: self.config.degree,
            mean_degree: self.overlay.mean_degree(),
            honest_connected: self.overlay.is_connected_among(is_honest),
            message_bytes: self.message_bytes,
            covered_honest,
            coverage_time: if complete {
                Some(delivery.last().copied().unwrap_or_default())
            } else {
                None
            },
            median_delivery: delivery.get(delivery.len().saturating_sub(1) / 2).copied(),
            max_delivery: delivery.last().copied(),
            messages_sent: sim.stats().messages_sent,
            corrupted_sent,
            bytes_sent,
            bytes_per_node_mean: bytes_sent as f64 / n as f64,
            bytes_per_node_max: uplinks.iter().map(|u| u.bytes_sent()).max().unwrap_or(0),
            duplicates: nodes.iter().map(|node| node.duplicates).sum(),
            rejected_decode: nodes.iter().map(|node| node.rejected_decode).sum(),
            rejected_verify: nodes.iter().map(|node| node.rejected_verify).sum(),
            hops_max: (histogram.len().saturating_sub(1)) as u32,
            hops_mean: if reached == 0 {
                0.0
            } else {
                hop_sum as f64 / reached as f64
            },
            hops_histogram: histogram,
            shortest_hops_mean: {
                let dist = self.overlay.distances_from(self.origin, is_honest);
                let d: Vec<u32> = dist.into_iter().flatten().filter(|&d| d > 0).collect();
                if d.is_empty() {
                    0.0
                } else {
                    d.iter().map(|&d| f64::from(d)).sum::<f64>() / d.len() as f64
                }
            },
            hops_estimate: (self.config.degree > 2)
                .then(|| (n as f64).ln() / ((self.config.degree - 1) as f64).ln()),
            events: sim.stats().events,
            end_time: sim.now(),
            drained,
        }
    }
}

/// Sets up and runs a flood.
pub fn run_flood(config: FloodConfig) -> Result<FloodReport, FloodError> {
    Ok(Flood::new(config)?.run())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::LatencyModel;
    use cohort_protocol::types::{Capacity, KernelClass};

    fn config(nodes: usize, degree: usize, seed: u64, adversary_fraction: f64) -> FloodConfig {
        FloodConfig {
            nodes,
            degree,
            seed,
            adversary_fraction,
            ..FloodConfig::default()
        }
    }

    #[test]
    fn an_honest_flood_reaches_everyone() {
        let mut flood = Flood::new(config(200, 6, 1, 0.0)).unwrap();
        let r = flood.run();
        assert!(r.complete() && r.drained && r.honest_connected, "{r}");
        assert_eq!((r.honest, r.covered_honest, r.adversaries), (200, 200, 0));
        let coverage = r.coverage_time.unwrap();
        assert_eq!(Some(coverage), r.max_delivery);
        assert!(r.median_delivery.unwrap() <= coverage);
        // Each peer forwards once to every neighbour but the one it got it from; the origin to
        // all of its neighbours. So sends = 2 * edges - (nodes - 1), and every send but the
        // nodes - 1 first deliveries is a duplicate.
        let edges = flood.overlay().edges() as u64;
        assert_eq!(r.messages_sent, 2 * edges - 199);
        assert_eq!(r.duplicates, r.messages_sent - 199);
        assert_eq!(r.bytes_sent, r.messages_sent * r.message_bytes as u64);
        assert_eq!((r.rejected(), r.corrupted_sent), (0, 0));
        assert_eq!(r.hops_histogram.iter().sum::<u64>(), 199);
        assert_eq!(r.hops_histogram[0], 0);
        let estimate = r.hops_estimate.unwrap();
        assert!(
            r.hops_mean > 0.5 * estimate && r.hops_mean < 2.0 * estimate,
            "{r}"
        );
        assert!(r.hops_max as f64 >= r.hops_mean);
        // The first copy takes the fastest path, which is never shorter than the shortest.
        assert!(
            r.hops_mean >= r.shortest_hops_mean && r.shortest_hops_mean > 1.0,
            "{r}"
        );
        // Every peer's first sender is a neighbour that accepted earlier.
        let sim = flood.simulation();
        for (id, node) in sim.nodes() {
            let receipt = node.first_receipt().unwrap();
            if let Some(parent) = receipt.from {
                assert!(flood.overlay().neighbours(id).contains(&parent));
                assert!(sim.node(parent).unwrap().first_receipt().unwrap().at < receipt.at);
            }
        }
        // Nothing was lost or left over: every send was delivered.
        assert_eq!(sim.stats().messages_delivered, r.messages_sent);
        assert_eq!(sim.stats().undeliverable, 0);
    }

    #[test]
    fn corrupted_copies_are_all_rejected_and_honest_paths_still_cover() {
        let mut flood = Flood::new(config(200, 8, 2, 0.2)).unwrap();
        let r = flood.run();
        assert_eq!(r.adversaries, 40);
        assert!(
            r.honest_connected,
            "pick a seed where the honest peers are connected"
        );
        assert!(r.complete(), "{r}");
        assert!(r.corrupted_sent > 0);
        // Every corrupted copy was rejected: none was accepted, none counted as a duplicate.
        assert_eq!(r.rejected(), r.corrupted_sent);
        assert!(r.rejected_decode > 0 && r.rejected_verify > 0, "{r}");
        // Every delivery is a first acceptance, a duplicate or a rejection.
        let sim = flood.simulation();
        let firsts = sim
            .nodes()
            .filter(|(_, n)| n.first_receipt().is_some())
            .count() as u64
            - 1;
        assert_eq!(sim.stats().messages_delivered, r.messages_sent);
        assert_eq!(r.messages_sent, firsts + r.duplicates + r.rejected());
        // No honest peer got it first from an adversary.
        for (_, node) in sim.nodes() {
            if let Some(parent) = node.first_receipt().and_then(|r| r.from) {
                assert!(!sim.node(parent).unwrap().is_adversary());
            }
        }
    }

    #[test]
    fn when_adversaries_cut_the_honest_peers_apart_coverage_is_incomplete() {
        // Degree 2 is the bare ring: with adversaries on it, some honest peers are cut off.
        let r = run_flood(config(50, 2, 3, 0.3)).unwrap();
        assert!(!r.honest_connected);
        assert!(!r.complete() && r.coverage_time.is_none(), "{r}");
        assert!(r.covered_honest < r.honest && r.drained);
        assert_eq!(r.hops_estimate, None);
    }

    #[test]
    fn the_same_seed_gives_the_same_report_and_another_seed_another() {
        let c = FloodConfig {
            adversary_fraction: 0.1,
            ..config(150, 5, 77, 0.0)
        };
        let a = run_flood(c.clone()).unwrap();
        let b = run_flood(c.clone()).unwrap();
        assert_eq!(a, b);
        let other = run_flood(FloodConfig { seed: 78, ..c }).unwrap();
        assert_ne!(a, other);
        assert_ne!(a.coverage_time, other.coverage_time);
    }

    #[test]
    fn a_bigger_announcement_arrives_later() {
        let slow = NetworkConfig {
            latency: LatencyModel::uniform_ms(10, 50),
            upload_bytes_per_sec: 100_000,
        };
        let small = FloodConfig {
            network: slow.clone(),
            ..config(100, 5, 4, 0.0)
        };
        let mut hashes: Vec<ContentHash> = (0u32..64)
            .map(|i| ContentHash::of(&i.to_le_bytes()))
            .collect();
        hashes.sort();
        let big = FloodConfig {
            body: AnnouncementBody::Provides { hashes },
            ..small.clone()
        };
        let (small, big) = (run_flood(small).unwrap(), run_flood(big).unwrap());
        assert!(
            big.message_bytes > 5 * small.message_bytes,
            "{} vs {}",
            big.message_bytes,
            small.message_bytes
        );
        // Same overlay and latencies (same seed); only sizes differ.
        assert_eq!(small.messages_sent, big.messages_sent);
        assert!(big.coverage_time.unwrap() > small.coverage_time.unwrap());
        assert!(big.median_delivery.unwrap() > small.median_delivery.unwrap());
    }

    #[test]
    fn the_time_limit_leaves_coverage_incomplete() {
        let r = run_flood(FloodConfig {
            time_limit: SimTime::from_millis(30),
            ..config(100, 4, 5, 0.0)
        })
        .unwrap();
        assert!(
            !r.drained && !r.complete() && r.coverage_time.is_none(),
            "{r}"
        );
        assert!(r.end_time <= SimTime::from_millis(30));
    }

    #[test]
    fn bad_configs_are_refused() {
        for fraction in [1.0, -0.1, f64::NAN] {
            assert!(matches!(
                Flood::new(config(10, 3, 0, fraction)),
                Err(FloodError::AdversaryFraction { .. })
            ));
        }
        assert!(matches!(
            Flood::new(config(1, 3, 0, 0.0)),
            Err(FloodError::Overlay(_))
        ));
        let too_big = AnnouncementBody::Volunteer {
            capacity: Capacity {
                kernel: KernelClass {
                    backend: "flex".into(),
                    kernel: "x86-v3".into(),
                    threads: 1,
                },
                cores: 1,
                memory_mib: 1,
                models: (0u32..200)
                    .map(|i| ContentHash::of(&i.to_le_bytes()))
                    .collect(),
            },
        };
        let err = Flood::new(FloodConfig {
            body: too_big,
            ..config(10, 3, 0, 0.0)
        })
        .unwrap_err();
        assert!(matches!(err, FloodError::TooLarge(_)), "{err}");
    }

    #[test]
    fn keys_differ_per_node_and_per_seed() {
        assert_ne!(node_key_seed(1, 0), node_key_seed(1, 1));
        assert_ne!(node_key_seed(1, 0), node_key_seed(2, 0));
        let flood = Flood::new(config(20, 3, 6, 0.0)).unwrap();
        let ids: BTreeSet<_> = flood
            .simulation()
            .nodes()
            .map(|(_, n)| n.keypair().peer_id())
            .collect();
        assert_eq!(ids.len(), 20);
    }
}
