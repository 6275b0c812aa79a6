//! The rendezvous protocol's bytes: frames (`[u32 little-endian length][payload]`, capped at
//! [`MAX_FRAME`]) and the messages inside them, written and parsed by hand so that the layout
//! is exactly the table below and every parse error names the field that was wrong.
//!
//! # Messages (protocol version 2)
//!
//! A payload starts with a one-byte kind; integers are little-endian; `str` and `bytes` are a
//! `u32` length followed by that many bytes (`str` must be UTF-8). Trailing bytes after a
//! message are an error.
//!
//! | kind | direction | message | fields |
//! | --- | --- | --- | --- |
//! | `0x01` | client → master | hello | magic `b"SYMMCOMM"`, version `u16`, rank `u32`, world size `u32`, wait `u64` ms (what is left of the client's deadline) |
//! | `0x02` | client → master | set | key `str`, value `bytes` |
//! | `0x03` | client → master | get | key `str`, wait `u64` ms |
//! | `0x04` | client → master | add | key `str`, delta `i64` |
//! | `0x05` | client → master | delete | key `str` |
//! | `0x06` | client → master | farewell | round `u64` (this rank's count of farewells, from 1), wait `u64` ms |
//! | `0x81` | master → client | welcome | magic, version `u16`, world size `u32` |
//! | `0x82` | master → client | failed | code `u8` + fields: 1 wrong world size (rank, expected, got: `u32`), 2 duplicate rank (rank `u32`, first `str`, second `str`), 3 rank out of range (rank, world: `u32`), 4 timeout (detail `str`), 5 other (reason `str`) |
//! | `0x83` | master → client | done | (answers set, delete, and a farewell every rank joined) |
//! | `0x84` | master → client | value | value `bytes` |
//! | `0x85` | master → client | absent | (a get whose wait ran out) |
//! | `0x86` | master → client | count | new value `i64` (answers add) |
//! | `0x87` | master → client | refused | reason `str` (the request was not carried out) |
//! | `0x88` | master → client | stragglers | count `u32`, then that many ranks `u32` (a farewell whose wait ran out: the ranks that neither said farewell nor left) |
//!
//! Version 2 added the farewell and the stragglers answer (version 1 had no closing barrier).
//!
//! Why not serde: no compact serde format is in the dependency graph (JSON would triple every
//! store value, and the host backend's data plane across processes travels as store values),
//! a new one would change the byte layout above and turn "truncated key: needs 200 bytes, 1
//! left" into a generic end-of-input error. The codec is a few dozen lines per direction and
//! is fuzzed below.

use std::io::{self, Read};
use std::time::Duration;

use super::bootstrap_ctx;
use crate::error::Error;

/// Largest frame payload either side accepts.
pub(super) const MAX_FRAME: usize = 64 << 20;
/// First bytes of a hello and a welcome.
pub(super) const MAGIC: [u8; 8] = *b"SYMMCOMM";
/// Version of the wire protocol described in the module documentation.
pub(super) const VERSION: u16 = 2;

pub(super) mod kind {
    pub(in super::super) const HELLO: u8 = 0x01;
    pub(in super::super) const SET: u8 = 0x02;
    pub(in super::super) const GET: u8 = 0x03;
    pub(in super::super) const ADD: u8 = 0x04;
    pub(in super::super) const DELETE: u8 = 0x05;
    pub(in super::super) const FAREWELL: u8 = 0x06;
    pub(in super::super) const WELCOME: u8 = 0x81;
    pub(in super::super) const FAILED: u8 = 0x82;
    pub(in super::super) const DONE: u8 = 0x83;
    pub(in super::super) const VALUE: u8 = 0x84;
    pub(in super::super) const ABSENT: u8 = 0x85;
    pub(in super::super) const COUNT: u8 = 0x86;
    pub(in super::super) const REFUSED: u8 = 0x87;
    pub(in super::super) const STRAGGLERS: u8 = 0x88;
}

/// What a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Request {
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
    Farewell {
        round: u64,
        wait_ms: u64,
    },
}

/// A failure of the rendezvous that the master reports to every rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Failure {
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
pub(super) enum Reply {
    Welcome { version: u16, world: u32 },
    Failed(Failure),
    Done,
    Value(Vec<u8>),
    Absent,
    Count(i64),
    Refused(String),
    Stragglers(Vec<u32>),
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
        self.u32(len_u32(b.len())).raw(b)
    }
    fn u32s(self, xs: &[u32]) -> Self {
        xs.iter()
            .fold(self.u32(len_u32(xs.len())), |e, &x| e.u32(x))
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

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl Request {
    /// The frame carrying this request, or its payload length when over [`MAX_FRAME`].
    pub(super) fn encode(&self) -> std::result::Result<Vec<u8>, usize> {
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
            Request::Farewell { round, wait_ms } => {
                Enc::new(kind::FAREWELL).u64(*round).u64(*wait_ms)
            }
        }
        .finish()
    }

    /// Parse a payload; the error names the field that was wrong.
    pub(super) fn decode(payload: &[u8]) -> std::result::Result<Request, String> {
        let mut d = Dec(payload);
        let req = match d.u8("message kind")? {
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
            kind::FAREWELL => Request::Farewell {
                round: d.u64("round")?,
                wait_ms: d.u64("wait")?,
            },
            other => return Err(format!("unknown request kind 0x{other:02x}")),
        };
        d.end()?;
        Ok(req)
    }

    /// The message's name in logs and errors.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Set { .. } => "set",
            Request::Get { .. } => "get",
            Request::Add { .. } => "add",
            Request::Delete { .. } => "delete",
            Request::Farewell { .. } => "farewell",
        }
    }
}

