//! The Redis protocol (RESP2), so clients that already talk to Redis (KumoMTA's `kumo.redis`,
//! redis-py, redis-cli, an app's `CL.THROTTLE` call) can ask kiln instead. Commands:
//! docs/integrations/resp.md.
//!
//! Requests are arrays of bulk strings (`*2\r\n$4\r\nPING\r\n$2\r\nhi\r\n`) or inline lines
//! (`PING hi\r\n`, what telnet sends; words split on spaces, no quoting). Every reply is RESP2.
//! A request that breaks the framing (a wrong length, a negative or huge bulk size, a nested
//! array, a missing `\r\n`) gets `-ERR Protocol error: ...` and the connection is closed
//! after it, as Redis does: the stream cannot be resynchronised. Any other mistake (unknown
//! command, wrong arity, a bad number) gets an error reply and the connection stays.
//!
//! `CL.THROTTLE` is redis-cell's: a GCRA per free-form key, kept in `Throttles`.

mod throttle;

use std::fmt::Write as _;

use crate::caps::NO_CAP;
use crate::decision::Decision;
use crate::engine::Engine;
use crate::error::CoreResult;
use crate::limiter::{check_now, parse_ip};
use crate::protocol::{Route, Served, Wire};
pub use throttle::{Throttles, MAX_THROTTLE_KEYS};

#[cfg(test)]
mod tests;

/// Longest bulk string (a key or an argument).
pub const MAX_BULK_BYTES: usize = 64 << 10;
/// Most arguments in one command (the command's name included).
pub const MAX_ARGS: usize = 16;
/// Longest inline command line.
pub const MAX_INLINE_BYTES: usize = 64 << 10;
/// Longest `*N` or `$N` header line, `\r\n` included.
const MAX_HEADER_BYTES: usize = 24;
/// Buffered bytes without a whole request beyond which the connection is closed.
pub const MAX_PENDING_BYTES: usize = MAX_ARGS * (MAX_BULK_BYTES + MAX_HEADER_BYTES) + 64;

/// The reply to a connection past the limit.
pub const REFUSAL: &[u8] = b"-ERR max number of clients reached\r\n";
/// The reply when the engine refuses to serve.
pub const INTERNAL: &[u8] = b"-ERR internal error; see kiln's log\r\n";

/// What the start of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// More bytes are needed.
    Incomplete,
    /// Broken framing: answer this and close.
    Bad(&'static str),
    /// A whole request, the next one at `next`; `args` are ranges into the buffer.
    Whole { next: usize },
}

