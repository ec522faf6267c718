// torch_tensor: the Tensor userdata seen from Lua: methods that only make sense on a tensor
// (conversions, values out, autograd), properties (t.shape, t.grad), slicing and operators.
#include "bindings/bind.h"
#include "lib/tensor_print.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <cmath>
#include <cstring>

namespace qatlab {
void tensor_set_data(lua_State * L, at::Tensor & t, const at::Tensor & data);  // bind_core.cpp
namespace {

#define SELF(a) at::Tensor & self = (a).tensor(1, "self")

void push_size(lua_State * L, at::IntArrayRef s) {
    lua_createtable(L, (int)s.size(), 0);
    for (size_t i = 0; i < s.size(); i++) {
        lua_pushnumber(L, (lua_Number)s[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    luaL_getmetatable(L, QATLAB_SIZE_MT);
    lua_setmetatable(L, -2);
}

// t:size() → Size table; t:size(d) → number (d 1-based).
int t_size(lua_State * L) {
    Args a(L);
    SELF(a);
    if (a.has(2, "dim")) {
        int64_t d = a.dim(2, "dim", self.dim());
        a.finish();
        if (self.dim() == 0) bind_fail("a 0-dim tensor has no dims");
        lua_pushnumber(L, (lua_Number)self.size(d));
        return 1;
    }
    a.finish();
    push_size(L, self.sizes());
    return 1;
}

int t_stride(lua_State * L) {
    Args a(L);
    SELF(a);
    if (a.has(2, "dim")) {
        int64_t d = a.dim(2, "dim", self.dim());
        lua_pushnumber(L, (lua_Number)self.stride(d));
        return 1;
    }
    push_size(L, self.strides());
    return 1;
}

int t_dim(lua_State * L) { lua_pushnumber(L, (lua_Number)tensor_check(L, 1, "self").dim()); return 1; }
int t_numel(lua_State * L) { lua_pushnumber(L, (lua_Number)tensor_check(L, 1, "self").numel()); return 1; }
int t_element_size(lua_State * L) { lua_pushnumber(L, (lua_Number)tensor_check(L, 1, "self").element_size()); return 1; }
int t_is_contiguous(lua_State * L) { lua_pushboolean(L, tensor_check(L, 1, "self").is_contiguous()); return 1; }
int t_storage_offset(lua_State * L) { lua_pushnumber(L, (lua_Number)tensor_check(L, 1, "self").storage_offset()); return 1; }

void push_scalar(lua_State * L, const at::Tensor & t) {
    if (t.scalar_type() == at::kBool) lua_pushboolean(L, t.item<bool>());
    else if (at::isFloatingType(t.scalar_type())) lua_pushnumber(L, t.item<double>());
    else lua_pushnumber(L, (lua_Number)t.item<int64_t>());
}

int t_item(lua_State * L) {
    Args a(L);
    SELF(a);
    a.finish();
    if (self.numel() != 1)
        bind_fail("only a tensor with one element can be converted to a number, this one has %lld",
                  (long long)self.numel());
    push_scalar(L, self);
    return 1;
}

// Nested tables of numbers (booleans for bool tensors) from a CPU contiguous tensor.
void push_table_rec(lua_State * L, const at::Tensor & t, int64_t d, int64_t & off, const double * v, bool boolean) {
    int64_t n = t.size(d);
    lua_createtable(L, (int)n, 0);
    for (int64_t i = 0; i < n; i++) {
        if (d + 1 == t.dim()) {
            if (boolean) lua_pushboolean(L, v[off] != 0);
            else lua_pushnumber(L, v[off]);
            off++;
        } else {
            push_table_rec(L, t, d + 1, off, v, boolean);
        }
        lua_rawseti(L, -2, (int)i + 1);
    }
}

int t_totable(lua_State * L) {
    Args a(L);
    SELF(a);
    a.finish();
    if (self.dim() == 0) {
        push_scalar(L, self);
        return 1;
    }
    at::Tensor c = self.detach().to(at::kCPU, at::kDouble).contiguous();
    int64_t off = 0;
    lua_checkstack(L, (int)self.dim() + 4);
    push_table_rec(L, c, 0, off, c.data_ptr<double>(), self.scalar_type() == at::kBool);
    return 1;
}

int t_tostring(lua_State * L) {
    at::Tensor * t = tensor_test(L, 1);
    if (!t) bind_fail("expected a Tensor");
    std::string s = tensor_repr(*t);
    lua_pushlstring(L, s.data(), s.size());
    return 1;
}

// -- conversions ---------------------------------------------------------------------------
// to('cuda'), to('float16'), to(other), to{device=, dtype=, non_blocking=, copy=}.
int t_to(lua_State * L) {
    Args a(L);
    SELF(a);
    c10::Device dev = self.device();
    at::ScalarType dt = self.scalar_type();
    int i2 = a.find(2, nullptr);
    if (i2 && lua_type(L, i2) == LUA_TSTRING) {
        const char * s = lua_tostring(L, i2);
        if (strncmp(s, "cuda", 4) == 0 || strncmp(s, "cpu", 3) == 0 || strncmp(s, "meta", 4) == 0) dev = device_parse(s);
        else dt = dtype_parse(s);
        if (a.find(3, nullptr) && lua_type(L, 3) == LUA_TSTRING) dt = dtype_parse(lua_tostring(L, 3));
    } else if (i2 && tensor_test(L, i2)) {
        dev = tensor_test(L, i2)->device();
        dt = tensor_test(L, i2)->scalar_type();
    }
    a.opt_device(0, "device", dev);
    a.opt_dtype(0, "dtype", dt);
    bool nb = a.opt_bool(0, "non_blocking", false);
    bool copy = a.opt_bool(0, "copy", false);
    a.finish();
    at::Tensor r = self.to(dev, dt, nb, copy);
    if (!copy && r.unsafeGetTensorImpl() == self.unsafeGetTensorImpl()) {
        lua_settop(L, 1);  // unchanged: the same object, as PyTorch's .to()
        return 1;
    }
    tensor_push(L, r);
    return 1;
}

int convert_dtype(lua_State * L, at::ScalarType dt) {
    at::Tensor & self = tensor_check(L, 1, "self");
    if (self.scalar_type() == dt) {
        lua_settop(L, 1);
        return 1;
    }
    tensor_push(L, self.to(dt));
    return 1;
}
int t_float(lua_State * L) { return convert_dtype(L, at::kFloat); }
int t_double(lua_State * L) { return convert_dtype(L, at::kDouble); }
int t_half(lua_State * L) { return convert_dtype(L, at::kHalf); }
int t_bfloat16(lua_State * L) { return convert_dtype(L, at::kBFloat16); }
int t_long(lua_State * L) { return convert_dtype(L, at::kLong); }
int t_int(lua_State * L) { return convert_dtype(L, at::kInt); }
int t_short(lua_State * L) { return convert_dtype(L, at::kShort); }
int t_byte(lua_State * L) { return convert_dtype(L, at::kByte); }
int t_char(lua_State * L) { return convert_dtype(L, at::kChar); }
int t_bool(lua_State * L) { return convert_dtype(L, at::kBool); }

int t_type_as(lua_State * L) {
    tensor_check(L, 2, "other");
    return convert_dtype(L, tensor_check(L, 2, "other").scalar_type());
}

int convert_device(lua_State * L, c10::Device dev) {
    at::Tensor & self = tensor_check(L, 1, "self");
    device_check_available(dev);
    if (self.device() == dev) {
        lua_settop(L, 1);
        return 1;
    }
    tensor_push(L, self.to(dev));
    return 1;
}
int t_cpu(lua_State * L) { return convert_device(L, c10::Device(at::kCPU)); }
int t_cuda(lua_State * L) {
    Args a(L);
    int64_t idx = a.opt_integer(2, "device", -1);
    c10::Device dev = idx >= 0 ? c10::Device(at::kCUDA, (c10::DeviceIndex)idx)
                               : (default_device().is_cuda() ? default_device() : c10::Device(at::kCUDA, 0));
    a.finish();
    return convert_device(L, dev);
}

// -- in-place fills --------------------------------------------------------------------------

int t_fill_(lua_State * L) {
    Args a(L);
    SELF(a);
    int vi = a.find(2, "value");
    if (at::Tensor * v = vi ? tensor_test(L, vi) : nullptr) self.fill_(*v);
    else self.fill_(a.scalar(2, "value"));
    a.finish();
    lua_settop(L, 1);
    return 1;
}

int t_zero_(lua_State * L) { tensor_check(L, 1, "self").zero_(); lua_settop(L, 1); return 1; }

int t_copy_(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & src = a.tensor(2, "src");
    bool nb = a.opt_bool(3, "non_blocking", false);
    a.finish();
    self.copy_(src, nb);
    lua_settop(L, 1);
    return 1;
}

int t_normal_(lua_State * L) {
    Args a(L);
    SELF(a);
    double mean = a.opt_number(2, "mean", 0.0), std = a.opt_number(3, "std", 1.0);
    a.finish();
    self.normal_(mean, std);
    lua_settop(L, 1);
    return 1;
}

int t_uniform_(lua_State * L) {
    Args a(L);
    SELF(a);
    double lo = a.opt_number(2, "from", 0.0), hi = a.opt_number(3, "to", 1.0);
    a.finish();
    self.uniform_(lo, hi);
    lua_settop(L, 1);
    return 1;
}

int t_bernoulli_(lua_State * L) {
    Args a(L);
    SELF(a);
    double p = a.opt_number(2, "p", 0.5);
    a.finish();
    self.bernoulli_(p);
    lua_settop(L, 1);
    return 1;
}

int t_index_add_(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.dim(2, "dim", self.dim());
    at::Tensor & idx = a.tensor(3, "index");
    at::Tensor & src = a.tensor(4, "source");
    c10::Scalar alpha = a.has(5, "alpha") ? a.scalar(5, "alpha") : c10::Scalar(1);
    a.finish();
    self.index_add_(d, idx, src, alpha);
    lua_settop(L, 1);
    return 1;
}

int t_index_fill_(lua_State * L) {
    Args a(L);
    SELF(a);
    int64_t d = a.dim(2, "dim", self.dim());
    at::Tensor & idx = a.tensor(3, "index");
    c10::Scalar v = a.scalar(4, "value");
    a.finish();
    self.index_fill_(d, idx, v);
    lua_settop(L, 1);
    return 1;
}

int t_new_filled(lua_State * L, int kind) {
    Args a(L);
    SELF(a);
    std::vector<int64_t> s;
    int si = a.find(2, "size");
    if (si && lua_type(L, si) == LUA_TTABLE) s = a.sizes(2, "size");
    else if (si && kind != 2) s = a.sizes(2, "size");  // new_zeros(2, 3): varargs sizes
    else if (si) s = {a.integer(2, "size")};
    c10::Scalar fill = kind == 2 ? a.scalar(3, "fill_value") : c10::Scalar(kind);
    at::ScalarType dt = self.scalar_type();
    c10::Device dev = self.device();
    a.opt_dtype(0, "dtype", dt);
    a.opt_device(0, "device", dev);
    a.finish();
    tensor_push(L, at::full(s, fill, at::TensorOptions().dtype(dt).device(dev)));
    return 1;
}
int t_new_zeros(lua_State * L) { return t_new_filled(L, 0); }
int t_new_ones(lua_State * L) { return t_new_filled(L, 1); }
int t_new_full(lua_State * L) { return t_new_filled(L, 2); }

// x:where(cond, y): PyTorch's method form (x where cond else y).
int t_where(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & cond = a.tensor(2, "condition");
    at::Tensor other = tensor_or_scalar(L, a.find(3, "other") ? a.find(3, "other") : 3, &self);
    a.finish();
    tensor_push(L, at::where(cond, self, other));
    return 1;
}

int t_equal(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & o = a.tensor(2, "other");
    a.finish();
    lua_pushboolean(L, self.sizes() == o.sizes() && self.scalar_type() == o.scalar_type() && at::equal(self, o));
    return 1;
}

int t_allclose(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & o = a.tensor(2, "other");
    double rtol = a.opt_number(3, "rtol", 1e-5), atol = a.opt_number(4, "atol", 1e-8);
    bool equal_nan = a.opt_bool(5, "equal_nan", false);
    a.finish();
    lua_pushboolean(L, at::allclose(self, o, rtol, atol, equal_nan));
    return 1;
}

int t_isclose(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor & o = a.tensor(2, "other");
    double rtol = a.opt_number(3, "rtol", 1e-5), atol = a.opt_number(4, "atol", 1e-8);
    bool equal_nan = a.opt_bool(5, "equal_nan", false);
    a.finish();
    tensor_push(L, at::isclose(self, o, rtol, atol, equal_nan));
    return 1;
}

// -- autograd ---------------------------------------------------------------------------------

int t_requires_grad_(lua_State * L) {
    Args a(L);
    SELF(a);
    bool b = a.opt_bool(2, "requires_grad", true);
    a.finish();
    self.requires_grad_(b);
    lua_settop(L, 1);
    return 1;
}

int t_backward(lua_State * L) {
    Args a(L);
    SELF(a);
    at::Tensor * g = a.opt_tensor(2, "gradient");
    bool retain = a.opt_bool(3, "retain_graph", false);
    bool create = a.opt_bool(4, "create_graph", false);
    a.finish();
    if (!self.requires_grad())
        bind_fail("this tensor does not require grad and has no grad_fn: did you call "
                  "requires_grad_() on the inputs, or compute it inside torch.no_grad?");
    if (!g && self.numel() != 1)
        bind_fail("a gradient is needed for a non-scalar output of %lld elements (pass t:backward(grad))",
                  (long long)self.numel());
    self.backward(g ? *g : at::Tensor(), retain || create, create);
    return 0;
}

int t_detach(lua_State * L) { tensor_push(L, tensor_check(L, 1, "self").detach()); return 1; }
int t_detach_(lua_State * L) { tensor_check(L, 1, "self").detach_(); lua_settop(L, 1); return 1; }
int t_retain_grad(lua_State * L) { tensor_check(L, 1, "self").retain_grad(); return 0; }

// t:free(): release the storage now instead of waiting for the GC.
int t_free(lua_State * L) {
    at::Tensor * t = tensor_test(L, 1);
    if (!t) bind_fail("expected a Tensor");
    tensor_release(*t);
    return 0;
}

int t_is_freed(lua_State * L) {
    at::Tensor * t = tensor_test(L, 1);
    lua_pushboolean(L, t && !t->defined());
    return 1;
}

// -- slicing --------------------------------------------------------------------------------
// t[i] selects along dim 1 (1-based, negative from the end). t[{spec, spec, ...}] applies one
// spec per leading dim: a number selects, {first, last[, step]} is an inclusive range, ':' or
// {} keeps the whole dim. t[bool_or_long_tensor] is PyTorch advanced indexing.

int64_t index_wrap(int64_t i, int64_t n, int64_t dim) {
    int64_t i0 = i >= 1 ? i - 1 : i < 0 ? n + i : -1;
    if (i0 < 0 || i0 >= n)
        bind_fail("index %lld is out of range for dim %lld of size %lld (indices are 1-based)",
                  (long long)i, (long long)dim + 1, (long long)n);
    return i0;
}

// An integer index or range bound at stack index idx (a number with an integral value).
int64_t slice_int(lua_State * L, int idx, const char * what) {
    double v = lua_tonumber(L, idx);
    if (lua_type(L, idx) != LUA_TNUMBER || std::floor(v) != v || std::fabs(v) >= 9.2e18)
        bind_fail("%s: expected an integer, got %s", what,
                  lua_type(L, idx) == LUA_TNUMBER ? std::to_string(v).c_str() : luaL_typename(L, idx));
    return (int64_t)v;
}

at::Tensor slice_apply(lua_State * L, const at::Tensor & t, int key) {
    if (lua_type(L, key) == LUA_TNUMBER) {
        if (t.dim() == 0) bind_fail("cannot index a 0-dim tensor");
        return t.select(0, index_wrap(slice_int(L, key, "index"), t.size(0), 0));
    }
    if (at::Tensor * idx = tensor_test(L, key)) {
        if (!idx->defined()) bind_fail("index: the tensor was freed (t:free() was called on it)");
        return at::index(t, {c10::optional<at::Tensor>(*idx)});
    }
    if (lua_type(L, key) != LUA_TTABLE) bind_fail("expected a number, a table of slices or a tensor as index, got %s", luaL_typename(L, key));
    at::Tensor r = t;
    int n = (int)lua_objlen(L, key);
    if (n > t.dim()) bind_fail("too many indices (%d) for a tensor of %lld dims", n, (long long)t.dim());
    int64_t d = 0;  // current dim in r
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, key, i);
        int ty = lua_type(L, -1);
        if (ty == LUA_TNUMBER) {
            r = r.select(d, index_wrap(slice_int(L, -1, "index"), r.size(d), i - 1));
        } else if (ty == LUA_TSTRING && strcmp(lua_tostring(L, -1), ":") == 0) {
            d++;
        } else if (ty == LUA_TTABLE) {
            int m = (int)lua_objlen(L, -1);
            int64_t size = r.size(d);
            int64_t first = 1, last = size, step = 1;
            if (m >= 1) { lua_rawgeti(L, -1, 1); first = slice_int(L, -1, "range start"); lua_pop(L, 1); }
            if (m >= 2) { lua_rawgeti(L, -1, 2); last = slice_int(L, -1, "range end"); lua_pop(L, 1); }
            if (m >= 3) { lua_rawgeti(L, -1, 3); step = slice_int(L, -1, "range step"); lua_pop(L, 1); }
            if (step < 1) bind_fail("slice step must be positive, got %lld", (long long)step);
            int64_t f0 = first < 0 ? size + first : first - 1;
            int64_t l0 = last < 0 ? size + last : last - 1;
            if (f0 < 0 || f0 > size || l0 >= size || l0 < -1)
                bind_fail("range {%lld, %lld} is out of bounds for dim %d of size %lld (inclusive, 1-based)",
                          (long long)first, (long long)last, i, (long long)size);
            int64_t len = l0 >= f0 ? l0 - f0 + 1 : 0;
            r = r.slice(d, f0, f0 + len, step);
            d++;
        } else {
            bind_fail("index entry %d: expected a number, a {first, last} range or ':', got %s", i, luaL_typename(L, -1));
        }
        lua_pop(L, 1);
    }
    return r;
}

void t_set_property(lua_State * L, at::Tensor & self, const char * k) {
    if (strcmp(k, "grad") == 0) {
        if (lua_isnil(L, 3)) {
            self.mutable_grad() = at::Tensor();
            return;
        }
        at::Tensor & g = tensor_check(L, 3, "grad");
        // As PyTorch's setter: a grad must match the tensor, or backward would accumulate
        // into it by broadcasting (silently wrong) or fail later.
        if (g.sizes() != self.sizes())
            bind_fail("assigned grad has a different size (%s) than the tensor (%s)",
                      c10::str(g.sizes()).c_str(), c10::str(self.sizes()).c_str());
        if (g.scalar_type() != self.scalar_type())
            bind_fail("assigned grad has dtype %s but the tensor has %s", c10::toString(g.scalar_type()),
                      c10::toString(self.scalar_type()));
        if (g.device() != self.device())
            bind_fail("assigned grad is on %s but the tensor is on %s", g.device().str().c_str(),
                      self.device().str().c_str());
        self.mutable_grad() = g;
    } else if (strcmp(k, "requires_grad") == 0) {
        self.requires_grad_(lua_toboolean(L, 3));
    } else if (strcmp(k, "data") == 0) {
        tensor_set_data(L, self, tensor_check(L, 3, "data"));
    } else {
        bind_fail("cannot set field '%s' of a Tensor (settable: grad, requires_grad, data)", k);
    }
}

int t_newindex(lua_State * L) {
    at::Tensor & self = tensor_check(L, 1, "self");
    if (lua_type(L, 2) == LUA_TSTRING) {
        t_set_property(L, self, lua_tostring(L, 2));
        return 0;
    }
    if (at::Tensor * idx = tensor_test(L, 2)) {
        if (!idx->defined()) bind_fail("index: the tensor was freed (t:free() was called on it)");
        // A number takes self's dtype (as Python's t[idx] = 9); a tensor value must match it.
        at::Tensor * vt = tensor_test(L, 3);
        at::Tensor v = vt ? tensor_or_scalar(L, 3, &self)
                          : at::scalar_tensor(scalar_from_lua(L, 3), self.options());
        self.index_put_({c10::optional<at::Tensor>(*idx)}, v);
        return 0;
    }
    at::Tensor view = slice_apply(L, self, 2);
    if (at::Tensor * v = tensor_test(L, 3)) view.copy_(*v);
    else view.fill_(scalar_from_lua(L, 3));
    return 0;
}

bool t_push_property(lua_State * L, const at::Tensor & t, const char * k) {
    switch (k[0]) {
    case 's': if (!strcmp(k, "shape")) { push_size(L, t.sizes()); return true; } break;
    case 'd':
        if (!strcmp(k, "dtype")) { std::string s = dtype_name(t.scalar_type(), true); lua_pushstring(L, s.c_str()); return true; }
        if (!strcmp(k, "device")) { lua_pushstring(L, t.device().str().c_str()); return true; }
        if (!strcmp(k, "data")) { tensor_push(L, t.detach()); return true; }
        break;
    case 'g':
        if (!strcmp(k, "grad")) { tensor_push(L, t.grad()); return true; }
        if (!strcmp(k, "grad_fn")) {
            if (t.grad_fn()) lua_pushstring(L, t.grad_fn()->name().c_str());
            else lua_pushnil(L);
            return true;
        }
        break;
    case 'r': if (!strcmp(k, "requires_grad")) { lua_pushboolean(L, t.requires_grad()); return true; } break;
    case 'i':
        if (!strcmp(k, "is_leaf")) { lua_pushboolean(L, t.is_leaf()); return true; }
        if (!strcmp(k, "is_cuda")) { lua_pushboolean(L, t.is_cuda()); return true; }
        break;
    case 'n': if (!strcmp(k, "ndim")) { lua_pushnumber(L, (lua_Number)t.dim()); return true; } break;
    case 'T': if (!k[1]) { tensor_push(L, t.dim() < 2 ? t : t.permute([&] {
                  std::vector<int64_t> p; for (int64_t i = t.dim() - 1; i >= 0; i--) p.push_back(i); return p; }()));
                  return true; }
        break;
    case 'm': if (!strcmp(k, "mT")) { tensor_push(L, t.mT()); return true; } break;
    }
    return false;
}

int methods_ref = LUA_NOREF;

// __index: methods first, then properties, then slicing.
int t_index(lua_State * L) {
    if (lua_type(L, 2) == LUA_TSTRING) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, methods_ref);
        lua_pushvalue(L, 2);
        lua_rawget(L, -2);
        if (!lua_isnil(L, -1)) return 1;
        lua_pop(L, 1);
        at::Tensor * t = tensor_test(L, 1);
        if (t && t->defined() && t_push_property(L, *t, lua_tostring(L, 2))) return 1;
        lua_pushnil(L);
        return 1;
    }
    at::Tensor & self = tensor_check(L, 1, "self");
    tensor_push(L, slice_apply(L, self, 2));
    return 1;
}

// -- operators -------------------------------------------------------------------------------

at::Tensor operand(lua_State * L, int idx, int other) {
    at::Tensor * o = tensor_test(L, other);
    return tensor_or_scalar(L, idx, o);
}

// The same with a number operand wrapped in the tensor's dtype where that gives the same result
// (arith_operand, bindings/bind_core.cpp): for add, sub, mul and div.
} // namespace
at::Tensor arith_operand(lua_State * L, int idx, const at::Tensor & like);
namespace {
at::Tensor arith_side(lua_State * L, int idx, int other) {
    at::Tensor * o = tensor_test(L, other);
    if (o && o->defined() && lua_type(L, idx) == LUA_TNUMBER) return arith_operand(L, idx, *o);
    return tensor_or_scalar(L, idx, o);
}

// Two live tensors (the common case) are used in place: no copies, each checked once.
#define ARITH(mm, expr, side)                             \
    int t_##mm(lua_State * L) {                           \
        at::Tensor * px = tensor_test(L, 1), * py = tensor_test(L, 2); \
        if (px && py && px->defined() && py->defined()) { \
            const at::Tensor & x = *px, & y = *py;        \
            tensor_push(L, expr);                         \
            return 1;                                     \
        }                                                 \
        at::Tensor x = side(L, 1, 2), y = side(L, 2, 1);  \
        tensor_push(L, expr);                             \
        return 1;                                         \
    }
