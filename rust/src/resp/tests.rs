use super::*;

const NOW: u64 = 1_800_000_000_000;
const A: &str = "192.0.2.10";

fn setup() -> (Engine, Wire, Resp) {
    let mut e = Engine::new();
    let google = e.provider("google").unwrap();
    let default = e.provider("default").unwrap();
    let k = e.key(A, "google").unwrap();
    e.set_limits(k, None, 1, None, Some(2)).unwrap();
    e.define_pool("tx", &[(A, 1, true)], None).unwrap();
    let mut w = Wire::new();
    w.set_default_provider(default);
    w.set_route("gmail.com", Route::Provider(google), u64::MAX)
        .unwrap();
    (e, w, Resp::new())
}

fn cmd(words: &[&str]) -> String {
    use std::fmt::Write as _;
    let mut s = format!("*{}\r\n", words.len());
    for w in words {
        let _ = write!(s, "${}\r\n{w}\r\n", w.len());
    }
    s
}

fn ask(e: &mut Engine, w: &mut Wire, r: &mut Resp, input: &[u8], now: u64) -> (String, Served) {
    let mut out = Vec::new();
    let s = r.serve(e, w, input, now, &mut out).unwrap();
    (String::from_utf8_lossy(&out).into_owned(), s)
}

#[test]
fn handshake_and_plain_commands() {
    let (mut e, mut w, mut r) = setup();
    let input = [
        cmd(&["PING"]),
        cmd(&["ping", "hi"]),
        cmd(&["ECHO", "x y"]),
        cmd(&["SELECT", "0"]),
        cmd(&["SELECT", "1"]),
        cmd(&["CLIENT", "SETNAME", "kumo"]),
        cmd(&["COMMAND", "DOCS"]),
        cmd(&["HELLO", "3"]),
        "PING\r\n".into(),
        "  \r\n".into(),
        cmd(&["NOPE", "a", "b"]),
        cmd(&["ECHO"]),
    ]
    .concat();
    let (out, s) = ask(&mut e, &mut w, &mut r, input.as_bytes(), NOW);
    assert_eq!(s.consumed, input.len());
    assert!(!s.too_long);
    assert_eq!(
        out,
        "+PONG\r\n$2\r\nhi\r\n$3\r\nx y\r\n+OK\r\n-ERR DB index is out of range\r\n+OK\r\n*0\r\n\
         -NOPROTO unsupported protocol version (kiln speaks RESP2)\r\n+PONG\r\n\
         -ERR unknown command 'NOPE', with args beginning with: 'a' 'b'\r\n\
         -ERR wrong number of arguments for 'echo' command\r\n"
    );
}

#[test]
fn quit_answers_then_closes_and_partial_frames_wait() {
    let (mut e, mut w, mut r) = setup();
    let input = format!("{}{}", cmd(&["QUIT"]), cmd(&["PING"]));
    let (out, s) = ask(&mut e, &mut w, &mut r, input.as_bytes(), NOW);
    assert_eq!(out, "+OK\r\n");
    assert!(s.too_long);
    let whole = cmd(&["ECHO", "abc"]);
    for cut in 1..whole.len() {
        let (out, s) = ask(&mut e, &mut w, &mut r, &whole.as_bytes()[..cut], NOW);
        assert_eq!(
            (out.as_str(), s.consumed, s.too_long),
            ("", 0, false),
            "cut {cut}"
        );
    }
}

#[test]
fn broken_framing_gets_a_protocol_error_and_a_close() {
    for bad in [
        "*1\r\n$2147483647\r\n",
        "*1\r\n$-5\r\n",
        "*1\r\n*1\r\n$4\r\nPING\r\n",
        "*x\r\n",
        "*99\r\n",
        "*1\r\n$4\r\nPINGxx",
        "*1\n",
    ] {
        let (mut e, mut w, mut r) = setup();
        let (out, s) = ask(&mut e, &mut w, &mut r, bad.as_bytes(), NOW);
        assert!(out.starts_with("-ERR Protocol error: "), "{bad:?}: {out}");
        assert!(s.too_long, "{bad:?}");
    }
    // A huge declared length allocates nothing and waits for nothing: refused at once.
    assert!(matches!(
        frame(b"*1\r\n$99999999999\r\n", None),
        Frame::Bad(_)
    ));
}

