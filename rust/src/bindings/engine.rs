//! `Engine`: the lock that guards the core, and every method Python calls on it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use super::decision::{PyBatch, PyDecision};
use super::rules::{compile_rules, reply_code, reply_enhanced, PyRules};
use super::snapshot::{snapshot_from_py, snapshot_to_py};
use super::{arg, bad, class_str, err, opt_arg, scope_str, CoreError};
use crate::caps::EVERY_HOUR;
use crate::classify::{self, Classification, Provider};
use crate::decision::Decision;
use crate::engine::Engine;
use crate::gcra::PPM;
use crate::protocol::{Route, Wire};
use crate::state::Snapshot;

/// An IP address and its Python string.
pub(super) type IpName = (IpAddr, Py<PyString>);

/// What the engine's lock guards: plain Rust data only, never a Python object.
pub(super) struct Inner {
    engine: Engine,
    /// The native protocol's routes, tallies and reports.
    wire: Wire,
}

impl Inner {
    /// A decision with the IP handle and address of its key, for `PyEngine::decision_py`.
    fn named(&self, d: Decision) -> (Decision, u32, IpAddr) {
        let (ip, _) = self.engine.key_handles(d.key);
        (d, ip, self.engine.ip_addr(ip))
    }
}

/// The throttle engine: every limit, counter, pool and queued message of one daemon.
#[pyclass(frozen, module = "kiln._core", name = "Engine")]
pub struct PyEngine {
    inner: Mutex<Inner>,
    /// Python strings of IP addresses by IP handle, checked against the address (handles
    /// change on restore). Only locked with the GIL held and the engine lock free.
    ip_cache: Mutex<Vec<Option<IpName>>>,
    /// `THREAD_NO` of the only thread allowed in (`pin_thread`), or 0: any thread.
    owner: AtomicU64,
}

