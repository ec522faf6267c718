// quant_lut: LUTs, STE-FP16, the V2 layer (scales, Q, the three forward forms), init,
// freeze_Q, trainable LUT16, snapping and the Q4→Q2 layer conversion; the V1 layer and V1→V2.
// Formulas follow the seed's V2/V1 specification, docs/formulas.md §1-§4 (section numbers in comments).
#include "lib/quant_lut.h"
#include "lib/quant_init.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace qatlab {

// -- configuration ---------------------------------------------------------------------------

LutForm lut_form_parse(const std::string & s) {
    if (s == "materialized") return LutForm::materialized;
    if (s == "loop") return LutForm::loop;
    if (s == "batched") return LutForm::batched;
    throw std::runtime_error("unknown forward form '" + s + "' (expected 'materialized', 'loop' or 'batched')");
}

const char * lut_form_name(LutForm f) {
    return f == LutForm::materialized ? "materialized" : f == LutForm::loop ? "loop" : "batched";
}

LutPreset lut_preset(const std::string & name) {
    if (name == "q2a4") return {4, 32, 16, 8};
    if (name == "q4a4") return {16, 4, 16, 4};
    if (name == "q4a4_r32" || name == "q4_r32") return {16, 32, 16, 32};
    if (name == "q2a2") return {4, 32, 4, 32};
    throw std::runtime_error("unknown preset '" + name + "' (expected q2a4, q4a4, q4a4_r32, q4_r32 or q2a2)");
}

// -- LUTs and STE ----------------------------------------------------------------------------

at::Tensor lut_make(int64_t size, bool include_zero) {
    if (size < 2 || size > 256) throw std::runtime_error("LUT size must be in 2..256, got " + std::to_string(size));
    auto h = at::TensorOptions().dtype(at::kHalf);   // fp16 on the CPU, as make_lut (docs/formulas.md §1)
    if (!include_zero || size % 2) return at::linspace(-1, 1, size, h).to(at::kFloat);
    at::Tensor neg = at::linspace(-1, 0, size / 2 + 1, h).narrow(0, 0, size / 2);
    at::Tensor pos = at::linspace(0, 1, size / 2, h);
    return at::cat({neg, pos}).to(at::kFloat);
}

at::Tensor lut_nearest_long(const at::Tensor & x, const at::Tensor & lut) {
    at::NoGradGuard ng;
    const int64_t Lq = lut.numel();
    if (Lq < 1 || Lq > 256) throw std::runtime_error("lut_nearest_indices: LUT size must be in 1..256");
    at::ScalarType dt = at::promote_types(x.scalar_type(), lut.scalar_type());
    at::Tensor l = lut.detach().reshape({-1}).to(x.device(), dt).contiguous();
    at::Tensor lc = l.to(at::kCPU, at::kDouble).contiguous();
    const double * lv = lc.data_ptr<double>();
    bool sorted = true;
    for (int64_t j = 1; j < Lq; j++) sorted = sorted && lv[j] > lv[j - 1];
    at::Tensor flat = x.detach().reshape({-1}).to(dt).clamp(lv[0], lv[Lq - 1]);
    if (Lq == 1) return at::zeros({flat.numel()}, flat.options().dtype(at::kLong)).view(x.sizes());
    if (!sorted) {   // any order: the full distance matrix, in chunks
        flat = x.detach().reshape({-1}).to(dt).clamp(l.min().item<double>(), l.max().item<double>());
        at::Tensor out = at::empty({flat.numel()}, x.options().dtype(at::kLong));
        const int64_t chunk = std::max<int64_t>(1, (1 << 24) / Lq);
        for (int64_t s = 0; s < flat.numel(); s += chunk) {
            int64_t n = std::min(chunk, flat.numel() - s);
            at::Tensor d = (flat.narrow(0, s, n).unsqueeze(1) - l.unsqueeze(0)).abs();   // (n, Lq)
            out.narrow(0, s, n).copy_(d.argmin(1));                                       // first minimum
        }
        return out.view(x.sizes());
    }
    // Sorted LUT: a candidate k (rounding for a near-uniform LUT, else binary search on the
    // midpoints) is the nearest entry or a neighbour of it, so the exact rule (least |x - l_j|,
    // ties to the lowest j) decided among k-1, k, k+1 equals the full argmin, ~5x cheaper.
    at::Tensor nan = at::isnan(flat);
    flat = at::nan_to_num(flat, lv[0]);
    const double step = (lv[Lq - 1] - lv[0]) / (double)(Lq - 1);
    bool uniform = step > 0;
    for (int64_t j = 0; j < Lq && uniform; j++) uniform = std::abs(lv[j] - (lv[0] + step * (double)j)) < 0.25 * step;
    at::Tensor k;
    if (uniform) {
        k = ((flat - lv[0]) * (1.0 / step)).round_().clamp_(0, (double)(Lq - 1)).to(at::kLong);
    } else {
        at::Tensor mid = (l.narrow(0, 0, Lq - 1) + l.narrow(0, 1, Lq - 1)) * 0.5;
        k = at::bucketize(flat, mid, false, false);
    }
    at::Tensor best = (k - 1).clamp_min_(0);
    at::Tensor bd = (flat - l.index_select(0, best)).abs_();
    for (int64_t off = 0; off <= 1; off++) {
        at::Tensor c = off ? (k + 1).clamp_max_(Lq - 1) : k;
        at::Tensor dc = (flat - l.index_select(0, c)).abs_();
        at::Tensor take = dc < bd;
        best = at::where(take, c, best);
        bd = at::where(take, dc, bd);
    }
    // NaN (0 / 0) takes entry 0, as the argmin does.
    return at::where(nan, at::zeros({}, best.options()), best).view(x.sizes());
}

