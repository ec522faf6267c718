// gguf: the `gguf` Lua module over lib/gguf: metadata, tensor listing and loading of llama.cpp's
// GGUF files, with llama tensors renamed (and Q/K rows unpermuted) to Hugging Face's layout.
#include "bindings/bind.h"

#include "lib/gguf.h"

#include <ATen/ATen.h>

namespace qatlab {
namespace {

const char * arg_path(lua_State * L) {
    if (lua_type(L, 1) != LUA_TSTRING)
        bind_fail("argument #1 (path): expected a string, got %s", luaL_typename(L, 1));
    return lua_tostring(L, 1);
}

// Metadata value → Lua: numbers (uint64 beyond 2^53 rounds, as Lua numbers do), booleans,
// strings, arrays as 1-based tables (nested arrays nest).
void value_push(lua_State * L, const GgufValue & v) {
    lua_checkstack(L, 4);
    switch (v.type) {
    case GgufType::ARRAY: {
        const size_t n = v.size();
        lua_createtable(L, int(n), 0);
        for (size_t k = 0; k < n; ++k) {
            if (v.item_type == GgufType::STRING) lua_pushlstring(L, v.strings[k].data(), v.strings[k].size());
            else if (v.item_type == GgufType::ARRAY) value_push(L, v.arrays[k]);
            else value_push(L, v.item(k));
            lua_rawseti(L, -2, int(k + 1));
        }
        return;
    }
    case GgufType::STRING: lua_pushlstring(L, v.s.data(), v.s.size()); return;
    case GgufType::BOOL: lua_pushboolean(L, v.i != 0); return;
    case GgufType::FLOAT32: case GgufType::FLOAT64: lua_pushnumber(L, v.f); return;
    case GgufType::UINT8: case GgufType::UINT16: case GgufType::UINT32: case GgufType::UINT64:
        lua_pushnumber(L, double(v.u));
        return;
    default: lua_pushnumber(L, double(v.i)); return;
    }
}

// gguf.metadata(path) → {key = value}
int l_metadata(lua_State * L) {
    const char * path = arg_path(L);
    GgufFile f = gguf_open(path);
    lua_createtable(L, 0, int(f.metadata.size()));
    for (const auto & [k, v] : f.metadata) {
        value_push(L, v);
        lua_setfield(L, -2, k.c_str());
    }
    return 1;
}

// gguf.tensors(path) → {{name=, shape={...}, type='Q4_1', nbytes=}, ...} in file order;
// shapes in PyTorch order.
int l_tensors(lua_State * L) {
    const char * path = arg_path(L);
    GgufFile f = gguf_open(path);
    lua_createtable(L, int(f.tensors.size()), 0);
    int i = 0;
    for (const auto & t : f.tensors) {
        lua_createtable(L, 0, 4);
        lua_pushlstring(L, t.name.data(), t.name.size());
        lua_setfield(L, -2, "name");
        lua_createtable(L, int(t.shape.size()), 0);
        for (size_t d = 0; d < t.shape.size(); ++d) {
            lua_pushnumber(L, double(t.shape[d]));
            lua_rawseti(L, -2, int(d + 1));
        }
        lua_setfield(L, -2, "shape");
        lua_pushstring(L, ggml_type_name(t.type));
        lua_setfield(L, -2, "type");
        lua_pushnumber(L, double(t.nbytes));
        lua_setfield(L, -2, "nbytes");
        lua_rawseti(L, -2, ++i);
    }
    return 1;
}

// gguf.load(path[, {dtype='float32', hf_names=true, device=}]) → {name = Tensor}, config
// hf_names: Hugging Face names and Q/K layout, config = the HF config.json as a table (llama
// files only). hf_names=false: GGUF names and layout as stored, config = the HF config when the
// file is llama, else nil. dtype: any float dtype; F16/BF16/F32 data asked for as stored is not
// copied.
int l_load(lua_State * L) {
    const char * path = arg_path(L);
    Args a(L, 2);
    at::ScalarType dt = at::kFloat;
    a.opt_dtype(0, "dtype", dt);
    const bool hf = a.opt_bool(0, "hf_names", true);
    c10::Device dev(at::kCPU);
    const bool move = a.opt_device(0, "device", dev);
    a.finish();
    if (!at::isFloatingType(dt))
        bind_fail("option 'dtype': expected a float dtype (float32, float16, bfloat16, float64), got %s",
                  c10::toString(dt));

    GgufFile f = gguf_open(path);
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    nlohmann::ordered_json config;
    if (hf) {
        GgufHfModel m = gguf_load_hf(f, dt);
        tensors = std::move(m.tensors);
        config = std::move(m.config);
    } else {
        for (const auto & t : f.tensors) tensors.emplace_back(t.name, gguf_tensor(f, t.name, dt));
        const bool llama = gguf_has(f, "general.architecture") &&
                           gguf_get(f, "general.architecture").type == GgufType::STRING &&
                           gguf_get_string(f, "general.architecture") == "llama";
        if (llama) config = gguf_hf_config(f);
    }
    lua_createtable(L, 0, int(tensors.size()));
    for (auto & [name, t] : tensors) {
        tensor_push(L, move ? t.to(dev) : t);
        lua_setfield(L, -2, name.c_str());
    }
    if (config.is_null()) lua_pushnil(L);
    else json_push(L, config);
    return 2;
}

const BindFn fns[] = {
    {"metadata", l_metadata},
    {"tensors", l_tensors},
    {"load", l_load},
    {nullptr, nullptr},
};

} // namespace

int luaopen_gguf(lua_State * L) {
    lua_newtable(L);
    bind_register(L, -1, "gguf.", fns);
    return 1;
}

} // namespace qatlab
