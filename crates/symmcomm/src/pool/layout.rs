//! Deterministic first-fit sub-allocation over an ordered list of segments: the same sequence
//! of calls gives the same slots on every rank, so symmetric buffers land at the same offset of
//! the same window everywhere.

use std::collections::BTreeMap;

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

impl PoolConfig {
    /// `Ok` when the alignment is a power of two and the granularity a non-zero multiple of
    /// it; otherwise `Err` says which field is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        if !self.alignment.is_power_of_two() {
            return Err(format!(
                "pool alignment must be a power of two, got {}",
                self.alignment
            ));
        }
        if self.granularity == 0 || !self.granularity.is_multiple_of(self.alignment) {
            return Err(format!(
                "pool granularity must be a non-zero multiple of the alignment ({}), got {}",
                self.alignment, self.granularity
            ));
        }
        Ok(())
    }
}

/// A sub-allocation: which segment, where in it, how many bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Slot {
    /// Segment index (order of creation).
    pub segment: usize,
    /// Byte offset inside the segment.
    pub offset: usize,
    /// Bytes reserved (the request rounded up to the alignment).
    pub bytes: usize,
}

/// The request does not fit: add a segment of at least `bytes` and try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NeedSegment {
    /// Size of the segment to add.
    pub bytes: usize,
}

/// One segment's size and free space.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    bytes: usize,
    /// Free blocks, offset -> length; never empty blocks, never two adjacent ones (they are
    /// coalesced on free).
    free: BTreeMap<usize, usize>,
}

/// The allocator state of one pool.
///
/// Every decision is a pure function of the sequence of calls: segments are searched in order
/// of creation and free blocks in order of offset, and all maps iterate in key order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PoolLayout {
    config: PoolConfig,
    segments: Vec<Segment>,
    /// Live slots, (segment, offset) -> bytes.
    live: BTreeMap<(usize, usize), usize>,
    capacity: usize,
    in_use: usize,
}

/// `x` rounded up to a multiple of `to` (non-zero), or `None` on overflow.
fn round_up(x: usize, to: usize) -> Option<usize> {
    x.checked_next_multiple_of(to)
}

impl PoolLayout {
    /// An empty pool.
    ///
    /// # Panics
    ///
    /// If `config` fails [`PoolConfig::validate`]; use [`PoolLayout::try_new`] to get the
    /// error as a value.
    pub(crate) fn new(config: PoolConfig) -> Self {
        match Self::try_new(config) {
            Ok(layout) => layout,
            Err(e) => panic!("invalid PoolConfig {config:?}: {e}"),
        }
    }

    /// An empty pool, or `Err` if `config` fails [`PoolConfig::validate`].
    pub(crate) fn try_new(config: PoolConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(PoolLayout {
            config,
            segments: Vec::new(),
            live: BTreeMap::new(),
            capacity: 0,
            in_use: 0,
        })
    }
}

impl PoolLayout {
    /// What a request of `bytes` reserves: rounded up to the alignment, at least one
    /// alignment unit (so every slot is distinct); `None` if that overflows.
    fn reserved_for(&self, bytes: usize) -> Option<usize> {
        round_up(bytes.max(1), self.config.alignment)
    }

    /// Place `bytes` (rounded up to the alignment) first-fit; `Err` says what segment to add.
    ///
    /// A zero-byte request still reserves one alignment unit. A request too large to round
    /// up asks for a segment of `usize::MAX` bytes, which no backend can allocate.
    pub(crate) fn alloc(&mut self, bytes: usize) -> Result<Slot, NeedSegment> {
        let Some(need) = self.reserved_for(bytes) else {
            return Err(NeedSegment { bytes: usize::MAX });
        };
        let found = self.segments.iter().enumerate().find_map(|(s, seg)| {
            seg.free
                .iter()
                .find(|&(_, &len)| len >= need)
                .map(|(&off, &len)| (s, off, len))
        });
        let Some((segment, offset, len)) = found else {
            return Err(NeedSegment {
                bytes: self.segment_size_for(bytes),
            });
        };
        let free = &mut self.segments[segment].free;
        free.remove(&offset);
        if len > need {
            free.insert(offset + need, len - need);
        }
        self.live.insert((segment, offset), need);
        self.in_use += need;
        Ok(Slot {
            segment,
            offset,
            bytes: need,
        })
    }

