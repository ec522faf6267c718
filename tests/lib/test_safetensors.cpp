// Tests for lib/safetensors: hand-built bytes, round trips, interop with Python's safetensors,
// hostile files (truncation, corruption, fuzzing) and the atomic write.
#include "lib/safetensors.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using qatlab::NamedTensors;
using qatlab::safetensors_dtype_name;
using qatlab::safetensors_load;
using qatlab::safetensors_save;

namespace {

// --- byte building, independent of the code under test -------------------------------------

std::string u64_le(uint64_t v) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[i] = char((v >> (8 * i)) & 0xff);
    return s;
}

template <typename T>
std::string raw_bytes(std::initializer_list<T> values) {
    std::string s(values.size() * sizeof(T), '\0');
    size_t i = 0;
    for (T v : values) std::memcpy(&s[sizeof(T) * i++], &v, sizeof(T));
    return s;
}

// A whole file: length, header (optionally space-padded to 8 as the official writer does), data.
std::string file_build(std::string header, const std::string & data, bool pad = true) {
    if (pad) header.append((8 - header.size() % 8) % 8, ' ');
    return u64_le(header.size()) + header + data;
}

void file_write(const std::string & path, const std::string & bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), std::streamsize(bytes.size()));
    ASSERT_TRUE(f.good()) << path;
}

std::string file_read(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// The header of a file we wrote, parsed here rather than by the loader.
nlohmann::ordered_json header_read(const std::string & bytes, uint64_t * header_size = nullptr) {
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(bytes[i])) << (8 * i);
    if (header_size) *header_size = n;
    return nlohmann::ordered_json::parse(bytes.substr(8, n));
}

std::string tensor_bytes(const at::Tensor & t) {
    at::Tensor c = t.cpu().contiguous();
    return std::string(static_cast<const char *>(c.const_data_ptr()), c.nbytes());
}

const at::Tensor & tensor_get(const qatlab::SafetensorsFile & f, const std::string & name) {
    for (const auto & [n, t] : f.tensors)
        if (n == name) return t;
    throw std::runtime_error("no tensor " + name);
}

// Same dtype, shape and bytes: exact, and valid for dtypes at::equal does not cover.
void expect_identical(const at::Tensor & got, const at::Tensor & want, const std::string & what) {
    EXPECT_EQ(got.scalar_type(), want.scalar_type()) << what;
    EXPECT_EQ(got.sizes(), want.sizes()) << what;
    EXPECT_EQ(tensor_bytes(got), tensor_bytes(want)) << what;
}

// The load must throw std::runtime_error mentioning every needle; returns the message.
std::string load_error(const std::string & path, std::initializer_list<std::string> needles) {
    try {
        safetensors_load(path);
    } catch (const std::runtime_error & e) {
        std::string msg = e.what();
        for (const auto & n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
        return msg;
    } catch (const std::exception & e) {
        ADD_FAILURE() << "wrong exception type for " << path << ": " << e.what();
        return {};
    }
    ADD_FAILURE() << "no error loading " << path;
    return {};
}

class Safetensors : public ::testing::Test {
protected:
    TestTempDir tmp{"qatlab_safetensors_"};

    std::vector<std::string> dir_list() const {
        std::vector<std::string> names;
        for (const auto & e : fs::directory_iterator(tmp.dir())) names.push_back(e.path().filename().string());
        return names;
    }
};

// The tensors used by the round trip and interop tests, built from formulas Python can repeat.
NamedTensors tensors_sample() {
    auto grid = at::arange(12, at::kFloat).reshape({3, 4});
    return {
        {"f32", grid * 0.25 - 1},
        {"f64", at::arange(5, at::kDouble) / 3.0},
        {"f16", (grid * 0.5 - 2).to(at::kHalf)},
        {"bf16", at::tensor({1.0f, -2.5f, 3.140625f, 1e-3f}).to(at::kBFloat16)},
        {"i8", at::tensor({-128, -1, 0, 127}, at::kChar)},
        {"u8", at::tensor({0, 1, 128, 255}, at::kByte)},
        {"i16", at::tensor({-32768, 0, 32767}, at::kShort)},
        {"i32", at::tensor({-2147483647 - 1, 0, 2147483647}, at::kInt)},
        {"i64", at::tensor({-(int64_t(1) << 40), int64_t(0), int64_t(1) << 62}, at::kLong)},
        {"bool", at::tensor({1, 0, 0, 1, 1}, at::kLong).to(at::kBool)},
        {"scalar", at::scalar_tensor(3.5, at::kFloat)},
        {"empty", at::empty({0, 3}, at::kFloat)},
        {"transposed", grid.t()},
    };
}

} // namespace

