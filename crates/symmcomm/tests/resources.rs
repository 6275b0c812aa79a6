//! Groups and pools created and dropped many times (1000 by default; `SYMMCOMM_RESOURCE_CYCLES`
//! sets it): each cycle splits a group (on GPUs: two NCCL communicators, our kernels' workspace
//! and peer mappings), grows its symmetric pool by a registered segment, runs a checked
//! all-reduce and drops everything. Afterwards device memory (`cuMemGetInfo`) and the process's
//! virtual address space (where NCCL reserves symmetric address space) must be back where they
//! were after the warm-up cycles (a tenth as many as measured, at least 3).
//!
//! Why warm up that long: on GPUs, dropped groups' NCCL communicators are destroyed on teardown
//! threads, several at once. Each new thread that allocates may get its own glibc malloc arena
//! (64 MiB of address space, kept for the process's life), so the address space steps up once,
//! while the number of concurrent teardowns first reaches its steady state, and stays there; a
//! leak per cycle keeps growing. Both figures from before the first cycle are printed too.

mod common;

use common::TestBackend;
use symmcomm::PoolConfig;
use symmcomm::{Collective, DType, GroupKind, Impl, ReduceOp, run_rank_threads};
use symmcomm_lab::verify::{self, Case};

/// The process's virtual memory size in bytes (`VmSize` of /proc/self/status).
fn vm_size() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn cycles() -> usize {
    std::env::var("SYMMCOMM_RESOURCE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn groups_and_pools_come_back(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    let mut cfg = b.config();
    cfg.pool = PoolConfig {
        segment_bytes: 2 << 20,
        alignment: 256,
        granularity: 1 << 16,
    };
    let n = cycles();
    let results = run_rank_threads(2, &cfg, |comm| {
        let case = Case {
            coll: Collective::AllReduce(ReduceOp::Sum),
            dtype: DType::BF16,
            shape: vec![8192],
            dim: None,
            imp: Impl::Symmetric,
            input_symm: true,
            output_symm: true,
            seed: 11,
        };
        // Where a cycle's time goes: creating the group, the checked collective (which grows
        // the pool), dropping the group.
        let spent = std::cell::Cell::new([std::time::Duration::ZERO; 3]);
        let add = |k: usize, t: std::time::Instant| {
            let mut s = spent.get();
            s[k] += t.elapsed();
            spent.set(s);
        };
        let cycle = |i: usize| -> symmcomm::Result<()> {
            let t = std::time::Instant::now();
            let g = comm.split(GroupKind::Tp, 0)?;
            add(0, t);
            let t = std::time::Instant::now();
            let case = Case {
                seed: case.seed + i as u64,
                ..case.clone()
            };
            common::checked(verify::run_checked(&g, &case))?;
            assert_eq!(g.pool_stats().segments, 1);
            g.barrier()?;
            add(1, t);
            let t = std::time::Instant::now();
            drop(g);
            add(2, t);
            Ok(())
        };
        let vm_start = vm_size();
        let mem_start = comm.device_memory()?;
        let warm_up = (n / 10).max(3);
        for i in 0..warm_up {
            cycle(i)?;
        }
        comm.world().barrier()?;
        let mem0 = comm.device_memory()?;
        let vm0 = vm_size();
        if comm.rank() == 0 {
            eprintln!(
                "before any cycle: device free {:?} B, VmSize {vm_start} B; after {warm_up} \
                 warm-up cycles: device free {:?} B, VmSize {vm0} B",
                mem_start.map(|m| m.0),
                mem0.map(|m| m.0)
            );
        }
        let t0 = std::time::Instant::now();
        for i in 0..n {
            cycle(warm_up + i)?;
            if comm.rank() == 0 && (i + 1) % 100 == 0 {
                eprintln!(
                    "{} cycles in {:.1} s; device free {:?}; VmSize {} MiB",
                    i + 1,
                    t0.elapsed().as_secs_f64(),
                    comm.device_memory()?.map(|(f, _)| f >> 20),
                    vm_size() >> 20
                );
            }
        }
        comm.world().barrier()?;
        let [create, run, dropped] = spent.get();
        eprintln!(
            "rank {}: of {} cycles, creating groups took {create:?}, the checked all-reduces \
             {run:?}, dropping {dropped:?}",
            comm.rank(),
            n + warm_up
        );
        let mem1 = comm.device_memory()?;
        let vm1 = vm_size();
        Ok((mem0, mem1, vm0, vm1, t0.elapsed()))
    });
    for (r, res) in results.into_iter().enumerate() {
        let (mem0, mem1, vm0, vm1, took) = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        println!(
            "rank {r}: {n} cycles in {took:?}; device free {:?} -> {:?} B; VmSize {vm0} -> {vm1} B",
            mem0.map(|m| m.0),
            mem1.map(|m| m.0)
        );
        if let (Some((free0, _)), Some((free1, _))) = (mem0, mem1) {
            let lost = free0.saturating_sub(free1);
            // One cycle holds a 2 MiB segment, two communicators and a workspace: far more
            // than this. A leak of any of them per cycle would show as hundreds of MiB.
            assert!(
                lost <= 16 << 20,
                "rank {r}: device memory did not come back: {lost} B less free after {n} cycles"
            );
        }
        // Virtual address space: a reservation kept per cycle (NCCL's symmetric address
        // space, our peer mappings) would grow this by at least a segment per cycle.
        let grown = vm1.saturating_sub(vm0);
        assert!(
            grown <= 256 << 20,
            "rank {r}: the address space grew by {grown} B over {n} cycles"
        );
    }
}

backend_tests!(groups_and_pools_come_back);
