//! The kernels' ABI, written once: the launch limits, the signal-pad and workspace layouts, the
//! error codes, and the `#[repr(C)]` structs the host passes to the CUDA kernels.
//!
//! The kernels see all of it through `symm_abi.cuh`, which [`abi_header`] generates from this
//! file and NVRTC receives in memory (`kernels::headers`). Every `#define` there comes from a
//! constant of [`ABI_DEFINES`] and every `struct` from a Rust struct here ([`abi_structs`]: field
//! names, C types and array lengths are read off the Rust types). The header also carries
//! `static_assert`s of each struct's size, alignment and field offsets as rustc computes them
//! (`size_of`, `align_of`, `offset_of!`), so NVRTC checks at every compile, on the build machine
//! and on every GPU at load time, that it lays the structs out as Rust does. The meaning of each
//! value is in `KERNELS.md` next to this crate's `Cargo.toml`.

// Public only with the `lab` feature (the lab's NVRTC tests and GPU failure tests reach in);
// without it these items serve the library alone.
#![cfg_attr(
    not(feature = "lab"),
    allow(unreachable_pub, dead_code, unused_imports)
)]

/// Threads per block the collectives are built for (`__launch_bounds__`); launch with exactly this.
pub const BLOCK_THREADS: u32 = 512;
/// Most blocks a collective may be launched with (flag slots per phase in the signal pad).
pub const MAX_BLOCKS: u32 = 128;
/// Most ranks in a group the collectives handle.
pub const MAX_WORLD: usize = 8;
/// Barrier phases (two-shot uses both; everything else phase 0).
pub const PHASES: usize = 2;
/// Areas of a workspace: area 0 for every kernel, area 1 for two-shot's second phase only.
pub const AREAS: usize = 2;
/// Epoch parities: the workspace and the LL area are double-buffered on `epoch & 1`.
pub const PARITIES: usize = 2;
/// Byte offset of `flags[PHASES][MAX_BLOCKS][MAX_WORLD]` (u64 epochs) in a rank's signal pad.
pub const PAD_FLAGS_OFFSET: usize = 0;
/// Byte offset of `peer_error[MAX_WORLD]` (u32 each) in a rank's signal pad.
pub const PAD_PEER_ERROR_OFFSET: usize =
    PAD_FLAGS_OFFSET + 8 * PHASES * MAX_BLOCKS as usize * MAX_WORLD;
/// Bytes of one rank's signal pad: `flags[PHASES][MAX_BLOCKS][MAX_WORLD]` (u64), then
/// `peer_error[MAX_WORLD]` (u32). Zero it before first use.
pub const PAD_BYTES: usize = PAD_PEER_ERROR_OFFSET + 4 * MAX_WORLD;
/// Offset of the low-latency (LL) area from a rank's signal-pad base: [`PAD_BYTES`] rounded up
/// to 256.
pub const LL_OFFSET: usize = PAD_BYTES.div_ceil(256) * 256;
/// Most payload bytes one LL slot carries: the largest piece an LL kernel moves.
pub const LL_MAX_BYTES: usize = 512 << 10;
/// Bytes of one LL slot: 16-byte lines of 8 payload bytes and two flags.
pub const LL_SLOT_BYTES: usize = 2 * LL_MAX_BYTES;
/// [`SymmState::error_phase`] of an error recorded by a wait of the LL protocol (the barrier's
/// phases are `0..PHASES`).
pub const LL_PHASE: u32 = PHASES as u32;

// The LL area lies past the pad on a 256-byte boundary; an LL error phase is no barrier phase.
const _: () = {
    assert!(LL_OFFSET >= PAD_BYTES && LL_OFFSET.is_multiple_of(256));
    assert!(LL_PHASE as usize >= PHASES);
};

/// Bytes of one rank's LL area: `[parity 0..PARITIES][src 0..world]` slots.
pub fn ll_area_bytes(world: usize) -> usize {
    PARITIES * world * LL_SLOT_BYTES
}

/// Bytes of one rank's workspace: `[area 0..AREAS][parity 0..PARITIES][src 0..world][slot_bytes]`.
/// Area 1 is used only by two-shot all-reduce; the others need the first half only.
pub fn workspace_bytes(world: usize, slot_bytes: usize) -> usize {
    AREAS * PARITIES * world * slot_bytes
}

/// Flag-wait deadline the kernels use when [`SymmArgs::timeout_ns`] is 0.
pub const DEFAULT_TIMEOUT_NS: u64 = 10_000_000_000;

