// gguf: memory-mapped, fully validated GGUF v2/v3 reader, ggml block dequantizers and the
// llama → Hugging Face mapping. Hostile files end in a std::runtime_error naming file and key.
#include "lib/gguf.h"
#include "lib/file_map.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <stdexcept>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "GGUF files are read as little-endian host memory"
#endif

namespace qatlab {

namespace {

constexpr uint32_t gguf_magic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr size_t dims_max = 4;               // ggml's GGML_MAX_DIMS
constexpr int array_depth_max = 8;           // nested arrays are legal; a million levels are not
constexpr uint64_t nested_arrays_max = 1 << 20;

struct TypeInfo {
    GgmlType type;
    const char * name;
    int64_t block;     // elements per block
    int64_t size;      // bytes per block
};

// Every type ggml has had a number for, so files with types we cannot decode still open.
const TypeInfo type_table[] = {
    {GgmlType::F32, "F32", 1, 4}, {GgmlType::F16, "F16", 1, 2}, {GgmlType::Q4_0, "Q4_0", 32, 18},
    {GgmlType::Q4_1, "Q4_1", 32, 20}, {GgmlType::Q5_0, "Q5_0", 32, 22}, {GgmlType::Q5_1, "Q5_1", 32, 24},
    {GgmlType::Q8_0, "Q8_0", 32, 34}, {GgmlType::Q8_1, "Q8_1", 32, 36}, {GgmlType::Q2_K, "Q2_K", 256, 84},
    {GgmlType::Q3_K, "Q3_K", 256, 110}, {GgmlType::Q4_K, "Q4_K", 256, 144},
    {GgmlType::Q5_K, "Q5_K", 256, 176}, {GgmlType::Q6_K, "Q6_K", 256, 210},
    {GgmlType::Q8_K, "Q8_K", 256, 292}, {GgmlType::IQ2_XXS, "IQ2_XXS", 256, 66},
    {GgmlType::IQ2_XS, "IQ2_XS", 256, 74}, {GgmlType::IQ3_XXS, "IQ3_XXS", 256, 98},
    {GgmlType::IQ1_S, "IQ1_S", 256, 50}, {GgmlType::IQ4_NL, "IQ4_NL", 32, 18},
    {GgmlType::IQ3_S, "IQ3_S", 256, 110}, {GgmlType::IQ2_S, "IQ2_S", 256, 82},
    {GgmlType::IQ4_XS, "IQ4_XS", 256, 136}, {GgmlType::I8, "I8", 1, 1}, {GgmlType::I16, "I16", 1, 2},
    {GgmlType::I32, "I32", 1, 4}, {GgmlType::I64, "I64", 1, 8}, {GgmlType::F64, "F64", 1, 8},
    {GgmlType::IQ1_M, "IQ1_M", 256, 56}, {GgmlType::BF16, "BF16", 1, 2},
    {GgmlType::TQ1_0, "TQ1_0", 256, 54}, {GgmlType::TQ2_0, "TQ2_0", 256, 66},
    {GgmlType::MXFP4, "MXFP4", 32, 17},
};

const TypeInfo * type_find(uint32_t t) {
    for (const auto & e : type_table)
        if (uint32_t(e.type) == t) return &e;
    return nullptr;
}

// The stored dtype of the types that are plain arrays (aliased, not decoded).
bool plain_dtype(GgmlType t, at::ScalarType & out) {
    switch (t) {
    case GgmlType::F32: out = at::kFloat; return true;
    case GgmlType::F16: out = at::kHalf; return true;
    case GgmlType::BF16: out = at::kBFloat16; return true;
    case GgmlType::F64: out = at::kDouble; return true;
    case GgmlType::I8: out = at::kChar; return true;
    case GgmlType::I16: out = at::kShort; return true;
    case GgmlType::I32: out = at::kInt; return true;
    case GgmlType::I64: out = at::kLong; return true;
    default: return false;
    }
}

[[noreturn]] void load_fail(const std::string & path, const std::string & key, const std::string & what) {
    throw std::runtime_error(path + ": " + key + ": " + what);
}

std::string key_label(const std::string & key) { return "key '" + key + "'"; }
std::string tensor_label(const std::string & name) { return "tensor '" + name + "'"; }

std::string dims_format(const std::vector<int64_t> & v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
}

// A bounds-checked cursor over the mapping; every read names what it was reading.
struct Cursor {
    const std::string & path;
    const uint8_t * base;
    uint64_t size;
    uint64_t pos = 0;

