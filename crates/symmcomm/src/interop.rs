//! symmcomm's memory and a cudarc engine's, both ways. A tensor of symmcomm's (a window of a
//! group, or plain memory) is handed to the engine's cudarc code as a [`DeviceView`], which
//! implements cudarc's `DevicePtr`/`DevicePtrMut` (so cuBLAS through cudarc reads and writes it)
//! and is a kernel argument of cudarc's launch builder. The engine's `CudaSlice` (or view) is
//! handed to a collective as a [`Borrowed`] tensor, in place, for as long as the borrow lasts.

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, LaunchArgs, PushKernelArg,
    SyncOnDrop, sys,
};

use crate::backend::BackendKind;
use crate::dtype::Element;
use crate::error::{Error, Op, Result};
use crate::group::Group;
use crate::tensor::Tensor;

/// A contiguous tensor of symmcomm's seen by cudarc as `len` elements of `T` on `stream`.
/// Valid while the tensor it came from lives (it borrows it).
#[derive(Debug)]
pub struct DeviceView<'a, T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
    _tensor: PhantomData<&'a T>,
}

impl<T> DeviceView<'_, T> {
    /// The device address of the first element.
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
}

impl Tensor {
    /// This tensor as `T`s for the engine's cudarc code on `stream` (cuBLAS, its kernels):
    /// contiguous, of the CUDA backend, with `T` of the tensor's dtype. Writes through it are
    /// seen by the next collective enqueued after them on the same stream.
    ///
    /// symmcomm does no cudarc event tracking on its memory: order the engine's work and the
    /// collectives on one stream (or with events of the engine's).
    pub fn cuda_view<T: Element + DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
    ) -> Result<DeviceView<'_, T>> {
        let ctx = crate::error::OpCtx {
            op: Op::Copy,
            group: self.buf.to_string(),
            rank: 0,
            world: 1,
            bytes: self.bytes(),
        };
        if T::DTYPE != self.dtype {
            return Err(Error::InvalidArgument {
                ctx,
                detail: format!("a {} tensor viewed as {}", self.dtype, T::DTYPE),
            });
        }
        if !self.is_contiguous() {
            return Err(Error::NotContiguous {
                ctx,
                arg: crate::error::Arg::Input,
                shape: self.shape().to_vec(),
                strides: self.layout().strides().to_vec(),
            });
        }
        if self.buf.backend != BackendKind::Cuda {
            return Err(Error::InvalidArgument {
                ctx,
                detail: "a tensor of the host backend has no device address".into(),
            });
        }
        Ok(DeviceView {
            ptr: self.addr(),
            len: self.numel(),
            stream: stream.clone(),
            _tensor: PhantomData,
        })
    }
}

impl<T> DeviceSlice<T> for DeviceView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for DeviceView<'_, T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        // No events: the engine orders its work and the collectives on its stream.
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for DeviceView<'_, T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

// SAFETY: pushes a pointer to the view's device address, which lives as long as the borrow
// `'b` of the view that the launch arguments hold (the `&u64` impl does the pushing).
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b DeviceView<'_, T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b DeviceView<'_, T>) -> &mut Self {
        self.arg(&arg.ptr)
    }
}

/// The engine's memory as a tensor for as long as it is borrowed (deref to [`Tensor`]).
#[derive(Debug)]
pub struct Borrowed<'a> {
    tensor: Tensor,
    _borrow: PhantomData<&'a ()>,
}

impl Deref for Borrowed<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

impl Group {
    /// The engine's cudarc memory (`CudaSlice`, `CudaView`) as a tensor of `shape`, in place,
    /// as an input: see [`Group::wrap_raw`] for what is checked and how it is used.
    ///
    /// ```no_run
    /// # fn f(tp: &symmcomm::Group, stream: &std::sync::Arc<cudarc::driver::CudaStream>)
    /// #     -> symmcomm::Result<()> {
    /// use half::bf16;
    /// use symmcomm::{ReduceOp, Stream};
    /// let mut x = stream.alloc_zeros::<bf16>(8 * 4096).expect("alloc");
    /// let tp = tp.on(&Stream::from_cudarc(stream))?;
    /// let xt = tp.borrow_mut(&mut x, &[8, 4096])?;
    /// tp.all_reduce(&xt, &xt, ReduceOp::Sum)?; // in place, on the engine's stream
    /// # Ok(()) }
    /// ```
    pub fn borrow<'a, T: Element>(
        &self,
        slice: &'a impl DevicePtr<T>,
        shape: &[usize],
    ) -> Result<Borrowed<'a>> {
        let (ptr, sync) = slice.device_ptr(slice.stream());
        drop(sync);
        self.borrowed::<T>(ptr, slice.len(), shape)
    }

    /// [`Group::borrow`] of memory the collective may write (an output, or in place).
    pub fn borrow_mut<'a, T: Element>(
        &self,
        slice: &'a mut impl DevicePtrMut<T>,
        shape: &[usize],
    ) -> Result<Borrowed<'a>> {
        let len = slice.len();
        let stream = slice.stream().clone();
        let (ptr, sync) = slice.device_ptr_mut(&stream);
        drop(sync);
        self.borrowed::<T>(ptr, len, shape)
    }

    fn borrowed<'a, T: Element>(
        &self,
        ptr: sys::CUdeviceptr,
        len: usize,
        shape: &[usize],
    ) -> Result<Borrowed<'a>> {
        let numel: usize = shape.iter().product();
        if numel > len {
            return Err(Error::InvalidArgument {
                ctx: self.ctx(Op::Copy, numel * T::DTYPE.size()),
                detail: format!("shape {shape:?} ({numel} elements) on a slice of {len}"),
            });
        }
        // SAFETY: the slice holds `len` >= `numel` elements at `ptr` and stays borrowed (so
        // alive) as long as the returned tensor.
        let tensor = unsafe { self.wrap_raw(ptr, T::DTYPE, shape)? };
        Ok(Borrowed {
            tensor,
            _borrow: PhantomData,
        })
    }
}
