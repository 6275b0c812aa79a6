//! Where a rank's work is enqueued: the communicator's own stream, or a CUDA stream the engine
//! names (a cudarc `CudaStream`, or a raw `CUstream`). A [`crate::Group`] carries one
//! ([`crate::Group::on`]); everything it enqueues goes there, eager or inside the caller's own
//! stream capture.

use std::fmt;
use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::backend::StreamSel;

/// A stream work is enqueued on. Cheap to clone.
///
/// ```no_run
/// # fn f(comm: &symmcomm::Communicator, engine: &std::sync::Arc<cudarc::driver::CudaStream>)
/// #     -> symmcomm::Result<()> {
/// use symmcomm::{GroupKind, Stream};
/// // The engine's stream: every collective of `tp` is enqueued there from now on.
/// let tp = comm.split(GroupKind::Tp, 0)?.on(&Stream::from_cudarc(engine))?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Stream {
    pub(crate) sel: StreamSel,
    /// The engine's stream object, kept alive as long as this handle.
    _keep: Option<Arc<CudaStream>>,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sel {
            StreamSel::Own => f.write_str("Stream(own)"),
            StreamSel::Cuda(raw) => write!(f, "Stream(CUstream {raw:#x})"),
        }
    }
}

impl Stream {
    /// The communicator's own stream (on the host backend, its in-order queue).
    pub fn own() -> Stream {
        Stream {
            sel: StreamSel::Own,
            _keep: None,
        }
    }

    /// An engine's cudarc stream; the handle keeps it alive. It must belong to the
    /// communicator's device (checked by [`crate::Group::on`]).
    pub fn from_cudarc(stream: &Arc<CudaStream>) -> Stream {
        Stream {
            sel: StreamSel::Cuda(stream.cu_stream() as u64),
            _keep: Some(stream.clone()),
        }
    }

    /// A raw `CUstream` (`cudaStream_t`), such as PyTorch's `torch.cuda.current_stream().cuda_stream`.
    /// 0 is the legacy default stream, which can run work but cannot be captured.
    ///
    /// # Safety
    ///
    /// `handle` is a stream of the communicator's device (or 0) and stays valid while this
    /// handle, or a group bound to it, enqueues work.
    pub unsafe fn from_raw(handle: u64) -> Stream {
        Stream {
            sel: StreamSel::Cuda(handle),
            _keep: None,
        }
    }

    /// The raw `CUstream`, or `None` for the communicator's own stream.
    pub fn raw(&self) -> Option<u64> {
        match self.sel {
            StreamSel::Own => None,
            StreamSel::Cuda(raw) => Some(raw),
        }
    }
}
