//! Our CUDA kernels, as source, and the run-time compiler that turns them into a CUBIN for the
//! GPU at hand: NVRTC (loaded by cudarc), with an in-process and an on-disk cache keyed by the
//! source and headers, the options, NVRTC's version and the architecture.
//!
//! The kernels' ABI (the by-value arguments [`SymmArgs`], [`DcpArgs`] and [`RmsNormArgs`], the per-rank
//! [`SymmState`], the signal-pad and workspace layouts, the launch limits) is written once, in
//! [`abi`], and reaches the kernels as the generated header `symm_abi.cuh` ([`headers`]).
//! `KERNELS.md` next to this crate's `Cargo.toml` describes all of it and the synchronisation
//! protocol.

// Public only with the `lab` feature (the lab's NVRTC tests and GPU failure tests reach in);
// without it these items serve the library alone.
#![cfg_attr(
    not(feature = "lab"),
    allow(unreachable_pub, dead_code, unused_imports)
)]

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int};
use std::fmt;
use std::io::Write as _;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use cudarc::nvrtc::sys as nvrtc;

use crate::dtype::DType;
use crate::error::{Error, Result};

pub mod abi;

pub use abi::{
    AREAS, BLOCK_THREADS, DCP_BLOCK_THREADS, DEFAULT_TIMEOUT_NS, DcpArgs, ERR_ARGS, ERR_NONE,
    ERR_PEER, ERR_TIMEOUT, LL_MAX_BYTES, LL_OFFSET, LL_PHASE, LL_SLOT_BYTES, MAX_BLOCKS, MAX_WORLD,
    PAD_BYTES, PAD_FLAGS_OFFSET, PAD_PEER_ERROR_OFFSET, PARITIES, PHASES, RMSNORM_BLOCK_THREADS,
    RMSNORM_MAX_UNITS, RmsNormArgs, SymmArgs, SymmState, abi_header, ll_area_bytes,
    rmsnorm_max_hidden, workspace_bytes,
};

/// One `.cu` file of `kernels/`, compiled by NVRTC as one program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelModule {
    /// The file's stem (`util` for `kernels/util.cu`); names the program, cache files and errors.
    pub name: &'static str,
    /// The CUDA C++ source.
    pub source: &'static str,
}

/// `kernels/util.cu`: the reference fill (and a slow one for PDL tests), the epoch bump, the PDL
/// guard and the flag ping-pong.
pub const UTIL: KernelModule = KernelModule {
    name: "util",
    source: include_str!("../kernels/util.cu"),
};

/// `kernels/collectives.cu`: one-shot and two-shot all-reduce, all-gather, reduce-scatter, their
/// low-latency (LL) variants and the bare barrier over symmetric memory.
pub const COLLECTIVES: KernelModule = KernelModule {
    name: "collectives",
    source: include_str!("../kernels/collectives.cu"),
};

/// `kernels/dcp.cu`: the DCP combine's correction step and its fused one-kernel combine (which
/// speaks the synchronisation protocol of `symm_protocol.cuh`).
pub const DCP: KernelModule = KernelModule {
    name: "dcp",
    source: include_str!("../kernels/dcp.cu"),
};

/// `kernels/rmsnorm.cu`: the residual add and RMSNorm, alone (after a collective) and fused
/// with the all-reduce or reduce-scatter before it (speaking the protocol of
/// `symm_protocol.cuh`).
pub const RMSNORM: KernelModule = KernelModule {
    name: "rmsnorm",
    source: include_str!("../kernels/rmsnorm.cu"),
};

/// Every kernel module.
pub const MODULES: &[KernelModule] = &[UTIL, COLLECTIVES, DCP, RMSNORM];

/// A header the modules may `#include "<name>"`, handed to NVRTC in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelHeader {
    /// The name the modules include it by.
    pub name: &'static str,
    /// The CUDA C++ source.
    pub source: String,
}

/// Every header the modules may include: `symm_common.cuh` (device plumbing), `symm_abi.cuh`
/// (generated from [`abi`] by [`abi_header`]) and `symm_protocol.cuh` (the synchronisation
/// protocol that `collectives.cu`, `dcp.cu` and `rmsnorm.cu` speak). They are part of every
/// module's compile-cache key.
pub fn headers() -> &'static [KernelHeader] {
    static HEADERS: LazyLock<Vec<KernelHeader>> = LazyLock::new(|| {
        vec![
            KernelHeader {
                name: "symm_common.cuh",
                source: include_str!("../kernels/symm_common.cuh").to_string(),
            },
            KernelHeader {
                name: "symm_abi.cuh",
                source: abi_header(),
            },
            KernelHeader {
                name: "symm_protocol.cuh",
                source: include_str!("../kernels/symm_protocol.cuh").to_string(),
            },
        ]
    });
    &HEADERS
}

