// Tests for lib/model: a hand-written reference forward (loops, own RoPE, no SDPA), HF directory
// round trips, KV-cache decoding, checkpointed gradients, padding, errors, and HF transformers.
#include "lib/model.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using namespace qatlab;

namespace {

std::string tiny_config(const std::string & type, bool tie = true) {
    nlohmann::json j = {{"model_type", type},           {"vocab_size", 97},          {"hidden_size", 64},
                        {"intermediate_size", 96},      {"num_hidden_layers", 2},    {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},     {"rms_norm_eps", 1e-6},      {"rope_theta", 10000.0},
                        {"max_position_embeddings", 64}, {"tie_word_embeddings", tie}, {"initializer_range", 0.1}};
    if (type == "qwen3") j["head_dim"] = 32;   // differs from hidden / heads = 16
    if (type == "qatlab_gpt") j["norm_weight"] = true;   // exercise the weights too
    return j.dump();
}

std::shared_ptr<DecoderModel> tiny_model(const std::string & type, bool tie = true, uint64_t seed = 0) {
    at::manual_seed(seed);
    auto m = std::make_shared<DecoderModel>(decoder_config_parse(tiny_config(type, tie), "test:" + type));
    // Norm weights away from 1 so that a wrong norm is visible.
    at::NoGradGuard ng;
    for (auto & [n, t] : m->named_parameters())
        if (n.find("norm") != std::string::npos) t.uniform_(0.5, 1.5);
    return m;
}

double max_diff(const at::Tensor & a, const at::Tensor & b) {
    return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// -- the reference forward: one position and head at a time, in float64 -----------------------

at::Tensor ref_rms(const at::Tensor & x, const at::Tensor & w, double eps) {
    at::Tensor y = x / (x.pow(2).mean(-1, true) + eps).sqrt();
    return w.defined() ? y * w.to(at::kDouble) : y;
}

// x (T, nh, hd) at positions pos: rotate pairs (i, i + hd/2) by pos * theta^(-2i/hd).
at::Tensor ref_rope(const at::Tensor & x, const std::vector<int64_t> & pos, double theta) {
    at::Tensor y = x.clone();
    const int64_t T = x.size(0), nh = x.size(1), hd = x.size(2), h2 = hd / 2;
    auto a = x.accessor<double, 3>();
    auto o = y.accessor<double, 3>();
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < h2; i++) {
            // float32 angles, as the HF convention computes them
            float inv = 1.0f / std::pow((float)theta, (float)(2 * i) / (float)hd);
            float ang = (float)pos[t] * inv;
            double c = std::cos(ang), s = std::sin(ang);
            for (int64_t h = 0; h < nh; h++) {
                double x1 = a[t][h][i], x2 = a[t][h][i + h2];
                o[t][h][i] = x1 * c - x2 * s;
                o[t][h][i + h2] = x2 * c + x1 * s;
            }
        }
    return y;
}

// Logits (T, V) of one unpadded sequence.
at::Tensor ref_forward(const DecoderConfig & c, const std::map<std::string, at::Tensor> & P,
                       const std::vector<int64_t> & ids) {
    auto p = [&](const std::string & n) -> at::Tensor {
        auto it = P.find(n);
        return it == P.end() ? at::Tensor() : it->second.detach().to(at::kDouble);
    };
    auto lin = [&](const at::Tensor & x, const std::string & n) {
        at::Tensor y = x.matmul(p(n + ".weight").t());
        at::Tensor b = p(n + ".bias");
        return b.defined() ? y + b : y;
    };
    const int64_t T = ids.size(), nh = c.num_attention_heads, kvh = c.num_key_value_heads, hd = c.head_dim;
    at::Tensor E = p("model.embed_tokens.weight");
    std::vector<at::Tensor> rows;
    for (int64_t t : ids) rows.push_back(E[t]);
    at::Tensor x = at::stack(rows);   // (T, H)
    if (c.embed_norm) x = ref_rms(x, {}, c.rms_norm_eps);
    std::vector<int64_t> pos(T);
    for (int64_t t = 0; t < T; t++) pos[t] = t;
    for (int64_t l = 0; l < c.num_hidden_layers; l++) {
        std::string pre = "model.layers." + std::to_string(l) + ".";
        at::Tensor xn = ref_rms(x, p(pre + "input_layernorm.weight"), c.rms_norm_eps);
        at::Tensor q = lin(xn, pre + "self_attn.q_proj").view({T, nh, hd});
        at::Tensor k = lin(xn, pre + "self_attn.k_proj").view({T, kvh, hd});
        at::Tensor v = lin(xn, pre + "self_attn.v_proj").view({T, kvh, hd});
        if (c.qk_norm) {
            q = ref_rms(q, p(pre + "self_attn.q_norm.weight"), c.rms_norm_eps);
            k = ref_rms(k, p(pre + "self_attn.k_norm.weight"), c.rms_norm_eps);
        }
        q = ref_rope(q.contiguous(), pos, c.rope_theta);
        k = ref_rope(k.contiguous(), pos, c.rope_theta);
        at::Tensor att = at::zeros({T, nh, hd}, at::kDouble);
        for (int64_t h = 0; h < nh; h++) {
            int64_t g = h / (nh / kvh);   // the kv head this query head shares
            for (int64_t t = 0; t < T; t++) {
                std::vector<double> s(t + 1);
                double mx = -1e300, z = 0;
                for (int64_t u = 0; u <= t; u++) {
                    s[u] = (q[t][h] * k[u][g]).sum().item<double>() / std::sqrt((double)hd);
                    mx = std::max(mx, s[u]);
                }
                for (auto & e : s) z += (e = std::exp(e - mx));
                at::Tensor o = at::zeros({hd}, at::kDouble);
                for (int64_t u = 0; u <= t; u++) o += v[u][g] * (s[u] / z);
                att[t][h] = o;
            }
        }
        x = x + lin(att.view({T, nh * hd}), pre + "self_attn.o_proj");
        at::Tensor y = ref_rms(x, p(pre + "post_attention_layernorm.weight"), c.rms_norm_eps);
        at::Tensor m;
        if (c.mlp_act == "swiglu") {
            at::Tensor g = lin(y, pre + "mlp.gate_proj");
            m = lin(g / (1 + (-g).exp()) * lin(y, pre + "mlp.up_proj"), pre + "mlp.down_proj");
        } else {
            at::Tensor u = lin(y, pre + "mlp.up_proj").clamp_min(0);
            m = lin(u * u, pre + "mlp.down_proj");
        }
        x = x + m;
    }
    x = ref_rms(x, p("model.norm.weight"), c.rms_norm_eps);
    at::Tensor W = c.tie_word_embeddings ? E : p("lm_head.weight");
    at::Tensor logits = x.matmul(W.t());
    if (c.logit_softcap > 0) logits = (logits / c.logit_softcap).tanh() * c.logit_softcap;
    return logits;
}

std::map<std::string, at::Tensor> param_map(DecoderModel & m) {
    std::map<std::string, at::Tensor> out;
    for (auto & [n, t] : m.named_parameters()) out[n] = t;
    return out;
}

at::Tensor ids_tensor(const std::vector<int64_t> & v) {
    return at::tensor(v, at::kLong).unsqueeze(0);
}

const std::vector<std::pair<std::string, bool>> kTypes = {{"qwen3", false}, {"llama", true}, {"qatlab_gpt", true}};

} // namespace

