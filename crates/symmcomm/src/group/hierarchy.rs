//! The hierarchical all-reduce of a group that spans `k` NVLink domains (hosts) with `m` of
//! its ranks on each: reduce-scatter inside each domain with our kernels, all-reduce of the
//! 1/m piece across domains (NCCL, among the ranks at the same place in every domain; `auto`
//! there is NCCL's rule), all-gather inside each domain with our kernels. The network carries
//! 1/m of what NCCL's flat all-reduce sends across it. The steps inside a domain run what the
//! domain group's dispatch table measured when it has a row for them, else our kernels where
//! they can run (see [`intra_impl`]), else NCCL's rule.
//!
//! `auto` runs it only where the dispatch table's row for groups across that many domains
//! names it (`symmcomm tune` on such a group measured it faster than NCCL's own all-reduce
//! across hosts, itself hierarchical inside NCCL: rings and trees over NVLink and the network)
//! and it is ready ([`ready`]); otherwise it runs when asked for ([`Impl::Hierarchical`]).

use std::sync::{Arc, Mutex};

use super::collective::Request;
use super::{Dispatched, Group};
use crate::backend::{Algo, CallShape, Collective, Exec, Impl};
use crate::dispatch::{Mode, Why};
use crate::dtype::DType;
use crate::error::{Error, Op, OpCtx, Result};
use crate::tensor::{Layout, Tensor};

/// The sub-groups one rank's hierarchical all-reduces run on, made once per group.
pub(crate) struct Hierarchy {
    /// The group's ranks in this rank's domain.
    intra: Group,
    /// The group's ranks at this rank's place in every domain.
    inter: Group,
    /// Where the reduce-scatter leaves this rank's piece (a byte buffer of the domain's group,
    /// in its windows where the policy allows): grown outside captures only.
    piece: Mutex<Option<Tensor>>,
}

/// Why the hierarchical implementation cannot run calls of `shape` on `g`, if it cannot.
pub(crate) fn unavailable(g: &Group, shape: &CallShape) -> Option<String> {
    if !matches!(shape.coll, Collective::AllReduce(_)) {
        return Some(format!(
            "the hierarchical implementation runs all-reduces only, not {}",
            shape.coll.name()
        ));
    }
    let topology = g.topology();
    if let Some(why) = topology.hierarchical_unavailable() {
        return Some(why);
    }
    let m = topology.ranks_per_domain()?;
    (!shape.piece.is_multiple_of(m)).then(|| {
        format!(
            "{} elements do not split into the {m} ranks of each domain (the reduce-scatter \
             inside a domain needs a multiple of {m})",
            shape.piece
        )
    })
}

/// Whether `auto` may run the hierarchical all-reduce of `shape` now: it can run on `g` at
/// all, and inside a capture its groups and a piece buffer large enough exist already
/// ([`Group::prepare_hierarchical`]); otherwise `auto` takes NCCL's path rather than fail.
/// The same on every rank (it follows the same collective calls), so every rank takes the
/// same way.
pub(crate) fn ready(g: &Group, shape: &CallShape, capturing: bool) -> bool {
    if unavailable(g, shape).is_some() {
        return false;
    }
    if !capturing {
        return true;
    }
    let Some(m) = g.topology().ranks_per_domain() else {
        return false;
    };
    let made = g.inner.hierarchy.lock().unwrap_or_else(|p| p.into_inner());
    made.as_ref().is_some_and(|h| {
        let needed = shape.piece / m * shape.dtype.size();
        let piece = h.piece.lock().unwrap_or_else(|p| p.into_inner());
        piece.as_ref().is_some_and(|t| t.bytes() >= needed)
    })
}

