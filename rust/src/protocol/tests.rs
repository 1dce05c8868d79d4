use super::*;
use crate::classify::RuleDef;
use crate::limiter::MAX_NOW_MS;

const NOW: u64 = 1_800_000_000_000;

fn setup() -> (Engine, Wire) {
    let mut e = Engine::new();
    let google = e.provider("google").unwrap();
    let default = e.provider("default").unwrap();
    let k = e.key("192.0.2.10", "google").unwrap();
    e.set_limits(k, None, 1, None, Some(2)).unwrap();
    e.define_pool("tx", &[("192.0.2.10", 1, true)], None)
        .unwrap();
    let mut w = Wire::new();
    w.set_default_provider(default);
    w.set_route("gmail.com", Route::Provider(google), u64::MAX)
        .unwrap();
    w.set_route("example.com", Route::NullMx, u64::MAX).unwrap();
    w.set_upcall_ops(&["status"]).unwrap();
    (e, w)
}

fn serve(e: &mut Engine, w: &mut Wire, input: &str) -> (String, Served) {
    let mut out = Vec::new();
    let s = w.serve(e, input.as_bytes(), NOW, &mut out).unwrap();
    (String::from_utf8(out).unwrap(), s)
}

#[test]
fn acquire_until_the_cap_then_deny() {
    let (mut e, mut w) = setup();
    let req = "{\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"domain\":\"Gmail.COM.\",\"id\":7}\n";
    let (out, s) = serve(&mut e, &mut w, &req.repeat(3));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(s.consumed, req.len() * 3);
    assert_eq!(
        lines[0],
        "{\"id\":7,\"ok\":true,\"granted\":1,\"reason\":\"granted\",\"retry_after_ms\":0,\"ip\":\"192.0.2.10\",\"provider\":\"google\"}"
    );
    assert!(
        lines[2].contains("\"granted\":0,\"reason\":\"daily_cap\""),
        "{out}"
    );
    let t = w.take_tallies();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].1.granted, 2);
    assert!(w.take_tallies().is_empty());
}

#[test]
fn errors_name_the_field_and_echo_the_id() {
    let (mut e, mut w) = setup();
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"acquire\",\"id\":\"a\",\"ip\":\"192.0.2.10\",\"domain\":\"gmail.com\",\"n\":\"5\"}\n\
         {\"op\":\"acquire\",\"ip\":\"192.0.2.99\",\"domain\":\"gmail.com\"}\n\
         {\"op\":\"nope\"}\n\
         not json\n\
         [1,2]\n\
         {\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"domain\":\"gmail.com\",\"count\":2}\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert_eq!(
        lines[0],
        "{\"id\":\"a\",\"ok\":false,\"error\":\"n: must be a whole number, got \\\"5\\\"\"}"
    );
    assert!(
        lines[1].contains("192.0.2.99 is not a sending IP"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("unknown operation \\\"nope\\\""),
        "{}",
        lines[2]
    );
    assert!(lines[3].contains("invalid JSON"), "{}", lines[3]);
    assert!(lines[4].contains("must be a JSON object"), "{}", lines[4]);
    assert!(
        lines[5].contains("count: not a field of acquire"),
        "{}",
        lines[5]
    );
    assert_eq!(w.stats.errors, 6);
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":5,\"id\":1}\n{\"op\":\"ping\",\"n\":1}\n",
    );
    assert_eq!(
        out,
        "{\"id\":1,\"ok\":false,\"error\":\"op: must be a string, got 5\"}\n\
         {\"ok\":false,\"error\":\"n: not a field of ping (it takes none)\"}\n"
    );
}

#[test]
fn partial_lines_wait_and_upcalls_stop_the_buffer() {
    let (mut e, mut w) = setup();
    let input = "{\"op\":\"ping\"}\r\n\n{\"op\":\"status\",\"id\":1}\n{\"op\":\"ping\"}\n{\"op\":";
    let (out, s) = serve(&mut e, &mut w, input);
    assert_eq!(out, "{\"ok\":true}\n");
    let (a, b) = s.upcall.unwrap();
    assert_eq!(&input[a..b], "{\"op\":\"status\",\"id\":1}");
    let rest = &input[s.consumed..];
    let (out, s) = serve(&mut e, &mut w, rest);
    assert_eq!(out, "{\"ok\":true}\n");
    assert_eq!(&rest[s.consumed..], "{\"op\":");
    assert!(!s.too_long);
}