#[test]
fn cl_throttle_follows_redis_cell() {
    let (mut e, mut w, mut r) = setup();
    // 15 burst, 30 per 60 s (T = 2 s): the first request leaves 15 and is full again in 2 s.
    let c = cmd(&["CL.THROTTLE", "user123", "15", "30", "60", "1"]);
    let (out, _) = ask(&mut e, &mut w, &mut r, c.as_bytes(), NOW);
    assert_eq!(out, "*5\r\n:0\r\n:16\r\n:15\r\n:-1\r\n:2\r\n");
    // 16 fit at once; the 17th is limited and told to retry in 2 s.
    let (out, _) = ask(&mut e, &mut w, &mut r, c.repeat(15).as_bytes(), NOW);
    assert!(
        out.ends_with("*5\r\n:0\r\n:16\r\n:0\r\n:-1\r\n:32\r\n"),
        "{out}"
    );
    let (out, _) = ask(&mut e, &mut w, &mut r, c.as_bytes(), NOW);
    assert_eq!(out, "*5\r\n:1\r\n:16\r\n:0\r\n:2\r\n:32\r\n");
    // Two seconds later one more fits; a quantity above the limit never does.
    let (out, _) = ask(&mut e, &mut w, &mut r, c.as_bytes(), NOW + 2_000);
    assert_eq!(out, "*5\r\n:0\r\n:16\r\n:0\r\n:-1\r\n:32\r\n");
    let big = cmd(&["CL.THROTTLE", "other", "1", "1", "1", "5"]);
    let (out, _) = ask(&mut e, &mut w, &mut r, big.as_bytes(), NOW);
    assert_eq!(out, "*5\r\n:1\r\n:2\r\n:2\r\n:-1\r\n:0\r\n");
    // Binary keys are keys; bad numbers are errors and the connection stays.
    let bin = "*6\r\n$11\r\nCL.THROTTLE\r\n$3\r\n\x00\x01\x02\r\n$1\r\n0\r\n$1\r\n1\r\n$1\r\n1\r\n$1\r\n1\r\n";
    let (out, _) = ask(&mut e, &mut w, &mut r, bin.as_bytes(), NOW);
    assert!(out.starts_with("*5\r\n:0\r\n:1\r\n"), "{out}");
    let bad = cmd(&["CL.THROTTLE", "k", "x", "1", "1"]);
    let (out, s) = ask(&mut e, &mut w, &mut r, bad.as_bytes(), NOW);
    assert_eq!(out, "-ERR max_burst must be an integer\r\n");
    assert!(!s.too_long);
    assert_eq!(r.throttles.len(), 2, "a limited request stores nothing");
}

#[test]
fn kiln_acquire_and_pick_answer_arrays() {
    let (mut e, mut w, mut r) = setup();
    let input = [
        cmd(&["KILN.ACQUIRE", A, "gmail.com"]),
        cmd(&["KILN.PICK", "tx", "gmail.com"]),
        cmd(&["KILN.PICK", "tx", "gmail.com"]),
        cmd(&["KILN.ACQUIRE", "192.0.2.99", "gmail.com"]),
        cmd(&["KILN.PICK", "nope", "gmail.com"]),
    ]
    .concat();
    let (out, _) = ask(&mut e, &mut w, &mut r, input.as_bytes(), NOW);
    let expected = format!(
        "*5\r\n:1\r\n$7\r\ngranted\r\n:0\r\n$10\r\n{A}\r\n$6\r\ngoogle\r\n\
         *6\r\n:1\r\n$7\r\ngranted\r\n:0\r\n$10\r\n{A}\r\n$6\r\ngoogle\r\n$7\r\nwarming\r\n"
    );
    assert!(out.starts_with(&expected), "{out}");
    assert!(out.contains("*6\r\n:0\r\n$9\r\ndaily_cap\r\n"), "{out}");
    assert!(
        out.contains("-ERR ip: 192.0.2.99 is not a sending IP"),
        "{out}"
    );
    assert!(out.ends_with("-ERR unknown pool 'nope'\r\n"), "{out}");
    let granted: u64 = w.take_tallies().iter().map(|t| t.1.granted).sum();
    assert_eq!(granted, 2);
}

