// optim: lib/optim as the Lua module `optim`: AdamW, SGD and Muon over tensors, groups or a model,
// with step, zero_grad, param_groups, set_lr/set_momentum, state dicts, and clip_grad_norm.
#include "bindings/bind.h"
#include "lib/model.h"
#include "lib/optim.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

namespace qatlab {

namespace {


using json = nlohmann::json;

struct OptimUD {
    std::shared_ptr<Optimizer> o;
};

Optimizer & optim_check(lua_State * L, int idx) {
    return *udata_check<OptimUD>(L, idx, QATLAB_OPTIM_MT, "an Optimizer").o;
}

// -- parameters ------------------------------------------------------------------------------------

bool is_model(lua_State * L, int idx) {
    return luaL_testudata(L, idx, QATLAB_MODEL_MT) != nullptr;
}

// A model's trainable parameters (requires_grad), in named_parameters order.
std::vector<at::Tensor> model_trainable(lua_State * L, int idx) {
    std::vector<at::Tensor> out;
    for (auto & [name, t] : nn_model_check(L, idx).named_parameters())
        if (t.requires_grad()) out.push_back(t);
    return out;
}

// Element `i` of the array at `idx` as a tensor: a Tensor, or a {name, tensor} pair from
// model:named_parameters().
at::Tensor param_at(lua_State * L, int idx, int i, const char * where) {
    lua_rawgeti(L, idx, i);
    at::Tensor * t = tensor_test(L, -1);
    if (!t && lua_istable(L, -1)) {
        lua_rawgeti(L, -1, 2);
        t = tensor_test(L, -1);
        lua_pop(L, 1);
    }
    if (!t) bind_fail("%s: element %d is a %s, expected a Tensor", where, i, luaL_typename(L, -1));
    if (!t->defined()) bind_fail("%s: element %d: the tensor was freed", where, i);
    at::Tensor out = *t;
    lua_pop(L, 1);
    return out;
}

// Tensors from an array of tensors (or name/tensor pairs) or a model.
std::vector<at::Tensor> params_read(lua_State * L, int idx, const char * where) {
    if (is_model(L, idx)) return model_trainable(L, idx);
    if (!lua_istable(L, idx)) bind_fail("%s: expected an array of tensors or a Model, got %s", where, luaL_typename(L, idx));
    std::vector<at::Tensor> out;
    int n = (int)lua_objlen(L, idx);
    if (n == 0) {   // {name = tensor}: named parameters, in name order (a stable state_dict order)
        std::vector<std::pair<std::string, at::Tensor>> named;
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            at::Tensor * t = tensor_test(L, -1);
            if (lua_type(L, -2) != LUA_TSTRING || !t)
                bind_fail("%s: expected an array of tensors, a table {name = Tensor} or a Model; key %s holds a %s",
                          where, lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2),
                          luaL_typename(L, -1));
            if (!t->defined()) bind_fail("%s: '%s': the tensor was freed", where, lua_tostring(L, -2));
            named.emplace_back(lua_tostring(L, -2), *t);
            lua_pop(L, 1);
        }
        std::sort(named.begin(), named.end(), [](auto & x, auto & y) { return x.first < y.first; });
        for (auto & [name, t] : named) out.push_back(t);
        return out;
    }
    for (int i = 1; i <= n; i++) out.push_back(param_at(L, idx, i, where));
    return out;
}