#[test]
fn upcall_range_without_carriage_return() {
    let (mut e, mut w) = setup();
    let input = "{\"op\":\"status\"}\r\n";
    let (_, s) = serve(&mut e, &mut w, input);
    let (a, b) = s.upcall.unwrap();
    assert_eq!(&input[a..b], "{\"op\":\"status\"}");
    assert_eq!(s.consumed, input.len());
}

#[test]
fn upcall_lines_with_a_repeated_field_are_refused() {
    let (mut e, mut w) = setup();
    let (out, s) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"status\",\"op\":\"nope\",\"id\":3}\n{\"op\":\"status\",\"n\":\"x\"}\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "{\"id\":3,\"ok\":false,\"error\":\"op: given twice\"}",
            "{\"ok\":false,\"error\":\"n: must be a whole number, got \\\"x\\\"\"}"
        ]
    );
    assert_eq!(s.upcall, None);
}

#[test]
fn reports_naming_a_recipient_go_to_python_once_asked_for() {
    let (mut e, mut w) = setup();
    let with = "{\"op\":\"report\",\"ip\":\"192.0.2.10\",\"domain\":\"gmail.com\",\
                \"result\":\"bounced\",\"address\":\"a@gmail.com\"}\n";
    let without = "{\"op\":\"report\",\"ip\":\"192.0.2.10\",\"domain\":\"gmail.com\",\
                   \"result\":\"delivered\"}\n";
    // Not asked for: the core refuses the address rather than drop the recipient.
    let (out, s) = serve(&mut e, &mut w, with);
    assert!(
        out.contains("address: a report naming its recipient"),
        "{out}"
    );
    assert_eq!(s.upcall, None);
    // Only `ADDRESS_UPCALLS` of the core's operations may be named.
    assert!(w.set_upcall_ops(&["status", "acquire"]).is_err());
    w.set_upcall_ops(&["status", "report"]).unwrap();
    let (out, s) = serve(&mut e, &mut w, without);
    assert_eq!(out, "{\"ok\":true,\"provider\":\"google\"}\n");
    assert_eq!(s.upcall, None);
    let (out, s) = serve(&mut e, &mut w, with);
    assert_eq!(out, "");
    let (a, b) = s.upcall.unwrap();
    assert_eq!(&with[a..b], with.trim_end());
    // The unknown-op list names report once.
    let (out, _) = serve(&mut e, &mut w, "{\"op\":\"nope\"}\n");
    assert_eq!(out.matches("report").count(), 1, "{out}");
}

#[test]
fn the_line_limit_does_not_count_the_terminator() {
    let (mut e, mut w) = setup();
    let pad = |total: usize| {
        let head = "{\"op\":\"ping\",\"id\":\"";
        format!("{head}{}\"}}", "x".repeat(total - head.len() - 2))
    };
    for end in ["\n", "\r\n"] {
        let line = pad(MAX_LINE_BYTES);
        assert_eq!(line.len(), MAX_LINE_BYTES);
        let (out, s) = serve(&mut e, &mut w, &format!("{line}{end}"));
        assert!(out.ends_with(",\"ok\":true}\n"), "{end:?}");
        assert!(!s.too_long);
        // Waiting for the rest of a terminator is not yet too long.
        let (_, s) = serve(&mut e, &mut w, &format!("{line}{}", &end[..end.len() - 1]));
        assert_eq!((s.consumed, s.too_long), (0, false), "{end:?}");
        let longer = pad(MAX_LINE_BYTES + 1);
        let (out, s) = serve(&mut e, &mut w, &format!("{longer}{end}"));
        assert_eq!((out.as_str(), s.consumed, s.too_long), ("", 0, true));
        let (_, s) = serve(&mut e, &mut w, &format!("{longer}\r"));
        assert!(s.too_long);
    }
}

