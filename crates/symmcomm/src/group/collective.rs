//! One collective call, from arguments to enqueued work, in named steps: [`check`] the
//! arguments (nothing is written when that fails), [`choose`] the implementation (`auto` asks
//! the dispatch table), [`stage_in`] plain memory through the group's scratch windows where the
//! implementation needs windows (and reorder along-dimension pieces), [`launch`] the backend's
//! call, [`stage_out`] the result back, and report what ran.

use std::sync::Arc;

use crate::backend::{Call, CallShape, Collective, Copy2d, Exec, Impl, SymmLoc};
use crate::buffer::Buffer;
use crate::dispatch::{self, DispatchRequest, Why};
use crate::error::{Arg, Error, Op, OpCtx, Result};
use crate::group::{Dispatched, Group};
use crate::memory::MemRef;
use crate::tensor::{DimSplit, Tensor};

/// What the caller asked for.
pub(crate) struct Request<'a> {
    pub(crate) coll: Collective,
    pub(crate) input: &'a Tensor,
    pub(crate) output: &'a Tensor,
    /// `None`: the flat operation; `Some(d)`: along dimension `d`.
    pub(crate) dim: Option<usize>,
    pub(crate) imp: Impl,
}

/// The operation a collective's errors name.
pub(crate) fn op_of(coll: Collective) -> Op {
    match coll {
        Collective::AllReduce(_) => Op::AllReduce,
        Collective::AllGather => Op::AllGather,
        Collective::ReduceScatter(_) => Op::ReduceScatter,
    }
}

/// Run one collective on `g`'s stream.
pub(crate) fn run(g: &Group, req: &Request<'_>) -> Result<Dispatched> {
    let ctx = g.ctx(op_of(req.coll), req.input.bytes().max(req.output.bytes()));
    let exec = g.exec(&ctx)?;
    let checked = check(g, req, &ctx)?;
    if req.imp == Impl::Hierarchical {
        return super::hierarchy::run(g, req, exec, &ctx);
    }
    let choice = choose(g, req, &checked, exec, &ctx)?;
    if choice.imp == Impl::Hierarchical {
        // `auto` across hosts, where the table measured it faster: the steps' detail kept.
        let mut ran = super::hierarchy::run(g, req, exec, &ctx)?;
        ran.detail = Some(Arc::from(ran.why.to_string()));
        ran.why = choice.why;
        return Ok(ran);
    }
    let sides = if choice.imp == Impl::Local {
        run_local(g, &checked, exec)?
    } else {
        let sides = stage_in(g, &checked, &choice, exec, &ctx)?;
        launch(g, &checked, &choice, &sides, exec, &ctx)?;
        stage_out(g, &checked, &sides, exec)?;
        sides
    };
    let mut used = vec![&req.input.buf, &req.output.buf];
    used.extend(sides.scratch.iter());
    g.keep_alive(exec, &used, &ctx)?;
    let ran = Dispatched {
        imp: choice.imp,
        staged_input: choice.stage_in,
        staged_output: choice.stage_out,
        why: choice.why,
        backend: g.device().kind(),
        detail: choice.detail,
    };
    tracing::debug!(
        target: "symmcomm::dispatch",
        group = %g.label(),
        op = req.coll.name(),
        dtype = %checked.dtype,
        bytes = ctx.bytes,
        capturing = exec.capturing,
        implementation = %ran.name(),
        staged_input = ran.staged_input,
        staged_output = ran.staged_output,
        reason = %ran.why,
        "collective"
    );
    Ok(ran)
}

// ---- check ----------------------------------------------------------------------------------

/// The validated shape of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Elements per rank piece (all-reduce: the whole buffer).
    pub(crate) piece: usize,
    /// For along-dim calls that need reordering: the decomposition of the per-rank piece.
    pub(crate) reorder: Option<DimSplit>,
}

