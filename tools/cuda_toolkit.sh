#!/usr/bin/env bash
# cuda_toolkit: a CUDA toolkit folder assembled from NVIDIA's pip packages, for building against a
# CUDA torch wheel where no toolkit is installed (LibTorch's CMake insists on a working nvcc).
#
#   bash tools/cuda_toolkit.sh PYTHON DIR      builds DIR (bin/nvcc, include, lib64, nvvm), prints it
#
# PYTHON imports the CUDA torch. nvcc, nvvm, crt and cccl of torch.version.cuda's release are
# pip-installed into PYTHON's environment when missing (network needed once). Headers and
# libraries are linked from every nvidia/cuXX folder on PYTHON's path (the runtime may sit with a
# system torch, nvcc in a venv). Only CUDA 13 wheels (one nvidia/cu13 folder per site) are handled.
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
PY="$1"
TK="$2"
say() { printf '[cuda_toolkit] %s\n' "$*" >&2; }
die() { printf '[cuda_toolkit] error: %s\n' "$*" >&2; exit 1; }

CUDA_VERSION="$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)" ||
  die "$PY cannot import torch"
[ -n "$CUDA_VERSION" ] || die "$PY's torch is not a CUDA build"
MAJOR="${CUDA_VERSION%%.*}"
[ "$MAJOR" -ge 13 ] || die "torch is a CUDA $CUDA_VERSION build: nvcc comes from pip here only for CUDA 13 wheels; \
install the CUDA $CUDA_VERSION toolkit (nvcc on PATH, or CUDA_HOME) instead"

roots() {
  "$PY" -c "import os, sys
seen = []
for p in sys.path:
    r = os.path.join(p, 'nvidia', 'cu$MAJOR')
    if os.path.isdir(r) and os.path.realpath(r) not in seen:
        seen.append(os.path.realpath(r)); print(r)"
}
has() {
  local r
  for r in $(roots); do [ -e "$r/$1" ] && return 0; done
  return 1
}

if ! has bin/nvcc || ! has include/cccl/nv/target || ! has nvvm/bin || ! has include/crt; then
  say "installing nvcc, nvvm, crt and cccl $CUDA_VERSION from PyPI into $PY's environment"
  { "$PY" -m pip install -q --disable-pip-version-check "nvidia-cuda-nvcc==$CUDA_VERSION.*" \
      "nvidia-nvvm==$CUDA_VERSION.*" "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" 2>&1; } |
    { grep -v "^WARNING: Location '" || true; }
fi

rm -rf "$TK"
mkdir -p "$TK/bin" "$TK/include" "$TK/lib64"
for r in $(roots); do
  for f in "$r"/include/*; do [ -e "$TK/include/${f##*/}" ] || ln -s "$f" "$TK/include/${f##*/}"; done
  for f in "$r"/lib/*; do [ -e "$TK/lib64/${f##*/}" ] || ln -s "$f" "$TK/lib64/${f##*/}"; done
  if [ -x "$r/bin/nvcc" ] && [ ! -e "$TK/bin/nvcc" ]; then
    for f in "$r"/bin/*; do ln -s "$f" "$TK/bin/${f##*/}"; done
    # nvcc reads nvcc.profile beside its own real path and finds include/, lib64/, nvvm/ from there:
    # a copy makes that this folder, where the headers of every package meet.
    rm "$TK/bin/nvcc" "$TK/bin/nvcc.profile"
    cp "$r/bin/nvcc" "$r/bin/nvcc.profile" "$TK/bin/"
    ln -s "$r/nvvm" "$TK/nvvm"
  fi
done
for f in "$TK"/lib64/*.so.*; do   # the unversioned names CMake's FindCUDAToolkit looks for
  [ -e "$f" ] || continue
  u="${f%%.so.*}.so"
  [ -e "$u" ] || ln -s "$(readlink "$f")" "$u"
done
[ -x "$TK/bin/nvcc" ] || die "no nvcc in any nvidia/cu$MAJOR folder after installing nvidia-cuda-nvcc"
"$TK/bin/nvcc" --version >/dev/null || die "$TK/bin/nvcc does not run"
echo "$TK"
