// quant: the seed's LUT quantization (lib/quant_lut, lib/quant_init) as the Lua module `quant`:
// replace the projections of a model with V2 (or V1) layers by preset or per-layer recipe,
// calibrate and initialise them data-aware, freeze Q, choose what trains and how the forward is
// computed, snap, convert (V1→V2, Q4→Q2), count bits, export and load checkpoints.
// The int-N functions of the same module live in bindings/quant_intn.cpp.
#include "bindings/bind.h"
#include "lib/quant_init.h"
#include "lib/quant_lut.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <regex>
#include <cmath>
#include <string>
#include <vector>

namespace qatlab {

void quant_open_intn(lua_State * L, int t);

namespace {

LutForm form_arg(Args & a, const char * def) {
    std::string f = a.opt_string(0, "forward", def);
    if (f != "materialized" && f != "loop" && f != "batched")
        bind_fail("option 'forward': expected 'materialized', 'loop' or 'batched', got '%s'", f.c_str());
    return lut_form_parse(f);
}

// What every layer-name filter takes, said in each of their errors.
#define FILTER_SYNTAX "a C++ std::regex (ECMAScript syntax, e.g. 'layers\\.[12]\\.'; not a Lua pattern) searched in names such as 'model.layers.0.mlp.up_proj'"

// Option `filter`: "" when absent; a malformed expression is an error here.
std::string filter_arg(Args & a) {
    std::string f = a.opt_string(0, "filter", "");
    try {
        std::regex re(f);
    } catch (const std::regex_error & e) {
        a.fail(0, "filter", "'%s' is not a valid regular expression (%s): the filter is " FILTER_SYNTAX, f.c_str(), e.what());
    }
    return f;
}

// A filter that selected nothing is a mistake, not a no-op.
void filter_matched(Args & a, const std::string & filter, size_t n) {
    if (!filter.empty() && n == 0)
        a.fail(0, "filter", "'%s' matches no layer; the filter is " FILTER_SYNTAX, filter.c_str());
}

QuantReplaceOptions replace_options(Args & a) {
    QuantReplaceOptions o;
    o.preset = a.opt_string(0, "preset", "q2a4");
    lut_preset(o.preset);   // validates
    o.mlp = a.opt_bool(0, "mlp", true);
    o.attn = a.opt_bool(0, "attn", true);
    o.filter = filter_arg(a);
    o.form = form_arg(a, "materialized");
    o.ste_fp16 = a.opt_bool(0, "ste_fp16", false);
    o.group_size = a.opt_integer(0, "group_size", 32);
    o.freeze = a.opt_bool(0, "freeze", true);
    if (o.group_size < 1) bind_fail("option 'group_size': expected >= 1");
    return o;
}

// The candidates of a recipe: the projections the seed quantizes, in model order.
std::vector<std::string> projection_names(DecoderModel & m) {
    std::vector<std::string> out;
    for (auto & n : m.linear_names())
        if (quant_is_mlp(n) || quant_is_attn(n)) out.push_back(n);
    return out;
}

// string.find(s, pattern) ~= nil, with Lua's own patterns.
bool lua_find(lua_State * L, const std::string & s, const std::string & pattern, const char * what) {
    lua_getglobal(L, "string");
    lua_getfield(L, -1, "find");
    lua_remove(L, -2);
    lua_pushlstring(L, s.data(), s.size());
    lua_pushlstring(L, pattern.data(), pattern.size());
    if (bind_pcall(L, 2, 1) != 0) {
        std::string e = lua_tostring(L, -1) ? lua_tostring(L, -1) : "?";
        lua_pop(L, 1);
        bind_fail("%s: pattern '%s': %s", what, pattern.c_str(), e.c_str());
    }
    bool found = !lua_isnil(L, -1);
    lua_pop(L, 1);
    return found;
}

// The decoder layer index in a name "model.layers.<i>." (as in the name, 0-based), or -1.
int64_t layer_index_of(const std::string & n) {
    const std::string p = "model.layers.";
    if (n.rfind(p, 0) != 0) return -1;
    return std::atoll(n.c_str() + p.size());
}

// A layer's config table {lut=, rank=, group_size=, include_zero=, kmeans=} at idx.
LayerRecipe layer_config(lua_State * L, int idx, const std::string & name, const LayerRecipe & def) {
    LayerRecipe r = def;
    r.name = name;
    const char * n = name.c_str();
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING)
            bind_fail("recipe: layer '%s': config keys must be option names (lut, rank, group_size, include_zero, kmeans)", n);
        std::string k = lua_tostring(L, -2);
        auto integer = [&]() -> int64_t {
            if (lua_type(L, -1) != LUA_TNUMBER || std::floor(lua_tonumber(L, -1)) != lua_tonumber(L, -1))
                bind_fail("recipe: layer '%s': option '%s': expected an integer, got %s", n, k.c_str(),
                          lua_type(L, -1) == LUA_TNUMBER ? "a fraction" : luaL_typename(L, -1));
            return (int64_t)lua_tonumber(L, -1);
        };
        auto boolean = [&]() -> bool {
            if (!lua_isboolean(L, -1))
                bind_fail("recipe: layer '%s': option '%s': expected a boolean, got %s", n, k.c_str(), luaL_typename(L, -1));
            return lua_toboolean(L, -1);
        };
        if (k == "lut") r.lut_size = integer();
        else if (k == "rank") r.rank = integer();
        else if (k == "group_size") r.group_size = integer();
        else if (k == "include_zero") r.include_zero = boolean();
        else if (k == "kmeans") r.kmeans = boolean();
        else bind_fail("recipe: layer '%s': unknown option '%s' (expected lut, rank, group_size, include_zero, kmeans)", n, k.c_str());
        lua_pop(L, 1);
    }
    r.preset = false;
    return r;
}

