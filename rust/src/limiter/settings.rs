//! The limits a key is held to (rate, caps, multiplier, pause, active hours, suspension)
//! and its IP's caps, as the caller sets them; `usage` reads them back with the counters.

use super::{check_now, Limiter, Limits, Profile, Usage, FLAG_HOURS, FLAG_RETIRED, FLAG_SUSPENDED};
use crate::caps::{cap_from, hour_bit, EVERY_HOUR, NO_CAP, UNKNOWN_HOUR};
use crate::error::{CoreError, CoreResult};
use crate::gcra::PPM;
use crate::reserve::NO_RESERVE;

/// A multiplier in [0, 1] as parts per million (rounded half up).
pub fn multiplier_ppm(multiplier: f64) -> CoreResult<u32> {
    if !(0.0..=1.0).contains(&multiplier) {
        return Err(CoreError::bad(
            "multiplier",
            format!("must be a number in [0, 1], got {multiplier}"),
        ));
    }
    Ok((multiplier * PPM as f64 + 0.5).floor() as u32)
}

impl Limiter {
    pub fn limits(&self, key: u32) -> CoreResult<Limits> {
        Ok(self.profiles[self.slot(key)?.profile as usize].limits)
    }

    /// Give `key` new limits; counters, the GCRA time and any suspension are kept.
    pub fn set_key_limits(&mut self, key: u32, limits: Limits) -> CoreResult<()> {
        self.slot(key)?;
        if limits.max_burst == 0 {
            return Err(CoreError::bad("max_burst", "must be at least 1, got 0"));
        }
        if (limits.rate_count == 0) != (limits.rate_period_ms == 0) {
            return Err(CoreError::bad(
                "rate",
                format!(
                    "count and period must both be set or both be 0, got {} per {} ms",
                    limits.rate_count, limits.rate_period_ms
                ),
            ));
        }
        if limits.active_hours > EVERY_HOUR {
            return Err(CoreError::bad(
                "active_hours",
                format!(
                    "must be a mask of hours 0 to 23 (below 2**24), got {}",
                    limits.active_hours
                ),
            ));
        }
        if u64::from(limits.multiplier_ppm) > PPM {
            return Err(CoreError::bad(
                "multiplier",
                format!("must be in [0, 1], got {} ppm", limits.multiplier_ppm),
            ));
        }
        let profile = match self.profile_index.get(&limits) {
            Some(&p) => p,
            None => {
                let compiled = Profile::compile(limits)?;
                let p = u32::try_from(self.profiles.len()).map_err(|_| CoreError::Overflow {
                    what: "profile count",
                })?;
                self.profiles.push(compiled);
                self.profile_index.insert(limits, p);
                p
            }
        };
        let s = &mut self.keys[key as usize];
        s.profile = profile;
        if self.profiles[profile as usize].hours & hour_bit(UNKNOWN_HOUR) == 0 {
            s.flags |= FLAG_HOURS;
        } else {
            s.flags &= !FLAG_HOURS;
        }
        self.reserve_new_caps(key);
        Ok(())
    }

    /// Set rate and caps, keeping the key's multiplier and pause.
    pub fn set_limits(
        &mut self,
        key: u32,
        rate: Option<(u64, u64)>,
        max_burst: u32,
        hourly_cap: Option<u64>,
        daily_cap: Option<u64>,
    ) -> CoreResult<()> {
        let old = self.limits(key)?;
        let (rate_count, rate_period_ms) = match rate {
            None => (0, 0),
            Some((0, _)) => return Err(CoreError::bad("rate_count", "must be at least 1, got 0")),
            Some((_, 0)) => {
                return Err(CoreError::bad(
                    "rate_period_ms",
                    "must be at least 1, got 0",
                ))
            }
            Some(r) => r,
        };
        self.set_key_limits(
            key,
            Limits {
                rate_count,
                rate_period_ms,
                max_burst,
                hourly_cap: cap_from("hourly_cap", hourly_cap)?,
                daily_cap: cap_from("daily_cap", daily_cap)?,
                ..old
            },
        )
    }

    pub fn set_multiplier(&mut self, key: u32, multiplier: f64) -> CoreResult<()> {
        let ppm = multiplier_ppm(multiplier)?;
        let old = self.limits(key)?;
        self.set_key_limits(
            key,
            Limits {
                multiplier_ppm: ppm,
                ..old
            },
        )
    }

    pub fn set_paused(&mut self, key: u32, paused: bool) -> CoreResult<()> {
        let old = self.limits(key)?;
        self.set_key_limits(key, Limits { paused, ..old })
    }

    /// The local hours (bit h: the hour from h:00, `EVERY_HOUR`: all) in which `key` may send;
    /// in any other hour it is denied `OutsideActiveHours`.
    pub fn set_active_hours(&mut self, key: u32, active_hours: u32) -> CoreResult<()> {
        let old = self.limits(key)?;
        self.set_key_limits(
            key,
            Limits {
                active_hours,
                ..old
            },
        )
    }

    /// Suspend `key` until `until_ms` (replacing any earlier deadline; 0 lifts it).
    pub fn suspend(&mut self, key: u32, until_ms: u64) -> CoreResult<()> {
        self.slot(key)?;
        check_now(until_ms)?;
        let slot = &mut self.keys[key as usize];
        if until_ms == 0 {
            slot.flags &= !FLAG_SUSPENDED;
            self.suspended.remove(&key);
        } else {
            slot.flags |= FLAG_SUSPENDED;
            self.suspended.insert(key, until_ms);
        }
        Ok(())
    }

    pub fn suspended_until_ms(&self, key: u32) -> u64 {
        self.suspended.get(&key).copied().unwrap_or(0)
    }

    pub fn set_ip_caps(
        &mut self,
        ip: u32,
        hourly_cap: Option<u64>,
        daily_cap: Option<u64>,
    ) -> CoreResult<()> {
        self.check_ip(ip)?;
        let hourly = cap_from("hourly_cap", hourly_cap)?;
        let daily = cap_from("daily_cap", daily_cap)?;
        let slot = &mut self.ips[ip as usize];
        slot.hourly_cap = hourly;
        slot.daily_cap = daily;
        if self.reserve.on && (hourly != NO_CAP || daily != NO_CAP) {
            for k in 0..self.keys.len() as u32 {
                if self.keys[k as usize].ip == ip {
                    self.reserve_new_caps(k);
                }
            }
        }
        Ok(())
    }

    pub fn ip_caps(&self, ip: u32) -> CoreResult<(u32, u32)> {
        self.check_ip(ip)?;
        let s = &self.ips[ip as usize];
        Ok((s.hourly_cap, s.daily_cap))
    }

    pub fn usage(&self, key: u32) -> CoreResult<Usage> {
        let s = *self.slot(key)?;
        let ip = &self.ips[s.ip as usize];
        Ok(Usage {
            limits: self.profiles[s.profile as usize].limits,
            hour_used: s.hour_used,
            day_used: s.day_used,
            tat_ns: s.tat_ns,
            suspended_until_ms: self.suspended_until_ms(key),
            ip_hour_used: ip.hour_used,
            ip_day_used: ip.day_used,
            reserve_left: (s.reserve_left != NO_RESERVE).then_some(s.reserve_left),
            retired: s.flags & FLAG_RETIRED != 0,
        })
    }
}
