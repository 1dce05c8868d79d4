//! Where a recipient domain's mail goes: the bounded route table, and the domains waiting
//! for an MX lookup (Python resolves them and sets their routes).

use std::borrow::Cow;

use hashbrown::{HashMap, HashSet};

use crate::limiter::MAX_NOW_MS;

/// Most distinct domains waiting for an MX lookup between two drains; more are counted in
/// `WireStats::unresolved_dropped` and queued when they come again.
pub const MAX_UNRESOLVED: usize = 10_000;
/// Default bound on learned (expiring) routes; the plan's static routes come on top.
pub const MAX_ROUTES: usize = 200_000;
/// Longest recipient domain (RFC 1035).
const MAX_DOMAIN: usize = 253;

/// Where a recipient domain's mail goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Provider(u16),
    /// RFC 7505 null MX: the domain accepts no mail.
    NullMx,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct RouteEntry {
    pub(super) route: Route,
    /// The table's epoch when the route was last set or used (eviction order).
    used: u32,
    /// After this instant the answer still holds, and the domain is queued for a new lookup.
    pub(super) expires_ms: u64,
}

impl RouteEntry {
    /// A static route (the plan's domain table): never evicted, not counted in the bound.
    const fn pinned(&self) -> bool {
        self.expires_ms >= MAX_NOW_MS
    }
}

/// Domain -> route, holding at most `max` learned routes beside the pinned (static) ones.
///
/// When an insert takes the learned routes over `max`, one sweep brings them down to
/// `max - max / 8` (at least one below `max`): first every expired route goes (expired as
/// of the latest `now_ms` the wire was given), then, if that is not enough, the routes least
/// recently set or used (by epoch, one epoch per sweep), soonest expiry first among equals.
/// The sweep is O(routes) and runs at most once per `max / 8` new domains.
#[derive(Debug, Clone)]
pub(super) struct RouteTable {
    map: HashMap<Box<str>, RouteEntry>,
    /// Entries that are pinned.
    pub(super) pinned: usize,
    /// Most learned routes.
    pub(super) max: usize,
    /// Bumped by each sweep; entries are stamped with it when set or used.
    epoch: u32,
    /// The latest `now_ms` seen: what "expired" means in a sweep.
    pub(super) now_ms: u64,
}

impl Default for RouteTable {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            pinned: 0,
            max: MAX_ROUTES,
            epoch: 0,
            now_ms: 0,
        }
    }
}

impl RouteTable {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    fn learned(&self) -> usize {
        self.map.len() - self.pinned
    }

    /// Up to `limit` entries in the table's own order (for an operator's look; no sort, so
    /// the engine's lock is held for at most `limit` steps), and how many are pinned.
    pub(super) fn sample(&self, limit: usize) -> Vec<(&str, RouteEntry)> {
        self.map
            .iter()
            .take(limit)
            .map(|(d, e)| (d.as_ref(), *e))
            .collect()
    }

    pub(super) fn get(&self, domain: &str) -> Option<&RouteEntry> {
        self.map.get(domain)
    }

    /// The entry of `domain`, stamped as used now (it is kept over unused ones).
    pub(super) fn touch(&mut self, domain: &str) -> Option<RouteEntry> {
        let epoch = self.epoch;
        self.map.get_mut(domain).map(|e| {
            e.used = epoch;
            *e
        })
    }

    /// Set a route; returns how many routes a sweep removed to stay in bounds. A new learned
    /// route sweeps before it goes in, so it is never the one evicted.
    pub(super) fn insert(&mut self, domain: Cow<'_, str>, route: Route, expires_ms: u64) -> u64 {
        let mut removed = 0;
        let old = if let Some(e) = self.map.get_mut(domain.as_ref()) {
            let old = *e;
            *e = RouteEntry {
                route,
                used: self.epoch,
                expires_ms,
            };
            Some(old)
        } else {
            if expires_ms < MAX_NOW_MS && self.learned() >= self.max {
                removed = self.sweep();
            }
            let entry = RouteEntry {
                route,
                used: self.epoch,
                expires_ms,
            };
            self.map.insert(domain.into_owned().into_boxed_str(), entry);
            None
        };
        if old.is_some_and(|o| o.pinned()) {
            self.pinned -= 1;
        }
        if expires_ms >= MAX_NOW_MS {
            self.pinned += 1;
        }
        // Only a static route turned learned can get here over the bound.
        if self.learned() > self.max {
            removed += self.sweep();
        }
        removed
    }

