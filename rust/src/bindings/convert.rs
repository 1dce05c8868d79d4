//! Plain engine data as Python sees it: a key's usage as a dict, and the `array('I')`
//! buffers of `acquire_batch` read and checked.

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::bad;
use crate::caps::{cap_to, EVERY_HOUR};
use crate::gcra::PPM;
use crate::limiter::Usage;

/// `Engine.usage`: limits as `set_limits` takes them (None: not set), then the counters.
pub(super) fn usage_to_py<'py>(py: Python<'py>, u: &Usage) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let l = u.limits;
    let rate = (l.rate_count != 0).then_some((l.rate_count, l.rate_period_ms));
    d.set_item("rate_count", rate.map(|r| r.0))?;
    d.set_item("rate_period_ms", rate.map(|r| r.1))?;
    d.set_item("max_burst", l.max_burst)?;
    d.set_item("hourly_cap", cap_to(l.hourly_cap))?;
    d.set_item("daily_cap", cap_to(l.daily_cap))?;
    d.set_item("multiplier", f64::from(l.multiplier_ppm) / PPM as f64)?;
    d.set_item("paused", l.paused)?;
    d.set_item(
        "active_hours",
        (l.active_hours != EVERY_HOUR).then_some(l.active_hours),
    )?;
    d.set_item("hour_used", u.hour_used)?;
    d.set_item("day_used", u.day_used)?;
    d.set_item("ip_hour_used", u.ip_hour_used)?;
    d.set_item("ip_day_used", u.ip_day_used)?;
    d.set_item("suspended_until_ms", u.suspended_until_ms)?;
    d.set_item("tat_ns", u.tat_ns)?;
    d.set_item("reservation_left", u.reserve_left)?;
    d.set_item("retired", u.retired)?;
    Ok(d)
}

fn u32_buffer<'py>(
    py: Python<'py>,
    name: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyBuffer<u32>> {
    let buf = PyBuffer::<u32>::get(obj).map_err(|e| {
        bad(
            name,
            format_args!("must be a buffer of unsigned 32-bit ints such as array('I'): {e}"),
        )
    })?;
    if buf.as_slice(py).is_none() {
        return Err(bad(name, "must be a C-contiguous buffer"));
    }
    Ok(buf)
}

/// `acquire_batch`'s `keys` and `counts` buffers, checked: contiguous, one count per key.
pub(super) fn batch_buffers<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
    counts: Option<&Bound<'py, PyAny>>,
) -> PyResult<(PyBuffer<u32>, Option<PyBuffer<u32>>)> {
    let kb = u32_buffer(py, "keys", keys)?;
    let cb = counts.map(|c| u32_buffer(py, "counts", c)).transpose()?;
    if let Some(cb) = &cb {
        let (nk, nc) = (kb.item_count(), cb.item_count());
        if nc != nk {
            return Err(bad(
                "counts",
                format_args!("must have one count per key ({nk}), got {nc}"),
            ));
        }
    }
    Ok((kb, cb))
}
