// torch_module: the `torch` Lua module: creation, seeding, grad modes, autocast, autograd.grad,
// linalg, files (safetensors, torch.save .pt), defaults, memory and CUDA queries. Ops live in torch_ops.
#include "bindings/bind.h"
#include "lib/pt_reader.h"
#include "lib/safetensors.h"
#include "lib/tensor_print.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/version.h>
#include <cmath>
#include <cstring>
#ifdef QATLAB_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace qatlab {

void tensor_open_methods(lua_State * L, int torch_table);
void torch_open_autograd(lua_State * L, int torch_table);  // torch_autograd.cpp

namespace {

// Plain argument checks that raise through the trampoline, so errors carry "torch.<name>:"
// (luaL_check* would name the C closure '?').
const char * arg_string(lua_State * L, int idx, const char * what) {
    if (lua_type(L, idx) != LUA_TSTRING)
        bind_fail("argument #%d (%s): expected a string, got %s", idx, what, luaL_typename(L, idx));
    return lua_tostring(L, idx);
}

double arg_number(lua_State * L, int idx, const char * what) {
    if (lua_type(L, idx) != LUA_TNUMBER)
        bind_fail("argument #%d (%s): expected a number, got %s", idx, what, luaL_typename(L, idx));
    return lua_tonumber(L, idx);
}

// Factory options: dtype, device, requires_grad from the options table.
at::TensorOptions factory_options(Args & a, at::ScalarType def_dtype) {
    at::ScalarType dt = def_dtype;
    c10::Device dev = default_device();
    a.opt_dtype(0, "dtype", dt);
    a.opt_device(0, "device", dev);
    return at::TensorOptions().dtype(dt).device(dev);
}

at::Tensor finish_factory(Args & a, at::Tensor t) {
    bool rg = a.opt_bool(0, "requires_grad", false);
    a.finish();
    if (rg) t.requires_grad_(true);
    return t;
}

// -- torch.tensor: nested Lua tables → tensor --------------------------------------------
// Numbers become the default dtype (float32) unless dtype is given: Lua has one number type,
// so integer-valued data such as token ids ask for {dtype='int64'}. Booleans become bool.

void infer_shape(lua_State * L, int idx, std::vector<int64_t> & shape, bool & boolean) {
    lua_pushvalue(L, idx);
    for (;;) {
        int ty = lua_type(L, -1);
        if (ty == LUA_TTABLE) {
            int64_t n = (int64_t)lua_objlen(L, -1);
            if (shape.size() >= 64) {  // also stops a table that contains itself
                lua_pop(L, 1);
                bind_fail("nested table is more than 64 levels deep (does it contain itself?)");
            }
            shape.push_back(n);
            if (n == 0) break;
            lua_rawgeti(L, -1, 1);
            lua_remove(L, -2);
        } else {
            boolean = ty == LUA_TBOOLEAN;
            break;
        }
    }
    lua_pop(L, 1);
}

void fill_values(lua_State * L, int idx, const std::vector<int64_t> & shape, size_t d, std::vector<double> & out) {
    if (d == shape.size()) {
        int ty = lua_type(L, idx);
        if (ty == LUA_TNUMBER) out.push_back(lua_tonumber(L, idx));
        else if (ty == LUA_TBOOLEAN) out.push_back(lua_toboolean(L, idx) ? 1.0 : 0.0);
        else if (at::Tensor * t = tensor_test(L, idx); t && t->numel() == 1) out.push_back(t->item<double>());
        else bind_fail("expected a number at depth %zu, got %s", d + 1, luaL_typename(L, idx));
        return;
    }
    if (lua_type(L, idx) != LUA_TTABLE || (int64_t)lua_objlen(L, idx) != shape[d])
        bind_fail("ragged nested table: expected %lld entries at depth %zu, got %s", (long long)shape[d], d + 1,
                  lua_type(L, idx) == LUA_TTABLE ? std::to_string(lua_objlen(L, idx)).c_str() : luaL_typename(L, idx));
    lua_checkstack(L, 4);
    // {1, nil, 3} has length 1 or 3 depending on how it was built: any key past the length,
    // or not a positive integer, is an error, never dropped data.
    int64_t entries = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        double k = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
        if (!(k >= 1 && k <= (double)shape[d] && k == (double)(int64_t)k)) {
            std::string key = lua_type(L, -1) == LUA_TSTRING ? "'" + std::string(lua_tostring(L, -1)) + "'"
                              : lua_type(L, -1) == LUA_TNUMBER ? std::to_string(k) : luaL_typename(L, -1);
            lua_pop(L, 1);
            bind_fail("argument #1 (data): a table at depth %zu has a hole or a non-array key (key %s, length %lld): "
                      "tables must be arrays without nil", d + 1, key.c_str(), (long long)shape[d]);
        }
        entries++;
    }
    if (entries != shape[d])
        bind_fail("argument #1 (data): a table at depth %zu has a hole (nil) among its %lld entries", d + 1,
                  (long long)shape[d]);
    for (int64_t i = 1; i <= shape[d]; i++) {
        lua_rawgeti(L, idx, (int)i);
        fill_values(L, lua_gettop(L), shape, d + 1, out);
        lua_pop(L, 1);
    }
}

