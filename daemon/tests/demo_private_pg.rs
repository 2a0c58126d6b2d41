//! The main job with nothing set up: `rlaifd demo` where no PostgreSQL answers at the default address. Each run is
//! in a network namespace of its own (`unshare --net`, loopback up), so the machine's server at 127.0.0.1:5432 is out
//! of reach, as on a machine where it is not running.
//!
//! - With the server's binaries installed, the demo creates a private cluster in its state directory, runs on it
//!   through a Unix socket, and stops it at the end; a second run on the same state directory starts the same
//!   cluster and resumes from what the first stored.
//! - With no server installed (PATH without it, and an empty /usr/lib/postgresql in a private mount namespace), it
//!   stops with the message that says how to get a server.

use std::path::Path;
use std::process::Command;

/// Runs `rlaifd demo ARGS` in a fresh network namespace (and, with `hide_server`, with no PostgreSQL binaries in
/// reach); (exit code, stdout, stderr). Err: this machine cannot make the namespace.
fn demo(state: &Path, iterations: usize, hide_server: bool) -> Result<(i32, String, String), String> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base");
    let script = if hide_server {
        "ip link set lo up && mount -t tmpfs none /usr/lib/postgresql && exec \"$0\" \"$@\""
    } else {
        "ip link set lo up && exec \"$0\" \"$@\""
    };
    let mut c = Command::new("unshare");
    c.args(if hide_server { vec!["--net", "--mount", "--propagation", "private"] } else { vec!["--net"] })
        .args(["sh", "-c", script])
        .arg(env!("CARGO_BIN_EXE_rlaifd"))
        .args(["demo", "--iterations", &iterations.to_string(), "--prompts-per-iteration", "4", "--eval-count", "4"])
        .args(["--set", "n=4", "--set", "max_new_tokens=16", "--set", "batch_size=2"])
        .arg("--state-dir")
        .arg(state)
        .arg("--model")
        .arg(&model)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    if hide_server {
        c.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    }
    let o = c.output().map_err(|e| format!("cannot run unshare: {e}"))?;
    let (out, err) = (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    if err.contains("unshare:") || err.contains("ip: ") || err.contains("mount:") {
        return Err(err);
    }
    Ok((o.status.code().unwrap_or(-1), out, err))
}

#[test]
fn the_demo_starts_a_private_postgres_when_none_answers_and_says_how_to_get_one_when_none_is_installed() {
    if rlaifd::private_pg::server_bins().is_none() {
        println!("SKIPPED: the PostgreSQL server is not installed here (initdb, pg_ctl)");
        return;
    }
    let state = std::env::temp_dir().join(format!("rlaifd-demo-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let (code, out, err) = match demo(&state, 1, false) {
        Ok(r) => r,
        Err(why) => {
            println!("SKIPPED: no private network namespace here: {why}");
            return;
        }
    };
    println!("{err}");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no PostgreSQL answers at 127.0.0.1:5432; starting a private cluster"), "{err}");
    assert!(err.contains("creating a private PostgreSQL cluster"), "{err}");
    assert!(err.contains("socket in"), "the demo should name the socket it uses: {err}");
    assert!(err.contains("stopped the private PostgreSQL cluster"), "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect(&out);
    assert_eq!(summary["iterations"], 1, "{out}");
    let data = state.join("postgres/data");
    assert!(data.join("PG_VERSION").is_file());
    assert!(!data.join("postmaster.pid").exists(), "the cluster was left running");

    // Again, one iteration further: the same cluster, its first iteration kept.
    let (code, out, err) = demo(&state, 2, false).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("starting a private cluster") && !err.contains("creating a private"), "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect(&out);
    assert_eq!(summary["iterations"], 2, "{out}");
    assert!(!data.join("postmaster.pid").exists(), "the cluster was left running");

    // No server installed: today's clear message, nothing started.
    let bare = state.with_extension("bare");
    let _ = std::fs::remove_dir_all(&bare);
    match demo(&bare, 1, true) {
        Ok((code, _, err)) => {
            println!("{err}");
            assert_ne!(code, 0);
            assert!(err.contains("the demo needs PostgreSQL: start a server"), "{err}");
            assert!(!bare.join("postgres").exists());
        }
        Err(why) => println!("(no private mount namespace for the case without a server: {why})"),
    }
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&bare);
}