/// [`SymmState::error`]: no error.
pub const ERR_NONE: u32 = 0;
/// [`SymmState::error`]: a flag wait ran past its deadline.
pub const ERR_TIMEOUT: u32 = 1;
/// [`SymmState::error`]: a peer reported a timeout of its own through this rank's pad.
pub const ERR_PEER: u32 = 2;
/// [`SymmState::error`]: the arguments were rejected (nothing was moved).
pub const ERR_ARGS: u32 = 3;

/// Threads per block of the DCP kernels (`__launch_bounds__` of `dcp.cu`).
pub const DCP_BLOCK_THREADS: u32 = 512;

/// Threads per block of the add-RMSNorm kernels of `rmsnorm.cu` (`__launch_bounds__`): one block
/// normalises one row at a time.
pub const RMSNORM_BLOCK_THREADS: u32 = 512;
/// 16-byte units of a row one thread of `rmsnorm.cu` holds in registers between the residual
/// add and the normalisation: a row has at most `RMSNORM_BLOCK_THREADS × RMSNORM_MAX_UNITS`
/// units ([`rmsnorm_max_hidden`]).
pub const RMSNORM_MAX_UNITS: u32 = 4;

/// The largest hidden size the add-RMSNorm kernels take for elements of `elem_bytes` bytes: a
/// row of whole 16-byte units, each thread of the block holding at most [`RMSNORM_MAX_UNITS`]
/// (16384 for bf16 and f16).
pub const fn rmsnorm_max_hidden(elem_bytes: usize) -> usize {
    RMSNORM_BLOCK_THREADS as usize * RMSNORM_MAX_UNITS as usize * 16 / elem_bytes
}

/// The by-value argument of every collective kernel, `struct SymmArgs` of `symm_abi.cuh`
/// (184 bytes, no padding). Addresses are device pointers as seen by *this* rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SymmArgs {
    /// Rank `p`'s workspace base in this rank's address space (symmetric memory), `p < world`.
    pub ws: [u64; MAX_WORLD],
    /// Rank `p`'s signal pad base in this rank's address space (symmetric memory).
    pub pad: [u64; MAX_WORLD],
    /// This rank's input (`in` in C). Elements naturally aligned; 16 B alignment is not required.
    pub input: u64,
    /// This rank's output (`out` in C). Same alignment rule as `input`.
    pub output: u64,
    /// Elements: the whole buffer for all-reduce, each rank's piece for reduce-scatter; bytes
    /// of each rank's piece for `symm_allgather`.
    pub count: u64,
    /// Bytes of one workspace slot; a multiple of 16 and at least
    /// [`CollectiveKernel::slot_bytes_needed`](super::CollectiveKernel::slot_bytes_needed).
    pub slot_bytes: u64,
    /// This rank's [`SymmState`] (plain device memory, zeroed once).
    pub state: u64,
    /// Flag-wait deadline in ns; 0 means [`DEFAULT_TIMEOUT_NS`].
    pub timeout_ns: u64,
    /// This rank, `< world`.
    pub rank: u32,
    /// Ranks in the group, `2..=MAX_WORLD`.
    pub world: u32,
}

// The documented layout (KERNELS.md §3); changing it is a change of the kernels' ABI.
const _: () = {
    assert!(std::mem::size_of::<SymmArgs>() == 184);
    assert!(std::mem::offset_of!(SymmArgs, ws) == 0);
    assert!(std::mem::offset_of!(SymmArgs, pad) == 64);
    assert!(std::mem::offset_of!(SymmArgs, input) == 128);
    assert!(std::mem::offset_of!(SymmArgs, output) == 136);
    assert!(std::mem::offset_of!(SymmArgs, count) == 144);
    assert!(std::mem::offset_of!(SymmArgs, slot_bytes) == 152);
    assert!(std::mem::offset_of!(SymmArgs, state) == 160);
    assert!(std::mem::offset_of!(SymmArgs, timeout_ns) == 168);
    assert!(std::mem::offset_of!(SymmArgs, rank) == 176);
    assert!(std::mem::offset_of!(SymmArgs, world) == 180);
};

// SAFETY: `SymmArgs` is `#[repr(C)]`, `Copy`, made only of integers with no padding (`Pod`), and
// the kernels' `struct SymmArgs` is generated from it (`abi_header`), with its size and every
// offset checked by `static_assert` at compile time, so its bytes are a valid by-value kernel
// parameter.
unsafe impl cudarc::driver::DeviceRepr for SymmArgs {}

