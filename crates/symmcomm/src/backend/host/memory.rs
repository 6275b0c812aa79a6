//! Host memory that several rank threads may read at once: words of relaxed atomics, so that
//! a peer reading a window while its owner writes elsewhere in it is never a data race.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::Memory;

/// Zero-initialised host bytes stored as atomic words.
#[derive(Debug)]
pub(crate) struct HostMemory {
    words: Box<[AtomicU64]>,
    len: usize,
}

impl HostMemory {
    pub(crate) fn new(len: usize) -> Self {
        let words = (0..len.div_ceil(8)).map(|_| AtomicU64::new(0)).collect();
        HostMemory { words, len }
    }

    /// Copy `out.len()` bytes starting at `offset` into `out`.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len, "host read out of bounds");
        let mut pos = offset;
        let mut done = 0;
        while done < out.len() {
            let w = pos / 8;
            let b = pos % 8;
            let take = (8 - b).min(out.len() - done);
            let bytes = self.words[w].load(Ordering::Relaxed).to_le_bytes();
            out[done..done + take].copy_from_slice(&bytes[b..b + take]);
            done += take;
            pos += take;
        }
    }

    /// Copy `data` into the bytes starting at `offset`.
    pub(crate) fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "host write out of bounds");
        let mut pos = offset;
        let mut done = 0;
        while done < data.len() {
            let w = pos / 8;
            let b = pos % 8;
            let take = (8 - b).min(data.len() - done);
            if take == 8 {
                let v = u64::from_le_bytes(data[done..done + 8].try_into().expect("8 bytes"));
                self.words[w].store(v, Ordering::Relaxed);
            } else {
                let mut val = [0u8; 8];
                let mut mask = [0u8; 8];
                val[b..b + take].copy_from_slice(&data[done..done + take]);
                mask[b..b + take].fill(0xFF);
                let (val, mask) = (u64::from_le_bytes(val), u64::from_le_bytes(mask));
                // A read-modify-write that keeps the other bytes of the word.
                let _ = self.words[w].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                    Some((old & !mask) | val)
                });
            }
            done += take;
            pos += take;
        }
    }
}

/// Byte access to host memory of either kind.
pub(crate) trait HostBytes {
    /// Copy `out.len()` bytes starting at `offset` into `out`.
    fn read(&self, offset: usize, out: &mut [u8]);
    /// Copy `data` into the bytes starting at `offset`.
    fn write(&self, offset: usize, data: &[u8]);
    /// Set `len` bytes at `offset` to `byte`.
    fn fill(&self, offset: usize, len: usize, byte: u8) {
        const CHUNK: usize = 1 << 16;
        let buf = vec![byte; CHUNK.min(len)];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write(offset + done, &buf[..n]);
            done += n;
        }
    }
    /// A copy of `len` bytes at `offset`.
    fn to_vec(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(offset, &mut v);
        v
    }
}

impl HostBytes for HostMemory {
    fn read(&self, offset: usize, out: &mut [u8]) {
        HostMemory::read(self, offset, out)
    }
    fn write(&self, offset: usize, data: &[u8]) {
        HostMemory::write(self, offset, data)
    }
}

/// Host memory an engine owns (a NumPy array's buffer, say), used in place. Only this rank's
/// thread touches it: peers read windows, never foreign memory.
#[derive(Debug)]
pub(crate) struct ForeignHost {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
}

impl ForeignHost {
    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "foreign host access out of bounds"
        );
    }
}

impl HostBytes for ForeignHost {
    fn read(&self, offset: usize, out: &mut [u8]) {
        self.check(offset, out.len());
        // SAFETY: `Group::wrap_raw`'s contract: `len` bytes from `ptr` are valid while work
        // uses them; the range was checked above, and `out` is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.ptr as usize + offset) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }
    fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: as for `read`; `copy` allows the source to overlap the destination.
        unsafe {
            std::ptr::copy(
                data.as_ptr(),
                (self.ptr as usize + offset) as *mut u8,
                data.len(),
            )
        }
    }
}

impl Memory for ForeignHost {
    fn addr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// SAFETY: the pointer is plain host memory the engine keeps valid (see `read`); the struct only
// carries its address.
unsafe impl Send for ForeignHost {}
// SAFETY: as for `Send`.
unsafe impl Sync for ForeignHost {}

impl Memory for HostMemory {
    fn addr(&self) -> u64 {
        self.words.as_ptr() as u64
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_writes_keep_neighbours() {
        let m = HostMemory::new(37);
        let data: Vec<u8> = (0..37).map(|i| i as u8 + 1).collect();
        m.write(0, &data);
        m.write(3, &[200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210]);
        let got = m.to_vec(0, 37);
        let mut want = data.clone();
        want[3..14].copy_from_slice(&[200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210]);
        assert_eq!(got, want);
        assert_eq!(m.to_vec(5, 3), vec![202, 203, 204]);
        m.fill(30, 7, 0xAB);
        assert_eq!(
            m.to_vec(29, 8),
            vec![30, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB]
        );
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn bounds_are_checked() {
        HostMemory::new(8).write(4, &[0; 5]);
    }
}
