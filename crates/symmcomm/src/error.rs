//! The one error type of the library: structured variants that name the rank, the group, the
//! operation and the sizes involved, so a failure on any rank says what it was doing.

use std::fmt;
use std::time::Duration;

use crate::dtype::{DType, ReduceOp};

/// What was being done when an error happened. Every error that concerns a collective or the
/// pool carries one, so its message names the operation, the group, the rank and the size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpCtx {
    /// The operation (`all_reduce`, `pool_alloc`, `bootstrap`, ...).
    pub op: Op,
    /// The group's label, e.g. `tp#1` (kind and split colour) or `world`.
    pub group: String,
    /// This process's rank within the group.
    pub rank: usize,
    /// Number of ranks in the group.
    pub world: usize,
    /// Size of the operation in bytes (the larger buffer, as in nccl-tests), 0 when none.
    pub bytes: usize,
}

impl fmt::Display for OpCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} rank {}/{} ({} B)",
            self.op, self.group, self.rank, self.world, self.bytes
        )
    }
}

/// The operations an error can be about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Op {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast,
    Barrier,
    PoolAlloc,
    PoolFree,
    Register,
    Deregister,
    Split,
    Init,
    Bootstrap,
    Capture,
    Replay,
    Copy,
    Fill,
    Kernel,
    DcpCombine,
    DpGather,
    DpScatter,
    AllReduceAddRmsNorm,
    ReduceScatterAddRmsNorm,
}

impl Op {
    /// The snake-case name used in messages, traces and results files.
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::PoolAlloc => "pool_alloc",
            Op::PoolFree => "pool_free",
            Op::Register => "register",
            Op::Deregister => "deregister",
            Op::Split => "split",
            Op::Init => "init",
            Op::Bootstrap => "bootstrap",
            Op::Capture => "capture",
            Op::Replay => "replay",
            Op::Copy => "copy",
            Op::Fill => "fill",
            Op::Kernel => "kernel",
            Op::DcpCombine => "dcp_combine",
            Op::DpGather => "dp_gather",
            Op::DpScatter => "dp_scatter",
            Op::AllReduceAddRmsNorm => "all_reduce_add_rmsnorm",
            Op::ReduceScatterAddRmsNorm => "reduce_scatter_add_rmsnorm",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which argument of a collective (or of a fused add-RMSNorm) an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Arg {
    Input,
    Output,
    /// The residual of an add-RMSNorm.
    Residual,
    /// The RMSNorm weight.
    Weight,
    /// The normalised output of an add-RMSNorm.
    NormedOut,
    /// The new residual of an add-RMSNorm.
    ResidualOut,
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arg::Input => "input",
            Arg::Output => "output",
            Arg::Residual => "residual",
            Arg::Weight => "weight",
            Arg::NormedOut => "normed_out",
            Arg::ResidualOut => "residual_out",
        })
    }
}

/// What kind of failure an [`Error`] is: a short list to react to, where [`Error`]'s variants
/// say exactly what happened. The Python package raises one exception class per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An element type the operation does not take, or tensors that disagree on it.
    DType,
    /// A shape, length or dimension that does not fit the operation.
    Shape,
    /// A tensor that must be contiguous is not.
    NotContiguous,
    /// Input and output overlap in a way the operation does not allow.
    Overlap,
    /// A buffer of another group, communicator or backend, or plain memory where the
    /// implementation needs the group's windows.
    ForeignBuffer,
    /// The implementation asked for cannot run this call here.
    ImplUnavailable,
    /// An argument wrong in another way (the message says which).
    InvalidArgument,
    /// Something a CUDA graph capture cannot hold (compiling, growing the pool, registering).
    Capture,
    /// More than a buffer or the pool was made for.
    Capacity,
    /// Ranks passed different values where every rank must pass the same (SPMD).
    Disagreement,
    /// A wait ran past its deadline; the process's communicators are aborted.
    Deadline,
    /// The communicator was aborted (a deadline, a peer's failure, the user).
    Aborted,
    /// The rendezvous failed: the environment, the master's address, world size or ranks.
    Bootstrap,
    /// CUDA, NCCL or NVRTC failed, NCCL could not be loaded, or no GPU is usable.
    Backend,
    /// Files, sockets, or a dispatch table that cannot be read.
    Io,
}

