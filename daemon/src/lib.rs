//! rlaifd's daemon side as a library (the `rlaifd` binary and the integration tests use it): PostgreSQL
//! schema and store, and the RLAIF-V loop's stages on top of the engine.

pub mod actors;
pub mod batcher;
pub mod bench;
pub mod config;
pub mod control;
pub mod dataset;
pub use store::db;
pub mod demo;
pub mod failpoint;
pub mod fuzz_targets;
pub mod http;
pub mod notify;
pub mod private_pg;
pub mod rlaif;
pub mod serve;
pub mod shapes_eval;
pub mod store;
pub mod worker;
