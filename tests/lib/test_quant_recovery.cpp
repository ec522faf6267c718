// quant recovery LoRA (docs/formulas.md §2.7) on V2 layers: the forward against the plain formula
// V2(x) + (alpha/r)·x A^T B^T, gradients by finite differences, resnap_with_lora, model-level helpers.
#include "lib/quant_lut.h"
#include "lib/safetensors.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>
#include <set>

using namespace qatlab;

namespace {

double maxdiff(const at::Tensor & a, const at::Tensor & b) {
    return (a.detach().to(at::kDouble) - b.detach().to(at::kDouble)).abs().max().item<double>();
}

// A random V2 layer with frozen Q and perturbed (non-SVD) scales: out x in, rank r, LUT lq.
std::shared_ptr<LutLinearV2> rand_v2(int64_t out, int64_t in, int64_t r, int64_t lq, at::ScalarType dt = at::kFloat,
                                     uint64_t seed = 0) {
    at::manual_seed(seed);
    LutConfig c;
    c.lut_size = lq;
    c.scale_rank = r;
    c.group_size = 4;
    auto l = v2_from_dense(at::randn({out, in}, at::TensorOptions().dtype(dt)) * 0.1, {}, c, true);
    at::NoGradGuard ng;
    l->scale_A.add_(0.1 * at::randn_like(l->scale_A));
    l->scale_B.add_(0.1 * at::randn_like(l->scale_B));
    v2_freeze_q(*l);
    return l;
}

DecoderConfig tiny(int64_t layers) {
    std::string js = R"({"model_type": "qwen3", "vocab_size": 40, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": )" + std::to_string(layers) + R"(, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 64, "tie_word_embeddings": true, "initializer_range": 0.1})";
    return decoder_config_parse(js, "tiny");
}

} // namespace

TEST(QuantRecovery, ForwardIsV2PlusScaledLowRank) {
    auto l = rand_v2(12, 20, 3, 16);
    at::Tensor x = at::randn({2, 5, 20});
    at::Tensor Weff = l->weight();                           // Q ⊙ S before LoRA [12,20]
    at::Tensor base = at::matmul(x, Weff.t());
    v2_enable_lora(*l, 4, 10.0);                            // scaling 2.5
    EXPECT_EQ(l->lora_rank(), 4);
    EXPECT_DOUBLE_EQ(l->lora_scaling(), 2.5);
    EXPECT_EQ(l->lora_A.sizes(), at::IntArrayRef({4, 20}));
    EXPECT_EQ(l->lora_B.sizes(), at::IntArrayRef({12, 4}));
    EXPECT_EQ(l->lora_A.scalar_type(), at::kFloat);
    EXPECT_EQ(at::count_nonzero(l->lora_B).item<int64_t>(), 0);   // B = 0 ...
    double sd = l->lora_A.std().item<double>();
    EXPECT_NEAR(sd, 0.02, 0.006);                                  // ... A ~ N(0, 0.02)
    for (LutForm f : {LutForm::materialized, LutForm::loop, LutForm::batched})
        EXPECT_LT(maxdiff(v2_forward(*l, x, f), base), 2e-6) << lut_form_name(f);   // B = 0: unchanged
    {
        at::NoGradGuard ng;
        l->lora_B.copy_(at::randn_like(l->lora_B) * 0.1);
    }
    // By hand: y = x W_eff^T + 2.5 · (x A^T) B^T
    at::Tensor want = base + 2.5 * at::matmul(at::matmul(x, l->lora_A.t()), l->lora_B.t());
    for (LutForm f : {LutForm::materialized, LutForm::loop, LutForm::batched})
        EXPECT_LT(maxdiff(v2_forward(*l, x, f), want), 2e-5) << lut_form_name(f);
    // weight() is what the layer computes with: W_eff + scaling·B A
    EXPECT_LT(maxdiff(l->weight(), Weff + 2.5 * at::matmul(l->lora_B, l->lora_A)), 1e-6);
    // enabling again keeps the adapter (the seed's rule); bad options name the option
    at::Tensor A0 = l->lora_A.detach().clone();
    v2_enable_lora(*l, 2);
    EXPECT_EQ(maxdiff(l->lora_A, A0), 0);
    EXPECT_THROW(v2_enable_lora(*l, 0), std::runtime_error);
    EXPECT_THROW(v2_enable_lora(*l, 21), std::runtime_error);
}