/// The collective kernels of `collectives.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CollectiveKernel {
    /// `symm_oneshot_allreduce_{bf16,f16,f32}`: push the whole input to every peer, reduce locally.
    OneShotAllReduce,
    /// `symm_twoshot_allreduce_{bf16,f16,f32}`: reduce-scatter, then all-gather of the pieces.
    TwoShotAllReduce,
    /// `symm_allgather`: bytes, any dtype.
    AllGather,
    /// `symm_reducescatter_{bf16,f16,f32}`.
    ReduceScatter,
    /// `symm_barrier`: the epoch and flag barrier alone.
    Barrier,
    /// `symm_ll_allreduce_{bf16,f16,f32}`: one-shot with the low-latency protocol (flags in the
    /// data, no barrier), for pieces up to [`LL_MAX_BYTES`].
    LlAllReduce,
    /// `symm_ll_allgather`: bytes, any dtype, low-latency protocol.
    LlAllGather,
    /// `symm_ll_reducescatter_{bf16,f16,f32}`: low-latency protocol.
    LlReduceScatter,
}

impl CollectiveKernel {
    /// Every collective kernel.
    pub const ALL: [CollectiveKernel; 8] = [
        CollectiveKernel::OneShotAllReduce,
        CollectiveKernel::TwoShotAllReduce,
        CollectiveKernel::AllGather,
        CollectiveKernel::ReduceScatter,
        CollectiveKernel::Barrier,
        CollectiveKernel::LlAllReduce,
        CollectiveKernel::LlAllGather,
        CollectiveKernel::LlReduceScatter,
    ];

