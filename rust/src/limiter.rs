//! The per-key limiter: interning of (IP, provider) keys, their limits and counters, and the
//! `acquire` decision. IP selection lives in `pick.rs`, the release queue in `scheduler.rs`.

use std::hash::BuildHasher;
use std::net::IpAddr;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

use crate::caps::{
    cap_from, cap_wait, hour_bit, hours_bits, Calendar, EVERY_HOUR, NO_CAP, UNKNOWN_HOUR,
};
use crate::decision::{Decision, Reason, Tier};
use crate::error::{CoreError, CoreResult};
use crate::gcra::{self, NS_PER_MS, PPM};
use crate::reserve::{Reserve, NO_RESERVE};

/// Largest `now_ms` accepted (year 2255): keeps `now_ms * 1e6` inside u64.
pub const MAX_NOW_MS: u64 = 9_000_000_000_000;

/// The limits of one key as the caller set them (plain data; also what snapshots hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// `rate_count` per `rate_period_ms`; 0 and 0 mean no rate.
    pub rate_count: u64,
    pub rate_period_ms: u64,
    pub max_burst: u32,
    /// `NO_CAP` when uncapped.
    pub hourly_cap: u32,
    pub daily_cap: u32,
    /// 0..=1_000_000; 0 pauses the key like `paused`.
    pub multiplier_ppm: u32,
    pub paused: bool,
    /// The local hours of the day (bit h: the hour from h:00) in which the key may send;
    /// `EVERY_HOUR` when it is never closed.
    pub active_hours: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rate_count: 0,
            rate_period_ms: 0,
            max_burst: 1,
            hourly_cap: NO_CAP,
            daily_cap: NO_CAP,
            multiplier_ppm: PPM as u32,
            paused: false,
            active_hours: EVERY_HOUR,
        }
    }
}

/// Limits with everything derived that the hot path needs. Keys share profiles: a batch of
/// IPs on one schedule step has one profile per provider, so per-key state stays small.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Profile {
    pub(crate) limits: Limits,
    pub(crate) interval_ns: u64,
    pub(crate) hourly_cap: u32,
    pub(crate) daily_cap: u32,
    pub(crate) paused: bool,
    /// `hours_bits(limits.active_hours)`: tested against the current hour's bit.
    pub(crate) hours: u32,
}

impl Profile {
    fn compile(limits: Limits) -> CoreResult<Self> {
        let ppm = u64::from(limits.multiplier_ppm);
        let paused = limits.paused || ppm == 0;
        let interval_ns = if limits.rate_count == 0 || paused {
            0
        } else {
            gcra::interval_ns(limits.rate_count, limits.rate_period_ms, ppm)?
        };
        let scale = |cap: u32| {
            if cap == NO_CAP {
                NO_CAP
            } else {
                (u64::from(cap) * ppm / PPM) as u32
            }
        };
        Ok(Self {
            limits,
            interval_ns,
            hourly_cap: scale(limits.hourly_cap),
            daily_cap: scale(limits.daily_cap),
            paused,
            hours: hours_bits(limits.active_hours),
        })
    }
}

const FLAG_SUSPENDED: u16 = 1;
/// The key's IP is no longer a sending IP (`retain_ips`): it never grants.
const FLAG_RETIRED: u16 = 2;
/// The key's profile has active hours (it is not open every hour). Such a key always takes
/// the slow path (`evaluate_slow`), which reads the hour of day; keys open every hour (all
/// warm IPs) pay nothing for active hours.
const FLAG_HOURS: u16 = 4;

/// All per-key state: 32 bytes. Counters and the GCRA time are 16 of them; the rest says
/// which IP, provider and profile the key belongs to, and how much the key may still be
/// granted under the last durable reservation (`reserve.rs`). Suspension deadlines are rare
/// and live in a side table, flagged here.
#[derive(Debug, Clone, Copy)]
#[repr(align(32))] // two slots per cache line, none straddling two
pub(crate) struct KeySlot {
    pub(crate) tat_ns: u64,
    pub(crate) hour_used: u32,
    pub(crate) day_used: u32,
    pub(crate) profile: u32,
    pub(crate) ip: u32,
    /// Grants left under the reservation in force; `NO_RESERVE`: no reservation limits it.
    pub(crate) reserve_left: u32,
    pub(crate) provider: u16,
    flags: u16,
}

