//! The backend seam: what the host reference and the CUDA backend each implement. The library
//! above it validates arguments, decides dispatch and manages pools; a backend moves bytes.

pub(crate) mod cuda;
pub(crate) mod host;
mod norm;

pub use norm::NormForm;
pub(crate) use norm::{AddRmsNormStep, NormBuffers, NormFused, NormShape};

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::abort::AbortFlag;
use crate::bootstrap::ControlPlane;
use crate::dtype::{DType, ReduceOp};
use crate::error::{OpCtx, Result};
use crate::memory::{MemRef, Memory};
use crate::topology::GroupTopology;

/// Which backend to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// CUDA when a GPU, the driver and NCCL are present; the host backend otherwise.
    Auto,
    /// The host reference backend.
    Host,
    /// The CUDA backend; an error when it cannot start.
    Cuda,
}

/// What a rank's device starts with (the part of `CommConfig` the backends read).
#[derive(Clone, Debug)]
pub(crate) struct DeviceConfig {
    pub(crate) choice: BackendChoice,
    /// Global rank and world size, for errors.
    pub(crate) rank: usize,
    pub(crate) world: usize,
    /// CUDA device ordinal.
    pub(crate) ordinal: usize,
    /// The engine's context, when it gave one (the device's primary context).
    pub(crate) cuda_context: Option<Arc<cudarc::driver::CudaContext>>,
    pub(crate) timeout: Duration,
    pub(crate) pdl_guard: bool,
    pub(crate) kernel_slot_bytes: usize,
    pub(crate) own_kernels_pdl: bool,
}

/// Which backend runs a communicator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Ranks are threads of one process; memory is host memory. The reference.
    Host,
    /// NCCL and our kernels on CUDA GPUs.
    Cuda,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Host => "host",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// Our own kernels over symmetric memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algo {
    /// Every rank reads every peer's whole input and reduces (or gathers) locally.
    OneShot,
    /// Reduce-scatter by loads from peers, then all-gather by stores to peers.
    TwoShot,
    /// All-gather by copy-engine transfers straight into peers' output windows, between two
    /// flag barriers: for bandwidth at large sizes.
    CopyEngine,
    /// One-shot with the low-latency protocol: every 8 bytes travel with the launch's flag in
    /// one 16-byte store, so a reader needs no barrier; for small sizes.
    LowLatency,
}

impl Algo {
    /// Every algorithm.
    pub const ALL: [Algo; 4] = [
        Algo::OneShot,
        Algo::TwoShot,
        Algo::CopyEngine,
        Algo::LowLatency,
    ];

    /// Name in tables and results (`oneshot`, `twoshot`, `ce`, `ll`).
    pub fn name(self) -> &'static str {
        match self {
            Algo::OneShot => "oneshot",
            Algo::TwoShot => "twoshot",
            Algo::CopyEngine => "ce",
            Algo::LowLatency => "ll",
        }
    }
}

/// How a collective is carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Impl {
    /// Chosen per call by the dispatch table (never slower than `Regular` where measured).
    Auto,
    /// The regular path on any memory: NCCL's regular kernels (`nccl`), or a staged copy on
    /// the host backend (`host`).
    Regular,
    /// The symmetric path, input and output both in windows: NCCL's symmetric kernels
    /// (`nccl_symm`), or direct reads of peers' windows on the host backend (`host_symm`).
    Symmetric,
    /// One of our own kernels over symmetric memory.
    Kernel(Algo),
    /// A group of one rank: the result is the input, so a device copy into the output, or
    /// nothing when the call is in place. No communicator is involved.
    Local,
    /// All-reduce of a group that spans several NVLink domains (hosts) with the same number
    /// of ranks on each: reduce-scatter inside each domain (our kernels or NCCL's, as the
    /// domain's `auto` decides), all-reduce of the 1/k piece across domains (NCCL), all-gather
    /// inside each domain. `auto` picks it only where the table's row for groups across that
    /// many domains names it (measured faster than NCCL's own all-reduce across hosts).
    Hierarchical,
}

impl Impl {
    /// Whether the input must lie in the group's windows (NCCL's symmetric kernels read it
    /// there; our kernels push from any memory).
    pub fn needs_input_window(self) -> bool {
        matches!(self, Impl::Symmetric)
    }

