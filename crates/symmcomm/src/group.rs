//! A group: a typed set of ranks with its communicator, its symmetric pool and its policy.
//! Collectives enter here: arguments are validated before anything is written, `auto` is
//! resolved by the dispatch table, plain buffers are staged into windows where that wins, and
//! along-dimension operations are reduced to flat ones plus strided copies.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::{Call, CallShape, Collective, Copy2d, GroupBackend, Impl, SymmLoc};
use crate::bootstrap::ControlPlane;
use crate::comm::CommShared;
use crate::dispatch;
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{Arg, Error, Op, OpCtx, Result};
use crate::memory::{Backing, Buffer, MemRef, Memory, SymmSlot};
use crate::policy::{GroupKind, Placement};
use crate::pool::SegmentHit;
use crate::symm_pool::{PoolStats, SymmPool};
use crate::tensor::{DimSplit, Layout, Tensor};

/// What ran for one collective call, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatched {
    /// The implementation that ran.
    pub imp: Impl,
    /// Its name on this backend (`nccl_symm`, `oneshot`, ...).
    pub name: String,
    /// A plain input was copied into a window first.
    pub staged_input: bool,
    /// The result went through a window and was copied to a plain output.
    pub staged_output: bool,
    /// Why this implementation.
    pub reason: String,
}

pub(crate) struct GroupShared {
    pub(crate) comm: Arc<CommShared>,
    pub(crate) kind: GroupKind,
    pub(crate) color: usize,
    pub(crate) label: String,
    pub(crate) backend: Arc<dyn GroupBackend>,
    pub(crate) control: Arc<ControlPlane>,
    pub(crate) pool: Arc<SymmPool>,
    plain_scratch: Mutex<Option<Arc<dyn Memory>>>,
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
    ) -> Self {
        let pool = Arc::new(SymmPool::new(
            label.clone(),
            backend.clone(),
            comm.device.clone(),
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
            plain_scratch: Mutex::new(None),
            splits: AtomicU64::new(0),
        }
    }
}

/// A group of ranks on this rank: collectives, allocation, its symmetric pool.
#[derive(Clone)]
pub struct Group {
    inner: Arc<GroupShared>,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Group({}, rank {}/{})",
            self.inner.label,
            self.rank(),
            self.size()
        )
    }
}

/// An allocator handle bound to a group and a placement: the seeds'
/// `use_symmetric_memory(group, disabled)`. Plain memory when the feature is off, the scope
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

/// The validated shape of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Elements per rank piece (all-reduce: the whole buffer).
    pub(crate) piece: usize,
    /// For along-dim calls that need reordering: the decomposition of the per-rank piece.
    pub(crate) reorder: Option<DimSplit>,
}

fn shape_with(shape: &[usize], dim: usize, len: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[dim] = len;
    s
}

