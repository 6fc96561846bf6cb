//! Data-parallel ranks as threads of one process ([`InProcess`]): each thread trains with its own
//! backend, and the threads meet to sum gradients and broadcast state through shared memory. It
//! is how the data-parallel trainer is tested without GPUs (did-engine/tests/data_parallel.rs),
//! and it follows the rules every transport keeps (did-core's `collective` module): sums in rank
//! order, so every rank gets the same bits, and a rank that does not arrive within the timeout
//! is named in an error instead of hanging the others.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use did_core::backend::{Backend, Slice, SliceMut};
use did_core::collective::{Collective, CollectiveError, DataParallel};

/// One rank of a world of threads. Make the world with [`InProcess::world`] and move one into
/// each thread.
///
/// Works with backends that store f32 (the CPU backend): values travel through the host in f32.
///
/// ```
/// use did_core::collective::Collective;
/// use did_engine::collective::InProcess;
/// let ranks = InProcess::world(3, std::time::Duration::from_secs(10));
/// let sums: Vec<f64> = std::thread::scope(|s| {
///     let handles: Vec<_> = ranks
///         .into_iter()
///         .map(|mut rank| {
///             s.spawn(move || {
///                 let mut v = [rank.rank() as f64 + 1.0];
///                 Collective::<did_backend_cpu::CpuBackend>::all_reduce_host(&mut rank, &mut v).unwrap();
///                 v[0]
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert_eq!(sums, [6.0, 6.0, 6.0]);
/// ```
pub struct InProcess {
    place: DataParallel,
    shared: Arc<Shared>,
    timeout: Duration,
}

struct Shared {
    state: Mutex<Meeting>,
    changed: Condvar,
}

/// What the ranks exchange at one meeting, and who has arrived.
struct Meeting {
    /// Each rank's contribution to the current operation.
    slots: Vec<Vec<f64>>,
    /// Ranks that have arrived at the current phase.
    arrived: Vec<bool>,
    /// Counts completed phases, so that a rank waiting for one is not confused by the next.
    phase: u64,
}

impl InProcess {
    /// The ranks of a world of `world` threads, in rank order; an operation waits at most
    /// `timeout` for the other ranks.
    pub fn world(world: usize, timeout: Duration) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Meeting {
                slots: vec![Vec::new(); world],
                arrived: vec![false; world],
                phase: 0,
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                place: DataParallel { rank, world },
                shared: Arc::clone(&shared),
                timeout,
            })
            .collect()
    }

    /// This thread's rank.
    pub fn rank(&self) -> usize {
        self.place.rank
    }

    fn error(&self, message: String) -> CollectiveError {
        CollectiveError {
            rank: self.place.rank,
            message,
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Meeting>, CollectiveError> {
        self.shared
            .state
            .lock()
            .map_err(|_| self.error("another rank panicked during a collective operation".into()))
    }

    /// Waits until every rank has arrived at this phase (after `put` ran under the lock), then
    /// runs `take` under the lock; a second phase keeps the slots until every rank has read them.
    fn meet<T>(
        &self,
        what: &str,
        put: impl FnOnce(&mut Meeting),
        take: impl FnOnce(&Meeting) -> T,
    ) -> Result<T, CollectiveError> {
        let mut m = self.lock()?;
        put(&mut m);
        m = self.arrive(m, what)?;
        let out = take(&m);
        drop(self.arrive(m, what)?);
        Ok(out)
    }

    /// Marks this rank arrived and waits for the others; the last to arrive opens the next phase.
    fn arrive<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meeting>,
        what: &str,
    ) -> Result<MutexGuard<'a, Meeting>, CollectiveError> {
        let phase = m.phase;
        m.arrived[self.place.rank] = true;
        if m.arrived.iter().all(|&a| a) {
            m.arrived.iter_mut().for_each(|a| *a = false);
            m.phase += 1;
            self.shared.changed.notify_all();
            return Ok(m);
        }
        let deadline = Instant::now() + self.timeout;
        while m.phase == phase {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<usize> =
                    (0..self.place.world).filter(|&r| !m.arrived[r]).collect();
                return Err(self.error(format!(
                    "rank(s) {missing:?} did not reach the {what} within {:.0} s; a rank died or hangs: stop every rank and --resume from the last checkpoint",
                    self.timeout.as_secs_f64()
                )));
            }
            m = self
                .shared
                .changed
                .wait_timeout(m, left)
                .map_err(|_| {
                    self.error("another rank panicked during a collective operation".into())
                })?
                .0;
        }
        Ok(m)
    }

    /// Every rank's values summed in rank order.
    fn sum(&self, mine: Vec<f64>, what: &str) -> Result<Vec<f64>, CollectiveError> {
        let rank = self.place.rank;
        self.meet(
            what,
            |m| m.slots[rank] = mine,
            |m| {
                let mut acc = m.slots[0].clone();
                for other in &m.slots[1..] {
                    acc.iter_mut().zip(other).for_each(|(a, b)| *a += b);
                }
                acc
            },
        )
    }

    fn check_f32<B: Backend>(&self, be: &B) -> Result<(), CollectiveError> {
        if be.stores_below_f32() {
            return Err(self.error(format!(
                "InProcess moves f32 values; the {} backend stores below f32: use f32 storage",
                be.name()
            )));
        }
        Ok(())
    }
}

