// test_kd_loss: the KD loss (docs/formulas.md §6) against hand values and explicit double loops; fused vs
// unfused values and gradients, finite differences, masking, variants, bf16, errors, evaluate.
#include "lib/kd_loss.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

using namespace qatlab;

namespace {

const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble);

// A small random problem whose cache is a random teacher's own top-k (sorted, like the writer).
struct Case {
    at::Tensor h, W;   // (B, S, H), (V, H) float64
    KDBatch b;
};

Case case_make(int64_t B, int64_t S, int64_t H, int64_t V, int64_t K, int64_t R, uint64_t seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    Case c;
    c.h = at::randn({B, S, H}, gen, f64);
    c.W = at::randn({V, H}, gen, f64);
    at::Tensor teacher = at::randn({B, S, V}, gen, f64) * 2.0;   // (B, S, V)
    auto tk = teacher.topk(K, -1);
    c.b.topk_idx = std::get<1>(tk).to(at::kInt);
    c.b.topk_logits = std::get<0>(tk).to(at::kHalf);
    if (R > 0) {
        c.b.rand_idx = at::randint(0, V, {B, S, R}, gen, at::TensorOptions().dtype(at::kInt));
        c.b.rand_logits = teacher.gather(2, c.b.rand_idx.to(at::kLong)).to(at::kHalf);
    }
    c.b.input_ids = at::randint(0, V, {B, S + 1}, gen, at::TensorOptions().dtype(at::kInt));
    return c;
}

double lse(const std::vector<double> & z) {
    double m = -INFINITY, s = 0;
    for (double v : z) m = std::max(m, v);
    for (double v : z) s += std::exp(v - m);
    return m + std::log(s);
}

// KL(softmax(t/T) ‖ softmax(z/T)) over the same candidates.
double kl_loop(const std::vector<double> & t, const std::vector<double> & z, double T) {
    std::vector<double> ts, zs;
    for (double v : t) ts.push_back(v / T);
    for (double v : z) zs.push_back(v / T);
    double lt = lse(ts), lz = lse(zs), kl = 0;
    for (size_t k = 0; k < t.size(); k++) kl += std::exp(ts[k] - lt) * ((ts[k] - lt) - (zs[k] - lz));
    return kl;
}

// The loss of docs/formulas.md §6 / docs/formulas.md §6 with explicit loops in double; negatives = the batch's rand_idx.
KDResult loop_loss(const Case & c, const KDOptions & o) {
    const int64_t B = c.h.size(0), S = c.b.topk_idx.size(1), H = c.h.size(2), V = c.W.size(0);
    const int64_t K = c.b.topk_idx.size(2), R = c.b.rand_idx.defined() ? c.b.rand_idx.size(2) : 0;
    auto h = c.h.accessor<double, 3>();
    auto W = c.W.accessor<double, 2>();
    at::Tensor ti = c.b.topk_idx.to(at::kLong), tl = c.b.topk_logits.to(at::kDouble);
    at::Tensor ri = R ? c.b.rand_idx.to(at::kLong) : at::Tensor(), rl = R ? c.b.rand_logits.to(at::kDouble) : at::Tensor();
    at::Tensor am = c.b.attention_mask.defined() ? c.b.attention_mask.to(at::kDouble) : at::ones({B, S + 1}, f64);
    auto mask = am.accessor<double, 2>();
    const double T = o.temperature;
    auto logit = [&](int64_t b, int64_t s, int64_t v) {
        double z = 0;
        for (int64_t j = 0; j < H; j++) z += h[b][s][j] * W[v][j];
        return z;
    };
    double kl = 0, cand = 0, full = 0, msum = 0;
    const bool use_mask = o.legacy || o.masked;
    for (int64_t b = 0; b < B; b++)
        for (int64_t s = 0; s < S; s++) {
            double m = use_mask ? (mask[b][s + 1] != 0 ? 1.0 : 0.0) : 1.0;
            msum += m;
            std::vector<int64_t> ids;
            std::vector<double> t;
            for (int64_t k = 0; k < K; k++) ids.push_back(ti[b][s][k].item<int64_t>()), t.push_back(tl[b][s][k].item<double>());
            std::vector<int64_t> cids = ids;
            std::vector<double> ct = t;
            for (int64_t r = 0; r < R; r++) cids.push_back(ri[b][s][r].item<int64_t>()), ct.push_back(R ? rl[b][s][r].item<double>() : 0);
            std::vector<double> zk, zc, zf;
            for (int64_t v : ids) zk.push_back(logit(b, s, v));
            for (int64_t v : cids) zc.push_back(logit(b, s, v));
            for (int64_t v = 0; v < V; v++) zf.push_back(logit(b, s, v));
            if (!o.legacy) {
                kl += m * kl_loop(t, zk, T);
                full += m * (lse(zf) - zf[ids[0]]);
                cand += m * (lse(zc) - zc[0]);
            } else {
                kl += m * kl_loop(ct, zc, T);
                cand += m * (lse(zc) - zc[0]);
            }
        }
    const double den = use_mask ? std::max(msum, 1.0) : (double)(B * S);
    KDResult r;
    r.kl = T * T * kl / den;
    double loss;
    if (!o.legacy) {
        r.full_ce = full / den;
        r.cand_ce = cand / den;
        double af = (o.hard_top1 > 0 ? o.hard_top1 : 0) + (o.hard_full > 0 ? o.hard_full : 0);
        loss = r.kl + af * r.full_ce + (o.sampled_ce > 0 ? o.sampled_ce * r.cand_ce : 0);
    } else {
        r.cand_ce = cand / den;
        double fsum = 0;
        int64_t nvalid = 0;
        for (int64_t b = 0; b < B; b++) {
            int64_t len = 0;
            for (int64_t l = 0; l <= S; l++) len += mask[b][l] != 0;
            if (len < 2) continue;
            int64_t s = len - 2;
            std::vector<double> zf;
            for (int64_t v = 0; v < V; v++) zf.push_back(logit(b, s, v));
            fsum += lse(zf) - zf[ti[b][s][0].item<int64_t>()];
            nvalid++;
        }
        r.full_ce = nvalid ? fsum / nvalid : 0;
        loss = r.kl * o.distill_weight + (o.hard_top1 > 0 ? o.hard_top1 * r.cand_ce : 0) +
               (o.hard_full > 0 ? o.hard_full * r.full_ce : 0);
    }
    r.loss = at::scalar_tensor(loss, f64);
    return r;
}

