//! The DCP combine (`cp_lse_ag_out_rs`): from every rank's partial attention output
//! `[B, H, D]` and LSE `[B, H]`, each rank's merged heads `[H/N, B, D]` (and, if asked, their
//! merged LSE `[B, H/N]`). Two ways: the sequence all-gather(LSE) → correction → reduce-scatter
//! (along heads), each collective run by the implementation asked for; or the fused kernel
//! (CUDA: one launch per rank, one cross-GPU barrier). A [`DcpCombine`] is made once per shape
//! and holds every buffer, so that runs allocate nothing and can be captured in graphs.

use std::fmt;
use std::str::FromStr;

use crate::backend::{BackendKind, Collective, DcpCorrect, DcpFused, DcpShape, Exec, Impl};
use crate::dcp::LseBase;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Arg, Error, Op, OpCtx, Result};
use crate::group::{Dispatched, Group};
use crate::memory::MemRef;
use crate::tensor::{Layout, Tensor};

/// How a combine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CombineImpl {
    /// All-gather the LSEs, correct locally, reduce-scatter along heads; both collectives with
    /// this implementation (`Impl::Regular` is SGLang's `nccl` path, `Impl::Symmetric`
    /// their `nccl_symm` path on windows).
    Sequence(Impl),
    /// One kernel per rank: push the partial rows of each peer's heads and the LSEs into the
    /// peer's workspace, one barrier, merge locally.
    Fused,
}

impl CombineImpl {
    /// Name in tables and results: the collectives' name for a sequence (`nccl`,
    /// `nccl_symm`, `oneshot`, `host`, ...), `fused` (`host_fused` on the host backend).
    pub fn name(self, backend: BackendKind) -> String {
        match (self, backend) {
            (CombineImpl::Sequence(i), b) => i.name(b),
            (CombineImpl::Fused, BackendKind::Cuda) => "fused".into(),
            (CombineImpl::Fused, BackendKind::Host) => "host_fused".into(),
        }
    }
}

impl FromStr for CombineImpl {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fused" | "host_fused" => Ok(CombineImpl::Fused),
            other => other.parse().map(CombineImpl::Sequence),
        }
    }
}

impl fmt::Display for CombineImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name(BackendKind::Cuda))
    }
}

/// The fixed shape of a combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CombineSpec {
    /// Most tokens a run merges (the buffers hold this many).
    pub batch_max: usize,
    /// Gathered heads `H` (every rank's, `N · H/N`).
    pub heads: usize,
    /// Values per head `D` (`kv_lora_rank` = 512 for DeepSeek-V3's MLA); a multiple of 8.
    pub dim: usize,
    /// Element type of the partial outputs (bf16 or f32).
    pub partial_dtype: DType,
    /// Element type of the merged output and of the corrected buffer (bf16 or f32).
    pub out_dtype: DType,
    /// Base of the LSEs the attention kernel writes.
    pub base: LseBase,
    /// Also write the merged LSE of this rank's heads.
    pub merged_lse: bool,
    /// Set up the fused combine (its workspace: `2 · N ·` [`fused_slot_bytes`] bytes of the
    /// group's symmetric pool on CUDA).
    pub fused: bool,
}

impl CombineSpec {
    /// A combine of `heads` gathered heads of `dim` values in `dtype` (partial and merged
    /// output), LSEs in `base`, up to `batch_max` tokens, the fused combine set up, no merged LSE.
    pub fn new(batch_max: usize, heads: usize, dim: usize, dtype: DType, base: LseBase) -> Self {
        CombineSpec {
            batch_max,
            heads,
            dim,
            partial_dtype: dtype,
            out_dtype: dtype,
            base,
            merged_lse: false,
            fused: true,
        }
    }

    /// DeepSeek-V3's MLA decode: 128 gathered heads, D = 512, bf16, base-2 LSEs (FlashInfer).
    pub fn deepseek_v3(batch_max: usize) -> Self {
        CombineSpec::new(batch_max, 128, 512, DType::BF16, LseBase::Two)
    }
}

/// Bytes one source's slot of the fused workspace holds for `batch` tokens: the `[B, H/N, D]`
/// partial rows for the receiving rank's heads, then their `[B, H/N]` f32 LSEs at the next
/// multiple of 16, rounded up to 256.
pub fn fused_slot_bytes(batch: usize, heads_local: usize, dim: usize, partial: DType) -> usize {
    let rows = batch * heads_local;
    let o = (rows * dim * partial.size()).div_ceil(16) * 16;
    (o + rows * 4).div_ceil(256) * 256
}