int f_tensor(lua_State * L) {
    Args a(L);
    int di = a.find(1, "data", true);
    if (!di) bind_fail("argument #1 (data): expected a number or a nested table of numbers");
    if (at::Tensor * t = tensor_test(L, di)) {  // torch.tensor(t): a detached copy
        if (!t->defined()) bind_fail("argument #1 (data): the tensor was freed (t:free() was called on it)");
        at::TensorOptions o = factory_options(a, t->scalar_type());
        tensor_push(L, finish_factory(a, t->detach().to(o, false, true)));
        return 1;
    }
    std::vector<int64_t> shape;
    bool boolean = false;
    infer_shape(L, di, shape, boolean);
    std::vector<double> vals;
    fill_values(L, di, shape, 0, vals);
    at::TensorOptions o = factory_options(a, boolean ? at::kBool : default_dtype());
    at::Tensor t = at::from_blob(vals.data(), shape, at::TensorOptions().dtype(at::kDouble)).to(o, false, true);
    tensor_push(L, finish_factory(a, t));
    return 1;
}

// zeros/ones/empty/rand/randn(size...) and full(size, value).
int factory(lua_State * L, int kind) {
    Args a(L);
    std::vector<int64_t> s = a.sizes(1, "size");
    if (kind == 5) {  // full(size, value): the value is the last positional
        if (lua_type(L, 1) != LUA_TTABLE) bind_fail("full: argument #1 (size) must be a table, e.g. torch.full({2, 3}, 7)");
        s = a.sizes(1, "size");
    }
    at::TensorOptions o = factory_options(a, default_dtype());
    at::Tensor t;
    switch (kind) {
    case 0: t = at::zeros(s, o); break;
    case 1: t = at::ones(s, o); break;
    case 2: t = at::empty(s, o); break;
    case 3: t = at::rand(s, o); break;
    case 4: t = at::randn(s, o); break;
    case 5: {
        c10::Scalar v = a.scalar(2, "fill_value");
        if (!a.has(0, "dtype") && v.isBoolean()) o = o.dtype(at::kBool);
        t = at::full(s, v, o);
        break;
    }
    }
    tensor_push(L, finish_factory(a, t));
    return 1;
}
int f_zeros(lua_State * L) { return factory(L, 0); }
int f_ones(lua_State * L) { return factory(L, 1); }
int f_empty(lua_State * L) { return factory(L, 2); }
int f_rand(lua_State * L) { return factory(L, 3); }
int f_randn(lua_State * L) { return factory(L, 4); }
int f_full(lua_State * L) { return factory(L, 5); }

// zeros_like(t) and friends keep t's dtype and device unless told otherwise.
int like(lua_State * L, int kind) {
    Args a(L);
    at::Tensor & t = a.tensor(1, "input");
    at::ScalarType dt = t.scalar_type();
    c10::Device dev = t.device();
    a.opt_dtype(0, "dtype", dt);
    a.opt_device(0, "device", dev);
    at::TensorOptions o = at::TensorOptions().dtype(dt).device(dev);
    at::Tensor r;
    switch (kind) {
    case 0: r = at::zeros(t.sizes(), o); break;
    case 1: r = at::ones(t.sizes(), o); break;
    case 2: r = at::empty(t.sizes(), o); break;
    case 3: r = at::rand(t.sizes(), o); break;
    case 4: r = at::randn(t.sizes(), o); break;
    case 5: r = at::full(t.sizes(), a.scalar(2, "fill_value"), o); break;
    }
    tensor_push(L, finish_factory(a, r));
    return 1;
}
int f_zeros_like(lua_State * L) { return like(L, 0); }
int f_ones_like(lua_State * L) { return like(L, 1); }
int f_empty_like(lua_State * L) { return like(L, 2); }
int f_rand_like(lua_State * L) { return like(L, 3); }
int f_randn_like(lua_State * L) { return like(L, 4); }
int f_full_like(lua_State * L) { return like(L, 5); }

// arange(end) / arange(start, end[, step]): int64 when every bound is integral, as PyTorch.
int f_arange(lua_State * L) {
    Args a(L);
    double start = 0, end, step = 1;
    if (a.has(2, "end")) {
        start = a.number(1, "start");
        end = a.number(2, "end");
        step = a.opt_number(3, "step", 1);
    } else {
        end = a.number(1, "end");
    }
    if (step == 0) bind_fail("step must be non-zero");
    bool integral = std::floor(start) == start && std::floor(end) == end && std::floor(step) == step;
    at::TensorOptions o = factory_options(a, integral ? at::kLong : default_dtype());
    tensor_push(L, finish_factory(a, at::arange(start, end, step, o)));
    return 1;
}

int f_linspace(lua_State * L) {
    Args a(L);
    double s = a.number(1, "start"), e = a.number(2, "end");
    int64_t n = a.integer(3, "steps");
    at::TensorOptions o = factory_options(a, default_dtype());
    tensor_push(L, finish_factory(a, at::linspace(s, e, n, o)));
    return 1;
}

int f_eye(lua_State * L) {
    Args a(L);
    int64_t n = a.integer(1, "n");
    int64_t m = a.opt_integer(2, "m", n);
    at::TensorOptions o = factory_options(a, default_dtype());
    tensor_push(L, finish_factory(a, at::eye(n, m, o)));
    return 1;
}

// randint(high, size) or randint(low, high, size): values in [low, high), int64.
int f_randint(lua_State * L) {
    Args a(L);
    int64_t low = 0, high;
    std::vector<int64_t> s;
    if (a.has(3, "size")) {
        low = a.integer(1, "low");
        high = a.integer(2, "high");
        s = a.sizes(3, "size");
    } else {
        high = a.integer(1, "high");
        s = a.sizes(2, "size");
    }
    if (high <= low) bind_fail("high (%lld) must be greater than low (%lld)", (long long)high, (long long)low);
    at::TensorOptions o = factory_options(a, at::kLong);
    tensor_push(L, finish_factory(a, at::randint(low, high, s, o)));
    return 1;
}