/// A call whose arguments passed every check, and where its buffers lie.
struct Checked {
    coll: Collective,
    dtype: crate::dtype::DType,
    plan: Plan,
    /// Bytes of the flat call's input and output.
    in_bytes: usize,
    out_bytes: usize,
    input: MemRef,
    output: MemRef,
    in_loc: Option<SymmLoc>,
    out_loc: Option<SymmLoc>,
    /// The flat call reads its input from scratch (along-dim reduce-scatter).
    reorder_in: bool,
    /// The flat call writes its output to scratch (along-dim all-gather).
    reorder_out: bool,
    shape: CallShape,
}

fn check(g: &Group, req: &Request<'_>, ctx: &OpCtx) -> Result<Checked> {
    let plan = validate(
        req.coll,
        req.input,
        req.output,
        req.dim,
        g.size(),
        g.rank(),
        ctx,
    )?;
    g.check_owned(req.input, Arg::Input, ctx)?;
    g.check_owned(req.output, Arg::Output, ctx)?;
    let dtype = req.input.dtype;
    let (i, o) = req.coll.io_elems(plan.piece, g.size());
    let reordered = plan.reorder.is_some();
    Ok(Checked {
        coll: req.coll,
        dtype,
        plan,
        in_bytes: i * dtype.size(),
        out_bytes: o * dtype.size(),
        input: req.input.buf.mem_ref(req.input.byte_offset()),
        output: req.output.buf.mem_ref(req.output.byte_offset()),
        in_loc: g.symm_location(req.input),
        out_loc: g.symm_location(req.output),
        reorder_in: reordered && matches!(req.coll, Collective::ReduceScatter(_)),
        reorder_out: reordered && matches!(req.coll, Collective::AllGather),
        shape: CallShape {
            coll: req.coll,
            dtype,
            piece: plan.piece,
            align: 1usize << (req.input.addr() | req.output.addr() | 256).trailing_zeros(),
        },
    })
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
    check_elements(coll, input, output, ctx)?;
    let plan = match dim {
        None => plan_flat(coll, input, output, world, ctx)?,
        Some(d) => plan_along(coll, input, output, d, world, ctx)?,
    };
    check_overlap(coll, input, output, &plan, (rank, world), ctx)?;
    Ok(plan)
}

/// Same element type, a reduction the type allows, both tensors contiguous.
fn check_elements(coll: Collective, input: &Tensor, output: &Tensor, ctx: &OpCtx) -> Result<()> {
    if input.dtype != output.dtype {
        return Err(Error::DTypeMismatch {
            ctx: ctx.clone(),
            input: input.dtype,
            output: output.dtype,
        });
    }
    if let Some(r) = coll.reduce()
        && !input.dtype.allows(r)
    {
        return Err(Error::OpNotAllowed {
            ctx: ctx.clone(),
            reduce: r,
            dtype: input.dtype,
        });
    }
    for (arg, t) in [(Arg::Input, input), (Arg::Output, output)] {
        if !t.is_contiguous() {
            return Err(Error::NotContiguous {
                ctx: ctx.clone(),
                arg,
                shape: t.shape().to_vec(),
                strides: t.layout().strides().to_vec(),
            });
        }
    }
    Ok(())
}

/// The error for an output of the wrong size: too small, or the wrong shape.
fn size_error(expected: Vec<usize>, got: &Tensor, ctx: &OpCtx) -> Error {
    let needed: usize = expected.iter().product();
    if got.numel() < needed {
        Error::OutputTooSmall {
            ctx: ctx.clone(),
            needed,
            got: got.numel(),
        }
    } else {
        Error::ShapeMismatch {
            ctx: ctx.clone(),
            expected,
            got: got.shape().to_vec(),
        }
    }
}

fn not_divisible(len: usize, world: usize, ctx: &OpCtx) -> Error {
    Error::NotDivisible {
        ctx: ctx.clone(),
        arg: Arg::Input,
        len,
        world,
    }
}

fn plan_flat(
    coll: Collective,
    input: &Tensor,
    output: &Tensor,
    world: usize,
    ctx: &OpCtx,
) -> Result<Plan> {
    let n = input.numel();
    let (want, piece) = match coll {
        Collective::AllReduce(_) => (n, n),
        Collective::AllGather => (n * world, n),
        Collective::ReduceScatter(_) => {
            if !n.is_multiple_of(world) {
                return Err(not_divisible(n, world, ctx));
            }
            (n / world, n / world)
        }
    };
    if output.numel() != want {
        return Err(size_error(vec![want], output, ctx));
    }
    Ok(Plan {
        piece,
        reorder: None,
    })
}

