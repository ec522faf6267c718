// torch_ops: the tensor operations reachable both as torch.f(t, ...) and as t:f(...):
// elementwise math, reductions, shape and view ops, indexing. PyTorch names and semantics.
#include "bindings/bind.h"

#include <ATen/ATen.h>
#include <cmath>

namespace qatlab {
namespace {

// Arguments are read with Args; position 1 is always the tensor (self).
#define SELF(a) at::Tensor & self = (a).tensor(1, "input")

// -- elementwise unary ------------------------------------------------------------------

#define UNARY(name)                                   \
    int op_##name(lua_State * L) {                    \
        Args a(L);                                    \
        SELF(a);                                      \
        a.finish();                                   \
        tensor_push(L, at::name(self));               \
        return 1;                                     \
    }                                                 \
    int op_##name##_(lua_State * L) {                 \
        Args a(L);                                    \
        SELF(a);                                      \
        a.finish();                                   \
        self.name##_();                               \
        lua_settop(L, 1);                             \
        return 1;                                     \
    }

UNARY(neg) UNARY(abs) UNARY(exp) UNARY(log) UNARY(sqrt) UNARY(rsqrt) UNARY(sin) UNARY(cos)
UNARY(tanh) UNARY(sigmoid) UNARY(relu) UNARY(sign) UNARY(floor) UNARY(ceil) UNARY(trunc)
UNARY(log1p) UNARY(expm1) UNARY(reciprocal) UNARY(square) UNARY(erf) UNARY(log2) UNARY(exp2)
UNARY(tan) UNARY(atan) UNARY(frac) UNARY(logical_not)

int op_silu(lua_State * L) { Args a(L); SELF(a); a.finish(); tensor_push(L, at::silu(self)); return 1; }
int op_silu_(lua_State * L) { Args a(L); SELF(a); a.finish(); at::silu_(self); lua_settop(L, 1); return 1; }

int op_gelu(lua_State * L) {
    Args a(L);
    SELF(a);
    std::string approx = a.opt_string(2, "approximate", "none");
    a.finish();
    tensor_push(L, at::gelu(self, approx));
    return 1;
}

int op_round(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t decimals = a.opt_integer(2, "decimals", 0);
    a.finish();
    tensor_push(L, decimals ? at::round(self, decimals) : at::round(self));
    return 1;
}
int op_round_(lua_State * L) { Args a(L); SELF(a); a.finish(); at::round_(self); lua_settop(L, 1); return 1; }

int op_nan_to_num(lua_State * L) {
    Args a(L);
    SELF(a);
    double nan = a.opt_number(2, "nan", 0.0);
    std::optional<double> pos, neg;
    if (a.has(3, "posinf")) pos = a.number(3, "posinf");
    if (a.has(4, "neginf")) neg = a.number(4, "neginf");
    a.finish();
    tensor_push(L, at::nan_to_num(self, nan, pos, neg));
    return 1;
}

// -- elementwise binary (tensor or number on the right) --------------------------------
// Numbers become wrapped 0-dim tensors, so type promotion is PyTorch's (int tensor + 2.5
// is float, float16 tensor * 2 stays float16).

static std::string shape_str(const at::Tensor & t) {
    std::string s = "(";
    for (int64_t i = 0; i < t.dim(); i++) s += (i ? ", " : "") + std::to_string(t.size(i));
    if (t.dim() == 1) s += ",";
    return s + ")";
}

static at::Tensor generic_operand(lua_State * L, int idx, const at::Tensor & self) {
    return tensor_or_scalar(L, idx, &self);
}
} // namespace
// A number wrapped in self's dtype where promotion gives that dtype anyway (bindings/bind_core.cpp):
// for add, sub, mul and div only.
at::Tensor arith_operand(lua_State * L, int idx, const at::Tensor & like);
namespace {

// Plain-words checks before ATen: the most common mistakes of scripts.
static void check_same_device(const at::Tensor & x, const at::Tensor & y) {
    if (x.device() != y.device() && x.dim() > 0 && y.dim() > 0)
        bind_fail("tensors are on different devices (%s and %s): move one with :to{device=...}",
                  x.device().str().c_str(), y.device().str().c_str());
}

#define BINARY_WITH(name, expr, inplace_expr, read)                    \
    int op_##name(lua_State * L) {                                      \
        Args a(L);                                                      \
        SELF(a);                                                        \
        at::Tensor other = read(L, a.find(2, "other") ? a.find(2, "other") : 2, self); \
        check_same_device(self, other);                                 \
        a.finish();                                                     \
        tensor_push(L, expr);                                           \
        return 1;                                                       \
    }                                                                   \
    int op_##name##_(lua_State * L) {                                   \
        Args a(L);                                                      \
        SELF(a);                                                        \
        at::Tensor other = read(L, a.find(2, "other") ? a.find(2, "other") : 2, self); \
        check_same_device(self, other);                                 \
        a.finish();                                                     \
        inplace_expr;                                                   \
        lua_settop(L, 1);                                               \
        return 1;                                                       \
    }

