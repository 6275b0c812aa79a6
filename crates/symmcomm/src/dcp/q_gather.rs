//! The query gather of DCP decode: each rank writes `[q_pe | q_nope]` of its `H/N` heads
//! straight into a head-major send buffer `[H/N, B, rope + nope]` (rope first: 64 + 512 = 576
//! for DeepSeek-V3), and one all-gather along dim 0 gives every rank `[H, B, rope + nope]`, heads
//! rank-major (the order the combine's reduce-scatter gives back). The parts the attention reads
//! are views into the gathered buffer, not copies.

use crate::backend::{Collective, Impl};
use crate::dtype::DType;
use crate::error::{Error, Op, Result};
use crate::group::{Dispatched, Group};
use crate::tensor::{Layout, Tensor};

/// The fixed shape of a q gather.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QGatherSpec {
    /// Most tokens a gather moves.
    pub batch_max: usize,
    /// Heads of one rank (`H/N`; 128 / TP for DeepSeek-V3).
    pub heads_local: usize,
    /// Width of the rotary part, first in each row (`qk_rope_head_dim` = 64).
    pub rope_dim: usize,
    /// Width of the no-rope part, after it (`kv_lora_rank` = 512 after absorbing `W_UK`).
    pub nope_dim: usize,
    /// Element type.
    pub dtype: DType,
}

impl QGatherSpec {
    /// Values per head row: `rope_dim + nope_dim`.
    pub fn width(&self) -> usize {
        self.rope_dim + self.nope_dim
    }
}

/// The gathered queries: views into the gather's output buffer.
#[derive(Clone, Debug)]
pub struct GatheredQ {
    /// `[H, B, rope + nope]`, contiguous.
    pub q: Tensor,
    /// `[H, B, rope]`: the first `rope` values of each row (strided).
    pub q_pe: Tensor,
    /// `[H, B, nope]`: the rest of each row (strided).
    pub q_nope: Tensor,
    /// What ran the all-gather, and why.
    pub dispatched: Dispatched,
}

/// A q gather on one rank of a DCP group: its send and gathered buffers, made once.
#[derive(Clone, Debug)]
pub struct DcpQGather {
    group: Group,
    spec: QGatherSpec,
    send: Tensor,
    gathered: Tensor,
}

fn prefix(t: &Tensor, shape: &[usize]) -> Tensor {
    Tensor {
        buf: t.buf.clone(),
        dtype: t.dtype,
        layout: Layout::contiguous(shape),
    }
}

impl DcpQGather {
    /// Allocate the send buffer `[H/N, batch_max, W]` and the gathered buffer
    /// `[H, batch_max, W]` where `group.scope(scope_disabled)` puts them (windows when the
    /// policy allows). Collective: every rank, same spec, outside graph capture.
    pub fn new(group: &Group, spec: QGatherSpec, scope_disabled: bool) -> Result<Self> {
        if spec.batch_max == 0 || spec.heads_local == 0 || spec.width() == 0 {
            return Err(Error::InvalidArgument {
                ctx: group.ctx(Op::AllGather, 0),
                detail: format!("a q gather needs nonzero batch_max, heads and width: {spec:?}"),
            });
        }
        let scope = group.scope(scope_disabled);
        let w = spec.width();
        let send = scope.alloc(spec.dtype, &[spec.heads_local, spec.batch_max, w])?;
        let gathered = scope.alloc(
            spec.dtype,
            &[group.size() * spec.heads_local, spec.batch_max, w],
        )?;
        Ok(DcpQGather {
            group: group.clone(),
            spec,
            send,
            gathered,
        })
    }

    /// This gather enqueued on `stream` (the same buffers; see [`Group::on`]).
    pub fn on(&self, stream: &crate::Stream) -> Result<Self> {
        Ok(DcpQGather {
            group: self.group.on(stream)?,
            ..self.clone()
        })
    }

    /// The spec.
    pub fn spec(&self) -> &QGatherSpec {
        &self.spec
    }

    fn check_batch(&self, batch: usize) -> Result<()> {
        if batch > self.spec.batch_max {
            return Err(Error::InvalidArgument {
                ctx: self.group.ctx(Op::AllGather, 0),
                detail: format!(
                    "batch {batch} exceeds the q gather's batch_max {}",
                    self.spec.batch_max
                ),
            });
        }
        Ok(())
    }

    /// Where this rank writes its queries for `batch` tokens: `[H/N, batch, rope + nope]`,
    /// contiguous, rope values first in each row.
    pub fn send(&self, batch: usize) -> Result<Tensor> {
        self.check_batch(batch)?;
        Ok(prefix(
            &self.send,
            &[self.spec.heads_local, batch, self.spec.width()],
        ))
    }

    /// The two parts of [`DcpQGather::send`] as views: `[H/N, batch, rope]` and
    /// `[H/N, batch, nope]`, for producers that write `q_pe` and `q_nope` separately.
    pub fn send_parts(&self, batch: usize) -> Result<(Tensor, Tensor)> {
        let s = self.send(batch)?;
        Ok(split(&s, self.spec.rope_dim, self.spec.nope_dim))
    }

    /// All-gather `batch` tokens' queries along heads with `imp` (every rank calls it with the
    /// same batch; capturable in a graph).
    pub fn gather(&self, batch: usize, imp: Impl) -> Result<GatheredQ> {
        let send = self.send(batch)?;
        let q = prefix(
            &self.gathered,
            &[
                self.group.size() * self.spec.heads_local,
                batch,
                self.spec.width(),
            ],
        );
        let dispatched = self
            .group
            .collective(Collective::AllGather, &send, &q, Some(0), imp)?;
        let (q_pe, q_nope) = split(&q, self.spec.rope_dim, self.spec.nope_dim);
        Ok(GatheredQ {
            q,
            q_pe,
            q_nope,
            dispatched,
        })
    }
}

fn split(t: &Tensor, rope: usize, nope: usize) -> (Tensor, Tensor) {
    (
        t.narrow(2, 0, rope).expect("rope part within the row"),
        t.narrow(2, rope, nope).expect("nope part within the row"),
    )
}