    /// The kernel's function name for `dtype`, or `None` if there is no such kernel (reductions
    /// exist for floats only).
    pub fn function(self, dtype: DType) -> Option<&'static str> {
        use CollectiveKernel as K;
        Some(match (self, dtype) {
            (K::OneShotAllReduce, DType::BF16) => "symm_oneshot_allreduce_bf16",
            (K::OneShotAllReduce, DType::F16) => "symm_oneshot_allreduce_f16",
            (K::OneShotAllReduce, DType::F32) => "symm_oneshot_allreduce_f32",
            (K::TwoShotAllReduce, DType::BF16) => "symm_twoshot_allreduce_bf16",
            (K::TwoShotAllReduce, DType::F16) => "symm_twoshot_allreduce_f16",
            (K::TwoShotAllReduce, DType::F32) => "symm_twoshot_allreduce_f32",
            (K::ReduceScatter, DType::BF16) => "symm_reducescatter_bf16",
            (K::ReduceScatter, DType::F16) => "symm_reducescatter_f16",
            (K::ReduceScatter, DType::F32) => "symm_reducescatter_f32",
            (K::LlAllReduce, DType::BF16) => "symm_ll_allreduce_bf16",
            (K::LlAllReduce, DType::F16) => "symm_ll_allreduce_f16",
            (K::LlAllReduce, DType::F32) => "symm_ll_allreduce_f32",
            (K::LlReduceScatter, DType::BF16) => "symm_ll_reducescatter_bf16",
            (K::LlReduceScatter, DType::F16) => "symm_ll_reducescatter_f16",
            (K::LlReduceScatter, DType::F32) => "symm_ll_reducescatter_f32",
            (K::AllGather, _) => "symm_allgather",
            (K::LlAllGather, _) => "symm_ll_allgather",
            (K::Barrier, _) => "symm_barrier",
            _ => return None,
        })
    }

    /// [`SymmArgs::count`] for `elements` of `dtype`: the whole buffer (all-reduce) or one
    /// rank's piece (all-gather, reduce-scatter). All-gather counts bytes.
    pub fn args_count(self, elements: u64, dtype: DType) -> u64 {
        match self {
            CollectiveKernel::AllGather | CollectiveKernel::LlAllGather => {
                elements * dtype.size() as u64
            }
            _ => elements,
        }
    }

    /// The least [`SymmArgs::slot_bytes`] the kernel accepts for `count` (as in [`SymmArgs`])
    /// of `dtype` on `world` ranks, rounded up to 16 bytes.
    pub fn slot_bytes_needed(self, count: u64, dtype: DType, world: u32) -> u64 {
        let es = dtype.size() as u64;
        let bytes = match self {
            CollectiveKernel::OneShotAllReduce | CollectiveKernel::ReduceScatter => count * es,
            CollectiveKernel::TwoShotAllReduce => {
                let unit = 16 / es;
                count.div_ceil(u64::from(world.max(1))).div_ceil(unit) * unit * es
            }
            CollectiveKernel::AllGather => count,
            CollectiveKernel::Barrier
            | CollectiveKernel::LlAllReduce
            | CollectiveKernel::LlAllGather
            | CollectiveKernel::LlReduceScatter => 0,
        };
        bytes.div_ceil(16) * 16
    }

    /// Payload bytes per piece of an LL kernel for `count` (as in [`SymmArgs`]) of `dtype`: at
    /// most [`LL_MAX_BYTES`]. `None` for the other kernels.
    pub fn ll_payload_bytes(self, count: u64, dtype: DType) -> Option<u64> {
        match self {
            CollectiveKernel::LlAllReduce | CollectiveKernel::LlReduceScatter => {
                Some(count * dtype.size() as u64)
            }
            CollectiveKernel::LlAllGather => Some(count),
            _ => None,
        }
    }
}
/// The DCP kernel of `dcp.cu` for a partial-output and an output type: `fused` or the
/// correction step (`dcp_fused_bf16_bf16`, `dcp_correct_f32_bf16`, ...); `None` for types it
/// does not take (bf16 and f32 only).
pub fn dcp_function(fused: bool, partial: DType, out: DType) -> Option<&'static str> {
    use DType::{BF16, F32};
    Some(match (fused, partial, out) {
        (false, BF16, BF16) => "dcp_correct_bf16_bf16",
        (false, BF16, F32) => "dcp_correct_bf16_f32",
        (false, F32, BF16) => "dcp_correct_f32_bf16",
        (false, F32, F32) => "dcp_correct_f32_f32",
        (true, BF16, BF16) => "dcp_fused_bf16_bf16",
        (true, BF16, F32) => "dcp_fused_bf16_f32",
        (true, F32, BF16) => "dcp_fused_f32_bf16",
        (true, F32, F32) => "dcp_fused_f32_f32",
        _ => return None,
    })
}

/// The kernels of `rmsnorm.cu`: the add-RMSNorm step alone, and fused with the collective before
/// it (KERNELS.md §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormKernel {
    /// `symm_add_rmsnorm_{bf16,f16}`: the residual add and RMSNorm of rows already reduced (no
    /// communication).
    AddRmsNorm,
    /// `symm_ll_allreduce_rmsnorm_*`: LL all-reduce, add, RMSNorm of every row on every rank.
    LlAllReduce,
    /// `symm_oneshot_allreduce_rmsnorm_*`: one-shot all-reduce (one barrier), add, RMSNorm.
    OneShotAllReduce,
    /// `symm_twoshot_allreduce_rmsnorm_*`: reduce-scatter of rows, add and RMSNorm of the rank's
    /// rows, all-gather of both outputs (two barriers).
    TwoShotAllReduce,
    /// `symm_ll_reducescatter_rmsnorm_*`: LL reduce-scatter of rows, add, RMSNorm.
    LlReduceScatter,
    /// `symm_reducescatter_rmsnorm_*`: reduce-scatter of rows (one barrier), add, RMSNorm.
    ReduceScatter,
}

impl NormKernel {
    /// Every kernel of `rmsnorm.cu`.
    pub const ALL: [NormKernel; 6] = [
        NormKernel::AddRmsNorm,
        NormKernel::LlAllReduce,
        NormKernel::OneShotAllReduce,
        NormKernel::TwoShotAllReduce,
        NormKernel::LlReduceScatter,
        NormKernel::ReduceScatter,
    ];

