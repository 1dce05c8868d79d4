//! The native wire protocol: one JSON object per line in, one per line out, in order.
//!
//! `Wire::serve` turns a whole read buffer into a whole reply buffer in one call. It parses
//! every complete line, decides `acquire`, `pick`, `report`, `route`, `ping` and `classify`
//! (SMTP reply -> push-back class, `classify.rs`) here, and hands
//! the rare operator operations (`status`, `limits`, `reload`, ...) back to Python as an
//! *upcall*, stopping right after that line so replies stay in request order.
//! `docs/protocol.md` is the contract; this file is its implementation.
//!
//! The wire also keeps what Python drains about once a second: per-key tallies (granted,
//! delivered, deferred, bounced, complaints), push-back reports with their SMTP text, and
//! recipient domains that still need an MX lookup. Nothing here blocks: an unknown domain
//! counts as the default provider until Python has resolved it.

use std::borrow::Cow;
use std::fmt;
use std::io::Write;
use std::sync::Arc;

use hashbrown::{HashMap, HashSet};
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::classify::{valid_enhanced, Classifier, Provider, RuleDef, Verdict};
use crate::decision::Decision;
use crate::engine::Engine;
use crate::error::{CoreError, CoreResult};
use crate::limiter::{check_now, parse_ip, MAX_NOW_MS};

/// Longest request line; a longer one closes the connection (after the earlier replies).
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Most distinct domains waiting for an MX lookup between two drains; more are counted in
/// `WireStats::unresolved_dropped` and queued when they come again.
pub const MAX_UNRESOLVED: usize = 10_000;
/// Default bound on learned (expiring) routes; the plan's static routes come on top.
pub const MAX_ROUTES: usize = 200_000;
/// Most push-back reports held between two drains; later ones are counted as dropped.
pub const MAX_REPORTS: usize = 100_000;
/// Longest SMTP reply text kept with a report (bytes, cut at a character boundary).
pub const MAX_REPORT_TEXT: usize = 1_000;
/// Longest recipient domain (RFC 1035).
const MAX_DOMAIN: usize = 253;

/// The operations the core answers itself.
const CORE_OPS: [&str; 6] = ["acquire", "pick", "report", "route", "ping", "classify"];

/// Where a recipient domain's mail goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Provider(u16),
    /// RFC 7505 null MX: the domain accepts no mail.
    NullMx,
}

#[derive(Debug, Clone, Copy)]
struct RouteEntry {
    route: Route,
    /// The table's epoch when the route was last set or used (eviction order).
    used: u32,
    /// After this instant the answer still holds, and the domain is queued for a new lookup.
    expires_ms: u64,
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
struct RouteTable {
    map: HashMap<Box<str>, RouteEntry>,
    /// Entries that are pinned.
    pinned: usize,
    /// Most learned routes.
    max: usize,
    /// Bumped by each sweep; entries are stamped with it when set or used.
    epoch: u32,
    /// The latest `now_ms` seen: what "expired" means in a sweep.
    now_ms: u64,
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
    fn len(&self) -> usize {
        self.map.len()
    }

    fn learned(&self) -> usize {
        self.map.len() - self.pinned
    }

    fn get(&self, domain: &str) -> Option<&RouteEntry> {
        self.map.get(domain)
    }

    /// The entry of `domain`, stamped as used now (it is kept over unused ones).
    fn touch(&mut self, domain: &str) -> Option<RouteEntry> {
        let epoch = self.epoch;
        self.map.get_mut(domain).map(|e| {
            e.used = epoch;
            *e
        })
    }

    /// Set a route; returns how many routes a sweep removed to stay in bounds. A new learned
    /// route sweeps before it goes in, so it is never the one evicted.
    fn insert(&mut self, domain: Cow<'_, str>, route: Route, expires_ms: u64) -> u64 {
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
    fn set_max(&mut self, max: usize) -> u64 {
        self.max = max;
        if self.learned() > max {
            self.sweep()
        } else {
            0
        }
    }

    fn retain(&mut self, keep: impl FnMut(&Box<str>, &mut RouteEntry) -> bool) {
        self.map.retain(keep);
        self.pinned = self.map.values().filter(|e| e.pinned()).count();
    }

    /// Forget every route and give the memory back.
    fn clear(&mut self) {
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

/// What one key saw since the last drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub granted: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub complaints: u64,
}

/// A delivery result that was not a plain delivery: the evidence policy reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub at_ms: u64,
    pub key: u32,
    pub result: Outcome,
    pub n: u32,
    pub code: Option<u16>,
    pub enhanced: Option<String>,
    pub text: Option<String>,
}

/// The result a `report` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Deferred,
    Bounced,
    Complaint,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Bounced => "bounced",
            Outcome::Complaint => "complaint",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "delivered" => Some(Outcome::Delivered),
            "deferred" => Some(Outcome::Deferred),
            "bounced" => Some(Outcome::Bounced),
            "complaint" => Some(Outcome::Complaint),
            _ => None,
        }
    }
}

/// Counters for metrics, since the engine was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    pub requests: u64,
    pub errors: u64,
    pub granted: u64,
    pub denied: u64,
    pub upcalls: u64,
    pub reports_dropped: u64,
    /// Sightings of a domain without a fresh route that found the lookup queue full
    /// (`MAX_UNRESOLVED`); the domain is queued when it is seen again after a drain.
    pub unresolved_dropped: u64,
    /// Learned routes removed to keep the route table within its bound (expired or old);
    /// such a domain counts as the default provider again and is queued when seen.
    pub routes_evicted: u64,
}

/// What one `serve` call did with its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Served {
    /// Input bytes used; the rest (an incomplete last line) waits for more data.
    pub consumed: usize,
    /// A line (range in the input, without its newline) that Python must answer next.
    pub upcall: Option<(usize, usize)>,
    /// A line over `MAX_LINE_BYTES` was found at `consumed`: close the connection.
    pub too_long: bool,
}

/// The protocol's state beside the engine: domain routes, tallies, reports.
#[derive(Debug, Clone, Default)]
pub struct Wire {
    routes: RouteTable,
    default_provider: Option<u16>,
    unresolved: Vec<Box<str>>,
    unresolved_set: HashSet<Box<str>>,
    tallies: HashMap<u32, Tally>,
    reports: Vec<Report>,
    upcall_ops: Vec<Box<str>>,
    /// Reply rules for `classify`; empty until Python sets them. Shared, so rules compiled
    /// away from the engine are put in force by a pointer swap.
    classifier: Arc<Classifier>,
    pub stats: WireStats,
}

// ----- requests -----

/// A string that borrows from the line unless it had escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// One request line. Each value is first taken raw, then read as its field's type, so a
/// wrong type is a clear message naming the field and the `id` can still be echoed.
#[derive(Default)]
struct Request<'a> {
    id: Option<&'a RawValue>,
    op: Option<Cow<'a, str>>,
    ip: Option<Cow<'a, str>>,
    domain: Option<Cow<'a, str>>,
    provider: Option<Cow<'a, str>>,
    pool: Option<Cow<'a, str>>,
    result: Option<Cow<'a, str>>,
    enhanced: Option<Cow<'a, str>>,
    text: Option<Cow<'a, str>>,
    n: Option<u64>,
    code: Option<u64>,
    /// `code` was given as `""`, which counts as left out (see `Request::code`).
    code_blank: bool,
    /// Fields this parser does not know, in order (upcall ops may use them).
    extra: Vec<Cow<'a, str>>,
    /// The first wrong-typed or repeated field.
    problem: Option<String>,
}

