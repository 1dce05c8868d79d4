//! Reply lines, written straight into the output buffer (no JSON tree): the `id` echoed as
//! it came, every string JSON-escaped, each line ending in `\n`.

use std::io::Write;
use std::net::IpAddr;

use serde_json::value::RawValue;

use crate::classify::{Classification, Classifier, INTERNAL};
use crate::decision::Decision;

pub(super) fn json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// `"provider":"name"` or `"provider":null` (no provider: a null MX).
fn provider_field(out: &mut Vec<u8>, provider: Option<&str>) {
    out.extend_from_slice(b"\"provider\":");
    match provider {
        Some(p) => json_str(out, p),
        None => out.extend_from_slice(b"null"),
    }
}

fn open(out: &mut Vec<u8>, id: Option<&RawValue>) {
    out.push(b'{');
    if let Some(id) = id {
        out.extend_from_slice(b"\"id\":");
        out.extend_from_slice(id.get().as_bytes());
        out.push(b',');
    }
}

pub(super) fn error(out: &mut Vec<u8>, id: Option<&RawValue>, message: &str) {
    open(out, id);
    out.extend_from_slice(b"\"ok\":false,\"error\":");
    json_str(out, message);
    out.extend_from_slice(b"}\n");
}

/// `{"ok":true}`: the whole answer to `ping`.
pub(super) fn ok(out: &mut Vec<u8>, id: Option<&RawValue>) {
    open(out, id);
    out.extend_from_slice(b"\"ok\":true}\n");
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

/// A decision naming its key's IP and provider; a `pick` also names the pool and tier.
pub(super) fn decision(
    out: &mut Vec<u8>,
    id: Option<&RawValue>,
    d: &Decision,
    (ip, provider): (IpAddr, &str),
    pool: Option<&str>,
) {
    decision_head(out, id, d);
    let _ = write!(out, ",\"ip\":\"{ip}\",");
    provider_field(out, Some(provider));
    if let Some(pool) = pool {
        out.extend_from_slice(b",\"pool\":");
        json_str(out, pool);
        out.extend_from_slice(b",\"tier\":\"");
        out.extend_from_slice(d.tier.as_str().as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"}\n");
}

/// A denied `pick` names no IP: every member and overflow pool was full.
pub(super) fn denied_pick(
    out: &mut Vec<u8>,
    id: Option<&RawValue>,
    d: &Decision,
    pool: &str,
    provider: &str,
) {
    decision_head(out, id, d);
    out.extend_from_slice(b",\"pool\":");
    json_str(out, pool);
    out.push(b',');
    provider_field(out, Some(provider));
    out.extend_from_slice(b"}\n");
}

/// The denial of a suppressed recipient, with why it is on the list.
pub(super) fn suppressed(out: &mut Vec<u8>, id: Option<&RawValue>, event: &str) {
    open(out, id);
    out.extend_from_slice(b"\"ok\":true,\"granted\":0,\"reason\":\"suppressed\",\"event\":");
    json_str(out, event);
    out.extend_from_slice(b",\"retry_after_ms\":null}\n");
}

/// The denial of a domain that accepts no mail.
pub(super) fn null_mx(out: &mut Vec<u8>, id: Option<&RawValue>) {
    open(out, id);
    out.extend_from_slice(
        b"\"ok\":true,\"granted\":0,\"reason\":\"null_mx\",\"retry_after_ms\":null,\"provider\":null}\n",
    );
}

/// A recorded `report`: the provider it was counted for.
pub(super) fn recorded(out: &mut Vec<u8>, id: Option<&RawValue>, provider: &str) {
    open(out, id);
    out.extend_from_slice(b"\"ok\":true,");
    provider_field(out, Some(provider));
    out.extend_from_slice(b"}\n");
}

/// The answer to `route`: the normalised domain, its provider, and whether a fresh route
/// (not the default) gave it.
pub(super) fn route(
    out: &mut Vec<u8>,
    id: Option<&RawValue>,
    domain: &str,
    provider: Option<&str>,
    resolved: bool,
) {
    open(out, id);
    out.extend_from_slice(b"\"ok\":true,\"domain\":");
    json_str(out, domain);
    out.push(b',');
    provider_field(out, provider);
    let _ = writeln!(out, ",\"resolved\":{resolved}}}");
}

/// The answer to `classify`: class, scope, winning rule and every match, the normalised
/// reply, and the provider whose rules applied.
pub(super) fn classified(
    out: &mut Vec<u8>,
    id: Option<&RawValue>,
    rules: &Classifier,
    (verdict, normalised): (&Classification, &str),
    provider: Option<&str>,
) {
    open(out, id);
    out.extend_from_slice(b"\"ok\":true,\"class\":");
    match verdict {
        Classification::Internal | Classification::Unclassified => {
            let class = if *verdict == Classification::Internal {
                INTERNAL
            } else {
                "unclassified"
            };
            out.push(b'"');
            out.extend_from_slice(class.as_bytes());
            out.extend_from_slice(b"\",\"scope\":null,\"rule\":null,\"matched\":[]");
        }
        Classification::Classified { rule, matched } => {
            let r = rules.rule(*rule);
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
                json_str(out, &rules.rule(m).id);
            }
            out.push(b']');
        }
    }
    out.extend_from_slice(b",\"normalised\":");
    json_str(out, normalised);
    out.push(b',');
    provider_field(out, provider);
    out.extend_from_slice(b"}\n");
}
