//! A request line, parsed: every value is first taken raw, then read as its field's type,
//! so a wrong type is a clear message naming the field and the `id` can still be echoed.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::Refusal;
use crate::classify::{check_reply_code, valid_enhanced};

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
pub(super) struct Request<'a> {
    pub(super) id: Option<&'a RawValue>,
    pub(super) op: Option<Cow<'a, str>>,
    pub(super) ip: Option<Cow<'a, str>>,
    pub(super) domain: Option<Cow<'a, str>>,
    pub(super) provider: Option<Cow<'a, str>>,
    pub(super) pool: Option<Cow<'a, str>>,
    pub(super) result: Option<Cow<'a, str>>,
    pub(super) enhanced: Option<Cow<'a, str>>,
    pub(super) text: Option<Cow<'a, str>>,
    /// A full recipient address: a suppressed one is denied (`suppressed`).
    pub(super) address: Option<Cow<'a, str>>,
    /// The suppression scope to check besides the global list (a sending domain, stream or
    /// tenant).
    pub(super) scope: Option<Cow<'a, str>>,
    pub(super) n: Option<u64>,
    pub(super) code: Option<u64>,
    /// `code` was given as `""`, which counts as left out (see `Request::code`).
    code_blank: bool,
    /// Fields this parser does not know, in order (upcall ops may use them).
    pub(super) extra: Vec<Cow<'a, str>>,
    /// The first wrong-typed or repeated field.
    pub(super) problem: Option<String>,
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
pub(super) fn quoted(s: &str) -> String {
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
pub(super) fn blank<'r>(value: Option<&'r Cow<'_, str>>) -> Option<&'r str> {
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
                "address" => Request::text(p, &mut r.address, "address", raw),
                "scope" => Request::text(p, &mut r.scope, "scope", raw),
                "n" => Request::number(p, &mut r.n, "n", raw),
                "code" => Request::code(p, &mut r.code, &mut r.code_blank, raw),
                _ => r.extra.push(key.0),
            }
        }
        Ok(r)
    }
}

/// Parse one line (UTF-8 already checked); the message is the error reply's.
pub(super) fn parse(text: &str) -> Result<Request<'_>, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(RequestVisitor)
        .and_then(|r| de.end().map(|()| r))
        .map_err(|e| {
            if e.is_data() {
                "request must be a JSON object".to_owned()
            } else {
                format!("invalid JSON: {e}")
            }
        })
}

impl Request<'_> {
    /// Each known field other than `id` and `op`, and whether the line gave it.
    pub(super) fn given(&self) -> [(&'static str, bool); 9] {
        [
            ("ip", self.ip.is_some()),
            ("domain", self.domain.is_some()),
            ("provider", self.provider.is_some()),
            ("pool", self.pool.is_some()),
            ("n", self.n.is_some()),
            ("result", self.result.is_some()),
            ("code", self.code.is_some() || self.code_blank),
            ("enhanced", self.enhanced.is_some()),
            ("text", self.text.is_some()),
        ]
    }

    /// `n`: how many messages, 1 when left out.
    pub(super) fn count(&self) -> Result<u32, Refusal> {
        match self.n {
            None => Ok(1),
            Some(0) => Err("n: must be at least 1, got 0".into()),
            Some(n) => u32::try_from(n)
                .map_err(|_| Refusal::from(format!("n: must be at most {}, got {n}", u32::MAX))),
        }
    }

    /// The optional `code` of a request: an SMTP reply code.
    pub(super) fn reply_code(&self) -> Result<Option<u16>, Refusal> {
        self.code
            .map(|c| check_reply_code(c.into()))
            .transpose()
            .map_err(|e| Refusal(e.to_string()))
    }

    /// The optional `enhanced` of a request: an enhanced status code.
    pub(super) fn reply_enhanced(&self) -> Result<Option<&str>, Refusal> {
        match blank(self.enhanced.as_ref()) {
            Some(e) if !valid_enhanced(e) => Err(format!(
                "enhanced: must be an enhanced status code like 4.7.28, got {}",
                quoted(e)
            )
            .into()),
            e => Ok(e),
        }
    }
}

pub(super) fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
