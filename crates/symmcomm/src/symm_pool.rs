//! A group's live symmetric pool: the deterministic layout of `pool`, the segments a backend
//! allocated and registered for it, and the SPMD check run before every registration.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::GroupBackend;
use crate::bootstrap::ControlPlane;
use crate::error::{Error, Op, OpCtx, Result};
use crate::memory::Memory;
use crate::pool::{
    CheckMode, PoolConfig, PoolLayout, PoolRequest, RequestDigest, RequestLog, SegmentHit,
    SegmentMap, Slot, find_divergence,
};

struct PoolState {
    layout: PoolLayout,
    segments: Vec<Arc<dyn Memory>>,
    map: SegmentMap,
    log: RequestLog,
    /// Problems met while releasing slots (in `Drop`, which cannot fail), reported by the next
    /// allocation.
    release_errors: Vec<String>,
}

/// Statistics of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Segments allocated and registered.
    pub segments: usize,
    /// Bytes in all segments.
    pub capacity: usize,
    /// Bytes in live slots.
    pub in_use: usize,
}

/// Whether an allocation may grow the pool (a collective registration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Growth {
    /// Grow when nothing fits (every rank makes the same requests).
    Allowed,
    /// The caller's stream is being captured: growing is an error.
    Capturing,
    /// Never (an allocator callback, where no collective may run): take a slot of the
    /// segments reserved before, or fail.
    Never,
}

impl Growth {
    pub(crate) fn unless_capturing(capturing: bool) -> Growth {
        if capturing {
            Growth::Capturing
        } else {
            Growth::Allowed
        }
    }
}

/// One group's symmetric pool on one rank.
pub(crate) struct SymmPool {
    label: String,
    group: Arc<dyn GroupBackend>,
    control: Arc<ControlPlane>,
    check: CheckMode,
    state: Mutex<PoolState>,
}

impl fmt::Debug for SymmPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SymmPool({})", self.label)
    }
}

impl SymmPool {
    pub(crate) fn new(
        label: String,
        group: Arc<dyn GroupBackend>,
        control: Arc<ControlPlane>,
        config: PoolConfig,
        check: CheckMode,
    ) -> Self {
        SymmPool {
            label,
            group,
            control,
            check,
            state: Mutex::new(PoolState {
                layout: PoolLayout::new(config),
                segments: Vec::new(),
                map: SegmentMap::default(),
                log: RequestLog::default(),
                release_errors: Vec::new(),
            }),
        }
    }

