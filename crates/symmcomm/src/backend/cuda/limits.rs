//! The physical floors of a GPU pair, measured in one process with peer access on: copy-engine
//! peer bandwidth (one direction, and both at once) and the GPU-to-GPU flag round trip.

use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream};

use super::driver::{Event, check};
use super::memory::DeviceAlloc;
use super::modules::UtilKernels;
use crate::error::{Error, Op, OpCtx, Result};

/// Physical limits measured on the machine.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Peer copy bandwidth with the copy engine, one direction, GB/s.
    pub p2p_copy_gbps: f64,
    /// Peer copy bandwidth each way with both directions at once, GB/s.
    #[serde(default)]
    pub p2p_bidir_gbps: f64,
    /// GPU-to-GPU flag round trip, µs.
    pub flag_roundtrip_us: f64,
}

const COPY_BYTES: usize = 256 << 20;
const COPIES: usize = 8;
const PINGS: u32 = 20_000;

struct Side {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    buf: DeviceAlloc,
    flag: DeviceAlloc,
}

fn op(ordinal: usize) -> OpCtx {
    OpCtx {
        op: Op::Kernel,
        group: format!("limits cuda:{ordinal}"),
        rank: ordinal,
        world: 2,
        bytes: COPY_BYTES,
    }
}

fn side(ordinal: usize) -> Result<Side> {
    let o = op(ordinal);
    let cu = |e: cudarc::driver::DriverError| Error::Cuda {
        ctx: o.clone(),
        call: "context setup",
        message: e.to_string(),
    };
    let ctx = CudaContext::new(ordinal).map_err(cu)?;
    // SAFETY: no cudarc slices are used with this context.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(cu)?;
    let buf = super::alloc(&ctx, COPY_BYTES, &o)?;
    let flag = super::alloc(&ctx, 256, &o)?;
    // SAFETY: both allocations are live device memory of the current context.
    unsafe {
        check(sys::cuMemsetD8_v2(buf.ptr, 1, COPY_BYTES), "cuMemsetD8", &o)?;
        check(sys::cuMemsetD8_v2(flag.ptr, 0, 256), "cuMemsetD8", &o)?;
    }
    Ok(Side {
        ctx,
        stream,
        buf,
        flag,
    })
}

fn enable_peer(from: &Side, to: &Side, o: &OpCtx) -> Result<()> {
    from.ctx.bind_to_thread().map_err(|e| Error::Cuda {
        ctx: o.clone(),
        call: "cuCtxSetCurrent",
        message: e.to_string(),
    })?;
    // SAFETY: both contexts are live primary contexts.
    let r = unsafe { sys::cuCtxEnablePeerAccess(to.ctx.cu_ctx(), 0) };
    if r == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
        return Ok(());
    }
    check(r, "cuCtxEnablePeerAccess", o)
}

/// Time `n` copies of `COPY_BYTES` from `src` to `dst` on `s`'s stream, as GB/s.
fn copies(s: &Side, dst: u64, src: u64, o: &OpCtx) -> Result<(Event, Event)> {
    s.ctx.bind_to_thread().map_err(|e| Error::Cuda {
        ctx: o.clone(),
        call: "cuCtxSetCurrent",
        message: e.to_string(),
    })?;
    let (a, b) = (Event::new(true, o)?, Event::new(true, o)?);
    a.record(s.stream.cu_stream(), o)?;
    for _ in 0..COPIES {
        let r = {
            // SAFETY: both buffers hold COPY_BYTES bytes; peer access is enabled.
            unsafe { sys::cuMemcpyAsync(dst, src, COPY_BYTES, s.stream.cu_stream()) }
        };
        check(r, "cuMemcpyAsync", o)?;
    }
    b.record(s.stream.cu_stream(), o)?;
    Ok((a, b))
}

fn gbps(ms: f32) -> f64 {
    (COPIES * COPY_BYTES) as f64 / (ms as f64 * 1e-3) / 1e9
}

/// Measure the limits between devices `a` and `b`.
pub fn measure(a: usize, b: usize) -> Result<Limits> {
    let (sa, sb) = (side(a)?, side(b)?);
    let (oa, ob) = (op(a), op(b));
    enable_peer(&sa, &sb, &oa)?;
    enable_peer(&sb, &sa, &ob)?;
    let pair = Pair {
        a: &sa,
        b: &sb,
        oa: &oa,
        ob: &ob,
    };
    pair.warm_up()?;
    let one_way = pair.one_way_gbps()?;
    let both = pair.both_ways_gbps()?;
    let ns = pair.flag_pingpong_ns()?;
    Ok(Limits {
        p2p_copy_gbps: one_way,
        p2p_bidir_gbps: both,
        flag_roundtrip_us: ns as f64 / PINGS as f64 / 1e3,
    })
}

/// How long any one wait of the measurement may take.
fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// The two GPUs of a measurement, peer access on both ways.
struct Pair<'a> {
    a: &'a Side,
    b: &'a Side,
    oa: &'a OpCtx,
    ob: &'a OpCtx,
}

