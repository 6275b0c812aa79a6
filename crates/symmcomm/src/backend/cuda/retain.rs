//! What a graph captured by the engine needs kept alive. symmcomm cannot hold the engine's
//! graph, so it ties what a captured call uses (the tensors, scratch memory) to that graph with
//! a CUDA user object: the graph (and every graph instantiated from it) holds a reference, and
//! when the last one goes the driver calls [`release`] on one of its own threads. That thread
//! may not call CUDA, and freeing device memory does, so the released memory waits in
//! [`DEFERRED`] until a later call on a stream that is not being captured frees it
//! ([`release_deferred`]).

use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::driver::sys;

use super::driver::check;
use crate::error::{Error, OpCtx, Result};

/// What graphs released, waiting to be dropped off the driver's thread.
static DEFERRED: Mutex<Vec<Keep>> = Mutex::new(Vec::new());

/// What one captured call keeps (opaque here: the buffers it used).
type Keep = Box<dyn std::any::Any + Send>;

/// The user object's destructor: runs on a driver thread once no graph holds `p`.
extern "C" fn release(p: *mut c_void) {
    // SAFETY: `p` is the `Box<Keep>` leaked by `for_capture` for this user object, whose
    // destructor the driver calls exactly once.
    let keep = unsafe { Box::from_raw(p as *mut Keep) };
    DEFERRED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(*keep);
}

/// Drop what graphs released (call where CUDA may be called and no capture is under way).
pub(crate) fn release_deferred() {
    let done = std::mem::take(&mut *DEFERRED.lock().unwrap_or_else(|p| p.into_inner()));
    drop(done);
}

/// Keep `keep` alive as long as the graph being captured on `stream`.
pub(crate) fn for_capture(stream: sys::CUstream, keep: Keep, ctx: &OpCtx) -> Result<()> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let mut id = 0u64;
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    let mut deps: *const sys::CUgraphNode = std::ptr::null();
    let mut edges: *const sys::CUgraphEdgeData = std::ptr::null();
    let mut ndeps = 0usize;
    // SAFETY: every output is valid for writing; the stream is the caller's, being captured.
    let r = unsafe {
        sys::cuStreamGetCaptureInfo_v3(
            stream,
            &mut status,
            &mut id,
            &mut graph,
            &mut deps,
            &mut edges,
            &mut ndeps,
        )
    };
    check(r, "cuStreamGetCaptureInfo", ctx)?;
    if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE || graph.is_null() {
        return Err(Error::InvalidArgument {
            ctx: ctx.clone(),
            detail: "internal: keeping memory for a capture that is not active".into(),
        });
    }
    let boxed = Box::into_raw(Box::new(keep)) as *mut c_void;
    let mut object: sys::CUuserObject = std::ptr::null_mut();
    // SAFETY: `boxed` is a leaked box that `release` takes back; NO_DESTRUCTOR_SYNC because
    // `release` only moves the box into a list (it neither blocks nor calls CUDA).
    let r = unsafe {
        sys::cuUserObjectCreate(
            &mut object,
            boxed,
            Some(release),
            1,
            sys::CUuserObject_flags::CU_USER_OBJECT_NO_DESTRUCTOR_SYNC as u32,
        )
    };
    if let Err(e) = check(r, "cuUserObjectCreate", ctx) {
        // SAFETY: the user object was not made, so the box is still ours.
        drop(unsafe { Box::from_raw(boxed as *mut Keep) });
        return Err(e);
    }
    // SAFETY: `graph` is the graph under capture; MOVE hands it our one reference.
    let r = unsafe {
        sys::cuGraphRetainUserObject(
            graph,
            object,
            1,
            sys::CUuserObjectRetain_flags::CU_GRAPH_USER_OBJECT_MOVE as u32,
        )
    };
    if let Err(e) = check(r, "cuGraphRetainUserObject", ctx) {
        // SAFETY: the graph did not take the reference; dropping ours runs `release`.
        unsafe { sys::cuUserObjectRelease(object, 1) };
        return Err(e);
    }
    Ok(())
}
