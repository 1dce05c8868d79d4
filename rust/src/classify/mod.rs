//! SMTP reply text -> push-back class, against rules compiled once at load.
//!
//! `normalise` (normalise.rs) turns a reply into the single-line form `CODE ENH text` that rules
//! match. `Classifier` holds the rules: one
//! `RegexSet` scans a reply once for every pattern, then each matching rule's provider, code
//! and enhanced-code filters are checked; the most severe match wins (a rule marked
//! `fallback` only when nothing else matched) and every match is named.
//!
//! Replies the MTA made up itself (no SMTP code, a Postfix connection failure, KumoMTA's
//! `KumoMTA internal:`, kiln's own `kiln:` texts) are `Classification::Internal` and never reach a
//! rule, or a suspension could keep renewing itself.
//!
//! Pure computation: no clock, no I/O, no logging.

use hashbrown::HashSet;
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use crate::error::{CoreError, CoreResult};

mod normalise;

pub use normalise::{
    check_reply_code, is_internal, normalise, valid_enhanced, Normalised, INTERNAL_PREFIXES,
};

/// Longest pattern text a rule may have (bytes).
pub const MAX_PATTERN_BYTES: usize = 4_096;
/// Most rules one classifier holds.
pub const MAX_RULES: usize = 10_000;
/// Compiled size limit of the whole rule set (the regex crate's unit: bytes of program).
const SET_SIZE_LIMIT: usize = 64 << 20;
/// Cache of the lazy DFA per search thread; bigger means fewer cache resets on a large set.
const DFA_SIZE_LIMIT: usize = 16 << 20;

/// What a reply says about the sender, most severe first (the order `Class::rank` gives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Blocklist,
    BlockRep,
    RateLimitRep,
    Auth,
    ConnLimit,
    Busy,
    Content,
    RcptRate,
    HardBounce,
}

impl Class {
    pub const ALL: [Class; 9] = [
        Class::Blocklist,
        Class::BlockRep,
        Class::RateLimitRep,
        Class::Auth,
        Class::ConnLimit,
        Class::Busy,
        Class::Content,
        Class::RcptRate,
        Class::HardBounce,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Blocklist => "blocklist",
            Class::BlockRep => "block_rep",
            Class::RateLimitRep => "rate_limit_rep",
            Class::Auth => "auth",
            Class::ConnLimit => "conn_limit",
            Class::Busy => "busy",
            Class::Content => "content",
            Class::RcptRate => "rcpt_rate",
            Class::HardBounce => "hard_bounce",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// 0 is the most severe; when several rules match, the lowest rank wins.
    pub const fn rank(self) -> u8 {
        self as u8
    }
}

/// What a reply implicates (docs/rules.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Ip,
    Netblock,
    Domain,
    Url,
    Recipient,
    Message,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Ip,
        Scope::Netblock,
        Scope::Domain,
        Scope::Url,
        Scope::Recipient,
        Scope::Message,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Ip => "ip",
            Scope::Netblock => "netblock",
            Scope::Domain => "domain",
            Scope::Url => "url",
            Scope::Recipient => "recipient",
            Scope::Message => "message",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// One entry of a rule's basic-code filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSpec {
    /// Exactly this code, e.g. 421.
    Exact(u16),
    /// Any code of this class: 4 is `4xx`, 5 is `5xx`.
    Family(u8),
}

impl CodeSpec {
    /// `421`, `4xx` or `5xx` (also `2xx`); None for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() == 3 && matches!(b[0], b'2' | b'4' | b'5') && b[1..].eq_ignore_ascii_case(b"xx")
        {
            return Some(CodeSpec::Family(b[0] - b'0'));
        }
        s.parse::<u16>().ok().and_then(Self::exact)
    }

    /// An exact code in 200..=599.
    pub fn exact(code: u16) -> Option<Self> {
        check_reply_code(code.into()).ok().map(CodeSpec::Exact)
    }

    fn accepts(self, code: u16) -> bool {
        match self {
            CodeSpec::Exact(c) => c == code,
            CodeSpec::Family(f) => code / 100 == u16::from(f),
        }
    }
}