// --- hand-built bytes -------------------------------------------------------------------------

TEST_F(Safetensors, LoadsHandBuiltFile) {
    const std::vector<float> w = {1.5f, -2.25f, 0.0f, 3e-8f, 1e30f, -0.0f};
    const std::string header = R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                               R"("idx":{"dtype":"I64","shape":[2],"data_offsets":[24,40]},)"
                               R"("__metadata__":{"format":"pt"}})";
    const std::string data = raw_bytes<float>({w[0], w[1], w[2], w[3], w[4], w[5]}) +
                             raw_bytes<int64_t>({-5, int64_t(1) << 40});
    // Unpadded, the data lands misaligned: the loader must still get every value right.
    for (bool pad : {true, false}) {
        SCOPED_TRACE(pad ? "padded header" : "unpadded header");
        file_write(tmp.path("hand.safetensors"), file_build(header, data, pad));
        auto f = safetensors_load(tmp.path("hand.safetensors"));
        ASSERT_EQ(f.tensors.size(), 2u);
        EXPECT_EQ(f.tensors[0].first, "w");  // file-offset order
        EXPECT_EQ(f.tensors[1].first, "idx");
        const at::Tensor & tw = f.tensors[0].second;
        EXPECT_EQ(tw.scalar_type(), at::kFloat);
        EXPECT_EQ(tw.sizes(), (std::vector<int64_t>{2, 3}));
        EXPECT_TRUE(tw.is_contiguous());
        for (int i = 0; i < 6; ++i) {
            float v = tw.flatten()[i].item<float>();
            EXPECT_EQ(std::memcmp(&v, &w[i], 4), 0) << i;  // bitwise: keeps -0.0 and 3e-8 exact
        }
        const at::Tensor & ti = f.tensors[1].second;
        EXPECT_EQ(ti.scalar_type(), at::kLong);
        EXPECT_EQ(ti[0].item<int64_t>(), -5);
        EXPECT_EQ(ti[1].item<int64_t>(), int64_t(1) << 40);
        EXPECT_EQ(f.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
    }
}

TEST_F(Safetensors, LoadsHandBuiltHalfBf16BoolAndIntegers) {
    // Bit patterns from the IEEE / bfloat16 definitions, not from torch's conversions.
    const std::string header =
        R"({"bf":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},)"
        R"("h":{"dtype":"F16","shape":[3],"data_offsets":[6,12]},)"
        R"("b":{"dtype":"BOOL","shape":[3],"data_offsets":[12,15]},)"
        R"("u":{"dtype":"U8","shape":[2],"data_offsets":[15,17]},)"
        R"("c":{"dtype":"I8","shape":[2],"data_offsets":[17,19]},)"
        R"("s":{"dtype":"I16","shape":[1],"data_offsets":[19,21]},)"
        R"("i":{"dtype":"I32","shape":[1],"data_offsets":[21,25]},)"
        R"("d":{"dtype":"F64","shape":[1],"data_offsets":[25,33]}})";
    const std::string data = raw_bytes<uint16_t>({0x3F80, 0xC010, 0x7F80}) +  // 1, -2.25, inf
                             raw_bytes<uint16_t>({0x3C00, 0xC100, 0x0001}) +  // 1, -2.5, 2^-24
                             raw_bytes<uint8_t>({1, 0, 1}) + raw_bytes<uint8_t>({0, 255}) +
                             raw_bytes<int8_t>({-128, 127}) + raw_bytes<int16_t>({-300}) +
                             raw_bytes<int32_t>({123456789}) + raw_bytes<double>({-0.1});
    file_write(tmp.path("mixed.safetensors"), file_build(header, data));
    auto f = safetensors_load(tmp.path("mixed.safetensors"));
    ASSERT_EQ(f.tensors.size(), 8u);

    auto bf = tensor_get(f, "bf");
    EXPECT_EQ(bf.scalar_type(), at::kBFloat16);
    EXPECT_EQ(bf[0].item<float>(), 1.0f);
    EXPECT_EQ(bf[1].item<float>(), -2.25f);
    EXPECT_TRUE(std::isinf(bf[2].item<float>()));
    auto h = tensor_get(f, "h");
    EXPECT_EQ(h.scalar_type(), at::kHalf);
    EXPECT_EQ(h[0].item<float>(), 1.0f);
    EXPECT_EQ(h[1].item<float>(), -2.5f);
    EXPECT_EQ(h[2].item<float>(), std::ldexp(1.0f, -24));
    auto b = tensor_get(f, "b");
    EXPECT_EQ(b.scalar_type(), at::kBool);
    EXPECT_TRUE(b[0].item<bool>());
    EXPECT_FALSE(b[1].item<bool>());
    EXPECT_EQ(b.sum().item<int64_t>(), 2);
    EXPECT_EQ(tensor_get(f, "u")[1].item<int64_t>(), 255);
    EXPECT_EQ(tensor_get(f, "c")[0].item<int64_t>(), -128);
    EXPECT_EQ(tensor_get(f, "s")[0].item<int64_t>(), -300);
    EXPECT_EQ(tensor_get(f, "i")[0].item<int64_t>(), 123456789);
    EXPECT_EQ(tensor_get(f, "d")[0].item<double>(), -0.1);
}

TEST_F(Safetensors, EmptyHeaderIsValid) {
    for (bool pad : {true, false}) {
        file_write(tmp.path("empty.safetensors"), file_build("{}", "", pad));
        auto f = safetensors_load(tmp.path("empty.safetensors"));
        EXPECT_TRUE(f.tensors.empty());
        EXPECT_TRUE(f.metadata.empty());
    }
    safetensors_save(tmp.path("saved_empty.safetensors"), {});
    EXPECT_EQ(file_read(tmp.path("saved_empty.safetensors")), file_build("{}", ""));
    EXPECT_TRUE(safetensors_load(tmp.path("saved_empty.safetensors")).tensors.empty());
}

// --- round trips ------------------------------------------------------------------------------

TEST_F(Safetensors, RoundTripsEveryDtype) {
    NamedTensors in;
    const auto grid = at::arange(-6, 6, at::kLong).reshape({3, 4});
    for (const auto & [dtype, name] : std::vector<std::pair<at::ScalarType, std::string>>{
             {at::kFloat, "F32"}, {at::kHalf, "F16"}, {at::kBFloat16, "BF16"}, {at::kDouble, "F64"},
             {at::kChar, "I8"}, {at::kByte, "U8"}, {at::kShort, "I16"}, {at::kInt, "I32"},
             {at::kLong, "I64"}, {at::kBool, "BOOL"}, {at::ScalarType::Float8_e4m3fn, "F8_E4M3"},
             {at::ScalarType::Float8_e5m2, "F8_E5M2"}, {at::ScalarType::UInt16, "U16"},
             {at::ScalarType::UInt32, "U32"}, {at::ScalarType::UInt64, "U64"}}) {
        EXPECT_STREQ(safetensors_dtype_name(dtype), name.c_str());
        at::Tensor t;
        if (dtype == at::kBool) t = grid.remainder(3).eq(0);
        else if (at::isFloatingType(dtype)) t = (grid.to(at::kFloat) * 0.75).to(dtype);
        else if (dtype == at::kByte || dtype == at::ScalarType::UInt16 || dtype == at::ScalarType::UInt32 ||
                 dtype == at::ScalarType::UInt64) t = (grid + 6).to(dtype);
        else t = grid.to(dtype);
        in.emplace_back("t_" + name, t);
    }
    safetensors_save(tmp.path("all.safetensors"), in);
    auto f = safetensors_load(tmp.path("all.safetensors"));
    ASSERT_EQ(f.tensors.size(), in.size());
    for (size_t i = 0; i < in.size(); ++i) {
        EXPECT_EQ(f.tensors[i].first, in[i].first);
        expect_identical(f.tensors[i].second, in[i].second, in[i].first);
    }
    // The on-disk header, read independently: dtype strings, padding, contiguous offsets in order.
    const std::string bytes = file_read(tmp.path("all.safetensors"));
    uint64_t n;
    auto header = header_read(bytes, &n);
    EXPECT_EQ(n % 8, 0u);
    uint64_t pos = 0;
    size_t i = 0;
    for (auto it = header.begin(); it != header.end(); ++it, ++i) {
        EXPECT_EQ(it.key(), in[i].first);
        EXPECT_EQ((*it)["dtype"], in[i].first.substr(2));
        EXPECT_EQ((*it)["shape"], nlohmann::ordered_json({3, 4}));
        EXPECT_EQ((*it)["data_offsets"][0], pos);
        pos += in[i].second.nbytes();
        EXPECT_EQ((*it)["data_offsets"][1], pos);
        EXPECT_EQ(bytes.substr(8 + n + (*it)["data_offsets"][0].get<uint64_t>(), in[i].second.nbytes()),
                  tensor_bytes(in[i].second));
    }
    EXPECT_EQ(bytes.size(), 8 + n + pos);
}

TEST_F(Safetensors, RoundTripsScalarsEmptyTensorsAndMetadata) {
    const std::map<std::string, std::string> meta = {
        {"format", "pt"}, {"empty", ""}, {"quote \" and \\", "h\u00e9llo \u2713\nline"}};
    NamedTensors in = {{"scalar", at::scalar_tensor(3.5, at::kDouble)},
                       {"empty", at::empty({0, 3}, at::kFloat)},
                       {"empty_bool", at::empty({0}, at::kBool)},
                       {"after", at::tensor({7, 8}, at::kInt)}};
    safetensors_save(tmp.path("edge.safetensors"), in, meta);
    auto header = header_read(file_read(tmp.path("edge.safetensors")));
    EXPECT_EQ(header["scalar"]["shape"], nlohmann::ordered_json::array());
    EXPECT_EQ(header["empty"]["data_offsets"], nlohmann::ordered_json({8, 8}));

    auto f = safetensors_load(tmp.path("edge.safetensors"));
    EXPECT_EQ(f.metadata, meta);
    ASSERT_EQ(f.tensors.size(), 4u);
    auto s = tensor_get(f, "scalar");
    EXPECT_EQ(s.dim(), 0);
    EXPECT_EQ(s.item<double>(), 3.5);
    EXPECT_EQ(tensor_get(f, "empty").sizes(), (std::vector<int64_t>{0, 3}));
    EXPECT_EQ(tensor_get(f, "empty").scalar_type(), at::kFloat);
    EXPECT_EQ(tensor_get(f, "empty_bool").numel(), 0);
    expect_identical(tensor_get(f, "after"), in[3].second, "after");
}

TEST_F(Safetensors, SavesNonContiguousViews) {
    const auto base = at::arange(24, at::kFloat).reshape({4, 6});
    NamedTensors in = {{"transpose", base.t()},
                       {"slice", base.slice(0, 1, 4).slice(1, 0, 6, 2)},  // storage offset + stride
                       {"expanded", at::tensor({2.5f}).expand({5})},      // stride 0
                       {"neg_view", at::_neg_view(base[0])}};
    ASSERT_FALSE(in[0].second.is_contiguous());
    safetensors_save(tmp.path("views.safetensors"), in);
    auto f = safetensors_load(tmp.path("views.safetensors"));
    EXPECT_TRUE(at::equal(tensor_get(f, "transpose"), base.t()));
    EXPECT_EQ(tensor_get(f, "transpose").sizes(), (std::vector<int64_t>{6, 4}));
    // Element (i, j) of the transpose is base[j][i] = 6 j + i: checked without torch's copy.
    auto t = tensor_get(f, "transpose");
    for (int i = 0; i < 6; ++i)
        for (int j = 0; j < 4; ++j) EXPECT_EQ(t[i][j].item<float>(), float(6 * j + i));
    auto sl = tensor_get(f, "slice");
    EXPECT_EQ(sl.sizes(), (std::vector<int64_t>{3, 3}));
    EXPECT_EQ(sl[0][0].item<float>(), 6.0f);
    EXPECT_EQ(sl[2][2].item<float>(), 22.0f);
    EXPECT_TRUE(at::equal(tensor_get(f, "expanded"), at::full({5}, 2.5f)));
    EXPECT_EQ(tensor_get(f, "neg_view")[5].item<float>(), -5.0f);
    // Only the logical elements are written, not the underlying storage.
    uint64_t n;
    header_read(file_read(tmp.path("views.safetensors")), &n);
    EXPECT_EQ(fs::file_size(tmp.path("views.safetensors")), 8 + n + 4 * (24 + 9 + 5 + 6));
}

TEST_F(Safetensors, KeepsTheGivenOrder) {
    NamedTensors in = {{"z", at::ones({2})}, {"a", at::zeros({3}, at::kLong)}, {"m", at::ones({1}, at::kHalf)}};
    safetensors_save(tmp.path("order.safetensors"), in);
    auto header = header_read(file_read(tmp.path("order.safetensors")));
    std::vector<std::string> keys;
    for (auto it = header.begin(); it != header.end(); ++it) keys.push_back(it.key());
    EXPECT_EQ(keys, (std::vector<std::string>{"z", "a", "m"}));
    EXPECT_EQ(header["a"]["data_offsets"], nlohmann::ordered_json({8, 32}));
    auto f = safetensors_load(tmp.path("order.safetensors"));
    EXPECT_EQ(f.tensors[0].first, "z");
    EXPECT_EQ(f.tensors[1].first, "a");
    EXPECT_EQ(f.tensors[2].first, "m");
}

TEST_F(Safetensors, LoadedTensorsAreCopyOnWriteAndOutliveTheFile) {
    safetensors_save(tmp.path("cow.safetensors"), {{"w", at::arange(6, at::kFloat)}, {"v", at::ones({2})}});
    const std::string before = file_read(tmp.path("cow.safetensors"));
    at::Tensor w;
    {
        auto f = safetensors_load(tmp.path("cow.safetensors"));
        w = tensor_get(f, "w");
    }
    w.mul_(10);  // writable; must not reach the file
    EXPECT_EQ(file_read(tmp.path("cow.safetensors")), before);
    fs::remove(tmp.path("cow.safetensors"));  // the mapping outlives the name
    EXPECT_TRUE(at::equal(w, at::arange(6, at::kFloat) * 10));
    at::Tensor view = w.slice(0, 2, 4);
    w = at::Tensor();
    EXPECT_EQ(view[1].item<float>(), 30.0f);
}

TEST_F(Safetensors, SavesFromCuda) {
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
    auto t = at::arange(10, at::kFloat).to(at::kBFloat16).cuda().reshape({2, 5}).t();
    safetensors_save(tmp.path("cuda.safetensors"), {{"t", t}});
    auto f = safetensors_load(tmp.path("cuda.safetensors"));
    expect_identical(tensor_get(f, "t"), t.cpu(), "t");
    EXPECT_TRUE(tensor_get(f, "t").device().is_cpu());
}

// --- interop with Python's safetensors --------------------------------------------------------

TEST_F(Safetensors, PythonLoadsOurFile) {
    ASSERT_NE(test_python(), nullptr)
        << "QATLAB_PYTHON must name a python3 with torch and safetensors (CTest sets it)";
    safetensors_save(tmp.path("ours.safetensors"), tensors_sample(), {{"format", "pt"}, {"note", "h\u00e9llo"}});
    const std::string script = R"PY(
import sys, torch
from safetensors import safe_open
from safetensors.torch import load_file
path = sys.argv[1]
got = load_file(path)
grid = torch.arange(12, dtype=torch.float32).reshape(3, 4)
want = {
    "f32": grid * 0.25 - 1,
    "f64": torch.arange(5, dtype=torch.float64) / 3.0,
    "f16": (grid * 0.5 - 2).to(torch.float16),
    "bf16": torch.tensor([1.0, -2.5, 3.140625, 1e-3]).to(torch.bfloat16),
    "i8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 1, 128, 255], dtype=torch.uint8),
    "i16": torch.tensor([-32768, 0, 32767], dtype=torch.int16),
    "i32": torch.tensor([-2**31, 0, 2**31 - 1], dtype=torch.int32),
    "i64": torch.tensor([-(1 << 40), 0, 1 << 62], dtype=torch.int64),
    "bool": torch.tensor([True, False, False, True, True]),
    "scalar": torch.tensor(3.5),
    "empty": torch.empty(0, 3),
    "transposed": grid.t(),
}
assert sorted(got) == sorted(want), (sorted(got), sorted(want))
for k, w in want.items():
    g = got[k]
    assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
    assert g.shape == w.shape, (k, g.shape, w.shape)
    assert torch.equal(g, w), (k, g, w)
assert [hex(x) for x in got["bf16"].view(torch.int16).tolist()] == ["0x3f80", "-0x3fe0", "0x4049", "0x3a83"], got["bf16"].view(torch.int16)
with safe_open(path, framework="pt") as f:
    assert f.metadata() == {"format": "pt", "note": "h\u00e9llo"}, f.metadata()
print("python ok")
)PY";
    std::string out;
    EXPECT_EQ(test_python_run(script, {tmp.path("ours.safetensors")}, &out), 0) << out;
    EXPECT_NE(out.find("python ok"), std::string::npos) << out;
}