at::Tensor lut_nearest_indices(const at::Tensor & x, const at::Tensor & lut) {
    return lut_nearest_long(x, lut).to(at::kByte);
}

at::Tensor lut_gather(const at::Tensor & lut, const at::Tensor & idx) {
    // int32 positions (transient): index_select takes int or long indices
    return lut.index_select(0, idx.reshape({-1}).to(at::kInt)).view(idx.sizes());
}

at::Tensor ste_fp16(const at::Tensor & x, bool saturate) {
    if (x.scalar_type() == at::kHalf) return x;
    at::Tensor xd = x.detach();
    at::Tensor x16 = (saturate ? xd.clamp(-65504.0, 65504.0) : xd).to(at::kHalf).to(x.scalar_type());
    return x + (x16 - xd);   // forward: the fp16 value; backward: identity
}

at::Tensor lut_kmeans_reduce(const at::Tensor & lut, int64_t k, int64_t n_iter) {
    at::NoGradGuard ng;
    at::Tensor v = lut.detach().to(at::kCPU, at::kFloat).reshape({-1}).contiguous();
    const int64_t n = v.numel();
    if (k < 1 || k > n) throw std::runtime_error("LUT size must be in 1.." + std::to_string(n));
    at::Tensor sorted = std::get<0>(v.sort());
    at::Tensor q = at::linspace(0, 1, k + 2).narrow(0, 1, k);                    // quantiles
    at::Tensor c = sorted.index_select(0, (q * (double)(n - 1)).floor().to(at::kLong)).clone();
    for (int64_t it = 0; it < n_iter; it++) {
        at::Tensor a = (v.unsqueeze(1) - c.unsqueeze(0)).abs().argmin(1);       // (n) first on ties
        for (int64_t j = 0; j < k; j++) {
            at::Tensor m = a == j;
            if (m.any().item<bool>()) c[j] = v.masked_select(m).mean();          // empty: keep
        }
    }
    return std::get<0>(c.sort());
}

double lut16_min_delta(double M) {
    return std::max(2.0 * std::pow(2.0, std::ceil(std::log2(M)) - 10.0), 1e-4);
}

at::Tensor lut16_from_raw(const at::Tensor & raw, double M, bool snap) {
    const double m = lut16_min_delta(M);
    at::Tensor delta = m + (M - 8 * m) * at::softmax(raw, 0);   // (8)
    at::Tensor pos = at::cumsum(delta, 0);                       // positive half, last = M
    at::Tensor l = at::cat({-pos.flip({0}), pos});               // (16)
    return snap ? ste_fp16(l, false) : l;
}

at::Tensor lut16_raw_init(const at::Tensor & lut, double M) {
    at::NoGradGuard ng;
    if (lut.numel() != 16) throw std::runtime_error("LUT training needs a 16-entry LUT, found " + std::to_string(lut.numel()));
    const double m = lut16_min_delta(M);
    at::Tensor l = lut.detach().to(at::kFloat).reshape({-1});
    at::Tensor d = at::cat({l.narrow(0, 8, 1).abs(), l.narrow(0, 9, 7) - l.narrow(0, 8, 7)}).clamp_min(m);
    return ((d - m) / (M - 8 * m)).clamp_min(1e-6).log();
}

// -- V2 layer --------------------------------------------------------------------------------

namespace {
at::ScalarType scale_dtype(at::ScalarType w) { return w == at::kDouble ? at::kDouble : at::kFloat; }

// Replace a slot's value, keeping its requires_grad flag.
void slot_set(at::Tensor & slot, const at::Tensor & v) {
    bool rg = slot.defined() && slot.requires_grad();
    slot = v.detach();
    if (rg && slot.is_floating_point()) slot.requires_grad_(true);
}

at::Tensor half_cpu(const at::Tensor & t) {   // fp16 casts go through the CPU (docs/formulas.md §2.6)
    return t.detach().to(at::kCPU).to(at::kHalf).to(t.device());
}
} // namespace

LutLinearV2::LutLinearV2(int64_t out, int64_t in, LutConfig c, const at::TensorOptions & opts, bool has_bias)
    : cfg(std::move(c)) {
    if (cfg.scale_rank <= 0) throw std::runtime_error("LutLinearV2: scale_rank must be > 0");
    auto so = opts.dtype(scale_dtype(opts.dtype().toScalarType()));
    w = at::zeros({out, in}, opts);
    if (has_bias) b = at::zeros({out}, opts);
    scale_A = at::zeros({out, cfg.scale_rank}, so);
    scale_B = at::zeros({cfg.scale_rank, in}, so);
    rank_magnitude = at::ones({cfg.scale_rank}, so);
    lut = lut_make(cfg.lut_size, cfg.lut_include_zero).to(so);
    baked_flag = at::zeros({}, opts.dtype(at::kChar));
}