    /// Whether the output must lie in the group's windows (NCCL's symmetric kernels, and the
    /// copy engine, which writes straight into peers' outputs).
    pub fn needs_output_window(self) -> bool {
        matches!(self, Impl::Symmetric | Impl::Kernel(Algo::CopyEngine))
    }

    /// The name a backend shows for this implementation.
    pub fn name(self, backend: BackendKind) -> String {
        match (self, backend) {
            (Impl::Auto, _) => "auto".into(),
            (Impl::Regular, BackendKind::Cuda) => "nccl".into(),
            (Impl::Regular, BackendKind::Host) => "host".into(),
            (Impl::Symmetric, BackendKind::Cuda) => "nccl_symm".into(),
            (Impl::Symmetric, BackendKind::Host) => "host_symm".into(),
            (Impl::Kernel(a), BackendKind::Cuda) => a.name().into(),
            (Impl::Kernel(a), BackendKind::Host) => format!("host_{}", a.name()),
            (Impl::Local, _) => "local".into(),
            (Impl::Hierarchical, BackendKind::Cuda) => "hierarchical".into(),
            (Impl::Hierarchical, BackendKind::Host) => "host_hierarchical".into(),
        }
    }
}

impl FromStr for Impl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Impl::Auto,
            "nccl" | "host" | "regular" => Impl::Regular,
            "nccl_symm" | "host_symm" | "symmetric" => Impl::Symmetric,
            "local" => Impl::Local,
            "hierarchical" | "host_hierarchical" => Impl::Hierarchical,
            _ => {
                let bare = s.strip_prefix("host_").unwrap_or(s);
                match Algo::ALL.into_iter().find(|a| a.name() == bare) {
                    Some(a) => Impl::Kernel(a),
                    None => {
                        return Err(format!(
                            "unknown implementation {s:?} (auto, nccl, nccl_symm, host, host_symm, oneshot, twoshot, ce, ll, local, hierarchical)"
                        ));
                    }
                }
            }
        })
    }
}

/// The three collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collective {
    /// Reduce across ranks; every rank gets the whole result.
    AllReduce(ReduceOp),
    /// Concatenate every rank's piece in rank order.
    AllGather,
    /// Reduce across ranks; rank `r` gets piece `r` of the result.
    ReduceScatter(ReduceOp),
}

impl Collective {
    /// The op name (`all_reduce`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Collective::AllReduce(_) => "all_reduce",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter(_) => "reduce_scatter",
        }
    }

    /// The reduction, if any.
    pub fn reduce(self) -> Option<ReduceOp> {
        match self {
            Collective::AllReduce(r) | Collective::ReduceScatter(r) => Some(r),
            Collective::AllGather => None,
        }
    }

    /// Elements of input and output for a call whose per-rank piece has `piece` elements
    /// (all-reduce: the whole buffer).
    pub fn io_elems(self, piece: usize, world: usize) -> (usize, usize) {
        match self {
            Collective::AllReduce(_) => (piece, piece),
            Collective::AllGather => (piece, piece * world),
            Collective::ReduceScatter(_) => (piece * world, piece),
        }
    }

    /// nccl-tests' bus-bandwidth factor.
    pub fn busbw_factor(self, world: usize) -> f64 {
        let n = world as f64;
        match self {
            Collective::AllReduce(_) => 2.0 * (n - 1.0) / n,
            _ => (n - 1.0) / n,
        }
    }
}

/// Where a call's work is enqueued: the device's own stream (the host backend's queue), or an
/// engine's CUDA stream (a raw `CUstream`; 0 is the legacy default stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum StreamSel {
    /// The device's own stream.
    Own,
    /// A CUDA stream of the engine.
    Cuda(u64),
}

/// A stream as one call sees it: where its work goes, and whether that stream is being
/// captured into a graph now (by symmcomm or by the engine), in which case nothing may
/// allocate, register or compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exec {
    pub(crate) stream: StreamSel,
    pub(crate) capturing: bool,
}

/// Where a symmetric buffer lies in its group's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SymmLoc {
    pub(crate) segment: usize,
    pub(crate) offset: usize,
}

