use crate::decision::Reason;

use super::*;

const H: u64 = 3_600_000;

fn engine_with_key() -> (Limiter, u32) {
    let mut l = Limiter::new();
    let k = l.key("192.0.2.10", "google").unwrap();
    (l, k)
}

#[test]
fn key_slot_is_32_bytes() {
    assert_eq!(std::mem::size_of::<KeySlot>(), 32);
}

#[test]
fn keys_intern_once_and_normalise_ips() {
    let mut l = Limiter::new();
    let a = l.key("2001:DB8::1", "google").unwrap();
    let b = l.key("2001:db8::1", "google").unwrap();
    let c = l.key("2001:db8::1", "yahoo").unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(
        l.key_names(a).unwrap(),
        ("2001:db8::1".to_owned(), "google")
    );
    assert!(l.key("not-an-ip", "google").is_err());
    assert!(l.key("192.0.2.1", "").is_err());
}

#[test]
fn unlimited_key_grants() {
    let (mut l, k) = engine_with_key();
    let d = l.acquire(k, 1000, 5).unwrap();
    assert_eq!(d.granted, 1000);
    assert_eq!(l.usage(k).unwrap().day_used, 1000);
}

#[test]
fn hourly_cap_holds_until_the_next_boundary() {
    let (mut l, k) = engine_with_key();
    l.set_limits(k, None, 1, Some(3), None).unwrap();
    l.set_calendar(&[H, 2 * H], &[]).unwrap();
    for _ in 0..3 {
        assert!(l.acquire(k, 1, 10).unwrap().is_granted());
    }
    let d = l.acquire(k, 1, 10).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::HourlyCap, Some(H - 10))
    );
    assert!(l.acquire(k, 1, H).unwrap().is_granted());
    // No boundary after 2H: the window goes on and no retry time is known.
    l.acquire(k, 2, 2 * H).unwrap();
    l.acquire(k, 1, 2 * H).unwrap();
    let d = l.acquire(k, 1, 5 * H).unwrap();
    assert_eq!((d.reason, d.retry_after_ms), (Reason::HourlyCap, None));
}

#[test]
fn rate_spreads_evenly() {
    let (mut l, k) = engine_with_key();
    // 500/h: one every 7.2 s.
    l.set_limits(k, Some((500, H)), 1, None, None).unwrap();
    assert!(l.acquire(k, 1, 0).unwrap().is_granted());
    let d = l.acquire(k, 1, 1000).unwrap();
    assert_eq!((d.reason, d.retry_after_ms), (Reason::Rate, Some(6200)));
    assert!(l.acquire(k, 1, 7200).unwrap().is_granted());
    // Asking for more than the burst can never succeed.
    let d = l.acquire(k, 2, 100_000).unwrap();
    assert_eq!((d.reason, d.retry_after_ms), (Reason::Rate, None));
}

#[test]
fn multiplier_slows_rate_and_caps() {
    let (mut l, k) = engine_with_key();
    l.set_limits(k, Some((10, 1000)), 1, Some(10), None)
        .unwrap();
    l.set_multiplier(k, 0.5).unwrap();
    assert_eq!(l.limits(k).unwrap().multiplier_ppm, 500_000);
    assert!(l.acquire(k, 1, 0).unwrap().is_granted());
    let d = l.acquire(k, 1, 100).unwrap();
    assert_eq!((d.reason, d.retry_after_ms), (Reason::Rate, Some(100)));
    for i in 1..5 {
        assert!(l.acquire(k, 1, i * 200).unwrap().is_granted());
    }
    let d = l.acquire(k, 1, 10_000).unwrap();
    assert_eq!(d.reason, Reason::HourlyCap);
    assert!(l.set_multiplier(k, f64::NAN).is_err());
    assert!(l.set_multiplier(k, 1.5).is_err());
    l.set_multiplier(k, 0.0).unwrap();
    assert_eq!(l.acquire(k, 1, 20_000).unwrap().reason, Reason::Paused);
}

