//! Shared by the integration tests: which backends a test body runs on, fresh seeds, and the
//! rule that GPU tests skip with a message when no GPU is present and fail instead when
//! `SYMMCOMM_REQUIRE_GPU=1`.

#![allow(dead_code)]

use std::time::Duration;

pub mod procs;

use symmcomm::{BackendChoice, Bootstrap, CommConfig, Communicator, TableSource};

/// A backend a test body can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestBackend {
    Host,
    Cuda,
}

impl TestBackend {
    /// The configuration for this backend, with a short deadline so failures do not hang.
    pub fn config(self) -> CommConfig {
        CommConfig {
            backend: match self {
                TestBackend::Host => BackendChoice::Host,
                TestBackend::Cuda => BackendChoice::Cuda,
            },
            timeout: Duration::from_secs(30),
            table: TableSource::None,
            ..CommConfig::default()
        }
    }

    /// Whether a world of `world` ranks can run here; prints why not. Panics when the GPU is
    /// required but missing.
    pub fn can_run(self, world: usize) -> bool {
        match self {
            TestBackend::Host => true,
            TestBackend::Cuda => {
                let require = std::env::var("SYMMCOMM_REQUIRE_GPU").is_ok_and(|v| v == "1");
                match symmcomm::info::cuda_devices() {
                    Ok(n) if n >= world => true,
                    Ok(n) => {
                        // Too few GPUs for this world size is a skip even when GPUs are required.
                        eprintln!("SKIP: {world} ranks need {world} GPUs, {n} present");
                        false
                    }
                    Err(why) => {
                        assert!(
                            !require,
                            "SYMMCOMM_REQUIRE_GPU=1 but the CUDA backend cannot start: {why}"
                        );
                        eprintln!(
                            "SKIP: no GPU ({why}); set SYMMCOMM_REQUIRE_GPU=1 to fail instead"
                        );
                        false
                    }
                }
            }
        }
    }
}

/// The simulated host of rank `rank` of `world` on `hosts` hosts: consecutive ranks,
/// `world / hosts` on each, the last host taking the rest.
pub fn host_of(rank: usize, world: usize, hosts: usize) -> usize {
    (rank / (world / hosts).max(1)).min(hosts - 1)
}

/// [`symmcomm::run_rank_threads`] with the ranks on `hosts` simulated hosts ([`host_of`]):
/// every rank's bootstrap names its host (`host-H`), so the world spans `hosts` NVLink domains
/// as far as symmcomm knows. One host is the machine's identity, as in any other test. On
/// CUDA the ranks still share one process (NCCL sees one node and keeps NVLink); the NCCL
/// network transport needs processes with `NCCL_HOSTID` (tests/hosts.rs).
pub fn run_on_hosts<R: Send>(
    world: usize,
    hosts: usize,
    config: &CommConfig,
    body: impl Fn(&Communicator) -> symmcomm::Result<R> + Sync,
) -> Vec<symmcomm::Result<R>> {
    if hosts <= 1 {
        return symmcomm::run_rank_threads(world, config, body);
    }
    let boots = Bootstrap::threads(world, config.timeout.max(Duration::from_secs(1)));
    std::thread::scope(|s| {
        let handles: Vec<_> = boots
            .into_iter()
            .map(|boot| {
                let (body, rank) = (&body, boot.rank);
                let boot = boot.on_host(format!("host-{}", host_of(rank, world, hosts)));
                std::thread::Builder::new()
                    .name(format!("rank{rank}"))
                    .spawn_scoped(s, move || body(&Communicator::new(boot, config.clone())?))
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// `c` with a small pool (1 MiB segments), so tests grow pools often.
pub fn small_pool(mut c: CommConfig) -> CommConfig {
    c.pool = symmcomm::PoolConfig {
        segment_bytes: 1 << 20,
        alignment: 256,
        granularity: 1 << 16,
    };
    c
}

/// Every rank's result, or a panic naming the first rank that failed.
pub fn all_ok<R: std::fmt::Debug>(results: Vec<symmcomm::Result<R>>) -> Vec<R> {
    results
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .collect()
}

/// A fresh seed per test run, printed so a failure can be replayed with `SYMMCOMM_SEED`.
pub fn seed() -> u64 {
    let s = std::env::var("SYMMCOMM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("seed {s} (replay with SYMMCOMM_SEED={s})");
    s
}

/// Define one test per backend from a body `fn(TestBackend)`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod host {
            $(#[test] fn $name() { super::$name($crate::common::TestBackend::Host) })*
        }
        mod cuda {
            $(#[test] fn $name() { super::$name($crate::common::TestBackend::Cuda) })*
        }
    };
}

/// A checked run's result inside a rank's body: a wrong output fails the test here, with the
/// mismatch named; a run that failed is the body's error, as any other call's.
pub fn checked<T>(r: Result<T, symmcomm_lab::verify::CheckError>) -> symmcomm::Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(symmcomm_lab::verify::CheckError::Run(e)) => Err(e),
        Err(wrong) => panic!("{wrong}"),
    }
}
