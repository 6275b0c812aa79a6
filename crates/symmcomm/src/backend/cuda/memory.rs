//! Device memory of the CUDA backend: plain allocations (`cuMemAlloc`, the regular path) and
//! symmetric segments (`ncclMemAlloc`, registered once as a window of one communicator;
//! deregistered and freed on drop).

use std::any::Any;
use std::sync::Arc;

use cudarc::driver::CudaContext;
use cudarc::driver::sys;
use nccl_sys::NcclWindow;

use super::nccl::OwnedComm;
use crate::memory::Memory;

/// A `cuMemAlloc` allocation, freed on drop.
#[derive(Debug)]
pub(crate) struct DeviceAlloc {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) ctx: Arc<CudaContext>,
}

impl Memory for DeviceAlloc {
    fn addr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if super::ABANDONED.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if self.ctx.bind_to_thread().is_err() {
            tracing::warn!(
                ptr = self.ptr,
                "could not bind the context to free device memory"
            );
            return;
        }
        // SAFETY: `ptr` came from `cuMemAlloc` in this context and is freed once; work that
        // used it holds the buffer alive until it was enqueued, and the free is ordered after
        // the context's queued work by the driver (cuMemFree synchronises).
        let r = unsafe { sys::cuMemFree_v2(self.ptr) };
        if r != sys::CUresult::CUDA_SUCCESS {
            tracing::warn!(ptr = self.ptr, error = %super::driver::describe(r), "cuMemFree failed");
        }
    }
}

/// One symmetric segment: `ncclMemAlloc` memory registered as a window of `comm` (or not,
/// `window` null, in a group that spans hosts whose windows NCCL refused).
#[derive(Debug)]
pub(crate) struct NcclSegment {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) window: NcclWindow,
    pub(crate) comm: Arc<OwnedComm>,
    pub(crate) ctx: Arc<CudaContext>,
}

// SAFETY: the window handle is an opaque NCCL pointer only passed back to NCCL, from the
// owning rank's thread with its context bound.
unsafe impl Send for NcclSegment {}
// SAFETY: see `Send`; shared references only read the address.
unsafe impl Sync for NcclSegment {}

impl Memory for NcclSegment {
    fn addr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for NcclSegment {
    fn drop(&mut self) {
        if super::ABANDONED.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if self.ctx.bind_to_thread().is_err() {
            tracing::warn!(
                ptr = self.ptr,
                "could not bind the context to release a window"
            );
            return;
        }
        // Queued work may still read the segment: wait for the context first.
        // SAFETY: synchronising the bound context has no preconditions.
        let _ = unsafe { sys::cuCtxSynchronize() };
        let nccl = self.comm.nccl;
        // An aborted communicator took its windows with it; a segment of a group whose
        // windows NCCL refused (across hosts) has none.
        if !self.comm.is_aborted() && !self.window.is_null() {
            // SAFETY: the window was registered on `comm`, which is alive (we hold an Arc) and
            // not aborted, and is deregistered once; deregistration is local to this rank in
            // NCCL 2.27–2.30.
            let r = unsafe { nccl.comm_window_deregister(self.comm.raw(), self.window) };
            if !r.is_success() {
                tracing::warn!(comm = self.comm.label(), code = %r.name(), "ncclCommWindowDeregister failed");
            }
        }
        // SAFETY: `ptr` came from `ncclMemAlloc` and is freed once, after its window is gone.
        let r = unsafe { nccl.mem_free(self.ptr as *mut std::ffi::c_void) };
        if !r.is_success() {
            tracing::warn!(code = %r.name(), "ncclMemFree failed");
        }
    }
}

/// Device memory an engine owns (a `CudaSlice`, a torch tensor's storage), used in place and
/// never freed by symmcomm.
#[derive(Debug)]
pub(crate) struct ForeignDevice {
    ptr: u64,
    len: usize,
}

impl ForeignDevice {
    /// `bytes` from `addr`, checked to be device memory of device `ordinal` inside one
    /// allocation. The device's context must be current.
    pub(crate) fn check(
        addr: u64,
        bytes: usize,
        ordinal: usize,
        ctx: &crate::error::OpCtx,
    ) -> crate::error::Result<Self> {
        use crate::error::Error;
        let bad = |detail: String| Error::InvalidArgument {
            ctx: ctx.clone(),
            detail,
        };
        if addr == 0 {
            return Err(bad(format!("a null device pointer for {bytes} bytes")));
        }
        // One driver call for the four facts (the hot path of a Python collective wraps two
        // tensors per call). Unlike `cuPointerGetAttribute`, it reports a pointer the driver
        // does not know as memory type 0 instead of failing.
        let (mut kind, mut device, mut start, mut size) = (0u32, -1i32, 0u64, 0usize);
        let mut attrs = [
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        ];
        let mut out: [*mut std::ffi::c_void; 4] = [
            &mut kind as *mut u32 as *mut _,
            &mut device as *mut i32 as *mut _,
            &mut start as *mut u64 as *mut _,
            &mut size as *mut usize as *mut _,
        ];
        // SAFETY: each output points to a value of the size its attribute writes (u32 memory
        // type, i32 ordinal, u64 start address, size_t size), all alive for the call.
        let r = unsafe {
            sys::cuPointerGetAttributes(
                attrs.len() as u32,
                attrs.as_mut_ptr(),
                out.as_mut_ptr(),
                addr,
            )
        };
        super::driver::check(r, "cuPointerGetAttributes", ctx)?;
        if kind == 0 {
            return Err(bad(format!(
                "{addr:#x} is not memory the CUDA driver knows (a host pointer, or freed)"
            )));
        }
        if kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Err(bad(format!(
                "{addr:#x} is not device memory (CUDA memory type {kind})"
            )));
        }
        if device != ordinal as i32 {
            return Err(bad(format!(
                "{addr:#x} is memory of device {device}; this communicator runs on device {ordinal}"
            )));
        }
        let end = start + size as u64;
        if addr + bytes as u64 > end {
            return Err(bad(format!(
                "{bytes} bytes from {addr:#x} run past the end of their allocation \
                 ({start:#x}, {size} bytes)"
            )));
        }
        Ok(ForeignDevice {
            ptr: addr,
            len: bytes,
        })
    }
}

impl Memory for ForeignDevice {
    fn addr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
