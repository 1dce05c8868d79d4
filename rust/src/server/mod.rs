//! The MTA socket served on a thread of its own, with no Python on the decision path.
//!
//! `Server::start` binds a Unix socket (`start_at`: or a TCP address, `socket.rs`) and runs
//! one thread that accepts, reads, answers every complete line through a `Handler` (the
//! engine under its lock) and writes. A decision never
//! waits for Python's event loop or the GIL. Lines the core hands up (upcalls such as
//! `limits` and `stats`, and operator requests, which Python refuses here) wait in a queue
//! for Python, which a byte on the notify socket wakes; the answer comes back through
//! `Server::reply`. That connection's later lines wait for it (replies stay in order); every
//! other connection goes on being served.
//!
//! The bounds are those of the asyncio listener (python/kiln/daemon/listener.py): a line over
//! `MAX_LINE_BYTES` gets an error reply and the connection closes; a client that reads slower
//! than it asks is not read while more than `HIGH_WATER_BYTES` of replies wait for it;
//! connections past `max_connections` get a refusal line and are closed; an accept that fails
//! for lack of descriptors or memory pauses accepting for `ACCEPT_PAUSE`. Input is scanned
//! once: bytes without a newline are only appended. One connection reads at most
//! `READ_BUDGET_BYTES` per turn, so a flood on one does not starve the others.

mod conn;
mod socket;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::error::CoreResult;
use crate::protocol::{Served, MAX_LINE_BYTES};
use conn::{Conn, Pumped, READ_CHUNK_BYTES};
pub use socket::Address;
use socket::Listener;

/// Write no more than this many bytes ahead of a slow reader before not reading it.
pub const HIGH_WATER_BYTES: usize = 1 << 20;
/// Bytes one connection may read in one turn of the loop.
pub const READ_BUDGET_BYTES: usize = 256 << 10;
/// How long accepting pauses after running out of descriptors or memory.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// The reply to a connection past the limit, before it is closed.
pub const REFUSAL: &[u8] = b"{\"ok\":false,\"error\":\"too many connections; try again\"}\n";

const LISTENER: Token = Token(0);
const WAKE: Token = Token(1);
const FIRST_CONN: usize = 2;

/// The fixed replies of a protocol, written without asking the handler.
#[derive(Debug)]
pub struct Replies {
    /// To a connection past the limit, before it is closed.
    pub refusal: &'static [u8],
    /// To a request over the protocol's size bound, before the connection is closed.
    pub too_long: &'static [u8],
    /// When the handler refuses to serve (a clock out of range): closed after it.
    pub internal: &'static [u8],
}

/// The native protocol's fixed replies (JSON lines).
pub const NATIVE_REPLIES: Replies = Replies {
    refusal: REFUSAL,
    too_long: b"{\"ok\":false,\"error\":\"request line longer than 65536 bytes; closing\"}\n",
    internal: b"{\"ok\":false,\"error\":\"internal error; see the daemon log\"}\n",
};

/// Answers the requests of one connection's input (the engine, under its lock). The framing
/// defaults to the native protocol's: newline-terminated lines of at most `MAX_LINE_BYTES`.
pub trait Handler: Send + 'static {
    /// Answer every complete request of `input` into `out`, up to the first upcall.
    fn serve(&mut self, input: &[u8], out: &mut Vec<u8>) -> CoreResult<Served>;

    /// Whether `input` may hold a complete request (or a framing error `serve` must answer);
    /// `input[..scanned]` was seen before and held none. Called on every read, so cheap.
    fn complete(&self, input: &[u8], scanned: usize) -> bool {
        input[scanned..].contains(&b'\n')
    }

    /// Buffered bytes without a complete request beyond which the connection is closed.
    fn max_pending_bytes(&self) -> usize {
        MAX_LINE_BYTES
    }

    fn replies(&self) -> &'static Replies {
        &NATIVE_REPLIES
    }
}

