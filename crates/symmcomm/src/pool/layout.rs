//! Deterministic first-fit sub-allocation over an ordered list of segments.

/// How the pool grows and aligns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Size of a new segment when a request fits in it (larger requests get a segment of
    /// their own, rounded up to `granularity`).
    pub segment_bytes: usize,
    /// Alignment of every sub-allocation (a power of two).
    pub alignment: usize,
    /// Segment sizes are multiples of this (the driver's allocation granularity).
    pub granularity: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            segment_bytes: 64 << 20,
            alignment: 256,
            granularity: 2 << 20,
        }
    }
}

/// A sub-allocation: which segment, where in it, how many bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot {
    /// Segment index (order of creation).
    pub segment: usize,
    /// Byte offset inside the segment.
    pub offset: usize,
    /// Bytes reserved (the request rounded up to the alignment).
    pub bytes: usize,
}

/// The request does not fit: add a segment of at least `bytes` and try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedSegment {
    /// Size of the segment to add.
    pub bytes: usize,
}

/// The allocator state of one pool.
#[derive(Clone, Debug)]
pub struct PoolLayout {
    config: PoolConfig,
}

impl PoolLayout {
    /// An empty pool.
    pub fn new(config: PoolConfig) -> Self {
        PoolLayout { config }
    }
}

impl PoolLayout {
    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }
    /// Place `bytes` (rounded up to the alignment) first-fit; `Err` says what segment to add.
    pub fn alloc(&mut self, bytes: usize) -> Result<Slot, NeedSegment> {
        let _ = bytes;
        todo!()
    }
    /// Append a segment of `bytes` (already a multiple of the granularity); returns its index.
    pub fn add_segment(&mut self, bytes: usize) -> usize {
        let _ = bytes;
        todo!()
    }
    /// Return a slot; `Err` describes a double or foreign free.
    pub fn free(&mut self, slot: Slot) -> Result<(), String> {
        let _ = slot;
        todo!()
    }
    /// The largest single allocation that fits without growing.
    pub fn largest_free(&self) -> usize {
        todo!()
    }
    /// The size of the segment the pool adds to fit a request of `bytes`.
    pub fn segment_size_for(&self, bytes: usize) -> usize {
        let _ = bytes;
        todo!()
    }
    /// Bytes in all segments.
    pub fn capacity(&self) -> usize {
        todo!()
    }
    /// Bytes in live slots.
    pub fn in_use(&self) -> usize {
        todo!()
    }
}
