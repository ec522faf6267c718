// quant_init: recipes with any LUT size and rank per layer, the activation-weighted
// initialisation of V2 layers (docs: weighted scale fit, alternating refinement), tighten_q,
// calibration through module pre-hooks, a randomized low-rank SVD, and bits-per-weight.
#include "lib/quant_init.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include "lib/logging.h"

#include <chrono>
#include <cmath>
#include <algorithm>
#include <atomic>
#include <limits>
#include <mutex>
#include <vector>
#include <set>
#include <stdexcept>

namespace qatlab {

// -- low-rank SVD ----------------------------------------------------------------------------

LowRankSvd svd_lowrank(const at::Tensor & M_, int64_t r, int64_t p, int64_t q, uint64_t seed, int64_t exact_below) {
    at::NoGradGuard ng;
    if (M_.dim() != 2) throw std::runtime_error("svd_lowrank: expected a matrix");
    at::Tensor M = M_.detach();
    const int64_t m = M.size(0), n = M.size(1), mn = std::min(m, n), k = std::min(r, mn);
    if (r < 1) throw std::runtime_error("svd_lowrank: rank must be >= 1");
    if (mn <= exact_below || r + p >= mn) {
        auto [U, S, Vh] = at::linalg_svd(M, false);
        return {U.narrow(1, 0, k), S.narrow(0, 0, k), Vh.narrow(0, 0, k)};
    }
    // Range finder on the tall orientation A (big, small): Y = A Ω, power iterations
    // re-orthonormalised each half-step so small singular values are not lost to rounding.
    const bool tr = m < n;
    at::Tensor A = tr ? M.t() : M;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    at::Tensor omega = at::randn({A.size(1), r + p}, gen, at::TensorOptions().dtype(A.scalar_type())).to(A.device());
    at::Tensor Qm = std::get<0>(at::linalg_qr(at::matmul(A, omega)));   // (big, l)
    for (int64_t i = 0; i < q; i++) {
        at::Tensor Z = std::get<0>(at::linalg_qr(at::matmul(A.t(), Qm)));  // (small, l)
        Qm = std::get<0>(at::linalg_qr(at::matmul(A, Z)));
    }
    auto [Ub, S, Vh] = at::linalg_svd(at::matmul(Qm.t(), A), false);   // (l, l), (l), (l, small)
    at::Tensor U = at::matmul(Qm, Ub.narrow(1, 0, k));                  // (big, k)
    S = S.narrow(0, 0, k);
    Vh = Vh.narrow(0, 0, k);
    if (tr) return {Vh.t().contiguous(), S, U.t().contiguous()};       // M = A^T = Vh^T S U^T
    return {U, S, Vh.contiguous()};
}

// -- recipes ---------------------------------------------------------------------------------

void layer_recipe_check(const LayerRecipe & r, int64_t out, int64_t in) {
    auto bad = [&](const char * opt, int64_t v, const std::string & what) {
        throw std::runtime_error("layer '" + r.name + "': " + opt + " = " + std::to_string(v) + ": expected " + what);
    };
    if (r.lut_size < 2 || r.lut_size > 256) bad("lut", r.lut_size, "an integer in 2..256");
    const int64_t mx = std::min(out, in);
    if (r.rank < 1 || (r.rank > mx && !r.preset)) bad("rank", r.rank, "an integer in 1.." + std::to_string(mx) + " (min(out, in))");
    if (r.group_size < 1) bad("group_size", r.group_size, "an integer >= 1");
}

// -- helpers ---------------------------------------------------------------------------------

namespace {
// Nearest entry of a sorted LUT (ascending): ties go to the lower entry. x any shape → int64.
at::Tensor nearest_sorted(const at::Tensor & x, const at::Tensor & lut) { return lut_nearest_long(x, lut); }

// S with |S| floored at f, sign kept (0 counts as positive).
at::Tensor floor_abs(const at::Tensor & S, double f) {
    at::Tensor sgn = at::where(S < 0, at::full({}, -1.0, S.options()), at::full({}, 1.0, S.options()));
    return sgn * S.abs().clamp_min(f);
}

// Group max-abs per G input columns, expanded per weight and trimmed: (out, in).
at::Tensor group_maxabs(const at::Tensor & W, int64_t G) {
    const int64_t out = W.size(0), in = W.size(1), pad = (G - in % G) % G;
    at::Tensor Wp = pad ? at::constant_pad_nd(W, {0, pad}) : W;
    at::Tensor s = Wp.abs().view({out, (in + pad) / G, G}).amax(2).clamp_min(1e-8);
    return s.repeat_interleave(G, 1).narrow(1, 0, in).contiguous();
}

// Σ d_i (lut[idx] S - W)² in float64: d (in), S, W (out, in).
double werr(const at::Tensor & W, const at::Tensor & S, const at::Tensor & lut, const at::Tensor & idx,
            const at::Tensor & d) {
    at::Tensor e = lut.index_select(0, idx.reshape({-1})).view(W.sizes()) * S - W;
    return (e.pow(2) * d).sum().to(at::kDouble).item<double>();
}

// The weighted init's inner step in one read of W and S (CPU, float32): S floored at `floor` with
// its sign kept (floor_abs), idx = the nearest entry of the sorted LUT to W / S by
// lut_nearest_long's rule (least float distance, ties and equal entries to the lowest index, NaN
// to entry 0), and err = Σ d_i (lut[idx] S - W)² in float64. Elsewhere (CUDA, other dtypes) the
// same from tensor operations. Some thirty full-size tensor passes become one.
struct QuantPass {
    at::Tensor idx;    // (out, in) int64
    double err = 0;
};

// One row of quant_pass (see there), written for the compiler to vectorize: an AVX2 clone is
// chosen at run time where the CPU has it (the build targets plain x86-64).
__attribute__((target_clones("arch=x86-64-v3", "default")))
double quant_row(const float * wr, const float * sr, const float * d, int64_t in, const float * lv, int64_t L,
                 const float * mid, const int32_t * first, float f, float * xs, float * svs, int32_t * ks, int64_t * qr) {
    const float lo = lv[0], hi = lv[L - 1];
    for (int64_t i = 0; i < in; i++) {   // scale floored, ratio clamped into the LUT's range
        const float a = std::fabs(sr[i]);
        const float sv = (sr[i] < 0 ? -1.0f : 1.0f) * (a < f ? f : a);
        const float x = wr[i] / sv;
        svs[i] = sv;
        xs[i] = x < lo ? lo : (x > hi ? hi : x);   // NaN stays NaN
        ks[i] = 0;
    }
    if (L <= 32) {   // candidate = how many midpoints lie below x
        for (int64_t j = 0; j + 1 < L; j++) {
            const float m = mid[j];
            for (int64_t i = 0; i < in; i++) ks[i] += xs[i] > m ? 1 : 0;
        }
    } else {
        for (int64_t i = 0; i < in; i++) ks[i] = (int32_t)(std::lower_bound(mid, mid + L - 1, xs[i]) - mid);
    }
    double rowe = 0;
    const int32_t Lm1 = (int32_t)L - 1;
    for (int64_t i = 0; i < in; i++) {   // the exact rule among the neighbours: least float distance, ties down
        const float x = xs[i];
        const int32_t k = ks[i], km = k > 0 ? k - 1 : 0, kp = k < Lm1 ? k + 1 : k;
        const float dk = std::fabs(x - lv[k]), dm = std::fabs(x - lv[km]), dp = std::fabs(x - lv[kp]);
        int32_t c = dm <= dk ? km : (dp < dk ? kp : k);
        c = x != x ? 0 : first[c];   // NaN: entry 0
        qr[i] = c;
        const float e = lv[c] * svs[i] - wr[i];
        rowe += (double)(e * e) * d[i];
    }
    return rowe;
}

QuantPass quant_pass(const at::Tensor & W, const at::Tensor & S, const at::Tensor & lut, const at::Tensor & dd, double floor) {
    if (!W.is_cpu() || W.scalar_type() != at::kFloat || S.scalar_type() != at::kFloat || lut.scalar_type() != at::kFloat) {
        at::Tensor Sf = floor_abs(S, floor);
        at::Tensor idx = nearest_sorted(W / Sf, lut);
        return {idx, werr(W, Sf, lut, idx, dd)};
    }
    const int64_t out = W.size(0), in = W.size(1);
    at::Tensor Wc = W.contiguous(), Sc = S.contiguous(), dc = dd.reshape({-1}).to(at::kFloat).contiguous();
    at::Tensor lc = lut.contiguous();
    const float * w = Wc.data_ptr<float>(), * sp = Sc.data_ptr<float>(), * d = dc.data_ptr<float>(), * lv = lc.data_ptr<float>();
    const int64_t L = lc.numel();
    const float f = (float)floor;
    // midpoints, and for each entry the first index holding the same value (equal entries: lowest)
    std::vector<float> mid(std::max<int64_t>(0, L - 1));
    std::vector<int32_t> first(L);
    for (int64_t j = 0; j + 1 < L; j++) mid[j] = (lv[j] + lv[j + 1]) * 0.5f;
    for (int64_t j = 0; j < L; j++) first[j] = (j > 0 && lv[j] == lv[j - 1]) ? first[j - 1] : (int32_t)j;
    at::Tensor idx = at::empty({out, in}, W.options().dtype(at::kLong));
    int64_t * q = idx.data_ptr<int64_t>();
    double total = 0;
    std::mutex mu;
    at::parallel_for(0, out, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, in)), [&](int64_t r0, int64_t r1) {
        std::vector<float> xs(in), svs(in);
        std::vector<int32_t> ks(in);
        double part = 0;
        for (int64_t r = r0; r < r1; r++) {
            const float * wr = w + r * in, * sr = sp + r * in;
            int64_t * qr = q + r * in;
            double rowe = quant_row(wr, sr, d, in, lv, L, mid.data(), first.data(), f, xs.data(), svs.data(), ks.data(), qr);
            part += rowe;
        }
        std::lock_guard<std::mutex> g(mu);
        total += part;
    });
    return {idx, total};
}