#[test]
fn long_lines_close() {
    let (mut e, mut w) = setup();
    let long = format!("{{\"op\":\"ping\"}}\n{}\n", "x".repeat(MAX_LINE_BYTES + 1));
    let (out, s) = serve(&mut e, &mut w, &long);
    assert_eq!(out, "{\"ok\":true}\n");
    assert!(s.too_long);
    assert_eq!(s.consumed, "{\"op\":\"ping\"}\n".len());
    let partial = "y".repeat(MAX_LINE_BYTES + 1);
    let (_, s) = serve(&mut e, &mut w, &partial);
    assert!(s.too_long);
}

#[test]
fn unknown_domains_count_as_default_and_queue_for_lookup() {
    let (mut e, mut w) = setup();
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"route\",\"domain\":\"user@Corp.Example\"}\n{\"op\":\"route\",\"domain\":\"corp.example\"}\n",
    );
    assert!(
        out.starts_with(
            "{\"ok\":true,\"domain\":\"corp.example\",\"provider\":\"default\",\"resolved\":false}"
        ),
        "{out}"
    );
    assert_eq!(w.take_unresolved(), vec![Box::from("corp.example")]);
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"domain\":\"example.com\"}\n",
    );
    assert!(out.contains("\"reason\":\"null_mx\""), "{out}");
}

/// The provider handle `route` gives for `domain` (panics on a null MX).
fn provider_of(w: &mut Wire, domain: &str, now_ms: u64) -> u16 {
    match w.route(domain, now_ms).unwrap() {
        Route::Provider(p) => p,
        Route::NullMx => panic!("{domain} has a null MX"),
    }
}

#[test]
fn the_route_table_is_bounded_and_static_routes_stay() {
    let (e, mut w) = setup();
    let google = e.provider_handle("google").unwrap();
    let default = e.provider_handle("default").unwrap();
    assert_eq!(w.max_routes(), MAX_ROUTES);
    w.set_max_routes(100).unwrap();
    w.set_route("static.example", Route::Provider(google), MAX_NOW_MS)
        .unwrap();
    let statics = 3; // gmail.com and example.com from setup, and static.example
    for i in 0..1_000 {
        w.set_route(
            &format!("d{i}.example"),
            Route::Provider(google),
            NOW + 60_000 + i, // soonest expiry first among equally old routes
        )
        .unwrap();
        assert!(w.route_count() <= 100 + statics, "{i}: {}", w.route_count());
    }
    assert!(w.route_count() > statics + 100 - 100 / 8 - 1);
    assert_eq!(
        w.stats.routes_evicted,
        (1_000 + statics - w.route_count()) as u64
    );
    // The static routes are all there; the newest learned one is too.
    for d in ["gmail.com", "static.example", "d999.example"] {
        assert_eq!(provider_of(&mut w, d, NOW), google, "{d}");
    }
    assert_eq!(w.route("example.com", NOW).unwrap(), Route::NullMx);
    assert!(w.take_unresolved().is_empty());
    // An evicted domain is default again and queued for a new lookup.
    assert_eq!(provider_of(&mut w, "d0.example", NOW), default);
    assert_eq!(w.take_unresolved(), vec![Box::from("d0.example")]);
    // Static routes alone may exceed the bound: they are the plan's own table.
    w.set_max_routes(1).unwrap();
    for i in 0..10 {
        w.set_route(&format!("s{i}.example"), Route::NullMx, u64::MAX)
            .unwrap();
    }
    assert_eq!(w.route_count(), statics + 10);
    assert_eq!(
        w.set_max_routes(0).unwrap_err().to_string(),
        "max_routes: must be at least 1, got 0"
    );
}

#[test]
fn a_full_table_drops_expired_routes_first() {
    let (e, mut w) = setup();
    let google = e.provider_handle("google").unwrap();
    w.set_max_routes(10).unwrap();
    for i in 0..5 {
        w.set_route(&format!("soon{i}.example"), Route::NullMx, NOW + 10)
            .unwrap();
        w.set_route(
            &format!("late{i}.example"),
            Route::Provider(google),
            NOW + 1_000_000,
        )
        .unwrap();
    }
    // The wire learns the time from what it serves.
    provider_of(&mut w, "gmail.com", NOW + 10);
    w.set_route("new.example", Route::Provider(google), NOW + 1_000_000)
        .unwrap();
    assert_eq!(w.stats.routes_evicted, 5);
    for i in 0..5 {
        assert_eq!(
            provider_of(&mut w, &format!("late{i}.example"), NOW),
            google
        );
    }
    assert_eq!(provider_of(&mut w, "new.example", NOW), google);
    assert_eq!(w.route_count(), 2 + 6);
}

