// quant: the seed's LUT quantization (lib/quant_lut) as the Lua module `quant`: replace the
// projections of a model with V2 (or V1) layers, freeze Q, choose what trains and how the
// forward is computed, snap, convert (V1→V2, Q4→Q2), export and load checkpoints.
// The int-N functions of the same module live in bindings/quant_intn.cpp.
#include "bindings/bind.h"
#include "lib/quant_lut.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace qatlab {

void quant_open_intn(lua_State * L, int t);

namespace {

void push_strings(lua_State * L, const std::vector<std::string> & v) {
    lua_createtable(L, (int)v.size(), 0);
    for (size_t i = 0; i < v.size(); i++) {
        lua_pushstring(L, v[i].c_str());
        lua_rawseti(L, -2, (int)i + 1);
    }
}

LutForm form_arg(Args & a, const char * def) {
    std::string f = a.opt_string(0, "forward", def);
    if (f != "materialized" && f != "loop" && f != "batched")
        bind_fail("option 'forward': expected 'materialized', 'loop' or 'batched', got '%s'", f.c_str());
    return lut_form_parse(f);
}

QuantReplaceOptions replace_options(Args & a) {
    QuantReplaceOptions o;
    o.preset = a.opt_string(0, "preset", "q2a4");
    lut_preset(o.preset);   // validates
    o.mlp = a.opt_bool(0, "mlp", true);
    o.attn = a.opt_bool(0, "attn", true);
    o.filter = a.opt_string(0, "filter", "");
    o.form = form_arg(a, "materialized");
    o.ste_fp16 = a.opt_bool(0, "ste_fp16", false);
    o.group_size = a.opt_integer(0, "group_size", 32);
    o.freeze = a.opt_bool(0, "freeze", true);
    if (o.group_size < 1) bind_fail("option 'group_size': expected >= 1");
    return o;
}

// quant.replace(model, {preset='q2a4', mlp=true, attn=true, filter=nil, forward='materialized',
//                       ste_fp16=false, group_size=32, freeze=true}) -> {names}
int q_replace(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    QuantReplaceOptions o = replace_options(a);
    a.finish();
    push_strings(L, quant_replace(m, o));
    return 1;
}

// quant.replace_v1(model, {preset=, mlp=, attn=, filter=}) -> {names}: V1 layers (group size 128)
int q_replace_v1(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    QuantReplaceOptions o;
    o.preset = a.opt_string(0, "preset", "q2a4");
    lut_preset(o.preset);
    o.mlp = a.opt_bool(0, "mlp", true);
    o.attn = a.opt_bool(0, "attn", true);
    o.filter = a.opt_string(0, "filter", "");
    a.finish();
    push_strings(L, quant_replace_v1(m, o));
    return 1;
}

int q_freeze_q(lua_State * L) {
    quant_freeze_q(nn_model_check(L, 1));
    return 0;
}

// quant.set_trainable(model, 'all'|'g_only'|'mlp'|'attn'|'frozen_magnitude'|'lut') -> count
int q_set_trainable(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    const char * mode = luaL_optstring(L, 2, "all");
    lua_pushnumber(L, (lua_Number)quant_set_trainable(m, mode));
    return 1;
}

// quant.set_forward(model, 'materialized'|'loop'|'batched', {ste_fp16=})
int q_set_forward(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    std::string f = a.opt_string(1, "forward", "materialized");
    std::optional<bool> ste;
    if (a.has(0, "ste_fp16")) ste = a.opt_bool(0, "ste_fp16", false);
    a.finish();
    if (f != "materialized" && f != "loop" && f != "batched")
        bind_fail("argument #2: expected 'materialized', 'loop' or 'batched', got '%s'", f.c_str());
    quant_set_form(m, lut_form_parse(f), ste);
    return 0;
}

// quant.snap_for_ane(model, {recompute_indices=true})
int q_snap_for_ane(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    bool rec = a.opt_bool(0, "recompute_indices", true);
    a.finish();
    quant_snap_for_ane(m, rec);
    return 0;
}

int q_snap_for_export(lua_State * L) {
    quant_snap_for_export(nn_model_check(L, 1));
    return 0;
}

int q_convert_to_fp16(lua_State * L) {
    quant_convert_to_fp16(nn_model_check(L, 1));
    return 0;
}

// quant.v1_to_v2(model, {forward='materialized', ste_fp16=false}) -> count
int q_v1_to_v2(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    LutForm f = form_arg(a, "materialized");
    bool ste = a.opt_bool(0, "ste_fp16", false);
    a.finish();
    lua_pushnumber(L, (lua_Number)quant_v1_to_v2(m, f, ste));
    return 1;
}

// quant.q4_to_q2(model, {mlp_rank=32, attn_rank=8, mlp_lut=4, attn_lut=16, seed=0}) -> count
int q_q4_to_q2(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    int64_t mr = a.opt_integer(0, "mlp_rank", 32), ar = a.opt_integer(0, "attn_rank", 8);
    int64_t ml = a.opt_integer(0, "mlp_lut", 4), al = a.opt_integer(0, "attn_lut", 16);
    int64_t seed = a.opt_integer(0, "seed", 0);
    a.finish();
    lua_pushnumber(L, (lua_Number)quant_q4_to_q2(m, mr, ar, ml, al, (uint64_t)seed));
    return 1;
}

// quant.export_hf(model, dir, {dtype=})
int q_export_hf(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    int idx = a.find(1, "dir");
    if (!idx || lua_type(L, idx) != LUA_TSTRING) bind_fail("argument #2 (dir): expected a directory path");
    std::string dir = lua_tostring(L, idx);
    at::ScalarType dt;
    std::optional<at::ScalarType> dtype;
    if (a.opt_dtype(0, "dtype", dt)) dtype = dt;
    a.finish();
    quant_export_hf(m, dir, dtype);
    return 0;
}

// quant.export_compact(model, path) -> bytes
int q_export_compact(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    const char * path = luaL_checkstring(L, 2);
    lua_pushnumber(L, (lua_Number)quant_export_compact(m, path));
    return 1;
}

// quant.save_checkpoint(model, dir): model.safetensors (the seed's key names) + config.json
int q_save_checkpoint(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    quant_save_checkpoint(m, luaL_checkstring(L, 2));
    return 0;
}

// quant.load_seed_checkpoint(model, path) -> {unused keys}
int q_load_checkpoint(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    int idx = a.find(1, "path");
    if (!idx || lua_type(L, idx) != LUA_TSTRING) bind_fail("argument #2 (path): expected a checkpoint file or directory");
    std::string path = lua_tostring(L, idx);
    LutConfig base;
    base.use_ste_fp16 = a.opt_bool(0, "ste_fp16", false);
    a.finish();
    push_strings(L, quant_load_checkpoint(m, path, base));
    return 1;
}

// quant.lut(kind, {include_zero=false}) -> float32 tensor: kind = 4, 16, 'lut4', 'lut16', 'q2', 'q4'
int q_lut(lua_State * L) {
    int64_t n = 0;
    if (lua_type(L, 1) == LUA_TNUMBER) {
        n = (int64_t)lua_tonumber(L, 1);
    } else if (lua_type(L, 1) == LUA_TSTRING) {
        std::string k = lua_tostring(L, 1);
        if (k == "lut4" || k == "q2") n = 4;
        else if (k == "lut16" || k == "q4") n = 16;
        else if (k.rfind("lut", 0) == 0) n = std::atoll(k.c_str() + 3);
        if (n <= 0) bind_fail("argument #1 (kind): expected a size or 'lut4', 'lut16', 'q2', 'q4', got '%s'", k.c_str());
    } else {
        bind_fail("argument #1 (kind): expected a LUT size or name, got %s", luaL_typename(L, 1));
    }
    Args a(L, 2);
    bool iz = a.opt_bool(0, "include_zero", false);
    a.finish();
    tensor_push(L, lut_make(n, iz));
    return 1;
}

// quant.kmeans_reduce(lut, k, {iters=20}) -> sorted float32 tensor (convert_q4_to_q2's k-means)
int q_kmeans_reduce(lua_State * L) {
    Args a(L);
    at::Tensor & lut = a.tensor(1, "lut");
    int64_t k = a.integer(2, "k");
    int64_t it = a.opt_integer(0, "iters", 20);
    a.finish();
    tensor_push(L, lut_kmeans_reduce(lut, k, it));
    return 1;
}

// quant.ste_fp16(t, {saturate=true}) -> t + (fp16(t) - t):detach()
int q_ste_fp16(lua_State * L) {
    Args a(L);
    at::Tensor & t = a.tensor(1, "t");
    bool sat = a.opt_bool(0, "saturate", true);
    a.finish();
    tensor_push(L, ste_fp16(t, sat));
    return 1;
}

// quant.preset(name) -> {mlp_lut=, mlp_rank=, attn_lut=, attn_rank=}
int q_preset(lua_State * L) {
    LutPreset p = lut_preset(luaL_checkstring(L, 1));
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (lua_Number)p.mlp_lut);
    lua_setfield(L, -2, "mlp_lut");
    lua_pushnumber(L, (lua_Number)p.mlp_rank);
    lua_setfield(L, -2, "mlp_rank");
    lua_pushnumber(L, (lua_Number)p.attn_lut);
    lua_setfield(L, -2, "attn_lut");
    lua_pushnumber(L, (lua_Number)p.attn_rank);
    lua_setfield(L, -2, "attn_rank");
    return 1;
}

