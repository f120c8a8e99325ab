//! The network model.
//!
//! What a message costs to move from one node to another:
//!
//! ```text
//! arrival = max(now, sender's uplink free) + size / sender's upload bandwidth + link latency
//! ```
//!
//! - **Send queue.** Each node has one uplink that sends one message at a time, first come
//!   first served: a message waits until the messages queued before it have left
//!   ([`Uplink::busy_until`]).
//! - **Bandwidth.** The uplink sends `upload_bytes_per_sec`; transmission takes
//!   `ceil(size * 1e6 / rate)` microseconds. Download bandwidth is not modelled (receivers are
//!   assumed never to be the bottleneck), nor is loss or reordering.
//! - **Latency.** Each unordered pair of nodes has one fixed one-way latency, drawn from the
//!   configured [`LatencyModel`] by a generator seeded from the network's seed and the two node
//!   ids. It is a pure function of those three numbers: it does not depend on which links were
//!   used first, and it need not be stored.
//!
//! A node sending to itself is loopback: it arrives at once and uses no bandwidth.
//!
//! This module owns the uplinks' state and their traffic counters; it knows nothing of what
//! the bytes mean.

use std::collections::BTreeMap;

use crate::seed::rng_for;
use crate::sim::NodeId;
use crate::time::{SimDuration, SimTime};

/// The seed stream for link latencies (see [`crate::seed`]).
const LATENCY_STREAM: u64 = 0x006c_6174_656e_6379; // "latency" in ASCII

/// How a link's one-way latency is drawn.
#[derive(Clone, Debug, PartialEq)]
pub enum LatencyModel {
    /// Every link has the same latency.
    Constant(SimDuration),
    /// Uniform between `min` and `max`, both included.
    Uniform {
        /// The shortest latency.
        min: SimDuration,
        /// The longest latency.
        max: SimDuration,
    },
    /// Log-normal around `median` (`median * exp(sigma * z)`, `z` standard normal), clamped to
    /// `min..=max`: most links are near the median, a few are much slower, as on the internet.
    LogNormal {
        /// The median latency (before clamping).
        median: SimDuration,
        /// The standard deviation of the latency's natural logarithm.
        sigma: f64,
        /// The shortest latency.
        min: SimDuration,
        /// The longest latency.
        max: SimDuration,
    },
}

impl LatencyModel {
    /// Uniform between `min_ms` and `max_ms` milliseconds.
    pub const fn uniform_ms(min_ms: u64, max_ms: u64) -> Self {
        Self::Uniform {
            min: SimDuration::from_millis(min_ms),
            max: SimDuration::from_millis(max_ms),
        }
    }

    /// The smallest and largest latency the model can give.
    pub fn bounds(&self) -> (SimDuration, SimDuration) {
        match *self {
            Self::Constant(d) => (d, d),
            Self::Uniform { min, max } | Self::LogNormal { min, max, .. } => (min, max),
        }
    }

    /// Checks that the model can be sampled.
    pub fn validate(&self) -> Result<(), NetworkConfigError> {
        let (min, max) = self.bounds();
        if min > max {
            return Err(NetworkConfigError::EmptyLatencyRange { min, max });
        }
        if let Self::LogNormal { sigma, .. } = *self
            && !(sigma.is_finite() && sigma >= 0.0)
        {
            return Err(NetworkConfigError::BadSigma { sigma });
        }
        Ok(())
    }

    /// Draws one latency. The model must be valid ([`Self::validate`]); an invalid range gives
    /// `min`.
    pub fn sample(&self, rng: &mut impl rand::Rng) -> SimDuration {
        match *self {
            Self::Constant(d) => d,
            Self::Uniform { min, max } => {
                if min >= max {
                    return min;
                }
                SimDuration::from_micros(rng.random_range(min.as_micros()..=max.as_micros()))
            }
            Self::LogNormal {
                median,
                sigma,
                min,
                max,
            } => {
                // Box-Muller: u1 in (0, 1] so its logarithm is finite.
                let u1 = 1.0 - rng.random::<f64>();
                let u2 = rng.random::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                let micros = median.as_micros() as f64 * (sigma * z).exp();
                // `as` saturates for floats out of range (and maps NaN to 0); the clamp then
                // keeps the result within the configured bounds.
                let micros = (micros.round() as u64)
                    .clamp(min.as_micros(), max.as_micros().max(min.as_micros()));
                SimDuration::from_micros(micros)
            }
        }
    }
}

