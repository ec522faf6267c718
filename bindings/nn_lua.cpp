// nn_lua: Lua inside the model: module hooks keyed by Hugging Face name, Lua layers set in place
// of any projection (LuaLinear), named_modules, get_submodule, the chunked next-token loss.
#include "bindings/bind.h"
#include "lib/model.h"
#include "lib/quant_intn.h"
#include "lib/quant_lut.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

namespace qatlab {

namespace {

lua_State * callback_state(const std::string & what) {
    lua_State * L = bind_current_state();
    if (!L) throw std::runtime_error(what + ": called outside any Lua call (no Lua state to run it on)");
    lua_checkstack(L, 8);
    return L;
}

std::string shape_str(at::IntArrayRef s) {
    std::ostringstream o;
    o << "(";
    for (size_t i = 0; i < s.size(); i++) o << (i ? ", " : "") << s[i];
    o << (s.size() == 1 ? ",)" : ")");
    return o.str();
}

// -- Lua layers ------------------------------------------------------------------------------

// A projection computed by a Lua object: forward(self, x), its tensors as parameters
// (named_parameters(self) when it has one, else its tensor fields), optional weight(self)
// and train(self, on). Parameter slots point into the tensors' userdata, so model:to() and
// load_state_dict() act on the very tensors the Lua object holds.
struct LuaLinear : Linear {
    std::shared_ptr<LuaRef> obj;
    int64_t in_ = 0, out_ = 0;
    std::string what;   // name in errors until set_linear gives the module name

    std::string label() const { return "Lua layer " + (module_name.empty() ? what : module_name); }

    // Pushes obj[name] (nil when obj is not indexable).
    void push_field(lua_State * L, const char * name) const {
        obj->push(L);
        if (lua_istable(L, -1) || lua_isuserdata(L, -1)) {
            lua_getfield(L, -1, name);
            lua_remove(L, -2);
        } else {
            lua_pop(L, 1);
            lua_pushnil(L);
        }
    }

    at::Tensor forward(const at::Tensor & x) override {
        const std::string lab = label();
        lua_State * L = callback_state(lab);
        push_field(L, "forward");
        if (!lua_isfunction(L, -1)) {
            lua_pop(L, 1);
            throw std::runtime_error(lab + ": has no forward(self, x) method");
        }
        obj->push(L);
        tensor_push(L, x);
        bind_callback(L, 2, 1, lab + ":forward");
        at::Tensor * t = tensor_test(L, -1);
        if (!t || !t->defined()) {
            std::string ty = luaL_typename(L, -1);
            lua_pop(L, 1);
            throw std::runtime_error(lab + ":forward: expected a Tensor result, got " + ty);
        }
        at::Tensor y = *t;
        lua_pop(L, 1);
        std::vector<int64_t> want(x.sizes().begin(), x.sizes().end());
        want.back() = out_;
        if (y.sizes() != at::IntArrayRef(want))
            throw std::runtime_error(lab + ":forward: returned shape " + shape_str(y.sizes()) + " for input " +
                                     shape_str(x.sizes()) + ", expected " + shape_str(want));
        if (y.device() != x.device())
            throw std::runtime_error(lab + ":forward: returned a tensor on " + y.device().str() + " for input on " +
                                     x.device().str());
        if (y.scalar_type() != x.scalar_type() &&
            !(at::isFloatingType(y.scalar_type()) && at::autocast::is_autocast_enabled(x.device().type())))
            throw std::runtime_error(lab + ":forward: returned " + std::string(c10::toString(y.scalar_type())) +
                                     " for " + c10::toString(x.scalar_type()) + " input (outside autocast the dtype must match)");
        return y;
    }

