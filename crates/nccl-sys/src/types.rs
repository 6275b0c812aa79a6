//! The C types of `nccl.h` as Rust sees them: result, reduction and data-type codes as
//! integer newtypes, opaque handles, `ncclUniqueId`, `ncclConfig_t` and the `#define`d
//! constants. Layouts follow `src/nccl.h.in` of NCCL 2.28.3.

use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::fmt;
use std::marker::{PhantomData, PhantomPinned};

/// `ncclResult_t`: the status every NCCL call returns.
///
/// An integer newtype rather than a Rust `enum`, so a code this crate does not know (from a
/// newer NCCL) is an ordinary value instead of undefined behaviour.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct NcclResult(pub c_int);

impl NcclResult {
    /// `ncclSuccess`.
    pub const SUCCESS: Self = Self(0);
    /// `ncclUnhandledCudaError`: a CUDA call made by NCCL failed.
    pub const UNHANDLED_CUDA_ERROR: Self = Self(1);
    /// `ncclSystemError`: a system call (socket, memory, ...) failed.
    pub const SYSTEM_ERROR: Self = Self(2);
    /// `ncclInternalError`: a bug in NCCL, or memory corruption.
    pub const INTERNAL_ERROR: Self = Self(3);
    /// `ncclInvalidArgument`: a bad argument (null pointer, bad rank, bad config value).
    pub const INVALID_ARGUMENT: Self = Self(4);
    /// `ncclInvalidUsage`: the API was used wrongly (wrong order, unsupported combination).
    pub const INVALID_USAGE: Self = Self(5);
    /// `ncclRemoteError`: a peer failed or went away.
    pub const REMOTE_ERROR: Self = Self(6);
    /// `ncclInProgress`: a non-blocking communicator has not finished the operation yet.
    pub const IN_PROGRESS: Self = Self(7);
    /// `ncclTimeout` (NCCL >= 2.30; in older versions 8 is `ncclNumResults`, never returned).
    pub const TIMEOUT: Self = Self(8);

    /// The C name of the code (`"ncclSuccess"`, ...), or `"unknown(42)"` for a code this crate
    /// does not know.
    pub fn name(self) -> Cow<'static, str> {
        let name = match self {
            Self::SUCCESS => "ncclSuccess",
            Self::UNHANDLED_CUDA_ERROR => "ncclUnhandledCudaError",
            Self::SYSTEM_ERROR => "ncclSystemError",
            Self::INTERNAL_ERROR => "ncclInternalError",
            Self::INVALID_ARGUMENT => "ncclInvalidArgument",
            Self::INVALID_USAGE => "ncclInvalidUsage",
            Self::REMOTE_ERROR => "ncclRemoteError",
            Self::IN_PROGRESS => "ncclInProgress",
            Self::TIMEOUT => "ncclTimeout",
            Self(code) => return Cow::Owned(format!("unknown({code})")),
        };
        Cow::Borrowed(name)
    }

    /// Whether this is `ncclSuccess`.
    pub fn is_success(self) -> bool {
        self == Self::SUCCESS
    }
}

impl fmt::Display for NcclResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// `ncclRedOp_t`: the reduction a collective applies.
///
/// An integer newtype: values >= 5 are operators created at run time
/// (`ncclRedOpCreatePreMulSum`), which a Rust `enum` could not hold.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RedOp(pub c_int);

impl RedOp {
    /// `ncclSum`.
    pub const SUM: Self = Self(0);
    /// `ncclProd`.
    pub const PROD: Self = Self(1);
    /// `ncclMax`.
    pub const MAX: Self = Self(2);
    /// `ncclMin`.
    pub const MIN: Self = Self(3);
    /// `ncclAvg`: sum divided by the number of ranks.
    pub const AVG: Self = Self(4);
}

/// `ncclDataType_t`: the element type of a buffer.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DataType(pub c_int);