    /// Append a segment of `bytes` (already a multiple of the granularity); returns its index.
    pub(crate) fn add_segment(&mut self, bytes: usize) -> usize {
        let mut free = BTreeMap::new();
        if bytes > 0 {
            free.insert(0, bytes);
        }
        self.segments.push(Segment { bytes, free });
        self.capacity = self.capacity.saturating_add(bytes);
        self.segments.len() - 1
    }

    /// Return a slot; `Err` describes a double or foreign free (and the state is unchanged).
    pub(crate) fn free(&mut self, slot: Slot) -> Result<(), String> {
        self.check_free(&slot)?;
        self.live.remove(&(slot.segment, slot.offset));
        self.in_use -= slot.bytes;
        let free = &mut self.segments[slot.segment].free;
        let mut offset = slot.offset;
        let mut len = slot.bytes;
        // Coalesce with the block just before, if it ends where this slot starts.
        if let Some((&prev, &prev_len)) = free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            free.remove(&prev);
            offset = prev;
            len += prev_len;
        }
        // And with the block just after, if it starts where this slot ends.
        if let Some(next_len) = free.remove(&(offset + len)) {
            len += next_len;
        }
        free.insert(offset, len);
        Ok(())
    }

    /// `Ok` if `slot` is exactly a live slot of this pool; otherwise why not.
    fn check_free(&self, slot: &Slot) -> Result<(), String> {
        let Slot {
            segment,
            offset,
            bytes,
        } = *slot;
        let Some(seg) = self.segments.get(segment) else {
            return Err(format!(
                "free of {slot:?}: segment {segment} does not exist (the pool has {} segments)",
                self.segments.len()
            ));
        };
        if let Some(&live) = self.live.get(&(segment, offset)) {
            if live == bytes {
                return Ok(());
            }
            return Err(format!(
                "free of {slot:?}: the live slot at segment {segment} offset {offset} holds \
                 {live} B, not {bytes} B"
            ));
        }
        if offset >= seg.bytes {
            return Err(format!(
                "free of {slot:?}: offset {offset} is past the end of segment {segment} \
                 ({} B)",
                seg.bytes
            ));
        }
        if let Some((&(_, start), &len)) = self
            .live
            .range(..(segment, offset))
            .next_back()
            .filter(|&(&(s, start), &len)| s == segment && start + len > offset)
        {
            return Err(format!(
                "free of {slot:?}: offset {offset} lies inside the live slot at segment \
                 {segment} offset {start} ({len} B), not at its start"
            ));
        }
        Err(format!(
            "free of {slot:?}: no slot is live at segment {segment} offset {offset} (a double \
             free, or a slot this pool never handed out)"
        ))
    }

    /// The largest single allocation that fits without growing.
    pub(crate) fn largest_free(&self) -> usize {
        let align = self.config.alignment;
        self.segments
            .iter()
            .flat_map(|seg| seg.free.values())
            // A block at the end of a segment whose size is not a multiple of the alignment
            // cannot be used past its last whole unit.
            .map(|&len| len - len % align)
            .max()
            .unwrap_or(0)
    }

    /// The size of the segment the pool adds to fit a request of `bytes`: the larger of
    /// `segment_bytes` and the reserved size, rounded up to the granularity (`usize::MAX` if
    /// that overflows).
    pub(crate) fn segment_size_for(&self, bytes: usize) -> usize {
        self.reserved_for(bytes)
            .map(|need| need.max(self.config.segment_bytes))
            .and_then(|size| round_up(size, self.config.granularity))
            .unwrap_or(usize::MAX)
    }

    /// Bytes in all segments.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes in live slots.
    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    /// Number of segments.
    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Size of segment `index`, if it exists.
    #[cfg(test)]
    pub(crate) fn segment_bytes(&self, index: usize) -> Option<usize> {
        self.segments.get(index).map(|s| s.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> PoolConfig {
        PoolConfig {
            segment_bytes: 16 << 10,
            alignment: 256,
            granularity: 4 << 10,
        }
    }

    /// Valid configurations with small numbers, so that pools grow and fill often.
    fn configs() -> impl Strategy<Value = PoolConfig> {
        (0u32..10, 1usize..8, 0usize..64).prop_map(|(log_align, gran_units, seg_grans)| {
            let alignment = 1usize << log_align;
            let granularity = alignment * gran_units;
            PoolConfig {
                segment_bytes: granularity * seg_grans,
                alignment,
                granularity,
            }
        })
    }

    #[derive(Clone, Debug)]
    enum Step {
        Alloc(usize),
        /// Free the live slot at this index (modulo the number of live slots).
        Free(usize),
    }

    fn sizes() -> impl Strategy<Value = usize> {
        prop_oneof![
            Just(0usize),
            1usize..600,
            1usize..20_000,
            // Now and then, larger than a default segment.
            10_000usize..100_000,
        ]
    }

    fn steps(max: usize) -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                3 => sizes().prop_map(Step::Alloc),
                2 => any::<usize>().prop_map(Step::Free),
            ],
            0..max,
        )
    }

    /// An independent first-fit reference: scans candidate offsets (0 and the end of every
    /// live slot) of each segment in order, with no free lists at all.
    #[derive(Default)]
    struct Reference {
        segments: Vec<usize>,
        live: Vec<Slot>,
    }

    impl Reference {
        fn place(&self, need: usize) -> Option<(usize, usize)> {
            for (s, &size) in self.segments.iter().enumerate() {
                let mut here: Vec<&Slot> = self.live.iter().filter(|l| l.segment == s).collect();
                here.sort_by_key(|l| l.offset);
                let mut candidates: Vec<usize> = std::iter::once(0)
                    .chain(here.iter().map(|l| l.offset + l.bytes))
                    .collect();
                candidates.sort_unstable();
                for c in candidates {
                    let inside = here.iter().any(|l| l.offset <= c && c < l.offset + l.bytes);
                    let next = here
                        .iter()
                        .map(|l| l.offset)
                        .filter(|&o| o >= c)
                        .min()
                        .unwrap_or(size);
                    if !inside && next >= c && next - c >= need {
                        return Some((s, c));
                    }
                }
            }
            None
        }
    }

    /// What happened at one step, for comparing runs.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Event {
        Placed(Slot),
        Grew { bytes: usize, then: Slot },
        Freed(Slot),
        Nothing,
    }

    /// Runs `steps`, growing on `NeedSegment`; returns the events and the live slots.
    fn run(layout: &mut PoolLayout, steps: &[Step]) -> (Vec<Event>, Vec<Slot>) {
        let mut live = Vec::new();
        let mut events = Vec::new();
        for step in steps {
            let event = match *step {
                Step::Alloc(bytes) => match layout.alloc(bytes) {
                    Ok(slot) => {
                        live.push(slot);
                        Event::Placed(slot)
                    }
                    Err(need) => {
                        assert_eq!(need.bytes, layout.segment_size_for(bytes));
                        layout.add_segment(need.bytes);
                        let slot = layout
                            .alloc(bytes)
                            .expect("a fresh segment of the asked size fits");
                        live.push(slot);
                        Event::Grew {
                            bytes: need.bytes,
                            then: slot,
                        }
                    }
                },
                Step::Free(i) if !live.is_empty() => {
                    let slot = live.remove(i % live.len());
                    layout.free(slot).expect("freeing a live slot");
                    Event::Freed(slot)
                }
                Step::Free(_) => Event::Nothing,
            };
            events.push(event);
        }
        (events, live)
    }

    /// Grows `layout` if a request of `bytes` would not fit, without allocating.
    fn make_room(layout: &mut PoolLayout, bytes: usize) {
        if let Err(need) = layout.clone().alloc(bytes) {
            layout.add_segment(need.bytes);
        }
    }

    proptest! {
        #[test]
        fn same_requests_give_same_slots(config in configs(), steps in steps(200)) {
            let mut a = PoolLayout::new(config);
            let mut b = PoolLayout::new(config);
            let (ea, la) = run(&mut a, &steps);
            let (eb, lb) = run(&mut b, &steps);
            prop_assert_eq!(ea, eb);
            prop_assert_eq!(la, lb);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn slots_are_first_fit_aligned_disjoint_and_inside(
            config in configs(),
            steps in steps(150),
        ) {
            let align = config.alignment;
            let mut layout = PoolLayout::new(config);
            let mut reference = Reference::default();
            for step in &steps {
                match *step {
                    Step::Alloc(bytes) => {
                        let need = bytes.max(1).next_multiple_of(align);
                        let slot = match layout.alloc(bytes) {
                            Ok(slot) => slot,
                            Err(n) => {
                                prop_assert_eq!(reference.place(need), None);
                                let size = need.max(config.segment_bytes)
                                    .next_multiple_of(config.granularity);
                                prop_assert_eq!(n.bytes, size);
                                prop_assert_eq!(layout.add_segment(n.bytes),
                                    reference.segments.len());
                                reference.segments.push(n.bytes);
                                layout.alloc(bytes).expect("fits in a fresh segment")
                            }
                        };
                        prop_assert_eq!(slot.bytes, need);
                        prop_assert_eq!(Some((slot.segment, slot.offset)),
                            reference.place(need));
                        reference.live.push(slot);
                    }
                    Step::Free(i) if !reference.live.is_empty() => {
                        let slot = reference.live.remove(i % reference.live.len());
                        prop_assert_eq!(layout.free(slot), Ok(()));
                    }
                    Step::Free(_) => {}
                }
                let live = &reference.live;
                for (k, s) in live.iter().enumerate() {
                    prop_assert_eq!(s.offset % align, 0, "{:?} misaligned", s);
                    prop_assert!(s.offset + s.bytes <= reference.segments[s.segment],
                        "{:?} runs past its segment", s);
                    for t in &live[k + 1..] {
                        prop_assert!(s.segment != t.segment
                            || s.offset + s.bytes <= t.offset
                            || t.offset + t.bytes <= s.offset,
                            "{:?} overlaps {:?}", s, t);
                    }
                }
                prop_assert_eq!(layout.in_use(), live.iter().map(|s| s.bytes).sum::<usize>());
                prop_assert_eq!(layout.capacity(), reference.segments.iter().sum::<usize>());
                prop_assert_eq!(layout.segment_count(), reference.segments.len());
                // `largest_free` is exact: it fits without growing, one unit more does not.
                let largest = layout.largest_free();
                if largest > 0 {
                    let mut probe = layout.clone();
                    prop_assert!(probe.alloc(largest).is_ok());
                }
                let mut probe = layout.clone();
                prop_assert!(probe.alloc(largest + align).is_err());
            }
        }

        #[test]
        fn freeing_everything_restores_whole_segments(
            config in configs(),
            steps in steps(150),
            order in prop::collection::vec(any::<usize>(), 150),
        ) {
            let mut layout = PoolLayout::new(config);
            let (_, mut live) = run(&mut layout, &steps);
            let mut k = 0;
            while !live.is_empty() {
                let slot = live.remove(order[k % order.len()] % live.len());
                prop_assert_eq!(layout.free(slot), Ok(()));
                k += 1;
            }
            prop_assert_eq!(layout.in_use(), 0);
            let biggest = (0..layout.segment_count())
                .filter_map(|i| layout.segment_bytes(i))
                .map(|b| b - b % config.alignment)
                .max()
                .unwrap_or(0);
            prop_assert_eq!(layout.largest_free(), biggest);
            if let Some(first) = layout.segment_bytes(0) {
                let whole = first - first % config.alignment;
                prop_assert_eq!(
                    layout.alloc(whole),
                    Ok(Slot { segment: 0, offset: 0, bytes: whole.max(config.alignment) })
                );
            }
        }

        #[test]
        fn free_then_alloc_restores_state_and_offset(
            config in configs(),
            steps in steps(120),
            bytes in sizes(),
        ) {
            let mut layout = PoolLayout::new(config);
            run(&mut layout, &steps);
            make_room(&mut layout, bytes);
            let before = layout.clone();
            let slot = layout.alloc(bytes).expect("room was made");
            prop_assert_ne!(&layout, &before);
            prop_assert_eq!(layout.free(slot), Ok(()));
            prop_assert_eq!(&layout, &before);
            prop_assert_eq!(layout.alloc(bytes), Ok(slot));
        }

        #[test]
        fn bad_frees_are_errors_that_change_nothing(
            config in configs(),
            steps in steps(120),
            pick in any::<usize>(),
            bytes in sizes(),
        ) {
            let align = config.alignment;
            let mut layout = PoolLayout::new(config);
            let (_, live) = run(&mut layout, &steps);

            // Double free of a slot just freed.
            make_room(&mut layout, bytes);
            let slot = layout.alloc(bytes).expect("room was made");
            prop_assert_eq!(layout.free(slot), Ok(()));
            let snapshot = layout.clone();
            let err = layout.free(slot).expect_err("double free");
            prop_assert!(err.contains("double free"), "{}", err);
            prop_assert_eq!(&layout, &snapshot);

            // A segment that does not exist.
            let foreign = Slot { segment: layout.segment_count(), ..slot };
            let err = layout.free(foreign).expect_err("foreign segment");
            prop_assert!(err.contains("does not exist"), "{}", err);
            prop_assert_eq!(&layout, &snapshot);

            // Past the end of a segment.
            let past = Slot { offset: layout.segment_bytes(0).unwrap_or(0), ..slot };
            let past = Slot { segment: 0, ..past };
            let err = layout.free(past).expect_err("past the end");
            prop_assert!(err.contains("past the end"), "{}", err);
            prop_assert_eq!(&layout, &snapshot);

            if !live.is_empty() {
                let victim = live[pick % live.len()];
                // The right place, the wrong size.
                let wrong = Slot { bytes: victim.bytes + align, ..victim };
                let err = layout.free(wrong).expect_err("wrong size");
                prop_assert!(err.contains(&format!("holds {} B", victim.bytes)), "{}", err);
                prop_assert_eq!(&layout, &snapshot);
                // Inside a live slot, not at its start.
                if victim.bytes > align {
                    let inner = Slot { offset: victim.offset + align, bytes: align, ..victim };
                    let err = layout.free(inner).expect_err("inside a slot");
                    prop_assert!(err.contains("not at its start"), "{}", err);
                    prop_assert_eq!(&layout, &snapshot);
                }
                // The real slot still frees after all that.
                prop_assert_eq!(layout.free(victim), Ok(()));
                prop_assert_eq!(layout.in_use(), snapshot.in_use() - victim.bytes);
            }
        }
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert_eq!(PoolConfig::default().validate(), Ok(()));
        assert_eq!(small().validate(), Ok(()));
        for alignment in [0, 3, 96] {
            let err = PoolConfig {
                alignment,
                ..small()
            }
            .validate()
            .expect_err("bad alignment");
            assert!(err.contains("alignment must be a power of two"), "{err}");
        }
        for granularity in [0, 100, 4096 + 128] {
            let err = PoolConfig {
                granularity,
                ..small()
            }
            .validate()
            .expect_err("bad granularity");
            assert!(err.contains("granularity"), "{err}");
        }
        assert!(
            PoolLayout::try_new(PoolConfig {
                alignment: 0,
                ..small()
            })
            .is_err()
        );
    }

    #[test]
    #[should_panic(expected = "invalid PoolConfig")]
    fn new_rejects_an_invalid_config() {
        let _ = PoolLayout::new(PoolConfig {
            granularity: 0,
            ..small()
        });
    }

    #[test]
    fn segment_sizes_and_zero_byte_slots() {
        let mut layout = PoolLayout::new(small());
        assert_eq!(layout.segment_size_for(0), 16 << 10);
        assert_eq!(layout.segment_size_for(16 << 10), 16 << 10);
        assert_eq!(layout.segment_size_for((16 << 10) + 1), 20 << 10);
        assert_eq!(layout.segment_size_for(usize::MAX), usize::MAX);
        assert_eq!(
            layout.alloc(usize::MAX),
            Err(NeedSegment { bytes: usize::MAX })
        );
        assert_eq!(layout.alloc(1), Err(NeedSegment { bytes: 16 << 10 }));
        assert_eq!(layout.largest_free(), 0);
        assert_eq!(layout.add_segment(16 << 10), 0);
        let a = layout.alloc(0).expect("fits");
        let b = layout.alloc(0).expect("fits");
        let c = layout.alloc(257).expect("fits");
        assert_eq!(
            a,
            Slot {
                segment: 0,
                offset: 0,
                bytes: 256
            }
        );
        assert_eq!(
            b,
            Slot {
                segment: 0,
                offset: 256,
                bytes: 256
            }
        );
        assert_eq!(
            c,
            Slot {
                segment: 0,
                offset: 512,
                bytes: 512
            }
        );
        assert_eq!(layout.in_use(), 1024);
        assert_eq!(layout.capacity(), 16 << 10);
        assert_eq!(layout.largest_free(), (16 << 10) - 1024);
        // A hole at the front is reused first-fit; a larger request goes past it.
        layout.free(a).expect("live");
        assert_eq!(layout.alloc(300).expect("fits").offset, 1024);
        assert_eq!(layout.alloc(1).expect("fits").offset, 0);
        // A later segment is used only when the earlier ones cannot fit the request.
        assert_eq!(layout.add_segment(4 << 10), 1);
        let rest = (16 << 10) - 1536;
        assert_eq!(layout.largest_free(), rest);
        let fill = layout.alloc(rest).expect("fits in segment 0");
        assert_eq!((fill.segment, fill.offset), (0, 1536));
        let next = layout.alloc(2 << 10).expect("fits in segment 1");
        assert_eq!((next.segment, next.offset), (1, 0));
        assert_eq!(layout.alloc(4 << 10), Err(NeedSegment { bytes: 16 << 10 }));
        assert_eq!(layout.capacity(), 20 << 10);
        assert_eq!(layout.in_use(), (18 << 10));
    }
}