/// Check a collective's arguments; nothing is written when this fails.
pub(crate) fn validate(
    coll: Collective,
    input: &Tensor,
    output: &Tensor,
    dim: Option<usize>,
    world: usize,
    rank: usize,
    ctx: &OpCtx,
) -> Result<Plan> {
    let ctx = || ctx.clone();
    if input.dtype != output.dtype {
        return Err(Error::DTypeMismatch {
            ctx: ctx(),
            input: input.dtype,
            output: output.dtype,
        });
    }
    if let Some(r) = coll.reduce()
        && !input.dtype.allows(r)
    {
        return Err(Error::OpNotAllowed {
            ctx: ctx(),
            reduce: r,
            dtype: input.dtype,
        });
    }
    for (arg, t) in [(Arg::Input, input), (Arg::Output, output)] {
        if !t.is_contiguous() {
            return Err(Error::NotContiguous {
                ctx: ctx(),
                arg,
                shape: t.shape().to_vec(),
                strides: t.layout().strides().to_vec(),
            });
        }
    }
    let size_error = |expected: Vec<usize>, got: &Tensor| {
        let needed: usize = expected.iter().product();
        if got.numel() < needed {
            Error::OutputTooSmall {
                ctx: ctx(),
                needed,
                got: got.numel(),
            }
        } else {
            Error::ShapeMismatch {
                ctx: ctx(),
                expected,
                got: got.shape().to_vec(),
            }
        }
    };
    let (piece, reorder) = match (coll, dim) {
        (Collective::AllReduce(_), _) => {
            if output.numel() != input.numel() {
                return Err(size_error(vec![input.numel()], output));
            }
            (input.numel(), None)
        }
        (Collective::AllGather, None) => {
            if output.numel() != input.numel() * world {
                return Err(size_error(vec![input.numel() * world], output));
            }
            (input.numel(), None)
        }
        (Collective::ReduceScatter(_), None) => {
            if !input.numel().is_multiple_of(world) {
                return Err(Error::NotDivisible {
                    ctx: ctx(),
                    arg: Arg::Input,
                    len: input.numel(),
                    world,
                });
            }
            if output.numel() != input.numel() / world {
                return Err(size_error(vec![input.numel() / world], output));
            }
            (input.numel() / world, None)
        }
        (Collective::AllGather, Some(d)) => {
            if d >= input.shape().len() {
                return Err(Error::BadDim {
                    ctx: ctx(),
                    dim: d,
                    ndim: input.shape().len(),
                });
            }
            let want = shape_with(input.shape(), d, input.shape()[d] * world);
            if output.shape() != want.as_slice() {
                return Err(size_error(want, output));
            }
            let split = DimSplit::of(input.shape(), d).expect("dim checked");
            (input.numel(), (!split.is_flat()).then_some(split))
        }
        (Collective::ReduceScatter(_), Some(d)) => {
            if d >= input.shape().len() {
                return Err(Error::BadDim {
                    ctx: ctx(),
                    dim: d,
                    ndim: input.shape().len(),
                });
            }
            if !input.shape()[d].is_multiple_of(world) {
                return Err(Error::NotDivisible {
                    ctx: ctx(),
                    arg: Arg::Input,
                    len: input.shape()[d],
                    world,
                });
            }
            let want = shape_with(input.shape(), d, input.shape()[d] / world);
            if output.shape() != want.as_slice() {
                return Err(size_error(want, output));
            }
            let split = DimSplit::of(&want, d).expect("dim checked");
            (output.numel(), (!split.is_flat()).then_some(split))
        }
    };
    // Overlap: distinct buffers never overlap; within one buffer only NCCL's in-place layouts.
    if Arc::ptr_eq(&input.buf, &output.buf) {
        let (ib, ob) = (input.byte_offset(), output.byte_offset());
        let (il, ol) = (input.bytes(), output.bytes());
        if ib < ob + ol && ob < ib + il {
            let exact = reorder.is_none()
                && match coll {
                    Collective::AllReduce(_) => ib == ob,
                    Collective::AllGather => ib == ob + rank * il,
                    Collective::ReduceScatter(_) => ob == ib + rank * ol,
                };
            if !exact {
                return Err(Error::Overlap { ctx: ctx() });
            }
        }
    }
    Ok(Plan { piece, reorder })
}

/// Byte copies that turn a flat gather's `[world, outer, piece, inner]` into the along-dim
/// `[outer, world * piece, inner]` (or the reverse, for reduce-scatter's input).
fn reorder_copies(
    split: DimSplit,
    world: usize,
    elem: usize,
    flat: &MemRef,
    big: &MemRef,
    to_big: bool,
) -> Vec<Copy2d> {
    let row = split.piece * split.inner * elem;
    let piece_bytes = split.piece_elems() * elem;
    (0..world)
        .map(|r| {
            let flat_r = MemRef {
                mem: flat.mem.clone(),
                offset: flat.offset + r * piece_bytes,
            };
            let big_r = MemRef {
                mem: big.mem.clone(),
                offset: big.offset + r * row,
            };
            if to_big {
                Copy2d {
                    src: flat_r,
                    src_pitch: row,
                    dst: big_r,
                    dst_pitch: world * row,
                    row_bytes: row,
                    rows: split.outer,
                }
            } else {
                Copy2d {
                    src: big_r,
                    src_pitch: world * row,
                    dst: flat_r,
                    dst_pitch: row,
                    row_bytes: row,
                    rows: split.outer,
                }
            }
        })
        .collect()
}