int f_randperm(lua_State * L) {
    Args a(L);
    int64_t n = a.integer(1, "n");
    at::TensorOptions o = factory_options(a, at::kLong);
    tensor_push(L, finish_factory(a, at::randperm(n, o)));
    return 1;
}

int f_multinomial(lua_State * L) {
    Args a(L);
    at::Tensor & p = a.tensor(1, "input");
    int64_t n = a.integer(2, "num_samples");
    bool repl = a.opt_bool(3, "replacement", false);
    a.finish();
    tensor_push(L, at::multinomial(p, n, repl));
    return 1;
}

// -- lists of tensors ------------------------------------------------------------------------

std::vector<at::Tensor> tensor_list(lua_State * L, int idx, const char * what) {
    if (lua_type(L, idx) != LUA_TTABLE) bind_fail("%s: expected a table of tensors, got %s", what, luaL_typename(L, idx));
    std::vector<at::Tensor> ts;
    int n = (int)lua_objlen(L, idx);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        at::Tensor * t = tensor_test(L, -1);
        if (!t) bind_fail("%s: entry %d is %s, expected a Tensor", what, i, luaL_typename(L, -1));
        if (!t->defined()) bind_fail("%s: entry %d was freed (t:free() was called on it)", what, i);
        ts.push_back(*t);
        lua_pop(L, 1);
    }
    return ts;
}

int f_cat(lua_State * L, bool stack) {
    Args a(L);
    int li = a.find(1, "tensors", true);
    if (!li) bind_fail("argument #1 (tensors): expected a table of tensors");
    std::vector<at::Tensor> ts = tensor_list(L, li, "tensors");
    if (ts.empty()) bind_fail("tensors: expected a non-empty table of tensors");
    int64_t nd = ts[0].dim() + (stack ? 1 : 0);
    int64_t d = a.opt_dim(2, "dim", nd, 0);
    a.finish();
    for (size_t i = 1; i < ts.size(); i++)
        if (ts[i].device() != ts[0].device())
            bind_fail("tensor %zu is on %s but tensor 1 is on %s", i + 1, ts[i].device().str().c_str(),
                      ts[0].device().str().c_str());
    tensor_push(L, stack ? at::stack(ts, d) : at::cat(ts, d));
    return 1;
}
int f_cat_(lua_State * L) { return f_cat(L, false); }
int f_stack(lua_State * L) { return f_cat(L, true); }

// einsum('ij,jk->ik', a, b) or einsum('ij,jk->ik', {a, b}).
int f_einsum(lua_State * L) {
    const char * eq = arg_string(L, 1, "equation");
    std::vector<at::Tensor> ts;
    if (lua_type(L, 2) == LUA_TTABLE && !tensor_test(L, 2)) ts = tensor_list(L, 2, "operands");
    else
        for (int i = 2; i <= lua_gettop(L); i++) ts.push_back(tensor_check(L, i, "operand"));
    tensor_push(L, at::einsum(eq, ts));
    return 1;
}

// -- grad modes and autograd.grad ----------------------------------------------------------

// torch.no_grad(fn, ...) runs fn with grad mode off and returns its results.
int grad_mode_call(lua_State * L, bool enabled) {
    if (lua_type(L, 1) != LUA_TFUNCTION)
        bind_fail("argument #1 (fn): expected a function, got %s", luaL_typename(L, 1));
    int base = lua_gettop(L);
    int status;
    {
        at::AutoGradMode guard(enabled);
        status = bind_pcall(L, base - 1, LUA_MULTRET);
    }
    if (status != 0) return lua_error(L);  // re-raise after the guard has restored the mode
    return lua_gettop(L);
}
int f_no_grad(lua_State * L) { return grad_mode_call(L, false); }
int f_enable_grad(lua_State * L) { return grad_mode_call(L, true); }
int f_is_grad_enabled(lua_State * L) { lua_pushboolean(L, at::GradMode::is_enabled()); return 1; }
int f_set_grad_enabled(lua_State * L) { at::GradMode::set_enabled(lua_toboolean(L, 1)); return 0; }

// -- autocast (mixed precision), PyTorch's torch.autocast as a call ----------------------------

at::DeviceType autocast_device(lua_State * L, int idx) {
    const char * s = arg_string(L, idx, "device_type");
    // 'cuda:0' names the same autocast state as 'cuda' (the state is per device type)
    if (std::strcmp(s, "cpu") == 0) return at::kCPU;
    if (std::strncmp(s, "cuda", 4) == 0 && (s[4] == 0 || s[4] == ':')) return at::kCUDA;
    bind_fail("argument #%d (device_type): expected 'cpu' or 'cuda', got '%s'", idx, s);
}

// The autocast state of one device type plus the shared cache flag; restores it on destruction,
// also when fn raised. Leaving the outermost autocast clears the cast cache, as PyTorch's __exit__.
struct AutocastScope {
    at::DeviceType dev;
    bool prev_enabled, prev_cache;
    at::ScalarType prev_dtype;
    AutocastScope(at::DeviceType d, bool enabled, at::ScalarType dtype, bool cache)
        : dev(d), prev_enabled(at::autocast::is_autocast_enabled(d)),
          prev_cache(at::autocast::is_autocast_cache_enabled()), prev_dtype(at::autocast::get_autocast_dtype(d)) {
        at::autocast::set_autocast_enabled(d, enabled);
        at::autocast::set_autocast_dtype(d, dtype);
        at::autocast::increment_nesting();
        at::autocast::set_autocast_cache_enabled(cache);
    }
    ~AutocastScope() {
        if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
        at::autocast::set_autocast_enabled(dev, prev_enabled);
        at::autocast::set_autocast_dtype(dev, prev_dtype);
        at::autocast::set_autocast_cache_enabled(prev_cache);
    }
};

