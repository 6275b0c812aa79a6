//! A group: a typed set of ranks with its communicator, its symmetric pool, its policy and the
//! stream its work goes to. Collectives enter here ([`collective`] carries one call
//! through its steps); so do the group's memory (symmetric and plain tensors, the engine's own
//! memory wrapped in place) and the `prepare` step that makes captures safe.

mod collective;
mod hierarchy;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{BackendKind, Collective, Copy2d, Exec, GroupBackend, Impl, SymmLoc};
use crate::bootstrap::ControlPlane;
use crate::buffer::{Backing, Buffer};
use crate::context::CommShared;
use crate::dispatch::Why;
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{Arg, Error, Op, OpCtx, Result};
use crate::memory::MemRef;
use crate::policy::{GroupKind, Placement};
use crate::pool::SegmentHit;
use crate::stream::Stream;
use crate::symm_pool::{Growth, PoolStats, SymmPool};
use crate::tensor::{Layout, Tensor};
use crate::topology::GroupTopology;

/// What ran for one collective call, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispatched {
    /// The implementation that ran.
    pub imp: Impl,
    /// A plain input was copied into a window first.
    pub staged_input: bool,
    /// The result went through a window and was copied to a plain output.
    pub staged_output: bool,
    /// Why this implementation (put into words by [`Dispatched::reason`]).
    pub why: Why,
    pub(crate) backend: BackendKind,
    /// What [`Why`] cannot hold: the reason recorded when NCCL refused a cross-host group's
    /// windows, say.
    pub(crate) detail: Option<Arc<str>>,
}

impl Dispatched {
    /// The implementation's name on this backend (`nccl_symm`, `oneshot`, `host`, ...).
    pub fn name(&self) -> String {
        self.imp.name(self.backend)
    }

    /// Why this implementation, in words.
    pub fn reason(&self) -> String {
        match &self.detail {
            Some(d) => format!("{} ({d})", self.why),
            None => self.why.to_string(),
        }
    }
}

/// The scratch a group's collectives stage through, kept from call to call: a window for each
/// side (a plain input copied in, a result copied out) and one plain buffer (along-dimension
/// reordering into memory no window needs). Each is a [`Buffer`], so a captured graph that
/// used one keeps it, and its pool slot, after the group has grown past it.
#[derive(Default)]
pub(crate) struct Staging {
    pub(crate) window_in: Option<Arc<Buffer>>,
    pub(crate) window_out: Option<Arc<Buffer>>,
    pub(crate) plain: Option<Arc<Buffer>>,
}

pub(crate) struct GroupShared {
    pub(crate) comm: Arc<CommShared>,
    pub(crate) kind: GroupKind,
    pub(crate) color: usize,
    pub(crate) label: String,
    pub(crate) backend: Arc<dyn GroupBackend>,
    pub(crate) control: Arc<ControlPlane>,
    pub(crate) pool: Arc<SymmPool>,
    /// The group's NVLink domains (hosts).
    pub(crate) topology: Arc<GroupTopology>,
    /// The sub-groups of the hierarchical all-reduce, once built.
    pub(crate) hierarchy: Mutex<Option<Arc<hierarchy::Hierarchy>>>,
    staging: Mutex<Staging>,
    splits: AtomicU64,
}

impl GroupShared {
    pub(crate) fn new(
        comm: Arc<CommShared>,
        kind: GroupKind,
        color: usize,
        label: String,
        backend: Arc<dyn GroupBackend>,
        control: Arc<ControlPlane>,
        topology: Arc<GroupTopology>,
    ) -> Self {
        let pool = Arc::new(SymmPool::new(
            label.clone(),
            backend.clone(),
            control.clone(),
            comm.config.pool,
            comm.config.check,
        ));
        GroupShared {
            comm,
            kind,
            color,
            label,
            backend,
            control,
            pool,
            topology,
            hierarchy: Mutex::new(None),
            staging: Mutex::new(Staging::default()),
            splits: AtomicU64::new(0),
        }
    }
}