thread_local! {
    /// A number for the calling thread, unique for the life of the process (0: none yet).
    static THREAD_NO: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

impl PyEngine {
    /// The engine's lock, for work that touches no Python object.
    ///
    /// Two rules keep the lock and the GIL from ever waiting on each other (a thread that
    /// holds the lock never needs the GIL, and a thread that waits for the lock lets the GIL
    /// go): nothing between `lock` and the guard's drop makes or touches a Python object, and
    /// a contended lock is waited for with the GIL released (`Python::detach`). A pinned
    /// engine (`pin_thread`) also refuses callers from any thread but its own.
    fn lock(&self, py: Python<'_>) -> PyResult<MutexGuard<'_, Inner>> {
        let owner = self.owner.load(Ordering::Relaxed);
        if owner != 0 {
            let me = THREAD_NO.with(|n| *n);
            if me != owner {
                return Err(CoreError::new_err(
                    "the engine is pinned to the event loop's thread and was entered from \
                     another thread; call it only from the loop",
                ));
            }
        }
        loop {
            match self.inner.try_lock() {
                Ok(g) => return Ok(g),
                // A panic while locked is reported to Python as it happens; the state stays usable.
                Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(TryLockError::WouldBlock) => {
                    // Wait without the GIL, then try again holding it.
                    py.detach(|| {
                        drop(
                            self.inner
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner),
                        );
                    });
                }
            }
        }
    }

    /// The Python string of `addr` (IP handle `ip`), made once and kept. Called with the GIL
    /// held and the engine lock released; nothing here runs Python code.
    fn ip_py(&self, py: Python<'_>, ip: u32, addr: IpAddr) -> Py<PyString> {
        let mut cache = self
            .ip_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = ip as usize;
        if cache.len() <= i {
            cache.resize_with(i + 1, || None);
        }
        match &cache[i] {
            Some((a, s)) if *a == addr => s.clone_ref(py),
            _ => {
                let s = PyString::new(py, &addr.to_string()).unbind();
                cache[i] = Some((addr, s.clone_ref(py)));
                s
            }
        }
    }

    /// A decision as Python sees it: the IP of its key named.
    pub(super) fn decision_py(
        &self,
        py: Python<'_>,
        (inner, ip, addr): (Decision, u32, IpAddr),
    ) -> PyDecision {
        PyDecision {
            inner,
            ip: self.ip_py(py, ip, addr),
        }
    }
}

pub(super) fn u32_buffer<'py>(
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

#[pymethods]
impl PyEngine {
    #[new]
    fn py_new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                engine: Engine::new(),
                wire: Wire::new(),
            }),
            ip_cache: Mutex::new(Vec::new()),
            owner: AtomicU64::new(0),
        }
    }

    /// Refuse every later call from a thread other than the caller's (`CoreError`): the
    /// daemon pins its engine to the event loop's thread, so a job that strays onto a worker
    /// thread fails loudly instead of contending for the lock.
    fn pin_thread(&self) {
        self.owner.store(THREAD_NO.with(|n| *n), Ordering::Relaxed);
    }

    /// The handle of (ip, provider), interned on first use. IP text is normalised.
    fn key(&self, py: Python<'_>, ip: &str, provider: &str) -> PyResult<u32> {
        self.lock(py)?.engine.key(ip, provider).map_err(err)
    }

    /// (ip, provider) of a key handle.
    fn key_info(&self, py: Python<'_>, key: i128) -> PyResult<(String, String)> {
        let g = self.lock(py)?;
        let (ip, provider) = g.engine.key_names(arg("key", key)?).map_err(err)?;
        Ok((ip, provider.to_owned()))
    }

    /// How many keys this engine holds.
    fn key_count(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.lock(py)?.engine.key_count())
    }

    /// The handle of a provider name, interned on first use.
    fn provider(&self, py: Python<'_>, name: &str) -> PyResult<u16> {
        self.lock(py)?.engine.provider(name).map_err(err)
    }

    /// Set a key's rate, caps and active hours (its multiplier, pause, counters and
    /// suspension stay).
    #[pyo3(signature = (key, *, rate_count=None, rate_period_ms=None, max_burst=1, hourly_cap=None, daily_cap=None, active_hours=None))]
    #[allow(clippy::too_many_arguments)] // the GIL token plus the limits' fields
    fn set_limits(
        &self,
        py: Python<'_>,
        key: i128,
        rate_count: Option<i128>,
        rate_period_ms: Option<i128>,
        max_burst: i128,
        hourly_cap: Option<i128>,
        daily_cap: Option<i128>,
        active_hours: Option<i128>,
    ) -> PyResult<()> {
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
        let mut g = self.lock(py)?;
        // The mask is valid (checked above), so the second call cannot fail after the first.
        g.engine
            .set_limits(key, rate, max_burst, hourly_cap, daily_cap)
            .map_err(err)?;
        g.engine.set_active_hours(key, active_hours).map_err(err)
    }

    /// Slow a key to a fraction (0..1) of its rate and caps; 0 pauses it, 1 restores it.
    fn set_multiplier(&self, py: Python<'_>, key: i128, multiplier: f64) -> PyResult<()> {
        self.lock(py)?
            .engine
            .set_multiplier(arg("key", key)?, multiplier)
            .map_err(err)
    }

    /// Pause a key: every request is denied with reason "paused" until `resume`.
    fn pause(&self, py: Python<'_>, key: i128) -> PyResult<()> {
        self.lock(py)?
            .engine
            .set_paused(arg("key", key)?, true)
            .map_err(err)
    }

    /// Lift a pause.
    fn resume(&self, py: Python<'_>, key: i128) -> PyResult<()> {
        self.lock(py)?
            .engine
            .set_paused(arg("key", key)?, false)
            .map_err(err)
    }

    /// Deny a key until `until_ms` (replaces any earlier deadline; 0 lifts it).
    fn suspend(&self, py: Python<'_>, key: i128, until_ms: i128) -> PyResult<()> {
        self.lock(py)?
            .engine
            .suspend(arg("key", key)?, arg("until_ms", until_ms)?)
            .map_err(err)
    }

    /// Cap an IP's total across all providers per calendar hour and day.
    #[pyo3(signature = (ip, *, hourly_cap=None, daily_cap=None))]
    fn set_ip_caps(
        &self,
        py: Python<'_>,
        ip: &str,
        hourly_cap: Option<i128>,
        daily_cap: Option<i128>,
    ) -> PyResult<()> {
        self.lock(py)?
            .engine
            .set_ip_caps(
                ip,
                opt_arg("hourly_cap", hourly_cap)?,
                opt_arg("daily_cap", daily_cap)?,
            )
            .map_err(err)
    }

    /// The instants (ms) at which coming calendar hours and days begin, strictly increasing,
    /// and the local hour of day (0..23) each hour start begins (for active hours).
    #[pyo3(signature = (hour_starts_ms, day_starts_ms, hours_of_day=None))]
    fn set_calendar(
        &self,
        py: Python<'_>,
        hour_starts_ms: Vec<i128>,
        day_starts_ms: Vec<i128>,
        hours_of_day: Option<Vec<i128>>,
    ) -> PyResult<()> {
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
        self.lock(py)?
            .engine
            .set_local_calendar(&hours, &days, of_day.as_deref())
            .map_err(err)
    }

    /// May `key` send `n` more at `now_ms`? All or nothing; charged when granted.
    fn acquire(&self, py: Python<'_>, key: i64, n: i64, now_ms: i64) -> PyResult<PyDecision> {
        let (key, n, now_ms) = (
            arg("key", i128::from(key))?,
            arg("n", i128::from(n))?,
            arg("now_ms", i128::from(now_ms))?,
        );
        let named = {
            let mut g = self.lock(py)?;
            let d = g.engine.acquire(key, n, now_ms).map_err(err)?;
            g.named(d)
        };
        Ok(self.decision_py(py, named))
    }

    /// Decide many requests at one `now_ms`: `keys` (and `counts`, default 1 each) are
    /// buffers of unsigned 32-bit ints, e.g. `array('I')`. Nothing is decided if any is bad.
    #[pyo3(signature = (keys, now_ms, counts=None))]
    fn acquire_batch(
        slf: &Bound<'_, Self>,
        keys: &Bound<'_, PyAny>,
        now_ms: i64,
        counts: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyBatch> {
        let py = slf.py();
        let now_ms = arg("now_ms", i128::from(now_ms))?;
        let kb = u32_buffer(py, "keys", keys)?;
        let ks = kb.as_slice(py).expect("checked contiguous");
        let mut out = Vec::new();
        let this = slf.get();
        let cb = counts.map(|c| u32_buffer(py, "counts", c)).transpose()?;
        let cs = cb
            .as_ref()
            .map(|b| b.as_slice(py).expect("checked contiguous"));
        if let Some(cs) = cs {
            if cs.len() != ks.len() {
                return Err(bad(
                    "counts",
                    format_args!(
                        "must have one count per key ({}), got {}",
                        ks.len(),
                        cs.len()
                    ),
                ));
            }
        }
        let names = {
            let mut g = this.lock(py)?;
            match cs {
                None => g
                    .engine
                    .acquire_batch(ks.iter().map(|k| (k.get(), 1)), now_ms, &mut out),
                Some(cs) => g.engine.acquire_batch(
                    ks.iter().zip(cs).map(|(k, c)| (k.get(), c.get())),
                    now_ms,
                    &mut out,
                ),
            }
            .map_err(err)?;
            out.iter()
                .map(|&d| {
                    let (_, ip, addr) = g.named(d);
                    (ip, addr)
                })
                .collect()
        };
        Ok(PyBatch {
            engine: slf.clone().unbind(),
            decisions: out,
            names,
        })
    }

    /// Define (or redefine) a pool of (ip, weight, warming) members with an optional
    /// overflow pool; returns its handle.
    #[pyo3(signature = (name, members, overflow=None))]
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts arguments by value
    fn define_pool(
        &self,
        py: Python<'_>,
        name: &str,
        members: Vec<(String, i128, bool)>,
        overflow: Option<&str>,
    ) -> PyResult<u32> {
        let members = members
            .iter()
            .map(|(ip, w, warming)| Ok((ip.as_str(), arg::<u32>("weight", *w)?, *warming)))
            .collect::<PyResult<Vec<_>>>()?;
        self.lock(py)?
            .engine
            .define_pool(name, &members, overflow)
            .map_err(err)
    }

    /// The handle of a defined pool.
    fn pool(&self, py: Python<'_>, name: &str) -> PyResult<u32> {
        self.lock(py)?.engine.pool_handle(name).map_err(err)
    }

    /// Choose and charge the IP of `pool` that carries `n` messages to `provider`:
    /// a warming IP with room, else a warm IP by weight, else the overflow pool.
    fn pick(
        &self,
        py: Python<'_>,
        pool: i64,
        provider: i64,
        n: i64,
        now_ms: i64,
    ) -> PyResult<PyDecision> {
        let (pool, provider, n, now_ms) = (
            arg("pool", i128::from(pool))?,
            arg("provider", i128::from(provider))?,
            arg("n", i128::from(n))?,
            arg("now_ms", i128::from(now_ms))?,
        );
        let named = {
            let mut g = self.lock(py)?;
            let d = g.engine.pick(pool, provider, n, now_ms).map_err(err)?;
            g.named(d)
        };
        Ok(self.decision_py(py, named))
    }

    /// A key's limits and counters, as plain data.
    fn usage<'py>(&self, py: Python<'py>, key: i128) -> PyResult<Bound<'py, PyDict>> {
        let u = self.lock(py)?.engine.usage(arg("key", key)?).map_err(err)?;
        let d = PyDict::new(py);
        let l = u.limits;
        let rate = (l.rate_count != 0).then_some((l.rate_count, l.rate_period_ms));
        d.set_item("rate_count", rate.map(|r| r.0))?;
        d.set_item("rate_period_ms", rate.map(|r| r.1))?;
        d.set_item("max_burst", l.max_burst)?;
        d.set_item("hourly_cap", crate::caps::cap_to(l.hourly_cap))?;
        d.set_item("daily_cap", crate::caps::cap_to(l.daily_cap))?;
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

    /// Hold message `message_id` for (pool, provider); higher priority goes first.
    #[pyo3(signature = (message_id, pool, provider, priority=0, n=1))]
    fn enqueue(
        &self,
        py: Python<'_>,
        message_id: i128,
        pool: i128,
        provider: i128,
        priority: i32,
        n: i128,
    ) -> PyResult<()> {
        self.lock(py)?
            .engine
            .enqueue(
                arg("message_id", message_id)?,
                arg("pool", pool)?,
                arg("provider", provider)?,
                priority,
                arg("n", n)?,
            )
            .map_err(err)
    }

    /// Release up to `max` held messages that may go at `now_ms`: (message_id, Decision).
    #[pyo3(signature = (now_ms, max))]
    fn due<'py>(&self, py: Python<'py>, now_ms: i128, max: i128) -> PyResult<Bound<'py, PyList>> {
        let (now_ms, max) = (arg("now_ms", now_ms)?, arg::<usize>("max", max)?);
        let released: Vec<(u64, (Decision, u32, IpAddr))> = {
            let mut g = self.lock(py)?;
            let mut out = Vec::new();
            g.engine.due(now_ms, max, &mut out).map_err(err)?;
            out.into_iter().map(|(id, d)| (id, g.named(d))).collect()
        };
        let items = released
            .into_iter()
            .map(|(id, named)| (id, self.decision_py(py, named)))
            .collect::<Vec<_>>();
        PyList::new(py, items)
    }

    /// When `due` may next release something (>= now_ms), or None.
    fn next_due_ms(&self, py: Python<'_>, now_ms: i128) -> PyResult<Option<u64>> {
        let now_ms = arg("now_ms", now_ms)?;
        Ok(self.lock(py)?.engine.next_due_ms(now_ms))
    }

    /// How many messages are held.
    fn queued(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.lock(py)?.engine.queued())
    }

    /// Everything the engine holds, as plain data (dicts, lists, tuples, ints, strings).
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock(py)?.engine.snapshot();
        snapshot_to_py(py, &s)
    }

    /// Replace all state with a snapshot (from `snapshot()`, or the same data read back from
    /// JSON; version 1 data still restores). On any error the engine is unchanged.
    fn restore(&self, py: Python<'_>, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let s = snapshot_from_py(state)?;
        let engine = Engine::from_snapshot(&s).map_err(err)?;
        self.lock(py)?.replace(engine);
        Ok(())
    }

    /// Everything the engine holds, as compact bytes (for frequent flushes to the store).
    /// Reserves nothing: restoring it charges nothing extra.
    fn snapshot_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let s = self.lock(py)?.engine.snapshot();
        let data = py.detach(|| s.to_bytes());
        Ok(PyBytes::new(py, &data))
    }

    /// `snapshot_bytes()` that also reserves, and its token: every capped key gets a block
    /// (what it may be granted until a little after the next snapshot: `ahead_ms` of its
    /// rate and burst plus `floor`, at least twice what it was granted since the previous
    /// reservation snapshot, at most what its caps still allow by then), and is held to it
    /// from now on. Write the bytes durably, then call `commit_reservation(token, ...)`.
    /// Rolls the calendar to `now_ms` first.
    #[pyo3(signature = (now_ms, ahead_ms, *, floor=10))]
    fn reservation_snapshot<'py>(
        &self,
        py: Python<'py>,
        now_ms: i128,
        ahead_ms: i128,
        floor: i128,
    ) -> PyResult<(Bound<'py, PyBytes>, u64)> {
        let (now_ms, ahead_ms, floor) = (
            arg("now_ms", now_ms)?,
            arg("ahead_ms", ahead_ms)?,
            arg::<u32>("floor", floor)?,
        );
        let (s, token) = self
            .lock(py)?
            .engine
            .reservation_snapshot(now_ms, ahead_ms, floor)
            .map_err(err)?;
        let data = py.detach(|| s.to_bytes());
        Ok((PyBytes::new(py, &data), token))
    }

    /// The reservation snapshot of `token` is durable: from now on each key may be granted at
    /// most its block more than it had been granted when that snapshot was taken; a request
    /// past that is denied, reason "reservation", `retry_after_ms = retry_ms` (the time to
    /// the next commit, roughly). True if it took effect; false if `token` is not the latest
    /// reservation snapshot's (an older or unknown token is ignored, which is always safe).
    fn commit_reservation(&self, py: Python<'_>, token: i128, retry_ms: i128) -> PyResult<bool> {
        let (token, retry_ms) = (
            arg::<u64>("token", token)?,
            arg::<u64>("retry_ms", retry_ms)?,
        );
        crate::limiter::check_now(retry_ms)
            .map_err(|_| bad("retry_ms", format_args!("is too large, got {retry_ms}")))?;
        Ok(self.lock(py)?.engine.commit_reservation(token, retry_ms))
    }

    /// Replace all state with `snapshot_bytes()` or `reservation_snapshot()` output. With
    /// `now_ms`: roll the calendar to `now_ms` and, for a reservation snapshot, charge every
    /// key's block to the windows current then (what it may have been granted between the
    /// snapshot and a crash). After a reservation snapshot is restored, capped keys are
    /// granted nothing until the next `commit_reservation`. On any error the engine is
    /// unchanged.
    #[pyo3(signature = (data, now_ms=None))]
    fn restore_bytes(&self, py: Python<'_>, data: &[u8], now_ms: Option<i128>) -> PyResult<()> {
        let now_ms = opt_arg::<u64>("now_ms", now_ms)?;
        let engine = py.detach(|| {
            let s = Snapshot::from_bytes(data)?;
            Engine::restore_at(&s, now_ms)
        });
        self.lock(py)?.replace(engine.map_err(err)?);
        Ok(())
    }

    /// Keep only `ips` as sending IPs (the plan's): every other IP is retired, so the native
    /// protocol answers it as an IP this daemon never had, and its keys never grant
    /// (reason "retired"); a listed IP that was retired comes back. Counters and limits are
    /// kept. Returns the IPs this call retired. A bad address changes nothing.
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts a list into an owned Vec
    fn retain_ips(&self, py: Python<'_>, ips: Vec<String>) -> PyResult<Vec<String>> {
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let mut g = self.lock(py)?;
        let retired = g.engine.retain_ips(&ips).map_err(err)?;
        Ok(retired
            .into_iter()
            .map(|h| g.engine.ip_addr(h).to_string())
            .collect())
    }

    /// Keep only the pools named in `names`: every other pool is retired, and `pick` answers
    /// it as a pool it never heard of, as a fresh engine would; defining it again brings it
    /// back. Returns the names this call retired.
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts a list into an owned Vec
    fn retain_pools(&self, py: Python<'_>, names: Vec<String>) -> PyResult<Vec<String>> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Ok(self.lock(py)?.engine.retain_pools(&names))
    }

    // ----- the native protocol (docs/protocol.md) -----

    /// Answer every complete JSON line of `data` (bytes) at `now_ms`, in one call.
    fn serve(&self, py: Python<'_>, data: &[u8], now_ms: i128) -> PyResult<PyServed> {
        let now_ms = arg("now_ms", now_ms)?;
        let mut out = Vec::with_capacity(data.len() * 2 + 64);
        let served = {
            let mut g = self.lock(py)?;
            let g = &mut *g;
            g.wire
                .serve(&mut g.engine, data, now_ms, &mut out)
                .map_err(err)?
        };
        Ok(PyServed {
            reply: PyBytes::new(py, &out).unbind(),
            consumed: served.consumed,
            upcall: served
                .upcall
                .map(|(a, b)| PyBytes::new(py, &data[a..b]).unbind()),
            too_long: served.too_long,
        })
    }

    /// The provider every domain without a route counts as (interned on first use).
    fn set_default_provider(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let mut g = self.lock(py)?;
        let h = g.engine.provider(name).map_err(err)?;
        g.wire.set_default_provider(h);
        Ok(())
    }

    /// The operations Python answers: `serve` hands their lines back as `upcall`.
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts a list into an owned Vec
    fn set_upcall_ops(&self, py: Python<'_>, ops: Vec<String>) -> PyResult<()> {
        let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
        self.lock(py)?.wire.set_upcall_ops(&ops).map_err(err)
    }

    /// Route a recipient domain to `provider` (None: null MX, accepts no mail) until
    /// `expires_ms`; after that the route still holds and the domain is queued for lookup.
    fn set_route(
        &self,
        py: Python<'_>,
        domain: &str,
        provider: Option<&str>,
        expires_ms: i128,
    ) -> PyResult<()> {
        let expires_ms = arg("expires_ms", expires_ms)?;
        let mut g = self.lock(py)?;
        let route = match provider {
            Some(p) => Route::Provider(g.engine.provider(p).map_err(err)?),
            None => Route::NullMx,
        };
        g.wire.set_route(domain, route, expires_ms).map_err(err)
    }

    /// Forget every route.
    fn clear_routes(&self, py: Python<'_>) -> PyResult<()> {
        self.lock(py)?.wire.clear_routes();
        Ok(())
    }

    /// How many domains have a route.
    fn route_count(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.lock(py)?.wire.route_count())
    }

    /// The provider of `domain` at `now_ms` (None: null MX); unknown domains count as the
    /// default provider and are queued for lookup.
    fn route(&self, py: Python<'_>, domain: &str, now_ms: i128) -> PyResult<Option<String>> {
        let now_ms = arg("now_ms", now_ms)?;
        let mut g = self.lock(py)?;
        Ok(match g.wire.route(domain, now_ms).map_err(err)? {
            Route::Provider(p) => Some(g.engine.provider_name(p).to_owned()),
            Route::NullMx => None,
        })
    }

    /// Domains that need an MX lookup, seen since the last call.
    fn take_unresolved(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let v = self.lock(py)?.wire.take_unresolved();
        Ok(v.into_iter().map(String::from).collect())
    }

    /// Per-key counts since the last call:
    /// (ip, provider, granted, delivered, deferred, bounced, complaints).
    #[allow(clippy::type_complexity)]
    fn take_tallies(
        &self,
        py: Python<'_>,
    ) -> PyResult<Vec<(String, String, u64, u64, u64, u64, u64)>> {
        let mut g = self.lock(py)?;
        let tallies = g.wire.take_tallies();
        Ok(tallies
            .into_iter()
            .map(|(key, t)| {
                let (ip, provider) = g.engine.key_names(key).expect("own keys");
                (
                    ip,
                    provider.to_owned(),
                    t.granted,
                    t.delivered,
                    t.deferred,
                    t.bounced,
                    t.complaints,
                )
            })
            .collect())
    }

    /// Reports other than deliveries since the last call, in order:
    /// (at_ms, ip, provider, result, n, code, enhanced, text).
    #[allow(clippy::type_complexity)]
    fn take_reports(
        &self,
        py: Python<'_>,
    ) -> PyResult<
        Vec<(
            u64,
            String,
            String,
            &'static str,
            u32,
            Option<u16>,
            Option<String>,
            Option<String>,
        )>,
    > {
        let mut g = self.lock(py)?;
        let reports = g.wire.take_reports();
        Ok(reports
            .into_iter()
            .map(|r| {
                let (ip, provider) = g.engine.key_names(r.key).expect("own keys");
                (
                    r.at_ms,
                    ip,
                    provider.to_owned(),
                    r.result.as_str(),
                    r.n,
                    r.code,
                    r.enhanced,
                    r.text,
                )
            })
            .collect())
    }

    // ----- SMTP reply rules (classify.rs) -----

    /// Replace the reply rules: a sequence of (id, providers, codes, enhanced, text, class,
    /// scope, fallback). `providers` (names, groups already expanded), `codes` (ints such as 421, or
    /// "4xx"/"5xx") and `enhanced` ("4.7.28") are lists or None (any); `text` is a regex
    /// matched case-insensitively against the normalised reply; a `fallback` rule wins only
    /// when no other rule matched. On error (naming the rule id) the rules in force stay.
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts a list into an owned Vec
    /// The rules are compiled before the engine's lock is taken, with the GIL released.
    fn set_rules(&self, py: Python<'_>, rules: Vec<Bound<'_, PyAny>>) -> PyResult<()> {
        let compiled = compile_rules(py, &rules)?;
        self.lock(py)?.wire.use_classifier(compiled);
        Ok(())
    }

    /// Put rules compiled by `CompiledRules(...)` in force: a pointer swap, no compiling.
    fn use_rules(&self, py: Python<'_>, rules: &PyRules) -> PyResult<()> {
        self.lock(py)?.wire.use_classifier(Arc::clone(&rules.inner));
        Ok(())
    }

    /// How many reply rules are in force.
    fn rule_count(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.lock(py)?.wire.classifier().len())
    }

    /// Classify an SMTP reply: (class, scope, rule_id, matched_ids) of the most severe
    /// matching rule, ("internal", None, None, ()) for a reply the MTA made up itself, or
    /// None when no rule matches. `provider` None lets every rule apply; a name, only rules
    /// without providers and those listing it. `code`/`enhanced` missing are read from the
    /// start of `text` (a raw reply such as "421-4.7.28 ...").
    #[pyo3(signature = (provider, code, enhanced, text))]
    fn classify<'py>(
        &self,
        py: Python<'py>,
        provider: Option<&str>,
        code: Option<i128>,
        enhanced: Option<&str>,
        text: &str,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let code = reply_code(code)?;
        reply_enhanced(enhanced)?;
        let provider = provider.map_or(Provider::Any, Provider::Named);
        // Plain data under the lock; Python objects after it is released.
        let found = {
            let g = self.lock(py)?;
            let c = g.wire.classifier();
            match c.classify(provider, code, enhanced, text).1 {
                Classification::Unclassified => None,
                Classification::Internal => Some(None),
                Classification::Classified { rule, matched } => {
                    let r = c.rule(rule);
                    let ids: Vec<Box<str>> =
                        matched.iter().map(|&m| c.rule(m).id.clone()).collect();
                    Some(Some((r.class, r.scope, r.id.clone(), ids)))
                }
            }
        };
        match found {
            None => Ok(None),
            Some(None) => {
                let none = py.None().into_bound(py);
                Ok(Some(PyTuple::new(
                    py,
                    [
                        PyString::intern(py, classify::INTERNAL).into_any(),
                        none.clone(),
                        none,
                        PyTuple::empty(py).into_any(),
                    ],
                )?))
            }
            Some(Some((class, scope, id, matched))) => {
                let ids = PyTuple::new(py, matched.iter().map(|m| PyString::new(py, m)))?;
                Ok(Some(PyTuple::new(
                    py,
                    [
                        class_str(py, class).into_any(),
                        scope_str(py, scope).into_any(),
                        PyString::new(py, &id).into_any(),
                        ids.into_any(),
                    ],
                )?))
            }
        }
    }

    /// Protocol counters since the engine was made (for metrics).
    fn wire_stats(&self, py: Python<'_>) -> PyResult<std::collections::HashMap<&'static str, u64>> {
        let s = self.lock(py)?.wire.stats;
        Ok([
            ("requests", s.requests),
            ("errors", s.errors),
            ("granted", s.granted),
            ("denied", s.denied),
            ("upcalls", s.upcalls),
            ("reports_dropped", s.reports_dropped),
            ("unresolved_dropped", s.unresolved_dropped),
            ("routes_evicted", s.routes_evicted),
        ]
        .into_iter()
        .collect())
    }
}

impl Inner {
    /// Swap in a restored engine; routes follow provider names to the new handles. The
    /// restored engine is not changed (no provider is added to it).
    fn replace(&mut self, mut engine: Engine) {
        let map = engine.succeed(&self.engine);
        self.engine = engine;
        self.wire.remap_providers(&map);
    }
}

/// What one `Engine.serve` call produced.
#[pyclass(frozen, module = "kiln._core", name = "Served")]
pub struct PyServed {
    /// Reply lines for the requests answered, in order (write them before anything else).
    #[pyo3(get)]
    reply: Py<PyBytes>,
    /// Input bytes used; keep the rest and call again when more data arrives.
    #[pyo3(get)]
    consumed: usize,
    /// A request line (without newline) Python must answer next, or None.
    #[pyo3(get)]
    upcall: Option<Py<PyBytes>>,
    /// A line longer than 64 KiB starts at `consumed`: write `reply`, then close.
    #[pyo3(get)]
    too_long: bool,
}