fn plan_along(
    coll: Collective,
    input: &Tensor,
    output: &Tensor,
    d: usize,
    world: usize,
    ctx: &OpCtx,
) -> Result<Plan> {
    let shape = input.shape();
    if d >= shape.len() {
        return Err(Error::BadDim {
            ctx: ctx.clone(),
            dim: d,
            ndim: shape.len(),
        });
    }
    let (want, piece_shape, piece) = match coll {
        // Along a dimension, an all-reduce is the flat one.
        Collective::AllReduce(_) => return plan_flat(coll, input, output, world, ctx),
        Collective::AllGather => (
            shape_with(shape, d, shape[d] * world),
            shape.to_vec(),
            input.numel(),
        ),
        Collective::ReduceScatter(_) => {
            if !shape[d].is_multiple_of(world) {
                return Err(not_divisible(shape[d], world, ctx));
            }
            let want = shape_with(shape, d, shape[d] / world);
            (want.clone(), want, output.numel())
        }
    };
    if output.shape() != want.as_slice() {
        return Err(size_error(want, output, ctx));
    }
    let split = DimSplit::of(&piece_shape, d).expect("dim checked");
    Ok(Plan {
        piece,
        reorder: (!split.is_flat()).then_some(split),
    })
}

/// Input and output may not overlap, except in NCCL's exact in-place layouts (compared by
/// address, so two wrappings of the same engine memory are caught too).
fn check_overlap(
    coll: Collective,
    input: &Tensor,
    output: &Tensor,
    plan: &Plan,
    (rank, world): (usize, usize),
    ctx: &OpCtx,
) -> Result<()> {
    let (ia, oa) = (input.addr(), output.addr());
    let (il, ol) = (input.bytes() as u64, output.bytes() as u64);
    if !(ia < oa + ol && oa < ia + il) {
        return Ok(());
    }
    let rank = rank as u64;
    // One rank's output along a dimension is its input, so in place is exact there too.
    let exact = (plan.reorder.is_none() || world == 1)
        && match coll {
            Collective::AllReduce(_) => ia == oa,
            Collective::AllGather => ia == oa + rank * il,
            Collective::ReduceScatter(_) => oa == ia + rank * ol,
        };
    if exact {
        Ok(())
    } else {
        Err(Error::Overlap { ctx: ctx.clone() })
    }
}

// ---- choose ---------------------------------------------------------------------------------

/// The implementation to run and which sides go through scratch windows.
struct Choice {
    imp: Impl,
    stage_in: bool,
    stage_out: bool,
    why: Why,
    /// What the reason adds to `why` (a refused window's cause).
    detail: Option<Arc<str>>,
}

impl Choice {
    /// `imp` on the buffers where they are, for `why`.
    fn unstaged(imp: Impl, why: Why) -> Self {
        Choice {
            imp,
            stage_in: false,
            stage_out: false,
            why,
            detail: None,
        }
    }
}

