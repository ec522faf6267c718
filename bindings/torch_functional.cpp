// torch_functional: `require 'torch.nn.functional'`, PyTorch's torch.nn.functional for Lua scripts:
// losses, linear/embedding, norms, dropout, activations, attention, one_hot, pad, normalize.
#include "bindings/bind.h"
#include "lib/logging.h"
#include "lib/tensor_print.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <cmath>
#include <optional>

namespace qatlab {
namespace {

// -- argument helpers -----------------------------------------------------------------------
// Labels follow Args: "argument #n (name)" for a parameter that may be positional, "option
// 'name'" for a keyword-only one, so errors read the same as those raised by Args itself.

std::string label(int pos, const char * name) {
    char b[96];
    if (pos > 0) snprintf(b, sizeof b, "argument #%d (%s)", pos, name);
    else snprintf(b, sizeof b, "option '%s'", name);
    return b;
}

std::string shape_str(at::IntArrayRef s) {
    std::string r = "(";
    for (size_t i = 0; i < s.size(); i++) r += (i ? ", " : "") + std::to_string(s[i]);
    if (s.size() == 1) r += ",";
    return r + ")";
}

std::optional<at::Tensor> opt(const at::Tensor * t) {
    return t ? std::optional<at::Tensor>(*t) : std::nullopt;
}

void check_floating(const at::Tensor & t, int pos, const char * name) {
    if (!at::isFloatingType(t.scalar_type()))
        bind_fail("%s: expected a floating-point Tensor, got %s", label(pos, name).c_str(),
                  dtype_name(t.scalar_type(), true).c_str());
}

// reduction = 'none' | 'mean' | 'sum' (| 'batchmean' where allowed, reported through *batchmean).
int64_t reduction_arg(Args & a, bool * batchmean = nullptr) {
    std::string r = a.opt_string(0, "reduction", "mean");
    if (batchmean) *batchmean = r == "batchmean";
    if (r == "mean" || (batchmean && *batchmean)) return at::Reduction::Mean;
    if (r == "sum") return at::Reduction::Sum;
    if (r == "none") return at::Reduction::None;
    bind_fail("option 'reduction': expected 'none', 'mean'%s or 'sum', got '%s'", batchmean ? ", 'batchmean'" : "",
              r.c_str());
}

// A list of integers (negative allowed: pad sizes) given as a table, or one number when `number_ok`.
std::vector<int64_t> int_list(Args & a, int pos, const char * name, bool number_ok) {
    int idx = a.find(pos, name);
    std::vector<int64_t> out;
    if (idx && number_ok && lua_type(a.L, idx) == LUA_TNUMBER) {
        out.push_back(a.integer(pos, name));
        return out;
    }
    if (!idx || lua_type(a.L, idx) != LUA_TTABLE)
        bind_fail("%s: expected a table of integers%s, got %s", label(pos, name).c_str(), number_ok ? " or a number" : "",
                  idx ? luaL_typename(a.L, idx) : "nothing");
    int n = (int)lua_objlen(a.L, idx);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(a.L, idx, i);
        double v = lua_tonumber(a.L, -1);
        bool ok = lua_type(a.L, -1) == LUA_TNUMBER && std::floor(v) == v && std::fabs(v) < 9.2e18;
        lua_pop(a.L, 1);
        if (!ok) bind_fail("%s: entry %d is not an integer", label(pos, name).c_str(), i);
        out.push_back((int64_t)v);
    }
    return out;
}

// Differently shaped input and target broadcast silently into a wrong loss ((N, 1) against (N,)
// gives (N, N)); PyTorch warns, so does qatlab, once per function.
void warn_broadcast(bool & warned, const char * fn, const at::Tensor & input, const at::Tensor & target) {
    if (warned || input.sizes() == target.sizes()) return;
    warned = true;
    log_write(LOG_WARN, std::string(fn) + ": target size " + shape_str(target.sizes()) + " differs from input size " +
                            shape_str(input.sizes()) + "; they broadcast, which is likely not what was meant");
}

// Class-index targets: int64 (or uint8, as ATen) of the input's shape less the class dim (dim 2,
// or dim 1 of an unbatched (C,) input). With probs_ok a floating target of the input's own shape
// holds class probabilities instead.
void check_class_target(const at::Tensor & input, const at::Tensor & target, bool probs_ok) {
    if (input.dim() < 1) bind_fail("argument #1 (input): expected (N, C, ...) or (C,) scores, got a 0-dim Tensor");
    if (at::isFloatingType(target.scalar_type())) {
        if (probs_ok && target.sizes() == input.sizes()) return;
        bind_fail("argument #2 (target): class indices must be int64 (make them with {dtype = 'int64'} or :long()), "
                  "got %s of shape %s%s",
                  dtype_name(target.scalar_type(), true).c_str(), shape_str(target.sizes()).c_str(),
                  probs_ok ? "; a floating-point target holds class probabilities and needs the input's shape" : "");
    }
    if (target.scalar_type() != at::kLong && target.scalar_type() != at::kByte)
        bind_fail("argument #2 (target): class indices must be int64, got %s (convert with :long())",
                  dtype_name(target.scalar_type(), true).c_str());
    std::vector<int64_t> want = input.sizes().vec();
    want.erase(want.begin() + (input.dim() == 1 ? 0 : 1));
    if (target.sizes() != at::IntArrayRef(want))
        bind_fail("argument #2 (target): expected shape %s for an input of shape %s (the class dim removed), got %s",
                  shape_str(want).c_str(), shape_str(input.sizes()).c_str(), shape_str(target.sizes()).c_str());
}

// -- losses -------------------------------------------------------------------------------------

int f_cross_entropy(lua_State * L) {
    Args a(L);
    at::Tensor & input = a.tensor(1, "input");
    at::Tensor & target = a.tensor(2, "target");
    at::Tensor * weight = a.opt_tensor(3, "weight");
    int64_t ignore = a.opt_integer(0, "ignore_index", -100);
    int64_t red = reduction_arg(a);
    double ls = a.opt_number(0, "label_smoothing", 0.0);
    a.finish();
    check_floating(input, 1, "input");
    check_class_target(input, target, true);
    if (!(ls >= 0 && ls <= 1)) bind_fail("option 'label_smoothing': expected a number in [0, 1], got %g", ls);
    tensor_push(L, at::cross_entropy_loss(input, target, opt(weight), red, ignore, ls));
    return 1;
}

int f_nll_loss(lua_State * L) {
    Args a(L);
    at::Tensor & input = a.tensor(1, "input");
    at::Tensor & target = a.tensor(2, "target");
    at::Tensor * weight = a.opt_tensor(3, "weight");
    int64_t ignore = a.opt_integer(0, "ignore_index", -100);
    int64_t red = reduction_arg(a);
    a.finish();
    check_floating(input, 1, "input");
    check_class_target(input, target, false);
    tensor_push(L, at::nll_loss_nd(input, target, opt(weight), red, ignore));
    return 1;
}

// mse_loss / l1_loss: an optional elementwise weight of the input's shape; 'mean' is then the
// weighted mean (sum of weighted errors / sum of weights), as PyTorch computes it.
int f_pointwise_loss(lua_State * L, bool squared) {
    static bool warned[2];
    Args a(L);
    at::Tensor & input = a.tensor(1, "input");
    at::Tensor & target = a.tensor(2, "target");
    int64_t red = reduction_arg(a);
    at::Tensor * weight = a.opt_tensor(0, "weight");
    a.finish();
    check_floating(input, 1, "input");
    warn_broadcast(warned[squared], squared ? "F.mse_loss" : "F.l1_loss", input, target);
    auto bt = at::broadcast_tensors({input, target});
    if (!weight) {
        tensor_push(L, squared ? at::mse_loss(bt[0], bt[1], red) : at::l1_loss(bt[0], bt[1], red));
        return 1;
    }
    if (weight->sizes() != input.sizes())
        bind_fail("option 'weight': expected the input's shape %s, got %s", shape_str(input.sizes()).c_str(),
                  shape_str(weight->sizes()).c_str());
    at::Tensor d = bt[0] - bt[1];
    at::Tensor e = (squared ? d.pow(2) : d.abs()) * *weight;
    tensor_push(L, red == at::Reduction::None ? e : red == at::Reduction::Sum ? e.sum() : e.sum() / weight->sum());
    return 1;
}
int f_mse_loss(lua_State * L) { return f_pointwise_loss(L, true); }
int f_l1_loss(lua_State * L) { return f_pointwise_loss(L, false); }

int f_smooth_l1_loss(lua_State * L) {
    static bool warned;
    Args a(L);
    at::Tensor & input = a.tensor(1, "input");
    at::Tensor & target = a.tensor(2, "target");
    int64_t red = reduction_arg(a);
    double beta = a.opt_number(0, "beta", 1.0);
    a.finish();
    check_floating(input, 1, "input");
    if (!(beta >= 0)) bind_fail("option 'beta': expected a non-negative number, got %g", beta);
    warn_broadcast(warned, "F.smooth_l1_loss", input, target);
    auto bt = at::broadcast_tensors({input, target});
    // beta = 0 is the L1 loss; PyTorch routes it there too (the smooth form would divide by 0)
    tensor_push(L, beta == 0 ? at::l1_loss(bt[0], bt[1], red) : at::smooth_l1_loss(bt[0], bt[1], red, beta));
    return 1;
}

int f_kl_div(lua_State * L) {
    Args a(L);
    at::Tensor & input = a.tensor(1, "input");
    at::Tensor & target = a.tensor(2, "target");
    bool batchmean = false;
    int64_t red = reduction_arg(a, &batchmean);
    bool log_target = a.opt_bool(0, "log_target", false);
    a.finish();
    check_floating(input, 1, "input");
    if (batchmean) {  // the KL divergence per sample: the sum over everything / batch size
        at::Tensor s = at::kl_div(input, target, at::Reduction::Sum, log_target);
        tensor_push(L, input.dim() == 0 ? s : s / input.size(0));
        return 1;
    }
    tensor_push(L, at::kl_div(input, target, red, log_target));
    return 1;
}

void check_same_size(const at::Tensor & input, const at::Tensor & target) {
    if (input.sizes() != target.sizes())
        bind_fail("argument #2 (target): expected the input's shape %s, got %s", shape_str(input.sizes()).c_str(),
                  shape_str(target.sizes()).c_str());
}

int f_binary_cross_entropy(lua_State * L) {
    Args a(L);
    at::Tensor & input = a.tensor(1, "input");
    at::Tensor & target = a.tensor(2, "target");
    at::Tensor * weight = a.opt_tensor(3, "weight");
    int64_t red = reduction_arg(a);
    a.finish();
    check_floating(input, 1, "input");
    check_same_size(input, target);
    std::optional<at::Tensor> w;
    if (weight) {  // broadcast to the target's shape, as PyTorch does before calling ATen
        std::vector<int64_t> s = at::infer_size(target.sizes(), weight->sizes());
        if (at::IntArrayRef(s) != target.sizes())
            bind_fail("argument #3 (weight): shape %s does not broadcast to the target's shape %s",
                      shape_str(weight->sizes()).c_str(), shape_str(target.sizes()).c_str());
        w = weight->expand(s);
    }
    tensor_push(L, at::binary_cross_entropy(input, target, w, red));
    return 1;
}

int f_binary_cross_entropy_with_logits(lua_State * L) {
    Args a(L);
    at::Tensor & input = a.tensor(1, "input");
    at::Tensor & target = a.tensor(2, "target");
    at::Tensor * weight = a.opt_tensor(3, "weight");
    int64_t red = reduction_arg(a);
    at::Tensor * pos_weight = a.opt_tensor(0, "pos_weight");
    a.finish();
    check_floating(input, 1, "input");
    check_same_size(input, target);
    tensor_push(L, at::binary_cross_entropy_with_logits(input, target, opt(weight), opt(pos_weight), red));
    return 1;
}

// -- linear and embedding ---------------------------------------------------------------------

int f_linear(lua_State * L) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    at::Tensor & w = a.tensor(2, "weight");
    at::Tensor * b = a.opt_tensor(3, "bias");
    a.finish();
    if (w.dim() != 1 && w.dim() != 2)
        bind_fail("argument #2 (weight): expected (out_features, in_features), got shape %s", shape_str(w.sizes()).c_str());
    if (x.dim() == 0 || x.size(-1) != w.size(-1))
        bind_fail("argument #2 (weight): shape %s does not fit an input of shape %s (in_features must be its last size)",
                  shape_str(w.sizes()).c_str(), shape_str(x.sizes()).c_str());
    tensor_push(L, at::linear(x, w, opt(b)));
    return 1;
}

