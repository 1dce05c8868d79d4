//! Snapshot and restore as plain data, so counts survive restarts.
//!
//! A snapshot holds everything an Engine knows: providers, IPs and keys in handle order (so
//! handles stay valid across a restore), limits, counters, suspensions, the calendar, pools,
//! the queue, retired IPs, and (from `Engine::reservation_snapshot`) each key's reservation.
//! `Engine::from_snapshot` rebuilds through the ordinary, checked setters, so a corrupt
//! snapshot is an error, never a broken engine.
//!
//! Versions: each appends fields to the one before. 3 adds the calendar's hours of day and
//! the keys' active hours; 2 adds `retired_ips` and `reservation`. Versions 1 and 2 (binary
//! or plain data) still restore, without what came later.

use crate::caps::{cap_from, cap_to, Calendar, EVERY_HOUR, UNKNOWN_HOUR};
use crate::engine::Engine;
use crate::error::{CoreError, CoreResult};
use crate::limiter::{check_now, Limits};
use crate::pick::Member;

pub const SNAPSHOT_VERSION: u32 = 3;
/// The first bytes of a binary snapshot (`Snapshot::to_bytes`).
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"KILNSNAP";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IpState {
    pub ip: String,
    pub hourly_cap: Option<u64>,
    pub daily_cap: Option<u64>,
    pub hour_used: u32,
    pub day_used: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyState {
    pub ip: u32,
    pub provider: u16,
    pub rate_count: u64,
    pub rate_period_ms: u64,
    pub max_burst: u32,
    pub hourly_cap: Option<u64>,
    pub daily_cap: Option<u64>,
    pub multiplier_ppm: u32,
    pub paused: bool,
    pub tat_ns: u64,
    pub hour_used: u32,
    pub day_used: u32,
    pub suspended_until_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolState {
    pub name: String,
    /// (ip handle, weight, warming)
    pub members: Vec<(u32, u32, bool)>,
    pub overflow: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuedState {
    pub id: u64,
    pub pool: u32,
    pub provider: u16,
    pub priority: i32,
    pub n: u32,
}

/// What a reservation snapshot reserved: each key's block, in key handle order
/// (`reserve::NO_RESERVE` for a key no cap limits).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    /// `now_ms` of the reservation snapshot.
    pub taken_ms: u64,
    pub blocks: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub hour_start_ms: u64,
    pub hour_pending_ms: Vec<u64>,
    pub day_start_ms: u64,
    pub day_pending_ms: Vec<u64>,
    pub providers: Vec<String>,
    pub ips: Vec<IpState>,
    pub keys: Vec<KeyState>,
    pub pools: Vec<PoolState>,
    pub queue: Vec<QueuedState>,
    /// IP handles retired by `retain_ips` (version 2).
    pub retired_ips: Vec<u32>,
    /// Set by `reservation_snapshot` only (version 2).
    pub reservation: Option<Reservation>,
    /// The local hour of day of the current calendar hour, `UNKNOWN_HOUR` if never named
    /// (version 3).
    pub hour_of_day: u8,
    /// The hour of day of each of `hour_pending_ms` (version 3; `UNKNOWN_HOUR` where unknown).
    pub hour_pending_of_day: Vec<u8>,
    /// (key handle, active hours mask) of every key not open every hour (version 3).
    pub active_hours: Vec<(u32, u32)>,
}

/// The fields every version has, first in the binary layout (postcard writes a struct as its
/// fields in order, with nothing between): version 1 is exactly these. Later versions
/// append, so `Snapshot` must list these first, in this order, then `V2Tail`, `V3Tail`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Common {
    version: u32,
    hour_start_ms: u64,
    hour_pending_ms: Vec<u64>,
    day_start_ms: u64,
    day_pending_ms: Vec<u64>,
    providers: Vec<String>,
    ips: Vec<IpState>,
    keys: Vec<KeyState>,
    pools: Vec<PoolState>,
    queue: Vec<QueuedState>,
}

/// What version 2 appended: `retired_ips`, `reservation`.
type V2Tail = (Vec<u32>, Option<Reservation>);
/// What version 3 appended: `hour_of_day`, `hour_pending_of_day`, `active_hours`.
type V3Tail = (u8, Vec<u8>, Vec<(u32, u32)>);

/// One value from the front of `bytes`, and what follows it.
fn take<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> CoreResult<(T, &'a [u8])> {
    postcard::take_from_bytes(bytes).map_err(|e| corrupt(&e))
}

fn corrupt(e: &postcard::Error) -> CoreError {
    CoreError::bad("snapshot", format!("corrupt binary snapshot: {e}"))
}

impl Snapshot {
    /// A compact binary form (magic, then postcard), for the daemon's frequent flushes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let out = SNAPSHOT_MAGIC.to_vec();
        postcard::to_extend(self, out).expect("a snapshot always encodes")
    }

    /// Read `to_bytes` output back (this version's or an earlier one's); anything else is an
    /// error, never a panic.
    pub fn from_bytes(data: &[u8]) -> CoreResult<Self> {
        let body = data
            .strip_prefix(SNAPSHOT_MAGIC.as_slice())
            .ok_or_else(|| {
                CoreError::bad("snapshot", "not a kiln binary snapshot (bad magic bytes)")
            })?;
        // Every version starts with its number.
        let (version, _) = take::<u32>(body)?;
        if !(1..=SNAPSHOT_VERSION).contains(&version) {
            return Err(CoreError::bad(
                "version",
                format!(
                    "this engine reads snapshot versions 1 to {SNAPSHOT_VERSION}, got {version}"
                ),
            ));
        }
        // Each version is the one before with fields appended; what an older one lacks is
        // what a fresh engine has.
        let (c, rest) = take::<Common>(body)?;
        let ((retired_ips, reservation), rest) = if version >= 2 {
            take::<V2Tail>(rest)?
        } else {
            ((Vec::new(), None), rest)
        };
        let ((hour_of_day, hour_pending_of_day, active_hours), rest) = if version >= 3 {
            take::<V3Tail>(rest)?
        } else {
            let unknown = vec![UNKNOWN_HOUR; c.hour_pending_ms.len()];
            ((UNKNOWN_HOUR, unknown, Vec::new()), rest)
        };
        if !rest.is_empty() {
            return Err(CoreError::bad(
                "snapshot",
                format!("corrupt binary snapshot: {} trailing bytes", rest.len()),
            ));
        }
        Ok(Snapshot {
            version: c.version,
            hour_start_ms: c.hour_start_ms,
            hour_pending_ms: c.hour_pending_ms,
            day_start_ms: c.day_start_ms,
            day_pending_ms: c.day_pending_ms,
            providers: c.providers,
            ips: c.ips,
            keys: c.keys,
            pools: c.pools,
            queue: c.queue,
            retired_ips,
            reservation,
            hour_of_day,
            hour_pending_of_day,
            active_hours,
        })
    }
}