    /// The kernel's function name for `dtype`, or `None` (bf16 and f16 only).
    pub fn function(self, dtype: DType) -> Option<&'static str> {
        use NormKernel as K;
        Some(match (self, dtype) {
            (K::AddRmsNorm, DType::BF16) => "symm_add_rmsnorm_bf16",
            (K::AddRmsNorm, DType::F16) => "symm_add_rmsnorm_f16",
            (K::LlAllReduce, DType::BF16) => "symm_ll_allreduce_rmsnorm_bf16",
            (K::LlAllReduce, DType::F16) => "symm_ll_allreduce_rmsnorm_f16",
            (K::OneShotAllReduce, DType::BF16) => "symm_oneshot_allreduce_rmsnorm_bf16",
            (K::OneShotAllReduce, DType::F16) => "symm_oneshot_allreduce_rmsnorm_f16",
            (K::TwoShotAllReduce, DType::BF16) => "symm_twoshot_allreduce_rmsnorm_bf16",
            (K::TwoShotAllReduce, DType::F16) => "symm_twoshot_allreduce_rmsnorm_f16",
            (K::LlReduceScatter, DType::BF16) => "symm_ll_reducescatter_rmsnorm_bf16",
            (K::LlReduceScatter, DType::F16) => "symm_ll_reducescatter_rmsnorm_f16",
            (K::ReduceScatter, DType::BF16) => "symm_reducescatter_rmsnorm_bf16",
            (K::ReduceScatter, DType::F16) => "symm_reducescatter_rmsnorm_f16",
            _ => return None,
        })
    }

    /// The least [`SymmArgs::slot_bytes`] the kernel accepts for `tokens` rows of `hidden`
    /// elements of `es` bytes on `world` ranks: the whole input (one-shot), one rank's rows
    /// (reduce-scatter), or one rank's rows of both outputs (two-shot's second area); 0 for the
    /// kernels that use no workspace. Rows per rank: `ceil(tokens / world)`.
    pub fn slot_bytes_needed(self, tokens: u64, hidden: u64, es: u64, world: u64) -> u64 {
        let row = hidden * es;
        let slice = tokens.div_ceil(world.max(1));
        match self {
            NormKernel::OneShotAllReduce => tokens * row,
            NormKernel::TwoShotAllReduce => 2 * slice * row,
            NormKernel::ReduceScatter => slice * row,
            NormKernel::AddRmsNorm | NormKernel::LlAllReduce | NormKernel::LlReduceScatter => 0,
        }
    }

    /// LL payload bytes per piece for `tokens` rows of `row_bytes` on `world` ranks (the whole
    /// input for the all-reduce, one rank's rows for the reduce-scatter); `None` for the other
    /// kernels.
    pub fn ll_payload_bytes(self, tokens: u64, row_bytes: u64, world: u64) -> Option<u64> {
        match self {
            NormKernel::LlAllReduce => Some(tokens * row_bytes),
            NormKernel::LlReduceScatter => Some(tokens / world.max(1) * row_bytes),
            _ => None,
        }
    }
}

/// The fill kernel of `util.cu` for `dtype` (`symm_fill_bf16`, ...).
pub fn fill_function(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "symm_fill_f32",
        DType::F16 => "symm_fill_f16",
        DType::BF16 => "symm_fill_bf16",
        DType::I32 => "symm_fill_i32",
        DType::U8 => "symm_fill_u8",
    }
}

// ---------------------------------------------------------------------------------------------
// The compiler.

/// NVRTC target for a GPU of compute capability `major.minor`: the arch-specific `sm_90a` on
/// Hopper (9.0) and `sm_100a` on Blackwell (10.0), where the `a` features (`griddepcontrol`,
/// and later wgmma/tcgen05) live; `sm_{major}{minor}` otherwise.
pub fn arch_for(major: i32, minor: i32) -> String {
    match (major, minor) {
        (9, 0) => "sm_90a".to_string(),
        (10, 0) => "sm_100a".to_string(),
        _ => format!("sm_{major}{minor}"),
    }
}

/// How often [`NvrtcCompiler::compile`] answered from each place, since the compiler was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Answered from this process's memory.
    pub memory_hits: u64,
    /// Read from the on-disk cache.
    pub disk_hits: u64,
    /// Compiled by NVRTC.
    pub compiles: u64,
}

/// Compiles [`KernelModule`]s to CUBINs with NVRTC: once per compiler (keep one per process)
/// and, across processes, through an on-disk cache. `Send + Sync`.
///
/// Errors: [`Error::NoGpu`] when NVRTC or the CUDA headers are missing from this machine (the
/// caller falls back or skips, as it does without a GPU); [`Error::Nvrtc`] when NVRTC rejects a
/// module, with NVRTC's log.
pub struct NvrtcCompiler {
    version: (i32, i32),
    include_dir: PathBuf,
    cache_dir: Option<PathBuf>,
    /// Finished CUBINs by cache key. Held while compiling, so a module compiles once even
    /// when several threads ask at once.
    compiled: Mutex<HashMap<u128, Arc<Vec<u8>>>>,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    compiles: AtomicU64,
}