int f_embedding(lua_State * L) {
    Args a(L);
    at::Tensor & ids = a.tensor(1, "input");
    at::Tensor & w = a.tensor(2, "weight");
    bool has_pad = a.has(0, "padding_idx");
    int64_t pad = has_pad ? a.integer(0, "padding_idx") : -1;
    bool has_max = a.has(0, "max_norm");
    double max_norm = has_max ? a.number(0, "max_norm") : 0;
    double norm_type = a.opt_number(0, "norm_type", 2.0);
    bool by_freq = a.opt_bool(0, "scale_grad_by_freq", false);
    a.finish();
    if (ids.scalar_type() != at::kLong && ids.scalar_type() != at::kInt)
        bind_fail("argument #1 (input): token ids must be int64 or int32 (0-based), got %s (make them with "
                  "{dtype = 'int64'} or :long())", dtype_name(ids.scalar_type(), true).c_str());
    if (w.dim() != 2) bind_fail("argument #2 (weight): expected (num_embeddings, embedding_dim), got shape %s",
                                shape_str(w.sizes()).c_str());
    int64_t n = w.size(0);
    if (has_pad) {  // a token id: 0-based data, negative counts from the end as in PyTorch
        if (pad >= n || pad < -n)
            bind_fail("option 'padding_idx': %lld is not a row of a weight with %lld embeddings (0-based)",
                      (long long)pad, (long long)n);
        if (pad < 0) pad += n;
    }
    if (has_max) {  // rows looked up are renormed in place, outside autograd, as PyTorch does
        c10::NoGradGuard no_grad;
        at::embedding_renorm_(w, ids.contiguous(), max_norm, norm_type);
    }
    tensor_push(L, at::embedding(w, ids, pad, by_freq, false));
    return 1;
}

