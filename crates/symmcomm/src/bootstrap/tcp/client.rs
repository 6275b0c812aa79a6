//! A rank's side of the rendezvous: [`TcpStore`], its connection to the master, the hello, and
//! one request at a time with its answer. Any fault leaves the connection marked unusable, so
//! later requests fail at once instead of reading a stale answer.

use std::fmt;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tracing::debug;

use super::master::Master;
use super::wire::{FrameError, MAX_FRAME, Reply, Request, VERSION, is_timeout, read_frame};
use super::{RendezvousConfig, bootstrap_ctx, lock, world_u32};
use crate::bootstrap::Store;
use crate::error::{Error, Result};

/// How much longer than the master's own wait a client waits for an answer.
pub(super) const GRACE: Duration = Duration::from_millis(500);
/// First and largest pause between connection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// Longest single wait of a farewell: the connection is free for this rank's other threads
/// between two.
const FAREWELL_SLICE: Duration = Duration::from_millis(100);

/// A rank's connection to the master; `broken` once a fault left it in an unknown state.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) broken: Option<String>,
}

/// A [`Store`] reached over TCP; rank 0 also serves it.
///
/// Dropping rank 0's store closes its own connection, then waits (at most the rendezvous's
/// timeout) until every other rank has closed its connection before it stops the server, so a
/// rank still finishing its last exchange never meets a closed store.
pub struct TcpStore {
    pub(super) rank: usize,
    pub(super) world_size: usize,
    pub(super) master: String,
    pub(super) timeout: Duration,
    pub(super) conn: Mutex<Conn>,
    pub(super) server: Option<Master>,
    /// Farewells this rank has said.
    pub(super) farewells: AtomicU64,
}

impl fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStore")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("master", &self.master)
            .field("serving", &self.server.is_some())
            .finish()
    }
}

impl Drop for TcpStore {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            // This rank's own connection first: the server then waits only for the others.
            let _ = lock(&self.conn).stream.shutdown(Shutdown::Both);
            server.close(Instant::now() + self.timeout);
        }
    }
}

impl TcpStore {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks that met.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The master's `host:port` (on rank 0, with the port actually bound).
    pub fn master(&self) -> &str {
        &self.master
    }

