//! The per-key check: may a key take `n` now, and if not, the first limit that holds and
//! when none will. Also the calendar the hourly and daily counters roll by.

use super::{Limiter, FLAG_RETIRED, FLAG_SUSPENDED};
use crate::caps::{cap_wait, hour_bit, UNKNOWN_HOUR};
use crate::decision::Reason;
use crate::error::CoreResult;
use crate::gcra::{self, NS_PER_MS};
use crate::reserve::NO_RESERVE;

/// Outcome of evaluating one key: it fits (and the GCRA time it would set), or it is held.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyCheck {
    Fit(u64),
    Held(Reason, Option<u64>),
}

impl Limiter {
    pub fn set_calendar(
        &mut self,
        hour_starts_ms: &[u64],
        day_starts_ms: &[u64],
    ) -> CoreResult<()> {
        self.set_local_calendar(hour_starts_ms, day_starts_ms, None)
    }

    /// `set_calendar` with the local hour of day (0..=23) each hour start begins, which
    /// active hours are read against (`None`: unknown, and keys with active hours closed).
    pub fn set_local_calendar(
        &mut self,
        hour_starts_ms: &[u64],
        day_starts_ms: &[u64],
        hours_of_day: Option<&[u8]>,
    ) -> CoreResult<()> {
        let mut hours = self.hours.clone();
        let mut days = self.days.clone();
        hours.set_pending_hours("hour_starts_ms", hour_starts_ms, hours_of_day)?;
        days.set_pending("day_starts_ms", day_starts_ms)?;
        self.hours = hours;
        self.days = days;
        self.refresh_next_roll();
        Ok(())
    }

    pub(super) fn refresh_next_roll(&mut self) {
        let h = self.hours.next_ms().unwrap_or(u64::MAX);
        let d = self.days.next_ms().unwrap_or(u64::MAX);
        self.next_roll_ms = h.min(d).min(self.hours.hour_expiry_ms());
    }

    // ----- the hot path -----

    /// Roll hourly and daily counters if `now_ms` entered a new calendar window (and forget
    /// the hour of day an hour after its boundary, if no boundary came).
    #[inline]
    pub fn advance(&mut self, now_ms: u64) {
        if now_ms >= self.next_roll_ms {
            self.roll(now_ms);
        }
    }

    #[cold]
    fn roll(&mut self, now_ms: u64) {
        let hour = self.hours.advance(now_ms);
        let day = self.days.advance(now_ms);
        if hour {
            self.keys.iter_mut().for_each(|k| k.hour_used = 0);
            self.ips.iter_mut().for_each(|i| i.hour_used = 0);
        }
        if day {
            self.keys.iter_mut().for_each(|k| k.day_used = 0);
            self.ips.iter_mut().for_each(|i| i.day_used = 0);
        }
        self.hours.expire_hour(now_ms);
        self.refresh_next_roll();
    }

    /// Would `key` take `n` now? Reads only. Callers have advanced the calendar.
    ///
    /// The reason is the first holding limit in this order: paused, retired, outside active
    /// hours, suspended, daily cap, hourly cap, IP daily cap, IP hourly cap, rate,
    /// reservation. The wait is the earliest time at which none holds: the longest wait of
    /// the other limits, carried on to the start of the next active hour if it ends outside
    /// the key's active hours; `None` if any has no known end or no pending hour opens the
    /// key. (A reservation's wait is the time to the next commit the caller named.)
    #[inline(always)]
    pub(crate) fn evaluate(&self, key: u32, n: u32, now_ms: u64) -> KeyCheck {
        let s = &self.keys[key as usize];
        let p = &self.profiles[s.profile as usize];
        if p.paused {
            return KeyCheck::Held(Reason::Paused, None);
        }
        let t_ns = now_ms * NS_PER_MS;
        let rate = gcra::check(s.tat_ns, p.interval_ns, p.limits.max_burst, t_ns, n);
        let ip = &self.ips[s.ip as usize];
        // Fast path: neither suspended nor retired nor limited to active hours, every cap
        // has room (NO_CAP is u32::MAX, so an uncapped counter always has room) and so has the
        // reservation (NO_RESERVE likewise): only the rate can hold.
        let room = |used: u32, cap: u32| u64::from(used) + u64::from(n) <= u64::from(cap);
        if s.flags == 0
            && room(s.day_used, p.daily_cap)
            && room(s.hour_used, p.hourly_cap)
            && room(ip.day_used, ip.daily_cap)
            && room(ip.hour_used, ip.hourly_cap)
            && n <= s.reserve_left
        {
            return match rate {
                Ok(tat) => KeyCheck::Fit(tat),
                Err(wait) => KeyCheck::Held(Reason::Rate, wait.map(gcra::ns_to_ms_ceil)),
            };
        }
        self.evaluate_slow(key, n, now_ms, rate)
    }