/// The line at the start of `input` without its `\r\n`, and where the next one starts;
/// None while incomplete; Err when it is not `\r\n`-terminated within `max` bytes.
fn header(input: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, ()> {
    match input.iter().take(max).position(|&b| b == b'\n') {
        Some(nl) if nl > 0 && input[nl - 1] == b'\r' => Ok(Some((&input[..nl - 1], nl + 1))),
        Some(_) => Err(()),
        None if input.len() >= max => Err(()),
        None => Ok(None),
    }
}

fn number(digits: &[u8]) -> Option<i64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Read the request at the start of `input`, its arguments' ranges into `args` (None: only
/// whether it is whole, allocating nothing).
pub fn frame(input: &[u8], mut args: Option<&mut Vec<(usize, usize)>>) -> Frame {
    if let Some(a) = args.as_deref_mut() {
        a.clear();
    }
    let Some(&first) = input.first() else {
        return Frame::Incomplete;
    };
    if first != b'*' {
        return inline(input, args);
    }
    let (line, mut at) = match header(input, MAX_HEADER_BYTES) {
        Ok(Some(h)) => h,
        Ok(None) => return Frame::Incomplete,
        Err(()) => return Frame::Bad("invalid multibulk length"),
    };
    let Some(n) = number(&line[1..]) else {
        return Frame::Bad("invalid multibulk length");
    };
    if n <= 0 {
        return Frame::Whole { next: at }; // `*0`, `*-1`: nothing to answer, as Redis
    }
    if usize::try_from(n).map_or(true, |n| n > MAX_ARGS) {
        return Frame::Bad("too many arguments in one command");
    }
    for _ in 0..n {
        let rest = &input[at..];
        match rest.first() {
            None => return Frame::Incomplete,
            Some(b'$') => {}
            Some(_) => return Frame::Bad("expected '$' (arguments are bulk strings)"),
        }
        let (line, skip) = match header(rest, MAX_HEADER_BYTES) {
            Ok(Some(h)) => h,
            Ok(None) => return Frame::Incomplete,
            Err(()) => return Frame::Bad("invalid bulk length"),
        };
        let len = match number(&line[1..]) {
            Some(len) => match usize::try_from(len) {
                Ok(len) if len <= MAX_BULK_BYTES => len,
                _ => return Frame::Bad("invalid bulk length"),
            },
            None => return Frame::Bad("invalid bulk length"),
        };
        let start = at + skip;
        let end = start + len;
        if input.len() < end + 2 {
            return Frame::Incomplete;
        }
        if &input[end..end + 2] != b"\r\n" {
            return Frame::Bad("bulk string not followed by \\r\\n");
        }
        if let Some(a) = args.as_deref_mut() {
            a.push((start, end));
        }
        at = end + 2;
    }
    Frame::Whole { next: at }
}

/// Whether `input` may hold a whole request (or broken framing to answer); `input[..scanned]`
/// was seen before. An inline command's line is looked for in the new bytes only; an array's
/// headers are walked and its payloads skipped, so a client dripping bytes costs little.
pub fn complete(input: &[u8], scanned: usize) -> bool {
    match input.first() {
        None => false,
        Some(&b) if b != b'*' => {
            input[scanned..].contains(&b'\n') || input.len() > MAX_INLINE_BYTES
        }
        Some(_) => frame(input, None) != Frame::Incomplete,
    }
}

fn inline(input: &[u8], mut args: Option<&mut Vec<(usize, usize)>>) -> Frame {
    let Some(nl) = input
        .iter()
        .take(MAX_INLINE_BYTES + 1)
        .position(|&b| b == b'\n')
    else {
        return if input.len() > MAX_INLINE_BYTES {
            Frame::Bad("too big inline request")
        } else {
            Frame::Incomplete
        };
    };
    let mut i = 0;
    let mut words = 0;
    while i < nl {
        while i < nl && input[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < nl && !input[i].is_ascii_whitespace() {
            i += 1;
        }
        if i > start {
            words += 1;
            if words > MAX_ARGS {
                return Frame::Bad("too many arguments in one command");
            }
            if let Some(a) = args.as_deref_mut() {
                a.push((start, i));
            }
        }
    }
    Frame::Whole { next: nl + 1 }
}

/// Counters since the daemon started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RespStats {
    pub commands: u64,
    pub errors: u64,
    pub throttled: u64,
}

/// The RESP listener's state beside the engine.
#[derive(Debug, Clone, Default)]
pub struct Resp {
    pub throttles: Throttles,
    args: Vec<(usize, usize)>,
    pub stats: RespStats,
}

/// A RESP reply under construction.
struct Out<'a>(&'a mut Vec<u8>);

impl Out<'_> {
    fn simple(&mut self, s: &str) {
        self.0.push(b'+');
        self.0.extend_from_slice(s.as_bytes());
        self.0.extend_from_slice(b"\r\n");
    }
    fn error(&mut self, s: &str) {
        self.0.push(b'-');
        for &b in s.as_bytes() {
            self.0.push(if b == b'\r' || b == b'\n' { b' ' } else { b });
        }
        self.0.extend_from_slice(b"\r\n");
    }
    /// `prefix`, `n` in decimal, `\r\n` (no formatting machinery: this runs per reply).
    fn number(&mut self, prefix: u8, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.0.push(prefix);
        if n < 0 {
            self.0.push(b'-');
        }
        self.0.extend_from_slice(&digits[i..]);
        self.0.extend_from_slice(b"\r\n");
    }
    fn int(&mut self, n: i64) {
        self.number(b':', n);
    }
    fn bulk(&mut self, b: &[u8]) {
        self.number(b'$', i64::try_from(b.len()).unwrap_or(i64::MAX));
        self.0.extend_from_slice(b);
        self.0.extend_from_slice(b"\r\n");
    }
    fn nil(&mut self) {
        self.0.extend_from_slice(b"$-1\r\n");
    }
    fn array(&mut self, n: usize) {
        self.number(b'*', i64::try_from(n).unwrap_or(i64::MAX));
    }
}

impl std::fmt::Write for Out<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// What one command did to the connection.
enum After {
    Stay,
    Close,
}

impl Resp {
    pub fn new() -> Self {
        Self::default()
    }

