// quant_lut: the seed's V2/V1 LUT layers (docs/formulas.md §1-§4) pinned on small hand-computable
// layers, gradients against float64 central finite differences, the three forward forms, the
// k-means example, snapping, V1→V2, export, and a .pt checkpoint written by real PyTorch.
#include "lib/quant_init.h"
#include "lib/quant_lut.h"
#include "lib/pt_reader.h"
#include "lib/safetensors.h"
#include "test_util.h"

#include <ATen/CPUGeneratorImpl.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>

using namespace qatlab;
namespace fs = std::filesystem;

namespace {

double maxdiff(const at::Tensor & a, const at::Tensor & b) {
    return (a.detach().to(at::kDouble) - b.detach().to(at::kDouble)).abs().max().item<double>();
}

std::vector<double> vals(const at::Tensor & t) {
    at::Tensor d = t.detach().to(at::kCPU, at::kDouble).contiguous().reshape({-1});
    return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

// A random V2 layer with frozen Q: out x in, rank r, LUT size lq.
std::shared_ptr<LutLinearV2> random_v2(int64_t out, int64_t in, int64_t r, int64_t lq, at::ScalarType dt = at::kFloat,
                                       int64_t G = 4, uint64_t seed = 0) {
    at::manual_seed(seed);
    LutConfig c;
    c.lut_size = lq;
    c.scale_rank = r;
    c.group_size = G;
    at::Tensor W = at::randn({out, in}, at::TensorOptions().dtype(dt)) * 0.1;
    auto l = v2_from_dense(W, {}, c, true);
    // perturb the scales so that they are not an exact SVD (general case)
    at::NoGradGuard ng;
    l->scale_A.add_(0.1 * at::randn_like(l->scale_A));
    l->scale_B.add_(0.1 * at::randn_like(l->scale_B));
    v2_freeze_q(*l);
    return l;
}

DecoderConfig tiny_config(int64_t layers = 1) {
    std::string js = R"({"model_type": "qwen3", "vocab_size": 40, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": )" + std::to_string(layers) + R"(, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 64, "tie_word_embeddings": true, "initializer_range": 0.1})";
    return decoder_config_parse(js, "tiny");
}

fs::path tmp_dir(const std::string & tag) {
    fs::path d = fs::temp_directory_path() / ("qatlab_quant_" + tag + "_" + std::to_string(getpid()));
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
}

} // namespace

// -- LUTs, presets, STE ----------------------------------------------------------------------

TEST(QuantLut, LutConstants) {
    EXPECT_EQ(vals(lut_make(4)), (std::vector<double>{-1, -0.33349609375, 0.33349609375, 1}));
    std::vector<double> half{-1, -0.86669921875, -0.7333984375, -0.60009765625, -0.466796875, -0.33349609375,
                             -0.2001953125, -0.06689453125};
    std::vector<double> l16 = half;
    for (int i = 7; i >= 0; i--) l16.push_back(-half[i]);
    EXPECT_EQ(vals(lut_make(16)), l16);
    // include_zero, even size: linspace(-1, 0, Lq/2+1)[:-1] ++ linspace(0, 1, Lq/2)
    EXPECT_EQ(vals(lut_make(4, true)), (std::vector<double>{-1, -0.5, 0, 1}));
    EXPECT_EQ(vals(lut_make(3, true)), (std::vector<double>{-1, 0, 1}));   // odd: plain linspace
    EXPECT_EQ(lut_bits_for(4), 2);
    EXPECT_EQ(lut_bits_for(16), 4);
}

TEST(QuantLut, Presets) {
    auto p = lut_preset("q2a4");
    EXPECT_EQ(std::vector<int64_t>({p.mlp_lut, p.mlp_rank, p.attn_lut, p.attn_rank}), std::vector<int64_t>({4, 32, 16, 8}));
    p = lut_preset("q4a4");
    EXPECT_EQ(std::vector<int64_t>({p.mlp_lut, p.mlp_rank, p.attn_lut, p.attn_rank}), std::vector<int64_t>({16, 4, 16, 4}));
    p = lut_preset("q4a4_r32");
    EXPECT_EQ(std::vector<int64_t>({p.mlp_lut, p.mlp_rank, p.attn_lut, p.attn_rank}), std::vector<int64_t>({16, 32, 16, 32}));
    p = lut_preset("q4_r32");
    EXPECT_EQ(p.attn_rank, 32);
    p = lut_preset("q2a2");
    EXPECT_EQ(std::vector<int64_t>({p.mlp_lut, p.mlp_rank, p.attn_lut, p.attn_rank}), std::vector<int64_t>({4, 32, 4, 32}));
    EXPECT_THROW(lut_preset("q3"), std::runtime_error);
    LutConfig c;   // the scripts' semantics, not the dataclass defaults
    EXPECT_FALSE(c.force_positive_scales);
    EXPECT_EQ(c.magnitude_activation, "identity");
    EXPECT_EQ(c.magnitude_eps, 1e-6);
    EXPECT_EQ(c.norm_eps, 1e-6);
}

TEST(QuantLut, SteFp16) {
    at::Tensor x = at::tensor({1.0 / 3.0, 70000.0, -1e6, 1e-9}, at::kFloat).requires_grad_(true);
    at::Tensor y = ste_fp16(x);
    EXPECT_EQ(vals(y), (std::vector<double>{0.333251953125, 65504, -65504, 0}));   // rounded, saturated
    y.sum().backward();
    EXPECT_EQ(vals(x.grad()), (std::vector<double>{1, 1, 1, 1}));   // identity, also where saturated
    at::Tensor h = at::tensor({0.1}).to(at::kHalf);
    EXPECT_TRUE(ste_fp16(h).is_same(h));
    EXPECT_TRUE(std::isinf(vals(ste_fp16(at::tensor({1e6}, at::kFloat), false))[0]));   // snap_to_fp16_ste: no clamp
}

TEST(QuantLut, NearestIndices) {
    at::Tensor lut = at::tensor({-1.0, 0.0, 1.0}, at::kFloat);
    at::Tensor x = at::tensor({0.5, -0.5, 0.49, 5.0, -7.0, 0.0}, at::kFloat);
    at::Tensor i = lut_nearest_indices(x, lut);
    EXPECT_EQ(i.scalar_type(), at::kByte);
    EXPECT_EQ(vals(i), (std::vector<double>{1, 0, 1, 2, 0, 1}));   // ties to the lowest index, clamped
    EXPECT_EQ(vals(lut_gather(lut, i)), (std::vector<double>{0, -1, 0, 1, -1, 0}));
}

// -- V2 formulas -----------------------------------------------------------------------------

TEST(QuantLut, NormalizedScalesByHand) {
    LutConfig c;
    c.lut_size = 4;
    c.scale_rank = 2;
    LutLinearV2 l(2, 2, c, at::TensorOptions().dtype(at::kDouble));
    l.scale_A = at::tensor({3.0, 0.0, 4.0, 2.0}, at::kDouble).view({2, 2});   // column norms 5, 2
    l.scale_B = at::tensor({0.0, 2.0, 1.0, 1.0}, at::kDouble).view({2, 2});   // row norms 2, sqrt2
    l.rank_magnitude = at::tensor({2.0, 3.0}, at::kDouble);
    V2Scales s = v2_scales(l);
    EXPECT_EQ(vals(s.A_dir), (std::vector<double>{0.6, 0, 0.8, 1}));
    EXPECT_NEAR(vals(s.g)[0], 2 + 1e-6, 1e-15);   // identity + magnitude_eps
    // S[o,i] = sum_k g_k A_dir[o,k] B_dir[k,i]
    const double r2 = 1 / std::sqrt(2.0), g0 = 2 + 1e-6, g1 = 3 + 1e-6;
    std::vector<double> S{0.6 * g0 * 0, 0.6 * g0 * 1, 0.8 * g0 * 0 + g1 * r2, 0.8 * g0 + g1 * r2};
    auto got = vals(v2_full_scales(l));
    for (int i = 0; i < 4; i++) EXPECT_NEAR(got[i], S[i], 1e-12);
    // a zero column stays zero (norm clamped at 1e-6)
    l.scale_A.select(1, 1).zero_();
    EXPECT_EQ(vals(v2_scales(l).A_dir)[1], 0);
    // baked: raw A, B, g with no eps and no normalization
    l.set_baked(true);
    EXPECT_TRUE(l.baked());
    EXPECT_EQ(maxdiff(v2_full_scales(l), at::matmul(l.scale_A * l.rank_magnitude, l.scale_B)), 0);
    // the flag is re-read after an in-place write (load_state_dict copies into it)
    l.baked_flag.fill_(0);
    EXPECT_FALSE(l.baked());
}

