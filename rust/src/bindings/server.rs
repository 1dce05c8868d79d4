//! `MtaServer`: the MTA socket served by `crate::server` on a thread of its own, answering
//! through the engine's lock with the daemon's clock; upcalls go to Python.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::lock::{Inner, PyEngine};
use super::{arg, bad};
use crate::error::CoreResult;
use crate::protocol::Served;
use crate::protocol::MAX_LINE_BYTES;
use crate::resp;
use crate::server::{Address, Config, Handler, Replies, Server, ANSWER_BUCKETS_NS, NATIVE_REPLIES};
use crate::socketmap;

/// The daemon's clock as the serving thread reads it (kiln.clock: `SystemClock`, or a
/// `ScaledClock` given by `start_ms + (monotonic_ns - anchor_ns) * num / den`).
enum Clock {
    System,
    Scaled {
        start_ms: i128,
        num: i128,
        den: i128,
        anchor_ns: i128,
        /// `time.monotonic_ns()` as Python read it when this clock was made, and the
        /// `Instant` taken at that moment: the monotonic clock without unsafe code.
        base_ns: i128,
        base: Instant,
    },
}

impl Clock {
    fn now_ms(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            Clock::Scaled {
                start_ms,
                num,
                den,
                anchor_ns,
                base_ns,
                base,
            } => {
                let elapsed = i128::try_from(base.elapsed().as_nanos()).unwrap_or(i128::MAX / 2);
                let mono = base_ns + elapsed;
                let ms = start_ms + (mono - anchor_ns) * num / den;
                ms.max(0) as u64
            }
        }
    }
}

/// Which protocol a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// JSON lines (docs/protocol.md), as `Engine.serve`.
    Native,
    /// Postfix's socketmap, answering `transport_maps` (rust/src/socketmap).
    Socketmap,
    /// The socketmap framing answering every request `OK echo:` without deciding anything:
    /// the baseline benches/postfix_bench.py measures the transport table against.
    SocketmapEcho,
    /// The Redis protocol, RESP2 (rust/src/resp).
    Resp,
}

const SOCKETMAP_REPLIES: Replies = Replies {
    refusal: socketmap::REFUSAL,
    too_long: socketmap::BAD_FRAME,
    internal: socketmap::INTERNAL,
};

const RESP_REPLIES: Replies = Replies {
    refusal: resp::REFUSAL,
    // The RESP code writes its own protocol error (or QUIT's +OK) before asking to close.
    too_long: b"",
    internal: resp::INTERNAL,
};

/// Serves one socket's requests through the engine, at the clock's time.
struct CoreHandler {
    inner: Arc<Mutex<Inner>>,
    clock: Clock,
    protocol: Protocol,
}

impl Handler for CoreHandler {
    fn serve(&mut self, input: &[u8], out: &mut Vec<u8>) -> CoreResult<Served> {
        if self.protocol == Protocol::SocketmapEcho {
            return Ok(socketmap::echo(input, out));
        }
        let now_ms = self.clock.now_ms();
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let g = &mut *g;
        match self.protocol {
            Protocol::Native => g.wire.serve(&mut g.engine, input, now_ms, out),
            Protocol::Socketmap => g
                .postfix
                .serve(&mut g.engine, &mut g.wire, input, now_ms, out),
            Protocol::Resp => g.resp.serve(&mut g.engine, &mut g.wire, input, now_ms, out),
            Protocol::SocketmapEcho => Ok(socketmap::echo(input, out)), // answered above
        }
    }

    fn complete(&self, input: &[u8], scanned: usize) -> bool {
        match self.protocol {
            Protocol::Native => input[scanned..].contains(&b'\n'),
            Protocol::Socketmap | Protocol::SocketmapEcho => {
                socketmap::frame(input) != socketmap::Frame::Incomplete
            }
            Protocol::Resp => resp::complete(input, scanned),
        }
    }

    fn max_pending_bytes(&self) -> usize {
        match self.protocol {
            Protocol::Native => MAX_LINE_BYTES,
            Protocol::Socketmap | Protocol::SocketmapEcho => socketmap::MAX_REQUEST_BYTES + 8,
            Protocol::Resp => resp::MAX_PENDING_BYTES,
        }
    }

    fn replies(&self) -> &'static Replies {
        match self.protocol {
            Protocol::Native => &NATIVE_REPLIES,
            Protocol::Socketmap | Protocol::SocketmapEcho => &SOCKETMAP_REPLIES,
            Protocol::Resp => &RESP_REPLIES,
        }
    }
}

/// The MTA socket served on a Rust thread: decisions never wait for Python or the GIL.
/// Upcalls (lines Python answers) are taken with `take_upcalls` when `notify_fd` is
/// readable and answered with `reply`.
#[pyclass(frozen, module = "kiln._core", name = "MtaServer")]
pub struct PyMtaServer {
    server: Mutex<Option<Server>>,
}

impl PyMtaServer {
    fn with<T>(&self, f: impl FnOnce(&Server) -> T) -> PyResult<T> {
        let g = self.server.lock().unwrap_or_else(PoisonError::into_inner);
        g.as_ref().map(f).ok_or_else(|| bad("MtaServer", "stopped"))
    }
}

