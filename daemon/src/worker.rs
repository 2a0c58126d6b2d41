//! The engine thread: one OS thread per device owns the model math and runs tasks by priority — serving first,
//! then sampling/labeling/evaluation, then training. A long task (training, evaluation) runs in slices: between
//! its steps it calls [`Slice::yield_to_urgent`], which runs every queued task more urgent than itself, so a chat
//! request waits at most one training step. Nothing heavy runs on the async runtime.
//!
//! The thread installs an `engine::interrupt` hook: at every interruption point of the engine's loops (each
//! layer, each decode step) it answers the watchdog's heartbeat, and it stops the running task when that task's
//! deadline passed or the caller stopped waiting for it (a client that went away).

use anyhow::{anyhow, Result};
use std::cell::RefCell;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lower runs first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Serve = 0,
    Feedback = 1,
    Train = 2,
}

pub const PRIORITIES: [Priority; 3] = [Priority::Serve, Priority::Feedback, Priority::Train];

impl Priority {
    pub fn name(self) -> &'static str {
        match self {
            Priority::Serve => "serve",
            Priority::Feedback => "feedback",
            Priority::Train => "train",
        }
    }
}

type Task = Box<dyn FnOnce(&Slice) + Send>;

struct Entry {
    prio: Priority,
    seq: u64,
    task: Task,
    limits: TaskLimits,
}

/// When a task must stop at its next interruption point.
#[derive(Clone)]
struct TaskLimits {
    /// The deadline and the budget it came from (for the message).
    deadline: Option<(Instant, Duration)>,
    /// Set when the caller stopped waiting (its future was dropped).
    abandoned: Arc<AtomicBool>,
}

thread_local! {
    /// The limits of the tasks running on this thread, innermost last (`yield_to_urgent` nests tasks).
    static RUNNING: RefCell<Vec<TaskLimits>> = const { RefCell::new(Vec::new()) };
}

/// The engine thread's `engine::interrupt` hook.
struct Hook {
    inner: Arc<Inner>,
}

impl engine::interrupt::Hook for Hook {
    fn beat(&self) {
        self.inner.answer_heartbeat();
    }
    fn stop_reason(&self) -> Option<String> {
        RUNNING.with(|r| {
            let r = r.try_borrow().ok()?;
            let top = r.last()?;
            if top.abandoned.load(Ordering::Relaxed) {
                return Some("the caller stopped waiting for this task (the client went away)".into());
            }
            match top.deadline {
                Some((at, budget)) if Instant::now() >= at => {
                    Some(format!("the request ran past its time budget of {:.1} s", budget.as_secs_f64()))
                }
                _ => None,
            }
        })
    }
}

/// Sets the abandoned flag when the waiting future is dropped before its task finished.
struct AbandonOnDrop(Arc<AtomicBool>, bool);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.prio, self.seq) == (o.prio, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    // BinaryHeap pops the greatest: the most urgent priority, then the oldest.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.prio, o.seq).cmp(&(self.prio, self.seq))
    }
}

struct Inner {
    queue: Mutex<(BinaryHeap<Entry>, bool)>,
    ready: Condvar,
    seq: AtomicU64,
    queued: [AtomicUsize; 3],
    done: [AtomicU64; 3],
    running: AtomicUsize,
    /// Heartbeats asked for by the watchdog, and the last one the thread answered.
    beats_asked: AtomicU64,
    beats_answered: AtomicU64,
}

impl Inner {
    fn answer_heartbeat(&self) {
        self.beats_answered.fetch_max(self.beats_asked.load(Ordering::Acquire), Ordering::AcqRel);
    }
}

/// Handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

/// What a running task may do: let more urgent queued tasks run now.
pub struct Slice<'a> {
    inner: &'a Inner,
    prio: Priority,
}

impl Slice<'_> {
    /// Runs every queued task strictly more urgent than the current one, on this thread, then returns.
    pub fn yield_to_urgent(&self) {
        self.run_queued(|p| p < self.prio);
    }

    /// Runs every queued task at least as urgent as the current one (a task that runs as long as work keeps
    /// coming, like the serving batch, lets its peers in between its steps: a hot-swap's adapter load, a best-of-N
    /// request), then returns.
    pub fn yield_to_peers(&self) {
        self.run_queued(|p| p <= self.prio);
    }

    fn run_queued(&self, runs: impl Fn(Priority) -> bool) {
        self.inner.answer_heartbeat();
        loop {
            let next = {
                let Ok(mut q) = self.inner.queue.lock() else { return };
                match q.0.peek() {
                    Some(e) if runs(e.prio) => q.0.pop(),
                    _ => None,
                }
            };
            match next {
                Some(e) => run_entry(self.inner, e),
                None => return,
            }
        }
    }
}