    std::vector<std::pair<std::string, at::Tensor *>> parameter_slots() override {
        const std::string lab = label();
        lua_State * L = callback_state(lab);
        const int top = lua_gettop(L);
        std::vector<std::pair<std::string, at::Tensor *>> out;
        auto add = [&](const std::string & name, int idx) {
            at::Tensor * t = tensor_test(L, idx);
            if (!t) {
                lua_settop(L, top);
                throw std::runtime_error(lab + ": parameter '" + name + "' is not a Tensor");
            }
            if (!t->defined()) {
                lua_settop(L, top);
                throw std::runtime_error(lab + ": parameter '" + name + "' was freed");
            }
            out.push_back({name, t});
        };
        // named_tensors (nn.Module: parameters and buffers), else named_parameters, else fields.
        const char * lister = "named_tensors";
        push_field(L, lister);
        if (!lua_isfunction(L, -1)) {
            lua_pop(L, 1);
            lister = "named_parameters";
            push_field(L, lister);
        }
        if (lua_isfunction(L, -1)) {
            obj->push(L);
            bind_callback(L, 1, 1, lab + ":" + lister);
            if (!lua_istable(L, -1)) {
                lua_settop(L, top);
                throw std::runtime_error(lab + ":" + lister + ": expected a table of {name, tensor} pairs");
            }
            const int res = lua_gettop(L);
            int n = (int)lua_objlen(L, res);
            if (n > 0) {
                for (int i = 1; i <= n; i++) {
                    lua_rawgeti(L, res, i);
                    lua_rawgeti(L, -1, 1);
                    lua_rawgeti(L, -2, 2);
                    if (lua_type(L, -2) != LUA_TSTRING) {
                        lua_settop(L, top);
                        throw std::runtime_error(lab + ":" + lister + ": entry " + std::to_string(i) +
                                                 " is not a {name, tensor} pair");
                    }
                    add(lua_tostring(L, -2), lua_gettop(L));
                    lua_pop(L, 3);
                }
            } else {
                lua_pushnil(L);
                while (lua_next(L, res)) {
                    if (lua_type(L, -2) == LUA_TSTRING) add(lua_tostring(L, -2), lua_gettop(L));
                    lua_pop(L, 1);
                }
                std::sort(out.begin(), out.end(), [](auto & a, auto & b) { return a.first < b.first; });
            }
        } else {
            lua_pop(L, 1);
            obj->push(L);
            if (lua_istable(L, -1)) {
                const int o = lua_gettop(L);
                lua_pushnil(L);
                while (lua_next(L, o)) {
                    if (lua_type(L, -2) == LUA_TSTRING && tensor_test(L, -1)) add(lua_tostring(L, -2), lua_gettop(L));
                    lua_pop(L, 1);
                }
                std::sort(out.begin(), out.end(), [](auto & a, auto & b) { return a.first < b.first; });
            }
        }
        lua_settop(L, top);
        return out;
    }

    at::Tensor weight() override {
        const std::string lab = label();
        lua_State * L = callback_state(lab);
        // dense_weight() first: a layer whose `weight` field is a float master (V2) names its
        // effective weight so; else weight() or a `weight` tensor field.
        const char * getter = "dense_weight";
        push_field(L, getter);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            getter = "weight";
            push_field(L, getter);
        }
        if (lua_isfunction(L, -1)) {
            obj->push(L);
            bind_callback(L, 1, 1, lab + ":" + getter);
        }
        at::Tensor * t = tensor_test(L, -1);
        if (!t || !t->defined()) {
            lua_pop(L, 1);
            throw std::runtime_error(lab + ": has no weight() or dense_weight() method returning the dense (out, in) "
                                     "weight it computes with; saving it as a plain model needs one");
        }
        at::Tensor w = t->detach();
        lua_pop(L, 1);
        if (w.dim() != 2 || w.size(0) != out_ || w.size(1) != in_)
            throw std::runtime_error(lab + ":" + getter + ": returned shape " + shape_str(w.sizes()) + ", expected (" +
                                     std::to_string(out_) + ", " + std::to_string(in_) + ")");
        return w;
    }

