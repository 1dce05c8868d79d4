//! Postfix's `socketmap` lookup protocol, answering `transport_maps`: which IP's transport
//! carries a recipient, or that the recipient waits. Format and choices: docs/integrations/
//! postfix.md.
//!
//! Postfix sends `NAME KEY` as a netstring (`LEN:DATA,`); NAME is the map name of
//! `socketmap:unix:PATH:NAME`, here a pool's name (`POOL/SCOPE`: its recipients are also
//! checked against that scope's suppression list), and KEY a recipient address (then its
//! domain and parent domains when the address is not found). For an address kiln answers:
//!
//! - `OK kiln-IP:NEXTHOP` when a grant is waiting for that recipient (released from the queue,
//!   already charged), or when the pool's queue for the provider is empty and `pick` grants;
//! - `OK retry:4.7.0 kiln: waiting for room at PROVIDER in pool POOL` otherwise: Postfix
//!   defers the recipient, kiln reads the deferral from Postfix's log, queues it and releases
//!   it when the caps open;
//! - `OK error:5.1.10 ...` for a domain that publishes a null MX.
//!
//! A recipient on the suppression list (docs/suppression.md) gets `OK error:5.7.1 kiln: ...`
//! instead: Postfix returns the message to its sender and never delivers it. The map name
//! `kiln.suppressed` (or `kiln.suppressed/SCOPE`) is an access(5) table for
//! `check_recipient_access`: `OK REJECT 5.7.1 ...` for a suppressed recipient, else
//! `NOTFOUND`, so smtpd refuses it at submission.
//!
//! Keys without an `@` get `NOTFOUND `. Bad requests get `PERM reason` and the connection
//! stays; a frame that is not a netstring or is over `MAX_REQUEST_BYTES` gets `PERM` and is
//! closed (the protocol cannot resynchronise).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::IpAddr;

use hashbrown::HashMap;

use crate::engine::Engine;
use crate::error::CoreResult;
use crate::limiter::check_now;
use crate::protocol::{Route, Served, Wire};

#[cfg(test)]
mod tests;

/// The map name of the suppression access table (`kiln.suppressed/SCOPE` for a scope).
pub const SUPPRESSED_MAP: &str = "kiln.suppressed";

/// Longest request (netstring payload) read; Postfix's keys are addresses, far shorter.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Digits of the longest length prefix accepted (`65536` has five).
const MAX_PREFIX_DIGITS: usize = 5;
/// Grants waiting for their recipient's lookup, at most; more are refused (`prepay`).
pub const MAX_PREPAID: usize = 1_000_000;

/// The reply to a frame that is not a netstring or is too long, before closing.
pub const BAD_FRAME: &[u8] = b"57:PERM not a netstring, or longer than 65536 bytes; closing,";
/// The reply to a connection past the limit.
pub const REFUSAL: &[u8] = b"36:TEMP too many connections; try again,";
/// The reply when the engine refuses to serve.
pub const INTERNAL: &[u8] = b"35:TEMP internal error; see kiln's log,";

/// What the start of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// More bytes are needed.
    Incomplete,
    /// Not a netstring, or one over `MAX_REQUEST_BYTES`: answer `BAD_FRAME` and close.
    Bad,
    /// A whole netstring: its payload is `input[start..end]`, the next frame at `next`.
    Whole {
        start: usize,
        end: usize,
        next: usize,
    },
}

/// Read the netstring at the start of `input`.
pub fn frame(input: &[u8]) -> Frame {
    let mut len = 0usize;
    for (i, &b) in input.iter().enumerate() {
        match b {
            b'0'..=b'9' if i < MAX_PREFIX_DIGITS => len = len * 10 + usize::from(b - b'0'),
            b':' if i > 0 => {
                if len > MAX_REQUEST_BYTES {
                    return Frame::Bad;
                }
                let start = i + 1;
                let end = start + len;
                return match input.get(end) {
                    None => Frame::Incomplete,
                    Some(b',') => Frame::Whole {
                        start,
                        end,
                        next: end + 1,
                    },
                    Some(_) => Frame::Bad,
                };
            }
            _ => return Frame::Bad,
        }
    }
    Frame::Incomplete
}

/// Answer every whole netstring of `input` with `OK echo:`, deciding nothing: a benchmark's
/// baseline with the same framing and bounds.
pub fn echo(input: &[u8], out: &mut Vec<u8>) -> Served {
    let mut at = 0;
    loop {
        match frame(&input[at..]) {
            Frame::Incomplete => return Served::upto(at),
            Frame::Bad => return Served::closing(at),
            Frame::Whole { next, .. } => {
                out.extend_from_slice(b"8:OK echo:,");
                at += next;
            }
        }
    }
}

