//! The TCP rendezvous and store: rank 0 listens, every rank (rank 0 included) connects as a
//! client; once all ranks have joined, the same connections carry store requests. Every wait
//! has a deadline; every fault is a specific error on every rank.
//!
//! # Wire protocol (version 1)
//!
//! Every message is one *frame*: `[u32 little-endian length][payload]`, with
//! `1 <= length <= 64 MiB`. A longer length is rejected before anything is allocated, and the
//! payload buffer grows only as bytes actually arrive. The payload starts with a one-byte kind;
//! integers are little-endian; `str` and `bytes` are a `u32` length followed by that many bytes
//! (`str` must be UTF-8). Trailing bytes after a message are an error.
//!
//! | kind | direction | message | fields |
//! | --- | --- | --- | --- |
//! | `0x01` | client → master | hello | magic `b"SYMMCOMM"`, version `u16`, rank `u32`, world size `u32`, wait `u64` ms (what is left of the client's deadline) |
//! | `0x02` | client → master | set | key `str`, value `bytes` |
//! | `0x03` | client → master | get | key `str`, wait `u64` ms |
//! | `0x04` | client → master | add | key `str`, delta `i64` |
//! | `0x05` | client → master | delete | key `str` |
//! | `0x81` | master → client | welcome | magic, version `u16`, world size `u32` |
//! | `0x82` | master → client | failed | code `u8` + fields: 1 wrong world size (rank, expected, got: `u32`), 2 duplicate rank (rank `u32`, first `str`, second `str`), 3 rank out of range (rank, world: `u32`), 4 timeout (detail `str`), 5 other (reason `str`) |
//! | `0x83` | master → client | done | (answers set and delete) |
//! | `0x84` | master → client | value | value `bytes` |
//! | `0x85` | master → client | absent | (a get whose wait ran out) |
//! | `0x86` | master → client | count | new value `i64` (answers add) |
//! | `0x87` | master → client | refused | reason `str` (the request was not carried out) |
//!
//! # Sequence
//!
//! 1. Each client sends a hello. The master checks it: a different world size, a rank out of
//!    range, or a rank that already joined is a *failure*; it is recorded once, sent to every
//!    client waiting and to every client that says hello later, and rank 0 waits (until its
//!    deadline at most) for every rank to have been told before it returns the error and closes
//!    the port. Bytes that are not a hello (bad magic, unknown kind, oversize or truncated
//!    frame) close that connection only, with a warning; they are remembered and named in a
//!    later timeout. A rank that joined and closes its connection before the welcome (its
//!    process died) is a failure too, noticed within 100 ms.
//! 2. When all ranks have joined, every client gets a welcome. When the earliest deadline of
//!    the ranks that said hello (or rank 0's) passes first, every waiting client gets a timeout
//!    failure naming the ranks that never arrived.
//! 3. Afterwards each connection carries one request at a time and gets exactly one answer. A
//!    get waits on the master for at most the wait it names, then answers `absent`; the client
//!    waits for the answer a little longer than that. Any fault on a connection (timeout,
//!    closed, garbage) makes the client mark it unusable, so later requests fail at once.
//!
//! Dropping rank 0's [`TcpStore`] stops the master: it stops accepting, closes the reading side
//! of every connection (a request already being answered is still answered), and joins its
//! threads. Ranks should agree they are done (a barrier) before rank 0 drops its store.

// The crate's one error enum is larger than clippy's threshold; boxing it is error.rs's call.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::Store;
use crate::error::{Error, Op, OpCtx, Result};

/// Largest frame payload either side accepts.
const MAX_FRAME: usize = 64 << 20;
/// First bytes of a hello and a welcome.
const MAGIC: [u8; 8] = *b"SYMMCOMM";
/// Version of the wire protocol described in the module documentation.
const VERSION: u16 = 1;
/// How much longer than the master's own wait a client waits for an answer.
const GRACE: Duration = Duration::from_millis(500);
/// How often the accept loop checks for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// First and largest pause between connection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// How often a rank waiting for the welcome is checked for having gone away.
const LIVENESS_POLL: Duration = Duration::from_millis(100);
/// Malformed connections remembered (for error messages); later ones are only counted.
const MALFORMED_KEPT: usize = 8;

/// Where and how to meet.
#[derive(Clone, Debug)]
pub struct RendezvousConfig {
    /// Master address (host name or IP). Rank 0 binds exactly this address.
    pub addr: String,
    /// Master port (rank 0 may pass 0 to take any free port, useful only for a job of one).
    pub port: u16,
    /// This rank.
    pub rank: usize,
    /// Expected number of ranks.
    pub world_size: usize,
    /// Deadline for the whole rendezvous and for each later wait.
    pub timeout: Duration,
}

/// A TCP port on `host` that was free a moment ago: binds `host:0`, reads the port the system
/// chose, and closes the socket. Another process may take the port before it is used.
pub fn free_port(host: &str) -> Result<u16> {
    let listener = TcpListener::bind((host, 0))
        .map_err(|e| Error::io(format!("finding a free port on {host}: bind"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(format!("finding a free port on {host}: local_addr"), e))?;
    Ok(addr.port())
}

// ---------------------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------------------

mod kind {
    pub(super) const HELLO: u8 = 0x01;
    pub(super) const SET: u8 = 0x02;
    pub(super) const GET: u8 = 0x03;
    pub(super) const ADD: u8 = 0x04;
    pub(super) const DELETE: u8 = 0x05;
    pub(super) const WELCOME: u8 = 0x81;
    pub(super) const FAILED: u8 = 0x82;
    pub(super) const DONE: u8 = 0x83;
    pub(super) const VALUE: u8 = 0x84;
    pub(super) const ABSENT: u8 = 0x85;
    pub(super) const COUNT: u8 = 0x86;
    pub(super) const REFUSED: u8 = 0x87;
}

/// What a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Request {
    Hello {
        version: u16,
        rank: u32,
        world: u32,
        wait_ms: u64,
    },
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
        wait_ms: u64,
    },
    Add {
        key: String,
        delta: i64,
    },
    Delete {
        key: String,
    },
}

/// A failure of the rendezvous that the master reports to every rank.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Failure {
    WrongWorldSize {
        rank: u32,
        expected: u32,
        got: u32,
    },
    DuplicateRank {
        rank: u32,
        first: String,
        second: String,
    },
    RankOutOfRange {
        rank: u32,
        world: u32,
    },
    Timeout {
        detail: String,
    },
    Other {
        reason: String,
    },
}

