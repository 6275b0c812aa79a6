//! Handing symmcomm's memory to NumPy and torch through DLPack, once per allocation: a
//! [`DLPackBuffer`] is the producer object (`__dlpack__`, `__dlpack_device__`) and each capsule
//! it makes owns a clone of the symmcomm tensor, so the memory (a slot of a group's pool, say)
//! goes back when the consumer drops the last array that views it.

use std::ffi::{CStr, c_void};
use std::ptr;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use symmcomm::{DType, Tensor};

use crate::registry::Device;

/// DLPack's device types.
const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;

/// The capsule names of the two protocols (a consumer renames a capsule it takes to
/// `used_...`, taking over the deleter).
const DLTENSOR: &CStr = c"dltensor";
const DLTENSOR_VERSIONED: &CStr = c"dltensor_versioned";

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

/// DLPack before 1.0: no version, no flags (NumPy takes it as read-only).
#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

/// DLPack 1.0: versioned, with flags (none set: writable, not a copy).
#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// The two managed-tensor structs, so that one export path serves both protocols.
trait Managed: Sized + 'static {
    /// The capsule's name.
    const NAME: &'static CStr;
    /// A managed tensor of `t` with `deleter` and no context yet.
    fn new(t: DLTensor, deleter: unsafe extern "C" fn(*mut Self)) -> Self;
    /// Where the context pointer lives.
    fn ctx(&mut self) -> &mut *mut c_void;
}

impl Managed for DLManagedTensor {
    const NAME: &'static CStr = DLTENSOR;
    fn new(t: DLTensor, deleter: unsafe extern "C" fn(*mut Self)) -> Self {
        DLManagedTensor {
            dl_tensor: t,
            manager_ctx: ptr::null_mut(),
            deleter: Some(deleter),
        }
    }
    fn ctx(&mut self) -> &mut *mut c_void {
        &mut self.manager_ctx
    }
}

impl Managed for DLManagedTensorVersioned {
    const NAME: &'static CStr = DLTENSOR_VERSIONED;
    fn new(t: DLTensor, deleter: unsafe extern "C" fn(*mut Self)) -> Self {
        DLManagedTensorVersioned {
            version: DLPackVersion { major: 1, minor: 0 },
            manager_ctx: ptr::null_mut(),
            deleter: Some(deleter),
            flags: 0,
            dl_tensor: t,
        }
    }
    fn ctx(&mut self) -> &mut *mut c_void {
        &mut self.manager_ctx
    }
}

/// What one capsule owns: the tensor (so its memory), the arrays `DLTensor` points into, and
/// the managed tensor itself, all in one box that the deleter frees.
struct Export<M> {
    managed: M,
    _owner: Tensor,
    _shape: Vec<i64>,
    _strides: Vec<i64>,
}

fn dl_dtype(d: DType) -> DLDataType {
    let (code, bits) = match d {
        DType::F32 => (2, 32),
        DType::F16 => (2, 16),
        DType::BF16 => (4, 16),
        DType::I32 => (0, 32),
        DType::U8 => (1, 8),
    };
    DLDataType {
        code,
        bits,
        lanes: 1,
    }
}

/// Unsigned integers of `d`'s width.
fn dl_bits(d: DType) -> DLDataType {
    DLDataType {
        code: 1,
        bits: (d.size() * 8) as u8,
        lanes: 1,
    }
}

fn dl_device(device: Device) -> DLDevice {
    match device {
        Device::Host => DLDevice {
            device_type: KDL_CPU,
            device_id: 0,
        },
        Device::Cuda(id) => DLDevice {
            device_type: KDL_CUDA,
            device_id: id,
        },
    }
}

/// The deleter DLPack calls when the consumer is done (or the capsule dies unconsumed).
///
/// # Safety
///
/// `m` is the `managed` field of an `Export<M>` leaked by [`export`], passed here once.
unsafe extern "C" fn delete_export<M: Managed>(m: *mut M) {
    if m.is_null() {
        return;
    }
    // SAFETY: `m` is live (the caller's contract) and its context is the `Box<Export<M>>`
    // leaked by `export`; DLPack calls the deleter once, so the box is reclaimed once.
    drop(unsafe { Box::from_raw((*(*m).ctx()).cast::<Export<M>>()) });
}

/// A capsule's destructor: frees the export unless a consumer took it (and renamed the
/// capsule, taking over the deleter).
///
/// # Safety
///
/// Called by CPython with a capsule made by [`export`] for `M`.
unsafe extern "C" fn drop_capsule<M: Managed>(capsule: *mut ffi::PyObject) {
    // SAFETY: `capsule` is a live capsule; asking whether it has a name raises nothing.
    if unsafe { ffi::PyCapsule_IsValid(capsule, M::NAME.as_ptr()) } != 1 {
        return;
    }
    // SAFETY: the name matched, so the pointer is the managed tensor `export` made.
    let m = unsafe { ffi::PyCapsule_GetPointer(capsule, M::NAME.as_ptr()) }.cast::<M>();
    // SAFETY: an unconsumed capsule still owns its export: free it here, once.
    unsafe { delete_export(m) };
}