/// What a run did.
#[derive(Clone, Debug, PartialEq)]
pub struct CombineRun {
    /// The combine's name ([`CombineImpl::name`]).
    pub name: String,
    /// For a sequence: what ran the all-gather and the reduce-scatter, and why.
    pub collectives: Vec<Dispatched>,
}

/// A DCP combine on one rank of a group: its buffers, made once, and its runs.
///
/// Every rank of the group makes it with the same spec (the allocations are SPMD) and runs it
/// with the same batch and implementation. Write the attention's partial output into
/// [`DcpCombine::partial_out`] and its LSE into [`DcpCombine::partial_lse`], call
/// [`DcpCombine::run`], read [`DcpCombine::output`].
#[derive(Clone, Debug)]
pub struct DcpCombine {
    group: Group,
    spec: CombineSpec,
    partial: Tensor,
    lse: Tensor,
    lse_all: Tensor,
    corrected: Tensor,
    out: Tensor,
    merged: Option<Tensor>,
    workspace: Option<Tensor>,
    slot_bytes: usize,
}

/// The first `numel` elements of `t`'s buffer as a contiguous `shape`.
fn prefix(t: &Tensor, shape: &[usize]) -> Tensor {
    let layout = Layout::contiguous(shape);
    debug_assert!(layout.numel() * t.dtype.size() <= t.buf.bytes);
    Tensor {
        buf: t.buf.clone(),
        dtype: t.dtype,
        layout,
    }
}

fn mem_ref(t: &Tensor) -> MemRef {
    t.buf.mem_ref(t.byte_offset())
}

impl DcpCombine {
    /// Allocate the buffers of a combine on `group` (collective: every rank, same spec, outside
    /// graph capture). Buffers go where `group.scope(scope_disabled)` puts them: windows when
    /// the policy allows (the `nccl_symm` sequence needs them), plain memory otherwise.
    pub fn new(group: &Group, spec: CombineSpec, scope_disabled: bool) -> Result<Self> {
        let (world, rank) = (group.size(), group.rank());
        let ctx = group.ctx(
            Op::DcpCombine,
            spec.batch_max * spec.heads * spec.dim * spec.partial_dtype.size(),
        );
        let invalid = |detail: String| Error::InvalidArgument {
            ctx: ctx.clone(),
            detail,
        };
        if !spec.heads.is_multiple_of(world) || spec.heads == 0 {
            return Err(Error::NotDivisible {
                ctx: ctx.clone(),
                arg: Arg::Input,
                len: spec.heads,
                world,
            });
        }
        if spec.dim == 0 || !spec.dim.is_multiple_of(8) {
            return Err(invalid(format!(
                "D = {} must be a positive multiple of 8 (the kernels move 8-element vectors)",
                spec.dim
            )));
        }
        for d in [spec.partial_dtype, spec.out_dtype] {
            if !matches!(d, DType::BF16 | DType::F32) {
                return Err(invalid(format!(
                    "the combine takes bf16 or f32 partial outputs and outputs, not {d}"
                )));
            }
        }
        if spec.batch_max == 0 {
            return Err(invalid("batch_max must be at least 1".into()));
        }
        let (b, h, d, hl) = (spec.batch_max, spec.heads, spec.dim, spec.heads / world);
        let scope = group.scope(scope_disabled);
        let partial = scope.alloc(spec.partial_dtype, &[b, h, d])?;
        let lse = scope.alloc(DType::F32, &[b, h])?;
        let lse_all = scope.alloc(DType::F32, &[world, b, h])?;
        let corrected = scope.alloc(spec.out_dtype, &[h, b, d])?;
        let out = scope.alloc(spec.out_dtype, &[hl, b, d])?;
        let merged = if spec.merged_lse {
            Some(scope.alloc(DType::F32, &[b, hl])?)
        } else {
            None
        };
        let shape = DcpShape {
            world,
            rank,
            batch: b,
            heads: h,
            dim: d,
            partial: spec.partial_dtype,
            out: spec.out_dtype,
            base: spec.base,
        };
        let slot_bytes = fused_slot_bytes(b, hl, d, spec.partial_dtype);
        let workspace = if spec.fused
            && group.device().kind() == BackendKind::Cuda
            && group.backend().dcp_fused_unavailable(&shape).is_none()
        {
            Some(group.alloc_symmetric(DType::U8, &[2 * world * slot_bytes])?)
        } else {
            None
        };
        // Its kernels load now, so that a run can be captured.
        group.device().prepare(&ctx)?;
        Ok(DcpCombine {
            group: group.clone(),
            spec,
            partial,
            lse,
            lse_all,
            corrected,
            out,
            merged,
            workspace,
            slot_bytes,
        })
    }

