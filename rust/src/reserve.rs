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
use crate::gcra::{self, NS_PER_MS};
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
    fn block(&self, key: u32, now_ms: u64, ahead_ms: u64, floor: u32, windows: (u64, u64)) -> u32 {
        if !self.capped(key) {
            return NO_RESERVE;
        }
        let s = &self.keys[key as usize];
        let p = &self.profiles[s.profile as usize];
        // A key outside its active hours until past the horizon can be granted nothing.
        if self
            .hours
            .next_open(p.hours, now_ms)
            .is_none_or(|open| open > now_ms.saturating_add(ahead_ms))
        {
            return 0;
        }
        let recent = match self.reserve.base.get(key as usize) {
            Some(&b) if b != NO_RESERVE && s.reserve_left != NO_RESERVE => {
                u64::from(b.saturating_sub(s.reserve_left))
            }
            _ => 0,
        };
        // GCRA admits at most max_burst + d / T in any interval of length d. A paused key is
        // reserved for as if it were not, so that a resume between snapshots is not held back.
        let l = &p.limits;
        let interval_ns = if p.interval_ns != 0 || !p.paused || l.rate_count == 0 {
            p.interval_ns
        } else {
            gcra::interval_ns(l.rate_count, l.rate_period_ms, u64::from(l.multiplier_ppm))
                .unwrap_or(0)
        };
        let by_rate = if interval_ns == 0 {
            0
        } else {
            let d_ns = u128::from(ahead_ms) * u128::from(NS_PER_MS);
            let per = d_ns.div_ceil(u128::from(interval_ns));
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
            .map(|k| self.block(k, now_ms, ahead_ms, floor, windows))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Reason;
    use crate::engine::Engine;
    use crate::state::Snapshot;

    const H: u64 = 3_600_000;
    const D: u64 = 24 * H;
    const T0: u64 = 1_000 * D;

    /// One key: 10/s with a burst of 3, daily cap 1000, calendar hours and days ahead.
    fn engine() -> (Engine, u32) {
        let mut e = Engine::new();
        let k = e.limiter.key("192.0.2.1", "google").unwrap();
        e.set_limits(k, Some((10, 1000)), 3, None, Some(1000))
            .unwrap();
        let hours: Vec<u64> = (1..48).map(|i| T0 + i * H).collect();
        e.set_calendar(&hours, &[T0 + D, T0 + 2 * D]).unwrap();
        (e, k)
    }

    /// Grant `count` one at a time 100 ms apart from `at`; how many were granted.
    fn send(e: &mut Engine, k: u32, count: u64, at: u64) -> u64 {
        (0..count)
            .filter(|i| e.acquire(k, 1, at + i * 100).unwrap().is_granted())
            .count() as u64
    }

    #[test]
    fn keys_outside_their_active_hours_reserve_nothing_until_they_open() {
        let (mut e, k) = engine();
        // Hours of day: T0 is 00:00; the key is active from 07:00 only.
        let starts: Vec<u64> = (0..48).map(|i| T0 + i * H).collect();
        let of_day: Vec<u8> = (0..48).map(|i| (i % 24) as u8).collect();
        e.set_local_calendar(&starts, &[T0 + D], Some(&of_day))
            .unwrap();
        e.set_active_hours(k, 1 << 7).unwrap();
        let block = |e: &mut Engine, at: u64| {
            let (snap, _) = e.reservation_snapshot(at, 2000, 10).unwrap();
            snap.reservation.unwrap().blocks[k as usize]
        };
        assert_eq!(block(&mut e, T0 + 3 * H), 0);
        // Opening within the horizon (2 s): a block as usual (2 s of rate, burst, floor).
        assert_eq!(block(&mut e, T0 + 7 * H - 1000), 20 + 3 + 10);
        assert_eq!(block(&mut e, T0 + 7 * H), 20 + 3 + 10);
    }

    #[test]
    fn off_until_used_and_uncapped_keys_never_limited() {
        let (mut e, k) = engine();
        assert_eq!(e.usage(k).unwrap().reserve_left, None);
        let free = e.limiter.key("192.0.2.1", "yahoo").unwrap();
        let (snap, token) = e.reservation_snapshot(T0, 2000, 10).unwrap();
        let blocks = &snap.reservation.as_ref().unwrap().blocks;
        // 2 s of 10/s, the burst of 3 and the floor of 10.
        assert_eq!(blocks[k as usize], 20 + 3 + 10);
        assert_eq!(blocks[free as usize], NO_RESERVE);
        assert!(e.commit_reservation(token, 700));
        assert_eq!(e.usage(free).unwrap().reserve_left, None);
        assert!(e.acquire(free, 1_000_000, T0).unwrap().is_granted());
    }

    #[test]
    fn a_committed_block_bounds_grants_since_its_snapshot() {
        let (mut e, k) = engine();
        e.set_limits(k, None, 1, None, Some(1000)).unwrap(); // no rate: floor and history
        let (_, token) = e.reservation_snapshot(T0, 2000, 5).unwrap();
        // Held to the block from the snapshot on, even before the commit.
        assert_eq!(e.usage(k).unwrap().reserve_left, Some(5));
        assert!(e.acquire(k, 2, T0).unwrap().is_granted());
        assert!(e.commit_reservation(token, 700));
        assert_eq!(e.usage(k).unwrap().reserve_left, Some(3));
        assert!(e.acquire(k, 3, T0).unwrap().is_granted());
        let d = e.acquire(k, 1, T0 + 1).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::Reservation, Some(700))
        );
        // The next block is at least twice what was granted since the previous snapshot.
        let (snap, token) = e.reservation_snapshot(T0 + 1000, 2000, 5).unwrap();
        assert_eq!(snap.reservation.unwrap().blocks[k as usize], 10);
        assert_eq!(e.usage(k).unwrap().reserve_left, Some(0));
        assert!(!e.commit_reservation(token + 1, 700), "unknown token");
        assert!(e.commit_reservation(token, 700));
        assert!(!e.commit_reservation(token, 700), "already committed");
        assert_eq!(send(&mut e, k, 20, T0 + 1000), 10);
    }

    #[test]
    fn before_its_commit_both_reservations_hold() {
        let (mut e, k) = engine();
        e.set_limits(k, None, 1, None, Some(1000)).unwrap();
        let (_, t1) = e.reservation_snapshot(T0, 2000, 100).unwrap();
        assert!(e.commit_reservation(t1, 1000));
        assert!(e.acquire(k, 10, T0).unwrap().is_granted());
        // A smaller block: held to it at once, though the durable one allows 90 more.
        let (_, t2) = e.reservation_snapshot(T0 + 1000, 2000, 30).unwrap();
        assert_eq!(e.usage(k).unwrap().reserve_left, Some(30));
        let (_, t3) = e.reservation_snapshot(T0 + 1500, 2000, 50).unwrap();
        assert_eq!(e.usage(k).unwrap().reserve_left, Some(30));
        assert!(e.acquire(k, 30, T0 + 1600).unwrap().is_granted());
        assert_eq!(
            e.acquire(k, 1, T0 + 1600).unwrap().reason,
            Reason::Reservation
        );
        // Only the latest snapshot commits; then exactly its block minus grants since.
        assert!(!e.commit_reservation(t2, 1000));
        assert!(e.commit_reservation(t3, 1000));
        assert_eq!(e.usage(k).unwrap().reserve_left, Some(50 - 30));
    }

    #[test]
    fn blocks_stop_at_what_the_caps_allow_by_the_horizon() {
        let (mut e, k) = engine();
        e.set_limits(k, Some((10, 1000)), 3, Some(5), Some(1000))
            .unwrap();
        e.acquire(k, 3, T0 + H - 5000).unwrap();
        let (s, _) = e.reservation_snapshot(T0 + H - 5000, 2000, 10).unwrap();
        assert_eq!(s.reservation.unwrap().blocks[k as usize], 2);
        // A new hour begins within the horizon: a whole hourly cap more.
        let (s, _) = e.reservation_snapshot(T0 + H - 1000, 2000, 10).unwrap();
        assert_eq!(s.reservation.unwrap().blocks[k as usize], 2 + 5);
        let ip = e.limiter.key_ip(k).unwrap();
        e.limiter.set_ip_caps(ip, None, Some(4)).unwrap();
        let (s, _) = e.reservation_snapshot(T0 + H - 1000, 2000, 10).unwrap();
        assert_eq!(s.reservation.unwrap().blocks[k as usize], 1);
        // A paused key is reserved for as if it were not (a resume is not held back).
        e.limiter.set_ip_caps(ip, None, None).unwrap();
        e.set_paused(k, true).unwrap();
        let (s, _) = e.reservation_snapshot(T0 + H - 1000, 2000, 10).unwrap();
        assert_eq!(s.reservation.unwrap().blocks[k as usize], 2 + 5);
        e.set_paused(k, false).unwrap();
        e.set_multiplier(k, 0.0).unwrap();
        let (s, _) = e.reservation_snapshot(T0 + H - 1000, 2000, 10).unwrap();
        assert_eq!(
            s.reservation.unwrap().blocks[k as usize],
            0,
            "caps scaled to 0"
        );
    }

    #[test]
    fn a_key_capped_after_the_snapshot_waits_for_a_commit() {
        let (mut e, k) = engine();
        let other = e.limiter.key("192.0.2.1", "yahoo").unwrap();
        let (_, token) = e.reservation_snapshot(T0, 2000, 10).unwrap();
        assert!(e.acquire(other, 50, T0).unwrap().is_granted());
        e.set_limits(other, None, 1, Some(100), None).unwrap();
        assert_eq!(e.acquire(other, 1, T0).unwrap().reason, Reason::Reservation);
        // The committed snapshot reserved nothing for it: it still waits.
        assert!(e.commit_reservation(token, 1000));
        assert_eq!(e.usage(other).unwrap().reserve_left, Some(0));
        let (_, token) = e.reservation_snapshot(T0 + 1000, 2000, 10).unwrap();
        assert!(e.commit_reservation(token, 1000));
        assert!(e.acquire(other, 1, T0 + 1000).unwrap().is_granted());
        // Keys of an IP that gets caps, and new keys of a capped IP, wait the same way.
        let ip = e.limiter.key_ip(k).unwrap();
        let third = e.limiter.key("192.0.2.1", "aol").unwrap();
        e.limiter.set_ip_caps(ip, Some(1000), None).unwrap();
        assert_eq!(e.usage(third).unwrap().reserve_left, Some(0));
        let fourth = e.limiter.key("192.0.2.1", "gmx").unwrap();
        assert_eq!(e.usage(fourth).unwrap().reserve_left, Some(0));
    }

    #[test]
    fn restore_charges_blocks_to_the_windows_of_the_restart() {
        let (mut e, k) = engine();
        e.set_limits(k, None, 1, Some(500), Some(1000)).unwrap();
        assert!(e.acquire(k, 100, T0 + 10).unwrap().is_granted());
        let (snap, token) = e.reservation_snapshot(T0 + 1000, 2000, 40).unwrap();
        assert!(e.commit_reservation(token, 1000));
        let bytes = snap.to_bytes();
        let snap = Snapshot::from_bytes(&bytes).unwrap();
        // Same hour: 100 before the snapshot, 40 reserved after it.
        let r = Engine::restore_at(&snap, Some(T0 + 5000)).unwrap();
        let u = r.usage(k).unwrap();
        assert_eq!((u.hour_used, u.day_used, u.ip_day_used), (140, 140, 140));
        // Zero allowance until the next commit.
        assert_eq!(u.reserve_left, Some(0));
        // A later hour of the same day: the hour starts from the block alone.
        let r = Engine::restore_at(&snap, Some(T0 + H + 1)).unwrap();
        let u = r.usage(k).unwrap();
        assert_eq!((u.hour_used, u.day_used), (40, 140));
        // The next day: both.
        let r = Engine::restore_at(&snap, Some(T0 + D + 1)).unwrap();
        let u = r.usage(k).unwrap();
        assert_eq!((u.hour_used, u.day_used), (40, 40));
        // Without now_ms nothing is charged, but reservations still wait for a commit.
        let mut r = Engine::restore_at(&snap, None).unwrap();
        assert_eq!(r.usage(k).unwrap().day_used, 100);
        assert_eq!(
            r.acquire(k, 1, T0 + 2000).unwrap().reason,
            Reason::Reservation
        );
        let (_, token) = r.reservation_snapshot(T0 + 2000, 2000, 40).unwrap();
        assert!(r.commit_reservation(token, 1000));
        assert!(r.acquire(k, 1, T0 + 2000).unwrap().is_granted());
        // A plain snapshot charges nothing and leaves reservations off.
        let mut r = Engine::restore_at(&e.snapshot(), Some(T0 + 5000)).unwrap();
        assert_eq!(r.usage(k).unwrap().reserve_left, None);
        assert_eq!(r.usage(k).unwrap().day_used, 100);
        assert!(r.acquire(k, 400, T0 + 5000).unwrap().is_granted());
    }

    #[test]
    fn a_crash_never_overshoots_the_cap() {
        // Crash at every point of an interval: restored counters plus what is granted after
        // the restart never exceed the daily cap, counting what was granted before the crash.
        for crash_after in 0..12u64 {
            let (mut e, k) = engine();
            e.set_limits(k, Some((10, 1000)), 3, None, Some(60))
                .unwrap();
            let (mut durable, token) = e.reservation_snapshot(T0 - 1000, 2000, 10).unwrap();
            assert!(e.commit_reservation(token, 1000));
            let mut granted = 0;
            let mut t = T0;
            for second in 0..6u64 {
                let (s, token) = e.reservation_snapshot(t, 2000, 10).unwrap();
                if second == crash_after / 2 && crash_after % 2 == 1 {
                    // Written but not committed: a crash finds the previous snapshot.
                    granted += send(&mut e, k, 10, t);
                    t += 1000;
                    break;
                }
                durable = s;
                assert!(e.commit_reservation(token, 1000));
                granted += send(&mut e, k, 10, t);
                t += 1000;
                if second == crash_after / 2 {
                    break;
                }
            }
            let mut r = Engine::restore_at(&durable, Some(t + 500)).unwrap();
            let (_, token) = r.reservation_snapshot(t + 500, 2000, 10).unwrap();
            assert!(r.commit_reservation(token, 1000));
            for i in 0..100 {
                let at = t + 500 + i * 100;
                if r.acquire(k, 1, at).unwrap().is_granted() {
                    granted += 1;
                }
                if i % 10 == 9 {
                    let (_, token) = r.reservation_snapshot(at, 2000, 10).unwrap();
                    assert!(r.commit_reservation(token, 1000));
                }
            }
            assert!(granted <= 60, "crash {crash_after}: granted {granted}");
            // What the crash cost is at most one block (2 s of rate, burst and floor).
            assert!(
                granted >= 60 - (20 + 3 + 10),
                "crash {crash_after}: granted {granted}"
            );
        }
    }

    #[test]
    fn version_1_bytes_still_restore() {
        // `snapshot_bytes()` of an engine before version 2 (one key granted 2, an IP cap,
        // a pool, a queued message).
        let hex = "4b494c4e534e415001000180dddb01000180b899290106676f6f676c6502093139322e302e322e3101f403000202093139322e302e322e32000000000200000ae80703016401e807c0843d008092fd7b02020001000000010000c0843d000000000001046d61696e0200010101020000010700000201";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let s = Snapshot::from_bytes(&bytes).unwrap();
        assert_eq!((s.version, s.reservation.is_none()), (1, true));
        let e = Engine::from_snapshot(&s).unwrap();
        let u = e.usage(0).unwrap();
        assert_eq!(
            (u.day_used, u.limits.daily_cap, u.reserve_left),
            (2, 1000, None)
        );
        assert_eq!(e.queued(), 1);
        // Corrupt or unknown versions are errors.
        let mut bad = bytes.clone();
        bad[8] = 4;
        assert!(Snapshot::from_bytes(&bad).is_err());
        let mut s2 = e.snapshot();
        assert_eq!(s2.version, 3);
        s2.reservation = Some(crate::state::Reservation {
            taken_ms: 0,
            blocks: vec![1],
        });
        assert!(
            Engine::from_snapshot(&s2).is_err(),
            "one block for two keys"
        );
    }

    #[test]
    fn version_2_bytes_still_restore() {
        // Version 2 is version 3 without its last three fields (the hour of day, the pending
        // hours of day, the active hours): here an unknown hour and two empty lists, 3 bytes.
        let mut e = Engine::new();
        let k = e.limiter.key("192.0.2.1", "google").unwrap();
        e.set_limits(k, None, 1, None, Some(10)).unwrap();
        e.acquire(k, 4, 5).unwrap();
        let mut bytes = e.snapshot().to_bytes();
        assert_eq!(bytes[8], 3);
        assert_eq!(bytes[bytes.len() - 3..], [24, 0, 0]);
        bytes[8] = 2;
        bytes.truncate(bytes.len() - 3);
        let s = Snapshot::from_bytes(&bytes).unwrap();
        assert_eq!(s.version, 2);
        let r = Engine::from_snapshot(&s).unwrap();
        assert_eq!(r.usage(k).unwrap(), e.usage(k).unwrap());
        // A version 2 snapshot that names active hours is corrupt.
        let mut s = s;
        s.active_hours = vec![(k, 0xff)];
        assert!(Engine::from_snapshot(&s).is_err());
    }
}
