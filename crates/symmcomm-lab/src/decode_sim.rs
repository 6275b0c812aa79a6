//! `symmcomm decode-sim`: the communication of one decode step of a DeepSeek-V3-shaped model,
//! replayed in one CUDA graph, under three parallel configurations over the `N` ranks of a
//! group:
//!
//! - `tp` (TP = N): per layer the attention `o_proj` all-reduce and the MoE/MLP all-reduce of
//!   `[B, hidden]`.
//! - `dp_attn` (DP attention over N, `attn_tp = 1`, MAX_LEN): per layer the gather of every
//!   rank's `[M, hidden]` into `[N·M, hidden]` and the reduce-scatter back, through
//!   [`DpGatheredBuffer`]. Rank `r` holds `B − ⌊r·B / 2N⌋` tokens, so counts differ and
//!   `M = B`.
//! - `dcp` (TP = DCP = N): per layer the all-gather of `q` `[H/N, B, kv_lora + rope]` along
//!   heads, the DCP combine after the partial attention (a [`DcpCombine`] of the bf16 partial
//!   outputs `[B, H, kv_lora]` and the base-2 f32 LSEs `[B, H]`: all-gather of the LSEs →
//!   correction → reduce-scatter along heads, or the fused kernel under `auto`), and the two TP
//!   all-reduces of `[B, hidden]`.
//!
//! `B` is the batch every rank's attention holds (in `dp_attn`, the largest rank's). Each layer
//! writes its own outputs (in `dcp`, each layer has its own combine), so after a replay every
//! collective of the step can be checked: the collectives against the f64 reference of
//! [`verify`], the combines against [`merge_reference`] of the partial outputs and LSEs
//! uploaded (with empty shards and a padding row). The inputs are fresh random values before
//! the first and the last replay, and both are checked. Compute is left out, except for an
//! optional stand-in kernel that spins for a set time before each collective.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::bench::{self, Mode, Results, Row, Variant};
use crate::verify::{self, Case};
use symmcomm::Group;
use symmcomm::Tensor;
use symmcomm::dcp::{CombineImpl, CombineRun, CombineSpec, DcpCombine, merge_reference};
use symmcomm::dp_attention::{DpBufferSpec, DpGatheredBuffer, DpPaddingMode, DpStep, TokenCounts};
use symmcomm::lab::fill::splitmix64;
use symmcomm::{BackendKind, Collective, Impl};
use symmcomm::{Communicator, Graph};
use symmcomm::{DType, ReduceOp};
use symmcomm::{Error, Op, OpCtx, Result};

/// The op name of decode-step rows in the results file.
pub const DECODE_STEP_OP: &str = "decode_step";

/// The model dimensions the step's shapes follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelDims {
    /// Preset name (`deepseek-v3`, `tiny`, or `custom` after overrides).
    pub name: String,
    /// Hidden size.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLA latent rank (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// RoPE part of q and k (`qk_rope_head_dim`).
    pub rope_dim: usize,
    /// Layers.
    pub layers: usize,
}

impl ModelDims {
    /// DeepSeek-V3: hidden 7168, 128 heads, kv_lora_rank 512, rope 64, 61 layers.
    pub fn deepseek_v3() -> Self {
        ModelDims {
            name: "deepseek-v3".into(),
            hidden: 7168,
            heads: 128,
            kv_lora_rank: 512,
            rope_dim: 64,
            layers: 61,
        }
    }

    /// A small model with the same structure, for tests and CI.
    pub fn tiny() -> Self {
        ModelDims {
            name: "tiny".into(),
            hidden: 256,
            heads: 8,
            kv_lora_rank: 32,
            rope_dim: 8,
            layers: 3,
        }
    }

    /// The preset called `name`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "deepseek-v3" => Some(Self::deepseek_v3()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    /// Elements of one head's q as gathered for MLA decode (`kv_lora_rank + rope`: 576).
    pub fn q_dim(&self) -> usize {
        self.kv_lora_rank + self.rope_dim
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "{} (hidden {}, {} heads, kv_lora_rank {}, rope {}, {} layers)",
            self.name, self.hidden, self.heads, self.kv_lora_rank, self.rope_dim, self.layers
        )
    }
}

/// The parallel configuration of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepConfig {
    /// Tensor parallel over every rank.
    Tp,
    /// DP attention over every rank, MAX_LEN padding.
    DpAttn,
    /// Tensor parallel plus decode context parallel over every rank.
    Dcp,
}

impl StepConfig {
    /// Every configuration.
    pub const ALL: [StepConfig; 3] = [StepConfig::Tp, StepConfig::DpAttn, StepConfig::Dcp];

    /// `tp`, `dp_attn`, `dcp`.
    pub fn name(self) -> &'static str {
        match self {
            StepConfig::Tp => "tp",
            StepConfig::DpAttn => "dp_attn",
            StepConfig::Dcp => "dcp",
        }
    }

    /// Parse a name.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown config {s:?} (tp, dp_attn, dcp)"))
    }
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimSpec {
    /// Model dimensions.
    pub model: ModelDims,
    /// Configurations.
    pub configs: Vec<StepConfig>,
    /// Batch sizes (tokens per rank's attention).
    pub batches: Vec<usize>,
    /// Implementations and placements (`nccl` on plain memory, the others on windows).
    pub impls: Vec<Variant>,
    /// Untimed replays before timing.
    pub warmup: usize,
    /// Replays per timed region.
    pub replays: usize,
    /// Timed regions; the median is reported.
    pub repeats: usize,
    /// A stand-in compute kernel of this many µs before each collective.
    pub compute_us: Option<f64>,
    /// Seed of the inputs.
    pub seed: u64,
}

