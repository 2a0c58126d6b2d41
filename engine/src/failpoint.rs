//! Failpoints for crash tests: `RLAIFD_FAILPOINTS=name[,name...]` makes the process abort (as a SIGKILL or power
//! loss would stop it, without unwinding or cleanup) when it reaches a named point. Unset: nothing happens.
//! Points: `sample_tx` (a sample job's answers inserted, its transaction not yet committed), `label_tx` (a label
//! job's claims, scores and pairs inserted, its transaction not yet committed), `adapter_save` (inside the engine's
//! checkpoint save: the config written into the temporary directory, the weights not yet), `train_saved`
//! (checkpoint directory written, no database row yet), `decided` (promotion committed, not yet hot-swapped),
//! `hot_swap` (new adapters loaded, the served generation not yet replaced).

use std::sync::OnceLock;

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| std::env::var("RLAIFD_FAILPOINTS").map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).unwrap_or_default())
}

/// Aborts the process when `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|a| a == name) {
        eprintln!("rlaifd: failpoint {name} reached: aborting");
        std::process::abort();
    }
}
