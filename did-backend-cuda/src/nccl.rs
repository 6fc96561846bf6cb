//! Data-parallel sums between GPUs through NCCL ([`NcclCollective`], did-core's `Collective`):
//! one communicator per process and device, made from the unique id rank 0 creates
//! ([`nccl_unique_id`]) and the rendezvous hands to every rank (docs/training.md).
//!
//! Every operation runs on the collective's own stream, after the work the backend's stream had
//! queued when it was started. A gradient bucket's sum (`start_sum`) is only queued, so it runs
//! while the backend's stream computes the layers below it; `finish_sums` makes the backend's
//! stream wait for the sums before the gradient norm reads them (docs/training.md, "Overlapping
//! the sums"). Waits are watched: the host polls an event recorded after the operation and NCCL's
//! asynchronous error, and when the operation has not finished within the timeout, or NCCL
//! reports an error (a peer died), the communicator is aborted, which unblocks this rank, and the
//! error says so. NCCL's sum is deterministic for a given world size, topology and NCCL version
//! (one algorithm and protocol chosen the same way every run; `NCCL_ALGO=Ring NCCL_PROTO=Simple`
//! pins them), and every rank receives the same bits.
//!
//! Buffers are summed in their storage precision (f32, or bf16 on a bf16 backend, as PyTorch's
//! DDP does); host values in f64.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaStream, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};
use did_core::collective::{Collective, CollectiveError, DataParallel};

use crate::buffer::element_bytes;
use crate::{CudaBackend, CudaBuffer};

/// Whether NCCL (libnccl.so.2) can be loaded here.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library; nothing is called in it.
    unsafe { sys::is_culib_present() }
}