TEST_F(Safetensors, LoadsPythonFile) {
    ASSERT_NE(test_python(), nullptr)
        << "QATLAB_PYTHON must name a python3 with torch and safetensors (CTest sets it)";
    const std::string script = R"PY(
import sys, torch
from safetensors.torch import save_file
grid = torch.arange(12, dtype=torch.float32).reshape(3, 4)
save_file({
    "f32": grid * 0.25 - 1,
    "f64": torch.arange(5, dtype=torch.float64) / 3.0,
    "f16": (grid * 0.5 - 2).to(torch.float16),
    "bf16": torch.tensor([1.0, -2.5, 3.140625, 1e-3]).to(torch.bfloat16),
    "i8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 1, 128, 255], dtype=torch.uint8),
    "i16": torch.tensor([-32768, 0, 32767], dtype=torch.int16),
    "i32": torch.tensor([-2**31, 0, 2**31 - 1], dtype=torch.int32),
    "i64": torch.tensor([-(1 << 40), 0, 1 << 62], dtype=torch.int64),
    "bool": torch.tensor([True, False, False, True, True]),
    "scalar": torch.tensor(3.5),
    "empty": torch.empty(0, 3),
    "transposed": grid.t().contiguous(),
    "f8": torch.tensor([0.5, -1.0, 448.0]).to(torch.float8_e4m3fn),
}, sys.argv[1], metadata={"format": "pt", "source": "python"})
)PY";
    std::string out;
    ASSERT_EQ(test_python_run(script, {tmp.path("theirs.safetensors")}, &out), 0) << out;
    auto f = safetensors_load(tmp.path("theirs.safetensors"));
    EXPECT_EQ(f.metadata, (std::map<std::string, std::string>{{"format", "pt"}, {"source", "python"}}));
    auto want = tensors_sample();
    ASSERT_EQ(f.tensors.size(), want.size() + 1);
    for (const auto & [name, t] : want) expect_identical(tensor_get(f, name), t, name);
    // Independent of torch's float conversions: the bf16 bit patterns of 1, -2.5, pi~, 1e-3.
    auto bf = tensor_get(f, "bf16").view(at::kShort);
    EXPECT_EQ(uint16_t(bf[0].item<int64_t>()), 0x3F80);
    EXPECT_EQ(uint16_t(bf[1].item<int64_t>()), 0xC020);
    EXPECT_EQ(uint16_t(bf[2].item<int64_t>()), 0x4049);
    EXPECT_EQ(uint16_t(bf[3].item<int64_t>()), 0x3A83);
    auto f8 = tensor_get(f, "f8");
    EXPECT_EQ(f8.scalar_type(), at::ScalarType::Float8_e4m3fn);
    EXPECT_EQ(tensor_bytes(f8), std::string("\x30\xb8\x7e", 3));  // e4m3fn: 0.5, -1, 448
    EXPECT_EQ(tensor_get(f, "i64")[2].item<int64_t>(), int64_t(1) << 62);
}

