use super::*;
use crate::protocol::Route;

const NOW: u64 = 1_800_000_000_000;
const A: &str = "192.0.2.10";
const B: &str = "192.0.2.11";

/// Pool `tx`: A warming with a daily cap of 2 at google, B warm with a cap of 1.
fn setup() -> (Engine, Wire, TransportMap) {
    let mut e = Engine::new();
    let google = e.provider("google").unwrap();
    let default = e.provider("default").unwrap();
    for (ip, cap) in [(A, 2), (B, 1)] {
        let k = e.key(ip, "google").unwrap();
        e.set_limits(k, None, 1, None, Some(cap)).unwrap();
    }
    e.define_pool("tx", &[(A, 1, true), (B, 1, false)], None)
        .unwrap();
    let mut w = Wire::new();
    w.set_default_provider(default);
    w.set_route("gmail.com", Route::Provider(google), u64::MAX)
        .unwrap();
    w.set_route("nomail.example", Route::NullMx, u64::MAX)
        .unwrap();
    let mut m = TransportMap::new();
    let transports = [A, B]
        .iter()
        .map(|ip| (ip.parse().unwrap(), format!("kiln-{ip}").into_boxed_str()))
        .collect();
    m.configure(transports, "[127.0.0.1]:2525");
    (e, w, m)
}

fn net(s: &str) -> String {
    format!("{}:{s},", s.len())
}

/// The payloads answered for `input`, and what was served.
fn ask(e: &mut Engine, w: &mut Wire, m: &mut TransportMap, input: &[u8]) -> (Vec<String>, Served) {
    let mut out = Vec::new();
    let s = m.serve(e, w, input, NOW, &mut out).unwrap();
    let mut replies = Vec::new();
    let mut at = 0;
    while at < out.len() {
        let Frame::Whole { start, end, next } = frame(&out[at..]) else {
            panic!(
                "reply is not a netstring: {:?}",
                String::from_utf8_lossy(&out[at..])
            );
        };
        replies.push(String::from_utf8(out[at + start..at + end].to_vec()).unwrap());
        at += next;
    }
    (replies, s)
}

#[test]
fn fixed_replies_are_netstrings() {
    for r in [BAD_FRAME, REFUSAL, INTERNAL] {
        assert!(matches!(frame(r), Frame::Whole { next, .. } if next == r.len()));
    }
}

#[test]
fn frames() {
    assert_eq!(frame(b""), Frame::Incomplete);
    assert_eq!(frame(b"12"), Frame::Incomplete);
    assert_eq!(frame(b"3:ab"), Frame::Incomplete);
    assert_eq!(
        frame(b"3:abc,x"),
        Frame::Whole {
            start: 2,
            end: 5,
            next: 6
        }
    );
    assert_eq!(frame(b"3:abcd"), Frame::Bad);
    assert_eq!(frame(b":abc,"), Frame::Bad);
    assert_eq!(frame(b"x3:abc,"), Frame::Bad);
    assert_eq!(frame(b"123456:"), Frame::Bad);
    assert_eq!(frame(b"65537:"), Frame::Bad);
    assert_eq!(
        frame(b"0:,"),
        Frame::Whole {
            start: 2,
            end: 2,
            next: 3
        }
    );
}

#[test]
fn picks_in_order_then_waits_and_counts() {
    let (mut e, mut w, mut m) = setup();
    let one = net("tx Someone@Gmail.com");
    let (r, s) = ask(&mut e, &mut w, &mut m, one.repeat(5).as_bytes());
    assert_eq!(s.consumed, one.len() * 5);
    assert_eq!(
        r,
        vec![
            "OK kiln-192.0.2.10:[127.0.0.1]:2525",
            "OK kiln-192.0.2.10:[127.0.0.1]:2525",
            "OK kiln-192.0.2.11:[127.0.0.1]:2525",
            "OK retry:4.7.0 kiln: waiting for room at google in pool tx",
            "OK retry:4.7.0 kiln: waiting for room at google in pool tx",
        ]
    );
    assert_eq!((m.stats.granted, m.stats.waited), (3, 2));
    let granted: u64 = w.take_tallies().iter().map(|t| t.1.granted).sum();
    assert_eq!(granted, 3);
}