// -- config ----------------------------------------------------------------------------------

TEST(ModelConfig, DefaultsPerType) {
    auto q = decoder_config_parse(tiny_config("qwen3"), "q");
    EXPECT_TRUE(q.qk_norm);
    EXPECT_EQ(q.mlp_act, "swiglu");
    EXPECT_EQ(q.head_dim, 32);
    auto l = decoder_config_parse(tiny_config("llama"), "l");
    EXPECT_FALSE(l.qk_norm);
    EXPECT_EQ(l.head_dim, 16);
    auto g = decoder_config_parse(R"({"model_type":"qatlab_gpt","vocab_size":1024,"hidden_size":512,
        "intermediate_size":1024,"num_hidden_layers":9,"num_attention_heads":8,"num_key_value_heads":4})", "g");
    EXPECT_EQ(g.mlp_act, "relu2");
    EXPECT_TRUE(g.qk_norm);
    EXPECT_FALSE(g.norm_weight);
    EXPECT_TRUE(g.embed_norm);
    EXPECT_TRUE(g.tie_word_embeddings);
    EXPECT_DOUBLE_EQ(g.logit_softcap, 30.0);
    DecoderModel m(g);
    for (auto & [n, t] : m.named_parameters()) {
        EXPECT_EQ(n.find("norm"), std::string::npos) << n;   // parameter-free norms
        EXPECT_EQ(n.find("gate_proj"), std::string::npos) << n;
    }
}