    /// Answer every whole request of `input` into `out`. `too_long` in the result means:
    /// close after what was written (a framing error's `-ERR`, or `QUIT`'s `+OK`).
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
        let mut args = std::mem::take(&mut self.args);
        let served = loop {
            match frame(&input[at..], Some(&mut args)) {
                Frame::Incomplete => break Served::upto(at),
                Frame::Bad(why) => {
                    self.stats.errors += 1;
                    Out(out).error(&format!("ERR Protocol error: {why}"));
                    break Served::closing(input.len());
                }
                Frame::Whole { next } => {
                    let base = at;
                    let mut slots: [&[u8]; MAX_ARGS] = [&[]; MAX_ARGS];
                    for (slot, &(s, e)) in slots.iter_mut().zip(&args) {
                        *slot = &input[base + s..base + e];
                    }
                    let words = &slots[..args.len()];
                    at += next;
                    if words.is_empty() {
                        continue;
                    }
                    self.stats.commands += 1;
                    let mark = out.len();
                    match self.command(engine, wire, words, now_ms, &mut Out(out)) {
                        Ok(After::Stay) => {}
                        Ok(After::Close) => break Served::closing(at),
                        Err(message) => {
                            out.truncate(mark);
                            self.stats.errors += 1;
                            Out(out).error(&message);
                        }
                    }
                }
            }
        };
        self.args = args;
        Ok(served)
    }

    fn command(
        &mut self,
        engine: &mut Engine,
        wire: &mut Wire,
        words: &[&[u8]],
        now_ms: u64,
        out: &mut Out<'_>,
    ) -> Result<After, String> {
        let mut lower = [0u8; 16];
        let name = ascii_lower(words[0], &mut lower);
        let args = &words[1..];
        let arity = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "ERR wrong number of arguments for '{name}' command"
                ))
            }
        };
        match name {
            "ping" => {
                arity(args.len() <= 1)?;
                match args.first() {
                    Some(m) => out.bulk(m),
                    None => out.simple("PONG"),
                }
            }
            "echo" => {
                arity(args.len() == 1)?;
                out.bulk(args[0]);
            }
            "quit" => {
                out.simple("OK");
                return Ok(After::Close);
            }
            "select" => {
                arity(args.len() == 1)?;
                if args[0] != b"0" {
                    return Err("ERR DB index is out of range".into());
                }
                out.simple("OK");
            }
            "hello" | "client" | "command" => session(name, args, out)?,
            "cl.throttle" => {
                arity((4..=5).contains(&args.len()))?;
                if args[0].starts_with(KILN_KEY) {
                    self.kiln_throttle(engine, wire, args, now_ms, out)?;
                } else {
                    self.throttle(args, now_ms, out)?;
                }
            }
            "kiln.acquire" | "kiln.pick" => {
                arity((2..=3).contains(&args.len()))?;
                decide(engine, wire, name, args, now_ms, out)?;
            }
            "kiln.suppressed" => {
                arity(args.len() >= 2)?;
                suppressed(wire, args, now_ms, out)?;
            }
            "kiln.limits" => {
                arity(args.len() == 2)?;
                limits(engine, wire, args, now_ms, out)?;
            }
            "kiln.report" => {
                arity((3..=6).contains(&args.len()))?;
                let fields = ["ip", "domain", "result", "code", "enhanced", "text"];
                let reply = native(engine, wire, "report", &fields, args, now_ms)?;
                out.bulk(reply["provider"].as_str().unwrap_or_default().as_bytes());
            }
            "kiln.classify" => {
                arity((1..=4).contains(&args.len()))?;
                let fields = ["text", "code", "enhanced", "domain"];
                let reply = native(engine, wire, "classify", &fields, args, now_ms)?;
                out.array(3);
                for field in ["class", "scope", "rule"] {
                    match reply[field].as_str() {
                        Some(v) => out.bulk(v.as_bytes()),
                        None => out.nil(),
                    }
                }
            }
            _ => {
                let mut msg = format!(
                    "ERR unknown command '{}', with args beginning with:",
                    printable(words[0])
                );
                for a in args.iter().take(4) {
                    let _ = write!(msg, " '{}'", printable(a));
                }
                return Err(msg);
            }
        }
        Ok(After::Stay)
    }

    fn throttle(&mut self, args: &[&[u8]], now_ms: u64, out: &mut Out<'_>) -> Result<(), String> {
        let (burst, count, period, quantity) = throttle_numbers(args)?;
        let r = self
            .throttles
            .throttle(args[0], burst, count, period, quantity, now_ms)
            .map_err(|e| format!("ERR {e}"))?;
        if r.limited {
            self.stats.throttled += 1;
        }
        out.array(5);
        out.int(i64::from(r.limited));
        out.int(r.limit);
        out.int(r.remaining);
        out.int(r.retry_after_s);
        out.int(r.reset_after_s);
        Ok(())
    }

    /// `CL.THROTTLE kiln/IP/DOMAIN ...`: the warm-up key (IP, provider of DOMAIN) answers, in
    /// redis-cell's reply shape, instead of a GCRA of the caller's numbers (which are checked
    /// and ignored). `quantity` is charged when granted. Anything after the domain from a
    /// `:` on is ignored: KumoMTA appends `:limit:burst:period` to its throttles' names.
    fn kiln_throttle(
        &mut self,
        engine: &mut Engine,
        wire: &mut Wire,
        args: &[&[u8]],
        now_ms: u64,
        out: &mut Out<'_>,
    ) -> Result<(), String> {
        let (_, _, _, quantity) = throttle_numbers(args)?;
        let n = u32::try_from(quantity)
            .ok()
            .filter(|&n| n >= 1)
            .ok_or("ERR quantity must be a whole number from 1 for a kiln/ key")?;
        let rest = &args[0][KILN_KEY.len()..];
        let rest = rest.split(|&c| c == b':').next().unwrap_or_default();
        let slash = rest.iter().position(|&c| c == b'/').ok_or(
            "ERR a kiln/ throttle key is kiln/IP/DOMAIN (the sending IP and a recipient domain)",
        )?;
        let (ip, domain) = (&rest[..slash], &rest[slash + 1..]);
        let d = acquire_on(engine, wire, ip, domain, n, now_ms)?;
        if d.is_granted() {
            wire.tally_grant(d.key, d.granted);
        } else {
            self.stats.throttled += 1;
        }
        let u = engine.usage(d.key).map_err(|e| format!("ERR {e}"))?;
        let room =
            |cap: u32, used: u32| (cap != NO_CAP).then(|| i64::from(cap.saturating_sub(used)));
        let hour = room(u.limits.hourly_cap, u.hour_used);
        let day = room(u.limits.daily_cap, u.day_used);
        let limit = match (u.limits.hourly_cap, u.limits.daily_cap) {
            (NO_CAP, NO_CAP) => -1,
            (NO_CAP, daily) => i64::from(daily),
            (hourly, _) => i64::from(hourly),
        };
        let remaining = match (hour, day) {
            (Some(h), Some(d)) => h.min(d),
            (Some(r), None) | (None, Some(r)) => r,
            (None, None) => -1,
        };
        let reset_s = engine.next_hour_ms().map_or(-1, |t| {
            i64::try_from(t.saturating_sub(now_ms).div_ceil(1000)).unwrap_or(-1)
        });
        out.array(5);
        out.int(i64::from(!d.is_granted()));
        out.int(limit);
        out.int(remaining);
        out.int(if d.is_granted() {
            -1
        } else {
            d.retry_after_ms.map_or(UNKNOWN_WAIT_S, |ms| {
                i64::try_from(ms.div_ceil(1000).max(1)).unwrap_or(UNKNOWN_WAIT_S)
            })
        });
        out.int(reset_s);
        Ok(())
    }
}