TEST(QuantRecovery, GradientsFiniteDifferences) {
    auto l = rand_v2(6, 8, 2, 4, at::kDouble, 3);
    v2_enable_lora(*l, 3, 6.0);
    {
        at::NoGradGuard ng;
        l->lora_A = l->lora_A.to(at::kDouble).requires_grad_(true);
        l->lora_B = (at::randn({6, 3}, at::kDouble) * 0.3).requires_grad_(true);
    }
    l->scale_A.requires_grad_(false);
    l->scale_B.requires_grad_(false);
    l->rank_magnitude.requires_grad_(false);
    at::Tensor x = at::randn({3, 8}, at::kDouble), R = at::randn({3, 6}, at::kDouble);
    auto loss = [&] { return (v2_forward(*l, x, LutForm::materialized) * R).sum(); };
    loss().backward();
    for (at::Tensor * p : {&l->lora_A, &l->lora_B}) {
        at::Tensor g = p->grad().clone(), fd = at::zeros_like(g);
        at::NoGradGuard ng;
        for (int64_t i = 0; i < p->numel(); i++) {
            auto e = p->view({-1})[i];
            double v = e.item<double>(), h = 1e-6;
            e.fill_(v + h);
            double up = loss().item<double>();
            e.fill_(v - h);
            double dn = loss().item<double>();
            e.fill_(v);
            fd.view({-1})[i] = (up - dn) / (2 * h);
        }
        EXPECT_LT(maxdiff(g, fd), 1e-7);
    }
    // frozen base: only the adapter receives gradients
    EXPECT_FALSE(l->scale_A.grad().defined());
}

TEST(QuantRecovery, ResnapMovesIndicesTowardTheLoraWeight) {
    auto l = rand_v2(24, 32, 4, 4, at::kFloat, 5);
    v2_enable_lora(*l, 4);
    {
        at::NoGradGuard ng;
        l->lora_B.copy_(at::randn_like(l->lora_B) * 0.3);
    }
    at::Tensor S = v2_full_scales(*l).detach();
    at::Tensor old_idx = l->indices.clone();
    at::Tensor old_w = v2_q(*l, at::kFloat) * S;           // W_eff
    at::Tensor target = l->weight();                       // W_eff + ΔW
    int64_t changed = v2_resnap_with_lora(*l);
    EXPECT_FALSE(l->lora_A.defined());
    EXPECT_EQ(l->lora_rank(), 0);
    EXPECT_GT(changed, 0);
    EXPECT_EQ((l->indices != old_idx).sum().item<int64_t>(), changed);
    EXPECT_LT(maxdiff(v2_full_scales(*l), S), 1e-7);       // S unchanged
    at::Tensor new_w = l->weight();
    at::Tensor dn = (new_w - target).abs(), dol = (old_w - target).abs();
    at::Tensor ch = l->indices != old_idx;
    // nearer where the index changed, never farther anywhere
    EXPECT_TRUE((dn.masked_select(ch) < dol.masked_select(ch)).all().item<bool>());
    EXPECT_TRUE((dn <= dol + 1e-7).all().item<bool>());
    std::printf("[resnap] %lld of %lld indices changed; mean |W - target| %.4g -> %.4g\n", (long long)changed,
                (long long)l->indices.numel(), dol.mean().item<double>(), dn.mean().item<double>());
    // B = 0: resnap changes nothing
    auto l2 = rand_v2(8, 12, 2, 16, at::kFloat, 6);
    at::Tensor i2 = l2->indices.clone();
    v2_enable_lora(*l2, 2);
    EXPECT_EQ(v2_resnap_with_lora(*l2), 0);
    EXPECT_EQ((l2->indices != i2).sum().item<int64_t>(), 0);
}

