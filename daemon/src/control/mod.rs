//! The Control actor and `rlaifd ctl`: a Unix stream socket (mode 0660), one JSON object per line each way.
//! Commands: `status`, `pause`, `resume`, `iterate`, `promote <id>`, `rollback [<id>]`, `eval <id>`,
//! `import-prompts <file>`, `drain`, `reload-config`. A malformed or unknown command gets `{"ok": false,
//! "error": ...}` and changes nothing; every command, accepted or not, is recorded in `events` (refused lines
//! beyond a few per peer and minute as one summary row per minute, so a client cannot flood the table).
//! Files a command names are read only when they are regular files within a size cap and a read timeout, their
//! real path (symlinks resolved) inside the allowed folder; no error shows a file's bytes.

use crate::actors::Wake;
use crate::config::Config;
use crate::serve::Daemon;
use crate::store;
use crate::worker::{Priority, PRIORITIES};
use actix::prelude::*;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

mod audit;
mod import;

use audit::write_summaries;
pub use audit::{shown_line, RefusalAudit, REFUSALS_IN_FULL_PER_MINUTE};
use import::import_prompts;
pub use import::{
    read_named_file, FILE_READ_TIMEOUT, MAX_IMPORT, MAX_IMPORT_BYTES, MAX_IMPORT_IMAGE_BYTES,
    MAX_IMPORT_TOTAL_IMAGE_BYTES,
};

/// Longest command line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Control connections open at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a connection may stay silent before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// A parsed command.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Status,
    Pause,
    Resume,
    Iterate,
    Promote(i64),
    Rollback(Option<i64>),
    Eval(i64),
    ImportPrompts(PathBuf),
    Drain,
    ReloadConfig,
}

/// Parses one command line: `{"cmd": "promote", "id": 5}`. Unknown fields are refused too.
pub fn parse(line: &str) -> Result<Command> {
    let v: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not a JSON object: {e}"))?;
    let Some(obj) = v.as_object() else { bail!("expected a JSON object like {{\"cmd\": \"status\"}}") };
    let Some(cmd) = obj.get("cmd").and_then(|c| c.as_str()) else {
        bail!("missing \"cmd\" (a string: status, pause, resume, iterate, promote, rollback, eval, import-prompts, drain, reload-config)")
    };
    let allowed: &[&str] = match cmd {
        "promote" | "eval" | "rollback" => &["cmd", "id"],
        "import-prompts" => &["cmd", "file"],
        _ => &["cmd"],
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        bail!("{cmd}: unexpected field {k:?}");
    }
    let id = || -> Result<Option<i64>> {
        match obj.get("id") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_i64() {
                Some(i) if i > 0 => Ok(Some(i)),
                _ => bail!("{cmd}: \"id\" must be a positive integer checkpoint id (got {v})"),
            },
        }
    };
    let need = |x: Option<i64>| {
        x.ok_or_else(|| {
            anyhow::anyhow!("{cmd} needs \"id\": the checkpoint id (see `rlaifd ctl status` or the checkpoints table)")
        })
    };
    Ok(match cmd {
        "status" => Command::Status,
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "iterate" => Command::Iterate,
        "drain" => Command::Drain,
        "reload-config" => Command::ReloadConfig,
        "promote" => Command::Promote(need(id()?)?),
        "eval" => Command::Eval(need(id()?)?),
        "rollback" => Command::Rollback(id()?),
        "import-prompts" => {
            let Some(f) = obj.get("file").and_then(|f| f.as_str()).filter(|f| !f.is_empty()) else { bail!("import-prompts needs \"file\": the path of a JSONL prompts file") };
            if f.contains('\0') {
                bail!("import-prompts: the file name contains a NUL byte");
            }
            Command::ImportPrompts(PathBuf::from(f))
        }
        other => bail!("unknown command {other:?} (status, pause, resume, iterate, promote, rollback, eval, import-prompts, drain, reload-config)"),
    })
}

/// The Control actor: accepts connections on the socket; each connection is served by its own task.
pub struct Control {
    d: Arc<Daemon>,
    listener: Option<tokio::net::UnixListener>,
    wake: Recipient<Wake>,
}

/// Who sent a line: the peer's uid and pid (SO_PEERCRED).
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: u32,
    pub pid: Option<i32>,
}

