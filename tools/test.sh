#!/usr/bin/env bash
# The test suite, as CI runs it: installs the pinned CUDA 13.0 compiler wheels (no GPU needed)
# so that build.rs compiles every kernel for sm_90a and sm_120, and cuobjdump for the SASS checks,
# then runs every test of the workspace. GPU tests are #[ignore]d here; tools/gpu-suite.sh runs
# them on a GPU host.
# Extra arguments go to the workspace `cargo test` (e.g. `tools/test.sh --no-fail-fast`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "${NVCC:-}" ]; then
    # --inspect: also cuobjdump (tests/sass.rs), in .tools/cuda-inspect.
    bash tools/install-cuda-toolchain.sh --inspect
    export NVCC="$root/.tools/cuda/nvidia/cu13/bin/nvcc"
elif [ -z "${DGEMMA_CUOBJDUMP:-}" ]; then
    # Another nvcc: the cuobjdump of its toolkit if it has one, else the pinned one.
    beside="$(dirname "$(command -v "$NVCC" || echo "$NVCC")")/cuobjdump"
    if [ -x "$beside" ]; then
        export DGEMMA_CUOBJDUMP="$beside"
    else
        bash tools/install-cuda-toolchain.sh --inspect
    fi
fi
# The results tools: tables with anchors and the step plots (Python 3 standard library only).
python3 tools/test_plots.py
cargo test --workspace --locked "$@"
# The machine code nvcc embedded (tensor-core opcodes per kernel family, no register spills),
# read with cuobjdump: #[ignore]d in the plain run because it needs cuobjdump, and it fails rather
# than skips without it. --workspace (not -p dgemma) reuses the build above: the same features.
cargo test --workspace --locked --test sass -- --include-ignored
# The generated CUDA kernels, executed on the CPU by dgemma-cuda's emulator and compared with
# the CPU backend's ops (the same checks the GPU suite runs on a real GPU).
cargo test -p dgemma-cuda --features emulator --test emulated_kernels --locked
# The CUDA backend's plans on the emulator, against the CPU backend and the bf16 cases.
cargo test -p dgemma-gpu --features emulator --test emulated_backend --locked
# The engine's GPU serving path (shared model, one sequence per request, batched device steps)
# on the emulator.
cargo test -p dgemma-runtime --features emulator --test emulated --locked