std::vector<std::pair<std::string, at::Tensor *>> LutLinearV2::parameter_slots() {
    // The seed's state-dict order: weight, (bias), scale_A, scale_B, rank_magnitude, lut, _indices, flag.
    std::vector<std::pair<std::string, at::Tensor *>> s{{"weight", &w}};
    if (b.defined()) s.push_back({"bias", &b});
    s.push_back({"scale_A", &scale_A});
    s.push_back({"scale_B", &scale_B});
    s.push_back({"rank_magnitude", &rank_magnitude});
    s.push_back({"lut", &lut});
    if (indices.defined()) s.push_back({"_indices", &indices});
    s.push_back({"_scales_baked_flag", &baked_flag});
    if (lut_raw.defined()) s.push_back({"_lut_raw_deltas", &lut_raw});
    if (lora_A.defined()) {   // the seed's names: registered after the base parameters
        s.push_back({"lora_A", &lora_A});
        s.push_back({"lora_B", &lora_B});
    }
    return s;
}

bool LutLinearV2::baked() {
    // The flag may be replaced (to(), load) or written in place (load_state_dict): re-read it
    // only when the tensor or its version changes, so the forward does not sync every call.
    const void * impl = baked_flag.unsafeGetTensorImpl();
    int64_t ver = baked_flag._version();
    if (impl != flag_impl_ || ver != flag_version_) {
        flag_value_ = baked_flag.item<int64_t>() != 0;
        flag_impl_ = impl;
        flag_version_ = ver;
    }
    return flag_value_;
}

void LutLinearV2::set_baked(bool on) {
    baked_flag = at::full({}, on ? 1 : 0, baked_flag.options());
}

V2Scales v2_scales(LutLinearV2 & l) {
    if (l.baked()) return {l.scale_A, l.scale_B, l.rank_magnitude};   // raw, no eps, no STE (docs/formulas.md §2.3)
    const auto & c = l.cfg;
    at::Tensor A = l.scale_A, B = l.scale_B;
    if (c.force_positive_scales) {
        A = A.abs();
        B = B.abs();
    }
    at::Tensor A_dir = A / at::linalg_vector_norm(A, 2, {0}, true).clamp_min(c.norm_eps);   // [out,r] unit columns
    at::Tensor B_dir = B / at::linalg_vector_norm(B, 2, {1}, true).clamp_min(c.norm_eps);   // [r,in] unit rows
    at::Tensor g = l.rank_magnitude;
    if (c.magnitude_activation == "softplus") g = at::softplus(g);
    else if (c.magnitude_activation == "abs") g = g.abs();
    else if (c.magnitude_activation != "identity")
        throw std::runtime_error("unknown magnitude_activation '" + c.magnitude_activation + "'");
    g = g + c.magnitude_eps;
    if (c.use_ste_fp16) g = ste_fp16(g);
    return {A_dir, B_dir, g};
}

at::Tensor v2_full_scales(LutLinearV2 & l) {
    V2Scales s = v2_scales(l);
    at::ScalarType dt = at::promote_types(s.A_dir.scalar_type(), at::kFloat);
    return at::matmul(s.A_dir.to(dt) * s.g.to(dt), s.B_dir.to(dt));   // [out,in]
}

at::Tensor v2_q(LutLinearV2 & l, at::ScalarType dt) {
    at::Tensor idx = l.indices;
    if (!idx.defined()) {   // (d) Q on the fly from W / S, every call (slow)
        at::NoGradGuard ng;
        idx = lut_nearest_indices(l.w.to(at::promote_types(l.w.scalar_type(), at::kFloat)) / v2_full_scales(l), l.lut);
    }
    at::Tensor lv = l.lut_raw.defined() ? lut16_from_raw(l.lut_raw, l.lut_max_abs) : l.lut;
    return lut_gather(lv.to(dt), idx);   // [out,in]
}

