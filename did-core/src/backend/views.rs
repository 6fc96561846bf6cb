//! Views into buffers: [`Slice`], [`SliceMut`], and the row layouts ([`RowMajor`], [`RowGroups`]) that ops take.

/// A read-only view: a buffer and the element offset where the tensor starts.
#[derive(Debug)]
pub struct Slice<'a, T: ?Sized> {
    /// The buffer.
    pub buf: &'a T,
    /// The first element.
    pub offset: usize,
}

impl<T: ?Sized> Clone for Slice<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for Slice<'_, T> {}

/// A writable view: a buffer and the element offset where the tensor starts.
#[derive(Debug)]
pub struct SliceMut<'a, T: ?Sized> {
    /// The buffer.
    pub buf: &'a mut T,
    /// The first element.
    pub offset: usize,
}

impl<'a, T: ?Sized> Slice<'a, T> {
    /// The whole buffer from element 0.
    pub fn whole(buf: &'a T) -> Self {
        Slice { buf, offset: 0 }
    }
    /// The same buffer from `offset` further on.
    pub fn at(buf: &'a T, offset: usize) -> Self {
        Slice { buf, offset }
    }
}

impl<'a, T: ?Sized> SliceMut<'a, T> {
    /// The whole buffer from element 0.
    pub fn whole(buf: &'a mut T) -> Self {
        SliceMut { buf, offset: 0 }
    }
    /// The same buffer from `offset` further on.
    pub fn at(buf: &'a mut T, offset: usize) -> Self {
        SliceMut { buf, offset }
    }
}

/// A row-major `[rows, cols]` matrix whose rows start `stride ≥ cols` elements apart: the
/// output head's logits, laid out with the row stride its backend's GEMMs read fastest
/// ([`MemoryOps::padded_row_stride`](crate::backend::MemoryOps::padded_row_stride)). The `stride − cols` elements after each row are never
/// read as values and may hold anything.
///
/// ```
/// use did_core::backend::RowMajor;
/// let logits = RowMajor::padded(3, 50_258, 50_304);
/// assert_eq!(logits.extent(), 2 * 50_304 + 50_258);
/// assert_eq!(RowMajor::dense(3, 5).extent(), 15);
/// assert_eq!(RowMajor::dense(0, 5).extent(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMajor {
    /// Rows.
    pub rows: usize,
    /// Elements of a row that hold values.
    pub cols: usize,
    /// Elements from one row's start to the next's (≥ `cols`).
    pub stride: usize,
}

impl RowMajor {
    /// Rows stored back to back (`stride = cols`).
    pub fn dense(rows: usize, cols: usize) -> Self {
        RowMajor {
            rows,
            cols,
            stride: cols,
        }
    }

    /// Rows `stride` elements apart; a stride below `cols` is taken as `cols`.
    pub fn padded(rows: usize, cols: usize, stride: usize) -> Self {
        RowMajor {
            rows,
            cols,
            stride: stride.max(cols),
        }
    }

    /// Elements the matrix spans from its offset: `(rows − 1) · stride + cols`, 0 when empty.
    pub fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.stride + self.cols
        }
    }
}

/// Where a grouped row copy reads and writes: `groups` groups of `rows` rows of
/// `cols` elements; row `r` of group `g` starts `g · group_stride + r · stride`
/// elements from the slice's offset, on each side with its own strides. One
/// call moves a whole batch (every sequence's keys into its KV-cache slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGroups {
    /// Groups (sequences).
    pub groups: usize,
    /// Rows per group.
    pub rows: usize,
    /// Elements per row.
    pub cols: usize,
    /// Source elements between rows.
    pub src_stride: usize,
    /// Source elements between groups.
    pub src_group_stride: usize,
    /// Destination elements between rows.
    pub dst_stride: usize,
    /// Destination elements between groups.
    pub dst_group_stride: usize,
}

impl RowGroups {
    /// One group of `rows` rows (what [`MemoryOps::copy_rows`](crate::backend::MemoryOps::copy_rows) moves).
    ///
    /// ```
    /// use did_core::backend::RowGroups;
    /// let r = RowGroups::rows(3, 2, 5, 4);
    /// assert_eq!((r.groups, r.src_extent(), r.dst_extent()), (1, 12, 10));
    /// ```
    pub fn rows(rows: usize, cols: usize, src_stride: usize, dst_stride: usize) -> Self {
        RowGroups {
            groups: 1,
            rows,
            cols,
            src_stride,
            src_group_stride: 0,
            dst_stride,
            dst_group_stride: 0,
        }
    }

    /// Elements the source spans from its offset (0 when nothing moves).
    ///
    /// ```
    /// use did_core::backend::RowGroups;
    /// // 4 new tokens of 2 sequences, keys at column 8 of a fused [2, 4, 24] qkv buffer.
    /// let r = RowGroups { groups: 2, rows: 4, cols: 8, src_stride: 24,
    ///     src_group_stride: 4 * 24, dst_stride: 8, dst_group_stride: 16 * 8 };
    /// assert_eq!(r.src_extent(), 96 + 3 * 24 + 8);
    /// assert_eq!(r.dst_extent(), 128 + 3 * 8 + 8);
    /// ```
    pub fn src_extent(&self) -> usize {
        self.extent(self.src_stride, self.src_group_stride)
    }

    /// Elements the destination spans from its offset (0 when nothing moves).
    pub fn dst_extent(&self) -> usize {
        self.extent(self.dst_stride, self.dst_group_stride)
    }

    /// Elements moved.
    pub fn elements(&self) -> usize {
        self.groups * self.rows * self.cols
    }

    fn extent(&self, stride: usize, group_stride: usize) -> usize {
        if self.elements() == 0 {
            0
        } else {
            (self.groups - 1) * group_stride + (self.rows - 1) * stride + self.cols
        }
    }
}