/// What decides whether an implementation can run a call at all: the collective, the element
/// type, the per-rank piece and the world (not where the buffers lie).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CallShape {
    pub(crate) coll: Collective,
    pub(crate) dtype: DType,
    pub(crate) piece: usize,
    /// The largest power of two (at most 256) dividing both buffers' addresses.
    pub(crate) align: usize,
}

/// One validated, contiguous collective with a concrete implementation.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub(crate) coll: Collective,
    pub(crate) dtype: DType,
    /// Elements per rank piece (all-reduce: the whole buffer).
    pub(crate) piece: usize,
    pub(crate) input: MemRef,
    pub(crate) input_symm: Option<SymmLoc>,
    pub(crate) output: MemRef,
    pub(crate) output_symm: Option<SymmLoc>,
    pub(crate) imp: Impl,
    pub(crate) ctx: OpCtx,
}

impl Call {
    /// Bytes of the input and of the output.
    pub(crate) fn io_bytes(&self, world: usize) -> (usize, usize) {
        let (i, o) = self.coll.io_elems(self.piece, world);
        (i * self.dtype.size(), o * self.dtype.size())
    }
}

#[cfg(feature = "lab")]
/// How a producer writes fresh values: element `i` of rank `rank` at epoch `e` is
/// [`crate::fill::value`]`(dtype, seed, rank, e, i)`, with `e` read from `epoch` when given
/// (a device counter that [`RankBackend::bump`] advances, so graph replays see fresh data).
#[derive(Clone, Debug)]
pub(crate) struct FillSpec {
    pub(crate) seed: u64,
    pub(crate) rank: u64,
    pub(crate) epoch: Option<MemRef>,
    /// Let dependent launches start at once and write only after this many ns (a producer
    /// that exposes consumers reading early under programmatic dependent launch).
    pub(crate) early_release_ns: Option<u64>,
}

/// A strided copy between two memories of one rank: `rows` rows of `row_bytes`.
#[derive(Clone, Debug)]
pub(crate) struct Copy2d {
    pub(crate) src: MemRef,
    pub(crate) src_pitch: usize,
    pub(crate) dst: MemRef,
    pub(crate) dst_pitch: usize,
    pub(crate) row_bytes: usize,
    pub(crate) rows: usize,
}

/// The shape of one DCP combine (the `dcp` module): `world` ranks, `batch` tokens, `heads` gathered
/// heads (rank r owns `[r·heads/world, (r+1)·heads/world)`), `dim` values per head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DcpShape {
    pub(crate) world: usize,
    pub(crate) rank: usize,
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    pub(crate) dim: usize,
    /// Element type of the partial outputs.
    pub(crate) partial: DType,
    /// Element type of the corrected and merged outputs.
    pub(crate) out: DType,
    pub(crate) base: crate::lse::LseBase,
}

impl DcpShape {
    /// Heads of one rank.
    pub(crate) fn heads_local(&self) -> usize {
        self.heads / self.world
    }
}

/// The correction step of the DCP combine on one rank: `corrected[h,b,:] = w_rank(b,h) ·
/// partial[b,h,:]` (0 where the weight is 0) from every rank's LSE, and, when asked, the merged
/// LSE of this rank's heads.
#[derive(Clone, Debug)]
pub(crate) struct DcpCorrect {
    pub(crate) shape: DcpShape,
    /// `[B, H, D]` of `shape.partial`.
    pub(crate) partial: MemRef,
    /// `[N, B, H]` f32: every rank's LSE.
    pub(crate) lse_all: MemRef,
    /// `[H, B, D]` of `shape.out`.
    pub(crate) corrected: MemRef,
    /// `[B, H/N]` f32.
    pub(crate) merged_lse: Option<MemRef>,
    pub(crate) ctx: OpCtx,
}

