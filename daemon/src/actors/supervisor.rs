//! The loop's actors: one per role (Sampler, Labeler, Trainer, Checkpointer), each claiming its work from
//! PostgreSQL one item at a time, under an actix Supervisor that restarts a failed actor with backoff and fans
//! LISTEN/NOTIFY wake-ups out to them.

use super::steps::step;
use crate::serve::Daemon;
use crate::store::{self};
use actix::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn, Instrument};

/// The roles of the loop's actors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Sampler,
    Labeler,
    Trainer,
    Checkpointer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Sampler => "sampler",
            Role::Labeler => "labeler",
            Role::Trainer => "trainer",
            Role::Checkpointer => "checkpointer",
        }
    }
}

/// Wakes an actor now (LISTEN/NOTIFY, a control command, or its own poll).
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Wake;

/// One loop actor: claims and runs the work of its role, one item at a time, until none is left, then waits for a
/// wake-up. An error stops it; the actix Supervisor restarts it after a backoff.
pub struct LoopActor {
    role: Role,
    /// Which engine (device) a Sampler or Labeler runs its jobs on; the others use the first.
    engine: usize,
    /// The name in `status` and logs: the role, and the engine when it is not the first ("sampler:1").
    name: &'static str,
    d: Arc<Daemon>,
    busy: bool,
    failures: u32,
    not_before: Instant,
    /// After a restart: return this role's jobs still leased to this daemon before claiming new ones (the failed
    /// attempt may have been unable to record its failure, e.g. with the database down).
    reclaim: bool,
}

impl LoopActor {
    pub fn new(role: Role, engine: usize, name: &'static str, d: Arc<Daemon>) -> LoopActor {
        LoopActor { role, engine, name, d, busy: false, failures: 0, not_before: Instant::now(), reclaim: false }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy || Instant::now() < self.not_before || self.d.stopped.load(Ordering::SeqCst) {
            return;
        }
        self.busy = true;
        let (role, engine, d, reclaim) = (self.role, self.engine, self.d.clone(), std::mem::take(&mut self.reclaim));
        d.actor(self.name, |a| a.busy = true);
        let span = tracing::info_span!("actor", role = self.name);
        let fut = async move {
            if reclaim {
                let kind = match role {
                    Role::Sampler => store::JobKind::Sample,
                    Role::Labeler => store::JobKind::Label,
                    Role::Trainer => store::JobKind::Train,
                    Role::Checkpointer => store::JobKind::Gate,
                };
                // Each engine's sample and label jobs are leased under its own owner name (`Daemon::owner_of`).
                let n = store::release_kind_leases(&d.pool, &d.owner_of(engine), kind).await?;
                if n > 0 {
                    info!(jobs = n, kind = kind.as_str(), "returned jobs left leased by the failed attempt");
                }
            }
            step(role, engine, &d).await
        }
        .instrument(span);
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            act.busy = false;
            act.d.actor(act.name, |a| a.busy = false);
            match res {
                Ok(true) => {
                    act.failures = 0;
                    act.d.actor(act.name, |a| a.jobs_done += 1);
                    ctx.notify(Wake);
                }
                Ok(false) => act.failures = 0,
                Err(e) => {
                    let msg = format!("{e:#}");
                    error!(actor = act.name, error = %msg, "actor failed; the supervisor restarts it");
                    act.d.actor(act.name, |a| a.last_error = Some(msg.clone()));
                    let (pool, name) = (act.d.pool.clone(), act.name);
                    actix::spawn(async move {
                        let _ = store::event(&pool, "actor_failed", name, serde_json::json!({ "error": msg })).await;
                    });
                    ctx.stop();
                }
            }
        }));
    }
}

impl Actor for LoopActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let poll = Duration::from_secs_f64(self.d.config().daemon.poll_s);
        ctx.run_interval(poll, |act, ctx| act.tick(ctx));
        ctx.notify(Wake);
    }
}

impl Supervised for LoopActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.failures += 1;
        self.busy = false;
        self.reclaim = true;
        // 1 s, 2 s, 4 s ... at most 60 s.
        let backoff = Duration::from_secs(1u64 << self.failures.min(6)).min(Duration::from_secs(60));
        self.not_before = Instant::now() + backoff;
        self.d.actor(self.name, |a| a.restarts += 1);
        warn!(actor = self.name, restarts = self.failures, backoff_s = backoff.as_secs(), "restarting actor");
    }
}

impl Handler<Wake> for LoopActor {
    type Result = ();
    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        self.tick(ctx);
    }
}

/// The Supervisor: starts the loop actors under actix supervision, fans wake-ups out to them and listens to
/// PostgreSQL notifications.
pub struct Supervisor {
    d: Arc<Daemon>,
    actors: Vec<Addr<LoopActor>>,
}

impl Supervisor {
    pub fn new(d: Arc<Daemon>) -> Supervisor {
        Supervisor { d, actors: Vec::new() }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Which actors run follows daemon.roles: the checkpointer follows the promoted checkpoint (serve) and gates
        // candidates (gate); the others take their role's jobs.
        let cfg = self.d.config();
        let has = |r: &str| cfg.daemon.has_role(r);
        for role in [Role::Checkpointer, Role::Sampler, Role::Labeler, Role::Trainer] {
            let wanted = match role {
                Role::Checkpointer => has("serve") || has("gate"),
                Role::Sampler => has("sample"),
                Role::Labeler => has("label"),
                Role::Trainer => has("train"),
            };
            if !wanted {
                continue;
            }
            // Sampling and labeling run on every device; the trainer and the checkpointer on the first.
            let engines = if matches!(role, Role::Sampler | Role::Labeler) { self.d.engines.len() } else { 1 };
            for engine in 0..engines {
                let name: &'static str = if engine == 0 {
                    role.name()
                } else {
                    Box::leak(format!("{}:{engine}", role.name()).into_boxed_str())
                };
                let d = self.d.clone();
                self.d.actor(name, |_| {});
                self.actors.push(actix::Supervisor::start(move |_| LoopActor::new(role, engine, name, d)));
            }
        }
        // LISTEN/NOTIFY: the schema's triggers notify channel `rlaifd` on new jobs, pairs and checkpoints.
        let (d, me) = (self.d.clone(), ctx.address());
        ctx.spawn(
            async move {
                loop {
                    match sqlx::postgres::PgListener::connect_with(&d.pool).await {
                        Ok(mut l) => {
                            if l.listen("rlaifd").await.is_ok() {
                                while let Ok(_n) = l.recv().await {
                                    me.do_send(Wake);
                                }
                            }
                        }
                        Err(e) => warn!(error = %e, "LISTEN failed; polling only, retrying in 5 s"),
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
            .into_actor(self),
        );
    }
}

impl Handler<Wake> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: Wake, _: &mut Context<Self>) {
        for a in &self.actors {
            a.do_send(Wake);
        }
    }
}
