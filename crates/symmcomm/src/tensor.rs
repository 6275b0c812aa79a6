//! Tensor views: a dtype, a shape and strides over a buffer, and the shape arithmetic of
//! gathering and scattering along a dimension.

use std::fmt;
use std::sync::Arc;

use crate::buffer::Buffer;
use crate::dtype::DType;

/// Shape, strides (in elements) and starting offset (in elements) of a view.
#[derive(Clone, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl fmt::Debug for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} strides {:?} +{}",
            self.shape, self.strides, self.offset
        )
    }
}

impl Layout {
    /// A row-major contiguous layout of `shape` starting at element 0.
    pub fn contiguous(shape: &[usize]) -> Self {
        let mut strides = vec![0; shape.len()];
        let mut acc = 1;
        for (s, &d) in strides.iter_mut().zip(shape).rev() {
            *s = acc;
            acc *= d;
        }
        Layout {
            shape: shape.to_vec(),
            strides,
            offset: 0,
        }
    }

    /// A view of `shape` with `strides` (in elements) from element 0; `None` when the two
    /// differ in length.
    pub fn strided(shape: &[usize], strides: &[usize]) -> Option<Self> {
        (shape.len() == strides.len()).then(|| Layout {
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            offset: 0,
        })
    }

    /// Dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// First element's index in the buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the view covers `numel` consecutive elements in row-major order.
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect *= d;
        }
        true
    }

    /// Index one past the last element the view can touch (0 for an empty view).
    pub fn end(&self) -> usize {
        if self.numel() == 0 {
            return self.offset;
        }
        self.offset
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// The view restricted to `start..start + len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Option<Layout> {
        if dim >= self.shape.len() || start + len > self.shape[dim] {
            return None;
        }
        let mut l = self.clone();
        l.offset += start * self.strides[dim];
        l.shape[dim] = len;
        Some(l)
    }

    /// The view with dimensions `a` and `b` swapped (not contiguous in general).
    pub fn transpose(&self, a: usize, b: usize) -> Option<Layout> {
        if a >= self.shape.len() || b >= self.shape.len() {
            return None;
        }
        let mut l = self.clone();
        l.shape.swap(a, b);
        l.strides.swap(a, b);
        Some(l)
    }

    /// The same elements with another shape; only for contiguous views.
    pub fn reshape(&self, shape: &[usize]) -> Option<Layout> {
        if !self.is_contiguous() || shape.iter().product::<usize>() != self.numel() {
            return None;
        }
        let mut l = Layout::contiguous(shape);
        l.offset = self.offset;
        Some(l)
    }
}

/// How a gather or scatter along `dim` of a contiguous tensor decomposes into flat pieces:
/// the tensor is `[outer, dim_len, inner]` with `outer` the product of the dimensions before
/// `dim` and `inner` the product of those after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "lab"), allow(unreachable_pub))]
pub struct DimSplit {
    /// Product of the dimensions before `dim`.
    pub outer: usize,
    /// Length of `dim` in the per-rank piece (the smaller tensor).
    pub piece: usize,
    /// Product of the dimensions after `dim`.
    pub inner: usize,
}

#[cfg_attr(not(feature = "lab"), allow(unreachable_pub))]
impl DimSplit {
    /// Decompose `shape` (the per-rank piece) around `dim`.
    pub fn of(shape: &[usize], dim: usize) -> Option<DimSplit> {
        if dim >= shape.len() {
            return None;
        }
        Some(DimSplit {
            outer: shape[..dim].iter().product(),
            piece: shape[dim],
            inner: shape[dim + 1..].iter().product(),
        })
    }

    /// Elements in one rank's piece.
    pub fn piece_elems(&self) -> usize {
        self.outer * self.piece * self.inner
    }

    /// Whether the along-dim operation is already the flat one (no reordering needed):
    /// true when every dimension before `dim` has length 1.
    pub fn is_flat(&self) -> bool {
        self.outer == 1
    }
}

/// A view of a buffer: dtype, layout and the buffer it reads. Cloning is cheap and shares
/// the memory (like a device pointer); collectives write through shared references.
#[derive(Clone)]
pub struct Tensor {
    pub(crate) buf: Arc<Buffer>,
    pub(crate) dtype: DType,
    pub(crate) layout: Layout,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({} {:?} on {})",
            self.dtype, self.layout, self.buf
        )
    }
}

impl Tensor {
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dimensions.
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }

    /// Layout (shape, strides, offset).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }

    /// Bytes covered by the view's elements.
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Whether the view is contiguous.
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// Whether the memory lies in a symmetric window.
    pub fn is_symmetric(&self) -> bool {
        self.buf.is_symmetric()
    }

    /// The narrower view `start..start+len` along `dim`, or `None` when out of range.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Option<Tensor> {
        Some(Tensor {
            buf: self.buf.clone(),
            dtype: self.dtype,
            layout: self.layout.narrow(dim, start, len)?,
        })
    }

    /// The view with two dimensions swapped.
    pub fn transpose(&self, a: usize, b: usize) -> Option<Tensor> {
        Some(Tensor {
            buf: self.buf.clone(),
            dtype: self.dtype,
            layout: self.layout.transpose(a, b)?,
        })
    }

    /// The same contiguous elements under another shape.
    pub fn reshape(&self, shape: &[usize]) -> Option<Tensor> {
        Some(Tensor {
            buf: self.buf.clone(),
            dtype: self.dtype,
            layout: self.layout.reshape(shape)?,
        })
    }

    /// Byte offset of the view's first element inside its buffer.
    pub(crate) fn byte_offset(&self) -> usize {
        self.layout.offset() * self.dtype.size()
    }

    /// Device (or host) address of the view's first element.
    pub fn addr(&self) -> u64 {
        self.buf.addr() + self.byte_offset() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        let l = Layout::contiguous(&[2, 3, 4]);
        assert!(l.is_contiguous());
        assert_eq!(l.strides(), &[12, 4, 1]);
        assert_eq!(l.end(), 24);
        let t = l.transpose(0, 2).unwrap();
        assert!(!t.is_contiguous());
        let n = l.narrow(1, 1, 2).unwrap();
        assert!(!n.is_contiguous());
        assert_eq!(n.offset(), 4);
        // Narrowing the outermost dimension stays contiguous.
        let o = l.narrow(0, 1, 1).unwrap();
        assert!(o.is_contiguous());
        assert_eq!(o.offset(), 12);
        assert!(l.reshape(&[6, 4]).is_some());
        assert!(t.reshape(&[24]).is_none());
    }

    #[test]
    fn dim_split() {
        let s = DimSplit::of(&[2, 3, 4], 1).unwrap();
        assert_eq!((s.outer, s.piece, s.inner), (2, 3, 4));
        assert!(!s.is_flat());
        assert!(DimSplit::of(&[2, 3, 4], 0).unwrap().is_flat());
        assert!(DimSplit::of(&[2], 1).is_none());
    }
}