impl Actor for Control {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(listener) = self.listener.take() else { return };
        let (d, wake) = (self.d.clone(), self.wake.clone());
        let audit = Arc::new(RefusalAudit::default());
        let open = Arc::new(AtomicUsize::new(0));
        let (flush_pool, flush_audit) = (d.pool.clone(), audit.clone());
        ctx.spawn(
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    write_summaries(&flush_pool, flush_audit.take_ended(Instant::now())).await;
                }
            }
            .into_actor(self),
        );
        ctx.spawn(
            async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let (d, wake, audit, open) = (d.clone(), wake.clone(), audit.clone(), open.clone());
                            actix::spawn(async move {
                                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                                    let mut stream = stream;
                                    let reply = json!({ "ok": false, "error": format!("too many control connections open ({MAX_CONNECTIONS}); retry later") });
                                    let _ = stream.write_all(format!("{reply}\n").as_bytes()).await;
                                } else if let Err(e) = connection(stream, &d, &wake, &audit).await {
                                    tracing::debug!(error = %e, "control connection ended");
                                }
                                open.fetch_sub(1, Ordering::SeqCst);
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "control socket accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        }
                    }
                }
            }
            .into_actor(self),
        );
    }
}

/// Binds the socket (mode 0660, group `control.group`) and starts the Control actor.
pub fn start(d: Arc<Daemon>, wake: Recipient<Wake>) -> Result<Addr<Control>> {
    let cfg = d.config();
    let path = cfg.socket_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            bail!("another rlaifd is listening on {} (stop it, or set control.socket elsewhere)", path.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot bind the control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot chmod 0660 {}", path.display()))?;
    if !cfg.control.group.is_empty() {
        let gid = crate::config::group_id(&cfg.control.group).with_context(|| {
            format!(
                "control.group {:?} is not a group of this system (`getent group NAME` lists it when it is)",
                cfg.control.group
            )
        })?;
        std::os::unix::fs::chown(&path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {}", path.display(), cfg.control.group))?;
    }
    tracing::info!(socket = %path.display(), "control socket listening");
    Ok(Control { d, listener: Some(listener), wake }.start())
}

/// Records a refused line in `events` (within the per-peer limit) and returns the reply.
async fn refuse(d: &Arc<Daemon>, audit: &RefusalAudit, peer: Peer, line: &[u8], error: String) -> Value {
    let error = shown_line(error.as_bytes());
    let (in_full, summary) = audit.note(peer.uid, &error, Instant::now());
    if let Some(s) = summary {
        write_summaries(&d.pool, vec![s]).await;
    }
    if in_full {
        let detail = json!({ "line": shown_line(line), "bytes": line.len(), "error": error, "peer_uid": peer.uid, "peer_pid": peer.pid });
        if let Err(e) = store::event(&d.pool, "control_rejected", "control", detail).await {
            tracing::warn!(error = %format!("{e:#}"), "a refused control line could not be recorded in events");
        }
    }
    json!({ "ok": false, "error": error })
}

async fn connection(
    stream: tokio::net::UnixStream,
    d: &Arc<Daemon>,
    wake: &Recipient<Wake>,
    audit: &RefusalAudit,
) -> Result<()> {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer { uid: c.uid(), pid: c.pid() },
        Err(_) => Peer { uid: u32::MAX, pid: None },
    };
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match tokio::time::timeout(IDLE_TIMEOUT, (&mut r).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf))
            .await
        {
            Ok(n) => n?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let too_long = buf.len() > MAX_LINE;
        let reply = if too_long {
            refuse(d, audit, peer, &buf, format!("command longer than {MAX_LINE} bytes")).await
        } else {
            match std::str::from_utf8(&buf) {
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) if line.contains('\0') => {
                    refuse(d, audit, peer, &buf, "the command holds a NUL byte".into()).await
                }
                Ok(line) => match parse(line.trim()) {
                    Err(e) => refuse(d, audit, peer, &buf, format!("{e:#}")).await,
                    Ok(cmd) => {
                        let (reply, stop) = handle_command(cmd, d, wake, peer).await;
                        if stop {
                            // Stop only once the reply is out: a daemon with nothing running exits within
                            // milliseconds, which used to close this connection before `drain` was answered.
                            w.write_all(format!("{reply}\n").as_bytes()).await?;
                            w.flush().await?;
                            d.stop.notify_one();
                            continue;
                        }
                        reply
                    }
                },
                Err(_) => refuse(d, audit, peer, &buf, "the command is not UTF-8 text".into()).await,
            }
        };
        w.write_all(format!("{reply}\n").as_bytes()).await?;
        if too_long {
            return Ok(());
        }
    }
}

