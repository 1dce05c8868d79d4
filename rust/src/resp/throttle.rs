//! `CL.THROTTLE key max_burst count period [quantity]`, as redis-cell answers it: a GCRA per
//! free-form key (binary keys allowed), state one theoretical arrival time per key.
//!
//! With `T = period / count` (the emission interval) and a tolerance `τ = T * (max_burst + 1)`,
//! a request for `quantity` at `now` computes `tat = max(stored, now)` and
//! `new_tat = tat + quantity * T`; it is allowed when `new_tat - τ <= now` (then `new_tat` is
//! stored). The reply: limited (0/1), limit (`max_burst + 1`), remaining, retry after (whole
//! seconds, truncated as redis-cell does; -1 when allowed or when `quantity` can never fit), reset after (whole seconds until
//! the key is full again). A key whose time has passed is forgotten; at most
//! `MAX_THROTTLE_KEYS` are kept (expired ones are swept when full).

use hashbrown::HashMap;

/// Keys held at most; a new key beyond this (after sweeping expired ones) is refused.
pub const MAX_THROTTLE_KEYS: usize = 1_000_000;
const NS_PER_MS: i128 = 1_000_000;
const NS_PER_S: i128 = 1_000_000_000;

/// What `CL.THROTTLE` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub limited: bool,
    pub limit: i64,
    pub remaining: i64,
    pub retry_after_s: i64,
    pub reset_after_s: i64,
}

/// Every key's theoretical arrival time, in ns since the epoch.
#[derive(Debug, Clone, Default)]
pub struct Throttles {
    tat_ns: HashMap<Box<[u8]>, i128>,
    /// What `bytes` answers, kept as keys come and go.
    key_bytes: usize,
}

/// Bytes one key takes beside its own: the table's entry and its control byte.
const ENTRY_BYTES: usize = std::mem::size_of::<(Box<[u8]>, i128)>() + 1;

impl Throttles {
    pub fn len(&self) -> usize {
        self.tat_ns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tat_ns.is_empty()
    }

    /// Bytes the keys take (their text and table entries; for the memory figures).
    pub fn bytes(&self) -> usize {
        self.key_bytes
    }

    /// Answer one request. Err: an argument out of range, or the key table full.
    pub fn throttle(
        &mut self,
        key: &[u8],
        max_burst: i64,
        count: i64,
        period_s: i64,
        quantity: i64,
        now_ms: u64,
    ) -> Result<Throttled, String> {
        if max_burst < 0 {
            return Err("max_burst must not be negative".into());
        }
        if count < 1 || period_s < 1 {
            return Err("count per period and period must be at least 1".into());
        }
        if quantity < 0 {
            return Err("quantity must not be negative".into());
        }
        let now = i128::from(now_ms) * NS_PER_MS;
        let interval = i128::from(period_s) * NS_PER_S / i128::from(count);
        let limit = max_burst.saturating_add(1);
        let tolerance = interval * i128::from(limit);
        let increment = interval * i128::from(quantity);
        let stored = self.tat_ns.get(key).copied().filter(|&t| t > now);
        let tat = stored.unwrap_or(now);
        let new_tat = tat + increment;
        let diff = now - (new_tat - tolerance);
        let (limited, ttl, retry) = if diff < 0 {
            let retry = if increment <= tolerance {
                Some(-diff)
            } else {
                None
            };
            (true, tat - now, retry)
        } else {
            (false, new_tat - now, None)
        };
        if !limited {
            if stored.is_none() && !self.tat_ns.contains_key(key) {
                self.make_room(now)?;
            }
            match self.tat_ns.get_mut(key) {
                Some(t) => *t = new_tat,
                None => {
                    self.tat_ns.insert(key.into(), new_tat);
                    self.key_bytes += key.len() + ENTRY_BYTES;
                }
            }
        }
        let next = tolerance - ttl;
        let remaining = if next > -interval {
            i64::try_from(next / interval).unwrap_or(i64::MAX).max(0)
        } else {
            0
        };
        Ok(Throttled {
            limited,
            limit,
            remaining,
            retry_after_s: retry.map_or(-1, seconds),
            reset_after_s: seconds(ttl),
        })
    }

    /// Keep the table within its bound: sweep keys whose time has passed when it is full.
    fn make_room(&mut self, now: i128) -> Result<(), String> {
        if self.tat_ns.len() < MAX_THROTTLE_KEYS {
            return Ok(());
        }
        self.tat_ns.retain(|_, &mut t| t > now);
        self.key_bytes = self.tat_ns.keys().map(|k| k.len() + ENTRY_BYTES).sum();
        if self.tat_ns.len() >= MAX_THROTTLE_KEYS {
            return Err(format!(
                "throttle keys full ({MAX_THROTTLE_KEYS} live keys)"
            ));
        }
        Ok(())
    }
}

/// Whole seconds of `ns`, truncated, as redis-cell reports them.
fn seconds(ns: i128) -> i64 {
    i64::try_from(ns.max(0) / NS_PER_S).unwrap_or(i64::MAX)
}
