//! The native wire protocol: one JSON object per line in, one per line out, in order.
//!
//! `Wire::serve` turns a whole read buffer into a whole reply buffer in one call: each
//! complete line is parsed (`request.rs`), answered by its entry in the op table (`ops.rs`:
//! `acquire`, `pick`, `report`, `route`, `ping`, `classify`) and written (`reply.rs`). The
//! rare operator operations (`status`, `limits`, `reload`, ...) go back to Python as an
//! *upcall*, stopping right after that line so replies stay in request order.
//! `docs/protocol.md` is the contract.
//!
//! Beside the engine the wire keeps domain routes (`routes.rs`) and what Python drains
//! about once a second (`ledger.rs`): per-key tallies, push-back reports with their SMTP
//! text, and recipient domains that still need an MX lookup. Nothing here blocks: an unknown
//! domain counts as the default provider until Python has resolved it.

mod ledger;
mod ops;
mod reply;
mod request;
mod routes;

use std::borrow::Cow;
use std::sync::Arc;

use crate::classify::{Classifier, RuleDef};
use crate::engine::Engine;
use crate::error::{CoreError, CoreResult};
use crate::limiter::check_now;
use crate::suppress::{Event as SuppressEvent, SuppressionSet};
use ledger::Ledger;
pub use ledger::{Outcome, Report, Tally, MAX_REPORTS, MAX_REPORT_TEXT};
use routes::{normalise_domain, trimmed, RouteTable, Unresolved};
pub use routes::{Route, MAX_ROUTES, MAX_UNRESOLVED};

/// Longest request line; a longer one closes the connection (after the earlier replies).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

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
    /// (Other protocols also set it to close after their replies: a broken frame, `QUIT`.)
    pub too_long: bool,
}

impl Served {
    /// `consumed` bytes answered; the rest waits for more data.
    pub fn upto(consumed: usize) -> Self {
        Self {
            consumed,
            upcall: None,
            too_long: false,
        }
    }

    /// `consumed` bytes answered; close the connection once the replies are written.
    pub fn closing(consumed: usize) -> Self {
        Self {
            consumed,
            upcall: None,
            too_long: true,
        }
    }
}

/// Core operations whose lines Python answers when they name a recipient `address` (a
/// `report` that may put it on the suppression list), once named in `set_upcall_ops`.
pub const ADDRESS_UPCALLS: &[&str] = &["report"];

/// The protocol's state beside the engine: domain routes, tallies, reports.
#[derive(Debug, Clone, Default)]
pub struct Wire {
    routes: RouteTable,
    default_provider: Option<u16>,
    unresolved: Unresolved,
    ledger: Ledger,
    upcall_ops: Vec<Box<str>>,
    /// Reply rules for `classify`; empty until Python sets them. Shared, so rules compiled
    /// away from the engine are put in force by a pointer swap.
    classifier: Arc<Classifier>,
    pub stats: WireStats,
    /// The suppression list's live set: `acquire` and `pick` given an `address` deny it.
    pub suppress: SuppressionSet,
}

/// Why a request line gets an error reply.
struct Refusal(String);