// -- normalization ----------------------------------------------------------------------------

std::vector<int64_t> normalized_shape_arg(Args & a, const at::Tensor & x) {
    std::vector<int64_t> s = int_list(a, 2, "normalized_shape", true);
    bool ok = s.size() <= (size_t)x.dim();
    for (size_t i = 0; ok && i < s.size(); i++) ok = s[i] == x.size(x.dim() - (int64_t)s.size() + (int64_t)i);
    if (!ok)
        bind_fail("argument #2 (normalized_shape): %s is not the trailing shape of an input of shape %s",
                  shape_str(s).c_str(), shape_str(x.sizes()).c_str());
    return s;
}

int f_layer_norm(lua_State * L) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    std::vector<int64_t> s = normalized_shape_arg(a, x);
    at::Tensor * w = a.opt_tensor(3, "weight");
    at::Tensor * b = a.opt_tensor(4, "bias");
    double eps = a.opt_number(5, "eps", 1e-5);
    a.finish();
    tensor_push(L, at::layer_norm(x, s, opt(w), opt(b), eps));
    return 1;
}

int f_rms_norm(lua_State * L) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    std::vector<int64_t> s = normalized_shape_arg(a, x);
    at::Tensor * w = a.opt_tensor(3, "weight");
    std::optional<double> eps;  // none: the dtype's machine epsilon, as PyTorch
    if (a.has(4, "eps")) eps = a.number(4, "eps");
    a.finish();
    tensor_push(L, at::rms_norm(x, s, opt(w), eps));
    return 1;
}