#define BINARY(name, expr, inplace_expr) BINARY_WITH(name, expr, inplace_expr, generic_operand)

BINARY_WITH(mul, at::mul(self, other), self.mul_(other), arith_operand)
BINARY(pow, at::pow(self, other), self.pow_(other))
BINARY(maximum, at::maximum(self, other), self.copy_(at::maximum(self, other)))
BINARY(minimum, at::minimum(self, other), self.copy_(at::minimum(self, other)))
BINARY(remainder, at::remainder(self, other), self.remainder_(other))
BINARY(fmod, at::fmod(self, other), self.fmod_(other))
BINARY(atan2, at::atan2(self, other), self.atan2_(other))
BINARY(eq, at::eq(self, other), self.eq_(other))
BINARY(ne, at::ne(self, other), self.ne_(other))
BINARY(lt, at::lt(self, other), self.lt_(other))
BINARY(le, at::le(self, other), self.le_(other))
BINARY(gt, at::gt(self, other), self.gt_(other))
BINARY(ge, at::ge(self, other), self.ge_(other))
BINARY(logical_and, at::logical_and(self, other), self.logical_and_(other))
BINARY(logical_or, at::logical_or(self, other), self.logical_or_(other))
BINARY(logical_xor, at::logical_xor(self, other), self.logical_xor_(other))

// add/sub take alpha; div takes rounding_mode.
int op_addsub(lua_State * L, bool sub, bool inplace) {
    Args a(L);
    SELF(a);
    int oi = a.find(2, "other");
    at::Tensor other = arith_operand(L, oi ? oi : 2, self);
    check_same_device(self, other);
    c10::Scalar alpha = a.has(3, "alpha") ? a.scalar(3, "alpha") : c10::Scalar(1);
    a.finish();
    if (inplace) {
        sub ? self.sub_(other, alpha) : self.add_(other, alpha);
        lua_settop(L, 1);
    } else {
        tensor_push(L, sub ? at::sub(self, other, alpha) : at::add(self, other, alpha));
    }
    return 1;
}
int op_add(lua_State * L) { return op_addsub(L, false, false); }
int op_add_(lua_State * L) { return op_addsub(L, false, true); }
int op_sub(lua_State * L) { return op_addsub(L, true, false); }
int op_sub_(lua_State * L) { return op_addsub(L, true, true); }

int op_divide(lua_State * L, bool inplace) {
    Args a(L);
    SELF(a);
    int oi = a.find(2, "other");
    at::Tensor other = arith_operand(L, oi ? oi : 2, self);
    check_same_device(self, other);
    std::optional<c10::string_view> mode;
    std::string m = a.opt_string(3, "rounding_mode", "");
    if (!m.empty()) {
        if (m != "trunc" && m != "floor") bind_fail("rounding_mode: expected 'trunc' or 'floor', got '%s'", m.c_str());
        mode = m;
    }
    a.finish();
    if (inplace) {
        self.div_(other, mode);
        lua_settop(L, 1);
    } else {
        tensor_push(L, at::div(self, other, mode));
    }
    return 1;
}
int op_div(lua_State * L) { return op_divide(L, false); }
int op_div_(lua_State * L) { return op_divide(L, true); }

int op_clamp(lua_State * L, bool inplace) {
    Args a(L);
    SELF(a);
    std::optional<c10::Scalar> lo, hi;
    if (a.has(2, "min")) lo = a.scalar(2, "min");
    if (a.has(3, "max")) hi = a.scalar(3, "max");
    a.finish();
    if (!lo && !hi) bind_fail("at least one of min or max must be given");
    if (inplace) {
        at::clamp_(self, lo, hi);
        lua_settop(L, 1);
    } else {
        tensor_push(L, at::clamp(self, lo, hi));
    }
    return 1;
}
int op_clamp_nb(lua_State * L) { return op_clamp(L, false); }
int op_clamp_ib(lua_State * L) { return op_clamp(L, true); }

int op_lerp(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & end = a.tensor(2, "end");
    int wi = a.find(3, "weight");
    if (!wi) bind_fail("argument #3 (weight): expected a number or Tensor");
    at::Tensor * wt = tensor_test(L, wi);
    a.finish();
    tensor_push(L, wt ? at::lerp(self, end, *wt) : at::lerp(self, end, scalar_from_lua(L, wi)));
    return 1;
}

// -- matrix products ------------------------------------------------------------------------