fn shown(raw: &RawValue) -> String {
    let s = raw.get();
    let short = cut(s, 40);
    if short.len() < s.len() {
        format!("{short}...")
    } else {
        short
    }
}

/// `s` as a JSON string, for messages that quote what the client sent.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string always encodes")
}

impl<'a> Request<'a> {
    fn text(
        problem: &mut Option<String>,
        slot: &mut Option<Cow<'a, str>>,
        name: &str,
        raw: &'a RawValue,
    ) {
        if slot.is_some() {
            problem.get_or_insert_with(|| format!("{name}: given twice"));
            return;
        }
        match serde_json::from_str::<Text<'a>>(raw.get()) {
            Ok(t) => *slot = Some(t.0),
            Err(_) => {
                problem
                    .get_or_insert_with(|| format!("{name}: must be a string, got {}", shown(raw)));
            }
        }
    }

    /// `code`: a whole number, or `""` (an MTA's log template with no code) as left out.
    fn code(
        problem: &mut Option<String>,
        slot: &mut Option<u64>,
        blank: &mut bool,
        raw: &RawValue,
    ) {
        if *blank {
            problem.get_or_insert_with(|| "code: given twice".to_owned());
        } else if raw.get() == "\"\"" && slot.is_none() {
            *blank = true;
        } else {
            Request::number(problem, slot, "code", raw);
        }
    }

    fn number(problem: &mut Option<String>, slot: &mut Option<u64>, name: &str, raw: &RawValue) {
        if slot.is_some() {
            problem.get_or_insert_with(|| format!("{name}: given twice"));
            return;
        }
        match serde_json::from_str::<u64>(raw.get()) {
            Ok(v) => *slot = Some(v),
            Err(_) => {
                problem.get_or_insert_with(|| {
                    format!("{name}: must be a whole number, got {}", shown(raw))
                });
            }
        }
    }
}

/// An optional reply field (`enhanced`, `text`) that MTAs fill from templates: `""` counts as
/// left out, so a log line without an enhanced code is no error.
fn blank<'r>(value: Option<&'r Cow<'_, str>>) -> Option<&'r str> {
    value.map(AsRef::as_ref).filter(|v| !v.is_empty())
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = Request<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Request<'de>, A::Error> {
        let mut r = Request::default();
        while let Some(key) = map.next_key::<Text<'de>>()? {
            let raw: &'de RawValue = map.next_value()?;
            let p = &mut r.problem;
            match key.0.as_ref() {
                "id" => {
                    if r.id.replace(raw).is_some() {
                        p.get_or_insert_with(|| "id: given twice".to_owned());
                    }
                }
                "op" => Request::text(p, &mut r.op, "op", raw),
                "ip" => Request::text(p, &mut r.ip, "ip", raw),
                "domain" => Request::text(p, &mut r.domain, "domain", raw),
                "provider" => Request::text(p, &mut r.provider, "provider", raw),
                "pool" => Request::text(p, &mut r.pool, "pool", raw),
                "result" => Request::text(p, &mut r.result, "result", raw),
                "enhanced" => Request::text(p, &mut r.enhanced, "enhanced", raw),
                "text" => Request::text(p, &mut r.text, "text", raw),
                "n" => Request::number(p, &mut r.n, "n", raw),
                "code" => Request::code(p, &mut r.code, &mut r.code_blank, raw),
                _ => r.extra.push(key.0),
            }
        }
        Ok(r)
    }
}

/// Why a request line gets an error reply.
struct Refusal(String);

impl<T: Into<String>> From<T> for Refusal {
    fn from(s: T) -> Self {
        Refusal(s.into())
    }
}

// ----- replies -----

fn json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

fn open(out: &mut Vec<u8>, id: Option<&RawValue>) {
    out.push(b'{');
    if let Some(id) = id {
        out.extend_from_slice(b"\"id\":");
        out.extend_from_slice(id.get().as_bytes());
        out.push(b',');
    }
}

fn error_reply(out: &mut Vec<u8>, id: Option<&RawValue>, message: &str) {
    open(out, id);
    out.extend_from_slice(b"\"ok\":false,\"error\":");
    json_str(out, message);
    out.extend_from_slice(b"}\n");
}