/// One rank's local state for a group's collectives, `struct SymmState` of `symm_abi.cuh`
/// (64 bytes). Zero it once before the first launch; read it back to check `error`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SymmState {
    /// Launches completed on this group; equal on every rank between launches.
    pub epoch: u64,
    /// Epoch of the launch that recorded `error`.
    pub error_epoch: u64,
    /// Blocks of the running launch that have started; 0 between launches.
    pub blocks_done: u32,
    /// One of [`ERR_NONE`], [`ERR_TIMEOUT`], [`ERR_PEER`], [`ERR_ARGS`]; sticky.
    pub error: u32,
    /// The peer waited on ([`ERR_TIMEOUT`]) or that reported ([`ERR_PEER`]).
    pub error_src: u32,
    /// The block that recorded the error.
    pub error_block: u32,
    /// The barrier phase that recorded the error ([`LL_PHASE`] for the LL protocol).
    pub error_phase: u32,
    /// Unused; keeps the size at 64 bytes.
    pub reserved: [u32; 7],
}

// The documented layout (KERNELS.md §3).
const _: () = {
    assert!(std::mem::size_of::<SymmState>() == 64);
    assert!(std::mem::offset_of!(SymmState, epoch) == 0);
    assert!(std::mem::offset_of!(SymmState, error_epoch) == 8);
    assert!(std::mem::offset_of!(SymmState, blocks_done) == 16);
    assert!(std::mem::offset_of!(SymmState, error) == 20);
    assert!(std::mem::offset_of!(SymmState, error_src) == 24);
    assert!(std::mem::offset_of!(SymmState, error_block) == 28);
    assert!(std::mem::offset_of!(SymmState, error_phase) == 32);
};

impl SymmState {
    /// A sentence describing `error`, or `None` when there is none.
    pub fn error_message(&self) -> Option<String> {
        let at = format!(
            "block {}, phase {}, epoch {}",
            self.error_block, self.error_phase, self.error_epoch
        );
        match self.error {
            ERR_NONE => None,
            ERR_TIMEOUT => Some(format!(
                "timed out waiting for rank {}'s flag ({at})",
                self.error_src
            )),
            ERR_PEER => Some(format!(
                "rank {} timed out and reported it; results since are void ({at})",
                self.error_src
            )),
            ERR_ARGS => Some(format!("kernel rejected its arguments ({at})")),
            other => Some(format!("unknown kernel error code {other} ({at})")),
        }
    }
}

/// The second by-value argument of the kernels of `dcp.cu`, `struct DcpArgs` of `symm_abi.cuh`
/// (56 bytes, no padding). Addresses are this rank's device pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DcpArgs {
    /// `[B, H, D]` partial output of this rank.
    pub partial: u64,
    /// Correction: `[N, B, H]` f32, every rank's LSE. Fused: `[B, H]` f32, this rank's.
    pub lse: u64,
    /// Correction: `[H, B, D]`. Fused: `[H/N, B, D]`.
    pub out: u64,
    /// `[B, H/N]` f32, or 0 for none.
    pub merged_lse: u64,
    /// Ranks N.
    pub world: u32,
    /// This rank.
    pub rank: u32,
    /// Tokens B.
    pub batch: u32,
    /// Gathered heads H (a multiple of N).
    pub heads: u32,
    /// Values per head D (a multiple of 8).
    pub dim: u32,
    /// 1: LSEs in base 2, 0: natural log.
    pub base2: u32,
}

// The documented layout (KERNELS.md §9).
const _: () = {
    assert!(std::mem::size_of::<DcpArgs>() == 56);
    assert!(std::mem::offset_of!(DcpArgs, merged_lse) == 24);
    assert!(std::mem::offset_of!(DcpArgs, world) == 32);
    assert!(std::mem::offset_of!(DcpArgs, base2) == 52);
};

/// The second by-value argument of the kernels of `rmsnorm.cu`, `struct RmsNormArgs` of
/// `symm_abi.cuh` (56 bytes, no padding). Addresses are this rank's device pointers, 16-byte
/// aligned; rows are `hidden` elements of the kernel's type.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RmsNormArgs {
    /// `[tokens, hidden]`: this rank's partial sums (fused kernels), or the reduced rows (the
    /// separate add-RMSNorm kernel).
    pub input: u64,
    /// The residual: `[tokens, hidden]`, or `[tokens / world, hidden]` for the reduce-scatter form.
    pub residual: u64,
    /// `[hidden]`: the RMSNorm weight.
    pub weight: u64,
    /// The normalised output, shaped like the residual.
    pub normed: u64,
    /// The new residual, shaped like the residual; may be `residual` itself (in place).
    pub residual_out: u64,
    /// Rows of `input` (all ranks' rows in the reduce-scatter form).
    pub tokens: u32,
    /// Elements per row.
    pub hidden: u32,
    /// The RMSNorm epsilon.
    pub eps: f32,
    /// Unused; keeps the struct free of padding.
    pub reserved: u32,
}

