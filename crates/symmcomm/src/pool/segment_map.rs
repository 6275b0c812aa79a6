//! Sorted map from address ranges to segments: "is this raw address symmetric, in which
//! segment, at which offset", in O(log n).

/// Where an address falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHit {
    /// Segment index.
    pub segment: usize,
    /// Byte offset of the address inside the segment.
    pub offset: usize,
}

/// Address ranges of the segments, sorted by base address.
#[derive(Clone, Debug, Default)]
pub struct SegmentMap {}

impl SegmentMap {
    /// Record segment `segment` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: usize, segment: usize) {
        let _ = (base, len, segment);
        todo!()
    }
    /// Which segment holds `addr`, and where.
    pub fn lookup(&self, addr: u64) -> Option<SegmentHit> {
        let _ = addr;
        todo!()
    }
}
