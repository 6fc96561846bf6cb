//! The ranks' sums over the rendezvous's TCP connections, for backends without NCCL (the CPU):
//! every rank sends its values to rank 0, which adds them in rank order and sends the sum back,
//! so every rank gets the same bits. Values travel in f32 (device buffers) or f64 (host values),
//! each message a u64 LE length then the bytes. A rank that stops answering for `timeout`, or
//! whose connection closes, is named in the error on the ranks that wait for it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::time::Duration;

use did_core::backend::Backend;
use did_core::collective::{Collective, CollectiveError, DataParallel};

use super::Session;
use crate::collective::{read_range, write_range};

/// One rank's side of the sums, over a [`Session`].
#[derive(Debug)]
pub struct TcpCollective {
    session: Session,
    /// Ranges started this step, summed together when the step finishes its sums.
    pending: Vec<Range<usize>>,
}

impl TcpCollective {
    /// Sums over `session`'s connections; a rank silent for `timeout` is an error.
    pub fn new(session: Session, timeout: Duration) -> Result<Self, CollectiveError> {
        let rank = session.place.rank;
        for s in session.peers.iter().flatten() {
            s.set_read_timeout(Some(timeout))
                .and_then(|()| s.set_nodelay(true))
                .map_err(|e| CollectiveError {
                    rank,
                    message: format!("cannot set up a connection: {e}"),
                })?;
        }
        Ok(TcpCollective {
            session,
            pending: Vec::new(),
        })
    }

    /// Sums `buf`'s ranges over the ranks in one exchange.
    fn sum_ranges<B: Backend>(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        ranges: &[Range<usize>],
    ) -> Result<(), CollectiveError> {
        if be.stores_below_f32() {
            return Err(self.error(format!(
                "the TCP sums move f32 values; the {} backend stores below f32",
                be.name()
            )));
        }
        let mut host = Vec::new();
        for r in ranges {
            host.extend(read_range(be, buf, r.clone()).map_err(|m| self.error(m))?);
        }
        let sum =
            bytes_to_f32s(&self.sum_bytes(f32s_to_bytes(&host), "gradient all-reduce", add_f32)?);
        let mut at = 0;
        for r in ranges {
            write_range(be, buf, r.start, &sum[at..at + r.len()]).map_err(|m| self.error(m))?;
            at += r.len();
        }
        Ok(())
    }

    fn error(&self, message: String) -> CollectiveError {
        CollectiveError {
            rank: self.session.place.rank,
            message,
        }
    }

    fn stream(&mut self, rank: usize) -> Result<&mut TcpStream, CollectiveError> {
        let me = self.session.place.rank;
        self.session.peers[rank]
            .as_mut()
            .ok_or_else(|| CollectiveError {
                rank: me,
                message: format!("no connection to rank {rank}"),
            })
    }

    fn send(&mut self, to: usize, bytes: &[u8]) -> Result<(), CollectiveError> {
        let s = self.stream(to)?;
        let sent = s
            .write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|()| s.write_all(bytes));
        sent.map_err(|e| {
            self.error(format!(
                "rank {to} left (its process ended?): {e}; stop every rank and --resume"
            ))
        })
    }

    /// The next message from rank `from`, which must hold `expected` bytes (both sides know the
    /// size of what they exchange; a length that differs is not allocated).
    fn receive(
        &mut self,
        from: usize,
        what: &str,
        expected: usize,
    ) -> Result<Vec<u8>, CollectiveError> {
        let s = self.stream(from)?;
        let mut len = [0u8; 8];
        let got = s.read_exact(&mut len).and_then(|()| {
            let len = u64::from_le_bytes(len);
            if len != expected as u64 {
                return Err(std::io::Error::other(format!(
                    "it sent {len} bytes where {expected} were due: the ranks run different models or versions of did"
                )));
            }
            let mut body = vec![0u8; expected];
            s.read_exact(&mut body).map(|()| body)
        });

        got.map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "did not answer in time (it hangs, or is far behind)",
                std::io::ErrorKind::Other => "broke the protocol",
                _ => "left (its process ended?)",
            };
            self.error(format!("rank {from} {why} during the {what}: {e}; stop every rank and --resume from the last checkpoint"))
        })
    }

    /// Every rank's values summed in rank order by rank 0, with `add` on values of `width` bytes.
    fn sum_bytes(
        &mut self,
        mine: Vec<u8>,
        what: &str,
        add: fn(&mut [u8], &[u8]),
    ) -> Result<Vec<u8>, CollectiveError> {
        let place = self.session.place.clone();
        if place.world == 1 {
            return Ok(mine);
        }
        if place.rank != 0 {
            let expected = mine.len();
            self.send(0, &mine)?;
            return self.receive(0, what, expected);
        }
        let mut acc = mine;
        for r in 1..place.world {
            let theirs = self.receive(r, what, acc.len())?;
            add(&mut acc, &theirs);
        }
        for r in 1..place.world {
            self.send(r, &acc)?;
        }
        Ok(acc)
    }
}