// --- hostile files ----------------------------------------------------------------------------

TEST_F(Safetensors, RejectsShortAndOversizedHeaders) {
    const std::string p = tmp.path("bad.safetensors");
    file_write(p, std::string("\x10\x00\x00", 3));
    load_error(p, {p, "header length", "3 bytes"});
    file_write(p, u64_le(1000) + std::string(20, ' '));
    load_error(p, {p, "header length", "1000"});
    file_write(p, u64_le(uint64_t(1) << 63) + "{}");
    load_error(p, {p, "header length"});
    file_write(p, u64_le(200'000'000) + "{}");
    load_error(p, {p, "header length", "100000000"});
    load_error(tmp.path("missing.safetensors"), {tmp.path("missing.safetensors"), "No such file"});
    load_error(tmp.dir(), {tmp.dir(), "regular file"});
}

TEST_F(Safetensors, RejectsBadHeaders) {
    const std::string p = tmp.path("bad.safetensors");
    auto expect = [&](const std::string & header, const std::string & data,
                      std::initializer_list<std::string> needles) {
        SCOPED_TRACE(header);
        file_write(p, file_build(header, data));
        std::vector<std::string> all = {p};
        all.insert(all.end(), needles.begin(), needles.end());
        std::string msg = load_error(p, {});
        for (const auto & n : all) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    };
    const std::string f4 = std::string(16, '\0');
    expect("{not json", "", {"header", "parse"});
    expect("", "", {"header"});
    expect("[1, 2]", "", {"header", "JSON object"});
    expect(std::string("{\"w\xff\":1}"), "", {"header"});  // invalid UTF-8
    expect(std::string(100000, '[') + std::string(100000, ']'), "", {"header"});
    expect(R"({"w":[1]})", "", {"tensor 'w'", "object"});
    expect(R"({"w":{"shape":[4],"data_offsets":[0,16]}})", f4, {"tensor 'w'", "dtype"});
    expect(R"({"w":{"dtype":"F31","shape":[4],"data_offsets":[0,16]}})", f4, {"tensor 'w'", "dtype", "F31"});
    expect(R"({"w":{"dtype":7,"shape":[4],"data_offsets":[0,16]}})", f4, {"tensor 'w'", "dtype"});
    expect(R"({"w":{"dtype":"F32","data_offsets":[0,16]}})", f4, {"tensor 'w'", "shape"});
    expect(R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", f4, {"tensor 'w'", "shape", "-4"});
    expect(R"({"w":{"dtype":"F32","shape":[4.0],"data_offsets":[0,16]}})", f4, {"tensor 'w'", "shape"});
    expect(R"({"w":{"dtype":"F32","shape":"4","data_offsets":[0,16]}})", f4, {"tensor 'w'", "shape"});
    expect(R"({"w":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,16]}})", f4,
           {"tensor 'w'", "shape"});
    expect(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})", f4,
           {"tensor 'w'", "shape", "64 bits"});
    expect(R"({"w":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,16]}})", f4,
           {"tensor 'w'", "shape", "64 bits"});
    expect(R"({"w":{"dtype":"F32","shape":[4]}})", f4, {"tensor 'w'", "data_offsets"});
    expect(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}})", f4, {"tensor 'w'", "data_offsets"});
    expect(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16,32]}})", f4, {"tensor 'w'", "data_offsets"});
    expect(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":["0","16"]}})", f4, {"tensor 'w'", "data_offsets"});
    expect(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[-16,0]}})", f4, {"tensor 'w'", "data_offsets"});
    expect(R"({"":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", f4, {"tensor ''", "non-empty"});
    expect(R"({"__metadata__":["a"]})", "", {"__metadata__", "object"});
    expect(R"({"__metadata__":{"n":3}})", "", {"__metadata__", "'n'", "string"});
    expect(R"({"b":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})", std::string("\x01\x02\x00", 3),
           {"tensor 'b'", "BOOL", "2"});
    expect(R"({"w":{"dtype":"F32","shape":[)" + std::string(200, '1') + "]}}", f4, {"tensor 'w'", "shape"});
    std::string many_dims = "[1";
    for (int i = 0; i < 100; ++i) many_dims += ",1";
    expect(R"({"w":{"dtype":"F32","shape":)" + many_dims + R"(],"data_offsets":[0,4]}})", f4.substr(0, 4),
           {"tensor 'w'", "dimensions"});
}