TEST(QuantLut, InitFromWeightByHand) {
    // G = 2: group max-abs [[2, 3], [1, 4]] expands to S_full [[2,2,3,3],[1,1,4,4]] (rank 2).
    at::Tensor W = at::tensor({1.0, -2.0, 3.0, 0.5, 0.5, 1.0, -1.0, 4.0}, at::kFloat).view({2, 4});
    LutConfig c;
    c.lut_size = 4;
    c.scale_rank = 2;
    c.group_size = 2;
    LutLinearV2 l(2, 4, c, W.options());
    v2_init_from_weight(l, W, false);
    at::Tensor S_full = at::tensor({2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 4.0, 4.0}, at::kFloat).view({2, 4});
    EXPECT_LT(maxdiff(at::matmul(l.scale_A * l.rank_magnitude, l.scale_B), S_full), 1e-5);
    EXPECT_LT(maxdiff(v2_full_scales(l), S_full), 1e-5);   // + 1e-6 on g only
    auto sv = at::linalg_svdvals(S_full);
    EXPECT_LT(maxdiff(l.rank_magnitude, sv), 1e-5);
    // unit columns / rows
    EXPECT_LT(maxdiff(at::linalg_vector_norm(l.scale_A, 2, {0}), at::ones({2})), 1e-6);
    // padding: in = 5, G = 2 -> groups {0,1},{2,3},{4,pad}; floor max(0.01 s0, 0.01) and fp16 g
    at::Tensor W5 = at::tensor({1.0, -2.0, 3.0, 0.5, -6.0, 0.5, 1.0, -1.0, 4.0, 0.25}, at::kFloat).view({2, 5});
    c.scale_rank = 2;
    LutLinearV2 l5(2, 5, c, W5.options());
    v2_init_from_weight(l5, W5, true);
    at::Tensor S5 = at::tensor({2.0, 2.0, 3.0, 3.0, 6.0, 1.0, 1.0, 4.0, 4.0, 0.25}, at::kFloat).view({2, 5});
    auto sv5 = at::linalg_svdvals(S5);
    auto g = vals(l5.rank_magnitude);
    EXPECT_EQ(g[0], (double)sv5[0].to(at::kHalf).item<float>());   // fp16-rounded
    EXPECT_EQ(g[1], (double)sv5[1].to(at::kHalf).item<float>());
    EXPECT_LT(maxdiff(at::matmul(l5.scale_A * l5.rank_magnitude, l5.scale_B), S5), 1e-2);
    // floor: a rank-1 S gives s1 = 0 -> floored at max(0.01 s0, 0.01)
    at::Tensor W1 = at::tensor({1.0, 1.0, 2.0, 2.0}, at::kFloat).view({2, 2});
    c.group_size = 1;
    LutLinearV2 l1(2, 2, c, W1.options());
    v2_init_from_weight(l1, W1, false);
    double s0 = std::sqrt(10.0);   // ||[[1,1],[2,2]]||_F, the only singular value
    EXPECT_NEAR(vals(l1.rank_magnitude)[0], s0, 1e-5);
    EXPECT_NEAR(vals(l1.rank_magnitude)[1], std::max(0.01 * s0, 0.01), 1e-7);
}

TEST(QuantLut, FreezeQByHand) {
    LutConfig c;
    c.lut_size = 4;
    c.scale_rank = 1;
    LutLinearV2 l(1, 4, c, at::TensorOptions().dtype(at::kFloat));
    l.scale_A = at::ones({1, 1});
    l.scale_B = at::ones({1, 4});   // B_dir = 0.5 each, S = 0.5 * (g + 1e-6)
    l.rank_magnitude = at::full({1}, 2.0 - 1e-6);   // S = 1 (to float precision)
    l.w = at::tensor({0.0, 0.9, -0.5, 2.0}, at::kFloat).view({1, 4}).requires_grad_(true);
    v2_freeze_q(l);
    // LUT4 [-1, -0.3335, 0.3335, 1]: 0 is a tie (-0.3335 vs 0.3335) -> lowest index 1
    EXPECT_EQ(vals(l.indices), (std::vector<double>{1, 3, 1, 3}));
    EXPECT_EQ(l.indices.scalar_type(), at::kByte);
    EXPECT_FALSE(l.w.requires_grad());
    // Q on the fly (no indices) gives the same values
    at::Tensor q = v2_q(l, at::kFloat);
    l.indices = at::Tensor();
    EXPECT_EQ(maxdiff(v2_q(l, at::kFloat), q), 0);
}

TEST(QuantLut, FormsAgreeWithoutSte) {
    for (int64_t lq : {4, 16}) {
        auto l = random_v2(24, 32, 6, lq);
        at::Tensor x = at::randn({2, 3, 32});
        at::Tensor ref = at::linear(x, v2_q(*l, at::kFloat) * v2_full_scales(*l));   // (Q ⊙ S) x
        at::Tensor ym = v2_forward(*l, x, LutForm::materialized);
        at::Tensor yl = v2_forward(*l, x, LutForm::loop);
        at::Tensor yb = v2_forward(*l, x, LutForm::batched);
        EXPECT_EQ(ym.sizes(), (std::vector<int64_t>{2, 3, 24}));
        double scale = ref.abs().max().item<double>();
        EXPECT_LT(maxdiff(ym, ref), 2e-6 * scale);
        EXPECT_LT(maxdiff(yl, ref), 2e-6 * scale);
        EXPECT_LT(maxdiff(yb, ref), 2e-6 * scale);
        std::printf("[forms lut%lld, no STE] |y|max %.3g: materialized-loop %.3g, batched-loop %.3g\n", (long long)lq,
                    scale, maxdiff(ym, yl), maxdiff(yb, yl));
        // W_eff through the Linear interface
        EXPECT_LT(maxdiff(at::linear(x, l->weight()), ref), 2e-6 * scale);
        l->form = LutForm::batched;
        EXPECT_LT(maxdiff(l->forward(x), ref), 2e-6 * scale);
    }
}

TEST(QuantLut, MaterializedBf16Compute) {
    // W_eff is formed in fp32 from the scales and the LUT, then cast once to the compute dtype
    auto l = random_v2(16, 32, 4, 4);
    at::Tensor x = at::randn({3, 32}).to(at::kBFloat16);
    at::Tensor y = v2_forward(*l, x, LutForm::materialized);
    EXPECT_EQ(y.scalar_type(), at::kBFloat16);
    at::Tensor W = (v2_q(*l, at::kFloat) * v2_full_scales(*l)).to(at::kBFloat16);
    EXPECT_EQ(maxdiff(y, at::linear(x, W)), 0);
    // and it still trains the fp32 scales
    l->forward(x).to(at::kFloat).sum().backward();
    EXPECT_EQ(l->scale_A.grad().scalar_type(), at::kFloat);
}

TEST(QuantLut, MaterializedSteMatchesComposite) {
    // The materialized form is a custom autograd function (W recomputed in backward); with STE
    // its values and gradients equal the plain autograd composition of the same STE points.
    auto l = random_v2(24, 40, 6, 16, at::kFloat, 8, 9);
    l->cfg.use_ste_fp16 = true;
    l->lut.requires_grad_(true);
    at::Tensor x = at::randn({2, 5, 40}).requires_grad_(true), R = at::randn({2, 5, 24});
    auto run = [&](bool composite) {
        for (at::Tensor * p : {&l->scale_A, &l->scale_B, &l->rank_magnitude, &l->lut, &x}) p->mutable_grad() = at::Tensor();
        at::Tensor y;
        if (composite) {
            V2Scales s = v2_scales(*l);
            at::Tensor W = ste_fp16(ste_fp16(lut_gather(l->lut, l->indices)) *
                                    at::matmul(ste_fp16(s.A_dir * s.g), ste_fp16(s.B_dir)));
            y = ste_fp16(at::linear(x, W));
        } else {
            y = v2_forward(*l, x, LutForm::materialized);
        }
        (y * R).sum().backward();
        return std::vector<at::Tensor>{y.detach(), l->scale_A.grad(), l->scale_B.grad(), l->rank_magnitude.grad(),
                                       l->lut.grad(), x.grad()};
    };
    auto a = run(false), b = run(true);
    for (size_t i = 0; i < a.size(); i++) {
        ASSERT_TRUE(a[i].defined() && b[i].defined()) << i;
        EXPECT_LT(maxdiff(a[i], b[i]), 1e-4 * std::max(1.0, b[i].abs().max().item<double>())) << i;
    }
}