TEST(QuantRecovery, ModelEnableFreezeCheckpointExport) {
    at::manual_seed(0);
    DecoderModel m(tiny(2));
    m.train(false);
    quant_replace(m, QuantReplaceOptions());                // q2a4: 14 projections
    at::Tensor ids = at::randint(0, 40, {1, 7}, at::kLong);
    at::Tensor y0 = m.forward(ids).detach();
    RecoveryLoraOptions o;
    o.rank = 4;
    o.alpha = 8;
    {   // mlp_only: the 6 MLP projections
        DecoderModel m2(tiny(2));
        quant_replace(m2, QuantReplaceOptions());
        RecoveryLoraOptions om = o;
        om.mlp_only = true;
        auto names = quant_enable_recovery_lora_all(m2, om);
        EXPECT_EQ(names.size(), 6u);
        for (auto & n : names) EXPECT_TRUE(quant_is_mlp(n)) << n;
        RecoveryLoraOptions ok = o;   // skip_k_proj = false: all 14
        ok.skip_k_proj = false;
        EXPECT_EQ(quant_enable_recovery_lora_all(m2, ok).size(), 14u);
        EXPECT_THROW(quant_enable_recovery_lora(m2, "lm_head", o), std::runtime_error);
    }
    auto names = quant_enable_recovery_lora_all(m, o);
    EXPECT_EQ(names.size(), 12u);                            // k_proj skipped
    for (auto & n : names) EXPECT_EQ(n.find("k_proj"), std::string::npos) << n;
    EXPECT_LT(maxdiff(m.forward(ids), y0), 1e-6);           // B = 0
    // state dict carries the seed's names
    std::set<std::string> keys;
    for (auto & [n, t] : m.named_parameters()) keys.insert(n);
    EXPECT_TRUE(keys.count("model.layers.0.mlp.up_proj.lora_A"));
    EXPECT_TRUE(keys.count("model.layers.1.self_attn.q_proj.lora_B"));
    EXPECT_FALSE(keys.count("model.layers.0.self_attn.k_proj.lora_A"));
    // only LoRA trains
    EXPECT_EQ(quant_freeze_for_recovery(m), 24);
    for (auto & [n, t] : m.named_parameters()) {
        bool lora = n.find(".lora_") != std::string::npos;
        EXPECT_EQ(t.requires_grad(), lora) << n;
    }
    EXPECT_EQ(quant_freeze_for_recovery(m, true), 24 + 2 * 4 + 1);   // + 4 norms/layer, final norm
    quant_freeze_for_recovery(m);
    {
        at::NoGradGuard ng;
        for (auto & [n, l] : quant_v2_layers(m))
            if (l->lora_B.defined()) l->lora_B.copy_(at::randn_like(l->lora_B) * 0.05);
    }
    at::Tensor y1 = m.forward(ids).detach();
    EXPECT_GT(maxdiff(y1, y0), 1e-4);
    // a gradient reaches the adapters through the materialized forward
    m.train(true);
    m.forward(ids).pow(2).mean().backward();
    m.train(false);
    auto up = std::dynamic_pointer_cast<LutLinearV2>(m.get_linear("model.layers.0.mlp.up_proj"));
    ASSERT_TRUE(up->lora_A.grad().defined());
    EXPECT_GT(up->lora_A.grad().abs().sum().item<double>(), 0);
    EXPECT_FALSE(up->scale_A.grad().defined());
    // checkpoint round trip: alpha from config.json, the seed's recovery keys
    TestTempDir d("recovery");
    quant_save_checkpoint(m, d.path("ckpt"), true);   // loaded into another random model below
    std::ifstream cf(d.path("ckpt/config.json"));
    std::string cj((std::istreambuf_iterator<char>(cf)), {});
    EXPECT_NE(cj.find("\"recovery_lora_alpha\": 8"), std::string::npos) << cj;
    DecoderModel m3(tiny(2));
    m3.train(false);
    EXPECT_TRUE(quant_load_checkpoint(m3, d.path("ckpt")).empty());
    auto up3 = std::dynamic_pointer_cast<LutLinearV2>(m3.get_linear("model.layers.0.mlp.up_proj"));
    EXPECT_EQ(up3->lora_rank(), 4);
    EXPECT_DOUBLE_EQ(up3->lora_alpha, 8.0);
    EXPECT_LT(maxdiff(m3.forward(ids), y1), 1e-5);
    // load_state_dict into a model with LoRA enabled (the trainer's resume path)
    DecoderModel m4(tiny(2));
    m4.train(false);
    quant_replace(m4, QuantReplaceOptions());
    quant_enable_recovery_lora_all(m4, o);
    m4.load_state_dict(m.named_parameters(), true, "test");
    EXPECT_LT(maxdiff(m4.forward(ids), y1), 1e-6);
    // export_hf writes W_eff + ΔW: the dense model computes what the LoRA'd one does
    quant_export_hf(m, d.path("hf"));
    auto dense = DecoderModel::from_pretrained(d.path("hf"));
    EXPECT_LT(maxdiff(dense->forward(ids), y1), 1e-4);
    // resnap drops every adapter (the logits distances are printed, not asserted: tiny model)
    ResnapStats st = quant_resnap_with_lora(m);
    EXPECT_EQ(st.layers, 12);
    EXPECT_GT(st.changed, 0);
    for (auto & [n, l] : quant_v2_layers(m)) EXPECT_EQ(l->lora_rank(), 0) << n;
    at::Tensor y2 = m.forward(ids).detach();
    std::printf("[resnap model] %lld indices changed, rel error %.4f; |y - y_lora|: before %.4g, after %.4g\n",
                (long long)st.changed, st.rel_error, maxdiff(y0, y1), maxdiff(y2, y1));
    for (auto & [n, t] : m.named_parameters()) EXPECT_EQ(n.find(".lora_"), std::string::npos) << n;
}
