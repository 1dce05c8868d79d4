//! A reply in the single-line form rules match: `CODE ENH text` (docs/rules.md, "What a rule
//! sees"), and the checks on reply and enhanced codes that every path shares.
//!
//! Lines are joined, continuation prefixes such as `421-4.7.28` removed wherever they repeat,
//! whitespace collapsed. A reply the MTA made up itself (no SMTP code, a connection failure,
//! `KumoMTA internal:`, kiln's own `kiln:` texts) is recognised here (`is_internal`).
//!
//! Pure computation: no clock, no I/O, no logging.

use crate::error::{CoreError, CoreResult};

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
