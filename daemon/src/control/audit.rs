//! The audit of refused control lines: each shown with control characters escaped and invalid UTF-8 replaced,
//! at most `REFUSALS_IN_FULL_PER_MINUTE` rows per peer and minute in `events`, the rest counted into one
//! `control_rejected_summary` row for that minute, so a client cannot flood the table.

use crate::store;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refused lines per peer and minute written to `events` one row each; the rest are counted into one
/// `control_rejected_summary` row for that minute.
pub const REFUSALS_IN_FULL_PER_MINUTE: u32 = 10;

pub(crate) const AUDIT_WINDOW: Duration = Duration::from_secs(60);

/// Refused lines per peer uid and minute: the first `REFUSALS_IN_FULL_PER_MINUTE` get a row each, the rest a count.
#[derive(Default)]
pub struct RefusalAudit {
    windows: Mutex<HashMap<u32, RefusalWindow>>,
}

pub(crate) struct RefusalWindow {
    opened: Instant,
    opened_at: chrono::DateTime<chrono::Utc>,
    in_full: u32,
    counted: u64,
    last_error: String,
}

impl RefusalAudit {
    /// Notes one refusal by `uid`: whether it gets its own row, and the summary of the peer's previous minute
    /// when that minute ended with refusals only counted.
    pub(crate) fn note(&self, uid: u32, error: &str, now: Instant) -> (bool, Option<Value>) {
        let Ok(mut w) = self.windows.lock() else { return (true, None) };
        let mut summary = None;
        if let Some(old) = w.get(&uid).filter(|o| now.duration_since(o.opened) >= AUDIT_WINDOW) {
            summary = old.summary(uid);
            w.remove(&uid);
        }
        let win = w.entry(uid).or_insert_with(|| RefusalWindow {
            opened: now,
            opened_at: chrono::Utc::now(),
            in_full: 0,
            counted: 0,
            last_error: String::new(),
        });
        if win.in_full < REFUSALS_IN_FULL_PER_MINUTE {
            win.in_full += 1;
            (true, summary)
        } else {
            win.counted += 1;
            win.last_error = error.chars().take(200).collect();
            (false, summary)
        }
    }

    /// Summaries of every minute that has ended (their windows are closed).
    pub(crate) fn take_ended(&self, now: Instant) -> Vec<Value> {
        let Ok(mut w) = self.windows.lock() else { return Vec::new() };
        let ended: Vec<u32> =
            w.iter().filter(|(_, o)| now.duration_since(o.opened) >= AUDIT_WINDOW).map(|(u, _)| *u).collect();
        ended.into_iter().filter_map(|u| w.remove(&u).and_then(|o| o.summary(u))).collect()
    }
}

impl RefusalWindow {
    fn summary(&self, uid: u32) -> Option<Value> {
        (self.counted > 0).then(|| {
            json!({ "peer_uid": uid, "since": self.opened_at.to_rfc3339(), "seconds": AUDIT_WINDOW.as_secs(), "written_in_full": self.in_full,
                    "counted": self.counted, "last_error": self.last_error })
        })
    }
}

pub(crate) async fn write_summaries(pool: &sqlx::PgPool, summaries: Vec<Value>) {
    for s in summaries {
        tracing::warn!(detail = %s, "control lines refused beyond the per-minute audit limit");
        let _ = store::event(pool, "control_rejected_summary", "control", s).await;
    }
}

/// A line as it may be shown and stored: invalid UTF-8 replaced, control characters (NUL included) escaped,
/// at most 200 characters.
pub fn shown_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for c in text.trim_end_matches(['\n', '\r']).chars().take(200) {
        if c.is_control() {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_past_ten_a_minute_are_counted_into_one_summary_per_peer() {
        let a = RefusalAudit::default();
        let t0 = Instant::now();
        let full: Vec<bool> =
            (0..25).map(|i| a.note(1000, &format!("bad {i}"), t0 + Duration::from_millis(i)).0).collect();
        assert_eq!(full.iter().filter(|&&f| f).count(), 10, "the first ten of the minute in full");
        assert!(full[..10].iter().all(|&f| f));
        assert!(a.note(1001, "other peer", t0).0, "another peer has its own minute");
        assert!(a.take_ended(t0 + Duration::from_secs(59)).is_empty(), "the minute has not ended");
        let s = a.take_ended(t0 + Duration::from_secs(61));
        assert_eq!(s.len(), 1, "only the peer with counted refusals: {s:?}");
        assert_eq!(
            (s[0]["peer_uid"].as_u64(), s[0]["counted"].as_u64(), s[0]["last_error"].as_str()),
            (Some(1000), Some(15), Some("bad 24"))
        );
        // A new minute starts in full again; a refusal after an ended minute returns that minute's summary.
        for i in 0..12 {
            a.note(1000, "again", t0 + Duration::from_secs(70) + Duration::from_millis(i));
        }
        let (full, summary) = a.note(1000, "later", t0 + Duration::from_secs(140));
        assert!(full);
        assert_eq!(summary.map(|s| s["counted"].clone()), Some(json!(2)));
    }
}
