// fuzz_kd_cache: libFuzzer target for lib/kd_cache.cpp: the input is meta.json, then after a NUL
// byte one shard (a .pt when it starts with "PK", else shard_00000.safetensors); what validates is
// read through a CacheReader for one epoch, and every batch must have the meta's shapes.
#include "tools/fuzz/fuzz_common.h"
#include "lib/kd_cache.h"

#include <ATen/Parallel.h>

extern "C" int LLVMFuzzerInitialize(int *, char ***) { at::set_num_threads(1); return 0; }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t n) {
    const uint8_t * nul = static_cast<const uint8_t *>(std::memchr(data, 0, n));
    const size_t meta_n = nul ? size_t(nul - data) : n;
    const uint8_t * shard = nul ? nul + 1 : nullptr;
    const size_t shard_n = nul ? n - meta_n - 1 : 0;
    const bool pt = shard_n >= 2 && shard[0] == 'P' && shard[1] == 'K';
    std::remove((fuzz::scratch_dir() + "/shard_00000.safetensors").c_str());
    std::remove((fuzz::scratch_dir() + "/shard_00000.pt").c_str());
    const std::string meta = fuzz::write_file("meta.json", data, meta_n);
    if (shard) fuzz::write_file(pt ? "shard_00000.pt" : "shard_00000.safetensors", shard, shard_n);
    const std::string & dir = fuzz::scratch_dir();
    try {
        qatlab::CacheReaderOptions o;
        o.batch_size = 3;
        o.prefetch = 1;
        qatlab::CacheReader r(dir, o);
        const qatlab::CacheMeta & m = r.meta();
        int64_t rows = 0;
        while (auto b = r.next()) {
            const int64_t B = b->input_ids.size(0);
            if (b->input_ids.sizes() != at::IntArrayRef{B, m.L} || b->topk_idx.sizes() != at::IntArrayRef{B, m.L - 1, m.K} ||
                b->topk_logits.sizes() != at::IntArrayRef{B, m.L - 1, m.K})
                std::abort();   // a batch that disagrees with meta.json
            rows += B;
        }
        if (rows != m.total_rows) std::abort();
    } catch (const std::exception & e) {
        fuzz::rejected(e, dir);
    }
    return 0;
}
