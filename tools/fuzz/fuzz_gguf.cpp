// fuzz_gguf: libFuzzer target for lib/gguf.cpp and lib/gguf_tokenizer.cpp: any bytes as a .gguf
// file; every tensor dequantized, the HF config and the tokenizer built and run on a sample.
#include "tools/fuzz/fuzz_common.h"
#include "lib/gguf.h"
#include "lib/tokenizer.h"

#include <ATen/Parallel.h>
#include <ATen/ops/sum.h>

extern "C" int LLVMFuzzerInitialize(int *, char ***) { at::set_num_threads(1); return 0; }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t n) {
    const std::string path = fuzz::write_file("in.gguf", data, n);
    qatlab::GgufFile f;
    try {
        f = qatlab::gguf_open(path);
    } catch (const std::exception & e) {
        fuzz::rejected(e, path);
        return 0;
    }
    for (const auto & k : f.metadata_order) {
        const qatlab::GgufValue & v = f.metadata.at(k);
        (void)v.type_string();
        for (size_t i = 0; i < v.size() && i < 4; i++) (void)v.item(i);
    }
    for (const auto & t : f.tensors) {
        try {
            at::Tensor x = qatlab::gguf_tensor(f, t.name);
            if (x.numel() > 0) (void)x.sum().item<float>();
            (void)qatlab::gguf_tensor_bytes(f, t.name);
        } catch (const std::exception & e) {
            fuzz::rejected(e, path);
        }
    }
    try {
        (void)qatlab::gguf_hf_config(f).dump();
    } catch (const std::exception & e) {
        fuzz::rejected(e, path);
    }
    try {
        auto tk = qatlab::gguf_tokenizer(f, path);
        for (int64_t id : tk->encode("Hello world, 123 héllo <|im_end|>\n", true)) (void)tk->token_bytes(id);
    } catch (const std::exception & e) {
        fuzz::rejected(e, path);
    }
    return 0;
}
