//! One group of the host backend: the "fabric" its rank threads share (every rank's
//! registered segments, a mailbox for the regular path, a barrier with a deadline) and the
//! collectives over it. The symmetric path reads peers' windows directly, at the same segment
//! and offset as the caller's own buffer, the way NVLink kernels read peers' memory.
//!
//! When the group's ranks are separate processes (launched by `symmcomm launch`, say), there
//! is no memory to share: each collective exchanges every rank's input through the job's store
//! (the control plane's all-gather, with its deadline and abort polling) and computes its
//! result locally. Both transports give the same bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::{HostBytes, HostMemory, HostQueue, dcp, host_mem, norm};
use crate::abort::{AbortFlag, POLL};
use crate::backend::{Algo, Exec, NormFused, NormShape};
use crate::backend::{Call, CallShape, Collective, DcpFused, DcpShape, GroupBackend, Impl};
use crate::bootstrap::ControlPlane;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, OpCtx, Result};
use crate::memory::Memory;
use crate::topology::{CrossDomainWindows, GroupTopology};

/// A reusable barrier with a deadline; a rank that times out poisons it, so every later wait
/// fails at once instead of hanging.
#[derive(Debug)]
struct HostBarrier {
    size: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

#[derive(Debug)]
struct BarrierState {
    generation: u64,
    arrived: Vec<bool>,
    poisoned: Option<String>,
}

impl HostBarrier {
    fn new(size: usize) -> Self {
        HostBarrier {
            size,
            state: Mutex::new(BarrierState {
                generation: 0,
                arrived: vec![false; size],
                poisoned: None,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BarrierState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait(
        &self,
        rank: usize,
        timeout: Duration,
        abort: Option<&AbortFlag>,
        ctx: &OpCtx,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        if let Some(why) = &st.poisoned {
            return Err(Error::Aborted {
                ctx: ctx.clone(),
                reason: why.clone(),
            });
        }
        let generation = st.generation;
        st.arrived[rank] = true;
        if st.arrived.iter().all(|&a| a) {
            st.arrived.fill(false);
            st.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        loop {
            let now = Instant::now();
            if st.generation != generation {
                return Ok(());
            }
            if let Some(why) = &st.poisoned {
                return Err(Error::Aborted {
                    ctx: ctx.clone(),
                    reason: why.clone(),
                });
            }
            if let Some(reason) = abort.and_then(AbortFlag::reason) {
                st.poisoned = Some(reason.clone());
                self.cv.notify_all();
                return Err(Error::Aborted {
                    ctx: ctx.clone(),
                    reason,
                });
            }
            if now >= deadline {
                let missing: Vec<usize> = (0..self.size).filter(|&r| !st.arrived[r]).collect();
                let why = format!(
                    "ranks {missing:?} did not reach the barrier of {} within {timeout:?}",
                    ctx.op
                );
                st.poisoned = Some(why.clone());
                self.cv.notify_all();
                return Err(Error::Timeout {
                    ctx: ctx.clone(),
                    waited: timeout,
                    detail: why,
                });
            }
            st = self
                .cv
                .wait_timeout(st, (deadline - now).min(POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// What the ranks of one host group share.
#[derive(Debug)]
struct Fabric {
    size: usize,
    /// `segments[rank][index]`: every rank's registered windows.
    segments: Mutex<Vec<Vec<Arc<HostMemory>>>>,
    /// One slot per rank for the regular path.
    mailbox: Mutex<Vec<Option<Arc<Vec<u8>>>>>,
    barrier: HostBarrier,
}

impl Fabric {
    fn new(size: usize) -> Self {
        Fabric {
            size,
            segments: Mutex::new(vec![Vec::new(); size]),
            mailbox: Mutex::new(vec![None; size]),
            barrier: HostBarrier::new(size),
        }
    }

    fn segments(&self) -> MutexGuard<'_, Vec<Vec<Arc<HostMemory>>>> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mailbox(&self) -> MutexGuard<'_, Vec<Option<Arc<Vec<u8>>>>> {
        self.mailbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Fabrics of live groups in this process, by a key the group's ranks agree on.
fn registry() -> &'static Mutex<HashMap<String, Weak<Fabric>>> {
    static R: OnceLock<Mutex<HashMap<String, Weak<Fabric>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

static NONCE: AtomicU64 = AtomicU64::new(0);

/// A token unique to this process (on any host): the process id and the time it first asked.
fn process_token() -> &'static str {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}.{nanos}", std::process::id())
    })
}

/// How a host group's ranks reach each other.
#[derive(Debug)]
enum Transport {
    /// Threads of one process: a shared fabric.
    Shared(Arc<Fabric>),
    /// Separate processes: every exchange goes through the store; `segments` counts this
    /// rank's registered windows.
    Store { segments: Mutex<usize> },
}

/// Join the group of `control`. Every rank contributes a key made of its process token; when
/// all tokens are this process's, group rank 0's key names a fabric in this process's registry,
/// created by whichever rank gets there first; otherwise the group runs over the store.
fn join(control: &ControlPlane) -> Result<Transport> {
    let token = process_token();
    let nonce = format!(
        "{token}:{}:{}",
        NONCE.fetch_add(1, Ordering::Relaxed),
        control.prefix()
    );
    let keys = control.all_gather("host fabric", nonce.as_bytes())?;
    let ours = format!("{token}:");
    if !keys.iter().all(|k| k.starts_with(ours.as_bytes())) {
        return Ok(Transport::Store {
            segments: Mutex::new(0),
        });
    }
    let key = String::from_utf8_lossy(&keys[0]).into_owned();
    let fabric = {
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|_, w| w.strong_count() > 0);
        match reg.get(&key).and_then(Weak::upgrade) {
            Some(f) => f,
            None => {
                let f = Arc::new(Fabric::new(control.size()));
                reg.insert(key.clone(), Arc::downgrade(&f));
                f
            }
        }
    };
    // Everyone holds the fabric before anyone can drop theirs.
    control.barrier("host fabric joined")?;
    Ok(Transport::Shared(fabric))
}

/// One rank's view of a host group.
#[derive(Debug)]
pub(crate) struct HostGroup {
    inner: Arc<HostGroupInner>,
}

#[derive(Debug)]
struct HostGroupInner {
    rank: usize,
    size: usize,
    transport: Transport,
    control: Arc<ControlPlane>,
    queue: Arc<HostQueue>,
    timeout: Duration,
    /// Why the fused DCP combine (which models our NVLink kernel) cannot run here: the group
    /// spans several hosts.
    cross_domain: Option<String>,
    /// The windows of a group that spans hosts, which may be refused (as NCCL may refuse
    /// them there) without failing the group.
    windows: Option<CrossDomainWindows>,
}

impl HostGroup {
    pub(crate) fn new(
        control: Arc<ControlPlane>,
        queue: Arc<HostQueue>,
        topology: &GroupTopology,
    ) -> Result<Self> {
        let transport = join(&control)?;
        Ok(HostGroup {
            inner: Arc::new(HostGroupInner {
                rank: control.rank(),
                size: control.size(),
                timeout: control.timeout(),
                transport,
                control,
                queue,
                cross_domain: topology.kernels_unavailable(),
                windows: topology.spans_domains().then(CrossDomainWindows::default),
            }),
        })
    }
}

impl HostGroupInner {
    fn barrier(&self, fabric: &Fabric, ctx: &OpCtx) -> Result<()> {
        fabric.barrier.wait(
            self.rank,
            self.timeout,
            self.control.abort_flag().map(|a| &**a),
            ctx,
        )
    }

    fn run(&self, call: &Call) -> Result<()> {
        match &self.transport {
            Transport::Shared(fabric) => self.run_shared(fabric, call),
            Transport::Store { .. } => self.run_store(call),
        }
    }

    /// A collective across processes: every rank's input through the store, computed locally.
    /// The symmetric path gives the same bytes (a rank's window input is its input).
    fn run_store(&self, call: &Call) -> Result<()> {
        if !matches!(call.imp, Impl::Regular | Impl::Symmetric) {
            return Err(Error::ImplUnavailable {
                ctx: call.ctx.clone(),
                implementation: call.imp.name(crate::BackendKind::Host),
                why: "not a host implementation".into(),
            });
        }
        let (in_bytes, out_bytes) = call.io_bytes(self.size);
        let mine = host_mem(&call.input).to_vec(call.input.offset, in_bytes);
        let all = self
            .control
            .all_gather_for(call.coll.name(), &mine, &call.ctx)?;
        if let Some((r, x)) = all.iter().enumerate().find(|(_, x)| x.len() != in_bytes) {
            return Err(Error::InvalidArgument {
                ctx: call.ctx.clone(),
                detail: format!(
                    "group rank {r} contributed {} B to this {}, this rank {in_bytes} B (ranks made different calls)",
                    x.len(),
                    call.coll.name()
                ),
            });
        }
        let inputs: Vec<Arc<Vec<u8>>> = all.into_iter().map(Arc::new).collect();
        let out = compute(
            call.coll, call.dtype, &inputs, self.rank, call.piece, out_bytes,
        );
        host_mem(&call.output).write(call.output.offset, &out);
        Ok(())
    }

    fn run_shared(&self, fabric: &Fabric, call: &Call) -> Result<()> {
        let world = fabric.size;
        let (in_bytes, out_bytes) = call.io_bytes(world);
        // Every rank's input bytes, read after the first barrier (inputs are ready).
        let inputs: Vec<Arc<Vec<u8>>> = match call.imp {
            Impl::Regular => {
                let mine = host_mem(&call.input).to_vec(call.input.offset, in_bytes);
                fabric.mailbox()[self.rank] = Some(Arc::new(mine));
                self.barrier(fabric, &call.ctx)?;
                let mb = fabric.mailbox();
                (0..world)
                    .map(|r| mb[r].clone().expect("every rank posted before the barrier"))
                    .collect()
            }
            Impl::Symmetric => {
                let loc = call
                    .input_symm
                    .expect("the symmetric path is only dispatched with a window input");
                self.barrier(fabric, &call.ctx)?;
                let segs = fabric.segments();
                (0..world)
                    .map(|r| Arc::new(segs[r][loc.segment].to_vec(loc.offset, in_bytes)))
                    .collect()
            }
            other => {
                return Err(Error::ImplUnavailable {
                    ctx: call.ctx.clone(),
                    implementation: other.name(crate::BackendKind::Host),
                    why: "not a host implementation".into(),
                });
            }
        };
        let out = compute(
            call.coll, call.dtype, &inputs, self.rank, call.piece, out_bytes,
        );
        // Nobody may overwrite a window or mailbox slot until every rank has read it.
        self.barrier(fabric, &call.ctx)?;
        if call.imp == Impl::Regular {
            fabric.mailbox()[self.rank] = None;
        }
        host_mem(&call.output).write(call.output.offset, &out);
        Ok(())
    }
}

impl HostGroupInner {
    /// The fused DCP combine: every rank posts its partial output and LSE, then merges its
    /// own heads from all of them.
    fn dcp_fused(&self, call: &DcpFused) -> Result<()> {
        let Transport::Shared(fabric) = &self.transport else {
            return Err(Error::ImplUnavailable {
                ctx: call.ctx.clone(),
                implementation: "host_fused".into(),
                why: "the fused DCP combine runs on thread ranks only".into(),
            });
        };
        let sh = &call.shape;
        let o_bytes = sh.batch * sh.heads * sh.dim * sh.partial.size();
        let mut mine = host_mem(&call.partial).to_vec(call.partial.offset, o_bytes);
        mine.extend(host_mem(&call.lse).to_vec(call.lse.offset, sh.batch * sh.heads * 4));
        fabric.mailbox()[self.rank] = Some(Arc::new(mine));
        self.barrier(fabric, &call.ctx)?;
        let posted: Vec<Arc<Vec<u8>>> = {
            let mb = fabric.mailbox();
            (0..fabric.size)
                .map(|r| mb[r].clone().expect("every rank posted before the barrier"))
                .collect()
        };
        let views: Vec<&[u8]> = posted.iter().map(|p| p.as_slice()).collect();
        let (out, merged) = dcp::merge(sh, &views);
        // Nobody may post again until every rank has read.
        self.barrier(fabric, &call.ctx)?;
        fabric.mailbox()[self.rank] = None;
        host_mem(&call.out).write(call.out.offset, &out);
        if let Some(m) = &call.merged_lse {
            host_mem(m).write(m.offset, &merged);
        }
        Ok(())
    }
}

impl HostGroupInner {
    /// The fused add-RMSNorm: every rank posts its input and residual, then computes the rows
    /// it keeps from all of them (`norm::fused`).
    fn norm_fused(&self, call: &NormFused) -> Result<()> {
        let Transport::Shared(fabric) = &self.transport else {
            return Err(Error::ImplUnavailable {
                ctx: call.ctx.clone(),
                implementation: "host_fused".into(),
                why: "the fused add-RMSNorm runs on thread ranks only".into(),
            });
        };
        let (sh, b) = (&call.shape, &call.bufs);
        let res_bytes = sh.rows_out() * sh.row_bytes();
        let mut mine = host_mem(&b.input).to_vec(b.input.offset, sh.input_bytes());
        mine.extend(host_mem(&b.residual).to_vec(b.residual.offset, res_bytes));
        let weight = host_mem(&b.weight).to_vec(b.weight.offset, sh.row_bytes());
        fabric.mailbox()[self.rank] = Some(Arc::new(mine));
        self.barrier(fabric, &call.ctx)?;
        let posted: Vec<Arc<Vec<u8>>> = {
            let mb = fabric.mailbox();
            (0..fabric.size)
                .map(|r| mb[r].clone().expect("every rank posted before the barrier"))
                .collect()
        };
        let views: Vec<&[u8]> = posted.iter().map(|p| p.as_slice()).collect();
        let (residual_out, normed) = norm::fused(sh, call.algo, &views, &weight, b.eps);
        // Nobody may post again until every rank has read.
        self.barrier(fabric, &call.ctx)?;
        fabric.mailbox()[self.rank] = None;
        host_mem(&b.residual_out).write(b.residual_out.offset, &residual_out);
        host_mem(&b.normed).write(b.normed.offset, &normed);
        Ok(())
    }
}

/// The result bytes of `rank` given every rank's input bytes.
fn compute(
    coll: Collective,
    dtype: DType,
    inputs: &[Arc<Vec<u8>>],
    rank: usize,
    piece: usize,
    out_bytes: usize,
) -> Vec<u8> {
    let e = dtype.size();
    match coll {
        Collective::AllGather => {
            let mut out = Vec::with_capacity(out_bytes);
            for x in inputs {
                out.extend_from_slice(&x[..piece * e]);
            }
            out
        }
        Collective::AllReduce(op) => {
            let parts: Vec<&[u8]> = inputs.iter().map(|x| &x[..piece * e]).collect();
            reduce(dtype, op, &parts)
        }
        Collective::ReduceScatter(op) => {
            let parts: Vec<&[u8]> = inputs
                .iter()
                .map(|x| &x[rank * piece * e..(rank + 1) * piece * e])
                .collect();
            reduce(dtype, op, &parts)
        }
    }
}

/// The element-wise sum of `parts` in f32 in rank order, rounded once to `dtype`: what an
/// all-reduce gives.
pub(super) fn reduce_sum(dtype: DType, parts: &[&[u8]]) -> Vec<u8> {
    reduce(dtype, ReduceOp::Sum, parts)
}

/// Element-wise reduction in f32 (the accumulation width our GPU kernels use), rounded once
/// to `dtype`.
fn reduce(dtype: DType, op: ReduceOp, parts: &[&[u8]]) -> Vec<u8> {
    let e = dtype.size();
    let n = parts[0].len() / e;
    let mut out = vec![0u8; n * e];
    let to_f32 = |b: &[u8], k: usize| -> f32 {
        let s = &b[k * e..(k + 1) * e];
        match dtype {
            DType::F32 => f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
            DType::F16 => half::f16::from_le_bytes([s[0], s[1]]).to_f32(),
            DType::BF16 => half::bf16::from_le_bytes([s[0], s[1]]).to_f32(),
            DType::I32 | DType::U8 => {
                unreachable!("integers are never reduced (checked before dispatch)")
            }
        }
    };
    for k in 0..n {
        let mut acc = to_f32(parts[0], k);
        for p in &parts[1..] {
            let v = to_f32(p, k);
            acc = match op {
                ReduceOp::Sum | ReduceOp::Avg => acc + v,
                ReduceOp::Max => acc.max(v),
                ReduceOp::Min => acc.min(v),
            };
        }
        if op == ReduceOp::Avg {
            acc /= parts.len() as f32;
        }
        let s = &mut out[k * e..(k + 1) * e];
        match dtype {
            DType::F32 => s.copy_from_slice(&acc.to_le_bytes()),
            DType::F16 => s.copy_from_slice(&half::f16::from_f32(acc).to_le_bytes()),
            DType::BF16 => s.copy_from_slice(&half::bf16::from_f32(acc).to_le_bytes()),
            DType::I32 | DType::U8 => unreachable!(),
        }
    }
    out
}

impl GroupBackend for HostGroup {
    fn rank(&self) -> usize {
        self.inner.rank
    }

    fn size(&self) -> usize {
        self.inner.size
    }

    fn alloc_segment(&self, bytes: usize, ctx: &OpCtx) -> Result<Arc<dyn Memory>> {
        self.inner.alloc_segment(bytes, ctx)
    }

    fn unavailable(&self, imp: Impl, _shape: &CallShape) -> Option<String> {
        match imp {
            Impl::Regular => None,
            Impl::Symmetric => self
                .inner
                .windows
                .as_ref()
                .and_then(CrossDomainWindows::symmetric_unavailable),
            Impl::Kernel(_) => Some("our NVLink kernels run on the CUDA backend only".into()),
            Impl::Auto => Some("auto is resolved before dispatch".into()),
            Impl::Local | Impl::Hierarchical => Some(format!(
                "{} runs in the group layer, never here",
                imp.name(crate::BackendKind::Host)
            )),
        }
    }

    fn collective(&self, _exec: Exec, call: &Call) -> Result<()> {
        let (me, call) = (self.inner.clone(), call.clone());
        self.inner.queue.enqueue(Box::new(move || me.run(&call)))
    }

    fn split(
        &self,
        _color: usize,
        _key: usize,
        control: Arc<ControlPlane>,
        topology: &GroupTopology,
    ) -> Result<Arc<dyn GroupBackend>> {
        Ok(Arc::new(HostGroup::new(
            control,
            self.inner.queue.clone(),
            topology,
        )?))
    }

    fn describe(&self) -> String {
        match self.inner.transport {
            Transport::Shared(_) => format!("host group of {} thread ranks", self.inner.size),
            Transport::Store { .. } => {
                format!(
                    "host group of {} processes (over the store)",
                    self.inner.size
                )
            }
        }
    }

    fn dcp_fused_unavailable(&self, _shape: &DcpShape) -> Option<String> {
        self.inner.fused_unavailable("the fused DCP combine")
    }

    fn dcp_fused(&self, _exec: Exec, call: &DcpFused) -> Result<()> {
        let (me, call) = (self.inner.clone(), call.clone());
        self.inner
            .queue
            .enqueue(Box::new(move || me.dcp_fused(&call)))
    }

    fn norm_fused_unavailable(&self, _shape: &NormShape, _algo: Algo) -> Option<String> {
        self.inner.fused_unavailable("the fused add-RMSNorm")
    }

    fn norm_fused(&self, _exec: Exec, call: &NormFused) -> Result<()> {
        let (me, call) = (self.inner.clone(), call.clone());
        self.inner
            .queue
            .enqueue(Box::new(move || me.norm_fused(&call)))
    }
}

impl HostGroupInner {
    /// Why a fused operation (`what`, for the message) cannot run on this group: across
    /// domains, or between processes (the fused host kernels read peers' memory directly).
    fn fused_unavailable(&self, what: &str) -> Option<String> {
        if let Some(why) = &self.cross_domain {
            return Some(why.clone());
        }
        match self.transport {
            Transport::Shared(_) => None,
            Transport::Store { .. } => Some(format!("{what} runs on thread ranks only")),
        }
    }

    fn alloc_segment(&self, bytes: usize, ctx: &OpCtx) -> Result<Arc<dyn Memory>> {
        let mem = Arc::new(HostMemory::new(bytes));
        let (index, sizes): (usize, Vec<Option<usize>>) = match &self.transport {
            Transport::Shared(fabric) => {
                let index = {
                    let mut segs = fabric.segments();
                    segs[self.rank].push(mem.clone());
                    segs[self.rank].len() - 1
                };
                // Registration is collective: every rank has its segment `index` after this.
                self.barrier(fabric, ctx)?;
                let segs = fabric.segments();
                let sizes = (0..self.size)
                    .map(|r| segs[r].get(index).map(|m| m.len()))
                    .collect();
                (index, sizes)
            }
            Transport::Store { segments } => {
                let mut n = segments.lock().unwrap_or_else(|p| p.into_inner());
                let index = *n;
                let mine = [(index as u64).to_le_bytes(), (bytes as u64).to_le_bytes()].concat();
                let all = self.control.all_gather_for("register", &mine, ctx)?;
                *n += 1;
                let sizes = all
                    .iter()
                    .map(|v| {
                        let i = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
                        let b = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
                        (i == index as u64).then_some(b as usize)
                    })
                    .collect();
                (index, sizes)
            }
        };
        if let Some(r) = (0..self.size).find(|&r| sizes[r] != Some(bytes)) {
            return Err(Error::SpmdDivergence {
                ctx: ctx.clone(),
                index: index as u64,
                mine: format!("rank {}: segment #{index} of {bytes} B", self.rank),
                other_rank: r,
                theirs: sizes[r].map_or("no such segment".into(), |b| format!("{b} B")),
            });
        }
        self.settle_window(ctx)?;
        Ok(mem)
    }

    /// In a group that spans hosts, agree on whether the segment just registered is a window
    /// (the test hook can refuse it, as NCCL may across hosts); a refusal turns the group's
    /// windows off on every rank, never an error. Inside one host, nothing to agree on.
    fn settle_window(&self, ctx: &OpCtx) -> Result<()> {
        let Some(w) = &self.windows else {
            return Ok(());
        };
        if w.refused().is_some() {
            return Ok(());
        }
        let mine = match crate::backend::cuda::test_hooks::take_window_refusal() {
            Some(why) => Err(why),
            None => Ok(()),
        };
        w.settle(&self.control, mine, ctx).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Op;

    #[test]
    fn barrier_times_out_naming_the_missing_rank_and_poisons() {
        let b = HostBarrier::new(3);
        let ctx = OpCtx {
            op: Op::Barrier,
            group: "t".into(),
            rank: 0,
            world: 3,
            bytes: 0,
        };
        let err = std::thread::scope(|s| {
            let h = s.spawn(|| b.wait(1, Duration::from_secs(5), None, &ctx));
            let e = b
                .wait(0, Duration::from_millis(50), None, &ctx)
                .unwrap_err();
            // rank 1 is released by the poison, not left hanging
            assert!(matches!(
                h.join().unwrap(),
                Err(Error::Aborted { .. }) | Err(Error::Timeout { .. })
            ));
            e
        });
        assert!(err.to_string().contains("[2]"), "{err}");
        assert!(matches!(
            b.wait(2, Duration::from_secs(1), None, &ctx),
            Err(Error::Aborted { .. })
        ));
    }

    #[test]
    fn reduce_accumulates_in_f32() {
        let a: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b: Vec<u8> = [3.0f32, -5.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let out = reduce(DType::F32, ReduceOp::Avg, &[&a, &b]);
        assert_eq!(DType::F32.read_f64(&out, 0), 2.0);
        assert_eq!(DType::F32.read_f64(&out, 1), -1.5);
        let out = reduce(DType::F32, ReduceOp::Min, &[&a, &b]);
        assert_eq!(DType::F32.read_f64(&out, 1), -5.0);
    }
}
