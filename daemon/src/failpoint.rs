//! Crash-test failpoints (`RLAIFD_FAILPOINTS`); the mechanism and the list of points live in the engine, which
//! has points of its own.
pub use engine::failpoint::{hit, stall};