fn choose(g: &Group, req: &Request<'_>, c: &Checked, exec: Exec, ctx: &OpCtx) -> Result<Choice> {
    let imp = req.imp;
    let one_rank = g.size() == 1;
    if imp == Impl::Local || (imp == Impl::Auto && one_rank) {
        if !one_rank {
            return Err(Error::ImplUnavailable {
                ctx: ctx.clone(),
                implementation: imp.name(g.device().kind()),
                why: format!("local runs groups of one rank; this one has {}", g.size()),
            });
        }
        return Ok(Choice::unstaged(
            Impl::Local,
            if imp == Impl::Auto {
                Why::OneRank
            } else {
                Why::Explicit
            },
        ));
    }
    if imp == Impl::Auto {
        return Ok(if g.topology().spans_domains() {
            choose_cross_domain(g, c, exec, ctx)
        } else {
            choose_auto(g, c, exec, ctx)
        });
    }
    let backend = g.device().kind();
    if let Some(why) = g.unavailable(imp, &c.shape) {
        return Err(Error::ImplUnavailable {
            ctx: ctx.clone(),
            implementation: imp.name(backend),
            why,
        });
    }
    // An explicit implementation never stages: a side it needs in a window must be there
    // (along-dim reordering goes through a scratch window anyway).
    for (arg, t, loc, reordered, needed) in [
        (
            Arg::Input,
            req.input,
            c.in_loc,
            c.reorder_in,
            imp.needs_input_window(),
        ),
        (
            Arg::Output,
            req.output,
            c.out_loc,
            c.reorder_out,
            imp.needs_output_window(),
        ),
    ] {
        if needed && loc.is_none() && !reordered {
            // A window of another group's pool is named as such.
            return Err(if t.is_symmetric() {
                Error::ForeignBuffer {
                    ctx: ctx.clone(),
                    arg,
                    owner: t.buf.to_string(),
                }
            } else {
                Error::NotSymmetric {
                    ctx: ctx.clone(),
                    implementation: imp.name(backend),
                    arg,
                }
            });
        }
    }
    Ok(Choice::unstaged(imp, Why::Explicit))
}

/// `auto` in a group that spans NVLink domains: the table's cross-domain row, else NCCL's rule
/// ([`dispatch::decide_cross_domain`]), with the reason NCCL's symmetric path cannot run when
/// both buffers are in the pool and it cannot (the windows NCCL refused, say).
fn choose_cross_domain(g: &Group, c: &Checked, exec: Exec, ctx: &OpCtx) -> Choice {
    let req = auto_request(g, c, exec, ctx);
    let both = req.input_in_window && req.output_in_window;
    let symmetric = g.unavailable(Impl::Symmetric, &c.shape);
    let table = g.comm().table();
    let domains = g.topology().domains().len();
    let d = dispatch::decide_cross_domain(table.as_deref(), &req, domains, &|i| match i {
        Impl::Symmetric => symmetric.is_none(),
        Impl::Hierarchical => super::hierarchy::ready(g, &c.shape, exec.capturing),
        _ => true,
    });
    Choice {
        detail: symmetric.filter(|_| both).map(Arc::from),
        ..Choice::unstaged(d.imp, d.why)
    }
}

fn choose_auto(g: &Group, c: &Checked, exec: Exec, ctx: &OpCtx) -> Choice {
    let table = g.comm().table();
    let d = dispatch::decide(table.as_deref(), &auto_request(g, c, exec, ctx), &|i| {
        g.unavailable(i, &c.shape).is_none()
    });
    Choice {
        imp: d.imp,
        stage_in: d.stage_input,
        stage_out: d.stage_output,
        why: d.why,
        detail: None,
    }
}

/// What `auto` decides on for the checked call `c`: where its buffers lie (or will, through
/// scratch windows that can be had now) and whether the stream is being captured.
fn auto_request(g: &Group, c: &Checked, exec: Exec, ctx: &OpCtx) -> DispatchRequest {
    let can_stage = can_stage(g, c.in_bytes.max(c.out_bytes), exec);
    DispatchRequest {
        mode: if exec.capturing {
            dispatch::Mode::Graph
        } else {
            dispatch::Mode::Eager
        },
        coll: c.coll,
        dtype: c.dtype,
        world: g.size(),
        bytes: ctx.bytes,
        input_in_window: c.in_loc.is_some() || (c.reorder_in && can_stage),
        output_in_window: c.out_loc.is_some() || (c.reorder_out && can_stage),
        can_stage,
    }
}

/// Whether scratch windows of `bytes` can be had now without registering memory: outside a
/// capture always (where the policy gives this group windows); inside one only when the
/// staging windows are that large already or the pool has room for them.
fn can_stage(g: &Group, bytes: usize, exec: Exec) -> bool {
    if !g.placement(false).is_symmetric() {
        return false;
    }
    if !exec.capturing {
        return true;
    }
    let st = g.staging();
    let fits = |b: &Option<Arc<Buffer>>| b.as_ref().is_some_and(|b| b.bytes >= bytes);
    (fits(&st.window_in) && fits(&st.window_out)) || g.pool().largest_free() >= bytes
}