/// Per-IP state. The address is kept parsed (17 bytes, no heap) and printed on demand.
#[derive(Debug, Clone)]
pub(crate) struct IpSlot {
    pub(crate) addr: IpAddr,
    pub(crate) hour_used: u32,
    pub(crate) day_used: u32,
    pub(crate) hourly_cap: u32,
    pub(crate) daily_cap: u32,
    /// No longer a sending IP of the plan (`retain_ips`).
    pub(crate) retired: bool,
}

/// A key's counters and limits, for `limits`/`status` answers and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub limits: Limits,
    pub hour_used: u32,
    pub day_used: u32,
    pub tat_ns: u64,
    pub suspended_until_ms: u64,
    pub ip_hour_used: u32,
    pub ip_day_used: u32,
    /// Grants left under the reservation in force, `None` when none limits the key.
    pub reserve_left: Option<u32>,
    /// The key's IP was retired by `retain_ips`.
    pub retired: bool,
}

/// Outcome of evaluating one key: it fits (and the GCRA time it would set), or it is held.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyCheck {
    Fit(u64),
    Held(Reason, Option<u64>),
}

#[derive(Debug, Clone, Default)]
pub struct Limiter {
    pub(crate) keys: Vec<KeySlot>,
    key_index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    pub(crate) ips: Vec<IpSlot>,
    ip_index: HashTable<u32>,
    pub(crate) providers: Vec<String>,
    provider_index: HashMap<String, u16>,
    pub(crate) profiles: Vec<Profile>,
    profile_index: HashMap<Limits, u32>,
    suspended: HashMap<u32, u64>,
    pub(crate) hours: Calendar,
    pub(crate) days: Calendar,
    next_roll_ms: u64,
    /// Reservations against overshoot after a crash (`reserve.rs`); off until first used.
    pub(crate) reserve: Reserve,
}

fn pack(ip: u32, provider: u16) -> u64 {
    (u64::from(ip) << 16) | u64::from(provider)
}

pub fn check_now(now_ms: u64) -> CoreResult<()> {
    if now_ms > MAX_NOW_MS {
        return Err(CoreError::bad(
            "now_ms",
            format!("must be at most {MAX_NOW_MS}, got {now_ms}"),
        ));
    }
    Ok(())
}

pub fn check_n(n: u32) -> CoreResult<()> {
    if n == 0 {
        return Err(CoreError::bad("n", "must be at least 1, got 0"));
    }
    Ok(())
}

/// A parsed IP address, or an error naming what was given.
pub fn parse_ip(addr: &str) -> CoreResult<IpAddr> {
    addr.trim().parse::<IpAddr>().map_err(|_| {
        CoreError::bad(
            "ip",
            format!("must be an IPv4 or IPv6 address, got {addr:?}"),
        )
    })
}

