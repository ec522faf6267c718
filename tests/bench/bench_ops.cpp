// bench_ops: the C++ floor for the per-op overhead benchmark: the same small ATen calls that
// experiments/bench_overhead.lua times from Lua and Python, here with no frontend at all.
// usage: qatlab_bench_ops [iterations] [repeats] → one line per op: "<op> <median ns/op>"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

static double median_ns(int iters, int repeats, const std::function<void()> & fn) {
    std::vector<double> per;
    for (int r = 0; r < repeats; r++) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; i++) fn();
        auto t1 = std::chrono::steady_clock::now();
        per.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / iters);
    }
    std::sort(per.begin(), per.end());
    return per[per.size() / 2];
}

int main(int argc, char ** argv) {
    int iters = argc > 1 ? atoi(argv[1]) : 20000;
    int repeats = std::max(1, argc > 2 ? atoi(argv[2]) : 15);
    iters = std::max(1, iters);
    at::set_num_threads(1);
    at::Tensor a = at::ones({1}), b = at::ones({1}), m = at::ones({8, 8});
    at::Tensor sink;
    printf("add_ %.1f\n", median_ns(iters, repeats, [&] { a.add_(b); }));
    printf("add %.1f\n", median_ns(iters, repeats, [&] { sink = at::add(a, b); }));
    printf("mul_scalar %.1f\n", median_ns(iters, repeats, [&] { sink = at::mul(a, 2.0); }));
    printf("sum %.1f\n", median_ns(iters, repeats, [&] { sink = m.sum(); }));
    printf("narrow %.1f\n", median_ns(iters, repeats, [&] { sink = m.narrow(0, 1, 2); }));
    printf("matmul_8x8 %.1f\n", median_ns(iters, repeats, [&] { sink = at::matmul(m, m); }));
    return 0;
}