// torch.autocast(device_type, [{dtype=, enabled=true, cache_enabled=true}], fn, ...) runs fn(...) with
// autocast on for device_type ('cpu': bfloat16 by default, 'cuda': float16, as PyTorch) and returns its
// results; the previous state comes back even when fn raises (the error passes through unchanged).
int f_autocast(lua_State * L) {
    at::DeviceType dev = autocast_device(L, 1);
    at::ScalarType dtype = at::autocast::get_autocast_dtype(dev);
    bool enabled = true, cache = true;
    int fn = 2;
    if (lua_type(L, 2) == LUA_TTABLE) {
        fn = 3;
        lua_pushnil(L);
        while (lua_next(L, 2) != 0) {
            const char * k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
            if (std::strcmp(k, "dtype") == 0) {
                if (lua_type(L, -1) != LUA_TSTRING)
                    bind_fail("option 'dtype': expected a string, got %s", luaL_typename(L, -1));
                dtype = dtype_parse(lua_tostring(L, -1));
            } else if (std::strcmp(k, "enabled") == 0 || std::strcmp(k, "cache_enabled") == 0) {
                if (lua_type(L, -1) != LUA_TBOOLEAN)
                    bind_fail("option '%s': expected a boolean, got %s", k, luaL_typename(L, -1));
                (k[0] == 'e' ? enabled : cache) = lua_toboolean(L, -1);
            } else {
                bind_fail("unknown option '%s' (expected dtype, enabled, cache_enabled)",
                          lua_type(L, -2) == LUA_TSTRING ? k : luaL_typename(L, -2));
            }
            lua_pop(L, 1);
        }
    }
    if (lua_type(L, fn) != LUA_TFUNCTION)
        bind_fail("argument #%d (fn): expected a function, got %s", fn, luaL_typename(L, fn));
    // the dtypes autocast kernels exist for (PyTorch warns and disables; an error is clearer)
    if (dtype != at::kBFloat16 && dtype != at::kHalf)
        bind_fail("dtype %s is not supported by autocast (expected bfloat16 or float16)",
                  dtype_name(dtype, true).c_str());
    int nargs = lua_gettop(L) - fn;
    int status;
    {
        AutocastScope scope(dev, enabled, dtype, cache);
        status = bind_pcall(L, nargs, LUA_MULTRET);
    }
    if (status != 0) return lua_error(L);  // re-raise after the scope has restored the state
    return lua_gettop(L) - (fn - 1);
}

// torch.is_autocast_enabled([device_type]): PyTorch's default device type is 'cuda'.
int f_is_autocast_enabled(lua_State * L) {
    at::DeviceType dev = lua_isnoneornil(L, 1) ? at::kCUDA : autocast_device(L, 1);
    lua_pushboolean(L, at::autocast::is_autocast_enabled(dev));
    return 1;
}

int f_get_autocast_dtype(lua_State * L) {
    lua_pushstring(L, dtype_name(at::autocast::get_autocast_dtype(autocast_device(L, 1)), true).c_str());
    return 1;
}

std::vector<at::Tensor> one_or_list(lua_State * L, int idx, const char * what) {
    if (at::Tensor * t = tensor_test(L, idx)) return {*t};
    return tensor_list(L, idx, what);
}