TEST(QuantLut, FormsWithSteMeasured) {
    // The materialized form cannot reproduce the per-rank u, v and accumulator roundings: it
    // rounds W_eff and y instead. The difference against the seed's loop is measured here.
    auto l = random_v2(128, 256, 32, 4, at::kFloat, 32, 3);
    l->cfg.use_ste_fp16 = true;
    at::Tensor x = at::randn({4, 256});
    at::Tensor yl = v2_forward(*l, x, LutForm::loop);
    at::Tensor yb = v2_forward(*l, x, LutForm::batched);
    at::Tensor ym = v2_forward(*l, x, LutForm::materialized);
    double scale = yl.abs().max().item<double>();
    double dbl = maxdiff(yb, yl), dml = maxdiff(ym, yl);
    std::printf("[STE-FP16 128x256 r32 LUT4] |y|max %.3g: batched-loop %.3g, materialized-loop %.3g, "
                "materialized-batched %.3g\n", scale, dbl, dml, maxdiff(ym, yb));
    // every output is on the fp16 grid
    EXPECT_EQ(maxdiff(yl, yl.to(at::kHalf).to(at::kFloat)), 0);
    EXPECT_EQ(maxdiff(ym, ym.to(at::kHalf).to(at::kFloat)), 0);
    EXPECT_LT(dbl, 1e-2 * std::max(scale, 1.0));   // the seed measured ~5e-3 at |y| ~ 1.9
    EXPECT_LT(dml, 1e-2 * std::max(scale, 1.0));
}

// -- gradients (float64, central differences) ------------------------------------------------

namespace {
// max |autograd - central FD| over every element of p for loss().
double grad_check(const std::function<at::Tensor()> & loss, const at::Tensor & p, double h = 1e-6) {
    at::Tensor L = loss();
    at::Tensor g = torch::autograd::grad({L}, {p}, {}, false, false, true)[0];
    if (!g.defined()) g = at::zeros_like(p);
    at::Tensor flat = p.detach().view({-1});   // shares p's storage
    std::vector<double> fd(flat.numel());
    for (int64_t i = 0; i < flat.numel(); i++) {
        double v = flat[i].item<double>();
        at::NoGradGuard ng;
        flat[i] = v + h;
        double lp = loss().item<double>();
        flat[i] = v - h;
        double lm = loss().item<double>();
        flat[i] = v;
        fd[i] = (lp - lm) / (2 * h);
    }
    return maxdiff(g, at::tensor(fd, at::kDouble).view(p.sizes()));
}
} // namespace

TEST(QuantLut, GradientsFiniteDifferences) {
    for (LutForm f : {LutForm::materialized, LutForm::loop, LutForm::batched}) {
        auto l = random_v2(5, 6, 3, 4, at::kDouble, 2, 7);
        l->lut.requires_grad_(true);   // learnable_lut
        at::Tensor x = at::randn({2, 6}, at::kDouble), R = at::randn({2, 5}, at::kDouble);
        auto loss = [&] { return (v2_forward(*l, x, f) * R).sum(); };
        for (at::Tensor * p : {&l->scale_A, &l->scale_B, &l->rank_magnitude, &l->lut}) {
            double e = grad_check(loss, *p);
            EXPECT_LT(e, 1e-7) << lut_form_name(f);
        }
        // the gradient w.r.t. scale_A[:,k] is orthogonal to that column (only directions matter)
        at::Tensor gA = torch::autograd::grad({loss()}, {l->scale_A})[0];
        EXPECT_LT((gA * l->scale_A).sum(0).abs().max().item<double>(), 1e-10);
    }
    // trainable LUT16: raw deltas through softmax/cumsum (fp16 snap is identity in backward)
    at::Tensor raw = lut16_raw_init(lut_make(16)).to(at::kDouble).requires_grad_(true);
    at::Tensor R = at::randn({16}, at::kDouble);
    auto loss = [&] { return (lut16_from_raw(raw, 1.0, false) * R).sum(); };
    EXPECT_LT(grad_check(loss, raw), 1e-7);
    at::Tensor g1 = torch::autograd::grad({(lut16_from_raw(raw, 1.0, true) * R).sum()}, {raw})[0];
    at::Tensor g2 = torch::autograd::grad({loss()}, {raw})[0];
    EXPECT_LT(maxdiff(g1, g2), 1e-12);
}

TEST(QuantLut, TrainableLut16) {
    EXPECT_EQ(lut16_min_delta(1.0), 0.001953125);
    at::Tensor l16 = lut_make(16);
    at::Tensor back = lut16_from_raw(lut16_raw_init(l16), 1.0, true);
    EXPECT_LT(maxdiff(back, l16), 2e-3);   // round trip up to fp16 / softmax rounding
    EXPECT_EQ(vals(back)[15], 1.0);        // the last value is M
    EXPECT_LT(maxdiff(back, -back.flip({0})), 1e-12);   // symmetric
    auto l = random_v2(8, 8, 2, 16);
    v2_enable_lut_training(*l);
    EXPECT_TRUE(l->lut_raw.requires_grad());
    at::Tensor x = at::randn({3, 8});
    l->forward(x).sum().backward();
    EXPECT_TRUE(l->lut_raw.grad().defined());
}

// -- k-means and Q4 -> Q2 --------------------------------------------------------------------

TEST(QuantLut, KmeansExample) {
    at::Tensor c = lut_kmeans_reduce(lut_make(16), 4, 20);
    std::vector<double> want{-0.7333984375, -0.2001953125, 0.2668457031, 0.8000488281};
    auto got = vals(c);
    for (int i = 0; i < 4; i++) EXPECT_NEAR(got[i], want[i], 1e-9) << i;
    EXPECT_EQ(c.scalar_type(), at::kFloat);
}

TEST(QuantLut, RankLutConversion) {
    auto l = random_v2(16, 32, 4, 16);
    at::Tensor A0 = l->scale_A.detach().clone(), B0 = l->scale_B.detach().clone(), g0 = l->rank_magnitude.detach().clone();
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
    v2_convert_rank_lut(*l, 32, 4, gen);
    EXPECT_EQ(l->scale_A.sizes(), (std::vector<int64_t>{16, 32}));
    EXPECT_EQ(l->scale_B.sizes(), (std::vector<int64_t>{32, 32}));
    EXPECT_EQ(maxdiff(l->scale_A.narrow(1, 0, 4), A0), 0);
    EXPECT_EQ(maxdiff(l->scale_B.narrow(0, 0, 4), B0), 0);
    EXPECT_EQ(maxdiff(l->rank_magnitude.narrow(0, 0, 4), g0), 0);
    EXPECT_EQ(vals(l->rank_magnitude.narrow(0, 4, 28)), std::vector<double>(28, (double)0.01f));
    double sd = l->scale_A.narrow(1, 4, 28).std().item<double>();
    EXPECT_NEAR(sd, 0.01, 0.002);   // 0.01 · N(0, 1)
    EXPECT_LT(maxdiff(l->lut, lut_kmeans_reduce(lut_make(16), 4)), 1e-12);
    EXPECT_TRUE(l->scale_A.requires_grad());
    // indices = freeze_Q with the new scales and LUT
    at::Tensor idx = l->indices.clone();
    v2_freeze_q(*l);
    EXPECT_EQ(maxdiff(idx, l->indices), 0);
    EXPECT_LT(l->indices.max().item<int64_t>(), 4);
}

// -- V1 and V1 -> V2 -------------------------------------------------------------------------