#[test]
fn suspension_and_pause_take_precedence() {
    let (mut l, k) = engine_with_key();
    l.set_limits(k, Some((1, 1000)), 1, None, None).unwrap();
    l.acquire(k, 1, 0).unwrap();
    l.suspend(k, 500).unwrap();
    let d = l.acquire(k, 1, 100).unwrap();
    // Reason: suspended; wait: the longer of suspension (400) and rate (900).
    assert_eq!((d.reason, d.retry_after_ms), (Reason::Suspended, Some(900)));
    assert!(l.acquire(k, 1, 1000).unwrap().is_granted());
    l.set_paused(k, true).unwrap();
    assert_eq!(l.acquire(k, 1, 9000).unwrap().reason, Reason::Paused);
    l.set_paused(k, false).unwrap();
    l.suspend(k, 0).unwrap();
    assert!(l.acquire(k, 1, 9000).unwrap().is_granted());
}

#[test]
fn ip_caps_span_providers() {
    let mut l = Limiter::new();
    let g = l.key("192.0.2.10", "google").unwrap();
    let y = l.key("192.0.2.10", "yahoo").unwrap();
    let ip = l.key_ip(g).unwrap();
    l.set_ip_caps(ip, None, Some(3)).unwrap();
    l.set_calendar(&[], &[86_400_000]).unwrap();
    l.acquire(g, 2, 0).unwrap();
    l.acquire(y, 1, 0).unwrap();
    let d = l.acquire(y, 1, 0).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::IpDailyCap, Some(86_400_000))
    );
    assert!(l.acquire(g, 1, 86_400_000).unwrap().is_granted());
}

#[test]
fn bad_arguments_are_errors() {
    let (mut l, k) = engine_with_key();
    assert!(l.acquire(k + 1, 1, 0).is_err());
    assert!(l.acquire(k, 0, 0).is_err());
    assert!(l.acquire(k, 1, MAX_NOW_MS + 1).is_err());
    assert!(l.set_limits(k, Some((0, 1000)), 1, None, None).is_err());
    assert!(l.set_limits(k, Some((1, 0)), 1, None, None).is_err());
    assert!(l.set_limits(k, None, 0, None, None).is_err());
    assert!(l
        .set_limits(k, None, 1, Some(u64::from(u32::MAX)), None)
        .is_err());
    assert!(l.set_calendar(&[2, 1], &[]).is_err());
}

#[test]
fn profiles_are_shared() {
    let mut l = Limiter::new();
    for i in 0..100 {
        let k = l.key(&format!("10.0.0.{i}"), "google").unwrap();
        l.set_limits(k, Some((500, H)), 10, Some(500), Some(5000))
            .unwrap();
    }
    assert_eq!(l.profiles.len(), 2);
}

/// Hours 0..48 from 0, each labelled with its hour of day; the day starts at 24 H.
fn local_day(l: &mut Limiter) {
    let starts: Vec<u64> = (0..48).map(|i| i * H).collect();
    let of_day: Vec<u8> = (0..48).map(|i| (i % 24) as u8).collect();
    l.set_local_calendar(&starts, &[24 * H], Some(&of_day))
        .unwrap();
}

/// Active hours 07-22 as a mask.
const DAYTIME: u32 = ((1 << 22) - 1) & !((1 << 7) - 1);