impl fmt::Debug for NvrtcCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NvrtcCompiler")
            .field("version", &self.version)
            .field("include_dir", &self.include_dir)
            .field("cache_dir", &self.cache_dir)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Where the headers may be, in order; the first holding `cuda_bf16.h` wins.
fn include_candidates() -> Vec<(String, PathBuf)> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("SYMMCOMM_CUDA_INCLUDE").filter(|d| !d.is_empty()) {
        dirs.push(("SYMMCOMM_CUDA_INCLUDE".to_string(), PathBuf::from(dir)));
    }
    if let Some(home) = std::env::var_os("CUDA_HOME").filter(|d| !d.is_empty()) {
        dirs.push((
            "$CUDA_HOME/include".to_string(),
            Path::new(&home).join("include"),
        ));
    }
    for dir in [
        "/usr/local/cuda/include",
        "/usr/local/cuda-13.0/targets/x86_64-linux/include",
    ] {
        dirs.push((dir.to_string(), PathBuf::from(dir)));
    }
    dirs
}

fn find_include_dir() -> Result<PathBuf> {
    let candidates = include_candidates();
    if let Some((_, dir)) = candidates
        .iter()
        .find(|(_, dir)| dir.join("cuda_bf16.h").is_file())
    {
        return Ok(dir.clone());
    }
    let tried: Vec<String> = candidates
        .iter()
        .map(|(what, dir)| {
            if what.starts_with('/') {
                what.clone()
            } else {
                format!("{} ({what})", dir.display())
            }
        })
        .collect();
    Err(Error::NoGpu {
        reason: format!(
            "cannot compile kernels: no cuda_bf16.h in {}; set SYMMCOMM_CUDA_INCLUDE to a CUDA \
             include folder (`source scripts/nvrtc-env.sh` fetches one from PyPI)",
            tried.join(", ")
        ),
    })
}

/// `SYMMCOMM_KERNEL_CACHE` (`off` disables the disk cache), else
/// `$XDG_CACHE_HOME/symmcomm/kernels`, else `$HOME/.cache/symmcomm/kernels`.
fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SYMMCOMM_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return (dir != "off").then(|| PathBuf::from(dir));
    }
    // The XDG spec ignores relative paths.
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from)
        && xdg.is_absolute()
    {
        return Some(xdg.join("symmcomm").join("kernels"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| {
            Path::new(&home)
                .join(".cache")
                .join("symmcomm")
                .join("kernels")
        })
}

/// NVRTC's description of a result code.
fn nvrtc_error_string(code: nvrtc::nvrtcResult) -> String {
    // SAFETY: nvrtcGetErrorString accepts any result code and returns a pointer to a static,
    // NUL-terminated string (or null, handled below); NVRTC is loaded (checked in `new`).
    let ptr = unsafe { nvrtc::nvrtcGetErrorString(code) };
    if ptr.is_null() {
        return format!("{code:?}");
    }
    // SAFETY: non-null pointers from nvrtcGetErrorString are static C strings.
    unsafe { std::ffi::CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// The NUL-terminated strings one NVRTC compile reads: the module's source and file name, the
/// options and every header of [`headers`], with their counts as NVRTC takes them.
struct ProgramInputs {
    source: CString,
    name: CString,
    options: Vec<CString>,
    num_options: c_int,
    header_sources: Vec<CString>,
    header_names: Vec<CString>,
    num_headers: c_int,
}

impl ProgramInputs {
    /// `module` and `options` as C strings; a NUL byte inside any of them, or more than
    /// `c_int::MAX` options or headers, is `fail`'s error.
    fn new(
        module: &KernelModule,
        options: &[String],
        fail: &dyn Fn(String) -> Error,
    ) -> Result<Self> {
        let source = CString::new(module.source)
            .map_err(|_| fail("the source contains a NUL byte".to_string()))?;
        let name = CString::new(format!("{}.cu", module.name))
            .map_err(|_| fail("the module name contains a NUL byte".to_string()))?;
        let options: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| fail("an option contains a NUL byte".to_string()))?;
        let num_options =
            c_int::try_from(options.len()).map_err(|_| fail("too many options".to_string()))?;

        let headers = headers();
        let header_sources: Vec<CString> = headers
            .iter()
            .map(|h| CString::new(h.source.as_str()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| fail("a header contains a NUL byte".to_string()))?;
        let header_names: Vec<CString> = headers
            .iter()
            .map(|h| CString::new(h.name))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| fail("a header name contains a NUL byte".to_string()))?;
        let num_headers =
            c_int::try_from(headers.len()).map_err(|_| fail("too many headers".to_string()))?;
        Ok(ProgramInputs {
            source,
            name,
            options,
            num_options,
            header_sources,
            header_names,
            num_headers,
        })
    }
}

/// The pointers NVRTC takes for `strings`, valid while `strings` lives.
fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings.iter().map(|s| s.as_ptr()).collect()
}

/// Destroys an NVRTC program on every path out of a compile. It borrows the strings it was
/// created from, so that they outlive it.
struct Program<'a>(nvrtc::nvrtcProgram, PhantomData<&'a ProgramInputs>);

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: self.0 came from nvrtcCreateProgram and is destroyed only here, once.
        let code = unsafe { nvrtc::nvrtcDestroyProgram(&mut self.0) };
        if code != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            tracing::warn!("nvrtcDestroyProgram: {}", nvrtc_error_string(code));
        }
    }
}

