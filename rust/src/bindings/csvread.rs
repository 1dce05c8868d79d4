//! Import files read fast (`crate::suppress::csvread`): CSV lines split into columns, the
//! evidence JSON of a batch, and two checks of a column. The splitting and the JSON run with
//! the GIL released; Python objects are made after.

use hashbrown::HashMap;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};

use super::arg;
use crate::suppress::csvread::{self, Field};

/// `split_csv_lines`'s answer: (rows, end_byte, columns, trimmed).
type SplitColumns<'py> = (usize, usize, Vec<Bound<'py, PyList>>, Vec<bool>);

/// The lines of `data` from `start_byte` as `csv.reader` splits them (default dialect,
/// `delimiter`), at most `max_rows`, stopping before the first line it leaves to `csv`:
/// not UTF-8, blank or all blank cells, a quoted line break, a stray carriage return, NUL,
/// or over `max_line_bytes`. Returns (rows, end_byte, columns, trimmed): `width` columns of
/// one cell a row (None past a short row's end), the offset after the last line taken, and
/// per column whether every cell is there and unchanged by `str.strip`.
#[pyfunction]
#[pyo3(signature = (data, start_byte, delimiter, width, max_rows, max_line_bytes))]
pub(super) fn split_csv_lines<'py>(
    py: Python<'py>,
    data: &[u8],
    start_byte: i128,
    delimiter: &str,
    width: i128,
    max_rows: i128,
    max_line_bytes: i128,
) -> PyResult<SplitColumns<'py>> {
    let start_byte: usize = arg("start_byte", start_byte)?;
    let width: usize = arg("width", width)?;
    let max_rows: usize = arg("max_rows", max_rows)?;
    let max_line_bytes: usize = arg("max_line_bytes", max_line_bytes)?;
    let &[delimiter] = delimiter.as_bytes() else {
        return Err(super::bad(
            "delimiter",
            format_args!("must be one ASCII character, got {delimiter:?}"),
        ));
    };
    let split = py.detach(|| {
        csvread::split_lines(data, start_byte, delimiter, width, max_rows, max_line_bytes)
    });
    let mut columns = Vec::with_capacity(width);
    for column in 0..width {
        let mut repeats = Repeats::default();
        let cells = (0..split.rows).map(|row| {
            split
                .cell(row, column, width)
                .map(|text| repeats.string(py, text))
        });
        columns.push(PyList::new(py, cells.collect::<Vec<_>>())?);
    }
    Ok((split.rows, split.end, columns, split.trimmed))
}

/// One string object for each short text a column repeats (a status, a code, an event
/// name), while the column repeats them: after `Repeats::TRIAL` cells with fewer than half
/// found again, every cell gets its own.
#[derive(Default)]
struct Repeats<'a, 'py> {
    seen: HashMap<&'a str, Bound<'py, PyString>>,
    asked: usize,
    found: usize,
}

impl<'a, 'py> Repeats<'a, 'py> {
    const TRIAL: usize = 64;
    const MAX_TEXT_BYTES: usize = 16;
    const MAX_SEEN: usize = 64;

    fn string(&mut self, py: Python<'py>, text: &'a str) -> Bound<'py, PyString> {
        let trying = self.asked < Self::TRIAL || self.found * 2 >= self.asked;
        if !trying || text.len() > Self::MAX_TEXT_BYTES {
            return PyString::new(py, text);
        }
        self.asked += 1;
        if let Some(found) = self.seen.get(text) {
            self.found += 1;
            return found.clone();
        }
        let made = PyString::new(py, text);
        if self.seen.len() < Self::MAX_SEEN {
            self.seen.insert(text, made.clone());
        }
        made
    }
}

/// The strings of a list as UTF-8 (None if any is not a `str` or holds a lone surrogate).
fn list_texts<'py>(list: &Bound<'py, PyList>) -> Option<Vec<Bound<'py, PyString>>> {
    list.iter()
        .map(|item| item.cast_into::<PyString>().ok())
        .collect()
}

/// Each row's evidence as `json.dumps({"kind": kind, "line": line, ...}, sort_keys=True)`
/// writes it: `texts` (name, one text a row) left out where empty and cut to
/// `max_text_chars` characters (one fewer and an ellipsis), `numbers` (name, one int or None
/// a row) left out where None. None when a value cannot be read here (not a str, a lone
/// surrogate, an int past 64 bits): the caller then builds the JSON itself.
#[pyfunction]
#[pyo3(signature = (kind, lines, texts, numbers, max_text_chars))]
#[allow(clippy::needless_pass_by_value)] // pyo3 extracts the lists into owned values
pub(super) fn evidence_json<'py>(
    py: Python<'py>,
    kind: &str,
    lines: &Bound<'py, PyList>,
    texts: Vec<(String, Bound<'py, PyList>)>,
    numbers: Vec<(String, Bound<'py, PyList>)>,
    max_text_chars: i128,
) -> PyResult<Option<Bound<'py, PyList>>> {
    let max_text_chars: usize = arg("max_text_chars", max_text_chars)?;
    let n = lines.len();
    let Ok(line_numbers) = lines.extract::<Vec<i64>>() else {
        return Ok(None);
    };
    let mut text_objects = Vec::with_capacity(texts.len());
    for (name, values) in &texts {
        match list_texts(values) {
            Some(objects) if objects.len() == n => text_objects.push((name.as_str(), objects)),
            _ => return Ok(None),
        }
    }
    let mut fields = Vec::with_capacity(texts.len() + numbers.len());
    for (name, objects) in &text_objects {
        let values: Option<Vec<&str>> = objects.iter().map(|s| s.to_str().ok()).collect();
        match values {
            Some(values) => fields.push(Field::Text(name, values)),
            None => return Ok(None),
        }
    }
    for (name, values) in &numbers {
        match values.extract::<Vec<Option<i64>>>() {
            Ok(values) if values.len() == n => fields.push(Field::Number(name, values)),
            _ => return Ok(None),
        }
    }
    let json = py.detach(|| csvread::evidence_json(kind, &line_numbers, &fields, max_text_chars));
    Ok(Some(PyList::new(py, json.rows())?))
}

/// Whether every text is an address `normalise` keeps as it is (`address.is_normal`);
/// False when any is not (or is not a `str`), which says nothing about the others.
#[pyfunction]
pub(super) fn all_normal_addresses(texts: &Bound<'_, PyList>) -> bool {
    texts.iter().all(|item| {
        item.cast_into::<PyString>()
            .ok()
            .is_some_and(|s| s.to_str().is_ok_and(csvread::is_normal_address))
    })
}

/// A column of Unix times written as digits (seconds, or milliseconds from 10^11), trimmed
/// as `str.strip` trims; '' gives None. None for a column holding anything else.
#[pyfunction]
pub(super) fn unix_times_ms(texts: &Bound<'_, PyList>) -> Option<Vec<Option<i64>>> {
    let objects = list_texts(texts)?;
    let values: Option<Vec<&str>> = objects.iter().map(|s| s.to_str().ok()).collect();
    csvread::unix_times_ms(values?)
}