/// A DLPack capsule (protocol `M`) of `view` on `device`, keeping `view.owner` alive.
fn export<M: Managed>(py: Python<'_>, view: &View, device: Device) -> PyResult<Py<PyAny>> {
    let mut shape: Vec<i64> = view.shape.iter().map(|&d| d as i64).collect();
    let mut strides: Vec<i64> = view.strides.iter().map(|&s| s as i64).collect();
    let tensor = DLTensor {
        data: view.addr as *mut c_void,
        device: dl_device(device),
        ndim: shape.len() as i32,
        dtype: if view.bits {
            dl_bits(view.dtype)
        } else {
            dl_dtype(view.dtype)
        },
        shape: shape.as_mut_ptr(),
        strides: strides.as_mut_ptr(),
        byte_offset: 0,
    };
    let export = Box::into_raw(Box::new(Export {
        managed: M::new(tensor, delete_export::<M>),
        _owner: view.owner.clone(),
        _shape: shape,
        _strides: strides,
    }));
    // SAFETY: `export` was just leaked and is not shared yet; the shape and stride vectors
    // moved into it keep their heap buffers, so the pointers above stay valid.
    let managed = unsafe {
        *(*export).managed.ctx() = export.cast();
        ptr::addr_of_mut!((*export).managed)
    };
    // SAFETY: a capsule of a valid pointer with a static name and a destructor that frees the
    // export unless a consumer took it.
    let capsule =
        unsafe { ffi::PyCapsule_New(managed.cast(), M::NAME.as_ptr(), Some(drop_capsule::<M>)) };
    if capsule.is_null() {
        // SAFETY: the capsule was not made, so nobody else owns the export.
        unsafe { delete_export(managed) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `PyCapsule_New` returned a new reference.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) }.unbind())
}

/// What a buffer exports: elements from `addr`, and the tensor whose memory holds them.
#[derive(Clone)]
struct View {
    owner: Tensor,
    addr: u64,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    /// Export the elements as unsigned integers of their width (bf16 for NumPy, which has no
    /// bf16: its bits as uint16).
    bits: bool,
}

/// A buffer of symmcomm's memory for NumPy or torch to take (`numpy.from_dlpack`,
/// `torch.from_dlpack`): the producer side of DLPack. Each capsule it makes keeps the memory
/// alive until its consumer drops it.
#[pyclass(module = "symmcomm._core", frozen)]
pub(crate) struct DLPackBuffer {
    view: View,
    device: Device,
}

impl DLPackBuffer {
    /// The elements of `tensor`, as its layout says.
    pub(crate) fn new(tensor: Tensor, device: Device) -> Self {
        DLPackBuffer {
            view: View {
                addr: tensor.addr(),
                dtype: tensor.dtype(),
                shape: tensor.shape().to_vec(),
                strides: tensor.layout().strides().to_vec(),
                owner: tensor,
                bits: false,
            },
            device,
        }
    }

    /// A contiguous `shape` from the first element of `owner`, whose allocation holds at least
    /// that many elements (a buffer made whole from a view of its first rows).
    ///
    /// # Safety
    ///
    /// `owner`'s memory holds `shape`'s elements from `owner.addr()`.
    pub(crate) unsafe fn covering(owner: Tensor, shape: &[usize], device: Device) -> Self {
        let strides = symmcomm::Layout::contiguous(shape).strides().to_vec();
        DLPackBuffer {
            view: View {
                addr: owner.addr(),
                dtype: owner.dtype(),
                shape: shape.to_vec(),
                strides,
                owner,
                bits: false,
            },
            device,
        }
    }
}

#[pymethods]
impl DLPackBuffer {
    /// A DLPack capsule of the buffer: versioned (DLPack 1.0, writable) when the consumer
    /// accepts it, the older unversioned one otherwise. The memory is ready at once (nothing
    /// is pending on it), so `stream` needs no synchronisation; copies are never made.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Py<PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = stream;
        if copy == Some(true) {
            return Err(PyBufferError::new_err(
                "symmcomm buffers are exported in place; a copy was asked for",
            ));
        }
        let here = self::dl_device(self.device);
        if let Some((t, id)) = dl_device
            && (t, id) != (here.device_type, here.device_id)
        {
            return Err(PyBufferError::new_err(format!(
                "the buffer lies on DLPack device ({}, {}), not ({t}, {id})",
                here.device_type, here.device_id
            )));
        }
        match max_version {
            Some((major, _)) if major >= 1 => {
                export::<DLManagedTensorVersioned>(py, &self.view, self.device)
            }
            _ => export::<DLManagedTensor>(py, &self.view, self.device),
        }
    }

    /// `(device_type, device_id)`: `(1, 0)` for host memory, `(2, ordinal)` for a GPU.
    fn __dlpack_device__(&self) -> (i32, i32) {
        let d = dl_device(self.device);
        (d.device_type, d.device_id)
    }

    /// The same memory exported as unsigned integers of the element's width (`uint16` for
    /// bf16 and f16, `uint32` for f32 and i32): for NumPy, which has no bf16.
    fn bits(&self) -> DLPackBuffer {
        DLPackBuffer {
            view: View {
                bits: true,
                ..self.view.clone()
            },
            device: self.device,
        }
    }

    /// Address of the first element.
    #[getter]
    fn ptr(&self) -> u64 {
        self.view.addr
    }

    /// Dimensions.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.view.shape.clone()
    }

    /// Element type (`f32`, `bf16`, ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.view.dtype.name()
    }

    /// Bytes of the elements.
    #[getter]
    fn nbytes(&self) -> usize {
        self.view.shape.iter().product::<usize>() * self.view.dtype.size()
    }

    /// Whether the memory lies in a group's symmetric windows.
    #[getter]
    fn symmetric(&self) -> bool {
        self.view.owner.is_symmetric()
    }

    fn __repr__(&self) -> String {
        format!(
            "DLPackBuffer({} {:?} at {:#x}, {})",
            self.view.dtype,
            self.view.shape,
            self.view.addr,
            if self.view.owner.is_symmetric() {
                "symmetric"
            } else {
                "plain"
            }
        )
    }
}
