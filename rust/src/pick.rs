//! IP selection: which IP of a pool carries a message to a provider.
//!
//! Order: the pool's warming IPs while one has room for that provider, then its warm IPs by
//! weight, then the pool named as overflow (and its overflow, and so on). Within a tier the
//! IP that has carried the least for that provider today, per unit of weight, goes first
//! (ties: the order the pool lists them). An IP that cannot take the message now is never
//! chosen while another can. Mail is never dropped: a denial says when to try again. A
//! retired IP (`retain_ips`) is never chosen, and named by a denial only if all are retired.

use crate::decision::{Decision, Reason, Tier};
use crate::error::{CoreError, CoreResult};
use crate::limiter::{check_n, check_now, KeyCheck, Limiter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub ip: u32,
    /// At least 1; warm IPs share traffic in proportion to weight.
    pub weight: u32,
    pub warming: bool,
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    pub members: Vec<Member>,
    pub overflow: Option<u32>,
    /// Key handles of the members for each provider, built on first use.
    keys_by_provider: Vec<Option<Box<[u32]>>>,
    /// Dropped by a reloaded plan (`Pools::retain`): unknown by name and handle, as it would
    /// be to a fresh engine, until a definition brings it back. Its handle stays taken.
    retired: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Pools {
    pub(crate) pools: Vec<Pool>,
}

impl Pools {
    pub fn handle(&self, name: &str) -> CoreResult<u32> {
        self.pools
            .iter()
            .position(|p| p.name == name && !p.retired)
            .map(|i| i as u32)
            .ok_or_else(|| CoreError::UnknownName {
                kind: "pool",
                name: name.to_owned(),
            })
    }

    pub fn get(&self, pool: u32) -> CoreResult<&Pool> {
        self.pools
            .get(pool as usize)
            .filter(|p| !p.retired)
            .ok_or(CoreError::UnknownHandle {
                kind: "pool",
                handle: u64::from(pool),
            })
    }

    /// Check a definition without changing anything: a name, at least one member, weights
    /// of at least 1, and an existing overflow pool whose chain does not lead back here.
    pub fn check(&self, name: &str, weights: &[u32], overflow: Option<u32>) -> CoreResult<()> {
        if name.is_empty() {
            return Err(CoreError::bad("pool", "name must not be empty"));
        }
        if weights.is_empty() {
            return Err(CoreError::bad(
                "members",
                format!("pool {name:?} needs at least one IP"),
            ));
        }
        if weights.contains(&0) {
            return Err(CoreError::bad("weight", "must be at least 1, got 0"));
        }
        let Some(o) = overflow else { return Ok(()) };
        self.get(o)?;
        let Ok(handle) = self.handle(name) else {
            return Ok(()); // a new pool is on no chain yet
        };
        let mut at = Some(o);
        let mut steps = 0;
        while let Some(p) = at {
            if p == handle {
                return Err(CoreError::bad(
                    "overflow",
                    format!("pool {name:?} would overflow into itself"),
                ));
            }
            steps += 1;
            if steps > self.pools.len() {
                break;
            }
            at = self.pools[p as usize].overflow;
        }
        Ok(())
    }

    /// Define (or redefine) a pool. Its overflow pool must exist and must not lead back to it.
    pub fn define(
        &mut self,
        name: &str,
        members: Vec<Member>,
        overflow: Option<u32>,
    ) -> CoreResult<u32> {
        let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
        self.check(name, &weights, overflow)?;
        if let Some(i) =
            (1..members.len()).find(|&i| members[..i].iter().any(|o| o.ip == members[i].ip))
        {
            return Err(CoreError::bad(
                "members",
                format!("pool {name:?} lists an IP twice (member {i})"),
            ));
        }
        // A retired pool of that name comes back under its old handle.
        let existing = self
            .pools
            .iter()
            .position(|p| p.name == name)
            .map(|i| i as u32);
        let handle = existing.unwrap_or(self.pools.len() as u32);
        let pool = Pool {
            name: name.to_owned(),
            members,
            overflow,
            keys_by_provider: Vec::new(),
            retired: false,
        };
        match existing {
            Some(h) => self.pools[h as usize] = pool,
            None => self.pools.push(pool),
        }
        Ok(handle)
    }

    /// Keep only the pools named in `names`; every other one is retired (unknown to `pick`,
    /// as to a fresh engine, until it is defined again). Returns the names this call retired.
    pub fn retain(&mut self, names: &[&str]) -> Vec<String> {
        let mut retired = Vec::new();
        for p in &mut self.pools {
            if !p.retired && !names.contains(&p.name.as_str()) {
                p.retired = true;
                retired.push(p.name.clone());
            }
        }
        retired
    }

    /// Make sure every pool on the overflow chain from `pool` has its keys for `provider`.
    pub(crate) fn prepare(
        &mut self,
        limiter: &mut Limiter,
        pool: u32,
        provider: u16,
    ) -> CoreResult<()> {
        let mut at = Some(pool);
        while let Some(p) = at {
            let entry = &mut self.pools[p as usize];
            let idx = usize::from(provider);
            if entry.keys_by_provider.len() <= idx {
                entry.keys_by_provider.resize(idx + 1, None);
            }
            if entry.keys_by_provider[idx].is_none() {
                let keys = entry
                    .members
                    .iter()
                    .map(|m| limiter.key_of(m.ip, provider))
                    .collect::<CoreResult<Box<[u32]>>>()?;
                entry.keys_by_provider[idx] = Some(keys);
            }
            at = entry.overflow;
        }
        Ok(())
    }

    /// Choose and charge an IP of `pool` (or its overflow) for `n` messages to `provider`.
    pub fn pick(
        &mut self,
        limiter: &mut Limiter,
        pool: u32,
        provider: u16,
        n: u32,
        now_ms: u64,
    ) -> CoreResult<Decision> {
        self.get(pool)?;
        check_n(n)?;
        check_now(now_ms)?;
        if usize::from(provider) >= limiter.providers.len() {
            return Err(CoreError::UnknownHandle {
                kind: "provider",
                handle: u64::from(provider),
            });
        }
        self.prepare(limiter, pool, provider)?;
        limiter.advance(now_ms);
        Ok(self.pick_prepared(limiter, pool, provider, n, now_ms))
    }

    /// `pick` once arguments are checked and keys prepared (the scheduler's inner loop).
    pub(crate) fn pick_prepared(
        &self,
        limiter: &mut Limiter,
        pool: u32,
        provider: u16,
        n: u32,
        now_ms: u64,
    ) -> Decision {
        // Soonest denial seen: (wait, reason, key); a known wait beats an unknown one.
        let mut soonest: Option<(Option<u64>, Reason, u32)> = None;
        let mut at = Some(pool);
        while let Some(p) = at {
            let entry = &self.pools[p as usize];
            let keys = entry.keys_by_provider[usize::from(provider)]
                .as_deref()
                .expect("prepared");
            for warming in [true, false] {
                // Best fit: (index, new tat) with the least carried per unit of weight.
                let mut best: Option<(usize, u64)> = None;
                for (i, m) in entry.members.iter().enumerate() {
                    if m.warming != warming {
                        continue;
                    }
                    match limiter.evaluate(keys[i], n, now_ms) {
                        KeyCheck::Fit(tat) => {
                            let better = best.is_none_or(|(b, _)| {
                                let load = |j: usize| u64::from(limiter.day_used(keys[j]));
                                load(i) * u64::from(entry.members[b].weight)
                                    < load(b) * u64::from(m.weight)
                            });
                            if better {
                                best = Some((i, tat));
                            }
                        }
                        KeyCheck::Held(reason, wait) => {
                            // A retired IP is named only when every member is retired.
                            let retired = |r: Reason| r == Reason::Retired;
                            let sooner = match soonest {
                                None => true,
                                Some((_, r, _)) if retired(r) != retired(reason) => retired(r),
                                Some((s, _, _)) => match (s, wait) {
                                    (None, Some(_)) => true,
                                    (Some(s), Some(w)) => w < s,
                                    (_, None) => false,
                                },
                            };
                            if sooner {
                                soonest = Some((wait, reason, keys[i]));
                            }
                        }
                    }
                }
                if let Some((i, tat)) = best {
                    let key = keys[i];
                    limiter.commit(key, n, tat);
                    let tier = match (p == pool, warming) {
                        (false, _) => Tier::Overflow,
                        (true, true) => Tier::Warming,
                        (true, false) => Tier::Warm,
                    };
                    return Decision {
                        granted: n,
                        reason: Reason::Granted,
                        retry_after_ms: Some(0),
                        key,
                        tier,
                    };
                }
            }
            at = entry.overflow;
        }
        let (retry_after_ms, reason, key) = soonest.expect("pools are never empty");
        Decision {
            granted: 0,
            reason,
            retry_after_ms,
            key,
            tier: Tier::Direct,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Limiter, Pools, u16) {
        let mut l = Limiter::new();
        let g = l.provider("google").unwrap();
        (l, Pools::default(), g)
    }

    fn member(l: &mut Limiter, ip: &str, weight: u32, warming: bool) -> Member {
        Member {
            ip: l.ip(ip).unwrap(),
            weight,
            warming,
        }
    }

    #[test]
    fn a_retired_pool_is_unknown_until_defined_again() {
        let (mut l, mut pools, g) = setup();
        let a = vec![member(&mut l, "192.0.2.1", 1, false)];
        let a = pools.define("a", a, None).unwrap();
        let b = vec![member(&mut l, "192.0.2.2", 1, false)];
        let b = pools.define("b", b, None).unwrap();
        assert_eq!(pools.retain(&["b"]), vec!["a".to_owned()]);
        assert!(pools.retain(&["b"]).is_empty(), "retiring is done once");
        assert!(pools.handle("a").is_err());
        assert!(pools.pick(&mut l, a, g, 1, 0).is_err());
        assert!(
            pools.check("c", &[1], Some(a)).is_err(),
            "no overflow into it"
        );
        assert_eq!(pools.pick(&mut l, b, g, 1, 0).unwrap().granted, 1);
        let again = vec![member(&mut l, "192.0.2.3", 1, false)];
        assert_eq!(
            pools.define("a", again, None).unwrap(),
            a,
            "back under its handle"
        );
        assert_eq!(pools.handle("a").unwrap(), a);
        assert_eq!(pools.pick(&mut l, a, g, 1, 0).unwrap().granted, 1);
    }

    #[test]
    fn warming_first_then_warm_then_overflow() {
        let (mut l, mut pools, g) = setup();
        let spare = vec![member(&mut l, "198.51.100.1", 1, false)];
        let spare = pools.define("spare", spare, None).unwrap();
        let members = vec![
            member(&mut l, "192.0.2.1", 1, true),
            member(&mut l, "192.0.2.2", 1, false),
        ];
        let main = pools.define("main", members, Some(spare)).unwrap();
        let warming = l.key("192.0.2.1", "google").unwrap();
        let warm = l.key("192.0.2.2", "google").unwrap();
        l.set_limits(warming, None, 1, None, Some(2)).unwrap();
        l.set_limits(warm, None, 1, None, Some(1)).unwrap();
        let tiers: Vec<_> = (0..5)
            .map(|_| pools.pick(&mut l, main, g, 1, 0).unwrap())
            .map(|d| (d.tier, d.granted))
            .collect();
        assert_eq!(
            tiers,
            vec![
                (Tier::Warming, 1),
                (Tier::Warming, 1),
                (Tier::Warm, 1),
                (Tier::Overflow, 1),
                (Tier::Overflow, 1)
            ]
        );
    }

    #[test]
    fn a_warming_ip_outside_its_active_hours_overflows_to_warm_ones() {
        let (mut l, mut pools, g) = setup();
        let members = vec![
            member(&mut l, "192.0.2.1", 1, true),
            member(&mut l, "192.0.2.2", 1, false),
        ];
        let main = pools.define("main", members, None).unwrap();
        let warming = l.key("192.0.2.1", "google").unwrap();
        let warm = l.key("192.0.2.2", "google").unwrap();
        l.set_active_hours(warming, 1 << 7 | 1 << 8).unwrap();
        l.set_limits(warm, None, 1, None, Some(1)).unwrap();
        let h = 3_600_000;
        l.set_local_calendar(&[6 * h, 7 * h], &[], Some(&[6, 7]))
            .unwrap();
        let d = pools.pick(&mut l, main, g, 1, 6 * h).unwrap();
        assert_eq!((d.tier, d.key), (Tier::Warm, warm));
        // The warm IP is spent: the soonest member is the warming one, open at 07:00.
        let d = pools.pick(&mut l, main, g, 1, 6 * h + 10).unwrap();
        assert_eq!(
            (d.reason, d.retry_after_ms, d.key),
            (Reason::OutsideActiveHours, Some(h - 10), warming)
        );
        let d = pools.pick(&mut l, main, g, 1, 7 * h).unwrap();
        assert_eq!((d.tier, d.key), (Tier::Warming, warming));
    }

    #[test]
    fn warm_ips_share_by_weight() {
        let (mut l, mut pools, g) = setup();
        let members = vec![
            member(&mut l, "192.0.2.1", 3, false),
            member(&mut l, "192.0.2.2", 1, false),
        ];
        let p = pools.define("p", members, None).unwrap();
        let mut counts = [0u32; 2];
        for _ in 0..400 {
            let d = pools.pick(&mut l, p, g, 1, 0).unwrap();
            counts[l.key_ip(d.key).unwrap() as usize] += 1;
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn denial_reports_the_soonest_ip() {
        let (mut l, mut pools, g) = setup();
        let members = vec![
            member(&mut l, "192.0.2.1", 1, true),
            member(&mut l, "192.0.2.2", 1, false),
        ];
        let p = pools.define("p", members, None).unwrap();
        let a = l.key("192.0.2.1", "google").unwrap();
        let b = l.key("192.0.2.2", "google").unwrap();
        l.set_limits(a, Some((1, 10_000)), 1, None, None).unwrap();
        l.set_limits(b, Some((1, 1_000)), 1, None, None).unwrap();
        pools.pick(&mut l, p, g, 1, 0).unwrap();
        pools.pick(&mut l, p, g, 1, 0).unwrap();
        let d = pools.pick(&mut l, p, g, 1, 0).unwrap();
        assert_eq!(
            (d.granted, d.reason, d.retry_after_ms, d.key),
            (0, Reason::Rate, Some(1000), b)
        );
    }

    #[test]
    fn pools_are_validated() {
        let (mut l, mut pools, _) = setup();
        assert!(pools.define("empty", vec![], None).is_err());
        let m = member(&mut l, "192.0.2.1", 0, false);
        assert!(pools.define("w0", vec![m], None).is_err());
        let m = member(&mut l, "192.0.2.1", 1, false);
        assert!(pools.define("dup", vec![m, m], None).is_err());
        let a = pools.define("a", vec![m], None).unwrap();
        let b = pools.define("b", vec![m], Some(a)).unwrap();
        let e = pools.define("a", vec![m], Some(b)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "overflow: pool \"a\" would overflow into itself"
        );
        assert!(pools.define("c", vec![m], Some(99)).is_err());
    }
}