// torch.autograd.grad(outputs, inputs, {grad_outputs=, retain_graph=, create_graph=, allow_unused=})
int f_autograd_grad(lua_State * L) {
    Args a(L);
    int oi = a.find(1, "outputs"), ii = a.find(2, "inputs");
    if (!oi || !ii) bind_fail("expected (outputs, inputs[, options])");
    std::vector<at::Tensor> outs = one_or_list(L, oi, "outputs");
    std::vector<at::Tensor> ins = one_or_list(L, ii, "inputs");
    std::vector<at::Tensor> gouts;
    if (int gi = a.find(3, "grad_outputs")) gouts = one_or_list(L, gi, "grad_outputs");
    bool create = a.opt_bool(0, "create_graph", false);
    bool retain = a.opt_bool(0, "retain_graph", create);
    bool allow_unused = a.opt_bool(0, "allow_unused", false);
    a.finish();
    for (size_t i = 0; i < outs.size(); i++)
        if (!outs[i].requires_grad()) bind_fail("output %zu does not require grad", i + 1);
    auto gs = torch::autograd::grad(outs, ins, gouts, retain, create, allow_unused);
    lua_createtable(L, (int)gs.size(), 0);
    for (size_t i = 0; i < gs.size(); i++) {
        tensor_push(L, gs[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

// -- linalg -------------------------------------------------------------------------------------

int f_svd(lua_State * L) {
    Args a(L);
    at::Tensor & A = a.tensor(1, "A");
    bool full = a.opt_bool(2, "full_matrices", true);
    a.finish();
    auto r = at::linalg_svd(A, full);
    tensor_push(L, std::get<0>(r));
    tensor_push(L, std::get<1>(r));
    tensor_push(L, std::get<2>(r));
    return 3;
}

int f_linalg_norm(lua_State * L) {
    Args a(L);
    at::Tensor & A = a.tensor(1, "A");
    int oi = a.find(2, "ord");
    bool has_dim = a.has(3, "dim");
    std::vector<int64_t> dims = has_dim ? a.dims(3, "dim", A.dim()) : std::vector<int64_t>{};
    bool keepdim = a.opt_bool(4, "keepdim", false);
    at::OptionalIntArrayRef od = has_dim ? at::OptionalIntArrayRef(dims) : std::nullopt;
    at::Tensor r;
    if (oi && lua_type(L, oi) == LUA_TSTRING) {
        std::string ord = lua_tostring(L, oi);
        a.finish();
        if (ord == "inf" || ord == "-inf") r = at::linalg_norm(A, c10::Scalar(ord == "inf" ? INFINITY : -INFINITY), od, keepdim);
        else r = at::linalg_norm(A, ord, od, keepdim);
    } else {
        std::optional<c10::Scalar> ord;
        if (oi) ord = c10::Scalar(lua_tonumber(L, oi));
        a.finish();
        r = at::linalg_norm(A, ord, od, keepdim);
    }
    tensor_push(L, r);
    return 1;
}

// -- files ------------------------------------------------------------------------------------

// torch.save(path, {name = tensor, ...}[, {metadata = {k = 'v'}}])
// torch.save(path, {name = tensor}[, {metadata = {key = string}}]): a safetensors file.
int f_save(lua_State * L) {
    // The tensors table has string keys like options: both positions are read by slot.
    const char * path = arg_string(L, 1, "path");
    const int ti = 2;
    if (lua_type(L, ti) != LUA_TTABLE)
        bind_fail("argument #2 (tensors): expected a table of tensors, got %s", luaL_typename(L, ti));
    Args a(L, 3);
    int mi = a.find(0, "metadata");
    if (mi && lua_type(L, mi) != LUA_TTABLE) a.fail(0, "metadata", "expected a table {key = string}, got %s", luaL_typename(L, mi));
    a.finish();
    NamedTensors ts;
    lua_pushnil(L);
    while (lua_next(L, ti)) {
        if (lua_type(L, -2) != LUA_TSTRING) bind_fail("%s: keys must be tensor names (strings), got a %s key", path, luaL_typename(L, -2));
        at::Tensor * t = tensor_test(L, -1);
        if (!t) bind_fail("%s: value of '%s' is %s, expected a Tensor", path, lua_tostring(L, -2), luaL_typename(L, -1));
        ts.emplace_back(lua_tostring(L, -2), *t);
        lua_pop(L, 1);
    }
    std::sort(ts.begin(), ts.end(), [](auto & x, auto & y) { return x.first < y.first; });
    std::map<std::string, std::string> meta;
    if (mi) {
        lua_pushnil(L);
        while (lua_next(L, mi)) {
            if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1))
                bind_fail("%s: metadata must map strings to strings", path);
            lua_pushvalue(L, -1);
            meta[lua_tostring(L, -3)] = lua_tostring(L, -1);
            lua_pop(L, 2);
        }
    }
    safetensors_save(path, ts, meta);
    return 0;
}

// torch.None: a light userdata standing for Python's None inside loaded tables (nil makes holes).
char none_sentinel;

// Pushes one unpickled value. A container met twice becomes one shared table, as in Python;
// `cache` (a stack index) maps node addresses to tables. Depth is bounded by pt_load.
void pt_push(lua_State * L, const PtValue & v, const c10::Device * dev, int cache) {
    if (!lua_checkstack(L, 8)) bind_fail("Lua stack exhausted converting a loaded value");
    switch (v.kind) {
    case PtValue::Kind::None: lua_pushlightuserdata(L, &none_sentinel); return;
    case PtValue::Kind::Bool: lua_pushboolean(L, v.boolean); return;
    case PtValue::Kind::Int: lua_pushnumber(L, (double)v.integer); return;
    case PtValue::Kind::Float: lua_pushnumber(L, v.number); return;
    case PtValue::Kind::String: case PtValue::Kind::Bytes: case PtValue::Kind::Global:
        lua_pushlstring(L, v.str.data(), v.str.size());
        return;
    case PtValue::Kind::Tensor: tensor_push(L, dev ? v.tensor.to(*dev) : v.tensor); return;
    default: break;
    }
    lua_pushlightuserdata(L, v.node.get());
    lua_rawget(L, cache);
    if (!lua_isnil(L, -1)) return;
    lua_pop(L, 1);
    lua_newtable(L);
    const int t = lua_gettop(L);
    lua_pushlightuserdata(L, v.node.get());
    lua_pushvalue(L, t);
    lua_rawset(L, cache);
    if (v.kind == PtValue::Kind::Dict) {
        // An OrderedDict's BUILD state (_metadata) is left out: it is not an entry.
        for (const auto & [k, x] : v.entries()) {
            if (k.kind == PtValue::Kind::Float && std::isnan(k.number)) bind_fail("a dict key is NaN");
            pt_push(L, k, dev, cache);
            pt_push(L, x, dev, cache);
            lua_rawset(L, t);
        }
        return;
    }
    const auto & items = v.items();
    if (v.kind == PtValue::Kind::Object) {  // {__class = 'mod.name', args = {...}, state = ...}
        lua_pushlstring(L, v.str.data(), v.str.size());
        lua_setfield(L, t, "__class");
        lua_createtable(L, (int)items.size(), 0);
        for (size_t i = 0; i < items.size(); i++) {
            pt_push(L, items[i], dev, cache);
            lua_rawseti(L, -2, (int)i + 1);
        }
        lua_setfield(L, t, "args");
        if (const PtValue * st = v.state()) {
            pt_push(L, *st, dev, cache);
            lua_setfield(L, t, "state");
        }
        return;
    }
    for (size_t i = 0; i < items.size(); i++) {
        pt_push(L, items[i], dev, cache);
        lua_rawseti(L, t, (int)i + 1);
    }
}

// A torch.save file by its first bytes; failing that, a file named *.pt or *.pth that does not
// start like safetensors (8-byte length, then '{') is one whose zip the reader should explain.
bool is_pt_file(const std::string & path) {
    if (pt_file_is_torch(path)) return true;
    char head[9] = {0};
    if (FILE * f = fopen(path.c_str(), "rb")) {
        size_t n = fread(head, 1, sizeof head, f);
        fclose(f);
        if (n == sizeof head && head[8] == '{') return false;
    }
    auto ends = [&](const char * x) {
        const size_t n = strlen(x);
        return path.size() >= n && path.compare(path.size() - n, n, x) == 0;
    };
    return ends(".pt") || ends(".pth");
}

// torch.load(path[, {device=}]): a torch.save (.pt, zip) file → its value (dicts and lists as
// tables, tensors, numbers, strings, booleans, torch.None); a safetensors file → {name = tensor},
// metadata. The format is told by the file's first bytes (see is_pt_file).
// torch.load(path[, {device=}]) -> the file's contents, one value for every format: a .pt
// file's unpickled object, a safetensors file's {name = tensor}. A safetensors header's
// metadata is read by torch.load_metadata(path).
int f_load(lua_State * L) {
    Args a(L);
    std::string path = a.opt_string(1, "path", nullptr);
    if (!a.has(1, "path")) a.fail(1, "path", "expected a file path, got nothing");
    c10::Device dev(at::kCPU);
    bool move = a.opt_device(0, "device", dev);
    a.finish();
    if (is_pt_file(path)) {
        PtValue v = pt_load(path);
        lua_newtable(L);
        const int cache = lua_gettop(L);
        pt_push(L, v, move ? &dev : nullptr, cache);
        return 1;
    }
    SafetensorsFile f = safetensors_load(path);
    lua_createtable(L, 0, (int)f.tensors.size());
    for (auto & [name, t] : f.tensors) {
        tensor_push(L, move ? t.to(dev) : t);
        lua_setfield(L, -2, name.c_str());
    }
    return 1;
}

// torch.load_metadata(path) -> {key = string}: the __metadata__ of a safetensors header.
int f_load_metadata(lua_State * L) {
    Args a(L);
    std::string path = a.opt_string(1, "path", nullptr);
    if (!a.has(1, "path")) a.fail(1, "path", "expected a file path, got nothing");
    a.finish();
    if (is_pt_file(path)) bind_fail("%s: a PyTorch .pt file has no metadata (only safetensors files carry it)", path.c_str());
    SafetensorsFile f = safetensors_load(path);
    lua_createtable(L, 0, (int)f.metadata.size());
    for (auto & [k, v] : f.metadata) {
        lua_pushlstring(L, v.data(), v.size());
        lua_setfield(L, -2, k.c_str());
    }
    return 1;
}

// torch.load_state_dict(path[, {device=}]) → {name = tensor}: nested dicts of a .pt file are
// flattened to "a.b.c" names (non-tensor values dropped); a safetensors file as is.
int f_load_state_dict(lua_State * L) {
    const char * path = arg_string(L, 1, "path");
    Args a(L, 2);
    c10::Device dev(at::kCPU);
    bool move = a.opt_device(0, "device", dev);
    a.finish();
    NamedTensors ts;
    if (is_pt_file(path)) {
        try {   // the pickle reader names the file; the state-dict walk does not know it
            ts = pt_state_dict(pt_load(path));
        } catch (const std::exception & e) {
            std::string m = e.what();
            if (m.rfind(path, 0) != 0) m = std::string(path) + ": " + m;
            throw std::runtime_error(m);
        }
    } else {
        ts = safetensors_load(path).tensors;
    }
    lua_createtable(L, 0, (int)ts.size());
    for (auto & [name, t] : ts) {
        lua_pushlstring(L, name.data(), name.size());
        tensor_push(L, move ? t.to(dev) : t);
        lua_rawset(L, -3);
    }
    return 1;
}

// -- defaults, seeds, memory, devices ----------------------------------------------------

int f_manual_seed(lua_State * L) {
    double s = arg_number(L, 1, "seed");
    if (!(s >= 0) || std::floor(s) != s || s >= 1.8e19) bind_fail("seed must be a non-negative integer, got %g", s);
    at::manual_seed((uint64_t)s);
    return 0;
}

int f_set_default_device(lua_State * L) { default_device() = device_parse(arg_string(L, 1, "device")); return 0; }
int f_get_default_device(lua_State * L) { lua_pushstring(L, default_device().str().c_str()); return 1; }
int f_set_default_dtype(lua_State * L) {
    at::ScalarType t = dtype_parse(arg_string(L, 1, "dtype"));
    if (!at::isFloatingType(t)) bind_fail("the default dtype must be a floating-point type");
    default_dtype() = t;
    return 0;
}
int f_get_default_dtype(lua_State * L) { lua_pushstring(L, dtype_name(default_dtype(), true).c_str()); return 1; }
int f_set_num_threads(lua_State * L) {
    double n = arg_number(L, 1, "n");
    if (!(n >= 1 && n <= 4096) || std::floor(n) != n) bind_fail("n: expected an integer in 1..4096, got %g", n);
    at::set_num_threads((int)n);
    return 0;
}
int f_get_num_threads(lua_State * L) { lua_pushinteger(L, at::get_num_threads()); return 1; }
int f_is_tensor(lua_State * L) { lua_pushboolean(L, tensor_test(L, 1) != nullptr); return 1; }

int f_memory_stats(lua_State * L) {
    MemStats & s = mem_stats();
    lua_createtable(L, 0, 8);
    auto set = [&](const char * k, double v) { lua_pushnumber(L, v); lua_setfield(L, -2, k); };
    set("cpu_live_bytes", (double)s.cpu_live);
    set("cpu_peak_bytes", (double)s.cpu_peak);
    set("cuda_live_bytes", (double)s.cuda_live);
    set("cuda_peak_bytes", (double)s.cuda_peak);
    set("gc_threshold_cpu", (double)s.cpu_threshold);
    set("gc_threshold_cuda", (double)s.cuda_threshold);
    set("collections", (double)s.collections);
    return 1;
}

int f_reset_peak(lua_State * L) {
    MemStats & s = mem_stats();
    s.cpu_peak = s.cpu_live;
    s.cuda_peak = s.cuda_live;
    return 0;
}

int f_collect(lua_State * L) { mem_collect(L); return 0; }
int f_set_gc_floor(lua_State * L) {
    double b = arg_number(L, 1, "bytes");
    if (!(b >= 0 && b < 9.2e18)) bind_fail("bytes: expected a non-negative number, got %g", b);
    mem_set_floor((int64_t)b);
    return 0;
}

int f_set_printoptions(lua_State * L) {
    Args a(L);
    PrintOptions & o = print_options();
    o.precision = (int)a.opt_integer(0, "precision", o.precision);
    o.threshold = a.opt_integer(0, "threshold", o.threshold);
    o.edgeitems = a.opt_integer(0, "edgeitems", o.edgeitems);
    o.linewidth = a.opt_integer(0, "linewidth", o.linewidth);
    if (a.has(0, "sci_mode")) o.sci_mode = a.opt_bool(0, "sci_mode", false) ? 1 : 0;
    a.finish();
    return 0;
}

int f_cuda_is_available(lua_State * L) { lua_pushboolean(L, at::detail::getCUDAHooks().getNumGPUs() > 0); return 1; }
int f_cuda_device_count(lua_State * L) { lua_pushinteger(L, at::detail::getCUDAHooks().getNumGPUs()); return 1; }
int f_cuda_synchronize(lua_State * L) {
#ifdef QATLAB_WITH_CUDA
    if (at::detail::getCUDAHooks().getNumGPUs() > 0) at::cuda::device_synchronize();
#endif
    return 0;
}
int f_cuda_empty_cache(lua_State * L) {
#ifdef QATLAB_WITH_CUDA
    c10::cuda::CUDACachingAllocator::emptyCache();
#endif
    return 0;
}
// Bytes allocated / reserved by the CUDA caching allocator on the current device.
int f_cuda_memory(lua_State * L) {
    lua_createtable(L, 0, 4);
#ifdef QATLAB_WITH_CUDA
    if (at::detail::getCUDAHooks().getNumGPUs() > 0) {
        auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
        auto agg = [](const auto & a) { return (double)a[0].current; };
        auto peak = [](const auto & a) { return (double)a[0].peak; };
        lua_pushnumber(L, agg(st.allocated_bytes)); lua_setfield(L, -2, "allocated_bytes");
        lua_pushnumber(L, peak(st.allocated_bytes)); lua_setfield(L, -2, "peak_allocated_bytes");
        lua_pushnumber(L, agg(st.reserved_bytes)); lua_setfield(L, -2, "reserved_bytes");
    }
#endif
    return 1;
}

// PyTorch's names for the same counters; the peak is reset per device so a benchmark can
// measure one phase (CUDA only; on a CPU-only build they read 0 and reset nothing).
int f_cuda_memory_allocated(lua_State * L) {
    double v = 0;
#ifdef QATLAB_WITH_CUDA
    if (at::detail::getCUDAHooks().getNumGPUs() > 0)
        v = (double)c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device())
                .allocated_bytes[0].current;
#endif
    lua_pushnumber(L, v);
    return 1;
}
int f_cuda_max_memory_allocated(lua_State * L) {
    double v = 0;
#ifdef QATLAB_WITH_CUDA
    if (at::detail::getCUDAHooks().getNumGPUs() > 0)
        v = (double)c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device())
                .allocated_bytes[0].peak;
#endif
    lua_pushnumber(L, v);
    return 1;
}
int f_cuda_reset_peak_memory_stats(lua_State * L) {
#ifdef QATLAB_WITH_CUDA
    if (at::detail::getCUDAHooks().getNumGPUs() > 0)
        c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
#endif
    (void)L;
    return 0;
}