impl Engine {
    pub fn snapshot(&self) -> Snapshot {
        let l = &self.limiter;
        let ips = (0..l.ips.len() as u32)
            .map(|ip| {
                let (hourly, daily) = l.ip_caps(ip).expect("own ip");
                let (hour_used, day_used) = l.ip_used(ip);
                IpState {
                    ip: l.ips[ip as usize].addr.to_string(),
                    hourly_cap: cap_to(hourly),
                    daily_cap: cap_to(daily),
                    hour_used,
                    day_used,
                }
            })
            .collect();
        let active_hours = (0..l.key_count() as u32)
            .filter_map(|k| {
                let hours = l.limits(k).expect("own key").active_hours;
                (hours != EVERY_HOUR).then_some((k, hours))
            })
            .collect();
        let keys = (0..l.key_count() as u32)
            .map(|k| {
                let u = l.usage(k).expect("own key");
                let (ip, provider) = l.key_handles(k);
                KeyState {
                    ip,
                    provider,
                    rate_count: u.limits.rate_count,
                    rate_period_ms: u.limits.rate_period_ms,
                    max_burst: u.limits.max_burst,
                    hourly_cap: cap_to(u.limits.hourly_cap),
                    daily_cap: cap_to(u.limits.daily_cap),
                    multiplier_ppm: u.limits.multiplier_ppm,
                    paused: u.limits.paused,
                    tat_ns: u.tat_ns,
                    hour_used: u.hour_used,
                    day_used: u.day_used,
                    suspended_until_ms: u.suspended_until_ms,
                }
            })
            .collect();
        let pools = self
            .pools
            .pools
            .iter()
            .map(|p| PoolState {
                name: p.name.clone(),
                members: p
                    .members
                    .iter()
                    .map(|m| (m.ip, m.weight, m.warming))
                    .collect(),
                overflow: p.overflow,
            })
            .collect();
        let queue = self
            .scheduler
            .entries()
            .into_iter()
            .map(|(id, pool, provider, priority, n)| QueuedState {
                id,
                pool,
                provider,
                priority,
                n,
            })
            .collect();
        Snapshot {
            version: SNAPSHOT_VERSION,
            hour_start_ms: l.hours.start_ms(),
            hour_pending_ms: l.hours.pending(),
            day_start_ms: l.days.start_ms(),
            day_pending_ms: l.days.pending(),
            providers: l.providers.clone(),
            ips,
            keys,
            pools,
            queue,
            retired_ips: l.retired_ips(),
            reservation: None,
            hour_of_day: l.hours.hour(),
            hour_pending_of_day: l.hours.pending_hours(),
            active_hours,
        }
    }

