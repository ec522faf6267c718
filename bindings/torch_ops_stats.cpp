// torch_ops_stats: tests, statistics and searching, as torch.f(t, ...) and t:f(...): isnan, isfinite,
// isinf, unique, median, quantile, diag, repeat_interleave, searchsorted, bucketize.
#include "bindings/bind.h"

#include <ATen/ATen.h>
#include <cmath>
#include <string>

namespace qatlab {
namespace {

#define SELF(a) at::Tensor & self = (a).tensor(1, "input")

std::string shape_str(const at::Tensor & t) {
    std::string s = "(";
    for (int64_t i = 0; i < t.dim(); i++) s += (i ? ", " : "") + std::to_string(t.size(i));
    if (t.dim() == 1) s += ",";
    return s + ")";
}

// -- tests, statistics, searching -------------------------------------------------------------

#define PREDICATE(name)                                                                     \
    int op_##name(lua_State * L) { Args a(L); SELF(a); a.finish(); tensor_push(L, at::name(self)); return 1; }
PREDICATE(isnan) PREDICATE(isfinite) PREDICATE(isinf)


// unique: the values, then the inverse indices and the counts when asked for (PyTorch's tuple).
int op_unique(lua_State * L) {
    Args a(L);
    SELF(a);
    bool sorted = a.opt_bool(2, "sorted", true);
    bool inverse = a.opt_bool(3, "return_inverse", false);
    bool counts = a.opt_bool(4, "return_counts", false);
    bool has_dim = a.has(5, "dim");
    int64_t d = has_dim ? a.dim(5, "dim", self.dim()) : 0;
    a.finish();
    auto r = has_dim ? at::unique_dim(self, d, sorted, inverse, counts) : at::_unique2(self, sorted, inverse, counts);
    tensor_push(L, std::get<0>(r));
    if (inverse) tensor_push(L, std::get<1>(r));
    if (counts) tensor_push(L, std::get<2>(r));
    return 1 + inverse + counts;
}

// median: without dim the lower median of all values; with dim (values, indices).
int op_median(lua_State * L) {
    Args a(L);
    SELF(a);
    if (!a.has(2, "dim")) {
        a.finish();
        tensor_push(L, at::median(self));
        return 1;
    }
    int64_t d = a.dim(2, "dim", self.dim());
    bool keepdim = a.opt_bool(3, "keepdim", false);
    a.finish();
    auto r = at::median(self, d, keepdim);
    tensor_push(L, std::get<0>(r));
    tensor_push(L, std::get<1>(r));
    return 2;
}

int op_quantile(lua_State * L) {
    Args a(L);
    SELF(a);
    int qi = a.find(2, "q");
    at::Tensor * qt = qi ? tensor_test(L, qi) : nullptr;
    if (!qt && (!qi || lua_type(L, qi) != LUA_TNUMBER))
        bind_fail("argument #2 (q): expected a number or Tensor, got %s", qi ? luaL_typename(L, qi) : "nothing");
    double q = qt ? 0 : lua_tonumber(L, qi);
    std::optional<int64_t> d;
    if (a.has(3, "dim")) d = a.dim(3, "dim", self.dim());
    bool keepdim = a.opt_bool(4, "keepdim", false);
    std::string interp = a.opt_string(5, "interpolation", "linear");
    a.finish();
    if (interp != "linear" && interp != "lower" && interp != "higher" && interp != "midpoint" && interp != "nearest")
        bind_fail("argument #5 (interpolation): expected 'linear', 'lower', 'higher', 'midpoint' or 'nearest', got '%s'",
                  interp.c_str());
    if (!qt && !(q >= 0 && q <= 1)) bind_fail("argument #2 (q): expected a number in [0, 1], got %g", q);
    tensor_push(L, qt ? at::quantile(self, *qt, d, keepdim, interp) : at::quantile(self, q, d, keepdim, interp));
    return 1;
}

int op_diag(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t k = a.opt_integer(2, "diagonal", 0);  // an offset (0: main, > 0 above), not a position
    a.finish();
    if (self.dim() != 1 && self.dim() != 2)
        bind_fail("argument #1 (input): expected a 1-D or 2-D Tensor, got shape %s", shape_str(self).c_str());
    tensor_push(L, at::diag(self, k));
    return 1;
}

// repeat_interleave(t, repeats, {dim=, output_size=}); torch.repeat_interleave(counts) alone
// repeats each index i counts[i] times, as PyTorch's one-argument form.
int op_repeat_interleave(lua_State * L) {
    Args a(L);
    SELF(a);
    int ri = a.find(2, "repeats");
    at::Tensor * rt = ri ? tensor_test(L, ri) : nullptr;
    int64_t rn = ri && !rt ? a.integer(2, "repeats") : 0;
    std::optional<int64_t> d, out_size;
    if (a.has(3, "dim")) d = a.dim(3, "dim", self.dim());
    if (a.has(0, "output_size")) out_size = a.integer(0, "output_size");
    a.finish();
    if (!ri) {
        if (d) bind_fail("argument #2 (repeats): expected a number or Tensor with dim given, got nothing");
        tensor_push(L, at::repeat_interleave(self, out_size));
    } else {
        if (!rt && rn < 0) bind_fail("argument #2 (repeats): expected a non-negative count, got %lld", (long long)rn);
        tensor_push(L, rt ? at::repeat_interleave(self, *rt, d, out_size) : at::repeat_interleave(self, rn, d, out_size));
    }
    return 1;
}

// searchsorted and bucketize return 0-based positions (data), int64 or int32 with out_int32.
int op_searchsorted(lua_State * L) {
    Args a(L);
    at::Tensor & seq = a.tensor(1, "sorted_sequence");
    int vi = a.find(2, "input");
    at::Tensor * vt = vi ? tensor_test(L, vi) : nullptr;
    if (!vt && (!vi || lua_type(L, vi) != LUA_TNUMBER))
        bind_fail("argument #2 (input): expected a Tensor or number, got %s", vi ? luaL_typename(L, vi) : "nothing");
    bool out_int32 = a.opt_bool(0, "out_int32", false);
    bool right = a.opt_bool(0, "right", false);
    std::optional<c10::string_view> side;
    std::string sd = a.opt_string(0, "side", "");
    at::Tensor * sorter = a.opt_tensor(0, "sorter");
    a.finish();
    if (!sd.empty()) {
        if (sd != "left" && sd != "right") bind_fail("option 'side': expected 'left' or 'right', got '%s'", sd.c_str());
        side = sd;
    }
    std::optional<at::Tensor> so = sorter ? std::optional<at::Tensor>(*sorter) : std::nullopt;
    tensor_push(L, vt ? at::searchsorted(seq, *vt, out_int32, right, side, so)
                      : at::searchsorted(seq, scalar_from_lua(L, vi), out_int32, right, side, so));
    return 1;
}

int op_bucketize(lua_State * L) {
    Args a(L);
    int vi = a.find(1, "input");
    at::Tensor * vt = vi ? tensor_test(L, vi) : nullptr;
    if (!vt && (!vi || lua_type(L, vi) != LUA_TNUMBER))
        bind_fail("argument #1 (input): expected a Tensor or number, got %s", vi ? luaL_typename(L, vi) : "nothing");
    at::Tensor & bounds = a.tensor(2, "boundaries");
    bool right = a.opt_bool(0, "right", false);
    bool out_int32 = a.opt_bool(0, "out_int32", false);
    a.finish();
    if (bounds.dim() != 1)
        bind_fail("argument #2 (boundaries): expected a 1-D Tensor, got shape %s", shape_str(bounds).c_str());
    tensor_push(L, vt ? at::bucketize(*vt, bounds, out_int32, right)
                      : at::bucketize(scalar_from_lua(L, vi), bounds, out_int32, right));
    return 1;
}

const BindFn ops[] = {
    {"isnan", op_isnan}, {"isfinite", op_isfinite}, {"isinf", op_isinf}, {"unique", op_unique},
    {"median", op_median}, {"quantile", op_quantile}, {"diag", op_diag},
    {"repeat_interleave", op_repeat_interleave}, {"searchsorted", op_searchsorted}, {"bucketize", op_bucketize},
    {nullptr, nullptr},
};

} // namespace

void torch_open_ops_stats(lua_State * L, int t, int methods) {
    bind_register(L, t, "torch.", ops);
    bind_register(L, methods, "Tensor.", ops);
}

} // namespace qatlab