// The documented layout (KERNELS.md §10).
const _: () = {
    assert!(std::mem::size_of::<RmsNormArgs>() == 56);
    assert!(std::mem::offset_of!(RmsNormArgs, residual_out) == 32);
    assert!(std::mem::offset_of!(RmsNormArgs, tokens) == 40);
    assert!(std::mem::offset_of!(RmsNormArgs, eps) == 48);
};

// SAFETY: `RmsNormArgs` is `#[repr(C)]`, `Copy`, made of integers and one f32 with no padding
// (`Pod`), and the kernels' `struct RmsNormArgs` is generated from it (`abi_header`) with its
// size and offsets checked by `static_assert`, so its bytes are a valid by-value parameter.
unsafe impl cudarc::driver::DeviceRepr for RmsNormArgs {}

// ---------------------------------------------------------------------------------------------
// symm_abi.cuh

/// The C type of a `#define`'s literal in `symm_abi.cuh`, which decides the type of the
/// arithmetic the kernels do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CLiteral {
    /// `int`: no suffix (loop bounds and counts compared with `int` indices).
    Int,
    /// `unsigned int`: suffix `u`.
    Unsigned,
    /// `unsigned long long`: suffix `ULL` (byte offsets, sizes, nanoseconds).
    UnsignedLongLong,
}

impl CLiteral {
    /// The literal's suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            CLiteral::Int => "",
            CLiteral::Unsigned => "u",
            CLiteral::UnsignedLongLong => "ULL",
        }
    }

    /// The largest value a literal of this type holds.
    pub fn max(self) -> u64 {
        match self {
            CLiteral::Int => i32::MAX as u64,
            CLiteral::Unsigned => u64::from(u32::MAX),
            CLiteral::UnsignedLongLong => u64::MAX,
        }
    }
}

/// One `#define` of `symm_abi.cuh`: `#define <name> <value><suffix> // <doc>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbiDefine {
    /// The macro's name.
    pub name: &'static str,
    /// Its value, taken from the Rust constant.
    pub value: u64,
    /// The C type of the literal.
    pub literal: CLiteral,
    /// What it is, one line.
    pub doc: &'static str,
}

/// `AbiDefine`s from `NAME = value, literal type, "doc";` lines.
macro_rules! abi_defines {
    ($($name:ident = $value:expr, $literal:ident, $doc:literal;)*) => {
        &[$(AbiDefine {
            name: stringify!($name),
            value: $value as u64,
            literal: CLiteral::$literal,
            doc: $doc,
        }),*]
    };
}