    void need(uint64_t n, const std::string & key, const char * what) {
        if (n > size - pos)
            load_fail(path, key, std::string("expected ") + what + " of " + std::to_string(n) +
                      " bytes at offset " + std::to_string(pos) + ", found the end of the file (" +
                      std::to_string(size) + " bytes)");
    }
    template <typename T>
    T read(const std::string & key, const char * what) {
        need(sizeof(T), key, what);
        T v;
        std::memcpy(&v, base + pos, sizeof(T));
        pos += sizeof(T);
        return v;
    }
    std::string string(const std::string & key, const char * what) {
        const uint64_t n = read<uint64_t>(key, what);
        need(n, key, what);
        std::string s(reinterpret_cast<const char *>(base + pos), size_t(n));
        pos += n;
        return s;
    }
};

size_t scalar_size(GgufType t) {
    switch (t) {
    case GgufType::UINT8: case GgufType::INT8: case GgufType::BOOL: return 1;
    case GgufType::UINT16: case GgufType::INT16: return 2;
    case GgufType::UINT32: case GgufType::INT32: case GgufType::FLOAT32: return 4;
    case GgufType::UINT64: case GgufType::INT64: case GgufType::FLOAT64: return 8;
    case GgufType::STRING: return 8;   // the length prefix, at least
    case GgufType::ARRAY: return 12;   // item type + count, at least
    }
    return 1;
}

bool type_valid(uint32_t t) { return t <= uint32_t(GgufType::FLOAT64); }

void value_read(Cursor & c, const std::string & key, GgufType type, GgufValue & v, int depth,
                uint64_t & nested_budget) {
    v.type = type;
    switch (type) {
    case GgufType::UINT8: v.u = c.read<uint8_t>(key, "a uint8"); break;
    case GgufType::INT8: v.i = c.read<int8_t>(key, "an int8"); break;
    case GgufType::UINT16: v.u = c.read<uint16_t>(key, "a uint16"); break;
    case GgufType::INT16: v.i = c.read<int16_t>(key, "an int16"); break;
    case GgufType::UINT32: v.u = c.read<uint32_t>(key, "a uint32"); break;
    case GgufType::INT32: v.i = c.read<int32_t>(key, "an int32"); break;
    case GgufType::UINT64: v.u = c.read<uint64_t>(key, "a uint64"); break;
    case GgufType::INT64: v.i = c.read<int64_t>(key, "an int64"); break;
    case GgufType::FLOAT32: v.f = c.read<float>(key, "a float32"); break;
    case GgufType::FLOAT64: v.f = c.read<double>(key, "a float64"); break;
    case GgufType::BOOL: {
        const uint8_t b = c.read<uint8_t>(key, "a bool");
        if (b > 1)
            load_fail(c.path, key, "expected a bool byte 0 or 1, found " + std::to_string(b) +
                      " at offset " + std::to_string(c.pos - 1));
        v.i = b;
        break;
    }
    case GgufType::STRING: v.s = c.string(key, "a string"); break;
    case GgufType::ARRAY: {
        if (depth >= array_depth_max)
            load_fail(c.path, key, "expected arrays nested at most " + std::to_string(array_depth_max) +
                      " deep, found deeper nesting");
        const uint32_t it = c.read<uint32_t>(key, "an array item type");
        if (!type_valid(it))
            load_fail(c.path, key, "expected an array item type 0..12, found " + std::to_string(it));
        v.item_type = GgufType(it);
        const uint64_t n = c.read<uint64_t>(key, "an array length");
        // Checked before any allocation, so an absurd count cannot allocate.
        const uint64_t min_bytes = scalar_size(v.item_type);
        if (n > (c.size - c.pos) / min_bytes)
            load_fail(c.path, key, "expected an array of " + std::to_string(n) + " " +
                      gguf_type_name(v.item_type) + " items (at least " + std::to_string(min_bytes) +
                      " bytes each), found " + std::to_string(c.size - c.pos) + " bytes left in the file");
        if (v.item_type == GgufType::STRING) {
            for (uint64_t k = 0; k < n; ++k) v.strings.push_back(c.string(key, "an array string"));
        } else if (v.item_type == GgufType::ARRAY) {
            // A nested array costs far more in memory than its 12 bytes in the file: cap them.
            if (n > nested_budget)
                load_fail(c.path, key, "expected at most " + std::to_string(nested_arrays_max) +
                          " nested arrays in the file, found more");
            nested_budget -= n;
            v.arrays.resize(size_t(n));
            for (uint64_t k = 0; k < n; ++k) value_read(c, key, v.item_type, v.arrays[k], depth + 1, nested_budget);
        } else {
            const uint64_t nbytes = n * min_bytes;
            const uint8_t * p = c.base + c.pos;
            if (v.item_type == GgufType::BOOL)
                for (uint64_t k = 0; k < n; ++k)
                    if (p[k] > 1)
                        load_fail(c.path, key, "expected bool bytes 0 or 1, found " + std::to_string(p[k]) +
                                  " at item " + std::to_string(k));
            v.raw.assign(reinterpret_cast<const char *>(p), size_t(nbytes));
            c.pos += nbytes;
        }
        break;
    }
    }
}

// -- block decoders: ggml's layouts (ggml-common.h), written from the format -----------------
// Each turns one block into `block` floats. The arithmetic order follows ggml's reference
// dequantizers so results match them (and gguf-py) bit for bit.

inline float f16_at(const uint8_t * p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Q4_0: d (f16), 16 bytes of nibbles; element j is the low nibble of byte j, j+16 the high one.
inline void block_q4_0(const uint8_t * b, float * y) {
    const float d = f16_at(b);
    const uint8_t * qs = b + 2;
    for (int j = 0; j < 16; ++j) {
        y[j] = float(int(qs[j] & 0xF) - 8) * d;
        y[j + 16] = float(int(qs[j] >> 4) - 8) * d;
    }
}

// Q4_1: d, m (f16), 16 bytes of nibbles; x = q * d + m.
inline void block_q4_1(const uint8_t * b, float * y) {
    const float d = f16_at(b), m = f16_at(b + 2);
    const uint8_t * qs = b + 4;
    for (int j = 0; j < 16; ++j) {
        y[j] = float(qs[j] & 0xF) * d + m;
        y[j + 16] = float(qs[j] >> 4) * d + m;
    }
}

// Q5_0: d, 32 fifth bits (uint32, bit j for element j), 16 bytes of low nibbles; offset 16.
inline void block_q5_0(const uint8_t * b, float * y) {
    const float d = f16_at(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const uint8_t * qs = b + 6;
    for (int j = 0; j < 16; ++j) {
        const int h0 = int((qh >> j) & 1) << 4, h1 = int((qh >> (j + 16)) & 1) << 4;
        y[j] = float((int(qs[j] & 0xF) | h0) - 16) * d;
        y[j + 16] = float((int(qs[j] >> 4) | h1) - 16) * d;
    }
}

// Q5_1: d, m, fifth bits, nibbles; x = q * d + m.
inline void block_q5_1(const uint8_t * b, float * y) {
    const float d = f16_at(b), m = f16_at(b + 2);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    const uint8_t * qs = b + 8;
    for (int j = 0; j < 16; ++j) {
        const int h0 = int((qh >> j) & 1) << 4, h1 = int((qh >> (j + 16)) & 1) << 4;
        y[j] = float(int(qs[j] & 0xF) | h0) * d + m;
        y[j + 16] = float(int(qs[j] >> 4) | h1) * d + m;
    }
}

// Q8_0: d, 32 int8.
inline void block_q8_0(const uint8_t * b, float * y) {
    const float d = f16_at(b);
    const int8_t * qs = reinterpret_cast<const int8_t *>(b + 2);
    for (int j = 0; j < 32; ++j) y[j] = float(qs[j]) * d;
}

// Q2_K: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit values, d, dmin.
// Each 128-element half uses 32 bytes at shifts 0, 2, 4, 6, sixteen elements per scale.
inline void block_q2_k(const uint8_t * b, float * y) {
    const uint8_t * sc = b;
    const uint8_t * q = b + 16;
    const float d = f16_at(b + 80), dmin = f16_at(b + 82);
    int is = 0;
    for (int n = 0; n < 2; ++n, q += 32) {
        for (int shift = 0; shift < 8; shift += 2) {
            for (int half = 0; half < 2; ++half, ++is) {
                const float dl = d * float(sc[is] & 0xF), ml = dmin * float(sc[is] >> 4);
                for (int l = 0; l < 16; ++l) *y++ = dl * float((q[l + 16 * half] >> shift) & 3) - ml;
            }
        }
    }
}

// Q3_K: 32 bytes of high-bit masks, 64 bytes of 2-bit values, 12 bytes of 16 6-bit scales, d.
// Scale k: low 4 bits from byte k (k < 8) or the high nibble of byte k-8, top 2 bits from byte
// 8 + k%4 at shift 2*(k/4); the value is q - 4 where the mask bit is clear.
inline void block_q3_k(const uint8_t * b, float * y) {
    const uint8_t * hm = b;
    const uint8_t * q = b + 32;
    const uint8_t * s = b + 96;
    const float d = f16_at(b + 108);
    int8_t scales[16];
    for (int k = 0; k < 16; ++k) {
        const int lo = k < 8 ? (s[k] & 0xF) : (s[k - 8] >> 4);
        const int hi = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        scales[k] = int8_t((lo | (hi << 4)) - 32);
    }
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < 2; ++n, q += 32) {
        for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
            for (int half = 0; half < 2; ++half, ++is) {
                const float dl = d * float(scales[is]);
                for (int l = 0; l < 16; ++l) {
                    const int i = l + 16 * half;
                    *y++ = dl * float(int((q[i] >> shift) & 3) - ((hm[i] & m) ? 0 : 4));
                }
            }
        }
    }
}

// The 6-bit scale and min of sub-block j (0..7) of Q4_K / Q5_K: 12 bytes hold 8 + 8 values.
inline void scale_min_k4(int j, const uint8_t * q, int & sc, int & m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q4_K: d, dmin, 12 scale bytes, 128 bytes of nibbles; 64 elements per 32 bytes (low then high).
inline void block_q4_k(const uint8_t * b, float * y) {
    const float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t * sc = b + 4;
    const uint8_t * q = b + 16;
    for (int j = 0; j < 8; j += 2, q += 32) {
        int s0, m0, s1, m1;
        scale_min_k4(j, sc, s0, m0);
        scale_min_k4(j + 1, sc, s1, m1);
        const float d1 = d * float(s0), n1 = dmin * float(m0);
        const float d2 = d * float(s1), n2 = dmin * float(m1);
        for (int l = 0; l < 32; ++l) y[l] = d1 * float(q[l] & 0xF) - n1;
        for (int l = 0; l < 32; ++l) y[l + 32] = d2 * float(q[l] >> 4) - n2;
        y += 64;
    }
}

// Q5_K: as Q4_K plus 32 bytes of fifth bits: bit 2i of qh[l] for the i-th 64 low, 2i+1 high.
inline void block_q5_k(const uint8_t * b, float * y) {
    const float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t * sc = b + 4;
    const uint8_t * qh = b + 16;
    const uint8_t * ql = b + 48;
    int u = 0;
    for (int j = 0; j < 8; j += 2, ql += 32, u += 2) {
        int s0, m0, s1, m1;
        scale_min_k4(j, sc, s0, m0);
        scale_min_k4(j + 1, sc, s1, m1);
        const float d1 = d * float(s0), n1 = dmin * float(m0);
        const float d2 = d * float(s1), n2 = dmin * float(m1);
        for (int l = 0; l < 32; ++l) y[l] = d1 * float((ql[l] & 0xF) | (((qh[l] >> u) & 1) << 4)) - n1;
        for (int l = 0; l < 32; ++l) y[l + 32] = d2 * float((ql[l] >> 4) | (((qh[l] >> (u + 1)) & 1) << 4)) - n2;
        y += 64;
    }
}

// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d; offset 32.
inline void block_q6_k(const uint8_t * b, float * y) {
    const uint8_t * ql = b;
    const uint8_t * qh = b + 128;
    const int8_t * sc = reinterpret_cast<const int8_t *>(b + 192);
    const float d = f16_at(b + 208);
    for (int n = 0; n < 2; ++n, ql += 64, qh += 32, sc += 8, y += 128) {
        for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = int((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = (d * float(sc[is])) * float(q1);
            y[l + 32] = (d * float(sc[is + 2])) * float(q2);
            y[l + 64] = (d * float(sc[is + 4])) * float(q3);
            y[l + 96] = (d * float(sc[is + 6])) * float(q4);
        }
    }
}

// The non-linear 4-bit grid of IQ4_NL / IQ4_XS.
const int8_t iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// IQ4_NL: d, 16 bytes of nibbles indexing the grid (Q4_0's element order).
inline void block_iq4_nl(const uint8_t * b, float * y) {
    const float d = f16_at(b);
    const uint8_t * qs = b + 2;
    for (int j = 0; j < 16; ++j) {
        y[j] = d * float(iq4nl_values[qs[j] & 0xF]);
        y[j + 16] = d * float(iq4nl_values[qs[j] >> 4]);
    }
}

// IQ4_XS: d, 6-bit scales of 8 sub-blocks (2 high bits each in a uint16, 4 low in nibbles), 128
// bytes of nibbles indexing the grid.
inline void block_iq4_xs(const uint8_t * b, float * y) {
    const float d = f16_at(b);
    uint16_t sh;
    std::memcpy(&sh, b + 2, 2);
    const uint8_t * sl = b + 4;
    const uint8_t * qs = b + 8;
    for (int ib = 0; ib < 8; ++ib, qs += 16, y += 32) {
        const int ls = ((sl[ib / 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
        const float dl = d * float(ls - 32);
        for (int j = 0; j < 16; ++j) {
            y[j] = dl * float(iq4nl_values[qs[j] & 0xF]);
            y[j + 16] = dl * float(iq4nl_values[qs[j] >> 4]);
        }
    }
}

using BlockFn = void (*)(const uint8_t *, float *);

BlockFn block_fn(GgmlType t) {
    switch (t) {
    case GgmlType::Q4_0: return block_q4_0;
    case GgmlType::Q4_1: return block_q4_1;
    case GgmlType::Q5_0: return block_q5_0;
    case GgmlType::Q5_1: return block_q5_1;
    case GgmlType::Q8_0: return block_q8_0;
    case GgmlType::Q2_K: return block_q2_k;
    case GgmlType::Q3_K: return block_q3_k;
    case GgmlType::Q4_K: return block_q4_k;
    case GgmlType::Q5_K: return block_q5_k;
    case GgmlType::Q6_K: return block_q6_k;
    case GgmlType::IQ4_NL: return block_iq4_nl;
    case GgmlType::IQ4_XS: return block_iq4_xs;
    default: return nullptr;
    }
}

// Runs a block decoder over every block, in parallel chunks; the template inlines the decoder.
template <void (*F)(const uint8_t *, float *)>
void blocks_decode(const uint8_t * src, float * dst, int64_t nblocks, int64_t block, int64_t size) {
    const int64_t grain = std::max<int64_t>(1, 16384 / block);
    at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) F(src + i * size, dst + i * block);
    });
}

void blocks_dispatch(GgmlType t, const uint8_t * src, float * dst, int64_t nblocks, int64_t block, int64_t size) {
    switch (t) {
    case GgmlType::Q4_0: return blocks_decode<block_q4_0>(src, dst, nblocks, block, size);
    case GgmlType::Q4_1: return blocks_decode<block_q4_1>(src, dst, nblocks, block, size);
    case GgmlType::Q5_0: return blocks_decode<block_q5_0>(src, dst, nblocks, block, size);
    case GgmlType::Q5_1: return blocks_decode<block_q5_1>(src, dst, nblocks, block, size);
    case GgmlType::Q8_0: return blocks_decode<block_q8_0>(src, dst, nblocks, block, size);
    case GgmlType::Q2_K: return blocks_decode<block_q2_k>(src, dst, nblocks, block, size);
    case GgmlType::Q3_K: return blocks_decode<block_q3_k>(src, dst, nblocks, block, size);
    case GgmlType::Q4_K: return blocks_decode<block_q4_k>(src, dst, nblocks, block, size);
    case GgmlType::Q5_K: return blocks_decode<block_q5_k>(src, dst, nblocks, block, size);
    case GgmlType::Q6_K: return blocks_decode<block_q6_k>(src, dst, nblocks, block, size);
    case GgmlType::IQ4_NL: return blocks_decode<block_iq4_nl>(src, dst, nblocks, block, size);
    case GgmlType::IQ4_XS: return blocks_decode<block_iq4_xs>(src, dst, nblocks, block, size);
    default: break;
    }
}

std::string dequantizable_list() {
    std::string s;
    for (const auto & e : type_table)
        if (ggml_type_dequantizable(e.type)) s += (s.empty() ? "" : ", ") + std::string(e.name);
    return s;
}

} // namespace

// -- names and values -----------------------------------------------------------------------

const char * gguf_type_name(GgufType t) {
    switch (t) {
    case GgufType::UINT8: return "uint8";
    case GgufType::INT8: return "int8";
    case GgufType::UINT16: return "uint16";
    case GgufType::INT16: return "int16";
    case GgufType::UINT32: return "uint32";
    case GgufType::INT32: return "int32";
    case GgufType::FLOAT32: return "float32";
    case GgufType::BOOL: return "bool";
    case GgufType::STRING: return "string";
    case GgufType::ARRAY: return "array";
    case GgufType::UINT64: return "uint64";
    case GgufType::INT64: return "int64";
    case GgufType::FLOAT64: return "float64";
    }
    return "unknown";
}

bool GgufValue::is_integer() const {
    switch (type) {
    case GgufType::UINT8: case GgufType::INT8: case GgufType::UINT16: case GgufType::INT16:
    case GgufType::UINT32: case GgufType::INT32: case GgufType::UINT64: case GgufType::INT64:
        return true;
    default:
        return false;
    }
}

size_t GgufValue::size() const {
    if (type != GgufType::ARRAY) return 0;
    if (item_type == GgufType::STRING) return strings.size();
    if (item_type == GgufType::ARRAY) return arrays.size();
    return raw.size() / scalar_size(item_type);
}

GgufValue GgufValue::item(size_t k) const {
    if (k >= size())
        throw std::out_of_range("GgufValue::item: index " + std::to_string(k) + " out of range for " +
                                type_string() + " of length " + std::to_string(size()));
    if (item_type == GgufType::ARRAY) return arrays[k];
    GgufValue v;
    v.type = item_type;
    if (item_type == GgufType::STRING) {
        v.s = strings[k];
        return v;
    }
    // Re-read the stored bytes with the scalar reader: one decoding path for both.
    const size_t n = scalar_size(item_type);
    const std::string path = "array";
    Cursor c{path, reinterpret_cast<const uint8_t *>(raw.data()) + k * n, n};
    uint64_t budget = 0;
    value_read(c, "item", item_type, v, 0, budget);
    return v;
}

std::string GgufValue::type_string() const {
    if (type != GgufType::ARRAY) return gguf_type_name(type);
    std::string s = "array of ";
    if (item_type == GgufType::ARRAY && !arrays.empty()) return s + arrays[0].type_string();
    return s + gguf_type_name(item_type);
}

const char * ggml_type_name(GgmlType t) {
    const TypeInfo * e = type_find(uint32_t(t));
    if (e) return e->name;
    static thread_local char buf[32];
    std::snprintf(buf, sizeof buf, "type %u", unsigned(t));
    return buf;
}

bool ggml_type_dequantizable(GgmlType t) {
    at::ScalarType st;
    return plain_dtype(t, st) || block_fn(t) != nullptr;
}

const GgufTensorInfo * GgufFile::tensor_find(const std::string & name) const {
    for (const auto & t : tensors)
        if (t.name == name) return &t;
    return nullptr;
}

// -- the reader -------------------------------------------------------------------------------

// What the checks cannot foresee (LibTorch's limits, memory) still names the file and tensor.
[[noreturn]] void gguf_rethrow(const std::string & path, const std::string & key) {
    try {
        throw;
    } catch (const c10::Error & e) {
        load_fail(path, key, std::string("cannot build it: ") + e.what_without_backtrace());
    } catch (const std::bad_alloc &) {
        load_fail(path, key, "out of memory while reading it");
    } catch (const std::length_error & e) {
        load_fail(path, key, std::string("a table it describes is too large (") + e.what() + ")");
    }
}

GgufFile gguf_open(const std::string & path) try {
    std::shared_ptr<FileMap> mapping = file_map_open(path);
    const uint64_t file_size = mapping->size;
    if (file_size < 24)
        load_fail(path, "header", "expected at least 24 bytes (magic, version, counts), found a file of " +
                  std::to_string(file_size) + " bytes");
    GgufFile f;
    f.path = path;
    f.map = std::shared_ptr<uint8_t>(mapping, mapping->data);  // aliases the mapping's lifetime
    f.map_size = file_size;

    Cursor c{path, f.map.get(), file_size};
    const uint32_t magic = c.read<uint32_t>("magic", "the magic");
    if (magic != gguf_magic) {
        char found[5] = {0};
        std::memcpy(found, &magic, 4);
        for (char & ch : found) if (ch && (ch < 32 || ch > 126)) ch = '?';
        load_fail(path, "magic", std::string("expected \"GGUF\", found \"") + found + "\"");
    }
    f.version = c.read<uint32_t>("version", "the version");
    if (f.version != 2 && f.version != 3) {
        std::string hint = (f.version & 0xFFFF) == 0 && f.version ? " (a big-endian file? not supported)" :
                           f.version == 1 ? " (GGUF v1, 32-bit counts, is not supported)" : "";
        load_fail(path, "version", "expected 2 or 3, found " + std::to_string(f.version) + hint);
    }
    const uint64_t n_tensors = c.read<uint64_t>("tensor count", "the tensor count");
    const uint64_t n_kv = c.read<uint64_t>("metadata count", "the metadata count");
    // Each entry needs at least a 12-byte key header + type and each tensor info 28 bytes:
    // larger counts cannot fit in the file, so no loop or allocation follows them.
    if (n_kv > (file_size - c.pos) / 13)
        load_fail(path, "metadata count", "expected at most " + std::to_string((file_size - c.pos) / 13) +
                  " entries (the file's size), found " + std::to_string(n_kv));
    if (n_tensors > (file_size - c.pos) / 28)
        load_fail(path, "tensor count", "expected at most " + std::to_string((file_size - c.pos) / 28) +
                  " tensors (the file's size), found " + std::to_string(n_tensors));

    uint64_t nested_budget = nested_arrays_max;
    for (uint64_t k = 0; k < n_kv; ++k) {
        const std::string where = "metadata entry #" + std::to_string(k);
        std::string key = c.string(where, "a key string");
        if (key.empty()) load_fail(path, where, "expected a non-empty key, found an empty one");
        const std::string label = key_label(key);
        if (f.metadata.count(key)) load_fail(path, label, "expected a unique key, found a duplicate");
        const uint32_t t = c.read<uint32_t>(label, "a value type");
        if (!type_valid(t)) load_fail(path, label, "expected a value type 0..12, found " + std::to_string(t));
        GgufValue v;
        value_read(c, label, GgufType(t), v, 0, nested_budget);
        f.metadata_order.push_back(key);
        f.metadata.emplace(std::move(key), std::move(v));
    }

    auto al = f.metadata.find("general.alignment");
    if (al != f.metadata.end()) {
        const GgufValue & v = al->second;
        if (!v.is_integer())
            load_fail(path, key_label("general.alignment"), "expected uint32, found " + v.type_string());
        const uint64_t a = v.u ? v.u : uint64_t(std::max<int64_t>(v.i, 0));
        if (a == 0 || (a & (a - 1)) != 0 || a > (uint64_t(1) << 30))
            load_fail(path, key_label("general.alignment"), "expected a power of two up to 2^30, found " +
                      (v.i < 0 ? std::to_string(v.i) : std::to_string(a)));
        f.alignment = a;
    }

    std::set<std::string> names;
    f.tensors.reserve(size_t(n_tensors));
    for (uint64_t k = 0; k < n_tensors; ++k) {
        const std::string where = "tensor info #" + std::to_string(k);
        GgufTensorInfo ti;
        ti.name = c.string(where, "a tensor name");
        if (ti.name.empty()) load_fail(path, where, "expected a non-empty tensor name, found an empty one");
        const std::string label = tensor_label(ti.name);
        if (!names.insert(ti.name).second) load_fail(path, label, "expected a unique name, found a duplicate");
        const uint32_t nd = c.read<uint32_t>(label, "a dimension count");
        if (nd > dims_max)
            load_fail(path, label, "expected at most " + std::to_string(dims_max) + " dimensions, found " +
                      std::to_string(nd));
        std::vector<int64_t> ne(nd);  // innermost (contiguous) first, as in the file
        int64_t numel = 1, span = 8;  // span: LibTorch's contiguous strides (zeros as ones) in bytes
        for (uint32_t d = 0; d < nd; ++d) {
            const uint64_t n = c.read<uint64_t>(label, "a dimension");
            if (n > uint64_t(INT64_MAX) || __builtin_mul_overflow(numel, int64_t(n), &numel) ||
                __builtin_mul_overflow(span, std::max<int64_t>(int64_t(n), 1), &span))
                load_fail(path, label, "expected sizes whose product (zeros counted as ones) fits in 64 bits, found dimension " +
                          std::to_string(d) + " = " + std::to_string(n));
            ne[d] = int64_t(n);
        }
        const uint32_t tt = c.read<uint32_t>(label, "a tensor type");
        const TypeInfo * info = type_find(tt);
        if (!info) load_fail(path, label, "expected a known ggml type, found type " + std::to_string(tt));
        ti.type = info->type;
        ti.offset = c.read<uint64_t>(label, "a data offset");
        ti.shape.assign(ne.rbegin(), ne.rend());
        ti.numel = numel;
        // Blocks run along the innermost dimension, so it alone must be a whole number of blocks.
        const int64_t ne0 = nd ? ne[0] : 1;
        if (ne0 % info->block != 0)
            load_fail(path, label, std::string("expected the innermost dimension to be a multiple of ") +
                      std::to_string(info->block) + " for " + info->name + ", found shape " +
                      dims_format(ti.shape));
        int64_t nbytes = 0;
        if (__builtin_mul_overflow(numel / info->block, info->size, &nbytes))
            load_fail(path, label, "expected a byte size that fits in 64 bits, found shape " + dims_format(ti.shape));
        ti.nbytes = uint64_t(nbytes);
        f.tensors.push_back(std::move(ti));
    }

    // The data section starts at the next multiple of the alignment.
    const uint64_t header_end = c.pos;
    f.data_offset = header_end + (f.alignment - header_end % f.alignment) % f.alignment;
    if (f.data_offset > file_size) {
        if (!f.tensors.empty())
            load_fail(path, "data section", "expected it at offset " + std::to_string(f.data_offset) +
                      ", found the end of the file (" + std::to_string(file_size) + " bytes)");
        f.data_offset = file_size;  // no tensors: writers may leave the padding out
    }
    const uint64_t data_size = file_size - f.data_offset;

    std::vector<const GgufTensorInfo *> order;
    for (const auto & t : f.tensors) {
        const std::string label = tensor_label(t.name);
        if (t.offset % f.alignment != 0)
            load_fail(path, label, "expected a data offset aligned to " + std::to_string(f.alignment) +
                      ", found " + std::to_string(t.offset));
        if (t.offset > data_size || t.nbytes > data_size - t.offset)
            load_fail(path, label, "expected data [" + std::to_string(t.offset) + ", " +
                      std::to_string(t.offset + t.nbytes) + ") within the data section of " +
                      std::to_string(data_size) + " bytes, found it runs past the end of the file");
        order.push_back(&t);
    }
    std::sort(order.begin(), order.end(), [](auto * a, auto * b) { return a->offset < b->offset; });
    for (size_t k = 1; k < order.size(); ++k)
        if (order[k - 1]->offset + order[k - 1]->nbytes > order[k]->offset)
            load_fail(path, tensor_label(order[k]->name), "expected data after tensor '" + order[k - 1]->name +
                      "' ends at " + std::to_string(order[k - 1]->offset + order[k - 1]->nbytes) +
                      ", found it starts at " + std::to_string(order[k]->offset) + " (overlap)");
    return f;
} catch (const c10::Error &) {
    gguf_rethrow(path, "header");
} catch (const std::bad_alloc &) {
    gguf_rethrow(path, "header");
} catch (const std::length_error &) {
    gguf_rethrow(path, "header");
}

at::Tensor gguf_tensor_bytes(const GgufFile & f, const std::string & name) {
    const GgufTensorInfo * t = f.tensor_find(name);
    if (!t) load_fail(f.path, tensor_label(name), "expected a tensor of that name, found none");
    uint8_t * p = f.map.get() + f.data_offset + t->offset;
    auto map = f.map;
    return at::from_blob(p, {int64_t(t->nbytes)}, [map](void *) {}, at::TensorOptions().dtype(at::kByte));
}

at::Tensor gguf_tensor(const GgufFile & f, const std::string & name, at::ScalarType out) try {
    const GgufTensorInfo * t = f.tensor_find(name);
    if (!t) load_fail(f.path, tensor_label(name), "expected a tensor of that name, found none");
    if (!f.map) load_fail(f.path, tensor_label(name), "expected an open file, found a closed GgufFile");
    uint8_t * p = f.map.get() + f.data_offset + t->offset;
    const auto map = f.map;

    at::ScalarType stored;
    if (plain_dtype(t->type, stored)) {
        const auto opts = at::TensorOptions().dtype(stored);
        at::Tensor a;
        const int64_t esize = int64_t(c10::elementSize(stored));
        if (t->numel == 0) {
            a = at::empty(t->shape, opts);
        } else if (reinterpret_cast<uintptr_t>(p) % uintptr_t(esize) != 0) {
            a = at::empty(t->shape, opts);  // alignment below the element size: copy
            std::memcpy(a.data_ptr(), p, t->nbytes);
        } else {
            a = at::from_blob(p, t->shape, [map](void *) {}, opts);
        }
        return out == stored ? a : a.to(out);
    }

    BlockFn fn = block_fn(t->type);
    if (!fn)
        load_fail(f.path, tensor_label(name), std::string("expected a type that can be dequantized (") +
                  dequantizable_list() + "), found " + ggml_type_name(t->type));
    if (!at::isFloatingType(out))
        load_fail(f.path, tensor_label(name), std::string("expected a floating output dtype for ") +
                  ggml_type_name(t->type) + ", found " + c10::toString(out));
    const TypeInfo * info = type_find(uint32_t(t->type));
    at::Tensor y = at::empty(t->shape, at::TensorOptions().dtype(at::kFloat));
    blocks_dispatch(t->type, p, y.data_ptr<float>(), t->numel / info->block, info->block, info->size);
    return out == at::kFloat ? y : y.to(out);
} catch (const c10::Error &) {
    gguf_rethrow(f.path, tensor_label(name));
} catch (const std::bad_alloc &) {
    gguf_rethrow(f.path, tensor_label(name));
} catch (const std::length_error &) {
    gguf_rethrow(f.path, tensor_label(name));
}

// -- metadata getters ---------------------------------------------------------------------------

namespace {

[[noreturn]] void type_fail(const GgufFile & f, const std::string & key, const char * expected, const GgufValue & v) {
    load_fail(f.path, key_label(key), std::string("expected ") + expected + ", found " + v.type_string());
}

int64_t value_int(const GgufFile & f, const std::string & key, const GgufValue & v) {
    if (!v.is_integer()) type_fail(f, key, "an integer", v);
    if (v.type == GgufType::UINT64 && v.u > uint64_t(INT64_MAX))
        load_fail(f.path, key_label(key), "expected an integer that fits int64, found " + std::to_string(v.u));
    switch (v.type) {
    case GgufType::UINT8: case GgufType::UINT16: case GgufType::UINT32: case GgufType::UINT64:
        return int64_t(v.u);
    default:
        return v.i;
    }
}

double value_float(const GgufFile & f, const std::string & key, const GgufValue & v) {
    if (v.is_float()) return v.f;
    if (v.is_integer()) return double(value_int(f, key, v));
    type_fail(f, key, "a number", v);
}

const GgufValue & array_get(const GgufFile & f, const std::string & key, const char * expected) {
    const GgufValue & v = gguf_get(f, key);
    if (v.type != GgufType::ARRAY) type_fail(f, key, expected, v);
    return v;
}

} // namespace

bool gguf_has(const GgufFile & f, const std::string & key) { return f.metadata.count(key) != 0; }

const GgufValue & gguf_get(const GgufFile & f, const std::string & key) {
    auto it = f.metadata.find(key);
    if (it == f.metadata.end()) load_fail(f.path, key_label(key), "expected a metadata entry, found none");
    return it->second;
}

std::string gguf_get_string(const GgufFile & f, const std::string & key) {
    const GgufValue & v = gguf_get(f, key);
    if (v.type != GgufType::STRING) type_fail(f, key, "string", v);
    return v.s;
}

int64_t gguf_get_int(const GgufFile & f, const std::string & key) { return value_int(f, key, gguf_get(f, key)); }

int64_t gguf_get_int(const GgufFile & f, const std::string & key, int64_t def) {
    return gguf_has(f, key) ? gguf_get_int(f, key) : def;
}

double gguf_get_float(const GgufFile & f, const std::string & key) { return value_float(f, key, gguf_get(f, key)); }

double gguf_get_float(const GgufFile & f, const std::string & key, double def) {
    return gguf_has(f, key) ? gguf_get_float(f, key) : def;
}

bool gguf_get_bool(const GgufFile & f, const std::string & key) {
    const GgufValue & v = gguf_get(f, key);
    if (v.type != GgufType::BOOL) type_fail(f, key, "bool", v);
    return v.i != 0;
}

std::vector<std::string> gguf_get_strings(const GgufFile & f, const std::string & key) {
    const GgufValue & v = array_get(f, key, "array of string");
    if (v.item_type != GgufType::STRING) type_fail(f, key, "array of string", v);
    return v.strings;
}

std::vector<int64_t> gguf_get_ints(const GgufFile & f, const std::string & key) {
    const GgufValue & v = array_get(f, key, "array of integers");
    std::vector<int64_t> out;
    out.reserve(v.size());
    for (size_t k = 0; k < v.size(); ++k) {
        const GgufValue x = v.item(k);
        if (!x.is_integer()) type_fail(f, key, "array of integers", v);
        out.push_back(value_int(f, key, x));
    }
    return out;
}

std::vector<double> gguf_get_floats(const GgufFile & f, const std::string & key) {
    const GgufValue & v = array_get(f, key, "array of numbers");
    std::vector<double> out;
    out.reserve(v.size());
    for (size_t k = 0; k < v.size(); ++k) {
        const GgufValue x = v.item(k);
        if (!x.is_integer() && !x.is_float()) type_fail(f, key, "array of numbers", v);
        out.push_back(value_float(f, key, x));
    }
    return out;
}

// -- llama → Hugging Face -------------------------------------------------------------------------

std::string gguf_hf_name(const std::string & g) {
    static const std::pair<const char *, const char *> top[] = {
        {"token_embd.weight", "model.embed_tokens.weight"},
        {"output_norm.weight", "model.norm.weight"},
        {"output.weight", "lm_head.weight"},
    };
    for (const auto & [from, to] : top)
        if (g == from) return to;
    // HF derives the rotary frequencies from the config; llama.cpp's precomputed ones have no home.
    if (g == "rope_freqs.weight" || g.rfind("rope_factors_", 0) == 0) return "";
    static const std::pair<const char *, const char *> layer[] = {
        {"attn_q", "self_attn.q_proj"}, {"attn_k", "self_attn.k_proj"}, {"attn_v", "self_attn.v_proj"},
        {"attn_output", "self_attn.o_proj"}, {"ffn_gate", "mlp.gate_proj"}, {"ffn_up", "mlp.up_proj"},
        {"ffn_down", "mlp.down_proj"}, {"attn_norm", "input_layernorm"},
        {"ffn_norm", "post_attention_layernorm"},
    };
    if (g.rfind("blk.", 0) == 0) {
        size_t i = 4;
        while (i < g.size() && g[i] >= '0' && g[i] <= '9') ++i;
        if (i > 4 && i < g.size() && g[i] == '.') {
            const std::string n = g.substr(4, i - 4);
            const std::string rest = g.substr(i + 1);
            const size_t dot = rest.find('.');
            const std::string part = rest.substr(0, dot);
            const std::string suffix = dot == std::string::npos ? "" : rest.substr(dot);
            if (part == "rot_embd") return "";  // old converters stored the rotary table per layer
            for (const auto & [from, to] : layer)
                if (part == from) return "model.layers." + n + "." + to + suffix;
        }
    }
    return g;
}

namespace {

// A float32 value as the shortest decimal that reads back as the same float (1e-05, not
// 9.999999747378752e-06), as HF's own config has it.
double float32_shortest(double v) {
    const float x = float(v);
    char buf[64];
    for (int prec = 1; prec <= 9; ++prec) {
        std::snprintf(buf, sizeof buf, "%.*g", prec, double(x));
        if (std::strtof(buf, nullptr) == x) return std::strtod(buf, nullptr);
    }
    return double(x);
}

double config_float(const GgufFile & f, const std::string & key, double def) {
    if (!gguf_has(f, key)) return def;
    const GgufValue & v = gguf_get(f, key);
    const double x = gguf_get_float(f, key);
    return v.type == GgufType::FLOAT32 ? float32_shortest(x) : x;
}

int64_t config_positive(const GgufFile & f, const std::string & key) {
    const int64_t v = gguf_get_int(f, key);
    if (v <= 0) load_fail(f.path, key_label(key), "expected a positive integer, found " + std::to_string(v));
    return v;
}

} // namespace

nlohmann::ordered_json gguf_hf_config(const GgufFile & f) {
    const std::string arch = gguf_get_string(f, "general.architecture");
    if (arch != "llama")
        load_fail(f.path, key_label("general.architecture"), "expected \"llama\" for the Hugging Face "
                  "mapping, found \"" + arch + "\"");
    const int64_t hidden = config_positive(f, "llama.embedding_length");
    const int64_t heads = config_positive(f, "llama.attention.head_count");
    const int64_t kv_heads = gguf_has(f, "llama.attention.head_count_kv") ?
                             config_positive(f, "llama.attention.head_count_kv") : heads;
    if (heads % kv_heads != 0)
        load_fail(f.path, key_label("llama.attention.head_count_kv"), "expected a divisor of head_count " +
                  std::to_string(heads) + ", found " + std::to_string(kv_heads));
    const int64_t head_dim = gguf_has(f, "llama.attention.key_length") ?
                             config_positive(f, "llama.attention.key_length") : hidden / heads;
    // HF's LlamaAttention rotates the whole head; a partial rotary would silently differ.
    const int64_t rot = gguf_get_int(f, "llama.rope.dimension_count", head_dim);
    if (rot != head_dim)
        load_fail(f.path, key_label("llama.rope.dimension_count"), "expected the head size " +
                  std::to_string(head_dim) + " (HF Llama rotates whole heads), found " + std::to_string(rot));

    int64_t vocab = gguf_get_int(f, "llama.vocab_size", 0);
    if (vocab == 0 && gguf_has(f, "tokenizer.ggml.tokens"))
        vocab = int64_t(gguf_get(f, "tokenizer.ggml.tokens").size());
    if (vocab == 0)
        if (const GgufTensorInfo * e = f.tensor_find("token_embd.weight"))
            if (!e->shape.empty()) vocab = e->shape[0];

    nlohmann::ordered_json c;
    c["architectures"] = {"LlamaForCausalLM"};
    c["model_type"] = "llama";
    c["hidden_size"] = hidden;
    c["intermediate_size"] = config_positive(f, "llama.feed_forward_length");
    c["num_hidden_layers"] = config_positive(f, "llama.block_count");
    c["num_attention_heads"] = heads;
    c["num_key_value_heads"] = kv_heads;
    c["head_dim"] = head_dim;
    c["hidden_act"] = "silu";
    c["rms_norm_eps"] = config_float(f, "llama.attention.layer_norm_rms_epsilon", 1e-6);
    c["rope_theta"] = config_float(f, "llama.rope.freq_base", 10000.0);
    c["vocab_size"] = vocab;
    c["max_position_embeddings"] = gguf_get_int(f, "llama.context_length", 2048);
    c["tie_word_embeddings"] = f.tensor_find("output.weight") == nullptr;
    c["attention_bias"] = f.tensor_find("blk.0.attn_q.bias") != nullptr;
    c["mlp_bias"] = false;
    if (gguf_has(f, "llama.rope.scaling.type") && gguf_get_string(f, "llama.rope.scaling.type") == "linear")
        c["rope_scaling"] = {{"rope_type", "linear"}, {"factor", config_float(f, "llama.rope.scaling.factor", 1.0)}};
    static const std::pair<const char *, const char *> ids[] = {
        {"tokenizer.ggml.bos_token_id", "bos_token_id"}, {"tokenizer.ggml.eos_token_id", "eos_token_id"},
        {"tokenizer.ggml.padding_token_id", "pad_token_id"},
    };
    for (const auto & [from, to] : ids)
        if (gguf_has(f, from)) c[to] = gguf_get_int(f, from);
    c["torch_dtype"] = "float32";
    return c;
}

// llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) reorders the rows of q_proj (with
// n_head) and k_proj (with n_head_kv), weights and biases, from HF's rotate_half layout, where
// each head's rows are [first half | second half] of the rotary pairs, to the interleaved
// layout of Meta's original checkpoints that llama.cpp's rope expects (pair i = rows 2i, 2i+1):
//     w.reshape(n_head, 2, head_dim/2, ...).swapaxes(1, 2).reshape(w.shape)
// Every llama-architecture GGUF is in that interleaved layout, so we always apply the inverse
// (Transformers' GGUF loader does the same in LlamaTensorProcessor._reverse_permute_weights):
//     w.reshape(n_head, head_dim/2, 2, ...).swapaxes(1, 2).reshape(w.shape)
at::Tensor gguf_unpermute_qk(const at::Tensor & w, int64_t n_head) {
    const int64_t rows = w.size(0);
    if (n_head <= 0 || rows % (2 * n_head) != 0)
        throw std::runtime_error("gguf_unpermute_qk: expected rows divisible by 2 * n_head (" +
                                 std::to_string(2 * n_head) + "), found " + std::to_string(rows));
    std::vector<int64_t> s = {n_head, rows / n_head / 2, 2};
    for (int64_t d = 1; d < w.dim(); ++d) s.push_back(w.size(d));
    return w.reshape(s).transpose(1, 2).contiguous().reshape(w.sizes());
}

GgufHfModel gguf_load_hf(const GgufFile & f, at::ScalarType out) {
    GgufHfModel m;
    m.config = gguf_hf_config(f);
    const int64_t heads = m.config["num_attention_heads"].get<int64_t>();
    const int64_t kv_heads = m.config["num_key_value_heads"].get<int64_t>();
    for (const auto & t : f.tensors) {
        const std::string hf = gguf_hf_name(t.name);
        if (hf.empty()) continue;
        const bool is_q = hf.find(".self_attn.q_proj.") != std::string::npos;
        const bool is_k = hf.find(".self_attn.k_proj.") != std::string::npos;
        if (!is_q && !is_k) {
            m.tensors.emplace_back(hf, gguf_tensor(f, t.name, out));
            continue;
        }
        const int64_t n = is_q ? heads : kv_heads;
        const int64_t head_dim = m.config["head_dim"].get<int64_t>();
        if (t.shape.empty() || t.shape[0] != n * head_dim)
            load_fail(f.path, tensor_label(t.name), "expected " + std::to_string(n * head_dim) +
                      " rows (" + std::to_string(n) + " heads of " + std::to_string(head_dim) +
                      "), found shape " + dims_format(t.shape));
        // Permute in the stored float dtype (a pure row shuffle, exact), then convert.
        at::Tensor w = gguf_tensor(f, t.name, at::isFloatingType(out) ? out : at::kFloat);
        m.tensors.emplace_back(hf, gguf_unpermute_qk(w, n).to(out));
    }
    return m;
}

} // namespace qatlab