#[test]
fn a_full_table_keeps_recently_used_routes_over_unused_ones() {
    let (e, mut w) = setup();
    let google = e.provider_handle("google").unwrap();
    w.set_max_routes(8).unwrap();
    let far = NOW + 1_000_000;
    for i in 0..8 {
        w.set_route(&format!("a{i}.example"), Route::Provider(google), far + i)
            .unwrap();
    }
    // Full: a sweep makes room before b0 goes in, evicting the soonest expiry.
    w.set_route("b0.example", Route::Provider(google), far)
        .unwrap();
    assert_eq!(w.stats.routes_evicted, 1);
    assert!(w.routes.get("a0.example").is_none());
    // a1 is used now, so the next sweep takes a2 (unused since) although a1 expires first.
    provider_of(&mut w, "a1.example", NOW);
    w.set_route("b1.example", Route::Provider(google), far)
        .unwrap();
    assert_eq!(w.stats.routes_evicted, 2);
    assert!(w.routes.get("a1.example").is_some());
    assert!(w.routes.get("a2.example").is_none());
    for d in ["b0.example", "b1.example", "a7.example"] {
        assert!(w.routes.get(d).is_some(), "{d}");
    }
    // A smaller bound sweeps at once; replacing a route never evicts.
    w.set_max_routes(4).unwrap();
    assert_eq!(w.route_count(), 2 + 3);
    w.set_route("b1.example", Route::NullMx, far).unwrap();
    assert_eq!(w.route_count(), 2 + 3);
    assert_eq!(w.stats.routes_evicted, 2 + 8 - 3);
    // A reload gives the memory back.
    w.clear_routes();
    assert_eq!((w.route_count(), w.routes.pinned), (0, 0));
}

#[test]
fn the_lookup_queue_is_bounded_and_overflow_is_counted() {
    let (_, mut w) = setup();
    for i in 0..MAX_UNRESOLVED {
        w.route(&format!("q{i}.example"), NOW).unwrap();
    }
    // Seeing a queued domain again is no overflow; a new one is.
    w.route("q0.example", NOW).unwrap();
    assert_eq!(w.stats.unresolved_dropped, 0);
    w.route("late.example", NOW).unwrap();
    w.route("late.example", NOW).unwrap();
    assert_eq!(w.stats.unresolved_dropped, 2);
    let taken = w.take_unresolved();
    assert_eq!(taken.len(), MAX_UNRESOLVED);
    assert_eq!(taken[0].as_ref(), "q0.example");
    // After a drain the dropped domain is queued when seen again.
    w.route("late.example", NOW).unwrap();
    assert_eq!(w.take_unresolved(), vec![Box::from("late.example")]);
    assert_eq!(w.stats.unresolved_dropped, 2);
}

#[test]
fn reports_tally_and_keep_pushback() {
    let (mut e, mut w) = setup();
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"report\",\"ip\":\"192.0.2.10\",\"domain\":\"gmail.com\",\"result\":\"delivered\",\"n\":5}\n\
         {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":421,\"enhanced\":\"4.7.28\",\"text\":\"slow down\"}\n\
         {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":42}\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "{\"ok\":true,\"provider\":\"google\"}");
    assert!(
        lines[2].contains("code: must be an SMTP reply code"),
        "{out}"
    );
    let t = w.take_tallies();
    assert_eq!((t[0].1.delivered, t[0].1.deferred), (5, 1));
    let r = w.take_reports();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].enhanced.as_deref(), Some("4.7.28"));
    assert_eq!(r[0].code, Some(421));
}