TEST(QuantLut, V1FormulasByHand) {
    // out = 2, r = 1 < min(2, 128): low rank; row 1 of the layer is zero (S = 0 -> 1e-8)
    LutLinearV1 l(2, 3, 4, 1, 128, at::TensorOptions().dtype(at::kDouble));
    EXPECT_EQ(l.scale_B.sizes(), (std::vector<int64_t>{1, 128}));   // padded to the group size
    EXPECT_FALSE(l.full_scales.defined());
    l.scale_A = at::tensor({2.0, 0.0}, at::kDouble).view({2, 1});
    l.scale_B = at::full({1, 128}, 0.5, at::kDouble);
    l.scale_B[0][1] = -1.0;   // S[0,1] = -2 -> clamped at 1e-8
    l.w = at::tensor({0.4, 1e-9, -0.2, 0.0, 0.0, 0.0}, at::kDouble).view({2, 3});
    auto S = vals(v1_scales(l));
    EXPECT_EQ(S, (std::vector<double>{1, 1e-8, 1, 1e-8, 1e-8, 1e-8}));
    // idx = round((clamp(W/S, -1, 1) + 1) / (2/3)): 0.4 -> 2.1 -> 2; 0.1 -> 1.65 -> 2; -0.2 -> 1.2 -> 1;
    // 0 -> 1.5 -> 2 (round half to even)
    auto L4 = vals(lut_make(4));
    EXPECT_EQ(vals(v1_fake_quant(l)), (std::vector<double>{L4[2], L4[2] * 1e-8, L4[1], L4[2] * 1e-8, L4[2] * 1e-8,
                                                           L4[2] * 1e-8}));
    // STE rule: weight trainable -> gradient to W only; else to the scales through S
    l.w.requires_grad_(true);
    l.scale_A.requires_grad_(true);
    at::Tensor x = at::tensor({1.0, 1.0, 1.0, 0.0, 0.0, 0.0}, at::kDouble).view({2, 3});   // row 0 only
    at::Tensor sel = at::tensor({1.0, 0.0}, at::kDouble);
    (l.forward(x) * sel).sum().backward();
    EXPECT_EQ(vals(l.w.grad()), (std::vector<double>{1, 1, 1, 0, 0, 0}));
    EXPECT_FALSE(l.scale_A.grad().defined());
    l.w = l.w.detach();
    (l.forward(x) * sel).sum().backward();
    EXPECT_TRUE(l.scale_A.grad().defined());
    // d/dA[0] of sum_i lut[idx_i] * A[0] * B[i] over the unclamped entries 0 and 2
    EXPECT_NEAR(vals(l.scale_A.grad())[0], L4[2] * 0.5 + L4[1] * 0.5, 1e-12);
}

TEST(QuantLut, V1ToV2PreservesAB) {
    at::manual_seed(5);
    at::Tensor W = at::randn({24, 44}) * 0.05;   // in = 44 pads to 48 (6 groups of 8)
    LutLinearV1 v1(24, 44, 16, 4, 8, W.options());
    v1.w = W;
    v1_init_from_weight(v1, W);
    {
        at::NoGradGuard ng;
        v1.scale_A.mul_(1 + 0.3 * at::randn_like(v1.scale_A));
    }
    auto v2 = v1_to_v2(v1, LutConfig(), true);
    at::Tensor AB = at::matmul(v1.scale_A, v1.scale_B).narrow(1, 0, 44);
    V2Scales s = v2_scales(*v2);
    at::Tensor S_noeps = at::matmul(s.A_dir * v2->rank_magnitude, s.B_dir);   // g without the forward's +1e-6
    double rel = maxdiff(S_noeps, AB) / AB.abs().max().item<double>();
    std::printf("[V1->V2] max |(A_dir g) B_dir - A B| / max|AB| = %.3g\n", rel);
    EXPECT_LT(rel, 1e-6);
    EXPECT_EQ(v2->rank(), 4);
    EXPECT_EQ(maxdiff(v2->lut, v1.lut), 0);
    EXPECT_TRUE(v2->indices.defined());
    EXPECT_LT(maxdiff(at::linalg_vector_norm(v2->scale_A, 2, {0}), at::ones({4})), 1e-6);
}

// -- snapping --------------------------------------------------------------------------------

TEST(QuantLut, SnapForExportKeepsOutput) {
    auto l = random_v2(16, 24, 4, 4);
    at::Tensor x = at::randn({3, 24});
    at::Tensor y0 = l->forward(x).detach();
    v2_snap_for_export(*l);
    EXPECT_TRUE(l->baked());
    EXPECT_EQ(vals(l->rank_magnitude), std::vector<double>(4, 1.0));
    EXPECT_TRUE(l->scale_A.requires_grad());
    EXPECT_LT(maxdiff(l->forward(x), y0), 1e-5);
}

TEST(QuantLut, SnapForAneMatchesSteForward) {
    for (bool recompute : {true, false}) {
        for (LutForm f : {LutForm::loop, LutForm::materialized}) {
            auto l = random_v2(64, 96, 8, 16, at::kFloat, 32, 11);
            l->cfg.use_ste_fp16 = true;
            l->form = f;
            at::Tensor x = at::randn({4, 96}).to(at::kHalf).to(at::kFloat);   // inputs already on the fp16 grid
            at::Tensor y_ste = l->forward(x).detach();
            at::Tensor idx0 = l->indices.clone();
            LutLinearV2 ref = *l;   // the fp32 layer (snap replaces the tensors, not their contents)
            v2_snap_for_ane(*l, recompute);
            EXPECT_EQ(l->w.scalar_type(), at::kHalf);
            EXPECT_EQ(l->scale_A.scalar_type(), at::kHalf);
            EXPECT_EQ(l->lut.scalar_type(), at::kHalf);
            EXPECT_EQ(l->baked(), recompute);
            at::Tensor y16 = l->forward(x.to(at::kHalf));
            EXPECT_EQ(y16.scalar_type(), at::kHalf);
            double scale = y_ste.abs().max().item<double>(), d = maxdiff(y16, y_ste);
            int64_t changed = (idx0 != l->indices).sum().item<int64_t>();
            std::printf("[snap_for_ane recompute=%d %s] |y|max %.3g: max |fp16 model - STE-FP16 forward| = %.3g "
                        "(%lld of %lld indices changed)\n", (int)recompute, lut_form_name(f), scale, d,
                        (long long)changed, (long long)idx0.numel());
            EXPECT_LT(d, 2e-2 * std::max(scale, 1.0));
            // the same against the STE-FP16 forward with the snapped indices: only rounding-order differences
            ref.indices = l->indices;
            double d2 = maxdiff(y16, ref.forward(x));
            std::printf("    same indices: max |fp16 model - STE-FP16 forward| = %.3g (fp16 ulp at |y|max: %.3g)\n", d2,
                        std::pow(2.0, std::floor(std::log2(scale)) - 10));
            EXPECT_LT(d2, 2e-3 * std::max(scale, 1.0));
        }
    }
}

TEST(QuantLut, ConvertToFp16RecreatesLut) {
    auto l = random_v2(8, 8, 2, 16);
    l->lut = lut_kmeans_reduce(l->lut, 16);   // a custom LUT
    l->lut.mul_(0.5);
    v2_convert_to_fp16(*l);
    EXPECT_EQ(l->lut.scalar_type(), at::kHalf);
    EXPECT_EQ(maxdiff(l->lut, lut_make(16)), 0);   // as the seed: make_lut in fp16
    EXPECT_EQ(l->scale_B.scalar_type(), at::kHalf);
}

// -- models, export, checkpoints -------------------------------------------------------------

