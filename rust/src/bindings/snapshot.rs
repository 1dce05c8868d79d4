//! Snapshots as plain Python data (dicts, lists, tuples), read back with every field checked.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::bad;
use crate::caps::UNKNOWN_HOUR;
use crate::state::{IpState, KeyState, PoolState, QueuedState, Snapshot};

// ----- snapshots as plain Python data -----

pub(super) fn snapshot_to_py<'py>(py: Python<'py>, s: &Snapshot) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", s.version)?;
    d.set_item("hour_start_ms", s.hour_start_ms)?;
    d.set_item("hour_pending_ms", &s.hour_pending_ms)?;
    d.set_item("day_start_ms", s.day_start_ms)?;
    d.set_item("day_pending_ms", &s.day_pending_ms)?;
    d.set_item("providers", &s.providers)?;
    let ips = s
        .ips
        .iter()
        .map(|i| {
            (
                i.ip.as_str(),
                i.hourly_cap,
                i.daily_cap,
                i.hour_used,
                i.day_used,
            )
        })
        .collect::<Vec<_>>();
    d.set_item("ips", ips)?;
    let keys = s
        .keys
        .iter()
        .map(|k| {
            PyTuple::new(
                py,
                [
                    k.ip.into_pyobject(py)?.into_any(),
                    k.provider.into_pyobject(py)?.into_any(),
                    (
                        k.rate_count,
                        k.rate_period_ms,
                        k.max_burst,
                        k.hourly_cap,
                        k.daily_cap,
                        k.multiplier_ppm,
                        k.paused,
                    )
                        .into_pyobject(py)?
                        .into_any(),
                    (k.tat_ns, k.hour_used, k.day_used, k.suspended_until_ms)
                        .into_pyobject(py)?
                        .into_any(),
                ],
            )
        })
        .collect::<PyResult<Vec<_>>>()?;
    d.set_item("keys", keys)?;
    let pools = s
        .pools
        .iter()
        .map(|p| (p.name.as_str(), p.members.clone(), p.overflow))
        .collect::<Vec<_>>();
    d.set_item("pools", pools)?;
    let queue = s
        .queue
        .iter()
        .map(|m| (m.id, m.pool, m.provider, m.priority, m.n))
        .collect::<Vec<_>>();
    d.set_item("queue", queue)?;
    d.set_item("retired_ips", &s.retired_ips)?;
    let of_day = |h: u8| (h != UNKNOWN_HOUR).then_some(h);
    d.set_item("hour_of_day", of_day(s.hour_of_day))?;
    d.set_item(
        "hour_pending_of_day",
        s.hour_pending_of_day
            .iter()
            .map(|&h| of_day(h))
            .collect::<Vec<_>>(),
    )?;
    d.set_item("active_hours", &s.active_hours)?;
    Ok(d)
}

/// Fields of a tuple or list of exactly `n` items.
pub(super) fn fields<'py>(
    obj: &Bound<'py, PyAny>,
    n: usize,
    what: &str,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let items: Vec<Bound<'py, PyAny>> = obj
        .try_iter()
        .map_err(|_| bad(what, "must be a list or tuple"))?
        .collect::<PyResult<_>>()?;
    if items.len() != n {
        return Err(bad(
            what,
            format_args!("must have {n} fields, got {}", items.len()),
        ));
    }
    Ok(items)
}

pub(super) fn get<'py, T: pyo3::conversion::FromPyObjectOwned<'py>>(
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<T> {
    obj.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        bad(
            what,
            format_args!("has the wrong type: {}", e.value(obj.py())),
        )
    })
}

pub(super) fn items<'py>(
    state: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    state
        .get_item(name)
        .map_err(|_| bad(name, "is missing from the snapshot"))?
        .try_iter()
        .map_err(|_| bad(name, "must be a list"))?
        .collect()
}

/// (hour of day now, hours of day of the pending hour boundaries, (key, active hours) pairs).
pub(super) type LocalHours = (u8, Vec<u8>, Vec<(u32, u32)>);