// The CUDA device index of argument 1 (a number, 'cuda:N' or nothing = the current device),
// checked against the devices present.
#ifdef QATLAB_WITH_CUDA
int cuda_index_arg(lua_State * L) {
    int n = at::detail::getCUDAHooks().getNumGPUs();
    if (n == 0) bind_fail("no CUDA device is available");
    int64_t i = c10::cuda::current_device();
    if (lua_type(L, 1) == LUA_TNUMBER) {
        i = (int64_t)lua_tonumber(L, 1);
    } else if (lua_type(L, 1) == LUA_TSTRING) {
        c10::Device d = device_parse(lua_tostring(L, 1));
        if (!d.is_cuda()) bind_fail("argument #1: expected a CUDA device, got '%s'", lua_tostring(L, 1));
        if (d.has_index()) i = d.index();
    } else if (!lua_isnoneornil(L, 1)) {
        bind_fail("argument #1: expected a device index or 'cuda:N', got %s", luaL_typename(L, 1));
    }
    if (i < 0 || i >= n) bind_fail("device %lld: expected 0 <= index < %d", (long long)i, n);
    return (int)i;
}
#endif

// torch.cuda.get_device_name([device]) -> 'NVIDIA H100 80GB HBM3'
int f_cuda_get_device_name(lua_State * L) {
#ifdef QATLAB_WITH_CUDA
    lua_pushstring(L, at::cuda::getDeviceProperties(cuda_index_arg(L))->name);
    return 1;
#else
    bind_fail("no CUDA device is available (this qatlab was built against a CPU-only LibTorch)");
#endif
}