/// Rank 0's unique id, the bytes every rank's communicator is made from.
pub fn nccl_unique_id() -> Result<Vec<u8>, String> {
    if !nccl_available() {
        return Err(missing());
    }
    let id = nccl::get_uniqueid().map_err(|e| format!("ncclGetUniqueId failed: {:?}", e.0))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

fn missing() -> String {
    "NCCL (libnccl.so.2) was not found: install NCCL 2.18 or later (`pip install nvidia-nccl-cu13` has it) and put its lib folder on LD_LIBRARY_PATH".into()
}

/// This rank's communicator, on the backend's device, with its own stream.
pub struct NcclCollective {
    comm: sys::ncclComm_t,
    /// The backend's stream, where the gradients are computed and read.
    compute: Arc<CudaStream>,
    /// NCCL's stream: one stream for every operation keeps them in the order all ranks issue them.
    stream: Arc<CudaStream>,
    place: DataParallel,
    timeout: Duration,
    aborted: bool,
    /// Sums started and not yet waited for.
    in_flight: bool,
}

// SAFETY: a communicator is used by one thread at a time (the trainer's), as NCCL requires.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the communicator of `world` ranks made from rank 0's `unique_id` (128 bytes), on
    /// `be`'s device; every rank calls it, and it returns once all have.
    pub fn new(
        be: &CudaBackend,
        rank: usize,
        world: usize,
        unique_id: &[u8],
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let fail = |message: String| CollectiveError { rank, message };
        if !nccl_available() {
            return Err(fail(missing()));
        }
        let bytes: [u8; 128] = unique_id.try_into().map_err(|_| {
            fail(format!(
                "NCCL's unique id is 128 bytes, the rendezvous gave {}: the ranks run different versions of did",
                unique_id.len()
            ))
        })?;
        let id = sys::ncclUniqueId {
            internal: bytes.map(|b| b as ::core::ffi::c_char),
        };
        be.stream
            .context()
            .bind_to_thread()
            .map_err(|e| fail(format!("cannot use the device: {e}")))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL before it is read; world and rank are checked by the
        // caller's placement (rank < world).
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32)
                .map_err(|e| fail(format!("ncclCommInitRank failed ({:?}); check that every rank uses its own GPU (LOCAL_RANK) and the same unique id", e.0)))?;
            comm.assume_init()
        };
        let stream = be
            .stream
            .fork()
            .map_err(|e| fail(format!("cannot create NCCL's stream: {e}")))?;
        Ok(NcclCollective {
            comm,
            compute: Arc::clone(&be.stream),
            stream,
            place: DataParallel { rank, world },
            timeout,
            aborted: false,
            in_flight: false,
        })
    }

    fn fail(&self, message: String) -> CollectiveError {
        CollectiveError {
            rank: self.place.rank,
            message,
        }
    }

    /// Queues `op` on NCCL's stream after the work queued so far on the backend's.
    fn enqueue(
        &mut self,
        what: &str,
        op: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CollectiveError> {
        if self.aborted {
            return Err(self.fail(
                "the communicator was aborted after an earlier failure; stop and --resume".into(),
            ));
        }
        self.stream
            .join(&self.compute)
            .map_err(|e| self.fail(format!("cannot order the {what} after the backward: {e}")))?;
        op(self.comm, self.stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| self.fail(format!("NCCL refused the {what} ({:?})", e.0)))?;
        Ok(())
    }

    /// Waits, as the module says, for everything queued on NCCL's stream, then makes the
    /// backend's stream wait for it too.
    fn wait(&mut self, what: &str) -> Result<(), CollectiveError> {
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| self.fail(format!("cannot watch the {what}: {e}")))?;
        let started = Instant::now();
        loop {
            // SAFETY: the event is alive for the whole loop.
            if unsafe { cudarc::driver::result::event::query(done.cu_event()) }.is_ok() {
                self.in_flight = false;
                return self.compute.wait(&done).map_err(|e| {
                    self.fail(format!("cannot order the backend after the {what}: {e}"))
                });
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator is alive until drop.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            let failed = !matches!(
                state,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            );
            if failed || started.elapsed() > self.timeout {
                self.abort();
                let why = if failed {
                    format!("NCCL reported {state:?} (a rank died, or its network failed)")
                } else {
                    format!(
                        "it did not finish within {:.0} s (a rank died or hangs)",
                        self.timeout.as_secs_f64()
                    )
                };
                return Err(self.fail(format!(
                    "the {what} failed: {why}; the other ranks' errors or exits name it. Stop every rank and --resume from the last checkpoint"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Queues `op` and waits for it.
    fn run(
        &mut self,
        what: &str,
        op: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CollectiveError> {
        self.enqueue(what, op)?;
        self.wait(what)
    }

    /// Queues the in-place sum of `buf[range]`.
    fn enqueue_sum(
        &mut self,
        be: &CudaBackend,
        buf: &mut CudaBuffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        let len = range.len();
        let ptr = be
            .device_ptr(buf, range.start, len, "gradient all-reduce")
            .map_err(|e| self.fail(e.to_string()))?;
        let dtype = Self::data_type(buf);
        self.enqueue("gradient all-reduce", |comm, stream| unsafe {
            // SAFETY: `ptr` holds `len` elements of `dtype` (checked above); the buffer outlives
            // the sum, which `finish_sums` or `run` waits for before it is read or freed.
            nccl::all_reduce(
                ptr as _,
                ptr as _,
                len,
                dtype,
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream,
            )
        })
    }

    fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: aborting a live communicator; it is not used again.
            unsafe {
                let _ = nccl::comm_abort(self.comm);
            }
        }
    }

    fn data_type(buf: &CudaBuffer) -> sys::ncclDataType_t {
        if element_bytes(buf) == 4 {
            sys::ncclDataType_t::ncclFloat32
        } else {
            sys::ncclDataType_t::ncclBfloat16
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        self.abort();
    }
}

impl Collective<CudaBackend> for NcclCollective {
    fn place(&self) -> DataParallel {
        self.place
    }

    fn all_reduce_sum(
        &mut self,
        be: &CudaBackend,
        buf: &mut CudaBuffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.enqueue_sum(be, buf, range)?;
        self.wait("gradient all-reduce")
    }

    fn start_sum(
        &mut self,
        be: &CudaBackend,
        buf: &mut CudaBuffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.enqueue_sum(be, buf, range)?;
        self.in_flight = true;
        Ok(())
    }

    fn finish_sums(&mut self, _: &CudaBackend, _: &mut CudaBuffer) -> Result<(), CollectiveError> {
        if !self.in_flight {
            return Ok(());
        }
        self.wait("gradient sums")
    }

    fn all_reduce_host(&mut self, values: &mut [f64]) -> Result<(), CollectiveError> {
        if values.is_empty() {
            return self.barrier();
        }
        let stream = Arc::clone(&self.stream);
        let mut dev = stream
            .clone_htod(values)
            .map_err(|e| self.fail(format!("cannot stage a host sum: {e}")))?;
        let n = values.len();
        {
            let (ptr, _sync) = dev.device_ptr_mut(&stream);
            self.run("host all-reduce", |comm, s| unsafe {
                // SAFETY: `dev` holds `n` f64 values on this stream and outlives the wait.
                nccl::all_reduce(
                    ptr as _,
                    ptr as _,
                    n,
                    sys::ncclDataType_t::ncclFloat64,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    s,
                )
            })?;
        }
        stream
            .memcpy_dtoh(&dev, values)
            .map_err(|e| self.fail(format!("cannot read a host sum back: {e}")))
    }

    fn broadcast(
        &mut self,
        be: &CudaBackend,
        buf: &mut CudaBuffer,
        len: usize,
        root: usize,
    ) -> Result<(), CollectiveError> {
        let ptr = be
            .device_ptr(buf, 0, len, "broadcast")
            .map_err(|e| self.fail(e.to_string()))?;
        let dtype = Self::data_type(buf);
        self.run("broadcast", |comm, stream| unsafe {
            // SAFETY: as in all_reduce_sum; in place, root's buffer is the source.
            nccl::broadcast(ptr as _, ptr as _, len, dtype, root as i32, comm, stream)
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_reduce_host(&mut [0.0])
    }
}
