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

pub mod data_dir;
pub mod identity;
pub mod store;