    // A plain model file holds the dense weight (and a `bias` tensor field, when there is one).
    std::vector<std::pair<std::string, at::Tensor>> save_tensors(const std::string & prefix) override {
        std::vector<std::pair<std::string, at::Tensor>> out{{prefix + ".weight", weight()}};
        lua_State * L = callback_state(label());
        push_field(L, "bias");
        if (at::Tensor * b = tensor_test(L, -1))
            if (b->defined()) out.push_back({prefix + ".bias", b->detach()});
        lua_pop(L, 1);
        return out;
    }

    void train(bool on) override {
        lua_State * L = callback_state(label());
        push_field(L, "train");
        if (lua_isfunction(L, -1)) {
            obj->push(L);
            lua_pushboolean(L, on);
            bind_callback(L, 2, 0, label() + ":train");
            return;
        }
        lua_pop(L, 1);
        obj->push(L);
        if (lua_istable(L, -1)) {
            lua_pushboolean(L, on);
            lua_setfield(L, -2, "training");
        }
        lua_pop(L, 1);
    }

    void slot_assign(at::Tensor * slot, at::Tensor value) override {
        tensor_assign(callback_state(label()), *slot, std::move(value));
    }

    int64_t in_features() const override { return in_; }
    int64_t out_features() const override { return out_; }
};

// obj.<name> as a positive integer (a field, or a method's result).
int64_t feature_count(lua_State * L, int obj, const char * name, const std::string & what) {
    lua_getfield(L, obj, name);
    if (lua_isfunction(L, -1)) {
        lua_pushvalue(L, obj);
        bind_callback(L, 1, 1, what + ":" + name);
    }
    double v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : -1;
    std::string ty = luaL_typename(L, -1);
    lua_pop(L, 1);
    if (!(v >= 1) || v != (double)(int64_t)v)
        bind_fail("%s: expected a field %s (a positive integer), got %s", what.c_str(), name,
                  ty == "number" ? std::to_string(v).c_str() : ty.c_str());
    return (int64_t)v;
}

// -- hooks -----------------------------------------------------------------------------------


struct HookHandleUD {
    std::weak_ptr<DecoderModel> model;
    int64_t handle;
};

// The modules a hook names: an exact module name, a Lua pattern (string.find) over the names,
// or an array of exact names. Matching nothing is an error.
std::vector<std::string> hook_modules(lua_State * L, int idx, DecoderModel & m) {
    auto names = m.module_names();
    std::vector<std::string> out;
    if (lua_type(L, idx) == LUA_TTABLE) {
        int n = (int)lua_objlen(L, idx);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            if (lua_type(L, -1) != LUA_TSTRING) bind_fail("argument #1 (module): entry %d is not a module name", i);
            std::string s = lua_tostring(L, -1);
            lua_pop(L, 1);
            if (std::find(names.begin(), names.end(), s) == names.end())
                bind_fail("argument #1 (module): no module named '%s' (see named_modules())", s.c_str());
            out.push_back(s);
        }
        if (out.empty()) bind_fail("argument #1 (module): empty list of module names");
        return out;
    }
    if (lua_type(L, idx) != LUA_TSTRING)
        bind_fail("argument #1 (module): expected a module name, a Lua pattern or an array of names, got %s",
                  luaL_typename(L, idx));
    std::string pat = lua_tostring(L, idx);
    if (std::find(names.begin(), names.end(), pat) != names.end()) return {pat};
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    lua_getfield(L, -1, "string");
    lua_getfield(L, -1, "find");
    const int find = lua_gettop(L);
    for (auto & n : names) {
        lua_pushvalue(L, find);
        lua_pushstring(L, n.c_str());
        lua_pushstring(L, pat.c_str());
        if (lua_pcall(L, 2, 1, 0) != 0) {
            std::string msg = lua_tostring(L, -1) ? lua_tostring(L, -1) : "?";
            lua_pop(L, 4);
            bind_fail("argument #1 (module): bad Lua pattern '%s': %s", pat.c_str(), msg.c_str());
        }
        if (!lua_isnil(L, -1)) out.push_back(n);
        lua_pop(L, 1);
    }
    lua_pop(L, 3);
    if (out.empty())
        bind_fail("argument #1 (module): '%s' is no module name and, as a Lua pattern, matches none (see named_modules())",
                  pat.c_str());
    return out;
}