TEST(QuantLut, ReplaceTrainableAndExport) {
    at::manual_seed(0);
    DecoderModel m(tiny_config(2));
    m.train(false);
    QuantReplaceOptions o;   // q2a4
    auto names = quant_replace(m, o);
    EXPECT_EQ(names.size(), 14u);
    auto v2 = quant_v2_layers(m);
    for (auto & [n, l] : v2) {
        EXPECT_EQ(l->lut.numel(), quant_is_mlp(n) ? 4 : 16) << n;
        EXPECT_EQ(l->rank(), quant_is_mlp(n) ? 32 : 8) << n;
        EXPECT_EQ(l->indices.scalar_type(), at::kByte);
        EXPECT_FALSE(l->w.requires_grad());
    }
    // named parameters keep the seed's key names
    bool seen = false;
    for (auto & [n, t] : m.named_parameters())
        if (n == "model.layers.0.mlp.gate_proj._indices") seen = true;
    EXPECT_TRUE(seen);
    // filter and partial replacement
    DecoderModel m2(tiny_config(2));
    QuantReplaceOptions o2;
    o2.attn = false;
    o2.filter = "layers\\.1\\.";
    EXPECT_EQ(quant_replace(m2, o2).size(), 3u);
    // trainable subsets
    EXPECT_EQ(quant_set_trainable(m, "all"), 14 * 3);
    EXPECT_EQ(quant_set_trainable(m, "g_only"), 14);
    EXPECT_EQ(quant_set_trainable(m, "mlp"), 6 * 3);
    EXPECT_EQ(quant_set_trainable(m, "attn"), 8 * 3);
    EXPECT_EQ(quant_set_trainable(m, "frozen_magnitude"), 14 * 2);
    for (auto & [n, t] : m.named_parameters()) {
        if (n.find("embed") != std::string::npos || n.find("norm") != std::string::npos) {
            EXPECT_FALSE(t.requires_grad()) << n;
        }
    }
    // export HF: plain weights equal to W_eff, reloaded by from_pretrained
    at::Tensor ids = at::randint(0, 40, {1, 7}, at::kLong);
    at::Tensor y = m.forward(ids);
    fs::path d = tmp_dir("hf");
    quant_export_hf(m, (d / "hf").string());
    auto dense = DecoderModel::from_pretrained((d / "hf").string());
    double diff = maxdiff(dense->forward(ids), y);
    std::printf("[export_hf] max |plain - quantized logits| = %.3g\n", diff);
    EXPECT_LT(diff, 1e-4);
    // compact export: packed indices round trip
    int64_t bytes = quant_export_compact(m, (d / "compact.safetensors").string());
    std::printf("[export_compact] %lld bytes (float32 HF export: %lld bytes)\n", (long long)bytes,
                (long long)fs::file_size(d / "hf" / "model.safetensors"));
    EXPECT_EQ(bytes, (int64_t)fs::file_size(d / "compact.safetensors"));
    auto st = safetensors_load((d / "compact.safetensors").string());
    for (auto & [n, t] : st.tensors)
        if (n == "model.layers.1.mlp.down_proj.indices_packed") {
            auto l = std::dynamic_pointer_cast<LutLinearV2>(m.get_linear("model.layers.1.mlp.down_proj"));
            EXPECT_EQ(t.numel(), l->indices.numel() / 4);   // 2 bits
            EXPECT_EQ(maxdiff(indices_unpack(t, 2, l->indices.numel()), l->indices.reshape({-1})), 0);
        }
    EXPECT_EQ(st.metadata["model.layers.0.self_attn.q_proj.bits"], "4");
    // our checkpoint round trip (safetensors + seed-style config.json)
    quant_save_checkpoint(m, (d / "ckpt").string(), true);   // with float weights: loads into any model
    std::ifstream cf(d / "ckpt" / "config.json");
    std::string cj((std::istreambuf_iterator<char>(cf)), {});
    LutPreset p = quant_seed_config_parse(cj, "config.json");
    EXPECT_EQ(std::vector<int64_t>({p.mlp_lut, p.mlp_rank, p.attn_lut, p.attn_rank}), std::vector<int64_t>({4, 32, 16, 8}));
    EXPECT_NE(cj.find("\"config_preset\": \"q2a4\""), std::string::npos);
    // the config.json convert_q4_to_q2 writes (no config_preset)
    p = quant_seed_config_parse(R"({"version": "v2", "model_id": "Qwen/Qwen3-0.6B", "converted_from": "q4_a4",
        "lut_bits": 2, "attn_lut_bits": 4, "scale_rank": 32, "attn_scale_rank": 8,
        "force_positive_scales": false, "magnitude_activation": "identity"})", "q2/config.json");
    EXPECT_EQ(std::vector<int64_t>({p.mlp_lut, p.mlp_rank, p.attn_lut, p.attn_rank}), std::vector<int64_t>({4, 32, 16, 8}));
    EXPECT_THROW(quant_seed_config_parse(R"({"lut_bits": "2"})", "bad.json"), std::runtime_error);
    DecoderModel m3(tiny_config(2));
    auto unused = quant_load_checkpoint(m3, (d / "ckpt").string());
    EXPECT_TRUE(unused.empty());
    EXPECT_EQ(quant_v2_layers(m3).size(), 14u);
    m3.train(false);
    EXPECT_LT(maxdiff(m3.forward(ids), y), 1e-5);
    // compact (no float weights): into the float model it came from, not into another one
    quant_save_checkpoint(m, (d / "compact").string());
    DecoderModel m4(tiny_config(2));
    EXPECT_THROW(quant_load_checkpoint(m4, (d / "compact").string()), std::runtime_error);
    at::manual_seed(0);
    DecoderModel m5(tiny_config(2));   // the weights m had before quant_replace
    EXPECT_TRUE(quant_load_checkpoint(m5, (d / "compact").string()).empty());
    m5.train(false);
    EXPECT_LT(maxdiff(m5.forward(ids), y), 1e-5);
    fs::remove_all(d);
}

TEST(QuantLut, CheckpointedGradientsEqualPlain) {
    at::manual_seed(2);
    DecoderModel m(tiny_config(2));
    quant_replace(m, QuantReplaceOptions());
    quant_set_trainable(m, "all");
    m.train(true);
    at::Tensor ids = at::randint(0, 40, {2, 5}, at::kLong);
    auto grads = [&](bool ckpt) {
        m.gradient_checkpointing(ckpt);
        for (auto & [n, t] : m.named_parameters())
            if (t.requires_grad()) t.mutable_grad() = at::Tensor();
        m.forward(ids).pow(2).mean().backward();
        std::vector<at::Tensor> g;
        for (auto & [n, t] : m.named_parameters())
            if (t.requires_grad()) g.push_back(t.grad().clone());
        return g;
    };
    auto a = grads(false), b = grads(true);
    ASSERT_EQ(a.size(), 42u);
    for (size_t i = 0; i < a.size(); i++) EXPECT_LT(maxdiff(a[i], b[i]), 1e-7) << i;
    // to(float64) keeps the uint8 indices
    m.to(std::nullopt, at::kDouble);
    auto l = quant_v2_layers(m)[0].second;
    EXPECT_EQ(l->indices.scalar_type(), at::kByte);
    EXPECT_EQ(l->scale_A.scalar_type(), at::kDouble);
    EXPECT_EQ(m.forward(ids).scalar_type(), at::kDouble);
    EXPECT_EQ(m.requires_grad(true), (int64_t)m.named_parameters().size() - 14 * 2);   // _indices, flag skipped
}

TEST(QuantLut, TrainedLut16CheckpointRoundTrip) {
    at::manual_seed(4);
    DecoderModel m(tiny_config(1));
    m.train(false);
    QuantReplaceOptions o;
    o.preset = "q4a4";
    quant_replace(m, o);
    for (auto & [n, l] : quant_v2_layers(m)) {
        v2_enable_lut_training(*l);
        at::NoGradGuard ng;
        l->lut_raw.add_(0.3 * at::randn_like(l->lut_raw));
    }
    EXPECT_EQ(quant_set_trainable(m, "lut"), 7);
    at::Tensor ids = at::randint(0, 40, {1, 6}, at::kLong);
    at::Tensor y = m.forward(ids).detach();
    fs::path d = tmp_dir("lut16");
    quant_save_checkpoint(m, d.string(), true);   // loaded into another random model below
    DecoderModel m2(tiny_config(1));
    m2.train(false);
    EXPECT_TRUE(quant_load_checkpoint(m2, d.string()).empty());
    auto l2 = quant_v2_layers(m2)[0].second;
    EXPECT_TRUE(l2->lut_raw.defined());
    EXPECT_LT(maxdiff(m2.forward(ids), y), 1e-6);
    // snapping bakes the trained LUT into `lut`
    quant_snap_for_export(m2);
    EXPECT_FALSE(l2->lut_raw.defined());
    EXPECT_LT(maxdiff(m2.forward(ids), y), 1e-5);
    fs::remove_all(d);
}