TEST(ModelConfig, ParameterNamesInHFOrder) {
    auto m = tiny_model("qwen3", false);
    auto np = m->named_parameters();
    std::vector<std::string> want = {"model.embed_tokens.weight",
                                     "model.layers.0.self_attn.q_proj.weight",
                                     "model.layers.0.self_attn.k_proj.weight",
                                     "model.layers.0.self_attn.v_proj.weight",
                                     "model.layers.0.self_attn.o_proj.weight",
                                     "model.layers.0.self_attn.q_norm.weight",
                                     "model.layers.0.self_attn.k_norm.weight",
                                     "model.layers.0.mlp.gate_proj.weight",
                                     "model.layers.0.mlp.up_proj.weight",
                                     "model.layers.0.mlp.down_proj.weight",
                                     "model.layers.0.input_layernorm.weight",
                                     "model.layers.0.post_attention_layernorm.weight"};
    ASSERT_GE(np.size(), want.size());
    for (size_t i = 0; i < want.size(); i++) EXPECT_EQ(np[i].first, want[i]);
    EXPECT_EQ(np[np.size() - 2].first, "model.norm.weight");
    EXPECT_EQ(np.back().first, "lm_head.weight");
    EXPECT_EQ(np[1].second.sizes(), (std::vector<int64_t>{128, 64}));
    EXPECT_EQ(m->linear_names().size(), 2 * 7 + 1u);
    EXPECT_TRUE(m->get_linear("model.layers.1.mlp.gate_proj")->weight().defined());
}

// -- (a) forward equals the reference --------------------------------------------------------

TEST(ModelForward, MatchesReference) {
    for (auto & [type, tie] : kTypes) {
        auto m = tiny_model(type, tie);
        std::vector<int64_t> ids = {3, 17, 96, 0, 42, 42, 7, 11, 60};
        at::Tensor got = m->forward(ids_tensor(ids))[0];
        at::Tensor want = ref_forward(m->config(), param_map(*m), ids);
        EXPECT_LT(max_diff(got, want), 1e-5) << type;
        EXPECT_GT(want.abs().max().item<double>(), 0.1) << type;   // not trivially small
        at::Tensor hidden = m->forward(ids_tensor(ids), {}, {}, ForwardOutput::hidden);
        EXPECT_EQ(hidden.sizes(), (std::vector<int64_t>{1, 9, 64}));
        EXPECT_LT(max_diff(m->lm_head(hidden)[0], got), 1e-6);
    }
}

TEST(ModelForward, SetLinearIsUsed) {
    auto m = tiny_model("llama");
    at::Tensor ids = ids_tensor({1, 2, 3});
    at::Tensor a = m->forward(ids);
    auto old = m->get_linear("model.layers.0.mlp.down_proj");
    m->set_linear("model.layers.0.mlp.down_proj", std::make_shared<DenseLinear>(at::zeros_like(old->weight())));
    EXPECT_GT(max_diff(m->forward(ids), a), 1e-4);
    m->set_linear("model.layers.0.mlp.down_proj", old);
    EXPECT_EQ(max_diff(m->forward(ids), a), 0.0);
    EXPECT_THROW(m->set_linear("model.layers.0.mlp.down_proj", std::make_shared<DenseLinear>(at::zeros({3, 3}))),
                 std::runtime_error);
    EXPECT_THROW(m->get_linear("model.layers.9.mlp.down_proj"), std::runtime_error);
}

