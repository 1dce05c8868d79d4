//! Counters written back from a snapshot and read for one, and retirement of IPs that are
//! no longer the plan's sending IPs.

use super::{parse_ip, Limiter, FLAG_RETIRED};
use crate::caps::Calendar;
use crate::error::CoreResult;

impl Limiter {
    // ----- restore (cold path) -----

    pub(crate) fn restore_key(&mut self, key: u32, tat_ns: u64, hour_used: u32, day_used: u32) {
        let s = &mut self.keys[key as usize];
        s.tat_ns = tat_ns;
        s.hour_used = hour_used;
        s.day_used = day_used;
    }

    /// Make every key's retired flag say what its IP's says (one pass over the keys).
    pub(crate) fn sync_retired(&mut self) {
        let ips = &self.ips;
        for s in &mut self.keys {
            if ips[s.ip as usize].retired {
                s.flags |= FLAG_RETIRED;
            } else {
                s.flags &= !FLAG_RETIRED;
            }
        }
    }

    /// Keep only `ips` as sending IPs: every other IP is retired (its keys never grant, and
    /// `find_ip` no longer knows it), every listed IP that was retired comes back. IPs the
    /// limiter never interned are ignored. All are parsed before anything changes, so a bad
    /// address changes nothing. Returns the handles this call retired.
    pub fn retain_ips(&mut self, ips: &[&str]) -> CoreResult<Vec<u32>> {
        let keep = ips
            .iter()
            .map(|a| parse_ip(a).map(|addr| self.lookup_ip(&addr)))
            .collect::<CoreResult<Vec<_>>>()?;
        let mut kept = vec![false; self.ips.len()];
        for h in keep.into_iter().flatten() {
            kept[h as usize] = true;
        }
        let mut newly = Vec::new();
        let mut changed = false;
        for (h, (slot, &keep)) in self.ips.iter_mut().zip(&kept).enumerate() {
            if slot.retired == keep {
                changed = true;
                slot.retired = !keep;
                if !keep {
                    newly.push(h as u32);
                }
            }
        }
        if changed {
            self.sync_retired();
        }
        Ok(newly)
    }

    /// Retire exactly the IPs listed (restoring a snapshot); handles are checked.
    pub(crate) fn restore_retired(&mut self, retired: &[u32]) -> CoreResult<()> {
        for &h in retired {
            self.check_ip(h)?;
            self.ips[h as usize].retired = true;
        }
        self.sync_retired();
        Ok(())
    }

    pub(crate) fn retired_ips(&self) -> Vec<u32> {
        (0..self.ips.len() as u32)
            .filter(|&h| self.ips[h as usize].retired)
            .collect()
    }

    pub(crate) fn restore_ip(&mut self, ip: u32, hour_used: u32, day_used: u32) {
        let s = &mut self.ips[ip as usize];
        s.hour_used = hour_used;
        s.day_used = day_used;
    }

    pub(crate) fn restore_calendar(&mut self, hours: Calendar, days: Calendar) {
        self.hours = hours;
        self.days = days;
        self.refresh_next_roll();
    }

    #[inline]
    pub(crate) fn day_used(&self, key: u32) -> u32 {
        self.keys[key as usize].day_used
    }

    pub(crate) fn ip_used(&self, ip: u32) -> (u32, u32) {
        let s = &self.ips[ip as usize];
        (s.hour_used, s.day_used)
    }
}