TEST(QuantLut, PackUnpack) {
    at::Tensor i2 = at::randint(0, 4, {37}, at::kLong).to(at::kByte);
    at::Tensor p2 = indices_pack(i2, 2);
    EXPECT_EQ(p2.numel(), 10);
    EXPECT_EQ(maxdiff(indices_unpack(p2, 2, 37), i2), 0);
    at::Tensor i4 = at::randint(0, 16, {9}, at::kLong).to(at::kByte);
    EXPECT_EQ(maxdiff(indices_unpack(indices_pack(i4, 4), 4, 9), i4), 0);
    // element j of a byte sits at bits [j·bits, (j+1)·bits)
    EXPECT_EQ(vals(indices_pack(at::tensor({1, 2, 3, 0}, at::kByte), 2)), std::vector<double>{1 + (2 << 2) + (3 << 4)});
    EXPECT_THROW(indices_pack(at::tensor({4}, at::kByte), 2), std::runtime_error);
}

TEST(QuantLut, ModelQ4ToQ2AndV1ToV2) {
    at::manual_seed(1);
    DecoderModel m(tiny_config(1));
    QuantReplaceOptions o;
    o.preset = "q4a4";
    quant_replace(m, o);
    EXPECT_EQ(quant_q4_to_q2(m), 7);
    for (auto & [n, l] : quant_v2_layers(m)) {
        EXPECT_EQ(l->rank(), quant_is_mlp(n) ? 32 : 8);
        EXPECT_EQ(l->lut.numel(), quant_is_mlp(n) ? 4 : 16);
        if (quant_is_mlp(n)) {
            EXPECT_NEAR(vals(l->lut)[2], 0.2668457031, 1e-9);
        }
    }
    DecoderModel m1(tiny_config(1));
    auto v1names = quant_replace_v1(m1, o);
    EXPECT_EQ(v1names.size(), 7u);
    at::Tensor ids = at::randint(0, 40, {1, 5}, at::kLong);
    m1.train(false);
    EXPECT_EQ(quant_v1_to_v2(m1), 7);
    EXPECT_EQ(quant_v2_layers(m1).size(), 7u);
    EXPECT_TRUE(m1.forward(ids).isfinite().all().item<bool>());
}

TEST(QuantLut, LoadSeedPtCheckpoint) {
    if (!test_python()) GTEST_SKIP() << "QATLAB_PYTHON is not set";
    fs::path d = tmp_dir("pt");
    // A Qwen3-shaped tiny model saved with the seed's V2 key layout by real PyTorch: q2a4,
    // layer 0 MLP with int64 _indices, attention with _Q only, o_proj baked, k-means-like LUT.
    std::string script = R"PY(
import torch, sys, collections
torch.manual_seed(0)
H, I, V, hd = 64, 96, 40, 16
sd = collections.OrderedDict()
sd['model.embed_tokens.weight'] = torch.randn(V, H) * 0.1
shapes = {'self_attn.q_proj': (64, 64), 'self_attn.k_proj': (32, 64), 'self_attn.v_proj': (32, 64),
          'self_attn.o_proj': (64, 64), 'mlp.gate_proj': (I, H), 'mlp.up_proj': (I, H), 'mlp.down_proj': (H, I)}
refs = {}
for name, (o, i) in shapes.items():
    p = 'model.layers.0.' + name + '.'
    mlp = name.startswith('mlp')
    r, lq = (32, 4) if mlp else (8, 16)
    lut = torch.linspace(-1, 1, lq, dtype=torch.float16).float()
    if mlp: lut = torch.tensor([-0.7333984375, -0.2001953125, 0.2668457031, 0.8000488281])
    A, B, g = torch.randn(o, r), torch.randn(r, i), torch.rand(r) + 0.5
    idx = torch.randint(0, lq, (o, i))
    sd[p + 'weight'] = torch.randn(o, i) * 0.1
    sd[p + 'scale_A'] = A; sd[p + 'scale_B'] = B; sd[p + 'rank_magnitude'] = g; sd[p + 'lut'] = lut
    baked = name == 'self_attn.o_proj'
    if mlp: sd[p + '_indices'] = idx
    else: sd[p + '_Q'] = lut[idx]
    sd[p + '_scales_baked_flag'] = torch.tensor(1 if baked else 0, dtype=torch.int8)
    if baked: S = (A * g) @ B
    else:
        Ad = A / A.norm(dim=0, keepdim=True).clamp(min=1e-6)
        Bd = B / B.norm(dim=1, keepdim=True).clamp(min=1e-6)
        S = (Ad * (g + 1e-6)) @ Bd
    x = torch.randn(3, i)
    refs[name] = (x, x @ (lut[idx] * S).t())
    if name == 'mlp.up_proj':   # the seed's STE-FP16 loop and batched forms (docs/formulas.md §2.4, docs/formulas.md §2.5)
        def st(t): return t + (t.clamp(-65504, 65504).half().float() - t).detach()
        Q, gs = st(lut[idx]), st(g + 1e-6)
        y = torch.zeros(3, o)
        for k in range(r):
            b = st(Bd[k, :]); a = st(gs[k] * Ad[:, k]); u = st(x * b); v = st(torch.nn.functional.linear(u, Q))
            y = st(y + a * v)
        Bm, Am = st(Bd), st((Ad * gs).t())
        X = st(x[..., None, :] * Bm); Y = st(torch.einsum('...ri,oi->...ro', X, Q)); yb = st((Y * Am).sum(-2))
        refs['ste_loop'] = (x, y); refs['ste_batched'] = (x, yb)
for n in ['input_layernorm', 'post_attention_layernorm']: sd['model.layers.0.' + n + '.weight'] = torch.ones(H)
sd['model.layers.0.self_attn.q_norm.weight'] = torch.ones(hd)
sd['model.layers.0.self_attn.k_norm.weight'] = torch.ones(hd)
sd['model.norm.weight'] = torch.ones(H)
sd['lm_head.weight'] = sd['model.embed_tokens.weight']
torch.save(sd, sys.argv[1] + '/best_state_dict.pt')
torch.save({k: v[0] for k, v in refs.items()}, sys.argv[1] + '/x.pt')
torch.save({k: v[1] for k, v in refs.items()}, sys.argv[1] + '/y.pt')
)PY";
    {
        std::ofstream f(d / "make.py");
        f << script;
    }
    std::string cmd = test_python_command({(d / "make.py").string(), d.string()});
    ASSERT_EQ(test_shell_run(cmd), 0) << cmd;
    DecoderModel m(tiny_config(1));
    auto unused = quant_load_checkpoint(m, (d / "best_state_dict.pt").string());
    EXPECT_EQ(unused, std::vector<std::string>{"lm_head.weight"});   // tied
    auto xs = pt_state_dict(pt_load((d / "x.pt").string())), ys = pt_state_dict(pt_load((d / "y.pt").string()));
    ASSERT_EQ(xs.size(), 9u);
    for (size_t i = 0; i < xs.size(); i++) {
        if (xs[i].first.rfind("ste_", 0) == 0) continue;
        std::string name = "model.layers.0." + xs[i].first;
        auto l = std::dynamic_pointer_cast<LutLinearV2>(m.get_linear(name));
        ASSERT_TRUE(l) << name;
        EXPECT_EQ(l->baked(), name.find("o_proj") != std::string::npos);
        EXPECT_EQ(l->indices.scalar_type(), at::kByte);
        for (LutForm f : {LutForm::materialized, LutForm::loop, LutForm::batched}) {
            at::Tensor y = v2_forward(*l, xs[i].second, f);
            double sc = ys[i].second.abs().max().item<double>();
            EXPECT_LT(maxdiff(y, ys[i].second), 1e-5 * sc) << name << " " << lut_form_name(f);
        }
    }
    auto mlp = std::dynamic_pointer_cast<LutLinearV2>(m.get_linear("model.layers.0.mlp.up_proj"));
    EXPECT_NEAR(vals(mlp->lut)[2], 0.2668457031, 1e-9);   // the checkpoint's LUT wins
    // STE-FP16 loop and batched forms against PyTorch running the seed's formulas
    mlp->cfg.use_ste_fp16 = true;
    for (size_t i = 0; i < xs.size(); i++) {
        if (xs[i].first.rfind("ste_", 0) != 0) continue;
        LutForm f = xs[i].first == "ste_loop" ? LutForm::loop : LutForm::batched;
        at::Tensor y = v2_forward(*mlp, xs[i].second, f);
        double d = maxdiff(y, ys[i].second);
        std::printf("[seed STE-FP16 %s vs PyTorch] max diff %.3g (|y|max %.3g)\n", lut_form_name(f), d,
                    ys[i].second.abs().max().item<double>());
        EXPECT_LE(d, 2 * std::pow(2.0, std::floor(std::log2(ys[i].second.abs().max().item<double>())) - 10));
    }
    // a shape error names the file and the key
    DecoderConfig big = tiny_config(1);
    big.intermediate_size = 128;
    DecoderModel mb(big);
    try {
        quant_load_checkpoint(mb, (d / "best_state_dict.pt").string());
        FAIL() << "expected a shape error";
    } catch (const std::runtime_error & e) {
        std::string w = e.what();
        EXPECT_NE(w.find("best_state_dict.pt"), std::string::npos) << w;
        EXPECT_NE(w.find("mlp.gate_proj.scale_A"), std::string::npos) << w;
    }
    fs::remove_all(d);
}