// G x = b for a batch of small symmetric positive definite systems, G (n, r, r), b (n, r), float64
// (the normal equations above, ridge included). On the CPU a Cholesky factorisation per system in
// one loop: LAPACK through linalg_solve pays a call and checks per 4x4..64x64 system, which
// dominated the refinement. A system that is not positive definite numerically, and other devices,
// go to linalg_solve.
at::Tensor spd_solve(const at::Tensor & G_, const at::Tensor & b_) {
    if (!G_.is_cpu()) return at::linalg_solve(G_, b_.unsqueeze(2)).squeeze(2);
    at::Tensor G = G_.contiguous(), x = b_.contiguous().clone();
    const int64_t n = G.size(0), r = G.size(1);
    const double * g = G.data_ptr<double>();
    double * xp = x.data_ptr<double>();
    std::atomic<bool> failed{false};
    at::parallel_for(0, n, 64, [&](int64_t s0, int64_t s1) {
        std::vector<double> Lm(r * r);
        for (int64_t s = s0; s < s1; s++) {
            const double * A = g + s * r * r;
            double * y = xp + s * r;
            for (int64_t i = 0; i < r; i++) {   // A = L L^T, row by row
                for (int64_t j = 0; j <= i; j++) {
                    double v = A[i * r + j];
                    for (int64_t k = 0; k < j; k++) v -= Lm[i * r + k] * Lm[j * r + k];
                    if (i == j) {
                        if (!(v > 0)) {
                            failed = true;
                            return;
                        }
                        Lm[i * r + i] = std::sqrt(v);
                    } else {
                        Lm[i * r + j] = v / Lm[j * r + j];
                    }
                }
            }
            for (int64_t i = 0; i < r; i++) {   // L z = b
                double v = y[i];
                for (int64_t k = 0; k < i; k++) v -= Lm[i * r + k] * y[k];
                y[i] = v / Lm[i * r + i];
            }
            for (int64_t i = r - 1; i >= 0; i--) {   // L^T x = z
                double v = y[i];
                for (int64_t k = i + 1; k < r; k++) v -= Lm[k * r + i] * y[k];
                y[i] = v / Lm[i * r + i];
            }
        }
    });
    if (failed) return at::linalg_solve(G_, b_.unsqueeze(2)).squeeze(2);
    return x;
}

