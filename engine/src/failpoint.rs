//! Failpoints for crash tests: `RLAIFD_FAILPOINTS=name[,name...]` makes the process abort (as a SIGKILL or power
//! loss would stop it, without unwinding or cleanup) when it reaches a named point. Unset: nothing happens.
//! Points: `sample_tx` (a sample job's answers inserted, its transaction not yet committed), `label_tx` (a label
//! job's claims, scores and pairs inserted, its transaction not yet committed), `adapter_save` (inside the engine's
//! checkpoint save: the config written into the temporary directory, the weights not yet), `train_saved`
//! (checkpoint directory written, no database row yet), `decided` (promotion committed, not yet hot-swapped),
//! `hot_swap` (new adapters loaded, the served generation not yet replaced).
//! Stalls instead of aborts (`stall`): `engine_stall` (the engine thread stops inside a chat request, as a hung
//! GPU call would, and never reaches another interruption point).

use std::sync::OnceLock;

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("RLAIFD_FAILPOINTS")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    })
}

/// Aborts the process when `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|a| a == name) {
        eprintln!("rlaifd: failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// Blocks the calling thread for good when `name` is armed (a hung device call, seen from outside).
pub fn stall(name: &str) {
    if armed().iter().any(|a| a == name) {
        eprintln!("rlaifd: failpoint {name} reached: this thread stops here");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
