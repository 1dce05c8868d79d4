//! GCRA (generic cell rate algorithm): a rate such as `500/h` spread evenly, with a burst.
//!
//! State is one number per key, the theoretical arrival time `tat_ns`. A rate of `count`
//! per `period_ms` gives an emission interval `T = ceil(period_ms * 1e6 / count)` ns (rounded
//! up so the enforced rate is never above the asked one). With a burst of `B`, a request for
//! `n` at time `t` fits when `max(tat, t) + n*T <= t + B*T`; granting it sets
//! `tat = max(tat, t) + n*T`. So any interval of length `d` admits at most `B + d/T`.

use crate::error::{CoreError, CoreResult};

pub const NS_PER_MS: u64 = 1_000_000;
/// Multipliers are held as parts per million so Rust and the Python model agree exactly.
pub const PPM: u64 = 1_000_000;

/// The emission interval of `count` per `period_ms`, slowed by `multiplier_ppm`.
pub fn interval_ns(count: u64, period_ms: u64, multiplier_ppm: u64) -> CoreResult<u64> {
    if count == 0 {
        return Err(CoreError::bad("rate_count", "must be at least 1, got 0"));
    }
    if period_ms == 0 {
        return Err(CoreError::bad(
            "rate_period_ms",
            "must be at least 1, got 0",
        ));
    }
    if multiplier_ppm == 0 || multiplier_ppm > PPM {
        return Err(CoreError::bad(
            "multiplier",
            format!("must be in (0, 1], got {multiplier_ppm} ppm"),
        ));
    }
    let num = u128::from(period_ms) * u128::from(NS_PER_MS) * u128::from(PPM);
    let den = u128::from(count) * u128::from(multiplier_ppm);
    let t = num.div_ceil(den);
    u64::try_from(t).map_err(|_| CoreError::Overflow {
        what: "rate interval",
    })
}

/// How a rate answers a request for `n` at `t_ns`: `Ok(new_tat)` or `Err(wait_ns)`
/// (`None`: never, because `n` exceeds the burst). `interval_ns == 0` means no rate.
#[inline(always)]
pub fn check(
    tat_ns: u64,
    interval_ns: u64,
    burst: u32,
    t_ns: u64,
    n: u32,
) -> Result<u64, Option<u64>> {
    if interval_ns == 0 {
        return Ok(tat_ns);
    }
    if n > burst {
        return Err(None);
    }
    let start = tat_ns.max(t_ns);
    // u128: interval * burst may exceed u64 for very slow rates with large bursts.
    let new_tat = u128::from(start) + u128::from(n) * u128::from(interval_ns);
    let limit = u128::from(t_ns) + u128::from(burst) * u128::from(interval_ns);
    if new_tat <= limit {
        // new_tat <= limit, and limit fits unless t_ns is near u64::MAX; saturate then.
        Ok(u64::try_from(new_tat).unwrap_or(u64::MAX))
    } else {
        Err(Some(u64::try_from(new_tat - limit).unwrap_or(u64::MAX)))
    }
}

/// Milliseconds to wait, rounded up, for a wait in nanoseconds.
#[inline]
pub const fn ns_to_ms_ceil(ns: u64) -> u64 {
    ns.div_ceil(NS_PER_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_rounds_up() {
        assert_eq!(interval_ns(500, 3_600_000, PPM).unwrap(), 7_200_000_000);
        // 7/s: 142_857_142.86 ns rounds up.
        assert_eq!(interval_ns(7, 1_000, PPM).unwrap(), 142_857_143);
        // Half speed doubles the interval.
        assert_eq!(
            interval_ns(500, 3_600_000, PPM / 2).unwrap(),
            14_400_000_000
        );
    }

    #[test]
    fn interval_rejects_bad_input() {
        assert!(interval_ns(0, 1000, PPM).is_err());
        assert!(interval_ns(1, 0, PPM).is_err());
        assert!(interval_ns(1, 1000, 0).is_err());
        assert!(interval_ns(1, 1000, PPM + 1).is_err());
        assert_eq!(
            interval_ns(1, u64::MAX, PPM),
            Err(CoreError::Overflow {
                what: "rate interval"
            })
        );
    }

    #[test]
    fn burst_then_spaced() {
        let t = 1_000 * NS_PER_MS; // 1 per second
        let mut tat = 0;
        let now = 10_000 * NS_PER_MS;
        // Burst of 3 at once.
        for _ in 0..3 {
            tat = check(tat, t, 3, now, 1).unwrap();
        }
        assert_eq!(check(tat, t, 3, now, 1), Err(Some(t)));
        // One interval later exactly one more fits.
        tat = check(tat, t, 3, now + t, 1).unwrap();
        assert_eq!(check(tat, t, 3, now + t, 1), Err(Some(t)));
    }

    #[test]
    fn n_above_burst_never_fits() {
        assert_eq!(check(0, 5, 2, 100, 3), Err(None));
        assert_eq!(check(0, 0, 2, 100, 3), Ok(0));
    }

    #[test]
    fn ms_rounding() {
        assert_eq!(ns_to_ms_ceil(0), 0);
        assert_eq!(ns_to_ms_ceil(1), 1);
        assert_eq!(ns_to_ms_ceil(NS_PER_MS), 1);
        assert_eq!(ns_to_ms_ceil(NS_PER_MS + 1), 2);
    }
}