int op_matmul(lua_State * L) {
    at::Tensor * ps = nullptr, * po = nullptr;
    if (lua_gettop(L) == 2) {  // t:matmul(u): two tensors, read without Args
        ps = tensor_test(L, 1);
        po = tensor_test(L, 2);
        if (!ps || !po || !ps->defined() || !po->defined()) ps = po = nullptr;
    }
    if (!ps) {
        Args a(L);
        ps = &a.tensor(1, "input");
        po = &a.tensor(2, "other");
        a.finish();
    }
    at::Tensor & self = *ps, & other = *po;
    check_same_device(self, other);
    if (self.dim() == 0 || other.dim() == 0)
        bind_fail("both arguments need at least 1 dimension, got shapes %s and %s",
                  shape_str(self).c_str(), shape_str(other).c_str());
    int64_t k1 = self.size(-1);
    int64_t k2 = other.dim() == 1 ? other.size(0) : other.size(-2);
    if (k1 != k2)
        bind_fail("shapes %s and %s cannot be multiplied (%lld != %lld)", shape_str(self).c_str(),
                  shape_str(other).c_str(), (long long)k1, (long long)k2);
    if (self.scalar_type() != other.scalar_type())
        bind_fail("dtypes differ (%s and %s): convert one with :to{dtype=...}",
                  c10::toString(self.scalar_type()), c10::toString(other.scalar_type()));
    tensor_push(L, at::matmul(self, other));
    return 1;
}

int op_bmm(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & other = a.tensor(2, "mat2");
    a.finish();
    check_same_device(self, other);
    tensor_push(L, at::bmm(self, other));
    return 1;
}

int op_mm(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & other = a.tensor(2, "mat2");
    a.finish();
    check_same_device(self, other);
    tensor_push(L, at::mm(self, other));
    return 1;
}

int op_outer(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & other = a.tensor(2, "vec2");
    a.finish();
    tensor_push(L, at::outer(self, other));
    return 1;
}

int op_dot(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & other = a.tensor(2, "other");
    a.finish();
    tensor_push(L, at::dot(self, other));
    return 1;
}

// -- reductions -------------------------------------------------------------------------------

// sum/mean/prod/amax/amin/logsumexp share (dim or dims, keepdim, dtype).
enum Red { RED_SUM, RED_MEAN, RED_PROD, RED_AMAX, RED_AMIN, RED_LOGSUMEXP, RED_ALL, RED_ANY };

int op_reduce(lua_State * L, Red kind) {
    Args a(L);
    SELF(a);
    bool has_dim = a.has(2, "dim");
    std::vector<int64_t> dims = has_dim ? a.dims(2, "dim", self.dim()) : std::vector<int64_t>{};
    bool keepdim = a.opt_bool(3, "keepdim", false);
    at::ScalarType dt;
    std::optional<at::ScalarType> dtype;
    if (kind <= RED_PROD && a.opt_dtype(4, "dtype", dt)) dtype = dt;
    a.finish();
    at::Tensor r;
    switch (kind) {
    case RED_SUM: r = has_dim ? at::sum(self, dims, keepdim, dtype) : at::sum(self, dtype); break;
    case RED_MEAN:
        if (!at::isFloatingType(self.scalar_type()) && !dtype)
            bind_fail("mean needs a floating-point tensor, got %s: convert with :float() or pass {dtype='float32'}",
                      c10::toString(self.scalar_type()));
        r = has_dim ? at::mean(self, dims, keepdim, dtype) : at::mean(self, dtype);
        break;
    case RED_PROD:
        if (has_dim && dims.size() != 1) bind_fail("prod takes one dim, got %zu", dims.size());
        r = has_dim ? at::prod(self, dims[0], keepdim, dtype) : at::prod(self, dtype);
        break;
    case RED_AMAX: r = at::amax(self, dims, keepdim); break;
    case RED_AMIN: r = at::amin(self, dims, keepdim); break;
    case RED_LOGSUMEXP:
        if (!has_dim) {
            for (int64_t i = 0; i < self.dim(); i++) dims.push_back(i);
        }
        r = at::logsumexp(self, dims, keepdim);
        break;
    case RED_ALL:
        r = has_dim ? at::all(self, at::OptionalIntArrayRef(dims), keepdim) : at::all(self);
        break;
    case RED_ANY:
        r = has_dim ? at::any(self, at::OptionalIntArrayRef(dims), keepdim) : at::any(self);
        break;
    }
    tensor_push(L, r);
    return 1;
}
int op_sum(lua_State * L) {
    if (lua_gettop(L) == 1) {  // t:sum(): no arguments to read
        at::Tensor * t = tensor_test(L, 1);
        if (t && t->defined()) {
            tensor_push(L, at::sum(*t));
            return 1;
        }
    }
    return op_reduce(L, RED_SUM);
}
int op_mean(lua_State * L) { return op_reduce(L, RED_MEAN); }
int op_prod(lua_State * L) { return op_reduce(L, RED_PROD); }
int op_amax(lua_State * L) { return op_reduce(L, RED_AMAX); }
int op_amin(lua_State * L) { return op_reduce(L, RED_AMIN); }
int op_logsumexp(lua_State * L) { return op_reduce(L, RED_LOGSUMEXP); }
int op_all(lua_State * L) { return op_reduce(L, RED_ALL); }
int op_any(lua_State * L) { return op_reduce(L, RED_ANY); }

