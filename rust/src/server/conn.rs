//! One client connection of the serving thread: its input, its replies, and what it waits for.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream as StdStream;

use super::socket::Stream;

use super::{Handler, Shared, HIGH_WATER_BYTES, READ_BUDGET_BYTES};

/// Bytes one read may take.
pub const READ_CHUNK_BYTES: usize = 64 << 10;

/// What a turn of `Conn::pump` left.
#[derive(Debug, PartialEq, Eq)]
pub enum Pumped {
    /// Waiting for the client, Python or the socket's write space.
    Idle,
    /// Stopped at the read budget with input possibly left: pump again soon.
    MoreToRead,
    /// Closed: remove it.
    Done,
}

#[derive(Debug)]
#[allow(clippy::struct_excessive_bools)] // four independent facts about one socket
pub struct Conn {
    stream: Stream,
    input: Vec<u8>,
    /// `input[..scanned]` holds no newline.
    scanned: usize,
    out: Vec<u8>,
    written: usize,
    /// An upcall of this connection waits for Python's reply.
    busy: bool,
    /// The socket may have input not yet read (edge-triggered readiness).
    may_read: bool,
    /// The client closed its side.
    eof: bool,
    /// Close once the replies are written (a line too long, an engine error).
    closing: bool,
    /// Registered for write space (only while replies wait to be written).
    write_interest: bool,
    /// The client's close was seen in an event: read on to the end of the stream.
    hangup: bool,
}

impl Conn {
    pub fn new(stream: Stream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            scanned: 0,
            out: Vec::new(),
            written: 0,
            busy: false,
            may_read: true,
            eof: false,
            closing: false,
            write_interest: false,
            hangup: false,
        }
    }

    /// Whether replies wait for write space.
    pub fn wants_write(&self) -> bool {
        self.pending_out() > 0
    }

    /// Whether the socket's registration must change to match `wants_write` (and note that
    /// it will).
    pub fn write_interest_changed(&mut self) -> bool {
        let wants = self.wants_write();
        let changed = wants != self.write_interest;
        self.write_interest = wants;
        changed
    }

    pub fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// The socket became readable (`closed`: the client also closed its side).
    pub fn readable(&mut self, closed: bool) {
        self.may_read = true;
        self.hangup |= closed;
    }

    /// Python's reply to this connection's upcall.
    pub fn replied(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
        self.busy = false;
    }

    fn pending_out(&self) -> usize {
        self.out.len() - self.written
    }

    /// Answer, write and read as far as possible without waiting.
    pub fn pump<H: Handler>(
        &mut self,
        id: u64,
        handler: &mut H,
        shared: &Shared,
        notify: &mut StdStream,
        scratch: &mut [u8],
    ) -> Pumped {
        let mut budget = READ_BUDGET_BYTES;
        loop {
            if !self.busy && !self.closing {
                self.answer(id, handler, shared, notify);
            }
            if self.flush().is_err() {
                return Pumped::Done;
            }
            if self.busy || self.closing || self.eof || !self.may_read {
                break;
            }
            if self.pending_out() > HIGH_WATER_BYTES {
                break; // read again once the client has taken its replies
            }
            if budget == 0 {
                return Pumped::MoreToRead;
            }
            match self.read_some(budget, scratch) {
                Ok(n) => budget = budget.saturating_sub(n),
                Err(()) => return Pumped::Done,
            }
        }
        let drained = self.pending_out() == 0;
        if drained && (self.closing || (self.eof && !self.busy)) {
            return Pumped::Done;
        }
        Pumped::Idle
    }

    /// Read one chunk through `scratch` (shared by every connection: a client dripping a
    /// byte per read costs a byte of buffer, not a chunk). Ok(bytes read); Err: it failed.
    fn read_some(&mut self, budget: usize, scratch: &mut [u8]) -> Result<usize, ()> {
        let want = scratch.len().min(budget.max(1));
        match self.stream.read(&mut scratch[..want]) {
            Ok(0) => {
                self.eof = true;
                Ok(0)
            }
            Ok(n) => {
                self.input.extend_from_slice(&scratch[..n]);
                // A short read emptied the socket: on Linux a later arrival raises a new
                // edge, so the read that would only say WouldBlock is saved. Not once the
                // client closed: its close came with the same edge, and only a read tells.
                if n < want && !self.hangup {
                    self.may_read = false;
                }
                Ok(n)
            }
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => {
                    self.may_read = false;
                    Ok(0)
                }
                io::ErrorKind::Interrupted => Ok(0),
                _ => Err(()),
            },
        }
    }

    /// Answer the complete lines buffered, up to the first upcall.
    fn answer<H: Handler>(
        &mut self,
        id: u64,
        handler: &mut H,
        shared: &Shared,
        notify: &mut StdStream,
    ) {
        if !handler.complete(&self.input, self.scanned) {
            self.scanned = self.input.len();
            if self.input.len() > handler.max_pending_bytes() {
                self.too_long(handler);
            }
            return;
        }
        let started = std::time::Instant::now();
        let served = handler.serve(&self.input, &mut self.out);
        shared
            .counters
            .answered(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        match served {
            Err(_) => {
                self.out.extend_from_slice(handler.replies().internal);
                self.closing = true;
            }
            Ok(served) => {
                if let Some((start, end)) = served.upcall {
                    shared.push_upcall(id, self.input[start..end].to_vec(), notify);
                    self.busy = true;
                }
                self.input.drain(..served.consumed);
                self.scanned = 0;
                if served.too_long {
                    self.too_long(handler);
                } else if !self.busy {
                    // Every complete request is answered: what is left is incomplete.
                    self.scanned = self.input.len();
                    if self.input.len() > handler.max_pending_bytes() {
                        self.too_long(handler);
                    }
                }
            }
        }
    }

    fn too_long<H: Handler>(&mut self, handler: &H) {
        self.out.extend_from_slice(handler.replies().too_long);
        self.closing = true;
        self.input.clear();
        self.scanned = 0;
    }

    /// Write what waits. Err: the connection failed.
    fn flush(&mut self) -> Result<(), ()> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
        } else if self.written > HIGH_WATER_BYTES {
            self.out.drain(..self.written);
            self.written = 0;
        }
        Ok(())
    }
}