impl Pair<'_> {
    /// Warm the path once: one round of copies from `a` to `b`, untimed.
    fn warm_up(&self) -> Result<()> {
        let (sa, sb, oa) = (self.a, self.b, self.oa);
        let (w0, w1) = copies(sa, sb.buf.ptr, sa.buf.ptr, oa)?;
        w1.wait(deadline(), oa, || Ok(()))?;
        drop(w0);
        Ok(())
    }

    /// Copy-engine bandwidth from `a` to `b`, GB/s.
    fn one_way_gbps(&self) -> Result<f64> {
        let (sa, sb, oa) = (self.a, self.b, self.oa);
        let (e0, e1) = copies(sa, sb.buf.ptr, sa.buf.ptr, oa)?;
        e1.wait(deadline(), oa, || Ok(()))?;
        Ok(gbps(e0.elapsed_ms(&e1, oa)?))
    }

    /// Copy-engine bandwidth each way with both directions at once (the slower one), GB/s.
    fn both_ways_gbps(&self) -> Result<f64> {
        let (sa, sb, oa, ob) = (self.a, self.b, self.oa, self.ob);
        let (f0, f1) = copies(sa, sb.buf.ptr, sa.buf.ptr, oa)?;
        let (g0, g1) = copies(sb, sa.buf.ptr, sb.buf.ptr, ob)?;
        sa.ctx.bind_to_thread().ok();
        f1.wait(deadline(), oa, || Ok(()))?;
        sb.ctx.bind_to_thread().ok();
        g1.wait(deadline(), ob, || Ok(()))?;
        sa.ctx.bind_to_thread().ok();
        let fa = f0.elapsed_ms(&f1, oa)?;
        sb.ctx.bind_to_thread().ok();
        let fb = g0.elapsed_ms(&g1, ob)?;
        Ok(gbps(fa.max(fb)))
    }

    /// Flag round trip: one thread on each GPU bouncing a counter through the other's memory
    /// [`PINGS`] times; the nanoseconds `a`'s thread measured for all of them.
    fn flag_pingpong_ns(&self) -> Result<u64> {
        let (sa, sb, oa, ob) = (self.a, self.b, self.oa, self.ob);
        let ka = UtilKernels::load(&sa.ctx, sa.ctx.compute_capability().unwrap_or((9, 0)), oa)?;
        let kb = UtilKernels::load(&sb.ctx, sb.ctx.compute_capability().unwrap_or((9, 0)), ob)?;
        let out_ns = sa.flag.ptr + 64;
        launch_pingpong(&kb, sb, sb.flag.ptr, sa.flag.ptr, 0, out_ns, ob)?;
        launch_pingpong(&ka, sa, sa.flag.ptr, sb.flag.ptr, 1, out_ns, oa)?;
        let ea = Event::new(false, oa)?;
        ea.record(sa.stream.cu_stream(), oa)?;
        ea.wait(deadline(), oa, || Ok(()))?;
        sb.ctx.bind_to_thread().ok();
        let eb = Event::new(false, ob)?;
        eb.record(sb.stream.cu_stream(), ob)?;
        eb.wait(deadline(), ob, || Ok(()))?;
        sa.ctx.bind_to_thread().ok();
        let mut ns = [0u8; 8];
        let r = {
            // SAFETY: `out_ns` is 8 bytes inside the flag allocation; the kernel has finished.
            unsafe { sys::cuMemcpyDtoH_v2(ns.as_mut_ptr() as *mut c_void, out_ns, 8) }
        };
        check(r, "cuMemcpyDtoH", oa)?;
        let ns = u64::from_le_bytes(ns);
        if ns == u64::MAX {
            return Err(Error::Timeout {
                ctx: oa.clone(),
                waited: Duration::from_secs(10),
                detail: "the flag ping-pong between the GPUs did not complete".into(),
            });
        }
        Ok(ns)
    }
}

/// Launch the ping-pong kernel on `s`'s stream: one thread bouncing the counter between `my`
/// flag and `peer`'s; the initiator (1) writes the time of all [`PINGS`] rounds to `out_ns`
/// (all ones when a wait gave up).
fn launch_pingpong(
    k: &UtilKernels,
    s: &Side,
    my: u64,
    peer: u64,
    initiator: u32,
    out_ns: u64,
    o: &OpCtx,
) -> Result<()> {
    s.ctx.bind_to_thread().ok();
    let (mut my, mut peer, mut iters, mut init, mut out) = (
        my,
        peer,
        PINGS,
        initiator,
        if initiator == 1 { out_ns } else { 0u64 },
    );
    let mut args = [
        &mut my as *mut u64 as *mut c_void,
        &mut peer as *mut u64 as *mut c_void,
        &mut iters as *mut u32 as *mut c_void,
        &mut init as *mut u32 as *mut c_void,
        &mut out as *mut u64 as *mut c_void,
    ];
    // SAFETY: the arguments match `symm_flag_pingpong(u32*, u32*, u32, u32, u64*)`;
    // the flags are device memory reachable from both GPUs (peer access is on).
    unsafe {
        k.pingpong
            .launch(1, 1, 0, s.stream.cu_stream(), &mut args, false, o)
    }
}