KDOptions opts(double top1, double fullw, double sampled = 0, bool legacy = false, int64_t chunk = 128) {
    KDOptions o;
    o.hard_top1 = top1;
    o.hard_full = fullw;
    o.sampled_ce = sampled;
    o.legacy = legacy;
    o.chunk = chunk;
    return o;
}

// Value and gradients (h, W) of f at fresh leaves copied from c.
struct Grads {
    double loss;
    at::Tensor dh, dW;
};
template <class F>
Grads grads_of(const Case & c, F f) {
    at::Tensor h = c.h.clone().requires_grad_(true), W = c.W.clone().requires_grad_(true);
    KDResult r = f(h, W);
    r.loss.backward();
    return {r.loss.item<double>(), h.grad(), W.grad()};
}

void expect_close(const at::Tensor & a, const at::Tensor & b, double tol, const std::string & what) {
    double err = (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
    EXPECT_LE(err, tol) << what;
}

} // namespace

// h = 0: the student is uniform. With teacher logits (2 ln 3, 0) and T = 2, p_t = (3/4, 1/4).
TEST(KdLoss, HandValueUniformStudent) {
    Case c;
    c.h = at::zeros({1, 2, 3}, f64);
    c.W = at::randn({5, 3}, f64);
    c.b.topk_idx = at::tensor({3, 1, 0, 4}, at::kInt).view({1, 2, 2});
    double a = 2 * std::log(3.0);
    c.b.topk_logits = at::tensor({a, 0.0, a, 0.0}, f64).view({1, 2, 2});
    const double kl = 0.75 * std::log(1.5) + 0.25 * std::log(0.5);   // Σ p_t log(p_t / (1/2))
    KDResult r = kd_loss_fused(c.h, c.W, c.b, opts(0.2, 0.00005));
    EXPECT_NEAR(r.kl, 4 * kl, 1e-12);
    EXPECT_NEAR(r.full_ce, std::log(5.0), 1e-12);   // uniform over V = 5
    EXPECT_NEAR(r.loss.item<double>(), 4 * kl + 0.20005 * std::log(5.0), 1e-12);
    EXPECT_TRUE(std::isnan(r.cand_ce));
    // Gradient: ∂(T²·KL)/∂z = (T/N)(p_s − p_t) at the candidates; the CE adds (0.20005/N)(1/V − onehot).
    at::Tensor h = c.h.clone().requires_grad_(true);
    kd_loss_fused(h, c.W, c.b, opts(0.2, 0.00005)).loss.backward();
    at::Tensor gz = at::full({5}, 0.20005 / 2 / 5, f64);
    gz[3] += (2.0 / 2) * (0.5 - 0.75) - 0.20005 / 2;
    gz[1] += (2.0 / 2) * (0.5 - 0.25);
    expect_close(h.grad()[0][0], at::matmul(gz, c.W), 1e-12, "dh row 0");
}

