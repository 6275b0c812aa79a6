//! Which implementation runs an add-RMSNorm. `auto` takes the dispatch table's norm row for the
//! form, element type, world, size and mode where `symmcomm tune --ops ar_rmsnorm` measured one
//! (unless it names a fused kernel this group cannot run). Otherwise a fixed rule by size: the
//! fused low-latency kernel while its pieces fit the LL protocol (512 KiB, where the LL
//! all-reduce wins on 2 × H200), then one-shot (two ranks, or up to 1 MiB), then two-shot; a
//! fused kernel the group cannot run is skipped, and with none the call runs unfused
//! (symmcomm's `auto` collective, then the separate kernel).

use crate::backend::{Algo, NormForm, NormShape};
use crate::dispatch::{Mode, NormBest};
use crate::error::{Error, OpCtx, Result};
use crate::group::Group;
use crate::kernels::{LL_MAX_BYTES, MAX_WORLD};
use crate::norm::NormImpl;

/// Above this, on more than two ranks, the all-reduce form prefers two-shot to one-shot.
const ONE_SHOT_MAX_BYTES: usize = 1 << 20;

/// The concrete implementation to run, and why.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Choice {
    pub(super) imp: NormImpl,
    pub(super) reason: String,
}

/// Bytes one LL piece of `algo` carries for `shape`: the whole input, or one rank's rows.
fn ll_piece_bytes(shape: &NormShape) -> usize {
    match shape.form {
        NormForm::AllReduce => shape.input_bytes(),
        NormForm::ReduceScatter => shape.rows_out() * shape.row_bytes(),
    }
}

/// Why fused `algo` cannot run `shape` by the rules of the algorithm itself, on any backend:
/// a kernel for the form, 2..8 ranks, an LL piece within the protocol's slot.
pub(super) fn algo_unavailable(shape: &NormShape, algo: Algo) -> Option<String> {
    if !shape.form.fused_algos().contains(&algo) {
        return Some(format!(
            "no fused {} kernel for the {} form",
            algo.name(),
            shape.form.name()
        ));
    }
    if !(2..=MAX_WORLD).contains(&shape.world) {
        return Some(format!(
            "the fused kernels run on 2..{MAX_WORLD} ranks, not {}",
            shape.world
        ));
    }
    let piece = ll_piece_bytes(shape);
    (algo == Algo::LowLatency && piece > LL_MAX_BYTES).then(|| {
        format!("{piece} B per piece exceed the {LL_MAX_BYTES} B of the low-latency protocol")
    })
}

/// Why fused `algo` cannot run `shape` on `g`, if it cannot.
fn unavailable(g: &Group, shape: &NormShape, algo: Algo) -> Option<String> {
    algo_unavailable(shape, algo).or_else(|| g.backend().norm_fused_unavailable(shape, algo))
}

/// The fused algorithms in the order the size rule prefers them for `shape`.
pub(super) fn preference(shape: &NormShape) -> Vec<Algo> {
    let ll = ll_piece_bytes(shape) <= LL_MAX_BYTES;
    let one_shot_first = shape.world <= 2 || shape.input_bytes() <= ONE_SHOT_MAX_BYTES;
    let mut order = Vec::new();
    if ll {
        order.push(Algo::LowLatency);
    }
    match shape.form {
        NormForm::ReduceScatter => order.push(Algo::OneShot),
        NormForm::AllReduce if one_shot_first => order.extend([Algo::OneShot, Algo::TwoShot]),
        NormForm::AllReduce => order.extend([Algo::TwoShot, Algo::OneShot]),
    }
    order
}

/// The first fused algorithm of the rule's order that `g` can run, or why none can.
fn by_rule(g: &Group, shape: &NormShape) -> std::result::Result<(Algo, String), String> {
    let mut why_not = Vec::new();
    for algo in preference(shape) {
        match unavailable(g, shape, algo) {
            None => {
                let reason = format!(
                    "size rule (until tuned): {} B in the {} form on {} ranks",
                    shape.input_bytes(),
                    shape.form.name(),
                    shape.world
                );
                return Ok((algo, reason));
            }
            Some(why) => why_not.push(format!("{}: {why}", algo.name())),
        }
    }
    Err(why_not.join("; "))
}

