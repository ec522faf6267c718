#!/usr/bin/env bash
# fuzz.sh: builds the libFuzzer targets of tools/fuzz/ into build-fuzz/ (clang-15, the readers
# instrumented with -fsanitize=fuzzer,address,undefined; the rest of lib/ from the main build) and
# runs them. Usage: tools/fuzz.sh TARGET|all|list SECONDS [libFuzzer flags...]
# Needs: apt-get install -y clang-15 libfuzzer-15-dev. Exit 77 when they are absent (CTest: skipped),
# 1 when a target found something (the input is kept in build-fuzz/findings/).
# Environment: QATLAB_BUILD (main build, default build/), QATLAB_FUZZ_BUILD (default build-fuzz/),
# QATLAB_PYTHON (python3 with torch, safetensors, tokenizers, gguf for the seed corpora).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
targets="safetensors pt gguf gguf_blocks tokenizer_json sp kd_cache config"
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    echo "targets: $targets"
    exit 2
fi
target=$1
seconds=${2:-10}
shift $(( $# < 2 ? $# : 2 ))
if [ "$target" = list ]; then echo "$targets"; exit 0; fi
case " $targets all " in *" $target "*) ;; *) echo "fuzz.sh: unknown target '$target' (expected one of: $targets, all)" >&2; exit 2 ;; esac

cxx=$(command -v clang++-15 || true)
cc=$(command -v clang-15 || true)
fuzzer_lib=""
[ -n "$cxx" ] && fuzzer_lib=$("$cxx" -print-file-name=libclang_rt.fuzzer-x86_64.a 2>/dev/null || true)
if [ -z "$cxx" ] || [ -z "$cc" ] || [ ! -f "$fuzzer_lib" ]; then
    echo "fuzz.sh: SKIPPED: needs clang-15 and libFuzzer (apt-get install -y clang-15 libfuzzer-15-dev)" >&2
    exit 77
fi

build=${QATLAB_BUILD:-$root/build}
fbuild=${QATLAB_FUZZ_BUILD:-$root/build-fuzz}
python=${QATLAB_PYTHON:-}
[ -z "$python" ] && [ -x "$root/.venv/bin/python" ] && python=$root/.venv/bin/python
[ -z "$python" ] && python=python3
if [ ! -f "$build/CMakeCache.txt" ]; then
    echo "fuzz.sh: no main build in $build (configure and build qatlab first, or set QATLAB_BUILD)" >&2
    exit 2
fi
# The uninstrumented rest of lib/ comes from the main build (build qatlab first after editing lib/).
if [ ! -f "$build/libqatlab_lib.a" ] || [ ! -f "$build/libqatlab_logging.a" ]; then
    cmake --build "$build" --target qatlab_lib qatlab_logging >/dev/null
fi
torch_dir=$(sed -n 's/^Torch_DIR:PATH=//p' "$build/CMakeCache.txt")
if [ ! -f "$fbuild/CMakeCache.txt" ]; then
    cmake -S "$root/tools/fuzz" -B "$fbuild" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_C_COMPILER="$cc" \
          -DQATLAB_MAIN_BUILD="$build" -DTorch_DIR="$torch_dir" >/dev/null
fi
if [ "$target" = all ]; then run=$targets; else run=$target; fi
for t in $run; do cmake --build "$fbuild" --target "fuzz_$t" >/dev/null; done

# Seeds are regenerated when the script changes; the working corpus grows across runs.
if [ ! -f "$fbuild/seeds/.stamp" ] || [ "$root/tools/fuzz/make_corpus.py" -nt "$fbuild/seeds/.stamp" ]; then
    rm -rf "$fbuild/seeds"
    "$python" "$root/tools/fuzz/make_corpus.py" "$fbuild/seeds" >/dev/null
    touch "$fbuild/seeds/.stamp"
fi

status=0
for t in $run; do
    mkdir -p "$fbuild/corpus/$t" "$fbuild/findings" "$fbuild/seeds/$t"
    log="$fbuild/fuzz_$t.log"
    rc=0
    "$fbuild/fuzz_$t" -max_total_time="$seconds" -print_final_stats=1 -timeout=20 -rss_limit_mb=2048 \
        -artifact_prefix="$fbuild/findings/$t-" "$@" "$fbuild/corpus/$t" "$fbuild/seeds/$t" >"$log" 2>&1 || rc=$?
    # The last status line: "#EXECS ... cov: EDGES ft: FEATURES corp: UNITS/SIZE ...".
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(echo "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    corp=$(echo "$last" | sed -n 's/.*corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p')
    if [ "$rc" -ne 0 ]; then
        echo "fuzz_$t: FOUND something (exit $rc): see $log and $fbuild/findings/" >&2
        grep -E 'ERROR|SUMMARY|runtime error|deadly|uncaught|does not name' "$log" | head -n 5 >&2 || true
        status=1
    else
        echo "fuzz_$t: ${execs:-?} runs in ${seconds}s (${rate:-?}/s), cov ${cov:-?} edges, corpus ${corp:-?}, nothing found"
    fi
done
exit $status
