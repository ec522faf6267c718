// torch_autograd: custom autograd in Lua: torch.autograd.Function (forward/backward callbacks on
// LibTorch's custom Function and its context), torch.autograd.gradcheck and t:register_hook.
#include "bindings/bind.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace qatlab {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {


// Autograd may run a CUDA backward on a device thread while the CPU part runs on the caller's:
// only one of them may be inside the Lua VM at a time. Recursive: a backward callback may start
// a nested backward (torch.autograd.grad) on the same thread.
std::recursive_mutex & vm_mutex() {
    static std::recursive_mutex m;
    return m;
}

// The key under which a ctx table holds its CtxLink while a callback of its Function runs.
char ctx_link_key;

// What the ctx methods may reach, valid only while forward or backward runs.
struct CtxLink {
    AutogradContext * actx;
    bool backward;
    const std::string * name;
};

// Sets ctx[&ctx_link_key] for the duration of a callback; cleared afterwards, also on errors, so a
// ctx kept by a script after its node died holds no dangling pointer.
struct LinkScope {
    lua_State * L;
    int ctx;
    LinkScope(lua_State * L_, int ctx_, CtxLink * link) : L(L_), ctx(ctx_) { set(link); }
    ~LinkScope() { set(nullptr); }
    void set(CtxLink * link) {
        lua_pushlightuserdata(L, &ctx_link_key);
        if (link) lua_pushlightuserdata(L, link);
        else lua_pushnil(L);
        lua_rawset(L, ctx);
    }
};

// Restores the Lua stack top on scope exit (errors thrown from callbacks included).
struct TopGuard {
    lua_State * L;
    int top;
    explicit TopGuard(lua_State * L_) : L(L_), top(lua_gettop(L_)) {}
    ~TopGuard() { lua_settop(L, top); }
};

// Lua values kept by one node of the graph: the Function's table (for backward and its name) and
// the ctx table. Stored as a capsule in the context's saved_data, so they die with the node (when
// the last output tensor is collected), and their references are released at the next bound call.
// Saved tensors go through the context's SavedVariables, not through Lua: a tensor kept in a ctx
// field instead would tie the graph to itself through the registry, which no collector sees.
struct LuaNodeState : torch::CustomClassHolder {
    LuaRef def, ctx;
    std::string name;
    int nargs;                   // forward arguments (gradients expected from backward)
    std::vector<int> arg_tensor; // per argument: index among tensor inputs, or -1
    std::vector<std::vector<int64_t>> arg_sizes;
    std::vector<bool> out_tensor;// per forward result: a tensor (gets a gradient) or not
    LuaNodeState(lua_State * L, int def_idx, int ctx_idx) : def(L, def_idx), ctx(L, ctx_idx) {}
};

// One apply in progress: where forward's arguments and results lie on the caller's stack.
struct ApplyCall {
    lua_State * L;
    int fn;                      // stack index of the Function table
    int first, nargs;            // its arguments
    std::string name;
    std::vector<int> arg_tensor;
    std::vector<bool> needs_grad;
    int res_first = 0, nres = 0; // forward's results, left on the stack
};

std::string fn_name(lua_State * L, int def) {
    lua_getfield(L, def, "name");
    std::string s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "Function";
    lua_pop(L, 1);
    return s;
}

std::string shape_str(at::IntArrayRef s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); i++) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
}

// Error inside a callback's C++ side, in the Function's name.
[[noreturn]] void node_fail(const std::string & name, const std::string & msg) {
    throw std::runtime_error("Function '" + name + "': " + msg);
}

// The callbacks run inside xpcall with a traceback from the failing frame up to the callback's
// own entry (the leading [C] frames of error() and the caller's frames left out), so the message
// shows where in forward, backward or the hook it failed. bind_callback still runs the wrapper:
// it keeps the Ctrl-C accounting and catches what the wrapper itself could raise.
char wrap_key;  // registry key of the wrapper, per Lua state
const char wrap_src[] = R"LUA(
local traceback, xpcall, tostring = debug.traceback, xpcall, tostring
local function handler(e)
  local out, skip = {tostring(e)}, true
  for line in traceback('', 2):gmatch('[^\n]+') do
    -- the wrapper's xpcall (a tail call, so LuaJIT may show it as a numbered builtin)
    if line:find("in function 'xpcall'", 1, true) or line:match('^%s*%[builtin#%d+%]:') then break end
    if not (skip and line:match('^%s*%[C%]:')) then
      out[#out + 1] = line
      skip = skip and line == 'stack traceback:'
    end
  end
  return table.concat(out, '\n')
end
return function(f, ...) return xpcall(f, handler, ...) end
)LUA";