/// The network's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfig {
    /// How link latencies are drawn.
    pub latency: LatencyModel,
    /// Every node's upload bandwidth in bytes per second, unless set per node with
    /// [`Network::set_upload`].
    pub upload_bytes_per_sec: u64,
}

impl Default for NetworkConfig {
    /// Internet-like: log-normal latency with a 40 ms median (5..400 ms), 10 Mbit/s upload.
    fn default() -> Self {
        Self {
            latency: LatencyModel::LogNormal {
                median: SimDuration::from_millis(40),
                sigma: 0.6,
                min: SimDuration::from_millis(5),
                max: SimDuration::from_millis(400),
            },
            upload_bytes_per_sec: 1_250_000,
        }
    }
}

impl NetworkConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), NetworkConfigError> {
        self.latency.validate()?;
        if self.upload_bytes_per_sec == 0 {
            return Err(NetworkConfigError::ZeroBandwidth);
        }
        Ok(())
    }
}

/// A network configuration that cannot be simulated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkConfigError {
    /// The latency range is empty.
    #[error("latency: min {min} is greater than max {max}")]
    EmptyLatencyRange {
        /// The configured minimum.
        min: SimDuration,
        /// The configured maximum.
        max: SimDuration,
    },
    /// The log-normal spread is negative or not a number.
    #[error("latency: sigma must be a finite number >= 0, got {sigma}")]
    BadSigma {
        /// The configured sigma.
        sigma: f64,
    },
    /// A node would never finish sending anything.
    #[error("upload bandwidth must be at least 1 byte per second")]
    ZeroBandwidth,
}

/// A send from a node the network does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {node} is not on the network")]
pub struct UnknownNode {
    /// The node.
    pub node: NodeId,
}

/// One node's uplink: its bandwidth, its send queue, its traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    bytes_per_sec: u64,
    busy_until: SimTime,
    bytes_sent: u64,
    messages_sent: u64,
}

impl Uplink {
    /// Upload bandwidth in bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// When the last queued message will have left.
    pub fn busy_until(&self) -> SimTime {
        self.busy_until
    }

    /// Bytes sent so far (loopback excluded).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Messages sent so far (loopback excluded).
    pub fn messages_sent(&self) -> u64 {
        self.messages_sent
    }
}

/// When a message leaves and arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmission {
    /// When its first byte leaves (after the send queue).
    pub start: SimTime,
    /// When its last byte has left.
    pub sent: SimTime,
    /// When it has fully arrived: `sent` plus the link's latency.
    pub arrival: SimTime,
}

/// The simulated network: latencies and uplinks.
#[derive(Clone, Debug)]
pub struct Network {
    config: NetworkConfig,
    seed: u64,
    uplinks: BTreeMap<NodeId, Uplink>,
}

impl Network {
    /// A network with no nodes; `seed` fixes every link's latency.
    pub fn new(config: NetworkConfig, seed: u64) -> Result<Self, NetworkConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            seed,
            uplinks: BTreeMap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// Adds a node with the configured upload bandwidth (no effect if it is already there).
    pub fn add_node(&mut self, node: NodeId) {
        let bytes_per_sec = self.config.upload_bytes_per_sec;
        self.uplinks.entry(node).or_insert(Uplink {
            bytes_per_sec,
            busy_until: SimTime::ZERO,
            bytes_sent: 0,
            messages_sent: 0,
        });
    }

    /// Sets one node's upload bandwidth (at least 1 byte per second), adding the node if needed.
    pub fn set_upload(&mut self, node: NodeId, bytes_per_sec: u64) {
        self.add_node(node);
        if let Some(u) = self.uplinks.get_mut(&node) {
            u.bytes_per_sec = bytes_per_sec.max(1);
        }
    }

    /// A node's uplink.
    pub fn uplink(&self, node: NodeId) -> Option<&Uplink> {
        self.uplinks.get(&node)
    }

    /// Every node's uplink, by node id.
    pub fn uplinks(&self) -> impl Iterator<Item = (NodeId, &Uplink)> {
        self.uplinks.iter().map(|(id, u)| (*id, u))
    }

    /// The one-way latency between `a` and `b` (the same both ways; zero from a node to itself).
    pub fn latency(&self, a: NodeId, b: NodeId) -> SimDuration {
        if a == b {
            return SimDuration::ZERO;
        }
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        let pair = (u64::from(lo.0) << 32) | u64::from(hi.0);
        self.config
            .latency
            .sample(&mut rng_for(self.seed, LATENCY_STREAM, pair))
    }

