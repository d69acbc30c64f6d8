#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc + NVVM + headers) from PyPI into a virtual
# environment and prints the path of nvcc, ready for `NVCC=$(scripts/install-nvcc.sh)`.
#
# All five packages are pinned: an unpinned nvidia-nvvm pulls a newer NVVM whose PTX the 13.0
# assembler (ptxas) rejects. 13.0 matches the driver (580) on the GPU machines the project tests on.
#
# Layout after install: <site-packages>/nvidia/cu13/{bin/nvcc, bin/ptxas, nvvm/, include/, lib/};
# the five wheels share that one prefix, so nvcc finds cicc (nvvm/bin), the crt headers, the cccl
# headers (cuda/std, nv/) and cuda_runtime.h (cuda_fp16.h, mma.h) through its own nvcc.profile
# without any -I. The host compiler is the system's g++ (gcc 12 is supported by CUDA 13.0).
#
# Usage: scripts/install-nvcc.sh [VENV_DIR]   (default: .venv-nvcc at the repository root;
#        the environment variable SD21_NVCC_VENV also sets it). Progress goes to stderr; the
#        only line on stdout is the nvcc path. Idempotent: a second run checks and reprints.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-${SD21_NVCC_VENV:-.venv-nvcc}}"
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "install-nvcc: $python not found (set PYTHON)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "install-nvcc: creating $venv" >&2
    "$python" -m venv "$venv" >&2
fi

# Skip pip when every pin is already installed (offline re-runs, CI caches).
if ! "$venv/bin/python" - "${pins[@]}" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
PY
then
    echo "install-nvcc: installing ${pins[*]}" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nvcc="$(cd "$site/nvidia/cu13/bin" && pwd)/nvcc"
if [ ! -x "$nvcc" ]; then
    echo "install-nvcc: $nvcc missing after install" >&2
    exit 1
fi

# Smoke test: compile a file that includes the headers the kernels use, to a cubin and PTX.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/t.cu" <<'CU'
#include <cuda_fp16.h>
#include <mma.h>
extern "C" __global__ void k(__half *x) { x[threadIdx.x] = __float2half(1.0f); }
CU
if ! "$nvcc" -c -fatbin -gencode=arch=compute_80,code=sm_80 -o "$tmp/t.fatbin" "$tmp/t.cu" >&2; then
    echo "install-nvcc: $nvcc cannot compile a test kernel" >&2
    exit 1
fi
"$nvcc" --version | tail -n 2 >&2
echo "$nvcc"
