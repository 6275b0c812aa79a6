//! `kernels.cu` compiles with NVRTC, as the binary compiles it (cudarc's NVRTC, the CUDA
//! headers found by `nvrtc::include_dir`), to PTX that defines every kernel the CUDA
//! implementation launches; and a missing cuBLAS is an error naming the library.
//!
//! The NVRTC test skips with a message when NVRTC or the CUDA headers are missing, and fails
//! instead when `SYMMCOMM_REQUIRE_NVRTC=1` (scripts/test.sh sets it after fetching both).

use tp_decode::cuda::check_cublas;
use tp_decode::nvrtc::{KERNEL_NAMES, check_library, compile, include_dir};

/// Hopper (the GPUs this runs on) and Ampere (the oldest with bf16 arithmetic).
#[test]
fn kernels_compile_for_hopper_and_ampere() {
    let required = std::env::var("SYMMCOMM_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    if let Err(e) = check_library("nvrtc", "").and_then(|()| include_dir().map(|_| ())) {
        assert!(
            !required,
            "NVRTC unavailable but SYMMCOMM_REQUIRE_NVRTC=1: {e}"
        );
        eprintln!("SKIPPED kernels: {e} (set SYMMCOMM_REQUIRE_NVRTC=1 to fail)");
        return;
    }
    for (major, minor) in [(9, 0), (8, 0)] {
        let ptx = compile(major, minor)
            .unwrap_or_else(|e| panic!("kernels.cu for {major}.{minor}: {e}"))
            .to_src();
        assert!(ptx.contains(&format!(".target sm_{major}{minor}")), "{ptx}");
        for name in KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{major}.{minor}: no kernel {name}"
            );
        }
    }
}

/// Where a library is missing (cuBLAS on CI machines), the error names it and says where to
/// point.
#[test]
fn a_missing_library_is_named() {
    if let Err(e) = check_cublas() {
        let text = e.to_string();
        assert!(text.contains("libcublas.so.13"), "{text}");
        assert!(text.contains("LD_LIBRARY_PATH"), "{text}");
    }
    let e = check_library("surely_not_a_cuda_library", "a hint").unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("libsurely_not_a_cuda_library.so.13") && text.contains("a hint"),
        "{text}"
    );
}
