//! The reference generator behind every producer kernel, test and benchmark check: element `i`
//! of rank `rank` at epoch `epoch` is a pure function of `(seed, rank, epoch, i)`, computed the
//! same way here and in `kernels/util.cu`, so the host can recompute any rank's input.

use half::{bf16, f16};

use crate::dtype::DType;

/// SplitMix64's finaliser.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64 random bits for one element.
pub fn raw(seed: u64, rank: u64, epoch: u64, i: u64) -> u64 {
    let a = splitmix64(epoch.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ i);
    let b = splitmix64(rank.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7) ^ a);
    splitmix64(seed ^ b)
}

/// The f32 a float element starts from: uniform on [-1, 1) with 24 random bits.
pub fn unit_f32(bits: u64) -> f32 {
    ((bits >> 40) as f32) * (1.0 / 8_388_608.0) - 1.0
}

/// The element's value, exactly as stored in `dtype`, widened to f64.
pub fn value(dtype: DType, seed: u64, rank: u64, epoch: u64, i: u64) -> f64 {
    let bits = raw(seed, rank, epoch, i);
    match dtype {
        DType::F32 => unit_f32(bits) as f64,
        DType::F16 => f16::from_f32(unit_f32(bits)).to_f64(),
        DType::BF16 => bf16::from_f32(unit_f32(bits)).to_f64(),
        DType::I32 => ((bits >> 32) as u32 as i32) as f64,
        DType::U8 => (bits >> 56) as f64,
    }
}

/// Write elements `start..start + out.len() / dtype.size()` as little-endian bytes.
pub fn fill_bytes(dtype: DType, seed: u64, rank: u64, epoch: u64, start: u64, out: &mut [u8]) {
    let n = out.len() / dtype.size();
    for k in 0..n {
        let bits = raw(seed, rank, epoch, start + k as u64);
        let s = k * dtype.size();
        match dtype {
            DType::F32 => out[s..s + 4].copy_from_slice(&unit_f32(bits).to_le_bytes()),
            DType::F16 => {
                out[s..s + 2].copy_from_slice(&f16::from_f32(unit_f32(bits)).to_le_bytes())
            }
            DType::BF16 => {
                out[s..s + 2].copy_from_slice(&bf16::from_f32(unit_f32(bits)).to_le_bytes())
            }
            DType::I32 => out[s..s + 4].copy_from_slice(&((bits >> 32) as u32).to_le_bytes()),
            DType::U8 => out[s] = (bits >> 56) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_match_values() {
        for d in DType::ALL {
            let mut b = vec![0u8; 16 * d.size()];
            fill_bytes(d, 7, 1, 3, 100, &mut b);
            for k in 0..16 {
                assert_eq!(
                    d.read_f64(&b, k),
                    value(d, 7, 1, 3, 100 + k as u64),
                    "{d} {k}"
                );
            }
        }
    }

    #[test]
    fn values_vary_with_every_input() {
        let base = value(DType::F32, 1, 0, 0, 0);
        assert_ne!(base, value(DType::F32, 2, 0, 0, 0));
        assert_ne!(base, value(DType::F32, 1, 1, 0, 0));
        assert_ne!(base, value(DType::F32, 1, 0, 1, 0));
        assert_ne!(base, value(DType::F32, 1, 0, 0, 1));
        for i in 0..1000 {
            let v = value(DType::F32, 9, 0, 0, i);
            assert!((-1.0..1.0).contains(&v));
        }
    }
}