    /// The owning group's label.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every critical section leaves the state consistent before anything can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ctx(&self, op: Op, bytes: usize) -> OpCtx {
        OpCtx {
            op,
            group: self.label.clone(),
            rank: self.group.rank(),
            world: self.group.size(),
            bytes,
        }
    }

    /// A slot of `bytes`, growing the pool (collectively) when nothing fits and `growth`
    /// allows it.
    pub(crate) fn alloc(self: &Arc<Self>, bytes: usize, growth: Growth) -> Result<SymmSlot> {
        let mut st = self.lock();
        if let Some(e) = st.release_errors.first() {
            return Err(Error::InvalidArgument {
                ctx: self.ctx(Op::PoolFree, 0),
                detail: format!("an earlier release failed: {e}"),
            });
        }
        if self.check != CheckMode::Off {
            st.log.push(PoolRequest::Alloc { bytes });
        }
        if self.check == CheckMode::EveryRequest {
            self.verify_locked(&mut st, bytes)?;
        }
        let slot = match st.layout.alloc(bytes) {
            Ok(slot) => slot,
            Err(need) => {
                self.grow_locked(&mut st, need.bytes, bytes, growth)?;
                st.layout.alloc(bytes).map_err(|n| Error::InvalidArgument {
                    ctx: self.ctx(Op::PoolAlloc, bytes),
                    detail: format!(
                        "a fresh segment did not fit the request (layout asked for {} B more)",
                        n.bytes
                    ),
                })?
            }
        };
        let segment = st.segments[slot.segment].clone();
        Ok(SymmSlot {
            pool: self.clone(),
            slot,
            segment,
        })
    }

    /// Make sure one allocation of up to `bytes` will not grow the pool (collective when it
    /// grows).
    pub(crate) fn reserve(&self, bytes: usize) -> Result<()> {
        let mut st = self.lock();
        // A zero-byte slot still takes one alignment unit.
        let bytes = bytes.max(1);
        if st.layout.largest_free() >= bytes {
            return Ok(());
        }
        let size = st.layout.segment_size_for(bytes);
        self.grow_locked(&mut st, size, bytes, Growth::Allowed)
    }

    fn grow_locked(
        &self,
        st: &mut PoolState,
        segment_bytes: usize,
        request: usize,
        growth: Growth,
    ) -> Result<()> {
        if growth == Growth::Never {
            return Err(Error::CapacityExceeded {
                ctx: self.ctx(Op::PoolAlloc, request),
                what: "a slot of the segments reserved before (Group::reserve_symmetric)".into(),
                needed: request,
                capacity: st.layout.largest_free(),
            });
        }
        if growth == Growth::Capturing {
            return Err(Error::DuringCapture {
                ctx: self.ctx(Op::PoolAlloc, request),
                action: format!("growing the symmetric pool by a {segment_bytes} B segment"),
            });
        }
        if self.check != CheckMode::Off {
            self.verify_locked(st, request)?;
        }
        let mem = self
            .group
            .alloc_segment(segment_bytes, &self.ctx(Op::Register, segment_bytes))?;
        let index = st.layout.segment_count();
        st.map
            .try_insert(mem.addr(), segment_bytes, index)
            .map_err(|detail| Error::InvalidArgument {
                ctx: self.ctx(Op::Register, segment_bytes),
                detail: format!("the backend returned a segment that overlaps another: {detail}"),
            })?;
        let added = st.layout.add_segment(segment_bytes);
        debug_assert_eq!(added, index);
        st.segments.push(mem);
        tracing::debug!(group = %self.label, index, segment_bytes, "symmetric pool grew");
        Ok(())
    }

    /// Compare every rank's pool requests; an error names the first that differs.
    fn verify_locked(&self, st: &mut PoolState, request: usize) -> Result<()> {
        let digest = st.log.digest();
        let mine = serde_json::to_vec(&digest).expect("a digest serialises");
        let all = self.control.all_gather("pool digest", &mine)?;
        let ctx = self.ctx(Op::PoolAlloc, request);
        let mut digests = Vec::with_capacity(all.len());
        for (r, bytes) in all.iter().enumerate() {
            let d: RequestDigest =
                serde_json::from_slice(bytes).map_err(|e| Error::InvalidArgument {
                    ctx: ctx.clone(),
                    detail: format!("rank {r} sent an unreadable pool digest: {e}"),
                })?;
            digests.push(d);
        }
        if digests.iter().all(|d| *d == digests[0]) {
            st.log.mark_verified();
            return Ok(());
        }
        let (start, tail) = st.log.unverified();
        let mine = serde_json::to_vec(&(start, tail)).expect("a log serialises");
        let all = self.control.all_gather("pool log", &mine)?;
        let mut tails = Vec::with_capacity(all.len());
        for (r, bytes) in all.iter().enumerate() {
            let t: (u64, Vec<PoolRequest>) =
                serde_json::from_slice(bytes).map_err(|e| Error::InvalidArgument {
                    ctx: ctx.clone(),
                    detail: format!("rank {r} sent an unreadable pool log: {e}"),
                })?;
            tails.push(t);
        }
        let d = find_divergence(&tails).unwrap_or_else(|| crate::pool::Divergence {
            index: digests.iter().map(|d| d.count).min().unwrap_or(0),
            rank: 0,
            request: format!("{:?}", digests[0]),
            other_rank: 1,
            other_request: "a different request history".into(),
        });
        Err(Error::SpmdDivergence {
            ctx,
            index: d.index,
            mine: format!("rank {}: {}", d.rank, d.request),
            other_rank: d.other_rank,
            theirs: d.other_request,
        })
    }

    /// Compare requests across ranks now (collective).
    pub(crate) fn verify(&self) -> Result<()> {
        let mut st = self.lock();
        self.verify_locked(&mut st, 0)
    }

    /// Return a slot (from `SymmSlot::drop`).
    pub(crate) fn release(&self, slot: Slot) {
        let mut st = self.lock();
        if self.check != CheckMode::Off {
            st.log.push(PoolRequest::Free {
                segment: slot.segment,
                offset: slot.offset,
            });
        }
        if let Err(e) = st.layout.free(slot) {
            st.release_errors.push(e);
        }
    }

    /// Which segment and offset a raw address of this rank falls in.
    pub(crate) fn lookup(&self, addr: u64) -> Option<SegmentHit> {
        self.lock().map.lookup(addr)
    }

    /// Whether all of `[addr, addr + len)` lies in one segment, and where it starts.
    pub(crate) fn lookup_range(&self, addr: u64, len: usize) -> Option<SegmentHit> {
        self.lock().map.lookup_range(addr, len)
    }

    /// The largest single slot that fits without growing.
    pub(crate) fn largest_free(&self) -> usize {
        self.lock().layout.largest_free()
    }

    /// Statistics.
    pub(crate) fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            segments: st.segments.len(),
            capacity: st.layout.capacity(),
            in_use: st.layout.in_use(),
        }
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