fn f32s_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_to_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn add_f32(acc: &mut [u8], other: &[u8]) {
    for (a, o) in acc.chunks_exact_mut(4).zip(other.chunks_exact(4)) {
        let s = f32::from_le_bytes([a[0], a[1], a[2], a[3]])
            + f32::from_le_bytes([o[0], o[1], o[2], o[3]]);
        a.copy_from_slice(&s.to_le_bytes());
    }
}

fn add_f64(acc: &mut [u8], other: &[u8]) {
    for (a, o) in acc.chunks_exact_mut(8).zip(other.chunks_exact(8)) {
        let x = f64::from_le_bytes(a.try_into().unwrap_or([0; 8]));
        let y = f64::from_le_bytes(o.try_into().unwrap_or([0; 8]));
        a.copy_from_slice(&(x + y).to_le_bytes());
    }
}

impl<B: Backend> Collective<B> for TcpCollective {
    fn place(&self) -> DataParallel {
        DataParallel {
            rank: self.session.place.rank,
            world: self.session.place.world,
        }
    }

    fn all_reduce_sum(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.sum_ranges(be, buf, &[range])
    }

    /// Queues the range: a CPU backend has nothing to overlap with, so the step's buckets
    /// travel together in [`finish_sums`](Collective::finish_sums), one exchange per step.
    fn start_sum(
        &mut self,
        _: &B,
        _: &mut B::Buffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.pending.push(range);
        Ok(())
    }

    fn finish_sums(&mut self, be: &B, buf: &mut B::Buffer) -> Result<(), CollectiveError> {
        let ranges = std::mem::take(&mut self.pending);
        if ranges.is_empty() {
            return Ok(());
        }
        self.sum_ranges(be, buf, &ranges)
    }

    fn all_reduce_host(&mut self, values: &mut [f64]) -> Result<(), CollectiveError> {
        let mine: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let sum = self.sum_bytes(mine, "host all-reduce", add_f64)?;
        for (v, c) in values.iter_mut().zip(sum.chunks_exact(8)) {
            *v = f64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
        Ok(())
    }

    fn broadcast(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        len: usize,
        root: usize,
    ) -> Result<(), CollectiveError> {
        let place = self.session.place.clone();
        if place.world == 1 {
            return Ok(());
        }
        // Through rank 0: the root's values go to it, then from it to every other rank.
        let values = if place.rank == root {
            let host = read_range(be, buf, 0..len).map_err(|m| self.error(m))?;
            Some(f32s_to_bytes(&host))
        } else {
            None
        };
        let values = match (place.rank, root) {
            (0, 0) => values,
            (0, _) => Some(self.receive(root, "broadcast", 4 * len)?),
            (me, _) if me == root => {
                self.send(0, values.as_deref().unwrap_or_default())?;
                values
            }
            _ => None,
        };
        let values = if place.rank == 0 {
            let v = values.unwrap_or_default();
            for r in (1..place.world).filter(|&r| r != root) {
                self.send(r, &v)?;
            }
            v
        } else if place.rank == root {
            return Ok(());
        } else {
            self.receive(0, "broadcast", 4 * len)?
        };
        write_range(be, buf, 0, &bytes_to_f32s(&values)).map_err(|m| self.error(m))
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.sum_bytes(Vec::new(), "barrier", add_f64).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{rendezvous, Placement};
    use did_backend_cpu::CpuBackend;
    use did_core::backend::{MemoryOps, Slice};

    #[test]
    fn sums_and_broadcasts_reach_every_rank_alike() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let results: Vec<(Vec<f32>, Vec<f32>, f64)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let place = Placement {
                            rank,
                            world: 3,
                            local_rank: rank,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                        };
                        let session = rendezvous(&place, b"", Duration::from_secs(10)).unwrap();
                        let mut comm =
                            TcpCollective::new(session, Duration::from_secs(10)).unwrap();
                        let be = CpuBackend::new();
                        let mut grads =
                            be.upload(&[rank as f32 + 0.5, 1e-8 * rank as f32]).unwrap();
                        Collective::<CpuBackend>::all_reduce_sum(&mut comm, &be, &mut grads, 0..2)
                            .unwrap();
                        let mut weights = be.upload(&[rank as f32; 3]).unwrap();
                        Collective::<CpuBackend>::broadcast(&mut comm, &be, &mut weights, 3, 2)
                            .unwrap();
                        let mut loss = [rank as f64];
                        Collective::<CpuBackend>::all_reduce_host(&mut comm, &mut loss).unwrap();
                        let mut out = ([0.0f32; 2], [0.0f32; 3]);
                        be.download(Slice::whole(&grads), &mut out.0).unwrap();
                        be.download(Slice::whole(&weights), &mut out.1).unwrap();
                        (out.0.to_vec(), out.1.to_vec(), loss[0])
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let sum = ((0.5f32 + 1.5) + 2.5, (0.0f32 + 1e-8) + 2e-8);
        for (grads, weights, loss) in results {
            assert_eq!(grads, [sum.0, sum.1]);
            assert_eq!(weights, [2.0; 3]);
            assert_eq!(loss, 3.0);
        }
    }
}
