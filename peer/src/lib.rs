//! The Cohort node and the `cohort` command.
//!
//! This crate owns every kind of I/O: the iroh endpoint (gossip, blobs, the `cohort/1`
//! request/response protocol), libp2p content routing, the rocksdb metadata store, the HTTP and
//! OpenAI-compatible API, and the command line. Wire formats come from `cohort-protocol`; it
//! sends bytes and hashes to `cohort-trainer`, never the other way round.
//!
//! - [`identity`]: one ed25519 identity across Cohort, iroh and libp2p.
//! - [`data_dir`]: the layout of a peer's data directory and `cohort init`.
//! - [`store`]: the rocksdb metadata store.
//! - [`state`]: the state actor that owns the store and the per-peer counters.
//! - [`node`]: `cohort up`: endpoint, router, gossip, blobs, `cohort/1`, sync.
//! - [`api`]: the JSON API and dashboard.
//! - [`openai`]: the OpenAI-compatible API (`/v1/...`) and `/metrics`.
//! - [`import`]: JSONL validation, normalisation, deduplication, shards.
//! - [`rounds`]: federated rounds: the job owner's coordinator, the volunteer's worker, the
//!   ledger.
//! - [`routing`]: content routing ("which peers provide hash H").
//! - [`dht`]: the libp2p Kademlia DHT, the second content router, and peer address records.
//! - [`config`]: the optional `config.json` of a data directory.
//! - [`rpc`]: `cohort/1` framing and calls.

pub mod api;
pub mod client;
pub mod config;
pub mod crypto;
pub mod data_dir;
pub mod dht;
pub mod identity;
pub mod import;
pub mod node;
pub mod openai;
pub mod rounds;
pub mod routing;
pub mod rpc;
pub mod state;
pub mod store;
