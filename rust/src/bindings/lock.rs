//! The Python `Engine` object: the lock that guards the core, who may take it, and the
//! Python strings of IP addresses kept across calls. Its methods are in `engine.rs`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use pyo3::prelude::*;
use pyo3::types::PyString;

use super::decision::PyDecision;
use super::CoreError;
use crate::decision::Decision;
use crate::engine::Engine;
use crate::protocol::Wire;
use crate::resp::Resp;
use crate::socketmap::TransportMap;

/// An IP address and its Python string.
pub(super) type IpName = (IpAddr, Py<PyString>);

/// What the engine's lock guards: plain Rust data only, never a Python object.
pub(super) struct Inner {
    pub(super) engine: Engine,
    /// The native protocol's routes, tallies and reports.
    pub(super) wire: Wire,
    /// Postfix's transport table: transports per IP and grants waiting for their lookup.
    pub(super) postfix: TransportMap,
    /// The Redis-protocol listener's state: `CL.THROTTLE` keys.
    pub(super) resp: Resp,
}

impl Inner {
    /// A decision with the IP handle and address of its key, for `PyEngine::decision_py`.
    pub(super) fn named(&self, d: Decision) -> (Decision, u32, IpAddr) {
        let (ip, _) = self.engine.key_handles(d.key);
        (d, ip, self.engine.ip_addr(ip))
    }

    /// Swap in a restored engine; routes follow provider names to the new handles. The
    /// restored engine is not changed (no provider is added to it).
    pub(super) fn replace(&mut self, mut engine: Engine) {
        let map = engine.succeed(&self.engine);
        self.engine = engine;
        self.wire.remap_providers(&map);
    }
}

/// The throttle engine: every limit, counter, pool and queued message of one daemon.
#[pyclass(frozen, module = "kiln._core", name = "Engine")]
pub struct PyEngine {
    /// Shared with the MTA socket's serving thread (`MtaServer`), which locks it for pure
    /// Rust work only.
    inner: Arc<Mutex<Inner>>,
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
    /// An engine with no keys, limits or rules, that any thread may call.
    pub(super) fn fresh() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                engine: Engine::new(),
                wire: Wire::new(),
                postfix: TransportMap::new(),
                resp: Resp::new(),
            })),
            ip_cache: Mutex::new(Vec::new()),
            owner: AtomicU64::new(0),
        }
    }

    /// The lock itself, for the MTA socket's serving thread (never touches Python).
    pub(super) fn shared_inner(&self) -> Arc<Mutex<Inner>> {
        Arc::clone(&self.inner)
    }

    /// From now on only the calling thread may take the lock (`pin_thread`).
    pub(super) fn pin_to_this_thread(&self) {
        self.owner.store(THREAD_NO.with(|n| *n), Ordering::Relaxed);
    }

    /// The engine's lock, for work that touches no Python object.
    ///
    /// Two rules keep the lock and the GIL from ever waiting on each other (a thread that
    /// holds the lock never needs the GIL, and a thread that waits for the lock lets the GIL
    /// go): nothing between `lock` and the guard's drop makes or touches a Python object, and
    /// a contended lock is waited for with the GIL released (`Python::detach`). A pinned
    /// engine (`pin_thread`) also refuses callers from any thread but its own.
    pub(super) fn lock(&self, py: Python<'_>) -> PyResult<MutexGuard<'_, Inner>> {
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
