//! `Engine`: every method Python calls on it, each a thin wrapper: arguments checked
//! (`limits.rs`), the core called under the lock (`lock.rs`), the answer converted
//! (`convert.rs`, `wire.rs`, `rules.rs`, `snapshot.rs`).

use std::net::IpAddr;
use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use super::convert::{batch_buffers, usage_to_py};
use super::decision::{PyBatch, PyDecision};
use super::limits::{calendar_args, pool_members, reservation_commit_args, LimitArgs};
use super::lock::PyEngine;
use super::rules::{
    classify_found, compile_rules, found_to_py, reply_code, reply_enhanced, PyRules,
};
use super::snapshot::{snapshot_from_py, snapshot_to_py};
use super::wire::{report_rows, stats_map, tally_rows, PyServed, ReportRow, TallyRow};
use super::{arg, bad, err, opt_arg};
use crate::decision::Decision;
use crate::engine::Engine;
use crate::limiter::MAX_NOW_MS;

/// One address of `suppress_fingerprints`: (normalised, fingerprint, problem).
type Hashed = (Option<String>, u64, Option<String>);

/// (held, pinned, bound on learned routes) and [(domain, provider, expires_ms)].
type RouteTable = (
    (usize, usize, usize),
    Vec<(String, Option<String>, Option<u64>)>,
);
use crate::protocol::{address_parts, normalise_address, Route};
use crate::state::Snapshot;
use crate::suppress::{Event as SuppressEvent, SuppressionSet};

/// (pool, provider, messages, next release ms) of one release queue.
type QueueRow = (String, String, usize, Option<u64>);

/// `suppress_fingerprint_column`: native-endian u64 fingerprints and the refusals (row, problem).
type FingerprintColumn<'py> = (Bound<'py, PyBytes>, Vec<(usize, String)>);

#[pymethods]
impl PyEngine {
    #[new]
    fn py_new() -> Self {
        Self::fresh()
    }

    /// Refuse every later call from a thread other than the caller's (`CoreError`): the
    /// daemon pins its engine to the event loop's thread, so a job that strays onto a worker
    /// thread fails loudly instead of contending for the lock.
    fn pin_thread(&self) {
        self.pin_to_this_thread();
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
        let a = LimitArgs::new(
            key,
            rate_count,
            rate_period_ms,
            max_burst,
            hourly_cap,
            daily_cap,
            active_hours,
        )?;
        let mut g = self.lock(py)?;
        // The mask is valid (checked above), so the second call cannot fail after the first.
        g.engine
            .set_limits(a.key, a.rate, a.max_burst, a.hourly_cap, a.daily_cap)
            .map_err(err)?;
        g.engine
            .set_active_hours(a.key, a.active_hours)
            .map_err(err)
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
        let (hours, days, of_day) = calendar_args(hour_starts_ms, day_starts_ms, hours_of_day)?;
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
        let (kb, cb) = batch_buffers(py, keys, counts)?;
        let ks = kb.as_slice(py).expect("checked contiguous");
        let cs = cb
            .as_ref()
            .map(|b| b.as_slice(py).expect("checked contiguous"));
        let mut out = Vec::new();
        let this = slf.get();
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
        let members = pool_members(&members)?;
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
        usage_to_py(py, &u)
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

    /// Every held message as (message_id, pool, provider, priority, n), oldest first.
    fn queue_entries(&self, py: Python<'_>) -> PyResult<Vec<crate::scheduler::Entry>> {
        Ok(self.lock(py)?.engine.scheduler.entries())
    }

    /// Every queue holding messages as (pool, provider, messages, next release ms or None:
    /// waiting for limits to change), by name.
    fn queue_summary(&self, py: Python<'_>, now_ms: i128) -> PyResult<Vec<QueueRow>> {
        let now_ms = arg("now_ms", now_ms)?;
        let g = self.lock(py)?;
        let e = &g.engine;
        Ok(e.scheduler
            .summary(now_ms)
            .into_iter()
            .map(|(pool, provider, n, next)| {
                let name = e.pools.pools[pool as usize].name.clone();
                (name, e.provider_name(provider).to_owned(), n, next)
            })
            .collect())
    }

    /// Postfix's transport table (`MtaServer(protocol="socketmap")`): the `master.cf`
    /// transport of each sending IP as (ip, transport), and the next hop every answer names
    /// ("" for the recipient's domain).
    fn postfix_configure(
        &self,
        py: Python<'_>,
        transports: Vec<(String, String)>,
        nexthop: &str,
    ) -> PyResult<()> {
        let mut table = hashbrown::HashMap::with_capacity(transports.len());
        for (ip, transport) in transports {
            let addr: IpAddr = ip
                .parse()
                .map_err(|_| bad("transports", format_args!("not an IP address: {ip:?}")))?;
            if transport.is_empty() || transport.contains([':', ' ', ',']) {
                return Err(bad(
                    "transports",
                    format_args!("not a master.cf service name: {transport:?}"),
                ));
            }
            table.insert(addr, transport.into_boxed_str());
        }
        if nexthop.contains(char::is_whitespace) {
            return Err(bad(
                "nexthop",
                format_args!("must not hold spaces, got {nexthop:?}"),
            ));
        }
        self.lock(py)?.postfix.configure(table, nexthop);
        Ok(())
    }

    /// Keep a grant the release queue made on `ip` for `recipient`'s next transport lookup,
    /// until `expires_ms`. False when too many already wait.
    fn postfix_prepay(
        &self,
        py: Python<'_>,
        recipient: &str,
        ip: &str,
        expires_ms: i128,
    ) -> PyResult<bool> {
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| bad("ip", format_args!("not an IP address: {ip:?}")))?;
        let expires_ms = arg("expires_ms", expires_ms)?;
        Ok(self.lock(py)?.postfix.prepay(recipient, addr, expires_ms))
    }