bool is_group_array(lua_State * L, int idx) {
    if (!lua_istable(L, idx) || lua_objlen(L, idx) == 0) return false;
    lua_rawgeti(L, idx, 1);
    bool group = false;
    if (lua_istable(L, -1) && !tensor_test(L, -1)) {
        lua_getfield(L, -1, "params");
        group = !lua_isnil(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return group;
}

// -- options ----------------------------------------------------------------------------------------

// The hyper-parameters a kind takes, with the PyTorch (or golf reference) defaults.
ParamGroup defaults_of(OptimKind k) {
    ParamGroup g;
    if (k == OptimKind::adamw) g.weight_decay = 1e-2;
    if (k == OptimKind::muon) g.lr = 0.02, g.momentum = 0.95, g.nesterov = true;
    return g;
}

const char * const adamw_keys[] = {"lr", "betas", "eps", "weight_decay", nullptr};
const char * const sgd_keys[] = {"lr", "momentum", "nesterov", "weight_decay", nullptr};
const char * const muon_keys[] = {"lr", "momentum", "nesterov", "ns_steps", "ns_bf16", "weight_decay", nullptr};

const char * const * keys_of(OptimKind k) {
    return k == OptimKind::adamw ? adamw_keys : k == OptimKind::sgd ? sgd_keys : muon_keys;
}

double number_field(lua_State * L, int idx, const char * key, const char * where) {
    if (lua_type(L, idx) != LUA_TNUMBER) bind_fail("%soption '%s': expected a number, got %s", where, key, luaL_typename(L, idx));
    return lua_tonumber(L, idx);
}

// Reads the options of table `t` into `g`; any other key (but "params" where allowed) is an error.
void options_read(lua_State * L, int t, OptimKind kind, ParamGroup & g, bool allow_params, const char * where) {
    const char * const * keys = keys_of(kind);
    lua_pushnil(L);
    while (lua_next(L, t)) {
        int v = lua_gettop(L);
        const char * key = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : nullptr;
        bool known = allow_params && key && strcmp(key, "params") == 0;
        for (const char * const * k = keys; *k && key && !known; k++) known = strcmp(*k, key) == 0;
        if (!known) {
            std::string list, k0 = key ? key : "(non-string key)";
            std::vector<std::string> known;
            for (const char * const * k = keys; *k; k++) {
                list.append(list.empty() ? "" : ", ").append(*k);
                known.push_back(*k);
            }
            std::string hint = closest_hint(k0, known);
            bind_fail("%sunknown option '%s'%s; %s takes: %s", where, k0.c_str(), hint.c_str(),
                      optim_kind_name(kind), list.c_str());
        }
        if (strcmp(key, "lr") == 0) g.lr = number_field(L, v, key, where);
        else if (strcmp(key, "eps") == 0) g.eps = number_field(L, v, key, where);
        else if (strcmp(key, "weight_decay") == 0) g.weight_decay = number_field(L, v, key, where);
        else if (strcmp(key, "momentum") == 0) g.momentum = number_field(L, v, key, where);
        else if (strcmp(key, "ns_steps") == 0) g.ns_steps = (int64_t)number_field(L, v, key, where);
        else if (strcmp(key, "nesterov") == 0 || strcmp(key, "ns_bf16") == 0) {
            if (!lua_isboolean(L, v)) bind_fail("%soption '%s': expected a boolean, got %s", where, key, luaL_typename(L, v));
            (strcmp(key, "nesterov") == 0 ? g.nesterov : g.ns_bf16) = lua_toboolean(L, v);
        } else if (strcmp(key, "betas") == 0) {
            if (!lua_istable(L, v) || lua_objlen(L, v) != 2) bind_fail("%soption 'betas': expected {beta1, beta2}", where);
            lua_rawgeti(L, v, 1);
            lua_rawgeti(L, v, 2);
            g.beta1 = number_field(L, -2, "betas", where);
            g.beta2 = number_field(L, -1, "betas", where);
            lua_pop(L, 2);
        }
        lua_settop(L, v - 1);
    }
}

// optim.<Kind>(params, opts): params = tensors | {name, tensor} pairs | groups | a model.
int optim_new(lua_State * L, OptimKind kind) {
    if (lua_isnoneornil(L, 1)) bind_fail("argument #1 (params): expected tensors, parameter groups or a Model, got nothing");
    ParamGroup base = defaults_of(kind);
    if (lua_gettop(L) >= 2 && !lua_isnil(L, 2)) {
        if (!lua_istable(L, 2)) bind_fail("argument #2 (options): expected a table, got %s", luaL_typename(L, 2));
        options_read(L, 2, kind, base, false, "");
    }
    if (lua_gettop(L) > 2) bind_fail("expected (params, options), got %d arguments", lua_gettop(L));
    std::vector<ParamGroup> groups;
    if (is_group_array(L, 1)) {
        int n = (int)lua_objlen(L, 1);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, 1, i);
            int t = lua_gettop(L);
            char where[64];
            snprintf(where, sizeof where, "group %d: ", i);
            if (!lua_istable(L, t)) bind_fail("%sexpected a table {params = {...}, ...}, got %s", where, luaL_typename(L, t));
            ParamGroup g = base;
            options_read(L, t, kind, g, true, where);
            lua_getfield(L, t, "params");
            snprintf(where, sizeof where, "group %d: params", i);
            g.params = params_read(L, lua_gettop(L), where);
            lua_settop(L, t - 1);
            groups.push_back(std::move(g));
        }
    } else {
        base.params = params_read(L, 1, "argument #1 (params)");
        groups.push_back(std::move(base));
    }
    auto o = std::make_shared<Optimizer>(kind, std::move(groups));
    udata_new<OptimUD>(L, QATLAB_OPTIM_MT, std::move(o));
    return 1;
}

