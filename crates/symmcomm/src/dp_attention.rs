//! DP attention's gathered buffer: attention runs per DP rank on that rank's own tokens, the
//! MLP/MoE over every rank's tokens. Before the MLP the ranks' hidden states are gathered into
//! one buffer; after it each rank takes its own rows back, summed over ranks.
//!
//! Two padding modes (SGLang's `DpPaddingMode`):
//! - **MAX_LEN**: every rank pads to `M = max_r b_r` rows; gather = all-gather of `[M, hidden]`
//!   into `[N·M, hidden]`, scatter = reduce-scatter of `[N·M, hidden]` back to `[M, hidden]`.
//!   Rank `r`'s rows lie at `r·M .. r·M + b_r`.
//! - **SUM_LEN**: a zeroed `[Σ b_r, hidden]` buffer, this rank's rows copied in at its offset
//!   `Σ_{q<r} b_q`, all-reduce; scatter = all-reduce, then this rank's slice.
//!
//! The rule: MAX_LEN when `Σb · 2 ≥ max · N` (ties go to MAX_LEN) and always under CUDA graphs.
//!
//! Symmetric memory needs every rank to make the same allocations. The API makes that hold by
//! construction: a [`DpGatheredBuffer`] is allocated once, at a capacity every rank must agree
//! on (checked when it is created), and per-step token counts enter only as [`TokenCounts`],
//! which can only be obtained from an exchange of every rank's count over the group. Nothing is
//! allocated per step, so no rank's local count can size anything.

use std::fmt;
use std::ops::Range;

use crate::backend::{Collective, Impl};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Op, OpCtx, Result};
use crate::group::{Dispatched, Group};
use crate::tensor::Tensor;

/// How the ranks' rows are laid out in the gathered buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DpPaddingMode {
    /// Every rank pads to the largest count: all-gather and reduce-scatter.
    MaxLen,
    /// Rows packed back to back: zeroed buffer plus all-reduce, then a slice.
    SumLen,
}

impl DpPaddingMode {
    /// SGLang's rule: MAX_LEN when `sum · 2 ≥ max · dp` (ties go to MAX_LEN, which allows
    /// symmetric memory), and always inside a CUDA graph (whose shapes are fixed).
    pub fn choose(counts: &[usize], cuda_graph: bool) -> Self {
        let max = counts.iter().copied().max().unwrap_or(0);
        let sum: usize = counts.iter().sum();
        if cuda_graph || sum * 2 >= max * counts.len() {
            DpPaddingMode::MaxLen
        } else {
            DpPaddingMode::SumLen
        }
    }

    /// `max_len` or `sum_len`.
    pub fn name(self) -> &'static str {
        match self {
            DpPaddingMode::MaxLen => "max_len",
            DpPaddingMode::SumLen => "sum_len",
        }
    }
}

impl fmt::Display for DpPaddingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every rank's token count for one step, as the group agreed on it. The only way to get one
/// is [`TokenCounts::exchange`], a collective exchange of every rank's own count, so every
/// rank holds the same values.
#[derive(Clone)]
pub struct TokenCounts {
    group: Group,
    counts: Vec<usize>,
}

impl fmt::Debug for TokenCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenCounts({} {:?})", self.group.label(), self.counts)
    }
}

impl TokenCounts {
    /// Exchange this rank's token count with every rank of `group` (collective, host-side).
    pub fn exchange(group: &Group, local: usize) -> Result<Self> {
        let all = group
            .control()
            .all_gather("dp token counts", &(local as u64).to_le_bytes())?;
        let mut counts = Vec::with_capacity(all.len());
        for (r, b) in all.iter().enumerate() {
            let b = <[u8; 8]>::try_from(b.as_slice()).map_err(|_| Error::InvalidArgument {
                ctx: ctx_of(group, Op::DpGather, 0),
                detail: format!("rank {r} sent a malformed token count ({} bytes)", b.len()),
            })?;
            counts.push(u64::from_le_bytes(b) as usize);
        }
        Ok(TokenCounts {
            group: group.clone(),
            counts,
        })
    }

    /// Every rank's count, in group rank order.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// This rank's count.
    pub fn local(&self) -> usize {
        self.counts[self.group.rank()]
    }

    /// The largest count.
    pub fn max(&self) -> usize {
        self.counts.iter().copied().max().unwrap_or(0)
    }

    /// The sum of the counts.
    pub fn sum(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Rows of the ranks before `rank`: where its rows start in SUM_LEN mode.
    pub fn offset(&self, rank: usize) -> usize {
        self.counts[..rank].iter().sum()
    }

    /// The group the counts were agreed on.
    pub fn group(&self) -> &Group {
        &self.group
    }
}

/// One step's plan: the agreed counts and the padding mode.
#[derive(Clone, Debug)]
pub struct DpStep {
    counts: TokenCounts,
    mode: DpPaddingMode,
}

impl DpStep {
    /// The mode by SGLang's rule ([`DpPaddingMode::choose`]); `cuda_graph` when the step will
    /// be captured into a graph.
    pub fn new(counts: TokenCounts, cuda_graph: bool) -> Self {
        let mode = DpPaddingMode::choose(&counts.counts, cuda_graph);
        DpStep { counts, mode }
    }

