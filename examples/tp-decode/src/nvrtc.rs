//! `kernels.cu` compiled at run time with cudarc's NVRTC, as an engine does it: to PTX for the
//! GPU's compute capability (the driver finishes the job when the module is loaded), the CUDA
//! headers (`cuda_bf16.h`) found where symmcomm looks for them. The shared libraries cudarc
//! loads lazily (and would panic on) are checked first, with an error naming what is missing.

use std::path::PathBuf;

use anyhow::{Result, bail};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

/// The CUDA C source of the kernels.
pub const SOURCE: &str = include_str!("kernels.cu");

/// The kernels `kernels.cu` defines.
pub const KERNEL_NAMES: [&str; 6] = [
    "tp_fill",
    "tp_rmsnorm",
    "tp_rope_append",
    "tp_attention",
    "tp_swiglu",
    "tp_add",
];

/// Whether the shared library cudarc knows as `lib` loads, or an error saying which file is
/// missing or why it does not load, and `hint`.
pub fn check_library(lib: &str, hint: &str) -> Result<()> {
    let mut names = cudarc::get_lib_name_candidates(lib);
    names.dedup();
    let mut found_but_broken = None;
    for name in &names {
        // SAFETY: loading the library runs its initialisers only, which have no preconditions;
        // the handle is dropped at once (cudarc loads it again for itself).
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => return Ok(()),
            Err(e) => {
                // dlerror's text: "<file>: cannot open shared object file" when the name is
                // not on the search path; another file named first (libcublasLt.so.13, say)
                // when this one was found but could not load.
                let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
                if !why.starts_with(&format!("{name}:")) && found_but_broken.is_none() {
                    found_but_broken = Some(format!("{name} was found but does not load: {why}"));
                }
            }
        }
    }
    let so = format!("lib{lib}.so");
    let missing = || {
        let tried: Vec<&str> = names
            .iter()
            .filter(|n| n.starts_with(&so))
            .map(String::as_str)
            .collect();
        format!("none of {} is on the library search path", tried.join(", "))
    };
    bail!(
        "cannot load {lib}: {}; {hint}",
        found_but_broken.unwrap_or_else(missing)
    )
}

/// Where `cuda_bf16.h` is: `SYMMCOMM_CUDA_INCLUDE`, `$CUDA_HOME/include`,
/// `/usr/local/cuda/include`, `/usr/local/cuda-13.0/targets/x86_64-linux/include`, the first
/// that holds it (symmcomm's own order).
pub fn include_dir() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    for var in ["SYMMCOMM_CUDA_INCLUDE", "CUDA_HOME"] {
        if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            candidates.push(if var == "CUDA_HOME" {
                dir.join("include")
            } else {
                dir
            });
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates.push("/usr/local/cuda-13.0/targets/x86_64-linux/include".into());
    if let Some(dir) = candidates.iter().find(|d| d.join("cuda_bf16.h").is_file()) {
        return Ok(dir.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "cannot compile kernels.cu: no cuda_bf16.h in {}; set SYMMCOMM_CUDA_INCLUDE to a CUDA \
         include folder (`source scripts/nvrtc-env.sh` fetches one from PyPI)",
        tried.join(", ")
    )
}

/// `kernels.cu` as PTX for GPUs of compute capability `major.minor` (`compute_90` on H200).
pub fn compile(major: i32, minor: i32) -> Result<Ptx> {
    check_library(
        "nvrtc",
        "add the folder of libnvrtc.so.13 to LD_LIBRARY_PATH (`source scripts/nvrtc-env.sh` \
         fetches it from PyPI)",
    )?;
    let include = include_dir()?;
    let arch = format!("compute_{major}{minor}");
    let options = CompileOptions {
        include_paths: vec![include.display().to_string()],
        options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
        name: Some("kernels.cu".into()),
        ..CompileOptions::default()
    };
    compile_ptx_with_opts(SOURCE, options).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => anyhow::anyhow!(
            "NVRTC rejected kernels.cu for {arch} ({nvrtc:?}):\n{}",
            log.to_string_lossy()
        ),
        other => anyhow::anyhow!("NVRTC failed on kernels.cu for {arch}: {other}"),
    })
}