// Student == teacher on the candidates: KL = 0.
TEST(KdLoss, HandValueMatchingStudent) {
    Case c;
    c.h = at::tensor({1.0, 0.0, 0.0}, f64).view({1, 1, 3});
    c.W = at::tensor({0.5, 0.0, 0.0, 2.0, 0.0, 0.0, -1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0}, f64).view({6, 3});
    c.b.topk_idx = at::tensor({5, 1, 3}, at::kLong).view({1, 1, 3});
    c.b.topk_logits = at::tensor({3.0, 2.0, 1.0}, f64).view({1, 1, 3});
    KDResult r = kd_loss_fused(c.h, c.W, c.b, opts(0, 0));
    EXPECT_NEAR(r.loss.item<double>(), 0.0, 1e-14);
    EXPECT_TRUE(std::isnan(r.full_ce));
    // hard_full alone: the same CE, = logsumexp(z) − z[5] with z = (0.5, 2, −1, 1, 0, 3).
    double ce = std::log(std::exp(0.5) + std::exp(2.0) + std::exp(-1.0) + std::exp(1.0) + 1.0 + std::exp(3.0)) - 3.0;
    r = kd_loss_fused(c.h, c.W, c.b, opts(0, 0.5));
    EXPECT_NEAR(r.loss.item<double>(), 0.5 * ce, 1e-12);
    EXPECT_NEAR(r.full_ce, ce, 1e-12);
}

TEST(KdLoss, V2MatchesLoops) {
    Case c = case_make(2, 4, 3, 7, 3, 0, 1);
    for (auto o : {opts(0.2, 0.00005), opts(0, 0), opts(0.3, 0), opts(0, 0.1)}) {
        o.temperature = 1.7;
        KDResult want = loop_loss(c, o);
        for (int64_t chunk : {1, 3, 100}) {
            o.chunk = chunk;
            KDResult got = kd_loss_fused(c.h, c.W, c.b, o);
            EXPECT_NEAR(got.loss.item<double>(), want.loss.item<double>(), 1e-12) << "chunk " << chunk;
            EXPECT_NEAR(got.kl, want.kl, 1e-12);
            KDResult ref = kd_loss_reference(c.h, c.W, c.b, o);
            EXPECT_NEAR(ref.loss.item<double>(), want.loss.item<double>(), 1e-12);
        }
    }
}

TEST(KdLoss, SampledMatchesLoops) {
    Case c = case_make(2, 3, 3, 6, 2, 4, 2);   // rand_idx may repeat top-k ids
    KDOptions o = opts(0.2, 0.00005, 0.7);
    KDResult want = loop_loss(c, o), got = kd_loss_fused(c.h, c.W, c.b, o);
    EXPECT_NEAR(got.loss.item<double>(), want.loss.item<double>(), 1e-12);
    EXPECT_NEAR(got.cand_ce, want.cand_ce, 1e-12);
    o = opts(0, 0, 0.7);   // the gather path
    want = loop_loss(c, o);
    got = kd_loss_fused(c.h, c.W, c.b, o);
    EXPECT_NEAR(got.loss.item<double>(), want.loss.item<double>(), 1e-12);
}