/// What the server counts, for `status` and the log (read from any thread).
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections open now.
    pub connections: AtomicUsize,
    /// Connections refused at the limit, ever.
    pub refused: AtomicU64,
    /// accept() failures for lack of descriptors or memory, ever.
    pub accept_failures: AtomicU64,
    /// How long the handler took to answer each read buffer (one request, or several
    /// pipelined): counts per bucket of `ANSWER_BUCKETS_NS` (the last: longer), and the sum.
    pub answer_buckets: [AtomicU64; ANSWER_BUCKETS_NS.len() + 1],
    pub answer_sum_ns: AtomicU64,
}

/// Upper bounds (ns) of the answer-time histogram's buckets.
pub const ANSWER_BUCKETS_NS: [u64; 10] = [
    1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 10_000_000,
];

impl Counters {
    /// Count one answer that took `ns`.
    pub fn answered(&self, ns: u64) {
        let i = ANSWER_BUCKETS_NS.partition_point(|&b| b < ns);
        self.answer_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.answer_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// What the serving thread and its owner share.
#[derive(Debug, Default)]
struct Shared {
    upcalls: Mutex<VecDeque<(u64, Vec<u8>)>>,
    replies: Mutex<Vec<(u64, Vec<u8>)>>,
    stop: AtomicBool,
    /// A wake-up byte is on its way to the notify socket and not yet drained.
    notified: AtomicBool,
    counters: Counters,
    /// The last accept() or poll failure, for the log.
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn push_upcall(&self, conn: u64, line: Vec<u8>, notify: &mut StdStream) {
        self.upcalls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back((conn, line));
        self.wake_owner(notify);
    }

    /// Make the notify socket readable (upcalls wait, or a refusal or failure to log).
    fn wake_owner(&self, notify: &mut StdStream) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            // A full socket already holds a byte that wakes the owner: nothing is lost.
            let _ = notify.write(&[1]);
        }
    }

    fn note_error(&self, e: &io::Error) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
    }
}

/// How the serving thread is set up.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Connections at most; more are refused with `REFUSAL`.
    pub max_connections: usize,
    /// The listen backlog.
    pub backlog: i32,
}

/// A Unix socket served by a thread of its own; stopped (and joined) on `stop` or drop.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    notify: StdStream,
    thread: Option<JoinHandle<()>>,
    tcp_addr: Option<SocketAddr>,
}

impl Server {
    /// Bind `path` (which must not exist) and start serving it with `handler`.
    pub fn start<H: Handler>(path: &Path, config: Config, handler: H) -> io::Result<Self> {
        Self::start_at(&Address::Unix(path.to_owned()), config, handler)
    }

    /// Bind `address` and start serving it with `handler`.
    pub fn start_at<H: Handler>(address: &Address, config: Config, handler: H) -> io::Result<Self> {
        let mut listener = Listener::bind(address, config.backlog)?;
        let tcp_addr = listener.tcp_addr();
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (notify, notify_write) = StdStream::pair()?;
        notify.set_nonblocking(true)?;
        notify_write.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let mut looper = Looper {
            poll,
            listener,
            shared: Arc::clone(&shared),
            notify: notify_write,
            handler,
            max_connections: config.max_connections,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
        };
        let thread = std::thread::Builder::new()
            .name("kiln-mta".into())
            .spawn(move || looper.run())?;
        Ok(Self {
            shared,
            waker,
            notify,
            thread: Some(thread),
            tcp_addr,
        })
    }

    /// The socket whose readability says upcalls wait, or a refusal or accept failure is
    /// new (`take_upcalls` drains it).
    pub fn notify_fd(&self) -> RawFd {
        self.notify.as_raw_fd()
    }

    /// The upcalls waiting, oldest first: (connection, request line without its newline).
    pub fn take_upcalls(&self) -> Vec<(u64, Vec<u8>)> {
        let mut sink = [0u8; 256];
        while matches!((&self.notify).read(&mut sink), Ok(n) if n > 0) {}
        self.shared.notified.store(false, Ordering::Release);
        self.shared
            .upcalls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect()
    }

    /// The reply to connection `conn`'s upcall (one or more whole lines); its later lines
    /// are answered next. A connection that has gone meanwhile is ignored.
    pub fn reply(&self, conn: u64, data: Vec<u8>) {
        self.shared
            .replies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((conn, data));
        let _ = self.waker.wake();
    }