// A hook's result: nil keeps the value, a Tensor replaces it.
at::Tensor hook_result(lua_State * L, const std::string & what) {
    at::Tensor r;
    if (!lua_isnil(L, -1)) {
        at::Tensor * t = tensor_test(L, -1);
        if (!t || !t->defined()) {
            std::string ty = luaL_typename(L, -1);
            lua_pop(L, 1);
            throw std::runtime_error(what + ": expected a replacement Tensor or nil, got " + ty);
        }
        r = *t;
    }
    lua_pop(L, 1);
    return r;
}

void handle_push(lua_State * L, const std::shared_ptr<DecoderModel> & m, int64_t h) {
    udata_new<HookHandleUD>(L, QATLAB_HOOK_MT, std::weak_ptr<DecoderModel>(m), h);
}

// model:register_forward_hook(module, fn) -> handle; fn(name, input, output) -> output | nil
int m_register_forward_hook(lua_State * L) {
    auto m = nn_model_shared(L, 1);
    if (lua_type(L, 3) != LUA_TFUNCTION) bind_fail("argument #2 (hook): expected a function(name, input, output)");
    if (lua_gettop(L) > 3) bind_fail("expected 2 arguments (module, hook), got %d", lua_gettop(L) - 1);
    auto modules = hook_modules(L, 2, *m);
    auto fn = std::make_shared<LuaRef>(L, 3);
    int64_t h = m->register_forward_hook(modules, [fn](const std::string & name, const at::Tensor & in, const at::Tensor & out) {
        const std::string what = "forward hook on " + name;
        lua_State * S = callback_state(what);
        fn->push(S);
        lua_pushstring(S, name.c_str());
        tensor_push(S, in);
        tensor_push(S, out);
        bind_callback(S, 3, 1, what);
        return hook_result(S, what);
    });
    handle_push(L, m, h);
    return 1;
}

// model:register_forward_pre_hook(module, fn) -> handle; fn(name, input) -> input | nil
int m_register_forward_pre_hook(lua_State * L) {
    auto m = nn_model_shared(L, 1);
    if (lua_type(L, 3) != LUA_TFUNCTION) bind_fail("argument #2 (hook): expected a function(name, input)");
    if (lua_gettop(L) > 3) bind_fail("expected 2 arguments (module, hook), got %d", lua_gettop(L) - 1);
    auto modules = hook_modules(L, 2, *m);
    auto fn = std::make_shared<LuaRef>(L, 3);
    int64_t h = m->register_forward_pre_hook(modules, [fn](const std::string & name, const at::Tensor & in) {
        const std::string what = "forward pre-hook on " + name;
        lua_State * S = callback_state(what);
        fn->push(S);
        lua_pushstring(S, name.c_str());
        tensor_push(S, in);
        bind_callback(S, 2, 1, what);
        return hook_result(S, what);
    });
    handle_push(L, m, h);
    return 1;
}

// handle:remove() -> true when the hook was registered (false: removed before, or model freed)
int hook_remove(lua_State * L) {
    HookHandleUD & u = udata_check<HookHandleUD>(L, 1, QATLAB_HOOK_MT, "a hook handle");
    auto m = u.model.lock();
    lua_pushboolean(L, m && m->remove_hook(u.handle));
    return 1;
}

int hook_tostring(lua_State * L) {
    auto * u = udata_test<HookHandleUD>(L, 1, QATLAB_HOOK_MT);
    lua_pushfstring(L, "HookHandle(%d)", u ? (int)u->handle : -1);
    return 1;
}

const BindFn hook_methods[] = {{"remove", hook_remove}, {nullptr, nullptr}};

// -- modules ---------------------------------------------------------------------------------

std::string linear_kind(const std::shared_ptr<Linear> & l) {
    if (dynamic_cast<DenseLinear *>(l.get())) return "Linear";
    if (dynamic_cast<LuaLinear *>(l.get())) return "LuaLinear";
    if (dynamic_cast<LutLinearV2 *>(l.get())) return "LutLinearV2";
    if (dynamic_cast<LutLinearV1 *>(l.get())) return "LutLinearV1";
    if (dynamic_cast<IntNLinear *>(l.get())) return "IntNLinear";
    return "Linear";
}