TEST(KdLoss, LegacyMatchesLoops) {
    Case c = case_make(3, 4, 3, 7, 2, 3, 3);
    c.b.attention_mask = at::tensor({1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0}, at::kByte).view({3, 5});
    for (bool rand : {true, false}) {
        Case cc = c;
        if (!rand) cc.b.rand_idx = cc.b.rand_logits = at::Tensor();
        for (auto o : {opts(0, 0, 0, true), opts(0.3, 0.2, 0, true)}) {
            o.distill_weight = 0.8;
            KDResult want = loop_loss(cc, o);
            for (int64_t chunk : {1, 5, 128}) {
                o.chunk = chunk;
                KDResult got = kd_loss_fused(cc.h, cc.W, cc.b, o);
                EXPECT_NEAR(got.loss.item<double>(), want.loss.item<double>(), 1e-12) << rand << " chunk " << chunk;
                if (o.hard_full > 0) {
                    EXPECT_NEAR(got.full_ce, want.full_ce, 1e-12);
                }
                if (o.hard_top1 > 0) {
                    EXPECT_NEAR(got.cand_ce, want.cand_ce, 1e-12);
                }
            }
        }
    }
    // Without a mask: the plain mean, and the full CE at the last position.
    c.b.attention_mask = at::Tensor();
    KDOptions o = opts(0.3, 0.2, 0, true);
    EXPECT_NEAR(kd_loss_fused(c.h, c.W, c.b, o).loss.item<double>(), loop_loss(c, o).loss.item<double>(), 1e-12);
}

TEST(KdLoss, FusedEqualsReferenceGradients) {
    Case c = case_make(2, 5, 3, 7, 3, 4, 4);   // N = 10: chunks 3, 4, 7 do not divide it
    c.b.attention_mask = at::ones({2, 6}, at::kLong);
    c.b.attention_mask[1][4] = 0;
    c.b.attention_mask[1][5] = 0;
    std::vector<KDOptions> cases = {opts(0.2, 0.00005), opts(0, 0), opts(0.2, 0.1, 0.5), opts(0, 0, 0.5),
                                    opts(0, 0, 0, true), opts(0.3, 0.2, 0, true)};
    KDOptions masked = opts(0.2, 0.00005, 0.5);
    masked.masked = true;
    cases.push_back(masked);
    for (size_t i = 0; i < cases.size(); i++) {
        KDOptions o = cases[i];
        Grads ref = grads_of(c, [&](auto & h, auto & W) { return kd_loss_reference(h, W, c.b, o); });
        for (int64_t chunk : {1, 3, 4, 7, 10, 64}) {
            o.chunk = chunk;
            Grads got = grads_of(c, [&](auto & h, auto & W) { return kd_loss_fused(h, W, c.b, o); });
            std::string what = "case " + std::to_string(i) + " chunk " + std::to_string(chunk);
            EXPECT_NEAR(got.loss, ref.loss, 1e-12) << what;
            expect_close(got.dh, ref.dh, 1e-12, what + " dh");
            expect_close(got.dW, ref.dW, 1e-12, what + " dW");
        }
    }
}

// The fused loss takes its gradients in the forward pass: an upstream gradient other than 1 scales
// them, a frozen W gets none, and no_grad forward computes none (the loss value is unchanged).
TEST(KdLoss, FusedUpstreamGradientScales) {
    Case c = case_make(2, 5, 3, 7, 3, 4, 4);
    KDOptions o = opts(0.2, 0.00005);
    o.chunk = 3;
    Grads ref = grads_of(c, [&](auto & h, auto & W) { return kd_loss_reference(h, W, c.b, o); });
    at::Tensor h = c.h.clone().requires_grad_(true), W = c.W.clone().requires_grad_(true);
    (kd_loss_fused(h, W, c.b, o).loss * -2.5).backward();
    expect_close(h.grad(), ref.dh * -2.5, 1e-12, "dh x -2.5");
    expect_close(W.grad(), ref.dW * -2.5, 1e-12, "dW x -2.5");
    at::Tensor h2 = c.h.clone().requires_grad_(true);
    kd_loss_fused(h2, c.W, c.b, o).loss.backward();   // W frozen
    expect_close(h2.grad(), ref.dh, 1e-12, "dh, W frozen");
    at::NoGradGuard ng;
    EXPECT_NEAR(kd_loss_fused(c.h, c.W, c.b, o).loss.item<double>(), ref.loss, 1e-12);
}

