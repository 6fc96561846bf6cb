//! Whether CUDA can be used here, asked without touching a missing library
//! (cudarc panics on the first call into one that is absent).

/// Why CUDA cannot be used, or `Ok` with the device count.
///
/// Checks, in order, that the driver, NVRTC and cuBLAS libraries can be
/// loaded, then that the driver sees at least one device.
pub fn probe() -> Result<usize, String> {
    // SAFETY: these only try to dlopen the library; nothing is called in it.
    let libs = unsafe {
        [
            (
                cudarc::driver::sys::is_culib_present(),
                "the NVIDIA driver library (libcuda.so)",
                "install the NVIDIA driver",
            ),
            (
                cudarc::nvrtc::sys::is_culib_present(),
                "NVRTC (libnvrtc.so.13)",
                "install the CUDA 13 toolkit or `pip install nvidia-cuda-nvrtc`, and put its lib folder on LD_LIBRARY_PATH",
            ),
            (
                cudarc::cublas::sys::is_culib_present(),
                "cuBLAS (libcublas.so.13)",
                "install the CUDA 13 toolkit or `pip install nvidia-cublas`, and put its lib folder on LD_LIBRARY_PATH",
            ),
        ]
    };
    for (present, what, fix) in libs {
        if !present {
            return Err(format!("{what} was not found: {fix}"));
        }
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("the driver sees no GPU".into()),
        Err(e) => Err(format!("the driver sees no usable GPU ({e})")),
    }
}

/// Whether CUDA is usable: the libraries load and a device is present.
///
/// ```
/// // On a machine without CUDA this is false, and nothing panics.
/// let _usable: bool = did_backend_cuda::cuda_available();
/// ```
pub fn cuda_available() -> bool {
    probe().is_ok()
}
