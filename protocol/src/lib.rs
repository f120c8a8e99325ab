//! Cohort's wire and ledger formats.
//!
//! This crate is the leaf of the workspace: every byte that crosses the network or enters the
//! ledger is defined here, and nothing here does network I/O. It must never depend on tokio,
//! iroh, libp2p, rocksdb or burn (see `DESIGN.md`); the only I/O is the small blocking
//! read/write of key files in [`identity`], so that every binary stores keys the same way.
//!
//! - [`identity`]: ed25519 keypairs, [`PeerId`], key files.
//! - [`hash`]: [`ContentHash`], BLAKE3, the same 32 bytes as an iroh-blobs hash.
//! - [`encoding`]: the one canonical bincode configuration, with a decode limit and no trailing
//!   bytes.
//! - [`signed`]: [`Signed<T>`], a domain-separated, versioned, signed envelope.
//! - [`types`]: every wire and ledger message.
//! - [`ledger`]: chain verification and equivocation proofs.
//! - [`rounds`]: the round's coordinator and worker state machines, without I/O.
//! - [`rng`]: the portable seeded generator behind every draw peers must agree on.
//! - [`attribution`]: a round's credit: near-duplicate grouping, Shapley values (exact or
//!   GTG-Shapley), data and compute credit split exactly in integer units.

pub mod attribution;
pub mod encoding;
pub mod hash;
pub mod identity;
pub mod ledger;
pub mod rng;
pub mod rounds;
pub mod signed;
pub mod types;

pub use encoding::{Canonical, DecodeError};
pub use hash::ContentHash;
pub use identity::{Keypair, PeerId};
pub use signed::{Signed, SignedPayload, VerifyError};

/// The protocol version carried by every signed envelope. A peer rejects envelopes of a version
/// it does not speak.
pub const PROTOCOL_VERSION: u16 = 1;