// ---- stage ----------------------------------------------------------------------------------

/// Which side of a call a staging window serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Input,
    Output,
}

impl Group {
    /// The group's staging window for `side`, at least `bytes` large: grown (a new pool slot)
    /// when smaller. Inside a capture the pool may not grow, so that is an error there.
    pub(crate) fn staging_window(
        &self,
        side: Side,
        bytes: usize,
        exec: Exec,
        ctx: &OpCtx,
    ) -> Result<Arc<Buffer>> {
        let mut st = self.staging();
        let slot = match side {
            Side::Input => &mut st.window_in,
            Side::Output => &mut st.window_out,
        };
        if let Some(b) = slot.as_ref()
            && b.bytes >= bytes
        {
            return Ok(b.clone());
        }
        let t = self.alloc_staging_slot(bytes, exec, ctx)?;
        *slot = Some(t.clone());
        Ok(t)
    }

    fn alloc_staging_slot(&self, bytes: usize, exec: Exec, ctx: &OpCtx) -> Result<Arc<Buffer>> {
        let slot = self
            .pool()
            .alloc(
                bytes,
                crate::symm_pool::Growth::unless_capturing(exec.capturing),
            )
            .map_err(|e| match e {
                Error::DuringCapture { action, .. } => Error::DuringCapture {
                    ctx: ctx.clone(),
                    action: format!(
                        "staging {bytes} B through a window ({action}; call Group::prepare \
                         with the largest size before capturing)"
                    ),
                },
                other => other,
            })?;
        Ok(Arc::new(Buffer {
            backing: crate::buffer::Backing::Symmetric(slot),
            comm_id: self.comm().id,
            backend: self.device().kind(),
            bytes,
        }))
    }

    /// The group's plain scratch buffer, at least `bytes` large (grown outside captures only).
    pub(crate) fn staging_plain(
        &self,
        bytes: usize,
        exec: Exec,
        ctx: &OpCtx,
    ) -> Result<Arc<Buffer>> {
        let mut st = self.staging();
        if let Some(b) = st.plain.as_ref()
            && b.bytes >= bytes
        {
            return Ok(b.clone());
        }
        if exec.capturing {
            return Err(Error::DuringCapture {
                ctx: ctx.clone(),
                action: format!(
                    "growing the plain scratch buffer to {bytes} B (call Group::prepare with the \
                     largest size before capturing)"
                ),
            });
        }
        let mem = self.device().alloc_plain(bytes.max(256))?;
        let b = Arc::new(Buffer {
            backing: crate::buffer::Backing::Plain(mem),
            comm_id: self.comm().id,
            backend: self.device().kind(),
            bytes: bytes.max(256),
        });
        st.plain = Some(b.clone());
        Ok(b)
    }
}

/// Where the flat call reads and writes, and the scratch it went through.
struct Sides {
    src: MemRef,
    src_loc: Option<SymmLoc>,
    dst: MemRef,
    dst_loc: Option<SymmLoc>,
    /// The result lies in scratch and must be copied (or reordered) to the output.
    copy_out: bool,
    scratch: Vec<Arc<Buffer>>,
}

/// A scratch buffer for one side: a staging window when the implementation reads or writes
/// that side there, the plain scratch buffer otherwise.
fn scratch_for(
    g: &Group,
    side: Side,
    bytes: usize,
    window: bool,
    exec: Exec,
    ctx: &OpCtx,
) -> Result<Arc<Buffer>> {
    if window {
        g.staging_window(side, bytes, exec, ctx)
    } else {
        g.staging_plain(bytes, exec, ctx)
    }
}

fn location(g: &Group, b: &Buffer) -> Option<SymmLoc> {
    let (pool, segment, offset) = b.symm_location(0)?;
    Arc::ptr_eq(pool, g.pool()).then_some(SymmLoc { segment, offset })
}

