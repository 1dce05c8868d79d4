use super::*;
use std::collections::HashMap as Model;

const KEY: (u64, u64) = (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);

/// xorshift64*: a fixed stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn addresses_in_scopes_and_events() {
    let mut s = SuppressionSet::new(KEY);
    let a = s.fingerprint(b"", b"ann@example.com");
    assert_ne!(
        a,
        s.fingerprint(b"", b"Ann@example.com"),
        "the set hashes what it is given"
    );
    assert!(s.insert(a, Event::HardBounce, None).unwrap());
    assert!(
        !s.insert(a, Event::Complaint, None).unwrap(),
        "a later event replaces"
    );
    assert_eq!(s.check(b"", b"ann@example.com", 0), Some(Event::Complaint));
    assert_eq!(
        s.check(b"news", b"ann@example.com", 0),
        Some(Event::Complaint)
    );
    let scoped = s.fingerprint(b"news", b"bob@example.com");
    s.insert(scoped, Event::Unsubscribe, None).unwrap();
    assert_eq!(
        s.check(b"news", b"bob@example.com", 0),
        Some(Event::Unsubscribe)
    );
    assert_eq!(s.check(b"", b"bob@example.com", 0), None);
    assert_eq!(s.check(b"billing", b"bob@example.com", 0), None);
    assert!(s.remove(a));
    assert!(!s.remove(a));
    assert_eq!(s.check(b"", b"ann@example.com", 0), None);
    assert_eq!(s.len(), 1);
}

#[test]
fn soft_bounces_expire_and_a_hard_event_ends_the_expiry() {
    let mut s = SuppressionSet::new(KEY);
    let a = s.fingerprint(b"", b"a@x.org");
    let b = s.fingerprint(b"", b"b@x.org");
    s.insert(a, Event::SoftBounce, Some(1_000)).unwrap();
    s.insert(b, Event::SoftBounce, Some(1_000)).unwrap();
    assert_eq!(s.lookup(a, 999), Some(Event::SoftBounce));
    assert_eq!(s.lookup(a, 1_000), None);
    s.insert(b, Event::HardBounce, None).unwrap();
    assert_eq!(s.lookup(b, 5_000), Some(Event::HardBounce));
    assert_eq!(s.sweep(1_000), 1);
    assert_eq!((s.len(), s.lookup(b, 5_000)), (1, Some(Event::HardBounce)));
}

#[test]
fn the_table_agrees_with_a_model_through_growth_and_deletions() {
    let mut s = SuppressionSet::new(KEY);
    let mut model: Model<u64, Event> = Model::new();
    let mut rng = Rng(7);
    // Few distinct fingerprints, many sharing a home slot: long runs to shift through.
    let fps: Vec<u64> = (0..5_000).map(|i| ((i % 97) << 20 | i) + 1).collect();
    for step in 0..200_000 {
        let fp = fps[(rng.next() % fps.len() as u64) as usize];
        if rng.next() % 3 == 0 {
            assert_eq!(s.remove(fp), model.remove(&fp).is_some(), "step {step}");
        } else {
            let e = [Event::HardBounce, Event::Complaint, Event::Manual][(rng.next() % 3) as usize];
            assert_eq!(
                s.insert(fp, e, None).unwrap(),
                model.insert(fp, e).is_none()
            );
        }
        if step % 10_000 == 0 {
            for &fp in &fps {
                assert_eq!(s.lookup(fp, 0), model.get(&fp).copied(), "step {step}");
            }
        }
    }
    assert_eq!(s.len(), model.len());
    assert_eq!(s.entries().count(), model.len());
}

#[test]
fn snapshots_round_trip_and_refuse_another_key() {
    let mut s = SuppressionSet::new(KEY);
    for i in 0..10_000u32 {
        let fp = s.fingerprint(b"", format!("user{i}@example.com").as_bytes());
        let e = if i % 10 == 0 {
            Event::SoftBounce
        } else {
            Event::HardBounce
        };
        s.insert(fp, e, (e == Event::SoftBounce).then_some(u64::from(i)))
            .unwrap();
    }
    let bytes = s.to_bytes();
    let back = SuppressionSet::from_bytes(KEY, &bytes).unwrap();
    assert_eq!(back.len(), s.len());
    for i in 0..10_000u32 {
        let a = format!("user{i}@example.com");
        assert_eq!(
            back.check(b"", a.as_bytes(), 5_000),
            s.check(b"", a.as_bytes(), 5_000)
        );
    }
    assert!(SuppressionSet::from_bytes((1, 2), &bytes)
        .unwrap_err()
        .contains("another hash key"));
    assert!(SuppressionSet::from_bytes(KEY, &bytes[..bytes.len() - 1]).is_err());
    assert!(SuppressionSet::from_bytes(KEY, b"nonsense").is_err());
}

