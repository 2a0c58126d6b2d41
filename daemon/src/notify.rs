//! systemd's notification protocol (`Type=notify`): READY, STATUS, STOPPING and WATCHDOG datagrams to
//! `$NOTIFY_SOCKET`. Without that variable (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn send(msg: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let _ = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        match std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()) {
            Ok(addr) => sock.send_to_addr(msg.as_bytes(), &addr),
            Err(e) => Err(e),
        }
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
}

/// Start-up finished.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}\nMAINPID={}", std::process::id()));
}

/// A one-line status shown by `systemctl status`.
pub fn status(status: &str) {
    send(&format!("STATUS={status}"));
}

pub fn stopping(status: &str) {
    send(&format!("STOPPING=1\nSTATUS={status}"));
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
                send("WATCHDOG=1");
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
    fn ready_reaches_the_notify_socket() {
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
    }
}