    /// Say hello and wait for the welcome (or the failure every rank is told) until `deadline`.
    pub(super) fn hello(&self, start: Instant, deadline: Instant) -> Result<()> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let hello = Request::Hello {
            version: VERSION,
            rank: world_u32(self.rank),
            world: world_u32(self.world_size),
            wait_ms: ceil_ms(remaining),
        };
        let frame = hello.encode().map_err(|_| Error::RendezvousFailed {
            rank: self.rank,
            reason: "hello over the frame cap".into(),
        })?;
        let what = "the rendezvous hello";
        let mut conn = lock(&self.conn);
        let stream = &mut conn.stream;
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(remaining.max(Duration::from_millis(1))))
            .and_then(|()| stream.set_read_timeout(Some(remaining + GRACE)))
            .and_then(|()| stream.write_all(&frame))
            .map_err(|e| self.io_error(what, e, start.elapsed()))?;
        let payload = read_frame(stream, MAX_FRAME).map_err(|e| match e {
            FrameError::Io { err, .. } if is_timeout(&err) => Error::Timeout {
                ctx: bootstrap_ctx(self.rank, self.world_size),
                waited: start.elapsed(),
                detail: format!(
                    "rank {}: no welcome and no failure from the master at {} (is rank 0 stuck?)",
                    self.rank, self.master
                ),
            },
            other => self.frame_error(what, other, start.elapsed()),
        })?;
        self.check_welcome(Reply::decode(&payload), start)
    }

    /// The master's answer to the hello: a welcome to this world and protocol, or the error.
    fn check_welcome(
        &self,
        answer: std::result::Result<Reply, String>,
        start: Instant,
    ) -> Result<()> {
        match answer {
            Ok(Reply::Welcome { version, world })
                if version == VERSION && world as usize == self.world_size =>
            {
                Ok(())
            }
            Ok(Reply::Welcome { version, world }) => Err(Error::RendezvousFailed {
                rank: self.rank,
                reason: format!(
                    "the master at {} welcomed a world of {world} (protocol {version}); this rank expects {} (protocol {VERSION})",
                    self.master, self.world_size
                ),
            }),
            Ok(Reply::Failed(f)) => Err(f.into_error(self.rank, self.world_size, start.elapsed())),
            Ok(other) => Err(Error::Malformed {
                rank: self.rank,
                peer: self.master.clone(),
                detail: format!("expected a welcome, got a {} answer", other.name()),
            }),
            Err(detail) => Err(Error::Malformed {
                rank: self.rank,
                peer: self.master.clone(),
                detail,
            }),
        }
    }

    fn io_error(&self, what: &str, err: io::Error, waited: Duration) -> Error {
        use io::ErrorKind::*;
        match err.kind() {
            WouldBlock | TimedOut => Error::Timeout {
                ctx: bootstrap_ctx(self.rank, self.world_size),
                waited,
                detail: format!(
                    "rank {}: no answer from the master at {} to {what}",
                    self.rank, self.master
                ),
            },
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                Error::RendezvousFailed {
                    rank: self.rank,
                    reason: format!(
                        "the master at {} closed the connection during {what} ({err}); did rank 0 exit?",
                        self.master
                    ),
                }
            }
            _ => Error::io(
                format!(
                    "rank {}: {what} with the master at {}",
                    self.rank, self.master
                ),
                err,
            ),
        }
    }

    fn frame_error(&self, what: &str, e: FrameError, waited: Duration) -> Error {
        match e {
            FrameError::Closed => Error::RendezvousFailed {
                rank: self.rank,
                reason: format!(
                    "the master at {} closed the connection during {what}; did rank 0 exit?",
                    self.master
                ),
            },
            FrameError::Malformed(detail) => Error::Malformed {
                rank: self.rank,
                peer: self.master.clone(),
                detail: format!("answer to {what}: {detail}"),
            },
            FrameError::Io { err, .. } => self.io_error(what, err, waited),
        }
    }

    /// Send `req` and read its answer within `within`. Any fault marks the connection broken.
    fn request(&self, what: &str, req: &Request, within: Duration) -> Result<Reply> {
        let frame = req.encode().map_err(|len| Error::InvalidArgument {
            ctx: bootstrap_ctx(self.rank, self.world_size),
            detail: format!(
                "store {what}: the request is {len} bytes, over the {MAX_FRAME}-byte frame cap"
            ),
        })?;
        let mut conn = lock(&self.conn);
        if let Some(why) = &conn.broken {
            return Err(Error::RendezvousFailed {
                rank: self.rank,
                reason: format!(
                    "cannot {what}: the connection to the master at {} is unusable since an earlier fault ({why})",
                    self.master
                ),
            });
        }
        match self.exchange(&mut conn.stream, what, &frame, within) {
            Ok(Reply::Refused(reason)) => Err(Error::RendezvousFailed {
                rank: self.rank,
                reason: format!("the master at {} refused {what}: {reason}", self.master),
            }),
            Ok(reply) => Ok(reply),
            Err(e) => {
                conn.broken = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Write `frame` and read one answer within `within`.
    fn exchange(
        &self,
        stream: &mut TcpStream,
        what: &str,
        frame: &[u8],
        within: Duration,
    ) -> Result<Reply> {
        stream
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .and_then(|()| {
                stream.set_write_timeout(Some(self.timeout.max(Duration::from_millis(1))))
            })
            .and_then(|()| stream.write_all(frame))
            .map_err(|e| self.io_error(what, e, within))?;
        let payload =
            read_frame(stream, MAX_FRAME).map_err(|e| self.frame_error(what, e, within))?;
        Reply::decode(&payload).map_err(|detail| Error::Malformed {
            rank: self.rank,
            peer: self.master.clone(),
            detail: format!("answer to {what}: {detail}"),
        })
    }

    fn unexpected(&self, what: &str, reply: &Reply) -> Error {
        lock(&self.conn).broken = Some(format!("unexpected {} answer", reply.name()));
        Error::Malformed {
            rank: self.rank,
            peer: self.master.clone(),
            detail: format!("answer to {what} is a {} message", reply.name()),
        }
    }
}

/// Connect to the master, retrying with a short backoff until `deadline`. `own` is rank 0's
/// own listening address (no name to resolve).
pub(super) fn connect(
    cfg: &RendezvousConfig,
    master: &str,
    own: Option<SocketAddr>,
    start: Instant,
    deadline: Instant,
) -> Result<TcpStream> {
    let mut backoff = BACKOFF_FIRST;
    let mut last_error = String::from("no attempt fitted in the deadline");
    let mut attempts = 0u64;
    loop {
        let addrs: Vec<SocketAddr> = match own {
            Some(a) => vec![a],
            None => match (cfg.addr.as_str(), cfg.port).to_socket_addrs() {
                Ok(it) => it.collect(),
                Err(e) => {
                    last_error = format!("resolving {}: {e}", cfg.addr);
                    Vec::new()
                }
            },
        };
        for a in addrs {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            attempts += 1;
            match TcpStream::connect_timeout(&a, remaining.min(Duration::from_secs(1))) {
                Ok(s) => {
                    debug!(
                        "rank {}: connected to the master at {master} ({a}) after {attempts} attempt(s)",
                        cfg.rank
                    );
                    return Ok(s);
                }
                Err(e) => last_error = format!("connecting to {a}: {e}"),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::MasterUnreachable {
                rank: cfg.rank,
                addr: master.to_string(),
                waited: now - start,
                last_error: format!("{last_error} ({attempts} attempt(s))"),
            });
        }
        thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Milliseconds in `d`, rounded up (a wait of 0.5 ms must not become no wait).
fn ceil_ms(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let what = format!("set '{key}'");
        let req = Request::Set {
            key: key.to_string(),
            value: value.to_vec(),
        };
        match self.request(&what, &req, self.timeout)? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(&what, &other)),
        }
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Option<Vec<u8>>> {
        let what = format!("get '{key}'");
        let wait = deadline.saturating_duration_since(Instant::now());
        let req = Request::Get {
            key: key.to_string(),
            wait_ms: ceil_ms(wait),
        };
        match self.request(&what, &req, wait + GRACE)? {
            Reply::Value(v) => Ok(Some(v)),
            Reply::Absent => Ok(None),
            other => Err(self.unexpected(&what, &other)),
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let what = format!("add {delta} to '{key}'");
        let req = Request::Add {
            key: key.to_string(),
            delta,
        };
        match self.request(&what, &req, self.timeout)? {
            Reply::Count(c) => Ok(c),
            other => Err(self.unexpected(&what, &other)),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let what = format!("delete '{key}'");
        let req = Request::Delete {
            key: key.to_string(),
        };
        match self.request(&what, &req, self.timeout)? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(&what, &other)),
        }
    }

    fn farewell(&self, deadline: Instant) -> Result<()> {
        let what = "the farewell";
        let round = self.farewells.fetch_add(1, Ordering::Relaxed) + 1;
        let started = Instant::now();
        loop {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(FAREWELL_SLICE);
            let req = Request::Farewell {
                round,
                wait_ms: ceil_ms(wait),
            };
            match self.request(what, &req, wait + GRACE)? {
                Reply::Done => return Ok(()),
                Reply::Stragglers(ranks) if Instant::now() >= deadline => {
                    return Err(Error::Timeout {
                        ctx: bootstrap_ctx(self.rank, self.world_size),
                        waited: started.elapsed(),
                        detail: format!(
                            "rank {}: farewell #{round} through the master at {}: rank(s) {ranks:?} neither said farewell nor left",
                            self.rank, self.master
                        ),
                    });
                }
                Reply::Stragglers(_) => {}
                other => return Err(self.unexpected(what, &other)),
            }
        }
    }
}