#[test]
fn a_queued_provider_makes_new_mail_wait_and_prepaid_grants_are_used_once() {
    let (mut e, mut w, mut m) = setup();
    let pool = e.pool_handle("tx").unwrap();
    let google = e.provider_handle("google").unwrap();
    e.enqueue(1, pool, google, 0, 1).unwrap();
    let (r, _) = ask(&mut e, &mut w, &mut m, net("tx new@gmail.com").as_bytes());
    assert_eq!(
        r,
        vec!["OK retry:4.7.0 kiln: waiting for room at google in pool tx"]
    );
    // The queue releases the held one: its lookup gets the grant, once, whatever the case.
    let mut out = Vec::new();
    e.due(NOW, 10, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    let (ip, _) = e.key_handles(out[0].1.key);
    assert!(m.prepay("Held@Gmail.com ", e.ip_addr(ip), NOW + 1000));
    assert_eq!(m.prepaid_for("held@gmail.com"), 1);
    let held = net("tx held@gmail.com");
    let (r, _) = ask(&mut e, &mut w, &mut m, held.repeat(2).as_bytes());
    assert_eq!(r[0], "OK kiln-192.0.2.10:[127.0.0.1]:2525");
    assert_eq!(
        r[1], "OK kiln-192.0.2.10:[127.0.0.1]:2525",
        "queue empty: a fresh pick"
    );
    assert_eq!((m.stats.prepaid, m.stats.granted), (1, 1));
    assert_eq!(m.prepaid_len(), 0);
}

#[test]
fn lapsed_grants_are_not_used() {
    let (mut e, mut w, mut m) = setup();
    assert!(m.prepay("late@gmail.com", B.parse().unwrap(), NOW));
    assert!(m.prepay("late@gmail.com", B.parse().unwrap(), NOW + 5));
    let (r, _) = ask(&mut e, &mut w, &mut m, net("tx late@gmail.com").as_bytes());
    assert_eq!(r, vec!["OK kiln-192.0.2.11:[127.0.0.1]:2525"]);
    assert_eq!(m.stats.prepaid, 1);
    assert!(m.prepay("x@gmail.com", B.parse().unwrap(), NOW + 5));
    assert_eq!(m.expire(NOW + 5), 1);
    assert_eq!(m.prepaid_len(), 0);
}

#[test]
fn domains_errors_and_null_mx() {
    let (mut e, mut w, mut m) = setup();
    let input = [
        net("tx gmail.com"),
        net("tx .gmail.com"),
        net("tx @gmail.com"),
        net("tx user@"),
        net("nopool a@gmail.com"),
        net("tx a@nomail.example"),
        net("justonefield"),
        net(" a@gmail.com"),
        net("tx \u{ff}"),
        net("tx a@bad domain"),
    ]
    .concat();
    let mut bytes = input.into_bytes();
    // Invalid UTF-8 inside a well-framed request.
    bytes.extend_from_slice(b"5:tx \xff\xfe,");
    let (r, s) = ask(&mut e, &mut w, &mut m, &bytes);
    assert_eq!(s.consumed, bytes.len());
    assert_eq!(
        &r[..4],
        ["NOTFOUND ", "NOTFOUND ", "NOTFOUND ", "NOTFOUND "]
    );
    assert_eq!(r[4], "PERM unknown pool nopool");
    assert!(r[5].starts_with("OK error:5.1.10 "), "{}", r[5]);
    assert!(r[6].starts_with("PERM expected"), "{}", r[6]);
    assert!(r[7].starts_with("PERM the map name"), "{}", r[7]);
    assert_eq!(r[8], "NOTFOUND ");
    assert!(r[9].starts_with("TEMP domain"), "{}", r[9]);
    assert_eq!(r[10], "PERM request is not UTF-8");
    assert_eq!(m.stats.requests, 11);
}

#[test]
fn a_bad_frame_stops_after_the_good_ones() {
    let (mut e, mut w, mut m) = setup();
    let good = net("tx a@gmail.com");
    let input = format!("{good}zz{good}");
    let (r, s) = ask(&mut e, &mut w, &mut m, input.as_bytes());
    assert_eq!(r.len(), 1);
    assert_eq!(s.consumed, good.len());
    assert!(s.too_long);
    // Partial input: nothing consumed, nothing answered.
    let (r, s) = ask(&mut e, &mut w, &mut m, &good.as_bytes()[..good.len() - 1]);
    assert!(r.is_empty());
    assert_eq!(s, Served::default());
}

#[test]
fn suppressed_recipients_bounce_and_the_access_table_rejects_them() {
    let (mut e, mut w, mut m) = setup();
    let fp = w.suppress.fingerprint(b"", b"gone@gmail.com");
    w.suppress
        .insert(fp, crate::suppress::Event::HardBounce, None)
        .unwrap();
    let news = w.suppress.fingerprint(b"news", b"later@gmail.com");
    w.suppress
        .insert(news, crate::suppress::Event::Unsubscribe, None)
        .unwrap();
    let input = [
        net("tx gone@GMAIL.com"),
        net("tx ok@gmail.com"),
        net("kiln.suppressed gone@gmail.com"),
        net("kiln.suppressed ok@gmail.com"),
        net("kiln.suppressed gmail.com"),
        net("kiln.suppressed/news later@gmail.com"),
        net("kiln.suppressed later@gmail.com"),
        net("tx/news later@gmail.com"),
        net("tx later@gmail.com"),
        net("tx/billing later@gmail.com"),
        net("nopool/news later@gmail.com"),
    ]
    .concat();
    let (replies, _) = ask(&mut e, &mut w, &mut m, input.as_bytes());
    assert_eq!(
        replies[0],
        "OK error:5.7.1 kiln: the recipient is on the suppression list (hard_bounce)"
    );
    assert!(replies[1].starts_with("OK kiln-192.0.2.10:"), "{replies:?}");
    assert_eq!(
        replies[2],
        "OK REJECT 5.7.1 kiln: the recipient is on the suppression list (hard_bounce)"
    );
    assert_eq!(&replies[3..5], ["NOTFOUND ", "NOTFOUND "]);
    assert!(replies[5].ends_with("(unsubscribe)"), "{replies:?}");
    assert_eq!(replies[6], "NOTFOUND ");
    // A pool's table with a scope: that scope's list as well as the global one.
    assert_eq!(
        replies[7],
        "OK error:5.7.1 kiln: the recipient is on the suppression list (unsubscribe)"
    );
    assert!(replies[8].starts_with("OK kiln-192.0.2.1"), "{replies:?}");
    assert!(replies[9].starts_with("OK kiln-192.0.2.1"), "{replies:?}");
    assert_eq!(replies[10], "PERM unknown pool nopool");
    assert_eq!(m.stats.suppressed, 4);
    // Nothing was charged for the suppressed recipients: a grant each for ok@gmail.com and
    // for later@gmail.com without its scope and in another.
    assert_eq!(
        w.take_tallies().iter().map(|(_, c)| c.granted).sum::<u64>(),
        3
    );
}