// -- (b) save_pretrained / from_pretrained ---------------------------------------------------

TEST(ModelFiles, RoundTripAndShards) {
    for (auto & [type, tie] : kTypes) {
        auto m = tiny_model(type, tie);
        at::Tensor ids = ids_tensor({5, 9, 1, 77, 3});
        at::Tensor want = m->forward(ids);
        for (int64_t shard : {int64_t(5) << 30, int64_t(20000)}) {
            TestTempDir d{"qatlab_model_"};
            m->save_pretrained(d.dir(), shard);
            bool sharded = shard < 100000;
            EXPECT_EQ(fs::exists(d.path("model.safetensors.index.json")), sharded) << type;
            EXPECT_EQ(fs::exists(d.path("model.safetensors")), !sharded) << type;
            auto cfg = nlohmann::json::parse(std::ifstream(d.path("config.json")));
            EXPECT_EQ(cfg["torch_dtype"], "float32");
            EXPECT_EQ(cfg["tie_word_embeddings"], tie);
            auto m2 = DecoderModel::from_pretrained(d.dir());
            EXPECT_TRUE(at::equal(m2->forward(ids), want)) << type << " shard " << shard;
            auto a = m->state_dict(), b = m2->state_dict();
            ASSERT_EQ(a.size(), b.size());
            for (size_t i = 0; i < a.size(); i++) {
                EXPECT_EQ(a[i].first, b[i].first);
                EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << a[i].first;
            }
            if (tie) {   // the tied head is not written
                for (auto & f : fs::directory_iterator(d.dir())) {
                    if (f.path().extension() != ".safetensors") continue;
                    for (auto & [n, t] : safetensors_load(f.path().string()).tensors) EXPECT_NE(n, "lm_head.weight");
                }
            }
        }
    }
}

TEST(ModelFiles, HalfPrecisionLoad) {
    auto m = tiny_model("qwen3", false);
    m->to(std::nullopt, at::kBFloat16);
    TestTempDir d{"qatlab_model_"};
    m->save_pretrained(d.dir());
    auto cfg = nlohmann::json::parse(std::ifstream(d.path("config.json")));
    EXPECT_EQ(cfg["torch_dtype"], "bfloat16");
    auto m32 = DecoderModel::from_pretrained(d.dir());   // upcast on load
    EXPECT_EQ(m32->dtype(), at::kFloat);
    auto m16 = DecoderModel::from_pretrained(d.dir(), std::nullopt, at::kBFloat16);
    at::Tensor ids = ids_tensor({1, 2, 3, 4});
    EXPECT_TRUE(at::equal(m16->forward(ids), m->forward(ids)));
    EXPECT_LT(max_diff(m32->forward(ids), m->forward(ids)), 0.1);
}

// -- (c) KV cache ----------------------------------------------------------------------------

TEST(ModelGenerate, CachedDecodeEqualsRecompute) {
    for (auto & [type, tie] : kTypes) {
        auto m = tiny_model(type, tie);
        m->train(false);
        at::NoGradGuard ng;
        std::vector<int64_t> seq = {4, 8, 15, 16, 23, 42, 7, 1};
        auto cache = m->kvcache_init(1, 16);
        at::Tensor first = m->forward_cached(ids_tensor({4, 8, 15, 16, 23}), cache);
        EXPECT_LT(max_diff(first, m->forward(ids_tensor({4, 8, 15, 16, 23}))), 1e-5);
        for (size_t t = 5; t < seq.size(); t++) {
            at::Tensor step = m->forward_cached(ids_tensor({seq[t]}), cache)[0][0];
            std::vector<int64_t> prefix(seq.begin(), seq.begin() + t + 1);
            at::Tensor full = m->forward(ids_tensor(prefix))[0][t];
            EXPECT_LT(max_diff(step, full), 1e-5) << type << " t=" << t;
        }
        // two tokens at once after a prefix also match (explicit offset-causal mask)
        auto c2 = m->kvcache_init(1, 16);
        m->forward_cached(ids_tensor({4, 8, 15}), c2);
        at::Tensor two = m->forward_cached(ids_tensor({16, 23}), c2)[0];
        EXPECT_LT(max_diff(two, m->forward(ids_tensor({4, 8, 15, 16, 23}))[0].narrow(0, 3, 2)), 1e-5) << type;
    }
}