// Least squares per row: a_o = argmin Σ_i w_oi (a·b_i - t_oi)², given wt = w ⊙ t; w, wt (n, in),
// B (r, in) → (n, r). Normal equations per row, a tiny ridge keeps empty rows solvable; the
// Gram matrices come from one GEMM, or row chunks when r² · in is large (memory near 64 MB).
at::Tensor ls_rows(const at::Tensor & w, const at::Tensor & wt, const at::Tensor & B) {
    const int64_t n = w.size(0), r = B.size(0), in = B.size(1);
    at::Tensor G;
    at::Tensor Bt = B.t().contiguous();   // (in, r)
    if (r * r * in <= (int64_t(1) << 24)) {
        // One GEMM over the r(r+1)/2 distinct products: G[:, a, b] = w (b_ia b_ib)_i for a <= b,
        // (n, in) @ (in, P), then mirrored: half the work of the full (in, r²).
        auto lopt = at::TensorOptions().dtype(at::kLong).device(w.device());
        at::Tensor iu = at::triu_indices(r, r, 0, lopt);               // (2, P)
        at::Tensor ia = iu[0], ib = iu[1];
        at::Tensor BB = Bt.index_select(1, ia) * Bt.index_select(1, ib);   // (in, P)
        at::Tensor Gu = at::matmul(w, BB);                                  // (n, P)
        G = at::empty({n, r * r}, w.options());
        G.index_copy_(1, ia * r + ib, Gu);
        G.index_copy_(1, ib * r + ia, Gu);
        G = G.view({n, r, r});
    } else {
        G = at::empty({n, r, r}, w.options());
        const int64_t c = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(1, r * in));
        for (int64_t s = 0; s < n; s += c) {
            int64_t k = std::min(c, n - s);
            at::Tensor wb = (B.unsqueeze(0) * w.narrow(0, s, k).unsqueeze(1)).reshape({k * r, in});   // (k·r, in)
            G.narrow(0, s, k).copy_(at::matmul(wb, Bt).view({k, r, r}));
        }
    }
    at::Tensor rhs = at::matmul(wt, Bt);                                   // (n, r)
    at::Tensor lam = G.diagonal(0, 1, 2).mean(1, true).clamp_min(1e-20) * 1e-6;   // (n, 1)
    G = G + at::diag_embed(lam.expand({n, r}));
    at::Tensor x = spd_solve(G.to(at::kDouble), rhs.to(at::kDouble));
    return x.to(w.scalar_type());
}