// max/min: without dim the single value; with dim (values, indices) as two results;
// with a tensor as second argument the elementwise maximum (as torch.max(a, b)).
int op_maxmin(lua_State * L, bool is_max) {
    Args a(L);
    SELF(a);
    int i2 = a.find(2, "dim");
    if (i2 && tensor_test(L, i2)) {
        at::Tensor & other = *tensor_test(L, i2);
        a.finish();
        tensor_push(L, is_max ? at::maximum(self, other) : at::minimum(self, other));
        return 1;
    }
    if (!i2) {
        a.finish();
        tensor_push(L, is_max ? at::max(self) : at::min(self));
        return 1;
    }
    int64_t d = a.dim(2, "dim", self.dim());
    bool keepdim = a.opt_bool(3, "keepdim", false);
    a.finish();
    auto r = is_max ? at::max(self, d, keepdim) : at::min(self, d, keepdim);
    tensor_push(L, std::get<0>(r));
    tensor_push(L, std::get<1>(r));
    return 2;
}
int op_max(lua_State * L) { return op_maxmin(L, true); }
int op_min(lua_State * L) { return op_maxmin(L, false); }

int op_argmaxmin(lua_State * L, bool is_max) {
    Args a(L);
    SELF(a);
    std::optional<int64_t> d;
    if (a.has(2, "dim")) d = a.dim(2, "dim", self.dim());
    bool keepdim = a.opt_bool(3, "keepdim", false);
    a.finish();
    tensor_push(L, is_max ? at::argmax(self, d, keepdim) : at::argmin(self, d, keepdim));
    return 1;
}
int op_argmax(lua_State * L) { return op_argmaxmin(L, true); }
int op_argmin(lua_State * L) { return op_argmaxmin(L, false); }

// var/std: correction (default 1, Bessel) or unbiased=false.
int op_varstd(lua_State * L, bool is_std) {
    Args a(L);
    SELF(a);
    bool has_dim = a.has(2, "dim");
    std::vector<int64_t> dims = has_dim ? a.dims(2, "dim", self.dim()) : std::vector<int64_t>{};
    double corr = 1.0;
    if (a.has(0, "unbiased")) corr = a.opt_bool(0, "unbiased", true) ? 1.0 : 0.0;
    corr = a.opt_number(0, "correction", corr);
    bool keepdim = a.opt_bool(3, "keepdim", false);
    a.finish();
    at::OptionalIntArrayRef od = has_dim ? at::OptionalIntArrayRef(dims) : std::nullopt;
    tensor_push(L, is_std ? at::std(self, od, c10::Scalar(corr), keepdim)
                          : at::var(self, od, c10::Scalar(corr), keepdim));
    return 1;
}
int op_var(lua_State * L) { return op_varstd(L, false); }
int op_std(lua_State * L) { return op_varstd(L, true); }

int op_norm(lua_State * L) {
    Args a(L);
    SELF(a);
    int pi = a.find(2, "p");
    c10::Scalar p = 2;
    if (pi && lua_type(L, pi) == LUA_TSTRING) {
        std::string s = lua_tostring(L, pi);
        if (s == "fro") p = 2;
        else if (s == "inf") p = INFINITY;
        else bind_fail("p: expected a number, 'fro' or 'inf', got '%s'", s.c_str());
    } else if (pi) {
        p = c10::Scalar(lua_tonumber(L, pi));
    }
    bool has_dim = a.has(3, "dim");
    std::vector<int64_t> dims = has_dim ? a.dims(3, "dim", self.dim()) : std::vector<int64_t>{};
    bool keepdim = a.opt_bool(4, "keepdim", false);
    a.finish();
    tensor_push(L, has_dim ? at::norm(self, p, dims, keepdim) : at::norm(self, p));
    return 1;
}

// softmax family: dim is required (PyTorch warns when it is implicit).
int op_softmax_like(lua_State * L, int kind) {
    Args a(L);
    SELF(a);
    if (!a.has(2, "dim")) bind_fail("argument #2 (dim) is required");
    int64_t d = a.dim(2, "dim", self.dim());
    at::ScalarType dt;
    std::optional<at::ScalarType> dtype;
    if (kind != 2 && a.opt_dtype(3, "dtype", dt)) dtype = dt;
    a.finish();
    at::Tensor r = kind == 0 ? at::softmax(self, d, dtype) : kind == 1 ? at::log_softmax(self, d, dtype)
                                                                       : at::cumsum(self, d);
    tensor_push(L, r);
    return 1;
}
int op_softmax(lua_State * L) { return op_softmax_like(L, 0); }
int op_log_softmax(lua_State * L) { return op_softmax_like(L, 1); }
int op_cumsum(lua_State * L) { return op_softmax_like(L, 2); }