fn stage_in(g: &Group, c: &Checked, ch: &Choice, exec: Exec, ctx: &OpCtx) -> Result<Sides> {
    let mut scratch = Vec::new();
    let (src, src_loc) = if c.reorder_in || ch.stage_in {
        let s = scratch_for(
            g,
            Side::Input,
            c.in_bytes,
            ch.imp.needs_input_window(),
            exec,
            ctx,
        )?;
        let dst = s.mem_ref(0);
        match (c.plan.reorder, c.reorder_in) {
            (Some(split), true) => {
                for cp in reorder_copies(split, g.size(), c.dtype.size(), &dst, &c.input, false) {
                    g.device().copy_2d(exec.stream, &cp)?;
                }
            }
            _ => g
                .device()
                .copy_2d(exec.stream, &flat_copy(&c.input, &dst, c.in_bytes))?,
        }
        let loc = location(g, &s);
        scratch.push(s);
        (dst, loc)
    } else {
        (c.input.clone(), c.in_loc)
    };
    let copy_out = c.reorder_out || ch.stage_out;
    let (dst, dst_loc) = if copy_out {
        let window = ch.imp.needs_output_window();
        let s = scratch_for(g, Side::Output, c.out_bytes, window, exec, ctx)?;
        let loc = location(g, &s);
        let r = s.mem_ref(0);
        scratch.push(s);
        (r, loc)
    } else {
        (c.output.clone(), c.out_loc)
    };
    Ok(Sides {
        src,
        src_loc,
        dst,
        dst_loc,
        copy_out,
        scratch,
    })
}

/// One rank: the output is the input (along any dimension too), so copy it there unless the
/// call is in place.
fn run_local(g: &Group, c: &Checked, exec: Exec) -> Result<Sides> {
    if c.input.addr() != c.output.addr() && c.out_bytes > 0 {
        g.device()
            .copy_2d(exec.stream, &flat_copy(&c.input, &c.output, c.out_bytes))?;
    }
    Ok(Sides {
        src: c.input.clone(),
        src_loc: c.in_loc,
        dst: c.output.clone(),
        dst_loc: c.out_loc,
        copy_out: false,
        scratch: Vec::new(),
    })
}

fn launch(
    g: &Group,
    c: &Checked,
    ch: &Choice,
    sides: &Sides,
    exec: Exec,
    ctx: &OpCtx,
) -> Result<()> {
    let call = Call {
        coll: c.coll,
        dtype: c.dtype,
        piece: c.plan.piece,
        input: sides.src.clone(),
        input_symm: sides.src_loc,
        output: sides.dst.clone(),
        output_symm: sides.dst_loc,
        imp: ch.imp,
        ctx: ctx.clone(),
    };
    crate::abort::on_failure(g.backend().collective(exec, &call))
}

fn stage_out(g: &Group, c: &Checked, sides: &Sides, exec: Exec) -> Result<()> {
    if !sides.copy_out {
        return Ok(());
    }
    match (c.plan.reorder, c.reorder_out) {
        (Some(split), true) => {
            for cp in reorder_copies(split, g.size(), c.dtype.size(), &sides.dst, &c.output, true) {
                g.device().copy_2d(exec.stream, &cp)?;
            }
            Ok(())
        }
        _ => g
            .device()
            .copy_2d(exec.stream, &flat_copy(&sides.dst, &c.output, c.out_bytes)),
    }
}

fn flat_copy(src: &MemRef, dst: &MemRef, bytes: usize) -> Copy2d {
    Copy2d {
        src: src.clone(),
        src_pitch: bytes,
        dst: dst.clone(),
        dst_pitch: bytes,
        row_bytes: bytes,
        rows: 1,
    }
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
            let (src, src_pitch, dst, dst_pitch) = if to_big {
                (flat_r, row, big_r, world * row)
            } else {
                (big_r, world * row, flat_r, row)
            };
            Copy2d {
                src,
                src_pitch,
                dst,
                dst_pitch,
                row_bytes: row,
                rows: split.outer,
            }
        })
        .collect()
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Memory;

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
