//! Buffers: plain allocations and slots of a group's symmetric pool, on either backend. A
//! buffer knows which communicator (and, when symmetric, which group's pool) it came from, so a
//! collective can refuse memory that is not its own.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::pool::Slot;
use crate::symm_pool::SymmPool;

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

/// A slot of a symmetric pool; returned to the pool when dropped.
pub(crate) struct SymmSlot {
    pub(crate) pool: Arc<SymmPool>,
    pub(crate) slot: Slot,
    pub(crate) segment: Arc<dyn Memory>,
}

impl Drop for SymmSlot {
    fn drop(&mut self) {
        self.pool.release(self.slot);
    }
}

/// What backs a buffer.
pub(crate) enum Backing {
    /// A standalone allocation.
    Plain(Arc<dyn Memory>),
    /// A slot of a group's symmetric pool.
    Symmetric(SymmSlot),
    /// Memory the engine owns (its own allocation, a torch tensor's storage): used in place,
    /// never freed here. When it lies in a group's windows, that group finds it by address.
    Foreign(Arc<dyn Memory>),
}

/// Memory a tensor views.
pub(crate) struct Buffer {
    pub(crate) backing: Backing,
    /// Id of the communicator (one per rank and backend instance) that allocated it.
    pub(crate) comm_id: u64,
    /// The backend whose memory it is.
    pub(crate) backend: crate::backend::BackendKind,
    /// Bytes usable by the tensor.
    pub(crate) bytes: usize,
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backing {
            Backing::Plain(_) => write!(f, "plain memory of comm {}", self.comm_id),
            Backing::Foreign(m) => write!(
                f,
                "the engine's memory at {:#x} (comm {})",
                m.addr(),
                self.comm_id
            ),
            Backing::Symmetric(s) => write!(
                f,
                "symmetric pool of {} (segment {}, offset {})",
                s.pool.label(),
                s.slot.segment,
                s.slot.offset
            ),
        }
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Buffer({self}, {} B)", self.bytes)
    }
}

impl Buffer {
    /// Address of the first byte.
    pub(crate) fn addr(&self) -> u64 {
        match &self.backing {
            Backing::Plain(m) | Backing::Foreign(m) => m.addr(),
            Backing::Symmetric(s) => s.segment.addr() + s.slot.offset as u64,
        }
    }

    /// Whether the buffer is the engine's memory.
    pub(crate) fn is_foreign(&self) -> bool {
        matches!(self.backing, Backing::Foreign(_))
    }

    /// Whether the buffer lies in a symmetric window.
    pub(crate) fn is_symmetric(&self) -> bool {
        matches!(self.backing, Backing::Symmetric(_))
    }

    /// The memory and the byte offset of `byte_offset` inside it.
    pub(crate) fn mem_ref(&self, byte_offset: usize) -> MemRef {
        match &self.backing {
            Backing::Plain(m) | Backing::Foreign(m) => MemRef {
                mem: m.clone(),
                offset: byte_offset,
            },
            Backing::Symmetric(s) => MemRef {
                mem: s.segment.clone(),
                offset: s.slot.offset + byte_offset,
            },
        }
    }

    /// Where in its pool a symmetric buffer lies: `(pool, segment, offset of byte_offset)`.
    pub(crate) fn symm_location(
        &self,
        byte_offset: usize,
    ) -> Option<(&Arc<SymmPool>, usize, usize)> {
        match &self.backing {
            Backing::Plain(_) | Backing::Foreign(_) => None,
            Backing::Symmetric(s) => Some((&s.pool, s.slot.segment, s.slot.offset + byte_offset)),
        }
    }
}
