//! The only files that know about Python: `kiln._core`.
//!
//! Wrappers are frozen with a `Mutex` inside. Engine work happens under the lock and touches
//! only Rust data; Python objects are made after it is released, so no Python code runs and
//! the GIL is never let go while it is held. A caller that finds the lock taken waits for it
//! with the GIL released. Together these rule out the lock-versus-GIL deadlock (one thread
//! holding the lock and waiting for the GIL, another holding the GIL and waiting for the lock).

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyString;

use crate::classify::{Class, Scope};
use crate::decision::{Reason, Tier};

mod convert;
mod csvread;
mod decision;
mod dedupe;
mod engine;
mod limits;
mod lock;
mod rules;
mod server;
mod snapshot;
mod wire;

use decision::{PyBatch, PyDecision};
use dedupe::PyLatestRows;
use lock::PyEngine;
use rules::PyRules;
use server::PyMtaServer;
use wire::PyServed;

create_exception!(
    _core,
    CoreError,
    PyValueError,
    "Bad input to the kiln engine: an argument out of range, an unknown handle or name, \
     or a corrupt snapshot. Being throttled is never an error."
);

#[allow(clippy::needless_pass_by_value)] // shaped for `map_err(err)`
fn err(e: crate::error::CoreError) -> PyErr {
    CoreError::new_err(e.to_string())
}

fn bad(name: &str, problem: impl std::fmt::Display) -> PyErr {
    CoreError::new_err(format!("{name}: {problem}"))
}

/// A non-negative integer argument that fits `T`, or a `CoreError` naming it.
fn arg<T: TryFrom<i128>>(name: &str, v: i128) -> PyResult<T> {
    if v < 0 {
        return Err(bad(name, format_args!("must not be negative, got {v}")));
    }
    T::try_from(v).map_err(|_| bad(name, format_args!("is too large, got {v}")))
}

fn opt_arg<T: TryFrom<i128>>(name: &str, v: Option<i128>) -> PyResult<Option<T>> {
    v.map(|v| arg(name, v)).transpose()
}

/// The Python string of a wire name (`as_str` of one of `all`), interned once per process.
fn wire_name<'py, T: Copy + PartialEq>(
    py: Python<'py>,
    cache: &PyOnceLock<Vec<Py<PyString>>>,
    all: &[T],
    as_str: fn(T) -> &'static str,
    value: T,
) -> Bound<'py, PyString> {
    let names = cache.get_or_init(py, || {
        all.iter()
            .map(|&v| PyString::intern(py, as_str(v)).unbind())
            .collect()
    });
    let i = all
        .iter()
        .position(|&v| v == value)
        .expect("`all` lists every value");
    names[i].bind(py).clone()
}

fn reason_str(py: Python<'_>, r: Reason) -> Bound<'_, PyString> {
    static NAMES: PyOnceLock<Vec<Py<PyString>>> = PyOnceLock::new();
    wire_name(py, &NAMES, &Reason::ALL, Reason::as_str, r)
}

fn tier_str(py: Python<'_>, t: Tier) -> Bound<'_, PyString> {
    static NAMES: PyOnceLock<Vec<Py<PyString>>> = PyOnceLock::new();
    wire_name(py, &NAMES, &Tier::ALL, Tier::as_str, t)
}

fn class_str(py: Python<'_>, c: Class) -> Bound<'_, PyString> {
    static NAMES: PyOnceLock<Vec<Py<PyString>>> = PyOnceLock::new();
    wire_name(py, &NAMES, &Class::ALL, Class::as_str, c)
}

fn scope_str(py: Python<'_>, s: Scope) -> Bound<'_, PyString> {
    static NAMES: PyOnceLock<Vec<Py<PyString>>> = PyOnceLock::new();
    wire_name(py, &NAMES, &Scope::ALL, Scope::as_str, s)
}

/// Panics on purpose, so tests can show a Rust panic reaches Python as an exception.
#[pyfunction]
fn _panic_for_tests() {
    panic!("deliberate panic for tests");
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // `m.add` also lists each name in `__all__`; the test hook stays out of it.
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_NOW_MS", crate::limiter::MAX_NOW_MS)?;
    m.add("CoreError", m.py().get_type::<CoreError>())?;
    m.add_class::<PyEngine>()?;
    m.add_class::<PyDecision>()?;
    m.add_class::<PyBatch>()?;
    m.add_class::<PyServed>()?;
    m.add_class::<PyRules>()?;
    m.add_class::<PyMtaServer>()?;
    m.add_class::<PyLatestRows>()?;
    m.add("MAX_LINE_BYTES", crate::protocol::MAX_LINE_BYTES)?;
    m.add_function(wrap_pyfunction!(rules::normalise_reply, m)?)?;
    m.add_function(wrap_pyfunction!(rules::check_pattern, m)?)?;
    m.add_function(wrap_pyfunction!(csvread::split_csv_lines, m)?)?;
    m.add_function(wrap_pyfunction!(csvread::evidence_json, m)?)?;
    m.add_function(wrap_pyfunction!(csvread::all_normal_addresses, m)?)?;
    m.add_function(wrap_pyfunction!(csvread::unix_times_ms, m)?)?;
    m.setattr("_panic_for_tests", wrap_pyfunction!(_panic_for_tests, m)?)?;
    Ok(())
}