/// The prefix of `CL.THROTTLE` keys that name a warm-up key: `kiln/IP/DOMAIN`.
const KILN_KEY: &[u8] = b"kiln/";
/// The retry after (s) of a `kiln/` key denied with no known end (a pause, a ramp step that
/// only a person or the next day changes): ask again in five minutes.
const UNKNOWN_WAIT_S: i64 = 300;

/// `CL.THROTTLE`'s numbers: (max_burst, count per period, period, quantity).
fn throttle_numbers(args: &[&[u8]]) -> Result<(i64, i64, i64, i64), String> {
    let int = |i: usize, what: &str| -> Result<i64, String> {
        number(args[i]).ok_or_else(|| format!("ERR {what} must be an integer"))
    };
    let quantity = if args.len() == 5 {
        int(4, "quantity")?
    } else {
        1
    };
    Ok((
        int(1, "max_burst")?,
        int(2, "count per period")?,
        int(3, "period")?,
        quantity,
    ))
}

/// Acquire `n` on the key of (sending IP, provider of `domain`), as `KILN.ACQUIRE` does.
fn acquire_on(
    engine: &mut Engine,
    wire: &mut Wire,
    ip: &[u8],
    domain: &[u8],
    n: u32,
    now_ms: u64,
) -> Result<Decision, String> {
    let domain = std::str::from_utf8(domain).map_err(|_| "ERR domain must be UTF-8".to_owned())?;
    let provider = match wire.route(domain, now_ms).map_err(|e| format!("ERR {e}"))? {
        Route::Provider(p) => p,
        Route::NullMx => return Err("ERR domain publishes a null MX (accepts no mail)".into()),
    };
    let ip = std::str::from_utf8(ip).map_err(|_| "ERR ip must be UTF-8".to_owned())?;
    let addr = parse_ip(ip).map_err(|e| format!("ERR {e}"))?;
    let ip = engine
        .find_ip(&addr)
        .ok_or_else(|| format!("ERR ip: {addr} is not a sending IP of this daemon's plan"))?;
    let key = engine
        .key_of(ip, provider)
        .map_err(|e| format!("ERR {e}"))?;
    engine
        .acquire(key, n, now_ms)
        .map_err(|e| format!("ERR {e}"))
}

