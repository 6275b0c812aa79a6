//! Host-side collectives (all-gather, broadcast, barrier) among a subset of ranks, built on the
//! job's [`Store`]. Groups use them for what must agree before the GPUs talk: NCCL unique ids,
//! pool checks, registration order.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Store;
use crate::abort::{self, AbortFlag, POLL};
use crate::error::{Error, Op, OpCtx, Result};

/// Host-side collectives among `members` (global ranks), namespaced by `prefix`.
pub struct ControlPlane {
    store: Arc<dyn Store>,
    prefix: String,
    members: Vec<usize>,
    global_rank: usize,
    index: usize,
    timeout: Duration,
    seq: AtomicU64,
    /// The communicator's abort flag: waits poll it, and a failed wait trips every
    /// communicator of the process. `None` for bootstrap-level planes.
    abort: Option<Arc<AbortFlag>>,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("prefix", &self.prefix)
            .field("members", &self.members)
            .field("index", &self.index)
            .finish()
    }
}

impl ControlPlane {
    /// The control plane of `members` (sorted global ranks that include `global_rank`).
    pub fn new(
        store: Arc<dyn Store>,
        prefix: String,
        members: Vec<usize>,
        global_rank: usize,
        timeout: Duration,
    ) -> Self {
        let index = members
            .iter()
            .position(|&m| m == global_rank)
            .expect("a control plane's members include its own rank");
        ControlPlane {
            store,
            prefix,
            members,
            global_rank,
            index,
            timeout,
            seq: AtomicU64::new(0),
            abort: None,
        }
    }

    /// The same plane as a communicator's: waits last at most `timeout` each and poll `abort`,
    /// and a failed wait aborts every communicator of the process.
    pub(crate) fn for_communicator(mut self, timeout: Duration, abort: Arc<AbortFlag>) -> Self {
        self.timeout = timeout;
        self.abort = Some(abort);
        self
    }