namespace {
at::Tensor fp16_round(const at::Tensor & t) {   // the forward value of ste_fp16
    if (t.scalar_type() == at::kHalf) return t;
    return t.clamp(-65504.0, 65504.0).to(at::kHalf).to(t.scalar_type());
}

// t ⊙= lut[idx] in place, t [out,in]. On the CPU with fp32 values and uint8 indices one pass, with no
// gathered Q and no index copy (the materialized step forms W this way three times per layer); else the
// gather. Products are the same floats either way (bit-exact).
at::Tensor & lut_mul_(at::Tensor & t, const at::Tensor & lut, const at::Tensor & idx) {
    if (t.device().is_cpu() && t.scalar_type() == at::kFloat && lut.scalar_type() == at::kFloat &&
        idx.scalar_type() == at::kByte && t.is_contiguous() && idx.is_contiguous() && lut.numel() <= 256 &&
        idx.numel() == t.numel()) {
        float table[256] = {0};
        at::Tensor lc = lut.contiguous();
        std::copy(lc.data_ptr<float>(), lc.data_ptr<float>() + lc.numel(), table);
        float * p = t.data_ptr<float>();
        const uint8_t * ix = idx.data_ptr<uint8_t>();
        at::parallel_for(0, t.numel(), 1 << 15, [&](int64_t b, int64_t e) {
            for (int64_t k = b; k < e; k++) p[k] *= table[ix[k]];
        });
        return t;
    }
    return t.mul_(lut_gather(lut, idx));
}

// y = x W^T with W = [st](Q ⊙ (Am Bm)) cast to x's dtype, Q = [st](lut[idx]); [st] = fp16
// rounding when `ste` (identity in backward; rounding the LUT entries rounds every Q value alike).
// Saves only x and the small factors: W and S ([out,in] each) are recomputed in backward instead of
// being kept for the whole step.
struct MaterializedLinear : torch::autograd::Function<MaterializedLinear> {
    static at::Tensor weight(const at::Tensor & Am, const at::Tensor & Bm, const at::Tensor & lut_st,
                             const at::Tensor & idx, bool ste) {
        at::Tensor W = at::matmul(Am, Bm);                  // S [out,in], then Q ⊙ S in place
        lut_mul_(W, lut_st, idx);
        return ste ? fp16_round(W) : W;
    }
    static at::Tensor forward(torch::autograd::AutogradContext * ctx, const at::Tensor & x, const at::Tensor & Am,
                              const at::Tensor & Bm, const at::Tensor & lut, const at::Tensor & idx, bool ste) {
        at::Tensor W = weight(Am, Bm, ste ? fp16_round(lut) : lut, idx, ste).to(x.scalar_type());
        ctx->save_for_backward({x, Am, Bm, lut, idx});
        ctx->saved_data["ste"] = ste;
        at::Tensor y = at::linear(x, W);                    // [..., out]
        return ste ? fp16_round(y) : y;
    }
    static torch::autograd::variable_list backward(torch::autograd::AutogradContext * ctx,
                                                   torch::autograd::variable_list go) {
        auto sv = ctx->get_saved_variables();
        const at::Tensor &x = sv[0], &Am = sv[1], &Bm = sv[2], &lut = sv[3], &idx = sv[4];
        const bool ste = ctx->saved_data["ste"].toBool();
        const at::Tensor lut_st = ste ? fp16_round(lut) : lut;
        at::Tensor gy = go[0];                              // [..., out]
        at::Tensor gx, gAm, gBm, glut;
        const bool need_s = ctx->needs_input_grad(1) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3);
        at::Tensor gW;
        if (need_s) {
            gW = at::matmul(gy.reshape({-1, gy.size(-1)}).t(), x.reshape({-1, x.size(-1)}))
                     .to(at::promote_types(Am.scalar_type(), Bm.scalar_type()));   // [out,in]
            if (ctx->needs_input_grad(3)) {                 // ∂lut_j = Σ_{idx = j} ∂W ⊙ S
                at::Tensor gQ = (gW * at::matmul(Am, Bm)).reshape({-1});
                glut = at::zeros_like(lut).index_add_(0, idx.reshape({-1}).to(at::kLong), gQ);
            }
        }
        if (ctx->needs_input_grad(0)) {
            at::Tensor W = weight(Am, Bm, lut_st, idx, ste);   // recomputed
            gx = at::matmul(gy, W.to(gy.scalar_type()));    // [..., in]
        }
        if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
            at::Tensor & gS = lut_mul_(gW, lut_st, idx);    // ∂S = ∂W ⊙ Q, in place
            if (ctx->needs_input_grad(1)) gAm = at::matmul(gS, Bm.t());   // [out,r]
            if (ctx->needs_input_grad(2)) gBm = at::matmul(Am.t(), gS);   // [r,in]
        }
        return {gx, gAm, gBm, glut, at::Tensor(), at::Tensor()};
    }
};
} // namespace

