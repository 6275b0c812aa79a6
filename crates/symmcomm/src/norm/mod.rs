//! The collective of a decode layer fused with the residual add and RMSNorm that follow it:
//! `residual_out = residual + collective(input)`, `normed_out = RMSNorm(residual_out) · weight`.
//!
//! Two forms ([`NormForm`]): after an all-reduce (tensor parallelism: every rank gets every row,
//! [`Group::all_reduce_add_rmsnorm`]), and after a reduce-scatter along the rows (DP attention and
//! sequence parallelism: rank `r` gets rows `[r·T/N, (r+1)·T/N)` normalised,
//! [`Group::reduce_scatter_add_rmsnorm`]; the all-gather that usually follows is
//! [`Group::all_gather`] of `normed_out`). Implementations ([`NormImpl`]): our fused kernel (one
//! per rank: low-latency, one-shot, or, for the all-reduce, two-shot: reduce-scatter, add and
//! norm of the rank's rows, all-gather of both outputs), `unfused` (symmcomm's `auto` collective,
//! then the separate add-RMSNorm kernel) and `nccl` (NCCL's regular collective, then the same
//! kernel). `auto` takes the dispatch table's norm row where `symmcomm tune --ops ar_rmsnorm`
//! measured one ([`crate::dispatch::NormRow`]), else a fixed rule by size.
//!
//! The maths, the same on every backend and implementation (KERNELS.md §10): the collective's
//! result is rounded to the element type (as an all-reduce gives it), added to the residual in
//! f32 and rounded (the new residual), then normalised in f32 with `rstd = 1 / sqrt(mean(r²) +
//! eps)` and rounded once. bf16 and f16; rows of whole 16-byte units (hidden a multiple of 8) up to
//! [`max_hidden`]; every tensor contiguous and 16-byte aligned.

mod check;
mod choose;
mod run;

use std::fmt;
use std::str::FromStr;

pub use crate::backend::NormForm;
use crate::backend::{Algo, BackendKind};
use crate::dtype::DType;
use crate::error::Result;
use crate::group::{Dispatched, Group};
use crate::tensor::Tensor;

/// The tensors of one add-RMSNorm, `T` tokens of `H` hidden values.
///
/// All-reduce form: `input`, `residual`, `normed_out`, `residual_out` are `[T, H]`. Reduce-scatter
/// form: `input` is `[T, H]` (every rank's rows, partial sums), the others `[T / N, H]`. `weight`
/// is `[H]`. One element type (bf16 or f16) for all five. `residual_out` may be `residual`
/// itself (in place); no other tensors may overlap. In the all-reduce form the residual must be
/// the same on every rank, as tensor parallelism keeps it (two-shot takes each row's residual
/// from the rank that normalises the row).
#[derive(Clone, Copy, Debug)]
pub struct AddRmsNorm<'a> {
    /// This rank's partial sums, `[T, H]`.
    pub input: &'a Tensor,
    /// The residual stream.
    pub residual: &'a Tensor,
    /// The RMSNorm weight, `[H]`.
    pub weight: &'a Tensor,
    /// The RMSNorm epsilon.
    pub eps: f32,
    /// Where the normalised rows go.
    pub normed_out: &'a Tensor,
    /// Where the new residual goes (may be `residual`).
    pub residual_out: &'a Tensor,
}

impl<'a> AddRmsNorm<'a> {
    /// The usual call of a decode layer: the new residual overwrites `residual`.
    pub fn in_place(
        input: &'a Tensor,
        residual: &'a Tensor,
        weight: &'a Tensor,
        eps: f32,
        normed_out: &'a Tensor,
    ) -> Self {
        AddRmsNorm {
            input,
            residual,
            weight,
            eps,
            normed_out,
            residual_out: residual,
        }
    }
}

/// How an add-RMSNorm runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormImpl {
    /// The table's norm row for the call where there is one; else by size: the fused kernel
    /// the rule picks ([`NormImpl::Fused`]`(None)`), else `Unfused`.
    Auto,
    /// One fused kernel per rank: `LowLatency`, `OneShot` or (all-reduce form) `TwoShot`, or
    /// `None` for the one the size rule picks.
    Fused(Option<Algo>),
    /// symmcomm's `auto` collective, then the separate add-RMSNorm kernel.
    Unfused,
    /// NCCL's regular collective (the host's regular path), then the same kernel.
    Nccl,
}

impl NormImpl {
    /// Name in tables and results: `auto`, `fused`, `fused_ll`, `fused_oneshot`,
    /// `fused_twoshot`, `unfused`, `nccl`; on the host backend `host_fused...`, `host_unfused`
    /// and `host`.
    pub fn name(self, backend: BackendKind) -> String {
        let host = backend == BackendKind::Host;
        let base = match self {
            NormImpl::Auto => return "auto".into(),
            NormImpl::Fused(None) => "fused".to_string(),
            NormImpl::Fused(Some(a)) => format!("fused_{}", a.name()),
            NormImpl::Unfused => "unfused".to_string(),
            NormImpl::Nccl => return if host { "host" } else { "nccl" }.into(),
        };
        if host { format!("host_{base}") } else { base }
    }
}

