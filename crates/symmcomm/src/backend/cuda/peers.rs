//! Peer access to a rank's device memory from every other rank of a group, for our own kernels
//! and copy-engine transfers. Memory comes from `ncclMemAlloc` (cuMem allocations exportable as
//! POSIX file descriptors). Ranks in the same process use each other's pointers directly
//! (`ncclMemAlloc` grants every peer-capable device access); ranks in other processes receive
//! the descriptor over a Unix socket (SCM_RIGHTS), import it and map it into their own address
//! space. Chosen over NCCL's device API because it needs no NCCL headers in our kernels and no
//! per-version struct layouts (2.29 changed them), and works the same on NCCL 2.27–2.30.

use std::ffi::c_void;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;
use cudarc::driver::sys;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

use super::driver::check;
use crate::bootstrap::ControlPlane;
use crate::error::{Error, OpCtx, Result};

/// Another rank's memory as this rank's kernels address it.
#[derive(Debug)]
pub(crate) enum PeerView {
    /// This rank's own memory, or a peer's in the same process: the pointer works as is.
    Direct(u64),
    /// A peer's memory imported and mapped into this process; the shared memory starts
    /// `offset` bytes into the mapping.
    Mapped(Mapping, u64),
}

impl PeerView {
    pub(crate) fn base(&self) -> u64 {
        match self {
            PeerView::Direct(p) => *p,
            PeerView::Mapped(m, offset) => m.va + offset,
        }
    }
}

/// An imported peer allocation mapped at `va`; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    va: u64,
    size: usize,
    ctx: Arc<CudaContext>,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if super::ABANDONED.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: `va` was reserved and mapped with `size` bytes by `import`, and is released
        // once; kernels that used it completed before the owning group was dropped (callers
        // synchronise first).
        unsafe {
            let _ = sys::cuCtxSynchronize();
            let _ = sys::cuMemUnmap(self.va, self.size);
            let _ = sys::cuMemAddressFree(self.va, self.size);
        }
    }
}

fn io_err(ctx: &OpCtx, what: String) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::InvalidArgument {
        ctx: ctx.clone(),
        detail: format!("{what}: {e}"),
    }
}

/// Send `fd` with one byte over `s` (SCM_RIGHTS).
fn send_fd(s: &UnixStream, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other(
            "no room for a descriptor in the message",
        ));
    }
    let sent = sendmsg(s, &[IoSlice::new(b"F")], &mut control, SendFlags::empty())?;
    if sent != 1 {
        return Err(std::io::Error::other(format!(
            "sent {sent} bytes instead of the one that carries the descriptor"
        )));
    }
    Ok(())
}

/// Receive one fd sent by `send_fd` (close-on-exec in this process).
fn recv_fd(s: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(
        s,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.bytes != 1 {
        return Err(std::io::Error::other(format!(
            "expected one byte with a descriptor, got {}",
            msg.bytes
        )));
    }
    // Descriptors left in the drained messages (there should be none) are closed on drop.
    control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .ok_or_else(|| std::io::Error::other("no descriptor in the message"))
}

/// The allocation `ptr` lies in: its base and full size.
fn allocation_of(ptr: u64, ctx: &OpCtx) -> Result<(u64, usize)> {
    let (mut base, mut size) = (0u64, 0usize);
    // SAFETY: both outputs are valid for writing; `ptr` is a device address of this context.
    let r = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) };
    check(r, "cuMemGetAddressRange", ctx)?;
    Ok((base, size))
}

