//! The loop's actors (`supervisor`) and the work each does per step (`steps`). The HTTP server (`crate::http`)
//! and the control socket (`crate::control`) are the daemon's other actors; what they all share is
//! `crate::serve::Daemon`.

pub mod steps;
pub mod supervisor;

pub use supervisor::{LoopActor, Role, Supervisor, Wake};