// torch.cuda.get_device_properties([device]) -> {name, total_memory, major, minor, multi_processor_count}
int f_cuda_get_device_properties(lua_State * L) {
#ifdef QATLAB_WITH_CUDA
    const cudaDeviceProp * p = at::cuda::getDeviceProperties(cuda_index_arg(L));
    lua_createtable(L, 0, 5);
    lua_pushstring(L, p->name);
    lua_setfield(L, -2, "name");
    lua_pushnumber(L, (lua_Number)p->totalGlobalMem);
    lua_setfield(L, -2, "total_memory");
    lua_pushinteger(L, p->major);
    lua_setfield(L, -2, "major");
    lua_pushinteger(L, p->minor);
    lua_setfield(L, -2, "minor");
    lua_pushinteger(L, p->multiProcessorCount);
    lua_setfield(L, -2, "multi_processor_count");
    return 1;
#else
    bind_fail("no CUDA device is available (this qatlab was built against a CPU-only LibTorch)");
#endif
}

const BindFn functions[] = {
    {"tensor", f_tensor}, {"zeros", f_zeros}, {"ones", f_ones}, {"empty", f_empty}, {"rand", f_rand},
    {"randn", f_randn}, {"full", f_full}, {"zeros_like", f_zeros_like}, {"ones_like", f_ones_like},
    {"empty_like", f_empty_like}, {"rand_like", f_rand_like}, {"randn_like", f_randn_like},
    {"full_like", f_full_like}, {"arange", f_arange}, {"linspace", f_linspace}, {"eye", f_eye},
    {"randint", f_randint}, {"randperm", f_randperm}, {"multinomial", f_multinomial},
    {"cat", f_cat_}, {"stack", f_stack}, {"einsum", f_einsum},
    {"no_grad", f_no_grad}, {"enable_grad", f_enable_grad}, {"is_grad_enabled", f_is_grad_enabled},
    {"set_grad_enabled", f_set_grad_enabled},
    {"autocast", f_autocast}, {"is_autocast_enabled", f_is_autocast_enabled},
    {"get_autocast_dtype", f_get_autocast_dtype},
    {"save", f_save}, {"load", f_load}, {"load_metadata", f_load_metadata}, {"load_state_dict", f_load_state_dict}, {"manual_seed", f_manual_seed},
    {"set_default_device", f_set_default_device}, {"get_default_device", f_get_default_device},
    {"set_default_dtype", f_set_default_dtype}, {"get_default_dtype", f_get_default_dtype},
    {"set_num_threads", f_set_num_threads}, {"get_num_threads", f_get_num_threads},
    {"is_tensor", f_is_tensor}, {"memory_stats", f_memory_stats}, {"reset_peak_memory_stats", f_reset_peak},
    {"collect", f_collect}, {"set_gc_floor", f_set_gc_floor}, {"set_printoptions", f_set_printoptions},
    {nullptr, nullptr},
};