TEST_F(Safetensors, RejectsBadOffsets) {
    const std::string p = tmp.path("model.safetensors");
    file_write(p, file_build(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", std::string(20, '\0')));
    // The exact wording promised by the header's contract.
    EXPECT_EQ(load_error(p, {}), p + ": tensor 'w': data_offsets [0, 20] do not match dtype F32 and shape [2, 3] "
                                     "(expected 24 bytes, found 20)");

    file_write(p, file_build(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(12, '\0')));
    load_error(p, {p, "tensor 'w'", "exceed", "16"});
    file_write(p, file_build(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[1000,1016]}})", std::string(16, '\0')));
    load_error(p, {p, "tensor 'w'", "1000"});
    file_write(p, file_build(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                             R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})", std::string(24, '\0')));
    load_error(p, {p, "tensor 'b'", "overlap", "tensor 'a'"});
    file_write(p, file_build(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                             R"("b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(16, '\0')));
    load_error(p, {p, "tensor 'b'", "overlap"});
    file_write(p, file_build(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", std::string(20, '\0')));
    load_error(p, {p, "tensor 'b'", "hole"});
    file_write(p, file_build(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, '\0')));
    load_error(p, {p, "tensor 'a'", "hole"});
    file_write(p, file_build(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(12, '\0')));
    load_error(p, {p, "data buffer", "4 trailing"});
    // A 0-byte tensor may sit anywhere inside the tiling, but not past its end.
    file_write(p, file_build(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})", std::string(8, '\0')));
    load_error(p, {p, "tensor 'a'", "overlap"});
    file_write(p, file_build(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("e":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}})", std::string(8, '\0')));
    EXPECT_EQ(safetensors_load(p).tensors.size(), 2u);
}

TEST_F(Safetensors, SurvivesEveryTruncation) {
    const std::string good = tmp.path("good.safetensors");
    safetensors_save(good, tensors_sample(), {{"format", "pt"}});
    const std::string bytes = file_read(good);
    const std::string p = tmp.path("cut.safetensors");
    for (size_t len = 0; len <= bytes.size(); ++len) {
        file_write(p, bytes.substr(0, len));
        try {
            auto f = safetensors_load(p);
            EXPECT_EQ(len, bytes.size()) << "a truncated file loaded";
            EXPECT_EQ(f.tensors.size(), tensors_sample().size());
        } catch (const std::runtime_error & e) {
            EXPECT_LT(len, bytes.size()) << e.what();
            EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
        }
    }
    file_write(p, bytes + "x");
    load_error(p, {p, "data buffer"});
}

TEST_F(Safetensors, SurvivesRandomCorruption) {
    safetensors_save(tmp.path("good.safetensors"), tensors_sample(), {{"format", "pt"}});
    const std::string bytes = file_read(tmp.path("good.safetensors"));
    uint64_t n;
    header_read(bytes, &n);
    std::mt19937 rng(1234);
    const std::string p = tmp.path("fuzz.safetensors");
    static const char alphabet_chars[] = "{}[]\",:0123456789-.eE \x00\xff" "FIBU";
    const std::string alphabet(alphabet_chars, sizeof alphabet_chars - 1);
    int loaded = 0, rejected = 0;
    for (int iter = 0; iter < 1500; ++iter) {
        std::string b = bytes;
        const int edits = 1 + int(rng() % 4);
        for (int k = 0; k < edits; ++k) {
            // Mostly the length and header, where the parser lives; sometimes the data.
            size_t pos = rng() % 4 == 0 ? rng() % b.size() : rng() % (8 + n);
            b[pos] = rng() % 2 ? char(rng()) : alphabet[rng() % alphabet.size()];
        }
        file_write(p, b);
        try {
            auto f = safetensors_load(p);
            for (const auto & [name, t] : f.tensors) (void)tensor_bytes(t);  // touch every byte
            ++loaded;
        } catch (const std::runtime_error & e) {
            ++rejected;
            EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
        }
    }
    EXPECT_GT(rejected, 0);
    EXPECT_GT(loaded, 0);  // data-only edits stay valid
}

// --- saving: validation and atomicity ---------------------------------------------------------

TEST_F(Safetensors, SaveRejectsBadInputAndLeavesNothing) {
    const std::string p = tmp.path("out.safetensors");
    auto expect_save_error = [&](const NamedTensors & ts, std::initializer_list<std::string> needles) {
        try {
            safetensors_save(p, ts);
            ADD_FAILURE() << "no error";
        } catch (const std::runtime_error & e) {
            std::string msg = e.what();
            EXPECT_NE(msg.find(p), std::string::npos) << msg;
            for (const auto & n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
        }
        EXPECT_TRUE(dir_list().empty());
    };
    expect_save_error({{"", at::ones({1})}}, {"tensor ''", "non-empty"});
    expect_save_error({{"a", at::ones({1})}, {"a", at::ones({2})}}, {"tensor 'a'", "duplicate"});
    expect_save_error({{"c", at::ones({2}, at::kComplexFloat)}}, {"tensor 'c'", "ComplexFloat"});
    expect_save_error({{"__metadata__", at::ones({1})}}, {"__metadata__"});
    expect_save_error({{"u", at::Tensor()}}, {"tensor 'u'", "undefined"});
    expect_save_error({{"bad\xff", at::ones({1})}}, {"UTF-8"});
    EXPECT_THROW(safetensors_dtype_name(at::kComplexDouble), std::runtime_error);
    EXPECT_THROW(safetensors_dtype_name(at::kQInt8), std::runtime_error);
}

TEST_F(Safetensors, SaveIsAtomic) {
    const std::string missing = tmp.path("no_such_dir/out.safetensors");
    try {
        safetensors_save(missing, {{"w", at::ones({2})}});
        ADD_FAILURE() << "no error";
    } catch (const std::runtime_error & e) {
        EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find(std::strerror(ENOENT)), std::string::npos) << e.what();
    }
    EXPECT_TRUE(dir_list().empty());

    const std::string p = tmp.path("out.safetensors");
    safetensors_save(p, {{"w", at::ones({2})}});
    safetensors_save(p, {{"w", at::full({3}, 2.0f)}, {"v", at::zeros({1}, at::kInt)}});  // replaces
    EXPECT_EQ(dir_list(), std::vector<std::string>{"out.safetensors"});  // no *.tmp.* left
    auto f = safetensors_load(p);
    EXPECT_TRUE(at::equal(tensor_get(f, "w"), at::full({3}, 2.0f)));

    // A failed save leaves the previous file intact and no temporary behind.
    const std::string before = file_read(p);
    EXPECT_THROW(safetensors_save(p, {{"w", at::ones({1})}, {"w", at::ones({1})}}), std::runtime_error);
    EXPECT_THROW(safetensors_save(p, {{"x", at::empty({2}, at::TensorOptions().device(at::kMeta))}}),
                 std::runtime_error);
    EXPECT_EQ(file_read(p), before);
    EXPECT_EQ(dir_list(), std::vector<std::string>{"out.safetensors"});
}