TEST(ModelGenerate, GreedySamplingStopsAndSamples) {
    auto m = tiny_model("qwen3", false);
    m->train(false);
    std::vector<int64_t> prompt = {3, 1, 4, 1, 5};
    GenerateOptions o;
    o.max_new_tokens = 6;
    auto r = m->generate(ids_tensor(prompt), o);
    ASSERT_EQ(r.tokens.size(), 1u);
    ASSERT_EQ(r.tokens[0].size(), 6u);
    std::vector<int64_t> seq = prompt;   // greedy by full recompute
    for (int i = 0; i < 6; i++) {
        at::NoGradGuard ng;
        int64_t nx = m->forward(ids_tensor(seq))[0][-1].argmax().item<int64_t>();
        EXPECT_EQ(r.tokens[0][i], nx) << i;
        seq.push_back(nx);
    }
    EXPECT_GT(r.tokens_per_second, 0);
    // stop token: generation ends on it and keeps it
    o.stop = {r.tokens[0][2]};
    auto rs = m->generate(ids_tensor(prompt), o);
    EXPECT_LE(rs.tokens[0].size(), 3u);
    EXPECT_EQ(rs.tokens[0].back(), r.tokens[0][2]);
    // sampling: reproducible per seed, samples independent
    GenerateOptions s;
    s.max_new_tokens = 8;
    s.temperature = 1.5;
    s.top_k = 50;
    s.top_p = 0.95;
    s.repetition_penalty = 1.3;
    s.num_samples = 4;
    s.seed = 7;
    int64_t calls = 0;
    s.on_token = [&](int64_t row, int64_t tok) { calls++; return true; };
    auto a = m->generate(ids_tensor(prompt), s);
    s.on_token = nullptr;
    auto b = m->generate(ids_tensor(prompt), s);
    ASSERT_EQ(a.tokens.size(), 4u);
    EXPECT_EQ(calls, 32);
    EXPECT_EQ(a.tokens, b.tokens);
    bool differ = false;
    for (int i = 1; i < 4; i++) differ |= a.tokens[i] != a.tokens[0];
    EXPECT_TRUE(differ);
    for (auto & row : a.tokens)
        for (int64_t t : row) EXPECT_TRUE(t >= 0 && t < 97);
    // top_k = 1 is greedy whatever the temperature
    GenerateOptions k1;
    k1.max_new_tokens = 6;
    k1.temperature = 2.0;
    k1.top_k = 1;
    EXPECT_EQ(m->generate(ids_tensor(prompt), k1).tokens[0], r.tokens[0]);
}

// -- (d) checkpointing -----------------------------------------------------------------------

