//! rlaifd's daemon side as a library (the `rlaifd` binary and the integration tests use it): PostgreSQL
//! schema and store, and the RLAIF-V loop's stages on top of the engine.

pub mod db;
pub mod store;
pub mod shapes_eval;
pub mod rlaif;
pub mod demo;
pub mod config;
pub mod worker;
pub mod serve;
pub mod server;
pub mod control;
pub mod notify;
pub mod fuzz_targets;
pub mod failpoint;