int optim_adamw(lua_State * L) { return optim_new(L, OptimKind::adamw); }
int optim_sgd(lua_State * L) { return optim_new(L, OptimKind::sgd); }
int optim_muon(lua_State * L) { return optim_new(L, OptimKind::muon); }

int optim_clip_grad_norm(lua_State * L) {
    std::vector<at::Tensor> ps;
    if (is_group_array(L, 1)) {
        int n = (int)lua_objlen(L, 1);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, 1, i);
            lua_getfield(L, -1, "params");
            auto more = params_read(L, lua_gettop(L), "argument #1 (params)");
            ps.insert(ps.end(), more.begin(), more.end());
            lua_pop(L, 2);
        }
    } else {
        ps = params_read(L, 1, "argument #1 (params)");
    }
    if (lua_type(L, 2) != LUA_TNUMBER) bind_fail("argument #2 (max_norm): expected a number, got %s", luaL_typename(L, 2));
    tensor_push(L, clip_grad_norm(ps, lua_tonumber(L, 2)));
    return 1;
}

// -- methods ------------------------------------------------------------------------------------------

// Methods read their arguments after self (stack slot 2 on).
int m_step(lua_State * L) {
    Optimizer & o = optim_check(L, 1);
    Args(L, 2).finish();
    o.step();
    return 0;
}

int m_zero_grad(lua_State * L) {
    Optimizer & o = optim_check(L, 1);
    Args(L, 2).finish();
    o.zero_grad();
    return 0;
}