/// A group of ranks on this rank: collectives, allocation, its symmetric pool; its work goes
/// to one stream ([`Group::on`] binds another). Cloning is cheap and shares the group.
#[derive(Clone)]
pub struct Group {
    inner: Arc<GroupShared>,
    stream: Stream,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Group({}, rank {}/{}, {:?})",
            self.inner.label,
            self.rank(),
            self.size(),
            self.stream
        )
    }
}

/// An allocator handle bound to a group and a placement: SGLang's
/// `use_symmetric_memory(group, disabled)` (its PR 8934). Plain memory when the feature is off, the scope
/// is disabled, the group has one rank, or the policy reserves symmetric memory for another
/// group.
///
/// A scope borrows its group, so it cannot be used once the group is gone:
///
/// ```compile_fail
/// # fn f(comm: &symmcomm::Communicator) -> symmcomm::Result<()> {
/// use symmcomm::{DType, GroupKind};
/// let scope = {
///     let tp = comm.split(GroupKind::Tp, 0)?;
///     tp.scope(false)
/// }; // error[E0597]: `tp` does not live long enough
/// let _x = scope.alloc(DType::F32, &[4])?;
/// # Ok(()) }
/// ```
///
/// while the same code with the group alive compiles:
///
/// ```no_run
/// # fn f(comm: &symmcomm::Communicator) -> symmcomm::Result<()> {
/// use symmcomm::{DType, GroupKind};
/// let tp = comm.split(GroupKind::Tp, 0)?;
/// let scope = tp.scope(false);
/// let _x = scope.alloc(DType::F32, &[4])?;
/// # Ok(()) }
/// ```
///
/// Tensors, groups and graphs hold what they use (the pool's segments, the communicator), so
/// none of them can outlive their memory; a tensor used with another communicator (one made
/// after its own was dropped, say) is refused with [`crate::Error::ForeignBuffer`].
#[derive(Debug)]
pub struct SymmScope<'g> {
    group: &'g Group,
    placement: Placement,
}

impl SymmScope<'_> {
    /// Where this scope's allocations go.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// A tensor of `shape`, uninitialised.
    pub fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        if self.placement.is_symmetric() {
            self.group.alloc_symmetric(dtype, shape)
        } else {
            self.group.alloc_plain(dtype, shape)
        }
    }
}

impl Group {
    pub(crate) fn new(shared: GroupShared) -> Self {
        Group {
            inner: Arc::new(shared),
            stream: Stream::own(),
        }
    }

    /// Rank within the group.
    pub fn rank(&self) -> usize {
        self.inner.backend.rank()
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.inner.backend.size()
    }

    /// The group's kind.
    pub fn kind(&self) -> GroupKind {
        self.inner.kind
    }

    /// The group's label (`tp#0`, `world`), as errors and traces name it.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// The split colour this group was made with.
    pub fn color(&self) -> usize {
        self.inner.color
    }

    /// Global ranks of the members, in group order.
    pub fn members(&self) -> &[usize] {
        self.inner.control.members()
    }

    /// The backend's description of this group's communicator.
    pub fn describe(&self) -> String {
        self.inner.backend.describe()
    }

    /// The group's NVLink domains: one per host its ranks sit on. A group that spans several
    /// runs NCCL only (our kernels need one domain), and the hierarchical all-reduce when
    /// asked for ([`Impl::Hierarchical`]).
    pub fn topology(&self) -> &GroupTopology {
        &self.inner.topology
    }

    /// Host-side exchanges among the group's ranks.
    pub fn control(&self) -> &ControlPlane {
        &self.inner.control
    }

    /// The context an error of `op` on `bytes` in this group names (rank, group, size).
    pub fn ctx(&self, op: Op, bytes: usize) -> OpCtx {
        OpCtx {
            op,
            group: self.inner.label.clone(),
            rank: self.rank(),
            world: self.size(),
            bytes,
        }
    }

    /// Whether `other` is this very group (not merely one with the same members), whatever
    /// stream each is bound to.
    pub fn same_group(&self, other: &Group) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    // ---- streams --------------------------------------------------------------------------

