//! systemd's notification protocol (`Type=notify`) through the `sd-notify` crate: READY, STATUS, STOPPING and
//! WATCHDOG to `$NOTIFY_SOCKET` (a path; an abstract `@name` too, see `send`). Without that variable (not under systemd) every
//! call does nothing; a failed send is logged, never fatal.

use sd_notify::NotifyState;
use std::time::Duration;

fn send(states: &[NotifyState]) {
    let sent = match std::env::var("NOTIFY_SOCKET") {
        // sd-notify 0.5 connects to a path only; an abstract socket (`@name`, used by some container managers)
        // gets the same datagram (the crate's own formatting) through std's abstract address.
        Ok(path) if path.starts_with('@') => send_abstract(&path[1..], states),
        _ => sd_notify::notify(states),
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "could not notify systemd");
    }
}

fn send_abstract(name: &str, states: &[NotifyState]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    std::os::unix::net::UnixDatagram::unbound()?.send_to_addr(msg.as_bytes(), &addr).map(|_| ())
}

/// Start-up finished.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status), NotifyState::MainPid(std::process::id())]);
}

/// A one-line status shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Pings the watchdog every half of `$WATCHDOG_USEC` while the returned guard lives (nothing when unset), but
/// only for a period in which the engine thread answered a heartbeat (`Worker::heartbeat`): a stuck engine
/// thread or device stops the pings, and systemd restarts the daemon after `WatchdogSec`.
pub fn spawn_watchdog(engines: Vec<crate::worker::Worker>) -> Option<tokio::task::JoinHandle<()>> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    Some(actix::spawn(async move {
        let mut stuck_since: Option<std::time::Instant> = None;
        loop {
            // Every device's engine thread must answer (one hung GPU is a hung daemon).
            let asked: Vec<u64> = engines.iter().map(|e| e.heartbeat()).collect();
            tokio::time::sleep(every).await;
            if engines.iter().zip(&asked).all(|(e, a)| e.answered(*a)) {
                send(&[NotifyState::Watchdog]);
                if let Some(t) = stuck_since.take() {
                    tracing::warn!(
                        stuck_s = t.elapsed().as_secs_f64(),
                        "the engine thread answers heartbeats again; watchdog pings resumed"
                    );
                    status("engine thread answering again");
                }
            } else if stuck_since.is_none() {
                stuck_since = Some(std::time::Instant::now());
                tracing::error!(wait_s = every.as_secs_f64(), "the engine thread did not answer a heartbeat; watchdog pings stopped (systemd restarts the daemon after WatchdogSec unless it recovers)");
                status("engine thread not answering heartbeats: watchdog pings stopped");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn notifications_reach_a_path_or_an_abstract_notify_socket() {
        let dir = std::env::temp_dir().join(format!("rlaifd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        listener.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        super::ready("serving checkpoint 1");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(msg.contains("READY=1") && msg.contains("STATUS=serving checkpoint 1"), "{msg}");
        std::fs::remove_dir_all(&dir).ok();
        // An abstract socket (`@name`), as some container managers give.
        use std::os::linux::net::SocketAddrExt;
        let name = format!("rlaifd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        listener.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        super::stopping("draining");
        std::env::remove_var("NOTIFY_SOCKET");
        let n = listener.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(msg.contains("STOPPING=1") && msg.contains("STATUS=draining"), "{msg}");
    }
}
