//! The operations the core answers itself, in one table: each op's name, the fields it
//! takes and its handler sit in one entry, so a new op is one entry here and the field
//! check and the dispatch cannot disagree.

use super::reply;
use super::request::{blank, cut, quoted, Request};
use super::routes::{normalise_domain, Route};
use super::{Refusal, Wire};
use crate::classify::Provider;
use crate::decision::Decision;
use crate::engine::Engine;
use crate::limiter::parse_ip;
use crate::protocol::ledger::{Outcome, Report, MAX_REPORT_TEXT};

type Handler = fn(&mut Wire, &mut Engine, &Request<'_>, u64, &mut Vec<u8>) -> Result<(), Refusal>;

/// One operation: its name on the wire, the fields it takes (besides `id` and `op`), and
/// what answers it.
pub(super) struct Op {
    pub(super) name: &'static str,
    pub(super) fields: &'static [&'static str],
    pub(super) answer: Handler,
}

/// Every operation the core answers, in the order error messages list them.
pub(super) const OPS: [Op; 6] = [
    Op {
        name: "acquire",
        fields: &["ip", "domain", "provider", "n"],
        answer: acquire,
    },
    Op {
        name: "pick",
        fields: &["pool", "domain", "provider", "n"],
        answer: pick,
    },
    Op {
        name: "report",
        fields: &[
            "ip", "domain", "provider", "n", "result", "code", "enhanced", "text",
        ],
        answer: report,
    },
    Op {
        name: "route",
        fields: &["domain"],
        answer: route,
    },
    Op {
        name: "ping",
        fields: &[],
        answer: ping,
    },
    Op {
        name: "classify",
        fields: &["text", "code", "enhanced", "domain", "provider"],
        answer: classify,
    },
];

pub(super) fn find(name: &str) -> Option<&'static Op> {
    OPS.iter().find(|op| op.name == name)
}

impl Op {
    /// Refuse a field this op does not take: the first unknown one, else the first known
    /// one that is not among `fields`.
    pub(super) fn check_fields(&self, req: &Request<'_>) -> Result<(), Refusal> {
        let not_a_field = |f: &str| -> Refusal {
            if self.fields.is_empty() {
                format!("{f}: not a field of {} (it takes none)", self.name).into()
            } else {
                let fields = self.fields.join(", ");
                format!("{f}: not a field of {} (fields: {fields})", self.name).into()
            }
        };
        if let Some(f) = req.extra.first() {
            return Err(not_a_field(f));
        }
        match req
            .given()
            .into_iter()
            .find(|(f, g)| *g && !self.fields.contains(f))
        {
            Some((f, _)) => Err(not_a_field(f)),
            None => Ok(()),
        }
    }
}

#[allow(clippy::unnecessary_wraps)] // every handler has the table's signature
fn ping(
    _: &mut Wire,
    _: &mut Engine,
    req: &Request<'_>,
    _: u64,
    out: &mut Vec<u8>,
) -> Result<(), Refusal> {
    reply::ok(out, req.id);
    Ok(())
}

fn acquire(
    w: &mut Wire,
    engine: &mut Engine,
    req: &Request<'_>,
    now_ms: u64,
    out: &mut Vec<u8>,
) -> Result<(), Refusal> {
    let n = req.count()?;
    if suppressed(w, req, now_ms, out)? {
        return Ok(());
    }
    let Route::Provider(provider) = provider_of(w, engine, req, now_ms)? else {
        if req.ip.is_none() {
            return Err("ip: missing".into());
        }
        w.stats.denied += 1;
        reply::null_mx(out, req.id);
        return Ok(());
    };
    let key = key_of(engine, req, provider)?;
    let d = engine
        .acquire(key, n, now_ms)
        .map_err(|e| Refusal(e.to_string()))?;
    decided(w, engine, req, &d, None, out);
    Ok(())
}

fn pick(
    w: &mut Wire,
    engine: &mut Engine,
    req: &Request<'_>,
    now_ms: u64,
    out: &mut Vec<u8>,
) -> Result<(), Refusal> {
    let n = req.count()?;
    let Some(pool_name) = req.pool.as_deref() else {
        return Err("pool: missing".into());
    };
    let pool = engine
        .pool_handle(pool_name)
        .map_err(|_| Refusal::from(format!("pool: unknown pool {}", quoted(pool_name))))?;
    if suppressed(w, req, now_ms, out)? {
        return Ok(());
    }
    let Route::Provider(provider) = provider_of(w, engine, req, now_ms)? else {
        w.stats.denied += 1;
        reply::null_mx(out, req.id);
        return Ok(());
    };
    let d = engine
        .pick(pool, provider, n, now_ms)
        .map_err(|e| Refusal(e.to_string()))?;
    if d.is_granted() {
        decided(w, engine, req, &d, Some(pool_name), out);
    } else {
        w.stats.denied += 1;
        reply::denied_pick(out, req.id, &d, pool_name, engine.provider_name(provider));
    }
    Ok(())
}

