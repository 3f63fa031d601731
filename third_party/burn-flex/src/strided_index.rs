use crate::layout::Layout;
use alloc::vec;
use alloc::vec::Vec;

/// Iterator that yields linear indices for strided tensor access.
///
/// Handles non-contiguous tensors (including those with negative strides from flip)
/// by computing the correct storage index for each logical element position.
pub struct StridedIter<'a> {
    /// Current storage index (signed to handle negative strides)
    storage_index: isize,
    multi_index: Vec<usize>,
    layout: &'a Layout,
    remaining: usize,
}

impl<'a> StridedIter<'a> {
    /// Create a new strided iterator for the given layout.
    pub fn new(layout: &'a Layout) -> Self {
        let ndims = layout.num_dims();
        Self {
            storage_index: layout.start_offset() as isize,
            multi_index: vec![0; ndims],
            layout,
            remaining: layout.num_elements(),
        }
    }
}

impl Iterator for StridedIter<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }

        debug_assert!(
            self.storage_index >= 0,
            "StridedIter: negative storage index"
        );
        let idx = self.storage_index as usize;
        self.remaining -= 1;

        // Advance multi-index (last dimension first, like odometer)
        let shape = self.layout.shape();
        let strides = self.layout.strides();

        for d in (0..shape.num_dims()).rev() {
            self.multi_index[d] += 1;
            if self.multi_index[d] < shape[d] {
                self.storage_index += strides[d];
                break;
            }
            // Wrap around this dimension
            self.multi_index[d] = 0;
            self.storage_index -= (shape[d] as isize - 1) * strides[d];
        }

        Some(idx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedIter<'_> {}

/// pali patch: the rows of `N` layouts of one shape, walked a row at a time. Size-1 dims are
/// dropped and neighbouring dims merged where every layout is contiguous across them, so the
/// last (row) dim is as long as it can be; a caller loops over a row with its stride (1, or 0
/// for a broadcast operand) instead of paying [`StridedIter`]'s odometer per element.
pub(crate) struct Rows<const N: usize> {
    /// Sizes of the outer dims (all but the row dim), after merging.
    outer: Vec<usize>,
    /// Each layout's strides over the outer dims.
    strides: [Vec<isize>; N],
    offsets: [isize; N],
    /// Elements per row.
    pub row_len: usize,
    /// Each layout's stride along a row.
    pub row_strides: [isize; N],
}

impl<const N: usize> Rows<N> {
    /// `layouts`: each one's strides (over `shape`) and start offset.
    pub fn new(shape: &[usize], layouts: [(&[isize], isize); N]) -> Self {
        let mut dims: Vec<(usize, [isize; N])> = Vec::new();
        for (d, &size) in shape.iter().enumerate() {
            if size == 1 {
                continue;
            }
            let st: [isize; N] = core::array::from_fn(|i| layouts[i].0[d]);
            if let Some((s0, st0)) = dims.last_mut()
                && (0..N).all(|i| {
                    (size as isize)
                        .checked_mul(st[i])
                        .is_some_and(|run| st0[i] == run)
                })
            {
                *s0 *= size;
                *st0 = st;
                continue;
            }
            dims.push((size, st));
        }
        let (row_len, row_strides) = dims.pop().unwrap_or((1, [0; N]));
        let row_len = if shape.contains(&0) { 0 } else { row_len };
        Self {
            outer: dims.iter().map(|d| d.0).collect(),
            strides: core::array::from_fn(|i| dims.iter().map(|d| d.1[i]).collect()),
            offsets: core::array::from_fn(|i| layouts[i].1),
            row_len,
            row_strides,
        }
    }

    pub fn num_rows(&self) -> usize {
        self.outer.iter().product()
    }

    /// Calls `f` with the start offset of every row in `start..end`, in row-major order.
    pub fn for_each(&self, start: usize, end: usize, mut f: impl FnMut([isize; N])) {
        let nd = self.outer.len();
        let mut idx = vec![0usize; nd];
        let mut rest = start;
        for d in (0..nd).rev() {
            idx[d] = rest % self.outer[d];
            rest /= self.outer[d];
        }
        let mut off: [isize; N] = core::array::from_fn(|i| {
            self.offsets[i]
                + (0..nd)
                    .map(|d| idx[d] as isize * self.strides[i][d])
                    .sum::<isize>()
        });
        for _ in start..end {
            f(off);
            for d in (0..nd).rev() {
                idx[d] += 1;
                for (o, st) in off.iter_mut().zip(&self.strides) {
                    *o += st[d];
                }
                if idx[d] < self.outer[d] {
                    break;
                }
                idx[d] = 0;
                for (o, st) in off.iter_mut().zip(&self.strides) {
                    *o -= st[d] * self.outer[d] as isize;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_std::Shape;

    #[test]
    fn test_contiguous_iteration() {
        let layout = Layout::contiguous(Shape::from(vec![2, 3]));
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn test_transposed_iteration() {
        // Original: [[0, 1, 2], [3, 4, 5]] (shape [2, 3], strides [3, 1])
        // Transposed: [[0, 3], [1, 4], [2, 5]] (shape [3, 2], strides [1, 3])
        let layout = Layout::contiguous(Shape::from(vec![2, 3])).transpose(0, 1);
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn test_narrowed_iteration() {
        // Original: [[0, 1, 2, 3], [4, 5, 6, 7]] (shape [2, 4])
        // Narrowed dim=1, start=1, len=2: [[1, 2], [5, 6]]
        let layout = Layout::contiguous(Shape::from(vec![2, 4])).narrow(1, 1, 2);
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![1, 2, 5, 6]);
    }

    /// Rows visit the same storage indices as StridedIter, in the same order.
    fn rows_match_strided_iter(layout: &Layout) {
        let expected: Vec<usize> = StridedIter::new(layout).collect();
        let rows = Rows::new(
            layout.shape(),
            [(layout.strides(), layout.start_offset() as isize)],
        );
        let mut got = Vec::new();
        rows.for_each(0, rows.num_rows(), |[o]| {
            for j in 0..rows.row_len {
                got.push((o + j as isize * rows.row_strides[0]) as usize);
            }
        });
        assert_eq!(got, expected, "{layout:?}");
        // Starting in the middle gives the tail.
        let half = rows.num_rows() / 2;
        let mut tail = Vec::new();
        rows.for_each(half, rows.num_rows(), |[o]| tail.push(o));
        assert_eq!(tail.len(), rows.num_rows() - half);
        if let Some(&first) = tail.first()
            && rows.row_len > 0
        {
            assert_eq!(first as usize, expected[half * rows.row_len]);
        }
    }

    #[test]
    fn test_rows() {
        let base = Layout::contiguous(Shape::from(vec![2, 3, 4, 5]));
        rows_match_strided_iter(&base);
        rows_match_strided_iter(&base.transpose(1, 2));
        rows_match_strided_iter(&base.transpose(0, 3));
        rows_match_strided_iter(&base.narrow(2, 1, 2));
        rows_match_strided_iter(&base.narrow(3, 1, 3).transpose(1, 3));
        rows_match_strided_iter(&Layout::contiguous(Shape::from(vec![1, 7, 1])));
        rows_match_strided_iter(&Layout::contiguous(Shape::from(vec![3, 0, 2])));
    }
}