    #[inline(never)]
    fn evaluate_slow(
        &self,
        key: u32,
        n: u32,
        now_ms: u64,
        rate: Result<u64, Option<u64>>,
    ) -> KeyCheck {
        let s = &self.keys[key as usize];
        if s.flags & FLAG_RETIRED != 0 {
            return KeyCheck::Held(Reason::Retired, None);
        }
        let p = &self.profiles[s.profile as usize];
        let ip = &self.ips[s.ip as usize];
        let mut held: Option<(Reason, Option<u64>)> = None;
        let mut hold = |reason: Reason, wait: Option<u64>| {
            held = Some(match held {
                None => (reason, wait),
                Some((first, w)) => (first, w.zip(wait).map(|(a, b)| a.max(b))),
            });
        };
        if p.hours & hour_bit(self.hours.hour()) == 0 {
            // Closed now: `open_wait` below carries the wait to the next active hour.
            hold(Reason::OutsideActiveHours, Some(0));
        }
        if s.flags & FLAG_SUSPENDED != 0 {
            let until = self.suspended_until_ms(key);
            if until > now_ms {
                hold(Reason::Suspended, Some(until - now_ms));
            }
        }
        let checks = [
            (Reason::DailyCap, s.day_used, p.daily_cap, &self.days),
            (Reason::HourlyCap, s.hour_used, p.hourly_cap, &self.hours),
            (Reason::IpDailyCap, ip.day_used, ip.daily_cap, &self.days),
            (
                Reason::IpHourlyCap,
                ip.hour_used,
                ip.hourly_cap,
                &self.hours,
            ),
        ];
        for (reason, used, cap, window) in checks {
            if let Some(wait) = cap_wait(used, cap, n, window, now_ms) {
                hold(reason, wait);
            }
        }
        let fit = match rate {
            Ok(tat) => Some(tat),
            Err(wait) => {
                hold(Reason::Rate, wait.map(gcra::ns_to_ms_ceil));
                None
            }
        };
        if n > s.reserve_left {
            hold(Reason::Reservation, Some(self.reserve.retry_ms));
        }
        match (held, fit) {
            (Some((r, w)), _) => KeyCheck::Held(r, self.open_wait(p.hours, now_ms, w)),
            (None, Some(tat)) => KeyCheck::Fit(tat),
            (None, None) => unreachable!("a rate that holds is recorded"),
        }
    }

    /// The wait of a denial once active hours count: the other limits free the key
    /// `wait` after `now_ms`; if that instant is outside the active hours `bits` (compiled),
    /// the wait runs on to the start of the next active hour (`None` if no pending hour
    /// boundary opens it). A key open every hour keeps `wait`.
    #[inline]
    fn open_wait(&self, bits: u32, now_ms: u64, wait: Option<u64>) -> Option<u64> {
        if bits & hour_bit(UNKNOWN_HOUR) != 0 {
            return wait;
        }
        let t = now_ms.saturating_add(wait?);
        self.hours.next_open(bits, t).map(|open| open - now_ms)
    }

    /// Charge `n` to `key` (after a `Fit`).
    #[inline(always)]
    pub(crate) fn commit(&mut self, key: u32, n: u32, new_tat_ns: u64) {
        let s = &mut self.keys[key as usize];
        s.tat_ns = new_tat_ns;
        s.hour_used = s.hour_used.saturating_add(n);
        s.day_used = s.day_used.saturating_add(n);
        // Branch-free: a key without a reservation (NO_RESERVE) keeps it.
        let spent = if s.reserve_left == NO_RESERVE { 0 } else { n };
        s.reserve_left = s.reserve_left.saturating_sub(spent);
        let ip = &mut self.ips[s.ip as usize];
        ip.hour_used = ip.hour_used.saturating_add(n);
        ip.day_used = ip.day_used.saturating_add(n);
    }
}