// Calls the function below nargs arguments on L; returns how many results it left where the
// function was, or throws "<what>: <message and traceback>".
int call_lua(lua_State * L, int nargs, const std::string & what) {
    int fpos = lua_gettop(L) - nargs;
    lua_pushlightuserdata(L, &wrap_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_insert(L, fpos);
    bind_callback(L, nargs + 1, LUA_MULTRET, what);
    if (!lua_toboolean(L, fpos)) {
        std::string msg = lua_tostring(L, fpos + 1) ? lua_tostring(L, fpos + 1) : "error object is not a string";
        lua_settop(L, fpos - 1);
        throw std::runtime_error(what + ": " + msg);
    }
    lua_remove(L, fpos);
    return lua_gettop(L) - fpos + 1;
}

// The single C++ Function type behind every Lua Function: its static forward and backward call
// the Lua callbacks; inputs are the tensor arguments, the call itself rides as a non-tensor one.
struct LuaFunction : torch::autograd::Function<LuaFunction> {
    static variable_list forward(AutogradContext * actx, at::TensorList inputs, ApplyCall * call) {
        lua_State * L = call->L;
        lua_checkstack(L, call->nargs + 8);
        // the ctx table: PyTorch's needs_input_grad, then the user's own fields
        lua_newtable(L);
        int ctx = lua_gettop(L);
        luaL_getmetatable(L, QATLAB_CTX_MT);
        lua_setmetatable(L, ctx);
        lua_createtable(L, call->nargs, 0);
        for (int i = 0; i < call->nargs; i++) {
            lua_pushboolean(L, call->needs_grad[i]);
            lua_rawseti(L, -2, i + 1);
        }
        lua_setfield(L, ctx, "needs_input_grad");
        auto st = c10::make_intrusive<LuaNodeState>(L, call->fn, ctx);
        st->name = call->name;
        st->nargs = call->nargs;
        st->arg_tensor = call->arg_tensor;
        actx->saved_data["lua"] = c10::IValue::make_capsule(st);

        for (const at::Tensor & t : inputs) st->arg_sizes.push_back(t.sizes().vec());

        // the ctx table stays below the call, so the scope can clear its link afterwards
        CtxLink link{actx, false, &st->name};
        {
            LinkScope scope(L, ctx, &link);
            lua_getfield(L, call->fn, "forward");
            lua_pushvalue(L, ctx);
            for (int i = 0; i < call->nargs; i++) lua_pushvalue(L, call->first + i);
            call_lua(L, call->nargs + 1, "Function '" + call->name + "': forward");
            call->res_first = ctx + 1;
            call->nres = lua_gettop(L) - ctx;
        }
        variable_list outs;
        for (int i = 0; i < call->nres; i++) {
            int idx = call->res_first + i;
            at::Tensor * t = tensor_test(L, idx);
            st->out_tensor.push_back(t != nullptr);
            if (!t) continue;
            if (!t->defined())
                node_fail(call->name, "forward returned a freed tensor as result #" + std::to_string(i + 1));
            outs.push_back(*t);
        }
        return outs;
    }

    static variable_list backward(AutogradContext * actx, variable_list grads) {
        auto it = actx->saved_data.find("lua");
        if (it == actx->saved_data.end())
            throw std::runtime_error("a Function's backward ran a second time after its graph was freed: "
                                     "call backward with retain_graph = true the first time");
        c10::intrusive_ptr<torch::CustomClassHolder> cap = it->second.toCapsule();
        auto * st = static_cast<LuaNodeState *>(cap.get());
        std::lock_guard<std::recursive_mutex> lock(vm_mutex());
        lua_State * L = bind_current_state();
        if (!L) node_fail(st->name, "backward ran outside any Lua call (no Lua state to run it on)");
        TopGuard top(L);
        lua_checkstack(L, (int)st->out_tensor.size() + 8);
        st->ctx.push(L);
        int ctx = lua_gettop(L);
        CtxLink link{actx, true, &st->name};
        LinkScope scope(L, ctx, &link);
        st->def.push(L);
        lua_getfield(L, -1, "backward");
        lua_remove(L, -2);
        lua_pushvalue(L, ctx);
        size_t k = 0;
        for (bool is_t : st->out_tensor) {
            if (is_t && k < grads.size()) tensor_push(L, grads[k++]);
            else lua_pushnil(L);
        }
        int base = lua_gettop(L) - (int)st->out_tensor.size() - 1;
        call_lua(L, (int)st->out_tensor.size() + 1, "Function '" + st->name + "': backward");
        int nret = lua_gettop(L) - base + 1;
        // as PyTorch: extra trailing nils are fine, any other count is an error
        while (nret > st->nargs && lua_isnil(L, base + nret - 1)) nret--;
        if (nret != st->nargs)
            node_fail(st->name, "backward returned " + std::to_string(nret) + " value(s), expected " +
                                    std::to_string(st->nargs) + " (one gradient or nil per forward argument)");
        variable_list out;
        for (int i = 0; i < st->nargs; i++) {
            int idx = base + i;
            int ti = st->arg_tensor[i];
            at::Tensor * g = tensor_test(L, idx);
            if (ti < 0) {
                if (!lua_isnil(L, idx))
                    node_fail(st->name, "backward returned a " + std::string(g ? "tensor" : luaL_typename(L, idx)) +
                                            " for argument #" + std::to_string(i + 1) +
                                            ", which is not a tensor (expected nil)");
                continue;
            }
            if (lua_isnil(L, idx)) {
                out.emplace_back();
                continue;
            }
            if (!g || !g->defined())
                node_fail(st->name, "backward returned a " + std::string(g ? "freed tensor" : luaL_typename(L, idx)) +
                                        " for argument #" + std::to_string(i + 1) + " (expected a tensor or nil)");
            const std::vector<int64_t> & want = st->arg_sizes[ti];
            at::Tensor grad = *g;
            if (grad.sizes() != at::IntArrayRef(want)) {
                // a broadcast gradient sums back to the input's shape, as PyTorch's engine does
                if (at::is_expandable_to(want, grad.sizes())) grad = at::sum_to(grad, want);
                else
                    node_fail(st->name, "backward returned a gradient of shape " + shape_str(g->sizes()) +
                                            " for argument #" + std::to_string(i + 1) + ", expected " +
                                            shape_str(want));
            }
            out.push_back(grad);
        }
        out.emplace_back();  // the ApplyCall pointer's slot
        return out;
    }
};

// -- Function objects ---------------------------------------------------------------------------

// torch.autograd.Function{forward = f, backward = g, name = 'STE'}: the Function table itself,
// with :apply and __call from its metatable.
int f_function(lua_State * L) {
    if (!is_options_table(L, 1) || lua_gettop(L) != 1)
        bind_fail("expected one table {forward = function(ctx, ...), backward = function(ctx, ...), name = ...}");
    Args a(L);
    int fw = a.find(0, "forward"), bw = a.find(0, "backward"), nm = a.find(0, "name");
    a.finish();
    if (!fw || lua_type(L, fw) != LUA_TFUNCTION)
        bind_fail("field 'forward': expected a function, got %s", fw ? luaL_typename(L, fw) : "nil");
    if (!bw || lua_type(L, bw) != LUA_TFUNCTION)
        bind_fail("field 'backward': expected a function, got %s", bw ? luaL_typename(L, bw) : "nil");
    if (nm && lua_type(L, nm) != LUA_TSTRING) bind_fail("field 'name': expected a string, got %s", luaL_typename(L, nm));
    lua_createtable(L, 0, 3);
    lua_pushvalue(L, fw);
    lua_setfield(L, -2, "forward");
    lua_pushvalue(L, bw);
    lua_setfield(L, -2, "backward");
    if (nm) lua_pushvalue(L, nm);
    else lua_pushstring(L, "Function");
    lua_setfield(L, -2, "name");
    luaL_getmetatable(L, QATLAB_FUNCTION_MT);
    lua_setmetatable(L, -2);
    return 1;
}

// Fn:apply(...) and Fn(...): tensors among the arguments become the node's inputs; every argument
// reaches forward unchanged. Returns forward's results, tensors wrapped with the node as grad_fn.
int f_apply(lua_State * L) {
    if (lua_type(L, 1) != LUA_TTABLE || !lua_getmetatable(L, 1))
        bind_fail("expected a Function (call it as Fn:apply(...) or Fn(...)), got %s", luaL_typename(L, 1));
    luaL_getmetatable(L, QATLAB_FUNCTION_MT);
    bool ok = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (!ok) bind_fail("expected a Function (call it as Fn:apply(...) or Fn(...)), got a table");
    ApplyCall call;
    call.L = L;
    call.fn = 1;
    call.first = 2;
    call.nargs = lua_gettop(L) - 1;
    call.name = fn_name(L, 1);
    std::vector<at::Tensor> inputs;
    bool any_grad = false;
    for (int i = 0; i < call.nargs; i++) {
        at::Tensor * t = tensor_test(L, call.first + i);
        if (t && !t->defined())
            bind_fail("Function '%s': argument #%d: the tensor was freed (t:free() was called on it)",
                      call.name.c_str(), i + 1);
        call.arg_tensor.push_back(t ? (int)inputs.size() : -1);
        if (t) {
            inputs.push_back(*t);
            any_grad = any_grad || t->requires_grad();
        }
    }
    bool executable = at::GradMode::is_enabled() && any_grad;
    for (int i = 0; i < call.nargs; i++) {
        int ti = call.arg_tensor[i];
        call.needs_grad.push_back(executable && ti >= 0 && inputs[ti].requires_grad());
    }
    variable_list outs = LuaFunction::apply(at::TensorList(inputs), &call);
    // results: tensors replaced by their wrapped versions, other values as forward returned them
    size_t k = 0;
    for (int i = 0; i < call.nres; i++) {
        int idx = call.res_first + i;
        if (!tensor_test(L, idx)) continue;
        tensor_push(L, outs[k++]);
        lua_replace(L, idx);
    }
    return call.nres;
}

// -- ctx ------------------------------------------------------------------------------------------

CtxLink & ctx_link(lua_State * L, const char * what) {
    if (lua_type(L, 1) != LUA_TTABLE) bind_fail("expected a ctx (call it as ctx:%s(...)), got %s", what, luaL_typename(L, 1));
    lua_pushlightuserdata(L, &ctx_link_key);
    lua_rawget(L, 1);
    auto * link = static_cast<CtxLink *>(lua_touserdata(L, -1));
    lua_pop(L, 1);
    if (!link) bind_fail("only valid while the Function's forward or backward runs");
    return *link;
}

variable_list ctx_tensors(lua_State * L, const CtxLink & link) {
    variable_list ts;
    for (int i = 2; i <= lua_gettop(L); i++) {
        if (lua_isnil(L, i)) {
            ts.emplace_back();
            continue;
        }
        at::Tensor * t = tensor_test(L, i);
        if (!t || !t->defined())
            bind_fail("Function '%s': argument #%d: expected a tensor, got %s", link.name->c_str(), i - 1,
                      t ? "a freed tensor" : luaL_typename(L, i));
        ts.push_back(*t);
    }
    return ts;
}

int ctx_save_for_backward(lua_State * L) {
    CtxLink & link = ctx_link(L, "save_for_backward");
    if (link.backward) bind_fail("Function '%s': only valid in forward", link.name->c_str());
    link.actx->save_for_backward(ctx_tensors(L, link));
    return 0;
}

int ctx_mark_non_differentiable(lua_State * L) {
    CtxLink & link = ctx_link(L, "mark_non_differentiable");
    if (link.backward) bind_fail("Function '%s': only valid in forward", link.name->c_str());
    link.actx->mark_non_differentiable(ctx_tensors(L, link));
    return 0;
}

int ctx_set_materialize_grads(lua_State * L) {
    CtxLink & link = ctx_link(L, "set_materialize_grads");
    if (link.backward) bind_fail("Function '%s': only valid in forward", link.name->c_str());
    link.actx->set_materialize_grads(lua_toboolean(L, 2));
    return 0;
}

// ctx.saved_tensors: the tensors forward saved, checked against in-place changes since.
int ctx_saved_tensors(lua_State * L) {
    CtxLink & link = ctx_link(L, "saved_tensors");
    if (!link.backward)
        bind_fail("Function '%s': saved tensors can be read in backward only", link.name->c_str());
    variable_list ts = link.actx->get_saved_variables();
    lua_createtable(L, (int)ts.size(), 0);
    for (size_t i = 0; i < ts.size(); i++) {
        tensor_push(L, ts[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

// -- tensor hooks ---------------------------------------------------------------------------------

struct HookHandle {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> tensor;
    unsigned pos;
    bool removed;
};

// "tensor hook (file.lua:12)": where the hook function was defined, to name it in errors.
std::string hook_label(lua_State * L, int idx) {
    lua_Debug ar;
    lua_pushvalue(L, idx);
    std::string s = "tensor hook";
    if (lua_getinfo(L, ">S", &ar) && ar.linedefined > 0)
        s += std::string(" (") + ar.short_src + ":" + std::to_string(ar.linedefined) + ")";
    return s;
}

// t:register_hook(fn) → handle; fn(grad) runs when the gradient of t is computed and may return
// a replacement (nil keeps it). handle:remove() unregisters it.
int t_register_hook(lua_State * L) {
    Args a(L);
    at::Tensor & self = a.tensor(1, "self");
    int fi = a.opt_function(2, "fn");
    if (!fi) a.fail(2, "fn", "expected a function, got nothing");
    a.finish();
    if (!self.requires_grad())
        bind_fail("cannot register a hook on a tensor that does not require grad");
    auto fn = std::make_shared<LuaRef>(L, fi);
    auto label = std::make_shared<std::string>(hook_label(L, fi));
    unsigned pos = self.register_hook([fn, label](const at::Tensor & grad) -> at::Tensor {
        std::lock_guard<std::recursive_mutex> lock(vm_mutex());
        lua_State * S = bind_current_state();
        if (!S) throw std::runtime_error(*label + ": ran outside any Lua call (no Lua state to run it on)");
        TopGuard top(S);
        lua_checkstack(S, 4);
        fn->push(S);
        tensor_push(S, grad);
        int n = call_lua(S, 1, *label), ri = lua_gettop(S) - n + 1;
        if (n == 0 || lua_isnil(S, ri)) return at::Tensor();
        at::Tensor * r = tensor_test(S, ri);
        if (!r || !r->defined())
            throw std::runtime_error(*label + ": returned a " + (r ? std::string("freed tensor") : luaL_typename(S, ri)) +
                                     " (expected a tensor or nil)");
        if (r->sizes() != grad.sizes())
            throw std::runtime_error(*label + ": returned a gradient of shape " + shape_str(r->sizes()) +
                                     ", expected " + shape_str(grad.sizes()));
        return *r;
    });
    udata_new<HookHandle>(L, QATLAB_GRAD_HOOK_MT, c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                          self.getIntrusivePtr()), pos, false);
    return 1;
}

int hook_remove(lua_State * L) {
    HookHandle & h = udata_check<HookHandle>(L, 1, QATLAB_GRAD_HOOK_MT, "a hook handle");
    if (h.removed) return 0;
    h.removed = true;
    auto p = h.tensor.lock();
    if (p.defined()) at::Tensor(std::move(p)).remove_hook(h.pos);
    return 0;
}

// -- gradcheck, in Lua ----------------------------------------------------------------------------

// Central differences in float64 against the Jacobian autograd gives, one backward per output
// element; the worst element is reported as analytical vs numerical.
const char gradcheck_src[] = R"LUA(
local torch = ...
local unpack = unpack or table.unpack
local known = {eps = true, atol = true, rtol = true, raise_exception = true}

local function fail(msg) error('torch.autograd.gradcheck: ' .. msg, 0) end

local function tensors_of(...)
  local r = {}
  for i = 1, select('#', ...) do
    local v = select(i, ...)
    if torch.is_tensor(v) then r[#r + 1] = v end
  end
  return r
end

local function where(t, e)  -- 1-based position of flat element e in t, as "[i, j]"
  local s, idx, rem = t:size(), {}, e - 1
  for d = #s, 1, -1 do idx[d] = rem % s[d] + 1; rem = math.floor(rem / s[d]) end
  return '[' .. table.concat(idx, ', ') .. ']'
end

local function gradcheck(fn, inputs, opts)
  if type(fn) ~= 'function' and not (type(fn) == 'table' and getmetatable(fn) and getmetatable(fn).__call) then
    fail('argument #1 (fn): expected a function, got ' .. type(fn))
  end
  if torch.is_tensor(inputs) then inputs = {inputs} end
  if type(inputs) ~= 'table' then fail('argument #2 (inputs): expected a tensor or a table, got ' .. type(inputs)) end
  opts = opts or {}
  for k in pairs(opts) do
    if not known[k] then fail(("unknown option '%s' (this call takes: eps, atol, rtol, raise_exception)"):format(tostring(k))) end
  end
  local eps, atol, rtol = opts.eps or 1e-6, opts.atol or 1e-5, opts.rtol or 1e-3
  local raise = opts.raise_exception ~= false
  local n = inputs.n or #inputs
  local wrt = {}
  for i = 1, n do
    local x = inputs[i]
    if torch.is_tensor(x) and x.requires_grad then
      if x.dtype ~= 'float64' then
        fail(('input %d is %s: finite differences need float64 inputs'):format(i, tostring(x.dtype)))
      end
      wrt[#wrt + 1] = i
    end
  end
  if #wrt == 0 then fail('no input requires grad (call requires_grad_() on the float64 inputs to check)') end

  local outs = tensors_of(fn(unpack(inputs, 1, n)))
  if #outs == 0 then fail('fn returned no tensor') end
  for oi, out in ipairs(outs) do
    local m = out:numel()
    -- analytical Jacobian: row r from one backward with a one-hot gradient
    local ana = {}
    for _, i in ipairs(wrt) do ana[i] = torch.zeros(m, inputs[i]:numel(), {dtype = 'float64'}) end
    if out.requires_grad then
      local xs = {}
      for j, i in ipairs(wrt) do xs[j] = inputs[i] end
      for r = 1, m do
        local go = torch.zeros_like(out)
        go:view(-1)[r] = 1
        local gs = torch.autograd.grad({out}, xs, {grad_outputs = {go}, retain_graph = true, allow_unused = true})
        for j, i in ipairs(wrt) do
          if gs[j] then ana[i][r] = gs[j]:reshape(-1):double() end
        end
      end
    end
    -- numerical Jacobian: column c from f(x + eps e_c) - f(x - eps e_c)
    for _, i in ipairs(wrt) do
      local flat = inputs[i]:detach():view(-1)
      local num = torch.zeros(m, flat:numel(), {dtype = 'float64'})
      torch.no_grad(function()
        for c = 1, flat:numel() do
          local v = flat[c]:item()
          flat[c] = v + eps
          local fp = tensors_of(fn(unpack(inputs, 1, n)))[oi]:reshape(-1):double()
          flat[c] = v - eps
          local fm = tensors_of(fn(unpack(inputs, 1, n)))[oi]:reshape(-1):double()
          flat[c] = v
          num[{':', c}] = (fp - fm) / (2 * eps)
        end
      end)
      local excess = (ana[i] - num):abs() - (num:abs() * rtol + atol)
      local worst, at = excess:view(-1):max(1)
      if worst:item() > 0 then
        at = at:item()
        local r, c = math.floor(at / flat:numel()) + 1, at % flat:numel() + 1
        local msg = ('Jacobian mismatch for output %d with respect to input %d: worst at output element %s, ' ..
                     'input element %s: analytical %.10g vs numerical %.10g (atol %g, rtol %g)'):format(
                     oi, i, where(out, r), where(inputs[i], c), ana[i][r][c]:item(), num[r][c]:item(), atol, rtol)
        if raise then fail(msg) end
        return false, msg
      end
    end
  end
  return true
end

-- errors from fn or from bad arguments deep inside come out named, as a bound call's do
return function(...)
  local r = {pcall(gradcheck, ...)}
  if r[1] then return unpack(r, 2, 3) end
  local e = tostring(r[2])
  if e:sub(1, 26) ~= 'torch.autograd.gradcheck: ' then e = 'torch.autograd.gradcheck: ' .. e end
  error(e, 0)
end
)LUA";

const BindFn autograd_fns[] = {{"Function", f_function}, {nullptr, nullptr}};
const BindFn function_methods[] = {{"apply", f_apply}, {nullptr, nullptr}};
const BindFn ctx_methods[] = {
    {"save_for_backward", ctx_save_for_backward}, {"mark_non_differentiable", ctx_mark_non_differentiable},
    {"set_materialize_grads", ctx_set_materialize_grads}, {nullptr, nullptr},
};
const BindFn hook_methods[] = {{"remove", hook_remove}, {nullptr, nullptr}};

int function_tostring(lua_State * L) {
    std::string s = "autograd.Function '" + fn_name(L, 1) + "'";
    lua_pushstring(L, s.c_str());
    return 1;
}

} // namespace

// Fills torch.autograd (Function, gradcheck) and adds register_hook to the Tensor methods.
void torch_open_autograd(lua_State * L, int torch_table) {
    torch_table = torch_table < 0 ? lua_gettop(L) + torch_table + 1 : torch_table;
    lua_getfield(L, torch_table, "autograd");
    int ag = lua_gettop(L);
    bind_register(L, ag, "torch.autograd.", autograd_fns);

    // Function: methods in __index, Fn(...) as Fn:apply(...)
    luaL_newmetatable(L, QATLAB_FUNCTION_MT);
    lua_newtable(L);
    bind_register(L, -1, "Function:", function_methods);
    lua_getfield(L, -1, "apply");
    lua_setfield(L, -3, "__call");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, function_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);

    // ctx: the user's fields live in the table; methods and saved_tensors come from __index
    luaL_newmetatable(L, QATLAB_CTX_MT);
    static const char ctx_index[] =
        "local methods, saved = ...\n"
        "return function(ctx, k)\n"
        "  local v = methods[k]\n"
        "  if v ~= nil then return v end\n"
        "  if k == 'saved_tensors' then return saved(ctx) end\n"
        "end\n";
    if (luaL_loadbuffer(L, ctx_index, sizeof(ctx_index) - 1, "=ctx.__index") != 0) lua_error(L);
    lua_newtable(L);
    bind_register(L, -1, "ctx:", ctx_methods);
    bind_push_function(L, "ctx.saved_tensors", ctx_saved_tensors);
    lua_call(L, 2, 1);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    udata_open_metatable<HookHandle>(L, QATLAB_GRAD_HOOK_MT, "RemovableHandle", hook_methods);
    lua_pop(L, 1);

    lua_pushlightuserdata(L, &wrap_key);
    if (luaL_loadbuffer(L, wrap_src, sizeof(wrap_src) - 1, "=autograd callback") != 0) lua_error(L);
    lua_call(L, 0, 1);
    lua_rawset(L, LUA_REGISTRYINDEX);

    if (luaL_loadbuffer(L, gradcheck_src, sizeof(gradcheck_src) - 1, "=torch.autograd.gradcheck") != 0) lua_error(L);
    lua_pushvalue(L, torch_table);
    lua_call(L, 1, 1);
    lua_setfield(L, ag, "gradcheck");
    lua_pop(L, 1);

    static const BindFn tensor_fns[] = {{"register_hook", t_register_hook}, {nullptr, nullptr}};
    lua_getfield(L, torch_table, "Tensor");
    bind_register(L, -1, "Tensor.", tensor_fns);
    lua_pop(L, 1);
}

} // namespace qatlab
