//! Limit, calendar, pool and reservation arguments from Python, checked before the engine's
//! lock is taken, so a bad argument is named as Python gave it and changes nothing.

use pyo3::prelude::*;

use super::{arg, bad, opt_arg};
use crate::caps::EVERY_HOUR;

/// `Engine.set_limits` arguments, checked and converted.
pub(super) struct LimitArgs {
    pub(super) key: u32,
    /// (count, period_ms), or `None`: no rate.
    pub(super) rate: Option<(u64, u64)>,
    pub(super) max_burst: u32,
    pub(super) hourly_cap: Option<u64>,
    pub(super) daily_cap: Option<u64>,
    /// A valid mask (below 2**24), so setting it after the rate and caps cannot fail.
    pub(super) active_hours: u32,
}

impl LimitArgs {
    /// The arguments of `Engine.set_limits`, checked in the order Python's errors name them.
    pub(super) fn new(
        key: i128,
        rate_count: Option<i128>,
        rate_period_ms: Option<i128>,
        max_burst: i128,
        hourly_cap: Option<i128>,
        daily_cap: Option<i128>,
        active_hours: Option<i128>,
    ) -> PyResult<Self> {
        let rate = match (
            opt_arg::<u64>("rate_count", rate_count)?,
            opt_arg::<u64>("rate_period_ms", rate_period_ms)?,
        ) {
            (None, None) => None,
            (Some(c), Some(p)) => Some((c, p)),
            _ => {
                return Err(bad(
                    "rate",
                    "give rate_count and rate_period_ms together, or neither",
                ))
            }
        };
        let active_hours = match opt_arg::<u32>("active_hours", active_hours)? {
            None => EVERY_HOUR,
            Some(h) if h <= EVERY_HOUR => h,
            Some(h) => {
                return Err(bad(
                    "active_hours",
                    format_args!("must be a mask of hours 0 to 23 (below 2**24), got {h}"),
                ))
            }
        };
        let key = arg("key", key)?;
        let (max_burst, hourly_cap, daily_cap) = (
            arg("max_burst", max_burst)?,
            opt_arg("hourly_cap", hourly_cap)?,
            opt_arg("daily_cap", daily_cap)?,
        );
        Ok(Self {
            key,
            rate,
            max_burst,
            hourly_cap,
            daily_cap,
            active_hours,
        })
    }
}

/// A calendar as `Engine.set_calendar` takes it: hour starts, day starts (ms) and the local
/// hour of day of each hour start, each number checked.
pub(super) type CalendarArgs = (Vec<u64>, Vec<u64>, Option<Vec<u8>>);

pub(super) fn calendar_args(
    hour_starts_ms: Vec<i128>,
    day_starts_ms: Vec<i128>,
    hours_of_day: Option<Vec<i128>>,
) -> PyResult<CalendarArgs> {
    let conv = |name: &str, v: Vec<i128>| -> PyResult<Vec<u64>> {
        v.into_iter().map(|x| arg(name, x)).collect()
    };
    let hours = conv("hour_starts_ms", hour_starts_ms)?;
    let days = conv("day_starts_ms", day_starts_ms)?;
    let of_day = hours_of_day
        .map(|v| {
            v.into_iter()
                .map(|x| arg::<u8>("hours_of_day", x))
                .collect::<PyResult<Vec<u8>>>()
        })
        .transpose()?;
    Ok((hours, days, of_day))
}

/// Pool members (ip, weight, warming) with each weight checked.
pub(super) fn pool_members(members: &[(String, i128, bool)]) -> PyResult<Vec<(&str, u32, bool)>> {
    members
        .iter()
        .map(|(ip, w, warming)| Ok((ip.as_str(), arg::<u32>("weight", *w)?, *warming)))
        .collect()
}

/// `commit_reservation`'s (token, retry_ms): a retry time must fit where `now_ms` does.
pub(super) fn reservation_commit_args(token: i128, retry_ms: i128) -> PyResult<(u64, u64)> {
    let (token, retry_ms) = (
        arg::<u64>("token", token)?,
        arg::<u64>("retry_ms", retry_ms)?,
    );
    crate::limiter::check_now(retry_ms)
        .map_err(|_| bad("retry_ms", format_args!("is too large, got {retry_ms}")))?;
    Ok((token, retry_ms))
}
