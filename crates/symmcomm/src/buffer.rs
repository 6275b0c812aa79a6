//! Buffers: plain allocations, slots of a group's symmetric pool and the engine's memory, on
//! either backend. A buffer knows which communicator (and, when symmetric, which group's pool)
//! it came from, so a collective can refuse memory that is not its own.

use std::fmt;
use std::sync::Arc;

use crate::memory::{MemRef, Memory};
use crate::symm_pool::{SymmPool, SymmSlot};

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

/// Buffers captured work refers to; a graph keeps them alive.
#[derive(Default)]
pub(crate) struct KeepAlive {
    pub(crate) buffers: Vec<Arc<Buffer>>,
}