const BindFn autograd_fns[] = {{"grad", f_autograd_grad}, {nullptr, nullptr}};
const BindFn linalg_fns[] = {{"svd", f_svd}, {"norm", f_linalg_norm}, {nullptr, nullptr}};
const BindFn cuda_fns[] = {
    {"is_available", f_cuda_is_available}, {"device_count", f_cuda_device_count},
    {"synchronize", f_cuda_synchronize}, {"empty_cache", f_cuda_empty_cache}, {"memory", f_cuda_memory},
    {"memory_allocated", f_cuda_memory_allocated}, {"max_memory_allocated", f_cuda_max_memory_allocated},
    {"reset_peak_memory_stats", f_cuda_reset_peak_memory_stats},
    {"get_device_name", f_cuda_get_device_name}, {"get_device_properties", f_cuda_get_device_properties},
    {nullptr, nullptr},
};

void sub_module(lua_State * L, int t, const char * name, const char * prefix, const BindFn * fns) {
    lua_newtable(L);
    bind_register(L, -1, prefix, fns);
    lua_setfield(L, t, name);
}

} // namespace

int luaopen_torch(lua_State * L) {
    lua_newtable(L);
    int t = lua_gettop(L);
    bind_register(L, t, "torch.", functions);
    tensor_open_methods(L, t);
    sub_module(L, t, "autograd", "torch.autograd.", autograd_fns);
    torch_open_autograd(L, t);
    sub_module(L, t, "linalg", "torch.linalg.", linalg_fns);
    sub_module(L, t, "cuda", "torch.cuda.", cuda_fns);
    static const char * dtypes[] = {"float32", "float16", "bfloat16", "float64", "int8", "uint8",
                                    "int16", "int32", "int64", "bool"};
    for (const char * d : dtypes) {
        lua_pushstring(L, d);
        lua_setfield(L, t, d);
    }
    struct { const char * alias, * name; } static const aliases[] = {
        {"float", "float32"}, {"half", "float16"}, {"double", "float64"}, {"long", "int64"}, {"int", "int32"},
        {"short", "int16"},
    };
    for (auto & al : aliases) {
        lua_pushstring(L, al.name);
        lua_setfield(L, t, al.alias);
    }
    lua_pushstring(L, TORCH_VERSION);
    lua_setfield(L, t, "version");
    lua_pushlightuserdata(L, &none_sentinel);
    lua_setfield(L, t, "None");
    return 1;
}

} // namespace qatlab