    /// A snapshot that also reserves (`Limiter::reserve`): each capped key's block, and the
    /// token to give `commit_reservation` once the snapshot is durable.
    pub fn reservation_snapshot(
        &mut self,
        now_ms: u64,
        ahead_ms: u64,
        floor: u32,
    ) -> CoreResult<(Snapshot, u64)> {
        let (token, reservation) = self.reserve(now_ms, ahead_ms, floor)?;
        let mut s = self.snapshot();
        s.reservation = Some(reservation);
        Ok((s, token))
    }

    /// The reserving half of `reservation_snapshot`: each capped key's block, held to it
    /// from now on, and the token. A snapshot of the engine as it is right after this (a
    /// clone taken under the same lock will do, snapshotted later) carries the reservation.
    pub fn reserve(
        &mut self,
        now_ms: u64,
        ahead_ms: u64,
        floor: u32,
    ) -> CoreResult<(u64, Reservation)> {
        let (token, blocks) = self.limiter.reserve(now_ms, ahead_ms, floor)?;
        Ok((
            token,
            Reservation {
                taken_ms: now_ms,
                blocks,
            },
        ))
    }

    /// `from_snapshot`, then, with `now_ms`: roll the calendar to `now_ms` and charge each
    /// key's reserved block (if the snapshot reserved) to the windows current then.
    pub fn restore_at(s: &Snapshot, now_ms: Option<u64>) -> CoreResult<Self> {
        let mut e = Self::from_snapshot(s)?;
        if let Some(now_ms) = now_ms {
            check_now(now_ms)?;
            match &s.reservation {
                Some(r) => e.limiter.charge_blocks(&r.blocks, now_ms)?,
                None => e.limiter.advance(now_ms),
            }
        }
        Ok(e)
    }