// A recipe value for one layer at idx: false/nil = stays float (false returned), a table = config.
bool layer_value(lua_State * L, int idx, const std::string & name, const LayerRecipe & def, DecoderModel & m,
                 std::vector<LayerRecipe> & out) {
    if (lua_isnil(L, idx) || (lua_isboolean(L, idx) && !lua_toboolean(L, idx))) return false;
    if (!lua_istable(L, idx))
        bind_fail("recipe: layer '%s': expected a config table or false, got %s", name.c_str(), luaL_typename(L, idx));
    LayerRecipe r = layer_config(L, idx, name, def);
    auto lin = m.get_linear(name);
    layer_recipe_check(r, lin->out_features(), lin->in_features());
    out.push_back(r);
    return true;
}

// Resolves a recipe (function, array of {pattern, config} pairs, or map pattern -> config, each
// with an optional `default`) against the model's projections.
std::vector<LayerRecipe> recipe_from_lua(lua_State * L, int ridx, DecoderModel & m, const LayerRecipe & def) {
    std::vector<LayerRecipe> out;
    auto names = projection_names(m);
    if (lua_isfunction(L, ridx)) {
        for (auto & n : names) {
            auto lin = m.get_linear(n);
            lua_pushvalue(L, ridx);
            lua_pushstring(L, n.c_str());
            lua_pushnumber(L, (lua_Number)lin->out_features());
            lua_pushnumber(L, (lua_Number)lin->in_features());
            int64_t li = layer_index_of(n);
            if (li >= 0) lua_pushnumber(L, (lua_Number)li);
            else lua_pushnil(L);
            bind_callback(L, 4, 1, "recipe('" + n + "')");
            layer_value(L, lua_gettop(L), n, def, m, out);
            lua_pop(L, 1);
        }
        return out;
    }
    if (!lua_istable(L, ridx)) bind_fail("option 'recipe': expected a table or a function, got %s", luaL_typename(L, ridx));
    // (pattern, stack index of its config), in match order; the configs stay on the stack.
    std::vector<std::pair<std::string, int>> entries;
    int def_idx = 0;
    const bool array = lua_objlen(L, ridx) > 0;
    lua_getfield(L, ridx, "default");
    if (!lua_isnil(L, -1)) def_idx = lua_gettop(L);
    else lua_pop(L, 1);
    if (array) {
        const int n = (int)lua_objlen(L, ridx);
        lua_checkstack(L, n + 8);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, ridx, i);
            int e = lua_gettop(L);
            if (!lua_istable(L, e)) bind_fail("recipe[%d]: expected a {pattern, config} pair, got %s", i, luaL_typename(L, e));
            lua_rawgeti(L, e, 1);
            if (lua_type(L, -1) != LUA_TSTRING) bind_fail("recipe[%d][1]: expected a pattern string, got %s", i, luaL_typename(L, -1));
            std::string p = lua_tostring(L, -1);
            lua_pop(L, 1);
            lua_rawgeti(L, e, 2);   // the config, kept
            lua_remove(L, e);
            entries.push_back({p, lua_gettop(L)});
        }
        lua_pushnil(L);
        while (lua_next(L, ridx)) {   // only the array part and `default`
            lua_pop(L, 1);
            bool ok = lua_type(L, -1) == LUA_TNUMBER || (lua_type(L, -1) == LUA_TSTRING && std::string(lua_tostring(L, -1)) == "default");
            if (!ok) bind_fail("recipe: an array of {pattern, config} pairs takes no other key than 'default'");
        }
    } else {
        std::vector<std::string> pats;
        lua_pushnil(L);
        while (lua_next(L, ridx)) {
            lua_pop(L, 1);
            if (lua_type(L, -1) != LUA_TSTRING) bind_fail("recipe: keys must be patterns (strings)");
            std::string k = lua_tostring(L, -1);
            if (k != "default") pats.push_back(k);
        }
        std::sort(pats.begin(), pats.end());
        lua_checkstack(L, (int)pats.size() + 8);
        for (auto & p : pats) {
            lua_getfield(L, ridx, p.c_str());
            entries.push_back({p, lua_gettop(L)});
        }
    }
    std::vector<bool> used(entries.size(), false);
    for (auto & n : names) {
        int hit = -1;
        for (size_t i = 0; i < entries.size(); i++) {
            if (!lua_find(L, n, entries[i].first, "recipe")) continue;
            used[i] = true;
            if (hit < 0) {
                hit = (int)i;
                if (array) break;   // first match wins
            } else {
                bind_fail("recipe: layer '%s' matches both '%s' and '%s' (a map recipe needs one match per layer; "
                          "use an array of {pattern, config} pairs for first-match order)",
                          n.c_str(), entries[hit].first.c_str(), entries[i].first.c_str());
            }
        }
        if (hit >= 0) layer_value(L, entries[hit].second, n, def, m, out);
        else if (def_idx) layer_value(L, def_idx, n, def, m, out);
    }
    // In an array recipe a later pattern may be shadowed: it counts as used when it matches.
    for (size_t i = 0; i < entries.size(); i++)
        if (!used[i]) {
            bool any = false;
            for (auto & n : names) any = any || lua_find(L, n, entries[i].first, "recipe");
            if (!any) bind_fail("recipe: pattern '%s' matches no layer", entries[i].first.c_str());
        }
    return out;
}

