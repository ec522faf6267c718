// torch_backends: torch.backends.cpu.get_cpu_capability() and torch.cpu.capabilities() /
// supports_bf16(), as in PyTorch, from lib/cpu_caps (the trainer's precision='auto' reads them).
#include "bindings/bind.h"
#include "lib/cpu_caps.h"

namespace qatlab {

namespace {

int f_get_cpu_capability(lua_State * L) {
    Args(L).finish();
    lua_pushstring(L, cpu_caps_detect().capability.c_str());
    return 1;
}

// {capability =, cpu_name =, avx2 =, avx512f =, avx512_bf16 =, amx_tile =, amx_bf16 =, source =, flags = {...}}
int f_capabilities(lua_State * L) {
    Args(L).finish();
    CpuCaps c = cpu_caps_detect();
    lua_createtable(L, 0, 9);
    auto str = [&](const char * k, const std::string & v) { lua_pushstring(L, v.c_str()); lua_setfield(L, -2, k); };
    auto flag = [&](const char * k, bool v) { lua_pushboolean(L, v); lua_setfield(L, -2, k); };
    str("capability", c.capability);
    str("cpu_name", c.cpu_name);
    str("source", c.source);
    flag("avx2", c.avx2);
    flag("avx512f", c.avx512f);
    flag("avx512_bf16", c.avx512_bf16);
    flag("amx_tile", c.amx_tile);
    flag("amx_bf16", c.amx_bf16);
    lua_createtable(L, (int)c.flags.size(), 0);
    for (size_t i = 0; i < c.flags.size(); i++) {
        lua_pushstring(L, c.flags[i].c_str());
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "flags");
    return 1;
}

// supports_bf16() -> true|false, why ("amx_bf16", "avx512_bf16" or what is missing)
int f_supports_bf16(lua_State * L) {
    Args(L).finish();
    std::string why;
    bool ok = cpu_caps_fast_bf16(cpu_caps_detect(), &why);
    lua_pushboolean(L, ok);
    lua_pushstring(L, why.c_str());
    return 2;
}

const BindFn backends_cpu_fns[] = {{"get_cpu_capability", f_get_cpu_capability}, {nullptr, nullptr}};
const BindFn cpu_fns[] = {{"capabilities", f_capabilities}, {"supports_bf16", f_supports_bf16},
                          {"get_cpu_capability", f_get_cpu_capability}, {nullptr, nullptr}};

} // namespace

// Adds torch.backends.cpu and torch.cpu to the torch table at index t.
void torch_open_backends(lua_State * L, int t) {
    if (t < 0) t = lua_gettop(L) + t + 1;
    lua_getfield(L, t, "backends");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, t, "backends");
    }
    lua_newtable(L);
    bind_register(L, -1, "torch.backends.cpu.", backends_cpu_fns);
    lua_setfield(L, -2, "cpu");
    lua_pop(L, 1);
    lua_newtable(L);
    bind_register(L, -1, "torch.cpu.", cpu_fns);
    lua_setfield(L, t, "cpu");
}

} // namespace qatlab
