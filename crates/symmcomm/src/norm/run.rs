//! One add-RMSNorm call, from arguments to enqueued work, in named steps: [`check`] the
//! arguments, [`choose`] the implementation, then either the fused call of the group's backend
//! ([`run_fused`]) or the collective followed by the add-RMSNorm step ([`run_unfused`]); keep
//! the buffers alive for a capture, and report what ran.
//!
//! [`check`]: super::check
//! [`choose`]: super::choose

use super::check::{self, Checked};
use super::choose::{self, Choice};
use super::{AddRmsNorm, NormDispatched, NormForm, NormImpl};
use crate::backend::{AddRmsNormStep, Algo, Collective, Exec, Impl, NormBuffers, NormFused};
use crate::dispatch::Mode;
use crate::dtype::ReduceOp;
use crate::error::{Op, OpCtx, Result};
use crate::group::{Dispatched, Group};

/// The operation a form's errors name.
fn op_of(form: NormForm) -> Op {
    match form {
        NormForm::AllReduce => Op::AllReduceAddRmsNorm,
        NormForm::ReduceScatter => Op::ReduceScatterAddRmsNorm,
    }
}

/// The checked call and its choice (`capturing`: whether the group's stream is being
/// captured, which picks the table's graph rows).
fn check_and_choose(
    g: &Group,
    form: NormForm,
    req: &AddRmsNorm<'_>,
    imp: NormImpl,
    capturing: bool,
    ctx: &OpCtx,
) -> Result<(Checked, Choice)> {
    let checked = check::validate(g, form, req, ctx)?;
    let mode = if capturing { Mode::Graph } else { Mode::Eager };
    let choice = choose::resolve(g, &checked.shape, imp, mode, ctx)?;
    Ok((checked, choice))
}

fn report(g: &Group, choice: Choice, collective: Option<Dispatched>) -> NormDispatched {
    NormDispatched {
        imp: choice.imp,
        collective,
        reason: choice.reason,
        backend: g.device().kind(),
    }
}

/// What `imp` would run (see [`Group::add_rmsnorm_plan`]).
pub(super) fn plan(
    g: &Group,
    form: NormForm,
    req: &AddRmsNorm<'_>,
    imp: NormImpl,
) -> Result<NormDispatched> {
    let ctx = g.ctx(op_of(form), req.input.bytes());
    let capturing = g.exec(&ctx)?.capturing;
    let (_, choice) = check_and_choose(g, form, req, imp, capturing, &ctx)?;
    Ok(report(g, choice, None))
}

/// Run one add-RMSNorm on `g`'s stream.
pub(super) fn run(
    g: &Group,
    form: NormForm,
    req: &AddRmsNorm<'_>,
    imp: NormImpl,
) -> Result<NormDispatched> {
    let ctx = g.ctx(op_of(form), req.input.bytes());
    let exec = g.exec(&ctx)?;
    let (checked, choice) = check_and_choose(g, form, req, imp, exec.capturing, &ctx)?;
    let mut collective = None;
    if checked.shape.tokens > 0 {
        match choice.imp {
            NormImpl::Fused(Some(algo)) => run_fused(g, exec, &checked, algo, &ctx)?,
            NormImpl::Nccl => {
                collective = Some(run_unfused(g, exec, req, &checked, Impl::Regular)?)
            }
            // `resolve` returns a concrete choice: `Unfused` here.
            NormImpl::Unfused | NormImpl::Auto | NormImpl::Fused(None) => {
                collective = Some(run_unfused(g, exec, req, &checked, Impl::Auto)?);
            }
        }
    }
    let used = [
        req.input,
        req.residual,
        req.weight,
        req.normed_out,
        req.residual_out,
    ];
    g.keep_alive(exec, &used.map(|t| &t.buf), &ctx)?;
    let ran = report(g, choice, collective);
    tracing::debug!(
        target: "symmcomm::dispatch",
        group = %g.label(),
        op = %ctx.op,
        dtype = %checked.shape.dtype,
        bytes = ctx.bytes,
        capturing = exec.capturing,
        implementation = %ran.name(),
        reason = %ran.reason(),
        "add-rmsnorm"
    );
    Ok(ran)
}

/// The fused call of the group's backend (one kernel per rank on CUDA).
fn run_fused(g: &Group, exec: Exec, c: &Checked, algo: Algo, ctx: &OpCtx) -> Result<()> {
    let call = NormFused {
        shape: c.shape,
        algo,
        bufs: c.bufs.clone(),
        ctx: ctx.clone(),
    };
    crate::abort::on_failure(g.backend().norm_fused(exec, &call))
}

/// The collective with `imp` into `normed_out`, then the add-RMSNorm step in place there.
/// Returns what ran the collective.
fn run_unfused(
    g: &Group,
    exec: Exec,
    req: &AddRmsNorm<'_>,
    c: &Checked,
    imp: Impl,
) -> Result<Dispatched> {
    let coll = match c.shape.form {
        NormForm::AllReduce => Collective::AllReduce(ReduceOp::Sum),
        NormForm::ReduceScatter => Collective::ReduceScatter(ReduceOp::Sum),
    };
    let ran = g.collective(coll, req.input, req.normed_out, None, imp)?;
    let step = AddRmsNormStep {
        rows: c.shape.rows_out(),
        hidden: c.shape.hidden,
        dtype: c.shape.dtype,
        bufs: NormBuffers {
            input: c.bufs.normed.clone(),
            ..c.bufs.clone()
        },
        ctx: g.ctx(Op::Kernel, c.shape.rows_out() * c.shape.row_bytes()),
    };
    g.device().add_rmsnorm(exec, &step)?;
    Ok(ran)
}