impl<B: Backend> Collective<B> for InProcess {
    fn place(&self) -> DataParallel {
        self.place
    }

    fn all_reduce_sum(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.check_f32(be)?;
        let start = range.start;
        let mine = read_range(be, buf, range).map_err(|m| self.error(m))?;
        let rank = self.place.rank;
        // f32 sums in rank order, as a single rank accumulating the same micro-batches adds them.
        let summed: Vec<f32> = self.meet(
            "gradient all-reduce",
            |m| m.slots[rank] = mine.iter().map(|&v| f64::from(v)).collect(),
            |m| {
                let mut acc: Vec<f32> = m.slots[0].iter().map(|&v| v as f32).collect();
                for other in &m.slots[1..] {
                    acc.iter_mut().zip(other).for_each(|(a, &b)| *a += b as f32);
                }
                acc
            },
        )?;
        write_range(be, buf, start, &summed).map_err(|m| self.error(m))
    }

    fn all_reduce_host(&mut self, values: &mut [f64]) -> Result<(), CollectiveError> {
        let summed = self.sum(values.to_vec(), "host all-reduce")?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    fn broadcast(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        len: usize,
        root: usize,
    ) -> Result<(), CollectiveError> {
        self.check_f32(be)?;
        let rank = self.place.rank;
        let mine = if rank == root {
            read_range(be, buf, 0..len)
                .map_err(|m| self.error(m))?
                .iter()
                .map(|&v| f64::from(v))
                .collect()
        } else {
            Vec::new()
        };
        let values: Vec<f32> = self.meet(
            "broadcast",
            |m| m.slots[rank] = mine,
            |m| m.slots[root].iter().map(|&v| v as f32).collect(),
        )?;
        if rank != root {
            write_range(be, buf, 0, &values).map_err(|m| self.error(m))?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.meet("barrier", |_| (), |_| ())
    }
}

/// `buf[range]` on the host, for the collectives that sum on the host.
pub(crate) fn read_range<B: Backend>(
    be: &B,
    buf: &B::Buffer,
    range: Range<usize>,
) -> Result<Vec<f32>, String> {
    let mut host = vec![0.0f32; range.len()];
    be.download(Slice::at(buf, range.start), &mut host)
        .map_err(|e| format!("cannot read the gradients: {e}"))?;
    Ok(host)
}

/// Writes `values` into `buf` from element `start` on.
pub(crate) fn write_range<B: Backend>(
    be: &B,
    buf: &mut B::Buffer,
    start: usize,
    values: &[f32],
) -> Result<(), String> {
    let staged = be
        .upload(values)
        .map_err(|e| format!("cannot write the gradients: {e}"))?;
    be.copy(
        Slice::whole(&staged),
        SliceMut::at(buf, start),
        values.len(),
    )
    .map_err(|e| format!("cannot write the gradients: {e}"))
}
