//! Interning: IP, provider and key (IP, provider) handles, and the tables that map them back.

use std::hash::BuildHasher;
use std::net::IpAddr;

use super::{pack, IpSlot, KeySlot, Limiter, FLAG_RETIRED};
use crate::caps::NO_CAP;
use crate::error::{CoreError, CoreResult};
use crate::reserve::NO_RESERVE;

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

impl Limiter {
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

    pub(super) fn slot(&self, key: u32) -> CoreResult<&KeySlot> {
        self.keys.get(key as usize).ok_or(CoreError::UnknownHandle {
            kind: "key",
            handle: u64::from(key),
        })
    }

    pub(super) fn check_ip(&self, ip: u32) -> CoreResult<()> {
        if (ip as usize) < self.ips.len() {
            Ok(())
        } else {
            Err(CoreError::UnknownHandle {
                kind: "ip",
                handle: u64::from(ip),
            })
        }
    }
}
