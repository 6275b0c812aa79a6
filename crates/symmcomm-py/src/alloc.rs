//! The allocator that torch's `CUDAPluggableAllocator` loads from this very library: two
//! `extern "C"` functions serving a `MemPool`'s segments from the symmetric pool of the group
//! that the current thread's `use_symmetric_memory` scope names. The callback never grows the
//! pool (growing is collective; the scope reserved the segments before) and registers nothing;
//! a request that does not fit returns null, which torch turns into its out-of-memory error,
//! with our reason printed and kept for the scope to raise.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use symmcomm::{DType, Op, Tensor};

use crate::errors::{IntoPy, invalid, no_group};
use crate::registry::{Device, GROUPS, GroupEntry};

thread_local! {
    /// The groups of this thread's open scopes, innermost last.
    static SCOPES: RefCell<Vec<Arc<GroupEntry>>> = const { RefCell::new(Vec::new()) };
}

/// Every segment handed to torch and not yet freed, by address: dropping the tensor returns
/// its slot to the group's pool.
static LIVE: Mutex<BTreeMap<u64, Tensor>> = Mutex::new(BTreeMap::new());

/// Why the last allocation failed, until a scope takes it.
static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);

fn fail(message: String) {
    eprintln!("symmcomm: torch allocation from symmetric memory failed: {message}");
    *LAST_ERROR.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
}

/// A slot of `size` bytes of the innermost scope's group, without growing its pool.
fn alloc(size: usize, device: c_int) -> Result<u64, String> {
    let entry = SCOPES
        .with(|s| s.borrow().last().cloned())
        .ok_or_else(|| "no symmcomm scope is open on this thread".to_string())?;
    if entry.device.code() != i64::from(device) {
        return Err(format!(
            "torch asked for memory on {}, the group {} runs on {}",
            Device::describe(i64::from(device)),
            entry.group.label(),
            Device::describe(entry.device.code())
        ));
    }
    let t = entry
        .group
        .alloc_symmetric_reserved(DType::U8, &[size])
        .map_err(|e| {
            format!(
                "{e}; open the scope with a larger reserve_bytes (it reserves before torch allocates)"
            )
        })?;
    let addr = t.addr();
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(addr, t);
    Ok(addr)
}

/// Return the slot at `ptr` to its pool.
fn free(ptr: u64) -> Result<(), String> {
    let t = LIVE.lock().unwrap_or_else(|p| p.into_inner()).remove(&ptr);
    match t {
        Some(t) => {
            drop(t);
            Ok(())
        }
        None => Err(format!("free of {ptr:#x}, which symmcomm never handed out")),
    }
}

/// torch's `alloc_fn`: `void* (size_t size, int device, cudaStream_t stream)`. Null when the
/// request does not fit the reserved segments (torch then raises its out-of-memory error).
#[unsafe(no_mangle)]
pub extern "C" fn symmcomm_torch_alloc(
    size: usize,
    device: c_int,
    _stream: *mut c_void,
) -> *mut c_void {
    match catch_unwind(AssertUnwindSafe(|| alloc(size, device))) {
        Ok(Ok(addr)) => addr as *mut c_void,
        Ok(Err(message)) => {
            fail(message);
            std::ptr::null_mut()
        }
        Err(_) => {
            fail(format!("a panic while allocating {size} B"));
            std::ptr::null_mut()
        }
    }
}

/// torch's `free_fn`: `void (void* ptr, size_t size, int device, cudaStream_t stream)`.
#[unsafe(no_mangle)]
pub extern "C" fn symmcomm_torch_free(
    ptr: *mut c_void,
    _size: usize,
    _device: c_int,
    _stream: *mut c_void,
) {
    match catch_unwind(AssertUnwindSafe(|| free(ptr as u64))) {
        Ok(Ok(())) => {}
        Ok(Err(message)) => fail(message),
        Err(_) => fail(format!("a panic while freeing {ptr:?}")),
    }
}

/// Route this thread's allocations through torch's allocator to `group`'s pool (a scope
/// opens).
#[pyfunction]
pub(crate) fn push_alloc_group(group: u64) -> PyResult<()> {
    let entry = GROUPS.get(group, Op::PoolAlloc).py()?;
    SCOPES.with(|s| s.borrow_mut().push(entry));
    Ok(())
}

/// The innermost scope of this thread closes; it must be `group`'s.
#[pyfunction]
pub(crate) fn pop_alloc_group(group: u64) -> PyResult<()> {
    let entry = GROUPS.get(group, Op::PoolAlloc).py()?;
    SCOPES.with(|s| {
        let mut s = s.borrow_mut();
        match s.last() {
            Some(top) if Arc::ptr_eq(top, &entry) => {
                s.pop();
                Ok(())
            }
            _ => Err(invalid(
                entry.group.ctx(Op::PoolAlloc, 0),
                "symmetric-memory scopes must close in the reverse order they opened",
            ))
            .py(),
        }
    })
}

/// Why the last allocation of torch's allocator failed, once (None if none failed since).
#[pyfunction]
pub(crate) fn take_alloc_error() -> Option<String> {
    LAST_ERROR.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// How many segments torch's allocator holds from symmetric pools now.
#[pyfunction]
pub(crate) fn live_allocations() -> usize {
    LIVE.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// Allocate as torch's allocator would (for tests of the callbacks without torch; `device` -1
/// for the host backend): the address, or the error the scope would raise.
#[pyfunction]
pub(crate) fn _test_alloc(size: usize, device: c_int) -> PyResult<u64> {
    let p = symmcomm_torch_alloc(size, device, std::ptr::null_mut());
    if p.is_null() {
        let why = take_alloc_error().unwrap_or_default();
        return Err(invalid(no_group(Op::PoolAlloc), why)).py();
    }
    Ok(p as u64)
}

/// Free as torch's allocator would (for tests).
#[pyfunction]
pub(crate) fn _test_free(ptr: u64, size: usize, device: c_int) {
    symmcomm_torch_free(ptr as *mut c_void, size, device, std::ptr::null_mut());
}
