//! Federated rounds at scale: the protocol's round state machines driven in virtual time.
//!
//! - [`config`]: scenario files (TOML): a base run and the runs that vary it.
//! - [`surrogate`]: the training task (least squares through a LoRA adapter) that keeps merges,
//!   losses, spot checks and Shapley values exact and cheap.
//! - [`driver`]: one job, one [`cohort_protocol::rounds::coordinator::Coordinator`] and one
//!   [`cohort_protocol::rounds::worker::Worker`] per volunteer, churn and adversaries; the
//!   driver answers `Verify`, `Distances` (for the Multi-Krum filter) and `Merge` itself.
//! - [`report`]: the summary, CSV files and SVG charts of a scenario.
//! - [`linalg`]: the small dense matrices it all needs.
//!
//! This module must not re-implement protocol logic: every decision about joins, commits,
//! deadlines, audits, norm bounds, quorum and credit is the machines'.

pub mod config;
pub mod driver;
pub mod linalg;
pub mod report;
pub mod surrogate;

pub use config::{RunConfig, Scenario, ScenarioError};
pub use driver::{RoundRow, RoundSim, RunError, RunReport, run};
pub use report::{ScenarioReport, run_scenario};