    /// This combine with its runs enqueued on `stream` (the same buffers; see [`Group::on`]).
    pub fn on(&self, stream: &crate::Stream) -> Result<Self> {
        Ok(DcpCombine {
            group: self.group.on(stream)?,
            ..self.clone()
        })
    }

    /// The spec this combine was made with.
    pub fn spec(&self) -> &CombineSpec {
        &self.spec
    }

    /// The group it runs on.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Heads this rank owns (`H / N`).
    pub fn heads_local(&self) -> usize {
        self.spec.heads / self.group.size()
    }

    fn check_batch(&self, batch: usize) -> Result<()> {
        if batch > self.spec.batch_max {
            return Err(Error::InvalidArgument {
                ctx: self.group.ctx(Op::DcpCombine, self.partial_bytes(batch)),
                detail: format!(
                    "batch {batch} exceeds the combine's batch_max {}",
                    self.spec.batch_max
                ),
            });
        }
        Ok(())
    }

    /// Bytes of one rank's partial output for `batch` tokens (the benchmark's `bytes`).
    pub fn partial_bytes(&self, batch: usize) -> usize {
        batch * self.spec.heads * self.spec.dim * self.spec.partial_dtype.size()
    }

    /// Where the attention writes its partial output for `batch` tokens: `[batch, H, D]`.
    pub fn partial_out(&self, batch: usize) -> Result<Tensor> {
        self.check_batch(batch)?;
        Ok(prefix(
            &self.partial,
            &[batch, self.spec.heads, self.spec.dim],
        ))
    }

    /// Where the attention writes its LSE for `batch` tokens: `[batch, H]` f32 (NaN, +inf or
    /// −inf for a shard with no tokens, e.g. `seq_len < N` or graph padding rows).
    pub fn partial_lse(&self, batch: usize) -> Result<Tensor> {
        self.check_batch(batch)?;
        Ok(prefix(&self.lse, &[batch, self.spec.heads]))
    }

    /// This rank's merged heads after a run of `batch` tokens: `[H/N, batch, D]`, head `hl` is
    /// global head `rank · H/N + hl`.
    pub fn output(&self, batch: usize) -> Result<Tensor> {
        self.check_batch(batch)?;
        Ok(prefix(
            &self.out,
            &[self.heads_local(), batch, self.spec.dim],
        ))
    }

    /// The merged LSE of this rank's heads after a run: `[batch, H/N]` f32 (−inf for rows with
    /// no tokens anywhere), when the spec asked for it.
    pub fn merged_lse(&self, batch: usize) -> Result<Option<Tensor>> {
        self.check_batch(batch)?;
        Ok(self
            .merged
            .as_ref()
            .map(|m| prefix(m, &[batch, self.heads_local()])))
    }

    fn shape(&self, batch: usize) -> DcpShape {
        DcpShape {
            world: self.group.size(),
            rank: self.group.rank(),
            batch,
            heads: self.spec.heads,
            dim: self.spec.dim,
            partial: self.spec.partial_dtype,
            out: self.spec.out_dtype,
            base: self.spec.base,
        }
    }

    /// Why `imp` cannot run this combine, if it cannot.
    pub fn unavailable(&self, imp: CombineImpl) -> Option<String> {
        let backend = self.group.device().kind();
        match imp {
            CombineImpl::Fused => {
                if let Some(why) = self
                    .group
                    .backend()
                    .dcp_fused_unavailable(&self.shape(self.spec.batch_max))
                {
                    return Some(why);
                }
                (!self.spec.fused).then(|| "the combine was made with spec.fused = false".into())
            }
            CombineImpl::Sequence(i) => {
                let b = self.spec.batch_max;
                let h = self.spec.heads;
                let checks = [
                    (Collective::AllGather, DType::F32, b * h),
                    (
                        Collective::ReduceScatter(ReduceOp::Sum),
                        self.spec.out_dtype,
                        self.heads_local() * b * self.spec.dim,
                    ),
                ];
                for (coll, dtype, piece) in checks {
                    if let Err(why) = self.group.supports(coll, dtype, i, piece) {
                        return Some(format!("{}: {why}", coll.name()));
                    }
                }
                let windows = self.partial.is_symmetric();
                (i == Impl::Symmetric && !windows).then(|| {
                    format!(
                        "{} needs the combine's buffers in windows; they are plain memory (the policy or scope_disabled)",
                        i.name(backend)
                    )
                })
            }
        }
    }