/// The handshake commands client libraries and redis-cli send.
fn session(name: &str, args: &[&[u8]], out: &mut Out<'_>) -> Result<(), String> {
    match name {
        "hello" => {
            if let Some(v) = args.first() {
                if *v != b"2" {
                    return Err("NOPROTO unsupported protocol version (kiln speaks RESP2)".into());
                }
            }
            out.array(14);
            for (k, v) in [("server", "kiln"), ("version", env!("CARGO_PKG_VERSION"))] {
                out.bulk(k.as_bytes());
                out.bulk(v.as_bytes());
            }
            out.bulk(b"proto");
            out.int(2);
            out.bulk(b"id");
            out.int(1);
            for (k, v) in [("mode", "standalone"), ("role", "master")] {
                out.bulk(k.as_bytes());
                out.bulk(v.as_bytes());
            }
            out.bulk(b"modules");
            out.array(0);
        }
        "client" => {
            if args.is_empty() {
                return Err("ERR wrong number of arguments for 'client' command".into());
            }
            match String::from_utf8_lossy(args[0])
                .to_ascii_lowercase()
                .as_str()
            {
                "setname" | "setinfo" | "no-evict" | "no-touch" | "reply" => out.simple("OK"),
                "getname" => out.nil(),
                "id" => out.int(1),
                other => {
                    return Err(format!("ERR unknown subcommand '{other}' of CLIENT"));
                }
            }
        }
        "command" => match args.first().map(|a| a.to_ascii_lowercase()) {
            Some(sub) if sub == b"count" => out.int(i64::try_from(COMMANDS.len()).unwrap_or(0)),
            // One entry per name asked, nil for a command kiln does not answer: KumoMTA asks
            // `COMMAND INFO CL.THROTTLE` to learn whether redis-cell is there.
            Some(sub) if sub == b"info" => {
                out.array(args.len() - 1);
                for asked in &args[1..] {
                    let mut buf = [0u8; 16];
                    let name = ascii_lower(asked, &mut buf);
                    match COMMANDS
                        .iter()
                        .find(|(n, _)| *n == name && !name.is_empty())
                    {
                        Some(&(n, arity)) => {
                            out.array(6);
                            out.bulk(n.as_bytes());
                            out.int(arity);
                            out.array(0);
                            let keyed = i64::from(n == "cl.throttle");
                            out.int(keyed);
                            out.int(keyed);
                            out.int(keyed);
                        }
                        None => out.nil(),
                    }
                }
            }
            _ => out.array(0), // no command table: clients fall back to plain mode
        },
        _ => return Err(format!("ERR unknown command '{name}'")),
    }
    Ok(())
}

/// The commands kiln answers with their arity as Redis states it (negative: at least), for
/// `COMMAND COUNT` and `COMMAND INFO`.
const COMMANDS: [(&str, i64); 14] = [
    ("ping", -1),
    ("echo", 2),
    ("quit", -1),
    ("select", 2),
    ("hello", -1),
    ("client", -2),
    ("command", -1),
    ("cl.throttle", -5),
    ("kiln.acquire", -3),
    ("kiln.pick", -3),
    ("kiln.limits", 3),
    ("kiln.suppressed", -3),
    ("kiln.report", -4),
    ("kiln.classify", -2),
];

