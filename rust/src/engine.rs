//! The Engine: one object that owns all limiter state, pools and the release queue.
//! Python creates it, feeds it plain data and `now_ms`, and keeps it for the process life.

use std::net::IpAddr;

use hashbrown::HashMap;

use crate::decision::{Decision, Reason};
use crate::error::{CoreError, CoreResult};
use crate::limiter::{check_n, check_now, parse_ip, Limiter, Usage};
use crate::pick::{Member, Pools};
use crate::scheduler::Scheduler;

#[derive(Debug, Clone, Default)]
pub struct Engine {
    pub limiter: Limiter,
    pub pools: Pools,
    pub scheduler: Scheduler,
    /// Denied `acquire` and `pick` decisions since the engine was made, per (key, reason):
    /// what the metrics report. At most keys x reasons entries; counted off the grant path.
    pub denials: HashMap<(u32, Reason), u64>,
}

impl Engine {
    pub fn new() -> Self {
        Self {
            limiter: Limiter::new(),
            ..Self::default()
        }
    }

    // ----- names and handles: what the bindings and the wire protocol ask by name -----

    /// The handle of (ip, provider) by name; both are interned on first use.
    pub fn key(&mut self, ip: &str, provider: &str) -> CoreResult<u32> {
        self.limiter.key(ip, provider)
    }

    /// The handle of (ip, provider) by handles; interned on first use.
    pub fn key_of(&mut self, ip: u32, provider: u16) -> CoreResult<u32> {
        self.limiter.key_of(ip, provider)
    }

    /// (ip, provider) of a key, as text.
    pub fn key_names(&self, key: u32) -> CoreResult<(String, &str)> {
        self.limiter.key_names(key)
    }

    /// (ip handle, provider handle) of a key this engine issued.
    pub fn key_handles(&self, key: u32) -> (u32, u16) {
        self.limiter.key_handles(key)
    }

    pub fn key_count(&self) -> usize {
        self.limiter.key_count()
    }

    /// The handle of a provider name, interned on first use.
    pub fn provider(&mut self, name: &str) -> CoreResult<u16> {
        self.limiter.provider(name)
    }

    /// The handle of a provider this engine knows (never interns).
    pub fn provider_handle(&self, name: &str) -> CoreResult<u16> {
        self.limiter.provider_handle(name)
    }

    /// The name of a provider handle this engine issued.
    pub fn provider_name(&self, provider: u16) -> &str {
        &self.limiter.providers[usize::from(provider)]
    }

    /// Every provider name, in handle order.
    pub fn provider_names(&self) -> &[String] {
        &self.limiter.providers
    }

    /// The handle of a sending IP (see `Limiter::find_ip`).
    pub fn find_ip(&self, addr: &IpAddr) -> Option<u32> {
        self.limiter.find_ip(addr)
    }

    /// The address of an IP handle this engine issued.
    pub fn ip_addr(&self, ip: u32) -> IpAddr {
        self.limiter.ips[ip as usize].addr
    }

    /// The handle of a defined pool.
    pub fn pool_handle(&self, name: &str) -> CoreResult<u32> {
        self.pools.handle(name)
    }

    /// Take the place of `old` (a restore): reservation tokens `old` handed out stay unknown
    /// here. Returns, for each of `old`'s provider handles, this engine's handle of the same
    /// name, or None where this engine lacks the provider (none is added).
    pub fn succeed(&mut self, old: &Engine) -> Vec<Option<u16>> {
        let next = &mut self.limiter.reserve.next_token;
        *next = (*next).max(old.limiter.reserve.next_token);
        old.limiter
            .providers
            .iter()
            .map(|name| self.limiter.provider_handle(name).ok())
            .collect()
    }

    // ----- configuration: every change that can free capacity wakes the queue -----

    pub fn set_limits(
        &mut self,
        key: u32,
        rate: Option<(u64, u64)>,
        max_burst: u32,
        hourly_cap: Option<u64>,
        daily_cap: Option<u64>,
    ) -> CoreResult<()> {
        self.limiter
            .set_limits(key, rate, max_burst, hourly_cap, daily_cap)?;
        self.scheduler.wake_all();
        Ok(())
    }

