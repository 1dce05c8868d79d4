//! The Engine: one object that owns all limiter state, pools and the release queue.
//! Python creates it, feeds it plain data and `now_ms`, and keeps it for the process life.

use crate::decision::Decision;
use crate::error::{CoreError, CoreResult};
use crate::limiter::{check_n, check_now, parse_ip, Limiter, Usage};
use crate::pick::{Member, Pools};
use crate::scheduler::Scheduler;

#[derive(Debug, Clone, Default)]
pub struct Engine {
    pub limiter: Limiter,
    pub pools: Pools,
    pub scheduler: Scheduler,
}

impl Engine {
    pub fn new() -> Self {
        Self {
            limiter: Limiter::new(),
            ..Self::default()
        }
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
        self.limiter.set_calendar(hour_starts_ms, day_starts_ms)?;
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
        self.limiter.acquire(key, n, now_ms)
    }

    pub fn pick(&mut self, pool: u32, provider: u16, n: u32, now_ms: u64) -> CoreResult<Decision> {
        self.pools
            .pick(&mut self.limiter, pool, provider, n, now_ms)
    }

    pub fn usage(&self, key: u32) -> CoreResult<Usage> {
        self.limiter.usage(key)
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