TEST(KdLoss, GradientsMatchFiniteDifferences) {
    Case c = case_make(2, 3, 3, 6, 2, 3, 5);
    c.b.attention_mask = at::ones({2, 4}, at::kLong);
    c.b.attention_mask[0][3] = 0;
    for (auto o : {opts(0.2, 0.3, 0.4), opts(0.3, 0.5, 0, true)}) {
        o.temperature = 1.5;
        o.chunk = 4;
        Grads g = grads_of(c, [&](auto & h, auto & W) { return kd_loss_fused(h, W, c.b, o); });
        auto f = [&](const at::Tensor & h, const at::Tensor & W) { return kd_loss_fused(h, W, c.b, o).loss.item<double>(); };
        const double eps = 1e-6;
        for (int which = 0; which < 2; which++) {
            at::Tensor x = (which == 0 ? c.h : c.W).clone();
            at::Tensor flat = x.view({-1}), num = at::zeros({x.numel()}, f64);
            for (int64_t i = 0; i < x.numel(); i++) {
                double v = flat[i].item<double>();
                flat[i] = v + eps;
                double fp = which == 0 ? f(x, c.W) : f(c.h, x);
                flat[i] = v - eps;
                double fm = which == 0 ? f(x, c.W) : f(c.h, x);
                flat[i] = v;
                num[i] = (fp - fm) / (2 * eps);
            }
            expect_close((which == 0 ? g.dh : g.dW).reshape({-1}), num, 1e-7, which == 0 ? "dh" : "dW");
        }
    }
}

TEST(KdLoss, MaskingOfPaddedPositions) {
    Case c = case_make(2, 4, 3, 7, 3, 2, 6);
    c.b.attention_mask = at::ones({2, 5}, at::kLong);
    c.b.attention_mask[1][3] = 0;
    c.b.attention_mask[1][4] = 0;   // sequence 1 has 3 tokens: positions 2 and 3 are padding
    // Legacy and V2+masked ignore whatever sits at padded positions; V2 (the seed) does not.
    Case d = c;
    d.h = c.h.clone();
    d.h[1][2] += 5.0;
    d.h[1][3] -= 3.0;
    d.b.topk_logits = c.b.topk_logits.clone();
    d.b.topk_logits[1][3] = 7.0;
    KDOptions masked = opts(0.2, 0.00005);
    masked.masked = true;
    for (auto o : {opts(0.3, 0.2, 0, true), masked}) {
        double a = kd_loss_fused(c.h, c.W, c.b, o).loss.item<double>(), b = kd_loss_fused(d.h, d.W, d.b, o).loss.item<double>();
        EXPECT_NEAR(a, b, 1e-12);
        EXPECT_NEAR(a, loop_loss(c, o).loss.item<double>(), 1e-12);
        at::Tensor h = c.h.clone().requires_grad_(true);
        kd_loss_fused(h, c.W, c.b, o).loss.backward();
        EXPECT_EQ(h.grad()[1].narrow(0, 2, 2).abs().max().item<double>(), 0.0);
    }
    KDOptions v2 = opts(0.2, 0.00005);
    EXPECT_GT(std::abs(kd_loss_fused(c.h, c.W, c.b, v2).loss.item<double>() - kd_loss_fused(d.h, d.W, d.b, v2).loss.item<double>()), 1e-3);
    // The V2 value with a mask equals the value without one (unmasked mean over B·S).
    Case e = c;
    e.b.attention_mask = at::Tensor();
    EXPECT_NEAR(kd_loss_fused(c.h, c.W, c.b, v2).loss.item<double>(), kd_loss_fused(e.h, e.W, e.b, v2).loss.item<double>(), 1e-14);
    // Fully padded rows (length < 2) are skipped by the legacy last-position CE.
    c.b.attention_mask[1].fill_(0);
    c.b.attention_mask[1][0] = 1;
    KDOptions o = opts(0, 1.0, 0, true);
    EXPECT_NEAR(kd_loss_fused(c.h, c.W, c.b, o).loss.item<double>(), loop_loss(c, o).loss.item<double>(), 1e-12);
}

TEST(KdLoss, HardTermsOnOff) {
    Case c = case_make(1, 3, 3, 5, 2, 0, 7);
    KDResult kl = kd_loss_fused(c.h, c.W, c.b, opts(0, 0));
    KDResult both = kd_loss_fused(c.h, c.W, c.b, opts(0.2, 0.00005));
    KDResult top1 = kd_loss_fused(c.h, c.W, c.b, opts(0.2, 0));
    KDResult fullw = kd_loss_fused(c.h, c.W, c.b, opts(0, 0.00005));
    double ce = both.full_ce;
    EXPECT_NEAR(top1.full_ce, ce, 1e-14);
    EXPECT_NEAR(both.loss.item<double>(), kl.loss.item<double>() + 0.20005 * ce, 1e-12);
    EXPECT_NEAR(top1.loss.item<double>(), kl.loss.item<double>() + 0.2 * ce, 1e-12);
    EXPECT_NEAR(fullw.loss.item<double>(), kl.loss.item<double>() + 0.00005 * ce, 1e-12);
    EXPECT_NEAR(kl.loss.item<double>(), kl.kl, 1e-14);
    EXPECT_TRUE(std::isnan(kl.full_ce));
    // The temperature: T²·KL at T = 1 vs T = 4 are different numbers.
    KDOptions t1 = opts(0, 0);
    t1.temperature = 1;
    EXPECT_NEAR(kd_loss_fused(c.h, c.W, c.b, t1).loss.item<double>(), loop_loss(c, t1).loss.item<double>(), 1e-12);
}

