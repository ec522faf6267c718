// kd_loss: docs/formulas.md §6 KD loss (V2 docs/formulas.md §6, legacy docs/formulas.md §6, evaluate docs/formulas.md §6) as a fused, chunked autograd
// Function that forms each chunk's logits once (gradients taken in forward), plus an unfused reference.
#include "lib/kd_loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>

namespace qatlab {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

[[noreturn]] void fail(const std::string & what, const std::string & msg) {
    throw std::invalid_argument(what + ": " + msg);
}

std::string shape_str(const at::Tensor & t) {
    std::ostringstream o;
    o << t.sizes();
    return o.str();
}

// The problem flattened to N = B·S rows, shared by the fused and the reference paths so both
// compute exactly the same sum: L = ak·Σ wk·KL + ac·Σ wc·CE_cand + af·Σ wf·CE_full.
struct KDPrep {
    at::Tensor h;             // (N, H) in its own dtype
    at::Tensor cand;          // (N, M) int64: candidate ids; KL over the first mk, CE_cand over all M
    at::Tensor tk;            // (N, mk) acc: teacher logits of the KL candidates
    at::Tensor y;             // (N) int64: full-CE target (teacher argmax)
    at::Tensor wk, wc, wf;    // (N) acc: per-row averaging weights of the three terms
    int64_t mk = 0;
    double T = 1, ak = 0, ac = 0, af = 0;
    bool dense_full = false;  // every row needs full logits (V2 hard terms): take candidates from them
    int64_t chunk = 128;
    at::ScalarType acc = at::kFloat, cd = at::kFloat;   // softmax accumulation, matmul dtype
    int64_t B = 0, S = 0;
    bool grad_h = false, grad_W = false;   // which gradients the forward pass computes
};

at::Tensor check_index(const at::Tensor & t, const char * name, int64_t B, int64_t S, int64_t V, at::Device dev) {
    if (!t.defined()) fail(name, "missing");
    if (t.dim() != 3 || t.size(0) != B || t.size(1) != S)
        fail(name, "expected shape (" + std::to_string(B) + ", " + std::to_string(S) + ", *), got " + shape_str(t));
    if (t.scalar_type() != at::kInt && t.scalar_type() != at::kLong)
        fail(name, std::string("expected int32 or int64 ids, got ") + c10::toString(t.scalar_type()));
    if (t.size(2) < 1) fail(name, "needs at least one candidate per position");
    at::Tensor l = t.to(dev, at::kLong);
    if (l.numel() > 0) {
        int64_t lo = l.min().item<int64_t>(), hi = l.max().item<int64_t>();
        if (lo < 0 || hi >= V)
            fail(name, "ids must lie in [0, " + std::to_string(V) + "), found " + std::to_string(lo < 0 ? lo : hi));
    }
    return l;
}

at::Tensor check_logits(const at::Tensor & t, const char * name, const at::Tensor & idx, at::ScalarType acc, at::Device dev) {
    if (!t.defined()) fail(name, "missing");
    if (!t.sizes().equals(idx.sizes()))
        fail(name, "expected the shape of the ids " + shape_str(idx) + ", got " + shape_str(t));
    if (!at::isFloatingType(t.scalar_type()))
        fail(name, std::string("expected floating logits, got ") + c10::toString(t.scalar_type()));
    return t.to(dev, acc);
}

KDPrep kd_prepare(const at::Tensor & h_in, const at::Tensor & W, const KDBatch & b, const KDOptions & o) {
    if (!h_in.defined()) fail("h", "missing");
    if (!W.defined()) fail("lm_head_weight", "missing");
    if (h_in.dim() != 3) fail("h", "expected hidden states (B, S, H), got " + shape_str(h_in));
    if (!at::isFloatingType(h_in.scalar_type())) fail("h", std::string("expected a floating tensor, got ") + c10::toString(h_in.scalar_type()));
    if (W.dim() != 2 || W.size(1) != h_in.size(2))
        fail("lm_head_weight", "expected (V, " + std::to_string(h_in.size(2)) + "), got " + shape_str(W));
    if (!at::isFloatingType(W.scalar_type())) fail("lm_head_weight", std::string("expected a floating tensor, got ") + c10::toString(W.scalar_type()));
    if (W.device() != h_in.device()) fail("lm_head_weight", "on " + W.device().str() + ", h on " + h_in.device().str());
    if (!b.topk_idx.defined()) fail("topk_idx", "missing");
    if (b.topk_idx.dim() != 3) fail("topk_idx", "expected (B, S, K), got " + shape_str(b.topk_idx));
    if (!(o.temperature > 0)) fail("temperature", "must be > 0");
    if (o.chunk < 1) fail("chunk", "must be >= 1");

    KDPrep p;
    p.B = h_in.size(0);
    p.S = b.topk_idx.size(1);
    const int64_t B = p.B, S = p.S, V = W.size(0), N = B * S;
    at::Tensor h = h_in;
    if (h.size(0) != B || (h.size(1) != S && h.size(1) != S + 1) || b.topk_idx.size(0) != B)
        fail("h", "expected (B, S, H) or (B, S+1, H) with (B, S) = (" + std::to_string(b.topk_idx.size(0)) + ", " +
                      std::to_string(S) + ") from topk_idx, got " + shape_str(h_in));
    if (h.size(1) == S + 1) h = h.narrow(1, 0, S);   // the last position predicts nothing
    p.h = h.reshape({N, h.size(2)});
    const at::Device dev = h.device();
    p.acc = (h.scalar_type() == at::kDouble || W.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
    p.cd = at::promoteTypes(h.scalar_type(), W.scalar_type());
    p.T = o.temperature;
    p.chunk = o.chunk;

    at::Tensor topk = check_index(b.topk_idx, "topk_idx", B, S, V, dev);            // (B, S, K)
    at::Tensor topl = check_logits(b.topk_logits, "topk_logits", b.topk_idx, p.acc, dev);
    const int64_t K = topk.size(2);

    // Position mask m = attention_mask[:, 1:] (legacy, or V2 with `masked`); else all ones.
    at::Tensor m;   // (B, S) acc
    at::Tensor lengths;   // (B) int64 tokens per sequence
    if (b.attention_mask.defined()) {
        if (b.attention_mask.dim() != 2 || b.attention_mask.size(0) != B || b.attention_mask.size(1) != S + 1)
            fail("attention_mask", "expected (B, L) = (" + std::to_string(B) + ", " + std::to_string(S + 1) + "), got " +
                                      shape_str(b.attention_mask));
        at::Tensor am = b.attention_mask.to(dev) != 0;   // (B, L)
        lengths = am.sum(1).to(at::kLong);
        if (o.legacy || o.masked) m = am.narrow(1, 1, S).to(p.acc);
    }
    if (!m.defined()) m = at::ones({B, S}, at::TensorOptions().dtype(p.acc).device(dev));
    at::Tensor w_mean = (m / m.sum().clamp_min(1.0)).reshape({N});   // Σ(x·m) / max(Σm, 1); 1/N unmasked

    at::Tensor randi, randl;
    if (b.rand_idx.defined()) {
        randi = check_index(b.rand_idx, "rand_idx", B, S, V, dev);
        if (o.legacy) randl = check_logits(b.rand_logits, "rand_logits", b.rand_idx, p.acc, dev);
    }
    p.y = topk.select(2, 0).reshape({N});
    const at::Tensor zero = at::zeros({N}, at::TensorOptions().dtype(p.acc).device(dev));
    if (!o.legacy) {
        // docs/formulas.md §6: T²·KL over top-K; (hard_top1 + hard_full)·CE_full, one CE reused; sampled CE.
        p.cand = topk.reshape({N, K});
        p.tk = topl.reshape({N, K});
        p.mk = K;
        p.ak = p.T * p.T;
        p.af = (o.hard_top1 > 0 ? o.hard_top1 : 0.0) + (o.hard_full > 0 ? o.hard_full : 0.0);
        p.ac = o.sampled_ce > 0 ? o.sampled_ce : 0.0;
        if (p.ac != 0) {
            at::Tensor neg = randi.defined() ? randi.reshape({N, randi.size(2)}) : at::Tensor();
            if (!neg.defined()) {
                if (o.sampled_negatives < 1) fail("sampled_negatives", "must be >= 1");
                neg = at::randint(0, V, {N, o.sampled_negatives}, o.generator,
                                  at::TensorOptions().dtype(at::kLong).device(dev));
            }
            p.cand = at::cat({p.cand, neg}, 1);   // (N, K + R)
        }
        p.wk = w_mean;
        p.wc = p.ac != 0 ? w_mean : zero;
        p.wf = p.af != 0 ? w_mean : zero;
        p.dense_full = p.af != 0;
    } else {
        // docs/formulas.md §6: KL and candidate NLL over [top-K ‖ rand]; full CE at the last non-pad position.
        p.cand = topk.reshape({N, K});
        p.tk = topl.reshape({N, K});
        if (randi.defined()) {
            p.cand = at::cat({p.cand, randi.reshape({N, randi.size(2)})}, 1);
            p.tk = at::cat({p.tk, randl.reshape({N, randl.size(2)})}, 1);
        }
        p.mk = p.cand.size(1);
        p.ak = p.T * p.T * o.distill_weight;
        p.ac = o.hard_top1 > 0 ? o.hard_top1 : 0.0;
        p.af = o.hard_full > 0 ? o.hard_full : 0.0;
        p.wk = w_mean;
        p.wc = p.ac != 0 ? w_mean : zero;
        p.wf = zero.clone();
        if (p.af != 0) {
            // pos = length − 2 per sequence (right padding); sequences shorter than 2 tokens skip.
            if (!lengths.defined()) lengths = at::full({B}, S + 1, at::TensorOptions().dtype(at::kLong).device(dev));
            at::Tensor ok = lengths >= 2;   // (B)
            int64_t nvalid = ok.sum().item<int64_t>();
            if (nvalid > 0) {
                at::Tensor bs = ok.nonzero().squeeze(1);                     // (n)
                at::Tensor rows = bs * S + lengths.index_select(0, bs) - 2;  // (n)
                p.wf.index_fill_(0, rows, 1.0 / (double)nvalid);
            }
        }
        p.dense_full = false;
    }
    return p;
}

// -- fused -----------------------------------------------------------------------------------

struct Sums {
    at::Tensor kl, cand, full;   // 0-dim acc: Σ wk·KL, Σ wc·CE_cand, Σ wf·CE_full
};

// Full-vocab CE rows: adds Σ wf·CE to `full`; with grad, turns Z (R, V) into dL/dZ in place.
// One in-place log_softmax (no (R, V) temporary), then exp·w and the one-hot: three passes over Z.
void full_ce_rows(at::Tensor & Z, const at::Tensor & y, const at::Tensor & wf, double coef, bool want_grad,
                  at::Tensor & full) {
    if (Z.is_contiguous()) at::_log_softmax_out(Z, Z, 1, false);                 // Z ← Z − lse (in place)
    else Z = at::log_softmax(Z, 1);
    at::Tensor ce = -Z.gather(1, y.unsqueeze(1)).squeeze(1);                     // (R)
    full = full + (wf * ce).sum();
    if (want_grad) {
        at::Tensor w = wf * coef;                                                // (R)
        Z.exp_().mul_(w.unsqueeze(1));                                           // w·softmax
        Z.scatter_add_(1, y.unsqueeze(1), -w.unsqueeze(1));                      // − w·onehot(y)
    }
}

// Rows [r0, r0 + C): adds the weighted sums to s. With want_grad (g = dL_out/dL) returns dL/dh
// for the rows (C, H) in the matmul dtype and accumulates dL/dW into *dW (V, H) when given.
at::Tensor chunk_run(const KDPrep & p, const at::Tensor & Wc, int64_t r0, int64_t C, Sums & s, bool want_grad,
                     double g, at::Tensor * dW) {
    const int64_t M = p.cand.size(1), H = p.h.size(1);
    at::Tensor hc = p.h.narrow(0, r0, C).to(p.cd);      // (C, H)
    at::Tensor cand = p.cand.narrow(0, r0, C);          // (C, M)
    at::Tensor wk = p.wk.narrow(0, r0, C), wc = p.wc.narrow(0, r0, C), wf = p.wf.narrow(0, r0, C);
    at::Tensor Z, Wg, zc;
    if (p.dense_full) {
        Z = at::matmul(hc, Wc.t()).to(p.acc);           // (C, V): computed once for KL and CE
        zc = Z.gather(1, cand);                         // (C, M)
    } else {
        Wg = Wc.index_select(0, cand.reshape({-1})).view({C, M, H});    // (C, M, H)
        zc = at::bmm(Wg, hc.unsqueeze(2)).squeeze(2).to(p.acc);         // (C, M)
    }
    at::Tensor gzc = want_grad ? at::zeros_like(zc) : at::Tensor();    // (C, M) dL/dz_cand
    if (p.ak != 0) {
        at::Tensor ls = at::log_softmax(zc.narrow(1, 0, p.mk) / p.T, 1);              // (C, mk)
        at::Tensor lt = at::log_softmax(p.tk.narrow(0, r0, C) / p.T, 1);             // (C, mk)
        at::Tensor pt = lt.exp();
        s.kl = s.kl + (wk * (pt * (lt - ls)).sum(1)).sum();
        // ∂(ak·KL)/∂z = ak·(p_s − p_t)/T
        if (want_grad) gzc.narrow(1, 0, p.mk).add_((ls.exp() - pt) * (wk * (g * p.ak / p.T)).unsqueeze(1));
    }
    if (p.ac != 0) {
        at::Tensor lsc = at::log_softmax(zc, 1);                                      // (C, M)
        s.cand = s.cand - (wc * lsc.select(1, 0)).sum();
        if (want_grad) {
            at::Tensor gc = lsc.exp_();
            gc.select(1, 0).sub_(1.0);
            gzc.add_(gc * (wc * (g * p.ac)).unsqueeze(1));
        }
    }
    at::Tensor dh;
    if (p.dense_full) {
        full_ce_rows(Z, p.y.narrow(0, r0, C), wf, g * p.af, want_grad, s.full);
        if (want_grad) {
            Z.scatter_add_(1, cand, gzc);               // duplicates in cand add up, as they should
            at::Tensor gZ = Z.to(p.cd);                 // (C, V)
            dh = at::matmul(gZ, Wc);                    // (C, H)
            if (dW) dW->add_(at::matmul(gZ.t(), hc).to(dW->scalar_type()));
        }
        return dh;
    }
    if (want_grad) {
        at::Tensor gzd = gzc.to(p.cd);
        dh = at::bmm(gzd.unsqueeze(1), Wg).squeeze(1);  // (C, H)
        if (dW) dW->index_add_(0, cand.reshape({-1}), (gzc.unsqueeze(2) * hc.to(p.acc).unsqueeze(1)).reshape({C * M, H}));
    }
    if (p.af != 0) {
        // Sparse full CE (legacy: one row per sequence): full logits of those rows only.
        at::Tensor rows = (wf != 0).nonzero().squeeze(1);   // (R)
        if (rows.numel() > 0) {
            at::Tensor hr = hc.index_select(0, rows);                    // (R, H)
            at::Tensor Zr = at::matmul(hr, Wc.t()).to(p.acc);           // (R, V)
            full_ce_rows(Zr, p.y.narrow(0, r0, C).index_select(0, rows), wf.index_select(0, rows), g * p.af,
                         want_grad, s.full);
            if (want_grad) {
                at::Tensor gZ = Zr.to(p.cd);
                dh.index_add_(0, rows, at::matmul(gZ, Wc));
                if (dW) dW->add_(at::matmul(gZ.t(), hr).to(dW->scalar_type()));
            }
        }
    }
    return dh;
}

Sums sums_zero(const KDPrep & p) {
    at::Tensor z = at::zeros({}, at::TensorOptions().dtype(p.acc).device(p.h.device()));
    return {z, z, z};
}

// Gradients are computed in the forward pass when autograd will need them (the loss is a scalar, so
// dL/dh and dL/dW for an upstream gradient g are g times the ones for g = 1): each chunk's logits are
// formed once, never recomputed, and backward only scales. Kept: dh (N, H) and dW (V, H) when W trains.
struct KDFunction : public torch::autograd::Function<KDFunction> {
    // h (N, H), W (V, H); returns {loss (0-dim), parts (3) = [T²·KL, CE_cand, CE_full]}.
    static variable_list forward(AutogradContext * ctx, at::Tensor h, at::Tensor W, std::shared_ptr<KDPrep> p) {
        at::Tensor Wc = W.to(p->cd);
        Sums s = sums_zero(*p);
        const int64_t N = p->h.size(0);
        const bool need_h = p->grad_h, need_W = p->grad_W, want = need_h || need_W;
        at::Tensor dh_all, dW;
        if (need_h) dh_all = at::empty_like(p->h);
        if (need_W) dW = at::zeros(W.sizes(), W.options().dtype(p->acc));
        for (int64_t r0 = 0; r0 < N; r0 += p->chunk) {
            const int64_t C = std::min(p->chunk, N - r0);
            at::Tensor dh = chunk_run(*p, Wc, r0, C, s, want, 1.0, need_W ? &dW : nullptr);
            if (need_h) dh_all.narrow(0, r0, C).copy_(dh);
        }
        at::Tensor kl = s.kl * (p->T * p->T);
        at::Tensor loss = s.kl * p->ak + s.cand * p->ac + s.full * p->af;
        at::Tensor parts = at::stack({kl, s.cand, s.full});
        ctx->saved_data["dh"] = dh_all;
        ctx->saved_data["dW"] = need_W ? dW.to(W.scalar_type()) : at::Tensor();
        ctx->mark_non_differentiable({parts});
        return {loss, parts};
    }

    static variable_list backward(AutogradContext * ctx, variable_list grads) {
        at::Tensor dh = ctx->saved_data["dh"].toTensor(), dW = ctx->saved_data["dW"].toTensor();
        ctx->saved_data.clear();   // one backward: free them now
        if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
        const at::Tensor & g = grads[0];
        return {ctx->needs_input_grad(0) && dh.defined() ? dh * g.to(dh.scalar_type()) : at::Tensor(),
                ctx->needs_input_grad(1) && dW.defined() ? dW * g.to(dW.scalar_type()) : at::Tensor(),
                at::Tensor()};
    }
};

KDResult result_from(at::Tensor loss, const at::Tensor & parts, const KDPrep & p) {
    KDResult r;
    at::Tensor pc = parts.to(at::kCPU, at::kDouble);
    auto a = pc.accessor<double, 1>();
    r.loss = std::move(loss);
    if (p.ak != 0) r.kl = a[0];
    if (p.ac != 0) r.cand_ce = a[1];
    if (p.af != 0) r.full_ce = a[2];
    return r;
}

} // namespace

KDResult kd_loss_fused(const at::Tensor & h, const at::Tensor & W, const KDBatch & batch, const KDOptions & opt) {
    auto p = std::make_shared<KDPrep>(kd_prepare(h, W, batch, opt));
    // The flattened h keeps h's autograd history: apply on the view (N, H), not on h itself.
    at::Tensor hf = p->h;
    p->h = hf.detach();
    const bool grad = at::GradMode::is_enabled();
    p->grad_h = grad && hf.requires_grad();
    p->grad_W = grad && W.requires_grad();
    variable_list out = KDFunction::apply(hf, W, p);
    return result_from(out[0], out[1], *p);
}

// -- unfused reference ----------------------------------------------------------------------

KDResult kd_loss_reference(const at::Tensor & h, const at::Tensor & W, const KDBatch & batch, const KDOptions & opt) {
    KDPrep p = kd_prepare(h, W, batch, opt);
    const int64_t N = p.h.size(0), M = p.cand.size(1), H = p.h.size(1);
    at::Tensor hc = p.h.to(p.cd), Wc = W.to(p.cd);
    // Candidate logits as the seed does: gather W rows (N, M, H), then a batched dot product.
    at::Tensor zc = at::bmm(Wc.index_select(0, p.cand.reshape({-1})).view({N, M, H}), hc.unsqueeze(2))
                        .squeeze(2).to(p.acc);   // (N, M)
    at::Tensor zero = at::zeros({}, at::TensorOptions().dtype(p.acc).device(p.h.device()));
    at::Tensor kl = zero, cand = zero, full = zero;
    if (p.ak != 0) {
        at::Tensor ls = at::log_softmax(zc.narrow(1, 0, p.mk) / p.T, 1);
        at::Tensor lt = at::log_softmax(p.tk / p.T, 1);
        kl = (p.wk * (lt.exp() * (lt - ls)).sum(1)).sum();
    }
    if (p.ac != 0) cand = -(p.wc * at::log_softmax(zc, 1).select(1, 0)).sum();
    if (p.af != 0) {
        at::Tensor Z = at::matmul(hc, Wc.t()).to(p.acc);   // (N, V)
        at::Tensor ce = at::logsumexp(Z, 1) - Z.gather(1, p.y.unsqueeze(1)).squeeze(1);
        full = (p.wf * ce).sum();
    }
    at::Tensor loss = kl * p.ak + cand * p.ac + full * p.af;
    at::Tensor parts = at::stack({kl * (p.T * p.T), cand, full}).detach();
    return result_from(loss, parts, p);
}

// -- evaluate_kd_loss --------------------------------------------------------------------------

KDEvalResult kd_evaluate(const KDHiddenFn & hidden, const at::Tensor & W, const KDBatchFn & next, int64_t n,
                         double temperature) {
    at::NoGradGuard no_grad;
    KDOptions o;
    o.temperature = temperature;
    o.hard_top1 = o.hard_full = 0.0;   // docs/formulas.md §6: pure T²·KL
    o.sampled_ce = 0.0;
    KDEvalResult r;
    double sum = 0;
    KDBatch b;
    while (r.examples < n && next(b)) {
        if (!b.input_ids.defined()) fail("input_ids", "missing");
        if (!b.topk_idx.defined()) fail("topk_idx", "missing");
        if (b.input_ids.dim() != 2) fail("input_ids", "expected (B, L), got " + shape_str(b.input_ids));
        for (int64_t i = 0; i < b.input_ids.size(0) && r.examples < n; i++) {
            KDBatch e;   // one example, B = 1
            auto row = [&](const at::Tensor & t) { return t.defined() ? t.narrow(0, i, 1) : at::Tensor(); };
            e.topk_idx = row(b.topk_idx);
            e.topk_logits = row(b.topk_logits);
            at::Tensor ids = row(b.input_ids).to(W.device(), at::kLong);
            at::Tensor mask = row(b.attention_mask);
            if (mask.defined() && (mask != 0).all().item<bool>()) mask = at::Tensor();   // docs/formulas.md §6: all ones → None
            if (mask.defined()) mask = mask.to(W.device());
            at::Tensor h = hidden(ids, mask);   // (1, L, H)
            sum += kd_loss_fused(h, W, e, o).loss.item<double>();
            r.examples++;
        }
    }
    if (r.examples > 0) r.kd_loss = sum / (double)r.examples;
    return r;
}

} // namespace qatlab