std::string module_kind(DecoderModel & m, const std::string & name) {
    if (name == "model.embed_tokens") return "Embedding";
    if (name == "lm_head") {
        auto ln = m.linear_names();
        return std::find(ln.begin(), ln.end(), name) != ln.end() ? linear_kind(m.get_linear(name)) : "Linear (tied)";
    }
    auto ends = [&](const char * s) {
        size_t n = strlen(s);
        return name.size() >= n && name.compare(name.size() - n, n, s) == 0;
    };
    if (ends("norm") || ends("layernorm")) return "RMSNorm";
    if (ends("self_attn")) return "Attention";
    if (ends(".mlp")) return "MLP";
    if (ends("_proj")) return linear_kind(m.get_linear(name));
    return "DecoderLayer";
}

// model:named_modules() -> array of {name, type}
int m_named_modules(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    if (lua_gettop(L) > 1) bind_fail("expected no arguments");
    auto names = m.module_names();
    lua_createtable(L, (int)names.size(), 0);
    for (size_t i = 0; i < names.size(); i++) {
        lua_createtable(L, 2, 0);
        lua_pushstring(L, names[i].c_str());
        lua_rawseti(L, -2, 1);
        lua_pushstring(L, module_kind(m, names[i]).c_str());
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

// model:set_linear(name, layer): a Lua object (forward(self, x), in_features, out_features,
// tensors as parameters) in place of the projection `name`.
int m_set_linear(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    if (lua_type(L, 2) != LUA_TSTRING) bind_fail("argument #1 (name): expected a projection name (see linear_names())");
    if (!lua_istable(L, 3) && !lua_isuserdata(L, 3))
        bind_fail("argument #2 (layer): expected a Lua object with forward(self, x), got %s", luaL_typename(L, 3));
    if (lua_gettop(L) > 3) bind_fail("expected 2 arguments (name, layer), got %d", lua_gettop(L) - 1);
    std::string name = lua_tostring(L, 2);
    auto ln = m.linear_names();
    if (std::find(ln.begin(), ln.end(), name) == ln.end())
        bind_fail("argument #1 (name): no projection named '%s' (see linear_names())", name.c_str());
    auto layer = lua_linear_new(L, 3, name);
    layer->train(m.is_training());
    m.set_linear(name, layer);
    return 0;
}

// model:get_submodule(name) -> the Lua object of a Lua layer, or {name=, type=, in_features=, out_features=}
int m_get_submodule(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    if (lua_type(L, 2) != LUA_TSTRING) bind_fail("argument #1 (name): expected a module name (see named_modules())");
    if (lua_gettop(L) > 2) bind_fail("expected 1 argument (name), got %d", lua_gettop(L) - 1);
    std::string name = lua_tostring(L, 2);
    auto names = m.module_names();
    if (std::find(names.begin(), names.end(), name) == names.end())
        bind_fail("argument #1 (name): no module named '%s' (see named_modules())", name.c_str());
    auto ln = m.linear_names();
    bool linear = std::find(ln.begin(), ln.end(), name) != ln.end();
    if (linear && lua_linear_push(L, m.get_linear(name))) return 1;
    lua_createtable(L, 0, 4);
    lua_pushstring(L, name.c_str());
    lua_setfield(L, -2, "name");
    lua_pushstring(L, module_kind(m, name).c_str());
    lua_setfield(L, -2, "type");
    if (linear) {
        auto l = m.get_linear(name);
        lua_pushnumber(L, (lua_Number)l->in_features());
        lua_setfield(L, -2, "in_features");
        lua_pushnumber(L, (lua_Number)l->out_features());
        lua_setfield(L, -2, "out_features");
    }
    return 1;
}

int m_is_recomputing(lua_State * L) {
    lua_pushboolean(L, nn_model_check(L, 1).is_recomputing());
    return 1;
}

int m_lm_head_weight(lua_State * L) {
    tensor_push(L, nn_model_check(L, 1).lm_head_weight());
    return 1;
}

at::Tensor ids_tensor(lua_State * L, int idx, const char * name) {
    at::Tensor * t = tensor_test(L, idx);
    if (!t || !t->defined()) bind_fail("%s: expected an int64 Tensor (B, T), got %s", name, luaL_typename(L, idx));
    if (at::isFloatingType(t->scalar_type())) bind_fail("%s: token ids must be integers, got %s", name, c10::toString(t->scalar_type()));
    at::Tensor ids = t->to(at::kLong);
    return ids.dim() == 1 ? ids.unsqueeze(0) : ids;
}

// model:loss(input_ids, {labels=, attention_mask=, ignore_index=-100, reduction='mean', chunk=256})
int m_loss(lua_State * L) {
    Args a(L);
    DecoderModel & m = nn_model_check(L, 1);
    int ii = a.find(2, "input_ids");
    if (!ii) bind_fail("argument #1 (input_ids): expected an int64 Tensor (B, T)");
    at::Tensor ids = ids_tensor(L, ii, "argument #1 (input_ids)");
    at::Tensor labels, mask;
    if (int li = a.find(0, "labels")) labels = ids_tensor(L, li, "option 'labels'");
    if (at::Tensor * am = a.opt_tensor(0, "attention_mask")) mask = am->dim() == 1 ? am->unsqueeze(0) : *am;
    int64_t ignore = a.opt_integer(0, "ignore_index", -100);
    std::string red = a.opt_string(0, "reduction", "mean");
    int64_t chunk = a.opt_integer(0, "chunk", 256);
    a.finish();
    if (red != "mean" && red != "sum" && red != "none")
        bind_fail("option 'reduction': expected 'mean', 'sum' or 'none', got '%s'", red.c_str());
    if (chunk < 1) bind_fail("option 'chunk': expected a positive count, got %lld", (long long)chunk);
    tensor_push(L, m.loss(ids, labels, mask, ignore, red, chunk));
    return 1;
}

const BindFn lua_methods[] = {
    {"named_modules", m_named_modules},
    {"register_forward_hook", m_register_forward_hook},
    {"register_forward_pre_hook", m_register_forward_pre_hook},
    {"is_recomputing", m_is_recomputing},
    {"set_linear", m_set_linear},
    {"get_submodule", m_get_submodule},
    {"lm_head_weight", m_lm_head_weight},
    {"loss", m_loss},
    {nullptr, nullptr},
};

} // namespace

std::shared_ptr<Linear> lua_linear_new(lua_State * L, int idx, const std::string & what) {
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    if (!lua_istable(L, idx) && !lua_isuserdata(L, idx))
        bind_fail("%s: expected a Lua layer (an object with forward(self, x)), got %s", what.c_str(), luaL_typename(L, idx));
    lua_getfield(L, idx, "forward");
    bool has_forward = lua_isfunction(L, -1);
    lua_pop(L, 1);
    if (!has_forward) bind_fail("%s: the Lua layer has no forward(self, x) method", what.c_str());
    auto l = std::make_shared<LuaLinear>();
    l->what = what;
    l->in_ = feature_count(L, idx, "in_features", what);
    l->out_ = feature_count(L, idx, "out_features", what);
    l->obj = std::make_shared<LuaRef>(L, idx);
    return l;
}

bool lua_linear_push(lua_State * L, const std::shared_ptr<Linear> & layer) {
    auto * l = dynamic_cast<LuaLinear *>(layer.get());
    if (!l) return false;
    l->obj->push(L);
    return true;
}

void nn_open_lua_methods(lua_State * L, int methods) {
    udata_open_metatable<HookHandleUD>(L, QATLAB_HOOK_MT, "HookHandle", hook_methods, hook_tostring);
    lua_pop(L, 1);
    bind_register(L, methods, "Model:", lua_methods);
}

} // namespace qatlab
