#!/usr/bin/env bash
# check_cuda_build: builds qatlab against a CUDA LibTorch on a machine without a GPU, so that every
# CUDA-only line (NCCL process groups, CUDA memory counters, CUDA 13 headers) compiles and links,
# and runs the test suite with that build (CUDA tests skip; everything else must pass).
#
#   bash tools/check_cuda_build.sh [--torch SPEC] [--dir DIR] [ctest options...]
#
#   --torch SPEC   the CUDA torch to build against (default torch==2.11.0, the oldest LibTorch
#                  qatlab supports; PyPI's wheel is CUDA 13.0)
#   --dir DIR      where the venv, the toolkit links and the build go (default ../qatlab-cuda-check,
#                  outside the repository); about 5 GB, reused by later runs
#
# Needs network access to PyPI. The CUDA compiler comes from NVIDIA's pip packages of the same
# CUDA release as the wheel (tools/cuda_toolkit.sh): CMake's CUDA support insists on a working
# nvcc although qatlab compiles no .cu file. Only CUDA 13 wheels are handled. The Debian packages
# and the project's .venv (test references) come from setup.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="torch==2.11.0"
DIR="$(dirname "$ROOT")/qatlab-cuda-check"
CTEST_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) TORCH_SPEC="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) CTEST_ARGS+=("$1"); shift ;;
  esac
done

say() { printf '[check_cuda_build] %s\n' "$*" >&2; }
die() { printf '[check_cuda_build] error: %s\n' "$*" >&2; exit 1; }

bash "$ROOT/tools/setup.sh" build >/dev/null   # Debian packages and .venv (test references)

mkdir -p "$DIR"
VENV="$DIR/venv"
PY="$VENV/bin/python"
# pip's warnings about this machine's unreachable local indexes are noise; pip's status is kept.
pip_install() {
  { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1; } | { grep -v "^WARNING: Location '" || true; }
}
[ -x "$PY" ] || python3 -m venv "$VENV"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null ||
   [ "$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" != "${TORCH_SPEC#torch==}" ]; then
  say "installing $TORCH_SPEC (CUDA wheel and its nvidia-* packages) into $VENV"
  pip_install "$TORCH_SPEC"
fi
CUDA_VERSION="$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"
[ -n "$CUDA_VERSION" ] || die "$TORCH_SPEC is not a CUDA build of torch"
# nvcc and a toolkit folder from NVIDIA's pip packages (tools/cuda_toolkit.sh).
TK="$(bash "$ROOT/tools/cuda_toolkit.sh" "$PY" "$DIR/toolkit")"

BUILD="$DIR/build"
TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)"
export PATH="$TK/bin:$PATH" CUDA_HOME="$TK"
say "configuring $BUILD against $TORCH_SPEC (CUDA $CUDA_VERSION)"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
      -DCUDA_TOOLKIT_ROOT_DIR="$TK" -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DQATLAB_TEST_PYTHON="$ROOT/.venv/bin/python" >"$DIR/cmake.log" 2>&1 || { tail -30 "$DIR/cmake.log"; die "cmake failed (log: $DIR/cmake.log)"; }
grep -E '^-- qatlab:' "$DIR/cmake.log" >&2
grep -q 'CUDA: ON' "$DIR/cmake.log" || die "CMake did not see a CUDA LibTorch (log: $DIR/cmake.log)"
say "building (the first time about 8 minutes on 2 cores)"
ninja -C "$BUILD"
say "running the test suite with the CUDA build (no GPU here: CUDA tests skip)"
cd "$BUILD" && ctest -j"$(nproc)" "${CTEST_ARGS[@]}"
