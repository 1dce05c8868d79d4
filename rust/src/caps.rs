//! Calendar windows for hourly and daily caps.
//!
//! The core never reads a clock or knows a time zone: Python supplies the instants at which
//! calendar hours and days begin (DST and all), and the core rolls its counters when `now_ms`
//! passes one. If Python falls behind and supplies no further boundary, the current window
//! simply goes on: counts never reset early, so a cap is never exceeded by a missing roll.

use std::collections::VecDeque;

use crate::error::{CoreError, CoreResult};

/// The hour of day of a window or boundary that nobody named (`set_calendar` without hours of
/// day, or calendar days): a key with active hours is closed in it.
pub const UNKNOWN_HOUR: u8 = 24;

/// Every local hour of the day (bits 0..=23): a key with these active hours is never closed.
pub const EVERY_HOUR: u32 = (1 << 24) - 1;

/// A local hour never lasts longer than this (a repeated hour at the end of DST is two
/// windows), so an hour of day is known for at most an hour after its boundary: a calendar
/// that runs out never keeps a key open into an hour nobody named.
pub const HOUR_MS: u64 = 3_600_000;

/// The bit of an hour of day in an active-hours mask; `UNKNOWN_HOUR` has bit 24, which only
/// `EVERY_HOUR` keys (compiled with `hours_bits`) have, so an unknown hour closes every other key.
#[inline]
pub const fn hour_bit(hour: u8) -> u32 {
    1 << hour
}