at::Tensor fp16_round(const at::Tensor & t) { return t.to(at::kHalf).to(t.scalar_type()); }
} // namespace

at::Tensor lut_weighted_kmeans(const at::Tensor & v_, const at::Tensor & w_, const at::Tensor & init, int64_t iters) {
    at::NoGradGuard ng;
    at::Tensor v = v_.detach().reshape({-1}).to(at::kFloat), w = w_.detach().reshape({-1}).to(at::kFloat);
    at::Tensor c = std::get<0>(init.detach().reshape({-1}).to(v.device(), at::kFloat).sort());
    const int64_t k = c.numel();
    if (k < 1) throw std::runtime_error("lut_weighted_kmeans: k must be >= 1");
    if (v.numel() != w.numel()) throw std::runtime_error("lut_weighted_kmeans: values and weights differ in size");
    at::Tensor vd = v.to(at::kDouble), wd = w.to(at::kDouble);
    for (int64_t it = 0; it < iters && k > 1; it++) {
        at::Tensor a = nearest_sorted(v, c);
        at::Tensor sw = at::zeros({k}, vd.options()).index_add_(0, a, wd);
        at::Tensor swv = at::zeros({k}, vd.options()).index_add_(0, a, wd * vd);
        at::Tensor nc = at::where(sw > 0, swv / sw.clamp_min(1e-300), c.to(at::kDouble)).to(at::kFloat);
        nc = std::get<0>(nc.sort());
        bool same = at::equal(nc, c);
        c = nc;
        if (same) break;
    }
    return c;
}

