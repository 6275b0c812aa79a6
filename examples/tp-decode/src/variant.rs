//! How a step's all-reduces run: a collective implementation of symmcomm's, or `fused`, where
//! each all-reduce and the residual add and RMSNorm after it are one call
//! ([`symmcomm::Group::all_reduce_add_rmsnorm`], one kernel per rank where the fused kernels
//! take the shape).

use std::str::FromStr;

use symmcomm::norm::NormImpl;
use symmcomm::{BackendKind, Impl};

/// One way of running the step's all-reduces, as `--impls` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The all-reduce alone with this implementation; the add and the RMSNorm are the engine's
    /// kernels.
    Collective(Impl),
    /// All-reduce, residual add and RMSNorm in one call, with this choice of symmcomm's.
    Fused(NormImpl),
}

impl Variant {
    /// The name in the table and the results file: the implementation's on `backend`
    /// (`auto`, `nccl`, `host`, ...), `fused` (`host_fused` on the host backend).
    pub fn name(self, backend: BackendKind) -> String {
        match (self, backend) {
            (Variant::Collective(imp), _) => imp.name(backend),
            (Variant::Fused(_), BackendKind::Cuda) => "fused".into(),
            (Variant::Fused(_), BackendKind::Host) => "host_fused".into(),
        }
    }

    /// The implementation of an all-reduce run on its own: the variant's, or `auto` (what the
    /// fused operation's unfused fallback also runs).
    pub fn collective(self) -> Impl {
        match self {
            Variant::Collective(imp) => imp,
            Variant::Fused(_) => Impl::Auto,
        }
    }

    /// Whether the step's outputs are rounded to bf16 where the all-reduce meets the residual
    /// (the fused operation takes bf16 only), whatever the CPU stores elsewhere.
    pub fn rounds_to_bf16(self) -> bool {
        matches!(self, Variant::Fused(_))
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fused" | "host_fused" => Ok(Variant::Fused(NormImpl::Auto)),
            _ => s
                .parse::<Impl>()
                .map(Variant::Collective)
                .map_err(|e| format!("{e}, or fused (all-reduce + add + RMSNorm in one call)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for v in [
            Variant::Collective(Impl::Auto),
            Variant::Collective(Impl::Regular),
            Variant::Fused(NormImpl::Auto),
        ] {
            for backend in [BackendKind::Cuda, BackendKind::Host] {
                assert_eq!(v.name(backend).parse::<Variant>(), Ok(v), "{backend:?}");
            }
        }
        let e = "fast".parse::<Variant>().unwrap_err();
        assert!(
            e.contains("unknown implementation \"fast\"") && e.contains("fused"),
            "{e}"
        );
    }
}