/// What the master answers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reply {
    Welcome { version: u16, world: u32 },
    Failed(Failure),
    Done,
    Value(Vec<u8>),
    Absent,
    Count(i64),
    Refused(String),
}

/// A frame under construction: four bytes reserved for the length, then the payload.
struct Enc(Vec<u8>);

impl Enc {
    fn new(kind: u8) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0; 4]);
        v.push(kind);
        Enc(v)
    }
    fn u8(mut self, x: u8) -> Self {
        self.0.push(x);
        self
    }
    fn u16(mut self, x: u16) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn i64(mut self, x: i64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn bytes(self, b: &[u8]) -> Self {
        // Lengths above u32::MAX are caught by `finish` (the frame is then over the cap).
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        self.u32(len).raw(b)
    }
    /// The frame, or the payload length when it exceeds [`MAX_FRAME`].
    fn finish(mut self) -> std::result::Result<Vec<u8>, usize> {
        let payload = self.0.len() - 4;
        if payload > MAX_FRAME {
            return Err(payload);
        }
        // MAX_FRAME < u32::MAX, so the cast is exact.
        self.0[..4].copy_from_slice(&(payload as u32).to_le_bytes());
        Ok(self.0)
    }
}

impl Request {
    fn encode(&self) -> std::result::Result<Vec<u8>, usize> {
        match self {
            Request::Hello {
                version,
                rank,
                world,
                wait_ms,
            } => Enc::new(kind::HELLO)
                .raw(&MAGIC)
                .u16(*version)
                .u32(*rank)
                .u32(*world)
                .u64(*wait_ms),
            Request::Set { key, value } => Enc::new(kind::SET).bytes(key.as_bytes()).bytes(value),
            Request::Get { key, wait_ms } => {
                Enc::new(kind::GET).bytes(key.as_bytes()).u64(*wait_ms)
            }
            Request::Add { key, delta } => Enc::new(kind::ADD).bytes(key.as_bytes()).i64(*delta),
            Request::Delete { key } => Enc::new(kind::DELETE).bytes(key.as_bytes()),
        }
        .finish()
    }

    fn decode(payload: &[u8]) -> std::result::Result<Request, String> {
        let mut d = Dec(payload);
        let k = d.u8("message kind")?;
        let req = match k {
            kind::HELLO => {
                d.magic()?;
                Request::Hello {
                    version: d.u16("version")?,
                    rank: d.u32("rank")?,
                    world: d.u32("world size")?,
                    wait_ms: d.u64("wait")?,
                }
            }
            kind::SET => Request::Set {
                key: d.str("key")?,
                value: d.bytes("value")?.to_vec(),
            },
            kind::GET => Request::Get {
                key: d.str("key")?,
                wait_ms: d.u64("wait")?,
            },
            kind::ADD => Request::Add {
                key: d.str("key")?,
                delta: d.i64("delta")?,
            },
            kind::DELETE => Request::Delete { key: d.str("key")? },
            other => return Err(format!("unknown request kind 0x{other:02x}")),
        };
        d.end()?;
        Ok(req)
    }

    fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Set { .. } => "set",
            Request::Get { .. } => "get",
            Request::Add { .. } => "add",
            Request::Delete { .. } => "delete",
        }
    }
}

impl Reply {
    fn encode(&self) -> std::result::Result<Vec<u8>, usize> {
        match self {
            Reply::Welcome { version, world } => Enc::new(kind::WELCOME)
                .raw(&MAGIC)
                .u16(*version)
                .u32(*world),
            Reply::Failed(f) => {
                let e = Enc::new(kind::FAILED);
                match f {
                    Failure::WrongWorldSize {
                        rank,
                        expected,
                        got,
                    } => e.u8(1).u32(*rank).u32(*expected).u32(*got),
                    Failure::DuplicateRank {
                        rank,
                        first,
                        second,
                    } => e
                        .u8(2)
                        .u32(*rank)
                        .bytes(first.as_bytes())
                        .bytes(second.as_bytes()),
                    Failure::RankOutOfRange { rank, world } => e.u8(3).u32(*rank).u32(*world),
                    Failure::Timeout { detail } => e.u8(4).bytes(detail.as_bytes()),
                    Failure::Other { reason } => e.u8(5).bytes(reason.as_bytes()),
                }
            }
            Reply::Done => Enc::new(kind::DONE),
            Reply::Value(v) => Enc::new(kind::VALUE).bytes(v),
            Reply::Absent => Enc::new(kind::ABSENT),
            Reply::Count(c) => Enc::new(kind::COUNT).i64(*c),
            Reply::Refused(r) => Enc::new(kind::REFUSED).bytes(r.as_bytes()),
        }
        .finish()
    }

    fn decode(payload: &[u8]) -> std::result::Result<Reply, String> {
        let mut d = Dec(payload);
        let k = d.u8("message kind")?;
        let reply = match k {
            kind::WELCOME => {
                d.magic()?;
                Reply::Welcome {
                    version: d.u16("version")?,
                    world: d.u32("world size")?,
                }
            }
            kind::FAILED => Reply::Failed(match d.u8("failure code")? {
                1 => Failure::WrongWorldSize {
                    rank: d.u32("rank")?,
                    expected: d.u32("expected world size")?,
                    got: d.u32("announced world size")?,
                },
                2 => Failure::DuplicateRank {
                    rank: d.u32("rank")?,
                    first: d.str("first peer")?,
                    second: d.str("second peer")?,
                },
                3 => Failure::RankOutOfRange {
                    rank: d.u32("rank")?,
                    world: d.u32("world size")?,
                },
                4 => Failure::Timeout {
                    detail: d.str("detail")?,
                },
                5 => Failure::Other {
                    reason: d.str("reason")?,
                },
                c => return Err(format!("unknown failure code {c}")),
            }),
            kind::DONE => Reply::Done,
            kind::VALUE => Reply::Value(d.bytes("value")?.to_vec()),
            kind::ABSENT => Reply::Absent,
            kind::COUNT => Reply::Count(d.i64("count")?),
            kind::REFUSED => Reply::Refused(d.str("reason")?),
            other => return Err(format!("unknown reply kind 0x{other:02x}")),
        };
        d.end()?;
        Ok(reply)
    }

    fn name(&self) -> &'static str {
        match self {
            Reply::Welcome { .. } => "welcome",
            Reply::Failed(_) => "failed",
            Reply::Done => "done",
            Reply::Value(_) => "value",
            Reply::Absent => "absent",
            Reply::Count(_) => "count",
            Reply::Refused(_) => "refused",
        }
    }
}