/// Runs one parsed command and returns the reply, and whether the daemon should stop once it is sent (an
/// accepted `drain`); records the command in `events`.
pub async fn handle_command(cmd: Command, d: &Arc<Daemon>, wake: &Recipient<Wake>, peer: Peer) -> (Value, bool) {
    let r = execute(&cmd, d, wake).await;
    let stop = matches!(cmd, Command::Drain) && r.is_ok();
    let (detail, reply) = match r {
        Ok(mut v) => {
            v["ok"] = json!(true);
            (json!({ "command": format!("{cmd:?}"), "ok": true, "peer_uid": peer.uid, "peer_pid": peer.pid }), v)
        }
        Err(e) => {
            let error = shown_line(format!("{e:#}").as_bytes());
            (
                json!({ "command": shown_line(format!("{cmd:?}").as_bytes()), "ok": false, "error": error, "peer_uid": peer.uid, "peer_pid": peer.pid }),
                json!({ "ok": false, "error": format!("{e:#}") }),
            )
        }
    };
    if let Err(e) = store::event(&d.pool, "control", "control", detail).await {
        tracing::warn!(error = %format!("{e:#}"), "a control command could not be recorded in events");
    }
    tracing::info!(command = ?cmd, ok = reply["ok"].as_bool(), "control command");
    wake.do_send(Wake);
    (reply, stop)
}

async fn execute(cmd: &Command, d: &Arc<Daemon>, _wake: &Recipient<Wake>) -> Result<Value> {
    let pool = &d.pool;
    match cmd {
        Command::Status => status(d).await,
        Command::Pause => {
            store::set_loop_paused(&d.pool, true).await?;
            d.paused.store(true, Ordering::SeqCst);
            Ok(json!({ "paused": true }))
        }
        Command::Resume => {
            store::set_loop_paused(&d.pool, false).await?;
            d.paused.store(false, Ordering::SeqCst);
            Ok(json!({ "paused": false }))
        }
        Command::Iterate => {
            if store::loop_paused(pool).await? {
                bail!("the loop is paused: `resume` first");
            }
            if let Some(it) = store::open_iteration(pool).await? {
                bail!("iteration {} is already running (stage {})", it.number, it.stage);
            }
            store::request_iteration(pool).await?;
            Ok(json!({ "requested": true }))
        }
        Command::Promote(id) => {
            let c = store::checkpoint(pool, *id).await?;
            if c.status == store::CheckpointStatus::Promoted {
                bail!("checkpoint {id} is already promoted");
            }
            promote(d, &c, "control", &format!("promoted by control (was {})", c.status)).await
        }
        Command::Rollback(id) => {
            let current = store::promoted(pool).await?.context("no promoted checkpoint")?;
            let target = match id {
                Some(i) => *i,
                None => current.parent_id.with_context(|| {
                    format!("checkpoint {} is the base model: there is nothing to roll back to", current.id)
                })?,
            };
            if target == current.id {
                bail!("checkpoint {target} is the one being served");
            }
            let c = store::checkpoint(pool, target).await?;
            let v = promote(d, &c, "control", &format!("rollback from checkpoint {}", current.id)).await?;
            store::event(pool, "rollback", "control", json!({ "from": current.id, "to": target })).await?;
            Ok(v)
        }
        Command::Eval(id) => {
            let c = store::checkpoint(pool, *id).await?;
            let cfg = d.config();
            let m = crate::rlaif::evaluate(pool, &d.engine, &cfg.loop_, &c).await?;
            store::set_metrics(pool, c.id, &m).await?;
            Ok(json!({ "checkpoint": c.id, "metrics": m }))
        }
        Command::ImportPrompts(file) => import_prompts(d, file).await,
        Command::Drain => {
            // The caller wakes the shutdown after the reply is written.
            d.draining.store(true, Ordering::SeqCst);
            Ok(json!({ "draining": true }))
        }
        Command::ReloadConfig => reload(d),
    }
}

/// Makes `c` the promoted checkpoint (after checking its files load) and hot-swaps it in.
async fn promote(d: &Arc<Daemon>, c: &store::CheckpointRow, actor: &str, reason: &str) -> Result<Value> {
    // Every daemon must be able to fetch it (its stored files intact, or stored again from a good copy here), and a
    // copy with the recorded sha256 must load here: a checkpoint without is refused before anything changes.
    crate::rlaif::check_stored(&d.pool, &d.engine, c)
        .await
        .with_context(|| format!("checkpoint {} cannot be served; nothing changed", c.id))?;
    crate::rlaif::fetch_checkpoint(&d.pool, &d.engine, c)
        .await
        .with_context(|| format!("checkpoint {} cannot be loaded; nothing changed", c.id))?;
    let (e, row) = (d.engine.clone(), c.clone());
    d.engine
        .run(Priority::Serve, move |_| e.adapter(&row).map(|_| ()))
        .await
        .with_context(|| format!("checkpoint {} cannot be loaded; nothing changed", c.id))?;
    let metrics = c.metrics.clone().unwrap_or(json!({}));
    store::decide(&d.pool, c.id, true, &metrics, reason, actor).await?;
    let generation = d.hot_swap(&store::checkpoint(&d.pool, c.id).await?).await?;
    Ok(json!({ "promoted": c.id, "generation": generation }))
}

