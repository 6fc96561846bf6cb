#!/usr/bin/env bash
# The machine code (SASS, sm_90) of a kernel as the backend compiles it, without a GPU: the
# compile gate's NVRTC + ptxas (scripts/kernel-gate.sh's pinned wheels) keep their cubins, and
# cuobjdump with nvdisasm (the nvidia-cuda-cuobjdump and -nvdisasm wheels) disassembles one
# kernel. For reading what a kernel's loops issue — e.g. whether its global loads go out
# together or each waits for the store before it — when no GPU is at hand.
#
#   scripts/sass.sh KERNEL [bf16|f32]      (default bf16)
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=${1:?usage: scripts/sass.sh KERNEL [bf16|f32]}
precision=${2:-bf16}
# A folder of its own: pip --target replaces a package folder it shares with another wheel.
tools=target/cuda-wheels-sass
cuobjdump="$tools/nvidia/cu13/bin/cuobjdump"
if [ ! -x "$cuobjdump" ]; then
    echo "installing cuobjdump and nvdisasm (13.2.51) into $tools" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tools" \
        nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51 >&2
fi
export PATH="$PWD/$tools/nvidia/cu13/bin:$PATH"
keep=target/sass
# The compile gate (it installs NVRTC and ptxas) with its cubins kept; its table goes beside them.
KERNEL_GATE_KEEP=$keep bash scripts/kernel-gate.sh "$keep/kernels.md" >/dev/null
found=0
for cubin in "$keep/$precision"-*.cubin; do
    if "$cuobjdump" -sass -fun "$kernel" "$cubin" 2>/dev/null | grep -q "Function"; then
        "$cuobjdump" -sass -fun "$kernel" "$cubin"
        found=1
    fi
done
[ $found = 1 ] || { echo "no kernel named $kernel in $keep/$precision-*.cubin" >&2; exit 1; }