/// MTA log templates fill `code`, `enhanced` and `text` with `""` when the reply had none:
/// that is the field left out, never an error; given twice is still an error.
#[test]
fn empty_reply_fields_count_as_left_out() {
    let (mut e, mut w) = setup();
    w.set_rules(rules()).unwrap();
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"bounced\",\"code\":550,\"enhanced\":\"\",\"text\":\"\"}\n\
         {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":\"\",\"enhanced\":\"\",\"text\":\"\"}\n\
         {\"op\":\"classify\",\"text\":\"421 unusual rate\",\"code\":\"\",\"enhanced\":\"\"}\n\
         {\"op\":\"classify\",\"text\":\"\",\"code\":421}\n\
         {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":\"\",\"code\":421}\n\
         {\"op\":\"report\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"result\":\"deferred\",\"code\":\" \"}\n\
         {\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"provider\":\"google\",\"code\":\"\"}\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert_eq!(lines[0], "{\"ok\":true,\"provider\":\"google\"}");
    assert_eq!(lines[1], "{\"ok\":true,\"provider\":\"google\"}");
    assert!(lines[2].contains("\"class\":\"rate_limit_rep\""), "{out}");
    assert!(
        lines[2].contains("\"normalised\":\"421 unusual rate\""),
        "{out}"
    );
    assert!(lines[3].contains("text: missing (the SMTP reply)"), "{out}");
    assert!(lines[4].contains("code: given twice"), "{out}");
    assert!(lines[5].contains("code: must be a whole number"), "{out}");
    assert!(lines[6].contains("code: not a field of acquire"), "{out}");
    let r = w.take_reports();
    assert_eq!(r.len(), 2);
    assert_eq!(
        (r[0].code, r[0].enhanced.as_deref(), r[0].text.as_deref()),
        (Some(550), None, None)
    );
    assert_eq!(
        (r[1].code, r[1].enhanced.as_deref(), r[1].text.as_deref()),
        (None, None, None)
    );
}

#[test]
fn pick_names_the_tier() {
    let (mut e, mut w) = setup();
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"pick\",\"pool\":\"tx\",\"domain\":\"gmail.com\"}\n{\"op\":\"pick\",\"pool\":\"nope\",\"domain\":\"gmail.com\"}\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].ends_with("\"provider\":\"google\",\"pool\":\"tx\",\"tier\":\"warming\"}"),
        "{out}"
    );
    assert!(lines[1].contains("unknown pool"), "{out}");
}

fn rules() -> Vec<RuleDef> {
    use crate::classify::{Class, CodeSpec, Scope};
    let rule = |id: &str, providers: Option<&[&str]>, text: &str, class, scope| RuleDef {
        id: id.to_owned(),
        providers: providers.map(|p| p.iter().map(|s| (*s).to_owned()).collect()),
        codes: Some(vec![CodeSpec::Family(4), CodeSpec::Family(5)]),
        enhanced: None,
        text: text.to_owned(),
        class,
        scope,
        fallback: false,
    };
    vec![
        rule(
            "google-4.7.28-ip",
            Some(&["google"]),
            r"^421 4\.7\.28 .*unusual rate .*your IP address",
            Class::RateLimitRep,
            Scope::Ip,
        ),
        rule(
            "ms-650",
            Some(&["microsoft-consumer", "microsoft-365"]),
            "rate limited due to IP reputation",
            Class::RateLimitRep,
            Scope::Ip,
        ),
        rule(
            "generic-rate",
            None,
            "unusual rate|rate limited",
            Class::RateLimitRep,
            Scope::Ip,
        ),
    ]
}