int f_normalize(lua_State * L) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    double p = a.opt_number(2, "p", 2.0);
    int64_t d = a.opt_dim(3, "dim", x.dim(), dim_wrap(2, x.dim()));  // PyTorch's dim=1
    double eps = a.opt_number(4, "eps", 1e-12);
    a.finish();
    at::Tensor denom = at::norm(x, p, {d}, true).clamp_min(eps).expand_as(x);
    tensor_push(L, x / denom);
    return 1;
}

int f_cosine_similarity(lua_State * L) {
    Args a(L);
    at::Tensor & x1 = a.tensor(1, "x1");
    at::Tensor & x2 = a.tensor(2, "x2");
    int64_t nd = std::max(x1.dim(), x2.dim());
    int64_t d = a.opt_dim(3, "dim", nd, dim_wrap(2, nd));  // PyTorch's dim=1
    double eps = a.opt_number(4, "eps", 1e-8);
    a.finish();
    tensor_push(L, at::cosine_similarity(x1, x2, d, eps));
    return 1;
}

// -- dropout and activations -------------------------------------------------------------------

int f_dropout(lua_State * L) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    double p = a.opt_number(2, "p", 0.5);
    bool training = a.opt_bool(3, "training", true);
    bool inplace = a.opt_bool(4, "inplace", false);
    a.finish();
    if (!(p >= 0 && p <= 1)) bind_fail("argument #2 (p): expected a probability in [0, 1], got %g", p);
    if (inplace) {
        at::dropout_(x, p, training);
        lua_settop(L, 1);
        return 1;
    }
    tensor_push(L, at::dropout(x, p, training));
    return 1;
}

