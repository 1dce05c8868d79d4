//! The per-key limiter: what a key (IP, provider) is, its limits and counters, and the
//! `acquire` decision. Interning lives in `tables.rs`, limit setting in `settings.rs`, the
//! per-key check in `check.rs`, `acquire` in `acquire.rs`, snapshot glue and retirement in
//! `restore.rs`. IP selection lives in `pick.rs`, the release queue in `scheduler.rs`.

use std::net::IpAddr;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

use crate::caps::{hours_bits, Calendar, EVERY_HOUR, NO_CAP};
use crate::error::{CoreError, CoreResult};
use crate::gcra::{self, PPM};
use crate::reserve::Reserve;

mod acquire;
mod check;
mod restore;
mod settings;
mod tables;
#[cfg(test)]
mod tests;

pub(crate) use check::KeyCheck;
pub use settings::multiplier_ppm;
pub use tables::parse_ip;

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

impl Limiter {
    pub fn new() -> Self {
        let mut l = Self::default();
        l.profiles
            .push(Profile::compile(Limits::default()).expect("default limits compile"));
        l.profile_index.insert(Limits::default(), 0);
        l.next_roll_ms = u64::MAX;
        l
    }
}