    /// A step with a mode chosen by the caller.
    pub fn with_mode(counts: TokenCounts, mode: DpPaddingMode) -> Self {
        DpStep { counts, mode }
    }

    /// The padding mode.
    pub fn mode(&self) -> DpPaddingMode {
        self.mode
    }

    /// The agreed counts.
    pub fn counts(&self) -> &TokenCounts {
        &self.counts
    }

    /// Rows of the gathered buffer: `N · max` (MAX_LEN) or `Σ counts` (SUM_LEN).
    pub fn global_rows(&self) -> usize {
        match self.mode {
            DpPaddingMode::MaxLen => self.counts.counts.len() * self.counts.max(),
            DpPaddingMode::SumLen => self.counts.sum(),
        }
    }

    /// Rows of this rank's send and receive buffers: `max` (MAX_LEN, padded) or its own count.
    pub fn local_rows(&self) -> usize {
        match self.mode {
            DpPaddingMode::MaxLen => self.counts.max(),
            DpPaddingMode::SumLen => self.counts.local(),
        }
    }

    /// Where `rank`'s tokens lie in the gathered buffer.
    pub fn rows_of(&self, rank: usize) -> Range<usize> {
        let start = match self.mode {
            DpPaddingMode::MaxLen => rank * self.counts.max(),
            DpPaddingMode::SumLen => self.counts.offset(rank),
        };
        start..start + self.counts.counts[rank]
    }
}

/// What a gathered buffer is created for. Every rank must pass the same values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DpBufferSpec {
    /// Hidden size (elements per token row).
    pub hidden: usize,
    /// Element type of the hidden states.
    pub dtype: DType,
    /// The most tokens any rank may hold in one step (the padded `M` of MAX_LEN).
    pub max_tokens_per_rank: usize,
    /// Put the buffers in the group's symmetric pool (where the policy allows it).
    pub symmetric: bool,
}

/// A result of [`DpGatheredBuffer::gather`] or [`DpGatheredBuffer::scatter`]: the view it
/// produced, and what ran.
#[derive(Clone, Debug)]
pub struct DpOutput {
    /// The gathered `[global_rows, hidden]` view, or this rank's `[count, hidden]` rows.
    pub tensor: Tensor,
    /// The collective that ran (`None` when every rank had zero tokens).
    pub ran: Option<Dispatched>,
}

/// The gathered buffer of DP attention, with this rank's send and receive buffers: allocated
/// once, at a capacity every rank agreed on, the same size on every rank.
#[derive(Clone, Debug)]
pub struct DpGatheredBuffer {
    group: Group,
    spec: DpBufferSpec,
    /// `[capacity, hidden]`: what this rank contributes (attention output, padded).
    local_in: Tensor,
    /// `[N · capacity, hidden]`: every rank's rows.
    global: Tensor,
    /// `[capacity, hidden]`: this rank's rows after the scatter.
    local_out: Tensor,
}

fn ctx_of(group: &Group, op: Op, bytes: usize) -> OpCtx {
    OpCtx {
        op,
        group: group.label().to_string(),
        rank: group.rank(),
        world: group.size(),
        bytes,
    }
}

fn rows(t: &Tensor, start: usize, len: usize) -> Tensor {
    t.narrow(0, start, len)
        .expect("row range checked against the capacity")
}