impl DataType {
    /// `ncclInt8` (also `ncclChar`).
    pub const INT8: Self = Self(0);
    /// `ncclUint8`.
    pub const UINT8: Self = Self(1);
    /// `ncclInt32` (also `ncclInt`).
    pub const INT32: Self = Self(2);
    /// `ncclUint32`.
    pub const UINT32: Self = Self(3);
    /// `ncclInt64`.
    pub const INT64: Self = Self(4);
    /// `ncclUint64`.
    pub const UINT64: Self = Self(5);
    /// `ncclFloat16` (also `ncclHalf`).
    pub const FLOAT16: Self = Self(6);
    /// `ncclFloat32` (also `ncclFloat`).
    pub const FLOAT32: Self = Self(7);
    /// `ncclFloat64` (also `ncclDouble`).
    pub const FLOAT64: Self = Self(8);
    /// `ncclBfloat16`.
    pub const BFLOAT16: Self = Self(9);
    /// `ncclFloat8e4m3` (needs sm_90 or newer).
    pub const FLOAT8E4M3: Self = Self(10);
    /// `ncclFloat8e5m2` (needs sm_90 or newer).
    pub const FLOAT8E5M2: Self = Self(11);
}

/// The C `struct ncclComm`, never seen by value: only [`NcclComm`] pointers to it exist.
#[repr(C)]
#[derive(Debug)]
pub struct OpaqueComm {
    _data: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// The C `struct ncclWindow_vidmem`, never seen by value: only [`NcclWindow`] pointers exist.
#[repr(C)]
#[derive(Debug)]
pub struct OpaqueWindow {
    _data: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `ncclComm_t`: a communicator handle. Null is `NCCL_COMM_NULL`.
pub type NcclComm = *mut OpaqueComm;

/// `ncclWindow_t`: a registered memory window handle.
pub type NcclWindow = *mut OpaqueWindow;

/// `cudaStream_t` (the same pointer as the driver API's `CUstream`). Null is the legacy
/// default stream.
pub type CudaStream = *mut c_void;

/// `NCCL_UNIQUE_ID_BYTES`: the size of [`UniqueId`].
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: the opaque token rank 0 creates with `ncclGetUniqueId` and every rank passes
/// to `ncclCommInitRank`.
///
/// C declares the bytes as `char`, which is `i8` on x86_64; `u8` has the same size, alignment
/// and calling convention, and is what the bytes are. It holds a socket address and a secret
/// magic, so `Debug` prints only a 32-bit hash: enough to see that two ranks hold the same id.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct UniqueId {
    /// The raw bytes, as NCCL wrote them.
    pub internal: [u8; UNIQUE_ID_BYTES],
}

impl UniqueId {
    /// The raw bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.internal
    }

    /// Rebuilds an id from bytes received from rank 0; `None` unless exactly
    /// [`UNIQUE_ID_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let internal: [u8; UNIQUE_ID_BYTES] = bytes.try_into().ok()?;
        Some(Self { internal })
    }

    /// A 32-bit FNV-1a hash of the bytes, for logs.
    fn short_hash(&self) -> u32 {
        self.internal.iter().fold(0x811c_9dc5_u32, |hash, &byte| {
            (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        })
    }
}

impl Default for UniqueId {
    /// All zeros: an out-parameter for `ncclGetUniqueId`, not a usable id.
    fn default() -> Self {
        Self {
            internal: [0; UNIQUE_ID_BYTES],
        }
    }
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UniqueId(#{:08x})", self.short_hash())
    }
}

/// `NCCL_CONFIG_UNDEF_INT`: "not set, let NCCL choose" for every `int` field of [`Config`].
pub const CONFIG_UNDEF_INT: c_int = c_int::MIN;

/// The `magic` every NCCL configuration struct must carry (`0xcafebeef`, `NCCL_API_MAGIC` in
/// NCCL >= 2.29).
pub const CONFIG_MAGIC: c_uint = 0xcafe_beef;

/// `NCCL_SPLIT_NOCOLOR`: the color that keeps a rank out of every `ncclCommSplit` child.
pub const SPLIT_NOCOLOR: c_int = -1;