/// Counters for the log and `status`, since the daemon started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapStats {
    pub requests: u64,
    /// Addresses given a transport by a fresh `pick`.
    pub granted: u64,
    /// Addresses given a transport by a grant the release queue made for them.
    pub prepaid: u64,
    /// Addresses told to wait (`retry:`).
    pub waited: u64,
    pub not_found: u64,
    pub errors: u64,
    /// Recipients answered as suppressed (a transport `error:` or an access `REJECT`).
    pub suppressed: u64,
}

/// The transport table's state beside the engine: transport names and grants waiting for
/// their recipient's lookup.
#[derive(Debug, Clone, Default)]
pub struct TransportMap {
    /// The `master.cf` transport of each sending IP.
    transports: HashMap<IpAddr, Box<str>>,
    /// Appended after the transport's colon: empty (the recipient's domain), or a relay.
    nexthop: Box<str>,
    /// Lower-cased recipient -> grants made by the release queue, oldest first, each with
    /// the time it lapses.
    prepaid: HashMap<Box<str>, VecDeque<(IpAddr, u64)>>,
    prepaid_len: usize,
    payload: String,
    pub stats: MapStats,
}

impl TransportMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// The transport of each sending IP, and the next hop every answer names.
    pub fn configure(&mut self, transports: HashMap<IpAddr, Box<str>>, nexthop: &str) {
        self.transports = transports;
        self.nexthop = nexthop.into();
    }

    /// The transport of `ip`, if it has one.
    pub fn transport(&self, ip: &IpAddr) -> Option<&str> {
        self.transports.get(ip).map(AsRef::as_ref)
    }

    /// Keep a grant the release queue made for `recipient` on `ip` until its lookup, or
    /// until `expires_ms`. False when `MAX_PREPAID` grants already wait.
    pub fn prepay(&mut self, recipient: &str, ip: IpAddr, expires_ms: u64) -> bool {
        if self.prepaid_len >= MAX_PREPAID {
            return false;
        }
        self.prepaid
            .entry(fold(recipient).into_owned().into_boxed_str())
            .or_default()
            .push_back((ip, expires_ms));
        self.prepaid_len += 1;
        true
    }

    /// Grants waiting for `recipient`'s lookup.
    pub fn prepaid_for(&self, recipient: &str) -> usize {
        self.prepaid
            .get(fold(recipient).as_ref())
            .map_or(0, VecDeque::len)
    }

    /// Grants waiting for their lookup.
    pub fn prepaid_len(&self) -> usize {
        self.prepaid_len
    }

    /// Drop the grants that lapsed by `now_ms`; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.prepaid_len;
        self.prepaid.retain(|_, q| {
            q.retain(|&(_, exp)| exp > now_ms);
            !q.is_empty()
        });
        self.prepaid_len = self.prepaid.values().map(VecDeque::len).sum();
        before - self.prepaid_len
    }

    fn take_prepaid(&mut self, recipient: &str, now_ms: u64) -> Option<IpAddr> {
        let q = self.prepaid.get_mut(recipient)?;
        let mut found = None;
        while let Some((ip, exp)) = q.pop_front() {
            self.prepaid_len -= 1;
            if exp > now_ms {
                found = Some(ip);
                break;
            }
        }
        if q.is_empty() {
            self.prepaid.remove(recipient);
        }
        found
    }

    /// Answer every whole netstring of `input` into `out`.
    pub fn serve(
        &mut self,
        engine: &mut Engine,
        wire: &mut Wire,
        input: &[u8],
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> CoreResult<Served> {
        check_now(now_ms)?;
        let mut at = 0;
        loop {
            match frame(&input[at..]) {
                Frame::Incomplete => return Ok(Served::upto(at)),
                Frame::Bad => return Ok(Served::closing(at)),
                Frame::Whole { start, end, next } => {
                    self.stats.requests += 1;
                    self.payload.clear();
                    self.answer(engine, wire, &input[at + start..at + end], now_ms);
                    if self.payload.starts_with("PERM") || self.payload.starts_with("TEMP") {
                        self.stats.errors += 1;
                    }
                    let _ = write!(Netstring(out), "{}:", self.payload.len());
                    out.extend_from_slice(self.payload.as_bytes());
                    out.push(b',');
                    at += next;
                }
            }
        }
    }

    /// Write the reply payload for one request into `self.payload`.
    fn answer(&mut self, engine: &mut Engine, wire: &mut Wire, request: &[u8], now_ms: u64) {
        let Ok(text) = std::str::from_utf8(request) else {
            self.payload.push_str("PERM request is not UTF-8");
            return;
        };
        let Some((name, key)) = text.split_once(' ') else {
            self.payload
                .push_str("PERM expected \"NAME KEY\" (a pool name, a space, an address)");
            return;
        };
        if name.is_empty() {
            self.payload.push_str("PERM the map name (a pool) is empty");
            return;
        }
        let key = key.trim();
        let at = key.rfind('@');
        if at.is_none_or(|a| a == 0 || a + 1 == key.len()) {
            // A domain, parent domain or local-part lookup: the address was answered.
            self.stats.not_found += 1;
            self.payload.push_str("NOTFOUND ");
            return;
        }
        if let Some(rest) = name.strip_prefix(SUPPRESSED_MAP) {
            let scope = rest.strip_prefix('/').unwrap_or(rest);
            match wire.suppressed(key, scope, now_ms) {
                Ok(Some(e)) => {
                    self.stats.suppressed += 1;
                    let _ = write!(
                        self.payload,
                        "OK REJECT 5.7.1 kiln: the recipient is on the suppression list ({})",
                        e.as_str()
                    );
                }
                _ => {
                    self.stats.not_found += 1;
                    self.payload.push_str("NOTFOUND ");
                }
            }
            return;
        }
        // `POOL/SCOPE`: the recipient is also checked against that scope's list.
        let (name, scope) = name.split_once('/').unwrap_or((name, ""));
        let Ok(pool) = engine.pool_handle(name) else {
            let _ = write!(self.payload, "PERM unknown pool {}", printable(name));
            return;
        };
        if let Ok(Some(e)) = wire.suppressed(key, scope, now_ms) {
            self.stats.suppressed += 1;
            let _ = write!(
                self.payload,
                "OK error:5.7.1 kiln: the recipient is on the suppression list ({})",
                e.as_str()
            );
            return;
        }
        let provider = match wire.route(key, now_ms) {
            Ok(Route::Provider(p)) => p,
            Ok(Route::NullMx) => {
                self.payload.push_str(
                    "OK error:5.1.10 kiln: the recipient's domain publishes a null MX \
                     (RFC 7505) and accepts no mail",
                );
                return;
            }
            Err(e) => {
                let _ = write!(self.payload, "TEMP {}", printable(&e.to_string()));
                return;
            }
        };
        let folded = fold(key);
        if let Some(ip) = self.take_prepaid(&folded, now_ms) {
            // The release queue charged this grant; it is counted as sent when it is used.
            if let Some(k) = engine
                .find_ip(&ip)
                .and_then(|h| engine.key_of(h, provider).ok())
            {
                wire.tally_grant(k, 1);
            }
            self.stats.prepaid += 1;
            self.transport_answer(ip);
            return;
        }
        if engine.scheduler.waiting(pool, provider) == 0 {
            match engine.pick(pool, provider, 1, now_ms) {
                Ok(d) if d.is_granted() => {
                    wire.tally_grant(d.key, d.granted);
                    let (ip, _) = engine.key_handles(d.key);
                    self.stats.granted += 1;
                    self.transport_answer(engine.ip_addr(ip));
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = write!(self.payload, "TEMP {}", printable(&e.to_string()));
                    return;
                }
            }
        }
        self.stats.waited += 1;
        let _ = write!(
            self.payload,
            "OK retry:4.7.0 kiln: waiting for room at {} in pool {name}",
            engine.provider_name(provider)
        );
    }

    fn transport_answer(&mut self, ip: IpAddr) {
        match self.transports.get(&ip) {
            Some(t) => {
                let _ = write!(self.payload, "OK {t}:{}", self.nexthop);
            }
            None => {
                let _ = write!(
                    self.payload,
                    "TEMP no Postfix transport is configured for {ip} (kiln postfix-config)"
                );
            }
        }
    }
}

/// A recipient as the prepaid table keys it: trimmed and lower-cased.
fn fold(recipient: &str) -> std::borrow::Cow<'_, str> {
    let r = recipient.trim();
    if r.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(r.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(r)
    }
}

/// Text safe inside a one-line reply (no control characters), cut to 200 characters.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(200)
        .collect()
}

/// `fmt::Write` into a byte buffer.
struct Netstring<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Netstring<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
