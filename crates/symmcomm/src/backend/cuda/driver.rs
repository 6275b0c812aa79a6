//! Thin helpers over the CUDA driver API (through cudarc's raw bindings): results turned into
//! our errors with their context, events, and waits that have a deadline.

use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUresult};

use crate::error::{Error, OpCtx, Result};

/// `Ok` for `CUDA_SUCCESS`, else an error naming the call and the driver's message.
pub(crate) fn check(r: CUresult, call: &'static str, ctx: &OpCtx) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(Error::Cuda {
        ctx: ctx.clone(),
        call,
        message: describe(r),
    })
}

/// The driver's name and description of a result code.
pub(crate) fn describe(r: CUresult) -> String {
    let mut name: *const std::ffi::c_char = std::ptr::null();
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: both calls only write a pointer to a static string (or leave it null).
    let (a, b) = unsafe {
        (
            sys::cuGetErrorName(r, &mut name),
            sys::cuGetErrorString(r, &mut text),
        )
    };
    let read = |p: *const std::ffi::c_char, ok: CUresult| {
        if ok != CUresult::CUDA_SUCCESS || p.is_null() {
            None
        } else {
            // SAFETY: the driver returned a pointer to a NUL-terminated static string.
            Some(
                unsafe { std::ffi::CStr::from_ptr(p) }
                    .to_string_lossy()
                    .into_owned(),
            )
        }
    };
    match (read(name, a), read(text, b)) {
        (Some(n), Some(t)) => format!("{n}: {t}"),
        (Some(n), None) => n,
        _ => format!("{r:?}"),
    }
}

/// A CUDA event owned by this process; destroyed on drop.
#[derive(Debug)]
pub(crate) struct Event {
    ev: sys::CUevent,
}

// SAFETY: CUDA events are process-wide driver objects usable from any thread whose current
// context is the one they were made in; every use binds that context first.
unsafe impl Send for Event {}
// SAFETY: as above; the driver synchronises concurrent calls on one event.
unsafe impl Sync for Event {}

impl Event {
    /// A timing event (`timing = true`) or a cheap ordering one.
    pub(crate) fn new(timing: bool, ctx: &OpCtx) -> Result<Self> {
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        let mut ev = std::ptr::null_mut();
        let r = {
            // SAFETY: `ev` is valid for writing; the caller's context is current.
            unsafe { sys::cuEventCreate(&mut ev, flags as u32) }
        };
        check(r, "cuEventCreate", ctx)?;
        Ok(Event { ev })
    }

    /// The raw handle, for calls that take it.
    pub(crate) fn raw(&self) -> sys::CUevent {
        self.ev
    }

    pub(crate) fn record(&self, stream: sys::CUstream, ctx: &OpCtx) -> Result<()> {
        let r = {
            // SAFETY: the event and the stream belong to the current context.
            unsafe { sys::cuEventRecord(self.ev, stream) }
        };
        check(r, "cuEventRecord", ctx)
    }

    /// Poll until the event completes or `deadline` passes.
    pub(crate) fn wait(
        &self,
        deadline: Instant,
        ctx: &OpCtx,
        mut poll: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            // SAFETY: the event is live.
            let r = unsafe { sys::cuEventQuery(self.ev) };
            match r {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                other => check(other, "cuEventQuery", ctx)?,
            }
            poll()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    ctx: ctx.clone(),
                    waited: start.elapsed(),
                    detail: "queued GPU work did not finish (a peer may be dead or stuck)".into(),
                });
            }
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Milliseconds from `self` to `end` (both completed timing events).
    pub(crate) fn elapsed_ms(&self, end: &Event, ctx: &OpCtx) -> Result<f32> {
        let mut ms = 0f32;
        let r = {
            // SAFETY: both events are live timing events that have completed.
            unsafe { sys::cuEventElapsedTime_v2(&mut ms, self.ev, end.ev) }
        };
        check(r, "cuEventElapsedTime", ctx)?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is live and dropped once.
        let _ = unsafe { sys::cuEventDestroy_v2(self.ev) };
    }
}
