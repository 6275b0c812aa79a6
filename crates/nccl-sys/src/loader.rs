//! Finding and opening libnccl at run time, and [`Nccl`], the table of its entry points.
//!
//! The table is declared once, in the `nccl_functions!` invocation below: each line gives the
//! C symbol, its signature as in `nccl.h` of NCCL 2.28.3, and the docs of the `unsafe` method
//! that calls it.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libloading::Library;

use crate::error::LoadError;
use crate::types::{
    Config, CudaStream, DataType, NcclComm, NcclResult, NcclWindow, RedOp, UniqueId,
};
use crate::version::{MIN_VERSION, Version};

/// The environment variable naming the NCCL library to load: an absolute path. When set, it is
/// the only candidate [`Nccl::load`] tries.
pub const LIBRARY_ENV_VAR: &str = "SYMMCOMM_NCCL_LIBRARY";

/// The names [`Nccl::load`] hands to `dlopen` when [`LIBRARY_ENV_VAR`] is unset, in order.
/// `dlopen` searches `LD_LIBRARY_PATH`, the runpath, `ld.so.cache` and the default directories.
pub const SONAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// Declares the function table: the private `Functions` struct of fn pointers, its `resolve`,
/// one `unsafe` method on [`Nccl`] per entry, and the symbol lists.
macro_rules! nccl_functions {
    (
        required {
            $(
                $(#[$required_doc:meta])*
                fn $required:ident = $required_symbol:literal
                    ($($required_arg:ident: $required_arg_ty:ty),* $(,)?) -> $required_ret:ty;
            )*
        }
        optional {
            $(
                $(#[$optional_doc:meta])*
                fn $optional:ident = $optional_symbol:literal
                    ($($optional_arg:ident: $optional_arg_ty:ty),* $(,)?) -> $optional_ret:ty;
            )*
        }
    ) => {
        /// Entry points copied out of the library. They are valid only while the `Library`
        /// they came from is loaded, so they live, private, next to it in [`Nccl`].
        struct Functions {
            $($required: unsafe extern "C" fn($($required_arg_ty),*) -> $required_ret,)*
            $($optional: Option<unsafe extern "C" fn($($optional_arg_ty),*) -> $optional_ret>,)*
        }

        impl Functions {
            /// Looks every entry point up in `library`.
            ///
            /// # Safety
            ///
            /// `library` must be NCCL: each symbol it exports under a name in this table must
            /// have the C signature given here.
            unsafe fn resolve(library: &Library, path: &Path) -> Result<Self, LoadError> {
                Ok(Self {
                    $($required: {
                        // SAFETY: the caller vouches that the symbol has this signature; the
                        // pointer is copied out of the `Symbol` and kept next to `library`.
                        let symbol = unsafe {
                            library.get::<unsafe extern "C" fn($($required_arg_ty),*) -> $required_ret>(
                                concat!($required_symbol, "\0").as_bytes(),
                            )
                        };
                        *symbol.map_err(|_| LoadError::MissingSymbol {
                            path: path.to_owned(),
                            symbol: $required_symbol,
                        })?
                    },)*
                    $($optional: {
                        // SAFETY: as for the required symbols above.
                        let symbol = unsafe {
                            library.get::<unsafe extern "C" fn($($optional_arg_ty),*) -> $optional_ret>(
                                concat!($optional_symbol, "\0").as_bytes(),
                            )
                        };
                        symbol.ok().map(|symbol| *symbol)
                    },)*
                })
            }
        }

        impl Nccl {
            /// The functions every NCCL >= 2.27 exports; a library missing one fails to load
            /// with [`LoadError::MissingSymbol`].
            pub const REQUIRED_SYMBOLS: &'static [&'static str] = &[$($required_symbol),*];

            /// The functions only newer NCCL exports; their methods return `None` when the
            /// loaded library lacks them.
            pub const OPTIONAL_SYMBOLS: &'static [&'static str] = &[$($optional_symbol),*];

            /// Whether the loaded library provides `symbol` (a C name such as
            /// `"ncclWinGetUserPtr"`). False for names not in this table.
            pub fn has_symbol(&self, symbol: &str) -> bool {
                match symbol {
                    $($required_symbol => true,)*
                    $($optional_symbol => self.functions.$optional.is_some(),)*
                    _ => false,
                }
            }

            $(
                $(#[$required_doc])*
                #[allow(clippy::too_many_arguments, reason = "mirrors the C signature")]
                pub unsafe fn $required(&self, $($required_arg: $required_arg_ty),*) -> $required_ret {
                    // SAFETY: the pointer came from `self`'s library, loaded while `self`
                    // lives, with the signature of `nccl.h`; the caller keeps this method's
                    // contract.
                    unsafe { (self.functions.$required)($($required_arg),*) }
                }
            )*

            $(
                $(#[$optional_doc])*
                ///
                /// Returns `None`, without calling anything, when the loaded NCCL lacks the
                /// function.
                #[allow(clippy::too_many_arguments, reason = "mirrors the C signature")]
                pub unsafe fn $optional(
                    &self,
                    $($optional_arg: $optional_arg_ty),*
                ) -> Option<$optional_ret> {
                    let function = self.functions.$optional?;
                    // SAFETY: as for the required functions: the pointer came from `self`'s
                    // library, and the caller keeps this method's contract.
                    Some(unsafe { function($($optional_arg),*) })
                }
            )*
        }
    };
}

nccl_functions! {
    required {
        /// `ncclGetVersion`: writes the library's version code to `*version`.
        ///
        /// # Safety
        ///
        /// `version` is valid for writing one `c_int`.
        fn get_version = "ncclGetVersion"(version: *mut c_int) -> NcclResult;

        /// `ncclGetUniqueId`: creates the id rank 0 shares with the other ranks (and starts
        /// NCCL's bootstrap listener).
        ///
        /// # Safety
        ///
        /// `unique_id` is valid for writing one [`UniqueId`].
        fn get_unique_id = "ncclGetUniqueId"(unique_id: *mut UniqueId) -> NcclResult;

        /// `ncclCommInitRank`: joins the communicator of `n_ranks` ranks named by `comm_id`
        /// as `rank`, on the CUDA device current on this thread. Blocks until every rank has
        /// joined (unless inside a group).
        ///
        /// # Safety
        ///
        /// See the [crate contract](crate#safety-contract). `comm` is valid for writing one
        /// [`NcclComm`]; a CUDA device is current on the calling thread.
        fn comm_init_rank = "ncclCommInitRank"(
            comm: *mut NcclComm,
            n_ranks: c_int,
            comm_id: UniqueId,
            rank: c_int,
        ) -> NcclResult;

        /// `ncclCommInitRankConfig`: [`Nccl::comm_init_rank`] with a [`Config`].
        ///
        /// # Safety
        ///
        /// As [`Nccl::comm_init_rank`], and `config` is null or points to a [`Config`] made
        /// by [`Config::new`] whose string pointers are null or NUL-terminated and alive.
        fn comm_init_rank_config = "ncclCommInitRankConfig"(
            comm: *mut NcclComm,
            n_ranks: c_int,
            comm_id: UniqueId,
            rank: c_int,
            config: *mut Config,
        ) -> NcclResult;

        /// `ncclCommSplit`: collective over `comm`; the ranks passing the same `color` form a
        /// new communicator, ordered by `key`. [`SPLIT_NOCOLOR`](crate::SPLIT_NOCOLOR) opts
        /// out and yields a null `*new_comm`. A null `config` inherits `comm`'s.
        ///
        /// # Safety
        ///
        /// `comm` is live (see the [crate contract](crate#safety-contract)); `new_comm` is
        /// valid for writing; `config` is null or as for [`Nccl::comm_init_rank_config`].
        fn comm_split = "ncclCommSplit"(
            comm: NcclComm,
            color: c_int,
            key: c_int,
            new_comm: *mut NcclComm,
            config: *mut Config,
        ) -> NcclResult;

        /// `ncclCommFinalize`: flushes `comm`'s pending operations and releases its shared
        /// resources; collective over the communicator. Call before
        /// [`Nccl::comm_destroy`].
        ///
        /// # Safety
        ///
        /// `comm` is live and no other thread uses it concurrently.
        fn comm_finalize = "ncclCommFinalize"(comm: NcclComm) -> NcclResult;

        /// `ncclCommDestroy`: frees `comm`'s local resources. `comm` is dead afterwards.
        ///
        /// # Safety
        ///
        /// `comm` is live, no other thread uses it, and nothing uses it afterwards (windows
        /// registered on it must be deregistered first).
        fn comm_destroy = "ncclCommDestroy"(comm: NcclComm) -> NcclResult;

        /// `ncclCommAbort`: stops `comm`'s pending operations and frees it, without waiting
        /// for peers: the error path. `comm` is dead afterwards.
        ///
        /// # Safety
        ///
        /// `comm` is live and nothing uses it afterwards.
        fn comm_abort = "ncclCommAbort"(comm: NcclComm) -> NcclResult;

        /// `ncclCommGetAsyncError`: writes `comm`'s asynchronous state to `*async_error`
        /// ([`NcclResult::IN_PROGRESS`] while a non-blocking call is still running).
        ///
        /// # Safety
        ///
        /// `comm` is live; `async_error` is valid for writing one [`NcclResult`].
        fn comm_get_async_error = "ncclCommGetAsyncError"(
            comm: NcclComm,
            async_error: *mut NcclResult,
        ) -> NcclResult;

        /// `ncclGetErrorString`: a static description of `result`. Prefer the safe
        /// [`Nccl::error_string`].
        ///
        /// # Safety
        ///
        /// None beyond reading the returned pointer only as a NUL-terminated string.
        fn get_error_string = "ncclGetErrorString"(result: NcclResult) -> *const c_char;

        /// `ncclGetLastError`: NCCL's last error message. Prefer [`Nccl::last_error`].
        ///
        /// # Safety
        ///
        /// `comm` is null or live; the returned pointer is read only as a NUL-terminated
        /// string, before the next NCCL call.
        fn get_last_error = "ncclGetLastError"(comm: NcclComm) -> *const c_char;

        /// `ncclCommCount`: writes the number of ranks in `comm` to `*count`.
        ///
        /// # Safety
        ///
        /// `comm` is live; `count` is valid for writing one `c_int`.
        fn comm_count = "ncclCommCount"(comm: NcclComm, count: *mut c_int) -> NcclResult;

        /// `ncclCommCuDevice`: writes the CUDA device ordinal of `comm` to `*device`.
        ///
        /// # Safety
        ///
        /// `comm` is live; `device` is valid for writing one `c_int`.
        fn comm_cu_device = "ncclCommCuDevice"(comm: NcclComm, device: *mut c_int) -> NcclResult;

        /// `ncclCommUserRank`: writes this process's rank in `comm` to `*rank`.
        ///
        /// # Safety
        ///
        /// `comm` is live; `rank` is valid for writing one `c_int`.
        fn comm_user_rank = "ncclCommUserRank"(comm: NcclComm, rank: *mut c_int) -> NcclResult;

        /// `ncclGroupStart`: starts a group on this thread; NCCL calls until the matching
        /// [`Nccl::group_end`] are fused. Groups nest.
        ///
        /// # Safety
        ///
        /// Every call made inside the group keeps its own contract until `group_end` returns
        /// (buffers and communicators stay alive until then).
        fn group_start = "ncclGroupStart"() -> NcclResult;

        /// `ncclGroupEnd`: ends the innermost group; the outermost launches the fused work.
        ///
        /// # Safety
        ///
        /// Matches an earlier [`Nccl::group_start`] on this thread; the calls in the group
        /// still meet their contracts.
        fn group_end = "ncclGroupEnd"() -> NcclResult;

        /// `ncclAllReduce`: reduces `count` elements of `data_type` from every rank's
        /// `send_buffer` with `op` into every rank's `recv_buffer`, enqueued on `stream`.
        /// In place when the two buffers are equal.
        ///
        /// # Safety
        ///
        /// See the [crate contract](crate#safety-contract): `comm` live; both buffers device
        /// memory of `comm`'s device holding `count` elements, alive until the stream work
        /// finishes; `stream` a stream of that device, or null.
        fn all_reduce = "ncclAllReduce"(
            send_buffer: *const c_void,
            recv_buffer: *mut c_void,
            count: usize,
            data_type: DataType,
            op: RedOp,
            comm: NcclComm,
            stream: CudaStream,
        ) -> NcclResult;

        /// `ncclAllGather`: every rank contributes `send_count` elements; `recv_buffer` gets
        /// rank `i`'s at offset `i * send_count`.
        ///
        /// # Safety
        ///
        /// As [`Nccl::all_reduce`], with `recv_buffer` holding `n_ranks * send_count`
        /// elements.
        fn all_gather = "ncclAllGather"(
            send_buffer: *const c_void,
            recv_buffer: *mut c_void,
            send_count: usize,
            data_type: DataType,
            comm: NcclComm,
            stream: CudaStream,
        ) -> NcclResult;

        /// `ncclReduceScatter`: reduces `n_ranks * recv_count` elements with `op`; rank `i`
        /// receives block `i` of the result.
        ///
        /// # Safety
        ///
        /// As [`Nccl::all_reduce`], with `send_buffer` holding `n_ranks * recv_count`
        /// elements and `recv_buffer` `recv_count`.
        fn reduce_scatter = "ncclReduceScatter"(
            send_buffer: *const c_void,
            recv_buffer: *mut c_void,
            recv_count: usize,
            data_type: DataType,
            op: RedOp,
            comm: NcclComm,
            stream: CudaStream,
        ) -> NcclResult;

        /// `ncclBroadcast`: copies `count` elements from `root`'s `send_buffer` to every
        /// rank's `recv_buffer`.
        ///
        /// # Safety
        ///
        /// As [`Nccl::all_reduce`]; `send_buffer` is read only on `root`.
        fn broadcast = "ncclBroadcast"(
            send_buffer: *const c_void,
            recv_buffer: *mut c_void,
            count: usize,
            data_type: DataType,
            root: c_int,
            comm: NcclComm,
            stream: CudaStream,
        ) -> NcclResult;

        /// `ncclSend`: sends `count` elements to rank `peer`, which must post a matching
        /// [`Nccl::recv`].
        ///
        /// # Safety
        ///
        /// As [`Nccl::all_reduce`] for `send_buffer`.
        fn send = "ncclSend"(
            send_buffer: *const c_void,
            count: usize,
            data_type: DataType,
            peer: c_int,
            comm: NcclComm,
            stream: CudaStream,
        ) -> NcclResult;

        /// `ncclRecv`: receives `count` elements from rank `peer`.
        ///
        /// # Safety
        ///
        /// As [`Nccl::all_reduce`] for `recv_buffer`.
        fn recv = "ncclRecv"(
            recv_buffer: *mut c_void,
            count: usize,
            data_type: DataType,
            peer: c_int,
            comm: NcclComm,
            stream: CudaStream,
        ) -> NcclResult;

        /// `ncclMemAlloc`: allocates at least `size` bytes of device memory on the current
        /// device, suitable for window registration and NVLS; writes it to `*buffer`.
        ///
        /// # Safety
        ///
        /// `buffer` is valid for writing one pointer; a CUDA device is current.
        fn mem_alloc = "ncclMemAlloc"(buffer: *mut *mut c_void, size: usize) -> NcclResult;

        /// `ncclMemFree`: frees memory from [`Nccl::mem_alloc`].
        ///
        /// # Safety
        ///
        /// `buffer` came from `mem_alloc` of this library, is freed once, has no window
        /// registered on it any more, and no queued GPU work uses it.
        fn mem_free = "ncclMemFree"(buffer: *mut c_void) -> NcclResult;

        /// `ncclCommWindowRegister`: collective over `comm`; registers `size` bytes at
        /// `buffer` as a window and writes its handle to `*window`. With
        /// [`WIN_COLL_SYMMETRIC`](crate::WIN_COLL_SYMMETRIC) every rank registers the same
        /// size, in the same order, and `buffer` is aligned to
        /// [`WIN_REQUIRED_ALIGNMENT`](crate::WIN_REQUIRED_ALIGNMENT).
        ///
        /// # Safety
        ///
        /// `comm` is live; `buffer` is `size` bytes from [`Nccl::mem_alloc`] (or other
        /// cuMem-VMM memory) that outlives the window; `window` is valid for writing.
        fn comm_window_register = "ncclCommWindowRegister"(
            comm: NcclComm,
            buffer: *mut c_void,
            size: usize,
            window: *mut NcclWindow,
            window_flags: c_int,
        ) -> NcclResult;

        /// `ncclCommWindowDeregister`: collective over `comm`; releases `window`, which is
        /// dead afterwards.
        ///
        /// # Safety
        ///
        /// `window` was registered on the live `comm` and no queued GPU work uses it.
        fn comm_window_deregister = "ncclCommWindowDeregister"(
            comm: NcclComm,
            window: NcclWindow,
        ) -> NcclResult;
    }
    optional {
        /// `ncclWinGetUserPtr` (NCCL >= 2.29): writes the local buffer address `window` was
        /// registered with to `*user_ptr`.
        ///
        /// # Safety
        ///
        /// `comm` is live, `window` registered on it; `user_ptr` is valid for writing.
        fn win_get_user_ptr = "ncclWinGetUserPtr"(
            comm: NcclComm,
            window: NcclWindow,
            user_ptr: *mut *mut c_void,
        ) -> NcclResult;

        /// `ncclCommQueryProperties` (NCCL >= 2.29, declared in `nccl_device/core.h`): fills
        /// an `ncclCommProperties_t` (rank, ranks, device, device-API and multimem support,
        /// ...).
        ///
        /// `properties` is untyped because the struct's layout changed between 2.29 and 2.30
        /// (`ginType` went from `uint8_t` to `int`, fields were added); the caller lays it out
        /// for the running version, with `size`, `magic` ([`CONFIG_MAGIC`](crate::CONFIG_MAGIC))
        /// and `version` first as in [`Config`].
        ///
        /// # Safety
        ///
        /// `comm` is live; `properties` points to a writable, initialised
        /// `ncclCommProperties_t` of the layout its `version` field names.
        fn comm_query_properties = "ncclCommQueryProperties"(
            comm: NcclComm,
            properties: *mut c_void,
        ) -> NcclResult;

        /// `ncclCommShrink` (NCCL >= 2.27): collective over the surviving ranks of `comm`;
        /// makes a communicator without the `exclude_count` ranks listed at `exclude_ranks`.
        /// `flags` is [`SHRINK_DEFAULT`](crate::SHRINK_DEFAULT) or
        /// [`SHRINK_ABORT`](crate::SHRINK_ABORT).
        ///
        /// # Safety
        ///
        /// `comm` is live; `exclude_ranks` points to `exclude_count` readable `c_int`s;
        /// `new_comm` is valid for writing; `config` as for [`Nccl::comm_split`].
        fn comm_shrink = "ncclCommShrink"(
            comm: NcclComm,
            exclude_ranks: *mut c_int,
            exclude_count: c_int,
            new_comm: *mut NcclComm,
            config: *mut Config,
            flags: c_int,
        ) -> NcclResult;
    }
}

/// A loaded NCCL library and its entry points.
///
/// The fn pointers are private and called only through `&self`, so none outlives the library.
/// [`Nccl::load`] keeps its library for the life of the process; one from [`Nccl::load_from`]
/// is unloaded (`dlclose`) on drop, after which any handle it made is unusable.
pub struct Nccl {
    functions: Functions,
    version: Version,
    path: PathBuf,
    /// Keeps the code behind `functions` mapped.
    _library: Library,
}

impl Nccl {
    /// The process-wide NCCL, loaded on first use.
    ///
    /// Tries, in order: the absolute path in [`LIBRARY_ENV_VAR`] (if set and non-empty it is
    /// the only candidate; a relative path is [`LoadError::RelativePath`]), then an NCCL the
    /// process has already loaded under one of [`SONAMES`] (PyTorch's, say: shared, not
    /// loaded twice), then each of [`SONAMES`]. A library that opens but is unusable (too old, missing a symbol) ends the
    /// search with that error. The first success is kept for the life of the process; a
    /// failure is not, so a later call tries again.
    pub fn load() -> Result<&'static Nccl, LoadError> {
        static LOADED: OnceLock<Nccl> = OnceLock::new();
        if let Some(nccl) = LOADED.get() {
            return Ok(nccl);
        }
        let nccl = Self::find()?;
        // If another thread won the race, its library is kept and this one is unloaded.
        Ok(LOADED.get_or_init(|| nccl))
    }

    /// Loads the library at `path` (a path without `/` is searched for by `dlopen` like a
    /// soname), checks its version and resolves every entry point.
    ///
    /// Opening a library runs its initialisers, and the table trusts that a library exporting
    /// NCCL's names is NCCL with NCCL's signatures: name only files you trust, as for any
    /// dynamically linked code.
    pub fn load_from(path: &Path) -> Result<Nccl, LoadError> {
        let library = open(path).map_err(|reason| LoadError::NotFound {
            tried: vec![(path.display().to_string(), reason)],
        })?;
        Self::from_library(library, path)
    }

    /// The version `ncclGetVersion` reported when the library was loaded.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The file the library was loaded from, as the dynamic loader reports it (for a soname,
    /// the file it found), or the name given to `dlopen` where the loader does not say.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// NCCL's description of `result` (`ncclGetErrorString`), lossily decoded; empty if NCCL
    /// returns null.
    pub fn error_string(&self, result: NcclResult) -> String {
        // SAFETY: ncclGetErrorString takes any code (unknown ones included: it has a
        // `default` case in every version) and returns null or a static string.
        let text = unsafe { self.get_error_string(result) };
        // SAFETY: `text` is null or a static NUL-terminated string.
        unsafe { lossy_string(text) }
    }

    /// NCCL's last error message (`ncclGetLastError`), lossily decoded; empty if NCCL returns
    /// null.
    ///
    /// NCCL 2.27.3 to 2.30.7 ignore `comm` and return one process-wide buffer, which another
    /// thread's failing NCCL call may be rewriting while it is read.
    ///
    /// # Safety
    ///
    /// `comm` is null or a live communicator of this library.
    pub unsafe fn last_error(&self, comm: NcclComm) -> String {
        // SAFETY: the caller vouches for `comm`; the result is read at once below.
        let text = unsafe { self.get_last_error(comm) };
        // SAFETY: NCCL returns null or its NUL-terminated error buffer, which stays allocated.
        unsafe { lossy_string(text) }
    }

    /// Tries the candidates in the order [`Nccl::load`] documents.
    fn find() -> Result<Nccl, LoadError> {
        if let Some(value) = std::env::var_os(LIBRARY_ENV_VAR).filter(|value| !value.is_empty()) {
            let path = PathBuf::from(value);
            if !path.is_absolute() {
                return Err(LoadError::RelativePath { path });
            }
            return Self::load_from(&path);
        }
        // An NCCL the process has loaded already (PyTorch's, in a torch process) is shared,
        // whatever file it came from; its version is checked like any other.
        for name in SONAMES {
            if let Some(library) = already_loaded(name) {
                return Self::from_library(library, Path::new(name));
            }
        }
        let mut tried = Vec::new();
        for name in SONAMES {
            match open(Path::new(name)) {
                Ok(library) => return Self::from_library(library, Path::new(name)),
                Err(reason) => tried.push((name.to_owned(), reason)),
            }
        }
        Err(LoadError::NotFound { tried })
    }

    /// Checks the version first (so an old NCCL is reported as old, not as lacking
    /// symbols), then resolves the table.
    fn from_library(library: Library, name: &Path) -> Result<Nccl, LoadError> {
        // SAFETY: a library exporting `ncclGetVersion` is trusted to be NCCL (see
        // `load_from`), whose `ncclGetVersion` is `ncclResult_t (int*)`.
        let symbol = unsafe {
            library.get::<unsafe extern "C" fn(*mut c_int) -> NcclResult>(b"ncclGetVersion\0")
        };
        let Ok(symbol) = symbol else {
            return Err(LoadError::MissingSymbol {
                path: name.to_owned(),
                symbol: "ncclGetVersion",
            });
        };
        let get_version = *symbol;
        let path = file_containing(get_version as *const c_void).unwrap_or_else(|| name.to_owned());

        let mut code: c_int = 0;
        // SAFETY: the signature is right (above), `library` is loaded, and `code` is a valid
        // place for the one int it writes.
        let result = unsafe { get_version(&mut code) };
        if !result.is_success() {
            return Err(LoadError::VersionCall { path, code: result });
        }
        let version = Version::from_code(code);
        let minimum = Version::from_code(MIN_VERSION);
        if version < minimum {
            return Err(LoadError::TooOld {
                path,
                version,
                minimum,
            });
        }

        // SAFETY: the library is trusted to be NCCL (see `load_from`) and is >= 2.27, so its
        // symbols have the signatures of the table.
        let functions = unsafe { Functions::resolve(&library, &path)? };
        Ok(Nccl {
            functions,
            version,
            path,
            _library: library,
        })
    }
}

impl fmt::Debug for Nccl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nccl")
            .field("version", &self.version)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// `dlopen`s `name`, returning the loader's message on failure.
fn open(name: &Path) -> Result<Library, String> {
    // SAFETY: opening runs the library's initialisers; the file is trusted to be NCCL (see
    // `Nccl::load_from`), whose initialisers have no preconditions.
    unsafe { Library::new(name) }.map_err(|error| error.to_string())
}

/// The object already loaded under soname `name`, if one is (`RTLD_NOLOAD`: nothing is opened).
#[cfg(unix)]
fn already_loaded(name: &str) -> Option<Library> {
    use libloading::os::unix::{Library as UnixLibrary, RTLD_LAZY};
    // SAFETY: with RTLD_NOLOAD dlopen only looks the name up among loaded objects and takes a
    // reference to it; no initialiser runs.
    let lib = unsafe { UnixLibrary::open(Some(name), RTLD_LAZY | libc::RTLD_NOLOAD) }.ok()?;
    Some(Library::from(lib))
}

#[cfg(not(unix))]
fn already_loaded(_name: &str) -> Option<Library> {
    None
}

/// The file of the loaded object containing `address`, from `dladdr`.
#[cfg(unix)]
fn file_containing(address: *const c_void) -> Option<PathBuf> {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr treats `address` as a number and writes only `info`, which is valid for
    // writes.
    if unsafe { libc::dladdr(address, info.as_mut_ptr()) } == 0 {
        return None;
    }
    // SAFETY: dladdr returned non-zero, so it filled `info` (and zeroes are valid anyway).
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: `dli_fname` is a NUL-terminated string owned by the dynamic loader, alive while
    // the object is loaded (the caller holds it), and copied out at once.
    let name = unsafe { CStr::from_ptr(info.dli_fname) }.to_bytes();
    (!name.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(name)))
}

#[cfg(not(unix))]
fn file_containing(_address: *const c_void) -> Option<PathBuf> {
    None
}

/// Copies a C string, replacing invalid UTF-8; null gives an empty string.
///
/// # Safety
///
/// `text` is null or points to a NUL-terminated string that stays alive during the call.
unsafe fn lossy_string(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: non-null, and the caller vouches it is NUL-terminated and alive.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}