ARITH(add, at::add(x, y), arith_side)
ARITH(sub, at::sub(x, y), arith_side)
ARITH(mul, at::mul(x, y), arith_side)
ARITH(div, at::div(x, y), arith_side)
ARITH(mod, at::remainder(x, y), operand)

// t ^ 2 takes pow's scalar-exponent form: its backward is one multiply, not a where().
int t_pow(lua_State * L) {
    if (lua_type(L, 2) == LUA_TNUMBER && tensor_test(L, 1)) {
        tensor_push(L, at::pow(tensor_check(L, 1, "self"), scalar_from_lua(L, 2)));
        return 1;
    }
    at::Tensor x = operand(L, 1, 2), y = operand(L, 2, 1);
    tensor_push(L, at::pow(x, y));
    return 1;
}

int t_unm(lua_State * L) { tensor_push(L, at::neg(tensor_check(L, 1, "self"))); return 1; }

int t_len(lua_State * L) {
    at::Tensor & t = tensor_check(L, 1, "self");
    if (t.dim() == 0) bind_fail("len() of a 0-dim tensor");
    lua_pushnumber(L, (lua_Number)t.size(0));
    return 1;
}

int t_eq(lua_State * L) {
    at::Tensor * a = tensor_test(L, 1), * b = tensor_test(L, 2);
    lua_pushboolean(L, a && b && a->unsafeGetTensorImpl() == b->unsafeGetTensorImpl());
    return 1;
}