impl SimSpec {
    /// Every configuration at batches 1, 8, 32, 64 with the usual repetitions.
    pub fn new(model: ModelDims, impls: Vec<Variant>) -> Self {
        SimSpec {
            model,
            configs: StepConfig::ALL.to_vec(),
            batches: vec![1, 8, 32, 64],
            impls,
            warmup: 3,
            replays: 10,
            repeats: 7,
            compute_us: None,
            seed: 0xDEC0DE,
        }
    }
}

/// A collective's output and the input whose every-rank values it must reduce or gather.
struct Output {
    tensor: Tensor,
    coll: Collective,
    input: usize,
}

/// One layer's buffers.
enum Layer {
    Tp {
        attn_out: Tensor,
        moe_out: Tensor,
    },
    DpAttn {
        buf: DpGatheredBuffer,
    },
    Dcp {
        q_all: Tensor,
        /// This layer's combine: its own partial inputs and merged output (boxed: it is several
        /// times the other variants' size).
        combine: Box<DcpCombine>,
        attn_out: Tensor,
        moe_out: Tensor,
    },
}

/// One implementation's step at one (config, batch): buffers, graph, samples.
struct Prepared {
    variant: Variant,
    batch: usize,
    /// How the `dcp` layers' combines run (`None` in the other configurations).
    combine_imp: Option<CombineImpl>,
    /// Filled with fresh values before each checked replay (the combines' inputs are filled
    /// separately).
    inputs: Vec<Tensor>,
    /// Poisoned before each checked replay and compared after it (the combines' outputs are
    /// poisoned and compared separately).
    outputs: Vec<Output>,
    layers: Vec<Layer>,
    dp_step: Option<DpStep>,
    spin: Option<Tensor>,
    graph: Option<Graph>,
    /// Per collective, the implementations that ran.
    ran: BTreeMap<&'static str, BTreeSet<String>>,
    samples: Vec<f64>,
    wrong: usize,
}

impl Prepared {
    /// The `dcp` layers' combines, in layer order (none in the other configurations).
    fn combines(&self) -> impl Iterator<Item = &DcpCombine> {
        self.layers.iter().filter_map(|l| match l {
            Layer::Dcp { combine, .. } => Some(combine.as_ref()),
            _ => None,
        })
    }
}

/// The shape of every `dcp` layer's combine: all `H` gathered heads of `kv_lora_rank` values,
/// bf16 partial outputs and merged heads, base-2 f32 LSEs (DeepSeek-V3's MLA decode, as the
/// DCP benchmark runs it); the fused kernel's workspace only where it may run (`auto`).
fn combine_spec(m: &ModelDims, batch: usize, fused: bool) -> CombineSpec {
    CombineSpec {
        heads: m.heads,
        dim: m.kv_lora_rank,
        fused,
        ..CombineSpec::deepseek_v3(batch)
    }
}

/// The combine an implementation of the step runs: `auto` takes the fused kernel where it can
/// run and the sequence with `auto` collectives otherwise; every other implementation runs the
/// sequence with its own collectives (`nccl`: `Regular`, `nccl_symm`: `Symmetric`).
fn combine_impl(imp: Impl, combine: &DcpCombine) -> CombineImpl {
    match imp {
        Impl::Auto if combine.unavailable(CombineImpl::Fused).is_none() => CombineImpl::Fused,
        i => CombineImpl::Sequence(i),
    }
}