/// `KILN.ACQUIRE ip domain [n]` and `KILN.PICK pool domain [n]`: an array a Lua script reads
/// without a JSON library: granted (integer), reason, retry after ms (integer, -1: never
/// while nothing changes), ip, provider, and for PICK the tier.
///
/// In place of the domain a full recipient address may come, and is first checked against
/// the suppression list: the global list, and for `KILN.PICK pool/scope` that scope's too.
/// A listed one is answered granted 0, reason `suppressed`, -1, "" for the ip, provider (and
/// tier), then the event, and nothing is charged.
fn decide(
    engine: &mut Engine,
    wire: &mut Wire,
    name: &str,
    args: &[&[u8]],
    now_ms: u64,
    out: &mut Out<'_>,
) -> Result<(), String> {
    let text = |i: usize, what: &str| -> Result<&str, String> {
        std::str::from_utf8(args[i]).map_err(|_| format!("ERR {what} must be UTF-8"))
    };
    let n = match args.get(2) {
        None => 1,
        Some(a) => match number(a) {
            Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => n as u32,
            _ => return Err("ERR n must be a whole number from 1".into()),
        },
    };
    let pick = name == "kiln.pick";
    let target = text(1, "domain")?;
    if target.contains('@') {
        let scope = if pick {
            text(0, "pool")?.split_once('/').map_or("", |(_, s)| s)
        } else {
            ""
        };
        if let Some(event) = wire
            .suppressed(target, scope, now_ms)
            .map_err(|m| format!("ERR {m}"))?
        {
            out.array(if pick { 7 } else { 6 });
            out.int(0);
            out.bulk(b"suppressed");
            out.int(-1);
            out.bulk(b"");
            out.bulk(b"");
            if pick {
                out.bulk(b"");
            }
            out.bulk(event.as_str().as_bytes());
            return Ok(());
        }
    }
    let d = if pick {
        let domain = target;
        let provider = match wire.route(domain, now_ms).map_err(|e| format!("ERR {e}"))? {
            Route::Provider(p) => p,
            Route::NullMx => return Err("ERR domain publishes a null MX (accepts no mail)".into()),
        };
        let pool = text(0, "pool")?;
        let pool = pool.split_once('/').map_or(pool, |(name, _)| name);
        let pool = engine
            .pool_handle(pool)
            .map_err(|_| format!("ERR unknown pool '{}'", printable(args[0])))?;
        engine
            .pick(pool, provider, n, now_ms)
            .map_err(|e| format!("ERR {e}"))?
    } else {
        acquire_on(engine, wire, args[0], args[1], n, now_ms)?
    };
    if d.is_granted() {
        wire.tally_grant(d.key, d.granted);
    }
    let (ip, provider) = engine.key_handles(d.key);
    out.array(if pick { 6 } else { 5 });
    out.int(i64::from(d.granted));
    out.bulk(d.reason.as_str().as_bytes());
    out.int(
        d.retry_after_ms
            .map_or(-1, |ms| i64::try_from(ms).unwrap_or(i64::MAX)),
    );
    let mut text = [0u8; 48]; // the longest IPv6 text is 45 bytes
    let len = {
        let mut cursor = std::io::Cursor::new(&mut text[..]);
        let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{}", engine.ip_addr(ip)));
        usize::try_from(cursor.position()).unwrap_or(0)
    };
    out.bulk(&text[..len]);
    out.bulk(engine.provider_name(provider).as_bytes());
    if pick {
        out.bulk(d.tier.as_str().as_bytes());
    }
    Ok(())
}