impl DpGatheredBuffer {
    /// Allocate the buffers on every rank of `group` (collective). Every rank must pass the
    /// same `spec`; a rank that does not gets [`Error::Disagreement`] naming the first rank
    /// that differs, and nothing is allocated.
    pub fn new(group: &Group, spec: DpBufferSpec) -> Result<Self> {
        let world = group.size();
        let bytes = spec.max_tokens_per_rank * spec.hidden * spec.dtype.size() * world;
        let ctx = || ctx_of(group, Op::DpGather, bytes);
        let fields = |s: &DpBufferSpec| {
            [
                ("hidden size", s.hidden.to_string()),
                ("dtype", s.dtype.to_string()),
                ("max tokens per rank", s.max_tokens_per_rank.to_string()),
                ("symmetric placement", s.symmetric.to_string()),
            ]
        };
        let mine = fields(&spec);
        let wire = mine
            .iter()
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join("|");
        let all = group
            .control()
            .all_gather("dp gathered buffer spec", wire.as_bytes())?;
        for (r, theirs) in all.iter().enumerate() {
            let theirs = String::from_utf8_lossy(theirs);
            for ((what, m), t) in mine.iter().zip(theirs.split('|')) {
                if m != t {
                    return Err(Error::Disagreement {
                        ctx: ctx(),
                        what: format!("the DP gathered buffer's {what}"),
                        mine: m.clone(),
                        other_rank: r,
                        theirs: t.to_string(),
                    });
                }
            }
        }
        if spec.hidden == 0 || spec.max_tokens_per_rank == 0 {
            return Err(Error::InvalidArgument {
                ctx: ctx(),
                detail: format!(
                    "a DP gathered buffer needs a hidden size and a capacity of at least 1 (got {} and {})",
                    spec.hidden, spec.max_tokens_per_rank
                ),
            });
        }
        let scope = group.scope(!spec.symmetric);
        let cap = spec.max_tokens_per_rank;
        let local_in = scope.alloc(spec.dtype, &[cap, spec.hidden])?;
        let global = scope.alloc(spec.dtype, &[world * cap, spec.hidden])?;
        let local_out = scope.alloc(spec.dtype, &[cap, spec.hidden])?;
        Ok(DpGatheredBuffer {
            group: group.clone(),
            spec,
            local_in,
            global,
            local_out,
        })
    }

    /// This buffer with its gathers and scatters enqueued on `stream` (the same memory; see
    /// [`Group::on`]).
    pub fn on(&self, stream: &crate::Stream) -> Result<Self> {
        Ok(DpGatheredBuffer {
            group: self.group.on(stream)?,
            ..self.clone()
        })
    }

    /// What the buffer was created for.
    pub fn spec(&self) -> DpBufferSpec {
        self.spec
    }

    /// Whether the buffers lie in the group's symmetric windows.
    pub fn is_symmetric(&self) -> bool {
        self.global.is_symmetric()
    }

    /// Check that `step` was agreed on this buffer's group and fits its capacity.
    fn check(&self, step: &DpStep, op: Op) -> Result<()> {
        let ctx = || {
            ctx_of(
                &self.group,
                op,
                step.global_rows() * self.spec.hidden * self.spec.dtype.size(),
            )
        };
        if !step.counts.group.same_group(&self.group) {
            return Err(Error::InvalidArgument {
                ctx: ctx(),
                detail: format!(
                    "token counts agreed on {} used with a buffer of {}",
                    step.counts.group.label(),
                    self.group.label()
                ),
            });
        }
        if step.counts.max() > self.spec.max_tokens_per_rank {
            let worst = step
                .counts
                .counts
                .iter()
                .position(|&c| c == step.counts.max())
                .unwrap_or(0);
            return Err(Error::CapacityExceeded {
                ctx: ctx(),
                what: format!("rank {worst}'s token count"),
                needed: step.counts.max(),
                capacity: self.spec.max_tokens_per_rank,
            });
        }
        if step.mode == DpPaddingMode::SumLen && self.group.capturing()? {
            return Err(Error::InvalidArgument {
                ctx: ctx(),
                detail: "SUM_LEN bakes every rank's count into the graph; graphs use MAX_LEN"
                    .into(),
            });
        }
        Ok(())
    }

    /// This rank's `[count, hidden]` rows of the send buffer: write the attention output here
    /// (no copy before the gather).
    pub fn local_input(&self, step: &DpStep) -> Result<Tensor> {
        self.check(step, Op::DpGather)?;
        Ok(rows(&self.local_in, 0, step.counts.local()))
    }

    /// The send buffer as the gather reads it: `[local_rows, hidden]` (padding rows included in
    /// MAX_LEN; their contents are whatever was there).
    pub fn padded_input(&self, step: &DpStep) -> Result<Tensor> {
        self.check(step, Op::DpGather)?;
        Ok(rows(&self.local_in, 0, step.local_rows()))
    }

    /// The gathered `[global_rows, hidden]` view: rank `r`'s rows at [`DpStep::rows_of`].
    pub fn gathered(&self, step: &DpStep) -> Result<Tensor> {
        self.check(step, Op::DpGather)?;
        Ok(rows(&self.global, 0, step.global_rows()))
    }

    /// This rank's `[count, hidden]` rows after the scatter.
    pub fn local_output(&self, step: &DpStep) -> Result<Tensor> {
        self.check(step, Op::DpScatter)?;
        Ok(rows(&self.local_out, 0, step.counts.local()))
    }

    /// The receive buffer as the scatter writes it: `[local_rows, hidden]`.
    pub fn padded_output(&self, step: &DpStep) -> Result<Tensor> {
        self.check(step, Op::DpScatter)?;
        Ok(rows(&self.local_out, 0, step.local_rows()))
    }

