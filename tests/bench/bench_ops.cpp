// bench_ops: the C++ floor for the per-op overhead benchmark: the same small ATen calls that
// experiments/bench_overhead.lua times from Lua and Python, here with no frontend at all.
// usage: qatlab_bench_ops [iterations] [repeats] → one line per op: "<op> <ns/op of each repeat...>"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

// Prints "<name> t1 t2 ...": ns/op of each repeat, so the caller can take medians across runs.
static void time_op(const char * name, int iters, int repeats, const std::function<void()> & fn) {
    for (int i = 0; i < 1000; i++) fn();  // warm up, as the Lua and Python loops do
    printf("%s", name);
    for (int r = 0; r < repeats; r++) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; i++) fn();
        auto t1 = std::chrono::steady_clock::now();
        printf(" %.1f", std::chrono::duration<double, std::nano>(t1 - t0).count() / iters);
    }
    printf("\n");
}

int main(int argc, char ** argv) {
    int iters = argc > 1 ? atoi(argv[1]) : 20000;
    int repeats = std::max(1, argc > 2 ? atoi(argv[2]) : 15);
    iters = std::max(1, iters);
    at::set_num_threads(1);
    at::Tensor a = at::ones({1}), b = at::ones({1}), m = at::ones({8, 8});
    at::Tensor sink;
    time_op("add_", iters, repeats, [&] { a.add_(b); });
    time_op("add", iters, repeats, [&] { sink = at::add(a, b); });
    time_op("mul_scalar", iters, repeats, [&] { sink = at::mul(a, 2.0); });
    time_op("sum", iters, repeats, [&] { sink = m.sum(); });
    time_op("narrow", iters, repeats, [&] { sink = m.narrow(0, 1, 2); });
    time_op("matmul_8x8", iters, repeats, [&] { sink = at::matmul(m, m); });
    return 0;
}