#[test]
fn outside_active_hours_waits_for_the_next_opening() {
    let (mut l, k) = engine_with_key();
    l.set_limits(k, Some((60, H)), 1, Some(10), Some(100))
        .unwrap();
    l.set_active_hours(k, DAYTIME).unwrap();
    local_day(&mut l);
    // 03:30: closed until 07:00.
    let d = l.acquire(k, 1, 3 * H + H / 2).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::OutsideActiveHours, Some(3 * H + H / 2))
    );
    assert!(!l.acquire(k, 1, 7 * H - 1).unwrap().is_granted());
    assert!(l.acquire(k, 1, 7 * H).unwrap().is_granted());
    // 21:59:59: the rate's wait (a minute) ends after 22:00, so the wait runs to 07:00.
    assert!(l.acquire(k, 1, 22 * H - 1000).unwrap().is_granted());
    let d = l.acquire(k, 1, 22 * H - 500).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::Rate, Some(31 * H - (22 * H - 500)))
    );
    // A cap whose window ends in a closed hour: the wait runs to the next opening too.
    let (mut l, k) = engine_with_key();
    l.set_limits(k, None, 1, Some(1), None).unwrap();
    l.set_active_hours(k, DAYTIME).unwrap();
    local_day(&mut l);
    assert!(l.acquire(k, 1, 21 * H).unwrap().is_granted());
    let d = l.acquire(k, 1, 21 * H + 5).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::HourlyCap, Some(10 * H - 5))
    );
    // Past the last boundary supplied, no opening is known.
    let d = l.acquire(k, 1, 47 * H + 1).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::OutsideActiveHours, None)
    );
}

#[test]
fn hours_of_day_come_from_the_calendar() {
    let (mut l, k) = engine_with_key();
    l.set_active_hours(k, DAYTIME).unwrap();
    // No hour of day known: a key with active hours is closed, with no known opening;
    // a key open every hour is not.
    let open = l.key("192.0.2.10", "yahoo").unwrap();
    let d = l.acquire(k, 1, 10).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::OutsideActiveHours, None)
    );
    assert!(l.acquire(open, 1, 10).unwrap().is_granted());
    // A DST-like day: hour 2 is skipped (01:00 is followed by 03:00).
    let starts = [H, 2 * H, 3 * H, 8 * H];
    l.set_local_calendar(&starts, &[], Some(&[1, 3, 4, 9]))
        .unwrap();
    l.set_active_hours(k, 1 << 2 | 1 << 9).unwrap();
    let d = l.acquire(k, 1, H).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::OutsideActiveHours, Some(7 * H))
    );
    // Re-supplying the current hour's start names the current hour.
    l.set_local_calendar(&[H, 2 * H], &[], Some(&[9, 10]))
        .unwrap();
    assert!(l.acquire(k, 1, H + 1).unwrap().is_granted());
    // Without hours of day the pending hours are unknown: closed after the boundary.
    l.set_calendar(&[2 * H], &[]).unwrap();
    let d = l.acquire(k, 1, 2 * H).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::OutsideActiveHours, None)
    );
    // An hour of day is known for an hour at most: a calendar that runs out does not
    // keep the key open into hours nobody named.
    l.set_local_calendar(&[3 * H], &[], Some(&[9])).unwrap();
    assert!(l.acquire(k, 1, 4 * H - 1).unwrap().is_granted());
    let d = l.acquire(k, 1, 4 * H).unwrap();
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::OutsideActiveHours, None)
    );
    // Bad hours of day and masks are errors that change nothing.
    assert!(l.set_local_calendar(&[3 * H], &[], Some(&[24])).is_err());
    assert!(l.set_local_calendar(&[3 * H], &[], Some(&[1, 2])).is_err());
    assert!(l.set_active_hours(k, 1 << 24).is_err());
    assert_eq!(l.limits(k).unwrap().active_hours, 1 << 2 | 1 << 9);
}

#[test]
fn pause_and_retirement_come_before_active_hours() {
    let (mut l, k) = engine_with_key();
    l.set_active_hours(k, DAYTIME).unwrap();
    local_day(&mut l);
    l.suspend(k, 9 * H).unwrap();
    let d = l.acquire(k, 1, H).unwrap();
    // Closed and suspended: named for the hours, waiting for the later of the two.
    assert_eq!(
        (d.reason, d.retry_after_ms),
        (Reason::OutsideActiveHours, Some(8 * H))
    );
    l.set_paused(k, true).unwrap();
    assert_eq!((l.acquire(k, 1, H).unwrap().reason), Reason::Paused);
}