/// `NCCL_WIN_DEFAULT`: window registration flags, none set.
pub const WIN_DEFAULT: c_int = 0x00;

/// `NCCL_WIN_COLL_SYMMETRIC`: register the window for symmetric-memory collectives (every rank
/// registers a buffer of the same size, in the same order).
pub const WIN_COLL_SYMMETRIC: c_int = 0x01;

/// `NCCL_WIN_REQUIRED_ALIGNMENT`: the alignment, in bytes, a symmetric window's buffer needs
/// (the `#define` appeared in the 2.28 header; 2.27 has the same rule undocumented).
pub const WIN_REQUIRED_ALIGNMENT: usize = 4096;

/// `NCCL_CTA_POLICY_DEFAULT`: [`Config::cta_policy`] letting NCCL choose.
pub const CTA_POLICY_DEFAULT: c_int = 0x00;

/// `NCCL_CTA_POLICY_EFFICIENCY`: [`Config::cta_policy`] preferring fewer CTAs.
pub const CTA_POLICY_EFFICIENCY: c_int = 0x01;

/// `NCCL_CTA_POLICY_ZERO`: [`Config::cta_policy`] asking for zero-CTA (copy-engine)
/// operation where possible (NCCL >= 2.28).
pub const CTA_POLICY_ZERO: c_int = 0x02;

/// `NCCL_SHRINK_DEFAULT`: `ncclCommShrink` flag, shrink a healthy communicator.
pub const SHRINK_DEFAULT: c_int = 0x00;

/// `NCCL_SHRINK_ABORT`: `ncclCommShrink` flag, abort the parent's pending operations first.
pub const SHRINK_ABORT: c_int = 0x01;

/// `ncclConfig_t` as NCCL 2.28 lays it out (`struct ncclConfig_v22800`, 80 bytes on x86_64).
///
/// Build it with [`Config::new`], which does what `NCCL_CONFIG_INITIALIZER` does, then set the
/// fields to change. Every `int` field left at [`CONFIG_UNDEF_INT`] and every pointer left null
/// means "NCCL's default".
///
/// # Older and newer NCCL
///
/// NCCL reads the config by copying `min(config.size, sizeof(its own ncclConfig_t))` bytes
/// into a struct it first filled with its own initialiser (`parseCommConfig` in `src/init.cc`;
/// the same code in 2.27.3, 2.28.3 and 2.30.7). So:
///
/// - a newer NCCL (2.29 adds `graphUsageMode`, `numRmaCtx`; 2.30 adds `maxP2pPeers`,
///   `graphStreamOrdering`) leaves the fields past our 80 bytes at its defaults;
/// - NCCL 2.27 (72 bytes) never reads `n_channels_per_net_peer` or `nvlink_centric_sched`.
///
/// NCCL also resets to its default every field introduced after `version`, so pass a version
/// at least [`Config::LAYOUT_VERSION`] for the 2.28 fields to count.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// `size`: `size_of::<Config>()`, tells NCCL how many bytes to read.
    pub size: usize,
    /// `magic`: must be [`CONFIG_MAGIC`].
    pub magic: c_uint,
    /// `version`: the NCCL version code the struct was written for.
    pub version: c_uint,
    /// `blocking`: 0 makes the communicator non-blocking (calls may return `ncclInProgress`).
    pub blocking: c_int,
    /// `cgaClusterSize`: CUDA thread-block cluster size for NCCL kernels.
    pub cga_cluster_size: c_int,
    /// `minCTAs`: the least number of CTAs (channels) NCCL kernels use.
    pub min_ctas: c_int,
    /// `maxCTAs`: the most CTAs (channels) NCCL kernels use.
    pub max_ctas: c_int,
    /// `netName`: network module to use (NUL-terminated), or null.
    pub net_name: *const c_char,
    /// `splitShare`: 1 lets `ncclCommSplit` children share the parent's resources.
    pub split_share: c_int,
    /// `trafficClass`: network traffic class.
    pub traffic_class: c_int,
    /// `commName`: a name for logs and profilers (NUL-terminated), or null.
    pub comm_name: *const c_char,
    /// `collnetEnable`: 1 enables CollNet (in-network reduction).
    pub collnet_enable: c_int,
    /// `CTAPolicy`: one of the `CTA_POLICY_*` constants.
    pub cta_policy: c_int,
    /// `shrinkShare`: 1 lets `ncclCommShrink` children share the parent's resources.
    pub shrink_share: c_int,
    /// `nvlsCTAs`: the number of CTAs NVLS (NVLink SHARP) algorithms use.
    pub nvls_ctas: c_int,
    /// `nChannelsPerNetPeer`: channels per network peer (NCCL >= 2.28).
    pub n_channels_per_net_peer: c_int,
    /// `nvlinkCentricSched`: 1 enables NVLink-centric scheduling (NCCL >= 2.28).
    pub nvlink_centric_sched: c_int,
}

