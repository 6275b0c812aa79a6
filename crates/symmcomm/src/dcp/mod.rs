//! Decode context parallelism (DCP): every rank of a DCP group holds a shard of each request's
//! KV cache ([`KvSharding`]), gathers the queries of all the group's heads ([`DcpQGather`]),
//! attends over its shard, and the partial results are merged exactly ([`DcpCombine`]): by the
//! all-gather / correct / reduce-scatter sequence of SGLang's DCP (`cp_lse_ag_out_rs`) on NCCL or our
//! kernels, or by one fused kernel per rank that exchanges the partials over NVLink.
//!
//! Layouts are head-major wherever a collective runs, so that every collective is a contiguous
//! dim-0 operation and its results are views: q is gathered as `[H, B, rope + nope]`, the
//! merged output is `[H/N, B, D]` (rank r owns heads `[r·H/N, (r+1)·H/N)`). The maths, the LSE
//! bases and the empty-shard rules are with [`merge_reference`] and [`LseBase`].

mod combine;
mod q_gather;
mod shard;

pub use crate::lse::{LseBase, MergedHeads, merge_reference, merge_weights, sanitize_lse};
pub use combine::{CombineImpl, CombineRun, CombineSpec, DcpCombine, fused_slot_bytes};
pub use q_gather::{DcpQGather, GatheredQ, QGatherSpec};
pub use shard::KvSharding;