// quant.replace(model, {preset='q2a4', mlp=true, attn=true, filter=nil | recipe=r,
//     init='svd'|'weighted', imatrix=stats, refine=0, lut='uniform'|'kmeans', tighten=false,
//     svd='auto', seed=0, factory=fn, forward='materialized', ste_fp16=false, group_size=32,
//     freeze=true}) -> {names}, {seconds=}
int q_replace(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    int ridx = a.find(0, "recipe");
    if (ridx)
        for (const char * k : {"preset", "mlp", "attn", "filter"})
            if (a.has(0, k)) bind_fail("option '%s': not with 'recipe' (the recipe says which layers and how)", k);
    QuantReplaceOptions o = replace_options(a);
    V2InitOptions io;
    io.form = o.form;
    io.ste_fp16 = o.ste_fp16;
    io.freeze = o.freeze;
    io.init = a.opt_string(0, "init", "svd");
    if (io.init != "svd" && io.init != "weighted") bind_fail("option 'init': expected 'svd' or 'weighted', got '%s'", io.init.c_str());
    io.refine = a.opt_integer(0, "refine", 0);
    if (io.refine < 0) bind_fail("option 'refine': expected >= 0");
    io.tighten = a.opt_bool(0, "tighten", false);
    io.svd = a.opt_string(0, "svd", "auto");
    if (io.svd != "auto" && io.svd != "exact" && io.svd != "randomized")
        bind_fail("option 'svd': expected 'auto', 'exact' or 'randomized', got '%s'", io.svd.c_str());
    io.seed = (uint64_t)a.opt_integer(0, "seed", 0);
    std::string lut = a.opt_string(0, "lut", "uniform");
    if (lut != "uniform" && lut != "kmeans") bind_fail("option 'lut': expected 'uniform' or 'kmeans', got '%s'", lut.c_str());
    if (int ii = a.find(0, "imatrix")) {
        if (!lua_istable(L, ii)) bind_fail("option 'imatrix': expected a table name -> tensor (quant.calibrate), got %s", luaL_typename(L, ii));
        lua_pushnil(L);
        while (lua_next(L, ii)) {
            if (lua_type(L, -2) != LUA_TSTRING) bind_fail("option 'imatrix': keys must be layer names");
            at::Tensor * t = tensor_test(L, -1);
            if (!t) bind_fail("option 'imatrix': '%s': expected a tensor, got %s", lua_tostring(L, -2), luaL_typename(L, -1));
            io.imatrix[lua_tostring(L, -2)] = *t;
            lua_pop(L, 1);
        }
    }
    int fidx = a.find(0, "factory");
    if (fidx && !lua_isfunction(L, fidx)) bind_fail("option 'factory': expected a function, got %s", luaL_typename(L, fidx));
    a.finish();
    LayerRecipe def;
    def.group_size = o.group_size;
    def.kmeans = lut == "kmeans";
    std::vector<LayerRecipe> recipe;
    if (ridx) {
        recipe = recipe_from_lua(L, ridx, m, def);
    } else {
        recipe = quant_preset_recipe(m, o);
        filter_matched(a, o.filter, recipe.size());
        if (recipe.empty()) bind_fail("no layer to replace: options 'mlp' and 'attn' are both false");
        for (auto & r : recipe) r.kmeans = def.kmeans;
    }
    double seconds = 0;
    std::vector<std::string> names;
    if (fidx) {   // Lua layers built by the factory from the float weight and the config
        auto t0 = std::chrono::steady_clock::now();
        for (auto & r : recipe) {
            auto old = m.get_linear(r.name);
            layer_recipe_check(r, old->out_features(), old->in_features());
        }
        for (auto & r : recipe) {
            at::Tensor W, bias;
            linear_dense_weight(m.get_linear(r.name), W, bias);
            lua_pushvalue(L, fidx);
            lua_pushstring(L, r.name.c_str());
            tensor_push(L, W.detach());
            tensor_push(L, bias.defined() ? bias.detach() : at::Tensor());
            lua_createtable(L, 0, 5);
            lua_pushnumber(L, (lua_Number)r.lut_size);
            lua_setfield(L, -2, "lut");
            lua_pushnumber(L, (lua_Number)r.rank);
            lua_setfield(L, -2, "rank");
            lua_pushnumber(L, (lua_Number)r.group_size);
            lua_setfield(L, -2, "group_size");
            lua_pushboolean(L, r.include_zero);
            lua_setfield(L, -2, "include_zero");
            lua_pushboolean(L, r.kmeans);
            lua_setfield(L, -2, "kmeans");
            bind_callback(L, 4, 1, "factory('" + r.name + "')");
            m.set_linear(r.name, lua_linear_new(L, -1, "factory('" + r.name + "')"));
            lua_pop(L, 1);
            names.push_back(r.name);
        }
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } else {
        names = quant_replace_recipe(m, recipe, io, &seconds);
    }
    strings_push(L, names);
    lua_createtable(L, 0, 1);
    lua_pushnumber(L, seconds);
    lua_setfield(L, -2, "seconds");
    return 2;
}

