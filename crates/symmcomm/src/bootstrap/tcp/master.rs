//! Rank 0's server (the master): an accept thread and one thread per connection. It admits
//! hellos until every rank has joined, or tells every rank why the rendezvous failed; then it
//! answers store requests and farewells. Closing it waits for the other ranks to leave first.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::wire::{
    Failure, FrameError, MAX_FRAME, Reply, Request, VERSION, is_timeout, read_frame,
};
use super::{lock, world_u32};
use crate::error::Error;

/// How often the accept loop checks for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// How often a rank waiting for the welcome is checked for having gone away.
const LIVENESS_POLL: Duration = Duration::from_millis(100);
/// Malformed connections remembered (for error messages); later ones are only counted.
const MALFORMED_KEPT: usize = 8;

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
    /// Ranks whose connection ended after they were admitted (they closed it, or died).
    left: Vec<bool>,
    /// The latest farewell round each rank has said.
    farewells: Vec<u64>,
    shutdown: bool,
    /// Clones of the open connections, to close their reading side on shutdown.
    conns: Vec<(u64, TcpStream)>,
}

/// The fields of a hello.
#[derive(Clone, Copy)]
struct Hello {
    version: u16,
    rank: u32,
    world: u32,
    wait_ms: u64,
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

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Wait on the condition variable until notified or `until`.
    fn wait<'a>(&self, st: MutexGuard<'a, State>, until: Instant) -> (MutexGuard<'a, State>, bool) {
        let (guard, res) = self
            .changed
            .wait_timeout(st, until.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|p| p.into_inner());
        (guard, res.timed_out())
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

    fn mark_left(&self, rank: usize) {
        self.lock().left[rank] = true;
        self.changed.notify_all();
    }
}

/// Marks an admitted rank as gone when its connection's thread ends, however it ends.
struct Seat<'a> {
    shared: &'a Shared,
    rank: usize,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        self.shared.mark_left(self.rank);
    }
}