/// Run the all-reduce `req` hierarchically on `g`'s stream (its arguments were checked).
pub(crate) fn run(g: &Group, req: &Request<'_>, exec: Exec, ctx: &OpCtx) -> Result<Dispatched> {
    let Collective::AllReduce(op) = req.coll else {
        return Err(refused(g, ctx, unavailable(g, &shape_of(req))));
    };
    let n = req.input.numel();
    if let Some(why) = unavailable(g, &shape_of(req)) {
        return Err(refused(g, ctx, Some(why)));
    }
    let m = g
        .topology()
        .ranks_per_domain()
        .expect("checked by `unavailable`");
    let h = g.hierarchy(exec, ctx)?;
    let piece = h.piece(req.input.dtype, n / m, exec, ctx)?;
    // The steps run on this group's stream, in order.
    let intra = h.intra.with_stream(g);
    let inter = h.inter.with_stream(g);
    let (dtype, bytes) = (req.input.dtype, ctx.bytes);
    let rs_coll = Collective::ReduceScatter(op);
    let rs_imp = intra_impl(&intra, rs_coll, dtype, n / m, bytes, exec.capturing);
    let rs = intra
        .collective(rs_coll, req.input, &piece, None, rs_imp)
        .map_err(|e| in_step(e, ctx, "reduce-scatter inside the domain"))?;
    let ar = inter
        .collective(Collective::AllReduce(op), &piece, &piece, None, Impl::Auto)
        .map_err(|e| in_step(e, ctx, "all-reduce across domains"))?;
    let ag_imp = intra_impl(
        &intra,
        Collective::AllGather,
        dtype,
        n / m,
        bytes,
        exec.capturing,
    );
    let ag = intra
        .collective(Collective::AllGather, &piece, req.output, None, ag_imp)
        .map_err(|e| in_step(e, ctx, "all-gather inside the domain"))?;
    let ran = Dispatched {
        imp: Impl::Hierarchical,
        staged_input: false,
        staged_output: false,
        why: Why::Hierarchical {
            domains: g.topology().domains().len(),
            per_domain: m,
            reduce_scatter: rs.imp,
            all_reduce: ar.imp,
            all_gather: ag.imp,
        },
        backend: g.device().kind(),
        detail: None,
    };
    tracing::debug!(
        target: "symmcomm::dispatch",
        group = %g.label(),
        op = req.coll.name(),
        bytes = ctx.bytes,
        capturing = exec.capturing,
        reason = %ran.why,
        "hierarchical collective"
    );
    Ok(ran)
}

/// Up to this size (nccl-tests bytes: the whole buffer) the low-latency kernel beats one-shot
/// for reduce-scatter and all-gather on 2 × H200 (the built-in table's graph rows).
const LOW_LATENCY_UP_TO: usize = 512 << 10;

/// What runs a step inside this rank's domain (`intra`, one NVLink domain): its `auto` when
/// its dispatch table has a row for the call (tables are measured per group size, so the
/// communicator's table often has none for a domain's); else our low-latency kernel up to
/// [`LOW_LATENCY_UP_TO`] and our one-shot kernel within its workspace slot, where they can
/// run; else `auto`, which is NCCL's rule without a row.
fn intra_impl(
    intra: &Group,
    coll: Collective,
    dtype: DType,
    piece: usize,
    bytes: usize,
    capturing: bool,
) -> Impl {
    let mode = if capturing { Mode::Graph } else { Mode::Eager };
    let measured = intra
        .comm()
        .table()
        .is_some_and(|t| t.lookup(coll, dtype, intra.size(), bytes, mode).is_some());
    if measured || intra.size() == 1 {
        return Impl::Auto;
    }
    let ll = (bytes <= LOW_LATENCY_UP_TO).then_some(Impl::Kernel(Algo::LowLatency));
    ll.into_iter()
        .chain([Impl::Kernel(Algo::OneShot)])
        .find(|&i| intra.supports(coll, dtype, i, piece).is_ok())
        .unwrap_or(Impl::Auto)
}

/// The call shape `unavailable` judges: an all-reduce's piece is its whole buffer.
fn shape_of(req: &Request<'_>) -> CallShape {
    CallShape {
        coll: req.coll,
        dtype: req.input.dtype,
        piece: req.input.numel(),
        align: 256,
    }
}

fn refused(g: &Group, ctx: &OpCtx, why: Option<String>) -> Error {
    Error::ImplUnavailable {
        ctx: ctx.clone(),
        implementation: Impl::Hierarchical.name(g.device().kind()),
        why: why.unwrap_or_default(),
    }
}

/// A step's failure as the hierarchical call's own: a deadline, an abort or a device error
/// names the caller's operation, group and size, and the step with its sub-group's context.
fn in_step(e: Error, ctx: &OpCtx, step: &str) -> Error {
    let within = |inner: &OpCtx| format!("hierarchical step {step} ({inner})");
    match e {
        Error::Timeout {
            ctx: inner,
            waited,
            detail,
        } => Error::Timeout {
            ctx: ctx.clone(),
            waited,
            detail: format!("{}: {detail}", within(&inner)),
        },
        Error::Aborted { ctx: inner, reason } => Error::Aborted {
            ctx: ctx.clone(),
            reason: format!("{}: {reason}", within(&inner)),
        },
        Error::Nccl {
            ctx: inner,
            call,
            code,
            code_name,
            message,
            last_error,
        } => Error::Nccl {
            ctx: ctx.clone(),
            call,
            code,
            code_name,
            message: format!("{}: {message}", within(&inner)),
            last_error,
        },
        Error::Cuda {
            ctx: inner,
            call,
            message,
        } => Error::Cuda {
            ctx: ctx.clone(),
            call,
            message: format!("{}: {message}", within(&inner)),
        },
        other => other,
    }
}