    pub fn set_multiplier(&mut self, key: u32, multiplier: f64) -> CoreResult<()> {
        self.limiter.set_multiplier(key, multiplier)?;
        self.scheduler.wake_all();
        Ok(())
    }

    pub fn set_paused(&mut self, key: u32, paused: bool) -> CoreResult<()> {
        self.limiter.set_paused(key, paused)?;
        self.scheduler.wake_all();
        Ok(())
    }

    pub fn suspend(&mut self, key: u32, until_ms: u64) -> CoreResult<()> {
        self.limiter.suspend(key, until_ms)?;
        self.scheduler.wake_all();
        Ok(())
    }

    pub fn set_ip_caps(
        &mut self,
        ip: &str,
        hourly_cap: Option<u64>,
        daily_cap: Option<u64>,
    ) -> CoreResult<()> {
        // Check the caps before interning the IP, so a bad call changes nothing.
        crate::caps::cap_from("hourly_cap", hourly_cap)?;
        crate::caps::cap_from("daily_cap", daily_cap)?;
        let ip = self.limiter.ip(ip)?;
        self.limiter.set_ip_caps(ip, hourly_cap, daily_cap)?;
        self.scheduler.wake_all();
        Ok(())
    }

    pub fn set_calendar(
        &mut self,
        hour_starts_ms: &[u64],
        day_starts_ms: &[u64],
    ) -> CoreResult<()> {
        self.set_local_calendar(hour_starts_ms, day_starts_ms, None)
    }

    /// `set_calendar` with each hour start's local hour of day (see
    /// `Limiter::set_local_calendar`).
    pub fn set_local_calendar(
        &mut self,
        hour_starts_ms: &[u64],
        day_starts_ms: &[u64],
        hours_of_day: Option<&[u8]>,
    ) -> CoreResult<()> {
        self.limiter
            .set_local_calendar(hour_starts_ms, day_starts_ms, hours_of_day)?;
        self.scheduler.wake_all();
        Ok(())
    }

    /// The local hours in which `key` may send (`caps::EVERY_HOUR`: always).
    pub fn set_active_hours(&mut self, key: u32, active_hours: u32) -> CoreResult<()> {
        self.limiter.set_active_hours(key, active_hours)?;
        self.scheduler.wake_all();
        Ok(())
    }

    /// Define or redefine a pool from (ip, weight, warming) members.
    pub fn define_pool(
        &mut self,
        name: &str,
        members: &[(&str, u32, bool)],
        overflow: Option<&str>,
    ) -> CoreResult<u32> {
        let overflow = overflow.map(|o| self.pools.handle(o)).transpose()?;
        // Check everything before interning any IP, so a bad definition changes nothing.
        let weights: Vec<u32> = members.iter().map(|m| m.1).collect();
        self.pools.check(name, &weights, overflow)?;
        let mut seen = Vec::with_capacity(members.len());
        for (i, &(ip, _, _)) in members.iter().enumerate() {
            let canonical = parse_ip(ip)?;
            if seen.contains(&canonical) {
                return Err(CoreError::bad(
                    "members",
                    format!("pool {name:?} lists an IP twice (member {i})"),
                ));
            }
            seen.push(canonical);
        }
        let members = members
            .iter()
            .map(|&(ip, weight, warming)| {
                Ok(Member {
                    ip: self.limiter.ip(ip)?,
                    weight,
                    warming,
                })
            })
            .collect::<CoreResult<Vec<_>>>()?;
        let h = self.pools.define(name, members, overflow)?;
        // A redefined pool drops its key cache; queued traffic through it needs it back.
        for (pool, provider) in self.scheduler.pairs() {
            self.pools.prepare(&mut self.limiter, pool, provider)?;
        }
        self.scheduler.wake_all();
        Ok(h)
    }

