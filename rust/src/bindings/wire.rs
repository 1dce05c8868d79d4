//! The native protocol's results as Python sees them: `Served`, the tallies and reports
//! rows with keys named, and the protocol counters.

use std::collections::HashMap;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::Engine;
use crate::protocol::{Report, Served, Tally, WireStats};

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

impl PyServed {
    /// The reply bytes `out` and what `served` says of the input `data`.
    pub(super) fn new(py: Python<'_>, data: &[u8], out: &[u8], served: &Served) -> Self {
        Self {
            reply: PyBytes::new(py, out).unbind(),
            consumed: served.consumed,
            upcall: served
                .upcall
                .map(|(a, b)| PyBytes::new(py, &data[a..b]).unbind()),
            too_long: served.too_long,
        }
    }
}

/// (ip, provider, granted, delivered, deferred, bounced, complaints).
pub(super) type TallyRow = (String, String, u64, u64, u64, u64, u64);

/// (at_ms, ip, provider, result, n, code, enhanced, text).
pub(super) type ReportRow = (
    u64,
    String,
    String,
    &'static str,
    u32,
    Option<u16>,
    Option<String>,
    Option<String>,
);

/// The tallies with each key named (its IP and provider).
pub(super) fn tally_rows(engine: &Engine, tallies: Vec<(u32, Tally)>) -> Vec<TallyRow> {
    tallies
        .into_iter()
        .map(|(key, t)| {
            let (ip, provider) = engine.key_names(key).expect("own keys");
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
        .collect()
}

/// The reports, in order, with each key named (its IP and provider).
pub(super) fn report_rows(engine: &Engine, reports: Vec<Report>) -> Vec<ReportRow> {
    reports
        .into_iter()
        .map(|r| {
            let (ip, provider) = engine.key_names(r.key).expect("own keys");
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
        .collect()
}

/// `Engine.wire_stats`: each counter by name.
pub(super) fn stats_map(s: &WireStats) -> HashMap<&'static str, u64> {
    [
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
    .collect()
}
