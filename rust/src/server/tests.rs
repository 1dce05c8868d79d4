//! The serving thread against a toy handler, over real Unix sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::protocol::MAX_LINE_BYTES;

/// Answers `x` lines with `ok N` (N counts lines served); lines starting `up` are upcalls.
struct Toy(u64);

impl Handler for Toy {
    fn serve(&mut self, input: &[u8], out: &mut Vec<u8>) -> CoreResult<Served> {
        let mut start = 0;
        while let Some(len) = input[start..].iter().position(|&b| b == b'\n') {
            let line = &input[start..start + len];
            let next = start + len + 1;
            if line.len() > MAX_LINE_BYTES {
                return Ok(Served {
                    consumed: start,
                    upcall: None,
                    too_long: true,
                });
            }
            if line.starts_with(b"up") {
                return Ok(Served {
                    consumed: next,
                    upcall: Some((start, start + len)),
                    too_long: false,
                });
            }
            self.0 += 1;
            out.extend_from_slice(format!("ok {}\n", self.0).as_bytes());
            start = next;
        }
        Ok(Served {
            consumed: start,
            upcall: None,
            too_long: false,
        })
    }
}

fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-server-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("s.sock")
}

fn start(name: &str, max_connections: usize) -> (Server, PathBuf) {
    let path = socket_path(name);
    let config = Config {
        max_connections,
        backlog: 128,
    };
    (Server::start(&path, config, Toy(0)).unwrap(), path)
}

fn client(path: &PathBuf) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn line(r: &mut BufReader<UnixStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l
}

/// Upcalls as Python would take them, waiting up to 5 s for at least one.
fn upcalls(server: &Server) -> Vec<(u64, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = server.take_upcalls();
        if !got.is_empty() || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn pipelined_lines_are_answered_in_order_across_reads() {
    let (_server, path) = start("pipelined", 10);
    let (mut s, mut r) = client(&path);
    s.write_all(b"x\nx\nx").unwrap();
    assert_eq!(line(&mut r), "ok 1\n");
    assert_eq!(line(&mut r), "ok 2\n");
    s.write_all(b"\n").unwrap(); // the third line ends in a later read
    assert_eq!(line(&mut r), "ok 3\n");
}

#[test]
fn an_upcall_holds_its_connection_only() {
    let (server, path) = start("upcall", 10);
    let (mut a, mut ra) = client(&path);
    let (mut b, mut rb) = client(&path);
    a.write_all(b"x\nup 1\nx\n").unwrap();
    assert_eq!(line(&mut ra), "ok 1\n");
    let got = upcalls(&server);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"up 1");
    // The other connection is served while the upcall waits.
    b.write_all(b"x\n").unwrap();
    assert_eq!(line(&mut rb), "ok 2\n");
    server.reply(got[0].0, b"answer\n".to_vec());
    assert_eq!(line(&mut ra), "answer\n");
    assert_eq!(line(&mut ra), "ok 3\n"); // the line after the upcall, after its reply
}

#[test]
fn a_line_too_long_gets_an_error_and_the_connection_closes() {
    let (_server, path) = start("too-long", 10);
    let (mut s, mut r) = client(&path);
    let long = vec![b'a'; MAX_LINE_BYTES + 10];
    s.write_all(&long).unwrap();
    assert_eq!(line(&mut r).as_bytes(), NATIVE_REPLIES.too_long);
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn connections_past_the_limit_are_refused_and_the_open_ones_served() {
    let (server, path) = start("limit", 2);
    let (mut a, mut ra) = client(&path);
    let (_b, _rb) = client(&path);
    a.write_all(b"x\n").unwrap();
    assert_eq!(line(&mut ra), "ok 1\n"); // both accepted by now
    let (_c, mut rc) = client(&path);
    assert_eq!(line(&mut rc).as_bytes(), REFUSAL);
    assert_eq!(server.counters().refused.load(Ordering::Relaxed), 1);
    a.write_all(b"x\n").unwrap();
    assert_eq!(line(&mut ra), "ok 2\n");
    assert_eq!(server.counters().connections.load(Ordering::Relaxed), 2);
}

#[test]
fn a_client_that_closes_its_side_gets_every_reply_then_eof() {
    let (server, path) = start("eof", 10);
    let (mut s, mut r) = client(&path);
    s.write_all(b"x\nup\nx\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(line(&mut r), "ok 1\n");
    let got = upcalls(&server);
    server.reply(got[0].0, b"answer\n".to_vec());
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "answer\nok 2\n");
}

#[test]
fn a_reader_that_does_not_read_stops_being_read_and_others_are_served() {
    let (_server, path) = start("slow", 10);
    let (mut slow, _slow_r) = client(&path);
    slow.set_nonblocking(true).unwrap();
    // Ask far more than the high-water mark of replies and never read them.
    let batch = b"x\n".repeat(50_000);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if slow.write(&batch).is_err() {
            break; // its requests are no longer read: the socket filled
        }
    }
    let (mut other, mut ro) = client(&path);
    other.write_all(b"x\n").unwrap();
    assert!(line(&mut ro).starts_with("ok "));
}

#[test]
fn stop_closes_connections_and_joins() {
    let (mut server, path) = start("stop", 10);
    let (mut s, mut r) = client(&path);
    s.write_all(b"x\n").unwrap();
    assert_eq!(line(&mut r), "ok 1\n");
    server.stop();
    assert!(!server.running());
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// Counts `serve` calls; answers every line with `ok`.
struct Counting(std::sync::Arc<AtomicUsize>);

impl Handler for Counting {
    fn serve(&mut self, input: &[u8], out: &mut Vec<u8>) -> CoreResult<Served> {
        self.0.fetch_add(1, Ordering::Relaxed);
        let consumed = input.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for _ in input[..consumed].iter().filter(|&&b| b == b'\n') {
            out.extend_from_slice(b"ok\n");
        }
        Ok(Served {
            consumed,
            upcall: None,
            too_long: false,
        })
    }
}

#[test]
fn a_dripped_line_is_handed_to_the_handler_once() {
    let path = socket_path("drip");
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let config = Config {
        max_connections: 4,
        backlog: 16,
    };
    let _server = Server::start(&path, config, Counting(std::sync::Arc::clone(&calls))).unwrap();
    let (mut s, mut r) = client(&path);
    for _ in 0..20 {
        s.write_all(&[b'x'; 100]).unwrap();
        std::thread::sleep(Duration::from_millis(2)); // each piece its own read
    }
    s.write_all(b"\n").unwrap();
    assert_eq!(line(&mut r), "ok\n");
    assert_eq!(calls.load(Ordering::Relaxed), 1);
}

#[test]
fn a_tcp_address_is_served_like_a_unix_socket() {
    let config = Config {
        max_connections: 1,
        backlog: 16,
    };
    let addr = Address::Tcp("127.0.0.1:0".parse().unwrap());
    let server = Server::start_at(&addr, config, Toy(0)).unwrap();
    let port = server.tcp_addr().unwrap().port();
    assert_ne!(port, 0);
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    (&s).write_all(b"x\nx\n").unwrap();
    let mut got = String::new();
    r.read_line(&mut got).unwrap();
    r.read_line(&mut got).unwrap();
    assert_eq!(got, "ok 1\nok 2\n");
    // The connection limit holds on TCP too: the second client gets the refusal, then EOF.
    let extra = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut refused = String::new();
    BufReader::new(extra).read_to_string(&mut refused).unwrap();
    assert!(refused.contains("error"), "{refused:?}");
    assert!(start("unix-still", 1).0.tcp_addr().is_none());
}