/// A rule as Python hands it over (already validated there; checked again here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleDef {
    pub id: String,
    /// Provider names the rule applies to (groups already expanded); None: every provider.
    pub providers: Option<Vec<String>>,
    /// Basic codes; None: any code.
    pub codes: Option<Vec<CodeSpec>>,
    /// Enhanced codes such as `4.7.28`; None: any (or none).
    pub enhanced: Option<Vec<String>>,
    /// A regex, matched case-insensitively against the normalised reply.
    pub text: String,
    pub class: Class,
    pub scope: Scope,
    /// A last resort: wins only when no other rule matched (generic "try again later").
    pub fallback: bool,
}

/// A compiled rule: its filters; the pattern lives in the classifier's set.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: Box<str>,
    pub providers: Option<Box<[Box<str>]>>,
    pub codes: Option<Box<[CodeSpec]>>,
    pub enhanced: Option<Box<[Box<str>]>>,
    pub class: Class,
    pub scope: Scope,
    pub fallback: bool,
}

impl Rule {
    /// Lower wins: non-fallback rules first, then the more severe class.
    fn order(&self) -> (bool, u8) {
        (self.fallback, self.class.rank())
    }
}

/// Which provider's rules apply to a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider<'a> {
    /// Provider unknown: every rule applies, provider-specific ones included.
    Any,
    /// Only rules without a provider list, and rules that list this name.
    Named(&'a str),
}

/// The class name of `Classification::Internal` on the wire and in Python.
pub const INTERNAL: &str = "internal";

/// The outcome of classifying one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classification {
    /// Made up by the MTA (or kiln), not said by the receiver: no rule may fire.
    Internal,
    /// No rule matched.
    Unclassified,
    /// `rule` (an index) is the most severe match; `matched` lists every match in rule order.
    Classified { rule: usize, matched: Vec<usize> },
}

/// Rules compiled into one `RegexSet`.
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<Rule>,
    set: RegexSet,
    providers: HashSet<Box<str>>,
}

impl Default for Classifier {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            set: RegexSet::empty(),
            providers: HashSet::new(),
        }
    }
}

fn rule_error(id: &str, field: &str, problem: impl std::fmt::Display) -> CoreError {
    CoreError::bad("rules", format!("rule {id:?}: {field}: {problem}"))
}