// -- recipes, data-aware init, calibration, bits (lib/quant_init) -----------------------------

namespace {
// ‖P_a - P_b‖_max of the projectors on the column spaces of a and b (orthonormal columns).
double subspace_gap(const at::Tensor & a, const at::Tensor & b) {
    return maxdiff(at::matmul(a, a.t()), at::matmul(b, b.t()));
}

std::shared_ptr<LutLinearV2> layer_for(const at::Tensor & W, int64_t lut, int64_t rank) {
    LutConfig c;
    c.lut_size = lut;
    c.scale_rank = rank;
    c.group_size = 8;
    auto l = std::make_shared<LutLinearV2>(W.size(0), W.size(1), c, W.options());
    l->w = W;
    return l;
}
} // namespace

TEST(QuantLutInit, RandomizedSvdMatchesExactTopSubspace) {
    at::manual_seed(1);
    for (auto shape : {std::vector<int64_t>{300, 200}, std::vector<int64_t>{150, 400}}) {
        const int64_t m = shape[0], n = shape[1], r = 8;
        at::Tensor U = std::get<0>(at::linalg_qr(at::randn({m, 40}, at::kDouble)));
        at::Tensor V = std::get<0>(at::linalg_qr(at::randn({n, 40}, at::kDouble)));
        at::Tensor s = at::pow(0.7, at::arange(40, at::kDouble));   // decaying spectrum
        at::Tensor M = at::matmul(U * s, V.t()) + 1e-4 * at::randn({m, n}, at::kDouble);
        LowRankSvd ex = svd_lowrank(M, r, 10, 2, 0, INT64_MAX);
        LowRankSvd rn = svd_lowrank(M, r, 10, 2, 7, 0);
        ASSERT_EQ(rn.U.sizes(), (at::IntArrayRef{m, r}));
        ASSERT_EQ(rn.Vh.sizes(), (at::IntArrayRef{r, n}));
        double gu = subspace_gap(ex.U, rn.U), gv = subspace_gap(ex.Vh.t(), rn.Vh.t());
        double gs = maxdiff(ex.S, rn.S) / ex.S[0].item<double>();
        std::printf("[svd_lowrank %lldx%lld r=8] projector gap U %.2e V %.2e, singular values %.2e\n", (long long)m,
                    (long long)n, gu, gv, gs);
        EXPECT_LT(gu, 1e-3);
        EXPECT_LT(gv, 1e-3);
        EXPECT_LT(gs, 1e-4);
    }
}

TEST(QuantLutInit, WeightedFitBeatsUnweightedOnItsObjective) {
    at::manual_seed(2);
    // Rows with different magnitudes and a skewed imatrix: a tenth of the channels carry 100x
    // the activation energy (the pattern of real LLM activations).
    const int64_t out = 64, in = 128;
    at::Tensor W = at::randn({out, in}) * (0.02 + 0.1 * at::rand({out, 1}));
    at::Tensor d = at::ones({in});
    d.narrow(0, 0, in / 10).fill_(100.0);
    d = d.index_select(0, at::randperm(in));
    LayerRecipe rc;
    rc.name = "synthetic";
    rc.lut_size = 4;
    rc.rank = 4;
    rc.group_size = 8;
    auto run = [&](const std::string & init, const at::Tensor & dw, int64_t refine, bool kmeans) {
        auto l = layer_for(W, rc.lut_size, rc.rank);
        V2InitOptions o;
        o.init = init;
        o.refine = refine;
        LayerRecipe r = rc;
        r.kmeans = kmeans;
        v2_init(*l, dw, r, o);
        if (!l->indices.defined()) v2_freeze_q(*l);
        return v2_weighted_error(*l, d);   // always the weighted objective
    };
    double seed_init = run("svd", {}, 0, false);
    double plain = run("weighted", {}, 0, false), plain4 = run("weighted", {}, 4, false);
    double wtd = run("weighted", d, 0, false), wtd4 = run("weighted", d, 4, false);
    double km4 = run("weighted", d, 4, true);
    std::printf("[weighted init, LUT4 rank 4] sum d (W_eff - W)^2: seed svd %.4f; unweighted %.4f, +4 refine %.4f; "
                "weighted %.4f, +4 refine %.4f, +k-means LUT %.4f\n", seed_init, plain, plain4, wtd, wtd4, km4);
    EXPECT_LT(wtd, plain);
    EXPECT_LT(wtd4, plain4);
    EXPECT_LE(wtd4, wtd);
    EXPECT_LT(wtd4, seed_init);
    EXPECT_LE(km4, wtd4 * 1.0001);
    // The stored indices are the nearest LUT entries of W / S (tighten_q), as uint8.
    auto l = layer_for(W, 16, 4);
    V2InitOptions o;
    o.init = "weighted";
    o.refine = 2;
    LayerRecipe r16 = rc;
    r16.lut_size = 16;
    v2_init(*l, d, r16, o);
    EXPECT_EQ(l->indices.scalar_type(), at::kByte);
    at::Tensor idx = l->indices.clone();
    v2_tighten_q(*l);
    EXPECT_EQ(maxdiff(idx, l->indices), 0);
}

TEST(QuantLutInit, TightenQFloorsScalesByHand) {
    // S = g a b^T with a = (1, 0), b = (0.6, 0.8), g = 1: row 2 of S is 0. tighten_q divides it
    // by 1e-4 instead: W / S = (0.5, -0.5; 0.5, -0.2) → LUT16 indices (11, 4; 11, 6);
    // freeze_Q's plain division saturates row 2 at the LUT ends (15, 0).
    LutConfig c;
    c.scale_rank = 1;
    auto l = std::make_shared<LutLinearV2>(2, 2, c, at::TensorOptions().dtype(at::kFloat));
    l->w = at::tensor({0.3f, -0.4f, 5e-5f, -2e-5f}).view({2, 2});
    l->scale_A = at::tensor({1.0f, 0.0f}).view({2, 1});
    l->scale_B = at::tensor({0.6f, 0.8f}).view({1, 2});
    l->rank_magnitude = at::tensor({1.0f});
    v2_tighten_q(*l);
    EXPECT_EQ(vals(l->indices), (std::vector<double>{11, 4, 11, 6}));
    v2_freeze_q(*l);
    EXPECT_EQ(vals(l->indices), (std::vector<double>{11, 4, 15, 0}));
}