// quant.layers(model) -> array of {name=, kind='v2'|'v1', lut_size=, rank=, baked=, forward=, ste_fp16=}
int q_layers(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    auto v2 = quant_v2_layers(m);
    auto v1 = quant_v1_layers(m);
    lua_createtable(L, (int)(v2.size() + v1.size()), 0);
    int i = 1;
    for (auto & [n, l] : v2) {
        lua_createtable(L, 0, 7);
        lua_pushstring(L, n.c_str());
        lua_setfield(L, -2, "name");
        lua_pushliteral(L, "v2");
        lua_setfield(L, -2, "kind");
        lua_pushnumber(L, (lua_Number)l->lut.numel());
        lua_setfield(L, -2, "lut_size");
        lua_pushnumber(L, (lua_Number)l->rank());
        lua_setfield(L, -2, "rank");
        lua_pushboolean(L, l->baked());
        lua_setfield(L, -2, "baked");
        lua_pushstring(L, lut_form_name(l->form));
        lua_setfield(L, -2, "forward");
        lua_pushboolean(L, l->cfg.use_ste_fp16);
        lua_setfield(L, -2, "ste_fp16");
        lua_rawseti(L, -2, i++);
    }
    for (auto & [n, l] : v1) {
        lua_createtable(L, 0, 4);
        lua_pushstring(L, n.c_str());
        lua_setfield(L, -2, "name");
        lua_pushliteral(L, "v1");
        lua_setfield(L, -2, "kind");
        lua_pushnumber(L, (lua_Number)l->lut.numel());
        lua_setfield(L, -2, "lut_size");
        lua_pushnumber(L, (lua_Number)(l->scale_A.defined() ? l->scale_A.size(1) : 0));
        lua_setfield(L, -2, "rank");
        lua_rawseti(L, -2, i++);
    }
    return 1;
}

