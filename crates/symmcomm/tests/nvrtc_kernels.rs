//! Every kernel module compiles with NVRTC to a CUBIN that holds the expected kernels, the
//! compiler's caches work, the generated ABI header's layout checks reject a layout that differs
//! from Rust's, and the kernels' source stays in step with the host (the ABI written once, fill
//! constants, no multicast).
//!
//! NVRTC tests skip with a message when NVRTC or the CUDA headers are missing, and fail instead
//! when `SYMMCOMM_REQUIRE_NVRTC=1` (CI sets it after `source scripts/nvrtc-env.sh`).

use std::sync::Arc;

use symmcomm::DType;
use symmcomm::Error;
use symmcomm::kernels::abi::{ABI_DEFINES, abi_structs, render_abi_header};
use symmcomm::kernels::{
    self, COLLECTIVES, CollectiveKernel, DCP, KernelModule, MODULES, NormKernel, NvrtcCompiler,
    RMSNORM, SymmState, UTIL, abi_header, arch_for,
};

/// The kernels each module must define.
const EXPECTED: &[(&str, &[&str])] = &[
    (
        "util",
        &[
            "symm_fill_f32",
            "symm_fill_f16",
            "symm_fill_bf16",
            "symm_fill_i32",
            "symm_fill_u8",
            "symm_slow_fill_bf16",
            "symm_bump",
            "symm_guard",
            "symm_flag_pingpong",
        ],
    ),
    (
        "collectives",
        &[
            "symm_oneshot_allreduce_bf16",
            "symm_oneshot_allreduce_f16",
            "symm_oneshot_allreduce_f32",
            "symm_twoshot_allreduce_bf16",
            "symm_twoshot_allreduce_f16",
            "symm_ll_allreduce_bf16",
            "symm_ll_allreduce_f16",
            "symm_ll_allreduce_f32",
            "symm_ll_reducescatter_bf16",
            "symm_ll_reducescatter_f16",
            "symm_ll_reducescatter_f32",
            "symm_ll_allgather",
            "symm_twoshot_allreduce_f32",
            "symm_reducescatter_bf16",
            "symm_reducescatter_f16",
            "symm_reducescatter_f32",
            "symm_allgather",
            "symm_barrier",
        ],
    ),
    (
        "dcp",
        &[
            "dcp_correct_bf16_bf16",
            "dcp_correct_bf16_f32",
            "dcp_correct_f32_bf16",
            "dcp_correct_f32_f32",
            "dcp_fused_bf16_bf16",
            "dcp_fused_bf16_f32",
            "dcp_fused_f32_bf16",
            "dcp_fused_f32_f32",
        ],
    ),
    (
        "rmsnorm",
        &[
            "symm_add_rmsnorm_bf16",
            "symm_add_rmsnorm_f16",
            "symm_ll_allreduce_rmsnorm_bf16",
            "symm_ll_allreduce_rmsnorm_f16",
            "symm_oneshot_allreduce_rmsnorm_bf16",
            "symm_oneshot_allreduce_rmsnorm_f16",
            "symm_twoshot_allreduce_rmsnorm_bf16",
            "symm_twoshot_allreduce_rmsnorm_f16",
            "symm_ll_reducescatter_rmsnorm_bf16",
            "symm_ll_reducescatter_rmsnorm_f16",
            "symm_reducescatter_rmsnorm_bf16",
            "symm_reducescatter_rmsnorm_f16",
        ],
    ),
];

const ARCHES: &[&str] = &["sm_90a", "sm_90"];