// -- initialisation --------------------------------------------------------------------------

void v2_tighten_q(LutLinearV2 & l, double floor) {
    at::NoGradGuard ng;
    at::Tensor S = v2_full_scales(l);
    l.indices = lut_nearest_indices(l.w.to(S.scalar_type()) / floor_abs(S, floor), l.lut);
    l.w.requires_grad_(false);
}

double v2_weighted_error(LutLinearV2 & l, const at::Tensor & d) {
    at::NoGradGuard ng;
    at::Tensor e = (l.weight().to(at::kDouble) - l.w.to(at::kDouble)).pow(2);   // (out, in)
    if (d.defined()) e = e * d.to(e.device(), at::kDouble).reshape({1, -1});
    return e.sum().item<double>();
}

void v2_init(LutLinearV2 & l, const at::Tensor & d_, const LayerRecipe & rc, const V2InitOptions & o) {
    at::NoGradGuard ng;
    const int64_t out = l.out_features(), in = l.in_features(), r = l.rank();
    const bool weighted = o.init == "weighted";
    if (!weighted && o.init != "svd")
        throw std::runtime_error("layer '" + rc.name + "': init = '" + o.init + "': expected 'svd' or 'weighted'");
    if (!weighted && o.refine == 0 && !rc.kmeans) {   // the seed's init, unchanged
        v2_init_from_weight(l, l.w, true, o.svd, o.seed);
        if (o.tighten) v2_tighten_q(l);
        else if (o.freeze) v2_freeze_q(l);
        return;
    }
    at::Tensor W = l.w.detach().to(at::kFloat);                        // (out, in)
    // Channel weights normalised to mean 1 and floored, so a dead channel still has a finite S.
    at::Tensor d = d_.defined() ? d_.detach().to(W.device(), at::kFloat).reshape({-1}) : at::ones({in}, W.options());
    if (d.numel() != in)
        throw std::runtime_error("layer '" + rc.name + "': imatrix has " + std::to_string(d.numel()) +
                                 " channels, the layer has " + std::to_string(in) + " inputs");
    d = d.clamp_min(0);
    d = (d / d.mean().clamp_min(1e-30)).clamp_min(1e-6);
    at::Tensor dd = d.unsqueeze(0);                                    // (1, in)
    at::Tensor lut = std::get<0>(l.lut.detach().to(W.device(), at::kFloat).sort());
    at::Tensor A, B;                                                   // (out, r), (r, in): S = A B
    if (weighted) {
        // Rank-r fit of the group max-abs in the column-weighted norm ||(S - X) diag(sqrt d)||:
        // exact by the SVD of S diag(sqrt d), mapped back by diag(1/sqrt d).
        // d floored higher here: 1/sqrt(d) maps the fit back and must not blow up a quiet channel.
        at::Tensor sq = d.clamp_min(1e-2).sqrt();
        LowRankSvd s = svd_lowrank(group_maxabs(W, rc.group_size) * sq.unsqueeze(0), r, 10, 2, o.seed,
                                   o.svd == "exact" ? std::numeric_limits<int64_t>::max() : o.svd == "randomized" ? 0 : 64);
        const int64_t k = s.S.numel();
        A = at::zeros({out, r}, W.options());
        B = at::zeros({r, in}, W.options());
        A.narrow(1, 0, k).copy_(s.U * s.S.unsqueeze(0));
        B.narrow(0, 0, k).copy_(s.Vh / sq.unsqueeze(0));
        if (k < r) {   // rank above the matrix's: small independent directions fill in
            A.narrow(1, k, r - k).fill_(1e-3);
            B.narrow(0, k, r - k).fill_(1e-3);
        }
        // One global factor: max-abs scales clip nothing, the error-optimal ones clip a little.
        // Chosen on a sample of rows (about 16k weights): one scalar per layer needs no more,
        // and the 21-point grid on 64k cost as much as the rest of the fit.
        const int64_t stride = std::max<int64_t>(1, out * in / 16384);
        at::Tensor rows = at::arange(0, out, stride, at::TensorOptions().dtype(at::kLong).device(W.device()));
        at::Tensor S = at::matmul(A.index_select(0, rows), B), Ws = W.index_select(0, rows);
        double best = std::numeric_limits<double>::infinity(), ba = 1.0;
        for (int a = 0; a <= 20; a++) {
            double alpha = 0.3 + 0.05 * a;
            double e = quant_pass(Ws, S * alpha, lut, dd, 1e-4).err;
            if (e < best) best = e, ba = alpha;
        }
        A = A * ba;
    } else {   // start from the seed's init
        v2_init_from_weight(l, l.w, true, o.svd, o.seed);
        V2Scales s = v2_scales(l);
        A = (s.A_dir * s.g).to(at::kFloat);
        B = s.B_dir.to(at::kFloat).contiguous();
    }
    at::Tensor S = at::matmul(A, B);                                   // floored inside quant_pass
    QuantPass qp = quant_pass(W, S, lut, dd, 1e-4);
    at::Tensor idx = qp.idx;
    // Weighted 1-D k-means of W / S (weights d S²) on sampled rows (about 128k weights: the
    // centres are means, a sample pins them), then Q again for every weight.
    const int64_t kstride = std::max<int64_t>(1, out * in / 131072);
    at::Tensor krows = at::arange(0, out, kstride, at::TensorOptions().dtype(at::kLong).device(W.device()));
    at::Tensor Wk = W.index_select(0, krows);
    auto lut_step = [&]() {
        at::Tensor Sk = floor_abs(S.index_select(0, krows), 1e-4);
        lut = lut_weighted_kmeans(Wk / Sk, dd * Sk.pow(2), lut, 5);
        qp = quant_pass(W, S, lut, dd, 1e-4);
        idx = qp.idx;
    };
    if (rc.kmeans) lut_step();
    double best = qp.err;
    at::Tensor bA = A, bB = B, bl = lut;
    for (int64_t it = 0; it < o.refine; it++) {
        // Scales given Q: a weighted least squares in S with weights d Q² and target W / Q
        // (w ⊙ t = d Q W), alternating the A rows and the B columns.
        at::Tensor Q = lut.index_select(0, idx.reshape({-1})).view({out, in});
        at::Tensor w = dd * Q.pow(2), wt = dd * Q * W;
        A = ls_rows(w, wt, B);
        B = ls_rows(w.t().contiguous(), wt.t().contiguous(), A.t().contiguous()).t().contiguous();
        S = at::matmul(A, B);
        if (rc.kmeans) {
            lut_step();                                                // LUT, then Q given both
        } else {
            qp = quant_pass(W, S, lut, dd, 1e-4);                      // Q given the scales
            idx = qp.idx;
        }
        double e = qp.err;
        if (!(e < best)) break;                                        // no progress (or NaN): keep the best
        best = e, bA = A, bB = B, bl = lut;
    }
    // Into the layer's form: unit columns of A, unit rows of B, g their norms' product (the
    // forward adds magnitude_eps back), g rounded to fp16 as the seed's replace does.
    at::Tensor na = at::linalg_vector_norm(bA, 2, {0}), nb = at::linalg_vector_norm(bB, 2, {1});   // (r)
    at::Tensor g = fp16_round(na * nb - l.cfg.magnitude_eps);
    auto so = l.scale_A.options();
    bool rgA = l.scale_A.requires_grad(), rgB = l.scale_B.requires_grad(), rgg = l.rank_magnitude.requires_grad();
    l.scale_A = (bA / na.clamp_min(1e-30).unsqueeze(0)).to(so).requires_grad_(rgA);
    l.scale_B = (bB / nb.clamp_min(1e-30).unsqueeze(1)).to(so).requires_grad_(rgB);
    l.rank_magnitude = g.to(so).requires_grad_(rgg);
    l.lut = (rc.kmeans ? fp16_round(bl) : bl).to(so);
    l.set_baked(false);
    // Q from the scales exactly as the forward forms them (tighten_q).
    at::Tensor Sf = v2_full_scales(l);
    l.indices = quant_pass(l.w.to(Sf.scalar_type()), Sf, l.lut.to(Sf.scalar_type()), dd, 1e-4).idx.to(at::kByte);
    l.w.requires_grad_(false);
}