impl Classifier {
    /// Compile `defs`. On error (a bad pattern, a repeated id, an empty filter) the message
    /// names the rule id and the field.
    pub fn new(defs: Vec<RuleDef>) -> CoreResult<Self> {
        if defs.len() > MAX_RULES {
            return Err(CoreError::bad(
                "rules",
                format!("at most {MAX_RULES} rules, got {}", defs.len()),
            ));
        }
        let mut ids = HashSet::new();
        let mut providers = HashSet::new();
        let mut rules = Vec::with_capacity(defs.len());
        let mut patterns = Vec::with_capacity(defs.len());
        for d in defs {
            if d.id.is_empty() {
                return Err(CoreError::bad("rules", "a rule has an empty id"));
            }
            if !ids.insert(d.id.clone()) {
                return Err(rule_error(&d.id, "id", "given to two rules"));
            }
            if d.text.len() > MAX_PATTERN_BYTES {
                return Err(rule_error(
                    &d.id,
                    "text",
                    format_args!("longer than {MAX_PATTERN_BYTES} bytes"),
                ));
            }
            for (field, empty) in [
                ("providers", d.providers.as_ref().is_some_and(Vec::is_empty)),
                ("code", d.codes.as_ref().is_some_and(Vec::is_empty)),
                ("enhanced", d.enhanced.as_ref().is_some_and(Vec::is_empty)),
            ] {
                if empty {
                    return Err(rule_error(&d.id, field, "an empty list matches nothing"));
                }
            }
            if let Some(bad) = d
                .enhanced
                .iter()
                .flatten()
                .find(|e| !valid_enhanced(e.as_str()))
            {
                return Err(rule_error(
                    &d.id,
                    "enhanced",
                    format_args!("not an enhanced status code like 4.7.28: {bad:?}"),
                ));
            }
            if let Some(ps) = &d.providers {
                providers.extend(ps.iter().map(|p| Box::from(p.as_str())));
            }
            patterns.push(d.text);
            rules.push(Rule {
                id: d.id.into_boxed_str(),
                providers: d
                    .providers
                    .map(|v| v.into_iter().map(String::into_boxed_str).collect()),
                codes: d.codes.map(Vec::into_boxed_slice),
                enhanced: d
                    .enhanced
                    .map(|v| v.into_iter().map(String::into_boxed_str).collect()),
                class: d.class,
                scope: d.scope,
                fallback: d.fallback,
            });
        }
        let set = RegexSetBuilder::new(&patterns)
            .case_insensitive(true)
            .size_limit(SET_SIZE_LIMIT)
            .dfa_size_limit(DFA_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                // Each pattern alone, so the error names its rule (only on this path: compiling
                // every pattern twice would triple the cost of a valid rule set).
                rules
                    .iter()
                    .zip(&patterns)
                    .find_map(|(r, p)| compile_one(p).err().map(|e| rule_error(&r.id, "text", e)))
                    .unwrap_or_else(|| CoreError::bad("rules", format!("the rule set: {e}")))
            })?;
        Ok(Self {
            rules,
            set,
            providers,
        })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rule(&self, i: usize) -> &Rule {
        &self.rules[i]
    }

    /// Whether some rule lists `name` as its provider.
    pub fn mentions_provider(&self, name: &str) -> bool {
        self.providers.contains(name)
    }

    /// Normalise the reply, then match it: see `Classification`.
    pub fn classify(
        &self,
        provider: Provider<'_>,
        code: Option<u16>,
        enhanced: Option<&str>,
        text: &str,
    ) -> (Normalised, Classification) {
        let n = normalise(code, enhanced, text);
        let v = self.classify_normalised(provider, &n);
        (n, v)
    }

    /// Match an already normalised reply.
    pub fn classify_normalised(&self, provider: Provider<'_>, n: &Normalised) -> Classification {
        if is_internal(n) {
            return Classification::Internal;
        }
        if self.rules.is_empty() {
            return Classification::Unclassified;
        }
        let code = n.code.expect("internal replies have no code");
        let mut best: Option<usize> = None;
        let mut matched = Vec::new();
        for i in &self.set.matches(&n.line) {
            let r = &self.rules[i];
            if let (Provider::Named(p), Some(ps)) = (provider, &r.providers) {
                if !ps.iter().any(|q| q.as_ref() == p) {
                    continue;
                }
            }
            if let Some(cs) = &r.codes {
                if !cs.iter().any(|c| c.accepts(code)) {
                    continue;
                }
            }
            if let Some(es) = &r.enhanced {
                let Some(e) = n.enhanced.as_deref() else {
                    continue;
                };
                if !es.iter().any(|x| x.as_ref() == e) {
                    continue;
                }
            }
            matched.push(i);
            if best.is_none_or(|b| r.order() < self.rules[b].order()) {
                best = Some(i);
            }
        }
        match best {
            Some(rule) => Classification::Classified { rule, matched },
            None => Classification::Unclassified,
        }
    }
}

/// Check one pattern as `Classifier::new` would (case-insensitive); the error text on failure.
pub fn check_pattern(text: &str) -> Result<(), String> {
    compile_one(text).map(|_| ()).map_err(|e| e.to_string())
}

fn compile_one(text: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(text)
        .case_insensitive(true)
        .size_limit(SET_SIZE_LIMIT)
        .build()
}

#[cfg(test)]
mod tests;
