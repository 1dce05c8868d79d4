//! `kiln._core.LatestRows`: which rows of an import file change anything
//! (`crate::suppress::dedupe`), a batch of rows at a time, the GIL let go meanwhile.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::bad;
use crate::suppress::dedupe::LatestRows;

/// Each fingerprint's event code in its latest row of one import file so far.
#[pyclass(frozen, module = "kiln._core", name = "LatestRows")]
pub struct PyLatestRows {
    inner: Mutex<LatestRows>,
}

#[pymethods]
impl PyLatestRows {
    #[new]
    fn new() -> Self {
        Self {
            inner: Mutex::new(LatestRows::new()),
        }
    }

    /// Fingerprints seen so far.
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.locked()?.len())
    }

    /// Mark the next rows in file order: `fingerprints` as native-endian u64s and `codes`
    /// one byte a row; `refused` the rows whose address was refused. (keep, first,
    /// duplicates): a byte of 0 or 1 a row for "keep it" and "the file's first row of its
    /// address", and how many rows repeat their address's latest event.
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts the list into an owned value
    fn rows<'py>(
        &self,
        py: Python<'py>,
        fingerprints: &[u8],
        codes: &[u8],
        refused: Vec<usize>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, usize)> {
        if fingerprints.len() != codes.len() * 8 {
            return Err(bad(
                "rows",
                format_args!(
                    "{} codes, {} fingerprint bytes",
                    codes.len(),
                    fingerprints.len()
                ),
            ));
        }
        let marks = py.detach(|| {
            let fps: Vec<u64> = fingerprints
                .chunks_exact(8)
                .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])))
                .collect();
            self.inner
                .lock()
                .map(|mut latest| latest.rows(&fps, codes, &refused))
                .map_err(|_| "poisoned")
        });
        let marks = marks.map_err(|m| bad("LatestRows", m))?;
        Ok((
            PyBytes::new(py, &marks.keep),
            PyBytes::new(py, &marks.first),
            marks.duplicates,
        ))
    }
}

impl PyLatestRows {
    fn locked(&self) -> PyResult<std::sync::MutexGuard<'_, LatestRows>> {
        self.inner.lock().map_err(|_| bad("LatestRows", "poisoned"))
    }
}