#[test]
fn classify_names_class_scope_rule_and_every_match() {
    let (mut e, mut w) = setup();
    w.set_rules(rules()).unwrap();
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"classify\",\"id\":1,\"text\":\"Gmail has detected an unusual rate of mail from your IP address 2001:db8::25.\",\"code\":421,\"enhanced\":\"4.7.28\",\"domain\":\"gmail.com\"}\n\
         {\"op\":\"classify\",\"text\":\"421-4.7.28 Gmail has detected an unusual rate of 421-4.7.28 mail from your IP address\"}\n\
         {\"op\":\"classify\",\"text\":\"451 4.7.650 The mail server has been temporarily rate limited due to IP reputation.\",\"provider\":\"microsoft-365\"}\n\
         {\"op\":\"classify\",\"text\":\"250 2.0.0 OK\",\"provider\":\"google\"}\n\
         {\"op\":\"classify\",\"text\":\"connect to mx[192.0.2.1]:25: Connection timed out\",\"code\":421}\n\
         {\"op\":\"classify\",\"text\":\"421 unusual rate\",\"domain\":\"example.com\"}\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "{\"id\":1,\"ok\":true,\"class\":\"rate_limit_rep\",\"scope\":\"ip\",\"rule\":\"google-4.7.28-ip\",\"matched\":[\"google-4.7.28-ip\",\"generic-rate\"],\"normalised\":\"421 4.7.28 Gmail has detected an unusual rate of mail from your IP address 2001:db8::25.\",\"provider\":\"google\"}"
    );
    assert!(
        lines[1].contains("\"rule\":\"google-4.7.28-ip\"")
            && lines[1].contains("\"normalised\":\"421 4.7.28 Gmail has detected an unusual rate of mail from your IP address\"")
            && lines[1].ends_with("\"provider\":null}"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("\"matched\":[\"ms-650\",\"generic-rate\"]"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with(
            "{\"ok\":true,\"class\":\"unclassified\",\"scope\":null,\"rule\":null,\"matched\":[]"
        ),
        "{}",
        lines[3]
    );
    assert!(lines[4].contains("\"class\":\"internal\""), "{}", lines[4]);
    // A null-MX domain has no provider: only rules without a provider list apply.
    assert!(
        lines[5].contains("\"rule\":\"generic-rate\"") && lines[5].ends_with("\"provider\":null}"),
        "{}",
        lines[5]
    );
}

#[test]
fn classify_errors_name_the_field() {
    let (mut e, mut w) = setup();
    w.set_rules(rules()).unwrap();
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"classify\",\"id\":2}\n\
         {\"op\":\"classify\",\"text\":5}\n\
         {\"op\":\"classify\",\"text\":\"x\",\"code\":\"421\"}\n\
         {\"op\":\"classify\",\"text\":\"x\",\"code\":99}\n\
         {\"op\":\"classify\",\"text\":\"x\",\"enhanced\":\"4.7\"}\n\
         {\"op\":\"classify\",\"text\":\"x\",\"provider\":\"gmail\"}\n\
         {\"op\":\"classify\",\"text\":\"x\",\"provider\":\"google\",\"domain\":\"gmail.com\"}\n\
         {\"op\":\"classify\",\"text\":\"x\",\"ip\":\"192.0.2.10\"}\n\
         {\"op\":\"nope\"}\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 9, "{out}");
    assert_eq!(
        lines[0],
        "{\"id\":2,\"ok\":false,\"error\":\"text: missing (the SMTP reply)\"}"
    );
    assert!(
        lines[1].contains("text: must be a string, got 5"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("code: must be a whole number"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].contains("code: must be an SMTP reply code 200-599, got 99"),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].contains("enhanced: must be an enhanced status code"),
        "{}",
        lines[4]
    );
    assert!(
        lines[5].contains("provider: unknown provider \\\"gmail\\\""),
        "{}",
        lines[5]
    );
    assert!(
        lines[6].contains("give domain or provider, not both"),
        "{}",
        lines[6]
    );
    assert!(
        lines[7].contains(
            "ip: not a field of classify (fields: text, code, enhanced, domain, provider)"
        ),
        "{}",
        lines[7]
    );
    assert!(
        lines[8].contains("acquire, pick, report, route, ping, classify, status"),
        "{}",
        lines[8]
    );
}

#[test]
fn classify_without_rules_is_unclassified_and_bad_rules_keep_the_old() {
    let (mut e, mut w) = setup();
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"classify\",\"text\":\"421 unusual rate\"}\n",
    );
    assert!(out.contains("\"class\":\"unclassified\""), "{out}");
    w.set_rules(rules()).unwrap();
    let mut bad = rules();
    bad[1].text = "(".to_owned();
    let err = w.set_rules(bad).unwrap_err().to_string();
    assert!(err.contains("rule \"ms-650\": text:"), "{err}");
    assert_eq!(w.classifier().len(), 3);
}

#[test]
fn invalid_utf8_and_junk_get_errors() {
    let (mut e, mut w) = setup();
    let mut out = Vec::new();
    let s = w
        .serve(
            &mut e,
            b"\xff\xfe\n\x00\x01\x02\n{\"op\":\"ping\"}\n",
            NOW,
            &mut out,
        )
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].contains("not valid UTF-8"));
    assert!(lines[1].contains("invalid JSON"));
    assert_eq!(lines[2], "{\"ok\":true}");
    assert_eq!(s.consumed, 21);
}