/// Scratch memory held for one call.
enum Scratch {
    Symm(SymmSlot),
    Plain(Arc<dyn Memory>),
}

impl Scratch {
    fn mem_ref(&self) -> MemRef {
        match self {
            Scratch::Symm(s) => MemRef {
                mem: s.segment.clone(),
                offset: s.slot.offset,
            },
            Scratch::Plain(m) => MemRef {
                mem: m.clone(),
                offset: 0,
            },
        }
    }

    fn loc(&self) -> Option<SymmLoc> {
        match self {
            Scratch::Symm(s) => Some(SymmLoc {
                segment: s.slot.segment,
                offset: s.slot.offset,
            }),
            Scratch::Plain(_) => None,
        }
    }

    fn memory(&self) -> Arc<dyn Memory> {
        match self {
            Scratch::Symm(s) => s.segment.clone(),
            Scratch::Plain(m) => m.clone(),
        }
    }
}

impl Group {
    pub(crate) fn new(shared: GroupShared) -> Self {
        Group {
            inner: Arc::new(shared),
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

    /// This rank's device (for operations of other modules: the DCP combine).
    pub(crate) fn device(&self) -> &Arc<dyn crate::backend::RankBackend> {
        &self.inner.comm.device
    }

    /// This group's backend.
    pub(crate) fn backend(&self) -> &Arc<dyn GroupBackend> {
        &self.inner.backend
    }

    /// Keep `buffers` alive for a graph being captured (no-op otherwise).
    pub(crate) fn keep_alive(&self, buffers: &[&Arc<Buffer>]) {
        self.inner.comm.keep_alive(buffers, &[]);
    }

    /// Where `t` lies in this group's pool, if it does.
    pub(crate) fn symm_location(&self, t: &Tensor) -> Option<SymmLoc> {
        self.symm_loc(t)
    }

    // ---- groups -------------------------------------------------------------------------

    /// Split into groups of `kind`: ranks passing the same `color` form one group, ordered by
    /// their rank in this group. Collective over this group.
    pub fn split(&self, kind: GroupKind, color: usize) -> Result<Group> {
        if self.inner.comm.device.capturing() {
            return Err(Error::DuringCapture {
                ctx: self.ctx(Op::Split, 0),
                action: "making a group (it creates communicators and registers memory)".into(),
            });
        }
        let seq = self.inner.splits.fetch_add(1, Ordering::Relaxed);
        let all = self
            .inner
            .control
            .all_gather("split colours", &(color as u64).to_le_bytes())?;
        let mut members = Vec::new();
        for (i, c) in all.iter().enumerate() {
            let c = <[u8; 8]>::try_from(c.as_slice()).map_err(|_| Error::InvalidArgument {
                ctx: self.ctx(Op::Split, 0),
                detail: format!("rank {i} sent a malformed split colour"),
            })?;
            if u64::from_le_bytes(c) == color as u64 {
                members.push(self.inner.control.members()[i]);
            }
        }
        let label = format!("{}#{color}", kind.name());
        let control = Arc::new(
            self.inner
                .control
                .subgroup(&format!("{label}.{seq}"), members),
        );
        let backend = self
            .inner
            .backend
            .split(color, self.rank(), control.clone())?;
        Ok(Group::new(GroupShared::new(
            self.inner.comm.clone(),
            kind,
            color,
            label,
            backend,
            control,
        )))
    }

    // ---- memory ---------------------------------------------------------------------------

    /// Where a scope opened on this group puts its buffers (seed 003's policy).
    pub fn placement(&self, scope_disabled: bool) -> Placement {
        self.inner
            .comm
            .config
            .policy
            .placement(self.inner.kind, self.size(), scope_disabled)
    }

    /// An allocator that follows the policy: the seeds' `use_symmetric_memory(group, disabled)`.
    pub fn scope(&self, disabled: bool) -> SymmScope<'_> {
        SymmScope {
            group: self,
            placement: self.placement(disabled),
        }
    }

    /// A tensor in this group's symmetric pool (collective when the pool must grow: every rank
    /// must make the same requests in the same order).
    pub fn alloc_symmetric(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let layout = Layout::contiguous(shape);
        let bytes = layout.numel() * dtype.size();
        let slot = self.inner.pool.alloc(bytes)?;
        Ok(Tensor {
            buf: Arc::new(Buffer {
                backing: Backing::Symmetric(slot),
                comm_id: self.inner.comm.id,
                bytes,
            }),
            dtype,
            layout,
        })
    }

    /// A tensor in plain memory.
    pub fn alloc_plain(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let layout = Layout::contiguous(shape);
        let bytes = layout.numel() * dtype.size();
        if self.inner.comm.device.capturing() {
            return Err(Error::DuringCapture {
                ctx: self.ctx(Op::PoolAlloc, bytes),
                action: "allocating plain memory".into(),
            });
        }
        let mem = self.inner.comm.device.alloc_plain(bytes.max(1))?;
        Ok(Tensor {
            buf: Arc::new(Buffer {
                backing: Backing::Plain(mem),
                comm_id: self.inner.comm.id,
                bytes,
            }),
            dtype,
            layout,
        })
    }

    /// Make sure one symmetric allocation of up to `bytes`, and the scratch that collectives
    /// of up to `bytes` need, will not grow anything. Call before capturing a graph.
    pub fn reserve(&self, bytes: usize) -> Result<()> {
        if self.placement(false).is_symmetric() {
            // Staging may hold two scratch slots at once, next to the caller's own buffers.
            self.inner.pool.reserve(bytes)?;
            self.inner.pool.reserve(2 * bytes)?;
        }
        self.plain_scratch(bytes).map(|_| ())
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

    fn check_owned(&self, t: &Tensor, op: Op) -> Result<()> {
        if t.buf.comm_id != self.inner.comm.id {
            return Err(Error::ForeignBuffer {
                ctx: self.ctx(op, t.bytes()),
                arg: Arg::Input,
                owner: t.buf.to_string(),
            });
        }
        Ok(())
    }

    pub(crate) fn contiguous_ref(&self, t: &Tensor, op: Op) -> Result<MemRef> {
        self.check_owned(t, op)?;
        if !t.is_contiguous() {
            return Err(Error::NotContiguous {
                ctx: self.ctx(op, t.bytes()),
                arg: Arg::Input,
                shape: t.shape().to_vec(),
                strides: t.layout().strides().to_vec(),
            });
        }
        Ok(t.buf.mem_ref(t.byte_offset()))
    }

    /// Copy host values into a contiguous tensor (waits for queued work).
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
        self.inner.comm.device.upload(&r, bytes)
    }

    /// Copy a contiguous tensor to host values (waits for queued work).
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
        self.inner.comm.device.download(&r, &mut out)?;
        Ok(out)
    }