    /// Grants waiting for `recipient`'s next transport lookup.
    fn postfix_prepaid(&self, py: Python<'_>, recipient: &str) -> PyResult<usize> {
        Ok(self.lock(py)?.postfix.prepaid_for(recipient))
    }

    /// Drop the prepaid grants that lapsed by `now_ms`; returns how many.
    fn postfix_expire(&self, py: Python<'_>, now_ms: i128) -> PyResult<usize> {
        let now_ms = arg("now_ms", now_ms)?;
        Ok(self.lock(py)?.postfix.expire(now_ms))
    }

    /// The transport table's counters, and the prepaid grants waiting (`prepaid_waiting`).
    fn postfix_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (st, waiting) = {
            let g = self.lock(py)?;
            (g.postfix.stats, g.postfix.prepaid_len())
        };
        let d = PyDict::new(py);
        d.set_item("requests", st.requests)?;
        d.set_item("granted", st.granted)?;
        d.set_item("prepaid", st.prepaid)?;
        d.set_item("waited", st.waited)?;
        d.set_item("not_found", st.not_found)?;
        d.set_item("errors", st.errors)?;
        d.set_item("suppressed", st.suppressed)?;
        d.set_item("prepaid_waiting", waiting)?;
        Ok(d)
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
        let engine = self.lock(py)?.engine.clone(); // the lock for a copy only
        let data = py.detach(move || engine.snapshot().to_bytes());
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
        // Under the lock only what must be: reserve, and copy the engine (a third of the
        // time of building the snapshot at 1M keys); the MTA socket's thread waits for it.
        let (token, reservation, engine) = {
            let mut g = self.lock(py)?;
            let (token, reservation) = g.engine.reserve(now_ms, ahead_ms, floor).map_err(err)?;
            (token, reservation, g.engine.clone())
        };
        let data = py.detach(move || {
            let mut s = engine.snapshot();
            s.reservation = Some(reservation);
            s.to_bytes()
        });
        Ok((PyBytes::new(py, &data), token))
    }

    /// The reservation snapshot of `token` is durable: from now on each key may be granted at
    /// most its block more than it had been granted when that snapshot was taken; a request
    /// past that is denied, reason "reservation", `retry_after_ms = retry_ms` (the time to
    /// the next commit, roughly). True if it took effect; false if `token` is not the latest
    /// reservation snapshot's (an older or unknown token is ignored, which is always safe).
    fn commit_reservation(&self, py: Python<'_>, token: i128, retry_ms: i128) -> PyResult<bool> {
        let (token, retry_ms) = reservation_commit_args(token, retry_ms)?;
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
        Ok(PyServed::new(py, data, &out, &served))
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

    /// The route table for an operator: (held, pinned, bound on learned routes) and entries
    /// [(domain, provider or None for a null MX, expires_ms or None for a plan route)]:
    /// `domain`'s alone, or up to `limit` in the table's order.
    #[pyo3(signature = (domain=None, limit=100))]
    fn route_table(
        &self,
        py: Python<'_>,
        domain: Option<&str>,
        limit: usize,
    ) -> PyResult<RouteTable> {
        let g = self.lock(py)?;
        let entries = g
            .wire
            .route_entries(domain, limit.min(10_000))
            .into_iter()
            .map(|(d, route, expires_ms)| {
                let provider = match route {
                    Route::Provider(p) => Some(g.engine.provider_name(p).to_owned()),
                    Route::NullMx => None,
                };
                (d, provider, (expires_ms < MAX_NOW_MS).then_some(expires_ms))
            })
            .collect();
        Ok((g.wire.route_figures(), entries))
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
    fn take_tallies(&self, py: Python<'_>) -> PyResult<Vec<TallyRow>> {
        let mut g = self.lock(py)?;
        let tallies = g.wire.take_tallies();
        Ok(tally_rows(&g.engine, tallies))
    }

    /// Reports other than deliveries since the last call, in order:
    /// (at_ms, ip, provider, result, n, code, enhanced, text).
    fn take_reports(&self, py: Python<'_>) -> PyResult<Vec<ReportRow>> {
        let mut g = self.lock(py)?;
        let reports = g.wire.take_reports();
        Ok(report_rows(&g.engine, reports))
    }

    // ----- SMTP reply rules (classify/) -----

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
        // Plain data under the lock; Python objects after it is released.
        let found = {
            let g = self.lock(py)?;
            classify_found(g.wire.classifier(), provider, code, enhanced, text)
        };
        found_to_py(py, found)
    }

    /// The Redis-protocol sockets' counters and the `CL.THROTTLE` keys they hold (count and
    /// bytes: part of the engine's memory).
    fn resp_stats(&self, py: Python<'_>) -> PyResult<std::collections::HashMap<&'static str, u64>> {
        let g = self.lock(py)?;
        let (s, t) = (g.resp.stats, &g.resp.throttles);
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Ok([
            ("commands", s.commands),
            ("errors", s.errors),
            ("throttled", s.throttled),
            ("throttle_keys", count(t.len())),
            ("throttle_bytes", count(t.bytes())),
        ]
        .into_iter()
        .collect())
    }

    // ----- the suppression list (rust/src/suppress, docs/suppression.md) -----

    /// Start an empty suppression set whose hashes are keyed with (k0, k1). Refused while
    /// the set holds addresses (their hashes were made with the old key).
    fn suppress_set_key(&self, py: Python<'_>, k0: u64, k1: u64) -> PyResult<()> {
        let mut g = self.lock(py)?;
        if !g.wire.suppress.is_empty() && g.wire.suppress.key() != (k0, k1) {
            return Err(bad(
                "key",
                "the suppression set holds addresses hashed with another key",
            ));
        }
        g.wire.suppress = SuppressionSet::new((k0, k1));
        Ok(())
    }

    /// `address` as the list keeps it (trimmed, domain lower-cased in ASCII form) and its
    /// fingerprint in `scope` ("" for the global list). CoreError for a malformed address.
    #[pyo3(signature = (address, scope=""))]
    fn suppress_fingerprint(
        &self,
        py: Python<'_>,
        address: &str,
        scope: &str,
    ) -> PyResult<(String, u64)> {
        let a = normalise_address(address)
            .map_err(|e| bad("address", e.trim_start_matches("address: ")))?;
        let g = self.lock(py)?;
        let fp = g.wire.suppress.fingerprint(scope.as_bytes(), a.as_bytes());
        Ok((a, fp))
    }

    /// `suppress_fingerprint` for many (address, scope) pairs under one lock: per pair the
    /// normalised address and fingerprint, or None and the problem.
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts the list into an owned value
    fn suppress_fingerprints(
        &self,
        py: Python<'_>,
        items: Vec<(String, String)>,
    ) -> PyResult<Vec<Hashed>> {
        let g = self.lock(py)?;
        Ok(items
            .iter()
            .map(|(address, scope)| match normalise_address(address) {
                Ok(a) => {
                    let fp = g.wire.suppress.fingerprint(scope.as_bytes(), a.as_bytes());
                    (Some(a), fp, None)
                }
                Err(e) => (None, 0, Some(e)),
            })
            .collect())
    }

    /// `suppress_fingerprints` for an import's column: `addresses` joined by line breaks,
    /// in `scope` or each in its own (`scopes`, one per address). Returns the fingerprints
    /// as native-endian u64s (0 where the core refuses the address) and the refusals (row,
    /// problem). Only the key is read under the engine's lock; the hashing runs without it
    /// and without the GIL.
    #[pyo3(signature = (addresses, scope = "", scopes = None))]
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts the list into an owned value
    fn suppress_fingerprint_column<'py>(
        &self,
        py: Python<'py>,
        addresses: &str,
        scope: &str,
        scopes: Option<Vec<String>>,
    ) -> PyResult<FingerprintColumn<'py>> {
        let key = self.lock(py)?.wire.suppress.key();
        let n = addresses.split('\n').count();
        if scopes.as_ref().is_some_and(|s| s.len() != n) {
            return Err(bad(
                "scopes",
                format_args!("one per address ({n}) expected"),
            ));
        }
        let (fps, refused) = py.detach(|| {
            let mut fps = Vec::with_capacity(n * 8);
            let mut refused = Vec::new();
            for (row, address) in addresses.split('\n').enumerate() {
                let scope = scopes.as_ref().map_or(scope, |s| s[row].as_str());
                let fp = match address_parts(address) {
                    Ok((local, domain)) => SuppressionSet::fingerprint_keyed(
                        key,
                        scope.as_bytes(),
                        &[local.as_bytes(), b"@", domain.as_bytes()],
                    ),
                    Err(e) => {
                        refused.push((row, e));
                        0
                    }
                };
                fps.extend_from_slice(&fp.to_ne_bytes());
            }
            (fps, refused)
        });
        Ok((PyBytes::new(py, &fps), refused))
    }

    /// Fold log events into the set, in order: (fingerprint, event, expires_ms); the event
    /// `remove` takes the address off. Returns how many changed whether it is listed. The
    /// engine's lock is held for `EVENTS_PER_HOLD` events at a time, and a table that must
    /// grow is grown outside it (`suppress_make_room`): an import of millions never stops
    /// the MTA sockets for more than a moment.
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts the list into an owned value
    fn suppress_apply(
        &self,
        py: Python<'_>,
        events: Vec<(u64, String, Option<u64>)>,
    ) -> PyResult<usize> {
        let mut parsed = Vec::with_capacity(events.len());
        for (fp, event, expires_ms) in &events {
            parsed.push((
                fingerprint_in_range(*fp)?,
                listing_event(event)?,
                *expires_ms,
            ));
        }
        self.suppress_apply_parsed(py, &parsed)
    }

    /// `suppress_apply` for an import's columns, with no Python object per event:
    /// `fingerprints` as native-endian u64s, `codes` one byte per event indexing `names`
    /// (event names, or "remove"), `expires` each event's expiry (None: none has one).
    #[pyo3(signature = (fingerprints, codes, names, expires = None))]
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts the lists into owned values
    fn suppress_apply_column(
        &self,
        py: Python<'_>,
        fingerprints: &[u8],
        codes: &[u8],
        names: Vec<String>,
        expires: Option<Vec<Option<u64>>>,
    ) -> PyResult<usize> {
        let n = codes.len();
        if fingerprints.len() != n * 8 || expires.as_ref().is_some_and(|e| e.len() != n) {
            return Err(bad(
                "columns",
                format_args!("{n} codes, {} fingerprint bytes", fingerprints.len()),
            ));
        }
        let events = names
            .iter()
            .map(|name| listing_event(name))
            .collect::<PyResult<Vec<_>>>()?;
        let mut parsed = Vec::with_capacity(n);
        for (row, (bytes, &code)) in fingerprints.chunks_exact(8).zip(codes).enumerate() {
            let fp = fingerprint_in_range(u64::from_ne_bytes(bytes.try_into().unwrap_or([0; 8])))?;
            let event = *events
                .get(usize::from(code))
                .ok_or_else(|| bad("codes", format_args!("no event name for code {code}")))?;
            parsed.push((fp, event, expires.as_ref().and_then(|e| e[row])));
        }
        self.suppress_apply_parsed(py, &parsed)
    }

    /// For each address: why it may not be mailed at `now_ms` (the event), or None; a
    /// malformed address answers "invalid".
    #[pyo3(signature = (addresses, now_ms, scope=""))]
    fn suppress_check<'py>(
        &self,
        py: Python<'py>,
        addresses: &Bound<'py, PyList>,
        now_ms: u64,
        scope: &str,
    ) -> PyResult<Bound<'py, PyList>> {
        let items: Vec<Bound<'py, PyString>> = addresses
            .iter()
            .map(|a| a.cast_into::<PyString>().map_err(PyErr::from))
            .collect::<PyResult<_>>()?;
        let texts: Vec<&str> = items.iter().map(|a| a.to_str()).collect::<PyResult<_>>()?;
        let mut found = Vec::with_capacity(texts.len());
        self.lock(py)?
            .wire
            .suppressed_many(texts.iter().copied(), scope, now_ms, &mut found);
        PyList::new(
            py,
            found.into_iter().map(|f| match f {
                Ok(Some(event)) => event_name(py, event).into_any(),
                Ok(None) => py.None().into_bound(py),
                Err(()) => intern!(py, "invalid").clone().into_any(),
            }),
        )
    }

    /// The event that suppresses one address at `now_ms` (global list, or `scope`'s), or
    /// None; CoreError when it is not an address. Allocates nothing for the usual address.
    #[pyo3(signature = (address, now_ms, scope = ""))]
    fn suppressed<'py>(
        &self,
        py: Python<'py>,
        address: &str,
        now_ms: u64,
        scope: &str,
    ) -> PyResult<Option<Bound<'py, PyString>>> {
        let found = self
            .lock(py)?
            .wire
            .suppressed(address, scope, now_ms)
            .map_err(|e| bad("address", e.trim_start_matches("address: ")))?;
        Ok(found.map(|event| event_name(py, event)))
    }

    /// (addresses listed, bytes the set takes).
    fn suppress_stats(&self, py: Python<'_>) -> PyResult<(usize, usize)> {
        let g = self.lock(py)?;
        Ok((g.wire.suppress.len(), g.wire.suppress.bytes()))
    }

    /// Drop the soft bounces expired at `now_ms`; how many.
    fn suppress_sweep(&self, py: Python<'_>, now_ms: u64) -> PyResult<usize> {
        Ok(self.lock(py)?.wire.suppress.sweep(now_ms))
    }

    /// The set as bytes (for a fast restart), copied `SLOTS_PER_HOLD` slots per hold of the
    /// engine's lock. Only the engine's own thread changes the set, and it is in here, so
    /// the parts are of one state while the MTA sockets go on reading it between them.
    fn suppress_snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let (mut out, slots) = {
            let g = self.lock(py)?;
            (g.wire.suppress.bytes_head(), g.wire.suppress.slot_count())
        };
        for start in (0..slots).step_by(SLOTS_PER_HOLD) {
            let range = start..(start + SLOTS_PER_HOLD).min(slots);
            self.lock(py)?.wire.suppress.bytes_slots(range, &mut out);
        }
        self.lock(py)?.wire.suppress.bytes_expiries(&mut out);
        Ok(PyBytes::new(py, &out))
    }

    /// Replace the set with one from `suppress_snapshot`, keyed with the current key. The
    /// set is built without the engine's lock, then swapped in.
    fn suppress_restore(&self, py: Python<'_>, data: &[u8]) -> PyResult<usize> {
        let key = self.lock(py)?.wire.suppress.key();
        let set = SuppressionSet::from_bytes(key, data).map_err(|m| bad("snapshot", m))?;
        let n = set.len();
        let old = std::mem::replace(&mut self.lock(py)?.wire.suppress, set);
        drop(old); // freed without the lock
        Ok(n)
    }

    /// Denied acquire and pick decisions since the engine was made: [(ip, provider, reason,
    /// count)] (for metrics).
    fn denial_counts(&self, py: Python<'_>) -> PyResult<Vec<(String, String, &'static str, u64)>> {
        let g = self.lock(py)?;
        Ok(g.engine
            .denials
            .iter()
            .filter_map(|(&(key, reason), &n)| {
                let (ip, provider) = g.engine.key_names(key).ok()?;
                Some((ip, provider.to_owned(), reason.as_str(), n))
            })
            .collect())
    }

    /// Protocol counters since the engine was made (for metrics).
    fn wire_stats(&self, py: Python<'_>) -> PyResult<std::collections::HashMap<&'static str, u64>> {
        Ok(stats_map(&self.lock(py)?.wire.stats))
    }
}