/// `{"id":..,"ok":true,"granted":N,"reason":"..","retry_after_ms":T` of a decision reply.
fn decision_head(out: &mut Vec<u8>, id: Option<&RawValue>, d: &Decision) {
    open(out, id);
    let _ = write!(out, "\"ok\":true,\"granted\":{},\"reason\":\"", d.granted);
    out.extend_from_slice(d.reason.as_str().as_bytes());
    out.extend_from_slice(b"\",\"retry_after_ms\":");
    match d.retry_after_ms {
        Some(ms) => {
            let _ = write!(out, "{ms}");
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Lower-case a recipient domain (or the domain of an address) and drop one trailing dot.
fn normalise_domain(raw: &str) -> Result<Cow<'_, str>, Refusal> {
    let mut d = raw.trim();
    if let Some(at) = d.rfind('@') {
        d = &d[at + 1..];
    }
    let d = d.strip_suffix('.').unwrap_or(d);
    if d.is_empty() {
        return Err(format!("domain: must not be empty, got {raw:?}").into());
    }
    if d.len() > MAX_DOMAIN {
        return Err(format!("domain: longer than {MAX_DOMAIN} characters").into());
    }
    if d.bytes()
        .any(|b| b.is_ascii_whitespace() || b == b'/' || b == b'\\')
    {
        return Err(format!("domain: not a domain name, got {raw:?}").into());
    }
    if d.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(Cow::Owned(d.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(d))
    }
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The optional `code` of a request: an SMTP reply code.
fn reply_code(req: &Request<'_>) -> Result<Option<u16>, Refusal> {
    match req.code {
        None => Ok(None),
        Some(c @ 200..=599) => Ok(Some(c as u16)),
        Some(c) => Err(format!("code: must be an SMTP reply code 200-599, got {c}").into()),
    }
}

/// The optional `enhanced` of a request: an enhanced status code.
fn reply_enhanced<'r>(req: &'r Request<'_>) -> Result<Option<&'r str>, Refusal> {
    match blank(req.enhanced.as_ref()) {
        Some(e) if !valid_enhanced(e) => Err(format!(
            "enhanced: must be an enhanced status code like 4.7.28, got {}",
            quoted(e)
        )
        .into()),
        e => Ok(e),
    }
}

impl Wire {
    pub fn new() -> Self {
        Self::default()
    }

    // ----- configuration from Python -----

    /// The provider every domain without a route counts as (normally "default").
    pub fn set_default_provider(&mut self, provider: u16) {
        self.default_provider = Some(provider);
    }

    /// Operations Python answers (the line is handed back as an upcall).
    pub fn set_upcall_ops(&mut self, ops: &[&str]) -> CoreResult<()> {
        for op in ops {
            if CORE_OPS.contains(op) {
                return Err(CoreError::bad(
                    "ops",
                    format!("{op:?} is answered by the core"),
                ));
            }
        }
        self.upcall_ops = ops.iter().map(|s| Box::from(*s)).collect();
        Ok(())
    }

    /// Route `domain` (normalised here) until `expires_ms`; `None` means null MX.
    ///
    /// `expires_ms >= MAX_NOW_MS` makes a static route: never evicted, not counted in the
    /// bound (`set_max_routes`). A new learned route that would take the table over its bound
    /// first sweeps it (see `RouteTable`), counted in `stats.routes_evicted`.
    pub fn set_route(&mut self, domain: &str, route: Route, expires_ms: u64) -> CoreResult<()> {
        let d = normalise_domain(domain).map_err(|r| CoreError::bad("domain", r.0))?;
        self.unresolved_set.remove(d.as_ref());
        self.stats.routes_evicted += self.routes.insert(d, route, expires_ms);
        Ok(())
    }

    /// Hold at most `max` learned routes (default `MAX_ROUTES`); static routes come on top.
    /// A smaller bound than the routes held sweeps at once.
    pub fn set_max_routes(&mut self, max: usize) -> CoreResult<()> {
        if max == 0 {
            return Err(CoreError::bad("max_routes", "must be at least 1, got 0"));
        }
        self.stats.routes_evicted += self.routes.set_max(max);
        Ok(())
    }

    /// The bound on learned routes.
    pub fn max_routes(&self) -> usize {
        self.routes.max
    }

    /// Replace the reply rules `classify` uses (on error the old ones stay).
    pub fn set_rules(&mut self, rules: Vec<RuleDef>) -> CoreResult<()> {
        self.classifier = Arc::new(Classifier::new(rules)?);
        Ok(())
    }

    /// Put rules compiled elsewhere in force (no compiling under the engine's lock).
    pub fn use_classifier(&mut self, classifier: Arc<Classifier>) {
        self.classifier = classifier;
    }

    /// The reply rules in force.
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// Forget every route (a reloaded plan brings its own domain table).
    pub fn clear_routes(&mut self) {
        self.routes.clear();
        self.unresolved.clear();
        self.unresolved_set.clear();
    }

    /// After the engine was replaced (a restore), move routes to its provider handles:
    /// `map[old]` is the new handle, or None when the restored engine lacks that provider
    /// (its routes are dropped; the restore must not add providers). Tallies and reports
    /// name keys of the old engine and are dropped.
    pub fn remap_providers(&mut self, map: &[Option<u16>]) {
        let remap = |r: Route| match r {
            Route::Provider(p) => map[usize::from(p)].map(Route::Provider),
            Route::NullMx => Some(Route::NullMx),
        };
        self.routes.retain(|_, e| match remap(e.route) {
            Some(route) => {
                e.route = route;
                true
            }
            None => false,
        });
        self.default_provider = self.default_provider.and_then(|p| map[usize::from(p)]);
        self.tallies.clear();
        self.reports.clear();
    }

    /// Routes held, static ones included.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// The route of `domain` at `now_ms`; an unknown or expired one is queued for lookup.
    pub fn route(&mut self, domain: &str, now_ms: u64) -> CoreResult<Route> {
        let d = normalise_domain(domain).map_err(|r| CoreError::bad("domain", r.0))?;
        self.lookup(&d, now_ms)
            .map_err(|r| CoreError::bad("domain", r.0))
    }

    fn lookup(&mut self, domain: &str, now_ms: u64) -> Result<Route, Refusal> {
        self.routes.now_ms = self.routes.now_ms.max(now_ms);
        if let Some(e) = self.routes.touch(domain) {
            if e.expires_ms <= now_ms {
                self.note_unresolved(domain);
            }
            return Ok(e.route);
        }
        self.note_unresolved(domain);
        self.default_provider
            .map(Route::Provider)
            .ok_or_else(|| Refusal::from("no default provider is configured"))
    }

    /// Queue `domain` for a lookup, once per drain; a full queue counts it as dropped.
    fn note_unresolved(&mut self, domain: &str) {
        if self.unresolved_set.contains(domain) {
            return;
        }
        if self.unresolved.len() >= MAX_UNRESOLVED {
            self.stats.unresolved_dropped += 1;
            return;
        }
        let d: Box<str> = Box::from(domain);
        self.unresolved_set.insert(d.clone());
        self.unresolved.push(d);
    }

    // ----- drains -----

    /// Domains seen without a fresh route since the last call, oldest first.
    pub fn take_unresolved(&mut self) -> Vec<Box<str>> {
        self.unresolved_set.clear();
        std::mem::take(&mut self.unresolved)
    }

    /// Per-key tallies since the last call.
    pub fn take_tallies(&mut self) -> Vec<(u32, Tally)> {
        let mut v: Vec<(u32, Tally)> = self.tallies.drain().collect();
        v.sort_unstable_by_key(|&(k, _)| k);
        v
    }

    /// Reports that were not plain deliveries, since the last call, in arrival order.
    pub fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.reports)
    }

    // ----- serving -----

    /// Answer every complete line of `input` into `out`; see `Served`.
    pub fn serve(
        &mut self,
        engine: &mut Engine,
        input: &[u8],
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> CoreResult<Served> {
        check_now(now_ms)?;
        let mut start = 0;
        while start < input.len() {
            let Some(len) = input[start..].iter().position(|&b| b == b'\n') else {
                // A last `\r` may be the start of a `\r\n` terminator: not counted yet.
                let rest = input.len() - start - usize::from(input.ends_with(b"\r"));
                return Ok(Served {
                    consumed: start,
                    upcall: None,
                    too_long: rest > MAX_LINE_BYTES,
                });
            };
            let mut end = start + len;
            let next = end + 1;
            if end > start && input[end - 1] == b'\r' {
                end -= 1;
            }
            // The limit counts the line without its terminator, `\n` or `\r\n` alike.
            if end - start > MAX_LINE_BYTES {
                return Ok(Served {
                    consumed: start,
                    upcall: None,
                    too_long: true,
                });
            }
            let line_start = start;
            let line = &input[line_start..end];
            start = next;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines (a human at a terminal) get no reply
            }
            self.stats.requests += 1;
            if self.line(engine, line, now_ms, out) {
                self.stats.upcalls += 1;
                return Ok(Served {
                    consumed: start,
                    upcall: Some((line_start, end)),
                    too_long: false,
                });
            }
        }
        Ok(Served {
            consumed: start,
            upcall: None,
            too_long: false,
        })
    }

    /// Answer one line; true when it is an upcall (nothing written).
    fn line(&mut self, engine: &mut Engine, line: &[u8], now_ms: u64, out: &mut Vec<u8>) -> bool {
        let Ok(text) = std::str::from_utf8(line) else {
            self.stats.errors += 1;
            error_reply(out, None, "request is not valid UTF-8");
            return false;
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = de
            .deserialize_map(RequestVisitor)
            .and_then(|r| de.end().map(|()| r));
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                self.stats.errors += 1;
                let message = if e.is_data() {
                    "request must be a JSON object".to_owned()
                } else {
                    format!("invalid JSON: {e}")
                };
                error_reply(out, None, &message);
                return false;
            }
        };
        let id = req.id;
        let Some(op) = req.op.as_deref() else {
            // `{"op":5}` says what is wrong with `op`, not that it is missing.
            self.stats.errors += 1;
            let message = req.problem.as_deref();
            error_reply(
                out,
                id,
                message.unwrap_or("op: missing (one of acquire, pick, report, ...)"),
            );
            return false;
        };
        if self.upcall_ops.iter().any(|o| o.as_ref() == op) {
            // A repeated or wrong-typed field is refused here too, so Python's own parse of
            // the line never sees a second `op` or `id` (its last one would win).
            if let Some(p) = &req.problem {
                self.stats.errors += 1;
                error_reply(out, id, p);
                return false;
            }
            return true;
        }
        let mark = out.len();
        if let Err(Refusal(message)) = self.answer(engine, &req, op, now_ms, out) {
            out.truncate(mark);
            self.stats.errors += 1;
            error_reply(out, id, &message);
        }
        false
    }

    fn answer(
        &mut self,
        engine: &mut Engine,
        req: &Request<'_>,
        op: &str,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let allowed: &[&str] = match op {
            "acquire" => &["ip", "domain", "provider", "n"],
            "pick" => &["pool", "domain", "provider", "n"],
            "report" => &[
                "ip", "domain", "provider", "n", "result", "code", "enhanced", "text",
            ],
            "route" => &["domain"],
            "ping" => &[],
            "classify" => &["text", "code", "enhanced", "domain", "provider"],
            _ => {
                let mut known: Vec<&str> = CORE_OPS.to_vec();
                known.extend(self.upcall_ops.iter().map(AsRef::as_ref));
                return Err(format!(
                    "op: unknown operation {}, expected one of {}",
                    quoted(op),
                    known.join(", ")
                )
                .into());
            }
        };
        if let Some(p) = &req.problem {
            return Err(p.clone().into());
        }
        let not_a_field = |f: &str| -> Refusal {
            if allowed.is_empty() {
                format!("{f}: not a field of {op} (it takes none)").into()
            } else {
                format!("{f}: not a field of {op} (fields: {})", allowed.join(", ")).into()
            }
        };
        if let Some(f) = req.extra.first() {
            return Err(not_a_field(f));
        }
        let given = [
            ("ip", req.ip.is_some()),
            ("domain", req.domain.is_some()),
            ("provider", req.provider.is_some()),
            ("pool", req.pool.is_some()),
            ("n", req.n.is_some()),
            ("result", req.result.is_some()),
            ("code", req.code.is_some() || req.code_blank),
            ("enhanced", req.enhanced.is_some()),
            ("text", req.text.is_some()),
        ];
        if let Some((f, _)) = given.iter().find(|(f, g)| *g && !allowed.contains(f)) {
            return Err(not_a_field(f));
        }
        match op {
            "acquire" => self.acquire(engine, req, now_ms, out),
            "pick" => self.pick(engine, req, now_ms, out),
            "report" => self.report(engine, req, now_ms, out),
            "route" => self.route_op(engine, req, now_ms, out),
            "classify" => self.classify_op(engine, req, now_ms, out),
            _ => {
                open(out, req.id);
                out.extend_from_slice(b"\"ok\":true}\n");
                Ok(())
            }
        }
    }

    fn count(req: &Request<'_>) -> Result<u32, Refusal> {
        match req.n {
            None => Ok(1),
            Some(0) => Err("n: must be at least 1, got 0".into()),
            Some(n) => u32::try_from(n)
                .map_err(|_| Refusal::from(format!("n: must be at most {}, got {n}", u32::MAX))),
        }
    }

    /// The provider a request names (`provider`) or implies (`domain`).
    fn provider_of(
        &mut self,
        engine: &Engine,
        req: &Request<'_>,
        now_ms: u64,
    ) -> Result<Route, Refusal> {
        match (&req.provider, &req.domain) {
            (Some(_), Some(_)) => Err("give domain or provider, not both".into()),
            (None, None) => Err("domain: missing (or give provider)".into()),
            (Some(p), None) => engine.provider_handle(p).map(Route::Provider).map_err(|_| {
                Refusal::from(format!(
                    "provider: unknown provider {}, expected one of {}",
                    quoted(p.as_ref()),
                    engine.provider_names().join(", ")
                ))
            }),
            (None, Some(d)) => {
                let d = normalise_domain(d)?;
                self.lookup(&d, now_ms)
            }
        }
    }

    fn key_of(engine: &mut Engine, req: &Request<'_>, provider: u16) -> Result<u32, Refusal> {
        let Some(ip_text) = req.ip.as_deref() else {
            return Err("ip: missing".into());
        };
        let addr = parse_ip(ip_text).map_err(|e| Refusal(e.to_string()))?;
        let ip = engine.find_ip(&addr).ok_or_else(|| {
            Refusal::from(format!(
                "ip: {addr} is not a sending IP of this daemon's plan"
            ))
        })?;
        engine
            .key_of(ip, provider)
            .map_err(|e| Refusal(e.to_string()))
    }

    fn decision_reply(
        &mut self,
        engine: &Engine,
        id: Option<&RawValue>,
        d: &Decision,
        pool: Option<&str>,
        out: &mut Vec<u8>,
    ) {
        let (ip, provider) = engine.key_handles(d.key);
        if d.is_granted() {
            self.stats.granted += 1;
            self.tallies.entry(d.key).or_default().granted += u64::from(d.granted);
        } else {
            self.stats.denied += 1;
        }
        decision_head(out, id, d);
        let _ = write!(out, ",\"ip\":\"{}\",\"provider\":", engine.ip_addr(ip));
        json_str(out, engine.provider_name(provider));
        if let Some(pool) = pool {
            out.extend_from_slice(b",\"pool\":");
            json_str(out, pool);
            out.extend_from_slice(b",\"tier\":\"");
            out.extend_from_slice(d.tier.as_str().as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b"}\n");
    }

    fn null_mx_reply(&mut self, id: Option<&RawValue>, out: &mut Vec<u8>) {
        self.stats.denied += 1;
        open(out, id);
        out.extend_from_slice(
            b"\"ok\":true,\"granted\":0,\"reason\":\"null_mx\",\"retry_after_ms\":null,\"provider\":null}\n",
        );
    }

    fn acquire(
        &mut self,
        engine: &mut Engine,
        req: &Request<'_>,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let n = Self::count(req)?;
        let route = self.provider_of(engine, req, now_ms)?;
        let Route::Provider(provider) = route else {
            if req.ip.is_none() {
                return Err("ip: missing".into());
            }
            self.null_mx_reply(req.id, out);
            return Ok(());
        };
        let key = Self::key_of(engine, req, provider)?;
        let d = engine
            .acquire(key, n, now_ms)
            .map_err(|e| Refusal(e.to_string()))?;
        self.decision_reply(engine, req.id, &d, None, out);
        Ok(())
    }

    fn pick(
        &mut self,
        engine: &mut Engine,
        req: &Request<'_>,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let n = Self::count(req)?;
        let Some(pool_name) = req.pool.as_deref() else {
            return Err("pool: missing".into());
        };
        let pool = engine
            .pool_handle(pool_name)
            .map_err(|_| Refusal::from(format!("pool: unknown pool {}", quoted(pool_name))))?;
        let Route::Provider(provider) = self.provider_of(engine, req, now_ms)? else {
            self.null_mx_reply(req.id, out);
            return Ok(());
        };
        let d = engine
            .pick(pool, provider, n, now_ms)
            .map_err(|e| Refusal(e.to_string()))?;
        if d.is_granted() {
            self.decision_reply(engine, req.id, &d, Some(pool_name), out);
        } else {
            // A denied pick names no IP: every member and overflow pool was full.
            self.stats.denied += 1;
            decision_head(out, req.id, &d);
            out.extend_from_slice(b",\"pool\":");
            json_str(out, pool_name);
            out.extend_from_slice(b",\"provider\":");
            json_str(out, engine.provider_name(provider));
            out.extend_from_slice(b"}\n");
        }
        Ok(())
    }

    fn report(
        &mut self,
        engine: &mut Engine,
        req: &Request<'_>,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let n = Self::count(req)?;
        let Some(result) = req.result.as_deref() else {
            return Err("result: missing (delivered, deferred, bounced or complaint)".into());
        };
        let outcome = Outcome::parse(result).ok_or_else(|| {
            Refusal::from(format!(
                "result: must be delivered, deferred, bounced or complaint, got {}",
                quoted(result)
            ))
        })?;
        let code = reply_code(req)?;
        let enhanced = reply_enhanced(req)?;
        let Route::Provider(provider) = self.provider_of(engine, req, now_ms)? else {
            return Err("domain: publishes a null MX (accepts no mail); nothing recorded".into());
        };
        let key = Self::key_of(engine, req, provider)?;
        let tally = self.tallies.entry(key).or_default();
        let count = u64::from(n);
        match outcome {
            Outcome::Delivered => tally.delivered += count,
            Outcome::Deferred => tally.deferred += count,
            Outcome::Bounced => tally.bounced += count,
            Outcome::Complaint => tally.complaints += count,
        }
        if outcome != Outcome::Delivered {
            if self.reports.len() < MAX_REPORTS {
                self.reports.push(Report {
                    at_ms: now_ms,
                    key,
                    result: outcome,
                    n,
                    code,
                    enhanced: enhanced.map(str::to_owned),
                    text: blank(req.text.as_ref()).map(|t| cut(t, MAX_REPORT_TEXT)),
                });
            } else {
                self.stats.reports_dropped += 1;
            }
        }
        open(out, req.id);
        out.extend_from_slice(b"\"ok\":true,\"provider\":");
        json_str(out, engine.provider_name(provider));
        out.extend_from_slice(b"}\n");
        Ok(())
    }

    fn classify_op(
        &mut self,
        engine: &Engine,
        req: &Request<'_>,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let Some(text) = blank(req.text.as_ref()) else {
            return Err("text: missing (the SMTP reply)".into());
        };
        let code = reply_code(req)?;
        let enhanced = reply_enhanced(req)?;
        // Provider::Any when neither is given or for the default provider; a null-MX domain has
        // no provider's rules.
        let named: Option<&str> = match (&req.provider, &req.domain) {
            (Some(_), Some(_)) => return Err("give domain or provider, not both".into()),
            (None, None) => None,
            (Some(p), None) => {
                if engine.provider_handle(p).is_err() && !self.classifier.mentions_provider(p) {
                    return Err(format!(
                        "provider: unknown provider {}, expected one of {} or a provider of the rules",
                        quoted(p.as_ref()),
                        engine.provider_names().join(", ")
                    )
                    .into());
                }
                Some(p.as_ref())
            }
            (None, Some(d)) => {
                let d = normalise_domain(d)?;
                match self.lookup(&d, now_ms)? {
                    Route::Provider(h) => Some(engine.provider_name(h)),
                    Route::NullMx => Some(""),
                }
            }
        };
        // The default provider stands for every provider without a row of its own (Yahoo,
        // Apple, ...): every rule applies, as it does to the reports kiln acts on.
        let default = self.default_provider.map(|h| engine.provider_name(h));
        let provider = match named {
            Some(p) if Some(p) == default => Provider::Any,
            _ => named.map_or(Provider::Any, Provider::Named),
        };
        let (n, verdict) = self.classifier.classify(provider, code, enhanced, text);
        open(out, req.id);
        out.extend_from_slice(b"\"ok\":true,\"class\":");
        match &verdict {
            Verdict::Internal => {
                out.extend_from_slice(b"\"internal\",\"scope\":null,\"rule\":null,\"matched\":[]");
            }
            Verdict::Unclassified => out
                .extend_from_slice(b"\"unclassified\",\"scope\":null,\"rule\":null,\"matched\":[]"),
            Verdict::Classified { rule, matched } => {
                let r = self.classifier.rule(*rule);
                out.push(b'"');
                out.extend_from_slice(r.class.as_str().as_bytes());
                out.extend_from_slice(b"\",\"scope\":\"");
                out.extend_from_slice(r.scope.as_str().as_bytes());
                out.extend_from_slice(b"\",\"rule\":");
                json_str(out, &r.id);
                out.extend_from_slice(b",\"matched\":[");
                for (k, &m) in matched.iter().enumerate() {
                    if k > 0 {
                        out.push(b',');
                    }
                    json_str(out, &self.classifier.rule(m).id);
                }
                out.push(b']');
            }
        }
        out.extend_from_slice(b",\"normalised\":");
        json_str(out, &n.line);
        out.extend_from_slice(b",\"provider\":");
        match named {
            Some(p) if !p.is_empty() => json_str(out, p),
            _ => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    }

    fn route_op(
        &mut self,
        engine: &Engine,
        req: &Request<'_>,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let Some(d) = req.domain.as_deref() else {
            return Err("domain: missing".into());
        };
        let d = normalise_domain(d)?;
        let route = self.lookup(&d, now_ms)?;
        let known = self
            .routes
            .get(d.as_ref())
            .is_some_and(|e| e.expires_ms > now_ms);
        open(out, req.id);
        out.extend_from_slice(b"\"ok\":true,\"domain\":");
        json_str(out, &d);
        out.extend_from_slice(b",\"provider\":");
        match route {
            Route::Provider(p) => json_str(out, engine.provider_name(p)),
            Route::NullMx => out.extend_from_slice(b"null"),
        }
        let _ = writeln!(out, ",\"resolved\":{known}}}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn setup() -> (Engine, Wire) {
        let mut e = Engine::new();
        let google = e.limiter.provider("google").unwrap();
        let default = e.limiter.provider("default").unwrap();
        let k = e.limiter.key("192.0.2.10", "google").unwrap();
        e.set_limits(k, None, 1, None, Some(2)).unwrap();
        e.define_pool("tx", &[("192.0.2.10", 1, true)], None)
            .unwrap();
        let mut w = Wire::new();
        w.set_default_provider(default);
        w.set_route("gmail.com", Route::Provider(google), u64::MAX)
            .unwrap();
        w.set_route("example.com", Route::NullMx, u64::MAX).unwrap();
        w.set_upcall_ops(&["status"]).unwrap();
        (e, w)
    }

    fn serve(e: &mut Engine, w: &mut Wire, input: &str) -> (String, Served) {
        let mut out = Vec::new();
        let s = w.serve(e, input.as_bytes(), NOW, &mut out).unwrap();
        (String::from_utf8(out).unwrap(), s)
    }

    #[test]
    fn acquire_until_the_cap_then_deny() {
        let (mut e, mut w) = setup();
        let req = "{\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"domain\":\"Gmail.COM.\",\"id\":7}\n";
        let (out, s) = serve(&mut e, &mut w, &req.repeat(3));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(s.consumed, req.len() * 3);
        assert_eq!(
            lines[0],
            "{\"id\":7,\"ok\":true,\"granted\":1,\"reason\":\"granted\",\"retry_after_ms\":0,\"ip\":\"192.0.2.10\",\"provider\":\"google\"}"
        );
        assert!(
            lines[2].contains("\"granted\":0,\"reason\":\"daily_cap\""),
            "{out}"
        );
        let t = w.take_tallies();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].1.granted, 2);
        assert!(w.take_tallies().is_empty());
    }

    #[test]
    fn errors_name_the_field_and_echo_the_id() {
        let (mut e, mut w) = setup();
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"acquire\",\"id\":\"a\",\"ip\":\"192.0.2.10\",\"domain\":\"gmail.com\",\"n\":\"5\"}\n\
             {\"op\":\"acquire\",\"ip\":\"192.0.2.99\",\"domain\":\"gmail.com\"}\n\
             {\"op\":\"nope\"}\n\
             not json\n\
             [1,2]\n\
             {\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"domain\":\"gmail.com\",\"count\":2}\n",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 6, "{out}");
        assert_eq!(
            lines[0],
            "{\"id\":\"a\",\"ok\":false,\"error\":\"n: must be a whole number, got \\\"5\\\"\"}"
        );
        assert!(
            lines[1].contains("192.0.2.99 is not a sending IP"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("unknown operation \\\"nope\\\""),
            "{}",
            lines[2]
        );
        assert!(lines[3].contains("invalid JSON"), "{}", lines[3]);
        assert!(lines[4].contains("must be a JSON object"), "{}", lines[4]);
        assert!(
            lines[5].contains("count: not a field of acquire"),
            "{}",
            lines[5]
        );
        assert_eq!(w.stats.errors, 6);
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":5,\"id\":1}\n{\"op\":\"ping\",\"n\":1}\n",
        );
        assert_eq!(
            out,
            "{\"id\":1,\"ok\":false,\"error\":\"op: must be a string, got 5\"}\n\
             {\"ok\":false,\"error\":\"n: not a field of ping (it takes none)\"}\n"
        );
    }

    #[test]
    fn partial_lines_wait_and_upcalls_stop_the_buffer() {
        let (mut e, mut w) = setup();
        let input =
            "{\"op\":\"ping\"}\r\n\n{\"op\":\"status\",\"id\":1}\n{\"op\":\"ping\"}\n{\"op\":";
        let (out, s) = serve(&mut e, &mut w, input);
        assert_eq!(out, "{\"ok\":true}\n");
        let (a, b) = s.upcall.unwrap();
        assert_eq!(&input[a..b], "{\"op\":\"status\",\"id\":1}");
        let rest = &input[s.consumed..];
        let (out, s) = serve(&mut e, &mut w, rest);
        assert_eq!(out, "{\"ok\":true}\n");
        assert_eq!(&rest[s.consumed..], "{\"op\":");
        assert!(!s.too_long);
    }

    #[test]
    fn upcall_range_without_carriage_return() {
        let (mut e, mut w) = setup();
        let input = "{\"op\":\"status\"}\r\n";
        let (_, s) = serve(&mut e, &mut w, input);
        let (a, b) = s.upcall.unwrap();
        assert_eq!(&input[a..b], "{\"op\":\"status\"}");
        assert_eq!(s.consumed, input.len());
    }

    #[test]
    fn upcall_lines_with_a_repeated_field_are_refused() {
        let (mut e, mut w) = setup();
        let (out, s) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"status\",\"op\":\"nope\",\"id\":3}\n{\"op\":\"status\",\"n\":\"x\"}\n",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "{\"id\":3,\"ok\":false,\"error\":\"op: given twice\"}",
                "{\"ok\":false,\"error\":\"n: must be a whole number, got \\\"x\\\"\"}"
            ]
        );
        assert_eq!(s.upcall, None);
    }

    #[test]
    fn the_line_limit_does_not_count_the_terminator() {
        let (mut e, mut w) = setup();
        let pad = |total: usize| {
            let head = "{\"op\":\"ping\",\"id\":\"";
            format!("{head}{}\"}}", "x".repeat(total - head.len() - 2))
        };
        for end in ["\n", "\r\n"] {
            let line = pad(MAX_LINE_BYTES);
            assert_eq!(line.len(), MAX_LINE_BYTES);
            let (out, s) = serve(&mut e, &mut w, &format!("{line}{end}"));
            assert!(out.ends_with(",\"ok\":true}\n"), "{end:?}");
            assert!(!s.too_long);
            // Waiting for the rest of a terminator is not yet too long.
            let (_, s) = serve(&mut e, &mut w, &format!("{line}{}", &end[..end.len() - 1]));
            assert_eq!((s.consumed, s.too_long), (0, false), "{end:?}");
            let longer = pad(MAX_LINE_BYTES + 1);
            let (out, s) = serve(&mut e, &mut w, &format!("{longer}{end}"));
            assert_eq!((out.as_str(), s.consumed, s.too_long), ("", 0, true));
            let (_, s) = serve(&mut e, &mut w, &format!("{longer}\r"));
            assert!(s.too_long);
        }
    }

    #[test]
    fn long_lines_close() {
        let (mut e, mut w) = setup();
        let long = format!("{{\"op\":\"ping\"}}\n{}\n", "x".repeat(MAX_LINE_BYTES + 1));
        let (out, s) = serve(&mut e, &mut w, &long);
        assert_eq!(out, "{\"ok\":true}\n");
        assert!(s.too_long);
        assert_eq!(s.consumed, "{\"op\":\"ping\"}\n".len());
        let partial = "y".repeat(MAX_LINE_BYTES + 1);
        let (_, s) = serve(&mut e, &mut w, &partial);
        assert!(s.too_long);
    }

    #[test]
    fn unknown_domains_count_as_default_and_queue_for_lookup() {
        let (mut e, mut w) = setup();
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"route\",\"domain\":\"user@Corp.Example\"}\n{\"op\":\"route\",\"domain\":\"corp.example\"}\n",
        );
        assert!(out.starts_with("{\"ok\":true,\"domain\":\"corp.example\",\"provider\":\"default\",\"resolved\":false}"), "{out}");
        assert_eq!(w.take_unresolved(), vec![Box::from("corp.example")]);
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"domain\":\"example.com\"}\n",
        );
        assert!(out.contains("\"reason\":\"null_mx\""), "{out}");
    }

    /// The provider handle `route` gives for `domain` (panics on a null MX).
    fn provider_of(w: &mut Wire, domain: &str, now_ms: u64) -> u16 {
        match w.route(domain, now_ms).unwrap() {
            Route::Provider(p) => p,
            Route::NullMx => panic!("{domain} has a null MX"),
        }
    }

    #[test]
    fn the_route_table_is_bounded_and_static_routes_stay() {
        let (e, mut w) = setup();
        let google = e.limiter.provider_handle("google").unwrap();
        let default = e.limiter.provider_handle("default").unwrap();
        assert_eq!(w.max_routes(), MAX_ROUTES);
        w.set_max_routes(100).unwrap();
        w.set_route("static.example", Route::Provider(google), MAX_NOW_MS)
            .unwrap();
        let statics = 3; // gmail.com and example.com from setup, and static.example
        for i in 0..1_000 {
            w.set_route(
                &format!("d{i}.example"),
                Route::Provider(google),
                NOW + 60_000 + i, // soonest expiry first among equally old routes
            )
            .unwrap();
            assert!(w.route_count() <= 100 + statics, "{i}: {}", w.route_count());
        }
        assert!(w.route_count() > statics + 100 - 100 / 8 - 1);
        assert_eq!(
            w.stats.routes_evicted,
            (1_000 + statics - w.route_count()) as u64
        );
        // The static routes are all there; the newest learned one is too.
        for d in ["gmail.com", "static.example", "d999.example"] {
            assert_eq!(provider_of(&mut w, d, NOW), google, "{d}");
        }
        assert_eq!(w.route("example.com", NOW).unwrap(), Route::NullMx);
        assert!(w.take_unresolved().is_empty());
        // An evicted domain is default again and queued for a new lookup.
        assert_eq!(provider_of(&mut w, "d0.example", NOW), default);
        assert_eq!(w.take_unresolved(), vec![Box::from("d0.example")]);
        // Static routes alone may exceed the bound: they are the plan's own table.
        w.set_max_routes(1).unwrap();
        for i in 0..10 {
            w.set_route(&format!("s{i}.example"), Route::NullMx, u64::MAX)
                .unwrap();
        }
        assert_eq!(w.route_count(), statics + 10);
        assert_eq!(
            w.set_max_routes(0).unwrap_err().to_string(),
            "max_routes: must be at least 1, got 0"
        );
    }

    #[test]
    fn a_full_table_drops_expired_routes_first() {
        let (e, mut w) = setup();
        let google = e.limiter.provider_handle("google").unwrap();
        w.set_max_routes(10).unwrap();
        for i in 0..5 {
            w.set_route(&format!("soon{i}.example"), Route::NullMx, NOW + 10)
                .unwrap();
            w.set_route(
                &format!("late{i}.example"),
                Route::Provider(google),
                NOW + 1_000_000,
            )
            .unwrap();
        }
        // The wire learns the time from what it serves.
        provider_of(&mut w, "gmail.com", NOW + 10);
        w.set_route("new.example", Route::Provider(google), NOW + 1_000_000)
            .unwrap();
        assert_eq!(w.stats.routes_evicted, 5);
        for i in 0..5 {
            assert_eq!(
                provider_of(&mut w, &format!("late{i}.example"), NOW),
                google
            );
        }
        assert_eq!(provider_of(&mut w, "new.example", NOW), google);
        assert_eq!(w.route_count(), 2 + 6);
    }

    #[test]
    fn a_full_table_keeps_recently_used_routes_over_unused_ones() {
        let (e, mut w) = setup();
        let google = e.limiter.provider_handle("google").unwrap();
        w.set_max_routes(8).unwrap();
        let far = NOW + 1_000_000;
        for i in 0..8 {
            w.set_route(&format!("a{i}.example"), Route::Provider(google), far + i)
                .unwrap();
        }
        // Full: a sweep makes room before b0 goes in, evicting the soonest expiry.
        w.set_route("b0.example", Route::Provider(google), far)
            .unwrap();
        assert_eq!(w.stats.routes_evicted, 1);
        assert!(w.routes.get("a0.example").is_none());
        // a1 is used now, so the next sweep takes a2 (unused since) although a1 expires first.
        provider_of(&mut w, "a1.example", NOW);
        w.set_route("b1.example", Route::Provider(google), far)
            .unwrap();
        assert_eq!(w.stats.routes_evicted, 2);
        assert!(w.routes.get("a1.example").is_some());
        assert!(w.routes.get("a2.example").is_none());
        for d in ["b0.example", "b1.example", "a7.example"] {
            assert!(w.routes.get(d).is_some(), "{d}");
        }
        // A smaller bound sweeps at once; replacing a route never evicts.
        w.set_max_routes(4).unwrap();
        assert_eq!(w.route_count(), 2 + 3);
        w.set_route("b1.example", Route::NullMx, far).unwrap();
        assert_eq!(w.route_count(), 2 + 3);
        assert_eq!(w.stats.routes_evicted, 2 + 8 - 3);
        // A reload gives the memory back.
        w.clear_routes();
        assert_eq!((w.route_count(), w.routes.pinned), (0, 0));
    }

    #[test]
    fn the_lookup_queue_is_bounded_and_overflow_is_counted() {
        let (_, mut w) = setup();
        for i in 0..MAX_UNRESOLVED {
            w.route(&format!("q{i}.example"), NOW).unwrap();
        }
        // Seeing a queued domain again is no overflow; a new one is.
        w.route("q0.example", NOW).unwrap();
        assert_eq!(w.stats.unresolved_dropped, 0);
        w.route("late.example", NOW).unwrap();
        w.route("late.example", NOW).unwrap();
        assert_eq!(w.stats.unresolved_dropped, 2);
        let taken = w.take_unresolved();
        assert_eq!(taken.len(), MAX_UNRESOLVED);
        assert_eq!(taken[0].as_ref(), "q0.example");
        // After a drain the dropped domain is queued when seen again.
        w.route("late.example", NOW).unwrap();
        assert_eq!(w.take_unresolved(), vec![Box::from("late.example")]);
        assert_eq!(w.stats.unresolved_dropped, 2);
    }

    #[test]
    fn reports_tally_and_keep_pushback() {
        let (mut e, mut w) = setup();
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"report\",\"ip\":\"192.0.2.10\",\"domain\":\"gmail.com\",\"result\":\"delivered\",\"n\":5}\n\
             {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":421,\"enhanced\":\"4.7.28\",\"text\":\"slow down\"}\n\
             {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":42}\n",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "{\"ok\":true,\"provider\":\"google\"}");
        assert!(
            lines[2].contains("code: must be an SMTP reply code"),
            "{out}"
        );
        let t = w.take_tallies();
        assert_eq!((t[0].1.delivered, t[0].1.deferred), (5, 1));
        let r = w.take_reports();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].enhanced.as_deref(), Some("4.7.28"));
        assert_eq!(r[0].code, Some(421));
    }

    /// MTA log templates fill `code`, `enhanced` and `text` with `""` when the reply had none:
    /// that is the field left out, never an error; given twice is still an error.
    #[test]
    fn empty_reply_fields_count_as_left_out() {
        let (mut e, mut w) = setup();
        w.set_rules(rules()).unwrap();
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"bounced\",\"code\":550,\"enhanced\":\"\",\"text\":\"\"}\n\
             {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":\"\",\"enhanced\":\"\",\"text\":\"\"}\n\
             {\"op\":\"classify\",\"text\":\"421 unusual rate\",\"code\":\"\",\"enhanced\":\"\"}\n\
             {\"op\":\"classify\",\"text\":\"\",\"code\":421}\n\
             {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":\"\",\"code\":421}\n\
             {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":\" \"}\n\
             {\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"code\":\"\"}\n",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 7, "{out}");
        assert_eq!(lines[0], "{\"ok\":true,\"provider\":\"google\"}");
        assert_eq!(lines[1], "{\"ok\":true,\"provider\":\"google\"}");
        assert!(lines[2].contains("\"class\":\"rate_limit_rep\""), "{out}");
        assert!(
            lines[2].contains("\"normalised\":\"421 unusual rate\""),
            "{out}"
        );
        assert!(lines[3].contains("text: missing (the SMTP reply)"), "{out}");
        assert!(lines[4].contains("code: given twice"), "{out}");
        assert!(lines[5].contains("code: must be a whole number"), "{out}");
        assert!(lines[6].contains("code: not a field of acquire"), "{out}");
        let r = w.take_reports();
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].code, r[0].enhanced.as_deref(), r[0].text.as_deref()),
            (Some(550), None, None)
        );
        assert_eq!(
            (r[1].code, r[1].enhanced.as_deref(), r[1].text.as_deref()),
            (None, None, None)
        );
    }

    #[test]
    fn pick_names_the_tier() {
        let (mut e, mut w) = setup();
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"pick\",\"pool\":\"tx\",\"domain\":\"gmail.com\"}\n{\"op\":\"pick\",\"pool\":\"nope\",\"domain\":\"gmail.com\"}\n",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].ends_with("\"provider\":\"google\",\"pool\":\"tx\",\"tier\":\"warming\"}"),
            "{out}"
        );
        assert!(lines[1].contains("unknown pool"), "{out}");
    }

    fn rules() -> Vec<RuleDef> {
        use crate::classify::{Class, CodeSpec, Scope};
        let rule = |id: &str, providers: Option<&[&str]>, text: &str, class, scope| RuleDef {
            id: id.to_owned(),
            providers: providers.map(|p| p.iter().map(|s| (*s).to_owned()).collect()),
            codes: Some(vec![CodeSpec::Family(4), CodeSpec::Family(5)]),
            enhanced: None,
            text: text.to_owned(),
            class,
            scope,
            fallback: false,
        };
        vec![
            rule(
                "google-4.7.28-ip",
                Some(&["google"]),
                r"^421 4\.7\.28 .*unusual rate .*your IP address",
                Class::RateLimitRep,
                Scope::Ip,
            ),
            rule(
                "ms-650",
                Some(&["microsoft-consumer", "microsoft-365"]),
                "rate limited due to IP reputation",
                Class::RateLimitRep,
                Scope::Ip,
            ),
            rule(
                "generic-rate",
                None,
                "unusual rate|rate limited",
                Class::RateLimitRep,
                Scope::Ip,
            ),
        ]
    }

    #[test]
    fn classify_names_class_scope_rule_and_every_match() {
        let (mut e, mut w) = setup();
        w.set_rules(rules()).unwrap();
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"classify\",\"id\":1,\"text\":\"Gmail has detected an unusual rate of mail from your IP address 2001:db8::25.\",\"code\":421,\"enhanced\":\"4.7.28\",\"domain\":\"gmail.com\"}\n\
             {\"op\":\"classify\",\"text\":\"421-4.7.28 Gmail has detected an unusual rate of 421-4.7.28 mail from your IP address\"}\n\
             {\"op\":\"classify\",\"text\":\"451 4.7.650 The mail server has been temporarily rate limited due to IP reputation.\",\"provider\":\"microsoft-365\"}\n\
             {\"op\":\"classify\",\"text\":\"250 2.0.0 OK\",\"provider\":\"google\"}\n\
             {\"op\":\"classify\",\"text\":\"connect to mx[192.0.2.1]:25: Connection timed out\",\"code\":421}\n\
             {\"op\":\"classify\",\"text\":\"421 unusual rate\",\"domain\":\"example.com\"}\n",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "{\"id\":1,\"ok\":true,\"class\":\"rate_limit_rep\",\"scope\":\"ip\",\"rule\":\"google-4.7.28-ip\",\"matched\":[\"google-4.7.28-ip\",\"generic-rate\"],\"normalised\":\"421 4.7.28 Gmail has detected an unusual rate of mail from your IP address 2001:db8::25.\",\"provider\":\"google\"}"
        );
        assert!(
            lines[1].contains("\"rule\":\"google-4.7.28-ip\"")
                && lines[1].contains("\"normalised\":\"421 4.7.28 Gmail has detected an unusual rate of mail from your IP address\"")
                && lines[1].ends_with("\"provider\":null}"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("\"matched\":[\"ms-650\",\"generic-rate\"]"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].starts_with("{\"ok\":true,\"class\":\"unclassified\",\"scope\":null,\"rule\":null,\"matched\":[]"),
            "{}",
            lines[3]
        );
        assert!(lines[4].contains("\"class\":\"internal\""), "{}", lines[4]);
        // A null-MX domain has no provider: only rules without a provider list apply.
        assert!(
            lines[5].contains("\"rule\":\"generic-rate\"")
                && lines[5].ends_with("\"provider\":null}"),
            "{}",
            lines[5]
        );
    }

    #[test]
    fn classify_errors_name_the_field() {
        let (mut e, mut w) = setup();
        w.set_rules(rules()).unwrap();
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"classify\",\"id\":2}\n\
             {\"op\":\"classify\",\"text\":5}\n\
             {\"op\":\"classify\",\"text\":\"x\",\"code\":\"421\"}\n\
             {\"op\":\"classify\",\"text\":\"x\",\"code\":99}\n\
             {\"op\":\"classify\",\"text\":\"x\",\"enhanced\":\"4.7\"}\n\
             {\"op\":\"classify\",\"text\":\"x\",\"provider\":\"gmail\"}\n\
             {\"op\":\"classify\",\"text\":\"x\",\"provider\":\"google\",\"domain\":\"gmail.com\"}\n\
             {\"op\":\"classify\",\"text\":\"x\",\"ip\":\"192.0.2.10\"}\n\
             {\"op\":\"nope\"}\n",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 9, "{out}");
        assert_eq!(
            lines[0],
            "{\"id\":2,\"ok\":false,\"error\":\"text: missing (the SMTP reply)\"}"
        );
        assert!(
            lines[1].contains("text: must be a string, got 5"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("code: must be a whole number"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].contains("code: must be an SMTP reply code 200-599, got 99"),
            "{}",
            lines[3]
        );
        assert!(
            lines[4].contains("enhanced: must be an enhanced status code"),
            "{}",
            lines[4]
        );
        assert!(
            lines[5].contains("provider: unknown provider \\\"gmail\\\""),
            "{}",
            lines[5]
        );
        assert!(
            lines[6].contains("give domain or provider, not both"),
            "{}",
            lines[6]
        );
        assert!(
            lines[7].contains(
                "ip: not a field of classify (fields: text, code, enhanced, domain, provider)"
            ),
            "{}",
            lines[7]
        );
        assert!(
            lines[8].contains("acquire, pick, report, route, ping, classify, status"),
            "{}",
            lines[8]
        );
    }

    #[test]
    fn classify_without_rules_is_unclassified_and_bad_rules_keep_the_old() {
        let (mut e, mut w) = setup();
        let (out, _) = serve(
            &mut e,
            &mut w,
            "{\"op\":\"classify\",\"text\":\"421 unusual rate\"}\n",
        );
        assert!(out.contains("\"class\":\"unclassified\""), "{out}");
        w.set_rules(rules()).unwrap();
        let mut bad = rules();
        bad[1].text = "(".to_owned();
        let err = w.set_rules(bad).unwrap_err().to_string();
        assert!(err.contains("rule \"ms-650\": text:"), "{err}");
        assert_eq!(w.classifier().len(), 3);
    }

    #[test]
    fn invalid_utf8_and_junk_get_errors() {
        let (mut e, mut w) = setup();
        let mut out = Vec::new();
        let s = w
            .serve(
                &mut e,
                b"\xff\xfe\n\x00\x01\x02\n{\"op\":\"ping\"}\n",
                NOW,
                &mut out,
            )
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("not valid UTF-8"));
        assert!(lines[1].contains("invalid JSON"));
        assert_eq!(lines[2], "{\"ok\":true}");
        assert_eq!(s.consumed, 21);
    }
}