std::vector<std::string> quant_replace_recipe(DecoderModel & m, const std::vector<LayerRecipe> & recipe,
                                              const V2InitOptions & o, double * seconds) {
    if (o.init != "svd" && o.init != "weighted")
        throw std::runtime_error("init = '" + o.init + "': expected 'svd' or 'weighted'");
    if (o.svd != "auto" && o.svd != "exact" && o.svd != "randomized")
        throw std::runtime_error("svd = '" + o.svd + "': expected 'auto', 'exact' or 'randomized'");
    if (o.refine < 0) throw std::runtime_error("refine = " + std::to_string(o.refine) + ": expected >= 0");
    // Everything is checked before the first layer changes.
    for (auto & r : recipe) {
        auto old = m.get_linear(r.name);
        layer_recipe_check(r, old->out_features(), old->in_features());
        if (!o.imatrix.empty()) {
            auto it = o.imatrix.find(r.name);
            if (it == o.imatrix.end())
                throw std::runtime_error("layer '" + r.name + "': imatrix: no statistics for this layer (calibrate it)");
            if (it->second.numel() != old->in_features())
                throw std::runtime_error("layer '" + r.name + "': imatrix: " + std::to_string(it->second.numel()) +
                                         " channels, expected " + std::to_string(old->in_features()));
        }
    }
    auto t0 = std::chrono::steady_clock::now(), last = t0;
    std::vector<std::string> done;
    for (size_t i = 0; i < recipe.size(); i++) {
        const LayerRecipe & r = recipe[i];
        auto old = m.get_linear(r.name);
        if (std::dynamic_pointer_cast<LutLinearV2>(old)) continue;   // already quantized
        at::Tensor W, bias;
        linear_dense_weight(old, W, bias);
        LutConfig c;
        c.lut_size = r.lut_size;
        c.scale_rank = r.rank;
        c.group_size = r.group_size;
        c.lut_include_zero = r.include_zero;
        c.use_ste_fp16 = o.ste_fp16;
        auto l = std::make_shared<LutLinearV2>(W.size(0), W.size(1), c, W.options(), bias.defined());
        l->w = W.detach();
        if (bias.defined()) l->b = bias.detach();
        auto it = o.imatrix.find(r.name);
        v2_init(*l, it == o.imatrix.end() ? at::Tensor() : it->second, r, o);
        l->scale_A.requires_grad_(true);
        l->scale_B.requires_grad_(true);
        l->rank_magnitude.requires_grad_(true);
        l->form = o.form;
        m.set_linear(r.name, l);
        done.push_back(r.name);
        auto now = std::chrono::steady_clock::now();
        if (std::chrono::duration<double>(now - last).count() > 5.0) {   // long inits show progress
            last = now;
            log_write(LOG_INFO, "quant.replace: " + std::to_string(i + 1) + "/" + std::to_string(recipe.size()) +
                                    " layers initialised (" + o.init + ")");
        }
    }
    if (seconds) *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return done;
}