    /// Keep only `ips` as sending IPs (see `Limiter::retain_ips`); returns the handles this
    /// call retired. A listed IP that comes back may free capacity, so the queue wakes.
    pub fn retain_ips(&mut self, ips: &[&str]) -> CoreResult<Vec<u32>> {
        let retired = self.limiter.retain_ips(ips)?;
        self.scheduler.wake_all();
        Ok(retired)
    }

    /// Keep only the pools named in `names` (see `Pools::retain`); returns the names this
    /// call retired.
    pub fn retain_pools(&mut self, names: &[&str]) -> Vec<String> {
        self.pools.retain(names)
    }

    /// The reservation snapshot of `token` is durable (see `reserve.rs`); true if that token
    /// was the latest reservation snapshot's and now holds, false if it was ignored. A
    /// reservation denial says `retry_ms` from now on. Frees capacity: the queue wakes.
    pub fn commit_reservation(&mut self, token: u64, retry_ms: u64) -> bool {
        let done = self.limiter.commit_reservation(token, retry_ms);
        if done {
            self.scheduler.wake_all();
        }
        done
    }

    // ----- decisions -----

    #[inline]
    pub fn acquire(&mut self, key: u32, n: u32, now_ms: u64) -> CoreResult<Decision> {
        let d = self.limiter.acquire(key, n, now_ms)?;
        if !d.is_granted() {
            self.count_denial(&d);
        }
        Ok(d)
    }

    #[cold]
    fn count_denial(&mut self, d: &Decision) {
        *self.denials.entry((d.key, d.reason)).or_insert(0) += 1;
    }

    /// Decide many (key, n) requests at one `now_ms` (see `Limiter::acquire_batch`).
    pub fn acquire_batch<I>(
        &mut self,
        requests: I,
        now_ms: u64,
        out: &mut Vec<Decision>,
    ) -> CoreResult<()>
    where
        I: ExactSizeIterator<Item = (u32, u32)> + Clone,
    {
        let start = out.len();
        self.limiter.acquire_batch(requests, now_ms, out)?;
        for d in &out[start..] {
            if !d.is_granted() {
                *self.denials.entry((d.key, d.reason)).or_insert(0) += 1;
            }
        }
        Ok(())
    }

    pub fn pick(&mut self, pool: u32, provider: u16, n: u32, now_ms: u64) -> CoreResult<Decision> {
        let d = self
            .pools
            .pick(&mut self.limiter, pool, provider, n, now_ms)?;
        if !d.is_granted() {
            self.count_denial(&d);
        }
        Ok(d)
    }

    pub fn usage(&self, key: u32) -> CoreResult<Usage> {
        self.limiter.usage(key)
    }

    /// When the current hour's counters next roll (None before a calendar is set).
    pub fn next_hour_ms(&self) -> Option<u64> {
        self.limiter.hours.next_ms()
    }

    // ----- the release queue -----

    pub fn enqueue(
        &mut self,
        id: u64,
        pool: u32,
        provider: u16,
        priority: i32,
        n: u32,
    ) -> CoreResult<()> {
        check_n(n)?;
        self.pools.get(pool)?;
        if usize::from(provider) >= self.limiter.providers.len() {
            return Err(CoreError::UnknownHandle {
                kind: "provider",
                handle: u64::from(provider),
            });
        }
        self.pools.prepare(&mut self.limiter, pool, provider)?;
        self.scheduler.enqueue(id, pool, provider, priority, n)
    }

    /// Release up to `max` queued messages that may go at `now_ms`, each with its decision.
    pub fn due(
        &mut self,
        now_ms: u64,
        max: usize,
        out: &mut Vec<(u64, Decision)>,
    ) -> CoreResult<()> {
        check_now(now_ms)?;
        self.limiter.advance(now_ms);
        let (pools, limiter) = (&self.pools, &mut self.limiter);
        self.scheduler.due(
            now_ms,
            max,
            |pool, provider, n| pools.pick_prepared(limiter, pool, provider, n, now_ms),
            out,
        );
        Ok(())
    }

    pub fn next_due_ms(&mut self, now_ms: u64) -> Option<u64> {
        self.scheduler.next_due_ms(now_ms)
    }