TEST(KdLoss, OnTheFlyNegativesFollowTheGenerator) {
    Case c = case_make(2, 3, 3, 9, 2, 0, 8);
    KDOptions o = opts(0, 0, 1.0);
    o.sampled_negatives = 5;
    o.generator = at::make_generator<at::CPUGeneratorImpl>(11);
    double a = kd_loss_fused(c.h, c.W, c.b, o).loss.item<double>();
    o.generator = at::make_generator<at::CPUGeneratorImpl>(11);
    Grads f = grads_of(c, [&](auto & h, auto & W) { return kd_loss_fused(h, W, c.b, o); });
    o.generator = at::make_generator<at::CPUGeneratorImpl>(11);
    Grads r = grads_of(c, [&](auto & h, auto & W) { return kd_loss_reference(h, W, c.b, o); });
    EXPECT_NEAR(a, f.loss, 1e-14);
    EXPECT_NEAR(f.loss, r.loss, 1e-12);
    expect_close(f.dh, r.dh, 1e-12, "dh");
    o.generator = at::make_generator<at::CPUGeneratorImpl>(12);
    EXPECT_NE(kd_loss_fused(c.h, c.W, c.b, o).loss.item<double>(), a);
}

TEST(KdLoss, Bfloat16HiddenStates) {
    Case c = case_make(2, 9, 16, 50, 4, 0, 9);
    KDOptions o = opts(0.2, 0.00005);
    o.chunk = 5;
    Grads ref = grads_of(c, [&](auto & h, auto & W) { return kd_loss_reference(h, W, c.b, o); });
    for (bool w_bf16 : {false, true}) {
        at::Tensor h = c.h.to(at::kBFloat16).requires_grad_(true);
        at::Tensor W = w_bf16 ? c.W.to(at::kBFloat16) : c.W.to(at::kFloat);
        KDResult r = kd_loss_fused(h, W, c.b, o);
        EXPECT_EQ(r.loss.scalar_type(), at::kFloat);
        EXPECT_NEAR(r.loss.item<double>(), ref.loss, 0.05 * std::abs(ref.loss) + 0.02) << w_bf16;
        r.loss.backward();
        EXPECT_EQ(h.grad().scalar_type(), at::kBFloat16);
        double scale = ref.dh.abs().max().item<double>();
        expect_close(h.grad(), ref.dh, 0.1 * scale, std::string("bf16 dh, W bf16 ") + (w_bf16 ? "yes" : "no"));
    }
}