fn check_provider_name(name: &str) -> CoreResult<()> {
    if name.is_empty() {
        return Err(CoreError::bad("provider", "must not be empty"));
    }
    Ok(())
}

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
    pub fn new() -> Self {
        let mut l = Self::default();
        l.profiles
            .push(Profile::compile(Limits::default()).expect("default limits compile"));
        l.profile_index.insert(Limits::default(), 0);
        l.next_roll_ms = u64::MAX;
        l
    }

    // ----- interning (cold path) -----

    pub fn provider(&mut self, name: &str) -> CoreResult<u16> {
        if let Some(&h) = self.provider_index.get(name) {
            return Ok(h);
        }
        check_provider_name(name)?;
        let h = u16::try_from(self.providers.len()).map_err(|_| CoreError::Overflow {
            what: "provider count (65536)",
        })?;
        self.providers.push(name.to_owned());
        self.provider_index.insert(name.to_owned(), h);
        Ok(h)
    }

    pub fn provider_handle(&self, name: &str) -> CoreResult<u16> {
        self.provider_index
            .get(name)
            .copied()
            .ok_or_else(|| CoreError::UnknownName {
                kind: "provider",
                name: name.to_owned(),
            })
    }

    /// Intern an IP; its text is normalised (`2001:DB8::1` and `2001:db8::1` are one IP).
    /// A retired IP keeps its handle and stays retired (`retain_ips` brings it back).
    pub fn ip(&mut self, addr: &str) -> CoreResult<u32> {
        let parsed = parse_ip(addr)?;
        if let Some(h) = self.lookup_ip(&parsed) {
            return Ok(h);
        }
        let h =
            u32::try_from(self.ips.len()).map_err(|_| CoreError::Overflow { what: "ip count" })?;
        self.ips.push(IpSlot {
            addr: parsed,
            hour_used: 0,
            day_used: 0,
            hourly_cap: NO_CAP,
            daily_cap: NO_CAP,
            retired: false,
        });
        let (ips, hasher) = (&self.ips, &self.hasher);
        self.ip_index
            .insert_unique(hasher.hash_one(parsed), h, |&i| {
                hasher.hash_one(ips[i as usize].addr)
            });
        Ok(h)
    }

    /// The handle of a sending IP: interned and not retired by `retain_ips`. This is how the
    /// wire protocol tells a sending IP from one the plan never had (or dropped).
    pub fn find_ip(&self, addr: &IpAddr) -> Option<u32> {
        self.lookup_ip(addr)
            .filter(|&h| !self.ips[h as usize].retired)
    }

    /// The handle of an interned address, retired or not (the index stores handles and
    /// hashes addresses).
    pub(crate) fn lookup_ip(&self, addr: &IpAddr) -> Option<u32> {
        let ips = &self.ips;
        self.ip_index
            .find(self.hasher.hash_one(addr), |&i| {
                ips[i as usize].addr == *addr
            })
            .copied()
    }

    /// The handle of (ip, provider), by handles; interned on first use.
    pub fn key_of(&mut self, ip: u32, provider: u16) -> CoreResult<u32> {
        self.check_ip(ip)?;
        if usize::from(provider) >= self.providers.len() {
            return Err(CoreError::UnknownHandle {
                kind: "provider",
                handle: u64::from(provider),
            });
        }
        let packed = pack(ip, provider);
        let hash = self.hasher.hash_one(packed);
        let keys = &self.keys;
        if let Some(&k) = self.key_index.find(hash, |&k| {
            pack(keys[k as usize].ip, keys[k as usize].provider) == packed
        }) {
            return Ok(k);
        }
        let k = u32::try_from(self.keys.len())
            .map_err(|_| CoreError::Overflow { what: "key count" })?;
        let ip_slot = &self.ips[ip as usize];
        let flags = if ip_slot.retired { FLAG_RETIRED } else { 0 };
        // A new key has the default profile (uncapped): only its IP's caps can limit it.
        let ip_capped = ip_slot.hourly_cap != NO_CAP || ip_slot.daily_cap != NO_CAP;
        let reserve_left = if self.reserve.on && ip_capped {
            0
        } else {
            NO_RESERVE
        };
        self.keys.push(KeySlot {
            tat_ns: 0,
            hour_used: 0,
            day_used: 0,
            profile: 0,
            ip,
            reserve_left,
            provider,
            flags,
        });
        let (keys, hasher) = (&self.keys, &self.hasher);
        self.key_index.insert_unique(hash, k, |&k| {
            let s = &keys[k as usize];
            hasher.hash_one(pack(s.ip, s.provider))
        });
        Ok(k)
    }

    /// The handle of (ip, provider) by name; both are interned on first use.
    pub fn key(&mut self, ip: &str, provider: &str) -> CoreResult<u32> {
        // Check both names before interning either, so a bad call changes nothing.
        check_provider_name(provider)?;
        parse_ip(ip)?;
        let ip = self.ip(ip)?;
        let provider = self.provider(provider)?;
        self.key_of(ip, provider)
    }

    /// (ip, provider) of a key, as text.
    pub fn key_names(&self, key: u32) -> CoreResult<(String, &str)> {
        let s = self.slot(key)?;
        Ok((
            self.ips[s.ip as usize].addr.to_string(),
            &self.providers[usize::from(s.provider)],
        ))
    }

    pub fn key_ip(&self, key: u32) -> CoreResult<u32> {
        Ok(self.slot(key)?.ip)
    }

    /// (ip handle, provider handle) of a key this limiter issued.
    pub(crate) fn key_handles(&self, key: u32) -> (u32, u16) {
        let s = &self.keys[key as usize];
        (s.ip, s.provider)
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn slot(&self, key: u32) -> CoreResult<&KeySlot> {
        self.keys.get(key as usize).ok_or(CoreError::UnknownHandle {
            kind: "key",
            handle: u64::from(key),
        })
    }

    fn check_ip(&self, ip: u32) -> CoreResult<()> {
        if (ip as usize) < self.ips.len() {
            Ok(())
        } else {
            Err(CoreError::UnknownHandle {
                kind: "ip",
                handle: u64::from(ip),
            })
        }
    }

    // ----- limits (cold path) -----

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

    fn refresh_next_roll(&mut self) {
        let h = self.hours.next_ms().unwrap_or(u64::MAX);
        let d = self.days.next_ms().unwrap_or(u64::MAX);
        self.next_roll_ms = h.min(d).min(self.hours.hour_expiry_ms());
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

    /// May `key` send `n` more now? All or nothing; charged when granted.
    #[inline(always)]
    pub fn acquire(&mut self, key: u32, n: u32, now_ms: u64) -> CoreResult<Decision> {
        if key as usize >= self.keys.len() {
            return Err(CoreError::UnknownHandle {
                kind: "key",
                handle: u64::from(key),
            });
        }
        check_n(n)?;
        check_now(now_ms)?;
        self.advance(now_ms);
        Ok(self.decide(key, n, now_ms, Tier::Direct))
    }

    #[inline(always)]
    pub(crate) fn decide(&mut self, key: u32, n: u32, now_ms: u64, tier: Tier) -> Decision {
        match self.evaluate(key, n, now_ms) {
            KeyCheck::Fit(tat) => {
                self.commit(key, n, tat);
                Decision {
                    granted: n,
                    reason: Reason::Granted,
                    retry_after_ms: Some(0),
                    key,
                    tier,
                }
            }
            KeyCheck::Held(reason, retry_after_ms) => Decision {
                granted: 0,
                reason,
                retry_after_ms,
                key,
                tier,
            },
        }
    }

    /// Decide many (key, n) requests at one `now_ms`, in order, appending to `out`.
    /// Every request is checked before any is decided, so bad input changes nothing.
    pub fn acquire_batch<I>(
        &mut self,
        requests: I,
        now_ms: u64,
        out: &mut Vec<Decision>,
    ) -> CoreResult<()>
    where
        I: ExactSizeIterator<Item = (u32, u32)> + Clone,
    {
        check_now(now_ms)?;
        let nkeys = self.keys.len();
        // The checking pass also reads each request's key and IP, so the cache misses of a
        // large batch overlap here instead of stalling the deciding pass one by one.
        let mut touched = 0u32;
        for (i, (key, n)) in requests.clone().enumerate() {
            if key as usize >= nkeys {
                return Err(CoreError::UnknownHandle {
                    kind: "key",
                    handle: u64::from(key),
                });
            }
            if n == 0 {
                return Err(CoreError::bad("counts", format!("request {i} asks for 0")));
            }
            let slot = &self.keys[key as usize];
            touched ^= slot.hour_used ^ self.ips[slot.ip as usize].hour_used;
        }
        std::hint::black_box(touched);
        self.advance(now_ms);
        out.reserve(requests.len());
        for (key, n) in requests {
            out.push(self.decide(key, n, now_ms, Tier::Direct));
        }
        Ok(())
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    fn engine_with_key() -> (Limiter, u32) {
        let mut l = Limiter::new();
        let k = l.key("192.0.2.10", "google").unwrap();
        (l, k)
    }

    #[test]
    fn key_slot_is_32_bytes() {
        assert_eq!(std::mem::size_of::<KeySlot>(), 32);
    }

    #[test]
    fn keys_intern_once_and_normalise_ips() {
        let mut l = Limiter::new();
        let a = l.key("2001:DB8::1", "google").unwrap();
        let b = l.key("2001:db8::1", "google").unwrap();
        let c = l.key("2001:db8::1", "yahoo").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            l.key_names(a).unwrap(),
            ("2001:db8::1".to_owned(), "google")
        );
        assert!(l.key("not-an-ip", "google").is_err());
        assert!(l.key("192.0.2.1", "").is_err());
    }

    #[test]
    fn unlimited_key_grants() {
        let (mut l, k) = engine_with_key();
        let d = l.acquire(k, 1000, 5).unwrap();
        assert_eq!(d.granted, 1000);
        assert_eq!(l.usage(k).unwrap().day_used, 1000);
    }

    #[test]
    fn hourly_cap_holds_until_the_next_boundary() {
        let (mut l, k) = engine_with_key();
        l.set_limits(k, None, 1, Some(3), None).unwrap();
        l.set_calendar(&[H, 2 * H], &[]).unwrap();
        for _ in 0..3 {
            assert!(l.acquire(k, 1, 10).unwrap().is_granted());
        }
        let d = l.acquire(k, 1, 10).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::HourlyCap, Some(H - 10))
        );
        assert!(l.acquire(k, 1, H).unwrap().is_granted());
        // No boundary after 2H: the window goes on and no retry time is known.
        l.acquire(k, 2, 2 * H).unwrap();
        l.acquire(k, 1, 2 * H).unwrap();
        let d = l.acquire(k, 1, 5 * H).unwrap();
        assert_eq!((d.reason, d.retry_after_ms), (Reason::HourlyCap, None));
    }

    #[test]
    fn rate_spreads_evenly() {
        let (mut l, k) = engine_with_key();
        // 500/h: one every 7.2 s.
        l.set_limits(k, Some((500, H)), 1, None, None).unwrap();
        assert!(l.acquire(k, 1, 0).unwrap().is_granted());
        let d = l.acquire(k, 1, 1000).unwrap();
        assert_eq!((d.reason, d.retry_after_ms), (Reason::Rate, Some(6200)));
        assert!(l.acquire(k, 1, 7200).unwrap().is_granted());
        // Asking for more than the burst can never succeed.
        let d = l.acquire(k, 2, 100_000).unwrap();
        assert_eq!((d.reason, d.retry_after_ms), (Reason::Rate, None));
    }

    #[test]
    fn multiplier_slows_rate_and_caps() {
        let (mut l, k) = engine_with_key();
        l.set_limits(k, Some((10, 1000)), 1, Some(10), None)
            .unwrap();
        l.set_multiplier(k, 0.5).unwrap();
        assert_eq!(l.limits(k).unwrap().multiplier_ppm, 500_000);
        assert!(l.acquire(k, 1, 0).unwrap().is_granted());
        let d = l.acquire(k, 1, 100).unwrap();
        assert_eq!((d.reason, d.retry_after_ms), (Reason::Rate, Some(100)));
        for i in 1..5 {
            assert!(l.acquire(k, 1, i * 200).unwrap().is_granted());
        }
        let d = l.acquire(k, 1, 10_000).unwrap();
        assert_eq!(d.reason, Reason::HourlyCap);
        assert!(l.set_multiplier(k, f64::NAN).is_err());
        assert!(l.set_multiplier(k, 1.5).is_err());
        l.set_multiplier(k, 0.0).unwrap();
        assert_eq!(l.acquire(k, 1, 20_000).unwrap().reason, Reason::Paused);
    }

    #[test]
    fn suspension_and_pause_take_precedence() {
        let (mut l, k) = engine_with_key();
        l.set_limits(k, Some((1, 1000)), 1, None, None).unwrap();
        l.acquire(k, 1, 0).unwrap();
        l.suspend(k, 500).unwrap();
        let d = l.acquire(k, 1, 100).unwrap();
        // Reason: suspended; wait: the longer of suspension (400) and rate (900).
        assert_eq!((d.reason, d.retry_after_ms), (Reason::Suspended, Some(900)));
        assert!(l.acquire(k, 1, 1000).unwrap().is_granted());
        l.set_paused(k, true).unwrap();
        assert_eq!(l.acquire(k, 1, 9000).unwrap().reason, Reason::Paused);
        l.set_paused(k, false).unwrap();
        l.suspend(k, 0).unwrap();
        assert!(l.acquire(k, 1, 9000).unwrap().is_granted());
    }

    #[test]
    fn ip_caps_span_providers() {
        let mut l = Limiter::new();
        let g = l.key("192.0.2.10", "google").unwrap();
        let y = l.key("192.0.2.10", "yahoo").unwrap();
        let ip = l.key_ip(g).unwrap();
        l.set_ip_caps(ip, None, Some(3)).unwrap();
        l.set_calendar(&[], &[86_400_000]).unwrap();
        l.acquire(g, 2, 0).unwrap();
        l.acquire(y, 1, 0).unwrap();
        let d = l.acquire(y, 1, 0).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::IpDailyCap, Some(86_400_000))
        );
        assert!(l.acquire(g, 1, 86_400_000).unwrap().is_granted());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let (mut l, k) = engine_with_key();
        assert!(l.acquire(k + 1, 1, 0).is_err());
        assert!(l.acquire(k, 0, 0).is_err());
        assert!(l.acquire(k, 1, MAX_NOW_MS + 1).is_err());
        assert!(l.set_limits(k, Some((0, 1000)), 1, None, None).is_err());
        assert!(l.set_limits(k, Some((1, 0)), 1, None, None).is_err());
        assert!(l.set_limits(k, None, 0, None, None).is_err());
        assert!(l
            .set_limits(k, None, 1, Some(u64::from(u32::MAX)), None)
            .is_err());
        assert!(l.set_calendar(&[2, 1], &[]).is_err());
    }

    #[test]
    fn profiles_are_shared() {
        let mut l = Limiter::new();
        for i in 0..100 {
            let k = l.key(&format!("10.0.0.{i}"), "google").unwrap();
            l.set_limits(k, Some((500, H)), 10, Some(500), Some(5000))
                .unwrap();
        }
        assert_eq!(l.profiles.len(), 2);
    }

    /// Hours 0..48 from 0, each labelled with its hour of day; the day starts at 24 H.
    fn local_day(l: &mut Limiter) {
        let starts: Vec<u64> = (0..48).map(|i| i * H).collect();
        let of_day: Vec<u8> = (0..48).map(|i| (i % 24) as u8).collect();
        l.set_local_calendar(&starts, &[24 * H], Some(&of_day))
            .unwrap();
    }

    /// Active hours 07-22 as a mask.
    const DAYTIME: u32 = ((1 << 22) - 1) & !((1 << 7) - 1);

    #[test]
    fn outside_active_hours_waits_for_the_next_opening() {
        let (mut l, k) = engine_with_key();
        l.set_limits(k, Some((60, H)), 1, Some(10), Some(100))
            .unwrap();
        l.set_active_hours(k, DAYTIME).unwrap();
        local_day(&mut l);
        // 03:30: closed until 07:00.
        let d = l.acquire(k, 1, 3 * H + H / 2).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::OutsideActiveHours, Some(3 * H + H / 2))
        );
        assert!(!l.acquire(k, 1, 7 * H - 1).unwrap().is_granted());
        assert!(l.acquire(k, 1, 7 * H).unwrap().is_granted());
        // 21:59:59: the rate's wait (a minute) ends after 22:00, so the wait runs to 07:00.
        assert!(l.acquire(k, 1, 22 * H - 1000).unwrap().is_granted());
        let d = l.acquire(k, 1, 22 * H - 500).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::Rate, Some(31 * H - (22 * H - 500)))
        );
        // A cap whose window ends in a closed hour: the wait runs to the next opening too.
        let (mut l, k) = engine_with_key();
        l.set_limits(k, None, 1, Some(1), None).unwrap();
        l.set_active_hours(k, DAYTIME).unwrap();
        local_day(&mut l);
        assert!(l.acquire(k, 1, 21 * H).unwrap().is_granted());
        let d = l.acquire(k, 1, 21 * H + 5).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::HourlyCap, Some(10 * H - 5))
        );
        // Past the last boundary supplied, no opening is known.
        let d = l.acquire(k, 1, 47 * H + 1).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::OutsideActiveHours, None)
        );
    }

    #[test]
    fn hours_of_day_come_from_the_calendar() {
        let (mut l, k) = engine_with_key();
        l.set_active_hours(k, DAYTIME).unwrap();
        // No hour of day known: a key with active hours is closed, with no known opening;
        // a key open every hour is not.
        let open = l.key("192.0.2.10", "yahoo").unwrap();
        let d = l.acquire(k, 1, 10).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::OutsideActiveHours, None)
        );
        assert!(l.acquire(open, 1, 10).unwrap().is_granted());
        // A DST-like day: hour 2 is skipped (01:00 is followed by 03:00).
        let starts = [H, 2 * H, 3 * H, 8 * H];
        l.set_local_calendar(&starts, &[], Some(&[1, 3, 4, 9]))
            .unwrap();
        l.set_active_hours(k, 1 << 2 | 1 << 9).unwrap();
        let d = l.acquire(k, 1, H).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::OutsideActiveHours, Some(7 * H))
        );
        // Re-supplying the current hour's start names the current hour.
        l.set_local_calendar(&[H, 2 * H], &[], Some(&[9, 10]))
            .unwrap();
        assert!(l.acquire(k, 1, H + 1).unwrap().is_granted());
        // Without hours of day the pending hours are unknown: closed after the boundary.
        l.set_calendar(&[2 * H], &[]).unwrap();
        let d = l.acquire(k, 1, 2 * H).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::OutsideActiveHours, None)
        );
        // An hour of day is known for an hour at most: a calendar that runs out does not
        // keep the key open into hours nobody named.
        l.set_local_calendar(&[3 * H], &[], Some(&[9])).unwrap();
        assert!(l.acquire(k, 1, 4 * H - 1).unwrap().is_granted());
        let d = l.acquire(k, 1, 4 * H).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::OutsideActiveHours, None)
        );
        // Bad hours of day and masks are errors that change nothing.
        assert!(l.set_local_calendar(&[3 * H], &[], Some(&[24])).is_err());
        assert!(l.set_local_calendar(&[3 * H], &[], Some(&[1, 2])).is_err());
        assert!(l.set_active_hours(k, 1 << 24).is_err());
        assert_eq!(l.limits(k).unwrap().active_hours, 1 << 2 | 1 << 9);
    }

    #[test]
    fn pause_and_retirement_come_before_active_hours() {
        let (mut l, k) = engine_with_key();
        l.set_active_hours(k, DAYTIME).unwrap();
        local_day(&mut l);
        l.suspend(k, 9 * H).unwrap();
        let d = l.acquire(k, 1, H).unwrap();
        // Closed and suspended: named for the hours, waiting for the later of the two.
        assert_eq!(
            (d.reason, d.retry_after_ms),
            (Reason::OutsideActiveHours, Some(8 * H))
        );
        l.set_paused(k, true).unwrap();
        assert_eq!((l.acquire(k, 1, H).unwrap().reason), Reason::Paused);
    }
}
