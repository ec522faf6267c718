// quant_intn: the parameter-golf int-N functions of the `quant` module: quantize / dequantize /
// STE fake quant, QAT linears on a model with an on/off handle, the switch schedule, export / load.
#include "bindings/bind.h"
#include "lib/quant_intn.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

namespace qatlab {

namespace {


// {bits=, clip=, group_rows=} with the C++ defaults (bits 6, max-abs, per row).
IntNOptions intn_options(Args & a) {
    IntNOptions o;
    o.bits = (int)a.opt_integer(0, "bits", o.bits);
    o.clip_k = a.opt_number(0, "clip", o.clip_k);
    o.group_rows = a.opt_integer(0, "group_rows", o.group_rows);
    if (o.bits < 2 || o.bits > 8) bind_fail("option 'bits': expected 2..8, got %d", o.bits);
    if (!(o.clip_k >= 0)) bind_fail("option 'clip': expected >= 0 (0 = max-abs), got %g", o.clip_k);
    if (o.group_rows < 1) bind_fail("option 'group_rows': expected >= 1, got %lld", (long long)o.group_rows);
    return o;
}

// quant.intn_quantize(t, {bits=6, clip=0, group_rows=1}) -> q (int8), scale (float32)
int f_intn_quantize(lua_State * L) {
    Args a(L);
    at::Tensor & t = a.tensor(1, "t");
    IntNOptions o = intn_options(a);
    a.finish();
    IntNQuantized r = intn_quantize(t, o);
    tensor_push(L, r.q);
    tensor_push(L, r.scale);
    return 2;
}

// quant.intn_dequantize(q, scale, {group_rows=1, dtype='float32'})
int f_intn_dequantize(lua_State * L) {
    Args a(L);
    at::Tensor & q = a.tensor(1, "q");
    at::Tensor & s = a.tensor(2, "scale");
    int64_t g = a.opt_integer(0, "group_rows", 1);
    at::ScalarType dt = at::kFloat;
    a.opt_dtype(0, "dtype", dt);
    a.finish();
    if (!at::isFloatingType(dt)) bind_fail("option 'dtype': expected a floating dtype");
    tensor_push(L, intn_dequantize(q, s, g, dt));
    return 1;
}

// quant.intn_fake_quant(t, {bits=6, clip=0, group_rows=1}): dequant(quant(t)) forward, identity backward
int f_intn_fake_quant(lua_State * L) {
    Args a(L);
    at::Tensor & t = a.tensor(1, "t");
    IntNOptions o = intn_options(a);
    a.finish();
    tensor_push(L, intn_fake_quant(t, o));
    return 1;
}

// -- the QAT handle --------------------------------------------------------------------------

struct QatUD {
    std::vector<std::pair<std::string, std::shared_ptr<IntNLinear>>> layers;
};

QatUD & qat_check(lua_State * L, int idx) {
    return udata_check<QatUD>(L, idx, QATLAB_INTN_QAT_MT, "an int-N QAT handle");
}

// h:enable(on = true): switches fake quant on (or off) in every wrapped layer; returns h.
int qat_enable(lua_State * L) {
    QatUD & u = qat_check(L, 1);
    bool on = lua_isnoneornil(L, 2) ? true : lua_toboolean(L, 2);
    for (auto & [n, l] : u.layers) l->enabled = on;
    lua_settop(L, 1);
    return 1;
}

// h:enabled() -> true when every wrapped layer fake-quantizes.
int qat_enabled(lua_State * L) {
    QatUD & u = qat_check(L, 1);
    bool on = !u.layers.empty();
    for (auto & [n, l] : u.layers) on = on && l->enabled;
    lua_pushboolean(L, on);
    return 1;
}

// h:names() -> the wrapped linear names in model order.
int qat_names(lua_State * L) {
    QatUD & u = qat_check(L, 1);
    lua_createtable(L, (int)u.layers.size(), 0);
    for (size_t i = 0; i < u.layers.size(); i++) {
        lua_pushstring(L, u.layers[i].first.c_str());
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

int qat_len(lua_State * L) {
    lua_pushnumber(L, (lua_Number)qat_check(L, 1).layers.size());
    return 1;
}

int qat_tostring(lua_State * L) {
    auto * u = udata_test<QatUD>(L, 1, QATLAB_INTN_QAT_MT);
    if (!u || u->layers.empty()) {
        lua_pushliteral(L, "IntNQat(empty)");
        return 1;
    }
    const IntNOptions & o = u->layers[0].second->opt;
    lua_pushfstring(L, "IntNQat(%d layers, int%d, clip %f, %s)", (int)u->layers.size(), o.bits, o.clip_k,
                    u->layers[0].second->enabled ? "on" : "off");
    return 1;
}

const BindFn qat_methods[] = {
    {"enable", qat_enable},
    {"enabled", qat_enabled},
    {"names", qat_names},
    {nullptr, nullptr},
};

// quant.intn_apply(model, {bits=6, clip=0, group_rows=1, filter='', enabled=false}) -> handle
int f_intn_apply(lua_State * L) {
    Args a(L);
    DecoderModel & m = nn_model_check(L, 1);
    a.take(1);
    IntNOptions o = intn_options(a);
    std::string filter = a.opt_string(0, "filter", "");
    bool on = a.opt_bool(0, "enabled", false);
    a.finish();
    auto layers = intn_apply(m, o, filter);
    for (auto & [n, l] : layers) l->enabled = on;
    udata_new<QatUD>(L, QATLAB_INTN_QAT_MT, std::move(layers));
    return 1;
}

// -- the schedule ----------------------------------------------------------------------------

IntNSchedule & schedule_check(lua_State * L, int idx) {
    return udata_check<IntNSchedule>(L, idx, QATLAB_INTN_SCHEDULE_MT, "an int-N schedule");
}

// s:update{step=, lr_mult=, elapsed=, budget=} -> whether QAT is on (latched once on)
int schedule_update(lua_State * L) {
    IntNSchedule & s = schedule_check(L, 1);
    IntNSchedule::Input in;
    if (!lua_isnoneornil(L, 2)) {
        if (lua_type(L, 2) != LUA_TTABLE) bind_fail("expected s:update{step=, lr_mult=, elapsed=, budget=}");
        Args a(L, 2);
        if (a.has(0, "step")) in.step = a.integer(0, "step");
        if (a.has(0, "lr_mult")) in.lr_mult = a.number(0, "lr_mult");
        if (a.has(0, "elapsed")) in.elapsed = a.number(0, "elapsed");
        if (a.has(0, "budget")) in.budget = a.number(0, "budget");
        a.finish();
    }
    lua_pushboolean(L, s.update(in));
    return 1;
}

int schedule_is_on(lua_State * L) {
    lua_pushboolean(L, schedule_check(L, 1).on);
    return 1;
}

// s:switched_step() -> the step QAT turned on at, or nil
int schedule_switched_step(lua_State * L) {
    IntNSchedule & s = schedule_check(L, 1);
    if (!s.on || s.switched_step < 0) return 0;
    lua_pushnumber(L, (lua_Number)s.switched_step);
    return 1;
}

int schedule_tostring(lua_State * L) {
    auto * s = udata_test<IntNSchedule>(L, 1, QATLAB_INTN_SCHEDULE_MT);
    if (!s) {
        lua_pushliteral(L, "IntNSchedule (freed)");
        return 1;
    }
    std::string txt = "IntNSchedule(";
    if (s->start_step) txt += "step >= " + std::to_string(*s->start_step) + " ";
    if (s->lr_below) txt += "lr_mult < " + std::to_string(*s->lr_below) + " ";
    if (s->time_fraction) txt += "time >= " + std::to_string(*s->time_fraction) + " ";
    txt += s->on ? "on)" : "off)";
    lua_pushstring(L, txt.c_str());
    return 1;
}

const BindFn schedule_methods[] = {
    {"update", schedule_update},
    {"is_on", schedule_is_on},
    {"switched_step", schedule_switched_step},
    {nullptr, nullptr},
};

// quant.intn_schedule{step=, lr_below=, time_fraction=}: any trigger that is set turns QAT on
int f_intn_schedule(lua_State * L) {
    IntNSchedule s;
    if (!lua_isnoneornil(L, 1)) {
        if (lua_type(L, 1) != LUA_TTABLE) bind_fail("expected quant.intn_schedule{step=, lr_below=, time_fraction=}");
        Args a(L, 1);
        if (a.has(0, "step")) s.start_step = a.integer(0, "step");
        if (a.has(0, "lr_below")) s.lr_below = a.number(0, "lr_below");
        if (a.has(0, "time_fraction")) s.time_fraction = a.number(0, "time_fraction");
        a.finish();
    }
    udata_new<IntNSchedule>(L, QATLAB_INTN_SCHEDULE_MT, s);
    return 1;
}

// -- export / load ---------------------------------------------------------------------------

// rules = {{'mlp', bits=5}, {pattern='embed_tokens', bits=16}, ...}
std::vector<IntNRule> rules_read(lua_State * L, int idx) {
    if (lua_type(L, idx) != LUA_TTABLE) bind_fail("option 'rules': expected an array of {pattern, bits=, clip=, group_rows=}");
    std::vector<IntNRule> out;
    int n = (int)lua_objlen(L, idx);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        int r = lua_gettop(L);
        if (lua_type(L, r) != LUA_TTABLE) bind_fail("option 'rules': entry %d is not a table", i);
        IntNRule rule;
        lua_rawgeti(L, r, 1);
        lua_getfield(L, r, "pattern");
        const char * pat = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : nullptr;
        if (!pat) bind_fail("option 'rules': entry %d needs a pattern string", i);
        rule.pattern = pat;
        lua_pop(L, 2);
        lua_getfield(L, r, "bits");
        if (lua_type(L, -1) != LUA_TNUMBER) bind_fail("option 'rules': entry %d ('%s') needs bits (2..8, 16 or 32)", i, pat);
        rule.bits = (int)lua_tonumber(L, -1);
        if (!((rule.bits >= 2 && rule.bits <= 8) || rule.bits == 16 || rule.bits == 32))
            bind_fail("option 'rules': entry %d ('%s'): bits must be 2..8, 16 or 32, got %d", i, pat, rule.bits);
        lua_pop(L, 1);
        lua_getfield(L, r, "clip");
        if (lua_type(L, -1) == LUA_TNUMBER) rule.clip_k = lua_tonumber(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, r, "group_rows");
        if (lua_type(L, -1) == LUA_TNUMBER) rule.group_rows = (int64_t)lua_tonumber(L, -1);
        lua_pop(L, 2);
        out.push_back(std::move(rule));
    }
    return out;
}

// A model's parameters, or a {name = Tensor} table (sorted by name: Lua tables have no order).
NamedTensors named_tensors_arg(lua_State * L, int idx) {
    NamedTensors out;
    if (lua_type(L, idx) == LUA_TUSERDATA && !tensor_test(L, idx)) {
        for (auto & [n, t] : nn_model_check(L, idx).named_parameters()) out.push_back({n, t.detach()});
        return out;
    }
    if (lua_type(L, idx) != LUA_TTABLE) bind_fail("argument #1: expected a Model or a table name -> Tensor, got %s", luaL_typename(L, idx));
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        at::Tensor * t = tensor_test(L, -1);
        if (lua_type(L, -2) != LUA_TSTRING || !t || !t->defined())
            bind_fail("argument #1: expected a table name -> Tensor (entry %s)", lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?");
        out.push_back({lua_tostring(L, -2), t->detach()});
        lua_pop(L, 1);
    }
    std::sort(out.begin(), out.end(), [](const auto & x, const auto & y) { return x.first < y.first; });
    return out;
}

// quant.intn_export(model | {name=tensor}, path, {bits=6, clip=0, group_rows=1, keep_numel=65536,
//                   level=22, rules={...}}) -> file bytes, {payload_bytes=, index_bytes=, quantized=, kept=}
int f_intn_export(lua_State * L) {
    Args a(L);
    int src = a.find(1, nullptr);
    if (!src) bind_fail("argument #1: expected a Model or a table name -> Tensor");
    int pidx = a.find(2, "path");
    if (!pidx || lua_type(L, pidx) != LUA_TSTRING) bind_fail("argument #2 (path): expected a file path");
    std::string path = lua_tostring(L, pidx);
    IntNExportOptions o;
    o.quant = intn_options(a);
    o.keep_numel = a.opt_integer(0, "keep_numel", o.keep_numel);
    o.level = (int)a.opt_integer(0, "level", o.level);
    if (int r = a.find(0, "rules")) o.rules = rules_read(L, r);
    a.finish();
    NamedTensors ts = named_tensors_arg(L, src);
    IntNExportStats st = intn_export(path, ts, o);
    lua_pushnumber(L, (lua_Number)st.file_bytes);
    lua_createtable(L, 0, 5);
    lua_pushnumber(L, (lua_Number)st.file_bytes);
    lua_setfield(L, -2, "file_bytes");
    lua_pushnumber(L, (lua_Number)st.payload_bytes);
    lua_setfield(L, -2, "payload_bytes");
    lua_pushnumber(L, (lua_Number)st.index_bytes);
    lua_setfield(L, -2, "index_bytes");
    lua_pushnumber(L, (lua_Number)st.quantized);
    lua_setfield(L, -2, "quantized");
    lua_pushnumber(L, (lua_Number)st.kept);
    lua_setfield(L, -2, "kept");
    return 2;
}

// quant.intn_load(path) -> {name = Tensor (dequantized, original dtype)},
//                          {name = {kind=, bits=, group_rows=, clip=, q=, scale=}}
int f_intn_load(lua_State * L) {
    Args a(L);
    int pidx = a.find(1, "path");
    if (!pidx || lua_type(L, pidx) != LUA_TSTRING) bind_fail("argument #1 (path): expected a file path");
    std::string path = lua_tostring(L, pidx);
    a.finish();
    auto es = intn_load(path);
    lua_createtable(L, 0, (int)es.size());
    for (auto & e : es) {
        tensor_push(L, e.value);
        lua_setfield(L, -2, e.name.c_str());
    }
    lua_createtable(L, 0, (int)es.size());
    for (auto & e : es) {
        lua_createtable(L, 0, 6);
        lua_pushstring(L, e.kind.c_str());
        lua_setfield(L, -2, "kind");
        if (e.kind == "intn") {
            lua_pushnumber(L, e.bits);
            lua_setfield(L, -2, "bits");
            lua_pushnumber(L, (lua_Number)e.group_rows);
            lua_setfield(L, -2, "group_rows");
            lua_pushnumber(L, e.clip_k);
            lua_setfield(L, -2, "clip");
            tensor_push(L, e.q);
            lua_setfield(L, -2, "q");
            tensor_push(L, e.scale);
            lua_setfield(L, -2, "scale");
        }
        lua_setfield(L, -2, e.name.c_str());
    }
    return 2;
}

const BindFn intn_functions[] = {
    {"intn_quantize", f_intn_quantize},
    {"intn_dequantize", f_intn_dequantize},
    {"intn_fake_quant", f_intn_fake_quant},
    {"intn_apply", f_intn_apply},
    {"intn_schedule", f_intn_schedule},
    {"intn_export", f_intn_export},
    {"intn_load", f_intn_load},
    {nullptr, nullptr},
};

} // namespace

// Adds the intn_* functions to the `quant` module table at index t.
void quant_open_intn(lua_State * L, int t) {
    t = t < 0 ? lua_gettop(L) + t + 1 : t;
    udata_open_metatable<QatUD>(L, QATLAB_INTN_QAT_MT, "IntNQat", qat_methods, qat_tostring);
    lua_pushcfunction(L, qat_len);
    lua_setfield(L, -2, "__len");
    lua_pop(L, 1);
    udata_open_metatable<IntNSchedule>(L, QATLAB_INTN_SCHEDULE_MT, "IntNSchedule", schedule_methods,
                                       schedule_tostring);
    lua_pop(L, 1);
    bind_register(L, t, "quant.", intn_functions);
}

} // namespace qatlab
