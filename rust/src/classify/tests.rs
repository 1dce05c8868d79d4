//! Tests of reply normalising and rule classification.

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
