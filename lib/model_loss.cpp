// model_loss: next-token cross-entropy of a DecoderModel, fused with the lm_head and chunked over
// positions (logits recomputed in backward), so no (N, V) tensor lives whole.
#include "lib/model.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>

namespace qatlab {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// logits of one chunk (n, V) in float32 (float64 if h or W is), softcap applied.
at::Tensor chunk_logits(const at::Tensor & h, const at::Tensor & W, double cap) {
    at::Tensor z = at::matmul(h, W.t());
    at::ScalarType acc = (h.scalar_type() == at::kDouble || W.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
    z = z.to(acc);
    return cap > 0 ? at::tanh(z / cap) * cap : z;
}

// Per-position CE (N) of h (N, H) against targets (N); ignored positions give 0.
struct ChunkedCE : torch::autograd::Function<ChunkedCE> {
    static at::Tensor forward(AutogradContext * ctx, const at::Tensor & h, const at::Tensor & W, const at::Tensor & y,
                              int64_t ignore_index, int64_t chunk, double cap) {
        const int64_t N = h.size(0);
        at::Tensor valid = y != ignore_index;
        at::Tensor yc = at::where(valid, y, at::zeros_like(y));
        at::ScalarType acc = (h.scalar_type() == at::kDouble || W.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
        at::Tensor out = at::zeros({N}, h.options().dtype(acc));
        for (int64_t s = 0; s < N; s += chunk) {
            int64_t n = std::min(chunk, N - s);
            at::Tensor z = chunk_logits(h.narrow(0, s, n), W, cap);                  // (n, V)
            at::Tensor l = at::logsumexp(z, 1) - z.gather(1, yc.narrow(0, s, n).unsqueeze(1)).squeeze(1);
            out.narrow(0, s, n).copy_(l * valid.narrow(0, s, n));
        }
        ctx->save_for_backward({h, W, yc, valid});
        ctx->saved_data["chunk"] = chunk;
        ctx->saved_data["cap"] = cap;
        return out;
    }
    static variable_list backward(AutogradContext * ctx, variable_list grads) {
        auto sv = ctx->get_saved_variables();
        at::Tensor h = sv[0], W = sv[1], yc = sv[2], valid = sv[3];
        const int64_t chunk = ctx->saved_data["chunk"].toInt();
        const double cap = ctx->saved_data["cap"].toDouble();
        at::Tensor g = grads[0] * valid;                                               // (N)
        const int64_t N = h.size(0);
        const bool need_h = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
        at::Tensor dh = need_h ? at::empty_like(h) : at::Tensor();
        at::Tensor dW = need_w ? at::zeros(W.sizes(), W.options().dtype(g.scalar_type())) : at::Tensor();
        for (int64_t s = 0; s < N; s += chunk) {
            int64_t n = std::min(chunk, N - s);
            at::Tensor hc = h.narrow(0, s, n);
            at::Tensor z = chunk_logits(hc, W, cap);                                   // (n, V)
            at::Tensor dz = at::softmax(z, 1);
            dz.scatter_add_(1, yc.narrow(0, s, n).unsqueeze(1), at::full({n, 1}, -1.0, dz.options()));
            dz.mul_(g.narrow(0, s, n).unsqueeze(1));
            if (cap > 0) dz.mul_(1 - (z / cap).square());                             // d(cap·tanh(u/cap))/du
            if (need_h) dh.narrow(0, s, n).copy_(at::matmul(dz.to(W.scalar_type()), W));
            if (need_w) dW.add_(at::matmul(dz.t(), hc.to(dz.scalar_type())));
        }
        return {dh, need_w ? dW.to(W.scalar_type()) : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

} // namespace

at::Tensor DecoderModel::loss(const at::Tensor & input_ids, const at::Tensor & labels, const at::Tensor & attention_mask,
                              int64_t ignore_index, const std::string & reduction, int64_t chunk) {
    if (reduction != "mean" && reduction != "sum" && reduction != "none")
        throw std::runtime_error("loss: reduction: expected 'mean', 'sum' or 'none', got '" + reduction + "'");
    if (chunk <= 0) throw std::runtime_error("loss: chunk must be positive, got " + std::to_string(chunk));
    if (!input_ids.defined() || input_ids.dim() != 2 || input_ids.size(1) < 2)
        throw std::runtime_error("loss: input_ids: expected (B, T) with T >= 2");
    const int64_t B = input_ids.size(0), T = input_ids.size(1);
    at::Tensor y;
    if (labels.defined()) {
        if (labels.sizes() != input_ids.sizes())
            throw std::runtime_error("loss: labels must be shaped like input_ids (B, T); they are shifted inside");
        if (at::isFloatingType(labels.scalar_type())) throw std::runtime_error("loss: labels must be integers");
        y = labels.to(device()).to(at::kLong);
    } else {
        y = input_ids.to(device()).to(at::kLong);
        // Padding is no target (labels given by the caller say it themselves).
        if (attention_mask.defined())
            y = at::where(attention_mask.to(device()).to(at::kBool), y, at::full_like(y, ignore_index));
    }
    y = y.narrow(1, 1, T - 1).reshape({-1});                                           // (N)
    const int64_t V = cfg_.vocab_size;
    at::Tensor bad = (y != ignore_index) & ((y < 0) | (y >= V));
    if (bad.any().item<bool>())
        throw std::runtime_error("loss: a target id is outside [0, " + std::to_string(V) + ") and is not ignore_index (" +
                                 std::to_string(ignore_index) + ")");
    at::Tensor h = forward(input_ids, attention_mask, {}, ForwardOutput::hidden);        // (B, T, H)
    h = h.narrow(1, 0, T - 1).reshape({B * (T - 1), h.size(2)});                       // (N, H)
    at::Tensor per;
    auto * dense = dynamic_cast<DenseLinear *>(lm_head_.get());
    if (!lm_head_ || (dense && !dense->b.defined())) {
        const at::Tensor & W = lm_head_ ? dense->w : embed_;
        per = ChunkedCE::apply(h, W, y, ignore_index, chunk, cfg_.logit_softcap);
    } else {
        // Another lm_head (quantized, biased, Lua): its own forward per chunk, not fused.
        std::vector<at::Tensor> parts;
        for (int64_t s = 0; s < h.size(0); s += chunk) {
            int64_t n = std::min(chunk, h.size(0) - s);
            at::Tensor z = lm_head(h.narrow(0, s, n)).to(at::kFloat);
            parts.push_back(at::cross_entropy_loss(z, y.narrow(0, s, n), {}, at::Reduction::None, ignore_index));
        }
        per = at::cat(parts);
    }
    if (reduction == "none") return per.view({B, T - 1});
    if (reduction == "sum") return per.sum();
    return per.sum() / (y != ignore_index).sum().to(per.scalar_type());   // NaN when every target is ignored, as PyTorch
}

} // namespace qatlab