/// The table's pick for `shape` in `mode`, where the communicator's table has a norm row for it
/// that this group can run.
fn by_table(g: &Group, shape: &NormShape, mode: Mode) -> Option<Choice> {
    let table = g.comm().table()?;
    let op = match shape.form {
        NormForm::AllReduce => "all_reduce_add_rmsnorm",
        NormForm::ReduceScatter => "reduce_scatter_add_rmsnorm",
    };
    let row = table.lookup_norm(op, shape.dtype, shape.world, shape.input_bytes(), mode)?;
    let imp = match row.best {
        NormBest::Unfused => NormImpl::Unfused,
        NormBest::Nccl => NormImpl::Nccl,
        fused => {
            let algo = fused.algo()?;
            if unavailable(g, shape, algo).is_some() {
                return None;
            }
            NormImpl::Fused(Some(algo))
        }
    };
    let bound = match row.max_bytes {
        usize::MAX => "every size above the last bucket".to_string(),
        b => format!("up to {b} B"),
    };
    Some(Choice {
        imp,
        reason: format!(
            "table {}: {} fastest {bound} in {} mode",
            table.source,
            row.best.name(),
            mode.name()
        ),
    })
}

/// Resolve `imp` for `shape` on `g` (in `mode`) to what runs.
pub(super) fn resolve(
    g: &Group,
    shape: &NormShape,
    imp: NormImpl,
    mode: Mode,
    ctx: &OpCtx,
) -> Result<Choice> {
    let backend = g.device().kind();
    let unavailable_error = |why: String| Error::ImplUnavailable {
        ctx: ctx.clone(),
        implementation: imp.name(backend),
        why,
    };
    match imp {
        NormImpl::Auto => Ok(
            by_table(g, shape, mode).unwrap_or_else(|| match by_rule(g, shape) {
                Ok((algo, reason)) => Choice {
                    imp: NormImpl::Fused(Some(algo)),
                    reason,
                },
                Err(why) => Choice {
                    imp: NormImpl::Unfused,
                    reason: format!("no fused kernel runs this call ({why})"),
                },
            }),
        ),
        NormImpl::Fused(None) => {
            let (algo, reason) = by_rule(g, shape).map_err(unavailable_error)?;
            Ok(Choice {
                imp: NormImpl::Fused(Some(algo)),
                reason,
            })
        }
        NormImpl::Fused(Some(algo)) => match unavailable(g, shape, algo) {
            Some(why) => Err(unavailable_error(why)),
            None => Ok(Choice {
                imp,
                reason: "requested explicitly".into(),
            }),
        },
        NormImpl::Unfused | NormImpl::Nccl => Ok(Choice {
            imp,
            reason: "requested explicitly".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn shape(form: NormForm, world: usize, tokens: usize, hidden: usize) -> NormShape {
        NormShape {
            form,
            world,
            rank: 0,
            tokens,
            hidden,
            dtype: DType::BF16,
        }
    }

    #[test]
    fn the_rule_prefers_ll_then_one_shot_then_two_shot() {
        use Algo::{LowLatency as Ll, OneShot as One, TwoShot as Two};
        let ar = NormForm::AllReduce;
        // 32 tokens of 7168 bf16: 448 KiB, within the LL slot.
        assert_eq!(preference(&shape(ar, 2, 32, 7168)), [Ll, One, Two]);
        // 64 tokens: 896 KiB; one-shot on 2 ranks and up to 1 MiB anywhere.
        assert_eq!(preference(&shape(ar, 2, 64, 7168)), [One, Two]);
        assert_eq!(preference(&shape(ar, 8, 64, 7168)), [One, Two]);
        assert_eq!(preference(&shape(ar, 8, 512, 7168)), [Two, One]);
        assert_eq!(preference(&shape(ar, 2, 512, 7168)), [One, Two]);
        let rs = NormForm::ReduceScatter;
        assert_eq!(preference(&shape(rs, 8, 256, 7168)), [Ll, One]);
        assert_eq!(preference(&shape(rs, 2, 512, 7168)), [One]);
    }

    #[test]
    fn algorithms_refuse_what_they_cannot_run() {
        let ar = shape(NormForm::AllReduce, 2, 64, 7168);
        assert!(algo_unavailable(&ar, Algo::LowLatency).is_some());
        assert_eq!(algo_unavailable(&ar, Algo::OneShot), None);
        assert!(algo_unavailable(&ar, Algo::CopyEngine).is_some());
        let rs = shape(NormForm::ReduceScatter, 2, 64, 7168);
        assert_eq!(algo_unavailable(&rs, Algo::LowLatency), None);
        assert!(algo_unavailable(&rs, Algo::TwoShot).is_some());
        assert!(algo_unavailable(&shape(NormForm::AllReduce, 1, 1, 8), Algo::OneShot).is_some());
        assert!(algo_unavailable(&shape(NormForm::AllReduce, 9, 9, 8), Algo::OneShot).is_some());
    }
}