/// An active-hours mask as the hot path tests it: `EVERY_HOUR` is open in an unknown hour too.
pub const fn hours_bits(active_hours: u32) -> u32 {
    if active_hours == EVERY_HOUR {
        EVERY_HOUR | hour_bit(UNKNOWN_HOUR)
    } else {
        active_hours
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    /// Start of the current window (0 before the first boundary was passed).
    start_ms: u64,
    /// The local hour of day (0..=23) of the current window, or `UNKNOWN_HOUR`.
    hour: u8,
    /// Boundaries still to come, strictly increasing, each with the hour of day it begins.
    pending: VecDeque<(u64, u8)>,
}

impl Default for Calendar {
    fn default() -> Self {
        Self {
            start_ms: 0,
            hour: UNKNOWN_HOUR,
            pending: VecDeque::new(),
        }
    }
}

impl Calendar {
    pub fn new(start_ms: u64, pending: &[u64]) -> CoreResult<Self> {
        Self::with_hours(start_ms, UNKNOWN_HOUR, pending, None)
    }

    /// A calendar whose current window (from `start_ms`) is local hour `hour` and whose
    /// pending boundaries begin the hours `hours` (`None`: unknown).
    pub fn with_hours(
        start_ms: u64,
        hour: u8,
        pending: &[u64],
        hours: Option<&[u8]>,
    ) -> CoreResult<Self> {
        check_hour("hour_of_day", hour, true)?;
        let mut c = Self {
            start_ms,
            hour,
            pending: VecDeque::new(),
        };
        c.replace_pending("boundaries", pending, hours, true)?;
        Ok(c)
    }

    /// Replace the boundaries to come. They must be strictly increasing; ones at or before
    /// the current window's start are ignored.
    pub fn set_pending(&mut self, name: &'static str, starts_ms: &[u64]) -> CoreResult<()> {
        self.set_pending_hours(name, starts_ms, None)
    }

    /// `set_pending`, with the local hour of day (0..=23) each boundary begins (one per
    /// boundary; `None`: unknown). A boundary equal to the current window's start names the
    /// current window's hour of day.
    pub fn set_pending_hours(
        &mut self,
        name: &'static str,
        starts_ms: &[u64],
        hours: Option<&[u8]>,
    ) -> CoreResult<()> {
        self.replace_pending(name, starts_ms, hours, false)
    }

    fn replace_pending(
        &mut self,
        name: &'static str,
        starts_ms: &[u64],
        hours: Option<&[u8]>,
        unknown_ok: bool,
    ) -> CoreResult<()> {
        if let Some([a, b]) = starts_ms.windows(2).find(|w| w[0] >= w[1]) {
            return Err(CoreError::bad(
                name,
                format!("must be strictly increasing, got {a} then {b}"),
            ));
        }
        if let Some(hours) = hours {
            if hours.len() != starts_ms.len() {
                return Err(CoreError::bad(
                    "hours_of_day",
                    format!(
                        "must give one hour per hour start ({}), got {}",
                        starts_ms.len(),
                        hours.len()
                    ),
                ));
            }
            for &h in hours {
                check_hour("hours_of_day", h, unknown_ok)?;
            }
        }
        let hour_of = |i: usize| hours.map_or(UNKNOWN_HOUR, |h| h[i]);
        if let Some(i) = starts_ms.iter().position(|&b| b == self.start_ms) {
            if hours.is_some() {
                self.hour = hour_of(i);
            }
        }
        self.pending = starts_ms
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b > self.start_ms)
            .map(|(i, &b)| (b, hour_of(i)))
            .collect();
        Ok(())
    }

    /// Move to the window that holds `now_ms`; true if a new window began.
    #[inline]
    pub fn advance(&mut self, now_ms: u64) -> bool {
        let mut rolled = false;
        while let Some(&(b, hour)) = self.pending.front() {
            if b > now_ms {
                break;
            }
            self.pending.pop_front();
            if b > self.start_ms {
                self.start_ms = b;
                self.hour = hour;
                rolled = true;
            }
        }
        rolled
    }

    /// The next boundary, if Python supplied one.
    #[inline]
    pub fn next_ms(&self) -> Option<u64> {
        self.pending.front().map(|&(b, _)| b)
    }

    /// How many pending boundaries come at or before `until_ms`.
    pub fn pending_until(&self, until_ms: u64) -> usize {
        self.pending
            .iter()
            .take_while(|&&(b, _)| b <= until_ms)
            .count()
    }

    pub fn start_ms(&self) -> u64 {
        self.start_ms
    }

    /// The hour of day of the current window (`UNKNOWN_HOUR` when nobody named it, or once
    /// `expire_hour` found it over).
    #[inline]
    pub fn hour(&self) -> u8 {
        self.hour
    }

    /// When the current window's hour of day stops being known if no boundary comes first:
    /// an hour after the window began (`u64::MAX` when it is not known).
    pub fn hour_expiry_ms(&self) -> u64 {
        if self.hour == UNKNOWN_HOUR {
            u64::MAX
        } else {
            self.start_ms.saturating_add(HOUR_MS)
        }
    }

    /// Forget the hour of day once `now_ms` is an hour or more past the window's start.
    pub fn expire_hour(&mut self, now_ms: u64) {
        if now_ms >= self.hour_expiry_ms() {
            self.hour = UNKNOWN_HOUR;
        }
    }

    pub fn pending(&self) -> Vec<u64> {
        self.pending.iter().map(|&(b, _)| b).collect()
    }

    /// The hour of day of each pending boundary (`UNKNOWN_HOUR` where unknown).
    pub fn pending_hours(&self) -> Vec<u8> {
        self.pending.iter().map(|&(_, h)| h).collect()
    }

    /// The earliest instant at or after `t_ms` (the calendar advanced to some time before it)
    /// that lies in an hour of `bits` (compiled by `hours_bits`), by the pending boundaries:
    /// `t_ms` itself if its hour is in `bits`, else the first later boundary that begins such
    /// an hour, else `None` (no pending boundary opens it). An hour of day holds until the
    /// next boundary, and at most `HOUR_MS`.
    pub fn next_open(&self, bits: u32, t_ms: u64) -> Option<u64> {
        let (mut start, mut hour) = (self.start_ms, self.hour);
        let mut later = self.pending.iter().peekable();
        while let Some(&&(b, h)) = later.peek() {
            if b > t_ms {
                break;
            }
            (start, hour) = (b, h);
            later.next();
        }
        if t_ms >= start.saturating_add(HOUR_MS) {
            hour = UNKNOWN_HOUR;
        }
        if bits & hour_bit(hour) != 0 {
            return Some(t_ms);
        }
        later
            .find(|&&(_, h)| bits & hour_bit(h) != 0)
            .map(|&(b, _)| b)
    }
}

