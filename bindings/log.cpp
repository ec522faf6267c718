// log: the `log` Lua module over spdlog: log.info(...), levels, log.set_level. The host
// decides the sinks (stderr, and <out>/qatlab.log with --out).
#include "bindings/bind.h"

#include "lib/logging.h"

#include <cstring>

namespace qatlab {
namespace {

// Joins the arguments with tostring and spaces, as print does.
std::string log_message(lua_State * L) {
    std::string msg;
    int n = lua_gettop(L);
    lua_getglobal(L, "tostring");
    for (int i = 1; i <= n; i++) {
        lua_pushvalue(L, -1);
        lua_pushvalue(L, i);
        lua_call(L, 1, 1);
        size_t len;
        const char * s = lua_tolstring(L, -1, &len);
        if (i > 1) msg += ' ';
        if (s) msg.append(s, len);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return msg;
}

template <LogLevel LV>
int log_at(lua_State * L) {
    if (!log_enabled(LV)) return 0;  // skip the string work when filtered out
    log_write(LV, log_message(L));
    return 0;
}

int l_set_level(lua_State * L) {
    LogLevel lv;
    if (lua_type(L, 1) != LUA_TSTRING) bind_fail("expected a level name such as 'info', got %s", luaL_typename(L, 1));
    const char * s = lua_tostring(L, 1);
    if (!log_level_parse(s, lv))
        bind_fail("unknown level '%s' (expected trace, debug, info, warn, error, critical or off)", s);
    log_set_level(lv);
    return 0;
}

int l_get_level(lua_State * L) {
    lua_pushstring(L, log_level_name(log_get_level()));
    return 1;
}

int l_flush(lua_State * L) {
    log_flush();
    return 0;
}

const BindFn fns[] = {
    {"trace", log_at<LOG_TRACE>}, {"debug", log_at<LOG_DEBUG>}, {"info", log_at<LOG_INFO>},
    {"warn", log_at<LOG_WARN>}, {"error", log_at<LOG_ERROR>}, {"critical", log_at<LOG_CRITICAL>},
    {"set_level", l_set_level}, {"get_level", l_get_level}, {"flush", l_flush},
    {nullptr, nullptr},
};

} // namespace

int luaopen_log(lua_State * L) {
    lua_newtable(L);
    bind_register(L, -1, "log.", fns);
    return 1;
}

} // namespace qatlab
