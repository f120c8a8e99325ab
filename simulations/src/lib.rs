//! Deterministic discrete-event simulation of Cohort networks.
//!
//! Thousands of peers in one process, on a virtual clock, speaking the real wire format of
//! `cohort-protocol`. The design follows iroh-gossip's `proto/sim.rs` (see `STYLE.md`, item 3):
//!
//! - [`time`]: [`SimTime`] and [`SimDuration`], whole microseconds in a `u64`; no wall clock.
//! - [`queue`]: [`EventQueue`], a `BinaryHeap` ordered by `(time, sequence number)`, so events
//!   due at the same instant are handled in the order they were scheduled.
//! - [`seed`]: one seed per run, split into independent streams for each purpose.
//! - [`network`]: per-link latency from a configurable distribution, per-node upload bandwidth
//!   and send queue: `arrival = queue wait + size / bandwidth + latency`.
//! - [`sim`]: the [`Node`] trait (sans-IO: input and time in, actions out) and the
//!   [`Simulation`] that owns the nodes (in a `BTreeMap`), the queue, the network and the clock.
//! - [`overlay`]: random connected overlays of a given degree.
//! - [`kademlia`]: iterative Kademlia provider lookups over converged routing tables: hops and
//!   requests per lookup against log2(N) (`cohort-sim-kad`).
//! - [`rounds`]: federated rounds: the protocol's coordinator and workers for thousands of
//!   volunteers, a least-squares surrogate for training, churn, adversaries, attribution and
//!   merging scenarios from TOML files (`cohort-sim scenarios/NAME.toml`).
//! - [`flood`]: the first scenario, gossip flooding of a signed announcement with adversaries
//!   that corrupt what they forward.
//!
//! Same configuration and seed, same run: a report compares equal field by field. This crate
//! must not grow its own copy of protocol logic: when the round state machines land in
//! `cohort-protocol`, scenarios wrap them in a [`Node`] and drive them as they are.

pub mod flood;
pub mod kademlia;
pub mod network;
pub mod overlay;
pub mod queue;
pub mod rounds;
pub mod seed;
pub mod sim;
pub mod time;

pub use flood::{Flood, FloodConfig, FloodError, FloodReport, run_flood};
pub use kademlia::{KadConfig, KadError, KadReport, run_kademlia};
pub use network::{LatencyModel, Network, NetworkConfig, NetworkConfigError};
pub use overlay::{Overlay, OverlayError};
pub use queue::EventQueue;
pub use sim::{Action, Input, Node, NodeId, Outbox, RunOutcome, SimStats, Simulation};
pub use time::{SimDuration, SimTime};