/// Every `#define` of `symm_abi.cuh`, from the constants of this module. The literal types are
/// those the kernels were written with.
pub const ABI_DEFINES: &[AbiDefine] = abi_defines! {
    SYMM_MAX_WORLD = MAX_WORLD, Int, "most ranks in a group";
    SYMM_MAX_BLOCKS = MAX_BLOCKS, Int, "most blocks of a launch";
    SYMM_BLOCK_THREADS = BLOCK_THREADS, Int, "threads per block";
    SYMM_PHASES = PHASES, Int, "barrier phases";
    SYMM_AREAS = AREAS, Int, "workspace areas";
    SYMM_PARITIES = PARITIES, Int, "epoch parities";
    SYMM_DEFAULT_TIMEOUT_NS = DEFAULT_TIMEOUT_NS, UnsignedLongLong,
        "deadline when SymmArgs::timeout_ns is 0";
    SYMM_ERR_NONE = ERR_NONE, Unsigned, "SymmState::error";
    SYMM_ERR_TIMEOUT = ERR_TIMEOUT, Unsigned, "SymmState::error";
    SYMM_ERR_PEER = ERR_PEER, Unsigned, "SymmState::error";
    SYMM_ERR_ARGS = ERR_ARGS, Unsigned, "SymmState::error";
    SYMM_PAD_FLAGS_OFFSET = PAD_FLAGS_OFFSET, UnsignedLongLong,
        "pad: flags[SYMM_PHASES][SYMM_MAX_BLOCKS][SYMM_MAX_WORLD], u64";
    SYMM_PAD_PEER_ERROR_OFFSET = PAD_PEER_ERROR_OFFSET, UnsignedLongLong,
        "pad: peer_error[SYMM_MAX_WORLD], u32";
    SYMM_PAD_BYTES = PAD_BYTES, UnsignedLongLong, "bytes of the pad";
    SYMM_LL_OFFSET = LL_OFFSET, UnsignedLongLong,
        "LL area, from the pad's base: SYMM_PAD_BYTES rounded up to 256";
    SYMM_LL_MAX_BYTES = LL_MAX_BYTES, UnsignedLongLong, "most payload bytes of one LL slot";
    SYMM_LL_SLOT_BYTES = LL_SLOT_BYTES, UnsignedLongLong,
        "bytes of one LL slot: 16-byte lines of 8 payload bytes";
    SYMM_LL_PHASE = LL_PHASE, Unsigned, "SymmState::error_phase of an LL wait";
    DCP_BLOCK_THREADS = DCP_BLOCK_THREADS, Int, "threads per block of the DCP kernels";
    RMSNORM_BLOCK_THREADS = RMSNORM_BLOCK_THREADS, Int,
        "threads per block of the add-RMSNorm kernels";
    RMSNORM_MAX_UNITS = RMSNORM_MAX_UNITS, Int,
        "16-byte units of a row one add-RMSNorm thread holds";
};

/// The C spelling of a Rust field type: an element type and, for arrays, a length.
trait CField {
    const C_TYPE: &'static str;
    const LEN: Option<usize>;
}

macro_rules! c_scalar {
    ($rust:ty, $c:literal) => {
        impl CField for $rust {
            const C_TYPE: &'static str = $c;
            const LEN: Option<usize> = None;
        }
        impl<const N: usize> CField for [$rust; N] {
            const C_TYPE: &'static str = $c;
            const LEN: Option<usize> = Some(N);
        }
    };
}

c_scalar!(u64, "unsigned long long");
c_scalar!(u32, "unsigned int");
c_scalar!(f32, "float");

/// One field of a struct of `symm_abi.cuh`, read off its Rust mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbiField {
    /// The C name (`in` for Rust's `input`: `in` is a Rust keyword).
    pub name: &'static str,
    /// The C element type.
    pub c_type: &'static str,
    /// The array length, for arrays.
    pub len: Option<usize>,
    /// Bytes of the Rust field.
    pub size: usize,
    /// The Rust field's offset (`offset_of!`).
    pub offset: usize,
    /// What it is, one line.
    pub doc: &'static str,
}

impl AbiField {
    /// The field that `project` picks out of an `S`, at `offset`; its C type comes from the Rust
    /// type of the projection.
    fn of<S, F: CField>(
        _project: fn(&S) -> &F,
        name: &'static str,
        offset: usize,
        doc: &'static str,
    ) -> Self {
        AbiField {
            name,
            c_type: F::C_TYPE,
            len: F::LEN,
            size: std::mem::size_of::<F>(),
            offset,
            doc,
        }
    }

    /// The declaration, without the `;`: `unsigned long long ws[8]`.
    pub fn declaration(&self) -> String {
        match self.len {
            Some(n) => format!("{} {}[{n}]", self.c_type, self.name),
            None => format!("{} {}", self.c_type, self.name),
        }
    }
}

/// The `AbiField`s of struct `$s` from `rust_field => "c_name", "doc";` lines, in order.
macro_rules! abi_fields {
    ($s:ty; $($field:ident => $c:literal, $doc:literal;)*) => {
        vec![$(AbiField::of(
            |s: &$s| &s.$field,
            $c,
            std::mem::offset_of!($s, $field),
            $doc,
        )),*]
    };
}

/// One struct of `symm_abi.cuh`, read off its Rust mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbiStruct {
    /// The C (and Rust) name.
    pub name: &'static str,
    /// What it is, one line.
    pub doc: &'static str,
    /// `size_of` of the Rust struct.
    pub size: usize,
    /// `align_of` of the Rust struct.
    pub align: usize,
    /// The fields in declaration order.
    pub fields: Vec<AbiField>,
}