/// A POSIX fd for the cuMem allocation at `base`.
fn export(base: u64, ctx: &OpCtx) -> Result<OwnedFd> {
    let mut handle: sys::CUmemGenericAllocationHandle = 0;
    // SAFETY: `base` is the start of a cuMem allocation of this process.
    let r = unsafe { sys::cuMemRetainAllocationHandle(&mut handle, base as *mut c_void) };
    check(r, "cuMemRetainAllocationHandle", ctx)?;
    let mut fd: RawFd = -1;
    // SAFETY: `fd` is valid for writing an int; the handle was created with POSIX_FD
    // export allowed (`ncclMemAlloc` requests it).
    let r = unsafe {
        sys::cuMemExportToShareableHandle(
            &mut fd as *mut RawFd as *mut c_void,
            handle,
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            0,
        )
    };
    // SAFETY: releases the reference `cuMemRetainAllocationHandle` took.
    let _ = unsafe { sys::cuMemRelease(handle) };
    check(r, "cuMemExportToShareableHandle", ctx)?;
    // SAFETY: the driver returned a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Map a peer's allocation of `size` bytes, given its fd, with read-write access for `ordinal`.
fn import(
    fd: &OwnedFd,
    size: usize,
    ordinal: usize,
    ctx_dev: &Arc<CudaContext>,
    ctx: &OpCtx,
) -> Result<Mapping> {
    let mut handle: sys::CUmemGenericAllocationHandle = 0;
    // SAFETY: `fd` is a live descriptor exported by the peer's driver; the handle is written.
    let r = unsafe {
        sys::cuMemImportFromShareableHandle(
            &mut handle,
            fd.as_raw_fd() as isize as *mut c_void,
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        )
    };
    check(r, "cuMemImportFromShareableHandle", ctx)?;
    let mut va = 0u64;
    // SAFETY: reserving address space has no preconditions beyond a valid output.
    let r = unsafe { sys::cuMemAddressReserve(&mut va, size, 0, 0, 0) };
    if let Err(e) = check(r, "cuMemAddressReserve", ctx) {
        // SAFETY: releases the imported handle.
        let _ = unsafe { sys::cuMemRelease(handle) };
        return Err(e);
    }
    // SAFETY: `va` is a fresh reservation of `size` bytes and `handle` an allocation of that
    // size; once mapped, the mapping keeps the allocation alive and the handle is released.
    let r = unsafe { sys::cuMemMap(va, size, 0, handle, 0) };
    // SAFETY: as above.
    let _ = unsafe { sys::cuMemRelease(handle) };
    if let Err(e) = check(r, "cuMemMap", ctx) {
        // SAFETY: frees the reservation made above.
        let _ = unsafe { sys::cuMemAddressFree(va, size) };
        return Err(e);
    }
    let desc = sys::CUmemAccessDesc {
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal as i32,
        },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    let mapping = Mapping {
        va,
        size,
        ctx: ctx_dev.clone(),
    };
    // SAFETY: `va..va+size` is mapped; `desc` names this rank's device.
    let r = unsafe { sys::cuMemSetAccess(va, size, &desc, 1) };
    check(r, "cuMemSetAccess", ctx)?;
    Ok(mapping)
}

/// What a rank tells its peers about one allocation.
#[derive(serde::Serialize, serde::Deserialize)]
struct Offer {
    pid: u32,
    /// Address of the memory to share (its offset in the allocation is kept on import).
    ptr: u64,
    base: u64,
    size: usize,
    socket: String,
}

/// Every rank's view of the memory at `ptr` (collective over `control`): element `p` addresses
/// rank `p`'s memory from this rank. `tag` keeps concurrent exchanges apart.
pub(crate) fn exchange(
    control: &ControlPlane,
    ptr: u64,
    ordinal: usize,
    dev_ctx: &Arc<CudaContext>,
    tag: &str,
    ctx: &OpCtx,
) -> Result<Vec<PeerView>> {
    let (base, size) = allocation_of(ptr, ctx)?;
    let pid = std::process::id();
    let socket = format!(
        "symmcomm/{pid}/{}/{}/{tag}",
        control.prefix(),
        control.rank()
    );
    // Listen before telling anyone where.
    let listener = listen(&socket, ctx)?;
    let mine = Offer {
        pid,
        ptr,
        base,
        size,
        socket: socket.clone(),
    };
    let all = gather_offers(control, &mine, tag, ctx)?;
    let me = control.rank();
    let ex = Exchange {
        control,
        ordinal,
        dev_ctx,
        ctx,
        deadline: Instant::now() + control.timeout(),
    };
    let mut views: Vec<Option<PeerView>> = (0..all.len()).map(|_| None).collect();
    if all.iter().any(|o| o.pid != pid) {
        ex.map_other_processes(&listener, base, &all, pid, &mut views)?;
    }
    for (p, o) in all.iter().enumerate() {
        if views[p].is_none() {
            views[p] = Some(PeerView::Direct(if p == me { ptr } else { o.ptr }));
        }
    }
    // Nobody unmaps or frees before every rank has mapped.
    control.barrier(&format!("peer memory mapped {tag}"))?;
    Ok(views
        .into_iter()
        .map(|v| v.expect("every view set"))
        .collect())
}

/// A listener on the abstract Unix socket `@socket`.
fn listen(socket: &str, ctx: &OpCtx) -> Result<UnixListener> {
    UnixListener::bind_addr(
        &SocketAddr::from_abstract_name(socket.as_bytes())
            .map_err(io_err(ctx, format!("naming socket {socket}")))?,
    )
    .map_err(io_err(ctx, format!("listening on @{socket}")))
}

/// Every rank's offer, in rank order (collective).
fn gather_offers(
    control: &ControlPlane,
    mine: &Offer,
    tag: &str,
    ctx: &OpCtx,
) -> Result<Vec<Offer>> {
    control
        .all_gather(
            &format!("peer memory {tag}"),
            &serde_json::to_vec(mine).expect("an offer serialises"),
        )?
        .iter()
        .enumerate()
        .map(|(r, b)| {
            serde_json::from_slice(b).map_err(|e| Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!("rank {r} sent an unreadable memory offer: {e}"),
            })
        })
        .collect()
}

/// What the steps of one exchange share: where it runs, and until when it waits for peers.
struct Exchange<'a> {
    control: &'a ControlPlane,
    ordinal: usize,
    dev_ctx: &'a Arc<CudaContext>,
    ctx: &'a OpCtx,
    deadline: Instant,
}