async fn status(d: &Arc<Daemon>) -> Result<Value> {
    let pool = &d.pool;
    let s = d.serving();
    let open = store::open_iteration(pool).await?;
    let last = store::last_iteration(pool).await?;
    let jobs = store::jobs_by_kind_and_status(pool, true).await?;
    let mut queues = json!({ "sample": { "pending": 0, "running": 0 }, "label": { "pending": 0, "running": 0 } });
    for (k, st, n) in jobs {
        queues[k][st] = json!(n);
    }
    let engine_queue: serde_json::Map<String, Value> =
        PRIORITIES.iter().zip(d.engine.worker.depths()).map(|(p, n)| (p.name().to_string(), json!(n))).collect();
    let last_decided = store::last_decision(pool).await?;
    let actors = d.actors.lock().map(|a| serde_json::to_value(&*a).unwrap_or_default()).unwrap_or_default();
    Ok(json!({
        "iteration": last.as_ref().map(|l| l.0),
        "stage": if d.draining.load(Ordering::SeqCst) { "draining".to_string() } else if d.paused.load(Ordering::SeqCst) { "paused".to_string() } else { open.as_ref().map_or("idle".to_string(), |i| i.stage.to_string()) },
        "open_iteration": open.as_ref().map(|i| json!({ "number": i.number, "stage": i.stage, "policy": i.policy_id, "candidate": i.candidate_id })),
        "paused": d.paused.load(Ordering::SeqCst),
        "queues": queues,
        "engine_queue": engine_queue,
        "current": { "checkpoint": s.checkpoint.id, "generation": s.generation, "metrics": s.checkpoint.metrics, "lineage": s.lineage },
        "candidate": open.as_ref().and_then(|i| i.candidate_id),
        "last_decision": last_decided.map(|(id, st, m)| json!({ "checkpoint": id, "status": st, "metrics": m })),
        "actors": actors,
        "uptime_s": d.started.elapsed().as_secs_f64(),
        "device": d.engine.model.device(),
    }))
}

/// Re-reads the configuration; applies [loop], [daemon], [log] and the server's limits and token. Keys that need
/// a restart are listed, except `server.bind` and `server.workers`: a change to them is refused whole, and so is
/// any configuration that would not pass its checks on the address the server still listens on (an empty or
/// short token off loopback). An invalid or refused file changes nothing.
fn reload(d: &Arc<Daemon>) -> Result<Value> {
    let mut new = Config::load(d.config_file.as_deref())
        .context("reload-config: the configuration is invalid; nothing changed")?;
    let old = d.config();
    new.state.dir = old.state.dir.clone();
    new.model.path = old.model.path.clone();
    if new.server.bind != old.server.bind || new.server.workers != old.server.workers {
        bail!(
            "reload-config: server.bind/server.workers changed ({} with {} workers -> {} with {} workers); the listener cannot change while running, so nothing changed: restart the daemon to apply it (or restore the old values to reload the rest)",
            old.server.bind,
            old.server.workers,
            new.server.bind,
            new.server.workers
        );
    }
    let mut restart = Vec::new();
    if new.database != old.database {
        restart.push("database");
    }
    if new.control != old.control {
        restart.push("control");
    }
    if new.model.device != old.model.device {
        restart.push("model.device");
        new.model.device = old.model.device.clone();
    }
    if new.model.devices != old.model.devices {
        restart.push("model.devices");
        new.model.devices = old.model.devices.clone();
    }
    if new.loop_.labeler != old.loop_.labeler {
        restart.push("loop.labeler");
        new.loop_.labeler = old.loop_.labeler.clone();
    }
    if new.server.max_request_mb != old.server.max_request_mb {
        restart.push("server.max_request_mb");
    }
    // The actors a daemon runs follow its roles at start.
    if new.daemon.roles != old.daemon.roles {
        restart.push("daemon.roles");
        new.daemon.roles = old.daemon.roles.clone();
    }
    let mut applied = new.clone();
    applied.database = old.database.clone();
    applied.control = old.control.clone();
    applied.server.max_request_mb = old.server.max_request_mb;
    // What would be in force, checked against the listener that stays: never weaker than the checks at start.
    applied
        .validate()
        .context("reload-config: the configuration would not be safe on the running listener; nothing changed")?;
    let changed = applied != old;
    match d.cfg.write() {
        Ok(mut c) => *c = applied,
        Err(p) => *p.into_inner() = applied,
    }
    Ok(json!({ "changed": changed, "restart_required": restart }))
}