/// The Python name of a suppression event, interned (no new string per lookup).
fn event_name(py: Python<'_>, event: SuppressEvent) -> Bound<'_, PyString> {
    match event {
        SuppressEvent::HardBounce => intern!(py, "hard_bounce"),
        SuppressEvent::Complaint => intern!(py, "complaint"),
        SuppressEvent::Unsubscribe => intern!(py, "unsubscribe"),
        SuppressEvent::Manual => intern!(py, "manual"),
        SuppressEvent::SoftBounce => intern!(py, "soft_bounce"),
    }
    .clone()
}

/// Suppression events applied per hold of the engine's lock.
const EVENTS_PER_HOLD: usize = 4096;
/// Table slots read per hold of the engine's lock when the set is copied (512 KiB).
const SLOTS_PER_HOLD: usize = 1 << 16;

/// A fingerprint the set can hold (61 bits, never 0), else the error naming it.
fn fingerprint_in_range(fp: u64) -> PyResult<u64> {
    if (1..1 << 61).contains(&fp) {
        Ok(fp)
    } else {
        Err(bad("fingerprint", format_args!("out of range: {fp}")))
    }
}

/// A log event's name as the set folds it: None for `remove`, else the listing event.
fn listing_event(name: &str) -> PyResult<Option<SuppressEvent>> {
    if name == "remove" {
        return Ok(None);
    }
    SuppressEvent::parse(name)
        .map(Some)
        .ok_or_else(|| bad("event", format_args!("unknown suppression event {name:?}")))
}

impl PyEngine {
    /// Apply parsed events, `EVENTS_PER_HOLD` per hold of the engine's lock.
    fn suppress_apply_parsed(
        &self,
        py: Python<'_>,
        parsed: &[(u64, Option<SuppressEvent>, Option<u64>)],
    ) -> PyResult<usize> {
        let mut changed = 0;
        for chunk in parsed.chunks(EVENTS_PER_HOLD) {
            self.suppress_make_room(py, chunk.iter().filter(|e| e.1.is_some()).count())?;
            let mut g = self.lock(py)?;
            for &(fp, event, expires_ms) in chunk {
                changed += usize::from(match event {
                    None => g.wire.suppress.remove(fp),
                    Some(e) => g
                        .wire
                        .suppress
                        .insert(fp, e, expires_ms)
                        .map_err(|m| bad("suppression", m))?,
                });
            }
        }
        Ok(changed)
    }

    /// Room for `more` new addresses: a table that would have to grow is copied into a
    /// bigger one a range of slots per hold of the lock, then swapped in, so the MTA sockets
    /// never wait for the whole rehash (seconds at 10M addresses). Only the engine's own
    /// thread changes the set, and it is in here, so the ranges are of one state.
    fn suppress_make_room(&self, py: Python<'_>, more: usize) -> PyResult<()> {
        let (mut fresh, slots) = {
            let g = self.lock(py)?;
            let set = &g.wire.suppress;
            if set.has_room(more) {
                return Ok(());
            }
            (set.with_room_for((set.len() + more) * 2), set.slot_count())
        };
        for start in (0..slots).step_by(SLOTS_PER_HOLD) {
            let range = start..(start + SLOTS_PER_HOLD).min(slots);
            let g = self.lock(py)?;
            g.wire
                .suppress
                .copy_slots(range, &mut fresh)
                .map_err(|m| bad("suppression", m))?;
        }
        let old = std::mem::replace(&mut self.lock(py)?.wire.suppress, fresh);
        drop(old); // freed without the lock
        Ok(())
    }
}
