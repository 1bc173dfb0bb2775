#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolchain (nvcc, cicc, ptxas, fatbinary, headers) from
# PyPI wheels into <workspace>/.tools/cuda, as docs/toolchain.md ("nvcc without a GPU") describes.
# No GPU and no driver are needed: this is only the compiler, for build.rs.
#
#   tools/install-cuda-toolchain.sh            # install (idempotent) and print the nvcc version
#   export NVCC=$PWD/.tools/cuda/nvidia/cu13/bin/nvcc
#   tools/install-cuda-toolchain.sh --inspect  # also cuobjdump + nvdisasm (13.2.86: no 13.0 build
#                                              # exists; it reads 13.0 cubins) in .tools/cuda-inspect
#
# Why 13.0 and why pin every wheel: the H100 hosts run driver 580 (CUDA 13.0, PTX ISA 9.0), so the
# embedded compute_120 PTX must not be newer than ISA 9.0; and nvidia-cuda-nvcc==13.0.88 alone
# declares unpinned dependencies, which pulls a 13.5 cicc whose PTX the 13.0 ptxas rejects.
#
# Environment: PYTHON (default python3), DGEMMA_CUDA_DIR (default <workspace>/.tools/cuda).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${DGEMMA_CUDA_DIR:-$root/.tools/cuda}"
python="${PYTHON:-python3}"
nvcc="$dest/nvidia/cu13/bin/nvcc"

wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
)
stamp="$dest/.dgemma-wheels"
want="${wheels[*]}"

inspect=0
for arg in "$@"; do
    case "$arg" in
        --inspect) inspect=1 ;;
        *) echo "usage: $0 [--inspect]" >&2; exit 2 ;;
    esac
done

if [[ -x "$nvcc" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "CUDA toolchain already installed in $dest"
else
    echo "Installing ${wheels[*]} into $dest"
    rm -rf "$dest"
    mkdir -p "$dest"
    "$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --target "$dest" "${wheels[@]}"
    echo "$want" >"$stamp"
fi

if [[ $inspect == 1 ]]; then
    inspect_dir="$dest-inspect"
    if [[ ! -x "$inspect_dir/nvidia/cu13/bin/cuobjdump" ]]; then
        echo "Installing cuobjdump + nvdisasm into $inspect_dir"
        "$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --no-deps \
            --target "$inspect_dir" nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
    fi
    echo "cuobjdump: $inspect_dir/nvidia/cu13/bin/cuobjdump"
fi

"$nvcc" --version
echo "export NVCC=$nvcc"