#[pymethods]
impl PyMtaServer {
    /// Bind `path` (which must not exist) and serve it with `engine`. `clock`: None for the
    /// system clock, or (start_ms, num, den, anchor_ns, monotonic_ns_now) of a ScaledClock.
    /// `protocol`: "native" (JSON lines), "socketmap" (Postfix's transport lookups) or
    /// "socketmap-echo" (a benchmark's baseline: `OK echo:` to everything, nothing decided)
    /// or "resp" (the Redis protocol: `CL.THROTTLE`, `KILN.ACQUIRE`, ...).
    #[new]
    #[allow(clippy::needless_pass_by_value)] // pyo3 extracts the path into an owned value
    /// `tcp`: `path` is a TCP address to listen on instead (`127.0.0.1:6380`, `[::1]:0`).
    #[pyo3(signature = (engine, path, *, backlog, max_connections, clock=None, protocol="native", tcp=false))]
    #[allow(clippy::too_many_arguments)] // Python keywords, each with a default
    fn new(
        engine: &Bound<'_, PyEngine>,
        path: PathBuf,
        backlog: i128,
        max_connections: i128,
        clock: Option<(i128, i128, i128, i128, i128)>,
        protocol: &str,
        tcp: bool,
    ) -> PyResult<Self> {
        let address = if tcp {
            let text = path.to_string_lossy();
            Address::Tcp(text.parse().map_err(|_| {
                bad(
                    "path",
                    format_args!("not a TCP address like 127.0.0.1:6380: {text:?}"),
                )
            })?)
        } else {
            Address::Unix(path.clone())
        };
        let backlog: i32 = arg("backlog", backlog)?;
        let max_connections: usize = arg("max_connections", max_connections)?;
        let clock = match clock {
            None => Clock::System,
            Some((start_ms, num, den, anchor_ns, base_ns)) => {
                if num <= 0 || den <= 0 {
                    return Err(bad("clock", "speed must be positive"));
                }
                Clock::Scaled {
                    start_ms,
                    num,
                    den,
                    anchor_ns,
                    base_ns,
                    base: Instant::now(),
                }
            }
        };
        let protocol = match protocol {
            "native" => Protocol::Native,
            "socketmap" => Protocol::Socketmap,
            "socketmap-echo" => Protocol::SocketmapEcho,
            "resp" => Protocol::Resp,
            other => {
                return Err(bad(
                    "protocol",
                    format_args!(
                        "must be native, socketmap, socketmap-echo or resp, got {other:?}"
                    ),
                ))
            }
        };
        let config = Config {
            max_connections,
            backlog,
        };
        let handler = CoreHandler {
            inner: engine.get().shared_inner(),
            clock,
            protocol,
        };
        let started = Server::start_at(&address, config, handler);
        let server = started.map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!("{}: {e}", path.display()))
        })?;
        Ok(Self {
            server: Mutex::new(Some(server)),
        })
    }

    /// The TCP port served (the one the system chose for port 0); None on a Unix socket.
    fn tcp_port(&self) -> PyResult<Option<u16>> {
        self.with(|s| s.tcp_addr().map(|a| a.port()))
    }

    /// A descriptor that becomes readable when upcalls wait.
    fn notify_fd(&self) -> PyResult<i32> {
        self.with(Server::notify_fd)
    }

    /// The upcalls waiting: [(connection, request line as bytes)], oldest first.
    fn take_upcalls<'py>(&self, py: Python<'py>) -> PyResult<Vec<(u64, Bound<'py, PyBytes>)>> {
        let got = self.with(Server::take_upcalls)?;
        Ok(got
            .into_iter()
            .map(|(c, line)| (c, PyBytes::new(py, &line)))
            .collect())
    }

    /// The reply (whole lines) to connection `conn`'s upcall.
    fn reply(&self, conn: u64, data: &[u8]) -> PyResult<()> {
        self.with(|s| s.reply(conn, data.to_vec()))
    }

    /// Open connections, refusals and accept failures so far, the last failure and whether
    /// the thread runs.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let (connections, refused, failures, error, running) = self.with(|s| {
            let c = s.counters();
            (
                c.connections.load(Ordering::Relaxed),
                c.refused.load(Ordering::Relaxed),
                c.accept_failures.load(Ordering::Relaxed),
                s.last_error(),
                s.running(),
            )
        })?;
        d.set_item("connections", connections)?;
        d.set_item("refused", refused)?;
        d.set_item("accept_failures", failures)?;
        d.set_item("last_error", error)?;
        d.set_item("running", running)?;
        let (buckets, sum_ns) = self.with(|s| {
            let c = s.counters();
            let counts: Vec<u64> = c
                .answer_buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            (counts, c.answer_sum_ns.load(Ordering::Relaxed))
        })?;
        d.set_item("answer_bucket_bounds_ns", ANSWER_BUCKETS_NS.to_vec())?;
        d.set_item("answer_buckets", buckets)?;
        d.set_item("answer_sum_ns", sum_ns)?;
        Ok(d)
    }

    /// Stop serving: connections closed, the thread joined (without the GIL).
    fn stop(&self, py: Python<'_>) {
        let server = self
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut s) = server {
            py.detach(move || s.stop());
        }
    }
}