impl<T: Into<String>> From<T> for Refusal {
    fn from(s: T) -> Self {
        Refusal(s.into())
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

    /// Operations Python answers (the line is handed back as an upcall). Of the core's
    /// own operations only those of `ADDRESS_UPCALLS` may be named: their lines that carry
    /// a recipient `address` go to Python, the rest stay in the core.
    pub fn set_upcall_ops(&mut self, ops: &[&str]) -> CoreResult<()> {
        for op in ops {
            if ops::find(op).is_some() && !ADDRESS_UPCALLS.contains(op) {
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
        let d = normalise_domain(domain).map_err(|m| CoreError::bad("domain", m))?;
        self.unresolved.forget(d.as_ref());
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
        self.ledger.clear();
    }

    /// Why `address` may not be mailed at `now_ms` (global list, or `scope`'s), after the
    /// same normalisation as the list's (domain lower-cased and in ASCII form).
    pub fn suppressed(
        &self,
        address: &str,
        scope: &str,
        now_ms: u64,
    ) -> Result<Option<SuppressEvent>, String> {
        if self.suppress.is_empty() {
            return Ok(None);
        }
        let (local, domain) = address_parts(address)?;
        let set = &self.suppress;
        let at = |scope: &str| {
            set.lookup(
                set.fingerprint_parts(scope.as_bytes(), local.as_bytes(), domain.as_bytes()),
                now_ms,
            )
        };
        Ok(at("").or_else(|| (!scope.is_empty()).then(|| at(scope)).flatten()))
    }

    /// `suppressed` for many addresses, into `out` (Err: not an address): every one is hashed
    /// first, then the table is probed for all, so the CPU overlaps the memory reads.
    pub fn suppressed_many<'a>(
        &self,
        addresses: impl IntoIterator<Item = &'a str>,
        scope: &str,
        now_ms: u64,
        out: &mut Vec<Result<Option<SuppressEvent>, ()>>,
    ) {
        let set = &self.suppress;
        let mut fps = Vec::new();
        for a in addresses {
            match address_parts(a) {
                Ok((local, domain)) => {
                    let fp = |s: &str| {
                        set.fingerprint_parts(s.as_bytes(), local.as_bytes(), domain.as_bytes())
                    };
                    fps.push((out.len(), fp(""), (!scope.is_empty()).then(|| fp(scope))));
                    out.push(Ok(None));
                }
                Err(_) => out.push(Err(())),
            }
        }
        for (i, global, scoped) in fps {
            out[i] = Ok(set
                .lookup(global, now_ms)
                .or_else(|| scoped.and_then(|fp| set.lookup(fp, now_ms))));
        }
    }

    /// Routes held, static ones included.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// (held, pinned, bound on learned ones) of the route table.
    pub fn route_figures(&self) -> (usize, usize, usize) {
        (self.routes.len(), self.routes.pinned, self.routes.max)
    }

    /// `domain`'s entry (route, expiry; `u64::MAX`-like expiry: a plan route), or, without a
    /// domain, up to `limit` entries in the table's order. Nothing is queued for lookup.
    pub fn route_entries(&self, domain: Option<&str>, limit: usize) -> Vec<(String, Route, u64)> {
        match domain {
            Some(d) => normalise_domain(d)
                .ok()
                .and_then(|d| {
                    self.routes
                        .get(d.as_ref())
                        .map(|e| (d.into_owned(), e.route, e.expires_ms))
                })
                .into_iter()
                .collect(),
            None => self
                .routes
                .sample(limit)
                .into_iter()
                .map(|(d, e)| (d.to_owned(), e.route, e.expires_ms))
                .collect(),
        }
    }

    /// The route of `domain` at `now_ms`; an unknown or expired one is queued for lookup.
    pub fn route(&mut self, domain: &str, now_ms: u64) -> CoreResult<Route> {
        let d = normalise_domain(domain).map_err(|m| CoreError::bad("domain", m))?;
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
        if !self.unresolved.note(domain) {
            self.stats.unresolved_dropped += 1;
        }
    }

    /// Count a grant made outside the native protocol (a Postfix lookup) in its key's tally.
    pub fn tally_grant(&mut self, key: u32, n: u32) {
        self.ledger.grant(key, n);
    }

    // ----- drains -----

    /// Domains seen without a fresh route since the last call, oldest first.
    pub fn take_unresolved(&mut self) -> Vec<Box<str>> {
        self.unresolved.take()
    }

    /// Per-key tallies since the last call.
    pub fn take_tallies(&mut self) -> Vec<(u32, Tally)> {
        self.ledger.take_tallies()
    }

    /// Reports that were not plain deliveries, since the last call, in arrival order.
    pub fn take_reports(&mut self) -> Vec<Report> {
        self.ledger.take_reports()
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
                return Ok(Served::closing(start));
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
        Ok(Served::upto(start))
    }

    /// Answer one line; true when it is an upcall (nothing written).
    fn line(&mut self, engine: &mut Engine, line: &[u8], now_ms: u64, out: &mut Vec<u8>) -> bool {
        let Ok(text) = std::str::from_utf8(line) else {
            self.stats.errors += 1;
            reply::error(out, None, "request is not valid UTF-8");
            return false;
        };
        let req = match request::parse(text) {
            Ok(r) => r,
            Err(message) => {
                self.stats.errors += 1;
                reply::error(out, None, &message);
                return false;
            }
        };
        let id = req.id;
        let Some(op) = req.op.as_deref() else {
            // `{"op":5}` says what is wrong with `op`, not that it is missing.
            self.stats.errors += 1;
            let message = req.problem.as_deref();
            reply::error(
                out,
                id,
                message.unwrap_or("op: missing (one of acquire, pick, report, ...)"),
            );
            return false;
        };
        if self.upcall_ops.iter().any(|o| o.as_ref() == op)
            && (req.address.is_some() || !ADDRESS_UPCALLS.contains(&op))
        {
            // A repeated or wrong-typed field is refused here too, so Python's own parse of
            // the line never sees a second `op` or `id` (its last one would win).
            if let Some(p) = &req.problem {
                self.stats.errors += 1;
                reply::error(out, id, p);
                return false;
            }
            return true;
        }
        let mark = out.len();
        if let Err(Refusal(message)) = self.answer(engine, &req, op, now_ms, out) {
            out.truncate(mark);
            self.stats.errors += 1;
            reply::error(out, id, &message);
        }
        false
    }

    fn answer(
        &mut self,
        engine: &mut Engine,
        req: &request::Request<'_>,
        op: &str,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let Some(op) = ops::find(op) else {
            let known: Vec<&str> = ops::OPS
                .iter()
                .map(|o| o.name)
                .chain(
                    self.upcall_ops
                        .iter()
                        .map(AsRef::as_ref)
                        .filter(|o| !ADDRESS_UPCALLS.contains(o)),
                )
                .collect();
            return Err(format!(
                "op: unknown operation {}, expected one of {}",
                request::quoted(op),
                known.join(", ")
            )
            .into());
        };
        if let Some(p) = &req.problem {
            return Err(p.clone().into());
        }
        op.check_fields(req)?;
        (op.answer)(self, engine, req, now_ms, out)
    }
}

#[cfg(test)]
mod tests;

/// Longest address on the suppression list (RFC 5321's path limit is 256; the list allows
/// 320, as addresses in exports sometimes are).
pub const MAX_ADDRESS: usize = 320;

/// `address` as the suppression list keeps it: trimmed, the local part as given, the domain
/// lower-cased without a trailing dot and in ASCII (punycode) form.
pub fn normalise_address(address: &str) -> Result<String, String> {
    let (local, domain) = address_parts(address)?;
    Ok(format!("{local}@{domain}"))
}

/// `normalise_address` as its two parts (local, domain), borrowed from `address` when the
/// domain needs no change: the send-time check allocates nothing for the usual address.
pub fn address_parts(address: &str) -> Result<(&str, Cow<'_, str>), String> {
    let a = trimmed(address);
    let Some(at) = a.bytes().rposition(|b| b == b'@') else {
        return Err(format!("address: no @ in {:?}", cut_text(a)));
    };
    let (local, domain) = (&a[..at], &a[at + 1..]);
    if local.is_empty() || a.len() > MAX_ADDRESS {
        return Err(format!("address: not an address: {:?}", cut_text(a)));
    }
    let d = normalise_domain(domain).map_err(|e| e.replacen("domain", "address", 1))?;
    if d.is_ascii() {
        return Ok((local, d));
    }
    idna::domain_to_ascii(&d)
        .map(|d| (local, Cow::Owned(d)))
        .map_err(|_| format!("address: bad domain in {:?}", cut_text(a)))
}

fn cut_text(s: &str) -> String {
    s.chars().take(80).collect()
}
