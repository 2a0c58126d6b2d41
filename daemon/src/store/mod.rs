//! The loop's state in PostgreSQL: prompts, the checkpoint lineage, iterations, leased jobs, responses, claims,
//! pairs, training runs and events. Every write that finishes a stage happens in one transaction with the job's
//! completion, and every insert is guarded by a uniqueness constraint, so a crashed and retried stage neither
//! loses nor duplicates anything.
//!
//! One file per part of the schema; every query of the daemon lives here (`db` opens and migrates the pool).

pub mod blobs;
pub mod checkpoints;
pub mod control;
pub mod db;
pub mod events;
pub mod feedback;
pub mod imported;
pub mod iterations;
pub mod jobs;
pub mod kinds;
pub mod prompts;

pub use blobs::*;
pub use checkpoints::*;
pub use control::*;
pub use events::*;
pub use feedback::*;
pub use imported::*;
pub use iterations::*;
pub use jobs::*;
pub use kinds::{CheckpointKind, CheckpointStatus, JobKind, Stage};
pub use prompts::*;