impl<'a> Program<'a> {
    /// A program of `inputs`' source, name and headers; `fail` makes the error of a call that
    /// fails.
    fn create(inputs: &'a ProgramInputs, fail: &dyn Fn(String) -> Error) -> Result<Self> {
        let header_source_ptrs = pointers(&inputs.header_sources);
        let header_name_ptrs = pointers(&inputs.header_names);
        let mut raw: nvrtc::nvrtcProgram = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; source, name and the `num_headers` header
        // sources and names are NUL-terminated strings of `inputs`, which the program borrows,
        // so they outlive it.
        let code = unsafe {
            nvrtc::nvrtcCreateProgram(
                &mut raw,
                inputs.source.as_ptr(),
                inputs.name.as_ptr(),
                inputs.num_headers,
                header_source_ptrs.as_ptr(),
                header_name_ptrs.as_ptr(),
            )
        };
        if code != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(fail(format!(
                "nvrtcCreateProgram: {}",
                nvrtc_error_string(code)
            )));
        }
        Ok(Program(raw, PhantomData))
    }

    /// Compile with `inputs`' options; NVRTC's log. A failure of NVRTC's builtins library is
    /// [`Error::NoGpu`] (an installation problem), any other failure `fail`'s error with the
    /// log.
    fn compile(&self, inputs: &ProgramInputs, fail: &dyn Fn(String) -> Error) -> Result<String> {
        let option_ptrs = pointers(&inputs.options);
        // SAFETY: self.0 is live; option_ptrs holds num_options NUL-terminated strings that
        // live in `inputs.options` until after this call.
        let code =
            unsafe { nvrtc::nvrtcCompileProgram(self.0, inputs.num_options, option_ptrs.as_ptr()) };
        let log = self.log();
        if code == nvrtc::nvrtcResult::NVRTC_ERROR_BUILTIN_OPERATION_FAILURE {
            // libnvrtc-builtins missing or mismatched: an installation problem, not our source.
            return Err(Error::NoGpu {
                reason: format!(
                    "cannot compile kernels: NVRTC's builtins library failed ({}): {log}",
                    nvrtc_error_string(code)
                ),
            });
        }
        if code != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(fail(format!("{}\n{log}", nvrtc_error_string(code))));
        }
        Ok(log)
    }

    /// The CUBIN of the compiled program; none (a virtual target gives PTX only) is `fail`'s
    /// error.
    fn cubin(&self, fail: &dyn Fn(String) -> Error) -> Result<Vec<u8>> {
        let mut size: usize = 0;
        // SAFETY: self.0 is live and compiled; `size` is a valid out-pointer.
        let code = unsafe { nvrtc::nvrtcGetCUBINSize(self.0, &mut size) };
        if code != nvrtc::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return Err(fail(format!(
                "no CUBIN ({}); a virtual target (compute_XX) gives PTX only, use sm_XX",
                nvrtc_error_string(code)
            )));
        }
        let mut cubin = vec![0u8; size];
        // SAFETY: cubin holds exactly the `size` bytes NVRTC reported for this program.
        let code = unsafe { nvrtc::nvrtcGetCUBIN(self.0, cubin.as_mut_ptr().cast::<c_char>()) };
        if code != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(fail(format!("nvrtcGetCUBIN: {}", nvrtc_error_string(code))));
        }
        Ok(cubin)
    }

    /// NVRTC's log for this program (warnings and errors; ptxas output with `-v`).
    fn log(&self) -> String {
        let mut size: usize = 0;
        // SAFETY: self.0 is a live program; `size` is a valid out-pointer.
        let code = unsafe { nvrtc::nvrtcGetProgramLogSize(self.0, &mut size) };
        if code != nvrtc::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return String::new();
        }
        let mut buf = vec![0u8; size];
        // SAFETY: buf holds the `size` bytes NVRTC asked for, terminator included.
        let code = unsafe { nvrtc::nvrtcGetProgramLog(self.0, buf.as_mut_ptr().cast::<c_char>()) };
        if code != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return String::new();
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).trim_end().to_string()
    }
}