/// The structs the kernels share with the host, in the order `symm_abi.cuh` declares them.
pub fn abi_structs() -> Vec<AbiStruct> {
    vec![
        AbiStruct {
            name: "SymmArgs",
            doc: "The by-value argument of every collective kernel; addresses as this rank sees \
                  them.",
            size: std::mem::size_of::<SymmArgs>(),
            align: std::mem::align_of::<SymmArgs>(),
            fields: abi_fields! { SymmArgs;
                ws => "ws", "rank p's workspace base";
                pad => "pad", "rank p's signal pad base";
                input => "in", "this rank's input";
                output => "out", "this rank's output";
                count => "count", "elements (bytes for the all-gathers), see KERNELS.md";
                slot_bytes => "slot_bytes", "bytes of one workspace slot, a multiple of 16";
                state => "state", "this rank's SymmState";
                timeout_ns => "timeout_ns", "flag-wait deadline; 0: SYMM_DEFAULT_TIMEOUT_NS";
                rank => "rank", "this rank, < world";
                world => "world", "ranks, 2..SYMM_MAX_WORLD";
            },
        },
        AbiStruct {
            name: "SymmState",
            doc: "One rank's local state, zeroed once by the host before the first launch.",
            size: std::mem::size_of::<SymmState>(),
            align: std::mem::align_of::<SymmState>(),
            fields: abi_fields! { SymmState;
                epoch => "epoch", "launches completed on this group";
                error_epoch => "error_epoch", "epoch of the launch that recorded error";
                blocks_done => "blocks_done", "blocks of the running launch that started; 0 between";
                error => "error", "SYMM_ERR_*; sticky until the host clears it";
                error_src => "error_src", "peer waited on (TIMEOUT) or that reported (PEER)";
                error_block => "error_block", "block that recorded the error";
                error_phase => "error_phase", "barrier phase (or SYMM_LL_PHASE) of the error";
                reserved => "reserved", "unused";
            },
        },
        AbiStruct {
            name: "DcpArgs",
            doc: "The second by-value argument of the DCP kernels (dcp.cu).",
            size: std::mem::size_of::<DcpArgs>(),
            align: std::mem::align_of::<DcpArgs>(),
            fields: abi_fields! { DcpArgs;
                partial => "partial", "[B, H, D] partial output of this rank";
                lse => "lse", "correct: [N, B, H] f32 of every rank; fused: [B, H] f32";
                out => "out", "correct: [H, B, D]; fused: [H/N, B, D]";
                merged_lse => "merged_lse", "[B, H/N] f32, or 0 for none";
                world => "world", "N";
                rank => "rank", "this rank, < N";
                batch => "batch", "B";
                heads => "heads", "H, a multiple of N";
                dim => "dim", "D, a multiple of 8";
                base2 => "base2", "1: LSEs are log2, 0: natural log";
            },
        },
        AbiStruct {
            name: "RmsNormArgs",
            doc: "The second by-value argument of the add-RMSNorm kernels (rmsnorm.cu).",
            size: std::mem::size_of::<RmsNormArgs>(),
            align: std::mem::align_of::<RmsNormArgs>(),
            fields: abi_fields! { RmsNormArgs;
                input => "input", "[tokens, hidden]: partial sums (fused) or reduced rows";
                residual => "residual", "[tokens, hidden], or [tokens / world, hidden]";
                weight => "weight", "[hidden]";
                normed => "normed", "normalised output, shaped like the residual";
                residual_out => "residual_out", "new residual; may equal residual";
                tokens => "tokens", "rows of input";
                hidden => "hidden", "elements per row, whole 16-byte units";
                eps => "eps", "RMSNorm epsilon";
                reserved => "reserved", "unused";
            },
        },
    ]
}

/// The text of `symm_abi.cuh`: [`ABI_DEFINES`] and [`abi_structs`], with the `static_assert`s
/// that make NVRTC check the structs' layout against Rust's.
pub fn abi_header() -> String {
    render_abi_header(ABI_DEFINES, &abi_structs())
}

