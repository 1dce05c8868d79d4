//! SMTP reply text -> push-back class, against rules compiled once at load.
//!
//! `normalise` turns a reply into the single-line form `CODE ENH text` that rules match
//! (docs/rules.md, "What a rule sees"): lines joined, continuation prefixes such as `421-4.7.28`
//! removed wherever they repeat, whitespace collapsed. `Classifier` holds the rules: one
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

/// A reply in single-line form, with the codes it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalised {
    pub code: Option<u16>,
    pub enhanced: Option<String>,
    /// `CODE ENH text` (parts that are missing are left out).
    pub line: String,
    /// Where the text starts in `line`.
    pub text_start: usize,
}

impl Normalised {
    pub fn text(&self) -> &str {
        &self.line[self.text_start..]
    }
}

/// An SMTP reply code as rules, reports and `classify` take it: 200 to 599.
pub fn check_reply_code(code: i128) -> CoreResult<u16> {
    match code {
        200..=599 => Ok(code as u16),
        c => Err(CoreError::bad(
            "code",
            format!("must be an SMTP reply code 200-599, got {c}"),
        )),
    }
}

/// `class.subject.detail`: class 2, 4 or 5, then two numbers of 1 to 3 digits (RFC 3463).
pub fn valid_enhanced(s: &str) -> bool {
    let mut parts = s.split('.');
    let (Some(class), Some(subject), Some(detail), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    matches!(class, "2" | "4" | "5")
        && [subject, detail]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A leading token that is a basic code: three digits, the first 2-5, then the end or `-`.
/// Returns the code and what follows the `-` (possibly empty).
fn code_token(t: &str) -> Option<(u16, &str)> {
    let b = t.as_bytes();
    if b.len() < 3
        || !matches!(b[0], b'2'..=b'5')
        || !b[1].is_ascii_digit()
        || !b[2].is_ascii_digit()
    {
        return None;
    }
    let rest = match b.get(3) {
        None => "",
        Some(b'-') => &t[4..],
        Some(_) => return None,
    };
    let code = u16::from(b[0] - b'0') * 100 + u16::from(b[1] - b'0') * 10 + u16::from(b[2] - b'0');
    Some((code, rest))
}

/// Whether `t` repeats the reply's own code `code` as a continuation prefix: `421`, `421-`
/// (Some(false): an enhanced code may follow as its own token) or `421-4.7.28` (Some(true)).
fn own_code_token(t: &str, code: &str) -> Option<bool> {
    let rest = t.strip_prefix(code)?;
    if rest.is_empty() {
        return Some(false);
    }
    let rest = rest.strip_prefix('-')?;
    if rest.is_empty() {
        Some(false)
    } else if valid_enhanced(rest) {
        Some(true)
    } else {
        None
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// Drop the wrapping of a Postfix log text: `host MX[IP] said:` before the reply and
/// `(in reply to ... command)` after it, repeatedly (so normalising twice changes nothing).
fn unwrap_postfix<'a>(mut toks: &'a [&'a str]) -> &'a [&'a str] {
    loop {
        let before = toks.len();
        if toks.len() >= 3
            && toks[0].eq_ignore_ascii_case("host")
            && toks[2].eq_ignore_ascii_case("said:")
        {
            toks = &toks[3..];
        }
        if toks
            .last()
            .is_some_and(|t| t.eq_ignore_ascii_case("command)"))
        {
            let open = toks.windows(3).rposition(|w| {
                w[0].eq_ignore_ascii_case("(in")
                    && w[1].eq_ignore_ascii_case("reply")
                    && w[2].eq_ignore_ascii_case("to")
            });
            if let Some(j) = open {
                if j + 3 < toks.len() - 1 {
                    toks = &toks[..j];
                }
            }
        }
        if toks.len() == before {
            return toks;
        }
    }
}

/// The single-line form of a reply (docs/rules.md). `code` and `enhanced` are what the MTA
/// reported beside the text; when missing they are read from the start of the text. Every
/// whitespace-delimited token that repeats the reply's own code (`421`, `421-`,
/// `421-4.7.28`, and `421`/`421-` followed by its enhanced code) is dropped; other numbers
/// stay. Whitespace is ASCII whitespace. Idempotent: normalising `line` again with the same
/// codes gives the same line.
pub fn normalise(code: Option<u16>, enhanced: Option<&str>, text: &str) -> Normalised {
    let all: Vec<&str> = text.split_ascii_whitespace().collect();
    let mut toks = unwrap_postfix(&all);
    let mut code = code;
    let mut enhanced: Option<&str> = enhanced;
    // A piece of the first token that is text, not a code (`421-Service` -> `Service`).
    let mut first_text: Option<&str> = None;
    let mut candidate: Option<&str> = None;
    let mut code_str = code.map(|c| c.to_string());
    if let Some(&t) = toks.first() {
        let leading = match (&code_str, code_token(t)) {
            (Some(cs), Some(_)) => &t[..3] == cs.as_str(),
            (None, Some((c, _))) => {
                code = Some(c);
                code_str = Some(c.to_string());
                true
            }
            _ => false,
        };
        if leading {
            toks = &toks[1..];
            let rest = t[3..].strip_prefix('-').unwrap_or("");
            if valid_enhanced(rest) {
                candidate = Some(rest);
            } else if !rest.is_empty() {
                first_text = Some(rest);
            }
        }
    }
    // The enhanced code: given, or from `421-4.7.28`, or the token after the code.
    match enhanced {
        Some(e) => {
            if candidate.is_none() && first_text.is_none() && toks.first() == Some(&e) {
                toks = &toks[1..];
            }
        }
        None => {
            if candidate.is_some() {
                enhanced = candidate;
            } else if first_text.is_none() {
                if let Some(&t) = toks.first().filter(|t| valid_enhanced(t)) {
                    enhanced = Some(t);
                    toks = &toks[1..];
                }
            }
        }
    }
    let mut line = String::with_capacity(text.len() + 12);
    if let Some(c) = &code_str {
        line.push_str(c);
    }
    if let Some(e) = enhanced {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(e);
    }
    let head = line.len();
    let push = |line: &mut String, t: &str| {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(t);
    };
    if let Some(t) = first_text {
        push(&mut line, t);
    }
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        i += 1;
        if let Some(cs) = &code_str {
            match own_code_token(t, cs) {
                Some(true) => continue,
                Some(false) => {
                    if enhanced.is_some() && toks.get(i).copied() == enhanced {
                        i += 1;
                    }
                    continue;
                }
                None => {}
            }
        }
        push(&mut line, t);
    }
    let text_start = if head == 0 {
        0
    } else {
        (head + 1).min(line.len())
    };
    Normalised {
        code,
        enhanced: enhanced.map(str::to_owned),
        line,
        text_start,
    }
}

/// Texts an MTA (or kiln) writes about its own trouble, matched case-insensitively at the
/// start of the reply text (after any code): none of them is the receiver speaking.
pub const INTERNAL_PREFIXES: [&str; 10] = [
    // KumoMTA: every locally generated response.
    "kumomta internal",
    // kiln's own deferrals and errors, as MTA glue reports them.
    "kiln:",
    // Postfix, relay=none: the site is marked down, or the connection never got a reply.
    "delivery temporarily suspended",
    "connect to ",
    "lost connection with ",
    "conversation with ",
    "host or domain name not found",
    "name service error",
    "mail transport unavailable",
    "unable to look up host",
];

/// A reply the MTA made up: no SMTP code, or a text that starts with one of
/// `INTERNAL_PREFIXES`.
pub fn is_internal(n: &Normalised) -> bool {
    n.code.is_none()
        || INTERNAL_PREFIXES
            .iter()
            .any(|p| starts_with_ignore_case(n.text(), p))
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
mod tests {
    use super::*;

    fn line(code: Option<u16>, enhanced: Option<&str>, text: &str) -> String {
        normalise(code, enhanced, text).line
    }

    #[test]
    fn continuation_prefixes_go_other_numbers_stay() {
        let raw = "421-4.7.28 Gmail has detected an unusual rate of 421-4.7.28 unsolicited mail. \
                   To protect our\n421-4.7.28  users from spam\r\n421 4.7.28 blocked. - gsmtp";
        let want = "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail. \
                    To protect our users from spam blocked. - gsmtp";
        assert_eq!(line(None, None, raw), want);
        assert_eq!(line(Some(421), Some("4.7.28"), raw), want);
        assert_eq!(line(Some(421), None, raw), want);
        assert_eq!(
            line(
                Some(451),
                None,
                "451- 4.7.652 The mail server 451- 4.7.652 has exceeded"
            ),
            "451 4.7.652 The mail server has exceeded"
        );
        assert_eq!(
            line(
                Some(554),
                None,
                "554- rejected 554- for 200 recipients, see /421-ts03.html"
            ),
            "554 rejected for 200 recipients, see /421-ts03.html"
        );
        assert_eq!(
            line(Some(421), Some("4.7.0"), "[TS03] 421 mail 4.7.0 421 x"),
            "421 4.7.0 [TS03] mail 4.7.0 x"
        );
    }

    #[test]
    fn codes_come_from_the_text_when_not_given() {
        let n = normalise(None, None, "550 5.7.1 blocked");
        assert_eq!((n.code, n.enhanced.as_deref()), (Some(550), Some("5.7.1")));
        assert_eq!(n.text(), "blocked");
        let n = normalise(None, None, "421 Max message per connection reached");
        assert_eq!((n.code, n.enhanced.as_deref()), (Some(421), None));
        assert_eq!(n.line, "421 Max message per connection reached");
        let n = normalise(Some(421), Some("4.7.0"), "4.7.0 [TSS04] Messages");
        assert_eq!(n.line, "421 4.7.0 [TSS04] Messages");
        assert_eq!(n.text(), "[TSS04] Messages");
        let n = normalise(None, None, "421-Service not available");
        assert_eq!(n.line, "421 Service not available");
        let n = normalise(None, None, "no code here");
        assert_eq!(
            (n.code, n.line.as_str(), n.text()),
            (None, "no code here", "no code here")
        );
        let n = normalise(Some(421), None, "");
        assert_eq!((n.line.as_str(), n.text()), ("421", ""));
    }

    #[test]
    fn postfix_said_wrapping_is_dropped() {
        let n = normalise(
            None,
            None,
            "host gmail-smtp-in.l.google.com[142.250.1.26] said: 421-4.7.28 [2001:db8::25] \
             Gmail has detected 421-4.7.28 more 421 4.7.28 text - gsmtp (in reply to end of DATA command)",
        );
        assert_eq!(
            n.line,
            "421 4.7.28 [2001:db8::25] Gmail has detected more text - gsmtp"
        );
    }

    #[test]
    fn normalise_is_idempotent_on_samples() {
        for (c, e, t) in [
            (None, None, "421 421 4.7.28 x"),
            (Some(421), None, "4.7.28 421 x"),
            (Some(421), None, "450 4.2.1 foo"),
            (None, Some("4.7.28"), "4.7.28 foo"),
            (Some(421), Some("4.7.28"), "4.7.1 foo"),
            (None, None, "host a said: host b said: 421 z"),
            (Some(421), None, "421-"),
            (None, None, "421-4.7.28"),
            (
                Some(250),
                Some("2.0.0"),
                "250 2.0.0 250 ok (in reply to x command) (in reply to y command)",
            ),
        ] {
            let once = line(c, e, t);
            assert_eq!(line(c, e, &once), once, "{t:?}");
            assert_eq!(line(None, None, &once), line(c, e, &once).clone(), "{t:?}");
        }
    }

    #[test]
    fn enhanced_codes() {
        assert!(valid_enhanced("4.7.28"));
        assert!(valid_enhanced("5.7.515"));
        assert!(!valid_enhanced("4.7"));
        assert!(!valid_enhanced("3.1.1"));
        assert!(!valid_enhanced("4.7.1234"));
        assert!(!valid_enhanced("4.7.28.1"));
        assert!(!valid_enhanced("4..1"));
    }

    fn def(
        id: &str,
        providers: Option<&[&str]>,
        codes: Option<&[CodeSpec]>,
        text: &str,
        class: Class,
        scope: Scope,
    ) -> RuleDef {
        RuleDef {
            id: id.to_owned(),
            providers: providers.map(|p| p.iter().map(|s| (*s).to_owned()).collect()),
            codes: codes.map(<[CodeSpec]>::to_vec),
            enhanced: None,
            text: text.to_owned(),
            class,
            scope,
            fallback: false,
        }
    }

    fn sample() -> Classifier {
        let mut gmail = def(
            "google-ip",
            Some(&["google"]),
            Some(&[CodeSpec::Exact(421)]),
            r"unusual rate .*IP address",
            Class::RateLimitRep,
            Scope::Ip,
        );
        gmail.enhanced = Some(vec!["4.7.28".into(), "4.7.0".into()]);
        Classifier::new(vec![
            def(
                "generic-deferred",
                None,
                Some(&[CodeSpec::Family(4)]),
                "temporarily deferred|unusual rate",
                Class::RateLimitRep,
                Scope::Ip,
            ),
            gmail,
            def(
                "spamhaus",
                None,
                None,
                "spamhaus",
                Class::Blocklist,
                Scope::Ip,
            ),
            def(
                "perm",
                None,
                None,
                "permanently deferred",
                Class::BlockRep,
                Scope::Ip,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn most_severe_wins_and_every_match_is_named() {
        let c = sample();
        let (_, v) = c.classify(
            Provider::Named("yahoo"),
            None,
            None,
            "421 4.7.1 [TS03] All messages from 192.0.2.10 will be permanently deferred; temporarily deferred",
        );
        assert_eq!(
            v,
            Classification::Classified {
                rule: 3,
                matched: vec![0, 3]
            }
        );
        let (_, v) = c.classify(
            Provider::Named("google"),
            Some(421),
            Some("4.7.28"),
            "Gmail has detected an UNUSUAL RATE of mail from your ip address 2001:db8::25",
        );
        // Same class: the first listed rule wins.
        assert_eq!(
            v,
            Classification::Classified {
                rule: 0,
                matched: vec![0, 1]
            }
        );
    }

    #[test]
    fn filters_provider_code_and_enhanced() {
        let c = sample();
        let text = "Gmail has detected an unusual rate of mail from your IP address";
        let (_, v) = c.classify(Provider::Named("yahoo"), Some(421), Some("4.7.28"), text);
        assert_eq!(
            v,
            Classification::Classified {
                rule: 0,
                matched: vec![0]
            }
        );
        let (_, v) = c.classify(Provider::Any, Some(421), Some("4.7.28"), text);
        assert_eq!(
            v,
            Classification::Classified {
                rule: 0,
                matched: vec![0, 1]
            }
        );
        let (_, v) = c.classify(Provider::Named("google"), Some(421), Some("4.7.1"), text);
        assert_eq!(
            v,
            Classification::Classified {
                rule: 0,
                matched: vec![0]
            }
        );
        let (_, v) = c.classify(Provider::Named("google"), Some(550), Some("5.7.1"), text);
        assert_eq!(v, Classification::Unclassified);
        let (_, v) = c.classify(
            Provider::Named("google"),
            Some(550),
            None,
            "listed at SpamHaus",
        );
        assert_eq!(
            v,
            Classification::Classified {
                rule: 2,
                matched: vec![2]
            }
        );
    }

    #[test]
    fn fallbacks_win_only_alone() {
        let mut busy = def(
            "try-later",
            None,
            None,
            "try again later",
            Class::Busy,
            Scope::Ip,
        );
        busy.fallback = true;
        let c = Classifier::new(vec![
            busy,
            def(
                "volume",
                None,
                None,
                "excessive volume",
                Class::RcptRate,
                Scope::Recipient,
            ),
        ])
        .unwrap();
        let (_, v) = c.classify(
            Provider::Any,
            Some(421),
            None,
            "excessive volume. Try again later",
        );
        assert_eq!(
            v,
            Classification::Classified {
                rule: 1,
                matched: vec![0, 1]
            }
        );
        let (_, v) = c.classify(Provider::Any, Some(421), None, "Try again later");
        assert_eq!(
            v,
            Classification::Classified {
                rule: 0,
                matched: vec![0]
            }
        );
    }

    #[test]
    fn internal_replies_never_fire() {
        let c = Classifier::new(vec![def(
            "all",
            None,
            None,
            ".",
            Class::Blocklist,
            Scope::Ip,
        )])
        .unwrap();
        for (code, text) in [
            (None, "Connection refused by spamhaus"),
            (Some(421), "KumoMTA internal: failed to connect to any candidate hosts"),
            (Some(451), "kiln: throttled"),
            (Some(421), "delivery temporarily suspended: connect to mx.example[192.0.2.1]:25: Connection timed out"),
            (Some(421), "connect to mx.example[192.0.2.1]:25: Connection timed out"),
            (Some(421), "lost connection with mx.example[192.0.2.1] while receiving the initial server greeting"),
            (Some(421), "conversation with mx.example[192.0.2.1] timed out while sending RCPT TO"),
            (Some(450), "Host or domain name not found. Name service error for name=x type=MX"),
        ] {
            let (_, v) = c.classify(Provider::Any, code, None, text);
            assert_eq!(v, Classification::Internal, "{text}");
        }
        let (_, v) = c.classify(Provider::Any, Some(421), None, "try again");
        assert!(matches!(v, Classification::Classified { .. }));
    }

    #[test]
    fn bad_rules_name_their_id() {
        let e = Classifier::new(vec![def(
            "broken",
            None,
            None,
            "unclosed (",
            Class::Busy,
            Scope::Ip,
        )])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("rules: rule \"broken\": text: regex parse error"),
            "{e}"
        );
        let e = Classifier::new(vec![
            def("a", None, None, "x", Class::Busy, Scope::Ip),
            def("a", None, None, "y", Class::Busy, Scope::Ip),
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(e, "rules: rule \"a\": id: given to two rules");
        let mut d = def("e", None, None, "x", Class::Busy, Scope::Ip);
        d.enhanced = Some(vec!["4.7".into()]);
        let e = Classifier::new(vec![d]).unwrap_err().to_string();
        assert!(
            e.contains("rule \"e\": enhanced: not an enhanced status code"),
            "{e}"
        );
        let e = Classifier::new(vec![def("p", Some(&[]), None, "x", Class::Busy, Scope::Ip)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("providers: an empty list"), "{e}");
    }

    #[test]
    fn names_round_trip() {
        for c in Class::ALL {
            assert_eq!(Class::parse(c.as_str()), Some(c));
        }
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Class::parse("nope"), None);
        assert_eq!(CodeSpec::parse("4xx"), Some(CodeSpec::Family(4)));
        assert_eq!(CodeSpec::parse("5XX"), Some(CodeSpec::Family(5)));
        assert_eq!(CodeSpec::parse("421"), Some(CodeSpec::Exact(421)));
        assert_eq!(CodeSpec::parse("199"), None);
        assert_eq!(CodeSpec::parse("6xx"), None);
        assert!(Class::Blocklist.rank() < Class::BlockRep.rank());
        assert!(Class::RcptRate.rank() < Class::HardBounce.rank());
        assert!(check_pattern("a(").is_err());
        assert!(check_pattern("a").is_ok());
    }
}