int64_t quant_tighten_q(DecoderModel & m, double floor) {
    int64_t n = 0;
    for (auto & [name, l] : quant_v2_layers(m)) {
        v2_tighten_q(*l, floor);
        n++;
    }
    return n;
}

// -- calibration -----------------------------------------------------------------------------

Calibration quant_calibrate(DecoderModel & m, const std::vector<at::Tensor> & batches,
                            const std::vector<std::string> & modules) {
    if (modules.empty()) throw std::runtime_error("calibrate: no module to calibrate");
    if (batches.empty()) throw std::runtime_error("calibrate: no calibration batch");
    for (size_t i = 0; i < batches.size(); i++)
        if (batches[i].scalar_type() != at::kLong || batches[i].dim() != 2)
            throw std::runtime_error("calibrate: batch " + std::to_string(i + 1) + ": expected int64 (B, T) token ids");
    std::map<std::string, at::Tensor> acc;   // name -> (in) Σ x², float64
    std::map<std::string, int64_t> count;
    // Hooks off and the training mode back whatever happens.
    struct Restore {
        DecoderModel & m;
        bool training;
        int64_t handle = -1;
        ~Restore() {
            if (handle >= 0) m.remove_hook(handle);
            m.train(training);
        }
    } restore{m, m.is_training()};
    m.train(false);
    at::NoGradGuard ng;
    restore.handle = m.register_forward_pre_hook(modules, [&](const std::string & name, const at::Tensor & x) {
        at::Tensor x2 = x.detach().reshape({-1, x.size(-1)}).to(at::kFloat);   // (tokens, in)
        at::Tensor s = x2.pow(2).sum(0).to(at::kDouble);
        auto it = acc.find(name);
        if (it == acc.end()) acc.emplace(name, s);
        else it->second.add_(s);
        count[name] += x2.size(0);
        return at::Tensor();
    });
    bool head = false;
    for (auto & n : modules) head = head || n == "lm_head";
    Calibration c;
    for (auto & b : batches) {
        c.tokens += b.numel();
        m.forward(b.to(m.device()), {}, {}, head ? ForwardOutput::logits : ForwardOutput::hidden);
    }
    for (auto & [name, s] : acc) c.stats[name] = (s / (double)count[name]).to(at::kFloat).cpu();
    return c;
}