int f_softmax_like(lua_State * L, bool log) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    if (!a.has(2, "dim")) bind_fail("argument #2 (dim) is required (1-based, -1 for the last)");
    int64_t d = a.dim(2, "dim", x.dim());
    at::ScalarType dt;
    std::optional<at::ScalarType> dtype;
    if (a.opt_dtype(0, "dtype", dt)) dtype = dt;
    a.finish();
    tensor_push(L, log ? at::log_softmax(x, d, dtype) : at::softmax(x, d, dtype));
    return 1;
}
int f_softmax(lua_State * L) { return f_softmax_like(L, false); }
int f_log_softmax(lua_State * L) { return f_softmax_like(L, true); }

// relu/silu(input, {inplace=false}): in place returns the input itself.
int f_activation(lua_State * L, at::Tensor (*fn)(const at::Tensor &), at::Tensor & (*fn_)(at::Tensor &)) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    bool inplace = a.opt_bool(2, "inplace", false);
    a.finish();
    if (inplace) {
        fn_(x);
        lua_settop(L, 1);
        return 1;
    }
    tensor_push(L, fn(x));
    return 1;
}
int f_relu(lua_State * L) { return f_activation(L, at::relu, at::relu_); }
int f_silu(lua_State * L) { return f_activation(L, at::silu, at::silu_); }

int f_gelu(lua_State * L) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    std::string approx = a.opt_string(0, "approximate", "none");
    a.finish();
    if (approx != "none" && approx != "tanh")
        bind_fail("option 'approximate': expected 'none' or 'tanh', got '%s'", approx.c_str());
    tensor_push(L, at::gelu(x, approx));
    return 1;
}

int f_softplus(lua_State * L) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    double beta = a.opt_number(2, "beta", 1.0);
    double threshold = a.opt_number(3, "threshold", 20.0);
    a.finish();
    tensor_push(L, at::softplus(x, beta, threshold));
    return 1;
}

// -- attention -----------------------------------------------------------------------------------

int f_scaled_dot_product_attention(lua_State * L) {
    Args a(L);
    at::Tensor & q = a.tensor(1, "query");
    at::Tensor & k = a.tensor(2, "key");
    at::Tensor & v = a.tensor(3, "value");
    at::Tensor * mask = a.opt_tensor(4, "attn_mask");
    double dropout_p = a.opt_number(5, "dropout_p", 0.0);
    bool causal = a.opt_bool(6, "is_causal", false);
    std::optional<double> scale;
    if (a.has(7, "scale")) scale = a.number(7, "scale");
    bool gqa = a.opt_bool(0, "enable_gqa", false);
    a.finish();
    const char * names[] = {"query", "key", "value"};
    const at::Tensor * qkv[] = {&q, &k, &v};
    for (int i = 0; i < 3; i++)
        if (qkv[i]->dim() < 2)
            bind_fail("argument #%d (%s): expected (..., L, E), got shape %s", i + 1, names[i],
                      shape_str(qkv[i]->sizes()).c_str());
    if (k.size(-1) != q.size(-1))
        bind_fail("argument #2 (key): last size %lld differs from the query's %lld", (long long)k.size(-1),
                  (long long)q.size(-1));
    if (v.size(-2) != k.size(-2))
        bind_fail("argument #3 (value): %lld positions, but the key has %lld", (long long)v.size(-2),
                  (long long)k.size(-2));
    if (q.dim() >= 3 && k.dim() >= 3 && q.size(-3) != k.size(-3)) {
        if (!gqa)
            bind_fail("argument #2 (key): %lld heads for %lld query heads; grouped-query attention needs "
                      "{enable_gqa = true}", (long long)k.size(-3), (long long)q.size(-3));
        if (q.size(-3) % k.size(-3) != 0)
            bind_fail("argument #2 (key): %lld query heads are not a multiple of %lld key heads",
                      (long long)q.size(-3), (long long)k.size(-3));
    }
    if (mask && causal)
        bind_fail("options attn_mask and is_causal cannot both be given: fold the causal mask into attn_mask");
    if (mask && mask->scalar_type() != at::kBool && mask->scalar_type() != q.scalar_type())
        bind_fail("argument #4 (attn_mask): expected a bool mask (true = attend) or additive %s, got %s",
                  dtype_name(q.scalar_type(), true).c_str(), dtype_name(mask->scalar_type(), true).c_str());
    if (!(dropout_p >= 0 && dropout_p <= 1))
        bind_fail("argument #5 (dropout_p): expected a probability in [0, 1], got %g", dropout_p);
    tensor_push(L, at::scaled_dot_product_attention(q, k, v, opt(mask), dropout_p, causal, scale, gqa));
    return 1;
}