fn nvrtc_required() -> bool {
    std::env::var("SYMMCOMM_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// Whether an ELF string table holds `name` as a whole entry (`\0name\0`).
fn has_symbol(cubin: &[u8], name: &str) -> bool {
    let mut needle = vec![0u8];
    needle.extend_from_slice(name.as_bytes());
    needle.push(0);
    cubin.windows(needle.len()).any(|w| w == needle.as_slice())
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read the cache folder")
        .map(|e| {
            e.expect("a cache folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Everything that needs NVRTC or reads the environment, in one test: the environment is
/// process-wide and NVRTC may read it from C while another thread writes it.
#[test]
fn nvrtc_compiles_every_module_and_caches() {
    let cache = tempfile::tempdir().expect("a temporary folder");
    // SAFETY: no other test in this binary reads or writes the environment or calls NVRTC, so
    // no other thread can be in getenv while this runs.
    unsafe { std::env::set_var("SYMMCOMM_KERNEL_CACHE", cache.path()) };

    let compiler = match NvrtcCompiler::new() {
        Ok(c) => c,
        Err(Error::NoGpu { reason }) if !nvrtc_required() => {
            eprintln!("SKIPPED nvrtc_kernels: {reason} (set SYMMCOMM_REQUIRE_NVRTC=1 to fail)");
            return;
        }
        Err(e) => panic!("NVRTC unavailable but SYMMCOMM_REQUIRE_NVRTC=1: {e}"),
    };
    eprintln!(
        "NVRTC {}.{}, headers {}",
        compiler.version().0,
        compiler.version().1,
        compiler.include_dir().display()
    );
    assert_eq!(compiler.cache_dir(), Some(cache.path()));
    assert!(
        compiler.include_dir().join("cuda_bf16.h").is_file(),
        "include dir without cuda_bf16.h"
    );

    // The module list and the expectations name the same modules.
    let names: Vec<&str> = MODULES.iter().map(|m| m.name).collect();
    let expected_names: Vec<&str> = EXPECTED.iter().map(|(m, _)| *m).collect();
    assert_eq!(names, expected_names);

    // Every module, every arch: a CUBIN (ELF) that defines every expected kernel.
    let mut first: Vec<Arc<Vec<u8>>> = Vec::new();
    for module in MODULES {
        let kernels = EXPECTED
            .iter()
            .find(|(m, _)| *m == module.name)
            .map(|(_, k)| *k)
            .unwrap_or_default();
        for arch in ARCHES {
            let cubin = match compiler.compile(module, arch) {
                Ok(c) => c,
                Err(Error::NoGpu { reason }) if !nvrtc_required() => {
                    eprintln!("SKIPPED nvrtc_kernels: {reason}");
                    return;
                }
                Err(e) => panic!("{}: {e}", module.name),
            };
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{} {arch}: not ELF",
                module.name
            );
            for kernel in kernels {
                assert!(
                    has_symbol(&cubin, kernel),
                    "{} for {arch}: no kernel {kernel}",
                    module.name
                );
            }
            first.push(cubin);
        }
    }
    let compiles = (MODULES.len() * ARCHES.len()) as u64;
    assert_eq!(compiler.stats().compiles, compiles);
    assert_eq!(compiler.stats().disk_hits, 0);

    // Every name CollectiveKernel hands out is in the collectives CUBIN.
    let cubin = compiler.compile(&COLLECTIVES, "sm_90a").expect("in memory");
    for kernel in CollectiveKernel::ALL {
        for dtype in DType::ALL {
            if let Some(name) = kernel.function(dtype) {
                assert!(has_symbol(&cubin, name), "no kernel {name}");
            }
        }
    }
    // Every name dcp_function hands out is in the dcp CUBIN, which holds none of the
    // collectives' entry points (it shares their protocol through symm_protocol.cuh only).
    let cubin = compiler.compile(&DCP, "sm_90a").expect("in memory");
    for fused in [false, true] {
        for p in DType::ALL {
            for o in DType::ALL {
                if let Some(name) = kernels::dcp_function(fused, p, o) {
                    assert!(has_symbol(&cubin, name), "no kernel {name}");
                }
            }
        }
    }
    assert!(!has_symbol(&cubin, "symm_allgather"));
    // Every name NormKernel hands out is in the rmsnorm CUBIN (bf16 and f16 only), which, like
    // dcp, shares the collectives' protocol through symm_protocol.cuh, not their entry points.
    let cubin = compiler.compile(&RMSNORM, "sm_90a").expect("in memory");
    let mut norm_names = 0;
    for kernel in NormKernel::ALL {
        for dtype in DType::ALL {
            if let Some(name) = kernel.function(dtype) {
                assert!(has_symbol(&cubin, name), "no kernel {name}");
                norm_names += 1;
            }
        }
    }
    assert_eq!(
        norm_names,
        2 * NormKernel::ALL.len(),
        "bf16 and f16 for every kernel"
    );
    assert!(!has_symbol(&cubin, "symm_ll_allreduce_bf16"));
    let cubin = compiler.compile(&UTIL, "sm_90a").expect("in memory");
    for dtype in DType::ALL {
        assert!(has_symbol(&cubin, kernels::fill_function(dtype)));
    }

    // In-process cache: the very same bytes, no new compile.
    let again = compiler.compile(&UTIL, "sm_90a").expect("in memory");
    assert!(Arc::ptr_eq(&again, &first[0]));
    assert_eq!(compiler.stats().compiles, compiles);
    assert!(compiler.stats().memory_hits >= 3);

    // Disk cache: one file per (module, arch), no temporary left; a new compiler reads them.
    let files = files_in(cache.path());
    assert_eq!(files.len(), MODULES.len() * ARCHES.len(), "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.ends_with(".cubin") && !f.starts_with('.'))
    );
    let fresh = NvrtcCompiler::new().expect("NVRTC loaded a moment ago");
    let from_disk = fresh.compile(&UTIL, "sm_90a").expect("cached");
    assert_eq!(from_disk.as_slice(), first[0].as_slice());
    assert_eq!(fresh.stats().disk_hits, 1);
    assert_eq!(fresh.stats().compiles, 0);

    // A damaged cache file is compiled again and replaced.
    let util_file = files
        .iter()
        .find(|f| f.starts_with("util-sm_90-"))
        .expect("util for sm_90 cached");
    std::fs::write(cache.path().join(util_file), b"not a cubin").expect("damage the cache");
    let repaired = fresh.compile(&UTIL, "sm_90").expect("recompiled");
    assert!(repaired.starts_with(b"\x7fELF"));
    assert_eq!(fresh.stats().compiles, 1);
    let rewritten = std::fs::read(cache.path().join(util_file)).expect("rewritten");
    assert_eq!(rewritten.as_slice(), repaired.as_slice());

    // No disk cache at all: still compiles.
    let uncached = NvrtcCompiler::new().expect("NVRTC").with_cache_dir(None);
    assert_eq!(uncached.cache_dir(), None);
    uncached.compile(&UTIL, "sm_90a").expect("compiles");
    assert_eq!(uncached.stats().compiles, 1);

    // An unwritable cache is a warning, not an error.
    let blocker = cache.path().join("a-file-not-a-folder");
    std::fs::write(&blocker, b"x").expect("a file");
    let unwritable = NvrtcCompiler::new()
        .expect("NVRTC")
        .with_cache_dir(Some(blocker.join("kernels")));
    unwritable
        .compile(&UTIL, "sm_90a")
        .expect("compiles anyway");

    // A syntax error: Error::Nvrtc naming the module and arch, with NVRTC's log.
    let broken = KernelModule {
        name: "broken",
        source: "extern \"C\" __global__ void symm_broken(int* p) { *p = ; }\n",
    };
    match compiler.compile(&broken, "sm_90a") {
        Err(Error::Nvrtc { kernel, arch, log }) => {
            assert_eq!(kernel, "broken");
            assert_eq!(arch, "sm_90a");
            assert!(log.contains("broken.cu(1): error"), "log: {log}");
            assert!(log.contains("expected an expression"), "log: {log}");
        }
        other => panic!("expected Error::Nvrtc, got {other:?}"),
    }

    abi_checks_are_enforced_by_nvrtc(&compiler);

    // A target NVRTC does not know: Error::Nvrtc too.
    match compiler.compile(&UTIL, "sm_1") {
        Err(Error::Nvrtc { arch, .. }) => assert_eq!(arch, "sm_1"),
        other => panic!("expected Error::Nvrtc, got {other:?}"),
    }

    // Registers and spills, for the record (visible with --nocapture).
    for module in [&COLLECTIVES, &DCP, &RMSNORM] {
        let report = compiler
            .ptxas_report(module, "sm_90a")
            .expect("ptxas report");
        assert!(report.contains("registers"), "report: {report}");
        eprintln!("{report}");
        for line in report.lines().filter(|l| l.contains("spill")) {
            assert!(
                line.contains("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"),
                "{} kernels spill or use a stack: {line}",
                module.name
            );
        }
    }
}

/// The `static_assert`s of `symm_abi.cuh` are checks NVRTC enforces, not text: the header as
/// generated compiles, and one whose asserted layout differs from the structs it declares (a
/// wrong offset, or a C type that is not the Rust field's) is rejected with the assertion's
/// message.
fn abi_checks_are_enforced_by_nvrtc(compiler: &NvrtcCompiler) {
    // The header inline (not #included), with a kernel that takes the structs by value.
    let module = |name: &'static str, header: String| KernelModule {
        name,
        source: Box::leak(
            format!(
                "{header}\nextern \"C\" __global__ void symm_abi_probe(const SymmArgs a, \
                 const DcpArgs d, const RmsNormArgs r, SymmState* st) {{ st->epoch = a.count + \
                 d.dim + r.hidden + (unsigned long long)r.eps; }}\n"
            )
            .into_boxed_str(),
        ),
    };
    let compiled = compiler.compile(&module("abi_as_generated", abi_header()), "sm_90a");
    assert!(compiled.is_ok(), "the generated header: {compiled:?}");

    let mut structs = abi_structs();
    let rank = structs[0]
        .fields
        .iter_mut()
        .find(|f| f.name == "rank")
        .expect("SymmArgs::rank");
    rank.offset += 4;
    let wrong_offset = render_abi_header(ABI_DEFINES, &structs);
    match compiler.compile(&module("abi_wrong_offset", wrong_offset), "sm_90a") {
        Err(Error::Nvrtc { log, .. }) => {
            assert!(log.contains("static assertion failed"), "log: {log}");
            assert!(
                log.contains("SymmArgs::rank: offset differs from Rust's 180"),
                "log: {log}"
            );
        }
        other => panic!("a wrong offset compiled: {other:?}"),
    }

    let mut structs = abi_structs();
    let world = structs[2]
        .fields
        .iter_mut()
        .find(|f| f.name == "world")
        .expect("DcpArgs::world");
    world.c_type = "unsigned long long";
    let wrong_type = render_abi_header(ABI_DEFINES, &structs);
    match compiler.compile(&module("abi_wrong_type", wrong_type), "sm_90a") {
        Err(Error::Nvrtc { log, .. }) => {
            assert!(log.contains("static assertion failed"), "log: {log}");
            assert!(
                log.contains("DcpArgs: size differs from Rust's 56"),
                "log: {log}"
            );
        }
        other => panic!("a wrong C type compiled: {other:?}"),
    }
}

/// The ABI is written once, in `kernels::abi`: no kernel source defines a name of the generated
/// header again or declares one of its structs; the protocol header includes the generated one,
/// and the modules that speak the protocol include that (no module includes another `.cu`).
#[test]
fn kernel_sources_take_the_abi_from_the_generated_header() {
    let abi = abi_header();
    let sources = MODULES.iter().map(|m| (m.name, m.source)).chain(
        kernels::headers()
            .iter()
            .filter(|h| h.name != "symm_abi.cuh")
            .map(|h| (h.name, h.source.as_str())),
    );
    for (name, source) in sources {
        for define in ABI_DEFINES {
            assert!(
                !source.contains(&format!("#define {} ", define.name)),
                "{name} defines {} again; it comes from symm_abi.cuh",
                define.name
            );
        }
        for s in abi_structs() {
            assert!(
                !source.contains(&format!("struct {} {{", s.name)),
                "{name} declares struct {} again; it comes from symm_abi.cuh",
                s.name
            );
            assert!(abi.contains(&format!("struct {} {{", s.name)));
        }
    }
    let protocol = kernels::headers()
        .iter()
        .find(|h| h.name == "symm_protocol.cuh")
        .expect("the protocol header");
    assert!(protocol.source.contains("#include \"symm_abi.cuh\""));
    for module in [COLLECTIVES, DCP, RMSNORM] {
        assert!(
            module.source.contains("#include \"symm_protocol.cuh\""),
            "{} does not include the protocol",
            module.name
        );
    }
    for module in MODULES {
        assert!(
            !module.source.contains(".cu\"") && !module.source.contains("SYMM_PROTOCOL_ONLY"),
            "{} includes another module",
            module.name
        );
    }
}

#[test]
fn arch_for_targets_arch_specific_hopper_and_blackwell() {
    assert_eq!(arch_for(9, 0), "sm_90a");
    assert_eq!(arch_for(10, 0), "sm_100a");
    assert_eq!(arch_for(8, 0), "sm_80");
    assert_eq!(arch_for(8, 9), "sm_89");
    assert_eq!(arch_for(12, 0), "sm_120");
}

/// The fill kernel cannot run here, so check the next best thing: every constant and shift of
/// `fill.rs` appears in `util.cu`, and the composition is spelled the same way.
#[test]
fn fill_kernel_uses_the_constants_of_fill_rs() {
    let fill_rs = include_str!("../src/fill.rs");
    let code = fill_rs.split("#[cfg(test)]").next().unwrap_or(fill_rs);
    let cu = UTIL.source.to_ascii_uppercase();

    let mut hex = 0;
    for (at, _) in code.match_indices("0x") {
        let digits: String = code[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || *c == '_')
            .filter(|c| *c != '_')
            .collect();
        assert!(
            cu.contains(&format!("0X{}ULL", digits.to_ascii_uppercase())),
            "util.cu lacks fill.rs's constant 0x{digits}"
        );
        hex += 1;
    }
    assert_eq!(
        hex, 5,
        "fill.rs has 5 hex constants (3 SplitMix64, 2 mixers)"
    );

    for (at, _) in code.match_indices(">> ") {
        let shift: String = code[at + 3..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        assert!(
            UTIL.source.contains(&format!(">> {shift}")),
            "util.cu lacks the shift >> {shift} of fill.rs"
        );
    }
    assert!(code.contains("8_388_608") && UTIL.source.contains("8388608.0f"));
    // The composition: epoch mixed with i, then rank, then the seed.
    for step in [
        "symm_splitmix64((epoch * 0xD1B54A32D192ED03ULL) ^ i)",
        "symm_splitmix64((rank * 0x8CB92BA72F3D8DD7ULL) ^ a)",
        "symm_splitmix64(seed ^ b)",
        "__float2half_rn(symm_unit_f32(bits))",
        "__float2bfloat16_rn(symm_unit_f32(bits))",
        "(int)(unsigned int)(bits >> 32)",
        "(unsigned char)(bits >> 56)",
    ] {
        assert!(UTIL.source.contains(step), "util.cu lacks `{step}`");
    }
}

/// NVLink multicast must never be used on the shared GPU machine.
#[test]
fn kernels_use_no_multicast() {
    let sources = MODULES.iter().map(|m| (m.name, m.source)).chain(
        kernels::headers()
            .iter()
            .map(|h| (h.name, h.source.as_str())),
    );
    for (name, source) in sources {
        for banned in ["multimem.", ".multicast", "cuMulticast", "multimem_"] {
            assert!(!source.contains(banned), "{name} contains {banned}");
        }
    }
}

#[test]
fn slot_sizes_cover_each_piece() {
    use CollectiveKernel as K;
    // One-shot: the whole buffer. Two-shot: ceil(count / world) in whole 16-byte units.
    assert_eq!(
        K::OneShotAllReduce.slot_bytes_needed(1000, DType::BF16, 2),
        2000
    );
    assert_eq!(
        K::TwoShotAllReduce.slot_bytes_needed(1000, DType::BF16, 3),
        672
    );
    assert_eq!(K::TwoShotAllReduce.slot_bytes_needed(1, DType::F32, 8), 16);
    assert_eq!(K::ReduceScatter.slot_bytes_needed(7, DType::F16, 4), 16);
    let count = K::AllGather.args_count(100, DType::F32);
    assert_eq!(count, 400);
    assert_eq!(K::AllGather.slot_bytes_needed(count, DType::F32, 2), 400);
    assert_eq!(K::Barrier.slot_bytes_needed(0, DType::U8, 2), 0);
    assert_eq!(K::OneShotAllReduce.function(DType::I32), None);
    assert_eq!(K::AllGather.function(DType::U8), Some("symm_allgather"));
    assert_eq!(kernels::workspace_bytes(4, 4096), 65536);
}

#[test]
fn state_errors_read_as_sentences() {
    let mut st = SymmState::default();
    assert_eq!(st.error_message(), None);
    st.error = kernels::ERR_TIMEOUT;
    st.error_src = 3;
    let msg = st.error_message().expect("an error");
    assert!(msg.contains("rank 3"), "{msg}");
}
