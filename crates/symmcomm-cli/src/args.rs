//! What the commands accept: every choice as a clap `ValueEnum` (so `--help` lists the values
//! and a wrong one is refused naming the argument), and every number through a parser that
//! refuses what is out of range and says why.

use clap::ValueEnum;
use symmcomm::dcp::CombineImpl;
use symmcomm::norm::{NormImpl, max_hidden};
use symmcomm::{Algo, BackendChoice, Collective, DType, Impl, ReduceOp};
use symmcomm_lab::bench::Variant;
use symmcomm_lab::decode_sim::{ModelDims, StepConfig};

/// Most ranks a job runs on one host: thread ranks of the host backend, GPUs of one machine, or
/// processes of `symmcomm launch` (every host collective costs each rank O(world) copies).
pub(crate) const MAX_RANKS: usize = 64;

/// Most nodes of a job `symmcomm launch` starts a part of.
pub(crate) const MAX_NODES: usize = 1024;

/// Longest wait (`--timeout` of the rank commands): a wait longer than a day is a hang.
pub(crate) const MAX_WAIT_S: u64 = 86_400;

/// Longest `symmcomm launch --timeout`: a year (beyond it the deadline would overflow).
pub(crate) const MAX_LAUNCH_S: u64 = 365 * 86_400;

/// Largest element count of one rank's piece in `check` (2^30: a GiB of u8, 4 GiB of f32).
pub(crate) const MAX_CHECK_ELEMS: usize = 1 << 30;

/// Largest `--sizes` value of `bench`: more than any GPU holds.
pub(crate) const MAX_BENCH_BYTES: usize = 64 << 30;

/// Most decode tokens per rank (`--batch`, `--dcp-batches`).
pub(crate) const MAX_BATCH: usize = 4096;

/// A parser of whole numbers in `lo..=hi` that says, when refusing, what the bounds mean.
pub(crate) fn whole<T>(
    lo: u64,
    hi: u64,
    why: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: TryFrom<u64>,
{
    move |s: &str| {
        let v: u64 = s
            .trim()
            .parse()
            .map_err(|_| format!("not a whole number: {s:?}"))?;
        if v < lo || v > hi {
            return Err(if hi == u64::MAX {
                format!("{v} is less than {lo} ({why})")
            } else {
                format!("{v} is out of range {lo}..={hi} ({why})")
            });
        }
        T::try_from(v).map_err(|_| format!("{v} does not fit"))
    }
}

/// Counts of things to do (iterations, replays, ...): at least 1.
pub(crate) fn count<T: TryFrom<u64>>() -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync {
    whole(1, u64::MAX, "at least one, or there is nothing to measure")
}

/// A size in bytes: `2048`, `2K`, `64M`, `1G`, from 1 B to [`MAX_BENCH_BYTES`].
pub(crate) fn bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("not a size: {s:?} (e.g. 2048, 2K, 64M, 1G)"))?;
    match n.checked_mul(mul) {
        Some(0) => Err("a size of 0 bytes has nothing to move".into()),
        Some(b) if b <= MAX_BENCH_BYTES => Ok(b),
        _ => Err(format!(
            "{s} is more than {} GiB, more than any GPU holds",
            MAX_BENCH_BYTES >> 30
        )),
    }
}

/// A hidden size of `bench --norm-hiddens`: a multiple of 8 (rows of whole 16-byte units of
/// bf16) up to the largest the add-RMSNorm kernels take.
pub(crate) fn hidden(s: &str) -> Result<usize, String> {
    let most = max_hidden(DType::BF16);
    let h: usize = whole(8, most as u64, "hidden sizes the add-RMSNorm kernels take")(s)?;
    if !h.is_multiple_of(8) {
        return Err(format!(
            "{h} is not a multiple of 8 (rows of whole 16-byte units)"
        ));
    }
    Ok(h)
}

/// Microseconds of stand-in compute: a finite number, 0 to a second.
pub(crate) fn micros(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("not a number: {s:?}"))?;
    if !(v.is_finite() && (0.0..=1e6).contains(&v)) {
        return Err(format!("{v} is not in 0..=1000000 µs"));
    }
    Ok(v)
}

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendArg {
    /// CUDA when GPUs, the driver and NCCL are present, else host.
    Auto,
    /// The reference backend: ranks are threads (or processes) on host memory.
    Host,
    /// NCCL symmetric memory and symmcomm's NVLink kernels.
    Cuda,
}

impl From<BackendArg> for BackendChoice {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Host => BackendChoice::Host,
            BackendArg::Cuda => BackendChoice::Cuda,
        }
    }
}