    pub fn queued(&self) -> usize {
        self.scheduler.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Route, Wire};

    /// Reply lines of the native protocol for `input` at time 0.
    fn serve(e: &mut Engine, w: &mut Wire, input: &str) -> String {
        let mut out = Vec::new();
        w.serve(e, input.as_bytes(), 0, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_successor_maps_providers_by_name_and_keeps_tokens_unknown() {
        let mut old = Engine::new();
        old.provider("google").unwrap();
        old.provider("yahoo").unwrap();
        let k = old.key("192.0.2.1", "google").unwrap();
        old.set_limits(k, None, 1, None, Some(5)).unwrap();
        let (_, token) = old.reservation_snapshot(0, 1_000, 1).unwrap();
        let mut new = Engine::new();
        new.provider("default").unwrap();
        new.provider("google").unwrap();
        assert_eq!(new.succeed(&old), vec![Some(1), None]);
        // The successor's tokens never repeat one the old engine handed out.
        let (_, next) = new.reservation_snapshot(0, 1_000, 1).unwrap();
        assert!(next > token);
        assert_eq!(new.provider_name(1), "google");
    }

    /// An engine with a plan of two IPs in pool "main", daily caps of 5, and its wire.
    fn planned() -> (Engine, Wire) {
        let mut e = Engine::new();
        let mut w = Wire::new();
        let google = e.limiter.provider("google").unwrap();
        w.set_route("gmail.com", Route::Provider(google), u64::MAX)
            .unwrap();
        e.define_pool(
            "main",
            &[("192.0.2.1", 1, true), ("192.0.2.2", 1, false)],
            None,
        )
        .unwrap();
        for ip in ["192.0.2.1", "192.0.2.2"] {
            let k = e.limiter.key(ip, "google").unwrap();
            e.set_limits(k, None, 1, None, Some(5)).unwrap();
        }
        e.retain_ips(&["192.0.2.1", "192.0.2.2"]).unwrap();
        (e, w)
    }

    #[test]
    fn outside_active_hours_on_the_wire_and_through_a_snapshot() {
        let (mut e, mut w) = planned();
        let k = e.limiter.key("192.0.2.1", "google").unwrap();
        e.set_active_hours(k, 1 << 7).unwrap();
        let h = 3_600_000;
        e.set_local_calendar(&[0, 7 * h, 8 * h], &[], Some(&[6, 7, 8]))
            .unwrap();
        let ask = "{\"op\":\"acquire\",\"ip\":\"192.0.2.1\",\"domain\":\"gmail.com\"}\n";
        let reply = serve(&mut e, &mut w, ask);
        assert!(
            reply.contains("\"reason\":\"outside_active_hours\",\"retry_after_ms\":25200000"),
            "{reply}"
        );
        // A snapshot keeps the active hours and the hours of day.
        let mut r = Engine::from_snapshot(&e.snapshot()).unwrap();
        assert_eq!(r.snapshot(), e.snapshot());
        for t in [h, 7 * h - 1, 7 * h, 8 * h] {
            assert_eq!(r.acquire(k, 1, t).unwrap(), e.acquire(k, 1, t).unwrap());
        }
        assert_eq!(
            e.acquire(k, 1, 8 * h).unwrap().reason,
            Reason::OutsideActiveHours
        );
    }

    #[test]
    fn a_retired_ip_is_answered_like_one_never_heard_of() {
        let acquire = |ip: &str| {
            format!("{{\"op\":\"acquire\",\"ip\":\"{ip}\",\"domain\":\"gmail.com\",\"id\":1}}\n")
        };
        let (mut fresh, mut fresh_wire) = planned();
        fresh
            .define_pool("main", &[("192.0.2.1", 1, true)], None)
            .unwrap();
        fresh.retain_ips(&["192.0.2.1"]).unwrap();
        let never = serve(&mut fresh, &mut fresh_wire, &acquire("192.0.2.9"));
        assert!(never.contains("192.0.2.9 is not a sending IP"), "{never}");

        let (mut e, mut w) = planned();
        assert!(serve(&mut e, &mut w, &acquire("192.0.2.2")).contains("\"granted\":1"));
        // The plan drops 192.0.2.2.
        e.define_pool("main", &[("192.0.2.1", 1, true)], None)
            .unwrap();
        let retired = e.retain_ips(&["192.0.2.1"]).unwrap();
        assert_eq!(retired, vec![1]);
        let dropped = serve(&mut e, &mut w, &acquire("192.0.2.2"));
        assert_eq!(dropped, never.replace("192.0.2.9", "192.0.2.2"));
        let k = e.limiter.key("192.0.2.2", "google").unwrap();
        let d = e.acquire(k, 1, 0).unwrap();
        assert_eq!(
            (d.granted, d.reason, d.retry_after_ms),
            (0, Reason::Retired, None)
        );
        assert!(e.usage(k).unwrap().retired);
        // New keys of a retired IP are retired too.
        let y = e.limiter.key("192.0.2.2", "yahoo").unwrap();
        assert_eq!(e.acquire(y, 1, 0).unwrap().reason, Reason::Retired);
        // It survives a snapshot, and a later plan listing it brings it back with its limits.
        let mut r = Engine::from_snapshot(&e.snapshot()).unwrap();
        assert_eq!(r.snapshot(), e.snapshot());
        let dropped = serve(&mut r, &mut w, &acquire("192.0.2.2"));
        assert!(
            dropped.contains("192.0.2.2 is not a sending IP"),
            "{dropped}"
        );
        assert!(r
            .retain_ips(&["192.0.2.1", "192.0.2.2"])
            .unwrap()
            .is_empty());
        assert!(r.acquire(k, 4, 0).unwrap().is_granted());
        assert_eq!(r.acquire(k, 1, 0).unwrap().reason, Reason::DailyCap);
        // A bad address changes nothing.
        assert!(r.retain_ips(&["192.0.2.1", "nope"]).is_err());
        assert!(!r.usage(k).unwrap().retired);
    }

    #[test]
    fn pick_never_chooses_a_retired_ip() {
        let (mut e, _) = planned();
        let google = e.limiter.provider_handle("google").unwrap();
        e.retain_ips(&["192.0.2.2"]).unwrap();
        // The warming IP is retired: the warm one carries everything, then denial by cap.
        for _ in 0..5 {
            let d = e.pick(0, google, 1, 0).unwrap();
            assert_eq!(e.limiter.key_names(d.key).unwrap().0, "192.0.2.2");
        }
        let d = e.pick(0, google, 1, 0).unwrap();
        assert_eq!((d.granted, d.reason), (0, Reason::DailyCap));
        e.retain_ips(&[]).unwrap();
        let d = e.pick(0, google, 1, 0).unwrap();
        assert_eq!(
            (d.granted, d.reason, d.retry_after_ms),
            (0, Reason::Retired, None)
        );
    }

    #[test]
    fn denials_are_counted_per_key_and_reason_grants_are_not() {
        let mut e = Engine::new();
        let k = e.key("192.0.2.1", "google").unwrap();
        e.set_limits(k, None, 1, None, Some(2)).unwrap();
        e.define_pool("p", &[("192.0.2.1", 1, true)], None).unwrap();
        let google = e.provider("google").unwrap();
        let pool = e.pool_handle("p").unwrap();
        assert!(e.acquire(k, 2, 0).unwrap().is_granted());
        assert!(!e.acquire(k, 1, 0).unwrap().is_granted());
        assert!(!e.pick(pool, google, 1, 0).unwrap().is_granted());
        let mut out = Vec::new();
        e.acquire_batch([(k, 1), (k, 1)].into_iter(), 0, &mut out)
            .unwrap();
        assert_eq!(e.denials.len(), 1);
        assert_eq!(e.denials[&(k, Reason::DailyCap)], 4);
        e.set_paused(k, true).unwrap();
        assert!(!e.acquire(k, 1, 0).unwrap().is_granted());
        assert_eq!(e.denials[&(k, Reason::Paused)], 1);
    }
}