int size_tostring(lua_State * L) {
    // A plain C function (no trampoline): reachable from scripts through getmetatable(size).
    if (lua_type(L, 1) != LUA_TTABLE)
        return luaL_error(L, "bad argument #1 to 'Size.__tostring' (expected a torch.Size, got %s)", luaL_typename(L, 1));
    std::string s = "torch.Size([";
    int n = (int)lua_objlen(L, 1);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, i);
        s += (i > 1 ? ", " : "") + std::to_string((long long)lua_tonumber(L, -1));
        lua_pop(L, 1);
    }
    s += "])";
    lua_pushstring(L, s.c_str());
    return 1;
}

// Size tables compare by value (t:size() == u:size()).
int size_eq(lua_State * L) {
    if (lua_type(L, 1) != LUA_TTABLE || lua_type(L, 2) != LUA_TTABLE) {
        lua_pushboolean(L, lua_rawequal(L, 1, 2));
        return 1;
    }
    int n = (int)lua_objlen(L, 1);
    bool eq = n == (int)lua_objlen(L, 2);
    for (int i = 1; eq && i <= n; i++) {
        lua_rawgeti(L, 1, i);
        lua_rawgeti(L, 2, i);
        eq = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
    }
    lua_pushboolean(L, eq);
    return 1;
}