impl Failure {
    fn encode(&self, e: Enc) -> Enc {
        match self {
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

    fn decode(d: &mut Dec<'_>) -> std::result::Result<Failure, String> {
        Ok(match d.u8("failure code")? {
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
        })
    }

    /// The error rank `rank` of `world` returns for this failure, after waiting `waited`.
    pub(super) fn into_error(self, rank: usize, world: usize, waited: Duration) -> Error {
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

impl Reply {
    /// The frame carrying this answer, or its payload length when over [`MAX_FRAME`].
    pub(super) fn encode(&self) -> std::result::Result<Vec<u8>, usize> {
        match self {
            Reply::Welcome { version, world } => Enc::new(kind::WELCOME)
                .raw(&MAGIC)
                .u16(*version)
                .u32(*world),
            Reply::Failed(f) => f.encode(Enc::new(kind::FAILED)),
            Reply::Done => Enc::new(kind::DONE),
            Reply::Value(v) => Enc::new(kind::VALUE).bytes(v),
            Reply::Absent => Enc::new(kind::ABSENT),
            Reply::Count(c) => Enc::new(kind::COUNT).i64(*c),
            Reply::Refused(r) => Enc::new(kind::REFUSED).bytes(r.as_bytes()),
            Reply::Stragglers(ranks) => Enc::new(kind::STRAGGLERS).u32s(ranks),
        }
        .finish()
    }

    /// Parse a payload; the error names the field that was wrong.
    pub(super) fn decode(payload: &[u8]) -> std::result::Result<Reply, String> {
        let mut d = Dec(payload);
        let reply = match d.u8("message kind")? {
            kind::WELCOME => {
                d.magic()?;
                Reply::Welcome {
                    version: d.u16("version")?,
                    world: d.u32("world size")?,
                }
            }
            kind::FAILED => Reply::Failed(Failure::decode(&mut d)?),
            kind::DONE => Reply::Done,
            kind::VALUE => Reply::Value(d.bytes("value")?.to_vec()),
            kind::ABSENT => Reply::Absent,
            kind::COUNT => Reply::Count(d.i64("count")?),
            kind::REFUSED => Reply::Refused(d.str("reason")?),
            kind::STRAGGLERS => Reply::Stragglers(d.u32s("stragglers")?),
            other => return Err(format!("unknown reply kind 0x{other:02x}")),
        };
        d.end()?;
        Ok(reply)
    }

    /// The message's name in logs and errors.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Reply::Welcome { .. } => "welcome",
            Reply::Failed(_) => "failed",
            Reply::Done => "done",
            Reply::Value(_) => "value",
            Reply::Absent => "absent",
            Reply::Count(_) => "count",
            Reply::Refused(_) => "refused",
            Reply::Stragglers(_) => "stragglers",
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
    fn u32s(&mut self, what: &str) -> std::result::Result<Vec<u32>, String> {
        // The count is checked against the bytes present before anything is allocated.
        let n = self.u32(what)? as usize;
        let raw = self.take(n * 4, what)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
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
pub(super) enum FrameError {
    /// The peer closed the connection between frames.
    Closed,
    /// Bytes that are not a frame: oversize or zero length, or closed in the middle.
    Malformed(String),
    /// The socket failed or timed out after `partial` bytes of the frame.
    Io { err: io::Error, partial: usize },
}

/// Whether a socket error is a read or write timeout.
pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Read one frame of at most `cap` payload bytes. The length is checked against `cap` before
/// any allocation, and the buffer grows only as bytes arrive, never past the declared length.
pub(super) fn read_frame(
    r: &mut impl Read,
    cap: usize,
) -> std::result::Result<Vec<u8>, FrameError> {
    let len = read_header(r, cap)?;
    read_payload(r, len)
}

/// The payload length a frame header announces, checked against `cap`.
fn read_header(r: &mut impl Read, cap: usize) -> std::result::Result<usize, FrameError> {
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
    Ok(len)
}

/// `len` payload bytes, into a buffer that doubles from 64 KiB as bytes arrive.
fn read_payload(r: &mut impl Read, len: usize) -> std::result::Result<Vec<u8>, FrameError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
            Request::Farewell {
                round: 2,
                wait_ms: 60_000,
            },
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
            Reply::Stragglers(vec![]),
            Reply::Stragglers(vec![2, 7, u32::MAX]),
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

    /// The hello's first bytes are what any version of the protocol reads first, so a peer of
    /// another version is told why instead of being dropped as garbage.
    #[test]
    fn hello_layout_is_fixed() {
        let f = Request::Hello {
            version: 0x0102,
            rank: 3,
            world: 4,
            wait_ms: 5,
        }
        .encode()
        .unwrap();
        assert_eq!(&f[..4], &27u32.to_le_bytes());
        assert_eq!(f[4], kind::HELLO);
        assert_eq!(&f[5..13], b"SYMMCOMM");
        assert_eq!(&f[13..15], &[0x02, 0x01]);
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
        // A straggler count larger than the bytes present fails before any allocation.
        assert!(
            Reply::decode(&[kind::STRAGGLERS, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0])
                .unwrap_err()
                .contains("truncated stragglers")
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
}
