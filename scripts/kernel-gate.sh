#!/usr/bin/env bash
# The CUDA compile gate (CI; no GPU, no CUDA toolkit needed): installs the
# pinned NVRTC and ptxas wheels from PyPI into a local folder, then compiles
# every kernel exactly as the backend does at run time (NVRTC, both storage
# precisions, compute_90) and assembles each with `ptxas -arch=sm_90 -v`.
# Fails on any error; writes the registers / shared memory / spills table.
#
#   scripts/kernel-gate.sh [OUT.md]     (default docs/gpu/kernels.md)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/gpu/kernels.md}
wheels=${DID_CUDA_WHEELS:-target/cuda-wheels}
lib="$wheels/nvidia/cu13/lib"
ptxas="$wheels/nvidia/cu13/bin/ptxas"
if [ ! -e "$lib/libnvrtc.so.13" ] || [ ! -x "$ptxas" ]; then
    echo "installing NVRTC 13.0.88 and ptxas (nvidia-cuda-nvcc 13.0.88) into $wheels"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$wheels" \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvcc==13.0.88
fi
# NVRTC loads libnvrtc-builtins from the library path.
export LD_LIBRARY_PATH="$PWD/$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# KERNEL_GATE_KEEP=DIR keeps the cubins there (scripts/sass.sh).
cargo run --locked --quiet -p did-backend-cuda --bin kernel_gate -- --ptxas "$ptxas" --arch 90 --out "$out" \
    ${KERNEL_GATE_KEEP:+--keep "$KERNEL_GATE_KEEP"}
