// fuzz_safetensors: libFuzzer target for lib/safetensors.cpp: any bytes as a .safetensors file;
// every tensor that loads is read whole (its bytes must lie in the mapping).
#include "tools/fuzz/fuzz_common.h"
#include "lib/safetensors.h"

#include <ATen/Parallel.h>
#include <ATen/ops/sum.h>

extern "C" int LLVMFuzzerInitialize(int *, char ***) { at::set_num_threads(1); return 0; }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t n) {
    const std::string path = fuzz::write_file("in.safetensors", data, n);
    try {
        qatlab::SafetensorsFile f = qatlab::safetensors_load(path);
        for (auto & [name, t] : f.tensors)
            if (t.numel() > 0 && !t.is_complex()) (void)t.to(at::kDouble).sum().item<double>();
    } catch (const std::exception & e) {
        fuzz::rejected(e, path);
    }
    return 0;
}
