//! The host backend: ranks are threads of one process, memory is host memory, and symmetric
//! segments are host memory that peers read directly, as NVLink peers will. It implements
//! every operation synchronously (a "stream" runs each op as it is enqueued; a captured graph
//! records them and replays them in order), and it is the reference every other backend is
//! tested against.

mod dcp;
mod fabric;
mod memory;
mod norm;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::{
    AddRmsNormStep, BackendKind, Copy2d, DcpCorrect, Exec, GraphExec, GroupBackend, RankBackend,
    StreamSel,
};
use crate::bootstrap::ControlPlane;
#[cfg(feature = "lab")]
use crate::dtype::DType;
use crate::error::{Error, Op, OpCtx, Result};
use crate::memory::{MemRef, Memory};
use crate::topology::GroupTopology;

pub(crate) use fabric::HostGroup;
pub(crate) use memory::{ForeignHost, HostBytes, HostMemory};

type HostOp = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// A recorded sequence of host operations.
pub(crate) struct HostGraph {
    ops: Vec<HostOp>,
}

impl std::fmt::Debug for HostGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostGraph({} ops)", self.ops.len())
    }
}

impl GraphExec for HostGraph {
    fn replay(&self) -> Result<()> {
        for op in &self.ops {
            op()?;
        }
        Ok(())
    }
}

/// The host "device" of one rank.
#[derive(Debug)]
pub(crate) struct HostDevice {
    rank: usize,
    queue: Arc<HostQueue>,
}

/// The in-order "stream" of one rank: runs ops at once, or records them during capture.
#[derive(Debug, Default)]
pub(crate) struct HostQueue {
    recording: Mutex<Option<Vec<HostOpDebug>>>,
}

/// A recorded op (wrapped so the device can derive `Debug`).
struct HostOpDebug(HostOp);

impl std::fmt::Debug for HostOpDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostOp")
    }
}

/// The host memory behind a [`MemRef`] made by this backend (its own, or an engine's).
pub(crate) fn host_mem(r: &MemRef) -> &dyn HostBytes {
    let any = r.mem.as_any();
    if let Some(m) = any.downcast_ref::<HostMemory>() {
        return m;
    }
    any.downcast_ref::<ForeignHost>().expect(
        "the host backend only sees host memory (buffers are checked against their communicator)",
    )
}

impl HostQueue {
    fn rec(&self) -> MutexGuard<'_, Option<Vec<HostOpDebug>>> {
        self.recording.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `op` now, or record it while capturing.
    pub(crate) fn enqueue(&self, op: HostOp) -> Result<()> {
        let mut rec = self.rec();
        match rec.as_mut() {
            Some(ops) => {
                ops.push(HostOpDebug(op));
                Ok(())
            }
            None => {
                drop(rec);
                op()
            }
        }
    }
}

impl HostDevice {
    pub(crate) fn new(rank: usize) -> Self {
        HostDevice {
            rank,
            queue: Arc::new(HostQueue::default()),
        }
    }

    fn rec(&self) -> MutexGuard<'_, Option<Vec<HostOpDebug>>> {
        self.queue.rec()
    }

    fn enqueue(&self, op: HostOp) -> Result<()> {
        self.queue.enqueue(op)
    }

    fn capturing(&self) -> bool {
        self.queue.rec().is_some()
    }

    fn not_while_capturing(&self, what: &str, bytes: usize) -> Result<()> {
        if self.capturing() {
            return Err(Error::DuringCapture {
                ctx: OpCtx {
                    op: Op::Copy,
                    group: "device".into(),
                    rank: self.rank,
                    world: 1,
                    bytes,
                },
                action: what.into(),
            });
        }
        Ok(())
    }
}

impl RankBackend for HostDevice {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn describe(&self) -> String {
        "host (the reference backend)".into()
    }

    fn facts(&self) -> crate::backend::DeviceFacts {
        crate::backend::DeviceFacts {
            name: "host".into(),
            ..Default::default()
        }
    }

    fn world_group(
        &self,
        control: Arc<ControlPlane>,
        topology: &GroupTopology,
    ) -> Result<Arc<dyn GroupBackend>> {
        Ok(Arc::new(HostGroup::new(
            control,
            self.queue.clone(),
            topology,
        )?))
    }

    fn alloc_plain(&self, bytes: usize) -> Result<Arc<dyn Memory>> {
        Ok(Arc::new(HostMemory::new(bytes)))
    }