TEST(KdLoss, ErrorsNameTheTensor) {
    Case c = case_make(2, 3, 3, 6, 2, 2, 10);
    auto msg = [&](KDBatch b, at::Tensor h, at::Tensor W, KDOptions o = opts(0.2, 0.00005)) -> std::string {
        try {
            kd_loss_fused(h, W, b, o);
        } catch (const std::invalid_argument & e) {
            return e.what();
        }
        return "(no error)";
    };
    auto has = [](const std::string & m, const char * s) { return m.find(s) != std::string::npos; };
    KDBatch b = c.b;
    b.topk_idx = b.topk_idx.narrow(1, 0, 2);
    EXPECT_TRUE(has(msg(b, c.h, c.W), "topk_logits") || has(msg(b, c.h, c.W), "h")) << msg(b, c.h, c.W);
    b = c.b;
    b.topk_logits = b.topk_logits.narrow(2, 0, 1);
    EXPECT_TRUE(has(msg(b, c.h, c.W), "topk_logits")) << msg(b, c.h, c.W);
    b = c.b;
    b.topk_idx = b.topk_idx.to(at::kFloat);
    EXPECT_TRUE(has(msg(b, c.h, c.W), "topk_idx: expected int32 or int64")) << msg(b, c.h, c.W);
    b = c.b;
    b.topk_idx = b.topk_idx.clone();
    b.topk_idx[0][0][0] = 6;
    EXPECT_TRUE(has(msg(b, c.h, c.W), "topk_idx: ids must lie in [0, 6)")) << msg(b, c.h, c.W);
    b = c.b;
    b.topk_logits = b.topk_logits.to(at::kInt);
    EXPECT_TRUE(has(msg(b, c.h, c.W), "topk_logits: expected floating")) << msg(b, c.h, c.W);
    EXPECT_TRUE(has(msg(c.b, c.h, c.W.narrow(1, 0, 2)), "lm_head_weight")) << msg(c.b, c.h, c.W.narrow(1, 0, 2));
    EXPECT_TRUE(has(msg(c.b, c.h.narrow(1, 0, 2), c.W), "h: ")) << msg(c.b, c.h.narrow(1, 0, 2), c.W);
    b = c.b;
    b.attention_mask = at::ones({2, 3}, at::kLong);
    EXPECT_TRUE(has(msg(b, c.h, c.W), "attention_mask")) << msg(b, c.h, c.W);
    b = c.b;
    b.rand_logits = at::Tensor();
    EXPECT_TRUE(has(msg(b, c.h, c.W, opts(0, 0, 0, true)), "rand_logits: missing")) << msg(b, c.h, c.W, opts(0, 0, 0, true));
    b = c.b;
    b.rand_idx = b.rand_idx.narrow(0, 0, 1);
    EXPECT_TRUE(has(msg(b, c.h, c.W, opts(0, 0, 0.1)), "rand_idx")) << msg(b, c.h, c.W, opts(0, 0, 0.1));
    // h may also carry all L positions: the last one is dropped.
    at::Tensor hl = at::cat({c.h, at::randn({2, 1, 3}, f64)}, 1);
    EXPECT_NEAR(kd_loss_fused(hl, c.W, c.b, opts(0.2, 0.1)).loss.item<double>(),
                kd_loss_fused(c.h, c.W, c.b, opts(0.2, 0.1)).loss.item<double>(), 1e-14);
}

TEST(KdLoss, EvaluateAveragesFirstExamples) {
    Case c = case_make(3, 4, 3, 7, 3, 0, 12);
    std::vector<KDBatch> batches;
    for (int64_t i = 0; i < 3; i += 2) {   // batches of 2 and 1 examples
        KDBatch b;
        int64_t n = std::min<int64_t>(2, 3 - i);
        b.input_ids = c.b.input_ids.narrow(0, i, n);
        b.attention_mask = at::ones({n, 5}, at::kByte);
        b.topk_idx = c.b.topk_idx.narrow(0, i, n);
        b.topk_logits = c.b.topk_logits.narrow(0, i, n);
        batches.push_back(b);
    }
    // The "model": hidden states looked up by the example's first token (ids are distinct enough).
    auto hidden = [&](const at::Tensor & ids, const at::Tensor & mask) {
        EXPECT_FALSE(mask.defined());   // all-ones masks become "no mask"
        EXPECT_FALSE(at::GradMode::is_enabled());
        for (int64_t e = 0; e < 3; e++)
            if (at::equal(ids, c.b.input_ids.narrow(0, e, 1).to(at::kLong)))
                return at::cat({c.h.narrow(0, e, 1), at::zeros({1, 1, 3}, f64)}, 1);
        ADD_FAILURE() << "unknown ids";
        return at::Tensor();
    };
    std::vector<double> per;
    for (int64_t e = 0; e < 3; e++) {
        Case one = c;
        one.h = c.h.narrow(0, e, 1);
        one.b.topk_idx = c.b.topk_idx.narrow(0, e, 1);
        one.b.topk_logits = c.b.topk_logits.narrow(0, e, 1);
        per.push_back(loop_loss(one, opts(0, 0)).kl);
    }
    for (int64_t n : {1, 2, 3, 40}) {
        size_t next = 0;
        KDEvalResult r = kd_evaluate(hidden, c.W, [&](KDBatch & b) {
            if (next >= batches.size()) return false;
            b = batches[next++];
            return true;
        }, n, 2.0);
        int64_t m = std::min<int64_t>(n, 3);
        double want = 0;
        for (int64_t e = 0; e < m; e++) want += per[e] / m;
        EXPECT_EQ(r.examples, m);
        EXPECT_NEAR(r.kd_loss, want, 1e-12) << n;
    }
}
