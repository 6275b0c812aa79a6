//! Run several ranks as threads of this process, each with its own communicator: the harness
//! of tests and of `symmcomm check`, on any backend.

use std::time::Duration;

use crate::bootstrap::Bootstrap;
use crate::comm::Communicator;
use crate::config::CommConfig;
use crate::error::Result;

/// Start `world` ranks as threads, give each its communicator, run `body` on each, and return
/// every rank's result in rank order. A rank whose communicator fails to start reports that
/// error. Bootstrap waits use `config.timeout`.
pub fn run_rank_threads<R: Send>(
    world: usize,
    config: &CommConfig,
    body: impl Fn(&Communicator) -> Result<R> + Sync,
) -> Vec<Result<R>> {
    let boots = Bootstrap::threads(world, config.timeout.max(Duration::from_secs(1)));
    std::thread::scope(|s| {
        let handles: Vec<_> = boots
            .into_iter()
            .map(|boot| {
                let body = &body;
                std::thread::Builder::new()
                    .name(format!("rank{}", boot.rank))
                    .spawn_scoped(s, move || {
                        let comm = Communicator::new(boot, config.clone())?;
                        body(&comm)
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}