#[test]
fn a_suppressed_recipient_is_refused_and_charges_nothing() {
    let (mut e, mut w, mut r) = setup();
    let gone = w.suppress.fingerprint(b"", b"gone@gmail.com");
    w.suppress
        .insert(gone, crate::suppress::Event::HardBounce, None)
        .unwrap();
    let news = w.suppress.fingerprint(b"news", b"later@gmail.com");
    w.suppress
        .insert(news, crate::suppress::Event::Unsubscribe, None)
        .unwrap();
    let input = [
        cmd(&["KILN.PICK", "tx", "gone@Gmail.com"]),
        cmd(&["KILN.ACQUIRE", A, "gone@gmail.com"]),
        cmd(&["KILN.PICK", "tx/news", "later@gmail.com"]),
        cmd(&["KILN.PICK", "tx", "later@gmail.com"]), // not listed globally: granted
        cmd(&[
            "KILN.SUPPRESSED",
            "news",
            "later@gmail.com",
            "ok@gmail.com",
            "x@",
            "gone@gmail.com",
        ]),
        cmd(&["KILN.SUPPRESSED", "", "later@gmail.com"]),
        cmd(&["KILN.PICK", "tx", "@gmail.com"]),
    ]
    .concat();
    let (out, _) = ask(&mut e, &mut w, &mut r, input.as_bytes(), NOW);
    let pick = "*7\r\n:0\r\n$10\r\nsuppressed\r\n:-1\r\n$0\r\n\r\n$0\r\n\r\n$0\r\n\r\n";
    let acquire = "*6\r\n:0\r\n$10\r\nsuppressed\r\n:-1\r\n$0\r\n\r\n$0\r\n\r\n";
    let expected = format!(
        "{pick}$11\r\nhard_bounce\r\n{acquire}$11\r\nhard_bounce\r\n\
         {pick}$11\r\nunsubscribe\r\n\
         *6\r\n:1\r\n$7\r\ngranted\r\n:0\r\n$10\r\n{A}\r\n$6\r\ngoogle\r\n$7\r\nwarming\r\n\
         *4\r\n$11\r\nunsubscribe\r\n$-1\r\n$7\r\ninvalid\r\n$11\r\nhard_bounce\r\n\
         *1\r\n$-1\r\n-ERR "
    );
    assert!(out.starts_with(&expected), "{out}");
    let granted: u64 = w.take_tallies().iter().map(|t| t.1.granted).sum();
    assert_eq!(granted, 1, "only the recipient not listed was charged");
}

#[test]
fn kiln_limits_report_and_classify() {
    let (mut e, mut w, mut r) = setup();
    let input = [
        cmd(&["KILN.ACQUIRE", A, "gmail.com"]),
        cmd(&["KILN.LIMITS", A, "gmail.com"]),
        cmd(&[
            "KILN.REPORT",
            A,
            "gmail.com",
            "deferred",
            "421",
            "4.7.28",
            "slow down",
        ]),
        cmd(&["KILN.REPORT", A, "gmail.com", "nope"]),
        cmd(&["KILN.CLASSIFY", "550 5.1.1 user unknown"]),
        cmd(&["KILN.LIMITS", "192.0.2.99", "gmail.com"]),
    ]
    .concat();
    let (out, _) = ask(&mut e, &mut w, &mut r, input.as_bytes(), NOW);
    let replies: Vec<&str> = out.split_inclusive("\r\n").collect();
    // ACQUIRE's 9 lines, then LIMITS: daily cap 2, 1 used, no hourly cap, 0, not suspended.
    assert_eq!(
        replies[9..16].concat(),
        "*6\r\n:2\r\n:1\r\n:-1\r\n:1\r\n:0\r\n:0\r\n"
    );
    assert_eq!(replies[16..18].concat(), "$6\r\ngoogle\r\n");
    assert!(
        replies[18].starts_with("-ERR result: must be delivered"),
        "{}",
        replies[20]
    );
    // No rules compiled here: unclassified, no scope, no rule.
    assert_eq!(
        replies[19..24].concat(),
        "*3\r\n$12\r\nunclassified\r\n$-1\r\n$-1\r\n"
    );
    assert!(
        replies[24].starts_with("-ERR ip: 192.0.2.99"),
        "{}",
        replies[25]
    );
    let reports = w.take_reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (reports[0].code, reports[0].enhanced.as_deref()),
        (Some(421), Some("4.7.28"))
    );
}