    /// The TCP address served (with the port the system chose for port 0); None for Unix.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// The last accept or poll failure (None: none yet).
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the serving thread still runs.
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stop serving: every connection is closed and the thread joined.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ask to hear of write space only while replies wait: a writable event after every reply
/// the client reads would wake the serving thread twice per request.
fn sync_write_interest(registry: &mio::Registry, c: &mut Conn, t: usize) {
    if c.write_interest_changed() {
        let interest = if c.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let _ = registry.reregister(c.stream_mut(), Token(t), interest);
    }
}

/// The serving thread's state.
struct Looper<H> {
    poll: Poll,
    listener: Listener,
    shared: Arc<Shared>,
    notify: StdStream,
    handler: H,
    max_connections: usize,
    conns: HashMap<usize, Conn>,
    next_token: usize,
}

impl<H: Handler> Looper<H> {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut may_accept = true;
        let mut accept_paused_until: Option<Instant> = None;
        // Connections with input left to read after their budget ran out.
        let mut ready: Vec<usize> = Vec::new();
        let mut touched: Vec<usize> = Vec::new();
        let mut scratch = vec![0u8; READ_CHUNK_BYTES];
        loop {
            let timeout = if ready.is_empty() {
                accept_paused_until.map(|t| t.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.shared.note_error(&e);
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            touched.clear();
            touched.append(&mut ready);
            for ev in &events {
                match ev.token() {
                    LISTENER => may_accept = true,
                    WAKE => {}
                    Token(t) => {
                        if let Some(c) = self.conns.get_mut(&t) {
                            if ev.is_readable() || ev.is_read_closed() {
                                c.readable(ev.is_read_closed());
                            }
                            touched.push(t);
                        }
                    }
                }
            }
            if accept_paused_until.is_some_and(|t| Instant::now() >= t) {
                accept_paused_until = None;
            }
            if may_accept && accept_paused_until.is_none() {
                match self.accept_all(&mut touched) {
                    Ok(()) => may_accept = false,
                    Err(()) => accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE),
                }
            }
            let replies: Vec<(u64, Vec<u8>)> = std::mem::take(
                &mut *self
                    .shared
                    .replies
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            for (id, data) in replies {
                if let Some(c) = self.conns.get_mut(&(id as usize)) {
                    c.replied(&data);
                    touched.push(id as usize);
                }
            }
            touched.sort_unstable();
            touched.dedup();
            for &t in &touched {
                let Some(c) = self.conns.get_mut(&t) else {
                    continue;
                };
                let pumped = c.pump(
                    t as u64,
                    &mut self.handler,
                    &self.shared,
                    &mut self.notify,
                    &mut scratch,
                );
                if !matches!(pumped, Pumped::Done) {
                    sync_write_interest(self.poll.registry(), c, t);
                }
                match pumped {
                    Pumped::Idle => {}
                    Pumped::MoreToRead => ready.push(t),
                    Pumped::Done => {
                        if let Some(mut c) = self.conns.remove(&t) {
                            let _ = self.poll.registry().deregister(c.stream_mut());
                        }
                        self.shared
                            .counters
                            .connections
                            .fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.conns.clear();
        self.shared.counters.connections.store(0, Ordering::Relaxed);
    }

    /// Accept until none wait. Err: out of descriptors or memory (pause accepting).
    fn accept_all(&mut self, touched: &mut Vec<usize>) -> Result<(), ()> {
        loop {
            match self.listener.accept() {
                Ok(mut stream) => {
                    if self.conns.len() >= self.max_connections {
                        self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                        let _ = stream.write(self.handler.replies().refusal);
                        self.shared.wake_owner(&mut self.notify);
                        continue; // dropped: closed
                    }
                    let t = self.next_token;
                    self.next_token += 1;
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, Token(t), Interest::READABLE)
                        .is_err()
                    {
                        continue;
                    }
                    self.conns.insert(t, Conn::new(stream));
                    self.shared
                        .counters
                        .connections
                        .fetch_add(1, Ordering::Relaxed);
                    touched.push(t);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    self.shared
                        .counters
                        .accept_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.shared.note_error(&e);
                    self.shared.wake_owner(&mut self.notify);
                    return Err(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