// quant.enable_lut_training(model, {max_abs=1}) -> count: trainable LUT16 on every 16-entry V2 layer
int q_enable_lut_training(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    double M = a.opt_number(0, "max_abs", 1.0);
    a.finish();
    int64_t n = 0;
    for (auto & [name, l] : quant_v2_layers(m))
        if (l->lut.numel() == 16) {
            v2_enable_lut_training(*l, M);
            n++;
        }
    lua_pushnumber(L, (lua_Number)n);
    return 1;
}

const BindFn quant_functions[] = {
    {"replace", q_replace},
    {"replace_v1", q_replace_v1},
    {"freeze_q", q_freeze_q},
    {"set_trainable", q_set_trainable},
    {"set_forward", q_set_forward},
    {"snap_for_ane", q_snap_for_ane},
    {"snap_for_export", q_snap_for_export},
    {"convert_to_fp16", q_convert_to_fp16},
    {"v1_to_v2", q_v1_to_v2},
    {"q4_to_q2", q_q4_to_q2},
    {"export_hf", q_export_hf},
    {"export_compact", q_export_compact},
    {"save_checkpoint", q_save_checkpoint},
    {"load_seed_checkpoint", q_load_checkpoint},
    {"load_checkpoint", q_load_checkpoint},
    {"lut", q_lut},
    {"kmeans_reduce", q_kmeans_reduce},
    {"ste_fp16", q_ste_fp16},
    {"preset", q_preset},
    {"layers", q_layers},
    {"enable_lut_training", q_enable_lut_training},
    {nullptr, nullptr},
};

} // namespace

int luaopen_quant(lua_State * L) {
    lua_newtable(L);
    int t = lua_gettop(L);
    bind_register(L, t, "quant.", quant_functions);
    quant_open_intn(L, t);
    lua_settop(L, t);
    return 1;
}

} // namespace qatlab
