// gguf: read llama.cpp's GGUF files (v2, v3): metadata, tensor infos, and tensors dequantized
// from ggml's block formats; plus the llama → Hugging Face name and config mapping.
#pragma once
#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace qatlab {

// Metadata value types, numbered as in the file.
enum class GgufType : uint32_t {
    UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6,
    BOOL = 7, STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char * gguf_type_name(GgufType t);  // "uint32", "string", "array"...

// One metadata value. Integers keep their signedness (UINT64 above INT64_MAX stays exact in
// `u`). Arrays are stored compactly: numbers and bools as their little-endian bytes in `raw`,
// strings in `strings`, nested arrays in `arrays`; item(k) gives element k as a value.
struct GgufValue {
    GgufType type = GgufType::UINT8;
    GgufType item_type = GgufType::UINT8;  // arrays only
    int64_t i = 0;                         // signed integers and bool
    uint64_t u = 0;                        // unsigned integers
    double f = 0;                          // FLOAT32 / FLOAT64
    std::string s;                         // STRING
    std::string raw;                       // ARRAY of numbers or bools
    std::vector<std::string> strings;      // ARRAY of STRING
    std::vector<GgufValue> arrays;         // ARRAY of ARRAY

    bool is_integer() const;
    bool is_float() const { return type == GgufType::FLOAT32 || type == GgufType::FLOAT64; }
    size_t size() const;                   // array length (0 for scalars)
    GgufValue item(size_t k) const;        // element k of an array (bounds-checked)
    std::string type_string() const;       // "uint32", "array of string"...
};

// ggml tensor types, numbered as in the file (gaps are removed types).
enum class GgmlType : uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
    IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22,
    IQ4_XS = 23, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
    TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39,
};
const char * ggml_type_name(GgmlType t);         // "Q4_1"; "type 99" for unknown numbers
bool ggml_type_dequantizable(GgmlType t);        // gguf_tensor can turn it into floats

struct GgufTensorInfo {
    std::string name;
    std::vector<int64_t> shape;   // PyTorch order: outermost first (the file lists innermost first)
    GgmlType type = GgmlType::F32;
    uint64_t offset = 0;          // from the start of the data section
    uint64_t nbytes = 0;
    int64_t numel = 0;
};

struct GgufFile {
    std::string path;
    uint32_t version = 0;
    uint64_t alignment = 32;
    std::map<std::string, GgufValue> metadata;
    std::vector<std::string> metadata_order;    // keys in file order
    std::vector<GgufTensorInfo> tensors;        // in file order
    uint64_t data_offset = 0;                   // absolute offset of the data section
    std::shared_ptr<uint8_t> map;               // the whole file, private copy-on-write mapping
    uint64_t map_size = 0;

    const GgufTensorInfo * tensor_find(const std::string & name) const;  // nullptr if absent
};

// Parses and validates the header; tensor data stays in the mapping until asked for. Throws
// std::runtime_error "<path>: <key or tensor>: expected ..., found ..." on malformed input.
GgufFile gguf_open(const std::string & path);

// One tensor in PyTorch shape. out = kFloat dequantizes any supported type; when out equals
// the stored dtype (F32, F16, BF16, F64, I8..I64) the tensor aliases the mapping (no copy);
// other float outs dequantize to float32 and convert.
at::Tensor gguf_tensor(const GgufFile & f, const std::string & name, at::ScalarType out = at::kFloat);
// The raw stored bytes as a uint8 tensor of nbytes (blocks as in the file).
at::Tensor gguf_tensor_bytes(const GgufFile & f, const std::string & name);

// Typed metadata getters: errors name the key and the expected vs found type.
bool gguf_has(const GgufFile & f, const std::string & key);
const GgufValue & gguf_get(const GgufFile & f, const std::string & key);
std::string gguf_get_string(const GgufFile & f, const std::string & key);
int64_t gguf_get_int(const GgufFile & f, const std::string & key);              // any integer type
int64_t gguf_get_int(const GgufFile & f, const std::string & key, int64_t def); // def if absent
double gguf_get_float(const GgufFile & f, const std::string & key);             // float or integer
double gguf_get_float(const GgufFile & f, const std::string & key, double def);
bool gguf_get_bool(const GgufFile & f, const std::string & key);
std::vector<std::string> gguf_get_strings(const GgufFile & f, const std::string & key);
std::vector<int64_t> gguf_get_ints(const GgufFile & f, const std::string & key);
std::vector<double> gguf_get_floats(const GgufFile & f, const std::string & key);

// -- llama architecture → Hugging Face ---------------------------------------------------------

// The Hugging Face (LlamaForCausalLM) name of a llama-architecture GGUF tensor name; "" for the
// tensors HF has no place for (rope_freqs.weight: HF recomputes it from the config); unknown
// names come back unchanged.
std::string gguf_hf_name(const std::string & gguf_name);

// A Hugging Face config.json for a llama-architecture file (general.architecture must be
// "llama"): hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
// num_key_value_heads, head_dim, rms_norm_eps, rope_theta, vocab_size, max_position_embeddings,
// tie_word_embeddings (true when the file has no output.weight), bos/eos ids when present.
nlohmann::ordered_json gguf_hf_config(const GgufFile & f);

struct GgufHfModel {
    std::vector<std::pair<std::string, at::Tensor>> tensors;  // HF names, file order
    nlohmann::ordered_json config;
};
// Every tensor under its HF name (unmapped ones keep their GGUF name), Q/K rows put back in
// HF's rotate_half order. out as in gguf_tensor.
GgufHfModel gguf_load_hf(const GgufFile & f, at::ScalarType out = at::kFloat);

// The file's byte-level BPE tokenizer (tokenizer.ggml.model "gpt2": tokens, merges, token
// types, pre-tokenizer, special ids); `path` names the file in errors. In gguf_tokenizer.cpp.
class BpeTokenizer;
std::unique_ptr<BpeTokenizer> gguf_tokenizer(const GgufFile & f, const std::string & path);

// Undoes llama.cpp's Q/K row permutation: rows [n_head, head_dim/2, 2] → [n_head, 2, head_dim/2].
at::Tensor gguf_unpermute_qk(const at::Tensor & w, int64_t n_head);

} // namespace qatlab