impl Config {
    /// The version code of the layout this struct has (2.28.0).
    pub const LAYOUT_VERSION: c_int = 22800;

    /// What `NCCL_CONFIG_INITIALIZER` gives: `size` = `size_of::<Config>()`, `magic` =
    /// [`CONFIG_MAGIC`], `version` = `nccl_version_code`, every `int` field
    /// [`CONFIG_UNDEF_INT`], every pointer null.
    ///
    /// `nccl_version_code` is normally [`Config::LAYOUT_VERSION`] (see the type's docs).
    pub fn new(nccl_version_code: c_int) -> Self {
        Self {
            size: size_of::<Self>(),
            magic: CONFIG_MAGIC,
            // Version codes are positive; the C field is unsigned.
            version: nccl_version_code as c_uint,
            blocking: CONFIG_UNDEF_INT,
            cga_cluster_size: CONFIG_UNDEF_INT,
            min_ctas: CONFIG_UNDEF_INT,
            max_ctas: CONFIG_UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: CONFIG_UNDEF_INT,
            traffic_class: CONFIG_UNDEF_INT,
            comm_name: std::ptr::null(),
            collnet_enable: CONFIG_UNDEF_INT,
            cta_policy: CONFIG_UNDEF_INT,
            shrink_share: CONFIG_UNDEF_INT,
            nvls_ctas: CONFIG_UNDEF_INT,
            n_channels_per_net_peer: CONFIG_UNDEF_INT,
            nvlink_centric_sched: CONFIG_UNDEF_INT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of};

    #[test]
    fn result_names() {
        assert_eq!(NcclResult::SUCCESS.name(), "ncclSuccess");
        assert_eq!(NcclResult(1).name(), "ncclUnhandledCudaError");
        assert_eq!(NcclResult(2).name(), "ncclSystemError");
        assert_eq!(NcclResult(3).name(), "ncclInternalError");
        assert_eq!(NcclResult(4).name(), "ncclInvalidArgument");
        assert_eq!(NcclResult(5).name(), "ncclInvalidUsage");
        assert_eq!(NcclResult(6).name(), "ncclRemoteError");
        assert_eq!(NcclResult(7).name(), "ncclInProgress");
        assert_eq!(NcclResult(8).name(), "ncclTimeout");
        assert_eq!(NcclResult(9).name(), "unknown(9)");
        assert_eq!(NcclResult(-3).name(), "unknown(-3)");
        assert_eq!(NcclResult(42).to_string(), "unknown(42)");
        assert!(NcclResult(0).is_success());
        assert!(!NcclResult::IN_PROGRESS.is_success());
    }

    #[test]
    fn code_values_match_the_header() {
        assert_eq!(RedOp::AVG.0, 4);
        assert_eq!(DataType::BFLOAT16.0, 9);
        assert_eq!(DataType::FLOAT8E5M2.0, 11);
        assert_eq!(size_of::<NcclResult>(), size_of::<c_int>());
        assert_eq!(size_of::<RedOp>(), size_of::<c_int>());
        assert_eq!(size_of::<DataType>(), size_of::<c_int>());
    }

    /// Random-looking bytes (a fixed LCG, so the test is reproducible).
    fn sample_id() -> UniqueId {
        let mut state = 0x2545_f491_u32;
        let mut internal = [0u8; UNIQUE_ID_BYTES];
        for byte in &mut internal {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *byte = (state >> 16) as u8;
        }
        UniqueId { internal }
    }

    #[test]
    fn unique_id_round_trips_through_bytes() {
        let id = sample_id();
        let copy = UniqueId::from_bytes(id.as_bytes()).expect("128 bytes");
        assert_eq!(copy, id);
        assert_eq!(UniqueId::from_bytes(&id.as_bytes()[..127]), None);
        let mut long = id.as_bytes().to_vec();
        long.push(0);
        assert_eq!(UniqueId::from_bytes(&long), None);
        assert_eq!(size_of::<UniqueId>(), UNIQUE_ID_BYTES);
        assert_eq!(align_of::<UniqueId>(), 1);
    }

    #[test]
    fn unique_id_debug_hides_the_bytes() {
        let id = sample_id();
        let shown = format!("{id:?}");
        assert!(shown.starts_with("UniqueId(#"), "{shown}");
        assert!(shown.len() <= 20, "{shown}");
        // Neither the decimal array form nor a hex dump of the leading bytes may appear.
        let decimal = format!("{:?}", &id.internal[..4]);
        let hex: String = id.internal[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!shown.contains(&decimal[1..decimal.len() - 1]), "{shown}");
        assert!(!shown.contains(&hex), "{shown}");
        // Different ids print differently, equal ids equally.
        let mut other = id;
        other.internal[77] ^= 1;
        assert_ne!(format!("{other:?}"), shown);
        assert_eq!(format!("{:?}", sample_id()), shown);
    }

    #[test]
    fn config_new_matches_the_c_initialiser() {
        let config = Config::new(22803);
        assert_eq!(config.size, 80);
        assert_eq!(config.magic, 0xcafe_beef);
        assert_eq!(config.version, 22803);
        for value in [
            config.blocking,
            config.cga_cluster_size,
            config.min_ctas,
            config.max_ctas,
            config.split_share,
            config.traffic_class,
            config.collnet_enable,
            config.cta_policy,
            config.shrink_share,
            config.nvls_ctas,
            config.n_channels_per_net_peer,
            config.nvlink_centric_sched,
        ] {
            assert_eq!(value, i32::MIN);
        }
        assert!(config.net_name.is_null());
        assert!(config.comm_name.is_null());
    }

    /// Offsets worked out by hand from `struct ncclConfig_v22800` for LP64 (x86_64, aarch64):
    /// `size_t` 8, `unsigned int`/`int` 4, pointers 8 and 8-aligned.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn config_layout_matches_the_c_struct() {
        assert_eq!(size_of::<Config>(), 80);
        assert_eq!(align_of::<Config>(), 8);
        let offsets = [
            (offset_of!(Config, size), 0),
            (offset_of!(Config, magic), 8),
            (offset_of!(Config, version), 12),
            (offset_of!(Config, blocking), 16),
            (offset_of!(Config, cga_cluster_size), 20),
            (offset_of!(Config, min_ctas), 24),
            (offset_of!(Config, max_ctas), 28),
            (offset_of!(Config, net_name), 32),
            (offset_of!(Config, split_share), 40),
            (offset_of!(Config, traffic_class), 44),
            (offset_of!(Config, comm_name), 48),
            (offset_of!(Config, collnet_enable), 56),
            (offset_of!(Config, cta_policy), 60),
            (offset_of!(Config, shrink_share), 64),
            (offset_of!(Config, nvls_ctas), 68),
            (offset_of!(Config, n_channels_per_net_peer), 72),
            (offset_of!(Config, nvlink_centric_sched), 76),
        ];
        for (index, (actual, expected)) in offsets.into_iter().enumerate() {
            assert_eq!(actual, expected, "field #{index}");
        }
    }
}