namespace {
at::Tensor v2_forward_base(LutLinearV2 & l, const at::Tensor & x, LutForm form) {
    const bool ste = l.cfg.use_ste_fp16;
    auto st = [&](const at::Tensor & t) { return ste ? ste_fp16(t) : t; };
    const at::ScalarType dt = x.scalar_type();
    V2Scales s = v2_scales(l);
    at::Tensor y;
    if (form == LutForm::materialized) {
        // W_eff = Q ⊙ ((A_dir g) B_dir), formed once in fp32 (or wider) from the scales and the
        // LUT, cast to the compute dtype, then one GEMM. STE points: Q, A_dir g and B_dir (as the
        // batched form), then W_eff and y in place of the per-rank u, v and accumulator
        // roundings, which a single GEMM cannot reproduce.
        at::ScalarType sdt = at::promote_types(s.A_dir.scalar_type(), at::kFloat);
        at::Tensor Am = st(s.A_dir.to(sdt) * s.g.to(sdt));   // [out,r]
        at::Tensor Bm = st(s.B_dir.to(sdt));                 // [r,in]
        at::Tensor idx = l.indices;
        if (!idx.defined()) {
            at::NoGradGuard ng;
            idx = lut_nearest_indices(l.w.to(sdt) / v2_full_scales(l), l.lut);
        }
        at::Tensor lv = (l.lut_raw.defined() ? lut16_from_raw(l.lut_raw, l.lut_max_abs) : l.lut).to(sdt);
        y = MaterializedLinear::apply(x, Am, Bm, lv, idx, ste);   // [..., out]
        if (l.b.defined()) y = y + st(l.b).to(dt);
        return y;
    }
    at::Tensor Q = st(v2_q(l, dt));   // [out,in] in the compute dtype (the seed's Q.to(x.dtype))
    if (form == LutForm::loop) {
        // docs/formulas.md §2.4 loop: per rank b = st(B_k), a = st(g_k A_k), u = st(x ⊙ b), v = st(u Q^T), y = st(y + a ⊙ v).
        auto sizes = x.sizes().vec();
        sizes.back() = l.out_features();
        y = at::zeros(sizes, x.options());
        for (int64_t k = 0; k < s.A_dir.size(1); k++) {
            at::Tensor bk = st(s.B_dir.select(0, k)).to(dt);                       // [in]
            at::Tensor ak = st(s.g.select(0, k) * s.A_dir.select(1, k)).to(dt);    // [out]
            at::Tensor u = st(x * bk);                                             // [..., in]
            at::Tensor v = st(at::linear(u, Q));                                   // [..., out]
            y = st(y + ak * v);
        }
    } else {
        // docs/formulas.md §2.4 batched: X = st(x[..., None, :] ⊙ Bm), Y = st(X Q^T), y = st(Σ_r Y ⊙ Am).
        at::Tensor Bm = st(s.B_dir).to(dt);                                       // [r,in]
        at::Tensor Am = st((s.A_dir * s.g).t()).to(dt);                           // [r,out]
        at::Tensor X = st(x.unsqueeze(-2) * Bm);                                  // [..., r, in]
        at::Tensor Y = st(at::matmul(X, Q.t()));                                  // [..., r, out]
        y = st((Y * Am).sum(-2));                                                 // [..., out]
    }
    if (l.b.defined()) y = y + st(l.b).to(dt);
    return y;
}

} // namespace

at::Tensor v2_forward(LutLinearV2 & l, const at::Tensor & x, LutForm form) {
    at::Tensor y = v2_forward_base(l, x, form);
    // The base keeps its own autograd: frozen scales cost no gradient work (the materialized
    // backward computes only dx), so no separate no-grad base path is needed as in the seed.
    return l.lora_A.defined() ? y + v2_lora_forward(l, x) : y;
}

at::Tensor LutLinearV2::forward(const at::Tensor & x) { return v2_forward(*this, x, form); }

at::Tensor LutLinearV2::weight() {
    at::NoGradGuard ng;
    at::Tensor S = v2_full_scales(*this);
    at::Tensor W = v2_q(*this, S.scalar_type()) * S;
    if (lora_A.defined()) W = W + v2_lora_delta(*this).to(W.scalar_type());   // what forward computes
    return W.to(w.scalar_type());
}

// -- recovery LoRA (docs/formulas.md §2.7) -------------------------------------------------------------------

void v2_enable_lora(LutLinearV2 & l, int64_t rank, std::optional<double> alpha, double dropout) {
    const std::string who = l.module_name.empty() ? std::string("V2 layer") : l.module_name;
    if (rank < 1 || rank > std::min(l.in_features(), l.out_features()))
        throw std::runtime_error(who + ": recovery LoRA option 'rank': expected 1.." +
                                 std::to_string(std::min(l.in_features(), l.out_features())) + ", got " + std::to_string(rank));
    if (!(dropout >= 0 && dropout < 1))
        throw std::runtime_error(who + ": recovery LoRA option 'dropout': expected [0, 1), got " + std::to_string(dropout));
    if (alpha && !std::isfinite(*alpha))
        throw std::runtime_error(who + ": recovery LoRA option 'alpha': expected a finite number");
    if (l.lora_A.defined()) return;   // already enabled: left as it is (the seed's rule)
    at::NoGradGuard ng;
    auto o = l.w.options().dtype(at::kFloat);   // fp32 even for a half model (optimizer stability)
    l.lora_A = at::empty({rank, l.in_features()}, o).normal_(0.0, 0.02).requires_grad_(true);
    l.lora_B = at::zeros({l.out_features(), rank}, o).requires_grad_(true);
    l.lora_alpha = alpha.value_or((double)rank);
    l.lora_dropout = dropout;
}

void v2_disable_lora(LutLinearV2 & l) {
    l.lora_A = at::Tensor();
    l.lora_B = at::Tensor();
    l.lora_alpha = l.lora_dropout = 0.0;
}

at::Tensor v2_lora_forward(LutLinearV2 & l, const at::Tensor & x) {
    const bool ste = l.cfg.use_ste_fp16;
    auto st = [&](const at::Tensor & t) { return ste ? ste_fp16(t) : t; };
    const at::ScalarType dt = x.scalar_type();
    at::Tensor xd = l.lora_dropout > 0 ? at::dropout(x, l.lora_dropout, l.training()) : x;
    at::Tensor h = st(at::linear(xd, st(l.lora_A.to(dt))));          // [..., r_l]
    return st(at::linear(h, st(l.lora_B.to(dt))) * l.lora_scaling());  // [..., out]
}

at::Tensor v2_lora_delta(LutLinearV2 & l) {
    at::ScalarType dt = at::promote_types(l.lora_A.scalar_type(), at::kFloat);
    return at::matmul(l.lora_B.to(dt), l.lora_A.to(dt)) * l.lora_scaling();   // [out,in]
}