TEST(ModelTrain, CheckpointedGradientsEqualPlain) {
    for (auto & [type, tie] : kTypes) {
        auto m = tiny_model(type, tie);
        m->train(true);
        at::Tensor ids = at::randint(0, 97, {2, 6}, at::kLong);
        at::Tensor mask = at::ones({2, 6}, at::kLong);
        mask[1][0] = 0;   // with a padding mask, and without one below
        auto grads = [&](bool ckpt, bool masked = true) {
            m->gradient_checkpointing(ckpt);
            for (auto & [n, p] : m->named_parameters())
                if (p.grad().defined()) p.mutable_grad() = at::Tensor();
            at::Tensor loss = m->forward(ids, masked ? mask : at::Tensor()).pow(2).mean();
            loss.backward();
            std::vector<at::Tensor> g;
            for (auto & [n, p] : m->named_parameters()) g.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
            return g;
        };
        auto names = m->named_parameters();
        for (bool masked : {false, true}) {
            auto plain = grads(false, masked), ck = grads(true, masked);
            for (size_t i = 0; i < plain.size(); i++) {
                ASSERT_TRUE(ck[i].defined()) << names[i].first;
                EXPECT_LT(max_diff(plain[i], ck[i]), 1e-7) << type << " " << names[i].first;
            }
        }
        auto plain = grads(false);
        // frozen parameters get no gradient and the rest still match
        EXPECT_EQ(m->requires_grad(false, R"(embed_tokens|mlp\.up_proj)"), 3);
        auto fz = grads(true);
        for (size_t i = 0; i < fz.size(); i++) {
            bool frozen = names[i].first.find("embed_tokens") != std::string::npos ||
                          names[i].first.find("up_proj") != std::string::npos;
            EXPECT_EQ(fz[i].defined(), !frozen) << names[i].first;
            if (!frozen) {
                EXPECT_LT(max_diff(plain[i], fz[i]), 1e-7) << names[i].first;
            }
        }
        m->requires_grad(true);
    }
}

// The checkpointed graph holds one custom node per layer (so the switch really is in effect).
TEST(ModelTrain, CheckpointNodesInGraph) {
    auto m = tiny_model("llama");
    m->train(true);
    auto count = [&](bool ckpt) {
        m->gradient_checkpointing(ckpt);
        at::Tensor y = m->forward(ids_tensor({1, 2, 3}));
        std::vector<torch::autograd::Node *> todo{y.grad_fn().get()};
        std::set<torch::autograd::Node *> seen;
        int n = 0;
        while (!todo.empty()) {
            auto * f = todo.back();
            todo.pop_back();
            if (!f || !seen.insert(f).second) continue;
            if (f->name().find("LayerCheckpoint") != std::string::npos) n++;
            for (auto & e : f->next_edges()) todo.push_back(e.function.get());
        }
        return n;
    };
    EXPECT_EQ(count(true), 2);
    EXPECT_EQ(count(false), 0);
    m->train(false);   // eval mode never checkpoints
    m->gradient_checkpointing(true);
    EXPECT_EQ(count(true), 0);
}

// -- (e) padding -----------------------------------------------------------------------------

TEST(ModelForward, PaddingMask) {
    for (auto & [type, tie] : kTypes) {
        auto m = tiny_model(type, tie);
        at::NoGradGuard ng;
        std::vector<int64_t> a = {9, 8, 7, 6, 5, 4}, b = {11, 22, 33};
        at::Tensor la = m->forward(ids_tensor(a))[0];
        at::Tensor lb = m->forward(ids_tensor(b))[0];
        // left padding
        at::Tensor ids = at::tensor(std::vector<int64_t>{9, 8, 7, 6, 5, 4, 0, 0, 0, 11, 22, 33}, at::kLong).view({2, 6});
        at::Tensor mask = at::tensor(std::vector<int64_t>{1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1}, at::kLong).view({2, 6});
        at::Tensor out = m->forward(ids, mask);
        EXPECT_LT(max_diff(out[0], la), 1e-5) << type;
        EXPECT_LT(max_diff(out[1][-1], lb[-1]), 1e-5) << type;
        EXPECT_LT(max_diff(out[1].narrow(0, 3, 3), lb), 1e-5) << type;
        EXPECT_FALSE(out.isnan().any().item<bool>());
        // right padding
        at::Tensor rids = at::tensor(std::vector<int64_t>{11, 22, 33, 0, 0, 0}, at::kLong).view({1, 6});
        at::Tensor rmask = at::tensor(std::vector<int64_t>{1, 1, 1, 0, 0, 0}, at::kLong).view({1, 6});
        EXPECT_LT(max_diff(m->forward(rids, rmask)[0].narrow(0, 0, 3), lb), 1e-5) << type;
        // left-padded prefill then cached decode
        auto cache = m->kvcache_init(2, 10);
        m->forward_cached(ids, cache, mask);
        at::Tensor step = m->forward_cached(at::tensor(std::vector<int64_t>{3, 44}, at::kLong).view({2, 1}), cache);
        std::vector<int64_t> a2 = a, b2 = b;
        a2.push_back(3);
        b2.push_back(44);
        EXPECT_LT(max_diff(step[0][0], m->forward(ids_tensor(a2))[0][-1]), 1e-5) << type;
        EXPECT_LT(max_diff(step[1][0], m->forward(ids_tensor(b2))[0][-1]), 1e-5) << type;
    }
}

