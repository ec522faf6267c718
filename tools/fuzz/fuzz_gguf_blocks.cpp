// fuzz_gguf_blocks: libFuzzer target for the ggml block dequantizers of lib/gguf.cpp with valid
// sizes: the target writes a valid one-tensor GGUF header (type and block count from the first two
// bytes) and the fuzzer chooses every block byte. A valid file must load and dequantize.
#include "tools/fuzz/fuzz_common.h"
#include "lib/gguf.h"

#include <ATen/Parallel.h>
#include <ATen/ops/isnan.h>

#include <vector>

namespace {

// ggml's (type id, elements per block, bytes per block), from ggml-common.h's block structs.
struct BlockType { uint32_t id; uint32_t block, size; };
const BlockType kTypes[] = {
    {0, 1, 4},      {1, 1, 2},     {30, 1, 2},     // F32, F16, BF16
    {2, 32, 18},    {3, 32, 20},   {6, 32, 22},    {7, 32, 24}, {8, 32, 34},   // Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
    {10, 256, 84},  {11, 256, 110}, {12, 256, 144}, {13, 256, 176}, {14, 256, 210},  // Q2_K..Q6_K
    {20, 32, 18},   {23, 256, 136},                // IQ4_NL, IQ4_XS
};

void put_u32(std::vector<uint8_t> & b, uint32_t v) { for (int i = 0; i < 4; i++) b.push_back(uint8_t(v >> (8 * i))); }
void put_u64(std::vector<uint8_t> & b, uint64_t v) { for (int i = 0; i < 8; i++) b.push_back(uint8_t(v >> (8 * i))); }

} // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) { at::set_num_threads(1); return 0; }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t n) {
    if (n < 2) return 0;
    const BlockType & bt = kTypes[data[0] % (sizeof(kTypes) / sizeof(kTypes[0]))];
    const uint32_t rows = 1 + data[1] % 3;
    data += 2, n -= 2;
    // Columns: as many whole blocks as the bytes give (at least one), rows x blocks in all.
    uint64_t blocks_per_row = std::max<uint64_t>(1, n / bt.size / rows);
    if (bt.block == 1) blocks_per_row = std::max<uint64_t>(1, std::min<uint64_t>(blocks_per_row, 4096));
    const uint64_t nbytes = blocks_per_row * rows * bt.size;
    std::vector<uint8_t> f = {'G', 'G', 'U', 'F'};
    put_u32(f, 3);            // version
    put_u64(f, 1);            // tensors
    put_u64(f, 0);            // metadata entries (alignment 32 by default)
    const std::string name = "blk.0.w";
    put_u64(f, name.size());
    f.insert(f.end(), name.begin(), name.end());
    put_u32(f, 2);            // dims, innermost first
    put_u64(f, blocks_per_row * bt.block);
    put_u64(f, rows);
    put_u32(f, bt.id);
    put_u64(f, 0);            // offset in the data section
    while (f.size() % 32) f.push_back(0);
    for (uint64_t i = 0; i < nbytes; i++) f.push_back(i < n ? data[i] : 0);
    const std::string path = fuzz::write_file("blocks.gguf", f.data(), f.size());
    qatlab::GgufFile g = qatlab::gguf_open(path);   // a valid file: an exception is a finding
    at::Tensor x = qatlab::gguf_tensor(g, name);
    if (x.size(0) != rows || x.size(1) != int64_t(blocks_per_row * bt.block)) std::abort();
    (void)at::isnan(x).any().item<bool>();
    return 0;
}