/// `rlaifd ctl`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct CtlArgs {
    /// The control socket (default: control.socket of the configuration).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Configuration file to find the socket in (default: /etc/rlaifd/rlaifd.toml when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// status | pause | resume | iterate | promote ID | rollback [ID] | eval ID | import-prompts FILE | drain | reload-config
    #[arg(required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// The JSON line for a command given as words.
pub fn command_line(words: &[String]) -> Result<String> {
    let (cmd, rest) = words.split_first().context("no command given")?;
    let id = |s: &str| -> Result<i64> {
        s.parse::<i64>().ok().filter(|i| *i > 0).with_context(|| format!("{cmd}: {s:?} is not a checkpoint id"))
    };
    let v = match (cmd.as_str(), rest) {
        ("promote" | "eval", [i]) => json!({ "cmd": cmd, "id": id(i)? }),
        ("rollback", []) => json!({ "cmd": cmd }),
        ("rollback", [i]) => json!({ "cmd": cmd, "id": id(i)? }),
        ("import-prompts", [f]) => {
            let p = std::fs::canonicalize(f).with_context(|| format!("import-prompts: cannot find {f}"))?;
            json!({ "cmd": cmd, "file": p.display().to_string() })
        }
        ("status" | "pause" | "resume" | "iterate" | "drain" | "reload-config", []) => json!({ "cmd": cmd }),
        _ => bail!("usage: rlaifd ctl status | pause | resume | iterate | promote ID | rollback [ID] | eval ID | import-prompts FILE | drain | reload-config"),
    };
    Ok(v.to_string())
}

/// Sends one command and prints the reply; Err when the daemon answered `ok: false`.
pub fn ctl(a: CtlArgs) -> Result<()> {
    let socket = match &a.socket {
        Some(s) => s.clone(),
        None => Config::load(a.config.as_deref())?.socket_path(),
    };
    let line = command_line(&a.command)?;
    let mut s = std::os::unix::net::UnixStream::connect(&socket).with_context(|| {
        format!("cannot connect to {} (is rlaifd running? --socket names another socket)", socket.display())
    })?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut reply)
        .with_context(|| format!("reading the reply from {}", socket.display()))?;
    let v: Value =
        serde_json::from_str(reply.trim()).with_context(|| format!("the daemon's reply is not JSON: {reply:?}"))?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    if v["ok"].as_bool() != Some(true) {
        bail!("{}", v["error"].as_str().unwrap_or("the command failed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_malformed_ones_are_named() {
        assert_eq!(parse(r#"{"cmd":"status"}"#).unwrap(), Command::Status);
        assert_eq!(parse(r#"{"cmd":"promote","id":5}"#).unwrap(), Command::Promote(5));
        assert_eq!(parse(r#"{"cmd":"rollback"}"#).unwrap(), Command::Rollback(None));
        assert_eq!(
            parse(r#"{"cmd":"import-prompts","file":"/x/p.jsonl"}"#).unwrap(),
            Command::ImportPrompts("/x/p.jsonl".into())
        );
        for (line, needle) in [
            ("status", "not a JSON object"),
            ("[1]", "expected a JSON object"),
            (r#"{"command":"status"}"#, "missing \"cmd\""),
            (r#"{"cmd":"launch"}"#, "unknown command \"launch\""),
            (r#"{"cmd":"promote"}"#, "needs \"id\""),
            (r#"{"cmd":"promote","id":"5; DROP TABLE checkpoints"}"#, "positive integer"),
            (r#"{"cmd":"eval","id":-1}"#, "positive integer"),
            (r#"{"cmd":"pause","id":1}"#, "unexpected field \"id\""),
            (r#"{"cmd":"import-prompts"}"#, "needs \"file\""),
        ] {
            let e = format!("{:#}", parse(line).unwrap_err());
            assert!(e.contains(needle), "{line}: {e}");
        }
        assert_eq!(command_line(&["promote".into(), "7".into()]).unwrap(), r#"{"cmd":"promote","id":7}"#);
        assert_eq!(shown_line(b"{\"cmd\":\"a\0b\"}\n"), "{\"cmd\":\"a\\u{0000}b\"}");
        assert_eq!(shown_line(b"x\xffy"), "x\u{fffd}y");
        assert!(command_line(&["promote".into()]).is_err());
        assert!(command_line(&["promote".into(), "x".into()]).is_err());
    }
}