// -- size ------------------------------------------------------------------------------------

double v2_bits_per_weight(int64_t out, int64_t in, int64_t rank, int64_t L) {
    int64_t b = 0;
    while ((int64_t(1) << b) < L) b++;
    return (double)b + 16.0 * (double)(rank * (out + in) + rank + L) / (double)(out * in);
}

BitsReport quant_bits_per_weight(DecoderModel & m) {
    BitsReport r;
    std::set<std::string> v2;
    double qbits = 0, other_bits = 0;
    int64_t qn = 0, other = 0;
    for (auto & [n, l] : quant_v2_layers(m)) {
        v2.insert(n);
        const int64_t w = l->out_features() * l->in_features();
        qbits += (double)w * v2_bits_per_weight(l->out_features(), l->in_features(), l->rank(), l->lut.numel());
        qn += w;
        if (l->b.defined()) {
            other_bits += 16.0 * (double)l->b.numel();
            other += l->b.numel();
        }
    }
    for (auto & [n, t] : m.named_parameters()) {
        auto dot = n.rfind('.');
        if (dot != std::string::npos && v2.count(n.substr(0, dot))) continue;   // a V2 layer's slot
        other_bits += 16.0 * (double)t.numel();
        other += t.numel();
    }
    r.quantized_weights = qn;
    r.model_weights = qn + other;
    r.quantized = qn ? qbits / (double)qn : 0.0;
    r.bits = qbits + other_bits;
    r.model = r.model_weights ? r.bits / (double)r.model_weights : 0.0;
    return r;
}

} // namespace qatlab
