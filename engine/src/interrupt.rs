//! Interruption points in long model work. The engine's loops call [`beat`] once per layer of a forward or
//! backward pass and [`check`] once per decode step; the thread that runs them may install a [`Hook`] that
//! answers a watchdog's heartbeat at every point and, at every check, says whether the work must stop (a
//! request's deadline passed, its client went away). A thread without a hook runs as if none of this existed.
//!
//! A thread-local hook rather than an argument threaded through every forward: the points sit deep in the
//! layer loops, and which task is running is known only to the thread's scheduler (the daemon's engine worker).

use crate::error::{EngineError, Result};
use std::cell::RefCell;

/// What a thread does at the interruption points.
pub trait Hook {
    /// Called at every point: the thread is alive and making progress.
    fn beat(&self);
    /// Called at every check: Some(reason) stops the current work with `EngineError::Interrupted(reason)`.
    fn stop_reason(&self) -> Option<String>;
}

thread_local! {
    static HOOK: RefCell<Option<Box<dyn Hook>>> = const { RefCell::new(None) };
}

/// Installs `hook` for the calling thread (None removes it).
pub fn set_hook(hook: Option<Box<dyn Hook>>) {
    HOOK.with(|h| *h.borrow_mut() = hook);
}

/// A progress point: answers a pending heartbeat. Cheap when no hook is installed.
pub fn beat() {
    HOOK.with(|h| {
        if let Ok(h) = h.try_borrow() {
            if let Some(h) = h.as_ref() {
                h.beat();
            }
        }
    });
}

/// A point where the work may stop: answers a pending heartbeat, then Err when the hook says to stop.
pub fn check() -> Result<()> {
    HOOK.with(|h| {
        let Ok(h) = h.try_borrow() else { return Ok(()) };
        let Some(h) = h.as_ref() else { return Ok(()) };
        h.beat();
        match h.stop_reason() {
            Some(reason) => Err(EngineError::Interrupted(reason)),
            None => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    struct Counting {
        beats: Rc<Cell<u32>>,
        stop_after: u32,
    }
    impl Hook for Counting {
        fn beat(&self) {
            self.beats.set(self.beats.get() + 1);
        }
        fn stop_reason(&self) -> Option<String> {
            (self.beats.get() > self.stop_after).then(|| "deadline".to_string())
        }
    }

    #[test]
    fn points_do_nothing_without_a_hook_and_stop_when_the_hook_says_so() {
        beat();
        assert!(check().is_ok());
        let beats = Rc::new(Cell::new(0));
        set_hook(Some(Box::new(Counting { beats: beats.clone(), stop_after: 2 })));
        beat();
        assert!(check().is_ok());
        let e = check().unwrap_err();
        assert!(matches!(e, EngineError::Interrupted(ref r) if r == "deadline"), "{e}");
        assert_eq!(beats.get(), 3);
        set_hook(None);
        assert!(check().is_ok());
    }
}
