#!/usr/bin/env bash
# Fuzz the compiled hot loop under AddressSanitizer for SECONDS (default 60):
#   bash tests/reliability/fuzz-asan.sh 300
# Builds prefork._fastio with -fsanitize=address into a scratch directory
# (PREFORK_ASAN_DIR, default /tmp/prefork-asan; the in-place build is left
# alone), then runs tests/reliability/fuzz_fastio.py against it.
#
# The module is compiled by gcc but linked without gcc's libasan: the ASan
# runtime is the clang one that atheris ships with its libFuzzer
# (asan_with_fuzzer.so), preloaded, so that libFuzzer keeps its coverage
# hooks. gcc and clang register globals differently, hence
# detect_odr_violation=0; CPython keeps memory to the end, hence detect_leaks=0.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-60}
out=${PREFORK_ASAN_DIR:-/tmp/prefork-asan}
CFLAGS="-fsanitize=address -fno-omit-frame-pointer" \
    python3 setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/tmp"
so=$(ls "$out"/lib/prefork/_fastio*.so)
gcc -shared "$(find "$out/tmp" -name '_fastio*.o' | head -1)" -o "$so"
runtime=$(python3 -c 'import atheris; print(atheris.path())')/asan_with_fuzzer.so
mkdir -p "$out/corpus"
PREFORK_FUZZ_COMPILED=$so LD_PRELOAD=$runtime \
    ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0 PYTHONPATH=$PWD \
    python3 tests/reliability/fuzz_fastio.py "$out/corpus" -max_total_time="$seconds"
