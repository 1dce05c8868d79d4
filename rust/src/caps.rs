//! Calendar windows for hourly and daily caps.
//!
//! The core never reads a clock or knows a time zone: Python supplies the instants at which
//! calendar hours and days begin (DST and all), and the core rolls its counters when `now_ms`
//! passes one. If Python falls behind and supplies no further boundary, the current window
//! simply goes on: counts never reset early, so a cap is never exceeded by a missing roll.

use std::collections::VecDeque;

use crate::error::{CoreError, CoreResult};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calendar {
    /// Start of the current window (0 before the first boundary was passed).
    start_ms: u64,
    /// Boundaries still to come, strictly increasing.
    pending: VecDeque<u64>,
}

impl Calendar {
    pub fn new(start_ms: u64, pending: &[u64]) -> CoreResult<Self> {
        let mut c = Self {
            start_ms,
            pending: VecDeque::new(),
        };
        c.set_pending("boundaries", pending)?;
        Ok(c)
    }

    /// Replace the boundaries to come. They must be strictly increasing; ones at or before
    /// the current window's start are ignored.
    pub fn set_pending(&mut self, name: &'static str, starts_ms: &[u64]) -> CoreResult<()> {
        if let Some([a, b]) = starts_ms.windows(2).find(|w| w[0] >= w[1]) {
            return Err(CoreError::bad(
                name,
                format!("must be strictly increasing, got {a} then {b}"),
            ));
        }
        self.pending = starts_ms
            .iter()
            .copied()
            .filter(|&b| b > self.start_ms)
            .collect();
        Ok(())
    }

    /// Move to the window that holds `now_ms`; true if a new window began.
    #[inline]
    pub fn advance(&mut self, now_ms: u64) -> bool {
        let mut rolled = false;
        while let Some(&b) = self.pending.front() {
            if b > now_ms {
                break;
            }
            self.pending.pop_front();
            if b > self.start_ms {
                self.start_ms = b;
                rolled = true;
            }
        }
        rolled
    }

    /// The next boundary, if Python supplied one.
    #[inline]
    pub fn next_ms(&self) -> Option<u64> {
        self.pending.front().copied()
    }

    /// How many pending boundaries come at or before `until_ms`.
    pub fn pending_until(&self, until_ms: u64) -> usize {
        self.pending.iter().take_while(|&&b| b <= until_ms).count()
    }

    pub fn start_ms(&self) -> u64 {
        self.start_ms
    }

    pub fn pending(&self) -> Vec<u64> {
        self.pending.iter().copied().collect()
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
