//! The arguments of an add-RMSNorm, checked before anything runs, the same way on every backend:
//! element types, contiguity, shapes, the hidden size the kernels take, ownership, alignment and
//! overlap. Nothing is written when a check fails.

use crate::backend::{NormBuffers, NormForm, NormShape};
use crate::dtype::DType;
use crate::error::{Arg, Error, OpCtx, Result};
use crate::group::Group;
use crate::norm::{AddRmsNorm, max_hidden};
use crate::tensor::Tensor;

/// A call whose arguments passed every check: its shape and buffers.
pub(super) struct Checked {
    pub(super) shape: NormShape,
    pub(super) bufs: NormBuffers,
}

/// The five tensors with the argument each is.
fn tensors<'a>(req: &AddRmsNorm<'a>) -> [(Arg, &'a Tensor); 5] {
    [
        (Arg::Input, req.input),
        (Arg::Residual, req.residual),
        (Arg::Weight, req.weight),
        (Arg::NormedOut, req.normed_out),
        (Arg::ResidualOut, req.residual_out),
    ]
}

/// Check `req` for `form` on `g`.
pub(super) fn validate(
    g: &Group,
    form: NormForm,
    req: &AddRmsNorm<'_>,
    ctx: &OpCtx,
) -> Result<Checked> {
    let dtype = check_elements(req, ctx)?;
    let (tokens, hidden) = check_hidden(req.input, dtype, ctx)?;
    let rows_out = rows_out(form, tokens, g.size(), ctx)?;
    check_shapes(req, rows_out, hidden, ctx)?;
    for (arg, t) in tensors(req) {
        g.check_owned(t, arg, ctx)?;
        if !t.addr().is_multiple_of(16) {
            return Err(Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!(
                    "{arg} at {:#x} is not 16-byte aligned (the kernels move 16-byte vectors)",
                    t.addr()
                ),
            });
        }
    }
    check_overlap(req, ctx)?;
    if !req.eps.is_finite() || req.eps < 0.0 {
        return Err(Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!("eps = {} must be finite and not negative", req.eps),
        });
    }
    let mem = |t: &Tensor| t.buf.mem_ref(t.byte_offset());
    Ok(Checked {
        shape: NormShape {
            form,
            world: g.size(),
            rank: g.rank(),
            tokens,
            hidden,
            dtype,
        },
        bufs: NormBuffers {
            input: mem(req.input),
            residual: mem(req.residual),
            weight: mem(req.weight),
            normed: mem(req.normed_out),
            residual_out: mem(req.residual_out),
            eps: req.eps,
        },
    })
}

/// One element type, bf16 or f16, for all five tensors; all contiguous.
fn check_elements(req: &AddRmsNorm<'_>, ctx: &OpCtx) -> Result<DType> {
    let dtype = req.input.dtype();
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Err(Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!("the add-RMSNorm takes bf16 or f16, not {dtype}"),
        });
    }
    for (arg, t) in tensors(req) {
        if t.dtype() != dtype {
            return Err(Error::ArgDTypeMismatch {
                ctx: ctx.clone(),
                arg,
                expected: dtype,
                got: t.dtype(),
            });
        }
        if !t.is_contiguous() {
            return Err(Error::NotContiguous {
                ctx: ctx.clone(),
                arg,
                shape: t.shape().to_vec(),
                strides: t.layout().strides().to_vec(),
            });
        }
    }
    Ok(dtype)
}

/// `(T, H)` of a `[T, H]` input whose rows the kernels take: whole 16-byte units, at most
/// [`max_hidden`].
fn check_hidden(input: &Tensor, dtype: DType, ctx: &OpCtx) -> Result<(usize, usize)> {
    let &[tokens, hidden] = input.shape() else {
        return Err(Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!(
                "input must be [tokens, hidden], got shape {:?}",
                input.shape()
            ),
        });
    };
    let unit = 16 / dtype.size();
    if hidden == 0 || !hidden.is_multiple_of(unit) {
        return Err(Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!(
                "hidden = {hidden} must be a positive multiple of {unit} (rows of whole 16-byte \
                 units of {dtype})"
            ),
        });
    }
    if hidden > max_hidden(dtype) {
        return Err(Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: format!(
                "hidden = {hidden} is too large for the add-RMSNorm kernels (at most {} for \
                 {dtype}: one block holds a row)",
                max_hidden(dtype)
            ),
        });
    }
    Ok((tokens, hidden))
}

/// Rows this rank gets: every row, or its slice of the reduce-scatter.
fn rows_out(form: NormForm, tokens: usize, world: usize, ctx: &OpCtx) -> Result<usize> {
    match form {
        NormForm::AllReduce => Ok(tokens),
        NormForm::ReduceScatter if tokens.is_multiple_of(world) => Ok(tokens / world),
        NormForm::ReduceScatter => Err(Error::NotDivisible {
            ctx: ctx.clone(),
            arg: Arg::Input,
            len: tokens,
            world,
        }),
    }
}

/// The residual and both outputs `[rows_out, H]`, the weight `[H]`.
fn check_shapes(req: &AddRmsNorm<'_>, rows_out: usize, hidden: usize, ctx: &OpCtx) -> Result<()> {
    let rows = [rows_out, hidden];
    let expected: [(Arg, &Tensor, &[usize]); 4] = [
        (Arg::Residual, req.residual, &rows),
        (Arg::Weight, req.weight, &[hidden]),
        (Arg::NormedOut, req.normed_out, &rows),
        (Arg::ResidualOut, req.residual_out, &rows),
    ];
    for (arg, t, shape) in expected {
        if t.shape() != shape {
            return Err(Error::ArgShapeMismatch {
                ctx: ctx.clone(),
                arg,
                expected: shape.to_vec(),
                got: t.shape().to_vec(),
            });
        }
    }
    Ok(())
}

fn overlaps(a: &Tensor, b: &Tensor) -> bool {
    let (aa, ab) = (a.addr(), a.addr() + a.bytes() as u64);
    let (ba, bb) = (b.addr(), b.addr() + b.bytes() as u64);
    a.bytes() > 0 && b.bytes() > 0 && aa < bb && ba < ab
}

/// The outputs overlap nothing, except `residual_out` being exactly `residual` (in place).
fn check_overlap(req: &AddRmsNorm<'_>, ctx: &OpCtx) -> Result<()> {
    let in_place = req.residual_out.addr() == req.residual.addr();
    let clash = overlaps(req.normed_out, req.input)
        || overlaps(req.normed_out, req.residual)
        || overlaps(req.normed_out, req.weight)
        || overlaps(req.normed_out, req.residual_out)
        || overlaps(req.residual_out, req.input)
        || overlaps(req.residual_out, req.weight)
        || (!in_place && overlaps(req.residual_out, req.residual));
    if clash {
        return Err(Error::Overlap { ctx: ctx.clone() });
    }
    Ok(())
}