/// A cursor over a received payload; every read checks the bytes are there first.
struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated {what}: needs {n} bytes, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> std::result::Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> std::result::Result<u16, String> {
        self.array(what).map(u16::from_le_bytes)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }
    fn i64(&mut self, what: &str) -> std::result::Result<i64, String> {
        self.array(what).map(i64::from_le_bytes)
    }
    fn bytes(&mut self, what: &str) -> std::result::Result<&'a [u8], String> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }
    fn str(&mut self, what: &str) -> std::result::Result<String, String> {
        let b = self.bytes(what)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|e| format!("{what} is not UTF-8: {e}"))
    }
    fn magic(&mut self) -> std::result::Result<(), String> {
        let m = self.take(MAGIC.len(), "magic")?;
        if m != MAGIC {
            return Err(format!(
                "bad magic {:?} (expected {:?})",
                String::from_utf8_lossy(m),
                String::from_utf8_lossy(&MAGIC)
            ));
        }
        Ok(())
    }
    fn end(&self) -> std::result::Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes after the message", self.0.len()))
        }
    }
}

/// Why no frame was read.
#[derive(Debug)]
enum FrameError {
    /// The peer closed the connection between frames.
    Closed,
    /// Bytes that are not a frame: oversize or zero length, or closed in the middle.
    Malformed(String),
    /// The socket failed or timed out after `partial` bytes of the frame.
    Io { err: io::Error, partial: usize },
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Read one frame of at most `cap` payload bytes. The length is checked against `cap` before
/// any allocation, and the buffer grows only as bytes arrive, never past the declared length.
fn read_frame(r: &mut impl Read, cap: usize) -> std::result::Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Malformed(format!(
                    "connection closed after {got} of the 4 bytes of a frame header"
                )));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(FrameError::Io { err, partial: got }),
        }
    }
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Malformed("empty frame".into()));
    }
    if len > cap {
        return Err(FrameError::Malformed(format!(
            "frame header {header:02x?} claims {len} bytes, over the {cap}-byte cap"
        )));
    }
    const FIRST_CHUNK: usize = 64 << 10;
    let mut buf: Vec<u8> = Vec::with_capacity(len.min(FIRST_CHUNK));
    while buf.len() < len {
        if buf.len() == buf.capacity() {
            let target = buf.capacity().saturating_mul(2).clamp(FIRST_CHUNK, len);
            buf.reserve_exact(target - buf.len());
        }
        let start = buf.len();
        let end = buf.capacity().min(len);
        buf.resize(end, 0);
        match r.read(&mut buf[start..end]) {
            Ok(0) => {
                return Err(FrameError::Malformed(format!(
                    "connection closed after {start} of the {len} bytes of a frame"
                )));
            }
            Ok(n) => buf.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(start),
            Err(err) => {
                return Err(FrameError::Io {
                    err,
                    partial: 4 + start,
                });
            }
        }
    }
    Ok(buf)
}