// -- perplexity ------------------------------------------------------------------------------

TEST(ModelEval, PerplexitySlidingWindow) {
    auto m = tiny_model("llama");
    m->train(false);
    at::NoGradGuard ng;
    at::Tensor ids = at::randint(0, 97, {30}, at::kLong);
    // one window: the plain mean next-token CE
    at::Tensor lg = m->forward(ids.unsqueeze(0))[0].to(at::kDouble);
    at::Tensor nll = -lg.narrow(0, 0, 29).log_softmax(-1).gather(-1, ids.narrow(0, 1, 29).unsqueeze(-1));
    auto one = m->perplexity(ids, 64, 64, 100);
    EXPECT_EQ(one.tokens, 29);
    EXPECT_NEAR(one.nll, nll.mean().item<double>(), 1e-5);
    EXPECT_NEAR(one.ppl, std::exp(one.nll), 1e-9);
    EXPECT_NEAR(one.bits_per_byte, nll.sum().item<double>() / std::log(2.0) / 100, 1e-4);
    // windows of 8 every 4: window k covers [max(4k+4-8,0), 4k+4) and scores its last 4 tokens
    double sum = 0;
    int64_t n = 0;
    for (int64_t end = 4; end <= 32; end += 4) {
        int64_t e = std::min<int64_t>(end, 30), beg = std::max<int64_t>(end - 8, 0);
        at::Tensor w = ids.narrow(0, beg, e - beg);
        at::Tensor l = m->forward(w.unsqueeze(0))[0].to(at::kDouble).log_softmax(-1);
        for (int64_t j = std::max<int64_t>(end - 4, 1); j < e; j++) {
            sum -= l[j - beg - 1][w[j - beg].item<int64_t>()].item<double>();
            n++;
        }
        if (e == 30) break;
    }
    auto sw = m->perplexity(ids, 8, 4);
    EXPECT_EQ(sw.tokens, 29);
    EXPECT_EQ(n, 29);
    EXPECT_NEAR(sw.nll_sum, sum, 1e-4);
}

// -- (f) errors ------------------------------------------------------------------------------