#[test]
fn a_million_addresses_take_under_32_bytes_each() {
    let mut s = SuppressionSet::new(KEY);
    for i in 0..1_000_000u32 {
        let fp = s.fingerprint(b"", format!("u{i}@example.com").as_bytes());
        s.insert(fp, Event::Unsubscribe, None).unwrap();
    }
    assert_eq!(s.len(), 1_000_000);
    assert!(
        s.bytes() / s.len() < 32,
        "{} bytes an address",
        s.bytes() / s.len()
    );
    assert_eq!(
        s.check(b"", b"u999999@example.com", 0),
        Some(Event::Unsubscribe)
    );
    assert_eq!(s.check(b"", b"u1000000@example.com", 0), None);
}

#[test]
fn a_batch_answers_as_one_check_at_a_time() {
    let mut s = SuppressionSet::new(KEY);
    for (a, scope) in [("a@x.org", ""), ("b@x.org", "news"), ("c@x.org", "")] {
        let fp = s.fingerprint(scope.as_bytes(), a.as_bytes());
        s.insert(fp, Event::Manual, None).unwrap();
    }
    let asked: Vec<&[u8]> = vec![b"a@x.org", b"b@x.org", b"z@x.org", b"c@x.org"];
    for scope in [&b""[..], b"news", b"billing"] {
        let mut out = vec![Some(Event::Complaint)]; // what was there stays
        s.check_batch(scope, &asked, 0, &mut out);
        let one: Vec<Option<Event>> = asked.iter().map(|a| s.check(scope, a, 0)).collect();
        assert_eq!(out[1..], one[..]);
        assert_eq!(out[0], Some(Event::Complaint));
    }
}

#[test]
fn hashing_the_parts_is_hashing_the_joined_address() {
    let s = SuppressionSet::new(KEY);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2_000 {
        // Lengths across SipHash's 8-byte blocks, bytes of any value.
        let mut piece =
            |max: u64| -> Vec<u8> { (0..rng.next() % max).map(|_| rng.next() as u8).collect() };
        let (scope, local, domain) = (piece(12), piece(40), piece(40));
        let joined = [local.as_slice(), b"@", domain.as_slice()].concat();
        assert_eq!(
            s.fingerprint_parts(&scope, &local, &domain),
            s.fingerprint(&scope, &joined),
            "{scope:?} {local:?} {domain:?}"
        );
    }
}

#[test]
fn copying_by_ranges_and_bytes_by_parts_match_the_whole() {
    let mut s = SuppressionSet::new(KEY);
    let mut rng = Rng(42);
    for i in 0..50_000u64 {
        let fp = (rng.next() >> 3).max(1);
        let (event, expiry) = if i % 7 == 0 {
            (Event::SoftBounce, Some(i))
        } else {
            (Event::Manual, None)
        };
        s.insert(fp, event, expiry).unwrap();
    }
    let slots = s.slot_count();
    let mut bigger = s.with_room_for(s.len() * 3);
    let mut bytes = s.bytes_head();
    for start in (0..slots).step_by(1000) {
        let range = start..(start + 1000).min(slots);
        s.copy_slots(range.clone(), &mut bigger).unwrap();
        s.bytes_slots(range, &mut bytes);
    }
    s.bytes_expiries(&mut bytes);
    assert_eq!(bytes, s.to_bytes());
    assert!(bigger.slot_count() > slots && bigger.has_room(s.len()));
    let mut want: Vec<_> = s.entries().collect();
    let mut got: Vec<_> = bigger.entries().collect();
    want.sort_unstable_by_key(|e| e.0);
    got.sort_unstable_by_key(|e| e.0);
    assert_eq!(got, want);
    let back = SuppressionSet::from_bytes(KEY, &bytes).unwrap();
    assert_eq!(back.len(), s.len());
}

#[test]
fn a_big_table_is_mapped_and_answers_in_blocks_as_one_at_a_time() {
    let mut s = SuppressionSet::new(KEY);
    assert!(format!("{s:?}").contains("vector"));
    for i in 0..400_000u32 {
        let fp = s.fingerprint(b"", format!("u{i}@example.com").as_bytes());
        s.insert(fp, Event::HardBounce, None).unwrap();
    }
    assert!(
        format!("{s:?}").contains("mapped"),
        "{} slots",
        s.slot_count()
    );
    // Listed and unlisted, over several blocks and a short last one.
    let fps: Vec<u64> = (0..1_000u32)
        .map(|i| s.fingerprint(b"", format!("u{}@example.com", i * 797).as_bytes()))
        .collect();
    let mut out = vec![Some(Event::Manual)];
    s.lookup_many(&fps, 0, &mut out);
    let one: Vec<Option<Event>> = fps.iter().map(|&fp| s.lookup(fp, 0)).collect();
    assert_eq!(out[1..], one[..]);
    assert!(one.iter().any(Option::is_some) && one.iter().any(Option::is_none));
    let copy = s.clone();
    assert!(copy.entries().eq(s.entries()));
}