TEST(QuantLutInit, RecipeErrorsNameLayerAndOption) {
    auto msg = [](const LayerRecipe & r, int64_t out, int64_t in) {
        try {
            layer_recipe_check(r, out, in);
        } catch (const std::exception & e) {
            return std::string(e.what());
        }
        return std::string();
    };
    LayerRecipe r;
    r.name = "model.layers.0.mlp.up_proj";
    r.lut_size = 1;
    EXPECT_NE(msg(r, 96, 64).find("layer 'model.layers.0.mlp.up_proj': lut = 1"), std::string::npos) << msg(r, 96, 64);
    r.lut_size = 300;
    EXPECT_NE(msg(r, 96, 64).find("lut = 300: expected an integer in 2..256"), std::string::npos);
    r.lut_size = 256;
    r.rank = 65;
    EXPECT_NE(msg(r, 96, 64).find("rank = 65: expected an integer in 1..64"), std::string::npos) << msg(r, 96, 64);
    r.rank = 64;
    EXPECT_EQ(msg(r, 96, 64), "");
    // an imatrix missing a layer: nothing is replaced
    at::manual_seed(0);
    DecoderModel m(tiny_config(1));
    LayerRecipe a;
    a.name = "model.layers.0.mlp.down_proj";
    V2InitOptions o;
    o.init = "weighted";
    o.imatrix["model.layers.0.mlp.up_proj"] = at::ones({64});
    try {
        quant_replace_recipe(m, {a}, o);
        ADD_FAILURE() << "no error";
    } catch (const std::exception & e) {
        EXPECT_NE(std::string(e.what()).find("layer 'model.layers.0.mlp.down_proj': imatrix"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(quant_v2_layers(m).empty());
}

TEST(QuantLutInit, BitsPerWeightByHand) {
    // 4 index bits + 16 bits x (4 (64 + 96) + 4 scale values + 16 LUT entries) / (64 x 96)
    EXPECT_DOUBLE_EQ(v2_bits_per_weight(64, 96, 4, 16), 4.0 + 16.0 * 660.0 / 6144.0);
    EXPECT_DOUBLE_EQ(v2_bits_per_weight(64, 96, 1, 5), 3.0 + 16.0 * (161.0 + 5.0) / 6144.0);
    EXPECT_DOUBLE_EQ(v2_bits_per_weight(10, 10, 1, 2), 1.0 + 16.0 * (20.0 + 1.0 + 2.0) / 100.0);
    at::manual_seed(0);
    DecoderModel m(tiny_config(1));
    int64_t total = 0;
    for (auto & [n, t] : m.named_parameters()) total += t.numel();
    LayerRecipe r;
    r.name = "model.layers.0.mlp.down_proj";   // (64, 96)
    r.lut_size = 16;
    r.rank = 4;
    quant_replace_recipe(m, {r}, V2InitOptions());
    BitsReport b = quant_bits_per_weight(m);
    EXPECT_EQ(b.quantized_weights, 6144);
    EXPECT_EQ(b.model_weights, total);
    EXPECT_DOUBLE_EQ(b.quantized, 4.0 + 16.0 * 660.0 / 6144.0);
    EXPECT_NEAR(b.model, (6144 * b.quantized + 16.0 * (double)(total - 6144)) / (double)total, 1e-12);
}

TEST(QuantLutInit, CalibrateMatchesHandComputedSecondMoment) {
    at::manual_seed(3);
    DecoderModel m(tiny_config(2));
    m.train(true);
    at::Tensor ids = at::randint(0, 40, {2, 5}, at::kLong), ids2 = at::randint(0, 40, {1, 3}, at::kLong);
    Calibration c = quant_calibrate(m, {ids, ids2}, {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"});
    EXPECT_EQ(c.tokens, 13);
    EXPECT_EQ(m.num_hooks(), 0);
    EXPECT_TRUE(m.is_training());
    // q_proj of layer 0 sees input_layernorm(embed(ids)): x = e / sqrt(mean(e^2) + eps) * w.
    at::Tensor E, w;
    for (auto & [n, t] : m.named_parameters()) {
        if (n == "model.embed_tokens.weight") E = t.detach();
        if (n == "model.layers.0.input_layernorm.weight") w = t.detach();
    }
    at::Tensor e = E.index_select(0, at::cat({ids.reshape({-1}), ids2.reshape({-1})})).to(at::kDouble);   // (13, 64)
    at::Tensor x = e * at::rsqrt(e.pow(2).mean(1, true) + m.config().rms_norm_eps) * w.to(at::kDouble);
    at::Tensor want = x.pow(2).mean(0);
    EXPECT_LT(maxdiff(c.stats.at("model.layers.0.self_attn.q_proj"), want), 1e-5 * want.max().item<double>());
    EXPECT_EQ(c.stats.at("model.layers.0.mlp.up_proj").numel(), 64);
    EXPECT_EQ(c.stats.size(), 2u);
    // an error inside the forward (a token id out of range) still removes the hooks
    EXPECT_THROW(quant_calibrate(m, {at::full({1, 2}, 99, at::kLong)}, {"model.layers.0.mlp.up_proj"}), std::exception);
    EXPECT_EQ(m.num_hooks(), 0);
    EXPECT_TRUE(m.is_training());
    EXPECT_THROW(quant_calibrate(m, {ids.to(at::kInt)}, {"model.layers.0.mlp.up_proj"}), std::runtime_error);
}

TEST(QuantLutInit, PackAnyBitsAndCompactExport) {
    // 3 bits: 1 at stream bits 0-2, 2 at 3-5, 3 at 6-8 → bytes 1 + 2·8 + (3 & 3)·64 = 209, 3 >> 2 = 0
    EXPECT_EQ(vals(indices_pack(at::tensor({1, 2, 3}, at::kByte), 3)), (std::vector<double>{209, 0}));
    for (int64_t bits = 1; bits <= 8; bits++) {
        at::Tensor v = at::randint(0, int64_t(1) << bits, {101}, at::kLong).to(at::kByte);
        at::Tensor p = indices_pack(v, bits);
        EXPECT_EQ(p.numel(), (101 * bits + 7) / 8) << bits;
        EXPECT_EQ(maxdiff(indices_unpack(p, bits, 101), v), 0) << bits;
    }
    EXPECT_EQ(lut_bits_for(2), 1);
    EXPECT_EQ(lut_bits_for(5), 3);
    EXPECT_EQ(lut_bits_for(256), 8);
    at::manual_seed(0);
    DecoderModel m(tiny_config(1));
    LayerRecipe r;
    r.name = "model.layers.0.mlp.up_proj";   // (96, 64)
    r.lut_size = 8;
    r.rank = 3;
    quant_replace_recipe(m, {r}, V2InitOptions());
    fs::path d = tmp_dir("compact3");
    int64_t bytes = quant_export_compact(m, (d / "c.safetensors").string());
    EXPECT_EQ(bytes, (int64_t)fs::file_size(d / "c.safetensors"));
    auto st = safetensors_load((d / "c.safetensors").string());
    EXPECT_EQ(st.metadata["model.layers.0.mlp.up_proj.bits"], "3");
    auto l = quant_v2_layers(m)[0].second;
    for (auto & [n, t] : st.tensors)
        if (n == "model.layers.0.mlp.up_proj.indices_packed") {
            EXPECT_EQ(t.numel(), 96 * 64 * 3 / 8);
            EXPECT_EQ(maxdiff(indices_unpack(t, 3, 96 * 64), l->indices.reshape({-1})), 0);
        }
    fs::remove_all(d);
}

TEST(QuantLutInit, FastNearestEqualsFullArgmin) {
    // The candidate + neighbour rule against the plain argmin of |x - l_j| (ties to the lowest j),
    // on uniform fp16 LUTs, a non-uniform sorted one, an unsorted one, exact ties and NaN.
    at::manual_seed(5);
    auto full = [](const at::Tensor & x, const at::Tensor & l) {
        at::Tensor xc = x.clamp(l.min().item<double>(), l.max().item<double>());
        return (xc.reshape({-1, 1}) - l.reshape({1, -1})).abs().argmin(1).view(x.sizes());
    };
    std::vector<at::Tensor> luts{lut_make(2), lut_make(4), lut_make(16), lut_make(16, true), lut_make(256),
                                 std::get<0>(at::randn({13}).sort()), at::randn({9})};
    for (auto & l : luts) {
        at::Tensor mid = (l.narrow(0, 0, l.numel() - 1) + l.narrow(0, 1, l.numel() - 1)) * 0.5;
        at::Tensor x = at::cat({at::randn({20000}) * 1.2, l, mid});   // random, on entries, on midpoints
        EXPECT_EQ(maxdiff(lut_nearest_long(x, l), full(x, l)), 0) << l;
    }
    at::Tensor x = at::tensor({NAN, 0.5f, -INFINITY, INFINITY});
    EXPECT_EQ(vals(lut_nearest_long(x, lut_make(4))), (std::vector<double>{0, 2, 0, 3}));
}
