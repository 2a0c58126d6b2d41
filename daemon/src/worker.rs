//! The engine thread: one OS thread per device owns the model math and runs tasks by priority — serving first,
//! then sampling/labeling/evaluation, then training. A long task (training, evaluation) runs in slices: between
//! its steps it calls [`Slice::yield_to_urgent`], which runs every queued task more urgent than itself, so a chat
//! request waits at most one training step. Nothing heavy runs on the async runtime.

use anyhow::{anyhow, Result};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

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
        loop {
            let next = {
                let Ok(mut q) = self.inner.queue.lock() else { return };
                match q.0.peek() {
                    Some(e) if e.prio < self.prio => q.0.pop(),
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
    let slice = Slice { inner, prio: e.prio };
    (e.task)(&slice);
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
        });
        let i = inner.clone();
        let spawned = std::thread::Builder::new().name(name.to_string()).spawn(move || loop {
            let entry = {
                let Ok(mut q) = i.queue.lock() else { return };
                loop {
                    if let Some(e) = q.0.pop() {
                        break e;
                    }
                    if q.1 {
                        return;
                    }
                    q = match i.ready.wait(q) {
                        Ok(q) => q,
                        Err(_) => return,
                    };
                }
            };
            run_entry(&i, entry);
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
    pub async fn run<T: Send + 'static>(&self, prio: Priority, f: impl FnOnce(&Slice) -> Result<T> + Send + 'static) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task: Task = Box::new(move |s: &Slice| {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(s))).unwrap_or_else(|p| {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
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
            q.0.push(Entry { prio, seq, task });
        }
        self.inner.ready.notify_one();
        rx.await.map_err(|_| anyhow!("the engine thread dropped a task"))?
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
}