    /// Merge `batch` tokens (every rank calls it with the same batch and implementation;
    /// capturable in a graph).
    pub fn run(&self, batch: usize, imp: CombineImpl) -> Result<CombineRun> {
        self.check_batch(batch)?;
        let backend = self.group.device().kind();
        let name = imp.name(backend);
        let mut run = CombineRun {
            name,
            collectives: Vec::new(),
        };
        if batch == 0 {
            return Ok(run);
        }
        let ctx = self.group.ctx(Op::DcpCombine, self.partial_bytes(batch));
        let exec = self.group.exec(&ctx)?;
        let views = self.views(batch);
        match imp {
            CombineImpl::Sequence(i) => {
                run.collectives = self.run_sequence(i, exec, &views, &ctx)?;
            }
            CombineImpl::Fused => {
                if let Some(why) = self.unavailable(imp) {
                    return Err(Error::ImplUnavailable {
                        ctx,
                        implementation: run.name,
                        why,
                    });
                }
                self.run_fused(exec, &views, &ctx)?;
            }
        }
        Ok(run)
    }

    /// The buffers both ways of running read and write, cut to `batch` tokens.
    fn views(&self, batch: usize) -> RunViews {
        let (h, d, hl) = (self.spec.heads, self.spec.dim, self.heads_local());
        RunViews {
            batch,
            shape: self.shape(batch),
            partial: prefix(&self.partial, &[batch, h, d]),
            lse: prefix(&self.lse, &[batch, h]),
            out: prefix(&self.out, &[hl, batch, d]),
            merged: self.merged.as_ref().map(|m| prefix(m, &[batch, hl])),
        }
    }

    /// The sequence with `imp`'s collectives: all-gather the LSEs, correct every rank's partial
    /// rows on this device, reduce-scatter the corrected rows along heads. Returns what ran the
    /// all-gather and the reduce-scatter.
    fn run_sequence(
        &self,
        imp: Impl,
        exec: Exec,
        v: &RunViews,
        ctx: &OpCtx,
    ) -> Result<Vec<Dispatched>> {
        let (world, h, d) = (self.group.size(), self.spec.heads, self.spec.dim);
        let lse_all = prefix(&self.lse_all, &[world, v.batch, h]);
        let corrected = prefix(&self.corrected, &[h, v.batch, d]);
        let gathered = self
            .group
            .collective(Collective::AllGather, &v.lse, &lse_all, None, imp)?;
        self.group.device().dcp_correct(
            exec,
            &DcpCorrect {
                shape: v.shape,
                partial: mem_ref(&v.partial),
                lse_all: mem_ref(&lse_all),
                corrected: mem_ref(&corrected),
                merged_lse: v.merged.as_ref().map(mem_ref),
                ctx: ctx.clone(),
            },
        )?;
        let mut keep = vec![&v.partial.buf, &lse_all.buf, &corrected.buf];
        if let Some(m) = &v.merged {
            keep.push(&m.buf);
        }
        self.group.keep_alive(exec, &keep, ctx)?;
        let scattered = self.group.collective(
            Collective::ReduceScatter(ReduceOp::Sum),
            &corrected,
            &v.out,
            None,
            imp,
        )?;
        Ok(vec![gathered, scattered])
    }

    /// The fused kernel: one launch per rank over the workspace in this group's windows.
    fn run_fused(&self, exec: Exec, v: &RunViews, ctx: &OpCtx) -> Result<()> {
        let ws = self.workspace.as_ref();
        self.group.backend().dcp_fused(
            exec,
            &DcpFused {
                shape: v.shape,
                partial: mem_ref(&v.partial),
                lse: mem_ref(&v.lse),
                out: mem_ref(&v.out),
                merged_lse: v.merged.as_ref().map(mem_ref),
                workspace_symm: ws.and_then(|w| self.group.symm_location(w)),
                slot_bytes: self.slot_bytes,
                ctx: ctx.clone(),
            },
        )?;
        let mut keep = vec![&v.partial.buf, &v.lse.buf, &v.out.buf];
        if let Some(m) = &v.merged {
            keep.push(&m.buf);
        }
        if let Some(w) = ws {
            keep.push(&w.buf);
        }
        self.group.keep_alive(exec, &keep, ctx)
    }
}

/// One run's views of a combine's buffers: `partial` `[B, H, D]`, `lse` `[B, H]`, `out`
/// `[H/N, B, D]` and `merged` `[B, H/N]`, for `batch` = B tokens.
struct RunViews {
    batch: usize,
    shape: DcpShape,
    partial: Tensor,
    lse: Tensor,
    out: Tensor,
    merged: Option<Tensor>,
}