int op_cumprod(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.dim(2, "dim", self.dim());
    a.finish();
    tensor_push(L, at::cumprod(self, d));
    return 1;
}

int op_topk(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t k = a.integer(2, "k");
    int64_t d = a.opt_dim(3, "dim", self.dim(), std::max<int64_t>(self.dim() - 1, 0));
    bool largest = a.opt_bool(4, "largest", true);
    bool sorted = a.opt_bool(5, "sorted", true);
    a.finish();
    int64_t n = self.dim() == 0 ? 1 : self.size(d);
    if (k < 0 || k > n) bind_fail("k = %lld is out of range for a dimension of size %lld", (long long)k, (long long)n);
    auto r = at::topk(self, k, d, largest, sorted);
    tensor_push(L, std::get<0>(r));
    tensor_push(L, std::get<1>(r));
    return 2;
}

int op_sort(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.opt_dim(2, "dim", self.dim(), std::max<int64_t>(self.dim() - 1, 0));
    bool desc = a.opt_bool(3, "descending", false);
    bool stable = a.opt_bool(0, "stable", false);
    a.finish();
    auto r = at::sort(self, stable, d, desc);
    tensor_push(L, std::get<0>(r));
    tensor_push(L, std::get<1>(r));
    return 2;
}

int op_argsort(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.opt_dim(2, "dim", self.dim(), std::max<int64_t>(self.dim() - 1, 0));
    bool desc = a.opt_bool(3, "descending", false);
    a.finish();
    tensor_push(L, at::argsort(self, d, desc));
    return 1;
}

// -- shape and views -------------------------------------------------------------------------

int op_view(lua_State * L) {
    Args a(L);
    SELF(a);
    int i2 = a.find(2, "size");
    if (i2 && lua_type(L, i2) == LUA_TSTRING) {  // t:view('float16'): reinterpret the bytes
        at::ScalarType dt = dtype_parse(lua_tostring(L, i2));
        a.finish();
        tensor_push(L, self.view(dt));
        return 1;
    }
    std::vector<int64_t> s = a.sizes(2, "size");
    tensor_push(L, self.view(s));
    return 1;
}

int op_reshape(lua_State * L) {
    Args a(L);
    SELF(a);
    std::vector<int64_t> s = a.sizes(2, "shape");
    tensor_push(L, at::reshape(self, s));
    return 1;
}

int op_permute(lua_State * L) {
    Args a(L);
    SELF(a);
    std::vector<int64_t> d;
    int i2 = a.find(2, "dims");
    if (i2 && lua_type(L, i2) == LUA_TTABLE) {
        d = a.dims(2, "dims", self.dim());
    } else {
        for (int p = 2; p <= a.npos(); p++) d.push_back(a.dim(p, nullptr, self.dim()));
    }
    if ((int64_t)d.size() != self.dim())
        bind_fail("expected %lld dims for a tensor of shape %s, got %zu", (long long)self.dim(),
                  shape_str(self).c_str(), d.size());
    tensor_push(L, self.permute(d));
    return 1;
}

int op_transpose(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d0 = a.dim(2, "dim0", self.dim()), d1 = a.dim(3, "dim1", self.dim());
    a.finish();
    tensor_push(L, self.transpose(d0, d1));
    return 1;
}

int op_t(lua_State * L) {
    Args a(L);
    SELF(a);
    a.finish();
    tensor_push(L, self.t());
    return 1;
}

int op_squeeze(lua_State * L) {
    Args a(L);
    SELF(a);
    bool has = a.has(2, "dim");
    std::vector<int64_t> d = has ? a.dims(2, "dim", self.dim()) : std::vector<int64_t>{};
    a.finish();
    tensor_push(L, has ? self.squeeze(d) : self.squeeze());
    return 1;
}

int op_unsqueeze(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t n = self.dim() + 1, d = a.integer(2, "dim");
    if (d != 0 && (d > n || d < -n))  // say the tensor's own dims, not n
        bind_fail("dim %lld out of range to unsqueeze a tensor of %lld dims (expected 1..%lld or -%lld..-1)",
                  (long long)d, (long long)self.dim(), (long long)n, (long long)n);
    d = dim_wrap(d, n);
    a.finish();
    tensor_push(L, self.unsqueeze(d));
    return 1;
}