/// Rank 0's server: an accept thread and a thread per connection.
pub(super) struct Master {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Master {
    /// Serve the rendezvous of `world` ranks on `listener` (bound to `master`); the rendezvous
    /// fails for everyone at `deadline` unless every rank has joined.
    pub(super) fn start(
        listener: TcpListener,
        world: usize,
        master: String,
        io_timeout: Duration,
        deadline: Instant,
    ) -> crate::error::Result<Master> {
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
                left: vec![false; world],
                farewells: vec![0; world],
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

    /// After a failed rendezvous: wait until every rank was told, or `deadline`.
    pub(super) fn linger(&self, deadline: Instant) {
        let mut st = self.shared.lock();
        if st.failure.is_none() {
            return;
        }
        loop {
            if st.notified.iter().all(|&n| n) || st.shutdown {
                return;
            }
            if Instant::now() >= deadline {
                let untold: Vec<usize> = (0..self.shared.world)
                    .filter(|&r| !st.notified[r])
                    .collect();
                debug!(
                    "rank 0: rank(s) {untold:?} were not told of the failure before the deadline"
                );
                return;
            }
            st = self.shared.wait(st, deadline).0;
        }
    }

    /// Stop serving once the other ranks are done with the store: after a completed
    /// rendezvous, when every other rank has closed its connection (it dropped its store, or
    /// its process ended or died); after a failed one, when every rank was told. At `deadline`
    /// it stops anyway, with a warning naming the ranks still connected.
    pub(super) fn close(self, deadline: Instant) {
        self.linger(deadline);
        self.await_departures(deadline);
        // Dropping `self` stops the server.
    }

    /// After a completed rendezvous: wait until every rank but rank 0 has left, or `deadline`.
    /// Ranks that missed the last farewell were already waited for once (a farewell's deadline)
    /// and are not waited for again.
    fn await_departures(&self, deadline: Instant) {
        let mut st = self.shared.lock();
        if !st.complete {
            return;
        }
        let started = Instant::now();
        loop {
            let round = st.farewells.iter().copied().max().unwrap_or(0);
            let staying: Vec<usize> = (1..self.shared.world)
                .filter(|&r| !st.left[r] && st.farewells[r] >= round)
                .collect();
            if staying.is_empty() {
                debug!(
                    "rank 0: every rank left the store on {} ({:?} after closing began)",
                    self.shared.master,
                    started.elapsed()
                );
                return;
            }
            if Instant::now() >= deadline {
                warn!(
                    "rank 0: rank(s) {staying:?} still connected to the store on {} {:?} after rank 0 finished; stopping it anyway (their next store request fails)",
                    self.shared.master,
                    started.elapsed()
                );
                return;
            }
            st = self.shared.wait(st, deadline).0;
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
    while !shared.lock().shutdown {
        match listener.accept() {
            Ok((stream, peer)) => {
                next_id += 1;
                handles.extend(spawn_connection(shared, stream, peer, next_id));
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
    close_connections(shared, handles);
    debug!("rank 0: rendezvous server on {} stopped", shared.master);
}

/// Start the thread that serves one accepted connection (`None` when it could not start).
fn spawn_connection(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
) -> Option<JoinHandle<()>> {
    if let Err(e) = stream.set_nonblocking(false) {
        warn!("rank 0: dropping connection from {peer}: set_nonblocking: {e}");
        return None;
    }
    match stream.try_clone() {
        Ok(c) => shared.lock().conns.push((id, c)),
        Err(e) => {
            warn!("rank 0: dropping connection from {peer}: try_clone: {e}");
            return None;
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
        Ok(h) => Some(h),
        Err(e) => {
            warn!("rank 0: dropping connection from {peer}: spawning its thread: {e}");
            shared.lock().conns.retain(|(i, _)| *i != id);
            None
        }
    }
}

/// On shutdown: close the reading side of every connection and join their threads.
fn close_connections(shared: &Shared, handles: Vec<JoinHandle<()>>) {
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

/// One connection: its hello, its admission, then its store requests until it closes.
fn serve_conn(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    let peer = peer.to_string();
    let _ = stream.set_nodelay(true);
    let io_timeout = Some(shared.io_timeout.max(Duration::from_millis(1)));
    if let Err(e) = stream
        .set_read_timeout(io_timeout)
        .and_then(|()| stream.set_write_timeout(io_timeout))
    {
        warn!("rank 0: dropping connection from {peer}: setting timeouts: {e}");
        return;
    }
    let Some(hello) = read_hello(shared, &mut stream, &peer) else {
        return;
    };
    let Some(rank) = admit(shared, &mut stream, hello, &peer) else {
        return;
    };
    let _seat = Seat { shared, rank };
    // Requests: block until the next one or until shutdown closes the reading side.
    if let Err(e) = stream.set_read_timeout(None) {
        warn!("rank 0: dropping rank {rank} ({peer}): clearing the read timeout: {e}");
        return;
    }
    serve_requests(shared, stream, rank, &format!("rank {rank} at {peer}"));
}

/// The first frame of a connection, which must be a hello; anything else is recorded as
/// malformed (and named in a later timeout).
fn read_hello(shared: &Shared, stream: &mut TcpStream, peer: &str) -> Option<Hello> {
    let frame = match read_frame(stream, MAX_FRAME) {
        Ok(f) => f,
        Err(FrameError::Closed) => {
            debug!("rank 0: {peer} connected and closed without a word");
            return None;
        }
        Err(FrameError::Malformed(d)) => {
            shared.record_malformed(peer, d);
            return None;
        }
        Err(FrameError::Io { err, partial }) => {
            if partial > 0 || is_timeout(&err) {
                shared.record_malformed(
                    peer,
                    format!("sent {partial} bytes and no complete hello ({err})"),
                );
            } else {
                debug!("rank 0: reading a hello from {peer}: {err}");
            }
            return None;
        }
    };
    match Request::decode(&frame) {
        Ok(Request::Hello {
            version,
            rank,
            world,
            wait_ms,
        }) => Some(Hello {
            version,
            rank,
            world,
            wait_ms,
        }),
        Ok(other) => {
            let detail = format!("first message is a {} request, not a hello", other.name());
            shared.record_malformed(peer, detail);
            None
        }
        Err(d) => {
            shared.record_malformed(peer, d);
            None
        }
    }
}

/// Check the hello's version, wait for the rendezvous's outcome and send it; the rank when it
/// was welcomed.
fn admit(shared: &Shared, stream: &mut TcpStream, hello: Hello, peer: &str) -> Option<usize> {
    if hello.version != VERSION {
        let reason = format!(
            "{peer} speaks symmcomm rendezvous protocol version {}, the master at {} speaks {VERSION}",
            hello.version, shared.master
        );
        shared.record_malformed(peer, reason.clone());
        send(stream, &Reply::Failed(Failure::Other { reason }), peer);
        return None;
    }
    match join(shared, stream, hello, peer) {
        Admission::Fail(f) => {
            send(stream, &Reply::Failed(f), peer);
            None
        }
        Admission::Gone => None,
        Admission::Welcome => {
            let welcome = Reply::Welcome {
                version: VERSION,
                world: world_u32(shared.world),
            };
            let rank = hello.rank as usize;
            if send(stream, &welcome, peer) {
                Some(rank)
            } else {
                // Nobody is at the other end any more.
                shared.mark_left(rank);
                None
            }
        }
    }
}

/// Answer the requests of a joined rank, one at a time, until it closes its connection.
fn serve_requests(shared: &Shared, mut stream: TcpStream, rank: usize, who: &str) {
    loop {
        let frame = match read_frame(&mut stream, MAX_FRAME) {
            Ok(f) => f,
            Err(FrameError::Closed) => {
                debug!("rank 0: {who} disconnected");
                return;
            }
            Err(FrameError::Malformed(d)) => return shared.record_malformed(who, d),
            Err(FrameError::Io { err, .. }) => {
                debug!("rank 0: reading a request from {who}: {err}");
                return;
            }
        };
        let reply = match Request::decode(&frame) {
            Ok(Request::Hello { .. }) => {
                return shared
                    .record_malformed(who, "a second hello on a joined connection".into());
            }
            Ok(req) => handle(shared, rank, req),
            Err(d) => return shared.record_malformed(who, d),
        };
        if !send(&mut stream, &reply, who) {
            return;
        }
    }
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

/// Admit a hello and wait for the outcome. A joined rank whose connection closes before the
/// welcome fails the rendezvous for all.
fn join(shared: &Shared, stream: &TcpStream, hello: Hello, peer: &str) -> Admission {
    let mut st = shared.lock();
    if st.complete {
        return Admission::Fail(stray_failure(shared, &st, hello, peer));
    }
    if st.failure.is_none() {
        record_hello(shared, &mut st, hello, peer);
    }
    await_outcome(shared, st, stream, hello.rank, peer)
}

/// Why a hello that arrives after the rendezvous completed is refused. The job already runs;
/// this process is a stray: tell it, leave the others alone.
fn stray_failure(shared: &Shared, st: &State, hello: Hello, peer: &str) -> Failure {
    let Hello { rank, world, .. } = hello;
    let rank_u = rank as usize;
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
    f
}

/// Record a hello before the rendezvous completed: a wrong world size, a rank out of range or
/// a rank that already joined fails the rendezvous; otherwise the rank joins, its deadline
/// counts, and the last one completes the rendezvous.
fn record_hello(shared: &Shared, st: &mut State, hello: Hello, peer: &str) {
    let Hello {
        rank,
        world,
        wait_ms,
        ..
    } = hello;
    let rank_u = rank as usize;
    let now = Instant::now();
    if world as usize != shared.world {
        let f = Failure::WrongWorldSize {
            rank,
            expected: world_u32(shared.world),
            got: world,
        };
        return shared.fail(st, f);
    }
    if rank_u >= shared.world {
        return shared.fail(st, Failure::RankOutOfRange { rank, world });
    }
    if let Some(first) = st.joined[rank_u].clone() {
        let second = peer.to_string();
        return shared.fail(
            st,
            Failure::DuplicateRank {
                rank,
                first,
                second,
            },
        );
    }
    st.joined[rank_u] = Some(peer.to_string());
    let theirs = after_ms(now, wait_ms);
    if theirs < st.deadline {
        st.deadline = theirs;
        st.deadline_owner = rank_u;
    }
    debug!("rank 0: rank {rank} joined from {peer}");
    if now >= st.deadline {
        let detail = shared.timeout_detail(st);
        shared.fail(st, Failure::Timeout { detail });
    } else if st.joined.iter().all(Option::is_some) {
        st.complete = true;
        info!(
            "rendezvous on {}: all {} ranks joined",
            shared.master, shared.world
        );
        shared.changed.notify_all();
    }
}

/// Wait until the rendezvous completes or fails (the deadline passing fails it), checking
/// every [`LIVENESS_POLL`] that this rank's client is still there.
fn await_outcome(
    shared: &Shared,
    mut st: MutexGuard<'_, State>,
    stream: &TcpStream,
    rank: u32,
    peer: &str,
) -> Admission {
    let rank_u = rank as usize;
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
        if Instant::now() >= st.deadline {
            let detail = shared.timeout_detail(&st);
            shared.fail(&mut st, Failure::Timeout { detail });
            continue;
        }
        let until = st.deadline.min(Instant::now() + LIVENESS_POLL);
        let (guard, timed_out) = shared.wait(st, until);
        st = guard;
        if timed_out && left_before_welcome(&st, stream, rank_u, peer) {
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

/// Whether `rank`, which joined from `peer` and is still waiting for the rendezvous, closed
/// its connection.
fn left_before_welcome(st: &State, stream: &TcpStream, rank: usize, peer: &str) -> bool {
    st.failure.is_none()
        && !st.complete
        && st
            .joined
            .get(rank)
            .is_some_and(|j| j.as_deref() == Some(peer))
        && peer_left(stream)
}

/// Carry out one store request of `rank`.
fn handle(shared: &Shared, rank: usize, req: Request) -> Reply {
    match req {
        Request::Set { key, value } => {
            shared.lock().map.insert(key, value);
            shared.changed.notify_all();
            Reply::Done
        }
        Request::Get { key, wait_ms } => get(shared, &key, after_ms(Instant::now(), wait_ms)),
        Request::Add { key, delta } => add(shared, key, delta),
        Request::Delete { key } => {
            shared.lock().map.remove(&key);
            Reply::Done
        }
        Request::Farewell { round, wait_ms } => {
            farewell(shared, rank, round, after_ms(Instant::now(), wait_ms))
        }
        Request::Hello { .. } => Reply::Refused("unexpected hello".into()),
    }
}

fn shutting_down(shared: &Shared) -> Reply {
    Reply::Refused(format!("the master on {} is shutting down", shared.master))
}

/// The value at `key`, waiting for it until `deadline`.
fn get(shared: &Shared, key: &str, deadline: Instant) -> Reply {
    let mut st = shared.lock();
    loop {
        if let Some(v) = st.map.get(key) {
            return Reply::Value(v.clone());
        }
        if st.shutdown {
            return shutting_down(shared);
        }
        if Instant::now() >= deadline {
            return Reply::Absent;
        }
        st = shared.wait(st, deadline).0;
    }
}

/// Add `delta` to the integer at `key` (0 when absent), refusing an overflow.
fn add(shared: &Shared, key: String, delta: i64) -> Reply {
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

/// `rank`'s farewell of `round`: a barrier of every rank that has not left. Done once every
/// rank has said farewell `round` (or a later one) or has closed its connection; at `deadline`,
/// the ranks still missing. The client repeats a round in short waits, so saying it again is
/// harmless.
fn farewell(shared: &Shared, rank: usize, round: u64, deadline: Instant) -> Reply {
    let mut st = shared.lock();
    if st.farewells[rank] < round {
        st.farewells[rank] = round;
        shared.changed.notify_all();
    }
    loop {
        let stragglers: Vec<u32> = (0..shared.world)
            .filter(|&r| !st.left[r] && st.farewells[r] < round)
            .map(world_u32)
            .collect();
        if stragglers.is_empty() {
            return Reply::Done;
        }
        if st.shutdown {
            return shutting_down(shared);
        }
        if Instant::now() >= deadline {
            return Reply::Stragglers(stragglers);
        }
        st = shared.wait(st, deadline).0;
    }
}

/// `now + ms`, saturating at a year so a peer's absurd wait cannot overflow an `Instant`.
fn after_ms(now: Instant, ms: u64) -> Instant {
    let wait = Duration::from_millis(ms).min(Duration::from_secs(365 * 24 * 3600));
    now.checked_add(wait).unwrap_or(now)
}