    /// How long `size` bytes take to leave `node`'s uplink.
    pub fn transmission_time(&self, node: NodeId, size: usize) -> Result<SimDuration, UnknownNode> {
        let uplink = self.uplinks.get(&node).ok_or(UnknownNode { node })?;
        Ok(transmission_time(size, uplink.bytes_per_sec))
    }

    /// Queues `size` bytes from `from` to `to` at `now`: occupies `from`'s uplink and says when
    /// the message arrives.
    pub fn transmit(
        &mut self,
        now: SimTime,
        from: NodeId,
        to: NodeId,
        size: usize,
    ) -> Result<Transmission, UnknownNode> {
        if from == to {
            self.uplinks.get(&from).ok_or(UnknownNode { node: from })?;
            return Ok(Transmission {
                start: now,
                sent: now,
                arrival: now,
            });
        }
        let latency = self.latency(from, to);
        let uplink = self
            .uplinks
            .get_mut(&from)
            .ok_or(UnknownNode { node: from })?;
        let start = now.max(uplink.busy_until);
        let sent = start + transmission_time(size, uplink.bytes_per_sec);
        uplink.busy_until = sent;
        uplink.bytes_sent = uplink.bytes_sent.saturating_add(size as u64);
        uplink.messages_sent += 1;
        Ok(Transmission {
            start,
            sent,
            arrival: sent + latency,
        })
    }
}