    /// This rank's index among the members.
    pub fn rank(&self) -> usize {
        self.index
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Global ranks of the members, in group order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// This rank's global rank.
    pub fn global_rank(&self) -> usize {
        self.global_rank
    }

    /// Namespace of this plane's keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Deadline applied to each wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The communicator's abort flag, when this plane belongs to one.
    pub(crate) fn abort_flag(&self) -> Option<&Arc<AbortFlag>> {
        self.abort.as_ref()
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// A control plane for a subgroup with its own namespace. `members` are global ranks and
    /// must include this rank.
    pub fn subgroup(&self, name: &str, members: Vec<usize>) -> ControlPlane {
        let mut sub = ControlPlane::new(
            self.store.clone(),
            format!("{}/{}", self.prefix, name),
            members,
            self.global_rank,
            self.timeout,
        );
        sub.abort = self.abort.clone();
        sub
    }

    fn ctx(&self, op: Op, bytes: usize) -> OpCtx {
        OpCtx {
            op,
            group: self.prefix.clone(),
            rank: self.index,
            world: self.members.len(),
            bytes,
        }
    }

    /// Every member contributes `mine`; returns all contributions in member order. `tag`
    /// names the exchange in errors.
    pub fn all_gather(&self, tag: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.all_gather_for(tag, mine, &self.ctx(Op::Bootstrap, mine.len()))
    }

    /// [`ControlPlane::all_gather`] on behalf of the operation `ctx` names: a timeout or an
    /// abort names it (the host backend's data plane across processes uses this).
    pub(crate) fn all_gather_for(
        &self,
        tag: &str,
        mine: &[u8],
        ctx: &OpCtx,
    ) -> Result<Vec<Vec<u8>>> {
        let res = self.all_gather_inner(tag, mine, ctx);
        match &self.abort {
            // A communicator's call names itself even when the store failed under it (the
            // master's process died, say).
            Some(_) => abort::on_failure(res.map_err(|e| match e.ctx() {
                Some(_) => e,
                None => Error::Aborted {
                    ctx: ctx.clone(),
                    reason: format!("the job's store failed: {e}"),
                },
            })),
            None => res,
        }
    }

    fn all_gather_inner(&self, tag: &str, mine: &[u8], ctx: &OpCtx) -> Result<Vec<Vec<u8>>> {
        if let Some(a) = &self.abort {
            a.check(ctx)?;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let key = |i: usize| format!("{}/ag{}/{}", self.prefix, seq, i);
        self.store.set(&key(self.index), mine)?;
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut out = Vec::with_capacity(self.members.len());
        for i in 0..self.members.len() {
            loop {
                // A communicator's plane waits in slices so that an abort is seen within POLL.
                let until = match &self.abort {
                    Some(a) => {
                        a.check(ctx)?;
                        deadline.min(Instant::now() + POLL)
                    }
                    None => deadline,
                };
                if let Some(v) = self.store.get(&key(i), until)? {
                    out.push(v);
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        ctx: ctx.clone(),
                        waited: start.elapsed(),
                        detail: format!(
                            "host all-gather '{tag}' (#{seq}) of {}: group rank {i} (global rank {}) never contributed",
                            self.prefix, self.members[i]
                        ),
                    });
                }
            }
        }
        // Everyone has read everyone's value once the next exchange completes; the key of the
        // exchange before the previous one is no longer read by anybody.
        if seq >= 2 {
            let old = format!("{}/ag{}/{}", self.prefix, seq - 2, self.index);
            self.store.delete(&old)?;
        }
        Ok(out)
    }

    /// Member `root`'s `value` on every member (`value` is ignored elsewhere).
    pub fn broadcast(&self, tag: &str, root: usize, value: &[u8]) -> Result<Vec<u8>> {
        let mine = if self.index == root { value } else { &[] };
        let mut all = self.all_gather(tag, mine)?;
        Ok(std::mem::take(&mut all[root]))
    }

    /// Wait until every member arrives.
    pub fn barrier(&self, tag: &str) -> Result<()> {
        self.all_gather(tag, &[]).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::ThreadStore;

    fn planes(n: usize, timeout: Duration) -> Vec<ControlPlane> {
        let store: Arc<dyn Store> = Arc::new(ThreadStore::new());
        (0..n)
            .map(|r| ControlPlane::new(store.clone(), "t".into(), (0..n).collect(), r, timeout))
            .collect()
    }

    #[test]
    fn all_gather_in_member_order() {
        let ps = planes(4, Duration::from_secs(10));
        let out: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
            let hs: Vec<_> = ps
                .iter()
                .map(|p| {
                    s.spawn(move || {
                        let mut res = Vec::new();
                        for round in 0..5u8 {
                            let v = p.all_gather("x", &[p.rank() as u8, round]).unwrap();
                            res.push(v.concat());
                        }
                        res.concat()
                    })
                })
                .collect();
            hs.into_iter().map(|h| vec![h.join().unwrap()]).collect()
        });
        for o in &out {
            assert_eq!(o, &out[0]);
        }
        assert_eq!(&out[0][0][..8], &[0, 0, 1, 0, 2, 0, 3, 0]);
    }

    #[test]
    fn missing_member_times_out_with_its_rank() {
        let ps = planes(2, Duration::from_millis(100));
        let err = ps[0].all_gather("lonely", b"a").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("lonely") && msg.contains("rank 1"), "{msg}");
    }

    #[test]
    fn broadcast_and_subgroups() {
        let ps = planes(3, Duration::from_secs(10));
        std::thread::scope(|s| {
            for p in &ps {
                s.spawn(move || {
                    let v = p.broadcast("id", 2, &[7, 7]).unwrap();
                    assert_eq!(v, vec![7, 7]);
                    if p.global_rank() != 1 {
                        let sub = p.subgroup("even", vec![0, 2]);
                        let all = sub.all_gather("g", &[p.global_rank() as u8]).unwrap();
                        assert_eq!(all, vec![vec![0], vec![2]]);
                    }
                    p.barrier("end").unwrap();
                });
            }
        });
    }
}