    /// Build an engine from a snapshot; the snapshot is checked as it is replayed.
    pub fn from_snapshot(s: &Snapshot) -> CoreResult<Self> {
        check_version(s)?;
        let mut e = Engine::new();
        for name in &s.providers {
            let before = e.limiter.providers.len();
            e.limiter.provider(name)?;
            if e.limiter.providers.len() == before {
                return Err(CoreError::bad(
                    "providers",
                    format!("{name:?} is listed twice"),
                ));
            }
        }
        for (i, ip) in s.ips.iter().enumerate() {
            let h = e.limiter.ip(&ip.ip)?;
            if h as usize != i {
                return Err(CoreError::bad(
                    "ips",
                    format!("{:?} is listed twice", ip.ip),
                ));
            }
            e.limiter.set_ip_caps(h, ip.hourly_cap, ip.daily_cap)?;
            e.limiter.restore_ip(h, ip.hour_used, ip.day_used);
        }
        for (i, k) in s.keys.iter().enumerate() {
            let h = e.limiter.key_of(k.ip, k.provider)?;
            if h as usize != i {
                return Err(CoreError::bad("keys", format!("key {i} repeats key {h}")));
            }
            e.limiter.set_key_limits(
                h,
                Limits {
                    rate_count: k.rate_count,
                    rate_period_ms: k.rate_period_ms,
                    max_burst: k.max_burst,
                    hourly_cap: cap_from("hourly_cap", k.hourly_cap)?,
                    daily_cap: cap_from("daily_cap", k.daily_cap)?,
                    multiplier_ppm: k.multiplier_ppm,
                    paused: k.paused,
                    active_hours: EVERY_HOUR,
                },
            )?;
            e.limiter.suspend(h, k.suspended_until_ms)?;
            e.limiter.restore_key(h, k.tat_ns, k.hour_used, k.day_used);
        }
        for p in &s.pools {
            let members = p
                .members
                .iter()
                .map(|&(ip, weight, warming)| {
                    e.limiter.ip_caps(ip)?;
                    Ok(Member {
                        ip,
                        weight,
                        warming,
                    })
                })
                .collect::<CoreResult<Vec<_>>>()?;
            e.pools.define(&p.name, members, p.overflow)?;
        }
        for &(k, hours) in &s.active_hours {
            if k as usize >= s.keys.len() {
                return Err(CoreError::bad(
                    "active_hours",
                    format!("names key {k} of {}", s.keys.len()),
                ));
            }
            e.limiter.set_active_hours(k, hours)?;
        }
        e.limiter.restore_calendar(
            Calendar::with_hours(
                s.hour_start_ms,
                s.hour_of_day,
                &s.hour_pending_ms,
                Some(&s.hour_pending_of_day),
            )?,
            Calendar::new(s.day_start_ms, &s.day_pending_ms)?,
        );
        for m in &s.queue {
            e.enqueue(m.id, m.pool, m.provider, m.priority, m.n)?;
        }
        e.limiter.restore_retired(&s.retired_ips)?;
        if let Some(r) = &s.reservation {
            if r.blocks.len() != s.keys.len() {
                return Err(CoreError::bad(
                    "reservation",
                    format!("has {} blocks for {} keys", r.blocks.len(), s.keys.len()),
                ));
            }
        }
        e.limiter.restore_reservations(s.reservation.is_some());
        Ok(e)
    }
}