    /// Copy `src` (`[count, hidden]`) into this rank's send rows: for inputs that were not
    /// written into [`DpGatheredBuffer::local_input`] directly.
    pub fn stage_input(&self, step: &DpStep, src: &Tensor) -> Result<()> {
        let dst = self.local_input(step)?;
        self.group.copy(src, &dst)
    }

    /// Gather every rank's rows into the gathered buffer (collective); `imp` as for
    /// [`Group::collective`]. Returns the `[global_rows, hidden]` view.
    pub fn gather(&self, step: &DpStep, imp: Impl) -> Result<DpOutput> {
        self.check(step, Op::DpGather)?;
        let global = rows(&self.global, 0, step.global_rows());
        if step.global_rows() == 0 {
            return Ok(DpOutput {
                tensor: global,
                ran: None,
            });
        }
        let ran = match step.mode {
            DpPaddingMode::MaxLen => {
                let send = rows(&self.local_in, 0, step.local_rows());
                self.group
                    .collective(Collective::AllGather, &send, &global, None, imp)?
            }
            DpPaddingMode::SumLen => {
                let rank = self.group.rank();
                self.group.zero(&global)?;
                let mine = step.rows_of(rank);
                self.group.copy(
                    &rows(&self.local_in, 0, mine.len()),
                    &rows(&self.global, mine.start, mine.len()),
                )?;
                self.group.collective(
                    Collective::AllReduce(ReduceOp::Sum),
                    &global,
                    &global,
                    None,
                    imp,
                )?
            }
        };
        Ok(DpOutput {
            tensor: global,
            ran: Some(ran),
        })
    }

    /// Reduce the gathered buffer (the MLP's partial sums, written there in place) across ranks
    /// and keep this rank's rows (collective). Returns this rank's `[count, hidden]` rows.
    pub fn scatter(&self, step: &DpStep, imp: Impl) -> Result<DpOutput> {
        self.check(step, Op::DpScatter)?;
        let partial = rows(&self.global, 0, step.global_rows());
        self.scatter_from(step, &partial, imp)
    }

    /// Reduce `partial` (`[global_rows, hidden]`, laid out like the gathered buffer) across
    /// ranks and keep this rank's rows (collective).
    pub fn scatter_from(&self, step: &DpStep, partial: &Tensor, imp: Impl) -> Result<DpOutput> {
        self.check(step, Op::DpScatter)?;
        if partial.dtype() != self.spec.dtype {
            return Err(Error::DTypeMismatch {
                ctx: ctx_of(&self.group, Op::DpScatter, partial.bytes()),
                input: partial.dtype(),
                output: self.spec.dtype,
            });
        }
        let want = [step.global_rows(), self.spec.hidden];
        if partial.shape() != want {
            return Err(Error::ShapeMismatch {
                ctx: ctx_of(&self.group, Op::DpScatter, partial.bytes()),
                expected: want.to_vec(),
                got: partial.shape().to_vec(),
            });
        }
        let out = rows(&self.local_out, 0, step.counts.local());
        if step.global_rows() == 0 {
            return Ok(DpOutput {
                tensor: out,
                ran: None,
            });
        }
        let ran = match step.mode {
            DpPaddingMode::MaxLen => {
                let recv = rows(&self.local_out, 0, step.local_rows());
                self.group.collective(
                    Collective::ReduceScatter(ReduceOp::Sum),
                    partial,
                    &recv,
                    None,
                    imp,
                )?
            }
            DpPaddingMode::SumLen => {
                let global = rows(&self.global, 0, step.global_rows());
                let ran = self.group.collective(
                    Collective::AllReduce(ReduceOp::Sum),
                    partial,
                    &global,
                    None,
                    imp,
                )?;
                let mine = step.rows_of(self.group.rank());
                self.group
                    .copy(&rows(&self.global, mine.start, mine.len()), &out)?;
                ran
            }
        };
        Ok(DpOutput {
            tensor: out,
            ran: Some(ran),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_rule_follows_sglang() {
        use DpPaddingMode::*;
        // Balanced: MAX_LEN.
        assert_eq!(DpPaddingMode::choose(&[4, 4, 4, 4], false), MaxLen);
        // sum 8, max 8, dp 2: 16 >= 16, the tie goes to MAX_LEN.
        assert_eq!(DpPaddingMode::choose(&[8, 0], false), MaxLen);
        // sum 9, max 8, dp 4: 18 < 32: SUM_LEN.
        assert_eq!(DpPaddingMode::choose(&[8, 1, 0, 0], false), SumLen);
        // Under a CUDA graph always MAX_LEN.
        assert_eq!(DpPaddingMode::choose(&[8, 1, 0, 0], true), MaxLen);
        // Nobody has tokens: MAX_LEN (0 >= 0).
        assert_eq!(DpPaddingMode::choose(&[0, 0, 0], false), MaxLen);
    }
}