#[test]
fn kiln_keys_in_cl_throttle_are_warm_up_keys() {
    let (mut e, mut w, mut r) = setup();
    let key = "kiln/192.0.2.10/gmail.com";
    // KumoMTA names its throttles NAME:limit:burst:period; the suffix is ignored.
    let kumo = "kiln/192.0.2.10/gmail.com:1:1:60";
    let input = [
        cmd(&["CL.THROTTLE", key, "0", "1", "1"]),
        cmd(&["CL.THROTTLE", kumo, "0", "1", "1", "1"]),
        cmd(&["CL.THROTTLE", key, "0", "1", "1"]),
    ]
    .concat();
    let (out, _) = ask(&mut e, &mut w, &mut r, input.as_bytes(), NOW);
    // Daily cap 2: two grants, then limited with no known end (no calendar): ask in 5 min.
    assert_eq!(
        out,
        "*5\r\n:0\r\n:2\r\n:1\r\n:-1\r\n:-1\r\n\
         *5\r\n:0\r\n:2\r\n:0\r\n:-1\r\n:-1\r\n\
         *5\r\n:1\r\n:2\r\n:0\r\n:300\r\n:-1\r\n"
    );
    let k = e.key(A, "google").unwrap();
    assert_eq!(e.usage(k).unwrap().day_used, 2);
    assert_eq!(r.stats.throttled, 1);
    // With a calendar the reset is the time to the next hour and a cap's wait is known.
    e.set_calendar(
        &[NOW - 1_000, NOW + 3_600_000 - 1_000],
        &[NOW - 1_000, NOW + 86_400_000],
    )
    .unwrap();
    let (out, _) = ask(
        &mut e,
        &mut w,
        &mut r,
        cmd(&["CL.THROTTLE", key, "0", "1", "1"]).as_bytes(),
        NOW,
    );
    assert_eq!(out, "*5\r\n:0\r\n:2\r\n:1\r\n:-1\r\n:3599\r\n");
    let bad = [
        cmd(&["CL.THROTTLE", "kiln/192.0.2.10", "0", "1", "1"]),
        cmd(&["CL.THROTTLE", "kiln/192.0.2.99/gmail.com", "0", "1", "1"]),
        cmd(&["CL.THROTTLE", key, "0", "1", "1", "0"]),
        cmd(&["CL.THROTTLE", key, "x", "1", "1"]),
        cmd(&["PING"]),
    ]
    .concat();
    let (out, s) = ask(&mut e, &mut w, &mut r, bad.as_bytes(), NOW);
    assert_eq!(s.consumed, bad.len());
    assert_eq!(
        out,
        "-ERR a kiln/ throttle key is kiln/IP/DOMAIN (the sending IP and a recipient domain)\r\n\
         -ERR ip: 192.0.2.99 is not a sending IP of this daemon's plan\r\n\
         -ERR quantity must be a whole number from 1 for a kiln/ key\r\n\
         -ERR max_burst must be an integer\r\n+PONG\r\n"
    );
}

#[test]
fn command_info_names_the_commands_kiln_answers() {
    let (mut e, mut w, mut r) = setup();
    let input = cmd(&["COMMAND", "INFO", "CL.THROTTLE", "get"]);
    let (out, _) = ask(&mut e, &mut w, &mut r, input.as_bytes(), NOW);
    assert_eq!(
        out,
        "*2\r\n*6\r\n$11\r\ncl.throttle\r\n:-5\r\n*0\r\n:1\r\n:1\r\n:1\r\n$-1\r\n"
    );
}