/// What a combine ran, for the row's `ran` text: `fused` (`host_fused`), or the sequence and
/// the implementations of its all-gather and reduce-scatter: `sequence(oneshot,nccl)`.
fn combine_ran(run: &CombineRun, imp: CombineImpl) -> String {
    match imp {
        CombineImpl::Fused => run.name.clone(),
        CombineImpl::Sequence(_) => format!(
            "sequence({})",
            run.collectives
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// The collectives of one layer: (collective, dtype, elements of the input, elements of the
/// output). For `dcp`, the combine counts as its sequence's all-gather of the f32 LSEs and
/// reduce-scatter of the corrected `[H, B, D]` outputs; the fused kernel moves the same partial
/// rows (every peer's heads) and LSEs, once.
fn layer_traffic(
    config: StepConfig,
    m: &ModelDims,
    batch: usize,
    world: usize,
) -> Vec<(Collective, DType, usize, usize)> {
    let ar = Collective::AllReduce(ReduceOp::Sum);
    let rs = Collective::ReduceScatter(ReduceOp::Sum);
    let ag = Collective::AllGather;
    let tokens = batch * m.hidden;
    match config {
        StepConfig::Tp => vec![(ar, DType::BF16, tokens, tokens); 2],
        StepConfig::DpAttn => vec![
            (ag, DType::BF16, tokens, world * tokens),
            (rs, DType::BF16, world * tokens, tokens),
        ],
        StepConfig::Dcp => {
            let hl = m.heads / world;
            let corrected = combine_spec(m, batch, false).out_dtype;
            vec![
                (
                    ag,
                    DType::BF16,
                    hl * batch * m.q_dim(),
                    m.heads * batch * m.q_dim(),
                ),
                (ag, DType::F32, batch * m.heads, world * batch * m.heads),
                (
                    rs,
                    corrected,
                    m.heads * batch * m.kv_lora_rank,
                    hl * batch * m.kv_lora_rank,
                ),
                (ar, DType::BF16, tokens, tokens),
                (ar, DType::BF16, tokens, tokens),
            ]
        }
    }
}

/// Why `config` cannot run on `world` ranks with `model`, if it cannot.
pub fn unsupported(config: StepConfig, model: &ModelDims, world: usize) -> Option<String> {
    match config {
        StepConfig::Dcp if !model.heads.is_multiple_of(world) => Some(format!(
            "dcp splits {} heads over {world} ranks: not divisible",
            model.heads
        )),
        StepConfig::Dcp if !model.kv_lora_rank.is_multiple_of(8) => Some(format!(
            "the DCP combine moves 8-element vectors: kv_lora_rank {} is not a multiple of 8",
            model.kv_lora_rank
        )),
        _ => None,
    }
}

fn ctx(group: &Group, bytes: usize) -> OpCtx {
    OpCtx {
        op: Op::Init,
        group: group.label().into(),
        rank: group.rank(),
        world: group.size(),
        bytes,
    }
}

fn alloc(group: &Group, windows: bool, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    if windows {
        group.alloc_symmetric(dtype, shape)
    } else {
        group.alloc_plain(dtype, shape)
    }
}

/// Tokens of `rank` in the `dp_attn` configuration at batch `batch`: uneven, the largest on
/// rank 0.
pub fn dp_tokens(rank: usize, world: usize, batch: usize) -> usize {
    batch - rank * batch / (2 * world)
}

/// The buffers of one step that depend on the configuration, as [`prepare`] builds them.
struct StepBuffers {
    inputs: Vec<Tensor>,
    outputs: Vec<Output>,
    layers: Vec<Layer>,
    dp_step: Option<DpStep>,
    combine_imp: Option<CombineImpl>,
}

impl StepBuffers {
    fn with_layers(layers: usize) -> Self {
        StepBuffers {
            inputs: Vec::new(),
            outputs: Vec::new(),
            layers: Vec::with_capacity(layers),
            dp_step: None,
            combine_imp: None,
        }
    }

    /// Record that `tensor` is the output of `coll` over the `input`-th input.
    fn output(&mut self, tensor: &Tensor, coll: Collective, input: usize) {
        self.outputs.push(Output {
            tensor: tensor.clone(),
            coll,
            input,
        });
    }
}

/// Allocate one implementation's buffers for `config` at `batch` (collective).
fn prepare(
    backend: BackendKind,
    group: &Group,
    spec: &SimSpec,
    config: StepConfig,
    batch: usize,
    variant: Variant,
) -> Result<Prepared> {
    let m = &spec.model;
    let bufs = match config {
        StepConfig::Tp => tp_buffers(group, m, batch, variant.windows)?,
        StepConfig::DpAttn => dp_attn_buffers(backend, group, m, batch, variant)?,
        StepConfig::Dcp => dcp_buffers(backend, group, m, batch, variant)?,
    };
    let spin = match spec.compute_us {
        Some(_) => Some(group.alloc_plain(DType::BF16, &[256])?),
        None => None,
    };
    Ok(Prepared {
        variant,
        batch,
        combine_imp: bufs.combine_imp,
        inputs: bufs.inputs,
        outputs: bufs.outputs,
        layers: bufs.layers,
        dp_step: bufs.dp_step,
        spin,
        graph: None,
        ran: BTreeMap::new(),
        samples: Vec::with_capacity(spec.repeats),
        wrong: 0,
    })
}

/// `tp`: the attention and MoE partial sums (inputs 0 and 1), and per layer the outputs of
/// their all-reduces.
fn tp_buffers(group: &Group, m: &ModelDims, batch: usize, w: bool) -> Result<StepBuffers> {
    let ar = Collective::AllReduce(ReduceOp::Sum);
    let mut b = StepBuffers::with_layers(m.layers);
    b.inputs
        .push(alloc(group, w, DType::BF16, &[batch, m.hidden])?);
    b.inputs
        .push(alloc(group, w, DType::BF16, &[batch, m.hidden])?);
    for _ in 0..m.layers {
        let attn_out = alloc(group, w, DType::BF16, &[batch, m.hidden])?;
        let moe_out = alloc(group, w, DType::BF16, &[batch, m.hidden])?;
        b.output(&attn_out, ar, 0);
        b.output(&moe_out, ar, 1);
        b.layers.push(Layer::Tp { attn_out, moe_out });
    }
    Ok(b)
}

/// `dp_attn`: this rank's uneven token count exchanged, the MoE's partial sums over the
/// gathered rows (input 0), and per layer a gathered buffer whose padded send rows are an input
/// and whose gathered rows and padded receive rows are outputs.
fn dp_attn_buffers(
    backend: BackendKind,
    group: &Group,
    m: &ModelDims,
    batch: usize,
    variant: Variant,
) -> Result<StepBuffers> {
    let w = variant.windows;
    let mut b = StepBuffers::with_layers(m.layers);
    let counts = TokenCounts::exchange(group, dp_tokens(group.rank(), group.size(), batch))?;
    let step = DpStep::new(counts, true);
    // The MoE's partial sums over the gathered rows, the same for every layer.
    b.inputs.push(alloc(
        group,
        w,
        DType::BF16,
        &[step.global_rows(), m.hidden],
    )?);
    let dp_spec = DpBufferSpec {
        hidden: m.hidden,
        dtype: DType::BF16,
        max_tokens_per_rank: batch,
        symmetric: w,
    };
    for _ in 0..m.layers {
        let buf = DpGatheredBuffer::new(group, dp_spec)?;
        if w && !buf.is_symmetric() {
            return Err(Error::InvalidArgument {
                ctx: ctx(group, 0),
                detail: format!(
                    "{} needs windows, but the policy put the DP buffer in plain memory ({:?})",
                    variant.name(backend),
                    group.placement(false)
                ),
            });
        }
        // Every row of the padded send buffer is filled, so the whole gathered buffer and the
        // whole padded receive buffer are defined.
        b.inputs.push(buf.padded_input(&step)?);
        let gathered_from = b.inputs.len() - 1;
        b.output(&buf.gathered(&step)?, Collective::AllGather, gathered_from);
        b.output(
            &buf.padded_output(&step)?,
            Collective::ReduceScatter(ReduceOp::Sum),
            0,
        );
        b.layers.push(Layer::DpAttn { buf });
    }
    b.dp_step = Some(step);
    Ok(b)
}

/// `dcp`: this rank's q heads and the two partial sums (inputs 0 to 2), and per layer the
/// gathered q, a combine of its own and the all-reduce outputs. Every layer's combine runs the
/// way the first one's chose ([`combine_impl`]); one that cannot is an error.
fn dcp_buffers(
    backend: BackendKind,
    group: &Group,
    m: &ModelDims,
    batch: usize,
    variant: Variant,
) -> Result<StepBuffers> {
    let w = variant.windows;
    let ar = Collective::AllReduce(ReduceOp::Sum);
    let (h, hl) = (m.heads, m.heads / group.size());
    let mut b = StepBuffers::with_layers(m.layers);
    b.inputs
        .push(alloc(group, w, DType::BF16, &[hl, batch, m.q_dim()])?);
    b.inputs
        .push(alloc(group, w, DType::BF16, &[batch, m.hidden])?);
    b.inputs
        .push(alloc(group, w, DType::BF16, &[batch, m.hidden])?);
    // One combine per layer, so that each layer's merged heads can be checked: 2·B·H·D bf16
    // (partial and corrected outputs) plus the merged heads, and with `auto` the fused kernel's
    // workspace (about B·H·D bf16 more, in windows). DeepSeek-V3 at B = 64, N = 8: 17 MiB per
    // layer on each rank (33 MiB with the workspace), 1 GiB per step (2 GiB).
    let cspec = combine_spec(m, batch, variant.imp == Impl::Auto);
    for _ in 0..m.layers {
        let q_all = alloc(group, w, DType::BF16, &[h, batch, m.q_dim()])?;
        let combine = Box::new(DcpCombine::new(group, cspec, !w)?);
        let imp = *b
            .combine_imp
            .get_or_insert_with(|| combine_impl(variant.imp, &combine));
        require_combine_runs(backend, group, variant, &combine, imp, batch)?;
        let attn_out = alloc(group, w, DType::BF16, &[batch, m.hidden])?;
        let moe_out = alloc(group, w, DType::BF16, &[batch, m.hidden])?;
        b.output(&q_all, Collective::AllGather, 0);
        b.output(&attn_out, ar, 1);
        b.output(&moe_out, ar, 2);
        b.layers.push(Layer::Dcp {
            q_all,
            combine,
            attn_out,
            moe_out,
        });
    }
    Ok(b)
}

/// An error when `combine` cannot run as `imp` (the step's combine implementation).
fn require_combine_runs(
    backend: BackendKind,
    group: &Group,
    variant: Variant,
    combine: &DcpCombine,
    imp: CombineImpl,
    batch: usize,
) -> Result<()> {
    match combine.unavailable(imp) {
        None => Ok(()),
        Some(why) => Err(Error::ImplUnavailable {
            ctx: group.ctx(Op::DcpCombine, combine.partial_bytes(batch)),
            implementation: format!(
                "{} (dcp_combine {})",
                variant.name(backend),
                imp.name(backend)
            ),
            why,
        }),
    }
}

/// Enqueue the collectives of one step (every layer) for `p`.
fn enqueue_step(group: &Group, spec: &SimSpec, p: &mut Prepared) -> Result<()> {
    let imp = p.variant.imp;
    // (op, the implementation that ran it)
    let mut ran: Vec<(&'static str, String)> = Vec::new();
    let compute = |spin: &Option<Tensor>| -> Result<()> {
        match (spin, spec.compute_us) {
            (Some(t), Some(us)) => {
                group.fill_random_early_release(t, 0, None, (us * 1e3).round() as u64)
            }
            _ => Ok(()),
        }
    };
    let ar = Collective::AllReduce(ReduceOp::Sum);
    for layer in &p.layers {
        match layer {
            Layer::Tp { attn_out, moe_out } => {
                compute(&p.spin)?;
                let d = group.collective(ar, &p.inputs[0], attn_out, None, imp)?;
                ran.push(("all_reduce", d.name()));
                compute(&p.spin)?;
                let d = group.collective(ar, &p.inputs[1], moe_out, None, imp)?;
                ran.push(("all_reduce", d.name()));
            }
            Layer::DpAttn { buf } => {
                let step = p.dp_step.as_ref().expect("dp_attn layers have a step");
                let (gather_op, scatter_op) = match step.mode() {
                    DpPaddingMode::MaxLen => ("all_gather", "reduce_scatter"),
                    DpPaddingMode::SumLen => ("all_reduce", "all_reduce"),
                };
                compute(&p.spin)?;
                if let Some(d) = buf.gather(step, imp)?.ran {
                    ran.push((gather_op, d.name()));
                }
                compute(&p.spin)?;
                if let Some(d) = buf.scatter_from(step, &p.inputs[0], imp)?.ran {
                    ran.push((scatter_op, d.name()));
                }
            }
            Layer::Dcp {
                q_all,
                combine,
                attn_out,
                moe_out,
            } => {
                let combine_imp = p.combine_imp.expect("dcp layers have a combine");
                compute(&p.spin)?;
                let d = group.collective(Collective::AllGather, &p.inputs[0], q_all, None, imp)?;
                ran.push(("all_gather", d.name()));
                compute(&p.spin)?;
                let run = combine.run(p.batch, combine_imp)?;
                ran.push(("dcp_combine", combine_ran(&run, combine_imp)));
                compute(&p.spin)?;
                let d = group.collective(ar, &p.inputs[1], attn_out, None, imp)?;
                ran.push(("all_reduce", d.name()));
                compute(&p.spin)?;
                let d = group.collective(ar, &p.inputs[2], moe_out, None, imp)?;
                ran.push(("all_reduce", d.name()));
            }
        }
    }
    for (op, name) in ran {
        p.ran.entry(op).or_default().insert(name);
    }
    Ok(())
}

fn seed_for(spec: &SimSpec, config: StepConfig, batch: usize, check: u64, input: usize) -> u64 {
    symmcomm::lab::fill::splitmix64(
        spec.seed ^ ((config as u64) << 56) ^ ((batch as u64) << 24) ^ (check << 20) ^ input as u64,
    )
}

/// The `input` index of the combines' inputs in [`seed_for`].
const COMBINE_INPUTS: usize = 0xDC9;

/// A uniform value in `[0, 1)` at `index` of stream `stream` of `seed`: every rank computes any
/// rank's value of any element, without materialising the rest.
fn uniform(seed: u64, stream: u64, index: usize) -> f64 {
    let bits = splitmix64(splitmix64(seed ^ stream) ^ index as u64);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether rank `r`'s KV shard holds nothing for token `b` and head `h` in the combines'
/// inputs: the last token of batches of 3 or more is a padding row (every shard empty), and
/// one (token, head, rank) in five elsewhere is a sequence shorter than the ranks.
fn empty_shard(batch: usize, b: usize, h: usize, r: usize) -> bool {
    (batch >= 3 && b == batch - 1) || (b * 7 + h * 3 + r).is_multiple_of(5)
}

/// `x` as stored in `dtype` and read back.
fn round_to(dtype: DType, x: f64) -> f64 {
    let mut b = [0u8; 8];
    dtype.write_f64(&mut b, 0, x);
    dtype.read_f64(&b, 0)
}

/// What one checked replay feeds the `dcp` layers' combines, as the reference reads it.
struct CombineInputs {
    /// This rank's `[B, H, D]` partial output, as uploaded into every layer's combine.
    partial_bytes: Vec<u8>,
    /// Every rank's partial output as f64 (the same in every layer). Of other ranks only this
    /// rank's heads are filled: they are all its merge reads.
    partial: Vec<Vec<f64>>,
    /// Per layer, every rank's `[B, H]` LSE as uploaded (f32 values).
    lse: Vec<Vec<Vec<f64>>>,
}

impl CombineInputs {
    /// Fresh inputs from `seed`: partial outputs in `[−1, 1)`, LSEs in `[−4, 12)` different in
    /// every layer; an empty shard has NaN outputs and a NaN, +inf or −inf LSE, as attention
    /// kernels write them.
    fn new(spec: &CombineSpec, layers: usize, batch: usize, group: &Group, seed: u64) -> Self {
        let (world, rank) = (group.size(), group.rank());
        let (h, d, hl) = (spec.heads, spec.dim, spec.heads / world);
        let partial_value = |r: usize, i: usize| {
            let (b, head) = (i / (h * d), i / d % h);
            if empty_shard(batch, b, head, r) {
                f64::NAN
            } else {
                2.0 * uniform(seed, r as u64, i) - 1.0
            }
        };
        let n = batch * h * d;
        let dtype = spec.partial_dtype;
        let mut partial_bytes = vec![0u8; n * dtype.size()];
        for i in 0..n {
            dtype.write_f64(&mut partial_bytes, i, partial_value(rank, i));
        }
        let partial = (0..world)
            .map(|r| {
                if r == rank {
                    return (0..n).map(|i| dtype.read_f64(&partial_bytes, i)).collect();
                }
                let mut o = vec![0.0; n];
                for b in 0..batch {
                    let mine = (b * h + rank * hl) * d..(b * h + (rank + 1) * hl) * d;
                    for i in mine {
                        o[i] = round_to(dtype, partial_value(r, i));
                    }
                }
                o
            })
            .collect();
        let lse = (0..layers)
            .map(|layer| {
                (0..world)
                    .map(|r| {
                        let stream = ((layer as u64 + 1) << 32) | r as u64;
                        (0..batch * h)
                            .map(|i| {
                                let (b, head) = (i / h, i % h);
                                if empty_shard(batch, b, head, r) {
                                    [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][(b + head + r) % 3]
                                } else {
                                    round_to(DType::F32, -4.0 + 16.0 * uniform(seed, stream, i))
                                }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        CombineInputs {
            partial_bytes,
            partial,
            lse,
        }
    }

    /// Layer `layer`'s LSE of this rank, as f32 bytes.
    fn lse_bytes(&self, layer: usize, rank: usize) -> Vec<u8> {
        let lse = &self.lse[layer][rank];
        let mut bytes = vec![0u8; lse.len() * 4];
        for (i, &x) in lse.iter().enumerate() {
            DType::F32.write_f64(&mut bytes, i, x);
        }
        bytes
    }
}

/// What a checked replay put in and what it compares against.
struct CheckedInputs {
    /// Seeds of `Prepared::inputs`.
    seeds: Vec<u64>,
    /// The combines' inputs, in `dcp`.
    combine: Option<CombineInputs>,
}

/// Fill fresh inputs (the combines' too), poison every output (the combines' too).
fn fill_and_poison(
    group: &Group,
    spec: &SimSpec,
    config: StepConfig,
    batch: usize,
    check: u64,
    p: &Prepared,
) -> Result<CheckedInputs> {
    let seeds: Vec<u64> = (0..p.inputs.len())
        .map(|i| seed_for(spec, config, batch, check, i))
        .collect();
    for (t, &s) in p.inputs.iter().zip(&seeds) {
        group.fill_random(t, s, None)?;
    }
    for o in &p.outputs {
        group.poison(&o.tensor)?;
    }
    let mut combine = None;
    for (layer, c) in p.combines().enumerate() {
        let inputs = combine.get_or_insert_with(|| {
            let seed = seed_for(spec, config, batch, check, COMBINE_INPUTS);
            CombineInputs::new(c.spec(), spec.model.layers, batch, group, seed)
        });
        group.upload_bytes(&c.partial_out(batch)?, &inputs.partial_bytes)?;
        group.upload_bytes(
            &c.partial_lse(batch)?,
            &inputs.lse_bytes(layer, group.rank()),
        )?;
        group.poison(&c.output(batch)?)?;
    }
    Ok(CheckedInputs { seeds, combine })
}

/// Compare every output with its f64 reference after a replay on `inputs`: the collectives'
/// with [`verify::compare`], the combines' with [`merge_reference`]. Returns the elements wrong
/// on this rank.
fn count_wrong(
    group: &Group,
    config: StepConfig,
    batch: usize,
    p: &Prepared,
    inputs: &CheckedInputs,
) -> Result<usize> {
    let mut wrong = 0;
    for (k, o) in p.outputs.iter().enumerate() {
        let input = &p.inputs[o.input];
        let case = Case {
            coll: o.coll,
            dtype: input.dtype(),
            shape: input.shape().to_vec(),
            dim: None,
            imp: p.variant.imp,
            input_symm: p.variant.windows,
            output_symm: p.variant.windows,
            seed: inputs.seeds[o.input],
        };
        let got = group.download_bytes(&o.tensor)?;
        if let Err(m) = verify::compare(&case, group.size(), group.rank(), 0, &got) {
            tracing::warn!(
                config = config.name(),
                batch,
                output = k,
                op = o.coll.name(),
                rank = group.rank(),
                "wrong result: {} of {} elements, first at {} (got {}, want {})",
                m.wrong,
                m.total,
                m.first_index,
                m.got,
                m.want
            );
            wrong += m.wrong;
        }
    }
    for (layer, c) in p.combines().enumerate() {
        let ci = inputs.combine.as_ref().expect("filled for every combine");
        let cs = c.spec();
        let want = merge_reference(
            &ci.partial,
            &ci.lse[layer],
            batch,
            cs.heads,
            cs.dim,
            group.rank(),
            cs.base,
        );
        let got = group.download_bytes(&c.output(batch)?)?;
        let bad = bench::dcp_count_wrong(&got, &want.out, cs.out_dtype, group.size());
        if bad > 0 {
            tracing::warn!(
                config = config.name(),
                batch,
                layer,
                op = "dcp_combine",
                rank = group.rank(),
                "wrong result: {bad} of {} merged elements",
                want.out.len()
            );
            wrong += bad;
        }
    }
    Ok(wrong)
}

/// Fill fresh inputs, poison every output, replay once, compare every output with the f64
/// reference. Returns the elements wrong on this rank.
fn checked_replay(
    group: &Group,
    spec: &SimSpec,
    config: StepConfig,
    batch: usize,
    check: u64,
    p: &Prepared,
) -> Result<usize> {
    let graph = p.graph.as_ref().expect("captured before checking");
    let inputs = fill_and_poison(group, spec, config, batch, check, p)?;
    graph.replay()?;
    count_wrong(group, config, batch, p, &inputs)
}

/// One (config, batch) of the simulation on one group: what each step of measuring it reads.
struct StepPoint<'a> {
    comm: &'a Communicator,
    group: &'a Group,
    spec: &'a SimSpec,
    config: StepConfig,
    batch: usize,
    /// The collectives of one layer, as [`layer_traffic`] lists them.
    traffic: Vec<(Collective, DType, usize, usize)>,
}

impl StepPoint<'_> {
    /// Why `variant` cannot run one of the layer's collectives, if it cannot (the first that
    /// it cannot run).
    fn unsupported_by(&self, variant: Variant) -> Option<String> {
        self.traffic.iter().find_map(|&(coll, dtype, i, o)| {
            let piece = match coll {
                Collective::ReduceScatter(_) => o,
                _ => i,
            };
            self.group
                .supports(coll, dtype, variant.imp, piece)
                .err()
                .map(|w| format!("{} of {dtype}: {w}", coll.name()))
        })
    }

    /// `variant`'s buffers, and its step enqueued once eagerly and then captured in a graph.
    fn prepare_captured(&self, variant: Variant) -> Result<Prepared> {
        let (comm, group, spec) = (self.comm, self.group, self.spec);
        let mut p = prepare(
            comm.backend(),
            group,
            spec,
            self.config,
            self.batch,
            variant,
        )?;
        if variant.imp == Impl::Auto {
            let largest = self
                .traffic
                .iter()
                .map(|&(_, d, i, o)| i.max(o) * d.size())
                .max()
                .unwrap_or(0);
            group.prepare(largest)?;
        }
        // Eagerly once: connects the communicator and sets up anything lazy before capture.
        enqueue_step(group, spec, &mut p)?;
        comm.synchronize()?;
        // Report what the graph runs (eager calls may dispatch differently).
        p.ran.clear();
        let (graph, ()) = comm.capture(|| enqueue_step(group, spec, &mut p))?;
        p.graph = Some(graph);
        Ok(p)
    }

    /// The first checked replay (fresh inputs, check 0), then the untimed warm-up replays.
    fn check_and_warm_up(&self, p: &mut Prepared) -> Result<()> {
        p.wrong += checked_replay(self.group, self.spec, self.config, self.batch, 0, p)?;
        let g = p.graph.as_ref().expect("captured");
        for _ in 0..self.spec.warmup {
            g.replay()?;
        }
        Ok(())
    }

    /// The timed regions, interleaved over the implementations repeat by repeat, so that drift
    /// during the point favours none of them.
    fn time_interleaved(&self, prepared: &mut [Prepared]) -> Result<()> {
        for _ in 0..self.spec.repeats {
            for p in prepared.iter_mut() {
                let g = p.graph.as_ref().expect("captured");
                p.samples
                    .push(bench::replay_us(self.comm, g, self.spec.replays)?);
            }
        }
        Ok(())
    }

    /// Bytes one step moves, for the algorithm and the bus bandwidth: every layer's
    /// collectives, each counted by its larger buffer.
    fn step_bytes(&self) -> (f64, f64) {
        let world = self.group.size();
        let (mut alg, mut bus) = (0.0, 0.0);
        for &(coll, dtype, i, o) in &self.traffic {
            let b = (i.max(o) * dtype.size() * self.spec.model.layers) as f64;
            alg += b;
            bus += b * coll.busbw_factor(world);
        }
        (alg, bus)
    }

    /// `p`'s row: the last checked replay (fresh inputs, check 1), then the slowest rank's
    /// median and the wrong elements of every rank (collective).
    fn row(&self, p: Prepared, (alg, bus): (f64, f64)) -> Result<Row> {
        let (group, batch) = (self.group, self.batch);
        let wrong = p.wrong + checked_replay(group, self.spec, self.config, batch, 1, &p)?;
        let (us, wrong_total) = bench::slowest_rank(
            group,
            "decode step row",
            bench::median(p.samples.clone()),
            wrong,
        )?;
        let ran = (p.variant.imp == Impl::Auto).then(|| ran_text(&p.ran));
        Ok(Row {
            op: DECODE_STEP_OP.into(),
            dtype: DType::BF16,
            bytes: batch,
            world: group.size(),
            implementation: p.variant.name(self.comm.backend()),
            mode: Mode::Graph,
            us,
            algbw_gbps: alg / (us * 1e-6) / 1e9,
            busbw_gbps: bus / (us * 1e-6) / 1e9,
            ok: wrong_total == 0,
            ran,
            wrong: wrong_total,
            config: Some(self.config.name().into()),
        })
    }
}

/// What `auto` ran, for the row's `ran` text: per op, every implementation seen
/// (`all_reduce:oneshot+nccl dcp_combine:fused`).
fn ran_text(ran: &BTreeMap<&'static str, BTreeSet<String>>) -> String {
    ran.iter()
        .map(|(op, names)| {
            format!(
                "{op}:{}",
                names.iter().cloned().collect::<Vec<_>>().join("+")
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Measure every implementation of `spec` at one (config, batch) on every rank of `group`
/// (collective); one row per implementation that can run, as every rank agrees on it.
pub fn measure_step(
    comm: &Communicator,
    group: &Group,
    spec: &SimSpec,
    config: StepConfig,
    batch: usize,
) -> Result<Vec<Row>> {
    let point = StepPoint {
        comm,
        group,
        spec,
        config,
        batch,
        traffic: layer_traffic(config, &spec.model, batch, group.size()),
    };
    let mut prepared = Vec::new();
    for &variant in &spec.impls {
        if let Some(why) = point.unsupported_by(variant) {
            tracing::info!(
                "skipping {} batch {batch} {}: {why}",
                config.name(),
                variant.name(comm.backend())
            );
            continue;
        }
        prepared.push(point.prepare_captured(variant)?);
    }
    comm.synchronize()?;
    group.barrier()?;
    for p in &mut prepared {
        point.check_and_warm_up(p)?;
    }
    comm.synchronize()?;
    group.barrier()?;
    point.time_interleaved(&mut prepared)?;
    let bytes = point.step_bytes();
    prepared.into_iter().map(|p| point.row(p, bytes)).collect()
}

/// Run every (config, batch) of `spec` on `group`; `progress(done, total, what)` after each.
pub fn run(
    comm: &Communicator,
    group: &Group,
    spec: &SimSpec,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<Row>> {
    let total = spec.configs.len() * spec.batches.len();
    let mut done = 0;
    let mut rows = Vec::new();
    for &config in &spec.configs {
        for &batch in &spec.batches {
            done += 1;
            let what = format!("{} batch {batch}", config.name());
            if let Some(why) = unsupported(config, &spec.model, group.size()) {
                tracing::warn!("skipping {what}: {why}");
                progress(done, total, &format!("{what}: skipped ({why})"));
                continue;
            }
            if batch == 0 {
                return Err(Error::InvalidArgument {
                    ctx: ctx(group, 0),
                    detail: "batch sizes start at 1".into(),
                });
            }
            rows.extend(measure_step(comm, group, spec, config, batch)?);
            progress(done, total, &what);
        }
    }
    Ok(rows)
}

/// The per-step and per-layer table, with each implementation's time against `nccl`'s (or the
/// host's regular path) at the same config and batch.
pub fn report(rows: &[Row], layers: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>6} {:<10} {:>11} {:>10} {:>8} {:>11} {:>8} {:>5}  ran",
        "config", "batch", "impl", "us/step", "us/layer", "x/nccl", "saving us", "saving", "ok"
    );
    let steps: Vec<&Row> = rows.iter().filter(|r| r.op == DECODE_STEP_OP).collect();
    for r in &steps {
        let base = steps
            .iter()
            .find(|b| {
                b.config == r.config
                    && b.bytes == r.bytes
                    && (b.implementation == "nccl" || b.implementation == "host")
            })
            .map(|b| b.us);
        let (ratio, saving, pct) = match base {
            Some(b) if b > 0.0 => (
                format!("{:.3}", r.us / b),
                format!("{:.1}", b - r.us),
                format!("{:.1}%", (b - r.us) / b * 100.0),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<8} {:>6} {:<10} {:>11.1} {:>10.2} {:>8} {:>11} {:>8} {:>5}  {}",
            r.config.as_deref().unwrap_or("-"),
            r.bytes,
            r.implementation,
            r.us,
            r.us / layers.max(1) as f64,
            ratio,
            saving,
            pct,
            if r.ok { "ok" } else { "WRONG" },
            r.ran.as_deref().unwrap_or("")
        );
    }
    out
}

/// Replace the decode-step rows of `results` with `rows`, keeping every other row.
pub fn merge_rows(results: &mut Results, rows: Vec<Row>) {
    results.rows.retain(|r| r.op != DECODE_STEP_OP);
    results.rows.extend(rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepseek_shapes_match_the_research_notes() {
        // §6.1 at B = 32, N = 8: the q all-gather receives 4.7 MB, the all-reduce is 0.46 MB;
        // the combine's reduce-scatter sends the corrected outputs in bf16 (the combine's
        // output type), 4.2 MB, half of the notes' fp32 8.4 MB.
        let m = ModelDims::deepseek_v3();
        assert_eq!(m.q_dim(), 576);
        let t = layer_traffic(StepConfig::Dcp, &m, 32, 8);
        let bytes = |k: usize| t[k].3.max(t[k].2) * t[k].1.size();
        assert_eq!(bytes(0), 147_456 * 32);
        assert_eq!(bytes(1), 128 * 4 * 8 * 32);
        assert_eq!(bytes(2), 131_072 * 32);
        assert_eq!(bytes(3), 14_336 * 32);
        // The combine's spec follows the model: every gathered head, D = kv_lora_rank.
        let cs = combine_spec(&m, 32, true);
        assert_eq!(cs, CombineSpec::deepseek_v3(32));
        assert_eq!(t[2].1, cs.out_dtype);
        // §6.2: the gathered buffer receives 114,688·M bytes per rank at N = 8.
        let t = layer_traffic(StepConfig::DpAttn, &m, 256, 8);
        assert_eq!(t[0].3 * 2, 114_688 * 256);
    }

    /// On the host backend (2 thread ranks, the tiny model, `dcp` at B = 5) for each
    /// implementation: a replay of the captured step is right; the check without a replay
    /// counts every element of every output, the combines' merged heads included; and one merged
    /// value changed after a right replay is caught by the merge reference.
    #[test]
    fn dcp_checks_catch_unwritten_and_wrong_combine_outputs() {
        use symmcomm::{BackendChoice, CommConfig, TableSource};
        let cfg = CommConfig {
            backend: BackendChoice::Host,
            timeout: std::time::Duration::from_secs(30),
            table: TableSource::None,
            ..CommConfig::default()
        };
        let (config, batch) = (StepConfig::Dcp, 5);
        let results = symmcomm::run_rank_threads(2, &cfg, |comm| {
            let g = comm.world();
            let spec = SimSpec::new(ModelDims::tiny(), Vec::new());
            let mut seen = Vec::new();
            for name in ["host", "host_symm", "auto"] {
                let variant = Variant::parse(name).expect("a variant name");
                let mut p = prepare(comm.backend(), g, &spec, config, batch, variant)?;
                enqueue_step(g, &spec, &mut p)?;
                comm.synchronize()?;
                let (graph, ()) = comm.capture(|| enqueue_step(g, &spec, &mut p))?;
                p.graph = Some(graph);
                let right = checked_replay(g, &spec, config, batch, 0, &p)?;

                let inputs = fill_and_poison(g, &spec, config, batch, 1, &p)?;
                comm.synchronize()?;
                let unwritten = count_wrong(g, config, batch, &p, &inputs)?;
                let collective_elements: usize = p.outputs.iter().map(|o| o.tensor.numel()).sum();
                let merged_elements = p.combines().count() * (8 / 2) * batch * 32;

                // A right replay, then the first merged value of layer 1 (token 0, which has
                // tokens on some shard) moved by 0.5.
                p.graph.as_ref().expect("captured").replay()?;
                comm.synchronize()?;
                let out = p.combines().nth(1).expect("3 layers").output(batch)?;
                let mut bytes = g.download_bytes(&out)?;
                let x = out.dtype().read_f64(&bytes, 0);
                out.dtype().write_f64(&mut bytes, 0, x + 0.5);
                g.upload_bytes(&out, &bytes)?;
                let one = count_wrong(g, config, batch, &p, &inputs)?;
                seen.push((
                    name,
                    p.combine_imp,
                    p.ran.get("dcp_combine").cloned(),
                    right,
                    unwritten,
                    collective_elements + merged_elements,
                    one,
                ));
            }
            g.barrier()?;
            Ok(seen)
        });
        for r in results {
            let seen = r.expect("every rank runs");
            for (name, imp, ran, right, unwritten, elements, one) in seen {
                assert_eq!(right, 0, "{name}");
                assert_eq!(unwritten, elements, "{name}: every poisoned element counts");
                assert_eq!(one, 1, "{name}: one wrong merged value");
                let (want_imp, want_ran) = match name {
                    "host" => (CombineImpl::Sequence(Impl::Regular), "sequence(host,host)"),
                    "host_symm" => (
                        CombineImpl::Sequence(Impl::Symmetric),
                        "sequence(host_symm,host_symm)",
                    ),
                    _ => (CombineImpl::Fused, "host_fused"),
                };
                assert_eq!(imp, Some(want_imp), "{name}");
                assert_eq!(ran, Some(BTreeSet::from([want_ran.to_string()])), "{name}");
            }
        }
    }

    #[test]
    fn dp_tokens_are_uneven_with_the_largest_first() {
        assert_eq!(
            (0..4).map(|r| dp_tokens(r, 4, 8)).collect::<Vec<_>>(),
            vec![8, 7, 6, 5]
        );
        assert_eq!(dp_tokens(1, 2, 1), 1);
        assert!((0..8).all(|r| dp_tokens(r, 8, 64) <= 64 && dp_tokens(r, 8, 64) > 0));
    }

    #[test]
    fn merge_keeps_other_rows() {
        let row = |op: &str, us: f64| Row::graph_bf16_for_tests(op, 1, "nccl", us);
        let mut r = Results {
            rows: vec![row("all_reduce", 1.0), row(DECODE_STEP_OP, 2.0)],
            ..Results::default()
        };
        merge_rows(&mut r, vec![row(DECODE_STEP_OP, 3.0)]);
        assert_eq!(r.rows.len(), 2);
        assert_eq!(r.rows[0].op, "all_reduce");
        assert_eq!(r.rows[1].us, 3.0);
    }
}