impl FromStr for NormImpl {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bare = s.strip_prefix("host_").unwrap_or(s);
        Ok(match bare {
            "auto" => NormImpl::Auto,
            "nccl" | "host" | "regular" => NormImpl::Nccl,
            "unfused" => NormImpl::Unfused,
            "fused" => NormImpl::Fused(None),
            other => match other
                .strip_prefix("fused_")
                .and_then(|a| Algo::ALL.into_iter().find(|x| x.name() == a))
            {
                Some(a) => NormImpl::Fused(Some(a)),
                None => {
                    return Err(format!(
                        "unknown add-RMSNorm implementation {s:?} (auto, fused, fused_ll, \
                         fused_oneshot, fused_twoshot, unfused, nccl)"
                    ));
                }
            },
        })
    }
}

impl fmt::Display for NormImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name(BackendKind::Cuda))
    }
}

/// What ran for one add-RMSNorm, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct NormDispatched {
    /// What ran: `Fused(Some(algo))`, `Unfused` or `Nccl`.
    pub imp: NormImpl,
    /// For `Unfused` and `Nccl`: what ran the collective, and why.
    pub collective: Option<Dispatched>,
    reason: String,
    backend: BackendKind,
}

impl NormDispatched {
    /// The implementation's name on this backend (`fused_ll`, `unfused`, `host_fused_oneshot`,
    /// ...).
    pub fn name(&self) -> String {
        self.imp.name(self.backend)
    }

    /// Why this implementation, in words.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// The largest hidden size the add-RMSNorm takes for `dtype` on every backend (the kernels hold
/// a row in one block's registers): 16384 for bf16 and f16.
pub fn max_hidden(dtype: DType) -> usize {
    crate::kernels::rmsnorm_max_hidden(dtype.size())
}

impl Group {
    /// `residual_out = residual + all_reduce(input)` and `normed_out = RMSNorm(residual_out) ·
    /// weight`, every row on every rank, on the group's stream (capturable: call
    /// [`Group::prepare`] before capturing). Every rank calls it with the same shapes and `imp`.
    ///
    /// ```
    /// use symmcomm::norm::{AddRmsNorm, NormImpl};
    /// use symmcomm::{BackendChoice, CommConfig, DType, run_rank_threads};
    /// let config = CommConfig { backend: BackendChoice::Host, ..CommConfig::default() };
    /// for r in run_rank_threads(2, &config, |comm| {
    ///     let tp = comm.world();
    ///     let t = |shape: &[usize]| tp.alloc_symmetric(DType::BF16, shape);
    ///     let (x, res, w, out) = (t(&[1, 8])?, t(&[1, 8])?, t(&[8])?, t(&[1, 8])?);
    ///     let bf = |v: f32| half::bf16::from_f32(v);
    ///     tp.upload(&x, &[bf(1.0); 8])?; // every rank: 1, so the sum is 2
    ///     tp.upload(&res, &[bf(1.0); 8])?;
    ///     tp.upload(&w, &[bf(0.5); 8])?;
    ///     let ran = tp.all_reduce_add_rmsnorm(&AddRmsNorm::in_place(&x, &res, &w, 0.0, &out), NormImpl::Auto)?;
    ///     assert_eq!(ran.name(), "host_fused_ll");
    ///     Ok((tp.download::<half::bf16>(&res)?, tp.download::<half::bf16>(&out)?))
    /// }) {
    ///     let (res, out) = r.unwrap();
    ///     assert!(res.iter().all(|v| v.to_f32() == 3.0)); // 1 + 2
    ///     assert!(out.iter().all(|v| v.to_f32() == 0.5)); // 3 / rms 3 · 0.5
    /// }
    /// ```
    pub fn all_reduce_add_rmsnorm(
        &self,
        args: &AddRmsNorm<'_>,
        imp: NormImpl,
    ) -> Result<NormDispatched> {
        run::run(self, NormForm::AllReduce, args, imp)
    }

    /// `residual_out = residual + reduce_scatter(input)` along the rows and `normed_out =
    /// RMSNorm(residual_out) · weight`: rank `r` gets rows `[r·T/N, (r+1)·T/N)` of the sum (`T`
    /// a multiple of the group's size). The gather of the normalised rows that follows is
    /// [`Group::all_gather`] of `normed_out`. Otherwise as [`Group::all_reduce_add_rmsnorm`].
    pub fn reduce_scatter_add_rmsnorm(
        &self,
        args: &AddRmsNorm<'_>,
        imp: NormImpl,
    ) -> Result<NormDispatched> {
        run::run(self, NormForm::ReduceScatter, args, imp)
    }

    /// What `imp` would run for `args` in `form` (the concrete implementation and why), or the
    /// error the call would return; runs nothing.
    pub fn add_rmsnorm_plan(
        &self,
        form: NormForm,
        args: &AddRmsNorm<'_>,
        imp: NormImpl,
    ) -> Result<NormDispatched> {
        run::plan(self, form, args, imp)
    }
}
