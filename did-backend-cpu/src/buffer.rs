//! The CPU backend's buffer: its values, and, for parameters uploaded with
//! [`MemoryOps::upload_weights`](did_core::backend::MemoryOps::upload_weights) below f32, the
//! weight matrices as stored.

use std::sync::Arc;

use did_core::backend::{WeightFormat, WeightMatrix};

use crate::ops::stored::{int8, StoredMatrix};
use crate::{CpuError, CpuFloat};

/// A buffer of the CPU backend. It reads as its `Vec` of values ([`Deref`](core::ops::Deref)); a
/// parameter buffer with stored weights also holds its matrices in their format, and their
/// elements among the values are zeros that are never written, so their pages are never
/// allocated: an op that would read them as floats is refused instead ([`CpuError::Stored`]).
///
/// ```
/// use did_backend_cpu::{CpuBackend, CpuBuffer};
/// use did_core::backend::prelude::*;
/// let be = CpuBackend::new();
/// let buf: CpuBuffer<f32> = be.upload(&[1.0, 2.0])?;
/// assert_eq!(buf, [1.0, 2.0]);
/// assert_eq!(buf.len(), 2);
/// # Ok::<(), did_backend_cpu::CpuError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct CpuBuffer<T> {
    values: Vec<T>,
    stored: Option<Arc<StoredWeights>>,
}

/// Weight matrices stored below f32, sorted by offset.
#[derive(Debug)]
pub(crate) struct StoredWeights {
    pub(crate) format: WeightFormat,
    pub(crate) matrices: Vec<(WeightMatrix, StoredMatrix)>,
}

impl StoredWeights {
    /// The stored matrix that starts at `offset`.
    pub(crate) fn starting_at(&self, offset: usize) -> Option<&(WeightMatrix, StoredMatrix)> {
        let i = self.matrices.partition_point(|(m, _)| m.offset < offset);
        self.matrices.get(i).filter(|(m, _)| m.offset == offset)
    }

    /// A stored matrix with elements in `start..end`.
    pub(crate) fn overlapping(&self, start: usize, end: usize) -> Option<&WeightMatrix> {
        let i = self
            .matrices
            .partition_point(|(m, _)| m.range().end <= start);
        self.matrices
            .get(i)
            .map(|(m, _)| m)
            .filter(|m| start < end && m.offset < end)
    }
}

impl<T: CpuFloat> CpuBuffer<T> {
    /// `host`'s parameters with `matrices` stored in `format` (bf16 or int8; the backend uploads
    /// f32 weights plainly and never asks for them here).
    pub(crate) fn with_stored(
        host: &[f32],
        matrices: &[WeightMatrix],
        format: WeightFormat,
    ) -> Result<Self, CpuError> {
        let mut sorted = matrices.to_vec();
        sorted.sort_by_key(|m| m.offset);
        sorted.dedup();
        for pair in sorted.windows(2) {
            if pair[0].range().end > pair[1].offset {
                return Err(CpuError::Shape(format!(
                    "upload_weights: matrices at {} and {} overlap",
                    pair[0].offset, pair[1].offset
                )));
            }
        }
        if let Some(m) = sorted.iter().find(|m| m.range().end > host.len()) {
            return Err(CpuError::Shape(format!(
                "upload_weights: the {}×{} matrix at {} ends past the {} parameters",
                m.rows,
                m.cols,
                m.offset,
                host.len()
            )));
        }
        let as_int8 = match format {
            WeightFormat::Int8 => true,
            WeightFormat::Bf16 => false,
            WeightFormat::F32 => {
                return Err(CpuError::Shape(
                    "upload_weights: f32 weights are a plain upload, not stored matrices".into(),
                ))
            }
        };
        if as_int8 {
            if let Some(m) = sorted.iter().find(|m| m.cols > int8::MAX_COLS) {
                return Err(CpuError::Shape(format!(
                    "upload_weights: the {}×{} matrix at {} is wider than int8's dot products \
                     can sum exactly ({} columns); use bf16 or f32 weights for this model",
                    m.rows,
                    m.cols,
                    m.offset,
                    int8::MAX_COLS
                )));
            }
        }
        let stored: Vec<(WeightMatrix, StoredMatrix)> = sorted
            .iter()
            .map(|m| {
                let w = &host[m.range()];
                let s = if as_int8 {
                    StoredMatrix::int8(w, m.rows, m.cols)
                } else {
                    StoredMatrix::bf16(w, m.rows, m.cols)
                };
                (*m, s)
            })
            .collect();
        // Zeroed memory: the matrices' pages stay unallocated since nothing writes them.
        let mut values = vec![T::zero(); host.len()];
        let mut start = 0;
        let ends = core::iter::once(host.len()..host.len());
        for m in sorted.iter().map(WeightMatrix::range).chain(ends) {
            for (v, &h) in values[start..m.start].iter_mut().zip(&host[start..m.start]) {
                *v = T::of_f32(h);
            }
            start = m.end;
        }
        Ok(CpuBuffer {
            values,
            stored: Some(Arc::new(StoredWeights {
                format,
                matrices: stored,
            })),
        })
    }

    /// How its weight matrices are stored: f32 unless uploaded otherwise.
    pub fn weight_format(&self) -> WeightFormat {
        self.stored.as_ref().map_or(WeightFormat::F32, |s| s.format)
    }

    /// Bytes it holds: its values outside stored matrices, and the stored matrices.
    pub fn bytes(&self) -> usize {
        let size = core::mem::size_of::<T>();
        match &self.stored {
            None => size * self.values.len(),
            Some(s) => s
                .matrices
                .iter()
                .fold(size * self.values.len(), |b, (m, st)| {
                    b - size * m.rows * m.cols + st.bytes()
                }),
        }
    }
}

impl<T> CpuBuffer<T> {
    /// The stored weights, where the buffer has any.
    pub(crate) fn stored(&self) -> Option<&StoredWeights> {
        self.stored.as_deref()
    }
}

impl<T> From<Vec<T>> for CpuBuffer<T> {
    fn from(values: Vec<T>) -> Self {
        CpuBuffer {
            values,
            stored: None,
        }
    }
}

impl<T> core::ops::Deref for CpuBuffer<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.values
    }
}

impl<T> core::ops::DerefMut for CpuBuffer<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.values
    }
}

impl<T: PartialEq, const N: usize> PartialEq<[T; N]> for CpuBuffer<T> {
    fn eq(&self, other: &[T; N]) -> bool {
        self.values == other
    }
}

impl<T: PartialEq> PartialEq<Vec<T>> for CpuBuffer<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        &self.values == other
    }
}

impl<T: PartialEq> PartialEq for CpuBuffer<T> {
    fn eq(&self, other: &Self) -> bool {
        let same_storage = match (&self.stored, &other.stored) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same_storage && self.values == other.values
    }
}
