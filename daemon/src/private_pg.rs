//! `rlaifd demo` on a machine where no PostgreSQL answers at the default address but the server's binaries are
//! installed: a private cluster in the demo's state directory (`STATE/postgres`), reached only through a Unix socket
//! in that directory (no TCP port), started for the demo and stopped at its end. A rerun on the same state directory
//! starts the same cluster again and resumes. As root (initdb refuses root) the cluster belongs to the `postgres`
//! user and its commands run through `runuser`.
//!
//! No crate does this without downloading server binaries (which this project's machines cannot), so it is a few
//! calls of the installed `initdb` and `pg_ctl`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The port in the socket's name (`.s.PGSQL.5432`); nothing listens on TCP.
const PORT: u16 = 5432;
/// The longest Unix socket path Linux takes (sun_path is 108 bytes with the terminating zero).
const MAX_SOCKET_PATH: usize = 107;

/// The installed server's `initdb` and `pg_ctl`: on PATH, else the newest `/usr/lib/postgresql/VERSION/bin`
/// (Debian's layout). None when the server is not installed.
pub fn server_bins() -> Option<(PathBuf, PathBuf)> {
    let on_path = |name: &str| {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
    };
    if let (Some(i), Some(c)) = (on_path("initdb"), on_path("pg_ctl")) {
        return Some((i, c));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions
        .into_iter()
        .map(|(_, bin)| (bin.join("initdb"), bin.join("pg_ctl")))
        .find(|(i, c)| i.is_file() && c.is_file())
}

/// Whether something accepts TCP connections at `addr` (within 2 s).
pub fn answers(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok())
}

/// A running private cluster; stopped when dropped.
pub struct PrivateCluster {
    dir: PathBuf,
    pg_ctl: PathBuf,
    run_as: Option<&'static str>,
    stopped: bool,
}

impl PrivateCluster {
    /// Creates (first time) and starts the cluster under `state_dir/postgres`; returns it and the URL of `database`
    /// on it (through its socket).
    pub fn start(state_dir: &Path, bins: &(PathBuf, PathBuf), database: &str) -> Result<(PrivateCluster, String)> {
        let (initdb, pg_ctl) = bins;
        let dir = state_dir.join("postgres");
        let data = dir.join("data");
        let socket = dir.join(format!(".s.PGSQL.{PORT}"));
        let shown = dir.display().to_string();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the private PostgreSQL cluster's socket {} would be longer than the {MAX_SOCKET_PATH} bytes a Unix socket \
                 path may have: use a shorter --state-dir, or start PostgreSQL and set DATABASE_URL",
                socket.display()
            );
        }
        if shown.contains('\'') || shown.contains('"') || shown.contains('\\') {
            bail!("the state directory {shown} holds a quote or backslash; use another --state-dir for the private PostgreSQL cluster");
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {shown}"))?;
        let run_as = is_root().then_some("postgres");
        let mut c = PrivateCluster { dir: dir.clone(), pg_ctl: pg_ctl.clone(), run_as, stopped: true };
        if let Some(user) = run_as {
            // initdb and postgres refuse to run as root: the cluster's files belong to the postgres user.
            c.command(Path::new("chown"), false)
                .args(["-R", user])
                .arg(&dir)
                .output()
                .map_err(|e| anyhow::anyhow!(e))
                .and_then(|o| {
                    if o.status.success() {
                        Ok(())
                    } else {
                        bail!("cannot give {shown} to the {user} user: {}", String::from_utf8_lossy(&o.stderr).trim())
                    }
                })?;
        }
        if !data.join("PG_VERSION").is_file() {
            eprintln!("rlaifd demo: creating a private PostgreSQL cluster in {shown} ({})", initdb.display());
            let o = c
                .command(initdb, true)
                .args(["-D"])
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8"])
                .output()
                .with_context(|| format!("cannot run {}", initdb.display()))?;
            if !o.status.success() {
                bail!(
                    "initdb of the private PostgreSQL cluster in {shown} failed (the {} user must be able to reach the \
                     state directory): {}",
                    run_as.unwrap_or("current"),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
        // A cluster left running by a demo that was killed is taken as it is.
        let running =
            c.command(pg_ctl, true).args(["status", "-D"]).arg(&data).output().is_ok_and(|o| o.status.success());
        if !running {
            let opts = format!("-k '{shown}' -c listen_addresses='' -p {PORT}");
            let o = c
                .command(pg_ctl, true)
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(dir.join("postgres.log"))
                .args(["-o", &opts])
                .output()
                .with_context(|| format!("cannot run {}", pg_ctl.display()))?;
            if !o.status.success() {
                bail!(
                    "the private PostgreSQL cluster in {shown} did not start ({}; its log: {}/postgres.log)",
                    String::from_utf8_lossy(&o.stderr).trim(),
                    shown
                );
            }
        }
        let url = format!("postgres://postgres@localhost/{database}?host={}&port={PORT}", percent_encode(&shown));
        c.stopped = false;
        Ok((c, url))
    }

    /// `program`, run as the cluster's owner when `as_owner` (and running as root).
    fn command(&self, program: &Path, as_owner: bool) -> Command {
        match self.run_as.filter(|_| as_owner) {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Stops the cluster (fast: open sessions are ended).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let data = self.dir.join("data");
        match self.command(&self.pg_ctl, true).args(["stop", "-w", "-m", "fast", "-D"]).arg(&data).output() {
            Ok(o) if o.status.success() => eprintln!("rlaifd demo: stopped the private PostgreSQL cluster"),
            Ok(o) => eprintln!(
                "rlaifd demo: stopping the private PostgreSQL cluster in {} failed: {}",
                self.dir.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("rlaifd demo: cannot run {}: {e}", self.pg_ctl.display()),
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `s` with every byte other than ASCII letters, digits and `/-_.~` percent-encoded (a URL's query value).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_directory_is_encoded_for_the_url() {
        assert_eq!(percent_encode("/tmp/a b/rlaifd-demo"), "/tmp/a%20b/rlaifd-demo");
        assert_eq!(percent_encode("/x&y=z"), "/x%26y%3Dz");
    }
}