/// An implementation and where its buffers live (`--impls` of `bench`, `tune`, `decode-sim`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum ImplArg {
    /// The dispatch table's choice per call, buffers in windows.
    Auto,
    /// `auto` on plain memory (it stages into windows where the table says so).
    AutoPlain,
    /// NCCL's regular kernels, plain memory.
    #[value(alias = "regular")]
    Nccl,
    /// NCCL's regular kernels on buffers in windows.
    NcclOnWindows,
    /// NCCL's symmetric kernels, windows.
    #[value(alias = "symmetric")]
    NcclSymm,
    /// symmcomm's one-shot kernel.
    Oneshot,
    /// symmcomm's two-shot kernel.
    Twoshot,
    /// symmcomm's copy-engine all-gather.
    Ce,
    /// symmcomm's low-latency one-shot kernel.
    Ll,
    /// The host backend's regular path, plain memory.
    Host,
    /// The host backend's regular path on buffers in windows.
    HostOnWindows,
    /// The host backend's symmetric path, windows.
    HostSymm,
    /// The hierarchical all-reduce of a group across hosts (`auto`'s only where a table row
    /// across hosts names it).
    #[value(alias = "host_hierarchical")]
    Hierarchical,
}

impl ImplArg {
    /// The library's variant.
    pub(crate) fn variant(self) -> Variant {
        let plain = |imp| Variant {
            imp,
            windows: false,
        };
        let windows = |imp| Variant { imp, windows: true };
        match self {
            ImplArg::Auto => Variant::of(Impl::Auto),
            ImplArg::AutoPlain => plain(Impl::Auto),
            ImplArg::Nccl | ImplArg::Host => Variant::of(Impl::Regular),
            ImplArg::NcclOnWindows | ImplArg::HostOnWindows => windows(Impl::Regular),
            ImplArg::NcclSymm | ImplArg::HostSymm => Variant::of(Impl::Symmetric),
            ImplArg::Oneshot => Variant::of(Impl::Kernel(Algo::OneShot)),
            ImplArg::Twoshot => Variant::of(Impl::Kernel(Algo::TwoShot)),
            ImplArg::Ce => Variant::of(Impl::Kernel(Algo::CopyEngine)),
            ImplArg::Ll => Variant::of(Impl::Kernel(Algo::LowLatency)),
            ImplArg::Hierarchical => Variant::of(Impl::Hierarchical),
        }
    }
}

/// `--ops` of `bench` and `tune`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum OpArg {
    /// All-reduce (sum).
    AllReduce,
    /// All-gather.
    AllGather,
    /// Reduce-scatter (sum).
    ReduceScatter,
    /// The DCP combine at DeepSeek-V3 MLA shapes (`bench` only).
    DcpCombine,
    /// All-reduce + residual add + RMSNorm of a decode layer (`bench` only).
    ArRmsnorm,
}

impl OpArg {
    /// The collective, or `None` for the DCP combine.
    pub(crate) fn collective(self) -> Option<Collective> {
        match self {
            OpArg::AllReduce => Some(Collective::AllReduce(ReduceOp::Sum)),
            OpArg::AllGather => Some(Collective::AllGather),
            OpArg::ReduceScatter => Some(Collective::ReduceScatter(ReduceOp::Sum)),
            OpArg::DcpCombine | OpArg::ArRmsnorm => None,
        }
    }
}

/// `--dtypes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "lower")]
pub(crate) enum DTypeArg {
    F32,
    F16,
    Bf16,
    I32,
    U8,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::I32 => DType::I32,
            DTypeArg::U8 => DType::U8,
        }
    }
}

/// `--modes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ModeArg {
    /// Back-to-back launches.
    Eager,
    /// A graph of several operations, replayed.
    Graph,
}

impl From<ModeArg> for symmcomm_lab::bench::Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Eager => symmcomm_lab::bench::Mode::Eager,
            ModeArg::Graph => symmcomm_lab::bench::Mode::Graph,
        }
    }
}

/// `--dcp-impls` of `bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum CombineArg {
    /// All-gather, correct, reduce-scatter with NCCL's regular kernels.
    #[value(alias = "host")]
    Nccl,
    /// The same sequence with NCCL's symmetric kernels (`host_symm` on the host).
    #[value(alias = "host_symm")]
    NcclSymm,
    /// The sequence with the dispatch table's choices.
    Auto,
    /// The sequence with symmcomm's one-shot kernels.
    Oneshot,
    /// The sequence with symmcomm's two-shot kernels.
    Twoshot,
    /// The sequence with symmcomm's low-latency kernels.
    Ll,
    /// One fused kernel per rank (`host_fused` on the host).
    #[value(alias = "host_fused")]
    Fused,
}

impl From<CombineArg> for CombineImpl {
    fn from(c: CombineArg) -> Self {
        match c {
            CombineArg::Nccl => CombineImpl::Sequence(Impl::Regular),
            CombineArg::NcclSymm => CombineImpl::Sequence(Impl::Symmetric),
            CombineArg::Auto => CombineImpl::Sequence(Impl::Auto),
            CombineArg::Oneshot => CombineImpl::Sequence(Impl::Kernel(Algo::OneShot)),
            CombineArg::Twoshot => CombineImpl::Sequence(Impl::Kernel(Algo::TwoShot)),
            CombineArg::Ll => CombineImpl::Sequence(Impl::Kernel(Algo::LowLatency)),
            CombineArg::Fused => CombineImpl::Fused,
        }
    }
}

