//! What can go wrong in the CUDA backend.

/// Why a CUDA op or the backend's start failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// CUDA is not usable here: a library or the device is missing.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    /// A driver call failed (out of memory, a kernel fault, …).
    #[error("cuda driver: {0}{hint}", hint = driver_hint(.0))]
    Driver(#[from] cudarc::driver::DriverError),
    /// NVRTC refused a kernel source (a bug of this crate; the compile gate in CI catches it).
    #[error("nvrtc failed to compile {source_name}: {log}")]
    Compile {
        /// The kernel source file.
        source_name: &'static str,
        /// The compiler's log.
        log: String,
    },
    /// A cuBLAS call failed.
    #[error("cublas: {0:?}")]
    Cublas(cudarc::cublas::result::CublasError),
    /// A view reaches past the end of its buffer.
    #[error("cuda backend: {what} needs elements {start}..{end} but the buffer holds {len}")]
    OutOfBounds {
        /// Which operand.
        what: &'static str,
        /// First element.
        start: usize,
        /// One past the last element.
        end: usize,
        /// The buffer's length.
        len: usize,
    },
    /// Shapes the kernels do not support or that do not agree.
    #[error("cuda backend: {0}")]
    Shape(String),
    /// A token id outside the table.
    #[error("cuda backend: token id {id} at row {row} is outside the table of {rows} rows")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Where it was.
        row: usize,
        /// Rows of the table.
        rows: usize,
    },
}

fn driver_hint(e: &cudarc::driver::DriverError) -> &'static str {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        " (the GPU is out of memory: use a smaller --batch, or gradient accumulation)"
    } else {
        ""
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Cublas(e)
    }
}
