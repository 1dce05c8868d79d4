//! SMTP reply rules from Python: `CompiledRules`, rule tuples read, `normalise_reply`, and
//! `Engine.classify`'s answer as a tuple.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use super::snapshot::{fields, get};
use super::{bad, class_str, err, scope_str, CoreError};
use crate::classify::{
    self, Class, Classification, Classifier, CodeSpec, Provider, RuleDef, Scope,
};

/// Reply rules compiled away from any engine: on any thread, with the GIL released, so a
/// reload compiles them on a worker and the event loop only swaps them in (`use_rules`).
#[pyclass(frozen, module = "kiln._core", name = "CompiledRules")]
pub struct PyRules {
    pub(super) inner: Arc<Classifier>,
}

#[pymethods]
impl PyRules {
    /// Compile rules given as `Engine.set_rules` takes them (CoreError naming the rule id).
    #[new]
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts a list into an owned Vec
    fn new(py: Python<'_>, rules: Vec<Bound<'_, PyAny>>) -> PyResult<Self> {
        Ok(Self {
            inner: compile_rules(py, &rules)?,
        })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

/// Rule tuples read, then compiled with the GIL released.
pub(super) fn compile_rules(
    py: Python<'_>,
    rules: &[Bound<'_, PyAny>],
) -> PyResult<Arc<Classifier>> {
    let defs = rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule_from_py(i, r))
        .collect::<PyResult<Vec<_>>>()?;
    let classifier = py.detach(|| Classifier::new(defs)).map_err(err)?;
    Ok(Arc::new(classifier))
}

pub(super) fn reply_code(code: Option<i128>) -> PyResult<Option<u16>> {
    code.map(classify::check_reply_code)
        .transpose()
        .map_err(err)
}

pub(super) fn reply_enhanced(enhanced: Option<&str>) -> PyResult<()> {
    match enhanced {
        Some(e) if !classify::valid_enhanced(e) => Err(bad(
            "enhanced",
            format_args!("must be an enhanced status code like 4.7.28, got {e:?}"),
        )),
        _ => Ok(()),
    }
}

/// `None` or a list of `T`, for one field of rule `id`.
pub(super) fn opt_list<'py, T: pyo3::conversion::FromPyObjectOwned<'py>>(
    obj: &Bound<'py, PyAny>,
    id: &str,
    field: &str,
    what: &str,
) -> PyResult<Option<Vec<T>>> {
    if obj.is_none() {
        return Ok(None);
    }
    if obj.is_instance_of::<PyString>() {
        return Err(rule_bad(
            id,
            field,
            format_args!("must be a list of {what} or None"),
        ));
    }
    let items = obj
        .try_iter()
        .map_err(|_| rule_bad(id, field, format_args!("must be a list of {what} or None")))?;
    items
        .map(|item| {
            item?
                .extract::<T>()
                .map_err(|_| rule_bad(id, field, format_args!("must be a list of {what}")))
        })
        .collect::<PyResult<Vec<T>>>()
        .map(Some)
}

pub(super) fn rule_bad(id: &str, field: &str, problem: impl std::fmt::Display) -> PyErr {
    CoreError::new_err(format!("rules: rule {id:?}: {field}: {problem}"))
}

/// One rule tuple: (id, providers, codes, enhanced, text, class, scope, fallback).
pub(super) fn rule_from_py(i: usize, obj: &Bound<'_, PyAny>) -> PyResult<RuleDef> {
    let f = fields(obj, 8, &format!("rules[{i}]"))?;
    let id: String = get(&f[0], &format!("rules[{i}] id"))?;
    let providers = opt_list::<String>(&f[1], &id, "providers", "names")?;
    let codes = if f[2].is_none() {
        None
    } else {
        let mut v = Vec::new();
        let items = f[2]
            .try_iter()
            .map_err(|_| rule_bad(&id, "code", "must be a list of codes or None"))?;
        for item in items {
            let item = item?;
            let spec = if let Ok(n) = item.extract::<i64>() {
                u16::try_from(n).ok().and_then(CodeSpec::exact)
            } else if let Ok(s) = item.extract::<String>() {
                CodeSpec::parse(&s)
            } else {
                None
            };
            v.push(spec.ok_or_else(|| {
                rule_bad(
                    &id,
                    "code",
                    format_args!("must be codes 200-599 or 2xx/4xx/5xx, got {item}"),
                )
            })?);
        }
        Some(v)
    };
    let enhanced = opt_list::<String>(&f[3], &id, "enhanced", "enhanced codes")?;
    let text: String = get(&f[4], &format!("rule {id:?} text"))?;
    let class: String = get(&f[5], &format!("rule {id:?} class"))?;
    let scope: String = get(&f[6], &format!("rule {id:?} scope"))?;
    let fallback: bool = get(&f[7], &format!("rule {id:?} fallback"))?;
    let class = Class::parse(&class).ok_or_else(|| {
        let all: Vec<&str> = Class::ALL.iter().map(|c| c.as_str()).collect();
        rule_bad(
            &id,
            "class",
            format_args!("must be one of {}, got {class:?}", all.join(", ")),
        )
    })?;
    let scope = Scope::parse(&scope).ok_or_else(|| {
        let all: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
        rule_bad(
            &id,
            "scope",
            format_args!("must be one of {}, got {scope:?}", all.join(", ")),
        )
    })?;
    Ok(RuleDef {
        id,
        providers,
        codes,
        enhanced,
        text,
        class,
        scope,
        fallback,
    })
}

/// The single-line form `CODE ENH text` of an SMTP reply, as rules see it: lines joined,
/// repeated continuation prefixes (`421-4.7.28`) dropped, whitespace collapsed. `code` and
/// `enhanced` missing are read from the start of `text`.
#[pyfunction]
#[pyo3(signature = (code, enhanced, text))]
pub(super) fn normalise_reply(
    code: Option<i128>,
    enhanced: Option<&str>,
    text: &str,
) -> PyResult<String> {
    let code = reply_code(code)?;
    reply_enhanced(enhanced)?;
    Ok(classify::normalise(code, enhanced, text).line)
}

/// Why `pattern` is not a valid rule regex (as `Engine.set_rules` compiles it), or None.
#[pyfunction]
pub(super) fn check_pattern(py: Python<'_>, pattern: &str) -> Option<String> {
    py.detach(|| classify::check_pattern(pattern).err())
}

/// What `Engine.classify` found, as plain data made under the engine's lock (Python objects
/// are made after it is released): `None` when no rule matches, `Some(None)` for a reply the
/// MTA made up itself, else (class, scope, rule id, ids of every matching rule).
pub(super) type Found = Option<Option<(Class, Scope, Box<str>, Vec<Box<str>>)>>;

/// Classify a reply whose `code` and `enhanced` were checked (`reply_code`, `reply_enhanced`).
pub(super) fn classify_found(
    c: &Classifier,
    provider: Option<&str>,
    code: Option<u16>,
    enhanced: Option<&str>,
    text: &str,
) -> Found {
    let provider = provider.map_or(Provider::Any, Provider::Named);
    match c.classify(provider, code, enhanced, text).1 {
        Classification::Unclassified => None,
        Classification::Internal => Some(None),
        Classification::Classified { rule, matched } => {
            let r = c.rule(rule);
            let ids: Vec<Box<str>> = matched.iter().map(|&m| c.rule(m).id.clone()).collect();
            Some(Some((r.class, r.scope, r.id.clone(), ids)))
        }
    }
}

/// `Engine.classify`'s answer: (class, scope, rule_id, matched_ids), or None.
pub(super) fn found_to_py(py: Python<'_>, found: Found) -> PyResult<Option<Bound<'_, PyTuple>>> {
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
