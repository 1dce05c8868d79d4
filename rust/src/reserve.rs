//! Reservations: no cap is overshot after a crash.
//!
//! The daemon writes snapshots every interval; what a key is granted after the last durable
//! one is lost if the process dies, so a restored engine could grant it again. Instead, every
//! capped key reserves a block `B` at each reservation snapshot (what it may plausibly be
//! granted until a little after the next one), the snapshot carries the blocks, and once
//! Python says that snapshot is durable (`commit_reservation`) the key may be granted at most
//! `B` more than it had been when the snapshot was taken. Restoring that snapshot charges each
//! key's `B` to the windows current at restart, so whatever was granted between the snapshot
//! and the crash is counted (as `B`, at least as much).
//!
//! On the hot path this is one `u32` per key in its slot (`reserve_left`: grants left under
//! the reservation in force, `NO_RESERVE` when none limits it), compared with `n` and
//! decremented on a grant. Everything else here is cold.
//!
//! Counting. `base[k] - reserve_left[k]` is what key `k` was granted since the latest
//! reservation snapshot. At a snapshot with block `B`, `reserve_left` becomes
//! `min(B, reserve_left)` and `base` the same: until the commit, both the reservation of the
//! durable snapshot and the new one hold (so the new one is never exceeded before it is
//! durable). At the commit, `reserve_left += B - base` and `base = B`: from then on exactly
//! `B` minus what was granted since the snapshot.

use crate::caps::{Calendar, NO_CAP};
use crate::error::{CoreError, CoreResult};
use crate::gcra::NS_PER_MS;
use crate::limiter::{check_now, Limiter, MAX_NOW_MS};

/// `reserve_left` of a key no reservation limits (it has no cap, or reservations are off).
pub const NO_RESERVE: u32 = u32::MAX;
/// `retry_after_ms` of a reservation denial until a commit names one.
pub const DEFAULT_RETRY_MS: u64 = 1_000;

/// The cold part of reservations: off (`on == false`) and empty until the first
/// reservation snapshot or the restore of one.
#[derive(Debug, Clone)]
pub(crate) struct Reserve {
    /// Reservations are enforced: a reservation snapshot was taken or restored.
    pub(crate) on: bool,
    /// Per key (by handle; shorter than the key list when keys came later): see the module
    /// comment. `NO_RESERVE` where `reserve_left` is.
    base: Vec<u32>,
    /// The latest reservation snapshot, until it is committed.
    pending: Option<Pending>,
    /// The token of the next reservation snapshot (kept across restores by the bindings).
    pub(crate) next_token: u64,
    /// `retry_after_ms` of a reservation denial.
    pub(crate) retry_ms: u64,
}

impl Default for Reserve {
    fn default() -> Self {
        Self {
            on: false,
            base: Vec::new(),
            pending: None,
            next_token: 1,
            retry_ms: DEFAULT_RETRY_MS,
        }
    }
}

#[derive(Debug, Clone)]
struct Pending {
    token: u64,
    blocks: Vec<u32>,
}

/// How much a cap still allows from now to `horizon`: what is left of the current window,
/// plus a whole cap for each window that begins by then. `u64::MAX` for no cap.
fn cap_room(used: u32, cap: u32, windows_ahead: u64) -> u64 {
    if cap == NO_CAP {
        return u64::MAX;
    }
    let cap = u64::from(cap);
    cap.saturating_sub(u64::from(used))
        .saturating_add(cap.saturating_mul(windows_ahead))
}

fn windows_until(c: &Calendar, horizon_ms: u64) -> u64 {
    c.pending_until(horizon_ms) as u64
}

impl Limiter {
    /// Does a cap limit `key`: its own hourly or daily cap (after the multiplier) or one of
    /// its IP's? Only such keys need a reservation: an uncapped key has nothing to overshoot.
    pub(crate) fn capped(&self, key: u32) -> bool {
        let s = &self.keys[key as usize];
        let p = &self.profiles[s.profile as usize];
        let ip = &self.ips[s.ip as usize];
        p.hourly_cap != NO_CAP
            || p.daily_cap != NO_CAP
            || ip.hourly_cap != NO_CAP
            || ip.daily_cap != NO_CAP
    }

    /// After a key's limits or its IP's caps changed: a key that no reservation limited and
    /// that is capped now may be granted nothing until a commit covers it. (The durable
    /// snapshot reserved nothing for it, so a crash would lose what it is granted meanwhile.)
    pub(crate) fn reserve_new_caps(&mut self, key: u32) {
        if !self.reserve.on || self.keys[key as usize].reserve_left != NO_RESERVE {
            return;
        }
        if self.capped(key) {
            self.keys[key as usize].reserve_left = 0;
            if let Some(b) = self.reserve.base.get_mut(key as usize) {
                *b = 0;
            }
        }
    }

