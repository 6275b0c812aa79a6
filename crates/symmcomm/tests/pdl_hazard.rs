//! NCCL 2.28.0–2.30.6 launch their symmetric kernels with programmatic dependent launch but
//! never wait on the grid dependency, so a symmetric collective can read its input before the
//! kernel that writes it has finished. This test builds exactly that: a producer that lets its
//! dependents start at once and writes its output only after a delay, then an NCCL symmetric
//! all-reduce of that output, captured in a CUDA graph and replayed with fresh data each time,
//! every replay checked. With symmcomm's guard (the default) no replay may be wrong; without it,
//! on an affected NCCL, wrong replays must show up (otherwise this test could not see the
//! hazard at all). Also run eagerly, since PDL applies to plain stream launches too.
//!
//! NCCL launches straight onto the caller's stream, so that the programmatic edge to the
//! producer exists, only with `NCCL_GRAPH_MIXING_SUPPORT=0` (what SGLang sets for DCP with symmetric memory);
//! otherwise its graph-mixing events sit between producer and kernel. The tests set it.

mod common;

use common::TestBackend;
use symmcomm::{Collective, DType, Impl, ReduceOp, run_rank_threads};
use symmcomm_lab::verify::{self, Case};

const REPLAYS: u64 = 60;
const DELAY_NS: u64 = 30_000;

fn mixing_off() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("NCCL_GRAPH_MIXING_SUPPORT").is_none() {
            // SAFETY: every test of this binary calls this first, before it starts any thread
            // or NCCL; the `Once` makes the other test wait here, so nothing reads the
            // environment while it changes.
            unsafe { std::env::set_var("NCCL_GRAPH_MIXING_SUPPORT", "0") };
        }
    });
}

/// Wrong replays (any rank) out of `REPLAYS`.
fn wrong_replays(guard: bool, graph: bool) -> u64 {
    mixing_off();
    let mut cfg = TestBackend::Cuda.config();
    cfg.pdl_guard = guard;
    let seed = common::seed();
    let res = run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let case = Case {
            coll: Collective::AllReduce(ReduceOp::Sum),
            dtype: DType::BF16,
            shape: vec![64 << 10],
            dim: None,
            imp: Impl::Symmetric,
            input_symm: true,
            output_symm: true,
            seed,
        };
        let bufs = verify::alloc(g, &case)?;
        let counter = g.epoch_counter()?;
        let step = || -> symmcomm::Result<()> {
            g.bump(&counter)?;
            g.fill_random_early_release(&bufs.input, case.seed, Some(&counter), DELAY_NS)?;
            g.collective(case.coll, &bufs.input, &bufs.output, None, case.imp)?;
            Ok(())
        };
        let graph_exec = if graph {
            comm.begin_capture()?;
            let r = step();
            let gr = comm.end_capture()?;
            r?;
            Some(gr)
        } else {
            None
        };
        let mut wrong = 0u64;
        for replay in 1..=REPLAYS {
            g.poison(&bufs.output)?;
            match &graph_exec {
                Some(gr) => gr.replay()?,
                None => step()?,
            }
            let got = g.download_bytes(&bufs.output)?;
            if verify::compare(&case, 2, g.rank(), replay, &got).is_err() {
                wrong += 1;
            }
        }
        Ok(wrong)
    });
    res.into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .max()
        .unwrap_or(0)
}

fn affected() -> bool {
    symmcomm::info::nccl().is_ok_and(|n| symmcomm::info::pdl_hazard(n.version()))
}

#[test]
fn guarded_symmetric_collectives_never_read_early() {
    if !TestBackend::Cuda.can_run(2) {
        return;
    }
    for graph in [true, false] {
        let wrong = wrong_replays(true, graph);
        eprintln!("guard on, graph {graph}: {wrong}/{REPLAYS} replays wrong");
        assert_eq!(
            wrong, 0,
            "guarded nccl_symm read inputs early (graph {graph})"
        );
    }
}

/// A diagnostic rather than a check: on the 2×H200 machine with NCCL 2.28.3 this producer did
/// not make the unguarded kernel read early (0 of 60 replays wrong, graph mixing off), so the
/// guard stays as the conservative fix whose cost BENCHMARKS.md reports. Run it with
/// `--ignored` on another NCCL or GPU to look again.
#[test]
#[ignore = "diagnostic: the hazard did not reproduce on NCCL 2.28.3 with this producer"]
fn unguarded_symmetric_collectives_show_the_hazard_on_affected_nccl() {
    if !TestBackend::Cuda.can_run(2) {
        return;
    }
    let wrong = wrong_replays(false, true);
    eprintln!(
        "guard off, graph: {wrong}/{REPLAYS} replays wrong (NCCL affected: {})",
        affected()
    );
    if affected() {
        assert!(
            wrong > 0,
            "expected the PDL hazard to corrupt some replays without the guard"
        );
    } else {
        assert_eq!(wrong, 0);
    }
}
