//! Replay defence for signed requests: every accepted signature is kept
//! until its timestamp can no longer pass the skew check, so a captured
//! request cannot be sent again. Memory is bounded; when full of live
//! entries, new signed requests are refused rather than let through.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::Denied;

#[derive(Debug)]
pub struct ReplayCache {
    /// Seconds an entry must be kept: twice the allowed skew.
    window: i64,
    cap: usize,
    seen: Mutex<HashMap<[u8; 32], i64>>,
}

impl ReplayCache {
    pub fn new(window: i64, cap: usize) -> ReplayCache {
        ReplayCache {
            window,
            cap,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Record `sig` (signed at `ts`); `Err(Replay)` if it was seen before.
    pub fn insert(&self, sig: &[u8; 32], ts: i64, now: i64) -> Result<(), Denied> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains_key(sig) {
            return Err(Denied::Replay);
        }
        if seen.len() >= self.cap {
            let window = self.window;
            seen.retain(|_, &mut t| (now - t).abs() <= window);
            if seen.len() >= self.cap {
                return Err(Denied::Busy);
            }
        }
        seen.insert(*sig, ts);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