int op_flatten(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t s = a.opt_dim(2, "start_dim", self.dim(), 0);
    int64_t e = a.opt_dim(3, "end_dim", self.dim(), -1);
    a.finish();
    tensor_push(L, self.flatten(s, e));
    return 1;
}

int op_unflatten(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.dim(2, "dim", self.dim());
    std::vector<int64_t> s = a.sizes(3, "sizes");
    a.finish();
    tensor_push(L, self.unflatten(d, s));
    return 1;
}

int op_expand(lua_State * L) {
    Args a(L);
    SELF(a);
    std::vector<int64_t> s = a.sizes(2, "size");
    tensor_push(L, self.expand(s));
    return 1;
}

int op_expand_as(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & o = a.tensor(2, "other");
    a.finish();
    tensor_push(L, self.expand_as(o));
    return 1;
}

int op_repeat(lua_State * L) {
    Args a(L);
    SELF(a);
    std::vector<int64_t> s = a.sizes(2, "repeats");
    tensor_push(L, self.repeat(s));
    return 1;
}

// `repeat` is a Lua keyword, so t:tile(...) (PyTorch's tile) is the readable spelling.
int op_tile(lua_State * L) {
    Args a(L);
    SELF(a);
    std::vector<int64_t> s = a.sizes(2, "dims");
    tensor_push(L, at::tile(self, s));
    return 1;
}

int op_contiguous(lua_State * L) {
    Args a(L);
    SELF(a);
    a.finish();
    tensor_push(L, self.contiguous());
    return 1;
}

int op_clone(lua_State * L) {
    Args a(L);
    SELF(a);
    a.finish();
    tensor_push(L, self.clone());
    return 1;
}

// narrow(dim, start, length): start is 1-based (negative from the end).
int op_narrow(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.dim(2, "dim", self.dim());
    int64_t n = self.size(d);
    int64_t start = a.integer(3, "start");
    int64_t len = a.integer(4, "length");
    a.finish();
    int64_t s0 = start >= 1 ? start - 1 : start < 0 ? n + start : -1;
    if (s0 < 0 || s0 > n) bind_fail("start %lld is out of range for dim %lld of size %lld (1-based)",
                                    (long long)start, (long long)d + 1, (long long)n);
    if (len < 0 || s0 + len > n)
        bind_fail("start %lld + length %lld exceeds dim %lld of size %lld", (long long)start,
                  (long long)len, (long long)d + 1, (long long)n);
    tensor_push(L, self.narrow(d, s0, len));
    return 1;
}

// select(dim, index): index is 1-based (negative from the end).
int op_select(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.dim(2, "dim", self.dim());
    int64_t i = a.integer(3, "index");
    a.finish();
    if (self.dim() == 0) bind_fail("cannot select from a 0-dim tensor");
    int64_t n = self.size(d);
    int64_t i0 = i >= 1 ? i - 1 : i < 0 ? n + i : -1;
    if (i0 < 0 || i0 >= n) bind_fail("index %lld is out of range for dim %lld of size %lld (1-based)",
                                     (long long)i, (long long)d + 1, (long long)n);
    tensor_push(L, self.select(d, i0));
    return 1;
}