    /// This group with its work enqueued on `stream` (the engine's stream, say): the same
    /// group, pool and communicators. Checked here: the stream must belong to the
    /// communicator's device.
    ///
    /// Inside the caller's own capture of that stream (`cuStreamBeginCapture`, any mode),
    /// collectives use the graph row of the dispatch table and add nothing a capture cannot
    /// hold; what would allocate, register or compile is an error naming the operation, so
    /// call [`Group::prepare`] before capturing.
    pub fn on(&self, stream: &Stream) -> Result<Group> {
        self.device()
            .check_stream(stream.sel, &self.ctx(Op::Capture, 0))?;
        Ok(Group {
            inner: self.inner.clone(),
            stream: stream.clone(),
        })
    }

    /// The stream this group's work goes to.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Whether the group's stream is being captured now (by symmcomm or by the engine).
    pub fn capturing(&self) -> Result<bool> {
        Ok(self.exec(&self.ctx(Op::Capture, 0))?.capturing)
    }

    /// The group's stream as a call sees it now.
    pub(crate) fn exec(&self, ctx: &OpCtx) -> Result<Exec> {
        self.inner.comm.abort.check(ctx)?;
        self.device().exec(self.stream.sel, ctx)
    }

    // ---- what other modules of the library reach --------------------------------------------

    /// This rank's device (for operations of other modules: the DCP combine).
    pub(crate) fn device(&self) -> &Arc<dyn crate::backend::RankBackend> {
        &self.inner.comm.device
    }

    /// This group's backend.
    pub(crate) fn backend(&self) -> &Arc<dyn GroupBackend> {
        &self.inner.backend
    }

    pub(crate) fn comm(&self) -> &Arc<CommShared> {
        &self.inner.comm
    }

    pub(crate) fn pool(&self) -> &Arc<SymmPool> {
        &self.inner.pool
    }

    pub(crate) fn staging(&self) -> MutexGuard<'_, Staging> {
        self.inner.staging.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep `buffers` alive for a graph being captured on `exec`'s stream (no-op otherwise).
    pub(crate) fn keep_alive(
        &self,
        exec: Exec,
        buffers: &[&Arc<Buffer>],
        ctx: &OpCtx,
    ) -> Result<()> {
        self.inner.comm.keep_alive(exec, buffers, ctx)
    }

    /// Where `t` lies in this group's pool, if it does: a slot of it, or the engine's memory
    /// inside one of its windows.
    pub(crate) fn symm_location(&self, t: &Tensor) -> Option<SymmLoc> {
        if t.buf.is_foreign() {
            let hit = self.inner.pool.lookup_range(t.addr(), t.bytes())?;
            return Some(SymmLoc {
                segment: hit.segment,
                offset: hit.offset,
            });
        }
        let (pool, segment, offset) = t.buf.symm_location(t.byte_offset())?;
        Arc::ptr_eq(pool, &self.inner.pool).then_some(SymmLoc { segment, offset })
    }

    /// `Err(ForeignBuffer)` unless `t` was made by this communicator.
    pub(crate) fn check_owned(&self, t: &Tensor, arg: Arg, ctx: &OpCtx) -> Result<()> {
        if t.buf.comm_id != self.inner.comm.id {
            return Err(Error::ForeignBuffer {
                ctx: ctx.clone(),
                arg,
                owner: t.buf.to_string(),
            });
        }
        Ok(())
    }

    // ---- groups -------------------------------------------------------------------------

    /// Split into groups of `kind`: ranks passing the same `color` form one group, ordered by
    /// their rank in this group. Collective over this group. The new group's work goes to the
    /// same stream as this one's.
    pub fn split(&self, kind: GroupKind, color: usize) -> Result<Group> {
        self.split_labeled(kind, color, format!("{}#{color}", kind.name()))
    }