impl Exchange<'_> {
    /// The views of the ranks in other processes than `pid`: this rank's allocation at `base`
    /// exported and handed to each of them on `listener` (a thread), while each of theirs is
    /// fetched from its socket, imported and mapped into `views`.
    fn map_other_processes(
        &self,
        listener: &UnixListener,
        base: u64,
        all: &[Offer],
        pid: u32,
        views: &mut [Option<PeerView>],
    ) -> Result<()> {
        let ctx = self.ctx;
        let fd = export(base, ctx)?;
        let remote: Vec<usize> = (0..all.len()).filter(|&p| all[p].pid != pid).collect();
        listener
            .set_nonblocking(true)
            .map_err(io_err(ctx, "making the socket non-blocking".into()))?;
        std::thread::scope(|s| -> Result<()> {
            // Hand our descriptor to each remote peer that asks.
            let server = s.spawn(|| self.serve_descriptor(listener, fd.as_fd(), remote.len()));
            for &p in &remote {
                let m = self.fetch_and_map(p, &all[p])?;
                views[p] = Some(PeerView::Mapped(m, all[p].ptr - all[p].base));
            }
            server.join().expect("descriptor server thread")
        })
    }

    /// Accept `serve` connections on the non-blocking `listener` and send `fd` on each, waiting
    /// (up to 5 s) for the peer's acknowledgement; a timeout once the deadline passes.
    fn serve_descriptor(
        &self,
        listener: &UnixListener,
        fd: BorrowedFd<'_>,
        serve: usize,
    ) -> Result<()> {
        let ctx = self.ctx;
        let mut served = 0;
        while served < serve {
            match listener.accept() {
                Ok((conn, _)) => {
                    conn.set_nonblocking(false).ok();
                    send_fd(&conn, fd)
                        .map_err(io_err(ctx, "sending a memory descriptor".into()))?;
                    let mut ack = [0u8];
                    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    let _ = (&conn).read(&mut ack);
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > self.deadline {
                        return Err(Error::Timeout {
                            ctx: ctx.clone(),
                            waited: self.control.timeout(),
                            detail: format!(
                                "only {served} of {serve} peers fetched this rank's memory descriptor"
                            ),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(io_err(ctx, "accepting a peer".into())(e)),
            }
        }
        Ok(())
    }

    /// Rank `p`'s descriptor, fetched from its socket (acknowledged), imported and mapped with
    /// read-write access for this rank's device.
    fn fetch_and_map(&self, p: usize, offer: &Offer) -> Result<Mapping> {
        let ctx = self.ctx;
        let addr = SocketAddr::from_abstract_name(offer.socket.as_bytes())
            .map_err(io_err(ctx, format!("naming rank {p}'s socket")))?;
        let conn = self.connect(p, &addr)?;
        conn.set_read_timeout(Some(self.control.timeout())).ok();
        let pfd = recv_fd(&conn).map_err(io_err(
            ctx,
            format!("receiving rank {p}'s memory descriptor"),
        ))?;
        let _ = (&conn).write_all(b"A");
        import(&pfd, offer.size, self.ordinal, self.dev_ctx, ctx)
    }

    /// A connection to rank `p`'s socket at `addr`, retried every millisecond until the
    /// deadline passes.
    fn connect(&self, p: usize, addr: &SocketAddr) -> Result<UnixStream> {
        loop {
            match UnixStream::connect_addr(addr) {
                Ok(c) => return Ok(c),
                Err(_) if Instant::now() < self.deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => {
                    return Err(io_err(
                        self.ctx,
                        format!("connecting to rank {p} for its memory"),
                    )(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// A pipe's write end crosses a socket pair; what is written through the received
    /// descriptor comes out of the read end, and the read end sees the end of the stream once
    /// the received descriptor closes (so it is the pipe's write end, not a copy of another
    /// file). The received descriptor is close-on-exec.
    #[test]
    fn a_descriptor_crosses_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut read_end, write_end) = std::io::pipe().unwrap();
        send_fd(&a, write_end.as_fd()).unwrap();
        let received = recv_fd(&b).unwrap();
        assert_ne!(received.as_raw_fd(), write_end.as_raw_fd());
        let flags = rustix::io::fcntl_getfd(&received).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC), "{flags:?}");
        drop(write_end);
        let words: Vec<u8> = (0..64).map(|_| rand::random::<u8>()).collect();
        let mut w = File::from(received);
        w.write_all(&words).unwrap();
        drop(w);
        let mut got = Vec::new();
        read_end.read_to_end(&mut got).unwrap();
        assert_eq!(got, words);
    }

    /// A byte without a descriptor, or a closed peer, is an error naming what was missing.
    #[test]
    fn a_message_without_a_descriptor_is_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"F").unwrap();
        let e = recv_fd(&b).unwrap_err();
        assert!(e.to_string().contains("no descriptor"), "{e}");
        drop(a);
        let e = recv_fd(&b).unwrap_err();
        assert!(e.to_string().contains("got 0"), "{e}");
    }
}
