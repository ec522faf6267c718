// bind_modules: the list of built-in Lua modules, registered in package.preload so that
// `require 'name'` loads them on demand and nothing is put in the globals.
#include "bindings/bind.h"

namespace qatlab {

int luaopen_gguf(lua_State * L);
int luaopen_tokenizers(lua_State * L);
int luaopen_nn(lua_State * L);
int luaopen_quant(lua_State * L);
int luaopen_data(lua_State * L);
int luaopen_kd(lua_State * L);
int luaopen_optim(lua_State * L);
int luaopen_dist(lua_State * L);
int luaopen_torch_nn_functional(lua_State * L);
void torch_open_backends(lua_State * L, int torch_table);   // torch_backends.cpp

// One line per module: the name scripts require, and its luaopen function.
static const struct {
    const char * name;
    lua_CFunction open;
} modules[] = {
    {"torch", luaopen_torch},
    {"log", luaopen_log},
    {"gguf", luaopen_gguf},
    {"tokenizers", luaopen_tokenizers},
    {"nn", luaopen_nn},
    {"quant", luaopen_quant},
    {"data", luaopen_data},
    {"kd", luaopen_kd},
    {"optim", luaopen_optim},
    {"dist", luaopen_dist},
    {"torch.nn.functional", luaopen_torch_nn_functional},
};

void bind_open_all(lua_State * L) {
    tensor_open_metatable(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    for (const auto & m : modules) {
        lua_pushcfunction(L, m.open);
        lua_setfield(L, -2, m.name);
    }
    lua_pop(L, 2);
    // Tensors can reach a script through any module (nn, kd, data...): open torch now so the
    // Tensor metatable always has its methods, whether or not the script required torch.
    lua_getglobal(L, "require");
    lua_pushliteral(L, "torch");
    lua_call(L, 1, 1);
    torch_open_backends(L, -1);   // torch.backends.cpu, torch.cpu
    lua_pop(L, 1);
}

} // namespace qatlab