int64_t v2_resnap_with_lora(LutLinearV2 & l) {
    if (!l.lora_A.defined()) return 0;
    at::NoGradGuard ng;
    at::Tensor S = v2_full_scales(l);                                   // [out,in], unchanged
    at::Tensor Wt = v2_q(l, S.scalar_type()) * S + v2_lora_delta(l).to(S.scalar_type());   // W_eff + ΔW
    at::Tensor lv = (l.lut_raw.defined() ? lut16_from_raw(l.lut_raw, l.lut_max_abs, true) : l.lut).detach();
    at::Tensor old = l.indices.defined() ? l.indices : lut_nearest_indices(l.w.to(S.scalar_type()) / S, lv);
    at::Tensor idx = lut_nearest_indices(Wt / S, lv);                   // no epsilon, as freeze_Q
    int64_t changed = (idx != old.to(idx.device())).sum().item<int64_t>();
    l.indices = idx;
    v2_disable_lora(l);
    return changed;
}

namespace {
// docs/formulas.md §2.2 steps 1-2: group max-abs per G input columns, expanded per weight: [out, padded_in].
at::Tensor group_maxabs_full(const at::Tensor & W, int64_t G) {
    const int64_t out = W.size(0), in = W.size(1), pad = (G - in % G) % G;
    at::Tensor Wp = pad ? at::constant_pad_nd(W, {0, pad}) : W;
    at::Tensor s = Wp.abs().view({out, (in + pad) / G, G}).amax(2).clamp_min(1e-8);   // [out, groups]
    return s.repeat_interleave(G, 1);                                                   // [out, padded_in]
}
} // namespace

void v2_init_from_weight(LutLinearV2 & l, const at::Tensor & W_, bool round_g_fp16, const std::string & svd,
                         uint64_t seed) {
    at::NoGradGuard ng;
    at::Tensor W = W_.detach().to(scale_dtype(W_.scalar_type()));
    const int64_t in = W.size(1), r = l.cfg.scale_rank;
    if (l.cfg.group_size <= 0) throw std::runtime_error("v2_init_from_weight: group_size must be > 0");
    at::Tensor S_full = group_maxabs_full(W, l.cfg.group_size).narrow(1, 0, in).contiguous();   // [out,in]
    // Only the top r triplets are needed: a randomized SVD unless the matrix is small.
    if (svd != "auto" && svd != "exact" && svd != "randomized")
        throw std::runtime_error("svd = '" + svd + "': expected 'auto', 'exact' or 'randomized'");
    const int64_t exact_below = svd == "exact" ? INT64_MAX : svd == "randomized" ? 0 : 64;
    LowRankSvd s = svd_lowrank(S_full, r, 10, 2, seed, exact_below);
    const at::Tensor &U = s.U, &sv = s.S, &Vh = s.Vh;   // U [out,k], sv [k], Vh [k,in]
    const int64_t k = std::min<int64_t>(r, sv.numel());
    double floor = std::max(0.01 * sv[0].item<double>(), 0.01);
    at::Tensor A = at::zeros({W.size(0), r}, W.options()), B = at::zeros({r, in}, W.options());
    at::Tensor g = at::full({r}, floor, W.options());
    A.narrow(1, 0, k).copy_(U.narrow(1, 0, k));
    B.narrow(0, 0, k).copy_(Vh.narrow(0, 0, k));
    g.narrow(0, 0, k).copy_(sv.narrow(0, 0, k).clamp_min(floor));
    if (round_g_fp16) g = g.to(at::kHalf).to(g.scalar_type());
    auto so = l.scale_A.options();
    slot_set(l.scale_A, A.to(so));
    slot_set(l.scale_B, B.to(so));
    slot_set(l.rank_magnitude, g.to(so));
    l.set_baked(false);
}

void v2_freeze_q(LutLinearV2 & l) {
    at::NoGradGuard ng;
    at::Tensor S = v2_full_scales(l);
    l.indices = lut_nearest_indices(l.w.to(S.scalar_type()) / S, l.lut);   // no epsilon (docs/formulas.md §2.3)
    l.w.requires_grad_(false);
}

std::shared_ptr<LutLinearV2> v2_from_dense(const at::Tensor & W, const at::Tensor & bias, const LutConfig & c,
                                           bool freeze) {
    auto l = std::make_shared<LutLinearV2>(W.size(0), W.size(1), c, W.options(), bias.defined());
    l->w = W.detach();
    if (bias.defined()) l->b = bias.detach();
    v2_init_from_weight(*l, l->w, true);
    if (freeze) v2_freeze_q(*l);
    l->scale_A.requires_grad_(true);
    l->scale_B.requires_grad_(true);
    l->rank_magnitude.requires_grad_(true);
    return l;
}

void v2_enable_lut_training(LutLinearV2 & l, double max_abs) {
    if (l.cfg.lut_size != 16 || l.lut.numel() != 16) throw std::runtime_error("LUT training needs a 16-entry LUT");
    if (!l.indices.defined()) v2_freeze_q(l);
    l.lut_max_abs = max_abs;
    l.lut_raw = lut16_raw_init(l.lut, max_abs).to(l.lut.device()).requires_grad_(true);
}