fn report(
    w: &mut Wire,
    engine: &mut Engine,
    req: &Request<'_>,
    now_ms: u64,
    out: &mut Vec<u8>,
) -> Result<(), Refusal> {
    if req.address.is_some() {
        // The daemon hands such lines to Python (`Wire::set_upcall_ops`): the list's event
        // must be durable before the reply.
        return Err("address: a report naming its recipient is answered by the daemon".into());
    }
    let n = req.count()?;
    let Some(result) = req.result.as_deref() else {
        return Err("result: missing (delivered, deferred, bounced or complaint)".into());
    };
    let outcome = Outcome::parse(result).ok_or_else(|| {
        Refusal::from(format!(
            "result: must be delivered, deferred, bounced or complaint \
             (or unsubscribe, with the recipient's address), got {}",
            quoted(result)
        ))
    })?;
    let code = req.reply_code()?;
    let enhanced = req.reply_enhanced()?;
    let Route::Provider(provider) = provider_of(w, engine, req, now_ms)? else {
        return Err("domain: publishes a null MX (accepts no mail); nothing recorded".into());
    };
    let key = key_of(engine, req, provider)?;
    let kept = w.ledger.record(Report {
        at_ms: now_ms,
        key,
        result: outcome,
        n,
        code,
        enhanced: enhanced.map(str::to_owned),
        text: blank(req.text.as_ref()).map(|t| cut(t, MAX_REPORT_TEXT)),
    });
    if !kept {
        w.stats.reports_dropped += 1;
    }
    reply::recorded(out, req.id, engine.provider_name(provider));
    Ok(())
}

fn route(
    w: &mut Wire,
    engine: &mut Engine,
    req: &Request<'_>,
    now_ms: u64,
    out: &mut Vec<u8>,
) -> Result<(), Refusal> {
    let Some(d) = req.domain.as_deref() else {
        return Err("domain: missing".into());
    };
    let d = normalise_domain(d)?;
    let route = w.lookup(&d, now_ms)?;
    let known = w
        .routes
        .get(d.as_ref())
        .is_some_and(|e| e.expires_ms > now_ms);
    let provider = match route {
        Route::Provider(p) => Some(engine.provider_name(p)),
        Route::NullMx => None,
    };
    reply::route(out, req.id, &d, provider, known);
    Ok(())
}

fn classify(
    w: &mut Wire,
    engine: &mut Engine,
    req: &Request<'_>,
    now_ms: u64,
    out: &mut Vec<u8>,
) -> Result<(), Refusal> {
    let Some(text) = blank(req.text.as_ref()) else {
        return Err("text: missing (the SMTP reply)".into());
    };
    let code = req.reply_code()?;
    let enhanced = req.reply_enhanced()?;
    // Provider::Any when neither is given or for the default provider; a null-MX domain has
    // no provider's rules.
    let named: Option<&str> = match (&req.provider, &req.domain) {
        (Some(_), Some(_)) => return Err("give domain or provider, not both".into()),
        (None, None) => None,
        (Some(p), None) => {
            if engine.provider_handle(p).is_err() && !w.classifier.mentions_provider(p) {
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
            match w.lookup(&d, now_ms)? {
                Route::Provider(h) => Some(engine.provider_name(h)),
                Route::NullMx => Some(""),
            }
        }
    };
    // The default provider stands for every provider without a row of its own (Yahoo,
    // Apple, ...): every rule applies, as it does to the reports kiln acts on.
    let default = w.default_provider.map(|h| engine.provider_name(h));
    let provider = match named {
        Some(p) if Some(p) == default => Provider::Any,
        _ => named.map_or(Provider::Any, Provider::Named),
    };
    let (n, verdict) = w.classifier.classify(provider, code, enhanced, text);
    let named = named.filter(|p| !p.is_empty());
    reply::classified(out, req.id, &w.classifier, (&verdict, &n.line), named);
    Ok(())
}

/// Deny a request whose `address` is on the suppression list (answered: true), charging
/// nothing. Without an `address`, nothing is checked.
fn suppressed(
    w: &mut Wire,
    req: &Request<'_>,
    now_ms: u64,
    out: &mut Vec<u8>,
) -> Result<bool, Refusal> {
    let Some(address) = req.address.as_deref() else {
        return Ok(false);
    };
    let scope = req.scope.as_deref().unwrap_or("");
    match w.suppressed(address, scope, now_ms)? {
        Some(event) => {
            w.stats.denied += 1;
            reply::suppressed(out, req.id, event.as_str());
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The provider a request names (`provider`) or implies (`domain`, else `address`).
fn provider_of(
    w: &mut Wire,
    engine: &Engine,
    req: &Request<'_>,
    now_ms: u64,
) -> Result<Route, Refusal> {
    let domain = req.domain.as_ref().or(req.address.as_ref());
    match (&req.provider, domain) {
        (Some(_), Some(_)) if req.domain.is_some() => {
            Err("give domain or provider, not both".into())
        }
        (Some(p), Some(_)) => engine.provider_handle(p).map(Route::Provider).map_err(|_| {
            Refusal::from(format!("provider: unknown provider {}", quoted(p.as_ref())))
        }),
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
            w.lookup(&d, now_ms)
        }
    }
}

/// The key of the request's `ip` (a sending IP of the plan) and `provider`.
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

/// Count a decision (a grant in its key's tally) and write it, naming its key's IP.
fn decided(
    w: &mut Wire,
    engine: &Engine,
    req: &Request<'_>,
    d: &Decision,
    pool: Option<&str>,
    out: &mut Vec<u8>,
) {
    if d.is_granted() {
        w.stats.granted += 1;
        w.ledger.grant(d.key, d.granted);
    } else {
        w.stats.denied += 1;
    }
    let (ip, provider) = engine.key_handles(d.key);
    let named = (engine.ip_addr(ip), engine.provider_name(provider));
    reply::decision(out, req.id, d, named, pool);
}
