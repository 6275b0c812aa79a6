//! The check of a step's output: the final hidden state (after the last RMSNorm) of every batch
//! row against the unsharded model's, as the relative L2 error of each row, the largest one
//! reported. The sharded and the unsharded model hold the same weights and differ only in
//! where partial sums are rounded, so the error is the arithmetic's own.
//!
//! Tolerances (the largest per-row error):
//! - f32 (the CPU): the two runs differ in the order of f32 sums only (a row-parallel GEMM sums
//!   each rank's part, the all-reduce sums the parts); measured 2e-7 to 5e-7 on the tiny
//!   preset. 1e-4 leaves room and is far below any real mistake.
//! - bf16 (the GPU, and the CPU with `--host-dtype bf16`): every stored activation is rounded
//!   to bf16 (up to 2^-9 = 0.2% each), and the sharded run rounds each rank's o_proj and
//!   down_proj partial sums before the all-reduce where the unsharded run rounds the whole sum
//!   once; from there the two runs round different values, and the difference grows with
//!   depth. The CPU's bf16 emulation, 2 ranks, batch 4, Llama-3.1-8B widths: 0.46% (1 layer),
//!   0.73% (4), 0.87% (8), 1.1% (16), 1.4% (32 layers; layers beyond 4 reusing the first
//!   four's weights to fit in memory); the tiny preset: 1.3% (2 layers, batch 64), 2.0% (32
//!   layers, batch 16). 5% is 2.5x the worst of these. A broken all-reduce is far above
//!   it: without the all-reduces (each rank keeping its own part) the error is 50-100% (a
//!   test checks it). One of the 64 all-reduces left out gives 15% (layer 0's down_proj) or
//!   6.5% (layer 15's), but stays under 5% in the last layer (2.0% for o_proj, 4.6% for
//!   down_proj), which no later layer amplifies: the check is end to end, symmcomm's own
//!   checks compare every collective element by element.

/// Tolerance of the largest per-row relative L2 error, by how activations are stored.
pub fn tolerance(bf16_storage: bool) -> f64 {
    if bf16_storage { 5e-2 } else { 1e-4 }
}

/// The largest relative L2 error of a row of `got` against `want` (rows of `cols`), or `None`
/// when `got` holds a value that is not finite (a poisoned element left unwritten, say).
pub fn max_row_rel_err(got: &[f32], want: &[f32], cols: usize) -> Option<f64> {
    assert_eq!(got.len(), want.len(), "outputs of different sizes");
    if got.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let mut worst = 0f64;
    for (g, w) in got.chunks_exact(cols).zip(want.chunks_exact(cols)) {
        let (mut diff, mut norm) = (0f64, 0f64);
        for (&g, &w) in g.iter().zip(w) {
            diff += (f64::from(g) - f64::from(w)).powi(2);
            norm += f64::from(w).powi(2);
        }
        worst = worst.max((diff / norm.max(f64::MIN_POSITIVE)).sqrt());
    }
    Some(worst)
}

/// Whether an error passes: finite and within `tol`.
pub fn passes(err: Option<f64>, tol: f64) -> bool {
    err.is_some_and(|e| e <= tol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_row_error_and_poison() {
        let want = [3.0, 4.0, 1.0, 0.0];
        assert_eq!(max_row_rel_err(&want, &want, 2), Some(0.0));
        // Row 1 off by 0.5 against a norm of 1.
        let got = [3.0, 4.0, 1.5, 0.0];
        assert_eq!(max_row_rel_err(&got, &want, 2), Some(0.5));
        let poisoned = [3.0, 4.0, f32::NAN, 0.0];
        assert_eq!(max_row_rel_err(&poisoned, &want, 2), None);
        assert!(!passes(None, 1.0));
        assert!(passes(Some(0.01), tolerance(true)));
    }
}