/// Everything that can go wrong in symmcomm.
///
/// Fields are named for what they hold: `ctx` says the operation, group, rank and size; `arg`
/// which argument; the rest are the values that disagreed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum Error {
    /// Input and output (or a buffer and the operation) disagree on the element type.
    #[error("{ctx}: dtype mismatch: input is {input}, output is {output}")]
    DTypeMismatch {
        ctx: OpCtx,
        input: DType,
        output: DType,
    },

    /// One argument of an operation on several tensors (a fused add-RMSNorm) has another element
    /// type than the input.
    #[error("{ctx}: dtype mismatch: {arg} is {got}, the input is {expected}")]
    ArgDTypeMismatch {
        ctx: OpCtx,
        arg: Arg,
        expected: DType,
        got: DType,
    },

    /// One argument of an operation on several tensors has the wrong shape.
    #[error("{ctx}: {arg} has shape {got:?}, expected {expected:?}")]
    ArgShapeMismatch {
        ctx: OpCtx,
        arg: Arg,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A length that must split evenly over the ranks does not.
    #[error("{ctx}: {arg} has {len} elements along the split, not divisible by world size {world}")]
    NotDivisible {
        ctx: OpCtx,
        arg: Arg,
        len: usize,
        world: usize,
    },

    /// A tensor view is not contiguous where the operation needs it to be.
    #[error("{ctx}: {arg} is not contiguous (shape {shape:?}, strides {strides:?})")]
    NotContiguous {
        ctx: OpCtx,
        arg: Arg,
        shape: Vec<usize>,
        strides: Vec<usize>,
    },

    /// The output has the wrong number of elements or the wrong shape for the input.
    #[error("{ctx}: output shape {got:?} does not match the expected {expected:?}")]
    ShapeMismatch {
        ctx: OpCtx,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// The output is smaller than the operation needs.
    #[error("{ctx}: output holds {got} elements, needs {needed}")]
    OutputTooSmall {
        ctx: OpCtx,
        needed: usize,
        got: usize,
    },

    /// The reduction is not defined for this element type (integers are gathered, not reduced).
    #[error("{ctx}: reduction {reduce} is not allowed on {dtype}")]
    OpNotAllowed {
        ctx: OpCtx,
        reduce: ReduceOp,
        dtype: DType,
    },

    /// A dimension index is out of range for the tensor.
    #[error("{ctx}: dimension {dim} is out of range for a {ndim}-d tensor")]
    BadDim { ctx: OpCtx, dim: usize, ndim: usize },

    /// Input and output overlap in a way the operation does not allow.
    #[error("{ctx}: input and output overlap; only the exact in-place layout is allowed")]
    Overlap { ctx: OpCtx },

    /// An implementation that needs symmetric buffers was given plain memory.
    #[error("{ctx}: implementation {implementation} needs a symmetric {arg}, got plain memory")]
    NotSymmetric {
        ctx: OpCtx,
        implementation: String,
        arg: Arg,
    },

    /// A buffer belongs to another group, another communicator, or another backend.
    #[error("{ctx}: {arg} belongs to {owner}, not to this group")]
    ForeignBuffer { ctx: OpCtx, arg: Arg, owner: String },

    /// The implementation does not exist on this backend or for this op, dtype or world size.
    #[error("{ctx}: implementation {implementation} is unavailable: {why}")]
    ImplUnavailable {
        ctx: OpCtx,
        implementation: String,
        why: String,
    },

    /// Something that would register memory or grow the pool was asked for during graph capture.
    #[error(
        "{ctx}: {action} is not allowed during CUDA graph capture; size the pool before capturing"
    )]
    DuringCapture { ctx: OpCtx, action: String },

    /// Ranks made different pool requests (SPMD violated); names the first difference.
    #[error(
        "{ctx}: ranks diverged at pool request #{index}: {mine}, but rank {other_rank} asked for {theirs}"
    )]
    SpmdDivergence {
        ctx: OpCtx,
        index: u64,
        mine: String,
        other_rank: usize,
        theirs: String,
    },

    /// A wait ran past its deadline.
    #[error("{ctx}: timed out after {waited:?}: {detail}")]
    Timeout {
        ctx: OpCtx,
        waited: Duration,
        detail: String,
    },

    /// The communicator was aborted (by a watchdog, a peer's failure or the user).
    #[error("{ctx}: communicator aborted: {reason}")]
    Aborted { ctx: OpCtx, reason: String },

    /// Rendezvous: a rank announced a different world size than the master's.
    #[error("bootstrap: rank {rank} announced world size {got}, the master expects {expected}")]
    WrongWorldSize {
        rank: usize,
        expected: usize,
        got: usize,
    },

    /// Rendezvous: two processes claimed the same rank.
    #[error("bootstrap: rank {rank} joined twice (from {first} and {second})")]
    DuplicateRank {
        rank: usize,
        first: String,
        second: String,
    },

    /// Rendezvous: a rank outside `0..world_size`.
    #[error("bootstrap: rank {rank} is out of range for world size {world}")]
    RankOutOfRange { rank: usize, world: usize },

    /// Rendezvous: the master could not be reached before the deadline.
    #[error(
        "bootstrap: rank {rank} could not reach the master at {addr} within {waited:?}: {last_error}"
    )]
    MasterUnreachable {
        rank: usize,
        addr: String,
        waited: Duration,
        last_error: String,
    },

    /// Rendezvous: the master's port is already taken.
    #[error("bootstrap: rank 0 could not listen on {addr}: {source}")]
    AddrInUse {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    /// Rendezvous: bytes on the wire that are not the protocol.
    #[error("bootstrap: rank {rank}: malformed message from {peer}: {detail}")]
    Malformed {
        rank: usize,
        peer: String,
        detail: String,
    },

    /// Rendezvous: a peer (or the master) reported a failure to every rank.
    #[error("bootstrap: rank {rank}: the rendezvous failed: {reason}")]
    RendezvousFailed { rank: usize, reason: String },

    /// The environment (RANK, WORLD_SIZE, ...) is missing or malformed.
    #[error("bootstrap: environment variable {name}: {detail}")]
    BadEnv { name: String, detail: String },

    /// An NCCL call failed.
    #[error("{ctx}: {call} failed: {code_name} ({code}): {message}{last}",
        last = if last_error.is_empty() { String::new() } else { format!("; NCCL says: {last_error}") })]
    Nccl {
        ctx: OpCtx,
        call: &'static str,
        code: i32,
        code_name: String,
        message: String,
        last_error: String,
    },

    /// The NCCL library could not be loaded or is too old.
    #[error(transparent)]
    NcclLoad(#[from] nccl_sys::LoadError),

    /// A CUDA driver call failed.
    #[error("{ctx}: CUDA {call} failed: {message}")]
    Cuda {
        ctx: OpCtx,
        call: &'static str,
        message: String,
    },

    /// NVRTC could not compile a kernel.
    #[error("kernel {kernel}: NVRTC compilation for {arch} failed:\n{log}")]
    Nvrtc {
        kernel: String,
        arch: String,
        log: String,
    },

    /// No GPU, no CUDA driver, or a GPU that cannot run the request.
    #[error("no usable GPU: {reason}")]
    NoGpu { reason: String },

    /// An argument that is wrong in a way no other variant describes.
    #[error("{ctx}: invalid argument: {detail}")]
    InvalidArgument { ctx: OpCtx, detail: String },

    /// Ranks passed different values where every rank must pass the same (the sizes of a
    /// buffer that must be symmetric, a step's shapes).
    #[error(
        "{ctx}: ranks disagree on {what}: this rank has {mine}, rank {other_rank} has {theirs}"
    )]
    Disagreement {
        ctx: OpCtx,
        what: String,
        mine: String,
        other_rank: usize,
        theirs: String,
    },

    /// A step needs more than a buffer was created for.
    #[error("{ctx}: {what} needs {needed}, the buffer was created for at most {capacity}")]
    CapacityExceeded {
        ctx: OpCtx,
        what: String,
        needed: usize,
        capacity: usize,
    },

    /// A dispatch or tune table could not be read or is invalid.
    #[error("dispatch table {path}: {detail}")]
    Table { path: String, detail: String },

    /// Input/output on the host (files, sockets).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with a sentence saying what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// What kind of failure this is.
    ///
    /// ```
    /// use symmcomm::{Error, ErrorKind};
    /// let e = Error::io("reading a dispatch table", std::io::Error::other("gone"));
    /// assert_eq!(e.kind(), ErrorKind::Io);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::DTypeMismatch { .. }
            | Error::ArgDTypeMismatch { .. }
            | Error::OpNotAllowed { .. } => ErrorKind::DType,
            Error::ArgShapeMismatch { .. }
            | Error::NotDivisible { .. }
            | Error::ShapeMismatch { .. }
            | Error::OutputTooSmall { .. }
            | Error::BadDim { .. } => ErrorKind::Shape,
            Error::NotContiguous { .. } => ErrorKind::NotContiguous,
            Error::Overlap { .. } => ErrorKind::Overlap,
            Error::NotSymmetric { .. } | Error::ForeignBuffer { .. } => ErrorKind::ForeignBuffer,
            Error::ImplUnavailable { .. } => ErrorKind::ImplUnavailable,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::DuringCapture { .. } => ErrorKind::Capture,
            Error::CapacityExceeded { .. } => ErrorKind::Capacity,
            Error::SpmdDivergence { .. } | Error::Disagreement { .. } => ErrorKind::Disagreement,
            Error::Timeout { .. } => ErrorKind::Deadline,
            Error::Aborted { .. } => ErrorKind::Aborted,
            Error::WrongWorldSize { .. }
            | Error::DuplicateRank { .. }
            | Error::RankOutOfRange { .. }
            | Error::MasterUnreachable { .. }
            | Error::AddrInUse { .. }
            | Error::Malformed { .. }
            | Error::RendezvousFailed { .. }
            | Error::BadEnv { .. } => ErrorKind::Bootstrap,
            Error::Nccl { .. }
            | Error::NcclLoad(_)
            | Error::Cuda { .. }
            | Error::Nvrtc { .. }
            | Error::NoGpu { .. } => ErrorKind::Backend,
            Error::Table { .. } | Error::Io { .. } => ErrorKind::Io,
        }
    }

    /// The operation context, where the error has one.
    pub fn ctx(&self) -> Option<&OpCtx> {
        match self {
            Error::DTypeMismatch { ctx, .. }
            | Error::ArgDTypeMismatch { ctx, .. }
            | Error::ArgShapeMismatch { ctx, .. }
            | Error::NotDivisible { ctx, .. }
            | Error::NotContiguous { ctx, .. }
            | Error::ShapeMismatch { ctx, .. }
            | Error::OutputTooSmall { ctx, .. }
            | Error::OpNotAllowed { ctx, .. }
            | Error::BadDim { ctx, .. }
            | Error::Overlap { ctx }
            | Error::NotSymmetric { ctx, .. }
            | Error::ForeignBuffer { ctx, .. }
            | Error::ImplUnavailable { ctx, .. }
            | Error::DuringCapture { ctx, .. }
            | Error::SpmdDivergence { ctx, .. }
            | Error::Timeout { ctx, .. }
            | Error::Aborted { ctx, .. }
            | Error::Nccl { ctx, .. }
            | Error::Cuda { ctx, .. }
            | Error::InvalidArgument { ctx, .. }
            | Error::Disagreement { ctx, .. }
            | Error::CapacityExceeded { ctx, .. } => Some(ctx),
            _ => None,
        }
    }
}