#[test]
fn a_suppressed_address_is_denied_and_charges_nothing() {
    let (mut e, mut w) = setup();
    let fp = w.suppress.fingerprint(b"", b"Ann@xn--bcher-kva.example");
    w.suppress
        .insert(fp, crate::suppress::Event::Complaint, None)
        .unwrap();
    let news = w.suppress.fingerprint(b"news", b"bob@gmail.com");
    w.suppress
        .insert(news, crate::suppress::Event::Unsubscribe, None)
        .unwrap();
    let (out, _) = serve(
        &mut e,
        &mut w,
        "{\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"address\":\" Ann@BÜCHER.example. \"}\n\
         {\"op\":\"pick\",\"pool\":\"tx\",\"address\":\"bob@gmail.com\",\"scope\":\"news\",\"id\":1}\n\
         {\"op\":\"pick\",\"pool\":\"tx\",\"address\":\"bob@gmail.com\",\"scope\":\"billing\"}\n\
         {\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"address\":\"ann@gmail.com\"}\n\
         {\"op\":\"acquire\",\"ip\":\"192.0.2.10\",\"address\":\"no-at-sign\"}\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "{\"ok\":true,\"granted\":0,\"reason\":\"suppressed\",\"event\":\"complaint\",\"retry_after_ms\":null}"
    );
    assert!(lines[1].starts_with("{\"id\":1,") && lines[1].contains("\"event\":\"unsubscribe\""));
    // Another scope, or a local part in another case, is not suppressed: Gmail is charged.
    assert!(
        lines[2].contains("\"granted\":1") && lines[2].contains("\"google\""),
        "{out}"
    );
    assert!(lines[3].contains("\"granted\":1"), "{out}");
    assert!(
        lines[4].contains("\"ok\":false") && lines[4].contains("no @"),
        "{out}"
    );
    let t = w.take_tallies();
    assert_eq!(t.iter().map(|(_, c)| c.granted).sum::<u64>(), 2);
}

#[test]
fn one_and_many_checks_agree_with_the_normalised_address() {
    let (_e, mut w) = setup();
    w.suppress = SuppressionSet::new((1, 2));
    let listed = [
        ("", "Ann@example.org", crate::suppress::Event::Manual),
        (
            "news",
            "bob@bücher.example",
            crate::suppress::Event::Unsubscribe,
        ),
    ];
    for (scope, address, event) in listed {
        let a = normalise_address(address).unwrap();
        let fp = w.suppress.fingerprint(scope.as_bytes(), a.as_bytes());
        w.suppress.insert(fp, event, None).unwrap();
    }
    let asked = [
        " Ann@EXAMPLE.org. ",
        "ann@example.org",
        "bob@BÜCHER.example",
        "bob@xn--bcher-kva.example",
        "no-at-sign",
        "@example.org",
    ];
    for scope in ["", "news"] {
        let mut many = Vec::new();
        w.suppressed_many(asked.iter().copied(), scope, NOW, &mut many);
        let one: Vec<_> = asked
            .iter()
            .map(|a| w.suppressed(a, scope, NOW).map_err(|_| ()))
            .collect();
        assert_eq!(many, one, "scope {scope:?}");
        let news = (scope == "news").then_some(crate::suppress::Event::Unsubscribe);
        assert_eq!(
            many,
            [
                Ok(Some(crate::suppress::Event::Manual)),
                Ok(None),
                Ok(news),
                Ok(news),
                Err(()),
                Err(())
            ]
        );
    }
}