impl NvrtcCompiler {
    /// Loads NVRTC, reads its version, finds the CUDA headers and picks the cache folder (from
    /// the environment, read now). Fails with [`Error::NoGpu`] when NVRTC or the headers are
    /// missing: they are machine set-up, like a GPU, and callers treat them the same way.
    pub fn new() -> Result<Self> {
        // SAFETY: is_culib_present only tries to dlopen the candidate library names and drops
        // what it opened; it runs no library code besides the dynamic loader's, and it is what
        // keeps the first real NVRTC call below from panicking when the library is absent.
        if !unsafe { nvrtc::is_culib_present() } {
            return Err(Error::NoGpu {
                reason: "cannot compile kernels: NVRTC (libnvrtc.so.13) is not on the library \
                         search path; add its folder to LD_LIBRARY_PATH (`source \
                         scripts/nvrtc-env.sh` fetches it from PyPI)"
                    .to_string(),
            });
        }
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: NVRTC is present (checked above); both out-pointers are valid.
        let code = unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) };
        if code != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::NoGpu {
                reason: format!(
                    "cannot compile kernels: nvrtcVersion failed: {}",
                    nvrtc_error_string(code)
                ),
            });
        }
        let include_dir = find_include_dir()?;
        let cache_dir = default_cache_dir();
        tracing::debug!(
            "NVRTC {major}.{minor}, headers {}, kernel cache {:?}",
            include_dir.display(),
            cache_dir
        );
        Ok(NvrtcCompiler {
            version: (major, minor),
            include_dir,
            cache_dir,
            compiled: Mutex::new(HashMap::new()),
            memory_hits: AtomicU64::new(0),
            disk_hits: AtomicU64::new(0),
            compiles: AtomicU64::new(0),
        })
    }

    /// The same compiler with another on-disk cache folder, or none.
    pub fn with_cache_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.cache_dir = dir;
        self
    }

    /// NVRTC's version, `(major, minor)`.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The folder passed as `--include-path` (holds `cuda_bf16.h`).
    pub fn include_dir(&self) -> &Path {
        &self.include_dir
    }

    /// The on-disk cache folder, if any.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache_dir.as_deref()
    }

    /// Where compiles were answered from so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            memory_hits: self.memory_hits.load(Ordering::Relaxed),
            disk_hits: self.disk_hits.load(Ordering::Relaxed),
            compiles: self.compiles.load(Ordering::Relaxed),
        }
    }

    /// The NVRTC options for `arch` (e.g. `sm_90a`). No `--use_fast_math`: the reductions and
    /// the fill must round exactly as KERNELS.md says.
    pub fn options(&self, arch: &str) -> Vec<String> {
        vec![
            format!("--gpu-architecture={arch}"),
            format!("--include-path={}", self.include_dir.display()),
            "-std=c++17".to_string(),
            "-lineinfo".to_string(),
            "-default-device".to_string(),
        ]
    }

    /// The cache key: xxh3-128 over the module, every header of [`headers`] (so the generated
    /// ABI header too), the options, NVRTC's version and the arch, each length-prefixed so that
    /// no two different inputs hash the same bytes.
    fn key(&self, module: &KernelModule, arch: &str, options: &[String]) -> u128 {
        let mut bytes = Vec::with_capacity(module.source.len() + 512);
        let mut field = |b: &[u8]| {
            bytes.extend_from_slice(&(b.len() as u64).to_le_bytes());
            bytes.extend_from_slice(b);
        };
        field(b"symmcomm-kernel-cache-v1");
        field(module.name.as_bytes());
        field(module.source.as_bytes());
        for header in headers() {
            field(header.name.as_bytes());
            field(header.source.as_bytes());
        }
        for option in options {
            field(option.as_bytes());
        }
        field(&self.version.0.to_le_bytes());
        field(&self.version.1.to_le_bytes());
        field(arch.as_bytes());
        xxhash_rust::xxh3::xxh3_128(&bytes)
    }

    /// `module` compiled for `arch` (`sm_90a`, see [`arch_for`]) to a CUBIN: from this process's
    /// memory, else from the disk cache, else by NVRTC (then written to the disk cache; a cache
    /// that cannot be written is a warning, not an error).
    pub fn compile(&self, module: &KernelModule, arch: &str) -> Result<Arc<Vec<u8>>> {
        let options = self.options(arch);
        let key = self.key(module, arch, &options);
        let mut compiled = self.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cubin) = compiled.get(&key) {
            self.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(cubin));
        }
        let file = format!("{}-{arch}-{key:032x}.cubin", module.name);
        let cubin = match self.read_cached(&file) {
            Some(cubin) => {
                self.disk_hits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("kernel {} for {arch}: disk cache hit ({file})", module.name);
                cubin
            }
            None => {
                let (cubin, log) = self.compile_uncached(module, arch, &options)?;
                self.compiles.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "kernel {} for {arch}: compiled, {} bytes{}{log}",
                    module.name,
                    cubin.len(),
                    if log.is_empty() {
                        ""
                    } else {
                        "; NVRTC says:\n"
                    }
                );
                self.write_cached(&file, &cubin);
                cubin
            }
        };
        let cubin = Arc::new(cubin);
        compiled.insert(key, Arc::clone(&cubin));
        Ok(cubin)
    }

    /// Compiles `module` for `arch` with `--ptxas-options=-v`, bypassing every cache, and
    /// returns ptxas's report (registers, stack, spills per kernel). For tuning and reports.
    pub fn ptxas_report(&self, module: &KernelModule, arch: &str) -> Result<String> {
        let mut options = self.options(arch);
        options.push("--ptxas-options=-v".to_string());
        let (_, log) = self.compile_uncached(module, arch, &options)?;
        Ok(log)
    }

    /// A cached CUBIN, if the file exists and looks like one (an ELF file).
    fn read_cached(&self, file: &str) -> Option<Vec<u8>> {
        let path = self.cache_dir.as_ref()?.join(file);
        match std::fs::read(&path) {
            Ok(bytes) if bytes.starts_with(b"\x7fELF") => Some(bytes),
            Ok(_) => {
                tracing::warn!(
                    "kernel cache: {} is not a CUBIN; compiling again",
                    path.display()
                );
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!("kernel cache: cannot read {}: {e}", path.display());
                None
            }
        }
    }

    /// Writes a CUBIN to the cache: a temporary file in the same folder, then a rename, so a
    /// reader never sees half a file. Failures are warnings.
    fn write_cached(&self, file: &str, cubin: &[u8]) {
        let Some(dir) = self.cache_dir.as_ref() else {
            return;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(".{file}.{}.{nanos}.tmp", std::process::id()));
        let result = std::fs::create_dir_all(dir)
            .and_then(|()| {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(cubin)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, dir.join(file)));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(
                "kernel cache: cannot write {} (kernels will be compiled again next run): {e}",
                dir.join(file).display()
            );
        }
    }

    /// One NVRTC compile: the CUBIN and NVRTC's log.
    fn compile_uncached(
        &self,
        module: &KernelModule,
        arch: &str,
        options: &[String],
    ) -> Result<(Vec<u8>, String)> {
        let fail = |log: String| Error::Nvrtc {
            kernel: module.name.to_string(),
            arch: arch.to_string(),
            log,
        };
        let inputs = ProgramInputs::new(module, options, &fail)?;
        let program = Program::create(&inputs, &fail)?;
        let log = program.compile(&inputs, &fail)?;
        let cubin = program.cubin(&fail)?;
        drop(program);
        Ok((cubin, log))
    }
}