// -- one_hot and pad --------------------------------------------------------------------------------

int f_one_hot(lua_State * L) {
    Args a(L);
    at::Tensor & t = a.tensor(1, "input");
    int64_t n = a.opt_integer(2, "num_classes", -1);
    a.finish();
    if (t.scalar_type() != at::kLong)
        bind_fail("argument #1 (input): class indices must be int64 (0-based), got %s (convert with :long())",
                  dtype_name(t.scalar_type(), true).c_str());
    if (n < -1) bind_fail("argument #2 (num_classes): expected a positive count (or -1: max + 1), got %lld", (long long)n);
    tensor_push(L, at::one_hot(t, n));
    return 1;
}

int f_pad(lua_State * L) {
    Args a(L);
    at::Tensor & x = a.tensor(1, "input");
    std::vector<int64_t> pad = int_list(a, 2, "pad", false);
    std::string mode = a.opt_string(3, "mode", "constant");
    std::optional<double> value;
    if (a.has(4, "value")) value = a.number(4, "value");
    a.finish();
    if (pad.size() % 2 != 0)
        bind_fail("argument #2 (pad): expected pairs (left, right) from the last dim backwards, got %zu entries",
                  pad.size());
    if ((int64_t)pad.size() / 2 > x.dim())
        bind_fail("argument #2 (pad): %zu pairs for an input of %lld dims", pad.size() / 2, (long long)x.dim());
    if (mode != "constant" && mode != "reflect" && mode != "replicate" && mode != "circular")
        bind_fail("argument #3 (mode): expected 'constant', 'reflect', 'replicate' or 'circular', got '%s'",
                  mode.c_str());
    if (value && mode != "constant")
        bind_fail("argument #4 (value): only mode 'constant' takes a value, the mode is '%s'", mode.c_str());
    tensor_push(L, at::pad(x, pad, mode, value));
    return 1;
}

const BindFn fns[] = {
    {"cross_entropy", f_cross_entropy},
    {"nll_loss", f_nll_loss},
    {"mse_loss", f_mse_loss},
    {"l1_loss", f_l1_loss},
    {"smooth_l1_loss", f_smooth_l1_loss},
    {"kl_div", f_kl_div},
    {"binary_cross_entropy", f_binary_cross_entropy},
    {"binary_cross_entropy_with_logits", f_binary_cross_entropy_with_logits},
    {"linear", f_linear},
    {"embedding", f_embedding},
    {"layer_norm", f_layer_norm},
    {"rms_norm", f_rms_norm},
    {"normalize", f_normalize},
    {"cosine_similarity", f_cosine_similarity},
    {"dropout", f_dropout},
    {"softmax", f_softmax},
    {"log_softmax", f_log_softmax},
    {"relu", f_relu},
    {"silu", f_silu},
    {"gelu", f_gelu},
    {"softplus", f_softplus},
    {"scaled_dot_product_attention", f_scaled_dot_product_attention},
    {"one_hot", f_one_hot},
    {"pad", f_pad},
    {nullptr, nullptr},
};

} // namespace

int luaopen_torch_nn_functional(lua_State * L) {
    lua_newtable(L);
    bind_register(L, -1, "F.", fns);
    return 1;
}

} // namespace qatlab