/// Version 3 data names hours of day and active hours; earlier versions have none.
pub(super) fn local_hours_from_py(
    state: &Bound<'_, PyAny>,
    pending: usize,
) -> PyResult<LocalHours> {
    let hour_of_day = match state.get_item("hour_of_day") {
        Ok(v) => get::<Option<u8>>(&v, "hour_of_day")?.unwrap_or(UNKNOWN_HOUR),
        Err(_) => UNKNOWN_HOUR,
    };
    let hour_pending_of_day = match state.get_item("hour_pending_of_day") {
        Ok(v) => get::<Vec<Option<u8>>>(&v, "hour_pending_of_day")?
            .into_iter()
            .map(|h| h.unwrap_or(UNKNOWN_HOUR))
            .collect(),
        Err(_) => vec![UNKNOWN_HOUR; pending],
    };
    let mut active_hours = Vec::new();
    if state.get_item("active_hours").is_ok() {
        for item in items(state, "active_hours")? {
            let f = fields(&item, 2, "active_hours entry")?;
            active_hours.push((
                get(&f[0], "active_hours entry key")?,
                get(&f[1], "active_hours entry mask")?,
            ));
        }
    }
    Ok((hour_of_day, hour_pending_of_day, active_hours))
}

pub(super) fn snapshot_from_py(state: &Bound<'_, PyAny>) -> PyResult<Snapshot> {
    let field = |name: &str| -> PyResult<Bound<'_, PyAny>> {
        state
            .get_item(name)
            .map_err(|_| bad(name, "is missing from the snapshot"))
    };
    let mut ips = Vec::new();
    for item in items(state, "ips")? {
        let f = fields(&item, 5, "ips entry")?;
        ips.push(IpState {
            ip: get(&f[0], "ips entry ip")?,
            hourly_cap: get(&f[1], "ips entry hourly_cap")?,
            daily_cap: get(&f[2], "ips entry daily_cap")?,
            hour_used: get(&f[3], "ips entry hour_used")?,
            day_used: get(&f[4], "ips entry day_used")?,
        });
    }
    let mut keys = Vec::new();
    for item in items(state, "keys")? {
        let f = fields(&item, 4, "keys entry")?;
        let l = fields(&f[2], 7, "keys entry limits")?;
        let c = fields(&f[3], 4, "keys entry counters")?;
        keys.push(KeyState {
            ip: get(&f[0], "keys entry ip")?,
            provider: get(&f[1], "keys entry provider")?,
            rate_count: get(&l[0], "rate_count")?,
            rate_period_ms: get(&l[1], "rate_period_ms")?,
            max_burst: get(&l[2], "max_burst")?,
            hourly_cap: get(&l[3], "hourly_cap")?,
            daily_cap: get(&l[4], "daily_cap")?,
            multiplier_ppm: get(&l[5], "multiplier_ppm")?,
            paused: get(&l[6], "paused")?,
            tat_ns: get(&c[0], "tat_ns")?,
            hour_used: get(&c[1], "hour_used")?,
            day_used: get(&c[2], "day_used")?,
            suspended_until_ms: get(&c[3], "suspended_until_ms")?,
        });
    }
    let mut pools = Vec::new();
    for item in items(state, "pools")? {
        let f = fields(&item, 3, "pools entry")?;
        let mut members = Vec::new();
        for m in f[1].try_iter()? {
            let m = fields(&m?, 3, "pool member")?;
            members.push((
                get(&m[0], "pool member ip")?,
                get(&m[1], "pool member weight")?,
                get(&m[2], "pool member warming")?,
            ));
        }
        pools.push(PoolState {
            name: get(&f[0], "pool name")?,
            members,
            overflow: get(&f[2], "pool overflow")?,
        });
    }
    let mut queue = Vec::new();
    for item in items(state, "queue")? {
        let f = fields(&item, 5, "queue entry")?;
        queue.push(QueuedState {
            id: get(&f[0], "queue entry id")?,
            pool: get(&f[1], "queue entry pool")?,
            provider: get(&f[2], "queue entry provider")?,
            priority: get(&f[3], "queue entry priority")?,
            n: get(&f[4], "queue entry n")?,
        });
    }
    // Version 2 data lists retired IPs; version 1 has none.
    let retired_ips = match state.get_item("retired_ips") {
        Ok(v) => get(&v, "retired_ips")?,
        Err(_) => Vec::new(),
    };
    let hour_pending_ms: Vec<u64> = get(&field("hour_pending_ms")?, "hour_pending_ms")?;
    let (hour_of_day, hour_pending_of_day, active_hours) =
        local_hours_from_py(state, hour_pending_ms.len())?;
    Ok(Snapshot {
        version: get(&field("version")?, "version")?,
        hour_start_ms: get(&field("hour_start_ms")?, "hour_start_ms")?,
        hour_pending_ms,
        day_start_ms: get(&field("day_start_ms")?, "day_start_ms")?,
        day_pending_ms: get(&field("day_pending_ms")?, "day_pending_ms")?,
        providers: get(&field("providers")?, "providers")?,
        ips,
        keys,
        pools,
        queue,
        retired_ips,
        reservation: None,
        hour_of_day,
        hour_pending_of_day,
        active_hours,
    })
}