fn ceil_ms(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// `now + ms`, saturating at a year so a peer's absurd wait cannot overflow an `Instant`.
fn after_ms(now: Instant, ms: u64) -> Instant {
    let wait = Duration::from_millis(ms).min(Duration::from_secs(365 * 24 * 3600));
    now.checked_add(wait).unwrap_or(now)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent (single inserts and flag changes), so
    // a panic elsewhere while holding the lock does not make the data unusable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `host:port`, with brackets around an IPv6 literal.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

// ---------------------------------------------------------------------------------------------
// Master (rank 0's server)
// ---------------------------------------------------------------------------------------------

/// The master's state, shared by the accept thread and one thread per connection.
struct Shared {
    world: usize,
    master: String,
    /// Read timeout for a hello and write timeout for every answer.
    io_timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    /// Peer address of each rank that joined.
    joined: Vec<Option<String>>,
    /// Ranks that were sent the failure.
    notified: Vec<bool>,
    complete: bool,
    failure: Option<Failure>,
    /// The earliest deadline among rank 0 and the ranks that said hello, and whose it is.
    deadline: Instant,
    deadline_owner: usize,
    malformed: Vec<String>,
    malformed_count: usize,
    map: HashMap<String, Vec<u8>>,
    shutdown: bool,
    /// Clones of the open connections, to close their reading side on shutdown.
    conns: Vec<(u64, TcpStream)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn record_malformed(&self, peer: &str, detail: String) {
        let e = Error::Malformed {
            rank: 0,
            peer: peer.to_string(),
            detail: detail.clone(),
        };
        warn!("{e}; dropping that connection, still serving the ranks");
        let mut st = self.lock();
        st.malformed_count += 1;
        if st.malformed.len() < MALFORMED_KEPT {
            st.malformed.push(format!("{peer}: {detail}"));
        }
    }

    fn timeout_detail(&self, st: &State) -> String {
        let missing: Vec<usize> = (0..self.world)
            .filter(|&r| st.joined[r].is_none())
            .collect();
        let joined: Vec<usize> = (0..self.world)
            .filter(|&r| st.joined[r].is_some())
            .collect();
        let mut s = format!(
            "rendezvous on {}: the deadline of rank {} passed; rank(s) {missing:?} never arrived (joined: {joined:?})",
            self.master, st.deadline_owner
        );
        if st.malformed_count > 0 {
            s.push_str(&format!(
                "; {} malformed connection(s) on the port sent bytes that are not the symmcomm protocol: {}",
                st.malformed_count,
                st.malformed.join("; ")
            ));
            if st.malformed_count > st.malformed.len() {
                s.push_str("; ...");
            }
        }
        s
    }

    fn fail(&self, st: &mut State, f: Failure) {
        if st.failure.is_none() {
            warn!(
                "rendezvous on {} failed: {}",
                self.master,
                f.clone().into_error(0, self.world, Duration::ZERO)
            );
            st.failure = Some(f);
            self.changed.notify_all();
        }
    }
}

/// Rank 0's server: an accept thread and a thread per connection.
struct Master {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Master {
    fn start(
        listener: TcpListener,
        world: usize,
        master: String,
        io_timeout: Duration,
        deadline: Instant,
    ) -> Result<Master> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(format!("rank 0: configuring the listener on {master}"), e))?;
        let shared = Arc::new(Shared {
            world,
            master: master.clone(),
            io_timeout,
            state: Mutex::new(State {
                joined: vec![None; world],
                notified: vec![false; world],
                complete: false,
                failure: None,
                deadline,
                deadline_owner: 0,
                malformed: Vec::new(),
                malformed_count: 0,
                map: HashMap::new(),
                shutdown: false,
                conns: Vec::new(),
            }),
            changed: Condvar::new(),
        });
        let sh = shared.clone();
        let accept = thread::Builder::new()
            .name("symmcomm-rdzv-accept".into())
            .spawn(move || accept_loop(&sh, listener))
            .map_err(|e| {
                Error::io(
                    format!("rank 0: starting the rendezvous server on {master}"),
                    e,
                )
            })?;
        Ok(Master {
            shared,
            accept: Some(accept),
        })
    }

    /// After a failure: wait until every rank was told, or `deadline`.
    fn linger(&self, deadline: Instant) {
        let mut st = self.shared.lock();
        if st.failure.is_none() {
            return;
        }
        loop {
            if st.notified.iter().all(|&n| n) || st.shutdown {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                let untold: Vec<usize> = (0..self.shared.world)
                    .filter(|&r| !st.notified[r])
                    .collect();
                debug!(
                    "rank 0: rank(s) {untold:?} were not told of the failure before the deadline"
                );
                return;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn stop(&mut self) {
        {
            let mut st = self.shared.lock();
            if !st.complete && st.failure.is_none() {
                let f = Failure::Other {
                    reason: format!(
                        "rank 0 stopped the rendezvous server on {} before all ranks joined",
                        self.shared.master
                    ),
                };
                self.shared.fail(&mut st, f);
            }
            st.shutdown = true;
        }
        self.shared.changed.notify_all();
        if let Some(h) = self.accept.take()
            && h.join().is_err()
        {
            warn!(
                "rank 0: the rendezvous accept thread on {} panicked",
                self.shared.master
            );
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    let mut handles: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    loop {
        if shared.lock().shutdown {
            break;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                let id = next_id;
                next_id += 1;
                if let Err(e) = stream.set_nonblocking(false) {
                    warn!("rank 0: dropping connection from {peer}: set_nonblocking: {e}");
                    continue;
                }
                match stream.try_clone() {
                    Ok(c) => shared.lock().conns.push((id, c)),
                    Err(e) => {
                        warn!("rank 0: dropping connection from {peer}: try_clone: {e}");
                        continue;
                    }
                }
                let sh = shared.clone();
                let spawned = thread::Builder::new()
                    .name(format!("symmcomm-rdzv-{peer}"))
                    .spawn(move || {
                        serve_conn(&sh, stream, peer);
                        sh.lock().conns.retain(|(i, _)| *i != id);
                    });
                match spawned {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        warn!("rank 0: dropping connection from {peer}: spawning its thread: {e}");
                        shared.lock().conns.retain(|(i, _)| *i != id);
                    }
                }
                handles.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!("rank 0: accept on {} failed: {e}", shared.master);
                thread::sleep(ACCEPT_POLL);
            }
        }
    }
    drop(listener);
    let conns = std::mem::take(&mut shared.lock().conns);
    for (_, c) in &conns {
        // Wakes a thread blocked reading a request; an answer being written still goes out.
        let _ = c.shutdown(Shutdown::Read);
    }
    for h in handles {
        if h.join().is_err() {
            warn!("rank 0: a rendezvous connection thread panicked");
        }
    }
    debug!("rank 0: rendezvous server on {} stopped", shared.master);
}

fn send(stream: &mut TcpStream, reply: &Reply, peer: &str) -> bool {
    let frame = match reply.encode() {
        Ok(f) => f,
        Err(len) => {
            match Reply::Refused(format!("answer of {len} bytes exceeds the frame cap")).encode() {
                Ok(f) => f,
                Err(_) => return false,
            }
        }
    };
    match stream.write_all(&frame) {
        Ok(()) => true,
        Err(e) => {
            debug!("rank 0: writing a {} to {peer}: {e}", reply.name());
            false
        }
    }
}

fn serve_conn(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    let peer = peer.to_string();
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream
        .set_read_timeout(Some(shared.io_timeout.max(Duration::from_millis(1))))
        .and_then(|()| {
            stream.set_write_timeout(Some(shared.io_timeout.max(Duration::from_millis(1))))
        })
    {
        warn!("rank 0: dropping connection from {peer}: setting timeouts: {e}");
        return;
    }
    let frame = match read_frame(&mut stream, MAX_FRAME) {
        Ok(f) => f,
        Err(FrameError::Closed) => {
            debug!("rank 0: {peer} connected and closed without a word");
            return;
        }
        Err(FrameError::Malformed(d)) => return shared.record_malformed(&peer, d),
        Err(FrameError::Io { err, partial }) => {
            if partial > 0 || is_timeout(&err) {
                shared.record_malformed(
                    &peer,
                    format!("sent {partial} bytes and no complete hello ({err})"),
                );
            } else {
                debug!("rank 0: reading a hello from {peer}: {err}");
            }
            return;
        }
    };
    let (version, rank, world, wait_ms) = match Request::decode(&frame) {
        Ok(Request::Hello {
            version,
            rank,
            world,
            wait_ms,
        }) => (version, rank, world, wait_ms),
        Ok(other) => {
            return shared.record_malformed(
                &peer,
                format!("first message is a {} request, not a hello", other.name()),
            );
        }
        Err(d) => return shared.record_malformed(&peer, d),
    };
    if version != VERSION {
        let reason = format!(
            "{peer} speaks symmcomm rendezvous protocol version {version}, the master at {} speaks {VERSION}",
            shared.master
        );
        shared.record_malformed(&peer, reason.clone());
        send(
            &mut stream,
            &Reply::Failed(Failure::Other { reason }),
            &peer,
        );
        return;
    }
    let rank_u = rank as usize;
    match join(shared, &stream, rank, world, wait_ms, &peer) {
        Admission::Fail(f) => {
            send(&mut stream, &Reply::Failed(f), &peer);
            return;
        }
        Admission::Gone => return,
        Admission::Welcome => {
            let welcome = Reply::Welcome {
                version: VERSION,
                world: world_u32(shared.world),
            };
            if !send(&mut stream, &welcome, &peer) {
                return;
            }
        }
    }
    // Requests: block until the next one or until shutdown closes the reading side.
    if let Err(e) = stream.set_read_timeout(None) {
        warn!("rank 0: dropping rank {rank_u} ({peer}): clearing the read timeout: {e}");
        return;
    }
    let who = format!("rank {rank_u} at {peer}");
    loop {
        let frame = match read_frame(&mut stream, MAX_FRAME) {
            Ok(f) => f,
            Err(FrameError::Closed) => {
                debug!("rank 0: {who} disconnected");
                return;
            }
            Err(FrameError::Malformed(d)) => return shared.record_malformed(&who, d),
            Err(FrameError::Io { err, .. }) => {
                debug!("rank 0: reading a request from {who}: {err}");
                return;
            }
        };
        let reply = match Request::decode(&frame) {
            Ok(Request::Hello { .. }) => {
                return shared
                    .record_malformed(&who, "a second hello on a joined connection".into());
            }
            Ok(req) => handle(shared, req),
            Err(d) => return shared.record_malformed(&who, d),
        };
        if !send(&mut stream, &reply, &who) {
            return;
        }
    }
}

fn world_u32(world: usize) -> u32 {
    u32::try_from(world).unwrap_or(u32::MAX)
}

/// Whether the client at the other end of `stream` has closed it (checked without blocking).
fn peer_left(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let left = match stream.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    };
    if let Err(e) = stream.set_nonblocking(false) {
        debug!("rank 0: restoring blocking mode: {e}");
        return true;
    }
    left
}

/// How a hello ends on the master.
enum Admission {
    /// Everyone joined: send the welcome.
    Welcome,
    /// Send this failure and close.
    Fail(Failure),
    /// The client already closed its connection; nothing to send.
    Gone,
}

/// Admit a hello and wait for the outcome. A joined rank whose connection closes before the
/// welcome fails the rendezvous for all.
fn join(
    shared: &Shared,
    stream: &TcpStream,
    rank: u32,
    world: u32,
    wait_ms: u64,
    peer: &str,
) -> Admission {
    let rank_u = rank as usize;
    let mut st = shared.lock();
    let now = Instant::now();
    if st.complete {
        // The job already runs; this process is a stray. Tell it, leave the others alone.
        let f = if world as usize != shared.world {
            Failure::WrongWorldSize {
                rank,
                expected: world_u32(shared.world),
                got: world,
            }
        } else if rank_u >= shared.world {
            Failure::RankOutOfRange { rank, world }
        } else {
            Failure::DuplicateRank {
                rank,
                first: st.joined[rank_u].clone().unwrap_or_default(),
                second: peer.to_string(),
            }
        };
        warn!(
            "rank 0: {peer} said hello as rank {rank} after the rendezvous completed: {}",
            f.clone().into_error(0, shared.world, Duration::ZERO)
        );
        return Admission::Fail(f);
    }
    if st.failure.is_none() {
        if world as usize != shared.world {
            let f = Failure::WrongWorldSize {
                rank,
                expected: world_u32(shared.world),
                got: world,
            };
            shared.fail(&mut st, f);
        } else if rank_u >= shared.world {
            shared.fail(&mut st, Failure::RankOutOfRange { rank, world });
        } else if let Some(first) = st.joined[rank_u].clone() {
            let f = Failure::DuplicateRank {
                rank,
                first,
                second: peer.to_string(),
            };
            shared.fail(&mut st, f);
        } else {
            st.joined[rank_u] = Some(peer.to_string());
            let theirs = after_ms(now, wait_ms);
            if theirs < st.deadline {
                st.deadline = theirs;
                st.deadline_owner = rank_u;
            }
            debug!("rank 0: rank {rank} joined from {peer}");
            if now >= st.deadline {
                let f = Failure::Timeout {
                    detail: shared.timeout_detail(&st),
                };
                shared.fail(&mut st, f);
            } else if st.joined.iter().all(Option::is_some) {
                st.complete = true;
                info!(
                    "rendezvous on {}: all {} ranks joined",
                    shared.master, shared.world
                );
                shared.changed.notify_all();
            }
        }
    }
    loop {
        if let Some(f) = st.failure.clone() {
            if rank_u < shared.world {
                st.notified[rank_u] = true;
                shared.changed.notify_all();
            }
            return Admission::Fail(f);
        }
        if st.complete {
            return Admission::Welcome;
        }
        if st.shutdown {
            return Admission::Fail(Failure::Other {
                reason: format!("the master on {} is shutting down", shared.master),
            });
        }
        let now = Instant::now();
        if now >= st.deadline {
            let f = Failure::Timeout {
                detail: shared.timeout_detail(&st),
            };
            shared.fail(&mut st, f);
            continue;
        }
        let wait = (st.deadline - now).min(LIVENESS_POLL);
        let (guard, res) = shared
            .changed
            .wait_timeout(st, wait)
            .unwrap_or_else(|p| p.into_inner());
        st = guard;
        if res.timed_out()
            && st.failure.is_none()
            && !st.complete
            && st
                .joined
                .get(rank_u)
                .is_some_and(|j| j.as_deref() == Some(peer))
            && peer_left(stream)
        {
            let f = Failure::Other {
                reason: format!(
                    "rank {rank} (from {peer}) joined and then closed its connection before all ranks had joined; did that process die?"
                ),
            };
            shared.fail(&mut st, f);
            // Nobody is left there to tell.
            st.notified[rank_u] = true;
            shared.changed.notify_all();
            return Admission::Gone;
        }
    }
}

/// Carry out one store request.
fn handle(shared: &Shared, req: Request) -> Reply {
    match req {
        Request::Set { key, value } => {
            shared.lock().map.insert(key, value);
            shared.changed.notify_all();
            Reply::Done
        }
        Request::Get { key, wait_ms } => {
            let deadline = after_ms(Instant::now(), wait_ms);
            let mut st = shared.lock();
            loop {
                if let Some(v) = st.map.get(&key) {
                    return Reply::Value(v.clone());
                }
                if st.shutdown {
                    return Reply::Refused(format!(
                        "the master on {} is shutting down",
                        shared.master
                    ));
                }
                let now = Instant::now();
                if now >= deadline {
                    return Reply::Absent;
                }
                st = shared
                    .changed
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        Request::Add { key, delta } => {
            let mut st = shared.lock();
            let cur = st
                .map
                .get(&key)
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(i64::from_le_bytes)
                .unwrap_or(0);
            let Some(new) = cur.checked_add(delta) else {
                return Reply::Refused(format!("add {delta} to '{key}' = {cur} overflows i64"));
            };
            st.map.insert(key, new.to_le_bytes().to_vec());
            drop(st);
            shared.changed.notify_all();
            Reply::Count(new)
        }
        Request::Delete { key } => {
            shared.lock().map.remove(&key);
            Reply::Done
        }
        Request::Hello { .. } => Reply::Refused("unexpected hello".into()),
    }
}

impl Failure {
    fn into_error(self, rank: usize, world: usize, waited: Duration) -> Error {
        match self {
            Failure::WrongWorldSize {
                rank,
                expected,
                got,
            } => Error::WrongWorldSize {
                rank: rank as usize,
                expected: expected as usize,
                got: got as usize,
            },
            Failure::DuplicateRank {
                rank,
                first,
                second,
            } => Error::DuplicateRank {
                rank: rank as usize,
                first,
                second,
            },
            Failure::RankOutOfRange { rank, world } => Error::RankOutOfRange {
                rank: rank as usize,
                world: world as usize,
            },
            Failure::Timeout { detail } => Error::Timeout {
                ctx: bootstrap_ctx(rank, world),
                waited,
                detail,
            },
            Failure::Other { reason } => Error::RendezvousFailed { rank, reason },
        }
    }
}

fn bootstrap_ctx(rank: usize, world: usize) -> OpCtx {
    OpCtx {
        op: Op::Bootstrap,
        group: "world".into(),
        rank,
        world,
        bytes: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// A rank's connection to the master; `broken` once a fault left it in an unknown state.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    broken: Option<String>,
}

/// A [`Store`] reached over TCP; rank 0 also serves it.
pub struct TcpStore {
    rank: usize,
    world_size: usize,
    master: String,
    timeout: Duration,
    // Declared before `server` so that rank 0's own connection closes before its server stops.
    conn: Mutex<Conn>,
    server: Option<Master>,
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

impl TcpStore {
    /// Meet the other ranks; returns once all `world_size` ranks have joined, or with the
    /// failure every rank sees (wrong world size, duplicate rank, timeout naming the ranks
    /// that never arrived), or `MasterUnreachable`/`AddrInUse` when there is no master.
    pub fn rendezvous(cfg: &RendezvousConfig) -> Result<Self> {
        let start = Instant::now();
        let deadline = start + cfg.timeout;
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(Error::RankOutOfRange {
                rank: cfg.rank,
                world: cfg.world_size,
            });
        }
        if u32::try_from(cfg.world_size).is_err() {
            return Err(Error::RendezvousFailed {
                rank: cfg.rank,
                reason: format!("world size {} does not fit the protocol", cfg.world_size),
            });
        }
        let mut master = host_port(&cfg.addr, cfg.port);
        let mut server = None;
        let mut own = None;
        if cfg.rank == 0 {
            let listener = TcpListener::bind((cfg.addr.as_str(), cfg.port)).map_err(|e| {
                if e.kind() == io::ErrorKind::AddrInUse {
                    Error::AddrInUse {
                        addr: master.clone(),
                        source: e,
                    }
                } else {
                    Error::io(
                        format!("rank 0: listening for the rendezvous on {master}"),
                        e,
                    )
                }
            })?;
            let local = listener.local_addr().map_err(|e| {
                Error::io(format!("rank 0: reading the address bound on {master}"), e)
            })?;
            master = host_port(&cfg.addr, local.port());
            info!(
                "rank 0: serving the rendezvous of {} ranks on {master}",
                cfg.world_size
            );
            server = Some(Master::start(
                listener,
                cfg.world_size,
                master.clone(),
                cfg.timeout,
                deadline,
            )?);
            own = Some(local);
        }
        let stream = connect(cfg, &master, own, start, deadline)?;
        let store = TcpStore {
            rank: cfg.rank,
            world_size: cfg.world_size,
            master,
            timeout: cfg.timeout,
            conn: Mutex::new(Conn {
                stream,
                broken: None,
            }),
            server,
        };
        match store.hello(start, deadline) {
            Ok(()) => {
                debug!(
                    "rank {}: rendezvous on {} complete",
                    store.rank, store.master
                );
                Ok(store)
            }
            Err(e) => {
                if let Some(s) = &store.server {
                    s.linger(deadline);
                }
                Err(e)
            }
        }
    }

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

    fn hello(&self, start: Instant, deadline: Instant) -> Result<()> {
        let mut conn = lock(&self.conn);
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
        let stream = &mut conn.stream;
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(remaining.max(Duration::from_millis(1))))
            .and_then(|()| stream.set_read_timeout(Some(remaining + GRACE)))
            .map_err(|e| self.io_error(what, e, start.elapsed()))?;
        stream
            .write_all(&frame)
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
        match Reply::decode(&payload) {
            Ok(Reply::Welcome { version, world }) => {
                if version != VERSION || world as usize != self.world_size {
                    return Err(Error::RendezvousFailed {
                        rank: self.rank,
                        reason: format!(
                            "the master at {} welcomed a world of {world} (protocol {version}); this rank expects {} (protocol {VERSION})",
                            self.master, self.world_size
                        ),
                    });
                }
                Ok(())
            }
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
        let stream = &mut conn.stream;
        let result = stream
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .and_then(|()| {
                stream.set_write_timeout(Some(self.timeout.max(Duration::from_millis(1))))
            })
            .and_then(|()| stream.write_all(&frame))
            .map_err(|e| self.io_error(what, e, within))
            .and_then(|()| {
                read_frame(stream, MAX_FRAME).map_err(|e| self.frame_error(what, e, within))
            })
            .and_then(|payload| {
                Reply::decode(&payload).map_err(|detail| Error::Malformed {
                    rank: self.rank,
                    peer: self.master.clone(),
                    detail: format!("answer to {what}: {detail}"),
                })
            });
        match result {
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

    fn unexpected(&self, what: &str, reply: &Reply) -> Error {
        lock(&self.conn).broken = Some(format!("unexpected {} answer", reply.name()));
        Error::Malformed {
            rank: self.rank,
            peer: self.master.clone(),
            detail: format!("answer to {what} is a {} message", reply.name()),
        }
    }
}

/// Connect to the master, retrying with a short backoff until `deadline`.
fn connect(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(rank: usize, world: usize, port: u16, timeout_ms: u64) -> RendezvousConfig {
        RendezvousConfig {
            addr: "127.0.0.1".into(),
            port,
            rank,
            world_size: world,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    /// Rendezvous of `cfgs` on threads; rank 0 (if present) starts first.
    fn meet(cfgs: Vec<RendezvousConfig>) -> Vec<Result<TcpStore>> {
        thread::scope(|s| {
            let hs: Vec<_> = cfgs
                .into_iter()
                .map(|c| s.spawn(move || TcpStore::rendezvous(&c)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("rendezvous thread panicked"))
                .collect()
        })
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Hello {
                version: VERSION,
                rank: 3,
                world: 8,
                wait_ms: 1234,
            },
            Request::Set {
                key: "k/é".into(),
                value: vec![0, 1, 255],
            },
            Request::Set {
                key: String::new(),
                value: vec![],
            },
            Request::Get {
                key: "x".into(),
                wait_ms: u64::MAX,
            },
            Request::Add {
                key: "c".into(),
                delta: -7,
            },
            Request::Delete { key: "d".into() },
        ]
    }

    fn all_replies() -> Vec<Reply> {
        vec![
            Reply::Welcome {
                version: VERSION,
                world: 4,
            },
            Reply::Failed(Failure::WrongWorldSize {
                rank: 1,
                expected: 3,
                got: 2,
            }),
            Reply::Failed(Failure::DuplicateRank {
                rank: 1,
                first: "a:1".into(),
                second: "b:2".into(),
            }),
            Reply::Failed(Failure::RankOutOfRange { rank: 9, world: 2 }),
            Reply::Failed(Failure::Timeout {
                detail: "late".into(),
            }),
            Reply::Failed(Failure::Other {
                reason: "why".into(),
            }),
            Reply::Done,
            Reply::Value(vec![9; 100]),
            Reply::Absent,
            Reply::Count(i64::MIN),
            Reply::Refused("no".into()),
        ]
    }

    #[test]
    fn messages_round_trip() {
        for r in all_requests() {
            let f = r.encode().unwrap();
            let payload = read_frame(&mut &f[..], MAX_FRAME).unwrap();
            assert_eq!(Request::decode(&payload).unwrap(), r);
        }
        for r in all_replies() {
            let f = r.encode().unwrap();
            let payload = read_frame(&mut &f[..], MAX_FRAME).unwrap();
            assert_eq!(Reply::decode(&payload).unwrap(), r);
        }
    }

    #[test]
    fn frame_errors_are_specific() {
        let mut empty: &[u8] = &[];
        assert!(matches!(
            read_frame(&mut empty, MAX_FRAME),
            Err(FrameError::Closed)
        ));
        let mut half: &[u8] = &[5, 0];
        assert!(matches!(
            read_frame(&mut half, MAX_FRAME),
            Err(FrameError::Malformed(d)) if d.contains("2 of the 4")
        ));
        let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(matches!(
            read_frame(&mut huge, MAX_FRAME),
            Err(FrameError::Malformed(d)) if d.contains("4294967295")
        ));
        let mut zero: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut zero, MAX_FRAME),
            Err(FrameError::Malformed(d)) if d.contains("empty")
        ));
        let mut short: &[u8] = &[10, 0, 0, 0, 1, 2, 3];
        assert!(matches!(
            read_frame(&mut short, MAX_FRAME),
            Err(FrameError::Malformed(d)) if d.contains("3 of the 10")
        ));
        let mut bad_magic = Request::Hello {
            version: 1,
            rank: 0,
            world: 1,
            wait_ms: 0,
        }
        .encode()
        .unwrap();
        bad_magic[5] = b'X';
        let p = read_frame(&mut &bad_magic[..], MAX_FRAME).unwrap();
        assert!(Request::decode(&p).unwrap_err().contains("magic"));
        assert!(Request::decode(&[0x42]).unwrap_err().contains("0x42"));
        assert!(
            Reply::decode(&[kind::DONE, 0])
                .unwrap_err()
                .contains("trailing")
        );
        assert!(
            Request::decode(&[kind::SET, 200, 0, 0, 0, b'a'])
                .unwrap_err()
                .contains("truncated key")
        );
    }

    #[test]
    fn frame_grows_with_arriving_bytes() {
        // A header claiming 1 MiB followed by 10 bytes: the buffer never reaches the claim.
        struct Tracking<'a>(&'a [u8], usize);
        impl Read for Tracking<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 = self.1.max(buf.len());
                self.0.read(buf)
            }
        }
        let mut bytes = (1u32 << 20).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[7; 10]);
        let mut r = Tracking(&bytes, 0);
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME),
            Err(FrameError::Malformed(_))
        ));
        assert!(r.1 <= 64 << 10, "asked to read {} bytes at once", r.1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the parsers, and no frame (or buffer) exceeds the cap.
        #[test]
        fn parser_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            const CAP: usize = 256;
            let mut r: &[u8] = &bytes;
            loop {
                match read_frame(&mut r, CAP) {
                    Ok(p) => {
                        prop_assert!(!p.is_empty() && p.len() <= CAP);
                        prop_assert!(p.capacity() <= CAP);
                        let _ = Request::decode(&p);
                        let _ = Reply::decode(&p);
                    }
                    Err(FrameError::Closed) | Err(FrameError::Malformed(_)) => break,
                    Err(FrameError::Io { err, .. }) => prop_assert!(false, "io error from a slice: {err}"),
                }
            }
            // The payload parsers on their own, too.
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }

        /// Valid frames with bytes flipped either decode or fail cleanly.
        #[test]
        fn corrupted_messages_fail_cleanly(idx in any::<prop::sample::Index>(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut frames: Vec<Vec<u8>> = all_requests().iter().map(|r| r.encode().unwrap()).collect();
            frames.extend(all_replies().iter().map(|r| r.encode().unwrap()));
            let mut f = frames[idx.index(frames.len())].clone();
            let at = pos.index(f.len());
            f[at] = byte;
            if let Ok(p) = read_frame(&mut &f[..], MAX_FRAME) {
                prop_assert!(p.len() <= MAX_FRAME);
                let _ = Request::decode(&p);
                let _ = Reply::decode(&p);
            }
        }
    }

    #[test]
    fn rendezvous_and_store_on_threads() {
        let port = free_port("127.0.0.1").unwrap();
        let stores: Vec<TcpStore> = meet((0..3).map(|r| cfg(r, 3, port, 5000)).collect())
            .into_iter()
            .collect::<Result<_>>()
            .unwrap();
        thread::scope(|s| {
            for st in &stores {
                s.spawn(move || {
                    let r = st.rank();
                    st.set(&format!("k{r}"), format!("v{r}").as_bytes())
                        .unwrap();
                    let dl = Instant::now() + Duration::from_secs(5);
                    for o in 0..3 {
                        let v = st.get(&format!("k{o}"), dl).unwrap();
                        assert_eq!(v, Some(format!("v{o}").into_bytes()));
                    }
                    st.add("n", 1).unwrap();
                });
            }
        });
        assert_eq!(stores[1].add("n", 0).unwrap(), 3);
        // A get that expires answers None in time and leaves the connection usable.
        let t0 = Instant::now();
        let v = stores[2]
            .get("absent", t0 + Duration::from_millis(100))
            .unwrap();
        assert!(v.is_none());
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert!(t0.elapsed() < Duration::from_millis(100) + GRACE);
        stores[2].delete("k0").unwrap();
        assert_eq!(
            stores[0]
                .get("k0", Instant::now() + Duration::from_millis(10))
                .unwrap(),
            None
        );
        let overflow = stores[0].add("n", i64::MAX).unwrap_err().to_string();
        assert!(overflow.contains("overflow"), "{overflow}");
        // Still usable after a refused request.
        assert_eq!(stores[0].add("n", 1).unwrap(), 4);
        // A value over the frame cap is refused before it is sent.
        let big = vec![0u8; MAX_FRAME];
        assert!(matches!(
            stores[1].set("big", &big),
            Err(Error::InvalidArgument { .. })
        ));
        stores[1].set("small", b"ok").unwrap();
        drop(stores);
        // The port is free again once rank 0's store is gone.
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }

    #[test]
    fn single_rank_on_any_port() {
        let st = TcpStore::rendezvous(&cfg(0, 1, 0, 2000)).unwrap();
        assert!(!st.master().ends_with(":0"), "{}", st.master());
        st.set("a", b"b").unwrap();
        assert_eq!(
            st.get("a", Instant::now()).unwrap().as_deref(),
            Some(&b"b"[..])
        );
    }

    #[test]
    fn wrong_world_size_reaches_everyone() {
        let port = free_port("127.0.0.1").unwrap();
        let res = meet(vec![
            cfg(0, 3, port, 3000),
            cfg(1, 2, port, 3000),
            cfg(2, 3, port, 3000),
        ]);
        for (r, x) in res.into_iter().enumerate() {
            match x {
                Err(Error::WrongWorldSize {
                    rank: 1,
                    expected: 3,
                    got: 2,
                }) => {}
                other => panic!("rank {r}: {other:?}"),
            }
        }
    }

    #[test]
    fn local_rank_checks() {
        assert!(matches!(
            TcpStore::rendezvous(&cfg(2, 2, 1, 100)),
            Err(Error::RankOutOfRange { rank: 2, world: 2 })
        ));
        assert!(matches!(
            TcpStore::rendezvous(&cfg(0, 0, 1, 100)),
            Err(Error::RankOutOfRange { rank: 0, world: 0 })
        ));
    }

    #[test]
    fn client_rejects_a_foreign_service() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = thread::spawn(move || {
            for answer in [
                &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
                &[3, 0, 0, 0, 0x99, 0, 0],
            ] {
                let (mut s, _) = l.accept().unwrap();
                let mut hello = [0u8; 64];
                let _ = s.read(&mut hello);
                s.write_all(answer).unwrap();
            }
        });
        for expect in ["cap", "0x99"] {
            match TcpStore::rendezvous(&cfg(1, 2, port, 2000)) {
                Err(Error::Malformed {
                    rank: 1, detail, ..
                }) => {
                    assert!(detail.contains(expect), "{detail}")
                }
                other => panic!("{other:?}"),
            }
        }
        t.join().unwrap();
    }

    #[test]
    fn silent_master_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            thread::sleep(Duration::from_millis(1500));
            drop(s);
        });
        let t0 = Instant::now();
        match TcpStore::rendezvous(&cfg(1, 2, port, 300)) {
            Err(Error::Timeout { detail, .. }) => {
                assert!(detail.contains("no welcome"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_millis(300) + GRACE + Duration::from_millis(200));
        t.join().unwrap();
    }

    #[test]
    fn other_protocol_version_is_told_why() {
        let port = free_port("127.0.0.1").unwrap();
        let rank0 = thread::spawn(move || TcpStore::rendezvous(&cfg(0, 2, port, 1500)));
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut s = loop {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                break s;
            }
            assert!(Instant::now() < deadline, "master never came up");
            thread::sleep(Duration::from_millis(5));
        };
        let hello = Request::Hello {
            version: VERSION + 1,
            rank: 1,
            world: 2,
            wait_ms: 1000,
        };
        s.write_all(&hello.encode().unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let p = read_frame(&mut s, MAX_FRAME).unwrap();
        match Reply::decode(&p).unwrap() {
            Reply::Failed(Failure::Other { reason }) => {
                assert!(reason.contains("version 2"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Rank 0 then times out, naming the stray connection.
        match rank0.join().unwrap() {
            Err(Error::Timeout { detail, .. }) => {
                assert!(
                    detail.contains("[1] never arrived") && detail.contains("malformed"),
                    "{detail}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_rank_that_leaves_before_the_welcome_fails_everyone() {
        let port = free_port("127.0.0.1").unwrap();
        let leaver = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut s = loop {
                if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                    break s;
                }
                assert!(Instant::now() < deadline, "master never came up");
                thread::sleep(Duration::from_millis(5));
            };
            let hello = Request::Hello {
                version: VERSION,
                rank: 2,
                world: 3,
                wait_ms: 3000,
            };
            s.write_all(&hello.encode().unwrap()).unwrap();
            thread::sleep(Duration::from_millis(50));
            // Dies without waiting for the welcome.
        });
        let t0 = Instant::now();
        let rank0 = thread::spawn(move || TcpStore::rendezvous(&cfg(0, 3, port, 3000)));
        leaver.join().unwrap();
        thread::sleep(Duration::from_millis(300));
        let rank1 = TcpStore::rendezvous(&cfg(1, 3, port, 3000));
        let res = vec![rank0.join().unwrap(), rank1];
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        for (r, x) in res.into_iter().enumerate() {
            match x {
                Err(Error::RendezvousFailed { rank, reason }) => {
                    assert_eq!(rank, r);
                    assert!(
                        reason.contains("rank 2") && reason.contains("closed"),
                        "{reason}"
                    );
                }
                other => panic!("rank {r}: {other:?}"),
            }
        }
    }

    #[test]
    fn dropping_rank0_fails_a_blocked_get() {
        let port = free_port("127.0.0.1").unwrap();
        let mut stores = meet(vec![cfg(0, 2, port, 3000), cfg(1, 2, port, 3000)])
            .into_iter()
            .collect::<Result<Vec<_>>>()
            .unwrap();
        let s1 = stores.pop().unwrap();
        let s0 = stores.pop().unwrap();
        let t0 = Instant::now();
        let h = thread::spawn(move || s1.get("never", Instant::now() + Duration::from_secs(3)));
        thread::sleep(Duration::from_millis(100));
        drop(s0);
        let r = h.join().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2));
        match r {
            Err(Error::RendezvousFailed { rank: 1, reason }) => {
                assert!(reason.contains("get 'never'"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
