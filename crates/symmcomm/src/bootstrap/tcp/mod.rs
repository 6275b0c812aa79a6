//! The TCP rendezvous and store: rank 0 listens, every rank (rank 0 included) connects as a
//! client; once all ranks have joined, the same connections carry store requests. Every wait
//! has a deadline; every fault is a specific error on every rank.
//!
//! The rooms: [`wire`] the frames and messages (the protocol's byte layout is documented
//! there), [`master`] rank 0's server, [`client`] [`TcpStore`], a rank's side; this file the
//! rendezvous that puts them together.
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
//! 4. On its way out a rank may say farewell (a communicator does when it is dropped): the
//!    master answers once every rank has said farewell or closed its connection (a rank that
//!    died counts as gone), or names the stragglers when the wait runs out. The client waits in
//!    short slices (saying the same round again), so the connection is not held for long.
//! 5. Dropping rank 0's [`TcpStore`] closes its own connection, then waits (the rendezvous's
//!    timeout at most, with a warning naming who is still connected) until every other rank
//!    has closed its connection: a rank still reading the last exchange's values is answered.
//!    Then the master stops: it stops accepting, closes the reading side of every connection (a
//!    request already being answered is still answered), and joins its threads.

mod client;
mod master;
mod wire;

#[cfg(test)]
mod tests;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, info};

pub use client::TcpStore;
use client::{Conn, connect};
use master::Master;

use crate::error::{Error, Op, OpCtx, Result};

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

impl TcpStore {
    /// Meet the other ranks; returns once all `world_size` ranks have joined, or with the
    /// failure every rank sees (wrong world size, duplicate rank, timeout naming the ranks
    /// that never arrived), or `MasterUnreachable`/`AddrInUse` when there is no master.
    pub fn rendezvous(cfg: &RendezvousConfig) -> Result<Self> {
        let start = Instant::now();
        let deadline = start + cfg.timeout;
        check_config(cfg)?;
        let (master, server, own) = if cfg.rank == 0 {
            serve(cfg, deadline)?
        } else {
            (host_port(&cfg.addr, cfg.port), None, None)
        };
        let stream = connect(cfg, &master, own, start, deadline)?;
        let mut store = TcpStore {
            rank: cfg.rank,
            world_size: cfg.world_size,
            master,
            timeout: cfg.timeout,
            conn: Mutex::new(Conn {
                stream,
                broken: None,
            }),
            server,
            farewells: AtomicU64::new(0),
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
                // Rank 0 stays until every rank was told why (or its deadline).
                if let Some(server) = store.server.take() {
                    server.close(deadline);
                }
                Err(e)
            }
        }
    }
}

/// A rank inside a world the protocol can carry.
fn check_config(cfg: &RendezvousConfig) -> Result<()> {
    if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
        return Err(Error::RankOutOfRange {
            rank: cfg.rank,
            world: cfg.world_size,
        });
    }
    if cfg.timeout.is_zero() || cfg.timeout > super::MAX_TIMEOUT {
        return Err(Error::RendezvousFailed {
            rank: cfg.rank,
            reason: format!(
                "timeout {:?} is outside (0, {:?}]",
                cfg.timeout,
                super::MAX_TIMEOUT
            ),
        });
    }
    if u32::try_from(cfg.world_size).is_err() {
        return Err(Error::RendezvousFailed {
            rank: cfg.rank,
            reason: format!("world size {} does not fit the protocol", cfg.world_size),
        });
    }
    Ok(())
}

/// Rank 0: listen on exactly `cfg.addr` and start the master. Returns the master's
/// `host:port` (with the port actually bound), the server, and the address to connect to.
fn serve(
    cfg: &RendezvousConfig,
    deadline: Instant,
) -> Result<(String, Option<Master>, Option<SocketAddr>)> {
    let wanted = host_port(&cfg.addr, cfg.port);
    let listener = TcpListener::bind((cfg.addr.as_str(), cfg.port)).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            Error::AddrInUse {
                addr: wanted.clone(),
                source: e,
            }
        } else {
            Error::io(
                format!("rank 0: listening for the rendezvous on {wanted}"),
                e,
            )
        }
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io(format!("rank 0: reading the address bound on {wanted}"), e))?;
    let master = host_port(&cfg.addr, local.port());
    info!(
        "rank 0: serving the rendezvous of {} ranks on {master}",
        cfg.world_size
    );
    let server = Master::start(
        listener,
        cfg.world_size,
        master.clone(),
        cfg.timeout,
        deadline,
    )?;
    Ok((master, Some(server), Some(local)))
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

/// A rank or world size as the protocol carries it (checked to fit by `check_config`).
fn world_u32(world: usize) -> u32 {
    u32::try_from(world).unwrap_or(u32::MAX)
}

/// The context of a bootstrap error of `rank`.
fn bootstrap_ctx(rank: usize, world: usize) -> OpCtx {
    OpCtx {
        op: Op::Bootstrap,
        group: "world".into(),
        rank,
        world,
        bytes: 0,
    }
}