impl Hierarchy {
    /// Split `g` into its domain's ranks and the ranks at this rank's place in every domain
    /// (collective over `g`).
    fn build(g: &Group) -> Result<Self> {
        let t = g.topology();
        let (d, i) = (t.my_domain(), t.rank_in_domain());
        let intra = g.split_labeled(g.kind(), d, format!("{}.domain{d}", g.label()))?;
        let inter = g.split_labeled(g.kind(), i, format!("{}.across{i}", g.label()))?;
        Ok(Hierarchy {
            intra,
            inter,
            piece: Mutex::new(None),
        })
    }

    /// `elems` elements of `dtype` of the piece buffer, grown (outside captures) when smaller.
    fn piece(&self, dtype: DType, elems: usize, exec: Exec, ctx: &OpCtx) -> Result<Tensor> {
        let bytes = elems * dtype.size();
        let mut slot = self.piece.lock().unwrap_or_else(|p| p.into_inner());
        let buf = match slot.as_ref() {
            Some(t) if t.bytes() >= bytes => t.clone(),
            _ if exec.capturing => {
                return Err(Error::DuringCapture {
                    ctx: ctx.clone(),
                    action: format!(
                        "growing the hierarchical all-reduce's piece buffer to {bytes} B (call \
                         Group::prepare_hierarchical with the largest size before capturing)"
                    ),
                });
            }
            _ => {
                let t = self
                    .intra
                    .scope(false)
                    .alloc(DType::U8, &[bytes.div_ceil(256).max(1) * 256])?;
                *slot = Some(t.clone());
                t
            }
        };
        Ok(Tensor {
            buf: buf.buf,
            dtype,
            layout: Layout::contiguous(&[elems]),
        })
    }
}

impl Group {
    /// This group bound to `other`'s stream (the same group, pool and communicators).
    fn with_stream(&self, other: &Group) -> Group {
        Group {
            inner: self.inner.clone(),
            stream: other.stream.clone(),
        }
    }

    /// The group's hierarchy, made now (collective over the group) on first use; inside a
    /// capture it must exist already.
    fn hierarchy(&self, exec: Exec, ctx: &OpCtx) -> Result<Arc<Hierarchy>> {
        let mut h = self
            .inner
            .hierarchy
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(h) = h.as_ref() {
            return Ok(h.clone());
        }
        if exec.capturing {
            return Err(Error::DuringCapture {
                ctx: ctx.clone(),
                action: "making the hierarchical all-reduce's groups (it creates communicators; \
                         call Group::prepare_hierarchical before capturing)"
                    .into(),
            });
        }
        let made = Arc::new(Hierarchy::build(self)?);
        *h = Some(made.clone());
        Ok(made)
    }

    /// Make the hierarchical all-reduces of this group up to `bytes` (the buffer's size) safe
    /// to capture: the groups of its steps (inside this rank's domain, and across domains:
    /// new communicators, made once), their scratch, and the piece buffer. Collective: every
    /// rank of the group calls it with the same `bytes`, outside any capture. Without it the
    /// first hierarchical all-reduce makes them.
    pub fn prepare_hierarchical(&self, bytes: usize) -> Result<()> {
        let ctx = self.ctx(Op::AllReduce, bytes);
        let shape = CallShape {
            coll: Collective::AllReduce(crate::dtype::ReduceOp::Sum),
            dtype: DType::U8,
            piece: 0,
            align: 256,
        };
        if let Some(why) = unavailable(self, &shape) {
            return Err(refused(self, &ctx, Some(why)));
        }
        let exec = self.exec(&ctx)?;
        if exec.capturing {
            return Err(Error::DuringCapture {
                ctx,
                action: "preparing the hierarchical all-reduce".into(),
            });
        }
        let m = self.topology().ranks_per_domain().expect("checked above");
        let h = self.hierarchy(exec, &ctx)?;
        let piece = bytes.div_ceil(m);
        h.piece(DType::U8, piece, exec, &ctx)?;
        h.intra.prepare(bytes)?;
        h.inter.prepare(piece)
    }
}