// quant.calibrate(model, batches, {modules=pattern}) -> {name = E[x^2] (in)}, tokens
int q_calibrate(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    std::vector<at::Tensor> batches;
    if (at::Tensor * t = tensor_test(L, 2)) {
        batches.push_back(*t);
    } else if (lua_istable(L, 2)) {
        const int n = (int)lua_objlen(L, 2);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, 2, i);
            at::Tensor * t = tensor_test(L, -1);
            if (!t) bind_fail("argument #2 (batches): element %d: expected an int64 (B, T) tensor, got %s", i, luaL_typename(L, -1));
            batches.push_back(*t);
            lua_pop(L, 1);
        }
    } else {
        bind_fail("argument #2 (batches): expected an array of int64 (B, T) tensors, got %s", luaL_typename(L, 2));
    }
    Args a(L, 3);
    std::string pat = a.opt_string(0, "modules", "");
    a.finish();
    std::vector<std::string> mods;
    for (auto & n : projection_names(m))
        if (pat.empty() || lua_find(L, n, pat, "option 'modules'")) mods.push_back(n);
    if (mods.empty()) bind_fail("option 'modules': pattern '%s' matches no projection", pat.c_str());
    Calibration c = quant_calibrate(m, batches, mods);
    lua_createtable(L, 0, (int)c.stats.size());
    for (auto & [n, t] : c.stats) {
        tensor_push(L, t);
        lua_setfield(L, -2, n.c_str());
    }
    lua_pushnumber(L, (lua_Number)c.tokens);
    return 2;
}