/// The fused DCP combine on one rank: exchange the partials and merge this rank's heads.
#[derive(Clone, Debug)]
pub(crate) struct DcpFused {
    pub(crate) shape: DcpShape,
    /// `[B, H, D]` of `shape.partial`.
    pub(crate) partial: MemRef,
    /// `[B, H]` f32.
    pub(crate) lse: MemRef,
    /// `[H/N, B, D]` of `shape.out`.
    pub(crate) out: MemRef,
    /// `[B, H/N]` f32.
    pub(crate) merged_lse: Option<MemRef>,
    /// Where the combine's workspace `[2 parities][N sources][slot_bytes]` lies in the
    /// group's pool (the CUDA kernel pushes into peers' workspaces; the host needs none).
    pub(crate) workspace_symm: Option<SymmLoc>,
    pub(crate) slot_bytes: usize,
    pub(crate) ctx: OpCtx,
}

/// A captured graph that can be replayed.
pub(crate) trait GraphExec: Send + fmt::Debug {
    /// Launch one replay (asynchronously on CUDA).
    fn replay(&self) -> Result<()>;
}

/// One group's communicator on one rank.
pub(crate) trait GroupBackend: Send + Sync + fmt::Debug {
    /// Rank in the group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Allocate a segment of `bytes` on every rank and register it as a symmetric window
    /// (collective: every rank calls it in the same order).
    fn alloc_segment(&self, bytes: usize, ctx: &OpCtx) -> Result<Arc<dyn Memory>>;
    /// Why `imp` cannot run calls of this shape on this backend, if it cannot.
    fn unavailable(&self, imp: Impl, shape: &CallShape) -> Option<String>;
    /// Run (enqueue, on CUDA) a validated call on `exec`'s stream; `call.imp` is concrete.
    fn collective(&self, exec: Exec, call: &Call) -> Result<()>;
    /// Make a sub-communicator: members with equal `color` form a group ordered by `key`.
    /// Every rank of this group calls it. `control` is the new group's control plane and
    /// `topology` its NVLink domains (our kernels only inside one).
    fn split(
        &self,
        color: usize,
        key: usize,
        control: Arc<ControlPlane>,
        topology: &GroupTopology,
    ) -> Result<Arc<dyn GroupBackend>>;
    /// Something a human can read: `nccl 2.28.9 comm of 2 ranks`, ...
    fn describe(&self) -> String;
    /// Why the fused DCP combine cannot run this shape here, if it cannot.
    fn dcp_fused_unavailable(&self, shape: &DcpShape) -> Option<String>;
    /// Enqueue the fused DCP combine on `exec`'s stream (every rank of the group calls it with the same
    /// shape).
    fn dcp_fused(&self, exec: Exec, call: &DcpFused) -> Result<()>;
    /// Why the fused add-RMSNorm cannot run `shape` with `algo` here, if it cannot.
    fn norm_fused_unavailable(&self, shape: &NormShape, algo: Algo) -> Option<String>;
    /// Enqueue the fused add-RMSNorm on `exec`'s stream (every rank of the group calls it with
    /// the same shape and algorithm).
    fn norm_fused(&self, exec: Exec, call: &NormFused) -> Result<()>;
}

/// Facts about a rank's device, for reports and results files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFacts {
    /// Device model (`NVIDIA H200`, or `host`).
    pub name: String,
    /// NCCL version, when NCCL runs.
    pub nccl: Option<String>,
    /// Path of the NCCL library loaded.
    pub nccl_path: Option<String>,
    /// Driver version (`580.159.04`), when known.
    pub driver: Option<String>,
    /// Whether the guard kernel runs before NCCL's symmetric kernels.
    pub pdl_guard: Option<bool>,
}