// -- snapping (docs/formulas.md §2.6) -------------------------------------------------------------------------

namespace {
void bake_lut_raw(LutLinearV2 & l) {   // trained LUT16 → lut (scripts/bake_lut.py)
    if (!l.lut_raw.defined()) return;
    at::NoGradGuard ng;
    l.lut = lut16_from_raw(l.lut_raw, l.lut_max_abs).detach().to(l.lut.options());
    l.lut_raw = at::Tensor();
}
} // namespace

void v2_snap_for_export(LutLinearV2 & l) {
    at::NoGradGuard ng;
    bake_lut_raw(l);
    V2Scales s = v2_scales(l);
    at::Tensor A = s.A_dir * s.g, B = s.B_dir;
    slot_set(l.scale_A, A.to(l.scale_A.options()));
    slot_set(l.scale_B, B.to(l.scale_B.options()));
    slot_set(l.rank_magnitude, at::ones_like(l.rank_magnitude));
    l.set_baked(true);
}

void v2_snap_for_ane(LutLinearV2 & l, bool recompute_indices) {
    at::NoGradGuard ng;
    bake_lut_raw(l);
    at::Tensor lut16 = half_cpu(l.lut);
    if (recompute_indices) {
        V2Scales s = v2_scales(l);
        at::Tensor A16 = half_cpu(s.A_dir), B16 = half_cpu(s.B_dir), g16 = half_cpu(s.g);
        at::Tensor Ag = A16 * g16;                                                  // fp16 [out,r]
        at::Tensor S16 = at::matmul(Ag, B16);                                       // fp16 [out,in]
        l.indices = lut_nearest_indices(half_cpu(l.w) / S16, lut16);
        slot_set(l.scale_A, Ag);
        slot_set(l.scale_B, B16);
        slot_set(l.rank_magnitude, at::ones_like(g16));
        l.set_baked(true);
    } else {
        slot_set(l.scale_A, half_cpu(l.scale_A));
        slot_set(l.scale_B, half_cpu(l.scale_B));
        slot_set(l.rank_magnitude, half_cpu(l.rank_magnitude));
    }
    slot_set(l.w, half_cpu(l.w));
    if (l.b.defined()) slot_set(l.b, half_cpu(l.b));
    slot_set(l.lut, lut16);
    if (l.lora_A.defined()) {   // kept as a separate fp16 adapter (resnap_with_lora merges it)
        slot_set(l.lora_A, half_cpu(l.lora_A));
        slot_set(l.lora_B, half_cpu(l.lora_B));
    }
}

void v2_convert_to_fp16(LutLinearV2 & l) {
    at::NoGradGuard ng;
    slot_set(l.w, half_cpu(l.w));
    if (l.b.defined()) slot_set(l.b, half_cpu(l.b));
    slot_set(l.scale_A, half_cpu(l.scale_A));
    slot_set(l.scale_B, half_cpu(l.scale_B));
    slot_set(l.rank_magnitude, half_cpu(l.rank_magnitude));
    // As the seed: the LUT is re-created by make_lut in fp16 (a custom or k-means LUT is lost).
    l.lut = lut_make(l.lut.numel(), l.cfg.lut_include_zero).to(l.lut.device(), at::kHalf);
    l.lut_raw = at::Tensor();
    if (l.lora_A.defined()) {
        slot_set(l.lora_A, half_cpu(l.lora_A));
        slot_set(l.lora_B, half_cpu(l.lora_B));
    }
}

// -- Q4 → Q2 (docs/formulas.md §4) ----------------------------------------------------------------------------

void v2_convert_rank_lut(LutLinearV2 & l, int64_t new_rank, int64_t new_lut, std::optional<at::Generator> gen) {
    at::NoGradGuard ng;
    bake_lut_raw(l);
    const int64_t r = l.rank(), out = l.out_features(), in = l.in_features();
    if (new_rank < r) throw std::runtime_error("q4_to_q2: rank can only grow (" + std::to_string(r) + " -> " +
                                               std::to_string(new_rank) + ")");
    if (new_lut > l.lut.numel()) throw std::runtime_error("q4_to_q2: the LUT can only shrink");
    if (new_lut < l.lut.numel()) slot_set(l.lut, lut_kmeans_reduce(l.lut, new_lut, 20).to(l.lut.device()));
    l.cfg.lut_size = new_lut;
    if (new_rank > r) {
        auto cpu = at::TensorOptions().dtype(at::kFloat);
        at::Tensor nA = 0.01 * at::randn({out, new_rank - r}, gen, cpu);   // new directions 0.01·N(0,1)
        at::Tensor nB = 0.01 * at::randn({new_rank - r, in}, gen, cpu);
        at::Tensor ng_ = at::full({new_rank - r}, 0.01, cpu);              // new ranks g = 0.01
        slot_set(l.scale_A, at::cat({l.scale_A, nA.to(l.scale_A.options())}, 1));
        slot_set(l.scale_B, at::cat({l.scale_B, nB.to(l.scale_B.options())}, 0));
        slot_set(l.rank_magnitude, at::cat({l.rank_magnitude, ng_.to(l.rank_magnitude.options())}));
    }
    l.cfg.scale_rank = new_rank;
    v2_freeze_q(l);   // indices are recomputed, not remapped
}