    /// Enqueue a copy of `src` into `dst`: both contiguous, of this communicator, with the same
    /// element type and number of elements (empty views copy nothing).
    pub fn copy(&self, src: &Tensor, dst: &Tensor) -> Result<()> {
        if src.dtype != dst.dtype || src.numel() != dst.numel() {
            return Err(Error::InvalidArgument {
                ctx: self.ctx(Op::Copy, src.bytes().max(dst.bytes())),
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
        self.inner.comm.keep_alive(&[&src.buf, &dst.buf], &[]);
        self.inner.comm.device.copy_2d(&Copy2d {
            src: s,
            src_pitch: src.bytes(),
            dst: d,
            dst_pitch: dst.bytes(),
            row_bytes: src.bytes(),
            rows: 1,
        })
    }

    /// Enqueue setting every element of the contiguous `t` to zero.
    pub fn zero(&self, t: &Tensor) -> Result<()> {
        let r = self.contiguous_ref(t, Op::Fill)?;
        if t.bytes() == 0 {
            return Ok(());
        }
        self.inner.comm.keep_alive(&[&t.buf], &[]);
        self.inner.comm.device.memset(&r, t.bytes(), 0)
    }

    /// Whether this rank is capturing a graph now.
    pub fn capturing(&self) -> bool {
        self.inner.comm.device.capturing()
    }

    /// Whether `other` is this very group (not merely one with the same members).
    pub fn same_group(&self, other: &Group) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Wait for queued work, then for every rank of the group.
    pub fn barrier(&self) -> Result<()> {
        self.inner.comm.abort.check(&self.ctx(Op::Barrier, 0))?;
        crate::abort::on_failure(self.inner.comm.device.synchronize())?;
        self.inner.control.barrier("group barrier")
    }

    // ---- collectives ------------------------------------------------------------------------

    /// Reduce `input` across ranks into `output` (same number of elements; in place allowed).
    pub fn all_reduce(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<Dispatched> {
        self.collective(Collective::AllReduce(op), input, output, None, Impl::Auto)
    }

    /// Concatenate every rank's `input` in rank order into `output` (flat).
    pub fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<Dispatched> {
        self.collective(Collective::AllGather, input, output, None, Impl::Auto)
    }

    /// Concatenate along dimension `dim`: `output.shape[dim] = world * input.shape[dim]`.
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
        match self.inner.backend.unavailable(
            imp,
            &CallShape {
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

    fn symm_loc(&self, t: &Tensor) -> Option<SymmLoc> {
        let (pool, segment, offset) = t.buf.symm_location(t.byte_offset())?;
        Arc::ptr_eq(pool, &self.inner.pool).then_some(SymmLoc { segment, offset })
    }

    fn plain_scratch(&self, bytes: usize) -> Result<Arc<dyn Memory>> {
        let mut s = self
            .inner
            .plain_scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(m) = s.as_ref()
            && m.len() >= bytes
        {
            return Ok(m.clone());
        }
        if self.inner.comm.device.capturing() {
            return Err(Error::DuringCapture {
                ctx: self.ctx(Op::PoolAlloc, bytes),
                action: format!("growing the plain scratch buffer to {bytes} B"),
            });
        }
        let m = self.inner.comm.device.alloc_plain(bytes.max(256))?;
        *s = Some(m.clone());
        Ok(m)
    }

    /// Whether scratch windows of `bytes` can be had now without registering memory.
    fn can_stage(&self, bytes: usize) -> bool {
        self.placement(false).is_symmetric()
            && (!self.inner.comm.device.capturing()
                || self.inner.pool.stats().capacity > 0 && {
                    // During capture, a slot must fit in the existing segments.
                    self.inner.pool.largest_free() >= bytes
                })
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
        let world = self.size();
        let rank = self.rank();
        let op = match coll {
            Collective::AllReduce(_) => Op::AllReduce,
            Collective::AllGather => Op::AllGather,
            Collective::ReduceScatter(_) => Op::ReduceScatter,
        };
        let ctx = self.ctx(op, input.bytes().max(output.bytes()));
        self.inner.comm.abort.check(&ctx)?;
        let plan = validate(coll, input, output, dim, world, rank, &ctx)?;
        for (arg, t) in [(Arg::Input, input), (Arg::Output, output)] {
            if t.buf.comm_id != self.inner.comm.id {
                return Err(Error::ForeignBuffer {
                    ctx,
                    arg,
                    owner: t.buf.to_string(),
                });
            }
        }
        let dtype = input.dtype;
        let elem = dtype.size();
        let (in_bytes, out_bytes) = {
            let (i, o) = coll.io_elems(plan.piece, world);
            (i * elem, o * elem)
        };
        let in_loc = self.symm_loc(input);
        let out_loc = self.symm_loc(output);
        let backend = self.inner.comm.device.kind();

        // Which side of the flat call goes through scratch anyway (along-dim reordering).
        let reorder_in = plan.reorder.is_some() && matches!(coll, Collective::ReduceScatter(_));
        let reorder_out = plan.reorder.is_some() && matches!(coll, Collective::AllGather);

        let shape = CallShape {
            coll,
            dtype,
            piece: plan.piece,
            align: 1usize << (input.addr() | output.addr() | 256).trailing_zeros(),
        };
        let (imp, stage_in, stage_out, reason) = if imp == Impl::Auto {
            let stage_ok = self.can_stage(in_bytes.max(out_bytes));
            let table = self.inner.comm.table();
            let mode = if self.inner.comm.device.capturing() {
                dispatch::Mode::Graph
            } else {
                dispatch::Mode::Eager
            };
            let d = dispatch::decide(
                table.as_deref(),
                mode,
                coll,
                dtype,
                world,
                ctx.bytes,
                in_loc.is_some() || (reorder_in && stage_ok),
                out_loc.is_some() || (reorder_out && stage_ok),
                stage_ok,
                &|i| self.inner.backend.unavailable(i, &shape).is_none(),
            );
            (d.imp, d.stage_input, d.stage_output, d.reason)
        } else {
            if let Some(why) = self.inner.backend.unavailable(imp, &shape) {
                return Err(Error::ImplUnavailable {
                    ctx,
                    implementation: imp.name(backend),
                    why,
                });
            }
            for (arg, t, loc, reordered, needed) in [
                (
                    Arg::Input,
                    input,
                    in_loc,
                    reorder_in,
                    imp.needs_input_window(),
                ),
                (
                    Arg::Output,
                    output,
                    out_loc,
                    reorder_out,
                    imp.needs_output_window(),
                ),
            ] {
                {
                    if needed && loc.is_none() && !reordered {
                        return Err(if t.is_symmetric() {
                            Error::ForeignBuffer {
                                ctx,
                                arg,
                                owner: t.buf.to_string(),
                            }
                        } else {
                            Error::NotSymmetric {
                                ctx,
                                implementation: imp.name(backend),
                                arg,
                            }
                        });
                    }
                }
            }
            (imp, false, false, "requested explicitly".to_string())
        };
        let device = &self.inner.comm.device;

        // Scratch: a window where the implementation reads or writes that side there, plain
        // memory otherwise.
        let mut scratch_mem: Vec<Arc<dyn Memory>> = Vec::new();
        let scratch = |bytes: usize, window: bool| -> Result<Scratch> {
            if window {
                Ok(Scratch::Symm(self.inner.pool.alloc(bytes)?))
            } else {
                Ok(Scratch::Plain(self.plain_scratch(bytes)?))
            }
        };
        let input_ref = input.buf.mem_ref(input.byte_offset());
        let output_ref = output.buf.mem_ref(output.byte_offset());
        let in_scratch = if reorder_in || stage_in {
            Some(scratch(in_bytes, imp.needs_input_window())?)
        } else {
            None
        };
        let out_scratch = if reorder_out || stage_out {
            let window = imp.needs_output_window();
            if matches!(in_scratch, Some(Scratch::Plain(_))) && !window {
                // One plain scratch buffer: reordering never needs both sides, and staging
                // always goes through windows.
                return Err(Error::InvalidArgument {
                    ctx,
                    detail: "internal: two plain scratch buffers requested".into(),
                });
            }
            Some(scratch(out_bytes, window)?)
        } else {
            None
        };
        let (src, src_loc) = match &in_scratch {
            Some(s) => {
                let dst = s.mem_ref();
                if let (Some(split), true) = (plan.reorder, reorder_in) {
                    for c in reorder_copies(split, world, elem, &dst, &input_ref, false) {
                        device.copy_2d(&c)?;
                    }
                } else {
                    device.copy_2d(&Copy2d {
                        src: input_ref.clone(),
                        src_pitch: in_bytes,
                        dst: dst.clone(),
                        dst_pitch: in_bytes,
                        row_bytes: in_bytes,
                        rows: 1,
                    })?;
                }
                scratch_mem.push(s.memory());
                (dst, s.loc())
            }
            None => (input_ref, in_loc),
        };
        let (dst, dst_loc) = match &out_scratch {
            Some(s) => {
                scratch_mem.push(s.memory());
                (s.mem_ref(), s.loc())
            }
            None => (output_ref.clone(), out_loc),
        };
        let call = Call {
            coll,
            dtype,
            piece: plan.piece,
            input: src,
            input_symm: src_loc,
            output: dst.clone(),
            output_symm: dst_loc,
            imp,
            ctx: ctx.clone(),
        };
        crate::abort::on_failure(self.inner.backend.collective(&call))?;
        if out_scratch.is_some() {
            if let (Some(split), true) = (plan.reorder, reorder_out) {
                for c in reorder_copies(split, world, elem, &dst, &output_ref, true) {
                    device.copy_2d(&c)?;
                }
            } else {
                device.copy_2d(&Copy2d {
                    src: dst,
                    src_pitch: out_bytes,
                    dst: output_ref,
                    dst_pitch: out_bytes,
                    row_bytes: out_bytes,
                    rows: 1,
                })?;
            }
        }
        let scratch_refs: Vec<&Arc<dyn Memory>> = scratch_mem.iter().collect();
        self.inner
            .comm
            .keep_alive(&[&input.buf, &output.buf], &scratch_refs);
        let d = Dispatched {
            imp,
            name: imp.name(backend),
            staged_input: stage_in,
            staged_output: stage_out,
            reason,
        };
        tracing::debug!(
            target: "symmcomm::dispatch",
            group = %self.inner.label,
            op = coll.name(),
            dtype = %dtype,
            bytes = ctx.bytes,
            implementation = %d.name,
            staged_input = d.staged_input,
            staged_output = d.staged_output,
            reason = %d.reason,
            "collective"
        );
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Validation is tested through real groups in tests/host_collectives.rs; the pure shape
    // helpers are checked here.
    #[test]
    fn reorder_copies_cover_each_piece() {
        let split = DimSplit {
            outer: 3,
            piece: 2,
            inner: 5,
        };
        #[derive(Debug)]
        struct Fake;
        impl Memory for Fake {
            fn addr(&self) -> u64 {
                0
            }
            fn len(&self) -> usize {
                1 << 20
            }
            fn as_any(&self) -> &dyn std::any::Any {
                self
            }
        }
        let m: Arc<dyn Memory> = Arc::new(Fake);
        let flat = MemRef {
            mem: m.clone(),
            offset: 0,
        };
        let big = MemRef {
            mem: m,
            offset: 4096,
        };
        let cs = reorder_copies(split, 4, 2, &flat, &big, true);
        assert_eq!(cs.len(), 4);
        for (r, c) in cs.iter().enumerate() {
            assert_eq!(c.rows, 3);
            assert_eq!(c.row_bytes, 2 * 5 * 2);
            assert_eq!(c.src.offset, r * 3 * 2 * 5 * 2);
            assert_eq!(c.dst.offset, 4096 + r * 20);
            assert_eq!(c.dst_pitch, 4 * 20);
        }
    }

    #[test]
    fn shape_with_replaces_one_dim() {
        assert_eq!(shape_with(&[2, 3, 4], 1, 9), vec![2, 9, 4]);
    }
}