// quant.bits_per_weight(model) -> {quantized=, model=, quantized_weights=, model_weights=, bits=}
int q_bits_per_weight(lua_State * L) {
    BitsReport r = quant_bits_per_weight(nn_model_check(L, 1));
    lua_createtable(L, 0, 5);
    lua_pushnumber(L, r.quantized);
    lua_setfield(L, -2, "quantized");
    lua_pushnumber(L, r.model);
    lua_setfield(L, -2, "model");
    lua_pushnumber(L, (lua_Number)r.quantized_weights);
    lua_setfield(L, -2, "quantized_weights");
    lua_pushnumber(L, (lua_Number)r.model_weights);
    lua_setfield(L, -2, "model_weights");
    lua_pushnumber(L, r.bits);
    lua_setfield(L, -2, "bits");
    return 1;
}

// quant.tighten_q(model, {floor=1e-4}) -> count
int q_tighten_q(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    double f = a.opt_number(0, "floor", 1e-4);
    a.finish();
    if (!(f > 0)) bind_fail("option 'floor': expected > 0");
    lua_pushnumber(L, (lua_Number)quant_tighten_q(m, f));
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
    o.filter = filter_arg(a);
    a.finish();
    auto names = quant_replace_v1(m, o);
    filter_matched(a, o.filter, names.size());
    strings_push(L, names);
    return 1;
}

int q_freeze_q(lua_State * L) {
    quant_freeze_q(nn_model_check(L, 1));
    return 0;
}

// quant.set_trainable(model, 'all'|'g_only'|'mlp'|'attn'|'frozen_magnitude'|'lut') -> count
int q_set_trainable(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    std::string mode = a.opt_string(1, "mode", "all");
    a.finish();
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
    Args a(L, 2);
    std::string path = a.string(1, "path");
    a.finish();
    lua_pushnumber(L, (lua_Number)quant_export_compact(m, path));
    return 1;
}

// quant.save_checkpoint(model, dir, {float_weights = false}): model.safetensors (the seed's key
// names) + config.json; without float_weights, frozen V2 layers leave their float weight out.
int q_save_checkpoint(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    int idx = a.find(1, "dir");
    if (!idx || lua_type(L, idx) != LUA_TSTRING) bind_fail("argument #2 (dir): expected a directory path");
    std::string dir = lua_tostring(L, idx);
    bool fw = a.opt_bool(0, "float_weights", false);
    a.finish();
    quant_save_checkpoint(m, dir, fw);
    return 0;
}

