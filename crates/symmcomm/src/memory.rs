//! Memory as the backends see it: an allocation of theirs (host bytes, a device allocation, a
//! registered segment, the engine's memory) and byte ranges of it.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// Memory owned by a backend: host bytes or a device allocation. Addresses are what this rank's
/// kernels (or threads) use.
pub(crate) trait Memory: Send + Sync + fmt::Debug + Any {
    /// Address of the first byte.
    fn addr(&self) -> u64;
    /// Size in bytes.
    fn len(&self) -> usize;
    /// For downcasting by the backend that made it.
    fn as_any(&self) -> &dyn Any;
}

/// A byte range of a [`Memory`].
#[derive(Clone, Debug)]
pub(crate) struct MemRef {
    pub(crate) mem: Arc<dyn Memory>,
    pub(crate) offset: usize,
}

impl MemRef {
    /// Address of the first byte of the range.
    #[allow(dead_code)] // used by the CUDA backend
    pub(crate) fn addr(&self) -> u64 {
        self.mem.addr() + self.offset as u64
    }
}