const BindFn methods[] = {
    {"size", t_size}, {"stride", t_stride}, {"dim", t_dim}, {"ndimension", t_dim}, {"numel", t_numel},
    {"nelement", t_numel}, {"element_size", t_element_size}, {"is_contiguous", t_is_contiguous},
    {"storage_offset", t_storage_offset}, {"item", t_item}, {"totable", t_totable}, {"tolist", t_totable},
    {"tostring", t_tostring}, {"to", t_to}, {"float", t_float}, {"double", t_double}, {"half", t_half},
    {"bfloat16", t_bfloat16}, {"long", t_long}, {"int", t_int}, {"short", t_short}, {"byte", t_byte},
    {"char", t_char}, {"bool", t_bool}, {"type_as", t_type_as}, {"cpu", t_cpu}, {"cuda", t_cuda},
    {"fill_", t_fill_}, {"zero_", t_zero_}, {"copy_", t_copy_}, {"normal_", t_normal_},
    {"uniform_", t_uniform_}, {"bernoulli_", t_bernoulli_}, {"index_add_", t_index_add_},
    {"index_fill_", t_index_fill_}, {"new_zeros", t_new_zeros}, {"new_ones", t_new_ones},
    {"new_full", t_new_full}, {"where", t_where}, {"equal", t_equal}, {"allclose", t_allclose},
    {"isclose", t_isclose}, {"requires_grad_", t_requires_grad_}, {"backward", t_backward},
    {"detach", t_detach}, {"detach_", t_detach_}, {"retain_grad", t_retain_grad}, {"free", t_free},
    {"is_freed", t_is_freed},
    {nullptr, nullptr},
};