/// `KILN.SUPPRESSED scope address [address ...]` (scope "" for the global list only): for
/// each address the event that lists it (in the global list or the scope's), nil when none,
/// or `invalid` for one that is not an address.
fn suppressed(wire: &Wire, args: &[&[u8]], now_ms: u64, out: &mut Out<'_>) -> Result<(), String> {
    let scope = std::str::from_utf8(args[0]).map_err(|_| "ERR scope must be UTF-8".to_owned())?;
    let addresses = args[1..]
        .iter()
        .map(|a| std::str::from_utf8(a).map_err(|_| "ERR address must be UTF-8".to_owned()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut found = Vec::with_capacity(addresses.len());
    wire.suppressed_many(addresses.iter().copied(), scope, now_ms, &mut found);
    out.array(found.len());
    for answer in found {
        match answer {
            Ok(Some(event)) => out.bulk(event.as_str().as_bytes()),
            Ok(None) => out.nil(),
            Err(()) => out.bulk(b"invalid"),
        }
    }
    Ok(())
}

/// `KILN.LIMITS ip domain`: the key's caps and use as integers (-1: no cap): daily cap, used
/// today, hourly cap, used this hour, suspended until (Unix ms, 0: not), paused (0/1).
fn limits(
    engine: &mut Engine,
    wire: &mut Wire,
    args: &[&[u8]],
    now_ms: u64,
    out: &mut Out<'_>,
) -> Result<(), String> {
    let text = |i: usize| std::str::from_utf8(args[i]).map_err(|_| "ERR not UTF-8".to_owned());
    let provider = match wire
        .route(text(1)?, now_ms)
        .map_err(|e| format!("ERR {e}"))?
    {
        Route::Provider(p) => p,
        Route::NullMx => return Err("ERR domain publishes a null MX (accepts no mail)".into()),
    };
    let addr = parse_ip(text(0)?).map_err(|e| format!("ERR {e}"))?;
    let ip = engine
        .find_ip(&addr)
        .ok_or_else(|| format!("ERR ip: {addr} is not a sending IP of this daemon's plan"))?;
    let key = engine
        .key_of(ip, provider)
        .map_err(|e| format!("ERR {e}"))?;
    let u = engine.usage(key).map_err(|e| format!("ERR {e}"))?;
    let cap = |c: u32| if c == NO_CAP { -1 } else { i64::from(c) };
    out.array(6);
    out.int(cap(u.limits.daily_cap));
    out.int(i64::from(u.day_used));
    out.int(cap(u.limits.hourly_cap));
    out.int(i64::from(u.hour_used));
    out.int(i64::try_from(u.suspended_until_ms).unwrap_or(i64::MAX));
    out.int(i64::from(u.limits.paused));
    Ok(())
}

/// Run a native operation (docs/protocol.md) with the given arguments as its fields, so both
/// protocols check and answer it the same way; its reply as JSON, or its error as `-ERR`.
fn native(
    engine: &mut Engine,
    wire: &mut Wire,
    op: &str,
    fields: &[&str],
    args: &[&[u8]],
    now_ms: u64,
) -> Result<serde_json::Value, String> {
    let mut req = serde_json::Map::new();
    req.insert("op".into(), op.into());
    for (field, arg) in fields.iter().zip(args) {
        let text = std::str::from_utf8(arg).map_err(|_| format!("ERR {field} must be UTF-8"))?;
        let value = match (*field, text.parse::<u64>()) {
            ("code", Ok(n)) => n.into(),
            _ => text.into(),
        };
        req.insert((*field).into(), value);
    }
    let mut line = serde_json::to_vec(&req).map_err(|e| format!("ERR {e}"))?;
    line.push(b'\n');
    let mut reply = Vec::new();
    wire.serve(engine, &line, now_ms, &mut reply)
        .map_err(|e| format!("ERR {e}"))?;
    let reply: serde_json::Value =
        serde_json::from_slice(&reply).map_err(|e| format!("ERR internal: {e}"))?;
    if reply["ok"] == serde_json::Value::Bool(true) {
        Ok(reply)
    } else {
        Err(format!(
            "ERR {}",
            reply["error"].as_str().unwrap_or("refused")
        ))
    }
}

/// A command's name lower-cased into `buf` ("" when longer than any command or not ASCII:
/// an unknown command).
fn ascii_lower<'b>(name: &[u8], buf: &'b mut [u8; 16]) -> &'b str {
    if name.len() > buf.len() || !name.is_ascii() {
        return "";
    }
    for (d, s) in buf.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    std::str::from_utf8(&buf[..name.len()]).unwrap_or("")
}

/// Bytes shown in an error: printable ASCII kept, the rest `?`, cut to 64.
fn printable(b: &[u8]) -> String {
    b.iter()
        .take(64)
        .map(|&c| {
            if (0x20..0x7f).contains(&c) && c != b'\'' {
                c as char
            } else {
                '?'
            }
        })
        .collect()
}