/// `--norm-impls` of `bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum NormArg {
    /// The fused kernel the size rule picks (`host_fused` on the host).
    #[value(alias = "host_fused")]
    Fused,
    /// The fused low-latency kernel.
    #[value(alias = "host_fused_ll")]
    FusedLl,
    /// The fused one-shot kernel (one barrier).
    #[value(alias = "host_fused_oneshot")]
    FusedOneshot,
    /// The fused two-shot kernel (reduce-scatter, add and norm, all-gather).
    #[value(alias = "host_fused_twoshot")]
    FusedTwoshot,
    /// symmcomm's `auto` all-reduce, then the separate add-RMSNorm kernel.
    #[value(alias = "host_unfused")]
    Unfused,
    /// NCCL's regular all-reduce, then the same kernel (`host` on the host).
    #[value(alias = "host")]
    Nccl,
    /// The size rule: fused where a fused kernel runs the call, else unfused.
    Auto,
}

impl From<NormArg> for NormImpl {
    fn from(n: NormArg) -> Self {
        match n {
            NormArg::Fused => NormImpl::Fused(None),
            NormArg::FusedLl => NormImpl::Fused(Some(Algo::LowLatency)),
            NormArg::FusedOneshot => NormImpl::Fused(Some(Algo::OneShot)),
            NormArg::FusedTwoshot => NormImpl::Fused(Some(Algo::TwoShot)),
            NormArg::Unfused => NormImpl::Unfused,
            NormArg::Nccl => NormImpl::Nccl,
            NormArg::Auto => NormImpl::Auto,
        }
    }
}

/// `--model` of `decode-sim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ModelArg {
    /// DeepSeek-V3's dimensions.
    #[value(name = "deepseek-v3")]
    DeepseekV3,
    /// Small dimensions, for tests.
    Tiny,
}

impl ModelArg {
    /// The preset's dimensions.
    pub(crate) fn dims(self) -> ModelDims {
        match self {
            ModelArg::DeepseekV3 => ModelDims::deepseek_v3(),
            ModelArg::Tiny => ModelDims::tiny(),
        }
    }
}

/// `--configs` of `decode-sim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum ConfigArg {
    /// Tensor parallel over every rank.
    Tp,
    /// Data-parallel attention.
    DpAttn,
    /// Decode context parallel.
    Dcp,
}

impl From<ConfigArg> for StepConfig {
    fn from(c: ConfigArg) -> Self {
        match c {
            ConfigArg::Tp => StepConfig::Tp,
            ConfigArg::DpAttn => StepConfig::DpAttn,
            ConfigArg::Dcp => StepConfig::Dcp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_say_why_they_are_refused() {
        let p = whole::<usize>(1, 64, "ranks on one host");
        assert_eq!(p("8"), Ok(8));
        assert!(p("0").unwrap_err().contains("1..=64 (ranks on one host)"));
        assert!(p("1000").unwrap_err().contains("out of range"));
        assert!(p("-1").unwrap_err().contains("not a whole number"));
        let p = count::<u64>();
        assert_eq!(p("3"), Ok(3));
        assert!(p("0").unwrap_err().starts_with("0 is less than 1"));
    }

    #[test]
    fn hidden_sizes_are_whole_units_the_kernels_take() {
        assert_eq!(hidden("7168"), Ok(7168));
        assert!(hidden("12").unwrap_err().contains("multiple of 8"));
        assert!(hidden("0").unwrap_err().contains("out of range"));
        assert!(hidden("16392").unwrap_err().contains("out of range"));
    }

    #[test]
    fn sizes_parse_and_refuse_zero_and_overflow() {
        assert_eq!(bytes("2K"), Ok(2048));
        assert_eq!(bytes("64M"), Ok(64 << 20));
        assert_eq!(bytes("3"), Ok(3));
        assert!(bytes("0").unwrap_err().contains("0 bytes"));
        assert!(bytes("0K").unwrap_err().contains("0 bytes"));
        assert!(bytes("99999999999999G").unwrap_err().contains("GiB"));
        assert!(bytes("65G").unwrap_err().contains("GiB"));
        assert!(bytes("x").unwrap_err().contains("not a size"));
    }

    /// Every name the library's parser knows for an implementation maps to the same variant.
    #[test]
    fn impl_names_match_the_library() {
        for v in ImplArg::value_variants() {
            let name = v.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(Variant::parse(&name), Ok(v.variant()), "{name}");
        }
        for c in CombineArg::value_variants() {
            let name = c.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(
                name.parse::<CombineImpl>(),
                Ok(CombineImpl::from(*c)),
                "{name}"
            );
        }
        for n in NormArg::value_variants() {
            let name = n.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(name.parse::<NormImpl>(), Ok(NormImpl::from(*n)), "{name}");
        }
        for d in DTypeArg::value_variants() {
            let name = d.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(name.parse::<DType>(), Ok(DType::from(*d)), "{name}");
        }
        for c in ConfigArg::value_variants() {
            let name = c.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(StepConfig::parse(&name), Ok(StepConfig::from(*c)), "{name}");
        }
        for m in ModelArg::value_variants() {
            let name = m.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(ModelDims::preset(&name), Some(m.dims()), "{name}");
        }
    }
}
