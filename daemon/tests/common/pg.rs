//! A private PostgreSQL cluster a test owns (initdb on its own port and socket directory), stopped and started by
//! the test to take the database away from running daemons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A private PostgreSQL cluster on its own port and socket directory, stopped and started by the test.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl Cluster {
    pub fn bin(name: &str) -> Option<PathBuf> {
        let mut c: Vec<PathBuf> = vec![PathBuf::from("/usr/local/bin").join(name)];
        if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
            c.extend(rd.flatten().map(|e| e.path().join("bin").join(name)));
        }
        c.into_iter().find(|p| p.exists())
    }

    pub fn run(&self, bin: &Path, args: &[&str]) -> std::process::Output {
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        c.args(args).output().unwrap()
    }

    pub fn create(dir: PathBuf, port: u16) -> Result<Cluster, String> {
        let initdb = Cluster::bin("initdb").ok_or("initdb not found")?;
        let as_postgres = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            // initdb refuses root: the cluster belongs to the postgres user.
            let ok =
                Command::new("chown").args(["-R", "postgres"]).arg(&dir).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                return Err("cannot chown the cluster directory to postgres".into());
            }
        }
        let c = Cluster { dir, port, as_postgres };
        let data = c.dir.join("data");
        let o = c.run(&initdb, &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        if !o.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&o.stderr)));
        }
        Ok(c)
    }

    /// A new cluster under `dir` on `port`, started. Err: this machine cannot make one (the test then skips).
    pub fn started(dir: PathBuf, port: u16) -> Result<Cluster, String> {
        let c = Cluster::create(dir, port)?;
        c.ctl("start");
        Ok(c)
    }

    pub fn ctl(&self, action: &str) {
        let pg_ctl = Cluster::bin("pg_ctl").expect("pg_ctl");
        let data = self.dir.join("data");
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.display());
        let log = self.dir.join("pg.log");
        let mut args = vec![action, "-D", data.to_str().unwrap(), "-w", "-t", "60"];
        if action == "start" {
            args.extend(["-o", &opts, "-l", log.to_str().unwrap()]);
        } else {
            args.extend(["-m", "fast"]);
        }
        let o = self.run(&pg_ctl, &args);
        assert!(
            o.status.success(),
            "pg_ctl {action}: {} {}",
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(pg_ctl) = Cluster::bin("pg_ctl") {
            let _ = self.run(&pg_ctl, &["stop", "-D", self.dir.join("data").to_str().unwrap(), "-m", "immediate"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