void num_set(lua_State * L, const char * k, double v) {
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

int m_param_groups(lua_State * L) {
    Optimizer & o = optim_check(L, 1);
    Args(L, 2).finish();
    const auto & gs = o.param_groups();
    lua_createtable(L, (int)gs.size(), 0);
    for (size_t i = 0; i < gs.size(); i++) {
        const ParamGroup & g = gs[i];
        lua_createtable(L, 0, 8);
        num_set(L, "lr", g.lr);
        num_set(L, "weight_decay", g.weight_decay);
        if (o.kind() == OptimKind::adamw) {
            lua_createtable(L, 2, 0);
            lua_pushnumber(L, g.beta1);
            lua_rawseti(L, -2, 1);
            lua_pushnumber(L, g.beta2);
            lua_rawseti(L, -2, 2);
            lua_setfield(L, -2, "betas");
            num_set(L, "eps", g.eps);
        } else {
            num_set(L, "momentum", g.momentum);
            lua_pushboolean(L, g.nesterov);
            lua_setfield(L, -2, "nesterov");
        }
        if (o.kind() == OptimKind::muon) {
            num_set(L, "ns_steps", (double)g.ns_steps);
            lua_pushboolean(L, g.ns_bf16);
            lua_setfield(L, -2, "ns_bf16");
        }
        lua_createtable(L, (int)g.params.size(), 0);
        for (size_t k = 0; k < g.params.size(); k++) {
            tensor_push(L, g.params[k]);
            lua_rawseti(L, -2, (int)k + 1);
        }
        lua_setfield(L, -2, "params");
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

// The 0-based group of optional argument `pos` (1-based in Lua, after self); -1 (all) when absent.
int group_arg(Args & a, Optimizer & o, int pos) {
    int64_t g = a.opt_integer(pos, "group", 0);
    if (!a.has(pos, "group")) return -1;
    if (g < 1 || g > (int64_t)o.param_groups().size())
        a.fail(pos, "group", "%lld is out of range (the optimizer has %d groups)", (long long)g, (int)o.param_groups().size());
    return (int)g - 1;
}

// opt:set_lr(lr[, group]) / opt:set_momentum(m[, group]): every group, or the given one.
int m_set_lr(lua_State * L) {
    Optimizer & o = optim_check(L, 1);
    Args a(L, 2);
    double lr = a.number(1, "lr");
    int g = group_arg(a, o, 2);
    a.finish();
    o.set_lr(lr, g);
    return 0;
}

int m_set_momentum(lua_State * L) {
    Optimizer & o = optim_check(L, 1);
    Args a(L, 2);
    double m = a.number(1, "momentum");
    int g = group_arg(a, o, 2);
    a.finish();
    o.set_momentum(m, g);
    return 0;
}

// opt:state_dict() -> {tensors = {name = tensor}, meta = table}: the one form load_state_dict
// takes (a file keeps meta as json.encode(meta) in its metadata; json.decode it back).
int m_state_dict(lua_State * L) {
    Optimizer & o = optim_check(L, 1);
    Args(L, 2).finish();
    OptimStateDict sd = o.state_dict();
    lua_createtable(L, 0, 3);
    lua_createtable(L, 0, (int)sd.tensors.size());
    for (auto & [k, t] : sd.tensors) {
        tensor_push(L, t);
        lua_setfield(L, -2, k.c_str());
    }
    lua_setfield(L, -2, "tensors");
    json_push(L, json::parse(sd.meta));
    lua_setfield(L, -2, "meta");
    return 1;
}

// sd: {tensors = {name = tensor}, meta = table}, as state_dict() gives
int m_load_state_dict(lua_State * L) {
    Optimizer & o = optim_check(L, 1);
    // The state dict has string keys like options: it is read by slot, nothing may follow it.
    if (!lua_istable(L, 2)) bind_fail("argument #1 (state_dict): expected a table {tensors=, meta=}, got %s", luaL_typename(L, 2));
    Args(L, 3).finish();
    OptimStateDict sd;
    lua_getfield(L, 2, "meta");
    if (lua_istable(L, -1)) sd.meta = json_from_lua(L, -1, "meta", true).dump();
    else bind_fail("argument #1 (state_dict): field 'meta': expected a table (as state_dict() gives; json.decode a saved one), got %s",
                   luaL_typename(L, -1));
    lua_pop(L, 1);
    lua_getfield(L, 2, "tensors");
    if (!lua_isnil(L, -1)) {
        if (!lua_istable(L, -1)) bind_fail("state_dict.tensors: expected a table {name = tensor}, got %s", luaL_typename(L, -1));
        int t = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, t)) {
            if (lua_type(L, -2) != LUA_TSTRING) bind_fail("state_dict.tensors: keys must be names");
            at::Tensor * x = tensor_test(L, -1);
            if (!x || !x->defined()) bind_fail("state_dict.tensors.%s: expected a Tensor, got %s", lua_tostring(L, -2), luaL_typename(L, -1));
            sd.tensors.emplace_back(lua_tostring(L, -2), *x);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    o.load_state_dict(sd);
    return 0;
}

int m_tostring(lua_State * L) {
    auto * u = udata_test<OptimUD>(L, 1, QATLAB_OPTIM_MT);
    if (!u || !u->o) {
        lua_pushstring(L, "Optimizer");
        return 1;
    }
    lua_pushfstring(L, "%s(groups=%d, params=%d, lr=%f)", optim_kind_name(u->o->kind()), (int)u->o->param_groups().size(),
                    (int)u->o->num_params(), u->o->param_groups()[0].lr);
    return 1;
}

const BindFn methods[] = {
    {"step", m_step},
    {"zero_grad", m_zero_grad},
    {"param_groups", m_param_groups},
    {"set_lr", m_set_lr},
    {"set_momentum", m_set_momentum},
    {"state_dict", m_state_dict},
    {"load_state_dict", m_load_state_dict},
    {nullptr, nullptr},
};

const BindFn functions[] = {
    {"AdamW", optim_adamw},
    {"SGD", optim_sgd},
    {"Muon", optim_muon},
    {"clip_grad_norm", optim_clip_grad_norm},
    {nullptr, nullptr},
};

} // namespace

int luaopen_optim(lua_State * L) {
    udata_open_metatable<OptimUD>(L, QATLAB_OPTIM_MT, "Optimizer", methods, m_tostring);
    lua_pop(L, 1);
    lua_newtable(L);
    bind_register(L, -1, "optim.", functions);
    return 1;
}

} // namespace qatlab