    /// [`Group::split`] into a group labelled `label`.
    pub(crate) fn split_labeled(
        &self,
        kind: GroupKind,
        color: usize,
        label: String,
    ) -> Result<Group> {
        let ctx = self.ctx(Op::Split, 0);
        if self.exec(&ctx)?.capturing {
            return Err(Error::DuringCapture {
                ctx,
                action: "making a group (it creates communicators and registers memory)".into(),
            });
        }
        let seq = self.inner.splits.fetch_add(1, Ordering::Relaxed);
        let members = self.members_with_color(color, &ctx)?;
        let topology = Arc::new(
            self.inner.comm.topology.group(
                &members,
                members
                    .iter()
                    .position(|&m| m == self.inner.comm.boot.rank)
                    .expect("a rank is a member of the group of its own colour"),
            ),
        );
        let control = Arc::new(
            self.inner
                .control
                .subgroup(&format!("{label}.{seq}"), members),
        );
        let backend = self
            .inner
            .backend
            .split(color, self.rank(), control.clone(), &topology)?;
        Ok(Group {
            inner: Arc::new(GroupShared::new(
                self.inner.comm.clone(),
                kind,
                color,
                label,
                backend,
                control,
                topology,
            )),
            stream: self.stream.clone(),
        })
    }

    /// Global ranks of the members that passed `color` (collective).
    fn members_with_color(&self, color: usize, ctx: &OpCtx) -> Result<Vec<usize>> {
        let all = self
            .inner
            .control
            .all_gather("split colours", &(color as u64).to_le_bytes())?;
        let mut members = Vec::new();
        for (i, c) in all.iter().enumerate() {
            let c = <[u8; 8]>::try_from(c.as_slice()).map_err(|_| Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!("rank {i} sent a malformed split colour"),
            })?;
            if u64::from_le_bytes(c) == color as u64 {
                members.push(self.inner.control.members()[i]);
            }
        }
        Ok(members)
    }

    // ---- memory ---------------------------------------------------------------------------

    /// Where a scope opened on this group puts its buffers (the policy: with DCP only the DCP group).
    pub fn placement(&self, scope_disabled: bool) -> Placement {
        self.inner
            .comm
            .config
            .policy
            .placement(self.inner.kind, self.size(), scope_disabled)
    }

    /// An allocator that follows the policy: SGLang's `use_symmetric_memory(group, disabled)`.
    pub fn scope(&self, disabled: bool) -> SymmScope<'_> {
        SymmScope {
            group: self,
            placement: self.placement(disabled),
        }
    }

    /// A tensor in this group's symmetric pool (collective when the pool must grow: every rank
    /// must make the same requests in the same order). Inside a capture it may only take a
    /// slot of the segments already registered.
    pub fn alloc_symmetric(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let layout = Layout::contiguous(shape);
        let bytes = layout.numel() * dtype.size();
        let exec = self.exec(&self.ctx(Op::PoolAlloc, bytes))?;
        let slot = self
            .inner
            .pool
            .alloc(bytes, Growth::unless_capturing(exec.capturing))?;
        Ok(self.tensor_of(Backing::Symmetric(slot), bytes, dtype, layout))
    }

    /// Grow this group's pool (collectively, every rank with the same `bytes`) so that one
    /// allocation of up to `bytes` fits without growing it: for allocators that may not run a
    /// collective (a torch `MemPool`'s callback), which then use
    /// [`Group::alloc_symmetric_reserved`].
    pub fn reserve_symmetric(&self, bytes: usize) -> Result<()> {
        let ctx = self.ctx(Op::PoolAlloc, bytes);
        if self.exec(&ctx)?.capturing {
            return Err(Error::DuringCapture {
                ctx,
                action: format!("reserving {bytes} B of symmetric memory"),
            });
        }
        self.inner.pool.reserve(bytes)
    }

    /// A tensor in this group's symmetric pool that never grows it: a slot of the segments
    /// registered already ([`Group::reserve_symmetric`]), or
    /// [`crate::Error::CapacityExceeded`]. Not collective; the same sequence of calls on every
    /// rank still gives every rank the same offsets.
    pub fn alloc_symmetric_reserved(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let layout = Layout::contiguous(shape);
        let bytes = layout.numel() * dtype.size();
        let slot = self.inner.pool.alloc(bytes, Growth::Never)?;
        Ok(self.tensor_of(Backing::Symmetric(slot), bytes, dtype, layout))
    }

    /// A tensor in plain memory.
    pub fn alloc_plain(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let layout = Layout::contiguous(shape);
        let bytes = layout.numel() * dtype.size();
        let ctx = self.ctx(Op::PoolAlloc, bytes);
        if self.exec(&ctx)?.capturing {
            return Err(Error::DuringCapture {
                ctx,
                action: "allocating plain memory".into(),
            });
        }
        let mem = self.device().alloc_plain(bytes.max(1))?;
        Ok(self.tensor_of(Backing::Plain(mem), bytes, dtype, layout))
    }

    /// The engine's memory as a tensor, in place: `shape` row-major from `addr` (a device
    /// pointer on CUDA, a host pointer on the host backend). Checked: on CUDA the memory lies
    /// on this communicator's device and `shape` fits in its allocation; the address is a
    /// multiple of the element size. Memory inside one of a group's windows (a pointer into a
    /// tensor of [`Group::alloc_symmetric`], say) is used there zero-copy; other memory is
    /// staged through windows or sent down NCCL's regular path, as the dispatch table says,
    /// and [`Dispatched`] says which.
    ///
    /// # Safety
    ///
    /// `addr` holds `shape`'s elements of `dtype` and stays valid while work enqueued with the
    /// tensor can run, including every replay of a graph captured with it.
    ///
    /// ```
    /// use symmcomm::{BackendChoice, CommConfig, DType, ReduceOp, run_rank_threads};
    /// let config = CommConfig { backend: BackendChoice::Host, ..CommConfig::default() };
    /// for r in run_rank_threads(2, &config, |comm| {
    ///     let g = comm.world();
    ///     let mut mine = vec![1.0f32 + g.rank() as f32; 3]; // the engine's own memory
    ///     // SAFETY: `mine` outlives the call, which the host backend runs at once.
    ///     let t = unsafe { g.wrap_raw(mine.as_mut_ptr() as u64, DType::F32, &[3])? };
    ///     g.all_reduce(&t, &t, ReduceOp::Sum)?;
    ///     Ok(mine)
    /// }) {
    ///     assert_eq!(r.unwrap(), vec![3.0; 3]);
    /// }
    /// ```
    pub unsafe fn wrap_raw(&self, addr: u64, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let strides = Layout::contiguous(shape).strides().to_vec();
        // SAFETY: the caller's contract, passed on.
        unsafe { self.wrap_raw_strided(addr, dtype, shape, &strides) }
    }

    /// [`Group::wrap_raw`] for a strided view (strides in elements). Collectives need
    /// contiguous tensors and name the shape and strides of one that is not.
    ///
    /// # Safety
    ///
    /// As for [`Group::wrap_raw`], for every element the strides reach.
    pub unsafe fn wrap_raw_strided(
        &self,
        addr: u64,
        dtype: DType,
        shape: &[usize],
        strides: &[usize],
    ) -> Result<Tensor> {
        let ctx = self.ctx(Op::Copy, 0);
        let layout = Layout::strided(shape, strides).ok_or_else(|| Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!("{} strides for a {}-d shape", strides.len(), shape.len()),
        })?;
        let bytes = layout.end() * dtype.size();
        let ctx = OpCtx { bytes, ..ctx };
        if !addr.is_multiple_of(dtype.size() as u64) {
            return Err(Error::InvalidArgument {
                ctx,
                detail: format!(
                    "address {addr:#x} is not a multiple of {dtype}'s {} bytes",
                    dtype.size()
                ),
            });
        }
        // SAFETY: the caller's contract covers `bytes` from `addr`.
        let mem = unsafe { self.device().foreign(addr, bytes, &ctx)? };
        Ok(self.tensor_of(Backing::Foreign(mem), bytes, dtype, layout))
    }

    fn tensor_of(&self, backing: Backing, bytes: usize, dtype: DType, layout: Layout) -> Tensor {
        Tensor {
            buf: Arc::new(Buffer {
                backing,
                comm_id: self.inner.comm.id,
                backend: self.device().kind(),
                bytes,
            }),
            dtype,
            layout,
        }
    }

    /// Make the collectives of this group up to `bytes` (nccl-tests bytes: the larger buffer)
    /// safe to capture: load every kernel module, and grow the pool and the staging scratch
    /// they need, so that nothing compiles, allocates or registers memory inside a capture.
    /// Collective when the pool grows (every rank calls it with the same `bytes`). Call it
    /// before capturing, once per largest size.
    ///
    /// ```
    /// use symmcomm::{BackendChoice, CommConfig, DType, ReduceOp, run_rank_threads};
    /// let config = CommConfig { backend: BackendChoice::Host, ..CommConfig::default() };
    /// for r in run_rank_threads(2, &config, |comm| {
    ///     let tp = comm.world();
    ///     tp.prepare(64 * 4096 * 2)?; // up to batch 64 × hidden 4096 in bf16
    ///     let x = tp.alloc_symmetric(DType::BF16, &[64, 4096])?;
    ///     let g = comm.capture(|| tp.all_reduce(&x, &x, ReduceOp::Sum))?.0;
    ///     g.replay()
    /// }) {
    ///     r.unwrap();
    /// }
    /// ```
    pub fn prepare(&self, bytes: usize) -> Result<()> {
        let ctx = self.ctx(Op::PoolAlloc, bytes);
        let exec = self.exec(&ctx)?;
        if exec.capturing {
            return Err(Error::DuringCapture {
                ctx,
                action: "preparing (it loads kernels and grows the pool)".into(),
            });
        }
        self.device().prepare(&ctx)?;
        if self.placement(false).is_symmetric() {
            for side in [collective::Side::Input, collective::Side::Output] {
                self.staging_window(side, bytes, exec, &ctx)?;
            }
        }
        self.staging_plain(bytes, exec, &ctx).map(|_| ())
    }

    /// Sizes of this group's pool.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.stats()
    }

    /// Whether a raw address of this rank lies in this group's windows, and where.
    pub fn lookup(&self, addr: u64) -> Option<SegmentHit> {
        self.inner.pool.lookup(addr)
    }

    /// Compare pool requests across ranks now (collective).
    pub fn verify_pool(&self) -> Result<()> {
        self.inner.pool.verify()
    }

    pub(crate) fn contiguous_ref(&self, t: &Tensor, op: Op) -> Result<MemRef> {
        let ctx = self.ctx(op, t.bytes());
        self.check_owned(t, Arg::Input, &ctx)?;
        if !t.is_contiguous() {
            return Err(Error::NotContiguous {
                ctx,
                arg: Arg::Input,
                shape: t.shape().to_vec(),
                strides: t.layout().strides().to_vec(),
            });
        }
        Ok(t.buf.mem_ref(t.byte_offset()))
    }

    /// Copy host values into a contiguous tensor (waits for the work queued on the group's
    /// stream first).
    pub fn upload<T: Element>(&self, t: &Tensor, data: &[T]) -> Result<()> {
        if T::DTYPE != t.dtype || data.len() != t.numel() {
            return Err(Error::InvalidArgument {
                ctx: self.ctx(Op::Copy, t.bytes()),
                detail: format!(
                    "upload of {} {} values into a {} tensor of {} elements",
                    data.len(),
                    T::DTYPE,
                    t.dtype,
                    t.numel()
                ),
            });
        }
        self.upload_bytes(t, bytemuck::cast_slice(data))
    }

    /// Copy little-endian bytes into a contiguous tensor.
    pub fn upload_bytes(&self, t: &Tensor, bytes: &[u8]) -> Result<()> {
        let r = self.contiguous_ref(t, Op::Copy)?;
        if bytes.len() != t.bytes() {
            return Err(Error::InvalidArgument {
                ctx: self.ctx(Op::Copy, t.bytes()),
                detail: format!("{} bytes for a tensor of {} bytes", bytes.len(), t.bytes()),
            });
        }
        self.device().upload(self.stream.sel, &r, bytes)
    }

    /// Copy a contiguous tensor to host values (waits for the work queued on the group's
    /// stream first).
    pub fn download<T: Element>(&self, t: &Tensor) -> Result<Vec<T>> {
        if T::DTYPE != t.dtype {
            return Err(Error::InvalidArgument {
                ctx: self.ctx(Op::Copy, t.bytes()),
                detail: format!("download of a {} tensor as {}", t.dtype, T::DTYPE),
            });
        }
        let bytes = self.download_bytes(t)?;
        let mut out = vec![T::zeroed(); t.numel()];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes);
        Ok(out)
    }

    /// Copy a contiguous tensor to host bytes.
    pub fn download_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        let r = self.contiguous_ref(t, Op::Copy)?;
        let mut out = vec![0u8; t.bytes()];
        self.device().download(self.stream.sel, &r, &mut out)?;
        Ok(out)
    }

    /// Enqueue a copy of `src` into `dst`: both contiguous, of this communicator, with the same
    /// element type and number of elements (empty views copy nothing).
    pub fn copy(&self, src: &Tensor, dst: &Tensor) -> Result<()> {
        let ctx = self.ctx(Op::Copy, src.bytes().max(dst.bytes()));
        if src.dtype != dst.dtype || src.numel() != dst.numel() {
            return Err(Error::InvalidArgument {
                ctx,
                detail: format!(
                    "copy of {} {} elements into {} {} elements",
                    src.numel(),
                    src.dtype,
                    dst.numel(),
                    dst.dtype
                ),
            });
        }
        let s = self.contiguous_ref(src, Op::Copy)?;
        let d = self.contiguous_ref(dst, Op::Copy)?;
        if src.bytes() == 0 {
            return Ok(());
        }
        let exec = self.exec(&ctx)?;
        self.keep_alive(exec, &[&src.buf, &dst.buf], &ctx)?;
        self.device().copy_2d(
            exec.stream,
            &Copy2d {
                src: s,
                src_pitch: src.bytes(),
                dst: d,
                dst_pitch: dst.bytes(),
                row_bytes: src.bytes(),
                rows: 1,
            },
        )
    }

    /// Enqueue setting every element of the contiguous `t` to zero.
    pub fn zero(&self, t: &Tensor) -> Result<()> {
        let r = self.contiguous_ref(t, Op::Fill)?;
        if t.bytes() == 0 {
            return Ok(());
        }
        let ctx = self.ctx(Op::Fill, t.bytes());
        let exec = self.exec(&ctx)?;
        self.keep_alive(exec, &[&t.buf], &ctx)?;
        self.device().memset(exec.stream, &r, t.bytes(), 0)
    }

    /// Wait for the work queued on the group's stream, then for every rank of the group.
    pub fn barrier(&self) -> Result<()> {
        self.inner.comm.abort.check(&self.ctx(Op::Barrier, 0))?;
        crate::abort::on_failure(self.device().synchronize(self.stream.sel))?;
        self.inner.control.barrier("group barrier")
    }

    /// Wait for the work queued on the group's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.comm.abort.check(&self.ctx(Op::Barrier, 0))?;
        crate::abort::on_failure(self.device().synchronize(self.stream.sel))
    }

    // ---- collectives ------------------------------------------------------------------------

    /// Reduce `input` across ranks into `output` (same number of elements; in place allowed).
    ///
    /// ```
    /// use symmcomm::{BackendChoice, CommConfig, DType, ReduceOp, run_rank_threads};
    ///
    /// let config = CommConfig { backend: BackendChoice::Host, ..CommConfig::default() };
    /// let sums = run_rank_threads(2, &config, |comm| {
    ///     let world = comm.world();
    ///     let x = world.alloc_symmetric(DType::F32, &[2])?;
    ///     world.upload(&x, &[1.0f32 + world.rank() as f32, 10.0])?;
    ///     world.all_reduce(&x, &x, ReduceOp::Sum)?; // in place
    ///     world.download::<f32>(&x)
    /// });
    /// assert!(sums.into_iter().all(|s| s.unwrap() == vec![3.0, 20.0]));
    /// ```
    pub fn all_reduce(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<Dispatched> {
        self.collective(Collective::AllReduce(op), input, output, None, Impl::Auto)
    }

    /// Concatenate every rank's `input` in rank order into `output` (flat).
    pub fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<Dispatched> {
        self.collective(Collective::AllGather, input, output, None, Impl::Auto)
    }

    /// Concatenate along dimension `dim`: `output.shape[dim] = world * input.shape[dim]`.
    ///
    /// ```
    /// use symmcomm::{BackendChoice, CommConfig, DType, ReduceOp, run_rank_threads};
    /// let config = CommConfig { backend: BackendChoice::Host, ..CommConfig::default() };
    /// for r in run_rank_threads(2, &config, |comm| {
    ///     let g = comm.world();
    ///     let r = g.rank() as f32;
    ///     let x = g.alloc_symmetric(DType::F32, &[2, 1])?; // [tokens, heads of this rank]
    ///     g.upload(&x, &[r, 10.0 + r])?;
    ///     let all = g.alloc_symmetric(DType::F32, &[2, 2])?;
    ///     g.all_gather_dim(&x, &all, 1)?; // heads of every rank, in rank order
    ///     let back = g.alloc_symmetric(DType::F32, &[2, 1])?;
    ///     g.reduce_scatter_dim(&all, &back, ReduceOp::Sum, 1)?; // rank r's head, summed
    ///     Ok((g.download::<f32>(&all)?, g.download::<f32>(&back)?))
    /// }) {
    ///     let (all, back) = r.unwrap();
    ///     assert_eq!(all, vec![0.0, 1.0, 10.0, 11.0]);
    ///     assert!(back == vec![0.0, 20.0] || back == vec![2.0, 22.0]);
    /// }
    /// ```
    pub fn all_gather_dim(
        &self,
        input: &Tensor,
        output: &Tensor,
        dim: usize,
    ) -> Result<Dispatched> {
        self.collective(Collective::AllGather, input, output, Some(dim), Impl::Auto)
    }

    /// Reduce across ranks and keep piece `rank` of the flat result.
    pub fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &Tensor,
        op: ReduceOp,
    ) -> Result<Dispatched> {
        self.collective(
            Collective::ReduceScatter(op),
            input,
            output,
            None,
            Impl::Auto,
        )
    }

    /// Reduce across ranks and keep piece `rank` along dimension `dim`.
    pub fn reduce_scatter_dim(
        &self,
        input: &Tensor,
        output: &Tensor,
        op: ReduceOp,
        dim: usize,
    ) -> Result<Dispatched> {
        self.collective(
            Collective::ReduceScatter(op),
            input,
            output,
            Some(dim),
            Impl::Auto,
        )
    }

    /// Run one collective with an explicit implementation (`Impl::Auto` dispatches).
    /// `dim = None` is the flat operation.
    pub fn collective(
        &self,
        coll: Collective,
        input: &Tensor,
        output: &Tensor,
        dim: Option<usize>,
        imp: Impl,
    ) -> Result<Dispatched> {
        collective::run(
            self,
            &collective::Request {
                coll,
                input,
                output,
                dim,
                imp,
            },
        )
    }

    /// Whether `imp` can run `coll` on `dtype` with pieces of `piece` elements (all-reduce:
    /// the whole buffer) in this group, buffers in windows where it needs them; or why not.
    pub fn supports(
        &self,
        coll: Collective,
        dtype: DType,
        imp: Impl,
        piece: usize,
    ) -> std::result::Result<(), String> {
        if let Some(r) = coll.reduce()
            && !dtype.allows(r)
        {
            return Err(format!("{r} is not defined on {dtype}"));
        }
        if imp == Impl::Auto {
            // Auto always has the regular path to fall back on.
            return Ok(());
        }
        match self.unavailable(
            imp,
            &crate::backend::CallShape {
                coll,
                dtype,
                piece,
                align: 256,
            },
        ) {
            None => Ok(()),
            Some(why) => Err(why),
        }
    }

    /// Why `imp` cannot run calls of `shape` on this group, if it cannot: the group's NVLink
    /// domains first (our kernels need one; the hierarchical all-reduce several), then the
    /// backend.
    pub(crate) fn unavailable(
        &self,
        imp: Impl,
        shape: &crate::backend::CallShape,
    ) -> Option<String> {
        match imp {
            Impl::Kernel(_) => self
                .inner
                .topology
                .kernels_unavailable()
                .or_else(|| self.inner.backend.unavailable(imp, shape)),
            Impl::Hierarchical => hierarchy::unavailable(self, shape),
            _ => self.inner.backend.unavailable(imp, shape),
        }
    }
}