    unsafe fn foreign(&self, addr: u64, bytes: usize, ctx: &OpCtx) -> Result<Arc<dyn Memory>> {
        if addr == 0 && bytes > 0 {
            return Err(Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!("a null pointer for {bytes} bytes"),
            });
        }
        Ok(Arc::new(ForeignHost {
            ptr: addr,
            len: bytes,
        }))
    }

    fn prepare(&self, _ctx: &OpCtx) -> Result<()> {
        Ok(())
    }

    fn check_stream(&self, s: StreamSel, ctx: &OpCtx) -> Result<()> {
        match s {
            StreamSel::Own => Ok(()),
            StreamSel::Cuda(raw) => Err(Error::InvalidArgument {
                ctx: ctx.clone(),
                detail: format!(
                    "CUDA stream {raw:#x} given to the host backend, which has no CUDA streams \
                     (use the communicator's own stream)"
                ),
            }),
        }
    }

    fn exec(&self, s: StreamSel, ctx: &OpCtx) -> Result<Exec> {
        self.check_stream(s, ctx)?;
        Ok(Exec {
            stream: s,
            capturing: self.capturing(),
        })
    }

    fn retain_for_capture(
        &self,
        _exec: Exec,
        _keep: Box<dyn std::any::Any + Send>,
        _ctx: &OpCtx,
    ) -> Result<()> {
        // The host backend is only captured by `Communicator::begin_capture`, whose graph
        // keeps what it uses itself.
        Ok(())
    }

    fn upload(&self, _s: StreamSel, dst: &MemRef, src: &[u8]) -> Result<()> {
        self.not_while_capturing("a synchronous upload", src.len())?;
        host_mem(dst).write(dst.offset, src);
        Ok(())
    }

    fn download(&self, _s: StreamSel, src: &MemRef, dst: &mut [u8]) -> Result<()> {
        self.not_while_capturing("a synchronous download", dst.len())?;
        host_mem(src).read(src.offset, dst);
        Ok(())
    }

    fn copy_2d(&self, _s: StreamSel, c: &Copy2d) -> Result<()> {
        let c = c.clone();
        self.enqueue(Box::new(move || {
            let (src, dst) = (host_mem(&c.src), host_mem(&c.dst));
            let mut row = vec![0u8; c.row_bytes];
            for r in 0..c.rows {
                src.read(c.src.offset + r * c.src_pitch, &mut row);
                dst.write(c.dst.offset + r * c.dst_pitch, &row);
            }
            Ok(())
        }))
    }

    #[cfg(feature = "lab")]
    fn fill(
        &self,
        _s: StreamSel,
        dst: &MemRef,
        dtype: DType,
        elems: usize,
        spec: &crate::backend::FillSpec,
    ) -> Result<()> {
        let (dst, spec) = (dst.clone(), spec.clone());
        self.enqueue(Box::new(move || {
            let epoch = match &spec.epoch {
                Some(e) => {
                    let mut b = [0u8; 8];
                    host_mem(e).read(e.offset, &mut b);
                    u64::from_le_bytes(b)
                }
                None => 0,
            };
            let mut bytes = vec![0u8; elems * dtype.size()];
            crate::fill::fill_bytes(dtype, spec.seed, spec.rank, epoch, 0, &mut bytes);
            host_mem(&dst).write(dst.offset, &bytes);
            Ok(())
        }))
    }

    fn memset(&self, _s: StreamSel, dst: &MemRef, bytes: usize, byte: u8) -> Result<()> {
        let dst = dst.clone();
        self.enqueue(Box::new(move || {
            host_mem(&dst).fill(dst.offset, bytes, byte);
            Ok(())
        }))
    }

    #[cfg(feature = "lab")]
    fn bump(&self, _s: StreamSel, counter: &MemRef) -> Result<()> {
        let c = counter.clone();
        self.enqueue(Box::new(move || {
            let m = host_mem(&c);
            let mut b = [0u8; 8];
            m.read(c.offset, &mut b);
            m.write(c.offset, &(u64::from_le_bytes(b) + 1).to_le_bytes());
            Ok(())
        }))
    }

    fn dcp_correct(&self, _exec: Exec, call: &DcpCorrect) -> Result<()> {
        let c = call.clone();
        self.enqueue(Box::new(move || {
            let sh = &c.shape;
            let partial = host_mem(&c.partial).to_vec(
                c.partial.offset,
                sh.batch * sh.heads * sh.dim * sh.partial.size(),
            );
            let lse_all =
                host_mem(&c.lse_all).to_vec(c.lse_all.offset, sh.world * sh.batch * sh.heads * 4);
            let (out, merged) = dcp::correct(sh, &partial, &lse_all);
            host_mem(&c.corrected).write(c.corrected.offset, &out);
            if let Some(m) = &c.merged_lse {
                host_mem(m).write(m.offset, &merged);
            }
            Ok(())
        }))
    }

    fn add_rmsnorm(&self, _exec: Exec, step: &AddRmsNormStep) -> Result<()> {
        let s = step.clone();
        self.enqueue(Box::new(move || {
            let b = &s.bufs;
            let row = s.hidden * s.dtype.size();
            let bytes = s.rows * row;
            let reduced = host_mem(&b.input).to_vec(b.input.offset, bytes);
            let residual = host_mem(&b.residual).to_vec(b.residual.offset, bytes);
            let weight = host_mem(&b.weight).to_vec(b.weight.offset, row);
            let (residual_out, normed) =
                norm::add_rmsnorm(s.dtype, s.hidden, b.eps, &reduced, &residual, &weight);
            host_mem(&b.residual_out).write(b.residual_out.offset, &residual_out);
            host_mem(&b.normed).write(b.normed.offset, &normed);
            Ok(())
        }))
    }

    fn begin_capture(&self) -> Result<()> {
        let mut rec = self.rec();
        if rec.is_some() {
            return Err(Error::InvalidArgument {
                ctx: OpCtx {
                    op: Op::Capture,
                    group: "device".into(),
                    rank: self.rank,
                    world: 1,
                    bytes: 0,
                },
                detail: "a capture is already in progress".into(),
            });
        }
        *rec = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn GraphExec>> {
        let ops = self.rec().take().ok_or_else(|| Error::InvalidArgument {
            ctx: OpCtx {
                op: Op::Capture,
                group: "device".into(),
                rank: self.rank,
                world: 1,
                bytes: 0,
            },
            detail: "no capture in progress".into(),
        })?;
        Ok(Box::new(HostGraph {
            ops: ops.into_iter().map(|o| o.0).collect(),
        }))
    }

    fn synchronize(&self, _s: StreamSel) -> Result<()> {
        Ok(())
    }

    fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        Ok(None)
    }

    fn time(&self, _s: StreamSel, enqueue: &mut dyn FnMut() -> Result<()>) -> Result<Duration> {
        let t0 = Instant::now();
        enqueue()?;
        Ok(t0.elapsed())
    }
}