const BindFn metamethods[] = {
    {"__newindex", t_newindex}, {"__add", t_add}, {"__sub", t_sub}, {"__mul", t_mul}, {"__div", t_div},
    {"__pow", t_pow}, {"__mod", t_mod}, {"__unm", t_unm}, {"__len", t_len}, {"__eq", t_eq},
    {"__tostring", t_tostring}, {"__index", t_index},
    {nullptr, nullptr},
};

} // namespace

// Builds the Tensor metatable: methods table (with the shared ops) as __index upvalue.
void tensor_open_methods(lua_State * L, int torch_table) {
    luaL_newmetatable(L, QATLAB_SIZE_MT);
    lua_pushcfunction(L, size_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, size_eq);
    lua_setfield(L, -2, "__eq");
    lua_pop(L, 1);

    luaL_getmetatable(L, QATLAB_TENSOR_MT);
    int mt = lua_gettop(L);
    lua_newtable(L);
    int m = lua_gettop(L);
    lua_pushvalue(L, m);
    methods_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    bind_register(L, mt, "Tensor.", metamethods);
    bind_register(L, m, "Tensor.", methods);
    torch_open_ops(L, torch_table, m);
    // The method table is also reachable as torch.Tensor, for extension from Lua.
    lua_pushvalue(L, m);
    lua_setfield(L, torch_table, "Tensor");
    // __index is a small Lua function in front of the C one: a method lookup (t:add) is then
    // a table read in the VM instead of a call into C; properties and slicing go to C.
    static const char fast_index[] =
        "local methods, slow = ...\n"
        "return function(t, k)\n"
        "  local v = methods[k]\n"
        "  if v ~= nil then return v end\n"
        "  return slow(t, k)\n"
        "end\n";
    if (luaL_loadbuffer(L, fast_index, sizeof(fast_index) - 1, "=Tensor.__index") == 0) {
        lua_pushvalue(L, m);
        lua_getfield(L, mt, "__index");
        lua_call(L, 2, 1);
        lua_setfield(L, mt, "__index");
    } else {
        lua_pop(L, 1);  // keep the C __index
    }
    lua_settop(L, mt - 1);
}

} // namespace qatlab