/// The per-rank device: memory, copies, the stream, graph capture.
pub(crate) trait RankBackend: Send + Sync + fmt::Debug {
    /// Which backend.
    fn kind(&self) -> BackendKind;
    /// Facts for reports.
    fn facts(&self) -> DeviceFacts;
    /// Human-readable device description.
    fn describe(&self) -> String;
    /// The world communicator of this rank; `topology` is the world's NVLink domains.
    fn world_group(
        &self,
        control: Arc<ControlPlane>,
        topology: &GroupTopology,
    ) -> Result<Arc<dyn GroupBackend>>;
    /// A plain allocation.
    fn alloc_plain(&self, bytes: usize) -> Result<Arc<dyn Memory>>;
    /// Memory an engine owns, `bytes` from `addr`, checked to lie on this rank's device (CUDA:
    /// one allocation of this device holds the whole range). Not freed by symmcomm.
    ///
    /// # Safety
    ///
    /// The range stays valid while work enqueued with it (and graphs captured with it) can run.
    unsafe fn foreign(&self, addr: u64, bytes: usize, ctx: &OpCtx) -> Result<Arc<dyn Memory>>;
    /// Load every kernel module now (before a capture, where loading one is an error).
    fn prepare(&self, ctx: &OpCtx) -> Result<()>;
    /// Check that `s` can carry this device's work (a CUDA stream of this device's context).
    fn check_stream(&self, s: StreamSel, ctx: &OpCtx) -> Result<()>;
    /// The stream `s` as a call sees it now: is it being captured?
    fn exec(&self, s: StreamSel, ctx: &OpCtx) -> Result<Exec>;
    /// While `exec` is a capture that symmcomm did not begin (the engine's), keep `keep` (what
    /// the captured work uses) alive as long as the graph being captured (and every graph
    /// instantiated from it).
    fn retain_for_capture(
        &self,
        exec: Exec,
        keep: Box<dyn std::any::Any + Send>,
        ctx: &OpCtx,
    ) -> Result<()>;
    /// Copy host bytes into memory (synchronous: waits for the work queued on `s` first).
    fn upload(&self, s: StreamSel, dst: &MemRef, src: &[u8]) -> Result<()>;
    /// Copy memory into host bytes (synchronous: waits for the work queued on `s` first).
    fn download(&self, s: StreamSel, src: &MemRef, dst: &mut [u8]) -> Result<()>;
    /// Enqueue a strided copy.
    fn copy_2d(&self, s: StreamSel, c: &Copy2d) -> Result<()>;
    /// Enqueue a fill of `elems` elements with the reference generator.
    #[cfg(feature = "lab")]
    fn fill(
        &self,
        s: StreamSel,
        dst: &MemRef,
        dtype: DType,
        elems: usize,
        spec: &FillSpec,
    ) -> Result<()>;
    /// Enqueue a fill of `bytes` bytes with `byte` (poisoning outputs).
    fn memset(&self, s: StreamSel, dst: &MemRef, bytes: usize, byte: u8) -> Result<()>;
    /// Enqueue `counter += 1` on an 8-byte counter.
    #[cfg(feature = "lab")]
    fn bump(&self, s: StreamSel, counter: &MemRef) -> Result<()>;
    /// Enqueue the DCP correction step (local: no communication).
    fn dcp_correct(&self, exec: Exec, call: &DcpCorrect) -> Result<()>;
    /// Enqueue the residual add and RMSNorm of rows already reduced (local: no communication).
    fn add_rmsnorm(&self, exec: Exec, step: &AddRmsNormStep) -> Result<()>;
    /// Start capturing the work enqueued on the device's own stream into a graph.
    fn begin_capture(&self) -> Result<()>;
    /// Stop capturing and instantiate the graph.
    fn end_capture(&self) -> Result<Box<dyn GraphExec>>;
    /// Wait for the work enqueued on `s`, within the deadline.
    fn synchronize(&self, s: StreamSel) -> Result<()>;
    /// Free and total device memory (`None` on the host).
    fn memory_info(&self) -> Result<Option<(usize, usize)>>;
    /// Time the work `enqueue` puts on `s` (device events on CUDA, the clock on host).
    fn time(&self, s: StreamSel, enqueue: &mut dyn FnMut() -> Result<()>) -> Result<Duration>;
}

/// Start this rank's device for `config.choice`.
pub(crate) fn start(config: &DeviceConfig, abort: &Arc<AbortFlag>) -> Result<Arc<dyn RankBackend>> {
    match config.choice {
        BackendChoice::Host => Ok(Arc::new(host::HostDevice::new(config.rank))),
        BackendChoice::Cuda => cuda::start(config, abort),
        BackendChoice::Auto => match cuda::probe() {
            Ok(_) => cuda::start(config, abort),
            Err(why) => {
                tracing::info!("CUDA backend unavailable ({why}); using the host backend");
                Ok(Arc::new(host::HostDevice::new(config.rank)))
            }
        },
    }
}
