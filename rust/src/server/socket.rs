//! What a server listens on: a Unix socket (every kiln socket's default) or TCP on an address
//! the caller chose (the RESP socket's optional loopback port).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use socket2::{Domain, SockAddr, Socket, Type};

/// Where a server listens.
#[derive(Debug, Clone)]
pub enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    /// Bind `address` (a Unix path must not exist) with a listen backlog of `backlog`.
    pub fn bind(address: &Address, backlog: i32) -> io::Result<Self> {
        let socket = match address {
            Address::Unix(path) => {
                let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
                s.bind(&SockAddr::unix(path)?)?;
                s
            }
            Address::Tcp(addr) => {
                let s = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                s.bind(&SockAddr::from(*addr))?;
                s
            }
        };
        socket.listen(backlog)?;
        socket.set_nonblocking(true)?;
        Ok(match address {
            Address::Unix(_) => Self::Unix(UnixListener::from_std(socket.into())),
            Address::Tcp(_) => Self::Tcp(TcpListener::from_std(socket.into())),
        })
    }

    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Self::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Self::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true); // replies are small and awaited
                Stream::Tcp(s)
            }),
        }
    }

    /// The TCP address bound (the port the system chose for port 0); None for Unix.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Unix(_) => None,
            Self::Tcp(l) => l.local_addr().ok(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.flush(),
            Self::Tcp(s) => s.flush(),
        }
    }
}

/// mio registration, passed through to the socket inside.
macro_rules! source_of {
    ($t:ty) => {
        impl Source for $t {
            fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
                match self {
                    Self::Unix(s) => s.register(r, t, i),
                    Self::Tcp(s) => s.register(r, t, i),
                }
            }

            fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
                match self {
                    Self::Unix(s) => s.reregister(r, t, i),
                    Self::Tcp(s) => s.reregister(r, t, i),
                }
            }

            fn deregister(&mut self, r: &Registry) -> io::Result<()> {
                match self {
                    Self::Unix(s) => s.deregister(r),
                    Self::Tcp(s) => s.deregister(r),
                }
            }
        }
    };
}

source_of!(Listener);
source_of!(Stream);
