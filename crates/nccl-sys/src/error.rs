//! Why loading NCCL failed.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::loader::LIBRARY_ENV_VAR;
use crate::types::NcclResult;
use crate::version::Version;

/// Why [`Nccl::load`](crate::Nccl::load) or [`Nccl::load_from`](crate::Nccl::load_from) failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No candidate could be opened. Each entry is a name passed to `dlopen` and its message.
    #[error("{}", not_found_message(.tried))]
    NotFound {
        /// `(name, dlopen's message)` for each candidate, in the order tried.
        tried: Vec<(String, String)>,
    },

    /// `SYMMCOMM_NCCL_LIBRARY` holds a relative path, which `dlopen` would resolve against the
    /// current directory or the search path: ambiguous, so refused.
    #[error("{LIBRARY_ENV_VAR} must be an absolute path to libnccl.so.2, got {}", .path.display())]
    RelativePath {
        /// The value of the variable.
        path: PathBuf,
    },

    /// The library opened but lacks a function every supported NCCL exports.
    #[error("{} has no symbol {symbol}: not NCCL, or NCCL older than 2.27", .path.display())]
    MissingSymbol {
        /// The library that was opened.
        path: PathBuf,
        /// The missing function.
        symbol: &'static str,
    },

    /// The library is an NCCL older than this crate supports.
    #[error("NCCL {version} at {} is too old: symmcomm needs NCCL >= {minimum}", .path.display())]
    TooOld {
        /// The library that was opened.
        path: PathBuf,
        /// What its `ncclGetVersion` reported.
        version: Version,
        /// The oldest supported version.
        minimum: Version,
    },

    /// `ncclGetVersion` itself failed.
    #[error("ncclGetVersion in {} failed: {code}", .path.display())]
    VersionCall {
        /// The library that was opened.
        path: PathBuf,
        /// What `ncclGetVersion` returned.
        code: NcclResult,
    },
}

fn not_found_message(tried: &[(String, String)]) -> String {
    let mut message = String::from("could not load NCCL; tried:");
    for (name, reason) in tried {
        let _ = write!(message, "\n  {name}: {reason}");
    }
    let _ = write!(
        message,
        "\nset {LIBRARY_ENV_VAR} to the absolute path of libnccl.so.2 (NCCL >= 2.27)"
    );
    message
}