// -- V1 layer (docs/formulas.md §3) -------------------------------------------------------------------------

LutLinearV1::LutLinearV1(int64_t out, int64_t in, int64_t Lq, int64_t rank, int64_t G, const at::TensorOptions & opts,
                         bool has_bias)
    : lut_size(Lq), group_size(G) {
    const int64_t padded = (in + G - 1) / G * G;
    w = at::zeros({out, in}, opts);
    if (has_bias) b = at::zeros({out}, opts);
    if (rank > 0 && rank < std::min(out, padded)) {
        scale_A = at::zeros({out, rank}, opts);
        scale_B = at::zeros({rank, padded}, opts);
    } else {
        full_scales = at::ones({out, padded}, opts);
    }
    lut = lut_make(Lq).to(opts);
}

std::vector<std::pair<std::string, at::Tensor *>> LutLinearV1::parameter_slots() {
    std::vector<std::pair<std::string, at::Tensor *>> s{{"weight", &w}};
    if (b.defined()) s.push_back({"bias", &b});
    if (full_scales.defined()) {
        s.push_back({"full_scales", &full_scales});
    } else {
        s.push_back({"scale_A", &scale_A});
        s.push_back({"scale_B", &scale_B});
    }
    s.push_back({"lut", &lut});
    return s;
}

at::Tensor v1_scales(LutLinearV1 & l) {
    at::Tensor S = l.full_scales.defined() ? l.full_scales : at::matmul(l.scale_A, l.scale_B);
    return S.clamp_min(1e-8).narrow(1, 0, l.in_features());   // [out,in]
}

at::Tensor v1_fake_quant(LutLinearV1 & l) {
    at::Tensor S = v1_scales(l);
    at::Tensor idx;
    {
        at::NoGradGuard ng;   // the .long() cast kills the round's STE gradient anyway
        const double step = 2.0 / (double)(l.lut_size - 1);
        idx = ((l.w.detach() / S.detach()).clamp(-1, 1).add(1).div(step)).round().clamp(0, l.lut_size - 1).to(at::kLong);
    }
    at::Tensor deq = lut_gather(l.lut.to(S.scalar_type()), idx) * S;
    if (l.w.requires_grad()) return l.w + (deq - l.w).detach();   // gradients to W only
    return deq;                                                  // gradients to the scales
}

at::Tensor LutLinearV1::forward(const at::Tensor & x) {
    at::Tensor Wq = v1_fake_quant(*this).to(x.scalar_type());
    return at::linear(x, Wq, b.defined() ? std::optional<at::Tensor>(b.to(x.scalar_type())) : std::nullopt);
}

at::Tensor LutLinearV1::weight() {
    at::NoGradGuard ng;
    return v1_fake_quant(*this).detach();
}

void v1_init_from_weight(LutLinearV1 & l, const at::Tensor & W_) {
    at::NoGradGuard ng;
    at::Tensor W = W_.detach().to(scale_dtype(W_.scalar_type()));
    at::Tensor S_full = group_maxabs_full(W, l.group_size);   // [out, padded_in]
    if (l.full_scales.defined()) {
        slot_set(l.full_scales, S_full.to(l.full_scales.options()));
        return;
    }
    const int64_t r = l.scale_A.size(1);
    auto [U, sv, Vh] = at::linalg_svd(S_full, false);
    slot_set(l.scale_A, (U.narrow(1, 0, r) * sv.narrow(0, 0, r)).to(l.scale_A.options()));   // no floor, no g
    slot_set(l.scale_B, Vh.narrow(0, 0, r).to(l.scale_B.options()));
}

std::shared_ptr<LutLinearV2> v1_to_v2(LutLinearV1 & v1, LutConfig c, bool freeze) {
    at::NoGradGuard ng;
    if (v1.full_scales.defined()) throw std::runtime_error("v1_to_v2: the V1 layer has full (not low-rank) scales");
    const int64_t out = v1.out_features(), in = v1.in_features(), r = v1.scale_A.size(1);
    c.lut_size = v1.lut.numel();
    c.scale_rank = r;
    auto l = std::make_shared<LutLinearV2>(out, in, c, v1.w.options(), v1.b.defined());
    auto so = l->scale_A.options();
    at::Tensor A = v1.scale_A.detach().to(so), B = v1.scale_B.detach().narrow(1, 0, in).to(so);   // [out,r], [r,in]
    at::Tensor na = at::linalg_vector_norm(A, 2, {0}), nb = at::linalg_vector_norm(B, 2, {1});   // [r]
    l->scale_A = A / na.clamp_min(1e-6);
    l->scale_B = B / nb.unsqueeze(1).clamp_min(1e-6);
    l->rank_magnitude = na * nb;   // (A_dir ⊙ g) B_dir = A B
    l->lut = v1.lut.detach().to(so).clone();
    l->w = v1.w.detach();
    if (v1.b.defined()) l->b = v1.b.detach();
    if (freeze) v2_freeze_q(*l);
    l->scale_A.requires_grad_(true);
    l->scale_B.requires_grad_(true);
    l->rank_magnitude.requires_grad_(true);
    return l;
}

} // namespace qatlab
