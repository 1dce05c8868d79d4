//! `Decision` and `BatchDecisions`: what the hot calls hand Python.

use std::net::IpAddr;

use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};

use super::lock::PyEngine;
use super::{reason_str, tier_str};
use crate::decision::Decision;

/// A decision: granted (how many, on which IP) or denied (why, and when to ask again).
#[pyclass(frozen, module = "kiln._core", name = "Decision", skip_from_py_object)]
pub struct PyDecision {
    pub(super) inner: Decision,
    pub(super) ip: Py<PyString>,
}

#[pymethods]
impl PyDecision {
    /// Messages granted: the full `n` asked for, or 0 when denied.
    #[getter]
    fn granted(&self) -> u32 {
        self.inner.granted
    }

    /// Why: "granted", or the first holding limit (paused, retired, suspended, daily_cap,
    /// hourly_cap, ip_daily_cap, ip_hourly_cap, rate, reservation).
    #[getter]
    fn reason<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        reason_str(py, self.inner.reason)
    }

    /// 0 when granted; when denied, ms after which asking again succeeds if nothing else
    /// is granted meanwhile, or None when no time is known (paused, too large, no calendar).
    #[getter]
    fn retry_after_ms(&self) -> Option<u64> {
        self.inner.retry_after_ms
    }

    /// The key handle charged (or, for a denial, the one that held it back).
    #[getter]
    fn key(&self) -> u32 {
        self.inner.key
    }

    /// The sending IP of that key.
    #[getter]
    fn ip(&self, py: Python<'_>) -> Py<PyString> {
        self.ip.clone_ref(py)
    }

    /// For `pick`: "warming", "warm" or "overflow"; "direct" for `acquire` and denials.
    #[getter]
    fn tier<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        tier_str(py, self.inner.tier)
    }

    fn __bool__(&self) -> bool {
        self.inner.is_granted()
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<PyDecision>().is_ok_and(|o| {
            let o = o.get();
            o.inner == self.inner && o.ip.bind(py).as_any().eq(self.ip.bind(py)).unwrap_or(false)
        })
    }

    fn __hash__(&self) -> u64 {
        let d = &self.inner;
        (u64::from(d.granted) << 40)
            ^ (u64::from(d.key) << 8)
            ^ u64::from(d.reason as u8)
            ^ d.retry_after_ms.unwrap_or(u64::MAX).rotate_left(17)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let d = &self.inner;
        let ip = self.ip.bind(py).to_string();
        if d.is_granted() {
            format!(
                "Decision(granted={}, ip={ip:?}, key={}, tier={:?})",
                d.granted,
                d.key,
                d.tier.as_str()
            )
        } else {
            let retry = d
                .retry_after_ms
                .map_or_else(|| "None".to_owned(), |r| r.to_string());
            format!(
                "Decision(granted=0, reason={:?}, retry_after_ms={retry}, ip={ip:?}, key={})",
                d.reason.as_str(),
                d.key
            )
        }
    }
}

/// The decisions of one `acquire_batch` call, in request order.
#[pyclass(frozen, module = "kiln._core", name = "BatchDecisions")]
pub struct PyBatch {
    pub(super) engine: Py<PyEngine>,
    pub(super) decisions: Vec<Decision>,
    /// (IP handle, address) of each decision's key, read when the batch was decided.
    pub(super) names: Vec<(u32, IpAddr)>,
}

impl PyBatch {
    fn decision(&self, py: Python<'_>, i: usize) -> PyDecision {
        let (ip, addr) = self.names[i];
        self.engine
            .get()
            .decision_py(py, (self.decisions[i], ip, addr))
    }
}

#[pymethods]
impl PyBatch {
    fn __len__(&self) -> usize {
        self.decisions.len()
    }

    fn __getitem__(&self, py: Python<'_>, index: isize) -> PyResult<PyDecision> {
        let len = self.decisions.len();
        let i = if index < 0 {
            len.checked_sub(index.unsigned_abs())
        } else {
            Some(index.unsigned_abs())
        };
        match i {
            Some(i) if i < len => Ok(self.decision(py, i)),
            _ => Err(PyIndexError::new_err("batch index out of range")),
        }
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let all = (0..self.decisions.len())
            .map(|i| self.decision(py, i))
            .collect::<Vec<_>>();
        PyList::new(py, all)?
            .as_any()
            .try_iter()
            .map(Bound::into_any)
    }

    /// Total messages granted across the batch.
    #[getter]
    fn granted(&self) -> u64 {
        self.decisions.iter().map(|d| u64::from(d.granted)).sum()
    }

    /// How many requests were denied.
    #[getter]
    fn denied(&self) -> usize {
        self.decisions.iter().filter(|d| !d.is_granted()).count()
    }

    /// Granted count per request, in order.
    fn granted_counts(&self) -> Vec<u32> {
        self.decisions.iter().map(|d| d.granted).collect()
    }
}