/// The text of a `symm_abi.cuh` for these defines and structs ([`abi_header`] renders the real
/// ones; tests render wrong ones to see NVRTC reject them).
pub fn render_abi_header(defines: &[AbiDefine], structs: &[AbiStruct]) -> String {
    let mut lines: Vec<String> = [
        "// symm_abi.cuh: the kernels' ABI, generated by symmcomm::kernels::abi_header() from",
        "// crates/symmcomm/src/kernels/abi.rs, the one place it is written; NVRTC receives it in",
        "// memory. Every value and struct below comes from a Rust constant or #[repr(C)] struct,",
        "// and the static_asserts hold the sizes and offsets rustc computed. Meaning: KERNELS.md.",
        "",
        "#pragma once",
        "",
    ]
    .map(String::from)
    .to_vec();
    let width = defines
        .iter()
        .map(|d| d.name.len() + 1 + d.value.to_string().len() + d.literal.suffix().len())
        .max()
        .unwrap_or(0);
    for d in defines {
        let def = format!("{} {}{}", d.name, d.value, d.literal.suffix());
        lines.push(format!("#define {def:<width$} // {}", d.doc));
    }
    lines.extend(
        [
            "",
            "// A field's offset as a constant expression. NVRTC has neither <cstddef> nor",
            "// __builtin_offsetof; __INTADDR__ is its front end's (EDG's) integral constant",
            "// address, the builtin that front end's own offsetof is made of.",
            "#define SYMM_ABI_OFFSETOF(type, field) __INTADDR__(&(((type*)0)->field))",
        ]
        .map(String::from),
    );
    for s in structs {
        lines.push(String::new());
        lines.push(format!("// {}", s.doc));
        lines.push(format!("struct {} {{", s.name));
        let width = s
            .fields
            .iter()
            .map(|f| f.declaration().len() + 1)
            .max()
            .unwrap_or(0);
        for f in &s.fields {
            let decl = format!("{};", f.declaration());
            lines.push(format!("    {decl:<width$} // {}", f.doc));
        }
        lines.push("};".to_string());
        lines.push(format!(
            "static_assert(sizeof({0}) == {1}, \"{0}: size differs from Rust's {1}\");",
            s.name, s.size
        ));
        lines.push(format!(
            "static_assert(alignof({0}) == {1}, \"{0}: alignment differs from Rust's {1}\");",
            s.name, s.align
        ));
        for f in &s.fields {
            lines.push(format!(
                "static_assert(SYMM_ABI_OFFSETOF({0}, {1}) == {2}, \"{0}::{1}: offset differs \
                 from Rust's {2}\");",
                s.name, f.name, f.offset
            ));
        }
    }
    lines.push(String::new());
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(name, value)` of every `#define` line of a header, the value as written.
    fn defines_of(header: &str) -> Vec<(String, String)> {
        header
            .lines()
            .filter_map(|l| l.strip_prefix("#define "))
            .map(|l| {
                let l = l.split("//").next().unwrap_or("").trim();
                let (name, value) = l.split_once(' ').unwrap_or((l, ""));
                (name.to_string(), value.trim().to_string())
            })
            .collect()
    }

    #[test]
    fn header_defines_every_constant_with_its_rust_value() {
        let header = abi_header();
        let defines = defines_of(&header);
        // Written out against the constants, not read from ABI_DEFINES: the table must say
        // exactly this.
        let expected = [
            ("SYMM_MAX_WORLD", format!("{MAX_WORLD}")),
            ("SYMM_MAX_BLOCKS", format!("{MAX_BLOCKS}")),
            ("SYMM_BLOCK_THREADS", format!("{BLOCK_THREADS}")),
            ("SYMM_PHASES", format!("{PHASES}")),
            ("SYMM_AREAS", format!("{AREAS}")),
            ("SYMM_PARITIES", format!("{PARITIES}")),
            (
                "SYMM_DEFAULT_TIMEOUT_NS",
                format!("{DEFAULT_TIMEOUT_NS}ULL"),
            ),
            ("SYMM_ERR_NONE", format!("{ERR_NONE}u")),
            ("SYMM_ERR_TIMEOUT", format!("{ERR_TIMEOUT}u")),
            ("SYMM_ERR_PEER", format!("{ERR_PEER}u")),
            ("SYMM_ERR_ARGS", format!("{ERR_ARGS}u")),
            ("SYMM_PAD_FLAGS_OFFSET", format!("{PAD_FLAGS_OFFSET}ULL")),
            (
                "SYMM_PAD_PEER_ERROR_OFFSET",
                format!("{PAD_PEER_ERROR_OFFSET}ULL"),
            ),
            ("SYMM_PAD_BYTES", format!("{PAD_BYTES}ULL")),
            ("SYMM_LL_OFFSET", format!("{LL_OFFSET}ULL")),
            ("SYMM_LL_MAX_BYTES", format!("{LL_MAX_BYTES}ULL")),
            ("SYMM_LL_SLOT_BYTES", format!("{LL_SLOT_BYTES}ULL")),
            ("SYMM_LL_PHASE", format!("{LL_PHASE}u")),
            ("DCP_BLOCK_THREADS", format!("{DCP_BLOCK_THREADS}")),
            ("RMSNORM_BLOCK_THREADS", format!("{RMSNORM_BLOCK_THREADS}")),
            ("RMSNORM_MAX_UNITS", format!("{RMSNORM_MAX_UNITS}")),
        ];
        for (name, value) in &expected {
            let found: Vec<&(String, String)> = defines.iter().filter(|(n, _)| n == name).collect();
            assert_eq!(
                found.len(),
                1,
                "#define {name} appears {} times",
                found.len()
            );
            assert_eq!(&found[0].1, value, "#define {name}");
        }
        // Nothing else but the offsetof helper.
        let mut names: Vec<&str> = defines.iter().map(|(n, _)| n.as_str()).collect();
        names.retain(|n| !n.starts_with("SYMM_ABI_OFFSETOF"));
        assert_eq!(names.len(), expected.len(), "{names:?}");
        // Every literal fits its C type.
        for d in ABI_DEFINES {
            assert!(
                d.value <= d.literal.max(),
                "{} overflows its literal",
                d.name
            );
        }
    }

    #[test]
    fn documented_layout_values() {
        // KERNELS.md §3 states these numbers; a change is a change of the protocol's memory.
        assert_eq!(PAD_PEER_ERROR_OFFSET, 16384);
        assert_eq!(PAD_BYTES, 16416);
        assert_eq!(LL_OFFSET, 16640);
        assert_eq!(LL_SLOT_BYTES, 1 << 20);
        assert_eq!(ll_area_bytes(2), 4 << 20);
        assert_eq!(workspace_bytes(4, 4096), 65536);
    }

    #[test]
    fn structs_cover_every_byte_of_their_rust_mirror() {
        let structs = abi_structs();
        let names: Vec<&str> = structs.iter().map(|s| s.name).collect();
        assert_eq!(names, ["SymmArgs", "SymmState", "DcpArgs", "RmsNormArgs"]);
        for s in &structs {
            // Fields in order, back to back, up to the size: no field of the Rust struct can be
            // missing from the table (it would leave a gap), and there is no padding.
            let mut end = 0;
            for f in &s.fields {
                assert_eq!(f.offset, end, "{}::{} does not follow on", s.name, f.name);
                let elem = match f.c_type {
                    "unsigned long long" => 8,
                    "unsigned int" | "float" => 4,
                    other => panic!("{}::{}: C type {other}", s.name, f.name),
                };
                assert_eq!(
                    elem * f.len.unwrap_or(1),
                    f.size,
                    "{}::{}: the C declaration's size is not the Rust field's",
                    s.name,
                    f.name
                );
                end += f.size;
            }
            assert_eq!(end, s.size, "{}: fields do not fill the struct", s.name);
        }
        assert_eq!(structs[0].size, 184);
        assert_eq!(structs[1].size, 64);
        assert_eq!(structs[2].size, 56);
        assert_eq!(structs[3].size, 56);
        assert_eq!(rmsnorm_max_hidden(2), 16384);
    }

    #[test]
    fn header_declares_and_checks_every_field() {
        let header = abi_header();
        for s in abi_structs() {
            assert!(header.contains(&format!("struct {} {{", s.name)));
            assert!(header.contains(&format!("static_assert(sizeof({}) == {}", s.name, s.size)));
            assert!(header.contains(&format!("static_assert(alignof({}) == {}", s.name, s.align)));
            for f in &s.fields {
                assert!(
                    header.contains(&format!("    {};", f.declaration())),
                    "{}::{} not declared",
                    s.name,
                    f.name
                );
                assert!(
                    header.contains(&format!(
                        "static_assert(SYMM_ABI_OFFSETOF({}, {}) == {},",
                        s.name, f.name, f.offset
                    )),
                    "{}::{} offset not checked",
                    s.name,
                    f.name
                );
            }
        }
        assert!(header.contains("    unsigned long long ws[8];"));
        assert!(header.contains("    unsigned long long in;"));
        assert!(header.contains("    unsigned int reserved[7];"));
        assert!(header.contains("static_assert(SYMM_ABI_OFFSETOF(SymmArgs, world) == 180,"));
        assert!(header.contains("static_assert(SYMM_ABI_OFFSETOF(DcpArgs, base2) == 52,"));
        assert!(header.contains("    float eps;"));
        assert!(header.contains("static_assert(SYMM_ABI_OFFSETOF(RmsNormArgs, eps) == 48,"));
    }
}