TEST(ModelErrors, NamedInMessages) {
    auto m = tiny_model("qwen3", false);
    auto expect_msg = [](auto fn, std::vector<std::string> parts) {
        try {
            fn();
            ADD_FAILURE() << "no error";
        } catch (const std::exception & e) {
            for (auto & p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what() << " lacks " << p;
        }
    };
    auto sd = m->state_dict();
    NamedTensors missing(sd.begin() + 1, sd.end());
    expect_msg([&] { m->load_state_dict(missing); }, {"missing", "model.embed_tokens.weight"});
    NamedTensors bad = sd;
    bad[3].second = at::zeros({3, 3});
    expect_msg([&] { m->load_state_dict(bad); }, {"shape", bad[3].first, "[3, 3]"});
    NamedTensors extra = sd;
    extra.push_back({"model.layers.7.foo", at::zeros({1})});
    expect_msg([&] { m->load_state_dict(extra); }, {"unexpected", "model.layers.7.foo"});
    auto r = m->load_state_dict(missing, false);
    EXPECT_EQ(r.first, std::vector<std::string>{"model.embed_tokens.weight"});

    TestTempDir d{"qatlab_model_"};
    m->save_pretrained(d.dir());
    std::string cfgp = d.path("config.json");
    auto j = nlohmann::json::parse(std::ifstream(cfgp));
    j.erase("hidden_size");
    std::ofstream(cfgp) << j.dump();
    expect_msg([&] { DecoderModel::from_pretrained(d.dir()); }, {cfgp, "hidden_size", "missing"});
    j["hidden_size"] = "sixty-four";
    std::ofstream(cfgp) << j.dump();
    expect_msg([&] { DecoderModel::from_pretrained(d.dir()); }, {cfgp, "hidden_size", "integer"});
    j["hidden_size"] = 64;
    j["model_type"] = "gpt2";
    std::ofstream(cfgp) << j.dump();
    expect_msg([&] { DecoderModel::from_pretrained(d.dir()); }, {cfgp, "model_type", "gpt2"});
    std::ofstream(cfgp) << "{not json";
    expect_msg([&] { DecoderModel::from_pretrained(d.dir()); }, {cfgp, "JSON"});
    // a checkpoint lacking a tensor names it; a wrong shape names it
    j["model_type"] = "qwen3";
    std::ofstream(cfgp) << j.dump();
    NamedTensors part(sd.begin(), sd.end() - 1);
    safetensors_save(d.path("model.safetensors"), part);
    expect_msg([&] { DecoderModel::from_pretrained(d.dir()); }, {d.dir(), "lm_head.weight", "missing"});
    j["intermediate_size"] = 100;
    std::ofstream(cfgp) << j.dump();
    safetensors_save(d.path("model.safetensors"), sd);
    expect_msg([&] { DecoderModel::from_pretrained(d.dir()); }, {"model.layers.0.mlp.gate_proj.weight", "shape"});
    expect_msg([&] { DecoderModel::from_pretrained("/nonexistent/qatlab"); }, {"/nonexistent/qatlab"});
}

// -- (optional) Hugging Face transformers gives the same logits --------------------------------

TEST(ModelInterop, TransformersLogits) {
    const char * py = test_python();
    if (!py) GTEST_SKIP() << "QATLAB_PYTHON not set";
    std::string quiet;  // the output is dropped, as with >/dev/null
    if (test_python_run("import transformers", {}, &quiet) != 0)
        GTEST_SKIP() << "transformers is not importable by " << py;
    // One python run for every model: importing transformers dominates the time.
    std::vector<std::pair<std::string, bool>> cases = {{"qwen3", false}, {"qwen3", true}, {"llama", true}, {"llama", false}};
    std::vector<std::shared_ptr<DecoderModel>> models;
    std::vector<std::unique_ptr<TestTempDir>> dirs;
    std::string list;
    for (auto & [type, tie] : cases) {
        models.push_back(tiny_model(type, tie, 3));
        dirs.push_back(std::make_unique<TestTempDir>("qatlab_model_"));
        models.back()->save_pretrained(dirs.back()->dir());
        list += "'" + dirs.back()->dir() + "',";
    }
    std::string code =
        "import torch, transformers, safetensors.torch as st\n"
        "for d in [" + list + "]:\n"
        "    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()\n"
        "    ids = torch.tensor([[1, 5, 9, 33, 2, 96, 50, 50]])\n"
        "    with torch.no_grad(): l = m(ids).logits\n"
        "    st.save_file({'logits': l.contiguous()}, d + '/hf_logits.safetensors')\n";
    std::string script = dirs[0]->path("hf.py");
    std::ofstream(script) << code;
    ASSERT_EQ(test_python_file(script, {}, &quiet), 0)
        << "transformers failed on our save_pretrained output: " << script;
    for (size_t k = 0; k < cases.size(); k++) {
        at::Tensor hf = safetensors_load(dirs[k]->path("hf_logits.safetensors")).tensors.at(0).second;
        at::Tensor ours = models[k]->forward(ids_tensor({1, 5, 9, 33, 2, 96, 50, 50}));
        EXPECT_LT(max_diff(hf, ours), 1e-4) << cases[k].first << " tie=" << cases[k].second;
        EXPECT_GT(hf.abs().max().item<double>(), 0.1);
    }
}