    /// Change the bound; a smaller one takes effect at once. Returns the routes removed.
    pub(super) fn set_max(&mut self, max: usize) -> u64 {
        self.max = max;
        if self.learned() > max {
            self.sweep()
        } else {
            0
        }
    }

    pub(super) fn retain(&mut self, keep: impl FnMut(&Box<str>, &mut RouteEntry) -> bool) {
        self.map.retain(keep);
        self.pinned = self.map.values().filter(|e| e.pinned()).count();
    }

    /// Forget every route and give the memory back.
    pub(super) fn clear(&mut self) {
        self.map = HashMap::new();
        self.pinned = 0;
    }

    /// Bring the learned routes down to `max - max / 8`: expired ones first, then the least
    /// recently set or used. Pinned routes stay. Returns how many routes went.
    fn sweep(&mut self) -> u64 {
        let target = self.max - (self.max / 8).max(1).min(self.max);
        let before = self.map.len();
        let now_ms = self.now_ms;
        self.map.retain(|_, e| e.pinned() || e.expires_ms > now_ms);
        let learned = self.learned();
        if learned > target {
            let excess = learned - target;
            let mut ages: Vec<(u32, u64)> = self
                .map
                .values()
                .filter(|e| !e.pinned())
                .map(|e| (e.used, e.expires_ms))
                .collect();
            let cut = *ages.select_nth_unstable(excess - 1).1;
            let below = ages.iter().filter(|&&a| a < cut).count();
            drop(ages);
            // Entries equal to the cut: exactly as many as are still needed go.
            let mut ties = excess - below;
            self.map.retain(|_, e| {
                if e.pinned() {
                    return true;
                }
                let age = (e.used, e.expires_ms);
                if age < cut {
                    false
                } else if age == cut && ties > 0 {
                    ties -= 1;
                    false
                } else {
                    true
                }
            });
        }
        self.epoch = self.epoch.saturating_add(1);
        (before - self.map.len()) as u64
    }
}

/// Domains seen without a fresh route, oldest first, each once until the next drain.
#[derive(Debug, Clone, Default)]
pub(super) struct Unresolved {
    list: Vec<Box<str>>,
    set: HashSet<Box<str>>,
}

impl Unresolved {
    /// Queue `domain` once per drain; false when the queue is full and it was dropped.
    pub(super) fn note(&mut self, domain: &str) -> bool {
        if self.set.contains(domain) {
            return true;
        }
        if self.list.len() >= MAX_UNRESOLVED {
            return false;
        }
        let d: Box<str> = Box::from(domain);
        self.set.insert(d.clone());
        self.list.push(d);
        true
    }

    /// A domain that got a route needs no lookup until it is seen again.
    pub(super) fn forget(&mut self, domain: &str) {
        self.set.remove(domain);
    }

    pub(super) fn take(&mut self) -> Vec<Box<str>> {
        self.set.clear();
        std::mem::take(&mut self.list)
    }

    pub(super) fn clear(&mut self) {
        self.list.clear();
        self.set.clear();
    }
}

/// `s.trim()`, without decoding characters when both ends are ASCII and not white space
/// (nothing to trim: the usual case).
pub(super) fn trimmed(s: &str) -> &str {
    match (s.as_bytes().first(), s.as_bytes().last()) {
        (Some(f), Some(l)) if f.is_ascii_graphic() && l.is_ascii_graphic() => s,
        _ => s.trim(),
    }
}

/// Lower-case a recipient domain (or the domain of an address) and drop one trailing dot.
///
/// On every decision's path: byte loops rather than `str` searches (whose set-up costs more
/// than the search on a domain's few bytes), one pass for both checks.
pub(super) fn normalise_domain(raw: &str) -> Result<Cow<'_, str>, String> {
    let mut d = trimmed(raw);
    if let Some(at) = d.bytes().rposition(|b| b == b'@') {
        d = &d[at + 1..];
    }
    let d = d.strip_suffix('.').unwrap_or(d);
    if d.is_empty() {
        return Err(format!("domain: must not be empty, got {raw:?}"));
    }
    if d.len() > MAX_DOMAIN {
        return Err(format!("domain: longer than {MAX_DOMAIN} characters"));
    }
    let (mut bad, mut upper) = (false, false);
    for b in d.bytes() {
        bad |= b.is_ascii_whitespace() || b == b'/' || b == b'\\';
        upper |= b.is_ascii_uppercase();
    }
    if bad {
        return Err(format!("domain: not a domain name, got {raw:?}"));
    }
    if upper {
        Ok(Cow::Owned(d.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(d))
    }
}