fn run_entry(inner: &Inner, e: Entry) {
    inner.queued[e.prio as usize].fetch_sub(1, Ordering::Relaxed);
    inner.running.fetch_add(1, Ordering::Relaxed);
    inner.answer_heartbeat();
    RUNNING.with(|r| r.borrow_mut().push(e.limits));
    let slice = Slice { inner, prio: e.prio };
    (e.task)(&slice);
    RUNNING.with(|r| r.borrow_mut().pop());
    inner.answer_heartbeat();
    inner.running.fetch_sub(1, Ordering::Relaxed);
    inner.done[e.prio as usize].fetch_add(1, Ordering::Relaxed);
}

impl Worker {
    /// Starts the engine thread.
    pub fn start(name: &str) -> Worker {
        let inner = Arc::new(Inner {
            queue: Mutex::new((BinaryHeap::new(), false)),
            ready: Condvar::new(),
            seq: AtomicU64::new(0),
            queued: Default::default(),
            done: Default::default(),
            running: AtomicUsize::new(0),
            beats_asked: AtomicU64::new(0),
            beats_answered: AtomicU64::new(0),
        });
        let i = inner.clone();
        let spawned = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            engine::interrupt::set_hook(Some(Box::new(Hook { inner: i.clone() })));
            loop {
                let entry = {
                    let Ok(mut q) = i.queue.lock() else { return };
                    loop {
                        if let Some(e) = q.0.pop() {
                            break e;
                        }
                        if q.1 {
                            return;
                        }
                        // Idle: answer the heartbeat asked for (`heartbeat` notifies under this lock).
                        i.answer_heartbeat();
                        q = match i.ready.wait(q) {
                            Ok(q) => q,
                            Err(_) => return,
                        };
                    }
                };
                run_entry(&i, entry);
            }
        });
        if let Err(e) = spawned {
            // Without a thread every task would hang: fail them instead.
            eprintln!("rlaifd: cannot start the engine thread: {e}");
            if let Ok(mut q) = inner.queue.lock() {
                q.1 = true;
            }
        }
        Worker { inner }
    }

    /// Runs `f` on the engine thread at `prio` and waits for its result. A panic in `f` becomes an error.
    pub async fn run<T: Send + 'static>(
        &self,
        prio: Priority,
        f: impl FnOnce(&Slice) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.run_within(prio, None, f).await
    }

    /// `run` with a time budget counted from now (queueing included): the task stops at its next interruption
    /// point once it is spent (`engine::EngineError::Interrupted`). Dropping the returned future stops the task
    /// the same way.
    pub async fn run_within<T: Send + 'static>(
        &self,
        prio: Priority,
        budget: Option<Duration>,
        f: impl FnOnce(&Slice) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let abandoned = Arc::new(AtomicBool::new(false));
        let limits = TaskLimits { deadline: budget.map(|b| (Instant::now() + b, b)), abandoned: abandoned.clone() };
        let mut guard = AbandonOnDrop(abandoned, false);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task: Task = Box::new(move |s: &Slice| {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(s))).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(anyhow!("engine task panicked: {msg}"))
            });
            let _ = tx.send(r);
        });
        {
            let mut q = self.inner.queue.lock().map_err(|_| anyhow!("engine queue poisoned"))?;
            if q.1 {
                return Err(anyhow!("the engine thread has stopped"));
            }
            self.inner.queued[prio as usize].fetch_add(1, Ordering::Relaxed);
            let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
            q.0.push(Entry { prio, seq, task, limits });
        }
        self.inner.ready.notify_one();
        let r = rx.await.map_err(|_| anyhow!("the engine thread dropped a task"));
        guard.1 = true;
        r?
    }

    /// Asks the engine thread for a heartbeat and returns its number: the thread answers it when idle, between
    /// tasks and at every interruption point of the running task (`answered`).
    pub fn heartbeat(&self) -> u64 {
        let n = self.inner.beats_asked.fetch_add(1, Ordering::AcqRel) + 1;
        // Under the queue lock: an idle thread is either waiting (and is woken) or has not yet answered.
        if let Ok(_q) = self.inner.queue.lock() {
            self.inner.ready.notify_all();
        }
        n
    }

    /// Answers the heartbeats asked so far on the engine thread's behalf: for work on its device that runs on
    /// another thread and keeps the engine thread waiting for the device (a data-parallel training rank, once per
    /// optimizer step).
    pub fn vouch(&self) {
        self.inner.answer_heartbeat();
    }

    /// Whether the thread answered heartbeat `n` (or a later one).
    pub fn answered(&self, n: u64) -> bool {
        self.inner.beats_answered.load(Ordering::Acquire) >= n
    }

    /// Tasks waiting, per priority (serve, feedback, train).
    pub fn depths(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| self.inner.queued[i].load(Ordering::Relaxed))
    }

    /// Tasks finished, per priority.
    pub fn done(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.inner.done[i].load(Ordering::Relaxed))
    }

    /// Stops the thread once the queue is empty; later `run` calls fail.
    pub fn close(&self) {
        if let Ok(mut q) = self.inner.queue.lock() {
            q.1 = true;
        }
        self.inner.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn urgent_tasks_run_between_the_slices_of_a_long_one_and_panics_become_errors() {
        let w = Worker::start("test-engine");
        let order = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(AtomicBool::new(false));
        let (o, s) = (order.clone(), started.clone());
        // A long "training" task of 40 slices of 5 ms.
        let long = tokio::spawn({
            let w = w.clone();
            async move {
                w.run(Priority::Train, move |slice| {
                    s.store(true, Ordering::SeqCst);
                    for i in 0..40 {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        o.lock().unwrap().push(format!("train{i}"));
                        slice.yield_to_urgent();
                    }
                    Ok(())
                })
                .await
            }
        });
        while !started.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let o = order.clone();
        w.run(Priority::Serve, move |_| {
            o.lock().unwrap().push("serve".into());
            Ok(())
        })
        .await
        .unwrap();
        long.await.unwrap().unwrap();
        let order = order.lock().unwrap().clone();
        let at = order.iter().position(|x| x == "serve").unwrap();
        assert!(at < 39, "the serve task ran inside the training task, not after it: {order:?}");
        let e = w.run(Priority::Feedback, |_| -> Result<()> { panic!("boom") }).await.unwrap_err();
        assert!(format!("{e}").contains("boom"));
        assert_eq!(w.run(Priority::Feedback, |_| Ok(7)).await.unwrap(), 7, "the thread survives a panic");
        w.close();
        assert!(w.run(Priority::Serve, |_| Ok(())).await.is_err());
    }

    /// A task that runs until an interruption point stops it (at most 10 s).
    fn until_stopped(flag: Arc<AtomicBool>) -> impl FnOnce(&Slice) -> Result<()> + Send + 'static {
        move |_| {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Err(e) = engine::interrupt::check() {
                    flag.store(true, Ordering::SeqCst);
                    return Err(e.into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_stops_at_its_deadline_or_when_its_caller_leaves_and_heartbeats_are_answered_meanwhile() {
        let w = Worker::start("test-engine-limits");
        let stopped = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let e = w
            .run_within(Priority::Serve, Some(Duration::from_millis(100)), until_stopped(stopped.clone()))
            .await
            .unwrap_err();
        let took = t0.elapsed();
        assert!(format!("{e}").contains("time budget of 0.1 s"), "{e}");
        assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(5), "{took:?}");
        // The caller gives up after 50 ms: the task stops at its next check, and the thread takes new work.
        let stopped = Arc::new(AtomicBool::new(false));
        let waiting =
            tokio::time::timeout(Duration::from_millis(50), w.run(Priority::Train, until_stopped(stopped.clone())))
                .await;
        assert!(waiting.is_err());
        let t0 = Instant::now();
        assert_eq!(w.run(Priority::Serve, |_| Ok(5)).await.unwrap(), 5);
        assert!(stopped.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(5));
        // Heartbeats: answered by an idle thread, by a task at its interruption points, never by a stuck one.
        let n = w.heartbeat();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(w.answered(n), "idle");
        let busy = tokio::spawn({
            let w = w.clone();
            async move {
                w.run_within(
                    Priority::Train,
                    Some(Duration::from_millis(300)),
                    until_stopped(Arc::new(AtomicBool::new(false))),
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = w.heartbeat();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(w.answered(n), "busy, at its interruption points");
        assert!(busy.await.unwrap().is_err());
        let stuck = tokio::spawn({
            let w = w.clone();
            async move {
                w.run(Priority::Serve, |_| {
                    std::thread::sleep(Duration::from_millis(400));
                    Ok(())
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = w.heartbeat();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!w.answered(n), "a task with no interruption point cannot answer");
        stuck.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(w.answered(n), "answered once it returned");
        w.close();
    }
}