fn check_hour(name: &'static str, hour: u8, unknown_ok: bool) -> CoreResult<()> {
    if hour < UNKNOWN_HOUR || (unknown_ok && hour == UNKNOWN_HOUR) {
        Ok(())
    } else {
        Err(CoreError::bad(
            name,
            format!("an hour of day must be 0 to 23, got {hour}"),
        ))
    }
}

/// Sentinel for "no cap" in the compact per-key state.
pub const NO_CAP: u32 = u32::MAX;

/// Validate a cap from outside: `None` is no cap; the sentinel itself does not fit.
pub fn cap_from(name: &'static str, cap: Option<u64>) -> CoreResult<u32> {
    match cap {
        None => Ok(NO_CAP),
        Some(c) if c < u64::from(NO_CAP) => Ok(c as u32),
        Some(c) => Err(CoreError::bad(
            name,
            format!("must be below {NO_CAP} (caps are 32-bit counters), got {c}"),
        )),
    }
}

pub fn cap_to(cap: u32) -> Option<u64> {
    (cap != NO_CAP).then_some(u64::from(cap))
}

/// Does a cap leave room for `n` more after `used`? If not, how long until the window
/// ends (`None`: never, or no next boundary known).
#[inline]
pub fn cap_wait(
    used: u32,
    cap: u32,
    n: u32,
    window: &Calendar,
    now_ms: u64,
) -> Option<Option<u64>> {
    if cap == NO_CAP || u64::from(used) + u64::from(n) <= u64::from(cap) {
        return None;
    }
    if n > cap {
        return Some(None);
    }
    Some(window.next_ms().map(|b| b.saturating_sub(now_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_rolls_once_per_boundary() {
        let mut c = Calendar::new(0, &[100, 200, 300]).unwrap();
        assert!(!c.advance(50));
        assert!(c.advance(100));
        assert_eq!(c.start_ms(), 100);
        assert!(!c.advance(150));
        // Skipping two boundaries at once is one roll.
        assert!(c.advance(320));
        assert_eq!(c.start_ms(), 300);
        assert_eq!(c.next_ms(), None);
        // Without a next boundary the window goes on.
        assert!(!c.advance(10_000));
    }

    #[test]
    fn old_boundaries_are_ignored() {
        let mut c = Calendar::new(0, &[100]).unwrap();
        c.advance(100);
        c.set_pending("hour_starts_ms", &[50, 100, 200]).unwrap();
        assert_eq!(c.pending(), vec![200]);
        assert!(!c.advance(150));
    }

    #[test]
    fn boundaries_must_increase() {
        let mut c = Calendar::default();
        let e = c.set_pending("hour_starts_ms", &[5, 5]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hour_starts_ms: must be strictly increasing, got 5 then 5"
        );
    }

    #[test]
    fn caps_convert_both_ways() {
        assert_eq!(cap_from("c", None).unwrap(), NO_CAP);
        assert_eq!(cap_to(cap_from("c", Some(7)).unwrap()), Some(7));
        assert_eq!(cap_to(NO_CAP), None);
        assert!(cap_from("c", Some(u64::from(u32::MAX))).is_err());
    }

    #[test]
    fn cap_wait_points_at_the_next_boundary() {
        let c = Calendar::new(0, &[1_000]).unwrap();
        assert_eq!(cap_wait(4, 5, 1, &c, 10), None);
        assert_eq!(cap_wait(5, 5, 1, &c, 10), Some(Some(990)));
        assert_eq!(cap_wait(0, 5, 6, &c, 10), Some(None));
        assert_eq!(cap_wait(0, NO_CAP, u32::MAX, &c, 10), None);
        let none = Calendar::default();
        assert_eq!(cap_wait(5, 5, 1, &none, 10), Some(None));
    }
}
