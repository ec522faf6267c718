// Tests for lib/quant_intn: hand-computed scales, clipping and rounding for int8/6/5, round-trip
// bounds, the STE gradient, bit packing, the zstd artifact (sizes, errors) and the QAT switch.
#include "lib/quant_intn.h"
#include "lib/safetensors.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using namespace qatlab;

namespace {

at::Tensor t2(std::vector<std::vector<float>> rows) {
    std::vector<float> flat;
    for (auto & r : rows) flat.insert(flat.end(), r.begin(), r.end());
    return at::tensor(flat, at::kFloat).reshape({(int64_t)rows.size(), -1});
}

std::vector<int64_t> ints(const at::Tensor & t) {
    at::Tensor c = t.to(at::kLong).contiguous().flatten();
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

std::vector<float> floats(const at::Tensor & t) {
    at::Tensor c = t.to(at::kFloat).contiguous().flatten();
    return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

std::shared_ptr<DecoderModel> tiny_gpt(uint64_t seed = 0) {
    nlohmann::json j = {{"model_type", "qatlab_gpt"}, {"vocab_size", 97},        {"hidden_size", 64},
                        {"intermediate_size", 128},   {"num_hidden_layers", 2},  {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},   {"max_position_embeddings", 64},
                        {"tie_word_embeddings", false}, {"initializer_range", 0.1}};
    at::manual_seed(seed);
    return std::make_shared<DecoderModel>(decoder_config_parse(j.dump(), "test:intn"));
}

at::Tensor tiny_ids() { return at::tensor(std::vector<int64_t>{3, 17, 96, 0, 42, 7, 11, 5}, at::kLong).unsqueeze(0); }

// The exception message of f(), or "" when it did not throw.
template <class F> std::string error_of(F f) {
    try {
        f();
    } catch (const std::exception & e) {
        return e.what();
    }
    return "";
}

} // namespace

// -- hand-computed examples --------------------------------------------------------------------

TEST(QuantIntN, Int8MaxAbsScaleAndHalfToEvenRounding) {
    // max |w| = 127 * 2^-4 -> scale 0.0625; -16.5, 1.5 and 2.5 steps round half to even.
    auto r = intn_quantize(t2({{7.9375f, -1.03125f, 0.09375f, 0.15625f}}), {8, 0.0, 1});
    EXPECT_EQ(floats(r.scale), std::vector<float>({0.0625f}));
    EXPECT_EQ(ints(r.q), std::vector<int64_t>({127, -16, 2, 2}));
    EXPECT_EQ(r.q.scalar_type(), at::kChar);
}

TEST(QuantIntN, Int6MaxAbsAndZeroRow) {
    auto r = intn_quantize(t2({{3.875f, 0.1875f, -0.3125f, -3.875f}, {0, 0, 0, 0}}), {6, 0.0, 1});
    EXPECT_EQ(floats(r.scale), std::vector<float>({0.125f, 1.0f}));   // a zero row gets scale 1
    EXPECT_EQ(ints(r.q), std::vector<int64_t>({31, 2, -2, -31, 0, 0, 0, 0}));
}

TEST(QuantIntN, Int5MaxAbs) {
    auto r = intn_quantize(t2({{-3.75f, 0.375f, 0.625f, 1.0f}}), {5, 0.0, 1});
    EXPECT_EQ(floats(r.scale), std::vector<float>({0.25f}));
    EXPECT_EQ(ints(r.q), std::vector<int64_t>({-15, 2, 2, 4}));
    EXPECT_EQ(intn_qmax(5), 15);
    EXPECT_EQ(intn_qmax(6), 31);
    EXPECT_EQ(intn_qmax(8), 127);
}

TEST(QuantIntN, StdClipRule) {
    // [1, -1, 0]: unbiased std = 1. int6, k = 3.875: c = 3.875, scale = c / 31 = 0.125.
    auto r = intn_quantize(t2({{1, -1, 0}}), {6, 3.875, 1});
    EXPECT_EQ(floats(r.scale), std::vector<float>({0.125f}));
    EXPECT_EQ(ints(r.q), std::vector<int64_t>({8, -8, 0}));
    // int5, k = 0.9375: scale = 0.0625, w / scale = 16 is clipped to 15 -> dequant 0.9375.
    auto c = intn_quantize(t2({{1, -1, 0}}), {5, 0.9375, 1});
    EXPECT_EQ(floats(c.scale), std::vector<float>({0.0625f}));
    EXPECT_EQ(ints(c.q), std::vector<int64_t>({15, -15, 0}));
    EXPECT_EQ(floats(intn_dequantize(c.q, c.scale)), std::vector<float>({0.9375f, -0.9375f, 0.0f}));
}

TEST(QuantIntN, ScaleIsRoundedToHalf) {
    auto s = intn_scale(t2({{1.0f, 0.5f}}), {6, 0.0, 1});
    float expect = at::tensor(std::vector<float>{1.0f / 31}).to(at::kHalf).to(at::kFloat).item<float>();
    EXPECT_EQ(s.item<float>(), expect);
    EXPECT_NE(expect, 1.0f / 31);
}

TEST(QuantIntN, GroupedRowsShareOneScale) {
    auto r = intn_quantize(t2({{0.25f, 0}, {0, -3.875f}, {1, 1}, {1, 1}}), {6, 0.0, 2});
    float s1 = floats(intn_scale(t2({{1, 1}}), {6, 0.0, 1}))[0];   // fp16(1 / 31)
    EXPECT_EQ(floats(r.scale), std::vector<float>({0.125f, s1}));
    EXPECT_EQ(ints(r.q), std::vector<int64_t>({2, 0, 0, -31, 31, 31, 31, 31}));
    auto d = intn_dequantize(r.q, r.scale, 2);
    EXPECT_EQ(d.sizes(), r.q.sizes());
    EXPECT_NE(error_of([&] { intn_quantize(at::randn({3, 4}), {6, 0.0, 2}); }).find("group_rows"), std::string::npos);
}

TEST(QuantIntN, BadOptionsAreErrors) {
    auto w = at::randn({4, 4});
    EXPECT_NE(error_of([&] { intn_quantize(w, {9, 0.0, 1}); }).find("bits"), std::string::npos);
    EXPECT_NE(error_of([&] { intn_quantize(w, {1, 0.0, 1}); }).find("bits"), std::string::npos);
    EXPECT_NE(error_of([&] { intn_quantize(w, {6, -1.0, 1}); }).find("clip"), std::string::npos);
    EXPECT_NE(error_of([&] { intn_quantize(at::ones({4, 4}, at::kLong), {6, 0.0, 1}); }).find("floating"), std::string::npos);
}

// -- round trip --------------------------------------------------------------------------------

TEST(QuantIntN, RoundTripErrorIsAtMostHalfAStep) {
    at::manual_seed(1);
    at::Tensor w = at::randn({64, 256}) * at::rand({64, 1});
    for (int bits : {8, 6, 5}) {
        for (double k : {0.0, 2.5}) {
            for (int64_t g : {1, 8}) {
                IntNOptions o{bits, k, g};
                auto r = intn_quantize(w, o);
                at::Tensor dq = intn_dequantize(r.q, r.scale, g);
                at::Tensor step = r.scale.repeat_interleave(g).unsqueeze(1).expand_as(w);
                at::Tensor err = (w - dq).abs();
                // unclipped: rounds into range (max-abs can exceed qmax * scale by the fp16 rounding of the scale)
                at::Tensor unclipped = w.abs() <= step * (intn_qmax(bits) + 0.5);
                // max-abs never clips; 2.5 std clips the tails
                EXPECT_EQ(unclipped.all().item<bool>(), k == 0.0) << bits << " " << k;
                // half a step, plus float rounding of w / scale
                at::Tensor bound = step * 0.5 * (1 + 1e-6);
                EXPECT_TRUE((err <= bound).logical_or(unclipped.logical_not()).all().item<bool>()) << bits << " " << k;
                // clipped values land on the edge
                at::Tensor edge = (dq.abs() - step * double(intn_qmax(bits))).abs() < 1e-6;
                EXPECT_TRUE(edge.logical_or(unclipped).all().item<bool>());
            }
        }
    }
}

TEST(QuantIntN, FakeQuantValueAndStraightThroughGradient) {
    at::manual_seed(2);
    for (double k : {0.0, 1.0}) {   // k = 1 clips many values: the gradient still passes them
        at::Tensor w = at::randn({16, 32}).requires_grad_(true);
        IntNOptions o{6, k, 1};
        at::Tensor y = intn_fake_quant(w, o);
        auto r = intn_quantize(w, o);
        EXPECT_TRUE(at::equal(y.detach(), intn_dequantize(r.q, r.scale))) << k;
        EXPECT_FALSE(at::equal(y.detach(), w.detach()));
        at::Tensor g = at::randn({16, 32});
        (y * g).sum().backward();
        EXPECT_TRUE(at::equal(w.grad(), g)) << k;
    }
    // bf16: the value is exactly the bf16 dequantized weight, not w + (dq - w) rounded twice.
    at::Tensor wb = at::randn({8, 64}).to(at::kBFloat16).requires_grad_(true);
    at::Tensor yb = intn_fake_quant(wb, {6, 0.0, 1});
    auto rb = intn_quantize(wb, {6, 0.0, 1});
    EXPECT_EQ(yb.scalar_type(), at::kBFloat16);
    EXPECT_TRUE(at::equal(yb.detach(), intn_dequantize(rb.q, rb.scale, 1, at::kBFloat16)));
}

// -- bit packing -------------------------------------------------------------------------------

TEST(QuantIntN, PackLayoutAndRoundTrip) {
    // bits 6: 1 | 2 << 6 = 0x81, then 2 >> 2 = 0x00.
    EXPECT_EQ(intn_pack(at::tensor(std::vector<int64_t>{1, 2}), 6), std::vector<uint8_t>({0x81, 0x00}));
    EXPECT_EQ(intn_pack(at::tensor(std::vector<int64_t>{5, 3, 7}), 3), std::vector<uint8_t>({0xdd, 0x01}));
    at::manual_seed(3);
    for (int bits = 2; bits <= 8; bits++) {
        for (int64_t n : {1, 7, 8, 1001}) {
            at::Tensor c = at::randint(0, 1 << bits, {n}, at::kLong);
            auto p = intn_pack(c, bits);
            EXPECT_EQ((int64_t)p.size(), (n * bits + 7) / 8);
            EXPECT_TRUE(at::equal(intn_unpack(p.data(), p.size(), n, bits), c)) << bits << " " << n;
        }
    }
}

// -- the artifact ------------------------------------------------------------------------------

namespace {

// Independent payload size: 8 + index + per entry codes + fp16 scales, or raw values.
int64_t payload_expect(const std::string & path, int64_t index_bytes) {
    int64_t total = 8 + index_bytes;
    for (auto & e : intn_load(path)) {
        int64_t numel = 1;
        for (auto d : e.shape) numel *= d;
        if (e.kind == "intn") total += (numel * e.bits + 7) / 8 + 2 * (e.shape[0] / e.group_rows);
        else total += numel * (e.name == "keep32" ? 4 : 2);   // fp32 by rule, else fp16
    }
    return total;
}

} // namespace

TEST(QuantIntN, ExportRoundTripsBitExactly) {
    TestTempDir tmp{"qatlab_intn_"};
    std::string path = tmp.path("model.intn");
    at::manual_seed(4);
    NamedTensors ts = {
        {"attn.weight", at::randn({128, 600}) * 0.02},            // > 65536 elements: int6 default
        {"mlp.weight", at::randn({96, 800}) * 0.02},              // rule: int5, groups of 4 rows, std clip
        {"embed_tokens.weight", at::randn({300, 256})},           // rule: fp16
        {"keep32", at::randn({5})},                               // rule: fp32
        {"small.weight", at::randn({64, 64})},                    // <= 65536: fp16
        {"norm.weight", at::ones({64})},                          // vector: fp16
        {"bf.weight", at::randn({256, 300}).to(at::kBFloat16)},   // int6, restored as bf16
    };
    IntNExportOptions o;
    o.level = 3;
    IntNRule mlp{"^mlp", 5, 12.0, 4}, emb{"embed_tokens", 16, {}, {}}, k32{"keep32", 32, {}, {}};
    o.rules = {mlp, emb, k32};
    IntNExportStats st = intn_export(path, ts, o);
    EXPECT_EQ(st.quantized, 3);
    EXPECT_EQ(st.kept, 4);
    EXPECT_EQ(st.file_bytes, (int64_t)fs::file_size(path));
    EXPECT_EQ(st.payload_bytes, payload_expect(path, st.index_bytes));
    EXPECT_FALSE(fs::exists(path + ".tmp." + std::to_string(getpid())));

    auto es = intn_load(path);
    ASSERT_EQ(es.size(), ts.size());
    for (size_t i = 0; i < ts.size(); i++) {
        const auto & [name, t] = ts[i];
        const auto & e = es[i];
        EXPECT_EQ(e.name, name);
        EXPECT_EQ(e.value.sizes(), t.sizes()) << name;
        EXPECT_EQ(e.value.scalar_type(), t.scalar_type()) << name;
        if (e.kind == "intn") {
            IntNOptions q{name == "mlp.weight" ? 5 : 6, name == "mlp.weight" ? 12.0 : 0.0, name == "mlp.weight" ? 4 : 1};
            EXPECT_EQ(e.bits, q.bits);
            EXPECT_EQ(e.group_rows, q.group_rows);
            auto r = intn_quantize(t, q);
            EXPECT_TRUE(at::equal(e.q, r.q)) << name;
            EXPECT_TRUE(at::equal(e.scale, r.scale)) << name;
            EXPECT_TRUE(at::equal(e.value, intn_dequantize(r.q, r.scale, q.group_rows, t.scalar_type()))) << name;
        } else {
            at::ScalarType st = name == "keep32" ? at::kFloat : at::kHalf;
            EXPECT_TRUE(at::equal(e.value, t.to(st).to(t.scalar_type()))) << name;
        }
    }
    EXPECT_EQ(es[0].kind, "intn");
    EXPECT_EQ(es[2].kind, "raw");
    EXPECT_EQ(es[4].kind, "raw");
}

TEST(QuantIntN, ZstdShrinksRealisticWeights) {
    // Weights like a trained model's: Gaussian rows with varied scale and a few outliers.
    TestTempDir tmp{"qatlab_intn_"};
    at::manual_seed(5);
    NamedTensors ts;
    for (int i = 0; i < 4; i++) {
        at::Tensor w = at::randn({256, 512}) * (0.5 + at::rand({256, 1})) * 0.02;
        w.view(-1).index_put_({at::randint(0, w.numel(), {64}, at::kLong)}, 0.2);
        ts.push_back({"layer" + std::to_string(i) + ".weight", w});
    }
    for (int bits : {8, 6, 5}) {
        IntNExportOptions o;
        o.quant.bits = bits;
        o.level = 19;
        IntNExportStats st = intn_export(tmp.path("w.intn"), ts, o);
        EXPECT_EQ(st.quantized, 4);
        EXPECT_LT(st.file_bytes, st.payload_bytes) << bits;
        std::printf("int%d: packed payload %lld bytes -> zstd artifact %lld bytes\n", bits, (long long)st.payload_bytes,
                    (long long)st.file_bytes);
        // the packed size itself: 4 x (256*512*bits/8 + 256*2) + index + 8
        EXPECT_EQ(st.payload_bytes, 8 + st.index_bytes + 4 * (256 * 512 * bits / 8 + 256 * 2));
    }
}

TEST(QuantIntN, CorruptOrTruncatedArtifactNamesTheFile) {
    TestTempDir tmp{"qatlab_intn_"};
    std::string path = tmp.path("good.intn");
    at::manual_seed(6);
    IntNExportOptions o;
    o.keep_numel = 0;
    o.level = 3;
    intn_export(path, {{"a", at::randn({32, 64})}, {"n", at::ones({32})}}, o);
    std::string bytes;
    {
        std::ifstream f(path, std::ios::binary);
        bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }
    auto write = [&](const std::string & name, const std::string & data) {
        std::string p = tmp.path(name);
        std::ofstream(p, std::ios::binary).write(data.data(), (std::streamsize)data.size());
        return p;
    };
    std::vector<std::string> bad;
    bad.push_back(write("empty.intn", ""));
    bad.push_back(write("short.intn", bytes.substr(0, 10)));
    bad.push_back(write("half.intn", bytes.substr(0, bytes.size() / 2)));
    bad.push_back(write("minus1.intn", bytes.substr(0, bytes.size() - 1)));
    bad.push_back(write("plus1.intn", bytes + "x"));
    std::string m = bytes;
    m[0] = 'X';
    bad.push_back(write("magic.intn", m));
    for (size_t at : {size_t(40), bytes.size() / 2, bytes.size() - 2}) {
        std::string c = bytes;
        c[at] = char(c[at] ^ 0x5a);
        bad.push_back(write("flip" + std::to_string(at) + ".intn", c));
    }
    std::string v = bytes;
    v[8] = 9;
    bad.push_back(write("version.intn", v));
    bad.push_back(tmp.path("missing.intn"));
    for (const auto & p : bad) {
        std::string err = error_of([&] { intn_load(p); });
        EXPECT_NE(err, "") << p;
        EXPECT_NE(err.find(p), std::string::npos) << err;
    }
    EXPECT_EQ(intn_load(path).size(), 2u);
}

TEST(QuantIntN, ExportRejectsBadInput) {
    TestTempDir tmp{"qatlab_intn_"};
    std::string p = tmp.path("x.intn");
    EXPECT_NE(error_of([&] { intn_export(p, {{"a", at::ones({2}, at::kLong)}}, {}); }).find("floating"), std::string::npos);
    EXPECT_NE(error_of([&] { intn_export(p, {{"a", at::ones({2})}, {"a", at::ones({2})}}, {}); }).find("duplicate"), std::string::npos);
    EXPECT_NE(error_of([&] { intn_export(tmp.path("no/such/dir.intn"), {{"a", at::ones({2})}}, {}); }).find("no/such"),
              std::string::npos);
    EXPECT_FALSE(fs::exists(p));
}

// -- an independent reader: PyTorch's quantizer and a numpy decoder of the file ---------------

TEST(QuantIntNInterop, PyTorchQuantizerAndNumpyReaderAgree) {
    if (!test_python()) GTEST_SKIP() << "QATLAB_PYTHON not set";
    if (std::system("zstd --version >/dev/null 2>&1") != 0) GTEST_SKIP() << "no zstd command";
    TestTempDir tmp{"qatlab_intn_"};
    at::manual_seed(7);
    // name = b<bits>_k<clip>_g<group_rows>; each entry its own weight
    NamedTensors ts;
    IntNExportOptions o;
    o.keep_numel = 0;
    o.level = 9;
    for (auto [bits, k, g] : std::vector<std::tuple<int, double, int64_t>>{{8, 0, 1}, {6, 12.85, 1}, {5, 0, 8}, {6, 2.5, 2}, {4, 0, 1}}) {
        char name[64];
        snprintf(name, sizeof name, "b%d_k%g_g%lld", bits, k, (long long)g);
        ts.push_back({name, at::randn({48, 200}) * (0.01 + at::rand({48, 1}) * 0.05)});
        o.rules.push_back({std::string("^") + name + "$", bits, k, g});
    }
    std::string art = tmp.path("a.intn"), wst = tmp.path("w.safetensors");
    intn_export(art, ts, o);
    safetensors_save(wst, ts);
    std::string code =
        "import json, re, subprocess, sys, numpy as np, torch, safetensors.torch as st\n"
        "W = st.load_file(sys.argv[1])\n"
        "raw = open(sys.argv[2], 'rb').read()\n"
        "assert raw[:8] == b'QINTN\\x00\\x00\\x01', 'magic'\n"
        "payload = subprocess.run(['zstd', '-d', '-c'], input=raw[32:], capture_output=True, check=True).stdout\n"
        "assert len(payload) == int.from_bytes(raw[16:24], 'little'), 'payload size'\n"
        "n = int.from_bytes(payload[:8], 'little'); index = json.loads(payload[8:8 + n]); blob = payload[8 + n:]\n"
        "assert index['format'] == 'qatlab_intn_v1' and len(index['tensors']) == len(W)\n"
        "for e in index['tensors']:\n"
        "    bits, k, g = e['bits'], e['clip_k'], e['group_rows']\n"
        "    w = W[e['name']]; qmax = 2 ** (bits - 1) - 1\n"
        "    x = w.reshape(w.shape[0] // g, -1)\n"
        "    c = x.std(dim=1) * k if k > 0 else x.abs().amax(dim=1)\n"
        "    s = (c / qmax).clamp(max=65504).half().float(); s[s == 0] = 1\n"
        "    q = torch.clamp(torch.round(x / s[:, None]), -qmax, qmax).to(torch.int8).reshape(w.shape)\n"
        "    nq = w.numel(); qb = (nq * bits + 7) // 8; off = e['offset']\n"
        "    b = np.frombuffer(blob[off:off + qb], dtype=np.uint8)\n"
        "    bitsarr = np.unpackbits(b, bitorder='little')[:nq * bits].reshape(nq, bits).astype(np.int64)\n"
        "    codes = (bitsarr << np.arange(bits)).sum(axis=1)\n"
        "    qf = torch.from_numpy(codes - qmax).to(torch.int8).reshape(w.shape)\n"
        "    sf = torch.from_numpy(np.frombuffer(blob[off + qb:off + e['bytes']], dtype=np.float16).copy())\n"
        "    assert e['bytes'] == qb + 2 * s.numel(), e['name']\n"
        "    assert torch.equal(qf, q), (e['name'], (qf != q).sum())\n"
        "    assert torch.equal(sf, s.half()), e['name']\n"
        "    deq = (qf.float().reshape(s.numel(), -1) * sf.float()[:, None]).reshape(w.shape)\n"
        "    assert (deq - w).abs().max() <= s.max() * (0.5 if k == 0 else 1e9), e['name']\n"
        "print('ok', len(W))\n";
    std::string script = tmp.path("ref.py");
    std::ofstream(script) << code;
    std::string text;
    int rc = test_python_file(script, {wst, art}, &text);
    EXPECT_EQ(rc, 0) << text;
    EXPECT_NE(text.find("ok 5"), std::string::npos) << text;
}

// -- the QAT switch ----------------------------------------------------------------------------

TEST(QuantIntN, ApplySharesParametersAndSwitchesTheForward) {
    auto m = tiny_gpt();
    m->train(false);
    at::Tensor ids = tiny_ids();
    at::NoGradGuard ng;
    at::Tensor dense = m->forward(ids);
    auto before = m->named_parameters();
    auto layers = intn_apply(*m, {6, 0.0, 1}, "mlp");
    EXPECT_EQ(layers.size(), 4u);   // up + down per layer (relu2 has no gate)
    for (auto & [n, l] : layers) EXPECT_NE(n.find("mlp"), std::string::npos);
    auto after = m->named_parameters();
    ASSERT_EQ(before.size(), after.size());
    for (size_t i = 0; i < before.size(); i++) {
        EXPECT_EQ(before[i].first, after[i].first);
        EXPECT_TRUE(before[i].second.is_same(after[i].second)) << before[i].first;   // same tensors
    }
    // disabled: exactly the dense forward
    EXPECT_TRUE(at::equal(m->forward(ids), dense));
    for (auto & [n, l] : layers) l->enabled = true;
    at::Tensor qat = m->forward(ids);
    EXPECT_FALSE(at::equal(qat, dense));
    // enabled: exactly a dense model holding the dequantized weights
    auto ref = tiny_gpt();
    ref->train(false);
    NamedTensors sd;
    for (auto & [n, t] : m->named_parameters()) {
        bool q = n.find("mlp") != std::string::npos && n.find(".weight") != std::string::npos;
        if (q) {
            auto r = intn_quantize(t, {6, 0.0, 1});
            sd.push_back({n, intn_dequantize(r.q, r.scale)});
        } else {
            sd.push_back({n, t});
        }
    }
    ref->load_state_dict(sd);
    EXPECT_TRUE(at::equal(ref->forward(ids), qat));
    for (auto & [n, l] : layers) l->enabled = false;
    EXPECT_TRUE(at::equal(m->forward(ids), dense));
    // re-applying keeps the layers and updates their options
    auto again = intn_apply(*m, {5, 0.0, 1}, "mlp");
    EXPECT_TRUE(again[0].second == layers[0].second);
    EXPECT_EQ(layers[0].second->opt.bits, 5);
    EXPECT_NE(error_of([&] { intn_apply(*m, {}, "nothing_matches"); }).find("matches no"), std::string::npos);
    EXPECT_NE(error_of([&] { intn_apply(*m, {}, "(["); }).find("filter"), std::string::npos);
}

TEST(QuantIntN, GradientsFlowThroughEnabledLayers) {
    auto m = tiny_gpt();
    auto layers = intn_apply(*m, {6, 0.0, 1});
    EXPECT_EQ(layers.size(), 2u * 6 + 1);   // q k v o up down per layer + lm_head
    for (auto & [n, l] : layers) l->enabled = true;
    at::Tensor logits = m->forward(tiny_ids());
    logits.pow(2).mean().backward();
    for (auto & [n, l] : layers) {
        ASSERT_TRUE(l->w.grad().defined()) << n;
        EXPECT_GT(l->w.grad().abs().sum().item<double>(), 0) << n;
    }
}

namespace {

// Runs `steps` updates; returns the first step whose forward differs from the dense one (-1 =
// never), checking that every earlier forward equals it exactly and every later one differs.
template <class Input> int64_t switch_step(IntNSchedule s, int64_t steps, Input input) {
    auto m = tiny_gpt();
    m->train(false);
    at::NoGradGuard ng;
    at::Tensor ids = tiny_ids();
    at::Tensor dense = m->forward(ids);
    auto layers = intn_apply(*m, {6, 0.0, 1});
    int64_t first = -1;
    for (int64_t step = 0; step < steps; step++) {
        bool on = s.update(input(step));
        for (auto & [n, l] : layers) l->enabled = on;
        bool differs = !at::equal(m->forward(ids), dense);
        EXPECT_EQ(differs, on) << step;
        if (differs && first < 0) first = step;
        if (first >= 0) {
            EXPECT_TRUE(differs) << "QAT switched back off at step " << step;
        }
    }
    return first;
}

} // namespace

TEST(QuantIntN, ScheduleByStep) {
    IntNSchedule s;
    s.start_step = 5;
    EXPECT_EQ(switch_step(s, 10, [](int64_t i) { return IntNSchedule::Input{i, {}, {}, {}}; }), 5);
}

TEST(QuantIntN, ScheduleByLrMultiplier) {
    // Linear warmdown 1 -> 0 over 20 steps: lr_mult = 1 - i / 20. Strictly below 0.15 first at i = 18.
    IntNSchedule s;
    s.lr_below = 0.15;
    EXPECT_EQ(switch_step(s, 20, [](int64_t i) { return IntNSchedule::Input{i, 1.0 - i / 20.0, {}, {}}; }), 18);
    // The multiplier coming back up (a restart) does not switch QAT off.
    IntNSchedule r;
    r.lr_below = 0.5;
    EXPECT_FALSE(r.update({0, 0.9, {}, {}}));
    EXPECT_TRUE(r.update({1, 0.4, {}, {}}));
    EXPECT_TRUE(r.update({2, 1.0, {}, {}}));
    EXPECT_EQ(r.switched_step, 1);
}

TEST(QuantIntN, ScheduleByTimeFraction) {
    // 600 s budget, 37 s per step: elapsed / budget >= 0.85 first at 37 * 14 = 518 s (step 14).
    IntNSchedule s;
    s.time_fraction = 0.85;
    EXPECT_EQ(switch_step(s, 17, [](int64_t i) { return IntNSchedule::Input{i, {}, 37.0 * i, 600.0}; }), 14);
    IntNSchedule none;   // no trigger: on at once
    EXPECT_TRUE(none.update({}));
    IntNSchedule nobudget;   // a trigger whose inputs are missing never fires
    nobudget.time_fraction = 0.5;
    EXPECT_FALSE(nobudget.update({3, 0.1, 1000.0, {}}));
}