int push_list(lua_State * L, const std::vector<at::Tensor> & ts) {
    lua_createtable(L, (int)ts.size(), 0);
    for (size_t i = 0; i < ts.size(); i++) {
        tensor_push(L, ts[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

int op_chunk(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t n = a.integer(2, "chunks");
    int64_t d = a.opt_dim(3, "dim", self.dim(), 0);
    a.finish();
    if (n < 1) bind_fail("chunks must be at least 1, got %lld", (long long)n);
    return push_list(L, self.chunk(n, d));
}

int op_split(lua_State * L) {
    Args a(L);
    SELF(a);
    int i2 = a.find(2, "split_size");
    int64_t d = a.opt_dim(3, "dim", self.dim(), 0);
    if (i2 && lua_type(L, i2) == LUA_TTABLE) {
        std::vector<int64_t> s = a.sizes(2, "split_size");
        a.finish();
        return push_list(L, self.split_with_sizes(s, d));
    }
    int64_t s = a.integer(2, "split_size");
    a.finish();
    if (s < 1) bind_fail("split_size must be at least 1, got %lld", (long long)s);
    return push_list(L, self.split(s, d));
}

int op_unbind(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.opt_dim(2, "dim", self.dim(), 0);
    a.finish();
    return push_list(L, self.unbind(d));
}

int op_tril_triu(lua_State * L, bool lower) {
    Args a(L);
    SELF(a);
    int64_t k = a.opt_integer(2, "diagonal", 0);
    a.finish();
    tensor_push(L, lower ? at::tril(self, k) : at::triu(self, k));
    return 1;
}
int op_tril(lua_State * L) { return op_tril_triu(L, true); }
int op_triu(lua_State * L) { return op_tril_triu(L, false); }

int op_flip(lua_State * L) {
    Args a(L);
    SELF(a);
    std::vector<int64_t> d = a.dims(2, "dims", self.dim());
    a.finish();
    tensor_push(L, at::flip(self, d));
    return 1;
}

int op_roll(lua_State * L) {
    Args a(L);
    SELF(a);
    // shifts may be negative, so they are read as plain integers (not as sizes)
    std::vector<int64_t> shifts;
    int si = a.find(2, "shifts");
    if (si && lua_type(L, si) == LUA_TTABLE) {
        for (int i = 1; i <= (int)lua_objlen(L, si); i++) {
            lua_rawgeti(L, si, i);
            double v = lua_tonumber(L, -1);
            if (lua_type(L, -1) != LUA_TNUMBER || std::floor(v) != v || std::fabs(v) >= 9.2e18)
                bind_fail("shifts: entry %d is not an integer", i);
            shifts.push_back((int64_t)v);
            lua_pop(L, 1);
        }
    } else {
        shifts.push_back(a.integer(2, "shifts"));
    }
    std::vector<int64_t> d = a.has(3, "dims") ? a.dims(3, "dims", self.dim()) : std::vector<int64_t>{};
    a.finish();
    tensor_push(L, at::roll(self, shifts, d));
    return 1;
}

// -- indexing (index data is 0-based, as ATen's) ---------------------------------------

int op_index_select(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.dim(2, "dim", self.dim());
    at::Tensor & idx = a.tensor(3, "index");
    a.finish();
    tensor_push(L, at::index_select(self, d, idx));
    return 1;
}

int op_gather(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.dim(2, "dim", self.dim());
    at::Tensor & idx = a.tensor(3, "index");
    a.finish();
    tensor_push(L, at::gather(self, d, idx));
    return 1;
}

// scatter(dim, index, src or value, {reduce=}) and scatter_add(dim, index, src).
int op_scatter_impl(lua_State * L, bool add, bool inplace) {
    Args a(L);
    SELF(a);
    int64_t d = a.dim(2, "dim", self.dim());
    at::Tensor & idx = a.tensor(3, "index");
    int si = a.find(4, "src");
    if (!si) si = a.find(4, "value");
    if (!si) bind_fail("argument #4 (src or value) is required");
    at::Tensor * src = tensor_test(L, si);
    std::string reduce = add ? "" : a.opt_string(5, "reduce", "");
    a.finish();
    at::Tensor target = inplace ? self : self.clone();
    if (add) {
        if (!src) bind_fail("scatter_add needs a Tensor src");
        target.scatter_add_(d, idx, *src);
    } else if (src) {
        reduce.empty() ? target.scatter_(d, idx, *src) : target.scatter_(d, idx, *src, reduce);
    } else {
        c10::Scalar v = scalar_from_lua(L, si);
        reduce.empty() ? target.scatter_(d, idx, v) : target.scatter_(d, idx, v, reduce);
    }
    if (inplace) {
        lua_settop(L, 1);
    } else {
        tensor_push(L, target);
    }
    return 1;
}
int op_scatter(lua_State * L) { return op_scatter_impl(L, false, false); }
int op_scatter_(lua_State * L) { return op_scatter_impl(L, false, true); }
int op_scatter_add(lua_State * L) { return op_scatter_impl(L, true, false); }
int op_scatter_add_(lua_State * L) { return op_scatter_impl(L, true, true); }

int op_masked_fill_impl(lua_State * L, bool inplace) {
    Args a(L);
    SELF(a);
    at::Tensor & mask = a.tensor(2, "mask");
    int vi = a.find(3, "value");
    if (!vi) bind_fail("argument #3 (value) is required");
    at::Tensor * vt = tensor_test(L, vi);
    a.finish();
    if (mask.scalar_type() != at::kBool)
        bind_fail("mask must be a bool tensor, got %s (compare with :gt(), :eq()... to make one)",
                  c10::toString(mask.scalar_type()));
    if (inplace) {
        vt ? self.masked_fill_(mask, *vt) : self.masked_fill_(mask, scalar_from_lua(L, vi));
        lua_settop(L, 1);
    } else {
        tensor_push(L, vt ? at::masked_fill(self, mask, *vt) : at::masked_fill(self, mask, scalar_from_lua(L, vi)));
    }
    return 1;
}
int op_masked_fill(lua_State * L) { return op_masked_fill_impl(L, false); }
int op_masked_fill_(lua_State * L) { return op_masked_fill_impl(L, true); }

int op_masked_select(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & mask = a.tensor(2, "mask");
    a.finish();
    tensor_push(L, at::masked_select(self, mask));
    return 1;
}

int op_nonzero(lua_State * L) {
    Args a(L);
    SELF(a);
    bool as_tuple = a.opt_bool(0, "as_tuple", false);
    a.finish();
    if (as_tuple) return push_list(L, at::nonzero_numpy(self));
    tensor_push(L, at::nonzero(self));
    return 1;
}

int op_where(lua_State * L) {
    // torch.where(cond, x, y) or cond:where(x, y)? PyTorch's method is x.where(cond, y).
    Args a(L);
    SELF(a);
    if (!a.has(2, nullptr)) {
        a.finish();
        return push_list(L, at::nonzero_numpy(self));
    }
    // Tensor method form x:where(cond, y) is handled by Tensor.where in torch_tensor.cpp;
    // here the function form torch.where(cond, x, y).
    at::Tensor x = tensor_or_scalar(L, a.find(2, "input"), &self);
    at::Tensor y = tensor_or_scalar(L, a.find(3, "other") ? a.find(3, "other") : 3, &x);
    a.finish();
    if (self.scalar_type() != at::kBool)
        bind_fail("condition must be a bool tensor, got %s", c10::toString(self.scalar_type()));
    tensor_push(L, at::where(self, x, y));
    return 1;
}

// floor_divide: here for the BINARY macro; the other statistics ops live in torch_ops_stats.cpp.
BINARY(floor_divide, at::floor_divide(self, other), self.floor_divide_(other))

const BindFn ops[] = {
#define U(n) {#n, op_##n}, {#n "_", op_##n##_},
    U(neg) U(abs) U(exp) U(log) U(sqrt) U(rsqrt) U(sin) U(cos) U(tanh) U(sigmoid) U(relu) U(sign)
    U(floor) U(ceil) U(trunc) U(log1p) U(expm1) U(reciprocal) U(square) U(erf) U(log2) U(exp2)
    U(tan) U(atan) U(frac) U(logical_not) U(silu) U(round)
    U(mul) U(pow) U(maximum) U(minimum) U(remainder) U(fmod) U(atan2) U(eq) U(ne) U(lt) U(le)
    U(gt) U(ge) U(logical_and) U(logical_or) U(logical_xor) U(add) U(sub) U(div)
    U(scatter) U(scatter_add) U(masked_fill) U(floor_divide)
#undef U
    {"gelu", op_gelu}, {"nan_to_num", op_nan_to_num},
    {"clamp", op_clamp_nb}, {"clamp_", op_clamp_ib}, {"clip", op_clamp_nb}, {"clip_", op_clamp_ib},
    {"lerp", op_lerp}, {"multiply", op_mul}, {"divide", op_div}, {"subtract", op_sub},
    {"matmul", op_matmul}, {"bmm", op_bmm}, {"mm", op_mm}, {"outer", op_outer}, {"dot", op_dot},
    {"sum", op_sum}, {"mean", op_mean}, {"prod", op_prod}, {"amax", op_amax}, {"amin", op_amin},
    {"logsumexp", op_logsumexp}, {"all", op_all}, {"any", op_any}, {"max", op_max}, {"min", op_min},
    {"argmax", op_argmax}, {"argmin", op_argmin}, {"var", op_var}, {"std", op_std}, {"norm", op_norm},
    {"softmax", op_softmax}, {"log_softmax", op_log_softmax}, {"cumsum", op_cumsum},
    {"cumprod", op_cumprod}, {"topk", op_topk}, {"sort", op_sort}, {"argsort", op_argsort},
    {"view", op_view}, {"reshape", op_reshape}, {"permute", op_permute}, {"transpose", op_transpose},
    {"t", op_t}, {"squeeze", op_squeeze}, {"unsqueeze", op_unsqueeze}, {"flatten", op_flatten},
    {"unflatten", op_unflatten}, {"expand", op_expand}, {"expand_as", op_expand_as},
    {"repeat", op_repeat}, {"tile", op_tile}, {"contiguous", op_contiguous}, {"clone", op_clone}, {"narrow", op_narrow},
    {"select", op_select}, {"chunk", op_chunk}, {"split", op_split}, {"unbind", op_unbind},
    {"tril", op_tril}, {"triu", op_triu}, {"flip", op_flip}, {"roll", op_roll},
    {"index_select", op_index_select}, {"gather", op_gather}, {"masked_select", op_masked_select},
    {"nonzero", op_nonzero},
    {nullptr, nullptr},
};

const BindFn torch_only[] = {
    {"where", op_where},
    {nullptr, nullptr},
};

} // namespace

// Registers every op as torch.<name> (into table t) and as Tensor method (into methods).
void torch_open_ops_stats(lua_State * L, int t, int methods);

void torch_open_ops(lua_State * L, int t, int methods) {
    torch_open_ops_stats(L, t, methods);
    bind_register(L, t, "torch.", ops);
    bind_register(L, t, "torch.", torch_only);
    bind_register(L, methods, "Tensor.", ops);
}

} // namespace qatlab
