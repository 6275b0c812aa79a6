//! The CPU model sharded over symmcomm's host backend (2 thread ranks) against the unsharded
//! model: within the f32 tolerance, within the bf16 one when activations are rounded as the
//! GPU rounds them or when the all-reduces are fused with the add and RMSNorm (a bf16
//! operation), and far outside both when the all-reduces are left out.

use symmcomm::norm::NormImpl;
use symmcomm::{BackendChoice, CommConfig, GroupKind, Impl, run_rank_threads};
use tp_decode::check::{max_row_rel_err, tolerance};
use tp_decode::compute::Compute;
use tp_decode::cpu::{CpuCompute, CpuTp, Storage};
use tp_decode::model::{Act, Dims, Linear, Norm, Shard, decode_step};
use tp_decode::variant::Variant;

const BATCH: usize = 4;

/// The sharded model with its all-reduces left out: each rank keeps its own partial sums.
struct WithoutAllReduce<'a>(&'a mut CpuCompute);

impl Compute for WithoutAllReduce<'_> {
    fn load_input(&mut self, batch: usize) -> anyhow::Result<()> {
        self.0.load_input(batch)
    }
    fn rms_norm(&mut self, x: Act, w: Norm, y: Act, batch: usize) -> anyhow::Result<()> {
        self.0.rms_norm(x, w, y, batch)
    }
    fn linear(&mut self, x: Act, w: Linear, y: Act, batch: usize) -> anyhow::Result<()> {
        self.0.linear(x, w, y, batch)
    }
    fn rope_append_kv(&mut self, layer: usize, batch: usize) -> anyhow::Result<()> {
        self.0.rope_append_kv(layer, batch)
    }
    fn attention(&mut self, layer: usize, batch: usize) -> anyhow::Result<()> {
        self.0.attention(layer, batch)
    }
    fn swiglu(&mut self, batch: usize) -> anyhow::Result<()> {
        self.0.swiglu(batch)
    }
    fn add_residual(&mut self, batch: usize) -> anyhow::Result<()> {
        self.0.add_residual(batch)
    }
    fn all_reduce(&mut self, _batch: usize) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A seed of this run (printed, so that a failure can be replayed).
fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    eprintln!("seed {s:#x}");
    s
}

/// How the sharded step combines the ranks' partial sums.
#[derive(Clone, Copy, Debug)]
enum How {
    /// The all-reduces, run as `Variant` says.
    AllReduce(Variant),
    /// Not at all ([`WithoutAllReduce`]).
    Without,
}

/// Every rank's largest per-row error of the sharded step (tiny preset, `layers` layers)
/// against the unsharded one, and what its all-reduces ran.
fn errors(storage: Storage, layers: usize, how: How) -> Vec<(Option<f64>, Vec<String>)> {
    let dims = Dims {
        layers,
        ..Dims::preset("tiny").unwrap()
    };
    let seed = seed();
    let config = CommConfig {
        backend: BackendChoice::Host,
        ..CommConfig::default()
    };
    let results = run_rank_threads(2, &config, |comm| {
        let tp = comm.split(GroupKind::Tp, 0)?;
        let shard = Shard::new(dims.clone(), tp.size(), tp.rank()).unwrap();
        let tp = CpuTp::new(tp, BATCH, dims.hidden)?;
        let mut model = CpuCompute::new(shard, BATCH, seed, storage, Some(tp)).unwrap();
        let unsharded = Shard::unsharded(dims.clone()).unwrap();
        let mut reference = CpuCompute::new(unsharded, BATCH, seed, storage, None).unwrap();
        decode_step(&mut reference, layers, BATCH).unwrap();
        model.poison_output();
        match how {
            How::AllReduce(variant) => {
                model.set_variant(variant);
                decode_step(&mut model, layers, BATCH).unwrap();
            }
            How::Without => {
                decode_step(&mut WithoutAllReduce(&mut model), layers, BATCH).unwrap();
            }
        }
        let err = max_row_rel_err(&model.output(BATCH), &reference.output(BATCH), dims.hidden);
        eprintln!(
            "{storage:?}, {layers} layers, {how:?}, rank {}: {err:?}, ran {:?}",
            comm.rank(),
            model.ran()
        );
        Ok((err, model.ran()))
    });
    results.into_iter().map(|r| r.unwrap()).collect()
}

const AUTO: How = How::AllReduce(Variant::Collective(Impl::Auto));

#[test]
fn sharded_f32_matches_the_unsharded_model() {
    for (err, _) in errors(Storage::F32, 2, AUTO) {
        let e = err.expect("finite output");
        assert!(e <= tolerance(false), "relative error {e:e}");
    }
}

#[test]
fn sharded_bf16_stays_within_the_gpu_tolerance() {
    for (err, _) in errors(Storage::Bf16, 8, AUTO) {
        let e = err.expect("finite output");
        // Rounding shows (the runs round different partial sums), within the tolerance.
        assert!(
            e > tolerance(false) && e <= tolerance(true),
            "relative error {e:e}"
        );
    }
}

#[test]
fn fused_all_reduce_add_norm_matches_the_unsharded_model() {
    for storage in [Storage::F32, Storage::Bf16] {
        for (err, ran) in errors(storage, 8, How::AllReduce(Variant::Fused(NormImpl::Auto))) {
            let e = err.expect("finite output");
            // The fused operation is bf16: its rounding shows even when the CPU stores f32.
            assert!(
                e > tolerance(false) && e <= tolerance(true),
                "{storage:?}: relative error {e:e}"
            );
            assert!(
                !ran.is_empty() && ran.iter().all(|r| r.starts_with("host_fused_")),
                "{storage:?}: ran {ran:?}"
            );
        }
    }
}

#[test]
fn without_the_all_reduces_the_check_fails() {
    for storage in [Storage::F32, Storage::Bf16] {
        for (err, _) in errors(storage, 2, How::Without) {
            let e = err.expect("finite output");
            assert!(e > 0.3, "{storage:?}: relative error only {e:e}");
        }
    }
}