/// What the snapshot's version may hold: each version restores with nothing that came later.
fn check_version(s: &Snapshot) -> CoreResult<()> {
    if !(1..=SNAPSHOT_VERSION).contains(&s.version) {
        return Err(CoreError::bad(
            "version",
            format!(
                "this engine reads snapshot versions 1 to {SNAPSHOT_VERSION}, got {}",
                s.version
            ),
        ));
    }
    if s.version == 1 && (!s.retired_ips.is_empty() || s.reservation.is_some()) {
        return Err(CoreError::bad(
            "version",
            "a version 1 snapshot has no retired_ips or reservation",
        ));
    }
    let hours_named =
        s.hour_of_day != UNKNOWN_HOUR || s.hour_pending_of_day.iter().any(|&h| h != UNKNOWN_HOUR);
    if s.version < 3 && (hours_named || !s.active_hours.is_empty()) {
        return Err(CoreError::bad(
            "version",
            format!(
                "a version {} snapshot has no hours of day or active hours",
                s.version
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy_engine() -> Engine {
        let mut e = Engine::new();
        let k = e.limiter.key("192.0.2.1", "google").unwrap();
        e.set_limits(k, Some((10, 1000)), 3, Some(100), Some(1000))
            .unwrap();
        e.set_multiplier(k, 0.5).unwrap();
        e.suspend(k, 50).unwrap();
        e.set_ip_caps("192.0.2.1", Some(500), None).unwrap();
        e.set_calendar(&[3_600_000], &[86_400_000]).unwrap();
        e.define_pool(
            "main",
            &[("192.0.2.1", 1, true), ("192.0.2.2", 2, false)],
            None,
        )
        .unwrap();
        let g = e.limiter.provider_handle("google").unwrap();
        e.acquire(k, 2, 60).unwrap();
        e.enqueue(7, 0, g, 1, 1).unwrap();
        e.enqueue(8, 0, g, 0, 2).unwrap();
        e
    }

    #[test]
    fn binary_snapshot_round_trips_and_refuses_junk() {
        let s = busy_engine().snapshot();
        let bytes = s.to_bytes();
        assert_eq!(Snapshot::from_bytes(&bytes).unwrap(), s);
        assert!(Snapshot::from_bytes(b"junk").is_err());
        assert!(Snapshot::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Snapshot::from_bytes(&longer).is_err());
        for cut in 0..bytes.len() {
            let _ = Snapshot::from_bytes(&bytes[..cut]);
        }
    }

    /// Binary snapshots of versions 1 and 2 (the current layout's first fields) still load,
    /// with what came later as a fresh engine has it.
    #[test]
    fn older_binary_snapshots_load() {
        let s = busy_engine().snapshot();
        let common = |version| Common {
            version,
            hour_start_ms: s.hour_start_ms,
            hour_pending_ms: s.hour_pending_ms.clone(),
            day_start_ms: s.day_start_ms,
            day_pending_ms: s.day_pending_ms.clone(),
            providers: s.providers.clone(),
            ips: s.ips.clone(),
            keys: s.keys.clone(),
            pools: s.pools.clone(),
            queue: s.queue.clone(),
        };
        let v1 = postcard::to_extend(&common(1), SNAPSHOT_MAGIC.to_vec()).unwrap();
        let tail: V2Tail = (vec![1], None);
        let v2 = postcard::to_extend(&(common(2), tail), SNAPSHOT_MAGIC.to_vec()).unwrap();
        for (version, bytes) in [(1, v1), (2, v2)] {
            let old = Snapshot::from_bytes(&bytes).unwrap();
            let retired = if version == 1 { vec![] } else { vec![1] };
            assert_eq!(old.retired_ips, retired);
            assert_eq!(old.hour_of_day, UNKNOWN_HOUR);
            assert_eq!(
                old.hour_pending_of_day,
                vec![UNKNOWN_HOUR; s.hour_pending_ms.len()]
            );
            let restored = Engine::from_snapshot(&old).unwrap().snapshot();
            assert_eq!(
                (restored.keys, restored.queue),
                (s.keys.clone(), s.queue.clone())
            );
            // Appended fields of a later version are trailing bytes to an older one.
            let mut longer = bytes.clone();
            longer.extend_from_slice(
                &postcard::to_allocvec(&(0u8, [0u8; 0], [(0u32, 0u32); 0])).unwrap(),
            );
            assert!(Snapshot::from_bytes(&longer).is_err());
        }
    }

    #[test]
    fn snapshot_round_trips() {
        let e = busy_engine();
        let s = e.snapshot();
        let r = Engine::from_snapshot(&s).unwrap();
        assert_eq!(r.snapshot(), s);
    }

    #[test]
    fn restored_engine_decides_the_same() {
        let mut a = busy_engine();
        let mut b = Engine::from_snapshot(&a.snapshot()).unwrap();
        for t in (0..5000).step_by(37) {
            assert_eq!(a.acquire(0, 1, t).unwrap(), b.acquire(0, 1, t).unwrap());
        }
        let (mut da, mut db) = (Vec::new(), Vec::new());
        a.due(10_000, 10, &mut da).unwrap();
        b.due(10_000, 10, &mut db).unwrap();
        assert_eq!(da, db);
    }

    #[test]
    fn corrupt_snapshots_are_errors() {
        let s = busy_engine().snapshot();
        let mut bad = s.clone();
        bad.version = 99;
        assert!(Engine::from_snapshot(&bad).is_err());
        let mut bad = s.clone();
        bad.keys[0].ip = 42;
        assert!(Engine::from_snapshot(&bad).is_err());
        let mut bad = s.clone();
        bad.keys[0].max_burst = 0;
        assert!(Engine::from_snapshot(&bad).is_err());
        let mut bad = s.clone();
        bad.providers.push("google".into());
        assert!(Engine::from_snapshot(&bad).is_err());
        let mut bad = s;
        bad.queue[0].pool = 5;
        assert!(Engine::from_snapshot(&bad).is_err());
    }
}