/// `ceil(size * 1e6 / bytes_per_sec)` microseconds.
fn transmission_time(size: usize, bytes_per_sec: u64) -> SimDuration {
    let rate = u128::from(bytes_per_sec.max(1));
    let micros = (size as u128 * 1_000_000).div_ceil(rate);
    SimDuration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(latency: LatencyModel, upload: u64) -> Network {
        let mut n = Network::new(
            NetworkConfig {
                latency,
                upload_bytes_per_sec: upload,
            },
            7,
        )
        .unwrap();
        for i in 0..200 {
            n.add_node(NodeId(i));
        }
        n
    }

    fn all_latencies(n: &Network) -> Vec<SimDuration> {
        let mut v = Vec::new();
        for a in 0..200 {
            for b in (a + 1)..200 {
                v.push(n.latency(NodeId(a), NodeId(b)));
            }
        }
        v
    }

    #[test]
    fn uniform_latency_stays_in_bounds_and_spreads() {
        let n = net(LatencyModel::uniform_ms(10, 50), 1_000_000);
        let v = all_latencies(&n);
        let (lo, hi) = (SimDuration::from_millis(10), SimDuration::from_millis(50));
        assert!(v.iter().all(|d| (lo..=hi).contains(d)));
        let (min, max) = (v.iter().min().unwrap(), v.iter().max().unwrap());
        // 19,900 draws over 40,001 values: the extremes come within 1 ms of the bounds.
        assert!(
            *min < SimDuration::from_millis(11) && *max > SimDuration::from_millis(49),
            "{min} {max}"
        );
        let mean = v.iter().map(|d| d.as_millis_f64()).sum::<f64>() / v.len() as f64;
        assert!((mean - 30.0).abs() < 1.0, "mean {mean}");
    }

    #[test]
    fn log_normal_latency_stays_in_bounds_around_its_median() {
        let model = LatencyModel::LogNormal {
            median: SimDuration::from_millis(40),
            sigma: 1.0,
            min: SimDuration::from_millis(5),
            max: SimDuration::from_millis(200),
        };
        let n = net(model, 1_000_000);
        let mut v = all_latencies(&n);
        assert!(
            v.iter()
                .all(|d| (SimDuration::from_millis(5)..=SimDuration::from_millis(200)).contains(d))
        );
        // sigma = 1 puts about 2% below 5 ms and 5% above 200 ms: both clamps are hit.
        assert!(v.contains(&SimDuration::from_millis(5)));
        assert!(v.contains(&SimDuration::from_millis(200)));
        v.sort();
        let median = v[v.len() / 2].as_millis_f64();
        assert!((median - 40.0).abs() < 2.0, "median {median}");
    }

    #[test]
    fn latency_is_symmetric_fixed_and_zero_to_self() {
        let n = net(LatencyModel::uniform_ms(1, 100), 1_000_000);
        let (a, b) = (NodeId(3), NodeId(150));
        assert_eq!(n.latency(a, b), n.latency(b, a));
        assert_eq!(n.latency(a, b), n.latency(a, b));
        assert_eq!(n.latency(a, a), SimDuration::ZERO);
        let other_seed = Network::new(n.config().clone(), 8).unwrap();
        assert_ne!(all_latencies(&n), all_latencies(&other_seed));
    }

    #[test]
    fn constant_latency_is_exact() {
        let n = net(
            LatencyModel::Constant(SimDuration::from_micros(1234)),
            1_000_000,
        );
        assert!(all_latencies(&n).iter().all(|d| d.as_micros() == 1234));
    }

    #[test]
    fn a_bigger_message_arrives_later_by_size_over_bandwidth() {
        // 1,000 bytes/s: every byte costs 1 ms.
        let latency = LatencyModel::Constant(SimDuration::from_millis(20));
        let (a, b) = (NodeId(0), NodeId(1));
        let mut small = net(latency.clone(), 1_000);
        let mut big = net(latency, 1_000);
        let t_small = small.transmit(SimTime::ZERO, a, b, 100).unwrap();
        let t_big = big.transmit(SimTime::ZERO, a, b, 3_000).unwrap();
        assert_eq!(t_small.arrival, SimTime::from_millis(100 + 20));
        assert_eq!(t_big.arrival, SimTime::from_millis(3_000 + 20));
        assert!(t_big.arrival > t_small.arrival);
    }

    #[test]
    fn the_send_queue_serialises_an_uplink() {
        let mut n = net(LatencyModel::Constant(SimDuration::from_millis(10)), 1_000);
        let (a, b, c) = (NodeId(0), NodeId(1), NodeId(2));
        let first = n.transmit(SimTime::ZERO, a, b, 500).unwrap();
        let second = n.transmit(SimTime::ZERO, a, c, 500).unwrap();
        assert_eq!(first.sent, SimTime::from_millis(500));
        assert_eq!(second.start, first.sent);
        assert_eq!(second.arrival, SimTime::from_millis(1_000 + 10));
        // Another node's uplink is not delayed.
        let other = n.transmit(SimTime::ZERO, b, c, 500).unwrap();
        assert_eq!(other.arrival, SimTime::from_millis(510));
        // A send after the queue drained starts at once; odd sizes round up to whole microseconds.
        let later = n.transmit(SimTime::from_secs(5), a, b, 1).unwrap();
        assert_eq!(later.start, SimTime::from_secs(5));
        assert_eq!(later.sent, SimTime::from_millis(5_001));
        let u = n.uplink(a).unwrap();
        assert_eq!((u.messages_sent(), u.bytes_sent()), (3, 1_001));
        assert_eq!(
            n.transmission_time(a, 3).unwrap(),
            SimDuration::from_millis(3)
        );
        let mut fast = net(LatencyModel::Constant(SimDuration::ZERO), 3);
        assert_eq!(
            fast.transmit(SimTime::ZERO, a, b, 1).unwrap().arrival,
            SimTime::from_micros(333_334)
        );
    }

    #[test]
    fn loopback_and_unknown_nodes() {
        let mut n = net(LatencyModel::Constant(SimDuration::from_millis(10)), 1_000);
        let t = n
            .transmit(SimTime::from_millis(3), NodeId(4), NodeId(4), 10_000)
            .unwrap();
        assert_eq!(t.arrival, SimTime::from_millis(3));
        assert_eq!(n.uplink(NodeId(4)).unwrap().bytes_sent(), 0);
        let err = n
            .transmit(SimTime::ZERO, NodeId(999), NodeId(0), 1)
            .unwrap_err();
        assert_eq!(err, UnknownNode { node: NodeId(999) });
        assert_eq!(err.to_string(), "node 999 is not on the network");
    }

    #[test]
    fn invalid_configs_are_refused() {
        let bad_range = NetworkConfig {
            latency: LatencyModel::uniform_ms(50, 10),
            ..NetworkConfig::default()
        };
        assert!(matches!(
            Network::new(bad_range, 0),
            Err(NetworkConfigError::EmptyLatencyRange { .. })
        ));
        let bad_sigma = NetworkConfig {
            latency: LatencyModel::LogNormal {
                median: SimDuration::from_millis(1),
                sigma: f64::NAN,
                min: SimDuration::ZERO,
                max: SimDuration::from_millis(2),
            },
            ..NetworkConfig::default()
        };
        assert!(matches!(
            Network::new(bad_sigma, 0),
            Err(NetworkConfigError::BadSigma { .. })
        ));
        let zero = NetworkConfig {
            upload_bytes_per_sec: 0,
            ..NetworkConfig::default()
        };
        assert_eq!(
            Network::new(zero, 0).unwrap_err(),
            NetworkConfigError::ZeroBandwidth
        );
    }
}