// quant.load_checkpoint(model, path, {ste_fp16=false}) -> {unused keys}: our checkpoint folder
// (quant.save_checkpoint) or the seed's .pt state dict; one name for both.
int q_load_checkpoint(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    int idx = a.find(1, "path");
    if (!idx || lua_type(L, idx) != LUA_TSTRING) bind_fail("argument #2 (path): expected a checkpoint file or directory");
    std::string path = lua_tostring(L, idx);
    LutConfig base;
    base.use_ste_fp16 = a.opt_bool(0, "ste_fp16", false);
    a.finish();
    strings_push(L, quant_load_checkpoint(m, path, base));
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
    Args a(L);
    std::string name = a.string(1, "name");
    a.finish();
    LutPreset p = lut_preset(name);
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

// quant.layers(model) -> array of {name=, kind='v2'|'v1', lut_size=, rank=, baked=, forward=, ste_fp16=,
//                                  bits_per_weight=, group_size=, include_zero=, lora_rank=, lora_alpha=} (V2; V1: name, kind, lut_size, rank)
// Lua layers with a quant_info(self) method are listed with what it returns (kind 'lua' by default).
int q_layers(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    auto v2 = quant_v2_layers(m);
    auto v1 = quant_v1_layers(m);
    lua_createtable(L, (int)(v2.size() + v1.size()), 0);
    int i = 1;
    for (auto & [n, l] : v2) {
        lua_createtable(L, 0, 10);
        lua_pushnumber(L, v2_bits_per_weight(l->out_features(), l->in_features(), l->rank(), l->lut.numel()));
        lua_setfield(L, -2, "bits_per_weight");
        lua_pushnumber(L, (lua_Number)l->cfg.group_size);
        lua_setfield(L, -2, "group_size");
        lua_pushboolean(L, l->cfg.lut_include_zero);
        lua_setfield(L, -2, "include_zero");
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
        lua_pushnumber(L, (lua_Number)l->lora_rank());   // 0 without recovery LoRA
        lua_setfield(L, -2, "lora_rank");
        if (l->lora_A.defined()) {
            lua_pushnumber(L, l->lora_alpha);
            lua_setfield(L, -2, "lora_alpha");
        }
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
    // Lua layers that say they are quantizers: quant_info(self) -> {lut_size=, rank=, bits_per_weight=, ...}
    const int out = lua_gettop(L);
    for (auto & n : m.linear_names()) {
        if (!lua_linear_push(L, m.get_linear(n))) continue;
        lua_getfield(L, -1, "quant_info");
        if (!lua_isfunction(L, -1)) {
            lua_settop(L, out);
            continue;
        }
        lua_insert(L, -2);
        bind_callback(L, 1, 1, "quant_info of Lua layer " + n);
        if (!lua_istable(L, -1)) bind_fail("quant_info of Lua layer %s: expected a table, got %s", n.c_str(), luaL_typename(L, -1));
        lua_pushstring(L, n.c_str());
        lua_setfield(L, -2, "name");
        lua_getfield(L, -1, "kind");
        if (lua_isnil(L, -1)) {
            lua_pushliteral(L, "lua");
            lua_setfield(L, -3, "kind");
        }
        lua_pop(L, 1);
        lua_rawseti(L, out, i++);
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

// -- recovery LoRA (docs/formulas.md §2.7) -------------------------------------------------------------------

RecoveryLoraOptions lora_options(Args & a, bool all) {
    RecoveryLoraOptions o;
    o.rank = a.opt_integer(0, "rank", 8);
    if (a.has(0, "alpha")) o.alpha = a.opt_number(0, "alpha", 0.0);
    o.dropout = a.opt_number(0, "dropout", 0.0);
    if (all) {
        o.mlp_only = a.opt_bool(0, "mlp_only", false);
        o.skip_k_proj = a.opt_bool(0, "skip_k_proj", true);
    }
    a.finish();
    if (o.rank < 1) bind_fail("option 'rank': expected >= 1, got %lld", (long long)o.rank);
    if (!(o.dropout >= 0 && o.dropout < 1)) bind_fail("option 'dropout': expected [0, 1), got %g", o.dropout);
    return o;
}

// quant.enable_recovery_lora(model, name, {rank=8, alpha=rank, dropout=0}): lora_A ~ N(0, 0.02), lora_B = 0
int q_enable_recovery_lora(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    int idx = a.find(1, "name");
    if (!idx || lua_type(L, idx) != LUA_TSTRING) bind_fail("argument #2 (name): expected a layer name");
    std::string name = lua_tostring(L, idx);
    RecoveryLoraOptions o = lora_options(a, false);
    quant_enable_recovery_lora(m, name, o);
    return 0;
}

// quant.enable_recovery_lora_all(model, {rank=8, alpha=rank, dropout=0, mlp_only=false, skip_k_proj=true})
//   -> {names}, {layers=, params=}
int q_enable_recovery_lora_all(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    RecoveryLoraOptions o = lora_options(a, true);
    auto names = quant_enable_recovery_lora_all(m, o);
    int64_t params = 0;
    for (auto & [n, l] : quant_v2_layers(m))
        if (l->lora_A.defined()) params += l->lora_A.numel() + l->lora_B.numel();
    strings_push(L, names);
    lua_createtable(L, 0, 2);
    lua_pushnumber(L, (lua_Number)names.size());
    lua_setfield(L, -2, "layers");
    lua_pushnumber(L, (lua_Number)params);
    lua_setfield(L, -2, "params");
    return 2;
}

// quant.disable_recovery_lora(model) -> count: drops every adapter (no merge)
int q_disable_recovery_lora(lua_State * L) {
    lua_pushnumber(L, (lua_Number)quant_disable_recovery_lora(nn_model_check(L, 1)));
    return 1;
}

// quant.freeze_for_recovery_training(model, {train_norms=false, train_embeddings=false, train_lm_head=false})
//   -> count of trainable tensors (lora_A, lora_B of every LoRA'd layer, and what the options add)
int q_freeze_for_recovery(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    Args a(L, 2);
    bool norms = a.opt_bool(0, "train_norms", false), emb = a.opt_bool(0, "train_embeddings", false),
         head = a.opt_bool(0, "train_lm_head", false);
    a.finish();
    lua_pushnumber(L, (lua_Number)quant_freeze_for_recovery(m, norms, emb, head));
    return 1;
}

// quant.resnap_with_lora(model) -> {layers=, changed=, weights=, rel_error=}: Q = nearest(W_eff + ΔW) / S
int q_resnap_with_lora(lua_State * L) {
    ResnapStats st = quant_resnap_with_lora(nn_model_check(L, 1));
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (lua_Number)st.layers);
    lua_setfield(L, -2, "layers");
    lua_pushnumber(L, (lua_Number)st.changed);
    lua_setfield(L, -2, "changed");
    lua_pushnumber(L, (lua_Number)st.weights);
    lua_setfield(L, -2, "weights");
    lua_pushnumber(L, st.rel_error);
    lua_setfield(L, -2, "rel_error");
    return 1;
}

const BindFn quant_functions[] = {
    {"replace", q_replace},
    {"calibrate", q_calibrate},
    {"bits_per_weight", q_bits_per_weight},
    {"tighten_q", q_tighten_q},
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
    {"load_checkpoint", q_load_checkpoint},
    {"lut", q_lut},
    {"kmeans_reduce", q_kmeans_reduce},
    {"ste_fp16", q_ste_fp16},
    {"preset", q_preset},
    {"layers", q_layers},
    {"enable_lut_training", q_enable_lut_training},
    {"enable_recovery_lora", q_enable_recovery_lora},
    {"enable_recovery_lora_all", q_enable_recovery_lora_all},
    {"disable_recovery_lora", q_disable_recovery_lora},
    {"freeze_for_recovery_training", q_freeze_for_recovery},
    {"resnap_with_lora", q_resnap_with_lora},
    {nullptr, nullptr},
};

} // namespace

int luaopen_quant(lua_State * L) {
    lua_newtable(L);
    int t = lua_gettop(L);
    bind_register(L, t, "quant.", quant_functions);
    quant_open_intn(L, t);
    // quant.sensitivity / quant.allocate_bits are Lua (scripts/sensitivity.lua), required on first call.
    static const char * lua_side =
        "local t = ...\n"
        "function t.sensitivity(...) return require('sensitivity').measure(...) end\n"
        "function t.allocate_bits(...) return require('sensitivity').allocate(...) end\n";
    if (luaL_loadbuffer(L, lua_side, strlen(lua_side), "=quant") != 0) return lua_error(L);
    lua_pushvalue(L, t);
    lua_call(L, 1, 0);
    lua_settop(L, t);
    return 1;
}

} // namespace qatlab
