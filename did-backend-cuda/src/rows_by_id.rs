//! A batch's rows grouped by token id, for the embedding backward: the kernel gives each
//! distinct id one block and adds its rows in order, so the sum is the CPU's, without atomics,
//! and all ids run in parallel (a single thread per column walking every row was
//! latency-bound: milliseconds per training step).

/// Rows grouped by id: group `g` is id `ids[g]`, with rows `rows[start[g]..start[g + 1]]`,
/// increasing; groups in increasing id.
///
/// ```
/// use did_backend_cuda::rows_by_id::RowsById;
/// let g = RowsById::new(&[5, 2, 5, 0, 2, 5], 8);
/// assert_eq!(g.ids, [0, 2, 5]);
/// assert_eq!(g.start, [0, 1, 3, 6]);
/// assert_eq!(g.rows, [3, 1, 4, 0, 2, 5]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowsById {
    /// Where each group's rows begin in `rows`, and one past the last group.
    pub start: Vec<u32>,
    /// The distinct ids, increasing.
    pub ids: Vec<u32>,
    /// Row indices, grouped.
    pub rows: Vec<u32>,
}

impl RowsById {
    /// Groups `ids` (each below `table_rows`, checked by the caller) in one counting pass.
    pub fn new(ids: &[u32], table_rows: usize) -> Self {
        let mut next = vec![0u32; table_rows];
        for &id in ids {
            next[id as usize] += 1;
        }
        let mut grouped = RowsById::default();
        let mut offset = 0u32;
        for (id, slot) in next.iter_mut().enumerate() {
            if *slot > 0 {
                grouped.ids.push(id as u32);
                grouped.start.push(offset);
                let count = *slot;
                *slot = offset;
                offset += count;
            }
        }
        grouped.start.push(offset);
        grouped.rows = vec![0; ids.len()];
        for (row, &id) in ids.iter().enumerate() {
            let at = &mut next[id as usize];
            grouped.rows[*at as usize] = row as u32;
            *at += 1;
        }
        grouped
    }

    /// `start`, `ids` and `rows` end to end: what the kernel reads, in one upload.
    pub fn words(&self) -> Vec<u32> {
        [&self.start[..], &self.ids, &self.rows].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    quickcheck! {
        fn every_row_once_in_its_ids_group_in_order(ids: Vec<u8>) -> bool {
            let ids: Vec<u32> = ids.into_iter().map(u32::from).collect();
            let g = RowsById::new(&ids, 256);
            let mut seen = vec![false; ids.len()];
            let groups_ok = (0..g.ids.len()).all(|k| {
                let rows = &g.rows[g.start[k] as usize..g.start[k + 1] as usize];
                !rows.is_empty()
                    && rows.windows(2).all(|w| w[0] < w[1])
                    && rows.iter().all(|&r| {
                        let fresh = !seen[r as usize];
                        seen[r as usize] = true;
                        fresh && ids[r as usize] == g.ids[k]
                    })
            });
            groups_ok
                && seen.iter().all(|&s| s)
                && g.ids.windows(2).all(|w| w[0] < w[1])
                && g.start.len() == g.ids.len() + 1
                && g.words().len() == 2 * g.ids.len() + 1 + ids.len()
        }
    }
}
