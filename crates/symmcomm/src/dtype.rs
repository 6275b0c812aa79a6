//! Element types and reduction operators, and which reductions each type allows.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// The element types symmcomm moves. Floats can be reduced; integers are only gathered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer (gathers only).
    I32,
    /// Byte (gathers only).
    U8,
}

impl DType {
    /// Every dtype, in a fixed order.
    pub const ALL: [DType; 5] = [DType::F32, DType::F16, DType::BF16, DType::I32, DType::U8];
    /// The dtypes that can be reduced.
    pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// The short name used in tables and results files (`bf16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::U8 => "u8",
        }
    }

    /// Whether reductions are defined on this type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Whether `op` may reduce values of this type.
    pub fn allows(self, op: ReduceOp) -> bool {
        let _ = op;
        self.is_float()
    }

    /// Decode element `i` of a little-endian byte slice as f64.
    pub fn read_f64(self, bytes: &[u8], i: usize) -> f64 {
        let s = i * self.size();
        let b = &bytes[s..s + self.size()];
        match self {
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
            DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
            DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            DType::U8 => b[0] as f64,
        }
    }

    /// Encode `v` (rounded to nearest) as element `i` of a little-endian byte slice.
    pub fn write_f64(self, bytes: &mut [u8], i: usize, v: f64) {
        let s = i * self.size();
        let b = &mut bytes[s..s + self.size()];
        match self {
            DType::F32 => b.copy_from_slice(&(v as f32).to_le_bytes()),
            DType::F16 => b.copy_from_slice(&f16::from_f64(v).to_le_bytes()),
            DType::BF16 => b.copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
            DType::I32 => b.copy_from_slice(&(v as i32).to_le_bytes()),
            DType::U8 => b[0] = v as u8,
        }
    }

    /// Relative tolerance for comparing a reduction of `terms` values with an f64 reference:
    /// inputs are exact in the type, sums accumulate in f32, and `roundings` partial or final
    /// sums are rounded to the type (1 when only the result is; `terms − 1` when every step of
    /// a ring rounds, as NCCL's regular kernels do).
    pub fn reduce_tolerance(self, terms: usize, roundings: usize) -> f64 {
        let rounding = match self {
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => 2f64.powi(-11),
            DType::BF16 => 2f64.powi(-8),
            DType::I32 | DType::U8 => 0.0,
        };
        // Each rounding errs by at most `rounding` times a partial sum, whose magnitude is at
        // most the sum of the absolute values; plus f32 accumulation of `terms` values.
        roundings.max(1) as f64 * rounding + terms as f64 * f32::EPSILON as f64
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("unknown dtype {s:?} (expected one of f32, f16, bf16, i32, u8)"))
    }
}

/// Reduction operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReduceOp {
    /// Sum over ranks.
    Sum,
    /// Sum over ranks divided by the number of ranks.
    Avg,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
}

impl ReduceOp {
    /// Every operator.
    pub const ALL: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min];

    /// The short name (`sum`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }

    /// Reduce `values` (one per rank) in f64: the reference.
    pub fn reduce_f64(self, values: impl IntoIterator<Item = f64>) -> f64 {
        let mut n = 0usize;
        let mut acc: Option<f64> = None;
        for v in values {
            n += 1;
            acc = Some(match (self, acc) {
                (_, None) => v,
                (ReduceOp::Sum | ReduceOp::Avg, Some(a)) => a + v,
                (ReduceOp::Max, Some(a)) => a.max(v),
                (ReduceOp::Min, Some(a)) => a.min(v),
            });
        }
        let a = acc.unwrap_or(0.0);
        if self == ReduceOp::Avg && n > 0 {
            a / n as f64
        } else {
            a
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReduceOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ReduceOp::ALL
            .into_iter()
            .find(|d| d.name() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("unknown reduction {s:?} (expected sum, avg, max or min)"))
    }
}

/// A Rust type that is one of symmcomm's element types.
pub trait Element: bytemuck::Pod + Send + Sync + fmt::Debug + 'static {
    /// The matching dtype.
    const DTYPE: DType;
    /// Widen to f64 (exact for every supported type).
    fn to_f64(self) -> f64;
    /// Round from f64 to this type.
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

impl Element for i32 {
    const DTYPE: DType = DType::I32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as i32
    }
}

impl Element for u8 {
    const DTYPE: DType = DType::U8;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        for r in ReduceOp::ALL {
            assert_eq!(r.name().parse::<ReduceOp>().unwrap(), r);
        }
        assert!("f64".parse::<DType>().is_err());
    }

    #[test]
    fn bytes_round_trip_through_f64() {
        let mut buf = vec![0u8; 8];
        for d in DType::ALL {
            d.write_f64(&mut buf, 1, 3.0);
            assert_eq!(d.read_f64(&buf, 1), 3.0, "{d}");
        }
    }

    #[test]
    fn reference_reductions() {
        let v = [1.0, -2.0, 4.0];
        assert_eq!(ReduceOp::Sum.reduce_f64(v), 3.0);
        assert_eq!(ReduceOp::Avg.reduce_f64(v), 1.0);
        assert_eq!(ReduceOp::Max.reduce_f64(v), 4.0);
        assert_eq!(ReduceOp::Min.reduce_f64(v), -2.0);
    }

    #[test]
    fn integers_are_not_reduced() {
        assert!(!DType::I32.allows(ReduceOp::Sum));
        assert!(!DType::U8.allows(ReduceOp::Max));
        assert!(DType::BF16.allows(ReduceOp::Avg));
    }
}