    /// The block of one key for a reservation snapshot at `now_ms` (calendar advanced).
    fn block(&self, key: u32, ahead_ms: u64, floor: u32, windows: (u64, u64)) -> u32 {
        if !self.capped(key) {
            return NO_RESERVE;
        }
        let s = &self.keys[key as usize];
        let p = &self.profiles[s.profile as usize];
        if p.paused || self.ips[s.ip as usize].retired {
            return 0; // nothing can be granted before the next snapshot changes it
        }
        let recent = match self.reserve.base.get(key as usize) {
            Some(&b) if b != NO_RESERVE && s.reserve_left != NO_RESERVE => {
                u64::from(b.saturating_sub(s.reserve_left))
            }
            _ => 0,
        };
        // GCRA admits at most max_burst + d / T in any interval of length d.
        let by_rate = if p.interval_ns == 0 {
            0
        } else {
            let d_ns = u128::from(ahead_ms) * u128::from(NS_PER_MS);
            let per = d_ns.div_ceil(u128::from(p.interval_ns));
            u64::try_from(per)
                .unwrap_or(u64::MAX)
                .saturating_add(u64::from(p.limits.max_burst))
        };
        let want = by_rate
            .saturating_add(u64::from(floor))
            .max(recent.saturating_mul(2));
        let ip = &self.ips[s.ip as usize];
        let (hours, days) = windows;
        let room = cap_room(s.hour_used, p.hourly_cap, hours)
            .min(cap_room(s.day_used, p.daily_cap, days))
            .min(cap_room(ip.hour_used, ip.hourly_cap, hours))
            .min(cap_room(ip.day_used, ip.daily_cap, days));
        // Below the sentinel: a capped key always has a (finite) block.
        want.min(room).min(u64::from(NO_RESERVE - 1)) as u32
    }

    /// Choose every key's block for a reservation snapshot at `now_ms` (rolling the calendar
    /// first), start holding the keys to them, and remember them until `commit_reservation`.
    /// Returns the snapshot's token and the blocks, one per key (`NO_RESERVE`: none).
    pub(crate) fn reserve(
        &mut self,
        now_ms: u64,
        ahead_ms: u64,
        floor: u32,
    ) -> CoreResult<(u64, Vec<u32>)> {
        check_now(now_ms)?;
        if ahead_ms > MAX_NOW_MS {
            return Err(CoreError::bad(
                "ahead_ms",
                format!("must be at most {MAX_NOW_MS}, got {ahead_ms}"),
            ));
        }
        self.advance(now_ms);
        let horizon = now_ms.saturating_add(ahead_ms);
        let windows = (
            windows_until(&self.hours, horizon),
            windows_until(&self.days, horizon),
        );
        let blocks: Vec<u32> = (0..self.keys.len() as u32)
            .map(|k| self.block(k, ahead_ms, floor, windows))
            .collect();
        self.reserve.base.resize(self.keys.len(), NO_RESERVE);
        for ((slot, base), &b) in self
            .keys
            .iter_mut()
            .zip(self.reserve.base.iter_mut())
            .zip(&blocks)
        {
            slot.reserve_left = slot.reserve_left.min(b);
            *base = slot.reserve_left;
        }
        let token = self.reserve.next_token;
        self.reserve.next_token = token.saturating_add(1);
        self.reserve.pending = Some(Pending {
            token,
            blocks: blocks.clone(),
        });
        self.reserve.on = true;
        Ok((token, blocks))
    }

    /// The snapshot of `token` is durable: from now on each key it reserved for may be granted
    /// its block minus what it was granted since that snapshot. Only the latest reservation
    /// snapshot can be committed; any other token is ignored (false), which is always safe:
    /// ignoring a commit only keeps the older, tighter allowance.
    pub(crate) fn commit_reservation(&mut self, token: u64, retry_ms: u64) -> bool {
        if self
            .reserve
            .pending
            .as_ref()
            .is_none_or(|p| p.token != token)
        {
            return false;
        }
        let pending = self.reserve.pending.take().expect("checked");
        self.reserve.retry_ms = retry_ms.max(1);
        for (k, &b) in pending.blocks.iter().enumerate() {
            if b == NO_RESERVE {
                // Uncapped at the snapshot: free again, unless a cap came since.
                if !self.capped(k as u32) {
                    self.keys[k].reserve_left = NO_RESERVE;
                    self.reserve.base[k] = NO_RESERVE;
                }
            } else {
                // base = min(b, left at the snapshot) <= b, and left <= base.
                let base = &mut self.reserve.base[k];
                let left = &mut self.keys[k].reserve_left;
                *left = left.saturating_add(b - *base).min(b);
                *base = b;
            }
        }
        true
    }

    /// After a restore: reservations on and every capped key at zero allowance until the next
    /// commit (`with_reservation`), or off as in a new engine.
    pub(crate) fn restore_reservations(&mut self, with_reservation: bool) {
        let next_token = self.reserve.next_token;
        self.reserve = Reserve {
            next_token,
            ..Reserve::default()
        };
        for k in 0..self.keys.len() as u32 {
            let capped = with_reservation && self.capped(k);
            self.keys[k as usize].reserve_left = if capped { 0 } else { NO_RESERVE };
        }
        if with_reservation {
            self.reserve.on = true;
            self.reserve.base = self.keys.iter().map(|s| s.reserve_left).collect();
        }
    }

    /// Charge each key's block (and its IP) to the windows current at `now_ms`, after rolling
    /// the calendar to it: what was granted between a snapshot and a crash, at most.
    pub(crate) fn charge_blocks(&mut self, blocks: &[u32], now_ms: u64) -> CoreResult<()> {
        check_now(now_ms)?;
        if blocks.len() != self.keys.len() {
            return Err(CoreError::bad(
                "reservation",
                format!("has {} blocks for {} keys", blocks.len(), self.keys.len()),
            ));
        }
        self.advance(now_ms);
        for (k, &b) in blocks.iter().enumerate() {
            if b == NO_RESERVE {
                continue;
            }
            let s = &mut self.keys[k];
            s.hour_used = s.hour_used.saturating_add(b);
            s.day_used = s.day_used.saturating_add(b);
            let ip = &mut self.ips[s.ip as usize];
            ip.hour_used = ip.hour_used.saturating_add(b);
            ip.day_used = ip.day_used.saturating_add(b);
        }
        Ok(())
    }
}
